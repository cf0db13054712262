//! Fixing a clinic from the centre: `clinicsync remote <node> …` at the hub; the
//! order travels down with the clinic's next pull, runs there once with no command
//! typed at the clinic, and its result comes back up. Hub in-process over real
//! HTTP; the real binary on the hub's store.

mod common;

use std::path::{Path, PathBuf};

use clinicsync::remote::{Order, OrderKind};
use clinicsync::time::wall_ms;
use common::*;
use serde_json::{json, Value};

fn hub_config(dir: &Path, hub: &TestHub) -> PathBuf {
    let p = dir.join("hub.toml");
    let mut children = String::new();
    for (node, token) in &hub.tokens {
        children.push_str(&format!(
            "[[hub.children]]\nnode = \"{node}\"\ntoken_sha256 = \"{}\"\n",
            clinicsync::auth::token_hash(token)
        ));
    }
    std::fs::write(
        &p,
        format!(
            "[node]\nid = \"hub\"\nstore = \"{}\"\n[hub]\nlisten = \"127.0.0.1:0\"\n{children}[[hub.children]]\nnode = \"district\"\ntoken_sha256 = \"{}\"\ndescendants = [\"far\"]\n",
            hub.store_path.display(),
            "ab".repeat(32)
        ),
    )
    .unwrap();
    p
}

fn orders(config: &Path, node: &str) -> Vec<Value> {
    let (code, out, err) = run(config, &["remote", node, "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn order_id(stdout: &str) -> String {
    stdout
        .strip_prefix("order ")
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no order id in {stdout:?}"))
        .to_string()
}

/// A hub with clinics `a` and `b`; `a` holds a record its hub refuses (metadata),
/// quarantined with a retry five minutes away.
fn stuck(dir: &Path) -> (TestHub, TestClinic, PathBuf) {
    let hub = TestHub::start(
        dir,
        0,
        hub_policy(&[("a", "North"), ("b", "South")]),
        &["a", "b"],
        8 << 20,
    );
    let mut a = TestClinic::new(dir, "a", &hub.url, &hub.token("a"));
    a.put(vec![
        patient("p1", "North"),
        json!({"resourceType": "Location", "id": "shed", "name": "Shed"}),
    ]);
    a.sync().unwrap();
    let q = a.store.quarantine_list().unwrap();
    assert_eq!(q.len(), 1);
    assert!(q[0].next_retry_ms > wall_ms() + 60_000);
    let cfg = hub_config(dir, &hub);
    (hub, a, cfg)
}

#[test]
fn a_hub_retries_and_drops_a_clinics_quarantined_record_with_nothing_typed_there() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a, cfg) = stuck(dir.path());
    // Retry: the record becomes due at the clinic on its next exchange.
    let (code, out, err) = run(
        &cfg,
        &["remote", "a", "quarantine", "retry", "Location/shed"],
    );
    assert_eq!(code, 0, "{err}");
    let retry = order_id(&out);
    assert_eq!(orders(&cfg, "a")[0]["state"], "pending");
    a.sync().unwrap();
    let q = a.store.quarantine_list().unwrap();
    assert!(q[0].next_retry_ms <= wall_ms(), "due now: {q:?}");
    // Its result goes up with the next exchange.
    a.sync().unwrap();
    let o = orders(&cfg, "a");
    assert_eq!(o[0]["id"], retry.as_str());
    assert_eq!(o[0]["state"], "done", "{o:?}");
    assert!(o[0]["result"]
        .as_str()
        .unwrap()
        .contains("1 quarantined record(s) due now"));
    // Drop: gone from the clinic's quarantine and outbox.
    let (code, out, _) = run(
        &cfg,
        &["remote", "a", "quarantine", "drop", "Location/shed"],
    );
    assert_eq!(code, 0);
    let drop_id = order_id(&out);
    a.sync().unwrap();
    assert!(a.store.quarantine_list().unwrap().is_empty());
    assert_eq!(a.store.counts().unwrap().outbox, 0);
    a.sync().unwrap();
    let (code, shown, _) = run(&cfg, &["remote", "a", "show", &drop_id]);
    assert_eq!(code, 0);
    assert!(
        shown.contains("done") && shown.contains("Location/shed dropped from quarantine"),
        "{shown}"
    );
    // Audited at both ends.
    let actions = |path: &Path| -> Vec<String> {
        let db = rusqlite::Connection::open(path).unwrap();
        let mut st = db.prepare("SELECT action FROM audit ORDER BY n").unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    };
    let at_hub = actions(&hub.store_path);
    assert_eq!(at_hub.iter().filter(|a| *a == "order").count(), 2);
    assert_eq!(at_hub.iter().filter(|a| *a == "order-result").count(), 2);
    let at_clinic = actions(&dir.path().join("a.db"));
    assert_eq!(at_clinic.iter().filter(|a| *a == "remote-order").count(), 2);
    // And listable by a person, not only verifiable.
    let (code, out, err) = run(&cfg, &["audit", "list", "--action", "order", "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    assert!(
        listed[0]["detail"]
            .as_str()
            .unwrap()
            .contains("quarantine drop Location/shed"),
        "{listed}"
    );
    let (_, text, _) = run(&cfg, &["audit", "list", "--record", "a", "--limit", "1"]);
    assert_eq!(text.lines().count(), 1, "{text}");
    // Nothing more travels: both orders are done.
    assert!(hub.store().pending_orders("a", 16).unwrap().is_empty());
}

#[test]
fn an_order_delivered_twice_runs_once_and_its_result_is_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let (_hub, mut a, _cfg) = stuck(dir.path());
    let order = Order {
        id: "o-1".into(),
        issued_ms: wall_ms(),
        by: "hub".into(),
        kind: OrderKind::QuarantineRetry { record: None },
    };
    let mut policy = a.policy.clone();
    clinicsync::remote::execute(
        &mut a.store,
        &policy,
        std::slice::from_ref(&order),
        wall_ms(),
    )
    .unwrap();
    let results = clinicsync::remote::outgoing(&a.store).unwrap();
    assert_eq!(results.len(), 1);
    clinicsync::remote::reported(&mut a.store, &results).unwrap();
    assert!(clinicsync::remote::outgoing(&a.store).unwrap().is_empty());
    // The result was lost on the way up: the hub sends the order again. It does not
    // run again (a retry would be harmless; a drop or resync would not be), and the
    // stored result goes up again.
    policy.accept_remote_orders = false;
    clinicsync::remote::execute(&mut a.store, &policy, &[order], wall_ms()).unwrap();
    let again = clinicsync::remote::outgoing(&a.store).unwrap();
    assert_eq!(again, results, "the first result, not a refusal");
    let db = rusqlite::Connection::open(dir.path().join("a.db")).unwrap();
    let ran: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM audit WHERE action = 'remote-order'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(ran, 1);
}

