//! One error taxonomy (issue 14, item 4), checked rather than described:
//! - every error type of the product implements `Classify`, with a `match` that has
//!   no catch-all arm, so a new variant does not compile without a decision;
//! - the classes of the errors whose files other work is reshaping (the wire and
//!   the HTTP transport), asserted from here;
//! - at the binary's edge, corruption anywhere exits with its one code and a message
//!   naming what is corrupt — not a panic, not "link" trouble.

mod common;

use std::path::{Path, PathBuf};

use clinicsync::error::{Classify, ErrorClass};
use clinicsync::transport::http::TransportError;
use clinicsync::wire::WireError;
use common::*;

// ---- every error type has a deliberate class -------------------------------------

/// Error types that answer no class yet, each with the reason; a type listed here
/// that gained `Classify` (or moved) fails the test until it leaves the list.
const UNCLASSIFIED: &[(&str, &str, &str)] = &[];

/// Every product source file (not the test kit) as (path from the crate root, text).
fn product_sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let rel = f.strip_prefix(root).unwrap().to_string_lossy().to_string();
            (rel, std::fs::read_to_string(&f).unwrap())
        })
        .filter(|(rel, _)| !rel.starts_with("src/devkit/") && !rel.starts_with("src/bin/"))
        .collect()
}

/// The types deriving `thiserror::Error` in `text`: the item after each derive.
fn error_types(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if !(l.trim_start().starts_with("#[derive(") && l.contains("thiserror::Error")) {
            continue;
        }
        let item = lines[i + 1..]
            .iter()
            .map(|l| l.trim())
            .find(|l| !l.starts_with("#[") && !l.starts_with("///"))
            .unwrap_or("");
        let words: Vec<&str> = item.split_whitespace().collect();
        if let Some(k) = words.iter().position(|w| *w == "enum" || *w == "struct") {
            let name = words[k + 1].trim_end_matches(['{', '(', ';']);
            out.push(name.to_string());
        }
    }
    out
}

/// The body of `impl … Classify for <name> {`, if `text` has one.
fn classify_impl<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let at = text.lines().find(|l| {
        let l = l.trim();
        l.starts_with("impl ")
            && l.contains("Classify for ")
            && l.trim_end_matches('{')
                .trim()
                .ends_with(&format!("Classify for {name}"))
    })?;
    let start = text.find(at)?;
    let mut depth = 0;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i + 1]);
                }
            }
            _ => {}
        }
    }
    None
}

