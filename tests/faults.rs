//! Fault tests: hostile or broken bodies at the hub, and a clinic process killed
//! with SIGKILL in the middle of a sync.

mod common;

use std::time::Duration;

use clinicsync::devkit::cluster::{self, Proc};
use clinicsync::engine::{self, Policy};
use clinicsync::error::Classify;
use clinicsync::model::Snapshot;
use clinicsync::store::Store;
use clinicsync::time::wall_ms;
use clinicsync::wire::{self, Message, PushRequest, WireRecord};
use common::*;

fn post(url: &str, token: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut req = ureq::post(&format!("{url}/v1/push")).set("Content-Type", wire::CONTENT_TYPE);
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    match req.send_bytes(body) {
        Ok(r) => (r.status(), String::new()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("transport error: {e}"),
    }
}

#[test]
fn hostile_bodies_get_clear_http_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        1 << 20,
    );
    let token = hub.token("a");
    let rec = |i: usize| WireRecord {
        kind: "Patient".into(),
        id: format!("p{i}"),
        origin: "a".into(),
        hlc: Default::default(),
        vv: clinicsync::model::VersionVector([("a".to_string(), 1)].into_iter().collect()),
        deleted: false,
        body: format!(r#"{{"id":"p{i}","resourceType":"Patient"}}"#),
    };
    let good = wire::encode(&Message::PushRequest(PushRequest {
        node: "a".into(),
        records: vec![rec(0)],
    }))
    .unwrap();
    let before = hub.store().counts().unwrap();

    let mut wrong_version = good.clone();
    wrong_version[5] = 3;
    // A v1 frame labelled v2: its zstd bytes read as a dictionary id we lack.
    let mut relabelled = good.clone();
    relabelled[5] = 2;
    let mut bomb = wire::MAGIC.to_vec();
    bomb.extend_from_slice(&1u16.to_be_bytes());
    bomb.extend(zstd::bulk::compress(&vec![0u8; 200 << 20], 19).unwrap());
    let oversized = vec![7u8; 2 << 20];
    let spoofed = wire::encode(&Message::PushRequest(PushRequest {
        node: "b".into(),
        records: vec![rec(1)],
    }))
    .unwrap();

    // (case, credential, body, expected status, expected words in the answer)
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "truncated",
            Some(&token),
            good[..good.len() - 4].to_vec(),
            400,
            "not valid zstd",
        ),
        (
            "garbage",
            Some(&token),
            b"GET / HTTP/1.1 lol".to_vec(),
            400,
            "bad magic",
        ),
        (
            "wrong protocol version",
            Some(&token),
            wrong_version,
            400,
            "protocol version 3 is not supported",
        ),
        (
            "v1 frame labelled v2",
            Some(&token),
            relabelled,
            400,
            "which this node does not have",
        ),
        ("oversized", Some(&token), oversized, 413, "length limit"),
        (
            "decompression bomb",
            Some(&token),
            bomb,
            413,
            "decompressed message",
        ),
        ("no credential", None, good.clone(), 401, "credential"),
        (
            "wrong credential",
            Some("not-a-token"),
            good.clone(),
            401,
            "credential",
        ),
        (
            "push as another node",
            Some(&token),
            spoofed,
            403,
            "claims to come from b",
        ),
    ];
    for (name, tok, body, status, needle) in cases {
        let (got, text) = post(&hub.url, tok, &body);
        assert_eq!(got, status, "{name}: {text}");
        assert!(
            text.to_lowercase().contains(&needle.to_lowercase()),
            "{name}: {text:?} lacks {needle:?}"
        );
    }
    let after = hub.store().counts().unwrap();
    assert_eq!(
        (before.records, before.audit, before.head_seq),
        (after.records, after.audit, after.head_seq)
    );
    // And the hub still works.
    assert_eq!(post(&hub.url, Some(&token), &good).0, 200);
    assert_eq!(hub.store().counts().unwrap().records, 1);
}

