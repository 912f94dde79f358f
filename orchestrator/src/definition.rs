//! Saga definitions: the `*.toml` files of the definitions folder (`--defs`), parsed into
//! [`SagaDefinition`]s and validated once at start, and the retry schedule of a step
//! ([`RetryPolicy::delay_after`]).
//!
//! This module does no IO besides reading that folder: no clock, no randomness (the caller draws
//! the jitter sample), no network. Every error is a [`DefinitionError`], one line naming the file
//! and the field, because sagad exits on it and an operator has to find and fix the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::{Deserialize, Serialize};

/// Timeout of a step when neither the step nor `[defaults]` sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest allowed step timeout and first retry delay: longer means a stuck saga nobody notices.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest allowed delay between two attempts.
const MAX_DELAY_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// Highest `max_attempts` that may be written; beyond it, say "unlimited" (`0`) instead.
const MAX_ATTEMPTS_LIMIT: u32 = 1000;
/// Guard for [`RetryPolicy::delay_after`] on policies that never settle (only possible for
/// unvalidated ones): the schedule is cut after this many steps instead of looping for ages.
const MAX_SCHEDULE_STEPS: u32 = 100_000;
/// The `file` of errors about definitions that did not come from a file.
#[cfg(test)]
const MEMORY_FILE: &str = "<memory>";

/// Where a saga type is defined; loaded once at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaDefinition {
    /// The saga type, as given in `StartSaga.saga_type`.
    pub name: String,
    /// `>= 1`; a saga keeps running on the version it started with.
    pub version: u32,
    /// Top-level input fields that must be present (and not null).
    pub required_input: Vec<String>,
    /// At least one; run in this order, compensated in reverse.
    pub steps: Vec<StepDefinition>,
}

/// One step of a saga: what to ask which participant, and how to undo it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDefinition {
    pub name: String,
    /// A participant name; its address comes from `--participant NAME=URI`.
    pub participant: String,
    pub action: String,
    /// `None`: the step has nothing to undo.
    pub compensation: Option<String>,
    /// How long one call (action or compensation) may take before it counts as a transient failure.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// For the action.
    pub retry: RetryPolicy,
    /// For the compensation.
    pub compensation_retry: RetryPolicy,
}

/// How transient failures of one call are retried: capped exponential backoff with jitter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// `None`: unlimited (written `max_attempts = 0` in a file).
    pub max_attempts: Option<u32>,
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    pub multiplier: f64,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// `0.2` means a factor drawn from `[0.8, 1.2]`, so retries of many sagas spread out.
    pub jitter: f64,
}

impl RetryPolicy {
    /// Actions, when `[defaults]` says nothing: a few attempts, then the saga compensates.
    pub const DEFAULT_ACTION: RetryPolicy = RetryPolicy {
        max_attempts: Some(5),
        initial_delay: Duration::from_millis(200),
        multiplier: 2.0,
        max_delay: Duration::from_secs(10),
        jitter: 0.2,
    };

    /// Compensations, when `[defaults]` says nothing: without limit, since giving up leaves
    /// the saga half done.
    pub const DEFAULT_COMPENSATION: RetryPolicy = RetryPolicy {
        max_attempts: None,
        ..Self::DEFAULT_ACTION
    };

    /// May attempt number `attempt` (1-based) be made?
    pub fn allows_attempt(&self, attempt: u32) -> bool {
        self.max_attempts.is_none_or(|max| attempt <= max)
    }

    /// The delay before attempt `failed_attempt + 1`, given that attempt `failed_attempt` (>= 1)
    /// just failed transiently: `initial_delay * multiplier^(failed_attempt - 1)`, capped at
    /// `max_delay`, times the jitter factor `(1 - jitter) + 2 * jitter * jitter_sample`.
    ///
    /// `jitter_sample` in `[0, 1)` is drawn by the caller, so this stays pure and testable.
    /// The capped exponential part comes from backon's [`ExponentialBuilder`], which computes in
    /// `f32`; its result is rounded to whole microseconds so that `200ms * 2` is `400ms` and not
    /// `400.000006ms`. Never panics, whatever the policy; saturates at [`Duration::MAX`].
    pub fn delay_after(&self, failed_attempt: u32, jitter_sample: f64) -> Duration {
        let base = self.capped_exponential(failed_attempt);
        let jitter = if self.jitter.is_nan() {
            0.0
        } else {
            self.jitter.clamp(0.0, 1.0)
        };
        let sample = if jitter_sample.is_nan() {
            0.5
        } else {
            jitter_sample.clamp(0.0, 1.0)
        };
        let factor = (1.0 - jitter) + 2.0 * jitter * sample;
        scale(base, factor)
    }

    /// The delay before retry `failed_attempt + 1`, before jitter.
    fn capped_exponential(&self, failed_attempt: u32) -> Duration {
        let steps = failed_attempt.saturating_sub(1).min(MAX_SCHEDULE_STEPS);
        // backon takes an f32. An out-of-range multiplier becomes infinity here, which backon
        // saturates to `Duration::MAX` and then caps at `max_delay`.
        let factor = self.multiplier as f32;
        let mut schedule = ExponentialBuilder::new()
            .with_min_delay(self.initial_delay)
            .with_factor(factor)
            .with_max_delay(self.max_delay)
            .without_max_times()
            .build();
        let mut delay = schedule.next().unwrap_or(self.initial_delay);
        for _ in 0..steps {
            let Some(next) = schedule.next() else { break };
            // Each delay depends only on the previous one, so a repeat (the cap, or a delay
            // too small to grow) repeats forever: stop instead of walking a long unlimited tail.
            if next == delay {
                break;
            }
            delay = next;
        }
        round_to_micros(delay).min(self.max_delay)
    }
}

/// `d` to the nearest whole microsecond, saturating.
fn round_to_micros(d: Duration) -> Duration {
    let below = Duration::from_nanos(u64::from(d.subsec_nanos() % 1000));
    let down = d.saturating_sub(below);
    if below >= Duration::from_nanos(500) {
        down.saturating_add(Duration::from_micros(1))
    } else {
        down
    }
}

