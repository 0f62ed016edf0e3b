//! `chorus client`: a scriptable client for every user action.
//!
//! Every response and every received event is printed as one JSON line on stdout
//! (events as `{"seq":…,"kind":…,"body":{…}}`, see [`ClientEvent::to_json`]); errors go
//! to stderr and the command exits non-zero. Each invocation is one connection (one
//! session). What a user does in a room as itself (`say`, `react`, `bullet`, `vote`, its
//! hand, its invitation, its own microphone) joins for that moment and leaves; the host's
//! and moderators' commands and the views (`stage`, `members`) do not join at all.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use chorus_protocol::{
    Encoding, Event, RequestKind, ResumeOutcome, Role, RoomBlockRequest, RoomBulletRequest,
    RoomCommentRequest, RoomCreateRequest, RoomEndRequest, RoomHandRequest, RoomInfoRequest,
    RoomInterestRequest, RoomInviteAnswerRequest, RoomInviteRequest, RoomInviteUsersRequest,
    RoomKickRequest, RoomLeaveRequest, RoomMembersRequest, RoomMuteRequest, RoomPollCloseRequest,
    RoomPollCreateRequest, RoomReactRequest, RoomRef, RoomSetRoleRequest, RoomStageRequest,
    RoomSummaryRequest, RoomVoteRequest,
};
use serde::Serialize;

use super::ogg_opus::{packet_samples, OpusFile, OpusRecorder, OPUS_RATE_HZ};
use super::{AudioFrame, AudioHeader, Client, ClientConfig, ClientError, ClientEvent};
use crate::config::DEV_SECRET;
use crate::token::{unix_now_secs, TokenKeys};

/// Lifetime of tokens minted with `--user`, in seconds.
pub const MINTED_TOKEN_TTL_SECS: u64 = 3600;

/// Longest `join --for`, in seconds (one day): every run is bounded.
pub const JOIN_FOR_SECS_MAX: u64 = 86_400;

/// Options of `chorus client`.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// Server URL: `ws://HOST:PORT/ws`, `wss://HOST:PORT/ws` or `quic://HOST:PORT`. Repeat to give fallbacks
    /// that reconnects try in turn.
    #[arg(long = "url", default_value = "ws://127.0.0.1:7070/ws")]
    pub urls: Vec<String>,
    /// A token (JWT) to authenticate with. One of --token and --user is needed (the
    /// command says so when neither is given).
    #[arg(long, conflicts_with = "user")]
    pub token: Option<String>,
    /// Mint a development token for this user id locally (with `--secret`).
    #[arg(long)]
    pub user: Option<String>,
    /// Secret used to mint the `--user` token.
    #[arg(long, env = "CHORUS_SECRET", default_value = DEV_SECRET, hide_env_values = true, hide_default_value = true)]
    pub secret: String,
    /// CA certificate (PEM) trusted for QUIC, and for `wss://` besides the system's roots.
    #[arg(long, default_value = "./chorus-data/ca.pem")]
    pub ca: PathBuf,
    /// Use JSON text frames on WebSocket instead of MessagePack binary frames.
    #[arg(long)]
    pub json_text: bool,
    /// How long to wait for each response, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// What to do.
    #[command(subcommand)]
    pub command: ClientCommand,
}

