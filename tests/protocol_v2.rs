//! Protocol v2 negotiated per exchange over real HTTP (hub served in-process on
//! 127.0.0.1, clinics with the real client): v2 between v2 nodes, v1 wherever one
//! side is v1 (in both directions), a clinic following a parent replaced by an
//! older build, and chunked transfers carrying v2 frames across cuts.
//!
//! What travels is observed on the wire: the clinic talks to the hub through a
//! proxy that counts the frame headers (`CSYN` + version) in each direction.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use clinicsync::wire::{self, Accept, Encoding};
use common::*;

/// Counts v1 and v2 frame headers going up (clinic → hub) and down.
#[derive(Default)]
struct Seen {
    up: [AtomicU64; 3],
    down: [AtomicU64; 3],
    /// Chained v2 frames going up (their dictionary field is `wire::v2::CHAINED`).
    chained: AtomicU64,
}

impl Seen {
    fn up(&self, v: usize) -> u64 {
        self.up[v].load(Ordering::Relaxed)
    }
    fn down(&self, v: usize) -> u64 {
        self.down[v].load(Ordering::Relaxed)
    }
    fn chained(&self) -> u64 {
        self.chained.load(Ordering::Relaxed)
    }
}

/// A TCP proxy to `target` that counts frame headers each way; runs until the test
/// process ends (its threads block on their sockets only).
fn spy(target: u16) -> (u16, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(hub) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            for (mut from, mut to, up) in [
                (client.try_clone().unwrap(), hub.try_clone().unwrap(), true),
                (hub, client, false),
            ] {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut tail: Vec<u8> = Vec::new();
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        tail.extend_from_slice(&buf[..n]);
                        // A header is counted once its ten bytes (magic, version,
                        // dictionary field) are all here, on the read that completed them.
                        let before = tail.len() - n;
                        let chained = wire::v2::CHAINED.to_be_bytes();
                        for (i, w) in tail.windows(10).enumerate() {
                            if i + 10 <= before {
                                continue;
                            }
                            if &w[..4] == wire::MAGIC && w[4] == 0 && (w[5] == 1 || w[5] == 2) {
                                let c = if up { &s.up } else { &s.down };
                                c[w[5] as usize].fetch_add(1, Ordering::Relaxed);
                                if up && w[6..] == chained {
                                    s.chained.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        let keep = tail.len().min(9);
                        tail.drain(..tail.len() - keep);
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (port, seen)
}

struct Net {
    _dir: tempfile::TempDir,
    hub: TestHub,
    clinic: TestClinic,
    seen: Arc<Seen>,
    /// The hub, through the spy.
    url: String,
}

fn net() -> Net {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("clinic-a", "North")]),
        &["clinic-a"],
        8 << 20,
    );
    let (port, seen) = spy(hub.port);
    let clinic = TestClinic::new(
        dir.path(),
        "clinic-a",
        &format!("http://127.0.0.1:{port}"),
        &hub.token("clinic-a"),
    );
    Net {
        _dir: dir,
        hub,
        clinic,
        seen,
        url: format!("http://127.0.0.1:{port}"),
    }
}

fn patients(prefix: &str, n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| patient(&format!("{prefix}-{i}"), "North"))
        .collect()
}

/// Both ways: the clinic's records reach the hub, the hub's reach the clinic.
fn sync_both_ways(n: &mut Net, round: &str) {
    n.clinic.put(patients(&format!("c{round}"), 3));
    n.hub.put(patients(&format!("h{round}"), 3));
    n.clinic.sync().unwrap();
    let hub = n.hub.store();
    for i in 0..3 {
        assert!(get(&hub, &format!("Patient/c{round}-{i}")).is_some());
        assert!(n.clinic.get(&format!("Patient/h{round}-{i}")).is_some());
    }
}

