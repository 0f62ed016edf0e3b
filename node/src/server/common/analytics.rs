//! The default analytics sink (SPEC R10): when a room ends, its event log and summary are
//! written to `<data dir>/analytics/<room id>.jsonl`, one JSON line per event
//! (`{"kind":"room.event",…}`) and the summary last (`{"kind":"room.summary",…}`). Other
//! sinks implement `chorus_actors::room_actor::AnalyticsSink`.

use std::io::Write as _;
use std::path::PathBuf;

use chorus_actors::room_actor::{AnalyticsSink, LoggedEvent};
use chorus_protocol::RoomSummary;

/// Writes ended rooms' summaries as JSON lines, one file per room.
#[derive(Debug, Clone)]
pub struct FileAnalytics {
    /// The directory of the files (created on first use).
    pub dir: PathBuf,
}

impl FileAnalytics {
    /// The file of `room_id`: only `[A-Za-z0-9_-]` of the id are kept, so an id never
    /// names a path outside the directory.
    pub fn path_of(&self, room_id: &str) -> PathBuf {
        let name: String = room_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(128)
            .collect();
        self.dir.join(format!("{name}.jsonl"))
    }
}

impl AnalyticsSink for FileAnalytics {
    fn export(&self, summary: RoomSummary, events: Vec<LoggedEvent>, missing: Vec<String>) {
        let path = self.path_of(&summary.room_id);
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let count = events.len();
            let written = std::fs::create_dir_all(&dir).and_then(|()| {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                let mut out = std::io::BufWriter::new(file);
                for event in events {
                    let body: serde_json::Value =
                        serde_json::from_slice(&event.json).unwrap_or(serde_json::Value::Null);
                    let line = serde_json::json!({
                        "kind": "room.event",
                        "epoch": event.epoch,
                        "seq": event.seq,
                        "at_ms": event.at_ms,
                        "event": event.kind,
                        "body": body,
                    });
                    writeln!(out, "{line}")?;
                }
                let line = serde_json::json!({
                    "kind": "room.summary",
                    "summary": summary,
                    "events": count,
                    "missing_parts": missing,
                });
                writeln!(out, "{line}")?;
                let file = out.into_inner().map_err(|e| e.into_error())?;
                file.sync_data()
            });
            match written {
                Ok(()) => metrics::counter!("chorus_analytics_exports_total").increment(1),
                Err(error) => {
                    tracing::error!(path = %path.display(), %error, "room summary not exported")
                }
            }
        });
    }
}
