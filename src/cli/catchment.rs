//! `catchment preview` and `catchment move` at a hub: what a rule would give a node
//! before it is enabled, and a patient moving between clinics.
//!
//! A move is one transaction: the new clinic's membership is granted (so the pull
//! feed backfills the whole record to it), the old one's becomes `moved` — it no
//! longer receives or reads the record and no rule gives it back, but what it wrote
//! before the move and has not pushed yet is still accepted (nothing is lost). With
//! `--purge` the old clinic is also ordered (`crate::remote`) to remove its copies,
//! except records it has not pushed yet.

use std::io::Write as _;

use serde::Serialize;

use super::{open_existing, print_json, Failure, Out, EXIT_NOT_FOUND};
use crate::config::Config;
use crate::engine::CatchmentRule;
use crate::model::RecordKey;
use crate::store::CatchmentReason;
use crate::textsafe::safe;
use crate::time::words_for_ms;

/// What a rule would give a node.
#[derive(Debug, Serialize)]
pub struct Preview {
    pub node: String,
    pub rules: Vec<String>,
    pub patients: u64,
    /// Of those, already held by the node.
    pub already_held: u64,
    pub records: u64,
    /// Canonical JSON of those records, and as zstd level 3 compresses it.
    pub bytes: u64,
    pub bytes_compressed: u64,
    /// Metadata every node holds (a new node receives it too).
    pub metadata_records: u64,
    pub metadata_bytes_compressed: u64,
    /// The link rate used for the estimate and where it came from.
    pub rate_bps: Option<u64>,
    pub rate_source: String,
    pub bootstrap_secs: Option<u64>,
}

/// Counts the bytes written to it.
#[derive(Default)]
struct Count(u64);

