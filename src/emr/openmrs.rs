//! The OpenMRS adapter: change capture from the atomfeed module's feeds (and a
//! periodic `_lastUpdated` sweep for what no feed announces), reads and writes
//! through FHIR2 R4, REST v1 for what FHIR2 cannot create under our uuid.
//!
//! # Capture
//! Feeds: `<base>/openmrs/ws/atomfeed/<category>/recent`, older pages through
//! `prev-archive`. The default categories are the ones the atomfeed module's shipped
//! configuration publishes ([`SHIPPED_CATEGORIES`]). Archive links are absolute URLs
//! OpenMRS builds from the request's host, `X-Forwarded-Proto` or
//! `webservices.rest.uriPrefix` — behind a proxy, a host this box may not reach —
//! so every link is rebased onto `emr.url`. One marker per category (the id of the
//! last entry captured); a first run reads from the beginning, or with
//! `emr.start = "now"` marks the present (an empty feed is marked "from its
//! start", so its first events are read next round). A category that cannot be
//! read (a broken page, a broken chain) keeps its marker and is reported through
//! [`Emr::take_warnings`]; the other categories are read. If every category fails,
//! or the EMR cannot be reached at all, `changes` fails.
//!
//! Entry content maps to a record whatever its form: FHIR2 links
//! (`/ws/fhir2/R4/<Type>/<uuid>`), the old FHIR module's (`/ws/fhir/<Type>/<uuid>`,
//! the shipped configuration's), bare REST URLs with or without `/openmrs`, and
//! Bahmni's (`/ws/rest/v1/bahmnicore/bahmniencounter/<uuid>`, emrapi's
//! `/ws/rest/emrapi/encounter/<uuid>`: the encounter and its observations). A REST
//! link decides when present (REST resource names are case-sensitive and kept as
//! they are): `patient`, `person` and the demographic sub-resources
//! (`person/<p>/name/<uuid>`, `…/address/…`, `…/attribute/…`,
//! `patient/<p>/identifier/…`) all refresh `Patient/<p>`; `visit` and `encounter`
//! are FHIR2 Encounters; `obs` an Observation; other resources `openmrs:<resource>`.
//!
//! Kinds no feed configuration announces (Condition, MedicationDispense) are swept
//! every `emr.sweep_secs` with a FHIR2 `_lastUpdated=ge<mark>` search, following its
//! `next` pages; the next mark is the server's clock at the sweep minus a minute, so
//! a record written during the read is read again, never skipped (re-reading is
//! cheap: the engine recognises unchanged content).
//!
//! # Identity: one uuid per record across the network
//! A record keeps its network id in every OpenMRS it reaches:
//! - a create first tries FHIR2 PUT (an update; with `fhir2.upsert.supported.resources`
//!   listing an upsert-capable type — Location, Medication, Practitioner, Task — it
//!   creates under our id);
//! - where FHIR2 answers 404, REST v1 creates the record with `uuid` (REST keeps a
//!   client uuid): Patient (a person, then a patient made from it), Encounter, visit,
//!   Observation, Location; then FHIR2 PUT writes the full resource (except for an
//!   Observation, which a PUT would amend);
//! - only what neither can do (FHIR2 POST assigns its own uuid) is mapped: the
//!   adapter's id map records `network id → EMR uuid`, ids are translated both ways
//!   (the record's `id` and every reference), and the EMR's copy is captured under
//!   the network id, never as a new record.
//!
//! An Observation amendment (OpenMRS never edits an obs: `ObsServiceImpl` saves a
//! new obs with a new uuid and `previousVersion`, and voids the old one) stays one
//! logical record: its network id is the uuid of the chain's first obs, and the id
//! map points it at the newest obs of the chain. Capture walks `previousVersion`
//! (REST v1, a custom representation) for an obs it does not know whose FHIR2
//! status is not `final` (an amendment of a final obs is `amended`) or that is
//! voided; apply records the uuid a FHIR2 PUT answers with.
//!
//! The id map is kept in the cursor text (`{"v":2,"feeds":{…},"ids":{"head":{…},
//! "member":{…}},"sweep":{…}}`), which the engine stores with each capture; the
//! adapter holds it in memory between captures. [`Emr::identity_state`] offers it
//! to the engine after every change (an apply that created or amended under a new
//! id), so it can be stored in the transaction of that apply and handed back with
//! [`Emr::restore_identity`]; until the engine does so, a mapping made by an apply
//! reaches the store with the next capture's cursor. Losing it is harmless for
//! observations (the chain walk finds the network id again) and for everything
//! REST creates (no mapping at all); only FHIR2-POST-created records depend on it.
//! A version-1 cursor (a plain map of category markers) is read as such.
//!
//! # Errors
//! 401 (a wrong password, a locked account) and 403, 5xx, timeouts: the EMR is
//! unavailable — retried, nothing quarantined. After a 401 the adapter does not
//! call OpenMRS again for `emr.auth_retry_secs` (OpenMRS restarts a locked account's
//! lock on every attempt, so retrying every round would keep it locked for good);
//! a restart with fixed credentials clears that. Other 4xx: the EMR refuses the
//! record, with its reason (REST's `globalErrors` and `fieldErrors` included).
//! Server-generated narrative (`text`, holding the serving host's URLs) is dropped
//! on capture unless `emr.keep_narrative`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{classify, CheckLevel, Emr, EmrCheck, EmrError, Fetched};
use crate::model::{RecordKey, Snapshot, Version};
use crate::secret::Secret;

/// The categories the atomfeed module's shipped `defaultAtomfeedConfig.json`
/// publishes that carry records we sync (it also publishes `cohort`, `privilege`
/// and sync2's `audit_message`, which we do not carry).
pub const SHIPPED_CATEGORIES: &[&str] = &[
    "location",
    "form",
    "person",
    "patient",
    "person_name",
    "person_address",
    "patient_identifier",
    "person_attribute",
    "allergy",
    "drug_order",
    "test_order",
    "encounter",
    "visit",
    "observation",
];

/// Categories the shipped configuration has but disables.
pub const SHIPPED_DISABLED: &[&str] = &[
    "concept",
    "visittype",
    "provider",
    "user",
    "relationship",
    "drug",
    "order",
    "program",
    "programenrollment",
];

/// FHIR2 providers that can create on PUT (`BaseUpsertFhirResourceProvider`).
pub const UPSERT_CAPABLE: &[&str] = &["Location", "Medication", "Practitioner", "Task"];

/// Kinds the adapter creates through REST v1 with the network's uuid.
pub const REST_CREATED: &[&str] = &["Patient", "Encounter", "Observation", "Location"];

/// Privileges the sync account needs (openmrs-core `PrivilegeConstants` names).
pub const REQUIRED_PRIVILEGES: &[&str] = &[
    "Get Patients",
    "Add Patients",
    "Edit Patients",
    "Delete Patients",
    "Get People",
    "Add People",
    "Edit People",
    "Get Encounters",
    "Add Encounters",
    "Edit Encounters",
    "Delete Encounters",
    "Get Visits",
    "Add Visits",
    "Edit Visits",
    "Get Observations",
    "Add Observations",
    "Edit Observations",
    "Delete Observations",
    "Get Allergies",
    "Add Allergies",
    "Edit Allergies",
    "Get Conditions",
    "Edit Conditions",
    "Get Orders",
    "Get Locations",
    "Manage Locations",
    "Get Concepts",
    "Get Global Properties",
];

/// Where a first run starts reading a feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Beginning,
    Now,
}

/// One atom entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub terms: Vec<String>,
    pub content: String,
}

/// One atom page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub entries: Vec<Entry>,
    pub links: BTreeMap<String, String>,
}

/// Parses an atom feed page.
pub fn parse_feed(xml: &str) -> Result<Page, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut page = Page::default();
    let mut path: Vec<String> = Vec::new();
    let mut entry: Option<Entry> = None;
    let mut saw_feed = false;
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| format!("not valid XML at byte {}: {e}", reader.buffer_position()))?;
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).to_string();
                let attr = |k: &str| {
                    e.attributes()
                        .flatten()
                        .find(|a| a.key.local_name().as_ref() == k.as_bytes())
                        .map(|a| String::from_utf8_lossy(&a.value).to_string())
                };
                match name.as_str() {
                    "feed" => saw_feed = true,
                    "entry" => {
                        entry = Some(Entry {
                            id: String::new(),
                            terms: Vec::new(),
                            content: String::new(),
                        })
                    }
                    "link" if entry.is_none() => {
                        if let (Some(rel), Some(href)) = (attr("rel"), attr("href")) {
                            page.links.insert(rel, href);
                        }
                    }
                    "category" => {
                        if let (Some(en), Some(term)) = (entry.as_mut(), attr("term")) {
                            en.terms.push(term);
                        }
                    }
                    _ => {}
                }
                if matches!(ev, Event::Start(_)) {
                    path.push(name);
                }
            }
            Event::End(_) => {
                let closed_entry = path.pop().as_deref() == Some("entry");
                if let Some(en) = entry.take_if(|_| closed_entry) {
                    if en.id.is_empty() {
                        return Err("an entry has no id".into());
                    }
                    page.entries.push(en);
                }
            }
            Event::Text(t) => {
                let text = t.unescape().map_err(|e| e.to_string())?.to_string();
                append_text(&path, entry.as_mut(), &text);
            }
            Event::CData(t) => {
                let text = String::from_utf8_lossy(&t).to_string();
                append_text(&path, entry.as_mut(), &text);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !saw_feed {
        return Err("not an Atom feed (no <feed> element)".into());
    }
    Ok(page)
}

