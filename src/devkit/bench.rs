//! `clinicsync bench push`: the sync-core benchmark. A real hub process starts, the
//! clinic makes first contact while its store is empty (not timed), its store is then
//! filled with a backlog of synthetic clinical records (not timed), and a real
//! `clinicsync sync` process moves them over HTTP on 127.0.0.1. Reports records per
//! second at the hub, bytes on the wire against the records as FHIR JSON, and the peak
//! RSS of both processes (VmHWM), as the median of `--runs` runs. `--against <dir>`
//! alternates every run with the `clinicsync` of another build (A/B/A/B), so a
//! before/after comparison shares the machine's load.
//!
//! `bench apply`: the hub's own apply rate, in process, without HTTP or a second
//! process: the frames a clinic would send are built first (not timed), then a hub
//! answers them one after the other ([`HubState::answer`]: decode, validate,
//! authorize, integrate, commit).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Subcommand;

use crate::cli::{Failure, EXIT_FAILURE};
use crate::devkit::cluster::{self, Proc};
use crate::engine;
use crate::model::Snapshot;
use crate::store::Store;
use crate::synth;
use crate::time::wall_ms;

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
        /// Time the clinic's very first sync instead: it pushes the records and then
        /// pulls all of them back (a new or reinstalled box restores its own records
        /// from its parent on first contact).
        #[arg(long)]
        first_contact: bool,
        /// A directory holding the `clinicsync` of another build: each run is made
        /// with it too, alternating (this build first), and both are reported.
        #[arg(long)]
        against: Option<PathBuf>,
        /// `sync.push_level` of the clinic (1-19; default: "auto", which on loopback
        /// is level 3): the clinic's memory at a slow link's level. With `--against`,
        /// that build's clinic gets it too (it must know `sync.push_level`).
        #[arg(long)]
        push_level: Option<u8>,
    },
    /// The hub's apply rate in process: N records in push frames of
    /// `--batch` records, answered by a hub one frame after the other.
    Apply {
        #[arg(long, default_value_t = 100_000)]
        records: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Records per push frame (the clinic's default `sync.push_batch_records`).
        #[arg(long, default_value_t = 2_000)]
        batch: usize,
        /// Records the hub already holds before each timed run (pushed by a second
        /// clinic, untimed): the rate of a hub that has been serving for a while,
        /// whose indexes no longer fit the pages one push touches.
        #[arg(long, default_value_t = 0)]
        hub_holds: usize,
        /// Frame encoding: `v2` (what a clinic of this build sends a hub of this
        /// build: records as columns, bodies in one zstd stream with the shipped
        /// dictionary) or `v1` (one CBOR record after the other, an older clinic's).
        #[arg(long, value_enum, default_value_t = FrameEncoding::V2)]
        encoding: FrameEncoding,
        /// Clinics pushing at once, each its share of `--records` from its own
        /// thread (a hub's request threads): one decodes its frame while another's
        /// is integrated. 1: one clinic, one frame after the other.
        #[arg(long, default_value_t = 1)]
        clinics: usize,
    },
    /// MQTT against HTTP: wake-up latency of a connected clinic, and bytes on the
    /// wire for a day's clinic work, measured by a counting proxy.
    Mqtt {
        /// Records written at the hub, one at a time, for the latency figure.
        #[arg(long, default_value_t = 20)]
        writes: usize,
        /// Resources in a day's clinic work.
        #[arg(long, default_value_t = 2_000)]
        records: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// clinicsync against per-resource FHIR REST, CouchDB replication and the
    /// physical floor, side by side over an emulated 2G/EDGE link.
    Link(super::linkbench::LinkArgs),
    /// Bytes per record of push frames and pull pages in protocol v1, v2, v2 with
    /// the shipped dictionary and v2 with bodies as columns, against zstd -19 of the
    /// NDJSON.
    Frames(super::frames::FramesArgs),
    /// Writes the dictionary's training samples (tests/bench/train-dict.sh).
    DictSamples(super::frames::DictSamplesArgs),
    /// Export N records to a USB bundle, import it at the hub, import the return
    /// bundle at the clinic: time and peak RSS of each process.
    Usb {
        #[arg(long, default_value_t = 100_000)]
        records: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Work directory (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Time the clinic's very first exchange by USB instead: the hub's return
        /// bundle then carries all of the clinic's records back (a new or reinstalled
        /// box restores its own records on first contact), and the clinic applies
        /// them. Without it the clinic has made first contact by USB before it is
        /// filled (not timed), as a clinic in service has.
        #[arg(long)]
        first_contact: bool,
    },
}

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure::new(EXIT_FAILURE, format!("bench: {e}"))
}

/// The `clinicsync` binary the benchmark starts as hub and clinics: the one beside
/// this benchmark binary (both come out of the same `cargo build`).
pub fn node_exe() -> Result<std::path::PathBuf, Failure> {
    let exe = std::env::current_exe()
        .map_err(fail)?
        .with_file_name("clinicsync");
    if !exe.exists() {
        return Err(fail(format!(
            "{} not found: build both binaries together (cargo build --release --features devkit)",
            exe.display()
        )));
    }
    Ok(exe)
}

struct Run {
    secs: f64,
    /// CPU seconds the hub process spent (all threads) while the clinic synced.
    hub_cpu: f64,
    /// CPU seconds the clinic's `sync` process spent (all threads).
    clinic_cpu: f64,
    wire_bytes: u64,
    json_bytes: u64,
    hub_rss_kb: u64,
    clinic_rss_kb: u64,
    /// The hub's store file (and its WAL, if any) after the run, in bytes.
    hub_store_bytes: u64,
}

/// CPU seconds (user + system, all threads) process `pid` has spent so far.
fn cpu_secs_of(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / hz
}

/// CPU seconds (user + system) of this process's children that have been waited for.
fn waited_children_cpu_secs() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU seconds (user + system, all threads) this process has spent so far.
fn own_cpu_secs() -> f64 {
    cpu_secs_of(std::process::id() as i32)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// The frames `bench apply` pushes (`--encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FrameEncoding {
    /// One CBOR record after the other, an older clinic's.
    V1,
    /// What a clinic of this build sends a hub of this build.
    V2,
}

impl FrameEncoding {
    fn name(self) -> &'static str {
        match self {
            FrameEncoding::V1 => "v1",
            FrameEncoding::V2 => "v2",
        }
    }

    fn wire(self) -> crate::wire::Encoding {
        match self {
            FrameEncoding::V1 => crate::wire::Encoding::V1,
            FrameEncoding::V2 => {
                let ours = crate::wire::Accept::ours();
                ours.choose(&ours)
            }
        }
    }
}

