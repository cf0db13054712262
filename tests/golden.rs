//! Golden tests freeze the version-1 wire format. A failing test here means the
//! format changed: that needs a new protocol version, not a new golden file.
//! (`CLINICSYNC_BLESS=1 cargo test --test golden` writes missing files only.)

use std::path::PathBuf;

use clinicsync::model::{Hlc, VersionVector};
use clinicsync::wire::*;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn check(name: &str, bytes: &[u8]) {
    let path = golden(name);
    if !path.exists() && std::env::var_os("CLINICSYNC_BLESS").is_some() {
        std::fs::write(&path, hex::encode(bytes) + "\n").unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("missing golden file {}", path.display()));
    assert_eq!(
        hex::encode(bytes),
        want.trim(),
        "{name} changed: the v1 wire format is frozen"
    );
}

fn record() -> WireRecord {
    WireRecord {
        kind: "Observation".into(),
        id: "0b6a4f1e-5d3c-4f8a-9b1e-2c3d4e5f6a7b".into(),
        origin: "clinic-a".into(),
        hlc: Hlc { wall_ms: 1_795_000_000_000, counter: 3 },
        vv: VersionVector([("clinic-a".to_string(), 2), ("hub".to_string(), 1)].into_iter().collect()),
        deleted: false,
        body: r#"{"id":"0b6a4f1e-5d3c-4f8a-9b1e-2c3d4e5f6a7b","resourceType":"Observation","status":"final","subject":{"reference":"Patient/p1"}}"#.into(),
    }
}

fn messages() -> Vec<(&'static str, Message)> {
    vec![
        (
            "push_request",
            Message::PushRequest(PushRequest {
                node: "clinic-a".into(),
                records: vec![record()],
            }),
        ),
        (
            "push_response",
            Message::PushResponse(PushResponse {
                results: vec![
                    PushResult {
                        i: 0,
                        vv: record().vv,
                        outcome: Outcome::Accepted,
                    },
                    PushResult {
                        i: 1,
                        vv: record().vv,
                        outcome: Outcome::Rejected {
                            reason: "unknown kind".into(),
                            permanent: true,
                        },
                    },
                    PushResult {
                        i: 2,
                        vv: record().vv,
                        outcome: Outcome::Conflict {
                            resolution: "merged".into(),
                            lost: false,
                        },
                    },
                ],
            }),
        ),
        (
            "pull_request",
            Message::PullRequest(PullRequest {
                node: "clinic-a".into(),
                cursor: Cursor { eff: 10, seq: 7 },
                max_bytes: 1 << 20,
                max_records: 500,
                include_own: false,
                answer_chunk: 0,
                health: Vec::new(),
                order_results: Vec::new(),
            }),
        ),
        (
            // Since 0.2: a client that takes a large page as a transfer.
            "pull_request_chunked",
            Message::PullRequest(PullRequest {
                node: "clinic-a".into(),
                cursor: Cursor { eff: 10, seq: 7 },
                max_bytes: 4 << 20,
                max_records: 5_000,
                include_own: false,
                answer_chunk: 65_536,
                health: Vec::new(),
                order_results: Vec::new(),
            }),
        ),
        (
            // Since 0.2: the sender's health report (and a district's nodes') rides
            // on its first pull of a round.
            "pull_request_health",
            Message::PullRequest(PullRequest {
                node: "district".into(),
                cursor: Cursor { eff: 10, seq: 7 },
                max_bytes: 4 << 20,
                max_records: 5_000,
                include_own: false,
                answer_chunk: 0,
                health: vec![
                    health_report("district", None),
                    health_report("clinic-a", Some(1_764_000_000_000)),
                ],
                order_results: Vec::new(),
            }),
        ),
        (
            "pull_response",
            Message::PullResponse(PullResponse {
                records: vec![record()],
                next: Cursor { eff: 11, seq: 11 },
                more: true,
                head: 40,
                orders: Vec::new(),
                bundle_seq: 0,
            }),
        ),
        (
            "fetch_request",
            Message::FetchRequest(FetchRequest {
                node: "clinic-a".into(),
                keys: vec![("Patient".into(), "p1".into())],
            }),
        ),
        (
            "chunk_put",
            Message::ChunkPut(ChunkPut {
                id: [7; 32],
                total: 100,
                offset: 64,
                data: vec![1, 2, 3],
                sha: [9; 32],
            }),
        ),
        (
            "chunk_ready",
            Message::ChunkReady(ChunkAck {
                id: [5; 32],
                received: 70_000,
            }),
        ),
        (
            "chunk_get",
            Message::ChunkGet(ChunkGet {
                id: [5; 32],
                offset: 65_536,
                max: 65_536,
            }),
        ),
        (
            "fetch_response",
            Message::FetchResponse(FetchResponse {
                results: vec![FetchResult {
                    kind: "Patient".into(),
                    id: "p9".into(),
                    record: None,
                    refused: Some("not in the catchment".into()),
                }],
            }),
        ),
    ]
}

