//! The trust boundary: an enrolled clinic is trusted with its own catchment and
//! nothing more. Each test plays the attacker with one clinic's real credential
//! against a real hub over real TCP (HTTP, and MQTT through a real mosquitto), and
//! checks that the lie is refused and that nothing it aimed at changed.

mod common;

use std::path::Path;
use std::time::Duration;

use clinicsync::devkit::cluster::{self, Broker};
use clinicsync::engine::CatchmentRule;
use clinicsync::model::{Hlc, RecordKey, Snapshot, Version, VersionVector};
use clinicsync::store::Store;
use clinicsync::time::wall_ms;
use clinicsync::transport::Exchange;
use clinicsync::wire::{
    Cursor, FetchRequest, Message, Outcome, PullRequest, PushRequest, PushResponse, WireRecord,
};
use common::*;
use serde_json::{json, Value};

/// A hub with clinics `a` (North) and `b` (South); both also hold district Shared.
fn network(dir: &Path) -> (TestHub, TestClinic, TestClinic) {
    let mut policy = hub_policy(&[("a", "North"), ("b", "South")]);
    for node in ["a", "b"] {
        policy.catchment.push(CatchmentRule {
            node: node.into(),
            path: "address.district".into(),
            equals: "Shared".into(),
        });
    }
    let hub = TestHub::start(dir, 0, policy, &["a", "b"], 16 << 20);
    let a = TestClinic::new(dir, "a", &hub.url, &hub.token("a"));
    let b = TestClinic::new(dir, "b", &hub.url, &hub.token("b"));
    (hub, a, b)
}

fn observation(id: &str, patient: &str, value: &str) -> Value {
    json!({"resourceType":"Observation","id":id,"status":"final",
           "code":{"text":"HIV test"},"valueString":value,
           "subject":{"reference":format!("Patient/{patient}")}})
}

/// A record as a (possibly lying) peer puts it on the wire.
fn forged(
    body: Value,
    origin: &str,
    vv: &[(&str, u64)],
    wall_ms: u64,
    deleted: bool,
) -> WireRecord {
    let snapshot = Snapshot::from_json_value(body).unwrap();
    WireRecord::from_version(&Version {
        snapshot,
        origin: origin.into(),
        hlc: Hlc {
            wall_ms,
            counter: 0,
        },
        vv: VersionVector(vv.iter().map(|(n, c)| (n.to_string(), *c)).collect()),
        deleted,
    })
}

fn push(link: &dyn Exchange, node: &str, records: Vec<WireRecord>) -> PushResponse {
    let msg = Message::PushRequest(PushRequest {
        node: node.into(),
        records,
    });
    match link.exchange("/v1/push", &msg).unwrap().0 {
        Message::PushResponse(r) => r,
        other => panic!("expected a push response, got {}", other.name()),
    }
}

fn rejected(r: &PushResponse, i: usize, words: &str) -> bool {
    match &r.results[i].outcome {
        Outcome::Rejected { reason, .. } => {
            assert!(reason.contains(words), "{reason:?} lacks {words:?}");
            true
        }
        other => panic!("record {i} was not refused: {other:?}"),
    }
}

fn pull_all(link: &dyn Exchange, node: &str) -> Vec<WireRecord> {
    let mut cursor = Cursor::default();
    let mut out = Vec::new();
    loop {
        let msg = Message::PullRequest(PullRequest {
            node: node.into(),
            cursor,
            max_bytes: 1 << 20,
            max_records: 1000,
            include_own: true,
            answer_chunk: 0,
            health: Vec::new(),
            order_results: Vec::new(),
        });
        let Message::PullResponse(p) = link.exchange("/v1/pull", &msg).unwrap().0 else {
            panic!("expected a pull response")
        };
        out.extend(p.records);
        cursor = p.next;
        if !p.more {
            return out;
        }
    }
}

