//! The configuration file (TOML): one file per node, validated as a whole so a
//! technician sees every mistake at once, each naming the section and key.
//!
//! Sections: `[node]` (identity, store path), `[parent]` (absent on the root hub),
//! `[sync]` (intervals, batch sizes, backoff), `[hub]` (present when the node serves
//! children: listen address, limits, children and their credential hashes, catchment
//! rules, connection limits and timeouts, TLS). `packaging/clinicsync.toml` is the
//! commented example.
//! Credential files (`parent.token_file`, `mqtt.password_file`,
//! `emr.credentials_file`) are read only if private to their owner (no group or
//! world bits; see [`crate::filemode`]).
//!
//! Reloading: on SIGHUP a hub re-reads this file and applies `hub.children` and the
//! `hub.tls_*` files (see `daemon`); every other key takes effect on restart. A file
//! that does not validate is not applied at all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::read_token;
use crate::engine::{CatchmentRule, Policy};
use crate::model::valid_node_id;
use crate::secret::Secret;

pub const DEFAULT_PATH: &str = "/etc/clinicsync/clinicsync.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path} is invalid:\n  - {}", problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
    /// A credential file the configuration names (`key`) is open to others.
    #[error("{key}: {source}")]
    CredentialMode {
        key: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A credential file the configuration names (`key`) cannot be read.
    #[error("{key} {}: {source}", path.display())]
    CredentialRead {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A credential file that does not hold what `key` needs (`expected`).
    #[error("{key} {} must hold {expected}", path.display())]
    CredentialFormat {
        key: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    /// A TLS file the configuration names (`key`) cannot be used.
    #[error("{key}: {source}")]
    Tls {
        key: &'static str,
        #[source]
        source: crate::tls::TlsError,
    },
    /// A setting read only when it is used, and wrong.
    #[error("{key} {message}")]
    Setting { key: &'static str, message: String },
}

/// A configuration that does not load, or names a file that cannot be used, needs a
/// person, whatever the reason (an unreadable file included: it is this node's own
/// setup, not a peer that may come back).
impl crate::error::Classify for ConfigError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            ConfigError::Read { .. }
            | ConfigError::Parse { .. }
            | ConfigError::Invalid { .. }
            | ConfigError::CredentialMode { .. }
            | ConfigError::CredentialRead { .. }
            | ConfigError::CredentialFormat { .. }
            | ConfigError::Tls { .. }
            | ConfigError::Setting { .. } => crate::error::ErrorClass::Permanent,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    pub parent: Option<ParentSection>,
    #[serde(default)]
    pub sync: SyncSection,
    pub hub: Option<HubSection>,
    #[serde(default)]
    pub transport: TransportSection,
    #[serde(default)]
    pub emr: EmrSection,
    pub mqtt: Option<MqttSection>,
    pub metrics: Option<MetricsSection>,
    #[serde(skip)]
    pub path: PathBuf,
}

/// A Prometheus `/metrics` endpoint (`crate::metrics`), on any node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// e.g. `127.0.0.1:9464`. Any other address needs `token_sha256`.
    pub listen: String,
    /// SHA-256 (hex) of the bearer token scrapers send (`clinicsync token new`
    /// makes one); without it only loopback scrapers can reach the endpoint.
    #[serde(default)]
    pub token_sha256: Option<String>,
}

/// Which EMR the node serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmrKind {
    /// The node's own store is the EMR (hubs without an EMR, demos, tests).
    #[default]
    Embedded,
    /// An OpenMRS server: atom feed for changes, FHIR2 and REST v1 for records.
    Openmrs,
    /// Any FHIR R4 server: `_history` (or `_lastUpdated` search) for changes, PUT for writes.
    Fhir,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmrSection {
    pub kind: EmrKind,
    /// Base URL, e.g. `http://localhost:8080` (paths add `/openmrs/ws/…`).
    pub url: String,
    /// File holding `user:password` for HTTP Basic (never logged).
    pub credentials_file: PathBuf,
    /// Atom feed categories to capture (openmrs); the default is what the atomfeed
    /// module's shipped configuration publishes.
    pub categories: Vec<String>,
    /// FHIR2 types no feed announces, captured by a `_lastUpdated` sweep (openmrs).
    pub sweep_types: Vec<String>,
    /// How often the sweep runs (openmrs).
    pub sweep_secs: u64,
    /// Keep the server-generated narrative (`text`) in captured records (openmrs);
    /// by default it is dropped, since each server writes its own.
    pub keep_narrative: bool,
    /// After OpenMRS refuses our credentials, leave it alone this long (openmrs):
    /// every login attempt on a locked account restarts its 5-minute lock.
    pub auth_retry_secs: u64,
    /// Resource types to capture (fhir).
    pub types: Vec<String>,
    /// First run: read the feeds from the "beginning", or from "now" (a clinic
    /// cloned from another's database).
    pub start: String,
    pub timeout_secs: u64,
    /// First retry of a record the EMR refused; doubles per attempt, up to a day.
    pub retry_secs: u64,
    /// How the fhir adapter reads changes: "auto" (probe: type history, else system
    /// history, else `_lastUpdated` search), "type-history", "system-history" or
    /// "search" (see `emr::fhir`).
    pub fhir_capture: String,
    /// Taken off the FHIR server's clock at the start of a read to make the next
    /// `_since`: longer than any write transaction and any clock step between the
    /// server's nodes. Versions read twice in that window are recognised.
    pub fhir_since_margin_secs: u64,
}

impl Default for EmrSection {
    fn default() -> Self {
        EmrSection {
            kind: EmrKind::Embedded,
            url: String::new(),
            credentials_file: PathBuf::new(),
            categories: crate::emr::openmrs::SHIPPED_CATEGORIES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            sweep_types: ["Condition", "MedicationDispense"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            sweep_secs: 600,
            keep_narrative: false,
            auth_retry_secs: 600,
            types: [
                "Location",
                "Practitioner",
                "Patient",
                "Encounter",
                "Observation",
                "Condition",
                "AllergyIntolerance",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            start: "beginning".into(),
            timeout_secs: 30,
            retry_secs: 300,
            fhir_capture: "auto".into(),
            fhir_since_margin_secs: 300,
        }
    }
}

/// How a child reaches its parent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// HTTP(S) polling on `sync.interval_secs` (default).
    #[default]
    Http,
    /// MQTT only: requests and wake-ups through the broker.
    Mqtt,
    /// MQTT for wake-ups and exchanges, HTTP when the broker path fails.
    Both,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportSection {
    #[serde(default)]
    pub kind: TransportKind,
}

/// The MQTT broker: used by a child whose transport includes MQTT, and by a hub to
/// serve children through the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// `mqtt://host:1883` or `mqtts://host:8883`.
    pub url: String,
    /// Broker username; the ACL expects it to equal the node id (the default).
    pub username: Option<String>,
    /// File holding the broker password (one line, never logged).
    pub password_file: PathBuf,
    /// CA certificate (PEM) for `mqtts://`.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_mqtt_max")]
    pub max_message_bytes: usize,
}

fn default_mqtt_max() -> usize {
    8 << 20
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub id: String,
    pub store: PathBuf,
    /// Where this node's USB-bundle keys live (default: `keys/` beside the store).
    #[serde(default)]
    pub keys_dir: Option<PathBuf>,
    /// Run orders the parent sends (`clinicsync remote` at the hub): quarantine
    /// retry/drop, resync, diagnostics. `false`: each is answered "refused".
    #[serde(default = "yes")]
    pub remote_orders: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentSection {
    /// `http://host:port` or `https://host:port` of the parent hub.
    pub url: String,
    /// File holding this node's bearer credential for the parent (one line).
    pub token_file: PathBuf,
    /// PEM file of the CA(s) that signed the hub's certificate (a private CA). When
    /// set, only these are trusted for the hub, not the public web roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the hub certificate's SubjectPublicKeyInfo (hex or base64), checked
    /// in addition to the chain; a list accepts any of its pins (the current key and
    /// the next, while the hub's key is rotated). See [`crate::tls`] for the openssl
    /// command.
    #[serde(default)]
    pub pin_sha256: Option<Pins>,
}

/// One pin or several (`pin_sha256 = "…"` or `pin_sha256 = ["…", "…"]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Pins {
    One(String),
    Many(Vec<String>),
}

impl Pins {
    pub fn texts(&self) -> Vec<&str> {
        match self {
            Pins::One(p) => vec![p.as_str()],
            Pins::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }

    /// Every pin parsed, or `None` if one does not parse or there are none.
    pub fn parse(&self) -> Option<Vec<[u8; 32]>> {
        let texts = self.texts();
        if texts.is_empty() {
            return None;
        }
        texts.into_iter().map(crate::tls::parse_pin).collect()
    }
}

impl std::fmt::Debug for ParentSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParentSection")
            .field("url", &self.url)
            .field("token_file", &self.token_file)
            .field("ca_file", &self.ca_file)
            .field("pin_sha256", &self.pin_sha256)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSection {
    pub interval_secs: u64,
    pub push_batch_records: usize,
    pub push_batch_bytes: usize,
    pub pull_page_records: u32,
    pub pull_page_bytes: u64,
    pub timeout_secs: u64,
    pub backoff_min_secs: u64,
    pub backoff_max_secs: u64,
    /// Frames larger than this go as resumable chunks (0: never chunk).
    pub chunk_bytes: usize,
    /// Metered links: bytes a day (UTC) to and from the parent; 0 = unlimited. Pushes
    /// (clinical work, urgent) always go; pulls (bulk) stop once it is spent.
    pub daily_budget_bytes: u64,
    /// Metered links: the UTC hours ("22:00-06:00") when bulk pulls may run freely;
    /// outside them a round pulls at most one page. Empty = always.
    pub bulk_window: String,
    /// The zstd level of push frames: "auto" (chosen from the link's measured upload
    /// rate, [`crate::wire::level`]) or a level from 1 to 19.
    pub push_level: PushLevelSetting,
}

/// The largest `sync.chunk_bytes`: a hub's default `hub.max_message_bytes` (an upload
/// piece is one request). Answers come in pieces of at most
/// [`crate::wire::MAX_ANSWER_PIECE`] whatever it is.
pub const MAX_CHUNK_BYTES: usize = 16 << 20;

/// `sync.push_level` as written: `"auto"`, a number, or anything else (kept as written
/// so validation names it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PushLevelSetting {
    #[default]
    Auto,
    Number(i64),
    Other(String),
}

impl<'de> Deserialize<'de> for PushLevelSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match toml::Value::deserialize(d)? {
            toml::Value::String(s) if s == "auto" => PushLevelSetting::Auto,
            toml::Value::Integer(n) => PushLevelSetting::Number(n),
            other => PushLevelSetting::Other(other.to_string()),
        })
    }
}

