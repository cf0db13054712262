//! The OpenMRS adapter against the OpenMRS simulator (atom feed, FHIR2, REST v1),
//! with a real hub over HTTP in between. The simulator runs OpenMRS's defaults
//! (the atomfeed module's shipped feed configuration, FHIR2 with no upsert), so
//! the adapter reads the shipped categories.

mod common;

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clinicsync::client::{self, EmrReport, SyncReport};
use clinicsync::devkit::openmrs_sim::{FeedStyle, OpenMrsSim};
use clinicsync::emr::openmrs::{OpenMrs, Start, SHIPPED_CATEGORIES};
use clinicsync::emr::{CheckLevel, Emr, Fetched};
use clinicsync::model::RecordKey;
use clinicsync::secret::Secret;
use common::*;
use serde_json::json;

fn shipped() -> Vec<String> {
    SHIPPED_CATEGORIES.iter().map(|s| s.to_string()).collect()
}

fn adapter(sim: &OpenMrsSim, timeout: Duration) -> OpenMrs {
    OpenMrs::new(
        &sim.url,
        "admin",
        &Secret::new("Admin123".into()),
        shipped(),
        Start::Beginning,
        timeout,
    )
}

fn clinic(dir: &std::path::Path, id: &str, hub: &TestHub) -> TestClinic {
    let mut c = TestClinic::new(dir, id, &hub.url, &hub.token(id));
    c.policy.external_emr = true;
    c.policy.emr_retry_ms = 300;
    c
}

fn round(c: &mut TestClinic, emr: &mut OpenMrs) -> (SyncReport, EmrReport) {
    client::round(
        &mut c.store,
        &c.policy,
        &c.client,
        &c.sync_cfg,
        Some(emr),
        &AtomicBool::new(false),
    )
    .unwrap()
}

fn key(r: &str) -> RecordKey {
    RecordKey::parse(r).unwrap()
}

/// Live records of a kind in a store (tombstones left out).
fn live(store: &clinicsync::store::Store, kind: &str) -> Vec<String> {
    store
        .list(Some(kind))
        .unwrap()
        .into_iter()
        .filter(|s| !s.version.deleted)
        .map(|s| s.version.snapshot.key.id.clone())
        .collect()
}

/// A hub whose rules put the North district in these clinics' catchments, holding
/// one Location: a clinic's first rounds pull before they capture until its cursor
/// has moved (client::round's first contact), so tests begin with something to pull.
fn seeded_hub(dir: &std::path::Path, clinics: &[&str]) -> TestHub {
    let rules: Vec<(&str, &str)> = clinics.iter().map(|c| (*c, "North")).collect();
    let hub = TestHub::start(dir, 0, hub_policy(&rules), clinics, 8 << 20);
    hub.put(vec![
        json!({"resourceType": "Location", "id": "seed", "name": "Seed"}),
    ]);
    hub
}

/// Two clinics, each with its own OpenMRS (simulated), and a hub whose rules put
/// the North district in both catchments.
struct Pair {
    dir: tempfile::TempDir,
    hub: TestHub,
    sim_a: OpenMrsSim,
    sim_b: OpenMrsSim,
    ea: OpenMrs,
    eb: OpenMrs,
    a: TestClinic,
    b: TestClinic,
}

fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let hub = seeded_hub(dir.path(), &["a", "b"]);
    let (sim_a, sim_b) = (
        OpenMrsSim::start("admin", "Admin123").unwrap(),
        OpenMrsSim::start("admin", "Admin123").unwrap(),
    );
    let (mut ea, mut eb) = (
        adapter(&sim_a, Duration::from_secs(5)),
        adapter(&sim_b, Duration::from_secs(5)),
    );
    let mut a = clinic(dir.path(), "a", &hub);
    let mut b = clinic(dir.path(), "b", &hub);
    // First contact: both clinics pull the seed (and write it into their OpenMRS).
    round(&mut a, &mut ea);
    round(&mut b, &mut eb);
    Pair {
        dir,
        hub,
        sim_a,
        sim_b,
        ea,
        eb,
        a,
        b,
    }
}

