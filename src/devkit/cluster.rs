//! The test kit's network parts around [`crate::localnet`]: a real mosquitto broker
//! with per-node ACLs, a proxy that counts bytes on the wire, and a fault proxy that
//! cuts, stalls and black-holes TCP connections. Behind the `devkit` feature: the
//! product never starts a broker or a proxy.

pub use crate::localnet::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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
    /// TCP connections accepted.
    pub connections: std::sync::Arc<std::sync::atomic::AtomicU64>,
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
        let connections = Arc::new(AtomicU64::new(0));
        let (u, d, s, n) = (up.clone(), down.clone(), stop.clone(), connections.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                n.fetch_add(1, Ordering::Relaxed);
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
            connections,
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
/// and counts the bytes it forwards, the cuts it makes and the pipes still open (two
/// per connection). Stops when dropped.
pub struct FaultProxy {
    pub port: u16,
    pub faults: std::sync::Arc<std::sync::Mutex<Faults>>,
    pub forwarded: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub cuts: std::sync::Arc<std::sync::atomic::AtomicU64>,
    open: std::sync::Arc<std::sync::atomic::AtomicU64>,
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
        let open = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, fw, c, s, o) = (
            faults.clone(),
            forwarded.clone(),
            cuts.clone(),
            stop.clone(),
            open.clone(),
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
                    let o = o.clone();
                    o.fetch_add(1, Ordering::SeqCst);
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
                        o.fetch_sub(1, Ordering::SeqCst);
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
            open,
            stop,
        })
    }

    /// Pipes still forwarding (two per open connection). After a client is killed,
    /// its pipes may still count bytes the parent had already sent until they close.
    pub fn open_pipes(&self) -> u64 {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
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
