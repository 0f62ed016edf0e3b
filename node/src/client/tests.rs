//! Client behaviour against a scripted in-process server (real sockets, no node).
//!
//! Each test accepts the client's connections itself and plays the server's side of the
//! protocol frame by frame, so it can misbehave precisely: answer out of order, drop the
//! connection mid-request, replay duplicates, close with an auth code.

use std::time::Duration;

use bytes::Bytes;
use chorus_protocol::{
    decode_frame, encode_notification, encode_request, encode_response_error, encode_response_ok,
    AuthRequest, AuthResponse, CommentEvent, Encoding, ErrorBody, ErrorCode, Event, Frame,
    FrameLimits, PingRequest, RequestFrame, ResponseFrame, ResumeOutcome, RoomCommentRequest,
    RoomCommentResponse, RoomInfoRequest,
};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::*;

const STEP: Duration = Duration::from_secs(5);

/// Accepts WebSocket connections and hands them to the test.
async fn mock_server() -> (String, mpsc::Receiver<ServerSide>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                continue;
            };
            if tx
                .send(ServerSide {
                    ws,
                    encoding: Encoding::MsgPack,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    (url, rx)
}

/// The server's end of one connection.
struct ServerSide {
    ws: WebSocketStream<TcpStream>,
    /// Encoding of the last frame received (replies use it).
    encoding: Encoding,
}

impl ServerSide {
    async fn recv(&mut self) -> Frame {
        loop {
            let message = tokio::time::timeout(STEP, self.ws.next())
                .await
                .expect("a frame from the client in time")
                .expect("connection open")
                .expect("valid message");
            let (encoding, bytes) = match message {
                Message::Binary(b) => (Encoding::MsgPack, b),
                Message::Text(t) => (Encoding::Json, Bytes::copy_from_slice(t.as_bytes())),
                _ => continue,
            };
            self.encoding = encoding;
            return decode_frame(encoding, &bytes, &FrameLimits::default()).expect("decodable");
        }
    }

    async fn recv_request(&mut self) -> RequestFrame {
        match self.recv().await {
            Frame::Request(r) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    async fn recv_response(&mut self) -> ResponseFrame {
        match self.recv().await {
            Frame::Response(r) => r,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    async fn send(&mut self, bytes: Bytes) {
        let message = match self.encoding {
            Encoding::MsgPack => Message::Binary(bytes),
            Encoding::Json => Message::text(String::from_utf8(bytes.to_vec()).expect("utf8")),
        };
        self.ws.send(message).await.expect("send");
    }

    async fn ok<B: serde::Serialize>(&mut self, seq: u64, body: &B) {
        let bytes = encode_response_ok(self.encoding, seq, body).expect("encode");
        self.send(bytes).await;
    }

    async fn error(&mut self, seq: u64, error: ErrorBody) {
        let bytes = encode_response_error(self.encoding, seq, &error).expect("encode");
        self.send(bytes).await;
    }

    async fn notify(&mut self, seq: u64, event: &Event) {
        let bytes = encode_notification(self.encoding, seq, event.kind(), &event.body_json())
            .expect("encode");
        self.send(bytes).await;
    }

    /// Reads `auth` and accepts it; returns the request.
    async fn accept_auth(
        &mut self,
        session_id: &str,
        outcome: ResumeOutcome,
        notification_seq: u64,
    ) -> AuthRequest {
        self.accept_auth_pinging(session_id, outcome, notification_seq, 30_000)
            .await
    }

    /// Like `accept_auth`, announcing a ping interval.
    async fn accept_auth_pinging(
        &mut self,
        session_id: &str,
        outcome: ResumeOutcome,
        notification_seq: u64,
        ping_interval_ms: u64,
    ) -> AuthRequest {
        let request = self.recv_request().await;
        assert_eq!(request.kind, "auth");
        let auth: AuthRequest = request.body.decode("auth").expect("auth body");
        self.ok(
            request.seq,
            &AuthResponse {
                protocol_version: 1,
                user_id: "alice".into(),
                session_id: session_id.into(),
                resume: outcome,
                notification_seq,
                node: "mock".into(),
                ping_interval_ms,
                resume_window_ms: 60_000,
            },
        )
        .await;
        auth
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let _ = self
            .ws
            .close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.to_string().into(),
            }))
            .await;
    }
}

fn comment(id: u64) -> Event {
    Event::Comment(CommentEvent {
        room_id: "r1".into(),
        comment_id: id,
        user_id: "bob".into(),
        text: format!("comment {id}"),
        at_ms: 1,
    })
}

fn fast_config(url: &str) -> ClientConfig {
    let mut config = ClientConfig::new(url, "token");
    config.reconnect.initial_backoff_ms = 10;
    config.reconnect.max_backoff_ms = 50;
    config.request_timeout_ms = 5_000;
    config
}

async fn connect(
    config: ClientConfig,
    server: &mut mpsc::Receiver<ServerSide>,
) -> (Client, ServerSide) {
    let (client, side) = tokio::join!(Client::connect(config), async {
        let mut side = server.recv().await.expect("connection");
        side.accept_auth("s1", ResumeOutcome::New, 0).await;
        side
    });
    (client.expect("connected"), side)
}

async fn next_event(client: &mut Client) -> ClientEvent {
    tokio::time::timeout(STEP, client.next_event())
        .await
        .expect("an event in time")
        .expect("client open")
}

#[tokio::test]
async fn responses_are_matched_by_sequence_number_even_out_of_order() {
    let (url, mut server) = mock_server().await;
    let (client, mut side) = connect(fast_config(&url), &mut server).await;
    assert_eq!(client.session_id(), "s1");
    assert_eq!(client.user_id(), "alice");
    let requester = client.requester();
    let first = tokio::spawn({
        let r = requester.clone();
        async move {
            r.request(RoomCommentRequest {
                room_id: "r1".into(),
                text: "one".into(),
                request_id: None,
            })
            .await
        }
    });
    let a = side.recv_request().await;
    let second = tokio::spawn(async move {
        requester
            .request(RoomInfoRequest {
                room_id: "nope".into(),
            })
            .await
    });
    let b = side.recv_request().await;
    assert!(
        b.seq > a.seq,
        "sequence numbers increase: {} then {}",
        a.seq,
        b.seq
    );
    assert_eq!(
        (a.kind.as_str(), b.kind.as_str()),
        ("room.comment", "room.info")
    );
    // Answer the second first.
    side.error(
        b.seq,
        ErrorBody::new(ErrorCode::RoomNotFound, "no such room"),
    )
    .await;
    side.ok(a.seq, &RoomCommentResponse { comment_id: 7 }).await;
    let first = first.await.expect("task").expect("ok response");
    assert_eq!(first.comment_id, 7);
    let err = second.await.expect("task").expect_err("error response");
    assert_eq!(err.error_code(), Some(ErrorCode::RoomNotFound), "{err}");
}

#[tokio::test]
async fn server_pings_are_answered_unless_the_client_plays_silent() {
    let (url, mut server) = mock_server().await;
    let (_client, mut side) = connect(fast_config(&url), &mut server).await;
    let ping = encode_request(Encoding::MsgPack, 1, "ping", &PingRequest {}).expect("encode");
    side.send(ping).await;
    let pong = side.recv_response().await;
    assert_eq!(pong.seq, 1);
    assert!(pong.result.is_ok());

    let mut silent = fast_config(&url);
    silent.answer_pings = false;
    let (mut client, mut side) = connect(silent, &mut server).await;
    side.send(encode_request(Encoding::MsgPack, 1, "ping", &PingRequest {}).expect("encode"))
        .await;
    // The next thing the server hears is a request, not a pong.
    let requester = client.requester();
    let pending = tokio::spawn(async move {
        requester
            .request(RoomInfoRequest {
                room_id: "r1".into(),
            })
            .await
    });
    let next = side.recv().await;
    assert!(
        matches!(next, Frame::Request(ref r) if r.kind == "room.info"),
        "{next:?}"
    );
    drop(side);
    let err = pending
        .await
        .expect("task")
        .expect_err("connection dropped");
    assert!(matches!(err, ClientError::ConnectionLost { .. }), "{err}");
    client.close().await;
}

#[tokio::test]
async fn notifications_are_decoded_and_unknown_kinds_surface_raw() {
    let (url, mut server) = mock_server().await;
    let (mut client, mut side) = connect(fast_config(&url), &mut server).await;
    side.notify(1, &comment(1)).await;
    let future = encode_notification(
        Encoding::MsgPack,
        2,
        "room.hologram",
        &serde_json::json!({"x": 1}),
    )
    .expect("encode");
    side.send(future).await;
    assert_eq!(
        next_event(&mut client).await,
        ClientEvent::Notification {
            seq: 1,
            event: comment(1)
        }
    );
    match next_event(&mut client).await {
        ClientEvent::RawNotification { seq, kind, body } => {
            assert_eq!((seq, kind.as_str()), (2, "room.hologram"));
            assert_eq!(body, serde_json::json!({"x": 1}));
        }
        other => panic!("expected a raw notification, got {other:?}"),
    }
    assert_eq!(client.last_seq(), 2);
    let line = ClientEvent::Notification {
        seq: 1,
        event: comment(1),
    }
    .to_json();
    assert_eq!(line["seq"], 1);
    assert_eq!(line["kind"], "room.comment");
    assert_eq!(line["body"]["text"], "comment 1");
}

#[tokio::test]
async fn reconnect_resumes_the_session_and_drops_duplicates() {
    let (url, mut server) = mock_server().await;
    let (mut client, mut side) = connect(fast_config(&url), &mut server).await;
    side.notify(1, &comment(1)).await;
    side.notify(2, &comment(2)).await;
    assert!(matches!(
        next_event(&mut client).await,
        ClientEvent::Notification { seq: 1, .. }
    ));
    assert!(matches!(
        next_event(&mut client).await,
        ClientEvent::Notification { seq: 2, .. }
    ));
    drop(side); // transport lost, no close frame

    let mut side = tokio::time::timeout(STEP, server.recv())
        .await
        .expect("reconnect in time")
        .expect("connection");
    let auth = side.accept_auth("s1", ResumeOutcome::Resumed, 2).await;
    let resume = auth.resume.expect("resume requested");
    assert_eq!((resume.session_id.as_str(), resume.last_seq), ("s1", 2));
    side.notify(2, &comment(2)).await; // duplicate: dropped
    side.notify(3, &comment(3)).await;

    assert!(matches!(
        next_event(&mut client).await,
        ClientEvent::Disconnected { code: None, .. }
    ));
    assert_eq!(
        next_event(&mut client).await,
        ClientEvent::Reconnected {
            outcome: ResumeOutcome::Resumed
        }
    );
    assert!(matches!(
        next_event(&mut client).await,
        ClientEvent::Notification { seq: 3, .. }
    ));
    assert_eq!(client.last_seq(), 3);
}

#[tokio::test]
async fn resync_starts_a_new_session_whose_notifications_are_not_dropped() {
    let (url, mut server) = mock_server().await;
    let (mut client, mut side) = connect(fast_config(&url), &mut server).await;
    side.notify(1, &comment(1)).await;
    side.notify(2, &comment(2)).await;
    assert!(matches!(
        next_event(&mut client).await,
        ClientEvent::Notification { seq: 1, .. }
    ));
    assert!(matches!(
        next_event(&mut client).await,
        ClientEvent::Notification { seq: 2, .. }
    ));
    side.close(4204, "ping timeout").await;
    drop(side);
    let mut side = tokio::time::timeout(STEP, server.recv())
        .await
        .expect("reconnect in time")
        .expect("connection");
    side.accept_auth("s2", ResumeOutcome::Resync, 0).await;
    side.notify(1, &comment(10)).await;
    assert_eq!(
        next_event(&mut client).await,
        ClientEvent::Disconnected {
            code: Some(4204),
            reason: "ping timeout".into()
        }
    );
    assert_eq!(
        next_event(&mut client).await,
        ClientEvent::Reconnected {
            outcome: ResumeOutcome::Resync
        }
    );
    assert_eq!(
        next_event(&mut client).await,
        ClientEvent::Notification {
            seq: 1,
            event: comment(10)
        }
    );
    assert_eq!(client.session_id(), "s2");
}

#[tokio::test]
async fn an_auth_close_is_final_and_no_reconnect_follows() {
    let (url, mut server) = mock_server().await;
    let (mut client, mut side) = connect(fast_config(&url), &mut server).await;
    side.close(ErrorCode::TokenExpired.close_code(), "token expired")
        .await;
    assert!(matches!(
        next_event(&mut client).await,
        ClientEvent::Disconnected {
            code: Some(4102),
            ..
        }
    ));
    assert!(matches!(
        next_event(&mut client).await,
        ClientEvent::Closed {
            code: Some(4102),
            ..
        }
    ));
    assert_eq!(next_event_or_none(&mut client).await, None);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), server.recv())
            .await
            .is_err(),
        "the client reconnected after a final close"
    );
    let err = client
        .request(RoomInfoRequest {
            room_id: "r1".into(),
        })
        .await
        .expect_err("closed client");
    assert!(matches!(err, ClientError::Closed { .. }), "{err}");
}

