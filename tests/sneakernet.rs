//! USB bundles with no network at all: the real binary, real files, a real full
//! filesystem (tmpfs), and a real process killed mid-import.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use clinicsync::devkit::cluster::{self, Layout, Proc};
use clinicsync::store::Store;
use common::BIN;
use serde_json::json;

fn run(config: &Path, args: &[&str]) -> Output {
    common::cli(config, args)
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn refused(out: Output, words: &str) {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(8),
        "expected a refusal (exit 8): {err}"
    );
    assert!(err.contains(words), "{err:?} lacks {words:?}");
}

fn write_json(dir: &Path, name: &str, v: serde_json::Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    p
}

/// A hub and one clinic that trust each other's keys; no process runs.
fn enrolled(dir: &Path) -> Layout {
    let l = cluster::write_layout(dir, 1, &[("clinic-a", "North")], "", "").unwrap();
    let (hub, clinic) = (&l.hub.config, &l.clinics[0].config);
    let hub_pub = ok(run(hub, &["keys", "init"]))
        .lines()
        .last()
        .unwrap()
        .to_string();
    let clinic_pub = ok(run(clinic, &["keys", "init"]))
        .lines()
        .last()
        .unwrap()
        .to_string();
    ok(run(hub, &["keys", "trust", &clinic_pub]));
    ok(run(clinic, &["keys", "trust", &hub_pub, "--parent"]));
    l
}

fn parts_in(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            name.starts_with(prefix) && !name.ends_with(".tmp")
        })
        .collect();
    v.sort();
    v
}

fn fingerprint(store: &Path) -> (u64, u64, u64, u64) {
    let c = Store::open_existing(store).unwrap().counts().unwrap();
    (c.records, c.audit, c.head_seq, c.outbox)
}

#[test]
fn clinic_to_stick_to_hub_to_stick_to_clinic_with_no_network() {
    let dir = tempfile::tempdir().unwrap();
    let stick = dir.path().join("stick");
    std::fs::create_dir(&stick).unwrap();
    let l = enrolled(dir.path());
    let (hub, clinic) = (&l.hub.config, &l.clinics[0].config);
    let meta = write_json(
        dir.path(),
        "meta.json",
        json!({"resourceType":"Location","id":"loc-1","name":"Central"}),
    );
    ok(run(hub, &["put", meta.to_str().unwrap()]));
    let hubp = write_json(
        dir.path(),
        "hp.json",
        json!({"resourceType":"Patient","id":"hub-p","address":[{"district":"North"}]}),
    );
    ok(run(hub, &["put", hubp.to_str().unwrap()]));
    let mine = write_json(
        dir.path(),
        "a.json",
        clinicsync::synth::bundle(clinicsync::synth::clinic_records(
            5, "a", "North", "loc-1", 30, 2, 3,
        )),
    );
    ok(run(clinic, &["put", mine.to_str().unwrap()]));

    let out = ok(run(
        clinic,
        &["export", stick.to_str().unwrap(), "--part-size", "4K"],
    ));
    assert!(out.contains("270 records"), "{out}");
    let parts = parts_in(&stick, "clinic-a-to-hub");
    assert!(parts.len() > 1, "split into parts: {parts:?}");
    let out = ok(run(hub, &["import", parts[0].to_str().unwrap()]));
    assert!(out.contains("270 records applied"), "{out}");
    let ret = parts_in(&stick, "hub-to-clinic-a");
    assert!(!ret.is_empty());
    let out = ok(run(clinic, &["import", ret[0].to_str().unwrap()]));
    assert!(out.contains("270 receipts"), "{out}");

    let h = Store::open_existing(&l.hub.store).unwrap();
    let c = Store::open_existing(&l.clinics[0].store).unwrap();
    assert_eq!(h.counts().unwrap().records, 272);
    assert_eq!(c.counts().unwrap().outbox, 0, "receipts cleared the outbox");
    assert!(
        common::get(&c, "Location/loc-1").is_some(),
        "metadata came back"
    );
    assert!(
        common::get(&c, "Patient/hub-p").is_some(),
        "catchment update came back"
    );
    assert!(matches!(
        h.verify_audit().unwrap(),
        clinicsync::store::AuditCheck::Intact { .. }
    ));
}

