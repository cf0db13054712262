//! Fuzz harnesses for every decoder that reads bytes from outside a node (issue #11,
//! item 8). One function per target; each takes arbitrary bytes and must not panic.
//!
//! The same file serves two builds:
//! - the cargo-fuzz targets in `tests/fuzz/fuzz_targets/` (one line each), and
//! - the plain regression test `tests/fuzz_corpus.rs` of the main crate, which
//!   includes this file as a module and runs every committed corpus file and crash
//!   regression through it, so `cargo test` replays them without a fuzzer.
//!
//! Besides "no panic", the harnesses check properties a hostile input must not break:
//! a decoded frame re-encodes to the same message; canonical JSON is a fixed point
//! (a receiver re-deriving a body gets the sender's bytes and hash); a bundle this
//! harness signed verifies; `handle_push` never fails with a store error (hostile
//! input is answered per record, never by aborting the batch), and handling the same
//! push twice accepts nothing the second time (integration is idempotent); the hub
//! never answers 500 to a child.
//!
//! Inputs are shaped so that mutations reach the interesting code: targets that sit
//! behind compression or a signature take the inner bytes and let the harness
//! compress, encrypt and sign them (see each function).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clinicsync::engine::{self, CatchmentRule, EngineError, Policy};
use clinicsync::keys::{Identity, PublicKeys};
use clinicsync::model::{class_of, Class, RecordKey, Snapshot};
use clinicsync::store::Store;
use clinicsync::transport::file::{self, BundleHeader, Item, VerifiedBundle};
use clinicsync::transport::http::{Traffic, TransportError};
use clinicsync::transport::mqtt::Envelope;
use clinicsync::transport::Exchange;
use clinicsync::wire::{self, FetchRequest, Limits, Message, Outcome, PullRequest, WireRecord};
use sha2::{Digest, Sha256};

/// A harness: arbitrary bytes in, a panic for any broken property.
pub type Harness = fn(&[u8]);

/// Every target: name (as in `tests/fuzz/Cargo.toml` and `corpus/<name>/`) and harness.
pub const TARGETS: &[(&str, Harness)] = &[
    ("wire", wire),
    ("wire_v2", wire_v2),
    ("bundle", bundle),
    ("mqtt_envelope", mqtt_envelope),
    ("fhir_json", fhir_json),
    ("openmrs_feed", openmrs_feed),
    ("config", config),
    ("handle_push", handle_push),
    ("hub_answer", hub_answer),
];

/// The child every engine-level target speaks as.
const CHILD: &str = "clinic-a";
/// A fixed "now" for the engine (it takes time as a parameter).
const NOW_MS: u64 = 1_800_000_000_000;
/// Small limits, so that the limit checks themselves are exercised.
const TIGHT: Limits = Limits {
    max_compressed: 2048,
    max_decompressed: 4096,
    max_records: 3,
};

// ------------------------------------------------------------------ helpers

/// A version-1 frame around `cbor` (what a well-behaved encoder would send).
fn frame_of(cbor: &[u8]) -> Vec<u8> {
    let mut out = wire::MAGIC.to_vec();
    out.extend_from_slice(&wire::PROTOCOL_VERSION.to_be_bytes());
    out.extend(zstd::bulk::compress(cbor, 1).expect("zstd compresses any bytes"));
    out
}

/// The first CBOR message in `data`, decoded as the wire decoder does (depth 16).
fn cbor_message(data: &[u8]) -> Option<Message> {
    ciborium::de::from_reader_with_recursion_limit(data, 16).ok()
}

/// A scratch directory for one run, on tmpfs when there is one (SQLite's fsyncs and
/// the bundle files cost nothing there); removed when dropped.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let b = tempfile::Builder::new()
        .prefix("clinicsync-fuzz-")
        .tempdir_in(if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        });
    b.expect("a scratch directory")
}

/// `tests/golden`, from the fuzz crate (`tests/fuzz`) or from the main crate.
fn golden_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let main = here.join("tests/golden");
    if main.is_dir() {
        main
    } else {
        here.join("../golden")
    }
}

struct Keys {
    hub: Identity,
    clinic: Identity,
    clinic_public: PublicKeys,
}

/// The committed test keys of the golden bundle: clinic-a signs, the hub reads.
fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = golden_dir().join("bundle-keys");
        let hub = Identity::load(&dir.join("hub"), "hub").expect("golden hub keys");
        let clinic = Identity::load(&dir.join("clinic-a"), CHILD).expect("golden clinic-a keys");
        let clinic_public = clinic.public();
        Keys {
            hub,
            clinic,
            clinic_public,
        }
    })
}

