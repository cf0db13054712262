//! Room `audit`: the append-only, hash-chained log of every change.
//!
//! Table: `audit(n, at_ms, actor, action, record, hash, detail, prev, entry)`.
//!
//! ```text
//! entry[n] = sha256(entry[n-1] ‖ n ‖ at_ms ‖ len‖actor ‖ len‖action ‖ len‖record
//!                   ‖ len‖hash ‖ len‖detail)        entry[0] = 32 zero bytes
//! ```
//!
//! Invariants
//! - Rows are only appended, numbered 1, 2, 3… without gaps; `prev` is the previous
//!   row's `entry`. [`Store::verify_audit`] recomputes the chain and names the first
//!   row that does not match (truncating the newest rows is detectable only against
//!   a head kept elsewhere: `audit verify` prints it).
//! - The transaction keeps the head in memory, so many entries in one transaction
//!   chain without re-reading.
//!
//! Errors: a failure rolls the transaction back, entries included: an audit row
//! never describes a change that did not commit, and a change never commits without
//! the audit row written in its transaction.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{shown_blob, Hot, Result, Store, StoreError, Tx};

/// One entry at the head of the chain.
pub(super) const INSERT_SQL: &str = "INSERT INTO audit(n, at_ms, actor, action, record, hash, detail, prev, entry) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

/// One audit entry (`audit list`).
#[derive(Debug, Clone, Serialize)]
pub struct AuditRow {
    pub n: i64,
    pub at_ms: u64,
    pub actor: String,
    pub action: String,
    pub record: String,
    pub hash: String,
    pub detail: String,
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditCheck {
    Intact { entries: u64, head: String },
    Broken { row: i64, problem: String },
}

struct AuditFields<'a> {
    n: i64,
    at_ms: i64,
    actor: &'a str,
    action: &'a str,
    record: &'a str,
    hash: &'a str,
    detail: &'a str,
}

impl AuditFields<'_> {
    fn entry_hash(&self, prev: &[u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(prev);
        h.update(self.n.to_be_bytes());
        h.update(self.at_ms.to_be_bytes());
        for field in [self.actor, self.action, self.record, self.hash, self.detail] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
        h.finalize().into()
    }
}

