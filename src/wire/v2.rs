//! Protocol version 2: the message skeleton in CBOR, its records as one column
//! block, everything in one zstd frame that may use a shipped dictionary. The
//! format, its invariants and its errors are described in the [`crate::wire`]
//! header; this file is the codec.
//!
//! Records are taken out of a message by [`record_slots`], which lists every place
//! a message holds records in a fixed order. A new message that carries records
//! adds its places there and nowhere else.

use std::io::Write;

use crate::model::{Hlc, VersionVector};

use super::{dict, Limits, Message, WireError, WireRecord, MAGIC, MAX_DEPTH, MAX_WINDOW_LOG};

/// The v2 header: magic, version, dictionary id.
pub const HEADER_LEN: usize = 10;
/// The dictionary field of a chained frame: the frame's zstd stream refers to an
/// earlier payload (its prefix), named by the 8 bytes after the header, instead of a
/// dictionary. Sent only to a peer that announced `chain` ([`super::accept`]).
pub const CHAINED: u32 = 1 << 31;
/// The header of a chained frame: the v2 header and the prefix's id.
pub const CHAINED_HEADER_LEN: usize = HEADER_LEN + 8;
/// Largest payload kept as the next frame's prefix, by both ends (the same rule on
/// both sides, so they agree on which payload is the last one kept).
pub const MAX_PREFIX: usize = 4 << 20;
/// Longest kind or node id the tables hold. Longer ones (no valid record has them)
/// make the encoder send the message as v1, which has no such bound.
pub const MAX_TABLE_STRING: usize = 256;
/// Entries the node table may have.
pub const MAX_NODES: usize = 4096;
/// Version vector entries one record may have (the engine refuses more anyway).
pub const MAX_VV_ENTRIES: usize = 64;
/// Largest payload compressed with a dictionary at [`super::LEVEL_BULK`] and the levels
/// up to [`super::level::LEVEL_SLOW_LINK`] (not included).
pub const DICT_MAX_BULK_PAYLOAD: usize = 256 << 10;
/// What one decoded record costs besides its strings (the struct, the map nodes),
/// counted against the decompressed-size limit so that a small block cannot decode
/// into a message much larger than a v1 frame under the same limits could.
const RECORD_OVERHEAD: usize = 128;
const VV_ENTRY_OVERHEAD: usize = 48;

/// A place in a message that holds records.
pub enum Slot<'a> {
    List(&'a mut Vec<WireRecord>),
    One(&'a mut Option<WireRecord>),
}

/// Every place `msg` holds records, in a fixed order (the order of the block). The
/// match has no catch-all arm: a new message kind must say where its records are.
pub fn record_slots(msg: &mut Message) -> Vec<Slot<'_>> {
    match msg {
        Message::PushRequest(m) => vec![Slot::List(&mut m.records)],
        Message::PullResponse(m) => vec![Slot::List(&mut m.records)],
        Message::SyncRequest(m) => vec![Slot::List(&mut m.push.records)],
        Message::SyncResponse(m) => vec![Slot::List(&mut m.pull.records)],
        Message::FetchResponse(m) => m
            .results
            .iter_mut()
            .map(|r| Slot::One(&mut r.record))
            .collect(),
        Message::PushResponse(_)
        | Message::PullRequest(_)
        | Message::FetchRequest(_)
        | Message::ChunkPut(_)
        | Message::ChunkQuery(_)
        | Message::ChunkRun(_)
        | Message::ChunkGet(_)
        | Message::ChunkAck(_)
        | Message::ChunkReady(_)
        | Message::ChunkData(_) => Vec::new(),
    }
}

/// Takes the records out of `msg` (leaving empty lists and `None`s): the counts per
/// slot and the records in slot order.
fn take_records(msg: &mut Message) -> (Vec<u64>, Vec<WireRecord>) {
    let mut counts = Vec::new();
    let mut records = Vec::new();
    for slot in record_slots(msg) {
        match slot {
            Slot::List(list) => {
                counts.push(list.len() as u64);
                records.append(list);
            }
            Slot::One(one) => match one.take() {
                Some(r) => {
                    counts.push(1);
                    records.push(r);
                }
                None => counts.push(0),
            },
        }
    }
    (counts, records)
}

// ------------------------------------------------------------------ varints

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A bounded reader over the decompressed payload; every error names what it was
/// reading.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn block(msg: impl Into<String>) -> WireError {
    WireError::Block(msg.into())
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(super) fn varint(&mut self, what: &dyn Fn() -> String) -> Result<u64, WireError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(block(format!("{} is cut off", what())));
            };
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(block(format!("{} overflows 64 bits", what())));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(block(format!("{} overflows 64 bits", what())))
    }

    /// A count that must not pass `max` (checked before anything is allocated).
    pub(super) fn count(
        &mut self,
        max: usize,
        what: &dyn Fn() -> String,
    ) -> Result<usize, WireError> {
        let n = self.varint(what)?;
        if n > max as u64 {
            return Err(block(format!("{} is {n}, over the limit of {max}", what())));
        }
        Ok(n as usize)
    }

    pub(super) fn bytes(
        &mut self,
        n: usize,
        what: &dyn Fn() -> String,
    ) -> Result<&'a [u8], WireError> {
        if n > self.remaining() {
            return Err(block(format!(
                "{} needs {n} bytes, only {} remain",
                what(),
                self.remaining()
            )));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn string(&mut self, max: usize, what: &dyn Fn() -> String) -> Result<String, WireError> {
        let n = self.count(max, &|| format!("length of {}", what()))?;
        let b = self.bytes(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| block(format!("{} is not UTF-8", what())))
    }
}

// ------------------------------------------------------------------ encoding

/// Interns strings in order of first appearance.
#[derive(Default)]
struct Table<'a> {
    items: Vec<&'a str>,
    index: std::collections::HashMap<&'a str, u64>,
}

impl<'a> Table<'a> {
    fn intern(&mut self, s: &'a str) -> u64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.items.len() as u64;
        self.items.push(s);
        self.index.insert(s, i);
        i
    }
}

/// The marker before an id inside a canonical body.
const ID_KEY: &str = "\"id\":\"";
/// Occurrences of [`ID_KEY`] looked through for a record's id.
const MAX_ID_OCCURRENCE: usize = 64;

/// Where a record's id is found inside its own body: `k` (1-based) when the value
/// after the k-th `"id":"` is exactly the id, up to the next `"`. The canonical
/// body names the record, so the id costs one small, constant number instead of
/// its text (ids are a sixth of a record's metadata otherwise).
fn id_in_body(rec: &WireRecord) -> Option<usize> {
    if rec.id.is_empty() || rec.id.contains(['"', '\\']) {
        return None;
    }
    let mut from = 0;
    for k in 1..=MAX_ID_OCCURRENCE {
        let at = from + rec.body[from..].find(ID_KEY)? + ID_KEY.len();
        let rest = &rec.body[at..];
        if rest.starts_with(rec.id.as_str()) && rest[rec.id.len()..].starts_with('"') {
            return Some(k);
        }
        from = at;
    }
    None
}

/// The id the k-th (1-based) `"id":"` of `body` introduces, as [`id_in_body`] found it.
fn id_from_body(body: &str, k: u64) -> Option<&str> {
    let mut from = 0;
    let mut at = 0;
    for _ in 0..k {
        at = from + body[from..].find(ID_KEY)? + ID_KEY.len();
        from = at;
    }
    let len = body[at..].find('"')?;
    Some(&body[at..at + len])
}

/// Bodies are written grouped by kind (each kind's in record order): a kind's
/// bodies look alike, and zstd finds more and nearer matches among neighbours. The
/// kind column gives the receiver the same order, so this costs no byte.
fn body_order(kind_ix: &[u64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..kind_ix.len()).collect();
    order.sort_by_key(|&i| kind_ix[i]);
    order
}

fn body_order_of(kind_ix: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..kind_ix.len()).collect();
    order.sort_by_key(|&i| kind_ix[i]);
    order
}

/// Flag: every body ends with a newline in the stream and no length column is sent
/// (no body holds a newline; canonical JSON never does).
const FLAG_NEWLINES: u8 = 1;
/// Flag: the bodies are sent as shapes and columns ([`super::shape`]); only to a peer
/// that announced `columns`.
const FLAG_BODY_COLUMNS: u8 = 2;
/// Flag: a push answer's results follow the bodies as columns ([`put_results`])
/// instead of riding in the skeleton; only to a peer that announced `columns`.
const FLAG_RESULTS: u8 = 4;

/// The push results a message carries (a push answer's, a sync answer's), if any.
fn results_of(msg: &Message) -> Option<&Vec<super::PushResult>> {
    match msg {
        Message::PushResponse(m) => Some(&m.results),
        Message::SyncResponse(m) => Some(&m.push.results),
        _ => None,
    }
}

/// [`results_of`], to change them.
fn results_slot(msg: &mut Message) -> Option<&mut Vec<super::PushResult>> {
    match msg {
        Message::PushResponse(m) => Some(&mut m.results),
        Message::SyncResponse(m) => Some(&mut m.push.results),
        _ => None,
    }
}

/// Outcome codes of the results block.
const OUTCOME_ACCEPTED: u8 = 0;
const OUTCOME_DUPLICATE: u8 = 1;
const OUTCOME_STALE: u8 = 2;
const OUTCOME_CONFLICT: u8 = 3;
const OUTCOME_CONFLICT_LOST: u8 = 4;
const OUTCOME_REJECTED: u8 = 5;
const OUTCOME_REJECTED_PERMANENT: u8 = 6;

/// Push results as columns: a node table, then per result zz(i - previous i), an
/// outcome code (and the resolution or reason text where it has one), and the
/// version vector as the record block writes one (node index, counter as its
/// difference from that node's previous counter). A day's answer of 2,000 results is
/// a few hundred bytes instead of ~7.7 KB. `None` when a result falls outside the
/// block's bounds (it then rides in the skeleton).
fn put_results(results: &[super::PushResult]) -> Option<Vec<u8>> {
    let mut nodes = Table::default();
    for r in results {
        if r.vv.0.len() > MAX_VV_ENTRIES || r.vv.0.keys().any(|n| n.len() > MAX_TABLE_STRING) {
            return None;
        }
        for n in r.vv.0.keys() {
            nodes.intern(n);
        }
    }
    if nodes.items.len() > MAX_NODES {
        return None;
    }
    let mut out = Vec::with_capacity(16 + results.len() * 5);
    put_varint(&mut out, results.len() as u64);
    put_varint(&mut out, nodes.items.len() as u64);
    for n in &nodes.items {
        put_str(&mut out, n);
    }
    let mut prev_i = 0i64;
    let mut last = vec![0u64; nodes.items.len()];
    for r in results {
        put_varint(&mut out, zigzag(i64::from(r.i) - prev_i));
        prev_i = i64::from(r.i);
        match &r.outcome {
            super::Outcome::Accepted => out.push(OUTCOME_ACCEPTED),
            super::Outcome::Duplicate => out.push(OUTCOME_DUPLICATE),
            super::Outcome::Stale => out.push(OUTCOME_STALE),
            super::Outcome::Conflict { resolution, lost } => {
                out.push(if *lost {
                    OUTCOME_CONFLICT_LOST
                } else {
                    OUTCOME_CONFLICT
                });
                put_str(&mut out, resolution);
            }
            super::Outcome::Rejected { reason, permanent } => {
                out.push(if *permanent {
                    OUTCOME_REJECTED_PERMANENT
                } else {
                    OUTCOME_REJECTED
                });
                put_str(&mut out, reason);
            }
        }
        put_vv(&mut out, &r.vv, &nodes, &mut last);
    }
    Some(out)
}

