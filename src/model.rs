//! Records, keys, versions and clocks: the vocabulary every other module speaks.
//!
//! Invariants
//! - A [`RecordKey`] is `(kind, id)`: a FHIR R4 resource type (`Patient`) or an
//!   OpenMRS type FHIR cannot carry (`openmrs:concept`), and a FHIR logical id.
//!   Both are validated on construction, so a key that exists is well formed.
//! - A snapshot's body is stored and sent in *canonical* form (compact JSON, object
//!   keys sorted, `meta.versionId`/`meta.lastUpdated` removed). The content hash is the
//!   SHA-256 of exactly those bytes, so two nodes that hold the same content agree on
//!   the hash whatever server stamped it.
//! - Class (metadata or clinical) and the owning patient are *derived* from the kind and
//!   the body, never taken from a peer's word.
//! - A [`VersionVector`] says which writes a version includes; a node that writes a
//!   record bumps its own counter. Two vectors compare as equal, newer, older or
//!   concurrent; concurrent versions are a conflict.
//! - The [`Hlc`] never goes backwards on a node, even when the wall clock does.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod canonical;

/// Errors from building records out of outside data. All are permanent: the same
/// input will fail the same way.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("invalid record kind {0:?}: expected a FHIR resource type such as Patient, or openmrs:<type>")]
    BadKind(String),
    #[error("invalid record id {0:?}: expected 1-64 characters of A-Z a-z 0-9 - .")]
    BadId(String),
    #[error("invalid record reference {0:?}: expected <Kind>/<id>")]
    BadReference(String),
    #[error("resource is not valid JSON: {0}")]
    NotJson(String),
    #[error("resource is not a JSON object")]
    NotObject,
    #[error("resource has no resourceType")]
    NoResourceType,
    #[error("resource has no id")]
    NoId,
    #[error("{kind} resource has no patient reference this node can use: subject or patient must be `Patient/<id>`, the id 1-64 letters, digits, '-' or '.' (FHIR's id)")]
    NoPatient { kind: String },
}

/// Outside data that does not make a record: the same input fails the same way.
impl crate::error::Classify for ModelError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            ModelError::BadKind(_)
            | ModelError::BadId(_)
            | ModelError::BadReference(_)
            | ModelError::NotJson(_)
            | ModelError::NotObject
            | ModelError::NoResourceType
            | ModelError::NoId
            | ModelError::NoPatient { .. } => crate::error::ErrorClass::Permanent,
        }
    }
}

/// Which way a record flows. Derived from the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Defined at the root, flows down to every node, never written by a clinic.
    Metadata,
    /// Belongs to a patient, flows up from where it was written and down to the
    /// nodes whose catchment holds the patient.
    Clinical,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Metadata => "metadata",
            Class::Clinical => "clinical",
        }
    }
    pub fn parse(s: &str) -> Option<Class> {
        match s {
            "metadata" => Some(Class::Metadata),
            "clinical" => Some(Class::Clinical),
            _ => None,
        }
    }
}

/// Resource types in a FHIR R4 Patient compartment that OpenMRS and clinics write.
/// Everything else (Location, Practitioner, Organization, Medication, ValueSet,
/// `openmrs:*` …) is metadata.
pub const CLINICAL_KINDS: &[&str] = &[
    "Patient",
    "Encounter",
    "Observation",
    "Condition",
    "AllergyIntolerance",
    "DiagnosticReport",
    "Immunization",
    "MedicationRequest",
    "MedicationDispense",
    "ServiceRequest",
    "Procedure",
    "EpisodeOfCare",
    "RelatedPerson",
    "CarePlan",
    "Flag",
];

/// Metadata kinds a hub accepts by default besides the clinical ones: the FHIR2
/// module's other resource types (any `openmrs:` type is accepted too).
pub const METADATA_KINDS: &[&str] = &[
    "Location",
    "Practitioner",
    "Organization",
    "Medication",
    "ValueSet",
    "CodeSystem",
    "Person",
    "Task",
    "Group",
    "Questionnaire",
];

