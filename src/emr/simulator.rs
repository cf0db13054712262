//! A simulator of an OpenMRS server, for tests and demos (OpenMRS itself cannot
//! run here). It serves what clinicsync uses, in OpenMRS's documented shapes:
//!
//! - atomfeed: `/openmrs/ws/atomfeed/<category>/recent` and numbered pages
//!   `/openmrs/ws/atomfeed/<category>/<n>`, 5 entries a page, oldest first, linked by
//!   `self`, `via`, `prev-archive`, `next-archive`; entry ids
//!   `tag:atomfeed.ict4h.org:<uuid>`, a category term for the type and one for the
//!   action (CREATED, UPDATED, VOIDED, UNVOIDED, RETIRED); content a bare REST URL
//!   (patient, location, concept) or a JSON object with `rest` and `fhir` links
//!   (encounter, obs).
//! - FHIR2 R4: `/openmrs/ws/fhir2/R4/<Type>/<uuid>` GET, PUT (updates; creates only
//!   metadata types), DELETE (voids/retires; a later GET answers 410 Gone), and POST to
//!   `/openmrs/ws/fhir2/R4/<Type>` (creates, keeping the resource's id as uuid).
//!   Responses carry `meta.versionId` as epoch milliseconds and `meta.lastUpdated`;
//!   there is no `_history`, but `GET …/R4/<Type>?_lastUpdated=ge<instant>` searches.
//!   Errors are OperationOutcomes.
//! - REST v1: `/openmrs/ws/rest/v1/<resource>/<uuid>?v=full` GET and POST (update),
//!   POST to `/openmrs/ws/rest/v1/<resource>` (create); errors as `{"error": {"message"}}`.
//! - HTTP Basic authentication.
//!
//! Test levers: refuse writes of one record with a status and message, hang every
//! answer, serve garbage instead of the feed, break the archive chain, answer FHIR
//! reads with non-JSON. Every write through the API appends a feed event, as
//! OpenMRS's event module does — which is what makes echo suppression necessary.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};

#[derive(Default)]
struct Res {
    body: Value,
    gone: bool,
    version_ms: u64,
}

#[derive(Clone)]
struct Event {
    uuid: String,
    category: String,
    term: String,
    content: String,
    updated: String,
}

#[derive(Default)]
pub struct SimState {
    resources: BTreeMap<(String, String), Res>,
    events: Vec<Event>,
    refuse: HashMap<(String, String), (u16, String)>,
    pub hang_ms: u64,
    pub garbage_feed: bool,
    pub broken_chain: bool,
    pub fhir_not_json: bool,
    clock_ms: u64,
    user: String,
    password: String,
    writes: u64,
}

/// A running simulator on 127.0.0.1.
pub struct OpenMrsSim {
    pub url: String,
    state: Arc<Mutex<SimState>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    rt: Option<tokio::runtime::Runtime>,
}

const FHIR_TYPES: &[&str] = &[
    "Patient",
    "Encounter",
    "Observation",
    "Location",
    "Person",
    "Practitioner",
    "Condition",
    "AllergyIntolerance",
];

fn category_of(kind: &str) -> String {
    match kind {
        "Patient" => "patient".into(),
        "Encounter" => "encounter".into(),
        "Observation" => "obs".into(),
        "Location" => "location".into(),
        "Person" => "person".into(),
        "Practitioner" => "provider".into(),
        other => other
            .strip_prefix("openmrs:")
            .unwrap_or(other)
            .to_ascii_lowercase(),
    }
}

fn is_metadata(kind: &str) -> bool {
    crate::model::class_of(kind) == crate::model::Class::Metadata
}

impl SimState {
    fn tick(&mut self) -> u64 {
        let now = crate::store::wall_ms().max(self.clock_ms + 1);
        self.clock_ms = now;
        now
    }

    fn event(&mut self, kind: &str, id: &str, term: &str) {
        let category = category_of(kind);
        let content = match kind {
            "Encounter" | "Observation" => json!({
                "rest": format!("/openmrs/ws/rest/v1/{category}/{id}?v=full"),
                "fhir": format!("/openmrs/ws/fhir2/R4/{kind}/{id}"),
            })
            .to_string(),
            _ => format!("/openmrs/ws/rest/v1/{category}/{id}?v=full"),
        };
        let n = self.events.len() as u64 + 1;
        let ms = self.tick();
        self.events.push(Event {
            uuid: format!(
                "{:08x}-{:04x}-4000-8000-{:012x}",
                ms & 0xffff_ffff,
                n & 0xffff,
                n
            ),
            category,
            term: term.into(),
            content,
            updated: crate::cli::fmt_time(ms),
        });
    }

