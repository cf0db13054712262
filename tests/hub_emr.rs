//! A hub with its own EMR (the central OpenMRS at the root): the metadata authority
//! whose metadata flows down, and the place every clinic's pushed records land —
//! in dependency order, with the same quarantine, waiting and retry as a clinic.
//! The EMR here is an in-memory one implementing the adapter trait, so each test
//! decides exactly what it refuses and when it is down; the OpenMRS adapter itself
//! is tested against the simulator in `tests/openmrs.rs`.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use clinicsync::emr::{Emr, EmrError, Fetched};
use clinicsync::engine::{self, Policy};
use clinicsync::model::{RecordKey, Snapshot, Version};
use clinicsync::store::Store;
use clinicsync::time::wall_ms;
use common::*;
use serde_json::{json, Value};

#[derive(Default)]
struct Central {
    records: BTreeMap<RecordKey, Value>,
    /// Change log: the EMR's own feed (index = position).
    feed: Vec<RecordKey>,
    refuse: Vec<String>,
    down: bool,
    writes: usize,
}

#[derive(Clone, Default)]
struct FakeEmr(Arc<Mutex<Central>>);

impl FakeEmr {
    fn with<R>(&self, f: impl FnOnce(&mut Central) -> R) -> R {
        f(&mut self.0.lock().unwrap())
    }
    /// A clinician (or the metadata team) writes at the centre.
    fn save(&self, v: Value) {
        let s = Snapshot::from_json_value(v.clone()).unwrap();
        self.with(|c| {
            c.records.insert(s.key.clone(), v);
            c.feed.push(s.key);
        });
    }
    fn get(&self, r: &str) -> Option<Value> {
        let k = RecordKey::parse(r).unwrap();
        self.with(|c| c.records.get(&k).cloned())
    }
}

impl Emr for FakeEmr {
    fn changes(&mut self, cursor: Option<&str>) -> Result<(Vec<RecordKey>, String), EmrError> {
        self.with(|c| {
            if c.down {
                return Err(EmrError::Unavailable("central EMR down".into()));
            }
            let from: usize = cursor.and_then(|s| s.parse().ok()).unwrap_or(0);
            Ok((
                c.feed[from.min(c.feed.len())..].to_vec(),
                c.feed.len().to_string(),
            ))
        })
    }
    fn fetch(&mut self, key: &RecordKey) -> Result<Option<Fetched>, EmrError> {
        self.with(|c| {
            if c.down {
                return Err(EmrError::Unavailable("central EMR down".into()));
            }
            Ok(c.records
                .get(key)
                .map(|v| Fetched::Present(Snapshot::from_json_value(v.clone()).unwrap())))
        })
    }
    fn apply(&mut self, version: &Version) -> Result<Fetched, EmrError> {
        self.with(|c| {
            if c.down {
                return Err(EmrError::Unavailable("central EMR down".into()));
            }
            let key = version.key().clone();
            if c.refuse.contains(&key.to_string()) {
                return Err(EmrError::Refused {
                    status: 400,
                    message: format!("{key}: Invalid Submission: identifier is required"),
                });
            }
            c.writes += 1;
            c.feed.push(key.clone());
            if version.deleted {
                c.records.remove(&key);
                return Ok(Fetched::Gone);
            }
            c.records.insert(key, version.snapshot.json());
            Ok(Fetched::Present(version.snapshot.clone()))
        })
    }
    fn probe(&mut self) -> Result<String, EmrError> {
        Ok("fake".into())
    }
}

fn root_policy() -> Policy {
    let mut p = hub_policy(&[("a", "North"), ("b", "North")]);
    p.external_emr = true;
    p.serves_children = true;
    p.emr_retry_ms = 1;
    p
}

/// One EMR round at the root, as its daemon runs it: capture, then apply.
fn central_round(hub: &TestHub, emr: &mut FakeEmr) -> clinicsync::emr::flow::EmrApplySummary {
    let mut s: Store = hub.store();
    clinicsync::emr::flow::capture_from_emr(&mut s, &hub.policy, emr, wall_ms()).unwrap();
    clinicsync::emr::flow::apply_replica_to_emr(&mut s, &hub.policy, emr, wall_ms()).unwrap()
}

fn obs(id: &str, patient: &str, enc: &str) -> Value {
    json!({"resourceType":"Observation","id":id,"status":"final","code":{"text":"Weight"},
           "valueQuantity":{"value":61},"subject":{"reference":format!("Patient/{patient}")},
           "encounter":{"reference":format!("Encounter/{enc}")}})
}

