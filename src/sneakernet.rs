//! USB sneakernet flows: a clinic exports its unacknowledged outbox and pull cursor
//! in a bundle encrypted to its parent; the parent imports it with exactly the push
//! semantics of the network and writes a return bundle (receipts plus the pull pages
//! the clinic is due) encrypted to the clinic; the clinic imports that.
//!
//! Invariants: see [`crate::transport::file`] for the format. Here:
//! - A bundle is applied only from a trusted sender, addressed to this node, with a
//!   valid signature. A bundle already imported, or older than one already imported
//!   from the same sender, is refused and changes nothing.
//! - Verification and application read the same bytes: the bundle is copied into
//!   [`import_dir`] (`<store dir>/import-tmp/`, 0700) while it is hashed, and items
//!   are decrypted from that copy only; the copy is gone when the import ends.
//! - Import progress is committed per item; an interrupted import resumes. On the
//!   parent every push item is re-run on resume (integration is idempotent), so the
//!   return bundle always carries every receipt.
//! - The export's sequence number is committed only after the bundle is complete.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::engine::{self, Policy};
use crate::error::{Classify, ErrorClass};
use crate::keys::{Identity, PublicKeys};
use crate::store::{meta, BundleIn, Store, MAX_BUNDLE_SEQ};
use crate::time::wall_ms;
use crate::transport::file::{self, BundleError, BundleHeader, BundleWriter, Item};

#[derive(Debug, thiserror::Error)]
pub enum SneakerError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    #[error("{0}")]
    Refused(String),
}

/// Wrapped errors keep their class; a refusal of this flow (no trusted parent, an
/// in-memory store) needs a person.
impl Classify for SneakerError {
    fn class(&self) -> ErrorClass {
        match self {
            SneakerError::Bundle(e) => e.class(),
            SneakerError::Engine(e) => e.class(),
            SneakerError::Keys(e) => e.class(),
            SneakerError::Refused(_) => ErrorClass::Permanent,
        }
    }
}