/// A hub's policy with catchment rules, so Patient versions run the rule matcher.
fn hub_policy() -> Policy {
    let mut p = Policy::new("hub", true);
    p.catchment = vec![
        CatchmentRule {
            node: CHILD.into(),
            path: "address.district".into(),
            equals: "North".into(),
        },
        CatchmentRule {
            node: "clinic-b".into(),
            path: "managingOrganization.reference".into(),
            equals: "Organization/o1".into(),
        },
    ];
    p
}

/// What every receiver does with a record: re-derive it from its body. When that
/// works, deriving again from the canonical body must give the same version.
fn check_record(rec: &WireRecord) {
    let Ok(v) = rec.clone().into_version() else {
        return;
    };
    assert_eq!(v.snapshot.class, class_of(&v.snapshot.key.kind));
    let again = WireRecord::from_version(&v)
        .into_version()
        .expect("a canonical body derives again");
    assert_eq!(again, v, "canonical form is not a fixed point");
}

/// Properties of any message a decoder accepted.
fn check_message(msg: &Message, limits: &Limits) {
    let bytes = wire::encode(msg).expect("a decoded message encodes");
    let back = wire::decode(&bytes, &Limits::default()).expect("our own frame decodes");
    assert_eq!(&back, msg, "decode(encode(m)) != m");
    let cbor = wire::to_cbor(msg).expect("a decoded message encodes");
    assert!(cbor.len() <= limits.max_decompressed);
    let records: Vec<&WireRecord> = match msg {
        Message::PushRequest(m) => m.records.iter().collect(),
        Message::PullResponse(m) => m.records.iter().collect(),
        Message::FetchResponse(m) => m.results.iter().filter_map(|r| r.record.as_ref()).collect(),
        _ => Vec::new(),
    };
    assert!(records.len() <= limits.max_records);
    for r in records {
        check_record(r);
    }
}

// ------------------------------------------------------------------ targets

/// `wire::decode` within its limits. Input starting with `CSYN` is taken as a frame
/// (header, zstd and limit paths); anything else as the CBOR payload, which the
/// harness frames so that mutations reach the message decoder.
pub fn wire(data: &[u8]) {
    let frame = if data.starts_with(wire::MAGIC) {
        data.to_vec()
    } else {
        frame_of(data)
    };
    let _ = wire::check_header(&frame);
    for limits in [Limits::default(), TIGHT] {
        if let Ok(msg) = wire::decode(&frame, &limits) {
            check_message(&msg, &limits);
        }
    }
}

/// The protocol v2 decoder (`wire::v2`). Input starting with `CSYN` is taken as a
/// frame; anything else is a v2 payload (skeleton and record block) whose first
/// byte picks how the harness frames it: even, without a dictionary; odd, compressed
/// with dictionary 1 (so mutations of the block reach the column decoder either
/// way). A decoded message must encode again as v2 (with and without the
/// dictionary) and as v1, each decoding back to the same message.
pub fn wire_v2(data: &[u8]) {
    let frame = if data.starts_with(wire::MAGIC) {
        data.to_vec()
    } else {
        let Some((&mode, payload)) = data.split_first() else {
            return;
        };
        let dict = u32::from(mode & 1);
        let mut out = wire::MAGIC.to_vec();
        out.extend_from_slice(&wire::PROTOCOL_V2.to_be_bytes());
        out.extend_from_slice(&dict.to_be_bytes());
        let packed = match wire::dict::bytes(dict) {
            Some(d) => {
                zstd::bulk::Compressor::with_dictionary(1, d).and_then(|mut c| c.compress(payload))
            }
            None => zstd::bulk::compress(payload, 1),
        };
        out.extend(packed.expect("zstd compresses any bytes"));
        out
    };
    for limits in [Limits::default(), TIGHT] {
        if let Ok(msg) = wire::decode(&frame, &limits) {
            check_message(&msg, &limits);
            for (dict, columns) in [(0, false), (wire::dict::newest(), true)] {
                let again = wire::encode_as(&msg, 3, wire::Encoding::V2 { dict, columns })
                    .expect("a decoded message encodes as v2");
                let back = wire::decode(&again, &Limits::default()).expect("our v2 frame decodes");
                assert_eq!(back, msg, "v2 decode(encode(m)) != m");
            }
        }
    }
}

