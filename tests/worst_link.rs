//! A link that drops more often than a transfer piece: cut every 5–60 KB, as GPRS
//! links in the field do. Pieces shrink to what the link completes, each direction
//! takes what it can, and everything arrives, each record once — also with the clinic
//! SIGKILLed every few seconds.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use clinicsync::devkit::cluster::{self, FaultProxy, Faults, Proc};
use clinicsync::store::Store;
use common::*;

const CUTS: (u64, u64) = (5 << 10, 60 << 10);

/// A backlog each way that is about 500 KB on the wire (compressed): the clinic's
/// own records, and the hub's records of the clinic's district not pulled yet.
fn backlogs() -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let mine = clinicsync::synth::clinic_records(3, "a", "North", "l", 1700, 2, 4);
    let theirs = clinicsync::synth::clinic_records(4, "h", "North", "l", 1700, 2, 4);
    (mine, theirs)
}

/// The frame a backlog travels in, as bytes on the wire.
fn wire_size(records: &[serde_json::Value]) -> usize {
    use clinicsync::model::{Hlc, Snapshot, Version, VersionVector};
    use clinicsync::wire::{Message, PushRequest, WireRecord};
    let records = records
        .iter()
        .map(|r| {
            WireRecord::from_version(&Version {
                snapshot: Snapshot::from_json_value(r.clone()).unwrap(),
                origin: "a".into(),
                hlc: Hlc::default(),
                vv: VersionVector([("a".to_string(), 1)].into_iter().collect()),
                deleted: false,
            })
        })
        .collect();
    clinicsync::wire::encode(&Message::PushRequest(PushRequest {
        node: "a".into(),
        records,
    }))
    .unwrap()
    .len()
}

fn versions(s: &Store) -> i64 {
    s.conn()
        .query_row("SELECT COUNT(*) FROM history", [], |r| r.get(0))
        .unwrap()
}

/// Watches the piece size a clinic keeps in its store (`link_piece_bytes`, written as
/// it changes) from a read-only connection of its own, and keeps the smallest seen.
struct SmallestPiece {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    watcher: std::thread::JoinHandle<u64>,
}

