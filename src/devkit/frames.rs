//! `clinicsync-bench frames`: bytes per record of push frames and pull pages in
//! protocol v1, v2 without a dictionary and v2 with the shipped dictionary, against
//! `zstd -19` of the bare NDJSON of the same resources; then the zstd settings a
//! clinic could afford for its pushes (size, encode time, compression context
//! memory). `clinicsync-bench dict-samples`: the training samples of
//! `tests/bench/train-dict.sh`.
//!
//! Frames are the real ones: the resources are written to a clinic store, push
//! batches come out of its outbox as `sync` makes them (`sync.push_batch_records`,
//! `sync.push_batch_bytes` defaults), and pull pages hold the same records in pages
//! of `sync.pull_page_records` (the hub's page size) at the hub's level.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

use crate::cli::{Failure, EXIT_FAILURE};
use crate::engine;
use crate::model::Snapshot;
use crate::store::Store;
use crate::time::wall_ms;
use crate::wire::{self, dict, Encoding, Limits, Message, PullResponse, WireRecord};

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure::new(EXIT_FAILURE, format!("bench frames: {e}"))
}

#[derive(clap::Args, Debug)]
pub struct FramesArgs {
    /// A directory of third-party FHIR NDJSON (e.g. `carebundle generate --format
    /// ndjson --out DIR`), held out of the dictionary's training.
    #[arg(long)]
    pub third_party: Option<PathBuf>,
    /// Resources in our day's work.
    #[arg(long, default_value_t = 2_000)]
    pub day: usize,
    /// Resources in our bootstrap (0: skip).
    #[arg(long, default_value_t = 50_000)]
    pub bootstrap: usize,
    /// zstd settings to try for clinic pushes (v2 with dictionary):
    /// LEVEL or LEVEL:WINDOW_LOG:HASH_LOG:CHAIN_LOG.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "3,6,9,12,15,19,12:20:17:17,15:20:17:17,19:20:18:18,19:21:19:19"
    )]
    pub explore: Vec<String>,
    /// Also write each frame's uncompressed v2 payload here (to try other tools).
    #[arg(long)]
    pub dump: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct DictSamplesArgs {
    /// Where to write the samples (one canonical body per file).
    #[arg(long)]
    pub out: PathBuf,
    /// Resources from clinicsync's own generator.
    #[arg(long, default_value_t = 20_000)]
    pub ours: usize,
    /// Seed of our generator (keep it apart from the measured workloads' 42 and 43).
    #[arg(long, default_value_t = 1_000)]
    pub seed: u64,
    /// Directories of third-party NDJSON to sample too.
    #[arg(long)]
    pub ndjson: Vec<PathBuf>,
    /// Resources taken from each NDJSON directory at most (every k-th).
    #[arg(long, default_value_t = 20_000)]
    pub per_source: usize,
}

/// Our generator's resources: clinics' days of work under fresh ids.
fn ours(n: usize, seed: u64) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    let mut k = 0;
    while out.len() < n {
        let district = ["Kakamega", "Bungoma", "Busia", "Vihiga"][k % 4];
        out.extend(crate::synth::clinic_records(
            seed + k as u64,
            &format!("s{seed}-{k}"),
            district,
            &format!("loc-{k}"),
            50,
            1 + k % 3,
            2 + k % 4,
        ));
        k += 1;
    }
    out.truncate(n);
    out
}

pub fn dict_samples(a: DictSamplesArgs) -> Result<(), Failure> {
    std::fs::create_dir_all(&a.out).map_err(fail)?;
    let mut sources = vec![("ours".to_string(), ours(a.ours, a.seed))];
    for d in &a.ndjson {
        let all = super::linkbench::read_ndjson_dir(d)?;
        let step = all.len().div_ceil(a.per_source.max(1)).max(1);
        let picked: Vec<Value> = all.into_iter().step_by(step).collect();
        sources.push((d.display().to_string(), picked));
    }
    for (s, (name, resources)) in sources.iter().enumerate() {
        let (mut n, mut bytes) = (0, 0);
        for (i, v) in resources.iter().enumerate() {
            // The bodies as they travel: canonical JSON.
            let Ok(snap) = Snapshot::from_json_value(v.clone()) else {
                continue;
            };
            std::fs::write(a.out.join(format!("{s}-{i:06}.json")), &snap.body).map_err(fail)?;
            n += 1;
            bytes += snap.body.len();
        }
        eprintln!("{name}: {n} samples, {bytes} bytes");
    }
    Ok(())
}