impl Store {
    /// The newest audit entries, newest first, optionally of one record and action.
    pub fn audit_list(
        &self,
        record: Option<&str>,
        action: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT n, at_ms, actor, action, record, hash, detail FROM audit
             WHERE (?1 IS NULL OR record = ?1) AND (?2 IS NULL OR action = ?2)
             ORDER BY n DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![record, action, limit as i64], |r| {
            Ok(AuditRow {
                n: r.get(0)?,
                at_ms: r.get::<_, i64>(1)? as u64,
                actor: r.get(2)?,
                action: r.get(3)?,
                record: r.get(4)?,
                hash: r.get(5)?,
                detail: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Entries in the audit chain and the hex of the last one's hash.
    pub fn audit_head(&self) -> Result<(u64, String)> {
        let row = self
            .conn
            .prepare_cached("SELECT n, entry FROM audit ORDER BY n DESC LIMIT 1")?
            .query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
            .optional()?;
        Ok(row
            .map(|(n, e)| (n as u64, hex::encode(e)))
            .unwrap_or((0, String::new())))
    }

    /// Recomputes the audit hash chain from the first entry.
    pub fn verify_audit(&self) -> Result<AuditCheck> {
        let mut stmt = self
            .conn
            .prepare("SELECT n, at_ms, actor, action, record, hash, detail, prev, entry FROM audit ORDER BY n")?;
        let mut rows = stmt.query([])?;
        let mut prev = [0u8; 32];
        let mut expected_n = 1i64;
        let mut count = 0u64;
        while let Some(r) = rows.next()? {
            let n: i64 = r.get(0)?;
            if n != expected_n {
                return Ok(AuditCheck::Broken {
                    row: expected_n,
                    problem: format!("row {expected_n} is missing (next row is {n})"),
                });
            }
            let stored_prev: Vec<u8> = r.get(7)?;
            let stored_entry: Vec<u8> = r.get(8)?;
            if stored_prev != prev {
                return Ok(AuditCheck::Broken {
                    row: n,
                    problem: format!("row {n} does not link to row {} (chain broken)", n - 1),
                });
            }
            let text: [String; 5] = [r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?];
            let fields = AuditFields {
                n,
                at_ms: r.get(1)?,
                actor: &text[0],
                action: &text[1],
                record: &text[2],
                hash: &text[3],
                detail: &text[4],
            };
            let computed = fields.entry_hash(&prev);
            if stored_entry != computed[..] {
                return Ok(AuditCheck::Broken {
                    row: n,
                    problem: format!("row {n} was altered (its content does not match its hash)"),
                });
            }
            prev = computed;
            expected_n += 1;
            count += 1;
        }
        Ok(AuditCheck::Intact {
            entries: count,
            head: hex::encode(prev),
        })
    }
}

impl Tx<'_> {
    pub fn audit(
        &mut self,
        now_ms: u64,
        actor: &str,
        action: &str,
        record: &str,
        hash: &str,
        detail: &str,
    ) -> Result<()> {
        let (last_n, prev) = match self.audit_head {
            Some(h) => h,
            None => {
                let head = self
                    .tx
                    .prepare_cached("SELECT n, entry FROM audit ORDER BY n DESC LIMIT 1")?
                    .query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
                    .optional()?;
                match head {
                    // The first entry links to 32 zero bytes.
                    None => (0, [0; 32]),
                    // Chaining onto a head that is not a hash would hide the break.
                    Some((n, e)) => (
                        n,
                        <[u8; 32]>::try_from(e.as_slice()).map_err(|_| {
                            StoreError::bad_value(
                                "audit",
                                "entry",
                                format!("#{n}"),
                                shown_blob(&e),
                                "not 32 bytes",
                            )
                        })?,
                    ),
                }
            }
        };
        let fields = AuditFields {
            n: last_n + 1,
            at_ms: now_ms as i64,
            actor,
            action,
            record,
            hash,
            detail,
        };
        let entry = fields.entry_hash(&prev);
        self.with_hot(Hot::InsertAudit, |stmt| {
            stmt.execute(params![
                fields.n,
                fields.at_ms,
                actor,
                action,
                record,
                hash,
                detail,
                &prev[..],
                &entry[..]
            ])?;
            Ok(())
        })?;
        self.audit_head = Some((fields.n, entry));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::temp_store;

    #[test]
    fn audit_chain_detects_an_altered_row() {
        let (_d, mut store) = temp_store("a");
        let mut tx = store.begin().unwrap();
        for i in 0..5 {
            tx.audit(i, "local", "write", &format!("Patient/p{i}"), "abc", "")
                .unwrap();
        }
        tx.commit().unwrap();
        assert!(matches!(
            store.verify_audit().unwrap(),
            AuditCheck::Intact { entries: 5, .. }
        ));
        store
            .conn()
            .execute("UPDATE audit SET detail='x' WHERE n=3", [])
            .unwrap();
        match store.verify_audit().unwrap() {
            AuditCheck::Broken { row, problem } => {
                assert_eq!(row, 3);
                assert!(problem.contains("altered"), "{problem}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn audit_chain_detects_a_deleted_row() {
        let (_d, mut store) = temp_store("a");
        let mut tx = store.begin().unwrap();
        for i in 0..4 {
            tx.audit(i, "local", "write", "Patient/p", "", "").unwrap();
        }
        tx.commit().unwrap();
        store
            .conn()
            .execute("DELETE FROM audit WHERE n=2", [])
            .unwrap();
        assert!(matches!(
            store.verify_audit().unwrap(),
            AuditCheck::Broken { row: 2, .. }
        ));
    }

    #[test]
    fn a_head_that_is_not_a_hash_is_corruption_not_a_new_chain() {
        let (_d, mut store) = temp_store("a");
        let mut tx = store.begin().unwrap();
        tx.audit(1, "local", "write", "Patient/p", "", "").unwrap();
        tx.commit().unwrap();
        store
            .conn()
            .execute("UPDATE audit SET entry=x'00' WHERE n=1", [])
            .unwrap();
        let mut tx = store.begin().unwrap();
        let err = tx
            .audit(2, "local", "write", "Patient/p", "", "")
            .unwrap_err();
        assert!(
            err.is_corruption() && err.to_string().contains("audit.entry of #1"),
            "{err}"
        );
    }
}