fn append_text(path: &[String], entry: Option<&mut Entry>, text: &str) {
    let Some(en) = entry else { return };
    match path.last().map(String::as_str) {
        Some("id") => en.id.push_str(text.trim()),
        Some("content") => en.content.push_str(text.trim()),
        _ => {}
    }
}

/// Which form of link an entry named its record with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkForm {
    /// `/ws/fhir2/R4/<Type>/<uuid>`.
    Fhir2,
    /// `/ws/fhir/<Type>/<uuid>`: the old FHIR module (the shipped configuration).
    OldFhir,
    /// `/ws/rest/v1/<resource>/<uuid>` (with or without `/openmrs`, and `?v=full`).
    Rest,
    /// A demographic sub-resource (`/ws/rest/v1/person/<p>/name/<uuid>`): its Patient.
    SubResource,
    /// Bahmni's or emrapi's encounter transaction: the encounter and its observations.
    EncounterTransaction,
}

/// The record (as the EMR names it) an entry's content is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub key: RecordKey,
    pub form: LinkForm,
}

/// The record an entry's content names (the EMR's id).
pub fn key_of_content(content: &str) -> Result<RecordKey, String> {
    link_of_content(content).map(|l| l.key)
}

/// Reads an entry's content: a bare URL, or a JSON object of links (`rest`, `fhir`);
/// the REST link decides when there is one.
pub fn link_of_content(content: &str) -> Result<Link, String> {
    let content = content.trim();
    if content.starts_with('{') {
        let v: Value =
            serde_json::from_str(content).map_err(|e| format!("entry content is not JSON: {e}"))?;
        let rest = v.get("rest").and_then(|r| r.as_str());
        let fhir = v.get("fhir").and_then(|f| f.as_str());
        match (rest, fhir) {
            (Some(r), _) => link_of_url(r).or_else(|e| fhir.map(link_of_url).unwrap_or(Err(e))),
            (None, Some(f)) => link_of_url(f),
            (None, None) => Err("entry content has neither a fhir nor a rest link".into()),
        }
    } else {
        link_of_url(content)
    }
}

fn link_of_url(url: &str) -> Result<Link, String> {
    let path = url.split(['?', '#']).next().unwrap_or("");
    let path = match path.split_once("://") {
        Some((_, rest)) => rest.find('/').map(|i| &rest[i..]).unwrap_or(""),
        None => path,
    };
    let path = path.strip_prefix("/openmrs").unwrap_or(path);
    let parts: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let key = |kind: &str, id: &str| RecordKey::new(kind, id).map_err(|e| format!("{url}: {e}"));
    match parts.as_slice() {
        ["ws", "fhir2", "R4", kind, id] => Ok(Link {
            key: key(kind, id)?,
            form: LinkForm::Fhir2,
        }),
        ["ws", "fhir", kind, id] => {
            let kind = match *kind {
                "Provider" => "Practitioner",
                "Drug" => "Medication",
                "ProcedureRequest" => "ServiceRequest",
                "Relationship" => "RelatedPerson",
                "Programenrollment" => "EpisodeOfCare",
                other => other,
            };
            Ok(Link {
                key: key(kind, id)?,
                form: LinkForm::OldFhir,
            })
        }
        ["ws", "rest", "v1", "bahmnicore", "bahmniencounter", id]
        | ["ws", "rest", "emrapi", "encounter", id] => Ok(Link {
            key: key("Encounter", id)?,
            form: LinkForm::EncounterTransaction,
        }),
        ["ws", "rest", "v1", "person" | "patient", parent, "name" | "address" | "attribute" | "identifier", _] => {
            Ok(Link {
                key: key("Patient", parent)?,
                form: LinkForm::SubResource,
            })
        }
        ["ws", "rest", "v1", "patient", _, "allergy", id] => Ok(Link {
            key: key("AllergyIntolerance", id)?,
            form: LinkForm::Rest,
        }),
        ["ws", "rest", "v1", resource, id] => Ok(Link {
            key: key(&rest_to_kind(resource)?, id)?,
            form: LinkForm::Rest,
        }),
        _ => Err(format!("cannot read a record from {url:?}")),
    }
}

/// The kind behind a REST resource name. Names are exact: OpenMRS looks them up
/// case-sensitively, so `Patient` is no resource and is never lowercased into one.
fn rest_to_kind(resource: &str) -> Result<String, String> {
    Ok(match resource {
        "patient" | "person" => "Patient".into(),
        "encounter" | "visit" => "Encounter".into(),
        "obs" => "Observation".into(),
        "location" => "Location".into(),
        "allergy" => "AllergyIntolerance".into(),
        "drug_order" => "MedicationRequest".into(),
        "test_order" => "ServiceRequest".into(),
        "provider" => "Practitioner".into(),
        "drug" => "Medication".into(),
        "cohort" => "Group".into(),
        "relationship" => "RelatedPerson".into(),
        "programenrollment" => "EpisodeOfCare".into(),
        "condition" => "Condition".into(),
        other => {
            let kind = format!("openmrs:{other}");
            RecordKey::new(&kind, "x").map_err(|_| {
                format!("REST resource {other:?} cannot be carried as a record kind (openmrs:<lowercase>)")
            })?;
            kind
        }
    })
}

/// The id map (see the module header).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct IdMap {
    /// `Kind/network id` → the EMR uuid holding it now (only where they differ).
    #[serde(default)]
    head: BTreeMap<String, String>,
    /// `Kind/EMR uuid` → network id, for every EMR uuid that ever held a record
    /// under another id (old obs of an amendment chain included).
    #[serde(default)]
    member: BTreeMap<String, String>,
    /// Changes made since construction (not stored).
    #[serde(skip)]
    changes: u64,
}

impl IdMap {
    fn emr(&self, kind: &str, net: &str) -> String {
        self.head
            .get(&format!("{kind}/{net}"))
            .cloned()
            .unwrap_or_else(|| net.to_string())
    }

    fn net(&self, kind: &str, emr: &str) -> Option<String> {
        self.member.get(&format!("{kind}/{emr}")).cloned()
    }

    fn net_or_same(&self, kind: &str, emr: &str) -> String {
        self.net(kind, emr).unwrap_or_else(|| emr.to_string())
    }

    fn set_head(&mut self, kind: &str, net: &str, emr: &str) {
        let changed = if net == emr {
            self.head.remove(&format!("{kind}/{net}")).is_some()
        } else {
            let h = self.head.insert(format!("{kind}/{net}"), emr.to_string());
            let m = self.member.insert(format!("{kind}/{emr}"), net.to_string());
            h.as_deref() != Some(emr) || m.as_deref() != Some(net)
        };
        self.changes += u64::from(changed);
    }

    fn add_member(&mut self, kind: &str, emr: &str, net: &str) {
        if emr != net {
            let m = self.member.insert(format!("{kind}/{emr}"), net.to_string());
            self.changes += u64::from(m.as_deref() != Some(net));
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SweepState {
    /// When the last sweep ran (our clock, epoch ms).
    #[serde(default)]
    at_ms: u64,
    /// Per type: the `_lastUpdated` lower bound of the next sweep.
    #[serde(default)]
    marks: BTreeMap<String, String>,
}

/// The cursor text, version 2.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CursorV2 {
    v: u32,
    /// Per category: the id of the last entry captured; `""`: from the start.
    #[serde(default)]
    feeds: BTreeMap<String, String>,
    #[serde(default)]
    ids: IdMap,
    #[serde(default)]
    sweep: SweepState,
}

fn parse_cursor(text: Option<&str>) -> CursorV2 {
    let Some(t) = text else {
        return CursorV2::default();
    };
    if let Ok(c) = serde_json::from_str::<CursorV2>(t) {
        if c.v >= 2 {
            return c;
        }
    }
    // Version 1: a plain map of category → marker.
    CursorV2 {
        feeds: serde_json::from_str(t).unwrap_or_default(),
        ..CursorV2::default()
    }
}

/// What FHIR2 answered for one record.
#[derive(Debug, Clone)]
enum FhirState {
    Present(Value),
    Gone,
    Missing,
}

/// A feed failure: of the whole EMR (stop), or of one category (go on without it).
enum FeedError {
    Emr(EmrError),
    Category(EmrError),
}

pub struct OpenMrs {
    agent: ureq::Agent,
    base: String,
    auth: String,
    categories: Vec<String>,
    start: Start,
    sweep_types: Vec<String>,
    sweep_every_ms: u64,
    keep_narrative: bool,
    auth_retry_ms: u64,
    ids: IdMap,
    /// `ids.changes` when [`Emr::identity_state`] last answered.
    ids_reported: u64,
    sweep: SweepState,
    /// Whether the id map / sweep state came from the cursor or `restore_identity`.
    ids_loaded: bool,
    sweep_loaded: bool,
    warnings: Vec<String>,
    /// After a 401: when, and what OpenMRS said.
    refused_at: Option<(u64, String)>,
    /// FHIR2 answers read while resolving identities, for the `fetch` that follows.
    prefetched: HashMap<String, FhirState>,
}

impl std::fmt::Debug for OpenMrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpenMrs({})", self.base)
    }
}

