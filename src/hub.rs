//! Serving children over HTTP(S): connection limits and timeouts, authentication
//! before any body byte, decoding within limits, and handing each message to the
//! engine. The hub never opens a connection to a child.
//!
//! Endpoints (all `POST`, body and answer are [`crate::wire`] frames):
//! `/v1/push` (PushRequest → PushResponse), `/v1/pull` (PullRequest → PullResponse),
//! `/v1/fetch` (FetchRequest → FetchResponse), `/v1/chunk` (resumable transfers);
//! `GET /v1/health` answers `ok`.
//!
//! What a request may cost, in the order it is checked ([`serve`], [`endpoint`]):
//! 1. A connection slot: at most `hub.max_connections` connections are open. At the
//!    cap the hub stops calling `accept`, so further connections wait in the kernel's
//!    accept queue (no file descriptor, no memory of ours) and are served in arrival
//!    order as slots free. Refusing them with a 503 instead would need a TLS handshake
//!    per refused socket on an HTTPS hub (the CPU an attacker wants us to spend) and a
//!    descriptor each while refusing; and a clinic queued behind idle attackers is
//!    served as soon as they time out, without a retry of its own, ahead of attackers
//!    that reconnect after it. File descriptors stay below `max_connections` plus a
//!    fixed few, which is what `LimitNOFILE` in the unit is sized for.
//! 2. Time, per connection ([`ConnClock`]): the first request's headers (TLS handshake
//!    included) must be complete `hub.header_timeout_secs` after accepting; a later
//!    request's headers that long after its first byte; a kept-alive connection with
//!    nothing moving is closed after `hub.idle_timeout_secs`; a body must arrive
//!    within `hub.body_timeout_secs` (408). A timed-out connection is dropped.
//! 3. The credential, from the headers, before a single body byte is read: 401.
//! 4. A declared `Content-Length` over `hub.max_message_bytes`: 413, unread.
//! 5. Buffer memory: the bodies being received together may hold at most
//!    2 × `max_concurrent_requests` × `max_message_bytes` (reserved by declared
//!    length, or the maximum when none is declared): beyond, 503 with `Retry-After`.
//! 6. A request slot (`hub.max_concurrent_requests`, HTTP and MQTT together,
//!    [`HubState::try_request_slot`]): decoding and handling; beyond, 503 with
//!    `Retry-After`. Slow uploads hold buffer memory, not request slots, so clinics
//!    on slow links do not starve the others.
//!
//! Refusals at steps 3–5 answer `Connection: close`: the body is not read, so the
//! connection cannot carry another request. After any answer the hub half-closes and
//! discards what the client still sends for at most [`LINGER_TIME`] and
//! [`LINGER_BYTES`] before closing, so a client that sends its whole body before
//! reading (ureq does) still receives the answer instead of a reset.
//!
//! Errors are plain text naming the problem: 401 unknown or missing credential,
//! 403 a child acting as another node, 400 a frame that does not decode (bad magic,
//! unsupported protocol version, truncated, garbage, too many records, too deep),
//! 408 a body that did not arrive in time, 413 a body over `hub.max_message_bytes`
//! or a decompression bomb, 503 busy (with `Retry-After`) or a busy store (retry
//! later), 500 anything else. A refused request changes nothing: it is refused
//! before the engine opens a transaction.
//!
//! Credentials: the config holds SHA-256 hashes of each child's bearer token; a
//! presented token is hashed and compared in constant time. The list is replaced as
//! a whole on SIGHUP ([`HubState::set_children`]); a removed child's next request is
//! refused.
//!
//! TLS ([`crate::tls::ServerTls`]): with `hub.tls_cert_file` and `hub.tls_key_file`
//! the listener speaks only HTTPS; the certificate is swapped for new connections on
//! reload. A plain-HTTP request to an HTTPS hub gets a plain 400 saying so.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::constant_time_eq;
use crate::config::HubSection;
use crate::error::Classify;
use crate::tls::{ServerTls, TlsError};

use crate::engine::{self, EngineError, Policy};
use crate::store::{CatchmentReason, Store, TransferDir, TransferKey};
use crate::time::wall_ms;
use crate::wire::{self, Limits, Message, WireError};

/// Chunk size of answers, and the largest chunk fetch served.
const MAX_CHUNK: u64 = wire::MAX_ANSWER_PIECE;
/// Transfers a child may hold open per direction; starting one more forgets its
/// oldest (a real client has one in flight; one killed mid-way may leave another).
pub const MAX_OPEN_TRANSFERS: usize = 4;
/// Bytes all children's transfers may hold together; past it new uploads get 503.
pub const MAX_TRANSFER_BYTES: u64 = 1 << 30;
/// Transfers older than this are forgotten (a child resumes within a day or starts over).
const TRANSFER_TTL_MS: u64 = 24 * 3_600_000;

/// Everything a hub needs to answer children.
pub struct HubState {
    writer: Mutex<Store>,
    /// Checkpoints the writer's WAL off the push path (`Store::checkpoint_elsewhere`).
    checkpointer: crate::store::Checkpointer,
    reader: Mutex<Store>,
    node_id: String,
    /// Replaced on reload (catchment rules, descendants); each request uses the one
    /// in force when it started.
    policy: RwLock<Arc<Policy>>,
    children: RwLock<Vec<(String, [u8; 32])>>,
    /// Credentials being replaced (`child rotate`): child, hash, accepted until (ms).
    previous: RwLock<Vec<(String, [u8; 32], u64)>>,
    /// When each child's contact was last written to `peer_state` (`child:<node>`):
    /// at most once a minute per child, so pulls stay read-only most of the time.
    contact: Mutex<std::collections::HashMap<String, u64>>,
    /// Added to the system clock for everything this hub stamps or compares (the
    /// engine's `now`, the `Date` of its answers). Zero in service; tests set it to
    /// play a hub (or, seen from a clinic, a clinic) whose clock is off.
    clock_offset_ms: std::sync::atomic::AtomicI64,
    limits: Limits,
    serving: ServeOptions,
    gate: Gate,
    /// Large answers of uploads already run, by (child, upload id): a `ChunkRun`
    /// repeated after a cut gets the same answer to go on fetching, instead of a
    /// re-run whose answer differs (its records are now duplicates) and would make
    /// the child start fetching over — on a link cut every few KiB, forever. Bounded;
    /// losing an entry (or a restart) only costs a harmless re-run.
    ran: Mutex<std::collections::VecDeque<(String, [u8; 32], Message)>>,
    /// What it has served (`/metrics`).
    pub counters: Counters,
    /// Set once when a request met a damaged store: the daemon stops the node
    /// (exit 10) instead of answering children from damaged data.
    corrupt: Mutex<Option<String>>,
    corrupt_seen: tokio::sync::watch::Sender<bool>,
    /// What this hub reads and announces ([`wire::Accept::ours`]; tests force v1 to
    /// play a hub of before v2).
    accept: RwLock<wire::Accept>,
    /// Each child's last push payloads, the prefixes its chained frames refer to.
    chains: Mutex<wire::chain::Kept>,
}

/// The hub's store turned out damaged while it served: it stops (`run` exits 10).
#[derive(Debug, thiserror::Error)]
#[error(
    "the hub's store is corrupt: {what}; keep the file and restore a backup (clinicsync restore)"
)]
pub struct HubCorrupt {
    pub what: String,
}

impl crate::error::Classify for HubCorrupt {
    fn class(&self) -> crate::error::ErrorClass {
        crate::error::ErrorClass::Corruption
    }
}

/// The writer connection's page cache: the replica, history and audit indexes a
/// large push walks (SQLite's default of 2 MiB reads them back from the OS page by
/// page). Memory a hub has; a clinic keeps the default.
const WRITER_CACHE_KIB: u32 = 16 << 10;

/// Answers of runs kept for repeated `ChunkRun`s.
const RAN_KEPT: usize = 256;

