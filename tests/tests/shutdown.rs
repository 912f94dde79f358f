//! SIGTERM to the real sagad binary with 200 GetSaga long-polls and 20 WatchSaga streams open:
//! it must end them at once (each answers OK with the saga as it stands, or UNAVAILABLE) and
//! exit with status 0 within `--shutdown-grace`, rather than wait out every long-poll's 60 s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use sagad_e2e::*;
use sagad_proto::v1::saga_orchestrator_client::SagaOrchestratorClient;
use sagad_proto::v1::{GetSagaRequest, SagaStatus, WatchSagaRequest};
use serde_json::json;
use tonic::transport::Endpoint;

/// sagad's `--shutdown-grace`: the exit and every answer must come within it.
const GRACE: Duration = Duration::from_secs(10);

/// How many long-polls are open at SIGTERM, and over how many connections.
const LONG_POLLS: usize = 200;
const CONNECTIONS: usize = 10;

/// How many sagas are recorded before.
const SAGAS: usize = 5;

/// WatchSaga streams open on a running saga at SIGTERM, and its customer.
const WATCHES: usize = 20;
const WATCHED_CUSTOMER: &str = "customer-watched";

/// The longest wait GetSaga honours: what a long-poll costs today at shutdown.
const WAIT_MS: u32 = 60_000;

/// Beyond this after SIGTERM the test stops waiting for the exit (and kills sagad), well past
/// today's 60 s, so the figure it prints shows how long the exit takes.
const GIVE_UP: Duration = Duration::from_secs(75);

/// Time for the long-polls sent to reach the server before SIGTERM; it only delays the test.
const SETTLE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_hundreds_of_long_polls_and_exits_within_the_grace() -> anyhow::Result<()> {
    let mut db = DatabaseGuard::new("shutdown");
    let mut logs = Scratch::logs("shutdown")?;
    let mut participants = Vec::new();
    // The watched saga's first call takes a while, so it is running at SIGTERM.
    let script: participant::Script = Arc::new(|call, _| {
        let answer = participant::default_answer(call);
        if call.input["input"]["customer_id"] == json!(WATCHED_CUSTOMER) {
            answer.after(Duration::from_secs(4))
        } else {
            answer
        }
    });
    for name in ["order", "payment", "shipping"] {
        participants.push(FakeParticipant::start_scripted(name, script.clone()).await?);
    }
    let mut args = vec![
        "--database-url".to_owned(),
        db.url(),
        "--defs".to_owned(),
        repo_root().join("saga-defs").display().to_string(),
        "--shutdown-grace".to_owned(),
        "10s".to_owned(),
    ];
    for participant in &participants {
        args.extend(["--participant".to_owned(), participant.flag()]);
    }
    let mut sagad = SagadProcess::start(&args, &logs).await?;
    let outcome = long_polls_at_sigterm(&mut sagad).await;
    if outcome.is_err() {
        logs.keep();
        println!("sagad's log: {}", sagad.log.display());
    }
    if sagad.exited()?.is_none() {
        sagad.kill().await?;
    }
    outcome?;
    db.drop_now().await
}

/// One long-poll's end: the code it answered (`OK` or a gRPC code) or `None` for no answer,
/// and when it came.
struct Answered {
    code: Option<tonic::Code>,
    saga_ok: bool,
    at: Instant,
}

