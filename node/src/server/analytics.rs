//! The default analytics sink (SPEC R10): when a room ends, its summary is appended as
//! one JSON line to `<data dir>/analytics/<room id>.jsonl`. Other sinks implement
//! `chorus_actors::room_actor::AnalyticsSink`.

use std::io::Write as _;
use std::path::PathBuf;

use chorus_actors::room_actor::AnalyticsSink;
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
    fn export(&self, summary: RoomSummary) {
        let path = self.path_of(&summary.room_id);
        let dir = self.dir.clone();
        let line = serde_json::json!({"kind": "room.summary", "summary": summary}).to_string();
        tokio::task::spawn_blocking(move || {
            let written = std::fs::create_dir_all(&dir).and_then(|()| {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                writeln!(file, "{line}")?;
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
