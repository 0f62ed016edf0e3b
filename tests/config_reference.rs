//! `docs/configuration.md` is generated from the configuration code: every key of the
//! TOML file with its default (from `NodeConfig::default()`) and its meaning (the field's
//! doc comment). This test regenerates it and fails if the file differs; run it with
//! `CHORUS_UPDATE_DOCS=1` to write the file.

use std::collections::BTreeMap;
use std::path::Path;

use chorus_node::config::NodeConfig;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The structs whose fields are configuration keys: (source file, struct, key prefix).
const SECTIONS: &[(&str, &str, &str)] = &[
    ("node/src/config.rs", "NodeConfig", ""),
    ("node/src/config.rs", "LimitsConfig", "limits."),
    ("node/src/config.rs", "RainConfig", "rain."),
    ("node/src/config.rs", "VoicemailConfig", "voicemail."),
    ("actors/src/room.rs", "RoomConfig", "room."),
    ("actors/src/voice.rs", "VoiceConfig", "room.voice."),
    ("actors/src/polls.rs", "PollConfig", "room.polls."),
    ("actors/src/bullets.rs", "BulletConfig", "room.bullets."),
];

/// The doc comment of each `pub` field of `pub struct name` in `source`, in order.
fn field_docs(source: &str, name: &str) -> Vec<(String, String)> {
    let start = source
        .find(&format!("pub struct {name} {{"))
        .unwrap_or_else(|| panic!("struct {name}"));
    let body = &source[start..];
    let body = &body[..body.find("\n}").expect("struct end")];
    let mut fields = Vec::new();
    let mut doc = Vec::new();
    for line in body.lines().skip(1) {
        let line = line.trim();
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("pub ") {
            let field = rest.split(':').next().expect("field").trim().to_string();
            fields.push((field, doc.join(" ")));
            doc.clear();
        } else if !line.starts_with("#[") {
            doc.clear();
        }
    }
    fields
}

/// A default as the TOML file would say it.
fn render(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("`\"{s}\"`"),
        toml::Value::Array(items) if items.is_empty() => "`[]`".to_string(),
        other => format!("`{other}`"),
    }
}

fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
    for (key, value) in table {
        match value {
            toml::Value::Table(inner) => flatten(&format!("{prefix}{key}."), inner, out),
            other => {
                out.insert(format!("{prefix}{key}"), other.clone());
            }
        }
    }
}

fn generate() -> String {
    let defaults = toml::Table::try_from(NodeConfig::default()).expect("defaults serialize");
    let mut values = BTreeMap::new();
    flatten("", &defaults, &mut values);
    let mut text = String::from(
        "# Configuration reference\n\n\
         Generated from the configuration code by `tests/config_reference.rs` (run it with\n\
         `CHORUS_UPDATE_DOCS=1` after changing a field): every key of the TOML file that\n\
         `chorus serve --config FILE` reads, with its default and meaning. Tables are written\n\
         as `[limits]`, `[room]`, `[room.bullets]`, …; a key below `limits.x` goes under\n\
         `[limits]` as `x`. Flags override the file (`chorus serve --help`).\n",
    );
    let mut listed = 0;
    for (file, name, prefix) in SECTIONS {
        let source = std::fs::read_to_string(Path::new(ROOT).join(file)).expect("read source");
        let title = if prefix.is_empty() {
            "top level".to_string()
        } else {
            format!("`[{}]`", prefix.trim_end_matches('.'))
        };
        text.push_str(&format!(
            "\n## {title}\n\n| key | default | meaning |\n|---|---|---|\n"
        ));
        for (field, doc) in field_docs(&source, name) {
            let key = format!("{prefix}{field}");
            let default = match values.get(&key) {
                Some(value) => render(value),
                // A table of its own, listed in its section.
                None if values.keys().any(|k| k.starts_with(&format!("{key}."))) => continue,
                // Unset by default (an `Option`).
                None => "none".to_string(),
            };
            let doc = doc.replace('|', "\\|");
            text.push_str(&format!("| `{key}` | {default} | {doc} |\n"));
            listed += 1;
        }
    }
    assert!(listed >= values.len(), "every key with a default is listed");
    text
}

#[test]
fn the_configuration_reference_is_generated_from_the_code() {
    let path = Path::new(ROOT).join("docs/configuration.md");
    let generated = generate();
    if std::env::var_os("CHORUS_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &generated).expect("write docs/configuration.md");
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == generated,
        "docs/configuration.md is out of date: run `CHORUS_UPDATE_DOCS=1 cargo test --test config_reference`"
    );
}

#[test]
fn every_key_with_a_default_is_documented() {
    let defaults = toml::Table::try_from(NodeConfig::default()).expect("defaults serialize");
    let mut values = BTreeMap::new();
    flatten("", &defaults, &mut values);
    let generated = generate();
    for key in values.keys() {
        assert!(
            generated.contains(&format!("| `{key}` |")),
            "{key} has no row"
        );
    }
    // The keys come from the structs the file parses into: a typo in SECTIONS would
    // leave a section empty.
    assert!(values.len() > 60, "{} keys", values.len());
}
