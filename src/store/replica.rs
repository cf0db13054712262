//! Room `replica`: the latest version of every record, its history, and the clock.
//!
//! Tables
//! ```text
//! replica(kind, id, seq, hash, origin, hlc_wall, hlc_ctr, vv, deleted, class,
//!         patient, body, updated_ms, sender, hn, source, outcome)
//!           the latest version of every record this node holds; `seq` is this
//!           node's change sequence at the write; `sender` is the child that pushed
//!           it (NULL: written here, pulled, or a resolution); `hn`, `source`,
//!           `outcome` and `updated_ms` are its history row's `n`, `source`,
//!           `outcome` and `seen_ms` (NULL `source`: a row from before migration 14
//!           whose version has its own row in `versions`)
//! versions(n, kind, id, hash, origin, hlc_wall, hlc_ctr, vv, deleted, body,
//!          seen_ms, source, outcome)
//!           every version this node has seen and no longer holds as current, once
//!           per (record, vv, hash)
//! history   (view) `versions` and the current versions: every version seen, once
//!           per (record, vv, hash), in the order of `n`
//! ```
//! and the hybrid logical clock, kept in `meta` (`hlc`) and held in the [`Tx`].
//!
//! Invariants
//! - A version reaches the replica only through [`Tx::write_version`], which writes
//!   it with its history columns and its audit entry in the same transaction: no
//!   caller can skip the audit. History-only rows (a stale copy, a conflict's
//!   incoming side) come through [`Tx::remember_unkept`]; `outcome` says which
//!   ([`VersionOutcome`]).
//! - A replica row's `seq` is unique (the change sequence, [`Tx::next_seq`]): a
//!   record written again moves to the head, so "changed after seq" is a scan.
//! - The current version of a record is in history as its replica row (view
//!   `history`); two triggers (migration 14) copy it into `versions`, with its
//!   place `hn`, before the replica row is replaced (every write gives it a new
//!   `seq`) or deleted, so no version is lost and a record written once is
//!   written once. History places (`versions.n`, `replica.hn`) come from one
//!   counter ([`Tx::next_history_n`], meta `history_n`): history reads in the
//!   order versions were seen, whichever table holds them. Readers of history
//!   read the view.
//! - History is append-only except for [`Tx::rebase_clock`] (re-stamping this node's
//!   own unpushed versions) and [`Tx::purge_patient`] (records that moved away).
//! - The clock only moves forward within a transaction: [`Tx::tick`] for a local
//!   event, [`Tx::observe`] past a peer's stamp; [`Tx::commit`] writes it back.
//!
//! Errors: a failure rolls the whole transaction back: no replica row, history row
//! or clock change survives alone.

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::{meta, shown_blob, shown_text, Hot, Result, Store, StoreError, Tx};
use crate::model::{Class, ContentHash, Hlc, RecordKey, Snapshot, Version, VersionVector};

/// A stored version and where it sits in this node's change sequence.
#[derive(Debug, Clone)]
pub struct Stored {
    pub version: Version,
    pub seq: u64,
}

text_enum! {
    /// What became of a version when this node saw it (`versions.outcome`).
    pub enum VersionOutcome {
        /// Written here (a local write or a capture from the EMR).
        Written = "written",
        /// Taken from a peer as the new current version.
        Accepted = "accepted",
        /// The result of a conflict, written here.
        Resolved = "resolved",
        /// Older than what this node held: kept in history only.
        Stale = "stale",
        /// One side of a conflict (the incoming one): kept in history only.
        Conflict = "conflict",
    }
}

/// Why a version seen is kept in history only ([`Tx::remember_unkept`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unkept {
    /// Older than what this node holds.
    Stale,
    /// The incoming side of a conflict.
    Conflict,
}

#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    pub seen_ms: u64,
    pub origin: String,
    pub source: String,
    pub outcome: VersionOutcome,
    pub vv: String,
    pub hlc: String,
    pub hash: String,
    pub deleted: bool,
    pub changed: Vec<String>,
    #[serde(skip)]
    pub body: Vec<u8>,
}

pub(super) const REPLICA_COLS: &str =
    "kind, id, seq, hash, origin, hlc_wall, hlc_ctr, vv, deleted, class, patient, body";

pub(super) const REPLICA_COLS_R: &str =
    "r.kind, r.id, r.seq, r.hash, r.origin, r.hlc_wall, r.hlc_ctr, r.vv, r.deleted, r.class, r.patient, r.body";

/// A version vector read from `table.vv` of record `row`.
pub(super) fn parse_vv(table: &'static str, row: &RecordKey, s: &str) -> Result<VersionVector> {
    VersionVector::from_json(s)
        .map_err(|e| StoreError::bad_value(table, "vv", row, shown_text(s), e))
}

/// A content hash read from `table.hash` of record `row`.
pub(super) fn parse_hash(table: &'static str, row: &RecordKey, b: &[u8]) -> Result<ContentHash> {
    ContentHash::from_slice(b)
        .ok_or_else(|| StoreError::bad_value(table, "hash", row, shown_blob(b), "not 32 bytes"))
}

