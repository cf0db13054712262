//! The MQTT transport through a real mosquitto broker (started by the test on
//! 127.0.0.1 with a password file and per-node ACLs).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use clinicsync::devkit::cluster::{self, Broker, Proc};
use clinicsync::error::Classify;
use clinicsync::store::Store;
use clinicsync::transport::http::TransportError;
use clinicsync::wire::{Message, PushRequest};
use common::*;
use serde_json::json;

fn broker(dir: &Path) -> Broker {
    let port = cluster::free_port().unwrap();
    Broker::start(
        &dir.join("broker"),
        port,
        "hub",
        &[("hub", "hub-pass"), ("a", "a-pass"), ("b", "b-pass")],
    )
    .unwrap()
}

#[test]
fn a_hub_and_two_clinics_converge_over_mqtt_only() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path());
    let hub = TestHub::start_mqtt(
        dir.path(),
        hub_policy(&[("a", "North"), ("b", "South")]),
        &["a", "b"],
        &broker,
    );
    // The clinics' HTTP parent URL leads nowhere: only MQTT can carry this.
    let nowhere = format!("http://127.0.0.1:{}", cluster::free_port().unwrap());
    let mut a = TestClinic::new(dir.path(), "a", &nowhere, "x");
    let mut b = TestClinic::new(dir.path(), "b", &nowhere, "x");
    a.use_mqtt(&broker, 10);
    b.use_mqtt(&broker, 10);
    hub.put(vec![
        json!({"resourceType":"Location","id":"loc-1"}),
        patient("hub-n", "North"),
    ]);
    a.put(vec![patient("pa", "North"), encounter("pa-e", "pa")]);
    b.put(vec![patient("pb", "South"), encounter("pb-e", "pb")]);
    a.sync().unwrap();
    b.sync().unwrap();
    a.sync().unwrap();
    let hs = hub.store();
    assert!(get(&hs, "Patient/pa").is_some() && get(&hs, "Encounter/pb-e").is_some());
    for c in [&a, &b] {
        assert!(
            c.get("Location/loc-1").is_some(),
            "metadata reached {}",
            c.id
        );
        assert_eq!(c.store.counts().unwrap().outbox, 0);
    }
    assert!(a.get("Patient/hub-n").is_some());
    assert!(b.get("Patient/pa").is_none() && a.get("Patient/pb").is_none());
}

#[test]
fn a_broker_restarted_mid_transfer_loses_and_duplicates_nothing() {
    broker_restart_mid_transfer(false);
}

#[test]
fn a_broker_killed_and_restarted_mid_transfer_loses_and_duplicates_nothing() {
    broker_restart_mid_transfer(true);
}

