//! A seeded fuzzer of the client API: a few thousand random and malformed StartSaga, GetSaga,
//! ListSagas and CancelSaga requests (and bodies that are not protobuf at all), many with a
//! deadline of a few milliseconds, 16 at a time over one connection, against the real sagad
//! driving the real demo participants. No answer may be INTERNAL, UNKNOWN or UNAVAILABLE; a
//! request the contract refuses must be refused; and afterwards sagad still runs, every saga it
//! recorded ends and reads back, the listing pages through them all, and no cent is lost.
//!
//! A second run does the same against a sagad with tokens on and a start rate limit: each
//! request carries the operator's token, a reader's, an unknown one or none, and must be
//! refused exactly as the roles say (UNAUTHENTICATED, PERMISSION_DENIED) or, past the rate,
//! with RESOURCE_EXHAUSTED; the same checks follow.
//!
//! The seed is printed first: `SAGAD_FUZZ_SEED=<seed>` replays the same requests (their
//! interleaving, and which known saga an id-picking request gets, may differ).
//! `SAGAD_FUZZ_REQUESTS` sets how many requests are sent (default 3000, 1500 with tokens).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use pbjson_types::Struct;
use prost::Message;
use sagad_e2e::demo::{DEFAULT_BALANCE_CENTS, DemoOptions, DemoSystem};
use sagad_e2e::wire::{self, list, no_kind, number, object, string};
use sagad_e2e::{Client, repo_root, wait_recorded_sagas_end};
use sagad_proto::v1::saga_orchestrator_client::SagaOrchestratorClient;
use sagad_proto::v1::{CancelSagaRequest, GetSagaRequest, ListSagasRequest, StartSagaRequest};
use serde_json::{Value as Json, json};
use tokio::task::JoinSet;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const DEFAULT_REQUESTS: usize = 3000;
const DEFAULT_SECURED_REQUESTS: usize = 1500;
/// The tokens of the run with tokens on.
const OPERATOR_TOKEN: &str = "fuzz-operator-token";
const READER_TOKEN: &str = "fuzz-reader-token";
/// Starts per second the run with tokens on lets one token make: below the rate 16 requests in
/// flight send, so that many starts are turned away.
const START_RATE: &str = "40";
/// Requests in flight at once, all over one connection.
const IN_FLIGHT: usize = 16;
/// Customers the valid orders share, so their charges race for the same balances.
const CUSTOMERS: usize = 8;
/// The largest integer a double carries exactly; the contract accepts it and nothing beyond.
const MAX_SAFE: f64 = 9_007_199_254_740_992.0;
/// No saga ending for this long means what is left is stuck: the longest retry delay of the
/// demo definition is 5 s (plus jitter).
const QUIET: Duration = Duration::from_secs(30);
const ALL_ENDED_WITHIN: Duration = Duration::from_secs(150);
/// For the checks at the end: a page of sagas with inputs near 256 KiB each is large.
const BIG_REPLIES: usize = 512 * 1024 * 1024;
const CHECK_PAGE_SIZE: u32 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fuzzed_requests_never_break_sagad() -> anyhow::Result<()> {
    run("fuzz", None, DEFAULT_REQUESTS).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fuzzed_requests_with_tokens_and_limits_never_break_sagad() -> anyhow::Result<()> {
    let tokens = sagad_e2e::Scratch::with_files(
        "fuzz-tokens",
        &[(
            "tokens.toml",
            &(sagad_e2e::token_entry("fuzzer", "operator", OPERATOR_TOKEN)
                + &sagad_e2e::token_entry("peeker", "reader", READER_TOKEN)),
        )],
    )?;
    let args = vec![
        "--auth-tokens".to_owned(),
        tokens.join("tokens.toml").display().to_string(),
        "--start-rate".to_owned(),
        START_RATE.to_owned(),
    ];
    run("fuzz_secured", Some(args), DEFAULT_SECURED_REQUESTS).await
}

/// One fuzzing run; `secured`: the flags that turn tokens and limits on.
async fn run(
    label: &str,
    secured: Option<Vec<String>>,
    default_requests: usize,
) -> anyhow::Result<()> {
    let seed = match std::env::var("SAGAD_FUZZ_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("SAGAD_FUZZ_SEED={text:?} is not a u64"))?,
        Err(_) => fastrand::u64(..),
    };
    println!("fuzz seed {seed} (replay with SAGAD_FUZZ_SEED={seed})");
    let requests = match std::env::var("SAGAD_FUZZ_REQUESTS") {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("SAGAD_FUZZ_REQUESTS={text:?} is not a count"))?,
        Err(_) => default_requests,
    };
    let began = Instant::now();
    let options = DemoOptions {
        sagad_args: secured.clone().unwrap_or_default(),
        ..DemoOptions::default()
    };
    let mut system = DemoSystem::start(label, &repo_root().join("saga-defs"), options).await?;
    let outcome = fuzz(&mut system, seed, requests, secured.is_some()).await;
    let outcome = system.shut_down_after(outcome).await;
    println!("fuzz seed {seed}: {:?} in all", began.elapsed());
    outcome
}

