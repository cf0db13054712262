//! Bodies as shapes and columns: the body section of a v2 record block when both
//! ends announced `columns` ([`super::accept`]).
//!
//! A FHIR body is split, byte for byte, into its *shape* (the JSON text with every
//! string value replaced by [`STRING`] and every number by [`NUMBER`]; keys,
//! punctuation, `true`/`false`/`null` and whitespace stay) and its values. Records
//! of a kind share a handful of shapes, so each shape is sent once; values go into
//! one column per (kind, path of keys): dates beside dates, codes beside codes,
//! which zstd compresses far better than the same values scattered through JSON
//! text (BENCHMARKS.md: 0.68× and 0.75× of `zstd -19` of the NDJSON, against 0.90×
//! and 1.14× for the bodies as text).
//!
//! ```text
//! struct Bodies {                         // in the block's body order
//!     shapes:   varint s, [varint len, bytes]*s,
//!     shape:    [varint; N],              // 0: verbatim; i >= 1: shapes[i-1]
//!     verbatim: [varint len, utf8] for each record whose shape is 0,
//!     columns:  varint c, [varint len; c], then the c columns' bytes: each
//!               value as its text and b'\n', or, when it ends in a UUID in
//!               canonical lower case (OpenMRS names everything so), as 0x03, the
//!               text before the UUID, 0x00 and the UUID's 16 bytes
//! }
//! ```
//! Column numbers are not sent: both ends number a (kind, path) column by its first
//! appearance while walking the records in body order and each shape's
//! placeholders in order ([`paths`] reads the path from the shape alone).
//!
//! Invariants
//! - Lossless: joining a shape with its values gives back the exact body text, so
//!   the receiver's hash of the body is the sender's. A body the splitter does not
//!   take (not JSON text as it expects: a raw control character, a placeholder
//!   byte) goes verbatim.
//! - The decoder bounds everything by the bytes it was given, and counts what a
//!   rebuilt body adds to them (its shape's text) against the caller's budget.
//!
//! Errors name the record (its position in the block) and what did not fit.

use std::collections::HashMap;

use super::v2::Reader;
use super::WireError;

/// Placeholder of a string value in a shape (the value's text, without its quotes,
/// is in its column).
pub const STRING: u8 = 0x01;
/// Placeholder of a number in a shape.
pub const NUMBER: u8 = 0x02;
/// First byte of a value that ends in a UUID (see the module header).
const UUID_VALUE: u8 = 0x03;
/// Ends the text before a UUID.
const UUID_AFTER: u8 = 0x00;
/// A UUID's text: 8-4-4-4-12 lower-case hex digits.
const UUID_TEXT: usize = 36;

/// The text before a canonical lower-case UUID that ends `v`, and the UUID's bytes.
fn uuid_tail(v: &[u8]) -> Option<(&[u8], [u8; 16])> {
    let at = v.len().checked_sub(UUID_TEXT)?;
    let (prefix, text) = v.split_at(at);
    let mut bytes = [0u8; 16];
    let mut nibbles = 0;
    for (i, &c) in text.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
            continue;
        }
        let n = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        bytes[nibbles / 2] |= n << (4 * (1 - nibbles % 2));
        nibbles += 1;
    }
    if prefix.iter().any(|&c| c == UUID_AFTER || c == b'\n') {
        return None;
    }
    Some((prefix, bytes))
}

/// Appends value `v` to a column.
fn put_value(col: &mut Vec<u8>, v: &[u8]) {
    match uuid_tail(v) {
        Some((prefix, bytes)) => {
            col.push(UUID_VALUE);
            col.extend_from_slice(prefix);
            col.push(UUID_AFTER);
            col.extend_from_slice(&bytes);
        }
        None => {
            col.extend_from_slice(v);
            col.push(b'\n');
        }
    }
}