/// USB bundles. The first byte picks the mode; the rest is:
/// - mode 0: the bundle file itself (split into 1-3 parts): header parsing, part
///   checks, trailer and signature checks (`read_header`, `verify`);
/// - mode 1: the zstd stream inside the encryption, which the harness encrypts to
///   the hub and signs as clinic-a (a trusted sender), so `verify` must accept it and
///   the item reader runs over hostile plaintext;
/// - mode 2: the CBOR item stream, compressed, encrypted and signed by the harness.
pub fn bundle(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let k = keys();
    let dir = scratch();
    let base = dir.path().join("b.csb");
    let trusted = |n: &str| (n == CHILD).then(|| k.clinic_public.clone());
    match sel % 3 {
        0 => {
            let parts = 1 + (sel as usize / 3) % 3;
            let size = rest.len().div_ceil(parts).max(1);
            for (i, piece) in rest.chunks(size).enumerate() {
                std::fs::write(dir.path().join(format!("b.csb.{:03}", i + 1)), piece)
                    .expect("write a part");
            }
            if rest.is_empty() {
                std::fs::write(dir.path().join("b.csb.001"), b"").expect("write a part");
            }
            let first = dir.path().join("b.csb.001");
            let _ = file::find_parts(&base);
            let _ = file::read_header(&first);
            if let Ok(v) = file::verify(&first, "hub", &trusted, &dir.path().join("private")) {
                drain(&v, &k.hub);
            }
        }
        mode => {
            let zstd_stream = if mode == 1 {
                rest.to_vec()
            } else {
                zstd::bulk::compress(rest, 1).expect("zstd compresses any bytes")
            };
            let header = BundleHeader {
                id: "0123456789abcdef0123456789abcdef".into(),
                kind: "export".into(),
                sender: CHILD.into(),
                recipient: "hub".into(),
                seq: 1,
                created_ms: NOW_MS,
                part_size: 0,
            };
            let path = dir.path().join("b.csb.001");
            std::fs::write(&path, signed_bundle(&header, &zstd_stream, k)).expect("write");
            let v = file::verify(&path, "hub", &trusted, &dir.path().join("private"))
                .expect("a bundle signed by a trusted key verifies");
            assert_eq!(v.header, header);
            drain(&v, &k.hub);
        }
    }
}

/// A bundle stream around an already-compressed payload, encrypted and signed as
/// `BundleWriter` does.
fn signed_bundle(header: &BundleHeader, zstd_stream: &[u8], k: &Keys) -> Vec<u8> {
    let mut head = Vec::new();
    ciborium::ser::into_writer(header, &mut head).expect("a header encodes");
    let mut out = file::MAGIC.to_vec();
    out.extend_from_slice(&file::VERSION.to_be_bytes());
    out.extend_from_slice(&(head.len() as u32).to_be_bytes());
    out.extend_from_slice(&head);
    let recipient = k.hub.public().age;
    let enc = age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
        .expect("one recipient");
    let mut w = enc.wrap_output(&mut out).expect("encrypt into memory");
    w.write_all(zstd_stream).expect("encrypt into memory");
    w.finish().expect("encrypt into memory");
    let digest: [u8; 32] = Sha256::digest(&out).into();
    let len = out.len() as u64;
    use ed25519_dalek::Signer;
    let sig = k.clinic.signing.sign(&digest);
    out.extend_from_slice(file::TRAILER_MAGIC);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&sig.to_bytes());
    out
}

/// Reads every item of a verified bundle, as an import does (bounded).
fn drain(v: &VerifiedBundle, me: &Identity) {
    let Ok(mut items) = v.items(me) else {
        return;
    };
    for _ in 0..10_000 {
        match items.next_item() {
            Ok(Some(Item::Push(req))) => req.records.iter().for_each(check_record),
            Ok(Some(Item::Page(page))) => page.records.iter().for_each(check_record),
            Ok(Some(_)) => {}
            Ok(None) => {
                assert!(matches!(items.next_item(), Ok(None)), "items after End");
                return;
            }
            Err(_) => return,
        }
    }
}

/// The MQTT envelope, and the frame inside a request or answer.
pub fn mqtt_envelope(data: &[u8]) {
    let Ok(env) = Envelope::decode(data) else {
        return;
    };
    assert_eq!(
        Envelope::decode(&env.encode()).as_ref(),
        Ok(&env),
        "decode(encode(e)) != e"
    );
    if let Envelope::Request { frame, .. }
    | Envelope::Answer { frame, .. }
    | Envelope::RequestAnnounced { frame, .. } = &env
    {
        if let Ok(msg) = wire::decode(frame, &Limits::default()) {
            check_message(&msg, &Limits::default());
        }
    }
}

