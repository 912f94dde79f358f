//! Saga definitions: the `*.toml` files of the definitions folder (`--defs`), parsed into
//! [`SagaDefinition`]s and validated once at start, the retry schedule of a step
//! ([`RetryPolicy::delay_after`]), and the check of a saga's input against the JSON Schema its
//! definition may give ([`DefinitionSet::check_input`]).
//!
//! This module does no IO besides reading that folder (the definitions and the schema files
//! beside them): no clock, no randomness (the caller draws the jitter sample), no network, and a
//! schema's `$ref` is never fetched. Every error is a [`DefinitionError`], one line naming the
//! file and the field, because sagad exits on it and an operator has to find and fix the file.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Component, Path};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use jsonschema::error::ValidationErrorKind;
use jsonschema::{Draft, ValidationError, Validator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
/// The most steps a definition may have: every saga of it carries one step state per step in
/// each answer and in memory.
pub const MAX_STEPS: usize = 100;
/// The largest definition file (or schema file) read: a definition is a page of TOML.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// The `file` of errors about definitions that did not come from a file.
/// A file's text, refused unread when it is larger than [`MAX_FILE_BYTES`].
fn read_bounded(path: &Path) -> Result<String, String> {
    let size = std::fs::metadata(path)
        .map_err(|err| format!("cannot read: {err}"))?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(format!(
            "{size} bytes, more than the {MAX_FILE_BYTES} a definition file may have"
        ));
    }
    std::fs::read_to_string(path).map_err(|err| format!("cannot read: {err}"))
}

#[cfg(test)]
const MEMORY_FILE: &str = "<memory>";
/// Longest echo of an input value or a property name in an error, in characters: a huge input
/// must not make a huge error.
const ECHO_LIMIT: usize = 100;
/// Longest `field` or `message` of an [`InputMismatch`], in characters.
const MISMATCH_TEXT_LIMIT: usize = 300;
/// The key of a definition file that holds its input schema, and the root of its errors' fields.
const SCHEMA_FIELD: &str = "input_schema";