async fn next_event_or_none(client: &mut Client) -> Option<ClientEvent> {
    tokio::time::timeout(STEP, client.next_event())
        .await
        .expect("end of events in time")
}

#[tokio::test]
async fn a_server_that_stops_pinging_is_treated_as_gone() {
    let (url, mut server) = mock_server().await;
    let (client, side) = tokio::join!(Client::connect(fast_config(&url)), async {
        let mut side = server.recv().await.expect("connection");
        side.accept_auth_pinging("s1", ResumeOutcome::New, 0, 100)
            .await;
        side
    });
    let mut client = client.expect("connected");
    let mut side = side;
    // Pings keep it alive...
    for seq in 1..=4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        side.send(encode_request(Encoding::MsgPack, seq, "ping", &PingRequest {}).expect("encode"))
            .await;
        assert_eq!(side.recv_response().await.seq, seq);
    }
    assert!(client.try_next_event().is_none(), "still connected");
    // ...silence does not: 2.5 intervals later the client gives up on this connection.
    let started = std::time::Instant::now();
    match next_event(&mut client).await {
        ClientEvent::Disconnected { code: None, reason } => {
            assert!(reason.contains("no frame from the server"), "{reason}")
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    // And it reconnects to resume.
    let mut again = tokio::time::timeout(STEP, server.recv())
        .await
        .expect("reconnect in time")
        .expect("connection");
    let auth = again.accept_auth("s1", ResumeOutcome::Resumed, 0).await;
    assert!(auth.resume.is_some());
    drop(side);
}

#[tokio::test]
async fn a_refused_auth_fails_connect_with_the_server_error() {
    let (url, mut server) = mock_server().await;
    let (client, ()) = tokio::join!(Client::connect(fast_config(&url)), async {
        let mut side = server.recv().await.expect("connection");
        let request = side.recv_request().await;
        side.error(
            request.seq,
            ErrorBody::new(ErrorCode::InvalidToken, "bad signature"),
        )
        .await;
        side.close(ErrorCode::InvalidToken.close_code(), "bad signature")
            .await;
    });
    let err = client.expect_err("refused");
    assert!(
        matches!(err, ClientError::Auth(ref body) if body.code == 2001),
        "{err}"
    );
}

#[tokio::test]
async fn a_request_without_answer_times_out() {
    let (url, mut server) = mock_server().await;
    let mut config = fast_config(&url);
    config.request_timeout_ms = 200;
    let (client, mut side) = connect(config, &mut server).await;
    let started = std::time::Instant::now();
    let (result, _) = tokio::join!(
        client.request(RoomInfoRequest {
            room_id: "r1".into()
        }),
        side.recv_request()
    );
    let err = result.expect_err("no answer");
    assert!(
        matches!(
            err,
            ClientError::Timeout {
                timeout_ms: 200,
                ..
            }
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn reconnect_gives_up_after_the_attempt_limit() {
    let (url, mut server) = mock_server().await;
    let mut config = fast_config(&url);
    config.reconnect.attempts_max = 3;
    config.connect_timeout_ms = 300;
    let (mut client, side) = connect(config, &mut server).await;
    drop(side);
    drop(server); // the listener task ends at its next accept: later connects hang or fail
    assert!(matches!(
        next_event(&mut client).await,
        ClientEvent::Disconnected { .. }
    ));
    match next_event(&mut client).await {
        ClientEvent::Closed { reason, .. } => {
            assert!(reason.contains("3 reconnect attempts"), "{reason}")
        }
        other => panic!("expected Closed, got {other:?}"),
    }
}

#[tokio::test]
async fn json_text_encoding_sends_text_frames() {
    let (url, mut server) = mock_server().await;
    let mut config = fast_config(&url);
    config.encoding = Encoding::Json;
    let (client, mut side) = connect(config, &mut server).await;
    assert_eq!(
        side.encoding,
        Encoding::Json,
        "auth travelled as a JSON text frame"
    );
    let (result, ()) = tokio::join!(
        client.request(RoomCommentRequest {
            room_id: "r1".into(),
            text: "hi".into(),
            request_id: None
        }),
        async {
            let r = side.recv_request().await;
            assert_eq!(side.encoding, Encoding::Json);
            side.ok(r.seq, &RoomCommentResponse { comment_id: 1 }).await;
        }
    );
    assert_eq!(result.expect("ok").comment_id, 1);
}

#[tokio::test]
async fn low_level_connection_sends_raw_messages_and_reports_the_close() {
    let (url, mut server) = mock_server().await;
    let config = fast_config(&url);
    let (conn, side) = tokio::join!(Connection::connect(&url, &config), server.recv());
    let (mut conn, mut side) = (conn.expect("connect"), side.expect("accepted"));
    conn.send_raw(RawMessage::Text("{not json".into()))
        .await
        .expect("send");
    let message = side.ws.next().await.expect("open").expect("message");
    assert_eq!(message, Message::text("{not json"));
    side.close(4204, "ping timeout").await;
    let err = conn.recv().await.expect_err("closed");
    assert!(
        matches!(err, ClientError::Closed { code: Some(4204), ref reason } if reason == "ping timeout"),
        "{err}"
    );
    // And it stays closed.
    assert!(matches!(
        conn.recv().await,
        Err(ClientError::Closed {
            code: Some(4204),
            ..
        })
    ));
}

mod quic {
    //! The QUIC transport against a scripted quinn server with a throwaway CA.

    use std::sync::Arc;

    use super::*;

    struct Pki {
        ca_pem: String,
        server: quinn::ServerConfig,
    }

    fn pki() -> Pki {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .signed_by(&leaf_key, &issuer)
            .expect("leaf");
        let chain = vec![leaf.der().clone()];
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("cert");
        tls.alpn_protocols = vec![chorus_protocol::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("quic tls");
        Pki {
            ca_pem: ca.pem(),
            server: quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        }
    }

    async fn read_frame(recv: &mut quinn::RecvStream) -> Frame {
        let mut len = [0u8; 4];
        recv.read_exact(&mut len).await.expect("length");
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        recv.read_exact(&mut buf).await.expect("frame");
        decode_frame(Encoding::MsgPack, &buf, &FrameLimits::default()).expect("decodable")
    }

    async fn write_frame(send: &mut quinn::SendStream, bytes: &[u8]) {
        let mut out = (bytes.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        send.write_all(&out).await.expect("write");
    }

    #[tokio::test]
    async fn quic_client_authenticates_requests_and_receives_notifications() {
        let pki = pki();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, &pki.ca_pem).expect("write ca");
        let endpoint = quinn::Endpoint::server(pki.server, "127.0.0.1:0".parse().expect("addr"))
            .expect("endpoint");
        let url = format!("quic://{}", endpoint.local_addr().expect("addr"));

        let server = tokio::spawn(async move {
            let incoming = endpoint.accept().await.expect("incoming");
            let connection = incoming.await.expect("handshake");
            assert_eq!(
                connection
                    .handshake_data()
                    .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                    .and_then(|d| d.protocol),
                Some(chorus_protocol::ALPN.to_vec())
            );
            let (mut send, mut recv) = connection.accept_bi().await.expect("stream");
            let Frame::Request(auth) = read_frame(&mut recv).await else {
                panic!("expected auth")
            };
            assert_eq!(auth.kind, "auth");
            let ok = AuthResponse {
                protocol_version: 1,
                user_id: "alice".into(),
                session_id: "q1".into(),
                resume: ResumeOutcome::New,
                notification_seq: 0,
                node: "mock".into(),
                ping_interval_ms: 30_000,
                resume_window_ms: 60_000,
            };
            write_frame(
                &mut send,
                &encode_response_ok(Encoding::MsgPack, auth.seq, &ok).expect("enc"),
            )
            .await;
            let Frame::Request(comment_req) = read_frame(&mut recv).await else {
                panic!("expected a request")
            };
            // Notification and response in one write: the client must split them.
            let mut both = Vec::new();
            for bytes in [
                encode_notification(
                    Encoding::MsgPack,
                    1,
                    "room.comment",
                    &comment(1).body_json(),
                )
                .expect("enc"),
                encode_response_ok(
                    Encoding::MsgPack,
                    comment_req.seq,
                    &RoomCommentResponse { comment_id: 1 },
                )
                .expect("enc"),
            ] {
                both.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                both.extend_from_slice(&bytes);
            }
            send.write_all(&both).await.expect("write");
            // Wait for the client to close.
            let closed = connection.closed().await;
            (endpoint, closed)
        });

        let mut config = ClientConfig::new(url.clone(), "token");
        config.ca_path = Some(ca_path.clone());
        let mut client = Client::connect(config).await.expect("connected over QUIC");
        assert_eq!(client.session_id(), "q1");
        let response = client
            .request(RoomCommentRequest {
                room_id: "r1".into(),
                text: "hello".into(),
                request_id: None,
            })
            .await
            .expect("comment");
        assert_eq!(response.comment_id, 1);
        assert_eq!(
            next_event(&mut client).await,
            ClientEvent::Notification {
                seq: 1,
                event: comment(1)
            }
        );
        client.close().await;
        let (_endpoint, closed) = tokio::time::timeout(STEP, server)
            .await
            .expect("server done")
            .expect("server task");
        assert!(
            matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code.into_inner() == 1000),
            "{closed:?}"
        );
    }

    #[tokio::test]
    async fn an_untrusted_server_certificate_is_a_tls_error() {
        let pki = pki();
        let other = pki_ca_only();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_path = dir.path().join("other-ca.pem");
        std::fs::write(&ca_path, other).expect("write ca");
        let endpoint = quinn::Endpoint::server(pki.server, "127.0.0.1:0".parse().expect("addr"))
            .expect("endpoint");
        let url = format!("quic://{}", endpoint.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            if let Some(incoming) = endpoint.accept().await {
                let _ = incoming.await;
            }
            endpoint
        });
        let mut config = ClientConfig::new(url, "token");
        config.ca_path = Some(ca_path);
        let err = Client::connect(config).await.expect_err("untrusted");
        assert!(matches!(err, ClientError::Tls(_)), "{err}");
        server.abort();
    }

    #[tokio::test]
    async fn a_quic_url_without_ca_or_with_a_missing_ca_file_is_refused_early() {
        let err = Client::connect(ClientConfig::new("quic://127.0.0.1:1", "t"))
            .await
            .expect_err("no ca");
        assert!(matches!(err, ClientError::Config(_)), "{err}");
        let mut config = ClientConfig::new("quic://127.0.0.1:1", "t");
        config.ca_path = Some("/nonexistent/ca.pem".into());
        let err = Client::connect(config).await.expect_err("missing ca");
        assert!(
            matches!(err, ClientError::Tls(ref m) if m.contains("/nonexistent/ca.pem")),
            "{err}"
        );
    }

    fn pki_ca_only() -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).expect("ca").pem()
    }
}
