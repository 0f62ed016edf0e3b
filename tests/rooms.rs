//! System tests of the live-audio room features (SPEC R1-R10) through the client library,
//! over real sockets to real `chorus serve` processes, refusals included.

mod common;

use chorus_node::client::{Client, ClientError};
use chorus_protocol::{
    ErrorCode, Event, PollInfo, PollState, Role, RoomBlockRequest, RoomCommentRequest,
    RoomHandRequest, RoomInviteAnswerRequest, RoomInviteRequest, RoomKickRequest, RoomMuteRequest,
    RoomPollCloseRequest, RoomPollCreateRequest, RoomRef, RoomSetRoleRequest, RoomStageRequest,
    RoomVoteRequest, StageAction, StageEvent,
};
use common::{create_room, expect_event, join, TestNode};

const UNTHROTTLED: &[&str] = &["--requests-per-sec", "100000", "--requests-burst", "100000"];

/// The error code of a refused request.
fn refusal<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server(body)) => {
            ErrorCode::from_u16(body.code).unwrap_or_else(|| panic!("unknown code {}", body.code))
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Waits for the `room.stage` notification with `action` about `user`.
async fn stage_event(client: &mut Client, action: StageAction, user: &str) -> StageEvent {
    expect_event(
        client,
        &format!("{action:?} of {user}"),
        |event| match event {
            Event::Stage(e) if e.action == action && e.user_id == user => Some(e.clone()),
            _ => None,
        },
    )
    .await
}

fn set_role(room: &str, user: &str, role: Role) -> RoomSetRoleRequest {
    RoomSetRoleRequest {
        room_id: room.into(),
        user_id: user.into(),
        role,
    }
}

fn mute(room: &str, user: Option<&str>, muted: bool) -> RoomMuteRequest {
    RoomMuteRequest {
        room_id: room.into(),
        user_id: user.map(str::to_string),
        muted,
    }
}

fn block(room: &str, user: &str, blocked: bool) -> RoomBlockRequest {
    RoomBlockRequest {
        room_id: room.into(),
        user_id: user.into(),
        blocked,
    }
}

async fn stage_of(client: &Client, room: &str) -> chorus_protocol::StageInfo {
    client
        .request(RoomStageRequest {
            room_id: room.into(),
        })
        .await
        .expect("stage")
}

/// R2 roles, R3 stage, R4 mute, R5 kick and block: each allowed action works and is
/// announced; each action a role may not take is refused with a clear code.
#[tokio::test]
async fn roles_stage_mutes_kicks_and_blocks_follow_the_rules() {
    let node = TestNode::start(UNTHROTTLED).await;
    let mut host = node.client(&node.ws_url(), "host").await;
    let mut moderator = node.client(&node.quic_url(), "mod").await;
    let mut ann = node.client(&node.ws_url(), "ann").await;
    let mut bob = node.client(&node.quic_url(), "bob").await;
    let room = create_room(&host, "stage").await;
    for client in [&host, &moderator, &ann, &bob] {
        join(client, &room).await;
    }

    // R2: the host makes a moderator; nobody else may; the host's role never changes.
    let code = refusal(ann.request(set_role(&room, "mod", Role::Moderator)).await);
    assert_eq!(code, ErrorCode::Forbidden, "a listener makes no moderators");
    host.request(set_role(&room, "mod", Role::Moderator))
        .await
        .expect("the host makes a moderator");
    let made = stage_event(&mut ann, StageAction::RoleChanged, "mod").await;
    assert_eq!(
        (made.role, made.by.as_str()),
        (Some(Role::Moderator), "host")
    );
    let code = refusal(
        moderator
            .request(set_role(&room, "host", Role::Listener))
            .await,
    );
    assert_eq!(code, ErrorCode::Forbidden, "nobody changes the host");
    let code = refusal(
        moderator
            .request(set_role(&room, "ann", Role::Moderator))
            .await,
    );
    assert_eq!(code, ErrorCode::Forbidden, "moderators make no moderators");

    // R3: hands in order, seen by moderators only; invitation, acceptance.
    for client in [&bob, &ann] {
        client
            .request(RoomHandRequest {
                room_id: room.clone(),
                raised: true,
            })
            .await
            .expect("raise hand");
    }
    stage_event(&mut moderator, StageAction::HandRaised, "bob").await;
    assert_eq!(stage_of(&moderator, &room).await.hands, vec!["bob", "ann"]);
    assert!(
        stage_of(&ann, &room).await.hands.is_empty(),
        "listeners do not see the hand queue"
    );
    let code = refusal(
        moderator
            .request(set_role(&room, "bob", Role::Speaker))
            .await,
    );
    assert_eq!(
        code,
        ErrorCode::InvalidArgument,
        "nobody is put on stage without accepting"
    );
    let invite = RoomInviteRequest {
        room_id: room.clone(),
        user_id: "bob".into(),
    };
    let code = refusal(ann.request(invite.clone()).await);
    assert_eq!(code, ErrorCode::Forbidden, "listeners invite nobody");
    moderator.request(invite).await.expect("invite");
    stage_event(&mut bob, StageAction::Invited, "bob").await;
    let accept = RoomInviteAnswerRequest {
        room_id: room.clone(),
        accept: true,
    };
    let code = refusal(ann.request(accept.clone()).await);
    assert_eq!(code, ErrorCode::InvalidArgument, "ann has no invitation");
    bob.request(accept).await.expect("accept");
    let on_stage = stage_event(&mut ann, StageAction::RoleChanged, "bob").await;
    assert_eq!(on_stage.role, Some(Role::Speaker));
    let stage = stage_of(&moderator, &room).await;
    assert_eq!(
        (stage.speakers.clone(), stage.hands.clone()),
        (vec!["bob".to_string()], vec!["ann".to_string()])
    );

    // R4: moderators force-mute, never unmute; speakers unmute themselves.
    let code = refusal(ann.request(mute(&room, Some("bob"), true)).await);
    assert_eq!(code, ErrorCode::Forbidden, "listeners mute nobody");
    moderator
        .request(mute(&room, Some("bob"), true))
        .await
        .expect("force-mute");
    stage_event(&mut ann, StageAction::Muted, "bob").await;
    let code = refusal(moderator.request(mute(&room, Some("bob"), false)).await);
    assert_eq!(code, ErrorCode::Forbidden, "moderators may ask, not unmute");
    bob.request(mute(&room, None, false))
        .await
        .expect("self unmute");
    stage_event(&mut ann, StageAction::Unmuted, "bob").await;
    let code = refusal(ann.request(mute(&room, None, true)).await);
    assert_eq!(
        code,
        ErrorCode::InvalidArgument,
        "a listener has no microphone"
    );
    // A moderator moves the speaker back to the audience.
    moderator
        .request(set_role(&room, "bob", Role::Listener))
        .await
        .expect("move to audience");
    let moved = stage_event(&mut ann, StageAction::RoleChanged, "bob").await;
    assert_eq!(moved.role, Some(Role::Listener));

    // R5: kick (may rejoin) and block (may not), visible to the room.
    let kick = |user: &str| RoomKickRequest {
        room_id: room.clone(),
        user_id: user.into(),
    };
    let code = refusal(moderator.request(kick("host")).await);
    assert_eq!(code, ErrorCode::Forbidden, "nobody kicks the host");
    let code = refusal(ann.request(kick("bob")).await);
    assert_eq!(code, ErrorCode::Forbidden, "listeners kick nobody");
    moderator.request(kick("bob")).await.expect("kick");
    stage_event(&mut ann, StageAction::Kicked, "bob").await;
    stage_event(&mut bob, StageAction::Kicked, "bob").await;
    let code = refusal(
        bob.request(RoomCommentRequest {
            room_id: room.clone(),
            text: "still here?".into(),
            request_id: None,
        })
        .await,
    );
    assert_eq!(code, ErrorCode::NotInRoom, "a kicked member is out");
    join(&bob, &room).await;
    moderator
        .request(block(&room, "bob", true))
        .await
        .expect("block");
    stage_event(&mut ann, StageAction::Blocked, "bob").await;
    let code = refusal(
        bob.request(RoomRef {
            room_id: room.clone(),
        })
        .await,
    );
    assert_eq!(code, ErrorCode::Forbidden, "a blocked user may not rejoin");
    moderator
        .request(block(&room, "bob", false))
        .await
        .expect("unblock");
    stage_event(&mut host, StageAction::Unblocked, "bob").await;
    join(&bob, &room).await;
}

/// R9: in a small room the listener pushes name who came and went; the user list is read
/// in pages, with roles.
#[tokio::test]
async fn a_small_room_names_who_comes_and_goes_and_lists_its_users_in_pages() {
    let node = TestNode::start(UNTHROTTLED).await;
    let mut host = node.client(&node.ws_url(), "host").await;
    let room = create_room(&host, "presence").await;
    join(&host, &room).await;
    let mut others = Vec::new();
    for user in ["u1", "u2", "u3", "u4"] {
        let client = node.client(&node.quic_url(), user).await;
        join(&client, &room).await;
        others.push(client);
    }
    // The pushes name everyone who came, the host included (perhaps over several pushes).
    let mut named = std::collections::BTreeSet::new();
    while named.len() < 5 {
        let joined = expect_event(&mut host, "names of newcomers", |event| match event {
            Event::Listeners(l) => Some(l.joined.clone()),
            _ => None,
        })
        .await;
        named.extend(joined);
    }
    assert_eq!(
        named.into_iter().collect::<Vec<_>>(),
        vec!["host", "u1", "u2", "u3", "u4"]
    );
    // Pages of two, in user id order, with roles.
    let page = |after: Option<String>| chorus_protocol::RoomMembersRequest {
        room_id: room.clone(),
        after,
        limit: Some(2),
    };
    let first = host.request(page(None)).await.expect("page 1");
    assert_eq!(first.count, 5);
    assert_eq!(
        first
            .users
            .iter()
            .map(|m| (m.user_id.as_str(), m.role))
            .collect::<Vec<_>>(),
        vec![("host", Role::Host), ("u1", Role::Listener)]
    );
    let second = host
        .request(page(first.next.clone()))
        .await
        .expect("page 2");
    let third = host
        .request(page(second.next.clone()))
        .await
        .expect("page 3");
    assert_eq!(third.users.len(), 1);
    assert_eq!(third.users[0].user_id, "u4");
    assert_eq!(third.next, None, "the last page");
    // One leaves: named in a push.
    let mut u2 = others.remove(1);
    u2.close().await;
    let left = expect_event(&mut host, "the leaver's name", |event| match event {
        Event::Listeners(l) if !l.left.is_empty() => Some(l.left.clone()),
        _ => None,
    })
    .await;
    assert_eq!(left, vec!["u2"]);
}

/// R9: 5,000 listeners joining a room (through `chorus loadgen`, another process) cost a
/// member already in the room O(1) presence frames: the count, at most once a second,
/// without names above 100 users. Counted, not timed.
#[tokio::test]
async fn five_thousand_joins_cost_a_member_a_bounded_number_of_presence_frames() {
    const LISTENERS: u32 = 5_000;
    let node =
        TestNode::start(&["--requests-per-sec", "100000", "--requests-burst", "100000"]).await;
    let mut observer = node.client(&node.ws_url(), "observer").await;
    let room = create_room(&observer, "big room").await;
    join(&observer, &room).await;
    let started = std::time::Instant::now();
    let loadgen = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["loadgen", "--url", &node.ws_url(), "--ca"])
        .arg(node.ca_path())
        .args([
            "--listeners",
            &LISTENERS.to_string(),
            // loadgen needs a sender; its comment or two are not presence frames.
            "--senders",
            "1",
            "--rate",
            "1",
            "--room",
            &room,
            "--connect-rate",
            "1000",
            "--duration",
            "1",
            "--drain-secs",
            "0",
        ])
        .env("CHORUS_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn chorus loadgen");
    // Count the presence frames the observer gets while the listeners come (and go).
    let mut frames = 0u64;
    let mut peak = 0u64;
    let mut named = 0usize;
    let mut loadgen = Box::pin(loadgen.wait_with_output());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(180);
    let status = loop {
        tokio::select! {
            done = &mut loadgen => break done.expect("loadgen ran"),
            event = observer.next_event() => match event {
                Some(chorus_node::client::ClientEvent::Notification { event, .. }) => {
                    if let Event::Listeners(l) = event {
                        frames += 1;
                        peak = peak.max(l.count);
                        named += l.joined.len() + l.left.len();
                    }
                }
                Some(_) => {}
                None => panic!("the observer's client ended"),
            },
            _ = tokio::time::sleep_until(deadline) => panic!("loadgen did not finish in time"),
        }
    };
    assert!(status.status.success(), "loadgen failed");
    let elapsed_secs = started.elapsed().as_secs() + 1;
    eprintln!(
        "{LISTENERS} listeners came and went in {elapsed_secs} s: the observer got {frames} presence frames (peak count {peak}, {named} names)"
    );
    assert!(
        peak > u64::from(LISTENERS) / 2,
        "the listeners were in the room: peak {peak}"
    );
    assert!(
        frames <= elapsed_secs + 2,
        "{frames} frames for {LISTENERS} joins in {elapsed_secs} s: not O(1) per join"
    );
    assert!(named <= 200, "names only while the room was small: {named}");
}

