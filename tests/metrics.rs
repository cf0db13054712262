//! `/metrics` scraped by a real Prometheus (Debian's `prometheus`, started here):
//! a child's quarantine reaches a gauge a PromQL query returns; the exposition
//! passes `promtool check metrics`; the shipped alert rules pass `promtool check
//! rules`; a scrape without the token is refused.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use clinicsync::devkit::cluster::{free_port, wait_healthy, wait_until};
use common::*;
use serde_json::{json, Value};

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_shipped_alert_rules_are_valid() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/clinicsync-alerts.yml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");
}

/// Kills the Prometheus server when the test ends, however it ends.
struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_real_prometheus_reads_a_childs_quarantine_from_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (port, metrics_port, prom_port) = (
        free_port().unwrap(),
        free_port().unwrap(),
        free_port().unwrap(),
    );
    let scrape_token = clinicsync::auth::new_token();
    let token_file = credential(d, "scrape.token", &scrape_token);
    let (block_a, token_a) = child(d, "a", "North", &[]);
    let (block_b, token_b) = child(d, "b", "South", &[]);
    let mut hub = node(
        d,
        "hub",
        format!(
            "{}[hub]\nlisten = \"127.0.0.1:{port}\"\n\n{block_a}{block_b}[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\ntoken_sha256 = \"{}\"\n",
            node_section(d, "hub"),
            clinicsync::auth::token_hash(&scrape_token)
        ),
    );
    hub.start();
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(&url, Duration::from_secs(20)).unwrap();
    let token = |f: &Path| std::fs::read_to_string(f).unwrap().trim().to_string();
    for sub in ["ca", "cb"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let mut a = TestClinic::new(&d.join("ca"), "a", &url, &token(&token_a));
    let mut b = TestClinic::new(&d.join("cb"), "b", &url, &token(&token_b));
    a.put(vec![patient("p1", "North")]);
    // B writes metadata, which only the root may: quarantined at B.
    b.put(vec![
        json!({"resourceType": "Location", "id": "shed", "name": "Shed"}),
    ]);
    a.sync().unwrap();
    b.sync().unwrap();
    assert_eq!(b.store.counts().unwrap().quarantine, 1);
    // The next exchange reports it.
    b.sync().unwrap();

    // Without the token: refused.
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    match ureq::get(&metrics_url).call() {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("expected 401 without a token, got {other:?}"),
    }
    let text = ureq::get(&metrics_url)
        .set("Authorization", &format!("Bearer {scrape_token}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        text.contains("clinicsync_node_quarantined_records{node=\"b\",via=\"b\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("clinicsync_hub_push_requests_total 2"),
        "{text}"
    );
    let (ok, out) = promtool(&["check", "metrics"], Some(&text));
    assert!(ok, "promtool check metrics: {out}\n{text}");

    // A real Prometheus scrapes it every second.
    let config = d.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: clinicsync\n    authorization:\n      type: Bearer\n      credentials_file: {}\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n",
            token_file.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(d.join("prometheus.log")).unwrap();
    let _prom = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", d.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (apt-get install prometheus)"),
    );
    let query = |q: &str| -> Option<Value> {
        let text = ureq::get(&format!("http://127.0.0.1:{prom_port}/api/v1/query"))
            .query("query", q)
            .call()
            .ok()?
            .into_string()
            .ok()?;
        let body: Value = serde_json::from_str(&text).ok()?;
        body["data"]["result"].as_array()?.first().cloned()
    };
    let found = wait_until(Duration::from_secs(60), || {
        query("clinicsync_node_quarantined_records{node=\"b\"}")
            .is_some_and(|r| r["value"][1] == "1")
    });
    assert!(
        found,
        "Prometheus never returned b's quarantine: {:?}\n{}",
        query("up"),
        std::fs::read_to_string(d.join("prometheus.log")).unwrap_or_default()
    );
    let up = query("up{job=\"clinicsync\"}").unwrap();
    assert_eq!(up["value"][1], "1", "{up}");
    let a_q = query("clinicsync_node_quarantined_records{node=\"a\"}").unwrap();
    assert_eq!(a_q["value"][1], "0");
}