/// Decodes a row selected with [`REPLICA_COLS`] (or `_R`). A class, hash or vector
/// this version cannot have written is corruption, never a default.
pub(super) fn stored_from_row(r: &rusqlite::Row<'_>) -> Result<Stored> {
    let key = RecordKey {
        kind: r.get(0)?,
        id: r.get(1)?,
    };
    let hash: Vec<u8> = r.get(3)?;
    let vv: String = r.get(7)?;
    let class: String = r.get(9)?;
    let class = Class::parse(&class).ok_or_else(|| {
        StoreError::bad_value(
            "replica",
            "class",
            &key,
            shown_text(&class),
            "not metadata or clinical",
        )
    })?;
    let hash = parse_hash("replica", &key, &hash)?;
    let vv = parse_vv("replica", &key, &vv)?;
    let body: Vec<u8> = r.get(11)?;
    // What is served, pushed and compared is exactly what was written: a body that
    // changed on disk under its hash is caught here, not sent on.
    if ContentHash::of(&body) != hash {
        return Err(StoreError::bad_value(
            "replica",
            "body",
            &key,
            shown_blob(&body),
            format!("does not match its hash {}", hash.short()),
        ));
    }
    Ok(Stored {
        seq: r.get::<_, i64>(2)? as u64,
        version: Version {
            origin: r.get(4)?,
            hlc: Hlc {
                wall_ms: r.get::<_, i64>(5)? as u64,
                counter: r.get::<_, i64>(6)? as u32,
            },
            vv,
            deleted: r.get(8)?,
            snapshot: Snapshot {
                class,
                patient: r.get(10)?,
                body,
                hash,
                key,
            },
        },
    })
}

/// Every row of `stmt` run with `params`, decoded by [`stored_from_row`].
pub(super) fn stored_rows(
    stmt: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
) -> Result<Vec<Stored>> {
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(stored_from_row(r)?);
    }
    Ok(out)
}

/// The current version of one record ([`REPLICA_COLS`]).
pub(super) const CURRENT_SQL: &str = "SELECT kind, id, seq, hash, origin, hlc_wall, hlc_ctr, vv, deleted, class, patient, body FROM replica WHERE kind=?1 AND id=?2";

pub(super) fn current_in(conn: &Connection, key: &RecordKey) -> Result<Option<Stored>> {
    let mut stmt = conn.prepare_cached(CURRENT_SQL)?;
    Ok(stored_rows(&mut stmt, params![key.kind, key.id])?.pop())
}

/// A record new here (parameters: the replica's columns in table order, `?15..?17`
/// its history columns `hn`, `source`, `outcome`). `DO NOTHING` on its key, so a record already held (the
/// caller's read of it may be older than this transaction) falls to
/// [`UPDATE_SQL`]. No trigger fires on an insert, and SQLite checks every
/// constraint before it writes a b-tree, so the statement needs no statement
/// journal: the upsert it replaced fired the migration-12 trigger program and had
/// SQLite copy each page it touched into one first — half of the statement's time
/// in a hub applying new records (perf, `bench apply`).
pub(super) const INSERT_SQL: &str = "INSERT INTO replica(kind, id, seq, hash, origin, hlc_wall, hlc_ctr, vv, deleted, class, patient, body, updated_ms, sender, hn, source, outcome)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
                 ON CONFLICT(kind, id) DO NOTHING";

/// A record held here, written again (the `replica_to_history` trigger copies the
/// version it replaces into `versions` first). Same parameters as [`INSERT_SQL`].
pub(super) const UPDATE_SQL: &str =
    "UPDATE replica SET seq=?3, hash=?4, origin=?5, hlc_wall=?6, hlc_ctr=?7, vv=?8, deleted=?9,
                   class=?10, patient=?11, body=?12, updated_ms=?13, sender=?14,
                   hn=?15, source=?16, outcome=?17
                 WHERE kind=?1 AND id=?2";

/// A version seen and not kept (at place `?1`), unless history holds it already,
/// in `versions` or as the current version.
pub(super) const INSERT_VERSION_SQL: &str = "INSERT INTO versions(n, kind, id, hash, origin, hlc_wall, hlc_ctr, vv, deleted, body, seen_ms, source, outcome)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13
                  WHERE NOT EXISTS (SELECT 1 FROM versions WHERE kind=?2 AND id=?3 AND vv=?8 AND hash=?4)
                    AND NOT EXISTS (SELECT 1 FROM replica WHERE kind=?2 AND id=?3 AND vv=?8 AND hash=?4)";

/// A write into `versions` that found its place in history taken: the counter of
/// places (meta `history_n`) went back, behind a current version's place, which a
/// write does not scan for (`doctor` does). Corruption naming the counter, not a
/// database error: the write is refused whole and nothing is lost.
fn place_taken_twice(e: rusqlite::Error) -> StoreError {
    let taken = matches!(
        &e,
        rusqlite::Error::SqliteFailure(f, Some(text))
            if f.code == rusqlite::ErrorCode::ConstraintViolation && text.contains("versions.n")
    );
    if !taken {
        return e.into();
    }
    StoreError::bad_value(
        "meta",
        "value",
        meta::HISTORY_N.name(),
        "behind".into(),
        "a place in history was handed out twice (the counter of places went back); restore the store from a backup",
    )
}

