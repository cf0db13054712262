//! REST v1 (`/openmrs/ws/rest/v1/…`): create with a client uuid, read, update
//! metadata, void/retire, the `module`, `systemsetting` and `session` endpoints, and
//! OpenMRS REST's error shapes.
//!
//! Upstream: openmrs-module-webservices.rest (`omod-common/.../resource/impl/DelegatingCrudResource.java`
//! and `BaseDelegatingResource.java` (`buildCreatableProperties`, `getProperty`),
//! `omod-common/.../v1_0/controller/BaseRestController.java`, `omod-common/.../web/RestUtil.java`
//! (`wrapErrorResponse`, `wrapValidationErrorResponse`), `omod-common/.../web/filter/AuthorizationFilter.java`,
//! `omod-common/.../web/api/impl/RestServiceImpl.java` (`getResourceByName`),
//! `omod/.../openmrs1_8/PatientResource1_8.java`, `ModuleResource1_8.java`,
//! `openmrs1_9/SystemSettingResource1_9.java`, `controller/openmrs1_9/SessionController1_9.java`).

// Helpers return the finished HTTP answer as their error, as axum handlers do;
// its size does not matter on a test server.
#![allow(clippy::result_large_err)]

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::model::{is_visit, new_uuid, Login, SimState};
use super::{enter, lock, Shared};

fn rest_json(status: u16, v: Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json;charset=UTF-8")],
        v.to_string(),
    )
        .into_response()
}

/// `RestUtil.wrapErrorResponse`: `{"error": {"message": "<reason> [<message>]", …}}`.
fn error(status: u16, reason: &str, message: &str) -> Response {
    let text = if reason.is_empty() {
        format!("[{message}]")
    } else {
        format!("{reason} [{message}]")
    };
    rest_json(
        status,
        json!({"error": {"message": text, "code": "org.openmrs.module.webservices.rest.web.RestUtil:1", "detail": "", "rawMessage": message, "translatedMessage": message}}),
    )
}

/// `RestUtil.wrapValidationErrorResponse` (400): the useful part is in
/// `globalErrors` and `fieldErrors`, under `"message": "Invalid Submission"`.
fn invalid(global: &[&str], fields: &[(&str, &str)]) -> Response {
    let globals: Vec<Value> = global
        .iter()
        .map(|m| json!({"code": "error.general", "message": m}))
        .collect();
    let mut f = Map::new();
    for (field, m) in fields {
        if let Some(a) = f
            .entry(field.to_string())
            .or_insert_with(|| json!([]))
            .as_array_mut()
        {
            a.push(json!({"code": "error.null", "message": m}));
        }
    }
    rest_json(
        400,
        json!({"error": {"message": "Invalid Submission", "code": "webservices.rest.error.invalid.submission", "globalErrors": globals, "fieldErrors": f}}),
    )
}

/// A conversion failure (`ConversionException`, 400), e.g. a required property
/// absent from the body.
fn missing(props: &[&str]) -> Response {
    error(
        400,
        "",
        &format!("Some required properties are missing: {}", props.join(", ")),
    )
}

/// `BaseRestController.apiAuthenticationExceptionHandler`: not logged in → 401 with
/// `WWW-Authenticate`; logged in without the privilege → 403. The
/// `AuthorizationFilter` never stops a request whose Basic credentials fail — the
/// request simply runs unauthenticated and meets this.
fn need(st: &SimState, user: &Option<String>, privilege: Option<&str>) -> Result<(), Response> {
    let Some(u) = user else {
        let mut r = error(
            401,
            "User is not logged in",
            "Privileges required: authenticated user",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"OpenMRS at /ws/rest\""),
        );
        return Err(r);
    };
    match privilege {
        Some(p) if !st.account(u).is_some_and(|a| a.has(p)) => Err(error(
            403,
            "User is logged in but doesn't have the relevant privilege",
            &format!("Privileges required: {p}"),
        )),
        _ => Ok(()),
    }
}

fn who(st: &mut SimState, headers: &HeaderMap) -> Option<String> {
    match st.login(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok()),
    ) {
        Login::Ok(u) => Some(u),
        _ => None,
    }
}