impl PushLevelSetting {
    /// What the setting asks for; `None` when it is invalid (validation says so).
    pub fn level(&self) -> Option<crate::wire::level::PushLevel> {
        use crate::wire::level::{PushLevel, MAX_LEVEL};
        match self {
            PushLevelSetting::Auto => Some(PushLevel::Auto),
            PushLevelSetting::Number(n) if (1..=i64::from(MAX_LEVEL)).contains(n) => {
                Some(PushLevel::Fixed(*n as i32))
            }
            _ => None,
        }
    }

    /// The problem with the setting, naming the key and the value.
    fn problem(&self) -> Option<String> {
        if self.level().is_some() {
            return None;
        }
        let shown = match self {
            PushLevelSetting::Number(n) => n.to_string(),
            PushLevelSetting::Other(text) => text.clone(),
            PushLevelSetting::Auto => return None,
        };
        Some(format!(
            "sync.push_level {shown} must be \"auto\" or a zstd level from 1 to {}",
            crate::wire::level::MAX_LEVEL
        ))
    }
}

impl Default for SyncSection {
    fn default() -> Self {
        SyncSection {
            interval_secs: 60,
            push_batch_records: 2_000,
            push_batch_bytes: 2 << 20,
            pull_page_records: 5_000,
            pull_page_bytes: 4 << 20,
            timeout_secs: 120,
            backoff_min_secs: 5,
            backoff_max_secs: 900,
            chunk_bytes: 64 << 10,
            daily_budget_bytes: 0,
            bulk_window: String::new(),
            push_level: PushLevelSetting::Auto,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSection {
    pub listen: String,
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    #[serde(default = "default_max_record")]
    pub max_record_bytes: usize,
    /// Resource kinds accepted from children; `openmrs:*` kinds are always accepted.
    #[serde(default)]
    pub known_kinds: Option<Vec<String>>,
    #[serde(default)]
    pub children: Vec<Child>,
    #[serde(default)]
    pub catchment: Vec<CatchmentRule>,
    /// Open connections served at once; further ones wait in the kernel's accept
    /// queue until a slot frees (see `hub` for why they are not refused).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// From accepting a connection (or the first byte of a later request on it) to
    /// the end of the request's headers, TLS handshake included.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_secs: u64,
    /// A kept-alive connection with no request and no bytes moving is closed after
    /// this. Half the clinics' default `sync.interval_secs`: connections live through
    /// a round and are gone between rounds, so a clinic never sends into a connection
    /// the hub is closing, and idle clinics do not hold connection slots.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// The whole request body must arrive within this (408 otherwise).
    #[serde(default = "default_body_timeout")]
    pub body_timeout_secs: u64,
    /// Requests decoded and handled at once (HTTP and MQTT together); beyond it the
    /// hub answers 503 with Retry-After. Default: twice the CPU cores (4 if unknown).
    #[serde(default)]
    pub max_concurrent_requests: Option<usize>,
    /// Serve HTTPS: the certificate chain (PEM, end-entity first) and its key (PEM).
    /// Both or neither; re-read on SIGHUP (`systemctl reload clinicsync`).
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// A pushed record stamped more than this far ahead of the hub's clock is refused
    /// (retryable): one clinic with a clock days fast would otherwise win every
    /// conflict and drag every node's clock along.
    #[serde(default = "default_max_clock_ahead")]
    pub max_clock_ahead_secs: u64,
}

impl HubSection {
    /// `max_concurrent_requests`, or its default for this machine.
    pub fn concurrent_requests(&self) -> usize {
        self.max_concurrent_requests.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() * 2)
                .unwrap_or(4)
        })
    }
}

fn default_max_connections() -> usize {
    512
}
fn default_header_timeout() -> u64 {
    10
}
fn default_idle_timeout() -> u64 {
    30
}
fn default_body_timeout() -> u64 {
    120
}

fn default_max_clock_ahead() -> u64 {
    300
}

