//! Golden tests freeze the version-1 wire format and the version-1 USB bundle
//! format. A failing test here means the format changed: that needs a new protocol
//! version, not a new golden file.
//!
//! - every message, including each optional field that was added within v1 (as
//!   `<name>.v1.cbor.hex`, and framed as `<name>.v1.frame.hex`): the committed bytes
//!   decode to the expected message and encode back to the same bytes;
//! - every bundle item kind (`bundle_item_*.v1.cbor.hex`), the plaintext bundle
//!   header of an export and of a return bundle (`bundle_header_*.v1.hex`), and two
//!   whole bundles signed and encrypted with the committed test keys
//!   (`bundle_v1.csb.001`: an export; `bundle_return_v1.csb.001`: the hub's return
//!   bundle of receipts and pull pages), which must still verify and decrypt.
//!
//! - protocol v2 (`<name>.v2.payload.hex`: the uncompressed skeleton and record
//!   block, compared byte for byte with a fresh encoding; `<name>.v2.frame.hex` and
//!   `<name>.v2.dict1.frame.hex`: whole frames without and with dictionary 1, which
//!   must decode to the message), and dictionary 1 itself (`dict1.sha256`: a shipped
//!   dictionary never changes; a new one gets a new id).
//!
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
                run: 0,
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
            // Every outcome the first golden leaves out: a retryable refusal, and a
            // conflict the pusher lost (`lost`, since 0.2).
            "push_response_outcomes",
            Message::PushResponse(PushResponse {
                results: vec![
                    PushResult {
                        i: 0,
                        vv: record().vv,
                        outcome: Outcome::Duplicate,
                    },
                    PushResult {
                        i: 1,
                        vv: record().vv,
                        outcome: Outcome::Stale,
                    },
                    PushResult {
                        i: 2,
                        vv: record().vv,
                        outcome: Outcome::Conflict {
                            resolution: "later clock wins".into(),
                            lost: true,
                        },
                    },
                    PushResult {
                        i: 3,
                        vv: record().vv,
                        outcome: Outcome::Rejected {
                            reason: "clock 600 s ahead".into(),
                            permanent: false,
                        },
                    },
                ],
            }),
        ),
        (
            // Since 0.2: results of the parent's orders ride on a pull.
            "pull_request_order_results",
            Message::PullRequest(PullRequest {
                node: "clinic-a".into(),
                cursor: Cursor { eff: 10, seq: 7 },
                max_bytes: 4 << 20,
                max_records: 5_000,
                include_own: true,
                answer_chunk: 0,
                health: Vec::new(),
                order_results: vec![order_result()],
            }),
        ),
        (
            // Since 0.2: the parent's orders and the last bundle it imported.
            "pull_response_orders",
            Message::PullResponse(PullResponse {
                records: Vec::new(),
                next: Cursor { eff: 40, seq: 38 },
                more: false,
                head: 40,
                orders: orders(),
                bundle_seq: 3,
            }),
        ),
        (
            "fetch_response_record",
            Message::FetchResponse(FetchResponse {
                results: vec![FetchResult {
                    kind: "Observation".into(),
                    id: record().id,
                    record: Some(record()),
                    refused: None,
                }],
            }),
        ),
        (
            // A resumable upload: how much does the receiver hold, what it holds, run it.
            "chunk_query",
            Message::ChunkQuery(ChunkRef {
                id: [7; 32],
                total: 200_000,
                answer_chunk: 0,
            }),
        ),
        (
            "chunk_ack",
            Message::ChunkAck(ChunkAck {
                id: [7; 32],
                received: 65_536,
            }),
        ),
        (
            // As clients before 0.3 send it: no `answer_chunk`.
            "chunk_run",
            Message::ChunkRun(ChunkRef {
                id: [7; 32],
                total: 200_000,
                answer_chunk: 0,
            }),
        ),
        (
            // Since 0.3: the largest answer the client takes inline.
            "chunk_run_answer_chunk",
            Message::ChunkRun(ChunkRef {
                id: [7; 32],
                total: 200_000,
                answer_chunk: 16_384,
            }),
        ),
        (
            // A piece of a large answer (and the first piece of a large pull page).
            "chunk_data",
            Message::ChunkData(ChunkPut {
                id: [5; 32],
                total: 70_000,
                offset: 65_536,
                data: vec![4, 5, 6, 7],
                sha: [8; 32],
                run: 0,
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
        (
            // Since 0.3: a push batch carrying the round's first pull.
            "sync_request",
            Message::SyncRequest(SyncRequest {
                push: PushRequest {
                    node: "clinic-a".into(),
                    records: vec![record()],
                },
                pull: PullRequest {
                    node: "clinic-a".into(),
                    cursor: Cursor { eff: 7, seq: 5 },
                    max_bytes: 1 << 20,
                    max_records: 500,
                    include_own: false,
                    answer_chunk: 65_536,
                    health: Vec::new(),
                    order_results: Vec::new(),
                },
            }),
        ),
        (
            // Since 0.3: its answer, the push's results and the first page.
            "sync_response",
            Message::SyncResponse(SyncResponse {
                push: PushResponse {
                    results: vec![PushResult {
                        i: 0,
                        vv: record().vv,
                        outcome: Outcome::Accepted,
                    }],
                },
                pull: PullResponse {
                    records: vec![record()],
                    next: Cursor { eff: 9, seq: 9 },
                    more: false,
                    head: 9,
                    orders: Vec::new(),
                    bundle_seq: 0,
                },
            }),
        ),
        (
            // Since 0.3: the last piece of an upload, asking for it to be run.
            "chunk_put_run",
            Message::ChunkPut(ChunkPut {
                id: [9; 32],
                total: 70_000,
                offset: 65_536,
                data: vec![1, 2, 3],
                sha: [9; 32],
                run: 16_384,
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

/// The frozen CBOR decodes to the same message, which encodes to the same bytes: a
/// field renamed, retyped or newly required fails here even if encoding still
/// matches (e.g. a decoder that stopped accepting what older peers send).
#[test]
fn frozen_v1_cbor_decodes_and_encodes_to_the_same_bytes() {
    for (name, msg) in messages() {
        check(&format!("{name}.v1.cbor.hex"), &to_cbor(&msg).unwrap());
        let want = read_hex(&format!("{name}.v1.cbor.hex"));
        let decoded: Message = ciborium::de::from_reader(want.as_slice())
            .unwrap_or_else(|e| panic!("{name}: the frozen CBOR no longer decodes: {e}"));
        assert_eq!(
            decoded, msg,
            "{name}: the frozen CBOR decodes to another message"
        );
        assert_eq!(
            hex::encode(to_cbor(&decoded).unwrap()),
            hex::encode(&want),
            "{name}: decoding and encoding again changes the bytes"
        );
    }
}

/// A frozen frame is the v1 header and a zstd frame of exactly the frozen CBOR, and
/// decodes (within the default limits) to the message. The compressed bytes are not
/// compared with a fresh encoding: zstd's output may change with the library while
/// the format does not; every decoder of any version reads both.
#[test]
fn frozen_v1_frames_still_decode() {
    for (name, msg) in messages() {
        let path = golden(&format!("{name}.v1.frame.hex"));
        if !path.exists() && std::env::var_os("CLINICSYNC_BLESS").is_some() {
            std::fs::write(&path, hex::encode(encode(&msg).unwrap()) + "\n").unwrap();
        }
        check(&format!("{name}.v1.cbor.hex"), &to_cbor(&msg).unwrap());
        let bytes = read_hex(&format!("{name}.v1.frame.hex"));
        assert_eq!(&bytes[..6], b"CSYN\x00\x01", "{name}: magic and version 1");
        let payload = zstd::stream::decode_all(&bytes[6..])
            .unwrap_or_else(|e| panic!("{name}: the frozen frame no longer decompresses: {e}"));
        assert_eq!(
            hex::encode(&payload),
            hex::encode(read_hex(&format!("{name}.v1.cbor.hex"))),
            "{name}: the frame carries other CBOR than the frozen message"
        );
        assert_eq!(decode(&bytes, &Limits::default()).unwrap(), msg, "{name}");
        let again = encode(&msg).unwrap();
        assert_eq!(decode(&again, &Limits::default()).unwrap(), msg, "{name}");
    }
}

/// The messages frozen in v2: every one that carries records, one that does not,
/// and a batch that reaches every column (two kinds and origins, a deletion, an id
/// its body does not hold, a clock going back, a body with a newline).
fn v2_messages() -> Vec<(&'static str, Message)> {
    let keep = [
        "push_request",
        "push_response",
        "pull_request",
        "pull_response",
        "fetch_response_record",
        "fetch_response",
    ];
    let mut out: Vec<(&'static str, Message)> = messages()
        .into_iter()
        .filter(|(n, _)| keep.contains(n))
        .collect();
    let mut batch = vec![record()];
    let mut second = record();
    second.kind = "Patient".into();
    second.id = "p1".into();
    second.origin = "hub".into();
    second.hlc = Hlc {
        wall_ms: 1_794_999_999_000,
        counter: 0,
    };
    second.vv = VersionVector([("hub".to_string(), 7)].into_iter().collect());
    second.body = r#"{"gender":"female","id":"p1","resourceType":"Patient"}"#.into();
    batch.push(second);
    let mut third = record();
    third.id = "not-in-its-body".into();
    third.deleted = true;
    third.hlc.counter = 4;
    third.vv = VersionVector(
        [("clinic-a".to_string(), 3), ("hub".to_string(), 1)]
            .into_iter()
            .collect(),
    );
    batch.push(third);
    out.push((
        "push_request_batch",
        Message::PushRequest(PushRequest {
            node: "clinic-a".into(),
            records: batch.clone(),
        }),
    ));
    let mut newline = batch;
    newline[1].body = "{\"id\":\"p1\",\n\"resourceType\":\"Patient\"}".into();
    out.push((
        "push_request_newline",
        Message::PushRequest(PushRequest {
            node: "clinic-a".into(),
            records: newline,
        }),
    ));
    out
}

/// The v2 payload is frozen byte for byte, with bodies as text and as shapes and
/// columns (`v2cols`); frozen frames (without and with dictionary 1) decompress to it
/// and decode to the message.
#[test]
fn frozen_v2_payloads_and_frames_still_decode() {
    for (name, msg) in v2_messages() {
        for (form, columns) in [("v2", false), ("v2cols", true)] {
            let payload = v2::payload(&msg, columns)
                .unwrap()
                .expect("within v2 bounds");
            check(&format!("{name}.{form}.payload.hex"), &payload);
            for (suffix, dict) in [(form.to_string(), 0u32), (format!("{form}.dict1"), 1)] {
                let file = format!("{name}.{suffix}.frame.hex");
                let path = golden(&file);
                if !path.exists() && std::env::var_os("CLINICSYNC_BLESS").is_some() {
                    // The frame of exactly this payload (the encoder would send a
                    // message this small with bodies as text, whichever is smaller).
                    let packed = match dict {
                        0 => zstd::bulk::compress(&payload, LEVEL_FAST).unwrap(),
                        id => zstd::bulk::Compressor::with_dictionary(
                            LEVEL_FAST,
                            dict::bytes(id).unwrap(),
                        )
                        .unwrap()
                        .compress(&payload)
                        .unwrap(),
                    };
                    let mut f = b"CSYN\x00\x02".to_vec();
                    f.extend_from_slice(&dict.to_be_bytes());
                    f.extend(packed);
                    std::fs::write(&path, hex::encode(f) + "\n").unwrap();
                }
                let bytes = read_hex(&file);
                assert_eq!(&bytes[..6], b"CSYN\x00\x02", "{file}: magic and version 2");
                assert_eq!(&bytes[6..10], &dict.to_be_bytes(), "{file}: dictionary id");
                let unpacked = match dict {
                    0 => zstd::stream::decode_all(&bytes[10..]).unwrap(),
                    id => {
                        let d = dict::bytes(id).expect("a shipped dictionary");
                        zstd::bulk::Decompressor::with_dictionary(d)
                            .unwrap()
                            .decompress(&bytes[10..], 1 << 20)
                            .unwrap_or_else(|e| {
                                panic!("{file}: does not decompress with dictionary {id}: {e}")
                            })
                    }
                };
                assert_eq!(
                    hex::encode(&unpacked),
                    hex::encode(&payload),
                    "{file}: the frame carries another payload than the frozen one"
                );
                assert_eq!(decode(&bytes, &Limits::default()).unwrap(), msg, "{file}");
            }
            // And v2 decodes to exactly what v1 does.
            let v1 = decode(&encode(&msg).unwrap(), &Limits::default()).unwrap();
            let v2 = encode_as(&msg, LEVEL_FAST, Encoding::V2 { dict: 1, columns }).unwrap();
            assert_eq!(
                decode(&v2, &Limits::default()).unwrap(),
                v1,
                "{name} {form}"
            );
        }
    }
}

/// A shipped dictionary never changes: frames name it by id.
#[test]
fn shipped_dictionary_1_is_frozen() {
    use sha2::Digest;
    let d = dict::bytes(1).expect("dictionary 1 is shipped");
    let sum = hex::encode(sha2::Sha256::digest(d));
    let path = golden("dict1.sha256");
    if !path.exists() && std::env::var_os("CLINICSYNC_BLESS").is_some() {
        std::fs::write(&path, format!("{sum}\n")).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        sum,
        want.trim(),
        "dictionary 1 changed: frames written with it would no longer decode; ship a new dictionary under a new id beside it"
    );
}

fn read_hex(name: &str) -> Vec<u8> {
    let path = golden(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("missing golden file {}", path.display()));
    hex::decode(text.trim()).unwrap_or_else(|e| panic!("{name}: not hex: {e}"))
}

/// Freezes the CBOR of `value` under `name` (`<name>.v1.cbor.hex`): it encodes to the
/// committed bytes, and the committed bytes decode to it and encode back unchanged.
fn check_cbor<T>(name: &str, value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut bytes = Vec::new();
    ciborium::ser::into_writer(value, &mut bytes).unwrap();
    let file = format!("{name}.v1.cbor.hex");
    check(&file, &bytes);
    let want = read_hex(&file);
    let decoded: T = ciborium::de::from_reader(want.as_slice())
        .unwrap_or_else(|e| panic!("{name}: the frozen CBOR no longer decodes: {e}"));
    assert_eq!(
        &decoded, value,
        "{name}: the frozen CBOR decodes to another value"
    );
    let mut again = Vec::new();
    ciborium::ser::into_writer(&decoded, &mut again).unwrap();
    assert_eq!(
        hex::encode(again),
        hex::encode(want),
        "{name}: re-encoding changes the bytes"
    );
}

// ---------------------------------------------------------------- USB bundles

use clinicsync::keys::Identity;
use clinicsync::transport::file::{self, BundleHeader, BundleWriter, Item};

/// The test keys committed beside the bundles (`tests/golden/bundle-keys/`).
fn identity(node: &str) -> Identity {
    let dir = golden("bundle-keys").join(node);
    if !dir.join("signing.key").exists() && std::env::var_os("CLINICSYNC_BLESS").is_some() {
        return Identity::init(&dir, node).unwrap();
    }
    Identity::load(&dir, node).unwrap()
}

fn export_header() -> BundleHeader {
    BundleHeader {
        id: "0123456789abcdef0123456789abcdef".into(),
        kind: "export".into(),
        sender: "clinic-a".into(),
        recipient: "hub".into(),
        seq: 1,
        created_ms: 1_795_000_000_000,
        part_size: 0,
    }
}

fn export_items() -> Vec<Item> {
    vec![
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
    ]
}

/// The hub's answer to the export above, as `sneakernet::import` writes it: the
/// receipts of each push item, then the pull pages the clinic is due.
fn return_header() -> BundleHeader {
    BundleHeader {
        id: "fedcba9876543210fedcba9876543210".into(),
        kind: "return".into(),
        sender: "hub".into(),
        recipient: "clinic-a".into(),
        seq: 1,
        created_ms: 1_795_000_100_000,
        part_size: 0,
    }
}

fn return_items() -> Vec<Item> {
    let r = record();
    vec![
        Item::Receipts(vec![
            Receipt {
                kind: r.kind.clone(),
                id: r.id.clone(),
                vv: r.vv.clone(),
                outcome: Outcome::Accepted,
            },
            Receipt {
                kind: "Patient".into(),
                id: "p1".into(),
                vv: r.vv.clone(),
                outcome: Outcome::Conflict {
                    resolution: "merged".into(),
                    lost: true,
                },
            },
            Receipt {
                kind: "Encounter".into(),
                id: "e1".into(),
                vv: r.vv.clone(),
                outcome: Outcome::Rejected {
                    reason: "patient not in the catchment".into(),
                    permanent: true,
                },
            },
        ]),
        Item::Page(PullResponse {
            records: vec![record()],
            next: Cursor { eff: 11, seq: 11 },
            more: true,
            head: 12,
            orders: Vec::new(),
            bundle_seq: 0,
        }),
        Item::Page(PullResponse {
            records: Vec::new(),
            next: Cursor { eff: 12, seq: 12 },
            more: false,
            head: 12,
            orders: orders(),
            bundle_seq: 1,
        }),
    ]
}

/// Every kind of bundle item, one golden each. A bundle's payload is
/// `zstd(CBOR(Item)…)` encrypted with age, so its bytes are never the same twice;
/// these freeze what is inside, the committed bundles below freeze the envelope.
fn items() -> Vec<(&'static str, Item)> {
    vec![
        ("bundle_item_push", export_items()[0].clone()),
        ("bundle_item_pull_state", export_items()[1].clone()),
        (
            // Since 0.2: the sender's health and its order results ride on the stick.
            "bundle_item_pull_state_health",
            Item::PullState {
                cursor: Cursor { eff: 3, seq: 2 },
                include_own: true,
                health: vec![health_report("clinic-a", None)],
                order_results: vec![order_result()],
            },
        ),
        ("bundle_item_receipts", return_items()[0].clone()),
        ("bundle_item_page", return_items()[1].clone()),
        ("bundle_item_page_orders", return_items()[2].clone()),
        ("bundle_item_end", Item::End { items: 3 }),
    ]
}

#[test]
fn every_bundle_item_kind_is_frozen() {
    for (name, item) in items() {
        check_cbor(name, &item);
    }
}

/// The plaintext a bundle starts with: magic, version, header length, CBOR header.
fn header_bytes(h: &BundleHeader) -> Vec<u8> {
    let mut cbor = Vec::new();
    ciborium::ser::into_writer(h, &mut cbor).unwrap();
    let mut out = b"CSYB\x00\x01".to_vec();
    out.extend((cbor.len() as u32).to_be_bytes());
    out.extend(cbor);
    out
}

/// Writes a frozen bundle if it is missing and blessing was asked for.
fn bless_bundle(base: &str, header: BundleHeader, from: &str, to: &str, items: &[Item]) {
    if golden(&format!("{base}.001")).exists() || std::env::var_os("CLINICSYNC_BLESS").is_none() {
        return;
    }
    let mut w = BundleWriter::create(
        &golden(base),
        header,
        &identity(from),
        &identity(to).public(),
    )
    .unwrap();
    for i in items {
        w.write(i).unwrap();
    }
    w.finish().unwrap();
}

/// A committed bundle: its plaintext header is exactly the frozen one, its trailer
/// is `CSYE | length | signature`, it verifies against the sender's committed key
/// and decrypts to exactly `items`.
fn check_bundle(base: &str, header: &BundleHeader, from: &str, to: &str, items: &[Item]) {
    let path = golden(&format!("{base}.001"));
    let bytes = std::fs::read(&path).unwrap();
    let name = format!("bundle_header_{}", header.kind);
    check(&format!("{name}.v1.hex"), &header_bytes(header));
    let frozen = read_hex(&format!("{name}.v1.hex"));
    assert!(
        bytes.starts_with(&frozen),
        "{base}: the bundle does not start with the frozen {name}"
    );
    let decoded: BundleHeader = ciborium::de::from_reader(&frozen[10..])
        .unwrap_or_else(|e| panic!("{name}: the frozen header no longer decodes: {e}"));
    assert_eq!(
        &decoded, header,
        "{name}: the frozen header decodes to another"
    );
    let mut again = Vec::new();
    ciborium::ser::into_writer(&decoded, &mut again).unwrap();
    assert_eq!(again, frozen[10..], "{name}: re-encoding changes it");
    let (read, _, payload_start) = file::read_header(&path).unwrap();
    assert_eq!(&read, header);
    assert_eq!(payload_start, frozen.len() as u64);
    let trailer = &bytes[bytes.len() - 76..];
    assert_eq!(&trailer[..4], b"CSYE", "{base}: trailer magic");
    let signed = u64::from_be_bytes(trailer[4..12].try_into().unwrap());
    assert_eq!(signed, bytes.len() as u64 - 76, "{base}: trailer length");

    let sender = identity(from).public();
    let trusted = |n: &str| (n == from).then(|| sender.clone());
    let private = tempfile::tempdir().unwrap();
    let v = file::verify(&path, to, &trusted, private.path())
        .unwrap_or_else(|e| panic!("{base}: the frozen bundle no longer verifies: {e}"));
    assert_eq!(&v.header, header);
    let mut r = v.items(&identity(to)).unwrap();
    let mut got = Vec::new();
    while let Some(i) = r.next_item().unwrap() {
        got.push(i);
    }
    assert_eq!(got, items, "{base}: items");
}

/// A version-1 USB export written by an earlier build must still verify and decode.
#[test]
fn a_frozen_v1_bundle_still_verifies_and_decodes() {
    bless_bundle(
        "bundle_v1.csb",
        export_header(),
        "clinic-a",
        "hub",
        &export_items(),
    );
    check_bundle(
        "bundle_v1.csb",
        &export_header(),
        "clinic-a",
        "hub",
        &export_items(),
    );
}

/// The return bundle a hub writes back on the stick (receipts, then pull pages, one
/// with orders) must still verify and decode at the clinic.
#[test]
fn a_frozen_v1_return_bundle_still_verifies_and_decodes() {
    bless_bundle(
        "bundle_return_v1.csb",
        return_header(),
        "hub",
        "clinic-a",
        &return_items(),
    );
    check_bundle(
        "bundle_return_v1.csb",
        &return_header(),
        "hub",
        "clinic-a",
        &return_items(),
    );
}

fn order_result() -> clinicsync::remote::OrderResult {
    clinicsync::remote::OrderResult {
        id: "0f0e0d0c0b0a09080706050403020100".into(),
        state: "done".into(),
        detail: "1 record due now".into(),
    }
}

/// One order of each kind a hub can give.
fn orders() -> Vec<clinicsync::remote::Order> {
    use clinicsync::remote::{Order, OrderKind};
    let kinds = [
        OrderKind::QuarantineRetry { record: None },
        OrderKind::QuarantineRetry {
            record: Some("Patient/p1".into()),
        },
        OrderKind::QuarantineDrop {
            record: "Observation/o1".into(),
        },
        OrderKind::Resync,
        OrderKind::Diagnostics,
        OrderKind::Purge {
            patient: "p7".into(),
        },
    ];
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| Order {
            id: format!("{i:032x}"),
            issued_ms: 1_795_000_000_000 + i as u64,
            by: "hub".into(),
            kind,
        })
        .collect()
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
