//! Room `peers`: what this node knows of its links and the nodes it trusts.
//!
//! Tables
//! ```text
//! cursors(peer, eff, seq, head, updated_ms)   pull position per parent
//! peer_state(peer, last_push_ok_ms, last_pull_ok_ms, last_error, last_error_ms,
//!            bytes_sent, bytes_received)       link health, for `status`
//! trusted_keys(node, line, is_parent, added_ms)  bundle keys (signing + age)
//! ```
//!
//! Invariants
//! - A cursor only moves forward ([`Tx::set_cursor`]; a late page cannot rewind it),
//!   except by [`Tx::reset_cursor`] (a remote resync).
//! - At most one trusted key is the parent's.
//!
//! Errors: a failure rolls the transaction back; cursor and link state are as before
//! (a page stored and its cursor move together, in the caller's transaction).

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{Result, Store, Tx};
use crate::wire::Cursor;

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

/// What happened on a link, for `status`.
pub enum PeerEvent<'a> {
    PushOk { sent: u64, received: u64 },
    PullOk { sent: u64, received: u64 },
    Error(&'a str),
}

impl Store {
    pub fn cursor(&self, peer: &str) -> Result<(Cursor, u64)> {
        let row = self
            .conn
            .query_row(
                "SELECT eff, seq, head FROM cursors WHERE peer = ?1",
                [peer],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((eff, seq, head)) = row else {
            return Ok(Default::default());
        };
        Ok((
            Cursor {
                eff: super::count_in(eff, "cursors", "eff", peer)?,
                seq: super::count_in(seq, "cursors", "seq", peer)?,
            },
            super::count_in(head, "cursors", "head", peer)?,
        ))
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
}

impl Tx<'_> {
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
        let row = self
            .tx
            .prepare_cached("SELECT eff, seq FROM cursors WHERE peer=?1")?
            .query_row([peer], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((eff, seq)) = row else {
            return Ok(Cursor::default());
        };
        Ok(Cursor {
            eff: super::count_in(eff, "cursors", "eff", peer)?,
            seq: super::count_in(seq, "cursors", "seq", peer)?,
        })
    }

    /// Puts the pull cursor from `peer` back to the start (a remote resync): the
    /// only way it moves back.
    pub fn reset_cursor(&mut self, peer: &str) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE cursors SET eff=0, seq=0 WHERE peer=?1")?
            .execute([peer])?;
        Ok(())
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
}
