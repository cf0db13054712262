//! The generic FHIR adapter against FHIR R4 servers written by others, and against a
//! spec-shaped fake for what neither of them does:
//! - sekmet-fhir (PyPI; `.ci/run` installs it in a virtualenv at
//!   /opt/clinicsync-test/sekmet, or set SEKMET_BIN): type and system history newest
//!   first, `_offset` next links that drop `_since` and name another host.
//! - Medplum's FhirRouter over its MemoryRepository (npm; `.ci/run` installs it at
//!   /opt/clinicsync-test/medplum, or set MEDPLUM_DIR), served by
//!   tests/fhir_servers/medplum.cjs: no type or system history (`/_history` answers
//!   an empty searchset), searches truncated at `_count` with no next link, deletes
//!   leave no tombstone (404).
//! - tests/fhir_fake: newest- and oldest-first history, opaque `_cursor` links,
//!   `_getpages` snapshots at the base URL, a foreign host in links, unconfigured
//!   types interleaved, a version written during a paged read, no history at all.
//!
//! Every server runs the same scenario: records created before the first sync,
//! updates and deletes are captured; records written at the hub are applied; after
//! repeated rounds nothing is captured or pushed twice.

mod common;
mod fhir_fake;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clinicsync::client::{self, EmrReport, SyncReport};
use clinicsync::devkit::cluster;
use clinicsync::emr::fhir::{CaptureMode, FhirServer};
use clinicsync::model::RecordKey;
use common::*;
use fhir_fake::{FakeFhir, HistoryPaging, Order, SearchPaging, Shape};
use serde_json::{json, Value};

/// A FHIR server process on 127.0.0.1.
struct Proc {
    base: String,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(base: &str, child: &mut Child, what: &str) {
    let started = Instant::now();
    while ureq::get(&format!("{base}/metadata")).call().is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before answering: {status}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what} did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sekmet(dir: &std::path::Path) -> Proc {
    let bin = std::env::var("SEKMET_BIN")
        .unwrap_or_else(|_| "/opt/clinicsync-test/sekmet/bin/sekmet".into());
    assert!(
        std::path::Path::new(&bin).exists(),
        "sekmet-fhir is not installed at {bin}: `python3 -m venv /opt/clinicsync-test/sekmet && /opt/clinicsync-test/sekmet/bin/pip install sekmet-fhir` (.ci/run does this)"
    );
    let port = cluster::free_port().unwrap();
    let mut child = Command::new(&bin)
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}/fhir");
    wait_for(&base, &mut child, "sekmet");
    Proc { base, child }
}