/// Takes the next value off column `col` into `out`; `None` when the column has run
/// out (or a UUID value is cut short). Returns the bytes the value grew by (a UUID's
/// text is longer than its bytes).
fn take_value(col: &mut &[u8], out: &mut Vec<u8>) -> Option<usize> {
    if col.first() == Some(&UUID_VALUE) {
        let rest = &col[1..];
        let end = rest.iter().position(|&x| x == UUID_AFTER)?;
        let bytes = rest.get(end + 1..end + 17)?;
        out.extend_from_slice(&rest[..end]);
        const HEX: &[u8; 16] = b"0123456789abcdef";
        // Spelled out on the stack and appended once (a push per character checked
        // the buffer's room 36 times).
        let mut text = [b'-'; UUID_TEXT];
        let mut at = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                at += 1;
            }
            text[at] = HEX[usize::from(b >> 4)];
            text[at + 1] = HEX[usize::from(b & 15)];
            at += 2;
        }
        out.extend_from_slice(&text);
        *col = &rest[end + 17..];
        return Some(UUID_TEXT);
    }
    let end = col.iter().position(|&x| x == b'\n')?;
    out.extend_from_slice(&col[..end]);
    *col = &col[end + 1..];
    Some(0)
}

/// Deepest nesting a path names (deeper values share the column of their ancestor
/// at this depth; it changes grouping, never content).
const MAX_PATH_DEPTH: usize = 32;

fn block(msg: impl Into<String>) -> WireError {
    WireError::Block(msg.into())
}

/// A body split into its shape and its values (byte ranges of the body).
struct Split {
    shape: Vec<u8>,
    values: Vec<(usize, usize)>,
}

/// Splits `body`, or `None` when it is not text this splitter takes (it then goes
/// verbatim). Only the lexical level matters: a string followed by `:` is a key
/// (kept in the shape), any other string or a number is a value.
fn split(body: &[u8]) -> Option<Split> {
    let mut shape = Vec::with_capacity(body.len() / 2);
    let mut values = Vec::new();
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        match b {
            b'"' => {
                let start = i + 1;
                let mut j = start;
                loop {
                    match *body.get(j)? {
                        b'"' => break,
                        b'\\' => j += 2,
                        c if c < 0x20 => return None,
                        _ => j += 1,
                    }
                }
                let end = j;
                let mut k = end + 1;
                while body.get(k).is_some_and(|c| c.is_ascii_whitespace()) {
                    k += 1;
                }
                if body.get(k) == Some(&b':') {
                    shape.extend_from_slice(&body[i..=end]);
                } else {
                    shape.push(STRING);
                    values.push((start, end));
                }
                i = end + 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while body
                    .get(i)
                    .is_some_and(|c| matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                {
                    i += 1;
                }
                shape.push(NUMBER);
                values.push((start, i));
            }
            c if c < 0x20 && !c.is_ascii_whitespace() => return None,
            _ => {
                shape.push(b);
                i += 1;
            }
        }
    }
    Some(Split { shape, values })
}

/// One step down a path: into an object's key, or into an array's elements.
#[derive(PartialEq, Eq, Hash)]
enum Step {
    Key(Vec<u8>),
    NoKey,
    Elements,
}

/// Paths as numbered nodes (a node is its parent's node and one [`Step`]; the top is
/// node 0), shared by every shape of a block so that one path in two shapes is one
/// node; and each shape's placeholders as the nodes of their paths. What it holds
/// (a node per distinct key read, a number per placeholder) is charged to the
/// caller's budget before it is allocated; nesting deeper than [`MAX_PATH_DEPTH`] is
/// counted, not stacked.
#[derive(Default)]
struct Paths {
    steps: HashMap<(usize, Step), usize>,
    of_shape: HashMap<usize, Vec<usize>>,
}

/// What a path node costs in memory besides its key's text (the map entry).
const STEP_COST: usize = 64;

/// Charges `n` bytes of memory to the decoder's budget (a no-op when encoding).
pub(super) type Charge<'a> = &'a mut dyn FnMut(usize) -> Result<(), WireError>;

/// Placeholders in `shape`.
fn placeholders(shape: &[u8]) -> usize {
    shape
        .iter()
        .filter(|&&b| b == STRING || b == NUMBER)
        .count()
}

