//! Voice messages (SPEC M1-M6) over real node processes: a three-node cluster on three
//! loopback addresses (127.0.12.11, .12, .13; ports chosen by the OS), users on different
//! nodes, chunked uploads, fetch while uploading, inbox sync
//! and state across devices, history, and every refusal with its documented code.

mod common;

use std::path::PathBuf;

use base64::Engine as _;
use chorus_node::client::{Client, ClientError};
use chorus_protocol::{
    ErrorCode, Event, VmCancelRequest, VmChunkRequest, VmFetchRequest, VmHistoryRequest,
    VmPlayRequest, VmReadRequest, VmSendRequest, VmStatusRequest, VmSyncRequest, VmUploadStatus,
};
use common::{expect_event, TestNode};

/// Three nodes, one per loopback address 127.0.12.11-13 (ports chosen by the OS, so tests
/// can run at once), converged.
async fn three_node_cluster(dir: &std::path::Path) -> [TestNode; 3] {
    three_node_cluster_with(dir, &[]).await
}

/// [`three_node_cluster`] with `extra` flags for every node.
async fn three_node_cluster_with(dir: &std::path::Path, extra: &[&str]) -> [TestNode; 3] {
    let flags = |i: usize| -> Vec<String> {
        let ip = format!("127.0.12.{}", 11 + i);
        let mut flags: Vec<String> = [
            ("--http-addr", format!("{ip}:0")),
            ("--quic-addr", format!("{ip}:0")),
            ("--cluster-addr", format!("{ip}:0")),
        ]
        .into_iter()
        .flat_map(|(flag, addr)| [flag.to_string(), addr])
        .collect();
        flags.extend(extra.iter().map(|s| s.to_string()));
        flags
    };
    let args: Vec<Vec<String>> = (0..3).map(flags).collect();
    let args: Vec<Vec<&str>> = args
        .iter()
        .map(|a| a.iter().map(String::as_str).collect())
        .collect();
    let a = common::start_member_with(dir, "a", None, &args[0]).await;
    let b = common::start_member_with(dir, "b", Some(&a), &args[1]).await;
    let c = common::start_member_with(dir, "c", Some(&a), &args[2]).await;
    let nodes = [a, b, c];
    common::wait_converged(&nodes).await;
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(node.http.ip().to_string(), format!("127.0.12.{}", 11 + i));
    }
    nodes
}

fn sample() -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("actors/src/voicemail/testdata/sine-1s.opus");
    std::fs::read(path).expect("the sample message")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64")
}

async fn client(node: &TestNode, user: &str) -> Client {
    node.client(&node.ws_url(), user).await
}

fn code_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> u16 {
    match result {
        Err(ClientError::Server(body)) => body.code,
        other => panic!("expected an error answer, got {other:?}"),
    }
}

async fn send(from: &Client, to: &[&str]) -> String {
    from.request(VmSendRequest {
        to: to.iter().map(|s| s.to_string()).collect(),
        group: None,
    })
    .await
    .expect("vm.send")
    .message_id
}

async fn chunk(
    from: &Client,
    message_id: &str,
    offset: u64,
    data: &[u8],
    last: bool,
) -> Result<chorus_protocol::VmUploadState, ClientError> {
    from.request(VmChunkRequest {
        message_id: message_id.to_string(),
        offset,
        data: b64(data),
        last,
    })
    .await
}

