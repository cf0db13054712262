//! Dead links fail fast and a daemon stops fast: a parent that cannot be reached
//! (refused, an HTTP error) fails `sync` at once with the reason; a parent that
//! accepts and then says nothing fails within `sync.timeout_secs`; SIGTERM stops the
//! daemon within a few seconds in every state, well inside systemd's stop timeout.
//! Real processes, real sockets on 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clinicsync::devkit::cluster::{self, Proc};
use common::*;

/// A clinic config whose parent is `url`, with a given exchange timeout.
fn clinic(dir: &Path, url: &str, timeout_secs: u64) -> PathBuf {
    let token = dir.join("a.token");
    clinicsync::filemode::write_private(&token, b"token-of-a-0123456789").unwrap();
    let config = dir.join("a.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"a\"\nstore = \"{}\"\n[parent]\nurl = \"{url}\"\ntoken_file = \"{}\"\n[sync]\ntimeout_secs = {timeout_secs}\ninterval_secs = 2\nbackoff_min_secs = 1\nbackoff_max_secs = 2\n",
            dir.join("a.db").display(),
            token.display()
        ),
    )
    .unwrap();
    config
}

/// A server that accepts connections and never answers (a black hole); kept open
/// until the test ends.
fn black_hole() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let l2 = l.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l2.incoming().flatten() {
            held.push(s);
        }
    });
    (l, port)
}

/// A web server that is not a clinicsync hub: 404 to everything.
fn not_a_hub() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 65536];
            let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 9\r\nConnection: close\r\n\r\nNot Found",
            );
        }
    });
    port
}

fn timed_sync(config: &Path) -> (Duration, i32, String) {
    let started = Instant::now();
    let out = cli(config, &["sync"]);
    (
        started.elapsed(),
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn sync_against_a_closed_port_fails_at_once_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let port = cluster::free_port().unwrap();
    let config = clinic(dir.path(), &format!("http://127.0.0.1:{port}"), 30);
    let (took, code, err) = timed_sync(&config);
    assert!(took < Duration::from_secs(5), "took {took:?}: {err}");
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("cannot reach parent") && err.to_lowercase().contains("refused"),
        "{err}"
    );
}

#[test]
fn sync_against_a_server_that_is_not_a_hub_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = not_a_hub();
    let config = clinic(dir.path(), &format!("http://127.0.0.1:{port}"), 30);
    let (took, code, err) = timed_sync(&config);
    assert!(took < Duration::from_secs(5), "took {took:?}: {err}");
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("404"), "{err}");
}

#[test]
fn sync_against_a_silent_hub_fails_within_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (_hole, port) = black_hole();
    let config = clinic(dir.path(), &format!("http://127.0.0.1:{port}"), 3);
    let (took, code, err) = timed_sync(&config);
    assert!(took < Duration::from_secs(3 + 5), "took {took:?}: {err}");
    assert_eq!(code, 5, "{err}");
}

/// Starts `run`, waits `settle`, sends SIGTERM and returns how long it took to exit.
fn stop_time(config: &Path, settle: Duration) -> Duration {
    let mut p = Proc::spawn(Path::new(BIN), "a", config, &["run"]).unwrap();
    std::thread::sleep(settle);
    assert!(p.is_running(), "the daemon died before the signal");
    let started = Instant::now();
    p.terminate();
    started.elapsed()
}

#[test]
fn a_daemon_stops_within_seconds_of_sigterm_in_every_state() {
    let dir = tempfile::tempdir().unwrap();
    // Mid-exchange with a silent hub (a 60 s exchange timeout it would otherwise wait out).
    let (_hole, port) = black_hole();
    let hung = clinic(dir.path(), &format!("http://127.0.0.1:{port}"), 60);
    let t = stop_time(&hung, Duration::from_secs(2));
    assert!(t < Duration::from_secs(5), "mid-exchange: {t:?}");
    // Backing off after failures against a closed port.
    let d2 = dir.path().join("closed");
    std::fs::create_dir(&d2).unwrap();
    let closed = clinic(
        &d2,
        &format!("http://127.0.0.1:{}", cluster::free_port().unwrap()),
        60,
    );
    let t = stop_time(&closed, Duration::from_secs(2));
    assert!(t < Duration::from_secs(5), "backing off: {t:?}");
    // Idle between rounds with a healthy hub.
    let d3 = dir.path().join("idle");
    std::fs::create_dir(&d3).unwrap();
    let hub = TestHub::start(&d3, 0, hub_policy(&[("a", "North")]), &["a"], 1 << 20);
    let idle = clinic(&d3, &hub.url, 60);
    std::fs::write(d3.join("a.token"), hub.token("a")).unwrap();
    let t = stop_time(&idle, Duration::from_secs(2));
    assert!(t < Duration::from_secs(5), "idle: {t:?}");
}
