//! The simulated OpenMRS database: one store of records that FHIR2 and REST v1 both
//! show, the transactions that change it, and the events the atomfeed module writes
//! for each transaction.
//!
//! Records are kept FHIR-shaped (`Patient`, `Observation`, …) as FHIR2 renders them,
//! or REST-shaped for what only REST v1 carries (`openmrs:concept`). What OpenMRS
//! keeps as separate objects inside a Patient — names, addresses, identifiers,
//! person attributes — keep their own uuid as the element's `id`, as FHIR2 renders
//! them (`HumanName.id` is the PersonName uuid), so an edit of one of them is a
//! change of that object alone, exactly as Hibernate sees it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde_json::{json, Value};

use super::feed::{self, FeedStyle};

/// A record as OpenMRS holds it.
#[derive(Debug, Clone)]
pub(super) struct Res {
    pub body: Value,
    /// Voided (data) or retired (metadata).
    pub gone: bool,
    /// `date_changed`, else `date_created`: FHIR2's `meta.lastUpdated` and the
    /// simulator's `meta.versionId` (epoch milliseconds).
    pub version_ms: u64,
    /// Obs only: `obs.previous_version`, the obs this one amended.
    pub previous: Option<String>,
}

/// One atom entry, as `event_records` holds it.
#[derive(Debug, Clone)]
pub(super) struct Event {
    pub uuid: String,
    pub title: String,
    pub category: String,
    /// ICT4H's `tags` column: the action, then any filter tags.
    pub tags: Vec<String>,
    pub content: String,
    pub ms: u64,
}

/// An object Hibernate saw change: its OpenMRS class, uuid, and for sub-resources
/// the uuid of the person or patient it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entity {
    pub class: &'static str,
    pub uuid: String,
    pub parent: Option<String>,
}

/// One transaction's changes as openmrs-module-atomfeed's
/// `api/src/main/java/org/openmrs/module/atomfeed/api/db/hibernate/HibernateEventInterceptor.java`
/// collects them: sets of inserted, updated, retired, unretired, voided and
/// unvoided objects, written as events in `beforeTransactionCompletion` in that
/// order, each object at most once per set. Voiding is a dirty flush, so a voided
/// object is both UPDATED and VOIDED.
#[derive(Debug, Default)]
pub(super) struct Tx {
    created: Vec<Entity>,
    updated: Vec<Entity>,
    retired: Vec<Entity>,
    unretired: Vec<Entity>,
    voided: Vec<Entity>,
    unvoided: Vec<Entity>,
}

impl Tx {
    fn add(set: &mut Vec<Entity>, e: Entity) {
        if !set.contains(&e) {
            set.push(e);
        }
    }
    pub fn created(&mut self, e: Entity) {
        Tx::add(&mut self.created, e)
    }
    pub fn updated(&mut self, e: Entity) {
        Tx::add(&mut self.updated, e)
    }
    pub fn voided(&mut self, e: Entity, metadata: bool) {
        Tx::add(&mut self.updated, e.clone());
        if metadata {
            Tx::add(&mut self.retired, e)
        } else {
            Tx::add(&mut self.voided, e)
        }
    }
    pub fn unvoided(&mut self, e: Entity, metadata: bool) {
        Tx::add(&mut self.updated, e.clone());
        if metadata {
            Tx::add(&mut self.unretired, e)
        } else {
            Tx::add(&mut self.unvoided, e)
        }
    }
}

/// A user account, with OpenMRS's login lockout state.
#[derive(Debug, Clone)]
pub struct Account {
    pub password: String,
    /// Role names; "System Developer" is the superuser role (every privilege).
    pub roles: Vec<String>,
    pub privileges: BTreeSet<String>,
    /// openmrs-core `HibernateContextDAO.authenticate`: failed attempts counted in
    /// the `loginAttempts` user property, a `lockoutTimestamp` once they exceed
    /// `security.allowedFailedLoginsBeforeLockout`.
    pub attempts: u32,
    pub locked_at: Option<u64>,
}

impl Account {
    pub fn superuser(password: &str) -> Account {
        Account {
            password: password.into(),
            roles: vec!["System Developer".into(), "Provider".into()],
            privileges: BTreeSet::new(),
            attempts: 0,
            locked_at: None,
        }
    }

