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

use super::replica::parse_hash;
use super::{Result, Store, Tx};
use crate::model::{ContentHash, RecordKey};

impl Store {
    /// What the EMR was last known to hold for `key`: (content hash, gone).
    pub fn emr_state(&self, key: &RecordKey) -> Result<Option<(Option<ContentHash>, bool)>> {
        self.conn
            .prepare_cached("SELECT hash, gone FROM emr_state WHERE kind=?1 AND id=?2")?
            .query_row(params![key.kind, key.id], |r| {
                Ok((r.get::<_, Option<Vec<u8>>>(0)?, r.get::<_, bool>(1)?))
            })
            .optional()?
            // A hash that does not decode is corruption: read as "none", the record
            // would be written into the EMR again, or an echo captured as an edit.
            .map(|(h, gone)| {
                let h = h.map(|h| parse_hash("emr_state", key, &h)).transpose()?;
                Ok((h, gone))
            })
            .transpose()
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

#[cfg(test)]
mod tests {
    use crate::model::{ContentHash, RecordKey};
    use crate::store::temp_store;

    #[test]
    fn an_emr_hash_that_does_not_decode_is_corruption_not_an_unknown_state() {
        let (_d, mut store) = temp_store("a");
        let (p1, p2) = (
            RecordKey::parse("Patient/p1").unwrap(),
            RecordKey::parse("Patient/p2").unwrap(),
        );
        let mut tx = store.begin().unwrap();
        tx.set_emr_state(&p1, Some(&ContentHash([7; 32])), false, 1)
            .unwrap();
        tx.set_emr_state(&p2, None, true, 1).unwrap();
        tx.commit().unwrap();
        assert_eq!(
            store.emr_state(&p1).unwrap(),
            Some((Some(ContentHash([7; 32])), false))
        );
        assert_eq!(store.emr_state(&p2).unwrap(), Some((None, true)));
        store
            .conn()
            .execute("UPDATE emr_state SET hash=x'07' WHERE id='p1'", [])
            .unwrap();
        let err = store.emr_state(&p1).unwrap_err();
        assert!(
            err.is_corruption() && err.to_string().contains("emr_state.hash of Patient/p1"),
            "{err}"
        );
    }
}
