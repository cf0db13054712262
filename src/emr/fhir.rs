//! The generic FHIR R4 adapter: any server that speaks FHIR R4 REST.
//!
//! Change capture: the system history `GET <base>/_history?_since=<instant>` where
//! the server has it, else, per configured type, `GET <base>/<Type>?_lastUpdated=ge<instant>&_sort=_lastUpdated`.
//! The cursor is JSON `{"mode": "history"|"search", "since": "<UTC instant>"}`.
//! Instants are always sent as UTC with a `Z` (some servers compare them as text),
//! and `_since` is put back on every `next` link (some servers drop it), with the
//! link's host replaced by ours (servers behind a proxy name themselves wrongly).
//! `_since` is inclusive, so the last version seen comes back once more; capture
//! recognises it as unchanged.
//!
//! Writes: `PUT <base>/<Type>/<id>`; when the record exists, the ETag from a read just
//! before goes along as `If-Match`, so a clinician's edit made in between is not
//! overwritten (the server answers 412, the write is retried next round, and the
//! edit is captured and reconciled by version vectors). Deletes: `DELETE`.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;

use super::{classify, Emr, EmrError, Fetched};
use crate::config::Secret;
use crate::model::{RecordKey, Snapshot, Version};

pub struct FhirServer {
    agent: ureq::Agent,
    base: String,
    auth: Option<String>,
    types: Vec<String>,
    start_now: bool,
}

impl std::fmt::Debug for FhirServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FhirServer({})", self.base)
    }
}

/// `2026-11-26T10:00:00.000Z` for epoch milliseconds.
fn instant(ms: u64) -> String {
    let s = crate::cli::fmt_time(ms);
    format!("{}.{:03}Z", s.trim_end_matches('Z'), ms % 1000)
}

