//! The EMR flows: a node's sync store on one side, its EMR (OpenMRS, a FHIR
//! server) on the other. They do the EMR's blocking I/O and call the engine's
//! steps for everything the protocol decides, so the engine never touches an EMR.
//!
//! - capture: the EMR's change feed → read each changed record → a local write
//!   ([`crate::engine`] stamps, coalesces and enqueues it), unless it is the echo of
//!   our own write (its content hash is the one we wrote);
//! - apply: an inbox record (clinic) or a replica record (hub with its own EMR) →
//!   written into the EMR → its state noted (`emr_state`), its quarantine released,
//!   and records that waited for it released too;
//! - refusal: a permanent refusal quarantines the record with the EMR's reason and
//!   slow backoff; an unavailable EMR stops the pass and leaves everything due.
//!
//! Every write into the store happens in one transaction per record, together with
//! the EMR's identity map, so a crash between the EMR's answer and our commit only
//! repeats an idempotent write (the adapter finds the record by its uuid).

use serde::Serialize;

use crate::engine::{
    after_pulled, integrate, write_one, ApplySummary, EngineError, Integrated, Policy, Result,
};
use crate::error::{Classify, ErrorClass};
use crate::model::{RecordKey, Version};
use crate::store::{meta, PeerEvent, Stage, Store, StoreError, Tx};

