//! A bad link in user space, for benchmarks: a TCP proxy on 127.0.0.1 that makes the
//! loopback behave like a 2G/EDGE modem link. This kernel has no netem, so the link is
//! modelled here, segment by segment, and every protocol measured through it pays
//! the same model:
//!
//! - **rate**: each direction is one serial line shared by all connections; a segment
//!   of at most [`MSS`] payload bytes plus [`HEADER`] bytes of TCP/IP header occupies
//!   it for `(payload + header) / rate`.
//! - **delay**: a segment arrives half a round trip after it left the line; a new
//!   connection sends nothing before one round trip (the handshake).
//! - **loss**: each segment is lost with probability `loss` and sent again: it
//!   occupies the line twice and arrives one round trip later when later segments of
//!   the same write follow it (fast retransmit on duplicate ACKs), two round trips
//!   later when it was the last one (tail-loss probe). Delivery stays in order, so
//!   what follows a lost segment waits for it, as TCP's receiver makes it.
//! - **cuts**: every `cut_every`, every open connection is torn down (both sockets
//!   shut), and what was still in flight is gone — a modem dropping its carrier.
//!
//! Bytes on the wire ([`LinkStats::wire`]) count what crossed the line: payload,
//! headers, retransmissions, handshakes and one ACK per two segments. Not modelled:
//! slow start and congestion windows (at 128 kbit/s and 600 ms the bandwidth-delay
//! product, 9.6 kB, is below TCP's initial window of ten segments), and the time a
//! real modem takes to dial again after a cut (`outage`, zero unless set).

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Payload bytes in a full segment (Ethernet MTU 1500 less IPv4, TCP and timestamps).
pub const MSS: usize = 1448;
/// TCP/IP header bytes per segment (IPv4 20, TCP 20, timestamp option 12).
pub const HEADER: u64 = 52;
/// How far ahead of the line the proxy reads from a sender (its send buffer).
const AHEAD: Duration = Duration::from_millis(1500);

/// The link to emulate.
#[derive(Debug, Clone)]
pub struct LinkSpec {
    /// Bytes per second, each way.
    pub rate: u64,
    pub rtt: Duration,
    /// Probability that a segment is lost, 0.0–1.0.
    pub loss: f64,
    /// Tear down every open connection this often.
    pub cut_every: Option<Duration>,
    /// After a cut, new connections wait this long (a modem dialling again).
    pub outage: Duration,
    pub seed: u64,
}

impl LinkSpec {
    /// The benchmark's link: 128 kbit/s, 600 ms round trip, 2 % loss, a cut every 60 s.
    pub fn edge() -> LinkSpec {
        LinkSpec {
            rate: 128_000 / 8,
            rtt: Duration::from_millis(600),
            loss: 0.02,
            cut_every: Some(Duration::from_secs(60)),
            outage: Duration::ZERO,
            seed: 7,
        }
    }
}

/// What crossed the link, index 0 towards the server ("up"), 1 back ("down").
#[derive(Debug, Default)]
pub struct LinkStats {
    pub payload: [AtomicU64; 2],
    pub wire: [AtomicU64; 2],
    pub segments: AtomicU64,
    pub lost: AtomicU64,
    pub connections: AtomicU64,
    /// Connections torn down by a cut.
    pub cut_connections: AtomicU64,
}

impl LinkStats {
    /// Bytes on the wire, both ways.
    pub fn wire_total(&self) -> u64 {
        self.wire[0].load(Ordering::Relaxed) + self.wire[1].load(Ordering::Relaxed)
    }
    pub fn payload_total(&self) -> u64 {
        self.payload[0].load(Ordering::Relaxed) + self.payload[1].load(Ordering::Relaxed)
    }
}

/// One direction of the line, shared by every connection.
struct Line {
    free_at: Mutex<Instant>,
}

struct Conn {
    streams: [TcpStream; 2],
    cut: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
}

struct Shared {
    spec: LinkSpec,
    stats: Arc<LinkStats>,
    lines: [Line; 2],
    live: Mutex<Vec<Conn>>,
    down_until: Mutex<Instant>,
    stop: AtomicBool,
}

/// A running emulated link in front of `127.0.0.1:target`. Stops when dropped.
pub struct Link {
    pub port: u16,
    pub stats: Arc<LinkStats>,
    shared: Arc<Shared>,
}

enum Item {
    Data {
        at: Instant,
        bytes: Vec<u8>,
        wire: u64,
        segments: u64,
    },
    Close {
        at: Instant,
    },
}

