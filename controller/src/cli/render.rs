//! How `weir status` and `weir watch` draw a [`CanaryView`]: pure functions from the view (and
//! the time) to text, so both modes and the tests draw the same thing.

use std::collections::VecDeque;
use std::fmt::Write as _;

use super::CanaryView;
use crate::live::VersionLive;
use crate::local::describe_line;
use crate::spec::{format_go_duration, PauseCause, Phase, Timestamp};

/// `Progressing`, or `Progressing (paused)` while paused.
pub fn phase_text(view: &CanaryView) -> String {
    let phase = view
        .status
        .phase
        .map_or_else(|| "Pending".to_owned(), |p| p.to_string());
    match &view.status.paused {
        Some(pause) => match pause.cause {
            PauseCause::Requested => format!("{phase} (paused by {})", pause.by),
            PauseCause::InconclusiveLimit => {
                format!("{phase} (paused: needs a decision: weir promote / weir abort)")
            }
        },
        None => phase,
    }
}

fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}%"))
}

fn millis(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}ms"))
}

fn numbers(v: Option<&VersionLive>) -> String {
    match v {
        Some(v) => format!(
            "{} {} {}",
            percent(v.success_rate),
            millis(v.p99_ms),
            v.requests
        ),
        None => "-".to_owned(),
    }
}

/// The last decision's first message (`-` before any).
fn last_decision(view: &CanaryView) -> String {
    view.last_decision()
        .and_then(|d| d.events.last())
        .map_or_else(|| "-".to_owned(), |e| e.message.clone())
}

/// `weir status`: one row per canary, the columns of `kubectl get canary` and then the live
/// numbers per version (success rate, P99, requests) and the last decision.
pub fn status_table(views: &[CanaryView]) -> String {
    let header = [
        "NAMESPACE",
        "NAME",
        "STATUS",
        "WEIGHT",
        "FAILEDCHECKS",
        "PRIMARY SR/P99/REQ",
        "CANARY SR/P99/REQ",
        "LASTTRANSITIONTIME",
        "LAST DECISION",
    ];
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                v.namespace.clone(),
                v.name.clone(),
                phase_text(v),
                v.status.canary_weight.to_string(),
                v.status.failed_checks.to_string(),
                numbers(v.live.as_ref().map(|l| &l.primary)),
                numbers(v.live.as_ref().map(|l| &l.canary)),
                v.status
                    .last_transition_time
                    .map_or_else(|| "-".to_owned(), |t| t.to_string()),
                last_decision(v),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let last = cells.len() - 1;
        let text: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c
                } else {
                    format!("{c:<width$}", width = widths[i])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", text.join("   ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row);
    }
    out
}

/// The last few live numbers of each version, for `weir watch`'s history.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Success rate (primary, canary) per sample, oldest first.
    pub success_rate: VecDeque<(Option<f64>, Option<f64>)>,
    /// P99 (primary, canary) per sample, oldest first.
    pub p99: VecDeque<(Option<f64>, Option<f64>)>,
    last_at: Option<Timestamp>,
}

/// Samples a history keeps.
pub const HISTORY_LEN: usize = 20;

impl History {
    /// Adds the view's live numbers if they are new.
    pub fn add(&mut self, view: &CanaryView) {
        let Some(live) = &view.live else {
            return;
        };
        if self.last_at == Some(live.at) {
            return;
        }
        self.last_at = Some(live.at);
        self.success_rate
            .push_back((live.primary.success_rate, live.canary.success_rate));
        self.p99
            .push_back((live.primary.p99_ms, live.canary.p99_ms));
        while self.success_rate.len() > HISTORY_LEN {
            self.success_rate.pop_front();
            self.p99.pop_front();
        }
    }
}

/// A sparkline of `values` scaled between their minimum and maximum (`·` where none).
fn sparkline(values: impl Iterator<Item = Option<f64>> + Clone) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let known: Vec<f64> = values.clone().flatten().collect();
    let (lo, hi) = known
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        });
    values
        .map(|v| match v {
            None => '·',
            Some(_) if hi - lo < 1e-9 => BARS[3],
            Some(v) => {
                let i = ((v - lo) / (hi - lo) * 7.0).round() as usize;
                BARS[i.min(7)]
            }
        })
        .collect()
}

/// A weight bar: `[██████░░░░░░░░░░░░░░░░░░░░░░░░]` for 20 of 100, 30 cells wide; `|` marks
/// the maximum weight.
pub fn weight_bar(weight: u8, max: u8) -> String {
    const CELLS: usize = 30;
    let filled = usize::from(weight) * CELLS / 100;
    let max_cell = (usize::from(max) * CELLS / 100).min(CELLS);
    let bar: String = (0..CELLS)
        .map(|i| {
            if i < filled {
                '█'
            } else if i + 1 == max_cell && max < 100 {
                '|'
            } else {
                '░'
            }
        })
        .collect();
    format!("[{bar}]")
}

