//! Partitions (issue 18): a node cut off from the others knows it, says so, and makes no
//! client wait for a room it cannot reach. Real node processes on their own loopback
//! addresses; the cut is an nftables rule between those addresses (clients connect from
//! 127.0.0.1 and keep reaching every node).

mod common;

use std::time::{Duration, Instant};

use chorus_chaos::netcut::LinkCut;
use chorus_node::client::{ClientError, ClientEvent};
use chorus_protocol::{ErrorCode, Event, RoomCommentRequest, RoomCommentsRequest};
use common::{create_room, eventually, join, say, start_member_with, try_http_get, TestNode};

/// Node `i`'s flags: its own loopback address for every listener.
fn addresses(ip: &str) -> Vec<String> {
    ["--http-addr", "--quic-addr", "--cluster-addr"]
        .into_iter()
        .flat_map(|flag| [flag.to_string(), format!("{ip}:0")])
        .collect()
}

async fn member(dir: &std::path::Path, name: &str, ip: &str, join: Option<&TestNode>) -> TestNode {
    let extra = addresses(ip);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    start_member_with(dir, name, join, &extra).await
}

async fn ready(node: &TestNode) -> Option<(bool, serde_json::Value)> {
    let (status, body) = try_http_get(node.http, "/readyz").await?;
    Some((status == 200, serde_json::from_str(&body).ok()?))
}

