//! The SDK's guarantees against a real Postgres, each test on a fresh database dropped at the end.

use std::time::Duration;

use pbjson_types::Struct;
use sagad_participant::testing::TestDatabase;
use sagad_participant::{
    COMPENSATED, Faults, LEDGER_TABLE, ParticipantService, StepCommandView, StepError, StepHandler,
};
use sagad_proto::participant::v1::participant_server::Participant;
use sagad_proto::participant::v1::{StepCommand, StepReply, step_reply};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use tonic::Request;

/// Records every effect as a row; `input.refuse` / `input.fail` write first, then refuse / fail,
/// so the tests see whether the write was rolled back; `input.swallow` ignores a failed
/// statement and answers success.
struct Recorder;

#[tonic::async_trait]
impl StepHandler for Recorder {
    async fn execute(
        &self,
        command: &StepCommandView,
        conn: &mut PgConnection,
    ) -> Result<Value, StepError> {
        sqlx::query("insert into effects (saga_id, kind) values ($1, 'execute')")
            .bind(&command.saga_id)
            .execute(&mut *conn)
            .await?;
        // Widen the window for concurrent duplicates.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if command.input().get("refuse").is_some() {
            return Err(StepError::refused("NOPE", "refused on purpose"));
        }
        if command.input().get("fail").is_some() {
            return Err(StepError::internal("failed on purpose"));
        }
        if command.input().get("swallow").is_some() {
            // A handler that ignores its statement's error: the transaction is aborted.
            let _ = sqlx::query("select 1 / 0").execute(&mut *conn).await;
        }
        Ok(json!({ "done": command.saga_id }))
    }

    async fn compensate(
        &self,
        command: &StepCommandView,
        conn: &mut PgConnection,
    ) -> Result<Value, StepError> {
        assert_eq!(
            command.executed_output,
            Some(json!({ "done": command.saga_id }))
        );
        sqlx::query("insert into effects (saga_id, kind) values ($1, 'compensate')")
            .bind(&command.saga_id)
            .execute(&mut *conn)
            .await?;
        Ok(Value::Null)
    }
}

async fn setup(db: &TestDatabase) -> (PgPool, ParticipantService<Recorder>) {
    let pool = sagad_participant::connect(
        &db.url(),
        &sqlx::migrate::Migrator::DEFAULT,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    sqlx::query("create table effects (saga_id text not null, kind text not null)")
        .execute(&pool)
        .await
        .unwrap();
    let service = ParticipantService::new(pool.clone(), Recorder, Faults::default());
    (pool, service)
}

fn command(saga_id: &str, compensate: bool, input: Value) -> StepCommand {
    let input: Struct = serde_json::from_value(json!({ "input": input, "steps": {} })).unwrap();
    let suffix = if compensate { "compensate" } else { "execute" };
    StepCommand {
        saga_id: saga_id.to_owned(),
        saga_type: "test".to_owned(),
        step: "only".to_owned(),
        action: if compensate { "Undo" } else { "Do" }.to_owned(),
        idempotency_key: format!("{saga_id}/only/{suffix}"),
        attempt: 1,
        input: Some(input),
        correlation_id: "corr".to_owned(),
    }
}

async fn execute(
    service: &ParticipantService<Recorder>,
    command: StepCommand,
) -> Result<StepReply, tonic::Status> {
    service
        .execute(Request::new(command))
        .await
        .map(|r| r.into_inner())
}

async fn compensate(
    service: &ParticipantService<Recorder>,
    command: StepCommand,
) -> Result<StepReply, tonic::Status> {
    service
        .compensate(Request::new(command))
        .await
        .map(|r| r.into_inner())
}

async fn effects(pool: &PgPool, kind: &str) -> i64 {
    sqlx::query_scalar("select count(*) from effects where kind = $1")
        .bind(kind)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn keys(pool: &PgPool) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {LEDGER_TABLE}"
    )))
    .fetch_one(pool)
    .await
    .unwrap()
}

fn failure_code(reply: &StepReply) -> Option<&str> {
    match &reply.result {
        Some(step_reply::Result::Failure(failure)) => Some(&failure.code),
        _ => None,
    }
}

fn is_success(reply: &StepReply) -> bool {
    matches!(reply.result, Some(step_reply::Result::Success(_)))
}

#[tokio::test]
async fn a_repeated_key_gets_the_first_reply_and_changes_nothing() {
    let db = TestDatabase::new("sdk");
    let (pool, service) = setup(&db).await;
    let first = execute(&service, command("s1", false, json!({})))
        .await
        .unwrap();
    let mut again = command("s1", false, json!({}));
    again.attempt = 2;
    let second = execute(&service, again).await.unwrap();
    assert!(is_success(&first));
    assert_eq!(first, second);
    assert_eq!(effects(&pool, "execute").await, 1);

    let undo = compensate(&service, command("s1", true, json!({})))
        .await
        .unwrap();
    let undo_again = compensate(&service, command("s1", true, json!({})))
        .await
        .unwrap();
    assert!(is_success(&undo));
    assert_eq!(undo, undo_again);
    assert_eq!(effects(&pool, "compensate").await, 1);
    pool.close().await;
}

