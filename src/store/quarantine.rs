//! Room `quarantine`: records that could not be pushed or applied, and why.
//!
//! Table: `quarantine(kind, id, stage, reason, permanent, attempts, first_ms,
//! last_ms, next_retry_ms, blocked_by)`, one row per (record, [`Stage`]).
//!
//! Invariants
//! - One bad record never blocks the rest: batch building and inbox application
//!   skip a quarantined record until `next_retry_ms`, everything else flows.
//! - A record waiting for another (`blocked_by`, migration 10) is released by that
//!   column when its blocker succeeds ([`Tx::release_blocked_by`]), never by matching
//!   its reason's text; a new quarantine of the same row clears `blocked_by`.
//! - A pulled record this node cannot read waits at stage `pull` with its row held
//!   in the inbox as received; the cursor moves past it, the rest of the page
//!   applies, and a readable version of it pulled later releases it.
//! - Reasons are kept to [`MAX_REASON_CHARS`] characters (an EMR's answer can be a
//!   whole error page).
//!
//! Errors: a failure rolls the transaction back; the record keeps its previous
//! quarantine state (or none).

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{Result, Store, Tx};
use crate::model::RecordKey;

/// Longest quarantine reason kept, in characters.
pub const MAX_REASON_CHARS: usize = 2_000;

/// `text` as a peer's reason is kept: its first [`MAX_REASON_CHARS`] characters and
/// how many more there were (an EMR's error page, a hostile parent's megabytes).
pub fn clip_reason(text: &str) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(MAX_REASON_CHARS) {
        None => std::borrow::Cow::Borrowed(text),
        Some((at, _)) => std::borrow::Cow::Owned(format!(
            "{}… ({} more characters)",
            &text[..at],
            text[at..].chars().count()
        )),
    }
}

/// `reason` with the names of records left out: the id after `Kind/` (a word
/// starting with an upper-case letter, then `/`) and a word that is a UUID become
/// `…`. "Patient/5b0c… is not in the catchment of clinic-a: …" and the same for
/// another patient have one pattern.
pub fn reason_pattern(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    for (n, word) in reason.split(' ').enumerate() {
        if n > 0 {
            out.push(' ');
        }
        // Punctuation that ends a sentence or a clause stays.
        let body = word.trim_end_matches([':', ',', ';', '.', ')', '"', '\'']);
        let tail = &word[body.len()..];
        let lead = body.len() - body.trim_start_matches(['(', '"', '\'']).len();
        let (open, name) = body.split_at(lead);
        out.push_str(open);
        match name.split_once('/') {
            Some((kind, id))
                if !id.is_empty()
                    && kind.starts_with(|c: char| c.is_ascii_uppercase())
                    && kind.chars().all(|c| c.is_ascii_alphanumeric()) =>
            {
                out.push_str(kind);
                out.push_str("/…");
            }
            _ if is_uuid(name) => out.push('…'),
            _ => out.push_str(name),
        }
        out.push_str(tail);
    }
    out
}

