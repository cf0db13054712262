//! Model-based property tests of the sync protocol: random sequences of writes at a
//! hub and two clinics; pushes and pulls whose request or answer is lost; pushes sent
//! again; pull pages delivered twice, or an older one after newer ones; and crashes
//! (a node's `Store` dropped, with a local write's transaction still open, and opened
//! again from its file), then a drain. The outcome is checked against a small
//! reference model ([`Model`]: which writes committed and which node may see each
//! record) and against what must hold whatever the order:
//! - a crash keeps every committed change and nothing uncommitted (a write whose
//!   transaction died appears nowhere, ever);
//! - every clinic's outbox and inbox drain and nothing stays quarantined;
//! - each node holds exactly the records the model says it may see (the hub all,
//!   a clinic its catchment) and every holder holds the same version of each;
//! - the final version of each record causally includes every committed write, and
//!   every version any node ever held (nothing silently dropped);
//! - a write's value is in the final version, or was overwritten by a write that had
//!   seen it, or survives in a conflict row (a losing side is kept for review);
//! - every audit chain verifies.
//!
//! Two worlds run the sequences:
//! - [`any_interleaving_converges_without_losing_a_write`]: the engine driven
//!   directly (the hub is `engine::handle_push`/`handle_pull` on its store); fully
//!   deterministic.
//! - [`cut_links_and_crashes_converge_and_resume_at_the_cut`]: every exchange goes
//!   through the client's real resumable transfers (`transport::chunked::Chunked`,
//!   as the daemon uses them) over an in-memory [`Link`] that cuts after a random
//!   number of bytes (a cut loses the request, or the answer after the hub acted on
//!   it) or goes down for good mid-transfer, into the hub's transport-free dispatcher
//!   (`hub::HubState::answer`, which keeps uploads and large answers in the
//!   `transfers` table). Writes with a large incompressible note make push frames and
//!   pull pages larger than a chunk. There, besides the above, a resume costs at most
//!   the piece that was in flight: no byte the hub holds is uploaded again (also after
//!   the client gave up, or the client or the hub restarted) and no byte of an answer
//!   the client holds is fetched again.
//!
//! Two fixed cases back the second world: [`the_cutting_link_cuts_transfers_mid_way`]
//! (the world does cut transfers mid-way, so the property cannot hold for want of
//! cuts) and [`a_push_answer_larger_than_a_piece_is_fetched_in_pieces_across_cuts`]
//! (the `ChunkReady`/`ChunkGet` path of a large push answer, which the random
//! sequences' few records never reach, with a `ChunkRun` repeated after a cut).
//!
//! What a crash here is not: a kill inside one of the engine's own transactions
//! (`tests/faults.rs` SIGKILLs real processes for that). Crashes come between
//! operations, between storing a page and applying it, and in the middle of a local
//! write's transaction (rebuilt here from the store's public steps).
//!
//! Running longer: each world runs `PROPTEST_CASES` cases when set (defaults keep the
//! whole file under a minute in debug on 2 cores), e.g.
//! `PROPTEST_CASES=5000 cargo test --release --test engine_model`.
//! Stores live on tmpfs (`/dev/shm`) where there is one: a crash here is a process's
//! (its store dropped), not a power cut, so an fsync costs time and proves nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use clinicsync::engine::{self, CatchmentRule, Policy};
use clinicsync::hub::HubState;
use clinicsync::model::{Causality, RecordKey, Snapshot, Version, VersionVector};
use clinicsync::store::{AuditCheck, Store, TransferDir, TransferKey, VersionOutcome};
use clinicsync::transport::chunked::Chunked;
use clinicsync::transport::http::{Traffic, TransportError};
use clinicsync::transport::Exchange;
use clinicsync::wire::{self, Limits, Message, PullResponse, PushRequest, PushResponse};
use proptest::prelude::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const NAMES: [&str; 3] = ["a", "b", "hub"];
const HUB: usize = 2;
const DISTRICT: [&str; 2] = ["North", "South"];
const FIELDS: usize = 3;
const PARENT: &str = "parent";
/// The cutting world's chunk size (`sync.chunk_bytes`): a record with a note does
/// not fit in one.
const CHUNK: usize = 4096;
/// The link is cut after a random number of bytes in this range. The least is room
/// for a query and a whole piece with their answers, so every stretch between two
/// cuts makes progress (as the daemon needs: it gives up on a link that moves
/// nothing).
const CUT_MIN: u64 = 6_000;
const CUT_MAX: u64 = 24_000;

/// Cases per world: `PROPTEST_CASES` when set, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------- operations

/// What the link loses of an exchange's first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    None,
    /// The request never arrives.
    Request,
    /// The hub acts on the request; its answer never arrives.
    Answer,
}

