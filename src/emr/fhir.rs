//! The generic FHIR R4 adapter: any server that speaks FHIR R4 REST, read the way the
//! specification says, not the way one server happens to answer.
//!
//! # Change capture
//!
//! Three ways to learn what changed, chosen per server (`emr.fhir_capture`, default
//! `auto`, which probes on the first run and remembers the answer in the cursor):
//!
//! | way | request | used when |
//! |---|---|---|
//! | type history | `GET [base]/[type]/_history?_since=S&_count=N` per configured type | the server keeps history for the type (preferred: no SearchParameter or other unconfigured versions to page through) |
//! | system history | `GET [base]/_history?_since=S&_count=N` | no type history, but system history |
//! | search | `GET [base]/[type]?_lastUpdated=geS&_sort=_lastUpdated&_count=N` per type | no history for the type (R4 http.html#history: a server that keeps none answers 404) |
//!
//! A history answer must be a Bundle of `type = history`; anything else (some servers
//! route `/_history` to a search and answer an empty searchset) means "no history".
//!
//! **First run.** History may have been trimmed, and the system history of a real
//! server holds thousands of versions of conformance resources before the first
//! clinical one, so records that exist before the first sync are not read from
//! history: the initial load is a search per configured type (`GET [base]/[type]`,
//! all pages), in the configured order of types (list them in dependency order:
//! Patient before Encounter before Observation) and oldest first within a type.
//! With `emr.start = "now"` nothing is loaded and capture starts from the server's
//! clock.
//!
//! **Order.** R4 http.html#history says history is "sorted with oldest versions
//! last"; some servers answer oldest first. The order is read from the entries'
//! `meta.lastUpdated` (or `response.lastModified`) — whichever direction most
//! neighbouring pairs go — and the spec's order is assumed only when that says
//! nothing. [`Emr::changes`] hands keys oldest first.
//!
//! **Paging** (R4 http.html#paging: "The client must use the server supplied links
//! in order to traverse the pages"). `link[relation=next]` is followed verbatim —
//! `_offset`, `_cursor`, `_getpages` and any opaque token alike; nothing is added to
//! it and nothing is taken away. Only its origin is rebased onto the configured base
//! URL when it names another host (a server behind a proxy or in a container names
//! itself): the server's own idea of its base is learnt from the `self` link of the
//! first page, and the part after it is appended to ours. A next link that dropped
//! `_since` (the filter is gone from page two on) costs only bandwidth: entries older
//! than the marker are dropped here, and with newest-first order the walk stops at
//! the first page that is entirely older than the marker. A link already followed,
//! or more than [`MAX_PAGES`] pages, is an error ("paging does not end").
//!
//! Search pages are not kept stable by every server (http.html#paging leaves "how to
//! best ensure that the continuation retains integrity in the context of ongoing
//! changes" to the server): with offset paging, a resource updated during the read
//! moves to the end and shifts another, unchanged one over a page boundary, where it
//! would be lost for good. So a `_lastUpdated` search continues by keyset
//! (`_lastUpdated=ge<newest on the page>`, duplicates dropped by version) as long as
//! the server sorts (its `self` link, which search.html "Server Conformance" says
//! carries the parameters actually used, keeps `_sort=_lastUpdated`, and the page
//! is in order)
//! and that makes progress. A page that is all one instant (a transaction) is asked
//! again with `_count` four times larger (up to 64 times), then the server's next
//! link is followed. A full page with no next link (a server
//! that truncates at `_count` without paging) is continued by keyset too; if that
//! cannot progress, capture stops with an error rather than skip.
//!
//! **Entries of unconfigured types** (SearchParameter, AuditEvent, …) are skipped,
//! but still count for order detection and the early stop, and they never move the
//! marker, so skipping them loses no position.
//!
//! **The `_since` marker.** R4 http.html#history: `_since` includes "resource
//! versions that were created at or after the given instant", "due to timing
//! imprecision, they may receive notifications of a resource update on the boundary
//! instant more than once", and "Servers are not required to support a precision
//! finer than by second". Nor does anything in the spec promise that versions
//! become visible in `lastUpdated` order: a transaction stamped at T may commit after
//! another stamped T+1 was already read. Taking the newest `lastUpdated` seen as the
//! next marker would therefore skip such a version for good. The marker is instead
//! the server's clock at the START of the read — the earliest of the first answer's
//! `Bundle.meta.lastUpdated` and its `Date` header (second precision, and cached by
//! some servers) — minus a safety margin (`emr.fhir_since_margin_secs`, default
//! 300 s), and it never goes back. Any version committed after the read began is
//! stamped at or after that instant unless its transaction ran longer than the
//! margin, so the next read returns it. Versions read in the overlap window come
//! back; the cursor keeps their version tokens (`Type/id/_history/vid`, or the
//! instant when the server gives no version) and they are not handed out twice.
//! Without any server clock the marker falls back to the newest `lastUpdated` seen
//! minus the margin. When a version is read twice anyway (a server without version
//! ids), capture compares content and records nothing new.
//!
//! **Deletes.** History lists them (`request.method = DELETE`); the record then reads
//! 410 Gone, or 404 on servers that keep no tombstones: a 404 for a key that this
//! round's changes listed is reported as gone, since the key came from the server.
//! A `_lastUpdated` search cannot show a deletion at all, so for types read by
//! search the cursor keeps the ids present in the server; each round compares that
//! set (plus what the search returned) with `_summary=count`, and only when the
//! numbers differ lists the type's ids in full and reports the vanished ones. The
//! cost: the cursor holds every id of such types (tens of bytes each).
//!
//! The cursor is JSON: `{"v": 2, "mode": "type-history"|"system-history"|"search",
//! "search_types": [...], "since": "<UTC instant>", "seen": [...], "present": {type:
//! [id…]}, "loaded": [type…]}`; a type added to `emr.types` later is not in `loaded`
//! and gets its initial load (a search, all pages) on its first round. A version-1 cursor (`{"mode", "since"}`) is read as its `since` with the
//! mode probed again. Every failure leaves the stored cursor as it was (capture commits
//! the cursor with the records, and an error commits nothing), so the next round
//! reads the same window again; `status` shows the error as the EMR's last error.
//!
//! # Writes
//!
//! `PUT <base>/<Type>/<id>`; when the record exists, the ETag from a read just before
//! goes along as `If-Match`, so a clinician's edit made in between is not overwritten
//! (the server answers 412, the write is retried next round, and the edit is captured
//! and reconciled by version vectors). Deletes: `DELETE`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{classify, Emr, EmrError, Fetched};
use crate::model::{RecordKey, Snapshot, Version};
use crate::secret::Secret;