#[test]
fn a_patient_flows_from_one_openmrs_through_the_hub_to_another() {
    let Pair {
        dir: _dir,
        hub,
        sim_a,
        sim_b,
        mut ea,
        mut eb,
        mut a,
        mut b,
    } = pair();

    // Registered in A's OpenMRS by a clinician.
    sim_a.save(patient_om("p-1", "North", "female"));
    sim_a.save(encounter_om("e-1", "p-1"));
    let (r, e) = round(&mut a, &mut ea);
    assert_eq!(e.capture.as_ref().unwrap().captured, 2, "{e:?}");
    assert_eq!(r.pushed.accepted, 2);
    assert!(get(&hub.store(), "Patient/p-1").is_some());

    let (_, e) = round(&mut b, &mut eb);
    assert!(e.error.is_none(), "{e:?}");
    let in_b = sim_b
        .get("Patient", "p-1")
        .expect("in B's OpenMRS")
        .expect("not voided");
    assert_eq!(in_b["gender"], "female");
    assert!(sim_b.get("Encounter", "e-1").is_some());

    // Echo: B's next capture sees the feed events its own writes caused, and skips them.
    let (r, e) = round(&mut b, &mut eb);
    let cap = e.capture.unwrap();
    assert_eq!(
        (cap.captured, r.pushed.sent),
        (0, 0),
        "pulled records came back as local changes: {cap:?}"
    );
    assert!(cap.echoes >= 2, "{cap:?}");
    assert_eq!(b.store.counts().unwrap().outbox, 0);

    // An edit in A follows.
    sim_a.save(patient_om("p-1", "North", "other"));
    round(&mut a, &mut ea);
    round(&mut b, &mut eb);
    assert_eq!(
        sim_b.get("Patient", "p-1").unwrap().unwrap()["gender"],
        "other"
    );

    // A voided patient arrives voided.
    sim_a.void("Patient", "p-1");
    round(&mut a, &mut ea);
    round(&mut b, &mut eb);
    assert_eq!(
        sim_b.get("Patient", "p-1"),
        Some(None),
        "voided in B's OpenMRS"
    );
    let hs = hub.store();
    let key = clinicsync::model::RecordKey::parse("Patient/p-1").unwrap();
    assert!(hs.current(&key).unwrap().unwrap().version.deleted);

    // Metadata created at the hub reaches both OpenMRS instances (FHIR2 and REST v1).
    hub.put(vec![
        json!({"resourceType": "Location", "id": "loc-new", "name": "New Dispensary", "status": "active"}),
        json!({"resourceType": "openmrs:concept", "id": "5089AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "display": "Weight (kg)", "datatype": {"display": "Numeric"}}),
    ]);
    for (c, e, sim) in [(&mut a, &mut ea, &sim_a), (&mut b, &mut eb, &sim_b)] {
        let (_, rep) = round(c, e);
        assert!(rep.error.is_none(), "{rep:?}");
        assert_eq!(
            sim.get("Location", "loc-new").unwrap().unwrap()["name"],
            "New Dispensary"
        );
    }
    let concept = sim_a.get("openmrs:concept", "5089AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert!(
        matches!(concept, Some(Some(_))),
        "concept reached A through REST v1: {concept:?}"
    );
    // And nothing went back up as a clinic's own change.
    assert_eq!(
        (
            a.store.counts().unwrap().outbox,
            b.store.counts().unwrap().outbox
        ),
        (0, 0)
    );
}

#[test]
fn a_patient_openmrs_refuses_waits_with_its_encounters_and_retries_by_itself() {
    let Pair {
        dir: _dir,
        hub: _hub,
        sim_a,
        sim_b,
        mut ea,
        mut eb,
        mut a,
        mut b,
    } = pair();
    sim_b.refuse(
        "Patient",
        "p-bad",
        400,
        "Patient is missing a preferred identifier",
    );
    for (p, e) in [("p-ok", "e-ok"), ("p-bad", "e-bad")] {
        sim_a.save(patient_om(p, "North", "male"));
        sim_a.save(encounter_om(e, p));
    }
    round(&mut a, &mut ea);
    let (_, rep) = round(&mut b, &mut eb);
    let applied = rep.apply.unwrap();
    assert_eq!((applied.refused, applied.blocked), (1, 1), "{applied:?}");
    assert!(
        sim_b.get("Patient", "p-ok").is_some() && sim_b.get("Encounter", "e-ok").is_some(),
        "everything else arrives"
    );
    let q = b.store.quarantine_list().unwrap();
    let reason = |r: &str| {
        q.iter()
            .find(|e| e.record == r)
            .map(|e| e.reason.clone())
            .unwrap_or_default()
    };
    assert!(
        reason("Patient/p-bad").contains("Patient is missing a preferred identifier"),
        "{q:?}"
    );
    assert!(
        reason("Encounter/e-bad").contains("waiting for Patient/p-bad"),
        "{q:?}"
    );

    // OpenMRS is fixed; nobody types a command: the rounds' backoff retries deliver both.
    sim_b.accept("Patient", "p-bad");
    let started = Instant::now();
    while sim_b.get("Encounter", "e-bad").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "never retried: {:?}",
            b.store.quarantine_list().unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
        round(&mut b, &mut eb);
    }
    assert!(sim_b.get("Patient", "p-bad").unwrap().is_some());
    assert_eq!(b.store.counts().unwrap().quarantine, 0);
}

#[test]
fn broken_feeds_garbage_and_hangs_are_reported_and_nothing_stops() {
    let dir = tempfile::tempdir().unwrap();
    let hub = seeded_hub(dir.path(), &["a"]);
    let sim = OpenMrsSim::start("admin", "Admin123").unwrap();
    let mut emr = adapter(&sim, Duration::from_secs(1));
    let mut a = clinic(dir.path(), "a", &hub);
    sim.save(patient_om("p-0", "North", "male"));
    round(&mut a, &mut emr);

    // Garbage instead of the feed: capture fails loudly, the link to the hub still works.
    sim.with(|s| s.garbage_feed = true);
    hub.put(vec![
        json!({"resourceType": "Location", "id": "still-flows"}),
    ]);
    let (_, rep) = round(&mut a, &mut emr);
    assert!(
        rep.error
            .as_deref()
            .unwrap_or("")
            .contains("not an Atom feed"),
        "{rep:?}"
    );
    assert!(
        a.get("Location/still-flows").is_some(),
        "pulls go on while the feed is garbage"
    );
    // What `status` shows as the EMR's last error:
    let e = a.store.peer_state("emr").unwrap();
    assert!(e.last_error.unwrap().contains("not an Atom feed"));
    sim.with(|s| s.garbage_feed = false);

    // A broken archive chain: the marker sits on a page behind the broken link.
    for i in 1..=12 {
        sim.save(patient_om(&format!("p-{i}"), "North", "female"));
    }
    // One category's chain broken is that category's problem: the others are read,
    // and the adapter reports it (the engine records take_warnings as the EMR's
    // last error).
    sim.with(|s| s.broken_chain = true);
    hub.put(vec![
        json!({"resourceType": "Location", "id": "still-flows-2"}),
    ]);
    sim.save(encounter_om("e-during", "p-0"));
    let (_, rep) = round(&mut a, &mut emr);
    // The engine drained the adapter's warnings into the EMR's last error (`status`).
    let emr_state = a.store.peer_state("emr").unwrap();
    let warning = emr_state.last_error.clone().unwrap_or_default();
    assert!(
        warning.contains("archive chain broken"),
        "{rep:?} {warning:?}"
    );
    assert!(a.get("Location/still-flows-2").is_some());
    assert!(
        get(&hub.store(), "Encounter/e-during").is_some(),
        "the encounter feed was read while the patient feeds were broken"
    );
    sim.with(|s| s.broken_chain = false);

    // FHIR answering HTML.
    sim.with(|s| s.fhir_not_json = true);
    let (_, rep) = round(&mut a, &mut emr);
    assert!(
        rep.error
            .as_deref()
            .unwrap_or("")
            .contains("did not answer JSON"),
        "{rep:?}"
    );
    sim.with(|s| s.fhir_not_json = false);

    // A 30-second hang: the adapter's timeout ends the wait, the round goes on.
    sim.with(|s| s.hang_ms = 30_000);
    let t0 = Instant::now();
    let (_, rep) = round(&mut a, &mut emr);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "a hang stopped the round for {:?}",
        t0.elapsed()
    );
    assert!(
        rep.error
            .as_deref()
            .unwrap_or("")
            .to_lowercase()
            .contains("timed out"),
        "{rep:?}"
    );
    sim.with(|s| s.hang_ms = 0);

    // All cleared: nothing was lost or skipped while the EMR misbehaved.
    let (_, rep) = round(&mut a, &mut emr);
    assert!(rep.error.is_none(), "{rep:?}");
    let hs = hub.store();
    for i in 0..=12 {
        assert!(get(&hs, &format!("Patient/p-{i}")).is_some(), "p-{i} lost");
    }
}