#[test]
fn v2_nodes_speak_v2_with_the_dictionary_after_the_first_answer() {
    let mut n = net();
    sync_both_ways(&mut n, "1");
    // The first request went as v1 (the parent's protocol was unknown), and the hub
    // answered in v2 because the request announced it.
    assert!(n.seen.up(1) >= 1, "the first request is v1");
    assert!(n.seen.down(2) >= 1, "the hub answers a v2 clinic in v2");
    assert_eq!(n.seen.down(1), 0, "no v1 answer to a v2 clinic");
    assert_eq!(
        n.clinic.client.encoding(),
        Encoding::V2 {
            dict: wire::dict::newest(),
            columns: true,
        }
    );
    let v1_before = n.seen.up(1);
    sync_both_ways(&mut n, "2");
    assert_eq!(
        n.seen.up(1),
        v1_before,
        "once the hub announced v2, no v1 request"
    );
    assert!(n.seen.up(2) >= 2, "pushes and pulls go as v2");
}

#[test]
fn a_v2_clinic_sends_a_v1_hub_only_v1_frames() {
    let mut n = net();
    n.hub.state.set_accept(Accept::v1());
    sync_both_ways(&mut n, "1");
    sync_both_ways(&mut n, "2");
    assert_eq!(n.seen.up(2), 0, "a v1 hub never receives a v2 frame");
    assert_eq!(n.seen.down(2), 0);
    // A first contact (push, then pull), then one exchange carrying both.
    assert!(n.seen.up(1) >= 3, "{}", n.seen.up(1));
    assert_eq!(n.clinic.client.parent_accept(), Some(Accept::v1()));
    assert_eq!(n.clinic.client.encoding(), Encoding::V1);
    // And the v1 hub refuses a v2 frame as an old build does, naming the version.
    let frame = wire::encode_as(
        &wire::Message::PullRequest(wire::PullRequest {
            node: "clinic-a".into(),
            cursor: wire::Cursor::default(),
            max_bytes: 1 << 20,
            max_records: 10,
            include_own: false,
            answer_chunk: 0,
            health: Vec::new(),
            order_results: Vec::new(),
        }),
        3,
        Encoding::V2 {
            dict: 0,
            columns: false,
        },
    )
    .unwrap();
    let r = ureq::post(&format!("{}/v1/pull", n.hub.url))
        .set(
            "Authorization",
            &format!("Bearer {}", n.hub.token("clinic-a")),
        )
        .send_bytes(&frame);
    match r {
        Err(ureq::Error::Status(400, resp)) => {
            assert!(resp.header(wire::accept::HEADER).is_none());
            let text = resp.into_string().unwrap();
            assert!(
                text.contains("protocol version 2 is not supported"),
                "{text}"
            );
        }
        other => panic!("a v1 hub accepted a v2 frame: {other:?}"),
    }
}

#[test]
fn a_v1_clinic_talks_to_a_v2_hub_in_v1_both_ways() {
    let mut n = net();
    n.clinic.client.set_accept(Accept::v1());
    sync_both_ways(&mut n, "1");
    sync_both_ways(&mut n, "2");
    assert_eq!(n.seen.up(2), 0, "a v1 clinic sends v1");
    assert_eq!(
        n.seen.down(2),
        0,
        "the hub answers a clinic that announced nothing in v1"
    );
    // The hub announced v2 all along; the clinic, being v1, does not use it.
    assert_eq!(n.clinic.client.parent_accept(), Some(Accept::ours()));
    assert_eq!(n.clinic.client.encoding(), Encoding::V1);
}

#[test]
fn a_clinic_follows_its_parent_replaced_by_a_v1_build_and_back() {
    let mut n = net();
    sync_both_ways(&mut n, "1");
    sync_both_ways(&mut n, "2");
    assert!(matches!(n.clinic.client.encoding(), Encoding::V2 { .. }));
    // The hub is replaced by an older build: the clinic's next v2 request is
    // refused, sent again in v1, and the round completes.
    n.hub.state.set_accept(Accept::v1());
    let v2_up = n.seen.up(2);
    sync_both_ways(&mut n, "3");
    assert_eq!(n.clinic.client.encoding(), Encoding::V1);
    assert_eq!(
        n.seen.up(2),
        v2_up + 1,
        "one v2 request refused, then v1 only"
    );
    // Upgraded again: the clinic is back on v2 after the hub's next answer.
    n.hub.state.set_accept(Accept::ours());
    sync_both_ways(&mut n, "4");
    assert!(matches!(n.clinic.client.encoding(), Encoding::V2 { .. }));
}

