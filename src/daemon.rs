//! The running node: tokio wiring, the sync schedule, shutdown, logging.
//!
//! - A node with `[hub]` serves its children ([`crate::hub::serve`]).
//! - A node with `[parent]` runs [`sync_once`] every `sync.interval_secs`; after a
//!   failure it waits an exponentially growing, jittered delay (backon) between
//!   `sync.backoff_min_secs` and `sync.backoff_max_secs`, never a busy loop.
//! - SIGTERM/SIGINT stop both: the sync loop finishes its current batch (every batch
//!   is its own transaction, so stopping between batches loses nothing) and the
//!   server finishes in-flight requests.
//! - SIGHUP reloads a hub's children and TLS certificate from the configuration file
//!   (`reload_on_hangup`); an invalid file changes nothing. The hub's start-up raises
//!   the soft open-file limit toward `hub.max_connections` + 64 where it can.
//! - Logs go to journald when `JOURNAL_STREAM` is set (we run under systemd), to
//!   stderr otherwise.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use serde::Serialize;
use tracing::{info, warn};

use crate::config::TransportKind;
use crate::config::{Config, SyncSection};
use crate::engine::{self, ApplySummary, EngineError, Policy, PushSummary, PARENT};
use crate::hub::HubState;
use crate::store::{meta, PeerEvent, Store};
use crate::time::wall_ms;
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

