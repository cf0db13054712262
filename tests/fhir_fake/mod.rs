//! A FHIR R4 server shaped by the specification's words, for the orders and paging
//! styles that neither real test server (sekmet-fhir, Medplum) uses. Test kit, not
//! product: one thread per connection, `Connection: close`, everything in memory.
//!
//! What it follows, section by section of the R4 specification:
//! - http.html#history: `GET [base]/_history`, `[base]/[type]/_history`; a Bundle of
//!   `type = history` "sorted with oldest versions last" ([`Order::NewestFirst`]) —
//!   or oldest first, as some servers do ([`Order::OldestFirst`]); deletes included
//!   as entries with `request.method = DELETE` and no resource; `_since` includes
//!   versions "created at or after the given instant"; `_count` is a maximum ("The
//!   server is not bound to return the number requested, but cannot return more":
//!   [`Shape::max_count`] caps it). History not kept for a type answers 404 with an
//!   OperationOutcome ("If a request is made for a history that is not available
//!   … the server should return a 404 Not Found").
//! - http.html#paging: `link[relation=next]` continuation links whose structure is
//!   the server's business ("A server MAY add additional state tracking parameters
//!   to the links"): opaque `_cursor` tokens, `_offset` (optionally losing `_since`,
//!   as sekmet does), or HAPI-style `_getpages` snapshots at the base URL; the links
//!   may name another host ([`Shape::link_base`], a server behind a proxy).
//! - search.html (the _lastUpdated, _sort, _count and _summary parameters, and
//!   "Server Conformance": the self link carries the parameters actually used):
//!   `_lastUpdated=ge…`, `_sort=_lastUpdated`, `_count`, `_summary=count`; a
//!   searchset of current,
//!   non-deleted resources; [`SearchPaging::NoLinks`] truncates at `_count` with no
//!   next link (as Medplum's in-memory repository does).
//! - http.html#read, #update, #delete, #versioning: 410 Gone for a deleted resource
//!   (or 404 when [`Shape::tombstones`] is off: "servers may choose to not remember
//!   deletions"), `ETag: W/"<vid>"`, `If-Match` → 412 on a mismatch.
//!
//! Versions carry `meta.lastUpdated` from the wall clock, strictly increasing, unless
//! a test writes one back-dated ([`Db::write_at`]): a transaction stamped before
//! others but committed after them. History lists versions in commit order.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Order {
    NewestFirst,
    OldestFirst,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HistoryPaging {
    /// `?_cursor=<opaque>`: keyset on commit order, fixed at the first page.
    Cursor,
    /// `?_since=…&_count=…&_offset=k`, over the list as it is when each page is asked.
    Offset { keeps_since: bool },
    /// `[base]?_getpages=<id>&_getpagesoffset=k`: a snapshot taken at the first page.
    GetPages,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SearchPaging {
    Offset,
    /// Truncates at `_count` and gives no next link.
    NoLinks,
}

#[derive(Clone, Debug)]
pub struct Shape {
    pub order: Order,
    pub history_paging: HistoryPaging,
    pub search_paging: SearchPaging,
    pub max_count: usize,
    pub type_history: bool,
    pub system_history: bool,
    /// `_lastUpdated` and `_sort=_lastUpdated` understood in searches.
    pub search_by_last_updated: bool,
    /// Accepts `_sort=_lastUpdated` but answers in id order (and says so by leaving
    /// `_sort` out of its self link).
    pub ignores_sort: bool,
    pub tombstones: bool,
    /// What the server calls its own base in links; `None`: the address it serves.
    pub link_base: Option<String>,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            order: Order::NewestFirst,
            history_paging: HistoryPaging::Cursor,
            search_paging: SearchPaging::Offset,
            max_count: 5,
            type_history: true,
            system_history: true,
            search_by_last_updated: true,
            ignores_sort: false,
            tombstones: true,
            link_base: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Ver {
    pub seq: u64,
    pub kind: String,
    pub id: String,
    pub vid: u64,
    pub updated: u64,
    pub deleted: bool,
    pub body: Value,
}

#[derive(Default)]
pub struct Db {
    pub versions: Vec<Ver>,
    last_ms: u64,
}

fn now_ms() -> u64 {
    clinicsync::time::wall_ms()
}

fn instant(ms: u64) -> String {
    let s = clinicsync::time::fmt_time(ms);
    format!("{}.{:03}Z", s.trim_end_matches('Z'), ms % 1000)
}

fn http_date(ms: u64) -> String {
    let s = clinicsync::time::fmt_time(ms); // 2026-11-18T11:06:40Z
    let (y, mo, d) = (&s[0..4], &s[5..7], &s[8..10]);
    let days = ms / 86_400_000;
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][mo.parse::<usize>().unwrap() - 1];
    format!("{wd}, {d} {mon} {y} {} GMT", &s[11..19])
}

/// Epoch ms of a `YYYY-MM-DDThh:mm:ss.fffZ` instant (the form the adapter sends).
fn parse_instant(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, sec) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    let ms = if b.get(19) == Some(&b'.') {
        n(20..23)?
    } else {
        0
    };
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * ((mo + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + sec) * 1000 + ms) as u64)
}