async fn fuzz(
    system: &mut DemoSystem,
    seed: u64,
    requests: usize,
    secured: bool,
) -> anyhow::Result<()> {
    let channel = Endpoint::from_shared(system.server())?.connect().await?;
    let client = SagaOrchestratorClient::new(channel.clone());
    let mut generator = Generator::new(seed);
    let mut tally = Tally {
        secured,
        ..Tally::default()
    };
    let mut running = JoinSet::new();
    let sending = Instant::now();
    for _ in 0..requests {
        while running.len() >= IN_FLIGHT {
            if let Some(done) = running.join_next().await {
                tally.record(done??);
            }
        }
        let case = generator.case();
        let credential = if secured {
            generator.credential()
        } else {
            Credential::Operator
        };
        let (call, note) = tally.resolve(case.call);
        let sent = Sent {
            rpc: case.rpc,
            what: case.what + note.unwrap_or_default(),
            deadline: case.deadline,
            expect: case.expect,
            credential,
        };
        let (client, channel) = (client.clone(), channel.clone());
        let token = if secured { credential.token() } else { None };
        running.spawn(async move {
            let answer = send(client, channel, call, sent.deadline, token).await?;
            anyhow::Ok((sent, answer))
        });
    }
    while let Some(done) = running.join_next().await {
        tally.record(done??);
    }
    println!(
        "fuzz seed {seed}: {requests} requests answered in {:?}",
        sending.elapsed()
    );
    let mut table = String::new();
    for ((rpc, code), count) in &tally.counts {
        table.push_str(&format!("\n  {rpc:<16} {code:<24} {count}"));
    }
    println!("answers per (rpc, code):{table}");

    let mut problems = Vec::new();
    if let Some(first) = &tally.first_forbidden {
        problems.push(format!(
            "first answer sagad must never give ({} such answers in all): {first}",
            tally.forbidden
        ));
    }
    if let Some(first) = &tally.first_lost {
        problems.push(format!(
            "{} requests got no answer from sagad: their HTTP/2 stream or connection was torn \
             down, taking the other requests on it along (a reply whose headers are over the \
             client's limit, such as an error message echoing a huge field, does that); first: \
             {first}",
            tally.lost
        ));
    }
    let log = std::fs::read_to_string(&system.replica(0)?.log)?;
    let limits: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("reached limit"))
        .collect();
    if let Some(first) = limits.first() {
        problems.push(format!(
            "sagad's HTTP/2 server dropped the connection {} times for streams the client \
             reset (its deadlines passing): {first}",
            limits.len()
        ));
    }
    problems.extend(tally.problems.iter().take(20).cloned());
    if tally.problems.len() > 20 {
        problems.push(format!(
            "... and {} more problems with answers",
            tally.problems.len() - 20
        ));
    }
    if let Some(status) = system.replica_exited(0)? {
        problems.push(format!("sagad exited during the run: {status}"));
    }
    problems.extend(check_after(system, secured.then_some(OPERATOR_TOKEN)).await?);
    ensure!(
        problems.is_empty(),
        "fuzz seed {seed} (replay with SAGAD_FUZZ_SEED={seed}): {} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    Ok(())
}

/// Which method a request calls, as the counts show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rpc {
    StartSaga,
    GetSaga,
    ListSagas,
    CancelSaga,
    /// A body that is not (necessarily) a protobuf message, to the named method.
    Raw(&'static str),
}

impl std::fmt::Display for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rpc::Raw(method) => write!(f, "{method}(raw)"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// What the contract says of a request's answer, beyond never being a server error.
#[derive(Debug, Clone)]
enum Expect {
    /// Any answer but a server error.
    Anything,
    /// INVALID_ARGUMENT (or OUT_OF_RANGE for a message over the size limit); never accepted.
    Refused,
    /// A valid start with this idempotency key: every accepted start of a key answers with one
    /// saga, created once.
    Keyed(String),
}

/// A saga id to send: one a StartSaga answered with (chosen when the request goes out), or
/// this text.
#[derive(Debug, Clone)]
enum Id {
    Known(usize),
    Given(String),
}

#[derive(Debug)]
enum Call {
    Start(StartSagaRequest),
    Get(Id, GetSagaRequest),
    List(ListSagasRequest),
    Cancel(Id, CancelSagaRequest),
    Raw(&'static str, Vec<u8>),
}

struct Case {
    rpc: Rpc,
    what: String,
    call: Call,
    deadline: Option<Duration>,
    expect: Expect,
}

/// A request as it was sent, for judging its answer.
#[derive(Debug)]
struct Sent {
    rpc: Rpc,
    what: String,
    deadline: Option<Duration>,
    expect: Expect,
    credential: Credential,
}

/// The token a request carries when tokens are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credential {
    Operator,
    Reader,
    Unknown,
    Missing,
}

impl Credential {
    fn token(self) -> Option<&'static str> {
        match self {
            Credential::Operator => Some(OPERATOR_TOKEN),
            Credential::Reader => Some(READER_TOKEN),
            Credential::Unknown => Some("a-token-nobody-issued"),
            Credential::Missing => None,
        }
    }
}

/// sagad's answer, as much of it as the checks need.
#[derive(Debug)]
enum Answer {
    Started {
        saga_id: String,
        created: bool,
        sent_input: Option<Struct>,
        /// The input of the saga the answer names, as sagad holds it.
        stored_input: Option<Struct>,
    },
    Other,
}

async fn send(
    mut client: Client,
    channel: Channel,
    call: Call,
    deadline: Option<Duration>,
    token: Option<&'static str>,
) -> anyhow::Result<Result<Answer, tonic::Status>> {
    fn request<T>(
        message: T,
        deadline: Option<Duration>,
        token: Option<&str>,
    ) -> anyhow::Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        if let Some(deadline) = deadline {
            request.set_timeout(deadline);
        }
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
        }
        Ok(request)
    }
    Ok(match call {
        Call::Start(message) => {
            let sent_input = message.input.clone();
            client
                .start_saga(request(message, deadline, token)?)
                .await
                .map(|reply| {
                    let reply = reply.into_inner();
                    Answer::Started {
                        saga_id: reply.saga_id,
                        created: reply.created,
                        sent_input,
                        stored_input: reply.saga.and_then(|saga| saga.input),
                    }
                })
        }
        Call::Get(_, message) => client
            .get_saga(request(message, deadline, token)?)
            .await
            .map(|_| Answer::Other),
        Call::List(message) => client
            .list_sagas(request(message, deadline, token)?)
            .await
            .map(|_| Answer::Other),
        Call::Cancel(_, message) => client
            .cancel_saga(request(message, deadline, token)?)
            .await
            .map(|_| Answer::Other),
        Call::Raw(method, body) => wire::call_raw_as(channel, method, body, deadline, token)
            .await?
            .map(|_| Answer::Other),
    })
}

/// What the answers showed so far.
#[derive(Default)]
struct Tally {
    /// Tokens and limits are on.
    secured: bool,
    counts: BTreeMap<(String, String), usize>,
    /// Saga ids StartSaga answered with, in the order the answers came.
    known: Vec<String>,
    /// Per idempotency key: the saga its accepted starts answered with, and how many said
    /// `created`.
    keys: BTreeMap<String, (String, usize)>,
    first_forbidden: Option<String>,
    forbidden: usize,
    /// Requests that got no gRPC answer: their HTTP/2 stream or connection was torn down.
    first_lost: Option<String>,
    lost: usize,
    problems: Vec<String>,
}