fn loss() -> impl Strategy<Value = Loss> {
    prop_oneof![
        6 => Just(Loss::None),
        2 => Just(Loss::Request),
        2 => Just(Loss::Answer),
    ]
}

/// How the link behaves after the first message (the cutting world only).
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Seed of the cut points; `None`: no cut besides the [`Loss`].
    cuts: Option<u64>,
    /// The link goes down for good after this many messages: the client gives up
    /// mid-transfer, and a later push resumes what the hub holds.
    down_after: Option<u8>,
}

const CALM: Plan = Plan {
    cuts: None,
    down_after: None,
};

fn plan() -> impl Strategy<Value = Plan> {
    (
        proptest::option::weighted(0.6, any::<u64>()),
        proptest::option::weighted(0.15, 1..12u8),
    )
        .prop_map(|(cuts, down_after)| Plan { cuts, down_after })
}

#[derive(Debug, Clone)]
enum Op {
    /// node 0 = a, 1 = b, 2 = hub; a writes North patients, b South, the hub either.
    /// With `note`, the record carries a large incompressible note from then on.
    Write {
        node: usize,
        patient: usize,
        field: usize,
        note: bool,
    },
    Push {
        clinic: usize,
        loss: Loss,
        plan: Plan,
    },
    /// One page. With `crash`, the clinic dies after storing the page (inbox and
    /// cursor) and before applying its inbox.
    Pull {
        clinic: usize,
        loss: Loss,
        plan: Plan,
        crash: bool,
    },
    RepeatLastPush {
        clinic: usize,
    },
    /// The page received `back` pages before the last delivered again (0: the last
    /// page twice; more: an older page after newer ones).
    Redeliver {
        clinic: usize,
        back: usize,
    },
    /// The node's process dies and starts again; with `mid_write`, while a local
    /// write's transaction is open.
    Crash {
        node: usize,
        mid_write: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..3usize, 0..FIELDS, proptest::bool::weighted(0.25))
            .prop_map(|(node, patient, field, note)| Op::Write { node, patient, field, note }),
        3 => (0..2usize, loss(), plan())
            .prop_map(|(clinic, loss, plan)| Op::Push { clinic, loss, plan }),
        3 => (0..2usize, loss(), plan(), proptest::bool::weighted(0.1))
            .prop_map(|(clinic, loss, plan, crash)| Op::Pull { clinic, loss, plan, crash }),
        1 => (0..2usize).prop_map(|clinic| Op::RepeatLastPush { clinic }),
        1 => (0..2usize, 0..3usize).prop_map(|(clinic, back)| Op::Redeliver { clinic, back }),
        1 => (0..3usize, any::<bool>()).prop_map(|(node, mid_write)| Op::Crash { node, mid_write }),
    ]
}

// ---------------------------------------------------------------- reference model

/// A local write that committed.
#[derive(Debug, Clone)]
struct Write {
    node: usize,
    field: String,
    token: String,
    /// The vector of the version it made: its own node's counter there is the
    /// write's dot, and the rest is what its node had seen.
    vv: VersionVector,
}

impl Write {
    /// Whether a version with vector `vv` includes this write.
    fn included_in(&self, vv: &VersionVector) -> bool {
        vv.get(NAMES[self.node]) >= self.vv.get(NAMES[self.node])
    }
}

/// What the operations alone say must be true, kept apart from the stores.
#[derive(Debug, Default)]
struct Model {
    /// Per record (`Patient/<id>`), every write that committed, in order.
    writes: BTreeMap<String, Vec<Write>>,
    /// Writes whose transaction died with their node: (record, token).
    ghosts: Vec<(String, String)>,
}

impl Model {
    /// The district of a record: its patient's, fixed at creation (`p<District>-n`).
    fn district(key: &str) -> usize {
        usize::from(!key.contains(DISTRICT[0]))
    }

    /// The records `node` must hold in the end: the hub every record written, a
    /// clinic those of its catchment (its district's patients).
    fn holds(&self, node: usize) -> BTreeSet<String> {
        self.writes
            .keys()
            .filter(|k| node == HUB || Model::district(k) == node)
            .cloned()
            .collect()
    }
}

// ---------------------------------------------------------------- the cutting link

/// What a link cost during one exchange; see [`Link`].
#[derive(Debug, Default, Clone, Copy)]
struct Cost {
    cuts: u64,
    /// Chunk bytes sent (`ChunkPut`) or answered (`ChunkData`) and lost in a cut.
    lost: u64,
    /// Upload bytes the hub already held when they arrived, and answer bytes asked
    /// for again after this client had received them: what a resume must not cost.
    again: u64,
}