#[test]
fn a_clinic_cloned_from_another_starts_its_feeds_at_now() {
    let dir = tempfile::tempdir().unwrap();
    let hub = seeded_hub(dir.path(), &["a"]);
    let sim = OpenMrsSim::start("admin", "Admin123").unwrap();
    // The database this clinic was cloned from already holds history.
    for i in 0..7 {
        sim.save(patient_om(&format!("old-{i}"), "North", "male"));
    }
    let mut emr = OpenMrs::new(
        &sim.url,
        "admin",
        &Secret::new("Admin123".into()),
        shipped(),
        Start::Now,
        Duration::from_secs(5),
    );
    let mut a = clinic(dir.path(), "a", &hub);
    let (r, e) = round(&mut a, &mut emr);
    assert_eq!(
        (e.capture.unwrap().captured, r.pushed.sent),
        (0, 0),
        "old history was re-sent"
    );
    sim.save(patient_om("new-1", "North", "female"));
    let (r, _) = round(&mut a, &mut emr);
    assert_eq!(r.pushed.accepted, 1);
    assert!(get(&hub.store(), "Patient/new-1").is_some());
    assert!(get(&hub.store(), "Patient/old-0").is_none());
}

#[test]
fn dropping_a_refused_patient_releases_the_records_waiting_for_it() {
    let Pair {
        dir: _dir,
        hub: _hub,
        sim_a,
        sim_b,
        mut ea,
        mut eb,
        mut a,
        mut b,
    } = pair();
    b.policy.emr_retry_ms = 3_600_000;
    sim_b.refuse(
        "Patient",
        "p-x",
        400,
        "Patient is missing a preferred identifier",
    );
    sim_a.save(patient_om("p-x", "North", "male"));
    sim_a.save(encounter_om("e-x", "p-x"));
    round(&mut a, &mut ea);
    round(&mut b, &mut eb);
    let waiting = |b: &TestClinic| {
        b.store
            .quarantine_list()
            .unwrap()
            .into_iter()
            .find(|q| q.record == "Encounter/e-x")
            .map(|q| q.reason)
    };
    assert!(waiting(&b).unwrap().contains("waiting for Patient/p-x"));
    // The technician gives up on the patient: the encounter no longer waits for it,
    // and OpenMRS now says why it cannot take it either.
    let out = b.cli(&["quarantine", "drop", "Patient/p-x"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    round(&mut b, &mut eb);
    // REST v1 creates the encounter under its uuid and finds no patient for it.
    let reason = waiting(&b).expect("still quarantined");
    assert!(
        reason.contains("Invalid Submission") && reason.contains("patient: Patient is required"),
        "{reason}"
    );
}

#[test]
fn the_fhir_adapter_falls_back_to_last_updated_search_without_history() {
    // OpenMRS's FHIR2 module has no _history: the generic adapter must notice and
    // capture by `_lastUpdated` search instead.
    use clinicsync::emr::fhir::FhirServer;
    let dir = tempfile::tempdir().unwrap();
    let hub = seeded_hub(dir.path(), &["a"]);
    let sim = OpenMrsSim::start("admin", "Admin123").unwrap();
    let mut emr = FhirServer::new(
        &format!("{}/openmrs/ws/fhir2/R4", sim.url),
        Some(("admin".into(), Secret::new("Admin123".into()))),
        vec!["Patient".into(), "Encounter".into()],
        false,
        Duration::from_secs(5),
    );
    let mut a = clinic(dir.path(), "a", &hub);
    sim.save(patient_om("ps-1", "North", "female"));
    sim.save(encounter_om("es-1", "ps-1"));
    let (_, e) = client::round(
        &mut a.store,
        &a.policy,
        &a.client,
        &a.sync_cfg,
        Some(&mut emr),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(e.error.is_none(), "{e:?}");
    assert_eq!(e.capture.unwrap().captured, 2);
    assert!(
        a.store
            .meta(&clinicsync::store::meta::EMR_CURSOR)
            .unwrap()
            .unwrap()
            .contains("search"),
        "did not fall back"
    );
    std::thread::sleep(Duration::from_millis(5));
    sim.save(patient_om("ps-1", "North", "other"));
    client::round(
        &mut a.store,
        &a.policy,
        &a.client,
        &a.sync_cfg,
        Some(&mut emr),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(
        get(&hub.store(), "Patient/ps-1").unwrap()["gender"],
        "other"
    );
    assert!(get(&hub.store(), "Encounter/es-1").is_some());
}

/// The keys one capture names, and what each fetches to.
fn capture_once(emr: &mut OpenMrs, cursor: Option<&str>) -> (Vec<RecordKey>, String) {
    emr.changes(cursor).unwrap()
}

fn present(emr: &mut OpenMrs, k: &RecordKey) -> serde_json::Value {
    match emr.fetch(k).unwrap() {
        Some(Fetched::Present(s)) => s.json(),
        other => panic!("{k}: {other:?}"),
    }
}

#[test]
fn the_shipped_the_fhir2_and_bahmnis_feed_configurations_each_capture_every_announced_record() {
    for style in [FeedStyle::Shipped, FeedStyle::Fhir2, FeedStyle::Bahmni] {
        let sim = OpenMrsSim::start("admin", "Admin123").unwrap();
        sim.set_feed_style(style);
        sim.save(json!({"resourceType": "Location", "id": "loc-1", "name": "Dispensary"}));
        sim.save(patient_om("p-1", "North", "female"));
        sim.save(encounter_om("e-1", "p-1"));
        sim.save(obs_om("o-1", "p-1", "e-1", 60.0));
        sim.save(json!({"resourceType": "Encounter", "id": "v-1", "subject": {"reference": "Patient/p-1"},
            "type": [{"coding": [{"system": "http://fhir.openmrs.org/code-system/visit-type", "code": "vt-1"}]}]}));
        sim.save(json!({"resourceType": "AllergyIntolerance", "id": "a-1", "patient": {"reference": "Patient/p-1"},
            "code": {"coding": [{"code": "penicillin"}]}}));
        sim.save(json!({"resourceType": "MedicationRequest", "id": "m-1", "subject": {"reference": "Patient/p-1"}, "status": "active", "intent": "order"}));
        let (categories, expected): (Vec<String>, &[&str]) = match style {
            // Bahmni publishes patients, encounter transactions (their observations
            // included) and locations.
            FeedStyle::Bahmni => (
                vec!["patient".into(), "encounter".into(), "location".into()],
                &[
                    "Location/loc-1",
                    "Patient/p-1",
                    "Encounter/e-1",
                    "Observation/o-1",
                ],
            ),
            _ => (
                shipped(),
                &[
                    "Location/loc-1",
                    "Patient/p-1",
                    "Encounter/e-1",
                    "Observation/o-1",
                    "Encounter/v-1",
                    "AllergyIntolerance/a-1",
                    "MedicationRequest/m-1",
                ],
            ),
        };
        let mut emr = OpenMrs::new(
            &sim.url,
            "admin",
            &Secret::new("Admin123".into()),
            categories,
            Start::Beginning,
            Duration::from_secs(5),
        );
        let (keys, cursor) = capture_once(&mut emr, None);
        for e in expected {
            assert!(keys.contains(&key(e)), "{style:?}: {e} not in {keys:?}");
            let body = present(&mut emr, &key(e));
            assert!(body.get("text").is_none(), "narrative is not transported");
        }
        assert_eq!(keys.len(), expected.len(), "{style:?}: {keys:?}");
        // The next capture finds nothing new.
        let (again, _) = capture_once(&mut emr, Some(&cursor));
        assert!(again.is_empty(), "{style:?}: {again:?}");
    }
}

#[test]
fn archive_links_naming_a_proxy_host_are_followed_through_our_url() {
    let sim = OpenMrsSim::start("admin", "Admin123").unwrap();
    // OpenMRS behind a reverse proxy: its links name a host this box cannot reach.
    sim.set_uri_prefix(Some("http://emr-proxy.invalid:8080/openmrs"));
    for i in 0..12 {
        sim.save(patient_om(&format!("p-{i}"), "North", "male"));
    }
    let mut emr = adapter(&sim, Duration::from_secs(5));
    let (keys, _) = capture_once(&mut emr, None);
    let patients = keys.iter().filter(|k| k.kind == "Patient").count();
    assert_eq!(patients, 12, "{keys:?} {:?}", emr.take_warnings());
}

#[test]
fn one_unreachable_category_is_reported_and_the_others_are_captured() {
    let sim = OpenMrsSim::start("admin", "Admin123").unwrap();
    sim.save(patient_om("p-1", "North", "male"));
    sim.save(encounter_om("e-1", "p-1"));
    sim.with(|s| s.fail_category = Some("patient".into()));
    let mut emr = adapter(&sim, Duration::from_secs(5));
    let (keys, cursor) = capture_once(&mut emr, None);
    assert!(keys.contains(&key("Encounter/e-1")), "{keys:?}");
    let warnings = emr.take_warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("feed patient not read") && w.contains("500")),
        "{warnings:?}"
    );
    // Its marker did not move: once the page answers, nothing of it is lost.
    sim.with(|s| s.fail_category = None);
    sim.save(patient_om("p-2", "North", "male"));
    let (keys, _) = capture_once(&mut emr, Some(&cursor));
    assert!(
        keys.contains(&key("Patient/p-1")) && keys.contains(&key("Patient/p-2")),
        "{keys:?}"
    );
    assert!(!keys.contains(&key("Encounter/e-1")), "not captured twice");
}

#[test]
fn start_now_on_an_empty_feed_captures_what_comes_next() {
    let sim = OpenMrsSim::start("admin", "Admin123").unwrap();
    let mut emr = OpenMrs::new(
        &sim.url,
        "admin",
        &Secret::new("Admin123".into()),
        shipped(),
        Start::Now,
        Duration::from_secs(5),
    );
    let (keys, cursor) = capture_once(&mut emr, None);
    assert!(keys.is_empty());
    sim.save(patient_om("p-1", "North", "male"));
    let (keys, cursor) = capture_once(&mut emr, Some(&cursor));
    assert_eq!(keys, vec![key("Patient/p-1")]);
    let (keys, _) = capture_once(&mut emr, Some(&cursor));
    assert!(keys.is_empty());
}

#[test]
fn a_wrong_password_is_the_emr_unavailable_nothing_is_quarantined_and_the_account_is_spared() {
    let dir = tempfile::tempdir().unwrap();
    let hub = seeded_hub(dir.path(), &["a"]);
    let sim = OpenMrsSim::start("admin", "Admin123").unwrap();
    sim.save(patient_om("p-w", "North", "male"));
    hub.put(vec![
        json!({"resourceType": "Location", "id": "loc-w", "name": "W"}),
    ]);
    let mut a = clinic(dir.path(), "a", &hub);
    let mut wrong = OpenMrs::new(
        &sim.url,
        "admin",
        &Secret::new("changed-last-week".into()),
        shipped(),
        Start::Beginning,
        Duration::from_secs(5),
    );
    let (_, rep) = round(&mut a, &mut wrong);
    let err = rep.error.clone().unwrap_or_default();
    assert!(
        err.contains("HTTP 401") && err.contains("unavailable"),
        "{rep:?}"
    );
    assert_eq!(
        a.store.counts().unwrap().quarantine,
        0,
        "not the records' fault"
    );
    let status = a
        .store
        .peer_state("emr")
        .unwrap()
        .last_error
        .unwrap_or_default();
    assert!(
        status.contains("401"),
        "status shows the EMR's error: {status}"
    );
    // Rounds go on without calling OpenMRS again: every attempt would count toward
    // (and, once locked, restart) the lockout of the account.
    let before = sim.requests();
    for _ in 0..10 {
        let (_, rep) = round(&mut a, &mut wrong);
        assert!(rep
            .error
            .unwrap_or_default()
            .contains("not calling OpenMRS again"));
    }
    assert_eq!(sim.requests(), before);
    assert!(!sim.locked("admin"));
    // The password fixed (the daemon restarts with the new file): everything flows.
    let mut right = adapter(&sim, Duration::from_secs(5));
    let (_, rep) = round(&mut a, &mut right);
    assert!(rep.error.is_none(), "{rep:?}");
    assert!(get(&hub.store(), "Patient/p-w").is_some());
    assert!(sim.get("Location", "loc-w").is_some());
    assert_eq!(a.store.counts().unwrap().quarantine, 0);
}

#[test]
fn a_record_created_in_one_openmrs_keeps_its_uuid_in_another_and_is_never_duplicated() {
    let Pair {
        dir: _dir,
        hub,
        sim_a,
        sim_b,
        mut ea,
        mut eb,
        mut a,
        mut b,
    } = pair();
    sim_a.save(patient_om("p-1", "North", "female"));
    sim_a.save(encounter_om("e-1", "p-1"));
    sim_a.save(obs_om("o-1", "p-1", "e-1", 60.0));
    round(&mut a, &mut ea);
    let (_, rep) = round(&mut b, &mut eb);
    assert!(rep.error.is_none(), "{rep:?}");
    // REST v1 created them under the network's uuids; FHIR2 then filled them in.
    assert_eq!(sim_b.ids("Patient"), vec!["p-1"]);
    assert_eq!(sim_b.ids("Encounter"), vec!["e-1"]);
    assert_eq!(sim_b.ids("Observation"), vec!["o-1"]);
    assert_eq!(
        sim_b.get("Patient", "p-1").unwrap().unwrap()["name"][0]["family"],
        "Otieno"
    );
    let writes_a = sim_a.writes();
    for i in 0..10 {
        for (c, e) in [(&mut a, &mut ea), (&mut b, &mut eb)] {
            let (r, rep) = round(c, e);
            let cap = rep.capture.unwrap();
            assert_eq!(
                (cap.captured, r.pushed.sent),
                (0, 0),
                "round {i}: captured again: {cap:?}"
            );
        }
    }
    let hs = hub.store();
    for (kind, id) in [
        ("Patient", "p-1"),
        ("Encounter", "e-1"),
        ("Observation", "o-1"),
    ] {
        assert_eq!(live(&hs, kind), vec![id], "the hub holds one {kind}");
        assert_eq!(live(&a.store, kind), vec![id]);
        assert_eq!(live(&b.store, kind), vec![id]);
        assert_eq!(sim_a.ids(kind), vec![id]);
        assert_eq!(sim_b.ids(kind), vec![id]);
    }
    assert_eq!(sim_a.writes(), writes_a, "nothing was written back into A");
    // The narrative FHIR2 writes (with A's URLs) never left A.
    assert!(get(&hs, "Patient/p-1").unwrap().get("text").is_none());
}

#[test]
fn an_amended_obs_stays_one_logical_record_everywhere() {
    let Pair {
        dir: _dir,
        hub,
        sim_a,
        sim_b,
        mut ea,
        mut eb,
        mut a,
        mut b,
    } = pair();
    sim_a.save(patient_om("p-1", "North", "female"));
    sim_a.save(encounter_om("e-1", "p-1"));
    sim_a.save(obs_om("o-1", "p-1", "e-1", 60.0));
    round(&mut a, &mut ea);
    round(&mut b, &mut eb);
    // A clinician corrects the weight in A: OpenMRS voids o-1 and saves a new obs.
    let a2 = sim_a.save(obs_om("o-1", "p-1", "e-1", 62.0));
    assert_ne!(a2, "o-1");
    let (_, rep) = round(&mut a, &mut ea);
    assert_eq!(rep.capture.unwrap().captured, 1);
    let hs = hub.store();
    assert_eq!(
        live(&hs, "Observation"),
        vec!["o-1"],
        "one record, under its first uuid"
    );
    assert_eq!(
        get(&hs, "Observation/o-1").unwrap()["valueQuantity"]["value"],
        62.0
    );
    // B amends its own copy (a new obs there too); the old value is voided.
    let (_, rep) = round(&mut b, &mut eb);
    assert!(rep.error.is_none(), "{rep:?}");
    let in_b = sim_b.ids("Observation");
    assert_eq!(in_b.len(), 1, "{in_b:?}");
    assert_eq!(sim_b.previous_version(&in_b[0]).as_deref(), Some("o-1"));
    assert_eq!(sim_b.get("Observation", "o-1"), Some(None), "voided in B");
    let value = |s: &OpenMrsSim, id: &str| {
        s.get("Observation", id).unwrap().unwrap()["valueQuantity"]["value"].clone()
    };
    assert_eq!(value(&sim_b, &in_b[0]), 62.0);
    for i in 0..10 {
        for (c, e) in [(&mut a, &mut ea), (&mut b, &mut eb)] {
            let (_, rep) = round(c, e);
            assert_eq!(rep.capture.unwrap().captured, 0, "round {i}");
        }
    }
    // And back: B's clinician corrects again; A's chain moves on, still one record.
    sim_b.save(obs_om(&in_b[0], "p-1", "e-1", 63.0));
    round(&mut b, &mut eb);
    round(&mut a, &mut ea);
    assert_eq!(live(&hub.store(), "Observation"), vec!["o-1"]);
    assert_eq!(
        get(&hub.store(), "Observation/o-1").unwrap()["valueQuantity"]["value"],
        63.0
    );
    let in_a = sim_a.ids("Observation");
    assert_eq!(in_a.len(), 1);
    assert_eq!(value(&sim_a, &in_a[0]), 63.0);
}

#[test]
fn a_name_correction_with_only_a_person_name_event_refreshes_the_patient() {
    let Pair {
        dir: _dir,
        hub,
        sim_a,
        sim_b,
        mut ea,
        mut eb,
        mut a,
        mut b,
    } = pair();
    sim_a.save(patient_om("p-1", "North", "female"));
    round(&mut a, &mut ea);
    round(&mut b, &mut eb);
    let before = sim_a.events().len();
    sim_a.edit_name("p-1", "Amina", "Odhiambo");
    let new: Vec<String> = sim_a.events()[before..]
        .iter()
        .map(|e| e.category.clone())
        .collect();
    assert_eq!(new, vec!["person_name"]);
    let (_, rep) = round(&mut a, &mut ea);
    assert_eq!(rep.capture.unwrap().captured, 1);
    assert_eq!(
        get(&hub.store(), "Patient/p-1").unwrap()["name"][0]["family"],
        "Odhiambo"
    );
    round(&mut b, &mut eb);
    assert_eq!(
        sim_b.get("Patient", "p-1").unwrap().unwrap()["name"][0]["family"],
        "Odhiambo"
    );
}

#[test]
fn what_only_fhir2_post_can_create_is_mapped_not_duplicated() {
    let Pair {
        dir: _dir,
        hub,
        sim_a,
        sim_b,
        mut ea,
        mut eb,
        mut a,
        mut b,
    } = pair();
    sim_a.save(patient_om("p-1", "North", "female"));
    let allergy = |criticality: &str| {
        json!({"resourceType": "AllergyIntolerance", "id": "a-1", "criticality": criticality,
            "patient": {"reference": "Patient/p-1"}, "code": {"coding": [{"code": "penicillin"}]}})
    };
    sim_a.save(allergy("low"));
    round(&mut a, &mut ea);
    round(&mut b, &mut eb);
    let in_b = sim_b.ids("AllergyIntolerance");
    assert_eq!(in_b.len(), 1);
    assert_ne!(in_b[0], "a-1", "FHIR2 POST assigned its own uuid");
    // The mapping was stored with the apply (the engine takes it when it changes).
    let state = b
        .store
        .meta(&clinicsync::store::meta::EMR_IDS)
        .unwrap()
        .expect("a new mapping stored");
    assert!(
        state.contains("AllergyIntolerance/a-1") && state.contains(&in_b[0]),
        "{state}"
    );
    assert!(
        eb.identity_state().is_none(),
        "offered only when it changed"
    );
    // A restarted adapter given it back finds B's copy under the network id.
    let mut restarted = adapter(&sim_b, Duration::from_secs(5));
    restarted.restore_identity(&state);
    let k = key("AllergyIntolerance/a-1");
    match restarted.fetch(&k).unwrap() {
        Some(Fetched::Present(s)) => assert_eq!(s.key, k),
        other => panic!("{other:?}"),
    }
    for _ in 0..10 {
        for (c, e) in [(&mut a, &mut ea), (&mut b, &mut eb)] {
            let (_, rep) = round(c, e);
            assert_eq!(
                rep.capture.unwrap().captured,
                0,
                "the EMR's copy came back as new"
            );
        }
    }
    assert_eq!(live(&hub.store(), "AllergyIntolerance"), vec!["a-1"]);
    sim_a.save(allergy("high"));
    round(&mut a, &mut ea);
    round(&mut b, &mut eb);
    assert_eq!(sim_b.ids("AllergyIntolerance"), in_b, "updated in place");
    assert_eq!(
        sim_b.get("AllergyIntolerance", &in_b[0]).unwrap().unwrap()["criticality"],
        "high"
    );
    // B's clinician edits B's copy: it reaches the hub under the network id.
    let mut edited = sim_b.get("AllergyIntolerance", &in_b[0]).unwrap().unwrap();
    edited["criticality"] = "unable-to-assess".into();
    sim_b.save(edited);
    let (_, rep) = round(&mut b, &mut eb);
    assert_eq!(rep.capture.unwrap().captured, 1);
    assert_eq!(live(&hub.store(), "AllergyIntolerance"), vec!["a-1"]);
    assert_eq!(
        get(&hub.store(), "AllergyIntolerance/a-1").unwrap()["criticality"],
        "unable-to-assess"
    );
}

#[test]
fn rest_field_errors_are_kept_in_the_quarantine_reason() {
    let Pair {
        dir: _dir,
        hub: _hub,
        sim_a,
        sim_b: _sim_b,
        mut ea,
        mut eb,
        mut a,
        mut b,
    } = pair();
    let mut p = patient_om("p-untyped", "North", "male");
    p["identifier"][0].as_object_mut().unwrap().remove("type");
    sim_a.save(p);
    round(&mut a, &mut ea);
    let (_, rep) = round(&mut b, &mut eb);
    assert_eq!(rep.apply.unwrap().refused, 1, "{:?}", rep.error);
    let q = b.store.quarantine_list().unwrap();
    let reason = &q
        .iter()
        .find(|e| e.record == "Patient/p-untyped")
        .unwrap()
        .reason;
    assert!(
        reason.contains("Invalid Submission")
            && reason.contains("identifiers[0].identifierType: Cannot be empty or null"),
        "{reason}"
    );
}

#[test]
fn conditions_no_feed_announces_are_captured_by_the_last_updated_sweep() {
    let Pair {
        dir: _dir,
        hub,
        sim_a,
        sim_b,
        ea: _,
        mut eb,
        mut a,
        mut b,
    } = pair();
    let mut ea = adapter(&sim_a, Duration::from_secs(5))
        .with_sweep(vec!["Condition".into()], Duration::ZERO);
    sim_a.save(patient_om("p-1", "North", "female"));
    let events = sim_a.events().len();
    sim_a.save(json!({"resourceType": "Condition", "id": "c-1", "subject": {"reference": "Patient/p-1"},
        "code": {"coding": [{"code": "malaria"}]}, "clinicalStatus": {"coding": [{"code": "active"}]}}));
    assert_eq!(
        sim_a.events().len(),
        events,
        "no feed event for a Condition"
    );
    round(&mut a, &mut ea);
    assert!(get(&hub.store(), "Condition/c-1").is_some());
    for _ in 0..3 {
        let (_, rep) = round(&mut a, &mut ea);
        assert_eq!(
            rep.capture.unwrap().captured,
            0,
            "the sweep's overlap is not captured again"
        );
    }
    round(&mut b, &mut eb);
    assert_eq!(sim_b.ids("Condition").len(), 1);
}

#[test]
fn doctor_names_the_account_clock_modules_feeds_and_how_creates_keep_their_uuid() {
    let sim = OpenMrsSim::start("admin", "Admin123").unwrap();
    sim.set_account(
        "sync",
        "sync-pass",
        Some(&["Get Patients", "Get Encounters"]),
    );
    sim.with(|s| s.clock_skew_ms = 2 * 3_600_000);
    let mut cats = shipped();
    cats.retain(|c| c != "form");
    cats.push("concept".into());
    cats.push("locations".into());
    let mut emr = OpenMrs::new(
        &sim.url,
        "sync",
        &Secret::new("sync-pass".into()),
        cats,
        Start::Beginning,
        Duration::from_secs(5),
    )
    .with_sweep(vec!["Condition".into()], Duration::from_secs(600));
    let checks = emr.diagnose();
    assert!(
        checks
            .iter()
            .any(|c| c.what == "emr" && c.level == CheckLevel::Ok && c.detail.contains("as sync")),
        "{checks:?}"
    );
    let find = |what: &str| {
        checks
            .iter()
            .find(|c| c.what == what)
            .unwrap_or_else(|| panic!("{what}: {checks:?}"))
            .clone()
    };
    let acct = find("emr-account");
    assert_eq!(acct.level, CheckLevel::Fail);
    assert!(
        acct.detail.contains("Add Patients") && !acct.detail.contains("Get Patients,"),
        "{}",
        acct.detail
    );
    assert_eq!(find("emr-clock").level, CheckLevel::Fail);
    let modules = find("emr-modules");
    assert_eq!(modules.level, CheckLevel::Ok);
    assert!(
        modules.detail.contains("fhir2 4.2.0") && modules.detail.contains("atomfeed"),
        "{}",
        modules.detail
    );
    let feeds = find("emr-feeds");
    assert_eq!(feeds.level, CheckLevel::Warn);
    assert!(
        feeds
            .detail
            .contains("concept: no events yet — the shipped configuration disables this category")
            && feeds.detail.contains("not read: form")
            && feeds.detail.contains("locations: no events yet, and no shipped or Bahmni configuration has this category (a typo"),
        "{}",
        feeds.detail
    );
    let ids = find("emr-ids");
    assert!(
        ids.detail
            .contains("cannot read fhir2.upsert.supported.resources"),
        "{}",
        ids.detail
    );
    // With the privilege: which creates keep the network's uuid, and how.
    let mut admin = adapter(&sim, Duration::from_secs(5));
    let ids = admin
        .diagnose()
        .into_iter()
        .find(|c| c.what == "emr-ids")
        .unwrap();
    assert_eq!(ids.level, CheckLevel::Warn);
    assert!(
        ids.detail
            .contains("REST v1 for Patient, Encounter, Observation, Location")
            && ids
                .detail
                .contains("FHIR2 POST with an id map for Medication, Practitioner, Task"),
        "{}",
        ids.detail
    );
    sim.set_upsert("Location,Medication,Practitioner,Task");
    let ids = admin
        .diagnose()
        .into_iter()
        .find(|c| c.what == "emr-ids")
        .unwrap();
    assert_eq!(ids.level, CheckLevel::Ok, "{}", ids.detail);
    // A wrong password: one FAIL naming it.
    let mut wrong = OpenMrs::new(
        &sim.url,
        "sync",
        &Secret::new("x".into()),
        shipped(),
        Start::Beginning,
        Duration::from_secs(5),
    );
    let checks = wrong.diagnose();
    assert_eq!(checks.len(), 1);
    assert!(
        checks[0].detail.contains("refuses our credentials"),
        "{checks:?}"
    );
}

/// A clinic's day (400 patients, each with an encounter and 3 observations: 2,000
/// resources) captured from one simulated OpenMRS and applied into another: HTTP
/// requests per record against each EMR, and the time each side took. Run with
/// `cargo test --test openmrs -- --ignored --nocapture a_clinics_day`.
#[test]
#[ignore]
fn a_clinics_day_requests_per_record() {
    let Pair {
        dir: _dir,
        hub: _hub,
        sim_a,
        sim_b,
        mut ea,
        mut eb,
        mut a,
        mut b,
    } = pair();
    let patients = 400;
    for i in 0..patients {
        let p = format!("p-{i}");
        let e = format!("e-{i}");
        sim_a.save(patient_om(&p, "North", "female"));
        sim_a.save(encounter_om(&e, &p));
        for j in 0..3 {
            sim_a.save(obs_om(&format!("o-{i}-{j}"), &p, &e, 60.0 + j as f64));
        }
    }
    let records = patients * 5;
    let (req_a, t) = (sim_a.requests(), Instant::now());
    let mut captured = 0;
    for _ in 0..20 {
        let (r, rep) = round(&mut a, &mut ea);
        captured += rep.capture.map(|c| c.captured).unwrap_or(0);
        if r.pushed.sent == 0 && a.store.counts().unwrap().outbox == 0 && captured >= records {
            break;
        }
    }
    let (capture_requests, capture_s) = (sim_a.requests() - req_a, t.elapsed().as_secs_f64());
    assert_eq!(captured, records);
    let (req_b, t) = (sim_b.requests(), Instant::now());
    for _ in 0..50 {
        round(&mut b, &mut eb);
        if sim_b.ids("Observation").len() == patients * 3 && b.store.counts().unwrap().inbox == 0 {
            break;
        }
    }
    let (apply_requests, apply_s) = (sim_b.requests() - req_b, t.elapsed().as_secs_f64());
    assert_eq!(sim_b.ids("Patient").len(), patients);
    assert_eq!(sim_b.ids("Observation").len(), patients * 3);
    eprintln!(
        "capture: {records} records, {capture_requests} requests ({:.2}/record), {capture_s:.1} s ({:.0} records/s)\n\
         apply:   {records} records, {apply_requests} requests ({:.2}/record), {apply_s:.1} s ({:.0} records/s)",
        capture_requests as f64 / records as f64,
        records as f64 / capture_s,
        apply_requests as f64 / records as f64,
        records as f64 / apply_s,
    );
}