impl Link {
    pub fn start(target: u16, spec: LinkSpec) -> std::io::Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let now = Instant::now();
        let stats = Arc::new(LinkStats::default());
        let shared = Arc::new(Shared {
            spec,
            stats: stats.clone(),
            lines: [
                Line {
                    free_at: Mutex::new(now),
                },
                Line {
                    free_at: Mutex::new(now),
                },
            ],
            live: Mutex::new(Vec::new()),
            down_until: Mutex::new(now),
            stop: AtomicBool::new(false),
        });
        if let Some(every) = shared.spec.cut_every {
            let s = shared.clone();
            std::thread::spawn(move || {
                let mut next = Instant::now() + every;
                while !s.stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep((next - now).min(Duration::from_millis(200)));
                        continue;
                    }
                    next += every;
                    s.cut_all();
                }
            });
        }
        let s = shared.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            for conn in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                n += 1;
                let s = s.clone();
                std::thread::spawn(move || s.carry(client, target, n));
            }
        });
        Ok(Link {
            port,
            stats,
            shared,
        })
    }

    /// Cuts every open connection now (as the timer does).
    pub fn cut_now(&self) {
        self.shared.cut_all();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.cut_all();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

impl Shared {
    fn cut_all(&self) {
        let conns: Vec<Conn> =
            std::mem::take(&mut *self.live.lock().unwrap_or_else(|p| p.into_inner()));
        let mut cut = 0;
        for c in conns {
            if c.done.load(Ordering::Relaxed) < 2 {
                cut += 1;
            }
            c.cut.store(true, Ordering::Relaxed);
            for s in &c.streams {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        self.stats.cut_connections.fetch_add(cut, Ordering::Relaxed);
        let now = Instant::now();
        for line in &self.lines {
            *line.free_at.lock().unwrap_or_else(|p| p.into_inner()) = now;
        }
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = now + self.spec.outage;
    }

    fn carry(self: Arc<Self>, client: TcpStream, target: u16, n: u64) {
        let wait = {
            let until = *self.down_until.lock().unwrap_or_else(|p| p.into_inner());
            until.saturating_duration_since(Instant::now())
        };
        std::thread::sleep(wait);
        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        // The handshake: SYN and ACK up, SYN-ACK down; nothing flows for one round trip.
        self.stats.wire[0].fetch_add(2 * HEADER, Ordering::Relaxed);
        self.stats.wire[1].fetch_add(HEADER, Ordering::Relaxed);
        let opened = Instant::now() + self.spec.rtt;
        let cut = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            return;
        };
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Conn {
                streams: [c3, s3],
                cut: cut.clone(),
                done: done.clone(),
            });
        let up = {
            let (s, cut, done) = (self.clone(), cut.clone(), done.clone());
            std::thread::spawn(move || s.direction(0, c2, s2, opened, n, &cut, &done))
        };
        self.direction(1, server, client, opened, n, &cut, &done);
        let _ = up.join();
    }

    /// Carries one direction: a reader that schedules segments on the line, and a
    /// writer that hands them over when they arrive.
    #[allow(clippy::too_many_arguments)]
    fn direction(
        &self,
        d: usize,
        mut from: TcpStream,
        to: TcpStream,
        opened: Instant,
        n: u64,
        cut: &AtomicBool,
        done: &AtomicU64,
    ) {
        let (tx, rx) = mpsc::channel::<Item>();
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| self.deliver(d, to, rx, cut));
            let mut rng =
                (self.spec.seed ^ (n << 1 | d as u64)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut last_arrival = opened;
            let owd = self.spec.rtt / 2;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                // Read no further ahead of the line than a send buffer would.
                loop {
                    let free = *self.lines[d]
                        .free_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    let ahead = free.saturating_duration_since(Instant::now());
                    if ahead <= AHEAD || cut.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(ahead - AHEAD);
                }
                let got = match std::io::Read::read(&mut from, &mut buf) {
                    Ok(0) | Err(_) => 0,
                    Ok(k) => k,
                };
                if got == 0 || cut.load(Ordering::Relaxed) {
                    let _ = tx.send(Item::Close { at: last_arrival });
                    break;
                }
                let segs: Vec<&[u8]> = buf[..got].chunks(MSS).collect();
                let count = segs.len();
                for (i, seg) in segs.into_iter().enumerate() {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let lost = (rng % 1_000_000) as f64 / 1_000_000.0 < self.spec.loss;
                    let on_line = seg.len() as u64 + HEADER;
                    let tx_time = Duration::from_secs_f64(on_line as f64 / self.spec.rate as f64);
                    let mut line = self.lines[d]
                        .free_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    let start = (*line).max(Instant::now()).max(opened);
                    let mut end = start + tx_time;
                    let mut arrive = end + owd;
                    let mut wire = on_line;
                    if lost {
                        self.stats.lost.fetch_add(1, Ordering::Relaxed);
                        let recovery = if i + 1 < count {
                            self.spec.rtt
                        } else {
                            2 * self.spec.rtt
                        };
                        end += tx_time;
                        arrive = end + owd + recovery;
                        wire += on_line;
                    }
                    *line = end;
                    drop(line);
                    arrive = arrive.max(last_arrival);
                    last_arrival = arrive;
                    let item = Item::Data {
                        at: arrive,
                        bytes: seg.to_vec(),
                        wire,
                        segments: 1,
                    };
                    if tx.send(item).is_err() {
                        break;
                    }
                }
            }
            drop(tx);
            let _ = writer.join();
        });
        done.fetch_add(1, Ordering::Relaxed);
    }

    fn deliver(&self, d: usize, mut to: TcpStream, rx: mpsc::Receiver<Item>, cut: &AtomicBool) {
        let mut segments = 0u64;
        for item in rx {
            let at = match &item {
                Item::Data { at, .. } | Item::Close { at } => *at,
            };
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if cut.load(Ordering::Relaxed) {
                break;
            }
            match item {
                Item::Data {
                    bytes,
                    wire,
                    segments: s,
                    ..
                } => {
                    // Counted as it leaves the line, before the receiver can see it.
                    let st = &self.stats;
                    st.payload[d].fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    st.wire[d].fetch_add(wire, Ordering::Relaxed);
                    st.segments.fetch_add(s, Ordering::Relaxed);
                    // One ACK back for every two segments.
                    segments += s;
                    if segments % 2 == 1 {
                        st.wire[1 - d].fetch_add(HEADER, Ordering::Relaxed);
                    }
                    if std::io::Write::write_all(&mut to, &bytes).is_err() {
                        break;
                    }
                }
                Item::Close { .. } => {
                    self.stats.wire[d].fetch_add(HEADER, Ordering::Relaxed);
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// An echo server that answers each read with the same bytes.
    fn echo() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        port
    }

    fn spec(rate: u64, rtt_ms: u64, loss: f64) -> LinkSpec {
        LinkSpec {
            rate,
            rtt: Duration::from_millis(rtt_ms),
            loss,
            cut_every: None,
            outage: Duration::ZERO,
            seed: 1,
        }
    }

    #[test]
    fn a_round_trip_costs_the_handshake_and_one_rtt() {
        let link = Link::start(echo(), spec(1 << 30, 200, 0.0)).unwrap();
        let t = Instant::now();
        let mut c = TcpStream::connect(("127.0.0.1", link.port)).unwrap();
        c.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).unwrap();
        let first = t.elapsed();
        let t = Instant::now();
        c.write_all(b"pong").unwrap();
        c.read_exact(&mut got).unwrap();
        let second = t.elapsed();
        assert_eq!(&got, b"pong");
        assert!(first >= Duration::from_millis(400), "{first:?}");
        assert!(
            second >= Duration::from_millis(200) && second < Duration::from_millis(390),
            "{second:?}"
        );
    }

    #[test]
    fn the_rate_limits_a_bulk_transfer_and_headers_are_counted() {
        // 64 KiB at 64 KB/s one way: about a second each way, plus the handshake.
        let link = Link::start(echo(), spec(64_000, 20, 0.0)).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", link.port)).unwrap();
        let data = vec![7u8; 64 << 10];
        let t = Instant::now();
        let mut r = c.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut back = vec![0u8; 64 << 10];
            r.read_exact(&mut back).unwrap();
            back
        });
        c.write_all(&data).unwrap();
        assert_eq!(reader.join().unwrap(), data);
        let took = t.elapsed().as_secs_f64();
        assert!(took > 1.0 && took < 3.0, "{took}");
        let wire = link.stats.wire_total();
        assert!(wire > 2 * (64 << 10) + 90 * HEADER, "{wire}");
        assert_eq!(link.stats.payload_total(), 2 * (64 << 10));
    }

    #[test]
    fn loss_resends_segments_and_delivery_stays_in_order() {
        let link = Link::start(echo(), spec(1 << 24, 10, 0.2)).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", link.port)).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut r = c.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut back = vec![0u8; 200_000];
            r.read_exact(&mut back).unwrap();
            back
        });
        c.write_all(&data).unwrap();
        assert_eq!(reader.join().unwrap(), data);
        let lost = link.stats.lost.load(Ordering::Relaxed);
        let segments = link.stats.segments.load(Ordering::Relaxed);
        assert!(
            lost > segments / 10 && lost < segments * 3 / 10,
            "{lost} of {segments}"
        );
        assert!(link.stats.wire_total() > 2 * 200_000 + lost * MSS as u64 / 2);
    }

    #[test]
    fn a_cut_tears_down_open_connections() {
        let link = Link::start(echo(), spec(1 << 24, 10, 0.0)).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", link.port)).unwrap();
        c.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).unwrap();
        link.cut_now();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let after = c.write_all(b"y").and_then(|_| c.read(&mut one));
        assert!(matches!(after, Ok(0) | Err(_)), "{after:?}");
        assert_eq!(link.stats.cut_connections.load(Ordering::Relaxed), 1);
    }
}