struct LinkState {
    /// Messages that reached the hub, by kind.
    kinds: BTreeMap<&'static str, u32>,
    /// Cuts on cue: the next message of this kind loses its request or answer.
    script: std::collections::VecDeque<(&'static str, Loss)>,
    rng: u64,
    /// Bytes until the next cut.
    budget: u64,
    first: Loss,
    down_after: Option<u8>,
    messages: u32,
    cost: Cost,
    /// Per answer transfer: how far this client has received it.
    received: HashMap<[u8; 32], u64>,
}

/// An in-memory link from a clinic to the hub's dispatcher, as HTTP or MQTT would
/// carry it: each message is a wire frame; a cut loses the message on the wire when
/// it comes, so the hub may have acted on a request whose answer is lost.
struct Link<'a> {
    hub: &'a HubState,
    child: &'static str,
    /// A connection of its own to the hub's file, to see what the hub holds of an
    /// upload when a piece arrives.
    probe: Mutex<Store>,
    state: Mutex<LinkState>,
}

impl<'a> Link<'a> {
    fn new(
        hub: &'a HubState,
        hub_path: &Path,
        child: &'static str,
        first: Loss,
        plan: Plan,
    ) -> Self {
        let mut state = LinkState {
            kinds: BTreeMap::new(),
            script: Default::default(),
            rng: plan.cuts.unwrap_or(0) | 1,
            budget: u64::MAX,
            first,
            down_after: plan.down_after,
            messages: 0,
            cost: Cost::default(),
            received: HashMap::new(),
        };
        if plan.cuts.is_some() {
            state.budget = state.draw();
        }
        Link {
            hub,
            child,
            probe: Mutex::new(Store::open_existing(hub_path).unwrap()),
            state: Mutex::new(state),
        }
    }

    fn cost(&self) -> Cost {
        self.state.lock().unwrap().cost
    }

    /// Bytes of upload `id` the hub holds now.
    fn held(&self, id: &[u8; 32]) -> u64 {
        let mut probe = self.probe.lock().unwrap();
        let tx = probe.begin().unwrap();
        let key = TransferKey {
            node: self.child,
            id,
            dir: TransferDir::Up,
        };
        tx.transfer_state(&key).unwrap().map_or(0, |(_, got)| got)
    }
}

impl LinkState {
    /// The next cut point (xorshift: the cuts are a function of the op's seed).
    fn draw(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        CUT_MIN + self.rng % (CUT_MAX - CUT_MIN)
    }

    /// Whether a message of `len` bytes is cut (`lose` forces it); a cut starts the
    /// count to the next one.
    fn cut(&mut self, len: usize, lose: bool) -> bool {
        if lose || self.budget < len as u64 {
            self.cost.cuts += 1;
            if self.budget != u64::MAX {
                self.budget = self.draw();
            }
            return true;
        }
        if self.budget != u64::MAX {
            self.budget -= len as u64;
        }
        false
    }
}

fn cut_error() -> TransportError {
    TransportError::Cut {
        url: "memory:".into(),
        message: "cut".into(),
    }
}

impl Exchange for Link<'_> {
    fn exchange(&self, _path: &str, msg: &Message) -> Result<(Message, Traffic), TransportError> {
        let mut s = self.state.lock().unwrap();
        s.messages += 1;
        if s.down_after.is_some_and(|n| s.messages > n as u32) {
            return Err(TransportError::Unreachable {
                url: "memory:".into(),
                message: "link down".into(),
            });
        }
        let mut first = std::mem::replace(&mut s.first, Loss::None);
        if s.script
            .front()
            .is_some_and(|(kind, _)| *kind == msg.name())
        {
            first = s.script.pop_front().map_or(Loss::None, |(_, l)| l);
        }
        let frame = wire::encode(msg)?;
        if s.cut(frame.len(), first == Loss::Request) {
            if let Message::ChunkPut(p) = msg {
                s.cost.lost += p.data.len() as u64;
            }
            return Err(cut_error());
        }
        *s.kinds.entry(msg.name()).or_default() += 1;
        match msg {
            Message::ChunkPut(p) => {
                let held = self.held(&p.id);
                if p.offset < held {
                    s.cost.again += (held - p.offset).min(p.data.len() as u64);
                }
            }
            Message::ChunkGet(g) => {
                let have = s.received.get(&g.id).copied().unwrap_or(0);
                if g.offset < have {
                    s.cost.again += (have - g.offset).min(g.max);
                }
            }
            _ => {}
        }
        let answer = match self.hub.answer(self.child, &frame, None) {
            Ok(a) => a,
            Err(refusal) => {
                return Err(TransportError::Status {
                    status: refusal.status,
                    message: refusal.reason,
                })
            }
        };
        let back = wire::encode(&answer)?;
        *s.kinds.entry(answer.name()).or_default() += 1;
        if s.cut(back.len(), first == Loss::Answer) {
            if let Message::ChunkData(d) = &answer {
                s.cost.lost += d.data.len() as u64;
            }
            return Err(cut_error());
        }
        if let Message::ChunkData(d) = &answer {
            let have = s.received.entry(d.id).or_default();
            *have = (*have).max(d.offset + d.data.len() as u64);
        }
        let traffic = Traffic {
            sent: frame.len() as u64,
            received: back.len() as u64,
        };
        Ok((wire::decode(&back, &Limits::default())?, traffic))
    }
}

