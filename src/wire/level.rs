//! The zstd level of the frames a clinic pushes, chosen from its link's measured
//! upload rate: a higher level spends encoder CPU to send fewer bytes, which pays on
//! a slow link and costs time on a fast one.
//!
//! The model (measured in BENCHMARKS.md, "Push frames at the level the link pays
//! for"): per MiB of v2 payload, level `L` costs `cpu_s_per_mib(L) × CPU_FACTOR`
//! seconds of encoding and `FAST_BYTES_PER_PAYLOAD × bytes_vs_fast(L) × 2^20` bytes on
//! the link; the level with the smallest sum at the measured rate wins. Both terms
//! grow with the payload, so the choice does not depend on the batch's size, only on
//! the rate. The constants are the *conservative* ends of what was measured: the
//! smaller saving (held-out third-party data, not our generator's), the slower CPU
//! (the measuring machine's time times [`CPU_FACTOR`]: 4 on anything but x86-64, a
//! clinic's ARM box being assumed four times slower than that machine).
//!
//! Invariants
//! - An unknown rate (first contact, a transport that does not measure, a value out of
//!   any plausible range) gives [`super::LEVEL_FAST`]: the level every build before
//!   this one used.
//! - The choice sticks: the level of the previous round is kept unless another
//!   level would still be better at a rate [`HYSTERESIS`] further against the move
//!   (a higher level must win at a rate 25 % faster, a lower one at a rate 25 %
//!   slower), so a rate hovering around a threshold does not flip the level every
//!   round (a new level makes a new frame, and a transfer cut before a restart
//!   resumes only the same frame).
//! - Memory stays bounded at any level: the payload's size is pledged (a batch is at
//!   most `sync.push_batch_bytes`, 2 MiB), so zstd sizes its tables to it, and above
//!   [`super::LEVEL_BULK`] the window is capped at 2 MiB ([`window_cap`]) whatever a
//!   technician configures. Measured: a 2,000-record push takes a 4.3 MiB context at
//!   level 15 against 1.3 MiB at level 3. Capping hash and chain logs too (20/17/17)
//!   saves 1 MiB of it and costs 5 % more bytes on held-out data, so they are not.
//!
//! Pure: no I/O, no clock, no errors.

use super::{Message, LEVEL_FAST};

/// The level pushes go at on a link slow enough to pay for it.
pub const LEVEL_SLOW_LINK: i32 = 15;

/// The highest level a technician may configure (zstd's ordinary range).
pub const MAX_LEVEL: i32 = 19;

/// How much slower than the machine the constants were measured on a clinic's CPU is
/// assumed to be: an x86-64 box as fast (a slower one still gains on links well below
/// the threshold), anything else (arm64 boards) four times slower.
#[cfg(target_arch = "x86_64")]
pub const CPU_FACTOR: f64 = 1.0;
#[cfg(not(target_arch = "x86_64"))]
pub const CPU_FACTOR: f64 = 4.0;

/// Bytes of a level-3 push frame per byte of its v2 payload (bodies as columns), on
/// held-out carebundle data (0.0444; ours 0.0439). With [`CANDIDATES`]' saving this
/// is the smaller of the two absolute savings measured (0.0020 bytes per payload byte
/// held out, 0.0088 ours).
pub const FAST_BYTES_PER_PAYLOAD: f64 = 0.044;

/// A level a push may use: its frame's size relative to level 3's, and its encoder's
/// seconds per MiB of payload on the machine of the measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub level: i32,
    pub bytes_vs_fast: f64,
    pub cpu_s_per_mib: f64,
}

/// The levels an automatic choice picks from, as measured (v2 with the shipped
/// dictionary and bodies as columns, one context per frame, x86-64; BENCHMARKS.md
/// "Bodies as shapes and columns"): level 15 makes a push 4.6 % smaller held out
/// (20 % on ours) at 0.083 s per MiB of payload (ours, the slower of the two per
/// byte), level 3 0.003 s. Level 9 saves as much as 15 held out but 11 % on ours
/// against 20 %, and 19 is within 3 % of 15 at twice its CPU: neither is listed.
pub const CANDIDATES: [Candidate; 2] = [
    Candidate {
        level: LEVEL_FAST,
        bytes_vs_fast: 1.0,
        cpu_s_per_mib: 0.003,
    },
    Candidate {
        level: LEVEL_SLOW_LINK,
        bytes_vs_fast: 0.954,
        cpu_s_per_mib: 0.083,
    },
];

