//! `clinicsync doctor`: checks a technician would otherwise do by hand, each
//! answered OK, WARN or FAIL with a hint. Exit code 1 when anything FAILs.
//!
//! Certificates: a clinic's parent check speaks the TLS the sync does
//! (`parent.ca_file`, `parent.pin_sha256`) and names a failed handshake in words
//! (unknown CA, name mismatch, expired, pin mismatch, a plain-HTTP hub behind an
//! `https://` URL, an HTTPS hub behind `http://`); when it succeeds it shows the
//! hub certificate's expiry and pin. A hub with `hub.tls_*` checks its own pair
//! (readable, key matches, expiry) and prints the pin clinics may use. Plain HTTP
//! that leaves the machine (a non-loopback `http://` parent, a hub without TLS
//! listening beyond loopback) is a WARN: anyone on the link can forge answers.
//! Credential files are checked (and refused when others may read them) even when
//! the parent is out of reach. Details quote peers and EMRs, so the human output
//! goes through [`crate::textsafe::safe`].

use serde::Serialize;

use super::{Failure, EXIT_FAILURE};
use crate::config::{Config, TransportKind};
use crate::store::Store;
use crate::textsafe::safe;
use crate::time::wall_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Level {
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "WARN")]
    Warn,
    #[serde(rename = "FAIL")]
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub level: Level,
    pub what: &'static str,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

fn check(level: Level, what: &'static str, detail: impl Into<String>, hint: Option<&str>) -> Check {
    Check {
        level,
        what,
        detail: detail.into(),
        hint: hint.map(str::to_string),
    }
}

use crate::time::http_date_ms;

pub fn run(path: &std::path::Path, json: bool) -> Result<(), Failure> {
    let mut checks = Vec::new();
    let cfg = match Config::load(path) {
        Ok(c) => {
            checks.push(check(
                Level::Ok,
                "config",
                format!(
                    "{} valid ({}, node {})",
                    path.display(),
                    c.role(),
                    c.node.id
                ),
                None,
            ));
            Some(c)
        }
        Err(e) => {
            checks.push(check(
                Level::Fail,
                "config",
                one_line(&e),
                Some("fix the file; `clinicsync config check` lists every problem"),
            ));
            None
        }
    };
    match &cfg {
        Some(cfg) => diagnose(cfg, &[], &mut checks),
        // Whatever still loads is checked: a bad [emr] must not hide a dead link.
        None => {
            match Config::salvage(path) {
                Some((cfg, broken)) => {
                    for section in &broken {
                        checks.push(check(
                        Level::Warn,
                        check_name(section),
                        format!("not checked: the [{section}] section is invalid (see config above)"),
                        None,
                    ));
                    }
                    diagnose(&cfg, &broken, &mut checks);
                }
                None => checks.push(check(
                    Level::Warn,
                    "store",
                    "not checked: the file is not TOML, or its [node] section is unusable",
                    None,
                )),
            }
        }
    }
    if json {
        super::print_json(&checks);
    } else {
        for c in &checks {
            let level = match c.level {
                Level::Ok => "OK  ",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            // Details quote the parent, the broker and the EMR: no escape sequences.
            println!("{level}  {:<10} {}", c.what, safe(&c.detail));
            if let Some(h) = &c.hint {
                println!("      {:<10} hint: {}", "", safe(h));
            }
        }
    }
    if checks.iter().any(|c| c.level == Level::Fail) {
        return Err(Failure::new(
            EXIT_FAILURE,
            "doctor found problems (FAIL above)",
        ));
    }
    Ok(())
}

/// The check that covers a configuration section.
/// A configuration error on one line (doctor's report is one line per check): the
/// problems joined with "; ", a TOML syntax error as its place and its message
/// without the snippet.
fn one_line(e: &crate::config::ConfigError) -> String {
    match e {
        crate::config::ConfigError::Invalid { path, problems } => {
            format!("{} is invalid: {}", path.display(), problems.join("; "))
        }
        crate::config::ConfigError::Parse { .. } => {
            let text = e.to_string();
            let mut lines = text.lines().filter(|l| !l.trim().is_empty());
            let first = lines.next().unwrap_or_default();
            match lines.next_back() {
                Some(last) => format!("{first}: {last}"),
                None => first.to_string(),
            }
        }
        other => other.to_string(),
    }
}

fn check_name(section: &str) -> &'static str {
    match section {
        "parent" => "parent",
        "hub" => "hub",
        "emr" => "emr",
        "mqtt" => "broker",
        "sync" => "sync",
        _ => "transport",
    }
}