/// When the next step is due, relative to `now`.
fn next_step(view: &CanaryView, now: Timestamp) -> String {
    let idle = matches!(
        view.status.phase,
        Some(Phase::Succeeded | Phase::Failed | Phase::Initialized | Phase::Terminated)
    );
    match view.next_step_at {
        _ if idle => "- (waiting for a new revision)".to_owned(),
        None => "-".to_owned(),
        Some(at) if at <= now => "due now".to_owned(),
        Some(at) => format!("in {} (at {at})", format_go_duration(round(at.since(now)))),
    }
}

fn round(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(u64::try_from(d.as_millis() / 100 * 100).unwrap_or(0))
}

/// `weir watch` on a terminal: the whole screen, drawn from the top (the caller clears it).
pub fn watch_frame(view: &CanaryView, history: &History, now: Timestamp, events: usize) -> String {
    let mut out = String::new();
    let s = &view.status;
    let max = view.live.as_ref().map_or(100, |l| l.max_weight);
    let _ = writeln!(out, "weir watch {}/{}    {now}", view.namespace, view.name);
    let _ = writeln!(out);
    let _ = writeln!(out, "Phase:       {}", phase_text(view));
    let _ = writeln!(
        out,
        "Weight:      {} {}% (max {max}%)",
        weight_bar(s.canary_weight.percent(), max),
        s.canary_weight
    );
    let _ = writeln!(out, "Failed:      {} checks", s.failed_checks);
    let _ = writeln!(out, "Next step:   {}", next_step(view, now));
    let _ = writeln!(out);
    let window = view.live.as_ref().map_or_else(String::new, |l| {
        format!(" (last {})", format_go_duration(l.window))
    });
    let _ = writeln!(
        out,
        "             {:<10} {:<10} {:<9} history{window}",
        "success", "P99", "requests"
    );
    for (label, pick) in [("primary", 0usize), ("canary", 1)] {
        let v = view
            .live
            .as_ref()
            .map(|l| if pick == 0 { l.primary } else { l.canary });
        let sr = sparkline(
            history
                .success_rate
                .iter()
                .map(move |p| if pick == 0 { p.0 } else { p.1 }),
        );
        let p99 = sparkline(
            history
                .p99
                .iter()
                .map(move |p| if pick == 0 { p.0 } else { p.1 }),
        );
        let _ = writeln!(
            out,
            "  {label:<10} {:<10} {:<10} {:<9} sr {sr}  p99 {p99}",
            percent(v.and_then(|v| v.success_rate)),
            millis(v.and_then(|v| v.p99_ms)),
            v.map_or_else(|| "-".to_owned(), |v| v.requests.to_string()),
        );
    }
    if view.live.is_none() {
        let _ = writeln!(out, "  (no live numbers: the controller is not reachable)");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Events:");
    let start = view.events.len().saturating_sub(events);
    for e in &view.events[start..] {
        let _ = writeln!(out, "{}", describe_line(e, None));
    }
    out
}

/// `weir watch` elsewhere (a pipe, a file): one line for each change of phase, weight or pause,
/// and one per event newer than the previous view's.
pub fn watch_lines(
    view: &CanaryView,
    previous: Option<&CanaryView>,
    now: Timestamp,
) -> Vec<String> {
    let mut lines = Vec::new();
    let s = &view.status;
    let changed = previous.is_none_or(|p| {
        (p.status.phase, p.status.canary_weight, &p.status.paused)
            != (s.phase, s.canary_weight, &s.paused)
    });
    if changed {
        let live = view.live.as_ref();
        lines.push(format!(
            "{now} {}/{} {} weight {}% primary {} canary {} next step {}",
            view.namespace,
            view.name,
            phase_text(view),
            s.canary_weight,
            numbers(live.map(|l| &l.primary)),
            numbers(live.map(|l| &l.canary)),
            next_step(view, now)
        ));
    }
    let seen = previous
        .and_then(|p| p.events.last())
        .and_then(|last| view.events.iter().rposition(|e| e == last))
        .map_or(0, |i| i + 1);
    let seen = if previous.is_none() {
        // The first view: only the last few, as context.
        view.events.len().saturating_sub(5)
    } else {
        seen
    };
    for e in view.events.iter().skip(seen) {
        lines.push(describe_line(e, None));
    }
    lines
}