/// What stands behind a REST resource name. Names are looked up exactly
/// (`RestServiceImpl.getResourceByName` is a HashMap): `Patient` is not `patient`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    /// A record FHIR2 also serves (kind), and the noun of its privileges.
    Fhir(&'static str, &'static str),
    /// Metadata only REST carries, kept as `openmrs:<resource>`.
    Meta(Option<&'static str>),
    Module,
    SystemSetting,
}

fn backing(resource: &str) -> Option<Backing> {
    Some(match resource {
        "person" => Backing::Fhir("Person", "People"),
        "patient" => Backing::Fhir("Patient", "Patients"),
        "encounter" => Backing::Fhir("Encounter", "Encounters"),
        "visit" => Backing::Fhir("Encounter", "Visits"),
        "obs" => Backing::Fhir("Observation", "Observations"),
        "location" => Backing::Fhir("Location", "Locations"),
        "concept" => Backing::Meta(Some("Concepts")),
        "form" => Backing::Meta(Some("Forms")),
        "encountertype" => Backing::Meta(Some("Encounter Types")),
        "visittype" => Backing::Meta(Some("Visit Types")),
        "provider" => Backing::Meta(Some("Providers")),
        "drug"
        | "conceptclass"
        | "conceptdatatype"
        | "conceptsource"
        | "conceptmaptype"
        | "conceptreferenceterm" => Backing::Meta(Some("Concepts")),
        "patientidentifiertype"
        | "personattributetype"
        | "locationtag"
        | "relationshiptype"
        | "encounterrole"
        | "program"
        | "ordertype"
        | "caresetting"
        | "orderfrequency"
        | "privilege"
        | "role"
        | "user"
        | "relationship"
        | "cohort"
        | "programenrollment" => Backing::Meta(None),
        "module" => Backing::Module,
        "systemsetting" => Backing::SystemSetting,
        _ => return None,
    })
}

fn unknown_resource(resource: &str) -> Response {
    error(
        404,
        "Resource does not exist. Please check documentation for implemented resources and their paths",
        &format!("Unknown resource: v1/{resource}"),
    )
}

fn not_found() -> Response {
    error(404, "Object with given uuid doesn't exist", "null")
}

fn query_param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| {
            v.replace("%3A", ":")
                .replace("%2C", ",")
                .replace("%28", "(")
                .replace("%29", ")")
        })
    })
}

fn host_base(headers: &HeaderMap) -> String {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}/openmrs/ws/rest/v1")
}

/// The global properties this server has, as `systemsetting` shows them.
fn settings(st: &SimState) -> Vec<(String, Option<String>, &'static str)> {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    vec![
        (
            "fhir2.upsert.supported.resources".into(),
            opt(&st.upsert_resources),
            "Comma-separated list of resource names for which a new item is created if it does not exist when processing an update request.",
        ),
        (
            "fhir2.uriPrefix".into(),
            st.fhir_uri_prefix.clone(),
            "Prefix for the FHIR server in case this cannot be automatically detected",
        ),
        ("fhir2.paging.default".into(), Some("10".into()), "Set default page size"),
        ("fhir2.paging.maximum".into(), Some("100".into()), "Set maximum page size"),
        (
            "webservices.rest.uriPrefix".into(),
            st.uri_prefix.clone(),
            "The URI prefix through which clients consuming web services will connect to the web application",
        ),
        (
            "security.allowedFailedLoginsBeforeLockout".into(),
            Some(st.allowed_failed_logins.to_string()),
            "Maximum number of failed logins allowed after which username is locked out",
        ),
    ]
}

fn setting_rep(p: &str, v: &Option<String>, d: &str) -> Value {
    json!({"uuid": format!("gp-{p}"), "property": p, "value": v, "description": d,
           "display": format!("{p} = {}", v.as_deref().unwrap_or("null"))})
}

fn module_rep(m: &super::model::Module) -> Value {
    json!({"uuid": m.id, "display": m.name, "name": m.name, "description": m.name,
           "packageName": format!("org.openmrs.module.{}", m.id), "author": "OpenMRS",
           "version": m.version, "started": m.started, "startupErrorMessage": null})
}

