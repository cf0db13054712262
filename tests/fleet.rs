//! The centre sees the whole tree: health reports ride on every exchange, district
//! hubs pass their clinics' up, and `clinicsync fleet` at the root ranks every node.
//! Real processes: a national hub, a district hub and three clinics.

mod common;

use std::path::Path;
use std::time::Duration;

use clinicsync::devkit::cluster::{free_port, wait_healthy, wait_until};
use clinicsync::health::HealthReport;
use clinicsync::wire::{Message, PullRequest};
use common::*;
use serde_json::{json, Value};

/// `fleet --json` at `config`: its rows and exit code.
fn fleet(config: &Path, args: &[&str]) -> (Vec<Value>, i32) {
    let mut all = vec!["fleet", "--json"];
    all.extend(args);
    let out = cli(config, &all);
    let rows: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("fleet: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    (rows.as_array().unwrap().clone(), out.status.code().unwrap())
}

fn row<'a>(rows: &'a [Value], node: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["node"] == node)
        .unwrap_or_else(|| panic!("no row for {node}: {rows:?}"))
}

#[test]
fn the_root_sees_every_node_below_it_worst_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (pn, pd) = (free_port().unwrap(), free_port().unwrap());
    let (district_child, district_token) = child(
        d,
        "district",
        "North",
        &["clinic-a", "clinic-b", "clinic-c"],
    );
    let mut national = node(
        d,
        "national",
        format!(
            "{}[hub]\nlisten = \"127.0.0.1:{pn}\"\n\n{district_child}",
            node_section(d, "national")
        ),
    );
    let mut children = String::new();
    let mut tokens = Vec::new();
    for id in ["clinic-a", "clinic-b", "clinic-c"] {
        let (c, t) = child(d, id, "North", &[]);
        children.push_str(&c);
        tokens.push(t);
    }
    let mut district = node(
        d,
        "district",
        format!(
            "{}{}[hub]\nlisten = \"127.0.0.1:{pd}\"\n\n{children}",
            node_section(d, "district"),
            parent_section(&format!("http://127.0.0.1:{pn}"), &district_token)
        ),
    );
    let mut clinics: Vec<Node> = ["clinic-a", "clinic-b", "clinic-c"]
        .iter()
        .zip(&tokens)
        .map(|(id, t)| {
            node(
                d,
                id,
                format!(
                    "{}{}",
                    node_section(d, id),
                    parent_section(&format!("http://127.0.0.1:{pd}"), t)
                ),
            )
        })
        .collect();
    national.start();
    wait_healthy(&format!("http://127.0.0.1:{pn}"), Duration::from_secs(20)).unwrap();
    district.start();
    wait_healthy(&format!("http://127.0.0.1:{pd}"), Duration::from_secs(20)).unwrap();
    for c in &mut clinics {
        c.start();
    }
    // Every node below the root is heard, grandchildren through the district.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let (rows, _) = fleet(&national.config, &[]);
            rows.len() == 5 && rows.iter().all(|r| r["heard_ms"].is_u64())
        }),
        "{:?}",
        fleet(&national.config, &[]).0
    );
    let (rows, code) = fleet(&national.config, &[]);
    assert_eq!(code, 0, "nothing needs a person yet: {rows:?}");
    for c in ["clinic-a", "clinic-b", "clinic-c"] {
        let r = row(&rows, c);
        assert_eq!(r["via"], "district", "{r}");
        assert_eq!(r["report"]["version"], env!("CARGO_PKG_VERSION"));
        assert!(r["report"]["audit_entries"].is_u64());
    }
    assert_eq!(row(&rows, "district")["via"], "district");
    assert_eq!(row(&rows, "national")["via"], "(this hub)");

    // Clinic B writes metadata (only the root may): refused, quarantined, and the
    // root learns the count and the reason.
    let loc = d.join("loc.json");
    std::fs::write(
        &loc,
        json!({"resourceType": "Location", "id": "shed", "name": "Shed"}).to_string(),
    )
    .unwrap();
    let out = cli(&clinics[1].config, &["put", loc.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            let (rows, _) = fleet(&national.config, &[]);
            row(&rows, "clinic-b")["report"]["quarantine"] == 1
        }),
        "the root never saw B's quarantine"
    );
    // Clinic C stops; past the threshold it comes first, then B.
    clinics[2].proc.take().unwrap().terminate();
    std::thread::sleep(Duration::from_secs(5));
    let (rows, code) = fleet(&national.config, &["--silent-after", "4s"]);
    assert_eq!(code, 9, "something needs a person");
    let order: Vec<&str> = rows.iter().map(|r| r["node"].as_str().unwrap()).collect();
    assert_eq!(&order[..2], ["clinic-c", "clinic-b"], "{rows:?}");
    let silent = row(&rows, "clinic-c")["problems"][0].as_str().unwrap();
    assert!(silent.starts_with("silent for "), "{silent}");
    let quarantined = row(&rows, "clinic-b")["problems"][0].as_str().unwrap();
    assert!(
        quarantined.starts_with("1 quarantined — most: metadata is authoritative at the root"),
        "{quarantined}"
    );
    for n in ["clinic-a", "district", "national"] {
        assert_eq!(row(&rows, n)["needs_attention"], false, "{n}: {rows:?}");
    }
    // The human view says the same in words.
    let out = cli(&national.config, &["fleet", "--silent-after", "4s"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().nth(1).unwrap();
    assert!(
        first.starts_with("clinic-c") && first.contains("silent for"),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("5 nodes, 2 need attention"));
}

#[test]
fn a_child_cannot_report_for_a_sibling_and_a_report_is_clipped() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North"), ("b", "South")]),
        &["a", "b"],
        8 << 20,
    );
    let a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    let mut mine = clinicsync::health::report(&a.store, "parent", 1).unwrap();
    mine.link_error = Some("x".repeat(10_000));
    let mut forged: HealthReport = mine.clone();
    forged.node = "b".into();
    forged.quarantine = 999;
    forged.heard_ms = Some(u64::MAX);
    let req = Message::PullRequest(PullRequest {
        node: "a".into(),
        cursor: Default::default(),
        max_bytes: 1 << 20,
        max_records: 10,
        include_own: false,
        answer_chunk: 0,
        health: vec![mine, forged],
        order_results: Vec::new(),
    });
    a.client.exchange("/v1/pull", &req).unwrap();
    let held = hub.store().health_all().unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    let (via, r) = &held[0];
    assert_eq!((via.as_str(), r.node.as_str()), ("a", "a"));
    assert!(r.link_error.as_ref().unwrap().chars().count() <= 161);
    assert!(r.heard_ms.unwrap() <= clinicsync::time::wall_ms());
}