/// Pages one read may follow before it is called endless.
pub const MAX_PAGES: usize = 20_000;
const DEFAULT_PAGE_SIZE: usize = 200;
const DEFAULT_MARGIN_MS: u64 = 300_000;

/// How changes are read (`emr.fhir_capture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMode {
    /// Probe on the first run: type history, else system history, else search.
    Auto,
    TypeHistory,
    SystemHistory,
    Search,
}

impl CaptureMode {
    pub fn parse(s: &str) -> Option<CaptureMode> {
        Some(match s {
            "auto" => CaptureMode::Auto,
            "type-history" => CaptureMode::TypeHistory,
            "system-history" => CaptureMode::SystemHistory,
            "search" => CaptureMode::Search,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            CaptureMode::Auto => "auto",
            CaptureMode::TypeHistory => "type-history",
            CaptureMode::SystemHistory => "system-history",
            CaptureMode::Search => "search",
        }
    }
}

pub struct FhirServer {
    agent: ureq::Agent,
    base: String,
    auth: Option<String>,
    types: Vec<String>,
    start_now: bool,
    mode: CaptureMode,
    page_size: usize,
    margin_ms: u64,
    /// Keys handed out by the last `changes`: they came from the server, so a 404
    /// for one of them means it was deleted (servers that keep no tombstones).
    listed: HashSet<RecordKey>,
}

impl std::fmt::Debug for FhirServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FhirServer({})", self.base)
    }
}

/// The stored capture position (see the module header).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Cursor {
    #[serde(default)]
    v: u32,
    #[serde(default)]
    mode: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    search_types: Vec<String>,
    #[serde(default)]
    since: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    seen: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    present: BTreeMap<String, Vec<String>>,
    /// The types whose initial load is done (a type added to `emr.types` later is
    /// loaded in full on its first round).
    #[serde(default)]
    loaded: Vec<String>,
}

/// One entry of a history or search Bundle.
#[derive(Debug, Clone, PartialEq)]
struct Change {
    key: RecordKey,
    /// Identifies the version, to drop it when it is read again.
    token: Option<String>,
    /// `meta.lastUpdated` or `response.lastModified`, epoch ms.
    updated: Option<u64>,
    deleted: bool,
}

/// What one round learnt about the server's clock.
#[derive(Debug, Default)]
struct Clock {
    /// The server's clock at the first answer of the round.
    start: Option<u64>,
    /// The newest `lastUpdated` seen.
    newest: Option<u64>,
}

impl Clock {
    fn answer(&mut self, server_time: Option<u64>) {
        if self.start.is_none() {
            self.start = server_time;
        }
    }
    fn saw(&mut self, updated: Option<u64>) {
        if let Some(u) = updated {
            self.newest = Some(self.newest.map_or(u, |n| n.max(u)));
        }
    }
}

/// Why a read could not be used.
#[derive(Debug)]
enum ReadError {
    /// The server does not offer this interaction (400/404/405/410/422/501, or a
    /// Bundle that is not what was asked for).
    Unsupported(String),
    Emr(EmrError),
}

impl From<EmrError> for ReadError {
    fn from(e: EmrError) -> Self {
        ReadError::Emr(e)
    }
}

fn unsupported(url: &str, e: EmrError) -> ReadError {
    match e {
        EmrError::Refused {
            status: status @ (400 | 404 | 405 | 410 | 422 | 501),
            message,
        } => ReadError::Unsupported(format!("{url}: HTTP {status}: {message}")),
        EmrError::Unavailable(m) if m.contains("HTTP 501") => ReadError::Unsupported(m),
        e => ReadError::Emr(e),
    }
}

/// `2026-11-26T10:00:00.000Z` for epoch milliseconds.
fn instant(ms: u64) -> String {
    let s = crate::time::fmt_time(ms);
    format!("{}.{:03}Z", s.trim_end_matches('Z'), ms % 1000)
}

/// A FHIR `instant` (`YYYY-MM-DDThh:mm:ss[.fff…](Z|±hh:mm)`) as epoch ms, digits
/// beyond the millisecond cut off (never rounded up, so a marker made from it never
/// passes the instant).
fn parse_instant(s: &str) -> Option<u64> {
    let s = s.trim();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| t.parse().ok())
            .flatten()
    };
    if s.len() < 20 || s.as_bytes()[4] != b'-' || s.as_bytes()[10] != b'T' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut millis = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        let ms: String = frac[..digits]
            .chars()
            .chain("000".chars())
            .take(3)
            .collect();
        millis = ms.parse().ok()?;
        rest = &frac[digits..];
    }
    let offset_min = match rest {
        "Z" | "+00:00" | "-00:00" => 0,
        _ if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            sign * (oh * 60 + om)
        }
        _ => return None,
    };
    let secs = crate::time::days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec
        - offset_min * 60;
    u64::try_from(secs * 1000 + millis).ok()
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let after = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after..].find('/') {
        Some(i) => &url[..after + i],
        None => url,
    }
}

fn strip_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// The resource type and id an entry is about.
fn entry_key(e: &Value) -> Option<(String, String)> {
    if let Some(r) = e.get("resource") {
        if let (Some(t), Some(id)) = (
            r.get("resourceType").and_then(Value::as_str),
            r.get("id").and_then(Value::as_str),
        ) {
            return Some((t.to_string(), id.to_string()));
        }
    }
    // A delete carries no resource: its request URL (`Patient/1`, possibly absolute or
    // with `/_history/2`), else the full URL.
    let from_url = |u: &str| -> Option<(String, String)> {
        let path = strip_query(u);
        let path = match path.find("/_history") {
            Some(i) => &path[..i],
            None => path,
        };
        let mut it = path.rsplit('/');
        let id = it.next()?;
        let kind = it.next()?;
        let valid = kind.chars().next().is_some_and(|c| c.is_ascii_uppercase());
        (valid && !id.is_empty()).then(|| (kind.to_string(), id.to_string()))
    };
    e.get("request")
        .and_then(|r| r.get("url"))
        .and_then(Value::as_str)
        .and_then(from_url)
        .or_else(|| e.get("fullUrl").and_then(Value::as_str).and_then(from_url))
}

