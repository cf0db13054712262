//! Serving children over HTTP: authentication, decoding within limits, and handing
//! each message to the engine. The hub never opens a connection to a child.
//!
//! Endpoints (all `POST`, body and answer are [`crate::wire`] frames):
//! `/v1/push` (PushRequest → PushResponse), `/v1/pull` (PullRequest → PullResponse),
//! `/v1/fetch` (FetchRequest → FetchResponse); `GET /v1/health` answers `ok`.
//!
//! Errors are plain text naming the problem: 401 unknown or missing credential,
//! 403 a child acting as another node, 400 a frame that does not decode (bad magic,
//! unsupported protocol version, truncated, garbage, too many records, too deep),
//! 413 a body over `hub.max_message_bytes` or a decompression bomb, 503 a store that is
//! busy (retry later), 500 anything else. A refused request changes nothing: it
//! is refused before the engine opens a transaction.
//!
//! Credentials: the config holds SHA-256 hashes of each child's bearer token; a
//! presented token is hashed and compared in constant time.

use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::engine::{self, EngineError, Policy};
use crate::store::{wall_ms, Store, TransferKey};
use crate::wire::{self, Limits, Message, WireError};

/// Chunk size of answers, and the largest chunk fetch served.
const MAX_CHUNK: u64 = 64 << 10;
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
    reader: Mutex<Store>,
    policy: Policy,
    children: Vec<(String, [u8; 32])>,
    limits: Limits,
}

impl HubState {
    /// `children` pairs each child node id with the SHA-256 of its credential.
    pub fn new(
        store_path: &std::path::Path,
        policy: Policy,
        children: Vec<(String, [u8; 32])>,
        max_message_bytes: usize,
    ) -> Result<HubState, crate::store::StoreError> {
        let writer = Store::open(store_path, &policy.node_id)?;
        let reader = Store::open(store_path, &policy.node_id)?;
        Ok(HubState {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            policy,
            children,
            limits: Limits {
                max_compressed: max_message_bytes,
                max_decompressed: max_message_bytes.saturating_mul(8),
                max_records: 50_000,
            },
        })
    }

    /// Is `node` one of this hub's enrolled children?
    pub fn is_child(&self, node: &str) -> bool {
        self.children.iter().any(|(n, _)| n == node)
    }