#[test]
fn a_clinic_killed_mid_sync_of_5000_records_delivers_each_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = cluster::free_port().unwrap();
    let layout = cluster::write_layout(
        dir.path(),
        port,
        &[("clinic-a", "North")],
        "interval_secs = 1\nbackoff_min_secs = 1\nbackoff_max_secs = 2\npush_batch_records = 100",
        "",
    )
    .unwrap();
    let clinic = &layout.clinics[0];
    {
        let mut store = Store::open(&clinic.store, &clinic.id).unwrap();
        let records = clinicsync::synth::clinic_records(9, "a", "North", "loc", 455, 2, 4);
        assert_eq!(records.len(), 5005);
        let items = records
            .into_iter()
            .take(5000)
            .map(|v| (Snapshot::from_json_value(v).unwrap(), false))
            .collect();
        engine::write_local(&mut store, &Policy::new(&clinic.id, true), items, wall_ms()).unwrap();
    }
    let exe = std::path::Path::new(BIN);
    let mut hub = Proc::spawn(exe, "hub", &layout.hub.config, &["run"]).unwrap();
    cluster::wait_healthy(&layout.hub_url, Duration::from_secs(20)).unwrap();
    let hub_count = || {
        Store::open_existing(&layout.hub.store)
            .and_then(|s| s.counts())
            .map(|c| c.records)
            .unwrap_or(0)
    };

    let mut kills = 0;
    while kills < 3 {
        let mut c = Proc::spawn(exe, "clinic-a", &clinic.config, &["run"]).unwrap();
        let target = 1000 * (kills + 1);
        assert!(
            cluster::wait_until(Duration::from_secs(60), || hub_count() >= target),
            "no progress"
        );
        c.kill9();
        kills += 1;
        assert!(hub_count() < 5000, "killed too late to test anything");
    }
    let mut c = Proc::spawn(exe, "clinic-a", &clinic.config, &["run"]).unwrap();
    let done = cluster::wait_until(Duration::from_secs(120), || {
        Store::open_existing(&clinic.store)
            .and_then(|s| s.counts())
            .map(|c| c.outbox == 0)
            .unwrap_or(false)
    });
    c.terminate();
    hub.terminate();
    assert!(done, "outbox never drained");

    let hub_store = Store::open_existing(&layout.hub.store).unwrap();
    let clinic_store = Store::open_existing(&clinic.store).unwrap();
    let h = hub_store.list(None).unwrap();
    let c = clinic_store.list(None).unwrap();
    assert_eq!(h.len(), 5000);
    assert_eq!(c.len(), 5000);
    for (x, y) in h.iter().zip(c.iter()) {
        assert_eq!(x.version.key(), y.version.key());
        assert_eq!(
            x.version.snapshot.hash,
            y.version.snapshot.hash,
            "{}",
            x.version.key()
        );
        assert_eq!(x.version.vv, y.version.vv);
    }
    // Exactly once: the hub stored one version, and wrote one audit entry, per record.
    let versions: i64 = hub_store
        .conn()
        .query_row("SELECT COUNT(*) FROM history", [], |r| r.get(0))
        .unwrap();
    let writes: i64 = hub_store
        .conn()
        .query_row("SELECT COUNT(*) FROM audit WHERE action='write'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!((versions, writes), (5000, 5000));
    assert!(matches!(
        hub_store.verify_audit().unwrap(),
        clinicsync::store::AuditCheck::Intact { .. }
    ));
    assert!(matches!(
        clinic_store.verify_audit().unwrap(),
        clinicsync::store::AuditCheck::Intact { .. }
    ));
}

