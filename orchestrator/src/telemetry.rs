//! What sagad tells its operators in numbers: the Prometheus metrics, each described from the
//! first scrape and its known series present at zero until it moves. (Log lines and traces are
//! set up by the `sagad-telemetry` crate, which the participants share.)

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::definition::DefinitionSet;
use crate::saga::SagaStatus;

/// A metric's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric sagad exports.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

pub const SAGAS_STARTED: &str = "sagad_sagas_started_total";
pub const SAGAS_FINISHED: &str = "sagad_sagas_finished_total";
pub const SAGA_DURATION: &str = "sagad_saga_duration_seconds";
pub const PARTICIPANT_CALLS: &str = "sagad_participant_calls_total";
pub const PARTICIPANT_CALL_DURATION: &str = "sagad_participant_call_seconds";
pub const SAGAS_ACTIVE: &str = "sagad_sagas_active";
pub const SAGAS_STUCK: &str = "sagad_sagas_stuck";
pub const OLDEST_ACTIVE_AGE: &str = "sagad_oldest_active_saga_age_seconds";
pub const SAGAS_DRIVEN: &str = "sagad_sagas_driven";
pub const SAGAS_TAKEN_OVER: &str = "sagad_sagas_taken_over_total";
pub const SAGAS_PARKED: &str = "sagad_sagas_parked_total";
pub const LEASES_LOST: &str = "sagad_leases_lost_total";
pub const WRITES_FENCED: &str = "sagad_writes_fenced_total";
pub const STORE_BATCH_WRITES: &str = "sagad_store_batch_writes";

/// Every metric sagad exports: each is described on the first page, whether or not it has
/// moved yet.
pub const METRICS: &[Metric] = &[
    Metric {
        name: SAGAS_STARTED,
        kind: Kind::Counter,
        help: "Sagas created by StartSaga (idempotent repeats not counted), by saga_type.",
    },
    Metric {
        name: SAGAS_FINISHED,
        kind: Kind::Counter,
        help: "Sagas driven here to a terminal status, by saga_type and status.",
    },
    Metric {
        name: SAGA_DURATION,
        kind: Kind::Histogram,
        help: "Seconds from a saga's start to its terminal status, by saga_type and status.",
    },
    Metric {
        name: PARTICIPANT_CALLS,
        kind: Kind::Counter,
        help: "Participant calls made, by participant, kind (execute, compensate) and outcome \
               (success, refused, transient, timeout).",
    },
    Metric {
        name: PARTICIPANT_CALL_DURATION,
        kind: Kind::Histogram,
        help: "Seconds one participant call took, by participant and kind.",
    },
    Metric {
        name: SAGAS_ACTIVE,
        kind: Kind::Gauge,
        help: "RUNNING and COMPENSATING sagas in the database, by saga_type and status \
               (sampled every few seconds).",
    },
    Metric {
        name: SAGAS_STUCK,
        kind: Kind::Gauge,
        help: "Stuck sagas in the database: their current step has kept failing for longer \
               than --stuck-after (sampled every few seconds).",
    },
    Metric {
        name: OLDEST_ACTIVE_AGE,
        kind: Kind::Gauge,
        help: "Age in seconds of the oldest RUNNING or COMPENSATING saga in the database, 0 \
               when there is none (sampled every few seconds).",
    },
    Metric {
        name: SAGAS_DRIVEN,
        kind: Kind::Gauge,
        help: "Sagas this replica drives now.",
    },
    Metric {
        name: SAGAS_TAKEN_OVER,
        kind: Kind::Counter,
        help: "Sagas this replica claimed in its sweeps: those of replicas gone (lease expired \
               or shut down) and parked ones come due.",
    },
    Metric {
        name: SAGAS_PARKED,
        kind: Kind::Counter,
        help: "Sagas this replica let go while they wait for a time further than twice the \
               poll interval; a sweep claims each again when it is due.",
    },
    Metric {
        name: LEASES_LOST,
        kind: Kind::Counter,
        help: "Times this replica could not renew its lease in time and let its sagas go.",
    },
    Metric {
        name: WRITES_FENCED,
        kind: Kind::Counter,
        help: "Appends of this replica refused because another replica had taken the saga.",
    },
    Metric {
        name: STORE_BATCH_WRITES,
        kind: Kind::Histogram,
        help: "Saga writes committed together in one transaction of the group commit.",
    },
];

/// Bucket bounds for the durations, in seconds: 5 ms to a minute.
const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Bucket bounds for the size of a group commit.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The call kinds and outcomes of [`PARTICIPANT_CALLS`].
const CALL_KINDS: [&str; 2] = ["execute", "compensate"];
const CALL_OUTCOMES: [&str; 4] = ["success", "refused", "transient", "timeout"];

/// The statuses [`SAGAS_ACTIVE`] counts.
const ACTIVE_STATUSES: [SagaStatus; 2] = [SagaStatus::Running, SagaStatus::Compensating];

/// Installs the process-wide recorder, without an HTTP listener of its own (sagad's HTTP
/// server renders the page), and describes every metric. Histograms, not summaries: buckets
/// add up across replicas, quantiles do not.
pub fn install_recorder() -> Result<Metrics, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(STORE_BATCH_WRITES.to_owned()), BATCH_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(Metrics { handle })
}

fn describe() {
    for metric in METRICS {
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(metric.name, metric.help),
            Kind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
            Kind::Histogram => metrics::describe_histogram!(metric.name, metric.help),
        }
    }
}