/// The identity of a record across the network.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RecordKey {
    pub kind: String,
    pub id: String,
}

impl RecordKey {
    pub fn new(kind: &str, id: &str) -> Result<RecordKey, ModelError> {
        if !valid_kind(kind) {
            return Err(ModelError::BadKind(kind.to_string()));
        }
        if !valid_id(id) {
            return Err(ModelError::BadId(id.to_string()));
        }
        Ok(RecordKey {
            kind: kind.to_string(),
            id: id.to_string(),
        })
    }

    /// Parses `Kind/id` as a technician types it.
    pub fn parse(reference: &str) -> Result<RecordKey, ModelError> {
        let (kind, id) = reference
            .rsplit_once('/')
            .ok_or_else(|| ModelError::BadReference(reference.to_string()))?;
        RecordKey::new(kind, id)
    }

    pub fn class(&self) -> Class {
        class_of(&self.kind)
    }
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

pub fn class_of(kind: &str) -> Class {
    if CLINICAL_KINDS.contains(&kind) {
        Class::Clinical
    } else {
        Class::Metadata
    }
}

fn valid_kind(kind: &str) -> bool {
    let fhir = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.starts_with(|c: char| c.is_ascii_uppercase())
            && s.chars().all(|c| c.is_ascii_alphanumeric())
    };
    match kind.strip_prefix("openmrs:") {
        Some(rest) => {
            !rest.is_empty()
                && rest.len() <= 64
                && rest
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        }
        None => fhir(kind),
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

/// A node id: 1-64 of `a-z A-Z 0-9 - _ .` (it names topics, files and log fields).
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// A hybrid logical clock stamp: wall milliseconds, then a counter for stamps that
/// share a millisecond. Ordered lexicographically.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    pub wall_ms: u64,
    pub counter: u32,
}

impl Hlc {
    /// The stamp for a local event at `now_ms`, given the last stamp this node issued.
    pub fn tick(last: Hlc, now_ms: u64) -> Hlc {
        if now_ms > last.wall_ms {
            Hlc {
                wall_ms: now_ms,
                counter: 0,
            }
        } else {
            Hlc {
                wall_ms: last.wall_ms,
                counter: last.counter.saturating_add(1),
            }
        }
    }

    /// The stamp after receiving `remote`, so that later local stamps order after it.
    pub fn observe(last: Hlc, remote: Hlc, now_ms: u64) -> Hlc {
        let max = last.max(remote);
        if now_ms > max.wall_ms {
            Hlc {
                wall_ms: now_ms,
                counter: 0,
            }
        } else {
            Hlc {
                wall_ms: max.wall_ms,
                counter: max.counter.saturating_add(1),
            }
        }
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:04}", self.wall_ms, self.counter)
    }
}

/// How two version vectors relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    Same,
    /// The left side includes every write of the right side and more.
    Newer,
    Older,
    Concurrent,
}

/// node id → number of writes by that node this version includes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VersionVector(pub BTreeMap<String, u64>);

impl VersionVector {
    pub fn get(&self, node: &str) -> u64 {
        self.0.get(node).copied().unwrap_or(0)
    }

    /// This vector plus one more write by `node`.
    pub fn bumped(&self, node: &str) -> VersionVector {
        // Saturating: a hub refuses counters anywhere near the top (see
        // `engine::MAX_COUNTER`), so this never saturates in a healthy network.
        let mut next = self.clone();
        let e = next.0.entry(node.to_string()).or_insert(0);
        *e = e.saturating_add(1);
        next
    }

    /// The smallest vector that includes both.
    pub fn join(&self, other: &VersionVector) -> VersionVector {
        let mut out = self.clone();
        for (node, &n) in &other.0 {
            let e = out.0.entry(node.clone()).or_insert(0);
            *e = (*e).max(n);
        }
        out
    }