impl Paths {
    fn step(&mut self, parent: usize, step: Step, charge: Charge<'_>) -> Result<usize, WireError> {
        let next = self.steps.len() + 1;
        let key_len = match &step {
            Step::Key(k) => k.len(),
            Step::NoKey | Step::Elements => 0,
        };
        match self.steps.entry((parent, step)) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(*e.get()),
            std::collections::hash_map::Entry::Vacant(e) => {
                charge(STEP_COST + key_len)?;
                Ok(*e.insert(next))
            }
        }
    }

    /// The path node of each placeholder of shape `ix`, in order: its keys from the
    /// top, an array level as one step. Read from the shape alone, so both ends
    /// agree.
    fn of(&mut self, ix: usize, shape: &[u8], charge: Charge<'_>) -> Result<&[usize], WireError> {
        if !self.of_shape.contains_key(&ix) {
            charge(8 * placeholders(shape))?;
            let nodes = self.walk(shape, charge)?;
            self.of_shape.insert(ix, nodes);
        }
        Ok(&self.of_shape[&ix])
    }

    fn walk(&mut self, shape: &[u8], charge: Charge<'_>) -> Result<Vec<usize>, WireError> {
        // Per open container: its own node, and the node of what is read in it now;
        // containers nested deeper than the stack holds only counted.
        let mut stack: Vec<(usize, usize)> = Vec::with_capacity(MAX_PATH_DEPTH);
        let mut deeper = 0usize;
        let mut out = Vec::with_capacity(placeholders(shape));
        let mut i = 0;
        while i < shape.len() {
            let here = stack.last().map_or(0, |&(_, child)| child);
            match shape[i] {
                b'{' | b'[' if stack.len() >= MAX_PATH_DEPTH => deeper += 1,
                b'{' => {
                    let child = self.step(here, Step::NoKey, charge)?;
                    stack.push((here, child));
                }
                b'[' => {
                    let child = self.step(here, Step::Elements, charge)?;
                    stack.push((here, child));
                }
                b'}' | b']' => {
                    if deeper > 0 {
                        deeper -= 1;
                    } else {
                        stack.pop();
                    }
                }
                b'"' => {
                    let start = i + 1;
                    let mut j = start;
                    while j < shape.len() && shape[j] != b'"' {
                        j += if shape[j] == b'\\' { 2 } else { 1 };
                    }
                    let end = j.min(shape.len());
                    if deeper == 0 {
                        if let Some(&(node, _)) = stack.last() {
                            let key = Step::Key(shape[start..end].to_vec());
                            let child = self.step(node, key, charge)?;
                            if let Some(top) = stack.last_mut() {
                                top.1 = child;
                            }
                        }
                    }
                    i = end;
                }
                STRING | NUMBER => out.push(here),
                _ => {}
            }
            i += 1;
        }
        Ok(out)
    }
}

/// Numbers (kind, path node) columns by first appearance, and keeps each
/// (kind, shape)'s columns in placeholder order (its plan), so a record costs one
/// lookup, not one per value. Numbering a plan's columns when it is first made is
/// numbering them as its first record's values are met: both ends agree.
#[derive(Default)]
struct ColumnIndex {
    columns: HashMap<(usize, usize), usize>,
    plans: HashMap<(usize, usize), Vec<usize>>,
}

impl ColumnIndex {
    /// The plan of records of `kind` and shape `shape_ix`, whose placeholders sit at
    /// path nodes `nodes`; a new plan is charged first.
    fn plan(
        &mut self,
        kind: usize,
        shape_ix: usize,
        nodes: &[usize],
        charge: Charge<'_>,
    ) -> Result<&[usize], WireError> {
        if !self.plans.contains_key(&(kind, shape_ix)) {
            charge(8 * nodes.len())?;
            let mut plan = Vec::with_capacity(nodes.len());
            for &node in nodes {
                let next = self.columns.len();
                plan.push(*self.columns.entry((kind, node)).or_insert(next));
            }
            self.plans.insert((kind, shape_ix), plan);
        }
        Ok(&self.plans[&(kind, shape_ix)])
    }
}

fn put_varint(out: &mut Vec<u8>, v: u64) {
    super::v2::put_varint(out, v)
}