/// The version id an entry carries: `meta.versionId`, the response ETag (`W/"3"`),
/// or a `_history/<vid>` in its location or request URL.
fn entry_version(e: &Value) -> Option<String> {
    let meta = e
        .get("resource")
        .and_then(|r| r.get("meta"))
        .and_then(|m| m.get("versionId"))
        .and_then(Value::as_str);
    if let Some(v) = meta {
        return Some(v.to_string());
    }
    let response = e.get("response");
    if let Some(tag) = response.and_then(|r| r.get("etag")).and_then(Value::as_str) {
        let t = tag.trim().trim_start_matches("W/").trim_matches('"');
        if !t.is_empty() {
            return Some(t.to_string());
        }
    }
    [
        response.and_then(|r| r.get("location")),
        e.get("request").and_then(|r| r.get("url")),
        e.get("fullUrl"),
    ]
    .into_iter()
    .flatten()
    .filter_map(Value::as_str)
    .find_map(|u| {
        let (_, v) = strip_query(u).split_once("/_history/")?;
        (!v.is_empty()).then(|| v.to_string())
    })
}

fn parse_entry(e: &Value) -> Option<Change> {
    let (kind, id) = entry_key(e)?;
    let key = RecordKey::new(&kind, &id).ok()?;
    let updated_text = e
        .get("resource")
        .and_then(|r| r.get("meta"))
        .and_then(|m| m.get("lastUpdated"))
        .or_else(|| e.get("response").and_then(|r| r.get("lastModified")))
        .and_then(Value::as_str);
    let updated = updated_text.and_then(parse_instant);
    let deleted = e
        .get("request")
        .and_then(|r| r.get("method"))
        .and_then(Value::as_str)
        .is_some_and(|m| m.eq_ignore_ascii_case("DELETE"));
    let token = match (entry_version(e), updated_text) {
        (Some(v), _) => Some(format!("{key}/_history/{v}")),
        (None, Some(u)) => Some(format!("{key}@{u}{}", if deleted { "#d" } else { "" })),
        (None, None) => None,
    };
    Some(Change {
        key,
        token,
        updated,
        deleted,
    })
}

/// True when the entries run newest first: most neighbouring pairs with known
/// instants go down. When the instants say nothing, the spec's order (newest first).
fn newest_first(changes: &[Option<u64>]) -> bool {
    let known: Vec<u64> = changes.iter().flatten().copied().collect();
    let (mut down, mut up) = (0usize, 0usize);
    for w in known.windows(2) {
        if w[0] > w[1] {
            down += 1;
        } else if w[0] < w[1] {
            up += 1;
        }
    }
    up <= down
}

fn next_link(bundle: &Value) -> Option<&str> {
    link(bundle, "next")
}

fn link<'a>(bundle: &'a Value, relation: &str) -> Option<&'a str> {
    bundle
        .get("link")
        .and_then(Value::as_array)?
        .iter()
        .find(|l| l.get("relation").and_then(Value::as_str) == Some(relation))?
        .get("url")
        .and_then(Value::as_str)
}

fn bundle_type(bundle: &Value) -> Option<&str> {
    bundle.get("type").and_then(Value::as_str)
}

/// Entries that are results (search mode `match`, or no mode at all), not
/// `_include`d resources or OperationOutcomes.
fn result_entries(bundle: &Value) -> impl Iterator<Item = &Value> {
    bundle
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| {
            let mode = e
                .get("search")
                .and_then(|s| s.get("mode"))
                .and_then(Value::as_str);
            matches!(mode, None | Some("match"))
        })
}

