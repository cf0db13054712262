//! Room `transfers`: resumable chunked transfers.
//!
//! Tables
//! ```text
//! transfers(node, id, dir, total, received, created_ms)
//! transfer_chunks(node, id, dir, offset, data)
//! ```
//! `id` is the SHA-256 of the whole; `dir` is `up` (received from the node) or
//! `down` (an answer for the node to fetch). At a clinic, peer `parent`'s rows hold
//! the pieces of a pull answer fetched so far.
//!
//! Invariants
//! - Chunks are contiguous: a chunk is stored only if it starts where the transfer
//!   stands and does not pass `total`, so `received` is the length of a prefix.
//! - The caller bounds what is held (per child and overall) and forgets transfers
//!   past their age ([`Tx::transfer_gc`]).
//!
//! Errors: a failure rolls the transaction back; the transfer holds what it held.

use rusqlite::{params, OptionalExtension};

use super::{shown_blob, Result, StoreError, Tx};

text_enum! {
    /// Which way a transfer goes (`transfers.dir`, `transfer_chunks.dir`).
    pub enum TransferDir {
        /// Received from the node (a chunked push).
        Up = "up",
        /// An answer for the node to fetch (at a clinic: one it is fetching).
        Down = "down",
    }
}

/// A resumable transfer: whose, which (SHA-256 of the whole), and which way.
pub struct TransferKey<'a> {
    pub node: &'a str,
    pub id: &'a [u8; 32],
    pub dir: TransferDir,
}

impl Tx<'_> {
    /// How much of a transfer is held: (total, received).
    pub fn transfer_state(&self, t: &TransferKey<'_>) -> Result<Option<(u64, u64)>> {
        Ok(self
            .tx
            .prepare_cached(
                "SELECT total, received FROM transfers WHERE node=?1 AND id=?2 AND dir=?3",
            )?
            .query_row(params![t.node, &t.id[..], t.dir.as_str()], |r| {
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
                    params![t.node, &t.id[..], t.dir.as_str(), total as i64, now_ms as i64],
                )?;
                0
            }
        };
        if offset != received || data.is_empty() || received + data.len() as u64 > total {
            return Ok(received);
        }
        self.tx
            .prepare_cached("INSERT INTO transfer_chunks(node, id, dir, offset, data) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![t.node, &t.id[..], t.dir.as_str(), offset as i64, data])?;
        let now = received + data.len() as u64;
        self.tx
            .prepare_cached("UPDATE transfers SET received=?4 WHERE node=?1 AND id=?2 AND dir=?3")?
            .execute(params![t.node, &t.id[..], t.dir.as_str(), now as i64])?;
        Ok(now)
    }

    /// The bytes of a transfer from `offset`, at most `max` of them.
    pub fn transfer_read(&self, t: &TransferKey<'_>, offset: u64, max: u64) -> Result<Vec<u8>> {
        let mut stmt = self.tx.prepare_cached(
            "SELECT offset, data FROM transfer_chunks WHERE node=?1 AND id=?2 AND dir=?3 ORDER BY offset",
        )?;
        let mut rows = stmt.query(params![t.node, &t.id[..], t.dir.as_str()])?;
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

    /// Forgets one transfer and its chunks.
    pub fn transfer_forget(&mut self, t: &TransferKey<'_>) -> Result<()> {
        for table in ["transfer_chunks", "transfers"] {
            self.tx.execute(
                &format!("DELETE FROM {table} WHERE node=?1 AND id=?2 AND dir=?3"),
                params![t.node, &t.id[..], t.dir.as_str()],
            )?;
        }
        Ok(())
    }

    /// A node's transfers in one direction, oldest first: (id, bytes held).
    pub fn transfers_of(&self, node: &str, dir: TransferDir) -> Result<Vec<([u8; 32], u64)>> {
        let mut stmt = self.tx.prepare_cached(
            "SELECT id, received FROM transfers WHERE node=?1 AND dir=?2 ORDER BY created_ms, rowid",
        )?;
        let rows = stmt.query_map([node, dir.as_str()], |r| {
            let id: Vec<u8> = r.get(0)?;
            Ok((id, r.get::<_, i64>(1)? as u64))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, n) = row?;
            let id: [u8; 32] = id.as_slice().try_into().map_err(|_| {
                StoreError::bad_value("transfers", "id", node, shown_blob(&id), "not 32 bytes")
            })?;
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

    /// Forgets transfers started before `before_ms`; returns how many.
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
}