fn broker_restart_mid_transfer(kill: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = broker(dir.path());
    let hub = TestHub::start_mqtt(dir.path(), hub_policy(&[("a", "North")]), &["a"], &broker);
    let mut a = TestClinic::new(dir.path(), "a", "http://127.0.0.1:9", "x");
    a.use_mqtt(&broker, 3);
    a.sync_cfg.push_batch_records = 100;
    a.put(
        clinicsync::synth::clinic_records(3, "a", "North", "l", 455, 2, 4)
            .into_iter()
            .take(5000)
            .collect(),
    );
    let hub_path = hub.store_path.clone();
    let restarter = std::thread::spawn(move || {
        let count = || {
            Store::open_existing(&hub_path)
                .and_then(|s| s.counts())
                .map(|c| c.records)
                .unwrap_or(0)
        };
        assert!(
            cluster::wait_until(Duration::from_secs(60), || count() >= 500),
            "no progress before the restart"
        );
        if kill {
            broker.kill9();
        } else {
            broker.stop();
        }
        let during = count();
        std::thread::sleep(Duration::from_millis(500));
        broker.restart().unwrap();
        (broker, during)
    });
    let started = Instant::now();
    loop {
        match a.sync() {
            Ok(_) if a.store.counts().unwrap().outbox == 0 => break,
            Ok(_) => {}
            Err(e) => {
                // A retryable failure (no answer while the broker was away) is fine:
                // the next round resends, and integration is idempotent.
                assert!(e.is_retryable(), "{e}");
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "transfer never finished"
        );
    }
    let (_broker, during) = restarter.join().unwrap();
    assert!(
        during < 5000,
        "the broker was restarted after the transfer ended"
    );
    let hs = hub.store();
    let h = hs.list(None).unwrap();
    let c = a.store.list(None).unwrap();
    assert_eq!((h.len(), c.len()), (5000, 5000));
    for (x, y) in h.iter().zip(c.iter()) {
        assert_eq!(
            (x.version.key(), x.version.snapshot.hash),
            (y.version.key(), y.version.snapshot.hash)
        );
    }
    let versions: i64 = hs
        .conn()
        .query_row("SELECT COUNT(*) FROM history", [], |r| r.get(0))
        .unwrap();
    assert_eq!(versions, 5000, "each record stored once");
}

#[test]
fn a_clinic_offline_when_the_hub_wakes_it_gets_the_wake_up_on_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path());
    let hub = TestHub::start_mqtt(
        dir.path(),
        hub_policy(&[("a", "North"), ("b", "South")]),
        &["a", "b"],
        &broker,
    );
    // Connect once (this creates the persistent session), then go offline.
    drop(mqtt_client(&broker, "a", "a-pass", 5).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    hub.put(vec![json!({"resourceType":"Location","id":"loc-new"})]);
    std::thread::sleep(Duration::from_secs(1)); // the hub's notifier runs every 250 ms
    let a = mqtt_client(&broker, "a", "a-pass", 5).unwrap();
    assert!(
        cluster::wait_until(Duration::from_secs(5), || a.wakeups() >= 1),
        "the queued wake-up never arrived"
    );
}