#[test]
fn replayed_and_older_bundles_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (s1, s2) = (dir.path().join("s1"), dir.path().join("s2"));
    std::fs::create_dir(&s1).unwrap();
    std::fs::create_dir(&s2).unwrap();
    let l = enrolled(dir.path());
    let (hub, clinic) = (&l.hub.config, &l.clinics[0].config);
    let v1 = write_json(
        dir.path(),
        "v1.json",
        json!({"resourceType":"Patient","id":"p","gender":"male"}),
    );
    ok(run(clinic, &["put", v1.to_str().unwrap()]));
    ok(run(clinic, &["export", s1.to_str().unwrap()]));
    let v2 = write_json(
        dir.path(),
        "v2.json",
        json!({"resourceType":"Patient","id":"p","gender":"female"}),
    );
    ok(run(clinic, &["put", v2.to_str().unwrap()]));
    ok(run(clinic, &["export", s2.to_str().unwrap()]));
    let old = parts_in(&s1, "clinic-a-to-hub")[0].clone();
    let new = parts_in(&s2, "clinic-a-to-hub")[0].clone();

    ok(run(hub, &["import", new.to_str().unwrap()]));
    let before = fingerprint(&l.hub.store);
    refused(
        run(hub, &["import", new.to_str().unwrap()]),
        "already imported",
    );
    refused(
        run(hub, &["import", old.to_str().unwrap()]),
        "older than bundle #2",
    );
    assert_eq!(fingerprint(&l.hub.store), before);
    let h = Store::open_existing(&l.hub.store).unwrap();
    assert_eq!(
        common::get(&h, "Patient/p").unwrap()["gender"],
        "female",
        "nothing rolled back"
    );
}

#[test]
fn tampered_truncated_untrusted_and_misaddressed_bundles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let stick = dir.path().join("stick");
    std::fs::create_dir(&stick).unwrap();
    let l = enrolled(dir.path());
    let (hub, clinic) = (&l.hub.config, &l.clinics[0].config);
    let recs = write_json(
        dir.path(),
        "a.json",
        clinicsync::synth::bundle(clinicsync::synth::clinic_records(
            6, "a", "North", "l", 20, 1, 2,
        )),
    );
    ok(run(clinic, &["put", recs.to_str().unwrap()]));
    ok(run(clinic, &["export", stick.to_str().unwrap()]));
    let good = parts_in(&stick, "clinic-a-to-hub")[0].clone();
    let bytes = std::fs::read(&good).unwrap();
    let before = fingerprint(&l.hub.store);

    let variant = |name: &str, data: &[u8]| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("b.csb.001");
        std::fs::write(&p, data).unwrap();
        p
    };
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    refused(
        run(
            hub,
            &["import", variant("flip", &flipped).to_str().unwrap()],
        ),
        "signature does not match",
    );
    let mut header_flip = bytes.clone();
    header_flip[20] ^= 0x01;
    let out = run(
        hub,
        &["import", variant("hflip", &header_flip).to_str().unwrap()],
    );
    assert_eq!(
        out.status.code(),
        Some(8),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refused(
        run(
            hub,
            &[
                "import",
                variant("cut", &bytes[..bytes.len() - 100])
                    .to_str()
                    .unwrap(),
            ],
        ),
        "truncated",
    );
    refused(
        run(
            hub,
            &["import", variant("short", &bytes[..8]).to_str().unwrap()],
        ),
        "truncated",
    );
    refused(
        run(
            hub,
            &[
                "import",
                variant("junk", b"PK\x03\x04 a zip file, not a bundle")
                    .to_str()
                    .unwrap(),
            ],
        ),
        "not a clinicsync bundle",
    );

    // A node the hub never enrolled.
    let x =
        cluster::write_layout(&dir.path().join("x"), 1, &[("clinic-x", "West")], "", "").unwrap();
    let xc = &x.clinics[0].config;
    ok(run(xc, &["keys", "init"]));
    let hub_pub = ok(run(hub, &["keys", "show"]));
    ok(run(xc, &["keys", "trust", hub_pub.trim(), "--parent"]));
    ok(run(xc, &["put", recs.to_str().unwrap()]));
    let xs = dir.path().join("xs");
    std::fs::create_dir(&xs).unwrap();
    ok(run(xc, &["export", xs.to_str().unwrap()]));
    refused(
        run(
            hub,
            &["import", parts_in(&xs, "clinic-x")[0].to_str().unwrap()],
        ),
        "clinic-x\", which this node does not trust",
    );

    // A bundle for another hub.
    let other =
        cluster::write_layout(&dir.path().join("o"), 1, &[("clinic-a", "North")], "", "").unwrap();
    std::fs::write(
        &other.hub.config,
        std::fs::read_to_string(&other.hub.config)
            .unwrap()
            .replace("id = \"hub\"", "id = \"hub-2\""),
    )
    .unwrap();
    let other_pub = ok(run(&other.hub.config, &["keys", "init"]))
        .lines()
        .last()
        .unwrap()
        .to_string();
    ok(run(clinic, &["keys", "trust", &other_pub, "--parent"]));
    let os = dir.path().join("os");
    std::fs::create_dir(&os).unwrap();
    ok(run(clinic, &["export", os.to_str().unwrap()]));
    refused(
        run(
            hub,
            &[
                "import",
                parts_in(&os, "clinic-a-to-hub-2")[0].to_str().unwrap(),
            ],
        ),
        "encrypted to \"hub-2\", not to this node",
    );

    assert_eq!(
        fingerprint(&l.hub.store),
        before,
        "no refused bundle changed the hub"
    );
    // The genuine bundle still imports.
    ok(run(hub, &["import", good.to_str().unwrap()]));
}

