//! The wire format: protocol messages as CBOR, compressed with zstd, behind a
//! fixed header that names the protocol version.
//!
//! Frame, protocol version 1:
//! ```text
//! struct FrameV1 {
//!     magic:   [u8; 4] = b"CSYN",
//!     version: u16 (big endian) = 1,
//!     payload: zstd frame of CBOR(Message),   // serde externally tagged enum
//! }
//! ```
//! Frame, protocol version 2 ([`v2`]): the same messages, with their records taken
//! out of the CBOR and sent as columns, and a zstd dictionary for FHIR ([`dict`]):
//! ```text
//! struct FrameV2 {
//!     magic:   [u8; 4] = b"CSYN",
//!     version: u16 (big endian) = 2,
//!     dict:    u32 (big endian),              // 0: none; else a dict::SHIPPED id
//!     payload: zstd frame (with that dictionary) of Payload,
//! }
//! struct Payload {
//!     skeleton_len: varint, skeleton: CBOR(Message with every record list empty
//!                                          and every optional record None),
//!     block: RecordBlock,                     // ends exactly at the payload's end
//! }
//! struct RecordBlock {                        // varint = LEB128; zz = zigzag varint
//!     lists:   varint n, counts: [varint; n], // one per place v2::record_slots names
//!     flags:   u8,                            // bit 0: bodies newline-ended;
//!                                             // bit 1: bodies as shapes and columns;
//!                                             // bit 2: push results follow the bodies
//!     kinds:   varint k, [varint len, utf8]*k,        // first appearance order
//!     nodes:   varint m, [varint len, utf8]*m,        // origins and vector nodes
//!     kind:    [varint index into kinds; N],  // N = sum of counts
//!     origin:  [varint index into nodes; N],
//!     id:      [varint; N],                   // k >= 1: the value after the k-th
//!                                             // `"id":"` of its own body; 0: then
//!                                             // varint len + utf8, spelled out
//!     hlc:     varint base (earliest wall ms), then per record zz(wall - previous
//!              wall, from base), and the counter: zz(counter - previous counter)
//!              when the wall is the same, else varint counter,
//!     vv:      per record varint e, then e × (varint node index,
//!              zz(counter - that node's previous counter in the block)),
//!              nodes in name order,
//!     deleted: [u8; ceil(N/8)],               // bit i%8 of byte i/8; spare bits 0
//!     lengths: [varint; N] unless flags bit 0 or 1,
//!     bodies:  the bodies grouped by kind index (record order within a kind),
//!              each followed by b'\n' when flags bit 0; with bit 1, in the same
//!              order as shape::Bodies (each body's shape, and its values in one
//!              column per kind and path; see [`shape`]),
//!     results: with flags bit 2 (a push or sync answer whose skeleton then has
//!              no results): varint n, nodes table, per result zz(i - previous i),
//!              outcome u8 (0 accepted, 1 duplicate, 2 stale, 3/4 conflict kept/lost
//!              + resolution text, 5/6 rejected retryable/permanent + reason text),
//!              and its vector as the record block's vv column,
//! }
//! ```
//! The version sits in front of the compressed payload so a node can refuse a frame
//! from a newer peer before it spends a byte of memory on decompression.
//!
//! Which version a frame uses is negotiated per exchange ([`accept`]): a node
//! announces what it reads; a v2 frame goes only to a peer that announced v2, with
//! the newest dictionary both announced, and bodies as shapes and columns only to a
//! peer that announced `columns`. Every node decodes both versions.
//!
//! Invariants
//! - Every decoder bounds what it reads: compressed size, decompressed size (the zstd
//!   window too), CBOR nesting depth and the number of records in a message. A v2
//!   block also checks every count against [`Limits::max_records`] and the bytes left
//!   before allocating, every index against its table, every length against the
//!   bytes left, and what the decoded records cost in memory against
//!   [`Limits::max_decompressed`], so a small block cannot expand into a message
//!   larger than a v1 frame under the same limits could.
//! - A v2 frame decodes to exactly the message its v1 frame decodes to (tests and
//!   goldens check both). A message outside v2's table bounds goes as v1.
//! - Record bodies travel as the canonical JSON text of [`crate::model::Snapshot`];
//!   the receiver recomputes hash, class and patient from the body and never trusts
//!   a sender's claim about them.
//! - Message shapes are frozen by golden tests (`tests/golden/`); a change of shape
//!   is a new protocol version, and old versions still decode or fail with
//!   [`WireError::UnsupportedVersion`]. A shipped dictionary never changes.
//!
//! Errors leave nothing behind: decoding is pure. All are permanent for the bytes
//! given (sending the same bytes again fails the same way): a newer version
//! ([`WireError::UnsupportedVersion`]), a dictionary this build does not ship
//! ([`WireError::UnknownDictionary`]: never decoded without it), a record block that
//! does not hold together ([`WireError::Block`], naming the column and the record).

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::model::{Hlc, ModelError, RecordKey, Snapshot, Version, VersionVector};

