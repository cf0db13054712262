//! The health report's wire form (what a node says about itself on every pull and
//! USB export). How a report is made and received is [`crate::health`]; this file
//! is only the shape and its bounds, so `wire` depends on nothing above it.

use serde::{Deserialize, Serialize};

/// The report format's version.
pub const HEALTH_V: u32 = 1;
/// Longest text field kept (reasons, errors, version strings), in characters.
pub const MAX_TEXT: usize = 160;
/// Most quarantine reasons a report lists.
pub const MAX_REASONS: usize = 3;
/// Most reports one request carries (the sender's own and its descendants').
pub const MAX_REPORTS: usize = 2_000;

/// A quarantine reason and how many records share it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    pub reason: String,
    pub count: u64,
}

/// One node's state as it reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub v: u32,
    pub node: String,
    /// `clinicsync` version and the store's schema.
    pub version: String,
    pub schema: i64,
    /// The node's clock when it made the report.
    pub made_ms: u64,
    /// Set by the hub that heard the node itself (its clock); kept when forwarded.
    #[serde(default)]
    pub heard_ms: Option<u64>,
    pub uptime_s: Option<u64>,
    pub records: u64,
    pub outbox: u64,
    pub inbox: u64,
    pub quarantine: u64,
    pub top_quarantine: Vec<ReasonCount>,
    /// Conflicts not yet reviewed by a person.
    pub conflicts_open: u64,
    /// Records its parent has that it has not pulled yet (parent's head − cursor).
    pub pull_lag: u64,
    pub last_sync_ms: Option<u64>,
    pub link_error: Option<String>,
    pub emr_error: Option<String>,
    pub bytes_today: u64,
    pub disk_free: Option<u64>,
    /// How far the node's clock is ahead (+) or behind (−) its parent's, if known.
    pub clock_skew_ms: Option<i64>,
    pub audit_entries: u64,
    /// Hex of the audit chain's last entry hash (empty when there is none).
    pub audit_head: String,
    /// Download rate from its parent as last measured over a pull of at least
    /// 16 KiB, in bits per second (`catchment preview` estimates a bootstrap with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_rate_bps: Option<u64>,
}

fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(MAX_TEXT).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

impl HealthReport {
    /// Clips every text field and list, whatever a peer sent.
    pub fn bounded(mut self) -> HealthReport {
        self.node = clip(&self.node);
        self.version = clip(&self.version);
        self.link_error = self.link_error.as_deref().map(clip);
        self.emr_error = self.emr_error.as_deref().map(clip);
        self.audit_head = clip(&self.audit_head);
        self.top_quarantine.truncate(MAX_REASONS);
        for r in &mut self.top_quarantine {
            r.reason = clip(&r.reason);
        }
        self
    }
}
