//! Transports move opaque protocol frames between a child and its parent. They
//! never decide whether a record is delivered: that is the engine's job, from the
//! per-record answers inside the frames.

pub mod chunked;
pub mod file;
pub mod http;
pub mod mqtt;
pub mod rate;

use http::{HttpClient, Traffic, TransportError};
use mqtt::MqttClient;
use rate::LinkRate;

use crate::wire::{Encoding, Message};

/// One request/answer exchange with the parent. `path` names the HTTP endpoint
/// (`/v1/push`); message-based transports carry the kind inside the frame.
pub trait Exchange: Sync {
    fn exchange(&self, path: &str, msg: &Message) -> Result<(Message, Traffic), TransportError>;
    /// Whether several exchanges may be in flight at once (HTTP opens a connection
    /// each); chunk fetches then keep two requests going to hide the round trip.
    fn parallel(&self) -> bool {
        false
    }
    /// This node's clock minus the parent's, as the last answer showed it (HTTP's
    /// `Date`); `None` when the transport does not tell.
    fn clock_skew_ms(&self) -> Option<i64> {
        None
    }
    /// The largest frame this link sends in one request (a larger one goes as a
    /// resumable transfer); `None`: no limit of its own.
    fn one_piece(&self) -> Option<usize> {
        None
    }
    /// How this transport encodes frames for the parent now (negotiated per
    /// exchange, see [`crate::wire::accept`]): what a wrapper that builds frames
    /// itself (the chunked transfer) must use. v1 unless the transport negotiates.
    fn encoding(&self) -> Encoding {
        Encoding::V1
    }
    /// What the parent announced in its last answer, to keep across restarts
    /// (`None`: not known, or this transport does not negotiate).
    fn parent_accept(&self) -> Option<crate::wire::Accept> {
        None
    }
    /// Starts from what the parent announced before (the last process's), so the
    /// first request of a new process is already in the parent's newest version; a
    /// parent that was replaced by an older build refuses it, and the transport says
    /// it again in v1 (see [`HttpClient::exchange`]). Ignored once the parent
    /// answered in this process.
    fn assume_parent_accept(&self, _accept: crate::wire::Accept) {}
    /// [`Exchange::exchange`] of `msg`, which the caller already encoded as `frame`
    /// in `encoding` to learn its size (the chunked transfer): a transport that sends
    /// frames as they are sends this one instead of encoding the message again. By
    /// default the message is exchanged as usual.
    fn exchange_frame(
        &self,
        path: &str,
        msg: &Message,
        frame: &[u8],
        encoding: Encoding,
    ) -> Result<(Message, Traffic), TransportError> {
        let _ = (frame, encoding);
        self.exchange(path, msg)
    }
    /// Encodes a request as this transport would send it (a wrapper that builds
    /// frames itself asks here, then hands the frame to [`Exchange::exchange_frame`]):
    /// `encoding` at `level`, and over HTTP a push may be chained to the last one
    /// (see [`http`]'s module header). By default: [`crate::wire::encode_as`].
    fn encode_request(
        &self,
        msg: &Message,
        level: i32,
        encoding: Encoding,
    ) -> Result<Vec<u8>, crate::wire::WireError> {
        crate::wire::encode_as(msg, level, encoding)
    }
    /// The zstd level of frames carrying pushed records (push and sync requests);
    /// every other frame goes at [`crate::wire::LEVEL_FAST`]. A wrapper that builds
    /// frames itself (the chunked transfer) encodes at this level too.
    fn push_level(&self) -> i32 {
        crate::wire::LEVEL_FAST
    }
    /// Sets [`Exchange::push_level`] (the sync round's choice, fixed for a round so a
    /// frame built twice is the same frame).
    fn set_push_level(&self, _level: i32) {}
    /// The link's upload rate as this transport measured it; `None`: it does not
    /// measure (MQTT: its answers' timing is the broker's as much as the link's).
    fn link_rate(&self) -> Option<LinkRate> {
        None
    }
    /// Starts from the estimate an earlier process kept; ignored once this transport
    /// measured something.
    fn assume_link_rate(&self, _rate: LinkRate) {}
    /// Encodes a push request ahead of sending it (a sync round builds the next
    /// batch's frame while the previous batch is still with the parent), when the
    /// frame cannot depend on what that answer brings; `None`: the frame is built
    /// when it is sent. By default `None`.
    fn prebuild(&self, msg: &Message) -> Option<Prebuilt> {
        let _ = msg;
        None
    }
    /// [`Exchange::exchange`] of `msg`, with the frame [`Exchange::prebuild`] made for
    /// it: sent as it is if it is still the frame this transport would build now
    /// (same encoding and level), built again otherwise.
    fn exchange_prebuilt(
        &self,
        path: &str,
        msg: &Message,
        pre: Prebuilt,
    ) -> Result<(Message, Traffic), TransportError> {
        let _ = pre;
        self.exchange(path, msg)
    }
}