#[test]
fn a_stick_that_fills_up_leaves_no_half_bundle() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: mounting a small tmpfs needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let stick = dir.path().join("stick");
    std::fs::create_dir(&stick).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&stick)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(stick.clone());
    let l = enrolled(dir.path());
    let clinic = &l.clinics[0].config;
    let recs = write_json(
        dir.path(),
        "a.json",
        clinicsync::synth::bundle(clinicsync::synth::clinic_records(
            7, "a", "North", "l", 400, 2, 3,
        )),
    );
    ok(run(clinic, &["put", recs.to_str().unwrap()]));
    let before = fingerprint(&l.clinics[0].store);
    let out = run(clinic, &["export", stick.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(8));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no space left") && err.contains("no bundle was left behind"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&stick)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "half a bundle left behind: {left:?}");
    assert_eq!(
        fingerprint(&l.clinics[0].store),
        before,
        "the outbox is untouched"
    );
}

#[test]
fn an_import_killed_midway_resumes_and_applies_each_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let stick = dir.path().join("stick");
    std::fs::create_dir(&stick).unwrap();
    let l = enrolled(dir.path());
    let (hub, clinic) = (&l.hub.config, &l.clinics[0].config);
    let recs = write_json(
        dir.path(),
        "a.json",
        clinicsync::synth::bundle(clinicsync::synth::clinic_records(
            8, "a", "North", "l", 3000, 2, 4,
        )),
    );
    ok(run(clinic, &["put", recs.to_str().unwrap()]));
    ok(run(
        clinic,
        &["export", stick.to_str().unwrap(), "--part-size", "256K"],
    ));
    let first = parts_in(&stick, "clinic-a-to-hub")[0].clone();

    let mut p = Proc::spawn(
        Path::new(BIN),
        "import",
        hub,
        &["import", first.to_str().unwrap()],
    )
    .unwrap();
    let progressed = cluster::wait_until(Duration::from_secs(60), || {
        Store::open_existing(&l.hub.store)
            .ok()
            .and_then(|s| {
                s.conn()
                    .query_row("SELECT items_done FROM bundles_in", [], |r| {
                        r.get::<_, i64>(0)
                    })
                    .ok()
            })
            .is_some_and(|n| n >= 3)
    });
    p.kill9();
    assert!(progressed, "import made no progress");
    let mid = Store::open_existing(&l.hub.store)
        .unwrap()
        .counts()
        .unwrap()
        .records;
    assert!(mid > 0 && mid < 33_000, "killed mid-import: {mid}");
    assert!(
        parts_in(&stick, "hub-to-clinic-a").is_empty(),
        "no return bundle from a killed import"
    );

    let out = ok(run(hub, &["import", first.to_str().unwrap()]));
    assert!(out.contains("resumed an interrupted import"), "{out}");
    let h = Store::open_existing(&l.hub.store).unwrap();
    assert_eq!(h.counts().unwrap().records, 33_000);
    let versions: i64 = h
        .conn()
        .query_row("SELECT COUNT(*) FROM history", [], |r| r.get(0))
        .unwrap();
    assert_eq!(versions, 33_000, "each record applied once");
    let ret = parts_in(&stick, "hub-to-clinic-a");
    let out = ok(run(clinic, &["import", ret[0].to_str().unwrap()]));
    assert!(out.contains("33000 receipts"), "{out}");
    assert_eq!(fingerprint(&l.clinics[0].store).3, 0);
}

