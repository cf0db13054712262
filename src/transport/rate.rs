//! The link's upload rate, estimated from real exchanges: what a clinic's push
//! frames are compressed for ([`crate::wire::level::choose`]).
//!
//! An exchange is measured from the moment its request starts to the moment the
//! answer's status line and headers arrive (the answer's body is not in it). That
//! time holds the upload and latency: a new connection's handshake, the round trip,
//! the parent's work. So:
//! - a request of at most [`LATENCY_MAX_BYTES`] is a **latency** sample (halved when
//!   it opened a connection, which costs a round trip more); the estimate follows a
//!   lower sample at once and a higher one by an eighth (a minimum that forgets);
//! - a request of at least [`RATE_MIN_BYTES`] is a **rate** sample: its bytes over
//!   its time less the latency known (twice that on a new connection), the time
//!   never taken below a quarter of what was measured (a latency estimate that is
//!   too high must not turn one sample into a link of terabits);
//! - anything between, and anything absurd (no bytes, no time, a negative or
//!   non-finite time, more than an hour), is no sample.
//!
//! Rate samples are smoothed geometrically (each moves the estimate a third of the
//! way, in the logarithm), so one sample ten times off moves it about 2×, not 3×
//! slower or faster, and a link that really changed is followed within a few rounds.
//!
//! Kept in the store's meta across processes by the sync round (`link_up_bps`,
//! `link_latency_ms`): a one-shot `clinicsync sync` starts from the last estimate.
//! Values read back are taken only within [`crate::wire::level::PLAUSIBLE_BPS`] and
//! [`MAX_LATENCY_MS`]; outside them they count as not measured (a value that is not a
//! number at all is the store's corruption, [`crate::store::StoreError::BadValue`]).
//!
//! Pure: the caller passes the bytes and the time; no I/O, no clock.

use std::time::Duration;

use crate::wire::level::PLAUSIBLE_BPS;

/// Requests up to this size measure latency.
pub const LATENCY_MAX_BYTES: u64 = 2 << 10;
/// Requests from this size measure the upload rate (at 2 Mbit/s, 16 KiB take 65 ms:
/// smaller requests say more about latency than about rate).
pub const RATE_MIN_BYTES: u64 = 16 << 10;
/// A latency above this (a minute) is not a link's: not taken.
pub const MAX_LATENCY_MS: u64 = 60_000;
/// An exchange taking longer than this is no sample (a clock jump, a suspended box).
const MAX_SAMPLE: Duration = Duration::from_secs(3_600);

/// The estimate: upload rate in bits per second, latency in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkRate {
    up_bps: Option<f64>,
    latency_ms: Option<f64>,
}

impl LinkRate {
    /// The estimate kept before (meta values, `None` when never written); values out
    /// of any plausible range are dropped.
    pub fn resume(up_bps: Option<u64>, latency_ms: Option<u64>) -> LinkRate {
        LinkRate {
            up_bps: up_bps
                .filter(|b| PLAUSIBLE_BPS.contains(b))
                .map(|b| b as f64),
            latency_ms: latency_ms
                .filter(|l| *l <= MAX_LATENCY_MS)
                .map(|l| l as f64),
        }
    }

    /// The upload rate (bits per second), once measured.
    pub fn up_bps(&self) -> Option<u64> {
        self.up_bps
            .map(|b| b.round() as u64)
            .filter(|b| PLAUSIBLE_BPS.contains(b))
    }

    /// The latency (ms) that an exchange costs besides its bytes, once measured.
    pub fn latency_ms(&self) -> Option<u64> {
        self.latency_ms.map(|l| l.round() as u64)
    }

    /// Whether anything was measured or resumed.
    pub fn is_known(&self) -> bool {
        self.up_bps.is_some() || self.latency_ms.is_some()
    }

