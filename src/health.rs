//! Health reports: what a node tells its parent about itself with every exchange,
//! so the centre knows a clinic's state without reaching it (`clinicsync fleet`,
//! `/metrics`).
//!
//! A report is small (a few hundred bytes of CBOR), versioned (`v`), and rides on
//! the first pull request of a round ([`crate::wire::PullRequest::health`]) and on a
//! USB bundle's pull state, so HTTP, MQTT and sneakernet all carry it. A hub keeps
//! the latest report per node (table `health`) with the time it was *heard*: for its
//! own children the hub's clock at arrival; for nodes further down, the time the hub
//! nearest to them heard it, passed up unchanged, so a district that forwards an old
//! report cannot make a silent clinic look alive.
//!
//! Invariants:
//! - A hub stores a report only for the sending child or one of that child's
//!   configured `descendants`; anything else is dropped and logged (a child cannot
//!   speak for a sibling).
//! - Every string is clipped ([`MAX_TEXT`]) and lists are bounded, so a report stays
//!   small whatever the node sends; `heard_ms` of a forwarded report is never later
//!   than the forwarding hub's clock allows (`now + max_clock_ahead`).
//! - A district forwards each report once: those received since its last successful
//!   pull (`health_sent_ms` in meta), so a round costs bytes only for what changed.

use crate::store::{meta, Store, StoreError};

pub use crate::wire::health::{
    HealthReport, ReasonCount, HEALTH_V, MAX_REASONS, MAX_REPORTS, MAX_TEXT,
};

/// Seconds this process has run (Linux: `/proc/self/stat` start time against
/// `/proc/uptime`); `None` elsewhere.
fn uptime_s() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Field 22 (starttime, clock ticks since boot) counts from after the `comm` field,
    // which may hold spaces: split after its closing parenthesis.
    let after = stat.rsplit_once(')')?.1;
    let start_ticks: f64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let up: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| (up - start_ticks / hz as f64).max(0.0) as u64)
}

/// Free bytes on the filesystem holding `path` (statvfs).
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = if path.is_dir() { path } else { path.parent()? };
    let dir = if dir.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        dir
    };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: zeroed statvfs is a valid value; statvfs fills it for a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a live out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// This node's report, from its store.
pub fn report(store: &Store, parent: &str, now_ms: u64) -> Result<HealthReport, StoreError> {
    let c = store.counts()?;
    let peer = store.peer_state(parent)?;
    let emr = store.peer_state("emr")?;
    let (cursor, head) = store.cursor(parent)?;
    let last_ok = peer.last_push_ok_ms.max(peer.last_pull_ok_ms);
    let newer = |t: Option<u64>, ok: Option<u64>| t.unwrap_or(0) >= ok.unwrap_or(0);
    let link_error = peer
        .last_error
        .clone()
        .filter(|_| newer(peer.last_error_ms, last_ok));
    let emr_error = emr
        .last_error
        .clone()
        .filter(|_| newer(emr.last_error_ms, emr.last_push_ok_ms));
    let (audit_entries, audit_head) = store.audit_head()?;
    let skew = store.meta(&meta::PARENT_CLOCK_SKEW_MS)?;
    Ok(HealthReport {
        v: HEALTH_V,
        node: store.node_id().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        schema: store.schema_version()?,
        made_ms: now_ms,
        heard_ms: None,
        uptime_s: uptime_s(),
        records: c.records,
        outbox: c.outbox,
        inbox: c.inbox,
        quarantine: c.quarantine,
        top_quarantine: store
            .quarantine_reasons(MAX_REASONS)?
            .into_iter()
            .map(|(reason, count)| ReasonCount { reason, count })
            .collect(),
        conflicts_open: store.open_conflicts()?,
        pull_lag: head.saturating_sub(cursor.eff),
        last_sync_ms: last_ok,
        link_error,
        emr_error,
        bytes_today: store.meta(&meta::TRAFFIC_TODAY_BYTES)?.unwrap_or(0),
        disk_free: store.path().and_then(|p| free_bytes(&p)),
        clock_skew_ms: skew,
        audit_entries,
        audit_head,
        link_rate_bps: store.meta(&meta::LINK_RATE_BPS)?.filter(|r| *r > 0),
    }
    .bounded())
}

/// What a node sends up with its next pull: its own report, and (a district hub) the
/// reports of the nodes below it that arrived since its last successful pull. The
/// second value is the arrival mark to save once the pull succeeded.
pub fn outgoing(
    store: &Store,
    parent: &str,
    now_ms: u64,
) -> Result<(Vec<HealthReport>, u64), StoreError> {
    let mut out = vec![report(store, parent, now_ms)?];
    let since = store.meta(&meta::HEALTH_SENT_MS)?.unwrap_or(0);
    let mut mark = since;
    for (received_ms, r) in store.health_received_after(since, MAX_REPORTS - 1)? {
        mark = mark.max(received_ms);
        out.push(r);
    }
    Ok((out, mark))
}

/// After a successful pull: the forwarded reports need not go again.
pub fn sent(store: &mut Store, mark: u64) -> Result<(), StoreError> {
    if mark > store.meta(&meta::HEALTH_SENT_MS)?.unwrap_or(0) {
        let mut tx = store.begin()?;
        tx.set_meta(&meta::HEALTH_SENT_MS, mark)?;
        tx.commit()?;
    }
    Ok(())
}

/// Hub side: keeps the reports a child sent that it may send — its own and its
/// configured descendants' — and says how many were dropped.
pub fn receive(
    store: &mut Store,
    child: &str,
    descendants: &[String],
    reports: &[HealthReport],
    max_clock_ahead_ms: u64,
    now_ms: u64,
) -> Result<usize, StoreError> {
    let mut dropped = 0;
    let mut tx = store.begin()?;
    for r in reports.iter().take(MAX_REPORTS) {
        let mut r = r.clone().bounded();
        let heard = if r.node == child {
            now_ms
        } else if descendants.contains(&r.node) {
            match r.heard_ms {
                Some(h) => h.min(now_ms.saturating_add(max_clock_ahead_ms)),
                None => {
                    dropped += 1;
                    continue;
                }
            }
        } else {
            dropped += 1;
            continue;
        };
        r.heard_ms = Some(heard);
        tx.put_health(&r, child, now_ms)?;
    }
    dropped += reports.len().saturating_sub(MAX_REPORTS);
    tx.commit()?;
    Ok(dropped)
}