const OBS: &str = "Observation";

impl OpenMrs {
    pub fn new(
        base: &str,
        user: &str,
        password: &Secret,
        categories: Vec<String>,
        start: Start,
        timeout: Duration,
    ) -> OpenMrs {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{user}:{}", password.expose()));
        OpenMrs {
            agent: ureq::AgentBuilder::new()
                .timeout(timeout)
                .timeout_connect(timeout.min(Duration::from_secs(10)))
                .build(),
            base: base.trim_end_matches('/').to_string(),
            auth: format!("Basic {token}"),
            categories,
            start,
            sweep_types: Vec::new(),
            sweep_every_ms: 600_000,
            keep_narrative: false,
            auth_retry_ms: 600_000,
            ids: IdMap::default(),
            ids_reported: 0,
            sweep: SweepState::default(),
            ids_loaded: false,
            sweep_loaded: false,
            warnings: Vec::new(),
            refused_at: None,
            prefetched: HashMap::new(),
        }
    }

    /// Sweeps `types` by `_lastUpdated` every `every` (no sweep when empty).
    pub fn with_sweep(mut self, types: Vec<String>, every: Duration) -> OpenMrs {
        self.sweep_types = types;
        self.sweep_every_ms = every.as_millis() as u64;
        self
    }

    /// Keeps FHIR2's generated narrative (`text`) in captured records.
    pub fn keep_narrative(mut self, keep: bool) -> OpenMrs {
        self.keep_narrative = keep;
        self
    }

    /// How long to leave OpenMRS alone after it refused our credentials.
    pub fn auth_retry(mut self, wait: Duration) -> OpenMrs {
        self.auth_retry_ms = wait.as_millis() as u64;
        self
    }

    fn now_ms() -> u64 {
        crate::time::wall_ms()
    }

    /// Our base URL with the path and query of a link OpenMRS made (an absolute URL
    /// naming whatever host it believes it is, or a path with or without the
    /// `/openmrs` context).
    pub fn rebase(&self, link: &str) -> String {
        let path = match link.split_once("://") {
            Some((_, rest)) => rest.find('/').map(|i| &rest[i..]).unwrap_or("/"),
            None => link,
        };
        if path.starts_with("/openmrs/") || path == "/openmrs" {
            format!("{}{path}", self.base)
        } else if path.starts_with('/') {
            format!("{}/openmrs{path}", self.base)
        } else {
            format!("{}/openmrs/{path}", self.base)
        }
    }

    fn fhir_url(&self, kind: &str, id: &str) -> String {
        format!("{}/openmrs/ws/fhir2/R4/{kind}/{id}", self.base)
    }

    fn rest_url(&self, resource: &str) -> String {
        format!("{}/openmrs/ws/rest/v1/{resource}", self.base)
    }

    /// Fails at once while OpenMRS's refusal of our credentials is recent.
    fn check_refused(&self) -> Result<(), EmrError> {
        if let Some((at, why)) = &self.refused_at {
            let until = at + self.auth_retry_ms;
            if Self::now_ms() < until {
                return Err(EmrError::Unavailable(format!(
                    "{why}; not calling OpenMRS again for {} (every attempt while an account is locked restarts its lock; restart after fixing the credentials)",
                    crate::time::words_for_ms(until - Self::now_ms())
                )));
            }
        }
        Ok(())
    }

    // ureq's error is large, and it is handled right where it is returned.
    #[allow(clippy::result_large_err)]
    fn raw(
        &mut self,
        method: &str,
        url: &str,
        body: Option<&Value>,
    ) -> Result<ureq::Response, ureq::Error> {
        let req = self
            .agent
            .request(method, url)
            .set("Authorization", &self.auth)
            .set("Accept", "application/json");
        let r = match body {
            Some(b) => req
                .set("Content-Type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        if let Err(ureq::Error::Status(401, _)) = &r {
            self.refused_at = Some((
                Self::now_ms(),
                format!("OpenMRS refused our credentials (HTTP 401 at {url})"),
            ));
        }
        r
    }

    fn call(&mut self, method: &str, url: &str, body: Option<&Value>) -> Result<Value, EmrError> {
        let resp = self.raw(method, url, body).map_err(|e| classify(url, e))?;
        Self::json(url, resp)
    }

    fn json(url: &str, resp: ureq::Response) -> Result<Value, EmrError> {
        let text = resp
            .into_string()
            .map_err(|e| EmrError::Unavailable(format!("{url}: {e}")))?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| {
            EmrError::Unreadable(format!(
                "{url} did not answer JSON ({e}): {:?}",
                text.chars().take(80).collect::<String>()
            ))
        })
    }

    fn page(&mut self, url: &str) -> Result<Page, FeedError> {
        let resp = match self.raw("GET", url, None) {
            Ok(r) => r,
            Err(e @ ureq::Error::Transport(_)) | Err(e @ ureq::Error::Status(401 | 403, _)) => {
                return Err(FeedError::Emr(classify(url, e)))
            }
            Err(e) => return Err(FeedError::Category(classify(url, e))),
        };
        let body = resp
            .into_string()
            .map_err(|e| FeedError::Emr(EmrError::Unavailable(format!("{url}: {e}"))))?;
        parse_feed(&body)
            .map_err(|e| FeedError::Category(EmrError::Unreadable(format!("atom feed {url}: {e}"))))
    }

    /// New entries of one category after `marker`, oldest first, and the new marker.
    fn category_changes(
        &mut self,
        category: &str,
        marker: Option<&str>,
    ) -> Result<(Vec<Entry>, String), FeedError> {
        let recent = format!("{}/openmrs/ws/atomfeed/{category}/recent", self.base);
        let mut pages = vec![self.page(&recent)?];
        let newest = pages[0].entries.last().map(|e| e.id.clone());
        if marker.is_none() && self.start == Start::Now {
            // An empty feed is marked "from its start": what comes next is new.
            return Ok((Vec::new(), newest.unwrap_or_default()));
        }
        let marker = marker.filter(|m| !m.is_empty());
        loop {
            let current = pages.last().cloned().unwrap_or_default();
            if let Some(m) = marker {
                if current.entries.iter().any(|e| e.id == m) {
                    break;
                }
            }
            match current.links.get("prev-archive") {
                Some(prev) => {
                    let url = self.rebase(prev);
                    let page = self.page(&url).map_err(|e| match e {
                        FeedError::Category(inner) => FeedError::Category(EmrError::Unreadable(
                            format!("feed {category}: archive chain broken at {url} ({inner})"),
                        )),
                        other => other,
                    })?;
                    pages.push(page);
                    if pages.len() > 100_000 {
                        return Err(FeedError::Category(EmrError::Unreadable(format!(
                            "feed {category}: archive chain does not end"
                        ))));
                    }
                }
                None if marker.is_some() => {
                    return Err(FeedError::Category(EmrError::Unreadable(format!(
                        "feed {category}: marker {} not found in the feed (was the feed rebuilt?)",
                        marker.unwrap_or_default()
                    ))))
                }
                None => break,
            }
        }
        let mut out = Vec::new();
        let mut after_marker = marker.is_none();
        for page in pages.iter().rev() {
            for e in &page.entries {
                if after_marker {
                    out.push(e.clone());
                } else if Some(e.id.as_str()) == marker {
                    after_marker = true;
                }
            }
        }
        let new_marker = newest
            .or_else(|| marker.map(str::to_string))
            .unwrap_or_default();
        Ok((out, new_marker))
    }

    /// What FHIR2 holds under an EMR id.
    fn get_fhir(&mut self, kind: &str, id: &str) -> Result<FhirState, EmrError> {
        let url = self.fhir_url(kind, id);
        match self.raw("GET", &url, None) {
            Ok(resp) => Ok(FhirState::Present(Self::json(&url, resp)?)),
            Err(ureq::Error::Status(410, _)) => Ok(FhirState::Gone),
            Err(ureq::Error::Status(404, _)) => Ok(FhirState::Missing),
            Err(e) => Err(classify(&url, e)),
        }
    }

    /// The network id of the obs OpenMRS calls `uuid` (see the module header), and
    /// the id map updated with what was learned. The FHIR2 answer is kept for
    /// `fetch`.
    fn resolve_obs(&mut self, uuid: &str, created: bool) -> Result<String, EmrError> {
        if let Some(net) = self.ids.net(OBS, uuid) {
            return Ok(net);
        }
        let state = self.get_fhir(OBS, uuid)?;
        // A new obs (CREATED, with an obs VOIDED in the same capture) may be an
        // amendment whatever its status (a FHIR2 PUT may set `final` on the copy of
        // an amended obs); without action terms (Bahmni) the status tells: OpenMRS
        // makes the copy of a final obs amended.
        let needs_walk = match &state {
            FhirState::Present(v) => {
                created || v.get("status").and_then(|s| s.as_str()) != Some("final")
            }
            FhirState::Gone => true,
            FhirState::Missing => false,
        };
        self.prefetched
            .insert(format!("{OBS}/{uuid}"), state.clone());
        if !needs_walk {
            return Ok(uuid.to_string());
        }
        let mut chain = vec![uuid.to_string()];
        let mut net = None;
        while chain.len() < 1000 {
            let cur = chain.last().cloned().unwrap_or_default();
            let url = format!(
                "{}?v=custom:(uuid,voided,previousVersion:(uuid))",
                self.rest_url(&format!("obs/{cur}"))
            );
            let v = match self.call("GET", &url, None) {
                Ok(v) => v,
                // REST cannot say: the obs stands for itself.
                Err(EmrError::Refused { .. }) => break,
                Err(e) => return Err(e),
            };
            match v
                .get("previousVersion")
                .and_then(|p| p.get("uuid"))
                .and_then(|u| u.as_str())
            {
                None => break,
                Some(prev) => {
                    if let Some(known) = self.ids.net(OBS, prev) {
                        net = Some(known);
                        break;
                    }
                    chain.push(prev.to_string());
                }
            }
        }
        let root = chain.last().cloned().unwrap_or_else(|| uuid.to_string());
        let net = net.unwrap_or(root);
        for m in &chain {
            self.ids.add_member(OBS, m, &net);
        }
        if matches!(state, FhirState::Present(_)) {
            self.ids.set_head(OBS, &net, uuid);
        }
        Ok(net)
    }