pub mod accept;
pub mod chain;
pub mod dict;
pub mod health;
pub mod level;
pub mod orders;
pub mod shape;
pub mod v2;

pub use accept::{Accept, Encoding};

pub const MAGIC: &[u8; 4] = b"CSYN";
/// Protocol version 1 (the CBOR message, zstd without a dictionary).
pub const PROTOCOL_VERSION: u16 = 1;
/// Protocol version 2 (skeleton and column record block, optional dictionary).
pub const PROTOCOL_V2: u16 = 2;
/// The newest version this node decodes.
pub const NEWEST_VERSION: u16 = PROTOCOL_V2;
const HEADER_LEN: usize = 6;
/// CBOR nesting allowed in a message. Our messages nest at most 5 deep (bodies
/// are opaque text), so anything deeper is an attack or a bug.
const MAX_DEPTH: usize = 16;
/// Largest zstd window accepted (2^24 = 16 MiB), whatever the frame header asks for.
const MAX_WINDOW_LOG: u32 = 24;
pub const CONTENT_TYPE: &str = "application/vnd.clinicsync.v1+cbor+zstd";
/// The most a parent sends of an answer in one piece (the first piece inline, each
/// `ChunkGet`), whatever a child asks: every hub so far. A child fetching larger
/// pieces would place the next one at the wrong offset.
pub const MAX_ANSWER_PIECE: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message too short ({0} bytes) to hold the clinicsync header")]
    TooShort(usize),
    #[error("not a clinicsync message (bad magic bytes)")]
    BadMagic,
    #[error("protocol version {got} is not supported (this node speaks versions 1 to {supported}); upgrade the older node")]
    UnsupportedVersion { got: u16, supported: u16 },
    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("message is not valid zstd: {0}")]
    Decompress(String),
    #[error("message is not a valid clinicsync CBOR message: {0}")]
    Decode(String),
    #[error("message carries {count} records, over the limit of {limit}")]
    TooManyRecords { count: usize, limit: usize },
    #[error("could not encode message: {0}")]
    Encode(String),
    /// A v2 frame compressed with a dictionary this node does not ship (a newer
    /// peer that ignored what this node announced).
    #[error("message uses zstd dictionary {0}, which this node does not have (it has {known}); the sender must use a dictionary this node announced", known = dict::known())]
    UnknownDictionary(u32),
    /// A chained v2 frame whose prefix (an earlier request's payload) this node does
    /// not hold: the hub restarted or let it go. The sender sends it again unchained.
    #[error("message refers to an earlier message ({0}) this node does not hold (any more); send it again without the reference")]
    UnknownPrefix(String),
    /// A v2 record block that does not hold together; names what and which record.
    #[error("message has a broken record block: {0}")]
    Block(String),
}

/// Every wire error is a property of the bytes: sending them again fails again.
impl crate::error::Classify for WireError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            WireError::TooShort(_)
            | WireError::BadMagic
            | WireError::UnsupportedVersion { .. }
            | WireError::TooLarge { .. }
            | WireError::Decompress(_)
            | WireError::Decode(_)
            | WireError::TooManyRecords { .. }
            | WireError::Encode(_)
            | WireError::UnknownDictionary(_)
            | WireError::UnknownPrefix(_)
            | WireError::Block(_) => crate::error::ErrorClass::Permanent,
        }
    }
}