impl From<crate::store::StoreError> for SneakerError {
    fn from(e: crate::store::StoreError) -> Self {
        SneakerError::Engine(e.into())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    pub parts: Vec<PathBuf>,
    pub records: usize,
    pub seq: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportSummary {
    pub bundle: String,
    pub kind: String,
    pub sender: String,
    pub records_applied: usize,
    /// Records of `records_applied` the engine refused (quarantined at the sender).
    pub records_refused: usize,
    pub receipts: usize,
    pub pulled: usize,
    pub resumed_after_items: u64,
    pub return_parts: Vec<PathBuf>,
}

/// A node's trusted public keys as this store holds them (`None`: not trusted). A
/// stored line that does not parse is corruption of this store and is named so;
/// read as "not trusted" it would send a technician after the sender's keys.
pub fn trusted_keys(store: &Store, node: &str) -> Result<Option<PublicKeys>, SneakerError> {
    let Some((line, _)) = store.trusted(node)? else {
        return Ok(None);
    };
    let bad = |problem: String| {
        let shown: String = line.chars().take(64).collect();
        SneakerError::from(crate::store::StoreError::BadValue {
            table: "trusted_keys",
            column: "line",
            row: node.to_string(),
            value: format!("{shown:?}"),
            problem: format!(
                "{problem}; `clinicsync keys trust <its public key> --replace` stores it again"
            ),
        })
    };
    let keys = PublicKeys::parse(&line).map_err(|e| bad(e.to_string()))?;
    // `keys trust` files a key under the node it names: a row holding another
    // node's key was changed, and checking a bundle with it would blame the bundle.
    if keys.node != node {
        return Err(bad(format!(
            "it is the key of {:?}, not of {node:?}",
            keys.node
        )));
    }
    Ok(Some(keys))
}

fn bundle_in(h: &BundleHeader) -> BundleIn<'_> {
    BundleIn {
        id: &h.id,
        sender: &h.sender,
        kind: &h.kind,
        seq: h.seq,
    }
}

/// Where bundles are copied for verification: `<store dir>/import-tmp/` (0700),
/// on the store's filesystem, which the service may write (systemd's
/// `ReadWritePaths`) and only this user can enter.
pub fn import_dir(store: &Store) -> Result<PathBuf, SneakerError> {
    let db = store.path().ok_or_else(|| {
        SneakerError::Refused("an in-memory store has no directory to stage bundles in".into())
    })?;
    Ok(db.parent().unwrap_or(Path::new(".")).join("import-tmp"))
}

/// The number of the next bundle to `to` after `last`. Bundle numbers only grow (a
/// recipient refuses one it has seen); at the end of the range there is no next one,
/// and the count is named rather than wrapped to 0.
fn next_bundle_seq(last: u64, to: &str) -> Result<u64, SneakerError> {
    last.checked_add(1).filter(|n| *n <= MAX_BUNDLE_SEQ).ok_or_else(|| {
        SneakerError::Refused(format!(
            "the bundle count to {to} is at its maximum ({last}): it came from a store value or a parent's answer that is not a real count; nothing was written"
        ))
    })
}

/// Clinic side: writes everything not yet acknowledged, plus the pull cursor.
pub fn export(
    store: &mut Store,
    me: &Identity,
    dir: &Path,
    part_size: u64,
    progress: &dyn Fn(u64),
) -> Result<ExportSummary, SneakerError> {
    let (parent, line) = store.trusted_parent()?.ok_or_else(|| {
        SneakerError::Refused(
            "no trusted parent key: run `clinicsync keys trust <parent.pub> --parent` first".into(),
        )
    })?;
    let to = PublicKeys::parse(&line).map_err(SneakerError::Keys)?;
    // After the last one we wrote, or the last the parent says it imported from us
    // (a box reinstalled with its old keys starts its count again otherwise).
    let last = store
        .meta(&meta::bundle_seq_out(&parent))?
        .unwrap_or(0)
        .max(store.meta(&meta::BUNDLE_SEQ_AT_PARENT)?.unwrap_or(0));
    let seq = next_bundle_seq(last, &parent)?;
    let header = BundleHeader {
        id: crate::auth::new_id(),
        kind: "export".into(),
        sender: me.node.clone(),
        recipient: parent.clone(),
        seq,
        created_ms: wall_ms(),
        part_size,
    };
    let path = dir.join(format!("{}-to-{}-{seq:06}.csb", me.node, parent));
    let mut w = BundleWriter::create(&path, header, me, &to)?;
    let mut after = 0;
    let mut records = 0;
    while let Some((req, last)) =
        engine::next_push_after(store, i64::MAX as u64, 1_000, 4 << 20, after)?
    {
        after = last;
        records += req.records.len();
        w.write(&Item::Push(req))?;
        progress(records as u64);
    }
    let pull = engine::pull_request(store, crate::engine::PARENT, 0, 0)?;
    w.write(&Item::PullState {
        cursor: pull.cursor,
        include_own: pull.include_own,
        // The hub learns this node's state from the stick as from a network pull.
        health: crate::health::outgoing(store, crate::engine::PARENT, wall_ms())?.0,
        // Results of orders the hub sent; repeated until a network pull reports
        // them (the hub ignores a result it already has).
        order_results: crate::remote::outgoing(store)?,
    })?;
    let parts = w.finish()?;
    let now = wall_ms();
    let mut tx = store.begin()?;
    tx.set_meta(&meta::bundle_seq_out(&parent), seq)?;
    tx.audit(
        now,
        "usb",
        "export",
        &format!("bundle #{seq} to {parent}"),
        "",
        &format!("{records} records"),
    )?;
    tx.commit()?;
    Ok(ExportSummary {
        parts,
        records,
        seq,
    })
}

/// Either side: verifies and applies a bundle addressed to this node.
pub fn import(
    store: &mut Store,
    policy: &Policy,
    me: &Identity,
    path: &Path,
    return_part_size: u64,
    progress: &dyn Fn(u64),
) -> Result<ImportSummary, SneakerError> {
    // The bundle's checks ask for the sender's keys; a stored key that does not
    // parse is kept aside and reported instead of "untrusted".
    let unreadable = std::cell::RefCell::new(None);
    let lookup = |node: &str| match trusted_keys(store, node) {
        Ok(keys) => keys,
        Err(e) => {
            *unreadable.borrow_mut() = Some(e);
            None
        }
    };
    let verified = file::verify(path, &me.node, &lookup, &import_dir(store)?);
    if let Some(e) = unreadable.into_inner() {
        return Err(e);
    }
    let bundle = verified?;
    let h = bundle.header.clone();
    if h.seq > MAX_BUNDLE_SEQ {
        return Err(SneakerError::Refused(format!(
            "bundle #{} from {}: a bundle number is at most {MAX_BUNDLE_SEQ}, so this one was not counted by clinicsync; nothing applied",
            h.seq, h.sender
        )));
    }
    let prior = store.bundle_in(&h.id)?;
    if let Some((_, true, finished)) = prior {
        return Err(SneakerError::Refused(format!(
            "bundle #{} from {} was already imported{}; nothing applied",
            h.seq,
            h.sender,
            finished
                .map(|t| format!(" at {}", crate::time::fmt_time(t)))
                .unwrap_or_default()
        )));
    }
    if let Some(last) = store.last_bundle_seq(&h.sender)? {
        if h.seq <= last {
            return Err(SneakerError::Refused(format!(
                "bundle #{} from {} is older than bundle #{last} already imported; nothing applied",
                h.seq, h.sender
            )));
        }
    }
    let resume_from = prior.map(|(n, _, _)| n).unwrap_or(0);
    let mut summary = ImportSummary {
        bundle: h.id.clone(),
        kind: h.kind.clone(),
        sender: h.sender.clone(),
        resumed_after_items: resume_from,
        ..ImportSummary::default()
    };
    let mut items = bundle.items(me)?;
    let mut tx = store.begin()?;
    tx.bundle_progress(&bundle_in(&h), 0, false, wall_ms())?;
    tx.commit()?;
    match h.kind.as_str() {
        "export" => import_export(
            store,
            policy,
            me,
            path,
            return_part_size,
            &h,
            &mut items,
            &mut summary,
            progress,
        )?,
        "return" => {
            let parent = store.trusted_parent()?.map(|(n, _)| n);
            if parent.as_deref() != Some(h.sender.as_str()) {
                return Err(SneakerError::Refused(format!(
                    "a return bundle from {} but this node's trusted parent is {}",
                    h.sender,
                    parent.unwrap_or_else(|| "not set".into())
                )));
            }
            import_return(
                store,
                policy,
                &h,
                resume_from,
                &mut items,
                &mut summary,
                progress,
            )?
        }
        other => return Err(BundleError::Content(format!("unknown bundle kind {other:?}")).into()),
    }
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
fn import_export(
    store: &mut Store,
    policy: &Policy,
    me: &Identity,
    path: &Path,
    part_size: u64,
    h: &BundleHeader,
    items: &mut file::ItemReader,
    summary: &mut ImportSummary,
    progress: &dyn Fn(u64),
) -> Result<(), SneakerError> {
    let to =
        trusted_keys(store, &h.sender)?.ok_or_else(|| BundleError::Untrusted(h.sender.clone()))?;
    let seq = next_bundle_seq(
        store.meta(&meta::bundle_seq_out(&h.sender))?.unwrap_or(0),
        &h.sender,
    )?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let ret_path = dir.join(format!("{}-to-{}-{seq:06}.csb", me.node, h.sender));
    let header = BundleHeader {
        id: crate::auth::new_id(),
        kind: "return".into(),
        sender: me.node.clone(),
        recipient: h.sender.clone(),
        seq,
        created_ms: wall_ms(),
        part_size,
    };
    let mut out = BundleWriter::create(&ret_path, header, me, &to)?;
    let mut n = 0u64;
    let mut pull_state = None;
    while let Some(item) = items.next_item()? {
        n += 1;
        match item {
            Item::Push(req) => {
                let count = req.records.len();
                // Exactly the network's push semantics; re-running it on resume is a no-op.
                let resp = engine::handle_push(store, policy, &h.sender, req.clone(), wall_ms())?;
                summary.records_applied += count;
                summary.records_refused += resp
                    .results
                    .iter()
                    .filter(|r| matches!(r.outcome, crate::wire::Outcome::Rejected { .. }))
                    .count();
                let receipts = engine::receipts_for(&req, &resp);
                summary.receipts += receipts.len();
                out.write(&Item::Receipts(receipts))?;
                let mut tx = store.begin()?;
                tx.bundle_progress(&bundle_in(h), n, false, wall_ms())?;
                tx.commit()?;
                progress(summary.records_applied as u64);
            }
            Item::PullState {
                cursor,
                include_own,
                health,
                order_results,
            } => {
                crate::remote::receive_results(store, &h.sender, &order_results, wall_ms())?;
                pull_state = Some((cursor, include_own));
                let below = policy
                    .descendants
                    .get(&h.sender)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                crate::health::receive(
                    store,
                    &h.sender,
                    below,
                    &health,
                    policy.max_clock_ahead_ms,
                    wall_ms(),
                )?;
            }
            other => {
                return Err(BundleError::Content(format!(
                    "unexpected item in an export bundle: {other:?}"
                ))
                .into())
            }
        }
    }
    if let Some((cursor, include_own)) = pull_state {
        let mut req = crate::wire::PullRequest {
            node: h.sender.clone(),
            cursor,
            max_bytes: 4 << 20,
            max_records: 2_000,
            include_own,
            answer_chunk: 0,
            health: Vec::new(),
            order_results: Vec::new(),
        };
        loop {
            let page = engine::handle_pull(store, policy, &h.sender, &req)?;
            summary.pulled += page.records.len();
            let more = page.more;
            req.cursor = page.next;
            out.write(&Item::Page(page))?;
            if !more {
                break;
            }
        }
    }
    summary.return_parts = out.finish()?;
    let now = wall_ms();
    let mut tx = store.begin()?;
    tx.set_meta(&meta::bundle_seq_out(&h.sender), seq)?;
    tx.bundle_progress(&bundle_in(h), n, true, now)?;
    tx.audit(
        now,
        "usb",
        "import",
        &format!("bundle #{} from {}", h.seq, h.sender),
        "",
        &format!(
            "{} records, return bundle #{seq} with {} pulled",
            summary.records_applied, summary.pulled
        ),
    )?;
    tx.commit()?;
    Ok(())
}

fn import_return(
    store: &mut Store,
    policy: &Policy,
    h: &BundleHeader,
    resume_from: u64,
    items: &mut file::ItemReader,
    summary: &mut ImportSummary,
    progress: &dyn Fn(u64),
) -> Result<(), SneakerError> {
    let mut n = 0u64;
    let parent = crate::engine::PARENT;
    while let Some(item) = items.next_item()? {
        n += 1;
        if n <= resume_from {
            continue;
        }
        let now = wall_ms();
        match item {
            Item::Receipts(r) => {
                engine::apply_receipts(store, parent, &r, now)?;
                summary.receipts += r.len();
            }
            Item::Page(page) => {
                summary.pulled += engine::store_pull(store, parent, &page, (0, 0), now)?;
                crate::remote::execute(store, policy, &page.orders, now)?;
                // With an external EMR the inbox waits for the daemon's next round,
                // which writes it into the EMR first (`apply_inbox_to_emr`).
                if !policy.external_emr {
                    let a = engine::apply_inbox(store, policy, now)?;
                    summary.records_applied += a.applied;
                }
            }
            other => {
                return Err(BundleError::Content(format!(
                    "unexpected item in a return bundle: {other:?}"
                ))
                .into())
            }
        }
        let mut tx = store.begin()?;
        tx.bundle_progress(&bundle_in(h), n, false, now)?;
        tx.commit()?;
        progress((summary.receipts + summary.pulled) as u64);
    }
    let now = wall_ms();
    let mut tx = store.begin()?;
    tx.bundle_progress(&bundle_in(h), n, true, now)?;
    tx.audit(
        now,
        "usb",
        "import",
        &format!("return bundle #{} from {}", h.seq, h.sender),
        "",
        &format!(
            "{} receipts, {} records pulled",
            summary.receipts, summary.pulled
        ),
    )?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sneakernet_errors_keep_the_class_of_what_they_wrap() {
        let cases = [
            (
                SneakerError::Bundle(BundleError::BadSignature("x".into())),
                ErrorClass::Permanent,
            ),
            (
                SneakerError::Bundle(BundleError::Copy {
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                }),
                ErrorClass::Corruption,
            ),
            (
                SneakerError::from(crate::store::StoreError::NoNodeId("/s.db".into())),
                ErrorClass::Corruption,
            ),
            (
                SneakerError::Keys(crate::keys::KeyError::Invalid {
                    path: "signing.key".into(),
                    message: "expected 64 hex characters".into(),
                }),
                ErrorClass::Corruption,
            ),
            (
                SneakerError::Refused("no trusted parent key".into()),
                ErrorClass::Permanent,
            ),
        ];
        for (e, class) in cases {
            assert_eq!(e.class(), class, "{e}");
        }
    }
}