impl HubState {
    /// `children` pairs each child node id with the SHA-256 of its credential.
    /// Serving limits are the defaults until [`HubState::with_serving`].
    pub fn new(
        store_path: &std::path::Path,
        policy: Policy,
        children: Vec<(String, [u8; 32])>,
        max_message_bytes: usize,
    ) -> Result<HubState, crate::store::StoreError> {
        let writer = Store::open_paged(
            store_path,
            &policy.node_id,
            Some(crate::store::HUB_PAGE_SIZE),
        )?;
        writer.checkpoint_elsewhere()?;
        writer.set_cache_kib(WRITER_CACHE_KIB)?;
        let checkpointer = crate::store::Checkpointer::start(store_path)?;
        let reader = Store::open(store_path, &policy.node_id)?;
        let serving = ServeOptions::default();
        let gate = Gate::new(serving.max_concurrent_requests, max_message_bytes);
        Ok(HubState {
            writer: Mutex::new(writer),
            checkpointer,
            reader: Mutex::new(reader),
            node_id: policy.node_id.clone(),
            policy: RwLock::new(Arc::new(policy)),
            children: RwLock::new(children),
            previous: RwLock::new(Vec::new()),
            contact: Mutex::new(std::collections::HashMap::new()),
            clock_offset_ms: std::sync::atomic::AtomicI64::new(0),
            limits: Limits {
                max_compressed: max_message_bytes,
                // A push batch is a few MiB of JSON; what one request may decompress
                // to is what each request slot may cost in memory (a bomb is
                // refused at this bound): twice the body limit, at least 32 MiB.
                max_decompressed: max_message_bytes.saturating_mul(2).max(32 << 20),
                max_records: 50_000,
            },
            serving,
            gate,
            ran: Mutex::new(std::collections::VecDeque::new()),
            counters: Counters::default(),
            corrupt: Mutex::new(None),
            corrupt_seen: tokio::sync::watch::Sender::new(false),
            accept: RwLock::new(wire::Accept::ours()),
            chains: Mutex::new(wire::chain::Kept::default()),
        })
    }

    /// The connection limits, timeouts, request slots and TLS of [`serve`].
    pub fn with_serving(mut self, serving: ServeOptions) -> HubState {
        self.gate = Gate::new(serving.max_concurrent_requests, self.limits.max_compressed);
        self.serving = serving;
        self
    }

    pub fn serving(&self) -> &ServeOptions {
        &self.serving
    }

    /// Replaces the children and their credential hashes (SIGHUP). Requests already
    /// authenticated finish; every later one is checked against the new list.
    pub fn set_children(&self, children: Vec<(String, [u8; 32])>) {
        *self.children.write().unwrap_or_else(|p| p.into_inner()) = children;
    }

    /// Replaces the credentials accepted during a rotation's overlap: (child, hash,
    /// accepted until, epoch ms).
    pub fn set_previous_tokens(&self, previous: Vec<(String, [u8; 32], u64)>) {
        *self.previous.write().unwrap_or_else(|p| p.into_inner()) = previous;
    }

    /// What this hub reads and announces to children. [`wire::Accept::v1`] makes it
    /// behave as a hub of before protocol v2: it announces nothing, refuses v2
    /// frames and answers in v1 (for tests of mixed networks).
    pub fn set_accept(&self, accept: wire::Accept) {
        *self.accept.write().unwrap_or_else(|p| p.into_inner()) = accept;
    }

    /// What this hub reads and announces.
    pub fn accept(&self) -> wire::Accept {
        self.accept
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Moves this hub's clock by `ms` (see the field; for tests).
    pub fn set_clock_offset(&self, ms: i64) {
        self.clock_offset_ms.store(ms, Ordering::Relaxed);
    }

    /// This hub's clock, epoch ms.
    pub fn now(&self) -> u64 {
        (wall_ms() as i64)
            .saturating_add(self.clock_offset_ms.load(Ordering::Relaxed))
            .max(0) as u64
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Whether `node` is one of this hub's children now.
    pub fn is_child(&self, node: &str) -> bool {
        self.children
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(n, _)| n == node)
    }

    fn authenticate(&self, headers: &HeaderMap) -> Result<String, Credential> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(Credential::Unknown)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let current = self
            .children
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, h)| constant_time_eq(h, &digest))
            .map(|(n, _)| n.clone());
        if let Some(node) = current {
            return Ok(node);
        }
        let previous = self
            .previous
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, h, _)| constant_time_eq(h, &digest))
            .map(|(n, _, until)| (n.clone(), *until));
        match previous {
            Some((node, until)) if wall_ms() < until => Ok(node),
            Some((node, until)) => Err(Credential::Replaced { node, until }),
            None => Err(Credential::Unknown),
        }
    }

    /// Notes that `child` was served (peer `child:<node>` in `peer_state`), at most
    /// once a minute per child and direction unless `always`.
    fn note_contact(&self, store: &mut Store, child: &str, push: bool, bytes: u64, always: bool) {
        let now = wall_ms();
        if !always && !self.contact_due(child, push, now) {
            return;
        }
        self.contact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(contact_slot(child, push), now);
        let peer = format!("{CHILD_PEER_PREFIX}{child}");
        let event = if push {
            crate::store::PeerEvent::PushOk {
                sent: 0,
                received: bytes,
            }
        } else {
            crate::store::PeerEvent::PullOk {
                sent: 0,
                received: bytes,
            }
        };
        let noted = store.begin().and_then(|mut tx| {
            tx.note_peer(&peer, event, now)?;
            tx.commit()
        });
        if let Err(error) = noted {
            tracing::debug!(%error, peer = %child, "could not note the child's contact");
        }
    }

    /// A request slot, or a 503 refusal when `max_concurrent_requests` are in
    /// progress. Held while a request is decoded and handled; dropping it frees it.
    pub fn try_request_slot(&self) -> Result<RequestSlot, Refusal> {
        self.gate.try_request().ok_or_else(|| {
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "hub busy: {} requests in progress (hub.max_concurrent_requests); retry after {BUSY_RETRY_AFTER_SECS} s",
                    self.serving.max_concurrent_requests
                ),
            )
        })
    }

    /// [`HubState::answer`] within a request slot (the MQTT path; HTTP takes its
    /// slot in [`endpoint`]).
    pub fn answer_limited(
        &self,
        child: &str,
        frame: &[u8],
        expect: Option<&'static str>,
    ) -> Result<Message, Refusal> {
        self.answer_limited_for(child, frame, expect, wire::Encoding::V1)
    }

    /// [`HubState::answer_for`] within a request slot (MQTT).
    pub fn answer_limited_for(
        &self,
        child: &str,
        frame: &[u8],
        expect: Option<&'static str>,
        encoding: wire::Encoding,
    ) -> Result<Message, Refusal> {
        let _slot = self.try_request_slot()?;
        self.answer_for(child, frame, expect, encoding)
    }

    fn contact_due(&self, child: &str, push: bool, now: u64) -> bool {
        !self
            .contact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&contact_slot(child, push))
            .is_some_and(|t| now.saturating_sub(*t) < 60_000)
    }

    /// Applies the reloadable part of a re-read `[hub]`: the children (with the
    /// credentials of rotations in progress), their catchment rules and descendants,
    /// and the TLS files. All or nothing: on error nothing changed. A rule that is new
    /// is applied to the Patients already held (so a clinic enrolled without a restart
    /// gets its patients); the change of children is audited. Returns what was applied.
    pub fn reload(&self, hub: &HubSection) -> Result<String, String> {
        let children = children_of(hub)?;
        let previous = previous_tokens_of(hub)?;
        let tls = match (&self.serving.tls, &hub.tls_cert_file, &hub.tls_key_file) {
            (Some(tls), Some(cert), Some(key)) => {
                tls.reload_from(cert, key).map_err(|e| e.to_string())?;
                format!(", certificate {} reloaded", cert.display())
            }
            (None, None, None) => String::new(),
            _ => {
                tracing::warn!("hub.tls_cert_file/tls_key_file added or removed: switching between HTTP and HTTPS takes a restart");
                String::new()
            }
        };
        let old_policy = self.policy();
        let mut policy = (*old_policy).clone();
        policy.catchment = hub.catchment.clone();
        policy.descendants = hub
            .children
            .iter()
            .filter(|c| !c.descendants.is_empty())
            .map(|c| (c.node.clone(), c.descendants.clone()))
            .collect();
        let new_rules: Vec<_> = policy
            .catchment
            .iter()
            .filter(|r| !old_policy.catchment.contains(r))
            .cloned()
            .collect();
        let (before, n) = {
            let old = self.children.read().unwrap_or_else(|p| p.into_inner());
            (
                old.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
                children.len(),
            )
        };
        let added: Vec<&str> = children
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !before.iter().any(|b| b == n))
            .collect();
        let removed: Vec<&str> = before
            .iter()
            .map(String::as_str)
            .filter(|b| !children.iter().any(|(n, _)| n == b))
            .collect();
        let mut detail = Vec::new();
        if !added.is_empty() {
            detail.push(format!("added {}", added.join(",")));
        }
        if !removed.is_empty() {
            detail.push(format!("removed {}", removed.join(",")));
        }
        let backfilled = self
            .apply_new_rules(&new_rules, &detail.join("; "))
            .map_err(|e| format!("applying the new catchment rules: {e}"))?;
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
        self.set_previous_tokens(previous);
        self.set_children(children);
        let mut applied = format!("{n} children");
        if !detail.is_empty() {
            applied.push_str(&format!(" ({})", detail.join("; ")));
        }
        if backfilled > 0 {
            applied.push_str(&format!(
                ", {backfilled} patients entered catchments by new rules"
            ));
        }
        Ok(format!("{applied}{tls}"))
    }

    /// Puts the Patients already held that match `rules` into those catchments, and
    /// audits the change of children (`detail`, if any), in one transaction.
    fn apply_new_rules(
        &self,
        rules: &[engine::CatchmentRule],
        detail: &str,
    ) -> Result<usize, crate::store::StoreError> {
        if rules.is_empty() && detail.is_empty() {
            return Ok(0);
        }
        let patients = if rules.is_empty() {
            Vec::new()
        } else {
            self.reader
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .list(Some("Patient"))?
        };
        let mut store = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut tx = store.begin()?;
        let mut added = 0;
        for p in patients.iter().filter(|p| !p.version.deleted) {
            let body = p.version.snapshot.json();
            for r in rules.iter().filter(|r| r.matches(&body)) {
                if tx.add_to_catchment(&r.node, &p.version.key().id, CatchmentReason::Rule)? {
                    added += 1;
                }
            }
        }
        if !detail.is_empty() {
            tx.audit(wall_ms(), "reload", "children", "hub.children", "", detail)?;
        }
        tx.commit()?;
        Ok(added)
    }
}