impl Db {
    fn stamp(&mut self) -> u64 {
        let t = now_ms().max(self.last_ms + 1);
        self.last_ms = t;
        t
    }

    pub fn current(&self, kind: &str, id: &str) -> Option<&Ver> {
        self.versions
            .iter()
            .rev()
            .find(|v| v.kind == kind && v.id == id)
    }

    /// A new version (a create, an update, or a delete when `body` is `None`),
    /// stamped now.
    pub fn write(&mut self, kind: &str, id: &str, body: Option<Value>) -> Ver {
        let t = self.stamp();
        self.write_at(kind, id, body, t)
    }

    /// A new version stamped `updated`, committed now (after everything before).
    pub fn write_at(&mut self, kind: &str, id: &str, body: Option<Value>, updated: u64) -> Ver {
        let vid = self.current(kind, id).map_or(1, |v| v.vid + 1);
        let deleted = body.is_none();
        let mut body = body.unwrap_or(Value::Null);
        if !deleted {
            body["id"] = json!(id);
            body["meta"] = json!({"versionId": vid.to_string(), "lastUpdated": instant(updated)});
        }
        let v = Ver {
            seq: self.versions.len() as u64 + 1,
            kind: kind.to_string(),
            id: id.to_string(),
            vid,
            updated,
            deleted,
            body,
        };
        self.versions.push(v.clone());
        v
    }
}

/// Called after every Bundle page the server sends, with the page's number within
/// its read (0 for the first): a test writes "during a paged read" here.
pub type Hook = Box<dyn FnMut(&mut Db, usize) + Send>;

struct Inner {
    db: Db,
    shape: Shape,
    /// Opaque continuation state: (the read's versions in order, for snapshots) or
    /// (filter, boundary seq) for cursors.
    snapshots: HashMap<String, Vec<Ver>>,
    cursors: HashMap<String, (Option<String>, u64, u64)>,
    hook: Option<Hook>,
    /// Every request line served, for the tests' assertions.
    log: Vec<String>,
    next_token: u64,
}

pub struct FakeFhir {
    pub base: String,
    inner: Arc<Mutex<Inner>>,
    stop: Arc<AtomicBool>,
    port: u16,
}

impl FakeFhir {
    pub fn start(shape: Shape) -> FakeFhir {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let base = format!("http://127.0.0.1:{port}/fhir");
        let inner = Arc::new(Mutex::new(Inner {
            db: Db::default(),
            shape,
            snapshots: HashMap::new(),
            cursors: HashMap::new(),
            hook: None,
            log: Vec::new(),
            next_token: 1,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (i2, s2, b2) = (inner.clone(), stop.clone(), base.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (i3, b3) = (i2.clone(), b2.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &i3, &b3);
                });
            }
        });
        FakeFhir {
            base,
            inner,
            stop,
            port,
        }
    }

    pub fn set_hook(&self, hook: Hook) {
        self.inner.lock().unwrap().hook = Some(hook);
    }

    pub fn with_db<T>(&self, f: impl FnOnce(&mut Db) -> T) -> T {
        f(&mut self.inner.lock().unwrap().db)
    }

    pub fn log(&self) -> Vec<String> {
        self.inner.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.inner.lock().unwrap().log.clear();
    }
}

