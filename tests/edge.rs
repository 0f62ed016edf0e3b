//! System tests of one node's edge: real `chorus serve` processes, real WebSocket and QUIC
//! connections on loopback, the Rust client library.

mod common;

use std::time::Duration;

use chorus_node::client::{Client, ClientError, ClientEvent};
use chorus_node::client::{Connection, RawMessage};
use chorus_protocol::{
    AuthRequest, ClientRequest, Encoding, ErrorCode, Event, Frame, PingRequest, ResumeOutcome,
    ResumeRequest, RoomCommentRequest, RoomReactRequest, RoomRef,
};
use common::{
    close_code, collect_comments, create_room, eventually, expect_event, join, raw_response, say,
    token, TestNode, DEADLINE,
};

fn server_code(error: &ClientError) -> Option<u16> {
    match error {
        ClientError::Server(body) | ClientError::Auth(body) => Some(body.code),
        _ => None,
    }
}

#[tokio::test]
async fn mixed_transports_see_the_same_comments_in_the_same_order() {
    let node = TestNode::start(&["--requests-per-sec", "1000", "--requests-burst", "1000"]).await;
    let mut ws = node.client(&node.ws_url(), "alice").await;
    let mut quic = node.client(&node.quic_url(), "bob").await;
    let mut ws_json = {
        let mut config = node.config(&node.ws_url(), "carol");
        config.encoding = Encoding::Json;
        Client::connect(config).await.expect("json client")
    };
    let room = create_room(&ws, "mixed").await;
    for client in [&ws, &quic, &ws_json] {
        join(client, &room).await;
    }
    // Three authors on two transports interleave their comments.
    let mut sent = 0;
    for round in 0..5 {
        for (name, client) in [("alice", &ws), ("bob", &quic), ("carol", &ws_json)] {
            say(client, &room, &format!("{name} {round}")).await;
            sent += 1;
        }
    }
    let a = collect_comments(&mut ws, &room, sent).await;
    let b = collect_comments(&mut quic, &room, sent).await;
    let c = collect_comments(&mut ws_json, &room, sent).await;
    assert_eq!(a, b, "WebSocket and QUIC members saw different orders");
    assert_eq!(a, c, "MessagePack and JSON members saw different orders");
    let ids: Vec<u64> = a.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        (1..=sent as u64).collect::<Vec<_>>(),
        "comment ids are 1..n without gaps"
    );
}