/// Every check `cfg` allows; sections named in `broken` (invalid, left out of `cfg`)
/// are not checked.
fn diagnose(cfg: &Config, broken: &[&str], checks: &mut Vec<Check>) {
    let opened = if !cfg.node.store.exists() {
        checks.push(check(
            Level::Warn,
            "store",
            format!("no store yet at {}", cfg.node.store.display()),
            Some("the service creates it on its first start (systemctl start clinicsync); if it has run, check node.store"),
        ));
        None
    } else if let Err(f) = super::refuse_root_on_service_store(&cfg.node.store) {
        checks.push(check(Level::Fail, "store", f.message, None));
        None
    } else {
        Some(cfg.open_store())
    };
    if let Some(opened) = opened {
        match opened {
            Ok(store) => {
                match store.integrity_check() {
                    Ok(r) if r == "ok" => checks.push(check(
                        Level::Ok,
                        "store",
                        format!(
                            "{} intact (schema {})",
                            cfg.node.store.display(),
                            store.schema_version().unwrap_or(0)
                        ),
                        None,
                    )),
                    Ok(r) => checks.push(check(
                        Level::Fail,
                        "store",
                        format!("integrity check: {r}"),
                        Some("restore the store from a backup; keep the damaged file for analysis"),
                    )),
                    Err(e) => checks.push(check(Level::Fail, "store", e.to_string(), None)),
                }
                // SQLite's check sees pages, not meaning: a counter or cursor that is
                // not a number passes it and would stop the daemon mid-round.
                // The history counter against every place first: its error names
                // the highest place held (the write-time check sees `versions` only).
                match store
                    .check_history_places()
                    .and_then(|_| store.check_values())
                {
                    Ok(n) => checks.push(check(
                        Level::Ok,
                        "values",
                        format!("{n} counters, clocks and cursors read as their types"),
                        None,
                    )),
                    Err(e) => checks.push(check(
                        Level::Fail,
                        "values",
                        e.to_string(),
                        Some("restore the store from a backup; keep the damaged file for analysis"),
                    )),
                }
                match store.implausible_bundle_counts() {
                    Ok(full) if !full.is_empty() => checks.push(check(
                        Level::Warn,
                        "bundles",
                        full.iter()
                            .map(|(key, v)| match crate::store::MAX_BUNDLE_SEQ.saturating_sub(*v) {
                                0 => format!("USB bundle count {key} is {v}: no next bundle number"),
                                left => format!("USB bundle count {key} is {v}: beyond any real count, {left} numbers left"),
                            })
                            .collect::<Vec<_>>()
                            .join("; "),
                        Some("clinicsync never writes such a count (an edited store): at the end of the range USB export is refused; restore the store from a backup (README, Backup and restore)"),
                    )),
                    _ => {}
                }
                if let Ok(c) = store.counts() {
                    let level = if c.quarantine > 0 {
                        Level::Warn
                    } else {
                        Level::Ok
                    };
                    checks.push(check(
                        level,
                        "queues",
                        format!(
                            "{} to push, {} to apply, {} quarantined, {} conflicts",
                            c.outbox, c.inbox, c.quarantine, c.conflicts
                        ),
                        (c.quarantine > 0)
                            .then_some("`clinicsync quarantine list` shows why each record waits"),
                    ));
                }
            }
            Err(e) => checks.push(check(
                Level::Fail,
                "store",
                e.to_string(),
                Some("check node.store and its directory's permissions"),
            )),
        }
    }
    match crate::health::free_bytes(&cfg.node.store) {
        Some(b) if b < 50 << 20 => checks.push(check(
            Level::Fail,
            "disk",
            format!("{} MiB free", b >> 20),
            Some("free space: SQLite needs room to commit"),
        )),
        Some(b) if b < 500 << 20 => checks.push(check(
            Level::Warn,
            "disk",
            format!("{} MiB free", b >> 20),
            Some("free space soon"),
        )),
        Some(b) => checks.push(check(
            Level::Ok,
            "disk",
            format!("{} MiB free", b >> 20),
            None,
        )),
        None => checks.push(check(Level::Warn, "disk", "free space unknown", None)),
    }
    let parent_key = || {
        if cfg.parent.is_none()
            || !cfg.node.store.exists()
            || super::refuse_root_on_service_store(&cfg.node.store).is_err()
        {
            return None;
        }
        Store::open_existing(&cfg.node.store)
            .ok()
            .map(|s| s.trusted_parent().ok().flatten().is_some())
    };
    match crate::keys::Identity::load(&cfg.keys_dir(), &cfg.node.id) {
        Ok(_) if parent_key() == Some(false) => checks.push(check(
            Level::Warn,
            "keys",
            format!(
                "bundle keys in {}, but no parent key is trusted: USB export has no one to encrypt to",
                cfg.keys_dir().display()
            ),
            Some("on the hub `clinicsync keys show > hub.pub`; here `clinicsync keys trust hub.pub --parent`"),
        )),
        Ok(_) => checks.push(check(
            Level::Ok,
            "keys",
            format!("bundle keys in {}", cfg.keys_dir().display()),
            None,
        )),
        Err(e) => checks.push(check(
            Level::Warn,
            "keys",
            e.to_string(),
            Some("needed only for USB bundles: `clinicsync keys init`"),
        )),
    }
    // A trusted key row that is not its node's key refuses that node's bundles as
    // corruption; found here before a stick arrives.
    let damaged_keys = || -> Option<Vec<String>> {
        if !cfg.node.store.exists() || super::refuse_root_on_service_store(&cfg.node.store).is_err()
        {
            return None;
        }
        let store = Store::open_existing(&cfg.node.store).ok()?;
        let rows = store.trusted_list().ok()?;
        Some(
            rows.iter()
                .filter_map(|(node, _, _)| crate::sneakernet::trusted_keys(&store, node).err())
                .map(|e| e.to_string())
                .collect(),
        )
    };
    if let Some(damaged) = damaged_keys().filter(|d| !d.is_empty()) {
        checks.push(check(
            Level::Fail,
            "trusted keys",
            damaged.join("; "),
            Some("bundles from that node are refused until its key is stored again: on that node `clinicsync keys show`, here `clinicsync keys trust <its line> --replace`"),
        ));
    }
    match cfg.emr_adapter() {
        _ if broken.contains(&"emr") => {}
        Ok(None) => checks.push(check(
            Level::Ok,
            "emr",
            "embedded: this node's store is its EMR",
            None,
        )),
        // The adapter's own checks: for OpenMRS the account and its privileges,
        // clock skew, modules, feed categories, the sweep and how creates keep the
        // network's uuid (crate::emr::openmrs::diagnose).
        Ok(Some(mut emr)) => {
            for c in emr.diagnose() {
                let level = match c.level {
                    crate::emr::CheckLevel::Ok => Level::Ok,
                    crate::emr::CheckLevel::Warn => Level::Warn,
                    crate::emr::CheckLevel::Fail => Level::Fail,
                };
                checks.push(Check {
                    level,
                    what: c.what,
                    detail: c.detail,
                    hint: c.hint,
                });
            }
        }
        Err(e) => checks.push(check(Level::Fail, "emr", e.to_string(), None)),
    }
    if let Some(parent) = &cfg.parent {
        parent_checks(cfg, parent, checks);
    }
    if cfg.mqtt.is_some() {
        match cfg.mqtt_settings() {
            Ok(s) => match crate::transport::mqtt::MqttClient::connect(
                &s,
                &format!("{}-doctor", cfg.node.id),
                std::time::Duration::from_secs(10),
            ) {
                Ok(_) => checks.push(check(
                    Level::Ok,
                    "broker",
                    format!("{}:{} accepted {}", s.host, s.port, s.username),
                    None,
                )),
                Err(e) => checks.push(check(
                    Level::Fail,
                    "broker",
                    e.to_string(),
                    Some("check mqtt.url, the password file and the broker's ACL"),
                )),
            },
            Err(e) => checks.push(check(Level::Fail, "broker", e, None)),
        }
    }
    if let Some(hub) = &cfg.hub {
        hub_tls_check(hub, checks);
        // Is the service actually serving? (Checked from here, on loopback for a
        // wildcard address.)
        if let Ok(addr) = hub.listen.parse::<std::net::SocketAddr>() {
            let mut probe = addr;
            if probe.ip().is_unspecified() {
                probe.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            if probe.port() != 0
                && std::net::TcpStream::connect_timeout(&probe, std::time::Duration::from_secs(2))
                    .is_err()
            {
                checks.push(check(
                    Level::Fail,
                    "listen",
                    format!("nothing listens on {}: children cannot reach this hub", hub.listen),
                    Some("start the service (systemctl start clinicsync) and read `journalctl -u clinicsync`"),
                ));
            } else if probe.port() != 0 {
                checks.push(check(
                    Level::Ok,
                    "listen",
                    format!("{} accepts connections", hub.listen),
                    None,
                ));
            }
        }
        let level = if hub.children.is_empty() {
            Level::Warn
        } else {
            Level::Ok
        };
        checks.push(check(
            level,
            "hub",
            format!(
                "serves {} children on {}, {} catchment rules",
                hub.children.len(),
                hub.listen,
                hub.catchment.len()
            ),
            hub.children
                .is_empty()
                .then_some("enrol children with `clinicsync token new` and [[hub.children]]"),
        ));
    }
}

/// Days from now until a certificate's notAfter (negative once expired).
fn days_left(cert: &rustls::pki_types::CertificateDer<'_>) -> Option<i64> {
    let end = crate::tls::not_after(cert)?;
    Some((end - (wall_ms() / 1000) as i64).div_euclid(86_400))
}

/// A certificate's remaining validity as a check.
fn expiry_check(what: &'static str, detail: String, days: Option<i64>) -> Check {
    match days {
        Some(d) if d < 0 => check(
            Level::Fail,
            what,
            format!("{detail}; expired {} days ago", -d),
            Some("renew the certificate on the hub, then `systemctl reload clinicsync` there"),
        ),
        Some(d) if d < 21 => check(
            Level::Warn,
            what,
            format!("{detail}; expires in {d} days"),
            Some("renew the certificate on the hub soon, then `systemctl reload clinicsync` there"),
        ),
        Some(d) => check(
            Level::Ok,
            what,
            format!("{detail}; expires in {d} days"),
            None,
        ),
        None => check(Level::Ok, what, detail, None),
    }
}

/// The hub's own certificate and key (`hub.tls_*`).
fn hub_tls_check(hub: &crate::config::HubSection, checks: &mut Vec<Check>) {
    let (Some(cert), Some(key)) = (&hub.tls_cert_file, &hub.tls_key_file) else {
        // Plain HTTP is fine behind a TLS proxy on this machine (a loopback listen
        // address); on any other address children's records cross the link in clear.
        let off_host = hub
            .listen
            .parse::<std::net::SocketAddr>()
            .map_or(true, |a| !crate::tls::is_loopback(a.ip()));
        if off_host {
            checks.push(check(
                Level::Warn,
                "tls",
                format!(
                    "serves plain HTTP on {}: anyone on a child's link can read its records and forge this hub's answers",
                    hub.listen
                ),
                Some("set hub.tls_cert_file and hub.tls_key_file (or listen on 127.0.0.1 behind a TLS proxy)"),
            ));
        }
        return;
    };
    match crate::tls::ServerTls::load(cert, key) {
        Ok(tls) => {
            let first = crate::tls::load_certs(cert).ok().and_then(|c| c.into_iter().next());
            let detail = format!(
                "HTTPS with {}; clinics may pin parent.pin_sha256 = \"{}\"",
                cert.display(),
                tls.pin().unwrap_or_default()
            );
            checks.push(expiry_check("tls", detail, first.as_ref().and_then(days_left)));
        }
        Err(e) => checks.push(check(
            Level::Fail,
            "tls",
            e.to_string(),
            Some("hub.tls_cert_file must hold the PEM chain (server certificate first) and hub.tls_key_file its PEM key"),
        )),
    }
}

/// How a failed health check reads to a technician.
fn parent_failure(url: &str, parent_url: &str, e: ureq::Error) -> Check {
    match e {
        ureq::Error::Transport(t) => match crate::tls::TlsProblem::find(&t) {
            Some(problem) => check(
                Level::Fail,
                "tls",
                format!("{parent_url}: {problem}"),
                Some(problem.hint()),
            ),
            None => check(
                Level::Fail,
                "parent",
                format!("{url}: {t}"),
                Some("check the link (ping, modem) and parent.url"),
            ),
        },
        ureq::Error::Status(status, resp) => {
            let mut body = String::new();
            let _ = std::io::Read::read_to_string(
                &mut std::io::Read::take(resp.into_reader(), 4096),
                &mut body,
            );
            if body.contains("serves HTTPS") {
                check(
                    Level::Fail,
                    "tls",
                    format!("{parent_url}: the hub serves HTTPS but parent.url says http://"),
                    Some("use https:// in parent.url (and parent.ca_file for a private CA)"),
                )
            } else {
                check(
                    Level::Fail,
                    "parent",
                    format!("{url}: HTTP {status}: {}", body.trim()),
                    Some("check parent.url: it must name the hub's address and port"),
                )
            }
        }
    }
}

fn parent_checks(cfg: &Config, parent: &crate::config::ParentSection, checks: &mut Vec<Check>) {
    if cfg.transport.kind == TransportKind::Mqtt {
        return;
    }
    // The credential file is checked even when the parent is out of reach: a file
    // others can read is a problem whatever the link does.
    let token = match crate::auth::read_token(&parent.token_file) {
        Ok(t) => Some(t),
        Err(e) => {
            checks.push(check(
                Level::Fail,
                "credential",
                format!("{}: {e}", parent.token_file.display()),
                None,
            ));
            None
        }
    };
    let tls = match parent.tls() {
        Ok(t) => t,
        Err(e) => {
            checks.push(check(
                Level::Fail,
                "tls",
                e.to_string(),
                Some("parent.ca_file must hold the PEM certificate of the CA that signed the hub's certificate"),
            ));
            return;
        }
    };
    if let Some(host) = crate::tls::plain_http_remote_host(&parent.url) {
        checks.push(check(
            Level::Warn,
            "tls",
            format!(
                "{} is plain HTTP to {host}: anyone on the link can read the records and forge the hub's answers (a forged \"accepted\" clears records from the outbox)",
                parent.url
            ),
            Some("serve the hub over HTTPS (hub.tls_cert_file, hub.tls_key_file) and use https:// in parent.url with parent.ca_file or parent.pin_sha256"),
        ));
    }
    let mut builder = ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(15));
    if let Some(t) = &tls {
        builder = builder.tls_config(t.clone());
    }
    let agent = builder.build();
    let url = format!("{}/v1/health", parent.url.trim_end_matches('/'));
    let t0 = wall_ms();
    match agent.get(&url).call() {
        Ok(resp) => {
            let rtt = wall_ms().saturating_sub(t0);
            checks.push(check(
                Level::Ok,
                "parent",
                format!("{} answers ({rtt} ms)", parent.url),
                None,
            ));
            if let Some(remote) = resp.header("Date").and_then(http_date_ms) {
                let local = t0 + rtt / 2;
                let diff = local as i64 - remote as i64;
                let skew = diff.abs() / 1000;
                let words = format!(
                    "this node's clock is {} {} the parent's",
                    crate::time::words_for_ms(diff.unsigned_abs()),
                    if diff >= 0 { "ahead of" } else { "behind" }
                );
                let (level, hint) = match skew {
                    s if s > 3600 => (
                        Level::Fail,
                        Some(
                            "set the clock (NTP or `date -s`); times in history and logs are wrong",
                        ),
                    ),
                    s if s > 60 => (
                        Level::Warn,
                        Some("the clock drifts; enable NTP when the link allows"),
                    ),
                    _ => (Level::Ok, None),
                };
                checks.push(check(
                    level,
                    "clock",
                    if skew <= 1 {
                        "in step with the parent's clock".to_string()
                    } else {
                        words
                    },
                    hint,
                ));
            }
        }
        Err(e) => {
            checks.push(parent_failure(&url, &parent.url, e));
            return;
        }
    }
    if let Some((host, port)) = crate::tls::https_host_port(&parent.url) {
        let config = match &tls {
            Some(t) => Ok(t.clone()),
            None => crate::tls::client_config(None, &[]),
        };
        let trust = match (&parent.ca_file, &parent.pin_sha256) {
            (Some(ca), Some(_)) => format!("signed by {}, key pinned", ca.display()),
            (Some(ca), None) => format!("signed by {}", ca.display()),
            (None, Some(_)) => "signed by a public CA, key pinned".to_string(),
            (None, None) => "signed by a public CA".to_string(),
        };
        if let Ok(config) = config {
            match crate::tls::peer_certificate(
                &host,
                port,
                config,
                std::time::Duration::from_secs(15),
            ) {
                Ok(cert) => {
                    let pin = crate::tls::spki_sha256(&cert)
                        .map(|p| crate::tls::pin_text(&p))
                        .unwrap_or_default();
                    checks.push(expiry_check(
                        "tls",
                        format!("hub certificate {trust} (pin {pin})"),
                        days_left(&cert),
                    ));
                }
                Err(e) => checks.push(check(
                    Level::Warn,
                    "tls",
                    format!("could not read the hub's certificate: {e}"),
                    None,
                )),
            }
        }
    }
    let Some(token) = token else {
        return;
    };
    let client = crate::transport::http::HttpClient::with_tls(
        &parent.url,
        token,
        std::time::Duration::from_secs(20),
        tls,
    );
    let probe = crate::wire::Message::PullRequest(crate::wire::PullRequest {
        node: cfg.node.id.clone(),
        cursor: crate::wire::Cursor {
            eff: i64::MAX as u64,
            seq: i64::MAX as u64,
        },
        max_bytes: 1,
        max_records: 1,
        include_own: false,
        answer_chunk: 0,
        health: Vec::new(),
        order_results: Vec::new(),
    });
    match client.exchange("/v1/pull", &probe) {
        Ok(_) => checks.push(check(Level::Ok, "credential", "accepted by the parent", None)),
        Err(e) => checks.push(check(Level::Fail, "credential", e.to_string(), Some("the hub's [[hub.children]] must hold this node's id and the SHA-256 of parent.token_file"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse() {
        assert_eq!(
            http_date_ms("Wed, 18 Nov 2026 11:06:40 GMT"),
            Some(1_795_000_000_000)
        );
        assert_eq!(http_date_ms("garbage"), None);
    }
}
