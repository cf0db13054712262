//! The durable store: one SQLite file per node, in WAL mode.
//!
//! Tables (see `MIGRATIONS` for the exact schema)
//! ```text
//! replica(kind, id, seq, hash, origin, hlc, vv, deleted, class, patient, body)
//!                 the latest version of every record this node holds; `seq` is this
//!                 node's change sequence and grows on every stored change
//! versions        every version this node has seen (history), bodies included
//! outbox(kind,id) records to push upstream; keyed by record so edits coalesce; the
//!                 content is whatever the replica holds when the batch is built
//! inbox(kind,id)  versions pulled from the parent, committed with the cursor, not yet
//!                 applied to the replica (latest snapshot per record)
//! quarantine      (record, stage) that failed, with reason, attempts, next retry
//! conflicts       both sides of every concurrent edit and how it was resolved
//! audit           append-only, hash-chained log of every change
//! cursors         per-parent pull position; peer_state: link health per peer
//! catchment       (child node, patient, seq at which the patient became visible)
//! meta            node id, hybrid clock, change sequence
//! ```
//!
//! Invariants
//! - Every state change that must survive a crash happens inside one [`Tx`] (an
//!   IMMEDIATE transaction, `synchronous=FULL`), so a power cut leaves the store
//!   either before or after the whole change. Callers answer a peer only after
//!   [`Tx::commit`] returned.
//! - `seq` values are unique and increasing across replica rows and catchment rows.
//! - Audit entry `n` stores `sha256(entry n-1 hash ‖ fields of n)`; [`Store::verify_audit`]
//!   recomputes the chain and names the first row that does not match.
//! - Migrations are only ever appended. A store written by a newer schema is refused.
//! - The file holds patient data: [`Store::open`] creates it 0600 (its `-wal` and
//!   `-shm` follow) in a 0750 directory if it must create one ([`crate::filemode`]).
//!
//! Errors: a failed statement rolls back the whole transaction (the `Tx` is dropped
//! without commit), leaving the store as it was. `Busy` is retryable; everything else
//! needs a person (disk full, corruption, a newer schema, the wrong node id).

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::model::{Class, ContentHash, Hlc, RecordKey, Snapshot, Version, VersionVector};
use crate::wire::Cursor;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store schema version {found} is newer than this clinicsync understands (up to {known}); install a newer clinicsync")]
    NewerSchema { found: i64, known: i64 },
    #[error("store belongs to node {stored:?} but the configuration says {configured:?}")]
    NodeMismatch { stored: String, configured: String },
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
            if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Schema migrations, applied in order. Only ever append.
