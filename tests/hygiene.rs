//! Hygiene at the edges of a node (issue 11): the modes of the files it creates, the
//! credential files it agrees to read, and what its human output lets through to a
//! technician's terminal. The real binary, real files.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use clinicsync::devkit::cluster;
use clinicsync::filemode::mode_of;
use clinicsync::model::RecordKey;
use clinicsync::store::{Stage, Store};
use clinicsync::time::wall_ms;

fn run(config: &Path, args: &[&str]) -> Output {
    common::cli(config, args)
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn ok(out: Output) -> String {
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    o
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_new_store_is_0600_with_its_wal_and_shm_in_a_0750_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("fresh/data/hub.db");
    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"hub\"\nstore = \"{}\"\n\n[hub]\nlisten = \"127.0.0.1:0\"\n",
            store.display()
        ),
    )
    .unwrap();
    // The first write creates the store (`status` never does).
    let loc = dir.path().join("loc.json");
    std::fs::write(&loc, r#"{"resourceType":"Location","id":"l1"}"#).unwrap();
    ok(run(&config, &["put", loc.to_str().unwrap()]));
    assert_eq!(mode_of(&store).unwrap(), 0o600, "store file");
    assert_eq!(mode_of(&dir.path().join("fresh/data")).unwrap(), 0o750);
    assert_eq!(mode_of(&dir.path().join("fresh")).unwrap(), 0o750);

    // While a writer has it open, SQLite's WAL and shared memory exist: same mode.
    let mut s = Store::open(&store, "hub").unwrap();
    let mut tx = s.begin().unwrap();
    tx.set_meta(&clinicsync::store::meta::NEXT_SYNC_MS, 0u64)
        .unwrap();
    tx.commit().unwrap();
    for suffix in ["-wal", "-shm"] {
        let p = dir.path().join(format!("fresh/data/hub.db{suffix}"));
        assert_eq!(mode_of(&p).unwrap(), 0o600, "{}", p.display());
    }
    drop(s);

    // An older store that everybody could read loses the world bits when opened.
    chmod(&store, 0o644);
    ok(run(&config, &["status"]));
    assert_eq!(mode_of(&store).unwrap(), 0o640);
}

#[test]
fn credential_files_open_to_others_are_refused_naming_file_mode_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let l = cluster::write_layout(dir.path(), 1, &[("clinic-a", "North")], "", "").unwrap();
    let clinic = &l.clinics[0].config;
    let token = dir.path().join("clinic-a.token");
    assert_eq!(
        mode_of(&token).unwrap(),
        0o600,
        "the layout writes it private"
    );

    // Refused before any connection is attempted (the link would fail later).
    chmod(&token, 0o644);
    let out = run(clinic, &["sync"]);
    let (_, err) = text(&out);
    assert!(!out.status.success());
    let t = token.display().to_string();
    assert!(
        err.contains(&t) && err.contains("0644") && err.contains(&format!("chmod 600 {t}")),
        "{err}"
    );

    // The broker password and the EMR credentials: doctor names each one.
    let (pw, cred) = (dir.path().join("mqtt.pw"), dir.path().join("emr.cred"));
    std::fs::write(&pw, "a-pass\n").unwrap();
    std::fs::write(&cred, "admin:Admin123\n").unwrap();
    chmod(&pw, 0o640);
    chmod(&cred, 0o604);
    let cfg = std::fs::read_to_string(clinic).unwrap()
        + &format!(
            "\n[emr]\nkind = \"openmrs\"\nurl = \"http://127.0.0.1:1\"\ncredentials_file = \"{}\"\n\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\npassword_file = \"{}\"\n",
            cred.display(),
            pw.display()
        );
    std::fs::write(clinic, cfg).unwrap();
    let out = run(clinic, &["doctor"]);
    let (o, _) = text(&out);
    assert!(!out.status.success());
    for (file, mode) in [(&token, "0644"), (&pw, "0640"), (&cred, "0604")] {
        let f = file.display().to_string();
        assert!(
            o.lines().any(|l| l.starts_with("FAIL")
                && l.contains(&f)
                && l.contains(mode)
                && l.contains(&format!("chmod 600 {f}"))),
            "{f} {mode}:\n{o}"
        );
    }
    // Private again (0600, or 0400): read, and doctor goes on to the link (port 1).
    for f in [&token, &pw] {
        chmod(f, 0o600);
    }
    chmod(&cred, 0o400);
    let (o, _) = text(&run(clinic, &["doctor"]));
    assert!(!o.contains("chmod"), "{o}");
    assert!(o.contains("FAIL  parent"), "{o}");
}