impl FhirServer {
    pub fn new(
        base: &str,
        credentials: Option<(String, Secret)>,
        types: Vec<String>,
        start_now: bool,
        timeout: Duration,
    ) -> FhirServer {
        FhirServer {
            agent: ureq::AgentBuilder::new()
                .timeout(timeout)
                .timeout_connect(timeout.min(Duration::from_secs(10)))
                .build(),
            base: base.trim_end_matches('/').to_string(),
            auth: credentials.map(|(u, p)| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{}", p.expose()))
                )
            }),
            types,
            start_now,
        }
    }

    fn req(&self, method: &str, url: &str) -> ureq::Request {
        let r = self
            .agent
            .request(method, url)
            .set("Accept", "application/fhir+json");
        match &self.auth {
            Some(a) => r.set("Authorization", a),
            None => r,
        }
    }

    fn get_json(&self, url: &str) -> Result<Value, EmrError> {
        let resp = self.req("GET", url).call().map_err(|e| classify(url, e))?;
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

    /// Our base with the path and query of a server-made link, and `_since` restored.
    fn follow(&self, link: &str, since: Option<&str>) -> String {
        let after_base = match link.find("/_history").or_else(|| link.rfind('/')) {
            Some(_) => {
                // Keep what follows the server's own base: the last path segments and query.
                let path_and_query = link.split_once("://").map(|(_, rest)| rest).unwrap_or(link);
                let path_and_query = path_and_query.split_once('/').map(|(_, p)| p).unwrap_or("");
                let base_path = self
                    .base
                    .split_once("://")
                    .map(|(_, r)| r)
                    .unwrap_or(&self.base);
                let base_path = base_path.split_once('/').map(|(_, p)| p).unwrap_or("");
                path_and_query
                    .strip_prefix(base_path)
                    .unwrap_or(path_and_query)
                    .trim_start_matches('/')
                    .to_string()
            }
            None => link.to_string(),
        };
        let mut url = format!("{}/{}", self.base, after_base);
        if let Some(s) = since {
            if !url.contains("_since=") {
                url.push(if url.contains('?') { '&' } else { '?' });
                url.push_str("_since=");
                url.push_str(s);
            }
        }
        url
    }

    /// Walks a Bundle and its `next` links; returns (key, lastUpdated) pairs.
    fn walk(
        &self,
        first: &str,
        since_for_links: Option<&str>,
    ) -> Result<Vec<(RecordKey, String)>, EmrError> {
        let mut out = Vec::new();
        let mut url = first.to_string();
        for _ in 0..10_000 {
            let bundle = self.get_json(&url)?;
            if bundle.get("resourceType").and_then(|t| t.as_str()) != Some("Bundle") {
                return Err(EmrError::Unreadable(format!(
                    "{url} did not answer a Bundle"
                )));
            }
            for e in bundle
                .get("entry")
                .and_then(|e| e.as_array())
                .into_iter()
                .flatten()
            {
                let reference = e
                    .get("request")
                    .and_then(|r| r.get("url"))
                    .and_then(|u| u.as_str())
                    .map(str::to_string)
                    .or_else(|| {
                        let r = e.get("resource")?;
                        Some(format!(
                            "{}/{}",
                            r.get("resourceType")?.as_str()?,
                            r.get("id")?.as_str()?
                        ))
                    });
                let Some(reference) = reference else { continue };
                let mut parts = reference.split('?').next().unwrap_or("").rsplitn(3, '/');
                let (Some(id), Some(kind)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let Ok(key) = RecordKey::new(kind, id) else {
                    continue;
                };
                if !self.types.iter().any(|t| t == &key.kind) {
                    continue;
                }
                let updated = e
                    .get("resource")
                    .and_then(|r| r.get("meta"))
                    .and_then(|m| m.get("lastUpdated"))
                    .or_else(|| e.get("response").and_then(|r| r.get("lastModified")))
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string();
                out.push((key, updated));
            }
            let next = bundle
                .get("link")
                .and_then(|l| l.as_array())
                .and_then(|links| {
                    links
                        .iter()
                        .find(|l| l.get("relation").and_then(|r| r.as_str()) == Some("next"))
                })
                .and_then(|l| l.get("url"))
                .and_then(|u| u.as_str());
            match next {
                Some(n) => url = self.follow(n, since_for_links),
                None => return Ok(out),
            }
        }
        Err(EmrError::Unreadable(format!(
            "{first}: paging does not end"
        )))
    }
}

impl Emr for FhirServer {
    fn changes(&mut self, cursor: Option<&str>) -> Result<(Vec<RecordKey>, String), EmrError> {
        let c: BTreeMap<String, String> = cursor
            .and_then(|c| serde_json::from_str(c).ok())
            .unwrap_or_default();
        let now = instant(crate::store::wall_ms());
        let since = match c.get("since") {
            Some(s) => s.clone(),
            None if self.start_now => {
                let cur = BTreeMap::from([
                    ("mode".to_string(), "history".to_string()),
                    ("since".to_string(), now),
                ]);
                return Ok((Vec::new(), serde_json::to_string(&cur).unwrap_or_default()));
            }
            None => "1970-01-01T00:00:00.000Z".to_string(),
        };
        let mut mode = c.get("mode").cloned().unwrap_or_else(|| "history".into());
        let mut found = Vec::new();
        if mode == "history" {
            let url = format!("{}/_history?_since={since}&_count=200", self.base);
            match self.walk(&url, Some(&since)) {
                Ok(mut v) => {
                    // History lists newest first.
                    v.reverse();
                    found = v;
                }
                // No system history here: fall back to _lastUpdated search for good.
                Err(EmrError::Refused {
                    status: 400 | 404 | 405 | 501,
                    ..
                }) => mode = "search".into(),
                Err(e) => return Err(e),
            }
        }
        if mode == "search" {
            for t in &self.types {
                let url = format!(
                    "{}/{t}?_lastUpdated=ge{since}&_sort=_lastUpdated&_count=200",
                    self.base
                );
                found.extend(self.walk(&url, None)?);
            }
        }
        let newest = found
            .iter()
            .map(|(_, u)| u.clone())
            .filter(|u| !u.is_empty())
            .max()
            .unwrap_or(since);
        let cur = BTreeMap::from([("mode".to_string(), mode), ("since".to_string(), newest)]);
        Ok((
            found.into_iter().map(|(k, _)| k).collect(),
            serde_json::to_string(&cur).unwrap_or_default(),
        ))
    }

    fn fetch(&mut self, key: &RecordKey) -> Result<Option<Fetched>, EmrError> {
        let url = format!("{}/{}/{}", self.base, key.kind, key.id);
        match self.req("GET", &url).call() {
            Ok(resp) => {
                let text = resp
                    .into_string()
                    .map_err(|e| EmrError::Unavailable(format!("{url}: {e}")))?;
                let snap = Snapshot::from_json_bytes(text.as_bytes())
                    .map_err(|e| EmrError::Unreadable(format!("{url}: {e}")))?;
                Ok(Some(Fetched::Present(snap)))
            }
            Err(ureq::Error::Status(410, _)) => Ok(Some(Fetched::Gone)),
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(classify(&url, e)),
        }
    }

    fn apply(&mut self, v: &Version) -> Result<Fetched, EmrError> {
        let key = v.key();
        let url = format!("{}/{}/{}", self.base, key.kind, key.id);
        if v.deleted {
            return match self.req("DELETE", &url).call() {
                Ok(_) | Err(ureq::Error::Status(404 | 410, _)) => Ok(Fetched::Gone),
                Err(e) => Err(classify(&url, e)),
            };
        }
        // The ETag of what is there now, if anything: the write must replace exactly that.
        let etag = match self.req("GET", &url).call() {
            Ok(r) => r.header("ETag").map(str::to_string),
            Err(ureq::Error::Status(404 | 410, _)) => None,
            Err(e) => return Err(classify(&url, e)),
        };
        let mut put = self
            .req("PUT", &url)
            .set("Content-Type", "application/fhir+json");
        if let Some(tag) = &etag {
            put = put.set("If-Match", tag);
        }
        match put.send_string(&v.snapshot.json().to_string()) {
            Ok(resp) => {
                let text = resp.into_string().unwrap_or_default();
                match Snapshot::from_json_bytes(text.as_bytes()) {
                    Ok(s) => Ok(Fetched::Present(s)),
                    // Servers may answer with no body: read it back.
                    Err(_) => self.fetch(key)?.ok_or_else(|| {
                        EmrError::Unreadable(format!("{key} was written but cannot be read back"))
                    }),
                }
            }
            Err(ureq::Error::Status(412, _)) => Err(EmrError::Unavailable(format!(
                "{url}: changed in the EMR while we wrote it (412); retried after capture"
            ))),
            Err(e) => Err(classify(&url, e)),
        }
    }

    fn probe(&mut self) -> Result<String, EmrError> {
        let url = format!("{}/metadata", self.base);
        let v = self.get_json(&url)?;
        let software = v
            .get("software")
            .and_then(|s| s.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("a FHIR server");
        Ok(format!("{} answers ({software})", self.base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_are_utc_with_z_and_milliseconds() {
        assert_eq!(instant(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
    }

    #[test]
    fn next_links_get_our_host_and_their_since_back() {
        let f = FhirServer::new(
            "http://127.0.0.1:18090/fhir",
            None,
            vec![],
            false,
            Duration::from_secs(1),
        );
        assert_eq!(
            f.follow("http://localhost:8090/fhir/_history?_count=2&_offset=2", Some("2026-01-01T00:00:00.000Z")),
            "http://127.0.0.1:18090/fhir/_history?_count=2&_offset=2&_since=2026-01-01T00:00:00.000Z"
        );
        assert_eq!(
            f.follow("http://localhost:8090/fhir/Patient?_offset=5", None),
            "http://127.0.0.1:18090/fhir/Patient?_offset=5"
        );
    }
}