#[tokio::test]
async fn forged_expired_and_missing_tokens_are_refused() {
    let node = TestNode::start(&[]).await;
    for url in [node.ws_url(), node.quic_url()] {
        // forged: signed with another secret
        let forged = chorus_node::token::TokenKeys::new(b"not the cluster secret")
            .mint("mallory", &[], chorus_node::token::unix_now_secs(), 3600)
            .expect("mint");
        let mut config = node.config(&url, "mallory");
        config.token = forged;
        let error = Client::connect(config)
            .await
            .expect_err("forged token accepted");
        assert_eq!(
            server_code(&error),
            Some(ErrorCode::InvalidToken.as_u16()),
            "{url}: {error}"
        );

        // expired an hour ago
        let expired = chorus_node::token::TokenKeys::new(common::SECRET.as_bytes())
            .mint(
                "mallory",
                &[],
                chorus_node::token::unix_now_secs() - 7200,
                3600,
            )
            .expect("mint");
        let mut config = node.config(&url, "mallory");
        config.token = expired;
        let error = Client::connect(config)
            .await
            .expect_err("expired token accepted");
        assert_eq!(
            server_code(&error),
            Some(ErrorCode::TokenExpired.as_u16()),
            "{url}: {error}"
        );

        // missing: requests without auth are refused, the connection stays usable for auth
        let mut conn = Connection::connect(&url, &node.config(&url, "x"))
            .await
            .expect("connect");
        conn.send_request(
            1,
            &RoomRef {
                room_id: "r-1".into(),
            },
        )
        .await
        .expect("send");
        let error = raw_response(&mut conn, 1)
            .await
            .expect_err("served before auth");
        assert_eq!(error.code, ErrorCode::Unauthenticated.as_u16());
        conn.send_request(2, &PingRequest {}).await.expect("send");
        raw_response(&mut conn, 2)
            .await
            .expect("ping is served before auth");
        // after a refused token the connection is closed with the close code
        conn.send_request(
            3,
            &AuthRequest {
                token: "garbage".into(),
                protocol_version: None,
                resume: None,
            },
        )
        .await
        .expect("send");
        let error = raw_response(&mut conn, 3)
            .await
            .expect_err("garbage token accepted");
        assert_eq!(error.code, ErrorCode::InvalidToken.as_u16());
        let closed = close_code(&mut conn, "after a refused token").await;
        assert_eq!(closed, Some(ErrorCode::InvalidToken.close_code()), "{url}");
    }
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_two_missed_pings() {
    let node = TestNode::start(&["--ping-interval-ms", "200"]).await;
    for url in [node.ws_url(), node.quic_url()] {
        let mut silent_config = node.config(&url, "silent");
        silent_config.answer_pings = false;
        let mut silent = Client::connect(silent_config).await.expect("silent client");
        let mut polite = node.client(&url, "polite").await;
        let (code, _) = tokio::time::timeout(DEADLINE, async {
            loop {
                match silent.next_event().await {
                    Some(ClientEvent::Closed { code, reason })
                    | Some(ClientEvent::Disconnected { code, reason }) => return (code, reason),
                    None => return (None, String::new()),
                    _ => {}
                }
            }
        })
        .await
        .expect("silent client was not dropped");
        assert_eq!(code, Some(ErrorCode::PingTimeout.close_code()), "{url}");
        // The client that answers pings is still served after the same time.
        polite
            .request(PingRequest {})
            .await
            .expect("polite client still connected");
        assert!(polite
            .try_next_event()
            .is_none_or(|e| !matches!(e, ClientEvent::Closed { .. })));
    }
}

#[tokio::test]
async fn resume_after_a_cut_connection_gives_exactly_the_missed_events() {
    let node = TestNode::start(&["--requests-per-sec", "1000", "--requests-burst", "1000"]).await;
    for url in [node.ws_url(), node.quic_url()] {
        let speaker = node.client(&node.ws_url(), "speaker").await;
        let room = create_room(&speaker, "resume").await;
        join(&speaker, &room).await;

        // A raw connection so the test controls exactly what was seen.
        let config = node.config(&url, "listener");
        let mut conn = Connection::connect(&url, &config).await.expect("connect");
        let auth = conn
            .authenticate(1, &token("listener"), None)
            .await
            .expect("auth");
        let session_id = auth.session_id.clone();
        conn.send_request(
            2,
            &RoomRef {
                room_id: room.clone(),
            },
        )
        .await
        .expect("join");
        raw_response(&mut conn, 2).await.expect("joined");
        for i in 1..=3 {
            say(&speaker, &room, &format!("before {i}")).await;
        }
        let mut seen = Vec::new();
        let mut last_seq = 0;
        while seen.len() < 3 {
            let frame = tokio::time::timeout(DEADLINE, conn.recv())
                .await
                .expect("notification")
                .expect("alive");
            if let Frame::Notification(n) = frame {
                if let Ok(Event::Comment(c)) = Event::decode(&n.kind, &n.body) {
                    seen.push(c.text);
                }
                last_seq = n.seq;
            }
        }
        // Cut the connection (no goodbye), miss some comments, resume on a new connection.
        drop(conn);
        for i in 1..=4 {
            say(&speaker, &room, &format!("missed {i}")).await;
        }
        let mut conn = Connection::connect(&url, &config).await.expect("reconnect");
        let auth = conn
            .authenticate(
                1,
                &token("listener"),
                Some(ResumeRequest {
                    session_id: session_id.clone(),
                    last_seq,
                    rooms: None,
                }),
            )
            .await
            .expect("resume auth");
        assert_eq!(auth.resume, ResumeOutcome::Resumed, "{url}");
        assert_eq!(auth.session_id, session_id);
        say(&speaker, &room, "after").await;
        let mut replayed = Vec::new();
        let mut seqs = Vec::new();
        while replayed.len() < 5 {
            let frame = tokio::time::timeout(DEADLINE, conn.recv())
                .await
                .expect("replay")
                .expect("alive");
            if let Frame::Notification(n) = frame {
                seqs.push(n.seq);
                if let Ok(Event::Comment(c)) = Event::decode(&n.kind, &n.body) {
                    replayed.push(c.text);
                }
            }
        }
        assert_eq!(
            replayed,
            vec!["missed 1", "missed 2", "missed 3", "missed 4", "after"],
            "{url}"
        );
        assert_eq!(
            seqs.first(),
            Some(&(last_seq + 1)),
            "replay starts right after last_seq"
        );
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "no gaps or repeats: {seqs:?}"
        );

        // An unknown session gets resync.
        let mut other = Connection::connect(&url, &config).await.expect("connect");
        let auth = other
            .authenticate(
                1,
                &token("listener"),
                Some(ResumeRequest {
                    session_id: "s-nope".into(),
                    last_seq: 0,
                    rooms: None,
                }),
            )
            .await
            .expect("auth");
        assert_eq!(auth.resume, ResumeOutcome::Resync);
    }
}

