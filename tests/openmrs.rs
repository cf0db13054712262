//! The OpenMRS adapter against the OpenMRS simulator (atom feed, FHIR2, REST v1),
//! with a real hub over HTTP in between.

mod common;

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clinicsync::config::Secret;
use clinicsync::daemon::{self, EmrReport, SyncReport};
use clinicsync::emr::openmrs::{OpenMrs, Start};
use clinicsync::emr::simulator::OpenMrsSim;
use common::*;
use serde_json::json;

const CATEGORIES: &[&str] = &["location", "concept", "patient", "encounter", "obs"];

fn adapter(sim: &OpenMrsSim, timeout: Duration) -> OpenMrs {
    OpenMrs::new(
        &sim.url,
        "admin",
        &Secret::new("Admin123".into()),
        CATEGORIES.iter().map(|s| s.to_string()).collect(),
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
    daemon::round(
        &mut c.store,
        &c.policy,
        &c.client,
        &c.sync_cfg,
        Some(emr),
        &AtomicBool::new(false),
    )
    .unwrap()
}

fn patient_om(id: &str, district: &str, gender: &str) -> serde_json::Value {
    json!({
        "resourceType": "Patient", "id": id, "active": true, "gender": gender,
        "identifier": [{"use": "official", "type": {"coding": [{"code": "05a29f94-c0ed-11e2-94be-8c13b969e334"}], "text": "OpenMRS ID"}, "value": "10001-2",
            "extension": [{"url": "http://fhir.openmrs.org/ext/patient/identifier#location", "valueReference": {"reference": "Location/loc-a"}}]}],
        "name": [{"family": "Otieno", "given": ["Amina"]}],
        "address": [{"district": district}]
    })
}

fn encounter_om(id: &str, patient: &str) -> serde_json::Value {
    json!({
        "resourceType": "Encounter", "id": id, "status": "unknown",
        "type": [{"coding": [{"system": "http://fhir.openmrs.org/code-system/encounter-type", "code": "67a71486-1a54-468f-ac3e-7091a9a79584", "display": "Vitals"}]}],
        "subject": {"reference": format!("Patient/{patient}"), "type": "Patient"}
    })
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
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North"), ("b", "North")]),
        &["a", "b"],
        8 << 20,
    );
    let (sim_a, sim_b) = (
        OpenMrsSim::start("admin", "Admin123").unwrap(),
        OpenMrsSim::start("admin", "Admin123").unwrap(),
    );
    let (ea, eb) = (
        adapter(&sim_a, Duration::from_secs(5)),
        adapter(&sim_b, Duration::from_secs(5)),
    );
    let a = clinic(dir.path(), "a", &hub);
    let b = clinic(dir.path(), "b", &hub);
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
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
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
    sim.with(|s| s.broken_chain = true);
    let (_, rep) = round(&mut a, &mut emr);
    assert!(
        rep.error
            .as_deref()
            .unwrap_or("")
            .contains("archive chain broken"),
        "{rep:?}"
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
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let sim = OpenMrsSim::start("admin", "Admin123").unwrap();
    // The database this clinic was cloned from already holds history.
    for i in 0..7 {
        sim.save(patient_om(&format!("old-{i}"), "North", "male"));
    }
    let mut emr = OpenMrs::new(
        &sim.url,
        "admin",
        &Secret::new("Admin123".into()),
        CATEGORIES.iter().map(|s| s.to_string()).collect(),
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
    let reason = waiting(&b).expect("still quarantined");
    assert!(reason.contains("Patient 'p-x' does not exist"), "{reason}");
}

#[test]
fn the_fhir_adapter_falls_back_to_last_updated_search_without_history() {
    // OpenMRS's FHIR2 module has no _history: the generic adapter must notice and
    // capture by `_lastUpdated` search instead.
    use clinicsync::emr::fhir::FhirServer;
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
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
    let (_, e) = daemon::round(
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
            .meta_str("emr_cursor")
            .unwrap()
            .unwrap()
            .contains("search"),
        "did not fall back"
    );
    std::thread::sleep(Duration::from_millis(5));
    sim.save(patient_om("ps-1", "North", "other"));
    daemon::round(
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
