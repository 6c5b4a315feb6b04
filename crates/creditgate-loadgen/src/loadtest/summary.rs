//! The verdict on a run ([`Summary`]), what was asked ([`Scenario`]), and the final table
//! printed on stdout (also the summary table of the HTML report).

use std::collections::BTreeMap;

use serde::Serialize;

use super::args::ModeArg;
use crate::Report;

/// What a run was asked to do (the heading of the outputs, `scenario` in the JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scenario {
    pub nodes: Vec<String>,
    /// Whether the nodes were started by `--spawn`.
    pub spawned: bool,
    pub keys: u64,
    pub credits_per_key: u64,
    pub cost: u64,
    pub mode: ModeArg,
    /// Open loop: arrivals per second.
    pub rate_per_sec: Option<f64>,
    /// Open loop without `--rate`: the factor the rate was derived with.
    pub load: Option<f64>,
    /// Closed loop: workers; open loop: requests in flight at most.
    pub concurrency: usize,
    pub duration_s: u64,
    pub seed: u64,
    pub timeout_ms: u64,
    pub max_error_rate: f64,
}

impl Scenario {
    /// `keys × credits_per_key`, the credits granted to the run.
    pub fn credits_granted(&self) -> u64 {
        self.keys.saturating_mul(self.credits_per_key)
    }

    /// One line saying what ran.
    pub fn title(&self) -> String {
        let nodes = match self.nodes.len() {
            1 => "1 node".to_owned(),
            n => format!("{n} nodes"),
        };
        let spawned = if self.spawned { " (spawned)" } else { "" };
        let keys = match self.keys {
            1 => "1 key".to_owned(),
            n => format!("{n} keys"),
        };
        let mode = match (self.mode, self.rate_per_sec, self.load) {
            (ModeArg::Open, Some(rate), Some(load)) => {
                format!("open loop {rate} req/s (load {load:?})")
            }
            (ModeArg::Open, Some(rate), None) => format!("open loop {rate} req/s"),
            _ => format!("closed loop, {} workers", self.concurrency),
        };
        format!(
            "creditgate loadtest: {nodes}{spawned}, {keys} × {} credits, cost {}, {mode}, {} s, seed {}",
            self.credits_per_key, self.cost, self.duration_s, self.seed
        )
    }
}

/// The verdict on a run's [`Report`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// `keys × credits`.
    pub credits_granted: u64,
    /// VALID answers a correct service gives: per key `min(requests to it, credits / cost)`,
    /// summed (request i uses key i mod keys).
    pub expected_valid: u64,
    /// `valid / expected_valid` (`None` when nothing was expected).
    pub credit_accuracy: Option<f64>,
    /// `valid − expected_valid`.
    pub valid_minus_expected: i64,
    /// Credits granted by VALID answers beyond those the keys had: `max(0, valid × cost −
    /// credits_granted)`. Must be 0.
    pub over_spend: u64,
    pub error_count: u64,
    pub error_rate: f64,
    /// Sum of `credits.remaining` of the keys via `keys.getKey` after the run (`None`:
    /// not known).
    pub final_remaining: Option<u64>,
    /// Why the run failed (empty: it passed).
    pub failures: Vec<String>,
    pub passed: bool,
}

impl Summary {
    pub fn new(report: &Report, scenario: &Scenario, final_remaining: Option<u64>) -> Summary {
        let credits_granted = scenario.credits_granted();
        let expected = expected_valid(
            report.requests,
            scenario.keys,
            scenario.credits_per_key,
            scenario.cost,
        );
        let diff = i128::from(report.valid) - i128::from(expected);
        let valid_minus_expected =
            i64::try_from(diff).unwrap_or(if diff < 0 { i64::MIN } else { i64::MAX });
        let credit_accuracy = (expected > 0).then(|| report.valid as f64 / expected as f64);
        let over_spend = report
            .valid
            .saturating_mul(scenario.cost)
            .saturating_sub(credits_granted);
        let error_count = report.error_count();
        let error_rate = report.error_rate();

        let mut failures = Vec::new();
        if over_spend > 0 {
            failures.push(format!(
                "over-spend: {over_spend} credits beyond the {credits_granted} granted"
            ));
        }
        if error_rate > scenario.max_error_rate {
            failures.push(format!(
                "error rate {} above --max-error-rate {}",
                percent(error_rate),
                percent(scenario.max_error_rate)
            ));
        }
        if report.requests == 0 {
            failures.push("no request was sent".to_owned());
        }
        Summary {
            credits_granted,
            expected_valid: expected,
            credit_accuracy,
            valid_minus_expected,
            over_spend,
            error_count,
            error_rate,
            final_remaining,
            passed: failures.is_empty(),
            failures,
        }
    }
}

