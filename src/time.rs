//! Time at the edges: the wall clock, and the three textual forms clinicsync reads or
//! writes (ISO-8601 UTC for people and FHIR, HTTP `Date` for clock-skew checks, and
//! durations in words). Only the daemon and the CLI read the wall clock; everything
//! below them (engine, store, wire) takes `now_ms` as an argument, so tests can run
//! a node at any instant and a clock set back or forward is an input, not a hidden
//! state. No time zone database: civil dates are computed from day numbers.

/// Milliseconds since the Unix epoch. A clock before 1970 reads as 0 rather than
/// failing: the HLC then keeps the last stamp it saw ([`crate::model::Hlc`]).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `(year, month, day)` of a day number (the inverse of [`days_from_civil`]).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `2026-11-26T10:00:00Z` from epoch milliseconds (UTC, whole seconds).
pub fn fmt_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Epoch ms as an HTTP `Date` (IMF-fixdate, `Thu, 26 Nov 2026 10:00:00 GMT`).
pub fn http_date(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{weekday}, {d:02} {} {y} {:02}:{:02}:{:02} GMT",
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// An HTTP `Date` (IMF-fixdate) as epoch ms; `None` for anything else (the obsolete
/// RFC 850 and asctime forms are not produced by any server we talk to).
pub fn http_date_ms(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, d, mon, y, hms, "GMT"] = parts.as_slice() else {
        return None;
    };
    let mo = MONTHS.iter().position(|m| m == mon)? as i64 + 1;
    let (d, y): (i64, i64) = (d.parse().ok()?, y.parse().ok()?);
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, sec) = (t.next()??, t.next()??, t.next()??);
    if t.next().is_some() || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec;
    u64::try_from(secs * 1000).ok()
}

/// A duration for people: "3 s", "12 min", "5 h", "2 days".
pub fn words_for_ms(ms: u64) -> String {
    let s = (ms + 500) / 1000;
    let round = |unit: u64| (s + unit / 2) / unit;
    match s {
        0..=119 => format!("{s} s"),
        120..=7_199 => format!("{} min", round(60)),
        7_200..=169_199 => format!("{} h", round(3600)),
        _ => format!("{} days", round(86_400)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_and_http_dates_agree_and_round_trip() {
        let ms = 1_796_207_291_000; // 2026-12-02T10:28:11Z, a Wednesday
        assert_eq!(fmt_time(ms), "2026-12-02T10:28:11Z");
        assert_eq!(http_date(ms), "Wed, 02 Dec 2026 10:28:11 GMT");
        assert_eq!(http_date_ms(&http_date(ms)), Some(ms));
        assert_eq!(fmt_time(0), "1970-01-01T00:00:00Z");
        for ms in [0u64, 1_795_000_000_000, 951_782_400_000, 4_102_444_799_000] {
            assert_eq!(http_date_ms(&http_date(ms)), Some(ms), "{}", http_date(ms));
        }
        // Leap day and the turn of a century that is not a leap year.
        for (y, m, d) in [(2024, 2, 29), (2100, 3, 1), (2000, 2, 29), (1999, 12, 31)] {
            assert_eq!(civil_from_days(days_from_civil(y, m, d)), (y, m, d));
        }
    }

    #[test]
    fn a_malformed_http_date_is_none_not_a_guess() {
        for bad in [
            "",
            "Wed, 02 Dec 2026 10:28:11",
            "Wed, 02 Dex 2026 10:28:11 GMT",
            "Wed, 32 Dec 2026 10:28:11 GMT",
            "Wed, 02 Dec 2026 25:28:11 GMT",
            "Wed, 02 Dec 2026 10:28 GMT",
            "Wed, 02 Dec 2026 10:28:11:00 GMT",
        ] {
            assert_eq!(http_date_ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn durations_read_in_the_largest_sensible_unit() {
        assert_eq!(words_for_ms(3_000), "3 s");
        assert_eq!(words_for_ms(12 * 60_000), "12 min");
        assert_eq!(words_for_ms(5 * 3_600_000), "5 h");
        assert_eq!(words_for_ms(2 * 86_400_000), "2 days");
    }
}