#[tokio::test]
async fn bad_frames_get_the_documented_errors_and_the_connection_survives() {
    let node = TestNode::start(&[]).await;
    for url in [node.ws_url(), node.quic_url()] {
        let config = node.config(&url, "fuzzer");
        let mut conn = Connection::connect(&url, &config).await.expect("connect");
        conn.authenticate(1, &token("fuzzer"), None)
            .await
            .expect("auth");

        // malformed
        conn.send_frame(b"\xc1\xc1 definitely not a frame")
            .await
            .expect("send");
        assert_eq!(
            raw_response(&mut conn, 0)
                .await
                .expect_err("malformed")
                .code,
            ErrorCode::MalformedFrame.as_u16()
        );
        // oversized (above 64 KiB, below the transport cap)
        let big = ClientRequest::RoomComment(RoomCommentRequest {
            room_id: "r".into(),
            text: "x".repeat(100_000),
            request_id: None,
        })
        .encode(conn.encoding(), 2)
        .expect("encode");
        conn.send_frame(&big).await.expect("send");
        assert_eq!(
            raw_response(&mut conn, 0)
                .await
                .expect_err("oversized")
                .code,
            ErrorCode::FrameTooLarge.as_u16()
        );
        // unknown kind
        conn.send_request_kind(3, "room.teleport", &serde_json::json!({}))
            .await
            .expect("send");
        assert_eq!(
            raw_response(&mut conn, 3).await.expect_err("unknown").code,
            ErrorCode::UnknownKind.as_u16()
        );
        // body that does not fit the kind
        conn.send_request_kind(4, "room.join", &serde_json::json!({"room": 5}))
            .await
            .expect("send");
        assert_eq!(
            raw_response(&mut conn, 4).await.expect_err("bad body").code,
            ErrorCode::InvalidBody.as_u16()
        );
        // out of order
        conn.send_request(4, &PingRequest {}).await.expect("send");
        assert_eq!(
            raw_response(&mut conn, 4)
                .await
                .expect_err("replayed seq")
                .code,
            ErrorCode::OutOfOrder.as_u16()
        );
        // too deep
        let mut deep = serde_json::json!(1);
        for _ in 0..40 {
            deep = serde_json::json!([deep]);
        }
        conn.send_request_kind(5, "ping", &deep)
            .await
            .expect("send");
        assert_eq!(
            raw_response(&mut conn, 0).await.expect_err("deep").code,
            ErrorCode::FrameTooComplex.as_u16()
        );
        // and the connection still works
        conn.send_request(6, &PingRequest {}).await.expect("send");
        raw_response(&mut conn, 6).await.expect("still served");
    }
    // A text WebSocket message with invalid JSON
    let mut config = node.config(&node.ws_url(), "fuzzer");
    config.encoding = Encoding::Json;
    let mut conn = Connection::connect(&node.ws_url(), &config)
        .await
        .expect("connect");
    conn.send_raw(RawMessage::Text("{\"type\":\"req\",".into()))
        .await
        .expect("send");
    assert_eq!(
        raw_response(&mut conn, 0).await.expect_err("bad json").code,
        ErrorCode::MalformedFrame.as_u16()
    );
}