impl SyncError {
    pub fn is_retryable(&self) -> bool {
        match self {
            SyncError::Transport(e) => e.is_retryable(),
            SyncError::Engine(e) => e.is_retryable(),
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
    sync_with_progress(store, policy, client, cfg, stop, &|_, _| {})
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
    let started = Instant::now();
    let mut report = SyncReport::default();
    {
        // A record too large for any message is set aside, never sent to block
        // everything behind it.
        let mut tx = store.begin()?;
        for (key, size) in tx.quarantine_oversized(wall_ms())? {
            warn!(node = %policy.node_id, record = %key, mib = size >> 20, "record too large to carry: quarantined");
        }
        // A clock that ran fast and was set right: this node's clock comes back, and
        // its unpushed writes stamped in the future are stamped again, so its parent
        // takes them now instead of in days.
        let restamped = tx.rebase_clock(wall_ms(), CLOCK_REBASE_MS)?;
        if !restamped.is_empty() {
            warn!(node = %policy.node_id, records = restamped.len(), "this node's clock had run ahead of the wall clock (set right since): unpushed writes stamped again");
            tx.audit(
                wall_ms(),
                "local",
                "clock-rebase",
                "",
                "",
                &format!("{} unpushed record(s) stamped again", restamped.len()),
            )?;
        }
        tx.commit()?;
    }
    SYNCING.store(true, Ordering::Relaxed);
    beat();
    // Adaptive sizing: the byte budget of a batch or page halves after a failed
    // exchange (a cut link loses at most that much) and doubles after each success,
    // between MIN_BUDGET and the configured sizes; it is kept across rounds and restarts.
    let max = cfg.push_batch_bytes.max(cfg.pull_page_bytes as usize);
    let saved = store.meta(&meta::LINK_BUDGET_BYTES)?.unwrap_or(0) as usize;
    let budget = std::cell::Cell::new(if saved == 0 {
        max
    } else {
        saved.clamp(MIN_BUDGET, max)
    });
    let cache = store.path().map(AnswerStore::new);
    // The piece size the link allowed last time, kept as it changes (a kill mid-round
    // keeps it too).
    let persist_piece = |size: usize| {
        if let Some(c) = &cache {
            c.with("remember the piece size with", |tx| {
                tx.set_meta(&meta::LINK_PIECE_BYTES, size as u64)
            });
        }
    };
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
    let day = wall_ms() / 86_400_000;
    let today = if store.meta(&meta::TRAFFIC_DAY)? == Some(day) {
        store.meta(&meta::TRAFFIC_TODAY_BYTES)?.unwrap_or(0)
    } else {
        0
    };
    let pace = Pace {
        budget,
        progress,
        today: std::cell::Cell::new(today),
    };
    let result = sync_rounds(store, policy, link, cfg, stop, &mut report, &pace);
    let budget = pace.budget;
    report.bytes_today = pace.today.get();
    report.bytes_resent = chunked.resent.load(Ordering::Relaxed);
    report.resumed = chunked.resumed.load(Ordering::Relaxed);
    SYNCING.store(false, Ordering::Relaxed);
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    let mut tx = store.begin()?;
    if let Err(e) = &result {
        if e.is_retryable() {
            budget.set((budget.get() / 2).max(MIN_BUDGET));
        }
        tx.note_peer(PARENT, PeerEvent::Error(&e.to_string()), wall_ms())?;
    }
    report.clock_skew_ms = client.clock_skew_ms();
    if let Some(skew) = report.clock_skew_ms {
        tx.set_meta(&meta::PARENT_CLOCK_SKEW_MS, skew)?;
        tx.set_meta(&meta::PARENT_CLOCK_SEEN_MS, wall_ms())?;
        if skew.unsigned_abs() > crate::transport::http::CLOCK_SKEW_REPORTED_MS {
            warn!(
                skew_ms = skew,
                "{}",
                crate::transport::http::skew_words(skew)
            );
        }
    }
    tx.set_meta(&meta::LINK_BUDGET_BYTES, budget.get() as u64)?;
    tx.set_meta(&meta::TRAFFIC_DAY, day)?;
    tx.set_meta(&meta::TRAFFIC_TODAY_BYTES, report.bytes_today)?;
    tx.commit()?;
    report.batch_budget = budget.get();
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

/// The pieces of large pull answers, kept in the node's own store (as transfers
/// `dir = "down"` from the parent) through a second connection, so a clinic killed in
/// the middle of a page continues it after a restart.
/// The connection is opened on the first large answer, not every round: most rounds
/// fetch nothing large and need no second connection.
struct AnswerStore {
    path: std::path::PathBuf,
    conn: std::sync::OnceLock<Option<std::sync::Mutex<Store>>>,
}

impl AnswerStore {
    fn new(path: std::path::PathBuf) -> AnswerStore {
        AnswerStore {
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
                let day_ago = wall_ms().saturating_sub(24 * 3_600_000);
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

impl crate::transport::chunked::AnswerCache for AnswerStore {
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
            tx.transfer_append(&answer_key(id), total, offset, data, wall_ms())
                .map(|_| ())
        });
    }
    fn forget(&self, id: &[u8; 32]) {
        self.with("forget", |tx| tx.transfer_forget(&answer_key(id)));
    }
}

/// The smallest batch or page budget adaptive sizing goes down to.
pub const MIN_BUDGET: usize = 16 << 10;

/// The adaptive byte budget of a round and where to report pull progress.
struct Pace<'a> {
    budget: std::cell::Cell<usize>,
    progress: &'a dyn Fn(u64, u64),
    /// Bytes exchanged with the parent today (UTC), before this round and during it.
    today: std::cell::Cell<u64>,
}

/// Whether bulk pulls may go on: the day's budget is not spent, and either we are in
/// the bulk window or this round has not pulled a page yet.
fn may_pull(cfg: &SyncSection, pace: &Pace<'_>, pages: usize, report: &mut SyncReport) -> bool {
    if cfg.daily_budget_bytes > 0 && pace.today.get() >= cfg.daily_budget_bytes {
        report.held_back = Some("daily budget spent; pulls resume tomorrow (UTC)".into());
        return false;
    }
    if let Some(w) = crate::config::parse_window(&cfg.bulk_window) {
        if pages >= 1 && !crate::config::in_window(w, wall_ms()) {
            report.held_back = Some(format!(
                "outside the bulk window {}; one page a round",
                cfg.bulk_window
            ));
            return false;
        }
    }
    true
}

fn grow(budget: &std::cell::Cell<usize>, max: usize) {
    budget.set(budget.get().saturating_mul(2).min(max));
}

fn sync_rounds(
    store: &mut Store,
    policy: &Policy,
    client: &dyn Exchange,
    cfg: &SyncSection,
    stop: &AtomicBool,
    report: &mut SyncReport,
    pace: &Pace<'_>,
) -> Result<(), SyncError> {
    let (budget, progress) = (&pace.budget, pace.progress);
    // Push first: what the clinic wrote is the most urgent thing on the link. A pass
    // walks the outbox once, building the next batch while the previous one is in
    // flight; a further pass picks up records edited meanwhile.
    // A push cut short does not keep the pull from trying: on a link that drops
    // every few KiB each direction takes what it can get.
    let mut push_failed = None;
    let pushing = Instant::now();
    for _pass in 0..3 {
        let settled = match push_pass(store, policy, client, cfg, stop, report, pace) {
            // A parent silent for the whole timeout would be as silent to the pull:
            // the round ends within one timeout, not two.
            Ok(n) => n,
            Err(e)
                if e.is_retryable()
                    && pushing.elapsed() < Duration::from_secs(cfg.timeout_secs) =>
            {
                push_failed = Some(e);
                break;
            }
            Err(e) => return Err(e),
        };
        let due = engine::next_push(store, wall_ms(), 1, usize::MAX)?.is_some();
        if settled == 0 || !due {
            break;
        }
    }
    let mut pages = 0;
    let mut health_mark = None;
    // Bytes and time of this round's pull answers: the link's download rate.
    let mut pull_timed = (0u64, Duration::ZERO);
    while !stop.load(Ordering::Relaxed) && may_pull(cfg, pace, pages, report) {
        pages += 1;
        let page_bytes = (cfg.pull_page_bytes as usize).min(budget.get()) as u64;
        let mut req = engine::pull_request(store, PARENT, cfg.pull_page_records, page_bytes)?;
        if pages == 1 {
            // The first page of a round carries this node's health (and a district's
            // children's): the parent learns it with every exchange.
            let (reports, mark) = crate::health::outgoing(store, PARENT, wall_ms())?;
            req.health = reports;
            req.order_results = crate::remote::outgoing(store)?;
            health_mark = Some((mark, req.order_results.clone()));
        }
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
        if let Some((mark, results)) = health_mark.take() {
            crate::health::sent(store, mark)?;
            crate::remote::reported(store, &results)?;
        }
        let n = engine::store_pull(
            store,
            PARENT,
            &resp,
            (traffic.sent, traffic.received),
            wall_ms(),
        )?;
        // The parent's orders, each run once (`crate::remote`).
        crate::remote::execute(store, policy, &resp.orders, wall_ms())?;
        beat();
        progress(resp.next.eff, resp.head);
        report.pulled += n;
        report.bytes_sent += traffic.sent;
        report.bytes_received += traffic.received;
        pace.today
            .set(pace.today.get() + traffic.sent + traffic.received);
        if !policy.external_emr {
            // The store is the EMR: integrate at once. An external EMR gets the inbox
            // after the round (`emr_round`), in dependency order.
            let a = engine::apply_inbox(store, policy, wall_ms())?;
            report.applied.add(&a);
        }
        if n > 0 {
            info!(node = %policy.node_id, peer = PARENT, direction = "pull", records = n, cursor = %resp.next,
                  bytes = traffic.received, "pull page applied");
        }
        grow(
            budget,
            cfg.push_batch_bytes.max(cfg.pull_page_bytes as usize),
        );
        if !resp.more {
            break;
        }
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

/// One pipelined walk over the outbox. Returns how many records were settled
/// (acknowledged or quarantined).
fn push_pass(
    store: &mut Store,
    policy: &Policy,
    client: &dyn Exchange,
    cfg: &SyncSection,
    stop: &AtomicBool,
    report: &mut SyncReport,
    pace: &Pace<'_>,
) -> Result<usize, SyncError> {
    let budget = &pace.budget;
    let mut settled = 0;
    let mut after = 0u64;
    std::thread::scope(|scope| -> Result<(), SyncError> {
        let mut inflight = None;
        loop {
            let next = if stop.load(Ordering::Relaxed) {
                None
            } else {
                engine::next_push_after(
                    store,
                    wall_ms(),
                    cfg.push_batch_records,
                    budget.get().min(cfg.push_batch_bytes),
                    after,
                )?
            };
            if let Some((req, handle)) = inflight.take() {
                let (req, handle): (PushRequest, std::thread::ScopedJoinHandle<'_, _>) =
                    (req, handle);
                // A panic in the exchange thread is a bug: let it surface as one.
                let exchanged: Result<(Message, Traffic), TransportError> = handle
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
                let (answer, traffic) = exchanged?;
                let Message::PushResponse(resp) = answer else {
                    return Err(TransportError::Unexpected {
                        sent: "push_request",
                        got: answer.name(),
                    }
                    .into());
                };
                let s = engine::apply_push_results(
                    store,
                    PARENT,
                    &req,
                    &resp,
                    (traffic.sent, traffic.received),
                    wall_ms(),
                )?;
                beat();
                grow(budget, cfg.push_batch_bytes);
                report.bytes_sent += traffic.sent;
                report.bytes_received += traffic.received;
                pace.today
                    .set(pace.today.get() + traffic.sent + traffic.received);
                settled += s.cleared + s.rejected;
                report.pushed.add(&s);
                info!(node = %policy.node_id, peer = PARENT, direction = "push", records = s.sent, accepted = s.accepted,
                      rejected = s.rejected, conflicts = s.conflict, bytes = traffic.sent, "push batch acknowledged");
            }
            let Some((req, last)) = next else { break };
            after = last;
            let msg = Message::PushRequest(req.clone());
            inflight = Some((req, scope.spawn(move || client.exchange("/v1/push", &msg))));
        }
        Ok(())
    })?;
    Ok(settled)
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
) {
    let now = wall_ms();
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
    let mut er = EmrReport::default();
    let Some(emr) = emr else {
        return sync_once(store, policy, client, cfg, stop).map(|r| (r, er));
    };
    if !engine::first_contact_done(store, PARENT)? {
        // First contact (a new or reinstalled box): learn from the parent what this
        // node already wrote before capturing anything, so a record the EMR still
        // holds is recognised, not written again as a new version with counters
        // restarted at 1 (stale, or in conflict with itself).
        let sync = sync_once(store, policy, client, cfg, stop);
        emr_step(store, policy, emr, false, &mut er);
        let first = sync?;
        // Then the usual round, in the same call: what the EMR holds goes up now.
        emr_step(store, policy, emr, true, &mut er);
        let mut second = sync_once(store, policy, client, cfg, stop)?;
        emr_step(store, policy, emr, false, &mut er);
        second.pulled += first.pulled;
        second.applied.add(&first.applied);
        second.bytes_sent += first.bytes_sent;
        second.bytes_received += first.bytes_received;
        second.elapsed_ms += first.elapsed_ms;
        return Ok((second, er));
    }
    emr_step(store, policy, emr, true, &mut er);
    let sync = sync_once(store, policy, client, cfg, stop);
    // Apply what arrived even if the link dropped mid-round: it is in the inbox.
    emr_step(store, policy, emr, false, &mut er);
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

/// Sets up logging: journald under systemd, stderr otherwise.
pub fn init_logging(default_level: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLINICSYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            // Fields without a prefix, so `journalctl -u clinicsync NODE=clinic-a PEER=parent` works.
            let layer = journald
                .with_syslog_identifier("clinicsync".into())
                .with_field_prefix(None);
            let _ = registry.with(layer).try_init();
            return;
        }
    }
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                // No colours: every line passes through `textsafe`, so a value from a
                // peer or an EMR (a feed URL, an id) cannot put escape sequences or
                // bidi overrides into a terminal or a log file.
                .with_writer(|| SafeStderr)
                .with_ansi(false)
                .with_target(false),
        )
        .try_init();
}

/// A formatted log line as it may be written: `textsafe::safe_lines`.
fn safe_log(buf: &[u8]) -> String {
    crate::textsafe::safe_lines(&String::from_utf8_lossy(buf)).into_owned()
}

/// Standard error with control characters and bidi overrides rendered visibly
/// (`textsafe::safe_lines`); line breaks stay.
struct SafeStderr;

impl std::io::Write for SafeStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write_all(safe_log(buf).as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `clinicsync run`: serves children and/or syncs with the parent until a signal.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Every event of this process carries the node id (journald field NODE).
    let span = tracing::info_span!("clinicsync", node = %cfg.node.id);
    use tracing::Instrument;
    let result = rt.block_on(run_async(cfg).instrument(span));
    // A blocking exchange left behind at shutdown must not hold the process.
    rt.shutdown_timeout(Duration::from_millis(200));
    result
}

/// How long a stopping daemon waits for an exchange in flight (well inside systemd's
/// `TimeoutStopSec`).
const STOP_GRACE: Duration = Duration::from_secs(3);

static LAST_BEAT_MS: AtomicU64 = AtomicU64::new(0);
static SYNCING: AtomicBool = AtomicBool::new(false);

/// Progress marker for the watchdog: called between batches and pages.
pub fn beat() {
    LAST_BEAT_MS.store(wall_ms(), Ordering::Relaxed);
}

/// Pings the systemd watchdog (when `WatchdogSec=` is set) while the node is healthy:
/// idle between rounds, or syncing with a batch finished within `stall_ms`. A sync
/// stuck longer than that stops the pings, and systemd restarts the service.
async fn watchdog(stall_ms: u64) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_micros(usec / 2));
    loop {
        tick.tick().await;
        let stalled = SYNCING.load(Ordering::Relaxed)
            && wall_ms().saturating_sub(LAST_BEAT_MS.load(Ordering::Relaxed)) > stall_ms;
        if stalled {
            warn!(
                stall_ms,
                "sync has made no progress; withholding the watchdog ping"
            );
        } else {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// SIGHUP (`systemctl reload clinicsync`): a hub re-reads its configuration file and
/// applies the children list and the TLS files ([`HubState::reload`]); a file that
/// does not validate, or TLS files that do not load, change nothing and are logged.
/// Other keys take effect on restart. Without a hub there is nothing to reload, and
/// the signal is logged rather than ending the process (its default action).
async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    path: std::path::PathBuf,
    hub: Option<Arc<HubState>>,
) {
    while hangup.recv().await.is_some() {
        let Some(state) = hub.clone() else {
            info!("SIGHUP: nothing to reload on a node without [hub]; restart to apply configuration changes");
            continue;
        };
        let file = path.clone();
        let reloaded = tokio::task::spawn_blocking(move || -> Result<String, String> {
            let cfg = Config::load(&file).map_err(|e| e.to_string())?;
            let hub = cfg
                .hub
                .as_ref()
                .ok_or("the [hub] section is gone; a hub stops serving only on restart")?;
            state.reload(hub)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match reloaded {
            Ok(applied) => {
                info!(config = %path.display(), %applied, "configuration reloaded (other keys take effect on restart)")
            }
            Err(error) => {
                tracing::error!(config = %path.display(), %error, "configuration not reloaded; the previous one stays in force")
            }
        }
    }
}

/// File descriptors a hub needs beside its connections: the store (writer, reader,
/// WAL, shm), the broker, logs, signals, the runtime.
const FD_HEADROOM: u64 = 64;

/// Raises the soft open-file limit toward `hub.max_connections` plus headroom when
/// the hard limit allows; warns when it cannot (the unit's `LimitNOFILE` sets it).
fn check_open_files(max_connections: usize) {
    let need = max_connections as u64 + FD_HEADROOM;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a live, properly typed out-parameter.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= need {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: need.min(lim.rlim_max),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit reads a properly typed value; raising the soft limit up to the
    // hard one needs no privilege (the unit's seccomp filter may refuse it: then warn).
    let ok = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0;
    let now = if ok { raised.rlim_cur } else { lim.rlim_cur };
    if now < need {
        warn!(
            open_files = now,
            max_connections,
            "the open-file limit is below hub.max_connections plus {FD_HEADROOM}: raise LimitNOFILE or lower hub.max_connections"
        );
    }
}

async fn run_async(cfg: Config) -> anyhow::Result<()> {
    let policy = cfg.policy();
    // Open (and migrate) the store before anything else, so a bad store stops us here.
    let store = Store::open(&cfg.node.store, &cfg.node.id)?;
    // One daemon per store; `status` and `restore` look for this lock.
    let _lock = crate::lock::acquire(&cfg.node.store)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            info!("shutdown requested");
            stop.store(true, Ordering::Relaxed);
            let _ = stop_tx.send(true);
        });
    }
    // Before READY: a reload right after start must not end the process.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut hub_state = None;
    let mut tasks = Vec::new();
    if let Some(hub) = &cfg.hub {
        let children = crate::hub::children_of(hub).map_err(|e| anyhow::anyhow!(e))?;
        let previous = crate::hub::previous_tokens_of(hub).map_err(|e| anyhow::anyhow!(e))?;
        let serving = crate::hub::ServeOptions::from_config(hub)?;
        check_open_files(serving.max_connections);
        let state = Arc::new(
            HubState::new(
                &cfg.node.store,
                policy.clone(),
                children,
                hub.max_message_bytes,
            )?
            .with_serving(serving),
        );
        state.set_previous_tokens(previous);
        hub_state = Some(state.clone());
        let listener = tokio::net::TcpListener::bind(&hub.listen).await?;
        let s = state.serving();
        info!(node = %cfg.node.id, listen = %listener.local_addr()?, children = hub.children.len(),
              https = s.tls.is_some(), pin_sha256 = s.tls.as_ref().and_then(|t| t.pin()).unwrap_or_default(),
              max_connections = s.max_connections, max_concurrent_requests = s.max_concurrent_requests,
              "serving children");
        if cfg.mqtt.is_some() {
            let settings = cfg.mqtt_settings().map_err(|e| anyhow::anyhow!(e))?;
            info!(node = %cfg.node.id, broker = %settings.host, "serving children through MQTT too");
            tasks.push(tokio::spawn(tracing::Instrument::in_current_span(
                crate::hub::serve_mqtt(state.clone(), settings, stop_rx.clone()),
            )));
        }
        let mut rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            crate::hub::serve(listener, state, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .map_err(anyhow::Error::from)
        }));
    }
    if let Some(m) = &cfg.metrics {
        let listener = tokio::net::TcpListener::bind(&m.listen).await?;
        info!(node = %cfg.node.id, listen = %listener.local_addr()?, token = m.token_sha256.is_some(), "serving /metrics");
        let own = Store::open(&cfg.node.store, &cfg.node.id)?;
        let token = m.token_sha256.clone();
        let hub = hub_state.clone();
        let mut rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            crate::metrics::serve(listener, own, token.as_deref(), hub, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .map_err(anyhow::Error::from)
        }));
    }
    if cfg.parent.is_some() {
        let rx = stop_rx.clone();
        tasks.push(tokio::spawn(tracing::Instrument::in_current_span(
            sync_loop(store, policy, cfg.clone(), stop.clone(), rx),
        )));
    } else if cfg.emr.kind != crate::config::EmrKind::Embedded {
        // The root hub's own EMR (the central OpenMRS): the metadata authority and
        // the place every clinic's records land. No parent, so no sync round: capture
        // and apply on the sync interval.
        let rx = stop_rx.clone();
        tasks.push(tokio::spawn(tracing::Instrument::in_current_span(
            root_emr_loop(store, policy, cfg.clone(), rx),
        )));
    } else {
        drop(store);
    }
    tokio::spawn(tracing::Instrument::in_current_span(reload_on_hangup(
        hangup,
        cfg.path.clone(),
        hub_state,
    )));
    info!(node = %cfg.node.id, role = cfg.role(), "clinicsync running");
    // The store is open and the listeners are bound: tell systemd (Type=notify).
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("running"),
        ],
    );
    let stall_ms = cfg
        .sync
        .timeout_secs
        .saturating_mul(2000)
        .saturating_add(60_000);
    let wd = tokio::spawn(watchdog(stall_ms));
    // Every task ends on its own when asked to stop, except one blocked in an exchange
    // with a silent parent or EMR: it gets STOP_GRACE, then the process leaves it
    // behind. That is safe at any point: every state change is one transaction, and
    // nothing is acknowledged before it is committed.
    let mut rx = stop_rx.clone();
    let all = async {
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    };
    tokio::pin!(all);
    tokio::select! {
        r = &mut all => r?,
        _ = async {
            let _ = rx.wait_for(|s| *s).await;
            tokio::time::sleep(STOP_GRACE).await;
        } => {
            warn!(node = %cfg.node.id, grace_s = STOP_GRACE.as_secs(), "an exchange was still in flight at shutdown; leaving it (nothing uncommitted is lost)");
        }
    }
    wd.abort();
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    info!(node = %cfg.node.id, "stopped");
    Ok(())
}

