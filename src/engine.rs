//! The sync protocol, free of sockets and clocks: every function takes the store and
//! the current time, and returns what to send or what happened.
//!
//! Flows (see ARCHITECTURE.md for the full picture)
//! - local write → replica (new version, own counter bumped) → outbox (coalesced)
//! - child: [`next_push`] builds a batch from the outbox → transport → parent:
//!   [`handle_push`] validates and integrates each record independently → per-record
//!   [`Outcome`]s → child: [`apply_push_results`] clears acknowledged outbox entries
//!   (only if the acknowledged version is still current) or quarantines rejections.
//! - child: [`pull_request`] → parent: [`handle_pull`] answers a page of records
//!   visible to that child → child: [`store_pull`] commits page + cursor to the inbox
//!   in one transaction → [`apply_inbox`] integrates them into the replica.
//!
//! Invariants
//! - Integration is decided by version vectors alone: equal → duplicate, newer →
//!   accept, older → stale, concurrent → conflict, resolved by policy (metadata: the
//!   version from upstream wins; clinical: field-wise merge against the common
//!   ancestor, else the later HLC wins, ties broken by node id). Both sides of every
//!   conflict are kept in the conflicts table: nothing is silently dropped.
//! - Handling the same push or the same pull page twice changes nothing the second
//!   time (version vectors make integration idempotent).
//! - A parent answers only after the transaction holding the effects has committed.
//! - Errors abort the whole transaction: a push either applies every accepted record
//!   of the batch and answers, or applies none and answers nothing.

use serde::Serialize;

use crate::error::{Classify, ErrorClass};
use crate::model::{
    merge_fields, Causality, Class, ContentHash, ModelError, RecordKey, Snapshot, Version,
    VersionVector,
};
use crate::store::{
    meta, CatchmentReason, InboxRow, PeerEvent, Stage, Store, StoreError, Tx, Unkept,
    VersionOutcome, VersionText,
};
use crate::wire::Receipt;
use crate::wire::{
    FetchRequest, FetchResponse, FetchResult, Outcome, PullRequest, PullResponse, PushRequest,
    PushResponse, PushResult, WireError, WireRecord,
};

/// The peer name a child keeps its parent's cursor and link state under.
pub const PARENT: &str = "parent";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// A pushed record its block could not build (found while the push was being
    /// applied, which is then refused whole).
    #[error("{0}")]
    Undecodable(WireError),
    /// A record that cannot be built from what it was made of (`what` says which:
    /// a merge's result, a record named in an order).
    #[error("{what}: {source}")]
    Model {
        what: String,
        #[source]
        source: ModelError,
    },
}

/// Refusals are decided by the protocol and are permanent; the store's errors keep
/// their own class.
impl Classify for EngineError {
    fn class(&self) -> ErrorClass {
        match self {
            EngineError::Store(e) => e.class(),
            EngineError::Forbidden(_)
            | EngineError::Invalid(_)
            | EngineError::NotFound(_)
            | EngineError::Undecodable(_)
            | EngineError::Model { .. } => ErrorClass::Permanent,
        }
    }
}

impl EngineError {
    /// [`Classify::is_retryable`], here so callers need no import.
    pub fn is_retryable(&self) -> bool {
        Classify::is_retryable(self)
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Assigns patients to a child node by a field of the Patient resource.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, Serialize)]
pub struct CatchmentRule {
    /// The child node that gets matching patients.
    pub node: String,
    /// Dotted path into the Patient, arrays searched element by element:
    /// `address.district`, `managingOrganization.reference`.
    pub path: String,
    /// The value the field must equal.
    pub equals: String,
}

impl CatchmentRule {
    pub fn matches(&self, patient: &serde_json::Value) -> bool {
        let mut values = vec![patient];
        for step in self.path.split('.') {
            let mut next = Vec::new();
            for v in values {
                match v.get(step) {
                    Some(serde_json::Value::Array(items)) => next.extend(items.iter()),
                    Some(other) => next.push(other),
                    None => {}
                }
            }
            values = next
                .into_iter()
                .flat_map(|v| match v {
                    serde_json::Value::Array(items) => items.iter().collect::<Vec<_>>(),
                    other => vec![other],
                })
                .collect();
        }
        values
            .iter()
            .any(|v| v.as_str() == Some(self.equals.as_str()))
    }
}

/// What a node is and what it accepts; built from the configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    pub node_id: String,
    /// True when this node pushes to and pulls from a parent.
    pub has_parent: bool,
    /// Kinds this node accepts from children (`openmrs:*` always).
    pub known_kinds: Vec<String>,
    pub max_record_bytes: usize,
    pub catchment: Vec<CatchmentRule>,
    /// Upper bounds on a pull page this node serves.
    pub max_page_records: usize,
    pub max_page_bytes: usize,
    /// Pulled records go to an external EMR (`apply_inbox_to_emr`) instead of
    /// straight into the replica.
    pub external_emr: bool,
    /// First retry delay for a record the EMR refused; doubles per attempt, up to a day.
    pub emr_retry_ms: u64,
    /// Records from a child stamped further than this ahead of `now` are refused.
    pub max_clock_ahead_ms: u64,
    /// This node serves children (`[hub]`): with an external EMR, what children push
    /// is written into it too (`apply_replica_to_emr`).
    pub serves_children: bool,
    /// For district hubs among the children: the nodes below each whose records it
    /// may forward (besides its own). Children not listed forward only their own.
    pub descendants: std::collections::HashMap<String, Vec<String>>,
    /// Run orders from the parent (`crate::remote`); `node.remote_orders`.
    pub accept_remote_orders: bool,
}

impl Policy {
    pub fn new(node_id: &str, has_parent: bool) -> Policy {
        Policy {
            node_id: node_id.to_string(),
            has_parent,
            known_kinds: crate::model::CLINICAL_KINDS
                .iter()
                .chain(crate::model::METADATA_KINDS)
                .map(|s| s.to_string())
                .collect(),
            max_record_bytes: 1 << 20,
            catchment: Vec::new(),
            max_page_records: 5_000,
            max_page_bytes: 4 << 20,
            external_emr: false,
            emr_retry_ms: 5 * 60_000,
            max_clock_ahead_ms: 300_000,
            serves_children: false,
            descendants: std::collections::HashMap::new(),
            accept_remote_orders: true,
        }
    }

    /// May a record pushed by `child` name `origin` as the node that wrote it?
    pub fn may_originate(&self, child: &str, origin: &str) -> bool {
        origin == child
            || self
                .descendants
                .get(child)
                .is_some_and(|d| d.iter().any(|n| n == origin))
    }

    fn accepts_kind(&self, kind: &str) -> bool {
        kind.starts_with("openmrs:") || self.known_kinds.iter().any(|k| k == kind)
    }
}

/// When a quarantined record is tried again: permanent refusals back off from five
/// minutes to a day, transient ones from thirty seconds to an hour.
pub fn retry_delay_ms(attempts: u32, permanent: bool) -> u64 {
    let (base, cap) = if permanent {
        (5 * 60_000u64, 24 * 3_600_000u64)
    } else {
        (30_000u64, 3_600_000u64)
    };
    base.saturating_mul(1u64 << attempts.saturating_sub(1).min(20))
        .min(cap)
}

/// How a version fared when it met the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Integrated {
    Accepted,
    Duplicate,
    Stale,
    Conflict {
        resolution: String,
        result: Box<Version>,
        /// The incoming version's content did not survive (the local one won, kept
        /// for review): a child that pushed it is told so.
        incoming_lost: bool,
    },
}

/// Integrates one version into the replica: the single place where versions meet.
///
/// `sender` is the child a pushed version came from (stored with it, so that child's
/// pulls leave it out); `None` for local writes, pulled versions and resolutions.
pub(crate) fn integrate(
    tx: &mut Tx<'_>,
    incoming: &Version,
    source: &str,
    sender: Option<&str>,
    from_upstream: bool,
    now_ms: u64,
) -> Result<Integrated> {
    let current = tx.current(incoming.key())?;
    integrate_over(
        tx,
        incoming,
        None,
        current,
        source,
        sender,
        from_upstream,
        now_ms,
    )
}

/// [`integrate`] when the caller has just read `current` (what the replica holds
/// for the record) in the same transaction: a push's `authorize` has. `text` is
/// `VersionText::of(incoming)` when the caller made it beforehand (a push, on its
/// checking thread); else it is made here if the version is written.
#[allow(clippy::too_many_arguments)]
fn integrate_over(
    tx: &mut Tx<'_>,
    incoming: &Version,
    text: Option<&VersionText>,
    current: Option<crate::store::Stored>,
    source: &str,
    sender: Option<&str>,
    from_upstream: bool,
    now_ms: u64,
) -> Result<Integrated> {
    tx.observe(incoming.hlc, now_ms)?;
    let key = incoming.key().clone();
    let accept = |tx: &mut Tx<'_>| -> Result<Integrated> {
        let outcome = VersionOutcome::Accepted;
        match text {
            Some(text) => tx.write_described(incoming, text, source, sender, outcome, now_ms)?,
            None => tx.write_version(incoming, source, sender, outcome, now_ms)?,
        };
        Ok(Integrated::Accepted)
    };
    let Some(current) = current else {
        return accept(tx);
    };
    let local = current.version;
    let same_content =
        local.snapshot.hash == incoming.snapshot.hash && local.deleted == incoming.deleted;
    match incoming.vv.compare(&local.vv) {
        Causality::Same if same_content => Ok(Integrated::Duplicate),
        Causality::Newer
            if from_upstream
                && !same_content
                && local.origin == tx.node_id()
                && tx.in_outbox(&key)?
                && restoring(tx, source)? =>
        {
            // This node's own unpushed write is dominated by what its parent holds:
            // its counters restarted (a box wiped and reinstalled, written to before
            // its first pull). Not an older version but a concurrent edit: resolved by
            // the later clock, never dropped as stale. (No field merge: the vectors
            // name different versions on either side of the restart, so no common
            // ancestor can be found by them.)
            let local_wins = rank(&local) > rank(incoming);
            let result = if local_wins {
                let me = tx.node_id().to_string();
                Version {
                    snapshot: local.snapshot.clone(),
                    origin: me.clone(),
                    hlc: tx.tick(now_ms)?,
                    // It must dominate the parent's vector, or the parent calls it stale.
                    vv: incoming.vv.join(&local.vv).bumped(&me),
                    deleted: local.deleted,
                }
            } else {
                incoming.clone()
            };
            let resolution = format!(
                "{} kept (later clock); this node's edit was written before its first sync after a reinstall, when its counters restarted",
                if local_wins { "this node's edit" } else { "the parent's version" }
            );
            record_conflict(
                tx, &local, incoming, result, resolution, local_wins, source, now_ms,
            )
        }
        Causality::Newer => accept(tx),
        Causality::Older
            if sender.is_some()
                && tx
                    .version_by_vv(&key, &incoming.vv)?
                    .is_some_and(|h| h.snapshot.hash != incoming.snapshot.hash) =>
        {
            // The vector names other content in this node's history: the child wrote
            // this under counters that restarted (a box wiped and reinstalled). Not
            // an old copy but a new edit, concurrent with what is held here.
            let incoming_wins = rank(incoming) > rank(&local);
            let winner = if incoming_wins { incoming } else { &local };
            let me = tx.node_id().to_string();
            let result = Version {
                snapshot: winner.snapshot.clone(),
                origin: me.clone(),
                hlc: tx.tick(now_ms)?,
                vv: local.vv.join(&incoming.vv).bumped(&me),
                deleted: winner.deleted,
            };
            let resolution = format!(
                "{} kept (later clock); {}'s edit reused a version vector it had written before (its counters restarted after a reinstall)",
                if incoming_wins { format!("{}'s new edit", incoming.origin) } else { "the version held here".to_string() },
                incoming.origin
            );
            record_conflict(
                tx,
                &local,
                incoming,
                result,
                resolution,
                !incoming_wins,
                source,
                now_ms,
            )
        }
        Causality::Older => {
            tx.remember_unkept(incoming, source, Unkept::Stale, now_ms)?;
            Ok(Integrated::Stale)
        }
        Causality::Same | Causality::Concurrent => {
            let (resolution, result, incoming_lost) =
                resolve(tx, &local, incoming, from_upstream, now_ms)?;
            record_conflict(
                tx,
                &local,
                incoming,
                result,
                resolution,
                incoming_lost,
                source,
                now_ms,
            )
        }
    }
}

/// The order of the later-clock rule: stamp, then node id, then content hash.
fn rank(v: &Version) -> (crate::model::Hlc, String, crate::model::ContentHash) {
    (v.hlc, v.origin.clone(), v.snapshot.hash)
}