/// FHIR JSON intake: canonical form, key, class and patient derived from a body
/// (what an EMR adapter's fetch and every receiver do), plus the small parsers that
/// read ids and error bodies.
pub fn fhir_json(data: &[u8]) {
    if let Ok(s) = Snapshot::from_json_bytes(data) {
        assert_eq!(s.class, s.key.class());
        assert_eq!(s.hash, clinicsync::model::ContentHash::of(&s.body));
        if s.class == Class::Metadata {
            assert_eq!(s.patient, None);
        }
        if let Some(p) = &s.patient {
            assert!(RecordKey::new("Patient", p).is_ok(), "patient id {p:?}");
        }
        assert_eq!(RecordKey::parse(&s.key.to_string()).as_ref(), Ok(&s.key));
        let again = Snapshot::for_key(&s.key, &s.body).expect("a canonical body parses");
        assert_eq!(again, s, "canonical form is not a fixed point");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = RecordKey::parse(text);
        let _ = clinicsync::emr::operation_outcome_text(text);
        let _ = clinicsync::model::VersionVector::from_json(text);
        // Three-way merge, as conflict resolution runs it on three bodies.
        if let Ok(serde_json::Value::Array(v)) = serde_json::from_str::<serde_json::Value>(text) {
            if let [a, l, r] = v.as_slice() {
                let _ = clinicsync::model::changed_fields(a, l);
                if let Some(m) = clinicsync::model::merge_fields(a, l, r) {
                    assert!(m.is_object());
                }
            }
        }
    }
}

/// The OpenMRS atom feed parser and the record key read from an entry's content.
pub fn openmrs_feed(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    use clinicsync::emr::openmrs::{key_of_content, parse_feed};
    if let Ok(page) = parse_feed(text) {
        for e in &page.entries {
            assert!(!e.id.is_empty());
            let _ = key_of_content(&e.content);
        }
    }
    let _ = key_of_content(text);
}

/// The configuration file, and what the daemon derives from a valid one (no file is
/// read: paths in the config are only looked at, never opened).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    use clinicsync::config::{self, Config};
    use clinicsync::secret::Secret;
    for line in text.lines() {
        let _ = PublicKeys::parse(line);
    }
    let Ok(cfg) = Config::parse(text, Path::new("/etc/clinicsync/clinicsync.toml")) else {
        return;
    };
    let _ = cfg.policy();
    let _ = cfg.role();
    let _ = cfg.keys_dir();
    let _ = cfg.timeout();
    if let Some(m) = &cfg.mqtt {
        let _ = clinicsync::transport::mqtt::MqttSettings::from_url(
            &m.url,
            CHILD,
            Secret::new("x".into()),
            None,
            m.max_message_bytes,
        );
    }
    if let Some(w) = config::parse_window(&cfg.sync.bulk_window) {
        for ms in [0, 59_999, 3_600_000, NOW_MS, u64::MAX] {
            let _ = config::in_window(w, ms);
        }
    }
}

/// The hub's push handling on a fresh in-memory store. Input: a CBOR `Message`
/// (a push request; the harness plays the transport, authenticated as clinic-a).
pub fn handle_push(data: &[u8]) {
    let Some(Message::PushRequest(req)) = cbor_message(data) else {
        return;
    };
    let mut store = Store::open(Path::new(":memory:"), "hub").expect("an in-memory store");
    let policy = hub_policy();
    let first = match engine::handle_push(&mut store, &policy, CHILD, req.clone(), NOW_MS) {
        Ok(r) => r,
        Err(EngineError::Forbidden(_)) if req.node != CHILD => return,
        Err(e) => panic!("handle_push failed on hostile input: {e:?}"),
    };
    assert_eq!(first.results.len(), req.records.len());
    for (i, (r, rec)) in first.results.iter().zip(&req.records).enumerate() {
        assert_eq!(r.i as usize, i);
        assert_eq!(r.vv, rec.vv);
    }
    // The same push again (a retry after a lost answer) accepts nothing new.
    let again = engine::handle_push(&mut store, &policy, CHILD, req.clone(), NOW_MS + 1)
        .unwrap_or_else(|e| panic!("handle_push failed on a re-sent push: {e:?}"));
    for (a, b) in first.results.iter().zip(&again.results) {
        match (&a.outcome, &b.outcome) {
            (Outcome::Rejected { reason: x, .. }, Outcome::Rejected { reason: y, .. }) => {
                assert_eq!(x, y)
            }
            (_, Outcome::Duplicate | Outcome::Stale) => {}
            (x, y) => panic!("record {} was {x:?}, then {y:?} when re-sent", a.i),
        }
    }
    match store.verify_audit() {
        Ok(clinicsync::store::AuditCheck::Intact { .. }) => {}
        other => panic!("audit chain after a push: {other:?}"),
    }
    // What the child and another node may read back.
    for (node, include_own) in [(CHILD, true), ("clinic-b", false)] {
        let pull = PullRequest {
            node: node.into(),
            cursor: Default::default(),
            max_bytes: 1 << 20,
            max_records: 1000,
            include_own,
            answer_chunk: 0,
            health: Vec::new(),
            order_results: Vec::new(),
        };
        let page = engine::handle_pull(&store, &policy, node, &pull)
            .unwrap_or_else(|e| panic!("handle_pull after a hostile push: {e:?}"));
        page.records.iter().for_each(check_record);
        let fetch = FetchRequest {
            node: node.into(),
            keys: req
                .records
                .iter()
                .map(|r| (r.kind.clone(), r.id.clone()))
                .collect(),
        };
        engine::handle_fetch(&store, node, &fetch)
            .unwrap_or_else(|e| panic!("handle_fetch after a hostile push: {e:?}"));
    }
}

