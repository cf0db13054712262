//! `clinicsync fleet`: every node below this hub (children and the nodes below them,
//! from the health reports they send with each exchange — `crate::health`), worst
//! first, each problem in words. Exit code [`super::EXIT_ATTENTION`] when something
//! needs a person, so a cron job or monitoring check can act on it.
//!
//! Ranking: each problem has a weight (a silent node outranks a quarantined record,
//! which outranks an old version); a node's score is the sum; ties go to the node
//! silent longest, then by id. Thresholds are constants here, `--silent-hours` aside.

use serde::Serialize;

use super::{open_existing, Failure, Out, EXIT_ATTENTION};
use crate::config::Config;
use crate::health::HealthReport;
use crate::textsafe::safe;
use crate::time::words_for_ms;

/// Free disk below this is a problem; below a fifth of it, an urgent one.
const LOW_DISK: u64 = 1 << 30;
/// A clock further than this from its parent's is a problem.
const SKEW_MS: u64 = 5 * 60_000;
/// Records waiting to go up, or not yet pulled, beyond this are a problem.
const BACKLOG: u64 = 1_000;

/// One node's row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub node: String,
    /// The child of this hub it is reached through (itself for a child).
    pub via: String,
    pub heard_ms: Option<u64>,
    pub silent_ms: Option<u64>,
    pub problems: Vec<String>,
    pub needs_attention: bool,
    #[serde(skip)]
    score: u64,
    pub report: Option<HealthReport>,
}

/// `a.b.c` versions compared numerically; anything unparsable compares as equal.
fn older(a: &str, b: &str) -> bool {
    let parse = |v: &str| -> Option<Vec<u64>> {
        v.split(['.', '-', '+'])
            .take(3)
            .map(|p| p.parse().ok())
            .collect()
    };
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => x < y,
        _ => false,
    }
}

/// The rows for every node this hub knows of, worst first.
pub fn rows(
    children: &[(String, Vec<String>)],
    reports: Vec<(String, HealthReport)>,
    silent_ms: u64,
    now_ms: u64,
) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let enrolled = |node: &str| {
        children
            .iter()
            .any(|(c, below)| c == node || below.iter().any(|b| b == node))
    };
    for (via, r) in reports {
        // A node no longer enrolled (removed with `child remove`) is not this hub's
        // to watch: its last report stays in the store, not in the fleet.
        if via != "(this hub)" && !enrolled(&r.node) {
            continue;
        }
        rows.push(Row {
            node: r.node.clone(),
            via,
            heard_ms: r.heard_ms,
            silent_ms: r.heard_ms.map(|h| now_ms.saturating_sub(h)),
            problems: Vec::new(),
            needs_attention: false,
            score: 0,
            report: Some(r),
        });
    }
    for (child, below) in children {
        for node in std::iter::once(child).chain(below) {
            if !rows.iter().any(|r| r.node == *node) {
                rows.push(Row {
                    node: node.clone(),
                    via: child.clone(),
                    heard_ms: None,
                    silent_ms: None,
                    problems: Vec::new(),
                    needs_attention: false,
                    score: 0,
                    report: None,
                });
            }
        }
    }
    for row in &mut rows {
        judge(row, silent_ms);
    }
    // A node below a silent district is silent because of it: say where to start.
    let silent: Vec<(String, u64)> = rows
        .iter()
        .filter(|r| r.problems.iter().any(|p| p.starts_with("silent for")))
        .map(|r| (r.node.clone(), r.score))
        .collect();
    for row in &mut rows {
        let Some((_, via_score)) = silent.iter().find(|(n, _)| *n == row.via && *n != row.node)
        else {
            continue;
        };
        if let Some(p) = row
            .problems
            .iter_mut()
            .find(|p| p.starts_with("silent for"))
        {
            p.push_str(&format!(
                " — reached through {}, which is silent too: start there",
                row.via
            ));
            // The district comes first.
            row.score = row.score.min(via_score.saturating_sub(1));
        }
    }
    rows.sort_by(|a, b| {
        b.score
            .cmp(&a.score)
            .then(
                b.silent_ms
                    .unwrap_or(u64::MAX)
                    .cmp(&a.silent_ms.unwrap_or(u64::MAX)),
            )
            .then(a.node.cmp(&b.node))
    });
    rows
}