#[test]
fn topics_are_confined_passwords_checked_and_identities_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path());
    let hub = TestHub::start_mqtt(
        dir.path(),
        hub_policy(&[("a", "North"), ("b", "South")]),
        &["a", "b"],
        &broker,
    );

    // A wrong password is refused at connect.
    let err = mqtt_client(&broker, "a", "wrong", 5)
        .err()
        .expect("wrong password accepted");
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err}");
    assert!(
        err.to_string().contains("NotAuthorized") || err.to_string().contains("refused"),
        "{err}"
    );

    // Clinic a listens on b's topic; b listens on its own. The hub wakes both.
    let (spy, mut spy_conn) = rumqttc::Client::new(
        {
            let mut o = rumqttc::MqttOptions::new("spy-a", "127.0.0.1", broker.port);
            o.set_credentials("a", "a-pass");
            o
        },
        10,
    );
    spy.subscribe("clinicsync/v1/b/down", rumqttc::QoS::AtLeastOnce)
        .unwrap();
    let spied = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let s2 = spied.clone();
    std::thread::spawn(move || {
        for ev in spy_conn.iter() {
            match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))) => {
                    s2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(_) => break,
                _ => {}
            }
        }
    });
    let b = mqtt_client(&broker, "b", "b-pass", 5).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    hub.put(vec![json!({"resourceType":"Location","id":"wake-all"})]);
    assert!(
        cluster::wait_until(Duration::from_secs(5), || b.wakeups() >= 1),
        "b was not woken (the test would prove nothing)"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        spied.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a read b's topic"
    );

    // Publishing on b's request topic as a is dropped by the broker: the hub never answers.
    let a = mqtt_client(&broker, "a", "a-pass", 3).unwrap();
    // a, on its own topic, claims to be b: the hub refuses it.
    let claim = Message::PushRequest(PushRequest {
        node: "b".into(),
        records: vec![],
    });
    match a.exchange(&claim) {
        Err(TransportError::Status {
            status: 403,
            message,
        }) => assert!(message.contains("claims to come from b"), "{message}"),
        other => panic!("expected a 403 refusal, got {other:?}"),
    }
    let before = hub.store().counts().unwrap();
    spy.publish(
        "clinicsync/v1/b/up",
        rumqttc::QoS::AtLeastOnce,
        false,
        b"forged".to_vec(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let after = hub.store().counts().unwrap();
    assert_eq!((before.records, before.audit), (after.records, after.audit));
}

#[test]
fn a_connected_clinic_daemon_is_woken_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path());
    let port = cluster::free_port().unwrap();
    let l = cluster::write_layout(
        dir.path(),
        port,
        &[("a", "North")],
        "interval_secs = 3600",
        "",
    )
    .unwrap();
    let pw = |name: &str, pass: &str| {
        let p = dir.path().join(format!("{name}.mqtt"));
        clinicsync::filemode::write_private(&p, pass.as_bytes()).unwrap();
        p
    };
    let mqtt = |user: &str, pass: &str| {
        format!(
            "\n[mqtt]\nurl = \"{}\"\nusername = \"{user}\"\npassword_file = \"{}\"\n",
            broker.url(),
            pw(user, pass).display()
        )
    };
    let hub_cfg = std::fs::read_to_string(&l.hub.config).unwrap() + &mqtt("hub", "hub-pass");
    std::fs::write(&l.hub.config, hub_cfg).unwrap();
    let clinic = &l.clinics[0];
    let c_cfg = std::fs::read_to_string(&clinic.config).unwrap().replace(
        "[sync]",
        &format!(
            "{}\n[transport]\nkind = \"mqtt\"\n\n[sync]",
            mqtt("a", "a-pass")
        ),
    );
    std::fs::write(&clinic.config, c_cfg).unwrap();
    let out = cli(&clinic.config, &["config", "check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let exe = Path::new(BIN);
    let mut h = Proc::spawn(exe, "hub", &l.hub.config, &["run"]).unwrap();
    cluster::wait_healthy(&l.hub_url, Duration::from_secs(20)).unwrap();
    let mut c = Proc::spawn(exe, "a", &clinic.config, &["run"]).unwrap();
    let synced = cluster::wait_until(Duration::from_secs(20), || {
        Store::open_existing(&clinic.store)
            .and_then(|s| s.peer_state("parent"))
            .map(|p| p.last_pull_ok_ms.is_some())
            .unwrap_or(false)
    });
    assert!(synced, "the clinic never completed its first sync");
    std::thread::sleep(Duration::from_millis(500));
    let loc = dir.path().join("loc.json");
    std::fs::write(&loc, r#"{"resourceType":"Location","id":"just-now"}"#).unwrap();
    let t0 = Instant::now();
    assert!(cli(&l.hub.config, &["put", loc.to_str().unwrap()])
        .status
        .success());
    let arrived = cluster::wait_until(Duration::from_secs(10), || {
        Store::open_existing(&clinic.store)
            .ok()
            .and_then(|s| get(&s, "Location/just-now"))
            .is_some()
    });
    let latency = t0.elapsed();
    c.terminate();
    h.terminate();
    assert!(
        arrived,
        "not woken: the record waited for the hour-long interval"
    );
    assert!(latency < Duration::from_secs(5), "{latency:?}");
}

#[test]
fn large_batches_travel_over_mqtt_as_resumable_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path());
    let hub = TestHub::start_mqtt(dir.path(), hub_policy(&[("a", "North")]), &["a"], &broker);
    let mut a = TestClinic::new(dir.path(), "a", "http://127.0.0.1:9", "x");
    a.use_mqtt(&broker, 10);
    a.sync_cfg.chunk_bytes = 4096;
    a.sync_cfg.push_batch_records = 5000;
    a.sync_cfg.push_batch_bytes = 8 << 20;
    a.put(
        clinicsync::synth::clinic_records(4, "a", "North", "l", 200, 2, 4)
            .into_iter()
            .take(2000)
            .collect(),
    );
    let r = a.sync().unwrap();
    assert_eq!(r.pushed.accepted, 2000);
    let hs = hub.store();
    let transfers: i64 = hs
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM transfers WHERE node='a' AND dir='up'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let chunks: i64 = hs
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM transfer_chunks WHERE node='a' AND dir='up'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        transfers >= 1 && chunks > transfers,
        "the batch did not go in chunks: {transfers} transfers, {chunks} chunks"
    );
    assert_eq!(hs.counts().unwrap().records, 2000);
}