/// A request's frame built before it is sent ([`Exchange::prebuild`]), with what it
/// was built for.
pub struct Prebuilt {
    pub frame: Vec<u8>,
    pub encoding: Encoding,
    pub level: i32,
}

impl Exchange for HttpClient {
    fn exchange(&self, path: &str, msg: &Message) -> Result<(Message, Traffic), TransportError> {
        HttpClient::exchange(self, path, msg)
    }
    fn parallel(&self) -> bool {
        true
    }
    fn clock_skew_ms(&self) -> Option<i64> {
        HttpClient::clock_skew_ms(self)
    }
    fn encoding(&self) -> Encoding {
        HttpClient::encoding(self)
    }
    fn parent_accept(&self) -> Option<crate::wire::Accept> {
        HttpClient::parent_accept(self)
    }
    fn assume_parent_accept(&self, accept: crate::wire::Accept) {
        HttpClient::assume_parent_accept(self, accept)
    }
    fn exchange_frame(
        &self,
        path: &str,
        msg: &Message,
        frame: &[u8],
        encoding: Encoding,
    ) -> Result<(Message, Traffic), TransportError> {
        HttpClient::exchange_frame(self, path, msg, frame, encoding)
    }
    fn encode_request(
        &self,
        msg: &Message,
        level: i32,
        encoding: Encoding,
    ) -> Result<Vec<u8>, crate::wire::WireError> {
        HttpClient::encode_request(self, msg, level, encoding)
    }
    fn push_level(&self) -> i32 {
        HttpClient::push_level(self)
    }
    fn set_push_level(&self, level: i32) {
        HttpClient::set_push_level(self, level)
    }
    fn link_rate(&self) -> Option<LinkRate> {
        Some(HttpClient::link_rate(self))
    }
    fn assume_link_rate(&self, rate: LinkRate) {
        HttpClient::assume_link_rate(self, rate)
    }
}

impl Exchange for MqttClient {
    fn exchange(&self, _path: &str, msg: &Message) -> Result<(Message, Traffic), TransportError> {
        MqttClient::exchange(self, msg)
    }
    fn encoding(&self) -> Encoding {
        MqttClient::encoding(self)
    }
    fn push_level(&self) -> i32 {
        MqttClient::push_level(self)
    }
    fn set_push_level(&self, level: i32) {
        MqttClient::set_push_level(self, level)
    }
}

/// MQTT first; HTTP when the broker path fails in a way a retry could fix.
pub struct MqttThenHttp {
    pub mqtt: MqttClient,
    pub http: HttpClient,
}

impl Exchange for MqttThenHttp {
    fn exchange(&self, path: &str, msg: &Message) -> Result<(Message, Traffic), TransportError> {
        match self.mqtt.exchange(msg) {
            Err(e) if e.is_retryable() => {
                tracing::info!(error = %e, "MQTT exchange failed; falling back to HTTP");
                self.http.exchange(path, msg)
            }
            other => other,
        }
    }
    fn clock_skew_ms(&self) -> Option<i64> {
        self.http.clock_skew_ms()
    }
    fn push_level(&self) -> i32 {
        self.mqtt.push_level()
    }
    fn set_push_level(&self, level: i32) {
        self.mqtt.set_push_level(level);
        self.http.set_push_level(level);
    }
    // The HTTP fallback's measurements (MQTT's answers are not timed).
    fn link_rate(&self) -> Option<LinkRate> {
        Some(self.http.link_rate())
    }
    fn assume_link_rate(&self, rate: LinkRate) {
        self.http.assume_link_rate(rate)
    }
}