/// VALID answers a correct service gives to `requests` verifications spread over `keys`
/// keys (request i uses key i mod keys) of `credits` each at `cost`: per key
/// `min(its requests, credits / cost)`, summed.
pub fn expected_valid(requests: u64, keys: u64, credits: u64, cost: u64) -> u64 {
    if keys == 0 {
        return 0;
    }
    let per_key_cap = credits / cost.max(1);
    let base = requests / keys;
    let extra = requests % keys;
    let with_extra = extra.saturating_mul(base.saturating_add(1).min(per_key_cap));
    let without = (keys - extra).saturating_mul(base.min(per_key_cap));
    with_extra.saturating_add(without)
}

/// `0.0123` → `1.23 %`.
pub(super) fn percent(fraction: f64) -> String {
    format!("{:.2} %", fraction * 100.0)
}

/// The rows of the final table (also the summary table of the HTML report).
pub fn table_rows(
    report: &Report,
    scenario: &Scenario,
    summary: &Summary,
) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |label: &str, value: String| rows.push((label.to_owned(), value));
    row("requests", report.requests.to_string());
    row("VALID", report.valid.to_string());
    row("USAGE_EXCEEDED", report.usage_exceeded.to_string());
    row(
        "other outcomes",
        if report.other_outcomes.is_empty() {
            "none".to_owned()
        } else {
            join_counts(&report.other_outcomes)
        },
    );
    row(
        "errors",
        format!(
            "{} ({} of requests; limit {})",
            summary.error_count,
            percent(summary.error_rate),
            percent(scenario.max_error_rate)
        ),
    );
    for (kind, n) in &report.errors {
        row(&format!("  error: {kind}"), n.to_string());
    }
    row(
        "expected VALID",
        format!(
            "{} ({} key(s) × {} credits / cost {})",
            summary.expected_valid, scenario.keys, scenario.credits_per_key, scenario.cost
        ),
    );
    row(
        "credit accuracy",
        match summary.credit_accuracy {
            Some(ratio) => format!(
                "{ratio:.4} (VALID − expected: {:+})",
                summary.valid_minus_expected
            ),
            None => format!("n/a (VALID − expected: {:+})", summary.valid_minus_expected),
        },
    );
    row(
        "over-spend",
        format!(
            "{} credits ({} × cost {} = {} of {} granted){}",
            summary.over_spend,
            report.valid,
            scenario.cost,
            report.valid.saturating_mul(scenario.cost),
            summary.credits_granted,
            if summary.over_spend > 0 {
                "  OVER-SPENT"
            } else {
                ""
            }
        ),
    );
    row(
        "throughput",
        format!(
            "{:.1} answers/s over {:.2} s",
            report.rps, report.duration_s
        ),
    );
    let l = &report.latency_ms;
    row(
        "latency p50 / p95 / p99 / max",
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2} ms",
            l.p50, l.p95, l.p99, l.max
        ),
    );
    let sent: u64 = report.nodes.values().sum();
    for (url, n) in &report.nodes {
        let share = if sent > 0 {
            *n as f64 / sent as f64
        } else {
            0.0
        };
        row(
            &format!("requests to {url}"),
            format!("{n} ({})", percent(share)),
        );
    }
    let reported = report
        .min_remaining
        .map_or_else(|| "– (no VALID answer)".to_owned(), |r| r.to_string());
    let via_get = summary
        .final_remaining
        .map_or_else(|| "unknown".to_owned(), |r| r.to_string());
    row(
        "final remaining",
        format!("reported {reported} · keys.getKey {via_get}"),
    );
    row(
        "result",
        if summary.passed {
            "PASS".to_owned()
        } else {
            format!("FAIL: {}", summary.failures.join("; "))
        },
    );
    rows
}

