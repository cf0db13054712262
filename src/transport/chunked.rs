//! Resumable transfers over any [`Exchange`] (HTTP or MQTT): a frame larger than one
//! chunk goes as numbered pieces, each with its SHA-256, to a transfer named by the
//! SHA-256 of the whole frame; after a cut the sender asks how much arrived and goes
//! on from there, so a cut loses at most the chunk in flight. A large answer (a pull
//! page) comes back the same way, fetched chunk by chunk from where it stopped.
//!
//! Protocol (messages in [`crate::wire`]): `ChunkQuery` → `ChunkAck{received}`;
//! `ChunkPut{offset, data, sha}` → `ChunkAck{received}`; `ChunkRun` → the answer, or
//! `ChunkReady{id, len}` then `ChunkGet{offset}` → `ChunkData`. The receiver runs the
//! request only when every byte arrived and the whole matches its name; running it
//! twice is harmless (integration is idempotent). Within one exchange, a cut is
//! retried at once (up to `retries` times); the transfer also survives a restart of
//! either side, since the sender rebuilds the same frame from its outbox.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::http::{Traffic, TransportError};
use super::Exchange;
use crate::wire::{self, ChunkGet, ChunkPut, ChunkRef, Limits, Message};

pub struct Chunked<'a> {
    pub inner: &'a dyn Exchange,
    pub chunk: usize,
    pub retries: u32,
    /// Bytes sent or received again because a connection was cut.
    pub resent: AtomicU64,
    /// Cuts survived within exchanges.
    pub resumed: AtomicU64,
}

impl<'a> Chunked<'a> {
    pub fn new(inner: &'a dyn Exchange, chunk: usize) -> Chunked<'a> {
        Chunked {
            inner,
            chunk: chunk.max(1024),
            retries: 20,
            resent: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
        }
    }

    fn call(&self, msg: &Message, traffic: &mut Traffic) -> Result<Message, TransportError> {
        let (answer, t) = self.inner.exchange("/v1/chunk", msg)?;
        traffic.sent += t.sent;
        traffic.received += t.received;
        Ok(answer)
    }

    fn ack(answer: Message) -> Result<u64, TransportError> {
        match answer {
            Message::ChunkAck(a) => Ok(a.received),
            other => Err(TransportError::Unexpected {
                sent: "chunk",
                got: other.name(),
            }),
        }
    }

    /// One attempt: finish the upload from where the receiver stands, run it, and
    /// fetch a large answer into `answer_buf` (kept across attempts).
    fn attempt(
        &self,
        frame: &[u8],
        id: [u8; 32],
        answer_buf: &mut Vec<u8>,
        traffic: &mut Traffic,
    ) -> Result<Message, TransportError> {
        let total = frame.len() as u64;
        let mut received =
            Self::ack(self.call(&Message::ChunkQuery(ChunkRef { id, total }), traffic)?)?;
        while received < total {
            let end = (received as usize + self.chunk).min(frame.len());
            let data = frame[received as usize..end].to_vec();
            let sha = Sha256::digest(&data).into();
            let put = Message::ChunkPut(ChunkPut {
                id,
                total,
                offset: received,
                data,
                sha,
            });
            let next = match self.call(&put, traffic) {
                Ok(a) => Self::ack(a)?,
                Err(e) => {
                    self.resent
                        .fetch_add((end as u64) - received, Ordering::Relaxed);
                    return Err(e);
                }
            };
            if next <= received {
                return Err(TransportError::Status {
                    status: 409,
                    message: format!("receiver holds {next} bytes, not {received}: starting over"),
                });
            }
            received = next;
        }
        match self.call(&Message::ChunkRun(ChunkRef { id, total }), traffic)? {
            Message::ChunkReady(r) => {
                while (answer_buf.len() as u64) < r.received {
                    let get = Message::ChunkGet(ChunkGet {
                        id: r.id,
                        offset: answer_buf.len() as u64,
                        max: self.chunk as u64,
                    });
                    match self.call(&get, traffic)? {
                        Message::ChunkData(d) => {
                            if d.offset != answer_buf.len() as u64
                                || <[u8; 32]>::from(Sha256::digest(&d.data)) != d.sha
                                || d.data.is_empty()
                            {
                                return Err(TransportError::Status {
                                    status: 409,
                                    message: "answer chunk out of place or corrupted".into(),
                                });
                            }
                            answer_buf.extend_from_slice(&d.data);
                        }
                        other => {
                            return Err(TransportError::Unexpected {
                                sent: "chunk_get",
                                got: other.name(),
                            })
                        }
                    }
                }
                if <[u8; 32]>::from(Sha256::digest(&answer_buf[..])) != r.id {
                    answer_buf.clear();
                    return Err(TransportError::Status {
                        status: 409,
                        message: "reassembled answer does not match its checksum".into(),
                    });
                }
                let limits = Limits {
                    max_compressed: 256 << 20,
                    max_decompressed: 1 << 30,
                    max_records: 200_000,
                };
                Ok(wire::decode(answer_buf, &limits)?)
            }
            answer => Ok(answer),
        }
    }
}

impl Exchange for Chunked<'_> {
    fn exchange(&self, path: &str, msg: &Message) -> Result<(Message, Traffic), TransportError> {
        let frame = wire::encode(msg)?;
        // Small requests with small answers go as they are; pulls may answer big.
        if frame.len() <= self.chunk && !matches!(msg, Message::PullRequest(_)) {
            return self.inner.exchange(path, msg);
        }
        let id: [u8; 32] = Sha256::digest(&frame).into();
        let mut traffic = Traffic::default();
        let mut answer_buf = Vec::new();
        let mut tries = 0;
        loop {
            match self.attempt(&frame, id, &mut answer_buf, &mut traffic) {
                Ok(m) => return Ok((m, traffic)),
                Err(e) if e.is_retryable() && tries < self.retries => {
                    tries += 1;
                    self.resumed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(error = %e, attempt = tries, "transfer cut; resuming where it stopped");
                    std::thread::sleep(Duration::from_millis(200 * tries.min(10) as u64));
                }
                Err(e) => return Err(e),
            }
        }
    }
}
