//! The plan of the house (issue 14), checked rather than described: every module of
//! the product imports only modules below it, and the product binary carries no
//! test kit. ARCHITECTURE.md draws the same layers; when a module moves, this table
//! and that drawing change in the same commit.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

/// Each product module and its layer, lowest first. A module may use a module of a
/// lower layer, or a module in its own tree (a parent or a child); nothing else.
const LAYERS: &[(&str, i8)] = &[
    // The floor: the error taxonomy (`ErrorClass`, `Classify`) that every module's
    // errors answer to, the leaves' included. It imports nothing of clinicsync.
    ("error", -1),
    // Leaves: no clinicsync imports but `error`.
    ("time", 0),
    ("textsafe", 0),
    ("filemode", 0),
    ("secret", 0),
    ("lock", 0),
    ("model", 0),
    ("synth", 0),
    ("allocator", 0),
    // Formats and identities.
    ("wire", 1),
    ("auth", 1),
    ("keys", 1),
    ("tls", 1),
    // State.
    ("store", 2),
    // The protocol: decides, touches only the store.
    ("engine", 3),
    // Peers' I/O: adapters and transports know nothing of the store or the engine.
    ("emr", 4),
    ("emr/fhir", 4),
    ("emr/openmrs", 4),
    ("transport", 4),
    // Flows between the store and a peer.
    ("emr/flow", 5),
    ("health", 5),
    ("remote", 6),
    ("sneakernet", 7),
    ("config", 8),
    // Roles.
    ("hub", 9),
    ("client", 9),
    ("metrics", 10),
    // Wiring and commands.
    ("daemon", 11),
    ("localnet", 11),
    ("cli", 12),
];

/// Rules the issue states in words, checked on their own so a violation names them.
const FORBIDDEN: &[(&str, &[&str])] = &[
    ("model", &["store", "engine", "transport", "cli", "config"]),
    ("wire", &["store", "engine", "transport", "cli", "config"]),
    (
        "engine",
        &["transport", "daemon", "config", "emr", "client", "hub"],
    ),
    ("transport", &["store", "engine", "config", "daemon"]),
];

fn module_of(file: &Path, src: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let rel = rel.to_string_lossy().to_string();
    rel.strip_suffix("/mod").unwrap_or(&rel).to_string()
}

/// The entry of [`LAYERS`] a module path belongs to (its longest listed prefix).
fn layer_of(module: &str) -> Option<(&'static str, i8)> {
    let mut parts: Vec<&str> = module.split('/').collect();
    while !parts.is_empty() {
        let m = parts.join("/");
        if let Some(&(name, l)) = LAYERS.iter().find(|(n, _)| *n == m) {
            return Some((name, l));
        }
        parts.pop();
    }
    None
}

/// The code of a file without comments and without its `#[cfg(test)]` module (unit
/// tests may reach anywhere).
fn product_code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::a::b` a file names, as module paths (`a/b` when that is a listed
/// module, else `a`), including the names inside `crate::{a, b::c}`.
fn imports(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + 7..];
        let paths: Vec<String> = if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end]
                .split(',')
                .map(|s| s.trim().to_string())
                .collect()
        } else {
            let end = after
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(after.len());
            vec![after[..end].to_string()]
        };
        for p in paths {
            let segs: Vec<&str> = p.split("::").filter(|s| !s.is_empty()).collect();
            if segs.is_empty() || !segs[0].chars().next().unwrap().is_lowercase() {
                continue;
            }
            let two = segs.iter().take(2).copied().collect::<Vec<_>>().join("/");
            if LAYERS.iter().any(|(n, _)| *n == two) {
                out.push(two);
            } else {
                out.push(segs[0].to_string());
            }
        }
        rest = &after[1.min(after.len())..];
    }
    out
}

fn same_tree(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

fn edges() -> BTreeMap<String, Vec<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    common::rust_files(&src, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let module = module_of(&f, &src);
        // The test kit and the benchmark binary sit above everything.
        if module.starts_with("devkit") || module.starts_with("bin/") {
            continue;
        }
        if module == "lib" || module == "main" {
            continue;
        }
        let code = product_code(&std::fs::read_to_string(&f).unwrap());
        let mut deps = imports(&code);
        deps.sort();
        deps.dedup();
        out.insert(module, deps);
    }
    out
}

#[test]
fn every_module_imports_only_modules_below_it() {
    let mut wrong = Vec::new();
    for (module, deps) in edges() {
        let Some((_, mine)) = layer_of(&module) else {
            wrong.push(format!(
                "{module}: not in LAYERS (tests/layering.rs); give it a layer"
            ));
            continue;
        };
        for d in deps {
            if same_tree(&module, &d) {
                continue;
            }
            if d == "devkit" {
                wrong.push(format!("{module} uses the test kit (devkit)"));
                continue;
            }
            match layer_of(&d) {
                Some((_, theirs)) if theirs < mine => {}
                Some((name, theirs)) => wrong.push(format!(
                    "{module} (layer {mine}) uses {name} (layer {theirs}): an import upward or sideways"
                )),
                None => wrong.push(format!("{module} uses {d}, which is not in LAYERS")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_rules_in_words_hold() {
    let mut wrong = Vec::new();
    for (module, deps) in edges() {
        for (who, never) in FORBIDDEN {
            if !same_tree(&module, who) {
                continue;
            }
            for d in &deps {
                if never.iter().any(|n| same_tree(d, n)) {
                    wrong.push(format!("{module} imports {d}"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_an_upward_import() {
    // The parser must find both forms, or the tests above prove nothing.
    let code = "use crate::store::Store;\nfn f() { crate::cli::run(); }\nuse crate::{daemon, wire::Message};\n// crate::hub in a comment\n";
    let found = imports(&product_code(code));
    assert_eq!(found, ["store", "cli", "daemon", "wire"]);
    assert_eq!(layer_of("emr/flow"), Some(("emr/flow", 5)));
    assert_eq!(layer_of("transport/http"), Some(("transport", 4)));
}

#[test]
fn the_product_binary_carries_no_test_kit_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "-p",
            "clinicsync",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(crates.contains(&"rusqlite"), "{tree}");
    for kit in ["tempfile", "proptest", "rcgen"] {
        assert!(
            !crates.contains(&kit),
            "{kit} is in the product's dependency tree:\n{tree}"
        );
    }
}
