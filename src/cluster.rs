//! A local network of nodes on 127.0.0.1 as real processes: writes each node's
//! configuration and credentials, starts `clinicsync run`, waits for health, stops
//! with SIGTERM or kills with SIGKILL. Used by `demo`, `bench` and the scenario tests.
//! Credential files are written 0600, as a node requires of them ([`crate::filemode`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One node's files.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    pub id: String,
    pub config: PathBuf,
    pub store: PathBuf,
}

/// A hub and its clinics, configured but not started.
#[derive(Debug, Clone)]
pub struct Layout {
    pub hub: NodeFiles,
    pub clinics: Vec<NodeFiles>,
    pub hub_url: String,
    pub port: u16,
}

/// A port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Writes configs for a hub on `port` and one clinic per `(id, district)`; each
/// clinic's catchment is its district. `extra_hub` is appended to the hub's `[hub]`
/// section, `sync` replaces the clinics' `[sync]` section body.
pub fn write_layout(
    dir: &Path,
    port: u16,
    clinics: &[(&str, &str)],
    sync: &str,
    extra_hub: &str,
) -> std::io::Result<Layout> {
    std::fs::create_dir_all(dir)?;
    let hub_url = format!("http://127.0.0.1:{port}");
    let mut hub_toml = format!(
        "[node]\nid = \"hub\"\nstore = \"{}\"\nkeys_dir = \"{}\"\n\n[hub]\nlisten = \"127.0.0.1:{port}\"\n{extra_hub}\n",
        dir.join("hub.db").display(),
        dir.join("hub.keys").display()
    );
    let mut out = Vec::new();
    for (id, district) in clinics {
        let token = crate::auth::new_token();
        let token_file = dir.join(format!("{id}.token"));
        crate::filemode::write_private(&token_file, format!("{token}\n").as_bytes())?;
        hub_toml.push_str(&format!(
            "\n[[hub.children]]\nnode = \"{id}\"\ntoken_sha256 = \"{}\"\n\n[[hub.catchment]]\nnode = \"{id}\"\npath = \"address.district\"\nequals = \"{district}\"\n",
            crate::auth::token_hash(&token)
        ));
        let store = dir.join(format!("{id}.db"));
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "[node]\nid = \"{id}\"\nstore = \"{}\"\nkeys_dir = \"{}\"\n\n[parent]\nurl = \"{hub_url}\"\ntoken_file = \"{}\"\n\n[sync]\n{sync}\n",
                store.display(),
                dir.join(format!("{id}.keys")).display(),
                token_file.display()
            ),
        )?;
        out.push(NodeFiles {
            id: id.to_string(),
            config,
            store,
        });
    }
    let hub_config = dir.join("hub.toml");
    std::fs::write(&hub_config, hub_toml)?;
    Ok(Layout {
        hub: NodeFiles {
            id: "hub".into(),
            config: hub_config,
            store: dir.join("hub.db"),
        },
        clinics: out,
        hub_url,
        port,
    })
}

/// A running `clinicsync` process.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
}