/// A root hub with an external EMR: every `sync.interval_secs`, capture what changed
/// in it (metadata and clinical records written at the centre) and write into it what
/// the children pushed. Errors are the EMR's link state (`status`), never fatal.
async fn root_emr_loop(
    store: Store,
    policy: Policy,
    cfg: Config,
    mut stop_rx: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut emr = cfg
        .emr_adapter()
        .map_err(|e| anyhow::anyhow!(e))?
        .ok_or_else(|| anyhow::anyhow!("[emr] has no adapter"))?;
    crate::emr::flow::prepare_emr(&store, emr.as_mut())?;
    let mut store = store;
    let interval = Duration::from_secs(cfg.sync.interval_secs);
    loop {
        let p = policy.clone();
        let (s, e, report) = tokio::task::spawn_blocking(move || {
            let mut report = EmrReport::default();
            emr_step(&mut store, &p, emr.as_mut(), true, &mut report);
            emr_step(&mut store, &p, emr.as_mut(), false, &mut report);
            (store, emr, report)
        })
        .await?;
        store = s;
        emr = e;
        if report.error.is_none() {
            let capture = report.capture.as_ref().map(|c| c.captured).unwrap_or(0);
            let apply = report
                .apply
                .as_ref()
                .map(|a| a.applied.applied)
                .unwrap_or(0);
            if capture + apply > 0 {
                info!(node = %cfg.node.id, peer = "emr", captured = capture, applied = apply, "EMR round");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop_rx.wait_for(|s| *s) => break,
        }
    }
    Ok(())
}

fn backoff(cfg: &SyncSection) -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(cfg.backoff_min_secs))
        .with_max_delay(Duration::from_secs(cfg.backoff_max_secs))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

