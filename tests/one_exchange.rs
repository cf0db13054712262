//! One exchange per sync (issue 16, item 1): the round's first push batch carries its
//! first pull request, and the answer carries the push results and the first page.
//! Real hubs served over TCP on 127.0.0.1, real SQLite stores, the real HTTP client;
//! the exchanges are counted by a wrapper around that client.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use clinicsync::client;
use clinicsync::secret::Secret;
use clinicsync::store::meta;
use clinicsync::transport::http::{HttpClient, Traffic, TransportError};
use clinicsync::transport::Exchange;
use clinicsync::wire::Message;
use common::*;
use sha2::Digest;

/// The real link, with the path of every exchange noted; optionally an older parent
/// (one without `/v1/sync`), or an answer lost after the parent committed.
struct Watched {
    inner: HttpClient,
    paths: Mutex<Vec<String>>,
    older_parent: Option<(u16, String)>,
    lose_next_answer: AtomicBool,
    /// Message kinds sent, in order.
    kinds: Mutex<Vec<&'static str>>,
    /// Strip `run` from upload pieces, as a hub before 0.3 reads them.
    older_chunks: bool,
    /// Upload bytes sent in pieces (those the hub took), and the frame's length.
    put_bytes: std::sync::atomic::AtomicU64,
    frame_len: std::sync::atomic::AtomicU64,
    /// Refuse (HTTP 500) every upload piece after this many.
    puts_allowed: Option<usize>,
    /// The clinic's store: once the first push is answered, its writes are held (a
    /// write lock) until the next push starts, which notes the outbox as it finds it.
    hold_store: Option<std::path::PathBuf>,
    held: std::sync::Arc<Mutex<Option<rusqlite::Connection>>>,
    outbox_seen: Mutex<Vec<i64>>,
}

impl Watched {
    /// A link of its own to `url`, as clinic `node`.
    fn new(url: &str, hub: &TestHub, node: &str) -> Watched {
        Watched {
            inner: HttpClient::new(
                url,
                Secret::new(hub.token(node)),
                std::time::Duration::from_secs(10),
            ),
            paths: Mutex::new(Vec::new()),
            older_parent: None,
            lose_next_answer: AtomicBool::new(false),
            kinds: Mutex::new(Vec::new()),
            older_chunks: false,
            put_bytes: Default::default(),
            frame_len: Default::default(),
            puts_allowed: None,
            hold_store: None,
            held: Default::default(),
            outbox_seen: Mutex::new(Vec::new()),
        }
    }

    fn paths(&self) -> Vec<String> {
        std::mem::take(&mut *self.paths.lock().unwrap())
    }
}

impl Exchange for Watched {
    fn exchange(&self, path: &str, msg: &Message) -> Result<(Message, Traffic), TransportError> {
        self.paths.lock().unwrap().push(path.to_string());
        self.kinds.lock().unwrap().push(msg.name());
        if let Message::ChunkPut(p) = msg {
            let puts = self
                .kinds
                .lock()
                .unwrap()
                .iter()
                .filter(|k| **k == "chunk_put")
                .count();
            if self.puts_allowed.is_some_and(|n| puts > n) {
                return Err(TransportError::Status {
                    status: 500,
                    message: "the hub fell over".into(),
                });
            }
            self.put_bytes
                .fetch_add(p.data.len() as u64, Ordering::SeqCst);
            self.frame_len.store(p.total, Ordering::SeqCst);
        }
        let stripped;
        let msg = match msg {
            Message::ChunkPut(p) if self.older_chunks => {
                let mut p = p.clone();
                p.run = 0;
                stripped = Message::ChunkPut(p);
                &stripped
            }
            other => other,
        };
        if let (Some((status, body)), "/v1/sync") = (&self.older_parent, path) {
            return Err(TransportError::Status {
                status: *status,
                message: body.clone(),
            });
        }
        let pushing = matches!(msg, Message::PushRequest(_) | Message::SyncRequest(_));
        if let (Some(db), true) = (&self.hold_store, pushing) {
            let count = |c: &rusqlite::Connection| {
                c.query_row("SELECT count(*) FROM outbox", [], |r| r.get::<_, i64>(0))
                    .unwrap()
            };
            let n = match self.held.lock().unwrap().take() {
                // Read inside the hold, then let the clinic write again.
                Some(c) => {
                    let n = count(&c);
                    c.execute_batch("COMMIT").unwrap();
                    n
                }
                None => count(&rusqlite::Connection::open(db).unwrap()),
            };
            self.outbox_seen.lock().unwrap().push(n);
        }
        let answer = Exchange::exchange(&self.inner, path, msg)?;
        if let (Some(db), true) = (&self.hold_store, pushing) {
            if self.outbox_seen.lock().unwrap().len() == 1 {
                let c = rusqlite::Connection::open(db).unwrap();
                c.execute_batch("BEGIN IMMEDIATE").unwrap();
                *self.held.lock().unwrap() = Some(c);
                // A clinic that settles before it sends the next batch would wait
                // on the hold for ever: it ends by itself.
                let held = self.held.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_secs(3));
                    held.lock().unwrap().take();
                });
            }
        }
        if self.lose_next_answer.swap(false, Ordering::SeqCst) {
            return Err(TransportError::Cut {
                url: "test".into(),
                message: "answer lost on the way back".into(),
            });
        }
        Ok(answer)
    }
    fn parallel(&self) -> bool {
        Exchange::parallel(&self.inner)
    }
}