impl FhirServer {
    pub fn new(
        base: &str,
        credentials: Option<(String, Secret)>,
        types: Vec<String>,
        start_now: bool,
        timeout: Duration,
    ) -> FhirServer {
        FhirServer {
            agent: ureq::AgentBuilder::new()
                .timeout(timeout)
                .timeout_connect(timeout.min(Duration::from_secs(10)))
                .build(),
            base: base.trim_end_matches('/').to_string(),
            auth: credentials.map(|(u, p)| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{}", p.expose()))
                )
            }),
            types,
            start_now,
            mode: CaptureMode::Auto,
            page_size: DEFAULT_PAGE_SIZE,
            margin_ms: DEFAULT_MARGIN_MS,
            listed: HashSet::new(),
        }
    }

    /// How changes are read (default [`CaptureMode::Auto`]).
    pub fn with_capture(mut self, mode: CaptureMode) -> FhirServer {
        self.mode = mode;
        self
    }

    /// The safety margin taken off the server's clock for the next `_since`.
    pub fn with_since_margin(mut self, margin: Duration) -> FhirServer {
        self.margin_ms = margin.as_millis() as u64;
        self
    }

    /// `_count` asked for on every read (default 200).
    pub fn with_page_size(mut self, n: usize) -> FhirServer {
        self.page_size = n.max(1);
        self
    }

    fn req(&self, method: &str, url: &str) -> ureq::Request {
        let r = self
            .agent
            .request(method, url)
            .set("Accept", "application/fhir+json");
        match &self.auth {
            Some(a) => r.set("Authorization", a),
            None => r,
        }
    }

    /// GETs a JSON body, with the server's clock at the answer (the earlier of the
    /// body's `meta.lastUpdated` and the `Date` header).
    fn get_json(&self, url: &str) -> Result<(Value, Option<u64>), EmrError> {
        let resp = self.req("GET", url).call().map_err(|e| classify(url, e))?;
        let date = resp.header("Date").and_then(crate::time::http_date_ms);
        let text = resp
            .into_string()
            .map_err(|e| EmrError::Unavailable(format!("{url}: {e}")))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            EmrError::Unreadable(format!(
                "{url} did not answer JSON ({e}): {:?}",
                text.chars().take(80).collect::<String>()
            ))
        })?;
        // A Bundle's own stamp is the time of the answer (a resource's is when it
        // changed, so it says nothing about now). The earlier of the two is the safe
        // one; a stamp far from the Date header is a cached or made-up one.
        let stamped = (v.get("resourceType").and_then(Value::as_str) == Some("Bundle"))
            .then(|| v.get("meta")?.get("lastUpdated")?.as_str())
            .flatten()
            .and_then(parse_instant);
        let time = match (stamped, date) {
            (Some(a), Some(b)) if a.abs_diff(b) > 600_000 => Some(b),
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok((v, time))
    }

    /// A Bundle, or why not.
    fn get_bundle(&self, url: &str) -> Result<(Value, Option<u64>), ReadError> {
        let (v, t) = self.get_json(url).map_err(|e| unsupported(url, e))?;
        if v.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(ReadError::Emr(EmrError::Unreadable(format!(
                "{url} did not answer a Bundle"
            ))));
        }
        Ok((v, t))
    }

    /// The URL to GET for a server-made link: verbatim when it is under our base;
    /// otherwise its path and query under our base (when the server's own base is
    /// known from its `self` link) or under our origin.
    fn rebase(&self, link: &str, server_base: Option<&str>) -> String {
        let link = link.trim();
        if !link.contains("://") {
            return match link.strip_prefix('/') {
                Some(_) => format!("{}{link}", origin(&self.base)),
                None => format!("{}/{link}", self.base),
            };
        }
        if link.starts_with(&self.base)
            && matches!(
                link.as_bytes().get(self.base.len()),
                None | Some(b'/' | b'?')
            )
        {
            return link.to_string();
        }
        if let Some(sb) = server_base.map(|s| s.trim_end_matches('/')) {
            if let Some(rest) = link.strip_prefix(sb) {
                if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') {
                    return format!("{}{rest}", self.base);
                }
            }
        }
        format!("{}{}", origin(&self.base), &link[origin(link).len()..])
    }

    /// The server's idea of its base URL: its `self` link minus the path we asked for.
    fn server_base(bundle: &Value, asked: &str) -> Option<String> {
        let own = strip_query(link(bundle, "self")?);
        let own = own.trim_end_matches('/');
        let rel = asked.trim_matches('/');
        own.strip_suffix(rel)
            .map(|b| b.trim_end_matches('/').to_string())
            .filter(|b| b.contains("://"))
    }

    /// Reads a history (system or type level) from `since`, all pages; entries of
    /// unconfigured types are dropped after paging; oldest first.
    fn read_history(
        &self,
        rel: &str,
        since: u64,
        clock: &mut Clock,
    ) -> Result<Vec<Change>, ReadError> {
        let first = format!(
            "{}/{rel}?_since={}&_count={}",
            self.base,
            instant(since),
            self.page_size
        );
        let mut url = first.clone();
        let mut server_base = None;
        let mut visited = HashSet::new();
        let mut all: Vec<Change> = Vec::new();
        let mut instants: Vec<Option<u64>> = Vec::new();
        for page in 0.. {
            if page >= MAX_PAGES || !visited.insert(url.clone()) {
                return Err(ReadError::Emr(EmrError::Unreadable(format!(
                    "{first}: paging does not end (page {page}, {url})"
                ))));
            }
            let (bundle, time) = self.get_bundle(&url)?;
            if bundle_type(&bundle) != Some("history") {
                return Err(ReadError::Unsupported(format!(
                    "{url} answered a Bundle of type {:?}, not a history",
                    bundle_type(&bundle).unwrap_or("(none)")
                )));
            }
            clock.answer(time);
            if page == 0 {
                server_base = Self::server_base(&bundle, rel);
            }
            let mut page_instants = Vec::new();
            for e in bundle
                .get("entry")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let updated = e
                    .get("resource")
                    .and_then(|r| r.get("meta"))
                    .and_then(|m| m.get("lastUpdated"))
                    .or_else(|| e.get("response").and_then(|r| r.get("lastModified")))
                    .and_then(Value::as_str)
                    .and_then(parse_instant);
                page_instants.push(updated);
                instants.push(updated);
                if let Some(c) = parse_entry(e) {
                    all.push(c);
                }
            }
            // A next link that lost `_since`: with newest-first order, a page wholly
            // older than the marker means the rest is older still.
            let known: Vec<u64> = page_instants.iter().flatten().copied().collect();
            let wholly_older = !known.is_empty() && known.iter().all(|u| *u < since);
            if wholly_older && newest_first(&instants) {
                break;
            }
            match next_link(&bundle) {
                Some(n) => url = self.rebase(n, server_base.as_deref()),
                None => break,
            }
        }
        if newest_first(&instants) {
            all.reverse();
        }
        Ok(all
            .into_iter()
            .filter(|c| c.updated.map_or(true, |u| u >= since))
            .filter(|c| self.types.contains(&c.key.kind))
            .inspect(|c| clock.saw(c.updated))
            .collect())
    }

    /// Every current resource of `kind` updated at or after `since` (all of them
    /// without), oldest first, continuing by keyset where the server's paging could
    /// skip (see the module header).
    fn read_search(
        &self,
        kind: &str,
        since: Option<u64>,
        clock: &mut Clock,
    ) -> Result<Vec<Change>, ReadError> {
        // Keyset continuation needs the server to sort; a server that refuses `_sort`
        // is read through its next links alone.
        let mut sort = true;
        let query = |from: Option<u64>, sort: bool, count: usize| {
            format!(
                "{}/{kind}?{}{}_count={count}",
                self.base,
                from.map(|s| format!("_lastUpdated=ge{}&", instant(s)))
                    .unwrap_or_default(),
                if sort { "_sort=_lastUpdated&" } else { "" },
            )
        };
        // Grows while a page is all one instant (a transaction's resources share
        // it), so the keyset can step past the tie.
        let mut count = self.page_size;
        let mut query_received = 0usize;
        let first = query(since, sort, count);
        let mut url = first.clone();
        let mut server_base = None;
        let mut visited = HashSet::new();
        let mut tokens = HashSet::new();
        let mut out: Vec<Change> = Vec::new();
        let mut position = since;
        let mut sorted = true;
        for page in 0.. {
            if page >= MAX_PAGES || !visited.insert(url.clone()) {
                return Err(ReadError::Emr(EmrError::Unreadable(format!(
                    "{first}: paging does not end (page {page}, {url})"
                ))));
            }
            let (bundle, time) = match self.get_bundle(&url) {
                Err(ReadError::Unsupported(_)) if page == 0 && sort => {
                    sort = false;
                    url = query(since, sort, count);
                    query_received = 0;
                    visited.clear();
                    continue;
                }
                r => r?,
            };
            if bundle_type(&bundle).is_some_and(|t| t != "searchset") {
                return Err(ReadError::Unsupported(format!(
                    "{url} answered a Bundle of type {:?}, not a searchset",
                    bundle_type(&bundle).unwrap_or("")
                )));
            }
            clock.answer(time);
            if server_base.is_none() {
                server_base = Self::server_base(&bundle, kind);
                // search.html "Server Conformance": the self link SHALL carry the
                // parameters the server actually used; one without `_sort` means it
                // did not sort, and a keyset over unsorted pages would skip.
                if let Some(own) = link(&bundle, "self") {
                    if sort && !own.contains("_sort=_lastUpdated") {
                        sort = false;
                    }
                }
            }
            let entries: Vec<&Value> = result_entries(&bundle).collect();
            let mut newest_on_page: Option<u64> = None;
            let mut previous: Option<u64> = None;
            for e in &entries {
                let Some(c) = parse_entry(e) else { continue };
                if let Some(u) = c.updated {
                    if previous.is_some_and(|p| p > u) {
                        sorted = false;
                    }
                    previous = Some(u);
                    newest_on_page = Some(newest_on_page.map_or(u, |n| n.max(u)));
                }
                let fresh = match &c.token {
                    Some(t) => tokens.insert(t.clone()),
                    None => true,
                };
                if fresh && c.key.kind == kind {
                    clock.saw(c.updated);
                    out.push(c);
                }
            }
            let next = next_link(&bundle);
            let total = bundle.get("total").and_then(Value::as_u64);
            // More to come: the server's total says so, or, without one, the page is
            // as long as asked (a server that caps `_count` lower must send a link).
            // (The total counts the whole query, which next links continue.)
            query_received += entries.len();
            let full = match total {
                Some(t) => t as usize > query_received,
                None => entries.len() >= count.min(self.page_size),
            };
            if next.is_none() && !full {
                break;
            }
            let progress = match (newest_on_page, position) {
                (Some(n), Some(p)) => n > p,
                (Some(_), None) => true,
                _ => false,
            };
            if sort && sorted && progress {
                position = newest_on_page;
                count = self.page_size;
                url = query(position, sort, count);
                query_received = 0;
                continue;
            }
            match next {
                Some(n) => url = self.rebase(n, server_base.as_deref()),
                None if sort && sorted && count < self.page_size * 64 => {
                    count *= 4;
                    url = query(position, sort, count);
                    query_received = 0;
                }
                None => {
                    return Err(ReadError::Emr(EmrError::Unreadable(format!(
                        "{url}: a full page of {} without a next link, and the rest cannot be \
                         reached by _lastUpdated ({}; newest on the page {}); capture cannot go \
                         on without skipping records",
                        entries.len(),
                        if sort && sorted {
                            "the whole page has one lastUpdated"
                        } else {
                            "the server does not sort by _lastUpdated"
                        },
                        newest_on_page.map_or("unknown".to_string(), instant),
                    ))));
                }
            }
        }
        if !(sort && sorted) {
            out.sort_by_key(|c| c.updated);
        }
        // A server comparing at a coarser precision than ours returns a little more.
        out.retain(|c| match (since, c.updated) {
            (Some(s), Some(u)) => u >= s,
            _ => true,
        });
        Ok(out)
    }

    /// The server's clock now, from its capability statement's answer.
    fn server_now(&self) -> Option<u64> {
        self.get_json(&format!("{}/metadata", self.base))
            .ok()
            .and_then(|(_, t)| t)
    }

    /// How many resources of `kind` the server holds now, if it says.
    fn count(&self, kind: &str) -> Result<Option<u64>, EmrError> {
        let url = format!("{}/{kind}?_summary=count", self.base);
        match self.get_json(&url) {
            Ok((v, _)) => Ok(v.get("total").and_then(Value::as_u64)),
            Err(EmrError::Refused { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether `kind` has type-level history here.
    fn has_type_history(&self, kind: &str) -> Result<bool, EmrError> {
        let url = format!("{}/{kind}/_history?_count=1", self.base);
        match self.get_bundle(&url) {
            Ok((b, _)) => Ok(bundle_type(&b) == Some("history")),
            Err(ReadError::Unsupported(_)) => Ok(false),
            Err(ReadError::Emr(e)) => Err(e),
        }
    }

    fn has_system_history(&self) -> Result<bool, EmrError> {
        let url = format!("{}/_history?_count=1", self.base);
        match self.get_bundle(&url) {
            Ok((b, _)) => Ok(bundle_type(&b) == Some("history")),
            Err(ReadError::Unsupported(_)) => Ok(false),
            Err(ReadError::Emr(e)) => Err(e),
        }
    }

    /// The way to read each type: the mode, and the types read by search.
    fn resolve(&self) -> Result<(CaptureMode, Vec<String>), EmrError> {
        match self.mode {
            CaptureMode::Search => Ok((CaptureMode::Search, self.types.clone())),
            CaptureMode::SystemHistory => Ok((CaptureMode::SystemHistory, Vec::new())),
            CaptureMode::TypeHistory => Ok((CaptureMode::TypeHistory, Vec::new())),
            CaptureMode::Auto => {
                let mut search = Vec::new();
                for t in &self.types {
                    if !self.has_type_history(t)? {
                        search.push(t.clone());
                    }
                }
                if search.len() < self.types.len() {
                    return Ok((CaptureMode::TypeHistory, search));
                }
                if self.has_system_history()? {
                    return Ok((CaptureMode::SystemHistory, Vec::new()));
                }
                Ok((CaptureMode::Search, self.types.clone()))
            }
        }
    }

    fn cannot_proceed(&self, what: &str, why: String) -> EmrError {
        EmrError::Unreadable(format!(
            "capture cannot proceed: {what} ({why}); emr.fhir_capture = {:?}",
            self.mode.name()
        ))
    }

    /// A search-read type's deletions: compares the ids known present with the
    /// server's count, and lists the type in full only when they differ.
    fn sweep(
        &self,
        kind: &str,
        present: &mut BTreeSet<String>,
        seen_now: &[Change],
        clock: &mut Clock,
    ) -> Result<Vec<RecordKey>, EmrError> {
        for c in seen_now {
            present.insert(c.key.id.clone());
        }
        if self.count(kind)? == Some(present.len() as u64) {
            return Ok(Vec::new());
        }
        let listed: BTreeSet<String> = match self.read_search(kind, None, clock) {
            Ok(all) => all.into_iter().map(|c| c.key.id).collect(),
            Err(ReadError::Unsupported(m)) => {
                return Err(self.cannot_proceed(&format!("{kind} cannot be listed"), m))
            }
            Err(ReadError::Emr(e)) => return Err(e),
        };
        let changed: Vec<RecordKey> = present
            .symmetric_difference(&listed)
            .filter_map(|id| RecordKey::new(kind, id).ok())
            .collect();
        *present = listed;
        Ok(changed)
    }

    /// The first run: everything present now (or nothing, from "now").
    fn initial(&mut self) -> Result<(Vec<RecordKey>, Cursor), EmrError> {
        let (mode, search_types) = self.resolve()?;
        let mut clock = Clock::default();
        let mut keys = Vec::new();
        let mut seen = Vec::new();
        let mut present = BTreeMap::new();
        for t in &self.types {
            // From "now", only what deletion tracking needs is listed.
            if self.start_now && !search_types.contains(t) {
                continue;
            }
            let all = match self.read_search(t, None, &mut clock) {
                Ok(all) => all,
                Err(ReadError::Unsupported(m)) => {
                    return Err(self.cannot_proceed(&format!("the initial load of {t}"), m))
                }
                Err(ReadError::Emr(e)) => return Err(e),
            };
            if search_types.contains(t) {
                present.insert(t.clone(), all.iter().map(|c| c.key.id.clone()).collect());
            }
            for c in all {
                seen.push(c.clone());
                if !self.start_now {
                    keys.push(c.key);
                }
            }
        }
        let since = match (self.start_now, clock.start.or(clock.newest)) {
            // From "now" means from the server's clock now, with no margin back: what
            // was written before is not this clinic's to capture.
            (true, _) => self.server_now().unwrap_or_else(crate::time::wall_ms),
            (false, Some(start)) => start.saturating_sub(self.margin_ms),
            (false, None) => self
                .server_now()
                .unwrap_or_else(crate::time::wall_ms)
                .saturating_sub(self.margin_ms),
        };
        let cursor = Cursor {
            v: 2,
            mode: mode.name().to_string(),
            search_types,
            since: instant(since),
            seen: tokens_since(&seen, since),
            present,
            loaded: self.types.clone(),
        };
        Ok((keys, cursor))
    }
}

/// Version tokens of the changes at or after `since` (or of unknown time): those a
/// read from `since` returns again.
fn tokens_since(changes: &[Change], since: u64) -> Vec<String> {
    let set: BTreeSet<String> = changes
        .iter()
        .filter(|c| c.updated.map_or(true, |u| u >= since))
        .filter_map(|c| c.token.clone())
        .collect();
    set.into_iter().collect()
}

impl Emr for FhirServer {
    fn changes(&mut self, cursor: Option<&str>) -> Result<(Vec<RecordKey>, String), EmrError> {
        let stored: Option<Cursor> = cursor.and_then(|c| serde_json::from_str(c).ok());
        let Some(mut cur) = stored.filter(|c| parse_instant(&c.since).is_some()) else {
            let (keys, cur) = self.initial()?;
            self.listed = keys.iter().cloned().collect();
            return Ok((keys, serde_json::to_string(&cur).unwrap_or_default()));
        };
        let since = parse_instant(&cur.since).unwrap_or(0);
        let mut mode = CaptureMode::parse(&cur.mode).filter(|m| *m != CaptureMode::Auto);
        if cur.v < 2 || (self.mode != CaptureMode::Auto && mode != Some(self.mode)) {
            mode = None;
        }
        let mode = match mode {
            Some(m) => m,
            None => {
                let (m, search_types) = self.resolve()?;
                cur.search_types = search_types;
                m
            }
        };
        let mut search_types: Vec<String> = match mode {
            CaptureMode::Search => self.types.clone(),
            CaptureMode::SystemHistory => Vec::new(),
            CaptureMode::TypeHistory if self.mode == CaptureMode::TypeHistory => Vec::new(),
            _ => cur
                .search_types
                .iter()
                .filter(|t| self.types.contains(t))
                .cloned()
                .collect(),
        };
        let mut clock = Clock::default();
        let mut found: Vec<Change> = Vec::new();
        let mut extra: Vec<RecordKey> = Vec::new();
        // Types configured since the last round get their initial load now (a
        // version-1 cursor predates the list: its types were read from history).
        let fresh: Vec<String> = if cur.v < 2 {
            Vec::new()
        } else {
            self.types
                .iter()
                .filter(|t| !cur.loaded.contains(t))
                .cloned()
                .collect()
        };
        for t in &fresh {
            if mode == CaptureMode::TypeHistory
                && self.mode == CaptureMode::Auto
                && !self.has_type_history(t)?
                && !search_types.contains(t)
            {
                search_types.push(t.clone());
            }
            let all = match self.read_search(t, None, &mut clock) {
                Ok(all) => all,
                Err(ReadError::Unsupported(m)) => {
                    return Err(self.cannot_proceed(&format!("the initial load of {t}"), m))
                }
                Err(ReadError::Emr(e)) => return Err(e),
            };
            if search_types.contains(t) {
                let ids = all.iter().map(|c| c.key.id.clone()).collect();
                cur.present.insert(t.clone(), ids);
            }
            found.extend(all);
        }
        let history_err = |what: String, m: String| self.cannot_proceed(&what, m);
        match mode {
            CaptureMode::SystemHistory => match self.read_history("_history", since, &mut clock) {
                Ok(v) => found = v,
                Err(ReadError::Unsupported(m)) => {
                    return Err(history_err("the system history is not served".into(), m))
                }
                Err(ReadError::Emr(e)) => return Err(e),
            },
            _ => {
                let read_by_history = self
                    .types
                    .iter()
                    .filter(|t| !search_types.contains(t) && !fresh.contains(t));
                for t in read_by_history {
                    match self.read_history(&format!("{t}/_history"), since, &mut clock) {
                        Ok(v) => found.extend(v),
                        Err(ReadError::Unsupported(m)) => {
                            return Err(history_err(format!("{t}/_history is not served"), m))
                        }
                        Err(ReadError::Emr(e)) => return Err(e),
                    }
                }
            }
        }
        let mut present_next = BTreeMap::new();
        for t in &search_types {
            if fresh.contains(t) {
                if let Some(ids) = cur.present.get(t) {
                    present_next.insert(t.clone(), ids.clone());
                }
                continue;
            }
            let v = match self.read_search(t, Some(since), &mut clock) {
                Ok(v) => v,
                Err(ReadError::Unsupported(m)) => {
                    return Err(self.cannot_proceed(
                        &format!("{t} has no history and cannot be searched by _lastUpdated"),
                        m,
                    ))
                }
                Err(ReadError::Emr(e)) => return Err(e),
            };
            let mut present: BTreeSet<String> = match cur.present.get(t) {
                Some(ids) => ids.iter().cloned().collect(),
                // No record of what is present (an older cursor): learn it now, and
                // report nothing as vanished.
                None => match self.read_search(t, None, &mut clock) {
                    Ok(all) => all.into_iter().map(|c| c.key.id).collect(),
                    Err(ReadError::Unsupported(m)) => {
                        return Err(self.cannot_proceed(&format!("{t} cannot be listed"), m))
                    }
                    Err(ReadError::Emr(e)) => return Err(e),
                },
            };
            extra.extend(self.sweep(t, &mut present, &v, &mut clock)?);
            present_next.insert(t.clone(), present.into_iter().collect::<Vec<_>>());
            found.extend(v);
        }
        if mode != CaptureMode::SystemHistory && found.iter().any(|c| c.updated.is_some()) {
            // Several reads: oldest first across them (stable, so ties keep read order).
            found.sort_by_key(|c| c.updated.unwrap_or(u64::MAX));
        }

        // The next marker: the server's clock when this read began, less the margin;
        // never backwards.
        let anchor = clock.start.or(clock.newest);
        let next_since = anchor
            .map(|a| a.saturating_sub(self.margin_ms))
            .unwrap_or(since)
            .max(since);
        let old_seen: HashSet<&String> = cur.seen.iter().collect();
        let mut keys: Vec<RecordKey> = Vec::new();
        let mut handed: HashSet<RecordKey> = HashSet::new();
        for c in &found {
            if c.token.as_ref().is_some_and(|t| old_seen.contains(t)) {
                continue;
            }
            if handed.insert(c.key.clone()) {
                keys.push(c.key.clone());
            }
        }
        for k in extra {
            if handed.insert(k.clone()) {
                keys.push(k);
            }
        }
        let next = Cursor {
            v: 2,
            mode: mode.name().to_string(),
            search_types: if mode == CaptureMode::TypeHistory {
                search_types
            } else {
                Vec::new()
            },
            since: instant(next_since),
            seen: tokens_since(&found, next_since),
            present: present_next,
            loaded: self.types.clone(),
        };
        self.listed = handed;
        Ok((keys, serde_json::to_string(&next).unwrap_or_default()))
    }

    fn fetch(&mut self, key: &RecordKey) -> Result<Option<Fetched>, EmrError> {
        let url = format!("{}/{}/{}", self.base, key.kind, key.id);
        match self.req("GET", &url).call() {
            Ok(resp) => {
                let text = resp
                    .into_string()
                    .map_err(|e| EmrError::Unavailable(format!("{url}: {e}")))?;
                let snap = Snapshot::from_json_bytes(text.as_bytes())
                    .map_err(|e| EmrError::Unreadable(format!("{url}: {e}")))?;
                Ok(Some(Fetched::Present(snap)))
            }
            Err(ureq::Error::Status(410, _)) => Ok(Some(Fetched::Gone)),
            // The key came from this server's own history or listing: it was there.
            Err(ureq::Error::Status(404, _)) if self.listed.contains(key) => {
                Ok(Some(Fetched::Gone))
            }
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(classify(&url, e)),
        }
    }

    fn apply(&mut self, v: &Version) -> Result<Fetched, EmrError> {
        let key = v.key();
        let url = format!("{}/{}/{}", self.base, key.kind, key.id);
        if v.deleted {
            return match self.req("DELETE", &url).call() {
                Ok(_) | Err(ureq::Error::Status(404 | 410, _)) => Ok(Fetched::Gone),
                Err(e) => Err(classify(&url, e)),
            };
        }
        // The ETag of what is there now, if anything: the write must replace exactly that.
        let etag = match self.req("GET", &url).call() {
            Ok(r) => r.header("ETag").map(str::to_string),
            Err(ureq::Error::Status(404 | 410, _)) => None,
            Err(e) => return Err(classify(&url, e)),
        };
        let mut put = self
            .req("PUT", &url)
            .set("Content-Type", "application/fhir+json");
        if let Some(tag) = &etag {
            put = put.set("If-Match", tag);
        }
        match put.send_string(&v.snapshot.json().to_string()) {
            Ok(resp) => {
                let text = resp.into_string().unwrap_or_default();
                match Snapshot::from_json_bytes(text.as_bytes()) {
                    Ok(s) => Ok(Fetched::Present(s)),
                    // Servers may answer with no body: read it back.
                    Err(_) => self.fetch(key)?.ok_or_else(|| {
                        EmrError::Unreadable(format!("{key} was written but cannot be read back"))
                    }),
                }
            }
            Err(ureq::Error::Status(412, _)) => Err(EmrError::Unavailable(format!(
                "{url}: changed in the EMR while we wrote it (412); retried after capture"
            ))),
            Err(e) => Err(classify(&url, e)),
        }
    }

    fn probe(&mut self) -> Result<String, EmrError> {
        let url = format!("{}/metadata", self.base);
        let (v, _) = self.get_json(&url)?;
        let software = v
            .get("software")
            .and_then(|s| s.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("a FHIR server")
            .to_string();
        let (mode, search) = self.resolve()?;
        let how = match mode {
            CaptureMode::SystemHistory => "capture by system _history".to_string(),
            CaptureMode::Search => "no history: capture by _lastUpdated search".to_string(),
            _ if search.is_empty() => "capture by type _history".to_string(),
            _ => format!(
                "capture by type _history, by _lastUpdated search for {}",
                search.join(", ")
            ),
        };
        Ok(format!("{} answers ({software}); {how}", self.base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn server(base: &str) -> FhirServer {
        FhirServer::new(
            base,
            None,
            vec!["Patient".into(), "Encounter".into()],
            false,
            Duration::from_secs(1),
        )
    }

    #[test]
    fn instants_are_utc_with_z_and_milliseconds() {
        assert_eq!(instant(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
    }

    #[test]
    fn instants_parse_with_any_offset_and_precision() {
        let ms = 1_795_000_000_123;
        assert_eq!(parse_instant("2026-11-18T11:06:40.123Z"), Some(ms));
        assert_eq!(parse_instant("2026-11-18T11:06:40.123456Z"), Some(ms));
        assert_eq!(parse_instant("2026-11-18T13:06:40.123+02:00"), Some(ms));
        assert_eq!(parse_instant("2026-11-18T06:06:40.123-05:00"), Some(ms));
        assert_eq!(parse_instant("2026-11-18T11:06:40Z"), Some(ms - 123));
        assert_eq!(parse_instant("2026-11-18"), None);
        assert_eq!(parse_instant("2026-11-18T11:06:40"), None);
        for ms in [0, 951_782_400_000, 1_795_000_000_123, 4_102_444_799_999] {
            assert_eq!(parse_instant(&instant(ms)), Some(ms));
        }
    }

    #[test]
    fn http_dates_parse() {
        assert_eq!(
            crate::time::http_date_ms("Wed, 18 Nov 2026 11:06:40 GMT"),
            Some(1_795_000_000_000)
        );
        assert_eq!(
            crate::time::http_date_ms("Wed, 18 Nov 2026 11:06:40 UTC"),
            None
        );
    }

    #[test]
    fn next_links_are_followed_verbatim_under_our_base() {
        let f = server("http://127.0.0.1:18090/fhir");
        let link = "http://127.0.0.1:18090/fhir/_history?_cursor=abc%3D&_count=2";
        assert_eq!(f.rebase(link, None), link);
        assert_eq!(
            f.rebase("_history?_cursor=x", None),
            "http://127.0.0.1:18090/fhir/_history?_cursor=x"
        );
        assert_eq!(
            f.rebase("/fhir?_getpages=x", None),
            "http://127.0.0.1:18090/fhir?_getpages=x"
        );
    }

    #[test]
    fn next_links_naming_another_host_are_rebased_onto_our_base() {
        let f = server("http://127.0.0.1:18090/fhir");
        // Same path, another host (a container naming itself): origin swapped.
        assert_eq!(
            f.rebase(
                "http://localhost:8090/fhir/_history?_count=2&_offset=2",
                None
            ),
            "http://127.0.0.1:18090/fhir/_history?_count=2&_offset=2"
        );
        // Another base path behind a proxy: learnt from the self link.
        let bundle = json!({"link": [{"relation": "self",
            "url": "https://proxy.example/baseR4/Patient/_history?_since=x"}]});
        let sb = FhirServer::server_base(&bundle, "Patient/_history");
        assert_eq!(sb.as_deref(), Some("https://proxy.example/baseR4"));
        assert_eq!(
            f.rebase(
                "https://proxy.example/baseR4?_getpages=u1&_getpagesoffset=50",
                sb.as_deref()
            ),
            "http://127.0.0.1:18090/fhir?_getpages=u1&_getpagesoffset=50"
        );
    }

    #[test]
    fn entries_give_key_version_time_and_deletion() {
        let put = json!({"resource": {"resourceType": "Patient", "id": "p1",
            "meta": {"versionId": "3", "lastUpdated": "2026-11-18T11:06:40.123Z"}},
            "request": {"method": "PUT", "url": "Patient/p1"}});
        let c = parse_entry(&put).unwrap();
        assert_eq!(c.key.to_string(), "Patient/p1");
        assert_eq!(c.token.as_deref(), Some("Patient/p1/_history/3"));
        assert_eq!(c.updated, Some(1_795_000_000_123));
        assert!(!c.deleted);
        let del = json!({"fullUrl": "http://x/fhir/Patient/p1",
            "request": {"method": "DELETE", "url": "Patient/p1"},
            "response": {"status": "204", "etag": "W/\"4\"",
                "lastModified": "2026-11-18T11:06:41.000Z"}});
        let c = parse_entry(&del).unwrap();
        assert_eq!(c.key.to_string(), "Patient/p1");
        assert_eq!(c.token.as_deref(), Some("Patient/p1/_history/4"));
        assert!(c.deleted);
        let bare = json!({"request": {"method": "DELETE",
            "url": "http://x/fhir/Encounter/e9/_history/7"}});
        let c = parse_entry(&bare).unwrap();
        assert_eq!(c.key.to_string(), "Encounter/e9");
        assert_eq!(c.token.as_deref(), Some("Encounter/e9/_history/7"));
    }

    #[test]
    fn order_is_read_from_the_instants_and_defaults_to_the_specs() {
        assert!(newest_first(&[Some(5), Some(4), None, Some(1)]));
        assert!(!newest_first(&[Some(1), Some(2), Some(2), Some(9)]));
        assert!(newest_first(&[None, None]));
        assert!(newest_first(&[Some(3)]));
    }

    #[test]
    fn a_version_one_cursor_keeps_its_marker() {
        let c: Cursor =
            serde_json::from_str(r#"{"mode":"history","since":"2026-01-01T00:00:00.000Z"}"#)
                .unwrap();
        assert_eq!(c.v, 0);
        assert_eq!(parse_instant(&c.since), Some(1_767_225_600_000));
        assert!(c.present.is_empty());
    }

    #[test]
    fn capture_modes_parse() {
        for m in ["auto", "type-history", "system-history", "search"] {
            assert_eq!(CaptureMode::parse(m).unwrap().name(), m);
        }
        assert!(CaptureMode::parse("history").is_none());
    }
}