async fn sync_loop(
    store: Store,
    policy: Policy,
    cfg: Config,
    stop: Arc<AtomicBool>,
    mut stop_rx: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let shared = Arc::new((policy, cfg.sync.clone(), cfg.clone()));
    let mut store = Some(store);
    let mut emr = Some(cfg.emr_adapter().map_err(|e| anyhow::anyhow!(e))?);
    if let (Some(Some(e)), Some(s)) = (emr.as_mut(), store.as_ref()) {
        crate::emr::flow::prepare_emr(s, e.as_mut())?;
    }
    let mut link: Option<Arc<ParentLink>> = None;
    let mut delays = backoff(&cfg.sync);
    let interval = Duration::from_secs(cfg.sync.interval_secs);
    while !stop.load(Ordering::Relaxed) {
        if link.is_none() {
            let c = cfg.clone();
            match tokio::task::spawn_blocking(move || connect_parent(&c)).await? {
                Ok(l) => link = Some(Arc::new(l)),
                Err(e) => {
                    let d = delays
                        .next()
                        .unwrap_or(Duration::from_secs(cfg.sync.backoff_max_secs));
                    warn!(node = %cfg.node.id, peer = PARENT, error = %e, retry_in_s = d.as_secs(), "cannot connect to the parent");
                    if let Some(s) = store.as_mut() {
                        let mut tx = s.begin()?;
                        tx.note_peer(PARENT, PeerEvent::Error(&e), wall_ms())?;
                        tx.commit()?;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = stop_rx.wait_for(|s| *s) => break,
                    }
                    continue;
                }
            }
        }
        let Some(l) = link.clone() else { continue };
        let mut s = store.take().ok_or_else(|| anyhow::anyhow!("store lost"))?;
        let (sh, st, l2) = (shared.clone(), stop.clone(), l.clone());
        let mut e = emr
            .take()
            .ok_or_else(|| anyhow::anyhow!("EMR adapter lost"))?;
        let (s, e, result) = tokio::task::spawn_blocking(move || {
            let r = round(
                &mut s,
                &sh.0,
                l2.exchange.as_ref(),
                &sh.1,
                e.as_deref_mut(),
                &st,
            )
            .map(|(r, _)| r);
            (s, e, r)
        })
        .await?;
        store = Some(s);
        emr = Some(e);
        let delay = match result {
            Ok(r) if r.interrupted.is_some() => {
                delays = backoff(&cfg.sync);
                let why = r.interrupted.as_deref().unwrap_or_default();
                let status = format!(
                    "syncing on a bad link: pushed {}, pulled {}, then: {why}",
                    r.pushed.cleared, r.pulled
                );
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]);
                info!(node = %shared.0.node_id, pushed = r.pushed.cleared, pulled = r.pulled, error = %why, "sync round cut after progress; going on");
                Duration::from_secs(cfg.sync.backoff_min_secs)
            }
            Ok(r) => {
                delays = backoff(&cfg.sync);
                let status = format!(
                    "last sync ok: pushed {}, pulled {}",
                    r.pushed.sent, r.pulled
                );
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]);
                if r.pushed.sent + r.pulled > 0 {
                    info!(node = %shared.0.node_id, pushed = r.pushed.sent, pulled = r.pulled, ms = r.elapsed_ms, "sync round done");
                }
                interval
            }
            Err(e) => {
                let d = delays
                    .next()
                    .unwrap_or(Duration::from_secs(cfg.sync.backoff_max_secs));
                if matches!(
                    e,
                    SyncError::Transport(TransportError::Status {
                        status: 401 | 403,
                        ..
                    })
                ) {
                    // The credential was refused: the next round connects again and
                    // so re-reads the token file (a rotated token installed at the
                    // clinic takes effect without a restart).
                    link = None;
                    info!(node = %shared.0.node_id, peer = PARENT, "credential refused: the token file is read again before the next round");
                }
                warn!(node = %shared.0.node_id, peer = PARENT, error = %e, retry_in_s = d.as_secs(), "sync failed");
                // systemd's status line follows failures too (`systemctl status`).
                let status = format!("sync failing (retry in {} s): {e}", d.as_secs());
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]);
                d
            }
        };
        // For `status`: when the next attempt is due (the current backoff).
        if let Some(st) = store.as_mut() {
            if let Ok(mut tx) = st.begin() {
                let _ = tx.set_meta(&meta::NEXT_SYNC_MS, wall_ms() + delay.as_millis() as u64);
                let _ = tx.commit();
            }
        }
        let wake = l.wake.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = async { match &wake { Some(w) => w.notified().await, None => std::future::pending().await } } => {
                info!(node = %shared.0.node_id, peer = PARENT, "woken by the parent");
            }
            _ = stop_rx.wait_for(|s| *s) => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_log_line_carries_no_escape_sequence_from_a_peer() {
        let line = b"WARN skipping a feed entry entry=http://emr/ws/rest/v1/patient/p-\x1b[31mred\xe2\x80\xae\n";
        let out = super::safe_log(line);
        assert!(
            !out.contains('\u{1b}') && !out.contains('\u{202e}'),
            "{out:?}"
        );
        assert!(
            out.contains("\\x1b[31mred") && out.ends_with('\n'),
            "{out:?}"
        );
    }
}