/// Patients p0 … p29 queued at `a`, pushed 10 to a batch.
fn queue_thirty_in_batches_of_ten(a: &mut TestClinic) {
    a.put(
        (0..30)
            .map(|i| patient(&format!("p{i}"), "North"))
            .collect(),
    );
    a.sync_cfg.push_batch_records = 10;
}

fn sync_through(c: &mut TestClinic, link: &dyn Exchange) -> client::SyncReport {
    client::sync_once(
        &mut c.store,
        &c.policy,
        link,
        &c.sync_cfg,
        &AtomicBool::new(false),
    )
    .unwrap()
}

/// A hub, and clinic `a` past its first contact (whose pull brings its own records
/// back and so goes alone).
fn hub_and_clinic(dir: &std::path::Path) -> (TestHub, TestClinic) {
    let hub = TestHub::start(dir, 0, hub_policy(&[("a", "North")]), &["a"], 8 << 20);
    let mut a = TestClinic::new(dir, "a", &hub.url, &hub.token("a"));
    a.put(vec![patient("first", "North")]);
    a.sync().unwrap();
    (hub, a)
}

#[test]
fn a_sync_with_records_both_ways_is_one_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    hub.put(vec![patient("from-hub", "North")]);
    a.put(vec![patient("pa", "North"), encounter("pa-e", "pa")]);
    let before = hub.state.counters.sync_requests.load(Ordering::Relaxed);
    let link = Watched::new(&hub.url, &hub, "a");
    let report = sync_through(&mut a, &link);
    assert_eq!(link.paths(), ["/v1/sync"], "one request, one answer");
    assert_eq!((report.pushed.accepted, report.pulled), (2, 1));
    assert!(get(&hub.store(), "Encounter/pa-e").is_some());
    assert!(a.get("Patient/from-hub").is_some());
    assert_eq!(a.store.counts().unwrap().outbox, 0);
    assert_eq!(
        hub.state.counters.sync_requests.load(Ordering::Relaxed),
        before + 1
    );
    // Nothing left either way: the next round is one pull.
    sync_through(&mut a, &link);
    assert_eq!(link.paths(), ["/v1/pull"]);
}

#[test]
fn the_carried_page_is_followed_by_the_rest_when_the_parent_has_more() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    hub.put(
        (0..30)
            .map(|i| patient(&format!("h{i}"), "North"))
            .collect(),
    );
    a.put(vec![patient("pa", "North")]);
    a.sync_cfg.pull_page_records = 10;
    let link = Watched::new(&hub.url, &hub, "a");
    let report = sync_through(&mut a, &link);
    assert_eq!(
        link.paths(),
        ["/v1/sync", "/v1/pull", "/v1/pull"],
        "the first page came with the push, two more followed"
    );
    assert_eq!(report.pulled, 30);
    assert!(a.get("Patient/h29").is_some());
}