pub fn run(cmd: BenchCmd) -> Result<(), Failure> {
    let (records, runs, dir, first_contact, against, push_level) = match cmd {
        BenchCmd::Push {
            records,
            runs,
            dir,
            first_contact,
            against,
            push_level,
        } => (records, runs, dir, first_contact, against, push_level),
        BenchCmd::Apply {
            records,
            runs,
            batch,
            hub_holds,
            encoding,
            clinics,
        } => return apply(records, runs, batch, hub_holds, encoding, clinics),
        BenchCmd::Usb {
            records,
            runs,
            dir,
            first_contact,
        } => return usb(records, runs, dir, first_contact),
        BenchCmd::Link(args) => return super::linkbench::run(args),
        BenchCmd::Frames(args) => return super::frames::run(args),
        BenchCmd::DictSamples(args) => return super::frames::dict_samples(args),
        BenchCmd::Mqtt {
            writes,
            records,
            runs,
        } => return mqtt(writes, records, runs),
    };
    let tmp = tempfile::Builder::new()
        .prefix("clinicsync-bench-")
        .tempdir()
        .map_err(fail)?;
    let keep = dir.clone();
    let base = dir.unwrap_or_else(|| tmp.path().to_path_buf());
    let mut builds = vec![("this build".to_string(), node_exe()?)];
    if let Some(other) = against {
        let exe = other.join("clinicsync");
        if !exe.exists() {
            return Err(fail(format!("{} not found", exe.display())));
        }
        builds.push((format!("against {}", other.display()), exe));
    }
    let mut results: Vec<Vec<Run>> = builds.iter().map(|_| Vec::new()).collect();
    for i in 0..runs.max(1) {
        for (b, (name, exe)) in builds.iter().enumerate() {
            let sync = match push_level {
                Some(l) => format!("interval_secs = 3600\npush_level = {l}"),
                None => "interval_secs = 3600".to_string(),
            };
            let r = one_run(
                exe,
                &base.join(format!("run{i}-{b}")),
                records,
                first_contact,
                &sync,
            )?;
            eprintln!(
                "run {i} ({name}): {:.2} s, {:.0} records/s, hub CPU {:.2} s, clinic CPU {:.2} s, {} wire bytes, hub RSS {} KiB, clinic RSS {} KiB",
                r.secs,
                records as f64 / r.secs,
                r.hub_cpu,
                r.clinic_cpu,
                r.wire_bytes,
                r.hub_rss_kb,
                r.clinic_rss_kb
            );
            if keep.is_none() {
                // Two stores of the whole backlog (GiBs at a million): gone once measured.
                let _ = std::fs::remove_dir_all(base.join(format!("run{i}-{b}")));
            }
            results[b].push(r);
        }
    }
    for ((name, _), results) in builds.iter().zip(&results) {
        push_table(name, records, first_contact, results);
    }
    Ok(())
}

