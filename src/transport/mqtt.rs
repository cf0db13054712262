//! MQTT transport (rumqttc, QoS 1, persistent sessions) through a broker such as
//! mosquitto. Moves the same protocol frames as HTTP; the broker authenticates each
//! node and its ACL confines it to its own topics.
//!
//! Topics, under a versioned prefix, one subtree per child node:
//! ```text
//! clinicsync/v1/<child>/up     child → hub: requests         (child: write; hub: read)
//! clinicsync/v1/<child>/down   hub → child: answers, wake-ups (hub: write; child: read)
//! ```
//! mosquitto ACL for this layout (usernames are node ids):
//! ```text
//! user <hub>
//! topic readwrite clinicsync/v1/#
//! pattern write clinicsync/v1/%u/up
//! pattern read clinicsync/v1/%u/down
//! ```
//! Payload envelope, version 1:
//! ```text
//! struct Envelope { magic: b"CSMQ", kind: u8, correlation: [u8; 16], body: [u8] }
//! kind 1 request  (body = wire frame)     kind 2 answer (body = wire frame)
//! kind 3 refusal  (body = u16 BE status, then UTF-8 reason)
//! kind 4 wake-up  (body empty: the hub's feed advanced for this child)
//! kind 5 request with an announcement (body = u8 n, n bytes of what the child
//!        reads as in HTTP's X-Clinicsync-Accept, then the wire frame)
//! kind 6 hello    (body = what the hub reads, as in X-Clinicsync-Accept; at most
//!        255 bytes of UTF-8, as is kind 5's announcement)
//! ```
//! Protocol v2 over MQTT (kinds 5 and 6, since 0.3): a v2 hub that answers a kind 1
//! request also sends that child a hello (at most every [`HELLO_EVERY`] per child);
//! a v2 child that heard it sends kind 5 requests, announcing what it reads, and
//! the hub answers those in what both read. Every other peer keeps kinds 1-4: an old
//! child ignores the hello (it skips kinds it does not know), an old hub never gets
//! a kind 5 because it never says hello. A v2 child whose kind 5 request goes
//! unanswered (its hub was replaced by an old build, which ignores kind 5) or is
//! refused as a frame the hub cannot read forgets the hello and goes on in kind 1.
//! Invariants: a PubAck only means the broker holds the message; a record counts as
//! delivered only when the hub's per-record answer arrives and the engine clears the
//! outbox. Sessions are persistent (`clean_session = false`, fixed client id), so a
//! wake-up published while a clinic is offline reaches it when it reconnects.
//! Messages are bounded by `mqtt.max_message_bytes`; a push batch is sized below it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{Event, MqttOptions, Packet, QoS};

use super::http::{Traffic, TransportError};
use crate::secret::Secret;
use crate::wire::{self, Accept, Encoding, Limits, Message};

pub const PREFIX: &str = "clinicsync/v1";
/// How often at most a hub says hello to a child that sends kind 1 requests.
pub const HELLO_EVERY: Duration = Duration::from_secs(600);
const MAGIC: &[u8; 4] = b"CSMQ";

