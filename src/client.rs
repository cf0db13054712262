//! The child's side of the protocol: one sync round with the parent (push, then
//! pull, then apply), the EMR steps around it, and how a round paces itself on a bad
//! link. Blocking code, called by the daemon's schedule (`daemon::sync_loop`) and by
//! `clinicsync sync`; it never reads the wall clock itself (the [`Env`] passes time
//! in) and keeps no global state (progress for the watchdog goes to a [`Heartbeat`]
//! the caller owns).
//!
//! A round:
//! 1. puts a logical clock that ran ahead of the wall clock back, and quarantines
//!    records too large for any message (neither ever blocks the queue);
//! 2. pushes the outbox in pipelined batches (the next batch is built while the
//!    previous one is in flight), up to three passes for records edited meanwhile;
//!    the first batch carries the round's first pull request (one exchange, `/v1/sync`,
//!    answered with the push results and the first page), unless the parent refused
//!    that within a day (an older hub: then apart);
//! 3. pulls pages until the parent has nothing more (or the day's budget or the bulk
//!    window says stop), the first page carrying this node's health and order results;
//! 4. applies the inbox (embedded EMR) or leaves it to the EMR step.
//!
//! Invariants:
//! - Progress is what was acknowledged and committed: a round cut after progress is
//!   reported as interrupted, not failed, and the next round follows at once.
//! - The [`Pace`] (byte budget per batch and page, bytes today) survives restarts in
//!   the store's meta; pieces of large pull answers survive too ([`AnswerStore`]), so
//!   a resumed transfer costs at most one piece.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use crate::config::TransportKind;
use crate::config::{Config, SyncSection};
use crate::engine::{self, ApplySummary, EngineError, Policy, PushSummary, PARENT};
use crate::error::Classify;
use crate::store::{meta, PeerEvent, Store};
use crate::transport::http::{Traffic, TransportError};
use crate::transport::mqtt::MqttClient;
use crate::transport::{Exchange, MqttThenHttp};
use crate::wire::{Message, PushRequest};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<crate::store::StoreError> for SyncError {
    fn from(e: crate::store::StoreError) -> Self {
        SyncError::Engine(e.into())
    }
}

impl crate::error::Classify for SyncError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            SyncError::Transport(e) => e.class(),
            SyncError::Engine(e) => e.class(),
        }
    }
}

/// What one sync round moved.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    pub pushed: PushSummary,
    pub pulled: usize,
    pub applied: ApplySummary,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub elapsed_ms: u64,
    /// The adaptive batch/page byte budget after this round.
    pub batch_budget: usize,
    /// Bytes exchanged with the parent today (UTC), for a metered link.
    pub bytes_today: u64,
    /// Why pulls stopped early (budget spent, outside the bulk window).
    pub held_back: Option<String>,
    /// The round moved records, then the link failed: the reason (the next round
    /// follows at once).
    pub interrupted: Option<String>,
    /// Bytes sent again after cuts, and cuts resumed within transfers.
    pub bytes_resent: u64,
    pub resumed: u64,
    /// This node's clock minus the parent's (ms), from the parent's last answer.
    pub clock_skew_ms: Option<i64>,
    /// The zstd level this round's push frames went at (`sync.push_level`, or chosen
    /// from the link's upload rate).
    pub push_level: i32,
    /// The link's upload rate (bits per second) as measured after this round, when
    /// known.
    pub upload_bps: Option<u64>,
}

/// How far this node's logical clock may run ahead of its wall clock before a round
/// puts it back ([`crate::store::Tx::rebase_clock`]): well inside a hub's
/// `max_clock_ahead_secs` (300 s by default).
pub const CLOCK_REBASE_MS: u64 = 60_000;

/// One push-then-pull round with the parent, until the outbox is drained (or only
/// quarantined records remain) and the parent has nothing more for us.
pub fn sync_once(
    store: &mut Store,
    policy: &Policy,
    client: &dyn Exchange,
    cfg: &SyncSection,
    stop: &AtomicBool,
) -> Result<SyncReport, SyncError> {
    sync_with(store, policy, client, cfg, stop, &Env::wall())
}

/// [`sync_once`], reporting after each pulled page where the pull cursor stands
/// against the parent's head (`clinicsync sync --bootstrap` draws a bar from it).
pub fn sync_with_progress(
    store: &mut Store,
    policy: &Policy,
    client: &dyn Exchange,
    cfg: &SyncSection,
    stop: &AtomicBool,
    progress: &dyn Fn(u64, u64),
) -> Result<SyncReport, SyncError> {
    let env = Env {
        progress,
        ..Env::wall()
    };
    sync_with(store, policy, client, cfg, stop, &env)
}

/// What a round takes from its caller besides the store and the link: the clock,
/// where to report pull progress, and the heartbeat the watchdog reads.
pub struct Env<'a> {
    pub clock: &'a (dyn Fn() -> u64 + Sync),
    pub progress: &'a dyn Fn(u64, u64),
    pub heartbeat: Option<&'a Heartbeat>,
}

impl Env<'static> {
    /// The wall clock, no progress display, no watchdog.
    pub fn wall() -> Env<'static> {
        Env {
            clock: &crate::time::wall_ms,
            progress: &|_, _| {},
            heartbeat: None,
        }
    }
}

impl Env<'_> {
    fn now(&self) -> u64 {
        (self.clock)()
    }

    fn beat(&self) {
        if let Some(h) = self.heartbeat {
            h.beat(self.now());
        }
    }
}

/// Progress of the round in flight, for a watchdog: when the last batch or page
/// finished, and whether a round is running at all (an idle node is never stalled).
/// Owned by whoever runs rounds (the daemon); no process-global state.
#[derive(Debug, Default)]
pub struct Heartbeat {
    last_ms: AtomicU64,
    syncing: AtomicBool,
}