#[test]
fn a_hub_without_our_dictionary_gets_v2_without_one() {
    let mut n = net();
    n.hub.state.set_accept(Accept::v2_without_dictionary());
    sync_both_ways(&mut n, "1");
    sync_both_ways(&mut n, "2");
    assert_eq!(
        n.clinic.client.encoding(),
        Encoding::V2 {
            dict: 0,
            columns: true
        }
    );
    assert!(n.seen.up(2) >= 2);
}

#[test]
fn a_v2_hub_of_before_bodies_as_columns_gets_bodies_as_text() {
    let mut n = net();
    n.hub.state.set_accept(Accept::v2_bodies_as_text());
    sync_both_ways(&mut n, "1");
    sync_both_ways(&mut n, "2");
    assert_eq!(
        n.clinic.client.encoding(),
        Encoding::V2 {
            dict: wire::dict::newest(),
            columns: false
        }
    );
    assert!(n.seen.up(2) >= 2 && n.seen.down(2) >= 2, "v2 both ways");
}

#[test]
fn chunked_transfers_carry_v2_frames_and_resume_across_cuts() {
    use clinicsync::devkit::cluster::{FaultProxy, Faults};
    let n = net();
    // The clinic reaches the spy through a link that drops every few KiB.
    let cutter = FaultProxy::start(
        n.hub.port,
        Faults {
            cut_every: Some((6_000, 12_000)),
            ..Faults::default()
        },
    )
    .unwrap();
    let (port, seen) = spy(cutter.port);
    let dir = tempfile::tempdir().unwrap();
    let mut clinic = TestClinic::new(
        dir.path(),
        "clinic-a",
        &format!("http://127.0.0.1:{port}"),
        &n.hub.token("clinic-a"),
    );
    clinic.sync_cfg.chunk_bytes = 4096;
    // Learn the parent's protocol on a quiet round first, then move enough in both
    // directions that every frame goes in pieces: with bodies as columns, 120
    // patients' records each way are ~35 pieces of 4 KiB (40 were ~12, too close to
    // the bound below when the random cuts fell late).
    clinic.sync().unwrap();
    assert!(matches!(clinic.client.encoding(), Encoding::V2 { .. }));
    let many: Vec<serde_json::Value> =
        clinicsync::synth::clinic_records(5, "c", "North", "loc-1", 120, 2, 4)
            .into_iter()
            .collect();
    let from_hub: Vec<serde_json::Value> =
        clinicsync::synth::clinic_records(6, "h", "North", "loc-1", 120, 2, 4);
    clinic.put(many.clone());
    n.hub.put(from_hub.clone());
    let mut report = None;
    for _ in 0..20 {
        if let Ok(r) = clinic.sync() {
            report = Some(r);
            break;
        }
    }
    let report = report.expect("the sync completes across cuts");
    assert!(cutter.cuts() > 0, "the link was cut");
    assert!(report.resumed > 0, "transfers resumed after cuts");
    let hub = n.hub.store();
    for r in &many {
        let key = format!(
            "{}/{}",
            r["resourceType"].as_str().unwrap(),
            r["id"].as_str().unwrap()
        );
        assert!(get(&hub, &key).is_some(), "{key} reached the hub");
    }
    for r in &from_hub {
        let key = format!(
            "{}/{}",
            r["resourceType"].as_str().unwrap(),
            r["id"].as_str().unwrap()
        );
        assert!(clinic.get(&key).is_some(), "{key} reached the clinic");
    }
    // The pieces (chunk messages) and the frames inside them were v2.
    assert!(seen.up(2) > 10, "v2 chunk messages went up: {}", seen.up(2));
    assert!(seen.down(2) > 10);
    assert_eq!(seen.down(1), 0, "no v1 answer after the first");
    drop(n);
}

