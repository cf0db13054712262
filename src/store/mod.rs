//! The durable store: one SQLite file per node, in WAL mode.
//!
//! This file holds what every room shares — [`Store`] (the connection, open,
//! migrations applied, node id checked), [`Tx`] (one write transaction), and
//! [`StoreError`] — and re-exports each room's types, so `crate::store::X` names
//! everything. Each room is one table group and opens with its own invariants:
//!
//! ```text
//! migrations  the schema, append-only (schema_migrations)
//! replica     replica + versions (history): write_version, the one way in; the clock
//! outbox      outbox: records to push, keyed by record so edits coalesce
//! inbox       inbox: pulled versions waiting to be applied
//! quarantine  quarantine: (record, stage) stuck, with reason, retry and blocker
//! conflicts   conflicts: both sides of every concurrent edit and its resolution
//! audit       audit: the append-only, hash-chained log
//! catchment   catchment and the pull feed a child reads through it
//! peers       cursors, peer_state (link health), trusted_keys (bundle keys)
//! bundles     bundles_in: USB bundles imported (replay, resume)
//! transfers   transfers + transfer_chunks: resumable chunked transfers
//! emr_state   emr_state: what the EMR holds of each record (echo suppression)
//! health      health: the latest health report of each node below a hub
//! orders      orders_out (a hub's remote orders) and orders_in (a child's)
//! meta        meta: node id, change sequence, clock and the nodes' small state
//! ```
//!
//! Invariants
//! - Every state change that must survive a crash happens inside one [`Tx`] (an
//!   IMMEDIATE transaction, `synchronous=FULL`), so a power cut leaves the store
//!   either before or after the whole change. Callers answer a peer only after
//!   [`Tx::commit`] returned.
//! - `seq` values are unique and increasing across replica rows, outbox positions and
//!   catchment rows: [`Tx::next_seq`] hands them out, [`Tx::commit`] writes the last
//!   one back (with the clock) in the same transaction.
//! - Migrations are only ever appended. A store written by a newer schema is refused.
//! - The file holds patient data: [`Store::open`] creates it 0600 (its `-wal` and
//!   `-shm` follow) in a 0750 directory if it must create one ([`crate::filemode`]).
//!
//! Errors: a failed statement rolls back the whole transaction (the `Tx` is dropped
//! without commit), leaving the store as it was. `Busy` is retryable
//! ([`StoreError::is_retryable`]). A value read from disk that clinicsync cannot have
//! written — a hash that is not 32 bytes, a vector or JSON that does not parse, a text
//! outside its column's closed set — is corruption ([`StoreError::is_corruption`]:
//! [`StoreError::BadValue`] names table, column, row and value), never read as a
//! default; reading stops there and writes nothing. The rest needs a person (disk
//! full, a newer schema, the wrong node id).

use std::path::{Path, PathBuf};

use rusqlite::{
    params, CachedStatement, Connection, OptionalExtension, Transaction, TransactionBehavior,
};
use serde::Serialize;

use crate::error::{Classify, ErrorClass};
use crate::model::Hlc;
use migrations::MIGRATIONS;

