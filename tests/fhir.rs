//! The generic FHIR adapter against a real FHIR R4 server written by others:
//! sekmet-fhir (from PyPI; `.ci/run` installs it in a virtualenv at
//! /opt/clinicsync-test/sekmet, or set SEKMET_BIN). The test starts it on 127.0.0.1.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clinicsync::cluster;
use clinicsync::daemon::{self, EmrReport, SyncReport};
use clinicsync::emr::fhir::FhirServer;
use clinicsync::model::RecordKey;
use common::*;
use serde_json::json;

struct Sekmet {
    base: String,
    child: Child,
}

impl Sekmet {
    fn start(dir: &std::path::Path) -> Sekmet {
        let bin = std::env::var("SEKMET_BIN")
            .unwrap_or_else(|_| "/opt/clinicsync-test/sekmet/bin/sekmet".into());
        assert!(
            std::path::Path::new(&bin).exists(),
            "sekmet-fhir is not installed at {bin}: `python3 -m venv /opt/clinicsync-test/sekmet && /opt/clinicsync-test/sekmet/bin/pip install sekmet-fhir` (.ci/run does this)"
        );
        let port = cluster::free_port().unwrap();
        let child = Command::new(&bin)
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}/fhir");
        let started = Instant::now();
        while ureq::get(&format!("{base}/metadata")).call().is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "sekmet did not start"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Sekmet { base, child }
    }

    fn put(&self, resource: serde_json::Value) {
        let url = format!(
            "{}/{}/{}",
            self.base,
            resource["resourceType"].as_str().unwrap(),
            resource["id"].as_str().unwrap()
        );
        ureq::put(&url)
            .set("Content-Type", "application/fhir+json")
            .send_string(&resource.to_string())
            .unwrap();
    }

    fn delete(&self, reference: &str) {
        ureq::delete(&format!("{}/{reference}", self.base))
            .call()
            .unwrap();
    }

    /// `Some(resource)`, or `None` when gone or unknown.
    fn get(&self, reference: &str) -> Option<serde_json::Value> {
        ureq::get(&format!("{}/{reference}", self.base))
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .and_then(|t| serde_json::from_str(&t).ok())
    }
}

impl Drop for Sekmet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn round(c: &mut TestClinic, emr: &mut FhirServer) -> (SyncReport, EmrReport) {
    let (r, e) = daemon::round(
        &mut c.store,
        &c.policy,
        &c.client,
        &c.sync_cfg,
        Some(emr),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(e.error.is_none(), "{e:?}");
    (r, e)
}

#[test]
fn capture_fetch_and_apply_round_trip_through_a_real_fhir_server() {
    let dir = tempfile::tempdir().unwrap();
    let sek = Sekmet::start(dir.path());
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    a.policy.external_emr = true;
    let types = ["Patient", "Encounter", "Observation"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut emr = FhirServer::new(&sek.base, None, types, false, Duration::from_secs(10));

    // Another application writes into the FHIR server; clinicsync captures it.
    sek.put(json!({"resourceType": "Patient", "id": "pf-1", "gender": "female", "address": [{"district": "North"}]}));
    sek.put(json!({"resourceType": "Encounter", "id": "ef-1", "status": "finished", "class": {"code": "AMB"}, "subject": {"reference": "Patient/pf-1"}}));
    sek.put(json!({"resourceType": "Observation", "id": "of-1", "status": "final", "code": {"text": "Weight"},
        "subject": {"reference": "Patient/pf-1"}, "valueQuantity": {"value": 61.5, "unit": "kg"}}));
    let (r, e) = round(&mut a, &mut emr);
    assert!(e.capture.as_ref().unwrap().captured >= 3, "{e:?}");
    assert!(r.pushed.accepted >= 3);
    let hs = hub.store();
    assert_eq!(
        get(&hs, "Observation/of-1").unwrap()["valueQuantity"]["value"],
        61.5
    );

    // An update and a delete in the server follow.
    sek.put(json!({"resourceType": "Patient", "id": "pf-1", "gender": "other", "address": [{"district": "North"}]}));
    sek.delete("Observation/of-1");
    round(&mut a, &mut emr);
    assert_eq!(get(&hs, "Patient/pf-1").unwrap()["gender"], "other");
    let obs = hs
        .current(&RecordKey::parse("Observation/of-1").unwrap())
        .unwrap()
        .unwrap();
    assert!(obs.version.deleted, "the delete arrived as a tombstone");

    // The other way: records written at the hub are PUT into the server.
    hub.put(vec![
        json!({"resourceType": "Patient", "id": "ph-1", "gender": "male", "address": [{"district": "North"}]}),
        json!({"resourceType": "Encounter", "id": "eh-1", "status": "planned", "class": {"code": "AMB"}, "subject": {"reference": "Patient/ph-1"}}),
        json!({"resourceType": "Patient", "id": "pf-1", "gender": "unknown", "address": [{"district": "North"}]}),
    ]);
    let (_, e) = round(&mut a, &mut emr);
    assert!(e.apply.as_ref().unwrap().applied.applied >= 3, "{e:?}");
    assert_eq!(sek.get("Patient/ph-1").unwrap()["gender"], "male");
    assert_eq!(sek.get("Encounter/eh-1").unwrap()["status"], "planned");
    assert_eq!(
        sek.get("Patient/pf-1").unwrap()["gender"],
        "unknown",
        "an update went in with If-Match"
    );

    // Our own writes come back in the server's history: recognised, not re-sent.
    let (r, e) = round(&mut a, &mut emr);
    assert_eq!(e.capture.as_ref().unwrap().captured, 0, "{e:?}");
    assert_eq!(r.pushed.sent, 0);

    // A delete at the hub deletes in the server.
    let mut s = hub.store();
    let enc = s
        .current(&RecordKey::parse("Encounter/eh-1").unwrap())
        .unwrap()
        .unwrap();
    clinicsync::engine::write_local(
        &mut s,
        &hub.policy,
        vec![(enc.version.snapshot.clone(), true)],
        clinicsync::store::wall_ms(),
    )
    .unwrap();
    round(&mut a, &mut emr);
    assert!(
        sek.get("Encounter/eh-1").is_none(),
        "deleted in the FHIR server"
    );
}