#[test]
fn a_fresh_clinic_builds_its_first_large_upload_again_once_it_learns_v2() {
    let n = net();
    let dir = tempfile::tempdir().unwrap();
    let (port, seen) = spy(n.hub.port);
    let mut clinic = TestClinic::new(
        dir.path(),
        "clinic-a",
        &format!("http://127.0.0.1:{port}"),
        &n.hub.token("clinic-a"),
    );
    clinic.sync_cfg.chunk_bytes = 4096;
    let many = clinicsync::synth::clinic_records(5, "c", "North", "loc-1", 200, 2, 4);
    clinic.put(many.clone());
    // The very first exchange is the upload's first piece, in v1 (an upload never
    // begun asks nothing first): its answer announces v2, and the upload is built
    // again and sent as v2 pieces.
    clinic.sync().unwrap();
    assert!(
        seen.up(1) <= 2,
        "only the first piece went as v1 (its frame, and the upload's header inside it): {}",
        seen.up(1)
    );
    // At least two pieces (the last one runs it), and the pull.
    assert!(seen.up(2) >= 3, "{} v2 frames went up", seen.up(2));
    let hub = n.hub.store();
    for r in &many {
        let key = format!(
            "{}/{}",
            r["resourceType"].as_str().unwrap(),
            r["id"].as_str().unwrap()
        );
        assert!(get(&hub, &key).is_some(), "{key} reached the hub");
    }
}

#[test]
fn a_restarted_clinic_sends_its_first_request_in_the_protocol_its_parent_announced_before() {
    let mut n = net();
    sync_both_ways(&mut n, "1");
    assert!(n.seen.up(2) >= 1);
    let url = n.url.clone();
    // A new process: a new client that has heard nothing from the parent yet.
    n.clinic.client = clinicsync::transport::http::HttpClient::new(
        &url,
        clinicsync::secret::Secret::new(n.hub.token("clinic-a")),
        std::time::Duration::from_secs(10),
    );
    let v1_before = n.seen.up(1);
    sync_both_ways(&mut n, "2");
    assert_eq!(
        n.seen.up(1),
        v1_before,
        "the first request of the new process went as v2 already"
    );
    // A parent replaced by a build before v2 refuses it; the clinic says it again in
    // v1 and follows it from then on.
    n.hub.state.set_accept(Accept::v1());
    n.clinic.client = clinicsync::transport::http::HttpClient::new(
        &url,
        clinicsync::secret::Secret::new(n.hub.token("clinic-a")),
        std::time::Duration::from_secs(10),
    );
    let v2_before = n.seen.up(2);
    sync_both_ways(&mut n, "3");
    assert_eq!(n.seen.up(2), v2_before + 1, "one v2 request, refused");
    assert_eq!(n.clinic.client.encoding(), Encoding::V1);
}

/// The keys of `records` ("Kind/id").
fn keys(records: &[serde_json::Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            )
        })
        .collect()
}

/// A clinic on a slow link (push level 15, fixed) pushing its backlog in batches of
/// 300 records (payloads too large for the encoder to weigh the dictionary against
/// the chain: each batch after the first goes chained), through its own spy.
fn slow_clinic(dir: &std::path::Path, id: &str, hub: &TestHub) -> (TestClinic, Arc<Seen>) {
    let (port, seen) = spy(hub.port);
    let mut c = TestClinic::new(dir, id, &format!("http://127.0.0.1:{port}"), &hub.token(id));
    c.sync_cfg.push_level = clinicsync::config::PushLevelSetting::Number(15);
    c.sync_cfg.push_batch_records = 300;
    (c, seen)
}