    pub fn has(&self, privilege: &str) -> bool {
        self.roles.iter().any(|r| r == "System Developer") || self.privileges.contains(privilege)
    }
}

/// An installed module, as REST's `module` resource lists it.
#[derive(Debug, Clone)]
pub struct Module {
    pub id: String,
    pub name: String,
    pub version: String,
    pub started: bool,
}

/// What a login attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Login {
    /// No `Authorization` header.
    Anonymous,
    Ok(String),
    Failed,
}

/// The simulated server: its data, its configuration (global properties, feed
/// configuration, modules, accounts) and the test levers.
pub struct SimState {
    pub(super) resources: BTreeMap<(String, String), Res>,
    pub(super) events: Vec<Event>,
    /// `event_records_queue`: events written but not yet moved to `event_records`.
    pub(super) queue: Vec<Event>,
    /// FHIR2's `FifoMemoryPagingProvider(100)`: search results kept for `_getpages`.
    pub(super) search_pages: HashMap<String, Vec<Value>>,
    pub(super) search_order: VecDeque<String>,
    pub(super) refuse: HashMap<(String, String), (u16, String)>,
    pub(super) accounts: BTreeMap<String, Account>,
    /// Which feed configuration is loaded (the shipped one by default).
    pub feed_style: FeedStyle,
    /// Categories switched on or off against the loaded configuration.
    pub(super) category_override: BTreeMap<String, bool>,
    /// Entries an implementer added to the loaded configuration (the atomfeed
    /// module's admin page edits the same JSON; any `openmrsClass` may be named).
    pub(super) added_entries: Vec<feed::FeedConf>,
    /// Global property `fhir2.upsert.supported.resources` (empty by default).
    pub upsert_resources: String,
    /// Global property `webservices.rest.uriPrefix` (unset by default).
    pub uri_prefix: Option<String>,
    /// Global property `fhir2.uriPrefix` (unset by default).
    pub fhir_uri_prefix: Option<String>,
    /// Global property `security.allowedFailedLoginsBeforeLockout` (7).
    pub allowed_failed_logins: u32,
    /// How long a locked account stays locked after its last attempt (5 min).
    pub unlock_ms: u64,
    /// Events wait in the queue until [`SimState::publish`] (the atomfeed module's
    /// "OpenMRS event publisher task", every 2 s) instead of appearing at once.
    pub hold_events: bool,
    pub modules: Vec<Module>,
    /// Added to the server's clock in its `Date` header.
    pub clock_skew_ms: i64,
    /// Test levers.
    pub hang_ms: u64,
    pub garbage_feed: bool,
    pub broken_chain: bool,
    pub fhir_not_json: bool,
    /// Every page of this feed category answers 500.
    pub fail_category: Option<String>,
    /// HTTP requests served (for requests-per-record figures).
    pub requests: u64,
    clock_ms: u64,
    writes: u64,
}

impl SimState {
    pub(super) fn new(user: &str, password: &str) -> SimState {
        SimState {
            resources: BTreeMap::new(),
            events: Vec::new(),
            queue: Vec::new(),
            search_pages: HashMap::new(),
            search_order: VecDeque::new(),
            refuse: HashMap::new(),
            accounts: BTreeMap::from([(user.to_string(), Account::superuser(password))]),
            feed_style: FeedStyle::Shipped,
            category_override: BTreeMap::new(),
            added_entries: Vec::new(),
            upsert_resources: String::new(),
            uri_prefix: None,
            fhir_uri_prefix: None,
            allowed_failed_logins: 7,
            unlock_ms: 5 * 60_000,
            hold_events: false,
            modules: vec![
                // The latest releases: webservices.rest 3.4.1, fhir2 4.2.0 (needs
                // core 2.4+), atomfeed 1.0.13.
                module("webservices.rest", "Rest Web Services OMOD", "3.4.1"),
                module("fhir2", "FHIR2", "4.2.0"),
                module("atomfeed", "Atomfeed", "1.0.13"),
                module("legacyui", "Legacy UI Module", "1.16.0"),
            ],
            clock_skew_ms: 0,
            hang_ms: 0,
            garbage_feed: false,
            broken_chain: false,
            fhir_not_json: false,
            fail_category: None,
            requests: 0,
            clock_ms: 0,
            writes: 0,
        }
    }