fn push_table(name: &str, records: usize, first_contact: bool, results: &[Run]) {
    let secs = median(results.iter().map(|r| r.secs).collect());
    let rate = records as f64 / secs;
    let wire = median(results.iter().map(|r| r.wire_bytes as f64).collect());
    let json = results[0].json_bytes as f64;
    let hub_rss = median(results.iter().map(|r| r.hub_rss_kb as f64).collect());
    let clinic_rss = median(results.iter().map(|r| r.clinic_rss_kb as f64).collect());
    let what = if first_contact {
        "first contact: push, then pull all back"
    } else {
        "backlog after first contact"
    };
    println!(
        "| metric ({name}; {what}) | value (median of {} runs) | target |",
        results.len()
    );
    println!("|---|---|---|");
    println!("| records pushed | {records} | |");
    println!("| wall time, clinic `sync` start to exit | {secs:.2} s | |");
    println!("| records/s applied at the hub | {rate:.0} | ≥ 50,000 |");
    let hub_cpu = median(results.iter().map(|r| r.hub_cpu).collect());
    println!(
        "| hub CPU, all threads (records per hub CPU-second) | {hub_cpu:.2} s ({:.0}) | |",
        records as f64 / hub_cpu.max(1e-9)
    );
    let clinic_cpu = median(results.iter().map(|r| r.clinic_cpu).collect());
    println!("| clinic CPU, all threads | {clinic_cpu:.2} s | |");
    println!(
        "| FHIR JSON bytes per record | {:.0} | |",
        json / records as f64
    );
    println!(
        "| wire bytes per record (requests + responses) | {:.1} | |",
        wire / records as f64
    );
    println!("| wire / JSON | 1/{:.1} | ≤ 1/10 |", json / wire);
    let stored = median(results.iter().map(|r| r.hub_store_bytes as f64).collect());
    println!(
        "| hub store bytes per record (file and WAL, after the run) | {:.0} | |",
        stored / records as f64
    );
    println!("| hub peak RSS | {:.1} MiB | |", hub_rss / 1024.0);
    println!(
        "| clinic peak RSS | {:.1} MiB | ≤ 30 MiB |",
        clinic_rss / 1024.0
    );
    println!();
}

/// Records of one synthetic patient: the Patient, 2 Encounters of 4 Observations.
const PER_PATIENT: usize = 1 + 2 * (1 + 4);

/// Fills a clinic store with `records` synthetic clinical records; returns their JSON
/// bytes. The records are those of `synth::clinic_records(42, node, "Kakamega",
/// "loc-a", ⌈records / 11⌉, 2, 4)`, truncated to `records`, generated and written a
/// chunk at a time so a backlog of millions fits in memory.
fn fill(store_path: &std::path::Path, node: &str, records: usize) -> Result<u64, Failure> {
    let mut store = Store::open(store_path, node).map_err(fail)?;
    let policy = engine::Policy::new(node, true);
    let mut g = synth::Gen::new(42);
    let mut chunk = Vec::with_capacity(FILL_CHUNK + PER_PATIENT);
    let (mut made, mut json_bytes) = (0usize, 0u64);
    let mut p = 0usize;
    while made < records {
        let pid = format!("{node}-p{p}");
        chunk.push(synth::patient(&mut g, &pid, "Kakamega"));
        for e in 0..2 {
            let eid = format!("{node}-e{p}-{e}");
            chunk.push(synth::encounter(
                &mut g,
                &eid,
                &pid,
                "loc-a",
                (p + e) as u64,
            ));
            for o in 0..4 {
                chunk.push(synth::observation(
                    &mut g,
                    &format!("{node}-o{p}-{e}-{o}"),
                    &pid,
                    &eid,
                ));
            }
        }
        p += 1;
        chunk.truncate(chunk.len().min(records - made));
        if chunk.len() >= FILL_CHUNK || made + chunk.len() >= records {
            made += chunk.len();
            json_bytes += write_chunk(&mut store, &policy, std::mem::take(&mut chunk))?;
        }
    }
    Ok(json_bytes)
}

/// Records per transaction when a benchmark fills a store.
const FILL_CHUNK: usize = 20_000;

fn write_chunk(
    store: &mut Store,
    policy: &engine::Policy,
    chunk: Vec<serde_json::Value>,
) -> Result<u64, Failure> {
    let items: Vec<(Snapshot, bool)> = chunk
        .into_iter()
        .map(|v| Snapshot::from_json_value(v).map(|s| (s, false)))
        .collect::<Result<_, _>>()
        .map_err(fail)?;
    let bytes = items.iter().map(|(s, _)| s.body.len() as u64).sum::<u64>();
    engine::write_local(store, policy, items, wall_ms()).map_err(fail)?;
    Ok(bytes)
}

/// Writes `resources` into the store at `path` as local writes of `node`, 5,000 to a
/// transaction (not timed by any benchmark); returns their canonical JSON bytes.
pub fn write_store(
    path: &std::path::Path,
    node: &str,
    policy: &engine::Policy,
    resources: &[serde_json::Value],
) -> Result<u64, Failure> {
    let mut store = Store::open(path, node).map_err(fail)?;
    let mut json_bytes = 0u64;
    for chunk in resources.chunks(5_000) {
        json_bytes += write_chunk(&mut store, policy, chunk.to_vec())?;
    }
    Ok(json_bytes)
}

