//! Room `model::canonical`: the canonical form of a body, in one pass when it is
//! already in key order.
//!
//! The canonical form (see [`super::Snapshot`]) is what serde_json writes for the
//! body parsed into a `Value`: compact, object keys sorted (its map is a BTreeMap),
//! `meta.versionId`/`meta.lastUpdated` removed and an emptied `meta` dropped. Every
//! body a clinicsync node sends is canonical already, so the hub spent most of its
//! validation building a `Value` only to write the same bytes back. [`fast`] writes
//! them straight from the parser instead, checking on the way that each object's
//! keys are strictly ascending, and picks up what the snapshot needs (kind, id, the
//! `reference` of `subject` and `patient`).
//!
//! Invariant: when [`fast`] returns `Some`, its bytes and facts are exactly what the
//! slow path gives (the test `fast_path_agrees_with_the_slow_path` holds it to that
//! on random bodies). For anything else it returns `None` and the caller takes the
//! slow path, which also names the error: not JSON, not an object, keys out of order
//! or repeated, a server stamp or an empty `meta` to remove, a `resourceType` or
//! `id` that is not a string.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// A canonical body and the facts a snapshot takes from it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Fast {
    pub body: Vec<u8>,
    pub kind: String,
    pub id: String,
    /// `subject.reference`, when a string.
    pub subject_ref: Option<String>,
    /// `patient.reference`, when a string.
    pub patient_ref: Option<String>,
}

/// The canonical form of `bytes` in one pass, if they are already in key order and
/// carry nothing the canonical form removes; `None` sends the caller to the slow path.
pub(super) fn fast(bytes: &[u8]) -> Option<Fast> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut facts = Facts::default();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    Node {
        out: &mut out,
        facts: &mut facts,
        role: Role::Top,
    }
    .deserialize(&mut de)
    .ok()?;
    de.end().ok()?;
    Some(Fast {
        body: out,
        kind: facts.kind?,
        id: facts.id?,
        subject_ref: facts.subject_ref,
        patient_ref: facts.patient_ref,
    })
}

#[derive(Default)]
struct Facts {
    kind: Option<String>,
    id: Option<String>,
    subject_ref: Option<String>,
    patient_ref: Option<String>,
}

/// Where a value sits, as far as the snapshot's facts care.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The resource itself: must be an object.
    Top,
    /// `resourceType`, `id`.
    Kind,
    Id,
    /// `meta`: if an object, it must be non-empty and hold no server stamp.
    Meta,
    /// `subject`, `patient`: their `reference` is picked up.
    Subject,
    Patient,
    SubjectRef,
    PatientRef,
    Other,
}

impl Role {
    fn of_key(self, key: &str) -> Role {
        match (self, key) {
            (Role::Top, "resourceType") => Role::Kind,
            (Role::Top, "id") => Role::Id,
            (Role::Top, "meta") => Role::Meta,
            (Role::Top, "subject") => Role::Subject,
            (Role::Top, "patient") => Role::Patient,
            (Role::Subject, "reference") => Role::SubjectRef,
            (Role::Patient, "reference") => Role::PatientRef,
            _ => Role::Other,
        }
    }
}

/// Writes one value in canonical form as it is parsed.
struct Node<'a> {
    out: &'a mut Vec<u8>,
    facts: &'a mut Facts,
    role: Role,
}

