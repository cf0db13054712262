//! FHIR2 R4 (`/openmrs/ws/fhir2/R4/…`): read, create, update, delete, search by
//! `_lastUpdated` (and `patient`/`subject`, `encounter`, `_id`) with paging.
//!
//! Upstream: openmrs-module-fhir2 (`api/.../api/impl/BaseFhirService.java`,
//! `FhirObservationServiceImpl.java`, `providers/r4/BaseUpsertFhirResourceProvider.java`,
//! `omod/.../web/filter/AuthenticationFilter.java`,
//! `omod/.../web/authentication/RequireAuthenticationInterceptor.java`,
//! `omod/.../web/servlet/FhirRestServlet.java`, `omod/.../web/util/OpenmrsFhirAddressStrategy.java`,
//! `omod/src/main/resources/org/openmrs/module/fhir2/narratives/*.html`) and
//! hapifhir/hapi-fhir (`hapi-fhir-server/.../method/CreateMethodBinding.java`).

// Helpers return the finished HTTP answer as their error, as axum handlers do;
// its size does not matter on a test server.
#![allow(clippy::result_large_err)]

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::model::{new_uuid, parse_instant, Login, SimState};
use super::{enter, lock, Shared};

/// The resource types the R4 servlet has providers for.
pub(super) const TYPES: &[&str] = &[
    "AllergyIntolerance",
    "Condition",
    "DiagnosticReport",
    "Encounter",
    "EpisodeOfCare",
    "Group",
    "Immunization",
    "Location",
    "Medication",
    "MedicationDispense",
    "MedicationRequest",
    "Observation",
    "Patient",
    "Person",
    "Practitioner",
    "RelatedPerson",
    "ServiceRequest",
    "Task",
    "ValueSet",
];

/// Providers extending `BaseUpsertFhirResourceProvider`: the only ones where a PUT
/// of an unknown id may create (and only if the type is listed in the global
/// property `fhir2.upsert.supported.resources`, and — `BaseFhirService.update` —
/// the OpenMRS type is metadata).
pub(super) const UPSERT_CAPABLE: &[&str] = &["Location", "Medication", "Practitioner", "Task"];

pub(super) fn outcome(status: u16, text: &str) -> Response {
    let body = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing", "diagnostics": text}]});
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/fhir+json;charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

/// The servlet container's error page (`HttpServletResponse.sendError`): HTML, not
/// FHIR.
pub(super) fn container_error(status: u16, message: &str) -> Response {
    let reason = match status {
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Internal Server Error",
    };
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><title>HTTP Status {status} – {reason}</title></head>\
         <body><h1>HTTP Status {status} – {reason}</h1><hr class=\"line\" /><p><b>Type</b> Status Report</p>\
         <p><b>Message</b> {message}</p><hr class=\"line\" /><h3>Apache Tomcat/9.0.83</h3></body></html>"
    );
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "text/html;charset=utf-8")],
        html,
    )
        .into_response()
}

/// `OpenmrsFhirAddressStrategy.determineServerBase`: `fhir2.uriPrefix` if set, else
/// the request's scheme (or `X-Forwarded-Proto`), host (or `X-Forwarded-Host`) and
/// port, then `/openmrs/ws/fhir2/R4`.
pub(super) fn base(st: &SimState, headers: &HeaderMap) -> String {
    if let Some(p) = &st.fhir_uri_prefix {
        return format!("{}/R4", p.trim_end_matches('/'));
    }
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let scheme = h("x-forwarded-proto").unwrap_or("http");
    let host = h("x-forwarded-host")
        .or_else(|| h("host"))
        .unwrap_or("localhost");
    format!("{scheme}://{host}/openmrs/ws/fhir2/R4")
}

