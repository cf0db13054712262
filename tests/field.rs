//! Field-proofing as a technician meets it over SSH: commands that only read never
//! create a store, and root never leaves files the service user cannot write.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;

fn embedded_node(dir: &Path, store: &Path) -> std::path::PathBuf {
    let config = dir.join("n.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"n\"\nstore = \"{}\"\n[hub]\nlisten = \"127.0.0.1:0\"\n",
            store.display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn a_typo_in_the_store_path_is_named_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("clinicsnyc.db");
    let config = embedded_node(dir.path(), &typo);
    for args in [
        &["status"][..],
        &["ls"],
        &["history", "Patient/p1"],
        &["quarantine", "list"],
        &["audit", "verify"],
    ] {
        let out = cli(&config, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {err}");
        assert!(
            err.contains("no store at") && err.contains("node.store"),
            "{args:?}: {err}"
        );
    }
    let out = cli(&config, &["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no store yet"), "{text}");
    assert!(!typo.exists(), "a read command created the store");
}

#[test]
fn root_is_refused_on_a_store_owned_by_the_service_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let store = data.join("n.db");
    let config = embedded_node(dir.path(), &store);
    let p = dir.path().join("p.json");
    std::fs::write(&p, patient("p1", "North").to_string()).unwrap();
    assert!(cli(&config, &["put", p.to_str().unwrap()]).status.success());
    // The service user (nobody here) owns its directory and store, as after install.
    for f in [&data, &store] {
        std::os::unix::fs::chown(f, Some(65534), Some(65534)).unwrap();
    }
    for extra in ["n.db-wal", "n.db-shm"] {
        let _ = std::fs::remove_file(data.join(extra));
    }
    let before: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let out = cli(&config, &["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("sudo -u nobody clinicsync"), "{err}");
    let out = cli(&config, &["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sudo -u nobody"), "{text}");
    let after: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(before, after, "root left files behind");
    for f in after {
        assert_eq!(
            std::fs::metadata(&f).unwrap().uid(),
            65534,
            "{f:?} is root's"
        );
    }
}
