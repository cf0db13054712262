//! A Prometheus `/metrics` endpoint (text exposition format 0.0.4) on its own
//! listener (`[metrics] listen`), on any node: this node's own queues, and at a hub
//! one gauge family per field of the health reports its nodes send
//! (`crate::health`, grandchildren included), plus the hub's request counters.
//! `packaging/clinicsync-alerts.yml` holds example alert rules over these names.
//!
//! Invariants: only node ids (validated, `[A-Za-z0-9._-]`) and escaped version
//! strings become label values; no patient data is exported. A non-loopback
//! listener needs a bearer token (the config check refuses it otherwise), compared
//! in constant time; a scrape reads the store through its own connection.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError};

/// A label value: backslash, quote and newline escaped, as the format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &str, v: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {v}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {v}");
        }
    }
}

/// The exposition text for this node (and, at a hub, every node below it).
pub fn render(
    store: &Store,
    hub: Option<&crate::hub::Counters>,
    now_ms: u64,
) -> Result<String, StoreError> {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    let me = store.node_id().to_string();
    let own = crate::health::report(store, crate::engine::PARENT, now_ms)?;
    f.head(
        "clinicsync_build_info",
        "gauge",
        "Version of this node (value 1).",
    );
    f.sample(
        "clinicsync_build_info",
        &format!(
            "node=\"{}\",version=\"{}\"",
            label(&me),
            label(&own.version)
        ),
        1.0,
    );
    let gauges: [(&str, &str, f64); 8] = [
        (
            "clinicsync_records",
            "Records this node holds.",
            own.records as f64,
        ),
        (
            "clinicsync_outbox_records",
            "Records waiting to go to the parent.",
            own.outbox as f64,
        ),
        (
            "clinicsync_inbox_records",
            "Pulled records waiting to be applied.",
            own.inbox as f64,
        ),
        (
            "clinicsync_quarantined_records",
            "Records in quarantine.",
            own.quarantine as f64,
        ),
        (
            "clinicsync_conflicts_open",
            "Conflicts no person has reviewed.",
            own.conflicts_open as f64,
        ),
        (
            "clinicsync_pull_lag_records",
            "Records the parent has that this node has not pulled.",
            own.pull_lag as f64,
        ),
        (
            "clinicsync_audit_entries",
            "Entries in the audit chain.",
            own.audit_entries as f64,
        ),
        (
            "clinicsync_disk_free_bytes",
            "Free bytes on the store's filesystem.",
            own.disk_free.unwrap_or(0) as f64,
        ),
    ];
    for (name, help, v) in gauges {
        f.head(name, "gauge", help);
        f.sample(name, "", v);
    }
    if let Some(t) = own.last_sync_ms {
        f.head(
            "clinicsync_last_sync_timestamp_seconds",
            "gauge",
            "Last successful exchange with the parent.",
        );
        f.sample(
            "clinicsync_last_sync_timestamp_seconds",
            "",
            t as f64 / 1000.0,
        );
    }
    let Some(counters) = hub else {
        return Ok(out);
    };
    let counted: [(&str, &str, &AtomicU64); 7] = [
        (
            "clinicsync_hub_push_requests_total",
            "Push requests answered.",
            &counters.push_requests,
        ),
        (
            "clinicsync_hub_pull_requests_total",
            "Pull requests answered.",
            &counters.pull_requests,
        ),
        (
            "clinicsync_hub_sync_requests_total",
            "Exchanges carrying a push and a pull together (also counted as each).",
            &counters.sync_requests,
        ),
        (
            "clinicsync_hub_records_received_total",
            "Records children pushed.",
            &counters.records_received,
        ),
        (
            "clinicsync_hub_records_rejected_total",
            "Pushed records refused.",
            &counters.records_rejected,
        ),
        (
            "clinicsync_hub_records_served_total",
            "Records sent in pull pages.",
            &counters.records_served,
        ),
        (
            "clinicsync_hub_refusals_total",
            "Requests refused (auth, limits, malformed).",
            &counters.refusals,
        ),
    ];
    for (name, help, c) in counted {
        f.head(name, "counter", help);
        f.sample(name, "", c.load(Ordering::Relaxed) as f64);
    }
    let reports = store.health_all()?;
    type Field = fn(&crate::health::HealthReport) -> Option<f64>;
    let per_node: [(&str, &str, Field); 10] = [
        (
            "clinicsync_node_last_heard_timestamp_seconds",
            "When the nearest hub last heard the node.",
            |r| r.heard_ms.map(|h| h as f64 / 1000.0),
        ),
        (
            "clinicsync_node_outbox_records",
            "Records waiting at the node to go up.",
            |r| Some(r.outbox as f64),
        ),
        (
            "clinicsync_node_quarantined_records",
            "Records in the node's quarantine.",
            |r| Some(r.quarantine as f64),
        ),
        (
            "clinicsync_node_conflicts_open",
            "Conflicts at the node no person has reviewed.",
            |r| Some(r.conflicts_open as f64),
        ),
        (
            "clinicsync_node_pull_lag_records",
            "Records the node has not pulled yet.",
            |r| Some(r.pull_lag as f64),
        ),
        (
            "clinicsync_node_disk_free_bytes",
            "Free bytes on the node's store filesystem.",
            |r| r.disk_free.map(|d| d as f64),
        ),
        (
            "clinicsync_node_clock_skew_seconds",
            "Node clock minus its parent's (positive: ahead).",
            |r| r.clock_skew_ms.map(|s| s as f64 / 1000.0),
        ),
        (
            "clinicsync_node_emr_error",
            "1 if the node's EMR is failing.",
            |r| Some(r.emr_error.is_some() as u8 as f64),
        ),
        (
            "clinicsync_node_link_error",
            "1 if the node's last exchange with its parent failed.",
            |r| Some(r.link_error.is_some() as u8 as f64),
        ),
        (
            "clinicsync_node_bytes_today",
            "Bytes the node exchanged with its parent today (UTC).",
            |r| Some(r.bytes_today as f64),
        ),
    ];
    for (name, help, get) in per_node {
        f.head(name, "gauge", help);
        for (via, r) in &reports {
            if let Some(v) = get(r) {
                f.sample(
                    name,
                    &format!("node=\"{}\",via=\"{}\"", label(&r.node), label(via)),
                    v,
                );
            }
        }
    }
    f.head(
        "clinicsync_node_info",
        "gauge",
        "A node's reported version (value 1).",
    );
    for (via, r) in &reports {
        f.sample(
            "clinicsync_node_info",
            &format!(
                "node=\"{}\",via=\"{}\",version=\"{}\"",
                label(&r.node),
                label(via),
                label(&r.version)
            ),
            1.0,
        );
    }
    Ok(out)
}

