//! Room `bundles`: USB bundles this node imported.
//!
//! Table: `bundles_in(id, sender, kind, seq, items_done, done, started_ms,
//! finished_ms)`.
//!
//! Invariants
//! - `items_done` only grows, in the transaction that applied those items, so an
//!   interrupted import resumes after the last item applied and a finished bundle is
//!   a replay (refused).
//! - A sender whose key changed has its old rows filed under `<node>@<fingerprint>`
//!   ([`Tx::retire_bundles_of`]), so its new incarnation numbers bundles from 1.
//!
//! Errors: a failure rolls the transaction back with the items it covered.

use rusqlite::{params, OptionalExtension};

use super::{Result, Store, Tx};

/// The largest bundle number: the store keeps it as SQLite's signed 64-bit integer,
/// so a number above it would read back negative. No real count gets near it (a
/// bundle a second for 292 billion years): one above it is a forged header or a
/// corrupt value, refused where it comes in.
pub const MAX_BUNDLE_SEQ: u64 = i64::MAX as u64;

/// The largest bundle count a node takes from its parent's answer (a bundle a second
/// for 34,000 years). Above it the count is a forged answer, not a wiped clinic's
/// earlier bundles, and is not kept: a parent that could set it near
/// [`MAX_BUNDLE_SEQ`] would leave the clinic with no bundle numbers to write.
pub const PLAUSIBLE_BUNDLE_SEQ: u64 = 1 << 40;

/// An imported bundle, as the store tracks it.
pub struct BundleIn<'a> {
    pub id: &'a str,
    pub sender: &'a str,
    pub kind: &'a str,
    pub seq: u64,
}

impl Store {
    /// What this node knows of an imported bundle: (items applied, done, finished at).
    pub fn bundle_in(&self, id: &str) -> Result<Option<(u64, bool, Option<u64>)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT items_done, done, finished_ms FROM bundles_in WHERE id=?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get(1)?,
                        r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                    ))
                },
            )
            .optional()?)
    }

    /// The newest bundle sequence fully imported from `sender`.
    pub fn last_bundle_seq(&self, sender: &str) -> Result<Option<u64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT MAX(seq) FROM bundles_in WHERE sender=?1 AND done=1",
                [sender],
                |r| r.get::<_, Option<i64>>(0),
            )?
            .map(|v| v as u64))
    }
}

impl Tx<'_> {
    /// Records progress of a bundle import (creating the row on first call).
    pub fn bundle_progress(
        &mut self,
        b: &BundleIn<'_>,
        items_done: u64,
        done: bool,
        now_ms: u64,
    ) -> Result<()> {
        self.tx.execute(
            "INSERT INTO bundles_in(id, sender, kind, seq, items_done, done, started_ms, finished_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, CASE WHEN ?6 THEN ?7 END)
             ON CONFLICT(id) DO UPDATE SET items_done=MAX(items_done, excluded.items_done), done=excluded.done,
               finished_ms=CASE WHEN excluded.done THEN ?7 ELSE finished_ms END",
            params![b.id, b.sender, b.kind, b.seq as i64, items_done as i64, done, now_ms as i64],
        )?;
        Ok(())
    }

    /// Files the bundles imported from `node` under its old key (`<node>@<fp>`), so
    /// the node's new incarnation starts its bundle sequence again.
    pub fn retire_bundles_of(&mut self, node: &str, old_fp: &str) -> Result<usize> {
        Ok(self.tx.execute(
            "UPDATE bundles_in SET sender = sender || '@' || ?2 WHERE sender = ?1",
            params![node, old_fp],
        )?)
    }
}
