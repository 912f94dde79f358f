//! The explorer's pictures, drawn as SVG on the server: a saga's steps in order with the
//! compensation path drawn back when it compensates, and the chart of sagas ended per minute.
//! Colours come from the stylesheet through classes, so the pages need no inline style.

use chrono::{DateTime, Duration, Timelike as _, Utc};
use maud::{Markup, html};

use super::pages::span;
use crate::saga::{SagaStatus, StepStatus};

/// One box of a diagram; `status` is `None` where a definition is drawn without a saga.
pub(super) struct DiagramStep<'a> {
    pub(super) name: &'a str,
    pub(super) participant: &'a str,
    pub(super) action: Option<&'a str>,
    pub(super) compensation: Option<&'a str>,
    pub(super) status: Option<StepStatus>,
}

const BOX_WIDTH: i64 = 200;
const BOX_HEIGHT: i64 = 66;
const GAP: i64 = 46;
const MARGIN: i64 = 12;
const TOP: i64 = 12;
/// The most characters of a name a box shows; the whole name is in its tooltip.
const LABEL_CHARS: usize = 28;

fn label(text: &str) -> String {
    crate::document::shorten(text, LABEL_CHARS)
}

fn status_class(status: Option<StepStatus>) -> &'static str {
    match status {
        None => "none",
        Some(StepStatus::Pending) => "PENDING",
        Some(StepStatus::Running) => "RUNNING",
        Some(StepStatus::Succeeded) => "SUCCEEDED",
        Some(StepStatus::Failed) => "FAILED",
        Some(StepStatus::Compensating) => "COMPENSATING",
        Some(StepStatus::Compensated) => "COMPENSATED",
        Some(StepStatus::CompensationFailed) => "COMPENSATION_FAILED",
    }
}

/// Whether the saga went backward, and the path it takes: from the last step it got to, back
/// to the first step, or for a FAILED saga to the step whose compensation stopped it.
fn compensation_path(
    steps: &[DiagramStep<'_>],
    saga: Option<SagaStatus>,
) -> Option<(usize, usize)> {
    let backward = matches!(
        saga,
        Some(SagaStatus::Compensating | SagaStatus::Compensated | SagaStatus::Failed)
    );
    if !backward {
        return None;
    }
    let from = steps
        .iter()
        .rposition(|step| !matches!(step.status, Some(StepStatus::Pending) | None))?;
    let to = match saga {
        Some(SagaStatus::Failed) => steps
            .iter()
            .position(|step| step.status == Some(StepStatus::CompensationFailed))
            .unwrap_or(0),
        _ => 0,
    };
    Some((from, to))
}

/// The steps left to right, every one including those still to come, each coloured by its
/// status; below them, when the saga compensates, the path back to the first step.
pub(super) fn steps(steps: &[DiagramStep<'_>], saga: Option<SagaStatus>) -> Markup {
    let count = i64::try_from(steps.len()).unwrap_or(i64::MAX).max(1);
    let width = MARGIN * 2 + count * BOX_WIDTH + (count - 1) * GAP;
    let back = compensation_path(steps, saga);
    let height = TOP + BOX_HEIGHT + if back.is_some() { 64 } else { 16 };
    let x = |index: usize| MARGIN + i64::try_from(index).unwrap_or(0) * (BOX_WIDTH + GAP);
    let middle = TOP + BOX_HEIGHT / 2;
    html! {
        svg.steps-diagram xmlns="http://www.w3.org/2000/svg" role="img"
            aria-label="the saga's steps in order" viewBox={ "0 0 " (width) " " (height) }
            width=(width) height=(height) {
            defs {
                marker #arrow-forward viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                    path.arrow-head d="M0,0 L10,5 L0,10 z" {}
                }
                marker #arrow-back viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                    path.arrow-head.back d="M0,0 L10,5 L0,10 z" {}
                }
            }
            @for (index, step) in steps.iter().enumerate() {
                @if index > 0 {
                    line.forward x1=(x(index) - GAP + 2) y1=(middle) x2=(x(index) - 4) y2=(middle) marker-end="url(#arrow-forward)" {}
                }
                g class={ "step st-" (status_class(step.status)) } data-step=(step.name) data-status=(status_class(step.status)) {
                    title {
                        (step.name) " on " (step.participant)
                        @if let Some(status) = step.status { ": " (status_class(Some(status))) }
                    }
                    rect x=(x(index)) y=(TOP) width=(BOX_WIDTH) height=(BOX_HEIGHT) rx="8" {}
                    text.name x=(x(index) + 10) y=(TOP + 20) { (label(step.name)) }
                    text.detail x=(x(index) + 10) y=(TOP + 38) {
                        (label(&match step.action {
                            Some(action) => format!("{} · {action}", step.participant),
                            None => step.participant.to_owned(),
                        }))
                    }
                    text.detail x=(x(index) + 10) y=(TOP + 56) {
                        @match step.compensation {
                            Some(compensation) => { "↩ " (label(compensation)) }
                            None => { "nothing to undo" }
                        }
                    }
                }
            }
            @if let Some((from, to)) = back {
                @let below = TOP + BOX_HEIGHT + 30;
                @let start = x(from) + BOX_WIDTH / 2;
                @let end = x(to) + BOX_WIDTH / 2 - 12;
                path.compensation-path #compensation-path
                    d={ "M" (start) "," (TOP + BOX_HEIGHT) " L" (start) "," (below) " L" (end) "," (below) " L" (end) "," (TOP + BOX_HEIGHT + 4) }
                    marker-end="url(#arrow-back)" {}
                text.compensation-label x=(end + 18) y=(below + 18) { "compensation, newest first" }
            }
        }
    }
}