    fn authenticate(&self, headers: &HeaderMap) -> Option<String> {
        let token = headers
            .get(header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?
            .trim();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.children
            .iter()
            .find(|(_, h)| constant_time_eq(h, &digest))
            .map(|(n, _)| n.clone())
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The hex SHA-256 of a credential, as it goes into `hub.children`.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub fn router(state: Arc<HubState>) -> Router {
    Router::new()
        .route("/v1/health", get(|| async { "ok\n" }))
        .route(
            "/v1/push",
            post(|State(s), h, b| endpoint(s, h, b, "push_request")),
        )
        .route(
            "/v1/pull",
            post(|State(s), h, b| endpoint(s, h, b, "pull_request")),
        )
        .route(
            "/v1/fetch",
            post(|State(s), h, b| endpoint(s, h, b, "fetch_request")),
        )
        .route(
            "/v1/chunk",
            post(|State(s), h, b| endpoint(s, h, b, "chunk")),
        )
        // Our own reader enforces the limit (see `read_body`).
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Serves children on `listener` until `shutdown` completes; in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HubState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
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

fn reply(msg: &Message) -> Response {
    match wire::encode(msg) {
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
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            status: status.as_u16(),
            reason: reason.into(),
        }
    }
}

fn wire_refusal(e: WireError) -> Refusal {
    let status = match e {
        WireError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    Refusal::new(status, e.to_string())
}

fn engine_refusal(e: EngineError) -> Refusal {
    match e {
        EngineError::Forbidden(m) => Refusal::new(StatusCode::FORBIDDEN, m),
        EngineError::Invalid(m) => Refusal::new(StatusCode::BAD_REQUEST, m),
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
    /// Answers one request frame from `child`, already authenticated by the
    /// transport. `expect` is the request kind an HTTP endpoint takes; MQTT takes any.
    pub fn answer(
        &self,
        child: &str,
        frame: &[u8],
        expect: Option<&'static str>,
    ) -> Result<Message, Refusal> {
        let msg = wire::decode(frame, &self.limits).map_err(|e| {
            tracing::warn!(peer = %child, error = %e, "undecodable request");
            wire_refusal(e)
        })?;
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
            Message::PushRequest(req) => {
                let n = req.records.len();
                let mut store = self.writer.lock().unwrap_or_else(|p| p.into_inner());
                let resp = engine::handle_push(&mut store, &self.policy, child, req, wall_ms())
                    .map_err(engine_refusal)?;
                let rejected = resp
                    .results
                    .iter()
                    .filter(|r| matches!(r.outcome, wire::Outcome::Rejected { .. }))
                    .count();
                tracing::info!(peer = %child, direction = "push", records = n, rejected, bytes = frame.len(), "push applied");
                Ok(Message::PushResponse(resp))
            }
            Message::PullRequest(req) => {
                let resp = {
                    let store = self.reader.lock().unwrap_or_else(|p| p.into_inner());
                    engine::handle_pull(&store, &self.policy, child, &req)
                        .map_err(engine_refusal)?
                };
                tracing::debug!(peer = %child, direction = "pull", records = resp.records.len(), cursor = %resp.next, "pull served");
                let answer = Message::PullResponse(resp);
                if req.answer_chunk == 0 {
                    return Ok(answer);
                }
                // A large page goes as a transfer, its first chunk in this answer.
                self.as_transfer(child, answer, req.answer_chunk.clamp(1024, MAX_CHUNK), true)
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
                        dir: "up",
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
                        dir: "up",
                    };
                    if tx.transfer_state(&key)?.is_none() {
                        if let Err(r) = make_room(&mut tx, child, "up", c.total)? {
                            return Ok(Err(r));
                        }
                    }
                    let r = tx.transfer_append(&key, c.total, c.offset, &c.data, wall_ms())?;
                    tx.commit()?;
                    Ok(Ok(r))
                })()
                .map_err(|e| engine_refusal(e.into()))??;
                Ok(Message::ChunkAck(wire::ChunkAck { id: c.id, received }))
            }
            Message::ChunkRun(r) => self.run_transfer(child, &r),
            Message::ChunkGet(g) => {
                let mut store = self.writer.lock().unwrap_or_else(|p| p.into_inner());
                let tx = store.begin().map_err(|e| engine_refusal(e.into()))?;
                let Some((total, _)) = tx
                    .transfer_state(&TransferKey {
                        node: child,
                        id: &g.id,
                        dir: "down",
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
                            dir: "down",
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
                }))
            }
            other => Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("a {} is not a request", other.name()),
            )),
        }
    }

    /// Runs a fully received upload as the request it is, and answers it directly
    /// or, when the answer is large, as a transfer to fetch in chunks.
    fn run_transfer(&self, child: &str, r: &wire::ChunkRef) -> Result<Message, Refusal> {
        let frame = {
            let mut store = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let tx = store.begin().map_err(|e| engine_refusal(e.into()))?;
            match tx
                .transfer_state(&TransferKey {
                    node: child,
                    id: &r.id,
                    dir: "up",
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
                    dir: "up",
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
        if wire::decode(&frame, &self.limits)
            .map(|m| m.name().starts_with("chunk_"))
            .unwrap_or(false)
        {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "a transfer cannot carry another transfer",
            ));
        }
        let answer = self.answer(child, &frame, None)?;
        self.as_transfer(child, answer, MAX_CHUNK, false)
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
    ) -> Result<Message, Refusal> {
        let bytes = wire::encode_with(&answer, wire::LEVEL_BULK)
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
                dir: "down",
            };
            if tx.transfer_state(&key)?.is_none() {
                if let Err(r) = make_room(&mut tx, child, "down", bytes.len() as u64)? {
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
        if metadata {
            nodes = self.children.iter().map(|(n, _)| n.clone()).collect();
        }
        nodes.retain(|n| self.children.iter().any(|(c, _)| c == n));
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
    dir: &str,
    size: u64,
) -> Result<Result<(), Refusal>, crate::store::StoreError> {
    tx.transfer_gc(wall_ms().saturating_sub(TRANSFER_TTL_MS))?;
    let open = tx.transfers_of(child, dir)?;
    let excess = (open.len() + 1).saturating_sub(MAX_OPEN_TRANSFERS);
    for (id, _) in open.iter().take(excess) {
        tracing::info!(peer = %child, dir, "forgetting an unfinished transfer: too many open");
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

/// Authenticates an HTTP request; answers the error response on failure.
// The error is the finished HTTP answer; boxing it would buy nothing on this path.
#[allow(clippy::result_large_err)]
fn authenticate(state: &HubState, headers: &HeaderMap) -> Result<String, Response> {
    state.authenticate(headers).ok_or_else(|| {
        tracing::warn!("request with a missing or unknown credential");
        text(
            StatusCode::UNAUTHORIZED,
            "missing or unknown credential (Authorization: Bearer <token>)",
        )
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

/// Reads a request body of at most `limit` bytes. An oversized body is still read
/// (and dropped) up to a bound, so the client receives the 413 instead of a reset
/// connection; past the bound the connection is closed.
#[allow(clippy::result_large_err)]
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Response> {
    use http_body_util::BodyExt;
    let drain_bound = limit.saturating_mul(4).max(limit + (8 << 20));
    let mut body = body;
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    format!("request body could not be read: {e}"),
                ))
            }
        };
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen <= limit {
                buf.extend_from_slice(&data);
            } else if seen > drain_bound {
                break;
            }
        }
    }
    if seen > limit {
        return Err(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is over the length limit of {limit} bytes (hub.max_message_bytes)"
            ),
        ));
    }
    Ok(Bytes::from(buf))
}