/// What a version's rows and audit entry say of it in text: its vector as JSON, and
/// the audit entry's record, short hash and detail (`origin=<node> vv=<vector>`).
/// Made from the version alone, so a push makes it on its checking thread, off the
/// thread that holds the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VersionText {
    vv: String,
    record: String,
    hash: String,
    detail: String,
}

impl VersionText {
    pub(crate) fn of(v: &Version) -> VersionText {
        VersionText {
            vv: v.vv.to_json(),
            record: v.key().to_string(),
            hash: v.snapshot.hash.short(),
            detail: format!("origin={} vv={}", v.origin, v.vv),
        }
    }

    /// True when this is the text of `v` (checked in debug builds when written).
    fn describes(&self, v: &Version) -> bool {
        VersionText::of(v) == *self
    }
}

impl Store {
    pub fn current(&self, key: &RecordKey) -> Result<Option<Stored>> {
        current_in(&self.conn, key)
    }

    pub fn list(&self, kind: Option<&str>) -> Result<Vec<Stored>> {
        let sql = format!(
            "SELECT {REPLICA_COLS} FROM replica WHERE (?1 IS NULL OR kind = ?1) ORDER BY kind, id"
        );
        stored_rows(&mut self.conn.prepare(&sql)?, params![kind])
    }

    /// Every version of `key` this node has seen, oldest first, with the top-level
    /// fields each changed against the one before it.
    pub fn history(&self, key: &RecordKey) -> Result<Vec<HistoryEntry>> {
        let mut stmt = self.conn.prepare(
            "SELECT seen_ms, origin, source, outcome, vv, hlc_wall, hlc_ctr, hash, deleted, body
             FROM history WHERE kind=?1 AND id=?2 ORDER BY n",
        )?;
        let mut rows = stmt.query(params![key.kind, key.id])?;
        let mut out = Vec::new();
        let mut prev = serde_json::Value::Null;
        while let Some(r) = rows.next()? {
            let hash: Vec<u8> = r.get(7)?;
            let body: Vec<u8> = r.get(9)?;
            let cur: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| StoreError::bad_value("history", "body", key, shown_blob(&body), e))?;
            out.push(HistoryEntry {
                seen_ms: r.get::<_, i64>(0)? as u64,
                origin: r.get(1)?,
                source: r.get(2)?,
                outcome: VersionOutcome::decode(
                    "history",
                    "outcome",
                    key,
                    &r.get::<_, String>(3)?,
                )?,
                vv: r.get(4)?,
                hlc: Hlc {
                    wall_ms: r.get::<_, i64>(5)? as u64,
                    counter: r.get::<_, i64>(6)? as u32,
                }
                .to_string(),
                hash: parse_hash("history", key, &hash)?.short(),
                deleted: r.get(8)?,
                changed: crate::model::changed_fields(&prev, &cur),
                body,
            });
            prev = cur;
        }
        Ok(out)
    }

    /// Records of one patient (for on-demand fetch and tests).
    pub fn patient_records(&self, patient: &str) -> Result<Vec<Stored>> {
        let sql = format!("SELECT {REPLICA_COLS} FROM replica WHERE patient=?1 ORDER BY seq");
        stored_rows(&mut self.conn.prepare(&sql)?, [patient])
    }

    /// True when this node holds no version it wrote itself (new or wiped).
    pub fn holds_nothing_own(&self) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM replica WHERE origin=?1 LIMIT 1",
                [&self.node_id],
                |_| Ok(()),
            )
            .optional()?
            .is_none())
    }

    /// The live records of `patient` and the metadata (`None`): their bodies, for a
    /// catchment preview.
    pub fn bodies(&self, patient: Option<&str>, mut f: impl FnMut(&[u8])) -> Result<u64> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT body FROM replica WHERE deleted=0 AND ((?1 IS NULL AND class='metadata') OR patient=?1)",
        )?;
        let mut rows = stmt.query([patient])?;
        let mut n = 0;
        while let Some(r) = rows.next()? {
            let b: Vec<u8> = r.get(0)?;
            f(&b);
            n += 1;
        }
        Ok(n)
    }

    /// The last change sequence handed out (0: none yet).
    pub fn head_seq(&self) -> Result<u64> {
        Ok(self.meta(&meta::SEQ)?.unwrap_or(0))
    }

    /// Replica records changed after `seq` (a hub's records not yet offered to its
    /// EMR, counted for `status`).
    pub fn count_changed_after(&self, seq: u64) -> Result<u64> {
        Ok(self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM replica WHERE seq > ?1")?
            .query_row(params![seq as i64], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Replica records changed after `seq`, in change order: (seq, key).
    pub fn changed_after(&self, seq: u64, limit: usize) -> Result<Vec<(u64, RecordKey)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, kind, id FROM replica WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![seq as i64, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                RecordKey {
                    kind: r.get(1)?,
                    id: r.get(2)?,
                },
            ))
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }
}