/// Runs a command to completion, sampling its peak RSS; returns (seconds, KiB).
fn timed(
    exe: &std::path::Path,
    name: &str,
    config: &std::path::Path,
    args: &[&str],
) -> Result<(f64, u64), Failure> {
    let started = Instant::now();
    let mut p = Proc::spawn(exe, name, config, args).map_err(fail)?;
    let mut rss = 0;
    while p.is_running() {
        rss = rss.max(p.peak_rss_kb().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(5));
    }
    let exit = p.wait();
    if exit.code != Some(0) {
        return Err(fail(format!(
            "{name} {args:?} failed; see {}",
            config.with_extension("log").display()
        )));
    }
    Ok((started.elapsed().as_secs_f64(), rss))
}

/// Appends an `[mqtt]` section (and optionally `[transport] kind = "mqtt"`) to a config.
fn add_mqtt(
    config: &std::path::Path,
    url: &str,
    user: &str,
    pass: &str,
    as_transport: bool,
) -> Result<(), Failure> {
    let pw = config.with_extension("mqtt-password");
    crate::filemode::write_private(&pw, pass.as_bytes()).map_err(fail)?;
    let mut text = std::fs::read_to_string(config).map_err(fail)?;
    let section = format!(
        "\n[mqtt]\nurl = \"{url}\"\nusername = \"{user}\"\npassword_file = \"{}\"\n",
        pw.display()
    );
    if as_transport {
        text = text.replace(
            "[sync]",
            &format!("{section}\n[transport]\nkind = \"mqtt\"\n\n[sync]"),
        );
    } else {
        text.push_str(&section);
    }
    std::fs::write(config, text).map_err(fail)
}

fn mqtt(writes: usize, records: usize, runs: usize) -> Result<(), Failure> {
    let tmp = tempfile::Builder::new()
        .prefix("clinicsync-bench-")
        .tempdir()
        .map_err(fail)?;
    let exe = node_exe()?;
    let mut latencies = Vec::new();
    let mut http_bytes = Vec::new();
    let mut mqtt_bytes = Vec::new();
    for run in 0..runs.max(1) {
        let d = tmp.path().join(format!("run{run}"));
        let bport = cluster::free_port().map_err(fail)?;
        let broker = cluster::Broker::start(
            &d.join("broker"),
            bport,
            "hub",
            &[
                ("hub", "hub-pass"),
                ("clinic-a", "a-pass"),
                ("clinic-b", "b-pass"),
            ],
        )
        .map_err(fail)?;
        let mproxy = cluster::CountingProxy::start(bport).map_err(fail)?;
        let port = cluster::free_port().map_err(fail)?;
        let hproxy = cluster::CountingProxy::start(port).map_err(fail)?;
        // clinic-a talks HTTP through one proxy, clinic-b MQTT through the other.
        let layout = cluster::write_layout(
            &d,
            port,
            &[("clinic-a", "Kakamega"), ("clinic-b", "Bungoma")],
            "interval_secs = 3600",
            "",
        )
        .map_err(fail)?;
        let (a, b) = (&layout.clinics[0], &layout.clinics[1]);
        let a_text = std::fs::read_to_string(&a.config)
            .map_err(fail)?
            .replace(&format!(":{port}\""), &format!(":{}\"", hproxy.port));
        std::fs::write(&a.config, a_text).map_err(fail)?;
        add_mqtt(&layout.hub.config, &broker.url(), "hub", "hub-pass", false)?;
        add_mqtt(
            &b.config,
            &format!("mqtt://127.0.0.1:{}", mproxy.port),
            "clinic-b",
            "b-pass",
            true,
        )?;
        fill(&a.store, "clinic-a", records)?;
        fill(&b.store, "clinic-b", records)?;
        let mut hub = Proc::spawn(&exe, "hub", &layout.hub.config, &["run"]).map_err(fail)?;
        cluster::wait_healthy(&layout.hub_url, Duration::from_secs(20)).map_err(fail)?;
        timed(&exe, "clinic-a", &a.config, &["sync"])?;
        timed(&exe, "clinic-b", &b.config, &["sync"])?;
        http_bytes.push(hproxy.total() as f64);
        mqtt_bytes.push(mproxy.total() as f64);
        // Latency: clinic-b's daemon connected through MQTT, woken by the hub.
        let mut daemon = Proc::spawn(&exe, "clinic-b", &b.config, &["run"]).map_err(fail)?;
        std::thread::sleep(Duration::from_secs(2));
        let mut hub_store = Store::open(&layout.hub.store, "hub").map_err(fail)?;
        let policy = engine::Policy::new("hub", false);
        for i in 0..writes {
            let loc =
                serde_json::json!({"resourceType": "Location", "id": format!("bench-{run}-{i}")});
            let key = crate::model::RecordKey::new("Location", &format!("bench-{run}-{i}"))
                .map_err(fail)?;
            let snap = Snapshot::from_json_value(loc).map_err(fail)?;
            let t0 = Instant::now();
            engine::write_local(&mut hub_store, &policy, vec![(snap, false)], wall_ms())
                .map_err(fail)?;
            let arrived = cluster::wait_until(Duration::from_secs(30), || {
                Store::open_existing(&b.store)
                    .ok()
                    .and_then(|s| s.current(&key).ok().flatten())
                    .is_some()
            });
            if !arrived {
                return Err(fail(
                    "a record written at the hub did not reach the MQTT clinic within 30 s",
                ));
            }
            latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        daemon.terminate();
        hub.terminate();
        drop(broker);
        eprintln!(
            "run {run}: HTTP {} bytes, MQTT {} bytes",
            http_bytes[run], mqtt_bytes[run]
        );
    }
    let mut sorted = latencies.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let p90 = sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)];
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| hub write → connected clinic, MQTT wake-up: median ({} writes) | {:.0} ms |",
        latencies.len(),
        median(latencies.clone())
    );
    println!(
        "| same, 90th percentile / worst | {p90:.0} ms / {:.0} ms |",
        sorted[sorted.len() - 1]
    );
    println!("| same, HTTP polling every 5 min (arrival uniform in the interval) | 150,000 ms mean / 300,000 ms worst |");
    println!("| day's work ({records} resources) push + pull, HTTP, bytes on the wire (median of {}) | {:.0} |", http_bytes.len(), median(http_bytes.clone()));
    println!(
        "| same over MQTT through mosquitto | {:.0} |",
        median(mqtt_bytes.clone())
    );
    println!(
        "| MQTT / HTTP | {:.2} |",
        median(mqtt_bytes) / median(http_bytes)
    );
    Ok(())
}