/// The actions of `chorus client`.
#[derive(Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Voice messages: send an `.opus` file, resume, inbox, fetch, read, play, history
    /// (`vm --help`).
    Vm {
        /// The voice-message command.
        #[command(subcommand)]
        command: super::voicemail_cli::VmCommand,
    },
    /// Create a room; prints `{"room_id": …, "room": {…}}`.
    CreateRoom {
        /// Room title (1-200 characters).
        title: String,
        /// Schedule the room to start this long from now (e.g. `10m`, `1h30m`); the host
        /// starts it with `start`. Default: live now.
        #[arg(long, conflicts_with = "scheduled_start_ms")]
        starts_in: Option<humantime::Duration>,
        /// Scheduled start, milliseconds since the Unix epoch (must be in the future).
        #[arg(long)]
        scheduled_start_ms: Option<u64>,
        /// Print only the room id (for scripts: `ROOM=$(chorus client … create-room … -q)`).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Start a scheduled room (host only): it goes live, and the users interested in it
    /// get `room.live`.
    Start {
        /// Room id.
        room: String,
    },
    /// Join a room, print the join response, then every event until `--for` elapses
    /// (default: until Ctrl-C or end of standard input), then leave.
    Join {
        /// Room id.
        room: String,
        /// Seconds to stay in the room.
        #[arg(long = "for")]
        for_secs: Option<f64>,
    },
    /// Post a comment (joins the room for that moment: a new session of yours).
    Say {
        /// Room id.
        room: String,
        /// Comment text (1-500 characters).
        text: String,
    },
    /// Send a reaction (joins the room for that moment).
    React {
        /// Room id.
        room: String,
        /// One emoji.
        emoji: String,
    },
    /// Send a bullet comment (joins the room for that moment; shown over the stream if
    /// the room picks it; `join` prints the `room.bullets` a room shows).
    Bullet {
        /// Room id.
        room: String,
        /// Text (1-50 characters, no blocked word; 2/s per user, burst 4).
        text: String,
    },
    /// Leave a room.
    Leave {
        /// Room id.
        room: String,
    },
    /// Show a room.
    Info {
        /// Room id.
        room: String,
    },
    /// End a room (host only).
    End {
        /// Room id.
        room: String,
    },
    /// Show the stage: host, moderators, speakers, mutes (and, for moderators, hands and
    /// invitations).
    Stage {
        /// Room id.
        room: String,
    },
    /// Give a user a role: `moderator` (host only), `listener` (move a speaker to the
    /// audience, or leave the stage yourself), `speaker` (a moderator stepping down).
    SetRole {
        /// Room id.
        room: String,
        /// The user.
        user: String,
        /// `moderator`, `speaker` or `listener`.
        #[arg(value_parser = parse_role)]
        role: Role,
    },
    /// Raise your hand (listeners). Keep another session of yours in the room (`join`):
    /// a user whose last session leaves loses its place in the queue.
    RaiseHand {
        /// Room id.
        room: String,
    },
    /// Lower your hand.
    LowerHand {
        /// Room id.
        room: String,
    },
    /// Invite a listener to speak (host, moderators).
    Invite {
        /// Room id.
        room: String,
        /// The listener.
        user: String,
    },
    /// Accept your invitation to speak.
    Accept {
        /// Room id.
        room: String,
    },
    /// Decline your invitation to speak.
    Decline {
        /// Room id.
        room: String,
    },
    /// Mute your microphone, or (moderators) another speaker's with `--speaker`.
    Mute {
        /// Room id.
        room: String,
        /// Whose (default: yours).
        #[arg(long)]
        speaker: Option<String>,
    },
    /// Unmute your microphone.
    Unmute {
        /// Room id.
        room: String,
    },
    /// Remove a user from the room now; it may join again (host, moderators).
    Kick {
        /// Room id.
        room: String,
        /// The user.
        user: String,
    },
    /// Block a user from the room for its life (host, moderators).
    Block {
        /// Room id.
        room: String,
        /// The user.
        user: String,
    },
    /// Lift a block.
    Unblock {
        /// Room id.
        room: String,
        /// The user.
        user: String,
    },
    /// Mark interest in a scheduled room (you get `room.live` when it starts), or lift it
    /// with `--off`. You need not be in the room.
    Interest {
        /// Room id.
        room: String,
        /// No longer interested.
        #[arg(long)]
        off: bool,
    },
    /// Invite users to the room (host, moderators); each gets `room.invitation`.
    InviteUsers {
        /// Room id.
        room: String,
        /// The users (1-100).
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Show the room's totals (comments, reactions, peak and unique listeners, duration).
    Summary {
        /// Room id.
        room: String,
    },
    /// Speak an Ogg Opus file into a room: joins (you must be on stage: the host, a
    /// moderator or a speaker, and unmuted), sends its packets as voice frames in real time,
    /// prints `{"sent":…}`, then leaves.
    Speak {
        /// Room id.
        room: String,
        /// The Ogg Opus file (e.g. made with `opusenc`).
        file: PathBuf,
    },
    /// Join a room and listen: prints events as `join` does and, with `--record`, writes
    /// one speaker's received packets (the first heard, or `--speaker`) to an Ogg Opus
    /// file; prints `{"recorded":…}` at the end. Stops after `--for`, on Ctrl-C, at the end
    /// of standard input (without `--for`), or when the room ends.
    Listen {
        /// Room id.
        room: String,
        /// Write the packets to this Ogg Opus file.
        #[arg(long)]
        record: Option<PathBuf>,
        /// Record this speaker (default: the first one heard).
        #[arg(long)]
        speaker: Option<String>,
        /// Seconds to listen.
        #[arg(long = "for")]
        for_secs: Option<f64>,
    },
    /// Open a poll (host, moderators): prints the poll with its id.
    PollCreate {
        /// Room id.
        room: String,
        /// The question (1-200 characters).
        question: String,
        /// The answers (2-10).
        #[arg(required = true, num_args = 2..=10)]
        options: Vec<String>,
    },
    /// Vote in a poll (again, to change your vote while it is open).
    Vote {
        /// Room id.
        room: String,
        /// The poll id.
        poll: u64,
        /// The option's index, from 0.
        option: u32,
    },
    /// Close a poll (host, moderators): prints the final result.
    PollClose {
        /// Room id.
        room: String,
        /// The poll id.
        poll: u64,
    },
    /// Tap on a red-packet rain: one JSON line per grab result (`user`, `request_id`,
    /// `result`, and `amount` in cents when granted). Each tap has its own request id and
    /// is retried with that id while the server answers `unavailable` (so it is never paid
    /// twice). Once a throttle factor is known (from an answer or `rain.start`), only that
    /// share of taps is sent. Stops early at `none_left`, `cap_reached` or `ended`.
    Grab {
        /// The rain id.
        rain: String,
        /// Taps (at most 100,000).
        #[arg(long, default_value_t = 1)]
        times: u32,
        /// Milliseconds between taps.
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
        /// How long one tap is retried while the server is unavailable, in milliseconds.
        #[arg(long, default_value_t = 30_000)]
        retry_ms: u64,
        /// Send every tap, ignoring the throttle factor.
        #[arg(long)]
        no_throttle: bool,
    },
    /// Answer a quiz question: joins the show's room, sends the answer, prints the sealed
    /// verdict (`quiz.answer` response); with `--wait`, stays until the question's
    /// announcement (at most that many seconds) and prints the opened verdict as
    /// `{"kind":"quiz.verdict",…}`.
    Answer {
        /// The quiz id.
        quiz: String,
        /// The question's index, from 0.
        question: u32,
        /// The option's index, from 0.
        option: u8,
        /// The show's room.
        #[arg(long)]
        room: String,
        /// Seconds to wait for the announcement.
        #[arg(long)]
        wait: Option<f64>,
    },
    /// List the room's users, one page (in user id order).
    Members {
        /// Room id.
        room: String,
        /// Start after this user id: the previous page's `next` (also `--page`).
        #[arg(long, alias = "page")]
        after: Option<String>,
        /// Users per page, 1-100.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// List the cluster's live and scheduled rooms, newest first, one page: title, host,
    /// listener count. Any node answers for the whole cluster.
    Rooms {
        /// Only `live` or only `scheduled` rooms (default: both).
        #[arg(long, value_parser = parse_list_state)]
        state: Option<chorus_protocol::RoomState>,
        /// Continue after this cursor: the previous page's `next` (also `--page`).
        #[arg(long, alias = "page")]
        after: Option<String>,
        /// Rooms per page, 1-50 (default 20).
        #[arg(long)]
        limit: Option<u32>,
    },
}

fn parse_list_state(value: &str) -> Result<chorus_protocol::RoomState, String> {
    match value {
        "live" => Ok(chorus_protocol::RoomState::Live),
        "scheduled" => Ok(chorus_protocol::RoomState::Scheduled),
        other => Err(format!("unknown state {other:?}: live or scheduled")),
    }
}

fn parse_role(value: &str) -> Result<Role, String> {
    match value {
        "moderator" => Ok(Role::Moderator),
        "speaker" => Ok(Role::Speaker),
        "listener" => Ok(Role::Listener),
        "host" => Err("a room has one host, for its life".into()),
        other => Err(format!(
            "unknown role {other:?}: moderator, speaker or listener"
        )),
    }
}

/// Runs `chorus client`.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let token = match (&args.token, &args.user) {
        (Some(token), _) => token.clone(),
        (None, Some(user)) => TokenKeys::new(args.secret.as_bytes())
            .mint(user, &[], unix_now_secs(), MINTED_TOKEN_TTL_SECS)
            .context("cannot mint a token for --user")?,
        (None, None) => anyhow::bail!(
            "no credentials: give --user NAME (a token is minted with --secret, by default the \
             development secret) or --token JWT"
        ),
    };
    let mut config = ClientConfig::new(String::new(), token);
    config.urls = args.urls.clone();
    config.ca_path = Some(args.ca.clone());
    config.encoding = if args.json_text {
        Encoding::Json
    } else {
        Encoding::MsgPack
    };
    config.request_timeout_ms = args.timeout_ms;
    let mut client = match Client::connect(config).await {
        Ok(client) => client,
        // These name the URL already.
        Err(e @ (ClientError::Connect { .. } | ClientError::InvalidUrl { .. })) => {
            return Err(e.into())
        }
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context(format!("cannot connect to {}", args.urls.join(", "))))
        }
    };
    let result = execute(&mut client, args.command).await;
    client.close().await;
    // Events that arrived before the close.
    while let Some(event) = client.try_next_event() {
        print_event(&event);
    }
    result
}

