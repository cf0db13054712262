//! The OpenMRS adapter: change capture from the atomfeed module, reads and writes
//! through FHIR2 R4 for the types it carries, REST v1 for the metadata it cannot.
//!
//! Feeds: `/openmrs/ws/atomfeed/<category>/recent`, older pages reached through
//! `prev-archive` links. The cursor keeps one marker per category (the id of the
//! last entry captured, `tag:atomfeed.ict4h.org:<uuid>`), as JSON:
//! `{"patient": "tag:…", "encounter": "tag:…"}`. A first run reads a category from
//! its beginning, or — `emr.start = "now"`, for a clinic cloned from another's
//! database — marks the present and captures nothing old.
//!
//! Entry content is either a bare REST URL (`/openmrs/ws/rest/v1/patient/<uuid>?v=full`)
//! or a JSON object with `rest` and `fhir` links; both map to a record key:
//! FHIR2 types by the `fhir` link or the REST resource name (patient → Patient,
//! encounter → Encounter, obs → Observation, location → Location, person → Person,
//! provider → Practitioner), everything else to `openmrs:<resource>`. Action terms
//! (CREATED, UPDATED, VOIDED, UNVOIDED, RETIRED, UNRETIRED, DELETED) need no special
//! case: the adapter fetches the record's current state, and FHIR2 answers 410 Gone
//! for voided or retired records.
//!
//! Errors: a garbage feed, a broken archive chain or a marker that cannot be found
//! stops capture for that round with a message naming the URL; nothing is captured
//! twice or skipped, because markers only move after the records are stored.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;

use super::{classify, Emr, EmrError, Fetched};
use crate::config::Secret;
use crate::model::{RecordKey, Snapshot, Version};

/// Where a first run starts reading a feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Beginning,
    Now,
}

pub struct OpenMrs {
    agent: ureq::Agent,
    base: String,
    auth: String,
    categories: Vec<String>,
    start: Start,
}

impl std::fmt::Debug for OpenMrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpenMrs({})", self.base)
    }
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

/// The record an entry's content names.
pub fn key_of_content(content: &str) -> Result<RecordKey, String> {
    let link = if content.trim_start().starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(content).map_err(|e| format!("entry content is not JSON: {e}"))?;
        v.get("fhir")
            .and_then(|f| f.as_str())
            .or_else(|| v.get("rest").and_then(|r| r.as_str()))
            .ok_or("entry content has neither a fhir nor a rest link")?
            .to_string()
    } else {
        content.trim().to_string()
    };
    let path = link.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let (resource, uuid) = match parts.as_slice() {
        [.., r, u] => (*r, *u),
        _ => return Err(format!("cannot read a record from {link:?}")),
    };
    let kind = if path.contains("/fhir2/") {
        resource.to_string()
    } else {
        rest_to_kind(resource)
    };
    RecordKey::new(&kind, uuid).map_err(|e| e.to_string())
}