fn contact_slot(child: &str, push: bool) -> String {
    format!("{}{child}", if push { "push:" } else { "pull:" })
}

/// Peer names under which a hub keeps its children's last contact in `peer_state`.
pub const CHILD_PEER_PREFIX: &str = "child:";

/// Why a credential was not accepted.
pub enum Credential {
    Unknown,
    /// It was a child's previous credential, and its overlap ended.
    Replaced {
        node: String,
        until: u64,
    },
}

/// The credentials of rotations in progress: (child, hash, accepted until, epoch ms).
pub fn previous_tokens_of(hub: &HubSection) -> Result<Vec<(String, [u8; 32], u64)>, String> {
    hub.children
        .iter()
        .filter_map(|c| c.previous().map(|(h, until)| (c, h, until)))
        .map(|(c, hash, until)| {
            let mut h = [0u8; 32];
            hex::decode_to_slice(hash, &mut h).map_err(|_| {
                format!(
                    "hub.children {:?}: previous_token_sha256 is not 64 hex characters",
                    c.node
                )
            })?;
            Ok((c.node.clone(), h, until))
        })
        .collect()
}

/// The children `[hub]` lists, with their credential hashes decoded.
pub fn children_of(hub: &HubSection) -> Result<Vec<(String, [u8; 32])>, String> {
    hub.children
        .iter()
        .map(|c| {
            let mut h = [0u8; 32];
            hex::decode_to_slice(&c.token_sha256, &mut h).map_err(|_| {
                format!(
                    "hub.children {:?}: token_sha256 is not 64 hex characters",
                    c.node
                )
            })?;
            Ok((c.node.clone(), h))
        })
        .collect()
}

/// What a hub has served since it started (`/metrics` renders them).
#[derive(Debug, Default)]
pub struct Counters {
    pub push_requests: AtomicU64,
    pub pull_requests: AtomicU64,
    /// Exchanges that carried a push and a pull together (each also counts as one
    /// push and one pull request).
    pub sync_requests: AtomicU64,
    pub records_received: AtomicU64,
    pub records_rejected: AtomicU64,
    pub records_served: AtomicU64,
    pub refusals: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

pub fn router(state: Arc<HubState>) -> Router {
    Router::new()
        .route("/v1/health", get(|| async { "ok\n" }))
        .route(
            "/v1/push",
            post(|State(s), r| endpoint(s, r, "push_request")),
        )
        .route(
            "/v1/pull",
            post(|State(s), r| endpoint(s, r, "pull_request")),
        )
        .route(
            "/v1/sync",
            post(|State(s), r| endpoint(s, r, "sync_request")),
        )
        .route(
            "/v1/fetch",
            post(|State(s), r| endpoint(s, r, "fetch_request")),
        )
        .route("/v1/chunk", post(|State(s), r| endpoint(s, r, "chunk")))
        // Our own reader enforces the limit (see `read_body`).
        .layer(DefaultBodyLimit::disable())
        // Every answer carries the hub's clock: clinics compare theirs with it.
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            |State(s): State<Arc<HubState>>, mut r: Response| async move {
                if let Ok(v) = HeaderValue::from_str(&crate::time::http_date(s.now())) {
                    r.headers_mut().insert(header::DATE, v);
                }
                r
            },
        ))
        .with_state(state)
}

/// How the hub serves connections (`[hub]` keys in brackets).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Connections open at once (`max_connections`).
    pub max_connections: usize,
    /// Connect (or a request's first byte) to the end of its headers (`header_timeout_secs`).
    pub header_timeout: Duration,
    /// A kept-alive connection with nothing moving (`idle_timeout_secs`).
    pub idle_timeout: Duration,
    /// The whole request body (`body_timeout_secs`).
    pub body_timeout: Duration,
    /// Requests decoded and handled at once (`max_concurrent_requests`).
    pub max_concurrent_requests: usize,
    /// HTTPS (`tls_cert_file`, `tls_key_file`); `None` serves plain HTTP.
    pub tls: Option<Arc<ServerTls>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(120),
            max_concurrent_requests: std::thread::available_parallelism()
                .map(|n| n.get() * 2)
                .unwrap_or(4),
            tls: None,
        }
    }
}

impl ServeOptions {
    /// The options `[hub]` asks for; loads the TLS files when it names them.
    pub fn from_config(hub: &HubSection) -> Result<ServeOptions, TlsError> {
        let tls = match (&hub.tls_cert_file, &hub.tls_key_file) {
            (Some(cert), Some(key)) => Some(ServerTls::load(cert, key)?),
            _ => None,
        };
        Ok(ServeOptions {
            max_connections: hub.max_connections.max(1),
            header_timeout: Duration::from_secs(hub.header_timeout_secs.max(1)),
            idle_timeout: Duration::from_secs(hub.idle_timeout_secs.max(1)),
            body_timeout: Duration::from_secs(hub.body_timeout_secs.max(1)),
            max_concurrent_requests: hub.concurrent_requests().max(1),
            tls,
        })
    }
}

/// `Retry-After` of a busy answer: a request slot frees in well under a second
/// unless the hub is overloaded, and then the client waits again.
pub const BUSY_RETRY_AFTER_SECS: u64 = 1;
/// After answering, how long and how much the hub reads and discards before closing.
/// Discarding costs an 8 KiB buffer and at most two seconds, never memory; 4 MiB lets
/// a clinic on a fast link that sent an over-limit batch read its 413 (and halve the
/// batch) instead of a reset, which it could not tell from a cut link.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
pub const LINGER_BYTES: usize = 4 << 20;
/// hyper's read buffer per connection (request headers must fit in it).
const READ_BUFFER: usize = 64 << 10;

/// Request slots and the budget of body bytes being received.
struct Gate {
    requests: Arc<Semaphore>,
    /// In KiB.
    body_kib: Arc<Semaphore>,
    body_total_kib: usize,
}

/// One request being decoded and handled; dropping it frees the slot.
pub struct RequestSlot(#[allow(dead_code)] OwnedSemaphorePermit);

impl Gate {
    fn new(max_requests: usize, max_message: usize) -> Gate {
        let body_total_kib = (2 * max_requests.max(1))
            .saturating_mul(max_message)
            .div_ceil(1024)
            .clamp(1, u32::MAX as usize);
        Gate {
            requests: Arc::new(Semaphore::new(max_requests.max(1))),
            body_kib: Arc::new(Semaphore::new(body_total_kib)),
            body_total_kib,
        }
    }

    fn try_request(&self) -> Option<RequestSlot> {
        self.requests
            .clone()
            .try_acquire_owned()
            .ok()
            .map(RequestSlot)
    }

    fn reserve_body(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let kib = bytes.div_ceil(1024).clamp(1, self.body_total_kib) as u32;
        self.body_kib.clone().try_acquire_many_owned(kib).ok()
    }
}

/// Serves children on `listener` until `shutdown` completes, with the limits of
/// `state`'s [`ServeOptions`] (see the module header); in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HubState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let max = state.serving.max_connections;
    bound_receive_buffers(&listener);
    let slots = Arc::new(Semaphore::new(max));
    let app = router(state.clone());
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let mut warned: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if warned.map_or(true, |t: Instant| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(node = %state.node_id, max_connections = max,
                        "connection cap reached; new connections wait in the accept queue");
                    warned = Some(Instant::now());
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    _ = &mut shutdown => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = connection(
            stream,
            peer,
            state.clone(),
            app.clone(),
            closing_rx.clone(),
            slot,
        );
        let span = tracing::debug_span!("hub", node = %state.node_id);
        tokio::spawn(tracing::Instrument::instrument(conn, span));
    }
    drop(listener);
    let _ = closing_tx.send(true);
    // Every connection holds a slot until it ends: all slots back = all done.
    let _ = slots.acquire_many(max as u32).await;
    Ok(())
}

