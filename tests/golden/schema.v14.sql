-- index catchment_added
CREATE INDEX catchment_added ON catchment(node, added_seq);
-- index health_received
CREATE INDEX health_received ON health(received_ms);
-- index orders_out_pending
CREATE INDEX orders_out_pending ON orders_out(node, state);
-- index outbox_order
CREATE INDEX outbox_order ON outbox(oseq);
-- index quarantine_blocked
CREATE INDEX quarantine_blocked ON quarantine(blocked_by) WHERE blocked_by IS NOT NULL;
-- index replica_oversized
CREATE INDEX replica_oversized ON replica(kind, id) WHERE length(body) > 16777216;
-- index replica_patient
CREATE INDEX replica_patient ON replica(patient, seq) WHERE patient IS NOT NULL;
-- table audit
CREATE TABLE audit (
        n INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        record TEXT NOT NULL, hash TEXT NOT NULL, detail TEXT NOT NULL,
        prev BLOB NOT NULL, entry BLOB NOT NULL
    );
-- table bundles_in
CREATE TABLE bundles_in (
        id TEXT PRIMARY KEY, sender TEXT NOT NULL, kind TEXT NOT NULL, seq INTEGER NOT NULL,
        items_done INTEGER NOT NULL, done INTEGER NOT NULL,
        started_ms INTEGER NOT NULL, finished_ms INTEGER
    );
-- table catchment
CREATE TABLE catchment (
        node TEXT NOT NULL, patient TEXT NOT NULL,
        added_seq INTEGER NOT NULL, reason TEXT NOT NULL, moved_ms INTEGER,
        PRIMARY KEY (node, patient)
    );
-- table conflicts
CREATE TABLE conflicts (
        n INTEGER PRIMARY KEY,
        kind TEXT NOT NULL, id TEXT NOT NULL, detected_ms INTEGER NOT NULL,
        local_origin TEXT NOT NULL, local_vv TEXT NOT NULL, local_body BLOB NOT NULL,
        remote_origin TEXT NOT NULL, remote_vv TEXT NOT NULL, remote_body BLOB NOT NULL,
        resolution TEXT NOT NULL, result_vv TEXT NOT NULL
    , reviewed_ms INTEGER, review TEXT, lost_at TEXT NOT NULL DEFAULT '');
-- table cursors
CREATE TABLE cursors (
        peer TEXT PRIMARY KEY, eff INTEGER NOT NULL, seq INTEGER NOT NULL,
        head INTEGER NOT NULL, updated_ms INTEGER NOT NULL
    );
-- table emr_state
CREATE TABLE emr_state (
        kind TEXT NOT NULL, id TEXT NOT NULL,
        hash BLOB, gone INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
        PRIMARY KEY (kind, id)
    );
-- table health
CREATE TABLE health (
        node TEXT PRIMARY KEY, via TEXT NOT NULL,
        heard_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL,
        report TEXT NOT NULL
    );
-- table inbox
CREATE TABLE inbox (
        kind TEXT NOT NULL, id TEXT NOT NULL,
        peer TEXT NOT NULL, origin TEXT NOT NULL,
        hlc_wall INTEGER NOT NULL, hlc_ctr INTEGER NOT NULL,
        vv TEXT NOT NULL, deleted INTEGER NOT NULL,
        body BLOB NOT NULL, received_ms INTEGER NOT NULL,
        PRIMARY KEY (kind, id)
    );
-- table meta
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- table orders_in
CREATE TABLE orders_in (
        id TEXT PRIMARY KEY, by TEXT NOT NULL, kind TEXT NOT NULL,
        received_ms INTEGER NOT NULL, state TEXT NOT NULL, result TEXT NOT NULL,
        reported INTEGER NOT NULL
    );
-- table orders_out
CREATE TABLE orders_out (
        id TEXT PRIMARY KEY, node TEXT NOT NULL, kind TEXT NOT NULL,
        issued_ms INTEGER NOT NULL, state TEXT NOT NULL,
        result TEXT, done_ms INTEGER
    );
-- table outbox
CREATE TABLE outbox (
        kind TEXT NOT NULL, id TEXT NOT NULL,
        oseq INTEGER NOT NULL, enqueued_ms INTEGER NOT NULL,
        PRIMARY KEY (kind, id)
    );
-- table peer_state
CREATE TABLE peer_state (
        peer TEXT PRIMARY KEY,
        last_push_ok_ms INTEGER, last_pull_ok_ms INTEGER,
        last_error TEXT, last_error_ms INTEGER,
        bytes_sent INTEGER NOT NULL DEFAULT 0, bytes_received INTEGER NOT NULL DEFAULT 0
    );