impl Tx<'_> {
    pub fn current(&self, key: &RecordKey) -> Result<Option<Stored>> {
        self.with_hot(Hot::Current, |stmt| {
            Ok(stored_rows(stmt, params![key.kind, key.id])?.pop())
        })
    }

    /// Makes `v` the current version of its record, adds it to history and writes
    /// its audit entry, all in this transaction: the one way a version reaches the
    /// replica, so none does without its history row and audit entry.
    ///
    /// `source` names who wrote it (the audit actor and history source: `local`,
    /// `pull:<parent>`, `push:<child>`, a person); `sender` is the child it was
    /// pushed by (that child's pulls leave it out), else `None`. The audit entry is
    /// `write` (or `delete` for a tombstone) of the record with the version's short
    /// hash and `origin=<node> vv=<vector>`. Returns the record's new change sequence.
    pub fn write_version(
        &mut self,
        v: &Version,
        source: &str,
        sender: Option<&str>,
        outcome: VersionOutcome,
        now_ms: u64,
    ) -> Result<u64> {
        self.write_described(v, &VersionText::of(v), source, sender, outcome, now_ms)
    }

    /// [`Tx::write_version`] with the version's text made beforehand (a push makes
    /// it on its checking thread, with the version, in one `engine::Ready`). `text`
    /// must be `VersionText::of(v)`: crate-private so that its one caller is the
    /// push path, and checked in every debug build (the tests).
    pub(crate) fn write_described(
        &mut self,
        v: &Version,
        text: &VersionText,
        source: &str,
        sender: Option<&str>,
        outcome: VersionOutcome,
        now_ms: u64,
    ) -> Result<u64> {
        debug_assert!(text.describes(v), "a version written with another's text");
        let seq = self.put_current(v, &text.vv, sender, (source, outcome), now_ms)?;
        let action = if v.deleted { "delete" } else { "write" };
        self.audit(
            now_ms,
            source,
            action,
            &text.record,
            &text.hash,
            &text.detail,
        )?;
        Ok(seq)
    }

    /// Adds `v` to history without making it current: a stale copy, or the incoming
    /// side of a conflict (the conflict has its own audit entry). Returns whether
    /// this exact version was new here.
    pub fn remember_unkept(
        &mut self,
        v: &Version,
        source: &str,
        why: Unkept,
        now_ms: u64,
    ) -> Result<bool> {
        let outcome = match why {
            Unkept::Stale => VersionOutcome::Stale,
            Unkept::Conflict => VersionOutcome::Conflict,
        };
        self.remember(v, source, outcome, now_ms)
    }

    /// Makes `v` the current version of its record, with a new change sequence and
    /// the next place in history (only through [`Tx::write_version`]); `seen` is its
    /// history row's source and outcome.
    /// `vv` is `v.vv` as JSON, made on the checking thread for a push.
    fn put_current(
        &mut self,
        v: &Version,
        vv: &str,
        sender: Option<&str>,
        seen: (&str, VersionOutcome),
        now_ms: u64,
    ) -> Result<u64> {
        let seq = self.next_seq()?;
        let hn = self.next_history_n()?;
        let s = &v.snapshot;
        let row = params![
            s.key.kind,
            s.key.id,
            seq as i64,
            &s.hash.0[..],
            v.origin,
            v.hlc.wall_ms as i64,
            v.hlc.counter as i64,
            vv,
            v.deleted,
            s.class.as_str(),
            s.patient,
            s.body,
            now_ms as i64,
            sender,
            hn as i64,
            seen.0,
            seen.1.as_str()
        ];
        let inserted = self.with_hot(Hot::InsertReplica, |stmt| Ok(stmt.execute(row)?))?;
        if inserted == 0 {
            // The trigger moves the version it replaces into `versions` at its place.
            self.with_hot(Hot::UpdateReplica, |stmt| {
                stmt.execute(row).map_err(place_taken_twice)
            })?;
        }
        Ok(seq)
    }

    /// Adds `v` to the record's history (no-op if this exact version was seen before).
    fn remember(
        &mut self,
        v: &Version,
        source: &str,
        outcome: VersionOutcome,
        now_ms: u64,
    ) -> Result<bool> {
        let s = &v.snapshot;
        let vv = v.vv.to_json();
        // A place not taken (a version seen before) is a gap in the numbering, no
        // more.
        let place = self.next_history_n()?;
        let n = self.with_hot(Hot::InsertVersion, |stmt| {
            stmt.execute(params![
                place as i64,
                s.key.kind,
                s.key.id,
                &s.hash.0[..],
                v.origin,
                v.hlc.wall_ms as i64,
                v.hlc.counter as i64,
                vv,
                v.deleted,
                s.body,
                now_ms as i64,
                source,
                outcome.as_str()
            ])
            .map_err(place_taken_twice)
        })?;
        Ok(n > 0)
    }

    /// Finds a version in history by its vector (the common ancestor of a conflict).
    pub fn version_by_vv(&self, key: &RecordKey, vv: &VersionVector) -> Result<Option<Version>> {
        let row = self
            .tx
            .prepare_cached(
                "SELECT origin, hlc_wall, hlc_ctr, deleted, body FROM history
                 WHERE kind=?1 AND id=?2 AND vv=?3 ORDER BY n LIMIT 1",
            )?
            .query_row(params![key.kind, key.id, vv.to_json()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, bool>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                ))
            })
            .optional()?;
        let Some((origin, wall, ctr, deleted, body)) = row else {
            return Ok(None);
        };
        let snapshot = Snapshot::for_key(key, &body)
            .map_err(|e| StoreError::bad_value("history", "body", key, shown_blob(&body), e))?;
        Ok(Some(Version {
            snapshot,
            origin,
            hlc: Hlc {
                wall_ms: wall as u64,
                counter: ctr as u32,
            },
            vv: vv.clone(),
            deleted,
        }))
    }

    /// The node's clock after a local event at `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Result<Hlc> {
        let last = self.last_hlc()?;
        let h = Hlc::tick(last, now_ms);
        self.hlc = Some(h);
        Ok(h)
    }

    /// This node's clock ran far ahead of the wall clock (a clock that was fast and is
    /// now set right): put it back to `now_ms`, and re-stamp this node's own versions
    /// still waiting to be pushed whose stamps are more than `limit_ms` ahead — no
    /// peer has them yet, so their stamp is this node's to change, and a parent
    /// refuses records stamped too far ahead. Returns the re-stamped records.
    /// Versions already pushed keep their stamps.
    pub fn rebase_clock(&mut self, now_ms: u64, limit_ms: u64) -> Result<Vec<RecordKey>> {
        let last = self.last_hlc()?;
        if last.wall_ms <= now_ms.saturating_add(limit_ms) {
            return Ok(Vec::new());
        }
        self.hlc = Some(Hlc {
            wall_ms: now_ms,
            counter: 0,
        });
        let ahead: Vec<(RecordKey, String, Vec<u8>)> = self
            .tx
            .prepare_cached(
                "SELECT r.kind, r.id, r.vv, r.hash FROM outbox o JOIN replica r ON r.kind=o.kind AND r.id=o.id
                 WHERE r.origin=?1 AND r.hlc_wall > ?2",
            )?
            .query_map(
                params![self.node_id, now_ms.saturating_add(limit_ms) as i64],
                |r| {
                    Ok((
                        RecordKey {
                            kind: r.get(0)?,
                            id: r.get(1)?,
                        },
                        r.get::<_, String>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                },
            )?
            .collect::<std::result::Result<_, _>>()?;
        let mut out = Vec::new();
        for (key, vv, hash) in ahead {
            let h = self.tick(now_ms)?;
            self.tx
                .prepare_cached(
                    "UPDATE replica SET hlc_wall=?3, hlc_ctr=?4 WHERE kind=?1 AND id=?2",
                )?
                .execute(params![
                    key.kind,
                    key.id,
                    h.wall_ms as i64,
                    h.counter as i64
                ])?;
            self.tx
                .prepare_cached(
                    "UPDATE versions SET hlc_wall=?5, hlc_ctr=?6 WHERE kind=?1 AND id=?2 AND vv=?3 AND hash=?4",
                )?
                .execute(params![key.kind, key.id, vv, hash, h.wall_ms as i64, h.counter as i64])?;
            self.tx
                .prepare_cached(
                    "UPDATE quarantine SET next_retry_ms=?3 WHERE kind=?1 AND id=?2 AND stage='push'",
                )?
                .execute(params![key.kind, key.id, now_ms as i64])?;
            out.push(key);
        }
        Ok(out)
    }

    /// Moves the node's clock past a stamp received from a peer.
    pub fn observe(&mut self, remote: Hlc, now_ms: u64) -> Result<()> {
        let last = self.last_hlc()?;
        if remote > last {
            self.hlc = Some(Hlc::observe(last, remote, now_ms));
        }
        Ok(())
    }

    fn last_hlc(&mut self) -> Result<Hlc> {
        if let Some(h) = self.hlc {
            return Ok(h);
        }
        // Never ticked: the clock starts at zero (a bad stored clock is corruption).
        let h = self.meta(&meta::HLC)?.unwrap_or_default();
        self.hlc = Some(h);
        Ok(h)
    }

    /// Child: removes a patient's records that have nothing left to push (after a
    /// move, by the parent's order). Returns (purged, kept because not yet pushed).
    pub fn purge_patient(&mut self, patient: &str) -> Result<(u64, u64)> {
        let keys: Vec<(String, String)> = self
            .tx
            .prepare_cached("SELECT kind, id FROM replica WHERE patient=?1")?
            .query_map([patient], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<std::result::Result<_, _>>()?;
        let (mut purged, mut kept) = (0, 0);
        for (kind, id) in keys {
            let pending: bool = self
                .tx
                .prepare_cached(
                    "SELECT EXISTS(SELECT 1 FROM outbox WHERE kind=?1 AND id=?2)
                         OR EXISTS(SELECT 1 FROM quarantine WHERE kind=?1 AND id=?2)",
                )?
                .query_row([&kind, &id], |r| r.get(0))?;
            if pending {
                kept += 1;
                continue;
            }
            self.tx
                .prepare_cached("DELETE FROM replica WHERE kind=?1 AND id=?2")?
                .execute([&kind, &id])
                .map_err(place_taken_twice)?;
            for sql in [
                "DELETE FROM versions WHERE kind=?1 AND id=?2",
                "DELETE FROM inbox WHERE kind=?1 AND id=?2",
                "DELETE FROM emr_state WHERE kind=?1 AND id=?2",
            ] {
                self.tx.prepare_cached(sql)?.execute([&kind, &id])?;
            }
            purged += 1;
        }
        Ok((purged, kept))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{temp_store, test_version};
    use serde_json::json;

    fn holding_p1() -> (tempfile::TempDir, Store, Version) {
        let (dir, mut store) = temp_store("a");
        let v = test_version("a", json!({"resourceType": "Patient", "id": "p1"}));
        let mut tx = store.begin().unwrap();
        tx.write_version(&v, "local", None, VersionOutcome::Written, 1)
            .unwrap();
        tx.commit().unwrap();
        (dir, store, v)
    }

    #[test]
    fn a_replica_hash_that_is_not_32_bytes_is_corruption_naming_table_column_and_value() {
        let (_d, store, v) = holding_p1();
        store
            .conn()
            .execute("UPDATE replica SET hash=x'0102'", [])
            .unwrap();
        let err = store.current(v.key()).unwrap_err();
        assert!(err.is_corruption() && !err.is_retryable(), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("replica.hash")
                && text.contains("Patient/p1")
                && text.contains("x'0102'"),
            "{text}"
        );
        assert!(store.list(None).unwrap_err().is_corruption());
    }

    #[test]
    fn an_unknown_class_or_vector_in_the_replica_is_corruption_not_a_default() {
        let (_d, store, v) = holding_p1();
        store
            .conn()
            .execute("UPDATE replica SET class='secret'", [])
            .unwrap();
        let err = store.current(v.key()).unwrap_err();
        assert!(
            err.is_corruption()
                && err
                    .to_string()
                    .contains(r#"replica.class of Patient/p1 holds "secret""#),
            "{err}"
        );
        store
            .conn()
            .execute("UPDATE replica SET class='clinical', vv='{\"a\":'", [])
            .unwrap();
        let err = store.current(v.key()).unwrap_err();
        assert!(
            err.is_corruption() && err.to_string().contains("replica.vv"),
            "{err}"
        );
    }

    #[test]
    fn a_replica_body_changed_under_its_hash_is_corruption_not_served() {
        let (_d, store, v) = holding_p1();
        assert!(store.current(v.key()).unwrap().is_some());
        // Still JSON, still a Patient: only the hash can tell.
        store
            .conn()
            .execute(
                "UPDATE replica SET body=CAST(replace(CAST(body AS TEXT), 'p1', 'p1') || ' ' AS BLOB)",
                [],
            )
            .unwrap();
        let err = store.current(v.key()).unwrap_err();
        assert!(
            err.is_corruption()
                && err.to_string().contains("replica.body of Patient/p1")
                && err.to_string().contains("does not match its hash"),
            "{err}"
        );
        assert!(store.list(None).unwrap_err().is_corruption());
    }

    #[test]
    fn a_history_body_or_hash_that_does_not_decode_is_corruption() {
        let (_d, mut store, v) = holding_p1();
        let mut tx = store.begin().unwrap();
        tx.write_version(
            &edited(&v, "a", "Achieng", 2),
            "local",
            None,
            VersionOutcome::Written,
            2,
        )
        .unwrap();
        tx.commit().unwrap();
        assert_eq!(store.history(v.key()).unwrap().len(), 2);
        // In `versions` (the version before) and in the replica (the current one).
        for table in ["versions", "replica"] {
            store
                .conn()
                .execute_batch(&format!("SAVEPOINT s; UPDATE {table} SET body=x'7b22'"))
                .unwrap();
            let err = store.history(v.key()).unwrap_err();
            assert!(
                err.is_corruption() && err.to_string().contains("history.body of Patient/p1"),
                "{table}: {err}"
            );
            store
                .conn()
                .execute_batch(&format!("ROLLBACK TO s; UPDATE {table} SET hash=x''; "))
                .unwrap();
            let err = store.history(v.key()).unwrap_err();
            assert!(
                err.is_corruption() && err.to_string().contains("history.hash of Patient/p1"),
                "{table}: {err}"
            );
            store
                .conn()
                .execute_batch("ROLLBACK TO s; RELEASE s")
                .unwrap();
        }
        assert_eq!(store.history(v.key()).unwrap().len(), 2);
    }

    /// `key`'s rows in `versions`: (place, outcome), in order.
    fn stored_history(store: &Store, key: &RecordKey) -> Vec<(i64, String)> {
        store
            .conn()
            .prepare("SELECT n, outcome FROM versions WHERE kind=?1 AND id=?2 ORDER BY n")
            .unwrap()
            .query_map(params![key.kind, key.id], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<std::result::Result<_, _>>()
            .unwrap()
    }

    fn edited(v: &Version, node: &str, name: &str, wall_ms: u64) -> Version {
        let mut next = v.clone();
        next.snapshot = Snapshot::from_json_value(
            json!({"resourceType": "Patient", "id": "p1", "name": [{"text": name}]}),
        )
        .unwrap();
        next.vv = v.vv.bumped(node);
        next.hlc.wall_ms = wall_ms;
        next
    }

    /// A counter gone back behind a current version's place only (a write does not
    /// scan the replica for it): the version later moved into `versions` finds its
    /// place taken, and the write fails as corruption naming the counter, not as a
    /// database error, with nothing written.
    #[test]
    fn a_history_place_taken_twice_fails_the_write_naming_the_counter() {
        let (_d, mut store, v1) = holding_p1();
        let key = v1.key().clone();
        let write = |store: &mut Store, v: &Version| {
            let mut tx = store.begin().unwrap();
            tx.write_version(v, "local", None, VersionOutcome::Written, 2)?;
            tx.commit()
        };
        // p1 is current at place 1, `versions` is empty; the counter goes back to 0.
        store
            .conn()
            .execute("UPDATE meta SET value='0' WHERE key='history_n'", [])
            .unwrap();
        let v2 = edited(&v1, "a", "Two", 2);
        write(&mut store, &v2).unwrap();
        // v1 went into `versions` at 1, and v2 took place 1 again: the next write
        // moves v2 there.
        let err = write(&mut store, &edited(&v2, "a", "Three", 3)).unwrap_err();
        assert!(
            err.is_corruption() && err.to_string().contains("meta.value of history_n"),
            "{err}"
        );
        let names: Vec<String> = store
            .history(&key)
            .unwrap()
            .into_iter()
            .map(|h| String::from_utf8(h.body).unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(store.check_history_places().is_err());
    }

    #[test]
    fn a_body_is_stored_once_and_every_version_still_reads_back_whole() {
        let (_d, mut store, v1) = holding_p1();
        let key = v1.key().clone();
        // A record written once has no row in `versions`: its replica row is its
        // history.
        assert!(stored_history(&store, &key).is_empty());
        assert_eq!(store.history(&key).unwrap().len(), 1);
        let v2 = edited(&v1, "a", "Achieng", 2);
        let v3 = edited(&v2, "a", "Achieng Otieno", 3);
        // A stale copy (history only) keeps its own body, current or not.
        let mut stale = edited(&v1, "b", "Old", 2);
        stale.origin = "b".into();
        let mut tx = store.begin().unwrap();
        tx.write_version(&v2, "local", None, VersionOutcome::Written, 2)
            .unwrap();
        tx.remember_unkept(&stale, "push:b", Unkept::Stale, 2)
            .unwrap();
        tx.write_version(&v3, "local", None, VersionOutcome::Written, 3)
            .unwrap();
        tx.commit().unwrap();
        // v1 and v2 moved into `versions` at the places they took when written: the
        // stale copy, seen while v2 was current, sits between them and v3.
        let rows = stored_history(&store, &key);
        assert_eq!(
            rows,
            [
                (1, "written".into()),
                (2, "written".into()),
                (3, "stale".into())
            ]
        );
        let bodies: Vec<Vec<u8>> = store
            .history(&key)
            .unwrap()
            .into_iter()
            .map(|h| h.body)
            .collect();
        assert_eq!(
            bodies,
            [&v1, &v2, &stale, &v3].map(|v| v.snapshot.body.clone())
        );
        // An ancestor found by its vector, whether it moved into history or is current.
        let tx = store.begin().unwrap();
        for v in [&v1, &v3] {
            let found = tx.version_by_vv(&key, &v.vv).unwrap().unwrap();
            assert_eq!(found.snapshot.body, v.snapshot.body);
        }
    }

    #[test]
    fn the_same_version_written_again_or_a_record_purged_loses_no_body() {
        let (_d, mut store, v1) = holding_p1();
        let key = v1.key().clone();
        // Written again as it is (an idempotent re-delivery): the row keeps a body,
        // its own or the replica's, and reads back.
        let mut tx = store.begin().unwrap();
        tx.write_version(&v1, "local", None, VersionOutcome::Written, 2)
            .unwrap();
        tx.commit().unwrap();
        assert_eq!(store.history(&key).unwrap()[0].body, v1.snapshot.body);
        // The replica row deleted alone (what no path does but purge, which deletes
        // history too): the trigger keeps the body in history first.
        store
            .conn()
            .execute("DELETE FROM replica WHERE kind='Patient' AND id='p1'", [])
            .unwrap();
        assert_eq!(store.history(&key).unwrap()[0].body, v1.snapshot.body);
        // Purged: nothing of the record is left.
        let v = test_version("a", json!({"resourceType": "Patient", "id": "p2"}));
        let mut tx = store.begin().unwrap();
        tx.write_version(&v, "local", None, VersionOutcome::Written, 3)
            .unwrap();
        assert_eq!(tx.purge_patient("p2").unwrap(), (1, 0));
        tx.commit().unwrap();
        assert!(store.history(v.key()).unwrap().is_empty());
    }

    #[test]
    fn a_history_counter_behind_history_is_corruption_named_never_a_reordered_history() {
        // The counter of places in history, damaged or restored alone from an older
        // copy: a write refuses to use it, naming it, and leaves nothing written.
        let (_d, mut store, v1) = holding_p1();
        let key = v1.key().clone();
        let v2 = edited(&v1, "a", "Achieng", 2);
        let mut tx = store.begin().unwrap();
        tx.write_version(&v2, "local", None, VersionOutcome::Written, 2)
            .unwrap();
        tx.commit().unwrap();
        // v1 moved into `versions` at place 1, v2 is current at place 2.
        let mut stale = edited(&v1, "b", "Old", 2);
        stale.origin = "b".into();
        let set = |store: &Store, sql: &str| store.conn().execute(sql, []).unwrap();
        for (damage, writes_fail) in [
            ("UPDATE meta SET value='0' WHERE key='history_n'", true),
            ("DELETE FROM meta WHERE key='history_n'", true),
            // Behind only the current version's place: a write cannot see it
            // cheaply (the places of current versions are a scan), `doctor` does.
            ("UPDATE meta SET value='1' WHERE key='history_n'", false),
            // Beyond what an integer column holds (it would wrap to a negative
            // place and list the next version first), or not text at all.
            (
                "UPDATE meta SET value='9223372036854775808' WHERE key='history_n'",
                true,
            ),
            (
                "UPDATE meta SET value='18446744073709551615' WHERE key='history_n'",
                true,
            ),
            ("UPDATE meta SET value=x'00' WHERE key='history_n'", true),
        ] {
            set(&store, damage);
            let err = store.check_history_places().unwrap_err();
            assert!(
                err.is_corruption() && err.to_string().contains("meta.value of history_n"),
                "{damage}: {err}"
            );
            assert_eq!(store.check_values().is_err(), writes_fail, "{damage}");
            // Never committed: each case starts from the same store.
            let mut tx = store.begin().unwrap();
            let written = tx.remember_unkept(&stale, "push:b", Unkept::Stale, 3);
            drop(tx);
            match written {
                Err(err) => assert!(
                    writes_fail
                        && err.is_corruption()
                        && err.to_string().contains("meta.value of history_n"),
                    "{damage}: {err}"
                ),
                Ok(_) => assert!(!writes_fail, "{damage}"),
            }
            set(
                &store,
                "INSERT OR REPLACE INTO meta VALUES ('history_n', '2')",
            );
        }
        assert_eq!(store.check_history_places().unwrap(), 2);
        assert_eq!(store.history(&key).unwrap().len(), 2);
        // At SQLite's largest integer: it reads, and nothing is left to hand out.
        set(
            &store,
            "UPDATE meta SET value='9223372036854775807' WHERE key='history_n'",
        );
        let mut tx = store.begin().unwrap();
        let err = tx
            .remember_unkept(&stale, "push:b", Unkept::Stale, 3)
            .unwrap_err();
        drop(tx);
        assert!(
            err.is_corruption() && err.to_string().contains("meta.value of history_n"),
            "{err}"
        );
        assert_eq!(store.history(&key).unwrap().len(), 2);
    }

    #[test]
    fn an_unknown_history_outcome_is_corruption() {
        let (_d, store, v) = holding_p1();
        assert_eq!(
            store.history(v.key()).unwrap()[0].outcome,
            VersionOutcome::Written
        );
        store
            .conn()
            .execute("UPDATE replica SET outcome='kept'", [])
            .unwrap();
        let err = store.history(v.key()).unwrap_err();
        assert!(
            err.is_corruption()
                && err
                    .to_string()
                    .contains(r#"history.outcome of Patient/p1 holds "kept""#),
            "{err}"
        );
    }

    #[test]
    fn a_version_reaches_the_replica_only_with_its_history_row_and_audit_entry() {
        let (_d, mut store) = temp_store("hub");
        let v = test_version("a", json!({"resourceType": "Patient", "id": "p1"}));
        let mut tx = store.begin().unwrap();
        let seq = tx
            .write_version(&v, "push:a", Some("a"), VersionOutcome::Accepted, 5)
            .unwrap();
        let mut gone = v.clone();
        gone.deleted = true;
        gone.vv = v.vv.bumped("a");
        tx.write_version(&gone, "push:a", Some("a"), VersionOutcome::Accepted, 6)
            .unwrap();
        // A copy seen again is not stored twice; one not seen before goes to history
        // only: no replica change, no audit entry.
        assert!(!tx.remember_unkept(&v, "pull:up", Unkept::Stale, 7).unwrap());
        let mut other = v.clone();
        other.vv = VersionVector::default().bumped("b");
        assert!(tx
            .remember_unkept(&other, "pull:up", Unkept::Stale, 7)
            .unwrap());
        tx.commit().unwrap();
        let held = store.current(v.key()).unwrap().unwrap();
        assert!(held.seq > seq && held.version.deleted);
        let history = store.history(v.key()).unwrap();
        let outcomes: Vec<(VersionOutcome, &str)> = history
            .iter()
            .map(|e| (e.outcome, e.source.as_str()))
            .collect();
        assert_eq!(
            outcomes,
            [
                (VersionOutcome::Accepted, "push:a"),
                (VersionOutcome::Accepted, "push:a"),
                (VersionOutcome::Stale, "pull:up"),
            ]
        );
        let audit = store.audit_list(Some("Patient/p1"), None, 10).unwrap();
        let entries: Vec<(&str, &str, &str)> = audit
            .iter()
            .map(|a| (a.actor.as_str(), a.action.as_str(), a.detail.as_str()))
            .collect();
        assert_eq!(
            entries,
            [
                ("push:a", "delete", r#"origin=a vv={a:2}"#),
                ("push:a", "write", r#"origin=a vv={a:1}"#),
            ]
        );
        assert_eq!(audit[1].hash, v.snapshot.hash.short());
    }
}
