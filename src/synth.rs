//! Synthetic OpenMRS-shaped FHIR R4 data for the demo, benchmarks and tests:
//! Locations, Patients with OpenMRS identifiers and addresses, Encounters and
//! Observations with CIEL concept codes, as the FHIR2 module renders them.
//! Deterministic for a given seed.

use serde_json::{json, Value};

/// A small deterministic generator (xorshift64*), so fixtures never change.
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
    /// A UUID-shaped id, as OpenMRS uses.
    pub fn uuid(&mut self) -> String {
        let a = self.next_u64();
        let b = self.next_u64();
        format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        )
    }
}

const GIVEN: &[&str] = &[
    "Amina", "Baraka", "Chebet", "Daudi", "Esther", "Faith", "Goran", "Halima", "Imani", "Juma",
    "Kamau", "Wanjiru",
];
const FAMILY: &[&str] = &[
    "Otieno",
    "Mwangi",
    "Kiptoo",
    "Achieng",
    "Mutua",
    "Njeri",
    "Wafula",
    "Chepkoech",
    "Omondi",
    "Kariuki",
];
const VITALS: &[(&str, &str, &str, f64, f64)] = &[
    (
        "5085AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "Systolic blood pressure",
        "mmHg",
        90.0,
        170.0,
    ),
    (
        "5086AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "Diastolic blood pressure",
        "mmHg",
        55.0,
        110.0,
    ),
    (
        "5087AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "Pulse",
        "beats/min",
        50.0,
        130.0,
    ),
    (
        "5088AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "Temperature (C)",
        "DEG C",
        35.5,
        40.0,
    ),
    (
        "5089AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "Weight (kg)",
        "kg",
        3.0,
        110.0,
    ),
    (
        "5090AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "Height (cm)",
        "cm",
        50.0,
        195.0,
    ),
];

pub fn location(id: &str, name: &str, district: &str) -> Value {
    json!({
        "resourceType": "Location", "id": id, "status": "active", "name": name,
        "description": format!("{name} health facility"),
        "address": {"district": district, "country": "Kenya"},
        "physicalType": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/location-physical-type", "code": "si", "display": "Site"}]},
        "meta": {"tag": [{"system": "http://fhir.openmrs.org/ext/location-tag", "code": "Login Location"}]}
    })
}

pub fn patient(g: &mut Gen, id: &str, district: &str) -> Value {
    let given = g.pick(GIVEN);
    let family = g.pick(FAMILY);
    let year = 1950 + g.below(70);
    json!({
        "resourceType": "Patient", "id": id, "active": true,
        "identifier": [{
            "id": g.uuid(), "use": "official",
            "type": {"text": "OpenMRS ID"},
            "value": format!("{}-{}", 100000 + g.below(900000), g.below(10)),
            "extension": [{"url": "http://fhir.openmrs.org/ext/patient/identifier#location", "valueReference": {"reference": "Location/loc-central", "type": "Location"}}]
        }],
        "name": [{"id": g.uuid(), "family": family, "given": [given], "text": format!("{given} {family}")}],
        "gender": if g.below(2) == 0 { "female" } else { "male" },
        "birthDate": format!("{year}-{:02}-{:02}", 1 + g.below(12), 1 + g.below(28)),
        "deceasedBoolean": false,
        "address": [{"id": g.uuid(), "use": "home", "district": district, "city": format!("{district} town"), "country": "Kenya"}]
    })
}

pub fn encounter(g: &mut Gen, id: &str, patient: &str, location: &str, day: u64) -> Value {
    json!({
        "resourceType": "Encounter", "id": id, "status": "unknown",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [{"coding": [{"system": "http://fhir.openmrs.org/code-system/encounter-type", "code": "67a71486-1a54-468f-ac3e-7091a9a79584", "display": "Vitals"}]}],
        "subject": {"reference": format!("Patient/{patient}"), "type": "Patient"},
        "participant": [{"individual": {"reference": "Practitioner/prov-1", "type": "Practitioner"}}],
        "period": {"start": format!("2026-{:02}-{:02}T{:02}:{:02}:00+03:00", 1 + day % 12, 1 + day % 28, 8 + g.below(9), g.below(60))},
        "location": [{"location": {"reference": format!("Location/{location}"), "type": "Location"}}]
    })
}

pub fn observation(g: &mut Gen, id: &str, patient: &str, encounter: &str) -> Value {
    let (code, display, unit, lo, hi) = VITALS[g.below(VITALS.len() as u64) as usize];
    let value = lo + (hi - lo) * (g.below(1000) as f64 / 1000.0);
    json!({
        "resourceType": "Observation", "id": id, "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"code": code, "display": display}, {"system": "https://cielterminology.org", "code": &code[..4]}], "text": display},
        "subject": {"reference": format!("Patient/{patient}"), "type": "Patient"},
        "encounter": {"reference": format!("Encounter/{encounter}"), "type": "Encounter"},
        "effectiveDateTime": "2026-11-20T09:30:00+03:00",
        "issued": "2026-11-20T09:31:12.000+03:00",
        "valueQuantity": {"value": (value * 10.0).round() / 10.0, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
    })
}

/// A clinic's day of work: `patients` Patients, each with `enc` Encounters of `obs`
/// Observations. Returns resources in dependency order.
pub fn clinic_records(
    seed: u64,
    prefix: &str,
    district: &str,
    location: &str,
    patients: usize,
    enc: usize,
    obs: usize,
) -> Vec<Value> {
    let mut g = Gen::new(seed);
    let mut out = Vec::with_capacity(patients * (1 + enc * (1 + obs)));
    for p in 0..patients {
        let pid = format!("{prefix}-p{p}");
        out.push(patient(&mut g, &pid, district));
        for e in 0..enc {
            let eid = format!("{prefix}-e{p}-{e}");
            out.push(encounter(&mut g, &eid, &pid, location, (p + e) as u64));
            for o in 0..obs {
                out.push(observation(
                    &mut g,
                    &format!("{prefix}-o{p}-{e}-{o}"),
                    &pid,
                    &eid,
                ));
            }
        }
    }
    out
}

/// Wraps resources in a FHIR transaction Bundle.
pub fn bundle(resources: Vec<Value>) -> Value {
    json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": resources.into_iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()
    })
}