fn default_max_message() -> usize {
    16 << 20
}
fn default_max_record() -> usize {
    1 << 20
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Child {
    pub node: String,
    /// SHA-256 (hex) of the child's bearer credential; the credential itself is never stored.
    pub token_sha256: String,
    /// For a district hub: the nodes below it whose records it forwards. A record's
    /// `origin` must be the child itself or one of these.
    #[serde(default)]
    pub descendants: Vec<String>,
    /// During a credential rotation (`clinicsync child rotate`): the hash of the
    /// credential being replaced, accepted until `previous_token_expires`.
    #[serde(default)]
    pub previous_token_sha256: Option<String>,
    /// When the previous credential stops being accepted: UTC, `2026-11-25T10:00:00Z`.
    #[serde(default)]
    pub previous_token_expires: Option<String>,
}

impl Child {
    /// The previous credential's hash and the end of its overlap (epoch ms), if any.
    pub fn previous(&self) -> Option<(&str, u64)> {
        let hash = self.previous_token_sha256.as_deref()?;
        let until = parse_utc(self.previous_token_expires.as_deref()?)?;
        Some((hash, until))
    }
}

/// `2026-11-25T10:00:00Z` (UTC, whole seconds) as epoch milliseconds.
pub fn parse_utc(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    // Days from civil (Howard Hinnant).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000).ok()
}

impl Config {
    /// Opens (creating if needed) this node's store: a new one with a hub's page
    /// size when this node serves children (`[hub]`), SQLite's default otherwise
    /// (see `store::HUB_PAGE_SIZE`).
    pub fn open_store(&self) -> Result<crate::store::Store, crate::store::StoreError> {
        let pages = self.hub.as_ref().map(|_| crate::store::HUB_PAGE_SIZE);
        crate::store::Store::open_paged(&self.node.store, &self.node.id, pages)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config =
            toml::from_str(text).map_err(|first| Config::every_problem(text, path, first))?;
        cfg.path = path.to_path_buf();
        let problems = once_each(cfg.problems());
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            });
        }
        Ok(cfg)
    }

    /// What can still be used of a file that does not load, for `doctor` to run
    /// every check it can: each section that does not parse, or that has a problem,
    /// is left out (or at its default), and named in the second value. `None` when
    /// the file is not TOML or `[node]` itself is unusable.
    pub fn salvage(path: &Path) -> Option<(Config, Vec<&'static str>)> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut table: toml::Table = toml::from_str(&text).ok()?;
        let mut broken: Vec<&'static str> = Vec::new();
        const SECTIONS: [&str; 6] = ["parent", "sync", "hub", "transport", "emr", "mqtt"];
        for name in SECTIONS {
            let Some(v) = table.get(name).cloned() else {
                continue;
            };
            let ok = match name {
                "parent" => v.try_into::<ParentSection>().is_ok(),
                "sync" => v.try_into::<SyncSection>().is_ok(),
                "hub" => v.try_into::<HubSection>().is_ok(),
                "transport" => v.try_into::<TransportSection>().is_ok(),
                "emr" => v.try_into::<EmrSection>().is_ok(),
                _ => v.try_into::<MqttSection>().is_ok(),
            };
            if !ok {
                table.remove(name);
                broken.push(name);
            }
        }
        // Keys that belong to no section are dropped; [node] must parse.
        table.retain(|k, _| k == "node" || SECTIONS.contains(&k));
        let mut cfg: Config = toml::Value::Table(table).try_into().ok()?;
        cfg.path = path.to_path_buf();
        for problem in cfg.problems() {
            let section = SECTIONS
                .into_iter()
                .find(|s| problem.starts_with(&format!("{s}.")));
            match section {
                Some(s) if !broken.contains(&s) => broken.push(s),
                _ => {}
            }
        }
        for s in &broken {
            match *s {
                "parent" => cfg.parent = None,
                "sync" => cfg.sync = SyncSection::default(),
                "hub" => cfg.hub = None,
                "transport" => cfg.transport = TransportSection::default(),
                "emr" => cfg.emr = EmrSection::default(),
                _ => cfg.mqtt = None,
            }
        }
        if cfg.transport.kind != TransportKind::Http && cfg.mqtt.is_none() {
            cfg.transport = TransportSection::default();
        }
        Some((cfg, broken))
    }

    /// A file that is TOML but does not deserialize: every problem in it, not only the
    /// first serde stops at, so a technician on a slow link fixes them in one pass.
    ///
    /// Each wrong entry is blanked (spaces, so line and column numbers stay true; an
    /// unknown table with its keys; a value over several lines until the rest reads)
    /// and the file read again. A required key reported missing because its own
    /// wrong value was blanked is an echo, not named; its table is blanked instead. A
    /// key missing from the file is named, and its table blanked. Without a usable
    /// `[node]` a placeholder stands in, so the other sections are still checked. The
    /// semantic checks of what finally reads are added, less those about a key or
    /// table blanked here. At most [`MAX_LISTED`] problems, then a line saying so.
    /// Text that is not TOML gets the parser's own error.
    fn every_problem(text: &str, path: &Path, first: toml::de::Error) -> ConfigError {
        const PLACEHOLDER_NODE: &str = "\n[node]\nid = \"placeholder\"\nstore = \"placeholder\"\n";
        let invalid = |problems: Vec<String>| {
            let mut problems = once_each(problems);
            if problems.len() > MAX_LISTED {
                problems.truncate(MAX_LISTED);
                problems.push(format!(
                    "(stopped after {MAX_LISTED} problems: fix these and run `config check` again)"
                ));
            }
            ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            }
        };
        if toml::from_str::<toml::Table>(text).is_err() {
            return ConfigError::Parse {
                path: path.to_path_buf(),
                source: first,
            };
        }
        let mut text = text.to_string();
        let mut problems = Vec::new();
        // What was blanked: (bytes, dotted path of the key or table).
        let mut blanked: Vec<(std::ops::Range<usize>, String)> = Vec::new();
        let mut err = first;
        let mut placeholder = false;
        for _ in 0..4 * MAX_LISTED {
            let Some(span) = err.span() else {
                problems.push(err.message().to_string());
                return invalid(problems);
            };
            // A key missing at the top level has an empty span, or one over the whole
            // file when it has no table header; one missing from a table spans the
            // table (from its header), its first dotted key or the inline table.
            let lines = entry_lines(&text, span.start);
            let header = table_header(&text[lines.clone()]);
            let top = span.is_empty()
                || (span.start == 0 && span.end >= text.trim_end().len() && header.is_none());
            let missing = err
                .message()
                .strip_prefix("missing field `")
                .and_then(|m| m.split('`').next())
                .map(str::to_string);
            let echo = missing.as_deref().is_some_and(|k| {
                blanked.iter().any(|(r, name)| match (top, &header) {
                    (true, _) => name == k || name.starts_with(&format!("{k}.")),
                    // In a table with a header: a key blanked in that table.
                    (false, Some(_)) => {
                        name.rsplit('.').next() == Some(k) && lines.contains(&r.start)
                    }
                    // Dotted keys or an inline table: a key of that name blanked.
                    (false, None) => name.rsplit('.').next() == Some(k),
                })
            });
            if !echo {
                let (line, column) = line_column(&text, span.start);
                let shown = match top {
                    true => "",
                    false => text[lines.start..]
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim_start_matches('\u{feff}')
                        .trim(),
                };
                let shown: String = shown.chars().take(60).collect();
                // `[[sync]]` makes an array where one table belongs: serde says "invalid
                // type: map", which names neither.
                let array = match (&header, shown.starts_with("[[")) {
                    (Some(h), true) if err.message().starts_with("invalid type") => format!(
                        " ([[{h}]] makes a list of tables; this section is one table: write [{h}])"
                    ),
                    _ => String::new(),
                };
                problems.push(match top {
                    true => err.message().to_string(),
                    false => format!(
                        "line {line}, column {column} ({shown}): {}{array}",
                        err.message()
                    ),
                });
            }
            if problems.len() > MAX_LISTED {
                return invalid(problems);
            }
            let inline = text.get(span.clone()).is_some_and(|v| v.starts_with('{'));
            if top {
                if missing.as_deref() != Some("node") || placeholder {
                    return invalid(problems);
                }
                // No usable [node]: check the rest against a stand-in.
                placeholder = true;
                text.push_str(PLACEHOLDER_NODE);
                blanked.push((text.len()..text.len(), "node".into()));
            } else if missing.is_some() && header.is_none() && !inline {
                // A key missing from a table written with dotted keys (`node.id = …`
                // above any header): the table is every top-level line of that prefix.
                let path = key_path(&text, lines.start);
                let table = path.split('.').next().unwrap_or_default().to_string();
                let first_header = text
                    .match_indices('\n')
                    .map(|(i, _)| i + 1)
                    .find(|&i| table_header(&text[i..]).is_some())
                    .unwrap_or(text.len());
                let mut next = text.clone();
                let mut at = 0;
                while at < first_header {
                    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
                    if line_key(&text[at..end]).starts_with(&format!("{table}.")) {
                        next.replace_range(at..end, &blank(&text[at..end]));
                    }
                    at = end + 1;
                }
                if table.is_empty() || toml::from_str::<toml::Table>(&next).is_err() {
                    return invalid(problems);
                }
                text = next;
                blanked.push((0..0, table));
            } else {
                let name = match &header {
                    Some(h) => h.clone(),
                    None => key_path(&text, lines.start),
                };
                // A value over several lines is blanked until the rest reads.
                let mut end = lines.end;
                loop {
                    let mut next = text.clone();
                    next.replace_range(lines.start..end, &blank(&text[lines.start..end]));
                    if toml::from_str::<toml::Table>(&next).is_ok() {
                        text = next;
                        break;
                    }
                    let more = end + 1;
                    if more >= text.len() || table_header(&text[more..]).is_some() {
                        return invalid(problems);
                    }
                    end = text[more..].find('\n').map_or(text.len(), |i| more + i);
                }
                blanked.push((lines.start..end, name));
            }
            match toml::from_str::<Config>(&text) {
                Ok(rest) => {
                    // Not the checks that would only see a key or table blanked here
                    // as absent or at its default.
                    problems.extend(rest.problems().into_iter().filter(|p| {
                        !blanked.iter().any(|(_, name)| {
                            let section = name.split('.').next().unwrap_or_default();
                            let last = name.rsplit('.').next().unwrap_or_default();
                            (name.contains('.') && p.contains(name.as_str()))
                                || p.contains(&format!("[{last}]"))
                                || p.starts_with(&format!("{section}."))
                                    && blanked.iter().any(|(_, n)| n == section)
                                || p.contains(&format!("[{section}]"))
                        })
                    }));
                    return invalid(problems);
                }
                Err(e) => err = e,
            }
        }
        invalid(problems)
    }

    /// Everything wrong with the configuration, each naming its key.
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !valid_node_id(&self.node.id) {
            p.push(format!(
                "node.id {:?} must be 1-64 characters of a-z A-Z 0-9 - _ .",
                self.node.id
            ));
        }
        if self.node.store.as_os_str().is_empty() {
            p.push("node.store must name the SQLite file".into());
        }
        if let Some(parent) = &self.parent {
            if !(parent.url.starts_with("http://") || parent.url.starts_with("https://")) {
                p.push(format!(
                    "parent.url {:?} must start with http:// or https://",
                    parent.url
                ));
            } else {
                // Read as the HTTP client will read it: `http://` alone would send to a
                // host named after the request's path (`http:///v1/pull` is host v1).
                match url::Url::parse(&parent.url) {
                    Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => {}
                    Ok(_) => p.push(format!("parent.url {:?} names no host", parent.url)),
                    Err(e) => p.push(format!("parent.url {:?} is not a URL: {e}", parent.url)),
                }
            }
            if parent.token_file.as_os_str().is_empty() {
                p.push("parent.token_file must name the credential file".into());
            }
            let https = parent.url.starts_with("https://");
            if let Some(pins) = &parent.pin_sha256 {
                if pins.parse().is_none() {
                    p.push("parent.pin_sha256 must be a SHA-256 (64 hex digits or 44 characters of base64), or a non-empty list of them".into());
                }
                if !https {
                    p.push("parent.pin_sha256 needs an https:// parent.url".into());
                }
            }
            if parent.ca_file.is_some() && !https {
                p.push("parent.ca_file needs an https:// parent.url".into());
            }
        }
        let s = &self.sync;
        for (name, v) in [
            ("sync.interval_secs", s.interval_secs),
            ("sync.timeout_secs", s.timeout_secs),
            ("sync.backoff_min_secs", s.backoff_min_secs),
            ("sync.push_batch_records", s.push_batch_records as u64),
            ("sync.push_batch_bytes", s.push_batch_bytes as u64),
            ("sync.pull_page_records", s.pull_page_records as u64),
            ("sync.pull_page_bytes", s.pull_page_bytes),
        ] {
            if v == 0 {
                p.push(format!("{name} must be greater than 0"));
            }
        }
        if !s.bulk_window.is_empty() && parse_window(&s.bulk_window).is_none() {
            p.push(format!(
                "sync.bulk_window {:?} must look like \"22:00-06:00\" (UTC)",
                s.bulk_window
            ));
        }
        if let Some(problem) = s.push_level.problem() {
            p.push(problem);
        }
        if s.chunk_bytes > MAX_CHUNK_BYTES {
            p.push(format!(
                "sync.chunk_bytes {} must be at most {MAX_CHUNK_BYTES} (a parent takes no larger request; 0 sends frames whole)",
                s.chunk_bytes
            ));
        }
        if s.backoff_max_secs < s.backoff_min_secs {
            p.push("sync.backoff_max_secs must not be below sync.backoff_min_secs".into());
        }
        if let Some(m) = &self.metrics {
            match m.listen.parse::<SocketAddr>() {
                Err(_) => p.push(format!(
                    "metrics.listen {:?} must be an address such as 127.0.0.1:9464",
                    m.listen
                )),
                Ok(a) if !a.ip().is_loopback() && m.token_sha256.is_none() => p.push(format!(
                    "metrics.listen {} is reachable from other machines: set metrics.token_sha256 (run `clinicsync token new`) or listen on 127.0.0.1",
                    m.listen
                )),
                Ok(_) => {}
            }
            if let Some(t) = &m.token_sha256 {
                if t.len() != 64 || hex::decode(t).is_err() {
                    p.push("metrics.token_sha256 must be 64 hex characters (run `clinicsync token new`)".into());
                }
            }
        }
        if let Some(hub) = &self.hub {
            if hub.listen.parse::<SocketAddr>().is_err() {
                p.push(format!(
                    "hub.listen {:?} must be an address such as 0.0.0.0:7070",
                    hub.listen
                ));
            }
            if hub.max_record_bytes > hub.max_message_bytes {
                p.push("hub.max_record_bytes must not exceed hub.max_message_bytes".into());
            }
            if !(1..=65_536).contains(&hub.max_connections) {
                p.push("hub.max_connections must be between 1 and 65536".into());
            }
            if hub.max_concurrent_requests == Some(0) {
                p.push("hub.max_concurrent_requests must be greater than 0".into());
            }
            for (name, v) in [
                ("hub.header_timeout_secs", hub.header_timeout_secs),
                ("hub.idle_timeout_secs", hub.idle_timeout_secs),
                ("hub.body_timeout_secs", hub.body_timeout_secs),
            ] {
                if v == 0 {
                    p.push(format!("{name} must be greater than 0"));
                }
            }
            for (key, file) in [
                ("hub.tls_cert_file", &hub.tls_cert_file),
                ("hub.tls_key_file", &hub.tls_key_file),
            ] {
                if file.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
                    p.push(format!("{key} must name a file (or be left out)"));
                }
            }
            if hub.tls_cert_file.is_some() != hub.tls_key_file.is_some() {
                p.push(
                    "hub.tls_cert_file and hub.tls_key_file go together: set both or neither"
                        .into(),
                );
            }
            for (i, c) in hub.children.iter().enumerate() {
                if !valid_node_id(&c.node) {
                    p.push(format!(
                        "hub.children[{i}].node {:?} is not a valid node id",
                        c.node
                    ));
                }
                if c.token_sha256.len() != 64 || hex::decode(&c.token_sha256).is_err() {
                    p.push(format!(
                        "hub.children[{i}].token_sha256 must be 64 hex characters (run `clinicsync token new`)"
                    ));
                }
                match (&c.previous_token_sha256, &c.previous_token_expires) {
                    (None, None) => {}
                    (Some(h), Some(t)) => {
                        if h.len() != 64 || hex::decode(h).is_err() {
                            p.push(format!(
                                "hub.children[{i}].previous_token_sha256 must be 64 hex characters"
                            ));
                        }
                        if parse_utc(t).is_none() {
                            p.push(format!(
                                "hub.children[{i}].previous_token_expires {t:?} must be a UTC time such as \"2026-11-25T10:00:00Z\""
                            ));
                        }
                    }
                    _ => p.push(format!(
                        "hub.children[{i}]: previous_token_sha256 and previous_token_expires go together (an overlap must end)"
                    )),
                }
                if hub.children.iter().filter(|o| o.node == c.node).count() > 1 {
                    p.push(format!("hub.children: node {:?} is listed twice", c.node));
                }
                // The hub knows a child by its token alone: a hash two children share
                // lets each sign in as whichever is listed first.
                let hashes = |c: &Child| {
                    std::iter::once(c.token_sha256.to_ascii_lowercase())
                        .chain(
                            c.previous_token_sha256
                                .iter()
                                .map(|h| h.to_ascii_lowercase()),
                        )
                        .collect::<Vec<_>>()
                };
                let mine = hashes(c);
                if let Some(other) = hub.children[..i]
                    .iter()
                    .find(|o| o.node != c.node && hashes(o).iter().any(|h| mine.contains(h)))
                {
                    p.push(format!(
                        "hub.children: {:?} and {:?} have the same token (token_sha256 or previous_token_sha256): each could sign in as the other; give each its own (`clinicsync token new`)",
                        other.node, c.node
                    ));
                }
                for d in &c.descendants {
                    if !valid_node_id(d) {
                        p.push(format!(
                            "hub.children[{i}].descendants: {d:?} is not a valid node id"
                        ));
                    } else if d == &self.node.id || hub.children.iter().any(|o| &o.node == d) {
                        p.push(format!(
                            "hub.children[{i}].descendants: {d:?} is this hub or one of its own children"
                        ));
                    } else if hub
                        .children
                        .iter()
                        .any(|o| o.node != c.node && o.descendants.contains(d))
                    {
                        p.push(format!(
                            "hub.children[{i}].descendants: {d:?} is listed under two children"
                        ));
                    }
                }
            }
            for (i, r) in hub.catchment.iter().enumerate() {
                // A rule for a node that is not (or no longer) a child is inert, not
                // an error: revoking a clinic must not need its rules edited first.
                // `config check` warns about it.
                if r.path.is_empty() || r.path.split('.').any(|s| s.is_empty()) {
                    p.push(format!(
                        "hub.catchment[{i}].path {:?} must be a dotted field path",
                        r.path
                    ));
                }
            }
        }
        if self.transport.kind != TransportKind::Http && self.mqtt.is_none() {
            p.push("transport.kind uses MQTT but there is no [mqtt] section".into());
        }
        if self.transport.kind != TransportKind::Http && self.parent.is_none() {
            p.push(
                "transport.kind applies to the link to a parent, but there is no [parent]".into(),
            );
        }
        if let Some(m) = &self.mqtt {
            if !(m.url.starts_with("mqtt://") || m.url.starts_with("mqtts://")) {
                p.push(format!(
                    "mqtt.url {:?} must start with mqtt:// or mqtts://",
                    m.url
                ));
            }
            if m.url.starts_with("mqtts://") && m.ca_file.is_none() {
                p.push("mqtt.ca_file is needed for mqtts://".into());
            }
            if m.max_message_bytes < 64 << 10 {
                p.push("mqtt.max_message_bytes must be at least 65536".into());
            }
            if m.max_message_bytes <= self.sync.push_batch_bytes
                && self.transport.kind != TransportKind::Http
            {
                p.push("sync.push_batch_bytes must be below mqtt.max_message_bytes".into());
            }
        }
        if self.emr.kind != EmrKind::Embedded {
            let e = &self.emr;
            if !(e.url.starts_with("http://") || e.url.starts_with("https://")) {
                p.push(format!(
                    "emr.url {:?} must start with http:// or https://",
                    e.url
                ));
            }
            if e.kind == EmrKind::Openmrs && e.credentials_file.as_os_str().is_empty() {
                p.push("emr.credentials_file must name a file holding user:password".into());
            }
            if e.kind == EmrKind::Openmrs && e.categories.is_empty() {
                p.push("emr.categories must list at least one atom feed category".into());
            }
            if e.kind == EmrKind::Openmrs {
                for c in &e.categories {
                    if c.is_empty()
                        || !c
                            .chars()
                            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
                    {
                        p.push(format!(
                            "emr.categories: {c:?} is not an atom feed category (letters, digits, _ and - only)"
                        ));
                    }
                }
                for t in &e.sweep_types {
                    if t.starts_with("openmrs:") || crate::model::RecordKey::new(t, "x").is_err() {
                        p.push(format!(
                            "emr.sweep_types: {t:?} is not a FHIR resource type (e.g. \"Condition\")"
                        ));
                    }
                }
                if !e.sweep_types.is_empty() && e.sweep_secs == 0 {
                    p.push("emr.sweep_secs must be greater than 0".into());
                }
                if e.auth_retry_secs == 0 {
                    p.push("emr.auth_retry_secs must be greater than 0 (OpenMRS locks an account that retries too often)".into());
                }
            }
            if e.kind == EmrKind::Fhir && e.types.is_empty() {
                p.push("emr.types must list at least one resource type".into());
            }
            if crate::emr::fhir::CaptureMode::parse(&e.fhir_capture).is_none() {
                p.push(format!(
                    "emr.fhir_capture {:?} must be \"auto\", \"type-history\", \"system-history\" or \"search\"",
                    e.fhir_capture
                ));
            }
            if e.start != "beginning" && e.start != "now" {
                p.push(format!(
                    "emr.start {:?} must be \"beginning\" or \"now\"",
                    e.start
                ));
            }
            if e.timeout_secs == 0 || e.retry_secs == 0 {
                p.push("emr.timeout_secs and emr.retry_secs must be greater than 0".into());
            }
        }
        if self.parent.is_none() && self.hub.is_none() {
            p.push("a node needs a [parent] section, a [hub] section, or both".into());
        }
        p
    }

    /// The EMR adapter, or `None` for the embedded EMR.
    pub fn emr_adapter(&self) -> Result<Option<Box<dyn crate::emr::Emr>>, ConfigError> {
        let e = &self.emr;
        const KEY: &str = "emr.credentials_file";
        let credentials = || -> Result<(String, Secret), ConfigError> {
            crate::filemode::check_credential(&e.credentials_file)
                .map_err(|source| ConfigError::CredentialMode { key: KEY, source })?;
            let text = std::fs::read_to_string(&e.credentials_file).map_err(|source| {
                ConfigError::CredentialRead {
                    key: KEY,
                    path: e.credentials_file.clone(),
                    source,
                }
            })?;
            let (user, pass) =
                text.trim()
                    .split_once(':')
                    .ok_or_else(|| ConfigError::CredentialFormat {
                        key: KEY,
                        path: e.credentials_file.clone(),
                        expected: "user:password",
                    })?;
            Ok((user.to_string(), Secret::new(pass.to_string())))
        };
        let timeout = Duration::from_secs(e.timeout_secs);
        match e.kind {
            EmrKind::Embedded => Ok(None),
            EmrKind::Fhir => {
                let creds = if e.credentials_file.as_os_str().is_empty() {
                    None
                } else {
                    Some(credentials()?)
                };
                let capture =
                    crate::emr::fhir::CaptureMode::parse(&e.fhir_capture).ok_or_else(|| {
                        ConfigError::Setting {
                            key: "emr.fhir_capture",
                            message: format!("{:?} is not known", e.fhir_capture),
                        }
                    })?;
                Ok(Some(Box::new(
                    crate::emr::fhir::FhirServer::new(
                        &e.url,
                        creds,
                        e.types.clone(),
                        e.start == "now",
                        timeout,
                    )
                    .with_capture(capture)
                    .with_since_margin(Duration::from_secs(e.fhir_since_margin_secs)),
                )))
            }
            EmrKind::Openmrs => {
                let (user, pass) = credentials()?;
                let start = if e.start == "now" {
                    crate::emr::openmrs::Start::Now
                } else {
                    crate::emr::openmrs::Start::Beginning
                };
                Ok(Some(Box::new(
                    crate::emr::openmrs::OpenMrs::new(
                        &e.url,
                        &user,
                        &pass,
                        e.categories.clone(),
                        start,
                        timeout,
                    )
                    .with_sweep(
                        e.sweep_types.clone(),
                        Duration::from_secs(e.sweep_secs.max(1)),
                    )
                    .keep_narrative(e.keep_narrative)
                    .auth_retry(Duration::from_secs(e.auth_retry_secs.max(1))),
                )))
            }
        }
    }

    pub fn policy(&self) -> Policy {
        let mut p = Policy::new(&self.node.id, self.parent.is_some());
        p.external_emr = self.emr.kind != EmrKind::Embedded;
        p.serves_children = self.hub.is_some();
        p.emr_retry_ms = self.emr.retry_secs.saturating_mul(1000);
        p.accept_remote_orders = self.node.remote_orders;
        if let Some(hub) = &self.hub {
            p.max_record_bytes = hub.max_record_bytes;
            p.catchment = hub.catchment.clone();
            p.max_clock_ahead_ms = hub.max_clock_ahead_secs.saturating_mul(1000);
            p.descendants = hub
                .children
                .iter()
                .filter(|c| !c.descendants.is_empty())
                .map(|c| (c.node.clone(), c.descendants.clone()))
                .collect();
            if let Some(k) = &hub.known_kinds {
                p.known_kinds = k.clone();
            }
        }
        p
    }

    pub fn role(&self) -> &'static str {
        match (&self.parent, &self.hub) {
            (None, _) => "root hub",
            (Some(_), Some(_)) => "district hub",
            (Some(_), None) => "clinic",
        }
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.node.keys_dir.clone().unwrap_or_else(|| {
            self.node
                .store
                .parent()
                .map(|p| p.join("keys"))
                .unwrap_or_else(|| PathBuf::from("keys"))
        })
    }

    /// Broker settings with the password read from its file.
    pub fn mqtt_settings(&self) -> Result<crate::transport::mqtt::MqttSettings, String> {
        let m = self.mqtt.as_ref().ok_or("no [mqtt] section")?;
        let password = read_token(&m.password_file)
            .map_err(|e| format!("mqtt.password_file {}: {e}", m.password_file.display()))?;
        let user = m.username.clone().unwrap_or_else(|| self.node.id.clone());
        crate::transport::mqtt::MqttSettings::from_url(
            &m.url,
            &user,
            password,
            m.ca_file.as_ref(),
            m.max_message_bytes,
        )
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.sync.timeout_secs)
    }
}