impl Heartbeat {
    pub fn beat(&self, now_ms: u64) {
        self.last_ms.store(now_ms, Ordering::Relaxed);
    }

    fn set_syncing(&self, on: bool, now_ms: u64) {
        self.beat(now_ms);
        self.syncing.store(on, Ordering::Relaxed);
    }

    /// A round is running and has finished nothing for longer than `stall_ms`.
    pub fn stalled(&self, now_ms: u64, stall_ms: u64) -> bool {
        self.syncing.load(Ordering::Relaxed)
            && now_ms.saturating_sub(self.last_ms.load(Ordering::Relaxed)) > stall_ms
    }
}

/// [`sync_once`] with the caller's clock, progress and heartbeat.
pub fn sync_with(
    store: &mut Store,
    policy: &Policy,
    client: &dyn Exchange,
    cfg: &SyncSection,
    stop: &AtomicBool,
    env: &Env<'_>,
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    let mut report = SyncReport::default();
    // A round reads the outbox a batch at a time and clears it a batch at a time:
    // half of SQLite's default page cache costs it nothing measurable, and the MiB
    // stays off the clinic's peak (BENCHMARKS.md, "Clinic peak memory while pushing").
    store.set_cache_kib(SYNC_CACHE_KIB)?;
    {
        // A record too large for any message is set aside, never sent to block
        // everything behind it.
        let mut tx = store.begin()?;
        for (key, size) in tx.quarantine_oversized(env.now())? {
            warn!(node = %policy.node_id, record = %key, mib = size >> 20, "record too large to carry: quarantined");
        }
        // A clock that ran fast and was set right: this node's clock comes back, and
        // its unpushed writes stamped in the future are stamped again, so its parent
        // takes them now instead of in days.
        let restamped = tx.rebase_clock(env.now(), CLOCK_REBASE_MS)?;
        if !restamped.is_empty() {
            warn!(node = %policy.node_id, records = restamped.len(), "this node's clock had run ahead of the wall clock (set right since): unpushed writes stamped again");
            tx.audit(
                env.now(),
                "local",
                "clock-rebase",
                "",
                "",
                &format!("{} unpushed record(s) stamped again", restamped.len()),
            )?;
        }
        tx.commit()?;
    }
    if let Some(h) = env.heartbeat {
        h.set_syncing(true, env.now());
    }
    let cache = store.path().map(|p| AnswerStore::new(p, env.clock));
    // The piece size the link allowed last time, kept as it changes (a kill mid-round
    // keeps it too).
    let persist_piece = |size: usize| {
        if let Some(c) = &cache {
            c.with("remember the piece size with", |tx| {
                tx.set_meta(&meta::LINK_PIECE_BYTES, size as u64)
            });
        }
    };
    if client.parent_accept().is_none() {
        // A new process: the parent's protocol as it announced it last time, so the
        // round's first request (the push, usually the largest) is already in it.
        if let Some(text) = store.meta(&meta::PARENT_ACCEPT)? {
            client.assume_parent_accept(crate::wire::Accept::parse(Some(&text)));
        }
    }
    report.push_level = push_level(store, client, cfg)?;
    let mut chunked = crate::transport::chunked::Chunked::new(client, cfg.chunk_bytes);
    chunked.patience = Duration::from_secs(cfg.timeout_secs.max(1));
    let saved_piece = store.meta(&meta::LINK_PIECE_BYTES)?.unwrap_or(0) as usize;
    if saved_piece > 0 {
        chunked.set_piece(saved_piece);
    }
    chunked.on_piece = Some(&persist_piece);
    chunked.cache = cache
        .as_ref()
        .map(|c| c as &dyn crate::transport::chunked::AnswerCache);
    let link: &dyn Exchange = if cfg.chunk_bytes > 0 {
        &chunked
    } else {
        client
    };
    let mut pace = Pace::resume(
        store.meta(&meta::LINK_BUDGET_BYTES)?.unwrap_or(0),
        cfg.push_batch_bytes.max(cfg.pull_page_bytes as usize),
        store.meta(&meta::TRAFFIC_DAY)?,
        store.meta(&meta::TRAFFIC_TODAY_BYTES)?.unwrap_or(0),
        env.now(),
    );
    let ctx = Ctx {
        policy,
        link,
        cfg,
        stop,
        env,
    };
    let result = sync_rounds(store, ctx, &mut report, &mut pace);
    report.bytes_today = pace.today;
    report.bytes_resent = chunked.resent.load(Ordering::Relaxed);
    report.resumed = chunked.resumed.load(Ordering::Relaxed);
    if let Some(h) = env.heartbeat {
        h.set_syncing(false, env.now());
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    let mut tx = store.begin()?;
    if let Err(e) = &result {
        if e.is_retryable() {
            pace.failed();
        }
        tx.note_peer(PARENT, PeerEvent::Error(&e.to_string()), env.now())?;
    }
    report.clock_skew_ms = client.clock_skew_ms();
    if let Some(skew) = report.clock_skew_ms {
        tx.set_meta(&meta::PARENT_CLOCK_SKEW_MS, skew)?;
        tx.set_meta(&meta::PARENT_CLOCK_SEEN_MS, env.now())?;
        if skew.unsigned_abs() > crate::transport::http::CLOCK_SKEW_REPORTED_MS {
            warn!(
                skew_ms = skew,
                "{}",
                crate::transport::http::skew_words(skew)
            );
        }
    }
    if let Some(parent) = client.parent_accept() {
        tx.set_meta(
            &meta::PARENT_ACCEPT,
            parent.header_value().unwrap_or_default(),
        )?;
    }
    // What this round measured of the link, failed or not (its samples are real),
    // for the next round and the next process.
    if let Some(rate) = client.link_rate() {
        if let Some(bps) = rate.up_bps() {
            tx.set_meta(&meta::LINK_UP_BPS, bps)?;
        }
        if let Some(ms) = rate.latency_ms() {
            tx.set_meta(&meta::LINK_LATENCY_MS, ms)?;
        }
        report.upload_bps = rate.up_bps();
    }
    tx.set_meta(&meta::PUSH_LEVEL, report.push_level.max(1) as u64)?;
    tx.set_meta(&meta::LINK_BUDGET_BYTES, pace.budget as u64)?;
    tx.set_meta(&meta::TRAFFIC_DAY, pace.day)?;
    tx.set_meta(&meta::TRAFFIC_TODAY_BYTES, report.bytes_today)?;
    tx.commit()?;
    report.batch_budget = pace.budget;
    match result {
        // Progress is what was acknowledged: a round that moved records and was then
        // cut is not a failure; the next round goes on at once.
        Err(e) if e.is_retryable() && report.pushed.cleared + report.pulled > 0 => {
            report.interrupted = Some(e.to_string());
            Ok(report)
        }
        other => other.map(|_| report),
    }
}

/// The zstd level of this round's push frames, set on `client` for the whole round (a
/// frame built again after a cut is then the same frame): `sync.push_level` when a
/// technician set one, else chosen from the upload rate the link showed
/// ([`crate::wire::level::choose`]), starting a new process from the estimate an
/// earlier one kept in meta. A kept value that is not a number is the store's
/// corruption (the round stops, as on any corrupt meta value); one out of range is
/// read as not measured.
fn push_level(store: &Store, client: &dyn Exchange, cfg: &SyncSection) -> Result<i32, SyncError> {
    use crate::wire::level::{self, PushLevel};
    let kept = crate::transport::rate::LinkRate::resume(
        store.meta(&meta::LINK_UP_BPS)?,
        store.meta(&meta::LINK_LATENCY_MS)?,
    );
    let previous = store
        .meta(&meta::PUSH_LEVEL)?
        .map_or(crate::wire::LEVEL_FAST, |l| l.min(i32::MAX as u64) as i32);
    client.assume_link_rate(kept);
    let level = match cfg.push_level.level() {
        Some(PushLevel::Fixed(l)) => l,
        // Invalid settings never get past `config check`; a test's is auto.
        Some(PushLevel::Auto) | None => {
            level::choose(client.link_rate().and_then(|r| r.up_bps()), previous)
        }
    };
    if level != previous {
        info!(peer = PARENT, level, previous, upload_bps = ?client.link_rate().and_then(|r| r.up_bps()), "push frames change zstd level");
    }
    client.set_push_level(level);
    Ok(level)
}

/// The pieces of large pull answers, kept in the node's own store (as transfers
/// `dir = "down"` from the parent) through a second connection, so a clinic killed in
/// the middle of a page continues it after a restart; and the names of large uploads
/// begun (`dir = "up"`, no bytes), so one begun before a restart asks the parent
/// where it stands instead of sending its first piece again.
/// The connection is opened on the first large answer, not every round: most rounds
/// fetch nothing large and need no second connection.
struct AnswerStore<'a> {
    clock: &'a (dyn Fn() -> u64 + Sync),
    path: std::path::PathBuf,
    conn: std::sync::OnceLock<Option<std::sync::Mutex<Store>>>,
}