#[test]
fn a_push_larger_than_a_piece_goes_alone_in_resumable_pieces_and_the_pull_follows() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    hub.put(
        (0..200)
            .map(|i| patient(&format!("h{i}"), "North"))
            .collect(),
    );
    // Ids that do not compress: the batch is several pieces.
    let ids: Vec<String> = (0..400u32)
        .map(|i| hex::encode(sha2::Sha256::digest(i.to_be_bytes())))
        .collect();
    a.put(ids.iter().map(|id| patient(id, "North")).collect());
    a.sync_cfg.chunk_bytes = 4096;
    let link = Watched::new(&hub.url, &hub, "a");
    let report = sync_through(&mut a, &link);
    let paths = link.paths();
    let (pull, upload) = paths.split_last().unwrap();
    assert!(
        upload.iter().all(|p| p == "/v1/chunk") && pull == "/v1/pull",
        "a frame over one piece travels as a transfer, then the pull: {paths:?}"
    );
    let kinds = std::mem::take(&mut *link.kinds.lock().unwrap());
    assert!(
        kinds.len() > 3 && kinds[0] == "chunk_put",
        "a fresh transfer sends its first piece at once: {kinds:?}"
    );
    assert!(
        !kinds.contains(&"chunk_query") && !kinds.contains(&"chunk_run"),
        "no round trip to ask where the hub stands, none to run it: {kinds:?}"
    );
    assert_eq!((report.pushed.accepted, report.pulled), (400, 200));
    assert_eq!(a.store.counts().unwrap().outbox, 0);
    assert!(a.get("Patient/h199").is_some());
    assert_eq!(
        hub.state.counters.sync_requests.load(Ordering::Relaxed),
        0,
        "a batch that is a transfer carries no pull: its frame must be the same next round"
    );

    // A hub that reads no `run` (before 0.3) acknowledges the last piece; the upload
    // is then run as before.
    let more: Vec<String> = (400..800u32)
        .map(|i| hex::encode(sha2::Sha256::digest(i.to_be_bytes())))
        .collect();
    a.put(more.iter().map(|id| patient(id, "North")).collect());
    let mut older = Watched::new(&hub.url, &hub, "a");
    older.older_chunks = true;
    let report = sync_through(&mut a, &older);
    let kinds = std::mem::take(&mut *older.kinds.lock().unwrap());
    assert_eq!(
        kinds.iter().filter(|k| **k == "chunk_run").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(report.pushed.accepted, 400);
    assert_eq!(a.store.counts().unwrap().outbox, 0);
}

#[test]
fn an_answer_lost_after_the_hub_committed_is_asked_again_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    hub.put(vec![patient("from-hub", "North")]);
    a.put(vec![patient("pa", "North")]);
    let link = Watched::new(&hub.url, &hub, "a");
    // The hub commits the push and serves the page; the answer never arrives.
    link.lose_next_answer.store(true, Ordering::SeqCst);
    let report = sync_through(&mut a, &link);
    assert_eq!(
        link.paths(),
        ["/v1/sync", "/v1/sync"],
        "the cut exchange is sent again whole"
    );
    assert_eq!(
        (
            report.pushed.duplicate,
            report.pushed.accepted,
            report.pulled
        ),
        (1, 0, 1),
        "the hub already held the push: a duplicate, and the page again"
    );
    assert_eq!(a.store.counts().unwrap().outbox, 0);
    assert!(a.get("Patient/from-hub").is_some());
    let history = hub
        .store()
        .history(&clinicsync::model::RecordKey::parse("Patient/pa").unwrap())
        .unwrap();
    assert_eq!(history.len(), 1, "the resent batch made no second version");
}

#[test]
fn an_older_parent_gets_a_push_and_a_pull_apart_and_is_asked_again_a_day_later() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    // What this hub's router answers for an endpoint it does not have: an older hub
    // answers `/v1/sync` exactly so.
    let unknown = ureq::post(&format!("{}/v1/no-such-endpoint", hub.url))
        .set("Authorization", &format!("Bearer {}", hub.token("a")))
        .send_bytes(b"x");
    let Err(ureq::Error::Status(status, r)) = unknown else {
        panic!("an unknown endpoint is refused")
    };
    let body = r.into_string().unwrap();
    hub.put(vec![patient("from-hub", "North")]);
    a.put(vec![patient("pa", "North")]);
    let mut link = Watched::new(&hub.url, &hub, "a");
    link.older_parent = Some((status, body));
    let report = sync_through(&mut a, &link);
    assert_eq!(link.paths(), ["/v1/sync", "/v1/push", "/v1/pull"]);
    assert_eq!((report.pushed.accepted, report.pulled), (1, 1));
    assert!(get(&hub.store(), "Patient/pa").is_some());
    assert!(a.get("Patient/from-hub").is_some());
    let refused = a
        .store
        .meta(&meta::PARENT_SYNC_REFUSED_MS)
        .unwrap()
        .unwrap();
    // Within the day: apart, without asking again.
    a.put(vec![patient("pb", "North")]);
    sync_through(&mut a, &link);
    assert_eq!(link.paths(), ["/v1/push", "/v1/pull"]);
    // A day later it may have been upgraded: asked again.
    let mut tx = a.store.begin().unwrap();
    tx.set_meta(&meta::PARENT_SYNC_REFUSED_MS, refused - 25 * 3_600_000)
        .unwrap();
    tx.commit().unwrap();
    a.put(vec![patient("pc", "North")]);
    link.older_parent = None;
    sync_through(&mut a, &link);
    assert_eq!(link.paths(), ["/v1/sync"]);
    assert!(get(&hub.store(), "Patient/pc").is_some());
}

