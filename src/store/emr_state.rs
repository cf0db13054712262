//! Room `emr_state`: what the node's EMR holds of each record (migration 3).
//!
//! Table: `emr_state(kind, id, hash, gone, updated_ms)`: the content hash the EMR was
//! last known to hold (NULL with `gone = 1`: deleted there).
//!
//! Invariants
//! - Written in the transaction that captured the record from the EMR or recorded a
//!   write into it, so echo suppression (a feed event for our own write) is by
//!   content and survives restarts.
//!
//! Errors: a failure rolls the transaction back; the next capture or apply pass
//! meets the record again.

use rusqlite::{params, OptionalExtension};

use super::{Result, Store, Tx};
use crate::model::{ContentHash, RecordKey};

impl Store {
    /// What the EMR was last known to hold for `key`: (content hash, gone).
    pub fn emr_state(&self, key: &RecordKey) -> Result<Option<(Option<ContentHash>, bool)>> {
        Ok(self
            .conn
            .prepare_cached("SELECT hash, gone FROM emr_state WHERE kind=?1 AND id=?2")?
            .query_row(params![key.kind, key.id], |r| {
                let h: Option<Vec<u8>> = r.get(0)?;
                Ok((h.and_then(|h| ContentHash::from_slice(&h)), r.get(1)?))
            })
            .optional()?)
    }
}

impl Tx<'_> {
    pub fn set_emr_state(
        &mut self,
        key: &RecordKey,
        hash: Option<&ContentHash>,
        gone: bool,
        now_ms: u64,
    ) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO emr_state(kind, id, hash, gone, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(kind, id) DO UPDATE SET hash=excluded.hash, gone=excluded.gone, updated_ms=excluded.updated_ms",
            )?
            .execute(params![key.kind, key.id, hash.map(|h| h.0.to_vec()), gone, now_ms as i64])?;
        Ok(())
    }
}
