//! Each fact the simulator reproduces, pinned over real HTTP on 127.0.0.1.

use base64::Engine as _;
use serde_json::{json, Value};

use super::*;

const USER: &str = "admin";
const PASS: &str = "Admin123";

fn sim() -> OpenMrsSim {
    OpenMrsSim::start(USER, PASS).unwrap()
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// (status, headers we look at, body) of a request with the admin's credentials.
fn call(method: &str, url: &str, body: Option<Value>) -> (u16, ureq::Response) {
    call_as(method, url, body, Some((USER, PASS)), &[])
}

fn call_as(
    method: &str,
    url: &str,
    body: Option<Value>,
    creds: Option<(&str, &str)>,
    headers: &[(&str, &str)],
) -> (u16, ureq::Response) {
    let mut req = ureq::request(method, url);
    if let Some((u, p)) = creds {
        req = req.set("Authorization", &basic(u, p));
    }
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let r = match body {
        Some(b) => req
            .set("Content-Type", "application/json")
            .send_string(&b.to_string()),
        None => req.call(),
    };
    match r {
        Ok(resp) => (resp.status(), resp),
        Err(ureq::Error::Status(code, resp)) => (code, resp),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

fn text(r: ureq::Response) -> String {
    r.into_string().unwrap()
}

fn json_of(r: ureq::Response) -> Value {
    serde_json::from_str(&r.into_string().unwrap()).unwrap()
}

fn patient(id: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "gender": "female",
        "identifier": [{"use": "official", "value": "100-1", "type": {"coding": [{"code": "idtype-1"}]}}],
        "name": [{"family": "Otieno", "given": ["Amina"]}], "address": [{"district": "North"}]})
}

fn obs(id: &str, patient: &str, value: f64) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
        "code": {"coding": [{"code": "5089AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "effectiveDateTime": "2026-11-26T10:00:00Z", "valueQuantity": {"value": value}})
}

fn categories(s: &OpenMrsSim) -> Vec<(String, Vec<String>)> {
    s.events()
        .into_iter()
        .map(|e| (e.category, e.terms))
        .collect()
}

#[test]
fn the_shipped_feed_configuration_names_old_fhir_links_and_rest_paths_without_the_context() {
    let s = sim();
    s.save(patient("p-1"));
    s.save(obs("o-1", "p-1", 60.0));
    let events = s.events();
    let p = events.iter().find(|e| e.category == "patient").unwrap();
    assert_eq!(
        p.content,
        r#"{"rest":"/ws/rest/v1/patient/p-1?v=full","fhir":"/ws/fhir/Patient/p-1"}"#
    );
    assert_eq!(p.terms, vec!["CREATED", "patient"]);
    // The category is `observation`, not `obs`.
    assert!(events
        .iter()
        .any(|e| e.category == "observation" && e.content.contains("/ws/fhir/Observation/o-1")));
    // The names, identifiers and addresses are objects of their own.
    for cat in ["person_name", "patient_identifier", "person_address"] {
        assert!(
            events
                .iter()
                .any(|e| e.category == cat && e.content.contains("/p-1/")),
            "{cat}: {events:?}"
        );
    }
    // `concept` is disabled; no configuration announces Condition or MedicationDispense.
    call(
        "POST",
        &format!("{}/openmrs/ws/rest/v1/concept", s.url),
        Some(json!({"uuid": "c-1", "datatype": "numeric"})),
    );
    s.save(
        json!({"resourceType": "Condition", "id": "cd-1", "subject": {"reference": "Patient/p-1"}}),
    );
    s.save(json!({"resourceType": "MedicationDispense", "id": "md-1", "subject": {"reference": "Patient/p-1"}}));
    let after = s.events();
    assert_eq!(after.len(), events.len(), "{after:?}");
    for style in [FeedStyle::Fhir2, FeedStyle::Bahmni] {
        s.set_feed_style(style);
        s.save(json!({"resourceType": "Condition", "id": "cd-1", "clinicalStatus": {"text": "x"}}));
        assert_eq!(s.events().len(), events.len(), "{style:?}");
    }
}

#[test]
fn a_name_correction_is_an_event_of_the_name_alone() {
    let s = sim();
    s.save(patient("p-1"));
    let before = s.events().len();
    s.edit_name("p-1", "Amina", "Odhiambo");
    let new: Vec<_> = categories(&s).into_iter().skip(before).collect();
    assert_eq!(
        new,
        vec![(
            "person_name".to_string(),
            vec!["UPDATED".to_string(), "person_name".to_string()]
        )]
    );
    let e = s.events().pop().unwrap();
    let name_id = s.get("Patient", "p-1").unwrap().unwrap()["name"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        e.content,
        format!(r#"{{"rest":"/ws/rest/v1/person/p-1/name/{name_id}?v=full"}}"#)
    );
    // Adding a name changes the person's collection: the patient is UPDATED too.
    let mut p = s.get("Patient", "p-1").unwrap().unwrap();
    p["name"]
        .as_array_mut()
        .unwrap()
        .push(json!({"family": "Alias", "given": ["A"]}));
    let before = s.events().len();
    s.save(p);
    let new: Vec<String> = categories(&s)
        .into_iter()
        .skip(before)
        .map(|(c, _)| c)
        .collect();
    assert_eq!(new, vec!["person_name", "patient"]);
}

#[test]
fn feed_pages_hold_five_link_absolute_urls_and_need_no_credentials() {
    let s = sim();
    let recent = format!("{}/openmrs/ws/atomfeed/patient/recent", s.url);
    // Empty: page 0, no entries, no archive links.
    let (code, r) = call_as("GET", &recent, None, None, &[]);
    assert_eq!(code, 200);
    let xml = text(r);
    assert!(
        xml.contains("+0</id>") && !xml.contains("<entry>") && !xml.contains("prev-archive"),
        "{xml}"
    );
    for i in 0..12 {
        s.save(patient(&format!("p-{i}")));
    }
    let (_, r) = call_as("GET", &recent, None, None, &[]);
    let page = crate::emr::openmrs::parse_feed(&text(r)).unwrap();
    assert_eq!(
        page.entries.len(),
        2,
        "12 events: pages of 5, the recent one holds 2"
    );
    let port = s.url.rsplit(':').next().unwrap();
    assert_eq!(
        page.links["self"],
        format!("http://127.0.0.1:{port}/openmrs/ws/atomfeed/patient/recent")
    );
    assert_eq!(
        page.links["via"],
        format!("http://127.0.0.1:{port}/openmrs/ws/atomfeed/patient/3")
    );
    assert_eq!(
        page.links["prev-archive"],
        format!("http://127.0.0.1:{port}/openmrs/ws/atomfeed/patient/2")
    );
    let (_, r) = call(
        "GET",
        &format!("{}/openmrs/ws/atomfeed/patient/2", s.url),
        None,
    );
    let p2 = crate::emr::openmrs::parse_feed(&text(r)).unwrap();
    assert_eq!(p2.entries.len(), 5);
    assert!(
        p2.links.contains_key("next-archive")
            && p2.entries[0].id.starts_with("tag:atomfeed.ict4h.org:")
    );
    // A page that does not exist: NumberFeedGenerator throws, the client sees a 500.
    let (code, _) = call(
        "GET",
        &format!("{}/openmrs/ws/atomfeed/patient/9", s.url),
        None,
    );
    assert_eq!(code, 500);
}

#[test]
fn archive_links_name_the_host_the_request_or_the_uri_prefix_names() {
    let s = sim();
    for i in 0..6 {
        s.save(patient(&format!("p-{i}")));
    }
    let recent = format!("{}/openmrs/ws/atomfeed/patient/recent", s.url);
    let prev = |headers: &[(&str, &str)]| {
        let (_, r) = call_as("GET", &recent, None, None, headers);
        crate::emr::openmrs::parse_feed(&text(r)).unwrap().links["prev-archive"].clone()
    };
    assert_eq!(
        prev(&[("Host", "emr.clinic.internal")]),
        "http://emr.clinic.internal/openmrs/ws/atomfeed/patient/1"
    );
    assert_eq!(
        prev(&[("Host", "emr.example.org"), ("X-Forwarded-Proto", "https")]),
        "https://emr.example.org:443/openmrs/ws/atomfeed/patient/1"
    );
    s.set_uri_prefix(Some("http://proxy.invalid:8080/openmrs"));
    assert_eq!(
        prev(&[]),
        "http://proxy.invalid:8080/openmrs/ws/atomfeed/patient/1"
    );
}

#[test]
fn fhir2_post_ignores_the_client_id_and_put_of_an_unknown_id_is_404_unless_upsert_allows() {
    let s = sim();
    let base = format!("{}/openmrs/ws/fhir2/R4", s.url);
    let (code, r) = call("POST", &format!("{base}/Patient"), Some(patient("mine")));
    assert_eq!(code, 201);
    let location = r.header("Location").unwrap().to_string();
    let created = json_of(r);
    let id = created["id"].as_str().unwrap();
    assert_ne!(id, "mine");
    assert!(location.contains(&format!("/Patient/{id}/_history/")));
    assert!(s.get("Patient", "mine").is_none());

    let loc = json!({"resourceType": "Location", "id": "loc-1", "name": "Dispensary"});
    let (code, r) = call("PUT", &format!("{base}/Location/loc-1"), Some(loc.clone()));
    assert_eq!(code, 404);
    assert!(text(r).contains("Resource of type Location with ID loc-1 is not known"));
    // Listing a type whose provider cannot upsert changes nothing.
    s.set_upsert("Patient,Location");
    let (code, _) = call("PUT", &format!("{base}/Patient/p-9"), Some(patient("p-9")));
    assert_eq!(code, 404);
    let (code, _) = call("PUT", &format!("{base}/Location/loc-1"), Some(loc));
    assert_eq!(code, 201);
    assert!(s.get("Location", "loc-1").is_some());
}

#[test]
fn updating_an_observation_voids_it_and_creates_a_new_amended_obs() {
    let s = sim();
    s.save(patient("p-1"));
    s.save(obs("o-1", "p-1", 60.0));
    let before = s.events().len();
    let base = format!("{}/openmrs/ws/fhir2/R4", s.url);
    let (code, r) = call(
        "PUT",
        &format!("{base}/Observation/o-1"),
        Some(obs("o-1", "p-1", 61.0)),
    );
    assert_eq!(code, 200);
    let new = json_of(r);
    let new_id = new["id"].as_str().unwrap().to_string();
    assert_ne!(new_id, "o-1");
    assert_eq!(new["status"], "amended");
    assert_eq!(new["valueQuantity"]["value"], 61.0);
    let (code, _) = call("GET", &format!("{base}/Observation/o-1"), None);
    assert_eq!(code, 410, "the original is voided");
    // REST shows the link to the previous obs through a custom representation.
    let (_, r) = call(
        "GET",
        &format!(
            "{}/openmrs/ws/rest/v1/obs/{new_id}?v=custom:(uuid,voided,previousVersion:(uuid))",
            s.url
        ),
        None,
    );
    assert_eq!(
        json_of(r),
        json!({"uuid": new_id, "voided": false, "previousVersion": {"uuid": "o-1"}})
    );
    let new_events: Vec<_> = categories(&s)
        .into_iter()
        .skip(before)
        .map(|(_, t)| t[0].clone())
        .collect();
    assert_eq!(new_events, vec!["CREATED", "UPDATED", "VOIDED"]);
    // A clinician's edit in the UI amends the same way.
    let third = s.save(obs(&new_id, "p-1", 62.0));
    assert_eq!(s.previous_version(&third).as_deref(), Some(new_id.as_str()));
}

#[test]
fn credentials_fail_as_html_on_fhir2_json_on_rest_and_repeated_failures_lock_the_account() {
    let s = sim();
    let fhir = format!("{}/openmrs/ws/fhir2/R4/Patient/p-1", s.url);
    let (code, r) = call_as("GET", &fhir, None, Some((USER, "wrong")), &[]);
    assert_eq!(code, 401);
    assert!(r.content_type().starts_with("text/html"));
    assert!(text(r).contains("Not authenticated"));
    let rest = format!("{}/openmrs/ws/rest/v1/patient/p-1", s.url);
    let (code, r) = call_as("GET", &rest, None, Some((USER, "wrong")), &[]);
    assert_eq!(code, 401);
    assert!(r.header("WWW-Authenticate").is_some());
    assert!(json_of(r)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("User is not logged in"));
    // A missing privilege: 403 on REST; FHIR2 lets HAPI answer it as a 500.
    s.set_account("clerk", "clerk-pass", Some(&["Get Locations"]));
    let (code, _) = call_as("GET", &rest, None, Some(("clerk", "clerk-pass")), &[]);
    assert_eq!(code, 403);
    let (code, r) = call_as("GET", &fhir, None, Some(("clerk", "clerk-pass")), &[]);
    assert_eq!(code, 500);
    assert!(text(r).contains("Privileges required: Get Patients"));
    // 7 failures allowed; the 8th locks; the right password is then refused too.
    for _ in 0..6 {
        call_as("GET", &fhir, None, Some((USER, "wrong")), &[]);
    }
    assert!(s.locked(USER));
    let (code, _) = call("GET", &fhir, None);
    assert_eq!(code, 401, "locked: even the right password");
}

#[test]
fn rest_creates_keep_the_client_uuid_and_a_patient_takes_its_persons() {
    let s = sim();
    let rest = format!("{}/openmrs/ws/rest/v1", s.url);
    let (code, _) = call(
        "POST",
        &format!("{rest}/person"),
        Some(
            json!({"uuid": "net-1", "names": [{"givenName": "Amina", "familyName": "Otieno"}], "gender": "F"}),
        ),
    );
    assert_eq!(code, 201);
    let (code, r) = call(
        "POST",
        &format!("{rest}/patient"),
        Some(
            json!({"person": "net-1", "identifiers": [{"identifier": "100-1", "identifierType": "idtype-1"}]}),
        ),
    );
    assert_eq!(code, 201, "{}", text(r));
    let p = s.get("Patient", "net-1").unwrap().unwrap();
    assert_eq!(p["gender"], "female");
    let (code, _) = call(
        "POST",
        &format!("{rest}/obs"),
        Some(
            json!({"uuid": "o-net", "person": "net-1", "concept": "c-1", "obsDatetime": "2026-11-26T10:00:00Z", "value": 61.5}),
        ),
    );
    assert_eq!(code, 201);
    let (_, r) = call(
        "GET",
        &format!("{}/openmrs/ws/fhir2/R4/Observation/o-net", s.url),
        None,
    );
    assert_eq!(json_of(r)["valueQuantity"]["value"], 61.5);
}

#[test]
fn rest_validation_errors_put_their_detail_in_global_and_field_errors() {
    let s = sim();
    let rest = format!("{}/openmrs/ws/rest/v1", s.url);
    call(
        "POST",
        &format!("{rest}/person"),
        Some(
            json!({"uuid": "p-1", "names": [{"givenName": "A", "familyName": "B"}], "gender": "F"}),
        ),
    );
    let (code, r) = call(
        "POST",
        &format!("{rest}/patient"),
        Some(json!({"person": "p-1", "identifiers": [{"identifier": "100-1"}]})),
    );
    assert_eq!(code, 400);
    let e = json_of(r);
    assert_eq!(e["error"]["message"], "Invalid Submission");
    assert_eq!(
        e["error"]["fieldErrors"]["identifiers[0].identifierType"][0]["message"],
        "Cannot be empty or null"
    );
    assert!(e["error"]["globalErrors"].is_array());
    // Resource names are case-sensitive.
    let (code, r) = call("GET", &format!("{rest}/Patient/p-1"), None);
    assert_eq!(code, 404);
    assert!(json_of(r)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Unknown resource: v1/Patient"));
    // Properties REST only shows cannot be set.
    let (code, _) = call(
        "POST",
        &format!("{rest}/concept"),
        Some(json!({"uuid": "c-9", "display": "Weight"})),
    );
    assert_eq!(code, 400);
}

#[test]
fn fhir2_writes_a_narrative_naming_the_serving_host() {
    let s = sim();
    s.save(patient("p-1"));
    let (_, r) = call_as(
        "GET",
        &format!("{}/openmrs/ws/fhir2/R4/Patient/p-1", s.url),
        None,
        Some((USER, PASS)),
        &[("Host", "emr-a.clinic.internal:8080")],
    );
    let v = json_of(r);
    assert_eq!(v["text"]["status"], "generated");
    assert!(v["text"]["div"]
        .as_str()
        .unwrap()
        .contains("http://emr-a.clinic.internal:8080/openmrs/ws/fhir2/R4/Patient/p-1"));
}

#[test]
fn fhir2_has_no_history_and_pages_searches_by_ten() {
    let s = sim();
    for i in 0..23 {
        s.save(json!({"resourceType": "Condition", "id": format!("c-{i:02}")}));
    }
    let base = format!("{}/openmrs/ws/fhir2/R4", s.url);
    let (code, _) = call(
        "GET",
        &format!("{base}/_history?_since=2026-01-01T00:00:00Z"),
        None,
    );
    assert_eq!(code, 400);
    let (_, r) = call(
        "GET",
        &format!("{base}/Condition?_lastUpdated=ge2020-01-01T00:00:00Z"),
        None,
    );
    let b = json_of(r);
    assert_eq!(
        (b["total"].as_u64(), b["entry"].as_array().unwrap().len()),
        (Some(23), 10)
    );
    let next = b["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(next.contains("_getpages="));
    let (_, r) = call("GET", &next, None);
    assert_eq!(json_of(r)["entry"].as_array().unwrap().len(), 10);
    let (_, r) = call(
        "GET",
        &format!("{base}/Condition?_lastUpdated=ge2020-01-01T00:00:00Z&_count=500"),
        None,
    );
    assert_eq!(
        json_of(r)["entry"].as_array().unwrap().len(),
        23,
        "at most 100 a page"
    );
}

#[test]
fn bahmni_publishes_bare_urls_and_encounter_transactions() {
    let s = sim();
    s.set_feed_style(FeedStyle::Bahmni);
    s.save(patient("p-1"));
    s.save(json!({"resourceType": "Encounter", "id": "e-1", "subject": {"reference": "Patient/p-1"},
        "type": [{"coding": [{"system": "http://fhir.openmrs.org/code-system/encounter-type", "code": "et"}]}]}));
    let mut o = obs("o-1", "p-1", 60.0);
    o["encounter"] = json!({"reference": "Encounter/e-1"});
    s.save(o);
    s.edit_name("p-1", "Amina", "Odhiambo");
    let ev = s.events();
    let got: Vec<(&str, &str)> = ev
        .iter()
        .map(|e| (e.category.as_str(), e.content.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("patient", "/openmrs/ws/rest/v1/patient/p-1?v=full"),
            (
                "Encounter",
                "/openmrs/ws/rest/v1/bahmnicore/bahmniencounter/e-1?includeAll=true"
            ),
            (
                "Encounter",
                "/openmrs/ws/rest/v1/bahmnicore/bahmniencounter/e-1?includeAll=true"
            ),
            ("patient", "/openmrs/ws/rest/v1/patient/p-1?v=full"),
        ]
    );
    assert!(
        ev.iter().all(|e| e.terms == vec![e.category.clone()]),
        "no action terms"
    );
    // The feed URL's category matches whatever its case.
    let (_, r) = call(
        "GET",
        &format!("{}/openmrs/ws/atomfeed/encounter/recent", s.url),
        None,
    );
    assert_eq!(
        crate::emr::openmrs::parse_feed(&text(r))
            .unwrap()
            .entries
            .len(),
        2
    );
}

#[test]
fn a_custom_configuration_can_link_fhir2() {
    let s = sim();
    s.set_feed_style(FeedStyle::Fhir2);
    s.save(obs("o-1", "p-0", 1.0));
    let e = s
        .events()
        .into_iter()
        .find(|e| e.category == "observation")
        .unwrap();
    assert!(
        e.content
            .contains(r#""fhir":"/ws/fhir2/R4/Observation/o-1""#),
        "{}",
        e.content
    );
}

#[test]
fn modules_settings_and_session_answer_as_openmrs_does() {
    let s = sim();
    let rest = format!("{}/openmrs/ws/rest/v1", s.url);
    let (_, r) = call("GET", &format!("{rest}/module?v=full"), None);
    let ids: Vec<String> = json_of(r)["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["uuid"].as_str().unwrap().to_string())
        .collect();
    for m in ["webservices.rest", "fhir2", "atomfeed"] {
        assert!(ids.iter().any(|i| i == m), "{ids:?}");
    }
    let (_, r) = call(
        "GET",
        &format!("{rest}/systemsetting?q=fhir2.upsert&v=full"),
        None,
    );
    let v = json_of(r);
    assert_eq!(
        v["results"][0]["property"],
        "fhir2.upsert.supported.resources"
    );
    assert!(v["results"][0]["value"].is_null(), "empty by default");
    let (_, r) = call_as(
        "GET",
        &format!("{rest}/session?v=full"),
        None,
        Some((USER, "nope")),
        &[],
    );
    assert_eq!(json_of(r)["authenticated"], false);
    let (_, r) = call("GET", &format!("{rest}/session?v=full"), None);
    let v = json_of(r);
    assert_eq!(v["authenticated"], true);
    assert_eq!(v["user"]["roles"][0]["name"], "System Developer");
    // The Date header carries the server's clock (skewed on request).
    s.with(|st| st.clock_skew_ms = 3_600_000);
    let (_, r) = call("GET", &format!("{rest}/session"), None);
    let remote = crate::time::http_date_ms(r.header("Date").unwrap()).unwrap();
    assert!(remote > crate::time::wall_ms() + 3_500_000);
}

#[test]
fn events_wait_in_the_publisher_queue_when_held() {
    let s = sim();
    s.with(|st| st.hold_events = true);
    s.save(patient("p-1"));
    assert!(s.events().is_empty());
    s.with(|st| st.publish());
    assert!(!s.events().is_empty());
}

#[test]
fn every_attempt_on_a_locked_account_restarts_its_lock() {
    let s = sim();
    s.with(|st| {
        st.allowed_failed_logins = 1;
        st.unlock_ms = 400;
    });
    let url = format!("{}/openmrs/ws/fhir2/R4/Patient/p-1", s.url);
    for _ in 0..2 {
        call_as("GET", &url, None, Some((USER, "wrong")), &[]);
    }
    assert!(s.locked(USER));
    // Retrying more often than the unlock time keeps it locked, right password or not.
    for _ in 0..4 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let (code, _) = call("GET", &url, None);
        assert_eq!(code, 401);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (code, _) = call("GET", &url, None);
    assert_eq!(
        code, 404,
        "unlocked once left alone: the patient is simply unknown"
    );
}

#[test]
fn fhir2_delete_voids_and_a_voided_record_reads_as_gone() {
    let s = sim();
    s.save(patient("p-1"));
    let url = format!("{}/openmrs/ws/fhir2/R4/Patient/p-1", s.url);
    let before = s.events().len();
    let (code, _) = call("DELETE", &url, None);
    assert_eq!(code, 200);
    let (code, r) = call("GET", &url, None);
    assert_eq!(code, 410);
    assert!(text(r).contains("is gone/deleted"));
    let terms: Vec<String> = s.events()[before..]
        .iter()
        .map(|e| e.terms[0].clone())
        .collect();
    assert_eq!(terms, vec!["UPDATED", "VOIDED"]);
}