/// An `accept` error: a connection that died in the queue is skipped; anything else
/// (out of file descriptors, memory) is logged and waited out, never spun on.
/// The kernel receive buffer of each child's connection (the kernel doubles it for
/// its bookkeeping). Without a bound Linux grows it with the sender's pace, up to
/// `net.ipv4.tcp_rmem`'s maximum (32 MiB here): a peer could park most of a 16 MiB
/// body in the hub's kernel before the hub has read its credential, on every
/// connection it opens. 512 KiB still carries a clinic's link many times over
/// (128 kbit/s at 600 ms needs 10 KiB in flight) and a district on a LAN at
/// hundreds of MB/s.
const RECEIVE_BUFFER: libc::c_int = 512 << 10;

/// Sets [`RECEIVE_BUFFER`] on the listener, which every accepted connection
/// inherits (with the window scale it negotiates). A failure is logged: the hub
/// serves as before, with the kernel's default.
fn bound_receive_buffers(listener: &TcpListener) {
    use std::os::fd::AsRawFd;
    let size = RECEIVE_BUFFER;
    // SAFETY: a valid socket descriptor owned by `listener`, and a pointer to an
    // int that lives across the call, with its size.
    let done = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if done != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not bound the receive buffer of children's connections");
    }
}

async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) {
        return;
    }
    tracing::warn!(error = %e, "accept failed (out of file descriptors? see LimitNOFILE); pausing");
    tokio::time::sleep(Duration::from_millis(250)).await;
}

/// One connection: TLS handshake when configured, then HTTP/1.1 requests until the
/// client closes, a timeout, or shutdown.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<HubState>,
    app: Router,
    closing: tokio::sync::watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let clock = Arc::new(ConnClock::new());
    let Some(tls) = state.serving.tls.clone() else {
        let io = Watched::new(stream, clock.clone());
        return drive(io, clock, peer, &state, app, closing).await;
    };
    let deadline = tokio::time::Instant::now() + state.serving.header_timeout;
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0].is_ascii_alphabetic() => return plain_http_to_tls(stream).await,
        Ok(Ok(1)) => {}
        _ => return,
    }
    let handshake = tls.acceptor().accept(Watched::new(stream, clock.clone()));
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(io)) => drive(io, clock, peer, &state, app, closing).await,
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake too slow (hub.header_timeout_secs)"),
    }
}

/// A plain HTTP request on the HTTPS port: say so in plain HTTP, then close.
async fn plain_http_to_tls(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = "this hub serves HTTPS: use an https:// URL\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Ok(Ok(())) = tokio::time::timeout(LINGER_TIME, stream.write_all(answer.as_bytes())).await
    {
        linger(stream).await;
    }
}

