//! OpenMRS at every level, as real processes: two clinics (each `clinicsync run`
//! with its own OpenMRS), a district hub with its own OpenMRS, and the national hub
//! with the central OpenMRS, the metadata authority. Each OpenMRS is the simulator
//! (built from OpenMRS's code, `src/emr/simulator`) with OpenMRS's defaults; the
//! central one publishes concepts and encounter types, as an implementer configures
//! it (the shipped atomfeed configuration disables `concept` and has no entry for
//! encounter types).
//!
//! Every daemon rounds once a second; the tests look only at what a user could:
//! the OpenMRS servers, and the nodes through the CLI.

mod common;

use std::path::Path;
use std::time::Duration;

use clinicsync::devkit::cluster::{free_port, wait_healthy, wait_until};
use clinicsync::devkit::openmrs_sim::OpenMrsSim;
use clinicsync::emr::openmrs::SHIPPED_CATEGORIES;
use common::*;
use serde_json::{json, Value};

const USER: &str = "admin";
const PASS: &str = "Admin123";

/// Waits for a condition the daemons should bring about, or fails naming it.
fn eventually(what: &str, cond: impl FnMut() -> bool) {
    assert!(wait_until(Duration::from_secs(60), cond), "{what}");
}

struct Network {
    _dir: tempfile::TempDir,
    central: OpenMrsSim,
    district_emr: OpenMrsSim,
    emr_a: OpenMrsSim,
    emr_b: OpenMrsSim,
    national: Node,
    district: Node,
    a: Node,
    b: Node,
}

/// `[emr]` for a node whose OpenMRS is `sim`, reading `categories`.
fn emr_section(dir: &Path, id: &str, sim: &OpenMrsSim, categories: &[&str]) -> String {
    let creds = credential(dir, &format!("{id}.emr"), &format!("{USER}:{PASS}"));
    let cats: Vec<String> = categories.iter().map(|c| format!("{c:?}")).collect();
    format!(
        "[emr]\nkind = \"openmrs\"\nurl = \"{}\"\ncredentials_file = \"{}\"\ncategories = [{}]\nretry_secs = 1\n",
        sim.url,
        creds.display(),
        cats.join(", ")
    )
}

/// national ← district ← clinic-a, clinic-b; all in the North district's catchment.
fn network() -> Network {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sims: Vec<OpenMrsSim> = (0..4)
        .map(|_| OpenMrsSim::start(USER, PASS).unwrap())
        .collect();
    let [central, district_emr, emr_a, emr_b]: [OpenMrsSim; 4] = sims.try_into().ok().unwrap();
    // The central OpenMRS publishes the metadata the network shares: `concept`
    // switched on, and an entry for encounter types added on the atomfeed admin page.
    central.set_category("concept", true);
    central.add_feed_entry(
        "org.openmrs.EncounterType",
        "EncounterType",
        "encountertype",
        "/ws/rest/v1/encountertype/{uuid}?v=full",
    );
    let mut central_categories: Vec<&str> = SHIPPED_CATEGORIES.to_vec();
    central_categories.extend(["concept", "encountertype"]);

    let (pn, pd) = (free_port().unwrap(), free_port().unwrap());
    let (district_child, district_token) = child(d, "district", "North", &["clinic-a", "clinic-b"]);
    let national_toml = format!(
        "{}[hub]\nlisten = \"127.0.0.1:{pn}\"\n\n{district_child}{}",
        node_section(d, "national"),
        emr_section(d, "national", &central, &central_categories)
    );
    let (child_a, token_a) = child(d, "clinic-a", "North", &[]);
    let (child_b, token_b) = child(d, "clinic-b", "North", &[]);
    let district_toml = format!(
        "{}{}[hub]\nlisten = \"127.0.0.1:{pd}\"\n\n{child_a}{child_b}{}",
        node_section(d, "district"),
        parent_section(&format!("http://127.0.0.1:{pn}"), &district_token),
        emr_section(d, "district", &district_emr, SHIPPED_CATEGORIES)
    );
    let clinic_toml = |id: &str, token: &Path, sim: &OpenMrsSim| {
        format!(
            "{}{}{}",
            node_section(d, id),
            parent_section(&format!("http://127.0.0.1:{pd}"), token),
            emr_section(d, id, sim, SHIPPED_CATEGORIES)
        )
    };
    let write = |id: &'static str, text: String| node(d, id, text);
    let mut net = Network {
        national: write("national", national_toml),
        district: write("district", district_toml),
        a: write("clinic-a", clinic_toml("clinic-a", &token_a, &emr_a)),
        b: write("clinic-b", clinic_toml("clinic-b", &token_b, &emr_b)),
        _dir: dir,
        central,
        district_emr,
        emr_a,
        emr_b,
    };
    for n in [&net.national, &net.district, &net.a, &net.b] {
        let out = cli(&n.config, &["config", "check"]);
        assert!(
            out.status.success(),
            "{}: {}",
            n.id,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    net.national.start();
    wait_healthy(&format!("http://127.0.0.1:{pn}"), Duration::from_secs(20)).unwrap();
    net.district.start();
    wait_healthy(&format!("http://127.0.0.1:{pd}"), Duration::from_secs(20)).unwrap();
    net.a.start();
    net.b.start();
    net
}

impl Network {
    fn emrs(&self) -> [(&str, &OpenMrsSim); 4] {
        [
            ("central", &self.central),
            ("district", &self.district_emr),
            ("clinic-a", &self.emr_a),
            ("clinic-b", &self.emr_b),
        ]
    }

    fn nodes(&self) -> [&Node; 4] {
        [&self.national, &self.district, &self.a, &self.b]
    }

    /// Every OpenMRS holds exactly `ids` (live) of `kind`.
    fn every_emr_holds(&self, kind: &str, ids: &[&str]) -> bool {
        self.emrs().iter().all(|(_, s)| s.ids(kind) == ids)
    }

    fn logs(&self) -> String {
        self.nodes()
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.id, n.log()))
            .collect()
    }
}