async fn endpoint(
    state: Arc<HubState>,
    headers: HeaderMap,
    body: Body,
    expect: &'static str,
) -> Response {
    let body = match read_body(body, state.limits.max_compressed).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    // axum runs handlers on its own tasks: name the node explicitly (journald NODE).
    let span = tracing::info_span!("hub", node = %state.policy.node_id);
    blocking(move || {
        let _entered = span.enter();
        let child = match authenticate(&state, &headers) {
            Ok(c) => c,
            Err(r) => return r,
        };
        match state.answer(&child, &body, Some(expect)) {
            Ok(msg) => reply(&msg),
            Err(r) => text(
                StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                r.reason,
            ),
        }
    })
    .await
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
        settings.options(&format!("clinicsync-{}", state.policy.node_id)),
        256,
    );
    let mut head = tokio::task::spawn_blocking({
        let s = state.clone();
        move || s.advanced_since(u64::MAX).map(|(_, h)| h)
    })
    .await??;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
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
                    let Ok(Envelope::Request { corr, frame }) = Envelope::decode(&p.payload) else {
                        tracing::warn!(peer = %child, "ignored a malformed MQTT request");
                        continue;
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
                        let span = tracing::info_span!("hub", node = %state.policy.node_id);
                        let answer = tokio::task::spawn_blocking(move || span.in_scope(|| state.answer(&c, &frame, None))).await;
                        let env = match answer {
                            Ok(Ok(msg)) => match wire::encode(&msg) {
                                Ok(frame) => Envelope::Answer { corr, frame },
                                Err(e) => Envelope::Refusal { corr, status: 500, reason: e.to_string() },
                            },
                            Ok(Err(r)) => Envelope::Refusal { corr, status: r.status, reason: r.reason },
                            Err(e) => Envelope::Refusal { corr, status: 500, reason: e.to_string() },
                        };
                        if let Err(e) = client.publish(down_topic(&child), QoS::AtLeastOnce, false, env.encode()).await {
                            tracing::warn!(peer = %child, error = %e, "could not queue an MQTT answer");
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