fn is_uuid(w: &str) -> bool {
    w.len() == 36
        && w.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

text_enum! {
    /// Where a quarantined record is stuck (`quarantine.stage`).
    pub enum Stage {
        /// The parent refused it on push.
        Push = "push",
        /// It could not be applied locally after a pull.
        Apply = "apply",
        /// It came from the parent but this node cannot read it (a body that is not
        /// FHIR JSON or names another record); held in the inbox as received and
        /// read again on each retry, so a node upgraded to read it recovers it.
        Pull = "pull",
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct QuarantineEntry {
    pub record: String,
    pub stage: Stage,
    pub reason: String,
    pub permanent: bool,
    pub attempts: u32,
    pub first_ms: u64,
    pub last_ms: u64,
    pub next_retry_ms: u64,
}

impl Store {
    pub fn quarantine_list(&self) -> Result<Vec<QuarantineEntry>> {
        let mut stmt = self.conn.prepare(
            "SELECT kind, id, stage, reason, permanent, attempts, first_ms, last_ms, next_retry_ms FROM quarantine ORDER BY first_ms, kind, id",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let record = format!("{}/{}", r.get::<_, String>(0)?, r.get::<_, String>(1)?);
            out.push(QuarantineEntry {
                stage: Stage::decode("quarantine", "stage", &record, &r.get::<_, String>(2)?)?,
                record,
                reason: r.get(3)?,
                permanent: r.get(4)?,
                attempts: r.get::<_, i64>(5)? as u32,
                first_ms: r.get::<_, i64>(6)? as u64,
                last_ms: r.get::<_, i64>(7)? as u64,
                next_retry_ms: r.get::<_, i64>(8)? as u64,
            });
        }
        Ok(out)
    }

    /// The most common quarantine reasons, most records first, each as its
    /// [`reason_pattern`]: reasons that differ only in the records they name count
    /// together (a hub refusing 300 records of one clinic for one cause is one
    /// reason 300×, not 300 reasons 1×), and no record or patient is named.
    pub fn quarantine_reasons(&self, limit: usize) -> Result<Vec<(String, u64)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT reason, COUNT(*) FROM quarantine GROUP BY reason")?;
        let mut rows = stmt.query([])?;
        let mut by_pattern: std::collections::HashMap<String, u64> = Default::default();
        while let Some(r) = rows.next()? {
            let reason: String = r.get(0)?;
            *by_pattern.entry(reason_pattern(&reason)).or_default() += r.get::<_, i64>(1)? as u64;
        }
        let mut top: Vec<(String, u64)> = by_pattern.into_iter().collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(limit);
        Ok(top)
    }

    /// Reasons records wait in the apply quarantine, by key (for dependency blocking).
    pub fn apply_quarantine(&self, key: &RecordKey) -> Result<Option<String>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT reason FROM quarantine WHERE kind=?1 AND id=?2 AND stage='apply'",
            )?
            .query_row(params![key.kind, key.id], |r| r.get(0))
            .optional()?)
    }

    /// Records quarantined at the apply stage whose retry is due and that do not wait
    /// in the inbox (at a hub with an EMR: versions from children the EMR refused).
    pub fn apply_due_outside_inbox(&self, now_ms: u64, limit: usize) -> Result<Vec<RecordKey>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT q.kind, q.id FROM quarantine q
              WHERE q.stage='apply' AND q.next_retry_ms <= ?1
                AND NOT EXISTS (SELECT 1 FROM inbox i WHERE i.kind=q.kind AND i.id=q.id)
              ORDER BY q.next_retry_ms LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![now_ms as i64, limit as i64], |r| {
            Ok(RecordKey {
                kind: r.get(0)?,
                id: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }
}

impl Tx<'_> {
    /// Puts a record in quarantine (or bumps its attempts), returning the attempt count.
    pub fn quarantine(
        &mut self,
        key: &RecordKey,
        stage: Stage,
        reason: &str,
        permanent: bool,
        now_ms: u64,
        retry_after_ms: impl Fn(u32) -> u64,
    ) -> Result<u32> {
        // An EMR's answer can be a whole error page or stack trace: keep the head.
        let reason = clip_reason(reason);
        let reason = reason.as_ref();
        let attempts: u32 = self
            .tx
            .prepare_cached("SELECT attempts FROM quarantine WHERE kind=?1 AND id=?2 AND stage=?3")?
            .query_row(params![key.kind, key.id, stage.as_str()], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
            .unwrap_or(0) as u32
            + 1;
        let next = now_ms + retry_after_ms(attempts);
        self.tx
            .prepare_cached(
                "INSERT INTO quarantine(kind, id, stage, reason, permanent, attempts, first_ms, last_ms, next_retry_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8)
                 ON CONFLICT(kind, id, stage) DO UPDATE SET reason=excluded.reason, permanent=excluded.permanent,
                   attempts=excluded.attempts, last_ms=excluded.last_ms, next_retry_ms=excluded.next_retry_ms,
                   blocked_by=NULL",
            )?
            .execute(params![key.kind, key.id, stage.as_str(), reason, permanent, attempts as i64, now_ms as i64, next as i64])?;
        Ok(attempts)
    }

    /// Quarantines `key` (apply stage) until `dep` succeeds or `retry_ms` passes.
    pub fn quarantine_waiting(
        &mut self,
        key: &RecordKey,
        dep: &RecordKey,
        why: &str,
        now_ms: u64,
        retry_ms: u64,
    ) -> Result<u32> {
        let reason = format!(
            "waiting for {dep}: {}",
            why.trim_start_matches("waiting for ")
        );
        let n = self.quarantine(key, Stage::Apply, &reason, false, now_ms, |_| retry_ms)?;
        self.tx
            .prepare_cached(
                "UPDATE quarantine SET blocked_by=?3 WHERE kind=?1 AND id=?2 AND stage='apply'",
            )?
            .execute(params![key.kind, key.id, dep.to_string()])?;
        Ok(n)
    }

    /// Whether any record is quarantined at `stage` (in this transaction's view).
    pub fn any_quarantined(&self, stage: Stage) -> Result<bool> {
        Ok(self
            .tx
            .prepare_cached("SELECT 1 FROM quarantine WHERE stage=?1 LIMIT 1")?
            .query_row(params![stage.as_str()], |_| Ok(()))
            .optional()?
            .is_some())
    }

    pub fn release(&mut self, key: &RecordKey, stage: Stage) -> Result<bool> {
        Ok(self
            .tx
            .prepare_cached("DELETE FROM quarantine WHERE kind=?1 AND id=?2 AND stage=?3")?
            .execute(params![key.kind, key.id, stage.as_str()])?
            > 0)
    }

    /// Makes records blocked behind `key` due now.
    pub fn release_blocked_by(&mut self, key: &RecordKey, now_ms: u64) -> Result<usize> {
        Ok(self.tx.execute(
            "UPDATE quarantine SET next_retry_ms=?1 WHERE stage='apply' AND blocked_by=?2",
            params![now_ms as i64, key.to_string()],
        )?)
    }

    /// Makes quarantined records due now. `None` means all of them.
    pub fn retry_now(&mut self, key: Option<&RecordKey>, now_ms: u64) -> Result<usize> {
        let n = match key {
            Some(k) => self.tx.execute(
                "UPDATE quarantine SET next_retry_ms=?3 WHERE kind=?1 AND id=?2",
                params![k.kind, k.id, now_ms as i64],
            )?,
            None => self.tx.execute(
                "UPDATE quarantine SET next_retry_ms=?1",
                params![now_ms as i64],
            )?,
        };
        Ok(n)
    }

    /// Removes a record from quarantine and from the queue each of its stages waits
    /// in: the outbox for `push`, the inbox for `apply` and `pull`. A queue no stage
    /// holds is left alone (a record held unreadable from a pull keeps its local edit
    /// waiting to go up). The replica keeps whatever it holds; history keeps every
    /// version.
    pub fn drop_quarantined(&mut self, key: &RecordKey, now_ms: u64) -> Result<bool> {
        let stages: Vec<String> = self
            .tx
            .prepare_cached("SELECT stage FROM quarantine WHERE kind=?1 AND id=?2")?
            .query_map(params![key.kind, key.id], |r| r.get(0))?
            .collect::<std::result::Result<_, _>>()?;
        if stages.is_empty() {
            return Ok(false);
        }
        self.tx.execute(
            "DELETE FROM quarantine WHERE kind=?1 AND id=?2",
            params![key.kind, key.id],
        )?;
        if stages.iter().any(|s| s == Stage::Push.as_str()) {
            self.tx.execute(
                "DELETE FROM outbox WHERE kind=?1 AND id=?2",
                params![key.kind, key.id],
            )?;
        }
        if stages
            .iter()
            .any(|s| s == Stage::Apply.as_str() || s == Stage::Pull.as_str())
        {
            self.tx.execute(
                "DELETE FROM inbox WHERE kind=?1 AND id=?2",
                params![key.kind, key.id],
            )?;
        }
        // Records that waited behind it try again now (and meet whatever the EMR says).
        self.release_blocked_by(key, now_ms)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn reasons_that_differ_only_in_the_records_they_name_count_together() {
        let (_d, mut store) = crate::store::temp_store("a");
        let mut tx = store.begin().unwrap();
        for (i, p) in ["5b0c2a7e-0d1f-4a8e-9c3b-2f1e0d9c8b7a", "p2", "p3"]
            .iter()
            .enumerate()
        {
            let key = RecordKey::parse(&format!("Observation/o{i}")).unwrap();
            let reason = format!("Patient/{p} is not in the catchment of clinic-a: a node writes only for its own patients (retried)");
            tx.quarantine(&key, Stage::Push, &reason, false, 1, |_| 1)
                .unwrap();
        }
        let key = RecordKey::parse("Patient/p9").unwrap();
        tx.quarantine(
            &key,
            Stage::Apply,
            "EMR refused (HTTP 500) for 0b6a4f1e-5d3c-4f8a-9b1e-2c3d4e5f6a7b.",
            false,
            1,
            |_| 1,
        )
        .unwrap();
        tx.commit().unwrap();
        assert_eq!(
            store.quarantine_reasons(5).unwrap(),
            [
                (
                    "Patient/… is not in the catchment of clinic-a: a node writes only for its own patients (retried)".to_string(),
                    3
                ),
                ("EMR refused (HTTP 500) for ….".to_string(), 1),
            ]
        );
        assert_eq!(store.quarantine_reasons(1).unwrap().len(), 1);
        // Words that are not record names stay as they are.
        for kept in [
            "expected a push_request, got a pull_request",
            "a/b and 3/4 of http://x/y",
            "Patient/ alone",
        ] {
            assert_eq!(reason_pattern(kept), kept);
        }
        assert_eq!(
            reason_pattern("(Encounter/e1, Observation/o2)"),
            "(Encounter/…, Observation/…)"
        );
    }

    #[test]
    fn a_long_quarantine_reason_is_kept_to_its_head() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.db"), "a").unwrap();
        let key = RecordKey::parse("Patient/p1").unwrap();
        let page = "<html>".to_string() + &"x".repeat(200_000);
        let mut tx = store.begin().unwrap();
        tx.quarantine(&key, Stage::Apply, &page, true, 1, |_| 1)
            .unwrap();
        tx.commit().unwrap();
        let q = store.quarantine_list().unwrap();
        assert!(q[0].reason.starts_with("<html>xxx"));
        assert!(
            q[0].reason.ends_with("(198006 more characters)"),
            "{}",
            &q[0].reason[1990..]
        );
    }

    #[test]
    fn an_unknown_stage_is_corruption_not_push() {
        let (_d, mut store) = crate::store::temp_store("a");
        let key = RecordKey::parse("Patient/p1").unwrap();
        let mut tx = store.begin().unwrap();
        tx.quarantine(&key, Stage::Apply, "refused", false, 1, |_| 1)
            .unwrap();
        tx.commit().unwrap();
        assert_eq!(store.quarantine_list().unwrap()[0].stage, Stage::Apply);
        store
            .conn()
            .execute("UPDATE quarantine SET stage='later'", [])
            .unwrap();
        let err = store.quarantine_list().unwrap_err();
        assert!(err.is_corruption(), "{err}");
        assert_eq!(
            err.to_string(),
            r#"store is corrupt: quarantine.stage of Patient/p1 holds "later": not one of push, apply, pull"#
        );
    }

    #[test]
    fn every_stage_is_stored_and_shown_as_its_text() {
        for s in Stage::ALL {
            assert_eq!(Stage::parse(s.as_str()), Some(*s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(format!("{s:<6}|"), format!("{:<6}|", s.as_str()));
        }
        assert_eq!(Stage::parse("Push"), None, "stored texts are exact");
    }
}