/// Runs hyper's HTTP/1.1 connection over `io` under the [`ConnClock`] timeouts.
async fn drive<IO>(
    io: IO,
    clock: Arc<ConnClock>,
    peer: SocketAddr,
    state: &HubState,
    app: Router,
    mut closing: tokio::sync::watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let opts = &state.serving;
    let service = HubService {
        app,
        clock: clock.clone(),
        peer,
    };
    let mut conn = hyper::server::conn::http1::Builder::new()
        // ConnClock times headers: hyper's timer would also cut idle keep-alives.
        .header_read_timeout(None)
        .max_buf_size(READ_BUFFER)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    let period = (opts.header_timeout.min(opts.idle_timeout) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining = false;
    let finished = loop {
        tokio::select! {
            done = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break Some(done),
            _ = tick.tick() => {
                if let Some(why) = clock.expired(opts) {
                    tracing::debug!(%peer, why, "closing connection");
                    break None;
                }
            }
            _ = closing.wait_for(|c| *c), if !draining => {
                draining = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    match finished {
        Some(Ok(())) => linger(conn.into_parts().io.into_inner()).await,
        Some(Err(e)) => tracing::debug!(%peer, error = %e, "connection failed"),
        None => {}
    }
}

/// Half-closes, then reads and discards what the client still sends (bounded), so
/// our answer is not destroyed by the reset that closing on unread bytes causes.
async fn linger<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    if !matches!(
        tokio::time::timeout_at(deadline, io.shutdown()).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let mut buf = [0u8; 8192];
    let mut seen = 0;
    while seen < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen += n,
            _ => break,
        }
    }
}

/// The peer address of a request (for logs).
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

/// The axum router as a hyper service, marking when each request starts and ends.
#[derive(Clone)]
struct HubService {
    app: Router,
    clock: Arc<ConnClock>,
    peer: SocketAddr,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for HubService {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Response, std::convert::Infallible>>;

    fn call(&self, req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let busy = Busy::start(self.clock.clone());
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(Peer(self.peer));
        let mut app = self.app.clone();
        Box::pin(async move {
            let answer = tower_service::Service::call(&mut app, req).await;
            drop(busy);
            answer
        })
    }
}

/// Marks a request in progress on its connection's clock for as long as it lives.
struct Busy(Arc<ConnClock>);

impl Busy {
    fn start(clock: Arc<ConnClock>) -> Busy {
        clock.busy.fetch_add(1, Ordering::Relaxed);
        clock.requests.fetch_add(1, Ordering::Relaxed);
        clock.head_started.store(NOT_STARTED, Ordering::Relaxed);
        Busy(clock)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.last_io.store(self.0.now(), Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

const NOT_STARTED: u64 = u64::MAX;

/// What a connection is doing, in milliseconds since it was accepted, for the
/// header and idle timeouts. Updated by [`Watched`] (bytes moving) and [`Busy`]
/// (requests in progress); read by [`drive`]'s ticker.
struct ConnClock {
    start: Instant,
    last_io: AtomicU64,
    /// The first byte of the next request's headers, or `NOT_STARTED`.
    head_started: AtomicU64,
    busy: AtomicU32,
    requests: AtomicU64,
}

impl ConnClock {
    fn new() -> ConnClock {
        ConnClock {
            start: Instant::now(),
            last_io: AtomicU64::new(0),
            head_started: AtomicU64::new(NOT_STARTED),
            busy: AtomicU32::new(0),
            requests: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn read(&self) {
        let now = self.now();
        self.last_io.store(now, Ordering::Relaxed);
        if self.busy.load(Ordering::Relaxed) == 0 {
            let _ = self.head_started.compare_exchange(
                NOT_STARTED,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn wrote(&self) {
        self.last_io.store(self.now(), Ordering::Relaxed);
    }

    /// Why the connection should be closed now, if it should. A request in progress
    /// is bounded elsewhere (body timeout, the handler), never here.
    fn expired(&self, o: &ServeOptions) -> Option<&'static str> {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let now = self.now();
        let header = o.header_timeout.as_millis() as u64;
        if self.requests.load(Ordering::Relaxed) == 0 {
            return (now > header).then_some(
                "no complete request headers in hub.header_timeout_secs after connecting",
            );
        }
        let head = self.head_started.load(Ordering::Relaxed);
        if head != NOT_STARTED {
            return (now.saturating_sub(head) > header)
                .then_some("request headers too slow (hub.header_timeout_secs)");
        }
        let idle = now.saturating_sub(self.last_io.load(Ordering::Relaxed));
        (idle > o.idle_timeout.as_millis() as u64).then_some("idle (hub.idle_timeout_secs)")
    }
}

/// A stream that tells its [`ConnClock`] when bytes move.
struct Watched<S> {
    inner: S,
    clock: Arc<ConnClock>,
}

impl<S> Watched<S> {
    fn new(inner: S, clock: Arc<ConnClock>) -> Watched<S> {
        Watched { inner, clock }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut body = msg.into();
    body.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// A refusal after which the connection closes: the body was not (fully) read.
fn closing(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut r = text(status, msg);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// 503 with `Retry-After`.
fn busy(msg: impl Into<String>, close: bool) -> Response {
    let mut r = if close {
        closing(StatusCode::SERVICE_UNAVAILABLE, msg)
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, msg)
    };
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(BUSY_RETRY_AFTER_SECS),
    );
    r
}

fn reply(msg: &Message, encoding: wire::Encoding) -> Response {
    match wire::encode_as(msg, wire::LEVEL_FAST, encoding) {
        Ok(bytes) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, wire::CONTENT_TYPE)],
            bytes,
        )
            .into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Why a request was refused: an HTTP status (MQTT carries the same number) and a
/// reason naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
    /// For this hub's operator, never sent: what in its own store is damaged.
    pub corrupt: Option<String>,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            status: status.as_u16(),
            reason: reason.into(),
            corrupt: None,
        }
    }
}

fn wire_refusal(e: WireError) -> Refusal {
    let status = match e {
        WireError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        // The child sends the frame again unchained (crate::transport::http).
        WireError::UnknownPrefix(_) => StatusCode::PRECONDITION_FAILED,
        _ => StatusCode::BAD_REQUEST,
    };
    Refusal::new(status, e.to_string())
}

fn engine_refusal(e: EngineError) -> Refusal {
    match e {
        EngineError::Forbidden(m) => Refusal::new(StatusCode::FORBIDDEN, m),
        EngineError::Invalid(m) => Refusal::new(StatusCode::BAD_REQUEST, m),
        // A pushed record its block could not build, found while the push was
        // applied: refused as a frame found undecodable before.
        EngineError::Undecodable(e) => wire_refusal(e),
        e @ EngineError::Model { .. } => Refusal::new(StatusCode::BAD_REQUEST, e.to_string()),
        // The child learns only that the hub cannot serve now (the detail may name
        // records outside its catchment); the hub stops for a technician.
        e if e.is_corruption() => {
            tracing::error!(error = %e, "the hub's store is corrupt: stopping");
            Refusal {
                corrupt: Some(e.to_string()),
                ..Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the hub cannot serve now (its store needs a technician); nothing of this request was applied",
                )
            }
        }
        e if e.is_retryable() => Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store busy, retry later: {e}"),
        ),
        e => {
            tracing::error!(error = %e, "hub failed to handle a request");
            Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

impl HubState {
    /// The damage a request met in this hub's store, if any (the node stops).
    pub fn corruption(&self) -> Option<HubCorrupt> {
        self.corrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .map(|what| HubCorrupt { what })
    }

    /// Completes when a request has met a damaged store.
    pub async fn corrupted(&self) {
        let mut seen = self.corrupt_seen.subscribe();
        let _ = seen.wait_for(|c| *c).await;
    }

    /// Answers one request frame from `child`, already authenticated by the
    /// transport. `expect` is the request kind an HTTP endpoint takes; MQTT takes any.
    /// Large answers stored as transfers are encoded in v1 (see [`HubState::answer_for`]).
    pub fn answer(
        &self,
        child: &str,
        frame: &[u8],
        expect: Option<&'static str>,
    ) -> Result<Message, Refusal> {
        self.answer_for(child, frame, expect, wire::Encoding::V1)
    }

    /// [`HubState::answer`] for a child that reads `encoding` (negotiated per
    /// exchange): answers this hub stores as transfers (large pull pages, answers of
    /// chunked uploads) are encoded in it.
    pub fn answer_for(
        &self,
        child: &str,
        frame: &[u8],
        expect: Option<&'static str>,
        encoding: wire::Encoding,
    ) -> Result<Message, Refusal> {
        self.note_corrupt(self.answer_checked(child, frame, expect, encoding, false))
    }

    /// Notes a refusal that met a damaged store (the daemon stops for it).
    fn note_corrupt(&self, answered: Result<Message, Refusal>) -> Result<Message, Refusal> {
        if let Err(Refusal {
            corrupt: Some(what),
            ..
        }) = &answered
        {
            let mut slot = self.corrupt.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(what.clone());
            }
            self.corrupt_seen.send_replace(true);
        }
        answered
    }

    /// [`HubState::answer_for`] of a request that announced `chain`: the payload of
    /// a push in it is kept as the prefix of the child's next chained frame
    /// ([`wire::chain`]).
    pub fn answer_keeping(
        &self,
        child: &str,
        frame: &[u8],
        expect: Option<&'static str>,
        encoding: wire::Encoding,
        keep: bool,
    ) -> Result<Message, Refusal> {
        self.note_corrupt(self.answer_checked(child, frame, expect, encoding, keep))
    }

    fn answer_checked(
        &self,
        child: &str,
        frame: &[u8],
        expect: Option<&'static str>,
        encoding: wire::Encoding,
        keep: bool,
    ) -> Result<Message, Refusal> {
        // A hub set to an older protocol refuses newer frames as that hub would.
        let reads = self.accept().version;
        let chains = || self.chains.lock().unwrap_or_else(|p| p.into_inner());
        let find = |id: &[u8; 8]| chains().find(child, id, Instant::now());
        let refuse = |e: WireError| {
            if let WireError::UnknownPrefix(_) = e {
                // Routine after a restart: the child sends it again unchained.
                tracing::info!(peer = %child, error = %e, "chained request refers to a push this hub does not hold; asked again unchained");
            } else {
                tracing::warn!(peer = %child, error = %e, "undecodable request");
            }
            wire_refusal(e)
        };
        let mut inflated = wire::check_header(frame)
            .and_then(|v| {
                if v > reads {
                    Err(WireError::UnsupportedVersion {
                        got: v,
                        supported: reads,
                    })
                } else {
                    wire::inflate_keeping(frame, &self.limits, Some(&find))
                }
            })
            .map_err(refuse)?;
        // A push's records stay in their block until the push is applied: each is
        // built on the thread that checks it (`engine::handle_push_block`).
        let (answer, pushes) = match inflated.decode(&self.limits) {
            Err(e) => return Err(refuse(e)),
            Ok((msg, block)) => {
                let pushes =
                    wire::v2::pushes_records(&msg) || block.as_ref().is_some_and(|b| !b.is_empty());
                let answer = self.answer_message(child, msg, block, frame.len(), expect, encoding);
                (answer, pushes)
            }
        };
        // Only an applied push is the child's next prefix: a child moves its chain on
        // only when answered, and a refused payload kept would push out the one it
        // chains against.
        if let (true, true, true, Some(payload)) =
            (keep, pushes, answer.is_ok(), inflated.into_payload())
        {
            if let Some(prefix) = wire::v2::Prefix::of(payload) {
                chains().keep(child, prefix, Instant::now());
            }
        }
        answer
    }

    /// The answer to a decoded request `msg` (`block`: a push's records still in
    /// their v2 block) of `frame_len` bytes.
    fn answer_message(
        &self,
        child: &str,
        msg: Message,
        block: Option<wire::v2::RecordBlock<'_>>,
        frame_len: usize,
        expect: Option<&'static str>,
        encoding: wire::Encoding,
    ) -> Result<Message, Refusal> {
        if let Some(kind) = expect {
            let fits = msg.name() == kind || (kind == "chunk" && msg.name().starts_with("chunk_"));
            if !fits {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("expected a {kind}, got a {}", msg.name()),
                ));
            }
        }
        match msg {
            Message::PushRequest(req) => Ok(Message::PushResponse(
                self.push(child, req, block, frame_len)?,
            )),
            Message::PullRequest(req) => {
                let chunk = req.answer_chunk;
                let answer = Message::PullResponse(self.pull(child, &req, frame_len)?);
                self.answer_in_pieces(child, answer, chunk, encoding)
            }
            Message::SyncRequest(req) => {
                // The push is committed before the pull is read: the page is what the
                // hub holds after it, and an answer lost on the way costs a re-sent
                // batch (answered as duplicates), never a lost record.
                let push = self.push(child, req.push, block, frame_len)?;
                let chunk = req.pull.answer_chunk;
                let pull = self.pull(child, &req.pull, 0)?;
                Counters::add(&self.counters.sync_requests, 1);
                self.answer_in_pieces(
                    child,
                    Message::SyncResponse(wire::SyncResponse { push, pull }),
                    chunk,
                    encoding,
                )
            }
            Message::FetchRequest(req) => {
                let store = self.reader.lock().unwrap_or_else(|p| p.into_inner());
                let resp = engine::handle_fetch(&store, child, &req).map_err(engine_refusal)?;
                if resp.results.iter().all(|r| r.record.is_none()) {
                    let why: Vec<String> = resp
                        .results
                        .iter()
                        .filter_map(|r| r.refused.clone())
                        .collect();
                    tracing::warn!(peer = %child, refused = %why.join("; "), "fetch refused");
                    return Err(Refusal::new(StatusCode::FORBIDDEN, why.join("; ")));
                }
                Ok(Message::FetchResponse(resp))
            }
            Message::ChunkQuery(r) => {
                let mut store = self.writer.lock().unwrap_or_else(|p| p.into_inner());
                let tx = store.begin().map_err(|e| engine_refusal(e.into()))?;
                let received = tx
                    .transfer_state(&TransferKey {
                        node: child,
                        id: &r.id,
                        dir: TransferDir::Up,
                    })
                    .map_err(|e| engine_refusal(e.into()))?
                    .map(|(_, got)| got)
                    .unwrap_or(0);
                Ok(Message::ChunkAck(wire::ChunkAck { id: r.id, received }))
            }
            Message::ChunkPut(c) => {
                // An upload reassembles into one request frame: never larger than
                // the body this hub accepts in one piece.
                let max = self.limits.max_compressed as u64;
                if c.total > max {
                    return Err(Refusal::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "transfer of {} bytes is over the limit of {max} bytes (hub.max_message_bytes)",
                            c.total
                        ),
                    ));
                }
                if <[u8; 32]>::from(Sha256::digest(&c.data)) != c.sha {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "chunk checksum does not match its data",
                    ));
                }
                let mut store = self.writer.lock().unwrap_or_else(|p| p.into_inner());
                let received = (|| -> Result<Result<u64, Refusal>, crate::store::StoreError> {
                    let mut tx = store.begin()?;
                    let key = TransferKey {
                        node: child,
                        id: &c.id,
                        dir: TransferDir::Up,
                    };
                    if tx.transfer_state(&key)?.is_none() {
                        if let Err(r) = make_room(&mut tx, child, TransferDir::Up, c.total)? {
                            return Ok(Err(r));
                        }
                    }
                    let r = tx.transfer_append(&key, c.total, c.offset, &c.data, wall_ms())?;
                    tx.commit()?;
                    Ok(Ok(r))
                })()
                .map_err(|e| engine_refusal(e.into()))??;
                drop(store);
                if c.run > 0 && received == c.total {
                    // The last piece: run the upload now, one round trip saved.
                    return self.run_transfer(
                        child,
                        &wire::ChunkRef {
                            id: c.id,
                            total: c.total,
                            answer_chunk: c.run,
                        },
                        encoding,
                    );
                }
                Ok(Message::ChunkAck(wire::ChunkAck { id: c.id, received }))
            }
            Message::ChunkRun(r) => self.run_transfer(child, &r, encoding),
            Message::ChunkGet(g) => {
                let mut store = self.writer.lock().unwrap_or_else(|p| p.into_inner());
                let tx = store.begin().map_err(|e| engine_refusal(e.into()))?;
                let Some((total, _)) = tx
                    .transfer_state(&TransferKey {
                        node: child,
                        id: &g.id,
                        dir: TransferDir::Down,
                    })
                    .map_err(|e| engine_refusal(e.into()))?
                else {
                    return Err(Refusal::new(
                        StatusCode::NOT_FOUND,
                        "no such answer to fetch (expired?)",
                    ));
                };
                let data = tx
                    .transfer_read(
                        &TransferKey {
                            node: child,
                            id: &g.id,
                            dir: TransferDir::Down,
                        },
                        g.offset,
                        g.max.clamp(1, MAX_CHUNK),
                    )
                    .map_err(|e| engine_refusal(e.into()))?;
                let sha = Sha256::digest(&data).into();
                Ok(Message::ChunkData(wire::ChunkPut {
                    id: g.id,
                    total,
                    offset: g.offset,
                    data,
                    sha,
                    run: 0,
                }))
            }
            other => Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("a {} is not a request", other.name()),
            )),
        }
    }

    /// Applies a pushed batch (one transaction, committed before this returns).
    fn push(
        &self,
        child: &str,
        req: wire::PushRequest,
        block: Option<wire::v2::RecordBlock<'_>>,
        bytes: usize,
    ) -> Result<wire::PushResponse, Refusal> {
        let n = req.records.len() + block.as_ref().map_or(0, |b| b.len());
        let mut store = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let (policy, now) = (self.policy(), self.now());
        let resp = match block {
            Some(block) => engine::handle_push_block(&mut store, &policy, child, req, block, now),
            None => engine::handle_push(&mut store, &policy, child, req, now),
        }
        .map_err(|e| {
            if let EngineError::Undecodable(e) = &e {
                tracing::warn!(peer = %child, error = %e, "undecodable request");
            }
            engine_refusal(e)
        })?;
        self.note_contact(&mut store, child, true, bytes as u64, true);
        self.checkpointer.nudge();
        let rejected = resp
            .results
            .iter()
            .filter(|r| matches!(r.outcome, wire::Outcome::Rejected { .. }))
            .count();
        tracing::info!(peer = %child, direction = "push", records = n, rejected, bytes, "push applied");
        let c = &self.counters;
        Counters::add(&c.push_requests, 1);
        Counters::add(&c.records_received, n as u64);
        Counters::add(&c.records_rejected, rejected as u64);
        Ok(resp)
    }

    /// Takes the health reports and order results a pull carries, then reads the
    /// page.
    fn pull(
        &self,
        child: &str,
        req: &wire::PullRequest,
        bytes: usize,
    ) -> Result<wire::PullResponse, Refusal> {
        if !req.health.is_empty() {
            let mut store = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let policy = self.policy();
            let below = policy
                .descendants
                .get(child)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let dropped = crate::health::receive(
                &mut store,
                child,
                below,
                &req.health,
                policy.max_clock_ahead_ms,
                self.now(),
            )
            .map_err(|e| engine_refusal(e.into()))?;
            if dropped > 0 {
                tracing::warn!(peer = %child, dropped, "health reports for nodes that are not this child or below it were dropped");
            }
        }
        if !req.order_results.is_empty() {
            let mut store = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            crate::remote::receive_results(&mut store, child, &req.order_results, wall_ms())
                .map_err(|e| engine_refusal(e.into()))?;
        }
        let resp = {
            let store = self.reader.lock().unwrap_or_else(|p| p.into_inner());
            engine::handle_pull(&store, &self.policy(), child, req).map_err(engine_refusal)?
        };
        if self.contact_due(child, false, wall_ms()) {
            let mut store = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            self.note_contact(&mut store, child, false, bytes as u64, false);
        }
        tracing::debug!(peer = %child, direction = "pull", records = resp.records.len(), cursor = %resp.next, "pull served");
        Counters::add(&self.counters.pull_requests, 1);
        Counters::add(&self.counters.records_served, resp.records.len() as u64);
        Ok(resp)
    }

    /// A pull's answer as it is when the child asked for one piece (`chunk` 0), or,
    /// when larger than `chunk`, as a transfer with its first chunk in this answer.
    fn answer_in_pieces(
        &self,
        child: &str,
        answer: Message,
        chunk: u64,
        encoding: wire::Encoding,
    ) -> Result<Message, Refusal> {
        if chunk == 0 {
            return Ok(answer);
        }
        self.as_transfer(child, answer, chunk.clamp(1024, MAX_CHUNK), true, encoding)
    }

    /// Runs a fully received upload as the request it is, and answers it directly
    /// or, when the answer is large, as a transfer to fetch in chunks.
    fn run_transfer(
        &self,
        child: &str,
        r: &wire::ChunkRef,
        encoding: wire::Encoding,
    ) -> Result<Message, Refusal> {
        let frame = {
            let mut store = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let tx = store.begin().map_err(|e| engine_refusal(e.into()))?;
            match tx
                .transfer_state(&TransferKey {
                    node: child,
                    id: &r.id,
                    dir: TransferDir::Up,
                })
                .map_err(|e| engine_refusal(e.into()))?
            {
                Some((total, got)) if got == total => {}
                Some((total, got)) => {
                    return Err(Refusal::new(
                        StatusCode::CONFLICT,
                        format!("transfer incomplete: {got} of {total} bytes"),
                    ))
                }
                None => {
                    return Err(Refusal::new(
                        StatusCode::NOT_FOUND,
                        "no such transfer (expired?): send it again",
                    ))
                }
            }
            tx.transfer_read(
                &TransferKey {
                    node: child,
                    id: &r.id,
                    dir: TransferDir::Up,
                },
                0,
                u64::MAX,
            )
            .map_err(|e| engine_refusal(e.into()))?
        };
        if <[u8; 32]>::from(Sha256::digest(&frame)) != r.id {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "reassembled transfer does not match its checksum",
            ));
        }
        // The message's kind, its records left unbuilt (a push is built once, when
        // it is answered below).
        let nested = wire::inflate_keeping(&frame, &self.limits, None)
            .and_then(|mut f| {
                f.decode(&self.limits)
                    .map(|(m, _)| m.name().starts_with("chunk_"))
            })
            .unwrap_or(false);
        if nested {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "a transfer cannot carry another transfer",
            ));
        }
        if let Some(ready) = self.ran_before(child, &r.id) {
            return Ok(ready);
        }
        let answer = self.answer_for(child, &frame, None, encoding)?;
        let inline = if r.answer_chunk == 0 {
            MAX_CHUNK
        } else {
            r.answer_chunk.clamp(1024, MAX_CHUNK)
        };
        let answer = self.as_transfer(child, answer, inline, false, encoding)?;
        if matches!(answer, Message::ChunkReady(_)) {
            let mut ran = self.ran.lock().unwrap_or_else(|p| p.into_inner());
            if ran.len() >= RAN_KEPT {
                ran.pop_front();
            }
            ran.push_back((child.to_string(), r.id, answer.clone()));
        }
        Ok(answer)
    }

    /// The `ChunkReady` of an upload this child already ran, if its answer is still
    /// held for fetching.
    fn ran_before(&self, child: &str, id: &[u8; 32]) -> Option<Message> {
        let found = {
            let ran = self.ran.lock().unwrap_or_else(|p| p.into_inner());
            ran.iter()
                .find(|(c, i, _)| c == child && i == id)
                .map(|(_, _, m)| m.clone())?
        };
        let Message::ChunkReady(ready) = &found else {
            return None;
        };
        let mut store = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let tx = store.begin().ok()?;
        let held = tx
            .transfer_state(&TransferKey {
                node: child,
                id: &ready.id,
                dir: TransferDir::Down,
            })
            .ok()??;
        (held.0 == ready.received).then_some(found)
    }

    /// An answer of at most `chunk` bytes as it is; a larger one stored as a transfer
    /// to fetch by `ChunkGet`, announced by `ChunkReady` or, with `first`, by its
    /// first chunk.
    fn as_transfer(
        &self,
        child: &str,
        answer: Message,
        chunk: u64,
        first: bool,
        encoding: wire::Encoding,
    ) -> Result<Message, Refusal> {
        let bytes = wire::encode_as(&answer, wire::LEVEL_BULK, encoding)
            .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        if bytes.len() <= chunk as usize {
            return Ok(answer);
        }
        let id: [u8; 32] = Sha256::digest(&bytes).into();
        let mut store = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        (|| -> Result<Result<(), Refusal>, crate::store::StoreError> {
            let mut tx = store.begin()?;
            let key = TransferKey {
                node: child,
                id: &id,
                dir: TransferDir::Down,
            };
            if tx.transfer_state(&key)?.is_none() {
                if let Err(r) = make_room(&mut tx, child, TransferDir::Down, bytes.len() as u64)? {
                    return Ok(Err(r));
                }
            }
            tx.transfer_store(&key, &bytes, MAX_CHUNK as usize, wall_ms())?;
            tx.commit()?;
            Ok(Ok(()))
        })()
        .map_err(|e| engine_refusal(e.into()))??;
        if first {
            let data = bytes[..chunk as usize].to_vec();
            return Ok(Message::ChunkData(wire::ChunkPut {
                id,
                total: bytes.len() as u64,
                offset: 0,
                sha: Sha256::digest(&data).into(),
                run: 0,
                data,
            }));
        }
        Ok(Message::ChunkReady(wire::ChunkAck {
            id,
            received: bytes.len() as u64,
        }))
    }

    /// Children whose feed has something new since change sequence `since`, and the
    /// head it was checked at.
    pub fn advanced_since(
        &self,
        since: u64,
    ) -> Result<(Vec<String>, u64), crate::store::StoreError> {
        let store = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let (mut nodes, metadata, head) = store.feed_advanced(since)?;
        let children = self.children.read().unwrap_or_else(|p| p.into_inner());
        if metadata {
            nodes = children.iter().map(|(n, _)| n.clone()).collect();
        }
        nodes.retain(|n| children.iter().any(|(c, _)| c == n));
        Ok((nodes, head))
    }
}