impl Tally {
    /// Fills in the saga id of a request that picks a known saga; says so when none is known
    /// yet and a new id goes instead.
    fn resolve(&self, call: Call) -> (Call, Option<&'static str>) {
        let mut note = None;
        let mut pick = |id: &Id| match id {
            Id::Known(index) if !self.known.is_empty() => {
                self.known[index % self.known.len()].clone()
            }
            Id::Known(_) => {
                note = Some(" (none known yet: a new id)");
                uuid::Uuid::now_v7().to_string()
            }
            Id::Given(text) => text.clone(),
        };
        let call = match call {
            Call::Get(id, mut message) => {
                message.saga_id = pick(&id);
                Call::Get(id, message)
            }
            Call::Cancel(id, mut message) => {
                message.saga_id = pick(&id);
                Call::Cancel(id, message)
            }
            other => other,
        };
        (call, note)
    }

    fn record(&mut self, (sent, answer): (Sent, Result<Answer, tonic::Status>)) {
        let timed_out = |status: &tonic::Status| {
            sent.deadline.is_some()
                && matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled)
        };
        let code = match &answer {
            Ok(_) => "OK".to_owned(),
            Err(status) if !timed_out(status) && lost(status) => {
                format!("{:?}(lost)", status.code())
            }
            Err(status) => format!("{:?}", status.code()),
        };
        *self.counts.entry((sent.rpc.to_string(), code)).or_default() += 1;
        let described = || {
            format!(
                "{} ({}{})",
                sent.rpc,
                sent.what,
                sent.deadline
                    .map(|deadline| format!(", deadline {deadline:?}"))
                    .unwrap_or_default()
            )
        };
        // With tokens on, a request with no or an unknown token is refused before its message
        // is read; one whose token lacks the role is refused once it is read (a message that
        // is over the size limit, or cannot be decoded, is refused as such first).
        let needs_operator = matches!(
            sent.rpc,
            Rpc::StartSaga | Rpc::CancelSaga | Rpc::Raw("StartSaga" | "CancelSaga")
        );
        let refused_for_credential = match sent.credential {
            Credential::Missing | Credential::Unknown => Some(Code::Unauthenticated),
            Credential::Reader if needs_operator => Some(Code::PermissionDenied),
            _ => None,
        };
        if let Some(want) = refused_for_credential {
            let right = match &answer {
                Ok(_) => false,
                Err(status) => {
                    status.code() == want
                        || timed_out(status)
                        || (want == Code::PermissionDenied
                            && status.code() == Code::InvalidArgument
                            && status
                                .message()
                                .starts_with("the message is not valid protobuf"))
                        || (want == Code::PermissionDenied && status.code() == Code::OutOfRange)
                }
            };
            if !right {
                self.problems.push(format!(
                    "{} with credential {:?} answered {}, want {want:?}",
                    described(),
                    sent.credential,
                    match &answer {
                        Ok(_) => "OK".to_owned(),
                        Err(status) => short(status),
                    }
                ));
            }
            return;
        }
        match answer {
            Err(status) if !timed_out(&status) && lost(&status) => {
                self.lost += 1;
                if self.first_lost.is_none() {
                    self.first_lost = Some(format!("{} got {}", described(), short(&status)));
                }
            }
            Err(status) => {
                if matches!(
                    status.code(),
                    Code::Internal | Code::Unknown | Code::Unavailable
                ) {
                    self.forbidden += 1;
                    if self.first_forbidden.is_none() {
                        let first = format!("{} answered {}", described(), short(&status));
                        println!("first answer sagad must never give: {first}");
                        self.first_forbidden = Some(first);
                    }
                    return;
                }
                // Past the start rate, any start may be turned away before it is read.
                let rate_limited = self.secured
                    && matches!(sent.rpc, Rpc::StartSaga | Rpc::Raw("StartSaga"))
                    && status.code() == Code::ResourceExhausted;
                let refused = matches!(status.code(), Code::InvalidArgument | Code::OutOfRange)
                    || rate_limited;
                if matches!(sent.expect, Expect::Refused) && !refused && !timed_out(&status) {
                    self.problems.push(format!(
                        "{} answered {}, want INVALID_ARGUMENT",
                        described(),
                        short(&status)
                    ));
                }
            }
            Ok(answer) => {
                if matches!(sent.expect, Expect::Refused) {
                    self.problems.push(format!(
                        "{} was accepted, want INVALID_ARGUMENT",
                        described()
                    ));
                }
                let Answer::Started {
                    saga_id: started,
                    created,
                    sent_input,
                    stored_input,
                } = answer
                else {
                    return;
                };
                self.known.push(started.clone());
                let same_input = match (&sent_input, &stored_input) {
                    (Some(sent), Some(stored)) => wire::same_struct(sent, stored),
                    (None, Some(stored)) => stored.fields.is_empty(),
                    (_, None) => false,
                };
                if !same_input {
                    self.problems.push(format!(
                        "{} answered saga {started} (created {created}) whose input is not the \
                         one sent",
                        described()
                    ));
                }
                if let Expect::Keyed(key) = &sent.expect {
                    let (saga_id, times_created) = self
                        .keys
                        .entry(key.clone())
                        .or_insert_with(|| (started.clone(), 0));
                    if *saga_id != started {
                        self.problems.push(format!(
                            "{} answered saga {started}; the key already named saga {saga_id}",
                            described()
                        ));
                    }
                    *times_created += usize::from(created);
                    if *times_created > 1 {
                        self.problems.push(format!(
                            "{}: a second start of the key said created=true",
                            described()
                        ));
                    }
                }
            }
        }
    }
}

/// A status the client library made up because the HTTP/2 stream or connection was torn down
/// (an HTTP/2 error, a request cut off with its connection), not an answer sagad gave.
fn lost(status: &tonic::Status) -> bool {
    let message = status.message();
    message.starts_with("h2 protocol error")
        || message.starts_with("transport error")
        || message == "operation was canceled"
}

