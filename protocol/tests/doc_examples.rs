//! The JSON examples of `docs/protocol.md` (§4.3 and the worked example, §11) are frames
//! this implementation reads, and they carry every field it would send: each request,
//! response and notification is decoded as its kind's type, encoded back, and every field
//! of the re-encoded value (recursively) must be in the example. An edit that drops a field
//! from an example, or a field added to a type and not to the examples, fails here.

use chorus_protocol::{decode_frame, ClientRequest, Encoding, Event, Frame, FrameLimits};
use std::collections::HashMap;

const PROTOCOL: &str = include_str!("../../docs/protocol.md");

/// The JSON frames of the examples, with who sent them (`C` client, `S` server).
fn example_frames() -> Vec<(char, String)> {
    let mut frames = Vec::new();
    let mut section = "";
    let mut in_block = false;
    for line in PROTOCOL.lines() {
        if line.starts_with("### ") || line.starts_with("## ") {
            section = line;
        }
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        let wanted = section.starts_with("### 4.3") || section.starts_with("## 11.");
        if !in_block || !wanted {
            continue;
        }
        let (who, json) = if let Some(rest) = line.strip_prefix("C→ ") {
            ('C', rest)
        } else if let Some(rest) = line.strip_prefix("S→ ") {
            ('S', rest)
        } else {
            // §4.3: requests are the client's, the rest the server's.
            let who = if line.contains("\"type\":\"req\"") {
                'C'
            } else {
                'S'
            };
            (who, line)
        };
        if json.starts_with('{') {
            frames.push((who, json.to_string()));
        }
    }
    frames
}

/// The fields of `sent` (what this server sends) missing from `example`, as paths.
fn missing(
    sent: &serde_json::Value,
    example: &serde_json::Value,
    path: &str,
    out: &mut Vec<String>,
) {
    match (sent, example) {
        (serde_json::Value::Object(sent), serde_json::Value::Object(example)) => {
            for (key, value) in sent {
                match example.get(key) {
                    None => out.push(format!("{path}.{key}")),
                    Some(given) => missing(value, given, &format!("{path}.{key}"), out),
                }
            }
        }
        (serde_json::Value::Array(sent), serde_json::Value::Array(example)) => {
            for (i, (s, e)) in sent.iter().zip(example).enumerate() {
                missing(s, e, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_examples_are_frames_with_every_field() {
    let frames = example_frames();
    assert!(frames.len() >= 25, "examples not found ({})", frames.len());
    // The kind of each request by (sender, seq), to read its response.
    let mut kinds: HashMap<(char, u64), String> = HashMap::new();
    let mut problems = Vec::new();
    for (who, json) in &frames {
        let frame = decode_frame(Encoding::Json, json.as_bytes(), &FrameLimits::default())
            .unwrap_or_else(|e| panic!("not a frame ({e}): {json}"));
        let example: serde_json::Value = serde_json::from_str(json).expect("json");
        match frame {
            Frame::Request(request) => {
                kinds.insert((*who, request.seq), request.kind.clone());
                if let Err(error) = ClientRequest::decode(&request.kind, &request.body) {
                    problems.push(format!("{error}: {json}"));
                }
            }
            Frame::Response(response) => {
                // An error response reads without its request.
                let Ok(ok) = response.result else { continue };
                let asker = if *who == 'S' { 'C' } else { 'S' };
                let Some(kind) = kinds.get(&(asker, response.seq)) else {
                    problems.push(format!("no request for this response: {json}"));
                    continue;
                };
                if *who == 'C' {
                    continue; // a client's answer to a server ping: `{}`
                }
                match ClientRequest::response_json(kind, &ok) {
                    Ok(sent) => {
                        let mut gaps = Vec::new();
                        missing(&sent, &example["ok"], "ok", &mut gaps);
                        if !gaps.is_empty() {
                            problems.push(format!("{kind} response lacks {gaps:?}: {json}"));
                        }
                    }
                    Err(error) => problems.push(format!("{kind} response: {error}: {json}")),
                }
            }
            Frame::Notification(notification) => {
                match Event::decode(&notification.kind, &notification.body) {
                    Ok(event) => {
                        let mut gaps = Vec::new();
                        missing(&event.body_json(), &example["body"], "body", &mut gaps);
                        if !gaps.is_empty() {
                            problems.push(format!("{} lacks {gaps:?}: {json}", notification.kind));
                        }
                    }
                    Err(error) => problems.push(format!("{error}: {json}")),
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