/// Before a new transfer of `size` bytes for `child`: forgets expired transfers and
/// the child's oldest ones beyond [`MAX_OPEN_TRANSFERS`]; refuses (503, retry later)
/// when all transfers together would pass [`MAX_TRANSFER_BYTES`]. Quotas are per
/// child and overall, so compressible chunks or many half-finished uploads cannot
/// fill the hub's disk.
fn make_room(
    tx: &mut crate::store::Tx<'_>,
    child: &str,
    dir: TransferDir,
    size: u64,
) -> Result<Result<(), Refusal>, crate::store::StoreError> {
    tx.transfer_gc(wall_ms().saturating_sub(TRANSFER_TTL_MS))?;
    let open = tx.transfers_of(child, dir)?;
    let excess = (open.len() + 1).saturating_sub(MAX_OPEN_TRANSFERS);
    for (id, _) in open.iter().take(excess) {
        tracing::info!(peer = %child, %dir, "forgetting an unfinished transfer: too many open");
        tx.transfer_forget(&TransferKey {
            node: child,
            id,
            dir,
        })?;
    }
    if tx.transfer_bytes()?.saturating_add(size) > MAX_TRANSFER_BYTES {
        tracing::warn!(peer = %child, size, "transfer storage full");
        return Ok(Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the hub's transfer storage is full; retry later",
        )));
    }
    Ok(Ok(()))
}