/// A status in a line: its code and the start of its message.
fn short(status: &tonic::Status) -> String {
    let message: String = status.message().chars().take(300).collect();
    format!("{:?}: {message:?}", status.code())
}

/// Makes the requests, from the seed alone.
struct Generator {
    rng: fastrand::Rng,
    customers: Vec<String>,
    /// Valid keyed starts so far: the key and the input it was first sent with.
    keyed: Vec<(String, Json)>,
    keys_made: usize,
}

impl Generator {
    fn new(seed: u64) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
            customers: (0..CUSTOMERS).map(|c| format!("customer-{c}")).collect(),
            keyed: Vec::new(),
            keys_made: 0,
        }
    }

    fn case(&mut self) -> Case {
        let mut case = match self.rng.u32(0..100) {
            0..45 => self.start(),
            45..63 => self.get(),
            63..81 => self.list(),
            81..94 => self.cancel(),
            _ => self.raw(),
        };
        if self.rng.bool() {
            case.deadline = Some(Duration::from_millis(self.rng.u64(1..=15)));
        }
        case
    }

    /// Mostly the operator's token, sometimes a reader's, an unknown one or none.
    fn credential(&mut self) -> Credential {
        match self.rng.u32(0..100) {
            0..80 => Credential::Operator,
            80..90 => Credential::Reader,
            90..95 => Credential::Unknown,
            _ => Credential::Missing,
        }
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.rng.usize(0..items.len())].clone()
    }

    fn new_key(&mut self) -> String {
        self.keys_made += 1;
        format!("key-{}", self.keys_made)
    }

    /// A string of `len` bytes: letters, digits and now and then a two-, three- or four-byte
    /// character.
    fn text(&mut self, len: usize) -> String {
        let mut text = String::with_capacity(len);
        while text.len() < len {
            let c = match self.rng.u32(0..40) {
                0 => 'é',
                1 => '中',
                2 => '🦀',
                _ => self.rng.alphanumeric(),
            };
            if text.len() + c.len_utf8() > len {
                text.push('x');
            } else {
                text.push(c);
            }
        }
        text
    }

    /// `text` with a NUL character somewhere in it.
    fn with_nul(&mut self, text: &str) -> String {
        let mut at = self.rng.usize(0..=text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        format!("{}\0{}", &text[..at], &text[at..])
    }

    /// An order the demo domain accepts; whether it completes depends on the balance left.
    fn order(&mut self) -> Json {
        let customers = self.customers.clone();
        let customer = self.pick(&customers);
        let amount = if self.rng.u32(0..10) == 0 {
            self.rng.i64(100_001..=150_000)
        } else {
            self.rng.i64(1..=5000)
        };
        let country = self.pick(&["SE", "DE", "FR", "AQ"]);
        let mut input = json!({
            "customer_id": customer,
            "amount_cents": amount,
            "country": country,
        });
        if self.rng.bool() {
            input["currency"] = json!(self.pick(&["EUR", "SEK", "USD"]));
        }
        if self.rng.bool() {
            let items: Vec<Json> = (0..self.rng.usize(0..=3))
                .map(|n| json!({"sku": format!("SKU-{n}"), "quantity": self.rng.u32(1..=5)}))
                .collect();
            input["items"] = json!(items);
        }
        if self.rng.u32(0..4) == 0 {
            let len = self.rng.usize(0..=40);
            input["note"] = json!(self.text(len));
        }
        input
    }

    fn start_request(&self, saga_type: &str, input: Option<Struct>) -> StartSagaRequest {
        StartSagaRequest {
            saga_type: saga_type.to_owned(),
            idempotency_key: String::new(),
            input,
            correlation_id: String::new(),
        }
    }

    fn start(&mut self) -> Case {
        let (request, what, expect) = match self.rng.u32(0..100) {
            0..25 => {
                let input = self.order();
                let mut request = self.start_request(ORDER, Some(wire::fields(&input)));
                if self.rng.u32(0..3) == 0 {
                    request.correlation_id = format!("corr-{}", self.rng.u32(..));
                }
                if self.rng.bool() {
                    (request, format!("order {input}"), Expect::Anything)
                } else {
                    let key = self.new_key();
                    request.idempotency_key = key.clone();
                    self.keyed.push((key.clone(), input.clone()));
                    (
                        request,
                        format!("order {input}, key {key}"),
                        Expect::Keyed(key),
                    )
                }
            }
            25..35 if !self.keyed.is_empty() => {
                let keyed = self.keyed.clone();
                let (key, mut input) = self.pick(&keyed);
                let what = if self.rng.bool() {
                    format!("the same order again, key {key}")
                } else {
                    input["amount_cents"] = json!(self.rng.i64(1..=5000));
                    input["country"] = json!(self.pick(&["SE", "DE", "FR", "AQ"]));
                    format!("key {key} again with {input}")
                };
                let mut request = self.start_request(ORDER, Some(wire::fields(&input)));
                request.idempotency_key = key.clone();
                (request, what, Expect::Keyed(key))
            }
            _ => self.bad_start(),
        };
        Case {
            rpc: Rpc::StartSaga,
            what,
            call: Call::Start(request),
            deadline: None,
            expect,
        }
    }

    /// A StartSaga with something odd about it; most of them the contract refuses.
    fn bad_start(&mut self) -> (StartSagaRequest, String, Expect) {
        let base = self.order();
        let mut request = self.start_request(ORDER, Some(wire::fields(&base)));
        let refused = Expect::Refused;
        match self.rng.u32(0..19) {
            0 => {
                let saga_type = self.pick(&[
                    "order",
                    "order_fulfillment_v2",
                    "ORDER_FULFILLMENT",
                    "order_fulfillment ",
                    " order_fulfillment",
                    "ordér_fulfillment",
                ]);
                request.saga_type = saga_type.to_owned();
                (request, format!("saga_type {saga_type:?}"), refused)
            }
            1 => {
                request.saga_type = String::new();
                (request, "empty saga_type".to_owned(), refused)
            }
            2 => {
                request.saga_type = self.with_nul(ORDER);
                (request, "NUL in saga_type".to_owned(), refused)
            }
            3 => {
                let key = self.new_key();
                request.idempotency_key = self.with_nul(&key);
                (request, "NUL in idempotency_key".to_owned(), refused)
            }
            4 => {
                request.correlation_id = self.with_nul("corr-id");
                (request, "NUL in correlation_id".to_owned(), refused)
            }
            5 => {
                let (input, what) = self.nul_in_input(&base);
                request.input = Some(input);
                (request, what, refused)
            }
            6 => {
                let len = self.rng.usize(1000..=300_000);
                request.saga_type = self.text(len);
                (request, format!("saga_type of {len} bytes"), refused)
            }
            7 => {
                // A long string inside the input: fine while the input stays under 256 KiB
                // as JSON, refused over it, OUT_OF_RANGE over the 4 MiB message limit.
                let len = match self.rng.u32(0..40) {
                    0 => self.rng.usize(4_300_000..=4_600_000),
                    1..20 => self.rng.usize(270_000..=1_000_000),
                    _ => self.rng.usize(1..=240_000),
                };
                let field = self.pick(&["customer_id", "note"]);
                let mut input = base.clone();
                input[field] = json!(self.text(len));
                request.input = Some(wire::fields(&input));
                let expect = if len > 256 * 1024 {
                    Expect::Refused
                } else {
                    Expect::Anything
                };
                (request, format!("input.{field} of {len} bytes"), expect)
            }
            8 => {
                let len = self.pick(&[255, 256, 257, 258, 300, 1000, 20_000, 90_000]);
                // Now and then the last character takes two bytes: the limit is in bytes.
                request.correlation_id = if self.rng.bool() {
                    format!("{}é", self.text(len - 2))
                } else {
                    "c".repeat(len)
                };
                let expect = if len <= 256 {
                    Expect::Anything
                } else {
                    Expect::Refused
                };
                (request, format!("correlation_id of {len} bytes"), expect)
            }
            9 => {
                let len = self.pick(&[511, 512, 513, 514, 1000, 10_000, 100_000]);
                let key = self.new_key();
                let key = format!("{key}-{}", "k".repeat(len - key.len() - 1));
                request.idempotency_key = key.clone();
                let expect = if len <= 512 {
                    self.keyed.push((key.clone(), base.clone()));
                    Expect::Keyed(key)
                } else {
                    Expect::Refused
                };
                (request, format!("idempotency_key of {len} bytes"), expect)
            }
            10 => {
                let big = self.pick(&[
                    MAX_SAFE + 2.0,
                    -(MAX_SAFE + 2.0),
                    9_223_372_036_854_775_807.0,
                    -9_223_372_036_854_775_808.0,
                    18_446_744_073_709_551_615.0,
                    1e20,
                    1e300,
                    f64::MAX,
                    -f64::MAX,
                ]);
                let field = self.pick(&["amount_cents", "loyalty_points"]);
                let mut input = wire::fields(&base);
                input.fields.insert(field.to_owned(), number(big));
                request.input = Some(input);
                (request, format!("input.{field} = {big:e}"), refused)
            }
            11 => {
                let edge = self.pick(&[MAX_SAFE, -MAX_SAFE, MAX_SAFE - 1.0, 0.5, -3.25]);
                let mut input = wire::fields(&base);
                input
                    .fields
                    .insert("loyalty_points".to_owned(), number(edge));
                request.input = Some(input);
                (
                    request,
                    format!("input.loyalty_points = {edge:e}"),
                    Expect::Anything,
                )
            }
            12 => {
                let odd = self.pick(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
                let (input, where_) = match self.rng.u32(0..3) {
                    0 => {
                        let mut input = wire::fields(&base);
                        input.fields.insert("amount_cents".to_owned(), number(odd));
                        (input, "input.amount_cents")
                    }
                    1 => {
                        let mut input = wire::fields(&base);
                        input.fields.insert("weight".to_owned(), number(odd));
                        (input, "input.weight")
                    }
                    _ => {
                        let mut input = wire::fields(&base);
                        let mut item = wire::fields(&json!({"sku": "SKU-1"}));
                        item.fields.insert("quantity".to_owned(), number(odd));
                        input
                            .fields
                            .insert("items".to_owned(), list(vec![object(item)]));
                        (input, "input.items[0].quantity")
                    }
                };
                request.input = Some(input);
                (request, format!("{where_} = {odd}"), refused)
            }
            13 => {
                let amount = self.pick(&[0.0, -1.0, -4999.0, 12.5, 0.001, 999.999]);
                let mut input = wire::fields(&base);
                input
                    .fields
                    .insert("amount_cents".to_owned(), number(amount));
                request.input = Some(input);
                (request, format!("input.amount_cents = {amount}"), refused)
            }
            14 => {
                let (input, what) = self.schema_violation(&base);
                request.input = Some(wire::fields(&input));
                (request, what, refused)
            }
            15 => {
                let depth = self.rng.usize(1..=300);
                let nested = self.nested(depth);
                let mut input = wire::fields(&base);
                input.fields.insert("meta".to_owned(), nested);
                request.input = Some(input);
                (
                    request,
                    format!("input.meta nested {depth} deep"),
                    Expect::Anything,
                )
            }
            // A value with no kind set reads as null (serde's Struct makes JSON null so): a
            // required field left so is missing, any other is fine.
            16 => {
                let mut input = wire::fields(&base);
                let (where_, expect) = match self.rng.u32(0..3) {
                    0 => {
                        input.fields.insert("amount_cents".to_owned(), no_kind());
                        ("input.amount_cents", refused)
                    }
                    1 => {
                        input.fields.insert("gift".to_owned(), no_kind());
                        ("input.gift", Expect::Anything)
                    }
                    _ => {
                        input
                            .fields
                            .insert("tags".to_owned(), list(vec![string("a"), no_kind()]));
                        ("input.tags[1]", Expect::Anything)
                    }
                };
                request.input = Some(input);
                (request, format!("{where_} with no kind set"), expect)
            }
            17 => {
                request.input = None;
                (request, "no input at all".to_owned(), refused)
            }
            _ => {
                let field = self.pick(&["customer_id", "amount_cents", "country"]);
                let mut input = base.clone();
                if self.rng.bool() {
                    input[field] = Json::Null;
                } else if let Some(fields) = input.as_object_mut() {
                    fields.remove(field);
                }
                request.input = Some(wire::fields(&input));
                (request, format!("input.{field} null or missing"), refused)
            }
        }
    }

    /// The order with a NUL in one of its strings or keys.
    fn nul_in_input(&mut self, base: &Json) -> (Struct, String) {
        let mut input = base.clone();
        let what = match self.rng.u32(0..5) {
            0 => {
                let customer = input["customer_id"].as_str().unwrap_or("c").to_owned();
                input["customer_id"] = json!(self.with_nul(&customer));
                "NUL in input.customer_id"
            }
            1 => {
                input["note"] = json!(self.with_nul("a note"));
                "NUL in input.note"
            }
            2 => {
                input["items"] = json!([{"sku": self.with_nul("SKU-1"), "quantity": 1}]);
                "NUL in input.items[0].sku"
            }
            3 => {
                let key = self.with_nul("note");
                if let Some(fields) = input.as_object_mut() {
                    fields.insert(key, json!("x"));
                }
                "NUL in a key of input"
            }
            _ => {
                let key = self.with_nul("deep");
                input["meta"] = json!({"a": [{"b": {key: 1}}]});
                "NUL in a key of input.meta.a[0].b"
            }
        };
        (wire::fields(&input), what.to_owned())
    }

    /// The order breaking one rule of the demo type's schema.
    fn schema_violation(&mut self, base: &Json) -> (Json, String) {
        let mut input = base.clone();
        let (field, value) = match self.rng.u32(0..12) {
            0 => ("customer_id", json!("")),
            1 => ("customer_id", json!(42)),
            2 => ("customer_id", json!(["customer-1"])),
            3 => ("amount_cents", json!("100")),
            4 => ("country", json!(self.pick(&["se", "SWE", "", "S1", "s"]))),
            5 => ("country", json!(46)),
            6 => ("currency", json!(self.pick(&["eu", "EURO", "€", ""]))),
            7 => ("items", json!({"sku": "SKU-1", "quantity": 1})),
            8 => ("items", json!([{"sku": "SKU-1", "quantity": 0}])),
            9 => ("items", json!([{"sku": "", "quantity": 1}])),
            10 => ("items", json!([{"sku": "SKU-1", "quantity": 1.5}])),
            _ => ("amount_cents", json!(true)),
        };
        input[field] = value.clone();
        (input, format!("input.{field} = {value}"))
    }

    /// A value nested `depth` deep, in lists and objects by turns.
    fn nested(&mut self, depth: usize) -> pbjson_types::Value {
        let mut value = number(1.0);
        for level in 0..depth {
            value = if self.rng.bool() {
                list(vec![value])
            } else {
                let mut fields = Struct::default();
                fields.fields.insert(format!("l{level}"), value);
                object(fields)
            };
        }
        value
    }

    /// A saga id: known, unknown, or not an id at all (then refused).
    fn saga_id(&mut self) -> (Id, String, bool) {
        let uuid = uuid::Uuid::now_v7().to_string();
        match self.rng.u32(0..100) {
            0..50 => (
                Id::Known(self.rng.usize(..)),
                "a known saga".to_owned(),
                false,
            ),
            50..65 => (Id::Given(uuid), "an unknown saga".to_owned(), false),
            65..70 => (
                Id::Given(uuid.to_uppercase()),
                "an unknown saga, upper case".to_owned(),
                false,
            ),
            _ => {
                let (id, what) = match self.rng.u32(0..6) {
                    0 => (String::new(), "empty saga_id".to_owned()),
                    1 => ("not-a-uuid".to_owned(), "saga_id \"not-a-uuid\"".to_owned()),
                    2 => (self.with_nul(&uuid), "NUL in saga_id".to_owned()),
                    3 => (format!("{uuid}x"), "saga_id with a tail".to_owned()),
                    4 => {
                        let len = self.rng.usize(100..=100_000);
                        (self.text(len), format!("saga_id of {len} bytes"))
                    }
                    _ => (
                        uuid.replace('-', "").replacen('0', "g", 1) + "0",
                        "saga_id not hex".to_owned(),
                    ),
                };
                (Id::Given(id), what, true)
            }
        }
    }

    fn get(&mut self) -> Case {
        let (id, mut what, malformed) = self.saga_id();
        let min_version = match self.rng.u32(0..10) {
            0..5 => 0,
            5..9 => self.rng.u64(1..=20),
            _ => u64::MAX,
        };
        let wait_ms = if self.rng.bool() {
            0
        } else {
            self.rng.u32(1..=300)
        };
        what.push_str(&format!(", min_version {min_version}, wait_ms {wait_ms}"));
        Case {
            rpc: Rpc::GetSaga,
            what,
            call: Call::Get(
                id,
                GetSagaRequest {
                    saga_id: String::new(),
                    min_version,
                    wait_ms,
                    ..Default::default()
                },
            ),
            deadline: None,
            expect: if malformed {
                Expect::Refused
            } else {
                Expect::Anything
            },
        }
    }

    fn list(&mut self) -> Case {
        let mut refused = false;
        let mut what = Vec::new();
        let saga_type = match self.rng.u32(0..20) {
            0..10 => String::new(),
            10..15 => ORDER.to_owned(),
            15..17 => {
                let len = self.rng.usize(1..=40);
                self.text(len)
            }
            17 => {
                let len = self.rng.usize(1000..=100_000);
                what.push(format!("saga_type of {len} bytes"));
                self.text(len)
            }
            _ => {
                refused = true;
                what.push("NUL in saga_type".to_owned());
                self.with_nul(ORDER)
            }
        };
        if !saga_type.is_empty() && what.is_empty() {
            what.push(format!("saga_type {saga_type:?}"));
        }
        let statuses: Vec<i32> = if self.rng.u32(0..5) < 3 {
            Vec::new()
        } else {
            (0..self.rng.usize(1..=4))
                .map(|_| {
                    if self.rng.u32(0..4) == 0 {
                        self.pick(&[0, 6, 99, -1, i32::MAX, i32::MIN])
                    } else {
                        self.rng.i32(1..=5)
                    }
                })
                .collect()
        };
        if statuses.iter().any(|status| !(1..=5).contains(status)) {
            refused = true;
        }
        if !statuses.is_empty() {
            what.push(format!("statuses {statuses:?}"));
        }
        let page_size = match self.rng.u32(0..20) {
            0..5 => 0,
            5..14 => self.rng.u32(1..=100),
            14..17 => self.rng.u32(101..=1000),
            _ => self.rng.u32(1001..=2000),
        };
        refused |= page_size > 1000;
        what.push(format!("page_size {page_size}"));
        let uuid = uuid::Uuid::now_v7().simple().to_string();
        let page_token = match self.rng.u32(0..20) {
            0..11 => String::new(),
            11..14 => {
                // A well-formed token at any time at all: before Postgres' first day, after
                // chrono's last, or now.
                let now = now_micros();
                let earlier = now - self.rng.i64(0..=86_400_000_000);
                let anything = self.rng.i64(..);
                let micros = self.pick(&[
                    now,
                    earlier,
                    0,
                    -1,
                    i64::MAX,
                    i64::MIN,
                    -250_000_000_000_000_000,
                    -200_000_000_000_000_000,
                    8_000_000_000_000_000_000,
                    anything,
                ]);
                format!("{micros}.{uuid}")
            }
            _ => {
                refused = true;
                match self.rng.u32(0..8) {
                    0 => "garbage".to_owned(),
                    1 => ".".to_owned(),
                    2 => format!(".{uuid}"),
                    3 => "123.not-a-uuid".to_owned(),
                    4 => format!("12x.{uuid}"),
                    5 => self.with_nul(&format!("123.{uuid}")),
                    6 => "99999999999999999999999.0".to_owned(),
                    _ => {
                        let len = self.rng.usize(1..=10_000);
                        self.text(len)
                    }
                }
            }
        };
        if !page_token.is_empty() {
            let shown: String = page_token.chars().take(60).collect();
            what.push(format!("page_token {shown:?}"));
        }
        Case {
            rpc: Rpc::ListSagas,
            what: what.join(", "),
            call: Call::List(ListSagasRequest {
                saga_type,
                statuses,
                page_size,
                page_token,
                ..Default::default()
            }),
            deadline: None,
            expect: if refused {
                Expect::Refused
            } else {
                Expect::Anything
            },
        }
    }

    fn cancel(&mut self) -> Case {
        let (id, mut what, mut refused) = self.saga_id();
        let reason = match self.rng.u32(0..20) {
            0..6 => String::new(),
            6..14 => format!("fuzz cancels {}", self.rng.u32(..)),
            14..16 => {
                refused = true;
                what.push_str(", NUL in reason");
                self.with_nul("fuzz cancels")
            }
            16 => {
                what.push_str(", reason of 1024 bytes");
                if self.rng.bool() {
                    "r".repeat(1024)
                } else {
                    "é".repeat(512)
                }
            }
            _ => {
                let len = self.pick(&[1025, 1026, 5000, 100_000]);
                refused = true;
                what.push_str(&format!(", reason of {len} bytes"));
                self.text(len)
            }
        };
        Case {
            rpc: Rpc::CancelSaga,
            what,
            call: Call::Cancel(
                id,
                CancelSagaRequest {
                    saga_id: String::new(),
                    reason,
                },
            ),
            deadline: None,
            expect: if refused {
                Expect::Refused
            } else {
                Expect::Anything
            },
        }
    }

    /// A body for one of the four methods that is not a valid message of its request type
    /// (or, for random bytes, most likely not).
    fn raw(&mut self) -> Case {
        let mut method = self.pick(&["StartSaga", "GetSaga", "ListSagas", "CancelSaga"]);
        let (body, what, expect) = match self.rng.u32(0..9) {
            0 => (
                vec![0x0a, 2, 0xff, 0xfe],
                "field 1 not UTF-8",
                Expect::Refused,
            ),
            1 => (
                vec![0x0a, 10, b'a', b'b'],
                "field 1 cut short",
                Expect::Refused,
            ),
            2 => (vec![0x08, 0x01], "field 1 as a varint", Expect::Refused),
            3 => (
                vec![
                    0x78, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                ],
                "an 11-byte varint",
                Expect::Refused,
            ),
            4 => (vec![0x00], "field number 0", Expect::Refused),
            5 => (
                vec![0x0a, 0xff, 0xff, 0xff, 0x0f, b'a'],
                "field 1 claiming 4 GiB",
                Expect::Refused,
            ),
            6 => {
                // StartSaga's input whose one key is not UTF-8.
                method = "StartSaga";
                let entry = [0x0a, 2, 0xff, 0xfe];
                let mut fields = vec![0x0a, entry.len() as u8];
                fields.extend(entry);
                let mut body = StartSagaRequest {
                    saga_type: ORDER.to_owned(),
                    ..Default::default()
                }
                .encode_to_vec();
                body.extend([0x1a, fields.len() as u8]);
                body.extend(fields);
                (body, "an input key not UTF-8", Expect::Refused)
            }
            7 => {
                method = "StartSaga";
                let depth = self.rng.usize(60..=400);
                let mut body = StartSagaRequest {
                    saga_type: ORDER.to_owned(),
                    ..Default::default()
                }
                .encode_to_vec();
                let mut nested = Struct::default();
                nested.fields.insert("meta".to_owned(), self.nested(depth));
                let input = nested.encode_to_vec();
                body.push(0x1a);
                prost::encoding::encode_varint(input.len() as u64, &mut body);
                body.extend(input);
                (body, "an input nested far too deep", Expect::Refused)
            }
            _ => {
                let len = self.rng.usize(1..=64);
                let body = (0..len).map(|_| self.rng.u8(..)).collect();
                (body, "random bytes", Expect::Anything)
            }
        };
        Case {
            rpc: Rpc::Raw(method),
            what: what.to_owned(),
            call: Call::Raw(method, body),
            deadline: None,
            expect,
        }
    }
}

const ORDER: &str = "order_fulfillment";

/// Now in microseconds since the epoch.
fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_micros() as i64)
        .unwrap_or_default()
}

