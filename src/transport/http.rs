//! The child's side of HTTP: one `POST` per exchange with ureq, bearer credential,
//! bounded response reads, HTTPS with a private CA and an optional key pin
//! ([`crate::tls`]).
//!
//! Errors say whether trying again can help ([`Classify`]): connection failures,
//! timeouts, 5xx, 429 and 408 (the hub's "your body did not arrive in time") are
//! retryable; other 4xx carry the parent's message and are permanent (a wrong
//! credential, a frame the parent cannot read); a certificate problem
//! ([`TransportError::Tls`]) is permanent and names what to fix. Nothing here touches
//! the store.
//!
//! A busy hub (503 or 429 with `Retry-After: <seconds>`) is waited for *inside* the
//! exchange: the client sleeps that long and sends again, at most
//! [`BUSY_RETRIES`] times and never past the exchange's timeout. Only then does it
//! give up with [`TransportError::Busy`], which carries the delay
//! ([`TransportError::retry_after`]) and is retryable, so the daemon backs off as after
//! any failed round. Waiting here rather than in the daemon keeps a round's pipelined
//! batches and resumable transfers going instead of starting the round over.
//!
//! Connections are kept alive between exchanges (one TCP and TLS handshake for a
//! round, not one per batch and page), but a connection idle for longer than
//! [`KEEPALIVE_IDLE`] is not used again: a carrier's NAT may have forgotten it
//! without a word, and a request sent into it would wait out the whole timeout.
//!
//! Every answered request is a measurement of the link ([`super::rate::LinkRate`]:
//! its bytes, and the time from its start to the answer's headers), from which the
//! sync round chooses the zstd level of the next round's push frames
//! ([`crate::wire::level`]); this client encodes frames carrying pushed records at the
//! level it was given ([`HttpClient::set_push_level`]), everything else at level 3.
//!
//! At the slow-link level, to a parent that reads them, push frames are **chained**
//! ([`crate::wire::v2::encode_chained`]): each refers to the payload of the last push
//! the parent answered, which both ends keep (the client here, the hub per child),
//! so the second batch of a push costs about half its bytes. A parent that no
//! longer holds that payload (restarted, or let it go) answers 412, and the frame is
//! sent again unchained, starting a new chain. A frame that travels as a resumable
//! transfer is never chained: it must be the same frame after a restart of the
//! clinic, which forgets the chain.

use crate::time::http_date_ms;
use std::io::Read;
use std::time::Duration;

use super::rate::LinkRate;
use crate::error::{Classify, ErrorClass};
use crate::secret::Secret;
use crate::wire::{self, Accept, Encoding, Limits, Message, WireError};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// No connection could be made (refused, DNS, bad address): trying again within
    /// the same exchange cannot help; the daemon backs off.
    #[error("cannot reach parent at {url}: {message}")]
    Unreachable { url: String, message: String },
    /// The connection was made, then dropped or went silent mid-exchange: a bad link,
    /// resumed within the exchange while it makes progress.
    #[error("link to parent at {url} dropped mid-exchange: {message}")]
    Cut { url: String, message: String },
    #[error("parent answered HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("parent's answer is unreadable: {0}")]
    Wire(#[from] WireError),
    #[error("parent answered a {got} to a {sent}")]
    Unexpected {
        sent: &'static str,
        got: &'static str,
    },
    #[error("parent is busy (HTTP {status}, retry after {} s): {message}", retry_after.as_secs())]
    Busy {
        status: u16,
        retry_after: Duration,
        message: String,
    },
    #[error("cannot reach parent at {url} over TLS: {problem} (hint: {})", problem.hint())]
    Tls {
        url: String,
        problem: crate::tls::TlsProblem,
    },
}

/// No connection, a cut, a busy or failing parent (5xx, 429) and a body the link
/// was too slow to deliver (408) are retryable; the parent's other refusals (4xx), an
/// answer we cannot read and a certificate problem are permanent.
impl Classify for TransportError {
    fn class(&self) -> ErrorClass {
        match self {
            TransportError::Unreachable { .. }
            | TransportError::Cut { .. }
            | TransportError::Busy { .. } => ErrorClass::Retryable,
            TransportError::Status { status, .. } => status_class(*status),
            TransportError::Wire(e) => e.class(),
            TransportError::Unexpected { .. } | TransportError::Tls { .. } => ErrorClass::Permanent,
        }
    }
}