/// Where a saga type is defined; loaded once at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaDefinition {
    /// The saga type, as given in `StartSaga.saga_type`.
    pub name: String,
    /// `>= 1`; a saga keeps running on the version it started with.
    pub version: u32,
    /// Top-level input fields that must be present (and not null).
    pub required_input: Vec<String>,
    /// A JSON Schema the input must match ([`DefinitionSet::check_input`]); `None`: any input.
    /// Part of the snapshot, so a saga keeps the schema it started with; left out of snapshots
    /// without one, and absent from those written before schemas existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
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
    /// Parses and validates one definition file's text; `file` names it in errors, and a schema
    /// file named by `input_schema` is read from the folder of `file`.
    pub fn from_toml_str(text: &str, file: &str) -> Result<SagaDefinition, DefinitionError> {
        let folder = Path::new(file).parent().unwrap_or(Path::new("."));
        Self::parse(text, file, folder).map(|(definition, _)| definition)
    }

    /// Parses and validates one definition file's text, and compiles its input schema (read from
    /// `folder` when the file names a schema file).
    fn parse(
        text: &str,
        file: &str,
        folder: &Path,
    ) -> Result<(SagaDefinition, Option<Arc<Validator>>), DefinitionError> {
        let mut raw: RawFile = toml::from_str(text).map_err(|err| toml_error(file, text, &err))?;
        let schema = raw.input_schema.take();
        let mut definition = raw.resolve().map_err(|err| err.in_file(file))?;
        let mut schema_file = None;
        if let Some(schema) = schema {
            let (value, from) = load_schema(schema, folder).map_err(|err| err.in_file(file))?;
            definition.input_schema = Some(value);
            schema_file = from;
        }
        let validator = definition.check().map_err(|mut err| {
            // The field is a path in the schema file: say which file that is.
            if let Some(name) = &schema_file
                && err.field.starts_with(SCHEMA_FIELD)
            {
                err.message = format!("{} (in {name})", err.message);
            }
            err.in_file(file)
        })?;
        Ok((definition, validator))
    }

    /// The step called `name`, if the saga has one.
    pub fn step(&self, name: &str) -> Option<&StepDefinition> {
        self.steps.iter().find(|step| step.name == name)
    }

    /// Every rule of the file format that a parsed definition can still break, in file order;
    /// returns the compiled input schema, if the definition has one.
    fn check(&self) -> Result<Option<Arc<Validator>>, FieldError> {
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
        let validator = self
            .input_schema
            .as_ref()
            .map(|schema| compile_schema(schema).map(Arc::new))
            .transpose()?;
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
        Ok(validator)
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

/// Why an input does not match its definition's `input_schema`: the first error found, in one
/// line, `"{field}: {message} (rule: {rule})"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message} (rule: {rule})")]
pub struct InputMismatch {
    /// Where: `input` (the whole input), `input.amount_cents`, `input.items[0].quantity`; for a
    /// missing field (`required`), that field, e.g. `input.customer_id`.
    pub field: String,
    /// The schema keyword that failed: `type`, `minimum`, `pattern`, `required`, …
    pub rule: String,
    /// What is wrong; an echoed value is cut to 100 characters.
    pub message: String,
}

/// All loaded definitions: several versions of one type may be loaded; `StartSaga` uses the
/// newest, a saga already running keeps its own.
#[derive(Debug, Clone, Default)]
pub struct DefinitionSet {
    /// In load order (file name order), so errors name the first file that uses something.
    loaded: Vec<Loaded>,
    by_type: BTreeMap<String, BTreeMap<u32, Arc<SagaDefinition>>>,
    /// The input schemas, compiled once at load, by name and version: never serialized, so a
    /// snapshot holds only the schema itself.
    schemas: BTreeMap<String, BTreeMap<u32, Arc<Validator>>>,
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
            let loaded = read_bounded(&path)
                .map_err(|err| DefinitionError::new(&file, "-", err))
                .and_then(|text| SagaDefinition::parse(&text, &file, dir))
                .and_then(|(definition, validator)| set.insert(definition, validator, &file));
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
            let validator = definition.check().map_err(|err| err.in_file(MEMORY_FILE))?;
            set.insert(definition, validator, MEMORY_FILE)?;
        }
        Ok(set)
    }

    fn insert(
        &mut self,
        definition: SagaDefinition,
        validator: Option<Arc<Validator>>,
        file: &str,
    ) -> Result<(), DefinitionError> {
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
        if let Some(validator) = validator {
            self.schemas
                .entry(definition.name.clone())
                .or_default()
                .insert(definition.version, validator);
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

    /// Every definition, by saga type and then version.
    pub fn all(&self) -> impl Iterator<Item = &Arc<SagaDefinition>> {
        self.by_type.values().flat_map(BTreeMap::values)
    }

    /// Every participant name used by some step.
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

    /// Checks a saga's input against its definition's `input_schema`; a definition without one
    /// accepts any input. Returns the first error (always the same one for the same input).
    ///
    /// The validator compiled at load serves when `definition` is the loaded one of its name and
    /// version, with the same schema. Any other definition (a snapshot of a version no longer
    /// loaded, or of a file since edited without a new version) has its own schema compiled here
    /// and then dropped: a saga is judged by the schema it carries, never by another one, and
    /// never let through unchecked. That schema compiled when it was loaded; should it no longer
    /// compile, the input is refused with rule `input_schema`.
    pub fn check_input(
        &self,
        definition: &SagaDefinition,
        input: &Value,
    ) -> Result<(), InputMismatch> {
        let Some(schema) = &definition.input_schema else {
            return Ok(());
        };
        let same_as_loaded = self
            .by_type
            .get(&definition.name)
            .and_then(|versions| versions.get(&definition.version))
            .is_some_and(|loaded| {
                std::ptr::eq(Arc::as_ptr(loaded), definition)
                    || loaded.input_schema.as_ref() == Some(schema)
            });
        let compiled = self
            .schemas
            .get(&definition.name)
            .and_then(|versions| versions.get(&definition.version))
            .filter(|_| same_as_loaded);
        let validator = match compiled {
            Some(validator) => Arc::clone(validator),
            None => compile_schema(schema)
                .map(Arc::new)
                .map_err(|err| InputMismatch {
                    field: "input".to_owned(),
                    rule: SCHEMA_FIELD.to_owned(),
                    message: cap(
                        &format!(
                            "the saga's input schema does not compile: {}: {}",
                            err.field, err.message
                        ),
                        MISMATCH_TEXT_LIMIT,
                    ),
                })?,
        };
        validator
            .validate(input)
            .map_err(|err| input_mismatch(&err, input))
    }

    /// How many definitions were loaded (one per file), for `sagactl defs validate`.
    pub fn len(&self) -> usize {
        self.loaded.len()
    }

    pub fn is_empty(&self) -> bool {
        self.loaded.is_empty()
    }

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
    /// A table (the schema itself) or a string (a `.json` file beside the definition).
    input_schema: Option<toml::Value>,
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
        if raw_steps.len() > MAX_STEPS {
            return Err(FieldError::new(
                "steps",
                format!("at most {MAX_STEPS} steps, got {}", raw_steps.len()),
            ));
        }
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
            input_schema: None,
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

/// `input_schema` as written: a table is the schema itself, a string names a `.json` file in
/// `folder`. Returns the schema, and the file it came from, if any.
fn load_schema(raw: toml::Value, folder: &Path) -> Result<(Value, Option<String>), FieldError> {
    match raw {
        toml::Value::String(name) => {
            let relative = Path::new(&name);
            let inside = relative
                .components()
                .all(|part| matches!(part, Component::Normal(_) | Component::CurDir));
            if !inside || relative.extension().is_none_or(|ext| ext != "json") {
                return Err(FieldError::new(
                    SCHEMA_FIELD,
                    format!(
                        "must be a table (the schema) or the path of a .json file relative to \
                         this file's folder, inside it, got {name:?}"
                    ),
                ));
            }
            let path = folder.join(relative);
            let shown = path.display().to_string();
            let text = read_bounded(&path)
                .map_err(|err| FieldError::new(SCHEMA_FIELD, format!("{shown}: {err}")))?;
            let schema = serde_json::from_str(&text).map_err(|err| {
                FieldError::new(SCHEMA_FIELD, format!("{shown} is not valid JSON: {err}"))
            })?;
            Ok((schema, Some(shown)))
        }
        table @ toml::Value::Table(_) => Ok((toml_to_json(SCHEMA_FIELD, table)?, None)),
        other => Err(FieldError::new(
            SCHEMA_FIELD,
            format!(
                "must be a table (the schema) or the path of a .json file, got {}",
                other.type_str()
            ),
        )),
    }
}

/// A TOML value as JSON; `field` names it in errors. Dates and non-finite floats have no JSON
/// form and are refused rather than turned into something else.
fn toml_to_json(field: &str, value: toml::Value) -> Result<Value, FieldError> {
    Ok(match value {
        toml::Value::String(text) => Value::String(text),
        toml::Value::Integer(n) => Value::from(n),
        toml::Value::Float(x) => serde_json::Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| FieldError::new(field, format!("{x} is not a JSON number")))?,
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(when) => {
            return Err(FieldError::new(
                field,
                format!("a TOML date-time ({when}) has no JSON form: write it as a string"),
            ));
        }
        toml::Value::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| toml_to_json(&format!("{field}[{i}]"), item))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(table) => Value::Object(
            table
                .into_iter()
                .map(|(key, item)| {
                    let mut path = field.to_owned();
                    push_key(&mut path, &key);
                    toml_to_json(&path, item).map(|item| (key, item))
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Compiles an input schema: draft from its `$schema` (2020-12 when absent), checked against
/// that draft's meta-schema, no network and no files (`offline`: a `$ref` outside the schema is
/// an error). Errors name the place in the schema, e.g. `input_schema.properties.amount.minimum`.
fn compile_schema(schema: &Value) -> Result<Validator, FieldError> {
    let field = format!("{SCHEMA_FIELD}.$schema");
    match Draft::default().detect(schema) {
        // Inputs come from a google.protobuf.Struct, where every number is a double.
        Draft::Draft4 => {
            return Err(FieldError::new(
                field,
                "draft 4 does not count 5.0 as an integer, and inputs carry every number as a \
                 double: use draft 6 or newer (leave $schema out for 2020-12)",
            ));
        }
        Draft::Unknown => {
            return Err(FieldError::new(
                field,
                "unknown JSON Schema draft: use draft-06, draft-07, 2019-09 or 2020-12 \
                 (leave $schema out for 2020-12); custom meta-schemas are not fetched",
            ));
        }
        _ => {}
    }
    jsonschema::options()
        .offline()
        .build(schema)
        .map_err(|err| schema_error(schema, &err))
}

/// A schema that does not compile, as an error on the place in the schema that is wrong.
fn schema_error(schema: &Value, err: &ValidationError<'_>) -> FieldError {
    if let ValidationErrorKind::Referencing(reference) = err.kind() {
        let message = reference.to_string();
        let field = reference_field(schema, &message, SCHEMA_FIELD.to_owned())
            .unwrap_or_else(|| SCHEMA_FIELD.to_owned());
        let mut message = cap(&message, MISMATCH_TEXT_LIMIT);
        if matches!(
            reference,
            jsonschema::ReferencingError::Unretrievable { .. }
        ) {
            message.push_str(
                " (only references inside the schema are followed, never the network or files: \
                 put shared parts under $defs)",
            );
        }
        return FieldError::new(field, message);
    }
    FieldError::new(
        render_path(SCHEMA_FIELD, schema, err.instance_path().as_str()),
        describe(err),
    )
}

/// The first `$ref`, `$dynamicRef` or `$schema` in `schema` that the resolver's `message` is
/// about (it quotes the URI or pointer it could not resolve), as a field under `path`.
fn reference_field(schema: &Value, message: &str, path: String) -> Option<String> {
    match schema {
        Value::Object(map) => map.iter().find_map(|(key, value)| {
            let mut child = path.clone();
            push_key(&mut child, key);
            let is_reference = matches!(key.as_str(), "$ref" | "$dynamicRef" | "$schema");
            match value {
                Value::String(target) if is_reference => {
                    let (base, fragment) = target.split_once('#').unwrap_or((target, ""));
                    let needle = if base.is_empty() { fragment } else { base };
                    (!needle.is_empty() && message.contains(needle)).then_some(child)
                }
                _ => reference_field(value, message, child),
            }
        }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| reference_field(item, message, format!("{path}[{i}]"))),
        _ => None,
    }
}

/// An input's first validation error as an [`InputMismatch`].
fn input_mismatch(err: &ValidationError<'_>, input: &Value) -> InputMismatch {
    let mut field = render_path("input", input, err.instance_path().as_str());
    match err.kind() {
        ValidationErrorKind::Required { property } => {
            if let Some(name) = property.as_str() {
                push_key(&mut field, name);
            }
        }
        ValidationErrorKind::AdditionalProperties { unexpected }
        | ValidationErrorKind::UnevaluatedProperties { unexpected } => {
            if let Some(name) = unexpected.first() {
                push_key(&mut field, name);
            }
        }
        _ => {}
    }
    InputMismatch {
        field: cap(&field, MISMATCH_TEXT_LIMIT),
        rule: cap(err.kind().keyword(), ECHO_LIMIT),
        message: describe(err),
    }
}

/// The error's message on one line, with the value it is about cut to [`ECHO_LIMIT`].
fn describe(err: &ValidationError<'_>) -> String {
    let shown = err.masked_with(echo(err.instance())).to_string();
    cap(&shown.replace(char::is_control, " "), MISMATCH_TEXT_LIMIT)
}

/// `value` as compact JSON, cut after [`ECHO_LIMIT`] characters without writing out the rest.
fn echo(value: &Value) -> String {
    /// Takes bytes until it holds enough for `ECHO_LIMIT + 1` characters, then refuses.
    struct Capped(Vec<u8>);
    impl io::Write for Capped {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let room = (4 * (ECHO_LIMIT + 1)).saturating_sub(self.0.len());
            if room == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let taken = room.min(buf.len());
            self.0.extend_from_slice(&buf[..taken]);
            Ok(taken)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut out = Capped(Vec::new());
    // An error only means the value was longer than what was kept.
    let _ = serde_json::to_writer(&mut out, value);
    cap(&String::from_utf8_lossy(&out.0), ECHO_LIMIT)
}

/// `text` cut to `limit` characters, with `…` when something was cut.
fn cap(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// The JSON pointer `pointer` into `value` as a path under `root`: `root.items[0].quantity`.
/// A segment is an index only where `value` has an array, so a key `"0"` stays a key.
fn render_path(root: &str, value: &Value, pointer: &str) -> String {
    let mut path = root.to_owned();
    let mut current = Some(value);
    for raw in pointer.split('/').skip(1) {
        let segment = raw.replace("~1", "/").replace("~0", "~");
        let index = match current {
            Some(Value::Array(_)) => segment.parse::<usize>().ok(),
            _ => None,
        };
        match index {
            Some(i) => {
                path.push_str(&format!("[{i}]"));
                current = current.and_then(|node| node.get(i));
            }
            None => {
                push_key(&mut path, &segment);
                current = current.and_then(|node| node.get(&segment));
            }
        }
    }
    path
}

/// Appends `.key`, or `["key"]` (JSON-quoted, cut to [`ECHO_LIMIT`]) when the key is not a plain
/// name, so a path stays one unambiguous line.
fn push_key(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '$'));
    if plain && key.len() <= ECHO_LIMIT {
        path.push('.');
        path.push_str(key);
    } else {
        let quoted = serde_json::to_string(&cap(key, ECHO_LIMIT)).unwrap_or_default();
        path.push('[');
        path.push_str(&quoted);
        path.push(']');
    }
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
    use serde_json::json;

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
            input_schema: Some(json!({
                "type": "object",
                "required": ["customer_id", "amount_cents", "country"],
                "properties": {
                    "customer_id": {"type": "string", "minLength": 1},
                    "amount_cents": {"type": "integer", "minimum": 1},
                    "country": {"type": "string", "pattern": "^[A-Z]{2}$"},
                    "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                    "items": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["sku", "quantity"],
                            "properties": {
                                "sku": {"type": "string", "minLength": 1},
                                "quantity": {"type": "integer", "minimum": 1},
                            },
                        },
                    },
                },
            })),
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
    fn too_many_steps_or_too_large_a_file_is_refused() {
        let mut text = "name = \"long\"\nversion = 1\n".to_owned();
        for i in 0..=MAX_STEPS {
            text.push_str(&format!(
                "\n[[steps]]\nname = \"s{i}\"\nparticipant = \"p\"\naction = \"A\"\n"
            ));
        }
        let error = SagaDefinition::from_toml_str(&text, "long.toml")
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("steps") && error.contains("at most 100"),
            "{error}"
        );

        let dir = std::env::temp_dir().join(format!("sagad-defs-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp folder");
        let padding = "#".repeat(MAX_FILE_BYTES as usize);
        std::fs::write(dir.join("big.toml"), format!("{BASE}\n{padding}\n")).expect("write");
        let errors = DefinitionSet::validate_dir(&dir).err().unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().contains("big.toml"), "{errors:?}");
        assert!(errors[0].to_string().contains("more than"), "{errors:?}");
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
            (
                |d| d.input_schema = Some(json!({"properties": {"a": {"minimum": "x"}}})),
                "input_schema.properties.a.minimum",
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
        // The snapshot keeps the schema.
        assert!(json.contains("\"input_schema\":{"), "{json}");
        let back: SagaDefinition = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, *demo);
        assert!(back.input_schema.is_some());
    }

    #[test]
    fn a_snapshot_from_before_input_schemas_still_loads() {
        // A `saga_started` snapshot as written before the field existed.
        let old = r#"{"name":"demo","version":1,"required_input":["a"],"steps":[{"name":"first",
            "participant":"p","action":"DoA","compensation":null,"timeout":"5s",
            "retry":{"max_attempts":3,"initial_delay":"100ms","multiplier":2.0,"max_delay":"1s","jitter":0.1},
            "compensation_retry":{"max_attempts":null,"initial_delay":"100ms","multiplier":2.0,"max_delay":"1s","jitter":0.1}}]}"#;
        let def: SagaDefinition = serde_json::from_str(old).expect("old snapshot");
        assert_eq!(def.input_schema, None);
        assert_eq!(def.steps[0].timeout, Duration::from_secs(5));
        // And one without a schema is written as before: no `input_schema` key.
        let json = serde_json::to_string(&def).expect("serialize");
        assert!(!json.contains("input_schema"), "{json}");
        let set = DefinitionSet::from_definitions(vec![def.clone()]).expect("valid");
        set.check_input(&def, &json!({"anything": [1, 2]}))
            .expect("no schema accepts any input");
    }

    /// The contract's example input of the demo saga.
    fn example_input() -> Value {
        json!({"customer_id": "c-1", "amount_cents": 1250, "currency": "EUR", "country": "FR",
               "items": [{"sku": "sku-1", "quantity": 2}]})
    }

    /// `example_input` with the JSON pointer `at` set to `value`.
    fn example_with(at: &str, value: Value) -> Value {
        let mut input = example_input();
        *input.pointer_mut(at).expect("pointer into the example") = value;
        input
    }

    #[test]
    fn demo_schema_accepts_the_example_and_refuses_each_bad_field() {
        let set = DefinitionSet::load_dir(&repo_defs()).expect("saga-defs loads");
        let demo = set.newest("order_fulfillment").expect("demo");
        set.check_input(&demo, &example_input())
            .expect("the example");
        // Struct inputs carry doubles; extra fields are allowed; items and currency are optional.
        let doubles = json!({"customer_id": "c-1", "amount_cents": 1250.0, "country": "FR",
                             "items": [{"sku": "s", "quantity": 2.0}], "note": "gift"});
        set.check_input(&demo, &doubles).expect("whole doubles");

        let without = |key: &str| {
            let mut input = example_input();
            input.as_object_mut().expect("object").remove(key);
            input
        };
        let refused = [
            (
                example_with("/amount_cents", json!(0)),
                "input.amount_cents",
                "minimum",
            ),
            (
                example_with("/amount_cents", json!(12.5)),
                "input.amount_cents",
                "type",
            ),
            (
                example_with("/amount_cents", json!("1250")),
                "input.amount_cents",
                "type",
            ),
            (
                example_with("/customer_id", json!("")),
                "input.customer_id",
                "minLength",
            ),
            (
                example_with("/country", json!("fr")),
                "input.country",
                "pattern",
            ),
            (
                example_with("/country", json!("FRA")),
                "input.country",
                "pattern",
            ),
            (
                example_with("/country", json!("")),
                "input.country",
                "pattern",
            ),
            (
                example_with("/currency", json!("eu")),
                "input.currency",
                "pattern",
            ),
            (
                example_with("/items/0/quantity", json!(0)),
                "input.items[0].quantity",
                "minimum",
            ),
            (
                example_with("/items/0/sku", json!("")),
                "input.items[0].sku",
                "minLength",
            ),
            (
                example_with("/items/0", json!({"sku": "s"})),
                "input.items[0].quantity",
                "required",
            ),
            (example_with("/items", json!({})), "input.items", "type"),
            (without("customer_id"), "input.customer_id", "required"),
            (without("country"), "input.country", "required"),
            (json!([1, 2]), "input", "type"),
        ];
        for (input, field, rule) in refused {
            let err = set
                .check_input(&demo, &input)
                .expect_err(&format!("{field} ({rule}) should be refused: {input}"));
            println!("{err}");
            assert_eq!(
                (err.field.as_str(), err.rule.as_str()),
                (field, rule),
                "{err}"
            );
            assert_eq!(
                err.to_string(),
                format!("{field}: {} (rule: {rule})", err.message)
            );
            assert!(!err.to_string().contains('\n'), "{err}");
            // The same input always gets the same first error.
            assert_eq!(set.check_input(&demo, &input), Err(err));
        }
    }

    #[test]
    fn integer_accepts_whole_doubles_in_every_draft_allowed() {
        for draft in [
            None,
            Some("https://json-schema.org/draft/2020-12/schema"),
            Some("https://json-schema.org/draft/2019-09/schema"),
            Some("http://json-schema.org/draft-07/schema#"),
            Some("http://json-schema.org/draft-06/schema#"),
        ] {
            let mut schema = json!({"properties": {"n": {"type": "integer"}}});
            if let Some(uri) = draft {
                schema["$schema"] = json!(uri);
            }
            let set = schema_set(schema);
            let def = set.newest("demo").expect("demo");
            for whole in [json!(5), json!(5.0), json!(-3.0), json!(1e15)] {
                set.check_input(&def, &json!({"n": whole}))
                    .unwrap_or_else(|err| panic!("{draft:?}: {whole} refused: {err}"));
            }
            let err = set
                .check_input(&def, &json!({"n": 5.5}))
                .expect_err("5.5 is no integer");
            assert_eq!((err.field.as_str(), err.rule.as_str()), ("input.n", "type"));
        }
        // Draft 4 would refuse 5.0, so it is refused at load.
        let err = schema_error_of(
            r#"input_schema = { "$schema" = "http://json-schema.org/draft-04/schema#" }"#,
        );
        assert_eq!(err.field, "input_schema.$schema");
        assert!(err.message.contains("draft 6 or newer"), "{err}");
    }

    /// `BASE` with `input_schema = schema` (as JSON), loaded into a set.
    fn schema_set(schema: Value) -> DefinitionSet {
        let mut def = SagaDefinition::from_toml_str(BASE, "base.toml").expect("valid");
        def.input_schema = Some(schema);
        DefinitionSet::from_definitions(vec![def]).expect("valid schema")
    }

    /// The error of `BASE` with `line` added at the top level.
    fn schema_error_of(line: &str) -> DefinitionError {
        let doc = edit("version = 1\n", &format!("version = 1\n{line}\n"));
        let err = SagaDefinition::from_toml_str(&doc, "case.toml")
            .expect_err(&format!("should be refused: {line}"));
        assert_eq!(err.file, "case.toml");
        assert_one_line(&err);
        err
    }

    #[test]
    fn an_inline_schema_is_converted_from_toml() {
        let doc = edit(
            "version = 1\n",
            "version = 1\ninput_schema = { type = \"object\", required = [\"a\"], \
             properties = { a = { type = \"number\", maximum = 2.5 }, b = { enum = [1, true, \"x\"] } } }\n",
        );
        let def = SagaDefinition::from_toml_str(&doc, "inline.toml").expect("valid");
        assert_eq!(
            def.input_schema,
            Some(json!({"type": "object", "required": ["a"],
                        "properties": {"a": {"type": "number", "maximum": 2.5},
                                       "b": {"enum": [1, true, "x"]}}}))
        );
        let set = DefinitionSet::from_definitions(vec![def.clone()]).expect("valid");
        set.check_input(&def, &json!({"a": 2, "b": true}))
            .expect("valid input");
        let err = set
            .check_input(&def, &json!({"a": 3}))
            .expect_err("too big");
        assert_eq!(
            err.to_string(),
            "input.a: 3 is greater than the maximum of 2.5 (rule: maximum)"
        );
        let err = set
            .check_input(&def, &json!({"a": 1, "b": 2}))
            .expect_err("not in enum");
        assert_eq!((err.field.as_str(), err.rule.as_str()), ("input.b", "enum"));
        let err = set.check_input(&def, &json!({})).expect_err("missing");
        assert_eq!(
            err.to_string(),
            r#"input.a: "a" is a required property (rule: required)"#
        );
    }

    #[test]
    fn a_schema_file_beside_the_definition_is_read_and_not_loaded_as_one() {
        let dir = TempDir::new();
        let doc = edit(
            "version = 1\n",
            "version = 1\ninput_schema = \"demo.input.json\"\n",
        );
        dir.write("demo.toml", &doc);
        dir.write(
            "demo.input.json",
            r#"{"type": "object", "properties": {"qty": {"type": "integer", "minimum": 1}}}"#,
        );
        let set = DefinitionSet::load_dir(&dir.0).expect("valid");
        assert_eq!(set.len(), 1, "the .json is no definition");
        let def = set.newest("demo").expect("demo");
        assert_eq!(
            def.input_schema,
            Some(
                json!({"type": "object", "properties": {"qty": {"type": "integer", "minimum": 1}}})
            )
        );
        set.check_input(&def, &json!({"qty": 3}))
            .expect("valid input");
        let err = set
            .check_input(&def, &json!({"qty": 0}))
            .expect_err("below minimum");
        assert_eq!(
            (err.field.as_str(), err.rule.as_str()),
            ("input.qty", "minimum")
        );

        // A subfolder is fine too; `from_toml_str` reads from the folder of the file it is given.
        std::fs::create_dir(dir.0.join("schemas")).expect("subfolder");
        dir.write("schemas/x.json", r#"{"required": ["x"]}"#);
        let doc = edit(
            "version = 1\n",
            "version = 1\ninput_schema = \"./schemas/x.json\"\n",
        );
        let file = dir.0.join("other.toml").display().to_string();
        let def = SagaDefinition::from_toml_str(&doc, &file).expect("valid");
        assert_eq!(def.input_schema, Some(json!({"required": ["x"]})));
    }

    #[test]
    fn each_schema_problem_names_its_field() {
        let dir = TempDir::new();
        dir.write("broken.json", "{\"type\": \"object\",\n  \"properties\": }");
        dir.write("deep.json", r#"{"properties": {"a": {"minimum": "x"}}}"#);
        std::fs::create_dir(dir.0.join("folder.json")).expect("dir");
        let cases: [(&str, &str, &str); 20] = [
            // The key itself.
            ("input_schema = 5", "input_schema", "got integer"),
            (
                r#"input_schema = "missing.json""#,
                "input_schema",
                "cannot read",
            ),
            (
                r#"input_schema = "folder.json""#,
                "input_schema",
                "cannot read",
            ),
            (
                r#"input_schema = "broken.json""#,
                "input_schema",
                "line 2 column",
            ),
            (
                r#"input_schema = "../broken.json""#,
                "input_schema",
                "inside it",
            ),
            (
                r#"input_schema = "/etc/schema.json""#,
                "input_schema",
                "inside it",
            ),
            (
                r#"input_schema = "schema.yaml""#,
                "input_schema",
                ".json file",
            ),
            // A file's schema errors point into it, and say which file it is.
            (
                r#"input_schema = "deep.json""#,
                "input_schema.properties.a.minimum",
                "deep.json",
            ),
            // Not JSON, once converted.
            (
                "input_schema = { default = 1979-05-27 }",
                "input_schema.default",
                "date-time",
            ),
            (
                "input_schema = { properties = { a = { maximum = nan } } }",
                "input_schema.properties.a.maximum",
                "not a JSON number",
            ),
            // Not a valid JSON Schema.
            (
                r#"input_schema = { type = "intger" }"#,
                "input_schema.type",
                "intger",
            ),
            (
                r#"input_schema = { properties = { a = { minimum = "x" } } }"#,
                "input_schema.properties.a.minimum",
                "\"x\" is not of type \"number\"",
            ),
            (
                r#"input_schema = { required = [1] }"#,
                "input_schema.required[0]",
                "string",
            ),
            (
                r#"input_schema = { properties = { a = { pattern = "(unclosed" } } }"#,
                "input_schema.properties.a.pattern",
                "regex",
            ),
            (
                r#"input_schema = { "$schema" = "https://example.com/my-meta" }"#,
                "input_schema.$schema",
                "unknown JSON Schema draft",
            ),
            // References that would need the network or a file, or lead nowhere.
            (
                r#"input_schema = { properties = { a = { "$ref" = "https://example.com/a.json" } } }"#,
                "input_schema.properties.a.$ref",
                "never the network",
            ),
            (
                r#"input_schema = { allOf = [{}, { "$ref" = "file:///etc/passwd" }] }"#,
                "input_schema.allOf[1].$ref",
                "file:///etc/passwd",
            ),
            (
                r#"input_schema = { properties = { a = { "$ref" = "other.json#/x" } } }"#,
                "input_schema.properties.a.$ref",
                "other.json",
            ),
            (
                r##"input_schema = { "$ref" = "#/$defs/missing" }"##,
                "input_schema.$ref",
                "'/$defs/missing' does not exist",
            ),
            (
                r#"input_schema = { properties = { "odd key" = { type = 5 } } }"#,
                r#"input_schema.properties["odd key"].type"#,
                "5",
            ),
        ];
        for (line, field, fragment) in cases {
            let doc = edit("version = 1\n", &format!("version = 1\n{line}\n"));
            let file = dir.write("case.toml", &doc).display().to_string();
            let err = SagaDefinition::from_toml_str(&doc, &file)
                .expect_err(&format!("should be refused: {line}"));
            println!("{err}");
            assert_eq!(err.file, file);
            assert_eq!(err.field, field, "{line}: {err}");
            assert!(err.message.contains(fragment), "{line}: {err}");
            assert_one_line(&err);
            // The folder check reports it the same way.
            let errors = DefinitionSet::validate_dir(&dir.0).expect_err(line);
            assert_eq!(errors, [err], "{line}");
        }
        // Internal references are fine.
        let good = schema_error_free(
            r##"input_schema = { "$defs" = { sku = { type = "string" } }, properties = { s = { "$ref" = "#/$defs/sku" } } }"##,
        );
        let set = DefinitionSet::from_definitions(vec![good.clone()]).expect("valid");
        let err = set
            .check_input(&good, &json!({"s": 5}))
            .expect_err("not a string");
        assert_eq!((err.field.as_str(), err.rule.as_str()), ("input.s", "type"));
    }

    /// `BASE` with `line` added at the top level, which must be valid.
    fn schema_error_free(line: &str) -> SagaDefinition {
        let doc = edit("version = 1\n", &format!("version = 1\n{line}\n"));
        SagaDefinition::from_toml_str(&doc, "case.toml").expect(line)
    }

    #[test]
    fn mismatches_name_the_field_and_stay_short() {
        let set = schema_set(json!({
            "type": "object",
            "properties": {
                "name": {"maxLength": 3},
                "list": {"items": {"properties": {"odd key/~": {"type": "integer"}}}},
                "0": {"type": "string"},
            },
            "additionalProperties": {"type": "string"},
        }));
        let def = set.newest("demo").expect("demo");
        let huge = "x".repeat(100_000);
        let err = set
            .check_input(&def, &json!({"name": huge}))
            .expect_err("too long");
        println!("{err}");
        assert_eq!(
            (err.field.as_str(), err.rule.as_str()),
            ("input.name", "maxLength")
        );
        assert!(err.to_string().chars().count() < 200, "{err}");
        assert!(
            err.message.starts_with(&format!("\"{}…", "x".repeat(99))),
            "{err}"
        );

        let err = set
            .check_input(&def, &json!({"list": [{}, {"odd key/~": "1"}]}))
            .expect_err("not an integer");
        assert_eq!(err.field, r#"input.list[1]["odd key/~"]"#);
        // A key "0" of an object is a key, not an index.
        let err = set
            .check_input(&def, &json!({"0": 1}))
            .expect_err("not a string");
        assert_eq!(err.field, "input.0");

        let long_key = "k".repeat(5000);
        let mut input = serde_json::Map::new();
        input.insert(long_key, json!([huge]));
        let err = set
            .check_input(&def, &Value::Object(input))
            .expect_err("not a string");
        println!("{err}");
        assert_eq!(err.rule, "type");
        assert!(err.field.chars().count() <= 120, "{}", err.field);
        assert!(err.to_string().chars().count() < 400, "{err}");

        let closed = schema_set(json!({"additionalProperties": false, "properties": {"a": {}}}));
        let def = closed.newest("demo").expect("demo");
        let err = closed
            .check_input(&def, &json!({"a": 1, "b\nc": 2}))
            .expect_err("extra");
        println!("{err}");
        assert_eq!(
            (err.field.as_str(), err.rule.as_str()),
            (r#"input["b\nc"]"#, "additionalProperties")
        );
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[test]
    fn a_snapshot_is_judged_by_its_own_schema() {
        let set = schema_set(json!({"properties": {"n": {"minimum": 10}}}));
        let loaded = set.newest("demo").expect("demo");
        set.check_input(&loaded, &json!({"n": 10}))
            .expect("loaded schema");

        // Same name and version, another schema (the file was edited since the saga started).
        let mut edited = (*loaded).clone();
        edited.input_schema = Some(json!({"properties": {"n": {"minimum": 20}}}));
        let err = set
            .check_input(&edited, &json!({"n": 10}))
            .expect_err("its own schema");
        assert_eq!(
            (err.field.as_str(), err.rule.as_str()),
            ("input.n", "minimum")
        );
        // An equal copy of the loaded definition uses the loaded validator: same answer.
        set.check_input(&(*loaded).clone(), &json!({"n": 10}))
            .expect("copy");

        // A version no longer loaded.
        let mut gone = edited.clone();
        gone.version = 7;
        assert!(set.check_input(&gone, &json!({"n": 15})).is_err());
        set.check_input(&gone, &json!({"n": 25}))
            .expect("its own schema");
        gone.input_schema = None;
        set.check_input(&gone, &json!({"n": 0})).expect("no schema");

        // A snapshot whose schema no longer compiles refuses rather than lets through.
        let mut broken = (*loaded).clone();
        broken.input_schema = Some(json!({"type": "intger"}));
        let err = set
            .check_input(&broken, &json!({}))
            .expect_err("uncompilable");
        println!("{err}");
        assert_eq!(
            (err.field.as_str(), err.rule.as_str()),
            ("input", "input_schema")
        );
        assert!(err.message.contains("input_schema.type"), "{err}");
    }
}