#[test]
fn a_sync_over_a_link_cut_every_50_to_200_kib_completes_with_each_record_once() {
    use clinicsync::devkit::cluster::{FaultProxy, Faults};
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North"), ("b", "North")]),
        &["a", "b"],
        32 << 20,
    );
    let hub_port: u16 = hub.url.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = FaultProxy::start(
        hub_port,
        Faults {
            cut_every: Some((50 << 10, 200 << 10)),
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
    a.sync_cfg.push_batch_bytes = 8 << 20;
    a.sync_cfg.push_batch_records = 20_000;
    // About 20 MB of FHIR JSON.
    let records = clinicsync::synth::clinic_records(11, "a", "North", "l", 2800, 2, 4);
    let json: usize = records.iter().map(|r| r.to_string().len()).sum();
    assert!(json > 18 << 20, "{json} bytes of JSON");
    let n = records.len();
    a.put(records);
    let (mut failures, mut resent, mut resumed) = (0, 0u64, 0u64);
    for _ in 0..400 {
        match a.sync() {
            Ok(r) => {
                resent += r.bytes_resent;
                resumed += r.resumed;
                if a.store.counts().unwrap().outbox == 0 {
                    break;
                }
            }
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                failures += 1;
            }
        }
    }
    assert_eq!(
        a.store.counts().unwrap().outbox,
        0,
        "never finished ({failures} failed rounds)"
    );
    assert!(
        proxy.cuts() > 0,
        "the link was never cut: the test proves nothing"
    );
    let hs = hub.store();
    assert_eq!(hs.counts().unwrap().records as usize, n);
    let versions: i64 = hs
        .conn()
        .query_row("SELECT COUNT(*) FROM history", [], |r| r.get(0))
        .unwrap();
    assert_eq!(versions as usize, n, "each record stored once");
    // Transfers resumed where they stopped: a cut cost at most the chunk in flight.
    assert!(resumed > 0, "no transfer was resumed");
    assert!(
        resent <= proxy.cuts() * (64 << 10),
        "{resent} bytes re-sent for {} cuts",
        proxy.cuts()
    );
    eprintln!(
        "{} cuts, {resumed} resumed, {resent} bytes re-sent, {failures} failed rounds, {} bytes forwarded",
        proxy.cuts(),
        proxy.forwarded.load(std::sync::atomic::Ordering::Relaxed)
    );

    // The other way: a new clinic of the same district pulls all of it in large pages
    // over the same link. Each page comes as a transfer whose pieces resume after a cut.
    let cuts_before = proxy.cuts();
    let mut b = TestClinic::new(
        dir.path(),
        "b",
        &format!("http://127.0.0.1:{}", proxy.port),
        &hub.token("b"),
    );
    b.sync_cfg.pull_page_bytes = 4 << 20;
    b.sync_cfg.pull_page_records = 5_000;
    let (mut failures, mut resent, mut resumed) = (0, 0u64, 0u64);
    for _ in 0..400 {
        match b.sync() {
            Ok(r) => {
                resent += r.bytes_resent;
                resumed += r.resumed;
                if b.store.counts().unwrap().records as usize == n {
                    break;
                }
            }
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                failures += 1;
            }
        }
    }
    assert_eq!(
        b.store.counts().unwrap().records as usize,
        n,
        "the pulling clinic never got everything ({failures} failed rounds)"
    );
    let cuts = proxy.cuts() - cuts_before;
    assert!(
        cuts > 0,
        "the pulls were never cut: the test proves nothing"
    );
    assert!(resumed > 0, "no pull was resumed within its transfer");
    assert!(
        resent <= cuts * (64 << 10),
        "{resent} bytes fetched again for {cuts} cuts"
    );
    let inbox: i64 = b
        .store
        .conn()
        .query_row("SELECT COUNT(*) FROM history", [], |r| r.get(0))
        .unwrap();
    assert_eq!(inbox as usize, n, "each pulled record stored once");
    eprintln!("pull: {cuts} cuts, {resumed} resumed, {resent} bytes fetched again, {failures} failed rounds");

    // One round trip a page: asked with `answer_chunk`, the hub answers a large page
    // with its first chunk; asked without it (an older client), in one piece.
    use clinicsync::wire::{Cursor, Message, PullRequest};
    let direct = clinicsync::transport::http::HttpClient::new(
        &hub.url,
        clinicsync::secret::Secret::new(hub.token("b")),
        std::time::Duration::from_secs(60),
    );
    let mut req = PullRequest {
        node: "b".into(),
        cursor: Cursor::default(),
        max_bytes: 4 << 20,
        max_records: 5_000,
        include_own: false,
        answer_chunk: 32 << 10,
        health: Vec::new(),
        order_results: Vec::new(),
    };
    match direct
        .exchange("/v1/pull", &Message::PullRequest(req.clone()))
        .unwrap()
        .0
    {
        Message::ChunkData(d) => {
            assert_eq!((d.offset, d.data.len()), (0, 32 << 10));
            assert!(d.total > 32 << 10, "{} bytes in all", d.total);
        }
        other => panic!("a large page came back as a {}", other.name()),
    }
    req.answer_chunk = 0;
    match direct
        .exchange("/v1/pull", &Message::PullRequest(req))
        .unwrap()
        .0
    {
        Message::PullResponse(r) => assert_eq!(r.records.len(), 5_000),
        other => panic!("an old-style pull came back as a {}", other.name()),
    }
}

