//! Resumable transfers over any [`Exchange`] (HTTP or MQTT): a frame larger than one
//! chunk goes as numbered pieces, each with its SHA-256, to a transfer named by the
//! SHA-256 of the whole frame; after a cut the sender asks how much arrived and goes
//! on from there, so a cut loses at most the chunk in flight. A large answer (a pull
//! page) comes back the same way, fetched piece by piece from where it stopped.
//!
//! Protocol (messages in [`crate::wire`]):
//! - upload: `ChunkPut{offset, data, sha}` → `ChunkAck{received}`, from offset 0 on a
//!   transfer this client never began (its [`AnswerCache`] keeps the ones it began,
//!   across restarts), and from `ChunkQuery` → `ChunkAck{received}` after a cut or
//!   for a transfer begun before (or with no cache); the last piece carries `run`,
//!   and its answer is the request's answer, or `ChunkReady{id, len}` for a large
//!   one (an older receiver only acknowledges: then `ChunkRun` asks for it). The
//!   receiver runs the request only when every byte arrived and the whole matches its
//!   name; running it twice is harmless (integration is idempotent).
//! - pull: a `PullRequest` with `answer_chunk` set (one round trip) → the page itself
//!   when small, or its first chunk as `ChunkData{id, total}`. A `SyncRequest` (a
//!   push batch carrying the first pull) is answered the same way; when it is itself
//!   large it is uploaded as above and its `ChunkRun` answers with the page.
//! - large answers: `ChunkGet{offset}` → `ChunkData`. Over HTTP two requests for
//!   half-chunks stay in flight, so the link does not idle a round trip per piece.
//!
//! Within one exchange a cut ([`TransportError::Cut`]: the connection was made, then
//! dropped or went silent) is retried at once from where it stopped, up to `retries`
//! times and only while the link moves something: once `patience` passes with no byte
//! acknowledged, the exchange fails. A parent that cannot be reached at all (refused,
//! DNS, TLS, an HTTP error) fails the exchange at once — unless it answered through
//! this client within `patience` (it is restarting: waited for, within `patience`) —
//! and the daemon's backoff takes over. A transfer whose answer is gone (404/409) starts over
//! at most twice. The transfer also survives a restart of either side, since the
//! sender rebuilds the same frame from its outbox and the hub keeps answers for a day.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::http::{Traffic, TransportError};
use super::Exchange;
use crate::wire::{self, ChunkGet, ChunkPut, ChunkRef, Limits, Message};

/// Where a client keeps the pieces of a large answer as they arrive, so that a client
/// restarted in the middle continues the same answer instead of fetching it again.
/// Errors are the cache's to log: a failing cache only costs a re-fetch.
pub trait AnswerCache: Sync {
    /// The bytes of answer `id` held so far, from offset 0.
    fn load(&self, id: &[u8; 32]) -> Vec<u8>;
    /// Adds `data` at `offset` to answer `id` of `total` bytes.
    fn append(&self, id: &[u8; 32], total: u64, offset: u64, data: &[u8]);
    /// Forgets answer `id` (used, or found corrupt).
    fn forget(&self, id: &[u8; 32]);
    /// Whether this client began uploading a frame named `id` before (in an earlier
    /// round or before a restart): the receiver may hold part of it, so the upload
    /// asks first. An upload not begun before sends its first piece at once.
    fn upload_begun(&self, id: &[u8; 32]) -> bool;
    /// Notes that an upload named `id` of `total` bytes is beginning.
    fn upload_begins(&self, id: &[u8; 32], total: u64);
    /// The upload named `id` was answered: nothing more to resume.
    fn upload_done(&self, id: &[u8; 32]);
}