/// `GET /openmrs/ws/rest/v1/session`: open to anyone; the user, with roles and
/// privileges (`SessionController1_9.USER_CUSTOM_REP`), once authenticated.
pub(super) async fn session(State(s): State<Shared>, headers: HeaderMap) -> Response {
    enter(&s).await;
    let mut st = lock(&s);
    let user = who(&mut st, &headers);
    let mut out = json!({"sessionId": new_uuid(), "authenticated": user.is_some()});
    if let Some(u) = user.as_deref().and_then(|u| st.account(u).map(|a| (u, a))) {
        let (name, a) = u;
        out["user"] = json!({
            "uuid": format!("user-{name}"), "display": name, "username": name, "systemId": name,
            "privileges": a.privileges.iter().map(|p| json!({"uuid": format!("priv-{p}"), "display": p, "name": p})).collect::<Vec<_>>(),
            "roles": a.roles.iter().map(|r| json!({"uuid": format!("role-{r}"), "display": r, "name": r})).collect::<Vec<_>>(),
        });
    }
    rest_json(200, out)
}

/// `GET|POST /openmrs/ws/rest/v1/<resource>`.
pub(super) async fn collection(
    State(s): State<Shared>,
    headers: HeaderMap,
    method: Method,
    Path(resource): Path<String>,
    uri: Uri,
    body: Bytes,
) -> Response {
    enter(&s).await;
    let mut st = lock(&s);
    let user = who(&mut st, &headers);
    let Some(b) = backing(&resource) else {
        return unknown_resource(&resource);
    };
    match (method, b) {
        (Method::GET, Backing::Module) => {
            // ModuleFactoryWrapper.checkReadonlyPrivilege: any authenticated user.
            if let Err(r) = need(&st, &user, None) {
                return r;
            }
            let results: Vec<Value> = st.modules.iter().map(module_rep).collect();
            rest_json(200, json!({"results": results}))
        }
        (Method::GET, Backing::SystemSetting) => {
            if let Err(r) = need(&st, &user, Some("Get Global Properties")) {
                return r;
            }
            // SystemSettingResource1_9.doSearch: getGlobalPropertiesByPrefix(q).
            let q = query_param(&uri, "q").unwrap_or_default();
            let results: Vec<Value> = settings(&st)
                .iter()
                .filter(|(p, _, _)| p.starts_with(&q))
                .map(|(p, v, d)| setting_rep(p, v, d))
                .collect();
            rest_json(200, json!({"results": results}))
        }
        (Method::GET, Backing::Fhir(kind, noun)) => {
            if let Err(r) = need(&st, &user, Some(&format!("Get {noun}"))) {
                return r;
            }
            let base = host_base(&headers);
            let mut results = Vec::new();
            for id in st.ids(kind) {
                let r = st
                    .get(kind, &id)
                    .map(|r| r.body.clone())
                    .unwrap_or(Value::Null);
                if (resource == "visit") != is_visit(&r) && kind == "Encounter" {
                    continue;
                }
                if resource == "obs" {
                    let want = |p: &str, field: &str| {
                        query_param(&uri, p).map_or(true, |v| {
                            reference_id(&r, field).as_deref() == Some(v.as_str())
                                || (field == "code"
                                    && concept_of(&r).as_deref() == Some(v.as_str()))
                        })
                    };
                    if !(want("patient", "subject")
                        && want("concept", "code")
                        && want("encounter", "encounter"))
                    {
                        continue;
                    }
                }
                results.push(fhir_backed_rep(&st, &resource, kind, &id, None, &base));
            }
            rest_json(200, json!({"results": results}))
        }
        (Method::GET, Backing::Meta(noun)) => {
            if let Err(r) = need(&st, &user, noun.map(|n| format!("Get {n}")).as_deref()) {
                return r;
            }
            let kind = format!("openmrs:{resource}");
            let results: Vec<Value> = st
                .ids(&kind)
                .iter()
                .map(|id| json!({"uuid": id, "display": id}))
                .collect();
            rest_json(200, json!({"results": results}))
        }
        (Method::POST, Backing::Fhir(kind, noun)) => {
            let verb = if kind == "Location" { "Manage" } else { "Add" };
            if let Err(r) = need(&st, &user, Some(&format!("{verb} {noun}"))) {
                return r;
            }
            let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                return error(400, "", "Could not read JSON: invalid body");
            };
            create_fhir_backed(&mut st, &resource, kind, v, &headers)
        }
        (Method::POST, Backing::Meta(noun)) => {
            if let Err(r) = need(&st, &user, noun.map(|n| format!("Manage {n}")).as_deref()) {
                return r;
            }
            let Ok(mut v) = serde_json::from_slice::<Value>(&body) else {
                return error(400, "", "Could not read JSON: invalid body");
            };
            if let Some(r) = read_only(&v) {
                return r;
            }
            // buildCreatableProperties: a `uuid` in the body is kept.
            let uuid = v
                .get("uuid")
                .and_then(|u| u.as_str())
                .map(str::to_string)
                .unwrap_or_else(new_uuid);
            let kind = format!("openmrs:{resource}");
            if let Some((code, msg)) = st.refusal(&kind, &uuid) {
                return refused(code, &msg);
            }
            if st.get(&kind, &uuid).is_some() {
                return duplicate(&uuid);
            }
            let retire = v.get("retired").and_then(|r| r.as_bool()) == Some(true);
            if let Some(o) = v.as_object_mut() {
                o.remove("uuid");
                o.remove("retired");
            }
            st.create(&kind, &uuid, v);
            if retire {
                st.void(&kind, &uuid);
            }
            rest_json(201, json!({"uuid": uuid, "display": uuid}))
        }
        _ => error(405, "", "Request method not supported"),
    }
}