#[test]
fn records_sent_both_by_network_and_by_stick_arrive_once() {
    let dir = tempfile::tempdir().unwrap();
    let stick = dir.path().join("stick");
    std::fs::create_dir(&stick).unwrap();
    let port = cluster::free_port().unwrap();
    let l = cluster::write_layout(dir.path(), port, &[("clinic-a", "North")], "", "").unwrap();
    let (hub, clinic) = (&l.hub.config, &l.clinics[0].config);
    let hub_pub = ok(run(hub, &["keys", "init"]))
        .lines()
        .last()
        .unwrap()
        .to_string();
    let clinic_pub = ok(run(clinic, &["keys", "init"]))
        .lines()
        .last()
        .unwrap()
        .to_string();
    ok(run(hub, &["keys", "trust", &clinic_pub]));
    ok(run(clinic, &["keys", "trust", &hub_pub, "--parent"]));
    let recs = write_json(
        dir.path(),
        "a.json",
        clinicsync::synth::bundle(clinicsync::synth::clinic_records(
            9, "a", "North", "l", 10, 1, 1,
        )),
    );
    ok(run(clinic, &["put", recs.to_str().unwrap()]));
    ok(run(clinic, &["export", stick.to_str().unwrap()]));
    // The link comes back before the stick reaches the hub.
    let mut server = Proc::spawn(Path::new(BIN), "hub", hub, &["run"]).unwrap();
    cluster::wait_healthy(&l.hub_url, Duration::from_secs(20)).unwrap();
    ok(run(clinic, &["sync"]));
    server.terminate();
    let out = ok(run(
        hub,
        &[
            "import",
            parts_in(&stick, "clinic-a-to-hub")[0].to_str().unwrap(),
        ],
    ));
    assert!(out.contains("30 receipts"), "{out}");
    let out = ok(run(
        clinic,
        &[
            "import",
            parts_in(&stick, "hub-to-clinic-a")[0].to_str().unwrap(),
        ],
    ));
    assert!(out.contains("30 receipts"), "{out}");
    let h = Store::open_existing(&l.hub.store).unwrap();
    let versions: i64 = h
        .conn()
        .query_row("SELECT COUNT(*) FROM history", [], |r| r.get(0))
        .unwrap();
    assert_eq!(versions, 30, "each record arrived once");
    let c = Store::open_existing(&l.clinics[0].store).unwrap();
    assert_eq!(c.counts().unwrap().outbox, 0);
}

