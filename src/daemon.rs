//! The running node: tokio wiring, the sync schedule, shutdown, logging.
//!
//! - A node with `[hub]` serves its children ([`crate::hub::serve`]).
//! - A node with `[parent]` runs a round ([`crate::client`]) every `sync.interval_secs`; after a
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use tracing::{info, warn};

use crate::client::{
    connect_parent, emr_step, round_with, EmrReport, Env, Heartbeat, ParentLink, SyncError,
};
use crate::config::{Config, SyncSection};
use crate::engine::{Policy, PARENT};
use crate::error::Classify;
use crate::hub::HubState;
use crate::store::{meta, PeerEvent, Store};
use crate::time::wall_ms;
use crate::transport::http::TransportError;

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
    let result = rt.block_on(
        async move {
            let listeners = Listeners::bind(&cfg).await?;
            serve(cfg, listeners, shutdown_signal()).await
        }
        .instrument(span),
    );
    // A blocking exchange left behind at shutdown must not hold the process.
    rt.shutdown_timeout(Duration::from_millis(200));
    result
}

/// How long a stopping daemon waits for an exchange in flight (well inside systemd's
/// `TimeoutStopSec`).
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Pings the systemd watchdog (when `WatchdogSec=` is set) while the node is healthy:
/// idle between rounds, or syncing with a batch finished within `stall_ms`. A sync
/// stuck longer than that stops the pings, and systemd restarts the service.
async fn watchdog(heartbeat: Arc<Heartbeat>, stall_ms: u64) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_micros(usec / 2));
    loop {
        tick.tick().await;
        if heartbeat.stalled(wall_ms(), stall_ms) {
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

/// The sockets a node serves on, bound before it starts: by [`Listeners::bind`] from
/// the configuration, or by a test on `127.0.0.1:0`.
#[derive(Debug, Default)]
pub struct Listeners {
    pub hub: Option<tokio::net::TcpListener>,
    pub metrics: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// Binds `hub.listen` and `metrics.listen` where the configuration has them.
    pub async fn bind(cfg: &Config) -> anyhow::Result<Listeners> {
        let mut l = Listeners::default();
        if let Some(hub) = &cfg.hub {
            l.hub = Some(
                tokio::net::TcpListener::bind(&hub.listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("hub.listen {}: {e}", hub.listen))?,
            );
        }
        if let Some(m) = &cfg.metrics {
            l.metrics = Some(
                tokio::net::TcpListener::bind(&m.listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("metrics.listen {}: {e}", m.listen))?,
            );
        }
        Ok(l)
    }
}

/// A whole node until `shutdown` completes: the hub on its listener (HTTP, and MQTT
/// when configured), `/metrics`, the sync schedule with the parent or the root's EMR
/// loop, SIGHUP reloads, systemd notifications and the watchdog. Takes its sockets
/// and its stop signal as arguments, so tests run a node in-process.
pub async fn serve(
    cfg: Config,
    mut listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let policy = cfg.policy();
    // Open (and migrate) the store before anything else, so a bad store stops us here.
    let created = !cfg.node.store.exists();
    let store = cfg.open_store()?;
    if created {
        // A first start (or a wiped box); in the journal, so a mistyped node.store
        // is found there.
        info!(store = %cfg.node.store.display(), "no store was at node.store: created a new one");
    }
    // Every counter, clock and cursor read as its type before the lock is taken (and
    // an earlier stop's note removed): a daemon must not start, or hide that note,
    // on a store a round would find corrupt later.
    store.check_values()?;
    // One daemon per store; `status` and `restore` look for this lock.
    let _lock = crate::lock::acquire(&cfg.node.store)?;
    let stop = Arc::new(AtomicBool::new(false));
    let heartbeat = Arc::new(Heartbeat::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    {
        let (stop, stop_tx) = (stop.clone(), stop_tx.clone());
        tokio::spawn(async move {
            shutdown.await;
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
        {
            // A request that met a damaged store stops the node: children are told
            // the hub cannot serve (503), and `run` exits 10 below.
            let (state, stop, stop_tx) = (state.clone(), stop.clone(), stop_tx.clone());
            tokio::spawn(async move {
                state.corrupted().await;
                stop.store(true, Ordering::Relaxed);
                let _ = stop_tx.send(true);
            });
        }
        let listener = listeners
            .hub
            .take()
            .ok_or_else(|| anyhow::anyhow!("[hub] is configured but no listener was given"))?;
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
        let listener = listeners
            .metrics
            .take()
            .ok_or_else(|| anyhow::anyhow!("[metrics] is configured but no listener was given"))?;
        info!(node = %cfg.node.id, listen = %listener.local_addr()?, token = m.token_sha256.is_some(), "serving /metrics");
        let own = cfg.open_store()?;
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
            sync_loop(
                store,
                policy,
                cfg.clone(),
                stop.clone(),
                rx,
                heartbeat.clone(),
            ),
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
        hub_state.clone(),
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
    let wd = tokio::spawn(watchdog(heartbeat, stall_ms));
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
    if let Some(corrupt) = hub_state.as_ref().and_then(|h| h.corruption()) {
        let status = format!("stopped: {corrupt}");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]);
        return Err(anyhow::Error::new(corrupt));
    }
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
            emr_step(&mut store, &p, emr.as_mut(), true, &mut report, wall_ms());
            emr_step(&mut store, &p, emr.as_mut(), false, &mut report, wall_ms());
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
    heartbeat: Arc<Heartbeat>,
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
        let (sh, st, l2, hb) = (shared.clone(), stop.clone(), l.clone(), heartbeat.clone());
        let mut e = emr
            .take()
            .ok_or_else(|| anyhow::anyhow!("EMR adapter lost"))?;
        let (s, e, result) = tokio::task::spawn_blocking(move || {
            let env = Env {
                heartbeat: Some(&hb),
                ..Env::wall()
            };
            let r = round_with(
                &mut s,
                &sh.0,
                l2.exchange.as_ref(),
                &sh.1,
                e.as_deref_mut(),
                &st,
                &env,
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
            Err(e) if e.is_corruption() => {
                // Stored or signed data is not what was written: going on would sync
                // damage to the parent or lose more. Stop, say what is corrupt, and let
                // `run` exit 10 (systemd does not restart it: RestartPreventExitStatus).
                tracing::error!(node = %shared.0.node_id, error = %e, "the store is corrupt: stopping; see README, Runbook, \"Backup and restore\"");
                let status = format!("stopped: store corrupt: {e}");
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]);
                return Err(anyhow::Error::new(e));
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