impl Node<'_> {
    fn child(&mut self, role: Role) -> Node<'_> {
        Node {
            out: self.out,
            facts: self.facts,
            role,
        }
    }

    fn scalar<E: de::Error>(&mut self, v: impl serde::Serialize) -> Result<(), E> {
        if self.role == Role::Top {
            return Err(E::custom("not an object"));
        }
        // The same serializer calls a Value's scalars make: the same bytes.
        serde_json::to_writer(&mut *self.out, &v).map_err(E::custom)
    }

    fn string<E: de::Error>(&mut self, s: &str) -> Result<(), E> {
        self.scalar(s)?;
        let slot = match self.role {
            Role::Kind => &mut self.facts.kind,
            Role::Id => &mut self.facts.id,
            Role::SubjectRef => &mut self.facts.subject_ref,
            Role::PatientRef => &mut self.facts.patient_ref,
            _ => return Ok(()),
        };
        *slot = Some(s.to_string());
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(mut self, v: bool) -> Result<(), E> {
        self.scalar(v)
    }

    fn visit_i64<E: de::Error>(mut self, v: i64) -> Result<(), E> {
        self.scalar(v)
    }

    fn visit_u64<E: de::Error>(mut self, v: u64) -> Result<(), E> {
        self.scalar(v)
    }

    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<(), E> {
        self.scalar(v)
    }

    fn visit_unit<E: de::Error>(mut self) -> Result<(), E> {
        self.scalar(())
    }

    fn visit_str<E: de::Error>(mut self, v: &str) -> Result<(), E> {
        self.string(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        if self.role == Role::Top {
            return Err(de::Error::custom("not an object"));
        }
        self.out.push(b'[');
        let mut first = true;
        loop {
            if !first {
                self.out.push(b',');
            }
            if seq.next_element_seed(self.child(Role::Other))?.is_none() {
                if !first {
                    self.out.pop();
                }
                break;
            }
            first = false;
        }
        self.out.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.out.push(b'{');
        let mut prev: Option<Cow<'de, str>> = None;
        while let Some(key) = map.next_key_seed(Key)? {
            // Strictly ascending, as a BTreeMap would write them; a repeated key
            // (which a Value keeps the last of) is not.
            if prev.as_deref().is_some_and(|p| p >= &*key) {
                return Err(de::Error::custom("keys out of order"));
            }
            if self.role == Role::Meta && (key == "versionId" || key == "lastUpdated") {
                return Err(de::Error::custom("server stamp"));
            }
            if prev.is_some() {
                self.out.push(b',');
            }
            serde_json::to_writer(&mut *self.out, &*key).map_err(de::Error::custom)?;
            self.out.push(b':');
            let role = self.role.of_key(&key);
            map.next_value_seed(self.child(role))?;
            prev = Some(key);
        }
        if self.role == Role::Meta && prev.is_none() {
            return Err(de::Error::custom("empty meta"));
        }
        self.out.push(b'}');
        Ok(())
    }
}

/// An object key, borrowed from the input unless it holds escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::Snapshot;
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// The slow path alone: parse into a Value, then canonicalise.
    fn slow(bytes: &[u8]) -> Result<Snapshot, crate::model::ModelError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| crate::model::ModelError::NotJson(e.to_string()))?;
        Snapshot::from_json_value(value)
    }

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[a-zA-Z0-9 \"\\\\/\\n\\t\\u{0}-\\u{1f}é€😀]{0,12}".prop_map(Value::from),
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("resourceType".to_string()),
            Just("id".to_string()),
            Just("meta".to_string()),
            Just("versionId".to_string()),
            Just("lastUpdated".to_string()),
            Just("subject".to_string()),
            Just("patient".to_string()),
            Just("reference".to_string()),
            "[a-zA-Z\"\\\\é]{1,6}",
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        scalar().prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// A body as text: keys in the order given (sorted, shuffled or repeated), with or
    /// without whitespace.
    fn text(v: &Value, shuffle: &mut impl FnMut() -> bool, spaced: bool) -> String {
        match v {
            Value::Object(m) => {
                let mut kv: Vec<_> = m.iter().collect();
                if shuffle() {
                    kv.reverse();
                }
                if shuffle() && !kv.is_empty() {
                    kv.push(kv[0]);
                }
                let sep = if spaced { ", " } else { "," };
                let parts: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| {
                        format!(
                            "{}:{}",
                            serde_json::to_string(k).unwrap(),
                            text(v, shuffle, spaced)
                        )
                    })
                    .collect();
                format!("{{{}}}", parts.join(sep))
            }
            Value::Array(a) => {
                let parts: Vec<String> = a.iter().map(|v| text(v, shuffle, spaced)).collect();
                format!("[{}]", parts.join(","))
            }
            other => serde_json::to_string(other).unwrap(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn fast_path_agrees_with_the_slow_path(
            mut body in prop::collection::vec((key(), value()), 0..8),
            kind in prop_oneof![Just(json!("Observation")), Just(json!("Patient")), Just(json!("Location")), Just(json!(7)), Just(json!("bad kind"))],
            id in prop_oneof![Just(json!("o-1")), Just(json!("a b")), Just(json!(null))],
            reference in prop_oneof![Just(json!({"reference": "Patient/p-9"})), Just(json!({"reference": "x/Patient/bad id"})), Just(json!({"display": "x"})), Just(json!("Patient/p-1"))],
            meta in prop_oneof![Just(None), Just(Some(json!({}))), Just(Some(json!({"versionId": "3"}))), Just(Some(json!({"profile": ["x"], "lastUpdated": "t"}))), Just(Some(json!({"tag": [{"code": "a"}]}))), Just(Some(json!("m")))],
            flips in prop::collection::vec(any::<bool>(), 64),
            spaced in any::<bool>(),
        ) {
            body.push(("resourceType".into(), kind));
            body.push(("id".into(), id));
            body.push(("subject".into(), reference));
            if let Some(m) = meta {
                body.push(("meta".into(), m));
            }
            let v = Value::Object(body.into_iter().collect());
            let mut i = 0;
            let mut shuffle = || { i += 1; flips[i % flips.len()] };
            let bytes = text(&v, &mut shuffle, spaced);
            prop_assert_eq!(Snapshot::from_json_bytes(bytes.as_bytes()), slow(bytes.as_bytes()));
            // And a canonical body takes the fast path, unchanged.
            if let Ok(s) = slow(bytes.as_bytes()) {
                let again = fast(&s.body).expect("a canonical body takes the fast path");
                prop_assert_eq!(&again.body, &s.body);
            }
        }
    }

    #[test]
    fn only_key_ordered_bodies_without_stamps_take_the_fast_path() {
        let ok = br#"{"id":"o1","meta":{"profile":["p"]},"resourceType":"Observation","subject":{"reference":"Patient/p2"},"valueQuantity":{"value":1.50}}"#;
        let f = fast(ok).unwrap();
        assert_eq!(f.kind, "Observation");
        assert_eq!(f.subject_ref.as_deref(), Some("Patient/p2"));
        // 1.50 is written as a Value would write it.
        assert!(String::from_utf8(f.body)
            .unwrap()
            .contains(r#""value":1.5}"#));
        for refused in [
            &br#"{"resourceType":"Observation","id":"o1"}"#[..],
            br#"{"id":"o1","id":"o2","resourceType":"Observation"}"#,
            br#"{"id":"o1","meta":{"versionId":"2"},"resourceType":"Observation"}"#,
            br#"{"id":"o1","meta":{},"resourceType":"Observation"}"#,
            br#"{"id":1,"resourceType":"Observation"}"#,
            br#"[{"id":"o1","resourceType":"Observation"}]"#,
            br#"{"id":"o1","resourceType":"Observation"} x"#,
        ] {
            assert!(
                fast(refused).is_none(),
                "{}",
                String::from_utf8_lossy(refused)
            );
        }
    }
}
