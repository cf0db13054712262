//! Remote orders: a hub fixes a child it cannot reach (`clinicsync remote <node> …`).
//!
//! The parent never calls a child. An order waits at the hub (`orders_out`,
//! pending) and travels down in the child's next pull answer — network or USB
//! return bundle — until the child's result comes back up in a later pull request;
//! then it is done (or refused, or failed) with the result, and audited at both ends.
//!
//! Invariants:
//! - Only a node's parent orders it: the hub answers a child's pull with that child's
//!   orders only, and its CLI orders direct children only.
//! - Executed once: a child records every order it ran (`orders_in`) with its result
//!   in the same transaction as the effect; an order delivered again (the result was
//!   lost on the way up) is not run again, its stored result is sent again.
//! - A child configured with `node.remote_orders = false` runs nothing and answers
//!   each order "refused" with that reason, so the hub knows.
//! - Results are bounded ([`MAX_RESULT`]); orders per answer too ([`MAX_ORDERS`]).

use crate::engine::{EngineError, Policy};
use crate::model::RecordKey;
use crate::store::{OrderState, Store, StoreError};

use crate::wire::orders::bounded;
pub use crate::wire::orders::{Order, OrderKind, OrderResult, MAX_ORDERS, MAX_RESULT};

/// Hub: queues an order for `node` and audits it. Returns its id.
pub fn issue(
    store: &mut Store,
    node: &str,
    kind: &OrderKind,
    now_ms: u64,
) -> Result<String, EngineError> {
    if let OrderKind::QuarantineRetry { record: Some(r) }
    | OrderKind::QuarantineDrop { record: r } = kind
    {
        RecordKey::parse(r).map_err(|source| EngineError::Model {
            what: format!("order for {r}"),
            source,
        })?;
    }
    let id = crate::auth::new_id();
    let mut tx = store.begin()?;
    tx.put_order_out(&id, node, kind, now_ms)?;
    tx.audit(now_ms, "local", "order", node, &id, &kind.describe())?;
    tx.commit()?;
    Ok(id)
}

/// Hub: records the results a child sent for its own orders (others' are ignored).
pub fn receive_results(
    store: &mut Store,
    child: &str,
    results: &[OrderResult],
    now_ms: u64,
) -> Result<usize, StoreError> {
    let mut tx = store.begin()?;
    let mut n = 0;
    for r in results.iter().take(MAX_ORDERS * 4) {
        // A child's word for how it went; anything else (or "pending") is a failure.
        let state = match OrderState::parse(&r.state) {
            Some(s @ (OrderState::Done | OrderState::Refused | OrderState::Failed)) => s,
            _ => OrderState::Failed,
        };
        let detail = bounded(r.detail.clone());
        if tx.finish_order_out(&r.id, child, state, &detail, now_ms)? {
            tx.audit(
                now_ms,
                &format!("push:{child}"),
                "order-result",
                child,
                &r.id,
                &format!("{state}: {}", detail.lines().next().unwrap_or_default()),
            )?;
            n += 1;
        }
    }
    tx.commit()?;
    Ok(n)
}