/// Records a conflict the one way: the incoming side in history, the result as this
/// node's new write when it differs from what is held, both sides kept, audited.
#[allow(clippy::too_many_arguments)]
fn record_conflict(
    tx: &mut Tx<'_>,
    local: &Version,
    incoming: &Version,
    result: Version,
    resolution: String,
    incoming_lost: bool,
    source: &str,
    now_ms: u64,
) -> Result<Integrated> {
    let key = local.key().clone();
    tx.remember_unkept(incoming, source, Unkept::Conflict, now_ms)?;
    if result.vv != local.vv || result.snapshot.hash != local.snapshot.hash {
        // A resolution is this node's new write: every child gets it, the sender of
        // the other side included.
        tx.write_version(&result, source, None, VersionOutcome::Resolved, now_ms)?;
    }
    tx.add_conflict(&key, local, incoming, &resolution, &result.vv, now_ms)?;
    tx.audit(
        now_ms,
        source,
        "conflict",
        &key.to_string(),
        &result.snapshot.hash.short(),
        &resolution,
    )?;
    Ok(Integrated::Conflict {
        resolution,
        result: Box::new(result),
        incoming_lost,
    })
}

/// Whether a child is still on its first pull from `source`'s parent (new or
/// reinstalled: its own records are coming back).
fn restoring(tx: &Tx<'_>, source: &str) -> Result<bool> {
    let parent = source.strip_prefix("pull:").unwrap_or(source);
    Ok(restoring_own(
        tx.cursor(parent)?,
        tx.meta(&meta::RESTORING_OWN)?,
    ))
}

/// Whether pulls bring this node's own records back (a first contact, or a resync):
/// while `RESTORING_OWN` says so; before any pull set it (a store older than the
/// flag, or one that never pulled), while the cursor has not moved. A first pull
/// that found nothing leaves the cursor where it was, and the flag (false) ends it.
fn restoring_own(cursor: crate::wire::Cursor, flag: Option<bool>) -> bool {
    flag.unwrap_or(cursor == crate::wire::Cursor::default())
}

/// Picks the surviving version of two concurrent ones. Pure apart from reading the
/// common ancestor from history.
fn resolve(
    tx: &mut Tx<'_>,
    local: &Version,
    remote: &Version,
    from_upstream: bool,
    now_ms: u64,
) -> Result<(String, Version, bool)> {
    let me = tx.node_id().to_string();
    let join = local.vv.join(&remote.vv);
    if local.snapshot.class == Class::Metadata {
        // Metadata is authoritative upstream: take the upstream version as it is.
        return Ok(if from_upstream {
            (
                "metadata: the parent's version wins (root authority)".into(),
                remote.clone(),
                false,
            )
        } else {
            (
                "metadata: this node's version wins (root authority)".into(),
                local.clone(),
                true,
            )
        });
    }
    if !local.deleted && !remote.deleted {
        let ancestor_vv = local.vv.meet(&remote.vv);
        if let Some(ancestor) = tx.version_by_vv(local.key(), &ancestor_vv)? {
            if let Some(merged) = merge_fields(
                &ancestor.snapshot.json(),
                &local.snapshot.json(),
                &remote.snapshot.json(),
            ) {
                let snapshot =
                    Snapshot::from_json_value(merged).map_err(|source| EngineError::Model {
                        what: format!("merged {}", local.key()),
                        source,
                    })?;
                let changed_l =
                    crate::model::changed_fields(&ancestor.snapshot.json(), &local.snapshot.json());
                let changed_r = crate::model::changed_fields(
                    &ancestor.snapshot.json(),
                    &remote.snapshot.json(),
                );
                let hlc = tx.tick(now_ms)?;
                return Ok((
                    format!(
                        "merged: {} changed [{}], {} changed [{}]",
                        local.origin,
                        changed_l.join(","),
                        remote.origin,
                        changed_r.join(",")
                    ),
                    Version {
                        snapshot,
                        origin: me.clone(),
                        hlc,
                        vv: join.bumped(&me),
                        deleted: false,
                    },
                    false,
                ));
            }
        }
    }
    // Deterministic winner: later clock, then node id, then content hash.
    let remote_wins = rank(remote) > rank(local);
    let (winner, loser) = if remote_wins {
        (remote, local)
    } else {
        (local, remote)
    };
    // Equal vectors with different content cannot be ordered by the vector, so the
    // result must be a new write that both sides will see as newer.
    let vv = if local.vv == remote.vv {
        join.bumped(&me)
    } else {
        join
    };
    Ok((
        format!(
            "{}'s version kept (later clock); {}'s version kept for review",
            winner.origin, loser.origin
        ),
        Version {
            snapshot: winner.snapshot.clone(),
            origin: me,
            hlc: winner.hlc,
            vv,
            deleted: winner.deleted,
        },
        !remote_wins,
    ))
}

/// After a Patient is stored: recompute which children it belongs to by rule. With
/// `prune`, rule memberships it no longer matches are removed (a write at this node
/// or from upstream); a child's push only ever adds.
fn update_catchment(tx: &mut Tx<'_>, policy: &Policy, v: &Version, prune: bool) -> Result<()> {
    set_rule_catchment(tx, v, rule_nodes(policy, v).as_deref(), prune)
}

/// The nodes whose catchment rules Patient `v` matches; `None` for another kind or
/// where no rules are set (nothing to add or prune). Reads the version alone, so a
/// push finds them on its checking thread.
fn rule_nodes(policy: &Policy, v: &Version) -> Option<Vec<String>> {
    if v.key().kind != "Patient" || policy.catchment.is_empty() {
        return None;
    }
    let body = v.snapshot.json();
    let mut matched: Vec<String> = policy
        .catchment
        .iter()
        .filter(|r| r.matches(&body))
        .map(|r| r.node.clone())
        .collect();
    matched.dedup();
    Some(matched)
}

/// [`update_catchment`] with the rules' answer for `v` already found (`matched`:
/// [`rule_nodes`] of `v`).
fn set_rule_catchment(
    tx: &mut Tx<'_>,
    v: &Version,
    matched: Option<&[String]>,
    prune: bool,
) -> Result<()> {
    let Some(matched) = matched else {
        return Ok(());
    };
    for node in matched {
        tx.add_to_catchment(node, &v.key().id, CatchmentReason::Rule)?;
    }
    if prune {
        tx.prune_rule_catchment(&v.key().id, matched)?;
    }
    Ok(())
}

/// What a local write did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalWrite {
    pub record: String,
    pub changed: bool,
}

/// Writes resources as the local EMR (embedded mode): one transaction for all of them.
pub fn write_local(
    store: &mut Store,
    policy: &Policy,
    items: Vec<(Snapshot, bool)>,
    now_ms: u64,
) -> Result<Vec<LocalWrite>> {
    if let Some((s, _)) = items
        .iter()
        .find(|(s, _)| s.body.len() > crate::store::MAX_RECORD_BYTES)
    {
        return Err(EngineError::Invalid(format!(
            "{} is {} MiB: the largest record clinicsync carries is {} MiB (attachments belong in a document store); nothing was written",
            s.key,
            s.body.len() >> 20,
            crate::store::MAX_RECORD_BYTES >> 20
        )));
    }
    let mut tx = store.begin()?;
    let mut out = Vec::with_capacity(items.len());
    for (snapshot, deleted) in items {
        let key = snapshot.key.clone();
        let changed = write_one(&mut tx, policy, snapshot, deleted, now_ms)?;
        out.push(LocalWrite {
            record: key.to_string(),
            changed,
        });
    }
    tx.commit()?;
    Ok(out)
}

/// One local write inside a transaction; false if the content is unchanged.
pub(crate) fn write_one(
    tx: &mut Tx<'_>,
    policy: &Policy,
    snapshot: Snapshot,
    deleted: bool,
    now_ms: u64,
) -> Result<bool> {
    let me = policy.node_id.clone();
    let key = snapshot.key.clone();
    let current = tx.current(&key)?;
    if let Some(c) = &current {
        if c.version.snapshot.hash == snapshot.hash && c.version.deleted == deleted {
            return Ok(false);
        }
    } else if deleted {
        return Err(EngineError::Invalid(format!(
            "{key} does not exist here, nothing to delete"
        )));
    }
    let vv = current
        .as_ref()
        .map(|c| c.version.vv.clone())
        .unwrap_or_default()
        .bumped(&me);
    let hlc = tx.tick(now_ms)?;
    let version = Version {
        snapshot,
        origin: me,
        hlc,
        vv,
        deleted,
    };
    tx.write_version(&version, "local", None, VersionOutcome::Written, now_ms)?;
    update_catchment(tx, policy, &version, true)?;
    if policy.has_parent {
        tx.enqueue(&key, now_ms)?;
        // A new local version is a new attempt: it no longer waits behind the old one.
        tx.release(&key, Stage::Push)?;
    }
    Ok(true)
}

/// What a person keeps when reviewing a conflict (`conflicts resolve`).
#[derive(Debug, Clone)]
pub enum Keep {
    /// What the policy kept (the current version, if nothing changed since).
    Winner,
    /// The side the policy did not keep.
    Other,
    /// This node's side as it was when the conflict was detected.
    Local,
    /// The other node's side.
    Remote,
    /// A corrected resource written by the reviewer.
    Content(Snapshot),
}

/// What a review did.
#[derive(Debug, Clone, Serialize)]
pub struct Reviewed {
    pub conflict: i64,
    pub record: String,
    /// What was kept, in words (also the audit entry's detail).
    pub kept: String,
    /// The new version's vector (JSON, as `conflicts show` has it), if the review
    /// wrote one (keeping what the policy kept writes nothing: the current version
    /// already supersedes both sides).
    pub new_vv: Option<serde_json::Value>,
}

/// A person's review of conflict `n`: keeps one side, the other or new content.
/// The result is a new version that supersedes both sides (and any later edit, with
/// `force`), written, audited and queued like any local edit; the conflict is marked
/// reviewed. Refused (nothing changed) for an unknown or already reviewed conflict,
/// content for another record, or — without `force` — a record edited since.
pub fn review_conflict(
    store: &mut Store,
    policy: &Policy,
    n: i64,
    keep: Keep,
    force: bool,
    actor: &str,
    now_ms: u64,
) -> Result<Reviewed> {
    let mut tx = store.begin()?;
    let c = tx
        .conflict(n)?
        .ok_or_else(|| EngineError::NotFound(format!("no conflict #{n}")))?;
    if let Some((at, what)) = &c.reviewed {
        return Err(EngineError::Invalid(format!(
            "conflict #{n} was already resolved at {}: {what}",
            crate::time::fmt_time(*at)
        )));
    }
    let key = c.key.clone();
    let current = tx.current(&key)?.ok_or_else(|| {
        EngineError::Invalid(format!("{key} is no longer held here; nothing to resolve"))
    })?;
    if current.version.vv != c.result_vv && !force {
        return Err(EngineError::Invalid(format!(
            "{key} was edited after conflict #{n} (now {}, the conflict left {}): look at it with `get {key}` and `history {key}`, then resolve with --force to replace that edit",
            current.version.vv, c.result_vv
        )));
    }
    let kept_hash = tx
        .version_by_vv(&key, &c.result_vv)?
        .map(|v| v.snapshot.hash)
        .unwrap_or(current.version.snapshot.hash);
    let (kept, snapshot) = match keep {
        Keep::Winner => {
            let what = format!("kept what the policy kept (vector {})", c.result_vv);
            if current.version.vv == c.result_vv {
                tx.mark_conflict_reviewed(n, now_ms, &what)?;
                tx.audit(
                    now_ms,
                    actor,
                    "resolve",
                    &key.to_string(),
                    &kept_hash.short(),
                    &format!("conflict #{n}: {what}"),
                )?;
                tx.commit()?;
                return Ok(Reviewed {
                    conflict: n,
                    record: key.to_string(),
                    kept: what,
                    new_vv: None,
                });
            }
            let v = tx.version_by_vv(&key, &c.result_vv)?.ok_or_else(|| {
                EngineError::Invalid(format!(
                    "the version conflict #{n} left ({}) is not in this node's history",
                    c.result_vv
                ))
            })?;
            (what, v.snapshot)
        }
        Keep::Other => {
            let l = c.local.snapshot.hash == kept_hash;
            let r = c.remote.snapshot.hash == kept_hash;
            let side = match (l, r) {
                (true, false) => &c.remote,
                (false, true) => &c.local,
                _ => {
                    return Err(EngineError::Invalid(format!(
                        "conflict #{n} was {} — there is no single other side: keep local, remote, or a file",
                        if l { "between two identical contents" } else { "resolved by merging both sides' fields" }
                    )))
                }
            };
            (
                format!("kept the other side: {}'s version {}", side.origin, side.vv),
                side.snapshot.clone(),
            )
        }
        Keep::Local => (
            format!("kept {}'s version {}", c.local.origin, c.local.vv),
            c.local.snapshot.clone(),
        ),
        Keep::Remote => (
            format!("kept {}'s version {}", c.remote.origin, c.remote.vv),
            c.remote.snapshot.clone(),
        ),
        Keep::Content(s) => {
            if s.key != key {
                return Err(EngineError::Invalid(format!(
                    "the file holds {}, but conflict #{n} is about {key}",
                    s.key
                )));
            }
            (format!("kept new content {}", s.hash.short()), s)
        }
    };
    // A new version over whatever is current: it supersedes both sides.
    let vv = current
        .version
        .vv
        .join(&c.result_vv)
        .bumped(&policy.node_id);
    let hlc = tx.tick(now_ms)?;
    let version = Version {
        snapshot,
        origin: policy.node_id.clone(),
        hlc,
        vv: vv.clone(),
        deleted: false,
    };
    tx.write_version(&version, actor, None, VersionOutcome::Resolved, now_ms)?;
    update_catchment(&mut tx, policy, &version, true)?;
    if policy.has_parent {
        tx.enqueue(&key, now_ms)?;
        tx.release(&key, Stage::Push)?;
    }
    if policy.external_emr && !policy.serves_children {
        // A clinic's EMR gets it on its next round (a hub's reads the replica).
        tx.quarantine(
            &key,
            Stage::Apply,
            &format!("resolution of conflict #{n} to be written into the EMR"),
            false,
            now_ms,
            |_| 0,
        )?;
    }
    tx.mark_conflict_reviewed(n, now_ms, &kept)?;
    tx.audit(
        now_ms,
        actor,
        "resolve",
        &key.to_string(),
        &version.snapshot.hash.short(),
        &format!("conflict #{n}: {kept}"),
    )?;
    tx.commit()?;
    Ok(Reviewed {
        conflict: n,
        record: key.to_string(),
        kept,
        new_vv: serde_json::from_str(&vv.to_json()).ok(),
    })
}