/// A child talking to a hub in process: `HubState::answer` (decode, dispatch,
/// transfers) on a fresh store. Input: a CBOR sequence of up to 16 messages. Requests
/// (push, pull, fetch) go through the real chunked client with 1 KiB chunks, so a
/// push over 1 KiB is uploaded as a transfer and a pull's answer comes in pieces;
/// every other message goes to the hub as a raw frame (hostile chunk messages; a
/// chunk whose checksum is all zeros gets the right one, so its data is stored).
pub fn hub_answer(data: &[u8]) {
    let mut reader = data;
    let mut msgs = Vec::new();
    while !reader.is_empty() && msgs.len() < 16 {
        match ciborium::de::from_reader_with_recursion_limit::<Message, _>(&mut reader, 16) {
            Ok(m) => msgs.push(m),
            Err(_) => break,
        }
    }
    if msgs.is_empty() {
        return;
    }
    let dir = scratch();
    let hub = clinicsync::hub::HubState::new(
        &dir.path().join("hub.db"),
        hub_policy(),
        vec![(CHILD.into(), [0; 32])],
        1 << 20,
    )
    .expect("a hub store");
    let link = Loopback { hub: &hub };
    for msg in msgs {
        let path = match &msg {
            Message::PushRequest(_) => Some("/v1/push"),
            Message::PullRequest(_) => Some("/v1/pull"),
            Message::FetchRequest(_) => Some("/v1/fetch"),
            _ => None,
        };
        match path {
            Some(path) => {
                let mut chunked = clinicsync::transport::chunked::Chunked::new(&link, 1024);
                chunked.retries = 0;
                match chunked.exchange(path, &msg) {
                    Ok((answer, _)) => check_message(&answer, &Limits::default()),
                    Err(TransportError::Status { status, message }) => {
                        assert_ne!(status, 500, "hub answered 500: {message}")
                    }
                    Err(_) => {}
                }
            }
            None => {
                let msg = match msg {
                    Message::ChunkPut(mut c) if c.sha == [0; 32] => {
                        c.sha = Sha256::digest(&c.data).into();
                        Message::ChunkPut(c)
                    }
                    other => other,
                };
                let frame = wire::encode(&msg).expect("a decoded message encodes");
                if let Err(r) = hub.answer(CHILD, &frame, None) {
                    assert_ne!(r.status, 500, "hub answered 500: {}", r.reason);
                }
            }
        }
    }
}

/// The hub's `answer` as a transport: what HTTP and MQTT carry, without a socket.
struct Loopback<'a> {
    hub: &'a clinicsync::hub::HubState,
}

impl Exchange for Loopback<'_> {
    fn exchange(&self, path: &str, msg: &Message) -> Result<(Message, Traffic), TransportError> {
        let frame = wire::encode(msg)?;
        let expect = match path {
            "/v1/push" => Some("push_request"),
            "/v1/pull" => Some("pull_request"),
            "/v1/fetch" => Some("fetch_request"),
            "/v1/chunk" => Some("chunk"),
            _ => None,
        };
        match self.hub.answer(CHILD, &frame, expect) {
            Ok(answer) => {
                let bytes = wire::encode(&answer)?;
                let back = wire::decode(&bytes, &Limits::default())?;
                Ok((
                    back,
                    Traffic {
                        sent: frame.len() as u64,
                        received: bytes.len() as u64,
                    },
                ))
            }
            Err(r) => Err(TransportError::Status {
                status: r.status,
                message: r.reason,
            }),
        }
    }
}