/// A version vector as the block writes one: its size, then (node index, counter as
/// its difference from that node's previous counter in `last`), in name order.
fn put_vv(out: &mut Vec<u8>, vv: &VersionVector, nodes: &Table<'_>, last: &mut [u64]) {
    put_varint(out, vv.0.len() as u64);
    for (node, &c) in &vv.0 {
        let k = nodes.index[node.as_str()] as usize;
        put_varint(out, k as u64);
        put_varint(out, zigzag(c.wrapping_sub(last[k]) as i64));
        last[k] = c;
    }
}

/// Reads a vector [`put_vv`] wrote; `what` names its owner ("record 3") in errors.
fn read_vv(
    r: &mut Reader<'_>,
    nodes: &[String],
    last: &mut [u64],
    what: &dyn std::fmt::Display,
    spend: &mut dyn FnMut(usize, &str) -> Result<(), WireError>,
) -> Result<VersionVector, WireError> {
    let n = r.count(MAX_VV_ENTRIES.min(nodes.len()), &|| {
        format!("{what}: version vector size")
    })?;
    let mut vv = VersionVector::default();
    let mut prev_name: Option<&str> = None;
    for _ in 0..n {
        let k = r.varint(&|| format!("{what}: node index"))?;
        let k = usize::try_from(k)
            .ok()
            .filter(|&k| k < nodes.len())
            .ok_or_else(|| {
                block(format!(
                    "{what}: node index {k} is outside the node table ({} entries)",
                    nodes.len()
                ))
            })?;
        let d = r.varint(&|| format!("{what}: version vector counter"))?;
        let c = last[k].wrapping_add(unzigzag(d) as u64);
        last[k] = c;
        let name = nodes[k].as_str();
        if prev_name.is_some_and(|p| p >= name) {
            return Err(block(format!(
                "{what}: version vector entries are not in order or repeat node {name}"
            )));
        }
        prev_name = Some(name);
        spend(name.len() + VV_ENTRY_OVERHEAD, "version vector")?;
        vv.0.insert(name.to_string(), c);
    }
    Ok(vv)
}

/// Reads the results block [`put_results`] writes.
fn read_results(
    r: &mut Reader<'_>,
    limits: &Limits,
    spend: &mut dyn FnMut(usize, &str) -> Result<(), WireError>,
) -> Result<Vec<super::PushResult>, WireError> {
    // A result takes at least 3 bytes (position, outcome, vector size).
    let n = r.count(limits.max_records.min(r.remaining() / 3), &|| {
        "number of push results".into()
    })?;
    let n_nodes = r.count(MAX_NODES.min(r.remaining()), &|| {
        "number of result nodes".into()
    })?;
    let mut nodes = Vec::with_capacity(n_nodes);
    for k in 0..n_nodes {
        nodes.push(r.string(MAX_TABLE_STRING, &|| format!("result node {k}"))?);
    }
    spend(n.saturating_mul(RECORD_OVERHEAD), "push result")?;
    let mut out = Vec::with_capacity(n);
    let mut prev_i = 0i64;
    let mut last = vec![0u64; nodes.len()];
    for x in 0..n {
        let d = unzigzag(r.varint(&|| format!("result {x}: position"))?);
        let i = prev_i
            .checked_add(d)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| block(format!("result {x}: position is outside 0..2^32")))?;
        prev_i = i64::from(i);
        let code = r.bytes(1, &|| format!("result {x}: outcome"))?[0];
        let text = |r: &mut Reader<'_>, what: &str| {
            r.string(r.remaining(), &|| format!("result {x}: {what}"))
        };
        let outcome = match code {
            OUTCOME_ACCEPTED => super::Outcome::Accepted,
            OUTCOME_DUPLICATE => super::Outcome::Duplicate,
            OUTCOME_STALE => super::Outcome::Stale,
            OUTCOME_CONFLICT | OUTCOME_CONFLICT_LOST => super::Outcome::Conflict {
                resolution: text(r, "resolution")?,
                lost: code == OUTCOME_CONFLICT_LOST,
            },
            OUTCOME_REJECTED | OUTCOME_REJECTED_PERMANENT => super::Outcome::Rejected {
                reason: text(r, "reason")?,
                permanent: code == OUTCOME_REJECTED_PERMANENT,
            },
            other => return Err(block(format!("result {x}: unknown outcome {other}"))),
        };
        if let super::Outcome::Conflict { resolution: t, .. }
        | super::Outcome::Rejected { reason: t, .. } = &outcome
        {
            spend(t.len(), "push result")?;
        }
        let vv = read_vv(r, &nodes, &mut last, &format_args!("result {x}"), spend)?;
        out.push(super::PushResult { i, vv, outcome });
    }
    Ok(out)
}

/// The column block of `records` (without the bodies, which follow it in the same
/// order, each exactly as long as the block says). `None` when a record falls
/// outside the v2 bounds (the caller sends v1).
fn columns(
    counts: &[u64],
    records: &[WireRecord],
    body_columns: bool,
    results: bool,
) -> Option<(Vec<u8>, Vec<usize>, Bodies)> {
    let mut out = Vec::with_capacity(64 + records.len() * 16);
    put_varint(&mut out, counts.len() as u64);
    for &c in counts {
        put_varint(&mut out, c);
    }
    let newlines = !body_columns && !records.iter().any(|r| r.body.contains('\n'));
    out.push(
        match (body_columns, newlines) {
            (true, _) => FLAG_BODY_COLUMNS,
            (false, true) => FLAG_NEWLINES,
            (false, false) => 0,
        } | if results { FLAG_RESULTS } else { 0 },
    );
    let mut kinds = Table::default();
    let mut nodes = Table::default();
    let mut kind_ix = Vec::with_capacity(records.len());
    let mut origin_ix = Vec::with_capacity(records.len());
    for r in records {
        if r.kind.len() > MAX_TABLE_STRING
            || r.origin.len() > MAX_TABLE_STRING
            || r.vv.0.len() > MAX_VV_ENTRIES
            || r.vv.0.keys().any(|n| n.len() > MAX_TABLE_STRING)
        {
            return None;
        }
        kind_ix.push(kinds.intern(&r.kind));
        origin_ix.push(nodes.intern(&r.origin));
        for n in r.vv.0.keys() {
            nodes.intern(n);
        }
    }
    if nodes.items.len() > MAX_NODES {
        return None;
    }
    for table in [&kinds, &nodes] {
        put_varint(&mut out, table.items.len() as u64);
        for s in &table.items {
            put_str(&mut out, s);
        }
    }
    for &i in &kind_ix {
        put_varint(&mut out, i);
    }
    for i in origin_ix {
        put_varint(&mut out, i);
    }
    for r in records {
        match id_in_body(r) {
            Some(k) => put_varint(&mut out, k as u64),
            None => {
                put_varint(&mut out, 0);
                put_str(&mut out, &r.id);
            }
        }
    }
    // HLCs: the batch's earliest wall clock, then each record's difference from the
    // one before it (records stay in their order; a batch in clock order costs a
    // byte or two each); the counter as it is, or as its difference from the one
    // before when the wall clock is the same (a burst of writes in one millisecond).
    let base = records.iter().map(|r| r.hlc.wall_ms).min().unwrap_or(0);
    put_varint(&mut out, base);
    let (mut prev, mut prev_counter) = (base, 0u32);
    for r in records {
        let d = r.hlc.wall_ms.wrapping_sub(prev);
        put_varint(&mut out, zigzag(d as i64));
        let c = r.hlc.counter;
        if d == 0 {
            put_varint(&mut out, zigzag(i64::from(c) - i64::from(prev_counter)));
        } else {
            put_varint(&mut out, u64::from(c));
        }
        prev = r.hlc.wall_ms;
        prev_counter = c;
    }
    // Version vectors: (node index, counter minus that node's previous counter in
    // the batch); entries in the map's (name) order.
    let mut last = vec![0u64; nodes.items.len()];
    for r in records {
        put_vv(&mut out, &r.vv, &nodes, &mut last);
    }
    let mut bits = vec![0u8; records.len().div_ceil(8)];
    for (i, r) in records.iter().enumerate() {
        if r.deleted {
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    out.extend_from_slice(&bits);
    let order = body_order(&kind_ix);
    if body_columns {
        let bodies: Vec<&str> = order.iter().map(|&i| records[i].body.as_str()).collect();
        let kinds: Vec<usize> = order.iter().map(|&i| kind_ix[i] as usize).collect();
        let pieces = super::shape::encode(&bodies, &kinds);
        return Some((out, order, Bodies::Columns(pieces)));
    }
    if !newlines {
        for &i in &order {
            put_varint(&mut out, records[i].body.len() as u64);
        }
    }
    Some((out, order, Bodies::Text { newlines }))
}

/// How the bodies follow the column block.
enum Bodies {
    /// As text, in body order, newline-ended or after the length column.
    Text { newlines: bool },
    /// As shapes and columns, already written (in pieces, written one after another).
    Columns(Vec<Vec<u8>>),
}

/// A message's records for encoding: borrowed from the message where it keeps them
/// in one list (every message that can be large), taken from a copy otherwise.
enum Records<'a> {
    Borrowed(&'a [WireRecord]),
    Owned(Vec<WireRecord>),
}

impl std::ops::Deref for Records<'_> {
    type Target = [WireRecord];
    fn deref(&self) -> &[WireRecord] {
        match self {
            Records::Borrowed(r) => r,
            Records::Owned(r) => r,
        }
    }
}

/// `msg` without its records (what [`take_records`] leaves of a copy), the counts per
/// slot, and the records in slot order. A push, sync or pull message holds its records
/// in its one slot: the skeleton is built beside it and the records are borrowed, so
/// encoding a 2,000-record batch does not copy the batch (a clinic's box holds one
/// batch in flight and builds the next meanwhile; a third copy was ~2 MiB of its peak).
/// The struct literals name every field, so a new field must be placed here too;
/// `split_is_take_records_without_the_copy` checks both ways agree (but for the
/// results below).
///
/// A push answer's results are left out of the skeleton (empty there): they go in
/// their own block, or [`Parts::of`] puts them back when they cannot. Copying 2,000
/// results (each with its version vector) only to move them out again was a few
/// percent of a hub's CPU per push.
fn split(msg: &Message) -> (Message, Vec<u64>, Records<'_>) {
    let push_skeleton = |p: &super::PushRequest| super::PushRequest {
        node: p.node.clone(),
        records: Vec::new(),
    };
    let pull_skeleton = |p: &super::PullResponse| super::PullResponse {
        records: Vec::new(),
        next: p.next,
        more: p.more,
        head: p.head,
        orders: p.orders.clone(),
        bundle_seq: p.bundle_seq,
    };
    let (skeleton, records) = match msg {
        Message::PushRequest(m) => (Message::PushRequest(push_skeleton(m)), &m.records),
        Message::SyncRequest(m) => (
            Message::SyncRequest(super::SyncRequest {
                push: push_skeleton(&m.push),
                pull: m.pull.clone(),
            }),
            &m.push.records,
        ),
        Message::PullResponse(m) => (Message::PullResponse(pull_skeleton(m)), &m.records),
        Message::SyncResponse(m) => (
            Message::SyncResponse(super::SyncResponse {
                push: super::PushResponse {
                    results: Vec::new(),
                },
                pull: pull_skeleton(&m.pull),
            }),
            &m.pull.records,
        ),
        Message::PushResponse(_) => {
            let skeleton = Message::PushResponse(super::PushResponse {
                results: Vec::new(),
            });
            return (skeleton, Vec::new(), Records::Owned(Vec::new()));
        }
        other => {
            let mut skeleton = other.clone();
            let (counts, records) = take_records(&mut skeleton);
            return (skeleton, counts, Records::Owned(records));
        }
    };
    (
        skeleton,
        vec![records.len() as u64],
        Records::Borrowed(records),
    )
}

/// A message split for v2: the head (skeleton length and skeleton), the column
/// block, and the records whose bodies follow it.
struct Parts<'a> {
    head: Vec<u8>,
    cols: Vec<u8>,
    records: Records<'a>,
    /// The order bodies are written in.
    order: Vec<usize>,
    bodies: Bodies,
    /// The results block, when the results left the skeleton (else empty).
    results: Vec<u8>,
}