/// One node of three is cut off from the other two for 25 s while writers on the other
/// side comment. Within 5 s it reports not ready; its clients are told to go elsewhere
/// (close 4401) and, resuming on it anyway, get `5001` at once for a room owned on the
/// other side (that comment is never posted: every id is accounted for below). When the
/// links return it catches up and is ready again; listeners on every node have every
/// comment, in order and once, the one that stayed on the cut-off node after a `room.gap`
/// notice from `room.comments`; and the room takes comments from it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_knows_it_and_makes_no_client_wait() {
    if !LinkCut::available().await {
        assert!(
            std::env::var_os("CHORUS_CHAOS_REQUIRE_CUTS").is_none(),
            "link cuts are required here but nft cannot change the ruleset"
        );
        eprintln!("skipped: nft is not available or not allowed (link cuts need root)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ips = ["127.0.5.11", "127.0.5.12", "127.0.5.13"];
    let a = member(dir.path(), "a", ips[0], None).await;
    let b = member(dir.path(), "b", ips[1], Some(&a)).await;
    let c = member(dir.path(), "c", ips[2], Some(&a)).await;
    let nodes = [&a, &b, &c];
    eventually("all three ready", || async {
        let mut all = true;
        for node in nodes {
            all &= ready(node).await.is_some_and(|(ok, _)| ok);
        }
        all
    })
    .await;
    let a_id = a.admin("/admin/status").await["self"]
        .as_u64()
        .expect("self");

    // A room owned by a, and a client that only knows c.
    let mut config = c.config(&c.ws_url(), "carol");
    config.reconnect = chorus_node::client::ReconnectPolicy::default();
    let mut client = chorus_node::client::Client::connect(config)
        .await
        .expect("carol connects to c");
    let mut room = None;
    for i in 0..64 {
        let candidate = create_room(&client, &format!("cut {i}")).await;
        let owner = c.admin(&format!("/admin/where?key={candidate}")).await["owner"].as_u64();
        if owner == Some(a_id) {
            room = Some(candidate);
            break;
        }
    }
    let room = room.expect("a room owned by node a among 64");
    join(&client, &room).await;
    say(&client, &room, "before the cut").await;
    // Listeners on the other two nodes.
    let mut alice = a.client(&a.quic_url(), "alice").await;
    join(&alice, &room).await;
    let mut bob = b.client(&b.ws_url(), "bob").await;
    join(&bob, &room).await;
    // Writers on a, the other side of the cut (the per-user limit is 10 in a burst).
    let mut writers = Vec::new();
    for w in 0..8 {
        let writer = a.client(&a.ws_url(), &format!("writer-{w}")).await;
        join(&writer, &room).await;
        writers.push(writer);
    }

    let others: Vec<std::net::IpAddr> = ips[..2].iter().map(|ip| ip.parse().expect("ip")).collect();
    let cut = LinkCut::isolate(ips[2].parse().expect("ip"), &others)
        .await
        .expect("cut");
    let cut_at = Instant::now();
    eventually("c to report that it is cut off", || async {
        ready(&c).await.is_some_and(|(ok, body)| {
            !ok && body["reason"]
                .as_str()
                .is_some_and(|r| r.contains("cut off"))
        })
    })
    .await;
    let noticed = cut_at.elapsed();
    assert!(
        noticed <= Duration::from_secs(5),
        "c reported not ready {noticed:?} after the cut"
    );

    // Its connection was closed with 4401 (unavailable: go elsewhere); this client has no
    // other node, so it resumes on c.
    let mut closed_with = None;
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, client.next_event()).await {
        match event {
            ClientEvent::Disconnected { code, .. } => closed_with = code,
            ClientEvent::Reconnected { .. } => break,
            _ => {}
        }
    }
    assert_eq!(closed_with, Some(ErrorCode::Unavailable.close_code()));
    let sent = Instant::now();
    let answer = client
        .request(RoomCommentRequest {
            room_id: room.clone(),
            text: "during the cut".into(),
            request_id: None,
        })
        .await;
    let took = sent.elapsed();
    match answer {
        Err(ClientError::Server(body)) => assert_eq!(body.code, ErrorCode::Unavailable.as_u16()),
        other => panic!("a comment to a room owned across the cut answered {other:?}"),
    }
    assert!(took <= Duration::from_secs(1), "the refusal took {took:?}");

    eprintln!("not ready {noticed:?} after the cut; a comment across it refused in {took:?}");

    // The room goes on on the other side, once it has dropped c's members (c is marked
    // down): writers comment until the cut has lasted 25 s, far more than a join's recent
    // log holds.
    let c_id = c.admin("/admin/status").await["self"]
        .as_u64()
        .expect("self");
    eventually("a to mark c down", || async {
        a.admin("/admin/status").await["members"]
            .as_array()
            .is_some_and(|members| {
                members
                    .iter()
                    .any(|m| m["id"].as_u64() == Some(c_id) && m["state"] == "down")
            })
    })
    .await;
    let mut posted = std::collections::BTreeMap::new();
    posted.insert(1, "before the cut".to_string());
    let mut round = 0;
    while cut_at.elapsed() < Duration::from_secs(CUT_SECS) || round < 10 {
        for (w, writer) in writers.iter().enumerate() {
            let text = format!("w{w} r{round}");
            let id = say(writer, &room, &text).await;
            assert!(
                posted.insert(id, text).is_none(),
                "comment id {id} given twice"
            );
        }
        round += 1;
        // 8 writers, each within its 5 comments/s.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let last = *posted.keys().next_back().expect("posted");
    assert_eq!(
        posted.keys().copied().collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "ids without holes"
    );
    cut.heal().await.expect("heal");
    eprintln!("cut held {:?}; {last} comments", cut_at.elapsed());
    eventually("c to be ready again", || async {
        ready(&c).await.is_some_and(|(ok, _)| ok)
    })
    .await;

    // Every listener (one on each side, and Carol who stayed on c) has every comment:
    // live, in order, each once, or after a `room.gap` notice from `room.comments`.
    for (name, listener) in [("alice on a", &mut alice), ("bob on b", &mut bob)] {
        let (live, fetched, gaps) = every_comment(listener, &room, last, &posted).await;
        eprintln!(
            "{name}: {} live, {} fetched, gaps {gaps:?}",
            live.len(),
            fetched.len()
        );
    }
    let (live, fetched, gaps) = every_comment(&mut client, &room, last, &posted).await;
    eprintln!(
        "carol on c: {} live, {} fetched, gaps {gaps:?}",
        live.len(),
        fetched.len()
    );
    assert!(
        !gaps.is_empty(),
        "{last} comments while c was down, but no room.gap"
    );
    let id = say(&client, &room, "after the cut").await;
    assert_eq!(id, last + 1, "comment id after the heal");
}

/// How long the cut lasts.
const CUT_SECS: u64 = 25;

/// Reads `client`'s events until it has every comment `2..=last` of `room` (1 was posted
/// before it listened or is in its join): live ones in order and each once, and after
/// each `room.gap` exactly the named ones from `room.comments`, page by page. Every text
/// must be the one posted under its id. Returns (live ids, fetched ids, gaps).
async fn every_comment(
    client: &mut chorus_node::client::Client,
    room: &str,
    last: u64,
    posted: &std::collections::BTreeMap<u64, String>,
) -> (Vec<u64>, Vec<u64>, Vec<(u64, u64)>) {
    let mut live: Vec<u64> = Vec::new();
    let mut fetched: Vec<u64> = Vec::new();
    let mut gaps = Vec::new();
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    let complete = |live: &[u64], fetched: &[u64]| {
        (2..=last).all(|id| live.contains(&id) || fetched.contains(&id))
    };
    while !complete(&live, &fetched) {
        let event = tokio::time::timeout_at(deadline, client.next_event())
            .await
            .unwrap_or_else(|_| {
                let missing: Vec<u64> = (2..=last)
                    .filter(|id| !live.contains(id) && !fetched.contains(id))
                    .collect();
                panic!("missing {missing:?}; gaps {gaps:?}")
            })
            .expect("client open");
        match event {
            ClientEvent::Notification {
                event: Event::Comment(comment),
                ..
            } if comment.room_id == room => {
                assert_eq!(posted.get(&comment.comment_id), Some(&comment.text));
                assert!(
                    live.last().is_none_or(|l| *l < comment.comment_id),
                    "comment {} after {:?}",
                    comment.comment_id,
                    live.last()
                );
                live.push(comment.comment_id);
            }
            ClientEvent::Notification {
                event: Event::Gap(gap),
                ..
            } if gap.room_id == room => {
                gaps.push((gap.after, gap.next));
                let mut after = gap.after;
                while after + 1 < gap.next {
                    let limit = (gap.next - after - 1).min(100) as u32;
                    let page = client
                        .request(RoomCommentsRequest {
                            room_id: room.to_string(),
                            after,
                            limit: Some(limit),
                        })
                        .await
                        .expect("room.comments");
                    let ids: Vec<u64> = page.comments.iter().map(|c| c.comment_id).collect();
                    assert_eq!(
                        ids,
                        (after + 1..=after + u64::from(limit)).collect::<Vec<_>>(),
                        "a full page of exactly the missing ones"
                    );
                    for comment in page.comments {
                        assert_eq!(posted.get(&comment.comment_id), Some(&comment.text));
                        fetched.push(comment.comment_id);
                    }
                    after += u64::from(limit);
                }
            }
            _ => {}
        }
    }
    assert!(
        fetched.iter().all(|id| !live.contains(id)),
        "a fetched comment also arrived live"
    );
    (live, fetched, gaps)
}