fn smallest_piece(store: &Path) -> SmallestPiece {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (path, halt) = (store.to_path_buf(), stop.clone());
    let watcher = std::thread::spawn(move || {
        let db = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        db.busy_timeout(Duration::from_secs(1)).unwrap();
        let mut smallest = 0u64;
        while !halt.load(Ordering::Relaxed) {
            let kept: Option<u64> = db
                .query_row(
                    "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'link_piece_bytes'",
                    [],
                    |r| r.get(0),
                )
                .ok();
            if let Some(p) = kept.filter(|p| *p > 0) {
                smallest = if smallest == 0 { p } else { smallest.min(p) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        smallest
    });
    SmallestPiece { stop, watcher }
}

impl SmallestPiece {
    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.watcher.join().unwrap()
    }
}

#[test]
fn a_link_cut_every_5_to_60_kb_still_delivers_everything_each_way_once() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        32 << 20,
    );
    let (mine, theirs) = backlogs();
    let (n_mine, n_theirs) = (mine.len(), theirs.len());
    let (w_mine, w_theirs) = (wire_size(&mine), wire_size(&theirs));
    assert!(
        w_mine > 400 << 10 && w_theirs > 400 << 10,
        "{w_mine} / {w_theirs} bytes on the wire"
    );
    hub.put(theirs);
    let proxy = FaultProxy::start(
        hub.port,
        Faults {
            cut_every: Some(CUTS),
            ..Faults::default()
        },
    )
    .unwrap();
    let mut a = TestClinic::new(
        dir.path(),
        "a",
        &format!("http://127.0.0.1:{}", proxy.port),
        &hub.token("a"),
    );
    a.sync_cfg.timeout_secs = 10;
    a.put(mine);
    let smallest = smallest_piece(&dir.path().join("a.db"));
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed()
        < Duration::from_secs(
            std::env::var("WL_SECS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(180),
        )
    {
        rounds += 1;
        let t0 = Instant::now();
        match a.sync() {
            Ok(r) => {
                if std::env::var("WL_DEBUG").is_ok() {
                    eprintln!("round {rounds} ({:?}): ok pushed {} pulled {} resumed {} resent {} interrupted {:?}", t0.elapsed(), r.pushed.cleared, r.pulled, r.resumed, r.bytes_resent, r.interrupted)
                }
            }
            Err(e) => {
                if std::env::var("WL_DEBUG").is_ok() {
                    eprintln!("round {rounds} ({:?}): {e}", t0.elapsed())
                }
            }
        }
        let c = a.store.counts().unwrap();
        if c.outbox == 0 && c.records as usize == n_mine + n_theirs {
            break;
        }
    }
    let took = started.elapsed();
    let c = a.store.counts().unwrap();
    assert_eq!(c.outbox, 0, "the push never finished in {took:?}");
    assert_eq!(
        c.records as usize,
        n_mine + n_theirs,
        "the pull never finished in {took:?}"
    );
    assert!(
        proxy.cuts() > 10,
        "only {} cuts: the test proves nothing",
        proxy.cuts()
    );
    let h = hub.store();
    assert_eq!(h.counts().unwrap().records as usize, n_mine + n_theirs);
    assert_eq!(
        versions(&h) as usize,
        n_mine + n_theirs,
        "a record stored twice at the hub"
    );
    assert_eq!(
        versions(&a.store) as usize,
        n_mine + n_theirs,
        "a record stored twice at the clinic"
    );
    let piece = a
        .store
        .meta(&clinicsync::store::meta::LINK_PIECE_BYTES)
        .unwrap()
        .unwrap_or(0);
    // Pieces grow back by an eighth per piece that arrives, so where they ended
    // depends on where the last cuts fell: what must hold is that they shrank.
    let smallest = smallest.stop();
    assert!(
        smallest > 0 && smallest < 64 << 10,
        "pieces never shrank: the smallest kept was {smallest}"
    );
    eprintln!(
        "cut every 5-60 KB: {n_mine} records ({w_mine} B) up and {n_theirs} ({w_theirs} B) down in {took:?}, {rounds} rounds, {} cuts, piece {smallest} bytes at the smallest, {piece} now",
        proxy.cuts()
    );
}

#[test]
fn the_same_link_with_the_clinic_killed_every_few_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let port = cluster::free_port().unwrap();
    let proxy_target = port;
    let (mine, theirs) = backlogs();
    let (n_mine, n_theirs) = (mine.len(), theirs.len());
    // The clinic reaches the hub only through the cutting proxy.
    let proxy = FaultProxy::start(
        proxy_target,
        Faults {
            cut_every: Some(CUTS),
            ..Faults::default()
        },
    )
    .unwrap();
    let l = cluster::write_layout(
        dir.path(),
        port,
        &[("clinic-a", "North")],
        "interval_secs = 1\nbackoff_min_secs = 1\nbackoff_max_secs = 2\ntimeout_secs = 10",
        "",
    )
    .unwrap();
    let clinic_cfg = std::fs::read_to_string(&l.clinics[0].config)
        .unwrap()
        .replace(&l.hub_url, &format!("http://127.0.0.1:{}", proxy.port));
    std::fs::write(&l.clinics[0].config, clinic_cfg).unwrap();
    let write = |config: &Path, name: &str, records: Vec<serde_json::Value>| {
        let p = dir.path().join(name);
        std::fs::write(&p, clinicsync::synth::bundle(records).to_string()).unwrap();
        let out = cli(config, &["put", p.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    write(&l.hub.config, "theirs.json", theirs);
    write(&l.clinics[0].config, "mine.json", mine);
    let exe = Path::new(BIN);
    let mut hub = Proc::spawn(exe, "hub", &l.hub.config, &["run"]).unwrap();
    cluster::wait_healthy(&l.hub_url, Duration::from_secs(20)).unwrap();
    let done = || {
        let c = Store::open_existing(&l.clinics[0].store)
            .and_then(|s| s.counts())
            .ok();
        c.is_some_and(|c| c.outbox == 0 && c.records as usize == n_mine + n_theirs)
    };
    let started = Instant::now();
    let mut kills = 0;
    while !done() && started.elapsed() < Duration::from_secs(240) {
        let mut clinic = Proc::spawn(exe, "clinic-a", &l.clinics[0].config, &["run"]).unwrap();
        let _ = cluster::wait_until(Duration::from_secs(6), done);
        clinic.kill9();
        kills += 1;
    }
    let took = started.elapsed();
    assert!(done(), "not delivered in {took:?} with {kills} kills");
    hub.terminate();
    let h = Store::open_existing(&l.hub.store).unwrap();
    let c = Store::open_existing(&l.clinics[0].store).unwrap();
    assert_eq!(
        versions(&h) as usize,
        n_mine + n_theirs,
        "a record stored twice at the hub"
    );
    assert_eq!(
        versions(&c) as usize,
        n_mine + n_theirs,
        "a record stored twice at the clinic"
    );
    eprintln!(
        "cut every 5-60 KB and SIGKILLed every 6 s: delivered in {took:?}, {kills} kills, {} cuts",
        proxy.cuts()
    );
}