impl<'a> AnswerStore<'a> {
    fn new(path: std::path::PathBuf, clock: &'a (dyn Fn() -> u64 + Sync)) -> AnswerStore<'a> {
        AnswerStore {
            clock,
            path,
            conn: std::sync::OnceLock::new(),
        }
    }

    fn open(&self) -> Option<&std::sync::Mutex<Store>> {
        self.conn
            .get_or_init(|| {
                let mut store = match Store::open_existing(&self.path) {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "cannot keep pull answers across restarts");
                        return None;
                    }
                };
                // Answers left over from pages the parent has since rebuilt differently.
                let day_ago = (self.clock)().saturating_sub(24 * 3_600_000);
                let gc = store.begin().and_then(|mut tx| {
                    tx.transfer_gc(day_ago)?;
                    tx.commit()
                });
                if let Err(e) = gc {
                    warn!(error = %e, "could not clear old pull answers");
                }
                Some(std::sync::Mutex::new(store))
            })
            .as_ref()
    }

    fn with(
        &self,
        what: &str,
        f: impl FnOnce(&mut crate::store::Tx<'_>) -> crate::store::Result<()>,
    ) {
        let Some(conn) = self.open() else { return };
        let mut store = conn.lock().unwrap_or_else(|p| p.into_inner());
        let done = store.begin().and_then(|mut tx| {
            f(&mut tx)?;
            tx.commit()
        });
        if let Err(e) = done {
            warn!(error = %e, "could not {what} a pull answer's piece; a restart re-fetches it");
        }
    }
}

fn answer_key(id: &[u8; 32]) -> crate::store::TransferKey<'_> {
    crate::store::TransferKey {
        node: PARENT,
        id,
        dir: crate::store::TransferDir::Down,
    }
}

impl crate::transport::chunked::AnswerCache for AnswerStore<'_> {
    fn load(&self, id: &[u8; 32]) -> Vec<u8> {
        let mut out = Vec::new();
        self.with("read", |tx| {
            out = tx.transfer_read(&answer_key(id), 0, u64::MAX)?;
            Ok(())
        });
        out
    }
    fn append(&self, id: &[u8; 32], total: u64, offset: u64, data: &[u8]) {
        self.with("keep", |tx| {
            tx.transfer_append(&answer_key(id), total, offset, data, (self.clock)())
                .map(|_| ())
        });
    }
    fn forget(&self, id: &[u8; 32]) {
        self.with("forget", |tx| tx.transfer_forget(&answer_key(id)));
    }
    fn upload_begun(&self, id: &[u8; 32]) -> bool {
        let mut begun = false;
        self.with("look up", |tx| {
            begun = tx.transfer_state(&upload_key(id))?.is_some();
            Ok(())
        });
        begun
    }
    fn upload_begins(&self, id: &[u8; 32], total: u64) {
        // A row with no bytes: the upload's name, kept until it is answered.
        self.with("note", |tx| {
            tx.transfer_append(&upload_key(id), total, 0, &[], (self.clock)())
                .map(|_| ())
        });
    }
    fn upload_done(&self, id: &[u8; 32]) {
        self.with("forget", |tx| tx.transfer_forget(&upload_key(id)));
    }
}