impl Parts<'_> {
    fn of(msg: &Message, body_columns: bool) -> Result<Option<Parts<'_>>, WireError> {
        let (mut skeleton, counts, records) = split(msg);
        // A push answer's results go in their own columns, or else in the skeleton.
        let mut results = Vec::new();
        if let Some(all) = results_of(msg) {
            match body_columns.then(|| put_results(all)).flatten() {
                Some(block) => results = block,
                None => {
                    if let Some(slot) = results_slot(&mut skeleton) {
                        slot.clone_from(all);
                    }
                }
            }
        }
        let Some((cols, order, bodies)) =
            columns(&counts, &records, body_columns, !results.is_empty())
        else {
            return Ok(None);
        };
        let skel = super::to_cbor(&skeleton)?;
        let mut head = Vec::with_capacity(skel.len() + 10);
        put_varint(&mut head, skel.len() as u64);
        head.extend_from_slice(&skel);
        Ok(Some(Parts {
            head,
            cols,
            records,
            order,
            bodies,
            results,
        }))
    }

    fn len(&self) -> usize {
        let bodies = match &self.bodies {
            Bodies::Columns(pieces) => pieces.iter().map(Vec::len).sum(),
            Bodies::Text { newlines } => {
                self.records.iter().map(|r| r.body.len()).sum::<usize>()
                    + if *newlines { self.records.len() } else { 0 }
            }
        };
        self.head.len() + self.cols.len() + bodies + self.results.len()
    }

    fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(&self.head)?;
        w.write_all(&self.cols)?;
        match &self.bodies {
            Bodies::Columns(pieces) => {
                for p in pieces {
                    w.write_all(p)?;
                }
            }
            Bodies::Text { newlines } => {
                for &i in &self.order {
                    w.write_all(self.records[i].body.as_bytes())?;
                    if *newlines {
                        w.write_all(b"\n")?;
                    }
                }
            }
        }
        w.write_all(&self.results)?;
        Ok(())
    }
}

/// The uncompressed v2 payload of `msg` (what [`encode`] compresses), for
/// measurements; `None` outside v2's bounds.
pub fn payload(msg: &Message, body_columns: bool) -> Result<Option<Vec<u8>>, WireError> {
    let Some(parts) = Parts::of(msg, body_columns)? else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(parts.len());
    parts
        .write_to(&mut out)
        .map_err(|e| WireError::Encode(e.to_string()))?;
    Ok(Some(out))
}

/// Encodes `msg` as a v2 frame with dictionary `dict` (0: none) at zstd `level`, its
/// bodies as shapes and columns when `body_columns`; `None` when the message falls
/// outside v2's bounds (see [`MAX_TABLE_STRING`]).
pub fn encode(
    msg: &Message,
    level: i32,
    dict: u32,
    body_columns: bool,
) -> Result<Option<Vec<u8>>, WireError> {
    let Some(parts) = Parts::of(msg, body_columns)? else {
        return Ok(None);
    };
    let frame = compress(&parts, level, dict)?;
    // A handful of records gains less from columns than from the dictionary, which
    // was trained on bodies as text (BENCHMARKS.md: a 10-record push is ~1.9× larger
    // as columns): a small payload is encoded both ways and the smaller frame sent.
    // Deterministic, so a frame built again for a resumed transfer is the same.
    if body_columns && parts.len() <= COLUMNS_TRY_BOTH {
        if let Some(text) = Parts::of(msg, false)? {
            let other = compress(&text, level, dict)?;
            if other.len() < frame.len() {
                return Ok(Some(other));
            }
        }
    }
    Ok(Some(frame))
}

/// Payloads (as columns) up to this size are also encoded with bodies as text.
pub const COLUMNS_TRY_BOTH: usize = 64 << 10;

/// What a frame compresses: a message's parts, or a payload already written out.
enum Src<'a> {
    Parts(&'a Parts<'a>),
    Bytes(&'a [u8]),
}

impl Src<'_> {
    fn len(&self) -> usize {
        match self {
            Src::Parts(p) => p.len(),
            Src::Bytes(b) => b.len(),
        }
    }

    fn write_to<W: Write>(&self, w: &mut W) -> std::io::Result<()> {
        match self {
            Src::Parts(p) => p.write_to(w),
            Src::Bytes(b) => w.write_all(b),
        }
    }
}

/// One zstd frame of `parts` behind the v2 header.
fn compress(parts: &Parts<'_>, level: i32, dict: u32) -> Result<Vec<u8>, WireError> {
    compress_src(&Src::Parts(parts), level, dict)
}

fn compress_src(src: &Src<'_>, level: i32, dict: u32) -> Result<Vec<u8>, WireError> {
    let dict_bytes = match dict {
        0 => None,
        id => Some(dict::bytes(id).ok_or(WireError::UnknownDictionary(id))?),
    };
    let size = src.len();
    // Measured (BENCHMARKS.md): at the hub's level a dictionary makes payloads over
    // ~256 KiB 1-8 % larger (zstd searches less when one is attached), while it
    // helps every payload at the clinic's levels (3, and 15 on a slow link: 3.5-7 %
    // smaller with it) and small ones at any level.
    let bulk = (super::LEVEL_BULK..super::level::LEVEL_SLOW_LINK).contains(&level);
    let (dict, dict_bytes) = if bulk && size > DICT_MAX_BULK_PAYLOAD {
        (0, None)
    } else {
        (dict, dict_bytes)
    };
    let mut out = Vec::with_capacity(size / 6 + HEADER_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&super::PROTOCOL_V2.to_be_bytes());
    out.extend_from_slice(&dict.to_be_bytes());
    let e = |e: std::io::Error| WireError::Encode(e.to_string());
    let mut enc = match dict_bytes {
        Some(d) => zstd::stream::write::Encoder::with_dictionary(out, level, d).map_err(e)?,
        None => zstd::stream::write::Encoder::new(out, level).map_err(e)?,
    };
    super::frame_parameters(&mut enc, level, size)?;
    // The frame names the dictionary in our header already.
    enc.include_dictid(false).map_err(e)?;
    src.write_to(&mut enc).map_err(e)?;
    enc.finish().map_err(e)
}

/// A payload kept to be the prefix of the next chained frame, and its name.
#[derive(Clone, Debug)]
pub struct Prefix {
    /// The first 8 bytes of the payload's SHA-256.
    pub id: [u8; 8],
    pub payload: std::sync::Arc<Vec<u8>>,
}

impl Prefix {
    /// `payload` as a prefix; `None` over [`MAX_PREFIX`] (neither end keeps it).
    pub fn of(payload: Vec<u8>) -> Option<Prefix> {
        use sha2::Digest;
        if payload.len() > MAX_PREFIX {
            return None;
        }
        let sha = sha2::Sha256::digest(&payload);
        let mut id = [0; 8];
        id.copy_from_slice(&sha[..8]);
        Some(Prefix {
            id,
            payload: std::sync::Arc::new(payload),
        })
    }

    /// The id as text, for errors and logs.
    pub fn id_hex(id: &[u8; 8]) -> String {
        hex::encode(id)
    }
}

/// Whether `msg` pushes records: only such a payload becomes a prefix, on both ends
/// (a quiet round's request would otherwise push the last real batch out of what the
/// hub keeps, and it is no help to compress the next batch against).
pub fn pushes_records(msg: &Message) -> bool {
    match msg {
        Message::PushRequest(p) => !p.records.is_empty(),
        Message::SyncRequest(s) => !s.push.records.is_empty(),
        _ => false,
    }
}

/// A frame built by [`encode_chained`], and its payload as the next prefix.
pub type ChainedFrame = (Vec<u8>, Option<Prefix>);