#[test]
fn metadata_from_the_central_emr_reaches_clinics_and_their_records_reach_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path(), 0, root_policy(), &["a", "b"], 8 << 20);
    let mut central = FakeEmr::default();
    central.save(json!({"resourceType":"Location","id":"loc-1","name":"Kakamega DH"}));
    central.save(json!({"resourceType":"openmrs:concept","id":"c-weight","display":"Weight (kg)"}));
    central_round(&hub, &mut central);

    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    let mut b = TestClinic::new(dir.path(), "b", &hub.url, &hub.token("b"));
    a.sync().unwrap();
    assert!(
        a.get("Location/loc-1").is_some(),
        "metadata did not reach a"
    );
    assert!(a.get("openmrs:concept/c-weight").is_some());

    a.put(vec![
        patient("p1", "North"),
        encounter("e1", "p1"),
        obs("o1", "p1", "e1"),
    ]);
    a.sync().unwrap();
    let s = central_round(&hub, &mut central);
    assert_eq!(s.applied.applied, 3, "{s:?}");
    for r in ["Patient/p1", "Encounter/e1", "Observation/o1"] {
        assert!(
            central.get(r).is_some(),
            "{r} did not reach the central EMR"
        );
    }
    // Ten more rounds everywhere: nothing written again, nothing captured back as
    // new, one copy of each record in every store.
    let writes = central.with(|c| c.writes);
    for _ in 0..10 {
        let s = central_round(&hub, &mut central);
        assert_eq!(s.applied.applied, 0, "{s:?}");
        a.sync().unwrap();
        b.sync().unwrap();
    }
    assert_eq!(central.with(|c| c.writes), writes, "records written twice");
    assert_eq!(hub.store().counts().unwrap().outbox, 0);
    assert_eq!(
        b.get("Observation/o1").unwrap(),
        a.get("Observation/o1").unwrap()
    );
    let history = hub
        .store()
        .history(&RecordKey::parse("Patient/p1").unwrap())
        .unwrap();
    assert_eq!(
        history.len(),
        1,
        "the echo made a second version: {history:?}"
    );
}

#[test]
fn a_record_the_central_emr_refuses_waits_with_its_dependents_and_the_rest_flows() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path(), 0, root_policy(), &["a", "b"], 8 << 20);
    let mut central = FakeEmr::default();
    central.with(|c| c.refuse.push("Patient/p-bad".into()));
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    a.put(vec![
        patient("p-bad", "North"),
        encounter("e-bad", "p-bad"),
        patient("p-ok", "North"),
        encounter("e-ok", "p-ok"),
    ]);
    a.sync().unwrap();
    let s = central_round(&hub, &mut central);
    assert_eq!(
        (s.applied.applied, s.refused, s.blocked),
        (2, 1, 1),
        "{s:?}"
    );
    assert!(central.get("Encounter/e-ok").is_some());
    assert!(central.get("Encounter/e-bad").is_none());
    let q = hub.store().quarantine_list().unwrap();
    let reasons: Vec<String> = q
        .iter()
        .map(|e| format!("{} {}", e.record, e.reason))
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("Patient/p-bad") && r.contains("identifier is required")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("Encounter/e-bad") && r.contains("waiting for Patient/p-bad")),
        "{reasons:?}"
    );
    // The EMR is fixed: the next rounds apply the patient, then what waited for it,
    // with no command typed.
    central.with(|c| c.refuse.clear());
    std::thread::sleep(std::time::Duration::from_millis(5));
    central_round(&hub, &mut central);
    central_round(&hub, &mut central);
    assert!(central.get("Patient/p-bad").is_some());
    assert!(central.get("Encounter/e-bad").is_some());
    assert!(hub.store().quarantine_list().unwrap().is_empty());
}

#[test]
fn an_unavailable_central_emr_stops_the_pass_quarantines_nothing_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path(), 0, root_policy(), &["a"], 8 << 20);
    let mut central = FakeEmr::default();
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    a.put(vec![patient("p1", "North"), encounter("e1", "p1")]);
    a.sync().unwrap();
    central.with(|c| c.down = true);
    let mut s = hub.store();
    let err =
        clinicsync::emr::flow::apply_replica_to_emr(&mut s, &hub.policy, &mut central, wall_ms())
            .unwrap_err();
    assert!(err.to_string().contains("unavailable"), "{err}");
    assert!(
        s.quarantine_list().unwrap().is_empty(),
        "the records were blamed"
    );
    // A clinic's push is still answered while the central EMR is down.
    a.put(vec![encounter("e2", "p1")]);
    assert_eq!(a.sync().unwrap().pushed.accepted, 1);
    central.with(|c| c.down = false);
    let s = central_round(&hub, &mut central);
    assert_eq!(s.applied.applied, 3, "{s:?}");
}

