//! A person reviews a conflict (`conflicts resolve N --keep …`): the result is a new
//! version that supersedes both sides, syncs like any edit and is audited; nothing
//! is replaced that the reviewer did not see, and every bad request changes nothing.
//! Hub in-process over real HTTP, the real binary on the hub's store.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};

fn hub_config(dir: &Path, hub: &TestHub) -> PathBuf {
    let p = dir.join("hub.toml");
    std::fs::write(
        &p,
        format!(
            "[node]\nid = \"hub\"\nstore = \"{}\"\n[hub]\nlisten = \"127.0.0.1:0\"\n[[hub.catchment]]\nnode = \"a\"\npath = \"address.district\"\nequals = \"North\"\n",
            hub.store_path.display()
        ),
    )
    .unwrap();
    p
}

fn patient(gender: &str, birth: &str) -> Value {
    json!({"resourceType": "Patient", "id": "p1", "gender": gender, "birthDate": birth,
           "address": [{"district": "North"}]})
}

/// A hub and clinic `a` whose edits of Patient/p1 crossed: `a` wrote `a_side`, the
/// hub (later) `hub_side`. Returns with the conflict detected at the hub.
fn crossed(dir: &Path, a_side: Value, hub_side: Value) -> (TestHub, TestClinic, PathBuf) {
    let hub = TestHub::start(dir, 0, hub_policy(&[("a", "North")]), &["a"], 8 << 20);
    let mut a = TestClinic::new(dir, "a", &hub.url, &hub.token("a"));
    a.put(vec![patient("male", "1990-01-01")]);
    a.sync().unwrap();
    a.put(vec![a_side]);
    std::thread::sleep(std::time::Duration::from_millis(5));
    hub.put(vec![hub_side]);
    assert_eq!(a.sync().unwrap().pushed.conflict, 1);
    let cfg = hub_config(dir, &hub);
    (hub, a, cfg)
}

