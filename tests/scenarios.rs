//! Scenario tests: hub and clinics over real HTTP on 127.0.0.1 with real SQLite files.

mod common;

use clinicsync::devkit::cluster;
use clinicsync::error::Classify;
use clinicsync::wire::Outcome;
use common::*;
use serde_json::json;

#[test]
fn hub_and_two_clinics_converge_and_catchments_stay_apart() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North"), ("b", "South")]),
        &["a", "b"],
        8 << 20,
    );
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    let mut b = TestClinic::new(dir.path(), "b", &hub.url, &hub.token("b"));
    hub.put(vec![
        json!({"resourceType":"Location","id":"loc-1","name":"Central"}),
    ]);
    hub.put(vec![
        patient("hub-north", "North"),
        encounter("hub-north-e", "hub-north"),
    ]);
    a.put(vec![patient("pa", "North"), encounter("pa-e1", "pa")]);
    b.put(vec![patient("pb", "South"), encounter("pb-e1", "pb")]);
    a.sync().unwrap();
    b.sync().unwrap();
    a.sync().unwrap();

    let hs = hub.store();
    assert!(
        get(&hs, "Patient/pa").is_some(),
        "a's new patient reached the hub"
    );
    assert!(get(&hs, "Patient/pb").is_some());
    for c in [&a, &b] {
        assert_eq!(
            c.get("Location/loc-1").unwrap()["name"],
            "Central",
            "metadata reached {}",
            c.id
        );
        assert_eq!(c.store.counts().unwrap().outbox, 0);
    }
    assert!(
        a.get("Patient/hub-north").is_some(),
        "a's district patient reached a"
    );
    assert!(a.get("Encounter/hub-north-e").is_some());
    assert!(
        b.get("Patient/pa").is_none(),
        "b never receives a's patients"
    );
    assert!(b.get("Patient/hub-north").is_none());
    assert!(a.get("Patient/pb").is_none());

    // Asking for another clinic's patient is refused, naming why.
    let out = b.cli(&["fetch", "Patient/pa"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("403") && err.contains("not in the catchment of b"),
        "{err}"
    );
    assert!(b.get("Patient/pa").is_none());
    // Its own patient may be fetched.
    let out = b.cli(&["fetch", "Patient/pb"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn three_edits_while_the_hub_is_unreachable_arrive_as_one_record_with_the_last_content() {
    let dir = tempfile::tempdir().unwrap();
    let port = cluster::free_port().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let mut a = TestClinic::new(dir.path(), "a", &url, "token-of-a-0123456789");
    for gender in ["male", "female", "other"] {
        a.put(vec![
            json!({"resourceType":"Patient","id":"p1","gender":gender}),
        ]);
        let err = a.sync().unwrap_err();
        assert!(err.is_retryable(), "{err}");
    }
    let status = String::from_utf8_lossy(&a.cli(&["status"]).stdout).to_string();
    assert!(status.contains("outbox      1 waiting"), "{status}");
    assert!(
        status.contains("last error") && status.contains("cannot reach parent"),
        "{status}"
    );

    let hub = TestHub::start(
        dir.path(),
        port,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let report = a.sync().unwrap();
    assert_eq!(
        report.pushed.sent, 1,
        "three edits coalesce into one record"
    );
    let hs = hub.store();
    assert_eq!(get(&hs, "Patient/p1").unwrap()["gender"], "other");
    let history = hs
        .history(&clinicsync::model::RecordKey::parse("Patient/p1").unwrap())
        .unwrap();
    assert_eq!(history.len(), 1, "the hub saw one version: {history:?}");
    assert_eq!(history[0].vv, r#"{"a":3}"#);
}

#[test]
fn a_rejected_record_is_quarantined_and_the_100_records_after_it_still_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let port = cluster::free_port().unwrap();
    let mut policy = hub_policy(&[("a", "North")]);
    policy.max_record_bytes = 2_000;
    let hub = TestHub::start(dir.path(), port, policy.clone(), &["a"], 8 << 20);
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    a.put(vec![
        json!({"resourceType":"Encounter","id":"no-subject","status":"finished"}),
        json!({"resourceType":"Foo","id":"f1"}),
        json!({"resourceType":"Patient","id":"big","text":{"div":"x".repeat(5_000)}}),
    ]);
    let valid: Vec<_> = (0..100)
        .map(|i| patient(&format!("ok{i}"), "North"))
        .collect();
    a.put(valid);
    let report = a.sync().unwrap();
    assert_eq!(report.pushed.rejected, 3);
    assert_eq!(report.pushed.accepted, 100);
    assert_eq!(hub.store().counts().unwrap().records, 100);

    let out = a.cli(&["quarantine", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reason = |r: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|q| q["record"] == r)
            .unwrap()["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(reason("Encounter/no-subject").contains("no patient reference"));
    assert!(reason("Foo/f1").contains("unknown kind"));
    assert!(reason("Patient/big").contains("over this hub's limit of 2000 bytes"));

    // A fix at the clinic is a new version: it goes at the next sync.
    a.put(vec![encounter("no-subject", "ok1")]);
    // A fix at the hub (a larger limit) plus `quarantine retry`.
    hub.stop();
    policy.max_record_bytes = 1 << 20;
    let hub = TestHub::start(dir.path(), port, policy, &["a"], 8 << 20);
    // Not due yet: a plain sync leaves it waiting.
    a.sync().unwrap();
    assert!(get(&hub.store(), "Patient/big").is_none());
    let out = a.cli(&["quarantine", "retry", "Patient/big"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Drop the record nobody will ever accept.
    let out = a.cli(&["quarantine", "drop", "Foo/f1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = a.sync().unwrap();
    assert_eq!(report.pushed.accepted, 1, "{report:?}");
    let hs = hub.store();
    assert!(get(&hs, "Patient/big").is_some());
    assert!(get(&hs, "Encounter/no-subject").is_some());
    assert!(get(&hs, "Foo/f1").is_none());
    let c = a.store.counts().unwrap();
    assert_eq!((c.quarantine, c.outbox), (0, 0));
    assert!(a.get("Foo/f1").is_some(), "dropping keeps the local record");
    let out = a.cli(&["quarantine", "drop", "Foo/f1"]);
    assert_eq!(out.status.code(), Some(7));
}

#[test]
fn a_concurrent_edit_at_the_hub_and_a_clinic_keeps_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    a.put(vec![json!({"resourceType":"Patient","id":"p1","gender":"male","address":[{"district":"North"}]})]);
    a.sync().unwrap();
    a.put(vec![json!({"resourceType":"Patient","id":"p1","gender":"female","address":[{"district":"North"}]})]);
    std::thread::sleep(std::time::Duration::from_millis(5));
    hub.put(vec![json!({"resourceType":"Patient","id":"p1","gender":"unknown","address":[{"district":"North"}]})]);
    let report = a.sync().unwrap();
    assert_eq!(report.pushed.conflict, 1);
    let hs = hub.store();
    let conflicts = hs.conflicts_list(true, None).unwrap();
    assert_eq!(conflicts.len(), 1);
    let c = &conflicts[0];
    let sides = [
        c.local_body.as_ref().unwrap()["gender"].clone(),
        c.remote_body.as_ref().unwrap()["gender"].clone(),
    ];
    assert!(
        sides.contains(&json!("female")) && sides.contains(&json!("unknown")),
        "{c:?}"
    );
    // Both nodes end on the same version; the loser is kept for review.
    let winner = get(&hs, "Patient/p1").unwrap();
    assert_eq!(a.get("Patient/p1").unwrap(), winner);
    assert_eq!(winner["gender"], "unknown", "the later clock wins");
    let out = cli(&dir.path().join("a.toml"), &["history", "Patient/p1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("changed: gender"), "{text}");
}

#[test]
fn a_pull_page_received_twice_creates_no_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    hub.put(
        (0..20)
            .map(|i| json!({"resourceType":"Location","id":format!("l{i}")}))
            .collect(),
    );
    let req = clinicsync::engine::pull_request(&a.store, "parent", 100, 1 << 20).unwrap();
    let (answer, _) = a
        .client
        .exchange("/v1/pull", &clinicsync::wire::Message::PullRequest(req))
        .unwrap();
    let clinicsync::wire::Message::PullResponse(page) = answer else {
        panic!()
    };
    for _ in 0..2 {
        clinicsync::engine::store_pull(&mut a.store, "parent", &page, (0, 0), 1).unwrap();
        clinicsync::engine::apply_inbox(&mut a.store, &a.policy, 2).unwrap();
    }
    let c = a.store.counts().unwrap();
    assert_eq!((c.records, c.inbox), (20, 0));
    let versions: i64 = a
        .store
        .conn()
        .query_row("SELECT COUNT(*) FROM history", [], |r| r.get(0))
        .unwrap();
    assert_eq!(versions, 20);
}

#[test]
fn the_same_push_over_http_twice_answers_duplicate_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    a.put(
        (0..10)
            .map(|i| patient(&format!("p{i}"), "North"))
            .collect(),
    );
    let req = clinicsync::engine::next_push(&a.store, 1, 100, 1 << 20)
        .unwrap()
        .unwrap();
    let msg = clinicsync::wire::Message::PushRequest(req);
    let (first, _) = a.client.exchange("/v1/push", &msg).unwrap();
    let before = hub.store().counts().unwrap();
    let (second, _) = a.client.exchange("/v1/push", &msg).unwrap();
    let after = hub.store().counts().unwrap();
    let outcomes = |m: clinicsync::wire::Message| match m {
        clinicsync::wire::Message::PushResponse(r) => {
            r.results.into_iter().map(|r| r.outcome).collect::<Vec<_>>()
        }
        _ => panic!(),
    };
    assert!(outcomes(first).iter().all(|o| *o == Outcome::Accepted));
    assert!(outcomes(second).iter().all(|o| *o == Outcome::Duplicate));
    assert_eq!(
        (before.records, before.head_seq, before.audit),
        (after.records, after.head_seq, after.audit)
    );
}

#[test]
fn audit_verify_passes_and_then_names_the_altered_row() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    a.put((0..5).map(|i| patient(&format!("p{i}"), "North")).collect());
    let out = a.cli(&["audit", "verify"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact: 5 entries"));
    a.store
        .conn()
        .execute("UPDATE audit SET record='Patient/forged' WHERE n=4", [])
        .unwrap();
    let out = a.cli(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(6));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("row 4") && err.contains("altered"), "{err}");
}

#[test]
fn with_the_daily_budget_spent_a_new_clinical_record_still_goes_ahead_of_bulk_data() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    // Bulk: 6,000 Locations the clinic has yet to pull.
    hub.put(
        (0..6000)
            .map(|i| clinicsync::synth::location(&format!("bulk-{i}"), "Dispensary", "North"))
            .collect(),
    );
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    // Well under the bulk's size in either protocol (v2 packs these 6,000 near
    // copies into ~20 KB).
    a.sync_cfg.daily_budget_bytes = 8_000;
    a.sync_cfg.pull_page_records = 300;
    let r = a.sync().unwrap();
    let held = a.store.counts().unwrap().records;
    assert!(
        held > 0 && held < 6000,
        "pulled {held} of 6000 within the budget"
    );
    assert!(
        r.held_back
            .as_deref()
            .unwrap_or("")
            .contains("daily budget"),
        "{r:?}"
    );
    // A patient registered now is urgent: it goes although the budget is spent,
    // while the bulk pull waits for tomorrow.
    a.put(vec![patient("urgent", "North")]);
    let r = a.sync().unwrap();
    assert_eq!(r.pushed.accepted, 1, "{r:?}");
    assert_eq!(r.pulled, 0, "bulk data went ahead of the budget: {r:?}");
    assert!(get(&hub.store(), "Patient/urgent").is_some());
    assert!(r.bytes_today >= 8_000);
}