pub struct Chunked<'a> {
    pub inner: &'a dyn Exchange,
    /// Keeps a large pull answer's pieces across restarts of this client.
    pub cache: Option<&'a dyn AnswerCache>,
    /// The largest piece (`sync.chunk_bytes`).
    pub chunk: usize,
    /// The piece size in use: halved after each cut (down to [`MIN_PIECE`]), grown by
    /// an eighth (at least 1 KiB) after each piece that arrives (up to `chunk`), so a
    /// link that drops more often than every `chunk` bytes still completes pieces.
    piece: std::sync::atomic::AtomicUsize,
    /// Called with the new piece size whenever it changes (the daemon persists it, so
    /// a restart resumes at the size the link allowed).
    pub on_piece: Option<&'a (dyn Fn(usize) + Sync)>,
    pub retries: u32,
    /// Bytes sent or received again because a connection was cut.
    pub resent: AtomicU64,
    /// Cuts survived within exchanges.
    pub resumed: AtomicU64,
    /// How long a cut link may move nothing before the exchange gives up.
    pub patience: Duration,
    /// The pause before trying again after a cut, times the attempt (up to 10).
    /// Tests that cut an in-memory link hundreds of times set it to zero.
    pub retry_pause: Duration,
    /// When an exchange through this client last succeeded: a parent that answered a
    /// moment ago and now refuses connections is restarting, and is waited for
    /// (within `patience`); one never reached in this sync fails at once.
    answered: std::sync::Mutex<Option<std::time::Instant>>,
}

/// The largest answer fetched in pieces (as large as the decoder accepts).
const MAX_ANSWER: u64 = 256 << 20;

/// The smallest piece adaptive sizing goes down to.
pub const MIN_PIECE: usize = 2048;

impl Chunked<'_> {
    /// The piece size in use.
    pub fn piece(&self) -> usize {
        self.piece.load(Ordering::Relaxed)
    }

    /// Starts from a size learnt before (kept across restarts), within bounds.
    pub fn set_piece(&self, size: usize) {
        self.piece
            .store(size.clamp(MIN_PIECE, self.chunk), Ordering::Relaxed);
    }

    fn resize(&self, size: usize) {
        let size = size.clamp(MIN_PIECE, self.chunk);
        if self.piece.swap(size, Ordering::Relaxed) != size {
            if let Some(f) = self.on_piece {
                f(size);
            }
        }
    }

    /// A piece arrived: the link can take a little more. Growth is additive and the
    /// cut halves (as TCP's window): doubling after each piece would be back at the
    /// size that fails after a handful of pieces, and a link cut every few KiB would
    /// spend its life failing at it.
    fn piece_done(&self) {
        let p = self.piece();
        self.resize(p.saturating_add((p / 8).max(1024)));
    }

    /// A cut: try smaller pieces.
    fn piece_cut(&self) {
        self.resize(self.piece() / 2);
    }

    fn answered_now(&self) {
        *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
    }

    /// Whether to try again after `e`, given when this exchange last moved bytes.
    fn resumable(&self, e: &TransportError, last_progress: std::time::Instant) -> bool {
        match e {
            TransportError::Cut { .. } => last_progress.elapsed() < self.patience,
            TransportError::Unreachable { .. } => self
                .answered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < self.patience),
            _ => false,
        }
    }
}