impl WireError {
    /// [`crate::error::Classify::is_retryable`], here so callers need no import.
    pub fn is_retryable(&self) -> bool {
        crate::error::Classify::is_retryable(self)
    }
}

/// Bounds a decoder enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_compressed: usize,
    pub max_decompressed: usize,
    pub max_records: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_compressed: 16 << 20,
            max_decompressed: 64 << 20,
            max_records: 20_000,
        }
    }
}

/// One version of a record on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRecord {
    pub kind: String,
    pub id: String,
    pub origin: String,
    pub hlc: Hlc,
    pub vv: VersionVector,
    pub deleted: bool,
    /// Canonical JSON of the resource.
    pub body: String,
}

impl WireRecord {
    pub fn from_version(v: &Version) -> WireRecord {
        WireRecord {
            kind: v.snapshot.key.kind.clone(),
            id: v.snapshot.key.id.clone(),
            origin: v.origin.clone(),
            hlc: v.hlc,
            vv: v.vv.clone(),
            deleted: v.deleted,
            body: String::from_utf8_lossy(&v.snapshot.body).into_owned(),
        }
    }

    /// [`WireRecord::from_version`] taking the version apart instead of copying it: a
    /// batch read from the outbox becomes the batch sent without a second copy of
    /// its bodies.
    pub fn from_owned_version(v: Version) -> WireRecord {
        let body = match String::from_utf8(v.snapshot.body) {
            Ok(body) => body,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        WireRecord {
            kind: v.snapshot.key.kind,
            id: v.snapshot.key.id,
            origin: v.origin,
            hlc: v.hlc,
            vv: v.vv,
            deleted: v.deleted,
            body,
        }
    }

    /// Re-derives everything from the body; refuses a body that names another record.
    pub fn into_version(self) -> Result<Version, ModelError> {
        let key = RecordKey::new(&self.kind, &self.id)?;
        let snapshot = Snapshot::for_key(&key, self.body.as_bytes())?;
        Ok(Version {
            snapshot,
            origin: self.origin,
            hlc: self.hlc,
            vv: self.vv,
            deleted: self.deleted,
        })
    }

    pub fn key_string(&self) -> String {
        format!("{}/{}", self.kind, self.id)
    }
}

/// The hub's answer for one pushed record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Stored as the new current version.
    Accepted,
    /// The hub already holds exactly this version.
    Duplicate,
    /// The hub holds a newer version that includes this one.
    Stale,
    /// Concurrent with the hub's version; resolved by policy, both kept. `lost`: the
    /// sender's content did not survive (the hub's won); since 0.2, omitted when
    /// false, so older peers read it and every frozen message is unchanged.
    Conflict {
        resolution: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        lost: bool,
    },
    /// Refused; the record goes to the sender's quarantine.
    Rejected { reason: String, permanent: bool },
}

impl Outcome {
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Stale => "stale",
            Outcome::Conflict { .. } => "conflict",
            Outcome::Rejected { .. } => "rejected",
        }
    }
}

/// The answer for the record at position `i` of the push request. Positions keep
/// answers a few bytes long on slow links; the vector names the version answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushResult {
    pub i: u32,
    /// The version this result answers for, as the sender sent it.
    pub vv: VersionVector,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// A parent's answer for one record, naming the record (used where the request is
/// not at hand, such as a USB return bundle).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub kind: String,
    pub id: String,
    pub vv: VersionVector,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// A position in a node's feed for one child: records are ordered by the sequence