impl std::io::Write for Count {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn preview(
    cfg: &Config,
    node: &str,
    proposed: Option<CatchmentRule>,
    rate_kbit: Option<u64>,
    json: bool,
) -> Out {
    let hub = cfg
        .hub
        .as_ref()
        .ok_or_else(|| Failure::new(2, "catchment preview runs at a hub ([hub])"))?;
    if !hub.children.iter().any(|c| c.node == node) {
        return Err(Failure::new(
            EXIT_NOT_FOUND,
            format!(
                "{} is not one of this hub's children (hub.children)",
                safe(node)
            ),
        ));
    }
    let rules: Vec<CatchmentRule> = match proposed {
        Some(r) => vec![r],
        None => hub
            .catchment
            .iter()
            .filter(|r| r.node == node)
            .cloned()
            .collect(),
    };
    let store = open_existing(cfg)?;
    let held: std::collections::HashSet<String> = store
        .catchment_list(Some(node))?
        .into_iter()
        .filter(|(_, _, why)| *why != CatchmentReason::Moved)
        .map(|(_, p, _)| p)
        .collect();
    let mut enc = zstd::stream::Encoder::new(Count::default(), 3)
        .map_err(|e| Failure::new(1, e.to_string()))?;
    let (mut patients, mut already, mut records, mut bytes) = (0u64, 0u64, 0u64, 0u64);
    for s in store.list(Some("Patient"))? {
        if s.version.deleted {
            continue;
        }
        let body = s.version.snapshot.json();
        if !rules.iter().any(|r| r.matches(&body)) {
            continue;
        }
        let id = s.version.snapshot.key.id.clone();
        patients += 1;
        if held.contains(&id) {
            already += 1;
        }
        records += store.bodies(Some(&id), |b| {
            bytes += b.len() as u64 + 1;
            let _ = enc.write_all(b);
            let _ = enc.write_all(b"\n");
        })?;
    }
    let compressed = enc.finish().map_err(|e| Failure::new(1, e.to_string()))?.0;
    let mut menc = zstd::stream::Encoder::new(Count::default(), 3)
        .map_err(|e| Failure::new(1, e.to_string()))?;
    let metadata = store.bodies(None, |b| {
        let _ = menc.write_all(b);
        let _ = menc.write_all(b"\n");
    })?;
    let metadata_compressed = menc.finish().map_err(|e| Failure::new(1, e.to_string()))?.0;
    let reported = store
        .health_all()?
        .into_iter()
        .find(|(_, r)| r.node == node)
        .and_then(|(_, r)| r.link_rate_bps);
    let (rate, source) = match (rate_kbit, reported) {
        (Some(k), _) => (Some(k * 1000), "given (--rate-kbit)".to_string()),
        (None, Some(r)) => (
            Some(r),
            "measured by the node on its last pulls".to_string(),
        ),
        (None, None) => (
            None,
            "unknown: the node has reported no pull of 16 KiB or more; give --rate-kbit".into(),
        ),
    };
    let p = Preview {
        node: node.to_string(),
        rules: rules
            .iter()
            .map(|r| format!("{} = {:?}", r.path, r.equals))
            .collect(),
        patients,
        already_held: already,
        records,
        bytes,
        bytes_compressed: compressed,
        metadata_records: metadata,
        metadata_bytes_compressed: metadata_compressed,
        rate_bps: rate,
        rate_source: source,
        bootstrap_secs: rate
            .filter(|r| *r > 0)
            .map(|r| (compressed * 8).div_ceil(r)),
    };
    if json {
        print_json(&p);
        return Ok(());
    }
    println!(
        "{} with {}:",
        safe(node),
        if p.rules.is_empty() {
            "no rule".to_string()
        } else {
            safe(&p.rules.join(" or ")).into_owned()
        }
    );
    println!(
        "  {} patients ({} already held), {} records, {} KiB ({} KiB compressed)",
        p.patients,
        p.already_held,
        p.records,
        p.bytes >> 10,
        p.bytes_compressed >> 10
    );
    println!(
        "  + {} metadata records ({} KiB compressed) a new node also receives",
        p.metadata_records,
        p.metadata_bytes_compressed >> 10
    );
    match (p.rate_bps, p.bootstrap_secs) {
        (Some(r), Some(s)) => println!(
            "  bootstrap ≈ {} at {} kbit/s ({}; framing and round trips come on top)",
            words_for_ms(s * 1000),
            r / 1000,
            p.rate_source
        ),
        _ => println!("  bootstrap time: {}", p.rate_source),
    }
    Ok(())
}

pub fn move_patient(
    cfg: &Config,
    patient: &str,
    from: &str,
    to: &str,
    purge: bool,
    now: u64,
) -> Out {
    let hub = cfg
        .hub
        .as_ref()
        .ok_or_else(|| Failure::new(2, "catchment move runs at a hub ([hub])"))?;
    for n in [from, to] {
        if !hub.children.iter().any(|c| c.node == n) {
            let via = hub
                .children
                .iter()
                .find(|c| c.descendants.iter().any(|d| d == n));
            return Err(Failure::new(
                EXIT_NOT_FOUND,
                match via {
                    Some(c) => format!(
                        "{} is below {}: its catchment is kept at {}'s hub — run this there",
                        safe(n),
                        safe(&c.node),
                        safe(&c.node)
                    ),
                    None => format!(
                        "{} is not one of this hub's children (hub.children)",
                        safe(n)
                    ),
                },
            ));
        }
    }
    if from == to {
        return Err(Failure::new(2, "the patient would move to where it is"));
    }
    if patient.contains('/') && !patient.starts_with("Patient/") {
        return Err(Failure::new(
            2,
            format!(
                "{}: a catchment holds patients; give Patient/<id> (its records move with it)",
                safe(patient)
            ),
        ));
    }
    let id = patient.strip_prefix("Patient/").unwrap_or(patient);
    let key = RecordKey::new("Patient", id)?;
    let mut store = open_existing(cfg)?;
    if !store.current(&key)?.is_some_and(|c| !c.version.deleted) {
        return Err(Failure::new(
            EXIT_NOT_FOUND,
            format!("{} is not held at this hub", safe(&key.to_string())),
        ));
    }
    if !store.in_catchment(from, &key.id)? {
        return Err(Failure::new(
            EXIT_NOT_FOUND,
            format!(
                "{} is not in the catchment of {} (`catchment list {}`)",
                safe(&key.to_string()),
                safe(from),
                safe(from)
            ),
        ));
    }
    let mut tx = store.begin()?;
    tx.add_to_catchment(to, &key.id, CatchmentReason::Granted)?;
    tx.mark_moved(from, &key.id, now)?;
    tx.audit(
        now,
        "cli",
        "catchment-move",
        &key.to_string(),
        "",
        &format!(
            "{from} -> {to}{}",
            if purge { ", purge ordered" } else { "" }
        ),
    )?;
    tx.commit()?;
    println!(
        "{} moved from {} to {}: {} receives the whole record with its next pull; {} receives no more of it (what it has not pushed yet is still accepted)",
        safe(&key.to_string()),
        safe(from),
        safe(to),
        safe(to),
        safe(from)
    );
    if purge {
        let order = crate::remote::issue(
            &mut store,
            from,
            &crate::remote::OrderKind::Purge {
                patient: key.id.clone(),
            },
            now,
        )?;
        println!(
            "purge ordered at {} (order {order}; `clinicsync remote {} list` shows the result)",
            safe(from),
            safe(from)
        );
    }
    Ok(())
}
