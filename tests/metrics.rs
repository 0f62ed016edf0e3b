//! `docs/metrics.md` lists every metric: each name in the code is documented, each
//! documented name is in the code, and everything a running node exports is documented.
//! The Grafana dashboard and the alert rules in `ops/` use only documented metrics.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{create_room, join, say, TestNode};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Metric names in the reference's tables (the first cell, in backticks).
fn documented() -> BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docs/metrics.md")).expect("read");
    text.lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.starts_with("chorus_"))
        .map(str::to_string)
        .collect()
}

/// Metric names recorded in the code: the string after `counter!(`, `gauge!(` or
/// `histogram!(` (possibly on the next line).
fn in_code() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for dir in ["node/src", "actors/src", "cluster/src"] {
        visit(&Path::new(ROOT).join(dir), &mut |text| {
            for macro_name in ["counter!(", "gauge!(", "histogram!("] {
                for (at, _) in text.match_indices(macro_name) {
                    let rest = text[at + macro_name.len()..].trim_start();
                    if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) {
                        if name.starts_with("chorus_") {
                            names.insert(name.to_string());
                        }
                    }
                }
            }
        });
    }
    names
}

fn visit(dir: &Path, each: &mut impl FnMut(&str)) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            visit(&path, each);
        } else if path.extension().is_some_and(|e| e == "rs") {
            each(&std::fs::read_to_string(&path).expect("read source"));
        }
    }
}

#[test]
fn the_reference_lists_exactly_the_metrics_in_the_code() {
    let documented = documented();
    let code = in_code();
    assert!(code.len() > 40, "found the metrics in the code: {code:?}");
    let undocumented: Vec<_> = code.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&code).collect();
    assert!(
        undocumented.is_empty(),
        "in the code, not in docs/metrics.md: {undocumented:?}"
    );
    assert!(
        stale.is_empty(),
        "in docs/metrics.md, not in the code: {stale:?}"
    );
}

#[tokio::test]
async fn everything_a_node_exports_is_in_the_reference() {
    let node = TestNode::start(&[]).await;
    let client = node.client(&node.ws_url(), "alice").await;
    let room = create_room(&client, "metrics").await;
    join(&client, &room).await;
    say(&client, &room, "counted").await;
    let body = node.http_get("/metrics").await;
    let documented = documented();
    let exported: BTreeSet<String> = body
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|name| name.starts_with("chorus_"))
        .map(str::to_string)
        .collect();
    assert!(
        exported.contains("chorus_connections") && exported.contains("chorus_frames_in_total"),
        "the node exported its metrics: {exported:?}"
    );
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "exported, not in docs/metrics.md: {undocumented:?}"
    );
    // Every family has its HELP (from the reference): `promtool check metrics` lints it.
    let helped: BTreeSet<String> = body
        .lines()
        .filter_map(|line| line.strip_prefix("# HELP "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let without_help: Vec<_> = exported.difference(&helped).collect();
    assert!(without_help.is_empty(), "no HELP: {without_help:?}");
}

/// `chorus_…` metric names in `text` (histogram and summary series mapped to their
/// family).
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("chorus_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|family| family.ends_with("_seconds") || family.ends_with("_items"))
            .unwrap_or(name);
        names.insert(family.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_dashboard_and_the_alert_rules_use_documented_metrics() {
    let documented = documented();
    for file in [
        "ops/grafana/chorus-dashboard.json",
        "ops/prometheus/chorus-rules.yaml",
    ] {
        let text = std::fs::read_to_string(Path::new(ROOT).join(file)).expect("read");
        let used = names_in(&text);
        assert!(used.len() >= 5, "{file} uses metrics: {used:?}");
        let unknown: Vec<_> = used.difference(&documented).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses undocumented metrics: {unknown:?}"
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("ops/grafana/chorus-dashboard.json"))
            .expect("read"),
    )
    .expect("the dashboard is JSON");
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));
}