async fn execute(client: &mut Client, command: ClientCommand) -> anyhow::Result<()> {
    // The "yes" side of the commands that come in pairs.
    let yes = !matches!(
        command,
        ClientCommand::LowerHand { .. }
            | ClientCommand::Decline { .. }
            | ClientCommand::Unblock { .. }
    );
    match command {
        ClientCommand::Vm { command } => super::voicemail_cli::execute(client, command).await?,
        ClientCommand::CreateRoom {
            title,
            starts_in,
            scheduled_start_ms,
            quiet,
        } => {
            let now_ms = unix_now_secs().saturating_mul(1000);
            let scheduled_start_ms = match (starts_in, scheduled_start_ms) {
                (Some(after), _) => Some(
                    now_ms.saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX)),
                ),
                (None, Some(at)) if at <= now_ms => anyhow::bail!(
                    "--scheduled-start-ms {at} is in the past (now is {now_ms}): give a future \
                     time, or --starts-in 10m"
                ),
                (None, at) => at,
            };
            let response = client
                .request(RoomCreateRequest {
                    title,
                    scheduled_start_ms,
                })
                .await
                .context("room.create failed")?;
            if quiet {
                println!("{}", response.room_id);
            } else {
                print_json(&response);
            }
        }
        ClientCommand::Join { room, for_secs } => {
            stay(client, room, for_secs, None).await?;
        }
        ClientCommand::Speak { room, file } => speak(client, &room, &file).await?,
        ClientCommand::Listen {
            room,
            record,
            speaker,
            for_secs,
        } => listen(client, room, record, speaker, for_secs).await?,
        ClientCommand::Say { room, text } => {
            let request = RoomCommentRequest {
                room_id: room.clone(),
                text,
                request_id: None,
            };
            act_present(client, &room, request).await?;
        }
        ClientCommand::React { room, emoji } => {
            let request = RoomReactRequest {
                room_id: room.clone(),
                emoji,
            };
            act_present(client, &room, request).await?;
        }
        ClientCommand::Bullet { room, text } => {
            let request = RoomBulletRequest {
                room_id: room.clone(),
                text,
            };
            act_present(client, &room, request).await?;
        }
        ClientCommand::Leave { room } => {
            let response = client
                .request(RoomLeaveRequest { room_id: room })
                .await
                .context("room.leave failed")?;
            print_json(&response);
        }
        ClientCommand::Info { room } => {
            let response = client
                .request(RoomInfoRequest { room_id: room })
                .await
                .context("room.info failed")?;
            print_json(&response);
        }
        ClientCommand::Start { room } => {
            let response = client
                .request(chorus_protocol::RoomStartRequest { room_id: room })
                .await
                .context("room.start failed")?;
            print_json(&response);
        }
        ClientCommand::End { room } => {
            let room_id = room.clone();
            act(client, &room, RoomEndRequest { room_id }).await?;
        }
        ClientCommand::Stage { room } => {
            let room_id = room.clone();
            act(client, &room, RoomStageRequest { room_id }).await?;
        }
        ClientCommand::SetRole { room, user, role } => {
            let request = RoomSetRoleRequest {
                room_id: room.clone(),
                user_id: user,
                role,
            };
            act(client, &room, request).await?;
        }
        ClientCommand::RaiseHand { room } | ClientCommand::LowerHand { room } => {
            let request = RoomHandRequest {
                room_id: room.clone(),
                raised: yes,
            };
            act_present(client, &room, request).await?;
        }
        ClientCommand::Invite { room, user } => {
            let request = RoomInviteRequest {
                room_id: room.clone(),
                user_id: user,
            };
            act(client, &room, request).await?;
        }
        ClientCommand::Accept { room } | ClientCommand::Decline { room } => {
            let request = RoomInviteAnswerRequest {
                room_id: room.clone(),
                accept: yes,
            };
            act_present(client, &room, request).await?;
        }
        ClientCommand::Mute { room, speaker } => {
            let own = speaker.as_deref().is_none_or(|s| s == client.user_id());
            let request = RoomMuteRequest {
                room_id: room.clone(),
                user_id: speaker,
                muted: true,
            };
            if own {
                act_present(client, &room, request).await?;
            } else {
                act(client, &room, request).await?;
            }
        }
        ClientCommand::Unmute { room } => {
            let request = RoomMuteRequest {
                room_id: room.clone(),
                user_id: None,
                muted: false,
            };
            act_present(client, &room, request).await?;
        }
        ClientCommand::InviteUsers { room, users } => {
            let response = client
                .request(RoomInviteUsersRequest {
                    room_id: room,
                    user_ids: users,
                })
                .await
                .context("room.invite_users failed")?;
            print_json(&response);
        }
        ClientCommand::Rooms {
            state,
            after,
            limit,
        } => {
            let response = client
                .request(chorus_protocol::RoomListRequest {
                    state,
                    after,
                    limit,
                })
                .await
                .context("room.list failed")?;
            print_json(&response);
        }
        ClientCommand::Summary { room } => {
            let response = client
                .request(RoomSummaryRequest { room_id: room })
                .await
                .context("room.summary failed")?;
            print_json(&response);
        }
        ClientCommand::Interest { room, off } => {
            let response = client
                .request(RoomInterestRequest {
                    room_id: room,
                    interested: !off,
                })
                .await
                .context("room.interest failed")?;
            print_json(&response);
        }
        ClientCommand::PollCreate {
            room,
            question,
            options,
        } => {
            let request = RoomPollCreateRequest {
                room_id: room.clone(),
                question,
                options,
            };
            act(client, &room, request).await?;
        }
        ClientCommand::Grab {
            rain,
            times,
            interval_ms,
            retry_ms,
            no_throttle,
        } => grab(client, &rain, times, interval_ms, retry_ms, no_throttle).await?,
        ClientCommand::Vote { room, poll, option } => {
            let request = RoomVoteRequest {
                room_id: room.clone(),
                poll_id: poll,
                option,
            };
            act_present(client, &room, request).await?;
        }
        ClientCommand::PollClose { room, poll } => {
            let request = RoomPollCloseRequest {
                room_id: room.clone(),
                poll_id: poll,
            };
            act(client, &room, request).await?;
        }
        ClientCommand::Answer {
            quiz,
            question,
            option,
            room,
            wait,
        } => answer(client, quiz, question, option, room, wait).await?,
        ClientCommand::Members { room, after, limit } => {
            let request = RoomMembersRequest {
                room_id: room.clone(),
                after,
                limit,
            };
            act(client, &room, request).await?;
        }
        ClientCommand::Kick { room, user } => {
            let request = RoomKickRequest {
                room_id: room.clone(),
                user_id: user,
            };
            act(client, &room, request).await?;
        }
        ClientCommand::Block { room, user } | ClientCommand::Unblock { room, user } => {
            let request = RoomBlockRequest {
                room_id: room.clone(),
                user_id: user,
                blocked: yes,
            };
            act(client, &room, request).await?;
        }
    }
    Ok(())
}

