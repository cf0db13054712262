//! Room `catchment`: which child may read which patient, and the pull feed.
//!
//! Table: `catchment(node, patient, added_seq, reason, moved_ms)`; `reason` is
//! `rule`, `registered`, `granted` or `moved`.
//!
//! Invariants
//! - `added_seq` comes from the change sequence, so a patient entering a child's
//!   catchment makes its whole compartment visible "now": for child `c` a record's
//!   effective sequence is `seq` (metadata) or `max(seq, added_seq)` (clinical), and
//!   a feed page is the records with `(eff, seq) > cursor` in that order — a
//!   backfill that resends nothing else (ARCHITECTURE.md, "Pull visibility").
//! - A patient moved away (`moved`) is neither fed nor readable, but the node may
//!   still push what it stamped before `moved_ms`; no rule gives it back, only a
//!   grant (which backfills again) or its removal.
//! - A feed page reads the head first: anything committed later has a larger seq,
//!   so an empty page may move the cursor to the head.
//!
//! Errors: a failure rolls the transaction back; memberships are as before.

use rusqlite::{params, OptionalExtension};

use super::{Hot, Result, Store, Stored, Tx};
use crate::model::RecordKey;
use crate::wire::Cursor;

/// A patient's row in a node's catchment: whether it was moved out, and when.
pub(super) const ENTRY_SQL: &str =
    "SELECT reason = 'moved', moved_ms FROM catchment WHERE node=?1 AND patient=?2";

text_enum! {
    /// Why a patient is in a node's catchment (`catchment.reason`). The feed's SQL
    /// names these texts too.
    pub enum CatchmentReason {
        /// A `[[hub.catchment]]` rule matched the Patient (recomputed on each version).
        Rule = "rule",
        /// The child pushed a Patient the hub had never seen.
        Registered = "registered",
        /// The operator added it (`catchment add`, or the receiving end of a move).
        Granted = "granted",
        /// It moved away (`catchment move`): neither fed nor readable any more.
        Moved = "moved",
    }
}

pub struct FeedPage {
    pub records: Vec<Stored>,
    pub next: Cursor,
    pub more: bool,
    /// The change sequence when the page was read.
    pub head: u64,
}

impl Store {
    /// (node, patient, reason) rows of the catchment, of one node or all.
    pub fn catchment_list(
        &self,
        node: Option<&str>,
    ) -> Result<Vec<(String, String, CatchmentReason)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT node, patient, reason FROM catchment WHERE ?1 IS NULL OR node=?1 ORDER BY node, patient",
        )?;
        let mut rows = stmt.query([node])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let (node, patient): (String, String) = (r.get(0)?, r.get(1)?);
            let row = format!("{node} Patient/{patient}");
            let reason =
                CatchmentReason::decode("catchment", "reason", row, &r.get::<_, String>(2)?)?;
            out.push((node, patient, reason));
        }
        Ok(out)
    }

    /// Whether `node` may read `patient`'s records (a patient moved away is not).
    pub fn in_catchment(&self, node: &str, patient: &str) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM catchment WHERE node=?1 AND patient=?2 AND reason <> 'moved'",
                [node, patient],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// The next page for `node` after `cursor`: see ARCHITECTURE.md, "Pull visibility".
    /// Versions the child wrote itself are left out unless `include_own` (it has them).
    pub fn feed_page(
        &self,
        node: &str,
        cursor: Cursor,
        max_records: usize,
        max_bytes: usize,
        include_own: bool,
    ) -> Result<FeedPage> {
        // Read the head first: anything committed after this has a larger seq, so an
        // empty page may safely move the cursor up to the head.
        let head = self.head_seq()?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT eff, seq, kind, id FROM (
                SELECT r.seq AS eff, r.seq, r.kind, r.id, r.sender FROM replica r
                  WHERE r.class='metadata' AND r.seq >= ?2
                UNION ALL
                SELECT MAX(r.seq, c.added_seq) AS eff, r.seq, r.kind, r.id, r.sender FROM replica r
                  JOIN catchment c ON c.node = ?1 AND c.patient = r.patient AND c.reason <> 'moved'
                  WHERE r.class='clinical' AND r.seq >= ?2
                UNION ALL
                SELECT c.added_seq AS eff, r.seq, r.kind, r.id, r.sender FROM catchment c
                  JOIN replica r ON r.patient = c.patient
                  WHERE c.node = ?1 AND c.reason <> 'moved' AND c.added_seq >= ?2 AND r.seq < ?2 AND r.class='clinical'
             ) WHERE (eff > ?2 OR (eff = ?2 AND seq > ?3)) AND (?5 OR sender IS NULL OR sender <> ?1)
             ORDER BY eff, seq LIMIT ?4",
        )?;
        let candidates: Vec<(Cursor, RecordKey)> = stmt
            .query_map(
                params![
                    node,
                    cursor.eff as i64,
                    cursor.seq as i64,
                    max_records as i64 + 1,
                    include_own
                ],
                |r| {
                    Ok((
                        Cursor {
                            eff: r.get::<_, i64>(0)? as u64,
                            seq: r.get::<_, i64>(1)? as u64,
                        },
                        RecordKey {
                            kind: r.get(2)?,
                            id: r.get(3)?,
                        },
                    ))
                },
            )?
            .collect::<std::result::Result<_, _>>()?;
        let mut page = FeedPage {
            records: Vec::new(),
            next: cursor,
            more: candidates.len() > max_records,
            head,
        };
        let mut bytes = 0usize;
        for (pos, key) in candidates.into_iter().take(max_records) {
            let Some(stored) = self.current(&key)? else {
                continue;
            };
            let size = stored.version.snapshot.body.len() + 128;
            if !page.records.is_empty() && bytes + size > max_bytes {
                page.more = true;
                break;
            }
            bytes += size;
            page.records.push(stored);
            page.next = pos;
        }
        if !page.more {
            let at_head = Cursor {
                eff: head,
                seq: head,
            };
            page.next = page.next.max(at_head);
        }
        Ok(page)
    }

    /// Since change sequence `since`: the child nodes with newly visible clinical
    /// records (not their own) or new catchment, whether any metadata changed, and the
    /// head the check ran at.
    pub fn feed_advanced(&self, since: u64) -> Result<(Vec<String>, bool, u64)> {
        let head = self.head_seq()?;
        if since >= head {
            return Ok((Vec::new(), false, head));
        }
        let metadata = self
            .conn
            .query_row(
                "SELECT 1 FROM replica WHERE seq > ?1 AND class='metadata' LIMIT 1",
                [since as i64],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        let mut stmt = self.conn.prepare_cached(
            "SELECT c.node FROM replica r JOIN catchment c ON c.patient = r.patient AND c.reason <> 'moved'
               WHERE r.seq > ?1 AND r.class='clinical' AND (r.sender IS NULL OR r.sender <> c.node)
             UNION SELECT node FROM catchment WHERE added_seq > ?1 AND reason <> 'registered'",
        )?;
        let nodes = stmt
            .query_map([since as i64], |r| r.get(0))?
            .collect::<std::result::Result<Vec<String>, _>>()?;
        Ok((nodes, metadata, head))
    }
}