/// Push batches of `resources` as a clinic's `sync` makes them.
pub(crate) fn push_batches(dir: &Path, resources: &[Value]) -> Result<Vec<Message>, Failure> {
    let path = dir.join("frames.db");
    let _ = std::fs::remove_file(&path);
    super::bench::write_store(
        &path,
        "clinic-x",
        &engine::Policy::new("clinic-x", true),
        resources,
    )?;
    let store = Store::open_existing(&path).map_err(fail)?;
    let cfg = crate::config::SyncSection::default();
    let (mut after, mut out) = (0, Vec::new());
    while let Some((req, last)) = engine::next_push_after(
        &store,
        wall_ms(),
        cfg.push_batch_records,
        cfg.push_batch_bytes,
        after,
    )
    .map_err(fail)?
    {
        out.push(Message::PushRequest(req));
        after = last;
    }
    Ok(out)
}

/// The same records as the hub's pull pages.
fn pull_pages(pushes: &[Message]) -> Vec<Message> {
    let cfg = crate::config::SyncSection::default();
    let records: Vec<WireRecord> = pushes
        .iter()
        .flat_map(|m| match m {
            Message::PushRequest(p) => p.records.clone(),
            _ => Vec::new(),
        })
        .collect();
    let n = records.len();
    records
        .chunks(cfg.pull_page_records as usize)
        .enumerate()
        .map(|(i, c)| {
            Message::PullResponse(PullResponse {
                records: c.to_vec(),
                next: wire::Cursor {
                    eff: 0,
                    seq: (i * c.len() + c.len()) as u64,
                },
                more: (i + 1) * (cfg.pull_page_records as usize) < n,
                head: n as u64,
                orders: Vec::new(),
                bundle_seq: 0,
            })
        })
        .collect()
}

/// Total bytes and encode seconds of `frames` in `encoding` at `level`; every frame
/// is decoded again and must give back its message.
fn measure(frames: &[Message], level: i32, encoding: Encoding) -> Result<(usize, f64), Failure> {
    let limits = Limits {
        max_compressed: 256 << 20,
        max_decompressed: 1 << 30,
        max_records: 200_000,
    };
    let (mut bytes, mut secs) = (0, 0.0);
    for m in frames {
        let t = Instant::now();
        let f = wire::encode_as(m, level, encoding).map_err(fail)?;
        secs += t.elapsed().as_secs_f64();
        bytes += f.len();
        if &wire::decode(&f, &limits).map_err(fail)? != m {
            return Err(fail(format!(
                "{encoding:?} did not round-trip a {}",
                m.name()
            )));
        }
    }
    Ok((bytes, secs))
}

/// One zstd setting: level, and optional caps on window, hash and chain logs.
#[derive(Debug, Clone, Copy)]
struct Effort {
    level: i32,
    caps: Option<(u32, u32, u32)>,
}

fn parse_effort(s: &str) -> Result<Effort, Failure> {
    let n: Vec<&str> = s.split(':').collect();
    let num = |x: &str| {
        x.trim()
            .parse::<u32>()
            .map_err(|_| fail(format!("bad --explore {s}")))
    };
    match n.len() {
        1 => Ok(Effort {
            level: num(n[0])? as i32,
            caps: None,
        }),
        4 => Ok(Effort {
            level: num(n[0])? as i32,
            caps: Some((num(n[1])?, num(n[2])?, num(n[3])?)),
        }),
        _ => Err(fail(format!(
            "bad --explore {s}: LEVEL or LEVEL:WLOG:HLOG:CLOG"
        ))),
    }
}

/// Compresses v2 payloads with the dictionary at `effort`, one fresh context per
/// frame as the product does: (bytes, seconds, largest context in bytes).
fn explore(
    frames: &[Message],
    effort: Effort,
    columns: bool,
) -> Result<(usize, f64, usize), Failure> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let d = dict::bytes(dict::newest()).ok_or_else(|| fail("no shipped dictionary"))?;
    let (mut bytes, mut secs, mut mem) = (0, 0.0, 0);
    for m in frames {
        let Some(p) = wire::v2::payload(m, columns).map_err(fail)? else {
            continue;
        };
        let t = Instant::now();
        let mut c = CCtx::create();
        let z = |e| fail(zstd::zstd_safe::get_error_name(e));
        c.set_parameter(CParameter::CompressionLevel(effort.level))
            .map_err(z)?;
        let wlog = effort.caps.map_or(22, |(w, _, _)| w.min(22));
        c.set_parameter(CParameter::WindowLog(wlog)).map_err(z)?;
        if let Some((_, h, ch)) = effort.caps {
            c.set_parameter(CParameter::HashLog(h)).map_err(z)?;
            c.set_parameter(CParameter::ChainLog(ch)).map_err(z)?;
        }
        c.set_parameter(CParameter::ContentSizeFlag(false))
            .map_err(z)?;
        c.set_parameter(CParameter::DictIdFlag(false)).map_err(z)?;
        c.load_dictionary(d).map_err(z)?;
        let mut out: Vec<u8> = Vec::with_capacity(p.len() / 4 + 64);
        c.compress2(&mut out, &p).map_err(z)?;
        secs += t.elapsed().as_secs_f64();
        bytes += out.len() + wire::v2::HEADER_LEN;
        mem = mem.max(c.sizeof());
    }
    Ok((bytes, secs, mem))
}

