//! A simulator of an OpenMRS server, for tests and demos (OpenMRS itself cannot
//! run here). It is built from OpenMRS's own code, not from expectations: every
//! behaviour below names the upstream file it mirrors (next to the code that does
//! it), and a test in this module pins it over real HTTP.
//!
//! Defaults are OpenMRS's defaults:
//! - **Feeds** (`feed`): openmrs-module-atomfeed with its shipped
//!   `defaultAtomfeedConfig.json` — categories `patient`, `person`, `person_name`,
//!   `person_address`, `patient_identifier`, `person_attribute`, `encounter`,
//!   `visit`, `observation`, `allergy`, `drug_order`, `test_order`, `location`,
//!   `form`, `cohort`, `privilege` on; `concept`, `provider`, `visittype`, `drug`,
//!   `order`, `user`, `program` off. Content is `{"rest": "/ws/rest/v1/…", "fhir":
//!   "/ws/fhir/<Type>/{uuid}"}` (the old FHIR module, context path not included).
//!   Events come from the Hibernate interceptor: one per object and action in a
//!   transaction (CREATED, UPDATED, and for a void UPDATED + VOIDED); an edited name,
//!   address, identifier or attribute is an event of that object alone
//!   (`/ws/rest/v1/person/<person>/name/<uuid>`), with no `patient` event. Pages of
//!   5 (`chunking_history`), `recent` is the last page, links `self`, `via`,
//!   `next-archive`, `prev-archive` are absolute URLs made from the request's host,
//!   `X-Forwarded-Proto` or `webservices.rest.uriPrefix`; a page that does not exist
//!   answers 500. Feeds need no credentials (no authentication filter covers
//!   `/ws/atomfeed`). No configuration announces Condition, diagnoses or
//!   MedicationDispense.
//! - **FHIR2** (`fhir2`): POST drops the client's id and assigns a new uuid; PUT of an
//!   unknown id is 404 "Resource of type … with ID … is not known" unless the
//!   provider can upsert (Location, Medication, Practitioner, Task) and the type is
//!   listed in `fhir2.upsert.supported.resources` (empty); updating an Observation
//!   voids it and creates a new obs with a new uuid (status amended, previous
//!   version recorded); every response carries a generated `text` narrative naming
//!   this server's URLs; search by `_lastUpdated` in pages of 10 (at most 100) with
//!   `next` links; no `_history`. Bad or missing credentials: 401 with the servlet
//!   container's HTML page. A missing privilege: 500 (HAPI wraps OpenMRS's
//!   exception).
//! - **REST v1** (`rest`): create keeps a client `uuid`; a patient is made from an
//!   existing person and takes its uuid; resource names are case-sensitive;
//!   validation errors are `{"error": {"message": "Invalid Submission",
//!   "globalErrors": […], "fieldErrors": {…}}}`; bad credentials: 401 JSON with
//!   `WWW-Authenticate`, a missing privilege 403; `module`, `systemsetting`,
//!   `session` answer as OpenMRS's do; an obs's `previousVersion` is readable with a
//!   custom representation.
//! - **Accounts**: a wrong password counts toward a lockout after 7 failures, and
//!   every attempt while locked restarts the 5-minute lock (openmrs-core).
//!
//! Levers for the other configurations: [`FeedStyle::Fhir2`] link templates,
//! [`FeedStyle::Bahmni`]'s feeds, categories switched on or off, upsert enabled,
//! `webservices.rest.uriPrefix` naming a proxy host, one category failing, events
//! held in the publisher's queue, accounts and privileges, clock skew; and faults:
//! refusals of one record, hangs, garbage feeds, broken archive chains, non-JSON
//! FHIR answers.
//!
//! Not simulated: OpenMRS's business rules beyond "an encounter or obs needs its
//! patient" and REST's required properties (metadata a record names need not
//! exist), searches other than those listed, REST sub-resource reads, concept
//! mappings in FHIR codings, and the 2 s delay of the event publisher task unless
//! `hold_events` is set (tests publish by hand instead of waiting).

mod feed;
mod fhir2;
mod model;
mod rest;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::Value;

pub use feed::FeedStyle;
pub use model::{Account, Module, SimState};

type Shared = Arc<Mutex<SimState>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, SimState> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every request: counted, and held for `hang_ms` (a hung server).
async fn enter(s: &Shared) {
    let hang = {
        let mut st = lock(s);
        st.requests += 1;
        st.hang_ms
    };
    if hang > 0 {
        tokio::time::sleep(Duration::from_millis(hang)).await;
    }
}