/// What a capture from the EMR found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CaptureSummary {
    /// Feed events read (one record may have several).
    pub events: usize,
    /// Records that changed in the EMR and became local writes.
    pub captured: usize,
    /// Events caused by our own writes into the EMR.
    pub echoes: usize,
    pub unchanged: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EmrFlowError {
    #[error(transparent)]
    Emr(#[from] crate::emr::EmrError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl Classify for EmrFlowError {
    fn class(&self) -> ErrorClass {
        match self {
            EmrFlowError::Emr(e) => e.class(),
            EmrFlowError::Engine(e) => e.class(),
        }
    }
}

impl From<StoreError> for EmrFlowError {
    fn from(e: StoreError) -> Self {
        EmrFlowError::Engine(e.into())
    }
}

/// Hands a freshly made adapter what it learnt before a restart (its identity map).
pub fn prepare_emr(store: &Store, emr: &mut dyn crate::emr::Emr) -> Result<()> {
    if let Some(state) = store.meta(&meta::EMR_IDS)? {
        emr.restore_identity(&state);
    }
    Ok(())
}

/// The EMR holds `written` now (as `state`): note what it holds, release its
/// quarantine and whatever waited for it, keep the adapter's identity map. One place
/// for the clinic's inbox path and the hub's replica path.
fn emr_accepted(
    tx: &mut Tx<'_>,
    emr: &mut dyn crate::emr::Emr,
    written: &Version,
    state: &crate::emr::Fetched,
    now_ms: u64,
) -> Result<()> {
    let key = written.key();
    match state {
        crate::emr::Fetched::Present(s) => tx.set_emr_state(key, Some(&s.hash), false, now_ms)?,
        crate::emr::Fetched::Gone => tx.set_emr_state(key, None, true, now_ms)?,
    }
    if tx.release(key, Stage::Apply)? {
        tx.audit(
            now_ms,
            "emr",
            "release",
            &key.to_string(),
            &written.snapshot.hash.short(),
            "applied to the EMR",
        )?;
    }
    tx.release_blocked_by(key, now_ms)?;
    keep_identity(tx, emr)
}

/// The EMR refused `written` (or answered this one write unreadably): it waits in
/// the apply quarantine with the EMR's message, retried from `emr.retry_secs`
/// doubling; returns the attempt number.
fn emr_refused(
    tx: &mut Tx<'_>,
    policy: &Policy,
    written: &Version,
    e: &crate::emr::EmrError,
    now_ms: u64,
) -> Result<u32> {
    let key = written.key();
    let permanent = matches!(e, crate::emr::EmrError::Refused { .. });
    let base = policy.emr_retry_ms;
    let attempts = tx.quarantine(key, Stage::Apply, &e.to_string(), permanent, now_ms, |n| {
        base.saturating_mul(1u64 << n.saturating_sub(1).min(16))
            .min(24 * 3_600_000)
    })?;
    tx.audit(
        now_ms,
        "emr",
        "quarantine",
        &key.to_string(),
        &written.snapshot.hash.short(),
        &format!("attempt {attempts}: {e}"),
    )?;
    Ok(attempts)
}

/// Keeps the adapter's identity map if it changed, inside `tx`.
fn keep_identity(tx: &mut Tx<'_>, emr: &mut dyn crate::emr::Emr) -> Result<()> {
    if let Some(state) = emr.identity_state() {
        tx.set_meta(&meta::EMR_IDS, state)?;
    }
    Ok(())
}

/// Captures what clinicians changed in the EMR since the last capture, as local
/// writes. Our own writes into the EMR come back as feed events; they are
/// recognised by content (`emr_state`) and skipped. The adapter's cursor moves only
/// in the transaction that stores what it covered; on any EMR error nothing is
/// written and the next round reads the same events again.
pub fn capture_from_emr(
    store: &mut Store,
    policy: &Policy,
    emr: &mut dyn crate::emr::Emr,
    now_ms: u64,
) -> std::result::Result<CaptureSummary, EmrFlowError> {
    use crate::emr::Fetched;
    let cursor = store.meta(&meta::EMR_CURSOR)?;
    let (keys, next) = emr.changes(cursor.as_deref())?;
    // Problems that did not stop the read (one feed category unreadable): `status`
    // shows them as the EMR's last error while the rest is captured.
    let warnings = emr.take_warnings();
    let mut summary = CaptureSummary {
        events: keys.len(),
        ..CaptureSummary::default()
    };
    let mut unique: Vec<RecordKey> = Vec::new();
    for k in keys {
        if !unique.contains(&k) {
            unique.push(k);
        }
    }
    let mut fetched = Vec::with_capacity(unique.len());
    for key in unique {
        let known = store.emr_state(&key)?;
        let state = emr.fetch(&key)?;
        fetched.push((key, known, state));
    }
    let mut tx = store.begin()?;
    for (key, known, state) in fetched {
        match state {
            None => summary.unchanged += 1,
            Some(Fetched::Present(snap)) => {
                if known == Some((Some(snap.hash), false)) {
                    summary.echoes += 1;
                    continue;
                }
                let hash = snap.hash;
                if write_one(&mut tx, policy, snap, false, now_ms)? {
                    summary.captured += 1;
                } else {
                    summary.unchanged += 1;
                }
                tx.set_emr_state(&key, Some(&hash), false, now_ms)?;
            }
            Some(Fetched::Gone) => {
                if matches!(known, Some((_, true))) {
                    summary.echoes += 1;
                    continue;
                }
                match tx.current(&key)? {
                    Some(c) if !c.version.deleted => {
                        write_one(&mut tx, policy, c.version.snapshot, true, now_ms)?;
                        summary.captured += 1;
                    }
                    _ => summary.unchanged += 1,
                }
                tx.set_emr_state(&key, None, true, now_ms)?;
            }
        }
    }
    tx.set_meta(&meta::EMR_CURSOR, next)?;
    keep_identity(&mut tx, emr)?;
    tx.note_peer(
        "emr",
        PeerEvent::PullOk {
            sent: 0,
            received: 0,
        },
        now_ms,
    )?;
    if !warnings.is_empty() {
        let text = format!("capture went on, but: {}", warnings.join("; "));
        tracing::warn!(peer = "emr", warning = %text, "EMR capture degraded");
        tx.note_peer("emr", PeerEvent::Error(&text), now_ms)?;
    }
    tx.commit()?;
    Ok(summary)
}

/// What applying pulled records to the EMR did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EmrApplySummary {
    pub applied: ApplySummary,
    /// Refused by the EMR, now in quarantine with its message.
    pub refused: usize,
    /// Waiting behind a quarantined record they reference.
    pub blocked: usize,
}