impl<'a> Chunked<'a> {
    pub fn new(inner: &'a dyn Exchange, chunk: usize) -> Chunked<'a> {
        Chunked {
            inner,
            cache: None,
            chunk: chunk.max(MIN_PIECE),
            piece: std::sync::atomic::AtomicUsize::new(chunk.max(MIN_PIECE)),
            on_piece: None,
            retries: 20,
            resent: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            patience: Duration::from_secs(120),
            retry_pause: Duration::from_millis(200),
            answered: std::sync::Mutex::new(None),
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
    /// fetch a large answer into `answer_buf` (kept across attempts). A `fresh`
    /// attempt (an upload this client never began) does not ask where the receiver
    /// stands: it sends the first piece, whose acknowledgement says it. The last
    /// piece asks the receiver to run the upload at once.
    ///
    /// `None` when an answer changed how frames are encoded for this parent
    /// (`encoding` is what `frame` was built with): the caller builds the frame again,
    /// so a client restarted mid-upload, which starts in v1 until the parent answers,
    /// goes on with the very frame (and transfer) it was sending before.
    fn attempt(
        &self,
        frame: &[u8],
        id: [u8; 32],
        encoding: wire::Encoding,
        answer_buf: &mut Vec<u8>,
        traffic: &mut Traffic,
        fresh: bool,
    ) -> Result<Option<Message>, TransportError> {
        let total = frame.len() as u64;
        let mut received = if fresh {
            0
        } else {
            Self::ack(self.call(
                &Message::ChunkQuery(ChunkRef {
                    id,
                    total,
                    answer_chunk: 0,
                }),
                traffic,
            )?)?
        };
        if self.inner.encoding() != encoding {
            return Ok(None);
        }
        let mut first_put = fresh;
        while received < total {
            let end = (received as usize + self.piece()).min(frame.len());
            let data = frame[received as usize..end].to_vec();
            let sha = Sha256::digest(&data).into();
            let put = Message::ChunkPut(ChunkPut {
                id,
                total,
                offset: received,
                data,
                sha,
                run: if end == frame.len() {
                    self.piece() as u64
                } else {
                    0
                },
            });
            let answer = match self.call(&put, traffic) {
                Ok(a) => {
                    self.piece_done();
                    a
                }
                Err(e) => {
                    self.resent
                        .fetch_add((end as u64) - received, Ordering::Relaxed);
                    return Err(e);
                }
            };
            let next = match answer {
                Message::ChunkAck(_) if self.inner.encoding() != encoding => return Ok(None),
                Message::ChunkAck(a) => a.received,
                // The last piece ran the upload: its answer, or a large one to fetch.
                Message::ChunkReady(r) => {
                    self.fetch(r.id, r.received, answer_buf, traffic)?;
                    return self.finish(r.id, answer_buf).map(Some);
                }
                other if !other.name().starts_with("chunk_") => return Ok(Some(other)),
                other => {
                    return Err(TransportError::Unexpected {
                        sent: "chunk",
                        got: other.name(),
                    })
                }
            };
            // A receiver holding more than the first piece (a transfer begun before
            // a restart) says so, and the upload goes on from there.
            let progressed = next > received || (first_put && next > 0);
            first_put = false;
            if !progressed {
                return Err(TransportError::Status {
                    status: 409,
                    message: format!("receiver holds {next} bytes, not {received}: starting over"),
                });
            }
            received = next;
        }
        // Complete already (acknowledged without running: an older hub, or a
        // transfer that was complete before this attempt).
        let run = Message::ChunkRun(ChunkRef {
            id,
            total,
            answer_chunk: self.piece() as u64,
        });
        match self.call(&run, traffic)? {
            Message::ChunkReady(r) => {
                self.fetch(r.id, r.received, answer_buf, traffic)?;
                self.finish(r.id, answer_buf).map(Some)
            }
            answer => Ok(Some(answer)),
        }
    }

    /// Fetches answer `id` (`total` bytes) into `buf` from where `buf` stands. When
    /// the link allows parallel exchanges, two requests for half-chunks stay in flight,
    /// so the link never idles for a round trip between pieces and a cut still loses
    /// at most one chunk's worth.
    fn fetch(
        &self,
        id: [u8; 32],
        total: u64,
        buf: &mut Vec<u8>,
        traffic: &mut Traffic,
    ) -> Result<(), TransportError> {
        // The same bound as the decoder applies to the reassembled answer: a parent
        // announcing more is refused before a byte is fetched.
        if total > MAX_ANSWER {
            return Err(TransportError::Status {
                status: 413,
                message: format!(
                    "the parent announced an answer of {total} bytes (limit {MAX_ANSWER})"
                ),
            });
        }
        // Never more than a parent serves in one piece: a larger `sync.chunk_bytes`
        // (uploads take it) would place the next piece past the one that came short.
        let whole = (self.piece() as u64).min(wire::MAX_ANSWER_PIECE);
        let (window, piece) = if self.inner.parallel() {
            (2, (whole / 2).max(1024))
        } else {
            (1, whole)
        };
        let inner = self.inner;
        std::thread::scope(|scope| {
            let mut pending = std::collections::VecDeque::new();
            let mut next = buf.len() as u64;
            while (buf.len() as u64) < total {
                while pending.len() < window && next < total {
                    let get = Message::ChunkGet(ChunkGet {
                        id,
                        offset: next,
                        max: piece,
                    });
                    pending.push_back(scope.spawn(move || inner.exchange("/v1/chunk", &get)));
                    next += piece;
                }
                let Some(handle) = pending.pop_front() else {
                    break;
                };
                // A panic in the exchange thread is a bug: let it surface as one.
                let got = handle
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
                match got {
                    Ok((Message::ChunkData(d), t)) => {
                        traffic.sent += t.sent;
                        traffic.received += t.received;
                        if d.offset != buf.len() as u64
                            || <[u8; 32]>::from(Sha256::digest(&d.data)) != d.sha
                            || d.data.is_empty()
                        {
                            return Err(TransportError::Status {
                                status: 409,
                                message: "answer chunk out of place or corrupted".into(),
                            });
                        }
                        if let Some(c) = self.cache {
                            c.append(&id, total, d.offset, &d.data);
                        }
                        buf.extend_from_slice(&d.data);
                        self.piece_done();
                    }
                    Ok((other, _)) => {
                        return Err(TransportError::Unexpected {
                            sent: "chunk_get",
                            got: other.name(),
                        })
                    }
                    Err(e) => {
                        self.resent.fetch_add(piece, Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
            Ok(())
        })
    }

    /// Checks a reassembled answer against its name and decodes it.
    fn finish(&self, id: [u8; 32], buf: &mut Vec<u8>) -> Result<Message, TransportError> {
        if let Some(c) = self.cache {
            c.forget(&id);
        }
        if <[u8; 32]>::from(Sha256::digest(&buf[..])) != id {
            buf.clear();
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
        Ok(wire::decode(buf, &limits)?)
    }

    /// One attempt at a pull: ask (one round trip) unless an earlier attempt already
    /// got the answer's first chunk, then fetch the rest of a large answer.
    fn pull_attempt(
        &self,
        path: &str,
        msg: &Message,
        frame: Option<(&[u8], wire::Encoding)>,
        started: &mut Option<([u8; 32], u64)>,
        buf: &mut Vec<u8>,
        traffic: &mut Traffic,
    ) -> Result<Message, TransportError> {
        if started.is_none() {
            let (answer, t) = match frame {
                Some((frame, encoding)) => self.inner.exchange_frame(path, msg, frame, encoding)?,
                None => self.inner.exchange(path, msg)?,
            };
            traffic.sent += t.sent;
            traffic.received += t.received;
            match answer {
                Message::ChunkData(d)
                    if d.offset == 0
                        && !d.data.is_empty()
                        && <[u8; 32]>::from(Sha256::digest(&d.data)) == d.sha =>
                {
                    // A restarted client may hold more of this very answer already.
                    let held = self.cache.map(|c| c.load(&d.id)).unwrap_or_default();
                    if held.len() > d.data.len() && held.len() as u64 <= d.total {
                        tracing::info!(
                            held = held.len(),
                            total = d.total,
                            "continuing a pull answer fetched before a restart"
                        );
                        *buf = held;
                    } else {
                        if let Some(c) = self.cache {
                            c.forget(&d.id);
                            c.append(&d.id, d.total, 0, &d.data);
                        }
                        *buf = d.data;
                    }
                    *started = Some((d.id, d.total));
                }
                Message::ChunkData(_) => {
                    return Err(TransportError::Status {
                        status: 409,
                        message: "first answer chunk out of place or corrupted".into(),
                    })
                }
                small => return Ok(small),
            }
        }
        let Some((id, total)) = *started else {
            unreachable!("set above")
        };
        self.fetch(id, total, buf, traffic)?;
        self.finish(id, buf)
    }

    /// A pull whose answer may be large: one round trip for the request, the answer's
    /// first chunk in its reply, the rest fetched resumably. `frame`: `msg` already
    /// encoded (sent as it is while the encoding holds).
    fn pull(
        &self,
        path: &str,
        msg: &Message,
        frame: Option<(&[u8], wire::Encoding)>,
    ) -> Result<(Message, Traffic), TransportError> {
        let mut traffic = Traffic::default();
        let (mut started, mut buf) = (None, Vec::new());
        let (mut tries, mut restarts) = (0, 0);
        let mut last_progress = std::time::Instant::now();
        let mut moved = 0u64;
        loop {
            let result = self.pull_attempt(path, msg, frame, &mut started, &mut buf, &mut traffic);
            if traffic.received + traffic.sent > moved {
                // The link moved bytes: the retry count starts over, so a link cut
                // every few KiB still finishes a large transfer piece by piece.
                moved = traffic.received + traffic.sent;
                last_progress = std::time::Instant::now();
                tries = 0;
            }
            match result {
                Ok(m) => {
                    self.answered_now();
                    return Ok((m, traffic));
                }
                Err(e)
                    if tries < self.retries
                        && (self.resumable(&e, last_progress)
                            || (conflict(&e) && started.is_some() && restarts < 2)) =>
                {
                    tries += 1;
                    self.resumed.fetch_add(1, Ordering::Relaxed);
                    if matches!(e, TransportError::Cut { .. }) {
                        self.piece_cut();
                    }
                    if conflict(&e) {
                        // Corrupted or gone: ask again from the start.
                        restarts += 1;
                        started = None;
                        buf.clear();
                    }
                    tracing::info!(error = %e, attempt = tries, fetched = buf.len(), "pull cut; resuming where it stopped");
                    std::thread::sleep(self.retry_pause * tries.min(10));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A transfer that must start over (a corrupted piece, or an answer the parent no
/// longer holds).
fn conflict(e: &TransportError) -> bool {
    matches!(
        e,
        TransportError::Status {
            status: 409 | 404,
            ..
        }
    )
}

impl Exchange for Chunked<'_> {
    fn one_piece(&self) -> Option<usize> {
        Some(self.piece())
    }

    fn encoding(&self) -> wire::Encoding {
        self.inner.encoding()
    }

    fn parent_accept(&self) -> Option<wire::Accept> {
        self.inner.parent_accept()
    }

    fn assume_parent_accept(&self, accept: wire::Accept) {
        self.inner.assume_parent_accept(accept)
    }

    fn push_level(&self) -> i32 {
        self.inner.push_level()
    }

    fn set_push_level(&self, level: i32) {
        self.inner.set_push_level(level)
    }

    fn link_rate(&self) -> Option<super::rate::LinkRate> {
        self.inner.link_rate()
    }

    fn assume_link_rate(&self, rate: super::rate::LinkRate) {
        self.inner.assume_link_rate(rate)
    }

    fn exchange(&self, path: &str, msg: &Message) -> Result<(Message, Traffic), TransportError> {
        let with_page;
        let msg = match msg {
            Message::PullRequest(req) => {
                let mut req = req.clone();
                req.answer_chunk = self.piece() as u64;
                return self.pull(path, &Message::PullRequest(req), None);
            }
            // A push that carries the first pull: its answer may be a large page.
            // (Copied only when the caller did not ask for this piece size already:
            // the copy holds the whole batch.)
            Message::SyncRequest(both) if both.pull.answer_chunk != self.piece() as u64 => {
                let mut both = both.clone();
                both.pull.answer_chunk = self.piece() as u64;
                with_page = Message::SyncRequest(both);
                &with_page
            }
            other => other,
        };
        let encoding = self.inner.encoding();
        // The push level is fixed for the round: a frame built again after a cut or
        // a restart is the same frame, and resumes the same transfer.
        let level = wire::level::for_message(msg, self.inner.push_level());
        let mut frame = self.inner.encode_request(msg, level, encoding)?;
        if frame.len() > self.piece() && wire::v2::chained_prefix(&frame).is_some() {
            // A transfer must be the same frame after a restart of this side, which
            // forgets the chain: built again unchained.
            frame = wire::encode_as(msg, level, encoding)?;
        }
        self.send(path, msg, frame, encoding, level)
    }

    /// Push frames below the slow-link level are never chained
    /// ([`super::http`]'s module header), so such a frame is the same whenever it is
    /// built: the next batch's is built while the previous batch is in flight.
    fn prebuild(&self, msg: &Message) -> Option<super::Prebuilt> {
        if !matches!(msg, Message::PushRequest(_)) {
            return None;
        }
        let level = wire::level::for_message(msg, self.inner.push_level());
        if level >= wire::level::LEVEL_SLOW_LINK {
            return None;
        }
        let encoding = self.inner.encoding();
        let frame = self.inner.encode_request(msg, level, encoding).ok()?;
        Some(super::Prebuilt {
            frame,
            encoding,
            level,
        })
    }

    fn exchange_prebuilt(
        &self,
        path: &str,
        msg: &Message,
        pre: super::Prebuilt,
    ) -> Result<(Message, Traffic), TransportError> {
        // The answer to the previous batch may have changed the encoding (the parent
        // announced another protocol or dictionary), or the round its level.
        let now = (
            self.inner.encoding(),
            wire::level::for_message(msg, self.inner.push_level()),
        );
        if !matches!(msg, Message::PushRequest(_)) || now != (pre.encoding, pre.level) {
            return self.exchange(path, msg);
        }
        self.send(path, msg, pre.frame, pre.encoding, pre.level)
    }
}

impl Chunked<'_> {
    /// Sends `msg` as `frame` (built in `encoding` at `level`): in one request when it
    /// fits a piece, else as a resumable transfer.
    fn send(
        &self,
        path: &str,
        msg: &Message,
        mut frame: Vec<u8>,
        mut encoding: wire::Encoding,
        level: i32,
    ) -> Result<(Message, Traffic), TransportError> {
        let mut traffic = Traffic::default();
        let mut renegotiated = 0;
        // The frame just built is sent as it is (not encoded again by the transport).
        if frame.len() <= self.piece() && matches!(msg, Message::SyncRequest(_)) {
            // Sent again whole after a cut: the push in it is idempotent.
            return self.pull(path, msg, Some((&frame, encoding)));
        }
        // Small requests with small answers go as they are.
        if frame.len() <= self.piece() {
            let r = self.inner.exchange_frame(path, msg, &frame, encoding);
            if r.is_ok() {
                self.answered_now();
            }
            return r;
        }
        let mut id: [u8; 32] = Sha256::digest(&frame).into();
        let mut answer_buf = Vec::new();
        let mut tries = 0;
        let mut last_progress = std::time::Instant::now();
        let mut moved = 0u64;
        // Without a record of the uploads begun before (no cache) every upload asks
        // first: nothing the receiver holds is ever sent again.
        let begin = |id: &[u8; 32], len: usize| -> bool {
            let fresh = self.cache.is_some_and(|c| !c.upload_begun(id));
            if let (true, Some(c)) = (fresh, self.cache) {
                c.upload_begins(id, len as u64);
            }
            fresh
        };
        let mut fresh = begin(&id, frame.len());
        loop {
            let result = self.attempt(&frame, id, encoding, &mut answer_buf, &mut traffic, fresh);
            fresh = false;
            let result = match result {
                Ok(Some(m)) => Ok(m),
                // The parent's first answer changed the encoding (at most twice, so
                // a parent flapping between builds cannot keep us here).
                Ok(None) if renegotiated < 2 => {
                    renegotiated += 1;
                    encoding = self.inner.encoding();
                    frame = wire::encode_as(msg, level, encoding)?;
                    if let Some(c) = self.cache {
                        c.upload_done(&id);
                    }
                    id = Sha256::digest(&frame).into();
                    fresh = begin(&id, frame.len());
                    answer_buf.clear();
                    tracing::debug!(
                        ?encoding,
                        bytes = frame.len(),
                        "parent's protocol learnt; upload built again"
                    );
                    continue;
                }
                Ok(None) => Err(TransportError::Status {
                    status: 409,
                    message: "the parent's protocol version keeps changing; try again later".into(),
                }),
                Err(e) => Err(e),
            };
            if traffic.received + traffic.sent > moved {
                // The link moved bytes: the retry count starts over, so a link cut
                // every few KiB still finishes a large transfer piece by piece.
                moved = traffic.received + traffic.sent;
                last_progress = std::time::Instant::now();
                tries = 0;
            }
            match result {
                Ok(m) => {
                    self.answered_now();
                    if let Some(c) = self.cache {
                        c.upload_done(&id);
                    }
                    return Ok((m, traffic));
                }
                Err(e) if self.resumable(&e, last_progress) && tries < self.retries => {
                    tries += 1;
                    self.resumed.fetch_add(1, Ordering::Relaxed);
                    if matches!(e, TransportError::Cut { .. }) {
                        self.piece_cut();
                    }
                    tracing::info!(error = %e, attempt = tries, "transfer cut; resuming where it stopped");
                    std::thread::sleep(self.retry_pause * tries.min(10));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Hlc, VersionVector};
    use crate::wire::{Encoding, PushRequest, PushResponse, WireRecord};
    use std::sync::Mutex;

    /// A parent link that answers every push with no results, notes the frames it was
    /// handed and how many it encoded, and encodes as `encoding` says now.
    struct Spy {
        encoding: Mutex<Encoding>,
        level: Mutex<i32>,
        encoded: Mutex<usize>,
        sent: Mutex<Vec<Vec<u8>>>,
    }

    impl Spy {
        fn new(encoding: Encoding) -> Spy {
            Spy {
                encoding: Mutex::new(encoding),
                level: Mutex::new(wire::LEVEL_FAST),
                encoded: Mutex::new(0),
                sent: Mutex::new(Vec::new()),
            }
        }
    }

    impl Exchange for Spy {
        fn exchange(
            &self,
            path: &str,
            msg: &Message,
        ) -> Result<(Message, Traffic), TransportError> {
            let frame = self.encode_request(msg, wire::LEVEL_FAST, self.encoding())?;
            self.exchange_frame(path, msg, &frame, self.encoding())
        }
        fn exchange_frame(
            &self,
            _path: &str,
            _msg: &Message,
            frame: &[u8],
            _encoding: Encoding,
        ) -> Result<(Message, Traffic), TransportError> {
            self.sent.lock().unwrap().push(frame.to_vec());
            let answer = Message::PushResponse(PushResponse {
                results: Vec::new(),
            });
            Ok((answer, Traffic::default()))
        }
        fn encode_request(
            &self,
            msg: &Message,
            level: i32,
            encoding: Encoding,
        ) -> Result<Vec<u8>, wire::WireError> {
            *self.encoded.lock().unwrap() += 1;
            wire::encode_as(msg, level, encoding)
        }
        fn encoding(&self) -> Encoding {
            *self.encoding.lock().unwrap()
        }
        fn push_level(&self) -> i32 {
            *self.level.lock().unwrap()
        }
    }

    fn push() -> Message {
        let records = (0..20)
            .map(|i| WireRecord {
                kind: "Patient".into(),
                id: format!("p{i}"),
                origin: "a".into(),
                hlc: Hlc {
                    wall_ms: 1_000 + i,
                    counter: 0,
                },
                vv: VersionVector::default().bumped("a"),
                deleted: false,
                body: format!(r#"{{"id":"p{i}","resourceType":"Patient"}}"#),
            })
            .collect();
        Message::PushRequest(PushRequest {
            node: "a".into(),
            records,
        })
    }

    const V2: Encoding = Encoding::V2 {
        dict: 0,
        columns: true,
    };

    #[test]
    fn a_frame_built_ahead_is_sent_as_built_and_not_encoded_again() {
        let spy = Spy::new(V2);
        let link = Chunked::new(&spy, 1 << 20);
        let msg = push();
        let pre = link
            .prebuild(&msg)
            .expect("a push at the fast level is built ahead");
        let built = pre.frame.clone();
        assert_eq!(*spy.encoded.lock().unwrap(), 1);
        link.exchange_prebuilt("/v1/push", &msg, pre).unwrap();
        assert_eq!(*spy.encoded.lock().unwrap(), 1, "not encoded a second time");
        assert_eq!(spy.sent.lock().unwrap().as_slice(), [built]);
    }

    #[test]
    fn a_frame_built_before_the_encoding_changed_is_built_again() {
        let spy = Spy::new(Encoding::V1);
        let link = Chunked::new(&spy, 1 << 20);
        let msg = push();
        let pre = link.prebuild(&msg).unwrap();
        // The previous batch's answer announced v2.
        *spy.encoding.lock().unwrap() = V2;
        link.exchange_prebuilt("/v1/push", &msg, pre).unwrap();
        let sent = spy.sent.lock().unwrap().clone();
        assert_eq!(sent, [wire::encode_as(&msg, wire::LEVEL_FAST, V2).unwrap()]);
        assert_ne!(
            sent[0],
            wire::encode_as(&msg, wire::LEVEL_FAST, Encoding::V1).unwrap()
        );
    }

    #[test]
    fn frames_that_may_be_chained_or_carry_more_than_a_push_are_not_built_ahead() {
        let spy = Spy::new(V2);
        let link = Chunked::new(&spy, 1 << 20);
        *spy.level.lock().unwrap() = wire::level::LEVEL_SLOW_LINK;
        assert!(
            link.prebuild(&push()).is_none(),
            "the slow-link level chains"
        );
        *spy.level.lock().unwrap() = wire::LEVEL_FAST;
        let pull = Message::PushResponse(PushResponse {
            results: Vec::new(),
        });
        assert!(link.prebuild(&pull).is_none());
        assert_eq!(*spy.encoded.lock().unwrap(), 0);
    }
}