#[test]
fn control_characters_from_peers_and_files_print_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let l = cluster::write_layout(dir.path(), 1, &[("clinic-a", "North")], "", "").unwrap();
    let clinic = &l.clinics[0].config;
    let v1 = dir.path().join("v1.json");
    std::fs::write(
        &v1,
        r#"{"resourceType":"Patient","id":"p","gender":"male"}"#,
    )
    .unwrap();
    ok(run(clinic, &["put", v1.to_str().unwrap()]));
    // A field name a peer or an EMR chose: it shows in `history`'s "changed:".
    let v2 = dir.path().join("v2.json");
    std::fs::write(
        &v2,
        r#"{"resourceType":"Patient","id":"p","gender":"male","\u001b[31mevil\u001b]0;pwned\u0007":"x"}"#,
    )
    .unwrap();
    ok(run(clinic, &["put", v2.to_str().unwrap()]));
    // A refusal reason as the parent (or the EMR) wrote it.
    {
        let mut s = Store::open_existing(&l.clinics[0].store).unwrap();
        let mut tx = s.begin().unwrap();
        tx.quarantine(
            &RecordKey::parse("Patient/p").unwrap(),
            Stage::Push,
            "refused: \x1b[31mred\x1b[0m\nFAKE LINE \u{202e}txt.exe",
            true,
            wall_ms(),
            |_| 60_000,
        )
        .unwrap();
        tx.commit().unwrap();
    }

    let history = ok(run(clinic, &["history", "Patient/p"]));
    assert!(
        history.contains("\\x1b[31mevil\\x1b]0;pwned\\x07"),
        "{history}"
    );
    let quarantine = ok(run(clinic, &["quarantine", "list"]));
    assert!(
        quarantine.contains("\\x1b[31mred\\x1b[0m\\nFAKE LINE \\u{202e}txt.exe"),
        "{quarantine}"
    );
    assert_eq!(
        quarantine.lines().count(),
        1,
        "no forged line: {quarantine}"
    );
    let status = ok(run(clinic, &["status"]));
    for out in [&history, &quarantine, &status] {
        assert!(
            !out.contains('\x1b') && !out.contains('\x07') && !out.contains('\u{202e}'),
            "{out:?}"
        );
    }
    // JSON keeps the exact text (serde_json escapes it its own way).
    let json = ok(run(clinic, &["quarantine", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v[0]["reason"].as_str().unwrap().contains("\x1b[31mred"));
}

/// A record held unreadable from a pull, as a technician meets it: `quarantine list`
/// names the stage and says it is held; `quarantine show` prints the bytes as they
/// arrived (escaped JSON text: a body crafted to move the cursor moves nothing);
/// `quarantine drop` gives it up and empties the inbox.
#[test]
fn a_record_held_unreadable_from_a_pull_is_listed_shown_and_dropped() {
    use clinicsync::model::{Hlc, VersionVector};
    use clinicsync::wire::WireRecord;
    let dir = tempfile::tempdir().unwrap();
    let l = cluster::write_layout(dir.path(), 1, &[("clinic-a", "North")], "", "").unwrap();
    let clinic = &l.clinics[0].config;
    ok(run(clinic, &["config", "check"]));
    let body = "{\"resourceType\":\"Location\",\"id\":\"x\x1b[2J\",\"name\":";
    {
        let mut s = Store::open(&l.clinics[0].store, "clinic-a").unwrap();
        let key = RecordKey::parse("Location/shed").unwrap();
        let rec = WireRecord {
            kind: key.kind.clone(),
            id: key.id.clone(),
            origin: "hub".into(),
            hlc: Hlc {
                wall_ms: 1,
                counter: 0,
            },
            vv: VersionVector::default(),
            deleted: false,
            body: body.into(),
        };
        let mut tx = s.begin().unwrap();
        tx.hold_in_inbox("parent", &key, &rec, wall_ms()).unwrap();
        let reason = clinicsync::store::unreadable_reason(&"not JSON", body.as_bytes());
        tx.quarantine(&key, Stage::Pull, &reason, true, wall_ms(), |_| 60_000)
            .unwrap();
        tx.commit().unwrap();
    }
    let st = ok(run(clinic, &["status"]));
    assert!(
        st.contains("1 of them held unreadable from the parent"),
        "{st}"
    );
    let list = ok(run(clinic, &["quarantine", "list"]));
    assert!(list.starts_with("Location/shed"), "{list}");
    assert!(
        list.contains(" pull ") && list.contains("held: cannot read it"),
        "{list}"
    );
    let shown = ok(run(clinic, &["quarantine", "show", "Location/shed"]));
    assert!(!shown.contains('\x1b'), "{shown:?}");
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(v["held"], body, "{shown}");
    assert_eq!(v["quarantine"]["stage"], "pull");
    assert!(v["current"].is_null());
    ok(run(clinic, &["quarantine", "drop", "Location/shed"]));
    let status = ok(run(clinic, &["status", "--json"]));
    let st: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(st["inbox"], 0, "{status}");
    assert_eq!(st["quarantine"], 0, "{status}");
}