    /// The network keys one feed link stands for.
    /// `amending`: the same capture saw an obs VOIDED, so a CREATED obs may be the
    /// amendment of it (OpenMRS writes both events in the one transaction).
    fn resolve(
        &mut self,
        link: &Link,
        terms: &[String],
        amending: bool,
    ) -> Result<Vec<RecordKey>, EmrError> {
        let kind = link.key.kind.as_str();
        let id = link.key.id.as_str();
        let mut out = Vec::new();
        if kind == OBS {
            let created = terms.iter().any(|t| t == "CREATED") && amending;
            let net = self.resolve_obs(id, created)?;
            out.push(RecordKey::new(OBS, &net).map_err(|e| EmrError::Unreadable(e.to_string()))?);
            return Ok(out);
        }
        let net = self.ids.net_or_same(kind, id);
        out.push(RecordKey::new(kind, &net).map_err(|e| EmrError::Unreadable(e.to_string()))?);
        if link.form == LinkForm::EncounterTransaction {
            // Bahmni publishes the encounter transaction, not its observations.
            let url = format!(
                "{}/openmrs/ws/fhir2/R4/Observation?encounter={id}&_count=100",
                self.base
            );
            for (obs_id, resource) in self.search_all(&url)? {
                if self.ids.net(OBS, &obs_id).is_none()
                    && resource.get("status").and_then(|s| s.as_str()) == Some("final")
                {
                    self.prefetched
                        .insert(format!("{OBS}/{obs_id}"), FhirState::Present(resource));
                    out.push(
                        RecordKey::new(OBS, &obs_id)
                            .map_err(|e| EmrError::Unreadable(e.to_string()))?,
                    );
                } else {
                    let net = self.resolve_obs(&obs_id, false)?;
                    out.push(
                        RecordKey::new(OBS, &net)
                            .map_err(|e| EmrError::Unreadable(e.to_string()))?,
                    );
                }
            }
        }
        Ok(out)
    }

    /// Every entry of a FHIR2 searchset and its `next` pages: (id, resource).
    fn search_all(&mut self, first: &str) -> Result<Vec<(String, Value)>, EmrError> {
        let mut out = Vec::new();
        let mut url = Some(first.to_string());
        let mut pages = 0;
        while let Some(u) = url.take() {
            pages += 1;
            if pages > 10_000 {
                return Err(EmrError::Unreadable(format!(
                    "{first}: paging does not end"
                )));
            }
            let bundle = self.call("GET", &u, None)?;
            for e in bundle["entry"].as_array().into_iter().flatten() {
                if let Some(id) = e["resource"]["id"].as_str() {
                    out.push((id.to_string(), e["resource"].clone()));
                }
            }
            url = bundle["link"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str())
                .map(|l| self.rebase(l));
        }
        Ok(out)
    }

    /// The server's clock (its `Date` header), epoch ms.
    fn server_now(&mut self) -> Option<u64> {
        let url = self.rest_url("session");
        let resp = self.raw("GET", &url, None).ok()?;
        resp.header("Date").and_then(crate::time::http_date_ms)
    }

    /// The `_lastUpdated` sweep of the kinds no feed announces, when due.
    fn sweep(&mut self) -> Result<Vec<RecordKey>, EmrError> {
        let now = Self::now_ms();
        if self.sweep_types.is_empty() || now < self.sweep.at_ms + self.sweep_every_ms {
            return Ok(Vec::new());
        }
        let server_now = self.server_now().unwrap_or(now);
        let next_mark = crate::time::fmt_time(server_now.saturating_sub(60_000));
        let mut keys = Vec::new();
        for t in self.sweep_types.clone() {
            let mark = match self.sweep.marks.get(&t) {
                Some(m) => m.clone(),
                None if self.start == Start::Now => {
                    self.sweep.marks.insert(t.clone(), next_mark.clone());
                    continue;
                }
                None => "1970-01-01T00:00:00Z".to_string(),
            };
            let url = format!(
                "{}/openmrs/ws/fhir2/R4/{t}?_lastUpdated=ge{mark}&_count=100",
                self.base
            );
            for (emr_id, resource) in self.search_all(&url)? {
                let net = self.ids.net_or_same(&t, &emr_id);
                self.prefetched
                    .insert(format!("{t}/{emr_id}"), FhirState::Present(resource));
                if let Ok(k) = RecordKey::new(&t, &net) {
                    keys.push(k);
                }
            }
            // Never move a mark backwards (a server clock set back).
            let m = if next_mark > mark {
                next_mark.clone()
            } else {
                mark
            };
            self.sweep.marks.insert(t.clone(), m);
        }
        self.sweep.at_ms = now;
        Ok(keys)
    }

    /// A FHIR2 resource as the network knows it: network ids (its own and in every
    /// reference), no server narrative unless asked to keep it.
    fn to_network(&self, kind: &str, net: &str, mut v: Value) -> Result<Snapshot, EmrError> {
        if let Some(o) = v.as_object_mut() {
            o.insert("id".into(), net.into());
            if !self.keep_narrative {
                o.remove("text");
            }
        }
        let ids = &self.ids;
        rewrite_references(&mut v, &|k, id| ids.net(k, id));
        let _ = kind;
        Snapshot::from_json_value(v).map_err(|e| EmrError::Unreadable(format!("{kind}/{net}: {e}")))
    }

    /// A network version as this EMR must receive it: its EMR id and references.
    fn to_emr(&self, emr_id: &str, mut v: Value) -> Value {
        if let Some(o) = v.as_object_mut() {
            o.insert("id".into(), emr_id.into());
            o.remove("text");
            o.remove("meta");
        }
        let ids = &self.ids;
        rewrite_references(&mut v, &|k, id| {
            let e = ids.emr(k, id);
            (e != id).then_some(e)
        });
        v
    }

    /// REST v1 representations carry the uuid but no resourceType: give them ours.
    fn rest_snapshot(key: &RecordKey, mut v: Value) -> Result<Snapshot, EmrError> {
        if let Some(o) = v.as_object_mut() {
            o.remove("links");
            o.insert("resourceType".into(), key.kind.clone().into());
            o.insert("id".into(), key.id.clone().into());
            o.remove("uuid");
        }
        Snapshot::from_json_value(v).map_err(|e| EmrError::Unreadable(format!("{key}: {e}")))
    }

    fn fetch_rest(&mut self, key: &RecordKey, resource: &str) -> Result<Option<Fetched>, EmrError> {
        let url = format!(
            "{}?v=full",
            self.rest_url(&format!("{resource}/{}", key.id))
        );
        match self.raw("GET", &url, None) {
            Ok(resp) => {
                let v = Self::json(&url, resp)?;
                let gone = v.get("retired").and_then(|r| r.as_bool()) == Some(true)
                    || v.get("voided").and_then(|r| r.as_bool()) == Some(true);
                if gone {
                    return Ok(Some(Fetched::Gone));
                }
                Ok(Some(Fetched::Present(Self::rest_snapshot(key, v)?)))
            }
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(classify(&url, e)),
        }
    }

    /// Writes metadata only REST v1 carries: update by uuid, else create with it;
    /// a tombstone retires (DELETE without purge).
    fn apply_rest(&mut self, v: &Version, resource: &str) -> Result<(), EmrError> {
        let key = v.key();
        let one = self.rest_url(&format!("{resource}/{}", key.id));
        if v.deleted {
            let url = format!("{one}?reason=retired%20upstream");
            return match self.raw("DELETE", &url, None) {
                Ok(_) | Err(ureq::Error::Status(404, _)) => Ok(()),
                Err(e) => Err(classify(&url, e)),
            };
        }
        let mut body = rest_writable(v.snapshot.json());
        match self.raw("POST", &one, Some(&body)) {
            Ok(_) => Ok(()),
            Err(ureq::Error::Status(404, _)) => {
                if let Some(o) = body.as_object_mut() {
                    o.insert("uuid".into(), key.id.clone().into());
                }
                let collection = self.rest_url(resource);
                self.call("POST", &collection, Some(&body)).map(|_| ())
            }
            Err(e) => Err(classify(&one, e)),
        }
    }