// ---------------------------------------------------------------- the world

/// What a crash must keep: every committed change, seen through the public API.
#[derive(Debug, PartialEq, Eq)]
struct Durable {
    replica: Vec<(String, VersionVector, String, bool)>,
    queues: (u64, u64, u64, u64, u64),
    cursor: wire::Cursor,
    audit_head: (u64, String),
}

fn durable(store: &Store) -> Durable {
    let c = store.counts().unwrap();
    Durable {
        replica: store
            .list(None)
            .unwrap()
            .into_iter()
            .map(|s| {
                (
                    s.version.key().to_string(),
                    s.version.vv,
                    s.version.snapshot.hash.short(),
                    s.version.deleted,
                )
            })
            .collect(),
        queues: (c.records, c.outbox, c.inbox, c.quarantine, c.conflicts),
        cursor: store.cursor(PARENT).unwrap().0,
        audit_head: store.audit_head().unwrap(),
    }
}

/// A large note that zstd cannot shrink: a push frame carrying it is larger than a
/// chunk.
fn note(token: &str) -> String {
    (0..200)
        .map(|i| hex::encode(Sha256::digest(format!("{token}/{i}"))))
        .collect()
}

struct World {
    dir: tempfile::TempDir,
    stores: Vec<Option<Store>>,
    policies: Vec<Policy>,
    /// The cutting world: the hub's dispatcher, over its own connections to its file.
    served: Option<HubState>,
    now: u64,
    token: u64,
    last_push: [Option<PushRequest>; 2],
    /// The last pages each clinic received, newest last.
    pages: [Vec<PullResponse>; 2],
    model: Model,
    /// Every version vector any node held, per record.
    produced: BTreeMap<String, Vec<VersionVector>>,
    /// What the links cost, over the whole run.
    cost: Cost,
    /// Messages that reached either side, by kind, over the whole run.
    kinds: BTreeMap<&'static str, u32>,
    /// Cuts on cue for the next exchange (see [`LinkState::script`]).
    script: Vec<(&'static str, Loss)>,
    /// The clients' chunk size (`sync.chunk_bytes`).
    chunk: usize,
    /// Records a clinic pushes per batch, and asks for per page.
    batch: usize,
    page: u32,
}

impl World {
    fn new(cutting: bool) -> World {
        let dir = match Path::new("/dev/shm").is_dir() {
            true => tempfile::tempdir_in("/dev/shm").unwrap(),
            false => tempfile::tempdir().unwrap(),
        };
        let mut hub = Policy::new("hub", false);
        for (i, d) in DISTRICT.iter().enumerate() {
            hub.catchment.push(CatchmentRule {
                node: NAMES[i].into(),
                path: "address.district".into(),
                equals: d.to_string(),
            });
        }
        let mut w = World {
            dir,
            stores: Vec::new(),
            policies: vec![Policy::new("a", true), Policy::new("b", true), hub],
            served: None,
            now: 1_000_000,
            token: 0,
            last_push: [None, None],
            pages: [Vec::new(), Vec::new()],
            model: Model::default(),
            produced: BTreeMap::new(),
            cost: Cost::default(),
            kinds: BTreeMap::new(),
            script: Vec::new(),
            chunk: CHUNK,
            batch: 3,
            page: 4,
        };
        w.stores = (0..3).map(|n| Some(w.open(n))).collect();
        if cutting {
            w.served = Some(w.serve());
        }
        w
    }

    fn path(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("{}.db", NAMES[node]))
    }

    fn open(&self, node: usize) -> Store {
        Store::open(&self.path(node), NAMES[node]).unwrap()
    }

    fn serve(&self) -> HubState {
        HubState::new(
            &self.path(HUB),
            self.policies[HUB].clone(),
            Vec::new(),
            8 << 20,
        )
        .unwrap()
    }

    fn st(&self, node: usize) -> &Store {
        self.stores[node].as_ref().expect("store open")
    }

    fn st_mut(&mut self, node: usize) -> &mut Store {
        self.stores[node].as_mut().expect("store open")
    }