    /// One exchange: `sent` bytes of request, `elapsed` from its start to the
    /// answer's headers, `new_connection` when it opened its connection. Returns
    /// whether it was taken as a sample.
    pub fn observe(&mut self, sent: u64, elapsed: Duration, new_connection: bool) -> bool {
        let secs = elapsed.as_secs_f64();
        if sent == 0 || elapsed.is_zero() || elapsed > MAX_SAMPLE || !secs.is_finite() {
            return false;
        }
        if sent <= LATENCY_MAX_BYTES {
            let ms = secs * 1000.0 / if new_connection { 2.0 } else { 1.0 };
            if ms > MAX_LATENCY_MS as f64 {
                return false;
            }
            self.latency_ms = Some(match self.latency_ms {
                Some(l) if ms >= l => l + (ms - l) / 8.0,
                _ => ms,
            });
            return true;
        }
        if sent < RATE_MIN_BYTES {
            return false;
        }
        let trips = if new_connection { 2.0 } else { 1.0 };
        let overhead = self.latency_ms.unwrap_or(0.0) / 1000.0 * trips;
        let upload = (secs - overhead).max(secs / 4.0);
        let sample = sent as f64 * 8.0 / upload;
        if !sample.is_finite() || !PLAUSIBLE_BPS.contains(&(sample as u64)) {
            return false;
        }
        self.up_bps = Some(match self.up_bps {
            Some(b) => (b.ln() + (sample.ln() - b.ln()) / 3.0).exp(),
            None => sample,
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nothing_measured_is_unknown() {
        let r = LinkRate::default();
        assert_eq!(
            (r.up_bps(), r.latency_ms(), r.is_known()),
            (None, None, false)
        );
    }

    #[test]
    fn a_large_request_measures_the_rate_less_the_latency_known() {
        let mut r = LinkRate::default();
        // 64 KiB in 4.1 s with no latency known: the naive rate.
        assert!(r.observe(64 << 10, ms(4_100), false));
        assert_eq!(r.up_bps(), Some(127_875));
        // Learn a 600 ms latency, then the same upload with it taken out.
        let mut r = LinkRate::default();
        assert!(r.observe(300, ms(600), false));
        assert_eq!(r.latency_ms(), Some(600));
        assert!(r.observe(64 << 10, ms(4_700), false));
        assert_eq!(r.up_bps(), Some(127_875));
        // On a new connection the handshake's round trip is taken out too.
        let mut r = LinkRate::resume(None, Some(600));
        assert!(r.observe(64 << 10, ms(5_300), true));
        assert_eq!(r.up_bps(), Some(127_875));
    }

    #[test]
    fn latency_follows_a_lower_sample_at_once_and_a_higher_one_slowly() {
        let mut r = LinkRate::default();
        r.observe(100, ms(800), false);
        r.observe(100, ms(600), false);
        assert_eq!(r.latency_ms(), Some(600));
        r.observe(100, ms(1_400), false);
        assert_eq!(r.latency_ms(), Some(700));
        // A new connection's request costs two round trips.
        let mut r = LinkRate::default();
        r.observe(100, ms(1_200), true);
        assert_eq!(r.latency_ms(), Some(600));
    }

    #[test]
    fn samples_are_smoothed_and_a_changed_link_is_followed_within_a_few_rounds() {
        let mut r = LinkRate::default();
        r.observe(1 << 20, Duration::from_secs(64), false); // 131 kbit/s
        let slow = r.up_bps().unwrap();
        r.observe(1 << 20, Duration::from_secs(1), false); // 8.4 Mbit/s, once
        let once = r.up_bps().unwrap();
        assert!(once > slow * 3 && once < slow * 5, "{slow} → {once}");
        for _ in 0..8 {
            r.observe(1 << 20, Duration::from_secs(1), false);
        }
        assert!(r.up_bps().unwrap() > 7_000_000, "{:?}", r.up_bps());
    }

    #[test]
    fn absurd_measurements_are_no_samples() {
        let mut r = LinkRate::resume(Some(128_000), Some(600));
        let before = r;
        assert!(!r.observe(0, ms(1_000), false), "no bytes");
        assert!(!r.observe(64 << 10, Duration::ZERO, false), "no time");
        assert!(
            !r.observe(64 << 10, Duration::from_secs(86_400), false),
            "a day"
        );
        assert!(
            !r.observe(100, Duration::from_secs(600), false),
            "10 min latency"
        );
        assert!(
            !r.observe(8 << 10, ms(10), false),
            "between latency and rate"
        );
        assert!(
            !r.observe(u64::MAX, Duration::from_nanos(1), false),
            "exabytes a nanosecond"
        );
        assert_eq!(r, before);
        // A latency estimate larger than the exchange leaves at least a quarter of
        // the measured time to the upload.
        let mut r = LinkRate::resume(None, Some(60_000));
        assert!(r.observe(64 << 10, ms(4_000), false));
        assert_eq!(r.up_bps(), Some(524_288));
    }

    #[test]
    fn implausible_kept_values_resume_as_unknown() {
        for (bps, lat) in [
            (Some(0), Some(MAX_LATENCY_MS + 1)),
            (Some(u64::MAX), Some(u64::MAX)),
            (Some(999), None),
        ] {
            let r = LinkRate::resume(bps, lat);
            assert_eq!(
                (r.up_bps(), r.latency_ms()),
                (None, None),
                "{bps:?} {lat:?}"
            );
        }
        let r = LinkRate::resume(Some(128_000), Some(600));
        assert_eq!((r.up_bps(), r.latency_ms()), (Some(128_000), Some(600)));
    }
}