-- table quarantine
CREATE TABLE quarantine (
        kind TEXT NOT NULL, id TEXT NOT NULL, stage TEXT NOT NULL,
        reason TEXT NOT NULL, permanent INTEGER NOT NULL,
        attempts INTEGER NOT NULL, first_ms INTEGER NOT NULL,
        last_ms INTEGER NOT NULL, next_retry_ms INTEGER NOT NULL, blocked_by TEXT,
        PRIMARY KEY (kind, id, stage)
    );
-- table replica
CREATE TABLE replica (
        kind TEXT NOT NULL, id TEXT NOT NULL,
        seq INTEGER NOT NULL UNIQUE,
        hash BLOB NOT NULL, origin TEXT NOT NULL,
        hlc_wall INTEGER NOT NULL, hlc_ctr INTEGER NOT NULL,
        vv TEXT NOT NULL, deleted INTEGER NOT NULL,
        class TEXT NOT NULL, patient TEXT,
        body BLOB NOT NULL, updated_ms INTEGER NOT NULL, sender TEXT, hn INTEGER, source TEXT, outcome TEXT,
        PRIMARY KEY (kind, id)
    );
-- table schema_migrations
CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL);
-- table transfer_chunks
CREATE TABLE transfer_chunks (
        node TEXT NOT NULL, id BLOB NOT NULL, dir TEXT NOT NULL,
        offset INTEGER NOT NULL, data BLOB NOT NULL,
        PRIMARY KEY (node, id, dir, offset)
    );
-- table transfers
CREATE TABLE transfers (
        node TEXT NOT NULL, id BLOB NOT NULL, dir TEXT NOT NULL,
        total INTEGER NOT NULL, received INTEGER NOT NULL, created_ms INTEGER NOT NULL,
        PRIMARY KEY (node, id, dir)
    );
-- table trusted_keys
CREATE TABLE trusted_keys (
        node TEXT PRIMARY KEY, line TEXT NOT NULL,
        is_parent INTEGER NOT NULL, added_ms INTEGER NOT NULL
    );
-- table versions
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
-- trigger replica_delete_to_history
CREATE TRIGGER replica_delete_to_history BEFORE DELETE ON replica
    WHEN OLD.source IS NOT NULL
    BEGIN
        INSERT INTO versions(n, kind, id, hash, origin, hlc_wall, hlc_ctr, vv, deleted, body, seen_ms, source, outcome)
        SELECT OLD.hn, OLD.kind, OLD.id, OLD.hash, OLD.origin, OLD.hlc_wall, OLD.hlc_ctr, OLD.vv, OLD.deleted,
               OLD.body, OLD.updated_ms, OLD.source, OLD.outcome
         WHERE NOT EXISTS (SELECT 1 FROM versions v WHERE v.kind = OLD.kind AND v.id = OLD.id AND v.vv = OLD.vv AND v.hash = OLD.hash);
    END;
-- trigger replica_to_history
CREATE TRIGGER replica_to_history BEFORE UPDATE OF seq ON replica
    WHEN OLD.source IS NOT NULL
    BEGIN
        INSERT INTO versions(n, kind, id, hash, origin, hlc_wall, hlc_ctr, vv, deleted, body, seen_ms, source, outcome)
        SELECT OLD.hn, OLD.kind, OLD.id, OLD.hash, OLD.origin, OLD.hlc_wall, OLD.hlc_ctr, OLD.vv, OLD.deleted,
               OLD.body, OLD.updated_ms, OLD.source, OLD.outcome
         WHERE NOT EXISTS (SELECT 1 FROM versions v WHERE v.kind = OLD.kind AND v.id = OLD.id AND v.vv = OLD.vv AND v.hash = OLD.hash);
    END;
-- view history
CREATE VIEW history AS
        SELECT n, kind, id, hash, origin, hlc_wall, hlc_ctr, vv, deleted, body, seen_ms, source, outcome
          FROM versions
        UNION ALL
        SELECT r.hn, r.kind, r.id, r.hash, r.origin, r.hlc_wall, r.hlc_ctr, r.vv, r.deleted, r.body,
               r.updated_ms, r.source, r.outcome
          FROM replica r
         WHERE r.source IS NOT NULL AND NOT EXISTS
               (SELECT 1 FROM versions v WHERE v.kind = r.kind AND v.id = r.id AND v.vv = r.vv AND v.hash = r.hash);