/// Arms that decide for variants not named: `_ =>`, or a bare binding (`other =>`).
fn catch_all_arms(body: &str) -> Vec<String> {
    body.lines()
        .map(str::trim)
        .filter(|l| {
            let Some(pattern) = l.split("=>").next().filter(|_| l.contains("=>")) else {
                return false;
            };
            let p = pattern.trim().trim_start_matches('|').trim();
            p == "_" || (!p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn every_error_type_answers_a_deliberate_class() {
    let sources = product_sources();
    let all: String = sources.iter().map(|(_, t)| t.as_str()).collect();
    let mut found = Vec::new();
    let mut wrong = Vec::new();
    for (file, text) in &sources {
        for name in error_types(text) {
            found.push((file.clone(), name.clone()));
            let waived = UNCLASSIFIED.iter().any(|(f, n, _)| f == file && *n == name);
            match classify_impl(&all, &name) {
                None if waived => {}
                None => wrong.push(format!(
                    "{file}: {name} derives thiserror::Error but implements no crate::error::Classify"
                )),
                Some(_) if waived => wrong.push(format!(
                    "{file}: {name} is classified now; take it out of UNCLASSIFIED"
                )),
                Some(body) => {
                    for arm in catch_all_arms(body) {
                        wrong.push(format!(
                            "{file}: Classify for {name} decides with a catch-all arm `{arm}`: \
                             name the variants, so a new one needs a decision"
                        ));
                    }
                }
            }
        }
    }
    for (file, name, _) in UNCLASSIFIED {
        if !found.iter().any(|(f, n)| f == file && n == name) {
            wrong.push(format!(
                "UNCLASSIFIED names {file}: {name}, which is not there any more"
            ));
        }
    }
    // The scan must see the types it is about, or it proves nothing.
    for expected in [
        "StoreError",
        "EngineError",
        "TransportError",
        "BundleError",
        "LockError",
    ] {
        assert!(
            found.iter().any(|(_, n)| n == expected),
            "the scan missed {expected}: {found:?}"
        );
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_a_catch_all_arm() {
    let body = "impl Classify for X {\n    fn class(&self) -> ErrorClass {\n        match self {\n            X::A | X::B { .. } => ErrorClass::Permanent,\n            X::C(e) if e.busy() => ErrorClass::Retryable,\n            other => other.inner().class(),\n            _ => ErrorClass::Permanent,\n        }\n    }\n}";
    let text = format!("#[derive(Debug, thiserror::Error)]\npub enum X {{ A }}\n{body}\n");
    assert_eq!(error_types(&text), ["X"]);
    assert_eq!(classify_impl(&text, "X"), Some(body));
    assert_eq!(
        catch_all_arms(body),
        [
            "other => other.inner().class(),",
            "_ => ErrorClass::Permanent,"
        ]
    );
}

// ---- classes of the wire's and the HTTP transport's errors -------------------------

#[test]
fn wire_errors_are_properties_of_the_bytes_and_permanent() {
    let cases = [
        WireError::TooShort(3),
        WireError::BadMagic,
        WireError::UnsupportedVersion {
            got: 9,
            supported: 1,
        },
        WireError::TooLarge {
            what: "frame",
            size: 2,
            limit: 1,
        },
        WireError::Decompress("x".into()),
        WireError::Decode("x".into()),
        WireError::TooManyRecords { count: 2, limit: 1 },
        WireError::Encode("x".into()),
        WireError::UnknownDictionary(7),
        WireError::Block("record 3: kind index 9 is outside the kind table".into()),
    ];
    for e in cases {
        assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
        assert!(!e.is_retryable(), "{e}");
    }
}

#[test]
fn transport_errors_are_retryable_when_the_link_or_a_busy_parent_is_the_cause() {
    let url = || "http://hub:8080".to_string();
    let status = |status| TransportError::Status {
        status,
        message: String::new(),
    };
    let cases = [
        (
            TransportError::Unreachable {
                url: url(),
                message: "refused".into(),
            },
            ErrorClass::Retryable,
        ),
        (
            TransportError::Cut {
                url: url(),
                message: "reset".into(),
            },
            ErrorClass::Retryable,
        ),
        (
            TransportError::Busy {
                status: 503,
                retry_after: std::time::Duration::from_secs(5),
                message: String::new(),
            },
            ErrorClass::Retryable,
        ),
        (status(500), ErrorClass::Retryable),
        (status(503), ErrorClass::Retryable),
        (status(429), ErrorClass::Retryable),
        // The hub's answer to a body that did not arrive in time: a slow link.
        (status(408), ErrorClass::Retryable),
        (status(400), ErrorClass::Permanent),
        (status(401), ErrorClass::Permanent),
        (status(403), ErrorClass::Permanent),
        (status(413), ErrorClass::Permanent),
        (
            TransportError::Wire(WireError::BadMagic),
            ErrorClass::Permanent,
        ),
        (
            TransportError::Unexpected {
                sent: "push_request",
                got: "pull_response",
            },
            ErrorClass::Permanent,
        ),
        (
            TransportError::Tls {
                url: url(),
                problem: clinicsync::tls::TlsProblem::Expired,
            },
            ErrorClass::Permanent,
        ),
    ];
    for (e, class) in cases {
        assert_eq!(e.class(), class, "{e}");
        // The inherent answer the daemon and the fallback use is the class's.
        assert_eq!(e.is_retryable(), class == ErrorClass::Retryable, "{e}");
    }
}

// ---- corruption at the binary's edge ------------------------------------------------

const EXIT_CORRUPT: i32 = clinicsync::cli::EXIT_CORRUPT as i32;

/// A clinic whose parent is a closed port, holding Patient/p1 in its outbox.
fn clinic_holding_p1(dir: &Path) -> (PathBuf, PathBuf) {
    let store = dir.join("a.db");
    let token = dir.join("parent.token");
    clinicsync::filemode::write_private(&token, b"t0123456789\n").unwrap();
    let config = dir.join("a.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"a\"\nstore = \"{}\"\n[parent]\nurl = \"http://127.0.0.1:9\"\ntoken_file = \"{}\"\n[sync]\ntimeout_secs = 5\n",
            store.display(),
            token.display()
        ),
    )
    .unwrap();
    let p = dir.join("p1.json");
    std::fs::write(&p, patient("p1", "North").to_string()).unwrap();
    let (code, _, err) = run(&config, &["put", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    (config, store)
}

fn write_raw(store: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(store).unwrap();
    assert_eq!(conn.execute(sql, []).unwrap(), 1, "{sql}");
}

/// Exit code 10, the message naming `what`, no panic and no link trouble.
fn refused_as_corruption(config: &Path, args: &[&str], what: &[&str]) {
    let (code, out, err) = run(config, args);
    assert_eq!(
        code, EXIT_CORRUPT,
        "{args:?} should exit {EXIT_CORRUPT} (corruption):\nstdout: {out}\nstderr: {err}"
    );
    assert!(err.contains("corrupt"), "{args:?}: {err}");
    for w in what {
        assert!(err.contains(w), "{args:?}: {err:?} does not name {w:?}");
    }
    for not in [
        "panicked",
        "RUST_BACKTRACE",
        "cannot reach parent",
        "link to parent",
    ] {
        assert!(!err.contains(not), "{args:?}: {err}");
    }
}

#[test]
fn a_corrupt_version_vector_stops_sync_with_the_corruption_code_naming_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let (config, store) = clinic_holding_p1(dir.path());
    write_raw(&store, r#"UPDATE replica SET vv = '{"a":' WHERE id = 'p1'"#);
    // The push pass reads the record it would send: corruption, before any link.
    refused_as_corruption(&config, &["sync"], &["replica.vv", "Patient/p1"]);
    refused_as_corruption(
        &config,
        &["get", "Patient/p1"],
        &["replica.vv", "Patient/p1"],
    );
    // Nothing was sent or cleared: the record still waits in the outbox.
    let conn = rusqlite::Connection::open(&store).unwrap();
    let queued: i64 = conn
        .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(queued, 1);
}

#[test]
fn a_corrupt_meta_value_or_a_damaged_file_stops_status_with_the_corruption_code() {
    let dir = tempfile::tempdir().unwrap();
    let (config, store) = clinic_holding_p1(dir.path());
    // Before: status works.
    let (code, _, err) = run(&config, &["status"]);
    assert_eq!(code, 0, "{err}");
    write_raw(
        &store,
        "INSERT INTO meta(key, value) VALUES ('parent_clock_skew_ms', 'lots') \
         ON CONFLICT(key) DO UPDATE SET value = 'lots'",
    );
    refused_as_corruption(
        &config,
        &["status"],
        &["meta.value of parent_clock_skew_ms", "\"lots\""],
    );

    // A file that is not a database any more (its header overwritten).
    let (config, store) = clinic_holding_p1(&{
        let d = dir.path().join("b");
        std::fs::create_dir(&d).unwrap();
        d
    });
    let mut bytes = std::fs::read(&store).unwrap();
    bytes[..100].fill(0x5a);
    std::fs::write(&store, &bytes).unwrap();
    for extra in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{extra}", store.display()));
    }
    refused_as_corruption(&config, &["status"], &["database"]);
}

#[test]
fn a_running_clinic_stops_on_a_corrupt_store_instead_of_retrying_it_forever() {
    let dir = tempfile::tempdir().unwrap();
    let (config, store) = clinic_holding_p1(dir.path());
    write_raw(&store, r#"UPDATE replica SET vv = '{"a":' WHERE id = 'p1'"#);
    // Retryable trouble (the parent is a closed port) would keep `run` going with
    // backoff; corruption ends it with the corruption code, naming the record.
    let mut child = std::process::Command::new(common::BIN)
        .args(["--config", config.to_str().unwrap(), "run"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            panic!("run was still going 30 s after meeting a corrupt record");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(EXIT_CORRUPT), "{err}");
    assert!(
        err.contains("replica.vv") && err.contains("Patient/p1"),
        "{err}"
    );
}

#[test]
fn a_hub_stops_on_its_corrupt_store_and_tells_children_only_that_it_cannot_serve() {
    use clinicsync::devkit::cluster;
    let dir = tempfile::tempdir().unwrap();
    let port = cluster::free_port().unwrap();
    let layout = cluster::write_layout(dir.path(), port, &[("clinic-a", "North")], "", "").unwrap();
    let mut hub = cluster::Proc::spawn(
        std::path::Path::new(common::BIN),
        "hub",
        &layout.hub.config,
        &["run"],
    )
    .unwrap();
    cluster::wait_healthy(&layout.hub_url, std::time::Duration::from_secs(20)).unwrap();
    write_raw(
        &layout.hub.store,
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('seq', 'abc')",
    );
    let clinic = &layout.clinics[0].config;
    let p = dir.path().join("p1.json");
    std::fs::write(&p, patient("p1", "North").to_string()).unwrap();
    let (code, _, err) = run(clinic, &["put", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // The child is told the hub cannot serve now (503, then a closed port as the hub
    // stops: retryable for it), never what is damaged in the hub's store.
    let (code, out, err) = run(clinic, &["sync"]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(
        !err.contains("meta"),
        "the hub's damage leaked to a child: {err}"
    );
    // The hub stops by itself with the corruption code.
    let stopped = cluster::wait_until(std::time::Duration::from_secs(20), || !hub.is_running());
    assert!(stopped, "the hub kept serving from a corrupt store");
    assert_eq!(hub.wait().code, Some(EXIT_CORRUPT));
    let log = std::fs::read_to_string(layout.hub.config.with_extension("log")).unwrap();
    assert!(log.contains("corrupt") && log.contains("seq"), "{log}");
}