/// The previous level is kept unless another one would still cost less with the rate
/// this fraction further against the move.
pub const HYSTERESIS: f64 = 0.25;

/// Rates outside this range (bits per second) are not measurements of a link a clinic
/// can have: they are treated as unknown.
pub const PLAUSIBLE_BPS: std::ops::RangeInclusive<u64> = 1_000..=100_000_000_000;

/// Seconds one MiB of payload costs at `c` over a link of `bps` bits per second.
fn cost(c: &Candidate, bps: u64) -> f64 {
    let link_bytes = FAST_BYTES_PER_PAYLOAD * c.bytes_vs_fast * (1u64 << 20) as f64;
    c.cpu_s_per_mib * CPU_FACTOR + link_bytes * 8.0 / bps as f64
}

/// The level of the next round's push frames, for an upload rate of `bps` (`None`:
/// not measured) when the last round pushed at `previous`.
pub fn choose(bps: Option<u64>, previous: i32) -> i32 {
    let Some(bps) = bps.filter(|b| PLAUSIBLE_BPS.contains(b)) else {
        return LEVEL_FAST;
    };
    let best = CANDIDATES
        .iter()
        .min_by(|a, b| cost(a, bps).total_cmp(&cost(b, bps)))
        .unwrap_or(&CANDIDATES[0]);
    let Some(prev) = CANDIDATES.iter().find(|c| c.level == previous) else {
        return best.level;
    };
    // A higher level pays more as the link gets slower: it must still win on a faster
    // one; a lower level must still win on a slower one.
    let against = if best.level > prev.level {
        bps as f64 * (1.0 + HYSTERESIS)
    } else {
        bps as f64 / (1.0 + HYSTERESIS)
    };
    let against = against.max(1.0) as u64;
    if cost(best, against) < cost(prev, against) {
        best.level
    } else {
        prev.level
    }
}

/// The rate (bits per second) below which [`LEVEL_SLOW_LINK`] costs less than
/// [`LEVEL_FAST`] (without hysteresis): for documentation and `status`.
pub fn slow_link_below_bps() -> u64 {
    let (fast, slow) = (&CANDIDATES[0], &CANDIDATES[1]);
    let saved_bits = FAST_BYTES_PER_PAYLOAD
        * (fast.bytes_vs_fast - slow.bytes_vs_fast)
        * 8.0
        * (1u64 << 20) as f64;
    let extra_cpu = (slow.cpu_s_per_mib - fast.cpu_s_per_mib) * CPU_FACTOR;
    (saved_bits / extra_cpu) as u64
}

/// A level a technician may set (`sync.push_level`), or the automatic choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PushLevel {
    #[default]
    Auto,
    Fixed(i32),
}

/// The level to encode `msg` at when this node's pushes go at `push_level`: frames that
/// carry pushed records at that level, everything else (pull requests, transfer
/// pieces, whose data is compressed already) at [`LEVEL_FAST`].
pub fn for_message(msg: &Message, push_level: i32) -> i32 {
    match msg {
        Message::PushRequest(_) | Message::SyncRequest(_) => push_level,
        _ => LEVEL_FAST,
    }
}