const MIGRATIONS: &[&str] = &[
    // 1: the sync core
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE replica (
        kind TEXT NOT NULL, id TEXT NOT NULL,
        seq INTEGER NOT NULL UNIQUE,
        hash BLOB NOT NULL, origin TEXT NOT NULL,
        hlc_wall INTEGER NOT NULL, hlc_ctr INTEGER NOT NULL,
        vv TEXT NOT NULL, deleted INTEGER NOT NULL,
        class TEXT NOT NULL, patient TEXT,
        body BLOB NOT NULL, updated_ms INTEGER NOT NULL,
        PRIMARY KEY (kind, id)
    );
    CREATE INDEX replica_patient ON replica(patient, seq) WHERE patient IS NOT NULL;
    CREATE TABLE versions (
        n INTEGER PRIMARY KEY,
        kind TEXT NOT NULL, id TEXT NOT NULL,
        hash BLOB NOT NULL, origin TEXT NOT NULL,
        hlc_wall INTEGER NOT NULL, hlc_ctr INTEGER NOT NULL,
        vv TEXT NOT NULL, deleted INTEGER NOT NULL,
        body BLOB NOT NULL,
        seen_ms INTEGER NOT NULL, source TEXT NOT NULL, outcome TEXT NOT NULL,
        UNIQUE (kind, id, vv, hash)
    );
    CREATE TABLE outbox (
        kind TEXT NOT NULL, id TEXT NOT NULL,
        oseq INTEGER NOT NULL, enqueued_ms INTEGER NOT NULL,
        PRIMARY KEY (kind, id)
    );
    CREATE INDEX outbox_order ON outbox(oseq);
    CREATE TABLE inbox (
        kind TEXT NOT NULL, id TEXT NOT NULL,
        peer TEXT NOT NULL, origin TEXT NOT NULL,
        hlc_wall INTEGER NOT NULL, hlc_ctr INTEGER NOT NULL,
        vv TEXT NOT NULL, deleted INTEGER NOT NULL,
        body BLOB NOT NULL, received_ms INTEGER NOT NULL,
        PRIMARY KEY (kind, id)
    );
    CREATE TABLE quarantine (
        kind TEXT NOT NULL, id TEXT NOT NULL, stage TEXT NOT NULL,
        reason TEXT NOT NULL, permanent INTEGER NOT NULL,
        attempts INTEGER NOT NULL, first_ms INTEGER NOT NULL,
        last_ms INTEGER NOT NULL, next_retry_ms INTEGER NOT NULL,
        PRIMARY KEY (kind, id, stage)
    );
    CREATE TABLE conflicts (
        n INTEGER PRIMARY KEY,
        kind TEXT NOT NULL, id TEXT NOT NULL, detected_ms INTEGER NOT NULL,
        local_origin TEXT NOT NULL, local_vv TEXT NOT NULL, local_body BLOB NOT NULL,
        remote_origin TEXT NOT NULL, remote_vv TEXT NOT NULL, remote_body BLOB NOT NULL,
        resolution TEXT NOT NULL, result_vv TEXT NOT NULL
    );
    CREATE TABLE audit (
        n INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        record TEXT NOT NULL, hash TEXT NOT NULL, detail TEXT NOT NULL,
        prev BLOB NOT NULL, entry BLOB NOT NULL
    );
    CREATE TABLE cursors (
        peer TEXT PRIMARY KEY, eff INTEGER NOT NULL, seq INTEGER NOT NULL,
        head INTEGER NOT NULL, updated_ms INTEGER NOT NULL
    );
    CREATE TABLE peer_state (
        peer TEXT PRIMARY KEY,
        last_push_ok_ms INTEGER, last_pull_ok_ms INTEGER,
        last_error TEXT, last_error_ms INTEGER,
        bytes_sent INTEGER NOT NULL DEFAULT 0, bytes_received INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE catchment (
        node TEXT NOT NULL, patient TEXT NOT NULL,
        added_seq INTEGER NOT NULL, reason TEXT NOT NULL,
        PRIMARY KEY (node, patient)
    );
    CREATE INDEX catchment_added ON catchment(node, added_seq);
    "#,
    // 2: USB bundles — trusted node keys and imported bundles (replay, resume)
    r#"
    CREATE TABLE trusted_keys (
        node TEXT PRIMARY KEY, line TEXT NOT NULL,
        is_parent INTEGER NOT NULL, added_ms INTEGER NOT NULL
    );
    CREATE TABLE bundles_in (
        id TEXT PRIMARY KEY, sender TEXT NOT NULL, kind TEXT NOT NULL, seq INTEGER NOT NULL,
        items_done INTEGER NOT NULL, done INTEGER NOT NULL,
        started_ms INTEGER NOT NULL, finished_ms INTEGER
    );
    "#,
    // 3: external EMR — what the EMR holds for each record we wrote or captured
    // (echo suppression); the adapter's cursor lives in meta.
    r#"
    CREATE TABLE emr_state (
        kind TEXT NOT NULL, id TEXT NOT NULL,
        hash BLOB, gone INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
        PRIMARY KEY (kind, id)
    );
    "#,
    // 4: resumable chunked transfers (uploads received, answers to be fetched)
    r#"
    CREATE TABLE transfers (
        node TEXT NOT NULL, id BLOB NOT NULL, dir TEXT NOT NULL,
        total INTEGER NOT NULL, received INTEGER NOT NULL, created_ms INTEGER NOT NULL,
        PRIMARY KEY (node, id, dir)
    );
    CREATE TABLE transfer_chunks (
        node TEXT NOT NULL, id BLOB NOT NULL, dir TEXT NOT NULL,
        offset INTEGER NOT NULL, data BLOB NOT NULL,
        PRIMARY KEY (node, id, dir, offset)
    );
    "#,
    // 5: provenance — the child a version was pushed by (NULL: written here, pulled
    // from upstream, or a resolution). Pulls leave out what the asking child sent,
    // by this column, never by the `origin` a child claims. Rows from before keep
    // the old rule (their origin).
    r#"
    ALTER TABLE replica ADD COLUMN sender TEXT;
    UPDATE replica SET sender = origin;
    "#,
    // 6: a person's review of a conflict (`conflicts resolve`): when, and what was
    // kept. NULL: open (resolved by policy, not yet reviewed).
    r#"
    ALTER TABLE conflicts ADD COLUMN reviewed_ms INTEGER;
    ALTER TABLE conflicts ADD COLUMN review TEXT;
    "#,
    // 7: health reports of the nodes below a hub (`health`): the latest per node,
    // which child delivered it (`via`), when the nearest hub heard the node
    // (`heard_ms`) and when it arrived here (`received_ms`, for passing it up once).
    r#"
    CREATE TABLE health (
        node TEXT PRIMARY KEY, via TEXT NOT NULL,
        heard_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL,
        report TEXT NOT NULL
    );
    CREATE INDEX health_received ON health(received_ms);
    "#,
    // 8: remote orders (`crate::remote`): at a hub, those it gave (`orders_out`:
    // pending until the child's result comes back); at a child, those it ran
    // (`orders_in`: each once, its result kept until reported up).
    r#"
    CREATE TABLE orders_out (
        id TEXT PRIMARY KEY, node TEXT NOT NULL, kind TEXT NOT NULL,
        issued_ms INTEGER NOT NULL, state TEXT NOT NULL,
        result TEXT, done_ms INTEGER
    );
    CREATE INDEX orders_out_pending ON orders_out(node, state);
    CREATE TABLE orders_in (
        id TEXT PRIMARY KEY, by TEXT NOT NULL, kind TEXT NOT NULL,
        received_ms INTEGER NOT NULL, state TEXT NOT NULL, result TEXT NOT NULL,
        reported INTEGER NOT NULL
    );
    "#,
    // 9: conflicts this node's version lost at a peer (its parent's push answer said
    // so): the peer's name; '' for conflicts resolved here.
    r#"
    ALTER TABLE conflicts ADD COLUMN lost_at TEXT NOT NULL DEFAULT '';
    "#,
    // 10: the record a quarantined record waits for (`Kind/id`), so it is released
    // by that column when the blocker succeeds, not by matching its reason's text.
    // Rows from before take it from their "waiting for Kind/id: …" reason.
    r#"
    ALTER TABLE quarantine ADD COLUMN blocked_by TEXT;
    UPDATE quarantine SET blocked_by = substr(reason, 13, instr(reason, ': ') - 13)
      WHERE stage = 'apply' AND reason LIKE 'waiting for %: %';
    CREATE INDEX quarantine_blocked ON quarantine(blocked_by) WHERE blocked_by IS NOT NULL;
    "#,
    // 11: when a patient moved away from a node (`catchment move`): that node may
    // still push what it wrote before, nothing stamped after.
    r#"
    ALTER TABLE catchment ADD COLUMN moved_ms INTEGER;
    "#,
];

pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The largest record body clinicsync carries (canonical JSON). A larger one would
/// make every message it rides in too large for any hub; it is refused when written
/// and, if it is in the outbox already (captured from an EMR), quarantined instead of
/// sent (`Tx::quarantine_oversized`), so it never blocks the queue.
pub const MAX_RECORD_BYTES: usize = 16 << 20;

/// Longest quarantine reason kept, in characters.
pub const MAX_REASON_CHARS: usize = 2_000;

/// A stored version and where it sits in this node's change sequence.
#[derive(Debug, Clone)]
pub struct Stored {
    pub version: Version,
    pub seq: u64,
}

/// Where a quarantined record is stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The parent refused it on push.
    Push,
    /// It could not be applied locally after a pull.
    Apply,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Push => "push",
            Stage::Apply => "apply",
        }
    }
    fn parse(s: &str) -> Stage {
        if s == "apply" {
            Stage::Apply
        } else {
            Stage::Push
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct QuarantineEntry {
    pub record: String,
    pub stage: Stage,
    pub reason: String,
    pub permanent: bool,
    pub attempts: u32,
    pub first_ms: u64,
    pub last_ms: u64,
    pub next_retry_ms: u64,
}

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

/// An order a hub gave (`remote list`).
#[derive(Debug, Clone, Serialize)]
pub struct OrderRow {
    pub id: String,
    pub node: String,
    pub order: String,
    pub issued_ms: u64,
    pub state: String,
    pub result: Option<String>,
    pub done_ms: Option<u64>,
}

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

#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    pub seen_ms: u64,
    pub origin: String,
    pub source: String,
    pub outcome: String,
    pub vv: String,
    pub hlc: String,
    pub hash: String,
    pub deleted: bool,
    pub changed: Vec<String>,
    #[serde(skip)]
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerState {
    pub peer: String,
    pub last_push_ok_ms: Option<u64>,
    pub last_pull_ok_ms: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    pub records: u64,
    pub outbox: u64,
    pub inbox: u64,
    pub quarantine: u64,
    pub conflicts: u64,
    /// Of `conflicts`: this node's version lost at its parent.
    pub conflicts_lost: u64,
    pub audit: u64,
    pub head_seq: u64,
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditCheck {
    Intact { entries: u64, head: String },
    Broken { row: i64, problem: String },
}

/// One SQLite file holding everything a node knows.
pub struct Store {
    conn: Connection,
    node_id: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("node_id", &self.node_id)
            .finish()
    }
}

/// A stored health report; one that does not parse is corruption, not a default.
fn health_report(node: &str, text: &str) -> Result<crate::health::HealthReport> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("health report of {node}: {e}")))
}

fn now_hlc_key() -> &'static str {
    "hlc"
}

