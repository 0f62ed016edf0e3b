//! Voice messages (SPEC M1-M6) over real node processes: a three-node cluster on
//! loopback, users on different nodes, chunked uploads, fetch while uploading, inbox sync
//! and state across devices, history, and every refusal with its documented code.

mod common;

use std::path::PathBuf;

use base64::Engine as _;
use chorus_node::client::{Client, ClientError};
use chorus_protocol::{
    ErrorCode, Event, VmCancelRequest, VmChunkRequest, VmFetchRequest, VmHistoryRequest,
    VmPlayRequest, VmReadRequest, VmSendRequest, VmStatusRequest, VmSyncRequest, VmUploadStatus,
};
use common::{expect_event, three_node_cluster, TestNode};

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
        code_of(carol.request(VmSendRequest { to: vec![] }).await),
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