    pub(super) fn tick(&mut self) -> u64 {
        let now = crate::time::wall_ms().max(self.clock_ms + 1);
        self.clock_ms = now;
        now
    }

    pub(super) fn writes(&self) -> u64 {
        self.writes
    }

    /// openmrs-core `api/src/main/java/org/openmrs/api/db/hibernate/HibernateContextDAO.java`
    /// (`authenticate`): a wrong password counts an attempt; past
    /// `allowed_failed_logins` the account is locked, and every attempt while locked
    /// — right or wrong — resets the lock's clock, so a client retrying sooner than
    /// `unlock_ms` keeps the account locked for good.
    pub(super) fn login(&mut self, authorization: Option<&str>) -> Login {
        use base64::Engine as _;
        let Some(h) = authorization else {
            return Login::Anonymous;
        };
        let Some(encoded) = h.strip_prefix("Basic ") else {
            return Login::Anonymous;
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        let Some((user, password)) = decoded.split_once(':') else {
            return Login::Failed;
        };
        let now = crate::time::wall_ms();
        let (allowed, unlock) = (self.allowed_failed_logins, self.unlock_ms);
        let Some(acct) = self.accounts.get_mut(user) else {
            return Login::Failed;
        };
        if let Some(at) = acct.locked_at {
            if now.saturating_sub(at) > unlock {
                acct.locked_at = None;
                acct.attempts = 0;
            } else {
                acct.locked_at = Some(now);
                return Login::Failed;
            }
        }
        if acct.password == password {
            acct.attempts = 0;
            Login::Ok(user.to_string())
        } else {
            acct.attempts += 1;
            if acct.attempts > allowed {
                acct.locked_at = Some(now);
            }
            Login::Failed
        }
    }

    pub(super) fn account(&self, user: &str) -> Option<&Account> {
        self.accounts.get(user)
    }

    pub(super) fn get(&self, kind: &str, id: &str) -> Option<&Res> {
        self.resources.get(&(kind.to_string(), id.to_string()))
    }

    pub(super) fn live(&self, kind: &str, id: &str) -> bool {
        self.get(kind, id).is_some_and(|r| !r.gone)
    }

    pub(super) fn refusal(&self, kind: &str, id: &str) -> Option<(u16, String)> {
        self.refuse
            .get(&(kind.to_string(), id.to_string()))
            .cloned()
    }

    /// The stored body with FHIR2's `meta` (versionId, lastUpdated); `Err` if voided.
    pub(super) fn rendered(&self, kind: &str, id: &str) -> Option<Result<Value, ()>> {
        let r = self.get(kind, id)?;
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

    /// The stored body with `meta`, voided or not (what an update answers).
    pub(super) fn rendered_any(&self, kind: &str, id: &str) -> Option<Value> {
        let r = self.get(kind, id)?;
        let mut body = r.body.clone();
        if let Some(o) = body.as_object_mut() {
            o.insert(
                "meta".into(),
                json!({"versionId": r.version_ms.to_string(), "lastUpdated": instant(r.version_ms)}),
            );
        }
        Some(body)
    }

    /// The loaded feed configuration with the entries added to it.
    pub(super) fn feed_config(&self) -> Vec<feed::FeedConf> {
        let mut c = feed::config(self.feed_style);
        c.extend(self.added_entries.iter().copied());
        c
    }

    /// Whether feed `category` is enabled in the loaded configuration.
    pub(super) fn category_enabled(&self, category: &str) -> Option<bool> {
        if let Some(on) = self.category_override.get(category) {
            return Some(*on);
        }
        self.feed_config()
            .iter()
            .find(|c| c.category == category)
            .map(|c| c.enabled)
    }

    /// Writes the transaction's events (into the queue while `hold_events`).
    pub(super) fn commit(&mut self, tx: Tx) {
        let ms = self.tick();
        let actions: [(&str, &Vec<Entity>); 6] = [
            ("CREATED", &tx.created),
            ("UPDATED", &tx.updated),
            ("RETIRED", &tx.retired),
            ("UNRETIRED", &tx.unretired),
            ("VOIDED", &tx.voided),
            ("UNVOIDED", &tx.unvoided),
        ];
        let mut out = Vec::new();
        for (action, set) in actions {
            for e in set {
                out.extend(feed::events_for(self, e, action, ms));
            }
        }
        // Bahmni's advice publishes once per service call, whatever the object did.
        let mut seen = BTreeSet::new();
        out.retain(|e: &Event| {
            self.feed_style != FeedStyle::Bahmni || seen.insert(e.content.clone())
        });
        if self.hold_events {
            self.queue.extend(out);
        } else {
            self.events.extend(out);
        }
    }

    /// The atomfeed module's "OpenMRS event publisher task" (every 2 s by default):
    /// moves `event_records_queue` into `event_records`, where the feed shows them.
    pub fn publish(&mut self) {
        let q = std::mem::take(&mut self.queue);
        self.events.extend(q);
    }

    fn store(&mut self, kind: &str, id: &str, mut body: Value, previous: Option<String>) {
        if let Some(o) = body.as_object_mut() {
            o.remove("meta");
            o.remove("text");
            o.insert("resourceType".into(), kind.into());
            o.insert("id".into(), id.into());
        }
        let ms = self.tick();
        self.resources.insert(
            (kind.to_string(), id.to_string()),
            Res {
                body,
                gone: false,
                version_ms: ms,
                previous,
            },
        );
        self.writes += 1;
    }

    /// Creates a record (its id is the uuid OpenMRS keeps) and its events.
    pub(super) fn create(&mut self, kind: &str, id: &str, mut body: Value) {
        let mut tx = Tx::default();
        if kind == "Observation" {
            normalise_obs_status(&mut body, None);
        }
        if kind == "Patient" || kind == "Person" {
            assign_sub_ids(&mut body);
        }
        tx.created(entity(kind, &body, id));
        if kind == "Patient" || kind == "Person" {
            for (field, class) in SUB_RESOURCES {
                for sub in elements(&body, field) {
                    tx.created(sub_entity(class, &sub, id));
                }
            }
        }
        self.store(kind, id, body, None);
        self.commit(tx);
    }

    /// Saves a changed record the way OpenMRS's services do and returns the uuid
    /// that now holds it: an Observation is amended (a new obs, see
    /// [`SimState::amend_obs`]); a Patient's names, addresses, identifiers and
    /// attributes change as objects of their own; anything else is updated in
    /// place (a voided record stays voided, as FHIR2's update does not unvoid).
    pub(super) fn update(&mut self, kind: &str, id: &str, body: Value) -> String {
        let Some(old) = self.get(kind, id).cloned() else {
            self.create(kind, id, body);
            return id.to_string();
        };
        if kind == "Observation" && !old.gone {
            return self.amend_obs(id, body);
        }
        let mut tx = Tx::default();
        let mut body = body;
        if kind == "Patient" || kind == "Person" {
            self.diff_person(&old.body, &mut body, id, &mut tx);
        } else if strip(&old.body) != strip(&body) {
            tx.updated(entity(kind, &body, id));
        }
        let gone = old.gone;
        self.store(kind, id, body, old.previous);
        if gone {
            if let Some(r) = self.resources.get_mut(&(kind.to_string(), id.to_string())) {
                r.gone = true;
            }
        }
        self.commit(tx);
        id.to_string()
    }

    /// openmrs-core `api/src/main/java/org/openmrs/api/impl/ObsServiceImpl.java`
    /// (`saveObs` → `saveExistingObs`): an existing obs is never changed; a copy
    /// with a new uuid is saved with `previousVersion` pointing at it, its status
    /// becomes AMENDED if it was FINAL (`updateStatusIfNecessary`), and the original
    /// is voided (`voidExistingObs`). Events: the new obs CREATED, the old one
    /// UPDATED and VOIDED.
    pub(super) fn amend_obs(&mut self, id: &str, mut body: Value) -> String {
        let old_status = self.get("Observation", id).and_then(|r| {
            r.body
                .get("status")
                .and_then(|s| s.as_str())
                .map(str::to_string)
        });
        normalise_obs_status(&mut body, old_status.as_deref());
        let new_id = new_uuid();
        let mut tx = Tx::default();
        tx.created(entity("Observation", &body, &new_id));
        let old_entity = entity("Observation", &body, id);
        tx.voided(old_entity, false);
        self.store("Observation", &new_id, body, Some(id.to_string()));
        if let Some(r) = self
            .resources
            .get_mut(&("Observation".to_string(), id.to_string()))
        {
            r.gone = true;
        }
        self.commit(tx);
        new_id
    }

    /// A Patient's or Person's change, object by object: the person itself is
    /// UPDATED only if its own fields changed or one of its collections gained an
    /// element (Hibernate's `onCollectionUpdate` on the owner); an edited name,
    /// address, identifier or attribute is UPDATED alone; one that disappears is
    /// voided. Elements without an `id` are new objects and get a uuid.
    fn diff_person(&mut self, old: &Value, new: &mut Value, id: &str, tx: &mut Tx) {
        assign_sub_ids(new);
        let kind = new["resourceType"]
            .as_str()
            .unwrap_or("Patient")
            .to_string();
        let own = |v: &Value| {
            let mut v = strip(v);
            if let Some(o) = v.as_object_mut() {
                for (field, _) in SUB_RESOURCES {
                    o.remove(*field);
                }
            }
            v
        };
        let mut owner_changed = own(old) != own(new);
        for (field, class) in SUB_RESOURCES {
            let before: BTreeMap<String, Value> = elements(old, field)
                .into_iter()
                .filter_map(|e| Some((e.get("id")?.as_str()?.to_string(), e)))
                .collect();
            let after = elements(new, field);
            for e in &after {
                let sub = sub_entity(class, e, id);
                match before.get(&sub.uuid) {
                    None => {
                        tx.created(sub);
                        owner_changed = true;
                    }
                    Some(b) if b != e => tx.updated(sub),
                    Some(_) => {}
                }
            }
            for (uuid, b) in &before {
                if !after
                    .iter()
                    .any(|e| e.get("id").and_then(|i| i.as_str()) == Some(uuid))
                {
                    tx.voided(sub_entity(class, b, id), false);
                }
            }
        }
        if owner_changed {
            tx.updated(entity(&kind, new, id));
        }
    }

    /// Voids (data) or retires (metadata) a record: UPDATED and VOIDED/RETIRED.
    pub(super) fn void(&mut self, kind: &str, id: &str) -> bool {
        let ms = self.tick();
        let Some(r) = self.resources.get_mut(&(kind.to_string(), id.to_string())) else {
            return false;
        };
        if r.gone {
            return true;
        }
        r.gone = true;
        r.version_ms = ms;
        let body = r.body.clone();
        self.writes += 1;
        let mut tx = Tx::default();
        tx.voided(entity(kind, &body, id), is_metadata(kind));
        self.commit(tx);
        true
    }

    /// Unvoids (unretires) a record: UPDATED and UNVOIDED/UNRETIRED.
    pub(super) fn unvoid(&mut self, kind: &str, id: &str) -> bool {
        let ms = self.tick();
        let Some(r) = self.resources.get_mut(&(kind.to_string(), id.to_string())) else {
            return false;
        };
        if !r.gone {
            return true;
        }
        r.gone = false;
        r.version_ms = ms;
        let body = r.body.clone();
        self.writes += 1;
        let mut tx = Tx::default();
        tx.unvoided(entity(kind, &body, id), is_metadata(kind));
        self.commit(tx);
        true
    }

    /// Live records of a kind.
    pub(super) fn ids(&self, kind: &str) -> Vec<String> {
        self.resources
            .iter()
            .filter(|((k, _), r)| k == kind && !r.gone)
            .map(|((_, id), _)| id.clone())
            .collect()
    }
}

fn module(id: &str, name: &str, version: &str) -> Module {
    Module {
        id: id.into(),
        name: name.into(),
        version: version.into(),
        started: true,
    }
}

/// A random version-4 uuid, as OpenMRS assigns (`UUID.randomUUID()`).
pub(super) fn new_uuid() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

/// The objects inside a Patient that OpenMRS keeps as their own rows, by FHIR2
/// field, with their OpenMRS class (their feed categories are `person_name`,
/// `person_address`, `patient_identifier`, `person_attribute`).
pub(super) const SUB_RESOURCES: &[(&str, &str)] = &[
    ("name", "org.openmrs.PersonName"),
    ("address", "org.openmrs.PersonAddress"),
    ("identifier", "org.openmrs.PatientIdentifier"),
    ("telecom", "org.openmrs.PersonAttribute"),
];

fn elements(body: &Value, field: &str) -> Vec<Value> {
    body.get(field)
        .and_then(|v| v.as_array())
        .cloned()
        .unwrap_or_default()
}

fn assign_sub_ids(body: &mut Value) {
    for (field, _) in SUB_RESOURCES {
        if let Some(list) = body.get_mut(*field).and_then(|v| v.as_array_mut()) {
            for e in list {
                if let Some(o) = e.as_object_mut() {
                    if !o.get("id").is_some_and(|i| i.is_string()) {
                        o.insert("id".into(), new_uuid().into());
                    }
                }
            }
        }
    }
}

fn strip(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("meta");
        o.remove("text");
    }
    v
}

/// fhir2 `api/src/main/java/org/openmrs/module/fhir2/api/translators/impl/ObservationStatusTranslatorImpl.java`:
/// only PRELIMINARY, FINAL and AMENDED reach the obs (anything else leaves
/// OpenMRS's default, FINAL); an amendment of a FINAL obs is AMENDED.
fn normalise_obs_status(body: &mut Value, amending: Option<&str>) {
    let given = body.get("status").and_then(|s| s.as_str()).unwrap_or("");
    let mut status = match given {
        "preliminary" | "final" | "amended" => given.to_string(),
        _ => "final".to_string(),
    };
    if amending == Some("final") {
        status = "amended".into();
    }
    if let Some(o) = body.as_object_mut() {
        o.insert("status".into(), status.into());
    }
}

pub(super) fn is_metadata(kind: &str) -> bool {
    crate::model::class_of(kind) == crate::model::Class::Metadata
}

/// The OpenMRS class behind a record (what the atomfeed configuration is keyed by).
pub(super) fn class_of(kind: &str, body: &Value) -> &'static str {
    match kind {
        "Patient" => "org.openmrs.Patient",
        "Person" => "org.openmrs.Person",
        // FHIR2 serves visits as Encounters (FhirEncounterServiceImpl); a visit is
        // the one whose type is a visit type.
        "Encounter" if is_visit(body) => "org.openmrs.Visit",
        "Encounter" => "org.openmrs.Encounter",
        "Observation" => "org.openmrs.Obs",
        "Location" => "org.openmrs.Location",
        "AllergyIntolerance" => "org.openmrs.Allergy",
        "MedicationRequest" => "org.openmrs.DrugOrder",
        "ServiceRequest" => "org.openmrs.TestOrder",
        "Practitioner" => "org.openmrs.Provider",
        "Medication" => "org.openmrs.Drug",
        "Group" => "org.openmrs.Cohort",
        "Condition" => "org.openmrs.Condition",
        "MedicationDispense" => "org.openmrs.MedicationDispense",
        "openmrs:concept" => "org.openmrs.Concept",
        "openmrs:form" => "org.openmrs.Form",
        "openmrs:visittype" => "org.openmrs.VisitType",
        "openmrs:privilege" => "org.openmrs.Privilege",
        "openmrs:user" => "org.openmrs.User",
        "openmrs:encountertype" => "org.openmrs.EncounterType",
        _ => "org.openmrs.BaseOpenmrsObject",
    }
}

pub(super) fn is_visit(body: &Value) -> bool {
    body.get("type")
        .and_then(|t| t.as_array())
        .into_iter()
        .flatten()
        .filter_map(|cc| cc.get("coding").and_then(|c| c.as_array()))
        .flatten()
        .any(|c| {
            c.get("system").and_then(|s| s.as_str())
                == Some("http://fhir.openmrs.org/code-system/visit-type")
        })
}

fn entity(kind: &str, body: &Value, id: &str) -> Entity {
    Entity {
        class: class_of(kind, body),
        uuid: id.to_string(),
        parent: None,
    }
}

fn sub_entity(class: &'static str, element: &Value, owner: &str) -> Entity {
    Entity {
        class,
        uuid: element
            .get("id")
            .and_then(|i| i.as_str())
            .unwrap_or_default()
            .to_string(),
        parent: Some(owner.to_string()),
    }
}

/// `2026-11-26T10:00:00.123Z`, as FHIR2 renders `meta.lastUpdated`.
pub(super) fn instant(ms: u64) -> String {
    format!(
        "{}.{:03}Z",
        crate::time::fmt_time(ms).trim_end_matches('Z'),
        ms % 1000
    )
}

pub(super) use crate::emr::parse_instant;
