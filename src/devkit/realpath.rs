//! A real TCP path for the link benchmark, beside the user-space model of
//! [`super::linksim`]: the kernel's own TCP (its congestion control, retransmission
//! timers and windows) carries the bytes; the kernel's qdiscs impose the rate and the
//! loss; only the delay and the periodic cuts come from a small proxy, because this
//! kernel has no netem.
//!
//! ```text
//! clinic ──lo──► DelayProxy (+RTT/2 each way, cuts every 60 s) ──lo, port H──► hub
//!                                        ▲ htb 128 kbit/s each way (dport H up, sport H down)
//!                                        ▲ nft: 1 segment in 50 dropped each way
//! ```
//! It changes the loopback device, so it runs only inside a private network namespace
//! as root (`tests/bench/real-path.sh` does `unshare -n`), and refuses otherwise
//! (`CLINICSYNC_BENCH_NETNS=1` is the script's promise that it is one). Loopback's MTU
//! is set to 1500 and its GSO size too (`gso_max_size`: without it, TCP hands the
//! qdisc segments of up to 64 KiB, which htb lets through whole and then pays for, so
//! bursts beat the rate), so segments are the size a modem link carries. Bytes on
//! the wire are read from the htb classes' counters: IP and TCP headers,
//! retransmissions and ACKs included, as a modem would count them.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::linksim::LinkSpec;

fn sh(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e} (install iproute2 and nftables)"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Rate and loss on the hub's port, undone when dropped.
struct Shaping;

impl Shaping {
    fn apply(hub_port: u16, spec: &LinkSpec) -> Result<Shaping, String> {
        if std::env::var_os("CLINICSYNC_BENCH_NETNS").is_none() {
            return Err("the real path reshapes the loopback device: run it in a private network namespace (tests/bench/real-path.sh)".into());
        }
        let rate = format!("{}bit", spec.rate * 8);
        let port = hub_port.to_string();
        sh("ip", &["link", "set", "lo", "up", "mtu", "1500"])?;
        // Loopback hands TCP segments of up to 64 KiB to the qdisc (GSO/TSO: nothing
        // ever splits them on lo). htb lets a packet through whenever its class has
        // tokens left and charges the debt afterwards, so a 28 KB push went through
        // as one or two such packets and beat the rate (1.7 s where 128 kbit/s
        // needs 1.75 s for the bytes alone). Segments of at most one MTU, as a modem
        // link carries them, make htb pace every one.
        sh("ip", &["link", "set", "lo", "gso_max_size", "1500"])?;
        let _ = sh("tc", &["qdisc", "del", "dev", "lo", "root"]);
        sh(
            "tc",
            &[
                "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "30",
            ],
        )?;
        for (class, r) in [("1:10", rate.as_str()), ("1:20", &rate), ("1:30", "10gbit")] {
            sh(
                "tc",
                &[
                    "class", "add", "dev", "lo", "parent", "1:", "classid", class, "htb", "rate",
                    r, "ceil", r, "burst", "1600", "cburst", "1600", "quantum", "1514",
                ],
            )?;
        }
        for (field, class) in [("dport", "1:10"), ("sport", "1:20")] {
            sh(
                "tc",
                &[
                    "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
                    "u32", "match", "ip", field, &port, "0xffff", "flowid", class,
                ],
            )?;
        }
        if spec.loss > 0.0 {
            let one_in = ((1.0 / spec.loss).round() as u64).max(1).to_string();
            let _ = sh("nft", &["delete", "table", "inet", "clinicsync_bench"]);
            sh("nft", &["add", "table", "inet", "clinicsync_bench"])?;
            sh(
                "nft",
                &[
                    "add",
                    "chain",
                    "inet",
                    "clinicsync_bench",
                    "out",
                    "{ type filter hook output priority 0; }",
                ],
            )?;
            for field in ["dport", "sport"] {
                sh(
                    "nft",
                    &[
                        "add",
                        "rule",
                        "inet",
                        "clinicsync_bench",
                        "out",
                        "tcp",
                        field,
                        &port,
                        "numgen",
                        "random",
                        "mod",
                        &one_in,
                        "0",
                        "drop",
                    ],
                )?;
            }
        }
        Ok(Shaping)
    }