    /// Creates a FHIR2-carried record this EMR does not have, keeping the network
    /// id where REST v1 can, mapping the EMR's id where only FHIR2 POST can.
    fn create_fhir(&mut self, kind: &str, net: &str, body: &Value) -> Result<Value, EmrError> {
        if let Some(steps) = self.rest_skeleton(kind, net, body)? {
            for (resource, payload) in steps {
                let url = self.rest_url(&resource);
                self.call("POST", &url, Some(&payload))?;
            }
            if kind == OBS {
                return match self.get_fhir(OBS, net)? {
                    FhirState::Present(v) => Ok(v),
                    _ => Err(EmrError::Unreadable(format!(
                        "{kind}/{net} was created through REST but FHIR2 does not show it"
                    ))),
                };
            }
            let url = self.fhir_url(kind, net);
            return self.call("PUT", &url, Some(body));
        }
        let mut post = body.clone();
        if let Some(o) = post.as_object_mut() {
            o.remove("id");
        }
        let url = format!("{}/openmrs/ws/fhir2/R4/{kind}", self.base);
        let created = self.call("POST", &url, Some(&post))?;
        let Some(emr_id) = created
            .get("id")
            .and_then(|i| i.as_str())
            .map(str::to_string)
        else {
            return Err(EmrError::Unreadable(format!(
                "{url} created {kind}/{net} but did not say under which id"
            )));
        };
        self.ids.set_head(kind, net, &emr_id);
        Ok(created)
    }

    /// The REST v1 requests that create `kind` under the network's uuid, or `None`
    /// where REST cannot (FHIR2 POST and the id map take over).
    fn rest_skeleton(
        &mut self,
        kind: &str,
        net: &str,
        v: &Value,
    ) -> Result<Option<Vec<(String, Value)>>, EmrError> {
        let emr_ref = |field: &str, k: &str| -> Option<String> {
            reference_id(v, field).map(|id| self.ids.emr(k, &id))
        };
        Ok(match kind {
            "Patient" => {
                let Some(person) = rest_person(net, v) else {
                    return Ok(None);
                };
                let mut steps = Vec::new();
                // A person left by an earlier attempt is made a patient, not created twice.
                let probe = format!(
                    "{}?v=custom:(uuid)",
                    self.rest_url(&format!("person/{net}"))
                );
                match self.raw("GET", &probe, None) {
                    Ok(_) => {}
                    Err(ureq::Error::Status(404, _)) => steps.push(("person".to_string(), person)),
                    Err(e) => return Err(classify(&probe, e)),
                }
                let identifiers: Vec<Value> = v["identifier"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|i| {
                        let mut id = json!({
                            "identifier": i.get("value"),
                            "identifierType": coding_code(i.get("type"), None),
                            "preferred": i.get("use").and_then(|u| u.as_str()) == Some("official"),
                        });
                        if let Some(u) = i.get("id").and_then(|x| x.as_str()) {
                            id["uuid"] = u.into();
                        }
                        let location =
                            i["extension"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .find_map(|e| {
                                    (e["url"]
                                    == "http://fhir.openmrs.org/ext/patient/identifier#location")
                                    .then(|| reference_id(e, "valueReference"))
                                    .flatten()
                                });
                        if let Some(l) = location {
                            id["location"] = self.ids.emr("Location", &l).into();
                        }
                        id
                    })
                    .collect();
                steps.push((
                    "patient".to_string(),
                    json!({"person": net, "identifiers": identifiers}),
                ));
                Some(steps)
            }
            "Encounter" => {
                let patient = emr_ref("subject", "Patient");
                let visit_type = coding_code(v["type"].get(0), Some(VISIT_TYPE));
                let encounter_type = coding_code(v["type"].get(0), Some(ENCOUNTER_TYPE));
                let start = v["period"]["start"].as_str().map(str::to_string);
                let location = v["location"]
                    .get(0)
                    .and_then(|l| reference_id(l, "location"))
                    .map(|l| self.ids.emr("Location", &l));
                match (patient, visit_type, encounter_type) {
                    (Some(p), Some(vt), _) => {
                        let mut b = json!({"uuid": net, "patient": p, "visitType": vt});
                        if let Some(s) = start {
                            b["startDatetime"] = s.into();
                        }
                        if let Some(l) = location {
                            b["location"] = l.into();
                        }
                        Some(vec![("visit".into(), b)])
                    }
                    (Some(p), None, Some(et)) => {
                        let mut b = json!({"uuid": net, "patient": p, "encounterType": et});
                        if let Some(s) = start {
                            b["encounterDatetime"] = s.into();
                        }
                        if let Some(l) = location {
                            b["location"] = l.into();
                        }
                        if let Some(vis) = emr_ref("partOf", "Encounter") {
                            b["visit"] = vis.into();
                        }
                        Some(vec![("encounter".into(), b)])
                    }
                    _ => None,
                }
            }
            "Observation" => {
                let has_members = v["hasMember"].as_array().is_some_and(|m| !m.is_empty());
                let person = emr_ref("subject", "Patient");
                let concept = coding_code(v.get("code"), None);
                let when = v["effectiveDateTime"]
                    .as_str()
                    .or_else(|| v["issued"].as_str())
                    .map(str::to_string);
                match (has_members, person, concept, when) {
                    (false, Some(p), Some(c), Some(w)) => {
                        let mut b =
                            json!({"uuid": net, "person": p, "concept": c, "obsDatetime": w});
                        if let Some(e) = emr_ref("encounter", "Encounter") {
                            b["encounter"] = e.into();
                        }
                        if let Some(s) = v["status"].as_str() {
                            if ["preliminary", "final", "amended"].contains(&s) {
                                b["status"] = s.to_ascii_uppercase().into();
                            }
                        }
                        if let Some(value) = obs_value(v) {
                            b["value"] = value;
                        }
                        if let Some(n) = v["note"].get(0).and_then(|n| n["text"].as_str()) {
                            b["comment"] = n.into();
                        }
                        Some(vec![("obs".into(), b)])
                    }
                    _ => None,
                }
            }
            "Location" => v["name"].as_str().map(|name| {
                let mut b = json!({"uuid": net, "name": name});
                if let Some(d) = v["description"].as_str() {
                    b["description"] = d.into();
                }
                if let Some(p) = reference_id(v, "partOf") {
                    b["parentLocation"] = self.ids.emr("Location", &p).into();
                }
                vec![("location".into(), b)]
            }),
            _ => None,
        })
    }

    fn apply_fhir(&mut self, v: &Version) -> Result<Fetched, EmrError> {
        let key = v.key();
        let (kind, net) = (key.kind.as_str(), key.id.as_str());
        let emr = self.ids.emr(kind, net);
        let url = self.fhir_url(kind, &emr);
        if v.deleted {
            return match self.raw("DELETE", &url, None) {
                Ok(_) | Err(ureq::Error::Status(404 | 410, _)) => Ok(Fetched::Gone),
                Err(e) => Err(classify(&url, e)),
            };
        }
        let body = self.to_emr(&emr, v.snapshot.json());
        let answer = match self.raw("PUT", &url, Some(&body)) {
            Ok(resp) => Self::json(&url, resp)?,
            // Not there: FHIR2 only upserts listed metadata types.
            Err(ureq::Error::Status(404, _)) => self.create_fhir(kind, net, &body)?,
            Err(e) => return Err(classify(&url, e)),
        };
        if kind == OBS {
            // An update amends: the record now lives in a new obs.
            if let Some(now) = answer.get("id").and_then(|i| i.as_str()) {
                let now = now.to_string();
                self.ids.add_member(OBS, &emr, net);
                self.ids.set_head(OBS, net, &now);
            }
        }
        match answer {
            Value::Object(_) => Ok(Fetched::Present(self.to_network(kind, net, answer)?)),
            _ => match self.fetch(key)? {
                Some(f) => Ok(f),
                None => Err(EmrError::Unreadable(format!(
                    "{key} was written but cannot be read back"
                ))),
            },
        }
    }

    fn feed_style(content: &str) -> &'static str {
        match link_of_content(content).map(|l| l.form) {
            Ok(LinkForm::OldFhir) => "old FHIR module links (/ws/fhir/…)",
            Ok(LinkForm::Fhir2) => "FHIR2 links",
            Ok(LinkForm::EncounterTransaction) => "Bahmni encounter transactions",
            Ok(_) if content.trim_start().starts_with('{') => "REST links",
            Ok(_) => "bare REST URLs",
            Err(_) => "unreadable content",
        }
    }
}

const VISIT_TYPE: &str = "http://fhir.openmrs.org/code-system/visit-type";
const ENCOUNTER_TYPE: &str = "http://fhir.openmrs.org/code-system/encounter-type";