/// The bodies `bodies[i]` (each with its kind index `kinds[i]`), in that order, as
/// shapes and columns: the pieces to write one after the other (the head, then each
/// column, so that no column is copied twice).
pub fn encode(bodies: &[&str], kinds: &[usize]) -> Vec<Vec<u8>> {
    let mut head = Vec::new();
    let out = &mut head;
    let mut shapes: Vec<Vec<u8>> = Vec::new();
    let mut shape_index: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut shape_of = Vec::with_capacity(bodies.len());
    let mut splits = Vec::with_capacity(bodies.len());
    for body in bodies {
        match split(body.as_bytes()) {
            Some(s) => {
                let ix = match shape_index.get(&s.shape) {
                    Some(&ix) => ix,
                    None => {
                        shape_index.insert(s.shape.clone(), shapes.len());
                        shapes.push(s.shape);
                        shapes.len() - 1
                    }
                };
                shape_of.push(ix + 1);
                splits.push(Some(s.values));
            }
            None => {
                shape_of.push(0);
                splits.push(None);
            }
        }
    }
    put_varint(out, shapes.len() as u64);
    for s in &shapes {
        put_varint(out, s.len() as u64);
        out.extend_from_slice(s);
    }
    for &s in &shape_of {
        put_varint(out, s as u64);
    }
    for (body, s) in bodies.iter().zip(&splits) {
        if s.is_none() {
            put_varint(out, body.len() as u64);
            out.extend_from_slice(body.as_bytes());
        }
    }
    let (mut paths, mut index) = (Paths::default(), ColumnIndex::default());
    let mut data: Vec<Vec<u8>> = Vec::new();
    for (i, values) in splits.iter().enumerate() {
        let Some(values) = values else { continue };
        let shape_ix = shape_of[i] - 1;
        // Encoding charges nothing: the shapes are this node's own.
        let free: Charge<'_> = &mut |_| Ok(());
        let Ok(nodes) = paths.of(shape_ix, &shapes[shape_ix], free) else {
            continue;
        };
        let Ok(plan) = index.plan(kinds[i], shape_ix, nodes, free) else {
            continue;
        };
        for (&c, &(a, b)) in plan.iter().zip(values) {
            if c == data.len() {
                data.push(Vec::new());
            }
            put_value(&mut data[c], &bodies[i].as_bytes()[a..b]);
        }
    }
    put_varint(out, data.len() as u64);
    for d in &data {
        put_varint(out, d.len() as u64);
    }
    let mut pieces = Vec::with_capacity(1 + data.len());
    pieces.push(head);
    pieces.extend(data);
    pieces
}

/// The body section of a block, read and planned, its bodies not yet rebuilt: each
/// is rebuilt when it is wanted ([`Bodies::rebuild`]), so a hub rebuilds a push's
/// bodies on the thread that checks its records while another integrates the ones
/// before them. Values are read off their columns in body order: within a kind
/// (every column is one kind's) bodies are rebuilt in that order, across kinds in
/// any.
pub(super) struct Bodies<'a> {
    shapes: Vec<&'a [u8]>,
    /// Per body position: the record it is (for errors), its kind, its shape (0:
    /// verbatim), its plan (an index into `plans`; unused when verbatim).
    record: Vec<usize>,
    kind: Vec<usize>,
    shape_of: Vec<usize>,
    plan_of: Vec<usize>,
    plans: Vec<Vec<usize>>,
    verbatim: Vec<Option<&'a str>>,
    cols: Vec<&'a [u8]>,
    /// Each shape's placeholders (position, byte), found at its first body: a body
    /// then copies the text between them without looking at it byte by byte.
    cuts_of: Vec<Option<Vec<(usize, u8)>>>,
    /// The length of the last body rebuilt from each shape: the next one of the
    /// shape is sized by it (records of a shape differ little), so a body is written
    /// into room it has instead of growing value by value (perf: a tenth of the
    /// hub's decode was bodies reallocated and their new pages faulted in).
    last_len: Vec<usize>,
    /// Per kind: the body position of it to rebuild next.
    next_of_kind: HashMap<usize, usize>,
}

