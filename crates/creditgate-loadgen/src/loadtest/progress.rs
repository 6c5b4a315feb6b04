//! The live progress line on stderr while a run goes.

use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::{Plan, Progress, Report};

/// Redraw interval of the progress line on a terminal.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// Without a terminal, one progress line per this many intervals (one a second).
const PROGRESS_LINES_EVERY: u64 = 10;
/// Cells of the progress bar.
const PROGRESS_BAR_CELLS: usize = 24;

/// The progress line: bar of elapsed over the duration, live RPS, successes, errors, P99.
pub fn progress_line(p: &Progress, duration_s: f64) -> String {
    let fraction = if duration_s > 0.0 {
        (p.elapsed_s / duration_s).clamp(0.0, 1.0)
    } else {
        1.0
    };
    let filled_cells = (fraction * PROGRESS_BAR_CELLS as f64).round();
    let filled = (0..PROGRESS_BAR_CELLS)
        .filter(|i| (*i as f64) < filled_cells)
        .count();
    format!(
        "[{}{}] {:>5.1}/{duration_s:.0} s  {:>7.1} req/s  VALID {:>7}  errors {:>5}  p99 {:>7.2} ms",
        "█".repeat(filled),
        "░".repeat(PROGRESS_BAR_CELLS - filled),
        p.elapsed_s,
        p.rps,
        p.valid,
        p.errors,
        p.p99_ms
    )
}

/// Runs the plan with the progress line; `None` when interrupted by Ctrl-C.
pub(super) async fn drive(plan: &Plan, duration_s: f64) -> Option<Report> {
    let (progress_tx, progress_rx) = watch::channel(Progress::default());
    let (stop_tx, stop_rx) = oneshot::channel();
    let painter = spawn_progress(progress_rx, stop_rx, duration_s);
    let report = tokio::select! {
        report = crate::run(plan, Some(progress_tx)) => Some(report),
        _ = tokio::signal::ctrl_c() => None,
    };
    let _ = stop_tx.send(());
    let _ = painter.await;
    report
}

/// Redraws the progress line on stderr: in place ~10 times a second on a terminal, one
/// line a second otherwise.
fn spawn_progress(
    progress: watch::Receiver<Progress>,
    mut stop: oneshot::Receiver<()>,
    duration_s: f64,
) -> JoinHandle<()> {
    let terminal = std::io::stderr().is_terminal();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // Ticks until the next plain line (without a terminal).
        let mut until_line = 0u64;
        loop {
            let stopping = tokio::select! {
                _ = &mut stop => true,
                _ = tick.tick() => false,
            };
            let line = progress_line(&progress.borrow(), duration_s);
            let mut err = std::io::stderr().lock();
            if terminal {
                let _ = write!(err, "\r\x1b[2K{line}");
                if stopping {
                    let _ = writeln!(err);
                }
                let _ = err.flush();
            } else if stopping || until_line == 0 {
                let _ = writeln!(err, "{line}");
                until_line = PROGRESS_LINES_EVERY;
            }
            if stopping {
                break;
            }
            until_line -= 1;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_shows_the_figures() {
        let p = Progress {
            elapsed_s: 5.0,
            requests: 1000,
            valid: 900,
            errors: 2,
            rps: 200.0,
            p99_ms: 3.25,
        };
        let line = progress_line(&p, 10.0);
        assert!(
            line.starts_with(&format!("[{}{}]", "█".repeat(12), "░".repeat(12))),
            "{line}"
        );
        for part in [
            "5.0/10 s",
            "200.0 req/s",
            "VALID     900",
            "errors     2",
            "p99    3.25 ms",
        ] {
            assert!(line.contains(part), "{part:?} in {line:?}");
        }
        // Past the end (waiting for the last answers) the bar stays full.
        let line = progress_line(
            &Progress {
                elapsed_s: 12.0,
                ..p
            },
            10.0,
        );
        assert!(line.starts_with(&format!("[{}]", "█".repeat(24))), "{line}");
    }
}
