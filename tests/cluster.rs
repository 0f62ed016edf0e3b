//! System tests of a cluster of real `chorus serve` processes on loopback.

mod common;

use chorus_node::client::Client;
use chorus_protocol::RoomCommentRequest;
use common::{
    collect_comments, create_room, eventually, join, say, start_member, three_node_cluster,
    TestNode, UNTHROTTLED,
};

/// Runs `chorus admin --url http://NODE ARGS…` and asserts it succeeded; returns stdout.
async fn chorus_admin(node: &TestNode, args: &[&str]) -> Vec<u8> {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["admin", "--url", &format!("http://{}", node.http)])
        .args(args)
        .output()
        .await
        .expect("run chorus admin");
    assert!(
        output.status.success(),
        "chorus admin {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

#[tokio::test]
async fn three_nodes_form_a_cluster_with_one_leader_and_one_ring_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start_member(dir.path(), "a", None).await;
    let b = start_member(dir.path(), "b", Some(&a)).await;
    let c = start_member(dir.path(), "c", Some(&b)).await;
    let nodes = [&a, &b, &c];

    eventually(
        "every node to see 3 members up, one leader, one ring epoch",
        || async {
            let mut statuses = Vec::new();
            for node in nodes {
                statuses.push(node.admin("/admin/status").await);
            }
            statuses.iter().all(|s| {
                let members = s["members"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                members.len() == 3
                    && members.iter().all(|m| m["state"] == "up")
                    && !s["leader"].is_null()
                    && s["leader"] == statuses[0]["leader"]
                    && s["ring_epoch"] == statuses[0]["ring_epoch"]
            })
        },
    )
    .await;
    let ids: std::collections::BTreeSet<u64> = {
        let mut ids = std::collections::BTreeSet::new();
        for node in nodes {
            ids.insert(
                node.admin("/admin/status").await["self"]
                    .as_u64()
                    .expect("self id"),
            );
        }
        ids
    };
    assert_eq!(ids.len(), 3, "every node has its own id");

    // Every node agrees where a room lives.
    for i in 0..20 {
        let path = format!("/admin/where?key=r-{i}");
        let owner = a.admin(&path).await["owner"].clone();
        assert!(!owner.is_null());
        for node in [&b, &c] {
            assert_eq!(node.admin(&path).await["owner"], owner, "{path}");
        }
    }

    // The admin CLI shows the same thing.
    let stdout = chorus_admin(&c, &["--json", "status"]).await;
    let status: serde_json::Value = serde_json::from_slice(&stdout).expect("json");
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3));

    // A wrong admin token is refused.
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "admin",
            "--url",
            &format!("http://{}", c.http),
            "--token",
            "wrong",
            "status",
        ])
        .output()
        .await
        .expect("run chorus admin");
    assert!(!refused.status.success());
}

#[tokio::test]
async fn clients_on_three_nodes_in_one_room_receive_the_same_comments_in_the_same_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [a, b, c] = three_node_cluster(dir.path()).await;
    let mut alice = a.client(&a.ws_url(), "alice").await;
    let mut bob = b.client(&b.quic_url(), "bob").await;
    let mut carol = c.client(&c.ws_url(), "carol").await;
    let room = create_room(&alice, "three nodes").await;
    for client in [&alice, &bob, &carol] {
        join(client, &room).await;
    }
    let mut sent = 0;
    for round in 0..5 {
        for (name, client) in [("alice", &alice), ("bob", &bob), ("carol", &carol)] {
            say(client, &room, &format!("{name} {round}")).await;
            sent += 1;
        }
    }
    let seen_a = collect_comments(&mut alice, &room, sent).await;
    let seen_b = collect_comments(&mut bob, &room, sent).await;
    let seen_c = collect_comments(&mut carol, &room, sent).await;
    assert_eq!(seen_a, seen_b, "nodes a and b saw different orders");
    assert_eq!(seen_a, seen_c, "nodes a and c saw different orders");
    let ids: Vec<u64> = seen_a.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=sent as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn rooms_created_through_different_nodes_spread_evenly_and_every_node_agrees_where() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = three_node_cluster(dir.path()).await;
    let clients: Vec<Client> = {
        let mut clients = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            clients.push(node.client(&node.ws_url(), &format!("creator-{i}")).await);
        }
        clients
    };
    const ROOMS: usize = 1000;
    let mut rooms = Vec::with_capacity(ROOMS);
    for i in 0..ROOMS {
        let room = create_room(&clients[i % 3], &format!("room {i}")).await;
        rooms.push(room);
    }
    let mut per_owner = std::collections::BTreeMap::<u64, usize>::new();
    for room in &rooms {
        let path = format!("/admin/where?key={room}");
        let owner = nodes[0].admin(&path).await["owner"]
            .as_u64()
            .expect("owner");
        for node in &nodes[1..] {
            assert_eq!(
                node.admin(&path).await["owner"].as_u64(),
                Some(owner),
                "{room}"
            );
        }
        *per_owner.entry(owner).or_default() += 1;
    }
    let max = *per_owner.values().max().expect("owners") as f64;
    let min = *per_owner.values().min().expect("owners") as f64;
    assert_eq!(per_owner.len(), 3, "every node owns rooms: {per_owner:?}");
    assert!(
        max / min <= 1.3,
        "max/min = {:.3}: {per_owner:?}",
        max / min
    );
    eprintln!("rooms per owner: {per_owner:?}, max/min {:.3}", max / min);
}