/// An upload this node began (its bytes stay in the outbox; the row names it).
fn upload_key(id: &[u8; 32]) -> crate::store::TransferKey<'_> {
    crate::store::TransferKey {
        node: PARENT,
        id,
        dir: crate::store::TransferDir::Up,
    }
}

/// The smallest batch or page budget adaptive sizing goes down to.
pub const MIN_BUDGET: usize = 16 << 10;

/// Pacing on a metered, failing link, as a pure value: the byte budget of a batch or
/// page halves after a failed exchange (a cut link loses at most that much) and
/// doubles after each success, between [`MIN_BUDGET`] and the configured sizes; the
/// bytes exchanged today (UTC) count against `sync.daily_budget_bytes`. Kept in the
/// store's meta between rounds and across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    pub budget: usize,
    pub max: usize,
    /// Day number (UTC) that `today` counts.
    pub day: u64,
    pub today: u64,
}

impl Pace {
    /// The pace a round starts with, from what the last round saved (0 or `None`
    /// when nothing was saved); a new day starts its count at zero.
    pub fn resume(
        saved_budget: u64,
        max: usize,
        saved_day: Option<u64>,
        saved_today: u64,
        now_ms: u64,
    ) -> Pace {
        let day = now_ms / 86_400_000;
        Pace {
            budget: match saved_budget as usize {
                0 => max,
                b => b.clamp(MIN_BUDGET, max.max(MIN_BUDGET)),
            },
            max,
            day,
            today: if saved_day == Some(day) {
                saved_today
            } else {
                0
            },
        }
    }

    /// An exchange succeeded: twice the budget, up to `cap`.
    pub fn succeeded(&mut self, cap: usize) {
        self.budget = self.budget.saturating_mul(2).min(cap);
    }

    /// An exchange failed on the link: half the budget, not below [`MIN_BUDGET`].
    pub fn failed(&mut self) {
        self.budget = (self.budget / 2).max(MIN_BUDGET);
    }

    pub fn spent(&mut self, bytes: u64) {
        self.today = self.today.saturating_add(bytes);
    }

    /// Whether bulk pulls may go on after `pages` pages this round: the day's budget
    /// is not spent, and either it is the bulk window or no page was pulled yet. The
    /// error says why not (for `sync` and `status`).
    pub fn may_pull(&self, cfg: &SyncSection, pages: usize, now_ms: u64) -> Result<(), String> {
        if cfg.daily_budget_bytes > 0 && self.today >= cfg.daily_budget_bytes {
            return Err("daily budget spent; pulls resume tomorrow (UTC)".into());
        }
        if let Some(w) = crate::config::parse_window(&cfg.bulk_window) {
            if pages >= 1 && !crate::config::in_window(w, now_ms) {
                return Err(format!(
                    "outside the bulk window {}; one page a round",
                    cfg.bulk_window
                ));
            }
        }
        Ok(())
    }
}

/// What one round works with, besides the store and what it counts.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    policy: &'a Policy,
    link: &'a dyn Exchange,
    cfg: &'a SyncSection,
    stop: &'a AtomicBool,
    env: &'a Env<'a>,
}