/// `"22:00-06:00"` as minutes of the UTC day (start, end); the window may wrap midnight.
pub fn parse_window(w: &str) -> Option<(u32, u32)> {
    let (a, b) = w.split_once('-')?;
    let minutes = |t: &str| -> Option<u32> {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        // Lazily: `then_some` would compute `h * 60` (and overflow) for any hour given.
        (h < 24 && m < 60).then(|| h * 60 + m)
    };
    Some((minutes(a)?, minutes(b)?))
}

/// Whether `ms` (epoch milliseconds) falls inside the window.
pub fn in_window(window: (u32, u32), ms: u64) -> bool {
    let minute = ((ms / 60_000) % 1440) as u32;
    let (start, end) = window;
    if start <= end {
        (start..end).contains(&minute)
    } else {
        minute >= start || minute < end
    }
}

impl ParentSection {
    /// The client this section describes: its URL, credential file, `ca_file` and
    /// pin. The error names the key to fix.
    pub fn http_client(
        &self,
        timeout: Duration,
    ) -> Result<crate::transport::http::HttpClient, String> {
        let token = crate::auth::read_token(&self.token_file)
            .map_err(|e| format!("parent.token_file {}: {e}", self.token_file.display()))?;
        // A String still: `daemon::connect_parent` takes this error as text (it moves
        // to `client`, where it becomes a typed error).
        let tls = self.tls().map_err(|e| e.to_string())?;
        Ok(crate::transport::http::HttpClient::with_tls(
            &self.url, token, timeout, tls,
        ))
    }

