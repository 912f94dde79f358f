//! What an operator reaches for, against in-process sagad replicas on a database of their own
//! and scripted participants: WatchSaga across replicas (and what many watchers cost),
//! RetrySaga with and without skipped steps, stuck sagas, and GetSaga's basic view and history
//! pages.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use sagad_e2e::participant::{Script, default_answer};
use sagad_e2e::*;
use sagad_proto::v1::{
    GetSagaRequest, ListSagasRequest, RetrySagaRequest, Saga, SagaEvent, SagaStatus, SagaView,
    StepStatus, WatchSagaRequest,
};
use serde_json::{Value, json};
use sqlx::Connection as _;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(30);

/// Four steps, each of a participant of its own name; quick retries, unlimited for
/// `slow_retry`'s compensation.
const DEFINITION: &str = r#"
name = "ops"
version = 1
required_input = ["customer_id"]

[defaults]
timeout = "5s"
retry = { max_attempts = 0, initial_delay = "100ms", multiplier = 1.0, max_delay = "100ms", jitter = 0.0 }
compensation_retry = { max_attempts = 0, initial_delay = "100ms", multiplier = 1.0, max_delay = "100ms", jitter = 0.0 }

[[steps]]
name = "reserve"
participant = "stock"
action = "Reserve"
compensation = "Release"

[[steps]]
name = "charge"
participant = "payment"
action = "Charge"
compensation = "Refund"
compensation_retry = { max_attempts = 1 }

[[steps]]
name = "ship"
participant = "shipping"
action = "Ship"
compensation = "Unship"

[[steps]]
name = "notify"
participant = "mail"
action = "Notify"
"#;

fn input(customer: &str) -> Value {
    json!({ "customer_id": customer })
}

/// Participants sharing one script, and sagad replicas on one database.
struct Env {
    participants: Vec<FakeParticipant>,
    args: Vec<String>,
    replicas: Vec<TestDaemon>,
    client: Client,
    _defs: Scratch,
    db: DatabaseGuard,
}

impl Env {
    async fn start(label: &str, script: Script, extra: &[&str]) -> anyhow::Result<Env> {
        let db = DatabaseGuard::new(label);
        let defs = Scratch::defs(&[("ops.toml", DEFINITION)])?;
        let mut participants = Vec::new();
        for name in ["stock", "payment", "shipping", "mail"] {
            participants.push(FakeParticipant::start_scripted(name, script.clone()).await?);
        }
        let mut args = vec![
            "--database-url".to_owned(),
            db.url(),
            "--defs".to_owned(),
            defs.display().to_string(),
            "--lease-ttl".to_owned(),
            "2s".to_owned(),
            "--poll-interval".to_owned(),
            "250ms".to_owned(),
        ];
        args.extend(extra.iter().map(|flag| (*flag).to_owned()));
        for participant in &participants {
            args.extend(["--participant".to_owned(), participant.flag()]);
        }
        let first = TestDaemon::start(&args).await?;
        let client = first.client().await?;
        Ok(Env {
            participants,
            args,
            replicas: vec![first],
            client,
            _defs: defs,
            db,
        })
    }

    async fn add_replica(&mut self) -> anyhow::Result<Client> {
        let replica = TestDaemon::start(&self.args).await?;
        let client = replica.client().await?;
        self.replicas.push(replica);
        Ok(client)
    }

    fn calls(&self, saga_id: &str) -> Vec<CallRecord> {
        let mut calls: Vec<CallRecord> = self
            .participants
            .iter()
            .flat_map(|participant| participant.calls_for(saga_id))
            .collect();
        calls.sort_by_key(|call| call.received_at);
        calls
    }

