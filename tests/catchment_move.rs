//! A patient moving between clinics, and a rule previewed before it is enabled
//! (`catchment move`, `catchment preview` at the hub). Hub in-process over real
//! HTTP, the real binary on the hub's store.

mod common;

use std::path::{Path, PathBuf};

use clinicsync::remote::{Order, OrderKind};
use clinicsync::time::wall_ms;
use common::*;
use serde_json::{json, Value};

fn hub_config(dir: &Path, hub: &TestHub) -> PathBuf {
    let p = dir.join("hub.toml");
    let mut text = format!(
        "[node]\nid = \"hub\"\nstore = \"{}\"\n[hub]\nlisten = \"127.0.0.1:0\"\n",
        hub.store_path.display()
    );
    for ((node, token), district) in hub.tokens.iter().zip(["North", "South"]) {
        text.push_str(&format!(
            "[[hub.children]]\nnode = \"{node}\"\ntoken_sha256 = \"{}\"\n[[hub.catchment]]\nnode = \"{node}\"\npath = \"address.district\"\nequals = \"{district}\"\n",
            clinicsync::auth::token_hash(token)
        ));
    }
    std::fs::write(&p, text).unwrap();
    p
}

fn obs(id: &str, patient: &str, value: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
           "subject": {"reference": format!("Patient/{patient}")}, "valueString": value})
}

fn held(store: &clinicsync::store::Store, kind: &str) -> Vec<String> {
    store
        .list(Some(kind))
        .unwrap()
        .into_iter()
        .map(|s| s.version.snapshot.key.id.clone())
        .collect()
}

#[test]
fn preview_counts_what_a_rule_would_give_before_it_is_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North"), ("b", "South")]),
        &["a", "b"],
        8 << 20,
    );
    let cfg = hub_config(dir.path(), &hub);
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    for i in 0..5 {
        a.put(vec![
            patient(&format!("p{i}"), "North"),
            encounter(&format!("e{i}"), &format!("p{i}")),
            obs(&format!("o{i}"), &format!("p{i}"), "42"),
        ]);
    }
    a.sync().unwrap();
    hub.put(vec![
        json!({"resourceType": "Location", "id": "l1", "name": "HQ"}),
    ]);
    let (code, out, err) = run(
        &cfg,
        &[
            "catchment",
            "preview",
            "b",
            "--path",
            "address.district",
            "--equals",
            "North",
            "--rate-kbit",
            "128",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let p: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            p["patients"].as_u64(),
            p["already_held"].as_u64(),
            p["records"].as_u64()
        ),
        (Some(5), Some(0), Some(15)),
        "{p}"
    );
    assert_eq!(p["metadata_records"], 1);
    let compressed = p["bytes_compressed"].as_u64().unwrap();
    assert!(
        compressed > 0 && compressed < p["bytes"].as_u64().unwrap(),
        "{p}"
    );
    assert_eq!(
        p["bootstrap_secs"].as_u64().unwrap(),
        (compressed * 8).div_ceil(128_000)
    );
    // b's own rule (South) gives nothing; a's own gives what it holds.
    let (_, out, _) = run(&cfg, &["catchment", "preview", "b", "--json"]);
    let p: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(p["patients"], 0);
    assert!(
        p["rate_source"].as_str().unwrap().contains("--rate-kbit"),
        "{p}"
    );
    let (_, out, _) = run(&cfg, &["catchment", "preview", "a"]);
    assert!(
        out.contains("5 patients (5 already held), 15 records"),
        "{out}"
    );
    // Bad input changes nothing and says what is wrong.
    let (code, _, err) = run(&cfg, &["catchment", "preview", "zz"]);
    assert_eq!(code, 7, "{err}");
    let (code, _, err) = run(
        &cfg,
        &[
            "catchment",
            "preview",
            "b",
            "--path",
            "address..district",
            "--equals",
            "N",
        ],
    );
    assert_eq!(code, 2);
    assert!(err.contains("dotted field path"), "{err}");
    let (code, _, _) = run(
        &cfg,
        &["catchment", "preview", "b", "--path", "address.district"],
    );
    assert_eq!(code, 2, "--path needs --equals");
}