fn audit_rows(store: &Path, action: &str) -> Vec<(String, String)> {
    let s = Store::open_existing(store).unwrap();
    let mut stmt = s
        .conn()
        .prepare("SELECT record, detail FROM audit WHERE action=?1 ORDER BY n")
        .unwrap();
    let rows = stmt
        .query_map([action], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    rows
}

fn fails_with(out: Output, words: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected a failure: {err}");
    assert!(err.contains(words), "{err:?} lacks {words:?}");
    err
}

#[test]
fn a_root_hub_refuses_to_trust_a_parent() {
    let dir = tempfile::tempdir().unwrap();
    let l = enrolled(dir.path());
    let (hub, clinic) = (&l.hub.config, &l.clinics[0].config);
    let clinic_pub = ok(run(clinic, &["keys", "show"]));
    let before = fingerprint(&l.hub.store);
    let err = fails_with(
        run(hub, &["keys", "trust", clinic_pub.trim(), "--parent"]),
        "root hub",
    );
    assert!(
        err.contains("no [parent]") && err.contains("without --parent"),
        "{err}"
    );
    assert_eq!(fingerprint(&l.hub.store), before);
    let list = ok(run(hub, &["keys", "list"]));
    assert!(!list.contains("(parent)"), "{list}");
}

#[test]
fn a_different_key_for_a_trusted_node_needs_replace_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let stick = dir.path().join("stick");
    std::fs::create_dir(&stick).unwrap();
    let l = enrolled(dir.path());
    let hub = &l.hub.config;
    let hub_pub = ok(run(hub, &["keys", "show"]));
    // Someone else's machine calling itself clinic-a, with its own keys.
    let x =
        cluster::write_layout(&dir.path().join("x"), 1, &[("clinic-a", "North")], "", "").unwrap();
    let impostor = &x.clinics[0].config;
    let impostor_pub = ok(run(impostor, &["keys", "init"]))
        .lines()
        .last()
        .unwrap()
        .to_string();
    ok(run(
        impostor,
        &["keys", "trust", hub_pub.trim(), "--parent"],
    ));
    let recs = write_json(
        dir.path(),
        "p.json",
        json!({"resourceType":"Patient","id":"forged","address":[{"district":"North"}]}),
    );
    ok(run(impostor, &["put", recs.to_str().unwrap()]));
    ok(run(impostor, &["export", stick.to_str().unwrap()]));
    let forged = parts_in(&stick, "clinic-a-to-hub")[0].clone();

    let before = fingerprint(&l.hub.store);
    let err = fails_with(
        run(hub, &["keys", "trust", &impostor_pub]),
        "already trusted with another key",
    );
    assert!(err.contains("--replace"), "{err}");
    assert_eq!(fingerprint(&l.hub.store), before, "nothing changed");
    refused(
        run(hub, &["import", forged.to_str().unwrap()]),
        "signature does not match",
    );

    // The same key again changes nothing; --replace (the keys really changed) does.
    let genuine_pub = ok(run(&l.clinics[0].config, &["keys", "show"]));
    let out = ok(run(hub, &["keys", "trust", genuine_pub.trim()]));
    assert!(out.contains("already trusting"), "{out}");
    let out = ok(run(hub, &["keys", "trust", &impostor_pub, "--replace"]));
    assert!(out.contains("previous key"), "{out}");
    let replaced = audit_rows(&l.hub.store, "trust-replace");
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert_eq!(replaced[0].0, "clinic-a");
    assert!(replaced[0].1.contains("replaced by"), "{replaced:?}");
    assert!(ok(run(hub, &["audit", "verify"])).contains("intact"));
    ok(run(hub, &["import", forged.to_str().unwrap()]));
}

#[test]
fn an_untrusted_node_s_bundles_are_refused_and_the_untrust_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let stick = dir.path().join("stick");
    std::fs::create_dir(&stick).unwrap();
    let l = enrolled(dir.path());
    let (hub, clinic) = (&l.hub.config, &l.clinics[0].config);
    let recs = write_json(
        dir.path(),
        "p.json",
        json!({"resourceType":"Patient","id":"p","address":[{"district":"North"}]}),
    );
    ok(run(clinic, &["put", recs.to_str().unwrap()]));
    ok(run(clinic, &["export", stick.to_str().unwrap()]));
    let bundle = parts_in(&stick, "clinic-a-to-hub")[0].clone();

    let out = ok(run(hub, &["keys", "untrust", "clinic-a"]));
    assert!(out.contains("no longer trusting clinic-a"), "{out}");
    assert!(!ok(run(hub, &["keys", "list"])).contains("clinic-a"));
    let untrusted = audit_rows(&l.hub.store, "untrust");
    assert_eq!(untrusted.len(), 1, "{untrusted:?}");
    assert_eq!(untrusted[0].0, "clinic-a");
    let before = fingerprint(&l.hub.store);
    refused(
        run(hub, &["import", bundle.to_str().unwrap()]),
        "which this node does not trust",
    );
    assert_eq!(fingerprint(&l.hub.store), before);
    let out = run(hub, &["keys", "untrust", "clinic-a"]);
    assert_eq!(out.status.code(), Some(7));
    fails_with(out, "is not trusted");
    assert!(ok(run(hub, &["audit", "verify"])).contains("intact"));
}

#[test]
fn an_import_with_no_room_for_its_private_copy_is_refused_and_changes_nothing() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: mounting a small tmpfs needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let stick = dir.path().join("stick");
    std::fs::create_dir(&stick).unwrap();
    let l = enrolled(dir.path());
    let (hub, clinic) = (&l.hub.config, &l.clinics[0].config);
    let recs = write_json(
        dir.path(),
        "a.json",
        clinicsync::synth::bundle(clinicsync::synth::clinic_records(
            7, "a", "North", "l", 20, 1, 1,
        )),
    );
    ok(run(clinic, &["put", recs.to_str().unwrap()]));
    ok(run(clinic, &["export", stick.to_str().unwrap()]));
    let bundle = parts_in(&stick, "clinic-a-to-hub")[0].clone();
    let private = l.hub.store.parent().unwrap().join("import-tmp");
    std::fs::create_dir_all(&private).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&private)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let guard = Unmount(private.clone());
    let before = fingerprint(&l.hub.store);
    refused(
        run(hub, &["import", bundle.to_str().unwrap()]),
        "not enough free space",
    );
    assert_eq!(fingerprint(&l.hub.store), before);
    drop(guard);
    ok(run(hub, &["import", bundle.to_str().unwrap()]));
}

