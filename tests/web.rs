//! The web app in real Chromium against a real three-node cluster: tests/web/browser.mjs
//! (playwright-core) drives two browsers on two different nodes. Screenshots of every
//! screen, at phone and desktop width, go to `target/web-screenshots/`.
//!
//! Needs Node.js, `npm ci` in tests/web and Chromium (`/usr/bin/chromium`, or `CHROMIUM`):
//! `.ci/run` installs them and sets `CHORUS_WEB_REQUIRE=1`, so there a missing piece is a
//! failure; elsewhere the test says what is missing and passes without running.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::three_node_cluster;

/// What the browser run needs, or why it cannot run here.
fn missing() -> Option<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.exists() {
        return Some(format!(
            "no Chromium at {} (apt install chromium)",
            chromium.display()
        ));
    }
    if !root.join("tests/web/node_modules/playwright-core").exists() {
        return Some("no playwright-core (cd tests/web && npm ci)".into());
    }
    match std::process::Command::new("node").arg("--version").output() {
        Ok(output) if output.status.success() => None,
        _ => Some("no node (Node.js)".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_on_two_nodes_share_a_room() {
    if let Some(why) = missing() {
        assert!(
            std::env::var_os("CHORUS_WEB_REQUIRE").is_none(),
            "the browser tests are required here but cannot run: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = three_node_cluster(dir.path()).await;
    let urls: Vec<String> = nodes.iter().map(|n| format!("http://{}", n.http)).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shots = root.join("target/web-screenshots");
    let run = tokio::process::Command::new("node")
        .arg("browser.mjs")
        .current_dir(root.join("tests/web"))
        .env("CHORUS_WEB_URLS", urls.join(","))
        .env("CHORUS_WEB_SHOTS", &shots)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser run ended within 4 minutes")
        .expect("run node");
    let printed = String::from_utf8_lossy(&output.stdout);
    println!("{printed}");
    assert!(
        output.status.success(),
        "the browser run failed:\n{printed}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!printed.contains("FAIL"), "{printed}");
    for screen in ["signin", "rooms", "room"] {
        for width in ["phone", "desktop"] {
            let shot = shots.join(format!("{screen}-{width}.png"));
            assert!(shot.exists(), "no screenshot {}", shot.display());
        }
    }
}

/// curl's arguments for `POST /dev/token {"user": USER}` on `base`.
fn post_dev_token(base: &str, user: &str) -> Vec<String> {
    vec![
        "-X".into(),
        "POST".into(),
        "--data".into(),
        serde_json::json!({ "user": user }).to_string(),
        format!("{base}/dev/token"),
    ]
}

/// The page and its files come from the binary; development sign-in exists only with the
/// development secret, and its token signs a user in.
#[tokio::test]
async fn the_page_is_served_and_development_tokens_only_without_a_secret() {
    let curl = |args: Vec<String>| async move {
        let output = tokio::process::Command::new("curl")
            .args(["--silent", "--show-error", "--include"])
            .args(args)
            .output()
            .await
            .expect("curl");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let dev = common::TestNode::start(&[]).await;
    let base = format!("http://{}", dev.http);
    let page = curl(vec![format!("{base}/")]).await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("content-security-policy"), "{page}");
    assert!(page.contains("<title>Chorus</title>"), "{page}");
    for file in ["app.js", "client.js", "msgpack.js", "style.css"] {
        let asset = curl(vec![format!("{base}/app/{file}")]).await;
        assert!(asset.starts_with("HTTP/1.1 200"), "{file}: {asset}");
    }
    let missing = curl(vec![format!("{base}/app/nothing.js")]).await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let status = curl(vec![format!("{base}/dev/token")]).await;
    assert!(status.contains(r#"{"available":true}"#), "{status}");
    let minted = curl(post_dev_token(&base, "webby")).await;
    let body = minted.split("\r\n\r\n").nth(1).expect("a body");
    let token = serde_json::from_str::<serde_json::Value>(body).expect("JSON")["token"]
        .as_str()
        .expect("a token")
        .to_string();
    let mut config = chorus_node::client::ClientConfig::new(dev.ws_url(), token);
    config.ca_path = Some(dev.ca_path());
    let client = chorus_node::client::Client::connect(config)
        .await
        .expect("the minted token signs in");
    assert_eq!(client.user_id(), "webby");
    let bad = curl(post_dev_token(&base, "no spaces")).await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");

    let real = common::TestNode::start(&["--secret", "a-real-secret-of-enough-bytes"]).await;
    let base = format!("http://{}", real.http);
    let status = curl(vec![format!("{base}/dev/token")]).await;
    assert!(status.contains(r#"{"available":false}"#), "{status}");
    let refused = curl(post_dev_token(&base, "webby")).await;
    assert!(refused.starts_with("HTTP/1.1 404"), "{refused}");
    assert!(refused.contains("real secret"), "{refused}");
}