const CHART_MINUTES: i64 = 60;
const BAR_WIDTH: i64 = 10;
const CHART_HEIGHT: i64 = 110;
const ENDED: [SagaStatus; 3] = [
    SagaStatus::Completed,
    SagaStatus::Compensated,
    SagaStatus::Failed,
];

/// Bars of the sagas ended in each of the last 60 minutes, stacked by how they ended.
pub(super) fn finished_chart(
    per_minute: &[(DateTime<Utc>, SagaStatus, i64)],
    now: DateTime<Utc>,
) -> Markup {
    let this_minute = now
        .with_second(0)
        .and_then(|time| time.with_nanosecond(0))
        .unwrap_or(now);
    let first = this_minute - Duration::minutes(CHART_MINUTES - 1);
    let mut bars = vec![[0_i64; 3]; CHART_MINUTES as usize];
    for (minute, status, count) in per_minute {
        let index = (*minute - first).num_minutes();
        let (Ok(index), Some(kind)) = (
            usize::try_from(index),
            ENDED.iter().position(|ended| ended == status),
        ) else {
            continue;
        };
        if let Some(bar) = bars.get_mut(index) {
            bar[kind] += count;
        }
    }
    let highest = bars
        .iter()
        .map(|bar| bar.iter().sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let plot = CHART_HEIGHT - 20;
    let width = CHART_MINUTES * BAR_WIDTH + 40;
    html! {
        svg #finished-chart xmlns="http://www.w3.org/2000/svg" role="img"
            aria-label="sagas ended per minute over the last hour"
            viewBox={ "0 0 " (width) " " (CHART_HEIGHT) } width=(width) height=(CHART_HEIGHT) {
            line.axis x1="0" y1=(plot) x2=(CHART_MINUTES * BAR_WIDTH) y2=(plot) {}
            text.axis-label x=(CHART_MINUTES * BAR_WIDTH + 4) y="12" { (highest) }
            text.axis-label x="0" y=(CHART_HEIGHT - 4) { "60 min ago" }
            text.axis-label x=(CHART_MINUTES * BAR_WIDTH - 24) y=(CHART_HEIGHT - 4) { "now" }
            @for (index, bar) in bars.iter().enumerate() {
                @let minute = first + Duration::minutes(i64::try_from(index).unwrap_or(0));
                @let total: i64 = bar.iter().sum();
                @if total > 0 {
                    g.minute data-minute=(minute.format("%H:%M")) data-total=(total) {
                        title {
                            (minute.format("%H:%M")) " UTC, " (span(now - minute)) " ago: "
                            (bar[0]) " completed, " (bar[1]) " compensated, " (bar[2]) " failed"
                        }
                        @for (kind, y, height) in stacked(bar, plot, highest) {
                            rect class={ "bar s-" (ENDED[kind].as_str()) }
                                x=(i64::try_from(index).unwrap_or(0) * BAR_WIDTH) y=(y)
                                width=(BAR_WIDTH - 1) height=(height) {}
                        }
                    }
                }
            }
        }
    }
}

/// The pieces of one bar, bottom up: which kind, where its top is and how tall it is.
fn stacked(bar: &[i64; 3], plot: i64, highest: i64) -> Vec<(usize, i64, i64)> {
    let mut top = plot;
    let mut pieces = Vec::new();
    for (kind, count) in bar.iter().enumerate() {
        if *count > 0 {
            let height = (count * plot / highest).max(1);
            top -= height;
            pieces.push((kind, top, height));
        }
    }
    pieces
}