#[tokio::test]
async fn when_a_rooms_owner_is_killed_another_node_serves_it_and_surviving_clients_carry_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = three_node_cluster(dir.path()).await;
    let creator = nodes[0].client(&nodes[0].ws_url(), "host").await;
    let room = create_room(&creator, "failover").await;
    let owner = nodes[0].admin(&format!("/admin/where?key={room}")).await["owner"]
        .as_u64()
        .expect("owner");
    let mut owner_node = None;
    let mut survivors = Vec::new();
    for node in nodes {
        if node.admin("/admin/status").await["self"].as_u64() == Some(owner) {
            owner_node = Some(node);
        } else {
            survivors.push(node);
        }
    }
    let owner_node = owner_node.expect("owner is a member");
    let mut speaker = survivors[0].client(&survivors[0].ws_url(), "speaker").await;
    let mut listener = survivors[1]
        .client(&survivors[1].quic_url(), "listener")
        .await;
    // A client of the node that dies: it reconnects to a survivor and resumes there.
    let mut stranded_config = owner_node.config(&owner_node.ws_url(), "stranded");
    stranded_config.urls.push(survivors[1].quic_url());
    stranded_config.reconnect = chorus_node::client::ReconnectPolicy {
        enabled: true,
        initial_backoff_ms: 100,
        max_backoff_ms: 500,
        attempts_max: 100,
    };
    let mut stranded = Client::connect(stranded_config).await.expect("stranded");
    for client in [&creator, &speaker, &listener, &stranded] {
        join(client, &room).await;
    }
    // Roles and a block, to survive the owner: the listener becomes a moderator, the
    // speaker comes on stage (invited, accepts), a troll is blocked.
    creator
        .request(chorus_protocol::RoomSetRoleRequest {
            room_id: room.clone(),
            user_id: "listener".into(),
            role: chorus_protocol::Role::Moderator,
        })
        .await
        .expect("make a moderator");
    creator
        .request(chorus_protocol::RoomInviteRequest {
            room_id: room.clone(),
            user_id: "speaker".into(),
        })
        .await
        .expect("invite");
    speaker
        .request(chorus_protocol::RoomInviteAnswerRequest {
            room_id: room.clone(),
            accept: true,
        })
        .await
        .expect("accept");
    creator
        .request(chorus_protocol::RoomBlockRequest {
            room_id: room.clone(),
            user_id: "troll".into(),
            blocked: true,
        })
        .await
        .expect("block");
    // A poll with acknowledged votes (one changed), to survive the owner too.
    let poll = creator
        .request(chorus_protocol::RoomPollCreateRequest {
            room_id: room.clone(),
            question: "Keep going?".into(),
            options: vec!["yes".into(), "no".into()],
        })
        .await
        .expect("poll");
    for (client, option) in [(&listener, 0), (&speaker, 1), (&stranded, 1), (&speaker, 0)] {
        client
            .request(chorus_protocol::RoomVoteRequest {
                room_id: room.clone(),
                poll_id: poll.poll_id,
                option,
            })
            .await
            .expect("vote");
    }
    let deltas = owner_node
        .metric("chorus_vote_deltas_total")
        .await
        .unwrap_or(0.0);
    assert!(deltas >= 1.0, "votes were replicated as deltas");
    say(&speaker, &room, "before").await;
    // The comment left the polls alone: it went to the replica without them (the votes
    // the replica holds stay), which the failover below relies on.
    let changes = owner_node
        .metric("chorus_room_copies_total{kind=\"change\"}")
        .await
        .unwrap_or(0.0);
    assert!(changes >= 1.0, "a comment was replicated without the polls");
    assert_eq!(
        collect_comments(&mut listener, &room, 1).await[0].1,
        "before"
    );
    assert_eq!(
        collect_comments(&mut stranded, &room, 1).await[0].1,
        "before"
    );
    let stranded_seq = stranded.last_seq();

    let killed_at = std::time::Instant::now();
    owner_node.kill().await;
    // The room is served again once a comment is accepted (by the new owner).
    let mut attempts = 0;
    loop {
        match speaker
            .request(RoomCommentRequest {
                room_id: room.clone(),
                text: "after".into(),
                request_id: None,
            })
            .await
        {
            Ok(_) => break,
            Err(error) => {
                attempts += 1;
                assert!(
                    killed_at.elapsed() < common::DEADLINE,
                    "room not served again after the owner was killed: {error}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    let served_after = killed_at.elapsed();
    let after = collect_comments(&mut listener, &room, 1).await;
    assert_eq!(
        after[0].1, "after",
        "the listener on the other surviving node receives it"
    );
    eprintln!("room served again {served_after:?} after SIGKILL of its owner ({attempts} refused attempts)");
    // The stranded client resumed its session on a survivor: the comment it missed comes
    // next, numbered right after what it had, once.
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    let mut outcome = None;
    let mut missed = Vec::new();
    let mut next_seq = stranded_seq + 1;
    while missed.is_empty() {
        let event = tokio::time::timeout_at(deadline, stranded.next_event())
            .await
            .expect("the stranded client resumes and gets the missed comment in time")
            .expect("stranded client events");
        match event {
            chorus_node::client::ClientEvent::Reconnected { outcome: o } => outcome = Some(o),
            chorus_node::client::ClientEvent::Notification { seq, event } => {
                assert_eq!(seq, next_seq, "no gap, no repeat in the session");
                next_seq += 1;
                if let chorus_protocol::Event::Comment(comment) = event {
                    missed.push(comment);
                }
            }
            _ => {}
        }
    }
    assert_eq!(
        outcome,
        Some(chorus_protocol::ResumeOutcome::Resumed),
        "resumed on a survivor"
    );
    assert_eq!(
        (missed[0].comment_id, missed[0].text.as_str()),
        (2, "after")
    );
    // It is a member there: it comments and the others get it.
    say(&stranded, &room, "back").await;
    assert_eq!(collect_comments(&mut listener, &room, 1).await[0].1, "back");
    // The definition (host, title) survived.
    let info = speaker
        .request(chorus_protocol::RoomInfoRequest {
            room_id: room.clone(),
        })
        .await
        .expect("info");
    assert_eq!(info.host, "host");
    assert_eq!(info.title, "failover");
    // Roles and blocks survived: the new owner continued from the replicated stage.
    let stage = speaker
        .request(chorus_protocol::RoomStageRequest {
            room_id: room.clone(),
        })
        .await
        .expect("stage");
    assert_eq!(stage.moderators, vec!["listener".to_string()]);
    assert_eq!(stage.speakers, vec!["speaker".to_string()]);
    // Every acknowledged vote survived (the new owner continued from the replicated
    // polls and vote deltas).
    let late = survivors[1].client(&survivors[1].ws_url(), "late").await;
    let joined = late
        .request(chorus_protocol::RoomRef {
            room_id: room.clone(),
        })
        .await
        .expect("late join");
    assert_eq!(joined.polls.len(), 1, "{:?}", joined.polls);
    assert_eq!(joined.polls[0].tallies, vec![2, 1], "{:?}", joined.polls[0]);
    assert_eq!(joined.polls[0].voters, 3);
    let troll = survivors[0].client(&survivors[0].ws_url(), "troll").await;
    let refused = troll
        .request(chorus_protocol::RoomRef {
            room_id: room.clone(),
        })
        .await;
    assert!(
        matches!(&refused, Err(chorus_node::client::ClientError::Server(body))
            if body.code == chorus_protocol::ErrorCode::Forbidden as u16),
        "the block survived: {refused:?}"
    );
    let _ = speaker.try_next_event();
}

#[tokio::test]
async fn draining_a_node_moves_its_rooms_while_clients_keep_their_connections_then_it_is_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = three_node_cluster(dir.path()).await;
    // Rooms until one is owned by node 3's member (the one we drain), created through node 1.
    let drained = nodes[2].admin("/admin/status").await["self"]
        .as_u64()
        .expect("id");
    let host = nodes[0].client(&nodes[0].ws_url(), "host").await;
    let mut room = None;
    for i in 0..50 {
        let id = create_room(&host, &format!("drain {i}")).await;
        if nodes[0].admin(&format!("/admin/where?key={id}")).await["owner"].as_u64()
            == Some(drained)
        {
            room = Some(id);
            break;
        }
    }
    let room = room.expect("some room lands on the drained node");
    let speaker = nodes[0].client(&nodes[0].ws_url(), "speaker").await;
    let mut listener = nodes[1].client(&nodes[1].quic_url(), "listener").await;
    for client in [&host, &speaker, &listener] {
        join(client, &room).await;
    }
    say(&speaker, &room, "before drain").await;
    assert_eq!(
        collect_comments(&mut listener, &room, 1).await[0].1,
        "before drain"
    );

    chorus_admin(&nodes[0], &["drain", &drained.to_string()]).await;
    let where_path = format!("/admin/where?key={room}");
    eventually("the room to move off the drained node", || async {
        let owner = nodes[0].admin(&where_path).await["owner"].as_u64();
        owner.is_some() && owner != Some(drained)
    })
    .await;
    // Same connections, the room works on its new owner.
    let mut delivered = false;
    for _ in 0..50 {
        if speaker
            .request(RoomCommentRequest {
                room_id: room.clone(),
                text: "after drain".into(),
                request_id: None,
            })
            .await
            .is_ok()
        {
            delivered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(delivered, "comment after the drain was refused");
    let texts: Vec<String> = collect_comments(&mut listener, &room, 1)
        .await
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(texts, ["after drain"]);

    // The room ends: its event log, logged by two owners, is exported whole, in order.
    host.request(chorus_protocol::RoomEndRequest {
        room_id: room.clone(),
    })
    .await
    .expect("end");
    let files: Vec<std::path::PathBuf> = nodes
        .iter()
        .map(|n| n.data_dir().join("analytics").join(format!("{room}.jsonl")))
        .collect();
    let mut export = String::new();
    eventually("the event log and summary to be exported", || {
        export = files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .find(|text| text.contains("\"room.summary\""))
            .unwrap_or_default();
        let done = !export.is_empty();
        async move { done }
    })
    .await;
    let lines: Vec<serde_json::Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let comments: Vec<&str> = lines
        .iter()
        .filter(|l| l["event"] == "room.comment")
        .map(|l| l["body"]["text"].as_str().expect("text"))
        .collect();
    assert_eq!(comments, ["before drain", "after drain"]);
    let epochs: std::collections::BTreeSet<u64> =
        lines.iter().filter_map(|l| l["epoch"].as_u64()).collect();
    assert!(epochs.len() >= 2, "logged by both owners: {epochs:?}");
    let summary = lines.last().expect("summary line");
    assert_eq!(summary["kind"], "room.summary");
    assert_eq!(summary["missing_parts"], serde_json::json!([]));

    chorus_admin(&nodes[1], &["remove", &drained.to_string()]).await;
    eventually("the removed node to leave the member list", || async {
        nodes[0].admin("/admin/status").await["members"]
            .as_array()
            .map(Vec::len)
            == Some(2)
    })
    .await;
}

#[tokio::test]
async fn a_fourth_node_takes_a_quarter_of_the_rooms_and_clients_in_moved_rooms_lose_no_comment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [a, b, c] = three_node_cluster(dir.path()).await;
    let host = a.client(&a.ws_url(), "host").await;
    const ROOMS: usize = 1000;
    let mut rooms = Vec::with_capacity(ROOMS);
    for i in 0..ROOMS {
        rooms.push(create_room(&host, &format!("r{i}")).await);
    }
    let mut before = Vec::with_capacity(ROOMS);
    for room in &rooms {
        before.push(a.admin(&format!("/admin/where?key={room}")).await["owner"].as_u64());
    }
    // The 4th member will get id 4 (ids are assigned in order and never reused): pick rooms
    // that will move to it, and put clients on two other nodes in them.
    let future = chorus_cluster::ring::Ring::new(0, &[1, 2, 3, 4]).expect("ring");
    let moving: Vec<String> = rooms
        .iter()
        .filter(|r| future.owner(&format!("room/{r}")) == Some(4))
        .take(3)
        .cloned()
        .collect();
    assert_eq!(moving.len(), 3);
    let speaker = b.client(&b.ws_url(), "speaker").await;
    let mut listener = c.client(&c.quic_url(), "listener").await;
    for room in &moving {
        for client in [&speaker, &listener] {
            join(client, room).await;
        }
        for i in 0..3 {
            say(&speaker, room, &format!("before {i}")).await;
        }
    }

    let d = start_member(dir.path(), "d", Some(&a)).await;
    eventually("four members up on every node", || async {
        let mut epochs = std::collections::BTreeSet::new();
        for node in [&a, &b, &c, &d] {
            let status = node.admin("/admin/status").await;
            let up = status["members"]
                .as_array()
                .map(|m| m.iter().filter(|m| m["state"] == "up").count());
            if up != Some(4) {
                return false;
            }
            epochs.insert(status["ring_epoch"].to_string());
        }
        epochs.len() == 1
    })
    .await;
    let mut moved = 0;
    for (room, owner_before) in rooms.iter().zip(&before) {
        let owner = a.admin(&format!("/admin/where?key={room}")).await["owner"].as_u64();
        if owner != *owner_before {
            assert_eq!(owner, Some(4), "{room} moved to an old node");
            moved += 1;
        }
    }
    let share = moved as f64 / ROOMS as f64;
    eprintln!(
        "adding a 4th node moved {moved} of {ROOMS} rooms ({:.1}%)",
        share * 100.0
    );
    assert!(
        (0.20..=0.30).contains(&share),
        "moved {share:.3} of the rooms"
    );

    // Same connections: comments continue in the moved rooms, none is lost.
    for room in &moving {
        for i in 0..3 {
            say(&speaker, room, &format!("after {i}")).await;
        }
    }
    let mut seen: std::collections::BTreeMap<String, Vec<(u64, String)>> = Default::default();
    let total = moving.len() * 6;
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    let mut count = 0;
    while count < total {
        match tokio::time::timeout_at(deadline, listener.next_event()).await {
            Ok(Some(chorus_node::client::ClientEvent::Notification {
                event: chorus_protocol::Event::Comment(c),
                ..
            })) => {
                seen.entry(c.room_id.clone())
                    .or_default()
                    .push((c.comment_id, c.text.clone()));
                count += 1;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("only {count} of {total} comments arrived: {seen:#?}"),
        }
    }
    for room in &moving {
        let comments = &seen[room];
        let texts: Vec<&str> = comments.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(
            texts,
            ["before 0", "before 1", "before 2", "after 0", "after 1", "after 2"],
            "{room}"
        );
        let ids: Vec<u64> = comments.iter().map(|(id, _)| *id).collect();
        assert_eq!(
            ids,
            [1, 2, 3, 4, 5, 6],
            "{room}: one total order continues across owners"
        );
    }
}

/// Reads raw frames until a comment arrives; returns (notification seq, comment id, text).
async fn next_raw_comment(conn: &mut chorus_node::client::Connection) -> (u64, u64, String) {
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let frame = tokio::time::timeout_at(deadline, conn.recv())
            .await
            .expect("a comment in time")
            .expect("connection alive");
        if let chorus_protocol::Frame::Notification(n) = frame {
            if let Ok(chorus_protocol::Event::Comment(c)) =
                chorus_protocol::Event::decode(&n.kind, &n.body)
            {
                return (n.seq, c.comment_id, c.text);
            }
        }
    }
}

#[tokio::test]
async fn nodes_keep_actor_sessions_and_a_session_resumed_elsewhere_ends_at_its_live_home() {
    use chorus_node::client::Connection;
    use chorus_protocol::{ErrorCode, ResumeOutcome, ResumeRequest, RoomRef};

    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = three_node_cluster(dir.path()).await;
    // ractor_cluster runs over the inter-node QUIC links: every node has an actor session
    // with each of the other two.
    eventually(
        "every node to have actor sessions with the other two",
        || async {
            for node in &nodes {
                let peers = node.admin("/admin/status").await["mesh_peers"].clone();
                if peers.as_array().map(Vec::len) != Some(2) {
                    return false;
                }
            }
            true
        },
    )
    .await;

    let speaker = nodes[0].client(&nodes[0].ws_url(), "speaker").await;
    let room = create_room(&speaker, "travel").await;
    join(&speaker, &room).await;
    // The traveller's home is node 1; it joins the room over a raw connection.
    let home = &nodes[1];
    let config = home.config(&home.ws_url(), "traveller");
    let mut at_home = Connection::connect(&home.ws_url(), &config)
        .await
        .expect("connect");
    let auth = at_home
        .authenticate(1, &common::token("traveller"), None)
        .await
        .expect("auth");
    at_home
        .send_request(
            2,
            &RoomRef {
                room_id: room.clone(),
            },
        )
        .await
        .expect("join");
    common::raw_response(&mut at_home, 2).await.expect("joined");
    say(&speaker, &room, "one").await;
    let (seq, comment_id, text) = next_raw_comment(&mut at_home).await;
    assert_eq!(text, "one");

    // Its network changes: the old connection still looks open to node 1, and the client
    // resumes on node 2, naming the room and the last comment it has.
    let away = &nodes[2];
    let mut resumed =
        Connection::connect(&away.ws_url(), &away.config(&away.ws_url(), "traveller"))
            .await
            .expect("connect elsewhere");
    let auth2 = resumed
        .authenticate(
            1,
            &common::token("traveller"),
            Some(ResumeRequest {
                session_id: auth.session_id.clone(),
                last_seq: seq,
                rooms: Some([(room.clone(), comment_id)].into_iter().collect()),
            }),
        )
        .await
        .expect("resume elsewhere");
    assert_eq!(auth2.resume, ResumeOutcome::Resumed);

    // Node 2 told node 1 over the actor mesh; node 1 ended the session there and closed
    // the old connection.
    let closed = common::close_code(&mut at_home, "after the session moved").await;
    assert_eq!(closed, Some(ErrorCode::ResumeFailed.close_code()));
    assert_eq!(
        away.metric("chorus_mesh_calls_total{outcome=\"ok\"}").await,
        Some(1.0),
        "the end-session notice went over the actor mesh"
    );
    assert_eq!(
        home.metric("chorus_mesh_requests_total").await,
        Some(1.0),
        "node 1's control actor answered it"
    );
    // The session carries on at node 2.
    say(&speaker, &room, "two").await;
    let (_, _, text) = next_raw_comment(&mut resumed).await;
    assert_eq!(text, "two");
}

#[tokio::test]
async fn a_member_restarted_at_a_new_address_records_it_and_serves_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [a, b, c] = three_node_cluster(dir.path()).await;
    let c_id = c.admin("/admin/status").await["self"]
        .as_u64()
        .expect("self id");
    let old_addr = c.cluster;
    c.kill().await;
    // The same data dir at another IP, as a rescheduled pod: it binds every interface
    // and advertises 127.0.0.3. Nobody tells the others: it finds the leader and records
    // its new addresses itself.
    let ca = dir.path().join("ca");
    let mut args = vec![
        "--ca",
        ca.to_str().expect("utf8 path"),
        "--node-name",
        "c",
        "--cluster-addr",
        "0.0.0.0:0",
        "--advertise-ip",
        "127.0.0.3",
        // Binding every interface needs credentials given explicitly (the same values
        // as the development ones the tests mint tokens with).
        "--secret",
        chorus_node::config::DEV_SECRET,
        "--admin-token",
        chorus_node::config::DEV_ADMIN_TOKEN,
    ];
    args.extend_from_slice(UNTHROTTLED);
    let c = TestNode::start_in(&dir.path().join("c"), &args).await;
    let new_addr = std::net::SocketAddr::from(([127, 0, 0, 3], c.cluster.port()));
    assert_ne!(new_addr, old_addr);
    let nodes = [&a, &b, &c];
    eventually("every node to record c's new address with c up", || async {
        for node in nodes {
            let status = node.admin("/admin/status").await;
            let Some(members) = status["members"].as_array() else {
                return false;
            };
            let moved = members.iter().any(|m| {
                m["id"].as_u64() == Some(c_id)
                    && m["state"] == "up"
                    && m["cluster_addr"].as_str() == Some(new_addr.to_string().as_str())
            });
            if !moved || members.iter().any(|m| m["state"] != "up") {
                return false;
            }
        }
        true
    })
    .await;

    // A room owned by c (found by creating rooms through a) is served: comments from a
    // client on b reach listeners on a and on c.
    let creator = a.client(&a.ws_url(), "host").await;
    let mut room = None;
    for i in 0..60 {
        let id = create_room(&creator, &format!("moved {i}")).await;
        if a.admin(&format!("/admin/where?key={id}")).await["owner"].as_u64() == Some(c_id) {
            room = Some(id);
            break;
        }
    }
    let room = room.expect("one of 60 rooms is placed on c");
    let speaker = b.client(&b.ws_url(), "speaker").await;
    let mut on_a = a.client(&a.quic_url(), "on-a").await;
    let mut on_c = c.client(&c.ws_url(), "on-c").await;
    for client in [&speaker, &on_a, &on_c] {
        join(client, &room).await;
    }
    say(&speaker, &room, "hello from b").await;
    assert_eq!(
        collect_comments(&mut on_a, &room, 1).await[0].1,
        "hello from b"
    );
    assert_eq!(
        collect_comments(&mut on_c, &room, 1).await[0].1,
        "hello from b"
    );
    // c follows the Raft log again: it has applied what the leader has.
    eventually("c to catch up with the log", || async {
        let leader_applied = a.admin("/admin/status").await["applied_index"].as_u64();
        let c_applied = c.admin("/admin/status").await["applied_index"].as_u64();
        leader_applied.is_some() && c_applied >= leader_applied
    })
    .await;
}

#[tokio::test]
async fn a_raised_hand_reaches_moderators_on_other_nodes_and_no_listener() {
    use chorus_protocol::{Event, RoomHandRequest, RoomSetRoleRequest, StageAction};
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = three_node_cluster(dir.path()).await;
    let host = nodes[0].client(&nodes[0].ws_url(), "host").await;
    let room = create_room(&host, "hands").await;
    // A moderator and a listener on one node, the hand-raiser on another.
    let mut moderator = nodes[1].client(&nodes[1].ws_url(), "mod").await;
    let mut neighbour = nodes[1].client(&nodes[1].quic_url(), "neighbour").await;
    let raiser = nodes[2].client(&nodes[2].ws_url(), "raiser").await;
    for client in [&host, &moderator, &neighbour, &raiser] {
        join(client, &room).await;
    }
    host.request(RoomSetRoleRequest {
        room_id: room.clone(),
        user_id: "mod".into(),
        role: chorus_protocol::Role::Moderator,
    })
    .await
    .expect("make a moderator");
    raiser
        .request(RoomHandRequest {
            room_id: room.clone(),
            raised: true,
        })
        .await
        .expect("raise hand");
    common::expect_event(&mut moderator, "the raised hand", |event| match event {
        Event::Stage(s) if s.action == StageAction::HandRaised && s.user_id == "raiser" => Some(()),
        _ => None,
    })
    .await;
    // The listener next to the moderator saw the role change but never the hand: a
    // comment after the hand arrives, with no hand before it.
    say(&host, &room, "after the hand").await;
    loop {
        let event = common::expect_event(&mut neighbour, "the comment", |event| match event {
            Event::Stage(s) => Some(Some(s.action)),
            Event::Comment(_) => Some(None),
            _ => None,
        })
        .await;
        match event {
            Some(StageAction::HandRaised) => panic!("a listener got a raised hand"),
            Some(_) => continue,
            None => break,
        }
    }
}

#[tokio::test]
async fn users_interested_through_any_node_hear_the_room_go_live() {
    use chorus_protocol::{Event, RoomInterestRequest, RoomStartRequest};
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = three_node_cluster(dir.path()).await;
    let host = nodes[0].client(&nodes[0].ws_url(), "host").await;
    let in_an_hour = chorus_actors::room_actor::unix_now_ms() + 3_600_000;
    let room = common::create_scheduled_room(&host, "later", in_an_hour).await;
    let mut fans = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let fan = node.client(&node.quic_url(), &format!("fan{i}")).await;
        fan.request(RoomInterestRequest {
            room_id: room.clone(),
            interested: true,
        })
        .await
        .expect("interest");
        fans.push(fan);
    }
    host.request(RoomStartRequest {
        room_id: room.clone(),
    })
    .await
    .expect("start");
    for fan in &mut fans {
        let live = common::expect_event(fan, "room.live", |event| match event {
            Event::Live(live) => Some(live.room_id.clone()),
            _ => None,
        })
        .await;
        assert_eq!(live, room);
    }
}

/// Every page of `room.list` in `state`, three rooms at a time.
async fn list_all(
    client: &Client,
    state: Option<chorus_protocol::RoomState>,
) -> Vec<chorus_protocol::RoomListEntry> {
    let mut rooms = Vec::new();
    let mut after = None;
    loop {
        let page = client
            .request(chorus_protocol::RoomListRequest {
                state,
                after: after.take(),
                limit: Some(3),
            })
            .await
            .expect("room.list");
        assert!(page.rooms.len() <= 3);
        rooms.extend(page.rooms);
        match page.next {
            Some(next) => after = Some(next),
            None => return rooms,
        }
    }
}

/// `room.list`: every node lists the same open rooms, newest first, page by page, with
/// listener counts from each room's owner; an ended room leaves the list; the CLI lists
/// them too.
#[tokio::test]
async fn every_node_lists_the_same_rooms_with_their_listener_counts() {
    use chorus_protocol::{RoomEndRequest, RoomListRequest, RoomState};
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = three_node_cluster(dir.path()).await;
    let hosts: Vec<_> = futures_util::future::join_all(nodes.iter().map(|n| async move {
        let url = n.ws_url();
        n.client(&url, "host").await
    }))
    .await;
    let mut created = Vec::new();
    for i in 0..7 {
        created.push(create_room(&hosts[i % 3], &format!("room {i}")).await);
    }
    let later = chorus_actors::room_actor::unix_now_ms() + 3_600_000;
    let scheduled = common::create_scheduled_room(&hosts[0], "later", later).await;
    // Two listeners, on two nodes, in room 2.
    let listeners = [
        nodes[1].client(&nodes[1].ws_url(), "l1").await,
        nodes[2].client(&nodes[2].quic_url(), "l2").await,
    ];
    for l in &listeners {
        join(l, &created[2]).await;
    }
    // Every node, once its list has caught up, lists all eight, newest first.
    for (i, host) in hosts.iter().enumerate() {
        eventually(&format!("node {i} lists every room"), || async {
            list_all(host, None).await.len() == 8
        })
        .await;
        let rooms = list_all(host, None).await;
        let mut sorted = rooms.clone();
        sorted.sort_by_key(|r| (std::cmp::Reverse(r.created_at_ms), r.room_id.clone()));
        assert_eq!(rooms, sorted, "newest first");
        let busy = rooms
            .iter()
            .find(|r| r.room_id == created[2])
            .expect("room 2");
        assert_eq!(busy.listener_count, Some(2), "node {i}: {busy:?}");
        assert_eq!(busy.title, "room 2");
        assert_eq!(busy.host, "host");
        let quiet = rooms
            .iter()
            .find(|r| r.room_id == created[5])
            .expect("room 5");
        assert_eq!(quiet.listener_count, Some(0));
        let only_scheduled = list_all(host, Some(RoomState::Scheduled)).await;
        assert_eq!(only_scheduled.len(), 1);
        assert_eq!(only_scheduled[0].room_id, scheduled);
        assert_eq!(list_all(host, Some(RoomState::Live)).await.len(), 7);
    }
    // An ended room leaves every node's list.
    hosts[0]
        .request(RoomEndRequest {
            room_id: created[4].clone(),
        })
        .await
        .expect("end");
    for (i, host) in hosts.iter().enumerate() {
        eventually(&format!("node {i} drops the ended room"), || async {
            let rooms = list_all(host, None).await;
            rooms.len() == 7 && !rooms.iter().any(|r| r.room_id == created[4])
        })
        .await;
    }
    // A cursor that is not one: a clear refusal.
    let refused = hosts[1]
        .request(RoomListRequest {
            state: None,
            after: Some("nonsense".into()),
            limit: None,
        })
        .await
        .expect_err("a bad cursor");
    assert!(refused.to_string().contains("cursor"), "{refused}");
    // The CLI.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "client",
            "--url",
            &nodes[2].ws_url(),
            "--user",
            "viewer",
            "rooms",
            "--state",
            "live",
        ])
        .env("CHORUS_LOG", "warn")
        .output()
        .await
        .expect("chorus client rooms");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let page: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
    assert_eq!(page["rooms"].as_array().map(Vec::len), Some(6), "{page}");
}