#[test]
fn a_bundle_count_at_its_maximum_is_refused_by_name_not_wrapped() {
    // The parent's pull answers say which of our bundles it imported last; one that
    // claims the largest count there is leaves no next number. Export must say so
    // (wrapping to 0 would reuse numbers the hub refuses as replays) and write nothing.
    let dir = tempfile::tempdir().unwrap();
    let stick = dir.path().join("stick");
    std::fs::create_dir(&stick).unwrap();
    let l = enrolled(dir.path());
    let clinic = &l.clinics[0];
    let v1 = write_json(
        dir.path(),
        "v1.json",
        json!({"resourceType":"Patient","id":"p","gender":"male"}),
    );
    ok(run(&clinic.config, &["put", v1.to_str().unwrap()]));
    {
        let mut s = Store::open_existing(&clinic.store).unwrap();
        let mut tx = s.begin().unwrap();
        tx.set_meta(&clinicsync::store::meta::BUNDLE_SEQ_AT_PARENT, u64::MAX)
            .unwrap();
        tx.commit().unwrap();
    }
    refused(
        run(&clinic.config, &["export", stick.to_str().unwrap()]),
        "bundle count to hub is at its maximum",
    );
    assert!(
        std::fs::read_dir(&stick).unwrap().next().is_none(),
        "nothing written to the stick"
    );
}