/// at which they became visible to that child (`eff`), then by their own `seq`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Cursor {
    pub eff: u64,
    pub seq: u64,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.eff, self.seq)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRequest {
    pub node: String,
    pub records: Vec<WireRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushResponse {
    pub results: Vec<PushResult>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    pub node: String,
    pub cursor: Cursor,
    pub max_bytes: u64,
    pub max_records: u32,
    /// Also send versions this child wrote itself (a wiped child restoring).
    pub include_own: bool,
    /// When non-zero, an answer larger than this comes back as a transfer: its first
    /// `answer_chunk` bytes as a `ChunkData`, the rest fetched with `ChunkGet`, so a
    /// cut costs at most a chunk and the pull costs one round trip. Zero (and absent,
    /// as older clients send it) answers in one piece. Added in 0.2 within v1: an
    /// older hub ignores the field and answers in one piece.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub answer_chunk: u64,
    /// The sender's health report and, from a district hub, those of the nodes
    /// below it that arrived since its last pull (`crate::health`). Added in 0.2
    /// within v1: absent from older clients, ignored by older hubs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health: Vec<health::HealthReport>,
    /// Results of the parent's orders this node ran (`crate::remote`). Added in 0.2
    /// within v1, like `health`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub order_results: Vec<orders::OrderResult>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullResponse {
    pub records: Vec<WireRecord>,
    pub next: Cursor,
    /// True when more records are waiting after `next`.
    pub more: bool,
    /// The parent's newest sequence number, so the child can show its lag.
    pub head: u64,
    /// Orders from the parent (`crate::remote`), sent until their results come
    /// back. Added in 0.2 within v1: absent when none, ignored by older children.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orders: Vec<orders::Order>,
    /// The last USB bundle this parent imported from the child (0: none), so a child
    /// reinstalled with its old keys numbers its next bundle after it. Added in 0.2
    /// within v1, omitted when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bundle_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub node: String,
    pub keys: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchResult {
    pub kind: String,
    pub id: String,
    pub record: Option<WireRecord>,
    /// Why the record was not given (not found, not in the catchment).
    pub refused: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchResponse {
    pub results: Vec<FetchResult>,
}

/// A push batch and the first pull request of a round in one exchange: a sync costs
/// one round trip, not two. The parent applies the push first (committed), then
/// answers the pull; its answer carries both. Added in 0.3 within v1: an older parent
/// refuses it (404 on `/v1/sync`, or a decode error naming `sync_request`), and the
/// child falls back to a push and a pull.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub push: PushRequest,
    pub pull: PullRequest,
}

/// The answer to a [`SyncRequest`]: the push's results, then the first pull page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    pub push: PushResponse,
    pub pull: PullResponse,
}

/// Every message of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    PushRequest(PushRequest),
    PushResponse(PushResponse),
    PullRequest(PullRequest),
    PullResponse(PullResponse),
    FetchRequest(FetchRequest),
    FetchResponse(FetchResponse),
    /// Resumable transfer of a frame larger than one chunk (see [`Chunk`]).
    ChunkPut(ChunkPut),
    ChunkQuery(ChunkRef),
    ChunkRun(ChunkRef),
    ChunkGet(ChunkGet),
    ChunkAck(ChunkAck),
    ChunkReady(ChunkAck),
    ChunkData(ChunkPut),
    /// Added in 0.3 within v1 (see [`SyncRequest`]).
    SyncRequest(SyncRequest),
    SyncResponse(SyncResponse),
}

/// A piece of a large frame. Transfers are named by the SHA-256 of the whole frame
/// (so a sender that rebuilds the same frame after a restart resumes it) and are
/// private to the node that made them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkPut {
    #[serde(with = "serde_bytes_array")]
    pub id: [u8; 32],
    pub total: u64,
    pub offset: u64,
    #[serde(with = "serde_bytes_vec")]
    pub data: Vec<u8>,
    /// SHA-256 of `data`: a corrupted chunk is refused, not stored.
    #[serde(with = "serde_bytes_array")]
    pub sha: [u8; 32],
    /// On the piece that completes an upload: run it now and answer as `ChunkRun`
    /// with this `answer_chunk` would, saving the round trip of a separate
    /// `ChunkRun`. Zero (and absent): only acknowledge. Added in 0.3 within v1,
    /// omitted when zero; an older hub ignores it and acknowledges, and the sender
    /// then runs the upload as before.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub run: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    #[serde(with = "serde_bytes_array")]
    pub id: [u8; 32],
    pub total: u64,
    /// On a `ChunkRun`: an answer larger than this comes as `ChunkReady` (fetched in
    /// pieces) rather than inline, so a link that drops every few KiB still gets it.
    /// Zero (and absent, as older clients send it): the hub's own piece size. Added
    /// in 0.3 within v1, omitted when zero, so earlier messages encode unchanged.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub answer_chunk: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkGet {
    #[serde(with = "serde_bytes_array")]
    pub id: [u8; 32],
    pub offset: u64,
    pub max: u64,
}