/// The id in `body[field].reference` (`Type/id` or a URL ending so).
fn reference_id(body: &Value, field: &str) -> Option<String> {
    body.get(field)?
        .get("reference")?
        .as_str()?
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The code of a CodeableConcept's coding with `system` (or, for `None`, the one
/// without a system — OpenMRS's own uuid — else the first).
fn coding_code(cc: Option<&Value>, system: Option<&str>) -> Option<String> {
    let codings = cc?.get("coding")?.as_array()?;
    let pick = match system {
        Some(s) => codings.iter().find(|c| c["system"] == s),
        None => codings
            .iter()
            .find(|c| c.get("system").is_none())
            .or_else(|| codings.first()),
    };
    pick?.get("code")?.as_str().map(str::to_string)
}

fn obs_value(v: &Value) -> Option<Value> {
    if let Some(n) = v["valueQuantity"].get("value") {
        return Some(n.clone());
    }
    if let Some(s) = v["valueString"].as_str() {
        return Some(s.into());
    }
    if let Some(b) = v["valueBoolean"].as_bool() {
        return Some(b.into());
    }
    if let Some(d) = v["valueDateTime"].as_str() {
        return Some(d.into());
    }
    coding_code(v.get("valueCodeableConcept"), None).map(|c| json!({"uuid": c}))
}

/// A REST v1 person body for a FHIR Patient (names, gender, birthdate, addresses,
/// each name and address with its uuid).
fn rest_person(net: &str, v: &Value) -> Option<Value> {
    let names: Vec<Value> = v["name"]
        .as_array()?
        .iter()
        .filter_map(|n| {
            let given: Vec<&str> = n["given"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|g| g.as_str())
                .collect();
            let family = n["family"].as_str()?;
            let mut name = json!({"givenName": given.first()?, "familyName": family});
            if given.len() > 1 {
                name["middleName"] = given[1..].join(" ").into();
            }
            if let Some(id) = n["id"].as_str() {
                name["uuid"] = id.into();
            }
            Some(name)
        })
        .collect();
    if names.is_empty() {
        return None;
    }
    let gender = match v["gender"].as_str() {
        Some("male") => "M",
        Some("female") => "F",
        Some("other") => "O",
        _ => "U",
    };
    let mut p = json!({"uuid": net, "names": names, "gender": gender});
    if let Some(b) = v["birthDate"].as_str() {
        p["birthdate"] = b.into();
    }
    let addresses: Vec<Value> = v["address"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let mut out = json!({});
            for (from, to) in [
                ("city", "cityVillage"),
                ("district", "countyDistrict"),
                ("state", "stateProvince"),
                ("country", "country"),
                ("postalCode", "postalCode"),
                ("id", "uuid"),
            ] {
                if let Some(x) = a[from].as_str() {
                    out[to] = x.into();
                }
            }
            if let Some(l) = a["line"].get(0).and_then(|l| l.as_str()) {
                out["address1"] = l.into();
            }
            out
        })
        .collect();
    if !addresses.is_empty() {
        p["addresses"] = addresses.into();
    }
    Some(p)
}

/// A captured REST representation made writable again: without the properties
/// REST only shows (`display`, `links`, `auditInfo`, `resourceVersion`) — REST
/// refuses to set them — and with references (`{uuid, display, links}`) as uuids.
fn rest_writable(mut v: Value) -> Value {
    fn clean(v: &mut Value, top: bool) {
        match v {
            Value::Object(o) => {
                let is_ref = o.contains_key("uuid")
                    && o.keys()
                        .all(|k| k == "uuid" || k == "display" || k == "links");
                if is_ref && !top {
                    let uuid = o.get("uuid").cloned().unwrap_or(Value::Null);
                    *v = uuid;
                    return;
                }
                for k in ["display", "links", "auditInfo", "resourceVersion"] {
                    o.remove(k);
                }
                if top {
                    o.remove("resourceType");
                    o.remove("id");
                    o.remove("uuid");
                }
                for (_, x) in o.iter_mut() {
                    clean(x, false);
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| clean(x, false)),
            _ => {}
        }
    }
    clean(&mut v, true);
    v
}

/// Rewrites every `reference` (`Type/id`, or a URL ending in it) whose id `map`
/// translates.
fn rewrite_references(v: &mut Value, map: &dyn Fn(&str, &str) -> Option<String>) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get_mut("reference") {
                let mut parts = r.rsplitn(3, '/');
                if let (Some(id), Some(kind)) = (parts.next(), parts.next()) {
                    if let Some(new_id) = map(kind, id) {
                        let prefix_len = r.len() - id.len();
                        let rewritten = format!("{}{new_id}", &r[..prefix_len]);
                        *r = rewritten;
                    }
                }
            }
            for (k, x) in o.iter_mut() {
                if k != "reference" {
                    rewrite_references(x, map);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_references(x, map)),
        _ => {}
    }
}