    /// Seconds apart, so the few milliseconds the served hub's clock drifts from this
    /// one never reorder two stamps.
    fn tick(&mut self) -> u64 {
        self.now += 1_000;
        self.now
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::Write {
                node,
                patient,
                field,
                note,
            } => self.write(node, patient, field, note),
            Op::Push { clinic, loss, plan } => self.push(clinic, loss, plan),
            Op::Pull {
                clinic,
                loss,
                plan,
                crash,
            } => {
                self.pull(clinic, loss, plan, crash);
            }
            Op::RepeatLastPush { clinic } => self.repeat_push(clinic),
            Op::Redeliver { clinic, back } => self.redeliver(clinic, back),
            Op::Crash { node, mid_write } => self.crash(node, mid_write),
        }
    }

    /// The record `node` writes for `patient`, and its current body (or a new one).
    fn record(&self, node: usize, patient: usize) -> (RecordKey, Value) {
        // Clinics write their own district's patients; the hub writes any.
        let district = if node == HUB { patient % 2 } else { node };
        let id = format!("p{}-{}", DISTRICT[district], patient);
        let key = RecordKey::new("Patient", &id).unwrap();
        let body = self.st(node)
            .current(&key)
            .unwrap()
            .map(|s| s.version.snapshot.json())
            .unwrap_or_else(|| json!({"resourceType":"Patient","id":id,"address":[{"district":DISTRICT[district]}]}));
        (key, body)
    }

    fn write(&mut self, node: usize, patient: usize, field: usize, with_note: bool) {
        let (key, mut body) = self.record(node, patient);
        self.token += 1;
        let token = format!("{}-{}", NAMES[node], self.token);
        let field = format!("f{field}");
        body[&field] = json!(token);
        if with_note {
            body["note"] = json!(note(&token));
        }
        let now = self.tick();
        engine::write_local(
            self.stores[node].as_mut().unwrap(),
            &self.policies[node],
            vec![(Snapshot::from_json_value(body).unwrap(), false)],
            now,
        )
        .unwrap();
        let vv = self.st(node).current(&key).unwrap().unwrap().version.vv;
        self.produced
            .entry(key.to_string())
            .or_default()
            .push(vv.clone());
        self.model
            .writes
            .entry(key.to_string())
            .or_default()
            .push(Write {
                node,
                field,
                token,
                vv,
            });
    }

    /// `n` Observations of `patient` written by `node` in one local write.
    fn write_many(&mut self, node: usize, patient: usize, n: usize) {
        let (key, _) = self.record(node, patient);
        let mut items = Vec::new();
        let mut written = Vec::new();
        for k in 0..n {
            self.token += 1;
            let token = format!("{}-{}", NAMES[node], self.token);
            let id = format!("o-{}-{k}", key.id);
            let body = json!({"resourceType":"Observation","id":id,"status":"final",
                "subject":{"reference":key.to_string()},"f0":token});
            items.push((Snapshot::from_json_value(body).unwrap(), false));
            written.push((RecordKey::new("Observation", &id).unwrap(), token));
        }
        let now = self.tick();
        engine::write_local(
            self.stores[node].as_mut().unwrap(),
            &self.policies[node],
            items,
            now,
        )
        .unwrap();
        for (key, token) in written {
            let vv = self.st(node).current(&key).unwrap().unwrap().version.vv;
            self.model
                .writes
                .entry(key.to_string())
                .or_default()
                .push(Write {
                    node,
                    field: "f0".into(),
                    token,
                    vv,
                });
        }
    }

    /// A local write whose transaction is still open when the process dies: the
    /// same steps as `engine::write_local`, never committed.
    fn ghost_write(&mut self, node: usize) {
        let (key, mut body) = self.record(node, self.token as usize % 3);
        self.token += 1;
        let token = format!("ghost-{}", self.token);
        body["f0"] = json!(token);
        let now = self.tick();
        let snapshot = Snapshot::from_json_value(body).unwrap();
        let mut tx = self.st_mut(node).begin().unwrap();
        let vv = tx
            .current(&key)
            .unwrap()
            .map(|c| c.version.vv)
            .unwrap_or_default()
            .bumped(NAMES[node]);
        let version = Version {
            snapshot,
            origin: NAMES[node].into(),
            hlc: tx.tick(now).unwrap(),
            vv,
            deleted: false,
        };
        tx.write_version(&version, "local", None, VersionOutcome::Written, now)
            .unwrap();
        if node != HUB {
            tx.enqueue(&key, now).unwrap();
        }
        drop(tx);
        self.model.ghosts.push((key.to_string(), token));
    }

    fn crash(&mut self, node: usize, mid_write: bool) {
        let before = durable(self.st(node));
        if mid_write {
            self.ghost_write(node);
        }
        let serving = node == HUB && self.served.take().is_some();
        self.stores[node] = None;
        self.stores[node] = Some(self.open(node));
        if serving {
            self.served = Some(self.serve());
        }
        let after = durable(self.st(node));
        assert_eq!(
            before, after,
            "{} kept every committed change and nothing else",
            NAMES[node]
        );
    }

    /// One exchange of the cutting world, through the client's resumable transfers.
    /// `None` when it failed (the daemon would try again next round).
    fn exchange(
        &mut self,
        clinic: usize,
        path: &str,
        msg: Message,
        loss: Loss,
        plan: Plan,
    ) -> Option<Message> {
        let hub = self.served.as_ref().expect("cutting world");
        hub.set_clock_offset(self.now as i64 - clinicsync::time::wall_ms() as i64);
        let link = Link::new(hub, &self.path(HUB), NAMES[clinic], loss, plan);
        link.state.lock().unwrap().script = std::mem::take(&mut self.script).into();
        let mut chunked = Chunked::new(&link, self.chunk);
        chunked.retry_pause = Duration::ZERO;
        let result = chunked.exchange(path, &msg);
        let cost = link.cost();
        for (k, n) in &link.state.lock().unwrap().kinds {
            *self.kinds.entry(k).or_default() += n;
        }
        assert_eq!(
            cost.again, 0,
            "a resume sent or fetched again bytes the other side held ({cost:?})"
        );
        assert!(
            cost.lost <= cost.cuts * self.chunk as u64,
            "a cut lost more than the piece in flight ({cost:?})"
        );
        self.cost.cuts += cost.cuts;
        self.cost.lost += cost.lost;
        match result {
            Ok((answer, _)) => Some(answer),
            Err(e @ (TransportError::Cut { .. } | TransportError::Unreachable { .. })) => {
                assert!(
                    cost.cuts > 0 || plan.down_after.is_some(),
                    "failed on a calm link: {e}"
                );
                None
            }
            Err(e) => panic!("the exchange failed otherwise than by the link: {e}"),
        }
    }

    /// The hub's answer to a push, or `None` when the request or the answer is lost.
    fn send_push(
        &mut self,
        clinic: usize,
        req: &PushRequest,
        loss: Loss,
        plan: Plan,
    ) -> Option<PushResponse> {
        let resp = if self.served.is_some() {
            match self.exchange(
                clinic,
                "/v1/push",
                Message::PushRequest(req.clone()),
                loss,
                plan,
            )? {
                Message::PushResponse(r) => Some(r),
                other => panic!("a push answered with a {}", other.name()),
            }
        } else {
            if loss == Loss::Request {
                return None;
            }
            let now = self.tick();
            let r = engine::handle_push(
                self.stores[HUB].as_mut().unwrap(),
                &self.policies[HUB],
                NAMES[clinic],
                req.clone(),
                now,
            )
            .unwrap();
            (loss == Loss::None).then_some(r)
        };
        // What the hub resolved in a conflict is a version too (also when the
        // answer is lost: the hub committed it).
        for rec in &req.records {
            let key = RecordKey::new(&rec.kind, &rec.id).unwrap();
            if let Some(s) = self.st(HUB).current(&key).unwrap() {
                self.produced
                    .entry(key.to_string())
                    .or_default()
                    .push(s.version.vv);
            }
        }
        resp
    }

    fn push(&mut self, clinic: usize, loss: Loss, plan: Plan) {
        let now = self.tick();
        let Some(req) = engine::next_push(self.st(clinic), now, self.batch, 4 << 20).unwrap()
        else {
            return;
        };
        self.last_push[clinic] = Some(req.clone());
        if let Some(resp) = self.send_push(clinic, &req, loss, plan) {
            let now = self.tick();
            engine::apply_push_results(self.st_mut(clinic), PARENT, &req, &resp, (0, 0), now)
                .unwrap();
        }
    }

    fn repeat_push(&mut self, clinic: usize) {
        if let Some(req) = self.last_push[clinic].clone() {
            if let Some(resp) = self.send_push(clinic, &req, Loss::None, CALM) {
                let now = self.tick();
                engine::apply_push_results(self.st_mut(clinic), PARENT, &req, &resp, (0, 0), now)
                    .unwrap();
            }
        }
    }

    /// One page; whether more are waiting (`None`: nothing arrived).
    fn pull(&mut self, clinic: usize, loss: Loss, plan: Plan, crash: bool) -> Option<bool> {
        let req = engine::pull_request(self.st(clinic), PARENT, self.page, 1 << 20).unwrap();
        let resp = if self.served.is_some() {
            match self.exchange(clinic, "/v1/pull", Message::PullRequest(req), loss, plan)? {
                Message::PullResponse(r) => r,
                other => panic!("a pull answered with a {}", other.name()),
            }
        } else {
            if loss == Loss::Request {
                return None;
            }
            let r = engine::handle_pull(self.st(HUB), &self.policies[HUB], NAMES[clinic], &req)
                .unwrap();
            if loss == Loss::Answer {
                return None;
            }
            r
        };
        let more = resp.more;
        self.pages[clinic].push(resp.clone());
        if self.pages[clinic].len() > 4 {
            self.pages[clinic].remove(0);
        }
        self.receive(clinic, &resp, crash);
        Some(more)
    }

    fn redeliver(&mut self, clinic: usize, back: usize) {
        let pages = &self.pages[clinic];
        if let Some(page) = pages.len().checked_sub(1 + back).map(|i| pages[i].clone()) {
            self.receive(clinic, &page, false);
        }
    }

    /// Stores a page and applies the inbox, as a clinic does with each page.
    fn receive(&mut self, clinic: usize, page: &PullResponse, crash: bool) {
        let now = self.tick();
        engine::store_pull(self.st_mut(clinic), PARENT, page, (0, 0), now).unwrap();
        if crash {
            self.crash(clinic, false);
        }
        engine::apply_inbox(
            self.stores[clinic].as_mut().unwrap(),
            &self.policies[clinic],
            now,
        )
        .unwrap();
        for s in self.st(clinic).list(None).unwrap() {
            self.produced
                .entry(s.version.key().to_string())
                .or_default()
                .push(s.version.vv);
        }
    }

    fn drain(&mut self) {
        for _ in 0..12 {
            for c in 0..2 {
                for _ in 0..50 {
                    if self.st(c).counts().unwrap().outbox == 0 {
                        break;
                    }
                    self.push(c, Loss::None, CALM);
                }
                while self.pull(c, Loss::None, CALM, false) == Some(true) {}
            }
        }
    }

    /// Everything the model and the invariants say about the end state.
    fn check(&self) -> Result<(), TestCaseError> {
        let hub: BTreeMap<String, Version> = self
            .st(HUB)
            .list(None)
            .unwrap()
            .into_iter()
            .map(|s| (s.version.key().to_string(), s.version))
            .collect();
        for (node, name) in NAMES.iter().enumerate() {
            let store = self.st(node);
            if node != HUB {
                let counts = store.counts().unwrap();
                prop_assert_eq!(counts.outbox, 0, "outbox of {} drains", name);
                prop_assert_eq!(counts.inbox, 0, "inbox of {} drains", name);
                prop_assert_eq!(counts.quarantine, 0);
            }
            let mine = store.list(None).unwrap();
            let held: BTreeSet<String> = mine.iter().map(|s| s.version.key().to_string()).collect();
            prop_assert_eq!(
                &held,
                &self.model.holds(node),
                "{} holds exactly what it may see",
                name
            );
            for s in &mine {
                let Some(h) = hub.get(&s.version.key().to_string()) else {
                    return Err(TestCaseError::fail(format!(
                        "{} holds {}, the hub does not",
                        name,
                        s.version.key()
                    )));
                };
                prop_assert_eq!(
                    &s.version.vv,
                    &h.vv,
                    "{} converged on {}",
                    name,
                    s.version.key()
                );
                prop_assert_eq!(s.version.snapshot.hash, h.snapshot.hash);
            }
            let intact = matches!(store.verify_audit().unwrap(), AuditCheck::Intact { .. });
            prop_assert!(intact, "audit chain of {}", name);
        }

        // Where a value that lost may survive: the bodies of every conflict row.
        let mut kept: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for store in self.stores.iter().flatten() {
            for c in store.conflicts_list(true, None).unwrap() {
                if c.lost_at.is_empty() {
                    prop_assert!(c.local_body.is_some() && c.remote_body.is_some());
                } else {
                    // A clinic's note that its version lost at the hub: its own side is
                    // kept; the winner is in the replica (and both sides at the hub).
                    prop_assert!(c.local_body.is_some());
                }
                let bodies = kept.entry(c.record.clone()).or_default();
                bodies.extend(c.local_body.into_iter().chain(c.remote_body));
            }
        }
        for (key, writes) in &self.model.writes {
            let last = &hub[key];
            let body = last.snapshot.json();
            for w in writes {
                prop_assert!(
                    w.included_in(&last.vv),
                    "final {} of {} does not include the write {} ({})",
                    last.vv,
                    key,
                    w.token,
                    w.vv
                );
                let present = body[&w.field] == json!(w.token);
                let overwritten = writes.iter().any(|later| {
                    later.token != w.token && later.field == w.field && w.included_in(&later.vv)
                });
                let in_conflict = kept
                    .get(key)
                    .is_some_and(|b| b.iter().any(|b| b[&w.field] == json!(w.token)));
                prop_assert!(
                    present || overwritten || in_conflict,
                    "{}={} of {} was dropped: not in the final version, not overwritten by a write that saw it, not in a conflict",
                    w.field, w.token, key
                );
            }
            for f in 0..FIELDS {
                let field = format!("f{f}");
                if let Some(v) = body.get(&field) {
                    prop_assert!(
                        writes
                            .iter()
                            .any(|w| w.field == field && json!(w.token) == *v),
                        "{}={} of {} is no committed write's",
                        field,
                        v,
                        key
                    );
                }
            }
            for vv in self.produced.get(key).into_iter().flatten() {
                let rel = last.vv.compare(vv);
                prop_assert!(
                    matches!(rel, Causality::Newer | Causality::Same),
                    "final {} of {} does not include held {}",
                    last.vv,
                    key,
                    vv
                );
            }
        }
        for (key, token) in &self.model.ghosts {
            let quoted = format!("\"{token}\"");
            let record = RecordKey::parse(key).unwrap();
            for store in self.stores.iter().flatten() {
                let mut seen: Vec<Vec<u8>> = store
                    .history(&record)
                    .unwrap()
                    .into_iter()
                    .map(|h| h.body)
                    .collect();
                seen.extend(
                    store
                        .current(&record)
                        .unwrap()
                        .map(|s| s.version.snapshot.body.to_vec()),
                );
                for body in seen {
                    prop_assert!(
                        !String::from_utf8_lossy(&body).contains(&quoted),
                        "{} of an uncommitted write survived at {}",
                        token,
                        store.node_id()
                    );
                }
                for c in store.conflicts_list(true, None).unwrap() {
                    let text = format!("{:?} {:?}", c.local_body, c.remote_body);
                    prop_assert!(!text.contains(token.as_str()), "{} in a conflict", token);
                }
            }
        }
        Ok(())
    }
}