#[test]
fn the_next_batch_goes_before_the_answered_one_is_settled() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    queue_thirty_in_batches_of_ten(&mut a);
    let mut link = Watched::new(&hub.url, &hub, "a");
    link.hold_store = Some(dir.path().join("a.db"));
    let report = sync_through(&mut a, &link);
    assert_eq!(report.pushed.accepted, 30);
    // The second batch left while the first one's answer was still unsettled (its 10
    // records still in the outbox: the store was held from that answer until the
    // second batch started). A clinic that settles each batch before sending the next
    // finds 30, 20 (after waiting out the hold). The third races the second's
    // settling, unheld: 20 or 10.
    let seen = link.outbox_seen.lock().unwrap().clone();
    assert_eq!(seen[..2], [30, 30], "{seen:?}");
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(a.store.counts().unwrap().outbox, 0);
    assert_eq!(get(&hub.store(), "Patient/p29").unwrap()["id"], "p29");
}

#[test]
fn an_older_parent_is_refused_once_per_pass_not_once_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    let unknown = ureq::post(&format!("{}/v1/no-such-endpoint", hub.url))
        .set("Authorization", &format!("Bearer {}", hub.token("a")))
        .send_bytes(b"x");
    let Err(ureq::Error::Status(status, r)) = unknown else {
        panic!("an unknown endpoint is refused")
    };
    queue_thirty_in_batches_of_ten(&mut a);
    let mut link = Watched::new(&hub.url, &hub, "a");
    link.older_parent = Some((status, r.into_string().unwrap()));
    let report = sync_through(&mut a, &link);
    assert_eq!(report.pushed.accepted, 30);
    assert_eq!(
        link.paths(),
        ["/v1/sync", "/v1/push", "/v1/push", "/v1/push", "/v1/pull"]
    );
}

#[test]
fn a_refusal_of_the_push_itself_is_not_taken_for_an_older_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    a.put(vec![patient("pa", "North")]);
    let mut link = Watched::new(&hub.url, &hub, "a");
    // A 404 with a reason is a real answer (a transfer the hub no longer holds), not
    // a missing endpoint.
    link.older_parent = Some((404, "no such transfer (expired?): send it again".into()));
    let r = client::sync_once(
        &mut a.store,
        &a.policy,
        &link,
        &a.sync_cfg,
        &AtomicBool::new(false),
    );
    assert!(r.is_err(), "{r:?}");
    assert_eq!(link.paths(), ["/v1/sync"]);
    assert_eq!(a.store.meta(&meta::PARENT_SYNC_REFUSED_MS).unwrap(), None);
    assert_eq!(a.store.counts().unwrap().outbox, 1, "still queued");
}

#[test]
fn a_round_keeps_one_connection_alive_for_all_its_exchanges() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    let proxy = clinicsync::devkit::cluster::CountingProxy::start(hub.port).unwrap();
    std::fs::create_dir(dir.path().join("via")).unwrap();
    let mut via = TestClinic::new(
        &dir.path().join("via"),
        "a",
        &format!("http://127.0.0.1:{}", proxy.port),
        &hub.token("a"),
    );
    // The same clinic's store, reached through the proxy.
    std::mem::swap(&mut via.store, &mut a.store);
    hub.put(
        (0..30)
            .map(|i| patient(&format!("h{i}"), "North"))
            .collect(),
    );
    via.put(
        (0..30)
            .map(|i| patient(&format!("p{i}"), "North"))
            .collect(),
    );
    via.sync_cfg.pull_page_records = 10;
    via.sync_cfg.push_batch_records = 10;
    let link = Watched::new(&format!("http://127.0.0.1:{}", proxy.port), &hub, "a");
    let report = sync_through(&mut via, &link);
    assert_eq!((report.pushed.accepted, report.pulled), (30, 30));
    let exchanges = link.paths().len();
    assert!(exchanges >= 5, "{exchanges} exchanges");
    assert_eq!(
        proxy.connections.load(Ordering::Relaxed),
        1,
        "{exchanges} exchanges over one kept-alive connection"
    );
}

