//! TLS for clients: `wss://` and `https://` on the node's public port, from a certificate
//! and key in files, renewed without a restart (on SIGHUP and when the files change). Real
//! `chorus serve` processes on 127.0.0.1 (ports from the OS), real `chorus client` runs,
//! and curl for HTTPS.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::{expect_line, TestNode, DEADLINE};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// A CA of its own and a certificate it signed for 127.0.0.1 and localhost.
struct Issued {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn issue(ca_name: &str) -> Issued {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("params");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).expect("leaf");
    Issued {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// Writes the pair as a renewal does: to new files, then renamed over the old ones.
fn install(issued: &Issued, cert: &Path, key: &Path) {
    for (path, text) in [(cert, &issued.cert_pem), (key, &issued.key_pem)] {
        let next = path.with_extension("next");
        std::fs::write(&next, text).expect("write");
        std::fs::rename(&next, path).expect("rename");
    }
}

fn write_ca(dir: &Path, name: &str, issued: &Issued) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, &issued.ca_pem).expect("write CA");
    path
}

fn client(url: &str, ca: &Path, user: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chorus"));
    command
        .args(["client", "--url", url, "--user", user, "--ca"])
        .arg(ca)
        .env("CHORUS_LOG", "warn")
        .kill_on_drop(true);
    command
}

async fn output(mut command: Command) -> Output {
    tokio::time::timeout(DEADLINE, command.output())
        .await
        .expect("the client ended in time")
        .expect("run chorus client")
}

fn wss(node: &TestNode) -> String {
    format!("wss://{}/ws", node.http)
}

/// A node serving the pair in `dir` (`tls.pem`, `tls-key.pem`), checking the files every
/// `interval_ms`.
async fn tls_node(dir: &Path, interval_ms: u64) -> TestNode {
    let config = dir.join(format!("chorus-{interval_ms}.toml"));
    std::fs::write(&config, format!("tls_reload_interval_ms = {interval_ms}\n")).expect("config");
    let cert = dir.join("tls.pem");
    let key = dir.join("tls-key.pem");
    TestNode::start(&[
        "--config",
        config.to_str().expect("utf8"),
        "--tls-cert",
        cert.to_str().expect("utf8"),
        "--tls-key",
        key.to_str().expect("utf8"),
    ])
    .await
}

/// Whether `chorus client` trusting `ca` gets a room created over `wss://` now.
async fn wss_works(node: &TestNode, ca: &Path) -> bool {
    let mut command = client(&wss(node), ca, "probe");
    command.args(["create-room", "probe", "-q"]);
    output(command).await.status.success()
}