struct Served {
    store: Mutex<Store>,
    token: Option<[u8; 32]>,
    hub: Option<Arc<crate::hub::HubState>>,
}

async fn scrape(State(s): State<Arc<Served>>, headers: HeaderMap) -> Response {
    if let Some(want) = &s.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| <[u8; 32]>::from(Sha256::digest(t.trim().as_bytes())));
        if !given.is_some_and(|g| crate::auth::constant_time_eq(&g, want)) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a bearer token is required (metrics.token_sha256)\n",
            )
                .into_response();
        }
    }
    let s2 = s.clone();
    let text = tokio::task::spawn_blocking(move || {
        let store = s2.store.lock().unwrap_or_else(|p| p.into_inner());
        render(
            &store,
            s2.hub.as_deref().map(|h| &h.counters),
            crate::time::wall_ms(),
        )
    })
    .await;
    match text {
        Ok(Ok(t)) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            t,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// Serves `/metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Store,
    token_sha256: Option<&str>,
    hub: Option<Arc<crate::hub::HubState>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let token = match token_sha256 {
        Some(t) => {
            let mut h = [0u8; 32];
            hex::decode_to_slice(t, &mut h).map_err(|_| {
                std::io::Error::other("metrics.token_sha256 is not 64 hex characters")
            })?;
            Some(h)
        }
        None => None,
    };
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Arc::new(Served {
            store: Mutex::new(store),
            token,
            hub,
        }));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