impl Store {
    /// Opens (creating if needed) the store at `path` for `node_id`, applying migrations.
    /// A new store file is created 0600 (and its directory 0750): see [`crate::filemode`].
    pub fn open(path: &Path, node_id: &str) -> Result<Store> {
        crate::filemode::prepare_store_file(path).map_err(|e| StoreError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let conn = Connection::open(path)?;
        Store::init(conn, node_id)
    }

    /// The file this store lives in (`None` for an in-memory store).
    pub fn path(&self) -> Option<PathBuf> {
        self.conn
            .path()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    }

    /// Opens an existing store without knowing its node id (CLI reads).
    pub fn open_existing(path: &Path) -> Result<Store> {
        if !path.exists() {
            return Err(StoreError::Corrupt(format!(
                "no store at {} (has the node run yet?)",
                path.display()
            )));
        }
        let conn = Connection::open(path)?;
        let node: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key='node_id'", [], |r| {
                r.get(0)
            })
            .optional()
            .unwrap_or(None);
        let node =
            node.ok_or_else(|| StoreError::Corrupt(format!("{} has no node id", path.display())))?;
        Store::init(conn, &node)
    }

    fn init(mut conn: Connection, node_id: &str) -> Result<Store> {
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "OFF")?;
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)",
            [],
        )?;
        let current: i64 = conn.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?;
        if current > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                found: current,
                known: SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations(version, applied_ms) VALUES (?1, ?2)",
                params![i as i64 + 1, wall_ms() as i64],
            )?;
            tx.commit()?;
        }
        let stored: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key='node_id'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match stored {
            Some(s) if s != node_id => {
                return Err(StoreError::NodeMismatch {
                    stored: s,
                    configured: node_id.to_string(),
                })
            }
            Some(_) => {}
            None => {
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('node_id', ?1)",
                    [node_id],
                )?;
            }
        }
        Ok(Store {
            conn,
            node_id: node_id.to_string(),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn schema_version(&self) -> Result<i64> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?)
    }

    /// Starts a write transaction. Dropping the `Tx` without commit rolls back.
    pub fn begin(&mut self) -> Result<Tx<'_>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        Ok(Tx {
            tx,
            node_id: &self.node_id,
            next_seq: None,
            audit_head: None,
            hlc: None,
        })
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn current(&self, key: &RecordKey) -> Result<Option<Stored>> {
        current_in(&self.conn, key)
    }

    pub fn list(&self, kind: Option<&str>) -> Result<Vec<Stored>> {
        let sql = format!(
            "SELECT {REPLICA_COLS} FROM replica WHERE (?1 IS NULL OR kind = ?1) ORDER BY kind, id"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(params![kind], stored_from_row)?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    pub fn counts(&self) -> Result<Counts> {
        let q = |sql: &str| -> Result<u64> {
            Ok(self.conn.query_row(sql, [], |r| r.get::<_, i64>(0))? as u64)
        };
        Ok(Counts {
            records: q("SELECT COUNT(*) FROM replica")?,
            outbox: q("SELECT COUNT(*) FROM outbox")?,
            inbox: q("SELECT COUNT(*) FROM inbox")?,
            quarantine: q("SELECT COUNT(*) FROM quarantine")?,
            conflicts: q("SELECT COUNT(*) FROM conflicts")?,
            conflicts_lost: q("SELECT COUNT(*) FROM conflicts WHERE lost_at != ''")?,
            audit: q("SELECT COUNT(*) FROM audit")?,
            head_seq: q(
                "SELECT COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key='seq'), 0)",
            )?,
        })
    }

    pub fn cursor(&self, peer: &str) -> Result<(Cursor, u64)> {
        Ok(self
            .conn
            .query_row(
                "SELECT eff, seq, head FROM cursors WHERE peer = ?1",
                [peer],
                |r| {
                    Ok((
                        Cursor {
                            eff: r.get::<_, i64>(0)? as u64,
                            seq: r.get::<_, i64>(1)? as u64,
                        },
                        r.get::<_, i64>(2)? as u64,
                    ))
                },
            )
            .optional()?
            .unwrap_or_default())
    }

    pub fn peer_state(&self, peer: &str) -> Result<PeerState> {
        Ok(self
            .conn
            .query_row(
                "SELECT last_push_ok_ms, last_pull_ok_ms, last_error, last_error_ms, bytes_sent, bytes_received FROM peer_state WHERE peer=?1",
                [peer],
                |r| {
                    Ok(PeerState {
                        peer: peer.to_string(),
                        last_push_ok_ms: r.get::<_, Option<i64>>(0)?.map(|v| v as u64),
                        last_pull_ok_ms: r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
                        last_error: r.get(2)?,
                        last_error_ms: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                        bytes_sent: r.get::<_, i64>(4)? as u64,
                        bytes_received: r.get::<_, i64>(5)? as u64,
                    })
                },
            )
            .optional()?
            .unwrap_or(PeerState {
                peer: peer.to_string(),
                ..PeerState::default()
            }))
    }

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

    pub fn quarantine_list(&self) -> Result<Vec<QuarantineEntry>> {
        let mut stmt = self.conn.prepare(
            "SELECT kind, id, stage, reason, permanent, attempts, first_ms, last_ms, next_retry_ms FROM quarantine ORDER BY first_ms, kind, id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(QuarantineEntry {
                record: format!("{}/{}", r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                stage: Stage::parse(&r.get::<_, String>(2)?),
                reason: r.get(3)?,
                permanent: r.get(4)?,
                attempts: r.get::<_, i64>(5)? as u32,
                first_ms: r.get::<_, i64>(6)? as u64,
                last_ms: r.get::<_, i64>(7)? as u64,
                next_retry_ms: r.get::<_, i64>(8)? as u64,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

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

    /// The most common quarantine reasons, most records first.
    pub fn quarantine_reasons(&self, limit: usize) -> Result<Vec<(String, u64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT reason, COUNT(*) AS c FROM quarantine GROUP BY reason ORDER BY c DESC, reason LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Conflicts no person has reviewed yet.
    pub fn open_conflicts(&self) -> Result<u64> {
        Ok(self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM conflicts WHERE reviewed_ms IS NULL")?
            .query_row([], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Health reports that arrived after `received_ms`, oldest arrival first, with
    /// their arrival time.
    pub fn health_received_after(
        &self,
        received_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, crate::health::HealthReport)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT node, received_ms, report FROM health WHERE received_ms > ?1 ORDER BY received_ms, node LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![received_ms as i64, limit as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, String>(2)?,
            ))
        })?;
        rows.map(|row| {
            let (node, at, text) = row?;
            Ok((at, health_report(&node, &text)?))
        })
        .collect()
    }

    /// Every node's latest health report with the child that delivered it.
    pub fn health_all(&self) -> Result<Vec<(String, crate::health::HealthReport)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT node, via, report FROM health ORDER BY node")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        rows.map(|row| {
            let (node, via, text) = row?;
            Ok((via, health_report(&node, &text)?))
        })
        .collect()
    }

    /// Hub: orders still waiting for `node`'s result, oldest first.
    pub fn pending_orders(&self, node: &str, limit: usize) -> Result<Vec<crate::remote::Order>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, issued_ms, kind FROM orders_out WHERE node=?1 AND state='pending' ORDER BY issued_ms, id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![node, limit as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, issued_ms, kind) = row?;
            let kind = serde_json::from_str(&kind)
                .map_err(|e| StoreError::Corrupt(format!("order {id}: {e}")))?;
            out.push(crate::remote::Order {
                id,
                issued_ms,
                by: self.node_id().to_string(),
                kind,
            });
        }
        Ok(out)
    }

    /// Hub: the orders given to `node` (all nodes: `None`), newest first.
    pub fn orders_out(&self, node: Option<&str>) -> Result<Vec<OrderRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, node, kind, issued_ms, state, result, done_ms FROM orders_out
             WHERE (?1 IS NULL OR node = ?1) ORDER BY issued_ms DESC, id",
        )?;
        let rows = stmt.query_map(params![node], |r| {
            Ok(OrderRow {
                id: r.get(0)?,
                node: r.get(1)?,
                order: r.get::<_, String>(2)?,
                issued_ms: r.get::<_, i64>(3)? as u64,
                state: r.get(4)?,
                result: r.get(5)?,
                done_ms: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
            })
        })?;
        let mut out: Vec<OrderRow> = rows.collect::<std::result::Result<_, _>>()?;
        for o in &mut out {
            if let Ok(k) = serde_json::from_str::<crate::remote::OrderKind>(&o.order) {
                o.order = k.describe();
            }
        }
        Ok(out)
    }

    /// Child: whether order `id` already ran here.
    pub fn order_in_seen(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM orders_in WHERE id=?1")?
            .query_row([id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Child: results not yet reported to the parent.
    pub fn order_results_unreported(
        &self,
        limit: usize,
    ) -> Result<Vec<crate::remote::OrderResult>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, state, result FROM orders_in WHERE reported=0 ORDER BY received_ms, id LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit as i64], |r| {
            Ok(crate::remote::OrderResult {
                id: r.get(0)?,
                state: r.get(1)?,
                detail: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    pub fn conflicts_list(
        &self,
        with_bodies: bool,
        record: Option<i64>,
    ) -> Result<Vec<ConflictEntry>> {
        let mut stmt = self.conn.prepare(
            "SELECT n, kind, id, detected_ms, local_origin, local_vv, remote_origin, remote_vv, resolution, result_vv, local_body, remote_body, reviewed_ms, review, lost_at
             FROM conflicts WHERE (?1 IS NULL OR n = ?1) ORDER BY n",
        )?;
        let rows = stmt.query_map(params![record], |r| {
            let body = |i: usize| -> rusqlite::Result<Option<serde_json::Value>> {
                if !with_bodies {
                    return Ok(None);
                }
                let b: Vec<u8> = r.get(i)?;
                Ok(serde_json::from_slice(&b).ok())
            };
            Ok(ConflictEntry {
                reviewed_ms: r.get::<_, Option<i64>>(12)?.map(|v| v as u64),
                review: r.get(13)?,
                n: r.get(0)?,
                record: format!("{}/{}", r.get::<_, String>(1)?, r.get::<_, String>(2)?),
                detected_ms: r.get::<_, i64>(3)? as u64,
                local_origin: r.get(4)?,
                local_vv: r.get(5)?,
                remote_origin: r.get(6)?,
                remote_vv: r.get(7)?,
                resolution: r.get(8)?,
                result_vv: r.get(9)?,
                local_body: body(10)?,
                remote_body: body(11)?,
                lost_at: r.get(14)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Every version of `key` this node has seen, oldest first, with the top-level
    /// fields each changed against the one before it.
    pub fn history(&self, key: &RecordKey) -> Result<Vec<HistoryEntry>> {
        let mut stmt = self.conn.prepare(
            "SELECT seen_ms, origin, source, outcome, vv, hlc_wall, hlc_ctr, hash, deleted, body FROM versions
             WHERE kind=?1 AND id=?2 ORDER BY n",
        )?;
        let rows = stmt.query_map(params![key.kind, key.id], |r| {
            let hash: Vec<u8> = r.get(7)?;
            Ok(HistoryEntry {
                seen_ms: r.get::<_, i64>(0)? as u64,
                origin: r.get(1)?,
                source: r.get(2)?,
                outcome: r.get(3)?,
                vv: r.get(4)?,
                hlc: Hlc {
                    wall_ms: r.get::<_, i64>(5)? as u64,
                    counter: r.get::<_, i64>(6)? as u32,
                }
                .to_string(),
                hash: hex::encode(&hash[..6.min(hash.len())]),
                deleted: r.get(8)?,
                changed: Vec::new(),
                body: r.get(9)?,
            })
        })?;
        let mut out: Vec<HistoryEntry> = rows.collect::<std::result::Result<_, _>>()?;
        let mut prev = serde_json::Value::Null;
        for e in &mut out {
            let cur: serde_json::Value =
                serde_json::from_slice(&e.body).unwrap_or(serde_json::Value::Null);
            e.changed = crate::model::changed_fields(&prev, &cur);
            prev = cur;
        }
        Ok(out)
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
            let fields = AuditFields {
                n,
                at_ms: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                record: r.get(4)?,
                hash: r.get(5)?,
                detail: r.get(6)?,
            };
            let computed = fields.entry_hash(&prev);
            if stored_entry != computed {
                return Ok(AuditCheck::Broken {
                    row: n,
                    problem: format!("row {n} was altered (its content does not match its hash)"),
                });
            }
            prev.copy_from_slice(&computed);
            expected_n += 1;
            count += 1;
        }
        Ok(AuditCheck::Intact {
            entries: count,
            head: hex::encode(prev),
        })
    }

    /// Records of one patient (for on-demand fetch and tests).
    pub fn patient_records(&self, patient: &str) -> Result<Vec<Stored>> {
        let sql = format!("SELECT {REPLICA_COLS} FROM replica WHERE patient=?1 ORDER BY seq");
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([patient], stored_from_row)?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
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

    /// (node, patient, reason) rows of the catchment, of one node or all.
    pub fn catchment_list(&self, node: Option<&str>) -> Result<Vec<(String, String, String)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT node, patient, reason FROM catchment WHERE ?1 IS NULL OR node=?1 ORDER BY node, patient",
        )?;
        let rows = stmt.query_map([node], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
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

    pub fn head_seq(&self) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key='seq'), 0)",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

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
                .map_err(|e| StoreError::Corrupt(format!("inbox row {key}: {e}")))?;
            out.push((
                peer,
                Version {
                    snapshot,
                    origin,
                    hlc: Hlc {
                        wall_ms: wall as u64,
                        counter: ctr as u32,
                    },
                    vv: parse_vv(&vv)?,
                    deleted,
                },
            ));
        }
        Ok(out)
    }

    /// The public key line trusted for `node`, and whether it is this node's parent.
    pub fn trusted(&self, node: &str) -> Result<Option<(String, bool)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT line, is_parent FROM trusted_keys WHERE node=?1",
                [node],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// The parent's node id and key line, if trusted.
    pub fn trusted_parent(&self) -> Result<Option<(String, String)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT node, line FROM trusted_keys WHERE is_parent=1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    pub fn trusted_list(&self) -> Result<Vec<(String, String, bool)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT node, line, is_parent FROM trusted_keys ORDER BY node")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

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

    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key=?1", [key], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    pub fn meta_str(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key=?1", [key], |r| r.get(0))
            .optional()?)
    }

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

    /// Reasons records wait in the apply quarantine, by key (for dependency blocking).
    pub fn apply_quarantine(&self, key: &RecordKey) -> Result<Option<String>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT reason FROM quarantine WHERE kind=?1 AND id=?2 AND stage='apply'",
            )?
            .query_row(params![key.kind, key.id], |r| r.get(0))
            .optional()?)
    }

    /// Records quarantined at the apply stage whose retry is due and that do not wait
    /// in the inbox (at a hub with an EMR: versions from children the EMR refused).
    pub fn apply_due_outside_inbox(&self, now_ms: u64, limit: usize) -> Result<Vec<RecordKey>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT q.kind, q.id FROM quarantine q
              WHERE q.stage='apply' AND q.next_retry_ms <= ?1
                AND NOT EXISTS (SELECT 1 FROM inbox i WHERE i.kind=q.kind AND i.id=q.id)
              ORDER BY q.next_retry_ms LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![now_ms as i64, limit as i64], |r| {
            Ok(RecordKey {
                kind: r.get(0)?,
                id: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Replica records changed after `seq`, in change order: (seq, key).
    /// Replica records changed after `seq` (a hub's records not yet offered to its
    /// EMR, counted for `status`).
    pub fn count_changed_after(&self, seq: u64) -> Result<u64> {
        Ok(self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM replica WHERE seq > ?1")?
            .query_row(params![seq as i64], |r| r.get::<_, i64>(0))? as u64)
    }

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

    pub fn integrity_check(&self) -> Result<String> {
        Ok(self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }
}

pub struct FeedPage {
    pub records: Vec<Stored>,
    pub next: Cursor,
    pub more: bool,
    /// The change sequence when the page was read.
    pub head: u64,
}

const REPLICA_COLS: &str =
    "kind, id, seq, hash, origin, hlc_wall, hlc_ctr, vv, deleted, class, patient, body";
const REPLICA_COLS_R: &str =
    "r.kind, r.id, r.seq, r.hash, r.origin, r.hlc_wall, r.hlc_ctr, r.vv, r.deleted, r.class, r.patient, r.body";

fn parse_vv(s: &str) -> Result<VersionVector> {
    VersionVector::from_json(s)
        .map_err(|e| StoreError::Corrupt(format!("bad version vector {s:?}: {e}")))
}

fn stored_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Stored> {
    let kind: String = r.get(0)?;
    let id: String = r.get(1)?;
    let hash: Vec<u8> = r.get(3)?;
    let vv: String = r.get(7)?;
    let class: String = r.get(9)?;
    let bad = |what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("{what} in replica row {kind}/{id}").into(),
        )
    };
    let snapshot = Snapshot {
        class: Class::parse(&class).ok_or_else(|| bad("bad class"))?,
        patient: r.get(10)?,
        body: r.get(11)?,
        hash: ContentHash::from_slice(&hash).ok_or_else(|| bad("bad hash"))?,
        key: RecordKey {
            kind: kind.clone(),
            id: id.clone(),
        },
    };
    Ok(Stored {
        seq: r.get::<_, i64>(2)? as u64,
        version: Version {
            snapshot,
            origin: r.get(4)?,
            hlc: Hlc {
                wall_ms: r.get::<_, i64>(5)? as u64,
                counter: r.get::<_, i64>(6)? as u32,
            },
            vv: VersionVector::from_json(&vv).map_err(|_| bad("bad version vector"))?,
            deleted: r.get(8)?,
        },
    })
}

fn current_in(conn: &Connection, key: &RecordKey) -> Result<Option<Stored>> {
    let sql = format!("SELECT {REPLICA_COLS} FROM replica WHERE kind=?1 AND id=?2");
    let mut stmt = conn.prepare_cached(&sql)?;
    Ok(stmt
        .query_row(params![key.kind, key.id], stored_from_row)
        .optional()?)
}

struct AuditFields {
    n: i64,
    at_ms: i64,
    actor: String,
    action: String,
    record: String,
    hash: String,
    detail: String,
}

impl AuditFields {
    fn entry_hash(&self, prev: &[u8; 32]) -> Vec<u8> {
        let mut h = Sha256::new();
        h.update(prev);
        h.update(self.n.to_be_bytes());
        h.update(self.at_ms.to_be_bytes());
        for field in [
            &self.actor,
            &self.action,
            &self.record,
            &self.hash,
            &self.detail,
        ] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
        h.finalize().to_vec()
    }
}

/// Milliseconds since the Unix epoch; only the edges (daemon, CLI) call this and pass
/// the value in.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One write transaction. Holds the change sequence, audit head and clock in memory
/// and writes them back on commit.
pub struct Tx<'a> {
    tx: Transaction<'a>,
    node_id: &'a str,
    next_seq: Option<u64>,
    audit_head: Option<(i64, [u8; 32])>,
    hlc: Option<Hlc>,
}