fn catchment(store: &Store, node: &str) -> Vec<String> {
    let mut s = store
        .conn()
        .prepare("SELECT patient FROM catchment WHERE node=?1 ORDER BY patient")
        .unwrap();
    s.query_map([node], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

fn current(store: &Store, r: &str) -> Option<Version> {
    store
        .current(&RecordKey::parse(r).unwrap())
        .unwrap()
        .map(|s| s.version)
}

/// b registers pb (South) with an encounter and an HIV result; all reach the hub.
fn b_has_a_patient(b: &mut TestClinic) {
    b.put(vec![
        patient("pb", "South"),
        encounter("eb", "pb"),
        observation("ob", "pb", "positive"),
    ]);
    b.sync().unwrap();
}

#[test]
fn writing_for_another_clinics_patient_is_refused_and_grants_no_access() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, a, mut b) = network(dir.path());
    b_has_a_patient(&mut b);
    let now = wall_ms();

    // New record for b's patient, and exact copies of b's records (which used to be
    // answered "duplicate" and still granted the patient).
    let copy = |r: &str| WireRecord::from_version(&current(&hub.store(), r).unwrap());
    let resp = push(
        &a.client,
        "a",
        vec![
            forged(observation("oa", "pb", "x"), "a", &[("a", 1)], now, false),
            copy("Encounter/eb"),
            copy("Observation/ob"),
        ],
    );
    for i in 0..3 {
        assert!(matches!(resp.results[i].outcome, Outcome::Rejected { .. }));
    }
    rejected(&resp, 0, "not in the catchment of a");
    assert!(
        catchment(&hub.store(), "a").is_empty(),
        "a gained a patient"
    );
    assert!(current(&hub.store(), "Observation/oa").is_none());

    // The next pull gives a nothing of pb's compartment.
    let got = pull_all(&a.client, "a");
    assert!(
        got.iter().all(|r| !r.body.contains("pb")),
        "a received b's patient: {:?}",
        got.iter()
            .map(|r| format!("{}/{}", r.kind, r.id))
            .collect::<Vec<_>>()
    );

    // A fetch refusal reads the same for a record that exists and one that does not.
    let fetch = |id: &str| {
        let msg = Message::FetchRequest(FetchRequest {
            node: "a".into(),
            keys: vec![("Observation".into(), id.into())],
        });
        match a.client.exchange("/v1/fetch", &msg) {
            Err(e) => e.to_string(),
            Ok((m, _)) => panic!("fetch of {id} answered {}", m.name()),
        }
    };
    let exists = fetch("ob");
    let missing = fetch("no-such-obs");
    assert_eq!(
        exists.replace("ob", "X"),
        missing.replace("no-such-obs", "X"),
        "a refusal tells an existing record from a missing one"
    );
    assert!(
        !exists.contains("pb"),
        "the refusal names the patient: {exists}"
    );
}

#[test]
fn overwriting_deleting_or_moving_another_clinics_patient_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, a, mut b) = network(dir.path());
    b_has_a_patient(&mut b);
    let before_p = current(&hub.store(), "Patient/pb").unwrap();
    let before_o = current(&hub.store(), "Observation/ob").unwrap();
    let now = wall_ms();
    let resp = push(
        &a.client,
        "a",
        vec![
            // Move pb to a's district, with a vector that includes b's write.
            forged(
                patient("pb", "North"),
                "a",
                &[("a", 1), ("b", 1)],
                now,
                false,
            ),
            // Overwrite the HIV result, then a tombstone for it.
            forged(
                observation("ob", "pb", "negative"),
                "a",
                &[("a", 5), ("b", 1)],
                now,
                false,
            ),
            forged(
                observation("eb", "pb", "gone"),
                "a",
                &[("a", 9), ("b", 9)],
                now,
                true,
            ),
        ],
    );
    for i in 0..3 {
        rejected(&resp, i, "");
    }
    // a's own patient, then b's records rewritten to name it: a hijack by subject.
    let resp = push(
        &a.client,
        "a",
        vec![
            forged(patient("pa", "North"), "a", &[("a", 1)], now, false),
            forged(
                observation("ob", "pa", "negative"),
                "a",
                &[("a", 1), ("b", 1)],
                now,
                false,
            ),
            forged(encounter("eb", "pa"), "a", &[("a", 1), ("b", 1)], now, true),
        ],
    );
    assert_eq!(resp.results[0].outcome, Outcome::Accepted, "{resp:?}");
    rejected(&resp, 1, "belongs to Patient/pb");
    rejected(&resp, 2, "belongs to Patient/pb");
    let s = hub.store();
    assert_eq!(current(&s, "Patient/pb").unwrap(), before_p);
    assert_eq!(current(&s, "Observation/ob").unwrap(), before_o);
    assert!(!current(&s, "Encounter/eb").unwrap().deleted);
    assert_eq!(catchment(&s, "b"), vec!["pb".to_string()]);
    assert_eq!(catchment(&s, "a"), vec!["pa".to_string()]);
}