#[test]
fn a_push_carried_with_a_pull_is_held_to_the_same_trust_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North"), ("b", "South")]),
        &["a", "b"],
        8 << 20,
    );
    hub.put(vec![patient("pb", "South"), patient("pn", "North")]);
    let mut b = TestClinic::new(dir.path(), "b", &hub.url, &hub.token("b"));
    b.sync().unwrap();
    // Clinic a writes an encounter for b's patient, and claims to be b.
    let mut forged = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    forged.put(vec![encounter("e-for-pb", "pb")]);
    let push =
        clinicsync::engine::next_push(&forged.store, clinicsync::time::wall_ms(), 100, 1 << 20)
            .unwrap()
            .unwrap();
    let mut pull = clinicsync::engine::pull_request(&forged.store, "parent", 100, 1 << 20).unwrap();
    pull.include_own = false;
    let link = Watched::new(&hub.url, &hub, "a");
    for node in ["a", "b"] {
        let mut push = push.clone();
        push.node = node.into();
        let mut pull = pull.clone();
        pull.node = node.into();
        let answer = Exchange::exchange(
            &link,
            "/v1/sync",
            &Message::SyncRequest(clinicsync::wire::SyncRequest { push, pull }),
        );
        if node == "b" {
            let e = answer.unwrap_err().to_string();
            assert!(e.contains("403") || e.contains("as itself"), "{e}");
            continue;
        }
        let (Message::SyncResponse(both), _) = answer.unwrap() else {
            panic!("a sync answer")
        };
        assert!(
            matches!(
                both.push.results[0].outcome,
                clinicsync::wire::Outcome::Rejected { .. }
            ),
            "{:?}",
            both.push.results
        );
        let ids: Vec<_> = both.pull.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["pn"], "only a's catchment is served");
    }
    assert!(get(&hub.store(), "Encounter/e-for-pb").is_none());
}

#[test]
fn a_first_pull_that_found_nothing_ends_the_restore_and_own_records_stay_up() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(
        dir.path(),
        0,
        hub_policy(&[("a", "North")]),
        &["a"],
        8 << 20,
    );
    let mut a = TestClinic::new(dir.path(), "a", &hub.url, &hub.token("a"));
    // First contact with a hub that holds nothing for this clinic: the cursor stays
    // where it was.
    let first = a.sync().unwrap();
    assert_eq!(first.pulled, 0);
    a.put(vec![patient("pa", "North"), encounter("pa-e", "pa")]);
    let link = Watched::new(&hub.url, &hub, "a");
    let report = sync_through(&mut a, &link);
    assert_eq!(report.pushed.accepted, 2);
    assert_eq!(
        report.pulled, 0,
        "the clinic's own records do not come back once its first contact is done"
    );
    assert_eq!(link.paths(), ["/v1/sync"]);
}

#[test]
fn an_upload_begun_before_a_failed_round_asks_where_it_stands_and_sends_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    let ids: Vec<String> = (0..400u32)
        .map(|i| hex::encode(sha2::Sha256::digest(i.to_be_bytes())))
        .collect();
    a.put(ids.iter().map(|id| patient(id, "North")).collect());
    a.sync_cfg.chunk_bytes = 4096;
    let mut broken = Watched::new(&hub.url, &hub, "a");
    broken.puts_allowed = Some(3);
    let failed = client::sync_once(
        &mut a.store,
        &a.policy,
        &broken,
        &a.sync_cfg,
        &AtomicBool::new(false),
    );
    assert!(
        failed
            .as_ref()
            .is_err_and(|e| e.to_string().contains("fell over")),
        "{failed:?}"
    );
    let sent_before = broken.put_bytes.load(Ordering::SeqCst);
    assert!(sent_before >= 3 * 2048, "{sent_before}");
    assert_eq!(a.store.counts().unwrap().outbox, 400);
    // The next round rebuilds the same frame, and knows it began it.
    let link = Watched::new(&hub.url, &hub, "a");
    let report = sync_through(&mut a, &link);
    assert_eq!(report.pushed.accepted, 400);
    let kinds = std::mem::take(&mut *link.kinds.lock().unwrap());
    assert_eq!(kinds[0], "chunk_query", "{kinds:?}");
    assert_eq!(
        sent_before + link.put_bytes.load(Ordering::SeqCst),
        link.frame_len.load(Ordering::SeqCst),
        "every byte of the frame went once: the pieces before the failure, then the rest"
    );
    assert_eq!(
        broken.frame_len.load(Ordering::SeqCst),
        link.frame_len.load(Ordering::SeqCst),
        "the same frame, rebuilt"
    );
}