impl Tx<'_> {
    pub fn node_id(&self) -> &str {
        self.node_id
    }

    pub fn commit(mut self) -> Result<()> {
        if let Some(seq) = self.next_seq {
            self.set_meta("seq", &(seq - 1).to_string())?;
        }
        if let Some(h) = self.hlc {
            self.set_meta(now_hlc_key(), &format!("{} {}", h.wall_ms, h.counter))?;
        }
        self.tx.commit()?;
        Ok(())
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.tx
            .prepare_cached("INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value=excluded.value")?
            .execute([key, value])?;
        Ok(())
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .tx
            .prepare_cached("SELECT value FROM meta WHERE key=?1")?
            .query_row([key], |r| r.get(0))
            .optional()?)
    }

    /// How much of a transfer is held: (total, received).
    pub fn transfer_state(&self, t: &TransferKey<'_>) -> Result<Option<(u64, u64)>> {
        Ok(self
            .tx
            .prepare_cached(
                "SELECT total, received FROM transfers WHERE node=?1 AND id=?2 AND dir=?3",
            )?
            .query_row(params![t.node, &t.id[..], t.dir], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .optional()?)
    }

    /// Appends a chunk if it starts where the transfer stands; returns what is held
    /// afterwards (unchanged when the offset does not fit).
    pub fn transfer_append(
        &mut self,
        t: &TransferKey<'_>,
        total: u64,
        offset: u64,
        data: &[u8],
        now_ms: u64,
    ) -> Result<u64> {
        let received = match self.transfer_state(t)? {
            Some((_, r)) => r,
            None => {
                self.tx.execute(
                    "INSERT INTO transfers(node, id, dir, total, received, created_ms) VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                    params![t.node, &t.id[..], t.dir, total as i64, now_ms as i64],
                )?;
                0
            }
        };
        if offset != received || data.is_empty() || received + data.len() as u64 > total {
            return Ok(received);
        }
        self.tx
            .prepare_cached("INSERT INTO transfer_chunks(node, id, dir, offset, data) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![t.node, &t.id[..], t.dir, offset as i64, data])?;
        let now = received + data.len() as u64;
        self.tx
            .prepare_cached("UPDATE transfers SET received=?4 WHERE node=?1 AND id=?2 AND dir=?3")?
            .execute(params![t.node, &t.id[..], t.dir, now as i64])?;
        Ok(now)
    }

    /// The bytes of a transfer from `offset`, at most `max` of them.
    pub fn transfer_read(&self, t: &TransferKey<'_>, offset: u64, max: u64) -> Result<Vec<u8>> {
        let mut stmt = self.tx.prepare_cached(
            "SELECT offset, data FROM transfer_chunks WHERE node=?1 AND id=?2 AND dir=?3 ORDER BY offset",
        )?;
        let mut rows = stmt.query(params![t.node, &t.id[..], t.dir])?;
        let mut out = Vec::new();
        let end = offset.saturating_add(max);
        while let Some(r) = rows.next()? {
            let start = r.get::<_, i64>(0)? as u64;
            let data: Vec<u8> = r.get(1)?;
            let stop = start + data.len() as u64;
            if stop <= offset || start >= end {
                continue;
            }
            let from = offset.saturating_sub(start) as usize;
            let to = (end.min(stop) - start) as usize;
            out.extend_from_slice(&data[from..to]);
        }
        Ok(out)
    }

    /// Stores a whole answer for the node to fetch in chunks.
    pub fn transfer_store(
        &mut self,
        t: &TransferKey<'_>,
        bytes: &[u8],
        chunk: usize,
        now_ms: u64,
    ) -> Result<()> {
        if self.transfer_state(t)?.is_some() {
            return Ok(());
        }
        let mut offset = 0u64;
        for piece in bytes.chunks(chunk.max(1)) {
            offset = self.transfer_append(t, bytes.len() as u64, offset, piece, now_ms)?;
        }
        Ok(())
    }

    /// Forgets transfers started before `before_ms`.
    /// Forgets one transfer and its chunks.
    pub fn transfer_forget(&mut self, t: &TransferKey<'_>) -> Result<()> {
        for table in ["transfer_chunks", "transfers"] {
            self.tx.execute(
                &format!("DELETE FROM {table} WHERE node=?1 AND id=?2 AND dir=?3"),
                params![t.node, &t.id[..], t.dir],
            )?;
        }
        Ok(())
    }

    /// A node's transfers in one direction, oldest first: (id, bytes held).
    pub fn transfers_of(&self, node: &str, dir: &str) -> Result<Vec<([u8; 32], u64)>> {
        let mut stmt = self.tx.prepare_cached(
            "SELECT id, received FROM transfers WHERE node=?1 AND dir=?2 ORDER BY created_ms, rowid",
        )?;
        let rows = stmt.query_map([node, dir], |r| {
            let id: Vec<u8> = r.get(0)?;
            Ok((id, r.get::<_, i64>(1)? as u64))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, n) = row?;
            let id: [u8; 32] = id
                .try_into()
                .map_err(|_| StoreError::Corrupt("a transfer id is not 32 bytes".into()))?;
            out.push((id, n));
        }
        Ok(out)
    }

    /// Bytes held by all transfers of all nodes.
    pub fn transfer_bytes(&self) -> Result<u64> {
        Ok(self.tx.query_row(
            "SELECT COALESCE(SUM(received), 0) FROM transfers",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    pub fn transfer_gc(&mut self, before_ms: u64) -> Result<usize> {
        self.tx.execute(
            "DELETE FROM transfer_chunks WHERE (node, id, dir) IN (SELECT node, id, dir FROM transfers WHERE created_ms < ?1)",
            [before_ms as i64],
        )?;
        Ok(self.tx.execute(
            "DELETE FROM transfers WHERE created_ms < ?1",
            [before_ms as i64],
        )?)
    }

    pub fn meta_str(&self, key: &str) -> Result<Option<String>> {
        self.meta(key)
    }

    /// Files the bundles imported from `node` under its old key (`<node>@<fp>`), so
    /// the node's new incarnation starts its bundle sequence again.
    pub fn retire_bundles_of(&mut self, node: &str, old_fp: &str) -> Result<usize> {
        Ok(self.tx.execute(
            "UPDATE bundles_in SET sender = sender || '@' || ?2 WHERE sender = ?1",
            params![node, old_fp],
        )?)
    }

    pub fn set_meta_str(&mut self, key: &str, value: &str) -> Result<()> {
        self.set_meta(key, value)
    }

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

    /// Makes records blocked behind `key` due now.
    pub fn release_blocked_by(&mut self, key: &RecordKey, now_ms: u64) -> Result<usize> {
        Ok(self.tx.execute(
            "UPDATE quarantine SET next_retry_ms=?1 WHERE stage='apply' AND blocked_by=?2",
            params![now_ms as i64, key.to_string()],
        )?)
    }

    /// Quarantines (push stage, permanent) every queued record over
    /// [`MAX_RECORD_BYTES`] that is not already held there; returns them with sizes.
    pub fn quarantine_oversized(&mut self, now_ms: u64) -> Result<Vec<(RecordKey, u64)>> {
        let big: Vec<(RecordKey, u64)> = self
            .tx
            .prepare_cached(&format!(
                "SELECT o.kind, o.id, length(r.body) FROM outbox o JOIN replica r ON r.kind=o.kind AND r.id=o.id
                 WHERE length(r.body) > {MAX_RECORD_BYTES} AND NOT EXISTS (SELECT 1 FROM quarantine q
                   WHERE q.kind=o.kind AND q.id=o.id AND q.stage='push' AND q.next_retry_ms > ?1)"
            ))?
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

    /// Quarantines `key` (apply stage) until `dep` succeeds or `retry_ms` passes.
    pub fn quarantine_waiting(
        &mut self,
        key: &RecordKey,
        dep: &RecordKey,
        why: &str,
        now_ms: u64,
        retry_ms: u64,
    ) -> Result<u32> {
        let reason = format!(
            "waiting for {dep}: {}",
            why.trim_start_matches("waiting for ")
        );
        let n = self.quarantine(key, Stage::Apply, &reason, false, now_ms, |_| retry_ms)?;
        self.tx
            .prepare_cached(
                "UPDATE quarantine SET blocked_by=?3 WHERE kind=?1 AND id=?2 AND stage='apply'",
            )?
            .execute(params![key.kind, key.id, dep.to_string()])?;
        Ok(n)
    }

    pub fn set_meta_u64(&mut self, key: &str, value: u64) -> Result<()> {
        self.set_meta(key, &value.to_string())
    }

    pub fn trust(&mut self, node: &str, line: &str, is_parent: bool, now_ms: u64) -> Result<()> {
        if is_parent {
            self.tx
                .execute("UPDATE trusted_keys SET is_parent=0 WHERE node<>?1", [node])?;
        }
        self.tx.execute(
            "INSERT INTO trusted_keys(node, line, is_parent, added_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(node) DO UPDATE SET line=excluded.line, is_parent=excluded.is_parent, added_ms=excluded.added_ms",
            params![node, line, is_parent, now_ms as i64],
        )?;
        Ok(())
    }

    /// The key line trusted for `node` and whether it is the parent, read inside
    /// this transaction (so a key change is decided on what the write will replace).
    pub fn trusted(&self, node: &str) -> Result<Option<(String, bool)>> {
        Ok(self
            .tx
            .query_row(
                "SELECT line, is_parent FROM trusted_keys WHERE node=?1",
                [node],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Stops trusting `node`'s bundle keys; whether it was trusted.
    pub fn untrust(&mut self, node: &str) -> Result<bool> {
        Ok(self
            .tx
            .execute("DELETE FROM trusted_keys WHERE node=?1", [node])?
            > 0)
    }

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

    /// Allocates the next change sequence number.
    pub fn next_seq(&mut self) -> Result<u64> {
        let seq = match self.next_seq {
            Some(s) => s,
            None => {
                self.meta("seq")?
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
                    + 1
            }
        };
        self.next_seq = Some(seq + 1);
        Ok(seq)
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
        let h = self
            .meta(now_hlc_key())?
            .and_then(|v| {
                let (w, c) = v.split_once(' ')?;
                Some(Hlc {
                    wall_ms: w.parse().ok()?,
                    counter: c.parse().ok()?,
                })
            })
            .unwrap_or_default();
        self.hlc = Some(h);
        Ok(h)
    }

    pub fn current(&self, key: &RecordKey) -> Result<Option<Stored>> {
        current_in(&self.tx, key)
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

    /// Makes `v` the current version of its record, with a new change sequence.
    /// `sender` is the child it was pushed by (its pulls leave it out), else `None`.
    pub fn put_current(&mut self, v: &Version, sender: Option<&str>, now_ms: u64) -> Result<u64> {
        let seq = self.next_seq()?;
        let s = &v.snapshot;
        self.tx
            .prepare_cached(
                "INSERT INTO replica(kind, id, seq, hash, origin, hlc_wall, hlc_ctr, vv, deleted, class, patient, body, updated_ms, sender)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT(kind, id) DO UPDATE SET seq=excluded.seq, hash=excluded.hash, origin=excluded.origin,
                   hlc_wall=excluded.hlc_wall, hlc_ctr=excluded.hlc_ctr, vv=excluded.vv, deleted=excluded.deleted,
                   class=excluded.class, patient=excluded.patient, body=excluded.body, updated_ms=excluded.updated_ms,
                   sender=excluded.sender",
            )?
            .execute(params![
                s.key.kind,
                s.key.id,
                seq as i64,
                &s.hash.0[..],
                v.origin,
                v.hlc.wall_ms as i64,
                v.hlc.counter as i64,
                v.vv.to_json(),
                v.deleted,
                s.class.as_str(),
                s.patient,
                s.body,
                now_ms as i64,
                sender
            ])?;
        Ok(seq)
    }

    /// Adds `v` to the record's history (no-op if this exact version was seen before).
    pub fn remember(
        &mut self,
        v: &Version,
        source: &str,
        outcome: &str,
        now_ms: u64,
    ) -> Result<bool> {
        let s = &v.snapshot;
        let n = self
            .tx
            .prepare_cached(
                "INSERT OR IGNORE INTO versions(kind, id, hash, origin, hlc_wall, hlc_ctr, vv, deleted, body, seen_ms, source, outcome)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?
            .execute(params![
                s.key.kind,
                s.key.id,
                &s.hash.0[..],
                v.origin,
                v.hlc.wall_ms as i64,
                v.hlc.counter as i64,
                v.vv.to_json(),
                v.deleted,
                s.body,
                now_ms as i64,
                source,
                outcome
            ])?;
        Ok(n > 0)
    }

    /// Finds a version in history by its vector (the common ancestor of a conflict).
    pub fn version_by_vv(&self, key: &RecordKey, vv: &VersionVector) -> Result<Option<Version>> {
        let row = self
            .tx
            .prepare_cached(
                "SELECT origin, hlc_wall, hlc_ctr, deleted, body FROM versions WHERE kind=?1 AND id=?2 AND vv=?3 ORDER BY n LIMIT 1",
            )?
            .query_row(params![key.kind, key.id, vv.to_json()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, bool>(3)?, r.get::<_, Vec<u8>>(4)?))
            })
            .optional()?;
        let Some((origin, wall, ctr, deleted, body)) = row else {
            return Ok(None);
        };
        let snapshot = Snapshot::for_key(key, &body)
            .map_err(|e| StoreError::Corrupt(format!("history of {key}: {e}")))?;
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
            None => self
                .tx
                .prepare_cached("SELECT n, entry FROM audit ORDER BY n DESC LIMIT 1")?
                .query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
                .optional()?
                .map(|(n, e)| (n, <[u8; 32]>::try_from(e.as_slice()).unwrap_or([0; 32])))
                .unwrap_or((0, [0; 32])),
        };
        let fields = AuditFields {
            n: last_n + 1,
            at_ms: now_ms as i64,
            actor: actor.to_string(),
            action: action.to_string(),
            record: record.to_string(),
            hash: hash.to_string(),
            detail: detail.to_string(),
        };
        let entry = fields.entry_hash(&prev);
        self.tx
            .prepare_cached(
                "INSERT INTO audit(n, at_ms, actor, action, record, hash, detail, prev, entry) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![fields.n, fields.at_ms, actor, action, record, hash, detail, &prev[..], &entry])?;
        let mut head = [0u8; 32];
        head.copy_from_slice(&entry);
        self.audit_head = Some((fields.n, head));
        Ok(())
    }

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

    /// Puts a record in quarantine (or bumps its attempts), returning the attempt count.
    pub fn quarantine(
        &mut self,
        key: &RecordKey,
        stage: Stage,
        reason: &str,
        permanent: bool,
        now_ms: u64,
        retry_after_ms: impl Fn(u32) -> u64,
    ) -> Result<u32> {
        // An EMR's answer can be a whole error page or stack trace: keep the head.
        let clipped;
        let reason = if reason.chars().count() > MAX_REASON_CHARS {
            clipped = format!(
                "{}… ({} more characters)",
                reason.chars().take(MAX_REASON_CHARS).collect::<String>(),
                reason.chars().count() - MAX_REASON_CHARS
            );
            clipped.as_str()
        } else {
            reason
        };
        let attempts: u32 = self
            .tx
            .prepare_cached("SELECT attempts FROM quarantine WHERE kind=?1 AND id=?2 AND stage=?3")?
            .query_row(params![key.kind, key.id, stage.as_str()], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
            .unwrap_or(0) as u32
            + 1;
        let next = now_ms + retry_after_ms(attempts);
        self.tx
            .prepare_cached(
                "INSERT INTO quarantine(kind, id, stage, reason, permanent, attempts, first_ms, last_ms, next_retry_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8)
                 ON CONFLICT(kind, id, stage) DO UPDATE SET reason=excluded.reason, permanent=excluded.permanent,
                   attempts=excluded.attempts, last_ms=excluded.last_ms, next_retry_ms=excluded.next_retry_ms,
                   blocked_by=NULL",
            )?
            .execute(params![key.kind, key.id, stage.as_str(), reason, permanent, attempts as i64, now_ms as i64, next as i64])?;
        Ok(attempts)
    }

    pub fn release(&mut self, key: &RecordKey, stage: Stage) -> Result<bool> {
        Ok(self
            .tx
            .prepare_cached("DELETE FROM quarantine WHERE kind=?1 AND id=?2 AND stage=?3")?
            .execute(params![key.kind, key.id, stage.as_str()])?
            > 0)
    }

    /// Makes quarantined records due now. `None` means all of them.
    pub fn retry_now(&mut self, key: Option<&RecordKey>, now_ms: u64) -> Result<usize> {
        let n = match key {
            Some(k) => self.tx.execute(
                "UPDATE quarantine SET next_retry_ms=?3 WHERE kind=?1 AND id=?2",
                params![k.kind, k.id, now_ms as i64],
            )?,
            None => self.tx.execute(
                "UPDATE quarantine SET next_retry_ms=?1",
                params![now_ms as i64],
            )?,
        };
        Ok(n)
    }

    /// Removes a record from quarantine, the outbox and the inbox. The replica keeps
    /// whatever it holds; history keeps every version.
    pub fn drop_quarantined(&mut self, key: &RecordKey, now_ms: u64) -> Result<bool> {
        let q = self.tx.execute(
            "DELETE FROM quarantine WHERE kind=?1 AND id=?2",
            params![key.kind, key.id],
        )?;
        if q == 0 {
            return Ok(false);
        }
        self.tx.execute(
            "DELETE FROM outbox WHERE kind=?1 AND id=?2",
            params![key.kind, key.id],
        )?;
        self.tx.execute(
            "DELETE FROM inbox WHERE kind=?1 AND id=?2",
            params![key.kind, key.id],
        )?;
        // Records that waited behind it try again now (and meet whatever the EMR says).
        self.release_blocked_by(key, now_ms)?;
        Ok(true)
    }

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
        let corrupt =
            |what: &str, e: String| StoreError::Corrupt(format!("conflict #{n} {what}: {e}"));
        let side =
            |(origin, vv, body): (String, String, Vec<u8>), what: &str| -> Result<ConflictSide> {
                Ok(ConflictSide {
                    origin,
                    vv: VersionVector::from_json(&vv).map_err(|e| corrupt(what, e.to_string()))?,
                    snapshot: Snapshot::for_key(&key, &body)
                        .map_err(|e| corrupt(what, e.to_string()))?,
                })
            };
        Ok(Some(StoredConflict {
            local: side(local, "local side")?,
            remote: side(remote, "remote side")?,
            result_vv: VersionVector::from_json(&result_vv)
                .map_err(|e| corrupt("result", e.to_string()))?,
            reviewed: reviewed_ms.map(|ms| (ms as u64, review.unwrap_or_default())),
            key,
        }))
    }

    /// Keeps `r` as the latest report of its node unless a report heard later is
    /// already held (a node that moved between districts, an old one forwarded late).
    pub fn put_health(
        &mut self,
        r: &crate::health::HealthReport,
        via: &str,
        received_ms: u64,
    ) -> Result<()> {
        let text = serde_json::to_string(r)
            .map_err(|e| StoreError::Corrupt(format!("health report of {}: {e}", r.node)))?;
        self.tx
            .prepare_cached(
                "INSERT INTO health(node, via, heard_ms, received_ms, report) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(node) DO UPDATE SET via=excluded.via, heard_ms=excluded.heard_ms,
                   received_ms=excluded.received_ms, report=excluded.report
                 WHERE excluded.heard_ms >= health.heard_ms",
            )?
            .execute(params![
                r.node,
                via,
                r.heard_ms.unwrap_or(received_ms) as i64,
                received_ms as i64,
                text
            ])?;
        Ok(())
    }

    /// Hub: a new pending order.
    pub fn put_order_out(
        &mut self,
        id: &str,
        node: &str,
        kind: &crate::remote::OrderKind,
        now_ms: u64,
    ) -> Result<()> {
        let kind = serde_json::to_string(kind)
            .map_err(|e| StoreError::Corrupt(format!("order {id}: {e}")))?;
        self.tx
            .prepare_cached(
                "INSERT INTO orders_out(id, node, kind, issued_ms, state) VALUES (?1, ?2, ?3, ?4, 'pending')",
            )?
            .execute(params![id, node, kind, now_ms as i64])?;
        Ok(())
    }

    /// Hub: a pending order of `child` gets its result. False if there is no such
    /// pending order for that child.
    pub fn finish_order_out(
        &mut self,
        id: &str,
        child: &str,
        state: &str,
        result: &str,
        now_ms: u64,
    ) -> Result<bool> {
        Ok(self
            .tx
            .prepare_cached(
                "UPDATE orders_out SET state=?3, result=?4, done_ms=?5 WHERE id=?1 AND node=?2 AND state='pending'",
            )?
            .execute(params![id, child, state, result, now_ms as i64])?
            > 0)
    }

    /// Child: an order ran, with its result to report.
    pub fn put_order_in(
        &mut self,
        o: &crate::remote::Order,
        state: &str,
        result: &str,
        now_ms: u64,
    ) -> Result<()> {
        let kind = serde_json::to_string(&o.kind)
            .map_err(|e| StoreError::Corrupt(format!("order {}: {e}", o.id)))?;
        self.tx
            .prepare_cached(
                "INSERT INTO orders_in(id, by, kind, received_ms, state, result, reported) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
            )?
            .execute(params![o.id, o.by, kind, now_ms as i64, state, result])?;
        Ok(())
    }

    pub fn report_order_in_again(&mut self, id: &str) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE orders_in SET reported=0 WHERE id=?1")?
            .execute([id])?;
        Ok(())
    }

    pub fn mark_order_in_reported(&mut self, id: &str) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE orders_in SET reported=1 WHERE id=?1")?
            .execute([id])?;
        Ok(())
    }

    /// Puts the pull cursor from `peer` back to the start (a remote resync): the
    /// only way it moves back.
    pub fn reset_cursor(&mut self, peer: &str) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE cursors SET eff=0, seq=0 WHERE peer=?1")?
            .execute([peer])?;
        Ok(())
    }

    /// Records a person's review of conflict `n`.
    pub fn mark_conflict_reviewed(&mut self, n: i64, now_ms: u64, review: &str) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE conflicts SET reviewed_ms=?2, review=?3 WHERE n=?1")?
            .execute(params![n, now_ms as i64, review])?;
        Ok(())
    }

    /// Moves the cursor forward (never back: a page that arrives late, by USB or
    /// otherwise, cannot rewind it).
    pub fn set_cursor(&mut self, peer: &str, cursor: Cursor, head: u64, now_ms: u64) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO cursors(peer, eff, seq, head, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(peer) DO UPDATE SET eff=excluded.eff, seq=excluded.seq, head=excluded.head, updated_ms=excluded.updated_ms
                 WHERE (excluded.eff, excluded.seq) >= (cursors.eff, cursors.seq)",
            )?
            .execute(params![peer, cursor.eff as i64, cursor.seq as i64, head as i64, now_ms as i64])?;
        Ok(())
    }

    pub fn cursor(&self, peer: &str) -> Result<Cursor> {
        Ok(self
            .tx
            .prepare_cached("SELECT eff, seq FROM cursors WHERE peer=?1")?
            .query_row([peer], |r| {
                Ok(Cursor {
                    eff: r.get::<_, i64>(0)? as u64,
                    seq: r.get::<_, i64>(1)? as u64,
                })
            })
            .optional()?
            .unwrap_or_default())
    }

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

    /// Adds a patient to a child's catchment; returns true if it was not there before.
    pub fn add_to_catchment(&mut self, node: &str, patient: &str, reason: &str) -> Result<bool> {
        let exists = self
            .tx
            .prepare_cached("SELECT 1 FROM catchment WHERE node=?1 AND patient=?2")?
            .query_row([node, patient], |_| Ok(()))
            .optional()?
            .is_some();
        if exists {
            // A patient moved away and granted back by hand: visible again, backfilled.
            if reason == "granted" {
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
            .execute(params![node, patient, seq as i64, reason])?;
        Ok(true)
    }

    /// A patient moved away from `node`: it no longer receives or reads the record,
    /// may still push what it wrote before, and no rule gives it back (the row
    /// stays, as `moved`, until `catchment remove` or a grant).
    pub fn mark_moved(&mut self, node: &str, patient: &str, now_ms: u64) -> Result<bool> {
        Ok(self
            .tx
            .prepare_cached(
                "UPDATE catchment SET reason='moved', moved_ms=?3 WHERE node=?1 AND patient=?2",
            )?
            .execute(params![node, patient, now_ms as i64])?
            > 0)
    }

    /// When `patient` moved away from `node`, if it did (`None`: held, or never).
    pub fn moved_at(&self, node: &str, patient: &str) -> Result<Option<u64>> {
        Ok(self
            .tx
            .prepare_cached(
                "SELECT moved_ms FROM catchment WHERE node=?1 AND patient=?2 AND reason='moved'",
            )?
            .query_row([node, patient], |r| r.get::<_, Option<i64>>(0))
            .optional()?
            .flatten()
            .map(|v| v as u64))
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
            for sql in [
                "DELETE FROM replica WHERE kind=?1 AND id=?2",
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

    /// Takes a patient out of a node's catchment, whatever put it there.
    pub fn remove_from_catchment(&mut self, node: &str, patient: &str) -> Result<bool> {
        Ok(self
            .tx
            .prepare_cached("DELETE FROM catchment WHERE node=?1 AND patient=?2")?
            .execute([node, patient])?
            > 0)
    }

    /// Removes rule-derived memberships of `patient` for nodes not in `keep`.
    pub fn prune_rule_catchment(&mut self, patient: &str, keep: &[String]) -> Result<usize> {
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

    pub fn note_peer(&mut self, peer: &str, event: PeerEvent<'_>, now_ms: u64) -> Result<()> {
        self.tx
            .prepare_cached("INSERT OR IGNORE INTO peer_state(peer) VALUES (?1)")?
            .execute([peer])?;
        let now = now_ms as i64;
        match event {
            PeerEvent::PushOk { sent, received } => self.tx.execute(
                "UPDATE peer_state SET last_push_ok_ms=?2, bytes_sent=bytes_sent+?3, bytes_received=bytes_received+?4 WHERE peer=?1",
                params![peer, now, sent as i64, received as i64],
            )?,
            PeerEvent::PullOk { sent, received } => self.tx.execute(
                "UPDATE peer_state SET last_pull_ok_ms=?2, bytes_sent=bytes_sent+?3, bytes_received=bytes_received+?4 WHERE peer=?1",
                params![peer, now, sent as i64, received as i64],
            )?,
            PeerEvent::Error(e) => self.tx.execute(
                "UPDATE peer_state SET last_error=?2, last_error_ms=?3 WHERE peer=?1",
                params![peer, e, now],
            )?,
        };
        Ok(())
    }
}

/// A resumable transfer: whose, which (SHA-256 of the whole), and which way
/// (`up`: received from the node; `down`: an answer for the node to fetch).
pub struct TransferKey<'a> {
    pub node: &'a str,
    pub id: &'a [u8; 32],
    pub dir: &'a str,
}

/// An imported bundle, as the store tracks it.
pub struct BundleIn<'a> {
    pub id: &'a str,
    pub sender: &'a str,
    pub kind: &'a str,
    pub seq: u64,
}

/// What happened on a link, for `status`.
pub enum PeerEvent<'a> {
    PushOk { sent: u64, received: u64 },
    PullOk { sent: u64, received: u64 },
    Error(&'a str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_quarantine_reason_is_kept_to_its_head() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.db"), "a").unwrap();
        let key = RecordKey::parse("Patient/p1").unwrap();
        let page = "<html>".to_string() + &"x".repeat(200_000);
        let mut tx = store.begin().unwrap();
        tx.quarantine(&key, Stage::Apply, &page, true, 1, |_| 1)
            .unwrap();
        tx.commit().unwrap();
        let q = store.quarantine_list().unwrap();
        assert!(q[0].reason.starts_with("<html>xxx"));
        assert!(
            q[0].reason.ends_with("(198006 more characters)"),
            "{}",
            &q[0].reason[1990..]
        );
    }

    fn temp_store(node: &str) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db"), node).unwrap();
        (dir, store)
    }

    #[test]
    fn a_store_at_schema_1_is_migrated_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            // A store as the first release wrote it: only migration 1.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL);").unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute("INSERT INTO schema_migrations VALUES (1, 0)", [])
                .unwrap();
            conn.execute(
                "INSERT INTO meta VALUES ('node_id', 'a'), ('seq', '41')",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path, "a").unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(store.counts().unwrap().head_seq, 41);
        assert!(store.trusted_list().unwrap().is_empty());
    }

    #[test]
    fn records_waiting_before_migration_10_are_still_released_by_their_blocker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            // A store at schema 9, with a record waiting for its Patient.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL);").unwrap();
            for (i, m) in MIGRATIONS[..9].iter().enumerate() {
                conn.execute_batch(m).unwrap();
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?1, 0)",
                    [i as i64 + 1],
                )
                .unwrap();
            }
            conn.execute("INSERT INTO meta VALUES ('node_id', 'a')", [])
                .unwrap();
            conn.execute(
                "INSERT INTO quarantine VALUES ('Encounter', 'e1', 'apply', 'waiting for Patient/p1: not in the EMR yet', 0, 1, 0, 0, 999999999999)",
                [],
            )
            .unwrap();
        }
        let mut store = Store::open(&path, "a").unwrap();
        let mut tx = store.begin().unwrap();
        let p1 = RecordKey::parse("Patient/p1").unwrap();
        assert_eq!(
            tx.release_blocked_by(&RecordKey::parse("Patient/p10").unwrap(), 5)
                .unwrap(),
            0
        );
        assert_eq!(tx.release_blocked_by(&p1, 5).unwrap(), 1);
        // New waits carry the column; a reason that merely mentions a record does not.
        let e2 = RecordKey::parse("Encounter/e2").unwrap();
        tx.quarantine_waiting(&e2, &p1, "waiting for Patient/p1: refused", 1, 1_000_000)
            .unwrap();
        let e3 = RecordKey::parse("Encounter/e3").unwrap();
        tx.quarantine(
            &e3,
            Stage::Apply,
            "waiting for Patient/p1: typed by hand",
            false,
            1,
            |_| 1_000_000,
        )
        .unwrap();
        assert_eq!(
            tx.release_blocked_by(&p1, 7).unwrap(),
            2,
            "e1 and e2, not e3"
        );
        tx.commit().unwrap();
    }

    #[test]
    fn a_store_refuses_another_node_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(Store::open(&path, "a").unwrap());
        let err = Store::open(&path, "b").unwrap_err();
        assert!(matches!(err, StoreError::NodeMismatch { .. }), "{err}");
    }

    #[test]
    fn a_store_from_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = Store::open(&path, "a").unwrap();
        store
            .conn()
            .execute(
                "INSERT INTO schema_migrations(version, applied_ms) VALUES (999, 0)",
                [],
            )
            .unwrap();
        drop(store);
        let err = Store::open(&path, "a").unwrap_err();
        assert!(err.to_string().contains("999"), "{err}");
    }

    #[test]
    fn a_dropped_transaction_leaves_nothing_behind() {
        let (_d, mut store) = temp_store("a");
        {
            let mut tx = store.begin().unwrap();
            tx.audit(1, "local", "write", "Patient/x", "", "").unwrap();
            tx.enqueue(&RecordKey::new("Patient", "x").unwrap(), 1)
                .unwrap();
        }
        let c = store.counts().unwrap();
        assert_eq!((c.audit, c.outbox, c.head_seq), (0, 0, 0));
    }

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
}