#[test]
fn a_new_patient_joins_its_registering_clinics_catchment_with_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, a, _b) = network(dir.path());
    let now = wall_ms();
    // The encounter comes first in the batch: the hub takes Patients first.
    let resp = push(
        &a.client,
        "a",
        vec![
            forged(encounter("ea", "pnew"), "a", &[("a", 1)], now, false),
            forged(patient("pnew", "Elsewhere"), "a", &[("a", 1)], now, false),
        ],
    );
    assert_eq!(resp.results[0].outcome, Outcome::Accepted, "{resp:?}");
    assert_eq!(resp.results[1].outcome, Outcome::Accepted, "{resp:?}");
    assert_eq!(catchment(&hub.store(), "a"), vec!["pnew".to_string()]);

    // An encounter for a patient the hub has never seen is held back, retryably.
    let resp = push(
        &a.client,
        "a",
        vec![forged(
            encounter("e2", "unknown-p"),
            "a",
            &[("a", 1)],
            now,
            false,
        )],
    );
    match &resp.results[0].outcome {
        Outcome::Rejected { reason, permanent } => {
            assert!(!permanent);
            assert!(reason.contains("not known at this hub yet"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn forged_vectors_foreign_origins_and_wrapping_counters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, a, mut b) = network(dir.path());
    // ps is shared: both clinics hold it by rule.
    b.put(vec![patient("ps", "Shared"), encounter("es", "ps")]);
    b.sync().unwrap();
    let now = wall_ms();
    let resp = push(
        &a.client,
        "a",
        vec![
            // Claims 1,000 writes by b that the hub never saw: b's next edits would be stale.
            forged(
                encounter("es", "ps"),
                "a",
                &[("a", 1), ("b", 1000)],
                now,
                false,
            ),
            // Pretends b wrote it: b would never receive it back (pulls leave out
            // what a node wrote itself) and hub and b would diverge.
            forged(encounter("es2", "ps"), "b", &[("b", 1)], now, false),
            // Counters at the top of the range, to make them wrap.
            forged(encounter("es3", "ps"), "a", &[("a", u64::MAX)], now, false),
            forged(encounter("es4", "ps"), "a", &[("a", 1 << 30)], now, false),
            // Origin not counted in its own vector.
            forged(encounter("es5", "ps"), "a", &[("b", 1)], now, false),
        ],
    );
    rejected(&resp, 0, "cannot vouch for another node's writes");
    rejected(&resp, 1, "origin \"b\" is neither a nor a node below it");
    rejected(&resp, 2, "out of range");
    rejected(&resp, 3, "in one push");
    rejected(&resp, 4, "does not count a write by its origin");
    for r in [
        "Encounter/es2",
        "Encounter/es3",
        "Encounter/es4",
        "Encounter/es5",
    ] {
        assert!(current(&hub.store(), r).is_none(), "{r} was stored");
    }
    // b's genuine edit is accepted, not judged stale against a forged vector.
    b.put(vec![
        json!({"resourceType":"Encounter","id":"es","status":"cancelled",
                      "subject":{"reference":"Patient/ps"}}),
    ]);
    let report = b.sync().unwrap();
    assert_eq!(report.pushed.accepted, 1, "{report:?}");
    assert_eq!(
        current(&hub.store(), "Encounter/es")
            .unwrap()
            .snapshot
            .json()["status"],
        "cancelled"
    );
    // And a's legitimate edit of the shared record is accepted.
    let held = current(&hub.store(), "Encounter/es").unwrap().vv;
    let mut vv: Vec<(&str, u64)> = held.0.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    vv.push(("a", 1));
    let resp = push(
        &a.client,
        "a",
        vec![forged(
            json!({"resourceType":"Encounter","id":"es","status":"finished","subject":{"reference":"Patient/ps"}}),
            "a",
            &vv,
            wall_ms(),
            false,
        )],
    );
    assert_eq!(resp.results[0].outcome, Outcome::Accepted, "{resp:?}");
}

#[test]
fn a_far_future_clock_is_refused_and_moves_no_clock() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, a, mut b) = network(dir.path());
    let two_days = 2 * 24 * 3_600_000;
    let now = wall_ms();
    let resp = push(
        &a.client,
        "a",
        vec![forged(
            patient("pf", "North"),
            "a",
            &[("a", 1)],
            now + two_days,
            false,
        )],
    );
    match &resp.results[0].outcome {
        Outcome::Rejected { reason, permanent } => {
            assert!(!permanent, "a clock error is retryable");
            assert!(reason.contains("2 days ahead"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(current(&hub.store(), "Patient/pf").is_none());
    // The hub's clock did not move: b's next write at the hub carries today's stamp.
    b.put(vec![patient("pb2", "South")]);
    b.sync().unwrap();
    hub.put(vec![json!({"resourceType":"Location","id":"l1"})]);
    let l1 = current(&hub.store(), "Location/l1").unwrap();
    assert!(
        l1.hlc.wall_ms < wall_ms() + 60_000,
        "hub clock dragged ahead: {}",
        l1.hlc
    );
    // A stamp a little ahead (ordinary skew) is fine.
    let resp = push(
        &a.client,
        "a",
        vec![forged(
            patient("pf", "North"),
            "a",
            &[("a", 1)],
            now + 2_000,
            false,
        )],
    );
    assert_eq!(resp.results[0].outcome, Outcome::Accepted);
}

#[test]
fn oversized_fields_are_refused_and_grow_the_audit_by_one_entry_per_push() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, a, _b) = network(dir.path());
    let before = hub.store().counts().unwrap();
    // The database file once the WAL is copied into it: what the store holds, not
    // when its pages were last checkpointed (a hub's pages are 8 KiB, so a set-up's
    // pages still in the WAL would count twice what they did at 4 KiB).
    let settled_size = || {
        hub.store()
            .conn()
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .unwrap();
        std::fs::metadata(&hub.store_path).unwrap().len()
    };
    let size_before = settled_size();
    let now = wall_ms();
    let big = "x".repeat(20_000);
    let mut records = Vec::new();
    for i in 0..500 {
        let mut r = forged(
            patient(&format!("p{i}"), "North"),
            "a",
            &[("a", 1)],
            now,
            false,
        );
        match i % 4 {
            0 => r.kind = format!("Patient{big}"),
            1 => r.id = format!("{big}{i}"),
            2 => r.origin = format!("a{big}"),
            _ => {
                r.vv = VersionVector((0..5000).map(|n| (format!("n{n}"), 1u64)).collect());
            }
        }
        records.push(r);
    }
    let resp = push(&a.client, "a", records);
    assert!(resp
        .results
        .iter()
        .all(|r| matches!(r.outcome, Outcome::Rejected { .. })));
    // The answer does not echo the oversized fields back.
    let answer = clinicsync::wire::encode(&Message::PushResponse(resp)).unwrap();
    assert!(answer.len() < 64 << 10, "answer of {} bytes", answer.len());
    let after = hub.store().counts().unwrap();
    assert_eq!(after.records, before.records);
    assert_eq!(
        after.audit,
        before.audit + 1,
        "one audit entry for the push"
    );
    let grown = settled_size().saturating_sub(size_before);
    assert!(grown < 256 << 10, "store grew by {grown} bytes");
}

#[test]
fn pulls_leave_out_what_the_authenticated_sender_pushed_not_what_origin_claims() {
    let dir = tempfile::tempdir().unwrap();
    let mut policy = hub_policy(&[("d", "North")]);
    policy
        .descendants
        .insert("d".into(), vec!["c1".into(), "c2".into()]);
    let hub = TestHub::start(dir.path(), 0, policy, &["d", "x"], 16 << 20);
    let d = TestClinic::new(dir.path(), "d", &hub.url, &hub.token("d"));
    let now = wall_ms();
    // A district hub forwards what its clinics wrote; their origins are accepted.
    let resp = push(
        &d.client,
        "d",
        vec![
            forged(patient("p1", "North"), "c1", &[("c1", 1)], now, false),
            forged(encounter("e1", "p1"), "c2", &[("c2", 1)], now, false),
            forged(encounter("e2", "p1"), "x", &[("x", 1)], now, false),
        ],
    );
    assert_eq!(resp.results[0].outcome, Outcome::Accepted, "{resp:?}");
    assert_eq!(resp.results[1].outcome, Outcome::Accepted, "{resp:?}");
    rejected(&resp, 2, "neither d nor a node below it");
    // d does not get back what it sent (its origin is c1/c2, not d).
    let msg = Message::PullRequest(PullRequest {
        node: "d".into(),
        cursor: Cursor::default(),
        max_bytes: 1 << 20,
        max_records: 100,
        include_own: false,
        answer_chunk: 0,
        health: Vec::new(),
        order_results: Vec::new(),
    });
    let Message::PullResponse(p) = d.client.exchange("/v1/pull", &msg).unwrap().0 else {
        panic!()
    };
    assert!(
        p.records.is_empty(),
        "d got its own records back: {:?}",
        p.records.len()
    );
    // A wiped district hub restoring asks for its own too, and gets them.
    assert_eq!(pull_all(&d.client, "d").len(), 2);
}

fn broker(dir: &Path) -> Broker {
    let port = cluster::free_port().unwrap();
    Broker::start(
        &dir.join("broker"),
        port,
        "hub",
        &[
            ("hub", "hub-pass"),
            ("a", "a-pass"),
            ("b", "b-pass"),
            ("gone", "gone-pass"),
        ],
    )
    .unwrap()
}

#[test]
fn over_mqtt_the_same_boundary_holds_and_only_enrolled_children_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path());
    let hub = TestHub::start_mqtt(
        dir.path(),
        hub_policy(&[("a", "North"), ("b", "South")]),
        &["a", "b"],
        &broker,
    );
    let mut b = TestClinic::new(dir.path(), "b", &hub.url, &hub.token("b"));
    b_has_a_patient(&mut b);
    let a = mqtt_client(&broker, "a", "a-pass", 5).unwrap();
    let resp = push(
        &a,
        "a",
        vec![forged(
            observation("oa", "pb", "x"),
            "a",
            &[("a", 1)],
            wall_ms(),
            false,
        )],
    );
    rejected(&resp, 0, "not in the catchment of a");
    assert!(catchment(&hub.store(), "a").is_empty());

    // A broker account the hub has not enrolled (or has removed) is refused.
    let gone = mqtt_client(&broker, "gone", "gone-pass", 5).unwrap();
    let before = hub.store().counts().unwrap();
    let msg = Message::PushRequest(PushRequest {
        node: "gone".into(),
        records: vec![forged(
            patient("pg", "North"),
            "gone",
            &[("gone", 1)],
            wall_ms(),
            false,
        )],
    });
    match Exchange::exchange(&gone, "/v1/push", &msg) {
        Err(clinicsync::transport::http::TransportError::Status { status, message }) => {
            assert_eq!(status, 403, "{message}");
            assert!(message.contains("not enrolled"), "{message}");
        }
        other => panic!("a non-enrolled node was served: {other:?}"),
    }
    let after = hub.store().counts().unwrap();
    assert_eq!((before.records, before.audit), (after.records, after.audit));

    // A child removed from hub.children (as SIGHUP reloads it) is refused at once,
    // though its broker account and connection still work.
    let mut hash = [0u8; 32];
    hex::decode_to_slice(clinicsync::auth::token_hash(&hub.token("b")), &mut hash).unwrap();
    hub.state.set_children(vec![("b".to_string(), hash)]);
    match Exchange::exchange(
        &a,
        "/v1/pull",
        &Message::PullRequest(PullRequest {
            node: "a".into(),
            cursor: Cursor::default(),
            max_bytes: 1 << 20,
            max_records: 10,
            include_own: false,
            answer_chunk: 0,
            health: Vec::new(),
            order_results: Vec::new(),
        }),
    ) {
        Err(clinicsync::transport::http::TransportError::Status { status, message }) => {
            assert_eq!(status, 403, "{message}");
            assert!(message.contains("not enrolled"), "{message}");
        }
        other => panic!("a removed child was served: {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(10));
}

#[test]
fn chunked_uploads_are_bounded_per_child_in_count_and_size() {
    use clinicsync::wire::ChunkPut;
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        1 << 20,
    );
    let a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    // 64 KiB of zeros compresses to almost nothing on the wire: ten such uploads
    // started and abandoned must not all be kept.
    let data = vec![0u8; 64 << 10];
    for n in 0..10u8 {
        let msg = Message::ChunkPut(ChunkPut {
            id: [n; 32],
            total: 1 << 20,
            offset: 0,
            sha: Sha256::digest(&data).into(),
            run: 0,
            data: data.clone(),
        });
        let (answer, traffic) = a.client.exchange("/v1/chunk", &msg).unwrap();
        assert!(matches!(answer, Message::ChunkAck(_)));
        assert!(traffic.sent < 4096, "the chunk was not compressible?");
    }
    let held: i64 = hub
        .store()
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM transfers WHERE node='a' AND dir='up'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(held as usize, clinicsync::hub::MAX_OPEN_TRANSFERS);
    // A transfer declared larger than one request may be is refused outright.
    let msg = Message::ChunkPut(ChunkPut {
        id: [99; 32],
        total: 2 << 20,
        offset: 0,
        sha: Sha256::digest(&data).into(),
        run: 0,
        data,
    });
    let err = a
        .client
        .exchange("/v1/chunk", &msg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("413") && err.contains("over the limit"),
        "{err}"
    );
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn last_line(out: std::process::Output) -> String {
    ok(out).lines().last().unwrap().to_string()
}

#[test]
fn over_usb_a_clinic_cannot_write_for_another_clinics_patient() {
    let dir = tempfile::tempdir().unwrap();
    let stick = dir.path().join("stick");
    std::fs::create_dir(&stick).unwrap();
    let l = cluster::write_layout(
        dir.path(),
        1,
        &[("clinic-a", "North"), ("clinic-b", "South")],
        "",
        "",
    )
    .unwrap();
    let (hub, a) = (&l.hub.config, &l.clinics[0].config);
    let hub_pub = last_line(cli(hub, &["keys", "init"]));
    let a_pub = last_line(cli(a, &["keys", "init"]));
    ok(cli(hub, &["keys", "trust", &a_pub]));
    ok(cli(a, &["keys", "trust", &hub_pub, "--parent"]));
    let put = |config: &Path, name: &str, v: Value| {
        let p = dir.path().join(name);
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        ok(cli(config, &["put", p.to_str().unwrap()]));
    };
    // b's patient, held at the hub; a writes an observation for it offline.
    put(hub, "pb.json", patient("pb", "South"));
    put(a, "oa.json", observation("oa", "pb", "x"));
    put(a, "pa.json", patient("pa", "North"));
    ok(cli(a, &["export", stick.to_str().unwrap()]));
    let parts: Vec<_> = std::fs::read_dir(&stick)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let out = ok(cli(hub, &["import", parts[0].to_str().unwrap()]));
    assert!(out.contains("(1 refused)"), "{out}");
    let h = Store::open_existing(&l.hub.store).unwrap();
    assert!(
        current(&h, "Observation/oa").is_none(),
        "a wrote for b's patient"
    );
    assert!(
        current(&h, "Patient/pa").is_some(),
        "a's own patient was refused"
    );
    assert_eq!(catchment(&h, "clinic-a"), vec!["pa".to_string()]);
}

#[test]
fn a_patient_moves_to_another_clinic_only_by_the_hubs_audited_command() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, a, mut b) = network(dir.path());
    b_has_a_patient(&mut b);
    let config = dir.path().join("hub.toml");
    let mut text = format!(
        "[node]\nid = \"hub\"\nstore = \"{}\"\n[hub]\nlisten = \"127.0.0.1:0\"\n",
        hub.store_path.display()
    );
    for n in ["a", "b"] {
        text.push_str(&format!(
            "[[hub.children]]\nnode = \"{n}\"\ntoken_sha256 = \"{}\"\n",
            clinicsync::auth::token_hash(&hub.token(n))
        ));
    }
    std::fs::write(&config, text).unwrap();
    let refused = cli(&config, &["catchment", "add", "nobody", "pb"]);
    assert_eq!(refused.status.code(), Some(7));
    let audit_before = hub.store().counts().unwrap().audit;
    ok(cli(&config, &["catchment", "add", "a", "Patient/pb"]));
    assert_eq!(hub.store().counts().unwrap().audit, audit_before + 1);
    let listed = ok(cli(&config, &["catchment", "list", "a"]));
    assert!(
        listed.contains("Patient/pb") && listed.contains("granted"),
        "{listed}"
    );
    // a now receives pb's whole compartment and may write for it.
    let got = pull_all(&a.client, "a");
    for r in ["pb", "eb", "ob"] {
        assert!(got.iter().any(|w| w.id == r), "{r} was not backfilled to a");
    }
    let resp = push(
        &a.client,
        "a",
        vec![forged(
            observation("oa", "pb", "x"),
            "a",
            &[("a", 1)],
            wall_ms(),
            false,
        )],
    );
    assert_eq!(resp.results[0].outcome, Outcome::Accepted, "{resp:?}");
    // Removed again: a's writes are refused once more.
    ok(cli(&config, &["catchment", "remove", "a", "pb"]));
    let resp = push(
        &a.client,
        "a",
        vec![forged(
            observation("oa2", "pb", "y"),
            "a",
            &[("a", 1)],
            wall_ms(),
            false,
        )],
    );
    rejected(&resp, 0, "not in the catchment of a");
}