fn usb(
    records: usize,
    runs: usize,
    dir: Option<PathBuf>,
    first_contact: bool,
) -> Result<(), Failure> {
    let tmp = tempfile::Builder::new()
        .prefix("clinicsync-bench-")
        .tempdir()
        .map_err(fail)?;
    let base = dir.unwrap_or_else(|| tmp.path().to_path_buf());
    let exe = node_exe()?;
    let mut rows: Vec<[f64; 7]> = Vec::new();
    for i in 0..runs.max(1) {
        let d = base.join(format!("usb{i}"));
        let layout =
            cluster::write_layout(&d, 1, &[("clinic-a", "Kakamega")], "", "").map_err(fail)?;
        let clinic = &layout.clinics[0];
        let hub_id = crate::keys::Identity::init(&d.join("hub.keys"), "hub").map_err(fail)?;
        let clinic_id =
            crate::keys::Identity::init(&d.join("clinic-a.keys"), "clinic-a").map_err(fail)?;
        {
            let mut h = Store::open(&layout.hub.store, "hub").map_err(fail)?;
            let mut tx = h.begin().map_err(fail)?;
            tx.trust("clinic-a", &clinic_id.public().line(), false, 0)
                .map_err(fail)?;
            tx.commit().map_err(fail)?;
            let mut c = Store::open(&clinic.store, "clinic-a").map_err(fail)?;
            let mut tx = c.begin().map_err(fail)?;
            tx.trust("hub", &hub_id.public().line(), true, 0)
                .map_err(fail)?;
            tx.commit().map_err(fail)?;
        }
        let stick = d.join("stick");
        std::fs::create_dir_all(&stick).map_err(fail)?;
        let s = stick.to_string_lossy().to_string();
        // Bundles are numbered per direction; the timed pair is the last.
        let mut bundle_no = 1;
        if !first_contact {
            // First contact by USB while the clinic holds nothing (not timed).
            for (config, args) in [
                (&clinic.config, vec!["export".to_string(), s.clone()]),
                (
                    &layout.hub.config,
                    vec![
                        "import".to_string(),
                        stick
                            .join("clinic-a-to-hub-000001.csb.001")
                            .to_string_lossy()
                            .to_string(),
                    ],
                ),
                (
                    &clinic.config,
                    vec![
                        "import".to_string(),
                        stick
                            .join("hub-to-clinic-a-000001.csb.001")
                            .to_string_lossy()
                            .to_string(),
                    ],
                ),
            ] {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                timed(&exe, "first contact", config, &args)?;
            }
            bundle_no = 2;
        }
        fill(&clinic.store, "clinic-a", records)?;
        let (t_exp, rss_exp) = timed(
            &exe,
            "export",
            &clinic.config,
            &["export", &s, "--part-size", "256M"],
        )?;
        let out_name = format!("clinic-a-to-hub-{bundle_no:06}");
        let bundle = stick.join(format!("{out_name}.csb.001"));
        let size: u64 = std::fs::read_dir(&stick)
            .map_err(fail)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&out_name))
            .filter_map(|e| e.metadata().ok().map(|m| m.len()))
            .sum();
        let (t_imp, rss_imp) = timed(
            &exe,
            "import",
            &layout.hub.config,
            &["import", &bundle.to_string_lossy()],
        )?;
        let ret = stick.join(format!("hub-to-clinic-a-{bundle_no:06}.csb.001"));
        let (t_ret, rss_ret) = timed(
            &exe,
            "import-return",
            &clinic.config,
            &["import", &ret.to_string_lossy()],
        )?;
        let held = Store::open_existing(&layout.hub.store)
            .map_err(fail)?
            .counts()
            .map_err(fail)?
            .records;
        let outbox = Store::open_existing(&clinic.store)
            .map_err(fail)?
            .counts()
            .map_err(fail)?
            .outbox;
        if held as usize != records || outbox != 0 {
            return Err(fail(format!(
                "hub holds {held} of {records}; clinic outbox {outbox}"
            )));
        }
        eprintln!(
            "run {i}: export {t_exp:.2} s / {} KiB, hub import {t_imp:.2} s / {} KiB, clinic import {t_ret:.2} s / {} KiB, bundle {size} bytes",
            rss_exp, rss_imp, rss_ret
        );
        rows.push([
            t_exp,
            rss_exp as f64,
            t_imp,
            rss_imp as f64,
            t_ret,
            rss_ret as f64,
            size as f64,
        ]);
    }
    let col = |k: usize| median(rows.iter().map(|r| r[k]).collect());
    let what = if first_contact {
        "the clinic's first contact: the return bundle brings them all back"
    } else {
        "after first contact"
    };
    println!(
        "| step ({records} records, {what}; median of {} runs) | time | peak RSS |",
        rows.len()
    );
    println!("|---|---|---|");
    println!(
        "| clinic `export` (bundle {:.1} MiB) | {:.2} s | {:.1} MiB |",
        col(6) / 1048576.0,
        col(0),
        col(1) / 1024.0
    );
    println!(
        "| hub `import` (applies, writes the return bundle) | {:.2} s | {:.1} MiB |",
        col(2),
        col(3) / 1024.0
    );
    println!(
        "| clinic `import` of the return bundle | {:.2} s | {:.1} MiB |",
        col(4),
        col(5) / 1024.0
    );
    Ok(())
}