/// Bytes of `frames` encoded by the product at `level` with dictionary `dict` and
/// bodies as columns: each alone ([`wire::v2::encode`]) and chained
/// ([`wire::v2::encode_chained`], each frame's prefix the payload of the one before).
fn chained_sizes(frames: &[Message], level: i32, dict: u32) -> Result<(usize, usize), Failure> {
    let (mut alone, mut chained) = (0, 0);
    let mut prefix = None;
    for m in frames {
        if let Some(f) = wire::v2::encode(m, level, dict, true).map_err(fail)? {
            alone += f.len();
        }
        if let Some((f, next)) =
            wire::v2::encode_chained(m, level, dict, true, prefix.as_ref()).map_err(fail)?
        {
            chained += f.len();
            prefix = next;
        }
    }
    Ok((alone, chained))
}

/// Records per push of a clinic's ordinary sync (a few minutes of work).
const TRICKLE: usize = 10;

struct Set {
    name: String,
    resources: Vec<Value>,
}

pub fn run(a: FramesArgs) -> Result<(), Failure> {
    let tmp = tempfile::Builder::new()
        .prefix("clinicsync-frames-")
        .tempdir()
        .map_err(fail)?;
    let mut sets = vec![Set {
        name: format!("ours, day's work ({})", a.day),
        resources: super::linkbench::day_work(a.day),
    }];
    if a.bootstrap > 0 {
        sets.push(Set {
            name: format!("ours, bootstrap ({})", a.bootstrap),
            resources: super::linkbench::bootstrap_work(a.bootstrap),
        });
    }
    if let Some(tp) = &a.third_party {
        sets.push(Set {
            name: format!("held out: {}", tp.display()),
            resources: super::linkbench::read_ndjson_dir(tp)?,
        });
    }
    let efforts: Vec<Effort> = a
        .explore
        .iter()
        .map(|s| parse_effort(s))
        .collect::<Result<_, _>>()?;
    let dict = dict::newest();
    println!(
        "dictionary {dict}: {} bytes",
        dict::bytes(dict).map_or(0, <[u8]>::len)
    );
    println!();
    println!("| data | frames (level) | records | zstd -19 NDJSON | v1 | v2 | v2 + dict | v2 + dict, bodies as columns | bytes/record v1 / v2 / v2+dict / columns | ÷ zstd -19: v1 / v2 / v2+dict / columns | encode ms v1 / v2 / v2+dict / columns |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut explored = Vec::new();
    let mut chains = Vec::new();
    for set in &sets {
        let z19 = zstd::encode_all(&super::linkbench::ndjson(&set.resources)[..], 19)
            .map_err(fail)?
            .len();
        let pushes = push_batches(tmp.path(), &set.resources)?;
        let pages = pull_pages(&pushes);
        let n: usize = pushes
            .iter()
            .map(|m| match m {
                Message::PushRequest(p) => p.records.len(),
                _ => 0,
            })
            .sum();
        if let Some(d) = &a.dump {
            std::fs::create_dir_all(d).map_err(fail)?;
            for (what, frames) in [("push", &pushes), ("page", &pages)] {
                for (i, m) in frames.iter().enumerate() {
                    for (form, columns) in [("v2", false), ("v2cols", true)] {
                        if let Some(p) = wire::v2::payload(m, columns).map_err(fail)? {
                            let name = format!(
                                "{}-{what}-{i}.{form}",
                                set.name.replace(['/', ' ', ',', '(', ')', '\''], "_")
                            );
                            std::fs::write(d.join(name), p).map_err(fail)?;
                        }
                    }
                }
            }
        }
        // A clinic's ordinary sync: a handful of records every few minutes.
        let trickle: Vec<Message> = pushes
            .iter()
            .flat_map(|m| match m {
                Message::PushRequest(p) => p
                    .records
                    .chunks(TRICKLE)
                    .map(|c| {
                        Message::PushRequest(wire::PushRequest {
                            node: p.node.clone(),
                            records: c.to_vec(),
                        })
                    })
                    .collect::<Vec<_>>(),
                _ => Vec::new(),
            })
            .collect();
        for (what, frames, level) in [
            ("push", &pushes, wire::LEVEL_FAST),
            ("trickle push", &trickle, wire::LEVEL_FAST),
            ("pull pages", &pages, wire::LEVEL_BULK),
        ] {
            let v1 = measure(frames, level, Encoding::V1)?;
            let v2 = measure(
                frames,
                level,
                Encoding::V2 {
                    dict: 0,
                    columns: false,
                },
            )?;
            let v2d = measure(
                frames,
                level,
                Encoding::V2 {
                    dict,
                    columns: false,
                },
            )?;
            let v2c = measure(
                frames,
                level,
                Encoding::V2 {
                    dict,
                    columns: true,
                },
            )?;
            let per = |b: usize| b as f64 / n as f64;
            let ratio = |b: usize| b as f64 / z19 as f64;
            println!(
                "| {} | {} {what} ({level}) | {n} | {z19} | {} | {} | {} | {} | {:.1} / {:.1} / {:.1} / {:.1} | {:.2}× / {:.2}× / {:.2}× / {:.2}× | {:.0} / {:.0} / {:.0} / {:.0} |",
                set.name,
                frames.len(),
                v1.0,
                v2.0,
                v2d.0,
                v2c.0,
                per(v1.0),
                per(v2.0),
                per(v2d.0),
                per(v2c.0),
                ratio(v1.0),
                ratio(v2.0),
                ratio(v2d.0),
                ratio(v2c.0),
                v1.1 * 1e3,
                v2.1 * 1e3,
                v2d.1 * 1e3,
                v2c.1 * 1e3,
            );
        }
        for (what, frames) in [("push", &pushes), ("trickle push", &trickle)] {
            for level in [wire::LEVEL_FAST, wire::level::LEVEL_SLOW_LINK] {
                let (alone, chained) = chained_sizes(frames, level, dict)?;
                chains.push((
                    set.name.clone(),
                    format!("{} {what}", frames.len()),
                    level,
                    alone,
                    chained,
                    z19,
                ));
            }
        }
        // Where the bytes go: the bodies alone and the whole v2 payload, both at 19.
        let mut bodies = Vec::new();
        let mut payloads = 0;
        for m in &pushes {
            if let Message::PushRequest(p) = m {
                for r in &p.records {
                    bodies.extend_from_slice(r.body.as_bytes());
                    bodies.push(b'\n');
                }
            }
            if let Some(p) = wire::v2::payload(m, false).map_err(fail)? {
                payloads += zstd::bulk::compress(&p, 19).map_err(fail)?.len();
            }
        }
        eprintln!(
            "{}: zstd -19 of the canonical bodies {} bytes, of the v2 payloads {payloads} bytes (no dictionary), of the NDJSON {z19} bytes",
            set.name,
            zstd::bulk::compress(&bodies, 19).map_err(fail)?.len()
        );
        for e in &efforts {
            for columns in [false, true] {
                let (b, s, mem) = explore(&pushes, *e, columns)?;
                explored.push((
                    set.name.clone(),
                    *e,
                    columns,
                    b,
                    b as f64 / z19 as f64,
                    s,
                    mem,
                ));
            }
        }
    }
    println!();
    println!("Clinic pushes as the product encodes them (v2, dictionary, columns): each frame alone, and chained (each frame's prefix the payload before it):");
    println!();
    println!(
        "| data | frames | level | alone | ÷ zstd -19 | chained | ÷ zstd -19 | chained ÷ alone |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, frames, level, alone, chained, z19) in chains {
        let r = |b: usize| b as f64 / z19 as f64;
        println!(
            "| {name} | {frames} | {level} | {alone} | {:.2}× | {chained} | {:.2}× | {:.2} |",
            r(alone),
            r(chained),
            chained as f64 / alone as f64
        );
    }
    println!();
    println!("Clinic pushes, v2 + dictionary, by zstd setting (one context per frame):");
    println!();
    println!("| data | bodies | level | window/hash/chain log caps | bytes | ÷ zstd -19 | encode ms | context MiB |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, e, columns, b, r, s, mem) in explored {
        let caps = e
            .caps
            .map_or("—".to_string(), |(w, h, c)| format!("{w}/{h}/{c}"));
        println!(
            "| {name} | {} | {} | {caps} | {b} | {r:.2}× | {:.0} | {:.1} |",
            if columns { "columns" } else { "text" },
            e.level,
            s * 1e3,
            mem as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