/// How much of a transfer the receiver holds (`ChunkAck`), or that an answer is
/// ready to be fetched in chunks (`ChunkReady`: `received` is its length).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkAck {
    #[serde(with = "serde_bytes_array")]
    pub id: [u8; 32],
    pub received: u64,
}

mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        ciborium::value::Value::deserialize(d)?
            .into_bytes()
            .map_err(|_| serde::de::Error::custom("expected a byte string"))
    }
}

mod serde_bytes_array {
    use serde::{Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let v = super::serde_bytes_vec::deserialize(d)?;
        <[u8; 32]>::try_from(v.as_slice())
            .map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::PushRequest(_) => "push_request",
            Message::PushResponse(_) => "push_response",
            Message::PullRequest(_) => "pull_request",
            Message::PullResponse(_) => "pull_response",
            Message::FetchRequest(_) => "fetch_request",
            Message::FetchResponse(_) => "fetch_response",
            Message::ChunkPut(_) => "chunk_put",
            Message::ChunkQuery(_) => "chunk_query",
            Message::ChunkRun(_) => "chunk_run",
            Message::ChunkGet(_) => "chunk_get",
            Message::ChunkAck(_) => "chunk_ack",
            Message::ChunkReady(_) => "chunk_ready",
            Message::ChunkData(_) => "chunk_data",
            Message::SyncRequest(_) => "sync_request",
            Message::SyncResponse(_) => "sync_response",
        }
    }

    fn record_count(&self) -> usize {
        match self {
            Message::PushRequest(m) => m.records.len(),
            Message::PushResponse(m) => m.results.len(),
            Message::PullRequest(_) => 0,
            Message::PullResponse(m) => m.records.len(),
            Message::FetchRequest(m) => m.keys.len(),
            Message::FetchResponse(m) => m.results.len(),
            Message::SyncRequest(m) => m.push.records.len(),
            Message::SyncResponse(m) => m.push.results.len() + m.pull.records.len(),
            _ => 0,
        }
    }
}

/// CBOR of a message, without compression or header: what golden tests freeze.
pub fn to_cbor(msg: &Message) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(msg, &mut out).map_err(|e| WireError::Encode(e.to_string()))?;
    Ok(out)
}

/// zstd level of ordinary frames: fast, and small in memory on a clinic's box. A
/// clinic's push frames go at the level its link pays for ([`level::choose`]): this
/// one until it measured the link.
pub const LEVEL_FAST: i32 = 3;
/// zstd level of the hub's large answers (pull pages): FHIR compresses ~15 % smaller
/// than at level 3, within ~13 % of level 19 at ~1/50 of its CPU. It needs tens of
/// MiB of tables for a large page, which a hub has and a clinic's box may not; the
/// clinic only decodes, which costs the same at any level.
pub const LEVEL_BULK: i32 = 9;

/// Encodes a message as a version-1 frame.
pub fn encode(msg: &Message) -> Result<Vec<u8>, WireError> {
    encode_with(msg, LEVEL_FAST)
}