/// Child: runs the orders that arrived (each once) and keeps their results to send up.
pub fn execute(
    store: &mut Store,
    policy: &Policy,
    orders: &[Order],
    now_ms: u64,
) -> Result<(), StoreError> {
    for o in orders.iter().take(MAX_ORDERS) {
        if store.order_in_seen(&o.id)? {
            // Delivered again: our result did not reach the hub. Send it again.
            let mut tx = store.begin()?;
            tx.report_order_in_again(&o.id)?;
            tx.commit()?;
            continue;
        }
        // Diagnostics read the store before the transaction that records them.
        let diagnostics = match (&o.kind, policy.accept_remote_orders) {
            (OrderKind::Diagnostics, true) => Some(diagnostics(store, now_ms)?),
            _ => None,
        };
        let mut tx = store.begin()?;
        let (state, detail) = if !policy.accept_remote_orders {
            (
                OrderState::Refused,
                format!(
                    "{} does not accept remote orders (node.remote_orders = false): someone there must run {}",
                    policy.node_id,
                    o.kind.local_equivalent()
                ),
            )
        } else {
            match &o.kind {
                OrderKind::QuarantineRetry { record } => {
                    let key = match record.as_deref().map(RecordKey::parse) {
                        Some(Err(e)) => Err(format!("{e}")),
                        Some(Ok(k)) => Ok(Some(k)),
                        None => Ok(None),
                    };
                    match key {
                        Err(e) => (OrderState::Failed, e),
                        Ok(k) => match tx.retry_now(k.as_ref(), now_ms)? {
                            0 => (
                                OrderState::Failed,
                                "nothing matching is quarantined here".into(),
                            ),
                            n => (
                                OrderState::Done,
                                format!("{n} quarantined record(s) due now"),
                            ),
                        },
                    }
                }
                OrderKind::QuarantineDrop { record } => match RecordKey::parse(record) {
                    Err(e) => (OrderState::Failed, e.to_string()),
                    Ok(k) => {
                        if tx.drop_quarantined(&k, now_ms)? {
                            (OrderState::Done, format!("{k} dropped from quarantine"))
                        } else {
                            (OrderState::Failed, format!("{k} is not quarantined here"))
                        }
                    }
                },
                OrderKind::Resync => {
                    tx.reset_cursor(crate::engine::PARENT)?;
                    crate::engine::mark_restoring(&mut tx)?;
                    (
                        OrderState::Done,
                        "pull cursor reset: everything is pulled again, its own records included"
                            .into(),
                    )
                }
                OrderKind::Diagnostics => {
                    (OrderState::Done, diagnostics.clone().unwrap_or_default())
                }
                OrderKind::Purge { patient } => {
                    let (purged, kept) = tx.purge_patient(patient)?;
                    let emr = if policy.external_emr {
                        " This node's EMR keeps its own copy: void it there if the policy asks."
                    } else {
                        ""
                    };
                    if kept == 0 {
                        (
                            OrderState::Done,
                            format!("Patient/{patient}: {purged} record(s) purged.{emr}"),
                        )
                    } else {
                        (
                            OrderState::Failed,
                            format!(
                                "Patient/{patient}: {purged} record(s) purged, {kept} kept: not yet pushed (or quarantined); they go up first — order the purge again once they have.{emr}"
                            ),
                        )
                    }
                }
            }
        };
        let detail = bounded(detail);
        tx.put_order_in(o, state, &detail, now_ms)?;
        tx.audit(
            now_ms,
            &format!("pull:{}", o.by),
            "remote-order",
            &o.kind.describe(),
            &o.id,
            &format!("{state}: {}", detail.lines().next().unwrap_or_default()),
        )?;
        tx.commit()?;
        tracing::info!(order = %o.id, by = %o.by, what = %o.kind.describe(), %state, "remote order");
    }
    Ok(())
}

/// What a technician would look at first: status, quarantine, recent log lines.
fn diagnostics(store: &Store, now_ms: u64) -> Result<String, StoreError> {
    let report = crate::health::report(store, crate::engine::PARENT, now_ms)?;
    let quarantine: Vec<_> = store.quarantine_list()?.into_iter().take(50).collect();
    // The unit's journal, when this process may read it (systemd-journal group or
    // the unit's own user with a persistent journal); otherwise said so.
    let log = std::process::Command::new("journalctl")
        .args([
            "-u",
            "clinicsync",
            "-n",
            "60",
            "--no-pager",
            "-o",
            "short-iso",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|| "(journal not readable by this process)".into());
    let v = serde_json::json!({
        "status": report,
        "quarantine": quarantine,
        "log": crate::textsafe::safe(&log),
    });
    Ok(serde_json::to_string_pretty(&v).unwrap_or_default())
}

/// Child: the results to send with the next pull request.
pub fn outgoing(store: &Store) -> Result<Vec<OrderResult>, StoreError> {
    store.order_results_unreported(MAX_ORDERS * 4)
}

/// Child: after the pull carrying them was answered.
pub fn reported(store: &mut Store, results: &[OrderResult]) -> Result<(), StoreError> {
    if results.is_empty() {
        return Ok(());
    }
    let mut tx = store.begin()?;
    for r in results {
        tx.mark_order_in_reported(&r.id)?;
    }
    tx.commit()
}