/// `GET /openmrs/ws/atomfeed/<category>/recent|<n>`: openmrs-module-atomfeed's
/// `AtomfeedController`, which no authentication filter covers.
async fn atom(
    State(s): State<Shared>,
    headers: HeaderMap,
    axum::extract::Path((category, page)): axum::extract::Path<(String, String)>,
    uri: axum::http::Uri,
) -> Response {
    enter(&s).await;
    let st = lock(&s);
    if st.garbage_feed {
        return (
            StatusCode::OK,
            "<html><body><h1>502 Proxy Error</h1></body>",
        )
            .into_response();
    }
    if st.fail_category.as_deref() == Some(category.as_str()) {
        return fhir2::container_error(500, "Unexpected error");
    }
    let n = if page == "recent" {
        None
    } else {
        match page.parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => return fhir2::container_error(400, "Bad request"),
        }
    };
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let self_url = feed::request_url(&st, &headers, &path);
    match feed::page(&st, &category, n, &self_url) {
        Ok(xml) => ([(header::CONTENT_TYPE, "application/atom+xml")], xml).into_response(),
        Err((code, msg)) => fhir2::container_error(code, &msg),
    }
}

/// `Thu, 26 Nov 2026 10:00:00 GMT`.
fn http_date(ms: u64) -> String {
    let iso = crate::time::fmt_time(ms);
    let days = ms / 86_400_000;
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][iso[5..7].parse::<usize>().unwrap_or(1).clamp(1, 12) - 1];
    format!(
        "{weekday}, {} {month} {} {} GMT",
        &iso[8..10],
        &iso[0..4],
        &iso[11..19]
    )
}

/// The server's clock in its `Date` header, with the skew lever applied.
async fn date_header(State(s): State<Shared>, mut resp: Response) -> Response {
    let skew = lock(&s).clock_skew_ms;
    let now = (crate::time::wall_ms() as i64 + skew).max(0) as u64;
    if let Ok(v) = http_date(now).parse() {
        resp.headers_mut().insert(header::DATE, v);
    }
    resp
}

/// One event of the feeds, for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimEvent {
    pub category: String,
    pub terms: Vec<String>,
    pub content: String,
}