#[test]
fn a_black_holed_link_times_out_and_recovers() {
    use clinicsync::devkit::cluster::{FaultProxy, Faults};
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let hub_port: u16 = hub.url.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = FaultProxy::start(
        hub_port,
        Faults {
            black_hole: true,
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
    a.client = clinicsync::transport::http::HttpClient::new(
        &format!("http://127.0.0.1:{}", proxy.port),
        clinicsync::secret::Secret::new(hub.token("a")),
        Duration::from_secs(1),
    );
    // The exchange timeout the daemon gives both its client and its resumption.
    a.sync_cfg.timeout_secs = 1;
    a.put(vec![patient("p-bh", "North")]);
    let t0 = std::time::Instant::now();
    let err = a.sync().unwrap_err();
    assert!(
        err.is_retryable() && t0.elapsed() < Duration::from_secs(10),
        "{err} after {:?}",
        t0.elapsed()
    );
    proxy.set(Faults::default());
    a.sync().unwrap();
    assert!(get(&hub.store(), "Patient/p-bh").is_some());
}

/// Parses "bootstrap: N records pulled" from `clinicsync sync --bootstrap`.
fn pulled_by(out: &std::process::Output) -> usize {
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("bootstrap: ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{text}"))
}

/// A hub with clinic-a (catchment: district North) and `sync` settings for the
/// clinic; the hub's store holds `items`, written before it starts.
fn north_layout(
    dir: &std::path::Path,
    sync: &str,
    items: Vec<(Snapshot, bool)>,
) -> cluster::Layout {
    let port = cluster::free_port().unwrap();
    let layout = cluster::write_layout(dir, port, &[("clinic-a", "North")], sync, "").unwrap();
    let mut hub = Store::open(&layout.hub.store, "hub").unwrap();
    let mut policy = Policy::new("hub", false);
    policy.catchment.push(clinicsync::engine::CatchmentRule {
        node: "clinic-a".into(),
        path: "address.district".into(),
        equals: "North".into(),
    });
    engine::write_local(&mut hub, &policy, items, wall_ms()).unwrap();
    layout
}

#[test]
fn a_bootstrap_killed_on_either_side_resumes_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    // The hub holds metadata and the clinic's catchment: 12,100 records.
    let mut items: Vec<(Snapshot, bool)> = (0..1100)
        .map(|i| {
            (
                Snapshot::from_json_value(clinicsync::synth::location(
                    &format!("loc-{i}"),
                    "Dispensary",
                    "North",
                ))
                .unwrap(),
                false,
            )
        })
        .collect();
    items.extend(
        clinicsync::synth::clinic_records(12, "h", "North", "loc-1", 1000, 2, 4)
            .into_iter()
            .map(|v| (Snapshot::from_json_value(v).unwrap(), false)),
    );
    let layout = north_layout(
        dir.path(),
        "pull_page_records = 400\npull_page_bytes = 400000",
        items,
    );
    let clinic = &layout.clinics[0];
    let total = 1100 + 11_000;
    let exe = std::path::Path::new(BIN);
    let held = || {
        Store::open_existing(&clinic.store)
            .and_then(|s| s.counts())
            .map(|c| c.records as usize)
            .unwrap_or(0)
    };
    let mut hub = Proc::spawn(exe, "hub", &layout.hub.config, &["run"]).unwrap();
    cluster::wait_healthy(&layout.hub_url, Duration::from_secs(20)).unwrap();

    // Kill the clinic in the middle of its bootstrap, then run it again.
    let mut boot = Proc::spawn(exe, "clinic-a", &clinic.config, &["sync", "--bootstrap"]).unwrap();
    assert!(
        cluster::wait_until(Duration::from_secs(60), || held() >= 2000),
        "no progress"
    );
    boot.kill9();
    let at_kill = held();
    assert!(at_kill < total, "killed too late");

    // Kill the hub too, mid-way through the second run, and bring it back.
    let again = std::thread::spawn({
        let config = clinic.config.clone();
        move || common::cli(&config, &["sync", "--bootstrap"])
    });
    assert!(
        cluster::wait_until(Duration::from_secs(60), || held() >= at_kill + 2000),
        "no progress after restart"
    );
    hub.kill9();
    assert!(
        held() < total,
        "the hub was killed after the bootstrap ended: the test proves nothing"
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut hub = Proc::spawn(exe, "hub", &layout.hub.config, &["run"]).unwrap();
    let out = again.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    hub.terminate();

    assert_eq!(held(), total, "the bootstrap completed");
    // The second run started from the clinic's cursor, not from zero.
    let second = pulled_by(&out);
    assert!(
        second <= total - at_kill + 400,
        "re-pulled from zero: {second} pulled after {at_kill} were held"
    );
    let versions: i64 = Store::open_existing(&clinic.store)
        .unwrap()
        .conn()
        .query_row("SELECT COUNT(*) FROM history", [], |r| r.get(0))
        .unwrap();
    assert_eq!(versions as usize, total, "no record applied twice");
}

#[test]
fn a_clinic_killed_in_the_middle_of_a_large_page_continues_that_page_after_a_restart() {
    use clinicsync::devkit::cluster::{FaultProxy, Faults};
    let dir = tempfile::tempdir().unwrap();
    let items = clinicsync::synth::clinic_records(13, "h", "North", "loc-1", 400, 2, 5)
        .into_iter()
        .map(|v| (Snapshot::from_json_value(v).unwrap(), false))
        .collect();
    let layout = north_layout(
        dir.path(),
        "pull_page_records = 5000\npull_page_bytes = 4194304\nchunk_bytes = 8192",
        items,
    );
    let (clinic, port) = (&layout.clinics[0], layout.port);
    let exe = std::path::Path::new(BIN);
    let mut hub = Proc::spawn(exe, "hub", &layout.hub.config, &["run"]).unwrap();
    cluster::wait_healthy(&layout.hub_url, Duration::from_secs(20)).unwrap();
    // A slow link, so the first page (5,000 of 5,200 records, one answer of several
    // chunks: ~60 KB in protocol v2 with bodies as columns) is still arriving when the
    // clinic is killed, three quarters in.
    let proxy = FaultProxy::start(
        port,
        Faults {
            rate_bps: Some(8_000),
            ..Faults::default()
        },
    )
    .unwrap();
    let text = std::fs::read_to_string(&clinic.config)
        .unwrap()
        .replace(&format!(":{port}\""), &format!(":{}\"", proxy.port));
    std::fs::write(&clinic.config, text).unwrap();
    // Read-only, so the test never waits for a lock the clinic holds.
    let answer = || -> Option<(u64, u64)> {
        let c = rusqlite::Connection::open_with_flags(
            &clinic.store,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .ok()?;
        let r = c.query_row(
            "SELECT total, received FROM transfers WHERE dir = 'down'",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        );
        r.ok()
    };
    let mut boot = Proc::spawn(exe, "clinic-a", &clinic.config, &["sync", "--bootstrap"]).unwrap();
    assert!(
        cluster::wait_until(Duration::from_secs(60), || answer()
            .is_some_and(|(total, got)| total >= 48 << 10 && got * 4 >= total * 3)),
        "the first page never came in pieces: {:?}; clinic log: {}",
        answer(),
        std::fs::read_to_string(clinic.config.with_extension("log")).unwrap_or_default()
            + &std::fs::read_to_string(layout.hub.config.with_extension("log")).unwrap_or_default()
    );
    boot.kill9();
    // The killed clinic's connections may still count a piece the hub had already
    // sent until the proxy sees them closed: those bytes are not the restart's.
    assert!(
        cluster::wait_until(Duration::from_secs(20), || proxy.open_pipes() == 0),
        "the killed clinic's connections never closed"
    );
    let (total, held) = answer().unwrap();
    assert!(held < total, "killed after the page was complete");
    let records = |s: &Store| s.counts().unwrap().records;
    assert_eq!(records(&Store::open_existing(&clinic.store).unwrap()), 0);

    let before = proxy.forwarded.load(std::sync::atomic::Ordering::Relaxed);
    let out = common::cli(&clinic.config, &["sync", "--bootstrap"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let moved = proxy.forwarded.load(std::sync::atomic::Ordering::Relaxed) - before;
    hub.terminate();
    let store = Store::open_existing(&clinic.store).unwrap();
    assert_eq!(records(&store), 5_200, "the bootstrap completed");
    // The restarted clinic fetched what it lacked — plus the first chunk (8 KiB) again
    // (it comes with the answer to the pull), the small second page and the requests'
    // own bytes — not the whole page again: less than the page less half of what it
    // held. (Fetching the page from zero would move more than the whole page.)
    assert!(
        moved < total - held / 2,
        "{moved} bytes moved after the restart; the page is {total} bytes and {held} were held; clinic log: {}{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(clinic.config.with_extension("log")).unwrap_or_default()
    );
    assert!(answer().is_none(), "the used answer was not forgotten");
}