/// After the requests: every saga recorded ends (COMPLETED or COMPENSATED) and reads back,
/// the listing pages through them all, and each customer's balance is the default minus what
/// its completed sagas charged.
async fn check_after(system: &DemoSystem, token: Option<&str>) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut db = system.orchestrator_db().await?;
    let waited = Instant::now();
    let all_ended = match wait_recorded_sagas_end(&mut db, QUIET, ALL_ENDED_WITHIN).await {
        Ok(_) => true,
        Err(error) => {
            problems.push(format!("{error:#}"));
            false
        }
    };
    let recorded = sagad_e2e::recorded_sagas(&mut db).await?;
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for saga in &recorded {
        *by_status.entry(saga.status.as_str()).or_default() += 1;
    }
    println!(
        "sagas recorded: {} {by_status:?} (waited {:?} for them to end)",
        recorded.len(),
        waited.elapsed()
    );
    let failed = by_status.get("FAILED").copied().unwrap_or(0);
    if failed > 0 {
        problems.push(format!("{failed} sagas ended FAILED"));
    }

    let channel = Endpoint::from_shared(system.server())?.connect().await?;
    let authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = token
        .map(|token| format!("Bearer {token}").parse())
        .transpose()?;
    let with_token = move |mut request: tonic::Request<()>| {
        if let Some(value) = &authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    };
    let mut client = SagaOrchestratorClient::with_interceptor(channel, with_token)
        .max_decoding_message_size(BIG_REPLIES)
        .max_encoding_message_size(BIG_REPLIES);
    let mut unreadable: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for saga in &recorded {
        let read = client
            .get_saga(GetSagaRequest {
                saga_id: saga.saga_id.clone(),
                min_version: 0,
                wait_ms: 0,
                ..Default::default()
            })
            .await;
        if let Err(status) = read {
            let entry = unreadable
                .entry(format!("{:?}", status.code()))
                .or_insert_with(|| (0, format!("{}: {}", saga.saga_id, short(&status))));
            entry.0 += 1;
        }
    }
    for (code, (count, example)) in unreadable {
        problems.push(format!(
            "GetSaga of {count} recorded sagas answered {code}, e.g. {example}"
        ));
    }

    let mut listed = BTreeSet::new();
    let mut token = String::new();
    let mut pages = 0;
    let mut listing_failed = false;
    let most_pages = recorded.len() / CHECK_PAGE_SIZE as usize + 2;
    loop {
        pages += 1;
        let page = client
            .list_sagas(ListSagasRequest {
                page_size: CHECK_PAGE_SIZE,
                page_token: token.clone(),
                ..Default::default()
            })
            .await;
        match page {
            Ok(page) => {
                let page = page.into_inner();
                listed.extend(page.sagas.into_iter().map(|saga| saga.saga_id));
                token = page.next_page_token;
                if token.is_empty() {
                    break;
                }
                if pages > most_pages {
                    listing_failed = true;
                    problems.push(format!(
                        "ListSagas still has a next page after {pages} pages of \
                         {CHECK_PAGE_SIZE} for {} sagas",
                        recorded.len()
                    ));
                    break;
                }
            }
            Err(status) => {
                listing_failed = true;
                problems.push(format!(
                    "ListSagas page {pages} (page_token {token:?}) answered {}",
                    short(&status)
                ));
                break;
            }
        }
    }
    let in_db: BTreeSet<String> = recorded.iter().map(|saga| saga.saga_id.clone()).collect();
    if !listing_failed && listed != in_db {
        problems.push(format!(
            "ListSagas paged through {} sagas, the database holds {} ({} missing)",
            listed.len(),
            in_db.len(),
            in_db.difference(&listed).count()
        ));
    }

    if all_ended {
        problems.extend(money_problems(system, &mut db).await?);
    } else {
        problems.push("money not checked: not every saga has ended".to_owned());
    }
    Ok(problems)
}