#[test]
fn v1_messages_encode_to_the_frozen_cbor() {
    for (name, msg) in messages() {
        check(&format!("{name}.v1.cbor.hex"), &to_cbor(&msg).unwrap());
    }
}

#[test]
fn frozen_v1_frames_still_decode() {
    for (name, msg) in messages() {
        let path = golden(&format!("{name}.v1.frame.hex"));
        if !path.exists() && std::env::var_os("CLINICSYNC_BLESS").is_some() {
            std::fs::write(&path, hex::encode(encode(&msg).unwrap()) + "\n").unwrap();
        }
        let bytes = hex::decode(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
        assert_eq!(decode(&bytes, &Limits::default()).unwrap(), msg, "{name}");
    }
}

/// A version-1 USB bundle written by an earlier build must still verify and decode.
/// Its keys are test keys committed beside it (`tests/golden/bundle-keys/`).
#[test]
fn a_frozen_v1_bundle_still_verifies_and_decodes() {
    use clinicsync::keys::Identity;
    use clinicsync::transport::file::{self, BundleHeader, BundleWriter, Item};
    let keys = golden("bundle-keys");
    let path = golden("bundle_v1.csb");
    let items = vec![
        Item::Push(PushRequest {
            node: "clinic-a".into(),
            records: vec![record()],
        }),
        Item::PullState {
            cursor: Cursor { eff: 3, seq: 2 },
            include_own: false,
            health: Vec::new(),
            order_results: Vec::new(),
        },
    ];
    if !golden("bundle_v1.csb.001").exists() && std::env::var_os("CLINICSYNC_BLESS").is_some() {
        let a = Identity::init(&keys.join("clinic-a"), "clinic-a").unwrap();
        let hub = Identity::init(&keys.join("hub"), "hub").unwrap();
        let header = BundleHeader {
            id: "0123456789abcdef0123456789abcdef".into(),
            kind: "export".into(),
            sender: "clinic-a".into(),
            recipient: "hub".into(),
            seq: 1,
            created_ms: 1_795_000_000_000,
            part_size: 0,
        };
        let mut w = BundleWriter::create(&path, header, &a, &hub.public()).unwrap();
        for i in &items {
            w.write(i).unwrap();
        }
        w.finish().unwrap();
    }
    let a = Identity::load(&keys.join("clinic-a"), "clinic-a")
        .unwrap()
        .public();
    let hub = Identity::load(&keys.join("hub"), "hub").unwrap();
    let trusted = |n: &str| (n == "clinic-a").then(|| a.clone());
    let private = tempfile::tempdir().unwrap();
    let v = file::verify(
        &golden("bundle_v1.csb.001"),
        "hub",
        &trusted,
        private.path(),
    )
    .unwrap();
    assert_eq!(v.header.seq, 1);
    assert_eq!(v.header.sender, "clinic-a");
    let mut r = v.items(&hub).unwrap();
    let mut got = Vec::new();
    while let Some(i) = r.next_item().unwrap() {
        got.push(i);
    }
    assert_eq!(got, items);
}

/// A fixed health report (`clinicsync::health`), as a district forwards it.
fn health_report(node: &str, heard_ms: Option<u64>) -> clinicsync::health::HealthReport {
    clinicsync::health::HealthReport {
        v: 1,
        node: node.into(),
        version: "0.2.0".into(),
        schema: 7,
        made_ms: 1_764_000_000_000,
        heard_ms,
        uptime_s: Some(86_400),
        records: 5_000,
        outbox: 3,
        inbox: 0,
        quarantine: 1,
        top_quarantine: vec![clinicsync::health::ReasonCount {
            reason: "Invalid Submission: identifier is required".into(),
            count: 1,
        }],
        conflicts_open: 0,
        pull_lag: 12,
        last_sync_ms: Some(1_763_999_990_000),
        link_error: None,
        emr_error: Some("EMR unavailable: 401".into()),
        bytes_today: 123_456,
        disk_free: Some(8 << 30),
        clock_skew_ms: Some(-1_500),
        audit_entries: 42,
        audit_head: "ab".repeat(32),
        link_rate_bps: None,
    }
}
