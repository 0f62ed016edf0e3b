//! `chorus client … vm <command>`: voice messages from the command line (docs/protocol.md
//! §14): send an `.opus` file in chunks (with progress on a terminal), resume a cut-off
//! send, list and sync the inbox, fetch a message to a file (also while it uploads), mark
//! read, set the play position, show a conversation's history.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use chorus_protocol::{
    ErrorCode, VmCancelRequest, VmChunkRequest, VmFetchRequest, VmGroupCreateRequest,
    VmGroupInfoRequest, VmHistoryRequest, VmPlayRequest, VmReadRequest, VmSendRequest,
    VmStatusRequest, VmSyncRequest, VmUploadState, VmUploadStatus, FETCH_BYTES_MAX,
};

use super::{Client, ClientError};
use crate::token::unix_now_secs;

/// Default bytes per chunk: a few Ogg pages.
pub const CHUNK_BYTES_DEFAULT: usize = 16 * 1024;
/// How long `send` and `fetch` keep retrying while the cluster is unavailable.
pub const RETRY_FOR: Duration = Duration::from_secs(60);

/// The voice-message commands.
#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Send an Ogg Opus file (e.g. from `opusenc`) as a voice message: prints the message
    /// id, then the upload's state when it completes (`-q`: only the id). On a terminal, a
    /// progress line goes to standard error. Cut off, it says how to resume.
    Send {
        /// The recipient (repeat for several).
        #[arg(long = "to", required_unless_present = "group")]
        to: Vec<String>,
        /// A group (from `vm group-create`) instead of `--to`.
        #[arg(long, conflicts_with = "to")]
        group: Option<String>,
        /// The `.opus` file.
        file: PathBuf,
        /// Bytes per chunk (at most the node's `voicemail.chunk_bytes_max`, 32 KiB by
        /// default).
        #[arg(long, default_value_t = CHUNK_BYTES_DEFAULT)]
        chunk_bytes: usize,
        /// Wait this long between chunks, ms (to see a message play while it uploads).
        #[arg(long, default_value_t = 0)]
        pace_ms: u64,
        /// Print only the message id.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Continue a send that was cut off: asks where the upload stands and sends the rest
    /// of the same file from there.
    Resume {
        /// The message id `send` printed.
        message: String,
        /// The same `.opus` file.
        file: PathBuf,
        /// Bytes per chunk.
        #[arg(long, default_value_t = CHUNK_BYTES_DEFAULT)]
        chunk_bytes: usize,
    },
    /// Where an upload stands (`vm.status`).
    Status {
        /// The message id.
        message: String,
    },
    /// Cancel an upload (sender only).
    Cancel {
        /// The message id.
        message: String,
    },
    /// Sync the inbox: prints one JSON line per message after `--after`, in inbox order,
    /// every page.
    Inbox {
        /// This device's id (a user has at most 16).
        #[arg(long, default_value = "cli")]
        device: String,
        /// The last inbox number this device has.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Fetch a message's audio to a file, waiting for bytes while it is still uploading;
    /// prints `{"message_id", "bytes", "status"}`.
    Fetch {
        /// The message id.
        message: String,
        /// Where to write the audio.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Mark a message read (on every device of the user).
    Read {
        /// The message id.
        message: String,
    },
    /// Set the play position of a message (last writer by device time wins).
    Play {
        /// The message id.
        message: String,
        /// Where, ms into the audio.
        #[arg(long)]
        position_ms: u64,
        /// This device's id.
        #[arg(long, default_value = "cli")]
        device: String,
    },
    /// Create a group conversation of you and the members; prints the group (its
    /// `group_id` for `send --group`, its `conversation` for `history`).
    GroupCreate {
        /// A member (repeat; at most 32).
        #[arg(long = "member", required = true)]
        members: Vec<String>,
        /// The group's name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Show a group you are in.
    GroupInfo {
        /// The group id.
        group: String,
    },
    /// A conversation's messages, newest first: one JSON line per message, every page.
    History {
        /// The conversation (`direct:<a>:<b>`, as `vm.message` and `inbox` show it).
        conversation: String,
        /// Entries per page.
        #[arg(long, default_value_t = 50)]
        page: u32,
    },
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("cannot print as JSON: {e}"),
    }
}

/// Whether `error` may pass if the request is sent again (a node busy or moving).
fn transient(error: &ClientError) -> bool {
    match error {
        ClientError::Server(body) => body.code == ErrorCode::Unavailable.as_u16(),
        ClientError::Timeout { .. } | ClientError::ConnectionLost { .. } => true,
        _ => false,
    }
}

/// Runs one voice-message command. Prints what the command answers, not the
/// notifications the session received meanwhile (a send's own `vm.bytes`, …).
pub async fn execute(client: &mut Client, command: VmCommand) -> anyhow::Result<()> {
    let result = run(client, command).await;
    while client.try_next_event().is_some() {}
    result
}

async fn run(client: &mut Client, command: VmCommand) -> anyhow::Result<()> {
    match command {
        VmCommand::Send {
            to,
            group,
            file,
            chunk_bytes,
            pace_ms,
            quiet,
        } => {
            let audio = read_opus(&file)?;
            let sent = client
                .request(VmSendRequest { to, group })
                .await
                .context("vm.send failed")?;
            if quiet {
                println!("{}", sent.message_id);
            } else {
                print_json(&sent);
            }
            let state = upload(
                client,
                &sent.message_id,
                &audio,
                0,
                chunk_bytes,
                pace_ms,
                &file,
            )
            .await?;
            if !quiet {
                print_json(&state);
            }
        }
        VmCommand::Resume {
            message,
            file,
            chunk_bytes,
        } => {
            let audio = read_opus(&file)?;
            let status = client
                .request(VmStatusRequest {
                    message_id: message.clone(),
                })
                .await
                .context("vm.status failed")?;
            if status.status != VmUploadStatus::Uploading {
                print_json(&status);
                return Ok(());
            }
            let state = upload(
                client,
                &message,
                &audio,
                status.acked,
                chunk_bytes,
                0,
                &file,
            )
            .await?;
            print_json(&state);
        }
        VmCommand::Status { message } => {
            let state = client
                .request(VmStatusRequest {
                    message_id: message,
                })
                .await
                .context("vm.status failed")?;
            print_json(&state);
        }
        VmCommand::Cancel { message } => {
            let state = client
                .request(VmCancelRequest {
                    message_id: message,
                })
                .await
                .context("vm.cancel failed")?;
            print_json(&state);
        }
        VmCommand::Inbox { device, after } => {
            let mut after = after;
            loop {
                let page = client
                    .request(VmSyncRequest {
                        device: device.clone(),
                        after,
                        limit: Some(200),
                    })
                    .await
                    .context("vm.sync failed")?;
                for entry in &page.entries {
                    print_json(entry);
                }
                match page.next {
                    Some(next) => after = next,
                    None => break,
                }
            }
        }
        VmCommand::Fetch { message, output } => {
            let (bytes, status) = fetch(client, &message).await?;
            std::fs::write(&output, &bytes)
                .with_context(|| format!("cannot write {}", output.display()))?;
            print_json(&serde_json::json!({
                "message_id": message,
                "bytes": bytes.len(),
                "status": status,
            }));
        }
        VmCommand::Read { message } => {
            let state = client
                .request(VmReadRequest {
                    message_id: message,
                })
                .await
                .context("vm.read failed")?;
            print_json(&state);
        }
        VmCommand::Play {
            message,
            position_ms,
            device,
        } => {
            let state = client
                .request(VmPlayRequest {
                    message_id: message,
                    device,
                    position_ms,
                    at_ms: unix_now_secs().saturating_mul(1000),
                })
                .await
                .context("vm.play failed")?;
            print_json(&state);
        }
        VmCommand::GroupCreate { members, name } => {
            let group = client
                .request(VmGroupCreateRequest { members, name })
                .await
                .context("vm.group_create failed")?;
            print_json(&group);
        }
        VmCommand::GroupInfo { group } => {
            let group = client
                .request(VmGroupInfoRequest { group_id: group })
                .await
                .context("vm.group_info failed")?;
            print_json(&group);
        }
        VmCommand::History { conversation, page } => {
            let mut before = None;
            loop {
                let answer = client
                    .request(VmHistoryRequest {
                        conversation: conversation.clone(),
                        before,
                        limit: Some(page),
                    })
                    .await
                    .context("vm.history failed")?;
                for entry in &answer.entries {
                    print_json(entry);
                }
                match answer.next {
                    Some(next) => before = Some(next),
                    None => break,
                }
            }
        }
    }
    Ok(())
}

fn read_opus(file: &Path) -> anyhow::Result<Vec<u8>> {
    let audio = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    anyhow::ensure!(
        audio.starts_with(b"OggS"),
        "{} is not an Ogg file (make one with `opusenc in.wav out.opus`)",
        file.display()
    );
    Ok(audio)
}

/// Sends `audio` from `from` in chunks, each from where the upload stands, retrying while
/// the cluster is unavailable; the final state.
async fn upload(
    client: &Client,
    message_id: &str,
    audio: &[u8],
    from: u64,
    chunk_bytes: usize,
    pace_ms: u64,
    file: &Path,
) -> anyhow::Result<VmUploadState> {
    anyhow::ensure!(chunk_bytes > 0, "--chunk-bytes must be positive");
    let progress = std::io::stderr().is_terminal();
    let total = audio.len() as u64;
    let mut at = from;
    let mut retrying_since: Option<std::time::Instant> = None;
    loop {
        let end = (at + chunk_bytes as u64).min(total);
        let last = end == total;
        let answer = client
            .request(VmChunkRequest {
                message_id: message_id.to_string(),
                offset: at,
                data: b64(&audio[at as usize..end as usize]),
                last,
            })
            .await;
        let state = match answer {
            Ok(state) => {
                retrying_since = None;
                state
            }
            Err(error) if transient(&error) => {
                let since = *retrying_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > RETRY_FOR {
                    anyhow::bail!(
                        "the upload was cut off at byte {} of {total}: {error}\n\
                         resume it with: chorus client … vm resume {message_id} {}",
                        at,
                        file.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                // Continue from what the cluster holds (the chunk may have landed).
                if let Ok(status) = client
                    .request(VmStatusRequest {
                        message_id: message_id.to_string(),
                    })
                    .await
                {
                    at = status.acked.min(at);
                }
                continue;
            }
            Err(ClientError::Server(body)) if body.code == ErrorCode::UploadOutOfOrder.as_u16() => {
                // The owner changed and lost the end of a page that was still open:
                // continue from what is stored.
                let status = client
                    .request(VmStatusRequest {
                        message_id: message_id.to_string(),
                    })
                    .await
                    .context("vm.status failed")?;
                anyhow::ensure!(status.acked < at, "vm.chunk at byte {at}: {}", body.message);
                at = status.acked;
                continue;
            }
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("vm.chunk at byte {at} of {message_id} failed")))
            }
        };
        if progress {
            eprint!(
                "\r{message_id}: sent {end} of {total} bytes, {} stored on two nodes   ",
                state.acked
            );
        }
        if state.status != VmUploadStatus::Uploading {
            if progress {
                eprintln!();
            }
            return Ok(state);
        }
        // The next chunk starts where this one ended (bytes of a page still open are held
        // by the owner and acknowledged with the page's end).
        at = end;
        if last {
            anyhow::bail!(
                "every byte was sent but the upload did not complete ({} of {total} stored): is the file one whole Ogg Opus stream?",
                state.acked
            );
        }
        if pace_ms > 0 {
            tokio::time::sleep(Duration::from_millis(pace_ms)).await;
        }
    }
}

/// Fetches a whole message, waiting for bytes while it uploads.
async fn fetch(client: &Client, message_id: &str) -> anyhow::Result<(Vec<u8>, VmUploadStatus)> {
    let mut bytes = Vec::new();
    let mut retrying_since: Option<std::time::Instant> = None;
    loop {
        let answer = client
            .request(VmFetchRequest {
                message_id: message_id.to_string(),
                offset: bytes.len() as u64,
                length: Some(FETCH_BYTES_MAX),
                wait_ms: Some(5_000),
            })
            .await;
        let answer = match answer {
            Ok(answer) => {
                retrying_since = None;
                answer
            }
            Err(error) if transient(&error) => {
                let since = *retrying_since.get_or_insert_with(std::time::Instant::now);
                anyhow::ensure!(since.elapsed() < RETRY_FOR, "vm.fetch failed: {error}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(error) => return Err(anyhow::Error::new(error).context("vm.fetch failed")),
        };
        let piece = base64::engine::general_purpose::STANDARD
            .decode(answer.data.as_bytes())
            .context("the server sent bad base64")?;
        bytes.extend_from_slice(&piece);
        if answer.status != VmUploadStatus::Uploading && bytes.len() as u64 >= answer.acked {
            return Ok((bytes, answer.status));
        }
    }
}