/// BENCHMARKS.md: `fleet` over 1,000 nodes, through the real binary.
/// `cargo test --release --test fleet fleet_over_a_thousand_nodes -- --ignored --nocapture`
#[test]
#[ignore]
fn fleet_over_a_thousand_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = d.join("hub.toml");
    let store_path = d.join("hub.db");
    let mut children = String::new();
    for i in 0..10 {
        let below: Vec<String> = (0..99).map(|j| format!("\"c{i}-{j}\"")).collect();
        children.push_str(&format!(
            "[[hub.children]]\nnode = \"d{i}\"\ntoken_sha256 = \"{}\"\ndescendants = [{}]\n\n",
            clinicsync::auth::token_hash(&format!("token of d{i}")),
            below.join(", ")
        ));
    }
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"hub\"\nstore = \"{}\"\n[hub]\nlisten = \"127.0.0.1:0\"\n\n{children}",
            store_path.display()
        ),
    )
    .unwrap();
    let mut store = clinicsync::store::Store::open(&store_path, "hub").unwrap();
    let now = clinicsync::time::wall_ms();
    let base = clinicsync::health::report(&store, "parent", now).unwrap();
    let mut tx = store.begin().unwrap();
    for i in 0..10u64 {
        for j in 0..100u64 {
            let mut r = base.clone();
            r.node = if j == 99 {
                format!("d{i}")
            } else {
                format!("c{i}-{j}")
            };
            r.heard_ms = Some(now - (i * 100 + j) * 60_000);
            r.quarantine = (i * j) % 7;
            tx.put_health(&r, &format!("d{i}"), now).unwrap();
        }
    }
    tx.commit().unwrap();
    drop(store);
    let mut times = Vec::new();
    for _ in 0..7 {
        let t = std::time::Instant::now();
        let out = cli(&config, &["fleet", "--json"]);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(rows.as_array().unwrap().len(), 1_001);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "fleet --json over 1,000 nodes (+ the hub): median {:.0} ms, min {:.0} ms, max {:.0} ms (7 runs, process start included)",
        times[3], times[0], times[6]
    );
}