/// `answer`: joins, answers, prints the sealed verdict and, with `wait`, the opened one.
async fn answer(
    client: &mut Client,
    quiz_id: String,
    question: u32,
    option: u8,
    room: String,
    wait: Option<f64>,
) -> anyhow::Result<()> {
    join_once(client, &room).await?;
    let result = client
        .request(chorus_protocol::QuizAnswerRequest {
            quiz_id,
            question,
            option,
        })
        .await
        .context("quiz.answer failed")?;
    print_json(&result);
    let Some(wait) = stay_for(wait)? else {
        print_buffered(client);
        return Ok(());
    };
    let mut sealed = super::quiz::SealedResults::default();
    sealed.keep(&result);
    let user = client.user_id().to_string();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let event = tokio::time::timeout_at(deadline, client.next_event()).await;
        let Ok(Some(event)) = event else {
            anyhow::bail!("no announcement of question {question} in time");
        };
        print_event(&event);
        if let ClientEvent::Notification { event, .. } = &event {
            if let Some(opened) = sealed.observe(&user, event) {
                println!("{}", opened.to_json());
                if opened.question == question {
                    return Ok(());
                }
            }
        }
    }
}

/// Sends `request` about `room` and prints the answer. The session does not join: the
/// host and moderators act on a room by their role, and views (`stage`, `members`) are
/// open, so an operator's command never shows up as a listener.
async fn act<R>(client: &mut Client, room: &str, request: R) -> anyhow::Result<()>
where
    R: RequestKind + Send + 'static,
    R::Response: Serialize,
{
    let response = client
        .request(request)
        .await
        .with_context(|| format!("{} failed in room {room}", R::KIND))?;
    print_json(&response);
    Ok(())
}