pub fn up_topic(node: &str) -> String {
    format!("{PREFIX}/{node}/up")
}
pub fn down_topic(node: &str) -> String {
    format!("{PREFIX}/{node}/down")
}
/// The child named by an `up` topic.
pub fn child_of_up(topic: &str) -> Option<&str> {
    topic
        .strip_prefix(PREFIX)?
        .strip_prefix('/')?
        .strip_suffix("/up")
        .filter(|c| !c.contains('/'))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    Request {
        corr: [u8; 16],
        frame: Vec<u8>,
    },
    Answer {
        corr: [u8; 16],
        frame: Vec<u8>,
    },
    Refusal {
        corr: [u8; 16],
        status: u16,
        reason: String,
    },
    WakeUp,
    /// A request announcing what the child reads ([`crate::wire::Accept`]).
    RequestAnnounced {
        corr: [u8; 16],
        accept: String,
        frame: Vec<u8>,
    },
    /// What the hub reads.
    Hello {
        accept: String,
    },
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        match self {
            Envelope::Request { corr, frame } | Envelope::Answer { corr, frame } => {
                out.push(if matches!(self, Envelope::Request { .. }) {
                    1
                } else {
                    2
                });
                out.extend_from_slice(corr);
                out.extend_from_slice(frame);
            }
            Envelope::Refusal {
                corr,
                status,
                reason,
            } => {
                out.push(3);
                out.extend_from_slice(corr);
                out.extend_from_slice(&status.to_be_bytes());
                out.extend_from_slice(reason.as_bytes());
            }
            Envelope::WakeUp => {
                out.push(4);
                out.extend_from_slice(&[0; 16]);
            }
            Envelope::RequestAnnounced {
                corr,
                accept,
                frame,
            } => {
                out.push(5);
                out.extend_from_slice(corr);
                let a = &accept.as_bytes()[..accept.len().min(255)];
                out.push(a.len() as u8);
                out.extend_from_slice(a);
                out.extend_from_slice(frame);
            }
            Envelope::Hello { accept } => {
                out.push(6);
                out.extend_from_slice(&[0; 16]);
                out.extend_from_slice(&accept.as_bytes()[..accept.len().min(255)]);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Envelope, String> {
        if bytes.len() < 21 || &bytes[..4] != MAGIC {
            return Err("not a clinicsync MQTT message".into());
        }
        let mut corr = [0u8; 16];
        corr.copy_from_slice(&bytes[5..21]);
        let body = &bytes[21..];
        Ok(match bytes[4] {
            1 => Envelope::Request {
                corr,
                frame: body.to_vec(),
            },
            2 => Envelope::Answer {
                corr,
                frame: body.to_vec(),
            },
            3 if body.len() >= 2 => Envelope::Refusal {
                corr,
                status: u16::from_be_bytes([body[0], body[1]]),
                reason: String::from_utf8_lossy(&body[2..]).into_owned(),
            },
            4 => Envelope::WakeUp,
            5 if !body.is_empty() && body.len() > usize::from(body[0]) => {
                let n = usize::from(body[0]);
                Envelope::RequestAnnounced {
                    corr,
                    accept: std::str::from_utf8(&body[1..1 + n])
                        .map_err(|_| "announcement is not UTF-8".to_string())?
                        .to_string(),
                    frame: body[1 + n..].to_vec(),
                }
            }
            6 if body.len() <= 255 => Envelope::Hello {
                accept: std::str::from_utf8(body)
                    .map_err(|_| "hello is not UTF-8".to_string())?
                    .to_string(),
            },
            k => return Err(format!("unknown MQTT message kind {k}")),
        })
    }
}

/// Broker settings, from `[mqtt]`.
#[derive(Clone)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub tls_ca: Option<Vec<u8>>,
    pub username: String,
    pub password: Secret,
    pub max_message_bytes: usize,
}

impl std::fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MqttSettings({}:{} as {})",
            self.host, self.port, self.username
        )
    }
}

impl MqttSettings {
    /// Parses `mqtt://host:port` or `mqtts://host:port`.
    pub fn from_url(
        url: &str,
        username: &str,
        password: Secret,
        ca_file: Option<&PathBuf>,
        max: usize,
    ) -> Result<MqttSettings, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(format!(
                "mqtt.url {url:?} must start with mqtt:// or mqtts://"
            ));
        };
        let (host, port) = match rest.trim_end_matches('/').rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse::<u16>()
                    .map_err(|_| format!("mqtt.url {url:?} has a bad port"))?,
            ),
            None => (
                rest.trim_end_matches('/').to_string(),
                if tls { 8883 } else { 1883 },
            ),
        };
        let tls_ca = match (tls, ca_file) {
            (true, Some(p)) => {
                Some(std::fs::read(p).map_err(|e| format!("mqtt.ca_file {}: {e}", p.display()))?)
            }
            (true, None) => {
                return Err("mqtts:// needs mqtt.ca_file (the broker's CA certificate, PEM)".into())
            }
            (false, _) => None,
        };
        Ok(MqttSettings {
            host,
            port,
            tls_ca,
            username: username.to_string(),
            password,
            max_message_bytes: max,
        })
    }

    pub fn options(&self, client_id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, &self.host, self.port);
        o.set_credentials(&self.username, self.password.expose());
        // Persistent session: subscriptions and QoS 1 messages survive disconnects.
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(self.max_message_bytes + 1024, self.max_message_bytes + 1024);
        if let Some(ca) = &self.tls_ca {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Simple {
                    ca: ca.clone(),
                    alpn: None,
                    client_auth: None,
                },
            ));
        }
        o
    }
}

