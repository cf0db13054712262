//! Formats a user or a peer depends on, frozen beside the wire goldens
//! (`tests/golden.rs`): the MQTT envelope, the SQLite schema, the shape of
//! `status --json` and `doctor --json`, the public key line, and the example
//! configuration, which must parse with every block uncommented.
//! `CLINICSYNC_BLESS=1` writes missing files.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clinicsync::transport::mqtt::Envelope;
use common::*;
use serde_json::Value;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn check_text(name: &str, text: &str) {
    let path = golden(name);
    if !path.exists() && std::env::var_os("CLINICSYNC_BLESS").is_some() {
        std::fs::write(&path, text).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("missing golden file {}", path.display()));
    assert_eq!(
        text, want,
        "{name} changed: a format users or peers rely on (a new version, a migration or a documented change)"
    );
}

#[test]
fn mqtt_envelopes_are_frozen() {
    let corr = *b"0123456789abcdef";
    let all = [
        Envelope::Request {
            corr,
            frame: b"CSYN-frame".to_vec(),
        },
        Envelope::Answer {
            corr,
            frame: b"CSYN-answer".to_vec(),
        },
        Envelope::Refusal {
            corr,
            status: 403,
            reason: "not enrolled".into(),
        },
        Envelope::WakeUp,
    ];
    let text: String = all.iter().map(|e| hex::encode(e.encode()) + "\n").collect();
    check_text("mqtt_envelopes.v1.hex", &text);
    for (e, line) in all.iter().zip(text.lines()) {
        assert_eq!(&Envelope::decode(&hex::decode(line).unwrap()).unwrap(), e);
    }
    // Since 0.3 (protocol v2 over MQTT): a request carrying its sender's announcement,
    // and a hub's hello. Frozen beside the kinds before them, which are unchanged.
    let v2 = [
        Envelope::RequestAnnounced {
            corr,
            accept: "2;dict=1".into(),
            frame: b"CSYN-frame".to_vec(),
        },
        Envelope::Hello {
            accept: "2;dict=1".into(),
        },
    ];
    let text: String = v2.iter().map(|e| hex::encode(e.encode()) + "\n").collect();
    check_text("mqtt_envelopes_announced.v1.hex", &text);
    for (e, line) in v2.iter().zip(text.lines()) {
        assert_eq!(&Envelope::decode(&hex::decode(line).unwrap()).unwrap(), e);
    }
}

#[test]
fn the_sqlite_schema_is_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    drop(clinicsync::store::Store::open(&path, "a").unwrap());
    let db = rusqlite::Connection::open(&path).unwrap();
    let mut st = db
        .prepare(
            "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type, name",
        )
        .unwrap();
    let text: String = st
        .query_map([], |r| {
            Ok(format!(
                "-- {} {}\n{};\n",
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?
            ))
        })
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    check_text(
        &format!("schema.v{}.sql", clinicsync::store::SCHEMA_VERSION),
        &text,
    );
}