/// Fetches the whole message, waiting for bytes while it uploads; the bytes.
async fn fetch_all(client: &Client, message_id: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    loop {
        let answer = client
            .request(VmFetchRequest {
                message_id: message_id.to_string(),
                offset: bytes.len() as u64,
                length: None,
                wait_ms: Some(5_000),
            })
            .await
            .expect("vm.fetch");
        bytes.extend_from_slice(&unb64(&answer.data));
        if answer.status != VmUploadStatus::Uploading && bytes.len() as u64 >= answer.acked {
            assert_eq!(answer.status, VmUploadStatus::Complete);
            return bytes;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_crosses_nodes_plays_while_uploading_and_syncs_every_device() {
    let dir = tempfile::tempdir().expect("dir");
    let [a, b, c] = three_node_cluster(dir.path()).await;
    let audio = sample();
    let alice = client(&a, "alice").await;
    let mut bob_phone = client(&b, "bob").await;
    let mut bob_laptop = client(&c, "bob").await;

    let message_id = send(&alice, &["bob"]).await;
    // The first chunk: bob's devices get the message while alice has more to send.
    let first = 600;
    let state = chunk(&alice, &message_id, 0, &audio[..first], false)
        .await
        .expect("first chunk");
    assert_eq!(state.status, VmUploadStatus::Uploading);
    assert!(state.acked > 0 && state.acked <= first as u64, "{state:?}");
    let entry = expect_event(&mut bob_phone, "vm.message on bob's phone", |e| match e {
        Event::VmMessage(entry) if entry.message_id == message_id => Some(entry.clone()),
        _ => None,
    })
    .await;
    assert_eq!(entry.sender, "alice");
    assert_eq!(entry.state.upload, VmUploadStatus::Uploading);
    assert_eq!(entry.conversation, "direct:alice:bob");
    // Bob starts fetching before alice sends the rest: his first bytes are the upload's
    // first acknowledged bytes.
    let early = bob_phone
        .request(VmFetchRequest {
            message_id: message_id.clone(),
            offset: 0,
            length: None,
            wait_ms: Some(0),
        })
        .await
        .expect("early fetch");
    assert_eq!(early.status, VmUploadStatus::Uploading);
    let early_bytes = unb64(&early.data);
    assert!(
        !early_bytes.is_empty(),
        "bob received bytes before the last chunk was sent"
    );
    assert_eq!(early_bytes[..], audio[..early_bytes.len()]);
    // A fetch waiting at the end of what is stored returns when the next chunk lands.
    let waiting = {
        let bob = bob_laptop.requester();
        let message_id = message_id.clone();
        let at = early.acked;
        tokio::spawn(async move {
            bob.request(VmFetchRequest {
                message_id,
                offset: at,
                length: None,
                wait_ms: Some(20_000),
            })
            .await
        })
    };
    // The rest, in chunks of 400 bytes, continuing where alice stands.
    let mut sent = first;
    while sent < audio.len() {
        let end = (sent + 400).min(audio.len());
        let state = chunk(
            &alice,
            &message_id,
            sent as u64,
            &audio[sent..end],
            end == audio.len(),
        )
        .await
        .expect("chunk");
        sent = end;
        if end == audio.len() {
            assert_eq!(state.status, VmUploadStatus::Complete);
            assert_eq!(state.acked, audio.len() as u64);
            assert!(state.duration_ms >= 900, "{state:?}");
        }
    }
    let waited = waiting.await.expect("task").expect("waiting fetch");
    assert!(
        !waited.data.is_empty(),
        "the waiting fetch got the next bytes"
    );
    // Bit-exact on every node, and opusinfo accepts it.
    for (who, device) in [
        ("bob's phone", &bob_phone),
        ("bob's laptop", &bob_laptop),
        ("alice", &alice),
    ] {
        assert_eq!(
            fetch_all(device, &message_id).await,
            audio,
            "{who} got it bit-exact"
        );
    }
    let file = dir.path().join("fetched.opus");
    std::fs::write(&file, fetch_all(&bob_laptop, &message_id).await).expect("write");
    let opusinfo = std::process::Command::new("opusinfo").arg(&file).output();
    match opusinfo {
        Ok(out) => assert!(
            out.status.success(),
            "opusinfo: {}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(error) => panic!("opusinfo is needed (apt-get install opus-tools): {error}"),
    }

    // Read on the phone reaches the laptop with a higher version.
    let read = bob_phone
        .request(VmReadRequest {
            message_id: message_id.clone(),
        })
        .await
        .expect("vm.read");
    assert!(read.state.read);
    let pushed = expect_event(
        &mut bob_laptop,
        "vm.state read on the laptop",
        |e| match e {
            Event::VmState(s) if s.message_id == message_id && s.state.read => Some(s.clone()),
            _ => None,
        },
    )
    .await;
    assert!(pushed.state.version > entry.state.version);
    assert_eq!(pushed.state.version, read.state.version);

    // Concurrent play positions converge on the later device timestamp everywhere.
    let (p1, p2) = tokio::join!(
        bob_phone.request(VmPlayRequest {
            message_id: message_id.clone(),
            device: "phone".into(),
            position_ms: 300,
            at_ms: 2_000,
        }),
        bob_laptop.request(VmPlayRequest {
            message_id: message_id.clone(),
            device: "laptop".into(),
            position_ms: 700,
            at_ms: 1_000,
        }),
    );
    p1.expect("play on the phone");
    p2.expect("play on the laptop");
    for device in [&bob_phone, &bob_laptop] {
        let page = device
            .request(VmSyncRequest {
                device: "phone".into(),
                after: 0,
                limit: None,
            })
            .await
            .expect("sync");
        let state = &page
            .entries
            .iter()
            .find(|e| e.message_id == message_id)
            .expect("entry")
            .state;
        let play = state.play.as_ref().expect("a position");
        assert_eq!(
            (play.position_ms, play.at_ms, play.device.as_str()),
            (300, 2_000, "phone")
        );
        assert!(state.read);
    }

    // An offline device syncs later, on any node, and gets the message and its latest state.
    let tablet = client(&a, "bob").await;
    let page = tablet
        .request(VmSyncRequest {
            device: "tablet".into(),
            after: 0,
            limit: Some(10),
        })
        .await
        .expect("sync");
    assert_eq!(page.last_seq, 1);
    assert_eq!(page.entries.len(), 1);
    let synced = &page.entries[0];
    assert_eq!(synced.seq, 1);
    assert_eq!(synced.state.upload, VmUploadStatus::Complete);
    assert_eq!(synced.state.bytes, audio.len() as u64);
    assert!(synced.state.read);
    // Alice's inbox has her sent message too.
    let alice_page = alice
        .request(VmSyncRequest {
            device: "alice-phone".into(),
            after: 0,
            limit: None,
        })
        .await
        .expect("alice sync");
    assert_eq!(alice_page.entries.len(), 1);
    assert_eq!(alice_page.entries[0].message_id, message_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_newest_first_in_complete_pages_and_refusals_have_their_codes() {
    let dir = tempfile::tempdir().expect("dir");
    let [a, b, c] = three_node_cluster(dir.path()).await;
    let audio = sample();
    let carol = client(&a, "carol").await;
    let dave = client(&b, "dave").await;
    let eve = client(&c, "eve").await;

    // Seven messages, history in pages of three: complete, newest first, no repeats.
    let mut ids = Vec::new();
    for _ in 0..7 {
        let id = send(&carol, &["dave"]).await;
        chunk(&carol, &id, 0, &audio, true)
            .await
            .expect("whole message");
        ids.push(id);
    }
    let mut listed = Vec::new();
    let mut before = None;
    loop {
        let page = dave
            .request(VmHistoryRequest {
                conversation: "direct:carol:dave".into(),
                before,
                limit: Some(3),
            })
            .await
            .expect("history");
        assert!(page.entries.len() <= 3);
        listed.extend(page.entries.iter().map(|e| e.message_id.clone()));
        match page.next {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first);

    // Refusals.
    let id = send(&carol, &["dave"]).await;
    chunk(&carol, &id, 0, &audio[..500], false)
        .await
        .expect("first chunk");
    let status = carol
        .request(VmStatusRequest {
            message_id: id.clone(),
        })
        .await
        .expect("status");
    assert_eq!(
        code_of(chunk(&carol, &id, status.acked + 1_000, &audio[..10], false).await),
        ErrorCode::UploadOutOfOrder.as_u16()
    );
    // Different bytes over acknowledged ones (unacknowledged bytes, the part of a page not
    // yet complete, may be sent again differently).
    let mut altered = audio[..status.acked as usize].to_vec();
    altered[status.acked as usize / 2] ^= 0xff;
    assert_eq!(
        code_of(chunk(&carol, &id, 0, &altered, false).await),
        ErrorCode::UploadConflict.as_u16()
    );
    assert_eq!(
        code_of(chunk(&dave, &id, 500, &audio[500..600], false).await),
        ErrorCode::Forbidden.as_u16(),
        "only the sender uploads"
    );
    assert_eq!(
        code_of(
            eve.request(VmFetchRequest {
                message_id: id.clone(),
                offset: 0,
                length: None,
                wait_ms: None,
            })
            .await
        ),
        ErrorCode::MessageNotFound.as_u16(),
        "a stranger does not see it"
    );
    assert_eq!(
        code_of(chunk(&carol, &id, 0, &vec![0u8; 40 * 1024], false).await),
        ErrorCode::MessageTooLarge.as_u16()
    );
    let not_opus = send(&carol, &["dave"]).await;
    assert_eq!(
        code_of(chunk(&carol, &not_opus, 0, &[b'x'; 300], false).await),
        ErrorCode::NotOpus.as_u16()
    );
    let cancelled = carol
        .request(VmCancelRequest {
            message_id: id.clone(),
        })
        .await
        .expect("cancel");
    assert_eq!(cancelled.status, VmUploadStatus::Cancelled);
    assert_eq!(
        code_of(
            chunk(
                &carol,
                &id,
                cancelled.acked,
                &audio[cancelled.acked as usize..],
                true
            )
            .await
        ),
        ErrorCode::UploadClosed.as_u16()
    );
    assert_eq!(
        code_of(
            carol
                .request(VmSendRequest {
                    to: vec![],
                    group: None
                })
                .await
        ),
        ErrorCode::InvalidArgument.as_u16()
    );
    assert_eq!(
        code_of(
            carol
                .request(VmStatusRequest {
                    message_id: "vm-nothing".into()
                })
                .await
        ),
        ErrorCode::MessageNotFound.as_u16()
    );
}

/// The test node that owns ring key `key`, by `/admin/where`.
async fn owner_of<'a>(nodes: &'a [TestNode], key: &str) -> &'a TestNode {
    let place = nodes[0].admin(&format!("/admin/where?key={key}")).await;
    let http = place["owner_http_addr"]
        .as_str()
        .expect("owner address")
        .to_string();
    nodes
        .iter()
        .find(|n| n.http.to_string() == http)
        .unwrap_or_else(|| panic!("no test node at {http}"))
}

/// Retries `request` while the cluster answers `5001` (a failover under way).
async fn retrying<T, F, Fut>(what: &str, mut request: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        match request().await {
            Ok(answer) => return answer,
            Err(error) if tokio::time::Instant::now() < deadline => {
                eprintln!("{what}: {error}; again");
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            Err(error) => panic!("{what}: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_the_kill_of_their_owner_and_the_recipients_owner() {
    let dir = tempfile::tempdir().expect("dir");
    let nodes = three_node_cluster(dir.path()).await;
    let audio = sample();
    // Messages until one is owned by the node that owns bob's user actor too.
    let bob_owner = owner_of(&nodes, "user/bob").await.http;
    let mut sent = Vec::new();
    let mut doomed = None;
    for i in 0..12 {
        let alice = client(&nodes[i % 3], "alice").await;
        let id = send(&alice, &["bob"]).await;
        let state = chunk(&alice, &id, 0, &audio, true).await.expect("upload");
        assert_eq!(state.status, VmUploadStatus::Complete);
        if owner_of(&nodes, &format!("vm/{id}")).await.http == bob_owner {
            doomed = Some(id.clone());
        }
        sent.push(id);
        if doomed.is_some() && sent.len() >= 3 {
            break;
        }
    }
    let doomed = doomed.expect("a message owned by bob's owner among 12");
    let [a, b, c] = nodes;
    let (victim, survivors): (TestNode, Vec<TestNode>) = if a.http == bob_owner {
        (a, vec![b, c])
    } else if b.http == bob_owner {
        (b, vec![a, c])
    } else {
        (c, vec![a, b])
    };
    eprintln!(
        "killing the owner of {doomed} and of user/bob: {}",
        victim.http
    );
    victim.kill().await;
    for node in &survivors {
        let bob = client(node, "bob").await;
        let fetched = retrying("fetch after the kill", || async {
            let mut bytes = Vec::new();
            loop {
                let answer = bob
                    .request(VmFetchRequest {
                        message_id: doomed.clone(),
                        offset: bytes.len() as u64,
                        length: None,
                        wait_ms: None,
                    })
                    .await?;
                let piece = unb64(&answer.data);
                bytes.extend_from_slice(&piece);
                if piece.is_empty() || bytes.len() as u64 >= answer.acked {
                    return Ok((bytes, answer.status));
                }
            }
        })
        .await;
        assert_eq!(fetched.1, VmUploadStatus::Complete);
        assert_eq!(fetched.0, audio, "bit-exact after the owner was killed");
        let page = retrying("sync after the kill", || {
            bob.request(VmSyncRequest {
                device: "phone".into(),
                after: 0,
                limit: Some(200),
            })
        })
        .await;
        let ids: Vec<&str> = page.entries.iter().map(|e| e.message_id.as_str()).collect();
        for id in &sent {
            assert_eq!(
                ids.iter().filter(|i| **i == id.as_str()).count(),
                1,
                "{id} is in bob's inbox exactly once: {ids:?}"
            );
        }
        let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
        let gapless: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, gapless, "bob's inbox numbers are gapless");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_off_resumes_on_another_node_and_curl_plays_it_by_range() {
    let dir = tempfile::tempdir().expect("dir");
    let [a, b, _c] = three_node_cluster(dir.path()).await;
    let audio = sample();
    let first = client(&a, "frank").await;
    let id = send(&first, &["grace"]).await;
    chunk(&first, &id, 0, &audio[..900], false)
        .await
        .expect("first half");
    drop(first);
    // A browser-like reader while the upload is cut off: the stored bytes, size unknown.
    let grace_token = common::token("grace");
    let curl = |range: &str| {
        let output = std::process::Command::new("curl")
            .args(["--silent", "--include", "--range", range, "-H"])
            .arg(format!("Authorization: Bearer {grace_token}"))
            .arg(format!("http://{}/vm/{id}", b.http))
            .output()
            .expect("curl (apt-get install curl)");
        assert!(output.status.success(), "curl failed");
        output.stdout
    };
    let head_and_body = |response: &[u8]| {
        let at = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("head");
        (
            String::from_utf8_lossy(&response[..at]).to_lowercase(),
            response[at + 4..].to_vec(),
        )
    };
    let (head, body) = head_and_body(&curl("0-99"));
    assert!(head.starts_with("http/1.1 206"), "{head}");
    assert!(head.contains("content-range: bytes 0-99/*"), "{head}");
    assert!(
        head.contains("content-type: audio/ogg; codecs=opus"),
        "{head}"
    );
    assert_eq!(body, audio[..100]);
    // The sender comes back on another node, asks where it stands and continues there.
    let again = client(&b, "frank").await;
    let status = again
        .request(VmStatusRequest {
            message_id: id.clone(),
        })
        .await
        .expect("status");
    assert_eq!(status.status, VmUploadStatus::Uploading);
    assert!(status.acked > 0 && status.acked <= 900);
    // Grace waits for the next bytes longer than one inter-node call lasts (5 s).
    let grace = client(&b, "grace").await;
    let waiting = {
        let grace = grace.requester();
        let id = id.clone();
        let at = status.acked;
        tokio::spawn(async move {
            grace
                .request(VmFetchRequest {
                    message_id: id,
                    offset: at,
                    length: None,
                    wait_ms: Some(25_000),
                })
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;
    let done = chunk(
        &again,
        &id,
        status.acked,
        &audio[status.acked as usize..],
        true,
    )
    .await
    .expect("the rest");
    assert_eq!(done.status, VmUploadStatus::Complete);
    assert_eq!(done.acked, audio.len() as u64);
    let waited = waiting
        .await
        .expect("task")
        .expect("the long wait is answered");
    let piece = unb64(&waited.data);
    assert!(
        !piece.is_empty(),
        "the waiting fetch got the bytes sent 7 s later"
    );
    assert_eq!(
        piece[..],
        audio[status.acked as usize..status.acked as usize + piece.len()]
    );
    // Once complete the size is known; ranges put together give the file.
    let mut whole = Vec::new();
    let total = audio.len();
    for start in (0..total).step_by(700) {
        let end = (start + 699).min(total - 1);
        let (head, body) = head_and_body(&curl(&format!("{start}-{end}")));
        assert!(
            head.contains(&format!("content-range: bytes {start}-{end}/{total}")),
            "{head}"
        );
        whole.extend_from_slice(&body);
    }
    assert_eq!(whole, audio, "the ranges put together are the message");
    let (head, _) = head_and_body(&curl(&format!("{total}-")));
    assert!(head.starts_with("http/1.1 416"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upload_fails_and_messages_past_retention_are_gone_from_every_node() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("chorus.toml");
    std::fs::write(
        &config,
        "[voicemail]\nupload_idle_ms = 1500\nretention_ms = 10000\n",
    )
    .expect("config");
    let nodes =
        three_node_cluster_with(dir.path(), &["--config", config.to_str().expect("utf-8")]).await;
    let audio = sample();
    let henry = client(&nodes[0], "henry").await;
    let mut ivy = client(&nodes[1], "ivy").await;

    // An upload that stops: the server fails it, and the recipient's state says so.
    let stalled = send(&henry, &["ivy"]).await;
    chunk(&henry, &stalled, 0, &audio[..700], false)
        .await
        .expect("first chunk");
    let failed = expect_event(&mut ivy, "vm.state failed", |e| match e {
        Event::VmState(s)
            if s.message_id == stalled && s.state.upload == VmUploadStatus::Failed =>
        {
            Some(s.clone())
        }
        _ => None,
    })
    .await;
    assert!(failed.state.bytes > 0);
    let status = henry
        .request(VmStatusRequest {
            message_id: stalled.clone(),
        })
        .await
        .expect("status");
    assert_eq!(status.status, VmUploadStatus::Failed);
    assert_eq!(
        code_of(
            chunk(
                &henry,
                &stalled,
                status.acked,
                &audio[status.acked as usize..],
                true
            )
            .await
        ),
        ErrorCode::UploadClosed.as_u16()
    );

    // A complete message is there, then past retention it is gone: no node serves it and
    // no inbox lists it.
    let kept = send(&henry, &["ivy"]).await;
    chunk(&henry, &kept, 0, &audio, true)
        .await
        .expect("whole message");
    // Retention is 10 s: poll for up to a minute.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let mut gone = true;
        for node in &nodes {
            let reader = client(node, "ivy").await;
            for id in [&stalled, &kept] {
                let fetched = reader
                    .request(VmFetchRequest {
                        message_id: id.to_string(),
                        offset: 0,
                        length: None,
                        wait_ms: None,
                    })
                    .await;
                gone &= matches!(fetched, Err(ClientError::Server(b)) if b.code == ErrorCode::MessageNotFound.as_u16());
            }
            let page = reader
                .request(VmSyncRequest {
                    device: "phone".into(),
                    after: 0,
                    limit: None,
                })
                .await;
            gone &= page.is_ok_and(|p| p.entries.is_empty() && p.last_seq == 2);
        }
        if gone {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the messages past retention are not gone everywhere after a minute"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    // Each copy is deleted where it was held: two messages, each on two nodes at least.
    // Every node sweeps its own copies, so a replica's may go a sweep after the owner's.
    loop {
        let mut expired = 0.0;
        for node in &nodes {
            expired += node
                .metric("chorus_vm_messages_expired_total")
                .await
                .unwrap_or(0.0);
        }
        if expired >= 4.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{expired} copies deleted after a minute, not 4"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_message_reaches_every_member_on_every_node() {
    use chorus_protocol::{VmGroupCreateRequest, VmGroupInfoRequest};
    let dir = tempfile::tempdir().expect("dir");
    let [a, b, c] = three_node_cluster(dir.path()).await;
    let audio = sample();
    let ann = client(&a, "ann").await;
    let mut ben = client(&b, "ben").await;
    let mut cat = client(&c, "cat").await;
    let dan = client(&c, "dan").await;
    let group = ann
        .request(VmGroupCreateRequest {
            members: vec!["ben".into(), "cat".into()],
            name: Some("Band".into()),
        })
        .await
        .expect("vm.group_create");
    assert_eq!(group.members, ["ann", "ben", "cat"]);
    // Read at once through another node.
    let seen = cat
        .request(VmGroupInfoRequest {
            group_id: group.group_id.clone(),
        })
        .await
        .expect("vm.group_info");
    assert_eq!(seen, group);
    let sent = ann
        .request(VmSendRequest {
            to: vec![],
            group: Some(group.group_id.clone()),
        })
        .await
        .expect("vm.send to the group");
    assert_eq!(sent.conversation, group.conversation);
    chunk(&ann, &sent.message_id, 0, &audio, true)
        .await
        .expect("upload");
    for (who, member) in [("ben", &mut ben), ("cat", &mut cat)] {
        let entry = expect_event(member, "vm.message for the group", |e| match e {
            Event::VmMessage(entry) if entry.message_id == sent.message_id => Some(entry.clone()),
            _ => None,
        })
        .await;
        assert_eq!(entry.conversation, group.conversation, "{who}");
        assert_eq!(fetch_all(member, &sent.message_id).await, audio, "{who}");
        let history = member
            .request(VmHistoryRequest {
                conversation: group.conversation.clone(),
                before: None,
                limit: None,
            })
            .await
            .expect("history");
        assert_eq!(history.entries.len(), 1, "{who}");
    }
    // Not a member: the group is not there for dan.
    assert_eq!(
        code_of(
            dan.request(VmGroupInfoRequest {
                group_id: group.group_id.clone()
            })
            .await
        ),
        ErrorCode::MessageNotFound.as_u16()
    );
    assert_eq!(
        code_of(
            dan.request(VmSendRequest {
                to: vec![],
                group: Some(group.group_id.clone())
            })
            .await
        ),
        ErrorCode::MessageNotFound.as_u16()
    );
}