    /// The TLS client config `[parent]` asks for, or `None` for the defaults.
    pub fn tls(&self) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, ConfigError> {
        if self.ca_file.is_none() && self.pin_sha256.is_none() {
            return Ok(None);
        }
        let pins = match &self.pin_sha256 {
            Some(p) => p.parse().ok_or_else(|| ConfigError::Setting {
                key: "parent.pin_sha256",
                message: "must be 64 hex digits or 44 characters of base64 (or a list of them)"
                    .into(),
            })?,
            None => Vec::new(),
        };
        crate::tls::client_config(self.ca_file.as_deref(), &pins)
            .map(Some)
            .map_err(|source| ConfigError::Tls {
                key: "parent.ca_file",
                source,
            })
    }
}

/// `text` as spaces, newlines kept, byte for byte (a character of n bytes becomes n
/// spaces): every later byte offset, line and column stays where it was.
fn blank(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let n = if c == '\n' { 0 } else { c.len_utf8() };
            std::iter::repeat(' ')
                .take(n)
                .chain((c == '\n').then_some('\n'))
        })
        .collect()
}

/// `problems` in their order, each named once (a check that meets the same fault
/// twice, such as a child listed three times, says it once).
fn once_each(mut problems: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    problems.retain(|p| seen.insert(p.clone()));
    problems
}