/// Encodes a message as a version-1 frame at a given zstd level (the level is the
/// encoder's choice: decoders accept any).
pub fn encode_with(msg: &Message, level: i32) -> Result<Vec<u8>, WireError> {
    let cbor = to_cbor(msg)?;
    let mut out = Vec::with_capacity(cbor.len() / 4 + HEADER_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    let mut enc = zstd::stream::write::Encoder::new(out, level)
        .map_err(|e| WireError::Encode(e.to_string()))?;
    frame_parameters(&mut enc, level, cbor.len())?;
    std::io::Write::write_all(&mut enc, &cbor).map_err(|e| WireError::Encode(e.to_string()))?;
    enc.finish().map_err(|e| WireError::Encode(e.to_string()))
}

/// Encodes a message in `encoding` at zstd `level`. A message outside v2's bounds
/// (a kind or node id over [`v2::MAX_TABLE_STRING`] bytes, more than
/// [`v2::MAX_VV_ENTRIES`] vector entries) goes as v1, which every peer reads.
pub fn encode_as(msg: &Message, level: i32, encoding: Encoding) -> Result<Vec<u8>, WireError> {
    match encoding {
        Encoding::V1 => encode_with(msg, level),
        Encoding::V2 { dict, columns } => match v2::encode(msg, level, dict, columns)? {
            Some(frame) => Ok(frame),
            None => encode_with(msg, level),
        },
    }
}

/// The zstd parameters of every frame this node writes, given its level and the
/// payload size.
fn frame_parameters<W: std::io::Write>(
    enc: &mut zstd::stream::write::Encoder<'_, W>,
    level: i32,
    size: usize,
) -> Result<(), WireError> {
    let e = |e: std::io::Error| WireError::Encode(e.to_string());
    // Keep the window within what our own decoder accepts.
    enc.window_log(MAX_WINDOW_LOG.min(22)).map_err(e)?;
    // A clinic's high levels: a window no larger than a batch.
    if let Some(window) = level::window_cap(level) {
        enc.window_log(window).map_err(e)?;
    }
    enc.include_contentsize(false).map_err(e)?;
    // Telling zstd the size lets it size its tables to the message rather than to
    // the level's maximum: a small frame costs kilobytes of memory, not tens of MiB.
    enc.set_pledged_src_size(Some(size as u64)).map_err(e)?;
    Ok(())
}

/// Checks the header and returns the protocol version the frame claims.
pub fn check_header(bytes: &[u8]) -> Result<u16, WireError> {
    if bytes.len() < HEADER_LEN {
        return Err(WireError::TooShort(bytes.len()));
    }
    if &bytes[..4] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = u16::from_be_bytes([bytes[4], bytes[5]]);
    if version != PROTOCOL_VERSION && version != PROTOCOL_V2 {
        return Err(WireError::UnsupportedVersion {
            got: version,
            supported: NEWEST_VERSION,
        });
    }
    Ok(version)
}

/// Decodes a frame within `limits`.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Message, WireError> {
    decode_keeping(bytes, limits, None).map(|(m, _)| m)
}

/// [`decode`] that reads chained v2 frames against `prefixes` and returns a v2
/// frame's payload (`None` for v1), which the receiver may keep as the sender's next
/// prefix ([`v2::encode_chained`]).
pub fn decode_keeping(
    bytes: &[u8],
    limits: &Limits,
    prefixes: Option<v2::Prefixes<'_>>,
) -> Result<(Message, Option<Vec<u8>>), WireError> {
    match inflate_keeping(bytes, limits, prefixes)? {
        Inflated {
            payload: Some(payload),
            ..
        } => {
            let msg = v2::from_payload(&payload, limits)?;
            Ok((msg, Some(payload)))
        }
        Inflated { v1: Some(msg), .. } => Ok((msg, None)),
        Inflated { .. } => Err(WireError::Decode("the frame holds no message".into())),
    }
}

/// A frame decompressed, its message not yet decoded (see [`inflate_keeping`]).
pub struct Inflated {
    v1: Option<Message>,
    payload: Option<Vec<u8>>,
}

impl Inflated {
    /// The frame's message. A v2 push's records (a push request's, a sync
    /// request's) are left in their block, built where they are used
    /// ([`v2::from_payload_streamed`]); a v1 frame's message comes whole, once.
    pub fn decode(
        &mut self,
        limits: &Limits,
    ) -> Result<(Message, Option<v2::RecordBlock<'_>>), WireError> {
        match (&self.payload, self.v1.take()) {
            (Some(payload), _) => v2::from_payload_streamed(payload, limits),
            (None, Some(msg)) => Ok((msg, None)),
            (None, None) => Err(WireError::Decode("the frame was decoded already".into())),
        }
    }