fn list(config: &Path, open: bool) -> Vec<Value> {
    let mut args = vec!["conflicts", "list", "--json"];
    if open {
        args.push("--open");
    }
    let (code, out, err) = run(config, &args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn keeping_the_side_the_policy_did_not_keep_reaches_the_clinic_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a, cfg) = crossed(
        dir.path(),
        patient("female", "1990-01-01"),
        patient("unknown", "1990-01-01"),
    );
    // The policy kept the later clock (the hub's); the clinic's side is kept for review.
    a.sync().unwrap();
    assert_eq!(a.get("Patient/p1").unwrap()["gender"], "unknown");
    let open = list(&cfg, true);
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["reviewed_ms"], Value::Null);
    let (_, text, _) = run(&cfg, &["conflicts", "list"]);
    assert!(
        text.contains("open: review with `conflicts show 1`"),
        "{text}"
    );

    let (code, out, err) = run(
        &cfg,
        &["conflicts", "resolve", "1", "--keep", "other", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert!(r["kept"].as_str().unwrap().contains("a's version"), "{r}");
    assert!(
        r["new_vv"]["hub"].is_u64() && r["new_vv"]["a"].is_u64(),
        "{r}"
    );
    assert_eq!(get(&hub.store(), "Patient/p1").unwrap()["gender"], "female");
    // It syncs like any edit: the clinic takes it as newer, no new conflict.
    let rep = a.sync().unwrap();
    assert_eq!(a.get("Patient/p1").unwrap()["gender"], "female");
    assert_eq!(rep.pushed.conflict, 0);
    assert_eq!(hub.store().conflicts_list(false, None).unwrap().len(), 1);
    // Listed as resolved, not open; resolving it again is refused.
    assert!(list(&cfg, true).is_empty());
    let all = list(&cfg, false);
    assert!(all[0]["reviewed_ms"].is_u64(), "{all:?}");
    assert!(all[0]["review"].as_str().unwrap().contains("other side"));
    let (code, _, err) = run(&cfg, &["conflicts", "resolve", "1", "--keep", "local"]);
    assert_eq!(code, 1);
    assert!(err.contains("already resolved"), "{err}");
    // Audited, and the chain still verifies.
    let (code, out, err) = run(&cfg, &["audit", "verify"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("intact"));
    let (_, history, _) = run(&cfg, &["history", "Patient/p1"]);
    assert!(history.contains("resolved"), "{history}");
    let db = rusqlite::Connection::open(&hub.store_path).unwrap();
    let resolves: Vec<String> = db
        .prepare("SELECT detail FROM audit WHERE action = 'resolve' AND record = 'Patient/p1'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(resolves.len(), 1, "{resolves:?}");
    assert!(
        resolves[0].starts_with("conflict #1: kept the other side"),
        "{resolves:?}"
    );
}

#[test]
fn a_review_that_would_lose_something_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Different fields changed: the policy merged both sides.
    let (hub, mut a, cfg) = crossed(
        dir.path(),
        patient("female", "1990-01-01"),
        patient("male", "1991-02-02"),
    );
    let before = get(&hub.store(), "Patient/p1").unwrap();
    assert_eq!(
        (before["gender"].clone(), before["birthDate"].clone()),
        (json!("female"), json!("1991-02-02"))
    );
    let unchanged = |why: &str| {
        assert_eq!(get(&hub.store(), "Patient/p1").unwrap(), before, "{why}");
        assert_eq!(list(&cfg, true).len(), 1, "{why}: still open");
    };
    // No single "other" side of a merge.
    let (code, _, err) = run(&cfg, &["conflicts", "resolve", "1", "--keep", "other"]);
    assert_eq!(code, 1);
    assert!(err.contains("merging"), "{err}");
    unchanged("other of a merge");
    // Not a keyword and not a file.
    let (code, _, err) = run(&cfg, &["conflicts", "resolve", "1", "--keep", "bogus"]);
    assert_eq!(code, 2);
    assert!(err.contains("not winner, other, local or remote"), "{err}");
    unchanged("bogus keep");
    // A file about another record.
    let other = dir.path().join("other.json");
    std::fs::write(
        &other,
        json!({"resourceType": "Patient", "id": "p2", "gender": "female"}).to_string(),
    )
    .unwrap();
    let (code, _, err) = run(
        &cfg,
        &[
            "conflicts",
            "resolve",
            "1",
            "--keep",
            other.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("Patient/p2") && err.contains("Patient/p1"),
        "{err}"
    );
    unchanged("file for another record");
    // A file that is not a resource.
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "{not json").unwrap();
    let (code, _, err) = run(
        &cfg,
        &[
            "conflicts",
            "resolve",
            "1",
            "--keep",
            junk.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("junk.json"), "{err}");
    unchanged("junk file");
    // No such conflict.
    let (code, _, err) = run(&cfg, &["conflicts", "resolve", "9", "--keep", "local"]);
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("no conflict #9"));
    // The clinic edits the record again after the conflict: keeping an old side
    // would silently undo that edit, so it needs --force.
    a.sync().unwrap();
    a.put(vec![patient("female", "1991-03-03")]);
    a.sync().unwrap();
    let edited = get(&hub.store(), "Patient/p1").unwrap();
    assert_eq!(edited["birthDate"], "1991-03-03");
    let (code, _, err) = run(&cfg, &["conflicts", "resolve", "1", "--keep", "remote"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("was edited after conflict #1") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(get(&hub.store(), "Patient/p1").unwrap(), edited);
    // A corrected resource from a file, over the later edit, with --force.
    let fixed = dir.path().join("fixed.json");
    std::fs::write(&fixed, patient("female", "1990-12-24").to_string()).unwrap();
    let (code, out, err) = run(
        &cfg,
        &[
            "conflicts",
            "resolve",
            "1",
            "--keep",
            fixed.to_str().unwrap(),
            "--force",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("kept new content"), "{out}");
    a.sync().unwrap();
    assert_eq!(a.get("Patient/p1").unwrap()["birthDate"], "1990-12-24");
    assert_eq!(
        get(&hub.store(), "Patient/p1").unwrap()["birthDate"],
        "1990-12-24"
    );
}