/// `d * factor` (factor finite and >= 0) to the nearest nanosecond, saturating.
fn scale(d: Duration, factor: f64) -> Duration {
    let nanos = d.as_nanos() as f64 * factor;
    if nanos < u64::MAX as f64 {
        Duration::from_nanos(nanos.round() as u64)
    } else {
        Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
    }
}

impl SagaDefinition {
    /// Parses and validates one definition file's text; `file` names it in errors.
    pub fn from_toml_str(text: &str, file: &str) -> Result<SagaDefinition, DefinitionError> {
        let raw: RawFile = toml::from_str(text).map_err(|err| toml_error(file, text, &err))?;
        let definition = raw.resolve().map_err(|err| err.in_file(file))?;
        definition.check().map_err(|err| err.in_file(file))?;
        Ok(definition)
    }

    #[cfg(test)]
    /// The step called `name`, if the saga has one.
    pub fn step(&self, name: &str) -> Option<&StepDefinition> {
        self.steps.iter().find(|step| step.name == name)
    }

    /// Every rule of the file format that a parsed definition can still break, in file order.
    fn check(&self) -> Result<(), FieldError> {
        check_identifier("name", &self.name, false)?;
        if self.version < 1 {
            return Err(version_error(self.version));
        }
        let mut seen_input = BTreeSet::new();
        for (i, field) in self.required_input.iter().enumerate() {
            let path = format!("required_input[{i}]");
            if field.trim().is_empty() {
                return Err(FieldError::new(path, "must not be empty"));
            }
            if !seen_input.insert(field.as_str()) {
                return Err(FieldError::new(
                    path,
                    format!("duplicate input field {field:?}"),
                ));
            }
        }
        if self.steps.is_empty() {
            return Err(FieldError::new("steps", "at least one step is required"));
        }
        let mut seen_steps = BTreeSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            let prefix = format!("steps[{i}]");
            check_identifier(&format!("{prefix}.name"), &step.name, false)?;
            if !seen_steps.insert(step.name.as_str()) {
                return Err(FieldError::new(
                    format!("{prefix}.name"),
                    format!("duplicate step {:?}", step.name),
                ));
            }
            check_identifier(&format!("{prefix}.participant"), &step.participant, true)?;
            check_not_blank(&format!("{prefix}.action"), &step.action)?;
            if let Some(compensation) = &step.compensation {
                check_not_blank(&format!("{prefix}.compensation"), compensation)?;
            }
            check_duration(&format!("{prefix}.timeout"), step.timeout, MAX_TIMEOUT)?;
            check_policy(&format!("{prefix}.retry"), &step.retry)?;
            check_policy(
                &format!("{prefix}.compensation_retry"),
                &step.compensation_retry,
            )?;
        }
        Ok(())
    }
}

/// One line for the operator: the file, the field, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{file}: {field}: {message}")]
pub struct DefinitionError {
    pub file: String,
    /// A path like `steps[2].retry.max_attempts`, or `-` when the whole file or folder is meant.
    pub field: String,
    pub message: String,
}

impl DefinitionError {
    /// Builds an error whose Display is guaranteed to be one line (sagad prints it and exits).
    fn new(file: impl AsRef<str>, field: impl AsRef<str>, message: impl AsRef<str>) -> Self {
        let no_controls = |s: &str| s.replace(|c: char| c.is_control(), " ");
        DefinitionError {
            file: no_controls(file.as_ref()),
            field: no_controls(field.as_ref()),
            message: one_line(message.as_ref()),
        }
    }
}

/// All loaded definitions: several versions of one type may be loaded; `StartSaga` uses the
/// newest, a saga already running keeps its own.
#[derive(Debug, Clone, Default)]
pub struct DefinitionSet {
    /// In load order (file name order), so errors name the first file that uses something.
    loaded: Vec<Loaded>,
    by_type: BTreeMap<String, BTreeMap<u32, Arc<SagaDefinition>>>,
}

#[derive(Debug, Clone)]
struct Loaded {
    file: String,
    definition: Arc<SagaDefinition>,
}

impl DefinitionSet {
    /// Reads every `*.toml` in `dir` (not recursive, sorted by file name), validates each, and
    /// rejects two files defining the same (name, version). Returns the first error.
    pub fn load_dir(dir: &Path) -> Result<DefinitionSet, DefinitionError> {
        Self::validate_dir(dir).map_err(|errors| {
            errors.into_iter().next().unwrap_or_else(|| {
                DefinitionError::new(dir.display().to_string(), "-", "invalid definitions")
            })
        })
    }

