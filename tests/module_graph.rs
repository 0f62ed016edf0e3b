//! The node's modules (`node/src/server/`) import one way: no import cycle between
//! them. Each file is a module; an arrow runs from a module to every module a path in it
//! names (`use super::x`, `crate::server::x::Y`, `x::f()` for a child `x`, a parent's item
//! such as `super::Node`, a child's item re-exported by a folder's `mod.rs`). So a folder's
//! `mod.rs` declares and re-exports; its children name each other by their own paths.
//!
//! `cargo test --test module_graph -- --nocapture` prints the graph, one line per module
//! with the modules it imports, from the lowest layer up.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A module path from `server`, e.g. `["server", "rooms", "route"]`.
type ModPath = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn module_of(base: &Path, file: &Path) -> ModPath {
    let relative = file.strip_prefix(base).expect("under base");
    let mut path = vec!["server".to_string()];
    for part in relative.iter() {
        let part = part.to_string_lossy();
        if let Some(stem) = part.strip_suffix(".rs") {
            if stem != "mod" {
                path.push(stem.to_string());
            }
        } else {
            path.push(part.to_string());
        }
    }
    path
}

/// The code of a file without comments, string literals and its `#[cfg(test)]` part.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(at) => &text[..at],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let line = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        // Drop string literals (paths in messages and docs are not imports).
        let mut in_string = false;
        let mut previous = ' ';
        for c in line.chars() {
            if c == '"' && previous != '\\' {
                in_string = !in_string;
            } else if !in_string {
                out.push(c);
            }
            previous = c;
        }
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path in `code` of the form `a::b::c` (with `use a::{b, c::d}` groups expanded
/// one level deep), as segments.
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let mut paths = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !is_ident(chars[i]) || (i > 0 && (is_ident(chars[i - 1]) || chars[i - 1] == ':')) {
            i += 1;
            continue;
        }
        let mut segments = Vec::new();
        let mut j = i;
        loop {
            let start = j;
            while j < chars.len() && is_ident(chars[j]) {
                j += 1;
            }
            segments.push(chars[start..j].iter().collect::<String>());
            if j + 2 < chars.len() && chars[j] == ':' && chars[j + 1] == ':' {
                j += 2;
                if chars[j] == '{' {
                    // A group: each item's first segment.
                    let close = chars[j..].iter().position(|&c| c == '}').map(|p| j + p);
                    if let Some(close) = close {
                        let inner: String = chars[j + 1..close].iter().collect();
                        for item in inner.split(',') {
                            let first: String =
                                item.trim().chars().take_while(|&c| is_ident(c)).collect();
                            if !first.is_empty() {
                                let mut path = segments.clone();
                                path.push(first);
                                paths.push(path);
                            }
                        }
                        j = close;
                    }
                    segments.clear();
                    break;
                }
                if j < chars.len() && is_ident(chars[j]) {
                    continue;
                }
            }
            break;
        }
        if segments.len() > 1 {
            paths.push(segments);
        }
        i = j.max(i + 1);
    }
    paths
}

/// The module a path written in `from` names, if it is one of `modules` (the longest
/// known prefix of the absolute path).
fn target(from: &ModPath, path: &[String], modules: &BTreeSet<ModPath>) -> Option<ModPath> {
    let mut absolute: Vec<String> = match path[0].as_str() {
        "crate" => path[1..].to_vec(),
        "self" => {
            let mut a = from.clone();
            a.extend_from_slice(&path[1..]);
            a
        }
        "super" => {
            let mut a = from.clone();
            let mut rest = path;
            while rest.first().is_some_and(|s| s == "super") {
                a.pop();
                rest = &rest[1..];
            }
            a.extend_from_slice(rest);
            a
        }
        _ => {
            // A child module of `from` named without `self::`.
            let mut a = from.clone();
            a.extend_from_slice(path);
            a
        }
    };
    while !absolute.is_empty() {
        if modules.contains(&absolute) {
            return Some(absolute);
        }
        absolute.pop();
    }
    None
}

