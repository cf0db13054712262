//! The hub on the internet (issue #11, "trust boundary"): what a request may cost
//! before and after its credential, connection and time limits, the decoding cap with
//! 503 + Retry-After, HTTPS with a private CA and a pinned key, and reloading the
//! children and the certificate on SIGHUP. Everything runs on 127.0.0.1 with small
//! limits from the configuration, bounded in count and time.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clinicsync::hub::{self, HubState, ServeOptions};
use clinicsync::secret::Secret;
use clinicsync::store::Store;
use clinicsync::tls::{self, TlsProblem};
use clinicsync::transport::http::{HttpClient, TransportError};
use clinicsync::wire::{self, Cursor, Message, PullRequest};
use common::{patient, TestClinic, BIN};

// ---------------------------------------------------------------- helpers

/// The binary the process tests run: this build, or `CLINICSYNC_BIN` (e.g. an older
/// release, to watch these tests fail against it).
fn bin() -> String {
    std::env::var("CLINICSYNC_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// A `clinicsync run` hub process (killed on drop), logging to `<dir>/hub.log`.
struct HubProc {
    child: Child,
    log: PathBuf,
    config: PathBuf,
}

impl HubProc {
    /// Starts the binary on `config`, with `RLIMIT_NOFILE` set to `nofile` if given.
    fn spawn(config: &Path, nofile: Option<u64>) -> HubProc {
        let log = config.with_extension("log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("--config")
            .arg(config)
            .arg("run")
            .env_remove("JOURNAL_STREAM")
            .env("CLINICSYNC_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe; it runs in the forked child only.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        HubProc {
            child: cmd.spawn().unwrap(),
            log,
            config: config.to_path_buf(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle` `count` times.
    fn wait_log(&self, needle: &str, count: usize) -> bool {
        wait_until(Duration::from_secs(15), || {
            self.log_text().matches(needle).count() >= count
        })
    }

    /// Peak resident set (VmHWM) in KiB.
    fn peak_rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dir/name`, created.
fn sub(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// A child of the test hub: its id and credential.
struct Cred {
    node: String,
    token: String,
}

fn cred(node: &str) -> Cred {
    Cred {
        node: node.into(),
        token: clinicsync::auth::new_token(),
    }
}

/// A hub configuration with `children`; `extra` goes into `[hub]`.
fn hub_toml(dir: &Path, port: u16, children: &[&Cred], extra: &str) -> String {
    let mut t = format!(
        "[node]\nid = \"hub\"\nstore = \"{}\"\n\n[hub]\nlisten = \"127.0.0.1:{port}\"\n{extra}\n",
        dir.join("hub.db").display()
    );
    for c in children {
        t.push_str(&format!(
            "\n[[hub.children]]\nnode = \"{}\"\ntoken_sha256 = \"{}\"\n",
            c.node,
            clinicsync::auth::token_hash(&c.token)
        ));
    }
    t
}

fn start_hub(dir: &Path, children: &[&Cred], extra: &str, nofile: Option<u64>) -> (HubProc, u16) {
    let port = clinicsync::devkit::cluster::free_port().unwrap();
    let config = dir.join("hub.toml");
    std::fs::write(&config, hub_toml(dir, port, children, extra)).unwrap();
    let hub = HubProc::spawn(&config, nofile);
    (hub, port)
}

fn wait_healthy(port: u16) {
    clinicsync::devkit::cluster::wait_healthy(
        &format!("http://127.0.0.1:{port}"),
        Duration::from_secs(20),
    )
    .unwrap();
}

/// Sends raw bytes and reads the answer until the server closes (or 10 s).
fn raw(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn pull_request(node: &str) -> Message {
    Message::PullRequest(PullRequest {
        node: node.into(),
        cursor: Cursor { eff: 0, seq: 0 },
        max_bytes: 1 << 20,
        max_records: 100,
        include_own: false,
        answer_chunk: 0,
        health: Vec::new(),
        order_results: Vec::new(),
    })
}

/// A hub served in-process (for limits set directly and for TLS reloads by call).
struct InProcHub {
    url: String,
    port: u16,
    state: Arc<HubState>,
    rt: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl InProcHub {
    fn start(dir: &Path, children: &[&Cred], serving: ServeOptions) -> InProcHub {
        let hashed = children
            .iter()
            .map(|c| {
                let mut h = [0u8; 32];
                hex::decode_to_slice(clinicsync::auth::token_hash(&c.token), &mut h).unwrap();
                (c.node.clone(), h)
            })
            .collect();
        let https = serving.tls.is_some();
        let state = Arc::new(
            HubState::new(
                &dir.join("hub.db"),
                common::hub_policy(&[]),
                hashed,
                16 << 20,
            )
            .unwrap()
            .with_serving(serving),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(hub::serve(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        InProcHub {
            url: format!(
                "{}://127.0.0.1:{port}",
                if https { "https" } else { "http" }
            ),
            port,
            state,
            rt: Some(rt),
            stop: Some(tx),
        }
    }
}

impl Drop for InProcHub {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

// ---------------------------------------------------------------- (a) credential first

#[test]
fn unauthenticated_bodies_are_refused_unread_and_the_hub_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let a = cred("a");
    // Default limits: max_message_bytes is 16 MiB, as in the attack.
    let (hub, port) = start_hub(dir.path(), &[&a], "", None);
    wait_healthy(port);
    const BODY: usize = 16 << 20;
    let attackers: Vec<_> = (0..64)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                let head = format!(
                    "POST /v1/push HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer not-a-token\r\nContent-Type: {}\r\nContent-Length: {BODY}\r\n\r\n",
                    wire::CONTENT_TYPE
                );
                s.write_all(head.as_bytes()).unwrap();
                // Blast the body from another thread while this one reads the answer.
                let mut w = s.try_clone().unwrap();
                let writer = std::thread::spawn(move || {
                    let piece = vec![0x42u8; 64 << 10];
                    let mut sent = 0;
                    while sent < BODY {
                        match w.write(&piece) {
                            Ok(n) if n > 0 => sent += n,
                            _ => break,
                        }
                    }
                    sent
                });
                let mut answer = Vec::new();
                let _ = s.read_to_end(&mut answer);
                let sent = writer.join().unwrap();
                (String::from_utf8_lossy(&answer).into_owned(), sent)
            })
        })
        .collect();
    let results: Vec<(String, usize)> = attackers.into_iter().map(|t| t.join().unwrap()).collect();
    let peak_mib = hub.peak_rss_kb() / 1024;
    eprintln!("hub peak RSS {peak_mib} MiB after 64 unauthenticated 16 MiB bodies");
    assert!(
        peak_mib < 200,
        "hub peak RSS {peak_mib} MiB under 64 unauthenticated 16 MiB bodies"
    );
    for (answer, sent) in results {
        assert!(answer.starts_with("HTTP/1.1 401"), "answer: {answer:?}");
        assert!(sent < BODY, "the hub read a whole unauthenticated body");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    // A declared length over the limit is refused before reading, credential or not.
    let answer = raw(
        port,
        format!(
            "POST /v1/push HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
            a.token,
            (16 << 20) + 1
        )
        .as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("hub.max_message_bytes"), "{answer}");
    // The hub still serves its child.
    let mut clinic = TestClinic::new(
        &sub(dir.path(), "a"),
        "a",
        &format!("http://127.0.0.1:{port}"),
        &a.token,
    );
    clinic.put(vec![patient("p1", "North")]);
    clinic.sync().unwrap();
}

// ---------------------------------------------------------------- (b) timeouts

/// How long until the server closes `s` (read gives 0 or an error), sending one byte
/// of `drip` a second meanwhile; `None` if still open after `limit`.
fn closed_after(s: &mut TcpStream, drip: &[u8], limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut i = 0;
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        if !drip.is_empty() && s.write_all(&drip[i % drip.len()..][..1]).is_err() {
            return Some(t0.elapsed());
        }
        i += 1;
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(t0.elapsed()),
        }
    }
    None
}

#[test]
fn slow_headers_idle_connections_and_slow_bodies_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let a = cred("a");
    let (_hub, port) = start_hub(
        dir.path(),
        &[&a],
        "header_timeout_secs = 2\nidle_timeout_secs = 3\nbody_timeout_secs = 2",
        None,
    );
    wait_healthy(port);

    // Slowloris: headers one byte a second never finish.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"POST /v1/push HTTP/1.1\r\n").unwrap();
    let cut = closed_after(
        &mut s,
        b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaa",
        Duration::from_secs(12),
    );
    let cut = cut.expect("a slowloris connection was never closed");
    assert!(
        cut < Duration::from_secs(5),
        "slowloris closed only after {cut:?}"
    );

    // A kept-alive connection with nothing moving is closed after the idle timeout.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: hub\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 1024];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let idle =
        closed_after(&mut s, b"", Duration::from_secs(12)).expect("idle connection kept open");
    assert!(
        idle >= Duration::from_millis(2500) && idle < Duration::from_secs(6),
        "idle closed after {idle:?}"
    );

    // A body that stops arriving gets 408 after the body timeout.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t0 = Instant::now();
    s.write_all(
        format!(
            "POST /v1/push HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {}\r\nContent-Length: 1000\r\n\r\n0123456789",
            a.token
        )
        .as_bytes(),
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("hub.body_timeout_secs"), "{answer}");
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
}

// ---------------------------------------------------------------- (c) connection cap

#[test]
fn idle_sockets_beyond_the_connection_cap_do_not_lock_clinics_out() {
    let dir = tempfile::tempdir().unwrap();
    let a = cred("a");
    // 64 open files for the whole process, 16 of them for connections: without the
    // cap, 60 idle sockets exhaust the descriptors and nothing is ever served again.
    let (hub, port) = start_hub(
        dir.path(),
        &[&a],
        "max_connections = 16\nheader_timeout_secs = 1\nidle_timeout_secs = 5",
        Some(64),
    );
    wait_healthy(port);
    let baseline = hub.open_fds();
    let idle: Vec<TcpStream> = (0..60)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // 16 connections, and a little slack for the runtime's own descriptors.
    assert!(
        hub.open_fds() <= baseline + 16 + 4,
        "{} descriptors open with a cap of 16 (baseline {baseline})",
        hub.open_fds()
    );
    let mut clinic = TestClinic::new(
        &sub(dir.path(), "a"),
        "a",
        &format!("http://127.0.0.1:{port}"),
        &a.token,
    );
    clinic.client = HttpClient::new(
        &format!("http://127.0.0.1:{port}"),
        Secret::new(a.token.clone()),
        Duration::from_secs(30),
    );
    clinic.put(vec![patient("served", "North")]);
    let t0 = Instant::now();
    let report = clinic.sync().expect("the clinic was locked out");
    assert_eq!(report.pushed.accepted, 1);
    eprintln!(
        "clinic served after {:?} behind 60 idle sockets",
        t0.elapsed()
    );
    // The idle sockets were closed by the hub, not left to hold its descriptors.
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 16];
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    }
    let h = Store::open_existing(&dir.path().join("hub.db")).unwrap();
    assert!(common::get(&h, "Patient/served").is_some());
    assert!(
        hub.log_text().contains("connection cap reached"),
        "{}",
        hub.log_text()
    );
}

// ---------------------------------------------------------------- (d) request slots

#[test]
fn a_busy_hub_answers_503_with_retry_after_and_the_client_waits_then_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let a = cred("a");
    let hub = InProcHub::start(
        dir.path(),
        &[&a],
        ServeOptions {
            max_concurrent_requests: 1,
            ..ServeOptions::default()
        },
    );
    // A request in flight holds the only slot.
    let in_flight = hub.state.try_request_slot().unwrap();
    let frame = wire::encode(&pull_request("a")).unwrap();
    // The MQTT path goes through the same slots.
    let refused = hub.state.answer_limited("a", &frame, None).unwrap_err();
    assert_eq!(refused.status, 503, "{refused:?}");
    let mut req = format!(
        "POST /v1/pull HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        a.token,
        wire::CONTENT_TYPE,
        frame.len()
    )
    .into_bytes();
    req.extend_from_slice(&frame);
    let answer = raw(hub.port, &req);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{answer}"
    );
    // The slot frees after 1.5 s; the client waits as asked and gets its answer.
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        drop(in_flight);
    });
    let client = HttpClient::new(
        &hub.url,
        Secret::new(a.token.clone()),
        Duration::from_secs(20),
    );
    let t0 = Instant::now();
    let (answer, _) = client.exchange("/v1/pull", &pull_request("a")).unwrap();
    assert!(matches!(answer, Message::PullResponse(_)), "{answer:?}");
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "answered after {:?}",
        t0.elapsed()
    );
    release.join().unwrap();
    // With the slot held past the exchange timeout the client gives up, retryably,
    // carrying the delay the hub asked for.
    let _held = hub.state.try_request_slot().unwrap();
    let impatient = HttpClient::new(
        &hub.url,
        Secret::new(a.token.clone()),
        Duration::from_secs(3),
    );
    let err = impatient
        .exchange("/v1/pull", &pull_request("a"))
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(1)), "{err}");
}