fn judge(row: &mut Row, silent_limit: u64) {
    let mut add = |score: u64, what: String| {
        row.score += score;
        row.problems.push(what);
    };
    let Some(r) = row.report.clone() else {
        add(
            2_000,
            "never reported: no exchange since it was enrolled (or since this hub keeps health reports)".into(),
        );
        row.needs_attention = true;
        return;
    };
    if let Some(s) = row.silent_ms.filter(|s| *s > silent_limit) {
        add(
            1_000 + s / 3_600_000,
            format!(
                "silent for {} (threshold {})",
                words_for_ms(s),
                words_for_ms(silent_limit)
            ),
        );
    }
    match r.disk_free {
        Some(d) if d < LOW_DISK / 5 => add(900, format!("disk almost full: {} MB free", d >> 20)),
        Some(d) if d < LOW_DISK => add(450, format!("disk low: {} MB free", d >> 20)),
        _ => {}
    }
    if r.quarantine > 0 {
        let top = r
            .top_quarantine
            .first()
            .map(|q| format!(" — most: {} ({}×)", q.reason, q.count))
            .unwrap_or_default();
        add(
            500 + r.quarantine.min(400),
            format!("{} quarantined{top}", r.quarantine),
        );
    }
    if let Some(e) = &r.emr_error {
        add(400, format!("EMR: {e}"));
    }
    if let Some(skew) = r.clock_skew_ms.filter(|s| s.unsigned_abs() > SKEW_MS) {
        add(
            350,
            format!(
                "clock {} {}",
                words_for_ms(skew.unsigned_abs()),
                if skew > 0 { "ahead" } else { "behind" }
            ),
        );
    }
    if r.outbox > BACKLOG {
        add(300, format!("{} records waiting to go up", r.outbox));
    }
    if r.pull_lag > BACKLOG {
        add(300, format!("{} records behind its parent", r.pull_lag));
    }
    if let Some(e) = &r.link_error {
        add(200, format!("last exchange with its parent failed: {e}"));
    }
    if older(&r.version, env!("CARGO_PKG_VERSION")) {
        add(
            100,
            format!(
                "runs {} (this hub {})",
                r.version,
                env!("CARGO_PKG_VERSION")
            ),
        );
    }
    if r.conflicts_open > 0 {
        add(50, format!("{} conflicts to review", r.conflicts_open));
    }
    row.needs_attention = !row.problems.is_empty();
}

/// `90s`, `30m`, `24h`, `2d` (a bare number is hours) as milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 24h or 2d"))?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" | "" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    Ok(n.saturating_mul(ms))
}