    /// Bytes the two shaped classes sent (up, down), headers and retransmissions in.
    fn bytes() -> Result<u64, String> {
        let text = sh("tc", &["-s", "class", "show", "dev", "lo"])?;
        let mut total = 0;
        let mut in_shaped = false;
        for line in text.lines() {
            if line.starts_with("class ") {
                in_shaped = line.contains("1:10 ") || line.contains("1:20 ");
            } else if in_shaped && line.trim_start().starts_with("Sent ") {
                let n: u64 = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| format!("unreadable tc counter: {line}"))?;
                total += n;
            }
        }
        Ok(total)
    }
}

impl Drop for Shaping {
    fn drop(&mut self) {
        let _ = sh("tc", &["qdisc", "del", "dev", "lo", "root"]);
        let _ = sh("nft", &["delete", "table", "inet", "clinicsync_bench"]);
    }
}

/// Chunks in flight with the time each may be written, and whether the reading
/// side has ended.
type InFlight = (VecDeque<(Instant, Vec<u8>)>, bool);

/// A FIFO of byte chunks, each released `delay` after it was read.
struct Delayed {
    queue: Mutex<InFlight>,
    ready: Condvar,
}

/// The delay-and-cut proxy in front of the shaped hub port.
pub struct RealPath {
    pub port: u16,
    stop: Arc<AtomicBool>,
    cuts: Arc<AtomicU64>,
    start_bytes: u64,
    _shaping: Shaping,
}

impl RealPath {
    pub fn start(hub_port: u16, spec: &LinkSpec) -> Result<RealPath, String> {
        let shaping = Shaping::apply(hub_port, spec)?;
        let start_bytes = Shaping::bytes()?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let one_way = spec.rtt / 2;
        {
            let (stop, live, cuts) = (stop.clone(), live.clone(), cuts.clone());
            let every = spec.cut_every;
            std::thread::spawn(move || {
                let Some(every) = every else { return };
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    if last.elapsed() >= every {
                        last = Instant::now();
                        let mut l = live.lock().unwrap_or_else(|p| p.into_inner());
                        let n = l.len() as u64 / 2;
                        for s in l.drain(..) {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                        cuts.fetch_add(n, Ordering::Relaxed);
                    }
                }
            });
        }
        {
            let (stop, live) = (stop.clone(), live.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(("127.0.0.1", hub_port)) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let mut l = live.lock().unwrap_or_else(|p| p.into_inner());
                    if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                        l.push(c2);
                        l.push(s2);
                    }
                    drop(l);
                    pipe(&client, &server, one_way);
                    pipe(&server, &client, one_way);
                }
            });
        }
        Ok(RealPath {
            port,
            stop,
            cuts,
            start_bytes,
            _shaping: shaping,
        })
    }

    /// Bytes on the shaped link since this path started.
    pub fn wire_total(&self) -> u64 {
        Shaping::bytes()
            .unwrap_or(0)
            .saturating_sub(self.start_bytes)
    }

    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }
}

impl Drop for RealPath {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies `from` → `to`, each chunk held back `delay` after it was read.
fn pipe(from: &TcpStream, to: &TcpStream, delay: Duration) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let q = Arc::new(Delayed {
        queue: Mutex::new((VecDeque::new(), false)),
        ready: Condvar::new(),
    });
    let reader_q = q.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let mut g = reader_q.queue.lock().unwrap_or_else(|p| p.into_inner());
            if n == 0 {
                g.1 = true;
                reader_q.ready.notify_all();
                return;
            }
            g.0.push_back((Instant::now() + delay, buf[..n].to_vec()));
            reader_q.ready.notify_all();
        }
    });
    std::thread::spawn(move || loop {
        let mut g = q.queue.lock().unwrap_or_else(|p| p.into_inner());
        while g.0.is_empty() && !g.1 {
            g = q.ready.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        let Some((due, data)) = g.0.pop_front() else {
            let _ = to.shutdown(Shutdown::Write);
            return;
        };
        drop(g);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if to.write_all(&data).is_err() {
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
    });
}
