//! The HTML report of `creditgate loadtest`: self-contained (nothing fetched), the five
//! plots present, and — in headless Chromium when it is installed — really drawn.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use creditgate_loadgen::html::{self, PLOT_IDS};
use creditgate_loadgen::loadtest::{table_rows, ModeArg, Scenario, Summary};
use creditgate_loadgen::{LatencyMs, Report, Second};

/// Bound on one headless Chromium run.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);

const NODES: [&str; 3] = [
    "http://127.0.0.1:7070",
    "http://127.0.0.1:7071",
    "http://127.0.0.1:7072",
];

/// A run like `--spawn 3 --credits 1000 --cost 1 --load 2.0 --duration 10`: 200 req/s,
/// the credits gone after 5 s, one timeout.
fn synthetic_report() -> Report {
    let timeline: Vec<Second> = (0..10u64)
        .map(|t| Second {
            t,
            requests: 200,
            valid: if t < 5 { 200 } else { 0 },
            errors: u64::from(t == 7),
            p99_ms: 2.0 + t as f64 * 0.3,
            min_remaining: (t < 5).then(|| 1000 - 200 * (t + 1)),
        })
        .collect();
    let histogram_ms: Vec<(f64, u64)> = (1..=40u32)
        .map(|i| {
            let upper = 0.3 * 1.12f64.powi(i32::try_from(i).unwrap());
            let count = u64::from(40 - i.abs_diff(12).min(40)) * 5;
            (upper, count)
        })
        .collect();
    Report {
        requests: 2000,
        valid: 1000,
        usage_exceeded: 999,
        other_outcomes: BTreeMap::new(),
        errors: BTreeMap::from([("timeout".to_owned(), 1)]),
        duration_s: 10.01,
        rps: 199.8,
        latency_ms: LatencyMs {
            p50: 1.2,
            p95: 2.5,
            p99: 4.1,
            max: 31.0,
            mean: 1.4,
        },
        nodes: NODES
            .iter()
            .zip([671, 660, 669])
            .map(|(u, n)| ((*u).to_owned(), n))
            .collect(),
        min_remaining: Some(0),
        valid_remaining: (0..1000).rev().collect(),
        timeline,
        histogram_ms,
        request_ids: Vec::new(),
    }
}

fn scenario() -> Scenario {
    Scenario {
        nodes: NODES.iter().map(|u| (*u).to_owned()).collect(),
        spawned: true,
        keys: 1,
        credits_per_key: 1000,
        cost: 1,
        mode: ModeArg::Open,
        rate_per_sec: Some(200.0),
        load: Some(2.0),
        concurrency: 1024,
        duration_s: 10,
        seed: 42,
        timeout_ms: 5000,
        max_error_rate: 0.01,
    }
}

fn render(report: &Report) -> String {
    let scenario = scenario();
    let summary = Summary::new(report, &scenario, Some(0));
    let rows = table_rows(report, &scenario, &summary);
    html::render(&scenario.title(), report, &rows)
}

/// Problems that would make the page fetch something: resource-loading markup anywhere,
/// or an `http(s)://` inside a tag, a script or a style (in text it is just a node URL).
fn network_references(page: &str) -> Vec<String> {
    let lower = page.to_ascii_lowercase();
    let mut problems = Vec::new();
    for needle in [
        "<link", "<img", "<iframe", "<object", "<embed", "<base", "src=", "href=", "url(",
        "@import", "srcset", "xlink:",
    ] {
        if lower.contains(needle) {
            problems.push(format!("contains {needle:?}"));
        }
    }
    for block in ["script", "style"] {
        let mut rest = lower.as_str();
        while let Some(start) = rest.find(&format!("<{block}")) {
            let end = rest[start..]
                .find(&format!("</{block}>"))
                .map_or(rest.len(), |e| start + e);
            let body = &rest[start..end];
            if body.contains("http:") || body.contains("https:") || body.contains("//") {
                problems.push(format!("a URL inside <{block}>"));
            }
            rest = &rest[end..];
        }
    }
    let mut in_tag = false;
    for (i, c) in lower.char_indices() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            'h' if in_tag
                && (lower[i..].starts_with("http://") || lower[i..].starts_with("https://")) =>
            {
                let tag_start = lower[..i].rfind('<').unwrap_or(0);
                problems.push(format!("a URL in a tag: {}", &page[tag_start..i + 20]));
            }
            _ => {}
        }
    }
    problems
}