fn run_case(ops: &[Op], cutting: bool) -> Result<World, TestCaseError> {
    let mut w = World::new(cutting);
    for op in ops {
        w.run(op);
    }
    w.drain();
    w.check()?;
    Ok(w)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(200)))]

    #[test]
    fn any_interleaving_converges_without_losing_a_write(ops in proptest::collection::vec(op(), 1..45)) {
        run_case(&ops, false)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(100)))]

    #[test]
    fn cut_links_and_crashes_converge_and_resume_at_the_cut(ops in proptest::collection::vec(op(), 1..45)) {
        run_case(&ops, true)?;
    }
}

/// The cutting world does cut, resume large transfers and lose chunk bytes: a
/// property that held only because nothing was ever cut would prove nothing.
#[test]
fn the_cutting_link_cuts_transfers_mid_way() {
    let mut ops = Vec::new();
    for i in 0..6 {
        ops.push(Op::Write {
            node: 0,
            patient: i % 3,
            field: i % FIELDS,
            note: true,
        });
    }
    let plan = Plan {
        cuts: Some(7),
        down_after: None,
    };
    ops.push(Op::Push {
        clinic: 0,
        loss: Loss::None,
        plan,
    });
    ops.push(Op::Push {
        clinic: 0,
        loss: Loss::Answer,
        plan,
    });
    ops.push(Op::Pull {
        clinic: 0,
        loss: Loss::None,
        plan,
        crash: false,
    });
    let w = run_case(&ops, true).unwrap();
    assert!(w.cost.cuts >= 2, "{:?}", w.cost);
    assert!(w.cost.lost > 0, "{:?}", w.cost);
    // (No `ChunkRun` needed: the last piece of an upload runs it, and a `ChunkRun`
    // follows only a cut after that piece.)
    for kind in [
        "chunk_query",
        "chunk_put",
        "chunk_ack",
        "chunk_data",
        "chunk_get",
        "push_response",
    ] {
        assert!(w.kinds.contains_key(kind), "no {kind}: {:?}", w.kinds);
    }
}