/// A uuid already in the table: the database's unique constraint, which REST
/// reports as a 500 (`BaseRestController.handleException`).
fn duplicate(uuid: &str) -> Response {
    error(
        500,
        "",
        &format!("could not execute statement; Duplicate entry '{uuid}' for key 'uuid'"),
    )
}

/// `setConvertedProperties`: a property the resource does not let one set is a
/// `ConversionException` (400) — the ones REST only shows, at least.
fn read_only(v: &Value) -> Option<Response> {
    let bad: Vec<&str> = ["display", "links", "auditInfo", "resourceVersion"]
        .into_iter()
        .filter(|k| v.get(*k).is_some())
        .collect();
    (!bad.is_empty()).then(|| {
        error(
            400,
            "",
            &format!(
                "Some properties are not allowed to be set: {}",
                bad.join(", ")
            ),
        )
    })
}

fn refused(code: u16, msg: &str) -> Response {
    if code == 400 {
        invalid(&[msg], &[])
    } else {
        error(code, "", msg)
    }
}

fn reference_id(body: &Value, field: &str) -> Option<String> {
    body.get(field)?
        .get("reference")?
        .as_str()?
        .rsplit('/')
        .next()
        .map(str::to_string)
}

fn concept_of(body: &Value) -> Option<String> {
    body.get("code")?
        .get("coding")?
        .as_array()?
        .iter()
        .find_map(|c| {
            if c.get("system").is_none() {
                c.get("code")?.as_str().map(str::to_string)
            } else {
                None
            }
        })
}

fn s<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(|x| x.as_str()).filter(|x| !x.is_empty())
}

/// A reference property: a uuid string or an object with `uuid`.
fn uuid_prop(v: &Value, k: &str) -> Option<String> {
    match v.get(k)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Object(o) => o.get("uuid")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn gender(g: &str) -> &'static str {
    match g {
        "M" => "male",
        "F" => "female",
        "O" => "other",
        _ => "unknown",
    }
}

