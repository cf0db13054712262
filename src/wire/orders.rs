//! Remote orders on the wire: what a parent asks of a child (down, on pull answers
//! and USB return pages) and how it went (up, on pull requests). Executing them is
//! [`crate::remote`]; this file is only the shapes and their bounds.

use serde::{Deserialize, Serialize};

/// Most orders one pull answer carries.
pub const MAX_ORDERS: usize = 16;
/// Longest result text kept, in bytes.
pub const MAX_RESULT: usize = 64 << 10;

/// What a parent can ask of a child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderKind {
    /// Make one quarantined record (or all of them) due now.
    QuarantineRetry { record: Option<String> },
    /// Give up on a quarantined record (`quarantine drop`).
    QuarantineDrop { record: String },
    /// Pull everything again from the start, its own records included.
    Resync,
    /// Send up status, quarantine and recent log lines.
    Diagnostics,
    /// A patient moved to another clinic (`catchment move --purge`): remove its
    /// records here, except what has not been pushed yet.
    Purge { patient: String },
}

impl OrderKind {
    /// What a technician at the node types to do the same.
    pub fn local_equivalent(&self) -> String {
        match self {
            OrderKind::QuarantineRetry { record: Some(r) } => format!("`clinicsync quarantine retry {r}`"),
            OrderKind::QuarantineRetry { record: None } => "`clinicsync quarantine retry --all`".into(),
            OrderKind::QuarantineDrop { record } => format!("`clinicsync quarantine drop {record}`"),
            OrderKind::Resync => "`clinicsync sync --bootstrap` after moving the store aside (README: Reinstall)".into(),
            OrderKind::Diagnostics => "`clinicsync status`, `clinicsync quarantine list` and `clinicsync doctor`".into(),
            OrderKind::Purge { patient } => format!("a purge of Patient/{patient} by hand (not offered there: leave it, or allow remote orders)"),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            OrderKind::QuarantineRetry { record: Some(r) } => format!("quarantine retry {r}"),
            OrderKind::QuarantineRetry { record: None } => "quarantine retry --all".into(),
            OrderKind::QuarantineDrop { record } => format!("quarantine drop {record}"),
            OrderKind::Resync => "resync".into(),
            OrderKind::Diagnostics => "diagnostics".into(),
            OrderKind::Purge { patient } => format!("purge Patient/{patient}"),
        }
    }
}

/// An order on its way down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: String,
    pub issued_ms: u64,
    /// The hub that gave it.
    pub by: String,
    pub kind: OrderKind,
}

/// How an order went, on its way up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderResult {
    pub id: String,
    /// "done", "refused" or "failed".
    pub state: String,
    pub detail: String,
}

/// A result text cut to [`MAX_RESULT`] bytes on a character boundary.
pub fn bounded(mut s: String) -> String {
    if s.len() > MAX_RESULT {
        let mut cut = MAX_RESULT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("\n… (cut)");
    }
    s
}