/// Most entries a pushed version vector may have: one per node that ever wrote the
/// record; far more than any real record sees, far fewer than an attacker would like.
pub const MAX_VV_ENTRIES: usize = 64;
/// Highest counter a hub accepts for any node: far from `u64::MAX`, so no sequence of
/// accepted writes can make a counter wrap.
pub const MAX_COUNTER: u64 = 1 << 48;
/// How far one push may move a child's own counter for one record past what the hub
/// holds: a record edited a million times offline is not a record, it is an attack.
pub const MAX_COUNTER_JUMP: u64 = 1 << 20;

/// A refusal of one pushed record: the reason sent back, and whether trying again
/// later can help.
type Refused = (String, bool);

/// Shortens text that came from a peer before it is echoed or audited: an invalid
/// field is named, never stored whole.
fn clip(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        // No more characters than bytes: nothing to cut (and no per-char copy).
        return s.to_string();
    }
    let mut out: String = s.chars().take(MAX).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Checks a pushed record on its own, before it touches the store: field shapes and
/// sizes, provenance (`origin`, vector entries) and clock, kind and class.
fn validate(
    policy: &Policy,
    child: &str,
    rec: WireRecord,
    now_ms: u64,
) -> std::result::Result<Version, Refused> {
    if let Err(e) = RecordKey::new(&rec.kind, &rec.id) {
        return Err((clip(&e.to_string()), true));
    }
    if !policy.accepts_kind(&rec.kind) {
        return Err((
            format!("unknown kind {:?}: this hub does not accept it", rec.kind),
            true,
        ));
    }
    if rec.body.len() > policy.max_record_bytes {
        return Err((
            format!(
                "record is {} bytes, over this hub's limit of {} bytes",
                rec.body.len(),
                policy.max_record_bytes
            ),
            true,
        ));
    }
    if rec.vv.0.is_empty() || rec.origin.is_empty() {
        return Err(("record has no version vector or origin".into(), true));
    }
    if !crate::model::valid_node_id(&rec.origin) {
        return Err((
            format!("origin {:?} is not a valid node id", clip(&rec.origin)),
            true,
        ));
    }
    if !policy.may_originate(child, &rec.origin) {
        return Err((
            format!(
                "origin {:?} is neither {child} nor a node below it: a node pushes only what it or its own descendants wrote",
                rec.origin
            ),
            true,
        ));
    }
    if rec.vv.0.len() > MAX_VV_ENTRIES {
        return Err((
            format!(
                "version vector has {} entries, over the limit of {MAX_VV_ENTRIES}",
                rec.vv.0.len()
            ),
            true,
        ));
    }
    for (node, &n) in &rec.vv.0 {
        if !crate::model::valid_node_id(node) {
            return Err((
                format!("version vector names {:?}, not a valid node id", clip(node)),
                true,
            ));
        }
        if n == 0 || n > MAX_COUNTER {
            return Err((
                format!("version vector counter {node}:{n} is out of range (1..={MAX_COUNTER})"),
                true,
            ));
        }
    }
    if rec.vv.get(&rec.origin) == 0 {
        return Err((
            format!(
                "version vector {} does not count a write by its origin {}",
                rec.vv, rec.origin
            ),
            true,
        ));
    }
    let ahead = rec.hlc.wall_ms.saturating_sub(now_ms);
    if ahead > policy.max_clock_ahead_ms {
        // Retryable: the same record is accepted once real time catches up with it,
        // and the reason tells the technician to fix the clock meanwhile.
        return Err((
            format!(
                "record is stamped {} ahead of this hub's clock (limit {}): {}'s clock is wrong; fix it (NTP) — once it is right the node stamps its unpushed records again and they are accepted (else when the hub's time reaches the stamp)",
                crate::time::words_for_ms(ahead),
                crate::time::words_for_ms(policy.max_clock_ahead_ms),
                rec.origin
            ),
            false,
        ));
    }
    let version = rec
        .into_version()
        .map_err(|e| (clip(&format!("malformed resource: {e}")), true))?;
    if version.snapshot.class == Class::Metadata {
        return Err((
            format!(
                "metadata is authoritative at the root: node {child} may not write {}",
                version.key()
            ),
            true,
        ));
    }
    if version.snapshot.patient.is_none() {
        return Err((
            format!(
                "malformed resource: {}",
                ModelError::NoPatient {
                    kind: version.key().kind.clone()
                }
            ),
            true,
        ));
    }
    Ok(version)
}

/// What a child may do with a record, decided against what the hub holds.
#[derive(Debug, PartialEq, Eq)]
enum Grant {
    /// The record's patient is in the child's catchment.
    Holds,
    /// A Patient this hub has never seen: the child registers it, and it joins the
    /// child's catchment once accepted.
    Registers,
}

/// The trust boundary for one validated record from `child`: it writes only for
/// patients of its catchment or creates a new Patient, and claims no writes of other
/// nodes that this hub does not already hold. Nothing here writes anything.
fn authorize(
    tx: &Tx<'_>,
    policy: &Policy,
    child: &str,
    v: &Version,
) -> std::result::Result<(Grant, Option<crate::store::Stored>), Refused> {
    let patient = v.snapshot.patient.as_deref().unwrap_or_default();
    let current = tx.current(v.key()).map_err(store_refusal)?;
    // The record as the hub holds it must be the child's too: a new body naming one
    // of the child's own patients cannot take over (or delete) another's record.
    if let Some(held_by) = current
        .as_ref()
        .and_then(|c| c.version.snapshot.patient.clone())
    {
        if held_by != patient && !tx.in_catchment(child, &held_by).map_err(store_refusal)? {
            return Err((
                format!(
                    "{} belongs to Patient/{held_by}, which is not in the catchment of {child}: a node cannot move another node's record to its own patient",
                    v.key()
                ),
                true,
            ));
        }
    }
    let entry = tx.catchment_entry(child, patient).map_err(store_refusal)?;
    if let Some(moved) = entry.and_then(|e| e.moved_ms) {
        // The patient moved away from this child: what it wrote before the move still
        // comes up (nothing is lost); nothing it stamps after.
        if v.hlc.wall_ms > moved {
            return Err((
                format!(
                    "Patient/{patient} moved from {child} to another clinic at {}: {child} may send only what it wrote before the move",
                    crate::time::fmt_time(moved)
                ),
                true,
            ));
        }
    }
    let grant = if entry.is_some() {
        Grant::Holds
    } else {
        // A Patient's patient is itself: `current` has answered already.
        let known = if v.key().kind == "Patient" {
            current.is_some()
        } else {
            let patient_key = RecordKey {
                kind: "Patient".into(),
                id: patient.to_string(),
            };
            tx.current(&patient_key).map_err(store_refusal)?.is_some()
        };
        match (v.key().kind == "Patient", known) {
            (true, false) => Grant::Registers,
            (false, false) => {
                return Err((
                    format!(
                        "Patient/{patient} is not known at this hub yet: its Patient must arrive first (retried)"
                    ),
                    false,
                ))
            }
            (_, true) => {
                return Err((
                    format!(
                        "Patient/{patient} is not in the catchment of {child}: a node writes only for its own patients or registers new ones (a patient moves between clinics at the hub)"
                    ),
                    true,
                ))
            }
        }
    };
    let held = current
        .as_ref()
        .map(|c| c.version.vv.clone())
        .unwrap_or_default();
    for (node, &n) in &v.vv.0 {
        let have = held.get(node);
        let own = policy.may_originate(child, node);
        if !own && n > have {
            return Err((
                format!(
                    "version vector claims {node}:{n} for {}, but this hub holds {node}:{have}: a node cannot vouch for another node's writes",
                    v.key()
                ),
                true,
            ));
        }
        if own && n > have.saturating_add(MAX_COUNTER_JUMP) {
            return Err((
                format!(
                    "version vector moves {node} from {have} to {n} for {} in one push (limit {MAX_COUNTER_JUMP})",
                    v.key()
                ),
                true,
            ));
        }
    }
    Ok((grant, current))
}

fn store_refusal(e: StoreError) -> Refused {
    (format!("store error while checking the record: {e}"), false)
}

/// Pushes of at least this many records are checked on a second thread.
const PARALLEL_VALIDATE_MIN: usize = 64;
/// Records checked ahead of integration, at most (bounds the memory of a push
/// in flight between the two threads), handed over `VALIDATE_CHUNK` at a time.
const VALIDATE_AHEAD: usize = 256;
const VALIDATE_CHUNK: usize = 32;

/// A pushed record after [`validate`]: its position, names and vector as the answer
/// echoes them, and the version or the refusal.
struct Checked {
    i: usize,
    kind: String,
    id: String,
    vv: VersionVector,
    version: std::result::Result<Ready, Refused>,
}

/// A valid pushed version with what can be made of it before the transaction (on
/// the checking thread): its text for history and audit, and for a Patient the
/// nodes whose catchment rules it matches.
struct Ready {
    version: Version,
    text: VersionText,
    rule_nodes: Option<Vec<String>>,
}

fn checked(policy: &Policy, child: &str, i: usize, rec: WireRecord, now_ms: u64) -> Checked {
    let (kind, id) = (clip(&rec.kind), clip(&rec.id));
    // Echo the vector only when it is one we would accept: the answer is bounded.
    let vv = if rec.vv.0.len() <= MAX_VV_ENTRIES {
        rec.vv.clone()
    } else {
        VersionVector::default()
    };
    Checked {
        i,
        kind,
        id,
        vv,
        version: validate(policy, child, rec, now_ms).map(|version| Ready {
            text: VersionText::of(&version),
            rule_nodes: rule_nodes(policy, &version),
            version,
        }),
    }
}

/// Authorizes and integrates one checked record of a push (in its transaction) and
/// adds its answer; a refusal's text goes to `refused` (the first five).
#[allow(clippy::too_many_arguments)]
fn push_one(
    tx: &mut Tx<'_>,
    policy: &Policy,
    child: &str,
    source: &str,
    one: Checked,
    now_ms: u64,
    results: &mut Vec<PushResult>,
    refused: &mut Vec<String>,
    invalid: &mut (usize, Option<String>),
    at_boundary: &mut Vec<(String, String)>,
) -> Result<()> {
    let Checked {
        i,
        kind,
        id,
        vv,
        version,
    } = one;
    if let Err((reason, _)) = &version {
        // Not logged one by one (a hostile batch would flood the journal): counted,
        // and logged once for the push below.
        invalid.0 += 1;
        if invalid.1.is_none() {
            invalid.1 = Some(format!("{kind}/{id}: {reason}"));
        }
    }
    let checked = version.and_then(|v| {
        authorize(tx, policy, child, &v.version)
            .map(|g| (v, g))
            .inspect_err(|e| {
                // A refusal at the trust boundary is worth a line in the log, once
                // the push it belongs to is committed (a push refused whole later
                // refused none of its records on its own).
                at_boundary.push((format!("{kind}/{id}"), e.0.clone()));
            })
    });
    let outcome = match checked {
        Err((reason, permanent)) => {
            if refused.len() < 5 {
                refused.push(format!("{kind}/{id}: {reason}"));
            }
            Outcome::Rejected { reason, permanent }
        }
        Ok((ready, (grant, current))) => {
            let Ready {
                version,
                text,
                rule_nodes,
            } = ready;
            let integrated = integrate_over(
                tx,
                &version,
                Some(&text),
                current,
                source,
                Some(child),
                false,
                now_ms,
            )?;
            let stored = match &integrated {
                Integrated::Accepted => Some((&version, rule_nodes)),
                Integrated::Conflict { result, .. } => {
                    Some((&**result, self::rule_nodes(policy, result)))
                }
                _ => None,
            };
            if let Some((v, rule_nodes)) = stored {
                // A child's edit may bring a patient into catchments by rule but
                // never takes it out of one: moving patients is the hub's call.
                set_rule_catchment(tx, v, rule_nodes.as_deref(), false)?;
                if grant == Grant::Registers {
                    tx.add_to_catchment(child, &v.key().id, CatchmentReason::Registered)?;
                }
                if policy.has_parent {
                    tx.enqueue(v.key(), now_ms)?;
                }
            }
            match integrated {
                Integrated::Accepted => Outcome::Accepted,
                Integrated::Duplicate => Outcome::Duplicate,
                Integrated::Stale => Outcome::Stale,
                Integrated::Conflict {
                    resolution,
                    incoming_lost,
                    ..
                } => Outcome::Conflict {
                    resolution,
                    lost: incoming_lost,
                },
            }
        }
    };
    results.push(PushResult {
        i: i as u32,
        vv,
        outcome,
    });
    Ok(())
}