/// The window log of frames above [`super::LEVEL_BULK`] (only a clinic's pushes go
/// there): 2 MiB, a whole batch, whatever the level would take.
pub fn window_cap(level: i32) -> Option<u32> {
    (level > super::LEVEL_BULK).then_some(21)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_or_implausible_rate_pushes_at_the_fast_level() {
        for previous in [LEVEL_FAST, LEVEL_SLOW_LINK, 0, -7, 99] {
            assert_eq!(choose(None, previous), LEVEL_FAST);
            assert_eq!(choose(Some(0), previous), LEVEL_FAST, "0 bit/s");
            assert_eq!(choose(Some(999), previous), LEVEL_FAST, "under 1 kbit/s");
            assert_eq!(
                choose(Some(u64::MAX), previous),
                LEVEL_FAST,
                "terabytes a second"
            );
        }
    }

    #[test]
    fn a_slow_link_pushes_at_the_slow_link_level_and_a_fast_one_at_the_fast_level() {
        // 9.6 kbit/s (GSM data) and 20 kbit/s (a poor GPRS link): on any CPU.
        assert_eq!(choose(Some(9_600), LEVEL_FAST), LEVEL_SLOW_LINK);
        assert_eq!(choose(Some(20_000), LEVEL_FAST), LEVEL_SLOW_LINK);
        assert_eq!(choose(Some(2_000_000), LEVEL_SLOW_LINK), LEVEL_FAST);
        assert_eq!(choose(Some(1_000_000_000), LEVEL_SLOW_LINK), LEVEL_FAST);
    }

    #[test]
    fn the_threshold_sits_where_both_levels_cost_the_same() {
        let t = slow_link_below_bps();
        let (fast, slow) = (&CANDIDATES[0], &CANDIDATES[1]);
        let d = (cost(fast, t) - cost(slow, t)).abs();
        assert!(d < 1e-3 * cost(fast, t), "{d}");
        assert!(cost(slow, t / 2) < cost(fast, t / 2));
        assert!(cost(slow, t * 2) > cost(fast, t * 2));
    }

    #[test]
    fn a_rate_near_the_threshold_keeps_the_previous_level() {
        let t = slow_link_below_bps();
        for bps in [t * 85 / 100, t, t * 115 / 100] {
            assert_eq!(choose(Some(bps), LEVEL_FAST), LEVEL_FAST, "{bps}");
            assert_eq!(choose(Some(bps), LEVEL_SLOW_LINK), LEVEL_SLOW_LINK, "{bps}");
        }
        // Far enough from it, the level moves whatever it was.
        assert_eq!(choose(Some(t / 3), LEVEL_FAST), LEVEL_SLOW_LINK);
        assert_eq!(choose(Some(t * 3), LEVEL_SLOW_LINK), LEVEL_FAST);
        // A previous level that is no candidate (configured by hand before) is no
        // reason to stay.
        assert_eq!(choose(Some(t * 3), 19), LEVEL_FAST);
        assert_eq!(choose(Some(t / 3), 19), LEVEL_SLOW_LINK);
    }

    #[test]
    fn only_pushed_records_get_the_push_level() {
        use crate::wire::{ChunkGet, ChunkRef, PushRequest};
        let push = Message::PushRequest(PushRequest {
            node: "c".into(),
            records: vec![],
        });
        assert_eq!(for_message(&push, 15), 15);
        let get = Message::ChunkGet(ChunkGet {
            id: [0; 32],
            offset: 0,
            max: 1,
        });
        assert_eq!(for_message(&get, 15), LEVEL_FAST);
        let query = Message::ChunkQuery(ChunkRef {
            id: [0; 32],
            total: 1,
            answer_chunk: 0,
        });
        assert_eq!(for_message(&query, 15), LEVEL_FAST);
    }

    #[test]
    fn levels_above_the_hubs_are_capped() {
        assert_eq!(window_cap(LEVEL_FAST), None);
        assert_eq!(window_cap(super::super::LEVEL_BULK), None);
        assert_eq!(window_cap(LEVEL_SLOW_LINK), Some(21));
        assert_eq!(window_cap(MAX_LEVEL), Some(21));
    }

    #[test]
    fn the_threshold_is_where_the_measurements_put_it() {
        // x86-64: ~210 kbit/s (a 128 kbit/s link pushes at 15); arm64: a quarter.
        let t = slow_link_below_bps();
        if cfg!(target_arch = "x86_64") {
            assert!((150_000..250_000).contains(&t), "{t}");
            assert_eq!(choose(Some(128_000), LEVEL_FAST), LEVEL_SLOW_LINK);
            assert_eq!(choose(Some(1_000_000), LEVEL_FAST), LEVEL_FAST);
        } else {
            assert!((35_000..65_000).contains(&t), "{t}");
        }
    }
}