#[test]
fn a_clinic_that_refuses_orders_says_so_at_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let (_hub, mut a, cfg) = stuck(dir.path());
    a.policy.accept_remote_orders = false;
    let (_, out, _) = run(
        &cfg,
        &["remote", "a", "quarantine", "drop", "Location/shed"],
    );
    let id = order_id(&out);
    a.sync().unwrap();
    a.sync().unwrap();
    assert_eq!(
        a.store.quarantine_list().unwrap().len(),
        1,
        "nothing was dropped"
    );
    let o = orders(&cfg, "a");
    assert_eq!(
        (
            o[0]["id"].as_str().unwrap(),
            o[0]["state"].as_str().unwrap()
        ),
        (id.as_str(), "refused")
    );
    assert!(
        o[0]["result"]
            .as_str()
            .unwrap()
            .contains("node.remote_orders = false"),
        "{o:?}"
    );
}

#[test]
fn diagnostics_and_resync_come_back_and_bad_orders_are_refused_at_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a, cfg) = stuck(dir.path());
    hub.put(vec![patient("p2", "North"), patient("p3", "North")]);
    a.sync().unwrap();
    let (_, out, _) = run(&cfg, &["remote", "a", "diagnostics"]);
    let diag = order_id(&out);
    let (_, out, _) = run(&cfg, &["remote", "a", "resync"]);
    let resync = order_id(&out);
    a.sync().unwrap();
    // The resync reset the cursor: the next round pulls everything again (duplicates
    // change nothing), and the results go up.
    let rep = a.sync().unwrap();
    assert!(rep.pulled >= 3, "{rep:?}");
    assert_eq!(a.store.counts().unwrap().records, 4);
    let (_, shown, _) = run(&cfg, &["remote", "a", "show", &diag]);
    assert!(
        shown.contains("\"quarantine\"") && shown.contains("metadata is authoritative"),
        "{shown}"
    );
    assert!(shown.contains("\"outbox\""), "{shown}");
    let o = orders(&cfg, "a");
    assert!(
        o.iter()
            .any(|x| x["id"] == resync.as_str() && x["state"] == "done"),
        "{o:?}"
    );
    // The hub refuses what cannot be ordered, and changes nothing.
    let before = orders(&cfg, "a").len();
    let (code, _, err) = run(&cfg, &["remote", "far", "resync"]);
    assert_eq!(code, 7);
    assert!(
        err.contains("far is below district") && err.contains("district's hub"),
        "{err}"
    );
    let (code, _, err) = run(&cfg, &["remote", "nobody", "resync"]);
    assert_eq!(code, 7);
    assert!(err.contains("not a child of this hub"), "{err}");
    let (code, _, err) = run(&cfg, &["remote", "a", "quarantine", "drop", "not-a-record"]);
    assert_ne!(code, 0);
    assert!(err.contains("not-a-record"), "{err}");
    let (code, _, _) = run(&cfg, &["remote", "a", "quarantine", "retry"]);
    assert_eq!(code, 2);
    // Both a record and --all: refused as what it is, not as "give one".
    let (code, _, err) = run(
        &cfg,
        &[
            "remote",
            "a",
            "quarantine",
            "retry",
            "Location/shed",
            "--all",
        ],
    );
    assert_eq!(code, 2);
    assert!(err.contains("cannot be used with"), "{err}");
    assert!(err.contains("remote <NODE> quarantine retry"), "{err}");
    let (code, _, err) = run(&cfg, &["remote", "a", "show", "nope"]);
    assert_eq!(code, 7, "{err}");
    assert_eq!(orders(&cfg, "a").len(), before);
    // Orders go only to their node: b's pull carries none of a's.
    let b = TestClinic::new(dir.path(), "b", &hub.url, &hub.token("b"));
    run(&cfg, &["remote", "a", "diagnostics"]);
    let mut b = b;
    b.sync().unwrap();
    let db = rusqlite::Connection::open(dir.path().join("b.db")).unwrap();
    let ran: i64 = db
        .query_row("SELECT COUNT(*) FROM orders_in", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ran, 0);
}