/// A closed set of texts one column holds, as an enum: `as_str` (the text stored),
/// `parse`, `ALL`, `Display` (padded) and `Serialize` as that text, and `decode`,
/// which reads a stored value and reports any other text as corruption
/// ([`StoreError::BadValue`]), never as a default.
macro_rules! text_enum {
    ($(#[$meta:meta])* pub enum $name:ident {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text stored for this value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The value stored as `text`, if it is one.
            pub fn parse(text: &str) -> Option<$name> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }

            /// A value read from `table.column` of `row`.
            #[allow(dead_code)] // not every column is read back
            fn decode(
                table: &'static str,
                column: &'static str,
                row: impl std::fmt::Display,
                text: &str,
            ) -> $crate::store::Result<$name> {
                $name::parse(text).ok_or_else(|| {
                    let known: Vec<&str> = $name::ALL.iter().map(|v| v.as_str()).collect();
                    $crate::store::StoreError::bad_value(
                        table,
                        column,
                        row,
                        $crate::store::shown_text(text),
                        format!("not one of {}", known.join(", ")),
                    )
                })
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

mod audit;
mod bundles;
mod catchment;
mod conflicts;
mod emr_state;
mod health;
mod inbox;
pub mod meta;
mod migrations;
mod orders;
mod outbox;
mod peers;
mod quarantine;
mod replica;
mod transfers;

pub use audit::{AuditCheck, AuditRow};
pub use bundles::{BundleIn, MAX_BUNDLE_SEQ, PLAUSIBLE_BUNDLE_SEQ};
pub use catchment::{CatchmentReason, FeedPage};
pub use conflicts::{ConflictEntry, ConflictSide, StoredConflict};
pub use inbox::{unreadable_reason, InboxRow};
pub use meta::{MetaKey, MetaValue};
pub use migrations::SCHEMA_VERSION;
pub use orders::{OrderRow, OrderState};
pub use outbox::MAX_RECORD_BYTES;
pub use peers::{PeerEvent, PeerState};
pub use quarantine::clip_reason;
pub use quarantine::{QuarantineEntry, Stage, MAX_REASON_CHARS};
pub(crate) use replica::VersionText;
pub use replica::{HistoryEntry, Stored, Unkept, VersionOutcome};
pub use transfers::{TransferDir, TransferKey};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite's own error; one that says the file is damaged reads as corruption.
    #[error("{}", sqlite_text(.0))]
    Sqlite(#[from] rusqlite::Error),
    #[error("store schema version {found} is newer than this clinicsync understands (up to {known}); install a newer clinicsync")]
    NewerSchema { found: i64, known: i64 },
    #[error("store belongs to node {stored:?} but the configuration says {configured:?}")]
    NodeMismatch { stored: String, configured: String },
    /// No store file where the configuration says (the node never ran there).
    #[error("no store at {} (has the node run yet?)", .0.display())]
    Missing(PathBuf),
    /// A store file with a `meta` table but no node id: clinicsync writes the id in
    /// the transaction that creates the table, so the file was changed by hand.
    #[error("store is corrupt: {} has no node id", .0.display())]
    NoNodeId(PathBuf),
    /// A value read from disk that clinicsync cannot have written there: `column` of
    /// `table`, in the row named `row`, holds `value` (shown bounded). Never
    /// defaulted: a record read wrong would be sent, applied or compared wrong.
    #[error("store is corrupt: {table}.{column} of {row} holds {value}: {problem}")]
    BadValue {
        table: &'static str,
        column: &'static str,
        row: String,
        value: String,
        problem: String,
    },
    /// A value of ours that does not serialize for its column (a bug, not the disk:
    /// the same value fails the same way; nothing was written).
    #[error("cannot store {what}: {source}")]
    Encode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// The store's file or directory could not be prepared (created, its mode set).
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the store's errors mean for the caller (see [`crate::error`]).
///
/// SQLite's own codes decide for [`StoreError::Sqlite`]: another writer holding the
/// file is retryable; a file SQLite finds damaged, and a column holding a type
/// clinicsync never writes there, are corruption; anything else (a full disk, a
/// read-only file, a constraint) needs a person.
impl Classify for StoreError {
    fn class(&self) -> ErrorClass {
        match self {
            StoreError::Sqlite(e) => sqlite_class(e),
            StoreError::BadValue { .. } | StoreError::NoNodeId(_) => ErrorClass::Corruption,
            StoreError::NewerSchema { .. }
            | StoreError::NodeMismatch { .. }
            | StoreError::Missing(_)
            | StoreError::Encode { .. } => ErrorClass::Permanent,
            StoreError::File { source, .. } => source.class(),
        }
    }
}

/// How a SQLite error reads: as corruption when it is one, so the technician sees
/// what it is whichever code path met it.
fn sqlite_text(e: &rusqlite::Error) -> String {
    match sqlite_class(e) {
        ErrorClass::Corruption => format!("store is corrupt: {e}"),
        ErrorClass::Retryable | ErrorClass::Permanent => format!("database error: {e}"),
    }
}

/// The class of a SQLite error (see [`StoreError`]'s [`Classify`]).
fn sqlite_class(e: &rusqlite::Error) -> ErrorClass {
    use rusqlite::ErrorCode as C;
    match e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            C::DatabaseBusy | C::DatabaseLocked => ErrorClass::Retryable,
            C::DatabaseCorrupt | C::NotADatabase => ErrorClass::Corruption,
            _ => ErrorClass::Permanent,
        },
        // A column that holds another type than the one its schema and our writes
        // give it, or an integer out of the range we write: not what was written.
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => ErrorClass::Corruption,
        _ => ErrorClass::Permanent,
    }
}

impl StoreError {
    /// Worth trying again as it is: another writer held the file.
    /// ([`Classify::is_retryable`], here so callers need no import.)
    pub fn is_retryable(&self) -> bool {
        Classify::is_retryable(self)
    }

    /// The file holds what clinicsync cannot have written, or SQLite found it
    /// damaged: retrying will not help and going on would spread the damage (a
    /// record read wrong is sent, applied or compared wrong). A person restores a
    /// backup (`clinicsync restore`) or looks at the value named.
    /// ([`Classify::is_corruption`], here so callers need no import.)
    pub fn is_corruption(&self) -> bool {
        Classify::is_corruption(self)
    }

    /// A value of `table.column` in row `row` that does not decode.
    fn bad_value(
        table: &'static str,
        column: &'static str,
        row: impl std::fmt::Display,
        value: String,
        problem: impl std::fmt::Display,
    ) -> StoreError {
        StoreError::BadValue {
            table,
            column,
            row: row.to_string(),
            value,
            problem: problem.to_string(),
        }
    }
}

/// A stored text as an error shows it: quoted, its first 64 characters.
fn shown_text(s: &str) -> String {
    const MAX: usize = 64;
    let n = s.chars().count();
    if n <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}… ({n} characters)")
    }
}

