//! The rules of the crate graph (docs/ARCHITECTURE.md, "Crates"), checked on the
//! sources:
//! - no crate under `services/` depends on another crate under `services/` (a service
//!   is not a library: what two services share is a crate under `crates/`);
//! - no crate under `crates/` depends on one under `services/`;
//! - inside every crate, the modules' `crate::` imports form no circle (a module's
//!   unit tests aside);
//! - a target built without its tests (`test = false`, which saves a test binary in
//!   every run) has no tests that would silently never run.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `[workspace.dependencies]` entries with a path: crate name → its directory.
fn internal_crates() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once('=')?;
            let path = rest.split("path = \"").nth(1)?.split('"').next()?;
            Some((name.trim().to_string(), path.to_string()))
        })
        .collect()
}

/// The internal crates `dir/Cargo.toml` depends on (dev-dependencies aside).
fn dependencies(dir: &str, internal: &BTreeMap<String, String>) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(dir).join("Cargo.toml")).unwrap();
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if section != "[dependencies]" {
            continue;
        }
        let name = line.split(['=', '.', ' ']).next().unwrap_or_default();
        if internal.contains_key(name) {
            out.push(name.to_string());
        }
    }
    out
}

#[test]
fn services_do_not_use_services_as_libraries() {
    let internal = internal_crates();
    assert!(
        internal.len() > 5,
        "read the workspace's crates: {internal:?}"
    );
    let mut wrong = Vec::new();
    for (name, dir) in &internal {
        let kind = dir.split('/').next().unwrap_or_default();
        if kind != "services" && kind != "crates" {
            continue;
        }
        for dep in dependencies(dir, &internal) {
            if internal[&dep].starts_with("services/") {
                wrong.push(format!(
                    "{name} ({dir}) depends on {dep} ({})",
                    internal[&dep]
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "a service is not a library; move what is shared into crates/:\n{}",
        wrong.join("\n")
    );
}

/// The top-level module a source file belongs to (`None`: the crate root).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The first path segment of every item a `crate::` path names in `text`, including
/// each of a group: `crate::{a, b::c}` gives `a` and `b`.
fn crate_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        // `shipperd_crate::` or `$crate::` are not this crate's paths.
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.push(first_segment(&item));
        } else {
            out.push(first_segment(rest));
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

fn first_segment(s: &str) -> String {
    s.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// A circle in `graph`, if there is one.
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|s| s == m).unwrap();
                    let mut circle = stack[from..].to_vec();
                    circle.push(m.clone());
                    return Some(circle);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0
            && let Some(c) = visit(n, graph, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

/// Module → the modules of the same crate it imports through `crate::`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(m) = module_of(src, f) else { continue };
        let text = std::fs::read_to_string(f).unwrap();
        // A module's unit tests may reach anywhere.
        let text = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default();
        // Doc links name modules without importing them.
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for used in crate_paths(&code) {
            if used != m && modules.contains(&used) {
                graph.entry(m.clone()).or_default().insert(used);
            }
        }
    }
    graph
}

#[test]
fn no_crate_has_an_import_circle() {
    let mut circles = Vec::new();
    let mut looked = 0;
    for dir in internal_crates().values() {
        let src = root().join(dir).join("src");
        if !src.is_dir() {
            continue;
        }
        looked += 1;
        if let Some(c) = find_circle(&module_graph(&src)) {
            circles.push(format!("{dir}: {}", c.join(" → ")));
        }
    }
    assert!(looked > 5);
    assert!(
        circles.is_empty(),
        "modules that import each other (move what both need into a module of its own):\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_are_meant_to() {
    assert_eq!(
        crate_paths(
            "use crate::{Error, ops, store::{A, B}};\nlet x = crate::auth::f(); shipperd_crate::x; $crate::y"
        ),
        ["Error", "ops", "store", "auth"]
    );
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(find_circle(&graph).unwrap(), ["a", "b", "c", "a"]);
    let mut fine = graph.clone();
    fine.remove("c");
    assert_eq!(find_circle(&fine), None);
}

/// The `test = false` targets of `dir/Cargo.toml`: the sources each covers (a `[lib]`
/// all of `src/`, a `[[bin]]` its file).
fn untested_targets(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let mut out = Vec::new();
    for section in text.split("\n[").skip(1) {
        let (head, body) = section.split_once('\n').unwrap_or((section, ""));
        if !body.lines().any(|l| l.replace(' ', "") == "test=false") {
            continue;
        }
        let path = body
            .lines()
            .find_map(|l| l.trim().strip_prefix("path = \""))
            .map(|p| p.trim_end_matches('"'));
        out.push(match (head.trim(), path) {
            ("lib]", _) => dir.join("src"),
            ("[bin]]", Some(p)) => dir.join(p),
            (h, p) => panic!("{}: test = false under [{h} (path {p:?})", dir.display()),
        });
    }
    out
}

#[test]
fn targets_built_without_tests_have_none() {
    let mut dirs: Vec<PathBuf> = internal_crates().values().map(|p| root().join(p)).collect();
    dirs.push(root().join("tests"));
    let mut untested = Vec::new();
    for dir in &dirs {
        untested.extend(untested_targets(dir));
    }
    assert!(
        untested.len() >= 4,
        "read the test = false targets: {untested:?}"
    );
    for target in untested {
        let mut files = Vec::new();
        if target.is_dir() {
            rust_files(&target, &mut files);
        } else {
            files.push(target.clone());
        }
        assert!(!files.is_empty(), "{} has no sources", target.display());
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            assert!(
                !text.contains("#[test]")
                    && !text.contains("::test]")
                    && !text.contains("cfg(test)"),
                "{} has tests, but its target is built with test = false: they would never run",
                f.display()
            );
        }
    }
}