impl<'a> Bodies<'a> {
    /// Reads the body section of `kinds.len()` records (`kinds` and `order`, the
    /// records' positions, both in body order) up to and including its columns, and
    /// plans every (kind, shape)'s columns. `spend` is charged what the plans hold.
    pub(super) fn read(
        r: &mut Reader<'a>,
        kinds: &[usize],
        order: &[usize],
        spend: Charge<'_>,
    ) -> Result<Bodies<'a>, WireError> {
        let n = kinds.len();
        let n_shapes = r.count(n.min(r.remaining()), &|| "number of body shapes".into())?;
        let mut shapes = Vec::with_capacity(n_shapes);
        for s in 0..n_shapes {
            let len = r.count(r.remaining(), &|| format!("body shape {s}: length"))?;
            shapes.push(r.bytes(len, &|| format!("body shape {s}"))?);
        }
        let counts: Vec<usize> = shapes.iter().map(|s| placeholders(s)).collect();
        let mut shape_of = Vec::with_capacity(n);
        // Values the records read: no more columns than that can be read.
        let mut values = 0usize;
        for &i in order {
            let s = r.varint(&|| format!("record {i}: body shape"))?;
            if s > n_shapes as u64 {
                return Err(block(format!(
                    "record {i}: body shape {s} is outside the shape table ({n_shapes} entries)"
                )));
            }
            let s = s as usize;
            if s > 0 {
                values = values.saturating_add(counts[s - 1]);
            }
            shape_of.push(s);
        }
        let mut verbatim = Vec::with_capacity(n);
        for (pos, &i) in order.iter().enumerate() {
            if shape_of[pos] == 0 {
                let len = r.count(r.remaining(), &|| format!("record {i}: body length"))?;
                let b = r.bytes(len, &|| format!("record {i}: body"))?;
                let text = std::str::from_utf8(b)
                    .map_err(|_| block(format!("record {i}: body is not UTF-8")))?;
                verbatim.push(Some(text));
            } else {
                verbatim.push(None);
            }
        }
        let n_cols = r.count(values.min(r.remaining()), &|| {
            "number of body columns".into()
        })?;
        // Its length and its slice, before they are allocated.
        spend(n_cols.saturating_mul(24))?;
        let mut lens = Vec::with_capacity(n_cols);
        let mut total = 0usize;
        for c in 0..n_cols {
            let len = r.count(r.remaining(), &|| format!("body column {c}: length"))?;
            total = total.saturating_add(len);
            lens.push(len);
        }
        if total > r.remaining() {
            return Err(block(format!(
                "body columns should take {total} bytes, {} remain",
                r.remaining()
            )));
        }
        let mut cols: Vec<&[u8]> = Vec::with_capacity(n_cols);
        for (c, &len) in lens.iter().enumerate() {
            cols.push(r.bytes(len, &|| format!("body column {c}"))?);
        }
        // Columns are numbered by first appearance in body order: the plans are
        // made in that order, whatever order the bodies are rebuilt in.
        let (mut paths, mut index) = (Paths::default(), ColumnIndex::default());
        let mut plan_ids: HashMap<(usize, usize), usize> = HashMap::new();
        let mut plans: Vec<Vec<usize>> = Vec::new();
        let mut plan_of = Vec::with_capacity(n);
        let mut next_of_kind = HashMap::new();
        for (pos, &s) in shape_of.iter().enumerate() {
            next_of_kind.entry(kinds[pos]).or_insert(pos);
            if s == 0 {
                plan_of.push(0);
                continue;
            }
            let id = match plan_ids.get(&(kinds[pos], s - 1)) {
                Some(&id) => id,
                None => {
                    let nodes = paths.of(s - 1, shapes[s - 1], spend)?;
                    let plan = index.plan(kinds[pos], s - 1, nodes, spend)?;
                    // This copy of it as much again.
                    spend(8 * plan.len())?;
                    plans.push(plan.to_vec());
                    plan_ids.insert((kinds[pos], s - 1), plans.len() - 1);
                    plans.len() - 1
                }
            };
            plan_of.push(id);
        }
        spend(n_shapes.saturating_mul(24))?;
        Ok(Bodies {
            cuts_of: vec![None; n_shapes],
            last_len: vec![0; n_shapes],
            shapes,
            record: order.to_vec(),
            kind: kinds.to_vec(),
            shape_of,
            plan_of,
            plans,
            verbatim,
            cols,
            next_of_kind,
        })
    }

    /// The body at body position `pos`. `spend` is charged what the rebuilt body
    /// adds beyond its values. A body of a kind rebuilt out of its kind's body
    /// order is refused (its values would be another body's).
    pub(super) fn rebuild(&mut self, pos: usize, spend: Charge<'_>) -> Result<String, WireError> {
        let i = self.record[pos];
        let kind = self.kind[pos];
        if self.next_of_kind.get(&kind) != Some(&pos) {
            return Err(block(format!(
                "record {i}: body wanted out of its kind's order"
            )));
        }
        self.next_of_kind.insert(kind, pos + 1);
        let s = self.shape_of[pos];
        if let Some(text) = self.verbatim[pos] {
            return Ok(text.to_string());
        }
        let shape = self.shapes[s - 1];
        let plan = &self.plans[self.plan_of[pos]];
        let cuts = match &mut self.cuts_of[s - 1] {
            Some(cuts) => cuts,
            slot => {
                spend(16 * placeholders(shape))?;
                slot.insert(
                    shape
                        .iter()
                        .enumerate()
                        .filter(|&(_, &b)| b == STRING || b == NUMBER)
                        .map(|(at, &b)| (at, b))
                        .collect(),
                )
            }
        };
        // What the rebuilt body adds to the payload: its shape and the quotes.
        spend(shape.len() + 2 * plan.len())?;
        // Within 16 to 64 bytes a value beyond the shape: room beyond what a body
        // needs is what the body before it of its shape took, in bytes that block
        // sent, and at most 64 a value (a hostile block gets no more than it paid).
        let room = self.last_len[s - 1]
            .clamp(shape.len() + 16 * plan.len(), shape.len() + 64 * plan.len());
        let mut body = Vec::with_capacity(room);
        let mut next = plan.iter();
        let mut from = 0;
        let n_cols = self.cols.len();
        for &(at, b) in cuts.iter() {
            body.extend_from_slice(&shape[from..at]);
            from = at + 1;
            let Some(&c) = next.next() else {
                return Err(block(format!(
                    "record {i}: its shape has a placeholder where no value can go (inside a key)"
                )));
            };
            let col = self.cols.get_mut(c).ok_or_else(|| {
                block(format!(
                    "record {i}: its shape reads body column {c}, the block has {n_cols}"
                ))
            })?;
            let run_out = || block(format!("record {i}: body column {c} has run out"));
            if b == STRING {
                body.push(b'"');
                spend(take_value(col, &mut body).ok_or_else(run_out)?)?;
                body.push(b'"');
            } else {
                spend(take_value(col, &mut body).ok_or_else(run_out)?)?;
            }
        }
        body.extend_from_slice(&shape[from..]);
        self.last_len[s - 1] = body.len();
        String::from_utf8(body).map_err(|_| block(format!("record {i}: body is not UTF-8")))
    }

    /// After every body was rebuilt: a column with values left over is refused.
    pub(super) fn finish(&self) -> Result<(), WireError> {
        match self.cols.iter().position(|c| !c.is_empty()) {
            Some(c) => Err(block(format!(
                "body column {c} holds values no record reads"
            ))),
            None => Ok(()),
        }
    }
}