/// A running simulator on 127.0.0.1.
pub struct OpenMrsSim {
    pub url: String,
    state: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl OpenMrsSim {
    /// Starts a simulator whose superuser account is `user:password`.
    pub fn start(user: &str, password: &str) -> std::io::Result<OpenMrsSim> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let url = format!("http://127.0.0.1:{}", listener.local_addr()?.port());
        let state = Arc::new(Mutex::new(SimState::new(user, password)));
        let app = Router::new()
            .route("/openmrs/ws/atomfeed/{category}/{page}", get(atom))
            .route("/openmrs/ws/fhir2/R4", get(fhir2::system))
            .route("/openmrs/ws/fhir2/R4/", get(fhir2::system))
            .route(
                "/openmrs/ws/fhir2/R4/{kind}",
                get(fhir2::type_level).post(fhir2::type_level),
            )
            .route(
                "/openmrs/ws/fhir2/R4/{kind}/{id}",
                get(fhir2::one).put(fhir2::one).delete(fhir2::one),
            )
            .route("/openmrs/ws/rest/v1/session", get(rest::session))
            .route(
                "/openmrs/ws/rest/v1/{resource}",
                get(rest::collection).post(rest::collection),
            )
            .route(
                "/openmrs/ws/rest/v1/{resource}/{uuid}",
                get(rest::one).post(rest::one).delete(rest::one),
            )
            .layer(axum::middleware::map_response_with_state(
                state.clone(),
                date_header,
            ))
            .with_state(state.clone());
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

    /// A clinician saves a resource in the OpenMRS UI (creates or edits it) and the
    /// uuid OpenMRS now keeps it under: an edited Observation is amended into a new
    /// obs with a new uuid. A resource without an id gets a new uuid.
    pub fn save(&self, resource: Value) -> String {
        let kind = resource["resourceType"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let id = resource["id"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(model::new_uuid);
        self.with(|s| {
            if s.get(&kind, &id).is_some() {
                s.update(&kind, &id, resource)
            } else {
                s.create(&kind, &id, resource);
                id
            }
        })
    }

    /// A clinician corrects a patient's name in the registration app: the
    /// PersonName object changes, nothing else (one `person_name` event).
    pub fn edit_name(&self, patient: &str, given: &str, family: &str) {
        self.with(|s| {
            let Some(mut body) = s.get("Patient", patient).map(|r| r.body.clone()) else {
                return;
            };
            if let Some(n) = body
                .get_mut("name")
                .and_then(|n| n.as_array_mut())
                .and_then(|n| n.first_mut())
            {
                n["given"] = serde_json::json!([given]);
                n["family"] = family.into();
            }
            s.update("Patient", patient, body);
        });
    }

    /// A clinician voids (clinical) or retires (metadata) a record.
    pub fn void(&self, kind: &str, id: &str) {
        self.with(|s| s.void(kind, id));
    }

    /// The record as OpenMRS holds it: `None` if unknown, `Some(None)` if voided.
    pub fn get(&self, kind: &str, id: &str) -> Option<Option<Value>> {
        self.with(|s| s.rendered(kind, id).map(|r| r.ok()))
    }

    /// The live (not voided) records of a kind.
    pub fn ids(&self, kind: &str) -> Vec<String> {
        self.with(|s| s.ids(kind))
    }

    /// The obs an Observation amended (`obs.previous_version`).
    pub fn previous_version(&self, id: &str) -> Option<String> {
        self.with(|s| s.get("Observation", id).and_then(|r| r.previous.clone()))
    }

    /// Every published feed event, oldest first.
    pub fn events(&self) -> Vec<SimEvent> {
        self.with(|s| {
            s.events
                .iter()
                .map(|e| {
                    let mut terms = e.tags.clone();
                    if !terms.contains(&e.category) {
                        terms.push(e.category.clone());
                    }
                    SimEvent {
                        category: e.category.clone(),
                        terms,
                        content: e.content.clone(),
                    }
                })
                .collect()
        })
    }

    /// Writes that came in through the API or the UI.
    pub fn writes(&self) -> u64 {
        self.with(|s| s.writes())
    }

    /// HTTP requests served so far.
    pub fn requests(&self) -> u64 {
        self.with(|s| s.requests)
    }

    /// Loads a feed configuration (from now on; earlier events keep their shape).
    pub fn set_feed_style(&self, style: FeedStyle) {
        self.with(|s| s.feed_style = style);
    }

    /// Switches a feed category on or off in the loaded configuration.
    pub fn set_category(&self, category: &str, enabled: bool) {
        self.with(|s| {
            s.category_override.insert(category.to_string(), enabled);
        });
    }

    /// Adds an enabled entry to the loaded feed configuration, as an implementer does
    /// on the atomfeed module's admin page (its JSON names any `openMrsClass`:
    /// atomfeed `FeedConfigurationServiceImpl.saveConfig`), e.g.
    /// `("org.openmrs.EncounterType", "EncounterType", "encountertype",
    /// "/ws/rest/v1/encountertype/{uuid}?v=full")` for the central OpenMRS to publish
    /// encounter types, which the shipped configuration does not.
    pub fn add_feed_entry(
        &self,
        class: &'static str,
        title: &'static str,
        category: &'static str,
        rest: &'static str,
    ) {
        self.with(|s| {
            s.added_entries
                .push(feed::conf(class, title, category, true, rest, None))
        });
    }

    /// The global property `fhir2.upsert.supported.resources`.
    pub fn set_upsert(&self, types: &str) {
        self.with(|s| s.upsert_resources = types.to_string());
    }

    /// The global property `webservices.rest.uriPrefix` (archive links' host).
    pub fn set_uri_prefix(&self, prefix: Option<&str>) {
        self.with(|s| s.uri_prefix = prefix.map(str::to_string));
    }

    /// Changes (or adds) an account; `privileges` `None` makes it a superuser.
    pub fn set_account(&self, user: &str, password: &str, privileges: Option<&[&str]>) {
        self.with(|s| {
            let acct = match privileges {
                None => Account::superuser(password),
                Some(p) => Account {
                    password: password.into(),
                    roles: vec!["Sync".into()],
                    privileges: p.iter().map(|x| x.to_string()).collect(),
                    attempts: 0,
                    locked_at: None,
                },
            };
            s.accounts.insert(user.to_string(), acct);
        });
    }

    /// Whether the account is locked out now.
    pub fn locked(&self, user: &str) -> bool {
        self.with(|s| {
            s.account(user)
                .and_then(|a| a.locked_at)
                .is_some_and(|at| crate::time::wall_ms().saturating_sub(at) <= s.unlock_ms)
        })
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

#[cfg(test)]
mod tests;