/// What a user does in a room as itself (comment, react, bullet, vote, its hand, its
/// invitation, its own microphone) needs the session in the room: joins (quietly),
/// sends `request`, prints only its answer, and leaves. To the room the user is present
/// only for that moment, as a person who walks in to say one thing.
async fn act_present<R>(client: &mut Client, room: &str, request: R) -> anyhow::Result<()>
where
    R: RequestKind + Send + 'static,
    R::Response: Serialize,
{
    client
        .request(RoomRef {
            room_id: room.to_string(),
        })
        .await
        .with_context(|| format!("room.join {room} failed"))?;
    let response = client
        .request(request)
        .await
        .with_context(|| format!("{} failed in room {room}", R::KIND))?;
    print_json(&response);
    // Leaving is a courtesy (closing the connection leaves too): its failure is not the
    // command's.
    let _ = client
        .request(RoomLeaveRequest {
            room_id: room.to_string(),
        })
        .await;
    // What the room said during that moment (its own comment among it) is not this
    // command's output: `join` is the command that listens.
    while client.try_next_event().is_some() {}
    Ok(())
}

/// Joins `room` and prints the answer; returns it.
async fn join_once(
    client: &mut Client,
    room: &str,
) -> anyhow::Result<chorus_protocol::RoomJoinResponse> {
    let response = client
        .request(RoomRef {
            room_id: room.to_string(),
        })
        .await
        .with_context(|| format!("room.join {room} failed"))?;
    print_json(&response);
    Ok(response)
}