/// Authenticates an HTTP request from its headers alone; on failure answers 401 and
/// closes the connection without reading the body.
// The error is the finished HTTP answer; boxing it would buy nothing on this path.
#[allow(clippy::result_large_err)]
fn authenticate(
    state: &HubState,
    headers: &HeaderMap,
    peer: Option<Peer>,
) -> Result<String, Response> {
    state.authenticate(headers).map_err(|why| {
        let peer = peer.map(|p| p.0.to_string()).unwrap_or_default();
        match why {
            Credential::Unknown => {
                tracing::warn!(%peer, "request with a missing or unknown credential");
                closing(
                    StatusCode::UNAUTHORIZED,
                    "missing or unknown credential (Authorization: Bearer <token>)",
                )
            }
            Credential::Replaced { node, until } => {
                tracing::warn!(%peer, child = %node, "request with a credential whose rotation overlap ended");
                closing(
                    StatusCode::UNAUTHORIZED,
                    format!(
                        "this credential of {node} was replaced and stopped being accepted at {}: put the new token in parent.token_file",
                        crate::time::fmt_time(until)
                    ),
                )
            }
        }
    })
}

async fn blocking<F>(f: F) -> Response
where
    F: FnOnce() -> Response + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("handler failed: {e}"),
        )
    })
}

/// Reads a request body of at most `limit` bytes within `timeout`. Past the limit or
/// the time it stops reading and answers 413 or 408, closing the connection.
#[allow(clippy::result_large_err)]
async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, Response> {
    use http_body_util::BodyExt;
    let read = async {
        let mut body = body;
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                closing(
                    StatusCode::BAD_REQUEST,
                    format!("request body could not be read: {e}"),
                )
            })?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(closing(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("request body is over the length limit of {limit} bytes (hub.max_message_bytes)"),
                    ));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(closing(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body did not arrive within {} s (hub.body_timeout_secs)",
                    timeout.as_secs()
                ),
            ))
        })
}

/// One request: credential, declared length, buffer budget, body, request slot,
/// then the engine (see the module header for the order and why).
async fn endpoint(state: Arc<HubState>, req: Request, expect: &'static str) -> Response {
    let counted = state.clone();
    let r = answer_request(state, req, expect).await;
    if r.status().is_client_error() || r.status().is_server_error() {
        Counters::add(&counted.counters.refusals, 1);
    }
    r
}

async fn answer_request(state: Arc<HubState>, req: Request, expect: &'static str) -> Response {
    let (parts, body) = req.into_parts();
    let peer = parts.extensions.get::<Peer>().copied();
    // Connection tasks are spawned by us: name the node explicitly (journald NODE).
    let span = tracing::info_span!("hub", node = %state.node_id);
    let authenticated = {
        let _entered = span.enter();
        authenticate(&state, &parts.headers, peer)
    };
    let child = match authenticated {
        Ok(c) => c,
        Err(r) => return r,
    };
    let limit = state.limits.max_compressed;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return closing(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is over the length limit of {limit} bytes (hub.max_message_bytes)"
            ),
        );
    }
    let reserve = declared.map_or(limit, |n| n as usize);
    let Some(budget) = state.gate.reserve_body(reserve) else {
        span.in_scope(|| tracing::warn!(peer = %child, "request bodies in progress fill the buffer budget; answering 503"));
        return busy(
            format!("hub busy: too many request bodies in progress; retry after {BUSY_RETRY_AFTER_SECS} s"),
            true,
        );
    };
    let body = match read_body(body, limit, state.serving.body_timeout).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let slot = match state.try_request_slot() {
        Ok(s) => s,
        Err(r) => {
            span.in_scope(
                || tracing::info!(peer = %child, "all request slots taken; answering 503"),
            );
            return busy(r.reason, false);
        }
    };
    // Protocol negotiation, per exchange: answer in what the child announced and
    // this hub writes, and announce what this hub reads.
    let ours = state.accept();
    let peer = wire::Accept::parse(
        parts
            .headers
            .get(wire::accept::HEADER)
            .and_then(|v| v.to_str().ok()),
    );
    let encoding = ours.choose(&peer);
    let keep = ours.chains_with(&peer);
    let announce = ours
        .header_value()
        .and_then(|v| HeaderValue::from_str(&v).ok());
    let mut r = blocking(move || {
        let _entered = span.enter();
        let _held = (slot, budget);
        match state.answer_keeping(&child, &body, Some(expect), encoding, keep) {
            Ok(msg) => reply(&msg, encoding),
            Err(r) => text(
                StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                r.reason,
            ),
        }
    })
    .await;
    if let Some(v) = announce {
        r.headers_mut().insert(wire::accept::HEADER, v);
    }
    r
}