// ---------------------------------------------------------------- TLS

struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "clinicsync test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca,
            ca_key,
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A hub certificate for `names`, signed by the CA, written as `<name>.crt/.key`;
    /// returns (cert path, key path, pin).
    fn issue(&self, name: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf, [u8; 32]) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k, tls::spki_sha256(cert.der()).unwrap())
    }
}

fn tls_serving(cert: &Path, key: &Path) -> ServeOptions {
    ServeOptions {
        tls: Some(tls::ServerTls::load(cert, key).unwrap()),
        ..ServeOptions::default()
    }
}

fn tls_client(url: &str, token: &str, ca: Option<&Path>, pin: Option<[u8; 32]>) -> HttpClient {
    let config = if ca.is_none() && pin.is_none() {
        None
    } else {
        Some(tls::client_config(ca, pin.as_slice()).unwrap())
    };
    HttpClient::with_tls(
        url,
        Secret::new(token.into()),
        Duration::from_secs(10),
        config,
    )
}

fn tls_problem(
    r: Result<(Message, clinicsync::transport::http::Traffic), TransportError>,
) -> TlsProblem {
    match r {
        Err(TransportError::Tls { problem, .. }) => problem,
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[test]
fn a_clinic_syncs_with_an_https_hub_signed_by_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (cert, key, pin) = pki.issue("hub", &["127.0.0.1", "localhost"], false);
    let a = cred("a");
    let hub = InProcHub::start(dir.path(), &[&a], tls_serving(&cert, &key));
    let mut clinic = TestClinic::new(&sub(dir.path(), "a"), "a", &hub.url, &a.token);
    clinic.client = tls_client(&hub.url, &a.token, Some(&pki.ca_file()), Some(pin));
    clinic.put(vec![patient("over-tls", "North")]);
    let report = clinic.sync().unwrap();
    assert_eq!(report.pushed.accepted, 1);
    let h = Store::open_existing(&dir.path().join("hub.db")).unwrap();
    assert!(common::get(&h, "Patient/over-tls").is_some());
    // The pin as openssl prints it is what the hub logs and the client accepts.
    assert_eq!(
        hub.state.serving().tls.as_ref().unwrap().pin(),
        Some(tls::pin_text(&pin))
    );

    // A list of pins (the current key and the next, during a rotation) accepts either.
    let rotating = HttpClient::with_tls(
        &hub.url,
        Secret::new(a.token.clone()),
        Duration::from_secs(10),
        Some(tls::client_config(Some(&pki.ca_file()), &[[7u8; 32], pin]).unwrap()),
    );
    rotating.exchange("/v1/pull", &pull_request("a")).unwrap();

    // No ca_file: the public roots do not know the private CA.
    let plain_roots = tls_client(&hub.url, &a.token, None, None);
    let err = plain_roots.exchange("/v1/pull", &pull_request("a"));
    assert_eq!(tls_problem(err), TlsProblem::UnknownIssuer);
    let text = plain_roots
        .exchange("/v1/pull", &pull_request("a"))
        .unwrap_err()
        .to_string();
    assert!(text.contains("set parent.ca_file"), "{text}");

    // A wrong pin is refused even though the chain is valid.
    let wrong = tls_client(&hub.url, &a.token, Some(&pki.ca_file()), Some([7u8; 32]));
    match tls_problem(wrong.exchange("/v1/pull", &pull_request("a"))) {
        TlsProblem::PinMismatch { presented } => assert_eq!(presented, tls::pin_text(&pin)),
        other => panic!("{other:?}"),
    }

    // Plain HTTP to the HTTPS port: told so in plain HTTP.
    let http = HttpClient::new(
        &format!("http://127.0.0.1:{}", hub.port),
        Secret::new(a.token.clone()),
        Duration::from_secs(10),
    );
    let err = http
        .exchange("/v1/pull", &pull_request("a"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("serves HTTPS"), "{err}");

    // doctor explains the missing CA in words.
    let out = common::cli(&clinic.config, &["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("not signed by a CA this node trusts"),
        "{text}"
    );
    assert!(text.contains("set parent.ca_file"), "{text}");
}

#[test]
fn certificate_problems_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = cred("a");
    // A certificate for another name.
    let (cert, key, _) = pki.issue("other", &["hub.example.org"], false);
    let hub = InProcHub::start(dir.path(), &[&a], tls_serving(&cert, &key));
    let c = tls_client(&hub.url, &a.token, Some(&pki.ca_file()), None);
    assert_eq!(
        tls_problem(c.exchange("/v1/pull", &pull_request("a"))),
        TlsProblem::NameMismatch
    );
    drop(hub);
    // An expired certificate.
    let (cert, key, _) = pki.issue("old", &["127.0.0.1"], true);
    let sub = dir.path().join("expired");
    std::fs::create_dir_all(&sub).unwrap();
    let hub = InProcHub::start(&sub, &[&a], tls_serving(&cert, &key));
    let c = tls_client(&hub.url, &a.token, Some(&pki.ca_file()), None);
    assert_eq!(
        tls_problem(c.exchange("/v1/pull", &pull_request("a"))),
        TlsProblem::Expired
    );
    // A plain-HTTP hub behind an https:// URL.
    let sub = dir.path().join("plain");
    std::fs::create_dir_all(&sub).unwrap();
    let hub = InProcHub::start(&sub, &[&a], ServeOptions::default());
    let url = format!("https://127.0.0.1:{}", hub.port);
    let c = tls_client(&url, &a.token, Some(&pki.ca_file()), None);
    let problem = tls_problem(c.exchange("/v1/pull", &pull_request("a")));
    assert_eq!(problem, TlsProblem::NotTls);
    assert!(problem.hint().contains("http://"), "{}", problem.hint());
    // The CA's own certificate served as the hub's (one `openssl req -x509` cert for
    // both): named in words, not as a library's error code.
    let sub = dir.path().join("ca-as-server");
    std::fs::create_dir_all(&sub).unwrap();
    let ca_key = sub.join("ca.key");
    std::fs::write(&ca_key, pki.ca_key.serialize_pem()).unwrap();
    let hub = InProcHub::start(&sub, &[&a], tls_serving(&pki.ca_file(), &ca_key));
    let c = tls_client(&hub.url, &a.token, Some(&pki.ca_file()), None);
    let problem = tls_problem(c.exchange("/v1/pull", &pull_request("a")));
    assert_eq!(problem, TlsProblem::CaAsServer);
    assert!(
        problem.to_string().contains("openssl req -x509"),
        "{problem}"
    );
}

#[test]
fn a_reloaded_certificate_is_served_to_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (cert, key, pin1) = pki.issue("hub", &["127.0.0.1"], false);
    let a = cred("a");
    let hub = InProcHub::start(dir.path(), &[&a], tls_serving(&cert, &key));
    let pinned = |pin| tls_client(&hub.url, &a.token, Some(&pki.ca_file()), Some(pin));
    pinned(pin1)
        .exchange("/v1/pull", &pull_request("a"))
        .unwrap();
    // Renewal: a new key and certificate written over the same files.
    let (cert2, key2, pin2) = pki.issue("renewed", &["127.0.0.1"], false);
    assert_ne!(pin1, pin2);
    std::fs::copy(&cert2, &cert).unwrap();
    std::fs::copy(&key2, &key).unwrap();
    let tls = hub.state.serving().tls.clone().unwrap();
    tls.reload().unwrap();
    pinned(pin2)
        .exchange("/v1/pull", &pull_request("a"))
        .unwrap();
    assert!(matches!(
        tls_problem(pinned(pin1).exchange("/v1/pull", &pull_request("a"))),
        TlsProblem::PinMismatch { .. }
    ));
    // A broken pair (key of another certificate) is refused and the old pair stays.
    let (_, other_key, _) = pki.issue("stray", &["127.0.0.1"], false);
    std::fs::copy(&other_key, &key).unwrap();
    let err = tls.reload().unwrap_err().to_string();
    assert!(err.contains("does not belong"), "{err}");
    pinned(pin2)
        .exchange("/v1/pull", &pull_request("a"))
        .unwrap();
}

// ---------------------------------------------------------------- SIGHUP

#[test]
fn sighup_reloads_children_and_certificate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (cert1, key1, pin1) = pki.issue("one", &["127.0.0.1"], false);
    let (cert2, key2, pin2) = pki.issue("two", &["127.0.0.1"], false);
    let tls_keys = |c: &Path, k: &Path| {
        format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
            c.display(),
            k.display()
        )
    };
    let (a, b) = (cred("a"), cred("b"));
    let (hub, port) = start_hub(dir.path(), &[&a], &tls_keys(&cert1, &key1), None);
    let url = format!("https://127.0.0.1:{port}");
    let client = |c: &Cred, pin| tls_client(&url, &c.token, Some(&pki.ca_file()), Some(pin));
    assert!(wait_until(Duration::from_secs(20), || client(&a, pin1)
        .health()
        .is_ok()));
    let clinic = |c: &Cred| {
        let mut t = TestClinic::new(&sub(dir.path(), &c.node), &c.node, &url, &c.token);
        t.client = tls_client(&url, &c.token, Some(&pki.ca_file()), None);
        t
    };
    let (mut ca, mut cb) = (clinic(&a), clinic(&b));
    ca.put(vec![patient("from-a", "North")]);
    cb.put(vec![patient("from-b", "South")]);
    ca.sync().unwrap();
    let refused = cb.sync().unwrap_err().to_string();
    assert!(refused.contains("401"), "{refused}");

    // An invalid file changes nothing.
    std::fs::write(
        &hub.config,
        "[node]\nid = \"hub\"\n[hub]\nlisten = \"nowhere\"\n",
    )
    .unwrap();
    hub.signal(libc::SIGHUP);
    assert!(
        hub.wait_log("configuration not reloaded", 1),
        "{}",
        hub.log_text()
    );
    ca.put(vec![patient("from-a-2", "North")]);
    ca.sync().unwrap();

    // a removed, b added, the certificate swapped: one SIGHUP, no restart.
    let pid = hub.pid();
    std::fs::write(
        &hub.config,
        hub_toml(dir.path(), port, &[&b], &tls_keys(&cert2, &key2)),
    )
    .unwrap();
    hub.signal(libc::SIGHUP);
    assert!(
        hub.wait_log("configuration reloaded", 1),
        "{}",
        hub.log_text()
    );
    ca.put(vec![patient("from-a-3", "North")]);
    let refused = ca.sync().unwrap_err().to_string();
    assert!(
        refused.contains("401"),
        "a removed child must be refused: {refused}"
    );
    cb.sync().unwrap();
    client(&b, pin2).health().unwrap();
    assert!(
        client(&b, pin1).health().is_err(),
        "the old certificate is still served"
    );
    assert_eq!(hub.pid(), pid);
    let h = Store::open_existing(&dir.path().join("hub.db")).unwrap();
    assert!(common::get(&h, "Patient/from-b").is_some());
    assert!(common::get(&h, "Patient/from-a-2").is_some());
    assert!(common::get(&h, "Patient/from-a-3").is_none());
}

// ---------------------------------------------------------------- shutdown

#[test]
fn shutdown_stops_accepting_and_lets_the_request_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let a = cred("a");
    let mut hub = InProcHub::start(dir.path(), &[&a], ServeOptions::default());
    let frame = wire::encode(&pull_request("a")).unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", hub.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /v1/pull HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        a.token,
        wire::CONTENT_TYPE,
        frame.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&frame[..frame.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let _ = hub.stop.take().unwrap().send(());
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect((
            "127.0.0.1",
            hub.port
        ))
        .is_err()),
        "still accepting after shutdown"
    );
    s.write_all(&frame[frame.len() / 2..]).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