/// [`encode`] for a peer that reads chained frames: with `prefix`, the payload is
/// compressed against it (no dictionary; the prefix is far closer to the payload than
/// a dictionary trained on other data), else as [`encode`] does. Also returns this
/// frame's payload as the next prefix (`None` over [`MAX_PREFIX`], or when it pushes
/// no records: [`pushes_records`]). `None` when the
/// message falls outside v2's bounds.
pub fn encode_chained(
    msg: &Message,
    level: i32,
    dict: u32,
    body_columns: bool,
    prefix: Option<&Prefix>,
) -> Result<Option<ChainedFrame>, WireError> {
    let Some(parts) = Parts::of(msg, body_columns)? else {
        return Ok(None);
    };
    let e = |e: std::io::Error| WireError::Encode(e.to_string());
    let mut payload = Vec::with_capacity(parts.len());
    parts.write_to(&mut payload).map_err(e)?;
    drop(parts);
    // The forms a frame may take. A small payload is also written with bodies as
    // text (which the dictionary was trained on), and compressed with the dictionary
    // alone as well as against the prefix: a handful of records may gain more from
    // the dictionary (measured: our own trickle pushes are 1-5 % smaller so). The
    // smallest frame is sent and its payload, whichever form, is the next prefix (the
    // hub keeps a payload however it came). A large payload goes chained only:
    // trying the dictionary too raised a clinic's peak RSS by 1.1 MiB (past its
    // 30 MiB) to save 1.8 % on data like the dictionary's own training (our
    // generator's), while held-out batches are 19 % smaller chained (BENCHMARKS.md).
    let small = payload.len() <= COLUMNS_TRY_BOTH;
    let mut forms = vec![payload];
    if body_columns && small {
        if let Some(text) = Parts::of(msg, false)? {
            let mut plain = Vec::with_capacity(text.len());
            text.write_to(&mut plain).map_err(e)?;
            forms.push(plain);
        }
    }
    let mut best: Option<(Vec<u8>, usize)> = None;
    let mut offer = |frame: Vec<u8>, form: usize| {
        if best.as_ref().map_or(true, |(b, _)| frame.len() < b.len()) {
            best = Some((frame, form));
        }
    };
    for (form, payload) in forms.iter().enumerate() {
        if let Some(prefix) = prefix {
            offer(compress_chained(payload, level, prefix)?, form);
        }
        if prefix.is_none() || small {
            offer(compress_src(&Src::Bytes(payload), level, dict)?, form);
        }
    }
    let Some((frame, form)) = best else {
        return Ok(None);
    };
    let next = if pushes_records(msg) {
        Prefix::of(forms.swap_remove(form))
    } else {
        None
    };
    Ok(Some((frame, next)))
}

/// One chained frame: `payload` compressed against `prefix`.
fn compress_chained(payload: &[u8], level: i32, prefix: &Prefix) -> Result<Vec<u8>, WireError> {
    let e = |e: std::io::Error| WireError::Encode(e.to_string());
    let mut out = Vec::with_capacity(payload.len() / 8 + CHAINED_HEADER_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&super::PROTOCOL_V2.to_be_bytes());
    out.extend_from_slice(&CHAINED.to_be_bytes());
    out.extend_from_slice(&prefix.id);
    let mut enc =
        zstd::stream::write::Encoder::with_ref_prefix(out, level, &prefix.payload).map_err(e)?;
    super::frame_parameters(&mut enc, level, payload.len())?;
    // The window must reach back over the prefix for its matches to count.
    enc.window_log(chain_window_log(prefix.payload.len() + payload.len()))
        .map_err(e)?;
    // zstd sizes its match tables to prefix and payload together: 32.5 MiB at level
    // 15 for two 1 MiB batches, which doubled a clinic's peak RSS. Capped, the context
    // is 2.5 MiB and the held-out second batch 0.9 % larger (15,177 → 15,316 bytes);
    // at 2^16 the tables no longer reach over the prefix and the frame doubles.
    use zstd::zstd_safe::CParameter;
    enc.set_parameter(CParameter::HashLog(CHAIN_TABLE_LOG))
        .map_err(e)?;
    enc.set_parameter(CParameter::ChainLog(CHAIN_TABLE_LOG))
        .map_err(e)?;
    enc.write_all(payload).map_err(e)?;
    enc.finish().map_err(e)
}

/// The hash and chain table logs of a chained frame's encoder (see
/// [`compress_chained`]).
const CHAIN_TABLE_LOG: u32 = 18;

/// The window of a chained frame: the prefix and the payload, within what decoders
/// accept (and no smaller than a frame's usual window).
fn chain_window_log(span: usize) -> u32 {
    let need = usize::BITS - span.max(1).leading_zeros();
    need.clamp(21, MAX_WINDOW_LOG.min(23))
}

/// Whether `frame` is a chained v2 frame, and the prefix it names.
pub fn chained_prefix(frame: &[u8]) -> Option<[u8; 8]> {
    if frame.len() < CHAINED_HEADER_LEN || &frame[..4] != MAGIC {
        return None;
    }
    if u16::from_be_bytes([frame[4], frame[5]]) != super::PROTOCOL_V2 {
        return None;
    }
    let dict = u32::from_be_bytes([frame[6], frame[7], frame[8], frame[9]]);
    if dict != CHAINED {
        return None;
    }
    let mut id = [0; 8];
    id.copy_from_slice(&frame[HEADER_LEN..CHAINED_HEADER_LEN]);
    Some(id)
}

/// Finds a kept payload by its id (the hub's, per child); `None`: not held.
pub type Prefixes<'a> = &'a dyn Fn(&[u8; 8]) -> Option<std::sync::Arc<Vec<u8>>>;

// ------------------------------------------------------------------ decoding

/// Decodes a v2 frame (header already checked: magic and version) within `limits`.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Message, WireError> {
    decode_keeping(bytes, limits, None).map(|(m, _)| m)
}

/// [`decode`] that also returns the decompressed payload (to keep as the sender's
/// next prefix) and reads chained frames against the payloads `prefixes` holds; a
/// chained frame whose prefix is not held (or with no `prefixes`) is
/// [`WireError::UnknownPrefix`].
pub fn decode_keeping(
    bytes: &[u8],
    limits: &Limits,
    prefixes: Option<Prefixes<'_>>,
) -> Result<(Message, Vec<u8>), WireError> {
    let payload = inflate_payload(bytes, limits, prefixes)?;
    let msg = from_payload(&payload, limits)?;
    Ok((msg, payload))
}

/// The decompressed payload of a v2 frame (as [`decode_keeping`] reads it).
pub fn inflate_payload(
    bytes: &[u8],
    limits: &Limits,
    prefixes: Option<Prefixes<'_>>,
) -> Result<Vec<u8>, WireError> {
    if bytes.len() < HEADER_LEN {
        return Err(WireError::TooShort(bytes.len()));
    }
    let dict = u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]);
    let src = &bytes[HEADER_LEN..];
    let payload = match dict {
        0 => {
            let d = zstd::stream::read::Decoder::new(src)
                .map_err(|e| WireError::Decompress(e.to_string()))?;
            super::inflate(d, limits, bytes.len())?
        }
        CHAINED => {
            let id = chained_prefix(bytes).ok_or(WireError::TooShort(bytes.len()))?;
            let prefix = prefixes
                .and_then(|find| find(&id))
                .ok_or_else(|| WireError::UnknownPrefix(Prefix::id_hex(&id)))?;
            let d = zstd::stream::read::Decoder::with_ref_prefix(
                std::io::BufReader::new(&bytes[CHAINED_HEADER_LEN..]),
                &prefix,
            )
            .map_err(|e| WireError::Decompress(e.to_string()))?;
            super::inflate(d, limits, bytes.len())?
        }
        id => {
            let dict_bytes = dict::bytes(id).ok_or(WireError::UnknownDictionary(id))?;
            let d = zstd::stream::read::Decoder::with_dictionary(
                std::io::BufReader::new(src),
                dict_bytes,
            )
            .map_err(|e| WireError::Decompress(e.to_string()))?;
            super::inflate(d, limits, bytes.len())?
        }
    };
    Ok(payload)
}

/// One record's id as the block gives it: inside its body, or spelled out.
enum IdRef {
    InBody(u64),
    Text(String),
}

/// The message in a decompressed v2 payload.
pub fn from_payload(payload: &[u8], limits: &Limits) -> Result<Message, WireError> {
    let (msg, counts, block) = read_block(payload, limits)?;
    with_records(msg, counts, block)
}

/// [`from_payload`], but a push's records (a push request's, a sync request's) are
/// left in their block, to be built one at a time ([`RecordBlock::take`]) where they
/// are used: the message comes back with its record list empty. Any other message
/// comes back whole, with no block.
pub fn from_payload_streamed<'a>(
    payload: &'a [u8],
    limits: &Limits,
) -> Result<(Message, Option<RecordBlock<'a>>), WireError> {
    let (msg, counts, block) = read_block(payload, limits)?;
    if matches!(msg, Message::PushRequest(_) | Message::SyncRequest(_)) {
        return Ok((msg, Some(block)));
    }
    with_records(msg, counts, block).map(|m| (m, None))
}

/// `msg` with the records of `block` built into its slots, `counts[k]` into slot k.
fn with_records(
    mut msg: Message,
    counts: Vec<usize>,
    mut block: RecordBlock<'_>,
) -> Result<Message, WireError> {
    let records = (0..block.len())
        .map(|i| block.take(i))
        .collect::<Result<Vec<_>, _>>()?;
    block.finish()?;
    let mut records = records.into_iter();
    for (slot, count) in record_slots(&mut msg).into_iter().zip(counts) {
        match slot {
            Slot::List(list) => list.extend(records.by_ref().take(count)),
            Slot::One(one) => {
                if count == 1 {
                    *one = records.next();
                }
            }
        }
    }
    Ok(msg)
}

/// A v2 record block read up to its bodies: every column decoded, the bodies left
/// in the payload until a record is built ([`RecordBlock::take`]). Errors in a body
/// (a column run out, text that is not UTF-8) are found when its record is built,
/// and values left over in [`RecordBlock::finish`].
pub struct RecordBlock<'a> {
    kinds: Vec<String>,
    nodes: Vec<String>,
    kind_ix: Vec<usize>,
    origin_ix: Vec<usize>,
    ids: Vec<IdRef>,
    hlcs: Vec<Hlc>,
    vvs: Vec<VersionVector>,
    deleted: &'a [u8],
    /// Each record's body position (bodies are grouped by kind: `body_order`).
    pos_of: Vec<usize>,
    bodies: BodyText<'a>,
    taken: Vec<bool>,
    /// What the built records may still cost in memory (`Limits::max_decompressed`
    /// less what was spent).
    budget: usize,
    limit: usize,
}