    /// The v2 payload (to keep as the sender's next prefix); `None` for v1.
    pub fn into_payload(self) -> Option<Vec<u8>> {
        self.payload
    }
}

/// [`decode_keeping`] up to the message: a v2 frame is decompressed and its payload
/// kept, to be decoded by [`Inflated::decode`] (a push's records one at a time
/// where they are used); a v1 frame is decoded whole.
pub fn inflate_keeping(
    bytes: &[u8],
    limits: &Limits,
    prefixes: Option<v2::Prefixes<'_>>,
) -> Result<Inflated, WireError> {
    if bytes.len() > limits.max_compressed {
        return Err(WireError::TooLarge {
            what: "compressed message",
            size: bytes.len(),
            limit: limits.max_compressed,
        });
    }
    if check_header(bytes)? == PROTOCOL_V2 {
        // The record count is checked as the block is read (`v2::read_block`).
        return Ok(Inflated {
            v1: None,
            payload: Some(v2::inflate_payload(bytes, limits, prefixes)?),
        });
    }
    let msg = decode_v1(bytes, limits)?;
    let count = msg.record_count();
    if count > limits.max_records {
        return Err(WireError::TooManyRecords {
            count,
            limit: limits.max_records,
        });
    }
    Ok(Inflated {
        v1: Some(msg),
        payload: None,
    })
}

fn decode_v1(bytes: &[u8], limits: &Limits) -> Result<Message, WireError> {
    let decoder = zstd::stream::read::Decoder::new(&bytes[HEADER_LEN..])
        .map_err(|e| WireError::Decompress(e.to_string()))?;
    let cbor = inflate(decoder, limits, bytes.len() - HEADER_LEN)?;
    ciborium::de::from_reader_with_recursion_limit(cbor.as_slice(), MAX_DEPTH)
        .map_err(|e| WireError::Decode(e.to_string()))
}

/// What a compressed frame body is first expected to decompress to, per byte: v1
/// push frames inflate 4-7 times, v2 ones with the dictionary and body columns 22-23
/// times (`bench apply`'s frames of 2,000 records: 31 KB to 710 KB). Reserving it up front spares the payload's buffer
/// the copies of growing from nothing (a third of the time `inflate` took on a hub
/// applying pushes, perf); a frame that inflates more grows as before, pages
/// reserved and not written cost no memory, and the reservation never exceeds the
/// decompressed-size limit.
const INFLATE_GUESS: usize = 24;