#[tokio::test]
async fn a_flooding_client_is_throttled_while_others_are_unaffected() {
    let node = TestNode::start(&["--requests-per-sec", "20", "--requests-burst", "40"]).await;
    let flooder = node.client(&node.ws_url(), "flooder").await;
    let calm = node.client(&node.quic_url(), "calm").await;
    let mut limited = 0;
    let mut served = 0;
    for _ in 0..200 {
        match flooder.request(PingRequest {}).await {
            Ok(_) => served += 1,
            Err(error) if server_code(&error) == Some(ErrorCode::RateLimited.as_u16()) => {
                limited += 1
            }
            Err(error) => panic!("unexpected error: {error}"),
        }
    }
    assert!(
        limited >= 100,
        "flood was not throttled: {served} served, {limited} limited"
    );
    assert!(served >= 30, "the burst was not served: {served}");
    for _ in 0..10 {
        calm.request(PingRequest {})
            .await
            .expect("a calm client is not throttled by another");
    }
}

#[tokio::test]
async fn a_slow_consumer_is_dropped_without_slowing_the_room() {
    let node = TestNode::start(&[
        "--requests-per-sec",
        "100000",
        "--requests-burst",
        "100000",
        "--outgoing-queue-frames-max",
        "64",
        "--resume-buffer-frames-max",
        "64",
        "--comment-rate-per-sec",
        "100000",
        "--comment-burst",
        "100000",
    ])
    .await;
    let mut speaker = node.client(&node.ws_url(), "speaker").await;
    let room = create_room(&speaker, "slow").await;
    join(&speaker, &room).await;
    let requester = speaker.requester();
    // The speaker and a healthy listener read everything they receive.
    tokio::spawn(async move { while speaker.next_event().await.is_some() {} });
    let mut listener = node.client(&node.quic_url(), "listener").await;
    join(&listener, &room).await;

    // The slow consumer: joined, then never reads again.
    let mut slow = Connection::connect(&node.ws_url(), &node.config(&node.ws_url(), "slow"))
        .await
        .expect("connect");
    slow.authenticate(1, &token("slow"), None)
        .await
        .expect("auth");
    slow.send_request(
        2,
        &RoomRef {
            room_id: room.clone(),
        },
    )
    .await
    .expect("join");
    raw_response(&mut slow, 2).await.expect("joined");

    // ~6 MB: more than the queue plus the kernel socket buffers (up to 4 MiB send + 128 KiB receive on loopback).
    const COMMENTS: usize = 10_000;
    let room_for_listener = room.clone();
    let collector =
        tokio::spawn(
            async move { collect_comments(&mut listener, &room_for_listener, COMMENTS).await },
        );
    // Far more bytes than the slow consumer's queue and socket buffers hold.
    let text = "y".repeat(490);
    for i in 0..COMMENTS {
        requester
            .request(RoomCommentRequest {
                room_id: room.clone(),
                text: format!("{i} {text}"),
                request_id: None,
            })
            .await
            .expect("comments are accepted while a consumer is slow");
    }
    let received = collector.await.expect("collector");
    assert_eq!(
        received.len(),
        COMMENTS,
        "a healthy listener gets every comment"
    );
    assert!(
        received.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "in order, without gaps"
    );
    eventually("slow consumer closed", || async {
        node.metric("chorus_slow_consumer_closes_total")
            .await
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    drop(slow);
}

#[tokio::test]
async fn reactions_are_aggregated_and_listener_counts_pushed() {
    let node = TestNode::start(&["--requests-per-sec", "1000", "--requests-burst", "1000"]).await;
    let mut host = node.client(&node.ws_url(), "host").await;
    let room = create_room(&host, "reactions").await;
    join(&host, &room).await;
    let fan = node.client(&node.quic_url(), "fan").await;
    join(&fan, &room).await;
    let count = expect_event(&mut host, "listener count 2", |e| match e {
        Event::Listeners(l) if l.count == 2 => Some(l.count),
        _ => None,
    })
    .await;
    assert_eq!(count, 2);
    for _ in 0..30 {
        fan.request(RoomReactRequest {
            room_id: room.clone(),
            emoji: "👏".into(),
        })
        .await
        .expect("react");
    }
    let mut total = 0;
    let mut windows = 0;
    while total < 30 {
        total += expect_event(&mut host, "reactions", |e| match e {
            Event::Reactions(r) => Some(r.counts.get("👏").copied().unwrap_or(0)),
            _ => None,
        })
        .await;
        windows += 1;
    }
    assert_eq!(total, 30);
    assert!(
        windows < 30,
        "reactions were not aggregated: {windows} pushes for 30 reactions"
    );
}

#[tokio::test]
async fn rooms_survive_a_restart_and_joiners_get_recent_comments() {
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path().join("data");
    let node = TestNode::start_in(&data, &[]).await;
    let host = node.client(&node.ws_url(), "host").await;
    let room = create_room(&host, "durable").await;
    join(&host, &room).await;
    say(&host, &room, "first").await;
    say(&host, &room, "second").await;
    let late = node.client(&node.ws_url(), "late").await;
    let joined = late
        .request(RoomRef {
            room_id: room.clone(),
        })
        .await
        .expect("join");
    let texts: Vec<_> = joined
        .recent_comments
        .iter()
        .map(|c| c.text.as_str())
        .collect();
    assert_eq!(texts, ["first", "second"]);
    drop((host, late));
    let status = node.terminate().await;
    assert!(status.success(), "SIGTERM exit: {status}");

    let node = TestNode::start_in(&data, &[]).await;
    let again = node.client(&node.quic_url(), "again").await;
    let joined = again
        .request(RoomRef {
            room_id: room.clone(),
        })
        .await
        .expect("room survives restart");
    assert_eq!(joined.room.title, "durable");
    // The recent comments and the count survive too: ids go on after a restart.
    let texts: Vec<_> = joined
        .recent_comments
        .iter()
        .map(|c| (c.comment_id, c.text.as_str()))
        .collect();
    assert_eq!(texts, [(1, "first"), (2, "second")]);
    let next = again
        .request(chorus_protocol::RoomCommentRequest {
            room_id: room.clone(),
            text: "third".into(),
            request_id: None,
        })
        .await
        .expect("comment after restart");
    assert_eq!(next.comment_id, 3);
    let error = again
        .request(RoomRef {
            room_id: "r-missing".into(),
        })
        .await
        .expect_err("unknown room");
    assert_eq!(server_code(&error), Some(ErrorCode::RoomNotFound.as_u16()));
    let _ = Duration::from_secs(0);
}

#[tokio::test]
async fn a_message_above_the_transport_cap_closes_the_connection_with_a_reason() {
    let node = TestNode::start(&[]).await;
    for (url, expected) in [
        (node.ws_url(), 1009u16),
        (node.quic_url(), ErrorCode::FrameTooLarge.close_code()),
    ] {
        let config = node.config(&url, "big");
        let mut conn = Connection::connect(&url, &config).await.expect("connect");
        conn.authenticate(1, &token("big"), None)
            .await
            .expect("auth");
        let huge = vec![0x90u8; 2 * 1024 * 1024];
        let raw = if url.starts_with("quic") {
            // A length prefix announcing 2 MiB, then some of it.
            let mut bytes = (2u32 * 1024 * 1024).to_be_bytes().to_vec();
            bytes.extend_from_slice(&huge[..1024]);
            RawMessage::Binary(bytes.into())
        } else {
            RawMessage::Binary(huge.into())
        };
        let _ = conn.send_raw(raw).await;
        let code = close_code(&mut conn, "after an over-cap message").await;
        if url.starts_with("ws") {
            // The server closes with 1009 while the 2 MiB are still arriving; closing a TCP
            // socket with unread data sends a reset, which may destroy the close frame on
            // its way. Closed it must be; with a code, that code must be 1009.
            assert!(code.is_none() || code == Some(expected), "{url}: {code:?}");
        } else {
            assert_eq!(code, Some(expected), "{url}");
        }
    }
}

#[tokio::test]
async fn a_client_that_closes_normally_leaves_its_rooms_at_once() {
    let node = TestNode::start(&[]).await;
    for url in [node.ws_url(), node.quic_url()] {
        let mut host = node.client(&node.ws_url(), "host").await;
        let room = create_room(&host, "goodbye").await;
        join(&host, &room).await;
        let mut guest = node.client(&url, "guest").await;
        join(&guest, &room).await;
        expect_event(&mut host, "listener count 2", |e| match e {
            Event::Listeners(l) if l.count == 2 => Some(()),
            _ => None,
        })
        .await;
        guest.close().await;
        // Well inside the 60 s resume window: the goodbye, not expiry, removed the guest.
        expect_event(&mut host, "listener count back to 1", |e| match e {
            Event::Listeners(l) if l.count == 1 => Some(()),
            _ => None,
        })
        .await;
    }
}

#[tokio::test]
async fn one_user_on_two_devices_gets_every_comment_on_both_and_counts_once() {
    let node = TestNode::start(&[]).await;
    let mut host = node.client(&node.ws_url(), "host").await;
    let room = create_room(&host, "devices").await;
    join(&host, &room).await;
    let mut phone = node.client(&node.quic_url(), "dana").await;
    let mut laptop = node.client(&node.ws_url(), "dana").await;
    join(&phone, &room).await;
    join(&laptop, &room).await;
    expect_event(&mut host, "listener count 2", |e| match e {
        Event::Listeners(l) if l.count == 2 => Some(()),
        _ => None,
    })
    .await;
    let info = host
        .request(chorus_protocol::RoomInfoRequest {
            room_id: room.clone(),
        })
        .await
        .expect("info");
    assert_eq!(
        info.listener_count, 2,
        "two users, one of them on two devices"
    );
    say(&host, &room, "to every device").await;
    for device in [&mut phone, &mut laptop] {
        let texts = collect_comments(device, &room, 1).await;
        assert_eq!(texts[0].1, "to every device");
    }
    assert_ne!(
        phone.session_id(),
        laptop.session_id(),
        "each device has its own session"
    );
}

/// A node keeps its QUIC stateless-reset secret in its data dir: a client still holding a
/// connection to the node's previous run (SIGKILL: nothing told it) gets a reset at its
/// next packet, which it accepts, instead of waiting out the idle timeout.
#[tokio::test]
async fn a_quic_client_of_a_killed_node_is_reset_by_the_restarted_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // Fixed addresses (its own loopback address): the restart listens where the client
    // still sends.
    let addrs = [
        "--http-addr",
        "127.0.4.11:7070",
        "--quic-addr",
        "127.0.4.11:7071",
        "--cluster-addr",
        "127.0.4.11:7072",
    ];
    let node = TestNode::start_in(&data, &addrs).await;
    let ca = node.ca_path();
    let config = chorus_node::client::quic_client_config(&ca, 60_000).expect("client config");
    let endpoint = chorus_node::client::client_endpoint(node.quic).expect("endpoint");
    let connection = tokio::time::timeout(
        DEADLINE,
        endpoint
            .connect_with(config, node.quic, "localhost")
            .expect("connect"),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    node.kill().await;
    let _restarted = TestNode::start_in(&data, &addrs).await;
    // Anything the client sends now reaches the new process, which knows no such
    // connection and answers with a stateless reset.
    let outcome = tokio::time::timeout(DEADLINE, async {
        loop {
            let _ = connection.send_datagram(bytes::Bytes::from(vec![0u8; 64]));
            if let Ok(mut stream) = connection.open_uni().await {
                let _ = stream.write_all(&[0u8; 64]).await;
            }
            tokio::select! {
                error = connection.closed() => return error,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    })
    .await
    .expect("the connection to the killed node is still open: no reset from the restart");
    assert!(
        matches!(outcome, quinn::ConnectionError::Reset),
        "expected a stateless reset, got {outcome:?}"
    );
}
