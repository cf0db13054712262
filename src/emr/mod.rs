//! The seam between a node's store and the clinic's EMR.
//!
//! An [`Emr`] lists what changed since a cursor, fetches a record's current state,
//! and applies a version (create, update, delete). Every failure says whether trying
//! again can help ([`EmrError::is_retryable`]). The flows that use it live in
//! [`crate::engine`] (`capture_from_emr`, `apply_inbox_to_emr`); adapters know
//! nothing of the sync protocol.
//!
//! Adapters: `embedded` (the store is the EMR; no adapter object), [`openmrs`]
//! (atom feed + FHIR2 + REST v1), and a simulator of OpenMRS for tests and demos
//! ([`simulator`]).

pub mod fhir;
pub mod openmrs;
pub mod simulator;

use crate::model::{RecordKey, Snapshot, Version};

#[derive(Debug, thiserror::Error)]
pub enum EmrError {
    /// Timeouts, refused connections, 5xx, 429: the next round tries again.
    #[error("EMR unavailable: {0}")]
    Unavailable(String),
    /// The EMR refused the record (4xx); its message is kept for the technician.
    #[error("EMR refused it (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    /// The EMR answered something we cannot read (garbage XML, not JSON, a broken
    /// feed chain). Retried, since the EMR may be mid-upgrade; reported as is.
    #[error("EMR answered something unreadable: {0}")]
    Unreadable(String),
}

impl EmrError {
    pub fn is_retryable(&self) -> bool {
        !matches!(self, EmrError::Refused { .. })
    }
}

/// A record's state in the EMR.
#[derive(Debug, Clone)]
pub enum Fetched {
    Present(Snapshot),
    /// Deleted, voided or retired (FHIR2 answers 410 Gone).
    Gone,
}

pub trait Emr: Send {
    /// Records changed since `cursor` (the adapter's own opaque text; `None` on the
    /// first run), oldest first, and the cursor to store once they are captured.
    fn changes(&mut self, cursor: Option<&str>) -> Result<(Vec<RecordKey>, String), EmrError>;
    /// The record's current state; `None` if the EMR never had it.
    fn fetch(&mut self, key: &RecordKey) -> Result<Option<Fetched>, EmrError>;
    /// Writes a version into the EMR (a tombstone deletes/voids) and returns the
    /// state the EMR now holds, so the feed event it causes is known as an echo.
    fn apply(&mut self, version: &Version) -> Result<Fetched, EmrError>;
    /// A short health probe for `doctor`.
    fn probe(&mut self) -> Result<String, EmrError>;
}

/// Classifies an HTTP failure from ureq.
pub fn classify(url: &str, e: ureq::Error) -> EmrError {
    match e {
        ureq::Error::Status(status, resp) => {
            let body = resp.into_string().unwrap_or_default();
            let message =
                operation_outcome_text(&body).unwrap_or_else(|| body.chars().take(300).collect());
            if status >= 500 || status == 429 {
                EmrError::Unavailable(format!("{url}: HTTP {status}: {message}"))
            } else {
                EmrError::Refused { status, message }
            }
        }
        ureq::Error::Transport(t) => EmrError::Unavailable(format!("{url}: {t}")),
    }
}

/// The human text of a FHIR OperationOutcome (or an OpenMRS REST error).
pub fn operation_outcome_text(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    if let Some(issues) = v.get("issue").and_then(|i| i.as_array()) {
        let texts: Vec<String> = issues
            .iter()
            .filter_map(|i| {
                i.get("diagnostics")
                    .or_else(|| i.get("details").and_then(|d| d.get("text")))
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
            })
            .collect();
        if !texts.is_empty() {
            return Some(texts.join("; "));
        }
    }
    v.get("error")
        .and_then(|e| e.get("message"))
        .and_then(|m| m.as_str())
        .map(str::to_string)
}
