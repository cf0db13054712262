//! Enrolling, removing and re-keying children at a running hub (`clinicsync child
//! add|remove|list|rotate`), with the real binary and a real `clinicsync run` hub:
//! no restart, a removed child refused at once, bad input changing nothing.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clinicsync::devkit::cluster::{free_port, wait_healthy, wait_until, write_layout, Proc};
use common::*;

struct Net {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    hub_config: PathBuf,
    hub: Proc,
    url: String,
    a_config: PathBuf,
}

/// A hub (as a process) with one clinic `a` (district North), a comment in the hub's
/// file that every edit must keep, and `a` synced once.
fn start() -> Net {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let port = free_port().unwrap();
    let layout = write_layout(&dir, port, &[("a", "North")], "timeout_secs = 10", "").unwrap();
    let text = std::fs::read_to_string(&layout.hub.config).unwrap();
    std::fs::write(
        &layout.hub.config,
        format!("# Kakamega district hub — hand-written comment\n{text}# trailing comment\n"),
    )
    .unwrap();
    let hub = Proc::spawn(Path::new(BIN), "hub", &layout.hub.config, &["run"]).unwrap();
    wait_healthy(&layout.hub_url, Duration::from_secs(20)).unwrap();
    let a_config = layout.clinics[0].config.clone();
    let p = dir.join("pa.json");
    std::fs::write(&p, patient("pa", "North").to_string()).unwrap();
    assert!(cli(&a_config, &["put", p.to_str().unwrap()])
        .status
        .success());
    let out = cli(&a_config, &["sync"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Net {
        _dir: tmp,
        dir,
        hub_config: layout.hub.config,
        hub,
        url: layout.hub_url,
        a_config,
    }
}

/// A clinic's configuration whose credential is (to be) in `<id>.token`.
fn clinic_config(net: &Net, id: &str) -> PathBuf {
    let config = net.dir.join(format!("{id}.toml"));
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"{id}\"\nstore = \"{}\"\n[parent]\nurl = \"{}\"\ntoken_file = \"{}\"\n[sync]\ntimeout_secs = 10\n",
            net.dir.join(format!("{id}.db")).display(),
            net.url,
            net.dir.join(format!("{id}.token")).display()
        ),
    )
    .unwrap();
    config
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_child_added_at_a_running_hub_syncs_and_a_removed_one_is_refused_at_once() {
    let mut net = start();
    let pid = net.hub.pid();
    let original = std::fs::read(&net.hub_config).unwrap();
    // A South patient the hub already holds (registered by a): the new clinic's
    // catchment rule must bring it along when b is enrolled.
    let ps = net.dir.join("ps.json");
    std::fs::write(&ps, patient("ps", "South").to_string()).unwrap();
    assert!(cli(&net.a_config, &["put", ps.to_str().unwrap()])
        .status
        .success());
    assert!(cli(&net.a_config, &["sync"]).status.success());

    let b = clinic_config(&net, "b");
    let pb = net.dir.join("pb.json");
    std::fs::write(&pb, patient("pb", "South").to_string()).unwrap();
    assert!(cli(&b, &["put", pb.to_str().unwrap()]).status.success());
    let token_file = net.dir.join("b.token");
    let out = cli(
        &net.hub_config,
        &[
            "child",
            "add",
            "b",
            "--catchment",
            "address.district=South",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("told to reload"), "{}", text(&out));
    let edited = std::fs::read_to_string(&net.hub_config).unwrap();
    assert!(
        edited.starts_with(&String::from_utf8(original.clone()).unwrap()),
        "child add changed what was there:\n{edited}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // b syncs without the hub restarting (the reload is asynchronous: a moment).
    assert!(
        wait_until(Duration::from_secs(10), || cli(&b, &["sync"])
            .status
            .success()),
        "b never synced: {}",
        text(&cli(&b, &["sync"]))
    );
    assert_eq!(net.hub.pid(), pid);
    assert!(net.hub.is_running(), "the hub restarted or died");
    let b_store = clinicsync::store::Store::open_existing(&net.dir.join("b.db")).unwrap();
    assert!(
        get(&b_store, "Patient/ps").is_some(),
        "the new rule did not bring ps"
    );
    let h = clinicsync::store::Store::open_existing(&net.dir.join("hub.db")).unwrap();
    assert!(get(&h, "Patient/pb").is_some());

    // child list shows it, with its last contact.
    let out = cli(&net.hub_config, &["child", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == "b")
        .expect("b listed");
    assert!(row["last_contact_ms"].as_u64().is_some(), "{row}");
    assert_eq!(row["catchment"][0], "address.district=South");

    // Removed: refused at once, and the file is back to what it was, byte for byte.
    let out = cli(&net.hub_config, &["child", "remove", "b"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&net.hub_config).unwrap(), original);
    std::fs::write(&pb, patient("pb2", "South").to_string()).unwrap();
    assert!(cli(&b, &["put", pb.to_str().unwrap()]).status.success());
    assert!(
        wait_until(Duration::from_secs(5), || {
            let out = cli(&b, &["sync"]);
            out.status.code() == Some(5) && text(&out).contains("401")
        }),
        "b still accepted after removal: {}",
        text(&cli(&b, &["sync"]))
    );
    assert!(get(&h, "Patient/pb2").is_none());
    // a is untouched by all this.
    assert!(cli(&net.a_config, &["sync"]).status.success());
    assert_eq!(net.hub.pid(), pid);
}

#[test]
fn bad_child_commands_say_what_is_wrong_and_leave_the_file_unchanged() {
    let net = start();
    let original = std::fs::read(&net.hub_config).unwrap();
    let existing_token = net.dir.join("a.token");
    for (args, code, says) in [
        (&["child", "add", "a"][..], 1, "already a child"),
        (&["child", "add", "bad id!"], 2, "not a valid node id"),
        (&["child", "add", "hub"], 2, "own node id"),
        (
            &["child", "add", "c", "--catchment", "district"],
            2,
            "PATH=VALUE",
        ),
        (
            &[
                "child",
                "add",
                "c",
                "--token-file",
                existing_token.to_str().unwrap(),
            ],
            1,
            "exists",
        ),
        (&["child", "remove", "nobody"], 7, "not a child"),
        (&["child", "rotate", "nobody"], 7, "not a child"),
        (&["child", "rotate", "a", "--overlap", "soon"], 2, "7d"),
    ] {
        let out = cli(&net.hub_config, args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{args:?}: {}", text(&out));
        assert_eq!(
            std::fs::read(&net.hub_config).unwrap(),
            original,
            "{args:?} changed the file"
        );
    }
    // A file laid out so that the edit would not load (children written inline):
    // refused by the loader, nothing written.
    let inline = net.dir.join("inline.toml");
    std::fs::write(
        &inline,
        format!(
            "[node]\nid = \"hub\"\nstore = \"{}\"\n[hub]\nlisten = \"127.0.0.1:0\"\nchildren = [{{ node = \"a\", token_sha256 = \"{}\" }}]\n",
            net.dir.join("inline.db").display(),
            "ab".repeat(32)
        ),
    )
    .unwrap();
    let before = std::fs::read(&inline).unwrap();
    let out = cli(&inline, &["child", "add", "c"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("nothing changed"), "{}", text(&out));
    assert!(
        !text(&out).contains("token:"),
        "a token was shown for nothing"
    );
    assert_eq!(std::fs::read(&inline).unwrap(), before);
}

#[test]
fn a_rotated_credential_overlaps_then_the_old_one_is_refused() {
    let net = start();
    let pid = net.hub.pid();
    let new_token = net.dir.join("a.token.new");
    let out = cli(
        &net.hub_config,
        &[
            "child",
            "rotate",
            "a",
            "--overlap",
            "6s",
            "--token-file",
            new_token.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("accepted until"), "{}", text(&out));
    let started = std::time::Instant::now();
    // A second rotation inside the overlap would cut off the token the clinic uses.
    let before = std::fs::read(&net.hub_config).unwrap();
    let again = cli(&net.hub_config, &["child", "rotate", "a"]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(
        text(&again).contains("still in the overlap") && text(&again).contains("--force"),
        "{}",
        text(&again)
    );
    assert_eq!(
        std::fs::read(&net.hub_config).unwrap(),
        before,
        "nothing changed"
    );
    // The clinic still has the old token: accepted during the overlap…
    let put = |id: &str| {
        let p = net.dir.join("p.json");
        std::fs::write(&p, patient(id, "North").to_string()).unwrap();
        assert!(cli(&net.a_config, &["put", p.to_str().unwrap()])
            .status
            .success());
    };
    put("during");
    let out = cli(&net.a_config, &["sync"]);
    assert!(
        out.status.success(),
        "old token refused in the overlap: {}",
        text(&out)
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "too slow to test the overlap"
    );
    // …and the new one too (a second clinic config with the new token, same node).
    let a2 = net.dir.join("a2.toml");
    let a_text = std::fs::read_to_string(&net.a_config).unwrap();
    std::fs::write(
        &a2,
        a_text
            .replace(
                net.dir.join("a.token").to_str().unwrap(),
                new_token.to_str().unwrap(),
            )
            .replace("a.db", "a2.db"),
    )
    .unwrap();
    let out = cli(&a2, &["sync"]);
    assert!(out.status.success(), "new token refused: {}", text(&out));

    // After the overlap: the old one is refused with a message saying why.
    std::thread::sleep(
        Duration::from_secs(6).saturating_sub(started.elapsed()) + Duration::from_millis(500),
    );
    put("after");
    let out = cli(&net.a_config, &["sync"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(text(&out).contains("replaced"), "{}", text(&out));
    assert!(cli(&a2, &["sync"]).status.success());
    assert_eq!(net.hub.pid(), pid);
}

#[test]
fn a_running_clinic_takes_a_rotated_token_from_its_file_without_a_restart() {
    let net = start();
    // The clinic runs as a daemon, rounding every second.
    let text_cfg = std::fs::read_to_string(&net.a_config).unwrap();
    std::fs::write(
        &net.a_config,
        text_cfg.replace(
            "[sync]\n",
            "[sync]\ninterval_secs = 1\nbackoff_min_secs = 1\nbackoff_max_secs = 1\n",
        ),
    )
    .unwrap();
    let mut clinic = Proc::spawn(Path::new(BIN), "a", &net.a_config, &["run"]).unwrap();
    let new_token = net.dir.join("a.token.rotated");
    let out = cli(
        &net.hub_config,
        &[
            "child",
            "rotate",
            "a",
            "--overlap",
            "0s",
            "--token-file",
            new_token.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let p = net.dir.join("after-rotation.json");
    std::fs::write(&p, patient("rot", "North").to_string()).unwrap();
    assert!(cli(&net.a_config, &["put", p.to_str().unwrap()])
        .status
        .success());
    let at_hub = || {
        String::from_utf8_lossy(&cli(&net.hub_config, &["ls", "Patient", "--json"]).stdout)
            .contains("Patient/rot")
    };
    // With the old token the record cannot go up…
    std::thread::sleep(Duration::from_secs(3));
    assert!(!at_hub(), "the old token was still accepted");
    // …the technician installs the new one (runbook): the running daemon uses it.
    std::fs::copy(&new_token, net.dir.join("a.token")).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), at_hub),
        "the running clinic never used the new token"
    );
    clinic.terminate();
}