type Waiters = Arc<Mutex<HashMap<[u8; 16], mpsc::Sender<Envelope>>>>;

/// A child's connection to the broker: request/response by correlation id, plus
/// wake-ups from the hub. The network loop runs on its own thread and reconnects
/// by itself (one attempt a second at most).
pub struct MqttClient {
    client: rumqttc::Client,
    node: String,
    waiters: Waiters,
    connected: Arc<AtomicBool>,
    last_error: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    wakeups: Arc<AtomicU64>,
    wake: Arc<tokio::sync::Notify>,
    timeout: Duration,
    limits: Limits,
    url: String,
    /// What this client reads and announces ([`Accept::ours`]; tests force v1).
    accept: Mutex<Accept>,
    /// What the hub said in its last hello; `None`: kind 1 requests in v1.
    parent: Arc<Mutex<Option<Accept>>>,
    /// The zstd level of frames carrying pushed records ([`wire::level`]).
    push_level: std::sync::atomic::AtomicI32,
}

impl MqttClient {
    /// Connects and waits for the broker's answer (up to `timeout`), so a wrong
    /// password or an unreachable broker is reported here.
    pub fn connect(
        settings: &MqttSettings,
        node: &str,
        timeout: Duration,
    ) -> Result<MqttClient, TransportError> {
        let (client, mut connection) =
            rumqttc::Client::new(settings.options(&format!("clinicsync-{node}")), 64);
        let waiters: Waiters = Arc::new(Mutex::new(HashMap::new()));
        let connected = Arc::new(AtomicBool::new(false));
        let last_error = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let wakeups = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(tokio::sync::Notify::new());
        let parent: Arc<Mutex<Option<Accept>>> = Arc::new(Mutex::new(None));
        let (first_tx, first_rx) = mpsc::channel::<Result<(), String>>();
        {
            let (client, waiters, connected, last_error, stop, wakeups, wake, hello) = (
                client.clone(),
                waiters.clone(),
                connected.clone(),
                last_error.clone(),
                stop.clone(),
                wakeups.clone(),
                wake.clone(),
                parent.clone(),
            );
            let down = down_topic(node);
            std::thread::Builder::new()
                .name(format!("mqtt-{node}"))
                .spawn(move || {
                    let mut first = Some(first_tx);
                    for event in connection.iter() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match event {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                connected.store(true, Ordering::Relaxed);
                                *last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                                let _ = client.try_subscribe(down.clone(), QoS::AtLeastOnce);
                                if let Some(tx) = first.take() {
                                    let _ = tx.send(Ok(()));
                                }
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) => match Envelope::decode(&p.payload) {
                                Ok(Envelope::WakeUp) => {
                                    wakeups.fetch_add(1, Ordering::Relaxed);
                                    wake.notify_one();
                                }
                                Ok(env @ (Envelope::Answer { .. } | Envelope::Refusal { .. })) => {
                                    let corr = match &env {
                                        Envelope::Answer { corr, .. } | Envelope::Refusal { corr, .. } => *corr,
                                        _ => [0; 16],
                                    };
                                    if let Some(tx) = waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&corr) {
                                        let _ = tx.send(env);
                                    }
                                }
                                Ok(Envelope::Hello { accept }) => {
                                    let a = Accept::parse(Some(accept.as_str()));
                                    tracing::debug!(?a, "the hub said what it reads");
                                    *hello.lock().unwrap_or_else(|p| p.into_inner()) = Some(a);
                                }
                                Ok(Envelope::Request { .. } | Envelope::RequestAnnounced { .. }) | Err(_) => {
                                    tracing::warn!(topic = %p.topic, "ignored an unexpected MQTT message");
                                }
                            },
                            Ok(_) => {}
                            Err(e) => {
                                connected.store(false, Ordering::Relaxed);
                                let msg = e.to_string();
                                *last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
                                if let Some(tx) = first.take() {
                                    let _ = tx.send(Err(msg));
                                }
                                if stop.load(Ordering::Relaxed) {
                                    break;
                                }
                                // rumqttc reconnects on the next poll; never spin.
                                std::thread::sleep(Duration::from_secs(1));
                            }
                        }
                    }
                })
                .map_err(|e| TransportError::Unreachable {
                    url: settings.host.clone(),
                    message: e.to_string(),
                })?;
        }
        let url = format!("mqtt://{}:{}", settings.host, settings.port);
        match first_rx.recv_timeout(timeout) {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                stop.store(true, Ordering::Relaxed);
                let _ = client.disconnect();
                return Err(TransportError::Unreachable { url, message });
            }
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                let _ = client.disconnect();
                return Err(TransportError::Unreachable {
                    url,
                    message: format!("no answer from the broker within {timeout:?}"),
                });
            }
        }
        Ok(MqttClient {
            client,
            node: node.to_string(),
            waiters,
            connected,
            last_error,
            stop,
            wakeups,
            wake,
            timeout,
            limits: Limits {
                max_compressed: settings.max_message_bytes,
                max_decompressed: settings.max_message_bytes.saturating_mul(8),
                max_records: 100_000,
            },
            url,
            accept: Mutex::new(Accept::ours()),
            parent,
            push_level: std::sync::atomic::AtomicI32::new(wire::LEVEL_FAST),
        })
    }

    /// The zstd level of frames carrying pushed records.
    pub fn push_level(&self) -> i32 {
        self.push_level.load(Ordering::Relaxed)
    }

    /// Sets the zstd level of frames carrying pushed records (the sync round's choice).
    pub fn set_push_level(&self, level: i32) {
        self.push_level.store(level, Ordering::Relaxed);
    }

    /// What this client reads and announces; [`Accept::v1`] makes it behave as a
    /// client of before protocol v2 (kind 1 requests only), for tests.
    pub fn set_accept(&self, accept: Accept) {
        *self.accept.lock().unwrap_or_else(|p| p.into_inner()) = accept;
    }

    /// What the hub said in its last hello (`None`: none heard, or forgotten).
    pub fn parent_accept(&self) -> Option<Accept> {
        self.parent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How requests are encoded now (v1 until the hub said hello).
    pub fn encoding(&self) -> Encoding {
        match self.parent_accept() {
            Some(p) => self
                .accept
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .choose(&p),
            None => Encoding::V1,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Wake-ups received so far.
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }

    /// Completes when the hub sends a wake-up.
    pub fn wake(&self) -> Arc<tokio::sync::Notify> {
        self.wake.clone()
    }

    /// Sends `msg` and waits for the hub's answer with the same correlation id: as a
    /// kind 5 request in what both read once the hub said hello, else as kind 1 in v1
    /// (see the module header for how a replaced hub is followed).
    pub fn exchange(&self, msg: &Message) -> Result<(Message, Traffic), TransportError> {
        let announce = self.parent_accept().and_then(|_| {
            self.accept
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .header_value()
        });
        let Some(accept) = announce else {
            return self.exchange_as(msg, None, Encoding::V1);
        };
        let encoding = self.encoding();
        match self.exchange_as(msg, Some(accept), encoding) {
            Err(e @ TransportError::Cut { .. }) => {
                tracing::info!(error = %e, "no answer to an announced request; back to plain requests until the hub says hello again");
                *self.parent.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Err(e)
            }
            Err(TransportError::Status { status: 400, .. }) if encoding != Encoding::V1 => {
                tracing::info!("the hub refused a protocol v2 request; sending it again in v1");
                *self.parent.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.exchange_as(msg, None, Encoding::V1)
            }
            other => other,
        }
    }

    fn exchange_as(
        &self,
        msg: &Message,
        announce: Option<String>,
        encoding: Encoding,
    ) -> Result<(Message, Traffic), TransportError> {
        let level = wire::level::for_message(msg, self.push_level());
        let frame = wire::encode_as(msg, level, encoding)?;
        if frame.len() > self.limits.max_compressed {
            return Err(TransportError::Status {
                status: 413,
                message: format!(
                    "message of {} bytes is over mqtt.max_message_bytes",
                    frame.len()
                ),
            });
        }
        let mut corr = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut corr);
        let (tx, rx) = mpsc::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(corr, tx);
        let payload = match announce {
            Some(accept) => Envelope::RequestAnnounced {
                corr,
                accept,
                frame,
            },
            None => Envelope::Request { corr, frame },
        }
        .encode();
        let sent = payload.len() as u64;
        // Connected already: a lost broker or a silent hub here is a cut, resumed
        // within the exchange while it makes progress.
        let unreachable = |message: String| TransportError::Cut {
            url: self.url.clone(),
            message,
        };
        let result = (|| {
            self.client
                .publish(up_topic(&self.node), QoS::AtLeastOnce, false, payload)
                .map_err(|e| unreachable(e.to_string()))?;
            match rx.recv_timeout(self.timeout) {
                Ok(Envelope::Answer { frame, .. }) => {
                    let received = frame.len() as u64 + 21;
                    Ok((
                        wire::decode(&frame, &self.limits)?,
                        Traffic { sent, received },
                    ))
                }
                Ok(Envelope::Refusal { status, reason, .. }) => Err(TransportError::Status {
                    status,
                    message: reason,
                }),
                Ok(_) => Err(unreachable("unexpected message from the hub".into())),
                Err(_) => {
                    let why = self
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone()
                        .unwrap_or_else(|| "the hub did not answer".into());
                    Err(unreachable(format!(
                        "no answer within {:?}: {why}",
                        self.timeout
                    )))
                }
            }
        })();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&corr);
        result
    }
}

