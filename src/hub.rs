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
use crate::store::{wall_ms, Store};
use crate::wire::{self, Limits, Message, WireError};

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
        .route("/v1/push", post(push))
        .route("/v1/pull", post(pull))
        .route("/v1/fetch", post(fetch))
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

fn wire_error(e: WireError) -> Response {
    let status = match e {
        WireError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    text(status, e.to_string())
}

fn engine_error(e: EngineError) -> Response {
    match e {
        EngineError::Forbidden(m) => text(StatusCode::FORBIDDEN, m),
        EngineError::Invalid(m) => text(StatusCode::BAD_REQUEST, m),
        e if e.is_retryable() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store busy, retry later: {e}"),
        ),
        e => {
            tracing::error!(error = %e, "hub failed to handle a request");
            text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
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

/// Authenticates and decodes; answers the error response on failure.
// The error is the finished HTTP answer; boxing it would buy nothing on this path.
#[allow(clippy::result_large_err)]
fn admit(
    state: &HubState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, Message), Response> {
    let child = state.authenticate(headers).ok_or_else(|| {
        tracing::warn!("request with a missing or unknown credential");
        text(
            StatusCode::UNAUTHORIZED,
            "missing or unknown credential (Authorization: Bearer <token>)",
        )
    })?;
    let msg = wire::decode(body, &state.limits).map_err(|e| {
        tracing::warn!(peer = %child, error = %e, "undecodable request");
        wire_error(e)
    })?;
    Ok((child, msg))
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

fn wrong(expected: &str, got: &Message) -> Response {
    text(
        StatusCode::BAD_REQUEST,
        format!("expected a {expected}, got a {}", got.name()),
    )
}

async fn push(State(state): State<Arc<HubState>>, headers: HeaderMap, body: Body) -> Response {
    let body = match read_body(body, state.limits.max_compressed).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    blocking(move || {
        let (child, msg) = match admit(&state, &headers, &body) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let Message::PushRequest(req) = msg else {
            return wrong("push_request", &msg);
        };
        let n = req.records.len();
        let mut store = state.writer.lock().unwrap_or_else(|p| p.into_inner());
        match engine::handle_push(&mut store, &state.policy, &child, req, wall_ms()) {
            Ok(resp) => {
                let rejected = resp
                    .results
                    .iter()
                    .filter(|r| matches!(r.outcome, wire::Outcome::Rejected { .. }))
                    .count();
                tracing::info!(peer = %child, direction = "push", records = n, rejected, bytes = body.len(), "push applied");
                reply(&Message::PushResponse(resp))
            }
            Err(e) => engine_error(e),
        }
    })
    .await
}

async fn pull(State(state): State<Arc<HubState>>, headers: HeaderMap, body: Body) -> Response {
    let body = match read_body(body, state.limits.max_compressed).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    blocking(move || {
        let (child, msg) = match admit(&state, &headers, &body) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let Message::PullRequest(req) = msg else {
            return wrong("pull_request", &msg);
        };
        let store = state.reader.lock().unwrap_or_else(|p| p.into_inner());
        match engine::handle_pull(&store, &state.policy, &child, &req) {
            Ok(resp) => {
                tracing::debug!(peer = %child, direction = "pull", records = resp.records.len(), cursor = %resp.next, "pull served");
                reply(&Message::PullResponse(resp))
            }
            Err(e) => engine_error(e),
        }
    })
    .await
}

async fn fetch(State(state): State<Arc<HubState>>, headers: HeaderMap, body: Body) -> Response {
    let body = match read_body(body, state.limits.max_compressed).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    blocking(move || {
        let (child, msg) = match admit(&state, &headers, &body) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let Message::FetchRequest(req) = msg else {
            return wrong("fetch_request", &msg);
        };
        let store = state.reader.lock().unwrap_or_else(|p| p.into_inner());
        match engine::handle_fetch(&store, &child, &req) {
            Ok(resp) => {
                if resp.results.iter().all(|r| r.record.is_none()) {
                    let why: Vec<String> = resp
                        .results
                        .iter()
                        .filter_map(|r| r.refused.clone())
                        .collect();
                    tracing::warn!(peer = %child, refused = %why.join("; "), "fetch refused");
                    return text(StatusCode::FORBIDDEN, why.join("; "));
                }
                reply(&Message::FetchResponse(resp))
            }
            Err(e) => engine_error(e),
        }
    })
    .await
}