fn join_counts(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `title`, then the rows as two aligned columns.
pub fn format_table(title: &str, rows: &[(String, String)]) -> String {
    let width = rows
        .iter()
        .map(|(label, _)| label.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = format!("{title}\n");
    let rule = "─".repeat(width + 2 + 24);
    out.push_str(&rule);
    out.push('\n');
    for (label, value) in rows {
        let pad = width - label.chars().count();
        out.push_str(&format!("{label}{}  {value}\n", " ".repeat(pad)));
    }
    out.push_str(&rule);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(keys: u64, credits: u64, cost: u64) -> Scenario {
        Scenario {
            nodes: vec!["http://a".into()],
            spawned: false,
            keys,
            credits_per_key: credits,
            cost,
            mode: ModeArg::Open,
            rate_per_sec: Some(200.0),
            load: Some(2.0),
            concurrency: 1024,
            duration_s: 10,
            seed: 7,
            timeout_ms: 5000,
            max_error_rate: 0.01,
        }
    }

    #[test]
    fn expected_valid_caps_each_key() {
        assert_eq!(expected_valid(2000, 1, 1000, 1), 1000);
        assert_eq!(expected_valid(500, 1, 1000, 1), 500);
        assert_eq!(expected_valid(2000, 1, 1000, 3), 333);
        // 7 requests over 3 keys: 3, 2, 2 requests; cap 2 each.
        assert_eq!(expected_valid(7, 3, 2, 1), 6);
        // Cap 3: 3 + 2 + 2.
        assert_eq!(expected_valid(7, 3, 3, 1), 7);
        assert_eq!(expected_valid(0, 3, 3, 1), 0);
        assert_eq!(expected_valid(5, 0, 3, 1), 0);
    }

    #[test]
    fn over_spend_and_error_rate_fail_the_run() {
        let mut report = Report {
            requests: 2000,
            valid: 1000,
            usage_exceeded: 1000,
            ..Report::default()
        };
        let s = Summary::new(&report, &scenario(1, 1000, 1), Some(0));
        assert!(s.passed, "{s:?}");
        assert_eq!((s.expected_valid, s.over_spend), (1000, 0));
        assert_eq!(s.credit_accuracy, Some(1.0));

        report.valid = 1003;
        report.usage_exceeded = 997;
        let s = Summary::new(&report, &scenario(1, 1000, 1), Some(0));
        assert_eq!((s.over_spend, s.valid_minus_expected), (3, 3));
        assert!(!s.passed);
        assert!(s.failures[0].contains("over-spend: 3"), "{:?}", s.failures);

        report.valid = 1000;
        report.usage_exceeded = 979;
        report.errors.insert("timeout".into(), 21);
        let s = Summary::new(&report, &scenario(1, 1000, 1), Some(0));
        assert!(!s.passed);
        assert!(
            s.failures[0].contains("error rate 1.05 %"),
            "{:?}",
            s.failures
        );

        let s = Summary::new(&Report::default(), &scenario(1, 1000, 1), None);
        assert_eq!(s.failures, vec!["no request was sent".to_owned()]);
    }

    #[test]
    fn table_has_every_figure() {
        let mut report = Report {
            requests: 2000,
            valid: 1000,
            usage_exceeded: 999,
            min_remaining: Some(0),
            ..Report::default()
        };
        report.errors.insert("http 503".into(), 1);
        report.nodes.insert("http://a".into(), 2000);
        let sc = scenario(1, 1000, 1);
        let s = Summary::new(&report, &sc, Some(0));
        let rows = table_rows(&report, &sc, &s);
        let labels: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        for want in [
            "requests",
            "VALID",
            "USAGE_EXCEEDED",
            "other outcomes",
            "errors",
            "  error: http 503",
            "expected VALID",
            "credit accuracy",
            "over-spend",
            "throughput",
            "latency p50 / p95 / p99 / max",
            "requests to http://a",
            "final remaining",
            "result",
        ] {
            assert!(labels.contains(&want), "{want} missing from {labels:?}");
        }
        let table = format_table(&sc.title(), &rows);
        assert!(table.contains("reported 0 · keys.getKey 0"), "{table}");
        assert!(table.contains("PASS"), "{table}");
    }
}