fn graph() -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let base = Path::new(ROOT).join("node/src/server");
    let mut files = Vec::new();
    rust_files(&base, &mut files);
    let modules: BTreeSet<ModPath> = files.iter().map(|f| module_of(&base, f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let from = module_of(&base, file);
        let code = code_of(&std::fs::read_to_string(file).expect("read"));
        let mut to = BTreeSet::new();
        for path in paths_in(&code) {
            if let Some(target) = target(&from, &path, &modules) {
                if target != from {
                    to.insert(target);
                }
            }
        }
        graph.insert(from, to);
    }
    graph
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<ModPath>> {
    struct State<'a> {
        graph: &'a BTreeMap<ModPath, BTreeSet<ModPath>>,
        index: BTreeMap<&'a ModPath, usize>,
        low: BTreeMap<&'a ModPath, usize>,
        stack: Vec<&'a ModPath>,
        on_stack: BTreeSet<&'a ModPath>,
        out: Vec<Vec<ModPath>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a ModPath) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in &s.graph[v] {
            let Some((w, _)) = s.graph.get_key_value(w) else {
                continue;
            };
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v) {
            visit(&mut state, v);
        }
    }
    state.out
}

/// Each module's layer: 0 for one that imports nothing here, else one above the highest
/// module it imports (cycles cut).
fn layers(graph: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> BTreeMap<ModPath, usize> {
    let mut layer: BTreeMap<ModPath, usize> = graph.keys().map(|k| (k.clone(), 0)).collect();
    for _ in 0..graph.len() {
        let mut changed = false;
        for (from, to) in graph {
            let above = to.iter().filter_map(|t| layer.get(t)).map(|l| l + 1).max();
            let new = above.unwrap_or(0).min(graph.len());
            if new > layer[from] {
                layer.insert(from.clone(), new);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    layer
}

#[test]
fn the_node_modules_import_one_way() {
    let graph = graph();
    assert!(graph.len() > 10, "the node's modules were not found");
    let layer = layers(&graph);
    let mut order: Vec<&ModPath> = graph.keys().collect();
    order.sort_by_key(|m| (layer[*m], (*m).clone()));
    let arrows: usize = graph.values().map(BTreeSet::len).sum();
    println!("{} modules, {arrows} arrows", graph.len());
    for module in order {
        let to: Vec<String> = graph[module].iter().map(|t| t.join("::")).collect();
        println!(
            "layer {:2}  {:32} -> {}",
            layer[module],
            module.join("::"),
            to.join(", ")
        );
    }
    let cycles = cycles(&graph);
    for cycle in &cycles {
        let names: Vec<String> = cycle.iter().map(|m| m.join("::")).collect();
        println!("cycle: {}", names.join(" <-> "));
    }
    assert!(
        cycles.is_empty(),
        "{} import cycle(s) between the node's modules (see the output)",
        cycles.len()
    );
}

#[test]
fn the_path_reader_sees_groups_and_parents() {
    let code = code_of("use super::{a, b::C};\nfn f() { super::Node::x(); } // crate::z::q\n");
    let paths = paths_in(&code);
    assert!(paths.contains(&vec!["super".to_string(), "a".to_string()]));
    assert!(paths.contains(&vec!["super".to_string(), "b".to_string()]));
    assert!(paths.iter().any(|p| p[..2] == ["super", "Node"]));
    assert!(!paths.iter().any(|p| p.contains(&"z".to_string())));
    let from = vec![
        "server".to_string(),
        "rooms".to_string(),
        "route".to_string(),
    ];
    let modules: BTreeSet<ModPath> = [
        vec!["server".to_string()],
        vec!["server".to_string(), "rooms".to_string()],
        from.clone(),
    ]
    .into_iter()
    .collect();
    let parent = target(
        &from,
        &["super".into(), "super".into(), "Node".into()],
        &modules,
    );
    assert_eq!(parent, Some(vec!["server".to_string()]));
}