/// Each pool customer's balance is the default minus the amounts of its COMPLETED sagas, the
/// amount as the saga's stored input has it.
async fn money_problems(
    system: &DemoSystem,
    db: &mut sqlx::PgConnection,
) -> anyhow::Result<Vec<String>> {
    let completed: Vec<(String, sqlx::types::Json<Json>)> =
        sqlx::query_as("select saga_id::text, input from sagas where status = 'COMPLETED'")
            .fetch_all(&mut *db)
            .await?;
    let mut problems = Vec::new();
    let mut charged: BTreeMap<String, i64> = (0..CUSTOMERS)
        .map(|c| (format!("customer-{c}"), 0))
        .collect();
    for (saga_id, input) in &completed {
        let Some(customer) = input.0["customer_id"].as_str() else {
            problems.push(format!("{saga_id} COMPLETED without a customer_id string"));
            continue;
        };
        let amount = &input.0["amount_cents"];
        let Some(amount) = amount.as_i64().or_else(|| {
            amount
                .as_f64()
                .filter(|n| n.fract() == 0.0 && n.abs() <= MAX_SAFE)
                .map(|n| n as i64)
        }) else {
            problems.push(format!(
                "{saga_id} COMPLETED with amount_cents {amount}, not a whole number"
            ));
            continue;
        };
        if let Some(total) = charged.get_mut(customer) {
            *total += amount;
        }
    }
    let mut summary = Vec::new();
    for (customer, charged) in &charged {
        let balance = system.balance_cents(customer).await?;
        summary.push(format!("{customer} {balance}"));
        if balance != DEFAULT_BALANCE_CENTS - charged {
            problems.push(format!(
                "{customer}: balance {balance}, want {DEFAULT_BALANCE_CENTS} - {charged} \
                 charged by its completed sagas"
            ));
        }
    }
    println!(
        "balances ({} completed sagas): {}",
        completed.len(),
        summary.join(", ")
    );
    if completed.is_empty() {
        bail!("no saga completed: the run did not exercise the demo at all");
    }
    Ok(problems)
}