/// The real link, noting when a push frame is encoded and when a push is answered;
/// the first push's answer is held (up to 3 s) until a second push frame is encoded.
struct Ordered {
    inner: HttpClient,
    events: Mutex<Vec<&'static str>>,
    encoded: std::sync::Condvar,
}

impl Ordered {
    fn note_answer(&self) {
        let mut events = self.events.lock().unwrap();
        if !events.contains(&"answered") {
            let encodes = |e: &Vec<&str>| e.iter().filter(|x| **x == "encoded").count();
            events = self
                .encoded
                .wait_timeout_while(events, std::time::Duration::from_secs(3), |e| {
                    encodes(e) < 2
                })
                .unwrap()
                .0;
        }
        events.push("answered");
    }
}

impl Exchange for Ordered {
    fn exchange(&self, path: &str, msg: &Message) -> Result<(Message, Traffic), TransportError> {
        let answer = Exchange::exchange(&self.inner, path, msg)?;
        if matches!(msg, Message::PushRequest(_) | Message::SyncRequest(_)) {
            self.note_answer();
        }
        Ok(answer)
    }
    fn exchange_frame(
        &self,
        path: &str,
        msg: &Message,
        frame: &[u8],
        encoding: clinicsync::wire::Encoding,
    ) -> Result<(Message, Traffic), TransportError> {
        let answer = self.inner.exchange_frame(path, msg, frame, encoding)?;
        if matches!(msg, Message::PushRequest(_) | Message::SyncRequest(_)) {
            self.note_answer();
        }
        Ok(answer)
    }
    fn encode_request(
        &self,
        msg: &Message,
        level: i32,
        encoding: clinicsync::wire::Encoding,
    ) -> Result<Vec<u8>, clinicsync::wire::WireError> {
        if matches!(msg, Message::PushRequest(_) | Message::SyncRequest(_)) {
            self.events.lock().unwrap().push("encoded");
            self.encoded.notify_all();
        }
        self.inner.encode_request(msg, level, encoding)
    }
    fn encoding(&self) -> clinicsync::wire::Encoding {
        self.inner.encoding()
    }
    fn parent_accept(&self) -> Option<clinicsync::wire::Accept> {
        self.inner.parent_accept()
    }
    fn assume_parent_accept(&self, accept: clinicsync::wire::Accept) {
        self.inner.assume_parent_accept(accept)
    }
    fn parallel(&self) -> bool {
        true
    }
}

#[test]
fn the_next_batch_s_frame_is_built_while_the_batch_before_it_is_with_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut a) = hub_and_clinic(dir.path());
    queue_thirty_in_batches_of_ten(&mut a);
    let link = Ordered {
        inner: HttpClient::new(
            &hub.url,
            Secret::new(hub.token("a")),
            std::time::Duration::from_secs(10),
        ),
        events: Mutex::new(Vec::new()),
        encoded: std::sync::Condvar::new(),
    };
    let report = sync_through(&mut a, &link);
    assert_eq!(report.pushed.accepted, 30);
    // Each frame once, the second and third built while the batch before them was
    // with the parent. A clinic that encodes a batch only when it sends it shows
    // encoded, answered, encoded, ... (the first answer waits 3 s for nothing).
    // (The third batch's frame races the second batch's answer.)
    let events = link.events.lock().unwrap().clone();
    assert_eq!(
        events[..3],
        ["encoded", "encoded", "answered"],
        "{events:?}"
    );
    let count = |what: &str| events.iter().filter(|e| **e == what).count();
    assert_eq!((count("encoded"), count("answered")), (3, 3), "{events:?}");
    assert_eq!(get(&hub.store(), "Patient/p29").unwrap()["id"], "p29");
}