/// Serves children through an MQTT broker until `stop` turns true: answers requests
/// on `clinicsync/v1/+/up` (the broker's ACL has authenticated the child named by the
/// topic) and publishes a wake-up to each child whose feed advanced.
pub async fn serve_mqtt(
    state: Arc<HubState>,
    settings: crate::transport::mqtt::MqttSettings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use crate::transport::mqtt::{child_of_up, down_topic, Envelope, PREFIX};
    use rumqttc::{Event, Packet, QoS};
    let (client, mut events) = rumqttc::AsyncClient::new(
        settings.options(&format!("clinicsync-{}", state.node_id)),
        256,
    );
    let mut head = tokio::task::spawn_blocking({
        let s = state.clone();
        move || s.advanced_since(u64::MAX).map(|(_, h)| h)
    })
    .await??;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    // When each child that sends plain (kind 1) requests was last told what this hub
    // reads (see crate::transport::mqtt: protocol v2 over MQTT).
    let mut greeted: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
    loop {
        tokio::select! {
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!(broker = %settings.host, "hub connected to the MQTT broker");
                    if let Err(e) = client.subscribe(format!("{PREFIX}/+/up"), QoS::AtLeastOnce).await {
                        tracing::warn!(error = %e, "could not subscribe to children's requests");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Some(child) = child_of_up(&p.topic).map(str::to_string) else { continue };
                    let ours = state.accept();
                    let hello = ours.header_value();
                    let (corr, frame, encoding, greet) = match Envelope::decode(&p.payload) {
                        Ok(Envelope::Request { corr, frame }) => {
                            let due = hello.is_some()
                                && state.is_child(&child)
                                && greeted.get(&child).map_or(true, |t| t.elapsed() >= crate::transport::mqtt::HELLO_EVERY);
                            if due {
                                greeted.insert(child.clone(), Instant::now());
                            }
                            (corr, frame, wire::Encoding::V1, due.then(|| hello.clone()).flatten())
                        }
                        // A hub set to v1 ignores these as a hub before v2 does.
                        Ok(Envelope::RequestAnnounced { corr, accept, frame }) if hello.is_some() => {
                            (corr, frame, ours.choose(&wire::Accept::parse(Some(accept.as_str()))), None)
                        }
                        _ => {
                            tracing::warn!(peer = %child, "ignored a malformed MQTT request");
                            continue;
                        }
                    };
                    // The broker authenticated the account; enrolment is ours to check,
                    // on every request, so removing a child takes effect at once.
                    if !state.is_child(&child) {
                        tracing::warn!(peer = %child, "refused an MQTT request from a node that is not an enrolled child");
                        let env = Envelope::Refusal {
                            corr,
                            status: 403,
                            reason: format!("{child} is not enrolled at this hub (hub.children)"),
                        };
                        let _ = client.publish(down_topic(&child), QoS::AtLeastOnce, false, env.encode()).await;
                        continue;
                    }
                    let (state, client) = (state.clone(), client.clone());
                    tokio::spawn(tracing::Instrument::in_current_span(async move {
                        let c = child.clone();
                        let span = tracing::info_span!("hub", node = %state.node_id);
                        let answer = tokio::task::spawn_blocking(move || span.in_scope(|| state.answer_limited_for(&c, &frame, None, encoding))).await;
                        let env = match answer {
                            Ok(Ok(msg)) => match wire::encode_as(&msg, wire::LEVEL_FAST, encoding) {
                                Ok(frame) => Envelope::Answer { corr, frame },
                                Err(e) => Envelope::Refusal { corr, status: 500, reason: e.to_string() },
                            },
                            Ok(Err(r)) => Envelope::Refusal { corr, status: r.status, reason: r.reason },
                            Err(e) => Envelope::Refusal { corr, status: 500, reason: e.to_string() },
                        };
                        if let Err(e) = client.publish(down_topic(&child), QoS::AtLeastOnce, false, env.encode()).await {
                            tracing::warn!(peer = %child, error = %e, "could not queue an MQTT answer");
                        }
                        if let Some(accept) = greet {
                            let _ = client.publish(down_topic(&child), QoS::AtLeastOnce, false, Envelope::Hello { accept }.encode()).await;
                        }
                    }));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "MQTT broker connection lost; reconnecting");
                    // Never spin: one reconnect attempt a second at most.
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            },
            _ = tick.tick() => {
                let s = state.clone();
                let since = head;
                if let Ok(Ok((nodes, new_head))) = tokio::task::spawn_blocking(move || s.advanced_since(since)).await {
                    for n in &nodes {
                        tracing::debug!(peer = %n, "waking child");
                        let _ = client.publish(down_topic(n), QoS::AtLeastOnce, false, Envelope::WakeUp.encode()).await;
                    }
                    head = new_head;
                }
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    let _ = client.disconnect().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v2 push whose block fails while the push is being applied (its records are
    /// built as they are integrated) is refused 400 naming what was wrong, like a
    /// frame refused on arrival, and nothing of it is applied.
    #[test]
    fn a_push_whose_block_fails_while_applied_is_refused_and_applies_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut policy = Policy::new("hub", false);
        policy.serves_children = true;
        policy.catchment.push(crate::engine::CatchmentRule {
            node: "a".into(),
            path: "address.district".into(),
            equals: "North".into(),
        });
        let path = dir.path().join("hub.db");
        let hub = HubState::new(&path, policy, vec![("a".into(), [0; 32])], 32 << 20).unwrap();
        let records: Vec<wire::WireRecord> = (0..300)
            .map(|n| {
                let body = serde_json::json!({"resourceType": "Patient", "id": format!("p{n}"), "address": [{"district": "North"}], "gender": format!("Ward {n}")});
                let version = crate::model::Version {
                    snapshot: crate::model::Snapshot::from_json_value(body).unwrap(),
                    origin: "a".into(),
                    hlc: crate::model::Hlc {
                        wall_ms: 1_000,
                        counter: 0,
                    },
                    vv: crate::model::VersionVector::default().bumped("a"),
                    deleted: false,
                };
                wire::WireRecord::from_version(&version)
            })
            .collect();
        let msg = Message::PushRequest(wire::PushRequest {
            node: "a".into(),
            records,
        });
        let frame = wire::encode_as(
            &msg,
            wire::LEVEL_FAST,
            wire::Encoding::V2 {
                dict: 0,
                columns: true,
            },
        )
        .unwrap();
        let head = wire::v2::HEADER_LEN;
        let mut payload = zstd::stream::decode_all(&frame[head..]).unwrap();
        let last = payload
            .windows(9)
            .rposition(|w| w == b"Ward 299\n")
            .unwrap();
        // The last value loses its end: its column runs out at the last record.
        payload[last..last + 9].copy_from_slice(b"Ward 2999");
        let mut bad = frame[..head].to_vec();
        bad.extend(zstd::bulk::compress(&payload, 1).unwrap());
        let v2 = wire::Encoding::V2 {
            dict: 0,
            columns: true,
        };
        // Sent by a child that chains its pushes (the hub keeps what it applied as
        // the child's next prefix).
        let refused = hub
            .answer_keeping("a", &bad, Some("push_request"), v2, true)
            .unwrap_err();
        assert_eq!(refused.status, 400, "{}", refused.reason);
        assert!(
            refused.reason.contains("body column") && refused.reason.contains("run out"),
            "{}",
            refused.reason
        );
        let held = |p: &std::path::Path| Store::open_existing(p).unwrap().counts().unwrap();
        assert_eq!((held(&path).records, held(&path).audit), (0, 0));
        // The refused push is no prefix to chain against: a frame chained on it is
        // asked again unchained (412).
        let next = Message::PushRequest(wire::PushRequest {
            node: "a".into(),
            records: Vec::new(),
        });
        let chained_on = |payload: Vec<u8>| {
            let prefix = wire::v2::Prefix::of(payload).unwrap();
            wire::v2::encode_chained(&next, wire::LEVEL_FAST, 0, true, Some(&prefix))
                .unwrap()
                .unwrap()
                .0
        };
        let on_refused = hub
            .answer_keeping("a", &chained_on(payload), None, v2, true)
            .unwrap_err();
        assert_eq!(on_refused.status, 412, "{}", on_refused.reason);
        let Message::PushResponse(resp) = hub
            .answer_keeping("a", &frame, Some("push_request"), v2, true)
            .unwrap()
        else {
            panic!("a push is answered by a push response");
        };
        assert_eq!(resp.results.len(), 300);
        assert!(resp
            .results
            .iter()
            .all(|r| r.outcome == wire::Outcome::Accepted));
        assert_eq!(held(&path).records, 300);
        // The applied one is.
        let applied = zstd::stream::decode_all(&frame[head..]).unwrap();
        hub.answer_keeping("a", &chained_on(applied), None, v2, true)
            .unwrap();
    }
}