/// The bodies of a block: as shapes and columns, or as text in the payload (by body
/// position).
enum BodyText<'a> {
    Columns(Box<super::shape::Bodies<'a>>),
    Text(Vec<&'a str>),
}

impl RecordBlock<'_> {
    pub fn len(&self) -> usize {
        self.kind_ix.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kind_ix.is_empty()
    }

    /// The kind of record `i` (known before its record is built).
    pub fn kind(&self, i: usize) -> &str {
        &self.kinds[self.kind_ix[i]]
    }

    /// Builds record `i`, each once. Within a kind, records are built in their
    /// order (a kind's body values are read off its columns in that order); across
    /// kinds, in any. Out of that order, or twice, is refused by name.
    pub fn take(&mut self, i: usize) -> Result<WireRecord, WireError> {
        if i >= self.len() || std::mem::replace(&mut self.taken[i], true) {
            return Err(block(format!(
                "record {i} is not in the block or was built already"
            )));
        }
        let (budget, limit) = (&mut self.budget, self.limit);
        let mut spend = |n: usize| -> Result<(), WireError> {
            *budget = budget.checked_sub(n).ok_or_else(|| WireError::TooLarge {
                what: "decoded record block",
                size: limit.saturating_sub(*budget).saturating_add(n),
                limit,
            })?;
            Ok(())
        };
        let pos = self.pos_of[i];
        let body = match &mut self.bodies {
            BodyText::Columns(bodies) => bodies.rebuild(pos, &mut spend)?,
            BodyText::Text(texts) => texts[pos].to_string(),
        };
        let id = match &mut self.ids[i] {
            IdRef::Text(t) => std::mem::take(t),
            IdRef::InBody(k) => id_from_body(&body, *k)
                .ok_or_else(|| {
                    block(format!(
                        "record {i}: its body has no id after \"id\" number {k}"
                    ))
                })?
                .to_string(),
        };
        let kind = self.kinds[self.kind_ix[i]].clone();
        let origin = self.nodes[self.origin_ix[i]].clone();
        spend(RECORD_OVERHEAD + kind.len() + origin.len() + id.len())?;
        Ok(WireRecord {
            kind,
            id,
            origin,
            hlc: self.hlcs[i],
            vv: std::mem::take(&mut self.vvs[i]),
            deleted: self.deleted[i / 8] & (1 << (i % 8)) != 0,
            body,
        })
    }

    /// After every record was built: body values left over are refused.
    pub fn finish(&self) -> Result<(), WireError> {
        if let Some(i) = self.taken.iter().position(|t| !t) {
            return Err(block(format!("record {i} of the block was never built")));
        }
        match &self.bodies {
            BodyText::Columns(bodies) => bodies.finish(),
            BodyText::Text(_) => Ok(()),
        }
    }
}