#[test]
fn a_bundle_numbered_beyond_any_real_count_is_refused_at_import_and_named_by_doctor() {
    // A store keeps bundle numbers as SQLite's signed 64-bit integers: a header signed
    // by a trusted key (a clinic whose store was edited, or whose key leaked) numbered
    // 2^63 or above would read back negative and disorder every later check. The hub
    // refuses it by name, applies nothing, and the clinic's real bundles still go in.
    use clinicsync::keys::{Identity, PublicKeys};
    use clinicsync::transport::file::{BundleHeader, BundleWriter};
    let dir = tempfile::tempdir().unwrap();
    let stick = dir.path().join("stick");
    std::fs::create_dir(&stick).unwrap();
    let l = enrolled(dir.path());
    let (hub, clinic) = (&l.hub.config, &l.clinics[0].config);
    let cfg = clinicsync::config::Config::load(clinic).unwrap();
    let me = Identity::load(&cfg.keys_dir(), "clinic-a").unwrap();
    let hub_line = ok(run(hub, &["keys", "show"]));
    let to = PublicKeys::parse(hub_line.lines().last().unwrap().trim()).unwrap();
    let header = BundleHeader {
        id: clinicsync::auth::new_id(),
        kind: "export".into(),
        sender: "clinic-a".into(),
        recipient: "hub".into(),
        seq: u64::MAX - 1,
        created_ms: clinicsync::time::wall_ms(),
        part_size: 1 << 20,
    };
    let forged = BundleWriter::create(&stick.join("forged.csb"), header, &me, &to)
        .unwrap()
        .finish()
        .unwrap();
    let before = fingerprint(&l.hub.store);
    refused(
        run(hub, &["import", forged[0].to_str().unwrap()]),
        "a bundle number is at most 9223372036854775807",
    );
    assert_eq!(fingerprint(&l.hub.store), before, "nothing applied");

    let v1 = write_json(
        dir.path(),
        "v1.json",
        json!({"resourceType":"Patient","id":"p","gender":"male"}),
    );
    ok(run(clinic, &["put", v1.to_str().unwrap()]));
    ok(run(clinic, &["export", stick.to_str().unwrap()]));
    let real = parts_in(&stick, "clinic-a-to-hub")[0].clone();
    assert!(ok(run(hub, &["import", real.to_str().unwrap()])).contains("1 records"));

    // A count at (or near) the end of the range in the clinic's own store (edited,
    // or written by an older build from a parent's answer) is a doctor finding, not
    // a surprise at the next export.
    let set_count = |v: u64| {
        let mut s = Store::open_existing(&l.clinics[0].store).unwrap();
        let mut tx = s.begin().unwrap();
        tx.set_meta(&clinicsync::store::meta::bundle_seq_out("hub"), v)
            .unwrap();
        tx.commit().unwrap();
    };
    set_count(clinicsync::store::MAX_BUNDLE_SEQ - 1);
    let out = run(clinic, &["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains(
            "bundle_seq_out:hub is 9223372036854775806: beyond any real count, 1 numbers left"
        ),
        "{text}"
    );
    set_count(clinicsync::store::MAX_BUNDLE_SEQ);
    let out = run(clinic, &["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("bundle_seq_out:hub is 9223372036854775807: no next bundle number"),
        "{text}"
    );
    refused(
        run(clinic, &["export", stick.to_str().unwrap()]),
        "bundle count to hub is at its maximum",
    );
}

#[test]
fn a_garbled_trusted_key_is_named_as_corruption_not_as_an_untrusted_sender() {
    let dir = tempfile::tempdir().unwrap();
    let stick = dir.path().join("stick");
    std::fs::create_dir(&stick).unwrap();
    let l = enrolled(dir.path());
    let (hub, clinic) = (&l.hub.config, &l.clinics[0].config);
    let v1 = write_json(
        dir.path(),
        "v1.json",
        json!({"resourceType":"Patient","id":"p","gender":"male"}),
    );
    ok(run(clinic, &["put", v1.to_str().unwrap()]));
    ok(run(clinic, &["export", stick.to_str().unwrap()]));
    let part = parts_in(&stick, "clinic-a-to-hub")[0].clone();
    let db = rusqlite::Connection::open(&l.hub.store).unwrap();
    let good: String = db
        .query_row(
            "SELECT line FROM trusted_keys WHERE node='clinic-a'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    db.execute(
        "UPDATE trusted_keys SET line='clinicsync-node v1 clinic-a zz' WHERE node='clinic-a'",
        [],
    )
    .unwrap();
    drop(db);
    let before = fingerprint(&l.hub.store);
    let out = run(hub, &["import", part.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(10), "corruption exit: {err}");
    assert!(
        err.contains("trusted_keys.line of clinic-a") && !err.contains("does not trust"),
        "{err}"
    );
    assert_eq!(fingerprint(&l.hub.store), before, "nothing applied");
    // `keys list` still lists every row, flags the damaged one under it, and ends
    // with the corruption exit.
    let out = run(hub, &["keys", "list"]);
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(10), "{listed}");
    assert!(
        listed.contains("clinic-a\n  clinicsync-node v1 clinic-a zz\n  DAMAGED: ")
            && listed.contains("trusted_keys.line of clinic-a"),
        "{listed}"
    );
    let out = run(hub, &["keys", "list", "--json"]);
    assert_eq!(out.status.code(), Some(10));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == "clinic-a")
        .unwrap();
    assert!(
        row["damaged"]
            .as_str()
            .is_some_and(|d| d.contains("trusted_keys.line of clinic-a")),
        "{rows}"
    );
    // `doctor` fails it too, naming the row, before a stick arrives.
    let out = run(hub, &["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("trusted keys") && text.contains("trusted_keys.line of clinic-a"),
        "{text}"
    );
    // Trusting the node's key again without --replace names the damage, changes nothing.
    let out = run(hub, &["keys", "trust", &good]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(10), "{err}");
    assert!(
        err.contains("the stored key line of clinic-a is damaged") && err.contains("--replace"),
        "{err}"
    );
    assert_eq!(fingerprint(&l.hub.store), before, "nothing changed");
    // A well-formed line, but another node's key (the hub's own): the row is named,
    // not the bundle's signature.
    let db = rusqlite::Connection::open(&l.hub.store).unwrap();
    db.execute(
        "UPDATE trusted_keys SET line=?1 WHERE node='clinic-a'",
        [good.replace("clinic-a", "clinic-b")],
    )
    .unwrap();
    drop(db);
    let out = run(hub, &["import", part.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(10), "{err}");
    assert!(err.contains("not of \"clinic-a\""), "{err}");
    // Storing the key again, as the message says, mends it.
    ok(run(hub, &["keys", "trust", &good, "--replace"]));
    ok(run(hub, &["import", part.to_str().unwrap()]));
}