fn one_run(
    exe: &std::path::Path,
    dir: &std::path::Path,
    records: usize,
    first_contact: bool,
    sync: &str,
) -> Result<Run, Failure> {
    let port = cluster::free_port().map_err(fail)?;
    let layout = cluster::write_layout(
        dir,
        port,
        &[("clinic-a", "Kakamega")],
        sync,
        "max_message_bytes = 33554432",
    )
    .map_err(fail)?;
    let clinic = &layout.clinics[0];
    // The hub holds the clinic's Location (metadata comes down from the root): a
    // first contact then pulls a page and moves the clinic's cursor off zero.
    write_store(
        &layout.hub.store,
        "hub",
        &engine::Policy::new("hub", false),
        &[synth::location("loc-a", "Kakamega clinic", "Kakamega")],
    )?;
    let mut hub = Proc::spawn(exe, "hub", &layout.hub.config, &["run"]).map_err(fail)?;
    cluster::wait_healthy(&layout.hub_url, Duration::from_secs(20)).map_err(fail)?;
    let traffic = |store: &std::path::Path| -> Result<u64, Failure> {
        let peer = Store::open_existing(store)
            .map_err(fail)?
            .peer_state(crate::engine::PARENT)
            .map_err(fail)?;
        Ok(peer.bytes_sent + peer.bytes_received)
    };
    let mut before = 0;
    if !first_contact {
        // A box that has synced before and then gathered a backlog (offline for weeks,
        // or a migration): its first contact, made while empty, is not timed.
        Store::open(&clinic.store, &clinic.id).map_err(fail)?;
        timed(exe, "clinic-a", &clinic.config, &["sync"])?;
        before = traffic(&clinic.store)?;
    }
    // Fill the clinic's store (not timed).
    let json_bytes = fill(&clinic.store, &clinic.id, records)?;
    let hub_cpu_before = cpu_secs_of(hub.pid());
    let children_cpu_before = waited_children_cpu_secs();
    let started = Instant::now();
    let mut sync = Proc::spawn(exe, "clinic-a", &clinic.config, &["sync"]).map_err(fail)?;
    let mut clinic_rss_kb = 0;
    while sync.is_running() {
        clinic_rss_kb = clinic_rss_kb.max(sync.peak_rss_kb().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(5));
    }
    let clinic_exit = sync.wait();
    let secs = started.elapsed().as_secs_f64();
    let hub_cpu = cpu_secs_of(hub.pid()) - hub_cpu_before;
    let clinic_cpu = waited_children_cpu_secs() - children_cpu_before;
    let hub_rss_kb = hub.peak_rss_kb().unwrap_or(0);
    hub.terminate();
    if clinic_exit.code != Some(0) {
        return Err(fail(format!(
            "clinic sync failed; see {}",
            clinic.config.with_extension("log").display()
        )));
    }
    let held = Store::open_existing(&layout.hub.store)
        .map_err(fail)?
        .counts()
        .map_err(fail)?
        .records;
    // The last connection to close has copied the WAL into the file and removed it.
    let hub_store_bytes = ["", "-wal"]
        .iter()
        .filter_map(|suffix| {
            std::fs::metadata(format!("{}{suffix}", layout.hub.store.display())).ok()
        })
        .map(|m| m.len())
        .sum();
    if held as usize != records + 1 {
        return Err(fail(format!(
            "hub holds {held} records, expected {records} and its Location"
        )));
    }
    Ok(Run {
        secs,
        hub_cpu,
        clinic_cpu,
        wire_bytes: traffic(&clinic.store)? - before,
        json_bytes,
        hub_rss_kb,
        clinic_rss_kb,
        hub_store_bytes,
    })
}