/// One zstd frame decompressed within `limits` (window and size), and nothing after
/// it: the body of every v1 and v2 frame, chained or not. `compressed` is the
/// frame body's length (sizes the first buffer).
fn inflate<R: std::io::BufRead>(
    mut d: zstd::stream::read::Decoder<'_, R>,
    limits: &Limits,
    compressed: usize,
) -> Result<Vec<u8>, WireError> {
    let e = |e: std::io::Error| WireError::Decompress(e.to_string());
    d.window_log_max(MAX_WINDOW_LOG).map_err(e)?;
    let mut d = d.single_frame().take(limits.max_decompressed as u64 + 1);
    let mut out = Vec::with_capacity(
        compressed
            .saturating_mul(INFLATE_GUESS)
            .min(limits.max_decompressed),
    );
    d.read_to_end(&mut out).map_err(e)?;
    if out.len() > limits.max_decompressed {
        return Err(WireError::TooLarge {
            what: "decompressed message",
            size: out.len(),
            limit: limits.max_decompressed,
        });
    }
    // A message is one zstd frame: anything after it is not ours to ignore.
    let mut rest = d.into_inner().finish();
    let after = std::io::BufRead::fill_buf(&mut rest).map_err(e)?.len();
    if after > 0 {
        return Err(WireError::Decompress(format!(
            "{after}+ byte(s) after the end of the compressed message"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        Message::PullRequest(PullRequest {
            node: "clinic-a".into(),
            cursor: Cursor { eff: 7, seq: 5 },
            max_bytes: 1 << 20,
            max_records: 500,
            include_own: false,
            answer_chunk: 0,
            health: Vec::new(),
            order_results: Vec::new(),
        })
    }

    #[test]
    fn frames_round_trip() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(&bytes[..4], MAGIC);
        assert_eq!(decode(&bytes, &Limits::default()).unwrap(), sample());
    }

    #[test]
    fn bytes_after_the_compressed_message_are_refused_in_each_version() {
        let encodings = [
            Encoding::V1,
            Encoding::V2 {
                dict: 0,
                columns: true,
            },
            Encoding::V2 {
                dict: dict::newest(),
                columns: true,
            },
        ];
        for encoding in encodings {
            let frame = encode_as(&sample(), LEVEL_FAST, encoding).unwrap();
            assert_eq!(decode(&frame, &Limits::default()).unwrap(), sample());
            let second = zstd::encode_all(&b"more"[..], 3).unwrap();
            for tail in [&b"JUNKJUNK"[..], &second[..], &[0u8][..]] {
                let mut bytes = frame.clone();
                bytes.extend_from_slice(tail);
                let err = decode(&bytes, &Limits::default()).unwrap_err();
                assert!(
                    err.to_string()
                        .contains("after the end of the compressed message"),
                    "{encoding:?}: {err}"
                );
            }
        }
    }

    #[test]
    fn a_newer_protocol_version_is_refused_before_decompression() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[5] = 9;
        let err = decode(&bytes, &Limits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::UnsupportedVersion {
                    got: 9,
                    supported: 2
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("version 9"));
    }

    #[test]
    fn a_decompression_bomb_is_stopped_at_the_limit() {
        // 50 MB of zeros compresses to a few KB.
        let zeros = vec![0u8; 50 << 20];
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        bytes.extend(zstd::bulk::compress(&zeros, 3).unwrap());
        assert!(bytes.len() < 100_000);
        let limits = Limits {
            max_decompressed: 1 << 20,
            ..Limits::default()
        };
        let err = decode(&bytes, &limits).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::TooLarge {
                    what: "decompressed message",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn truncated_and_garbage_frames_are_refused() {
        let bytes = encode(&sample()).unwrap();
        let cut = &bytes[..bytes.len() - 3];
        assert!(matches!(
            decode(cut, &Limits::default()),
            Err(WireError::Decompress(_))
        ));
        assert!(matches!(
            decode(b"hello world", &Limits::default()),
            Err(WireError::BadMagic)
        ));
        assert!(matches!(
            decode(b"CS", &Limits::default()),
            Err(WireError::TooShort(2))
        ));
        let mut garbage = MAGIC.to_vec();
        garbage.extend_from_slice(&1u16.to_be_bytes());
        garbage.extend(zstd::bulk::compress(b"\xff\xff\xff not cbor", 3).unwrap());
        assert!(matches!(
            decode(&garbage, &Limits::default()),
            Err(WireError::Decode(_))
        ));
    }

    #[test]
    fn deep_nesting_is_refused() {
        // 1000 nested CBOR arrays.
        let mut cbor = vec![0xa1, 0x6c];
        cbor.extend_from_slice(b"pull_request");
        cbor.extend(std::iter::repeat(0x81).take(1000));
        cbor.push(0x00);
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1u16.to_be_bytes());
        bytes.extend(zstd::bulk::compress(&cbor, 3).unwrap());
        assert!(matches!(
            decode(&bytes, &Limits::default()),
            Err(WireError::Decode(_))
        ));
    }

    #[test]
    fn too_many_records_are_refused() {
        let rec = WireRecord {
            kind: "Patient".into(),
            id: "p".into(),
            origin: "a".into(),
            hlc: Hlc::default(),
            vv: VersionVector::default(),
            deleted: false,
            body: "{}".into(),
        };
        let msg = Message::PushRequest(PushRequest {
            node: "a".into(),
            records: vec![rec; 11],
        });
        let limits = Limits {
            max_records: 10,
            ..Limits::default()
        };
        let err = decode(&encode(&msg).unwrap(), &limits).unwrap_err();
        assert!(matches!(
            err,
            WireError::TooManyRecords {
                count: 11,
                limit: 10
            }
        ));
    }
}
