//! A clinic box wiped and reinstalled under the same node id, as the field does it:
//! clinicians write before the first sync, the box has new keys. Everything it had
//! comes back, its new writes go up, an edit of an old record is a normal edit (not
//! stale, no conflict with itself), and its USB bundles are accepted again.
//! Real processes: a hub `run`, the clinic through the CLI.

mod common;

use std::path::Path;
use std::time::Duration;

use clinicsync::devkit::cluster::{self, Proc};
use clinicsync::model::RecordKey;
use clinicsync::store::Store;
use common::*;
use serde_json::{json, Value};

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn put(config: &Path, dir: &Path, name: &str, v: Value) {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    ok(cli(config, &["put", p.to_str().unwrap()]));
}

/// The clinic's export bundle parts on the stick (not the hub's return bundles).
fn exports(stick: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(stick)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("clinic-a-to-hub")
        })
        .collect();
    v.sort();
    v
}

fn last_line(out: std::process::Output) -> String {
    ok(out).lines().last().unwrap().to_string()
}

#[test]
fn a_wiped_clinic_gets_everything_back_and_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let port = cluster::free_port().unwrap();
    let l = cluster::write_layout(dir.path(), port, &[("clinic-a", "North")], "", "").unwrap();
    let (hubc, a) = (&l.hub.config, &l.clinics[0].config);
    let mut hub = Proc::spawn(Path::new(BIN), "hub", hubc, &["run"]).unwrap();
    cluster::wait_healthy(&l.hub_url, Duration::from_secs(20)).unwrap();
    let stick = dir.path().join("stick");
    std::fs::create_dir(&stick).unwrap();
    let hub_pub = last_line(cli(hubc, &["keys", "init"]));
    let a_pub = last_line(cli(a, &["keys", "init"]));
    ok(cli(hubc, &["keys", "trust", &a_pub]));
    ok(cli(a, &["keys", "trust", &hub_pub, "--parent"]));

    // 250 patients with an encounter each: 500 records, synced; one USB round too.
    let mut entries = Vec::new();
    for i in 0..250 {
        entries.push(json!({"resource": patient(&format!("p{i}"), "North")}));
        entries.push(json!({"resource": encounter(&format!("e{i}"), &format!("p{i}"))}));
    }
    put(
        a,
        dir.path(),
        "day.json",
        json!({"resourceType":"Bundle","type":"collection","entry":entries}),
    );
    ok(cli(a, &["sync"]));
    // p3 is edited once more before the box dies: the hub holds clinic-a's 2nd write.
    put(
        a,
        dir.path(),
        "p3-second.json",
        json!({"resourceType":"Patient","id":"p3","gender":"female","birthDate":"1980-01-01","address":[{"district":"North"}]}),
    );
    ok(cli(a, &["sync"]));
    ok(cli(a, &["export", stick.to_str().unwrap()]));
    let first = exports(&stick);
    ok(cli(hubc, &["import", first[0].to_str().unwrap()]));
    for p in std::fs::read_dir(&stick).unwrap() {
        std::fs::remove_file(p.unwrap().path()).unwrap();
    }
    let hub_records = Store::open_existing(&l.hub.store)
        .unwrap()
        .counts()
        .unwrap()
        .records;
    assert_eq!(hub_records, 500);

    // The box dies; a new one is installed under the same id, with new keys.
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let p = f.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("clinic-a.db") {
            std::fs::remove_file(&p).unwrap();
        }
    }
    std::fs::remove_dir_all(dir.path().join("clinic-a.keys")).unwrap();
    let new_pub = last_line(cli(a, &["keys", "init"]));
    ok(cli(a, &["keys", "trust", &hub_pub, "--parent"]));
    let refused = cli(hubc, &["keys", "trust", &new_pub]);
    assert!(
        !refused.status.success(),
        "a new key for a known node was taken silently"
    );
    ok(cli(hubc, &["keys", "trust", &new_pub, "--replace"]));

    // Clinicians start work before the first sync: three new patients, and an edit
    // of one this clinic wrote before the wipe (its counters restarted at 1).
    for i in 0..3 {
        put(
            a,
            dir.path(),
            &format!("new{i}.json"),
            patient(&format!("n{i}"), "North"),
        );
    }
    put(
        a,
        dir.path(),
        "early-edit.json",
        json!({"resourceType":"Patient","id":"p3","gender":"female","birthDate":"1990-03-03","address":[{"district":"North"}]}),
    );
    ok(cli(a, &["sync"]));
    ok(cli(a, &["sync"]));
    eprintln!(
        "HUB {}",
        String::from_utf8_lossy(&cli(hubc, &["history", "Patient/p3"]).stdout)
    );
    eprintln!(
        "CLINIC {}",
        String::from_utf8_lossy(&cli(a, &["history", "Patient/p3"]).stdout)
    );
    // The early edit is neither stale nor lost: it is the record everywhere.
    let early = |s: &Store| get(s, "Patient/p3").unwrap()["birthDate"].clone();
    assert_eq!(
        early(&Store::open_existing(&l.clinics[0].store).unwrap()),
        "1990-03-03"
    );
    assert_eq!(
        early(&Store::open_existing(&l.hub.store).unwrap()),
        "1990-03-03"
    );
    let c = Store::open_existing(&l.clinics[0].store).unwrap();
    assert_eq!(c.counts().unwrap().records, 503, "not everything came back");
    assert!(get(&c, "Encounter/e249").is_some());
    let h = Store::open_existing(&l.hub.store).unwrap();
    assert_eq!(
        h.counts().unwrap().records,
        503,
        "the new records did not go up"
    );

    // An edit of an old record is an ordinary edit at the hub.
    put(
        a,
        dir.path(),
        "edit.json",
        json!({"resourceType":"Patient","id":"p7","gender":"male","address":[{"district":"North"}]}),
    );
    ok(cli(a, &["sync"]));
    let h = Store::open_existing(&l.hub.store).unwrap();
    assert_eq!(
        get(&h, "Patient/p7").unwrap()["gender"],
        "male",
        "the edit was judged stale"
    );
    // The one conflict is the edit made before the first sync: it reused the vector
    // of this clinic's own pre-wipe write of p3, so the hub resolved it as a new edit
    // (kept, by the later clock) and kept both for review. None for edits after it.
    let conflicts = h.conflicts_list(false, None).unwrap();
    assert_eq!(
        conflicts.len(),
        1,
        "the node conflicted with itself: {conflicts:?}"
    );
    assert_eq!(conflicts[0].record, "Patient/p3");
    assert!(
        conflicts[0].resolution.contains("counters restarted"),
        "{conflicts:?}"
    );
    let p7 = h
        .current(&RecordKey::parse("Patient/p7").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(p7.version.vv.get("clinic-a"), 2, "{}", p7.version.vv);

    // Its next USB bundle (#1 of the new incarnation) is accepted.
    put(a, dir.path(), "usb.json", patient("u1", "North"));
    ok(cli(a, &["export", stick.to_str().unwrap()]));
    let second = exports(&stick);
    let out = ok(cli(hubc, &["import", second[0].to_str().unwrap()]));
    assert!(out.contains("applied"), "{out}");
    assert!(get(&Store::open_existing(&l.hub.store).unwrap(), "Patient/u1").is_some());
    for p in std::fs::read_dir(&stick).unwrap() {
        std::fs::remove_file(p.unwrap().path()).unwrap();
    }

    // Wiped again, but the keys survive this time (only the store was lost): its
    // first sync tells it which bundle the hub imported last, so the next one is
    // numbered after it instead of being refused as a replay.
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let p = f.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("clinic-a.db")
        {
            std::fs::remove_file(&p).unwrap();
        }
    }
    ok(cli(a, &["keys", "trust", &hub_pub, "--parent"]));
    ok(cli(a, &["sync"]));
    put(a, dir.path(), "usb2.json", patient("u2", "North"));
    ok(cli(a, &["export", stick.to_str().unwrap()]));
    let third = exports(&stick);
    let out = ok(cli(hubc, &["import", third[0].to_str().unwrap()]));
    assert!(out.contains("applied"), "{out}");
    assert!(get(&Store::open_existing(&l.hub.store).unwrap(), "Patient/u2").is_some());
    hub.terminate();
}