/// The class of the parent's HTTP answer `status`. 408 is the hub's answer to a body
/// that did not arrive within `hub.body_timeout_secs`: the link was too slow for the
/// batch, and a later, smaller one gets through.
fn status_class(status: u16) -> ErrorClass {
    if status >= 500 || status == 429 || status == 408 {
        ErrorClass::Retryable
    } else {
        ErrorClass::Permanent
    }
}

impl TransportError {
    /// [`Classify::is_retryable`], here so callers need no import.
    pub fn is_retryable(&self) -> bool {
        Classify::is_retryable(self)
    }

    /// How long the parent asked us to wait (`Retry-After`), when it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TransportError::Busy { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// Sends of one exchange again after a busy answer, at most.
pub const BUSY_RETRIES: u32 = 8;
/// A `Retry-After` longer than this is treated as this (a confused or hostile parent
/// must not park a clinic for hours).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// What one exchange moved, for link statistics and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

/// A kept-alive connection idle for longer than this is not used again (below the
/// hub's default `idle_timeout_secs` of 30, and below the idle timeouts of the
/// carriers' NATs that clinics sit behind).
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(25);

pub struct HttpClient {
    /// The agent (its pool of kept-alive connections) and when an exchange last
    /// finished on it; replaced after [`KEEPALIVE_IDLE`].
    agent: std::sync::Mutex<(ureq::Agent, std::time::Instant)>,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    base: String,
    token: Secret,
    limits: Limits,
    timeout: Duration,
    /// This node's clock minus the parent's, from the `Date` of its last answer.
    skew_ms: std::sync::Mutex<Option<i64>>,
    /// What this client reads and announces ([`Accept::ours`]; tests force v1).
    accept: std::sync::Mutex<Accept>,
    /// What the parent announced in its last answer; `None` until it answered.
    parent: std::sync::Mutex<Option<Accept>>,
    /// The link's upload rate and latency, from this client's exchanges (or as an
    /// earlier process left them, [`HttpClient::assume_link_rate`]).
    rate: std::sync::Mutex<LinkRate>,
    /// The agent was just built: its next request opens a connection.
    fresh_agent: std::sync::atomic::AtomicBool,
    /// The zstd level of frames carrying pushed records ([`wire::level`]).
    push_level: std::sync::atomic::AtomicI32,
    /// The payload of the last push the parent answered: the prefix of the next
    /// chained frame (see the module header).
    chain: std::sync::Mutex<Option<wire::v2::Prefix>>,
    /// The chained frame last built (its SHA-256) and its own payload, which becomes
    /// [`HttpClient::chain`] once the parent answers that very frame.
    pending: std::sync::Mutex<Option<([u8; 32], Option<wire::v2::Prefix>)>>,
}

impl HttpClient {
    /// A client trusting the public web roots (plain `http://` needs nothing else).
    pub fn new(base: &str, token: Secret, timeout: Duration) -> HttpClient {
        HttpClient::with_tls(base, token, timeout, None)
    }

