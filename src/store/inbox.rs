//! Room `inbox`: versions pulled from the parent, not yet applied.
//!
//! Table: `inbox(kind, id, peer, origin, hlc_wall, hlc_ctr, vv, deleted, body,
//! received_ms)`, one row per record (the latest snapshot pulled).
//!
//! Invariants
//! - A page enters the inbox in the same transaction that moves the pull cursor, so
//!   a crash loses neither the page nor the position.
//! - Rows are applied in dependency order (metadata, then Patients, then Encounters,
//!   then the rest) and skip those quarantined at the apply or pull stage until
//!   their retry.
//! - A newer pull of a record replaces its unapplied row.
//! - A pulled record this node cannot read is held as received (its body unchecked)
//!   beside a quarantine row at stage `pull`; reading a batch names such a row as
//!   [`InboxRow::Unreadable`] instead of failing the batch, so one row never stops
//!   the rest.
//!
//! Errors: a failure rolls the transaction back; the row stays in the inbox and is
//! read again on the next pass. A row whose version vector does not decode is
//! reported as corruption (this node wrote it from a decoded one).

use rusqlite::params;

use super::replica::parse_vv;
use super::{shown_blob, Result, Store, Tx};
use crate::model::{Hlc, RecordKey, Snapshot, Version};
use crate::wire::WireRecord;

/// One inbox row as [`Store::inbox_batch`] reads it.
#[derive(Debug)]
pub enum InboxRow {
    /// A version ready to apply, and the peer it came from.
    Ready { peer: String, version: Version },
    /// A row whose body this node cannot read (held from a pull, or damaged).
    Unreadable { key: RecordKey, reason: String },
}

/// Why a held row waits: what is wrong with it, and how large it is as received.
pub fn unreadable_reason(e: &dyn std::fmt::Display, body: &[u8]) -> String {
    format!(
        "cannot read it: {e} (held as received, {}; `quarantine show` prints it)",
        shown_blob(body)
    )
}

impl Store {
    /// Inbox rows waiting to be applied, dependency order first (metadata, then
    /// Patients, then the rest), skipping rows quarantined until after `now_ms`.
    pub fn inbox_batch(&self, now_ms: u64, limit: usize) -> Result<Vec<InboxRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT i.kind, i.id, i.peer, i.origin, i.hlc_wall, i.hlc_ctr, i.vv, i.deleted, i.body FROM inbox i
             WHERE NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.kind=i.kind AND q.id=i.id
                               AND q.stage IN ('apply','pull') AND q.next_retry_ms > ?1)
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
            let vv = parse_vv("inbox", &key, &vv)?;
            let snapshot = match Snapshot::for_key(&key, &body) {
                Ok(snapshot) => snapshot,
                Err(e) => {
                    out.push(InboxRow::Unreadable {
                        reason: unreadable_reason(&e, &body),
                        key,
                    });
                    continue;
                }
            };
            out.push(InboxRow::Ready {
                peer,
                version: Version {
                    snapshot,
                    origin,
                    hlc: Hlc {
                        wall_ms: wall as u64,
                        counter: ctr as u32,
                    },
                    vv,
                    deleted,
                },
            });
        }
        Ok(out)
    }

    /// The body of `key`'s inbox row as stored (for a held record: as received).
    pub fn inbox_body(&self, key: &RecordKey) -> Result<Option<Vec<u8>>> {
        use rusqlite::OptionalExtension;
        Ok(self
            .conn
            .prepare_cached("SELECT body FROM inbox WHERE kind=?1 AND id=?2")?
            .query_row(params![key.kind, key.id], |r| r.get(0))
            .optional()?)
    }
}

impl Tx<'_> {
    /// Stores a pulled version in the inbox, replacing an older unapplied one.
    pub fn to_inbox(&mut self, peer: &str, v: &Version, now_ms: u64) -> Result<()> {
        let s = &v.snapshot;
        let hlc = v.hlc;
        self.put_inbox(
            &s.key,
            peer,
            &v.origin,
            hlc,
            &v.vv.to_json(),
            v.deleted,
            &s.body,
            now_ms,
        )
    }

    /// Holds a pulled record this node could not read, as received, under `key` (the
    /// record's own kind and id, checked by the caller); the caller quarantines it
    /// at stage `pull` so that batches skip it until its retry.
    pub fn hold_in_inbox(
        &mut self,
        peer: &str,
        key: &RecordKey,
        rec: &WireRecord,
        now_ms: u64,
    ) -> Result<()> {
        self.put_inbox(
            key,
            peer,
            &rec.origin,
            rec.hlc,
            &rec.vv.to_json(),
            rec.deleted,
            rec.body.as_bytes(),
            now_ms,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn put_inbox(
        &mut self,
        key: &RecordKey,
        peer: &str,
        origin: &str,
        hlc: Hlc,
        vv: &str,
        deleted: bool,
        body: &[u8],
        now_ms: u64,
    ) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO inbox(kind, id, peer, origin, hlc_wall, hlc_ctr, vv, deleted, body, received_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT(kind, id) DO UPDATE SET peer=excluded.peer, origin=excluded.origin, hlc_wall=excluded.hlc_wall,
                   hlc_ctr=excluded.hlc_ctr, vv=excluded.vv, deleted=excluded.deleted, body=excluded.body, received_ms=excluded.received_ms",
            )?
            .execute(params![
                key.kind,
                key.id,
                peer,
                origin,
                hlc.wall_ms as i64,
                hlc.counter as i64,
                vv,
                deleted,
                body,
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