/// fhir2 `AuthenticationFilter` (Basic credentials that fail: `sendError(401,
/// "Not authenticated")`) and `RequireAuthenticationInterceptor` (no credentials:
/// the same): both are the container's HTML error page.
fn login(st: &mut SimState, headers: &HeaderMap) -> Result<String, Response> {
    match st.login(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok()),
    ) {
        Login::Ok(user) => Ok(user),
        Login::Failed | Login::Anonymous => Err(container_error(401, "Not authenticated")),
    }
}

/// The privilege an operation needs. FHIR2 has no mapping for OpenMRS's
/// `APIAuthenticationException`, so HAPI answers it as an internal error (500).
fn privilege(st: &SimState, user: &str, kind: &str, method: &Method) -> Result<(), Response> {
    let noun = match kind {
        "Patient" => "Patients",
        "Encounter" => "Encounters",
        "Observation" => "Observations",
        "Person" | "RelatedPerson" => "People",
        "AllergyIntolerance" => "Allergies",
        "Condition" => "Conditions",
        "MedicationRequest" | "ServiceRequest" | "MedicationDispense" => "Orders",
        "Location" => "Locations",
        "Practitioner" => "Providers",
        _ => return Ok(()),
    };
    let verb = match *method {
        Method::GET => "Get",
        Method::POST => "Add",
        Method::DELETE => "Delete",
        _ => "Edit",
    };
    let needed = match (noun, verb) {
        ("Locations", "Get") | ("Providers", "Get") => format!("Get {noun}"),
        ("Locations", _) | ("Providers", _) => format!("Manage {noun}"),
        _ => format!("{verb} {noun}"),
    };
    match st.account(user) {
        Some(a) if a.has(&needed) => Ok(()),
        _ => Err(outcome(
            500,
            &format!("Failed to call access method: org.openmrs.api.APIAuthenticationException: Privileges required: {needed}"),
        )),
    }
}

/// The resource as FHIR2 serves it: the stored body, `meta`, and the narrative the
/// servlet's `OpenmrsThymeleafNarrativeGenerator` writes into `text` on every
/// response — holding this server's URL for the resource.
pub(super) fn served(st: &SimState, base: &str, kind: &str, id: &str) -> Option<Result<Value, ()>> {
    let mut v = st.rendered_any(kind, id)?;
    let gone = st.get(kind, id).is_some_and(|r| r.gone);
    if let Some(o) = v.as_object_mut() {
        let url = format!("{base}/{kind}/{id}");
        o.insert(
            "text".into(),
            json!({"status": "generated", "div": format!(
                "<div xmlns=\"http://www.w3.org/1999/xhtml\"><table class=\"hapiPropertyTable\"><tbody><tr><td>Id:</td><td>{url}</td></tr></tbody></table></div>"
            )}),
        );
    }
    Some(if gone { Err(()) } else { Ok(v) })
}

fn fhir_json(status: StatusCode, v: &Value, location: Option<String>) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "application/fhir+json;charset=utf-8")],
        v.to_string(),
    )
        .into_response();
    if let Some(l) = location.and_then(|l| l.parse().ok()) {
        r.headers_mut().insert(header::LOCATION, l);
    }
    r
}

fn unknown_type(kind: &str) -> Response {
    outcome(
        404,
        &format!("Unknown resource type '{kind}' - Server knows how to handle: {TYPES:?}"),
    )
}

fn parse_body(kind: &str, body: &[u8]) -> Result<Value, Response> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        outcome(
            400,
            &format!("Failed to parse request body as JSON resource. Error was: {e}"),
        )
    })?;
    let found = v.get("resourceType").and_then(|t| t.as_str()).unwrap_or("");
    if found != kind {
        return Err(outcome(
            400,
            &format!("Incorrect resource type found, expected \"{kind}\" but found \"{found}\""),
        ));
    }
    Ok(v)
}