impl Emr for OpenMrs {
    fn changes(&mut self, cursor: Option<&str>) -> Result<(Vec<RecordKey>, String), EmrError> {
        let mut cur = parse_cursor(cursor);
        if !self.ids_loaded {
            self.ids = std::mem::take(&mut cur.ids);
            self.ids_loaded = true;
        }
        if !self.sweep_loaded {
            self.sweep = std::mem::take(&mut cur.sweep);
            self.sweep_loaded = true;
        }
        self.check_refused()?;
        self.prefetched.clear();
        let mut links = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        let mut read_any = false;
        for category in self.categories.clone() {
            let marker = cur.feeds.get(&category).cloned();
            match self.category_changes(&category, marker.as_deref()) {
                Ok((entries, m)) => {
                    read_any = true;
                    for e in entries {
                        match link_of_content(&e.content) {
                            Ok(l) => links.push((l, e.terms)),
                            Err(why) => {
                                tracing::warn!(feed = %category, entry = %e.id, error = %why, "skipping a feed entry that names no record we carry")
                            }
                        }
                    }
                    cur.feeds.insert(category.clone(), m);
                }
                Err(FeedError::Emr(e)) => return Err(e),
                Err(FeedError::Category(e)) => failures.push(format!(
                    "feed {category} not read (its marker stays; the other feeds were read): {e}"
                )),
            }
        }
        if !read_any && !self.categories.is_empty() {
            if let Some(first) = failures.first() {
                return Err(EmrError::Unreadable(first.clone()));
            }
        }
        let mut keys: Vec<RecordKey> = Vec::new();
        // An amendment voids the old obs in the transaction that creates the new one,
        // so both events are read together: without a VOIDED obs, no CREATED obs
        // needs its previousVersion looked up.
        let amending = links
            .iter()
            .any(|(l, terms)| l.key.kind == OBS && terms.iter().any(|t| t == "VOIDED"));
        for (l, terms) in &links {
            for k in self.resolve(l, terms, amending)? {
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
        }
        match self.sweep() {
            Ok(ks) => {
                for k in ks {
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                }
            }
            Err(e @ EmrError::Unavailable(_)) => return Err(e),
            Err(e) => failures.push(format!("_lastUpdated sweep not done: {e}")),
        }
        for f in failures {
            tracing::warn!(error = %f, "EMR capture degraded");
            if self.warnings.len() < 50 {
                self.warnings.push(f);
            }
        }
        cur.v = 2;
        cur.ids = self.ids.clone();
        cur.sweep = self.sweep.clone();
        Ok((keys, serde_json::to_string(&cur).unwrap_or_default()))
    }

    fn fetch(&mut self, key: &RecordKey) -> Result<Option<Fetched>, EmrError> {
        self.check_refused()?;
        if let Some(resource) = key.kind.strip_prefix("openmrs:") {
            return self.fetch_rest(key, resource);
        }
        let emr = self.ids.emr(&key.kind, &key.id);
        let state = match self.prefetched.remove(&format!("{}/{emr}", key.kind)) {
            Some(s) => s,
            None => self.get_fhir(&key.kind, &emr)?,
        };
        Ok(match state {
            FhirState::Present(v) => {
                Some(Fetched::Present(self.to_network(&key.kind, &key.id, v)?))
            }
            FhirState::Gone => Some(Fetched::Gone),
            FhirState::Missing => None,
        })
    }

    fn apply(&mut self, v: &Version) -> Result<Fetched, EmrError> {
        self.check_refused()?;
        let key = v.key().clone();
        if let Some(resource) = key.kind.strip_prefix("openmrs:") {
            self.apply_rest(v, resource)?;
            return match self.fetch(&key)? {
                Some(f) => Ok(f),
                None if v.deleted => Ok(Fetched::Gone),
                None => Err(EmrError::Unreadable(format!(
                    "{key} was written but cannot be read back"
                ))),
            };
        }
        self.apply_fhir(v)
    }

    fn probe(&mut self) -> Result<String, EmrError> {
        self.check_refused()?;
        let url = self.rest_url("session");
        let session = self.call("GET", &url, None)?;
        if session["authenticated"] != true {
            return Err(EmrError::Unavailable(format!(
                "{} answers but does not accept our credentials (a wrong password or a locked account)",
                self.base
            )));
        }
        let cat = self
            .categories
            .first()
            .cloned()
            .unwrap_or_else(|| "patient".into());
        let recent = format!("{}/openmrs/ws/atomfeed/{cat}/recent", self.base);
        let p = match self.page(&recent) {
            Ok(p) => p,
            Err(FeedError::Emr(e)) | Err(FeedError::Category(e)) => return Err(e),
        };
        Ok(format!(
            "{} answers as {}; {cat} feed has {} recent entries",
            self.base,
            session["user"]["username"].as_str().unwrap_or("?"),
            p.entries.len()
        ))
    }

    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    fn identity_state(&mut self) -> Option<String> {
        if self.ids.changes == self.ids_reported {
            return None;
        }
        self.ids_reported = self.ids.changes;
        serde_json::to_string(&self.ids).ok()
    }

    fn restore_identity(&mut self, state: &str) {
        if let Ok(ids) = serde_json::from_str::<IdMap>(state) {
            self.ids = ids;
            self.ids_loaded = true;
        }
    }

    fn diagnose(&mut self) -> Vec<EmrCheck> {
        diagnose(self)
    }
}

/// `doctor`'s checks of an OpenMRS: the account (credentials, privileges), clock
/// skew, modules, feed categories, and how creates keep the network's uuid.
fn diagnose(om: &mut OpenMrs) -> Vec<EmrCheck> {
    use CheckLevel::*;
    let mut out = Vec::new();
    if let Err(e) = om.check_refused() {
        out.push(EmrCheck::new(Fail, "emr", e.to_string(), None));
        return out;
    }
    // The session: open to anyone, so it tells a wrong password from a dead server.
    let url = om.rest_url("session");
    let (session, date) = match om.raw("GET", &url, None) {
        Result::Ok(resp) => {
            let date = resp.header("Date").and_then(crate::time::http_date_ms);
            match OpenMrs::json(&url, resp) {
                Result::Ok(v) => (v, date),
                Err(e) => {
                    out.push(EmrCheck::new(
                        Fail,
                        "emr",
                        e.to_string(),
                        Some("is emr.url the OpenMRS server (without /openmrs)?"),
                    ));
                    return out;
                }
            }
        }
        Err(e) => {
            out.push(EmrCheck::new(
                Fail,
                "emr",
                classify(&url, e).to_string(),
                Some("check emr.url and that OpenMRS runs (and has the webservices.rest module)"),
            ));
            return out;
        }
    };
    if session["authenticated"] != true {
        out.push(EmrCheck::new(
            Fail,
            "emr",
            format!("{} answers but refuses our credentials", om.base),
            Some("check the user:password in emr.credentials_file; after 7 failures OpenMRS locks the account for 5 minutes, and every attempt meanwhile restarts the lock"),
        ));
        return out;
    }
    let user = &session["user"];
    out.push(EmrCheck::new(
        Ok,
        "emr",
        format!(
            "{} answers (OpenMRS REST session as {})",
            om.base,
            user["username"].as_str().unwrap_or("?")
        ),
        None,
    ));
    let roles: Vec<&str> = user["roles"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str().or(r["display"].as_str()))
        .collect();
    let privileges: Vec<&str> = user["privileges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str().or(r["display"].as_str()))
        .collect();
    let username = user["username"].as_str().unwrap_or("?");
    if roles.contains(&"System Developer") {
        out.push(EmrCheck::new(
            Warn,
            "emr-account",
            format!("{username} is a superuser (System Developer): every privilege"),
            Some("a dedicated account with only the privileges clinicsync needs is safer (see README)"),
        ));
    } else {
        let missing: Vec<&str> = REQUIRED_PRIVILEGES
            .iter()
            .copied()
            .filter(|p| !privileges.contains(p))
            .collect();
        if missing.is_empty() {
            out.push(EmrCheck::new(
                Ok,
                "emr-account",
                format!("{username} has every privilege clinicsync needs"),
                None,
            ));
        } else {
            out.push(EmrCheck::new(
                Fail,
                "emr-account",
                format!("{username} lacks: {}", missing.join(", ")),
                Some("give the account's role these privileges (Administration → Manage Roles)"),
            ));
        }
    }
    if let Some(remote) = date {
        let skew = (OpenMrs::now_ms() as i64 - remote as i64).abs() / 1000;
        let (level, hint) = match skew {
            0..=60 => (Ok, None),
            61..=300 => (Warn, Some("set the clocks right (NTP); `_lastUpdated` sweeps and audit times depend on them")),
            _ => (Fail, Some("set the clocks right (NTP); `_lastUpdated` sweeps and audit times depend on them")),
        };
        out.push(EmrCheck::new(
            level,
            "emr-clock",
            format!("{skew} s from OpenMRS's clock"),
            hint,
        ));
    }
    // Modules.
    let url = format!("{}?v=full", om.rest_url("module"));
    match om.call("GET", &url, None) {
        Result::Ok(v) => {
            let mods: BTreeMap<String, (String, bool)> = v["results"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| {
                    Some((
                        m["uuid"].as_str()?.to_string(),
                        (
                            m["version"].as_str().unwrap_or("?").to_string(),
                            m["started"] == true,
                        ),
                    ))
                })
                .collect();
            let show = |id: &str| match mods.get(id) {
                Some((v, true)) => format!("{id} {v}"),
                Some((v, false)) => format!("{id} {v} (not started)"),
                None => format!("{id} missing"),
            };
            let started = |id: &str| mods.get(id).is_some_and(|(_, s)| *s);
            let feeds = started("atomfeed") || started("openmrs-atomfeed");
            let detail = format!(
                "{}; {}; {}",
                show("webservices.rest"),
                show("fhir2"),
                if mods.contains_key("openmrs-atomfeed") {
                    show("openmrs-atomfeed")
                } else {
                    show("atomfeed")
                }
            );
            let (level, hint) = if !started("fhir2") || !started("webservices.rest") {
                (Fail, Some("clinicsync reads and writes records through FHIR2 and REST v1: install and start both"))
            } else if !feeds {
                (Fail, Some("install the atomfeed module: without its feeds only the _lastUpdated sweep captures changes"))
            } else {
                (Ok, None)
            };
            out.push(EmrCheck::new(level, "emr-modules", detail, hint));
        }
        Err(e) => out.push(EmrCheck::new(
            Warn,
            "emr-modules",
            format!("cannot list modules: {e}"),
            None,
        )),
    }
    // Feed categories: what each of ours shows, against the shipped configuration.
    let mut notes = Vec::new();
    let mut level = Ok;
    let mut styles = Vec::new();
    for cat in om.categories.clone() {
        let recent = format!("{}/openmrs/ws/atomfeed/{cat}/recent", om.base);
        match om.page(&recent) {
            Result::Ok(p) => {
                if let Some(e) = p.entries.last() {
                    let s = OpenMrs::feed_style(&e.content);
                    if !styles.contains(&s) {
                        styles.push(s);
                    }
                } else if SHIPPED_DISABLED.contains(&cat.as_str()) {
                    level = Warn;
                    notes.push(format!(
                        "{cat}: no events yet — the shipped configuration disables this category: check it is enabled at this OpenMRS"
                    ));
                } else if !SHIPPED_CATEGORIES.contains(&cat.as_str())
                    && !["encountertype", "Encounter"].contains(&cat.as_str())
                {
                    level = Warn;
                    notes.push(format!(
                        "{cat}: no events yet, and no shipped or Bahmni configuration has this category (a typo, or an entry you added?)"
                    ));
                } else {
                    notes.push(format!("{cat}: no events yet"));
                }
            }
            Err(FeedError::Emr(e)) | Err(FeedError::Category(e)) => {
                level = Fail;
                notes.push(format!("{cat}: {e}"));
            }
        }
    }
    let unread: Vec<&str> = SHIPPED_CATEGORIES
        .iter()
        .copied()
        .filter(|c| !om.categories.iter().any(|x| x == c))
        .collect();
    if !unread.is_empty() {
        if level == Ok {
            level = Warn;
        }
        notes.push(format!(
            "published by the shipped configuration but not read: {}",
            unread.join(", ")
        ));
    }
    out.push(EmrCheck::new(
        level,
        "emr-feeds",
        format!(
            "{} categories read ({}); entries carry {}{}",
            om.categories.len(),
            om.categories.join(", "),
            if styles.is_empty() { "nothing yet".to_string() } else { styles.join(" and ") },
            if notes.is_empty() { String::new() } else { format!("; {}", notes.join("; ")) }
        ),
        (level != Ok).then_some("emr.categories should list what the atomfeed configuration publishes (README: the feed configuration to load)"),
    ));
    let swept = if om.sweep_types.is_empty() {
        "no sweep configured: Conditions, diagnoses and MedicationDispenses are never captured"
            .to_string()
    } else {
        format!(
            "{} swept by _lastUpdated every {} (no atomfeed configuration announces them; diagnoses are not in FHIR2)",
            om.sweep_types.join(", "),
            crate::time::words_for_ms(om.sweep_every_ms)
        )
    };
    out.push(EmrCheck::new(
        if om.sweep_types.is_empty() { Warn } else { Ok },
        "emr-sweep",
        swept,
        None,
    ));
    // Creates: which keep our uuid, which are mapped.
    let url = format!(
        "{}?v=full",
        om.rest_url("systemsetting/fhir2.upsert.supported.resources")
    );
    let upsert: Vec<String> = match om.call("GET", &url, None) {
        Result::Ok(v) => v["value"]
            .as_str()
            .unwrap_or("")
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        Err(e) => {
            out.push(EmrCheck::new(
                Warn,
                "emr-ids",
                format!("cannot read fhir2.upsert.supported.resources: {e}"),
                Some("the account needs the privilege Get Global Properties"),
            ));
            return out;
        }
    };
    let upserted: Vec<&str> = UPSERT_CAPABLE
        .iter()
        .copied()
        .filter(|t| upsert.iter().any(|u| u == t))
        .collect();
    let mapped: Vec<&str> = UPSERT_CAPABLE
        .iter()
        .copied()
        .filter(|t| !upserted.contains(t) && !REST_CREATED.contains(t))
        .collect();
    out.push(EmrCheck::new(
        if mapped.is_empty() { Ok } else { Warn },
        "emr-ids",
        format!(
            "creates keep the network uuid: REST v1 for {}; FHIR2 upsert for {} (fhir2.upsert.supported.resources = {:?}); FHIR2 POST with an id map for {} and every other type",
            REST_CREATED.join(", "),
            if upserted.is_empty() { "none".to_string() } else { upserted.join(", ") },
            upsert.join(","),
            if mapped.is_empty() { "none of the upsert-capable".to_string() } else { mapped.join(", ") },
        ),
        (!mapped.is_empty()).then_some("set the global property fhir2.upsert.supported.resources to Location,Medication,Practitioner,Task so those keep their uuid too"),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<feed xmlns="http://www.w3.org/2005/Atom">
  <title>Patient AOP</title>
  <link rel="self" type="application/atom+xml" href="http://x/openmrs/ws/atomfeed/patient/recent" />
  <link rel="via" type="application/atom+xml" href="http://x/openmrs/ws/atomfeed/patient/2" />
  <link rel="prev-archive" type="application/atom+xml" href="http://x/openmrs/ws/atomfeed/patient/1" />
  <id>b1+2</id>
  <updated>2026-11-26T10:00:00Z</updated>
  <entry>
    <title>Patient</title>
    <category term="patient" />
    <category term="UPDATED" />
    <id>tag:atomfeed.ict4h.org:0f1e</id>
    <updated>2026-11-26T10:00:00Z</updated>
    <content type="application/vnd.atomfeed+xml"><![CDATA[/openmrs/ws/rest/v1/patient/5b1c-aa?v=full]]></content>
  </entry>
  <entry>
    <title>Encounter</title>
    <category term="Encounter" />
    <id>tag:atomfeed.ict4h.org:0f1f</id>
    <content type="application/vnd.atomfeed+xml"><![CDATA[{"rest":"/openmrs/ws/rest/v1/encounter/e-1?v=full","fhir":"/openmrs/ws/fhir2/R4/Encounter/e-1"}]]></content>
  </entry>
</feed>"#;

    fn k(kind: &str, id: &str) -> RecordKey {
        RecordKey::new(kind, id).unwrap()
    }

    #[test]
    fn atom_pages_parse_with_links_terms_and_both_content_forms() {
        let p = parse_feed(PAGE).unwrap();
        assert_eq!(
            p.links["prev-archive"],
            "http://x/openmrs/ws/atomfeed/patient/1"
        );
        assert_eq!(p.entries.len(), 2);
        assert_eq!(p.entries[0].terms, vec!["patient", "UPDATED"]);
        assert_eq!(
            key_of_content(&p.entries[0].content).unwrap(),
            k("Patient", "5b1c-aa")
        );
        assert_eq!(
            key_of_content(&p.entries[1].content).unwrap(),
            k("Encounter", "e-1")
        );
        assert_eq!(
            key_of_content("/openmrs/ws/rest/v1/concept/c-1?v=full").unwrap(),
            k("openmrs:concept", "c-1")
        );
    }

    #[test]
    fn every_link_form_maps_to_its_kind() {
        let cases = [
            // The shipped configuration: REST without /openmrs, old FHIR module links.
            (
                r#"{"rest":"/ws/rest/v1/obs/o-1?v=full","fhir":"/ws/fhir/Observation/o-1"}"#,
                "Observation",
                "o-1",
                LinkForm::Rest,
            ),
            (
                r#"{"rest":"/ws/rest/v1/visit/v-1?v=full","fhir":"/ws/fhir/Encounter/v-1"}"#,
                "Encounter",
                "v-1",
                LinkForm::Rest,
            ),
            (
                r#"{"fhir":"/ws/fhir/ProcedureRequest/t-1"}"#,
                "ServiceRequest",
                "t-1",
                LinkForm::OldFhir,
            ),
            (
                r#"{"fhir":"/ws/fhir/Provider/pr-1"}"#,
                "Practitioner",
                "pr-1",
                LinkForm::OldFhir,
            ),
            (
                r#"{"rest":"/ws/rest/v1/drug_order/d-1?v=full","fhir":"/ws/fhir/MedicationRequest/d-1"}"#,
                "MedicationRequest",
                "d-1",
                LinkForm::Rest,
            ),
            (
                r#"{"rest":"/ws/rest/v1/allergy/a-1?v=full","fhir":"/ws/fhir/AllergyIntolerance/a-1"}"#,
                "AllergyIntolerance",
                "a-1",
                LinkForm::Rest,
            ),
            // Demographic sub-resources refresh their Patient.
            (
                r#"{"rest":"/ws/rest/v1/person/p-1/name/n-1?v=full"}"#,
                "Patient",
                "p-1",
                LinkForm::SubResource,
            ),
            (
                r#"{"rest":"/ws/rest/v1/person/p-1/address/a-9?v=full"}"#,
                "Patient",
                "p-1",
                LinkForm::SubResource,
            ),
            (
                r#"{"rest":"/ws/rest/v1/person/p-1/attribute/x-9?v=full"}"#,
                "Patient",
                "p-1",
                LinkForm::SubResource,
            ),
            (
                r#"{"rest":"/ws/rest/v1/patient/p-1/identifier/i-9?v=full"}"#,
                "Patient",
                "p-1",
                LinkForm::SubResource,
            ),
            (
                r#"{"rest":"/ws/rest/v1/person/p-2?v=full","fhir":"/ws/fhir/Person/p-2"}"#,
                "Patient",
                "p-2",
                LinkForm::Rest,
            ),
            // A custom configuration with FHIR2 links.
            (
                r#"{"fhir":"/ws/fhir2/R4/Observation/o-2"}"#,
                "Observation",
                "o-2",
                LinkForm::Fhir2,
            ),
            // Bahmni: bare URLs, encounter transactions; emrapi's default.
            (
                "/openmrs/ws/rest/v1/bahmnicore/bahmniencounter/e-9?includeAll=true",
                "Encounter",
                "e-9",
                LinkForm::EncounterTransaction,
            ),
            (
                "/openmrs/ws/rest/emrapi/encounter/e-8?includeAll=true",
                "Encounter",
                "e-8",
                LinkForm::EncounterTransaction,
            ),
            (
                "/openmrs/ws/rest/v1/patient/p-3?v=full",
                "Patient",
                "p-3",
                LinkForm::Rest,
            ),
            // REST names keep their case.
            (
                r#"{"rest":"/ws/rest/v1/encountertype/et-1?v=full"}"#,
                "openmrs:encountertype",
                "et-1",
                LinkForm::Rest,
            ),
        ];
        for (content, kind, id, form) in cases {
            let l = link_of_content(content).unwrap_or_else(|e| panic!("{content}: {e}"));
            assert_eq!((l.key, l.form), (k(kind, id), form), "{content}");
        }
        // A mixed-case REST name is no resource OpenMRS has, and no kind we invent.
        assert!(link_of_content(r#"{"rest":"/ws/rest/v1/EncounterType/et-1"}"#).is_err());
    }

    #[test]
    fn links_are_rebased_onto_the_configured_url() {
        let om = OpenMrs::new(
            "http://127.0.0.1:8081/",
            "u",
            &Secret::new("p".into()),
            vec![],
            Start::Beginning,
            Duration::from_secs(1),
        );
        assert_eq!(
            om.rebase("https://emr.clinic.internal/openmrs/ws/atomfeed/patient/3"),
            "http://127.0.0.1:8081/openmrs/ws/atomfeed/patient/3"
        );
        assert_eq!(
            om.rebase("http://proxy:80/openmrs/ws/fhir2/R4?_getpages=x&_count=10"),
            "http://127.0.0.1:8081/openmrs/ws/fhir2/R4?_getpages=x&_count=10"
        );
        assert_eq!(
            om.rebase("/ws/rest/v1/patient/p?v=full"),
            "http://127.0.0.1:8081/openmrs/ws/rest/v1/patient/p?v=full"
        );
    }

    #[test]
    fn references_translate_both_ways_and_rest_bodies_become_writable() {
        let mut ids = IdMap::default();
        ids.set_head("Practitioner", "net-1", "emr-1");
        let mut v = json!({"participant": [{"individual": {"reference": "Practitioner/net-1"}}], "subject": {"reference": "Patient/p"}});
        rewrite_references(&mut v, &|k, id| {
            let e = ids.emr(k, id);
            (e != id).then_some(e)
        });
        assert_eq!(
            v["participant"][0]["individual"]["reference"],
            "Practitioner/emr-1"
        );
        rewrite_references(&mut v, &|k, id| ids.net(k, id));
        assert_eq!(
            v["participant"][0]["individual"]["reference"],
            "Practitioner/net-1"
        );
        let w = rest_writable(
            json!({"resourceType": "openmrs:concept", "id": "c", "display": "Weight", "links": [],
            "datatype": {"uuid": "d-1", "display": "Numeric", "links": []}, "names": [{"name": "Weight", "display": "Weight"}]}),
        );
        assert_eq!(w, json!({"datatype": "d-1", "names": [{"name": "Weight"}]}));
    }

    #[test]
    fn version_one_cursors_are_read() {
        let c = parse_cursor(Some(r#"{"patient":"tag:atomfeed.ict4h.org:1"}"#));
        assert_eq!(c.feeds["patient"], "tag:atomfeed.ict4h.org:1");
        assert_eq!(
            crate::time::http_date_ms("Thu, 01 Jan 1970 00:01:00 GMT"),
            Some(60_000)
        );
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert!(parse_feed("<html><body>502 Bad Gateway</body></html>")
            .unwrap_err()
            .contains("not an Atom feed"));
        assert!(parse_feed("<feed><entry><id>x</entry></feed>").is_err());
        assert!(key_of_content("{not json").is_err());
    }
}