/// Creates at zero every series whose labels are known from the definitions: each saga type
/// by terminal status, each participant by call kind (and outcome), the unlabelled ones. A
/// series that never moves still shows, so a rate or an alert has something to read.
pub fn preset(definitions: &DefinitionSet) {
    for metric in [SAGAS_TAKEN_OVER, SAGAS_PARKED, LEASES_LOST, WRITES_FENCED] {
        metrics::counter!(metric).increment(0);
    }
    for metric in [SAGAS_DRIVEN, SAGAS_STUCK, OLDEST_ACTIVE_AGE] {
        metrics::gauge!(metric).increment(0.0);
    }
    for saga_type in definitions.saga_types() {
        metrics::counter!(SAGAS_STARTED, "saga_type" => saga_type.to_owned()).increment(0);
        for status in [
            SagaStatus::Completed,
            SagaStatus::Compensated,
            SagaStatus::Failed,
        ] {
            let labels = [
                ("saga_type", saga_type.to_owned()),
                ("status", status.as_str().to_owned()),
            ];
            metrics::counter!(SAGAS_FINISHED, &labels).increment(0);
            // Registering the histogram is enough for its buckets to show, at zero.
            let _ = metrics::histogram!(SAGA_DURATION, &labels);
        }
        for status in ACTIVE_STATUSES {
            metrics::gauge!(SAGAS_ACTIVE, "saga_type" => saga_type.to_owned(), "status" => status.as_str())
                .increment(0.0);
        }
    }
    for participant in definitions.participants() {
        for kind in CALL_KINDS {
            let _ = metrics::histogram!(
                PARTICIPANT_CALL_DURATION,
                "participant" => participant.to_owned(),
                "kind" => kind
            );
            for outcome in CALL_OUTCOMES {
                metrics::counter!(
                    PARTICIPANT_CALLS,
                    "participant" => participant.to_owned(),
                    "kind" => kind,
                    "outcome" => outcome
                )
                .increment(0);
            }
        }
    }
}

/// The metrics page.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    /// The page in the Prometheus text format. A family with no series yet (a labelled one
    /// whose labels cannot be known up front) is still described, with no samples.
    pub fn render(&self) -> String {
        with_every_family(self.handle.render())
    }

    /// Folds recorded samples into the histograms and publishes new descriptions; without it
    /// samples pile up between scrapes. Run every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// Appends `# HELP` and `# TYPE` for every metric of [`METRICS`] the page lacks.
fn with_every_family(mut page: String) -> String {
    let present: BTreeSet<&str> = page
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    let missing: Vec<&Metric> = METRICS
        .iter()
        .filter(|metric| !present.contains(metric.name))
        .collect();
    for metric in missing {
        if !page.is_empty() && !page.ends_with("\n\n") {
            page.push('\n');
        }
        let _ = writeln!(page, "# HELP {} {}", metric.name, metric.help);
        let _ = writeln!(page, "# TYPE {} {}", metric.name, metric.kind.as_str());
    }
    page
}

/// The sampled gauges of the sagas in the database. A series once shown stays, at 0 when its
/// count has gone.
#[derive(Debug, Default)]
pub struct ActivityGauges {
    /// (saga type, status name)
    known: BTreeSet<(String, &'static str)>,
}

impl ActivityGauges {
    /// Starts with every loaded saga type in each active status.
    pub fn new(definitions: &DefinitionSet) -> Self {
        let known = definitions
            .saga_types()
            .flat_map(|saga_type| {
                ACTIVE_STATUSES.map(|status| (saga_type.to_owned(), status.as_str()))
            })
            .collect();
        Self { known }
    }

    /// Sets the gauges to one sample: active sagas by type and status, the stuck ones, and the
    /// age of the oldest active one.
    pub fn record(
        &mut self,
        active: &[(String, SagaStatus, i64)],
        stuck: i64,
        oldest_active_age: Option<Duration>,
    ) {
        self.known.extend(
            active
                .iter()
                .map(|(saga_type, status, _)| (saga_type.clone(), status.as_str())),
        );
        for (saga_type, status) in &self.known {
            let count = active
                .iter()
                .filter(|(t, s, _)| t == saga_type && s.as_str() == *status)
                .map(|(_, _, count)| *count)
                .sum::<i64>();
            metrics::gauge!(SAGAS_ACTIVE, "saga_type" => saga_type.clone(), "status" => *status)
                .set(count as f64);
        }
        metrics::gauge!(SAGAS_STUCK).set(stuck as f64);
        metrics::gauge!(OLDEST_ACTIVE_AGE)
            .set(oldest_active_age.map_or(0.0, |age| age.as_secs_f64()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_without_series_is_still_described() {
        let page = "# HELP sagad_sagas_driven Sagas.\n# TYPE sagad_sagas_driven gauge\nsagad_sagas_driven 0\n\n";
        let page = with_every_family(page.to_owned());
        for metric in METRICS {
            let help = format!("# HELP {} ", metric.name);
            let kind = format!("# TYPE {} {}\n", metric.name, metric.kind.as_str());
            assert!(page.contains(&help), "no help for {}:\n{page}", metric.name);
            assert!(page.contains(&kind), "no type for {}:\n{page}", metric.name);
        }
        assert_eq!(page.matches("# TYPE sagad_sagas_driven ").count(), 1);
    }

    #[test]
    fn every_metric_name_is_described_once() {
        let names: BTreeSet<&str> = METRICS.iter().map(|metric| metric.name).collect();
        assert_eq!(names.len(), METRICS.len());
        for metric in METRICS {
            assert!(metric.name.starts_with("sagad_"), "{}", metric.name);
            assert!(!metric.help.is_empty(), "{}", metric.name);
            if metric.kind == Kind::Counter {
                assert!(metric.name.ends_with("_total"), "{}", metric.name);
            }
        }
    }
}