fn medplum() -> Proc {
    let dir =
        std::env::var("MEDPLUM_DIR").unwrap_or_else(|_| "/opt/clinicsync-test/medplum".into());
    assert!(
        std::path::Path::new(&dir)
            .join("node_modules/@medplum/fhir-router")
            .exists(),
        "Medplum's fhir-router is not installed in {dir}: `npm install --prefix {dir} @medplum/fhir-router@4.5.2` (.ci/run does this)"
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fhir_servers/medplum.cjs"
    );
    let port = cluster::free_port().unwrap();
    let mut child = Command::new("node")
        .args([script, &port.to_string()])
        .env("MEDPLUM_DIR", &dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("node is needed for the Medplum test server");
    let base = format!("http://127.0.0.1:{port}/fhir");
    wait_for(&base, &mut child, "the Medplum test server");
    Proc { base, child }
}

fn put(base: &str, resource: Value) {
    let url = format!(
        "{base}/{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    ureq::put(&url)
        .set("Content-Type", "application/fhir+json")
        .send_string(&resource.to_string())
        .unwrap();
}

fn delete(base: &str, reference: &str) {
    ureq::delete(&format!("{base}/{reference}")).call().unwrap();
}

/// `Some(resource)`, or `None` when gone or unknown.
fn read(base: &str, reference: &str) -> Option<Value> {
    ureq::get(&format!("{base}/{reference}"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .and_then(|t| serde_json::from_str(&t).ok())
}

fn try_round(c: &mut TestClinic, emr: &mut FhirServer) -> (SyncReport, EmrReport) {
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

fn round(c: &mut TestClinic, emr: &mut FhirServer) -> (SyncReport, EmrReport) {
    let (r, e) = try_round(c, emr);
    assert!(e.error.is_none(), "{e:?}");
    (r, e)
}

fn types() -> Vec<String> {
    ["Patient", "Encounter", "Observation"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The adapter as configured by default, but with two entries a page, so that every
/// read of these small scenarios is paged.
fn adapter(base: &str) -> FhirServer {
    FhirServer::new(base, None, types(), false, Duration::from_secs(10)).with_page_size(2)
}

fn noise(base: &str, n: usize) {
    for i in 0..n {
        put(
            base,
            json!({"resourceType": "Organization", "id": format!("org-{i}"), "name": format!("noise {i}")}),
        );
    }
}

fn hub_and_clinic(dir: &std::path::Path) -> (TestHub, TestClinic) {
    let hub = TestHub::start(dir, 0, hub_policy(&[("a", "North")]), &["a"], 8 << 20);
    let mut a = TestClinic::new(dir, "a", &hub.url, &hub.token("a"));
    a.policy.external_emr = true;
    (hub, a)
}

fn assert_quiet(a: &mut TestClinic, emr: &mut FhirServer, rounds: usize, server: &str) {
    for i in 0..rounds {
        let (r, e) = round(a, emr);
        let c = e.capture.as_ref().unwrap();
        assert_eq!(c.captured, 0, "{server}: round {i} captured again: {e:?}");
        assert_eq!(r.pushed.sent, 0, "{server}: round {i} pushed again: {r:?}");
    }
}

/// The behaviour every FHIR server must give: capture of what existed before the
/// first sync, of updates and deletes; apply of the hub's writes; nothing twice.
fn capture_and_apply_everything_once(base: &str, mut emr: FhirServer, server: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());

    // Written by another application before clinicsync's first sync, with records
    // of a type clinicsync does not carry in between.
    noise(base, 2);
    put(
        base,
        json!({"resourceType": "Patient", "id": "pf-1", "gender": "female", "address": [{"district": "North"}]}),
    );
    noise(base, 3);
    put(
        base,
        json!({"resourceType": "Encounter", "id": "ef-1", "status": "finished", "class": {"code": "AMB"}, "subject": {"reference": "Patient/pf-1"}}),
    );
    put(
        base,
        json!({"resourceType": "Observation", "id": "of-1", "status": "final", "code": {"text": "Weight"},
        "subject": {"reference": "Patient/pf-1"}, "valueQuantity": {"value": 61.5, "unit": "kg"}}),
    );
    for i in 0..4 {
        put(
            base,
            json!({"resourceType": "Patient", "id": format!("pf-x{i}"), "gender": "male", "address": [{"district": "North"}]}),
        );
    }
    let (r, e) = round(&mut a, &mut emr);
    assert!(e.capture.as_ref().unwrap().captured >= 7, "{server}: {e:?}");
    assert!(r.pushed.accepted >= 7, "{server}: {r:?}");
    let hs = hub.store();
    assert_eq!(
        get(&hs, "Patient/pf-1").unwrap()["gender"],
        "female",
        "{server}"
    );
    assert_eq!(
        get(&hs, "Encounter/ef-1").unwrap()["status"],
        "finished",
        "{server}"
    );
    assert_eq!(
        get(&hs, "Observation/of-1").unwrap()["valueQuantity"]["value"],
        61.5,
        "{server}"
    );
    assert!(
        get(&hs, "Patient/pf-x3").is_some(),
        "{server}: every page of the initial load"
    );
    assert!(
        get(&hs, "Organization/org-0").is_none(),
        "{server}: unconfigured type"
    );
    assert_quiet(&mut a, &mut emr, 1, server);

    // Updates, a delete and new records follow, between more unconfigured writes.
    put(
        base,
        json!({"resourceType": "Patient", "id": "pf-1", "gender": "other", "address": [{"district": "North"}]}),
    );
    noise(base, 3);
    delete(base, "Observation/of-1");
    put(
        base,
        json!({"resourceType": "Encounter", "id": "ef-2", "status": "planned", "class": {"code": "AMB"}, "subject": {"reference": "Patient/pf-1"}}),
    );
    put(
        base,
        json!({"resourceType": "Observation", "id": "of-2", "status": "final", "code": {"text": "Height"},
        "subject": {"reference": "Patient/pf-1"}, "valueQuantity": {"value": 160, "unit": "cm"}}),
    );
    let (_, e) = round(&mut a, &mut emr);
    assert_eq!(e.capture.as_ref().unwrap().captured, 4, "{server}: {e:?}");
    assert_eq!(
        get(&hs, "Patient/pf-1").unwrap()["gender"],
        "other",
        "{server}"
    );
    let obs = hs
        .current(&RecordKey::parse("Observation/of-1").unwrap())
        .unwrap()
        .unwrap();
    assert!(
        obs.version.deleted,
        "{server}: the delete arrived as a tombstone"
    );
    assert_eq!(
        get(&hs, "Encounter/ef-2").unwrap()["status"],
        "planned",
        "{server}"
    );
    assert_eq!(
        get(&hs, "Observation/of-2").unwrap()["code"]["text"],
        "Height",
        "{server}"
    );

    // The other way: records written at the hub are written into the server.
    hub.put(vec![
        json!({"resourceType": "Patient", "id": "ph-1", "gender": "male", "address": [{"district": "North"}]}),
        json!({"resourceType": "Encounter", "id": "eh-1", "status": "planned", "class": {"code": "AMB"}, "subject": {"reference": "Patient/ph-1"}}),
        json!({"resourceType": "Patient", "id": "pf-1", "gender": "unknown", "address": [{"district": "North"}]}),
    ]);
    let (_, e) = round(&mut a, &mut emr);
    assert!(
        e.apply.as_ref().unwrap().applied.applied >= 3,
        "{server}: {e:?}"
    );
    assert_eq!(
        read(base, "Patient/ph-1").unwrap()["gender"],
        "male",
        "{server}"
    );
    assert_eq!(
        read(base, "Encounter/eh-1").unwrap()["status"],
        "planned",
        "{server}"
    );
    assert_eq!(
        read(base, "Patient/pf-1").unwrap()["gender"],
        "unknown",
        "{server}: an update went in with If-Match"
    );

    // Our own writes come back from the server: recognised, never sent again.
    assert_quiet(&mut a, &mut emr, 3, server);

    // A delete at the hub deletes in the server, and its echo is not a new delete.
    let mut s = hub.store();
    let enc = s
        .current(&RecordKey::parse("Encounter/eh-1").unwrap())
        .unwrap()
        .unwrap();
    clinicsync::engine::write_local(
        &mut s,
        &hub.policy,
        vec![(enc.version.snapshot.clone(), true)],
        clinicsync::time::wall_ms(),
    )
    .unwrap();
    round(&mut a, &mut emr);
    assert!(
        read(base, "Encounter/eh-1").is_none(),
        "{server}: deleted in the server"
    );
    assert_quiet(&mut a, &mut emr, 2, server);
}

#[test]
fn sekmet_fhir_captures_and_applies_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let sek = sekmet(dir.path());
    capture_and_apply_everything_once(&sek.base, adapter(&sek.base), "sekmet");
}

#[test]
fn sekmet_fhir_through_its_system_history() {
    let dir = tempfile::tempdir().unwrap();
    let sek = sekmet(dir.path());
    let emr = adapter(&sek.base).with_capture(CaptureMode::SystemHistory);
    capture_and_apply_everything_once(&sek.base, emr, "sekmet system history");
}

#[test]
fn medplum_captures_and_applies_everything_once() {
    let mp = medplum();
    capture_and_apply_everything_once(&mp.base, adapter(&mp.base), "medplum");
}

#[test]
fn fake_newest_first_system_history_with_cursor_links_on_a_foreign_host() {
    let fake = FakeFhir::start(Shape {
        order: Order::NewestFirst,
        history_paging: HistoryPaging::Cursor,
        type_history: false,
        link_base: Some("http://fhir.internal.invalid:8443/r4".into()),
        ..Shape::default()
    });
    // Many conformance versions before any clinical one, as on a real server.
    fake.with_db(|db| {
        for i in 0..300 {
            db.write(
                "SearchParameter",
                &format!("sp-{}", i % 40),
                Some(json!({"resourceType": "SearchParameter", "status": "active"})),
            );
        }
    });
    capture_and_apply_everything_once(&fake.base, adapter(&fake.base), "fake cursor");
    let log = fake.log();
    assert!(
        log.iter()
            .any(|l| l.starts_with("GET /fhir/_history?_cursor=")),
        "{log:?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("/SearchParameter")),
        "no request names an unconfigured type"
    );
}

#[test]
fn fake_oldest_first_type_history_with_offset_links_that_drop_since() {
    let fake = FakeFhir::start(Shape {
        order: Order::OldestFirst,
        history_paging: HistoryPaging::Offset { keeps_since: false },
        ..Shape::default()
    });
    // An hour of older history: the next links that lost `_since` lead into it, and
    // only reading the order right keeps the walk from stopping there.
    let hour_ago = clinicsync::time::wall_ms() - 3_600_000;
    fake.with_db(|db| {
        for i in 0..20 {
            let p = json!({"resourceType": "Patient", "gender": "female", "address": [{"district": "South"}]});
            db.write_at("Patient", &format!("old-{i}"), Some(p), hour_ago + i);
        }
    });
    capture_and_apply_everything_once(&fake.base, adapter(&fake.base), "fake oldest first");
    let log = fake.log();
    assert!(
        log.iter()
            .any(|l| l.contains("/_history?_count=") && l.contains("_offset=")),
        "{log:?}"
    );
}

#[test]
fn fake_getpages_snapshots_named_at_the_base_of_another_host() {
    let fake = FakeFhir::start(Shape {
        order: Order::NewestFirst,
        history_paging: HistoryPaging::GetPages,
        type_history: false,
        link_base: Some("https://proxy.example.invalid/baseR4".into()),
        ..Shape::default()
    });
    capture_and_apply_everything_once(&fake.base, adapter(&fake.base), "fake getpages");
    let log = fake.log();
    assert!(
        log.iter().any(|l| l.starts_with("GET /fhir?_getpages=")),
        "{log:?}"
    );
}

#[test]
fn fake_without_history_is_read_by_search_and_deletes_are_seen() {
    let fake = FakeFhir::start(Shape {
        type_history: false,
        system_history: false,
        search_paging: SearchPaging::NoLinks,
        tombstones: false,
        ..Shape::default()
    });
    capture_and_apply_everything_once(&fake.base, adapter(&fake.base), "fake search");
    let log = fake.log();
    assert!(log.iter().any(|l| l.contains("_lastUpdated=ge")), "{log:?}");
    assert!(log.iter().any(|l| l.contains("_summary=count")), "{log:?}");
}

#[test]
fn fake_search_that_does_not_sort_is_paged_by_its_own_links() {
    // A keyset over pages in id order would skip; the self link without `_sort`
    // tells the adapter to follow the server's links instead.
    let fake = FakeFhir::start(Shape {
        type_history: false,
        system_history: false,
        ignores_sort: true,
        ..Shape::default()
    });
    capture_and_apply_everything_once(&fake.base, adapter(&fake.base), "fake unsorted");
    let log = fake.log();
    assert!(log.iter().any(|l| l.contains("_offset=")), "{log:?}");
}

#[test]
fn a_version_written_during_a_paged_read_is_captured_by_the_next_round() {
    let fake = FakeFhir::start(Shape {
        order: Order::NewestFirst,
        history_paging: HistoryPaging::Cursor,
        max_count: 2,
        ..Shape::default()
    });
    let base = fake.base.clone();
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    let mut emr = adapter(&base);
    for i in 0..6 {
        put(
            &base,
            json!({"resourceType": "Patient", "id": format!("p{i}"), "gender": "female", "address": [{"district": "North"}]}),
        );
    }
    round(&mut a, &mut emr);
    for i in 0..6 {
        put(
            &base,
            json!({"resourceType": "Patient", "id": format!("p{i}"), "gender": "male", "address": [{"district": "North"}]}),
        );
    }
    // While the adapter is on the second page of Patient history (whose cursor was
    // fixed at the first page): an update commits, and so does a new Patient from a
    // transaction stamped two seconds before the newest version the read has
    // already seen (it started earlier and committed later).
    let fired = std::sync::Arc::new(AtomicBool::new(false));
    let f2 = fired.clone();
    fake.set_hook(Box::new(move |db, page| {
        if page == 1 && !f2.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let p0 = json!({"resourceType": "Patient", "gender": "other", "address": [{"district": "North"}]});
            db.write("Patient", "p0", Some(p0));
            let late = clinicsync::time::wall_ms() - 2_000;
            let p = json!({"resourceType": "Patient", "gender": "female", "address": [{"district": "North"}]});
            db.write_at("Patient", "p-late", Some(p), late);
        }
    }));
    let (_, e) = round(&mut a, &mut emr);
    assert!(
        fired.load(std::sync::atomic::Ordering::SeqCst),
        "the read was paged"
    );
    assert!(e.capture.as_ref().unwrap().captured >= 6, "{e:?}");
    let hs = hub.store();
    assert!(
        get(&hs, "Patient/p-late").is_none(),
        "committed after the read's cursor was fixed: not in this read"
    );
    round(&mut a, &mut emr);
    assert_eq!(get(&hs, "Patient/p0").unwrap()["gender"], "other");
    assert_eq!(
        get(&hs, "Patient/p-late").unwrap()["gender"],
        "female",
        "the next round's _since reaches back before it"
    );
    for i in 1..6 {
        assert_eq!(
            get(&hs, &format!("Patient/p{i}")).unwrap()["gender"],
            "male"
        );
    }
    assert_quiet(&mut a, &mut emr, 3, "fake during read");
}

#[test]
fn capture_that_cannot_proceed_is_reported_and_the_sync_goes_on() {
    // No history, and searches by _lastUpdated refused: after the initial load
    // there is no way to learn what changed.
    let fake = FakeFhir::start(Shape {
        type_history: false,
        system_history: false,
        search_by_last_updated: false,
        ..Shape::default()
    });
    let base = fake.base.clone();
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    let mut emr = adapter(&base);
    put(
        &base,
        json!({"resourceType": "Patient", "id": "p1", "gender": "female", "address": [{"district": "North"}]}),
    );
    let (_, e) = round(&mut a, &mut emr);
    assert_eq!(e.capture.as_ref().unwrap().captured, 1, "{e:?}");
    hub.put(vec![patient("ph-1", "North")]);
    let (r, e) = try_round(&mut a, &mut emr);
    let err = e.error.clone().expect("the capture error is reported");
    assert!(err.contains("capture cannot proceed"), "{err}");
    assert!(err.contains("_lastUpdated"), "{err}");
    let state = a.store.peer_state("emr").unwrap();
    assert!(
        state
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("capture cannot proceed"),
        "status shows it: {state:?}"
    );
    assert!(r.pulled >= 1, "the sync with the hub went on: {r:?}");
}

#[test]
fn resources_sharing_one_instant_are_read_past_a_page_without_links() {
    // A transaction stamps all its resources with one instant; a server that
    // truncates at _count and gives no next link must still yield all of them.
    let fake = FakeFhir::start(Shape {
        type_history: false,
        system_history: false,
        search_paging: SearchPaging::NoLinks,
        max_count: 50,
        ..Shape::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    let mut emr = adapter(&fake.base);
    let at = clinicsync::time::wall_ms();
    fake.with_db(|db| {
        for i in 0..7 {
            let p = json!({"resourceType": "Patient", "gender": "female", "address": [{"district": "North"}]});
            db.write_at("Patient", &format!("t{i}"), Some(p), at);
        }
    });
    let (_, e) = round(&mut a, &mut emr);
    assert_eq!(e.capture.as_ref().unwrap().captured, 7, "{e:?}");
    let later = at + 1;
    fake.with_db(|db| {
        for i in 0..7 {
            let p = json!({"resourceType": "Patient", "gender": "male", "address": [{"district": "North"}]});
            db.write_at("Patient", &format!("t{i}"), Some(p), later);
        }
    });
    let (_, e) = round(&mut a, &mut emr);
    assert_eq!(e.capture.as_ref().unwrap().captured, 7, "{e:?}");
    let hs = hub.store();
    for i in 0..7 {
        assert_eq!(
            get(&hs, &format!("Patient/t{i}")).unwrap()["gender"],
            "male"
        );
    }
    assert_quiet(&mut a, &mut emr, 2, "fake ties");
}

#[test]
fn a_type_added_to_the_configuration_is_loaded_in_full() {
    let fake = FakeFhir::start(Shape::default());
    let base = fake.base.clone();
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    put(
        &base,
        json!({"resourceType": "Patient", "id": "p1", "gender": "female", "address": [{"district": "North"}]}),
    );
    put(
        &base,
        json!({"resourceType": "Encounter", "id": "e-old", "status": "finished", "class": {"code": "AMB"}, "subject": {"reference": "Patient/p1"}}),
    );
    let mut only_patients = FhirServer::new(
        &base,
        None,
        vec!["Patient".into()],
        false,
        Duration::from_secs(10),
    )
    .with_page_size(2);
    round(&mut a, &mut only_patients);
    let hs = hub.store();
    assert!(get(&hs, "Encounter/e-old").is_none());
    // The technician adds Encounter to emr.types: what exists is loaded, once.
    let mut emr = adapter(&base);
    let (_, e) = round(&mut a, &mut emr);
    assert_eq!(e.capture.as_ref().unwrap().captured, 1, "{e:?}");
    assert_eq!(get(&hs, "Encounter/e-old").unwrap()["status"], "finished");
    assert_quiet(&mut a, &mut emr, 2, "fake added type");
}
