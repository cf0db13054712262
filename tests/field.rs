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
fn a_sync_that_creates_the_store_says_so_once() {
    // `sync` is how a new or wiped clinic starts (README, A clinic): it may create the
    // store, but a mistyped node.store must not pass unnoticed.
    let dir = tempfile::tempdir().unwrap();
    let l =
        clinicsync::devkit::cluster::write_layout(dir.path(), 1, &[("clinic-a", "North")], "", "")
            .unwrap();
    let clinic = &l.clinics[0];
    let _ = std::fs::remove_file(&clinic.store);
    // No hub listens: the sync fails on the link, after the store was created.
    let out = cli(&clinic.config, &["sync"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(clinic.store.exists(), "{err}");
    assert!(
        err.contains(&format!(
            "no store was at {} (node.store): created a new one",
            clinic.store.display()
        )),
        "{err}"
    );
    let again = cli(&clinic.config, &["sync"]);
    let err = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(!err.contains("created a new one"), "{err}");
    // Every command that may create the store says so: a clinician's `put` into a
    // mistyped path would otherwise land in a file nothing syncs.
    std::fs::remove_file(&clinic.store).unwrap();
    let rec = dir.path().join("p.json");
    std::fs::write(&rec, r#"{"resourceType":"Patient","id":"p1"}"#).unwrap();
    let out = cli(&clinic.config, &["put", rec.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    assert!(err.contains("(node.store): created a new one"), "{err}");
    // A record reference that is not <Kind>/<id> is a usage error (exit 2).
    let out = cli(&clinic.config, &["history", "nope"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("invalid record reference \"nope\""), "{err}");
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
    // Keys made by root beside the service's store would be unreadable to it.
    let out = cli(&config, &["keys", "init"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("sudo -u nobody clinicsync"), "{err}");
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

#[test]
fn backup_while_running_and_restore_when_stopped() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("n.db");
    let config = embedded_node(dir.path(), &store);
    let p = dir.path().join("p.json");
    std::fs::write(&p, patient("p1", "North").to_string()).unwrap();
    assert!(cli(&config, &["put", p.to_str().unwrap()]).status.success());
    let mut daemon =
        clinicsync::devkit::cluster::Proc::spawn(std::path::Path::new(BIN), "n", &config, &["run"])
            .unwrap();
    assert!(clinicsync::devkit::cluster::wait_until(
        std::time::Duration::from_secs(10),
        || clinicsync::lock::daemon_running(&store)
    ));
    let status = String::from_utf8_lossy(&cli(&config, &["status"]).stdout).to_string();
    assert!(status.contains("daemon      running"), "{status}");

    let backup = dir.path().join("n.backup");
    let out = cli(&config, &["backup", backup.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = cli(&config, &["backup", backup.to_str().unwrap()]);
    assert!(!again.status.success(), "a backup overwrote another");

    std::fs::write(&p, patient("p2", "North").to_string()).unwrap();
    assert!(cli(&config, &["put", p.to_str().unwrap()]).status.success());
    let refused = cli(&config, &["restore", backup.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("stop it first"));

    daemon.terminate();
    let status = String::from_utf8_lossy(&cli(&config, &["status"]).stdout).to_string();
    assert!(status.contains("NOT RUNNING"), "{status}");
    let out = cli(&config, &["restore", backup.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = clinicsync::store::Store::open_existing(&store).unwrap();
    assert!(get(&s, "Patient/p1").is_some());
    assert!(
        get(&s, "Patient/p2").is_none(),
        "the restore kept later writes"
    );
    assert!(dir.path().join("n.db.before-restore").exists());
    // A second restore keeps the first one's safety copy.
    let out = cli(&config, &["restore", backup.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("n.db.before-restore").exists());
    assert!(dir.path().join("n.db.before-restore.2").exists());

    // A backup of another node is refused, and nothing changes.
    let other = dir.path().join("o");
    std::fs::create_dir(&other).unwrap();
    let ostore = other.join("o.db");
    let oconfig = other.join("o.toml");
    std::fs::write(
        &oconfig,
        format!(
            "[node]\nid = \"o\"\nstore = \"{}\"\n[hub]\nlisten = \"127.0.0.1:0\"\n",
            ostore.display()
        ),
    )
    .unwrap();
    assert!(cli(&oconfig, &["put", p.to_str().unwrap()])
        .status
        .success());
    let ob = other.join("o.backup");
    assert!(cli(&oconfig, &["backup", ob.to_str().unwrap()])
        .status
        .success());
    let wrong = cli(&config, &["restore", ob.to_str().unwrap()]);
    assert_eq!(wrong.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not of this node"));
}

#[test]
fn doctor_fails_a_hub_that_is_not_listening_and_runs_every_check() {
    let dir = tempfile::tempdir().unwrap();
    let port = clinicsync::devkit::cluster::free_port().unwrap();
    let config = dir.path().join("h.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"h\"\nstore = \"{}\"\n[hub]\nlisten = \"127.0.0.1:{port}\"\n",
            dir.path().join("h.db").display()
        ),
    )
    .unwrap();
    let out = cli(&config, &["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("nothing listens on"), "{text}");
    // The other checks still ran.
    for name in ["store", "disk", "keys", "emr", "hub"] {
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(name)),
            "{name} missing: {text}"
        );
    }
}

#[test]
fn doctor_warns_of_plain_http_that_leaves_the_machine_on_either_end() {
    let dir = tempfile::tempdir().unwrap();
    let tls_line = |config: &std::path::Path| {
        let out = cli(config, &["doctor"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("tls"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let write = |name: &str, body: String| {
        let config = dir.path().join(format!("{name}.toml"));
        let store = dir.path().join(format!("{name}.db"));
        std::fs::write(
            &config,
            format!(
                "[node]\nid = \"{name}\"\nstore = \"{}\"\n{body}",
                store.display()
            ),
        )
        .unwrap();
        config
    };
    // A hub on every address without TLS: children's records cross the link in clear.
    let port = clinicsync::devkit::cluster::free_port().unwrap();
    let open_hub = write("h1", format!("[hub]\nlisten = \"0.0.0.0:{port}\"\n"));
    let line = tls_line(&open_hub);
    assert!(
        line.starts_with("WARN") && line.contains("plain HTTP on 0.0.0.0"),
        "{line}"
    );
    // On loopback it may sit behind a TLS proxy on the same machine: no warning.
    let local_hub = write("h2", format!("[hub]\nlisten = \"127.0.0.1:{port}\"\n"));
    assert_eq!(tls_line(&local_hub), "");
    // A clinic whose parent is plain HTTP across the link (a name that does not
    // resolve here, so the probe fails at once): warned even though it is unreachable.
    let parent = |url: &str| {
        format!(
            "[parent]\nurl = \"{url}\"\ntoken_file = \"{}\"\n",
            dir.path().join("token").display()
        )
    };
    let open_clinic = write("c1", parent("http://hub.invalid:7070"));
    let line = tls_line(&open_clinic);
    assert!(
        line.starts_with("WARN") && line.contains("plain HTTP to hub.invalid"),
        "{line}"
    );
    let local_clinic = write("c2", parent("http://127.0.0.1:9"));
    assert_eq!(tls_line(&local_clinic), "");
}

#[test]
fn doctor_names_a_counter_that_is_not_a_number_which_sqlite_s_check_passes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    let store = dir.path().join("c.db");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"c\"\nstore = \"{}\"\n[parent]\nurl = \"http://127.0.0.1:9\"\n",
            store.display()
        ),
    )
    .unwrap();
    clinicsync::store::Store::open(&store, "c").unwrap();
    let line = |out: &std::process::Output| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some("values"))
            .map(str::to_string)
            .unwrap_or_default()
    };
    let healthy = cli(&config, &["doctor"]);
    assert!(line(&healthy).starts_with("OK"), "{}", line(&healthy));
    rusqlite::Connection::open(&store)
        .unwrap()
        .execute(
            "INSERT INTO meta VALUES ('traffic_today_bytes', 'a lot')",
            [],
        )
        .unwrap();
    let out = cli(&config, &["doctor"]);
    assert!(!out.status.success());
    let bad = line(&out);
    assert!(
        bad.contains("meta.value of traffic_today_bytes holds \"a lot\""),
        "{bad}"
    );
}

#[test]
fn a_daemon_stopped_by_corruption_is_shown_as_such_by_status_until_one_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let (config, store) = (dir.path().join("c.toml"), dir.path().join("c.db"));
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken-for-a-parent-that-is-not-there-0123").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"c\"\nstore = \"{}\"\n[parent]\nurl = \"http://127.0.0.1:9\"\ntoken_file = \"{}\"\n",
            store.display(),
            token.display()
        ),
    )
    .unwrap();
    clinicsync::store::Store::open(&store, "c").unwrap();
    rusqlite::Connection::open(&store)
        .unwrap()
        .execute("INSERT INTO meta VALUES ('link_budget_bytes', 'lots')", [])
        .unwrap();
    let mut run = std::process::Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "run"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let code = loop {
        if let Some(st) = run.try_wait().unwrap() {
            break st.code();
        }
        if started.elapsed() > std::time::Duration::from_secs(60) {
            let _ = run.kill();
            panic!("the daemon did not stop on a corrupt store");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(code, Some(10));
    let status = String::from_utf8_lossy(&cli(&config, &["status"]).stdout).to_string();
    let daemon = status.lines().find(|l| l.starts_with("daemon")).unwrap();
    assert!(
        daemon.contains("STOPPED by corruption")
            && daemon.contains("link_budget_bytes holds \"lots\"")
            && !daemon.contains("start it"),
        "{daemon}"
    );
    // `status --json` cannot read this store either, and still says why.
    let json: serde_json::Value =
        serde_json::from_slice(&cli(&config, &["status", "--json"]).stdout).unwrap();
    assert!(json["daemon_stopped"]
        .as_str()
        .unwrap()
        .contains("link_budget_bytes"));
    // Started again on the same store, it stops at once, before it takes the lock (a
    // start that clears the note, then fails elsewhere, would hide the corruption).
    // Here the token is unusable too (open to others), so its round never gets as far
    // as the bad value.
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut again = std::process::Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "run"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let code = loop {
        if let Some(st) = again.try_wait().unwrap() {
            break st.code();
        }
        if started.elapsed() > std::time::Duration::from_secs(8) {
            let _ = again.kill();
            let _ = again.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(code, Some(10), "a daemon ran on a store it knew corrupt");
    assert!(clinicsync::lock::stop_note(&store).is_some());
    // Mended (here by hand; in the field from a backup): the note stays until a
    // daemon runs again, then goes.
    rusqlite::Connection::open(&store)
        .unwrap()
        .execute("DELETE FROM meta WHERE key='link_budget_bytes'", [])
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&cli(&config, &["status", "--json"]).stdout).unwrap();
    assert!(json["daemon_stopped"]
        .as_str()
        .unwrap()
        .contains("link_budget_bytes"));
    let lock = clinicsync::lock::acquire(&store).unwrap();
    drop(lock);
    let json: serde_json::Value =
        serde_json::from_slice(&cli(&config, &["status", "--json"]).stdout).unwrap();
    assert!(json["daemon_stopped"].is_null(), "{json}");
}

#[test]
fn a_clinic_two_days_fast_is_told_by_sync_and_status_and_changes_nothing_at_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    for d in ["hub", "a"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    let hub = TestHub::start(
        &dir.path().join("hub"),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    // The hub's clock two days behind is, seen from the clinic, the clinic two days
    // fast: its stamps are two days ahead of the hub's clock.
    const DAY: i64 = 86_400_000;
    hub.state.set_clock_offset(-2 * DAY);
    let clinic = TestClinic::new(&dir.path().join("a"), "a", &hub.url, &hub.token("a"));
    let p = dir.path().join("p.json");
    std::fs::write(&p, patient("fast", "North").to_string()).unwrap();
    assert!(clinic.cli(&["put", p.to_str().unwrap()]).status.success());

    let out = clinic.cli(&["sync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("this node's clock is 2 days ahead of the parent's"),
        "{err}"
    );
    assert!(err.contains("refuses"), "{err}");
    let h = hub.store();
    assert!(
        get(&h, "Patient/fast").is_none(),
        "a record stamped two days ahead reached the hub"
    );
    let status = String::from_utf8_lossy(&clinic.cli(&["status"]).stdout).to_string();
    assert!(
        status.contains("clock       this node's clock is 2 days ahead of the parent's"),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&clinic.cli(&["status", "--json"]).stdout).unwrap();
    let skew = json["parent_clock_skew_ms"].as_i64().unwrap();
    assert!((skew - 2 * DAY).abs() < 5_000, "{skew}");

    // The clock set right (here: the hub's), the next sync says nothing and delivers.
    hub.state.set_clock_offset(0);
    let q = clinic.cli(&["quarantine", "retry", "--all"]);
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let out = clinic.cli(&["sync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("clock"), "{err}");
    assert!(get(&hub.store(), "Patient/fast").is_some());
    let status = String::from_utf8_lossy(&clinic.cli(&["status"]).stdout).to_string();
    assert!(status.contains("clock       in step"), "{status}");
}

#[test]
fn a_clinic_whose_edit_lost_at_the_hub_shows_the_lost_conflict() {
    let dir = tempfile::tempdir().unwrap();
    for d in ["hub", "a"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    let hub = TestHub::start(
        &dir.path().join("hub"),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let clinic = TestClinic::new(&dir.path().join("a"), "a", &hub.url, &hub.token("a"));
    let p = dir.path().join("p.json");
    let put = |body: serde_json::Value| {
        std::fs::write(&p, body.to_string()).unwrap();
        let out = clinic.cli(&["put", p.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    put(patient("p1", "North"));
    assert!(clinic.cli(&["sync"]).status.success());

    // The same field edited at the clinic, then (later clock: it wins) at the hub.
    let mut mine = patient("p1", "North");
    mine["gender"] = "other".into();
    put(mine);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut theirs = patient("p1", "North");
    theirs["gender"] = "male".into();
    hub.put(vec![theirs]);

    let out = clinic.cli(&["sync"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&clinic.cli(&["status", "--json"]).stdout).unwrap();
    assert!(
        json["conflicts_lost"].as_u64().unwrap() >= 1,
        "no lost conflict shown: {json}"
    );
    let status = String::from_utf8_lossy(&clinic.cli(&["status"]).stdout).to_string();
    assert!(status.contains("lost at the parent"), "{status}");
    let list = String::from_utf8_lossy(&clinic.cli(&["conflicts", "list"]).stdout).to_string();
    assert!(
        list.contains("Patient/p1") && list.contains("lost at parent"),
        "{list}"
    );
    // The winner arrived, and the losing version is kept for review.
    let s = clinicsync::store::Store::open_existing(&dir.path().join("a").join("a.db")).unwrap();
    assert_eq!(get(&s, "Patient/p1").unwrap()["gender"], "male");
    let lost = &s.conflicts_list(true, None).unwrap()[0];
    assert_eq!(lost.local_body.as_ref().unwrap()["gender"], "other");
    // Syncing again records nothing twice.
    assert!(clinic.cli(&["sync"]).status.success());
    let again: serde_json::Value =
        serde_json::from_slice(&clinic.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(again["conflicts_lost"], json["conflicts_lost"]);
}

#[test]
fn doctor_runs_every_other_check_when_the_emr_section_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    for d in ["hub", "a"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    let hub = TestHub::start(
        &dir.path().join("hub"),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let clinic = TestClinic::new(&dir.path().join("a"), "a", &hub.url, &hub.token("a"));
    let good = std::fs::read_to_string(&clinic.config).unwrap();
    for broken_emr in [
        "[emr]\nkind = \"mysql\"\n", // does not parse
        "[emr]\nkind = \"openmrs\"\nurl = \"ftp://emr.local\"\n", // does not validate
    ] {
        std::fs::write(&clinic.config, format!("{good}{broken_emr}")).unwrap();
        let out = clinic.cli(&["doctor"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(out.status.code(), Some(1), "{text}");
        let line = |name: &str| {
            text.lines()
                .find(|l| l.split_whitespace().nth(1) == Some(name))
                .unwrap_or_else(|| panic!("no {name} check: {text}"))
                .to_string()
        };
        assert!(line("config").starts_with("FAIL"), "{text}");
        assert!(line("emr").contains("not checked"), "{text}");
        for ok in ["store", "parent", "clock"] {
            assert!(line(ok).starts_with("OK"), "{ok}: {text}");
        }
        for ran in ["disk", "keys"] {
            line(ran);
        }
    }
}

#[test]
fn config_check_refuses_an_emr_credential_others_may_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("openmrs.credentials");
    std::fs::write(&creds, "sync:secret\n").unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let token = dir.path().join("parent.token");
    clinicsync::filemode::write_private(&token, b"t0123456789\n").unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"a\"\nstore = \"{}\"\n[parent]\nurl = \"http://127.0.0.1:9\"\ntoken_file = \"{}\"\n[emr]\nkind = \"openmrs\"\nurl = \"http://127.0.0.1:9\"\ncredentials_file = \"{}\"\n",
            dir.path().join("a.db").display(),
            token.display(),
            creds.display()
        ),
    )
    .unwrap();
    let out = cli(&config, &["config", "check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("emr.credentials_file") && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = cli(&config, &["config", "check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_record_too_large_to_carry_is_refused_or_set_aside_and_never_blocks_the_queue() {
    use clinicsync::model::{Snapshot, Version, VersionVector};
    use clinicsync::time::wall_ms;
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    let huge = serde_json::json!({"resourceType": "Patient", "id": "big",
        "address": [{"district": "North"}], "name": [{"family": "x".repeat(20 << 20)}]});
    // Written by hand: refused, nothing written.
    let file = dir.path().join("big.json");
    std::fs::write(&file, huge.to_string()).unwrap();
    let out = a.cli(&["put", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Patient/big is 20 MiB") && err.contains("nothing was written"),
        "{err}"
    );
    assert_eq!(a.store.counts().unwrap().records, 0);
    // Already queued (as a capture from an EMR would queue it), ahead of a normal one.
    {
        let snapshot = Snapshot::from_json_value(huge).unwrap();
        let key = snapshot.key.clone();
        let mut tx = a.store.begin().unwrap();
        let hlc = tx.tick(wall_ms()).unwrap();
        let v = Version {
            snapshot,
            origin: "a".into(),
            hlc,
            vv: VersionVector::default().bumped("a"),
            deleted: false,
        };
        tx.write_version(
            &v,
            "local",
            None,
            clinicsync::store::VersionOutcome::Written,
            wall_ms(),
        )
        .unwrap();
        tx.enqueue(&key, wall_ms()).unwrap();
        tx.commit().unwrap();
    }
    a.put(vec![patient("small", "North")]);
    let rep = a.sync().unwrap();
    assert_eq!(rep.pushed.accepted, 1, "{rep:?}");
    assert!(get(&hub.store(), "Patient/small").is_some());
    let q = a.store.quarantine_list().unwrap();
    assert_eq!(q.len(), 1);
    assert!(
        q[0].reason.contains("Patient/big is 20 MiB") && q[0].permanent,
        "{q:?}"
    );
    // Retried by hand while still too large: set aside again, never sent.
    assert!(a.cli(&["quarantine", "retry", "--all"]).status.success());
    a.sync().unwrap();
    assert_eq!(a.store.quarantine_list().unwrap().len(), 1);
    assert!(get(&hub.store(), "Patient/big").is_none());
}

#[test]
fn writes_stamped_while_the_clock_was_fast_go_up_once_the_clock_is_set_right() {
    use clinicsync::model::Snapshot;
    use clinicsync::time::wall_ms;
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    // Written while the clinic's clock was two days fast (the stamps say so)…
    let two_days = 2 * 86_400_000;
    let items = vec![(
        Snapshot::from_json_value(patient("fast", "North")).unwrap(),
        false,
    )];
    clinicsync::engine::write_local(&mut a.store, &a.policy, items, wall_ms() + two_days).unwrap();
    // …then the clock is set right, before the next sync: the writes go up now,
    // not in two days, and the node's clock is back with the wall clock.
    let rep = a.sync().unwrap();
    assert_eq!(
        rep.pushed.accepted,
        1,
        "{rep:?}: {:?}",
        a.store.quarantine_list()
    );
    let held = hub
        .store()
        .current(&clinicsync::model::RecordKey::parse("Patient/fast").unwrap())
        .unwrap()
        .unwrap();
    assert!(
        held.version.hlc.wall_ms <= wall_ms() + 1_000,
        "{:?}",
        held.version.hlc
    );
    a.put(vec![patient("later", "North")]);
    assert_eq!(a.sync().unwrap().pushed.accepted, 1);
    let db = rusqlite::Connection::open(dir.path().join("a.db")).unwrap();
    let rebased: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM audit WHERE action = 'clock-rebase'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rebased, 1);
}

#[test]
fn sync_without_its_credential_file_is_a_configuration_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"a\"\nstore = \"{}\"\n[parent]\nurl = \"http://127.0.0.1:9\"\ntoken_file = \"{}\"\n",
            dir.path().join("a.db").display(),
            dir.path().join("missing.token").display()
        ),
    )
    .unwrap();
    let out = cli(&config, &["sync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("parent.token_file"), "{err}");
}

#[test]
fn restore_replaces_a_store_too_damaged_to_open_and_keeps_it_aside_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("n.db");
    let config = embedded_node(dir.path(), &store);
    let p = dir.path().join("p.json");
    std::fs::write(&p, patient("p1", "North").to_string()).unwrap();
    assert!(cli(&config, &["put", p.to_str().unwrap()]).status.success());
    let backup = dir.path().join("n.backup");
    assert!(cli(&config, &["backup", backup.to_str().unwrap()])
        .status
        .success());
    // The header overwritten: every command now exits 10 (corruption), the README
    // says restore a backup; the restore must not refuse for the same reason.
    let mut bytes = std::fs::read(&store).unwrap();
    bytes[..100].fill(0x55);
    std::fs::write(&store, &bytes).unwrap();
    assert_eq!(cli(&config, &["status"]).status.code(), Some(10));
    let out = cli(&config, &["restore", backup.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = clinicsync::store::Store::open_existing(&store).unwrap();
    assert!(get(&s, "Patient/p1").is_some());
    let aside = dir.path().join("n.db.before-restore");
    assert_eq!(
        std::fs::read(&aside).unwrap(),
        bytes,
        "the damaged store was not kept as it was"
    );
    assert!(!dir.path().join("n.restoring").exists());
}

#[test]
fn the_demo_s_hints_name_only_files_that_exist_and_it_never_writes_into_a_used_directory() {
    let demo = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .arg("demo")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // A temporary directory is gone at the end: no hint names it.
    let (code, out, err) = demo(&[]);
    assert_eq!(code, Some(0), "{out}{err}");
    // Every node's status is read while it runs, as a technician would see it.
    let statuses = out.split("4. status of every node").nth(1).unwrap();
    assert!(!statuses.contains("NOT RUNNING"), "{statuses}");
    let tmp = out
        .lines()
        .find_map(|l| l.strip_prefix("== clinicsync demo in "))
        .unwrap()
        .to_string();
    assert!(!Path::new(&tmp).exists());
    let hints = out.split("Converged:").nth(1).unwrap();
    assert!(!hints.contains(&format!("{tmp}/")), "{hints}");
    // A directory named with --dir is kept, and the hints work as printed.
    let dir = tempfile::tempdir().unwrap();
    let kept = dir.path().join("demo");
    let (code, out, err) = demo(&["--dir", kept.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    let hint = out
        .lines()
        .find_map(|l| l.strip_prefix("Try: clinicsync --config "))
        .unwrap();
    let (config, args) = hint.split_once(' ').unwrap();
    let args: Vec<&str> = args.split_whitespace().collect();
    let history = cli(Path::new(config), &args);
    assert!(history.status.success(), "{hint}");
    // A directory in use is refused, and left as it was.
    let (code, _, err) = demo(&["--dir", kept.to_str().unwrap()]);
    assert!(
        code == Some(2) && err.contains("not empty"),
        "{code:?} {err}"
    );
    let (code, _, err) = demo(&["--dir", config]);
    assert!(
        code == Some(2) && err.contains("not a directory"),
        "{code:?} {err}"
    );
    assert!(Path::new(config).exists());
    // A name TOML would have to escape, given relative: the configurations still parse
    // and name absolute paths.
    let odd = "q\"x\\y";
    let out = std::process::Command::new(BIN)
        .args(["demo", "--dir", odd])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = std::fs::read_to_string(dir.path().join(odd).join("clinic-a.toml")).unwrap();
    assert!(toml.contains(&dir.path().display().to_string()), "{toml}");
    // Its hints are quoted for the shell: pasted as printed, they run.
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let hint = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Try: clinicsync "))
        .unwrap();
    let pasted = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("\"$0\" {hint}"))
        .arg(BIN)
        .output()
        .unwrap();
    assert!(
        pasted.status.success(),
        "{hint}: {}",
        String::from_utf8_lossy(&pasted.stderr)
    );
}