    fn upsert(&mut self, kind: &str, id: &str, mut body: Value) -> &'static str {
        if let Some(o) = body.as_object_mut() {
            o.remove("meta");
            o.insert("resourceType".into(), kind.into());
            o.insert("id".into(), id.into());
        }
        let ms = self.tick();
        let key = (kind.to_string(), id.to_string());
        let term = match self.resources.get(&key) {
            None => "CREATED",
            Some(r) if r.gone => {
                if is_metadata(kind) {
                    "UNRETIRED"
                } else {
                    "UNVOIDED"
                }
            }
            Some(_) => "UPDATED",
        };
        self.resources.insert(
            key,
            Res {
                body,
                gone: false,
                version_ms: ms,
            },
        );
        self.event(kind, id, term);
        self.writes += 1;
        term
    }

    fn remove(&mut self, kind: &str, id: &str) -> bool {
        let ms = self.tick();
        let Some(r) = self.resources.get_mut(&(kind.to_string(), id.to_string())) else {
            return false;
        };
        r.gone = true;
        r.version_ms = ms;
        let term = if is_metadata(kind) {
            "RETIRED"
        } else {
            "VOIDED"
        };
        self.event(kind, id, term);
        self.writes += 1;
        true
    }

    fn rendered(&self, kind: &str, id: &str) -> Option<Result<Value, ()>> {
        let r = self.resources.get(&(kind.to_string(), id.to_string()))?;
        if r.gone {
            return Some(Err(()));
        }
        let mut body = r.body.clone();
        if let Some(o) = body.as_object_mut() {
            o.insert(
                "meta".into(),
                json!({"versionId": r.version_ms.to_string(), "lastUpdated": instant(r.version_ms)}),
            );
        }
        Some(Ok(body))
    }
}

fn outcome(status: StatusCode, text: &str) -> Response {
    let body = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing", "diagnostics": text}]});
    (
        status,
        [(header::CONTENT_TYPE, "application/fhir+json")],
        body.to_string(),
    )
        .into_response()
}

type Shared = Arc<Mutex<SimState>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, SimState> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

async fn gate(s: &Shared, headers: &HeaderMap) -> Result<(), Response> {
    let hang = lock(s).hang_ms;
    if hang > 0 {
        tokio::time::sleep(Duration::from_millis(hang)).await;
    }
    let (user, pass) = {
        let st = lock(s);
        (st.user.clone(), st.password.clone())
    };
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    );
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        != Some(want.as_str())
    {
        return Err(outcome(StatusCode::UNAUTHORIZED, "User is not logged in"));
    }
    Ok(())
}

fn feed_page(
    st: &SimState,
    base: &str,
    category: &str,
    page: Option<usize>,
) -> Result<String, StatusCode> {
    let events: Vec<&Event> = st
        .events
        .iter()
        .filter(|e| e.category == category)
        .collect();
    let pages = events.len().div_ceil(5).max(1);
    let n = page.unwrap_or(pages);
    if n == 0 || n > pages {
        return Err(StatusCode::NOT_FOUND);
    }
    let feed = format!("{base}/openmrs/ws/atomfeed/{category}");
    let mut links = vec![
        (
            "self",
            if page.is_none() {
                format!("{feed}/recent")
            } else {
                format!("{feed}/{n}")
            },
        ),
        ("via", format!("{feed}/{n}")),
    ];
    if n > 1 {
        let prev = if st.broken_chain {
            format!("{feed}/9999")
        } else {
            format!("{feed}/{}", n - 1)
        };
        links.push(("prev-archive", prev));
    }
    if n < pages {
        links.push(("next-archive", format!("{feed}/{}", n + 1)));
    }
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<feed xmlns=\"http://www.w3.org/2005/Atom\">\n");
    xml.push_str(&format!("  <title>{category}</title>\n"));
    for (rel, href) in links {
        xml.push_str(&format!(
            "  <link rel=\"{rel}\" type=\"application/atom+xml\" href=\"{href}\" />\n"
        ));
    }
    xml.push_str(&format!(
        "  <author><name>OpenMRS</name></author>\n  <id>{category}+{n}</id>\n"
    ));
    xml.push_str("  <generator uri=\"https://github.com/ICT4H/atomfeed\">OpenMRS Feed Publisher</generator>\n");
    for e in events.iter().skip((n - 1) * 5).take(5) {
        xml.push_str(&format!(
            "  <entry>\n    <title>{cat}</title>\n    <category term=\"{cat}\" />\n    <category term=\"{term}\" />\n    <id>tag:atomfeed.ict4h.org:{uuid}</id>\n    <updated>{upd}</updated>\n    <published>{upd}</published>\n    <content type=\"application/vnd.atomfeed+xml\"><![CDATA[{content}]]></content>\n  </entry>\n",
            cat = e.category,
            term = e.term,
            uuid = e.uuid,
            upd = e.updated,
            content = e.content
        ));
    }
    xml.push_str("</feed>\n");
    Ok(xml)
}