/// A patient's row in a node's catchment ([`Tx::catchment_entry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchmentEntry {
    /// When the patient moved away from the node (`catchment move`), if it did.
    pub moved_ms: Option<u64>,
}

/// A node, a patient and that patient's row in the node's catchment, as last read
/// inside one transaction ([`Tx::catchment_entry`]).
#[derive(Debug)]
pub(super) struct Memo {
    node: String,
    patient: String,
    entry: Option<CatchmentEntry>,
}

impl Tx<'_> {
    /// Every write to `catchment` goes through here first: what the memo holds may
    /// no longer be the row.
    fn forget_catchment_entry(&mut self) {
        *self.catchment_memo.get_mut() = None;
    }

    /// May `node` write for `patient` (inside this transaction)? A clinic a patient
    /// moved away from still may: what it wrote before the move and had not yet
    /// pushed is accepted, never lost (`catchment move`).
    pub fn in_catchment(&self, node: &str, patient: &str) -> Result<bool> {
        Ok(self
            .tx
            .prepare_cached("SELECT 1 FROM catchment WHERE node=?1 AND patient=?2")?
            .query_row([node, patient], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Adds a patient to a child's catchment; returns true if it was not there before.
    pub fn add_to_catchment(
        &mut self,
        node: &str,
        patient: &str,
        reason: CatchmentReason,
    ) -> Result<bool> {
        self.forget_catchment_entry();
        let exists = self
            .tx
            .prepare_cached("SELECT 1 FROM catchment WHERE node=?1 AND patient=?2")?
            .query_row([node, patient], |_| Ok(()))
            .optional()?
            .is_some();
        if exists {
            // A patient moved away and granted back by hand: visible again, backfilled.
            if reason == CatchmentReason::Granted {
                let seq = self.next_seq()?;
                let n = self
                    .tx
                    .prepare_cached(
                        "UPDATE catchment SET reason='granted', added_seq=?3 WHERE node=?1 AND patient=?2 AND reason='moved'",
                    )?
                    .execute(params![node, patient, seq as i64])?;
                return Ok(n > 0);
            }
            return Ok(false);
        }
        let seq = self.next_seq()?;
        self.tx
            .prepare_cached(
                "INSERT INTO catchment(node, patient, added_seq, reason) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![node, patient, seq as i64, reason.as_str()])?;
        Ok(true)
    }

    /// A patient moved away from `node`: it no longer receives or reads the record,
    /// may still push what it wrote before, and no rule gives it back (the row
    /// stays, as `moved`, until `catchment remove` or a grant).
    pub fn mark_moved(&mut self, node: &str, patient: &str, now_ms: u64) -> Result<bool> {
        self.forget_catchment_entry();
        Ok(self
            .tx
            .prepare_cached(
                "UPDATE catchment SET reason='moved', moved_ms=?3 WHERE node=?1 AND patient=?2",
            )?
            .execute(params![node, patient, now_ms as i64])?
            > 0)
    }

    /// A patient's row in a node's catchment, in one lookup: `None` when it has none
    /// ([`Tx::in_catchment`] false), else when the patient moved away, if it did.
    /// The same question twice running is answered from memory the second time
    /// (until a catchment write).
    pub fn catchment_entry(&self, node: &str, patient: &str) -> Result<Option<CatchmentEntry>> {
        if let Some(m) = self.catchment_memo.borrow().as_ref() {
            if m.node == node && m.patient == patient {
                return Ok(m.entry);
            }
        }
        let entry = self.with_hot(Hot::CatchmentEntry, |stmt| {
            Ok(stmt
                .query_row([node, patient], |r| {
                    let moved: bool = r.get(0)?;
                    let at: Option<i64> = r.get(1)?;
                    Ok(CatchmentEntry {
                        moved_ms: at.filter(|_| moved).map(|v| v as u64),
                    })
                })
                .optional()?)
        })?;
        *self.catchment_memo.borrow_mut() = Some(Memo {
            node: node.to_string(),
            patient: patient.to_string(),
            entry,
        });
        Ok(entry)
    }

    /// Takes a patient out of a node's catchment, whatever put it there.
    pub fn remove_from_catchment(&mut self, node: &str, patient: &str) -> Result<bool> {
        self.forget_catchment_entry();
        Ok(self
            .tx
            .prepare_cached("DELETE FROM catchment WHERE node=?1 AND patient=?2")?
            .execute([node, patient])?
            > 0)
    }

    /// Removes rule-derived memberships of `patient` for nodes not in `keep`.
    pub fn prune_rule_catchment(&mut self, patient: &str, keep: &[String]) -> Result<usize> {
        self.forget_catchment_entry();
        let nodes: Vec<String> = self
            .tx
            .prepare_cached("SELECT node FROM catchment WHERE patient=?1 AND reason='rule'")?
            .query_map([patient], |r| r.get(0))?
            .collect::<std::result::Result<_, _>>()?;
        let mut removed = 0;
        for node in nodes.iter().filter(|n| !keep.contains(n)) {
            removed += self
                .tx
                .prepare_cached(
                    "DELETE FROM catchment WHERE node=?1 AND patient=?2 AND reason='rule'",
                )?
                .execute([node, patient])?;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::store::temp_store;

    #[test]
    fn a_catchment_entry_read_twice_follows_every_write_between() {
        let (_d, mut store) = temp_store("hub");
        let mut tx = store.begin().unwrap();
        let entry = |tx: &Tx<'_>| tx.catchment_entry("c", "p").unwrap();
        assert_eq!(entry(&tx), None);
        assert_eq!(entry(&tx), None, "asked twice, same answer");
        tx.add_to_catchment("c", "p", CatchmentReason::Rule)
            .unwrap();
        assert_eq!(entry(&tx), Some(CatchmentEntry { moved_ms: None }));
        tx.mark_moved("c", "p", 7).unwrap();
        assert_eq!(entry(&tx), Some(CatchmentEntry { moved_ms: Some(7) }));
        assert_eq!(
            tx.catchment_entry("c", "q").unwrap(),
            None,
            "another patient"
        );
        assert_eq!(entry(&tx), Some(CatchmentEntry { moved_ms: Some(7) }));
        tx.add_to_catchment("c", "p", CatchmentReason::Granted)
            .unwrap();
        assert_eq!(entry(&tx), Some(CatchmentEntry { moved_ms: None }));
        tx.remove_from_catchment("c", "p").unwrap();
        assert_eq!(entry(&tx), None);
        tx.add_to_catchment("c", "p", CatchmentReason::Rule)
            .unwrap();
        assert!(entry(&tx).is_some());
        tx.prune_rule_catchment("p", &[]).unwrap();
        assert_eq!(entry(&tx), None, "pruned");
        tx.commit().unwrap();
    }

    #[test]
    fn catchment_reasons_round_trip_and_an_unknown_one_is_corruption() {
        let (_d, mut store) = temp_store("hub");
        let mut tx = store.begin().unwrap();
        for (i, r) in CatchmentReason::ALL.iter().enumerate() {
            assert!(tx.add_to_catchment("c", &format!("p{i}"), *r).unwrap());
        }
        tx.commit().unwrap();
        let listed: Vec<CatchmentReason> = store
            .catchment_list(Some("c"))
            .unwrap()
            .into_iter()
            .map(|(_, _, r)| r)
            .collect();
        assert_eq!(listed, CatchmentReason::ALL);
        assert!(
            !store.in_catchment("c", "p3").unwrap(),
            "p3 was added as moved"
        );
        store
            .conn()
            .execute("UPDATE catchment SET reason='rules' WHERE patient='p0'", [])
            .unwrap();
        let err = store.catchment_list(None).unwrap_err();
        assert!(
            err.is_corruption()
                && err
                    .to_string()
                    .contains(r#"catchment.reason of c Patient/p0 holds "rules""#),
            "{err}"
        );
    }
}
