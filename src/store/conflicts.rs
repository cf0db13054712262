//! Room `conflicts`: both sides of every concurrent edit and how it was resolved.
//!
//! Table: `conflicts(n, kind, id, detected_ms, local_origin, local_vv, local_body,
//! remote_origin, remote_vv, remote_body, resolution, result_vv, reviewed_ms,
//! review, lost_at)`.
//!
//! Invariants
//! - No version is ever silently dropped: a conflict keeps both sides' bodies.
//! - A conflict this node's version lost at its parent (`lost_at` = that peer) is
//!   stored once per version, its other side empty (`remote_body = x''`,
//!   `remote_vv = '{}'`) until the winner arrives by pull.
//! - A person's review sets `reviewed_ms` and `review` together, once.
//!
//! Errors: a failure rolls the transaction back with the integration that found the
//! conflict: the conflict row and the resolution are written together or not at all.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{shown_blob, shown_text, Result, Store, StoreError, Tx};
use crate::model::{RecordKey, Snapshot, Version, VersionVector};

/// One side of a stored conflict.
#[derive(Debug, Clone)]
pub struct ConflictSide {
    pub origin: String,
    pub vv: VersionVector,
    pub snapshot: Snapshot,
}

/// A conflict as stored, for a review (`engine::review_conflict`).
#[derive(Debug, Clone)]
pub struct StoredConflict {
    pub key: RecordKey,
    pub local: ConflictSide,
    pub remote: ConflictSide,
    pub result_vv: VersionVector,
    /// When and how a person reviewed it.
    pub reviewed: Option<(u64, String)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConflictEntry {
    pub n: i64,
    pub record: String,
    pub detected_ms: u64,
    pub local_origin: String,
    pub local_vv: String,
    pub remote_origin: String,
    pub remote_vv: String,
    pub resolution: String,
    pub result_vv: String,
    /// When a person reviewed it (`conflicts resolve`); `None`: still open.
    pub reviewed_ms: Option<u64>,
    /// What the review kept.
    pub review: Option<String>,
    /// The peer at which this node's version lost ('' for a conflict resolved here).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub lost_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_body: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_body: Option<serde_json::Value>,
}

impl Store {
    pub fn conflicts_list(
        &self,
        with_bodies: bool,
        record: Option<i64>,
    ) -> Result<Vec<ConflictEntry>> {
        let mut stmt = self.conn.prepare(
            "SELECT n, kind, id, detected_ms, local_origin, local_vv, remote_origin, remote_vv, resolution, result_vv, local_body, remote_body, reviewed_ms, review, lost_at
             FROM conflicts WHERE (?1 IS NULL OR n = ?1) ORDER BY n",
        )?;
        let mut rows = stmt.query(params![record])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let n: i64 = r.get(0)?;
            // A side never known here (a conflict lost at the parent) is empty: `None`.
            let body = |i: usize, column: &'static str| -> Result<Option<serde_json::Value>> {
                if !with_bodies {
                    return Ok(None);
                }
                let b: Vec<u8> = r.get(i)?;
                if b.is_empty() {
                    return Ok(None);
                }
                serde_json::from_slice(&b).map(Some).map_err(|e| {
                    StoreError::bad_value("conflicts", column, format!("#{n}"), shown_blob(&b), e)
                })
            };
            out.push(ConflictEntry {
                reviewed_ms: r.get::<_, Option<i64>>(12)?.map(|v| v as u64),
                review: r.get(13)?,
                n,
                record: format!("{}/{}", r.get::<_, String>(1)?, r.get::<_, String>(2)?),
                detected_ms: r.get::<_, i64>(3)? as u64,
                local_origin: r.get(4)?,
                local_vv: r.get(5)?,
                remote_origin: r.get(6)?,
                remote_vv: r.get(7)?,
                resolution: r.get(8)?,
                result_vv: r.get(9)?,
                local_body: body(10, "local_body")?,
                remote_body: body(11, "remote_body")?,
                lost_at: r.get(14)?,
            });
        }
        Ok(out)
    }

    /// Conflicts no person has reviewed yet.
    pub fn open_conflicts(&self) -> Result<u64> {
        Ok(self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM conflicts WHERE reviewed_ms IS NULL")?
            .query_row([], |r| r.get::<_, i64>(0))? as u64)
    }
}