impl Drop for FakeFhir {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?');
                out.push(h);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_request(conn: &mut TcpStream) -> Option<Request> {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut r = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Some(Request {
        method,
        path: percent_decode(path),
        query,
        headers,
        body,
    })
}

struct Answer {
    status: u16,
    body: Value,
    etag: Option<String>,
}

fn outcome(status: u16, text: &str) -> Answer {
    Answer {
        status,
        body: json!({"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "processing", "diagnostics": text}]}),
        etag: None,
    }
}

fn serve(mut conn: TcpStream, inner: &Arc<Mutex<Inner>>, base: &str) -> std::io::Result<()> {
    let Some(req) = read_request(&mut conn) else {
        return Ok(());
    };
    let answer = {
        let mut g = inner.lock().unwrap();
        let q: Vec<String> = req.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        g.log
            .push(format!("{} {}?{}", req.method, req.path, q.join("&")));
        handle(&mut g, &req, base)
    };
    let text = answer.body.to_string();
    let reason = match answer.status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        410 => "Gone",
        412 => "Precondition Failed",
        _ => "Other",
    };
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/fhir+json\r\nDate: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        answer.status,
        http_date(now_ms()),
        text.len()
    );
    if let Some(tag) = &answer.etag {
        head.push_str(&format!("ETag: {tag}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(text.as_bytes())?;
    conn.flush()
}

fn param<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn handle(g: &mut Inner, req: &Request, base: &str) -> Answer {
    let Some(rest) = req.path.strip_prefix("/fhir") else {
        return outcome(404, "not a FHIR endpoint");
    };
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let link_base = g
        .shape
        .link_base
        .clone()
        .unwrap_or_else(|| base.to_string());
    match (req.method.as_str(), segs.as_slice()) {
        ("GET", ["metadata"]) => Answer {
            status: 200,
            body: json!({"resourceType": "CapabilityStatement", "status": "active",
                "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"],
                "software": {"name": "clinicsync spec-shaped fake"}}),
            etag: None,
        },
        ("GET", []) if param(req, "_getpages").is_some() => getpages(g, req, &link_base),
        ("GET", ["_history"]) => {
            if !g.shape.system_history {
                return outcome(404, "this server keeps no system history");
            }
            history(g, req, None, &link_base)
        }
        ("GET", [kind, "_history"]) => {
            if !g.shape.type_history {
                return outcome(404, &format!("this server keeps no history for {kind}"));
            }
            history(g, req, Some(kind.to_string()), &link_base)
        }
        ("GET", [kind]) => search(g, req, kind, &link_base),
        ("GET", [kind, id]) => match g.db.current(kind, id) {
            None => outcome(404, &format!("{kind}/{id} is not known")),
            Some(v) if v.deleted && g.shape.tombstones => {
                outcome(410, &format!("{kind}/{id} was deleted"))
            }
            Some(v) if v.deleted => outcome(404, &format!("{kind}/{id} is not known")),
            Some(v) => Answer {
                status: 200,
                body: v.body.clone(),
                etag: Some(format!("W/\"{}\"", v.vid)),
            },
        },
        ("PUT", [kind, id]) => {
            let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
                return outcome(400, "not JSON");
            };
            if let Some(m) = req.headers.get("if-match") {
                let now = g.db.current(kind, id).filter(|v| !v.deleted);
                if now.map(|v| format!("W/\"{}\"", v.vid)).as_deref() != Some(m.as_str()) {
                    return outcome(412, "version conflict");
                }
            }
            let existed = g.db.current(kind, id).is_some_and(|v| !v.deleted);
            let v = g.db.write(kind, id, Some(body));
            Answer {
                status: if existed { 200 } else { 201 },
                body: v.body,
                etag: Some(format!("W/\"{}\"", v.vid)),
            }
        }
        ("DELETE", [kind, id]) => {
            if g.db.current(kind, id).is_some_and(|v| !v.deleted) {
                g.db.write(kind, id, None);
            }
            Answer {
                status: 204,
                body: Value::Null,
                etag: None,
            }
        }
        _ => outcome(400, "not supported here"),
    }
}

fn entry(v: &Ver, base: &str) -> Value {
    let url = format!("{}/{}", v.kind, v.id);
    let mut e = json!({
        "fullUrl": format!("{base}/{url}"),
        "request": {"method": if v.deleted { "DELETE" } else if v.vid == 1 { "POST" } else { "PUT" },
                    "url": if v.deleted || v.vid > 1 { url.clone() } else { v.kind.clone() }},
        "response": {"status": if v.deleted { "204" } else { "200" },
                     "etag": format!("W/\"{}\"", v.vid),
                     "lastModified": instant(v.updated)},
    });
    if !v.deleted {
        e["resource"] = v.body.clone();
    }
    e
}

fn bundle(kind: &str, self_url: String, next: Option<String>, entries: Vec<Value>) -> Value {
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if let Some(n) = next {
        links.push(json!({"relation": "next", "url": n}));
    }
    json!({"resourceType": "Bundle", "type": kind, "meta": {"lastUpdated": instant(now_ms())},
           "link": links, "entry": entries})
}

fn count(req: &Request, shape: &Shape) -> usize {
    param(req, "_count")
        .and_then(|c| c.parse().ok())
        .unwrap_or(shape.max_count)
        .min(shape.max_count)
        .max(1)
}

fn after_page(g: &mut Inner, page: usize) {
    if let Some(mut hook) = g.hook.take() {
        hook(&mut g.db, page);
        g.hook = Some(hook);
    }
}

/// The versions a history read lists, in the server's order.
fn history_list(g: &Inner, kind: Option<&str>, since: Option<u64>) -> Vec<Ver> {
    let mut list: Vec<Ver> =
        g.db.versions
            .iter()
            .filter(|v| kind.map_or(true, |k| v.kind == k))
            .filter(|v| since.map_or(true, |s| v.updated >= s))
            .cloned()
            .collect();
    if g.shape.order == Order::NewestFirst {
        list.reverse();
    }
    list
}

fn history(g: &mut Inner, req: &Request, kind: Option<String>, link_base: &str) -> Answer {
    let n = count(req, &g.shape);
    let path = match &kind {
        Some(k) => format!("{k}/_history"),
        None => "_history".to_string(),
    };
    let self_url = format!("{link_base}/{path}");
    let since = param(req, "_since").and_then(parse_instant);
    let (page_no, entries, next) = match g.shape.history_paging {
        HistoryPaging::Cursor => {
            // (filter, since, boundary seq): the first page fixes the boundary, so
            // versions committed later belong to the next read.
            let (filter, since, boundary, page_no) = match param(req, "_cursor") {
                Some(tok) => match g.cursors.get(tok) {
                    Some((f, s, b)) => (f.clone(), Some(*s), *b, 1),
                    None => return outcome(400, "unknown cursor"),
                },
                None => (
                    kind.clone(),
                    since,
                    match g.shape.order {
                        Order::NewestFirst => u64::MAX,
                        Order::OldestFirst => 0,
                    },
                    0,
                ),
            };
            let list = history_list(g, filter.as_deref(), since.filter(|s| *s > 0));
            let page: Vec<Ver> = list
                .into_iter()
                .filter(|v| match g.shape.order {
                    Order::NewestFirst => v.seq < boundary,
                    Order::OldestFirst => v.seq > boundary,
                })
                .take(n + 1)
                .collect();
            let more = page.len() > n;
            let page: Vec<Ver> = page.into_iter().take(n).collect();
            let next = match (more, page.last()) {
                (true, Some(last)) => {
                    let tok = format!("c{:08x}", g.next_token * 2_654_435_761 % 4_294_967_291);
                    g.next_token += 1;
                    g.cursors
                        .insert(tok.clone(), (filter, since.unwrap_or(0), last.seq));
                    Some(format!("{link_base}/{path}?_cursor={tok}"))
                }
                _ => None,
            };
            (page_no, page, next)
        }
        HistoryPaging::Offset { keeps_since } => {
            let offset: usize = param(req, "_offset")
                .and_then(|o| o.parse().ok())
                .unwrap_or(0);
            let list = history_list(g, kind.as_deref(), since);
            let page: Vec<Ver> = list.iter().skip(offset).take(n).cloned().collect();
            let next = (offset + n < list.len()).then(|| {
                let s = match (keeps_since, param(req, "_since")) {
                    (true, Some(s)) => format!("_since={s}&"),
                    _ => String::new(),
                };
                format!("{link_base}/{path}?{s}_count={n}&_offset={}", offset + n)
            });
            (offset / n, page, next)
        }
        HistoryPaging::GetPages => {
            let tok = format!("g{}", g.next_token);
            g.next_token += 1;
            let list = history_list(g, kind.as_deref(), since);
            g.snapshots.insert(tok.clone(), list);
            return page_of_snapshot(g, &tok, 0, n, link_base, self_url);
        }
    };
    let entries: Vec<Value> = entries.iter().map(|v| entry(v, link_base)).collect();
    let b = bundle("history", self_url, next, entries);
    after_page(g, page_no);
    Answer {
        status: 200,
        body: b,
        etag: None,
    }
}

fn page_of_snapshot(
    g: &mut Inner,
    tok: &str,
    offset: usize,
    n: usize,
    link_base: &str,
    self_url: String,
) -> Answer {
    let list = g.snapshots.get(tok).cloned().unwrap_or_default();
    let page: Vec<Value> = list
        .iter()
        .skip(offset)
        .take(n)
        .map(|v| entry(v, link_base))
        .collect();
    let next = (offset + n < list.len()).then(|| {
        format!(
            "{link_base}?_getpages={tok}&_getpagesoffset={}&_count={n}&_bundletype=history",
            offset + n
        )
    });
    let b = bundle("history", self_url, next, page);
    after_page(g, offset / n);
    Answer {
        status: 200,
        body: b,
        etag: None,
    }
}

fn getpages(g: &mut Inner, req: &Request, link_base: &str) -> Answer {
    let tok = param(req, "_getpages").unwrap_or("").to_string();
    if !g.snapshots.contains_key(&tok) {
        return outcome(410, "search expired");
    }
    let offset = param(req, "_getpagesoffset")
        .and_then(|o| o.parse().ok())
        .unwrap_or(0);
    let n = count(req, &g.shape);
    page_of_snapshot(
        g,
        &tok,
        offset,
        n,
        link_base,
        format!("{link_base}?_getpages={tok}"),
    )
}

fn search(g: &mut Inner, req: &Request, kind: &str, link_base: &str) -> Answer {
    let by_lu = param(req, "_lastUpdated");
    let sort = param(req, "_sort");
    if !g.shape.search_by_last_updated && (by_lu.is_some() || sort.is_some()) {
        return outcome(400, "unknown search parameter _lastUpdated / _sort");
    }
    if let Some(s) = sort {
        if s != "_lastUpdated" {
            return outcome(400, "only _sort=_lastUpdated");
        }
    }
    let ge = match by_lu {
        Some(v) => match v.strip_prefix("ge").and_then(parse_instant) {
            Some(t) => Some(t),
            None => return outcome(400, "only _lastUpdated=ge<instant>"),
        },
        None => None,
    };
    let mut current: Vec<Ver> = Vec::new();
    let mut ids: Vec<&str> = Vec::new();
    for v in g.db.versions.iter().filter(|v| v.kind == kind) {
        if !ids.contains(&v.id.as_str()) {
            ids.push(&v.id);
        }
    }
    for id in ids {
        if let Some(v) = g.db.current(kind, id) {
            if !v.deleted && ge.map_or(true, |t| v.updated >= t) {
                current.push(v.clone());
            }
        }
    }
    if sort.is_some() && !g.shape.ignores_sort {
        current.sort_by_key(|v| v.updated);
    } else {
        current.sort_by(|a, b| a.id.cmp(&b.id));
    }
    // search.html "Server Conformance": the self link carries the parameters used.
    let used: Vec<String> = req
        .query
        .iter()
        .filter(|(k, _)| !(g.shape.ignores_sort && k == "_sort"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let self_url = format!("{link_base}/{kind}?{}", used.join("&"));
    if param(req, "_summary") == Some("count") {
        return Answer {
            status: 200,
            body: json!({"resourceType": "Bundle", "type": "searchset", "total": current.len()}),
            etag: None,
        };
    }
    let n = count(req, &g.shape);
    let offset: usize = param(req, "_offset")
        .and_then(|o| o.parse().ok())
        .unwrap_or(0);
    let entries: Vec<Value> = current
        .iter()
        .skip(offset)
        .take(n)
        .map(|v| {
            json!({"fullUrl": format!("{link_base}/{}/{}", v.kind, v.id), "resource": v.body,
                   "search": {"mode": "match"}})
        })
        .collect();
    let next = match g.shape.search_paging {
        SearchPaging::Offset if offset + n < current.len() => {
            let kept: Vec<String> = req
                .query
                .iter()
                .filter(|(k, _)| k != "_offset")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            Some(format!(
                "{link_base}/{kind}?{}&_offset={}",
                kept.join("&"),
                offset + n
            ))
        }
        _ => None,
    };
    let mut b = bundle("searchset", self_url, next, entries);
    b["total"] = json!(current.len());
    after_page(g, offset / n);
    Answer {
        status: 200,
        body: b,
        etag: None,
    }
}