/// Parent side of a push: checks and integrates each record independently, in one
/// transaction. Refusals are per record and grant nothing; Patients go first so a
/// batch that registers a patient and writes its encounters is accepted whole.
pub fn handle_push(
    store: &mut Store,
    policy: &Policy,
    child: &str,
    req: PushRequest,
    now_ms: u64,
) -> Result<PushResponse> {
    push_checked_from(store, policy, child, req, now_ms, PARALLEL_VALIDATE_MIN)
}

/// The order a push's records are integrated in, by (kind, place in the push):
/// Patients first (the records after them may need them in the catchment), then
/// the rest, each in the push's order.
fn integration_key(kind: &str, i: usize) -> (bool, usize) {
    (kind != "Patient", i)
}

/// [`handle_push`], checking on a second thread from `parallel_min` records up.
fn push_checked_from(
    store: &mut Store,
    policy: &Policy,
    child: &str,
    req: PushRequest,
    now_ms: u64,
    parallel_min: usize,
) -> Result<PushResponse> {
    let mut records: Vec<(usize, WireRecord)> = req.records.into_iter().enumerate().collect();
    records.sort_by_key(|(i, r)| integration_key(&r.kind, *i));
    let total = records.len();
    let records = records.into_iter().map(Ok);
    push_in_order(
        store,
        policy,
        child,
        &req.node,
        total,
        records,
        now_ms,
        parallel_min,
    )
}

/// [`handle_push`] of a push whose records are still in their v2 block (`req` holds
/// none): each record is built from the block on the thread that checks it, while
/// this one integrates those before it. A record the block cannot build (a body
/// cut short, values left over) refuses the whole push: nothing of it is applied
/// ([`EngineError::Undecodable`]).
pub fn handle_push_block(
    store: &mut Store,
    policy: &Policy,
    child: &str,
    req: PushRequest,
    block: crate::wire::v2::RecordBlock<'_>,
    now_ms: u64,
) -> Result<PushResponse> {
    if !req.records.is_empty() {
        return Err(EngineError::Invalid(
            "a push carries records both in its message and in its block".into(),
        ));
    }
    // Within a kind the push's order is the block's too: what `take` needs.
    let total = block.len();
    let mut order: Vec<usize> = (0..total).collect();
    order.sort_by_key(|&i| integration_key(block.kind(i), i));
    let mut block = block;
    let mut order = order.into_iter();
    let mut finished = false;
    let records = std::iter::from_fn(move || match order.next() {
        Some(i) => Some(block.take(i).map(|r| (i, r))),
        None if !finished => {
            finished = true;
            block.finish().err().map(Err)
        }
        None => None,
    });
    push_in_order(
        store,
        policy,
        child,
        &req.node,
        total,
        records,
        now_ms,
        PARALLEL_VALIDATE_MIN,
    )
}

/// Integrates `total` records of a push from `child` (claiming to come from
/// `node`), given in the order they are integrated (with their places in the push),
/// in one transaction. From `parallel_min` records up they are built and checked on
/// a second thread.
#[allow(clippy::too_many_arguments)]
fn push_in_order(
    store: &mut Store,
    policy: &Policy,
    child: &str,
    node: &str,
    total: usize,
    records: impl Iterator<Item = std::result::Result<(usize, WireRecord), WireError>> + Send,
    now_ms: u64,
    parallel_min: usize,
) -> Result<PushResponse> {
    if node != child {
        return Err(EngineError::Forbidden(format!(
            "authenticated as {child} but the push claims to come from {}",
            clip(node)
        )));
    }
    let source = format!("push:{child}");
    let mut tx = store.begin()?;
    let mut results = Vec::with_capacity(total);
    let mut refused: Vec<String> = Vec::new();
    // Records refused by `validate` (not valid FHIR, a vector or clock out of range,
    // …): how many, and the first.
    let mut invalid = (0usize, None);
    // Records refused at the trust boundary (`authorize`): each logged after commit.
    let mut at_boundary: Vec<(String, String)> = Vec::new();
    // Checking a record on its own (`validate`: parse, canonical form, hash) is most
    // of the CPU a push costs and reads nothing of the store: a large push checks on
    // a second thread while this one authorizes and integrates, in the same order.
    // The answers, the audit and the store come out exactly as one thread would
    // leave them (`a_push_checked_on_two_threads_ends_as_on_one` compares them).
    std::thread::scope(|scope| -> Result<()> {
        // Handed over a few dozen at a time: a hand-off per record costs more in
        // the channel's wake-ups than the record's check.
        let (send, checked_chunks) = std::sync::mpsc::sync_channel::<
            Vec<std::result::Result<Checked, WireError>>,
        >(VALIDATE_AHEAD / VALIDATE_CHUNK);
        let check = move |r: std::result::Result<(usize, WireRecord), WireError>| {
            r.map(|(i, rec)| checked(policy, child, i, rec, now_ms))
        };
        let mut inline = None;
        if total >= parallel_min {
            scope.spawn(move || {
                let mut records = records.peekable();
                while records.peek().is_some() {
                    let chunk = records.by_ref().take(VALIDATE_CHUNK).map(check).collect();
                    // The receiver stops listening only when integration failed.
                    if send.send(chunk).is_err() {
                        break;
                    }
                }
            });
        } else {
            drop(send);
            inline = Some(records.map(check));
        }
        let mut ready = std::collections::VecDeque::new();
        let mut next = || match inline.as_mut() {
            Some(it) => it.next(),
            None => {
                if ready.is_empty() {
                    ready.extend(checked_chunks.recv().ok()?);
                }
                ready.pop_front()
            }
        };
        while let Some(one) = next() {
            // A record the block could not build: the push is refused whole (the
            // transaction is dropped unapplied).
            let one = one.map_err(EngineError::Undecodable)?;
            push_one(
                &mut tx,
                policy,
                child,
                &source,
                one,
                now_ms,
                &mut results,
                &mut refused,
                &mut invalid,
                &mut at_boundary,
            )?;
        }
        Ok(())
    })?;
    if !refused.is_empty() {
        // One audit entry per push, however many records it refused: a hostile peer
        // cannot grow the (unprunable) audit chain faster than its requests.
        let total = results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Rejected { .. }))
            .count();
        tx.audit(
            now_ms,
            &source,
            "reject",
            &format!("{total} record(s)"),
            "",
            &refused.join("; "),
        )?;
    }
    results.sort_by_key(|r| r.i);
    tx.commit()?;
    // Logged once the push is applied: a push refused whole, after some of its
    // records were looked at, leaves no line about those records.
    if let (n, Some(first)) = &invalid {
        tracing::warn!(peer = %child, refused = n, first = %first, "push records refused as invalid");
    }
    for (record, reason) in at_boundary {
        tracing::warn!(peer = %child, record = %record, reason = %reason, "push refused");
    }
    Ok(PushResponse { results })
}

/// Parent side of a pull: the next page of what this child may see.
pub fn handle_pull(
    store: &Store,
    policy: &Policy,
    child: &str,
    req: &PullRequest,
) -> Result<PullResponse> {
    if req.node != child {
        return Err(EngineError::Forbidden(format!(
            "authenticated as {child} but the pull asks for {}",
            clip(&req.node)
        )));
    }
    let page = store.feed_page(
        child,
        req.cursor,
        (req.max_records as usize).clamp(1, policy.max_page_records),
        (req.max_bytes as usize).clamp(1, policy.max_page_bytes),
        req.include_own,
    )?;
    Ok(PullResponse {
        records: page
            .records
            .iter()
            .map(|s| WireRecord::from_version(&s.version))
            .collect(),
        next: page.next,
        more: page.more,
        head: page.head,
        // Orders from this hub ride on every answer until their results come back.
        orders: store.pending_orders(child, crate::wire::orders::MAX_ORDERS)?,
        bundle_seq: store.last_bundle_seq(child)?.unwrap_or(0),
    })
}

/// Parent side of an on-demand fetch: gives each record only if the child may see it.
/// A record that does not exist and one the child may not see get the same refusal,
/// so a fetch cannot probe for records or learn whose they are.
pub fn handle_fetch(store: &Store, child: &str, req: &FetchRequest) -> Result<FetchResponse> {
    if req.node != child {
        return Err(EngineError::Forbidden(format!(
            "authenticated as {child} but the fetch claims {}",
            clip(&req.node)
        )));
    }
    let mut results = Vec::new();
    for (kind, id) in &req.keys {
        let refuse = |why: String| FetchResult {
            kind: clip(kind),
            id: clip(id),
            record: None,
            refused: Some(why),
        };
        let key = match RecordKey::new(kind, id) {
            Ok(k) => k,
            Err(e) => {
                results.push(refuse(clip(&e.to_string())));
                continue;
            }
        };
        let visible = match store.current(&key)? {
            Some(stored) => match &stored.version.snapshot.patient {
                Some(p) if !store.in_catchment(child, p)? => None,
                _ => Some(stored),
            },
            None => None,
        };
        let Some(stored) = visible else {
            results.push(refuse(format!(
                "{key}: not found, or not in the catchment of {child}"
            )));
            continue;
        };
        results.push(FetchResult {
            kind: kind.clone(),
            id: id.clone(),
            record: Some(WireRecord::from_version(&stored.version)),
            refused: None,
        });
    }
    Ok(FetchResponse { results })
}

