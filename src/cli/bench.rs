//! `clinicsync bench push`: the sync-core benchmark. A clinic store is filled with
//! synthetic clinical records (not timed), then a real hub process and a real
//! `clinicsync sync` process move them over HTTP on 127.0.0.1. Reports records per
//! second at the hub, bytes on the wire against the records as FHIR JSON, and the peak
//! RSS of both processes (VmHWM), as the median of `--runs` runs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Subcommand;

use super::{Failure, EXIT_FAILURE};
use crate::cluster::{self, Proc};
use crate::engine;
use crate::model::Snapshot;
use crate::store::{wall_ms, Store};
use crate::synth;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Push N synthetic clinical records from a clinic to a hub.
    Push {
        #[arg(long, default_value_t = 100_000)]
        records: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Work directory (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure::new(EXIT_FAILURE, format!("bench: {e}"))
}

struct Run {
    secs: f64,
    wire_bytes: u64,
    json_bytes: u64,
    hub_rss_kb: u64,
    clinic_rss_kb: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

pub fn run(cmd: BenchCmd) -> Result<(), Failure> {
    let BenchCmd::Push { records, runs, dir } = cmd;
    let tmp = tempfile::Builder::new()
        .prefix("clinicsync-bench-")
        .tempdir()
        .map_err(fail)?;
    let base = dir.unwrap_or_else(|| tmp.path().to_path_buf());
    let mut results = Vec::new();
    for i in 0..runs.max(1) {
        let r = one_run(&base.join(format!("run{i}")), records)?;
        eprintln!(
            "run {i}: {:.2} s, {:.0} records/s, {} wire bytes, hub RSS {} KiB, clinic RSS {} KiB",
            r.secs,
            records as f64 / r.secs,
            r.wire_bytes,
            r.hub_rss_kb,
            r.clinic_rss_kb
        );
        results.push(r);
    }
    let secs = median(results.iter().map(|r| r.secs).collect());
    let rate = records as f64 / secs;
    let wire = median(results.iter().map(|r| r.wire_bytes as f64).collect());
    let json = results[0].json_bytes as f64;
    let hub_rss = median(results.iter().map(|r| r.hub_rss_kb as f64).collect());
    let clinic_rss = median(results.iter().map(|r| r.clinic_rss_kb as f64).collect());
    println!(
        "| metric | value (median of {} runs) | target |",
        results.len()
    );
    println!("|---|---|---|");
    println!("| records pushed | {records} | |");
    println!("| wall time, clinic `sync` start to exit | {secs:.2} s | |");
    println!("| records/s applied at the hub | {rate:.0} | ≥ 20,000 |");
    println!(
        "| FHIR JSON bytes per record | {:.0} | |",
        json / records as f64
    );
    println!(
        "| wire bytes per record (requests + responses) | {:.1} | |",
        wire / records as f64
    );
    println!("| wire / JSON | 1/{:.1} | ≤ 1/10 |", json / wire);
    println!("| hub peak RSS | {:.1} MiB | |", hub_rss / 1024.0);
    println!(
        "| clinic peak RSS | {:.1} MiB | ≤ 30 MiB |",
        clinic_rss / 1024.0
    );
    Ok(())
}

fn one_run(dir: &std::path::Path, records: usize) -> Result<Run, Failure> {
    let exe = std::env::current_exe().map_err(fail)?;
    let port = cluster::free_port().map_err(fail)?;
    let layout = cluster::write_layout(
        dir,
        port,
        &[("clinic-a", "Kakamega")],
        "interval_secs = 3600",
        "max_message_bytes = 33554432",
    )
    .map_err(fail)?;
    let clinic = &layout.clinics[0];
    // Fill the clinic's store (not timed): patients with 2 encounters of 4 observations.
    let per_patient = 1 + 2 * 5;
    let patients = records.div_ceil(per_patient);
    let mut json_bytes = 0u64;
    {
        let mut store = Store::open(&clinic.store, &clinic.id).map_err(fail)?;
        let policy = engine::Policy::new(&clinic.id, true);
        let all = synth::clinic_records(42, "a", "Kakamega", "loc-a", patients, 2, 4);
        for chunk in all
            .into_iter()
            .take(records)
            .collect::<Vec<_>>()
            .chunks(5_000)
        {
            let items: Vec<(Snapshot, bool)> = chunk
                .iter()
                .map(|v| Snapshot::from_json_value(v.clone()).map(|s| (s, false)))
                .collect::<Result<_, _>>()
                .map_err(fail)?;
            json_bytes += items.iter().map(|(s, _)| s.body.len() as u64).sum::<u64>();
            engine::write_local(&mut store, &policy, items, wall_ms()).map_err(fail)?;
        }
    }
    let mut hub = Proc::spawn(&exe, "hub", &layout.hub.config, &["run"]).map_err(fail)?;
    cluster::wait_healthy(&layout.hub_url, Duration::from_secs(20)).map_err(fail)?;
    let started = Instant::now();
    let mut sync = Proc::spawn(&exe, "clinic-a", &clinic.config, &["sync"]).map_err(fail)?;
    let mut clinic_rss_kb = 0;
    while sync.is_running() {
        clinic_rss_kb = clinic_rss_kb.max(sync.peak_rss_kb().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(5));
    }
    let clinic_exit = sync.wait();
    let secs = started.elapsed().as_secs_f64();
    let hub_rss_kb = hub.peak_rss_kb().unwrap_or(0);
    hub.terminate();
    if clinic_exit.code != Some(0) {
        return Err(fail(format!(
            "clinic sync failed; see {}",
            clinic.config.with_extension("log").display()
        )));
    }
    let hub_store = Store::open_existing(&layout.hub.store).map_err(fail)?;
    let held = hub_store.counts().map_err(fail)?.records;
    if held as usize != records {
        return Err(fail(format!(
            "hub holds {held} records, expected {records}"
        )));
    }
    let peer = Store::open_existing(&clinic.store)
        .map_err(fail)?
        .peer_state(crate::daemon::PARENT)
        .map_err(fail)?;
    Ok(Run {
        secs,
        wire_bytes: peer.bytes_sent + peer.bytes_received,
        json_bytes,
        hub_rss_kb,
        clinic_rss_kb,
    })
}