    /// The largest vector included in both: the common ancestor's vector.
    pub fn meet(&self, other: &VersionVector) -> VersionVector {
        let mut out = BTreeMap::new();
        for (node, &n) in &self.0 {
            let m = n.min(other.get(node));
            if m > 0 {
                out.insert(node.clone(), m);
            }
        }
        VersionVector(out)
    }

    pub fn compare(&self, other: &VersionVector) -> Causality {
        let mut ahead = false;
        let mut behind = false;
        for node in self.0.keys().chain(other.0.keys()) {
            match self.get(node).cmp(&other.get(node)) {
                Ordering::Greater => ahead = true,
                Ordering::Less => behind = true,
                Ordering::Equal => {}
            }
        }
        match (ahead, behind) {
            (false, false) => Causality::Same,
            (true, false) => Causality::Newer,
            (false, true) => Causality::Older,
            (true, true) => Causality::Concurrent,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).unwrap_or_else(|_| "{}".to_string())
    }

    pub fn from_json(s: &str) -> Result<VersionVector, serde_json::Error> {
        serde_json::from_str(s).map(VersionVector)
    }
}

impl fmt::Display for VersionVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        write!(f, "{{{}}}", parts.join(","))
    }
}

/// A content hash: SHA-256 of the canonical body.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    pub fn of(bytes: &[u8]) -> ContentHash {
        ContentHash(Sha256::digest(bytes).into())
    }
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
    pub fn from_slice(b: &[u8]) -> Option<ContentHash> {
        <[u8; 32]>::try_from(b).ok().map(ContentHash)
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.short())
    }
}

/// A resource in canonical form, with everything derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub key: RecordKey,
    pub class: Class,
    /// For clinical records: the logical id of the Patient they belong to.
    pub patient: Option<String>,
    /// Canonical JSON bytes.
    pub body: Vec<u8>,
    pub hash: ContentHash,
}

impl Snapshot {
    /// Canonicalises a resource and derives its key, class and patient.
    pub fn from_json_value(mut value: serde_json::Value) -> Result<Snapshot, ModelError> {
        let obj = value.as_object_mut().ok_or(ModelError::NotObject)?;
        let kind = obj
            .get("resourceType")
            .and_then(|v| v.as_str())
            .ok_or(ModelError::NoResourceType)?
            .to_string();
        let id = obj
            .get("id")
            .and_then(|v| v.as_str())
            .ok_or(ModelError::NoId)?
            .to_string();
        let key = RecordKey::new(&kind, &id)?;
        // Server stamps differ between nodes for the same content; they are not content.
        let mut drop_meta = false;
        if let Some(meta) = obj.get_mut("meta").and_then(|m| m.as_object_mut()) {
            meta.remove("versionId");
            meta.remove("lastUpdated");
            drop_meta = meta.is_empty();
        }
        if drop_meta {
            obj.remove("meta");
        }
        let class = key.class();
        let patient = if class == Class::Clinical {
            patient_of(&key, &value)
        } else {
            None
        };
        // serde_json's Map is a BTreeMap (no preserve_order feature): keys serialise sorted.
        let body = serde_json::to_vec(&value).map_err(|e| ModelError::NotJson(e.to_string()))?;
        let hash = ContentHash::of(&body);
        Ok(Snapshot {
            key,
            class,
            patient,
            body,
            hash,
        })
    }

    pub fn from_json_bytes(bytes: &[u8]) -> Result<Snapshot, ModelError> {
        // A body already in key order (every body a peer of ours sends) is written
        // back in one pass; anything else is parsed into a Value.
        if let Some(fast) = canonical::fast(bytes) {
            let key = RecordKey::new(&fast.kind, &fast.id)?;
            let class = key.class();
            let patient = match class {
                Class::Clinical => patient_from_references(
                    &key,
                    [fast.subject_ref.as_deref(), fast.patient_ref.as_deref()],
                ),
                Class::Metadata => None,
            };
            let hash = ContentHash::of(&fast.body);
            return Ok(Snapshot {
                key,
                class,
                patient,
                body: fast.body,
                hash,
            });
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ModelError::NotJson(e.to_string()))?;
        Snapshot::from_json_value(value)
    }