/// Every key path of a JSON value (`a.b`, arrays as `a[]`).
fn shape(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                shape(x, &p, out);
            }
        }
        Value::Array(a) => {
            for x in a {
                shape(x, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn status_and_doctor_json_keep_their_shape() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    a.put(vec![patient("p1", "North")]);
    a.sync().unwrap();
    let status: Value = serde_json::from_slice(&a.cli(&["status", "--json"]).stdout).unwrap();
    let mut keys = BTreeSet::new();
    shape(&status, "", &mut keys);
    check_text(
        "status.json.keys",
        &keys.iter().map(|k| format!("{k}\n")).collect::<String>(),
    );
    let doctor: Value = serde_json::from_slice(&a.cli(&["doctor", "--json"]).stdout).unwrap();
    let mut keys = BTreeSet::new();
    shape(&doctor, "", &mut keys);
    check_text(
        "doctor.json.keys",
        &keys.iter().map(|k| format!("{k}\n")).collect::<String>(),
    );
    // Which checks a clinic runs, in order: monitoring keys on these names.
    let checks: String = doctor
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{}\n", c["what"].as_str().unwrap()))
        .collect();
    check_text("doctor.checks", &checks);
}

/// `packaging/clinicsync.toml` with every commented block and key uncommented,
/// placeholders filled in.
fn uncommented() -> String {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/clinicsync.toml"),
    )
    .unwrap();
    let is_key = |s: &str| {
        let (k, rest) = s.split_once(" = ").unwrap_or(("", ""));
        !k.is_empty()
            && !rest.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    let is_table = |s: &str| {
        let t = s.trim();
        t.starts_with('[')
            && t.ends_with(']')
            && t.trim_matches(['[', ']'])
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_')
    };
    let mut out = Vec::new();
    let mut open_brackets = 0i32;
    for line in text.lines() {
        let body = line
            .strip_prefix("# # ")
            .or_else(|| line.strip_prefix("# "))
            .unwrap_or(line);
        let code = line.starts_with('#') && (open_brackets > 0 || is_key(body) || is_table(body));
        let l = if code { body } else { line };
        if code || !line.starts_with('#') {
            let without_comment = l.split(" #").next().unwrap_or(l);
            open_brackets += without_comment.matches('[').count() as i32
                - without_comment.matches(']').count() as i32;
            if is_table(l) {
                open_brackets = 0;
            }
        }
        out.push(l.to_string());
    }
    out.join("\n")
        .replace(
            "<64 hex characters from `clinicsync token new`>",
            &"ab".repeat(32),
        )
        .replace("<64 hex characters>", &"cd".repeat(32))
        .replace(
            "<44 characters of base64>",
            "q83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4k=",
        )
}

#[test]
fn the_example_configuration_parses_with_every_block_uncommented() {
    let text = uncommented();
    let cfg = clinicsync::config::Config::parse(&text, Path::new("clinicsync.toml"))
        .unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
    // Every section is there, so the test cannot pass by leaving one commented out.
    assert!(
        cfg.parent.is_some() && cfg.hub.is_some() && cfg.mqtt.is_some() && cfg.metrics.is_some()
    );
    let hub = cfg.hub.as_ref().unwrap();
    assert!(!hub.children.is_empty() && !hub.catchment.is_empty());
    assert_ne!(cfg.emr.kind, clinicsync::config::EmrKind::Embedded);
    assert!(!cfg.node.remote_orders || text.contains("remote_orders = true"));
}

/// The public key line (`clinicsync-node v1 <node> <ed25519 hex> <age1…>`) a node
/// prints (`keys init`, `keys show`, its `node.pub`) and another reads (`keys trust`,
/// a file or the line itself), frozen for the test keys committed with the bundle
/// goldens: the line is what technicians carry between nodes, so a node must keep
/// reading the lines older nodes printed.
#[test]
fn the_public_key_line_is_frozen() {
    use clinicsync::keys::{Identity, PublicKeys};
    let keys = golden("bundle-keys");
    let nodes = ["clinic-a", "hub"];
    let ids: Vec<Identity> = nodes
        .iter()
        .map(|n| Identity::load(&keys.join(n), n).unwrap())
        .collect();
    let text: String = ids.iter().map(|id| id.public().line() + "\n").collect();
    check_text("key_lines.v1.txt", &text);
    let frozen = std::fs::read_to_string(golden("key_lines.v1.txt")).unwrap();
    for (line, id) in frozen.lines().zip(&ids) {
        let parsed = PublicKeys::parse(line)
            .unwrap_or_else(|e| panic!("the frozen key line no longer parses: {e}"));
        assert_eq!(parsed, id.public(), "{line}");
        assert_eq!(parsed.line(), line, "parsing and printing again changes it");
    }

    // `node.pub` is the line and a newline.
    let dir = tempfile::tempdir().unwrap();
    let fresh = Identity::init(&dir.path().join("fresh"), "clinic-b").unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("fresh/node.pub")).unwrap(),
        fresh.public().line() + "\n"
    );

    // The binary prints the frozen line for the committed keys…
    let a_keys = dir.path().join("clinic-a.keys");
    std::fs::create_dir(&a_keys).unwrap();
    for f in ["signing.key", "age.key"] {
        std::fs::copy(keys.join("clinic-a").join(f), a_keys.join(f)).unwrap();
    }
    let token = credential(dir.path(), "clinic-a.token", &"ab".repeat(32));
    let clinic =
        |node: &str| node_section(dir.path(), node) + &parent_section("http://127.0.0.1:9", &token);
    let a_cfg = dir.path().join("clinic-a.toml");
    std::fs::write(&a_cfg, clinic("clinic-a")).unwrap();
    let (code, out, err) = run(&a_cfg, &["keys", "show"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, frozen.lines().next().unwrap().to_string() + "\n");
    // …and another node trusts the frozen line, from a file as from the argument.
    let hub_cfg = dir.path().join("hub.toml");
    let hub = node_section(dir.path(), "hub") + "[hub]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(&hub_cfg, hub).unwrap();
    let file = dir.path().join("clinic-a.pub");
    std::fs::write(&file, format!("{}\n", frozen.lines().next().unwrap())).unwrap();
    let (code, _, err) = run(&hub_cfg, &["keys", "trust", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(&hub_cfg, &["keys", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(frozen.lines().next().unwrap()), "{out}");
    let b_cfg = dir.path().join("clinic-b.toml");
    std::fs::write(&b_cfg, clinic("clinic-b")).unwrap();
    let hub_line = frozen.lines().nth(1).unwrap();
    let (code, _, err) = run(&b_cfg, &["keys", "trust", hub_line, "--parent"]);
    assert_eq!(code, 0, "{err}");
}