/// A REST person body as FHIR2 would render the person.
fn person_fhir(v: &Value) -> Result<Value, Response> {
    let mut absent = Vec::new();
    if v.get("names").is_none() {
        absent.push("names");
    }
    if v.get("gender").is_none() {
        absent.push("gender");
    }
    if !absent.is_empty() {
        return Err(missing(&absent));
    }
    let names: Vec<Value> = v["names"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            let mut given = vec![];
            for k in ["givenName", "middleName"] {
                if let Some(x) = s(n, k) {
                    given.push(Value::from(x));
                }
            }
            json!({"id": s(n, "uuid").map(str::to_string).unwrap_or_else(new_uuid),
                   "given": given, "family": s(n, "familyName")})
        })
        .collect();
    if names.is_empty() {
        return Err(invalid(
            &[],
            &[("names", "Person should have at least one non-voided name")],
        ));
    }
    if names
        .iter()
        .any(|n| n["family"].is_null() || n["given"].as_array().map_or(true, |g| g.is_empty()))
    {
        return Err(invalid(
            &[],
            &[("names[0].givenName", "Cannot be empty or null")],
        ));
    }
    let g = s(v, "gender").unwrap_or("");
    if !["M", "F", "O", "U"].contains(&g) {
        return Err(invalid(&[], &[("gender", "Gender is required")]));
    }
    let mut p = json!({"resourceType": "Person", "name": names, "gender": gender(g)});
    if let Some(b) = s(v, "birthdate") {
        p["birthDate"] = b.chars().take(10).collect::<String>().into();
    }
    let addresses: Vec<Value> = v
        .get("addresses")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
        .map(|a| {
            let mut out = json!({"id": s(a, "uuid").map(str::to_string).unwrap_or_else(new_uuid)});
            for (from, to) in [
                ("cityVillage", "city"),
                ("countyDistrict", "district"),
                ("stateProvince", "state"),
                ("country", "country"),
                ("postalCode", "postalCode"),
            ] {
                if let Some(x) = s(a, from) {
                    out[to] = x.into();
                }
            }
            if let Some(x) = s(a, "address1") {
                out["line"] = json!([x]);
            }
            out
        })
        .collect();
    if !addresses.is_empty() {
        p["address"] = addresses.into();
    }
    Ok(p)
}