fn rest_to_kind(resource: &str) -> String {
    match resource {
        "patient" => "Patient".into(),
        "encounter" => "Encounter".into(),
        "obs" => "Observation".into(),
        "location" => "Location".into(),
        "person" => "Person".into(),
        "provider" => "Practitioner".into(),
        other => format!("openmrs:{}", other.to_ascii_lowercase()),
    }
}

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
        }
    }

    fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_string()
        } else {
            format!("{}{}", self.base, path_or_url)
        }
    }

    fn get(&self, url: &str) -> Result<ureq::Response, EmrError> {
        self.agent
            .get(url)
            .set("Authorization", &self.auth)
            .call()
            .map_err(|e| classify(url, e))
    }

    fn page(&self, url: &str) -> Result<Page, EmrError> {
        let body = self
            .get(url)?
            .into_string()
            .map_err(|e| EmrError::Unavailable(format!("{url}: {e}")))?;
        parse_feed(&body).map_err(|e| EmrError::Unreadable(format!("atom feed {url}: {e}")))
    }

    /// New entries of one category after `marker`, oldest first, and the new marker.
    fn category_changes(
        &self,
        category: &str,
        marker: Option<&str>,
    ) -> Result<(Vec<Entry>, Option<String>), EmrError> {
        let recent = self.url(&format!("/openmrs/ws/atomfeed/{category}/recent"));
        let mut pages = vec![self.page(&recent)?];
        let newest = pages[0].entries.last().map(|e| e.id.clone());
        if marker.is_none() && self.start == Start::Now {
            return Ok((Vec::new(), newest));
        }
        loop {
            let current = pages.last().cloned().unwrap_or_default();
            if let Some(m) = marker {
                if current.entries.iter().any(|e| e.id == m) {
                    break;
                }
            }
            match current.links.get("prev-archive") {
                Some(prev) => {
                    let url = self.url(prev);
                    let page = self.page(&url).map_err(|e| match e {
                        EmrError::Refused { status, message } => EmrError::Unreadable(format!(
                            "feed {category}: archive chain broken at {url} (HTTP {status}: {message})"
                        )),
                        other => other,
                    })?;
                    pages.push(page);
                    if pages.len() > 100_000 {
                        return Err(EmrError::Unreadable(format!(
                            "feed {category}: archive chain does not end"
                        )));
                    }
                }
                None if marker.is_some() => {
                    return Err(EmrError::Unreadable(format!(
                        "feed {category}: marker {} not found in the feed (was the feed rebuilt?)",
                        marker.unwrap_or_default()
                    )))
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
        let new_marker = newest.or_else(|| marker.map(str::to_string));
        Ok((out, new_marker))
    }

    fn fhir_url(&self, key: &RecordKey) -> String {
        format!("{}/openmrs/ws/fhir2/R4/{}/{}", self.base, key.kind, key.id)
    }

    fn rest_url(&self, key: &RecordKey) -> Option<String> {
        key.kind
            .strip_prefix("openmrs:")
            .map(|r| format!("{}/openmrs/ws/rest/v1/{r}/{}", self.base, key.id))
    }

    fn json(url: &str, resp: ureq::Response) -> Result<serde_json::Value, EmrError> {
        let text = resp
            .into_string()
            .map_err(|e| EmrError::Unavailable(format!("{url}: {e}")))?;
        serde_json::from_str(&text).map_err(|e| {
            EmrError::Unreadable(format!(
                "{url} did not answer JSON ({e}): {:?}",
                text.chars().take(80).collect::<String>()
            ))
        })
    }

    /// REST v1 representations carry the uuid but no resourceType: give them ours.
    fn rest_snapshot(key: &RecordKey, mut v: serde_json::Value) -> Result<Snapshot, EmrError> {
        if let Some(o) = v.as_object_mut() {
            o.remove("links");
            o.insert("resourceType".into(), key.kind.clone().into());
            o.insert("id".into(), key.id.clone().into());
            o.remove("uuid");
        }
        Snapshot::from_json_value(v).map_err(|e| EmrError::Unreadable(format!("{key}: {e}")))
    }

    // ureq's error is large, and this is the only place it is returned from.
    #[allow(clippy::result_large_err)]
    fn send(
        &self,
        method: &str,
        url: &str,
        body: &serde_json::Value,
    ) -> Result<ureq::Response, ureq::Error> {
        self.agent
            .request(method, url)
            .set("Authorization", &self.auth)
            .set("Content-Type", "application/fhir+json")
            .send_string(&body.to_string())
    }
}

impl Emr for OpenMrs {
    fn changes(&mut self, cursor: Option<&str>) -> Result<(Vec<RecordKey>, String), EmrError> {
        let mut markers: BTreeMap<String, String> = cursor
            .and_then(|c| serde_json::from_str(c).ok())
            .unwrap_or_default();
        let mut keys = Vec::new();
        for category in &self.categories {
            let (entries, marker) =
                self.category_changes(category, markers.get(category).map(String::as_str))?;
            for e in entries {
                match key_of_content(&e.content) {
                    Ok(k) => keys.push(k),
                    Err(why) => {
                        tracing::warn!(feed = %category, entry = %e.id, error = %why, "skipping an unreadable feed entry")
                    }
                }
            }
            if let Some(m) = marker {
                markers.insert(category.clone(), m);
            }
        }
        Ok((keys, serde_json::to_string(&markers).unwrap_or_default()))
    }

    fn fetch(&mut self, key: &RecordKey) -> Result<Option<Fetched>, EmrError> {
        let url = match self.rest_url(key) {
            Some(u) => format!("{u}?v=full"),
            None => self.fhir_url(key),
        };
        match self.agent.get(&url).set("Authorization", &self.auth).call() {
            Ok(resp) => {
                let v = OpenMrs::json(&url, resp)?;
                let snap = if key.kind.starts_with("openmrs:") {
                    OpenMrs::rest_snapshot(key, v)?
                } else {
                    Snapshot::from_json_value(v)
                        .map_err(|e| EmrError::Unreadable(format!("{url}: {e}")))?
                };
                if key.kind.starts_with("openmrs:")
                    && snap.json().get("retired").and_then(|r| r.as_bool()) == Some(true)
                {
                    return Ok(Some(Fetched::Gone));
                }
                Ok(Some(Fetched::Present(snap)))
            }
            Err(ureq::Error::Status(410, _)) => Ok(Some(Fetched::Gone)),
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(classify(&url, e)),
        }
    }

    fn apply(&mut self, v: &Version) -> Result<Fetched, EmrError> {
        let key = v.key();
        if let Some(rest) = self.rest_url(key) {
            // REST v1: POST to the uuid updates, POST to the collection creates.
            let mut body = v.snapshot.json();
            if let Some(o) = body.as_object_mut() {
                o.remove("resourceType");
                o.remove("id");
                if v.deleted {
                    o.insert("retired".into(), true.into());
                }
            }
            let r = match self.send("POST", &rest, &body) {
                Err(ureq::Error::Status(404, _)) => {
                    let collection = rest
                        .rsplit_once('/')
                        .map(|(c, _)| c.to_string())
                        .unwrap_or_default();
                    if let Some(o) = body.as_object_mut() {
                        o.insert("uuid".into(), key.id.clone().into());
                    }
                    self.send("POST", &collection, &body)
                }
                other => other,
            };
            r.map_err(|e| classify(&rest, e))?;
        } else {
            let url = self.fhir_url(key);
            if v.deleted {
                match self
                    .agent
                    .delete(&url)
                    .set("Authorization", &self.auth)
                    .call()
                {
                    Ok(_) | Err(ureq::Error::Status(404 | 410, _)) => {}
                    Err(e) => return Err(classify(&url, e)),
                }
            } else {
                let body = v.snapshot.json();
                // FHIR2 updates with PUT but creates clinical records only with POST.
                match self.send("PUT", &url, &body) {
                    Ok(_) => {}
                    Err(ureq::Error::Status(404 | 410, _)) => {
                        let collection = format!("{}/openmrs/ws/fhir2/R4/{}", self.base, key.kind);
                        self.send("POST", &collection, &body)
                            .map_err(|e| classify(&collection, e))?;
                    }
                    Err(e) => return Err(classify(&url, e)),
                }
            }
        }
        match self.fetch(key)? {
            Some(f) => Ok(f),
            None => Err(EmrError::Unreadable(format!(
                "{key} was written but cannot be read back"
            ))),
        }
    }

    fn probe(&mut self) -> Result<String, EmrError> {
        let cat = self
            .categories
            .first()
            .cloned()
            .unwrap_or_else(|| "patient".into());
        let url = self.url(&format!("/openmrs/ws/atomfeed/{cat}/recent"));
        let p = self.page(&url)?;
        Ok(format!(
            "{} answers; {cat} feed has {} recent entries",
            self.base,
            p.entries.len()
        ))
    }
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
            RecordKey::new("Patient", "5b1c-aa").unwrap()
        );
        assert_eq!(
            key_of_content(&p.entries[1].content).unwrap(),
            RecordKey::new("Encounter", "e-1").unwrap()
        );
        assert_eq!(
            key_of_content("/openmrs/ws/rest/v1/concept/c-1?v=full").unwrap(),
            RecordKey::new("openmrs:concept", "c-1").unwrap()
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