#[test]
fn a_slow_link_push_chains_its_batches_and_starts_a_new_chain_when_the_hub_forgot() {
    let dir = tempfile::tempdir().unwrap();
    let policy = hub_policy(&[("clinic-a", "North"), ("clinic-b", "North")]);
    let children = ["clinic-a", "clinic-b"];
    let hub = TestHub::start(dir.path(), 0, policy.clone(), &children, 8 << 20);
    let hub_port = hub.port;
    let (mut a, seen_a) = slow_clinic(dir.path(), "clinic-a", &hub);
    // The first round learns the parent's announcement (v2, chain).
    a.sync().unwrap();
    assert_eq!(
        seen_a.chained(),
        0,
        "nothing pushed yet, nothing to chain to"
    );
    let first = clinicsync::synth::clinic_records(7, "a1", "North", "loc-1", 100, 2, 4);
    assert!(
        first.len() > 300,
        "{} records: several batches",
        first.len()
    );
    a.put(first.clone());
    let r = a.sync().unwrap();
    assert_eq!(r.pushed.cleared, first.len());
    // The first batch has nothing to refer to; each one after it refers to the last.
    let batches = first.len().div_ceil(300) as u64;
    assert!(
        seen_a.chained() >= batches - 1,
        "{} of {batches} batches went chained",
        seen_a.chained()
    );
    for key in keys(&first) {
        assert!(get(&hub.store(), &key).is_some(), "{key} reached the hub");
    }

    // A clinic that does not chain (a build before chains, or one that turned it
    // off) sends plain frames to the same hub.
    let (mut b, seen_b) = slow_clinic(dir.path(), "clinic-b", &hub);
    b.client.set_accept(Accept {
        chain: false,
        ..Accept::ours()
    });
    b.sync().unwrap();
    let theirs = clinicsync::synth::clinic_records(8, "b1", "North", "loc-2", 20, 2, 4);
    b.put(theirs.clone());
    assert_eq!(b.sync().unwrap().pushed.cleared, theirs.len());
    assert!(seen_b.up(2) >= 1, "v2 all the same");
    assert_eq!(
        seen_b.chained(),
        0,
        "no chained frame from a clinic that did not ask"
    );

    // The hub restarts and holds no payload: the first frame that refers to one is
    // refused (412) and sent again unchained; the chain starts over from there.
    hub.stop();
    let hub = TestHub::start(dir.path(), hub_port, policy.clone(), &children, 8 << 20);
    let before = seen_a.chained();
    let second = clinicsync::synth::clinic_records(9, "a2", "North", "loc-1", 100, 2, 4);
    a.put(second.clone());
    let r = a.sync().unwrap();
    assert_eq!(
        r.pushed.cleared,
        second.len(),
        "every record once, none lost"
    );
    let batches = second.len().div_ceil(300) as u64;
    assert!(
        seen_a.chained() >= before + batches - 1,
        "the refused frame and a new chain: {} chained after {before}",
        seen_a.chained()
    );
    for key in keys(&second) {
        assert!(
            get(&hub.store(), &key).is_some(),
            "{key} reached the restarted hub"
        );
    }
    assert_eq!(a.store.counts().unwrap().outbox, 0, "nothing left to push");

    // A hub that does not read chains (set to v2 before them) gets none.
    hub.state.set_accept(Accept {
        chain: false,
        ..Accept::ours()
    });
    let before = seen_a.chained();
    a.sync().unwrap();
    let third = clinicsync::synth::clinic_records(10, "a3", "North", "loc-1", 20, 2, 4);
    a.put(third.clone());
    assert_eq!(a.sync().unwrap().pushed.cleared, third.len());
    assert_eq!(
        seen_a.chained(),
        before,
        "no chained frame to a hub that does not read them"
    );
    for key in keys(&third) {
        assert!(get(&hub.store(), &key).is_some(), "{key} reached the hub");
    }
}