/// Reads the bodies of `kinds.len()` records (in body order) and returns them in that
/// order. `spend` is charged what each rebuilt body adds beyond its values.
#[cfg(test)]
fn decode(
    r: &mut Reader<'_>,
    kinds: &[usize],
    order: &[usize],
    spend: Charge<'_>,
) -> Result<Vec<String>, WireError> {
    let mut bodies = Bodies::read(r, kinds, order, spend)?;
    let out = (0..kinds.len())
        .map(|pos| bodies.rebuild(pos, spend))
        .collect::<Result<Vec<_>, _>>()?;
    bodies.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_splits_into_a_shape_and_values_and_joins_back_exactly() {
        let body = r#"{"a":"x\"y","b":[1,-2.5e3,true,null],"c":{"d":"","e" : "f"}}"#;
        let s = split(body.as_bytes()).unwrap();
        assert_eq!(
            s.shape,
            b"{\"a\":\x01,\"b\":[\x02,\x02,true,null],\"c\":{\"d\":\x01,\"e\" : \x01}}"
        );
        let vals: Vec<&str> = s.values.iter().map(|&(a, b)| &body[a..b]).collect();
        assert_eq!(vals, ["x\\\"y", "1", "-2.5e3", "", "f"]);
        let mut p = Paths::default();
        let free: Charge<'_> = &mut |_| Ok(());
        let nodes = p.of(0, &s.shape, free).unwrap().to_vec();
        assert_eq!(nodes.len(), 5);
        assert_eq!(nodes[1], nodes[2], "elements of one array share a path");
        assert!(nodes[0] != nodes[3] && nodes[3] != nodes[4]);
        // The same path in another shape is the same node.
        let other = split(br#"{"c":{"e":"g"},"a":"z"}"#).unwrap();
        assert_eq!(p.of(1, &other.shape, free).unwrap(), [nodes[4], nodes[0]]);
    }

    #[test]
    fn a_value_ending_in_a_uuid_travels_as_its_bytes() {
        let cases: [(&str, bool); 7] = [
            ("Observation/0b6a4f1e-5d3c-4f8a-9b1e-2c3d4e5f6a7b", true),
            ("0b6a4f1e-5d3c-4f8a-9b1e-2c3d4e5f6a7b", true),
            ("urn:uuid:00000000-0000-0000-0000-000000000000", true),
            ("0B6A4F1E-5D3C-4F8A-9B1E-2C3D4E5F6A7B", false),
            ("0b6a4f1e-5d3c-4f8a-9b1e-2c3d4e5f6a7b/_history/1", false),
            ("0b6a4f1e5d3c-4f8a-9b1e-2c3d4e5f6a7b0", false),
            ("x", false),
        ];
        for (v, packed) in cases {
            let mut col = Vec::new();
            put_value(&mut col, v.as_bytes());
            put_value(&mut col, b"next");
            assert_eq!(col[0] == UUID_VALUE, packed, "{v}");
            let mut rest = &col[..];
            let mut out = Vec::new();
            take_value(&mut rest, &mut out).unwrap();
            assert_eq!(out, v.as_bytes());
            out.clear();
            take_value(&mut rest, &mut out).unwrap();
            assert_eq!(out, b"next");
            assert!(rest.is_empty());
        }
        // A UUID value cut short is refused, not read past its end.
        let mut col = Vec::new();
        put_value(&mut col, b"0b6a4f1e-5d3c-4f8a-9b1e-2c3d4e5f6a7b");
        for cut in 0..col.len() {
            assert!(
                take_value(&mut &col[..cut], &mut Vec::new()).is_none(),
                "{cut}"
            );
        }
    }

    /// A body section by hand: `shapes`, each record's shape number, then the column
    /// count and lengths and bytes as given.
    fn section(shapes: &[&[u8]], shape_of: &[u64], n_cols: u64, cols: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, shapes.len() as u64);
        for s in shapes {
            put_varint(&mut out, s.len() as u64);
            out.extend_from_slice(s);
        }
        for &s in shape_of {
            put_varint(&mut out, s);
        }
        put_varint(&mut out, n_cols);
        for c in cols {
            put_varint(&mut out, c.len() as u64);
        }
        for c in cols {
            out.extend_from_slice(c);
        }
        out
    }

    /// Decodes a section for `n` records of kind 0, counting what it charges.
    fn decode_counted(
        bytes: &[u8],
        n: usize,
        budget: usize,
    ) -> (Result<Vec<String>, WireError>, usize) {
        let mut spent = 0usize;
        let mut charge = |b: usize| {
            spent += b;
            if spent > budget {
                Err(WireError::TooLarge {
                    what: "decoded record block",
                    size: spent,
                    limit: budget,
                })
            } else {
                Ok(())
            }
        };
        let order: Vec<usize> = (0..n).collect();
        let r = decode(&mut Reader::new(bytes), &vec![0; n], &order, &mut charge);
        (r, spent)
    }

    /// A body is sized by the one before it of its shape, within 64 bytes a value
    /// beyond the shape: a block's one long body does not make the short ones after
    /// it hold its room.
    #[test]
    fn a_long_body_does_not_size_the_short_ones_after_it_beyond_their_bound() {
        let long = "x".repeat(100_000);
        let mut col = format!("{long}\n").into_bytes();
        for _ in 0..5 {
            col.extend_from_slice(b"y\n");
        }
        let bytes = section(&[b"{\"a\":\x01}"], &[1; 6], 1, &[&col]);
        let bodies = decode_counted(&bytes, 6, 1 << 20).0.unwrap();
        assert_eq!(bodies[0], format!("{{\"a\":\"{long}\"}}"));
        let bound = b"{\"a\":\x01}".len() + 64;
        for b in &bodies[1..] {
            assert_eq!(b, "{\"a\":\"y\"}");
            assert!(b.capacity() <= bound, "{} > {bound}", b.capacity());
        }
        // Alike bodies after the first are written into the room the one before
        // took: no growing on the way.
        let mut col = Vec::new();
        for v in [
            "abcdefghijklmnopqrstuvwxyz0123456789",
            "abcdefghijklmnopqrstuvwxyz012345678",
        ] {
            col.extend_from_slice(v.as_bytes());
            col.push(b'\n');
        }
        let bytes = section(&[b"{\"a\":\x01}"], &[1; 2], 1, &[&col]);
        let bodies = decode_counted(&bytes, 2, 1 << 20).0.unwrap();
        assert_eq!(bodies[1].capacity(), bodies[0].len(), "{bodies:?}");
    }

    #[test]
    fn a_column_count_no_record_can_read_is_refused_before_it_is_allocated() {
        let bytes = section(&[b"{\"a\":\x02}"], &[1], 30_000_000, &[]);
        let (r, spent) = decode_counted(&bytes, 1, 1 << 20);
        let err = r.unwrap_err().to_string();
        assert!(err.contains("number of body columns"), "{err}");
        assert_eq!(spent, 0);
        // The honest section decodes.
        let ok = section(&[b"{\"a\":\x02}"], &[1], 1, &[b"7\n"]);
        assert_eq!(decode_counted(&ok, 1, 1 << 20).0.unwrap(), ["{\"a\":7}"]);
    }

    #[test]
    fn a_placeholder_inside_a_key_is_refused_by_name() {
        let bytes = section(&[b"{\"a\x01\":\x02}"], &[1], 1, &[b"1\n"]);
        let err = decode_counted(&bytes, 1, 1 << 20)
            .0
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("record 0: its shape has a placeholder where no value can go"),
            "{err}"
        );
    }

    #[test]
    fn nesting_past_the_path_depth_costs_nothing_more_and_keys_are_charged() {
        // A million brackets: paths stop at MAX_PATH_DEPTH levels.
        let deep = [vec![b'['; 1_000_000], vec![NUMBER], vec![b']'; 1_000_000]].concat();
        let bytes = section(&[&deep], &[1], 1, &[b"1\n"]);
        let (r, spent) = decode_counted(&bytes, 1, 4 << 20);
        assert_eq!(r.unwrap()[0].len(), 2_000_001);
        assert!(
            spent < 2_000_001 + 64 * (MAX_PATH_DEPTH + 2) + 64,
            "{spent}"
        );
        // 20,000 distinct keys: each a path node, each charged.
        let keys: String = (0..20_000).map(|i| format!("\"k{i}\":true,")).collect();
        let wide = format!("{{{keys}\"v\":\u{2}}}");
        let bytes = section(&[wide.as_bytes()], &[1], 1, &[b"1\n"]);
        let (r, spent) = decode_counted(&bytes, 1, 64 << 20);
        assert!(r.is_ok());
        assert!(spent >= 20_000 * STEP_COST, "{spent}");
        let (r, _) = decode_counted(&bytes, 1, 1 << 20);
        assert!(r.is_err(), "over a 1 MiB budget");
    }

    #[test]
    fn text_the_splitter_does_not_take_goes_verbatim() {
        for body in ["{\"a\":\"x\ny\"}", "{\"a\":\x01}", "{\"a\":\"unterminated"] {
            assert!(split(body.as_bytes()).is_none(), "{body:?}");
        }
    }
}
