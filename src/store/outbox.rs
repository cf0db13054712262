//! Room `outbox`: records waiting to be pushed to the parent.
//!
//! Table: `outbox(kind, id, oseq, enqueued_ms)`, one row per record.
//!
//! Invariants
//! - Keyed by record, so repeated edits coalesce; the content pushed is whatever the
//!   replica holds when a batch is built. `oseq` comes from the change sequence, so
//!   a batch is read in queue order and a record re-queued keeps its place.
//! - An entry is cleared only if the replica still holds the acknowledged version
//!   ([`Tx::clear_outbox_if_vv`]): an edit made while the push was in flight stays.
//! - A record over [`MAX_RECORD_BYTES`] is never sent: batch building skips it and
//!   [`Tx::quarantine_oversized`] quarantines it, so it blocks nothing behind it.
//!
//! Errors: a failure rolls the transaction back; the entry stays queued.

use rusqlite::{params, OptionalExtension};

use super::replica::{stored_from_row, REPLICA_COLS_R};
use super::{Result, Stage, Store, Stored, Tx};
use crate::model::{RecordKey, VersionVector};

/// The largest record body clinicsync carries (canonical JSON). A larger one would
/// make every message it rides in too large for any hub; it is refused when written
/// and, if it is in the outbox already (captured from an EMR), quarantined instead of
/// sent (`Tx::quarantine_oversized`), so it never blocks the queue.
pub const MAX_RECORD_BYTES: usize = 16 << 20;

impl Store {
    /// Records pending in the outbox after queue position `after_oseq`, oldest first,
    /// skipping those quarantined until later than `now_ms`, bounded by count and
    /// (approximate) body bytes. Returns them with the queue position of the last.
    pub fn outbox_batch(
        &self,
        now_ms: u64,
        max_records: usize,
        max_bytes: usize,
        after_oseq: u64,
    ) -> Result<(Vec<Stored>, u64)> {
        let sql = format!(
            "SELECT {REPLICA_COLS_R}, o.oseq FROM outbox o JOIN replica r ON r.kind=o.kind AND r.id=o.id
             WHERE o.oseq > ?3 AND length(r.body) <= {MAX_RECORD_BYTES} AND NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.kind=o.kind AND q.id=o.id
                               AND q.stage='push' AND q.next_retry_ms > ?1)
             ORDER BY o.oseq LIMIT ?2"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(params![
            now_ms as i64,
            max_records as i64,
            after_oseq as i64
        ])?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut last = after_oseq;
        while let Some(row) = rows.next()? {
            let s = stored_from_row(row)?;
            bytes += s.version.snapshot.body.len() + 128;
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            last = row.get::<_, i64>(12)? as u64;
            out.push(s);
        }
        Ok((out, last))
    }
}

/// The queued records over [`MAX_RECORD_BYTES`] not held back already (`?1`: now).
/// Its bound is the partial index `replica_oversized`'s (migration 13), so the
/// planner reads that (almost always empty) index rather than the whole replica; were
/// the index lost, the same query still answers, by a scan
/// (`records_too_large_to_carry_are_found_by_their_index`).
fn oversized_sql() -> String {
    format!(
        "SELECT r.kind, r.id, length(r.body) FROM replica r
         WHERE length(r.body) > {MAX_RECORD_BYTES}
           AND EXISTS (SELECT 1 FROM outbox o WHERE o.kind=r.kind AND o.id=r.id)
           AND NOT EXISTS (SELECT 1 FROM quarantine q
           WHERE q.kind=r.kind AND q.id=r.id AND q.stage='push' AND q.next_retry_ms > ?1)"
    )
}

impl Tx<'_> {
    /// Queues a record for push; a record already queued keeps its place.
    pub fn enqueue(&mut self, key: &RecordKey, now_ms: u64) -> Result<()> {
        let oseq = self.next_seq()?;
        self.tx
            .prepare_cached(
                "INSERT INTO outbox(kind, id, oseq, enqueued_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(kind, id) DO UPDATE SET enqueued_ms=excluded.enqueued_ms",
            )?
            .execute(params![key.kind, key.id, oseq as i64, now_ms as i64])?;
        Ok(())
    }

    /// Clears the outbox entry only if the replica still holds the acknowledged
    /// version. A vector names one version on a node: every local write bumps this
    /// node's counter, and conflict results with equal vectors are bumped too.
    pub fn clear_outbox_if_vv(&mut self, key: &RecordKey, vv: &VersionVector) -> Result<bool> {
        let n = self
            .tx
            .prepare_cached(
                "DELETE FROM outbox WHERE kind=?1 AND id=?2 AND EXISTS
                 (SELECT 1 FROM replica r WHERE r.kind=?1 AND r.id=?2 AND r.vv=?3)",
            )?
            .execute(params![key.kind, key.id, vv.to_json()])?;
        Ok(n > 0)
    }

    pub fn remove_from_outbox(&mut self, key: &RecordKey) -> Result<bool> {
        Ok(self
            .tx
            .prepare_cached("DELETE FROM outbox WHERE kind=?1 AND id=?2")?
            .execute(params![key.kind, key.id])?
            > 0)
    }

    pub fn in_outbox(&self, key: &RecordKey) -> Result<bool> {
        Ok(self
            .tx
            .prepare_cached("SELECT 1 FROM outbox WHERE kind=?1 AND id=?2")?
            .query_row(params![key.kind, key.id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Quarantines (push stage, permanent) every queued record over
    /// [`MAX_RECORD_BYTES`] that is not already held there; returns them with sizes.
    pub fn quarantine_oversized(&mut self, now_ms: u64) -> Result<Vec<(RecordKey, u64)>> {
        let big: Vec<(RecordKey, u64)> = self
            .tx
            .prepare_cached(&oversized_sql())?
            .query_map([now_ms as i64], |r| {
                Ok((
                    RecordKey {
                        kind: r.get(0)?,
                        id: r.get(1)?,
                    },
                    r.get::<_, i64>(2)? as u64,
                ))
            })?
            .collect::<std::result::Result<_, _>>()?;
        for (key, size) in &big {
            let reason = format!(
                "{key} is {} MiB; the largest record clinicsync carries is {} MiB: make it smaller at its source (attachments belong in a document store), then `quarantine retry`, or `quarantine drop` it",
                size >> 20,
                MAX_RECORD_BYTES >> 20
            );
            // Not sent while it is this large: re-checked every round.
            self.quarantine(key, Stage::Push, &reason, true, now_ms, |_| 3_600_000)?;
        }
        Ok(big)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_too_large_to_carry_are_found_by_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(Store::open(&path, "a").unwrap());
        let conn = rusqlite::Connection::open(&path).unwrap();
        let plan = |conn: &rusqlite::Connection| -> String {
            let mut stmt = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {}", oversized_sql()))
                .unwrap();
            let rows = stmt
                .query_map([0i64], |r| r.get::<_, String>(3))
                .unwrap()
                .map(|r| r.unwrap())
                .collect::<Vec<_>>();
            rows.join("; ")
        };
        let with = plan(&conn);
        assert!(
            with.contains("USING INDEX replica_oversized"),
            "the replica is read through the partial index: {with}"
        );
        // A store whose index was lost by hand still answers, by scanning.
        conn.execute_batch("DROP INDEX replica_oversized").unwrap();
        let without = plan(&conn);
        assert!(without.contains("SCAN r"), "{without}");
    }
}