fn concept(id: &str, name: &str) -> Value {
    json!({"resourceType": "openmrs:concept", "id": id,
           "names": [{"name": name, "locale": "en", "conceptNameType": "FULLY_SPECIFIED"}],
           "datatype": "8d4a4488-c2cc-11de-8d13-0010c6dffd0f",
           "conceptClass": "8d4907b2-c2cc-11de-8d13-0010c6dffd0f"})
}

#[test]
fn metadata_from_the_central_openmrs_reaches_every_openmrs_below_it() {
    let net = network();
    net.central.save(concept("c-weight", "Weight (kg)"));
    net.central
        .save(json!({"resourceType": "Location", "id": "loc-north",
        "name": "North District Hospital", "status": "active"}));
    net.central.save(
        json!({"resourceType": "openmrs:encountertype", "id": "et-adult",
        "name": "Adult Return", "description": "A return visit"}),
    );
    eventually(
        &format!(
            "the concept, location and encounter type reach both clinics' OpenMRS\n{}",
            net.logs()
        ),
        || {
            net.every_emr_holds("openmrs:concept", &["c-weight"])
                && net.every_emr_holds("Location", &["loc-north"])
                && net.every_emr_holds("openmrs:encountertype", &["et-adult"])
        },
    );
    for (name, s) in net.emrs() {
        let c = s.get("openmrs:concept", "c-weight").unwrap().unwrap();
        assert_eq!(c["names"][0]["name"], "Weight (kg)", "{name}");
        let et = s.get("openmrs:encountertype", "et-adult").unwrap().unwrap();
        assert_eq!(et["name"], "Adult Return", "{name}");
    }
    // The central OpenMRS renames the location: the change follows the same path.
    net.central
        .save(json!({"resourceType": "Location", "id": "loc-north",
        "name": "North County Hospital", "status": "active"}));
    eventually("the renamed location reaches the clinics", || {
        net.emrs().iter().all(|(_, s)| {
            s.get("Location", "loc-north")
                .flatten()
                .map(|l| l["name"].clone())
                == Some(json!("North County Hospital"))
        })
    });

    // A clinic's technician creates a location in the clinic's OpenMRS: only the
    // root defines metadata, so the district refuses it; the clinic quarantines it
    // once, with the reason, and does not send it again and again.
    net.emr_a
        .save(json!({"resourceType": "Location", "id": "loc-shed",
        "name": "Storage shed", "status": "active"}));
    eventually("the clinic's metadata write is quarantined", || {
        net.a
            .quarantine()
            .iter()
            .any(|q| q["record"] == "Location/loc-shed")
    });
    std::thread::sleep(Duration::from_secs(5));
    let q = net.a.quarantine();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0]["attempts"], 1, "tried once, not every round: {q:?}");
    assert_eq!(q[0]["permanent"], true);
    let reason = q[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("metadata is authoritative at the root"),
        "{reason}"
    );
    assert!(net.district.live("Location") == ["loc-north"]);
    assert_eq!(net.district_emr.ids("Location"), ["loc-north"]);
    assert_eq!(net.emr_b.ids("Location"), ["loc-north"]);
    // Nothing else is stuck anywhere.
    for n in [&net.national, &net.district, &net.b] {
        assert!(n.quarantine().is_empty(), "{}: {:?}", n.id, n.quarantine());
    }
}