#[tokio::test]
async fn keys_holding_quotes_backslashes_and_dollar_quotes_are_found_again() {
    let db = TestDatabase::new("sdk");
    let (pool, service) = setup(&db).await;
    let odd = r#"s'1"\$k0$$$ ñ 😀"#;
    let first = execute(&service, command(odd, false, json!({})))
        .await
        .unwrap();
    let again = execute(&service, command(odd, false, json!({})))
        .await
        .unwrap();
    assert!(is_success(&first));
    assert_eq!(first, again);
    assert_eq!(effects(&pool, "execute").await, 1);
    let undone = compensate(&service, command(odd, true, json!({})))
        .await
        .unwrap();
    assert!(is_success(&undone));
    assert_eq!(effects(&pool, "compensate").await, 1);
    pool.close().await;
}

#[tokio::test]
async fn twenty_concurrent_duplicates_take_effect_once() {
    let db = TestDatabase::new("sdk");
    let (pool, service) = setup(&db).await;
    let calls = (0..20).map(|_| {
        let service = service.clone();
        tokio::spawn(async move { execute(&service, command("s2", false, json!({}))).await })
    });
    let replies: Vec<StepReply> = futures_join(calls).await;
    assert!(replies.iter().all(|reply| reply == &replies[0]));
    assert!(is_success(&replies[0]));
    assert_eq!(effects(&pool, "execute").await, 1);
    assert_eq!(keys(&pool).await, 1);
    pool.close().await;
}

async fn futures_join(
    handles: impl Iterator<Item = tokio::task::JoinHandle<Result<StepReply, tonic::Status>>>,
) -> Vec<StepReply> {
    let mut replies = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        replies.push(handle.await.unwrap().unwrap());
    }
    replies
}

#[tokio::test]
async fn a_null_compensation_succeeds_and_leaves_a_tombstone() {
    let db = TestDatabase::new("sdk");
    let (pool, service) = setup(&db).await;
    let undo = compensate(&service, command("s3", true, json!({})))
        .await
        .unwrap();
    assert!(is_success(&undo));
    assert_eq!(effects(&pool, "compensate").await, 0);
    let kind: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select kind from {LEDGER_TABLE} where idempotency_key = 's3/only/execute'"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(kind, "tombstone");
    pool.close().await;
}

#[tokio::test]
async fn a_late_execute_after_its_compensation_is_refused_and_changes_nothing() {
    let db = TestDatabase::new("sdk");
    let (pool, service) = setup(&db).await;
    compensate(&service, command("s4", true, json!({})))
        .await
        .unwrap();
    let late = execute(&service, command("s4", false, json!({})))
        .await
        .unwrap();
    assert_eq!(failure_code(&late), Some(COMPENSATED));
    assert_eq!(effects(&pool, "execute").await, 0);
    // And it stays refused.
    let later = execute(&service, command("s4", false, json!({})))
        .await
        .unwrap();
    assert_eq!(late, later);
    assert_eq!(effects(&pool, "execute").await, 0);
    pool.close().await;
}

#[tokio::test]
async fn a_handler_error_rolls_back_the_effect_and_the_key() {
    let db = TestDatabase::new("sdk");
    let (pool, service) = setup(&db).await;
    let status = execute(&service, command("s5", false, json!({ "fail": true })))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal);
    assert_eq!(effects(&pool, "execute").await, 0);
    assert_eq!(keys(&pool).await, 0);
    // The next attempt with the same key runs again.
    let retried = execute(&service, command("s5", false, json!({})))
        .await
        .unwrap();
    assert!(is_success(&retried));
    assert_eq!(effects(&pool, "execute").await, 1);
    pool.close().await;
}

#[tokio::test]
async fn a_handler_that_ignores_its_failed_statement_is_rolled_back_alone() {
    let db = TestDatabase::new("sdk");
    let (pool, service) = setup(&db).await;
    // Alone in its transaction, the aborted state shows at the insert of the keys (in a batch
    // of many, at the next command's savepoint: see the test of commands arriving together).
    let status = execute(&service, command("s9", false, json!({ "swallow": true })))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(
        status.message().contains("ignored a failed statement"),
        "{status:?}"
    );
    assert_eq!(effects(&pool, "execute").await, 0);
    assert_eq!(keys(&pool).await, 0);
    // The same key runs again once the handler behaves.
    let retried = execute(&service, command("s9", false, json!({})))
        .await
        .unwrap();
    assert!(is_success(&retried));
    assert_eq!(effects(&pool, "execute").await, 1);
    assert_eq!(keys(&pool).await, 1);
    pool.close().await;
}

