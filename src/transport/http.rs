//! The child's side of HTTP: one `POST` per exchange with ureq, bearer credential,
//! bounded response reads.
//!
//! Errors say whether trying again can help: connection failures, timeouts, 5xx and
//! 429 are retryable; other 4xx carry the parent's message and are permanent (a wrong
//! credential, a frame the parent cannot read). Nothing here touches the store.

use std::io::Read;
use std::time::Duration;

use crate::config::Secret;
use crate::wire::{self, Limits, Message, WireError};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot reach parent at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("parent answered HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("parent's answer is unreadable: {0}")]
    Wire(#[from] WireError),
    #[error("parent answered a {got} to a {sent}")]
    Unexpected {
        sent: &'static str,
        got: &'static str,
    },
}

impl TransportError {
    pub fn is_retryable(&self) -> bool {
        match self {
            TransportError::Unreachable { .. } => true,
            TransportError::Status { status, .. } => *status >= 500 || *status == 429,
            TransportError::Wire(_) | TransportError::Unexpected { .. } => false,
        }
    }
}

/// What one exchange moved, for link statistics and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

pub struct HttpClient {
    agent: ureq::Agent,
    base: String,
    token: Secret,
    limits: Limits,
}

impl HttpClient {
    pub fn new(base: &str, token: Secret, timeout: Duration) -> HttpClient {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(15).min(timeout))
            .timeout(timeout)
            .build();
        HttpClient {
            agent,
            base: base.trim_end_matches('/').to_string(),
            token,
            limits: Limits {
                max_compressed: 64 << 20,
                max_decompressed: 256 << 20,
                max_records: 100_000,
            },
        }
    }

    /// Sends `msg` to `path` and returns the parent's answer.
    pub fn exchange(
        &self,
        path: &str,
        msg: &Message,
    ) -> Result<(Message, Traffic), TransportError> {
        let body = wire::encode(msg)?;
        let url = format!("{}{}", self.base, path);
        let result = self
            .agent
            .post(&url)
            .set("Authorization", &format!("Bearer {}", self.token.expose()))
            .set("Content-Type", wire::CONTENT_TYPE)
            .send_bytes(&body);
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(status, r)) => {
                let mut message = String::new();
                let _ = r.into_reader().take(4096).read_to_string(&mut message);
                return Err(TransportError::Status {
                    status,
                    message: message.trim().to_string(),
                });
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(TransportError::Unreachable {
                    url: self.base.clone(),
                    message: t.to_string(),
                })
            }
        };
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(self.limits.max_compressed as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| TransportError::Unreachable {
                url: self.base.clone(),
                message: format!("connection lost while reading the answer: {e}"),
            })?;
        let answer = wire::decode(&bytes, &self.limits)?;
        Ok((
            answer,
            Traffic {
                sent: body.len() as u64,
                received: bytes.len() as u64,
            },
        ))
    }

    pub fn health(&self) -> Result<(), TransportError> {
        let url = format!("{}/v1/health", self.base);
        self.agent
            .get(&url)
            .call()
            .map(|_| ())
            .map_err(|e| match e {
                ureq::Error::Status(status, _) => TransportError::Status {
                    status,
                    message: "health check failed".into(),
                },
                ureq::Error::Transport(t) => TransportError::Unreachable {
                    url: self.base.clone(),
                    message: t.to_string(),
                },
            })
    }
}