async fn long_polls_at_sigterm(sagad: &mut SagadProcess) -> anyhow::Result<()> {
    let mut client = sagad.client().await?;
    let mut sagas = Vec::new();
    for n in 0..SAGAS {
        let input = json!({
            "customer_id": format!("customer-shutdown-{n}"),
            "amount_cents": 1_000 + n,
            "currency": "EUR",
            "country": "SE",
            "items": [{"sku": "BOOK-42", "quantity": 1}],
        });
        let saga_id = start_saga(&mut client, "order_fulfillment", input).await?;
        let saga = wait_terminal(&mut client, &saga_id, Duration::from_secs(60)).await?;
        ensure!(
            saga.status == SagaStatus::Completed as i32,
            "saga {saga_id} did not complete: {:?}",
            SagaStatus::try_from(saga.status)
        );
        sagas.push(saga);
    }

    let watched_id = start_saga(
        &mut client,
        "order_fulfillment",
        json!({
            "customer_id": WATCHED_CUSTOMER,
            "amount_cents": 500,
            "country": "SE",
        }),
    )
    .await?;
    let mut watches = tokio::task::JoinSet::new();
    for _ in 0..WATCHES {
        let mut client = client.clone();
        let saga_id = watched_id.clone();
        watches.spawn(async move {
            let mut stream = client
                .watch_saga(WatchSagaRequest { saga_id })
                .await?
                .into_inner();
            let ended = loop {
                match tokio::time::timeout(GIVE_UP + SETTLE, stream.message()).await {
                    Err(_) => break None,
                    Ok(Ok(Some(_))) => {}
                    Ok(Ok(None)) => break Some(tonic::Code::Ok),
                    Ok(Err(status)) => break Some(status.code()),
                }
            };
            anyhow::Ok((ended, Instant::now()))
        });
    }

    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(
            Endpoint::from_shared(format!("http://{}", sagad.addr))?
                .connect()
                .await?,
        );
    }
    let sent = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut polls = tokio::task::JoinSet::new();
    for n in 0..LONG_POLLS {
        let saga = sagas[n % sagas.len()].clone();
        let mut client = SagaOrchestratorClient::new(channels[n % CONNECTIONS].clone());
        let (sent, answered) = (sent.clone(), answered.clone());
        polls.spawn(async move {
            let request = GetSagaRequest {
                saga_id: saga.saga_id.clone(),
                min_version: saga.version + 1_000,
                wait_ms: WAIT_MS,
                ..Default::default()
            };
            sent.fetch_add(1, Ordering::SeqCst);
            let reply = tokio::time::timeout(GIVE_UP + SETTLE, client.get_saga(request)).await;
            answered.fetch_add(1, Ordering::SeqCst);
            let at = Instant::now();
            match reply {
                Err(_) => Answered {
                    code: None,
                    saga_ok: false,
                    at,
                },
                Ok(Ok(reply)) => {
                    let reply = reply.into_inner();
                    Answered {
                        code: Some(tonic::Code::Ok),
                        saga_ok: reply.saga_id == saga.saga_id && reply.version >= saga.version,
                        at,
                    }
                }
                Ok(Err(status)) => Answered {
                    code: Some(status.code()),
                    saga_ok: false,
                    at,
                },
            }
        });
    }
    let until = Instant::now() + Duration::from_secs(30);
    while sent.load(Ordering::SeqCst) < LONG_POLLS {
        ensure!(
            Instant::now() < until,
            "only {} of {LONG_POLLS} long-polls were sent within 30 s",
            sent.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(SETTLE).await;
    let early = answered.load(Ordering::SeqCst);
    ensure!(
        early == 0,
        "{early} long-polls answered before SIGTERM: they were not waiting"
    );

    let terminated = Instant::now();
    let (exit, answers, watched) = tokio::join!(
        tokio::time::timeout(GIVE_UP, sagad.terminate()),
        async {
            let mut answers = Vec::new();
            while let Some(answer) = polls.join_next().await {
                answers.push(answer);
            }
            answers
        },
        async {
            let mut ends = Vec::new();
            while let Some(end) = watches.join_next().await {
                ends.push(end);
            }
            ends
        }
    );
    let exit_after = terminated.elapsed();
    let status = match exit {
        Ok(status) => Some(status.context("SIGTERM")?),
        Err(_) => None,
    };

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut last_answer = Duration::ZERO;
    let mut wrong_saga = 0;
    for answer in answers {
        let answer = answer?;
        let label = match answer.code {
            Some(code) => format!("{code:?}"),
            None => "no answer".to_owned(),
        };
        *counts.entry(label).or_default() += 1;
        if answer.code == Some(tonic::Code::Ok) && !answer.saga_ok {
            wrong_saga += 1;
        }
        last_answer = last_answer.max(answer.at.saturating_duration_since(terminated));
    }
    match status {
        Some(status) => println!("sagad exited with {status} {exit_after:?} after SIGTERM"),
        None => println!("sagad had not exited {exit_after:?} after SIGTERM"),
    }
    println!("long-poll answers: {counts:?}; the last came {last_answer:?} after SIGTERM");

    let status = status.with_context(|| format!("sagad did not exit within {GIVE_UP:?}"))?;
    ensure!(status.success(), "sagad exited with {status}, want 0");
    ensure!(
        exit_after <= GRACE,
        "sagad exited {exit_after:?} after SIGTERM, want within the grace ({GRACE:?})"
    );
    let wrong: usize = counts
        .iter()
        .filter(|(code, _)| !matches!(code.as_str(), "Ok" | "Unavailable"))
        .map(|(_, count)| count)
        .sum();
    ensure!(
        wrong == 0,
        "{wrong} long-polls answered something else than OK or UNAVAILABLE: {counts:?}"
    );
    ensure!(
        wrong_saga == 0,
        "{wrong_saga} long-polls answered OK with another saga or an older version"
    );
    ensure!(
        last_answer <= GRACE,
        "the last long-poll answered {last_answer:?} after SIGTERM, want within {GRACE:?}"
    );

    // Every watch stream ended, with UNAVAILABLE (or, had the saga ended first, its end).
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    let mut last_end = Duration::ZERO;
    for end in watched {
        let (code, at) = end??;
        let label = code.map_or("no end".to_owned(), |code| format!("{code:?}"));
        *ends.entry(label).or_default() += 1;
        last_end = last_end.max(at.saturating_duration_since(terminated));
    }
    println!("watch streams: {ends:?}; the last ended {last_end:?} after SIGTERM");
    ensure!(
        ends.keys()
            .all(|code| code == "Unavailable" || code == "Ok"),
        "watch streams ended otherwise: {ends:?}"
    );
    ensure!(
        last_end <= GRACE,
        "the last watch stream ended {last_end:?} after SIGTERM, want within {GRACE:?}"
    );
    Ok(())
}