pub fn run(cfg: &Config, json: bool, silent_after_ms: u64, now_ms: u64) -> Out {
    let Some(hub) = &cfg.hub else {
        return Err(Failure::new(
            2,
            "fleet lists the nodes below a hub; this node has no [hub] section",
        ));
    };
    let store = open_existing(cfg)?;
    let children: Vec<(String, Vec<String>)> = hub
        .children
        .iter()
        .map(|c| (c.node.clone(), c.descendants.clone()))
        .collect();
    // This hub's own state first in the list it is judged with.
    let mut own = crate::health::report(&store, crate::engine::PARENT, now_ms)?;
    own.heard_ms = Some(now_ms);
    let mut reports = vec![("(this hub)".to_string(), own)];
    reports.extend(store.health_all()?);
    let rows = rows(&children, reports, silent_after_ms, now_ms);
    let attention = rows.iter().filter(|r| r.needs_attention).count();
    if json {
        super::print_json(&rows);
    } else {
        println!(
            "{:<20} {:<16} {:<12} {:>7} {:>5} {:>5} {:<8} PROBLEMS",
            "NODE", "VIA", "LAST HEARD", "OUTBOX", "QUAR", "CONFL", "VERSION"
        );
        for r in &rows {
            let rep = r.report.as_ref();
            println!(
                "{:<20} {:<16} {:<12} {:>7} {:>5} {:>5} {:<8} {}",
                safe(&r.node),
                safe(&r.via),
                r.silent_ms
                    .map(|s| format!("{} ago", words_for_ms(s)))
                    .unwrap_or_else(|| "never".into()),
                rep.map(|x| x.outbox.to_string()).unwrap_or("-".into()),
                rep.map(|x| x.quarantine.to_string()).unwrap_or("-".into()),
                rep.map(|x| x.conflicts_open.to_string())
                    .unwrap_or("-".into()),
                rep.map(|x| safe(&x.version).into_owned())
                    .unwrap_or("-".into()),
                if r.problems.is_empty() {
                    "ok".to_string()
                } else {
                    safe(&r.problems.join("; ")).into_owned()
                }
            );
        }
        eprintln!("{} nodes, {attention} need attention", rows.len());
    }
    if attention > 0 {
        return Err(Failure::quiet(EXIT_ATTENTION));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, heard: u64) -> HealthReport {
        HealthReport {
            v: 1,
            node: node.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            schema: 7,
            made_ms: heard,
            heard_ms: Some(heard),
            uptime_s: Some(10),
            records: 10,
            outbox: 0,
            inbox: 0,
            quarantine: 0,
            top_quarantine: Vec::new(),
            conflicts_open: 0,
            pull_lag: 0,
            last_sync_ms: Some(heard),
            link_error: None,
            emr_error: None,
            bytes_today: 0,
            disk_free: Some(10 << 30),
            clock_skew_ms: None,
            audit_entries: 1,
            audit_head: String::new(),
            link_rate_bps: None,
        }
    }

    #[test]
    fn the_worst_comes_first_with_its_reasons_in_words() {
        let now = 10 * 86_400_000;
        let mut quarantined = report("q", now - 1_000);
        quarantined.quarantine = 2;
        quarantined.top_quarantine = vec![crate::health::ReasonCount {
            reason: "Invalid Submission".into(),
            count: 2,
        }];
        let mut old = report("old", now - 1_000);
        old.version = "0.0.1".into();
        let mut skewed = report("skew", now - 1_000);
        skewed.clock_skew_ms = Some(-2 * 86_400_000);
        let below = ["never", "silent", "q", "old", "skew"]
            .map(String::from)
            .to_vec();
        let rows = rows(
            &[("d".into(), below), ("fine".into(), vec![])],
            vec![
                ("fine".into(), report("fine", now - 1_000)),
                ("d".into(), report("silent", now - 3 * 86_400_000)),
                ("d".into(), quarantined),
                ("d".into(), old),
                ("d".into(), skewed),
                ("d".into(), report("d", now)),
            ],
            86_400_000,
            now,
        );
        let order: Vec<&str> = rows.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(order, ["never", "silent", "q", "skew", "old", "fine", "d"]);
        assert_eq!(rows[1].problems, ["silent for 3 days (threshold 24 h)"]);
        assert_eq!(
            rows[2].problems,
            ["2 quarantined — most: Invalid Submission (2×)"]
        );
        assert_eq!(rows[3].problems, ["clock 2 days behind"]);
        assert!(rows[4].problems[0].starts_with("runs 0.0.1"));
        assert!(!rows[5].needs_attention && !rows[6].needs_attention);
        assert!(rows[..5].iter().all(|r| r.needs_attention));
    }

    #[test]
    fn a_silent_district_comes_before_its_clinics_and_removed_nodes_are_gone() {
        let now = 10 * 86_400_000;
        let rows = rows(
            &[("d".into(), vec!["c1".into(), "c2".into()])],
            vec![
                ("d".into(), report("d", now - 2 * 3_600_000)),
                ("d".into(), report("c1", now - 30 * 3_600_000)),
                ("d".into(), report("c2", now - 1_000)),
                ("gone".into(), report("gone", now - 9 * 86_400_000)),
            ],
            3_600_000,
            now,
        );
        let order: Vec<&str> = rows.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(order, ["d", "c1", "c2"], "{rows:?}");
        assert!(
            rows[1].problems[0].ends_with("reached through d, which is silent too: start there")
        );
    }

    #[test]
    fn durations_read_as_a_technician_writes_them() {
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("24h"), Ok(86_400_000));
        assert_eq!(parse_duration_ms("6"), Ok(21_600_000));
        assert_eq!(parse_duration_ms("2d"), Ok(172_800_000));
        assert!(parse_duration_ms("2w").unwrap_err().contains("unit"));
        assert!(parse_duration_ms("h")
            .unwrap_err()
            .contains("not a duration"));
    }

    #[test]
    fn versions_compare_as_numbers() {
        assert!(older("0.9.0", "0.10.0"));
        assert!(!older("0.10.0", "0.9.0"));
        assert!(!older("0.2.0", "0.2.0"));
        assert!(!older("garbage", "0.2.0"));
    }
}