#[test]
fn a_chained_push_whose_answers_are_cut_delivers_each_record_once() {
    // Answers lost mid-way: the hub kept a batch's payload, the clinic never heard it
    // was answered and refers to the batch before (the hub keeps two), or sends the
    // same frame again; a cut transfer resumes unchained. Every record once.
    use clinicsync::devkit::cluster::{FaultProxy, Faults};
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("clinic-a", "North")]),
        &["clinic-a"],
        8 << 20,
    );
    let proxy = FaultProxy::start(
        hub.port,
        Faults {
            cut_every: Some((2 << 10, 12 << 10)),
            ..Faults::default()
        },
    )
    .unwrap();
    // The spy sees the frames before the cuts do.
    let (port, seen) = spy(proxy.port);
    let mut a = TestClinic::new(
        dir.path(),
        "clinic-a",
        &format!("http://127.0.0.1:{port}"),
        &hub.token("clinic-a"),
    );
    a.sync_cfg.push_level = clinicsync::config::PushLevelSetting::Number(15);
    a.sync_cfg.push_batch_records = 300;
    a.sync_cfg.timeout_secs = 10;
    let mine = clinicsync::synth::clinic_records(13, "a", "North", "loc-1", 400, 2, 4);
    a.put(mine.clone());
    for _ in 0..60 {
        let _ = a.sync();
        if a.store.counts().unwrap().outbox == 0 {
            break;
        }
    }
    assert_eq!(
        a.store.counts().unwrap().outbox,
        0,
        "the push never finished"
    );
    assert!(
        proxy.cuts() > 3,
        "only {} cuts: the test proves nothing",
        proxy.cuts()
    );
    assert!(seen.chained() > 3, "{} chained frames", seen.chained());
    let h = hub.store();
    for key in keys(&mine) {
        assert!(get(&h, &key).is_some(), "{key} reached the hub");
    }
    let versions: i64 = h
        .conn()
        .query_row("SELECT COUNT(*) FROM history", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        versions as usize,
        mine.len(),
        "a record stored twice at the hub"
    );
}

#[test]
fn pieces_larger_than_the_parent_serves_still_fetch_a_large_answer_whole() {
    // `sync.chunk_bytes` of 256 KiB (a good link's technician): uploads take pieces
    // that large, but a parent serves at most 64 KiB of an answer per piece, and a
    // fetch that assumed its own size placed the next piece past a short one (409,
    // "answer chunk out of place").
    let n = net();
    let dir = tempfile::tempdir().unwrap();
    let mut clinic = TestClinic::new(dir.path(), "clinic-a", &n.url, &n.hub.token("clinic-a"));
    clinic.sync_cfg.chunk_bytes = 256 << 10;
    // Patients with names that do not compress (a page well over 64 KiB on the wire).
    let theirs: Vec<serde_json::Value> = (0..5000u64)
        .map(|i| {
            let mut p = patient(&format!("h-{i}"), "North");
            let noise: String = (1..=4u64)
                .map(|k| {
                    format!(
                        "{:016x}",
                        (i * 4 + k)
                            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                            .rotate_left(17)
                            ^ (i << 32)
                    )
                })
                .collect();
            p["name"] = serde_json::json!([{ "family": noise }]);
            p
        })
        .collect();
    n.hub.put(theirs.clone());
    let mine = clinicsync::synth::clinic_records(12, "c", "North", "loc-1", 300, 2, 4);
    clinic.put(mine.clone());
    let before = n.seen.up(1) + n.seen.up(2);
    let r = clinic.sync().unwrap();
    assert!(
        r.bytes_received > 128 << 10,
        "{} bytes came down",
        r.bytes_received
    );
    assert!(
        n.seen.up(1) + n.seen.up(2) - before > 4,
        "the answer came in several pieces (frames up: {})",
        n.seen.up(1) + n.seen.up(2) - before
    );
    for key in keys(&theirs) {
        assert!(clinic.get(&key).is_some(), "{key} reached the clinic");
    }
    let hub = n.hub.store();
    for key in keys(&mine) {
        assert!(get(&hub, &key).is_some(), "{key} reached the hub");
    }
}

// ------------------------------------------------------------------ MQTT

mod over_mqtt {
    use super::*;
    use clinicsync::devkit::cluster::{self, Broker};
    use clinicsync::secret::Secret;
    use clinicsync::transport::mqtt::{MqttClient, MqttSettings};

    struct MqttNet {
        _dir: tempfile::TempDir,
        _broker: Broker,
        hub: TestHub,
        clinic: TestClinic,
        seen: Arc<Seen>,
    }