/// The skeleton of a v2 payload, its record counts per slot, and its record block.
fn read_block<'a>(
    payload: &'a [u8],
    limits: &Limits,
) -> Result<(Message, Vec<usize>, RecordBlock<'a>), WireError> {
    let mut r = Reader::new(payload);
    let skel_len = r.count(payload.len(), &|| "skeleton length".into())?;
    let skel = r.bytes(skel_len, &|| "skeleton".into())?;
    let mut msg: Message = ciborium::de::from_reader_with_recursion_limit(skel, MAX_DEPTH)
        .map_err(|e| WireError::Decode(e.to_string()))?;
    // What the decoded records may cost in memory beyond the payload itself.
    let mut budget = limits.max_decompressed.saturating_sub(payload.len());
    let mut spend = |n: usize, what: &str| -> Result<(), WireError> {
        // Refused, the block would take what it spent so far and `n` more.
        budget = budget.checked_sub(n).ok_or_else(|| WireError::TooLarge {
            what: "decoded record block",
            size: limits
                .max_decompressed
                .saturating_sub(budget)
                .saturating_add(n),
            limit: limits.max_decompressed,
        })?;
        let _ = what;
        Ok(())
    };

    let n_slots = record_slots(&mut msg).len();
    let declared = r.count(n_slots.max(r.remaining()), &|| {
        "number of record lists".into()
    })?;
    if declared != n_slots {
        return Err(block(format!(
            "the record block has {declared} record lists, the {} message has {n_slots}",
            msg.name()
        )));
    }
    let mut counts = Vec::with_capacity(n_slots);
    let mut total = 0usize;
    for (i, slot) in record_slots(&mut msg).into_iter().enumerate() {
        let what = || format!("record count of list {i}");
        let c = r.varint(&what)?;
        match slot {
            Slot::One(one) => {
                if c > 1 || one.is_some() {
                    return Err(block(format!("list {i} holds one record at most, not {c}")));
                }
            }
            Slot::List(list) => {
                if !list.is_empty() {
                    return Err(block(format!(
                        "list {i} carries records inside the skeleton"
                    )));
                }
            }
        }
        total = total.saturating_add(usize::try_from(c).unwrap_or(usize::MAX));
        if total > limits.max_records {
            return Err(WireError::TooManyRecords {
                count: total,
                limit: limits.max_records,
            });
        }
        counts.push(c as usize);
    }
    // Every record takes at least 6 bytes of columns (kind, origin, id, clock, vv):
    // a count the remaining bytes cannot hold is refused before allocating.
    if total.saturating_mul(6) > r.remaining() {
        return Err(block(format!(
            "{total} records cannot fit in the {} bytes left",
            r.remaining()
        )));
    }
    let flags = r.bytes(1, &|| "flags".into())?[0];
    if flags & !(FLAG_NEWLINES | FLAG_BODY_COLUMNS | FLAG_RESULTS) != 0
        || flags & (FLAG_NEWLINES | FLAG_BODY_COLUMNS) == FLAG_NEWLINES | FLAG_BODY_COLUMNS
    {
        return Err(block(format!("unknown flags {flags:#04x}")));
    }
    let n_kinds = r.count(total, &|| "number of kinds".into())?;
    let mut kinds = Vec::with_capacity(n_kinds);
    for k in 0..n_kinds {
        kinds.push(r.string(MAX_TABLE_STRING, &|| format!("kind {k}"))?);
    }
    let n_nodes = r.count(MAX_NODES.min(r.remaining()), &|| "number of nodes".into())?;
    let mut nodes = Vec::with_capacity(n_nodes);
    for k in 0..n_nodes {
        nodes.push(r.string(MAX_TABLE_STRING, &|| format!("node {k}"))?);
    }
    let index = |r: &mut Reader<'_>, len: usize, i: usize, col: &str| -> Result<usize, WireError> {
        let v = r.varint(&|| format!("record {i}: {col} index"))?;
        if v >= len as u64 {
            return Err(block(format!(
                "record {i}: {col} index {v} is outside the {col} table ({len} entries)"
            )));
        }
        Ok(v as usize)
    };
    let mut kind_ix = Vec::with_capacity(total);
    for i in 0..total {
        kind_ix.push(index(&mut r, kinds.len(), i, "kind")?);
    }
    let mut origin_ix = Vec::with_capacity(total);
    for i in 0..total {
        origin_ix.push(index(&mut r, nodes.len(), i, "node")?);
    }
    let mut ids = Vec::with_capacity(total);
    for i in 0..total {
        let k = r.varint(&|| format!("record {i}: id position"))?;
        ids.push(match k {
            0 => IdRef::Text(r.string(r.remaining(), &|| format!("record {i}: id"))?),
            k if k <= MAX_ID_OCCURRENCE as u64 => IdRef::InBody(k),
            k => {
                return Err(block(format!(
                    "record {i}: id is said to follow \"id\" number {k} of its body (at most {MAX_ID_OCCURRENCE})"
                )))
            }
        });
    }
    let base = r.varint(&|| "clock base".into())?;
    let (mut prev, mut prev_counter) = (base, 0u32);
    let mut hlcs = Vec::with_capacity(total);
    for i in 0..total {
        let d = unzigzag(r.varint(&|| format!("record {i}: clock"))?) as u64;
        let wall_ms = prev.wrapping_add(d);
        let c = r.varint(&|| format!("record {i}: clock counter"))?;
        let c = if d == 0 {
            i64::from(prev_counter).checked_add(unzigzag(c))
        } else {
            i64::try_from(c).ok()
        };
        let counter = c
            .and_then(|c| u32::try_from(c).ok())
            .ok_or_else(|| block(format!("record {i}: clock counter is outside 0..2^32")))?;
        hlcs.push(Hlc { wall_ms, counter });
        prev = wall_ms;
        prev_counter = counter;
    }
    let mut last = vec![0u64; nodes.len()];
    let mut vvs = Vec::with_capacity(total);
    for i in 0..total {
        vvs.push(read_vv(
            &mut r,
            &nodes,
            &mut last,
            &format_args!("record {i}"),
            &mut spend,
        )?);
    }
    let bits = r.bytes(total.div_ceil(8), &|| "deleted bitmap".into())?;
    if total % 8 != 0 && bits[total / 8] >> (total % 8) != 0 {
        return Err(block("deleted bitmap has bits set past the last record"));
    }
    // Bodies come grouped by kind (see `body_order`), newline-terminated or after a
    // length column.
    let order = body_order_of(&kind_ix);
    let mut pos_of = vec![0usize; total];
    for (pos, &i) in order.iter().enumerate() {
        pos_of[i] = pos;
    }
    let bodies = if flags & FLAG_BODY_COLUMNS != 0 {
        let kinds: Vec<usize> = order.iter().map(|&i| kind_ix[i]).collect();
        BodyText::Columns(Box::new(super::shape::Bodies::read(
            &mut r,
            &kinds,
            &order,
            &mut |n| spend(n, "body"),
        )?))
    } else if flags & FLAG_NEWLINES != 0 {
        let mut texts = Vec::with_capacity(total);
        for &i in &order {
            let rest = &r.buf[r.pos..];
            let len = rest
                .iter()
                .position(|&b| b == b'\n')
                .ok_or_else(|| block(format!("record {i}: body has no end")))?;
            texts.push(
                std::str::from_utf8(&rest[..len])
                    .map_err(|_| block(format!("record {i}: body is not UTF-8")))?,
            );
            r.pos += len + 1;
        }
        BodyText::Text(texts)
    } else {
        let mut lens = Vec::with_capacity(total);
        let mut body_bytes = 0usize;
        for &i in &order {
            let len = r.count(r.remaining(), &|| format!("record {i}: body length"))?;
            body_bytes = body_bytes.saturating_add(len);
            lens.push(len);
        }
        if body_bytes > r.remaining() {
            return Err(block(format!(
                "bodies should take {body_bytes} bytes, {} remain",
                r.remaining()
            )));
        }
        let mut texts = Vec::with_capacity(total);
        for (&i, &len) in order.iter().zip(&lens) {
            let b = r.bytes(len, &|| format!("record {i}: body"))?;
            texts.push(
                std::str::from_utf8(b)
                    .map_err(|_| block(format!("record {i}: body is not UTF-8")))?,
            );
        }
        BodyText::Text(texts)
    };
    if flags & FLAG_RESULTS != 0 {
        let results = read_results(&mut r, limits, &mut spend)?;
        match results_slot(&mut msg) {
            Some(slot) if slot.is_empty() => *slot = results,
            Some(_) => return Err(block("push results both in the skeleton and in columns")),
            None => {
                return Err(block(format!(
                    "a {} message carries no push results",
                    msg.name()
                )))
            }
        }
    }
    if r.remaining() != 0 {
        return Err(block(format!(
            "{} bytes remain after the last body",
            r.remaining()
        )));
    }
    let limit = limits.max_decompressed;
    Ok((
        msg,
        counts,
        RecordBlock {
            kinds,
            nodes,
            kind_ix,
            origin_ix,
            ids,
            hlcs,
            vvs,
            deleted: bits,
            pos_of,
            bodies,
            taken: vec![false; total],
            budget,
            limit,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::super::{
        decode as decode_any, encode_as, encode_with, Cursor, Encoding, FetchResponse, FetchResult,
        Outcome, PullResponse, PushRequest, PushResponse, PushResult,
    };
    use super::*;

    fn rec(i: usize, kind: &str, id: &str, origin: &str, vv: &[(&str, u64)]) -> WireRecord {
        WireRecord {
            kind: kind.into(),
            id: id.into(),
            origin: origin.into(),
            hlc: Hlc {
                wall_ms: 1_795_000_000_000 + (i as u64 * 7919) % 5000,
                counter: (i % 3) as u32,
            },
            vv: VersionVector(vv.iter().map(|(n, c)| (n.to_string(), *c)).collect()),
            deleted: i % 5 == 3,
            body: format!(
                r#"{{"id":"{id}","resourceType":"{kind}","status":"final","valueQuantity":{{"value":{i}}}}}"#
            ),
        }
    }

    /// Records that reach every column path: ids in the body and spelled out (one
    /// not in its body, one with a quote, an empty one), several nodes and vectors,
    /// clocks going back, deletions, non-ASCII bodies.
    fn records(n: usize) -> Vec<WireRecord> {
        let mut out: Vec<WireRecord> = (0..n)
            .map(|i| {
                let kind = ["Patient", "Encounter", "Observation"][i % 3];
                let id = format!("4f6c2a1e-{i:04x}-4b5e-9c1d-2a7e5f3b8c90");
                let vv: &[(&str, u64)] = if i % 4 == 0 {
                    &[("clinic-a", 1 + i as u64), ("hub", 3)]
                } else {
                    &[("clinic-a", 1 + i as u64)]
                };
                rec(
                    i,
                    kind,
                    &id,
                    if i % 7 == 0 { "hub" } else { "clinic-a" },
                    vv,
                )
            })
            .collect();
        if n >= 3 {
            out[1].id = "not-in-body".into();
            out[2].id = "quo\"te".into();
            out[2].body = r#"{"id":"quo\"te","resourceType":"Patient","name":"Ñandú ☃"}"#.into();
        }
        out.push(WireRecord {
            id: String::new(),
            vv: VersionVector::default(),
            ..rec(n, "openmrs:concept", "", "district-7", &[])
        });
        out
    }

    fn messages() -> Vec<Message> {
        vec![
            Message::PushRequest(PushRequest {
                node: "clinic-a".into(),
                records: records(40),
            }),
            Message::PushRequest(PushRequest {
                node: "clinic-a".into(),
                records: Vec::new(),
            }),
            // A body with a newline: the length column instead of newline ends.
            Message::PushRequest(PushRequest {
                node: "clinic-a".into(),
                records: {
                    let mut r = records(4);
                    r[3].body = "{\"id\":\"x\",\n\"resourceType\":\"Patient\"}".into();
                    r
                },
            }),
            Message::PullResponse(PullResponse {
                records: records(9),
                next: Cursor { eff: 9, seq: 12 },
                more: true,
                head: 99,
                orders: Vec::new(),
                bundle_seq: 4,
            }),
            Message::FetchResponse(FetchResponse {
                results: vec![
                    FetchResult {
                        kind: "Patient".into(),
                        id: "p1".into(),
                        record: Some(records(1).remove(0)),
                        refused: None,
                    },
                    FetchResult {
                        kind: "Patient".into(),
                        id: "p2".into(),
                        record: None,
                        refused: Some("not in your catchment".into()),
                    },
                    FetchResult {
                        kind: "Patient".into(),
                        id: "p3".into(),
                        record: Some(records(3).remove(2)),
                        refused: None,
                    },
                ],
            }),
            Message::PushResponse(PushResponse {
                results: vec![PushResult {
                    i: 0,
                    vv: VersionVector::default(),
                    outcome: Outcome::Accepted,
                }],
            }),
        ]
    }

    #[test]
    fn split_is_take_records_without_the_copy() {
        let mut all = messages();
        let pull = match &all[3] {
            Message::PullResponse(p) => p.clone(),
            _ => unreachable!("messages()[3] is the pull answer"),
        };
        all.push(Message::SyncRequest(super::super::SyncRequest {
            push: PushRequest {
                node: "clinic-a".into(),
                records: records(7),
            },
            pull: super::super::PullRequest {
                node: "clinic-a".into(),
                cursor: Cursor { eff: 3, seq: 4 },
                max_bytes: 1 << 20,
                max_records: 500,
                include_own: false,
                answer_chunk: 65_536,
                health: Vec::new(),
                order_results: Vec::new(),
            },
        }));
        all.push(Message::SyncResponse(super::super::SyncResponse {
            push: PushResponse {
                results: vec![PushResult {
                    i: 0,
                    vv: VersionVector::default(),
                    outcome: Outcome::Accepted,
                }],
            },
            pull,
        }));
        for msg in all {
            let mut copy = msg.clone();
            let (counts, records) = take_records(&mut copy);
            if let Some(results) = results_slot(&mut copy) {
                results.clear();
            }
            let (skeleton, split_counts, split_records) = split(&msg);
            assert_eq!(skeleton, copy, "{}", msg.name());
            assert_eq!(split_counts, counts, "{}", msg.name());
            assert_eq!(&*split_records, records.as_slice(), "{}", msg.name());
            let borrowed = matches!(split_records, Records::Borrowed(_));
            assert_eq!(
                borrowed,
                counts.len() == 1 && !matches!(msg, Message::FetchResponse(_)),
                "{}",
                msg.name()
            );
        }
    }

    #[test]
    fn every_message_decodes_from_v2_exactly_as_from_v1() {
        for msg in messages() {
            let v1 = decode_any(&encode_with(&msg, 3).unwrap(), &Limits::default()).unwrap();
            for (dict, columns) in [
                (0, false),
                (dict::newest(), false),
                (0, true),
                (dict::newest(), true),
            ] {
                let frame = encode_as(&msg, 3, Encoding::V2 { dict, columns }).unwrap();
                assert_eq!(&frame[4..6], &[0, 2], "{} went as v2", msg.name());
                assert_eq!(u32::from_be_bytes(frame[6..10].try_into().unwrap()), dict);
                let back = decode_any(&frame, &Limits::default()).unwrap();
                assert_eq!(
                    back,
                    v1,
                    "{} with dictionary {dict}, columns {columns}",
                    msg.name()
                );
                assert_eq!(back, msg);
            }
        }
    }

    #[test]
    fn large_bulk_payloads_go_without_the_dictionary_small_ones_with_it() {
        let big = Message::PullResponse(PullResponse {
            records: records(3000),
            next: Cursor::default(),
            more: false,
            head: 0,
            orders: Vec::new(),
            bundle_seq: 0,
        });
        assert!(payload(&big, false).unwrap().unwrap().len() > DICT_MAX_BULK_PAYLOAD);
        let dict_of = |m: &Message, level| {
            let f = encode_as(
                m,
                level,
                Encoding::V2 {
                    dict: dict::newest(),
                    columns: false,
                },
            )
            .unwrap();
            assert_eq!(&decode_any(&f, &Limits::default()).unwrap(), m);
            u32::from_be_bytes(f[6..10].try_into().unwrap())
        };
        assert_eq!(dict_of(&big, super::super::LEVEL_BULK), 0);
        assert_eq!(dict_of(&big, super::super::LEVEL_FAST), dict::newest());
        assert_eq!(
            dict_of(&big, super::super::level::LEVEL_SLOW_LINK),
            dict::newest(),
            "a slow link's pushes keep it"
        );
        assert_eq!(
            dict_of(&messages()[0], super::super::LEVEL_BULK),
            dict::newest()
        );
    }

    #[test]
    fn a_message_outside_the_v2_bounds_goes_as_v1() {
        let mut r = records(1).remove(0);
        r.kind = "K".repeat(MAX_TABLE_STRING + 1);
        let msg = Message::PushRequest(PushRequest {
            node: "a".into(),
            records: vec![r],
        });
        let frame = encode_as(
            &msg,
            3,
            Encoding::V2 {
                dict: 0,
                columns: false,
            },
        )
        .unwrap();
        assert_eq!(&frame[4..6], &[0, 1]);
        assert_eq!(decode_any(&frame, &Limits::default()).unwrap(), msg);
    }

    /// A v2 frame around a hand-made payload.
    fn frame(payload: &[u8], dict: u32) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&2u16.to_be_bytes());
        out.extend_from_slice(&dict.to_be_bytes());
        out.extend(zstd::bulk::compress(payload, 1).unwrap());
        out
    }

    /// The payload of a push of `records` as our encoder writes it.
    fn payload_of(records: Vec<WireRecord>) -> Vec<u8> {
        payload_in(records, false)
    }

    /// The same, bodies as text or as shapes and columns.
    fn payload_in(records: Vec<WireRecord>, columns: bool) -> Vec<u8> {
        let msg = Message::PushRequest(PushRequest {
            node: "clinic-a".into(),
            records,
        });
        let f = encode_as(&msg, 1, Encoding::V2 { dict: 0, columns }).unwrap();
        zstd::stream::decode_all(&f[HEADER_LEN..]).unwrap()
    }

    /// A push's block builds its records in any order across kinds (a hub builds
    /// Patients first) into exactly what the whole decode gives, in both body forms
    /// (enough records that the columns are the smaller: a small block may go in
    /// either); within a kind out of order, or a record twice, is refused by name.
    #[test]
    fn a_block_builds_records_across_kinds_in_any_order_and_within_a_kind_in_order() {
        let recs = records(600);
        for columns in [true, false] {
            let payload = payload_in(recs.clone(), columns);
            let whole = match from_payload(&payload, &Limits::default()).unwrap() {
                Message::PushRequest(p) => p.records,
                other => panic!("{}", other.name()),
            };
            assert_eq!(whole, recs);
            let (skeleton, block) = from_payload_streamed(&payload, &Limits::default()).unwrap();
            let mut block = block.expect("a push comes with its block");
            assert_eq!(matches!(block.bodies, BodyText::Columns(_)), columns);
            assert!(matches!(skeleton, Message::PushRequest(ref p) if p.records.is_empty()));
            // Patients first, then the other kinds from the last record back to
            // the first kind met: across kinds in any order, within one in order.
            let n = block.len();
            let mut order: Vec<usize> = (0..n).filter(|&i| block.kind(i) == "Patient").collect();
            let mut kinds: Vec<String> = Vec::new();
            for i in (0..n).rev() {
                let k = block.kind(i).to_string();
                if k != "Patient" && !kinds.contains(&k) {
                    kinds.push(k);
                }
            }
            for k in &kinds {
                order.extend((0..n).filter(|&i| block.kind(i) == k));
            }
            let mut built = vec![None; n];
            for i in order {
                built[i] = Some(block.take(i).unwrap());
            }
            block.finish().unwrap();
            let built: Vec<WireRecord> = built.into_iter().map(Option::unwrap).collect();
            assert_eq!(built, recs, "columns: {columns}");
        }
        // As columns, a kind's order is what keeps each value with its body.
        let payload = payload_in(recs.clone(), true);
        let (_, block) = from_payload_streamed(&payload, &Limits::default()).unwrap();
        let mut block = block.unwrap();
        // Records 0 and 3 are Patients: 3 before 0 is out of order.
        assert_eq!((block.kind(0), block.kind(3)), ("Patient", "Patient"));
        let err = block.take(3).unwrap_err().to_string();
        assert!(
            err.contains("record 3: body wanted out of its kind's order"),
            "{err}"
        );
        let (_, block) = from_payload_streamed(&payload, &Limits::default()).unwrap();
        let mut block = block.unwrap();
        block.take(0).unwrap();
        let err = block.take(0).unwrap_err().to_string();
        assert!(
            err.contains("record 0 is not in the block or was built already"),
            "{err}"
        );
        let err = block.finish().unwrap_err().to_string();
        assert!(err.contains("was never built"), "{err}");
        // Any other message comes whole.
        let pull = Message::PullResponse(PullResponse {
            records: recs.clone(),
            next: Cursor::default(),
            more: false,
            head: 7,
            orders: Vec::new(),
            bundle_seq: 0,
        });
        let p = super::payload(&pull, true).unwrap().unwrap();
        let (msg, block) = from_payload_streamed(&p, &Limits::default()).unwrap();
        assert!(block.is_none());
        assert_eq!(msg, pull);
    }

    fn block_err(payload: &[u8]) -> String {
        match decode_any(&frame(payload, 0), &Limits::default()) {
            Err(WireError::Block(m)) => m,
            other => panic!("expected a block error, got {other:?}"),
        }
    }

    #[test]
    fn an_unknown_dictionary_is_refused_not_misdecoded() {
        let msg = &messages()[0];
        let mut f = encode_as(
            msg,
            3,
            Encoding::V2 {
                dict: dict::newest(),
                columns: false,
            },
        )
        .unwrap();
        f[6..10].copy_from_slice(&4242u32.to_be_bytes());
        let err = decode_any(&f, &Limits::default()).unwrap_err();
        assert!(matches!(err, WireError::UnknownDictionary(4242)), "{err}");
        assert!(err.to_string().contains("dictionary 4242"), "{err}");
        // A dictionary frame read without its dictionary fails, never decodes.
        f[6..10].copy_from_slice(&0u32.to_be_bytes());
        assert!(decode_any(&f, &Limits::default()).is_err());
        // Encoding with a dictionary we do not have is an error too.
        assert!(matches!(
            encode_as(
                msg,
                3,
                Encoding::V2 {
                    dict: 4242,
                    columns: false
                }
            ),
            Err(WireError::UnknownDictionary(4242))
        ));
    }

    #[test]
    fn every_cut_of_a_payload_is_refused_with_a_clear_error() {
        for columns in [false, true] {
            let p = payload_in(records(6), columns);
            for cut in 0..p.len() {
                let r = decode_any(&frame(&p[..cut], 0), &Limits::default());
                assert!(
                    matches!(r, Err(WireError::Block(_)) | Err(WireError::Decode(_))),
                    "columns {columns}, cut at {cut}: {r:?}"
                );
            }
            // And trailing bytes are not ignored.
            let mut long = p.clone();
            long.push(0);
            let err = block_err(&long);
            assert!(err.contains("remain"), "columns {columns}: {err}");
        }
    }

    #[test]
    fn every_flipped_byte_is_refused_or_decodes_to_a_message_that_encodes_again() {
        for columns in [false, true] {
            let p = payload_in(records(5), columns);
            for i in 0..p.len() {
                for bit in [0x01u8, 0x80] {
                    let mut q = p.clone();
                    q[i] ^= bit;
                    if let Ok(m) = decode_any(&frame(&q, 0), &Limits::default()) {
                        for columns in [false, true] {
                            let again =
                                encode_as(&m, 1, Encoding::V2 { dict: 0, columns }).unwrap();
                            assert_eq!(decode_any(&again, &Limits::default()).unwrap(), m);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn indexes_outside_their_tables_name_the_record() {
        // One record: skeleton, 1 list of 1, flags 0, kinds ["P"], nodes ["a"],
        // kind index 5.
        let skel = crate::wire::to_cbor(&Message::PushRequest(PushRequest {
            node: "a".into(),
            records: Vec::new(),
        }))
        .unwrap();
        let mut p = Vec::new();
        put_varint(&mut p, skel.len() as u64);
        p.extend_from_slice(&skel);
        p.extend_from_slice(&[
            1, 1, 0, 1, 1, b'P', 1, 1, b'a', 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        let m = block_err(&p);
        assert!(m.contains("record 0: kind index 5"), "{m}");
    }

    #[test]
    fn counts_are_checked_before_anything_is_allocated() {
        let skel = crate::wire::to_cbor(&Message::PushRequest(PushRequest {
            node: "a".into(),
            records: Vec::new(),
        }))
        .unwrap();
        let mut p = Vec::new();
        put_varint(&mut p, skel.len() as u64);
        p.extend_from_slice(&skel);
        let head = p.clone();
        // A billion records: over max_records.
        p.push(1);
        put_varint(&mut p, 1 << 30);
        let err = decode_any(&frame(&p, 0), &Limits::default()).unwrap_err();
        assert!(matches!(err, WireError::TooManyRecords { .. }), "{err}");
        // Within max_records but not within the bytes that follow.
        let mut p = head.clone();
        p.extend_from_slice(&[1, 100]);
        assert!(block_err(&p).contains("cannot fit"));
        // Two lists where a push has one.
        let mut p = head;
        p.extend_from_slice(&[2, 0, 0]);
        assert!(block_err(&p).contains("2 record lists"));
    }

    #[test]
    fn a_skeleton_that_carries_records_itself_is_refused() {
        let skel = crate::wire::to_cbor(&Message::PushRequest(PushRequest {
            node: "a".into(),
            records: records(1),
        }))
        .unwrap();
        let mut p = Vec::new();
        put_varint(&mut p, skel.len() as u64);
        p.extend_from_slice(&skel);
        p.extend_from_slice(&[1, 0, 1, 0, 0, 0]);
        assert!(block_err(&p).contains("inside the skeleton"));
    }

    #[test]
    fn repeated_version_vector_nodes_are_refused() {
        let mut p = payload_of(vec![rec(0, "Patient", "p", "a", &[("a", 1)])]);
        // Layout after the skeleton: lists 1,1; flags; kinds 1 "Patient"; nodes 1
        // "a"; kind 0; origin 0; id 1 (in the body); base; delta 0; counter 0; vv: 1
        // entry (node 0, +1 = zigzag 2). Rewrite the vector as two entries for node 0.
        let at = p.windows(4).rposition(|w| w == [0, 1, 0, 2]).unwrap() + 1;
        p.splice(at..at + 3, [2, 0, 2, 0, 0]);
        let m = block_err(&p);
        assert!(m.contains("record 0: version vector"), "{m}");
    }

    /// `frame` decodes into more than 4 MiB and is refused for it.
    fn refused_as_too_large_under_4_mib(frame: &[u8]) {
        let limits = Limits {
            max_decompressed: 4 << 20,
            ..Limits::default()
        };
        let err = decode_any(frame, &limits).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::TooLarge {
                    what: "decoded record block",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_small_block_cannot_decode_into_a_huge_message() {
        // 2,000 records each naming 64 nodes of 256 bytes in their vectors: a few
        // hundred KB of block, ~33 MB decoded.
        let nodes: Vec<String> = (0..64).map(|i| format!("{i:0>256}")).collect();
        let recs: Vec<WireRecord> = (0..2000)
            .map(|i| WireRecord {
                vv: VersionVector(nodes.iter().map(|n| (n.clone(), 1)).collect()),
                ..rec(i, "Patient", "p", "a", &[])
            })
            .collect();
        let msg = Message::PushRequest(PushRequest {
            node: "a".into(),
            records: recs,
        });
        let f = encode_as(
            &msg,
            1,
            Encoding::V2 {
                dict: 0,
                columns: false,
            },
        )
        .unwrap();
        refused_as_too_large_under_4_mib(&f);
    }

    #[test]
    fn bodies_as_columns_come_back_byte_for_byte_whatever_they_hold() {
        // Bodies a hostile or broken peer could send: raw control characters (they go
        // verbatim), placeholder bytes, whitespace, unbalanced brackets, bare words,
        // numbers that are not numbers, keys with escapes, nothing at all.
        let bodies = [
            r#"{"id":"x","resourceType":"Patient","n":-1.5e+3,"ok":true,"z":null}"#,
            "{\"a\":\"tab\there\"}",
            "{\"a\":\u{1}}",
            "{\"a\":\"\u{2}\"}",
            " {\n\t\"k\\\"ey\" : [ 1 , \"v\" ] } ",
            "]]]}}}{{{[[[\"a\":1",
            "--12e-e+.",
            "truefalse nul",
            "\"unterminated",
            "\"ends in a backslash\\",
            "",
            "{\"id\":\"x\",\"deep\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"v\"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}",
        ];
        let recs: Vec<WireRecord> = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| WireRecord {
                body: (*b).into(),
                ..rec(i, ["Patient", "Observation"][i % 2], "x", "a", &[("a", 1)])
            })
            .collect();
        let msg = Message::PushRequest(PushRequest {
            node: "a".into(),
            records: recs,
        });
        for dict in [0, dict::newest()] {
            let f = encode_as(
                &msg,
                3,
                Encoding::V2 {
                    dict,
                    columns: true,
                },
            )
            .unwrap();
            assert_eq!(decode_any(&f, &Limits::default()).unwrap(), msg);
        }
    }

    /// A push answer with every outcome, clinic and hub counters interleaved.
    fn answer(n: u32) -> Message {
        let outcomes = [
            Outcome::Accepted,
            Outcome::Duplicate,
            Outcome::Stale,
            Outcome::Conflict {
                resolution: "merged".into(),
                lost: false,
            },
            Outcome::Conflict {
                resolution: "remote wins".into(),
                lost: true,
            },
            Outcome::Rejected {
                reason: "Patient/x is not in this clinic's catchment".into(),
                permanent: true,
            },
            Outcome::Rejected {
                reason: "busy".into(),
                permanent: false,
            },
        ];
        Message::PushResponse(PushResponse {
            results: (0..n)
                .map(|i| PushResult {
                    i: i * 2 % n.max(1),
                    vv: if i % 5 == 0 {
                        VersionVector(
                            [
                                ("clinic-a".to_string(), 100 + u64::from(i)),
                                ("hub".to_string(), 7),
                            ]
                            .into_iter()
                            .collect(),
                        )
                    } else {
                        VersionVector(
                            [("clinic-a".to_string(), 100 + u64::from(i))]
                                .into_iter()
                                .collect(),
                        )
                    },
                    outcome: if i < 7 {
                        outcomes[i as usize].clone()
                    } else {
                        Outcome::Accepted
                    },
                })
                .collect(),
        })
    }

    #[test]
    fn push_results_as_columns_decode_exactly_and_are_a_fraction_of_the_size() {
        let msg = answer(2000);
        let text = encode_as(
            &msg,
            3,
            Encoding::V2 {
                dict: dict::newest(),
                columns: false,
            },
        )
        .unwrap();
        let cols = encode_as(
            &msg,
            3,
            Encoding::V2 {
                dict: dict::newest(),
                columns: true,
            },
        )
        .unwrap();
        assert_eq!(decode_any(&cols, &Limits::default()).unwrap(), msg);
        assert!(
            cols.len() * 5 < text.len(),
            "{} against {}",
            cols.len(),
            text.len()
        );
        // Inside a sync answer too.
        let sync = Message::SyncResponse(super::super::SyncResponse {
            push: match msg {
                Message::PushResponse(p) => p,
                _ => unreachable!(),
            },
            pull: PullResponse {
                records: records(4),
                next: Cursor { eff: 1, seq: 2 },
                more: false,
                head: 9,
                orders: Vec::new(),
                bundle_seq: 0,
            },
        });
        let f = encode_as(
            &sync,
            3,
            Encoding::V2 {
                dict: 0,
                columns: true,
            },
        )
        .unwrap();
        assert_eq!(decode_any(&f, &Limits::default()).unwrap(), sync);
    }

    #[test]
    fn a_results_block_cut_or_flipped_is_refused_or_decodes_to_a_message_that_encodes_again() {
        let p = payload_in_msg(&answer(12));
        for cut in 0..p.len() {
            let r = decode_any(&frame(&p[..cut], 0), &Limits::default());
            assert!(
                matches!(r, Err(WireError::Block(_)) | Err(WireError::Decode(_))),
                "cut at {cut}: {r:?}"
            );
        }
        for i in 0..p.len() {
            for bit in [0x01u8, 0x80] {
                let mut q = p.clone();
                q[i] ^= bit;
                if let Ok(m) = decode_any(&frame(&q, 0), &Limits::default()) {
                    for columns in [false, true] {
                        let again = encode_as(&m, 1, Encoding::V2 { dict: 0, columns }).unwrap();
                        assert_eq!(decode_any(&again, &Limits::default()).unwrap(), m);
                    }
                }
            }
        }
    }

    /// The payload of `msg` with results as columns (bodies as columns too).
    fn payload_in_msg(msg: &Message) -> Vec<u8> {
        payload(msg, true).unwrap().unwrap()
    }

    #[test]
    fn a_small_payload_goes_in_whichever_form_is_smaller() {
        let msg = Message::PushRequest(PushRequest {
            node: "clinic-a".into(),
            records: records(5),
        });
        let frame = |columns| {
            encode_as(
                &msg,
                3,
                Encoding::V2 {
                    dict: dict::newest(),
                    columns,
                },
            )
            .unwrap()
        };
        let (text, chosen) = (frame(false), frame(true));
        // The case is one where columns alone would lose: the choice is what wins.
        let parts = Parts::of(&msg, true).unwrap().unwrap();
        let columns_only = compress(&parts, 3, dict::newest()).unwrap();
        assert!(
            columns_only.len() > text.len(),
            "{} <= {}",
            columns_only.len(),
            text.len()
        );
        assert!(
            chosen.len() <= text.len(),
            "{} > {}",
            chosen.len(),
            text.len()
        );
        assert_eq!(decode_any(&chosen, &Limits::default()).unwrap(), msg);
        assert_eq!(chosen, frame(true), "the same frame every time");
    }

    #[test]
    fn bodies_as_columns_are_smaller_than_bodies_as_text() {
        let msg = Message::PushRequest(PushRequest {
            node: "clinic-a".into(),
            records: records(600),
        });
        let size = |columns| {
            encode_as(&msg, 3, Encoding::V2 { dict: 0, columns })
                .unwrap()
                .len()
        };
        let (text, cols) = (size(false), size(true));
        assert!(cols < text, "columns {cols} bytes, text {text}");
    }

    #[test]
    fn a_shape_sent_once_cannot_rebuild_into_a_huge_message() {
        // One body of 22 KB of keys, and 1,000 records of that shape with one value
        // each: a block of ~30 KB that would rebuild into 22 MB of bodies.
        let keys: String = (0..2_000).map(|i| format!("\"k{i:04}\":true,")).collect();
        let recs: Vec<WireRecord> = (0..1000)
            .map(|i| WireRecord {
                body: format!("{{{keys}\"v\":{i}}}"),
                ..rec(i, "Patient", "p", "a", &[])
            })
            .collect();
        let msg = Message::PushRequest(PushRequest {
            node: "a".into(),
            records: recs,
        });
        let f = encode_as(
            &msg,
            1,
            Encoding::V2 {
                dict: 0,
                columns: true,
            },
        )
        .unwrap();
        assert!(f.len() < 64 << 10, "{} bytes", f.len());
        refused_as_too_large_under_4_mib(&f);
    }

    #[test]
    fn a_column_with_values_left_over_or_run_out_is_refused() {
        let p = payload_in(records(6), true);
        // The last body column ends in b"\n": one value more, then one fewer.
        let mut more = p.clone();
        more.extend_from_slice(b"x\n");
        assert!(block_err(&more).contains("remain"), "{}", block_err(&more));
        let last_len_at = p.len() - 1;
        let mut cut = p.clone();
        cut.truncate(last_len_at);
        assert!(decode_any(&frame(&cut, 0), &Limits::default()).is_err());
    }

    #[test]
    fn varints_and_zigzag_round_trip_at_the_edges() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            u32::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut r = Reader { buf: &out, pos: 0 };
            assert_eq!(r.varint(&|| "v".into()).unwrap(), v);
            assert_eq!(r.remaining(), 0);
        }
        for v in [0i64, 1, -1, i64::MAX, i64::MIN, 12345, -98765] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        // Eleven continuation bytes, or a tenth byte above 1: over 64 bits.
        let mut r = Reader {
            buf: &[0xff; 11],
            pos: 0,
        };
        assert!(
            matches!(r.varint(&|| "v".into()), Err(WireError::Block(m)) if m.contains("64 bits"))
        );
        let mut r = Reader {
            buf: &[0x80],
            pos: 0,
        };
        assert!(
            matches!(r.varint(&|| "v".into()), Err(WireError::Block(m)) if m.contains("cut off"))
        );
    }

    /// A push of `patients` synthetic patients' records (11 each), as a clinic sends.
    fn synth_push(seed: u64, prefix: &str, patients: usize) -> Message {
        let records = crate::synth::clinic_records(seed, prefix, "North", "loc-1", patients, 2, 4)
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let s = crate::model::Snapshot::from_json_value(v).unwrap();
                WireRecord {
                    body: String::from_utf8(s.body).unwrap(),
                    ..rec(
                        i,
                        &s.key.kind,
                        &s.key.id,
                        "clinic-a",
                        &[("clinic-a", 1 + i as u64)],
                    )
                }
            })
            .collect();
        Message::PushRequest(PushRequest {
            node: "clinic-a".into(),
            records,
        })
    }

    #[test]
    fn a_chained_frame_decodes_against_its_prefix_and_is_a_fraction_of_one_alone() {
        let dict = dict::newest();
        let (first, second) = (synth_push(1, "a", 40), synth_push(2, "b", 40));
        let (f1, p1) = encode_chained(&first, 15, dict, true, None)
            .unwrap()
            .unwrap();
        let p1 = p1.unwrap();
        // The first frame of a chain is an ordinary v2 frame, and what the receiver
        // decodes from it is the payload the sender keeps.
        assert_eq!(chained_prefix(&f1), None);
        let (m1, kept) = decode_keeping(&f1, &Limits::default(), None).unwrap();
        assert_eq!(m1, first);
        assert_eq!(kept, *p1.payload);
        let (f2, p2) = encode_chained(&second, 15, dict, true, Some(&p1))
            .unwrap()
            .unwrap();
        assert_eq!(chained_prefix(&f2), Some(p1.id));
        let held = |id: &[u8; 8]| (id == &p1.id).then(|| p1.payload.clone());
        let (m2, kept2) = decode_keeping(&f2, &Limits::default(), Some(&held)).unwrap();
        assert_eq!(m2, second);
        assert_eq!(kept2, *p2.unwrap().payload);
        let alone = encode(&second, 15, dict, true).unwrap().unwrap();
        // Our generator's records are alike enough that the dictionary already
        // holds most of what the prefix would give (BENCHMARKS.md has the held-out
        // data's figures, where chaining saves a fifth of the push).
        assert!(
            f2.len() < alone.len(),
            "chained {} bytes against {} alone",
            f2.len(),
            alone.len()
        );
    }

    #[test]
    fn a_chained_frame_without_its_prefix_is_refused_by_name_and_within_the_limits() {
        let (first, second) = (synth_push(1, "a", 40), synth_push(2, "b", 40));
        let (_, p1) = encode_chained(&first, 3, 0, true, None).unwrap().unwrap();
        let p1 = p1.unwrap();
        let (f2, _) = encode_chained(&second, 3, 0, true, Some(&p1))
            .unwrap()
            .unwrap();
        // Not held (a restarted hub), or no store of prefixes at all (a clinic
        // decoding answers, MQTT): named, never decoded against something else.
        let none = |_: &[u8; 8]| None;
        for prefixes in [Some(&none as Prefixes<'_>), None] {
            match decode_keeping(&f2, &Limits::default(), prefixes) {
                Err(WireError::UnknownPrefix(id)) => assert_eq!(id, hex::encode(p1.id)),
                other => panic!("expected UnknownPrefix, got {other:?}"),
            }
        }
        assert!(super::super::decode(&f2, &Limits::default()).is_err());
        // The prefix does not count as output: the payload alone is held to the limit.
        let held = |_: &[u8; 8]| Some(p1.payload.clone());
        let (_, payload) = decode_keeping(&f2, &Limits::default(), Some(&held)).unwrap();
        let tight = Limits {
            max_decompressed: payload.len() - 1,
            ..Limits::default()
        };
        assert!(matches!(
            decode_keeping(&f2, &tight, Some(&held)),
            Err(WireError::TooLarge { .. })
        ));
        // A header cut inside the prefix's name.
        assert!(decode_keeping(&f2[..HEADER_LEN + 3], &Limits::default(), Some(&held)).is_err());
    }
}