    /// Like [`DefinitionSet::load_dir`], but goes on after a bad file and returns the first
    /// error of every file (never an empty list), for `sagactl defs validate`.
    pub fn validate_dir(dir: &Path) -> Result<DefinitionSet, Vec<DefinitionError>> {
        let folder = dir.display().to_string();
        let folder_error = |message: String| vec![DefinitionError::new(&folder, "-", message)];
        let entries = std::fs::read_dir(dir)
            .map_err(|err| folder_error(format!("cannot read the definitions folder: {err}")))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|err| {
                folder_error(format!("cannot read the definitions folder: {err}"))
            })?;
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "toml") && path.is_file() {
                files.push(path);
            }
        }
        if files.is_empty() {
            return Err(folder_error(
                "no saga definitions (*.toml files) in this folder".to_owned(),
            ));
        }
        files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));

        let mut set = DefinitionSet::default();
        let mut errors = Vec::new();
        for path in files {
            let file = path.display().to_string();
            let loaded = std::fs::read_to_string(&path)
                .map_err(|err| DefinitionError::new(&file, "-", format!("cannot read: {err}")))
                .and_then(|text| SagaDefinition::from_toml_str(&text, &file))
                .and_then(|definition| set.insert(definition, &file));
            if let Err(err) = loaded {
                errors.push(err);
            }
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(errors)
        }
    }

    #[cfg(test)]
    /// Builds a set from already-parsed definitions (tests use this); validates as
    /// [`DefinitionSet::load_dir`] does, with `<memory>` as the file in errors.
    pub fn from_definitions(defs: Vec<SagaDefinition>) -> Result<DefinitionSet, DefinitionError> {
        let mut set = DefinitionSet::default();
        for definition in defs {
            definition.check().map_err(|err| err.in_file(MEMORY_FILE))?;
            set.insert(definition, MEMORY_FILE)?;
        }
        Ok(set)
    }

    fn insert(&mut self, definition: SagaDefinition, file: &str) -> Result<(), DefinitionError> {
        if let Some(other) = self.loaded.iter().find(|loaded| {
            loaded.definition.name == definition.name
                && loaded.definition.version == definition.version
        }) {
            return Err(DefinitionError::new(
                file,
                "version",
                format!(
                    "saga {:?} version {} is already defined in {}",
                    definition.name, definition.version, other.file
                ),
            ));
        }
        let definition = Arc::new(definition);
        self.by_type
            .entry(definition.name.clone())
            .or_default()
            .insert(definition.version, Arc::clone(&definition));
        self.loaded.push(Loaded {
            file: file.to_owned(),
            definition,
        });
        Ok(())
    }

    /// The highest version of `saga_type`: what a new saga of that type runs.
    pub fn newest(&self, saga_type: &str) -> Option<Arc<SagaDefinition>> {
        let versions = self.by_type.get(saga_type)?;
        versions
            .last_key_value()
            .map(|(_, definition)| Arc::clone(definition))
    }

    #[cfg(test)]
    /// One exact version: what a saga recorded with that `definition_version` resumes on.
    pub fn get(&self, saga_type: &str, version: u32) -> Option<Arc<SagaDefinition>> {
        self.by_type.get(saga_type)?.get(&version).map(Arc::clone)
    }

    #[cfg(test)]
    /// Every participant name used by some step: the clients the engine needs.
    pub fn participants(&self) -> BTreeSet<&str> {
        self.loaded
            .iter()
            .flat_map(|loaded| loaded.definition.steps.iter())
            .map(|step| step.participant.as_str())
            .collect()
    }

    /// Errors if a step names a participant without an address in `known`; the error names the
    /// first file and field that uses it (e.g. `steps[1].participant`), so sagad can refuse to
    /// start instead of failing sagas later.
    pub fn check_participants(&self, known: &BTreeSet<String>) -> Result<(), DefinitionError> {
        for loaded in &self.loaded {
            for (i, step) in loaded.definition.steps.iter().enumerate() {
                if !known.contains(&step.participant) {
                    return Err(DefinitionError::new(
                        &loaded.file,
                        format!("steps[{i}].participant"),
                        format!(
                            "participant {:?} has no address: pass --participant {}=URI \
                             (or add it to SAGAD_PARTICIPANTS)",
                            step.participant, step.participant
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// How many definitions were loaded (one per file), for `sagactl defs validate`.
    pub fn len(&self) -> usize {
        self.loaded.len()
    }

    pub fn is_empty(&self) -> bool {
        self.loaded.is_empty()
    }

    #[cfg(test)]
    /// The loaded saga types, sorted, each once.
    pub fn saga_types(&self) -> impl Iterator<Item = &str> {
        self.by_type.keys().map(String::as_str)
    }
}

/// An error inside one definition, before we know (or say) which file it is in.
#[derive(Debug)]
struct FieldError {
    field: String,
    message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }

    fn in_file(self, file: &str) -> DefinitionError {
        DefinitionError::new(file, self.field, self.message)
    }
}

// The file as written. Everything is optional here so that a missing key is reported by us,
// with its field; unknown keys are refused so a typo cannot silently fall back to a default.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    name: Option<String>,
    version: Option<i64>,
    required_input: Option<Vec<String>>,
    defaults: Option<RawDefaults>,
    steps: Option<Vec<RawStep>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    timeout: Option<String>,
    retry: Option<RawPolicy>,
    compensation_retry: Option<RawPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: Option<String>,
    participant: Option<String>,
    action: Option<String>,
    compensation: Option<String>,
    timeout: Option<String>,
    retry: Option<RawPolicy>,
    compensation_retry: Option<RawPolicy>,
}

/// A policy table; each key left out falls back to the same key one level up
/// (step → `[defaults]` → built-in). `max_attempts = 0` means unlimited.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    max_attempts: Option<i64>,
    initial_delay: Option<String>,
    multiplier: Option<f64>,
    max_delay: Option<String>,
    jitter: Option<f64>,
}

impl RawFile {
    /// Fills in defaults. `[defaults]` is checked here, before steps inherit from it, so that
    /// a bad default is reported where it is written rather than at every step.
    fn resolve(self) -> Result<SagaDefinition, FieldError> {
        let name = self
            .name
            .ok_or_else(|| FieldError::new("name", "missing"))?;
        let version = match self.version {
            None => return Err(FieldError::new("version", "missing")),
            Some(v) => u32::try_from(v)
                .ok()
                .filter(|v| *v >= 1)
                .ok_or_else(|| version_error(v))?,
        };
        let required_input = self.required_input.unwrap_or_default();

        let defaults = self.defaults.unwrap_or(RawDefaults {
            timeout: None,
            retry: None,
            compensation_retry: None,
        });
        let timeout = parse_duration("defaults.timeout", defaults.timeout, DEFAULT_TIMEOUT)?;
        check_duration("defaults.timeout", timeout, MAX_TIMEOUT)?;
        let retry = merge_policy(
            "defaults.retry",
            defaults.retry,
            &RetryPolicy::DEFAULT_ACTION,
        )?;
        check_policy("defaults.retry", &retry)?;
        let compensation_retry = merge_policy(
            "defaults.compensation_retry",
            defaults.compensation_retry,
            &RetryPolicy::DEFAULT_COMPENSATION,
        )?;
        check_policy("defaults.compensation_retry", &compensation_retry)?;

        let raw_steps = self
            .steps
            .ok_or_else(|| FieldError::new("steps", "at least one step is required"))?;
        let mut steps = Vec::with_capacity(raw_steps.len());
        for (i, step) in raw_steps.into_iter().enumerate() {
            let prefix = format!("steps[{i}]");
            let required = |value: Option<String>, key: &str| {
                value.ok_or_else(|| FieldError::new(format!("{prefix}.{key}"), "missing"))
            };
            steps.push(StepDefinition {
                name: required(step.name, "name")?,
                participant: required(step.participant, "participant")?,
                action: required(step.action, "action")?,
                compensation: step.compensation,
                timeout: parse_duration(&format!("{prefix}.timeout"), step.timeout, timeout)?,
                retry: merge_policy(&format!("{prefix}.retry"), step.retry, &retry)?,
                compensation_retry: merge_policy(
                    &format!("{prefix}.compensation_retry"),
                    step.compensation_retry,
                    &compensation_retry,
                )?,
            });
        }
        Ok(SagaDefinition {
            name,
            version,
            required_input,
            steps,
        })
    }
}

fn version_error(got: impl std::fmt::Display) -> FieldError {
    FieldError::new(
        "version",
        format!("must be from 1 to {}, got {got}", u32::MAX),
    )
}

/// `raw` over `base`, key by key.
fn merge_policy(
    prefix: &str,
    raw: Option<RawPolicy>,
    base: &RetryPolicy,
) -> Result<RetryPolicy, FieldError> {
    let Some(raw) = raw else {
        return Ok(base.clone());
    };
    let max_attempts = match raw.max_attempts {
        None => base.max_attempts,
        Some(0) => None,
        Some(n) => Some(u32::try_from(n).map_err(|_| {
            FieldError::new(
                format!("{prefix}.max_attempts"),
                format!("must be 0 (unlimited) or 1..={MAX_ATTEMPTS_LIMIT}, got {n}"),
            )
        })?),
    };
    Ok(RetryPolicy {
        max_attempts,
        initial_delay: parse_duration(
            &format!("{prefix}.initial_delay"),
            raw.initial_delay,
            base.initial_delay,
        )?,
        multiplier: raw.multiplier.unwrap_or(base.multiplier),
        max_delay: parse_duration(
            &format!("{prefix}.max_delay"),
            raw.max_delay,
            base.max_delay,
        )?,
        jitter: raw.jitter.unwrap_or(base.jitter),
    })
}

/// A humantime duration ("200ms", "5s"), or `default` when the key is absent.
fn parse_duration(
    field: &str,
    text: Option<String>,
    default: Duration,
) -> Result<Duration, FieldError> {
    let Some(text) = text else {
        return Ok(default);
    };
    humantime::parse_duration(text.trim())
        .map_err(|err| FieldError::new(field, format!("invalid duration {text:?}: {err}")))
}

fn check_duration(field: &str, value: Duration, max: Duration) -> Result<(), FieldError> {
    if value.is_zero() || value > max {
        return Err(FieldError::new(
            field,
            format!(
                "must be more than 0 and at most {}, got {}",
                humantime::format_duration(max),
                humantime::format_duration(value)
            ),
        ));
    }
    Ok(())
}

fn check_policy(prefix: &str, policy: &RetryPolicy) -> Result<(), FieldError> {
    if let Some(n) = policy.max_attempts
        && !(1..=MAX_ATTEMPTS_LIMIT).contains(&n)
    {
        return Err(FieldError::new(
            format!("{prefix}.max_attempts"),
            format!(
                "must be 1..={MAX_ATTEMPTS_LIMIT} (0 in a file, or unset here, means unlimited), got {n}"
            ),
        ));
    }
    check_duration(
        &format!("{prefix}.initial_delay"),
        policy.initial_delay,
        MAX_TIMEOUT,
    )?;
    // `contains` is false for NaN, so NaN is refused too.
    if !(1.0..=10.0).contains(&policy.multiplier) {
        return Err(FieldError::new(
            format!("{prefix}.multiplier"),
            format!("must be between 1.0 and 10.0, got {}", policy.multiplier),
        ));
    }
    if policy.max_delay < policy.initial_delay || policy.max_delay > MAX_DELAY_LIMIT {
        return Err(FieldError::new(
            format!("{prefix}.max_delay"),
            format!(
                "must be at least initial_delay ({}) and at most {}, got {}",
                humantime::format_duration(policy.initial_delay),
                humantime::format_duration(MAX_DELAY_LIMIT),
                humantime::format_duration(policy.max_delay)
            ),
        ));
    }
    if !(0.0..1.0).contains(&policy.jitter) {
        return Err(FieldError::new(
            format!("{prefix}.jitter"),
            format!("must be at least 0.0 and below 1.0, got {}", policy.jitter),
        ));
    }
    Ok(())
}

/// Names: lowercase letters, digits, `_` (and `-` for participants), so they are safe in
/// idempotency keys, metric labels and flags.
fn check_identifier(field: &str, value: &str, allow_dash: bool) -> Result<(), FieldError> {
    let allowed = |c: char| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || (allow_dash && c == '-')
    };
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if !value.chars().all(allowed) {
        let set = if allow_dash {
            "[a-z0-9_-]"
        } else {
            "[a-z0-9_]"
        };
        return Err(FieldError::new(
            field,
            format!("{value:?} may only contain {set}"),
        ));
    }
    Ok(())
}

fn check_not_blank(field: &str, value: &str) -> Result<(), FieldError> {
    if value.trim().is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    Ok(())
}

/// A toml error as one line: the key path (toml keeps it private but prints it when the error
/// carries no source text), and the position in the message.
fn toml_error(file: &str, text: &str, err: &toml::de::Error) -> DefinitionError {
    let mut bare = err.clone();
    bare.set_input(None);
    let shown = bare.to_string();
    let mut field = shown
        .strip_prefix(err.message())
        .map(str::trim)
        .and_then(|rest| rest.strip_prefix("in `"))
        .and_then(|rest| rest.strip_suffix('`'))
        .unwrap_or_default()
        .to_owned();
    // For a typo, name the unknown key itself: `steps.retry.max_atempts`.
    if let Some(unknown) = err
        .message()
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(key, _)| key)
    {
        if !field.is_empty() {
            field.push('.');
        }
        field.push_str(unknown);
    }
    if field.is_empty() {
        field.push('-');
    }
    let message = match err.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("{} (line {line}, column {column})", err.message())
        }
        None => err.message().to_owned(),
    };
    DefinitionError::new(file, field, message)
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Collapses every run of whitespace (newlines included) to one space.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    use proptest::prelude::*;

    /// A fresh folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let path = std::env::temp_dir().join(format!(
                "sagad-definition-test-{}-{n}-{nanos:08x}",
                std::process::id()
            ));
            std::fs::create_dir(&path).expect("create temp dir");
            TempDir(path)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).expect("write temp file");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn repo_defs() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../saga-defs")
    }

    fn demo() -> Arc<SagaDefinition> {
        DefinitionSet::load_dir(&repo_defs())
            .expect("saga-defs loads")
            .newest("order_fulfillment")
            .expect("order_fulfillment is defined")
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn assert_one_line(err: &DefinitionError) {
        let shown = err.to_string();
        assert!(!shown.contains('\n') && !shown.contains('\r'), "{shown:?}");
    }

    /// Just below 1: the top of the jitter range.
    const SAMPLE_TOP: f64 = 1.0 - f64::EPSILON;

    #[test]
    fn demo_definition_matches_the_contract() {
        let action = RetryPolicy {
            max_attempts: Some(6),
            initial_delay: ms(200),
            multiplier: 2.0,
            max_delay: Duration::from_secs(5),
            jitter: 0.2,
        };
        let unlimited = RetryPolicy {
            max_attempts: None,
            ..action.clone()
        };
        let step = |name: &str, participant: &str, act: &str, comp: Option<&str>| StepDefinition {
            name: name.to_owned(),
            participant: participant.to_owned(),
            action: act.to_owned(),
            compensation: comp.map(str::to_owned),
            timeout: Duration::from_secs(5),
            retry: action.clone(),
            compensation_retry: unlimited.clone(),
        };
        let expected = SagaDefinition {
            name: "order_fulfillment".to_owned(),
            version: 1,
            required_input: vec![
                "customer_id".to_owned(),
                "amount_cents".to_owned(),
                "country".to_owned(),
            ],
            steps: vec![
                step("create_order", "order", "CreateOrder", Some("CancelOrder")),
                step(
                    "charge_payment",
                    "payment",
                    "ChargePayment",
                    Some("RefundPayment"),
                ),
                step(
                    "schedule_shipment",
                    "shipping",
                    "ScheduleShipment",
                    Some("CancelShipment"),
                ),
                StepDefinition {
                    retry: unlimited.clone(),
                    ..step("approve_order", "order", "ApproveOrder", None)
                },
            ],
        };
        assert_eq!(*demo(), expected);

        let set = DefinitionSet::load_dir(&repo_defs()).expect("saga-defs loads");
        assert!(!set.is_empty());
        assert!(set.saga_types().any(|t| t == "order_fulfillment"));
        let known: BTreeSet<String> = ["order", "payment", "shipping"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        set.check_participants(&known).expect("demo participants");
        assert_eq!(
            set.participants(),
            BTreeSet::from(["order", "payment", "shipping"])
        );
    }

    #[test]
    fn demo_schedule_doubles_from_200ms_and_caps_at_5s() {
        let demo = demo();
        let charge = demo.step("charge_payment").expect("charge_payment");
        for policy in [&charge.retry, &charge.compensation_retry] {
            let middle: Vec<_> = (1..=5).map(|n| policy.delay_after(n, 0.5)).collect();
            assert_eq!(middle, [ms(200), ms(400), ms(800), ms(1600), ms(3200)]);
            let low: Vec<_> = (1..=5).map(|n| policy.delay_after(n, 0.0)).collect();
            assert_eq!(low, [ms(160), ms(320), ms(640), ms(1280), ms(2560)]);
            for (n, base) in (1..=5).zip([200u64, 400, 800, 1600, 3200]) {
                let high = policy.delay_after(n, SAMPLE_TOP);
                let expected = Duration::from_micros(base * 1200);
                assert!(
                    high.abs_diff(expected) <= Duration::from_micros(1),
                    "attempt {n}: {high:?}"
                );
            }
            // 200ms * 2^9 is far above the cap.
            assert_eq!(policy.delay_after(10, 0.5), Duration::from_secs(5));
            assert_eq!(policy.delay_after(10, 0.0), Duration::from_secs(4));
            assert!(
                policy
                    .delay_after(10, SAMPLE_TOP)
                    .abs_diff(Duration::from_secs(6))
                    <= Duration::from_micros(1)
            );
            assert_eq!(policy.delay_after(6, 0.5), Duration::from_secs(5));
        }
    }

    #[test]
    fn demo_attempt_limits() {
        let demo = demo();
        for name in ["create_order", "charge_payment", "schedule_shipment"] {
            let step = demo.step(name).expect("step");
            assert!(step.retry.allows_attempt(1), "{name}");
            assert!(step.retry.allows_attempt(6), "{name}");
            assert!(!step.retry.allows_attempt(7), "{name}");
            assert!(step.compensation_retry.allows_attempt(u32::MAX), "{name}");
        }
        let approve = demo.step("approve_order").expect("approve_order");
        assert_eq!(approve.compensation, None);
        assert!(approve.retry.allows_attempt(7));
        assert!(approve.retry.allows_attempt(u32::MAX));
    }

    #[test]
    fn delay_after_is_total_and_saturates() {
        let huge = RetryPolicy {
            max_attempts: None,
            initial_delay: Duration::from_secs(1),
            multiplier: 10.0,
            max_delay: Duration::MAX,
            jitter: 0.5,
        };
        assert_eq!(huge.delay_after(u32::MAX, 0.99), Duration::MAX);
        assert_eq!(huge.delay_after(0, 0.5), Duration::from_secs(1));
        assert_eq!(huge.delay_after(1, 0.5), Duration::from_secs(1));

        let demo = demo();
        let policy = &demo.step("approve_order").expect("approve_order").retry;
        assert_eq!(policy.delay_after(u32::MAX, 0.5), Duration::from_secs(5));
        // Samples outside [0, 1) are clamped, NaN means "no jitter".
        assert_eq!(policy.delay_after(1, -3.0), ms(160));
        assert_eq!(policy.delay_after(1, 7.0), ms(240));
        assert_eq!(policy.delay_after(1, f64::NAN), ms(200));

        // Nonsense that validation refuses must still not panic or hang.
        let odd = [
            (f64::NAN, 0.2),
            (f64::INFINITY, 0.2),
            (-2.0, 0.2),
            (0.5, 0.2),
            (1.0, f64::NAN),
            (1.0000001, 5.0),
            (2.0, -1.0),
        ];
        for (multiplier, jitter) in odd {
            let policy = RetryPolicy {
                max_attempts: Some(0),
                initial_delay: Duration::from_nanos(1),
                multiplier,
                max_delay: Duration::from_secs(3),
                jitter,
            };
            for attempt in [0, 1, 2, 50, u32::MAX] {
                let delay = policy.delay_after(attempt, 0.9);
                assert!(
                    delay <= Duration::from_secs(6),
                    "{policy:?} {attempt}: {delay:?}"
                );
            }
        }
        let inverted = RetryPolicy {
            max_attempts: None,
            initial_delay: Duration::from_secs(10),
            multiplier: 2.0,
            max_delay: Duration::from_secs(1),
            jitter: 0.0,
        };
        assert_eq!(inverted.delay_after(3, 0.5), Duration::from_secs(1));
    }

    proptest! {
        #[test]
        fn delay_follows_the_formula(
            initial_ms in 1u64..=10_000,
            multiplier in 1.0f64..=10.0,
            max_extra_ms in 0u64..=600_000,
            jitter in 0.0f64..0.99,
            attempt in 1u32..=200,
            sample in 0.0f64..1.0,
        ) {
            let policy = RetryPolicy {
                max_attempts: None,
                initial_delay: ms(initial_ms),
                multiplier,
                max_delay: ms(initial_ms + max_extra_ms),
                jitter,
            };
            let exact = (initial_ms as f64 * multiplier.powf(f64::from(attempt - 1)))
                .min((initial_ms + max_extra_ms) as f64);
            let factor = (1.0 - jitter) + 2.0 * jitter * sample;
            let expected_ms = exact * factor;
            let got_ms = policy.delay_after(attempt, sample).as_secs_f64() * 1000.0;
            // backon works in f32: allow its rounding, compounded over up to 200 steps.
            let tolerance = expected_ms * 1e-4 + 0.01;
            prop_assert!(
                (got_ms - expected_ms).abs() <= tolerance,
                "got {got_ms}ms, expected {expected_ms}ms"
            );
            // Never shorter than the delay before (but for f32 rounding when multiplier ~ 1).
            let next_ms = policy.delay_after(attempt + 1, sample).as_secs_f64() * 1000.0;
            prop_assert!(next_ms >= got_ms * (1.0 - 1e-6) - 0.002, "{next_ms} < {got_ms}");
        }
    }

    const BASE: &str = r#"
name = "demo"
version = 1
required_input = ["a", "b"]

[defaults]
timeout = "5s"
retry = { max_attempts = 3, initial_delay = "100ms", multiplier = 2.0, max_delay = "1s", jitter = 0.1 }
compensation_retry = { initial_delay = "100ms", max_delay = "1s" }

[[steps]]
name = "first"
participant = "svc-a"
action = "DoA"
compensation = "UndoA"

[[steps]]
name = "second"
participant = "svc_b"
action = "DoB"
timeout = "2s"
retry = { max_attempts = 2 }
"#;

    /// `BASE` with the first `from` replaced by `to`; panics if `from` is not there, so a case
    /// cannot silently test the unchanged base.
    fn edit(from: &str, to: &str) -> String {
        assert!(BASE.contains(from), "BASE has no {from:?}");
        BASE.replacen(from, to, 1)
    }

    #[test]
    fn base_document_is_valid_and_inherits_key_by_key() {
        let def = SagaDefinition::from_toml_str(BASE, "base.toml").expect("valid");
        let first = &def.steps[0];
        assert_eq!(first.timeout, Duration::from_secs(5));
        let defaults_retry = RetryPolicy {
            max_attempts: Some(3),
            initial_delay: ms(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(1),
            jitter: 0.1,
        };
        assert_eq!(first.retry, defaults_retry);
        // Keys missing from `[defaults]` come from the built-in compensation policy.
        assert_eq!(
            first.compensation_retry,
            RetryPolicy {
                max_attempts: None,
                initial_delay: ms(100),
                multiplier: 2.0,
                max_delay: Duration::from_secs(1),
                jitter: 0.2,
            }
        );
        // No compensation and limited retries is allowed; missing keys come from `[defaults]`.
        let second = &def.steps[1];
        assert_eq!(second.compensation, None);
        assert_eq!(second.timeout, Duration::from_secs(2));
        assert_eq!(
            second.retry,
            RetryPolicy {
                max_attempts: Some(2),
                ..defaults_retry
            }
        );
    }

    #[test]
    fn built_in_defaults_fill_a_file_without_defaults() {
        let text = "name = \"bare\"\nversion = 2\n[[steps]]\nname = \"only\"\n\
                    participant = \"p\"\naction = \"Do\"\n\
                    compensation_retry = { max_attempts = 3 }\n";
        let def = SagaDefinition::from_toml_str(text, "bare.toml").expect("valid");
        assert!(def.required_input.is_empty());
        let step = &def.steps[0];
        assert_eq!(step.timeout, DEFAULT_TIMEOUT);
        assert_eq!(step.retry, RetryPolicy::DEFAULT_ACTION);
        assert_eq!(step.retry.max_attempts, Some(5));
        assert_eq!(step.retry.max_delay, Duration::from_secs(10));
        assert_eq!(
            step.compensation_retry,
            RetryPolicy {
                max_attempts: Some(3),
                ..RetryPolicy::DEFAULT_COMPENSATION
            }
        );
        assert_eq!(RetryPolicy::DEFAULT_COMPENSATION.max_attempts, None);
    }

    /// Each rule broken once: (replace this in `BASE`, by this, the field named, a piece of the
    /// message).
    #[rustfmt::skip]
    const REFUSED: &[(&str, &str, &str, &str)] = &[
        ("name = \"demo\"\n", "", "name", "missing"),
        (r#"name = "demo""#, r#"name = """#, "name", "empty"),
        (r#"name = "demo""#, r#"name = "Demo""#, "name", "[a-z0-9_]"),
        (r#"name = "demo""#, r#"name = "de-mo""#, "name", "[a-z0-9_]"),
        ("version = 1\n", "", "version", "missing"),
        ("version = 1", "version = 0", "version", "from 1 to"),
        ("version = 1", "version = -3", "version", "from 1 to"),
        ("version = 1", "version = 5000000000", "version", "from 1 to"),
        ("version = 1", r#"version = "1""#, "version", "invalid type"),
        (r#"["a", "b"]"#, r#"["a", ""]"#, "required_input[1]", "empty"),
        (r#"["a", "b"]"#, r#"["a", "a"]"#, "required_input[1]", "duplicate"),
        (r#"name = "first""#, r#"name = "second""#, "steps[1].name", r#"duplicate step "second""#),
        (r#"name = "first""#, r#"name = """#, "steps[0].name", "empty"),
        (r#"name = "first""#, r#"name = "fi rst""#, "steps[0].name", "[a-z0-9_]"),
        ("name = \"first\"\n", "", "steps[0].name", "missing"),
        (r#""svc-a""#, r#""Svc""#, "steps[0].participant", "[a-z0-9_-]"),
        (r#""svc-a""#, r#""""#, "steps[0].participant", "empty"),
        ("participant = \"svc-a\"\n", "", "steps[0].participant", "missing"),
        (r#"action = "DoA""#, r#"action = """#, "steps[0].action", "empty"),
        ("action = \"DoB\"\n", "", "steps[1].action", "missing"),
        (r#""UndoA""#, r#"" ""#, "steps[0].compensation", "empty"),
        (r#"timeout = "2s""#, r#"timeout = "0s""#, "steps[1].timeout", "more than 0"),
        (r#"timeout = "2s""#, r#"timeout = "2h""#, "steps[1].timeout", "at most 1h"),
        (r#"timeout = "2s""#, r#"timeout = "5 parsecs""#, "steps[1].timeout", r#"invalid duration "5 parsecs""#),
        (r#"timeout = "5s""#, r#"timeout = "61m""#, "defaults.timeout", "at most 1h"),
        (r#"timeout = "5s""#, "timeout = 5", "defaults.timeout", "invalid type"),
        ("max_attempts = 2", "max_attempts = 1001", "steps[1].retry.max_attempts", "1..=1000"),
        ("max_attempts = 2", "max_attempts = -1", "steps[1].retry.max_attempts", "1..=1000"),
        ("max_attempts = 3", "max_attempts = 5000", "defaults.retry.max_attempts", "1..=1000"),
        ("multiplier = 2.0", "multiplier = 0.5", "defaults.retry.multiplier", "between 1.0 and 10.0"),
        ("multiplier = 2.0", "multiplier = 11", "defaults.retry.multiplier", "between 1.0 and 10.0"),
        ("multiplier = 2.0", "multiplier = nan", "defaults.retry.multiplier", "NaN"),
        ("{ max_attempts = 2 }", "{ multiplier = 0.9 }", "steps[1].retry.multiplier", "between 1.0 and 10.0"),
        ("jitter = 0.1", "jitter = 1.0", "defaults.retry.jitter", "below 1.0"),
        ("jitter = 0.1", "jitter = -0.1", "defaults.retry.jitter", "at least 0.0"),
        ("jitter = 0.1", "jitter = nan", "defaults.retry.jitter", "NaN"),
        (r#"3, initial_delay = "100ms""#, r#"3, initial_delay = "0ms""#, "defaults.retry.initial_delay", "more than 0"),
        (r#"3, initial_delay = "100ms""#, r#"3, initial_delay = "2h""#, "defaults.retry.initial_delay", "at most 1h"),
        (r#"max_delay = "1s", jitter"#, r#"max_delay = "50ms", jitter"#, "defaults.retry.max_delay", "at least initial_delay"),
        (r#"max_delay = "1s", jitter"#, r#"max_delay = "25h", jitter"#, "defaults.retry.max_delay", "at most 1day"),
        ("{ max_attempts = 2 }", r#"{ initial_delay = "2s" }"#, "steps[1].retry.max_delay", "at least initial_delay (2s)"),
        ("{ max_attempts = 2 }", "{ }\ncompensation_retry = { jitter = 1.5 }", "steps[1].compensation_retry.jitter", "below 1.0"),
        (r#"{ initial_delay = "100ms""#, r#"{ initial_delay = "9 parsecs""#, "defaults.compensation_retry.initial_delay", "invalid duration"),
        (r#"{ initial_delay = "100ms""#, "{ max_attempts = 1001", "defaults.compensation_retry.max_attempts", "1..=1000"),
        // Unknown keys: a typo must not silently fall back to a default.
        ("version = 1\n", "version = 1\ntimeuot = \"5s\"\n", "timeuot", "unknown field"),
        ("action = \"DoA\"\n", "action = \"DoA\"\nacton = \"x\"\n", "steps.acton", "unknown field"),
        ("max_attempts = 2", "max_attempt = 2", "steps.retry.max_attempt", "(line 22, column 11)"),
        ("[defaults]", "[defaults]\nretries = 3", "defaults.retries", "unknown field"),
        // Broken TOML: toml's multi-line report becomes one line.
        (r#"name = "demo""#, r#"name = "demo"#, "-", "(line 2, column 13)"),
    ];

    #[test]
    fn each_rule_names_its_field() {
        let no_steps = BASE.split("[[steps]]").next().expect("header");
        let cases = REFUSED
            .iter()
            .map(|&(from, to, field, fragment)| (edit(from, to), field, fragment))
            .chain([(no_steps.to_owned(), "steps", "at least one step")]);
        for (doc, field, fragment) in cases {
            let err = SagaDefinition::from_toml_str(&doc, "case.toml")
                .expect_err(&format!("should be refused: {field} ({fragment})"));
            assert_eq!(err.file, "case.toml");
            assert_eq!(err.field, field, "{err}");
            assert!(err.message.contains(fragment), "{field}: {err}");
            assert_one_line(&err);
            assert_eq!(
                err.to_string(),
                format!("case.toml: {field}: {}", err.message)
            );
        }
    }

    #[test]
    fn zero_max_attempts_in_a_file_means_unlimited() {
        let doc = edit("max_attempts = 3", "max_attempts = 0");
        let def = SagaDefinition::from_toml_str(&doc, "zero.toml").expect("valid");
        assert_eq!(def.steps[0].retry.max_attempts, None);
        // The step's own `max_attempts = 2` still wins over the default.
        assert_eq!(def.steps[1].retry.max_attempts, Some(2));
    }

    #[test]
    fn parsed_definitions_are_validated_too() {
        let base = (*demo()).clone();
        type Change = fn(&mut SagaDefinition);
        let broken: Vec<(Change, &str)> = vec![
            (|d| d.version = 0, "version"),
            (|d| d.steps.clear(), "steps"),
            (
                |d| d.steps[1].retry.max_attempts = Some(0),
                "steps[1].retry.max_attempts",
            ),
            (
                |d| d.steps[2].compensation_retry.jitter = f64::NAN,
                "steps[2].compensation_retry.jitter",
            ),
            (|d| d.steps[3].timeout = Duration::ZERO, "steps[3].timeout"),
            (
                |d| d.steps[3].name = "create_order".to_owned(),
                "steps[3].name",
            ),
            (
                |d| d.required_input.push("country".to_owned()),
                "required_input[3]",
            ),
        ];
        for (change, field) in broken {
            let mut def = base.clone();
            change(&mut def);
            let err = DefinitionSet::from_definitions(vec![def]).expect_err(field);
            assert_eq!(err.file, "<memory>");
            assert_eq!(err.field, field, "{err}");
            assert_one_line(&err);
        }

        let err = DefinitionSet::from_definitions(vec![base.clone(), base.clone()])
            .expect_err("duplicate version");
        assert_eq!(
            (err.file.as_str(), err.field.as_str()),
            ("<memory>", "version")
        );

        let mut v2 = base.clone();
        v2.version = 2;
        v2.steps.truncate(1);
        let set = DefinitionSet::from_definitions(vec![v2, base]).expect("two versions");
        assert_eq!(set.newest("order_fulfillment").map(|d| d.version), Some(2));
        assert_eq!(
            set.get("order_fulfillment", 1).map(|d| d.steps.len()),
            Some(4)
        );
        assert!(set.newest("nope").is_none());
        assert!(set.get("order_fulfillment", 3).is_none());
    }

    #[test]
    fn same_name_and_version_in_two_files_is_refused() {
        let dir = TempDir::new();
        dir.write("a.toml", BASE);
        let second = dir.write("b.toml", BASE);
        let err = DefinitionSet::load_dir(&dir.0).expect_err("duplicate");
        assert_eq!(err.file, second.display().to_string());
        assert_eq!(err.field, "version");
        assert!(err.message.contains("a.toml"), "{err}");
        assert_one_line(&err);
    }

    #[test]
    fn newest_version_wins_and_old_ones_stay_reachable() {
        let dir = TempDir::new();
        // File names sort the other way round from versions: order must not matter.
        dir.write("a_v2.toml", &edit("version = 1", "version = 2"));
        dir.write("b_v1.toml", BASE);
        dir.write("other.toml", &edit("name = \"demo\"", "name = \"other\""));
        dir.write("notes.txt", "not a definition");
        std::fs::create_dir(dir.0.join("nested.toml")).expect("dir");
        let set = DefinitionSet::load_dir(&dir.0).expect("valid");
        assert_eq!(set.newest("demo").map(|d| d.version), Some(2));
        assert_eq!(set.get("demo", 1).map(|d| d.version), Some(1));
        assert_eq!(set.saga_types().collect::<Vec<_>>(), ["demo", "other"]);
    }

    #[test]
    fn unknown_participant_names_file_and_field() {
        let dir = TempDir::new();
        let demo_text =
            std::fs::read_to_string(repo_defs().join("order_fulfillment.toml")).expect("demo file");
        let file = dir.write("order_fulfillment.toml", &demo_text);
        let set = DefinitionSet::load_dir(&dir.0).expect("valid");
        let known: BTreeSet<String> = ["order", "shipping"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        let err = set
            .check_participants(&known)
            .expect_err("payment has no address");
        assert_eq!(err.file, file.display().to_string());
        assert_eq!(err.field, "steps[1].participant");
        assert!(err.message.contains("--participant payment=URI"), "{err}");
        assert!(
            err.to_string()
                .contains("order_fulfillment.toml: steps[1].participant: ")
        );
        assert_one_line(&err);
    }

    #[test]
    fn missing_or_empty_folder_is_refused() {
        let dir = TempDir::new();
        let missing = dir.0.join("absent");
        let err = DefinitionSet::load_dir(&missing).expect_err("missing");
        assert_eq!(
            (err.file.clone(), err.field.as_str()),
            (missing.display().to_string(), "-")
        );
        assert_one_line(&err);

        dir.write("README.md", "no definitions here");
        let err = DefinitionSet::load_dir(&dir.0).expect_err("empty");
        assert_eq!(
            (err.file.clone(), err.field.as_str()),
            (dir.0.display().to_string(), "-")
        );
        assert!(err.message.contains("*.toml"), "{err}");
    }

    #[test]
    fn validate_dir_reports_every_bad_file() {
        let dir = TempDir::new();
        dir.write("a.toml", &edit("version = 1", "version = 0"));
        dir.write("b.toml", &edit("name = \"demo\"", "name = \"other\""));
        dir.write("c.toml", &edit("jitter = 0.1", "jitter = 2.0"));
        let errors = DefinitionSet::validate_dir(&dir.0).expect_err("two bad files");
        let found: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(found, ["version", "defaults.retry.jitter"]);
        let first = DefinitionSet::load_dir(&dir.0).expect_err("bad");
        assert_eq!(first, errors[0]);
    }

    #[test]
    fn error_display_is_one_line_even_for_odd_input() {
        let err = DefinitionError::new("a\nb.toml", "x\ny", "first\n  second\r\nthird");
        assert_eq!(err.to_string(), "a b.toml: x y: first second third");
    }

    #[test]
    fn definitions_round_trip_through_json() {
        let demo = demo();
        let json = serde_json::to_string(&*demo).expect("serialize");
        assert!(json.contains("\"timeout\":\"5s\""), "{json}");
        let back: SagaDefinition = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, *demo);
    }
}