/// An Encounter or Observation needs an existing patient (the translators look the
/// subject up; the validator refuses a missing one: 422).
fn check_subject(st: &SimState, kind: &str, v: &Value) -> Result<(), Response> {
    if kind != "Encounter" && kind != "Observation" {
        return Ok(());
    }
    let reference = v
        .get("subject")
        .and_then(|s| s.get("reference"))
        .and_then(|r| r.as_str())
        .unwrap_or("");
    let pid = reference.rsplit('/').next().unwrap_or("");
    if st.live("Patient", pid) {
        Ok(())
    } else {
        Err(outcome(
            422,
            &format!(
                "'{kind}' failed to validate with reason: patient: Patient '{pid}' does not exist"
            ),
        ))
    }
}

/// `GET|PUT|DELETE /openmrs/ws/fhir2/R4/<Type>/<id>`.
pub(super) async fn one(
    State(s): State<Shared>,
    headers: HeaderMap,
    method: Method,
    Path((kind, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    enter(&s).await;
    let mut st = lock(&s);
    let user = match login(&mut st, &headers) {
        Ok(u) => u,
        Err(r) => return r,
    };
    if id == "_history" {
        return no_history(&format!("{kind}/_history"));
    }
    if !TYPES.contains(&kind.as_str()) {
        return unknown_type(&kind);
    }
    if let Err(r) = privilege(&st, &user, &kind, &method) {
        return r;
    }
    let base = base(&st, &headers);
    match method {
        Method::GET => {
            if st.fhir_not_json {
                return (StatusCode::OK, "<html>maintenance</html>").into_response();
            }
            // BaseFhirService.get: unknown → 404, voided or retired → 410.
            match served(&st, &base, &kind, &id) {
                None => outcome(
                    404,
                    &format!("Resource of type {kind} with ID {id} is not known"),
                ),
                Some(Err(())) => outcome(
                    410,
                    &format!("Resource of type {kind} with ID {id} is gone/deleted"),
                ),
                Some(Ok(v)) => fhir_json(StatusCode::OK, &v, None),
            }
        }
        Method::PUT => {
            let v = match parse_body(&kind, &body) {
                Ok(v) => v,
                Err(r) => return r,
            };
            // BaseFhirService.update: the body must carry the id of the URL.
            match v.get("id").and_then(|i| i.as_str()) {
                None => return outcome(400, &format!("{kind} resource is missing id.")),
                Some(i) if i != id => {
                    return outcome(400, &format!("{kind} id does not match resource id."))
                }
                Some(_) => {}
            }
            if let Some((code, msg)) = st.refusal(&kind, &id) {
                return outcome(code, &msg);
            }
            // BaseFhirService.update looks the record up first (404), then
            // translates and validates (422).
            if st.get(&kind, &id).is_some() {
                if let Err(r) = check_subject(&st, &kind, &v) {
                    return r;
                }
                // An Observation comes back under a new uuid (ObsServiceImpl amends).
                let now_id = st.update(&kind, &id, v);
                let out = served(&st, &base, &kind, &now_id)
                    .map(|r| {
                        r.unwrap_or_else(|()| {
                            st.rendered_any(&kind, &now_id).unwrap_or(Value::Null)
                        })
                    })
                    .unwrap_or(Value::Null);
                return fhir_json(StatusCode::OK, &out, None);
            }
            let listed = st.upsert_resources.split(',').any(|t| t.trim() == kind);
            if UPSERT_CAPABLE.contains(&kind.as_str()) && listed {
                st.create(&kind, &id, v);
                let out = served(&st, &base, &kind, &id)
                    .and_then(Result::ok)
                    .unwrap_or(Value::Null);
                let loc = format!("{base}/{kind}/{id}");
                return fhir_json(StatusCode::CREATED, &out, Some(loc));
            }
            outcome(
                404,
                &format!("Resource of type {kind} with ID {id} is not known"),
            )
        }
        Method::DELETE => {
            if st.void(&kind, &id) {
                outcome(200, "Successfully deleted resource")
            } else {
                outcome(
                    404,
                    &format!("Resource of type {kind} with ID {id} is not known"),
                )
            }
        }
        _ => outcome(405, "Method not allowed"),
    }
}

/// `GET /openmrs/ws/fhir2/R4/<Type>?…` (search) and `POST …/<Type>` (create).
pub(super) async fn type_level(
    State(s): State<Shared>,
    headers: HeaderMap,
    method: Method,
    Path(kind): Path<String>,
    uri: Uri,
    body: Bytes,
) -> Response {
    enter(&s).await;
    let mut st = lock(&s);
    let user = match login(&mut st, &headers) {
        Ok(u) => u,
        Err(r) => return r,
    };
    if kind == "_history" {
        return no_history("_history");
    }
    if !TYPES.contains(&kind.as_str()) {
        return unknown_type(&kind);
    }
    if let Err(r) = privilege(&st, &user, &kind, &method) {
        return r;
    }
    let base = base(&st, &headers);
    match method {
        Method::POST => {
            let v = match parse_body(&kind, &body) {
                Ok(v) => v,
                Err(r) => return r,
            };
            if let Some(client_id) = v.get("id").and_then(|i| i.as_str()) {
                if let Some((code, msg)) = st.refusal(&kind, client_id) {
                    return outcome(code, &msg);
                }
            }
            if let Err(r) = check_subject(&st, &kind, &v) {
                return r;
            }
            // CreateMethodBinding clears the resource's id before the provider sees
            // it; BaseFhirService.create gives the new object a fresh uuid.
            let id = new_uuid();
            st.create(&kind, &id, v);
            let out = served(&st, &base, &kind, &id)
                .and_then(Result::ok)
                .unwrap_or(Value::Null);
            let version = out["meta"]["versionId"].as_str().unwrap_or("1").to_string();
            fhir_json(
                StatusCode::CREATED,
                &out,
                Some(format!("{base}/{kind}/{id}/_history/{version}")),
            )
        }
        Method::GET => search(&mut st, &base, &kind, uri.query().unwrap_or("")),
        _ => outcome(405, "Method not allowed"),
    }
}

/// HAPI's answer to a history request no provider implements.
fn no_history(what: &str) -> Response {
    outcome(
        400,
        &format!("Invalid request: The FHIR endpoint on this server does not know how to handle GET operation[{what}] with parameters [[]]"),
    )
}

fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// FHIR2's paging: `fhir2.paging.default` 10 a page, at most `fhir2.paging.maximum`
/// 100 (`FhirRestServlet.createPagingProvider`); results kept by HAPI's
/// `FifoMemoryPagingProvider(100)` and served by `_getpages`.
const PAGE_DEFAULT: usize = 10;
const PAGE_MAX: usize = 100;

fn search(st: &mut SimState, base: &str, kind: &str, query: &str) -> Response {
    let mut found: Vec<(u64, String)> = Vec::new();
    let params = query_pairs(query);
    let mut count = PAGE_DEFAULT;
    let mut sort: Option<String> = None;
    for ((k, id), r) in st.resources.iter() {
        if k != kind || r.gone {
            continue;
        }
        let mut keep = true;
        for (p, v) in &params {
            let refers = |field: &str| {
                r.body
                    .get(field)
                    .and_then(|x| x.get("reference"))
                    .and_then(|x| x.as_str())
                    .map(|x| {
                        x.rsplit('/').next().unwrap_or("") == v.rsplit('/').next().unwrap_or("")
                    })
                    .unwrap_or(false)
            };
            keep &= match p.as_str() {
                "_lastUpdated" => {
                    let (op, when) = v.split_at(v.len().min(2));
                    match (op, parse_instant(when)) {
                        ("ge", Some(t)) => r.version_ms >= t,
                        ("gt", Some(t)) => r.version_ms > t,
                        ("le", Some(t)) => r.version_ms <= t,
                        ("lt", Some(t)) => r.version_ms < t,
                        _ => parse_instant(v).is_some_and(|t| r.version_ms / 1000 == t / 1000),
                    }
                }
                "patient" | "subject" | "subject:Patient" => refers("subject") || refers("patient"),
                "encounter" => refers("encounter"),
                "_id" => v.split(',').any(|x| x == id),
                _ => true,
            };
        }
        if keep {
            found.push((r.version_ms, id.clone()));
        }
    }
    for (p, v) in &params {
        match p.as_str() {
            "_count" => count = v.parse().unwrap_or(PAGE_DEFAULT),
            "_sort" => sort = Some(v.clone()),
            _ => {}
        }
    }
    match sort.as_deref() {
        Some("_lastUpdated") => found.sort(),
        Some("-_lastUpdated") => found.sort_by(|a, b| b.cmp(a)),
        _ => {}
    }
    let entries: Vec<Value> = found
        .iter()
        .filter_map(|(_, id)| {
            let r = served(st, base, kind, id)?.ok()?;
            Some(json!({"fullUrl": format!("{base}/{kind}/{id}"), "resource": r, "search": {"mode": "match"}}))
        })
        .collect();
    let count = count.clamp(1, PAGE_MAX);
    let id = new_uuid();
    let total = entries.len();
    let first: Vec<Value> = entries.iter().take(count).cloned().collect();
    let mut bundle = json!({
        "resourceType": "Bundle", "id": id, "type": "searchset", "total": total,
        "link": [{"relation": "self", "url": format!("{base}/{kind}?{query}")}],
        "entry": first,
    });
    if total > count {
        st.search_order.push_back(id.clone());
        st.search_pages.insert(id.clone(), entries);
        while st.search_order.len() > 100 {
            if let Some(old) = st.search_order.pop_front() {
                st.search_pages.remove(&old);
            }
        }
        push_next(&mut bundle, base, &id, count, count);
    }
    fhir_json(StatusCode::OK, &bundle, None)
}

fn push_next(bundle: &mut Value, base: &str, id: &str, offset: usize, count: usize) {
    if let Some(links) = bundle["link"].as_array_mut() {
        links.push(json!({"relation": "next", "url": format!(
            "{base}?_getpages={id}&_getpagesoffset={offset}&_count={count}&_pretty=true&_bundletype=searchset"
        )}));
    }
}

/// `GET /openmrs/ws/fhir2/R4?_getpages=…` (the next page of a search) and the
/// system-level requests FHIR2 does not serve (`_history`).
pub(super) async fn system(State(s): State<Shared>, headers: HeaderMap, uri: Uri) -> Response {
    enter(&s).await;
    let mut st = lock(&s);
    if let Err(r) = login(&mut st, &headers) {
        return r;
    }
    let params = query_pairs(uri.query().unwrap_or(""));
    let get = |k: &str| params.iter().find(|(p, _)| p == k).map(|(_, v)| v.clone());
    let Some(id) = get("_getpages") else {
        return outcome(400, "Invalid request: This is the base URL of a FHIR server. Unable to handle this request, as it does not contain a resource type or operation name.");
    };
    let offset: usize = get("_getpagesoffset")
        .and_then(|o| o.parse().ok())
        .unwrap_or(0);
    let count: usize = get("_count")
        .and_then(|o| o.parse().ok())
        .unwrap_or(PAGE_DEFAULT)
        .clamp(1, PAGE_MAX);
    let base = base(&st, &headers);
    let Some(all) = st.search_pages.get(&id) else {
        return outcome(
            410,
            &format!("Search ID \"{id}\" does not exist and may have expired"),
        );
    };
    let page: Vec<Value> = all.iter().skip(offset).take(count).cloned().collect();
    let total = all.len();
    let mut bundle = json!({
        "resourceType": "Bundle", "id": id, "type": "searchset", "total": total,
        "link": [{"relation": "self", "url": format!("{base}?{}", uri.query().unwrap_or(""))}],
        "entry": page,
    });
    if offset + count < total {
        push_next(&mut bundle, &base, &id, offset + count, count);
    }
    fhir_json(StatusCode::OK, &bundle, None)
}