    /// Like [`Snapshot::from_json_bytes`] but also checks the body names `key`.
    pub fn for_key(key: &RecordKey, bytes: &[u8]) -> Result<Snapshot, ModelError> {
        let snap = Snapshot::from_json_bytes(bytes)?;
        if &snap.key != key {
            return Err(ModelError::BadReference(format!(
                "body is {} but the record is {}",
                snap.key, key
            )));
        }
        Ok(snap)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// The patient a clinical resource belongs to: the Patient itself, or the Patient its
/// `subject` or `patient` reference names.
pub fn patient_of(key: &RecordKey, value: &serde_json::Value) -> Option<String> {
    let reference = |field: &str| {
        value
            .get(field)
            .and_then(|r| r.get("reference"))
            .and_then(|r| r.as_str())
    };
    patient_from_references(key, [reference("subject"), reference("patient")])
}

/// [`patient_of`], given the `reference` strings of `subject` and `patient`.
fn patient_from_references(key: &RecordKey, references: [Option<&str>; 2]) -> Option<String> {
    if key.kind == "Patient" {
        return Some(key.id.clone());
    }
    references.into_iter().flatten().find_map(|reference| {
        reference
            .rsplit_once("Patient/")
            .map(|(_, id)| id)
            .filter(|id| valid_id(id))
            .map(str::to_string)
    })
}

/// One version of a record as stored and sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub snapshot: Snapshot,
    pub origin: String,
    pub hlc: Hlc,
    pub vv: VersionVector,
    pub deleted: bool,
}

impl Version {
    pub fn key(&self) -> &RecordKey {
        &self.snapshot.key
    }
}

/// The identity of a version without its body: what an acknowledgement names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionStamp {
    pub hash: ContentHash,
    pub vv: VersionVector,
    pub deleted: bool,
}

/// Top-level fields that differ between two resource bodies: what `history` shows
/// as "what changed".
pub fn changed_fields(before: &serde_json::Value, after: &serde_json::Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let a = before.as_object().unwrap_or(&empty);
    let b = after.as_object().unwrap_or(&empty);
    let mut fields: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    fields.sort();
    fields.dedup();
    fields
}