/// Child side: the next batch to push, or `None` when nothing is due.
pub fn next_push(
    store: &Store,
    now_ms: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<Option<PushRequest>> {
    Ok(next_push_after(store, now_ms, max_records, max_bytes, 0)?.map(|(req, _)| req))
}

/// Like [`next_push`], but only records queued after position `after` (so a batch
/// can be built while the previous one is still in flight). Returns the batch and
/// the queue position of its last record.
pub fn next_push_after(
    store: &Store,
    now_ms: u64,
    max_records: usize,
    max_bytes: usize,
    after: u64,
) -> Result<Option<(PushRequest, u64)>> {
    let (batch, last) = store.outbox_batch(now_ms, max_records, max_bytes, after)?;
    if batch.is_empty() {
        return Ok(None);
    }
    Ok(Some((
        PushRequest {
            node: store.node_id().to_string(),
            records: batch
                .into_iter()
                .map(|s| WireRecord::from_owned_version(s.version))
                .collect(),
        },
        last,
    )))
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PushSummary {
    pub sent: usize,
    pub accepted: usize,
    pub duplicate: usize,
    pub stale: usize,
    pub conflict: usize,
    pub rejected: usize,
    /// Outbox entries cleared (a record edited meanwhile stays queued).
    pub cleared: usize,
    /// Conflicts in which this node's version lost at the parent (newly recorded).
    pub lost: usize,
}

impl PushSummary {
    pub fn add(&mut self, o: &PushSummary) {
        self.sent += o.sent;
        self.accepted += o.accepted;
        self.duplicate += o.duplicate;
        self.stale += o.stale;
        self.conflict += o.conflict;
        self.rejected += o.rejected;
        self.cleared += o.cleared;
        self.lost += o.lost;
    }
}

/// Child side: applies the parent's per-record answers to the outbox and quarantine.
pub fn apply_push_results(
    store: &mut Store,
    parent: &str,
    sent: &PushRequest,
    resp: &PushResponse,
    bytes: (u64, u64),
    now_ms: u64,
) -> Result<PushSummary> {
    let receipts = answered(sent, resp).collect::<Vec<_>>();
    let mut summary = settle_all(store, parent, &receipts, Some(bytes), now_ms)?;
    summary.sent = sent.records.len();
    Ok(summary)
}

/// Names each positional answer by the record it answers (answers for positions or
/// versions that were not sent are dropped).
pub fn receipts_for(sent: &PushRequest, resp: &PushResponse) -> Vec<Receipt> {
    answered(sent, resp)
        .map(|r| Receipt {
            kind: r.kind.to_string(),
            id: r.id.to_string(),
            vv: r.vv.clone(),
            outcome: r.outcome.clone(),
        })
        .collect()
}

/// A receipt as [`settle_all`] reads it, borrowed from wherever it came: a push's
/// answer is settled without copying a key, vector or outcome per record (those
/// copies were a tenth of a clinic's CPU in a large push).
struct Answer<'a> {
    kind: &'a str,
    id: &'a str,
    vv: &'a VersionVector,
    outcome: &'a Outcome,
}

/// [`receipts_for`], borrowed.
fn answered<'a>(sent: &'a PushRequest, resp: &'a PushResponse) -> impl Iterator<Item = Answer<'a>> {
    resp.results.iter().filter_map(|r| {
        let rec = sent.records.get(r.i as usize)?;
        (rec.vv == r.vv).then_some(Answer {
            kind: &rec.kind,
            id: &rec.id,
            vv: &r.vv,
            outcome: &r.outcome,
        })
    })
}

/// Child side: applies receipts that arrived by other means (a USB return bundle).
/// A receipt for a version no longer current, or already settled, changes nothing.
pub fn apply_receipts(
    store: &mut Store,
    parent: &str,
    receipts: &[Receipt],
    now_ms: u64,
) -> Result<PushSummary> {
    let receipts = receipts
        .iter()
        .map(|r| Answer {
            kind: &r.kind,
            id: &r.id,
            vv: &r.vv,
            outcome: &r.outcome,
        })
        .collect::<Vec<_>>();
    settle_all(store, parent, &receipts, None, now_ms)
}

fn settle_all(
    store: &mut Store,
    parent: &str,
    receipts: &[Answer<'_>],
    bytes: Option<(u64, u64)>,
    now_ms: u64,
) -> Result<PushSummary> {
    let mut summary = PushSummary::default();
    let mut tx = store.begin()?;
    let actor = format!("push:{parent}");
    // Usually nothing is held back at the push stage: one look per batch then spares
    // a statement per acknowledged record.
    let mut any_held = tx.any_quarantined(Stage::Push)?;
    // One answer per record: a parent (broken or hostile) repeating a position or a
    // record is heard once, its last answer (50,000 copies of a refusal are one
    // attempt and one audit row, not 50,000).
    let mut last = std::collections::HashMap::new();
    for (n, r) in receipts.iter().enumerate() {
        last.insert((r.kind, r.id), n);
    }
    if last.len() < receipts.len() {
        tracing::warn!(
            answers = receipts.len(),
            records = last.len(),
            "the parent answered for some records more than once: the last answer counts"
        );
    }
    for (n, r) in receipts.iter().enumerate() {
        if last.get(&(r.kind, r.id)) != Some(&n) {
            continue;
        }
        let Ok(key) = RecordKey::new(r.kind, r.id) else {
            continue;
        };
        match r.outcome {
            Outcome::Rejected { reason, permanent } => {
                // The parent's text is kept to its head, here and in the audit.
                let reason = crate::store::clip_reason(reason);
                // Only the version still queued can be quarantined for this reason.
                let current = tx.current(&key)?;
                if current.as_ref().map(|c| &c.version.vv) != Some(r.vv) || !tx.in_outbox(&key)? {
                    continue;
                }
                summary.rejected += 1;
                any_held = true;
                let attempts =
                    tx.quarantine(&key, Stage::Push, &reason, *permanent, now_ms, |n| {
                        retry_delay_ms(n, *permanent)
                    })?;
                tx.audit(
                    now_ms,
                    &actor,
                    "quarantine",
                    &key.to_string(),
                    "",
                    &format!("attempt {attempts}: {reason}"),
                )?;
            }
            other => {
                if let Outcome::Conflict {
                    resolution,
                    lost: true,
                } = other
                {
                    // This node's version lost at the parent: its winner comes with
                    // the next pull, and the technician sees the loss here.
                    let resolution = crate::store::clip_reason(resolution);
                    let resolution = resolution.as_ref();
                    if let Some(mine) = tx.version_by_vv(&key, r.vv)? {
                        if tx.add_lost_conflict(&key, &mine, parent, resolution, now_ms)? {
                            summary.lost += 1;
                            tx.audit(
                                now_ms,
                                &actor,
                                "conflict-lost",
                                &key.to_string(),
                                &mine.snapshot.hash.short(),
                                resolution,
                            )?;
                        }
                    }
                }
                match other {
                    Outcome::Accepted => summary.accepted += 1,
                    Outcome::Duplicate => summary.duplicate += 1,
                    Outcome::Stale => summary.stale += 1,
                    _ => summary.conflict += 1,
                }
                if tx.clear_outbox_if_vv(&key, r.vv)? {
                    summary.cleared += 1;
                }
                if any_held && tx.release(&key, Stage::Push)? {
                    tx.audit(
                        now_ms,
                        &actor,
                        "release",
                        &key.to_string(),
                        "",
                        other.name(),
                    )?;
                }
            }
        }
    }
    if let Some((sent, received)) = bytes {
        tx.note_peer(parent, PeerEvent::PushOk { sent, received }, now_ms)?;
    }
    tx.commit()?;
    Ok(summary)
}

/// Child side: the pull request for the next page from `parent`.
pub fn pull_request(
    store: &Store,
    parent: &str,
    max_records: u32,
    max_bytes: u64,
) -> Result<PullRequest> {
    let (cursor, _) = store.cursor(parent)?;
    // A store that has never pulled may be a wiped box reinstalled under the same id,
    // with clinicians already writing: it gets back everything the parent holds from
    // it, over every page of that first pull (`RESTORING_OWN` keeps the flag across pages
    // and restarts). A new node pays for this with whatever it pushed before its first
    // pull completed coming back once, as duplicates.
    let include_own = restoring_own(cursor, store.meta(&meta::RESTORING_OWN)?);
    Ok(PullRequest {
        node: store.node_id().to_string(),
        cursor,
        max_bytes,
        max_records,
        include_own,
        answer_chunk: 0,
        health: Vec::new(),
        order_results: Vec::new(),
    })
}

/// A resync (remote order): the next pull starts over and brings this node's own
/// records too, over every page, like a first pull.
pub fn mark_restoring(tx: &mut Tx<'_>) -> std::result::Result<(), crate::store::StoreError> {
    tx.set_meta(&meta::RESTORING_OWN, true)
}

/// Whether this store has completed a pull from its parent (first contact): until
/// then a node learns what it already wrote before writing anything from its EMR.
pub fn first_contact_done(store: &Store, parent: &str) -> Result<bool> {
    Ok(store.cursor(parent)?.0 != crate::wire::Cursor::default()
        || store.meta(&meta::RESTORING_OWN)? == Some(false))
}

/// Child side: stores a pulled page in the inbox and advances the cursor, together.
/// Returns how many records entered the inbox.
pub fn store_pull(
    store: &mut Store,
    parent: &str,
    resp: &PullResponse,
    bytes: (u64, u64),
    now_ms: u64,
) -> Result<usize> {
    let mut tx = store.begin()?;
    let mut n = 0;
    // Held records are rare: look for them once per page, not once per record.
    let any_held = tx.any_quarantined(Stage::Pull)?;
    for rec in &resp.records {
        match rec.clone().into_version() {
            Ok(v) => {
                tx.to_inbox(parent, &v, now_ms)?;
                if any_held {
                    // A readable version replaces one held unreadable.
                    tx.release(v.key(), Stage::Pull)?;
                }
                n += 1;
            }
            Err(e) => hold_unreadable(&mut tx, parent, rec, &e, now_ms)?,
        }
    }
    if restoring_own(tx.cursor(parent)?, tx.meta(&meta::RESTORING_OWN)?) {
        tx.set_meta(&meta::RESTORING_OWN, resp.more)?;
    }
    // A parent's count beyond any real one is not kept: near the end of the range
    // it would leave this node (almost) unable to number another bundle.
    let known = tx.meta(&meta::BUNDLE_SEQ_AT_PARENT)?.unwrap_or(0);
    if resp.bundle_seq > known && resp.bundle_seq <= crate::store::PLAUSIBLE_BUNDLE_SEQ {
        tx.set_meta(&meta::BUNDLE_SEQ_AT_PARENT, resp.bundle_seq)?;
    }
    tx.set_cursor(parent, resp.next, resp.head, now_ms)?;
    tx.note_peer(
        parent,
        PeerEvent::PullOk {
            sent: bytes.0,
            received: bytes.1,
        },
        now_ms,
    )?;
    tx.commit()?;
    Ok(n)
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplySummary {
    pub applied: usize,
    pub duplicate: usize,
    pub stale: usize,
    pub conflict: usize,
}

impl ApplySummary {
    pub fn add(&mut self, o: &ApplySummary) {
        self.applied += o.applied;
        self.duplicate += o.duplicate;
        self.stale += o.stale;
        self.conflict += o.conflict;
    }
}

/// Applies inbox records to the replica in dependency order, a transaction per chunk.
pub fn apply_inbox(store: &mut Store, policy: &Policy, now_ms: u64) -> Result<ApplySummary> {
    let mut summary = ApplySummary::default();
    loop {
        let batch = inbox_batch(store, now_ms, 1_000)?;
        if batch.is_empty() {
            break;
        }
        let mut tx = store.begin()?;
        for (peer, v) in &batch {
            let integrated = integrate(&mut tx, v, &format!("pull:{peer}"), None, true, now_ms)?;
            after_pulled(&mut tx, policy, v, &integrated, &mut summary, now_ms)?;
            tx.remove_from_inbox(v.key())?;
        }
        tx.commit()?;
    }
    Ok(summary)
}

/// A pulled record this node cannot read (a parent on a newer version, or a bug):
/// it is not a reason to stop the page. One with a valid name is held in the inbox as
/// received and quarantined at stage `pull`, retried on the permanent backoff, so a
/// technician sees it, and an upgraded node reads it on its next retry. One whose
/// kind or id is not valid cannot be named by anyone: audited and logged only.
fn hold_unreadable(
    tx: &mut Tx<'_>,
    parent: &str,
    rec: &WireRecord,
    e: &ModelError,
    now_ms: u64,
) -> Result<()> {
    let label = rec.key_string();
    let actor = format!("pull:{parent}");
    tracing::warn!(record = %label, error = %e, "unreadable record from parent");
    let Ok(key) = RecordKey::new(&rec.kind, &rec.id) else {
        tx.audit(now_ms, &actor, "refuse", &label, "", &e.to_string())?;
        return Ok(());
    };
    tx.hold_in_inbox(parent, &key, rec, now_ms)?;
    let reason = crate::store::unreadable_reason(e, rec.body.as_bytes());
    let attempts = tx.quarantine(&key, Stage::Pull, &reason, true, now_ms, |n| {
        retry_delay_ms(n, true)
    })?;
    tx.audit(
        now_ms,
        &actor,
        "quarantine",
        &label,
        "",
        &format!("attempt {attempts}: {reason}"),
    )?;
    Ok(())
}

/// The next inbox rows to apply. A row this node cannot read is quarantined at stage
/// `pull` (and skipped until its retry) instead of failing the pass; a held row that
/// now reads (the node was upgraded) leaves the quarantine.
pub(crate) fn inbox_batch(
    store: &mut Store,
    now_ms: u64,
    limit: usize,
) -> Result<Vec<(String, Version)>> {
    loop {
        let rows = store.inbox_batch(now_ms, limit)?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut ready = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for row in rows {
            match row {
                InboxRow::Ready { peer, version } => ready.push((peer, version)),
                InboxRow::Unreadable { key, reason } => unreadable.push((key, reason)),
            }
        }
        let mut tx = store.begin()?;
        let mut changed = false;
        if tx.any_quarantined(Stage::Pull)? {
            for (_, v) in &ready {
                changed |= tx.release(v.key(), Stage::Pull)?;
            }
        }
        for (key, reason) in &unreadable {
            let attempts = tx.quarantine(key, Stage::Pull, reason, true, now_ms, |n| {
                retry_delay_ms(n, true)
            })?;
            tracing::warn!(record = %key, attempts, reason = %reason, "inbox record held unreadable");
            changed = true;
        }
        if changed {
            tx.commit()?;
        }
        if !ready.is_empty() {
            return Ok(ready);
        }
        // Only unreadable rows: they are skipped now; read what comes after them.
    }
}

/// What follows the integration of a pulled version, wherever it was applied.
pub(crate) fn after_pulled(
    tx: &mut Tx<'_>,
    policy: &Policy,
    v: &Version,
    integrated: &Integrated,
    summary: &mut ApplySummary,
    now_ms: u64,
) -> Result<()> {
    match integrated {
        Integrated::Accepted => {
            summary.applied += 1;
            update_catchment(tx, policy, v, true)?;
            // The parent holds exactly what we now hold: nothing left to push.
            tx.remove_from_outbox(v.key())?;
        }
        Integrated::Duplicate => summary.duplicate += 1,
        Integrated::Stale => summary.stale += 1,
        Integrated::Conflict { result, .. } => {
            summary.conflict += 1;
            if v.snapshot.class == Class::Metadata {
                tx.remove_from_outbox(v.key())?;
            } else if policy.has_parent
                && (result.vv != v.vv || result.snapshot.hash != v.snapshot.hash)
            {
                // The parent must learn the resolution, or its next edit would
                // look concurrent with ours again.
                tx.enqueue(v.key(), now_ms)?;
            }
        }
    }
    Ok(())
}

/// Applies records fetched on demand exactly like pulled ones.
pub fn store_fetched(
    store: &mut Store,
    parent: &str,
    resp: &FetchResponse,
    now_ms: u64,
) -> Result<usize> {
    let mut tx = store.begin()?;
    let mut n = 0;
    for r in &resp.results {
        if let Some(rec) = &r.record {
            if let Ok(v) = rec.clone().into_version() {
                tx.to_inbox(parent, &v, now_ms)?;
                n += 1;
            }
        }
    }
    tx.commit()?;
    Ok(n)
}

/// The vector a stored record would be acknowledged with (tests, CLI).
pub fn stamp_of(v: &Version) -> (VersionVector, ContentHash) {
    (v.vv.clone(), v.snapshot.hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Limits, Message};

    #[test]
    fn engine_refusals_are_permanent_and_store_errors_keep_their_class() {
        use crate::error::ErrorClass::{Corruption, Permanent, Retryable};
        let busy = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        ));
        let cases = [
            (EngineError::Store(busy), Retryable),
            (
                EngineError::Store(StoreError::NoNodeId("/x".into())),
                Corruption,
            ),
            (EngineError::Forbidden("a is not b".into()), Permanent),
            (EngineError::Invalid("no".into()), Permanent),
            (EngineError::NotFound("no conflict #3".into()), Permanent),
            (
                EngineError::Undecodable(WireError::Block("body column 3 has run out".into())),
                Permanent,
            ),
            (
                EngineError::Model {
                    what: "merged Patient/p".into(),
                    source: ModelError::NoId,
                },
                Permanent,
            ),
        ];
        for (e, class) in cases {
            assert_eq!(e.class(), class, "{e}");
            assert_eq!(e.is_retryable(), class == Retryable, "{e}");
        }
    }
    use serde_json::json;

    fn snap(v: serde_json::Value) -> Snapshot {
        Snapshot::from_json_value(v).unwrap()
    }

    struct Net {
        _dir: tempfile::TempDir,
        hub: Store,
        a: Store,
        hub_p: Policy,
        a_p: Policy,
    }

    fn net() -> Net {
        let dir = tempfile::tempdir().unwrap();
        let hub = Store::open(&dir.path().join("hub.db"), "hub").unwrap();
        let a = Store::open(&dir.path().join("a.db"), "a").unwrap();
        let mut hub_p = Policy::new("hub", false);
        hub_p.catchment.push(CatchmentRule {
            node: "a".into(),
            path: "address.district".into(),
            equals: "North".into(),
        });
        Net {
            _dir: dir,
            hub,
            a,
            hub_p,
            a_p: Policy::new("a", true),
        }
    }

    /// A pushed record as a child `origin` would send it.
    fn wire_rec(
        body: serde_json::Value,
        origin: &str,
        vv: &[(&str, u64)],
        wall: u64,
    ) -> WireRecord {
        let s = snap(body);
        WireRecord {
            kind: s.key.kind.clone(),
            id: s.key.id.clone(),
            origin: origin.into(),
            hlc: crate::model::Hlc {
                wall_ms: wall,
                counter: 0,
            },
            vv: VersionVector(vv.iter().map(|(n, c)| (n.to_string(), *c)).collect()),
            deleted: false,
            body: String::from_utf8(s.body).unwrap(),
        }
    }

    /// Also a push whose records come from their v2 block, built on the checking
    /// thread (`handle_push_block`, what a hub does with a v2 push with body
    /// columns).
    #[test]
    fn a_push_checked_on_two_threads_ends_as_on_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut policy = Policy::new("hub", false);
        policy.catchment.push(CatchmentRule {
            node: "a".into(),
            path: "address.district".into(),
            equals: "North".into(),
        });
        let patient = |id: &str, district: &str, note: &str| json!({"resourceType": "Patient", "id": id, "address": [{"district": district}], "gender": note});
        let obs = |id: &str, p: &str, v: u64| json!({"resourceType": "Observation", "id": id, "subject": {"reference": format!("Patient/{p}")}, "valueQuantity": {"value": v}});
        // The same history on two hubs: a's patients p0..p9 at a:1 (p8 at a:2), and p5 and p6
        // edited at the hub since (concurrent with a's next edits of them).
        let hubs: Vec<Store> = (0..3)
            .map(|h| {
                let mut hub = Store::open(&dir.path().join(format!("hub{h}.db")), "hub").unwrap();
                let first = (0..10)
                    .map(|p| {
                        let n = if p == 8 { 2 } else { 1 };
                        wire_rec(patient(&format!("p{p}"), "North", "x"), "a", &[("a", n)], 1_000)
                    })
                    .collect();
                handle_push(&mut hub, &policy, "a", PushRequest { node: "a".into(), records: first }, 1_000)
                    .unwrap();
                write_local(
                    &mut hub,
                    &policy,
                    vec![
                        (snap(patient("p5", "North", "hub-edit")), false),
                        (snap(json!({"resourceType": "Patient", "id": "p6", "address": [{"district": "North"}], "gender": "x", "active": true})), false),
                    ],
                    1_500,
                )
                .unwrap();
                hub
            })
            .collect();
        // One push mixing every outcome, observations before the Patients they need.
        let mut batch = Vec::new();
        for p in 10..60 {
            batch.push(wire_rec(
                obs(&format!("o{p}"), &format!("p{p}"), p),
                "a",
                &[("a", 1)],
                2_000,
            ));
        }
        for p in 10..60 {
            batch.push(wire_rec(
                patient(&format!("p{p}"), "North", "y"),
                "a",
                &[("a", 1)],
                2_000,
            ));
        }
        for p in 0..5 {
            // Duplicates.
            batch.push(wire_rec(
                patient(&format!("p{p}"), "North", "x"),
                "a",
                &[("a", 1)],
                1_000,
            ));
        }
        batch.push(wire_rec(
            patient("p5", "North", "a-edit"),
            "a",
            &[("a", 2)],
            2_000,
        ));
        batch.push(wire_rec(json!({"resourceType": "Patient", "id": "p6", "address": [{"district": "North"}], "gender": "z"}), "a", &[("a", 2)], 2_000));
        batch.push(wire_rec(
            patient("p7", "North", "x"),
            "a",
            &[("a", 2)],
            2_000,
        ));
        batch.push(wire_rec(
            patient("p8", "North", "older"),
            "a",
            &[("a", 1)],
            900,
        ));
        batch.push(wire_rec(
            obs("o-unknown", "nobody", 1),
            "a",
            &[("a", 1)],
            2_000,
        ));
        batch.push(wire_rec(
            json!({"resourceType": "Location", "id": "l1"}),
            "a",
            &[("a", 1)],
            2_000,
        ));
        batch.push(wire_rec(obs("o-b", "p1", 1), "b", &[("b", 1)], 2_000));
        batch.push(wire_rec(
            obs("o-ahead", "p1", 1),
            "a",
            &[("a", 1)],
            90_000_000,
        ));
        batch.push(wire_rec(
            obs("o-claims", "p2", 1),
            "a",
            &[("a", 1), ("hub", 9)],
            2_000,
        ));
        let mut bad = wire_rec(obs("o-bad", "p3", 1), "a", &[("a", 1)], 2_000);
        bad.body = "{not json".into();
        batch.push(bad);
        assert!(batch.len() >= PARALLEL_VALIDATE_MIN);
        let req = PushRequest {
            node: "a".into(),
            records: batch,
        };
        let payload = crate::wire::v2::payload(&Message::PushRequest(req.clone()), true)
            .unwrap()
            .unwrap();
        let mut answers = Vec::new();
        for (mut hub, parallel_min) in hubs.into_iter().zip([usize::MAX, 1, 0]) {
            let resp = if parallel_min > 0 {
                push_checked_from(&mut hub, &policy, "a", req.clone(), 3_000, parallel_min)
            } else {
                let (Message::PushRequest(skeleton), Some(block)) =
                    crate::wire::v2::from_payload_streamed(&payload, &Limits::default()).unwrap()
                else {
                    panic!("a push payload decodes to a push and its block");
                };
                assert!(skeleton.records.is_empty());
                handle_push_block(&mut hub, &policy, "a", skeleton, block, 3_000)
            }
            .unwrap();
            let audit: Vec<_> = hub
                .audit_list(None, None, 10_000)
                .unwrap()
                .into_iter()
                .map(|a| (a.n, a.at_ms, a.actor, a.action, a.record, a.hash, a.detail))
                .collect();
            let replica: Vec<_> = hub
                .list(None)
                .unwrap()
                .into_iter()
                .map(|s| (s.seq, s.version))
                .collect();
            let conflicts = serde_json::to_value(hub.conflicts_list(true, None).unwrap()).unwrap();
            let catchment = hub.catchment_list(None).unwrap();
            answers.push((resp, audit, replica, conflicts, catchment));
        }
        let outcomes: std::collections::BTreeSet<&str> = answers[0]
            .0
            .results
            .iter()
            .map(|r| match r.outcome {
                Outcome::Accepted => "accepted",
                Outcome::Duplicate => "duplicate",
                Outcome::Stale => "stale",
                Outcome::Conflict { .. } => "conflict",
                Outcome::Rejected { .. } => "rejected",
            })
            .collect();
        assert_eq!(
            outcomes.into_iter().collect::<Vec<_>>(),
            ["accepted", "conflict", "duplicate", "rejected", "stale"],
            "{:?}",
            answers[0].0
        );
        let one = &answers[0];
        for other in &answers[1..] {
            assert_eq!(one.0, other.0);
            assert_eq!(one.1, other.1);
            assert_eq!(one.2, other.2);
            assert_eq!(one.3, other.3);
            assert_eq!(one.4, other.4);
        }
    }

    /// A push whose block cannot build one of its records (a body column cut short,
    /// values left over) is refused whole when that is found, after records before it
    /// were integrated: nothing of it stays, not a record, not an audit entry.
    #[test]
    fn a_push_whose_block_fails_midway_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut policy = Policy::new("hub", false);
        policy.catchment.push(CatchmentRule {
            node: "a".into(),
            path: "address.district".into(),
            equals: "North".into(),
        });
        let mut hub = Store::open(&dir.path().join("hub.db"), "hub").unwrap();
        let records: Vec<WireRecord> = (0..200)
            .map(|n| {
                wire_rec(
                    json!({"resourceType": "Patient", "id": format!("p{n}"), "address": [{"district": "North"}], "gender": format!("Ward {n}")}),
                    "a",
                    &[("a", 1)],
                    1_000,
                )
            })
            .collect();
        let msg = Message::PushRequest(PushRequest {
            node: "a".into(),
            records,
        });
        let payload = crate::wire::v2::payload(&msg, true).unwrap().unwrap();
        let before = (hub.counts().unwrap().records, hub.counts().unwrap().audit);
        // A name's value is "Ward <n>\n" in its column. The last one loses its end
        // (the column runs out at the last record), or becomes two values (one is
        // left over); the column keeps its length.
        let last = payload
            .windows(9)
            .rposition(|w| w == b"Ward 199\n")
            .unwrap();
        let mut cut = payload.clone();
        cut[last..last + 9].copy_from_slice(b"Ward 1999");
        let mut extra = payload.clone();
        extra[last..last + 9].copy_from_slice(b"W\nWard 1\n");
        for (name, bad) in [("cut", cut), ("extra", extra)] {
            // Read as a block, both are refused only once the records are built.
            let Ok((Message::PushRequest(skeleton), Some(block))) =
                crate::wire::v2::from_payload_streamed(&bad, &Limits::default())
            else {
                // A length that no longer adds up is refused up front: fine too, but
                // not what this test is about.
                panic!("{name}: the block should read up to its bodies");
            };
            let err =
                handle_push_block(&mut hub, &policy, "a", skeleton, block, 2_000).unwrap_err();
            assert!(matches!(err, EngineError::Undecodable(_)), "{name}: {err}");
            assert!(err.to_string().contains("body column"), "{name}: {err}");
            let counts = hub.counts().unwrap();
            assert_eq!((counts.records, counts.audit), before, "{name}");
        }
        // The intact block applies.
        let Ok((Message::PushRequest(skeleton), Some(block))) =
            crate::wire::v2::from_payload_streamed(&payload, &Limits::default())
        else {
            panic!("the block should read");
        };
        let resp = handle_push_block(&mut hub, &policy, "a", skeleton, block, 2_000).unwrap();
        assert!(resp.results.iter().all(|r| r.outcome == Outcome::Accepted));
        assert_eq!(hub.counts().unwrap().records, 200);
    }

    /// What a test's log lines are written into (read back with `logs`).
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn logs(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// A subscriber writing plain log lines into the returned [`Captured`].
    fn captured_logs() -> (Captured, impl tracing::Subscriber + Send + Sync) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        (captured, subscriber)
    }

    /// A push of records `validate` refuses (a forged vector counter, a body that is
    /// not FHIR) leaves one WARN line for the push, with the count and the first
    /// refusal, not one per record.
    #[test]
    fn records_refused_as_invalid_are_logged_once_per_push() {
        let (captured, subscriber) = captured_logs();
        let mut n = net();
        let patient = |id: &str, c: u64| {
            wire_rec(
                json!({"resourceType": "Patient", "id": id, "address": [{"district": "North"}]}),
                "a",
                &[("a", c)],
                1,
            )
        };
        let mut records: Vec<WireRecord> = (0..30)
            .map(|i| patient(&format!("p{i}"), MAX_COUNTER + 1))
            .collect();
        records.push(patient("ok", 1));
        let req = PushRequest {
            node: "a".into(),
            records,
        };
        let resp = tracing::subscriber::with_default(subscriber, || {
            handle_push(&mut n.hub, &n.hub_p, "a", req, 5).unwrap()
        });
        let rejected = resp
            .results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Rejected { .. }))
            .count();
        assert_eq!(rejected, 30);
        let logs = captured.logs();
        let lines: Vec<&str> = logs.lines().filter(|l| l.contains("refused")).collect();
        assert_eq!(lines.len(), 1, "{logs}");
        assert!(
            lines[0].contains("WARN")
                && lines[0].contains("refused=30")
                && lines[0].contains("Patient/p0: version vector counter a:")
                && lines[0].contains("out of range"),
            "{}",
            lines[0]
        );
    }

    /// A record refused at the trust boundary is logged once its push is applied; a
    /// push refused whole (its block failed after those records were looked at)
    /// leaves no line about them.
    #[test]
    fn a_push_refused_whole_logs_none_of_its_records() {
        let (captured, subscriber) = captured_logs();
        let mut n = net();
        // Observations of patients the hub does not know: each refused by `authorize`.
        let records: Vec<WireRecord> = (0..100)
            .map(|k| {
                wire_rec(
                    json!({"resourceType": "Observation", "id": format!("o{k}"), "subject": {"reference": format!("Patient/nobody{k}")}, "note": [{"text": format!("Ward {k}")}]}),
                    "a",
                    &[("a", 1)],
                    1,
                )
            })
            .collect();
        let msg = Message::PushRequest(PushRequest {
            node: "a".into(),
            records,
        });
        let payload = crate::wire::v2::payload(&msg, true).unwrap().unwrap();
        let last = payload.windows(8).rposition(|w| w == b"Ward 99\n").unwrap();
        let mut cut = payload.clone();
        cut[last..last + 8].copy_from_slice(b"Ward 999");
        let logs = || captured.logs();
        tracing::subscriber::with_default(subscriber, || {
            for (bad, p) in [(true, &cut), (false, &payload)] {
                let (Message::PushRequest(skeleton), Some(block)) =
                    crate::wire::v2::from_payload_streamed(p, &Limits::default()).unwrap()
                else {
                    panic!("a push and its block");
                };
                let got = handle_push_block(&mut n.hub, &n.hub_p, "a", skeleton, block, 5);
                assert_eq!(got.is_err(), bad, "{got:?}");
                if bad {
                    assert!(!logs().contains("push refused"), "{}", logs());
                }
            }
        });
        let refused = logs()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("push refused"))
            .count();
        assert_eq!(refused, 100, "{}", logs());
    }

    fn push(n: &mut Net, now: u64) -> (PushRequest, PushResponse, PushSummary) {
        let req = next_push(&n.a, now, 1000, 1 << 20).unwrap().unwrap();
        let resp = handle_push(&mut n.hub, &n.hub_p, "a", req.clone(), now).unwrap();
        let s = apply_push_results(&mut n.a, "hub", &req, &resp, (0, 0), now).unwrap();
        (req, resp, s)
    }

    fn pull(n: &mut Net, now: u64) -> PullResponse {
        let req = pull_request(&n.a, "hub", 1000, 1 << 20).unwrap();
        let resp = handle_pull(&n.hub, &n.hub_p, "a", &req).unwrap();
        store_pull(&mut n.a, "hub", &resp, (0, 0), now).unwrap();
        apply_inbox(&mut n.a, &n.a_p, now).unwrap();
        resp
    }

    #[test]
    fn a_parent_repeating_an_answer_or_sending_megabytes_of_reason_is_heard_once_and_clipped() {
        // (50 copies of one refusal: one attempt, one audit row, the reason clipped.)
        let mut n = net();
        write_local(
            &mut n.a,
            &n.a_p,
            vec![(
                snap(json!({"resourceType":"Patient","id":"p1","address":[{"district":"North"}]})),
                false,
            )],
            10,
        )
        .unwrap();
        let req = next_push(&n.a, 11, 1000, 1 << 20).unwrap().unwrap();
        let answer = |outcome: Outcome| PushResult {
            i: 0,
            vv: req.records[0].vv.clone(),
            outcome,
        };
        let rejected = answer(Outcome::Rejected {
            reason: "x".repeat(1_000_000),
            permanent: false,
        });
        let resp = PushResponse {
            results: vec![rejected; 50],
        };
        let s = apply_push_results(&mut n.a, "hub", &req, &resp, (0, 0), 12).unwrap();
        assert_eq!(s.rejected, 1);
        let q = n.a.quarantine_list().unwrap();
        assert_eq!(q[0].attempts, 1, "fifty copies are one answer");
        let audit = n.a.audit_list(None, Some("quarantine"), 100).unwrap();
        assert_eq!(audit.len(), 1);
        assert!(audit[0].detail.len() < 3_000, "{}", audit[0].detail.len());
        assert!(audit[0].detail.ends_with("(998000 more characters)"));
        // Of a rejection and an acceptance for it in one answer, the last counts.
        let resp = PushResponse {
            results: vec![
                answer(Outcome::Rejected {
                    reason: "early".into(),
                    permanent: true,
                }),
                answer(Outcome::Accepted),
            ],
        };
        let s = apply_push_results(&mut n.a, "hub", &req, &resp, (0, 0), 13).unwrap();
        assert_eq!((s.accepted, s.rejected), (1, 0));
        assert!(n.a.quarantine_list().unwrap().is_empty());
        assert_eq!(n.a.counts().unwrap().outbox, 0);
    }

    #[test]
    fn an_unreadable_pulled_record_is_held_in_quarantine_and_the_page_applies() {
        // A parent (newer, or broken) sends three Locations: one readable, one whose
        // body names another record, one whose id is not an id at all. The cursor
        // moves, the readable one applies, the misnamed one waits at stage `pull`
        // with its bytes as received, and a readable version releases it.
        let mut n = net();
        let items: Vec<_> = ["l1", "l2"]
            .iter()
            .map(|id| {
                (
                    snap(json!({"resourceType":"Location","id":id,"name":"x"})),
                    false,
                )
            })
            .collect();
        write_local(&mut n.hub, &n.hub_p, items, 10).unwrap();
        let req = pull_request(&n.a, "hub", 1000, 1 << 20).unwrap();
        let good = handle_pull(&n.hub, &n.hub_p, "a", &req).unwrap();
        let mut resp = good.clone();
        let held_body = r#"{"resourceType":"Location","id":"other","name":"x"}"#;
        resp.records[1].body = held_body.into();
        let mut nameless = resp.records[0].clone();
        nameless.id = "bad id/..".into();
        resp.records.push(nameless);
        let entered = store_pull(&mut n.a, "hub", &resp, (0, 0), 11).unwrap();
        assert_eq!(entered, 1, "only the readable record entered as a version");
        assert_ne!(n.a.cursor("hub").unwrap().0, crate::wire::Cursor::default());

        let applied = apply_inbox(&mut n.a, &n.a_p, 12).unwrap();
        assert_eq!(applied.applied, 1);
        let held_key = RecordKey::new("Location", &resp.records[1].id).unwrap();
        assert!(n.a.current(&held_key).unwrap().is_none());
        let q = n.a.quarantine_list().unwrap();
        assert_eq!(q.len(), 1, "{q:?}");
        assert_eq!(
            (q[0].record.as_str(), q[0].stage),
            (held_key.to_string().as_str(), Stage::Pull)
        );
        assert!(q[0].reason.contains("Location/other"), "{}", q[0].reason);
        assert_eq!(
            n.a.inbox_body(&held_key).unwrap().unwrap(),
            held_body.as_bytes()
        );
        let audit = n.a.audit_list(None, None, 100).unwrap();
        assert!(audit
            .iter()
            .any(|r| r.action == "refuse" && r.record.contains("bad id")));

        // A retry reads it again, fails again, counts the attempt; nothing else moves.
        let mut tx = n.a.begin().unwrap();
        tx.retry_now(Some(&held_key), 13).unwrap();
        tx.commit().unwrap();
        assert_eq!(apply_inbox(&mut n.a, &n.a_p, 13).unwrap().applied, 0);
        assert_eq!(n.a.quarantine_list().unwrap()[0].attempts, 2);

        // The parent sends it again, readable: released, applied.
        store_pull(&mut n.a, "hub", &good, (0, 0), 14).unwrap();
        assert!(n.a.quarantine_list().unwrap().is_empty());
        assert_eq!(apply_inbox(&mut n.a, &n.a_p, 15).unwrap().applied, 1);
        assert!(n.a.current(&held_key).unwrap().is_some());
        assert_eq!(n.a.counts().unwrap().inbox, 0);
    }

    #[test]
    fn a_held_record_dropped_leaves_the_inbox() {
        let mut n = net();
        write_local(
            &mut n.hub,
            &n.hub_p,
            vec![(
                snap(json!({"resourceType":"Location","id":"l1","name":"x"})),
                false,
            )],
            10,
        )
        .unwrap();
        let req = pull_request(&n.a, "hub", 1000, 1 << 20).unwrap();
        let mut resp = handle_pull(&n.hub, &n.hub_p, "a", &req).unwrap();
        resp.records[0].body = "not json".into();
        store_pull(&mut n.a, "hub", &resp, (0, 0), 11).unwrap();
        let key = RecordKey::new("Location", "l1").unwrap();
        assert_eq!(n.a.counts().unwrap().inbox, 1);
        // A local edit of the same record waits to go up: dropping the held pull
        // must not throw it away.
        write_local(
            &mut n.a,
            &n.a_p,
            vec![(
                snap(json!({"resourceType":"Location","id":"l1","name":"local"})),
                false,
            )],
            12,
        )
        .unwrap();
        assert_eq!(n.a.counts().unwrap().outbox, 1);
        let mut tx = n.a.begin().unwrap();
        assert!(tx.drop_quarantined(&key, 13).unwrap());
        tx.commit().unwrap();
        assert_eq!(n.a.counts().unwrap().inbox, 0);
        assert_eq!(
            n.a.counts().unwrap().outbox,
            1,
            "the local edit still goes up"
        );
        assert!(n.a.quarantine_list().unwrap().is_empty());
    }

    #[test]
    fn a_parent_s_bundle_count_beyond_any_real_one_is_not_kept() {
        // A lying (or broken) parent's answer must not leave this node unable to
        // number its next USB bundle; a real count is kept as before.
        let mut n = net();
        let mut resp = handle_pull(
            &n.hub,
            &n.hub_p,
            "a",
            &pull_request(&n.a, "hub", 1000, 1 << 20).unwrap(),
        )
        .unwrap();
        for forged in [
            u64::MAX - 1,
            crate::store::MAX_BUNDLE_SEQ - 1,
            crate::store::PLAUSIBLE_BUNDLE_SEQ + 1,
        ] {
            resp.bundle_seq = forged;
            store_pull(&mut n.a, "hub", &resp, (0, 0), 10).unwrap();
            assert_eq!(n.a.meta(&meta::BUNDLE_SEQ_AT_PARENT).unwrap(), None);
        }
        resp.bundle_seq = 7;
        store_pull(&mut n.a, "hub", &resp, (0, 0), 11).unwrap();
        assert_eq!(n.a.meta(&meta::BUNDLE_SEQ_AT_PARENT).unwrap(), Some(7));
    }

    #[test]
    fn the_same_push_twice_changes_nothing_the_second_time() {
        let mut n = net();
        write_local(
            &mut n.a,
            &n.a_p,
            vec![(snap(json!({"resourceType":"Patient","id":"p1"})), false)],
            10,
        )
        .unwrap();
        let req = next_push(&n.a, 10, 100, 1 << 20).unwrap().unwrap();
        let first = handle_push(&mut n.hub, &n.hub_p, "a", req.clone(), 11).unwrap();
        let before = n.hub.counts().unwrap();
        let second = handle_push(&mut n.hub, &n.hub_p, "a", req, 12).unwrap();
        let after = n.hub.counts().unwrap();
        assert_eq!(first.results[0].outcome, Outcome::Accepted);
        assert_eq!(second.results[0].outcome, Outcome::Duplicate);
        assert_eq!(
            (before.head_seq, before.audit),
            (after.head_seq, after.audit)
        );
    }

    #[test]
    fn a_record_refused_then_accepted_leaves_the_push_quarantine_in_the_same_batch_or_later() {
        let mut n = net();
        write_local(
            &mut n.a,
            &n.a_p,
            vec![
                (snap(json!({"resourceType":"Patient","id":"p1"})), false),
                (snap(json!({"resourceType":"Patient","id":"p2"})), false),
            ],
            10,
        )
        .unwrap();
        let req = next_push(&n.a, 10, 100, 1 << 20).unwrap().unwrap();
        let receipt = |i: usize, outcome: Outcome| Receipt {
            kind: req.records[i].kind.clone(),
            id: req.records[i].id.clone(),
            vv: req.records[i].vv.clone(),
            outcome,
        };
        let refused = || Outcome::Rejected {
            reason: "not now".into(),
            permanent: false,
        };
        // Nothing held before this batch: p1 is refused and then (a parent answering
        // its position twice) accepted in the same batch: the last answer counts, it
        // is released, and the refusal is not counted.
        let s = apply_receipts(
            &mut n.a,
            "hub",
            &[
                receipt(0, refused()),
                receipt(0, Outcome::Accepted),
                receipt(1, refused()),
            ],
            11,
        )
        .unwrap();
        assert_eq!((s.rejected, s.cleared), (1, 1));
        let held: Vec<_> = n.a.quarantine_list().unwrap();
        assert_eq!(held.len(), 1, "p2 only: {held:?}");
        // Held from an earlier batch: accepted now, released.
        let s = apply_receipts(&mut n.a, "hub", &[receipt(1, Outcome::Accepted)], 12).unwrap();
        assert_eq!(s.cleared, 1);
        assert!(n.a.quarantine_list().unwrap().is_empty());
        assert_eq!(n.a.counts().unwrap().outbox, 0);
    }

    #[test]
    fn an_ack_for_an_older_version_keeps_the_newer_edit_queued() {
        let mut n = net();
        write_local(
            &mut n.a,
            &n.a_p,
            vec![(
                snap(json!({"resourceType":"Patient","id":"p1","gender":"male"})),
                false,
            )],
            10,
        )
        .unwrap();
        let req = next_push(&n.a, 10, 100, 1 << 20).unwrap().unwrap();
        let resp = handle_push(&mut n.hub, &n.hub_p, "a", req.clone(), 11).unwrap();
        // Edited while the push was in flight.
        write_local(
            &mut n.a,
            &n.a_p,
            vec![(
                snap(json!({"resourceType":"Patient","id":"p1","gender":"female"})),
                false,
            )],
            12,
        )
        .unwrap();
        let s = apply_push_results(&mut n.a, "hub", &req, &resp, (0, 0), 13).unwrap();
        assert_eq!(s.cleared, 0);
        assert_eq!(n.a.counts().unwrap().outbox, 1);
        let (_, _, s) = push(&mut n, 14);
        assert_eq!((s.accepted, s.cleared), (1, 1));
    }

    #[test]
    fn a_concurrent_edit_of_different_fields_is_merged() {
        let mut n = net();
        write_local(&mut n.a, &n.a_p, vec![(snap(json!({"resourceType":"Patient","id":"p1","gender":"male","birthDate":"1990-01-01"})), false)], 10).unwrap();
        push(&mut n, 11);
        write_local(&mut n.hub, &n.hub_p, vec![(snap(json!({"resourceType":"Patient","id":"p1","gender":"female","birthDate":"1990-01-01"})), false)], 12).unwrap();
        write_local(&mut n.a, &n.a_p, vec![(snap(json!({"resourceType":"Patient","id":"p1","gender":"male","birthDate":"1991-01-01"})), false)], 13).unwrap();
        let (_, resp, _) = push(&mut n, 14);
        assert!(matches!(resp.results[0].outcome, Outcome::Conflict { .. }));
        pull(&mut n, 15);
        let key = RecordKey::new("Patient", "p1").unwrap();
        let hub = n.hub.current(&key).unwrap().unwrap().version;
        let a = n.a.current(&key).unwrap().unwrap().version;
        assert_eq!(
            hub.snapshot.json(),
            json!({"resourceType":"Patient","id":"p1","gender":"female","birthDate":"1991-01-01"})
        );
        assert_eq!(a.snapshot.hash, hub.snapshot.hash);
        assert_eq!(a.vv, hub.vv);
        assert_eq!(n.hub.conflicts_list(false, None).unwrap().len(), 1);
    }

    #[test]
    fn a_concurrent_edit_of_the_same_field_keeps_both_versions() {
        let mut n = net();
        write_local(
            &mut n.a,
            &n.a_p,
            vec![(
                snap(json!({"resourceType":"Patient","id":"p1","gender":"male"})),
                false,
            )],
            10,
        )
        .unwrap();
        push(&mut n, 11);
        write_local(
            &mut n.hub,
            &n.hub_p,
            vec![(
                snap(json!({"resourceType":"Patient","id":"p1","gender":"female"})),
                false,
            )],
            20,
        )
        .unwrap();
        write_local(
            &mut n.a,
            &n.a_p,
            vec![(
                snap(json!({"resourceType":"Patient","id":"p1","gender":"other"})),
                false,
            )],
            12,
        )
        .unwrap();
        push(&mut n, 21);
        let c = &n.hub.conflicts_list(true, None).unwrap()[0];
        assert_eq!(c.local_body.as_ref().unwrap()["gender"], "female");
        assert_eq!(c.remote_body.as_ref().unwrap()["gender"], "other");
        // The hub's edit has the later clock and wins everywhere.
        pull(&mut n, 22);
        let key = RecordKey::new("Patient", "p1").unwrap();
        assert_eq!(
            n.a.current(&key).unwrap().unwrap().version.snapshot.json()["gender"],
            "female"
        );
    }

    #[test]
    fn metadata_from_a_child_is_rejected_and_quarantined() {
        let mut n = net();
        write_local(
            &mut n.a,
            &n.a_p,
            vec![(snap(json!({"resourceType":"Location","id":"l1"})), false)],
            10,
        )
        .unwrap();
        let (_, resp, s) = push(&mut n, 11);
        assert_eq!(s.rejected, 1);
        match &resp.results[0].outcome {
            Outcome::Rejected { reason, .. } => {
                assert!(reason.contains("authoritative"), "{reason}")
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(n.a.quarantine_list().unwrap().len(), 1);
        // Quarantined until its retry time: not sent again right away.
        assert!(next_push(&n.a, 12, 100, 1 << 20).unwrap().is_none());
        assert!(next_push(&n.a, 11 + retry_delay_ms(1, true), 100, 1 << 20)
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_patient_entering_the_catchment_is_backfilled_with_its_records() {
        let mut n = net();
        // The hub holds p1 and its encounter, outside a's catchment.
        let p = json!({"resourceType":"Patient","id":"p1","address":[{"district":"South"}]});
        write_local(&mut n.hub, &n.hub_p, vec![(snap(p), false), (snap(json!({"resourceType":"Encounter","id":"e1","subject":{"reference":"Patient/p1"}})), false)], 10).unwrap();
        write_local(
            &mut n.hub,
            &n.hub_p,
            vec![(snap(json!({"resourceType":"Location","id":"l1"})), false)],
            10,
        )
        .unwrap();
        let r = pull(&mut n, 11);
        assert_eq!(r.records.len(), 1, "only metadata is visible");
        // The patient moves into a's district.
        let moved = json!({"resourceType":"Patient","id":"p1","address":[{"district":"North"}]});
        write_local(&mut n.hub, &n.hub_p, vec![(snap(moved), false)], 12).unwrap();
        let r = pull(&mut n, 13);
        let mut got: Vec<String> = r.records.iter().map(|r| r.key_string()).collect();
        got.sort();
        assert_eq!(got, vec!["Encounter/e1", "Patient/p1"]);
        assert_eq!(pull(&mut n, 14).records.len(), 0, "nothing is resent");
    }

    #[test]
    fn pull_pages_respect_the_byte_budget_and_resume_at_the_cursor() {
        let mut n = net();
        let items: Vec<_> = (0..50)
            .map(|i| (snap(json!({"resourceType":"Location","id":format!("l{i}"),"name":"x".repeat(1000)})), false))
            .collect();
        write_local(&mut n.hub, &n.hub_p, items, 10).unwrap();
        let mut pages = 0;
        loop {
            let req = pull_request(&n.a, "hub", 1000, 10_000).unwrap();
            let resp = handle_pull(&n.hub, &n.hub_p, "a", &req).unwrap();
            assert!(resp.records.len() <= 10);
            store_pull(&mut n.a, "hub", &resp, (0, 0), 11).unwrap();
            pages += 1;
            if !resp.more {
                break;
            }
        }
        apply_inbox(&mut n.a, &n.a_p, 12).unwrap();
        assert!(pages >= 5);
        assert_eq!(n.a.counts().unwrap().records, 50);
    }

    #[test]
    fn a_conflicts_catchment_follows_the_result_not_the_incoming_side() {
        // The rules are read from each pushed record ahead of the transaction; a
        // conflict stores another version than the one read, and its rules decide.
        let dir = tempfile::tempdir().unwrap();
        let mut hub = Store::open(&dir.path().join("hub.db"), "hub").unwrap();
        let mut policy = Policy::new("hub", false);
        policy.catchment.push(CatchmentRule {
            node: "c".into(),
            path: "address.district".into(),
            equals: "North".into(),
        });
        let p = |district: &str| json!({"resourceType": "Patient", "id": "p1", "address": [{"district": district}]});
        let push = |hub: &mut Store, rec: WireRecord, now: u64| {
            let req = PushRequest {
                node: "a".into(),
                records: vec![rec],
            };
            handle_push(hub, &policy, "a", req, now)
                .unwrap()
                .results
                .remove(0)
        };
        let first = push(
            &mut hub,
            wire_rec(p("South"), "a", &[("a", 1)], 1_000),
            1_000,
        );
        assert_eq!(first.outcome, Outcome::Accepted);
        // The hub moves p1 East; a, not knowing, moves it North with an earlier clock.
        write_local(&mut hub, &policy, vec![(snap(p("East")), false)], 5_000).unwrap();
        let second = push(
            &mut hub,
            wire_rec(p("North"), "a", &[("a", 2)], 2_000),
            6_000,
        );
        assert!(
            matches!(second.outcome, Outcome::Conflict { .. }),
            "{second:?}"
        );
        let held = hub
            .current(&RecordKey::new("Patient", "p1").unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            held.version.snapshot.json()["address"][0]["district"],
            "East"
        );
        assert!(
            !hub.in_catchment("c", "p1").unwrap(),
            "the incoming side matched c's rule, the stored result does not"
        );
        // And a push whose version is stored as sent brings it in by the rule.
        let hub_counter = held.version.vv.get("hub");
        let third = push(
            &mut hub,
            wire_rec(p("North"), "a", &[("a", 3), ("hub", hub_counter)], 7_000),
            7_000,
        );
        assert_eq!(third.outcome, Outcome::Accepted, "{third:?}");
        assert!(hub.in_catchment("c", "p1").unwrap());
    }

    #[test]
    fn catchment_rules_walk_arrays() {
        let rule = CatchmentRule {
            node: "a".into(),
            path: "address.district".into(),
            equals: "North".into(),
        };
        assert!(rule.matches(&json!({"address":[{"district":"South"},{"district":"North"}]})));
        assert!(!rule.matches(&json!({"address":[{"city":"North"}]})));
        let org = CatchmentRule {
            node: "a".into(),
            path: "managingOrganization.reference".into(),
            equals: "Organization/o1".into(),
        };
        assert!(org.matches(&json!({"managingOrganization":{"reference":"Organization/o1"}})));
    }

    #[test]
    fn record_retry_backs_off_and_is_capped() {
        assert_eq!(retry_delay_ms(1, false), 30_000);
        assert_eq!(retry_delay_ms(2, false), 60_000);
        assert_eq!(retry_delay_ms(50, false), 3_600_000);
        assert_eq!(retry_delay_ms(50, true), 24 * 3_600_000);
    }
}