impl Tx<'_> {
    #[allow(clippy::too_many_arguments)]
    /// Records that `mine` lost a conflict at `peer` (its push answer said so), once
    /// per version: the other side is not known here (it arrives with a pull), so it
    /// is stored empty. Returns whether a row was added.
    pub fn add_lost_conflict(
        &mut self,
        key: &RecordKey,
        mine: &Version,
        peer: &str,
        resolution: &str,
        now_ms: u64,
    ) -> Result<bool> {
        let vv = mine.vv.to_json();
        let known = self
            .tx
            .prepare_cached(
                "SELECT 1 FROM conflicts WHERE kind=?1 AND id=?2 AND local_vv=?3 AND lost_at=?4",
            )?
            .query_row(params![key.kind, key.id, vv, peer], |_| Ok(()))
            .optional()?
            .is_some();
        if known {
            return Ok(false);
        }
        self.tx
            .prepare_cached(
                "INSERT INTO conflicts(kind, id, detected_ms, local_origin, local_vv, local_body, remote_origin, remote_vv, remote_body, resolution, result_vv, lost_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, '{}', x'', ?8, '{}', ?7)",
            )?
            .execute(params![
                key.kind,
                key.id,
                now_ms as i64,
                mine.origin,
                vv,
                mine.snapshot.body,
                peer,
                resolution
            ])?;
        Ok(true)
    }

    pub fn add_conflict(
        &mut self,
        key: &RecordKey,
        local: &Version,
        remote: &Version,
        resolution: &str,
        result_vv: &VersionVector,
        now_ms: u64,
    ) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO conflicts(kind, id, detected_ms, local_origin, local_vv, local_body, remote_origin, remote_vv, remote_body, resolution, result_vv)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                key.kind,
                key.id,
                now_ms as i64,
                local.origin,
                local.vv.to_json(),
                local.snapshot.body,
                remote.origin,
                remote.vv.to_json(),
                remote.snapshot.body,
                resolution,
                result_vv.to_json()
            ])?;
        Ok(())
    }

    /// Both sides of conflict `n` as they were stored: (record, local, remote, the
    /// result's vector, the review if any). `None`: no such conflict.
    pub fn conflict(&self, n: i64) -> Result<Option<StoredConflict>> {
        let row = self
            .tx
            .prepare_cached(
                "SELECT kind, id, local_origin, local_vv, local_body, remote_origin, remote_vv, remote_body, result_vv, reviewed_ms, review
                 FROM conflicts WHERE n = ?1",
            )?
            .query_row(params![n], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    (r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get::<_, Vec<u8>>(4)?),
                    (r.get::<_, String>(5)?, r.get::<_, String>(6)?, r.get::<_, Vec<u8>>(7)?),
                    r.get::<_, String>(8)?,
                    r.get::<_, Option<i64>>(9)?,
                    r.get::<_, Option<String>>(10)?,
                ))
            })
            .optional()?;
        let Some((kind, id, local, remote, result_vv, reviewed_ms, review)) = row else {
            return Ok(None);
        };
        let key = RecordKey { kind, id };
        let row = format!("#{n} ({key})");
        let bad = |column: &'static str, value: String, e: &dyn std::fmt::Display| {
            StoreError::bad_value("conflicts", column, &row, value, e)
        };
        let vector = |column: &'static str, vv: &str| {
            VersionVector::from_json(vv).map_err(|e| bad(column, shown_text(vv), &e))
        };
        let side = |(origin, vv, body): (String, String, Vec<u8>),
                    vv_column: &'static str,
                    body_column: &'static str|
         -> Result<ConflictSide> {
            Ok(ConflictSide {
                origin,
                vv: vector(vv_column, &vv)?,
                snapshot: Snapshot::for_key(&key, &body)
                    .map_err(|e| bad(body_column, shown_blob(&body), &e))?,
            })
        };
        let reviewed = match (reviewed_ms, review) {
            (None, _) => None,
            (Some(ms), Some(review)) => Some((ms as u64, review)),
            (Some(_), None) => {
                return Err(bad(
                    "review",
                    "NULL".into(),
                    &"a reviewed conflict always records what the review kept",
                ))
            }
        };
        Ok(Some(StoredConflict {
            local: side(local, "local_vv", "local_body")?,
            remote: side(remote, "remote_vv", "remote_body")?,
            result_vv: vector("result_vv", &result_vv)?,
            reviewed,
            key,
        }))
    }

    /// Records a person's review of conflict `n`.
    pub fn mark_conflict_reviewed(&mut self, n: i64, now_ms: u64, review: &str) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE conflicts SET reviewed_ms=?2, review=?3 WHERE n=?1")?
            .execute(params![n, now_ms as i64, review])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{temp_store, test_version};
    use serde_json::json;

    #[test]
    fn a_side_never_known_lists_as_none_but_a_body_that_does_not_parse_is_corruption() {
        let (_d, mut store) = temp_store("a");
        let mine = test_version("a", json!({"resourceType": "Patient", "id": "p1"}));
        let mut tx = store.begin().unwrap();
        assert!(tx
            .add_lost_conflict(mine.key(), &mine, "hub", "the hub's version kept", 1)
            .unwrap());
        tx.commit().unwrap();
        let listed = store.conflicts_list(true, None).unwrap();
        assert_eq!(
            listed[0].local_body,
            Some(json!({"resourceType": "Patient", "id": "p1"}))
        );
        assert_eq!(
            listed[0].remote_body, None,
            "the winner is not known here yet"
        );
        store
            .conn()
            .execute("UPDATE conflicts SET local_body=x'7b'", [])
            .unwrap();
        let err = store.conflicts_list(true, None).unwrap_err();
        assert!(
            err.is_corruption() && err.to_string().contains("conflicts.local_body of #1"),
            "{err}"
        );
        assert_eq!(
            store.conflicts_list(false, None).unwrap().len(),
            1,
            "bodies not asked for"
        );
    }
}