#[test]
fn a_patient_moves_with_its_whole_record_and_nothing_unpushed_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North"), ("b", "South")]),
        &["a", "b"],
        8 << 20,
    );
    let cfg = hub_config(dir.path(), &hub);
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    let mut b = TestClinic::new(dir.path(), "b", &hub.url, &hub.token("b"));
    a.put(vec![
        patient("p1", "North"),
        encounter("e1", "p1"),
        obs("o1", "p1", "first"),
    ]);
    a.put(vec![patient("p2", "North")]);
    a.sync().unwrap();
    b.sync().unwrap();
    assert!(held(&b.store, "Patient").is_empty());
    // A clinician at A edits the obs; before A syncs, the patient moves to B.
    a.put(vec![obs("o1", "p1", "written at A before the move")]);
    let (code, out, err) = run(
        &cfg,
        &["catchment", "move", "Patient/p1", "a", "b", "--purge"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("purge ordered at a"), "{out}");
    // B gets the whole record by backfill.
    b.sync().unwrap();
    assert_eq!(held(&b.store, "Patient"), ["p1"]);
    assert_eq!(held(&b.store, "Encounter"), ["e1"]);
    assert_eq!(held(&b.store, "Observation"), ["o1"]);
    // A's unpushed edit is accepted, not refused, and reaches B.
    let rep = a.sync().unwrap();
    assert_eq!(rep.pushed.accepted, 1, "{rep:?}");
    assert!(a.store.quarantine_list().unwrap().is_empty());
    b.sync().unwrap();
    assert_eq!(
        b.get("Observation/o1").unwrap()["valueString"],
        "written at A before the move"
    );
    // The purge ran at A once the edit had gone up: p1's records are gone there,
    // p2's stay; the result reaches the hub on A's next exchange.
    assert_eq!(held(&a.store, "Patient"), ["p2"]);
    assert!(held(&a.store, "Observation").is_empty());
    a.sync().unwrap();
    let (_, list, _) = run(&cfg, &["remote", "a", "list", "--json"]);
    let orders: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(orders[0]["state"], "done", "{orders}");
    assert!(
        orders[0]["result"]
            .as_str()
            .unwrap()
            .contains("3 record(s) purged"),
        "{orders}"
    );
    // A receives no more of p1, even when its address still matches A's rule.
    hub.put(vec![
        obs("o2", "p1", "new at the hub"),
        patient("p1", "North"),
    ]);
    a.sync().unwrap();
    b.sync().unwrap();
    assert!(held(&a.store, "Observation").is_empty());
    assert!(held(&b.store, "Observation").contains(&"o2".to_string()));
    let (_, rows, _) = run(&cfg, &["catchment", "list", "a", "--json"]);
    assert!(rows.contains("\"moved\""), "{rows}");
    // Something A writes for p1 after the move (its OpenMRS kept a copy) is refused
    // with the reason and kept in A's quarantine — never taken, never silently lost.
    std::thread::sleep(std::time::Duration::from_millis(5));
    a.put(vec![obs("o9", "p1", "written at A after the move")]);
    let rep = a.sync().unwrap();
    assert_eq!(rep.pushed.rejected, 1, "{rep:?}");
    let q = a.store.quarantine_list().unwrap();
    assert!(
        q.iter()
            .any(|e| e.record == "Observation/o9" && e.reason.contains("moved from a")),
        "{q:?}"
    );
    assert!(get(&hub.store(), "Observation/o9").is_none());
    // Audited.
    let db = rusqlite::Connection::open(&hub.store_path).unwrap();
    let moves: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM audit WHERE action = 'catchment-move'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(moves, 1);
    // Bad moves change nothing.
    for (args, code, words) in [
        (
            vec!["catchment", "move", "Patient/nope", "a", "b"],
            7,
            "not held at this hub",
        ),
        (
            vec!["catchment", "move", "Patient/p2", "b", "a"],
            7,
            "not in the catchment of b",
        ),
        (
            vec!["catchment", "move", "Patient/p2", "a", "a"],
            2,
            "where it is",
        ),
        (
            vec!["catchment", "move", "Patient/p2", "a", "zz"],
            7,
            "not one of this hub's children",
        ),
    ] {
        let (c, _, err) = run(&cfg, &args);
        assert_eq!(c, code, "{args:?}: {err}");
        assert!(err.contains(words), "{args:?}: {err}");
    }
    assert_eq!(moves, 1);
}

#[test]
fn a_purge_keeps_what_has_not_been_pushed_yet() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    a.put(vec![patient("p1", "North"), obs("o1", "p1", "x")]);
    a.sync().unwrap();
    a.put(vec![obs("o1", "p1", "not yet pushed")]);
    let order = Order {
        id: "purge-1".into(),
        issued_ms: wall_ms(),
        by: "hub".into(),
        kind: OrderKind::Purge {
            patient: "p1".into(),
        },
    };
    clinicsync::remote::execute(&mut a.store, &a.policy, &[order], wall_ms()).unwrap();
    assert_eq!(
        held(&a.store, "Observation"),
        ["o1"],
        "the unpushed edit stays"
    );
    assert!(held(&a.store, "Patient").is_empty());
    let r = clinicsync::remote::outgoing(&a.store).unwrap();
    assert_eq!(r[0].state, "failed");
    assert!(r[0].detail.contains("1 record(s) purged, 1 kept"), "{r:?}");
}