/// R1: a scheduled room takes interest from users who are not in it; when the host starts
/// it, the interested users get `room.live` (members get it as a room event too); a live
/// room takes no interest.
#[tokio::test]
async fn interested_users_hear_when_a_scheduled_room_goes_live() {
    use chorus_protocol::{RoomCreateRequest, RoomInterestRequest, RoomStartRequest};
    let node = TestNode::start(UNTHROTTLED).await;
    let host = node.client(&node.ws_url(), "host").await;
    let in_an_hour = chorus_actors::room_actor::unix_now_ms() + 3_600_000;
    let created = host
        .request(RoomCreateRequest {
            title: "Tomorrow's show".into(),
            scheduled_start_ms: Some(in_an_hour),
        })
        .await
        .expect("create a scheduled room");
    let room = created.room_id;
    assert_eq!(created.room.state, chorus_protocol::RoomState::Scheduled);
    let mut fan = node.client(&node.quic_url(), "fan").await;
    let mut undecided = node.client(&node.ws_url(), "undecided").await;
    let interest = |interested| RoomInterestRequest {
        room_id: room.clone(),
        interested,
    };
    let answer = fan.request(interest(true)).await.expect("interest");
    assert_eq!(answer.interested_count, 1);
    assert_eq!(
        undecided
            .request(interest(true))
            .await
            .expect("interest")
            .interested_count,
        2
    );
    assert_eq!(
        undecided
            .request(interest(false))
            .await
            .expect("no longer")
            .interested_count,
        1
    );
    host.request(RoomStartRequest {
        room_id: room.clone(),
    })
    .await
    .expect("start");
    let live = expect_event(&mut fan, "room.live", |event| match event {
        Event::Live(live) => Some(live.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        (live.room_id.as_str(), live.host.as_str()),
        (room.as_str(), "host")
    );
    assert_eq!(live.title, "Tomorrow's show");
    // The undecided user hears nothing: a comment in a room it then joins comes first.
    join(&undecided, &room).await;
    join(&host, &room).await;
    common::say(&host, &room, "welcome").await;
    let first = expect_event(&mut undecided, "the first event", |event| match event {
        Event::Live(_) => Some("live"),
        Event::Comment(_) => Some("comment"),
        _ => None,
    })
    .await;
    assert_eq!(first, "comment");
    let code = refusal(fan.request(interest(true)).await);
    assert_eq!(
        code,
        ErrorCode::InvalidArgument,
        "a live room is joined, not awaited"
    );
}

/// R10: a room's totals are readable live, and when it ends its event log and summary are
/// exported (the default sink: JSON lines under the data dir).
#[tokio::test]
async fn a_room_keeps_totals_live_and_exports_its_event_log_and_summary_when_it_ends() {
    use chorus_protocol::{RoomEndRequest, RoomReactRequest, RoomSummaryRequest};
    let node = TestNode::start(UNTHROTTLED).await;
    let mut host = node.client(&node.ws_url(), "host").await;
    let room = create_room(&host, "totals").await;
    let ann = node.client(&node.quic_url(), "ann").await;
    let bob = node.client(&node.ws_url(), "bob").await;
    for client in [&host, &ann, &bob] {
        join(client, &room).await;
    }
    for (client, text) in [(&ann, "one"), (&bob, "two"), (&ann, "three")] {
        common::say(client, &room, text).await;
    }
    for (client, emoji) in [(&ann, "👏"), (&bob, "👏"), (&bob, "🔥")] {
        client
            .request(RoomReactRequest {
                room_id: room.clone(),
                emoji: emoji.into(),
            })
            .await
            .expect("react");
    }
    // The window closes (room.reactions), then the totals hold it.
    expect_event(&mut host, "the reactions", |event| match event {
        Event::Reactions(_) => Some(()),
        _ => None,
    })
    .await;
    bob.request(chorus_protocol::RoomLeaveRequest {
        room_id: room.clone(),
    })
    .await
    .expect("leave");
    let summary = host
        .request(RoomSummaryRequest {
            room_id: room.clone(),
        })
        .await
        .expect("summary");
    assert_eq!(summary.comments, 3);
    assert_eq!(summary.reactions.get("👏"), Some(&2));
    assert_eq!(summary.reactions.get("🔥"), Some(&1));
    assert_eq!((summary.peak_listeners, summary.unique_listeners), (3, 3));
    assert_eq!(summary.listeners, 2, "bob left");
    assert!(summary.started_at_ms.is_some());
    host.request(RoomEndRequest {
        room_id: room.clone(),
    })
    .await
    .expect("end");
    let path = node
        .data_dir()
        .join("analytics")
        .join(format!("{room}.jsonl"));
    common::eventually("the summary to be exported", || async {
        std::fs::read_to_string(&path).is_ok_and(|s| s.contains("\"room.summary\""))
    })
    .await;
    let text = std::fs::read_to_string(&path).expect("export");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    // The full event log first, in order: every comment, the reactions, the end.
    let (exported, events) = lines.split_last().expect("lines");
    assert!(events.iter().all(|e| e["kind"] == "room.event"));
    let comments: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "room.comment")
        .map(|e| e["body"]["text"].as_str().expect("text"))
        .collect();
    assert_eq!(comments, ["one", "two", "three"]);
    assert!(events.iter().any(|e| e["event"] == "room.reactions"));
    assert_eq!(events.last().expect("events")["event"], "room.ended");
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    assert_eq!(exported["events"], events.len());
    assert_eq!(exported["missing_parts"], serde_json::json!([]));
    assert_eq!(exported["kind"], "room.summary");
    assert_eq!(exported["summary"]["state"], "ended");
    assert_eq!(exported["summary"]["comments"], 3);
    assert_eq!(exported["summary"]["reactions"]["👏"], 2);
    assert!(exported["summary"]["ended_at_ms"].as_u64().is_some());
}

/// R1: the host (or a moderator) invites users to a scheduled room; each gets
/// `room.invitation` without being in the room; others may not invite.
#[tokio::test]
async fn the_host_invites_users_to_a_scheduled_room() {
    use chorus_protocol::{RoomInviteUsersRequest, RoomState};
    let node = TestNode::start(UNTHROTTLED).await;
    let host = node.client(&node.ws_url(), "host").await;
    let starts_at = chorus_actors::room_actor::unix_now_ms() + 3_600_000;
    let room = common::create_scheduled_room(&host, "Friday panel", starts_at).await;
    let mut guest = node.client(&node.quic_url(), "guest").await;
    let stranger = node.client(&node.ws_url(), "stranger").await;
    let invite = |users: Vec<String>| RoomInviteUsersRequest {
        room_id: room.clone(),
        user_ids: users,
    };
    host.request(invite(vec!["guest".into(), "guest".into()]))
        .await
        .expect("invite");
    let invitation = expect_event(&mut guest, "room.invitation", |event| match event {
        Event::Invitation(i) => Some(i.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        (
            invitation.by.as_str(),
            invitation.state,
            invitation.scheduled_start_ms
        ),
        ("host", RoomState::Scheduled, Some(starts_at))
    );
    assert_eq!(invitation.title, "Friday panel");
    let code = refusal(stranger.request(invite(vec!["guest".into()])).await);
    assert_eq!(
        code,
        ErrorCode::Forbidden,
        "only the host and moderators invite"
    );
    let too_many = (0..101).map(|i| format!("u{i}")).collect();
    let code = refusal(host.request(invite(too_many)).await);
    assert_eq!(code, ErrorCode::InvalidArgument);
    // The guest was invited once, though named twice: what comes next is a comment.
    join(&guest, &room).await;
    join(&host, &room).await;
    common::say(&host, &room, "see you friday").await;
    let next = expect_event(
        &mut guest,
        "the next invitation or comment",
        |event| match event {
            Event::Invitation(_) => Some("invitation"),
            Event::Comment(_) => Some("comment"),
            _ => None,
        },
    )
    .await;
    assert_eq!(next, "comment", "one invitation per user");
}

/// R1: the room's life over sockets: only the host starts and ends it; members hear it
/// go live and end; an ended room takes no one.
#[tokio::test]
async fn only_the_host_starts_and_ends_a_room_and_an_ended_room_takes_no_one() {
    use chorus_protocol::{RoomEndRequest, RoomStartRequest};
    let node = TestNode::start(UNTHROTTLED).await;
    let host = node.client(&node.ws_url(), "host").await;
    let room = common::create_scheduled_room(
        &host,
        "soon",
        chorus_actors::room_actor::unix_now_ms() + 60_000,
    )
    .await;
    let mut member = node.client(&node.quic_url(), "member").await;
    join(&member, &room).await;
    let start = RoomStartRequest {
        room_id: room.clone(),
    };
    let end = RoomEndRequest {
        room_id: room.clone(),
    };
    assert_eq!(
        refusal(member.request(start.clone()).await),
        ErrorCode::Forbidden
    );
    host.request(start).await.expect("the host starts it");
    expect_event(&mut member, "room.live", |event| match event {
        Event::Live(_) => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(
        refusal(member.request(end.clone()).await),
        ErrorCode::Forbidden
    );
    host.request(end).await.expect("the host ends it");
    expect_event(&mut member, "room.ended", |event| match event {
        Event::RoomEnded(e) if e.by == "host" => Some(()),
        _ => None,
    })
    .await;
    let late = node.client(&node.ws_url(), "late").await;
    let code = refusal(
        late.request(RoomRef {
            room_id: room.clone(),
        })
        .await,
    );
    assert_eq!(code, ErrorCode::RoomEnded);
}

/// R10: an ended room's data expires after `ended_retention_ms` (72 h by default; 1 s
/// here): it answers `room_ended` until then, `room_not_found` after.
#[tokio::test]
async fn an_ended_room_expires_after_its_retention() {
    use chorus_protocol::{RoomEndRequest, RoomInfoRequest};
    let config_dir = tempfile::tempdir().expect("tempdir");
    let config = config_dir.path().join("chorus.toml");
    std::fs::write(&config, "[room]\nended_retention_ms = 1000\n").expect("write config");
    let mut args = vec!["--config", config.to_str().expect("utf8 path")];
    args.extend_from_slice(UNTHROTTLED);
    let node = TestNode::start(&args).await;
    let host = node.client(&node.ws_url(), "host").await;
    let room = create_room(&host, "short-lived").await;
    join(&host, &room).await;
    common::say(&host, &room, "bye").await;
    host.request(RoomEndRequest {
        room_id: room.clone(),
    })
    .await
    .expect("end");
    let info = || RoomInfoRequest {
        room_id: room.clone(),
    };
    assert_eq!(refusal(host.request(info()).await), ErrorCode::RoomEnded);
    common::eventually("the ended room to expire", || async {
        matches!(
            host.request(info()).await,
            Err(ClientError::Server(body)) if body.code == ErrorCode::RoomNotFound.as_u16()
        )
    })
    .await;
    assert_eq!(
        node.metric("chorus_rooms_expired_total").await,
        Some(1.0),
        "expired once"
    );
}

/// Waits for a `room.poll` notification that `accept` takes.
async fn poll_event(
    client: &mut Client,
    what: &str,
    accept: impl Fn(&PollInfo) -> bool,
) -> PollInfo {
    expect_event(client, what, |event| match event {
        Event::Poll(poll) if accept(poll) => Some(poll.clone()),
        _ => None,
    })
    .await
}

/// R8: moderators create and close polls, members vote once (and may change their vote
/// while the poll is open), tallies are pushed at a bounded rate, the final result is
/// pushed; every refusal has its code.
#[tokio::test]
async fn polls_take_one_vote_per_user_push_tallies_at_a_bounded_rate_and_close_with_a_result() {
    let node = TestNode::start(UNTHROTTLED).await;
    let host = node.client(&node.ws_url(), "host").await;
    let room = create_room(&host, "Poll night").await;
    join(&host, &room).await;
    let mut ann = node.client(&node.quic_url(), "ann").await;
    join(&ann, &room).await;
    let bob = node.client(&node.ws_url(), "bob").await;
    join(&bob, &room).await;

    let create = |options: &[&str]| RoomPollCreateRequest {
        room_id: room.clone(),
        question: "Tea or coffee?".into(),
        options: options.iter().map(|s| s.to_string()).collect(),
    };
    assert_eq!(
        refusal(ann.request(create(&["tea", "coffee"])).await),
        ErrorCode::Forbidden,
        "a listener may not create a poll"
    );
    assert_eq!(
        refusal(host.request(create(&["tea"])).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        refusal(host.request(create(&["x"; 11])).await),
        ErrorCode::InvalidArgument
    );
    let poll = host
        .request(create(&["tea", "coffee"]))
        .await
        .expect("create");
    assert_eq!(poll.state, PollState::Open);
    let opened = poll_event(&mut ann, "the poll opening", |p| p.poll_id == poll.poll_id).await;
    assert_eq!(opened.tallies, vec![0, 0]);

    let vote = |option: u32| RoomVoteRequest {
        room_id: room.clone(),
        poll_id: poll.poll_id,
        option,
    };
    ann.request(vote(0)).await.expect("ann votes tea");
    bob.request(vote(0)).await.expect("bob votes tea");
    bob.request(vote(1)).await.expect("bob changes to coffee");
    bob.request(vote(1))
        .await
        .expect("the same vote again is fine");
    assert_eq!(
        refusal(bob.request(vote(2)).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        refusal(
            bob.request(RoomVoteRequest {
                room_id: room.clone(),
                poll_id: 99,
                option: 0,
            })
            .await
        ),
        ErrorCode::InvalidArgument
    );
    let outsider = node.client(&node.ws_url(), "outsider").await;
    assert_eq!(
        refusal(outsider.request(vote(0)).await),
        ErrorCode::NotInRoom
    );

    // Many votes, few pushes: 40 voters in a burst cost each member a bounded number of
    // tally notifications (one per second at most, plus the first).
    let mut voters = Vec::new();
    for i in 0..40 {
        let voter = node.client(&node.ws_url(), &format!("voter{i}")).await;
        join(&voter, &room).await;
        voters.push(voter);
    }
    let started = std::time::Instant::now();
    for (i, voter) in voters.iter().enumerate() {
        voter.request(vote((i % 2) as u32)).await.expect("vote");
    }
    let mut pushes = 0u32;
    let seen = expect_event(&mut ann, "tallies with every vote", |event| match event {
        Event::Poll(p) => {
            pushes += 1;
            (p.voters == 42).then(|| p.clone())
        }
        _ => None,
    })
    .await;
    assert_eq!(
        seen.tallies,
        vec![21, 21],
        "tea: ann + 20; coffee: bob + 20"
    );
    let elapsed_secs = started.elapsed().as_secs_f64();
    assert!(
        f64::from(pushes) <= elapsed_secs + 2.0,
        "{pushes} tally pushes in {elapsed_secs:.1} s for 40 votes"
    );

    // Only moderators close; the final result reaches everyone.
    let close = RoomPollCloseRequest {
        room_id: room.clone(),
        poll_id: poll.poll_id,
    };
    assert_eq!(
        refusal(bob.request(close.clone()).await),
        ErrorCode::Forbidden
    );
    let result = host.request(close).await.expect("close");
    assert_eq!(result.state, PollState::Closed);
    assert_eq!(result.tallies, vec![21, 21]);
    let closed = poll_event(&mut ann, "the final result", |p| {
        p.state == PollState::Closed
    })
    .await;
    assert_eq!(closed.tallies, vec![21, 21]);
    assert_eq!(
        refusal(ann.request(vote(1)).await),
        ErrorCode::InvalidArgument
    );

    // A joiner sees the polls in its join answer.
    let late = node.client(&node.ws_url(), "late").await;
    let joined = late
        .request(RoomRef {
            room_id: room.clone(),
        })
        .await
        .expect("join");
    assert_eq!(joined.polls.len(), 1);
    assert_eq!(joined.polls[0].tallies, vec![21, 21]);
}

/// R6 comments and R7 reactions over sockets: what breaks a rule is refused with its code
/// and changes nothing; a joiner gets the last comments; reactions reach every member
/// aggregated.
#[tokio::test]
async fn comments_and_reactions_refuse_what_breaks_the_rules() {
    use chorus_protocol::RoomReactRequest;
    // The default comment limits: 500 characters, 5 per second with a burst of 10.
    let node = TestNode::start(UNTHROTTLED).await;
    let host = node.client(&node.ws_url(), "host").await;
    let room = create_room(&host, "rules").await;
    join(&host, &room).await;
    let mut ann = node.client(&node.quic_url(), "ann").await;
    join(&ann, &room).await;
    let outsider = node.client(&node.ws_url(), "outsider").await;

    let comment = |text: String| RoomCommentRequest {
        room_id: room.clone(),
        text,
        request_id: None,
    };
    assert_eq!(
        refusal(outsider.request(comment("hi".into())).await),
        ErrorCode::NotInRoom
    );
    assert_eq!(
        refusal(host.request(comment("   ".into())).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        refusal(host.request(comment("x".repeat(501))).await),
        ErrorCode::InvalidArgument
    );
    // A burst beyond the per-user rate is refused.
    let mut accepted = 0;
    let mut limited = 0;
    for i in 0..30 {
        match host.request(comment(format!("burst {i}"))).await {
            Ok(_) => accepted += 1,
            Err(error) => {
                assert_eq!(refusal::<()>(Err(error)), ErrorCode::RateLimited);
                limited += 1;
            }
        }
    }
    assert!(
        limited > 0 && accepted >= 10,
        "{accepted} accepted, {limited} limited"
    );
    // Only what was accepted was delivered, in order.
    let got = common::collect_comments(&mut ann, &room, accepted).await;
    let ids: Vec<u64> = got.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=accepted as u64).collect::<Vec<_>>());

    let react = |emoji: &str| RoomReactRequest {
        room_id: room.clone(),
        emoji: emoji.into(),
    };
    assert_eq!(
        refusal(outsider.request(react("👏")).await),
        ErrorCode::NotInRoom
    );
    assert_eq!(
        refusal(ann.request(react("")).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        refusal(ann.request(react(&"👏".repeat(5))).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        refusal(ann.request(react("a\u{7}")).await),
        ErrorCode::InvalidArgument
    );
    for _ in 0..5 {
        ann.request(react("🔥")).await.expect("react");
    }
    let mut total = 0;
    while total < 5 {
        total += expect_event(&mut ann, "the reactions", |event| match event {
            Event::Reactions(r) => Some(r.counts.get("🔥").copied().unwrap_or(0)),
            _ => None,
        })
        .await;
    }
    assert_eq!(total, 5, "every accepted reaction counted once");
}

/// A comment sent again with the same `request_id` (a client's retry after a timeout or a
/// reconnect) is answered with the first comment's id and posts nothing; another user's
/// equal id is another request; a bad id is refused.
#[tokio::test]
async fn a_comment_sent_twice_with_one_request_id_is_posted_once() {
    let node = TestNode::start(UNTHROTTLED).await;
    let alice = node.client(&node.ws_url(), "alice").await;
    let mut bob = node.client(&node.quic_url(), "bob").await;
    let room = create_room(&alice, "Once").await;
    join(&alice, &room).await;
    join(&bob, &room).await;
    let comment = |text: &str, id: &str| RoomCommentRequest {
        room_id: room.clone(),
        text: text.into(),
        request_id: Some(id.into()),
    };
    let first = alice
        .request(comment("hello", "7f3c-1"))
        .await
        .expect("comment");
    let again = alice
        .request(comment("hello", "7f3c-1"))
        .await
        .expect("the same request again");
    assert_eq!(again.comment_id, first.comment_id);
    let bobs = bob
        .request(comment("hi", "7f3c-1"))
        .await
        .expect("bob's own request");
    assert_eq!(bobs.comment_id, first.comment_id + 1);
    // Bob sees "hello" once, then his own.
    let seen = common::collect_comments(&mut bob, &room, 2).await;
    assert_eq!(
        seen,
        vec![
            (first.comment_id, "hello".to_string()),
            (bobs.comment_id, "hi".to_string())
        ]
    );
    assert_eq!(
        refusal(alice.request(comment("x", &"k".repeat(65))).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        refusal(alice.request(comment("x", "")).await),
        ErrorCode::InvalidArgument
    );
}

/// `room.comments` pages through a room's whole history (beyond the 50 recent comments a
/// join carries), ids consecutive, with the room's comment count; members only.
#[tokio::test]
async fn room_comments_pages_through_the_whole_history() {
    let node = TestNode::start(UNTHROTTLED).await;
    let host = node.client(&node.ws_url(), "host").await;
    let room = create_room(&host, "History").await;
    join(&host, &room).await;
    // Twelve writers (the per-user comment limit is 10 in a burst).
    let mut writers = Vec::new();
    for w in 0..12 {
        let writer = node.client(&node.quic_url(), &format!("writer-{w}")).await;
        join(&writer, &room).await;
        writers.push(writer);
    }
    let mut posted = Vec::new();
    for round in 0..10 {
        for (w, writer) in writers.iter().enumerate() {
            let text = format!("w{w} r{round}");
            let id = common::say(writer, &room, &text).await;
            posted.push((id, text));
        }
    }
    posted.sort();
    let page = |after: u64, limit: Option<u32>| chorus_protocol::RoomCommentsRequest {
        room_id: room.clone(),
        after,
        limit,
    };
    let first = host.request(page(0, None)).await.expect("first page");
    assert_eq!(first.comment_count, 120);
    assert_eq!(first.comments.len(), 100);
    let second = host
        .request(page(100, Some(50)))
        .await
        .expect("second page");
    assert_eq!(second.comments.len(), 20);
    let got: Vec<(u64, String)> = first
        .comments
        .iter()
        .chain(&second.comments)
        .map(|c| (c.comment_id, c.text.clone()))
        .collect();
    assert_eq!(got, posted);
    let end = host.request(page(120, None)).await.expect("past the end");
    assert!(end.comments.is_empty());
    let outsider = node.client(&node.ws_url(), "outsider").await;
    assert_eq!(
        refusal(outsider.request(page(0, None)).await),
        ErrorCode::NotInRoom
    );
}