/// `bench apply`: the frames of a clinic's backlog, answered by an in-process hub.
/// The push frames `node` sends for a backlog of `records` (built once, not timed):
/// what `clinicsync sync` puts on the wire, at its default batch byte budget.
fn push_frames(
    dir: &std::path::Path,
    node: &str,
    records: usize,
    batch: usize,
    encoding: crate::wire::Encoding,
) -> Result<Vec<Vec<u8>>, Failure> {
    let clinic_store = dir.join(format!("{node}.db"));
    fill(&clinic_store, node, records)?;
    let frames = {
        let store = Store::open_existing(&clinic_store).map_err(fail)?;
        let budget = crate::config::SyncSection::default().push_batch_bytes;
        let mut frames = Vec::new();
        let mut after = 0;
        while let Some((req, last)) =
            engine::next_push_after(&store, wall_ms(), batch, budget, after).map_err(fail)?
        {
            after = last;
            let msg = crate::wire::Message::PushRequest(req);
            frames.push(
                crate::wire::encode_as(&msg, crate::wire::LEVEL_FAST, encoding).map_err(fail)?,
            );
        }
        frames
    };
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", clinic_store.display()));
    }
    Ok(frames)
}

/// Pushes `frames` of `child` into `hub`; returns how many records it accepted.
fn push_all(hub: &crate::hub::HubState, child: &str, frames: &[Vec<u8>]) -> Result<usize, Failure> {
    let mut accepted = 0usize;
    for frame in frames {
        let answer = hub
            .answer(child, frame, Some("push_request"))
            .map_err(|r| fail(format!("push refused: {} {}", r.status, r.reason)))?;
        let crate::wire::Message::PushResponse(resp) = answer else {
            return Err(fail(format!("a push was answered by a {}", answer.name())));
        };
        accepted += resp
            .results
            .iter()
            .filter(|r| r.outcome == crate::wire::Outcome::Accepted)
            .count();
    }
    Ok(accepted)
}

