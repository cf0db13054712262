//! The seam between a node's store and the clinic's EMR.
//!
//! An [`Emr`] lists what changed since a cursor, fetches a record's current state,
//! and applies a version (create, update, delete). Every failure says whether trying
//! again can help ([`EmrError::is_retryable`]). The flows that use it live in
//! [`crate::engine`] (`capture_from_emr`, `apply_inbox_to_emr`); adapters know
//! nothing of the sync protocol.
//!
//! Adapters: `embedded` (the store is the EMR; no adapter object), [`openmrs`]
//! (atom feed + FHIR2 + REST v1) and [`fhir`] (any FHIR R4 server). The OpenMRS
//! simulator the tests run against is test kit (`devkit::openmrs_sim`).

pub mod fhir;
pub mod flow;
pub mod openmrs;

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

/// An EMR that is down, busy, refusing our account or answering garbage may be back
/// later (retryable: nothing is quarantined for it); a refusal of the record itself
/// (4xx) is permanent for that record.
impl crate::error::Classify for EmrError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            EmrError::Unavailable(_) | EmrError::Unreadable(_) => {
                crate::error::ErrorClass::Retryable
            }
            EmrError::Refused { .. } => crate::error::ErrorClass::Permanent,
        }
    }
}

impl EmrError {
    /// [`crate::error::Classify::is_retryable`], here so callers need no import.
    pub fn is_retryable(&self) -> bool {
        crate::error::Classify::is_retryable(self)
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
    /// The adapter's identity state — which EMR id holds which network record, where
    /// the EMR assigned its own — if it changed since the last call; `None` when
    /// unchanged or when the adapter keeps none. The caller stores it in the same
    /// transaction as what changed it (a capture, an applied version) and hands it
    /// back with [`Emr::restore_identity`] after a restart.
    fn identity_state(&mut self) -> Option<String> {
        None
    }
    /// Restores what [`Emr::identity_state`] returned last, before any other call.
    fn restore_identity(&mut self, _state: &str) {}
    /// Problems that did not stop the last call (one feed category unreadable while
    /// the others were read), drained: the caller records them as the EMR's last
    /// error so `status` shows them. Adapters that never degrade return nothing.
    fn take_warnings(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// The checks `doctor` prints for this EMR; the default is one check from
    /// [`Emr::probe`]. The OpenMRS adapter adds modules, feed categories, the upsert
    /// property, the account's privileges and clock skew.
    fn diagnose(&mut self) -> Vec<EmrCheck> {
        vec![match self.probe() {
            Ok(what) => EmrCheck::new(CheckLevel::Ok, "emr", what, None),
            Err(e) => EmrCheck::new(
                CheckLevel::Fail,
                "emr",
                e.to_string(),
                Some("check emr.url, the credentials file and that the EMR runs"),
            ),
        }]
    }
}

/// How bad a finding of [`Emr::diagnose`] is (doctor's OK / WARN / FAIL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckLevel {
    Ok,
    Warn,
    Fail,
}

/// One finding of [`Emr::diagnose`]; `what` is a short label (`emr`, `emr-feeds`…).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmrCheck {
    pub level: CheckLevel,
    pub what: &'static str,
    pub detail: String,
    pub hint: Option<String>,
}

impl EmrCheck {
    pub fn new(
        level: CheckLevel,
        what: &'static str,
        detail: impl Into<String>,
        hint: Option<&str>,
    ) -> EmrCheck {
        EmrCheck {
            level,
            what,
            detail: detail.into(),
            hint: hint.map(str::to_string),
        }
    }
}

/// Classifies an HTTP failure from ureq.
///
/// 401 and 403 mean the EMR will not talk to us (a wrong or changed password, a
/// locked account, a missing privilege): the EMR is unavailable, not the record at
/// fault, so nothing is quarantined for it. 408, 429 and 5xx are the EMR being busy
/// or broken. Every other 4xx is the EMR refusing this record, with its reason
/// (FHIR OperationOutcome diagnostics, or OpenMRS REST's message with its
/// `globalErrors` and `fieldErrors`).
pub fn classify(url: &str, e: ureq::Error) -> EmrError {
    match e {
        ureq::Error::Status(status, resp) => {
            let body = resp.into_string().unwrap_or_default();
            let message = operation_outcome_text(&body).unwrap_or_else(|| short_text(&body));
            match status {
                401 | 403 => EmrError::Unavailable(format!(
                    "{url}: HTTP {status}: the EMR refuses our account ({message}); check the \
                     credentials file, that the account is not locked and its privileges"
                )),
                408 | 429 | 500..=599 => {
                    EmrError::Unavailable(format!("{url}: HTTP {status}: {message}"))
                }
                _ => EmrError::Refused { status, message },
            }
        }
        ureq::Error::Transport(t) => EmrError::Unavailable(format!("{url}: {t}")),
    }
}

