//! The daemon as systemd runs it: readiness and watchdog over NOTIFY_SOCKET, clean
//! stop on SIGTERM, and backoff (no busy loop) while the parent is unreachable.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clinicsync::devkit::cluster;
use clinicsync::store::Store;
use common::BIN;

#[test]
fn readiness_watchdog_and_stopping_reach_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let cfg = dir.path().join("hub.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nid = \"hub\"\nstore = \"{}\"\n[hub]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("hub.db").display()
        ),
    )
    .unwrap();
    // systemd sets WATCHDOG_PID to the service's pid; `exec` keeps the shell's pid.
    let mut child = Command::new("sh")
        .args([
            "-c",
            "export WATCHDOG_PID=$$; exec \"$0\" \"$@\"",
            BIN,
            "--config",
            cfg.to_str().unwrap(),
            "run",
        ])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline
        && seen
            .iter()
            .filter(|m: &&String| m.contains("WATCHDOG=1"))
            .count()
            < 3
    {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    assert!(seen.iter().any(|m| m.contains("READY=1")), "{seen:?}");
    assert!(
        seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "{seen:?}"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "clean stop on SIGTERM: {status:?}");
    while let Ok(n) = sock.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert!(seen.iter().any(|m| m.contains("STOPPING=1")), "{seen:?}");
}

/// CPU seconds a process has used (utime + stime from /proc).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn a_clinic_whose_parent_is_down_backs_off_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let dead = cluster::free_port().unwrap();
    let l = cluster::write_layout(
        dir.path(),
        dead,
        &[("a", "North")],
        "interval_secs = 1\nbackoff_min_secs = 1\nbackoff_max_secs = 2\ntimeout_secs = 2",
        "",
    )
    .unwrap();
    let clinic = &l.clinics[0];
    let p = dir.path().join("p.json");
    std::fs::write(&p, r#"{"resourceType":"Patient","id":"waiting"}"#).unwrap();
    assert!(common::cli(&clinic.config, &["put", p.to_str().unwrap()])
        .status
        .success());
    let mut proc_ = cluster::Proc::spawn(Path::new(BIN), "a", &clinic.config, &["run"]).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_seconds(proc_.pid() as u32);
    std::thread::sleep(Duration::from_secs(4));
    let used = cpu_seconds(proc_.pid() as u32) - before;
    let status = common::cli(&clinic.config, &["status"]);
    assert!(
        used < 0.5,
        "a down link must not spin: {used} CPU seconds in 4 s"
    );
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("outbox      1 waiting"), "{text}");
    assert!(text.contains("link        down"), "{text}");
    assert!(
        text.contains("next sync   in") || text.contains("next sync   due"),
        "{text}"
    );
    assert!(
        text.contains("last error") && text.contains("cannot reach parent"),
        "{text}"
    );
    // The link comes back: the record flows without anyone typing a command.
    let mut hub = cluster::Proc::spawn(Path::new(BIN), "hub", &l.hub.config, &["run"]).unwrap();
    let flowed = cluster::wait_until(Duration::from_secs(20), || {
        Store::open_existing(&clinic.store)
            .and_then(|s| s.counts())
            .map(|c| c.outbox == 0)
            .unwrap_or(false)
    });
    proc_.terminate();
    hub.terminate();
    assert!(flowed, "the queue did not drain after the link returned");
    let h = Store::open_existing(&l.hub.store).unwrap();
    assert!(common::get(&h, "Patient/waiting").is_some());
}

/// `daemon::serve(config, listeners, shutdown)`: a hub and a clinic run inside this
/// test process, the hub on a listener the test bound on port 0; the clinic's record
/// reaches the hub, and both stop when their shutdown future completes.
#[test]
fn a_whole_node_runs_in_process_on_given_listeners_and_stops_on_its_signal() {
    use clinicsync::config::Config;
    use clinicsync::daemon::{serve, Listeners};
    use clinicsync::engine;
    use clinicsync::model::Snapshot;

    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let layout = cluster::write_layout(
        dir.path(),
        port,
        &[("clinic-a", "North")],
        "interval_secs = 1\nbackoff_min_secs = 1\nbackoff_max_secs = 2",
        "",
    )
    .unwrap();
    let hub_cfg = Config::load(&layout.hub.config).unwrap();
    let clinic_cfg = Config::load(&layout.clinics[0].config).unwrap();
    {
        let mut store = Store::open(&clinic_cfg.node.store, "clinic-a").unwrap();
        let p = serde_json::json!({"resourceType": "Patient", "id": "p1",
            "address": [{"district": "North"}]});
        engine::write_local(
            &mut store,
            &clinic_cfg.policy(),
            vec![(Snapshot::from_json_value(p).unwrap(), false)],
            clinicsync::time::wall_ms(),
        )
        .unwrap();
    }
    let (stop_hub, hub_stopped) = tokio::sync::oneshot::channel::<()>();
    let (stop_clinic, clinic_stopped) = tokio::sync::oneshot::channel::<()>();
    let hub = rt.spawn(serve(
        hub_cfg.clone(),
        Listeners {
            hub: Some(listener),
            metrics: None,
        },
        async move {
            let _ = hub_stopped.await;
        },
    ));
    let clinic = rt.spawn(serve(clinic_cfg, Listeners::default(), async move {
        let _ = clinic_stopped.await;
    }));
    let arrived = cluster::wait_until(Duration::from_secs(30), || {
        Store::open_existing(&hub_cfg.node.store)
            .ok()
            .and_then(|s| {
                s.current(&clinicsync::model::RecordKey::parse("Patient/p1").unwrap())
                    .ok()
                    .flatten()
            })
            .is_some()
    });
    assert!(
        arrived,
        "the clinic's record did not reach the in-process hub"
    );
    let started = Instant::now();
    stop_clinic.send(()).unwrap();
    stop_hub.send(()).unwrap();
    rt.block_on(async {
        clinic.await.unwrap().unwrap();
        hub.await.unwrap().unwrap();
    });
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopping took {:?}",
        started.elapsed()
    );
}