/// The first record `v` references (its patient, its encounter) that waits in the
/// apply quarantine, with the reason it waits.
fn blocker(store: &Store, v: &Version) -> Result<Option<(RecordKey, String)>> {
    let body = v.snapshot.json();
    for field in ["subject", "patient", "encounter", "context"] {
        let Some(reference) = body
            .get(field)
            .and_then(|r| r.get("reference"))
            .and_then(|r| r.as_str())
        else {
            continue;
        };
        // `Patient/<id>` or an absolute URL ending in it.
        let mut parts = reference.rsplitn(3, '/');
        let (Some(id), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(key) = RecordKey::new(kind, id) else {
            continue;
        };
        if let Some(reason) = store.apply_quarantine(&key)? {
            return Ok(Some((key, reason)));
        }
    }
    Ok(None)
}

/// Applies pulled records to an external EMR in dependency order, then to the
/// replica. A record the EMR refuses (4xx) is quarantined with the EMR's message and
/// retried on `policy.emr_retry_ms` backoff; records referencing it wait, and are
/// released the moment it succeeds; every other record keeps flowing. When the EMR
/// itself is unavailable or answers garbage, the pass stops (nothing is
/// quarantined: it is not the records' fault) and the error is returned.
pub fn apply_inbox_to_emr(
    store: &mut Store,
    policy: &Policy,
    emr: &mut dyn crate::emr::Emr,
    now_ms: u64,
) -> std::result::Result<EmrApplySummary, EmrFlowError> {
    use crate::emr::EmrError;
    let mut summary = EmrApplySummary::default();
    loop {
        let batch = crate::engine::inbox_batch(store, now_ms, 200)?;
        if batch.is_empty() {
            break;
        }
        for (peer, v) in &batch {
            let key = v.key().clone();
            let source = format!("pull:{peer}");
            if let Some((dep, why)) = blocker(store, v)? {
                let mut tx = store.begin()?;
                tx.quarantine_waiting(&key, &dep, &why, now_ms, 24 * 3_600_000)?;
                tx.commit()?;
                summary.blocked += 1;
                continue;
            }
            // Decide without committing (the transaction rolls back when dropped).
            let preview = {
                let mut tx = store.begin()?;
                integrate(&mut tx, v, &source, None, true, now_ms)?
            };
            let to_write = match &preview {
                Integrated::Accepted => Some(v.clone()),
                Integrated::Conflict { result, .. } => Some((**result).clone()),
                Integrated::Duplicate | Integrated::Stale => None,
            };
            if let Some(w) = &to_write {
                match emr.apply(w) {
                    Ok(state) => {
                        let mut tx = store.begin()?;
                        let integrated = integrate(&mut tx, v, &source, None, true, now_ms)?;
                        after_pulled(
                            &mut tx,
                            policy,
                            v,
                            &integrated,
                            &mut summary.applied,
                            now_ms,
                        )?;
                        emr_accepted(&mut tx, emr, w, &state, now_ms)?;
                        tx.remove_from_inbox(&key)?;
                        tx.commit()?;
                    }
                    Err(e @ (EmrError::Refused { .. } | EmrError::Unreadable(_))) => {
                        // A refusal, or an unreadable answer to this one write: this
                        // record waits (the second kind retryably), the pass goes on.
                        let mut tx = store.begin()?;
                        emr_refused(&mut tx, policy, w, &e, now_ms)?;
                        tx.commit()?;
                        summary.refused += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                let mut tx = store.begin()?;
                after_pulled(&mut tx, policy, v, &preview, &mut summary.applied, now_ms)?;
                tx.release(&key, Stage::Apply)?;
                tx.remove_from_inbox(&key)?;
                tx.commit()?;
            }
        }
    }
    Ok(summary)
}

fn tally(w: EmrWrite, s: &mut EmrApplySummary) {
    match w {
        EmrWrite::Done => s.applied.applied += 1,
        EmrWrite::Refused => s.refused += 1,
        EmrWrite::Waiting => s.blocked += 1,
    }
}

/// Writes into the EMR the replica's current version of every record due in the
/// apply quarantine that is not in the inbox: a hub's refused or waiting records,
/// and a reviewed conflict's resolution (`review_conflict`) at any node.
pub fn apply_due_to_emr(
    store: &mut Store,
    policy: &Policy,
    emr: &mut dyn crate::emr::Emr,
    now_ms: u64,
) -> std::result::Result<EmrApplySummary, EmrFlowError> {
    let mut summary = EmrApplySummary::default();
    for key in store.apply_due_outside_inbox(now_ms, 500)? {
        match store.current(&key)? {
            Some(c) => {
                let w = write_replica_version(store, policy, emr, &c.version, now_ms)?;
                tally(w, &mut summary);
            }
            None => {
                let mut tx = store.begin()?;
                tx.release(&key, Stage::Apply)?;
                tx.commit()?;
            }
        }
    }
    Ok(summary)
}

/// What applying one version to the EMR came to.
enum EmrWrite {
    Done,
    Refused,
    Waiting,
}

/// Writes one replica version into the EMR (a hub with its own EMR): the version is
/// already integrated, so only the EMR side and its quarantine change here.
fn write_replica_version(
    store: &mut Store,
    policy: &Policy,
    emr: &mut dyn crate::emr::Emr,
    v: &Version,
    now_ms: u64,
) -> std::result::Result<EmrWrite, EmrFlowError> {
    use crate::emr::EmrError;
    let key = v.key().clone();
    // Already what the EMR holds (captured from it, or written before): an echo.
    if store.emr_state(&key)? == Some((Some(v.snapshot.hash), v.deleted))
        || (v.deleted && matches!(store.emr_state(&key)?, Some((_, true))))
    {
        let mut tx = store.begin()?;
        tx.release(&key, Stage::Apply)?;
        tx.commit()?;
        return Ok(EmrWrite::Done);
    }
    let mut waits_for = blocker(store, v)?;
    if waits_for.is_none() && key.kind != "Patient" {
        // The patient arrived here but is not in the EMR yet (refused, or behind).
        if let Some(p) = &v.snapshot.patient {
            let pk = RecordKey {
                kind: "Patient".into(),
                id: p.clone(),
            };
            if store.current(&pk)?.is_some() && store.emr_state(&pk)?.is_none() {
                waits_for = Some((pk, "not in the EMR yet".into()));
            }
        }
    }
    if let Some((dep, why)) = waits_for {
        let mut tx = store.begin()?;
        tx.quarantine_waiting(&key, &dep, &why, now_ms, policy.emr_retry_ms)?;
        tx.commit()?;
        return Ok(EmrWrite::Waiting);
    }
    match emr.apply(v) {
        Ok(state) => {
            let mut tx = store.begin()?;
            emr_accepted(&mut tx, emr, v, &state, now_ms)?;
            tx.commit()?;
            Ok(EmrWrite::Done)
        }
        Err(e @ (EmrError::Refused { .. } | EmrError::Unreadable(_))) => {
            // Refused: this record's fault, backoff from emr.retry_secs. Unreadable
            // answer to one write: retried the same way, and the pass goes on.
            let mut tx = store.begin()?;
            emr_refused(&mut tx, policy, v, &e, now_ms)?;
            tx.commit()?;
            Ok(EmrWrite::Refused)
        }
        Err(e) => Err(e.into()),
    }
}

/// At a hub with its own EMR (the central OpenMRS, or a district's): writes into the
/// EMR every version that reached the replica by any way but the EMR itself —
/// records pushed by children, conflict resolutions, local writes — in change order
/// (a push batch stores Patients first), after any due retries. Records the EMR
/// refuses wait in the apply quarantine with its message, records referencing them
/// wait behind them, everything else flows. When the EMR is unavailable the pass
/// stops where it is (the cursor is kept per record) and the error is returned.
/// Versions pulled from a parent take `apply_inbox_to_emr` instead (they reach the
/// replica only once the EMR holds them, so they are echoes here).
pub fn apply_replica_to_emr(
    store: &mut Store,
    policy: &Policy,
    emr: &mut dyn crate::emr::Emr,
    now_ms: u64,
) -> std::result::Result<EmrApplySummary, EmrFlowError> {
    let mut summary = apply_due_to_emr(store, policy, emr, now_ms)?;
    let mut cursor = store.meta(&meta::EMR_OUT_CURSOR)?.unwrap_or(0);
    loop {
        let batch = store.changed_after(cursor, 500)?;
        if batch.is_empty() {
            break;
        }
        for (seq, key) in batch {
            if let Some(c) = store.current(&key)? {
                // A record whose current version is newer than this change is met
                // again at its own seq.
                if c.seq == seq {
                    let w = write_replica_version(store, policy, emr, &c.version, now_ms)?;
                    tally(w, &mut summary);
                }
            }
            cursor = seq;
            let mut tx = store.begin()?;
            tx.set_meta(&meta::EMR_OUT_CURSOR, cursor)?;
            tx.commit()?;
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emr::EmrError;

    #[test]
    fn flow_errors_keep_the_class_of_the_emr_or_the_store() {
        let busy = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        ));
        let cases = [
            (
                EmrFlowError::Emr(EmrError::Unavailable("down".into())),
                ErrorClass::Retryable,
            ),
            (
                EmrFlowError::Emr(EmrError::Refused {
                    status: 400,
                    message: "no".into(),
                }),
                ErrorClass::Permanent,
            ),
            (EmrFlowError::from(busy), ErrorClass::Retryable),
            (
                EmrFlowError::from(StoreError::NoNodeId("/s.db".into())),
                ErrorClass::Corruption,
            ),
            (
                EmrFlowError::Engine(EngineError::Invalid("x".into())),
                ErrorClass::Permanent,
            ),
        ];
        for (e, class) in cases {
            assert_eq!(e.class(), class, "{e}");
        }
    }
}