/// Creates a record REST v1 and FHIR2 both show. `uuid` in the body is kept
/// (`BaseDelegatingResource.buildCreatableProperties`); a patient is made from an
/// existing person and takes that person's uuid (`PatientResource1_8.getPatient`).
fn create_fhir_backed(
    st: &mut SimState,
    resource: &str,
    kind: &'static str,
    v: Value,
    headers: &HeaderMap,
) -> Response {
    let uuid = match resource {
        "patient" => match &v.get("person") {
            Some(Value::String(p)) => p.clone(),
            Some(Value::Object(o)) => o
                .get("uuid")
                .and_then(|u| u.as_str())
                .map(str::to_string)
                .unwrap_or_else(new_uuid),
            _ => return error(400, "", "The person property is missing"),
        },
        _ => s(&v, "uuid").map(str::to_string).unwrap_or_else(new_uuid),
    };
    if let Some((code, msg)) = st.refusal(kind, &uuid) {
        return refused(code, &msg);
    }
    let body = match resource {
        "person" => match person_fhir(&v) {
            Ok(p) => p,
            Err(r) => return r,
        },
        "patient" => {
            let person = match v.get("person") {
                Some(Value::Object(_)) => match person_fhir(&v["person"]) {
                    Ok(p) => Some(p),
                    Err(r) => return r,
                },
                _ => st.get("Person", &uuid).map(|r| r.body.clone()),
            };
            let Some(mut p) = person else {
                return invalid(&[], &[("person", "Cannot be empty or null")]);
            };
            if st.get("Patient", &uuid).is_some() {
                return duplicate(&uuid);
            }
            let Some(ids) = v.get("identifiers").and_then(|i| i.as_array()) else {
                return missing(&["identifiers"]);
            };
            let mut out = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                let Some(value) = s(id, "identifier") else {
                    return invalid(
                        &[],
                        &[(
                            &format!("identifiers[{i}].identifier"),
                            "Cannot be empty or null",
                        )],
                    );
                };
                let Some(t) = uuid_prop(id, "identifierType") else {
                    return invalid(
                        &[],
                        &[(
                            &format!("identifiers[{i}].identifierType"),
                            "Cannot be empty or null",
                        )],
                    );
                };
                // PatientServiceImpl: the first identifier is preferred if none is.
                let preferred = id
                    .get("preferred")
                    .and_then(|p| p.as_bool())
                    .unwrap_or(i == 0);
                let mut e = json!({"id": s(id, "uuid").map(str::to_string).unwrap_or_else(new_uuid),
                    "use": if preferred { "official" } else { "usual" }, "value": value,
                    "type": {"coding": [{"code": t}]}});
                if let Some(l) = uuid_prop(id, "location") {
                    e["extension"] = json!([{"url": "http://fhir.openmrs.org/ext/patient/identifier#location",
                        "valueReference": {"reference": format!("Location/{l}"), "type": "Location"}}]);
                }
                out.push(e);
            }
            if out.is_empty() {
                return invalid(&["Patient is missing a preferred identifier"], &[]);
            }
            p["resourceType"] = "Patient".into();
            p["active"] = true.into();
            p["identifier"] = out.into();
            p
        }
        "encounter" | "visit" => {
            let (type_prop, system, when_prop) = if resource == "visit" {
                (
                    "visitType",
                    "http://fhir.openmrs.org/code-system/visit-type",
                    "startDatetime",
                )
            } else {
                (
                    "encounterType",
                    "http://fhir.openmrs.org/code-system/encounter-type",
                    "encounterDatetime",
                )
            };
            let mut absent = Vec::new();
            if v.get("patient").is_none() {
                absent.push("patient");
            }
            if v.get(type_prop).is_none() {
                absent.push(type_prop);
            }
            if !absent.is_empty() {
                return missing(&absent);
            }
            // ConversionUtil.convert: an unknown uuid converts to null, and the
            // validator then finds no patient.
            let patient = uuid_prop(&v, "patient").unwrap_or_default();
            if !st.live("Patient", &patient) {
                return invalid(&[], &[("patient", "Patient is required")]);
            }
            let Some(t) = uuid_prop(&v, type_prop) else {
                return invalid(&[], &[(type_prop, "Cannot be empty or null")]);
            };
            let mut e = json!({"resourceType": "Encounter", "status": "unknown",
                "type": [{"coding": [{"system": system, "code": t}]}],
                "subject": {"reference": format!("Patient/{patient}"), "type": "Patient"},
                "period": {"start": s(&v, when_prop).map(str::to_string).unwrap_or_else(|| super::model::instant(crate::time::wall_ms()))}});
            if let Some(l) = uuid_prop(&v, "location") {
                e["location"] = json!([{"location": {"reference": format!("Location/{l}"), "type": "Location"}}]);
            }
            if let Some(vis) = uuid_prop(&v, "visit") {
                e["partOf"] = json!({"reference": format!("Encounter/{vis}"), "type": "Encounter"});
            }
            if resource == "visit" {
                e["meta"] = json!({"tag": [{"system": "http://fhir.openmrs.org/ext/encounter-tag", "code": "visit", "display": "Visit"}]});
            }
            e
        }
        "obs" => {
            let mut absent = Vec::new();
            for p in ["person", "concept", "obsDatetime"] {
                if v.get(p).is_none() {
                    absent.push(p);
                }
            }
            if !absent.is_empty() {
                return missing(&absent);
            }
            let person = uuid_prop(&v, "person").unwrap_or_default();
            if !st.live("Patient", &person) && !st.live("Person", &person) {
                return invalid(&[], &[("person", "Person is required")]);
            }
            let concept = uuid_prop(&v, "concept").unwrap_or_default();
            let status = s(&v, "status").unwrap_or("FINAL").to_ascii_lowercase();
            let mut o = json!({"resourceType": "Observation", "status": status,
                "code": {"coding": [{"code": concept}]},
                "subject": {"reference": format!("Patient/{person}"), "type": "Patient"},
                "effectiveDateTime": s(&v, "obsDatetime")});
            if let Some(e) = uuid_prop(&v, "encounter") {
                o["encounter"] =
                    json!({"reference": format!("Encounter/{e}"), "type": "Encounter"});
            }
            match v.get("value") {
                Some(Value::Number(n)) => o["valueQuantity"] = json!({"value": n}),
                Some(Value::Bool(b)) => o["valueBoolean"] = (*b).into(),
                Some(Value::String(x)) => o["valueString"] = x.clone().into(),
                Some(Value::Object(c)) => {
                    if let Some(u) = c.get("uuid") {
                        o["valueCodeableConcept"] = json!({"coding": [{"code": u}]});
                    }
                }
                _ => {}
            }
            if let Some(c) = s(&v, "comment") {
                o["note"] = json!([{"text": c}]);
            }
            o
        }
        "location" => {
            let Some(name) = s(&v, "name") else {
                return missing(&["name"]);
            };
            let mut l = json!({"resourceType": "Location", "name": name, "status": "active"});
            if let Some(d) = s(&v, "description") {
                l["description"] = d.into();
            }
            if let Some(p) = uuid_prop(&v, "parentLocation") {
                l["partOf"] = json!({"reference": format!("Location/{p}"), "type": "Location"});
            }
            l
        }
        _ => return error(500, "", "not simulated"),
    };
    if resource != "patient" && st.get(kind, &uuid).is_some() {
        return duplicate(&uuid);
    }
    st.create(kind, &uuid, body);
    let base = host_base(headers);
    rest_json(201, fhir_backed_rep(st, resource, kind, &uuid, None, &base))
}