/// The most problems `config check` lists for one file.
const MAX_LISTED: usize = 20;

/// The table a line opens (`[hub]` → `hub`, `[[hub.children]]` → `hub.children`), or
/// `None` when the line is not a table header.
fn table_header(line: &str) -> Option<String> {
    let line = line.lines().next().unwrap_or_default();
    // A byte order mark (Windows editors write one) is no part of the first line.
    let line = line.trim_start_matches('\u{feff}').trim();
    let inner = line.strip_prefix('[')?;
    let inner = inner.strip_prefix('[').unwrap_or(inner);
    let name = inner.split(']').next()?;
    Some(
        name.split('.')
            .map(|p| p.trim().trim_matches(['"', '\'']))
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// The dotted path of the key on the line starting at byte `start`: the table it
/// is in (the header above it, if any) and the key as written.
fn key_path(text: &str, start: usize) -> String {
    let key = line_key(text[start..].lines().next().unwrap_or_default());
    let table = text[..start].lines().rev().find_map(table_header);
    match table {
        Some(t) => format!("{t}.{key}"),
        None => key,
    }
}

/// The key a `key = value` line sets, dotted, without quotes (`""` for other lines).
fn line_key(line: &str) -> String {
    let line = line.trim_start_matches('\u{feff}');
    let key = line.split_once('=').map_or("", |(k, _)| k.trim());
    key.split('.')
        .map(|p| p.trim().trim_matches(['"', '\'']))
        .collect::<Vec<_>>()
        .join(".")
}

/// The nearest char boundary at or before byte `at` (within `text`).
fn char_floor(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// 1-based line and column (in characters) of byte `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..char_floor(text, at)];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let on_line = before[start..].trim_start_matches('\u{feff}');
    (line, on_line.chars().count() + 1)
}

/// The bytes of the line holding byte `at`, without its newline; when that line is a
/// table header (`[hub]`, `[[hub.children]]`), through the line before the next
/// header, so the table's keys do not fall into the table above.
fn entry_lines(text: &str, at: usize) -> std::ops::Range<usize> {
    let at = char_floor(text, at);
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = |from: usize| text[from..].find('\n').map_or(text.len(), |i| from + i);
    let mut end = line_end(start);
    if table_header(&text[start..end]).is_some() {
        while end < text.len() {
            let next = end + 1;
            let next_end = line_end(next);
            if table_header(&text[next..next_end]).is_some() {
                break;
            }
            end = next_end;
        }
    }
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems_of(text: &str) -> Vec<String> {
        match Config::parse(text, Path::new("c.toml")) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("not a list of problems: {other:?}"),
        }
    }

    #[test]
    fn a_file_that_does_not_deserialize_gets_every_problem_with_its_line() {
        let text = "[bogus]\nx = 1\n[node]\nid = \"c 1\"\nstore = \"c.db\"\nextra = 3\n\
                    [parent]\nurl = 5\ntoken_file = \"t\"\n[sync]\nwindows = [\n  1,\n  \"a\"]\n\
                    pull_page_records = -1\ninterval_secs = 0\n";
        let p = problems_of(text);
        let expected = [
            "line 1, column 2 ([bogus]): unknown field `bogus`",
            "line 6, column 1 (extra = 3): unknown field `extra`",
            "line 8, column 7 (url = 5): invalid type: integer `5`, expected a string",
            "line 11, column 1 (windows = [): unknown field `windows`",
            "line 14, column 21 (pull_page_records = -1): invalid value: integer `-1`",
            "node.id \"c 1\" must be",
            "sync.interval_secs must be greater than 0",
        ];
        assert_eq!(p.len(), expected.len(), "{p:#?}");
        for (got, want) in p.iter().zip(expected) {
            assert!(
                got.starts_with(want),
                "{got:?} does not start with {want:?}"
            );
        }
        // `url` blanked for its wrong value is not named again as missing, and the
        // blanked [parent] does not make "a node needs a [parent] section" appear.
        assert!(!p
            .iter()
            .any(|p| p.contains("missing") || p.contains("needs a [parent]")));
    }

    #[test]
    fn a_chunk_size_no_parent_takes_is_named() {
        let cfg = |chunk: &str| {
            format!("[node]\nid = \"c\"\nstore = \"c.db\"\n[parent]\nurl = \"http://hub\"\ntoken_file = \"t\"\n[sync]\nchunk_bytes = {chunk}\n")
        };
        let p = problems_of(&cfg("99999999999"));
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].starts_with("sync.chunk_bytes 99999999999 must be at most 16777216"),
            "{}",
            p[0]
        );
        for fine in ["0", "65536", "262144", "16777216"] {
            assert!(
                Config::parse(&cfg(fine), Path::new("c.toml")).is_ok(),
                "{fine}"
            );
        }
    }

    #[test]
    fn problems_behind_a_broken_node_or_table_entry_are_still_found_and_echoes_are_not() {
        // No usable [node]: the other sections are checked against a stand-in.
        let p = problems_of(
            "[node]\nstore = \"c.db\"\n[parent]\nurl = \"ftp://hub\"\ntoken_file = \"t\"\n[sync]\npush_level = 25\n",
        );
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(p[0].starts_with("line 1, column 1 ([node]): missing field `id`"));
        assert!(p[1].starts_with("parent.url \"ftp://hub\""), "{}", p[1]);
        assert!(p[2].starts_with("sync.push_level 25"), "{}", p[2]);
        let p = problems_of("[parent]\nurl = \"ftp://hub\"\ntoken_file = \"t\"\n");
        assert_eq!(p[0], "missing field `node`");
        assert_eq!(p.len(), 2, "{p:#?}");
        // A wrong value in one entry of an array of tables does not hide the next
        // entry's missing key, nor is it named again as missing.
        let p = problems_of(
            "[node]\nid = \"h\"\nstore = \"h.db\"\n[hub]\nlisten = \"127.0.0.1:1\"\n\
             [[hub.children]]\nnode = 5\ntoken_sha256 = \"x\"\n[[hub.children]]\ntoken_sha256 = \"y\"\n",
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(p[0].starts_with("line 7, column 8 (node = 5): invalid type"));
        assert!(p[1].starts_with("line 9, column 1 ([[hub.children]]): missing field `node`"));
        // Dotted keys: each wrong value once, and no echo of the keys blanked; a
        // table of dotted keys with a key missing does not hide the next one.
        let p = problems_of(
            "node.id = 1\nnode.store = 5\nparent.url = 5\nparent.token_file = 5\nsync.interval_secs = \"x\"\n",
        );
        assert_eq!(p.len(), 5, "{p:#?}");
        assert!(p.iter().all(|p| p.contains("invalid type")), "{p:#?}");
        let p = problems_of(
            "node.id = \"c\"\nnode.store = 5\nparent.url = \"http://h\"\nparent.token_file = \"t\"\nsync.interval_secs = \"x\"\n",
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(
            p[0].starts_with("line 2, column 14 (node.store = 5)"),
            "{}",
            p[0]
        );
        assert!(
            p[1].starts_with("line 5, column 22 (sync.interval_secs"),
            "{}",
            p[1]
        );
        // A section given as a plain value: named once, and "a node needs a [parent]
        // section" is not added as if it were absent.
        let p = problems_of("parent = \"https://hub\"\n[node]\nid = \"c\"\nstore = \"c.db\"\n");
        assert_eq!(p.len(), 1, "{p:#?}");
    }

    #[test]
    fn urls_tls_files_and_tokens_are_checked_as_the_client_and_the_hub_use_them() {
        // `http://` alone: the client would send to a host named `v1`.
        for (url, why) in [
            ("http://", "is not a URL: empty host"),
            ("http://hub:99999", "is not a URL: invalid port"),
            ("http://a b", "is not a URL"),
        ] {
            let p = problems_of(&format!(
                "[node]\nid = \"c\"\nstore = \"c.db\"\n[parent]\nurl = \"{url}\"\ntoken_file = \"t\"\n"
            ));
            assert!(p.len() == 1 && p[0].contains(why), "{url}: {p:#?}");
        }
        let hub = |rest: &str| {
            problems_of(&format!(
                "[node]\nid = \"h\"\nstore = \"h.db\"\n[hub]\nlisten = \"127.0.0.1:1\"\n{rest}"
            ))
        };
        let p = hub("tls_cert_file = \"\"\ntls_key_file = \"\"\n");
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(p[0].starts_with("hub.tls_cert_file must name a file"));
        // The hub knows a child by its token alone: two children may not share one,
        // current or previous.
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let p = hub(&format!(
            "[[hub.children]]\nnode = \"c1\"\ntoken_sha256 = \"{a}\"\n\
             [[hub.children]]\nnode = \"c2\"\ntoken_sha256 = \"{}\"\n",
            a.to_uppercase()
        ));
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].contains("\"c1\" and \"c2\" have the same token"),
            "{}",
            p[0]
        );
        let p = hub(&format!(
            "[[hub.children]]\nnode = \"c1\"\ntoken_sha256 = \"{a}\"\n\
             [[hub.children]]\nnode = \"c2\"\ntoken_sha256 = \"{b}\"\n\
             previous_token_sha256 = \"{a}\"\nprevious_token_expires = \"2030-01-01T00:00:00Z\"\n"
        ));
        assert!(
            p.iter().any(|p| p.contains("have the same token")),
            "{p:#?}"
        );
        // A fault met more than once is said once.
        let p = hub(&format!(
            "[[hub.children]]\nnode = \"c1\"\ntoken_sha256 = \"{a}\"\n\
             [[hub.children]]\nnode = \"c1\"\ntoken_sha256 = \"{a}\"\n\
             [[hub.children]]\nnode = \"c1\"\ntoken_sha256 = \"{a}\"\n"
        ));
        assert_eq!(p, ["hub.children: node \"c1\" is listed twice"], "{p:#?}");
    }

    #[test]
    fn a_byte_order_mark_an_array_header_and_dotted_tables_are_read_as_written() {
        let p = problems_of(
            "\u{feff}[node]\nid = \"c\"\nstore = 5\n[parent]\nurl = \"ftp://h\"\ntoken_file = \"t\"\n",
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(p[0].starts_with("line 3, column 9 (store = 5)"), "{}", p[0]);
        assert!(p[1].starts_with("parent.url \"ftp://h\""), "{}", p[1]);
        let p = problems_of("\u{feff}bogus = 1\n[node]\nid = \"c\"\nstore = \"s\"\n");
        assert!(p[0].starts_with("line 1, column 1 (bogus = 1)"), "{}", p[0]);
        let p = problems_of("[node]\nid = \"c\"\nstore = \"s\"\n[[sync]]\ninterval_secs = 1\n");
        assert!(
            p[0].contains(
                "[[sync]] makes a list of tables; this section is one table: write [sync]"
            ),
            "{p:#?}"
        );
        // A wrong value in a table of dotted keys hides neither the range checks of
        // the others nor "a node needs [parent] or [hub]" when that is true.
        let p = problems_of("node.id = \"c\"\nnode.store = 5\nsync.push_level = 25\n");
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(p[1].starts_with("sync.push_level 25"), "{}", p[1]);
        assert!(
            p[2].starts_with("a node needs a [parent] section"),
            "{}",
            p[2]
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(600))]
        /// Whatever lines are put into or taken out of a file, reading it names
        /// problems (or accepts it) without a panic, and lists at most 21 lines. The
        /// edits are whole lines, so most files stay TOML and reach the problem finder.
        #[test]
        fn a_mangled_file_never_panics_the_problem_finder(
            edits in proptest::collection::vec((0.0f64..1.0, 0usize..BITS.len(), proptest::bool::ANY), 1..5),
        ) {
            let mut lines: Vec<String> = BASE.lines().map(str::to_string).collect();
            for (at, bit, replace) in edits {
                let i = ((lines.len() as f64) * at) as usize;
                if replace && i < lines.len() {
                    lines[i] = BITS[bit].to_string();
                } else {
                    lines.insert(i.min(lines.len()), BITS[bit].to_string());
                }
            }
            let text = lines.join("\n");
            let r = Config::parse(&text, Path::new("c.toml"));
            if let Err(ConfigError::Invalid { problems, .. }) = r {
                proptest::prop_assert!(!problems.is_empty() && problems.len() <= MAX_LISTED + 1);
            }
        }
    }

    const BASE: &str = "\u{feff}[node]\nid = \"h\"\nstore = \"h.db\"\n\
        [parent]\nurl = \"https://up.example\"\ntoken_file = \"t\"\n\
        sync.interval_secs = 30\n[hub]\nlisten = \"127.0.0.1:1\"\n\
        [[hub.children]]\nnode = \"c1\"\ntoken_sha256 = \"aaaa\"\n\
        [[hub.children]]\nnode = \"c2\"\ntoken_sha256 = \"bbbb\"\ndescendants = [\n  \"x\",\n  \"é\"]\n\
        [[hub.catchment]]\nnode = \"c1\"\npath = \"address.district\"\nequals = \"ø\"\n\
        [mqtt]\nurl = \"mqtt://b\"\nx = { a = 1, b = [2, 3] }\n";

    const BITS: [&str; 22] = [
        "x = 1",
        "id = 7",
        "store = 5",
        "[node]",
        "[[sync]]",
        "[sync]",
        "node.id = 1",
        "node.store = \"s\"",
        "[hub.children]",
        "[[hub.children]]",
        "[bogus]",
        "url = \"http://\"",
        "\u{feff}",
        "é = 1",
        "\"é\" = 1",
        "parent = \"https://h\"",
        "node = { id = 1 }",
        "interval_secs = \"x\"",
        "push_level = 25",
        "token_sha256 = \"aaaa\"",
        "",
        "  \"y\",",
    ];

    #[test]
    fn a_key_missing_from_the_file_is_named_and_the_rest_still_checked() {
        let p = problems_of(
            "[node]\nid = \"c\"\nstore = \"c.db\"\n[parent]\nurl = \"http://x\"\n[sync]\npush_level = \"fast\"\n",
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(p[0].starts_with("line 4, column 1 ([parent]): missing field `token_file`"));
        assert!(p[1].starts_with("sync.push_level \"fast\""), "{}", p[1]);
        // Text that is not TOML keeps the parser's own error, with its snippet.
        assert!(matches!(
            Config::parse("[node\nid = 1", Path::new("c.toml")),
            Err(ConfigError::Parse { .. })
        ));
        // Many bad keys: at most 20 named, and no panic on multi-byte text around them.
        let many: String = (0..50).map(|i| format!("\"k{i}é\" = 1\n")).collect();
        let p = problems_of(&format!("[node]\nid = \"c\"\nstore = \"ç.db\"\n{many}"));
        assert_eq!(p.len(), 21, "{p:#?}");
        assert!(p[20].starts_with("(stopped after 20 problems"), "{}", p[20]);
        assert!(
            p[19].starts_with("line 23, column 1 (\"k19é\" = 1): unknown field `k19é`"),
            "{}",
            p[19]
        );
    }

    #[test]
    fn configuration_errors_are_permanent_and_keep_their_sources() {
        use crate::error::{Classify, ErrorClass};
        use std::error::Error;
        let parse = Config::parse("[node", Path::new("c.toml")).unwrap_err();
        assert!(
            parse.source().is_some_and(|s| s.is::<toml::de::Error>()),
            "{parse}"
        );
        let cases = [
            parse,
            Config::load(Path::new("/nonexistent/c.toml")).unwrap_err(),
            ConfigError::Invalid {
                path: "c.toml".into(),
                problems: vec!["node.id".into()],
            },
            ConfigError::CredentialMode {
                key: "emr.credentials_file",
                source: std::io::ErrorKind::PermissionDenied.into(),
            },
            ConfigError::CredentialRead {
                key: "emr.credentials_file",
                path: "c".into(),
                source: std::io::ErrorKind::NotFound.into(),
            },
            ConfigError::CredentialFormat {
                key: "emr.credentials_file",
                path: "c".into(),
                expected: "user:password",
            },
            ConfigError::Tls {
                key: "parent.ca_file",
                source: crate::tls::TlsError::NoCertificate { path: "ca".into() },
            },
            ConfigError::Setting {
                key: "emr.fhir_capture",
                message: "\"x\" is not known".into(),
            },
        ];
        for e in cases {
            assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
        }
    }

    #[test]
    fn a_bad_ca_file_names_the_key_a_person_fixes() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let p = ParentSection {
            url: "https://hub.example:8443".into(),
            token_file: dir.path().join("token"),
            ca_file: Some(ca),
            pin_sha256: None,
        };
        let err = p.tls().unwrap_err();
        assert!(
            matches!(err, ConfigError::Tls { .. })
                && err.to_string().starts_with("parent.ca_file: "),
            "{err}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
            [node]
            id = "bad id"
            store = "x.db"
            [parent]
            url = "ftp://x"
            token_file = "t"
            [sync]
            interval_secs = 0
            [hub]
            listen = "nowhere"
            [[hub.children]]
            node = "a"
            token_sha256 = "abc"
            [[hub.catchment]]
            node = "b"
            path = "address..district"
            equals = "N"
        "#;
        let err = Config::parse(text, Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        for needle in [
            "node.id",
            "parent.url",
            "sync.interval_secs",
            "hub.listen",
            "hub.children[0].token_sha256",
            "hub.catchment[0].path",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
    }

    #[test]
    fn the_openmrs_keys_default_to_openmrs_defaults_and_are_checked() {
        let text = |extra: &str| {
            format!(
                r#"
            [node]
            id = "a"
            store = "x.db"
            [parent]
            url = "http://hub:7070"
            token_file = "t"
            [emr]
            kind = "openmrs"
            url = "http://emr:8080"
            credentials_file = "c"
            {extra}
        "#
            )
        };
        let cfg = Config::parse(&text(""), Path::new("c.toml")).unwrap();
        assert!(cfg.emr.categories.iter().any(|c| c == "observation"));
        assert!(!cfg
            .emr
            .categories
            .iter()
            .any(|c| c == "obs" || c == "concept"));
        assert_eq!(cfg.emr.sweep_types, vec!["Condition", "MedicationDispense"]);
        assert!(!cfg.emr.keep_narrative);
        let err = Config::parse(
            &text("sweep_types = [\"openmrs:concept\", \"condition\"]\nauth_retry_secs = 0\ncategories = [\"patient/x\"]"),
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        for key in [
            "emr.sweep_types: \"openmrs:concept\"",
            "emr.sweep_types: \"condition\"",
            "emr.auth_retry_secs",
            "emr.categories: \"patient/x\"",
        ] {
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn the_fhir_capture_mode_is_checked() {
        let text = |mode: &str| {
            format!(
                r#"
            [node]
            id = "a"
            store = "x.db"
            [parent]
            url = "http://hub:7070"
            token_file = "t"
            [emr]
            kind = "fhir"
            url = "http://fhir:8080/fhir"
            fhir_capture = "{mode}"
            fhir_since_margin_secs = 60
        "#
            )
        };
        let err = Config::parse(&text("history"), Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("emr.fhir_capture"), "{err}");
        for mode in ["auto", "type-history", "system-history", "search"] {
            let cfg = Config::parse(&text(mode), Path::new("c.toml")).unwrap();
            assert_eq!(cfg.emr.fhir_since_margin_secs, 60);
        }
    }

    #[test]
    fn a_rule_for_a_removed_child_is_inert_not_an_error() {
        // Revoking a clinic = deleting its [[hub.children]] block and reloading;
        // its catchment rules must not make that reload fail.
        let text = r#"
            [node]
            id = "hub"
            store = "x.db"
            [hub]
            listen = "127.0.0.1:7070"
            [[hub.catchment]]
            node = "gone"
            path = "address.district"
            equals = "N"
        "#;
        assert!(Config::parse(text, Path::new("c.toml")).is_ok());
    }

    #[test]
    fn tls_and_connection_limit_keys_are_checked() {
        let text = r#"
            [node]
            id = "a"
            store = "x.db"
            [parent]
            url = "http://hub:7070"
            token_file = "t"
            ca_file = "ca.pem"
            pin_sha256 = "not-a-pin"
            [hub]
            listen = "127.0.0.1:7070"
            max_connections = 0
            header_timeout_secs = 0
            max_concurrent_requests = 0
            tls_cert_file = "hub.crt"
        "#;
        let err = Config::parse(text, Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        for needle in [
            "parent.ca_file needs an https://",
            "parent.pin_sha256 must be a SHA-256",
            "parent.pin_sha256 needs an https://",
            "hub.max_connections",
            "hub.header_timeout_secs",
            "hub.max_concurrent_requests",
            "hub.tls_cert_file and hub.tls_key_file go together",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
        let pin = "A".repeat(43) + "=";
        let ok = format!(
            "[node]\nid = \"a\"\nstore = \"x.db\"\n[parent]\nurl = \"https://hub:7070\"\ntoken_file = \"t\"\npin_sha256 = [\"{pin}\", \"{}\"]\n[hub]\nlisten = \"127.0.0.1:7070\"\n",
            "ab".repeat(32)
        );
        let cfg = Config::parse(&ok, Path::new("c.toml")).unwrap();
        assert_eq!(
            cfg.parent
                .unwrap()
                .pin_sha256
                .unwrap()
                .parse()
                .unwrap()
                .len(),
            2
        );
        let hub = cfg.hub.unwrap();
        assert_eq!(
            (
                hub.max_connections,
                hub.header_timeout_secs,
                hub.idle_timeout_secs,
                hub.body_timeout_secs
            ),
            (512, 10, 30, 120)
        );
        assert!(hub.concurrent_requests() >= 2);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::parse("[node]\nid='a'\nstore='x'\nstor='y'\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("stor"), "{err}");
    }

    #[test]
    fn push_level_is_auto_or_a_level_and_a_bad_one_is_named_with_its_value() {
        use crate::wire::level::PushLevel;
        let base = "[node]\nid='a'\nstore='x'\n[parent]\nurl='http://127.0.0.1:1'\ntoken_file='t'\n[sync]\n";
        let parse =
            |v: &str| Config::parse(&format!("{base}push_level = {v}\n"), Path::new("c.toml"));
        assert_eq!(
            Config::parse(base, Path::new("c.toml"))
                .unwrap()
                .sync
                .push_level
                .level(),
            Some(PushLevel::Auto),
            "absent: auto"
        );
        assert_eq!(
            parse("\"auto\"").unwrap().sync.push_level.level(),
            Some(PushLevel::Auto)
        );
        assert_eq!(
            parse("1").unwrap().sync.push_level.level(),
            Some(PushLevel::Fixed(1))
        );
        assert_eq!(
            parse("19").unwrap().sync.push_level.level(),
            Some(PushLevel::Fixed(19))
        );
        for (bad, shown) in [
            ("0", "sync.push_level 0 "),
            ("20", "sync.push_level 20 "),
            ("-3", "sync.push_level -3 "),
            ("\"fast\"", "sync.push_level \"fast\" "),
            ("15.5", "sync.push_level 15.5 "),
            ("true", "sync.push_level true "),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(shown), "{bad}: {err}");
            assert!(
                err.contains("must be \"auto\" or a zstd level from 1 to 19"),
                "{err}"
            );
        }
    }

    #[test]
    fn bulk_windows_parse_and_wrap_midnight() {
        let w = parse_window("22:00-06:00").unwrap();
        let at = |h: u64, m: u64| (h * 60 + m) * 60_000;
        assert!(in_window(w, at(23, 30)) && in_window(w, at(2, 0)));
        assert!(!in_window(w, at(12, 0)) && !in_window(w, at(6, 0)));
        assert!(parse_window("25:00-01:00").is_none() && parse_window("night").is_none());
    }

    #[test]
    fn a_hub_creates_its_store_with_the_hub_page_size_a_clinic_with_sqlites() {
        let dir = tempfile::tempdir().unwrap();
        let page_of = |section: &str, name: &str| {
            let store = dir.path().join(format!("{name}.db"));
            let text = format!(
                "[node]\nid = '{name}'\nstore = '{}'\n{section}",
                store.display()
            );
            let cfg = Config::parse(&text, Path::new("c.toml")).unwrap();
            let s = cfg.open_store().unwrap();
            s.conn()
                .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
                .unwrap()
        };
        let parent = "[parent]\nurl = 'http://127.0.0.1:1'\ntoken_file = 't'\n";
        let hub = "[hub]\nlisten = '127.0.0.1:1'\n";
        assert_eq!(page_of(parent, "clinic"), 4096);
        assert_eq!(page_of(hub, "hub"), crate::store::HUB_PAGE_SIZE);
        assert_eq!(
            page_of(&format!("{parent}{hub}"), "district"),
            crate::store::HUB_PAGE_SIZE
        );
    }
}