/// Epoch milliseconds of `YYYY-MM-DDTHH:MM:SS[.mmm][Z|+00:00]` (or a bare date).
pub fn parse_instant(s: &str) -> Option<u64> {
    let s = s.trim().trim_end_matches('Z').trim_end_matches("+00:00");
    let (date, time) = s.split_once('T').unwrap_or((s, "00:00:00"));
    let d: Vec<i64> = date.split('-').filter_map(|x| x.parse().ok()).collect();
    let (hms, millis) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').filter_map(|x| x.parse().ok()).collect();
    if d.len() != 3 || t.len() < 2 {
        return None;
    }
    let days = crate::time::days_from_civil(d[0], d[1], d[2]);
    let secs = days * 86_400 + t[0] * 3600 + t[1] * 60 + t.get(2).copied().unwrap_or(0);
    let ms: u64 = format!("{:0<3}", &millis[..millis.len().min(3)])
        .parse()
        .ok()?;
    u64::try_from(secs).ok().map(|s| s * 1000 + ms)
}

/// The first 300 characters of a body that is not a known error shape, with an HTML
/// page (the servlet container's error page) reduced to its text.
fn short_text(body: &str) -> String {
    let text = if body.trim_start().starts_with('<') {
        let mut out = String::new();
        let mut in_tag = false;
        for c in body.chars() {
            match c {
                '<' => in_tag = true,
                '>' => {
                    in_tag = false;
                    out.push(' ');
                }
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    } else {
        body.trim().to_string()
    };
    text.chars().take(300).collect()
}

/// The human text of a FHIR OperationOutcome, or of an OpenMRS REST error: its
/// `message`, then every global error and every field error (`field: message`), so
/// "Invalid Submission" comes with what was invalid.
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
    let error = v.get("error")?;
    let mut parts: Vec<String> = Vec::new();
    if let Some(m) = error.get("message").and_then(|m| m.as_str()) {
        parts.push(m.to_string());
    }
    let text_of = |e: &serde_json::Value| {
        e.get("message")
            .and_then(|m| m.as_str())
            .or_else(|| e.get("code").and_then(|c| c.as_str()))
            .map(str::to_string)
    };
    if let Some(globals) = error.get("globalErrors").and_then(|g| g.as_array()) {
        parts.extend(globals.iter().filter_map(text_of));
    }
    if let Some(fields) = error.get("fieldErrors").and_then(|f| f.as_object()) {
        for (field, errors) in fields {
            let texts: Vec<String> = errors
                .as_array()
                .map(|a| a.iter().filter_map(text_of).collect())
                .unwrap_or_default();
            if !texts.is_empty() {
                parts.push(format!("{field}: {}", texts.join(", ")));
            }
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emr_that_is_down_or_unreadable_is_retryable_and_a_refusal_is_permanent() {
        use crate::error::{Classify, ErrorClass};
        let cases = [
            (EmrError::Unavailable("down".into()), ErrorClass::Retryable),
            (EmrError::Unreadable("<html>".into()), ErrorClass::Retryable),
            (
                EmrError::Refused {
                    status: 422,
                    message: "no".into(),
                },
                ErrorClass::Permanent,
            ),
        ];
        for (e, class) in cases {
            assert_eq!(e.class(), class, "{e}");
            assert_eq!(e.is_retryable(), class == ErrorClass::Retryable, "{e}");
        }
    }

    #[test]
    fn rest_validation_errors_keep_their_global_and_field_errors() {
        // The shape of webservices.rest's RestUtil.wrapValidationErrorResponse.
        let body = r#"{"error":{"message":"Invalid Submission","code":"webservices.rest.error.invalid.submission",
            "globalErrors":[{"code":"Patient.error.identifier","message":"Patient is missing a preferred identifier"}],
            "fieldErrors":{"identifiers[0].identifierType":[{"code":"error.null","message":"Cannot be empty or null"}]}}}"#;
        assert_eq!(
            operation_outcome_text(body).unwrap(),
            "Invalid Submission; Patient is missing a preferred identifier; \
             identifiers[0].identifierType: Cannot be empty or null"
        );
        let plain =
            r#"{"error":{"message":"[Object with given uuid doesn't exist]","code":"x:1"}}"#;
        assert_eq!(
            operation_outcome_text(plain).unwrap(),
            "[Object with given uuid doesn't exist]"
        );
    }

    #[test]
    fn servlet_error_pages_read_as_text() {
        let html = "<html><head><title>Error 401</title></head><body><h1>HTTP Status 401 - Not authenticated</h1></body></html>";
        assert_eq!(
            short_text(html),
            "Error 401 HTTP Status 401 - Not authenticated"
        );
    }
}