impl Proc {
    /// Starts `exe --config <config> <args…>`, logging to `<config>.log`.
    pub fn spawn(exe: &Path, name: &str, config: &Path, args: &[&str]) -> std::io::Result<Proc> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(config.with_extension("log"))?;
        let child = Command::new(exe)
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    fn signal(&self, sig: i32) {
        if self.pid() > 0 {
            // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
            unsafe {
                libc::kill(self.pid(), sig);
            }
        }
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill9(&mut self) -> Exit {
        self.signal(libc::SIGKILL);
        self.reap()
    }

    /// SIGTERM, then waits.
    pub fn terminate(&mut self) -> Exit {
        self.signal(libc::SIGTERM);
        self.reap()
    }

    /// Waits for the process to end by itself.
    pub fn wait(&mut self) -> Exit {
        self.reap()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .map(|c| matches!(c.try_wait(), Ok(None)))
            .unwrap_or(false)
    }

    fn reap(&mut self) -> Exit {
        let Some(mut child) = self.child.take() else {
            return Exit::default();
        };
        Exit {
            code: child.wait().ok().and_then(|s| s.code()),
        }
    }

    /// Peak resident set size so far (VmHWM), in KiB, while the process runs.
    /// (wait4's ru_maxrss would also count the spawning process's image.)
    pub fn peak_rss_kb(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Exit {
    pub code: Option<i32>,
}

/// Waits until the hub answers its health check.
pub fn wait_healthy(url: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(2))
        .build();
    loop {
        if agent.get(&format!("{url}/v1/health")).call().is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{url} did not become healthy within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `cond` until true or the timeout passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// A real mosquitto broker on 127.0.0.1 for tests, demos and benchmarks: password
/// file, per-node ACLs (the layout in `transport::mqtt`), persistence on disk.
pub struct Broker {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// Writes the password file (with `mosquitto_passwd`), the ACL and the config;
    /// `hub` gets read/write on the whole tree, every other user its own topics.
    pub fn start(
        dir: &Path,
        port: u16,
        hub: &str,
        users: &[(&str, &str)],
    ) -> Result<Broker, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let pw = dir.join("passwords");
        let _ = std::fs::remove_file(&pw);
        for (i, (user, pass)) in users.iter().enumerate() {
            let mut cmd = Command::new("mosquitto_passwd");
            if i == 0 {
                cmd.arg("-c");
            }
            let out = cmd
                .arg("-b")
                .arg(&pw)
                .arg(user)
                .arg(pass)
                .output()
                .map_err(|e| format!("mosquitto_passwd: {e} (apt-get install mosquitto)"))?;
            if !out.status.success() {
                return Err(format!(
                    "mosquitto_passwd: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        let acl = dir.join("acl");
        std::fs::write(
            &acl,
            format!(
                "user {hub}\ntopic readwrite {p}/#\n\npattern write {p}/%u/up\npattern read {p}/%u/down\n",
                p = crate::transport::mqtt::PREFIX
            ),
        )
        .map_err(|e| e.to_string())?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "# As root, mosquitto would switch to the mosquitto user, who cannot read a 0700 test directory.\nuser root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\npersistence true\npersistence_location {}/\nlog_dest file {}\n",
                pw.display(),
                acl.display(),
                dir.display(),
                dir.join("mosquitto.log").display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let mut b = Broker {
            port,
            dir: dir.to_path_buf(),
            child: None,
        };
        b.restart()?;
        Ok(b)
    }

    /// Starts (again) with the same files: persisted sessions survive.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill9();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("mosquitto: {e} (apt-get install mosquitto)"))?;
        self.child = Some(child);
        let port = self.port;
        if !wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }) {
            return Err(format!("mosquitto did not listen on {port}"));
        }
        Ok(())
    }

    /// SIGKILL: the broker keeps only what it had persisted.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM: the broker saves its sessions and stops.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own, not yet reaped child.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A TCP proxy on 127.0.0.1 that counts the bytes it forwards each way: the
/// measuring tape for "bytes on the wire" in benchmarks. Stops when dropped.
pub struct CountingProxy {
    pub port: u16,
    pub up: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub down: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CountingProxy {
    pub fn start(target: u16) -> std::io::Result<CountingProxy> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (u, d, s) = (up.clone(), down.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let pipe = |mut from: std::net::TcpStream,
                            mut to: std::net::TcpStream,
                            counter: Arc<AtomicU64>| {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 << 10];
                        loop {
                            match std::io::Read::read(&mut from, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    counter.fetch_add(n as u64, Ordering::Relaxed);
                                    if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                };
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    pipe(c2, s2, u.clone());
                    pipe(server, client, d.clone());
                }
            }
        });
        Ok(CountingProxy {
            port,
            up,
            down,
            stop,
        })
    }

    /// Bytes forwarded so far, both ways.
    pub fn total(&self) -> u64 {
        use std::sync::atomic::Ordering;
        self.up.load(Ordering::Relaxed) + self.down.load(Ordering::Relaxed)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Faults a [`FaultProxy`] applies, changeable while it runs.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Bytes per second each way (a 2G/EDGE link is 8–32 KB/s).
    pub rate_bps: Option<u64>,
    /// Added before each forwarded chunk, each way.
    pub latency_ms: u64,
    /// Cut every connection after a random number of bytes in this range (both ways
    /// counted), as a modem that drops the link does.
    pub cut_every: Option<(u64, u64)>,
    /// Accept connections and forward nothing: a link that is up but dead.
    pub black_hole: bool,
}

/// The project's fault harness: a TCP proxy on 127.0.0.1 that rate-limits, adds
/// latency, cuts connections at given or random byte offsets, or black-holes them,
/// and counts the bytes it forwards and the cuts it makes. Stops when dropped.
pub struct FaultProxy {
    pub port: u16,
    pub faults: std::sync::Arc<std::sync::Mutex<Faults>>,
    pub forwarded: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub cuts: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    pub fn start(target: u16, faults: Faults) -> std::io::Result<FaultProxy> {
        use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let faults = Arc::new(Mutex::new(faults));
        let forwarded = Arc::new(AtomicU64::new(0));
        let cuts = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, fw, c, s) = (
            faults.clone(),
            forwarded.clone(),
            cuts.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mut seed = crate::time::wall_ms() | 1;
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let now = f.lock().map(|g| g.clone()).unwrap_or_default();
                if now.black_hole {
                    // Swallow what the client sends; answer nothing, close nothing.
                    std::thread::spawn(move || {
                        let mut sink = [0u8; 4096];
                        let mut c = client;
                        while std::io::Read::read(&mut c, &mut sink)
                            .map(|n| n > 0)
                            .unwrap_or(false)
                        {}
                    });
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                // Budget before this connection is cut (xorshift for the random offset).
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let budget = match now.cut_every {
                    Some((lo, hi)) => (lo + seed % (hi.saturating_sub(lo) + 1)) as i64,
                    None => i64::MAX,
                };
                let left = Arc::new(AtomicI64::new(budget));
                let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                    let (f, fw, c, left) = (f.clone(), fw.clone(), c.clone(), left.clone());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 8 << 10];
                        loop {
                            let n = match std::io::Read::read(&mut from, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let now = f.lock().map(|g| g.clone()).unwrap_or_default();
                            if now.latency_ms > 0 {
                                std::thread::sleep(Duration::from_millis(now.latency_ms));
                            }
                            let remaining = left.fetch_sub(n as i64, Ordering::SeqCst);
                            let send = if remaining < n as i64 {
                                remaining.max(0) as usize
                            } else {
                                n
                            };
                            if send > 0 && std::io::Write::write_all(&mut to, &buf[..send]).is_err()
                            {
                                break;
                            }
                            fw.fetch_add(send as u64, Ordering::Relaxed);
                            if send < n {
                                if remaining > 0 {
                                    c.fetch_add(1, Ordering::Relaxed);
                                }
                                break;
                            }
                            if let Some(rate) = now.rate_bps.filter(|r| *r > 0) {
                                std::thread::sleep(Duration::from_micros(
                                    n as u64 * 1_000_000 / rate,
                                ));
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                };
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    pipe(c2, s2);
                    pipe(server, client);
                }
            }
        });
        Ok(FaultProxy {
            port,
            faults,
            forwarded,
            cuts,
            stop,
        })
    }

    pub fn set(&self, faults: Faults) {
        if let Ok(mut g) = self.faults.lock() {
            *g = faults;
        }
    }

    pub fn cuts(&self) -> u64 {
        self.cuts.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}