/// Three-way merge of top-level fields against a common ancestor. Returns the merged
/// resource when the two sides changed disjoint fields (or changed a field the same
/// way), or `None` when both changed one field differently.
pub fn merge_fields(
    ancestor: &serde_json::Value,
    left: &serde_json::Value,
    right: &serde_json::Value,
) -> Option<serde_json::Value> {
    let empty = serde_json::Map::new();
    let base = ancestor.as_object().unwrap_or(&empty);
    let l = left.as_object()?;
    let r = right.as_object()?;
    let mut out = serde_json::Map::new();
    let mut keys: Vec<&String> = base.keys().chain(l.keys()).chain(r.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let (b, lv, rv) = (base.get(k), l.get(k), r.get(k));
        let chosen = if lv == rv || rv == b {
            lv
        } else if lv == b {
            rv
        } else {
            return None;
        };
        if let Some(v) = chosen {
            out.insert(k.clone(), v.clone());
        }
    }
    Some(serde_json::Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_data_that_makes_no_record_is_permanent() {
        use crate::error::{Classify, ErrorClass};
        for e in [
            ModelError::BadKind("x".into()),
            ModelError::BadId("!".into()),
            ModelError::BadReference("x".into()),
            ModelError::NotJson("x".into()),
            ModelError::NotObject,
            ModelError::NoResourceType,
            ModelError::NoId,
            ModelError::NoPatient {
                kind: "Encounter".into(),
            },
        ] {
            assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
        }
    }
    use serde_json::json;

    fn vv(pairs: &[(&str, u64)]) -> VersionVector {
        VersionVector(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    #[test]
    fn version_vectors_order_causally() {
        let a = vv(&[("a", 1)]);
        let ab = vv(&[("a", 1), ("hub", 1)]);
        let a2 = vv(&[("a", 2)]);
        assert_eq!(ab.compare(&a), Causality::Newer);
        assert_eq!(a.compare(&ab), Causality::Older);
        assert_eq!(a2.compare(&ab), Causality::Concurrent);
        assert_eq!(a.compare(&a.clone()), Causality::Same);
        assert_eq!(a2.join(&ab), vv(&[("a", 2), ("hub", 1)]));
        assert_eq!(a2.meet(&ab), vv(&[("a", 1)]));
        assert_eq!(a.bumped("a"), a2);
    }

    #[test]
    fn hlc_never_goes_backwards_when_the_wall_clock_does() {
        let t1 = Hlc::tick(Hlc::default(), 1000);
        let t2 = Hlc::tick(t1, 900);
        assert!(t2 > t1);
        let t3 = Hlc::observe(
            t2,
            Hlc {
                wall_ms: 5000,
                counter: 7,
            },
            1200,
        );
        assert!(
            t3 > Hlc {
                wall_ms: 5000,
                counter: 7
            }
        );
    }

    #[test]
    fn canonical_form_ignores_key_order_and_server_stamps() {
        let a = Snapshot::from_json_value(json!({"resourceType":"Patient","id":"p1","gender":"female","meta":{"versionId":"17","lastUpdated":"2026-01-01T00:00:00Z"}})).unwrap();
        let b =
            Snapshot::from_json_bytes(br#"{"gender":"female","id":"p1","resourceType":"Patient"}"#)
                .unwrap();
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.body, b.body);
        assert_eq!(a.patient.as_deref(), Some("p1"));
    }

    #[test]
    fn clinical_records_derive_their_patient() {
        let obs = Snapshot::from_json_value(
            json!({"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p9"}}),
        )
        .unwrap();
        assert_eq!(obs.class, Class::Clinical);
        assert_eq!(obs.patient.as_deref(), Some("p9"));
        let allergy = Snapshot::from_json_value(json!({"resourceType":"AllergyIntolerance","id":"x","patient":{"reference":"http://h/fhir/Patient/p3"}})).unwrap();
        assert_eq!(allergy.patient.as_deref(), Some("p3"));
        let loc = Snapshot::from_json_value(json!({"resourceType":"Location","id":"l1"})).unwrap();
        assert_eq!(loc.class, Class::Metadata);
        assert_eq!(loc.patient, None);
    }

    #[test]
    fn bad_keys_are_refused_with_the_offending_value() {
        assert_eq!(
            RecordKey::new("patient", "x"),
            Err(ModelError::BadKind("patient".into()))
        );
        assert_eq!(
            RecordKey::new("Patient", "a b"),
            Err(ModelError::BadId("a b".into()))
        );
        assert!(RecordKey::new("openmrs:concept", "1234-abcd").is_ok());
        assert!(RecordKey::parse("Patient").is_err());
        assert_eq!(
            Snapshot::from_json_bytes(b"[1]"),
            Err(ModelError::NotObject)
        );
        assert_eq!(
            Snapshot::from_json_bytes(br#"{"id":"x"}"#),
            Err(ModelError::NoResourceType)
        );
    }

    #[test]
    fn merge_takes_disjoint_field_edits_and_refuses_overlapping_ones() {
        let base = json!({"a":1,"b":1,"c":1});
        let left = json!({"a":2,"b":1,"c":1});
        let right = json!({"a":1,"b":3,"c":1,"d":4});
        assert_eq!(
            merge_fields(&base, &left, &right),
            Some(json!({"a":2,"b":3,"c":1,"d":4}))
        );
        let clash = json!({"a":5,"b":1,"c":1});
        assert_eq!(merge_fields(&base, &left, &clash), None);
        let removed = json!({"a":1,"b":1});
        assert_eq!(
            merge_fields(&base, &left, &removed),
            Some(json!({"a":2,"b":1}))
        );
    }
}