    /// A hub and clinic-a over a mosquitto broker; the clinic reaches the broker
    /// through the frame-counting proxy.
    fn mqtt_net(clinic_accept: Accept) -> MqttNet {
        let dir = tempfile::tempdir().unwrap();
        let port = cluster::free_port().unwrap();
        let broker = Broker::start(
            &dir.path().join("broker"),
            port,
            "hub",
            &[("hub", "hub-pass"), ("clinic-a", "clinic-a-pass")],
        )
        .unwrap();
        let hub = TestHub::start_mqtt(
            dir.path(),
            hub_policy(&[("clinic-a", "North")]),
            &["clinic-a"],
            &broker,
        );
        let (spy_port, seen) = spy(port);
        let nowhere = format!("http://127.0.0.1:{}", cluster::free_port().unwrap());
        let mut clinic = TestClinic::new(dir.path(), "clinic-a", &nowhere, "x");
        let settings = MqttSettings::from_url(
            &format!("mqtt://127.0.0.1:{spy_port}"),
            "clinic-a",
            Secret::new("clinic-a-pass".into()),
            None,
            8 << 20,
        )
        .unwrap();
        let m =
            MqttClient::connect(&settings, "clinic-a", std::time::Duration::from_secs(3)).unwrap();
        m.set_accept(clinic_accept);
        clinic.mqtt = Some(m);
        MqttNet {
            _dir: dir,
            _broker: broker,
            hub,
            clinic,
            seen,
        }
    }

    fn round(n: &mut MqttNet, r: &str) {
        n.clinic.put(patients(&format!("c{r}"), 3));
        n.hub.put(patients(&format!("h{r}"), 3));
        n.clinic.sync().unwrap();
        let hub = n.hub.store();
        for i in 0..3 {
            assert!(get(&hub, &format!("Patient/c{r}-{i}")).is_some());
            assert!(n.clinic.get(&format!("Patient/h{r}-{i}")).is_some());
        }
    }

    fn mqtt(n: &MqttNet) -> &MqttClient {
        n.clinic.mqtt.as_ref().unwrap()
    }

    #[test]
    fn v2_nodes_move_to_v2_over_mqtt_after_the_hubs_hello() {
        let mut n = mqtt_net(Accept::ours());
        round(&mut n, "1");
        // The hello follows the first answer; wait for it to arrive.
        assert!(cluster::wait_until(
            std::time::Duration::from_secs(5),
            || mqtt(&n).parent_accept().is_some()
        ));
        let v1_up = n.seen.up(1);
        round(&mut n, "2");
        round(&mut n, "3");
        assert!(
            matches!(mqtt(&n).encoding(), Encoding::V2 { dict, columns: true } if dict == wire::dict::newest())
        );
        assert_eq!(n.seen.up(1), v1_up, "after the hello, no v1 request");
        // At least one exchange per round (one since pushes and pulls travel together).
        assert!(n.seen.up(2) >= 2 && n.seen.down(2) >= 2, "v2 both ways");
    }

    #[test]
    fn a_v1_clinic_and_a_v1_hub_keep_mqtt_in_v1() {
        // An old clinic (kind 1 only) with a v2 hub: it hears hellos and ignores them.
        let mut n = mqtt_net(Accept::v1());
        round(&mut n, "1");
        round(&mut n, "2");
        assert_eq!((n.seen.up(2), n.seen.down(2)), (0, 0));
        // A v2 clinic with an old hub: no hello, so kind 1 in v1.
        let mut n = mqtt_net(Accept::ours());
        n.hub.state.set_accept(Accept::v1());
        round(&mut n, "1");
        round(&mut n, "2");
        assert_eq!(mqtt(&n).parent_accept(), None);
        assert_eq!((n.seen.up(2), n.seen.down(2)), (0, 0));
    }

    #[test]
    fn a_clinic_whose_mqtt_hub_became_v1_goes_back_to_plain_requests() {
        let mut n = mqtt_net(Accept::ours());
        round(&mut n, "1");
        assert!(cluster::wait_until(
            std::time::Duration::from_secs(5),
            || mqtt(&n).parent_accept().is_some()
        ));
        round(&mut n, "2");
        // Replaced by an old build: it ignores announced requests, so the next sync
        // gets no answer; the clinic forgets the hello and the one after succeeds.
        n.hub.state.set_accept(Accept::v1());
        let _ = n.clinic.sync();
        assert_eq!(mqtt(&n).parent_accept(), None);
        let v2_up = n.seen.up(2);
        round(&mut n, "3");
        assert_eq!(n.seen.up(2), v2_up, "plain v1 requests only");
    }
}