#[test]
fn report_is_self_contained_with_five_plots() {
    let report = synthetic_report();
    let page = render(&report);

    assert_eq!(
        network_references(&page),
        Vec::<String>::new(),
        "the report must load nothing"
    );
    for id in PLOT_IDS {
        let tag = svg_tag(&page, id).unwrap_or_else(|| panic!("no <svg id=\"{id}\">"));
        assert!(tag.contains("class=\"plot\""), "{tag}");
    }
    // Marks of every plot: 3 throughput lines, 1 p99 line, 1 remaining line, one bar
    // per non-empty bucket, one bar per node.
    assert_eq!(marks_in(&page, "plot-throughput"), 3);
    assert_eq!(marks_in(&page, "plot-p99"), 1);
    assert_eq!(marks_in(&page, "plot-remaining"), 1);
    let buckets = report.histogram_ms.iter().filter(|b| b.1 > 0).count();
    assert_eq!(marks_in(&page, "plot-histogram"), buckets);
    assert_eq!(marks_in(&page, "plot-nodes"), 3);
    // The summary table and the node URLs as text.
    for text in ["USAGE_EXCEEDED", "expected VALID", "over-spend", "PASS"] {
        assert!(page.contains(text), "{text} missing");
    }
    for url in NODES {
        assert!(page.contains(url), "{url} missing");
    }
    assert!(page.contains("<script>") && page.contains("data-drawn"));
}

#[test]
fn the_self_containment_check_can_fail() {
    let bad = "<html><body><svg id=\"x\" xmlns=\"http://www.w3.org/2000/svg\"></svg>\
               <script>fetch('https://example.com')</script></body></html>";
    let problems = network_references(bad);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(network_references("<p>see http://127.0.0.1:7070</p>").is_empty());
    assert!(!network_references("<img alt=\"\">").is_empty());
}

/// The opening tag of `<svg id="{id}" …>`.
fn svg_tag<'a>(page: &'a str, id: &str) -> Option<&'a str> {
    let at = page.find(&format!("<svg id=\"{id}\""))?;
    let end = page[at..].find('>')?;
    Some(&page[at..=at + end])
}

/// Data marks (`class="mark…"`) inside the `<svg id="{id}">` element.
fn marks_in(page: &str, id: &str) -> usize {
    let at = page
        .find(&format!("<svg id=\"{id}\""))
        .expect("svg present");
    let end = page[at..].find("</svg>").expect("svg closed");
    page[at..at + end].matches("class=\"mark").count()
}

fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|p| p.is_file())
}

/// The DOM of `page` after load (and its scripts), from headless Chromium.
fn dump_dom(chromium: &Path, page: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("report.html");
    std::fs::write(&file, page).expect("writing the page");
    let profile = dir.path().join("profile");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--virtual-time-budget=2000")
        .arg("--dump-dom")
        .arg(format!("file://{}", file.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting chromium");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + CHROMIUM_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within {CHROMIUM_TIMEOUT:?}: {}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dom = out.join().unwrap_or_default();
    let log = err.join().unwrap_or_default();
    assert!(status.success(), "chromium exited with {status}: {log}");
    assert!(
        dom.contains("<svg"),
        "no DOM from chromium ({status}): {log}"
    );
    dom
}

#[test]
fn plots_are_drawn_in_headless_chromium() {
    let Some(chromium) = find_chromium() else {
        eprintln!(
            "skipped: chromium not installed (scripts/install-deps installs Debian chromium)"
        );
        return;
    };
    let dom = dump_dom(&chromium, &render(&synthetic_report()));
    for id in PLOT_IDS {
        let tag = svg_tag(&dom, id).unwrap_or_else(|| panic!("no <svg id=\"{id}\"> in the DOM"));
        assert!(
            tag.contains("data-drawn=\"yes\""),
            "plot {id} not drawn: {tag}"
        );
    }

    // Without data nothing is drawn, and the page says so: the check can fail.
    let dom = dump_dom(&chromium, &render(&Report::default()));
    for id in PLOT_IDS {
        let tag = svg_tag(&dom, id).unwrap_or_else(|| panic!("no <svg id=\"{id}\"> in the DOM"));
        assert!(tag.contains("data-drawn=\"no\""), "empty plot {id}: {tag}");
    }
}