#[test]
fn a_patient_registered_at_a_clinic_reaches_every_openmrs_once_with_its_uuids() {
    let net = network();
    net.emr_a.save(patient_om("p-1", "North", "female"));
    net.emr_a.save(encounter_om("e-1", "p-1"));
    net.emr_a.save(obs_om("o-1", "p-1", "e-1", 60.0));
    eventually(
        &format!(
            "the patient, encounter and obs reach the district's, the centre's and clinic B's OpenMRS\n{}",
            net.logs()
        ),
        || {
            net.every_emr_holds("Patient", &["p-1"])
                && net.every_emr_holds("Encounter", &["e-1"])
                && net.every_emr_holds("Observation", &["o-1"])
        },
    );
    for (name, s) in net.emrs() {
        let p = s.get("Patient", "p-1").unwrap().unwrap();
        assert_eq!(p["name"][0]["family"], "Otieno", "{name}");
        let o = s.get("Observation", "o-1").unwrap().unwrap();
        assert_eq!(o["valueQuantity"]["value"], 60.0, "{name}");
    }
    // Ten more rounds at every level: no OpenMRS is written again, nothing doubles.
    let writes: Vec<u64> = net.emrs().iter().map(|(_, s)| s.writes()).collect();
    let requests = net.emr_a.requests();
    eventually("ten more rounds at clinic A", || {
        net.emr_a.requests() > requests + 10 * 3
    });
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<u64> = net.emrs().iter().map(|(_, s)| s.writes()).collect();
    assert_eq!(
        writes,
        after,
        "no OpenMRS was written again\n{}",
        net.logs()
    );
    for (kind, id) in [
        ("Patient", "p-1"),
        ("Encounter", "e-1"),
        ("Observation", "o-1"),
    ] {
        assert!(
            net.every_emr_holds(kind, &[id]),
            "one {kind} in every OpenMRS"
        );
        for n in net.nodes() {
            assert_eq!(n.live(kind), [id], "{}: one {kind}", n.id);
        }
    }
    for n in net.nodes() {
        assert!(n.quarantine().is_empty(), "{}: {:?}", n.id, n.quarantine());
    }
    // A name correction (OpenMRS emits only a person_name event) goes all the way.
    net.emr_a.edit_name("p-1", "Amina", "Odhiambo");
    eventually("the corrected name reaches every OpenMRS", || {
        net.emrs().iter().all(|(_, s)| {
            s.get("Patient", "p-1")
                .flatten()
                .map(|p| p["name"][0]["family"].clone())
                == Some(json!("Odhiambo"))
        })
    });
}

#[test]
fn an_obs_corrected_in_the_central_openmrs_is_one_logical_record_everywhere() {
    let net = network();
    net.emr_a.save(patient_om("p-1", "North", "female"));
    net.emr_a.save(encounter_om("e-1", "p-1"));
    net.emr_a.save(obs_om("o-1", "p-1", "e-1", 60.0));
    eventually(
        &format!("the obs reaches every OpenMRS\n{}", net.logs()),
        || net.every_emr_holds("Observation", &["o-1"]),
    );
    // A data manager at the centre corrects the weight: OpenMRS voids o-1 and saves
    // the correction as a new obs with a new uuid.
    let corrected = net.central.save(obs_om("o-1", "p-1", "e-1", 66.0));
    assert_ne!(corrected, "o-1");
    let value = |s: &OpenMrsSim| -> Option<Value> {
        let ids = s.ids("Observation");
        (ids.len() == 1)
            .then(|| s.get("Observation", &ids[0]).flatten())
            .flatten()
            .map(|o| o["valueQuantity"]["value"].clone())
    };
    eventually(
        &format!("the correction reaches every OpenMRS\n{}", net.logs()),
        || {
            net.emrs()
                .iter()
                .all(|(_, s)| value(s) == Some(json!(66.0)))
        },
    );
    for (name, s) in net.emrs() {
        assert_eq!(s.ids("Observation").len(), 1, "{name}: one live obs");
        assert!(
            matches!(s.get("Observation", "o-1"), Some(None)),
            "{name}: the old value is voided"
        );
    }
    // In the network it stays one record under its first uuid.
    std::thread::sleep(Duration::from_secs(3));
    for n in net.nodes() {
        assert_eq!(n.live("Observation"), ["o-1"], "{}", n.id);
        let o = n.json(&["get", "Observation/o-1"]);
        assert_eq!(o["valueQuantity"]["value"], 66.0, "{}", n.id);
        assert!(n.quarantine().is_empty(), "{}: {:?}", n.id, n.quarantine());
    }
}