#[tokio::test]
async fn a_refusal_is_recorded_and_replayed_for_the_same_key() {
    let db = TestDatabase::new("sdk");
    let (pool, service) = setup(&db).await;
    let refused = execute(&service, command("s6", false, json!({ "refuse": true })))
        .await
        .unwrap();
    assert_eq!(failure_code(&refused), Some("NOPE"));
    // The handler's write before the refusal is rolled back; the key is kept.
    assert_eq!(effects(&pool, "execute").await, 0);
    assert_eq!(keys(&pool).await, 1);
    // The same key without the refusing input still gets the refusal.
    let replayed = execute(&service, command("s6", false, json!({})))
        .await
        .unwrap();
    assert_eq!(refused, replayed);
    assert_eq!(effects(&pool, "execute").await, 0);
    // Compensating a refused step changes nothing.
    let undo = compensate(&service, command("s6", true, json!({})))
        .await
        .unwrap();
    assert!(is_success(&undo));
    assert_eq!(effects(&pool, "compensate").await, 0);
    pool.close().await;
}

#[tokio::test]
async fn injected_faults_answer_unavailable_before_anything() {
    let db = TestDatabase::new("sdk");
    let (pool, _) = setup(&db).await;
    let service = ParticipantService::new(
        pool.clone(),
        Recorder,
        Faults {
            transient_failure_rate: 1.0,
            latency: Duration::from_millis(1),
        },
    );
    let status = execute(&service, command("s7", false, json!({})))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(effects(&pool, "execute").await, 0);
    assert_eq!(keys(&pool).await, 0);
    pool.close().await;
}

#[tokio::test]
async fn an_execute_racing_its_compensation_ends_undone_either_way() {
    let db = TestDatabase::new("sdk");
    let (pool, service) = setup(&db).await;
    for round in 0..10 {
        let saga = format!("race{round}");
        let (forward, backward) = tokio::join!(
            execute(&service, command(&saga, false, json!({}))),
            compensate(&service, command(&saga, true, json!({}))),
        );
        let forward = forward.unwrap();
        assert!(is_success(&backward.unwrap()));
        let done: i64 = sqlx::query_scalar(
            "select count(*) from effects where saga_id = $1 and kind = 'execute'",
        )
        .bind(&saga)
        .fetch_one(&pool)
        .await
        .unwrap();
        let undone: i64 = sqlx::query_scalar(
            "select count(*) from effects where saga_id = $1 and kind = 'compensate'",
        )
        .bind(&saga)
        .fetch_one(&pool)
        .await
        .unwrap();
        // Either the execute ran and was compensated, or the compensation came first and the
        // execute was refused: never an effect left standing.
        if is_success(&forward) {
            assert_eq!((done, undone), (1, 1));
        } else {
            assert_eq!(failure_code(&forward), Some(COMPENSATED));
            assert_eq!((done, undone), (0, 0));
        }
    }
    pool.close().await;
}

#[tokio::test]
async fn commands_arriving_together_share_a_commit_and_fail_alone() {
    let db = TestDatabase::new("sdk");
    let (pool, service) = setup(&db).await;
    // 60 commands at once: while the first batches run (each handler takes 20 ms), the rest
    // queue and go together into the next ones.
    let calls: Vec<_> = (0..60)
        .map(|n| {
            let input = match n % 10 {
                3 => json!({ "refuse": true }),
                5 => json!({ "fail": true }),
                7 => json!({ "swallow": true }),
                _ => json!({}),
            };
            let service = service.clone();
            tokio::spawn(
                async move { execute(&service, command(&format!("b{n}"), false, input)).await },
            )
        })
        .collect();
    let mut replies = Vec::new();
    for call in calls {
        replies.push(call.await.unwrap());
    }
    for (n, reply) in replies.iter().enumerate() {
        match n % 10 {
            3 => assert_eq!(
                reply.as_ref().ok().and_then(failure_code),
                Some("NOPE"),
                "{n}"
            ),
            5 | 7 => assert_eq!(
                reply.as_ref().map_err(tonic::Status::code).err(),
                Some(tonic::Code::Internal),
                "{n}: {reply:?}"
            ),
            _ => assert!(reply.as_ref().is_ok_and(is_success), "{n}: {reply:?}"),
        }
    }
    // The successes' effects stayed, every other command's writes were rolled back alone.
    assert_eq!(effects(&pool, "execute").await, 42);
    let unexpected: i64 = sqlx::query_scalar(
        "select count(*) from effects
         where right(saga_id, 1) in ('3', '5', '7')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(unexpected, 0);
    // 42 successes and 6 refusals recorded, the failures not.
    assert_eq!(keys(&pool).await, 48);
    // Rows written by one transaction share its id: 48 keys in far fewer commits.
    let commits: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(distinct xmin::text) from {LEDGER_TABLE}"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    println!("48 keys recorded by {commits} transactions");
    assert!(commits <= 24, "{commits} transactions for 48 keys");
    pool.close().await;
}
