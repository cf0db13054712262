//! Room `inbox`: versions pulled from the parent, not yet applied.
//!
//! Table: `inbox(kind, id, peer, origin, hlc_wall, hlc_ctr, vv, deleted, body,
//! received_ms)`, one row per record (the latest snapshot pulled).
//!
//! Invariants
//! - A page enters the inbox in the same transaction that moves the pull cursor, so
//!   a crash loses neither the page nor the position.
//! - Rows are applied in dependency order (metadata, then Patients, then Encounters,
//!   then the rest) and skip those quarantined at the apply stage until their retry.
//! - A newer pull of a record replaces its unapplied row.
//!
//! Errors: a failure rolls the transaction back; the row stays in the inbox and is
//! read again on the next pass. A row that does not decode is reported as corruption.

use rusqlite::params;

use super::replica::parse_vv;
use super::{shown_blob, Result, Store, StoreError, Tx};
use crate::model::{Hlc, RecordKey, Snapshot, Version};

impl Store {
    /// Inbox rows waiting to be applied, dependency order first (metadata, then
    /// Patients, then the rest), skipping rows quarantined until after `now_ms`.
    pub fn inbox_batch(&self, now_ms: u64, limit: usize) -> Result<Vec<(String, Version)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT i.kind, i.id, i.peer, i.origin, i.hlc_wall, i.hlc_ctr, i.vv, i.deleted, i.body FROM inbox i
             WHERE NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.kind=i.kind AND q.id=i.id
                               AND q.stage='apply' AND q.next_retry_ms > ?1)
             ORDER BY CASE WHEN i.kind='Patient' THEN 1 WHEN i.kind IN ('Encounter','EpisodeOfCare') THEN 2
                           WHEN i.kind IN ('Location','Practitioner','Organization') OR i.kind LIKE 'openmrs:%' THEN 0
                           ELSE 3 END, i.received_ms, i.kind, i.id
             LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![now_ms as i64, limit as i64], |r| {
            let kind: String = r.get(0)?;
            let id: String = r.get(1)?;
            let body: Vec<u8> = r.get(8)?;
            Ok((
                kind,
                id,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, bool>(7)?,
                body,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (kind, id, peer, origin, wall, ctr, vv, deleted, body) = row?;
            let key = RecordKey { kind, id };
            let snapshot = Snapshot::for_key(&key, &body)
                .map_err(|e| StoreError::bad_value("inbox", "body", &key, shown_blob(&body), e))?;
            out.push((
                peer,
                Version {
                    snapshot,
                    origin,
                    hlc: Hlc {
                        wall_ms: wall as u64,
                        counter: ctr as u32,
                    },
                    vv: parse_vv("inbox", &key, &vv)?,
                    deleted,
                },
            ));
        }
        Ok(out)
    }
}

impl Tx<'_> {
    /// Stores a pulled version in the inbox, replacing an older unapplied one.
    pub fn to_inbox(&mut self, peer: &str, v: &Version, now_ms: u64) -> Result<()> {
        let s = &v.snapshot;
        self.tx
            .prepare_cached(
                "INSERT INTO inbox(kind, id, peer, origin, hlc_wall, hlc_ctr, vv, deleted, body, received_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT(kind, id) DO UPDATE SET peer=excluded.peer, origin=excluded.origin, hlc_wall=excluded.hlc_wall,
                   hlc_ctr=excluded.hlc_ctr, vv=excluded.vv, deleted=excluded.deleted, body=excluded.body, received_ms=excluded.received_ms",
            )?
            .execute(params![
                s.key.kind,
                s.key.id,
                peer,
                v.origin,
                v.hlc.wall_ms as i64,
                v.hlc.counter as i64,
                v.vv.to_json(),
                v.deleted,
                s.body,
                now_ms as i64
            ])?;
        Ok(())
    }

    pub fn remove_from_inbox(&mut self, key: &RecordKey) -> Result<()> {
        self.tx
            .prepare_cached("DELETE FROM inbox WHERE kind=?1 AND id=?2")?
            .execute(params![key.kind, key.id])?;
        Ok(())
    }
}