fn apply(
    records: usize,
    runs: usize,
    batch: usize,
    hub_holds: usize,
    encoding: FrameEncoding,
    clinics: usize,
) -> Result<(), Failure> {
    if records == 0 || batch == 0 || clinics == 0 || clinics > records {
        return Err(Failure::new(
            2,
            "bench apply: --records, --batch and --clinics must be at least 1, and --clinics at most --records (a rate of nothing is no figure)",
        ));
    }
    let tmp = tempfile::Builder::new()
        .prefix("clinicsync-bench-")
        .tempdir()
        .map_err(fail)?;
    let wire_encoding = encoding.wire();
    // clinic-a first (its district is the catchment rule's); the others register
    // their patients. Each pushes its share, the first the remainder too.
    let names: Vec<String> = (0..clinics)
        .map(|c| match c {
            0 => "clinic-a".to_string(),
            c => format!("clinic-c{c}"),
        })
        .collect();
    let mut pushers = Vec::with_capacity(clinics);
    for (c, name) in names.iter().enumerate() {
        let share = records / clinics + if c == 0 { records % clinics } else { 0 };
        pushers.push((
            name.as_str(),
            push_frames(tmp.path(), name, share, batch, wire_encoding)?,
        ));
    }
    let frame_count: usize = pushers.iter().map(|(_, f)| f.len()).sum();
    let mut policy = engine::Policy::new("hub", false);
    policy.serves_children = true;
    policy.catchment = vec![engine::CatchmentRule {
        node: "clinic-a".into(),
        path: "address.district".into(),
        equals: "Kakamega".into(),
    }];
    let mut children: Vec<(String, [u8; 32])> =
        names.iter().map(|n| (n.clone(), [0; 32])).collect();
    children.push(("clinic-b".into(), [0; 32]));
    // A hub that already holds `hub_holds` records: filled once, copied for each run.
    let template = tmp.path().join("hub-template.db");
    if hub_holds > 0 {
        let earlier = push_frames(tmp.path(), "clinic-b", hub_holds, batch, wire_encoding)?;
        let hub = crate::hub::HubState::new(&template, policy.clone(), children.clone(), 32 << 20)
            .map_err(fail)?;
        let held = push_all(&hub, "clinic-b", &earlier)?;
        drop(hub);
        if held != hub_holds {
            return Err(fail(format!(
                "the hub took {held} of {hub_holds} earlier records"
            )));
        }
    }
    let (mut rates, mut cpus) = (Vec::new(), Vec::new());
    for run in 0..runs.max(1) {
        let path = tmp.path().join(format!("hub{run}.db"));
        if hub_holds > 0 {
            // Closing the template's last connection checkpointed its WAL; a WAL
            // left behind is copied with it (SQLite reads it back on open).
            for suffix in ["", "-wal"] {
                let from = PathBuf::from(format!("{}{suffix}", template.display()));
                if from.exists() {
                    std::fs::copy(&from, format!("{}{suffix}", path.display())).map_err(fail)?;
                }
            }
        }
        let hub = crate::hub::HubState::new(&path, policy.clone(), children.clone(), 32 << 20)
            .map_err(fail)?;
        let (started, cpu) = (Instant::now(), own_cpu_secs());
        let accepted = std::thread::scope(|scope| {
            let hub = &hub;
            let threads: Vec<_> = pushers
                .iter()
                .map(|(name, frames)| scope.spawn(move || push_all(hub, name, frames)))
                .collect();
            threads.into_iter().try_fold(0, |sum, t| {
                // A panic in a pusher is a bug of the bench: let it surface as one.
                let n = t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
                Ok::<_, Failure>(sum + n)
            })
        })?;
        let secs = started.elapsed().as_secs_f64();
        let cpu = own_cpu_secs() - cpu;
        drop(hub);
        if accepted != records {
            return Err(fail(format!("{accepted} of {records} records accepted")));
        }
        let rate = records as f64 / secs;
        eprintln!(
            "run {run}: {records} records in {frame_count} frames from {clinics} clinic(s), {secs:.2} s, {rate:.0} records/s, CPU {cpu:.2} s (all threads), {:.0} records per CPU-second",
            records as f64 / cpu.max(1e-9)
        );
        rates.push(rate);
        cpus.push(cpu);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
    println!(
        "| hub in-process apply (`HubState::answer`: decode, validate, authorize, integrate, commit) | median of {} runs | target |",
        rates.len()
    );
    println!("|---|---|---|");
    println!(
        "| records/s, {records} records in {} frames of {batch} from {clinics} clinic(s) at once, into a hub holding {hub_holds} | {:.0} | ≥ 100,000 |",
        encoding.name(),
        median(rates)
    );
    let cpu = median(cpus);
    // Below the clock's tick a per-CPU-second figure would be a division by noise.
    let per_cpu = if cpu >= 0.05 {
        format!("{:.0}", records as f64 / cpu)
    } else {
        "too short to say".into()
    };
    println!("| CPU seconds, all threads (records per CPU-second) | {cpu:.2} ({per_cpu}) | |");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok<T>(r: Result<T, Failure>) -> T {
        r.unwrap_or_else(|f| panic!("{}", f.message))
    }

    /// `--hub-holds`: the earlier clinic's records are all in the hub before the
    /// timed push (the bench refuses to report otherwise), and the timed clinic's
    /// records are all accepted on top of them.
    #[test]
    fn apply_into_a_hub_that_already_holds_records() {
        ok(apply(120, 2, 50, 300, FrameEncoding::V2, 1));
        ok(apply(60, 1, 50, 100, FrameEncoding::V1, 1));
    }

    /// `--clinics`: every clinic's records are accepted, pushed at once from their
    /// threads (the bench refuses to report a rate otherwise), its patients
    /// registered by the clinic that pushed them.
    #[test]
    fn apply_from_clinics_pushing_at_once() {
        ok(apply(130, 1, 20, 0, FrameEncoding::V2, 3));
        let Err(f) = apply(10, 1, 20, 0, FrameEncoding::V2, 0) else {
            panic!("a run of no clinics was measured");
        };
        assert!(f.message.contains("--clinics"), "{}", f.message);
    }

    #[test]
    fn apply_refuses_an_empty_run_by_name() {
        let Err(f) = apply(0, 1, 2_000, 0, FrameEncoding::V1, 1) else {
            panic!("a run of no records was measured");
        };
        assert!(f.message.contains("--records"), "{}", f.message);
    }

    #[test]
    fn push_all_counts_only_accepted_records() {
        let tmp = tempfile::tempdir().unwrap();
        let frames = ok(push_frames(
            tmp.path(),
            "clinic-b",
            40,
            25,
            crate::wire::Encoding::V1,
        ));
        assert_eq!(frames.len(), 2);
        let mut policy = engine::Policy::new("hub", false);
        policy.serves_children = true;
        let hub = crate::hub::HubState::new(
            &tmp.path().join("hub.db"),
            policy,
            vec![("clinic-b".into(), [0; 32])],
            32 << 20,
        )
        .unwrap();
        // The second frame alone (records 25..40; 11 to a patient): the 8 of
        // patient 2, whose Patient is in the first frame, are refused (retried
        // later) and not counted; patient 3 registers with its 6 records.
        assert_eq!(ok(push_all(&hub, "clinic-b", &frames[1..])), 7);
        // Then in order: the first frame's 25 and patient 2's 8; patient 3's 7
        // are the hub's already and are not counted twice.
        assert_eq!(ok(push_all(&hub, "clinic-b", &frames)), 33);
    }
}