/// A REST representation of a FHIR-backed record: `uuid`, `display`, `voided`,
/// `links`, and for obs its concept, person, encounter, status and value. A custom
/// representation (`v=custom:(uuid,previousVersion:(uuid))`) lists properties;
/// `BaseDelegatingResource.getProperty` falls back to the bean's getter, so an
/// obs's `previousVersion` is readable that way on any REST version.
fn fhir_backed_rep(
    st: &SimState,
    resource: &str,
    kind: &str,
    id: &str,
    custom: Option<&str>,
    base: &str,
) -> Value {
    let Some(r) = st.get(kind, id) else {
        return Value::Null;
    };
    let display = r
        .body
        .get("name")
        .and_then(|n| {
            n.as_str().map(str::to_string).or_else(|| {
                n.get(0)
                    .and_then(|n| n.get("family"))
                    .and_then(|f| f.as_str())
                    .map(str::to_string)
            })
        })
        .unwrap_or_else(|| id.to_string());
    let mut full = json!({"uuid": id, "display": display,
        "links": [{"rel": "self", "uri": format!("{base}/{resource}/{id}")}]});
    if kind == "Location" {
        full["retired"] = r.gone.into();
    } else {
        full["voided"] = r.gone.into();
    }
    if kind == "Observation" {
        full["status"] = r
            .body
            .get("status")
            .and_then(|x| x.as_str())
            .unwrap_or("final")
            .to_ascii_uppercase()
            .into();
        full["concept"] = json!({"uuid": concept_of(&r.body)});
        full["person"] = json!({"uuid": reference_id(&r.body, "subject")});
        full["encounter"] = reference_id(&r.body, "encounter")
            .map(|e| json!({"uuid": e}))
            .unwrap_or(Value::Null);
        full["obsDatetime"] = r
            .body
            .get("effectiveDateTime")
            .cloned()
            .unwrap_or(Value::Null);
        full["previousVersion"] = r
            .previous
            .as_ref()
            .map(|p| json!({"uuid": p}))
            .unwrap_or(Value::Null);
    }
    let Some(spec) = custom else {
        if let Some(o) = full.as_object_mut() {
            o.remove("previousVersion");
        }
        return full;
    };
    let mut out = Map::new();
    for prop in split_props(spec) {
        let name = prop.split(':').next().unwrap_or("").trim().to_string();
        out.insert(
            name.clone(),
            full.get(&name).cloned().unwrap_or(Value::Null),
        );
    }
    Value::Object(out)
}