/// A push whose answer is itself larger than a piece: the hub stores the answer as
/// a transfer and announces it (`ChunkReady`), and the client fetches it in pieces
/// (`ChunkGet`). A `ChunkRun` repeated after a cut gets the same answer to go on
/// fetching: a re-run would answer otherwise (its records are now duplicates), and
/// the pieces already fetched would not fit it. Nothing is sent or fetched twice.
#[test]
fn a_push_answer_larger_than_a_piece_is_fetched_in_pieces_across_cuts() {
    let mut w = World::new(true);
    // The smallest chunk there is, so the answer does not fit in one.
    (w.batch, w.page, w.chunk) = (5_000, 1_000, clinicsync::transport::chunked::MIN_PIECE);
    w.write(0, 0, 0, false);
    w.write_many(0, 0, 2_500);
    w.script = vec![
        ("chunk_get", Loss::None),
        ("chunk_get", Loss::Answer),
        ("chunk_run", Loss::Answer),
        ("chunk_get", Loss::Request),
    ];
    w.push(0, Loss::None, CALM);
    assert_eq!(w.st(0).counts().unwrap().outbox, 0);
    assert_eq!(w.cost.cuts, 3, "{:?}", w.cost);
    // The last piece ran the upload the first time; after each cut a `ChunkRun`.
    assert_eq!(w.kinds.get("chunk_run"), Some(&3), "{:?}", w.kinds);
    assert_eq!(w.kinds.get("chunk_ready"), Some(&4), "{:?}", w.kinds);
    assert!(w.cost.lost > 0, "{:?}", w.cost);
    w.drain();
    w.check().unwrap();
}