impl Drop for MqttClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_refuse_garbage() {
        let corr = [7u8; 16];
        for e in [
            Envelope::Request {
                corr,
                frame: vec![1, 2, 3],
            },
            Envelope::Answer {
                corr,
                frame: vec![],
            },
            Envelope::Refusal {
                corr,
                status: 403,
                reason: "claims to come from b".into(),
            },
            Envelope::WakeUp,
            Envelope::RequestAnnounced {
                corr,
                accept: "2;dict=1".into(),
                frame: vec![4, 5],
            },
            Envelope::RequestAnnounced {
                corr,
                accept: String::new(),
                frame: vec![],
            },
            Envelope::Hello {
                accept: "2;dict=1".into(),
            },
        ] {
            assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        }
        // An announcement longer than its frame holds is refused.
        let mut cut = Envelope::RequestAnnounced {
            corr,
            accept: "2;dict=1".into(),
            frame: vec![],
        }
        .encode();
        cut.truncate(cut.len() - 2);
        assert!(Envelope::decode(&cut).is_err());
        assert!(Envelope::decode(b"hello").is_err());
        let mut bad = Envelope::WakeUp.encode();
        bad[4] = 9;
        assert!(Envelope::decode(&bad).is_err());
    }

    #[test]
    fn topics_name_their_child() {
        assert_eq!(child_of_up(&up_topic("clinic-a")), Some("clinic-a"));
        assert_eq!(child_of_up("clinicsync/v1/a/b/up"), None);
        assert_eq!(child_of_up("clinicsync/v1/a/down"), None);
    }

    #[test]
    fn broker_urls_parse() {
        let s = MqttSettings::from_url(
            "mqtt://127.0.0.1:18830",
            "a",
            Secret::new("hunter2".into()),
            None,
            1 << 20,
        )
        .unwrap();
        assert_eq!((s.host.as_str(), s.port), ("127.0.0.1", 18830));
        assert!(MqttSettings::from_url("http://x", "a", Secret::new("p".into()), None, 1).is_err());
        assert!(
            MqttSettings::from_url("mqtts://x", "a", Secret::new("p".into()), None, 1)
                .unwrap_err()
                .contains("ca_file")
        );
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