async fn atom(
    State((s, base)): State<(Shared, String)>,
    headers: HeaderMap,
    Path((category, page)): Path<(String, String)>,
) -> Response {
    if let Err(r) = gate(&s, &headers).await {
        return r;
    }
    let st = lock(&s);
    if st.garbage_feed {
        return (
            StatusCode::OK,
            "<html><body><h1>502 Proxy Error</h1></body>",
        )
            .into_response();
    }
    let n = if page == "recent" {
        None
    } else {
        match page.parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => return StatusCode::NOT_FOUND.into_response(),
        }
    };
    match feed_page(&st, &base, &category, n) {
        Ok(xml) => ([(header::CONTENT_TYPE, "application/atom+xml")], xml).into_response(),
        Err(code) => (code, "no such feed page").into_response(),
    }
}

async fn fhir_one(
    State((s, _)): State<(Shared, String)>,
    headers: HeaderMap,
    method: axum::http::Method,
    Path((kind, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if let Err(r) = gate(&s, &headers).await {
        return r;
    }
    if !FHIR_TYPES.contains(&kind.as_str()) {
        return outcome(
            StatusCode::NOT_FOUND,
            &format!("Unknown resource type '{kind}'"),
        );
    }
    let mut st = lock(&s);
    match method.as_str() {
        "GET" => {
            if st.fhir_not_json {
                return (StatusCode::OK, "<html>maintenance</html>").into_response();
            }
            match st.rendered(&kind, &id) {
                None => outcome(
                    StatusCode::NOT_FOUND,
                    &format!("Resource of type {kind} with ID {id} is not known"),
                ),
                Some(Err(())) => outcome(
                    StatusCode::GONE,
                    &format!("Resource of type {kind} with ID {id} is gone/deleted"),
                ),
                Some(Ok(v)) => (
                    [(header::CONTENT_TYPE, "application/fhir+json")],
                    v.to_string(),
                )
                    .into_response(),
            }
        }
        "PUT" => {
            if let Some((code, msg)) = st.refuse.get(&(kind.clone(), id.clone())).cloned() {
                return outcome(
                    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
                    &msg,
                );
            }
            let exists = st
                .resources
                .get(&(kind.clone(), id.clone()))
                .is_some_and(|r| !r.gone);
            if !exists && !is_metadata(&kind) {
                return outcome(
                    StatusCode::NOT_FOUND,
                    &format!("Resource of type {kind} with ID {id} is not known"),
                );
            }
            let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                return outcome(
                    StatusCode::BAD_REQUEST,
                    "Failed to parse request body as JSON resource",
                );
            };
            if v.get("id").and_then(|i| i.as_str()) != Some(id.as_str()) {
                return outcome(
                    StatusCode::BAD_REQUEST,
                    "Resource id in the body does not match the URL",
                );
            }
            st.upsert(&kind, &id, v);
            let out = st
                .rendered(&kind, &id)
                .and_then(Result::ok)
                .unwrap_or(Value::Null);
            (
                [(header::CONTENT_TYPE, "application/fhir+json")],
                out.to_string(),
            )
                .into_response()
        }
        "DELETE" => {
            if st.remove(&kind, &id) {
                outcome(StatusCode::OK, "Deleted")
            } else {
                outcome(
                    StatusCode::NOT_FOUND,
                    &format!("Resource of type {kind} with ID {id} is not known"),
                )
            }
        }
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

/// `2026-11-26T10:00:00.123Z`, as FHIR2 renders `meta.lastUpdated`.
fn instant(ms: u64) -> String {
    format!(
        "{}.{:03}Z",
        crate::cli::fmt_time(ms).trim_end_matches('Z'),
        ms % 1000
    )
}

/// Epoch milliseconds of `YYYY-MM-DDTHH:MM:SS[.mmm]Z`.
fn parse_instant(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let d: Vec<i64> = date.split('-').filter_map(|x| x.parse().ok()).collect();
    let (hms, millis) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').filter_map(|x| x.parse().ok()).collect();
    if d.len() != 3 || t.len() != 3 {
        return None;
    }
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + (153 * m + 2) / 5 + d[2] - 1;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1000) as u64;
    Some(ms + millis.get(..3.min(millis.len()))?.parse::<u64>().ok()?)
}

/// `GET …/R4/<Type>?_lastUpdated=ge<instant>&_sort=_lastUpdated`: a searchset,
/// oldest first (FHIR2 has no `_history`).
async fn fhir_search(
    State((s, base)): State<(Shared, String)>,
    headers: HeaderMap,
    Path(kind): Path<String>,
    uri: axum::http::Uri,
) -> Response {
    if let Err(r) = gate(&s, &headers).await {
        return r;
    }
    if !FHIR_TYPES.contains(&kind.as_str()) {
        // `_history` lands here too: FHIR2 does not have it.
        return outcome(
            StatusCode::NOT_FOUND,
            &format!("Unknown resource type '{kind}'"),
        );
    }
    let since = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("_lastUpdated=ge"))
        .map(|v| v.replace("%3A", ":"))
        .and_then(|v| parse_instant(&v))
        .unwrap_or(0);
    let st = lock(&s);
    let mut found: Vec<(u64, Value)> = st
        .resources
        .iter()
        .filter(|((k, _), r)| *k == kind && !r.gone && r.version_ms >= since)
        .filter_map(|((k, id), r)| {
            st.rendered(k, id)
                .and_then(Result::ok)
                .map(|v| (r.version_ms, v))
        })
        .collect();
    found.sort_by_key(|(ms, _)| *ms);
    let entries: Vec<Value> = found
        .into_iter()
        .map(|(_, v)| json!({"fullUrl": format!("{base}/openmrs/ws/fhir2/R4/{kind}/{}", v["id"].as_str().unwrap_or("")), "resource": v}))
        .collect();
    let bundle = json!({"resourceType": "Bundle", "type": "searchset", "total": entries.len(), "entry": entries});
    (
        [(header::CONTENT_TYPE, "application/fhir+json")],
        bundle.to_string(),
    )
        .into_response()
}

async fn fhir_create(
    State((s, _)): State<(Shared, String)>,
    headers: HeaderMap,
    Path(kind): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(r) = gate(&s, &headers).await {
        return r;
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "Failed to parse request body as JSON resource",
        );
    };
    let Some(id) = v.get("id").and_then(|i| i.as_str()).map(str::to_string) else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "clinicsync always sends the uuid as id",
        );
    };
    let mut st = lock(&s);
    if let Some((code, msg)) = st.refuse.get(&(kind.clone(), id.clone())).cloned() {
        return outcome(
            StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
            &msg,
        );
    }
    if kind == "Encounter" || kind == "Observation" {
        // OpenMRS enforces the patient's existence.
        let patient = v
            .get("subject")
            .and_then(|s| s.get("reference"))
            .and_then(|r| r.as_str())
            .unwrap_or("");
        let pid = patient.rsplit('/').next().unwrap_or("");
        if !st
            .resources
            .get(&("Patient".to_string(), pid.to_string()))
            .is_some_and(|r| !r.gone)
        {
            return outcome(
                StatusCode::BAD_REQUEST,
                &format!("Patient '{pid}' does not exist"),
            );
        }
    }
    st.upsert(&kind, &id, v);
    let out = st
        .rendered(&kind, &id)
        .and_then(Result::ok)
        .unwrap_or(Value::Null);
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/fhir+json")],
        out.to_string(),
    )
        .into_response()
}