/// Parses `--for`.
fn stay_for(for_secs: Option<f64>) -> anyhow::Result<Option<Duration>> {
    match for_secs {
        Some(secs) if secs.is_finite() && secs >= 0.0 => Ok(Some(Duration::from_secs_f64(
            secs.min(JOIN_FOR_SECS_MAX as f64),
        ))),
        Some(secs) => anyhow::bail!("--for must be a non-negative number of seconds, not {secs}"),
        None => Ok(None),
    }
}

/// What `stay` does with voice frames: the stream and what to do with each.
type AudioSink<'a> = (
    tokio::sync::mpsc::Receiver<AudioFrame>,
    &'a mut (dyn FnMut(AudioFrame) -> anyhow::Result<()> + Send),
);

/// `join` and `listen`: stay in the room, printing events (and handing voice frames to
/// `audio`), until the time is up, Ctrl-C, end of standard input (only without `--for`),
/// the room ends, or the client closes; then leave.
async fn stay(
    client: &mut Client,
    room: String,
    for_secs: Option<f64>,
    mut audio: Option<AudioSink<'_>>,
) -> anyhow::Result<()> {
    let stay = stay_for(for_secs)?;
    join_once(client, &room).await?;
    let deadline =
        tokio::time::Instant::now() + stay.unwrap_or(Duration::from_secs(JOIN_FOR_SECS_MAX));
    let mut stdin_closed = match stay {
        Some(_) => None,
        None => Some(stdin_eof()),
    };
    // Ctrl-C or SIGTERM ends the stay like its end: a recording is finished, a summary
    // printed.
    let ctrl_c = async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match terminate.as_mut() {
                    Some(signal) => { signal.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    };
    tokio::pin!(ctrl_c);
    let mut failure = None;
    let mut sealed = super::quiz::SealedResults::default();
    let user = client.user_id().to_string();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = &mut ctrl_c => break,
            _ = async {
                match stdin_closed.as_mut() {
                    Some(rx) => { let _ = rx.await; }
                    None => std::future::pending::<()>().await,
                }
            } => break,
            Some(frame) = async {
                match audio.as_mut() {
                    Some((rx, _)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some((_, handle)) = audio.as_mut() {
                    handle(frame)?;
                }
            }
            event = client.next_event() => {
                let Some(event) = event else { break };
                print_event(&event);
                if let ClientEvent::Notification { event, .. } = &event {
                    if let Some(opened) = sealed.observe(&user, event) {
                        println!("{}", opened.to_json());
                    }
                }
                match &event {
                    ClientEvent::Reconnected { outcome: ResumeOutcome::Resync } => {
                        // A new session is in no room: join again.
                        join_once(client, &room).await?;
                    }
                    ClientEvent::Notification { event: Event::RoomEnded(ended), .. }
                        if ended.room_id == room => return Ok(()),
                    ClientEvent::Closed { code, reason } => {
                        failure = Some(anyhow::anyhow!(
                            "connection closed (code {code:?}): {reason}"
                        ));
                        break;
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some(failure) = failure {
        return Err(failure);
    }
    stdin_closed.take();
    let response = client
        .request(RoomLeaveRequest { room_id: room })
        .await
        .context("room.leave failed")?;
    print_json(&response);
    Ok(())
}

/// Time left after the last packet for frames in flight to be relayed before leaving.
const SPEAK_DRAIN_MS: u64 = 500;
/// Packets this small carry no sound (Opus DTX/silence): sent with the silent level.
const SILENT_PACKET_BYTES_MAX: usize = 3;
/// Level sent for other packets, -dBov: the CLI does not decode audio to measure it.
const SPEECH_LEVEL: u8 = 30;

/// `speak`: joins, sends the file's packets in real time, leaves.
async fn speak(client: &mut Client, room: &str, path: &std::path::Path) -> anyhow::Result<()> {
    let file = OpusFile::read(path)?;
    let joined = join_once(client, room).await?;
    if joined.role == Role::Listener {
        anyhow::bail!(
            "you are a listener in {room}: only the host, moderators and speakers are heard \
             (raise your hand and accept an invitation to speak)"
        );
    }
    if joined.stage.muted.iter().any(|u| u == client.user_id()) {
        anyhow::bail!("you are muted in {room}: unmute first (`chorus client unmute`)");
    }
    let started = tokio::time::Instant::now();
    let mut at_samples = 0u64;
    let (mut sent, mut dropped) = (0u64, 0u64);
    for (seq, packet) in file.packets.iter().enumerate() {
        let due = started + Duration::from_micros(at_samples * 1_000_000 / u64::from(OPUS_RATE_HZ));
        tokio::time::sleep_until(due).await;
        let header = AudioHeader {
            seq: seq as u32,
            timestamp_ms: (at_samples * 1_000 / u64::from(OPUS_RATE_HZ)) as u32,
            level: if packet.len() <= SILENT_PACKET_BYTES_MAX {
                chorus_protocol::audio::AUDIO_LEVEL_SILENT
            } else {
                SPEECH_LEVEL
            },
        };
        if client.send_audio(room, header, packet)? {
            sent += 1;
        } else {
            dropped += 1;
        }
        at_samples += u64::from(packet_samples(packet).unwrap_or(960));
        print_buffered(client);
    }
    tokio::time::sleep(Duration::from_millis(SPEAK_DRAIN_MS)).await;
    print_buffered(client);
    print_json(&serde_json::json!({
        "sent": sent,
        "dropped": dropped,
        "duration_ms": at_samples * 1_000 / u64::from(OPUS_RATE_HZ),
    }));
    let response = client
        .request(RoomLeaveRequest {
            room_id: room.to_string(),
        })
        .await
        .context("room.leave failed")?;
    print_json(&response);
    Ok(())
}

/// `listen`: stays in the room, recording one speaker's packets in order.
async fn listen(
    client: &mut Client,
    room: String,
    record: Option<PathBuf>,
    speaker: Option<String>,
    for_secs: Option<f64>,
) -> anyhow::Result<()> {
    let frames = client
        .take_audio()
        .context("the client's audio stream was taken already")?;
    let mut recorder = match &record {
        Some(path) => Some(
            OpusRecorder::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        ),
        None => None,
    };
    let mut chosen = speaker;
    let (mut heard, mut late, mut others) = (0u64, 0u64, 0u64);
    let mut last_seq: Option<u32> = None;
    let mut on_frame = |frame: AudioFrame| -> anyhow::Result<()> {
        if frame.room_id != room {
            return Ok(());
        }
        let speaker = chosen.get_or_insert_with(|| frame.speaker.clone());
        if frame.speaker != *speaker {
            others += 1;
            return Ok(());
        }
        // Per-speaker order: a frame that does not come after the last one is late.
        if last_seq.is_some_and(|last| !chorus_protocol::audio::seq_after(frame.header.seq, last)) {
            late += 1;
            return Ok(());
        }
        last_seq = Some(frame.header.seq);
        heard += 1;
        if let Some(recorder) = recorder.as_mut() {
            recorder.write(&frame.payload)?;
        }
        Ok(())
    };
    let result = stay(
        client,
        room.clone(),
        for_secs,
        Some((frames, &mut on_frame)),
    )
    .await;
    if let Some(recorder) = recorder {
        recorder.finish()?;
    }
    print_json(&serde_json::json!({
        "recorded": heard,
        "speaker": chosen,
        "late": late,
        "other_speakers_frames": others,
        "file": record,
    }));
    result
}

/// Resolves when standard input reaches its end. A plain thread, not tokio's stdin: a
/// blocking read there would hold up runtime shutdown.
fn stdin_eof() -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        // Input is discarded; only its end matters.
        while let Ok(1..) = std::io::Read::read(&mut stdin, &mut buf) {}
        let _ = tx.send(());
    });
    rx
}

fn print_buffered(client: &mut Client) {
    while let Some(event) = client.try_next_event() {
        print_event(&event);
    }
}

/// Most taps one `grab` makes.
pub const GRAB_TIMES_MAX: u32 = 100_000;

/// One grab result line.
#[derive(Serialize)]
struct GrabLine<'a> {
    rain_id: &'a str,
    user: &'a str,
    request_id: &'a str,
    result: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    packet: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    throttle: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn grab(
    client: &mut Client,
    rain: &str,
    times: u32,
    interval_ms: u64,
    retry_ms: u64,
    no_throttle: bool,
) -> anyhow::Result<()> {
    use chorus_protocol::{ErrorCode, GrabResult, RainGrabRequest};
    anyhow::ensure!(
        (1..=GRAB_TIMES_MAX).contains(&times),
        "--times must be 1 to {GRAB_TIMES_MAX}"
    );
    let user = client.user_id().to_string();
    let (mut answered, mut last_error) = (0u32, None::<String>);
    let mut throttle = 1.0f64;
    let mut tick = tokio::time::interval(Duration::from_millis(interval_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..times {
        tick.tick().await;
        while let Some(event) = client.try_next_event() {
            if let ClientEvent::Notification {
                event: Event::RainStart(start),
                ..
            } = &event
            {
                if start.rain_id == rain {
                    throttle = start.throttle.clamp(0.001, 1.0);
                }
            }
        }
        if !no_throttle && throttle < 1.0 && rand::random::<f64>() >= throttle {
            continue;
        }
        let request_id = format!("g-{:016x}", rand::random::<u64>());
        let deadline = tokio::time::Instant::now() + Duration::from_millis(retry_ms);
        let mut backoff_ms = 100;
        let answer = loop {
            let request = RainGrabRequest {
                rain_id: rain.to_string(),
                request_id: request_id.clone(),
            };
            match client.request(request).await {
                Ok(answer) => break Ok(answer),
                Err(ClientError::Server(error))
                    if error.code != ErrorCode::Unavailable.as_u16()
                        || tokio::time::Instant::now() >= deadline =>
                {
                    break Err(error.to_string())
                }
                Err(error @ (ClientError::Server(_) | ClientError::Timeout { .. }))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!(%error, "grab not answered; retrying with the same request id");
                }
                Err(error) => break Err(error.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            backoff_ms = (backoff_ms * 2).min(2_000);
        };
        match answer {
            Ok(answer) => {
                answered += 1;
                throttle = answer.throttle.clamp(0.001, 1.0);
                let result = serde_json::to_value(answer.result)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                print_json(&GrabLine {
                    rain_id: rain,
                    user: &user,
                    request_id: &request_id,
                    result: &result,
                    amount: answer.amount,
                    packet: answer.packet,
                    throttle: Some(answer.throttle),
                    error: None,
                });
                if matches!(
                    answer.result,
                    GrabResult::NoneLeft | GrabResult::CapReached | GrabResult::Ended
                ) {
                    break;
                }
            }
            Err(error) => {
                print_json(&GrabLine {
                    rain_id: rain,
                    user: &user,
                    request_id: &request_id,
                    result: "error",
                    amount: None,
                    packet: None,
                    throttle: None,
                    error: Some(error.clone()),
                });
                last_error = Some(error);
            }
        }
    }
    // Taps skipped by the throttle are not failures; a grab none of whose taps was
    // answered is (an unknown rain, say).
    if answered == 0 {
        if let Some(error) = last_error {
            anyhow::bail!("no tap on rain {rain:?} was answered: {error}");
        }
    }
    Ok(())
}

fn print_event(event: &ClientEvent) {
    println!("{}", event.to_json());
}

fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("cannot print response as JSON: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ClientArgs,
    }

    #[test]
    fn join_with_user_and_duration_parses() {
        let cli = Cli::try_parse_from([
            "client",
            "--url",
            "quic://127.0.0.1:7071",
            "--user",
            "alice",
            "join",
            "r-1",
            "--for",
            "2.5",
        ])
        .expect("parses");
        assert_eq!(cli.args.urls, vec!["quic://127.0.0.1:7071".to_string()]);
        assert_eq!(cli.args.user.as_deref(), Some("alice"));
        assert!(matches!(
            cli.args.command,
            ClientCommand::Join { ref room, for_secs: Some(s) } if room == "r-1" && s == 2.5
        ));
    }

    #[test]
    fn token_and_user_conflict() {
        assert!(
            Cli::try_parse_from(["client", "--token", "t", "--user", "u", "info", "r"]).is_err()
        );
        // Neither parses; `run` then says to give --user or --token (tests/first_hour.rs).
        assert!(Cli::try_parse_from(["client", "info", "r"]).is_ok());
        let cli = Cli::try_parse_from([
            "client",
            "--token",
            "t",
            "create-room",
            "Hello",
            "--scheduled-start-ms",
            "5",
        ])
        .expect("parses");
        assert!(matches!(
            cli.args.command,
            ClientCommand::CreateRoom { ref title, scheduled_start_ms: Some(5), .. } if title == "Hello"
        ));
    }
}