#[test]
fn a_root_hub_may_have_an_emr() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("root.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"root\"\nstore = \"{}\"\n[hub]\nlisten = \"127.0.0.1:0\"\n[emr]\nkind = \"openmrs\"\nurl = \"http://127.0.0.1:9\"\ncredentials_file = \"{}\"\n",
            dir.path().join("root.db").display(),
            dir.path().join("cred").display()
        ),
    )
    .unwrap();
    let out = cli(&config, &["config", "check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Clinic "a"'s first pull page from its hub, fetched by hand (not yet stored).
fn first_pull_page(a: &mut TestClinic) -> clinicsync::wire::PullResponse {
    use clinicsync::wire::{Cursor, Message, PullRequest};
    let msg = Message::PullRequest(PullRequest {
        node: "a".into(),
        cursor: Cursor::default(),
        max_bytes: 1 << 20,
        max_records: 1000,
        include_own: false,
        answer_chunk: 0,
        health: Vec::new(),
        order_results: Vec::new(),
    });
    let Message::PullResponse(page) = a.client.exchange("/v1/pull", &msg).unwrap().0 else {
        panic!("expected a pull response")
    };
    page
}

/// The same in-memory EMR as a clinic's: a conflict found while applying a pulled
/// version, then reviewed at the clinic, ends in the clinic's EMR and at the hub.
#[test]
fn a_conflict_reviewed_at_a_clinic_with_an_emr_is_written_into_it_and_sent_up() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    a.policy.external_emr = true;
    a.policy.emr_retry_ms = 1;
    let mut emr = FakeEmr::default();
    let p = |gender: &str| json!({"resourceType": "Patient", "id": "p1", "gender": gender, "address": [{"district": "North"}]});
    emr.save(p("male"));
    clinicsync::emr::flow::capture_from_emr(&mut a.store, &a.policy, &mut emr, wall_ms()).unwrap();
    a.sync().unwrap();
    // A clinician edits in the clinic's EMR; before that goes up, the hub's later
    // edit of the same field arrives: a conflict at the clinic, the later clock wins.
    emr.save(p("female"));
    clinicsync::emr::flow::capture_from_emr(&mut a.store, &a.policy, &mut emr, wall_ms()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    hub.put(vec![p("unknown")]);
    let page = first_pull_page(&mut a);
    engine::store_pull(&mut a.store, "parent", &page, (0, 0), wall_ms()).unwrap();
    clinicsync::emr::flow::apply_inbox_to_emr(&mut a.store, &a.policy, &mut emr, wall_ms())
        .unwrap();
    assert_eq!(emr.get("Patient/p1").unwrap()["gender"], "unknown");
    let conflicts = a.store.conflicts_list(false, None).unwrap();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    // The clinic's data manager keeps the clinic's side.
    let r = engine::review_conflict(
        &mut a.store,
        &a.policy,
        conflicts[0].n,
        engine::Keep::Local,
        false,
        "local",
        wall_ms(),
    )
    .unwrap();
    assert!(r.new_vv.is_some());
    assert_eq!(
        emr.get("Patient/p1").unwrap()["gender"],
        "unknown",
        "not yet"
    );
    let due = clinicsync::emr::flow::apply_due_to_emr(&mut a.store, &a.policy, &mut emr, wall_ms())
        .unwrap();
    assert_eq!(due.applied.applied, 1, "{due:?}");
    assert_eq!(emr.get("Patient/p1").unwrap()["gender"], "female");
    assert!(a.store.quarantine_list().unwrap().is_empty());
    // Its own write comes back from the EMR's feed as an echo, not a new edit.
    let c = clinicsync::emr::flow::capture_from_emr(&mut a.store, &a.policy, &mut emr, wall_ms())
        .unwrap();
    assert_eq!(c.captured, 0, "{c:?}");
    let rep = a.sync().unwrap();
    assert_eq!(
        (rep.pushed.accepted, rep.pushed.conflict),
        (1, 0),
        "{rep:?}"
    );
    assert_eq!(get(&hub.store(), "Patient/p1").unwrap()["gender"], "female");
}

/// A pulled record the clinic cannot read (a newer or broken parent) does not stop a
/// clinic's EMR pass: the rest is written into the EMR, the unreadable one waits in
/// quarantine at stage `pull`, held as received, and is not written anywhere.
#[test]
fn an_unreadable_pulled_record_waits_and_the_rest_reaches_the_clinic_s_emr() {
    use clinicsync::store::Stage;
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    a.policy.external_emr = true;
    let mut emr = FakeEmr::default();
    let p =
        |id: &str| json!({"resourceType": "Patient", "id": id, "address": [{"district": "North"}]});
    hub.put(vec![p("p1"), p("p2")]);
    let mut page = first_pull_page(&mut a);
    let bad = page
        .records
        .iter_mut()
        .find(|r| r.id == "p2")
        .expect("p2 pulled");
    bad.body = r#"{"resourceType": "Patient", "id": "p2", "gender": }"#.into();
    engine::store_pull(&mut a.store, "parent", &page, (0, 0), wall_ms()).unwrap();
    let s = clinicsync::emr::flow::apply_inbox_to_emr(&mut a.store, &a.policy, &mut emr, wall_ms())
        .unwrap();
    assert_eq!(s.applied.applied, 1, "{s:?}");
    assert!(emr.get("Patient/p1").is_some());
    assert!(emr.get("Patient/p2").is_none());
    let q = a.store.quarantine_list().unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(
        (q[0].record.as_str(), q[0].stage),
        ("Patient/p2", Stage::Pull)
    );
    assert_eq!(a.store.counts().unwrap().inbox, 1, "held as received");
    // Nothing else is owed to the EMR: the held record is not an EMR retry.
    let due = clinicsync::emr::flow::apply_due_to_emr(&mut a.store, &a.policy, &mut emr, wall_ms())
        .unwrap();
    assert_eq!(due.applied.applied, 0, "{due:?}");
    assert!(emr.get("Patient/p2").is_none());
}