/// A stored u64 (a count, a sequence, a cursor), written as its i64 bits: a value
/// that is not an integer is corruption naming `table.column` and `row`, where
/// SQLite's own type error would name neither.
fn count_in(
    value: rusqlite::types::Value,
    table: &'static str,
    column: &'static str,
    row: &str,
) -> Result<u64> {
    use rusqlite::types::Value;
    match value {
        Value::Integer(n) => Ok(n as u64),
        other => Err(StoreError::bad_value(
            table,
            column,
            row,
            match &other {
                Value::Text(t) => shown_text(t),
                Value::Blob(b) => shown_blob(b),
                v => format!("{v:?}"),
            },
            "not an integer",
        )),
    }
}

/// A stored blob as an error shows it: its length and first bytes in hex.
fn shown_blob(b: &[u8]) -> String {
    const MAX: usize = 16;
    if b.len() <= MAX {
        format!("{} bytes x'{}'", b.len(), hex::encode(b))
    } else {
        format!("{} bytes x'{}…'", b.len(), hex::encode(&b[..MAX]))
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    pub records: u64,
    pub outbox: u64,
    pub inbox: u64,
    /// Of `inbox`: rows held unreadable (quarantined at stage `pull`).
    pub inbox_held: u64,
    pub quarantine: u64,
    pub conflicts: u64,
    /// Of `conflicts`: this node's version lost at its parent.
    pub conflicts_lost: u64,
    pub audit: u64,
    pub head_seq: u64,
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

/// One write transaction. Holds the change sequence, audit head and clock in memory
/// and writes them back on commit.
pub struct Tx<'a> {
    // Declared before `tx`: the statements go back to the connection's cache before
    // the transaction ends.
    hot: [std::cell::RefCell<Option<CachedStatement<'a>>>; Hot::COUNT],
    conn: &'a Connection,
    tx: Transaction<'a>,
    node_id: &'a str,
    next_seq: Option<u64>,
    next_hn: Option<u64>,
    audit_head: Option<(i64, [u8; 32])>,
    hlc: Option<Hlc>,
    /// The last answer of [`Tx::catchment_entry`]: a push carries a patient's records
    /// one after another, so most lookups ask what the one before asked. Every
    /// catchment write of this transaction clears it.
    catchment_memo: std::cell::RefCell<Option<catchment::Memo>>,
}

impl Store {
    /// Opens (creating if needed) the store at `path` for `node_id`, applying migrations.
    /// A new store file is created 0600 (and its directory 0750): see [`crate::filemode`].
    pub fn open(path: &Path, node_id: &str) -> Result<Store> {
        Store::open_paged(path, node_id, None)
    }

    /// [`Store::open`]; a store it creates has pages of `page_size` bytes (SQLite's
    /// default, 4,096, when `None`; a hub's is [`HUB_PAGE_SIZE`]). An existing store
    /// keeps the page size it was created with: SQLite cannot change it in WAL mode.
    pub fn open_paged(path: &Path, node_id: &str, page_size: Option<i64>) -> Result<Store> {
        crate::filemode::prepare_store_file(path).map_err(|source| StoreError::File {
            path: path.to_path_buf(),
            source,
        })?;
        let conn = Connection::open(path)?;
        if let Some(bytes) = page_size {
            // Only a new, empty file takes it; on any other it does nothing.
            conn.pragma_update(None, "page_size", bytes)?;
        }
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
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        let conn = Connection::open(path)?;
        // Any other failure (busy, not a database) is what it is, not "no node id".
        let has_meta = conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'",
                [],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        let node = if has_meta {
            meta::read(&conn, &meta::NODE_ID)?
        } else {
            None
        };
        let node = node.ok_or_else(|| StoreError::NoNodeId(path.to_path_buf()))?;
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
                params![i as i64 + 1, crate::time::wall_ms() as i64],
            )?;
            tx.commit()?;
        }
        let stored = meta::read(&conn, &meta::NODE_ID)?;
        match stored {
            Some(s) if s != node_id => {
                return Err(StoreError::NodeMismatch {
                    stored: s,
                    configured: node_id.to_string(),
                })
            }
            Some(_) => {}
            None => meta::write(&conn, &meta::NODE_ID, &node_id.to_string())?,
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
        // Shared from here on, so the transaction's statements ([`Hot`]) can borrow
        // the connection for as long as the transaction does; `&mut self` still
        // keeps this the store's only transaction.
        let store: &Store = self;
        let tx = Transaction::new_unchecked(&store.conn, TransactionBehavior::Immediate)?;
        Ok(Tx {
            hot: Default::default(),
            conn: &store.conn,
            tx,
            node_id: &store.node_id,
            next_seq: None,
            next_hn: None,
            audit_head: None,
            hlc: None,
            catchment_memo: Default::default(),
        })
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn counts(&self) -> Result<Counts> {
        let q = |sql: &str| -> Result<u64> {
            Ok(self.conn.query_row(sql, [], |r| r.get::<_, i64>(0))? as u64)
        };
        Ok(Counts {
            records: q("SELECT COUNT(*) FROM replica")?,
            outbox: q("SELECT COUNT(*) FROM outbox")?,
            inbox: q("SELECT COUNT(*) FROM inbox")?,
            inbox_held: q("SELECT COUNT(*) FROM quarantine q JOIN inbox i ON i.kind=q.kind AND i.id=q.id WHERE q.stage='pull'")?,
            quarantine: q("SELECT COUNT(*) FROM quarantine")?,
            conflicts: q("SELECT COUNT(*) FROM conflicts")?,
            conflicts_lost: q("SELECT COUNT(*) FROM conflicts WHERE lost_at != ''")?,
            audit: q("SELECT COUNT(*) FROM audit")?,
            head_seq: self.head_seq()?,
        })
    }

    /// Moves WAL checkpoints off this connection's commits: SQLite otherwise copies
    /// the WAL into the database file inside the commit that crosses 1,000 pages,
    /// and that commit's caller waits for it. A [`Checkpointer`] on the same file
    /// does it on its own thread; past [`CHECKPOINT_BACKSTOP_BYTES`] of WAL this
    /// connection still checkpoints itself (cheap then: what the thread copied is
    /// not copied again), so the WAL stays bounded if the thread falls behind.
    ///
    /// The thread's checkpoint copies what was committed before it started; under
    /// a stream of pushes the writer has always committed more by the time it
    /// ends, so the WAL restarts from its beginning only after the writer's own
    /// checkpoint at the backstop. That one copies what the thread had not reached
    /// yet: at most [`CHECKPOINT_SPACING`] of commits.
    pub fn checkpoint_elsewhere(&self) -> Result<()> {
        let page: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        self.conn.pragma_update(
            None,
            "wal_autocheckpoint",
            CHECKPOINT_BACKSTOP_BYTES / page.max(512),
        )?;
        Ok(())
    }

    /// Pages this connection's page cache may hold, in KiB (SQLite's default is
    /// 2 MiB): a hub integrating large pushes walks indexes larger than that, and a
    /// sync round, reading the outbox a batch at a time, needs less
    /// (`client::SYNC_CACHE_KIB`).
    pub fn set_cache_kib(&self, kib: u32) -> Result<()> {
        self.conn
            .pragma_update(None, "cache_size", -(i64::from(kib)))?;
        Ok(())
    }

    pub fn integrity_check(&self) -> Result<String> {
        Ok(self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }
}

/// The statements a transaction runs once per record (a hub integrating a push, a
/// node applying a pulled page), prepared at their first use in a transaction and
/// held until it ends. Taking a statement from the connection's cache hashes and
/// compares its whole SQL text, and a 2,000-record push did that ~10,000 times: 8 %
/// of the hub's apply thread (perf, `bench apply`).
#[derive(Clone, Copy)]
pub(crate) enum Hot {
    Current,
    CatchmentEntry,
    InsertReplica,
    UpdateReplica,
    InsertVersion,
    InsertAudit,
}

impl Hot {
    const COUNT: usize = 6;

    fn sql(self) -> &'static str {
        match self {
            Hot::Current => replica::CURRENT_SQL,
            Hot::CatchmentEntry => catchment::ENTRY_SQL,
            Hot::InsertReplica => replica::INSERT_SQL,
            Hot::UpdateReplica => replica::UPDATE_SQL,
            Hot::InsertVersion => replica::INSERT_VERSION_SQL,
            Hot::InsertAudit => audit::INSERT_SQL,
        }
    }
}

impl<'a> Tx<'a> {
    /// Runs `f` with the transaction's `which` statement, preparing it on first use.
    /// `f` must not ask for the same statement again (it is in use): none does.
    pub(crate) fn with_hot<T>(
        &self,
        which: Hot,
        f: impl FnOnce(&mut CachedStatement<'a>) -> Result<T>,
    ) -> Result<T> {
        let mut slot = self.hot[which as usize].borrow_mut();
        if slot.is_none() {
            *slot = Some(self.conn.prepare_cached(which.sql())?);
        }
        match slot.as_mut() {
            Some(stmt) => f(stmt),
            None => unreachable!("prepared just above"),
        }
    }
}

impl Tx<'_> {
    pub fn node_id(&self) -> &str {
        self.node_id
    }

    pub fn commit(mut self) -> Result<()> {
        if let Some(seq) = self.next_seq {
            self.set_meta(&meta::SEQ, seq - 1)?;
        }
        if let Some(n) = self.next_hn {
            self.set_meta(&meta::HISTORY_N, n - 1)?;
        }
        if let Some(h) = self.hlc {
            self.set_meta(&meta::HLC, h)?;
        }
        for slot in &self.hot {
            slot.borrow_mut().take();
        }
        self.tx.commit()?;
        Ok(())
    }

    /// Allocates the next change sequence number.
    pub fn next_seq(&mut self) -> Result<u64> {
        let seq = match self.next_seq {
            Some(s) => s,
            None => meta::read_counter(&self.tx, &meta::SEQ)?.unwrap_or(0) + 1,
        };
        self.next_seq = Some(within_sqlite(&meta::SEQ, seq)? + 1);
        Ok(seq)
    }

    /// Allocates the next place in history (a `versions.n` or a current version's
    /// `replica.hn`): one counter for both, so history reads in the order versions
    /// were seen.
    pub(crate) fn next_history_n(&mut self) -> Result<u64> {
        let n = match self.next_hn {
            Some(n) => n,
            None => meta::history_n_checked(&self.tx, false)? + 1,
        };
        self.next_hn = Some(within_sqlite(&meta::HISTORY_N, n)? + 1);
        Ok(n)
    }
}

/// `n`, the next number of counter `key`, if an integer column can hold it: a
/// counter read at SQLite's largest integer (only damage puts it there; a meta
/// value beyond it does not read) would wrap to a negative number.
fn within_sqlite(key: &meta::MetaKey<u64>, n: u64) -> Result<u64> {
    if i64::try_from(n).is_ok() {
        return Ok(n);
    }
    Err(StoreError::bad_value(
        "meta",
        "value",
        key.name(),
        shown_text(&(n - 1).to_string()),
        "at the largest integer SQLite stores: no number is left to hand out; restore the store from a backup",
    ))
}

/// WAL bytes past which a connection that leaves checkpoints to a [`Checkpointer`]
/// checkpoints in its own commit anyway (64 MiB).
pub const CHECKPOINT_BACKSTOP_BYTES: i64 = 64 << 20;

/// The least time between two checkpoints of a [`Checkpointer`]. A hub taking a
/// stream of large pushes fills the WAL with ~110 MB/s of pages (`bench apply`),
/// and the writer's checkpoint at the backstop copies what the thread had not
/// yet: at 500 ms that was 12 % of the answering thread (perf); at 100 ms it is
/// a fifth of that, and pushes within 100 ms still share one checkpoint.
const CHECKPOINT_SPACING: std::time::Duration = std::time::Duration::from_millis(100);

/// Page size of a new hub store, in bytes (SQLite's default, which clinics keep,
/// is 4,096). A push of 2,000 records inserts at random places of the (kind, id)
/// and patient indexes and dirties most of their pages; with pages twice as large
/// the b-trees are a level shallower and a commit writes fewer, larger frames:
/// ×1.18 on `bench apply` (with the 100 ms checkpoint spacing), the same rate
/// within noise for pushes of 20 records. 16 KiB gained more on large pushes but
/// lost 5 to 10 % on small ones, which are most of what a hub of hundreds of
/// clinics sees. A clinic keeps 4 KiB: its pushes gained nothing measurable, its
/// many small commits would write twice the bytes to its flash, and its memory
/// target has the least room (BENCHMARKS.md).
pub const HUB_PAGE_SIZE: i64 = 8192;

/// Checkpoints a store's WAL on a thread of its own, with a connection of its own:
/// after a [`Checkpointer::nudge`] (at most every 100 ms) and once a second. A PASSIVE checkpoint
/// neither waits for nor blocks the writer; what it copies was committed already
/// (the WAL holds it durably), so a checkpoint that fails or never runs loses
/// nothing — the next one, or the writer's own backstop, copies it.
pub struct Checkpointer {
    nudge: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    pub fn start(path: &Path) -> Result<Checkpointer> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let (nudge, nudged) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("wal-checkpoint".into())
            .spawn(move || loop {
                use std::sync::mpsc::RecvTimeoutError;
                match nudged.recv_timeout(std::time::Duration::from_secs(1)) {
                    Ok(()) | Err(RecvTimeoutError::Timeout) => {
                        if let Err(error) =
                            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                        {
                            tracing::debug!(%error, "WAL checkpoint did not run");
                        }
                        // Pushes a few hundred ms apart share one checkpoint: pages
                        // they all touch (indexes, the audit's tail) are copied once.
                        let until = std::time::Instant::now() + CHECKPOINT_SPACING;
                        loop {
                            let left = until.saturating_duration_since(std::time::Instant::now());
                            match nudged.recv_timeout(left) {
                                Ok(()) if !left.is_zero() => continue,
                                Ok(()) | Err(RecvTimeoutError::Timeout) => break,
                                Err(RecvTimeoutError::Disconnected) => return,
                            }
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            })
            .map_err(|source| StoreError::File {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Checkpointer {
            nudge: Some(nudge),
            thread: Some(thread),
        })
    }

    /// Asks for a checkpoint soon (after a commit); never waits.
    pub fn nudge(&self) {
        if let Some(n) = &self.nudge {
            let _ = n.try_send(());
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.nudge.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer").finish_non_exhaustive()
    }
}

/// A version of `json` as `node`'s first write (tests).
#[cfg(test)]
fn test_version(node: &str, json: serde_json::Value) -> crate::model::Version {
    crate::model::Version {
        snapshot: crate::model::Snapshot::from_json_value(json).unwrap(),
        origin: node.into(),
        hlc: Hlc {
            wall_ms: 1,
            counter: 0,
        },
        vv: crate::model::VersionVector::default().bumped(node),
        deleted: false,
    }
}

/// A new store in a temporary directory (tests).
#[cfg(test)]
fn temp_store(node: &str) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db"), node).unwrap();
    (dir, store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pragma(store: &Store, name: &str) -> i64 {
        store
            .conn()
            .query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_new_hub_store_has_its_page_size_and_an_older_one_keeps_its_own() {
        let (_dir, clinic) = temp_store("a");
        assert_eq!(pragma(&clinic, "page_size"), 4096);
        let dir = tempfile::tempdir().unwrap();
        let hub =
            Store::open_paged(&dir.path().join("hub.db"), "hub", Some(HUB_PAGE_SIZE)).unwrap();
        assert_eq!(pragma(&hub, "page_size"), HUB_PAGE_SIZE);
        hub.checkpoint_elsewhere().unwrap();
        assert_eq!(
            pragma(&hub, "wal_autocheckpoint"),
            CHECKPOINT_BACKSTOP_BYTES / HUB_PAGE_SIZE
        );
        // A hub store made by an earlier build, at 4 KiB pages, with a record in
        // it: opened as a hub's, it keeps its pages and its record, and its
        // backstop is still 64 MiB of WAL.
        let path = dir.path().join("old.db");
        {
            let mut old = Store::open(&path, "hub").unwrap();
            let v = test_version(
                "hub",
                serde_json::json!({"resourceType": "Patient", "id": "p1"}),
            );
            let mut tx = old.begin().unwrap();
            tx.write_version(&v, "local", None, VersionOutcome::Written, 1)
                .unwrap();
            tx.commit().unwrap();
        }
        let old = Store::open_paged(&path, "hub", Some(HUB_PAGE_SIZE)).unwrap();
        assert_eq!(pragma(&old, "page_size"), 4096);
        assert_eq!(old.counts().unwrap().records, 1);
        old.checkpoint_elsewhere().unwrap();
        assert_eq!(pragma(&old, "wal_autocheckpoint"), (64 << 20) / 4096);
    }

    #[test]
    fn each_store_error_has_its_class() {
        use crate::error::ErrorClass::{Corruption, Permanent, Retryable};
        let sqlite = |code| {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        let cases = [
            (sqlite(rusqlite::ffi::SQLITE_BUSY), Retryable),
            (sqlite(rusqlite::ffi::SQLITE_LOCKED), Retryable),
            (sqlite(rusqlite::ffi::SQLITE_CORRUPT), Corruption),
            (sqlite(rusqlite::ffi::SQLITE_NOTADB), Corruption),
            (sqlite(rusqlite::ffi::SQLITE_FULL), Permanent),
            (sqlite(rusqlite::ffi::SQLITE_READONLY), Permanent),
            (
                StoreError::Sqlite(rusqlite::Error::InvalidColumnType(
                    0,
                    "vv".into(),
                    rusqlite::types::Type::Integer,
                )),
                Corruption,
            ),
            (
                StoreError::Sqlite(rusqlite::Error::QueryReturnedNoRows),
                Permanent,
            ),
            (
                StoreError::NewerSchema {
                    found: 99,
                    known: 11,
                },
                Permanent,
            ),
            (
                StoreError::NodeMismatch {
                    stored: "a".into(),
                    configured: "b".into(),
                },
                Permanent,
            ),
            (StoreError::Missing(PathBuf::from("/x.db")), Permanent),
            (StoreError::NoNodeId(PathBuf::from("/x.db")), Corruption),
            (
                StoreError::bad_value("replica", "vv", "Patient/p1", "\"{\"".into(), "eof"),
                Corruption,
            ),
            (
                StoreError::Encode {
                    what: "order o1".into(),
                    source: serde_json::from_str::<u8>("x").unwrap_err(),
                },
                Permanent,
            ),
            (
                StoreError::File {
                    path: PathBuf::from("/x"),
                    source: std::io::ErrorKind::PermissionDenied.into(),
                },
                Permanent,
            ),
        ];
        for (e, class) in cases {
            assert_eq!(e.class(), class, "{e}");
            // The inherent answers are the class's.
            assert_eq!(e.is_retryable(), class == Retryable, "{e}");
            assert_eq!(e.is_corruption(), class == Corruption, "{e}");
        }
    }

    #[test]
    fn a_column_holding_another_type_than_we_write_is_corruption() {
        let (_d, mut store) = temp_store("a");
        let v = test_version(
            "a",
            serde_json::json!({"resourceType": "Patient", "id": "p1"}),
        );
        let mut tx = store.begin().unwrap();
        tx.write_version(&v, "local", None, VersionOutcome::Written, 1)
            .unwrap();
        tx.commit().unwrap();
        store
            .conn()
            .execute("UPDATE replica SET vv = 7", [])
            .unwrap();
        let err = store.current(v.key()).unwrap_err();
        assert!(err.is_corruption() && !err.is_retryable(), "{err}");
        assert!(err.to_string().starts_with("store is corrupt: "), "{err}");
    }

    #[test]
    fn a_store_file_that_cannot_be_prepared_keeps_its_io_error() {
        use std::error::Error;
        let dir = tempfile::tempdir().unwrap();
        // A directory where the store's parent directory should be.
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"").unwrap();
        let err = Store::open(&blocker.join("s.db"), "a").unwrap_err();
        assert!(matches!(err, StoreError::File { .. }), "{err}");
        assert!(
            err.source().is_some_and(|s| s.is::<std::io::Error>()),
            "{err}"
        );
        assert_eq!(err.class(), ErrorClass::Permanent);
    }
    use crate::model::RecordKey;

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
    fn errors_say_whether_they_are_retryable_or_corruption() {
        let sqlite = |code| {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        let busy = sqlite(rusqlite::ffi::SQLITE_BUSY);
        assert!(busy.is_retryable() && !busy.is_corruption());
        let damaged = sqlite(rusqlite::ffi::SQLITE_CORRUPT);
        assert!(damaged.is_corruption() && !damaged.is_retryable());
        let full = sqlite(rusqlite::ffi::SQLITE_FULL);
        assert!(!full.is_corruption() && !full.is_retryable());
        let other = StoreError::NodeMismatch {
            stored: "a".into(),
            configured: "b".into(),
        };
        assert!(!other.is_corruption() && !other.is_retryable());
        assert!(!StoreError::Missing(PathBuf::from("/x")).is_corruption());
    }

    #[test]
    fn a_file_that_is_not_a_store_is_reported_as_corruption_not_as_missing_node_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = Store::open_existing(&path).unwrap_err();
        assert!(err.is_corruption(), "{err}");
        assert!(!err.to_string().contains("node id"), "{err}");
        let missing = Store::open_existing(&dir.path().join("none.db")).unwrap_err();
        assert!(matches!(missing, StoreError::Missing(_)), "{missing}");
    }
}