async fn eventually_wss(node: &TestNode, ca: &Path, works: bool, what: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while wss_works(node, ca).await != works {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn clients_talk_over_wss_and_https_and_mistakes_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let issued = issue("Chorus test CA A");
    install(
        &issued,
        &dir.path().join("tls.pem"),
        &dir.path().join("tls-key.pem"),
    );
    let ca = write_ca(dir.path(), "ca-a.pem", &issued);
    let node = tls_node(dir.path(), 10_000).await;

    // Two users over wss://: one listens, the other speaks.
    let mut create = client(&wss(&node), &ca, "alice");
    create.args(["create-room", "Over TLS", "-q"]);
    let created = output(create).await;
    assert!(
        created.status.success(),
        "create-room over wss://: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let room = String::from_utf8(created.stdout)
        .expect("utf8")
        .trim()
        .to_string();
    let mut bob = client(&wss(&node), &ca, "bob")
        .args(["join", &room, "--for", "30"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn join");
    let mut lines = BufReader::new(bob.stdout.take().expect("stdout")).lines();
    tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("join response")
        .expect("read");
    let mut say = client(&wss(&node), &ca, "alice");
    say.args(["say", &room, "encrypted hello"]);
    let said = output(say).await;
    assert!(
        said.status.success(),
        "{}",
        String::from_utf8_lossy(&said.stderr)
    );
    expect_line(&mut lines, "bob's comment over wss://", |e| {
        e["kind"] == "room.comment" && e["body"]["text"] == "encrypted hello"
    })
    .await;
    let _ = bob.kill().await;

    // HTTPS: health from curl, trusting the same CA.
    let curl = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--cacert"])
        .arg(&ca)
        .arg(format!("https://{}/healthz", node.http))
        .output()
        .await
        .expect("curl (apt install curl)");
    assert!(
        curl.status.success(),
        "{}",
        String::from_utf8_lossy(&curl.stderr)
    );

    // ws:// to a TLS port: refused with the likely cause.
    let mut plain = client(&format!("ws://{}/ws", node.http), &ca, "alice");
    plain.args(["create-room", "plain", "-q"]);
    let plain = output(plain).await;
    assert!(!plain.status.success());
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(stderr.contains("try wss://"), "{stderr}");

    // A CA the certificate is not from: refused, saying what to give.
    let other = write_ca(dir.path(), "ca-b.pem", &issue("Chorus test CA B"));
    let mut untrusted = client(&wss(&node), &other, "alice");
    untrusted.args(["create-room", "untrusted", "-q"]);
    let untrusted = output(untrusted).await;
    assert!(!untrusted.status.success());
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(stderr.contains("--ca"), "{stderr}");
}

#[tokio::test]
async fn a_renewed_certificate_is_served_after_a_file_change_and_after_sighup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("tls.pem");
    let key = dir.path().join("tls-key.pem");
    let first = issue("Chorus test CA 1");
    install(&first, &cert, &key);
    let ca1 = write_ca(dir.path(), "ca-1.pem", &first);

    // File change: checked every 200 ms.
    let watching = tls_node(dir.path(), 200).await;
    assert!(
        wss_works(&watching, &ca1).await,
        "the first certificate is served"
    );
    let second = issue("Chorus test CA 2");
    let ca2 = write_ca(dir.path(), "ca-2.pem", &second);
    install(&second, &cert, &key);
    eventually_wss(&watching, &ca2, true, "the renewed certificate is served").await;
    assert!(
        !wss_works(&watching, &ca1).await,
        "the old one no longer is"
    );
    // A broken renewal (a key from elsewhere) keeps the working certificate.
    std::fs::write(&key, issue("Chorus test CA 3").key_pem).expect("write");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        wss_works(&watching, &ca2).await,
        "still the last good certificate"
    );
    drop(watching);

    // SIGHUP: a node that would check the files only hourly.
    install(&second, &cert, &key);
    let hourly = tls_node(dir.path(), 3_600_000).await;
    assert!(wss_works(&hourly, &ca2).await);
    install(&first, &cert, &key);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &hourly.pid().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    eventually_wss(&hourly, &ca1, true, "SIGHUP loads the new certificate").await;
    // The node took SIGHUP as a reload, not as a signal to end.
    assert!(wss_works(&hourly, &ca1).await);
}

#[tokio::test]
async fn a_node_with_a_bad_certificate_or_key_does_not_start_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("tls.pem");
    let key = dir.path().join("tls-key.pem");
    std::fs::write(&cert, issue("A").cert_pem).expect("write");
    std::fs::write(&key, issue("B").key_pem).expect("write");
    let serve = |extra: Vec<String>| {
        let data = dir.path().join("data");
        async move {
            let run = Command::new(env!("CARGO_BIN_EXE_chorus"))
                .args(["serve", "--data-dir"])
                .arg(&data)
                .args(["--http-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0"])
                .args(["--cluster-addr", "127.0.0.1:0"])
                .args(extra)
                .env("CHORUS_LOG", "warn")
                .kill_on_drop(true)
                .output();
            tokio::time::timeout(DEADLINE, run)
                .await
                .expect("ended in time")
                .expect("run chorus serve")
        }
    };
    let path = |p: &Path| p.to_str().expect("utf8").to_string();
    let mismatched = serve(vec![
        "--tls-cert".into(),
        path(&cert),
        "--tls-key".into(),
        path(&key),
    ])
    .await;
    assert!(!mismatched.status.success());
    let stderr = String::from_utf8_lossy(&mismatched.stderr);
    assert!(stderr.contains("does not fit the certificate"), "{stderr}");

    let alone = serve(vec!["--tls-cert".into(), path(&cert)]).await;
    assert!(!alone.status.success());
    let stderr = String::from_utf8_lossy(&alone.stderr);
    assert!(stderr.contains("both tls_cert and tls_key"), "{stderr}");
}
