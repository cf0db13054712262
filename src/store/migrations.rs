//! Room `migrations`: the schema, as the list of steps that build it.
//!
//! Table: `schema_migrations(version, applied_ms)`, one row per step applied.
//!
//! Invariants
//! - [`MIGRATIONS`] is only ever appended to; a step once released is never edited,
//!   because stores in the field ran it as it was. `tests/golden/schema.v<N>.sql`
//!   freezes the schema each version builds.
//! - Each step runs in its own IMMEDIATE transaction together with its
//!   `schema_migrations` row, so a crash leaves the store at the step before or the
//!   step after, never half-way.
//! - A store whose newest step is beyond this list was written by a newer
//!   clinicsync and is refused ([`super::StoreError::NewerSchema`]), never touched.
//!
//! Errors: a step that fails rolls back alone; the store stays at the previous
//! version and opening it fails.

/// Schema migrations, applied in order. Only ever append.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // 12: a record's body is stored once. The history row of the current version
    // holds an empty body (`X''`) and means the replica's; when the replica's body
    // is replaced or its row deleted, the old body is first moved into that
    // history row. Rows written before keep their own copy.
    r#"
    CREATE TRIGGER replica_body_to_history BEFORE UPDATE OF body ON replica
    BEGIN
        UPDATE versions SET body = OLD.body
         WHERE kind = OLD.kind AND id = OLD.id AND length(body) = 0;
    END;
    CREATE TRIGGER replica_delete_to_history BEFORE DELETE ON replica
    BEGIN
        UPDATE versions SET body = OLD.body
         WHERE kind = OLD.kind AND id = OLD.id AND length(body) = 0;
    END;
    "#,
    // 13: the records too large to carry (over `outbox::MAX_RECORD_BYTES`, 16 MiB),
    // found by this index at the start of every round instead of by reading the
    // whole outbox against the replica (0.13 CPU-s a round for a backlog of 100,000).
    // Almost always empty; the literal is the constant's value (a test reads the
    // query's plan: `records_too_large_to_carry_are_found_by_their_index`).
    r#"
    CREATE INDEX replica_oversized ON replica(kind, id) WHERE length(body) > 16777216;
    "#,
    // 14: the current version's history row lives in its replica row: `hn` (its
    // place in history, from the counter in meta `history_n`, the number space of
    // `versions.n`), `source` and `outcome` (as in `versions`; `updated_ms` is when
    // it was seen). A record written once writes no history row at all (a
    // second b-tree insert at a random place of the (kind, id, vv, hash) index for
    // each new record: 16 % of the hub's apply time, `bench apply`). The triggers
    // move the version into `versions`, with its `hn`, before its replica row is
    // replaced (a new `seq`) or deleted; view `history` is every version seen.
    // Rows from before: the empty-body history row of a current version moves into
    // its replica row; a current version whose history row holds its own body keeps
    // that row (its replica row's `source` stays NULL and the triggers skip it).
    r#"
    ALTER TABLE replica ADD COLUMN hn INTEGER;
    ALTER TABLE replica ADD COLUMN source TEXT;
    ALTER TABLE replica ADD COLUMN outcome TEXT;
    UPDATE replica SET (hn, source, outcome) =
        (SELECT v.n, v.source, v.outcome FROM versions v
          WHERE v.kind = replica.kind AND v.id = replica.id AND length(v.body) = 0
            AND v.vv = replica.vv AND v.hash = replica.hash);
    DELETE FROM versions WHERE length(body) = 0 AND EXISTS
        (SELECT 1 FROM replica r WHERE r.kind = versions.kind AND r.id = versions.id AND r.hn = versions.n);
    DROP TRIGGER replica_body_to_history;
    DROP TRIGGER replica_delete_to_history;
    CREATE TRIGGER replica_to_history BEFORE UPDATE OF seq ON replica
    WHEN OLD.source IS NOT NULL
    BEGIN
        INSERT INTO versions(n, kind, id, hash, origin, hlc_wall, hlc_ctr, vv, deleted, body, seen_ms, source, outcome)
        SELECT OLD.hn, OLD.kind, OLD.id, OLD.hash, OLD.origin, OLD.hlc_wall, OLD.hlc_ctr, OLD.vv, OLD.deleted,
               OLD.body, OLD.updated_ms, OLD.source, OLD.outcome
         WHERE NOT EXISTS (SELECT 1 FROM versions v WHERE v.kind = OLD.kind AND v.id = OLD.id AND v.vv = OLD.vv AND v.hash = OLD.hash);
    END;
    CREATE TRIGGER replica_delete_to_history BEFORE DELETE ON replica
    WHEN OLD.source IS NOT NULL
    BEGIN
        INSERT INTO versions(n, kind, id, hash, origin, hlc_wall, hlc_ctr, vv, deleted, body, seen_ms, source, outcome)
        SELECT OLD.hn, OLD.kind, OLD.id, OLD.hash, OLD.origin, OLD.hlc_wall, OLD.hlc_ctr, OLD.vv, OLD.deleted,
               OLD.body, OLD.updated_ms, OLD.source, OLD.outcome
         WHERE NOT EXISTS (SELECT 1 FROM versions v WHERE v.kind = OLD.kind AND v.id = OLD.id AND v.vv = OLD.vv AND v.hash = OLD.hash);
    END;
    CREATE VIEW history AS
        SELECT n, kind, id, hash, origin, hlc_wall, hlc_ctr, vv, deleted, body, seen_ms, source, outcome
          FROM versions
        UNION ALL
        SELECT r.hn, r.kind, r.id, r.hash, r.origin, r.hlc_wall, r.hlc_ctr, r.vv, r.deleted, r.body,
               r.updated_ms, r.source, r.outcome
          FROM replica r
         WHERE r.source IS NOT NULL AND NOT EXISTS
               (SELECT 1 FROM versions v WHERE v.kind = r.kind AND v.id = r.id AND v.vv = r.vv AND v.hash = r.hash);
    INSERT OR REPLACE INTO meta(key, value) VALUES ('history_n',
        max(coalesce((SELECT max(n) FROM versions), 0), coalesce((SELECT max(hn) FROM replica), 0)));
    "#,
];

pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RecordKey;
    use crate::store::{Stage, Store};
    use rusqlite::Connection;

    /// A store of node `a` as a release at schema `version` left it.
    fn store_at(path: &std::path::Path, version: usize) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL);").unwrap();
        for (i, m) in MIGRATIONS[..version].iter().enumerate() {
            conn.execute_batch(m).unwrap();
            conn.execute(
                "INSERT INTO schema_migrations VALUES (?1, 0)",
                [i as i64 + 1],
            )
            .unwrap();
        }
        conn.execute("INSERT INTO meta VALUES ('node_id', 'a')", [])
            .unwrap();
        conn
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
    fn a_record_too_large_to_carry_queued_before_migration_13_is_still_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let big = vec![b' '; crate::store::MAX_RECORD_BYTES + 1];
        {
            // A store at schema 12 with a queued record one byte over the limit (an
            // EMR capture) and one at the limit.
            let conn = store_at(&path, 12);
            for (n, (id, body)) in [("big", &big[..]), ("edge", &big[1..])].iter().enumerate() {
                conn.execute(
                    "INSERT INTO replica(kind, id, seq, hash, origin, hlc_wall, hlc_ctr, vv, deleted, class, patient, body, updated_ms, sender)
                     VALUES ('Observation', ?1, ?2, zeroblob(32), 'a', 1, 0, '{\"a\":1}', 0, 'clinical', NULL, ?3, 0, NULL)",
                    rusqlite::params![id, n as i64 + 1, body],
                )
                .unwrap();
                conn.execute(
                    "INSERT INTO outbox VALUES ('Observation', ?1, ?2, 0)",
                    rusqlite::params![id, n as i64 + 1],
                )
                .unwrap();
            }
        }
        let mut store = Store::open(&path, "a").unwrap();
        let mut tx = store.begin().unwrap();
        let set_aside = tx.quarantine_oversized(5).unwrap();
        assert_eq!(
            set_aside,
            vec![(
                RecordKey::parse("Observation/big").unwrap(),
                big.len() as u64
            )],
            "only the one over the limit"
        );
        // Held now: not found again while it waits.
        assert!(tx.quarantine_oversized(6).unwrap().is_empty());
        tx.commit().unwrap();
    }

    #[test]
    fn history_from_before_migration_14_reads_as_before_and_keeps_its_order() {
        use crate::store::{test_version, VersionOutcome};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let patient = |id: &str, name: &str, vv: u64| {
            let mut v = test_version(
                "a",
                serde_json::json!({"resourceType": "Patient", "id": id, "name": [{"text": name}]}),
            );
            v.vv = crate::model::VersionVector::default();
            for _ in 0..vv {
                v.vv = v.vv.bumped("a");
            }
            v
        };
        let (v1, stale, v2) = (
            patient("p1", "One", 1),
            patient("p1", "Old", 1),
            patient("p1", "Two", 2),
        );
        // p2: a current version whose history row holds its own body (first seen as
        // a conflict's incoming side, then kept): schema 12 wrote no empty row.
        let w = patient("p2", "Kept", 1);
        {
            let conn = store_at(&path, 13);
            let version_row = |n: i64, v: &crate::model::Version, body: &[u8], outcome: &str| {
                conn.execute(
                    "INSERT INTO versions VALUES (?1, 'Patient', ?2, ?3, 'a', ?4, 0, ?5, 0, ?6, ?7, 'local', ?8)",
                    rusqlite::params![n, v.snapshot.key.id, &v.snapshot.hash.0[..], n, v.vv.to_json(), body, 100 + n, outcome],
                )
                .unwrap();
            };
            version_row(1, &v1, &v1.snapshot.body, "written");
            version_row(2, &stale, &stale.snapshot.body, "stale");
            version_row(3, &v2, b"", "written");
            version_row(4, &w, &w.snapshot.body, "conflict");
            for (seq, v) in [(1, &v2), (2, &w)] {
                conn.execute(
                    "INSERT INTO replica(kind, id, seq, hash, origin, hlc_wall, hlc_ctr, vv, deleted, class, patient, body, updated_ms, sender)
                     VALUES ('Patient', ?1, ?2, ?3, 'a', 1, 0, ?4, 0, 'clinical', ?1, ?5, 103, NULL)",
                    rusqlite::params![v.snapshot.key.id, seq, &v.snapshot.hash.0[..], v.vv.to_json(), v.snapshot.body],
                )
                .unwrap();
            }
            conn.execute("INSERT INTO meta VALUES ('seq', '2')", [])
                .unwrap();
        }
        let mut store = Store::open(&path, "a").unwrap();
        let bodies = |store: &Store, id: &str| -> Vec<(Vec<u8>, VersionOutcome)> {
            store
                .history(&RecordKey::parse(&format!("Patient/{id}")).unwrap())
                .unwrap()
                .into_iter()
                .map(|h| (h.body, h.outcome))
                .collect()
        };
        let held = |v: &crate::model::Version, o| (v.snapshot.body.clone(), o);
        assert_eq!(
            bodies(&store, "p1"),
            [
                held(&v1, VersionOutcome::Written),
                held(&stale, VersionOutcome::Stale),
                held(&v2, VersionOutcome::Written)
            ]
        );
        assert_eq!(bodies(&store, "p2"), [held(&w, VersionOutcome::Conflict)]);
        let empty: i64 = store
            .conn()
            .query_row(
                "SELECT COUNT(*) FROM versions WHERE length(body) = 0",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            empty, 0,
            "the current version's empty row moved into its replica row"
        );
        // Written again: the old current versions go into `versions` where they
        // stood, each once; new places come after every old one.
        let (v3, w2) = (patient("p1", "Three", 3), patient("p2", "Kept again", 2));
        let mut tx = store.begin().unwrap();
        for v in [&v3, &w2] {
            tx.write_version(v, "local", None, VersionOutcome::Written, 200)
                .unwrap();
        }
        tx.commit().unwrap();
        assert_eq!(
            bodies(&store, "p1"),
            [
                held(&v1, VersionOutcome::Written),
                held(&stale, VersionOutcome::Stale),
                held(&v2, VersionOutcome::Written),
                held(&v3, VersionOutcome::Written)
            ]
        );
        assert_eq!(
            bodies(&store, "p2"),
            [
                held(&w, VersionOutcome::Conflict),
                held(&w2, VersionOutcome::Written)
            ]
        );
        let rows: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM versions", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 4, "v1, stale, v2, w: each once");
    }

    #[test]
    fn records_waiting_before_migration_10_are_still_released_by_their_blocker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            // A store at schema 9, with a record waiting for its Patient.
            let conn = store_at(&path, 9);
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
}
