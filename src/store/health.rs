//! Room `health`: the latest health report of each node below a hub (migration 7).
//!
//! Table: `health(node, via, heard_ms, received_ms, report)`; `report` is the
//! report's JSON ([`crate::wire::health::HealthReport`]).
//!
//! Invariants
//! - One row per node: a report replaces the held one only if it was heard at the
//!   same time or later (a report forwarded late never hides a newer one).
//! - `received_ms` is this node's clock at arrival, so a district passes each report
//!   up once ([`Store::health_received_after`]).
//!
//! Errors: a failure rolls the transaction back; the previous report stays. A stored
//! report that does not parse is corruption.

use rusqlite::params;

use super::{shown_text, Result, Store, StoreError, Tx};

/// A stored health report; one that does not parse is corruption, not a default.
fn health_report(node: &str, text: &str) -> Result<crate::wire::health::HealthReport> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::bad_value("health", "report", node, shown_text(text), e))
}

impl Store {
    /// Health reports that arrived after `received_ms`, oldest arrival first, with
    /// their arrival time.
    pub fn health_received_after(
        &self,
        received_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, crate::wire::health::HealthReport)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT node, received_ms, report FROM health WHERE received_ms > ?1 ORDER BY received_ms, node LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![received_ms as i64, limit as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, String>(2)?,
            ))
        })?;
        rows.map(|row| {
            let (node, at, text) = row?;
            Ok((at, health_report(&node, &text)?))
        })
        .collect()
    }

    /// Every node's latest health report with the child that delivered it.
    pub fn health_all(&self) -> Result<Vec<(String, crate::wire::health::HealthReport)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT node, via, report FROM health ORDER BY node")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        rows.map(|row| {
            let (node, via, text) = row?;
            Ok((via, health_report(&node, &text)?))
        })
        .collect()
    }
}

impl Tx<'_> {
    /// Keeps `r` as the latest report of its node unless a report heard later is
    /// already held (a node that moved between districts, an old one forwarded late).
    pub fn put_health(
        &mut self,
        r: &crate::wire::health::HealthReport,
        via: &str,
        received_ms: u64,
    ) -> Result<()> {
        let text = serde_json::to_string(r).map_err(|source| StoreError::Encode {
            what: format!("the health report of {}", r.node),
            source,
        })?;
        self.tx
            .prepare_cached(
                "INSERT INTO health(node, via, heard_ms, received_ms, report) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(node) DO UPDATE SET via=excluded.via, heard_ms=excluded.heard_ms,
                   received_ms=excluded.received_ms, report=excluded.report
                 WHERE excluded.heard_ms >= health.heard_ms",
            )?
            .execute(params![
                r.node,
                via,
                r.heard_ms.unwrap_or(received_ms) as i64,
                received_ms as i64,
                text
            ])?;
        Ok(())
    }
}