async fn rest_one(
    State((s, _)): State<(Shared, String)>,
    headers: HeaderMap,
    method: axum::http::Method,
    Path((resource, uuid)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if let Err(r) = gate(&s, &headers).await {
        return r;
    }
    let kind = format!("openmrs:{resource}");
    let mut st = lock(&s);
    let err = |code: StatusCode, m: &str| {
        (code, json!({"error": {"message": m}}).to_string()).into_response()
    };
    match method.as_str() {
        "GET" => match st.resources.get(&(kind.clone(), uuid.clone())) {
            None => err(
                StatusCode::NOT_FOUND,
                &format!("Object with given uuid doesn't exist [{uuid}]"),
            ),
            Some(r) => {
                let mut v = r.body.clone();
                if let Some(o) = v.as_object_mut() {
                    o.remove("resourceType");
                    o.remove("id");
                    o.insert("uuid".into(), uuid.clone().into());
                    o.insert("retired".into(), r.gone.into());
                    o.insert("links".into(), json!([{"rel": "self", "uri": format!("/openmrs/ws/rest/v1/{resource}/{uuid}")}]));
                }
                v.to_string().into_response()
            }
        },
        "POST" => {
            if !st.resources.contains_key(&(kind.clone(), uuid.clone())) {
                return err(
                    StatusCode::NOT_FOUND,
                    &format!("Object with given uuid doesn't exist [{uuid}]"),
                );
            }
            let Ok(mut v) = serde_json::from_slice::<Value>(&body) else {
                return err(StatusCode::BAD_REQUEST, "Invalid JSON");
            };
            let retire = v.get("retired").and_then(|r| r.as_bool()) == Some(true);
            if let Some(o) = v.as_object_mut() {
                o.remove("retired");
                o.remove("uuid");
            }
            st.upsert(&kind, &uuid, v);
            if retire {
                st.remove(&kind, &uuid);
            }
            StatusCode::OK.into_response()
        }
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

async fn rest_create(
    State((s, _)): State<(Shared, String)>,
    headers: HeaderMap,
    Path(resource): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(r) = gate(&s, &headers).await {
        return r;
    }
    let Ok(mut v) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": "Invalid JSON"}}).to_string(),
        )
            .into_response();
    };
    let uuid = v
        .get("uuid")
        .and_then(|u| u.as_str())
        .unwrap_or_default()
        .to_string();
    let retire = v.get("retired").and_then(|r| r.as_bool()) == Some(true);
    if let Some(o) = v.as_object_mut() {
        o.remove("uuid");
        o.remove("retired");
    }
    let kind = format!("openmrs:{resource}");
    let mut st = lock(&s);
    st.upsert(&kind, &uuid, v);
    if retire {
        st.remove(&kind, &uuid);
    }
    (StatusCode::CREATED, "{}").into_response()
}

impl OpenMrsSim {
    /// Starts a simulator with HTTP Basic credentials `user:password`.
    pub fn start(user: &str, password: &str) -> std::io::Result<OpenMrsSim> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let url = format!("http://127.0.0.1:{}", listener.local_addr()?.port());
        let state = Arc::new(Mutex::new(SimState {
            user: user.into(),
            password: password.into(),
            ..SimState::default()
        }));
        let app = Router::new()
            .route("/openmrs/ws/atomfeed/{category}/{page}", get(atom))
            .route(
                "/openmrs/ws/fhir2/R4/{kind}/{id}",
                get(fhir_one).put(fhir_one).delete(fhir_one),
            )
            .route(
                "/openmrs/ws/fhir2/R4/{kind}",
                get(fhir_search).post(fhir_create),
            )
            .route(
                "/openmrs/ws/rest/v1/{resource}/{uuid}",
                get(rest_one).post(rest_one),
            )
            .route(
                "/openmrs/ws/rest/v1/{resource}",
                axum::routing::post(rest_create),
            )
            .with_state((state.clone(), url.clone()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(OpenMrsSim {
            url,
            state,
            stop: Some(tx),
            rt: Some(rt),
        })
    }

    /// Direct access to the levers and the data.
    pub fn with<T>(&self, f: impl FnOnce(&mut SimState) -> T) -> T {
        f(&mut lock(&self.state))
    }

    /// A clinician saves a resource in the OpenMRS UI (creates or edits it).
    pub fn save(&self, resource: Value) {
        let kind = resource["resourceType"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let id = resource["id"].as_str().unwrap_or_default().to_string();
        self.with(|s| s.upsert(&kind, &id, resource));
    }

    /// A clinician voids (clinical) or retires (metadata) a record.
    pub fn void(&self, kind: &str, id: &str) {
        self.with(|s| s.remove(kind, id));
    }

    /// The record as OpenMRS holds it: `None` if unknown, `Some(None)` if voided.
    pub fn get(&self, kind: &str, id: &str) -> Option<Option<Value>> {
        self.with(|s| s.rendered(kind, id).map(|r| r.ok()))
    }

    /// Writes that came in through the API or the UI (each made a feed event).
    pub fn writes(&self) -> u64 {
        self.with(|s| s.writes)
    }

    pub fn refuse(&self, kind: &str, id: &str, status: u16, message: &str) {
        self.with(|s| {
            s.refuse
                .insert((kind.into(), id.into()), (status, message.into()))
        });
    }

    pub fn accept(&self, kind: &str, id: &str) {
        self.with(|s| s.refuse.remove(&(kind.to_string(), id.to_string())));
    }
}

impl Drop for OpenMrsSim {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