    /// A client whose HTTPS trust is `tls` (see [`crate::tls::client_config`]).
    pub fn with_tls(
        base: &str,
        token: Secret,
        timeout: Duration,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> HttpClient {
        HttpClient {
            agent: std::sync::Mutex::new((
                build_agent(timeout, tls.clone()),
                std::time::Instant::now(),
            )),
            tls,
            base: base.trim_end_matches('/').to_string(),
            token,
            limits: Limits {
                max_compressed: 64 << 20,
                max_decompressed: 256 << 20,
                max_records: 100_000,
            },
            timeout,
            skew_ms: std::sync::Mutex::new(None),
            accept: std::sync::Mutex::new(Accept::ours()),
            parent: std::sync::Mutex::new(None),
            rate: std::sync::Mutex::new(LinkRate::default()),
            fresh_agent: std::sync::atomic::AtomicBool::new(true),
            push_level: std::sync::atomic::AtomicI32::new(wire::LEVEL_FAST),
            chain: std::sync::Mutex::new(None),
            pending: std::sync::Mutex::new(None),
        }
    }

    /// Whether this client wants its push frames chained: at the slow-link level,
    /// where bytes cost more than the memory and CPU of a chain. Announced with each
    /// request, so the parent keeps payloads only then.
    fn wants_chain(&self) -> bool {
        self.push_level() >= wire::level::LEVEL_SLOW_LINK
            && self.accept.lock().unwrap_or_else(|p| p.into_inner()).chain
    }

    /// Whether push frames are chained now: wanted, and the parent reads them.
    fn chaining(&self) -> bool {
        self.wants_chain()
            && self.parent_accept().is_some_and(|parent| {
                self.accept
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .chains_with(&parent)
            })
    }

    /// Encodes a request as this client sends it: `encoding` at `level`, and a push
    /// chained to the last one answered when [`HttpClient::chaining`].
    pub fn encode_request(
        &self,
        msg: &Message,
        level: i32,
        encoding: Encoding,
    ) -> Result<Vec<u8>, WireError> {
        let pushes = matches!(msg, Message::PushRequest(_) | Message::SyncRequest(_));
        if let (true, Encoding::V2 { dict, columns }) = (pushes && self.chaining(), encoding) {
            let prefix = self.chain.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some((frame, next)) =
                wire::v2::encode_chained(msg, level, dict, columns, prefix.as_ref())?
            {
                *self.pending.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((sha256(&frame), next));
                return Ok(frame);
            }
        }
        wire::encode_as(msg, level, encoding)
    }

    /// The parent answered `frame`: if it is the chained frame last built, its
    /// payload is the next prefix (the parent kept it too).
    fn answered(&self, frame: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending
            .as_ref()
            .is_some_and(|(sha, _)| *sha == sha256(frame))
        {
            if let Some((_, Some(next))) = pending.take() {
                *self.chain.lock().unwrap_or_else(|p| p.into_inner()) = Some(next);
            }
        }
    }

    /// The link's upload rate and latency as this client's exchanges measured them.
    pub fn link_rate(&self) -> LinkRate {
        *self.rate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts from the estimate an earlier process kept (the sync round reads it from
    /// the store's meta); nothing once this client measured or was given one.
    pub fn assume_link_rate(&self, rate: LinkRate) {
        let mut mine = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        if !mine.is_known() {
            *mine = rate;
        }
    }

    /// The zstd level of frames carrying pushed records.
    pub fn push_level(&self) -> i32 {
        self.push_level.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the zstd level of frames carrying pushed records (the sync round's choice).
    pub fn set_push_level(&self, level: i32) {
        self.push_level
            .store(level, std::sync::atomic::Ordering::Relaxed);
    }

    /// What this client reads and announces. [`Accept::v1`] makes it behave as a
    /// client of before protocol v2 (announces nothing, sends v1), for tests.
    pub fn set_accept(&self, accept: Accept) {
        *self.accept.lock().unwrap_or_else(|p| p.into_inner()) = accept;
    }

    /// What the parent announced in its last answer (`None` before the first).
    pub fn parent_accept(&self) -> Option<Accept> {
        self.parent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts from what the parent announced to an earlier process (kept in the
    /// store's meta by the sync round); nothing once the parent answered here.
    pub fn assume_parent_accept(&self, accept: Accept) {
        let mut parent = self.parent.lock().unwrap_or_else(|p| p.into_inner());
        if parent.is_none() {
            *parent = Some(accept);
        }
    }

    /// How requests are encoded now: v1 until the parent has answered announcing
    /// v2, then what both read (see [`crate::wire::accept`]).
    pub fn encoding(&self) -> Encoding {
        match self.parent_accept() {
            Some(parent) => self
                .accept
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .choose(&parent),
            None => Encoding::V1,
        }
    }

    /// The agent to send with: the kept-alive one, or a fresh one (no idle
    /// connections) when nothing moved for longer than [`KEEPALIVE_IDLE`].
    fn agent(&self) -> ureq::Agent {
        let mut slot = self.agent.lock().unwrap_or_else(|p| p.into_inner());
        if slot.1.elapsed() > KEEPALIVE_IDLE {
            *slot = (
                build_agent(self.timeout, self.tls.clone()),
                std::time::Instant::now(),
            );
            self.fresh_agent
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        slot.1 = std::time::Instant::now();
        slot.0.clone()
    }

    /// An exchange finished: the connection was in use until now.
    fn used(&self) {
        self.agent.lock().unwrap_or_else(|p| p.into_inner()).1 = std::time::Instant::now();
    }

    fn transport_error(&self, t: ureq::Transport) -> TransportError {
        match crate::tls::TlsProblem::find(&t) {
            Some(problem) => TransportError::Tls {
                url: self.base.clone(),
                problem,
            },
            None if t.kind() == ureq::ErrorKind::Io => TransportError::Cut {
                url: self.base.clone(),
                message: t.to_string(),
            },
            None => TransportError::Unreachable {
                url: self.base.clone(),
                message: t.to_string(),
            },
        }
    }

    /// Sends `msg` to `path` and returns the parent's answer, waiting out a busy
    /// parent (see the module header).
    pub fn exchange(
        &self,
        path: &str,
        msg: &Message,
    ) -> Result<(Message, Traffic), TransportError> {
        let encoding = self.encoding();
        let level = wire::level::for_message(msg, self.push_level());
        let body = self.encode_request(msg, level, encoding)?;
        self.exchange_body(path, msg, &body, encoding)
    }

    /// [`HttpClient::exchange`] of `msg` already encoded as `frame` in `encoding` (by
    /// a caller that needed its size first): sent as it is while that is still how
    /// this client encodes, so a batch is not compressed twice.
    pub fn exchange_frame(
        &self,
        path: &str,
        msg: &Message,
        frame: &[u8],
        encoding: Encoding,
    ) -> Result<(Message, Traffic), TransportError> {
        if encoding != self.encoding() {
            return self.exchange(path, msg);
        }
        self.exchange_body(path, msg, frame, encoding)
    }

    fn exchange_body(
        &self,
        path: &str,
        msg: &Message,
        body: &[u8],
        encoding: Encoding,
    ) -> Result<(Message, Traffic), TransportError> {
        match self.send_waiting(path, body) {
            Ok(answer) => {
                self.answered(body);
                Ok(answer)
            }
            // A chained frame whose prefix the parent no longer holds: a new chain.
            Err(TransportError::Status { status: 412, .. })
                if wire::v2::chained_prefix(body).is_some() =>
            {
                tracing::info!(peer = "parent", direction = "push", "parent no longer holds the push this one refers to; sending it again unchained");
                *self.chain.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let level = wire::level::for_message(msg, self.push_level());
                let body = self.encode_request(msg, level, encoding)?;
                let answer = self.send_waiting(path, &body)?;
                self.answered(&body);
                Ok(answer)
            }
            // A parent that announced v2 and then refuses a v2 frame was replaced by
            // an older build: forget its announcement and say it again in v1.
            Err(TransportError::Status { status: 400, .. }) if encoding != Encoding::V1 => {
                tracing::info!("parent refused a protocol v2 request; sending it again in v1");
                *self.parent.lock().unwrap_or_else(|p| p.into_inner()) = Some(Accept::v1());
                let level = wire::level::for_message(msg, self.push_level());
                let body = wire::encode_as(msg, level, Encoding::V1)?;
                self.send_waiting(path, &body)
            }
            other => other,
        }
    }

    /// Sends `body`, waiting out a busy parent as it asks (within the timeout).
    fn send_waiting(&self, path: &str, body: &[u8]) -> Result<(Message, Traffic), TransportError> {
        let started = std::time::Instant::now();
        let mut tries = 0;
        loop {
            match self.send(path, body) {
                Err(TransportError::Busy {
                    status,
                    retry_after,
                    message,
                }) if tries < BUSY_RETRIES && started.elapsed() + retry_after < self.timeout => {
                    tries += 1;
                    tracing::info!(status, retry_after_s = retry_after.as_secs(), attempt = tries, reason = %message,
                                   "parent busy; waiting as it asked");
                    std::thread::sleep(retry_after);
                }
                other => return other,
            }
        }
    }

    fn send(&self, path: &str, body: &[u8]) -> Result<(Message, Traffic), TransportError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self
            .agent()
            .post(&url)
            .set("Authorization", &format!("Bearer {}", self.token.expose()))
            .set("Content-Type", wire::CONTENT_TYPE);
        let wants_chain = self.wants_chain();
        let announce = {
            let mut ours = self
                .accept
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            ours.chain = wants_chain;
            ours.header_value()
        };
        if let Some(v) = &announce {
            req = req.set(wire::accept::HEADER, v);
        }
        // Timed to the answer's headers (its body is not the upload's), on the
        // agent's first request including the new connection's handshake.
        let new_connection = self
            .fresh_agent
            .swap(false, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        let result = req.send_bytes(body);
        let resp = match result {
            Ok(r) => {
                self.rate.lock().unwrap_or_else(|p| p.into_inner()).observe(
                    body.len() as u64,
                    started.elapsed(),
                    new_connection,
                );
                self.note_date(&r);
                // The parent's announcement, or its silence (a v1 parent), from
                // every answer it made: a parent replaced by another build is
                // followed at its next answer.
                let parent = Accept::parse(r.header(wire::accept::HEADER));
                *self.parent.lock().unwrap_or_else(|p| p.into_inner()) = Some(parent);
                r
            }
            Err(ureq::Error::Status(status, r)) => {
                self.note_date(&r);
                let retry_after = retry_after(&r);
                let mut message = String::new();
                let _ = r.into_reader().take(4096).read_to_string(&mut message);
                let message = message.trim().to_string();
                return Err(match retry_after {
                    Some(retry_after) if status == 503 || status == 429 => TransportError::Busy {
                        status,
                        retry_after,
                        message,
                    },
                    _ => TransportError::Status { status, message },
                });
            }
            Err(ureq::Error::Transport(t)) => return Err(self.transport_error(t)),
        };
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(self.limits.max_compressed as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| TransportError::Cut {
                url: self.base.clone(),
                message: format!("connection lost while reading the answer: {e}"),
            })?;
        self.used();
        let answer = wire::decode(&bytes, &self.limits)?;
        Ok((
            answer,
            Traffic {
                sent: body.len() as u64,
                received: bytes.len() as u64,
            },
        ))
    }

    /// Notes the parent's clock from an answer's `Date` header.
    fn note_date(&self, resp: &ureq::Response) {
        if let Some(parent) = resp.header("Date").and_then(http_date_ms) {
            let skew = crate::time::wall_ms() as i64 - parent as i64;
            *self.skew_ms.lock().unwrap_or_else(|p| p.into_inner()) = Some(skew);
        }
    }

    /// This node's clock minus the parent's, from its last answer (`Date`, whole
    /// seconds: within about a second plus the answer's travel time).
    pub fn clock_skew_ms(&self) -> Option<i64> {
        *self.skew_ms.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn health(&self) -> Result<(), TransportError> {
        let url = format!("{}/v1/health", self.base);
        self.agent()
            .get(&url)
            .call()
            .map(|_| ())
            .map_err(|e| match e {
                ureq::Error::Status(status, _) => TransportError::Status {
                    status,
                    message: "health check failed".into(),
                },
                ureq::Error::Transport(t) => self.transport_error(t),
            })
    }
}

fn build_agent(
    timeout: Duration,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> ureq::Agent {
    let mut builder = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(15).min(timeout))
        .timeout(timeout);
    if let Some(tls) = tls {
        builder = builder.tls_config(tls);
    }
    builder.build()
}

/// `Retry-After` in seconds (the hub sends seconds; an HTTP date is not honoured and
/// counts as absent), bounded by [`MAX_RETRY_AFTER`].
fn retry_after(resp: &ureq::Response) -> Option<Duration> {
    let secs: u64 = resp.header("Retry-After")?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// How far this node's clock is from its parent's, beyond which `sync` and `status`
/// say so (the `Date` header has whole seconds, and the answer takes a while).
pub const CLOCK_SKEW_REPORTED_MS: u64 = 60_000;

/// `"2 days ahead of"` / `"5 min behind"` the parent's clock, for `skew_ms` = this
/// node's clock minus the parent's.
pub fn skew_words(skew_ms: i64) -> String {
    format!(
        "this node's clock is {} {} the parent's",
        crate::time::words_for_ms(skew_ms.unsigned_abs()),
        if skew_ms >= 0 { "ahead of" } else { "behind" }
    )
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}