fn sync_rounds(
    store: &mut Store,
    ctx: Ctx<'_>,
    report: &mut SyncReport,
    pace: &mut Pace,
) -> Result<(), SyncError> {
    let Ctx {
        link: client,
        cfg,
        stop,
        env,
        ..
    } = ctx;
    // The first pull request of the round rides with the first push batch when the
    // parent takes both in one exchange: a sync costs one round trip. Not on a first
    // pull (which brings this node's own records back: they would include what this
    // very exchange pushed).
    let mut carry = None;
    if together_allowed(store, env.now())? && pace.may_pull(cfg, 0, env.now()).is_ok() {
        let first = first_pull(store, ctx, pace)?;
        if !first.req.include_own {
            carry = Some(first);
        }
    }
    // Push first: what the clinic wrote is the most urgent thing on the link. A pass
    // walks the outbox once, building the next batch while the previous one is in
    // flight; a further pass picks up records edited meanwhile.
    // A push cut short does not keep the pull from trying: on a link that drops
    // every few KiB each direction takes what it can get.
    let mut push_failed = None;
    let mut pages = 0;
    let mut more = true;
    let pushing = Instant::now();
    for _pass in 0..3 {
        let settled = match push_pass(store, ctx, report, pace, &mut carry) {
            // A parent silent for the whole timeout would be as silent to the pull:
            // the round ends within one timeout, not two.
            Ok((n, page)) => {
                if let Some(m) = page {
                    pages += 1;
                    more = m;
                }
                n
            }
            Err(e)
                if e.is_retryable()
                    && pushing.elapsed() < Duration::from_secs(cfg.timeout_secs) =>
            {
                push_failed = Some(e);
                break;
            }
            Err(e) => return Err(e),
        };
        let due = engine::next_push(store, env.now(), 1, usize::MAX)?.is_some();
        if settled == 0 || !due {
            break;
        }
    }
    // Bytes and time of this round's pull answers: the link's download rate.
    let mut pull_timed = (0u64, Duration::ZERO);
    while more && !stop.load(Ordering::Relaxed) {
        if let Err(why) = pace.may_pull(cfg, pages, env.now()) {
            report.held_back = Some(why);
            break;
        }
        // The first page of a round carries this node's health (and a district's
        // children's): the parent learns it with every exchange. A first pull the
        // push did not carry goes now.
        let (req, sent_with) = match carry.take() {
            Some(first) => (first.req, Some((first.mark, first.results))),
            None if pages == 0 => {
                let first = first_pull(store, ctx, pace)?;
                (first.req, Some((first.mark, first.results)))
            }
            None => {
                let page_bytes = (cfg.pull_page_bytes as usize).min(pace.budget) as u64;
                let req = engine::pull_request(store, PARENT, cfg.pull_page_records, page_bytes)?;
                (req, None)
            }
        };
        pages += 1;
        let asked = Instant::now();
        let (answer, traffic) = client.exchange("/v1/pull", &Message::PullRequest(req))?;
        pull_timed.0 += traffic.received;
        pull_timed.1 += asked.elapsed();
        let Message::PullResponse(resp) = answer else {
            return Err(TransportError::Unexpected {
                sent: "pull_request",
                got: answer.name(),
            }
            .into());
        };
        report.bytes_sent += traffic.sent;
        report.bytes_received += traffic.received;
        pace.spent(traffic.sent + traffic.received);
        more = take_page(store, ctx, report, resp, traffic, sent_with)?;
        pace.succeeded(pace.max);
    }
    if pull_timed.0 >= 16 << 10 && !pull_timed.1.is_zero() {
        let bps = (pull_timed.0 as f64 * 8.0 / pull_timed.1.as_secs_f64()) as u64;
        let mut tx = store.begin()?;
        tx.set_meta(&meta::LINK_RATE_BPS, bps)?;
        tx.commit()?;
    }
    match push_failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Page cache of the connection a sync round runs on, in KiB (SQLite's default is
/// 2,000 KiB). Measured on a push of 100,000 records: 512 KiB and 1 MiB cost no time
/// against the default, and take 1.5 and 1 MiB off the clinic's peak.
pub const SYNC_CACHE_KIB: u32 = 1024;

/// A parent that refused a push and pull together is asked again after this long
/// (it may have been upgraded meanwhile).
const TOGETHER_REFUSED_FOR_MS: u64 = 24 * 3_600_000;

/// Whether to offer the parent a push and a pull in one exchange: yes, unless it
/// refused that within the last day.
fn together_allowed(store: &Store, now_ms: u64) -> Result<bool, SyncError> {
    Ok(match store.meta(&meta::PARENT_SYNC_REFUSED_MS)? {
        Some(at) => now_ms.saturating_sub(at) >= TOGETHER_REFUSED_FOR_MS || at > now_ms,
        None => true,
    })
}

/// Whether `e` is an older parent saying it does not know the combined exchange: no
/// `/v1/sync` endpoint (an empty 404 from the router), or a request it could not
/// decode because of the `sync_request` message. Nothing was applied.
fn refused_together(e: &TransportError) -> bool {
    match e {
        TransportError::Status {
            status: 404,
            message,
        } => message.is_empty(),
        TransportError::Status {
            status: 400,
            message,
        } => message.contains("sync_request"),
        _ => false,
    }
}

/// The round's first pull request, with this node's health and order results.
struct FirstPull {
    req: crate::wire::PullRequest,
    /// What to mark as passed up once the parent answered.
    mark: u64,
    results: Vec<crate::wire::orders::OrderResult>,
}

fn first_pull(store: &Store, ctx: Ctx<'_>, pace: &Pace) -> Result<FirstPull, SyncError> {
    let page_bytes = (ctx.cfg.pull_page_bytes as usize).min(pace.budget) as u64;
    let mut req = engine::pull_request(store, PARENT, ctx.cfg.pull_page_records, page_bytes)?;
    let (reports, mark) = crate::health::outgoing(store, PARENT, ctx.env.now())?;
    req.health = reports;
    req.order_results = crate::remote::outgoing(store)?;
    let results = req.order_results.clone();
    Ok(FirstPull { req, mark, results })
}

/// Takes a pulled page: health and order results it answered marked as passed up,
/// records to the inbox with the cursor, the parent's orders run, the inbox applied
/// (embedded EMR). Returns whether the parent has more.
fn take_page(
    store: &mut Store,
    ctx: Ctx<'_>,
    report: &mut SyncReport,
    resp: crate::wire::PullResponse,
    traffic: Traffic,
    sent_with: Option<(u64, Vec<crate::wire::orders::OrderResult>)>,
) -> Result<bool, SyncError> {
    let Ctx { policy, env, .. } = ctx;
    if let Some((mark, results)) = sent_with {
        crate::health::sent(store, mark)?;
        crate::remote::reported(store, &results)?;
    }
    let n = engine::store_pull(
        store,
        PARENT,
        &resp,
        (traffic.sent, traffic.received),
        env.now(),
    )?;
    // The parent's orders, each run once (`crate::remote`).
    crate::remote::execute(store, policy, &resp.orders, env.now())?;
    env.beat();
    (env.progress)(resp.next.eff, resp.head);
    report.pulled += n;
    if !policy.external_emr {
        // The store is the EMR: integrate at once. An external EMR gets the inbox
        // after the round (`emr_round`), in dependency order.
        let a = engine::apply_inbox(store, policy, env.now())?;
        report.applied.add(&a);
    }
    if n > 0 {
        info!(node = %policy.node_id, peer = PARENT, direction = "pull", records = n, cursor = %resp.next,
              bytes = traffic.received, "pull page applied");
    }
    Ok(resp.more)
}

/// One pipelined walk over the outbox. The first batch carries `carry` (the round's
/// first pull request) when there is one, and its answer's page is taken here.
/// Returns how many records were settled (acknowledged or quarantined) and, when a
/// page came with the push, whether the parent has more.
fn push_pass(
    store: &mut Store,
    ctx: Ctx<'_>,
    report: &mut SyncReport,
    pace: &mut Pace,
    carry: &mut Option<FirstPull>,
) -> Result<(usize, Option<bool>), SyncError> {
    let Ctx {
        policy,
        link: client,
        cfg,
        stop,
        env,
    } = ctx;
    let mut settled = 0;
    let mut after = 0u64;
    let mut page_more = None;
    // The next batch after `after`, unless the round is stopping.
    let build = |store: &Store, pace: &Pace, after: u64| {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        engine::next_push_after(
            store,
            env.now(),
            cfg.push_batch_records,
            pace.budget.min(cfg.push_batch_bytes),
            after,
        )
    };
    std::thread::scope(|scope| -> Result<(), SyncError> {
        // Sends a batch on its own thread, carrying the first pull unless the parent
        // refused the two together in this pass (`apart`).
        let launch = |req: PushRequest,
                      pre: Option<crate::transport::Prebuilt>,
                      carry: &mut Option<FirstPull>,
                      apart: bool| {
            let mut with = if apart { None } else { carry.take() };
            // The batch moves into the message and the message into the exchange
            // thread, which hands it back with the answer: one copy of the batch in
            // flight, not two (the answers are matched to it afterwards).
            let mut msg = match &with {
                Some(first) => {
                    let mut pull = first.req.clone();
                    // The answer in the link's pieces, asked here: the chunked link
                    // would otherwise copy the whole message to ask it.
                    if let Some(piece) = client.one_piece() {
                        pull.answer_chunk = piece as u64;
                    }
                    Message::SyncRequest(crate::wire::SyncRequest { push: req, pull })
                }
                None => Message::PushRequest(req),
            };
            if let (Some(_), Some(piece)) = (&with, client.one_piece()) {
                // A batch large enough to travel as a transfer goes alone: its frame
                // is then the same in the next round (the outbox's), and a round cut
                // mid-way resumes it there; a carried pull (health, cursor) would make
                // every round's frame new. Its extra round trip is small beside it.
                // Measured as it will travel (the negotiated protocol and dictionary),
                // not as v1: a batch that fits one piece in v2 carries the pull. At
                // level 3 whatever the push level: a higher level's frame is no larger,
                // and this costs ~1/50 of encoding at one.
                let frame =
                    crate::wire::encode_as(&msg, crate::wire::LEVEL_FAST, client.encoding());
                if frame.map_or(true, |f| f.len() > piece) {
                    *carry = with.take();
                    msg = Message::PushRequest(pushed_batch(msg));
                }
            }
            let path = if with.is_some() {
                "/v1/sync"
            } else {
                "/v1/push"
            };
            let handle = scope.spawn(move || {
                // A frame built ahead is for the batch alone: one that carries the
                // pull is built now.
                let answer = match pre {
                    Some(pre) if matches!(msg, Message::PushRequest(_)) => {
                        client.exchange_prebuilt(path, &msg, pre)
                    }
                    _ => client.exchange(path, &msg),
                };
                (msg, answer)
            });
            (handle, with)
        };
        // The next batch's frame is built here, while the batch before it is with the
        // parent, when it will go alone (no pull left to carry): the parent then gets
        // it as soon as it answers, instead of after the clinic encoded it.
        let ahead = |built: Option<(PushRequest, u64)>, carry: &Option<FirstPull>, apart: bool| {
            built.map(|(req, last)| {
                if carry.is_some() && !apart {
                    return (req, last, None);
                }
                let msg = Message::PushRequest(req);
                let pre = client.prebuild(&msg);
                (pushed_batch(msg), last, pre)
            })
        };
        let mut apart = false;
        let mut inflight = None;
        let mut next = ahead(build(store, pace, after)?, carry, apart);
        loop {
            let Some((handle, with)) = inflight.take() else {
                // Nothing in flight: send the next batch and build the one after it
                // while this one travels.
                let Some((req, last, pre)) = next.take() else {
                    break;
                };
                after = last;
                inflight = Some(launch(req, pre, carry, apart));
                next = ahead(build(store, pace, after)?, carry, apart);
                continue;
            };
            let (handle, with): (std::thread::ScopedJoinHandle<'_, _>, Option<FirstPull>) =
                (handle, with);
            // A panic in the exchange thread is a bug: let it surface as one.
            let (sent, mut exchanged): (Message, Result<(Message, Traffic), TransportError>) =
                handle
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
            let mut req = pushed_batch(sent);
            let mut with = with;
            if let Err(e) = &exchanged {
                if with.is_some() && refused_together(e) {
                    // An older parent: the batch alone now, the pull after the
                    // pushes, and no combined exchange for a day (nor for the rest of
                    // this pass).
                    info!(node = %policy.node_id, peer = PARENT, error = %e, "parent takes no push and pull together; sending them apart");
                    let mut tx = store.begin()?;
                    tx.set_meta(&meta::PARENT_SYNC_REFUSED_MS, env.now())?;
                    tx.commit()?;
                    apart = true;
                    *carry = with.take();
                    let alone = Message::PushRequest(req);
                    exchanged = client.exchange("/v1/push", &alone);
                    req = pushed_batch(alone);
                }
            }
            let (answer, traffic) = exchanged?;
            let (resp, page) = match (answer, with) {
                (Message::PushResponse(resp), None) => (resp, None),
                (Message::SyncResponse(both), Some(first)) => (both.push, Some((both.pull, first))),
                (answer, with) => {
                    return Err(TransportError::Unexpected {
                        sent: if with.is_some() {
                            "sync_request"
                        } else {
                            "push_request"
                        },
                        got: answer.name(),
                    }
                    .into())
                }
            };
            // Answered: the next batch (built while this one travelled) goes before
            // this one is settled, so the parent works on it meanwhile.
            if let Some((req, last, pre)) = next.take() {
                after = last;
                inflight = Some(launch(req, pre, carry, apart));
            }
            let s = engine::apply_push_results(
                store,
                PARENT,
                &req,
                &resp,
                (traffic.sent, traffic.received),
                env.now(),
            )?;
            env.beat();
            pace.succeeded(cfg.push_batch_bytes);
            report.bytes_sent += traffic.sent;
            report.bytes_received += traffic.received;
            pace.spent(traffic.sent + traffic.received);
            settled += s.cleared + s.rejected;
            report.pushed.add(&s);
            info!(node = %policy.node_id, peer = PARENT, direction = "push", records = s.sent, accepted = s.accepted,
                  rejected = s.rejected, conflicts = s.conflict, bytes = traffic.sent, "push batch acknowledged");
            if let Some((pull, first)) = page {
                // The exchange's bytes are counted once, with the push.
                let more = take_page(
                    store,
                    ctx,
                    report,
                    pull,
                    Traffic::default(),
                    Some((first.mark, first.results)),
                )?;
                page_more = Some(more);
            }
            // Settled: this batch and its answer go before the one after next is read
            // and encoded, so a clinic holds two batches at a time, not three.
            drop((req, resp));
            if inflight.is_some() {
                next = ahead(build(store, pace, after)?, carry, apart);
            }
        }
        Ok(())
    })?;
    Ok((settled, page_more))
}

/// The batch of a request [`push_pass`] built: it sends only push requests and push
/// requests carrying a pull.
fn pushed_batch(msg: Message) -> PushRequest {
    match msg {
        Message::PushRequest(req) => req,
        Message::SyncRequest(both) => both.push,
        other => unreachable!("push_pass sent a {}", other.name()),
    }
}

/// What the EMR side of a round did; errors are reported, never fatal to the round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EmrReport {
    pub capture: Option<crate::emr::flow::CaptureSummary>,
    pub apply: Option<crate::emr::flow::EmrApplySummary>,
    pub error: Option<String>,
}

/// Captures local changes from the EMR (before a push), or applies the inbox to it
/// (after a pull). An EMR error is recorded as the link state of peer `emr` (shown by
/// `status`) and logged; syncing with the parent goes on regardless.
pub fn emr_step(
    store: &mut Store,
    policy: &Policy,
    emr: &mut dyn crate::emr::Emr,
    capture: bool,
    report: &mut EmrReport,
    now: u64,
) {
    let result = if capture {
        crate::emr::flow::capture_from_emr(store, policy, emr, now)
            .map(|c| report.capture = Some(c))
    } else {
        crate::emr::flow::apply_inbox_to_emr(store, policy, emr, now).and_then(|mut a| {
            // A hub's EMR also gets what its children pushed; a clinic's, a
            // reviewed conflict's resolution.
            let b = if policy.serves_children {
                crate::emr::flow::apply_replica_to_emr(store, policy, emr, now)?
            } else {
                crate::emr::flow::apply_due_to_emr(store, policy, emr, now)?
            };
            a.applied.add(&b.applied);
            a.refused += b.refused;
            a.blocked += b.blocked;
            // A first-contact round applies twice: the report adds them up.
            if let Some(before) = report.apply.take() {
                a.applied.add(&before.applied);
                a.refused += before.refused;
                a.blocked += before.blocked;
            }
            report.apply = Some(a);
            Ok(())
        })
    };
    if let Err(e) = result {
        let msg = format!(
            "{} {}: {e}",
            if capture { "capture" } else { "apply" },
            if capture {
                "from the EMR"
            } else {
                "to the EMR"
            }
        );
        warn!(node = %policy.node_id, peer = "emr", error = %msg, "EMR step failed");
        if let Ok(mut tx) = store.begin() {
            let _ = tx.note_peer("emr", PeerEvent::Error(&msg), now);
            let _ = tx.commit();
        }
        report.error = Some(msg);
    } else if !capture {
        if let Ok(mut tx) = store.begin() {
            let _ = tx.note_peer(
                "emr",
                PeerEvent::PushOk {
                    sent: 0,
                    received: 0,
                },
                now,
            );
            let _ = tx.commit();
        }
    }
}

/// A full round for a node with an external EMR: capture, sync with the parent,
/// apply to the EMR. Without an EMR it is `sync_once`.
pub fn round(
    store: &mut Store,
    policy: &Policy,
    client: &dyn Exchange,
    cfg: &SyncSection,
    emr: Option<&mut (dyn crate::emr::Emr + '_)>,
    stop: &AtomicBool,
) -> Result<(SyncReport, EmrReport), SyncError> {
    round_with(store, policy, client, cfg, emr, stop, &Env::wall())
}

/// [`round`] with the caller's clock and heartbeat (the daemon's).
pub fn round_with(
    store: &mut Store,
    policy: &Policy,
    client: &dyn Exchange,
    cfg: &SyncSection,
    emr: Option<&mut (dyn crate::emr::Emr + '_)>,
    stop: &AtomicBool,
    env: &Env<'_>,
) -> Result<(SyncReport, EmrReport), SyncError> {
    let mut er = EmrReport::default();
    let Some(emr) = emr else {
        return sync_with(store, policy, client, cfg, stop, env).map(|r| (r, er));
    };
    if !engine::first_contact_done(store, PARENT)? {
        // First contact (a new or reinstalled box): learn from the parent what this
        // node already wrote before capturing anything, so a record the EMR still
        // holds is recognised, not written again as a new version with counters
        // restarted at 1 (stale, or in conflict with itself).
        let sync = sync_with(store, policy, client, cfg, stop, env);
        emr_step(store, policy, emr, false, &mut er, env.now());
        let first = sync?;
        // Then the usual round, in the same call: what the EMR holds goes up now.
        emr_step(store, policy, emr, true, &mut er, env.now());
        let mut second = sync_with(store, policy, client, cfg, stop, env)?;
        emr_step(store, policy, emr, false, &mut er, env.now());
        second.pulled += first.pulled;
        second.applied.add(&first.applied);
        second.bytes_sent += first.bytes_sent;
        second.bytes_received += first.bytes_received;
        second.elapsed_ms += first.elapsed_ms;
        return Ok((second, er));
    }
    emr_step(store, policy, emr, true, &mut er, env.now());
    let sync = sync_with(store, policy, client, cfg, stop, env);
    // Apply what arrived even if the link dropped mid-round: it is in the inbox.
    emr_step(store, policy, emr, false, &mut er, env.now());
    sync.map(|r| (r, er))
}

/// The link to the parent, as the configuration asks for it.
pub struct ParentLink {
    pub exchange: Box<dyn Exchange + Send>,
    /// Completes when the parent sends a wake-up (MQTT).
    pub wake: Option<Arc<tokio::sync::Notify>>,
}

/// Connects to the parent. For MQTT this waits for the broker's answer, so a wrong
/// password or a broker that is down shows up here as a retryable or permanent error.
pub fn connect_parent(cfg: &Config) -> Result<ParentLink, String> {
    let parent = cfg
        .parent
        .as_ref()
        .ok_or("this node has no [parent] to sync with")?;
    let http = || parent.http_client(cfg.timeout());
    let mqtt = || -> Result<MqttClient, String> {
        let settings = cfg.mqtt_settings()?;
        MqttClient::connect(
            &settings,
            &cfg.node.id,
            cfg.timeout().min(Duration::from_secs(30)),
        )
        .map_err(|e| e.to_string())
    };
    Ok(match cfg.transport.kind {
        TransportKind::Http => ParentLink {
            exchange: Box::new(http()?),
            wake: None,
        },
        TransportKind::Mqtt => {
            let m = mqtt()?;
            let wake = Some(m.wake());
            ParentLink {
                exchange: Box::new(m),
                wake,
            }
        }
        TransportKind::Both => {
            let h = http()?;
            match mqtt() {
                Ok(m) => {
                    let wake = Some(m.wake());
                    ParentLink {
                        exchange: Box::new(MqttThenHttp { mqtt: m, http: h }),
                        wake,
                    }
                }
                Err(e) => {
                    warn!(error = %e, "MQTT broker unavailable; using HTTP until the next reconnect");
                    ParentLink {
                        exchange: Box::new(h),
                        wake: None,
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SyncSection {
        SyncSection::default()
    }

    /// A link that is always down.
    struct Down;

    impl Exchange for Down {
        fn exchange(&self, _: &str, _: &Message) -> Result<(Message, Traffic), TransportError> {
            Err(TransportError::Unreachable {
                url: "http://parent.invalid".into(),
                message: "down".into(),
            })
        }
    }

    #[test]
    fn a_sync_round_runs_on_a_bounded_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.db"), "clinic-a").unwrap();
        let cache = |s: &Store| -> i64 {
            s.conn()
                .query_row("PRAGMA cache_size", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(cache(&store), -2000, "SQLite's default before the round");
        let policy = Policy::new("clinic-a", true);
        let result = sync_with(
            &mut store,
            &policy,
            &Down,
            &cfg(),
            &AtomicBool::new(false),
            &Env::wall(),
        );
        assert!(result.is_err(), "the link is down");
        assert_eq!(cache(&store), -i64::from(SYNC_CACHE_KIB));
    }

    const DAY: u64 = 86_400_000;

    #[test]
    fn the_budget_halves_on_failure_doubles_on_success_within_its_bounds() {
        let mut p = Pace::resume(0, 1 << 20, None, 0, 0);
        assert_eq!(
            p.budget,
            1 << 20,
            "nothing saved: start at the configured size"
        );
        p.failed();
        assert_eq!(p.budget, 1 << 19);
        for _ in 0..20 {
            p.failed();
        }
        assert_eq!(p.budget, MIN_BUDGET, "never below the floor");
        p.succeeded(p.max);
        assert_eq!(p.budget, 2 * MIN_BUDGET);
        for _ in 0..20 {
            p.succeeded(256 << 10);
        }
        assert_eq!(p.budget, 256 << 10, "never above the cap it is given");
    }

    #[test]
    fn a_saved_pace_resumes_clamped_and_a_new_day_counts_from_zero() {
        let p = Pace::resume(1, 1 << 20, Some(3), 500, 3 * DAY + 10);
        assert_eq!(
            p.budget, MIN_BUDGET,
            "a saved budget below the floor is raised"
        );
        assert_eq!((p.day, p.today), (3, 500), "same day: the count goes on");
        let p = Pace::resume(u64::MAX, 1 << 20, Some(3), 500, 4 * DAY);
        assert_eq!(
            p.budget,
            1 << 20,
            "a saved budget above the sizes is capped"
        );
        assert_eq!((p.day, p.today), (4, 0), "a new day starts at zero");
    }

    #[test]
    fn pulls_stop_when_the_daily_budget_is_spent_and_outside_the_bulk_window() {
        let mut c = cfg();
        c.daily_budget_bytes = 1000;
        let mut p = Pace::resume(0, 1 << 20, None, 0, 0);
        assert!(p.may_pull(&c, 5, 0).is_ok());
        p.spent(1000);
        assert!(p.may_pull(&c, 0, 0).unwrap_err().contains("daily budget"));
        let mut c = cfg();
        c.bulk_window = "01:00-05:00".into();
        let p = Pace::resume(0, 1 << 20, None, 0, 0);
        let noon = 12 * 3_600_000;
        assert!(p.may_pull(&c, 0, noon).is_ok(), "the first page always");
        assert!(p.may_pull(&c, 1, noon).unwrap_err().contains("bulk window"));
        assert!(
            p.may_pull(&c, 1, 2 * 3_600_000).is_ok(),
            "inside the window"
        );
    }
}