    async fn retry(
        &mut self,
        saga_id: &str,
        reason: &str,
        skip: &[&str],
    ) -> Result<Saga, tonic::Status> {
        self.client
            .retry_saga(RetrySagaRequest {
                saga_id: saga_id.to_owned(),
                reason: reason.to_owned(),
                skip_steps: skip.iter().map(|step| (*step).to_owned()).collect(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn finish(mut self) -> anyhow::Result<()> {
        for replica in self.replicas.drain(..) {
            replica.stop().await?;
        }
        for participant in &mut self.participants {
            participant.stop();
        }
        self.db.drop_now().await
    }
}

/// Every event of a WatchSaga stream until it ends.
async fn watch_to_end(mut client: Client, saga_id: String) -> anyhow::Result<Vec<SagaEvent>> {
    let mut stream = client
        .watch_saga(WatchSagaRequest { saga_id })
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .context("the stream went quiet")??
    {
        events.push(event);
    }
    Ok(events)
}

/// The events of a stream are the saga's history: seqs 1, 2, 3… with no gap or repeat, the same
/// types, ending with the terminal one.
fn same_as_history(events: &[SagaEvent], saga: &Saga) -> anyhow::Result<()> {
    let seqs: Vec<u64> = events.iter().map(|event| event.seq).collect();
    let want: Vec<u64> = (1..=saga.version).collect();
    ensure!(seqs == want, "watched seqs {seqs:?}, want {want:?}");
    let types: Vec<&str> = events.iter().map(|event| event.r#type.as_str()).collect();
    let history: Vec<&str> = saga
        .history
        .iter()
        .map(|event| event.r#type.as_str())
        .collect();
    ensure!(types == history, "watched {types:?}, history {history:?}");
    ensure!(
        types.last().is_some_and(
            |last| ["saga_completed", "saga_compensated", "saga_failed"].contains(last)
        ),
        "the stream did not end with the terminal event: {types:?}"
    );
    Ok(())
}

/// Each step's Execute waits a little, so a saga takes long enough to be watched live.
fn slow_steps() -> Script {
    Arc::new(|call, _| default_answer(call).after(Duration::from_millis(150)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_on_one_replica_sees_every_event_another_appends() -> anyhow::Result<()> {
    let mut env = Env::start("watch_replicas", slow_steps(), &[]).await?;
    let mut driver = env.add_replica().await?;
    let saga_id = start_saga(&mut driver, "ops", input("c-watch")).await?;
    // Replica 0 serves the stream; replica 1 recorded the saga and drives it.
    let watched = tokio::spawn(watch_to_end(env.client.clone(), saga_id.clone()));
    let saga = wait_terminal(&mut env.client, &saga_id, DEADLINE).await?;
    let events = watched.await??;
    let saga = get_saga(&mut env.client, &saga.saga_id).await?;
    same_as_history(&events, &saga)?;
    ensure!(
        saga.status == SagaStatus::Completed as i32,
        "{:?}",
        saga.status
    );

    // Joining after the end: the history, then the end of the stream.
    let late = watch_to_end(env.client.clone(), saga_id.clone()).await?;
    same_as_history(&late, &saga)?;

    let unknown = env
        .client
        .watch_saga(WatchSagaRequest {
            saga_id: uuid::Uuid::now_v7().to_string(),
        })
        .await;
    ensure!(
        matches!(&unknown, Err(status) if status.code() == Code::NotFound),
        "an unknown saga: {unknown:?}"
    );
    println!(
        "a watcher on replica 0 saw {} events appended by replica 1",
        events.len()
    );
    env.finish().await
}

/// Transactions committed in the database so far, as Postgres counts them (each query outside
/// a transaction is one).
async fn commits(db: &DatabaseGuard) -> anyhow::Result<i64> {
    let mut conn = sqlx::postgres::PgConnection::connect(&db.url()).await?;
    // Backends report their counts when idle, at most once a second.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    Ok(sqlx::query_scalar(
        "select xact_commit from pg_stat_database where datname = current_database()",
    )
    .fetch_one(&mut conn)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_watchers_of_one_saga_cost_one_read_each_and_one_per_event()
-> anyhow::Result<()> {
    const WATCHERS: usize = 200;
    // The first step waits for the watchers to join; then the saga runs its course.
    let gate = Arc::new(AtomicBool::new(false));
    let open = gate.clone();
    let script: Script = Arc::new(move |call, _| {
        if call.step == "reserve" && !open.load(Ordering::SeqCst) {
            Answer::status(Code::Unavailable)
        } else {
            default_answer(call).after(Duration::from_millis(100))
        }
    });
    let mut env = Env::start("watch_many", script, &[]).await?;
    let saga_id = start_saga(&mut env.client, "ops", input("c-many")).await?;
    let before = commits(&env.db).await?;
    let mut watchers = tokio::task::JoinSet::new();
    for _ in 0..WATCHERS {
        watchers.spawn(watch_to_end(env.client.clone(), saga_id.clone()));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    gate.store(true, Ordering::SeqCst);
    let saga = wait_terminal(&mut env.client, &saga_id, DEADLINE).await?;
    let saga = get_saga(&mut env.client, &saga.saga_id).await?;
    while let Some(watched) = watchers.join_next().await {
        same_as_history(&watched??, &saga)?;
    }
    let spent = commits(&env.db).await? - before;
    let events = saga.version as i64;
    // Each watcher reads the history once when it joins; each event is read once for all.
    // Reading per watcher per event would cost WATCHERS × events.
    let naive = WATCHERS as i64 * events;
    println!(
        "{WATCHERS} watchers, {events} events: {spent} database transactions in all \
         (the saga's own work included); per watcher per event it would be {naive}"
    );
    ensure!(
        spent < WATCHERS as i64 + 40 * events,
        "{spent} transactions for {WATCHERS} watchers of {events} events"
    );
    env.finish().await
}

/// The payment participant refuses to refund until it is fixed.
fn refunds_refused_until(fixed: Arc<AtomicBool>) -> Script {
    Arc::new(move |call, _| {
        if call.kind == CallKind::Execute && call.step == "ship" {
            Answer::refuse("NO_SHIPPING")
        } else if call.kind == CallKind::Compensate
            && call.step == "charge"
            && !fixed.load(Ordering::SeqCst)
        {
            Answer::refuse("REFUND_BLOCKED")
        } else {
            default_answer(call)
        }
    })
}

fn event_data(saga: &Saga, event_type: &str) -> Vec<Value> {
    saga.history
        .iter()
        .filter(|event| event.r#type == event_type)
        .map(|event| to_json(&event.data))
        .collect()
}

#[tokio::test]
async fn a_failed_saga_is_retried_once_fixed_and_a_step_undone_by_hand_is_skipped()
-> anyhow::Result<()> {
    let fixed = Arc::new(AtomicBool::new(false));
    let mut env = Env::start("retry", refunds_refused_until(fixed.clone()), &[]).await?;

    // Retried once the refund service is fixed: the refund is called again, then the rest.
    let first = start_saga(&mut env.client, "ops", input("c-retry")).await?;
    let failed = wait_terminal(&mut env.client, &first, DEADLINE).await?;
    ensure!(
        failed.status == SagaStatus::Failed as i32,
        "{:?}: {}",
        failed.status,
        failed.failure_reason
    );
    let not_yet = env.retry(&first, "too early", &[]).await;
    ensure!(
        not_yet.is_ok(),
        "a retry of a FAILED saga is accepted even if it fails again: {not_yet:?}"
    );
    let failed_again = wait_until(&mut env.client, &first, DEADLINE, |saga| {
        saga.status == SagaStatus::Failed as i32 && saga.version > failed.version
    })
    .await?;
    fixed.store(true, Ordering::SeqCst);
    let retried = env.retry(&first, "refund service fixed", &[]).await?;
    ensure!(
        retried.status == SagaStatus::Compensating as i32,
        "{:?}",
        retried.status
    );
    // A watcher joining the retried saga follows it to its new end: the saga_failed events
    // of its history are behind it, not its end.
    let watched = tokio::spawn(watch_to_end(env.client.clone(), first.clone()));
    let done = wait_terminal(&mut env.client, &first, DEADLINE).await?;
    let done = get_saga(&mut env.client, &done.saga_id).await?;
    same_as_history(&watched.await??, &done)?;
    ensure!(
        done.status == SagaStatus::Compensated as i32,
        "{:?}: {}",
        done.status,
        done.failure_reason
    );
    let refunds: Vec<u32> = env
        .calls(&first)
        .iter()
        .filter(|call| call.kind == CallKind::Compensate && call.step == "charge")
        .map(|call| call.attempt)
        .collect();
    ensure!(refunds == [1, 2, 3], "refund attempts {refunds:?}");
    let requests = event_data(&done, "retry_requested");
    ensure!(requests.len() == 2, "{requests:?}");
    ensure!(
        requests[1]["reason"] == "refund service fixed"
            && requests[1]["requested_by"]
                .as_str()
                .is_some_and(|who| who.starts_with("client ")),
        "{requests:?}"
    );
    ensure!(failed_again.version < done.version);

    // A step refunded by hand is skipped: its refund is never called again.
    fixed.store(false, Ordering::SeqCst);
    let second = start_saga(&mut env.client, "ops", input("c-skip")).await?;
    wait_until(&mut env.client, &second, DEADLINE, |saga| {
        saga.status == SagaStatus::Failed as i32
    })
    .await?;
    let refunds_before = env
        .calls(&second)
        .iter()
        .filter(|call| call.kind == CallKind::Compensate && call.step == "charge")
        .count();
    env.retry(&second, "refunded by hand, ticket 42", &["charge"])
        .await?;
    let skipped = wait_terminal(&mut env.client, &second, DEADLINE).await?;
    let skipped = get_saga(&mut env.client, &skipped.saga_id).await?;
    ensure!(
        skipped.status == SagaStatus::Compensated as i32,
        "{:?}: {}",
        skipped.status,
        skipped.failure_reason
    );
    let calls = env.calls(&second);
    let refunds_after = calls
        .iter()
        .filter(|call| call.kind == CallKind::Compensate && call.step == "charge")
        .count();
    ensure!(
        refunds_after == refunds_before,
        "a skipped refund was called"
    );
    ensure!(
        calls
            .iter()
            .any(|call| call.kind == CallKind::Compensate && call.step == "reserve"),
        "the step before the skipped one was not compensated"
    );
    let skips = event_data(&skipped, "compensation_skipped");
    ensure!(
        skips.len() == 1
            && skips[0]["step"] == "charge"
            && skips[0]["reason"] == "refunded by hand, ticket 42",
        "{skips:?}"
    );
    let charge = skipped
        .steps
        .iter()
        .find(|step| step.name == "charge")
        .context("no step charge")?;
    ensure!(charge.status == StepStatus::Compensated as i32);

    // Refusals: not FAILED, a step to skip that does not exist or has nothing to undo.
    let answer = env.retry(&second, "again", &[]).await;
    ensure!(
        matches!(&answer, Err(status) if status.code() == Code::FailedPrecondition),
        "{answer:?}"
    );
    fixed.store(false, Ordering::SeqCst);
    let third = start_saga(&mut env.client, "ops", input("c-refusals")).await?;
    wait_until(&mut env.client, &third, DEADLINE, |saga| {
        saga.status == SagaStatus::Failed as i32
    })
    .await?;
    for (skip, field) in [("nope", "nope"), ("notify", "notify"), ("ship", "ship")] {
        let answer = env.retry(&third, "r", &[skip]).await;
        ensure!(
            matches!(&answer, Err(status) if status.code() == Code::InvalidArgument
                && status.message().contains(field)),
            "skip {skip}: {answer:?}"
        );
    }
    env.finish().await
}

#[tokio::test]
async fn a_step_failing_past_stuck_after_shows_its_saga_as_stuck_until_it_recovers()
-> anyhow::Result<()> {
    let healthy = Arc::new(AtomicBool::new(false));
    let up = healthy.clone();
    let script: Script = Arc::new(move |call, _| {
        if call.step == "charge"
            && call.input["input"]["customer_id"] == json!("c-stuck")
            && !up.load(Ordering::SeqCst)
        {
            Answer::status(Code::Unavailable)
        } else {
            default_answer(call)
        }
    });
    let mut env = Env::start("stuck", script, &["--stuck-after", "1s"]).await?;
    let other = start_saga(&mut env.client, "ops", input("c-fine")).await?;
    let saga_id = start_saga(&mut env.client, "ops", input("c-stuck")).await?;
    wait_terminal(&mut env.client, &other, DEADLINE).await?;
    let stuck_list = |client: Client| async move {
        let mut client = client;
        let listed = client
            .list_sagas(ListSagasRequest {
                stuck: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        anyhow::Ok(
            listed
                .sagas
                .into_iter()
                .map(|saga| saga.saga_id)
                .collect::<BTreeSet<_>>(),
        )
    };
    let started = Instant::now();
    loop {
        if stuck_list(env.client.clone()).await?.contains(&saga_id) {
            break;
        }
        if started.elapsed() > DEADLINE {
            bail!("the saga never showed as stuck");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shown_after = started.elapsed();
    let saga = get_saga(&mut env.client, &saga_id).await?;
    ensure!(saga.stuck, "Saga.stuck is false");
    let charge = saga
        .steps
        .iter()
        .find(|step| step.name == "charge")
        .context("no step charge")?;
    ensure!(
        charge.attempts >= 2 && charge.last_error.contains("Unavailable"),
        "{charge:?}"
    );
    ensure!(charge.next_attempt_at.is_some(), "no next attempt time");
    ensure!(
        !stuck_list(env.client.clone()).await?.contains(&other),
        "a saga that completed is listed as stuck"
    );

    healthy.store(true, Ordering::SeqCst);
    let done = wait_terminal(&mut env.client, &saga_id, DEADLINE).await?;
    ensure!(done.status == SagaStatus::Completed as i32);
    ensure!(!done.stuck, "a completed saga is stuck");
    ensure!(
        !stuck_list(env.client.clone()).await?.contains(&saga_id),
        "still listed as stuck after it recovered"
    );
    println!("listed as stuck {shown_after:?} after its start with --stuck-after 1s");
    env.finish().await
}

#[tokio::test]
async fn the_basic_view_leaves_the_history_out() -> anyhow::Result<()> {
    let mut env = Env::start("view", Arc::new(|call, _| default_answer(call)), &[]).await?;
    let saga_id = start_saga(&mut env.client, "ops", input("c-view")).await?;
    wait_terminal(&mut env.client, &saga_id, DEADLINE).await?;
    let read = |view: SagaView| {
        let mut client = env.client.clone();
        let saga_id = saga_id.clone();
        async move {
            client
                .get_saga(GetSagaRequest {
                    saga_id,
                    view: view.into(),
                    ..Default::default()
                })
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let basic = read(SagaView::Basic).await?;
    let full = read(SagaView::Full).await?;
    let unspecified = read(SagaView::Unspecified).await?;
    ensure!(basic.history.is_empty(), "{:?}", basic.history);
    ensure!(basic.version == full.version && basic.steps == full.steps);
    ensure!(full.history.len() as u64 == full.version);
    ensure!(unspecified.history == full.history);
    let bad = env
        .client
        .get_saga(GetSagaRequest {
            saga_id: saga_id.clone(),
            view: 42,
            ..Default::default()
        })
        .await;
    ensure!(
        matches!(&bad, Err(status) if status.code() == Code::InvalidArgument),
        "{bad:?}"
    );
    env.finish().await
}

/// Reads the whole history `page_size` events at a time, checking each page's size.
async fn history_by_pages(
    client: &mut Client,
    saga_id: &str,
    page_size: u32,
) -> anyhow::Result<Vec<SagaEvent>> {
    let mut events = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .get_saga(GetSagaRequest {
                saga_id: saga_id.to_owned(),
                history_page_size: page_size,
                history_page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(
            page.history.len() <= page_size as usize,
            "a page of {} events",
            page.history.len()
        );
        ensure!(
            page.next_history_page_token.is_empty() || page.history.len() == page_size as usize,
            "a short page ({} events) with a token after it",
            page.history.len()
        );
        events.extend(page.history);
        if page.next_history_page_token.is_empty() {
            return Ok(events);
        }
        token = page.next_history_page_token;
    }
}

#[tokio::test]
async fn the_history_is_read_page_by_page() -> anyhow::Result<()> {
    // The first step fails a few times before it gets through: a history of a dozen events.
    let script: Script = Arc::new(|call, _| {
        if call.step == "reserve" && call.kind == CallKind::Execute && call.attempt <= 8 {
            Answer::status(Code::Unavailable)
        } else {
            default_answer(call)
        }
    });
    let mut env = Env::start("history_pages", script, &[]).await?;
    let saga_id = start_saga(&mut env.client, "ops", input("c-pages")).await?;
    wait_terminal(&mut env.client, &saga_id, DEADLINE).await?;
    let whole = get_saga(&mut env.client, &saga_id).await?;
    ensure!(
        whole.next_history_page_token.is_empty(),
        "a token after the whole history: {:?}",
        whole.next_history_page_token
    );
    let want: Vec<u64> = (1..=whole.version).collect();
    let seqs: Vec<u64> = whole.history.iter().map(|event| event.seq).collect();
    ensure!(seqs == want, "the default page: {seqs:?}");
    ensure!(whole.version > 8, "only {} events", whole.version);

    for page_size in [1, 3, 5, whole.version as u32] {
        let events = history_by_pages(&mut env.client, &saga_id, page_size).await?;
        ensure!(
            events == whole.history,
            "by pages of {page_size}: {:?}",
            events.iter().map(|event| event.seq).collect::<Vec<_>>()
        );
    }

    // A token beyond the end reads an empty page, with no token after it.
    let past = env
        .client
        .get_saga(GetSagaRequest {
            saga_id: saga_id.clone(),
            history_page_token: format!("h{}", whole.version),
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(past.history.is_empty() && past.next_history_page_token.is_empty());

    let bad = |size: u32, token: &str| {
        let mut client = env.client.clone();
        let request = GetSagaRequest {
            saga_id: saga_id.clone(),
            history_page_size: size,
            history_page_token: token.to_owned(),
            ..Default::default()
        };
        async move { client.get_saga(request).await }
    };
    for (size, token, field) in [
        (10_001, "", "history_page_size"),
        (u32::MAX, "", "history_page_size"),
        (0, "nonsense", "history_page_token"),
        (0, "h-1", "history_page_token"),
        (0, "h", "history_page_token"),
        (5, "h99999999999999999999999", "history_page_token"),
    ] {
        let answer = bad(size, token).await;
        ensure!(
            matches!(&answer, Err(status) if status.code() == Code::InvalidArgument
                && status.message().contains(field)),
            "size {size}, token {token:?}: {answer:?}"
        );
    }
    ensure!(bad(10_000, "").await.is_ok(), "the largest page is refused");
    env.finish().await
}