/// The top-level properties of `(a,b:(c,d),e)`.
fn split_props(spec: &str) -> Vec<String> {
    let inner = spec.trim().trim_start_matches('(').trim_end_matches(')');
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in inner.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `GET|POST|DELETE /openmrs/ws/rest/v1/<resource>/<uuid>`.
pub(super) async fn one(
    State(s): State<Shared>,
    headers: HeaderMap,
    method: Method,
    Path((resource, uuid)): Path<(String, String)>,
    uri: Uri,
    body: Bytes,
) -> Response {
    enter(&s).await;
    let mut st = lock(&s);
    let user = who(&mut st, &headers);
    let Some(b) = backing(&resource) else {
        return unknown_resource(&resource);
    };
    let base = host_base(&headers);
    match (method, b) {
        (Method::GET, Backing::Module) => {
            if let Err(r) = need(&st, &user, None) {
                return r;
            }
            match st.modules.iter().find(|m| m.id == uuid) {
                Some(m) => rest_json(200, module_rep(m)),
                None => not_found(),
            }
        }
        (Method::GET, Backing::SystemSetting) => {
            if let Err(r) = need(&st, &user, Some("Get Global Properties")) {
                return r;
            }
            // getByUniqueId: by uuid, else by property name.
            match settings(&st)
                .iter()
                .find(|(p, _, _)| *p == uuid || format!("gp-{p}") == uuid)
            {
                Some((p, v, d)) => rest_json(200, setting_rep(p, v, d)),
                None => not_found(),
            }
        }
        (Method::GET, Backing::Fhir(kind, noun)) => {
            if let Err(r) = need(&st, &user, Some(&format!("Get {noun}"))) {
                return r;
            }
            let custom =
                query_param(&uri, "v").and_then(|v| v.strip_prefix("custom:").map(str::to_string));
            if st.get(kind, &uuid).is_none() {
                return not_found();
            }
            rest_json(
                200,
                fhir_backed_rep(&st, &resource, kind, &uuid, custom.as_deref(), &base),
            )
        }
        (Method::GET, Backing::Meta(noun)) => {
            if let Err(r) = need(&st, &user, noun.map(|n| format!("Get {n}")).as_deref()) {
                return r;
            }
            let kind = format!("openmrs:{resource}");
            match st.get(&kind, &uuid) {
                None => not_found(),
                Some(r) => {
                    let mut v = r.body.clone();
                    if let Some(o) = v.as_object_mut() {
                        o.remove("resourceType");
                        o.remove("id");
                        o.insert("uuid".into(), uuid.clone().into());
                        o.insert("retired".into(), r.gone.into());
                        o.insert(
                            "links".into(),
                            json!([{"rel": "self", "uri": format!("{base}/{resource}/{uuid}")}]),
                        );
                    }
                    rest_json(200, v)
                }
            }
        }
        (Method::POST, Backing::Meta(noun)) => {
            if let Err(r) = need(&st, &user, noun.map(|n| format!("Manage {n}")).as_deref()) {
                return r;
            }
            let kind = format!("openmrs:{resource}");
            if st.get(&kind, &uuid).is_none() {
                return not_found();
            }
            if let Some((code, msg)) = st.refusal(&kind, &uuid) {
                return refused(code, &msg);
            }
            let Ok(mut v) = serde_json::from_slice::<Value>(&body) else {
                return error(400, "", "Could not read JSON: invalid body");
            };
            if let Some(r) = read_only(&v) {
                return r;
            }
            let retire = v.get("retired").and_then(|r| r.as_bool());
            if let Some(o) = v.as_object_mut() {
                o.remove("retired");
                o.remove("uuid");
            }
            st.update(&kind, &uuid, v);
            match retire {
                Some(true) => {
                    st.void(&kind, &uuid);
                }
                Some(false) => {
                    st.unvoid(&kind, &uuid);
                }
                None => {}
            }
            rest_json(200, json!({"uuid": uuid}))
        }
        (Method::DELETE, b) => {
            let (kind, privilege) = match b {
                Backing::Fhir(k, n) => (k.to_string(), Some(format!("Delete {n}"))),
                Backing::Meta(n) => (
                    format!("openmrs:{resource}"),
                    n.map(|n| format!("Manage {n}")),
                ),
                _ => return error(405, "", "Request method not supported"),
            };
            if let Err(r) = need(&st, &user, privilege.as_deref()) {
                return r;
            }
            if query_param(&uri, "purge").as_deref() == Some("true") {
                return match st.resources.remove(&(kind, uuid)) {
                    Some(_) => StatusCode::NO_CONTENT.into_response(),
                    None => not_found(),
                };
            }
            if st.void(&kind, &uuid) {
                StatusCode::NO_CONTENT.into_response()
            } else {
                not_found()
            }
        }
        (Method::POST, Backing::Fhir(..)) => error(
            500,
            "",
            "updating this resource through REST is not simulated",
        ),
        _ => error(405, "", "Request method not supported"),
    }
}
