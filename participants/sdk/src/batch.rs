//! Group commit: the commands that arrive together share one transaction of the participant's
//! database, each in a savepoint of its own, so a busy participant pays one `BEGIN`, one lock
//! and look-up statement, one insert of keys and one durable `COMMIT` for many commands.
//!
//! A batch locks the steps of all its commands first, in one order (so two batches never wait
//! on each other's step locks in a circle), then reads every key it needs and sets its first
//! savepoint, all in one round trip; runs each command's handler inside a savepoint (a refusal
//! or an error rolls back that command's writes only), records every key in one insert, and
//! commits. Each command is answered after the commit. A failing `COMMIT` (or any statement
//! outside a savepoint) fails every command of the batch with `UNAVAILABLE`: none of them took
//! effect, and the orchestrator sends them again with the same keys.
//!
//! A batch runs in a task of its own, which the RPCs only wait for: a caller that goes away
//! stops nothing (see [`crate::service`]). When the participant is idle a command is a batch of
//! one and waits for nobody; while [`CONCURRENT_BATCHES`] transactions are open, the commands
//! arriving meanwhile form the next batch.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::Status;
use tracing::Instrument;

use crate::handler::{StepCommandView, StepError, StepHandler};
use crate::ledger::{self, Kind, Recorded, Reply};

/// Transactions open at once. Measured with the demo at 64 concurrent sagas (`bench/run.sh`):
/// with 4, most commands still had a transaction of their own (0.9, 0.6 and 0.6 transactions
/// per saga in the three participants, 331 sagas/s); with 2, the commands waiting meanwhile
/// share them (0.5, 0.4, 0.4; 362 sagas/s, 12 % less CPU per saga), and one client is as fast.
const CONCURRENT_BATCHES: usize = 2;
/// The most commands in one transaction: each takes a subtransaction, and Postgres keeps at most
/// 64 of a transaction's subtransactions in shared memory before every snapshot gets slower.
const MAX_BATCH: usize = 32;
/// Commands waiting for a batch before callers wait to hand theirs in.
const QUEUE: usize = 1024;

/// The failure code of an `Execute` that arrives after its step was compensated.
pub const COMPENSATED: &str = "COMPENSATED";

/// What a command is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Execute,
    Compensate,
}

/// A command waiting for its batch, and where its answer goes.
struct Job {
    command: StepCommandView,
    direction: Direction,
    span: tracing::Span,
    answer: oneshot::Sender<Result<Reply, Status>>,
}

/// Hands commands to the batches; cloning it is cheap.
#[derive(Clone)]
pub(crate) struct Batcher {
    queue: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the task that forms batches; it ends when every `Batcher` is dropped.
    pub(crate) fn spawn<H: StepHandler>(pool: PgPool, handler: Arc<H>) -> Batcher {
        let (queue, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(form_batches(pool, handler, receiver));
        Batcher { queue }
    }

    /// Runs `command` in the next batch and waits for its answer after the commit. If the
    /// caller goes away meanwhile, the batch still runs the command to its end.
    pub(crate) async fn run(
        &self,
        command: StepCommandView,
        direction: Direction,
    ) -> Result<Reply, Status> {
        let (answer, answered) = oneshot::channel();
        let job = Job {
            command,
            direction,
            span: tracing::Span::current(),
            answer,
        };
        self.queue
            .send(job)
            .await
            .map_err(|_| Status::unavailable("the participant is shutting down"))?;
        answered.await.unwrap_or_else(|_| {
            // The batch's task panicked (a handler did): its transaction was rolled back.
            tracing::error!("the command's batch failed; rolled back");
            Err(Status::internal("the command's batch failed; rolled back"))
        })
    }
}

async fn form_batches<H: StepHandler>(
    pool: PgPool,
    handler: Arc<H>,
    mut receiver: mpsc::Receiver<Job>,
) {
    let open = Arc::new(Semaphore::new(CONCURRENT_BATCHES));
    loop {
        // A transaction slot first: the commands that arrive while every slot is busy wait in
        // the queue and go together into the next batch.
        let Ok(slot) = Arc::clone(&open).acquire_owned().await else {
            return;
        };
        let Some(first) = receiver.recv().await else {
            return;
        };
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let (pool, handler) = (pool.clone(), Arc::clone(&handler));
        tokio::spawn(async move {
            run_batch(&pool, handler.as_ref(), jobs).await;
            drop(slot);
        });
    }
}

async fn run_batch<H: StepHandler>(pool: &PgPool, handler: &H, jobs: Vec<Job>) {
    let mut commands = Vec::with_capacity(jobs.len());
    let mut answers = Vec::with_capacity(jobs.len());
    for job in jobs {
        commands.push((job.command, job.direction, job.span));
        answers.push(job.answer);
    }
    tracing::debug!(commands = commands.len(), "a batch");
    match commit(pool, handler, commands).await {
        Ok(replies) => {
            for (answer, reply) in answers.into_iter().zip(replies) {
                // A caller that has gone is fine: its command took effect all the same.
                let _ = answer.send(reply);
            }
        }
        Err(error) => {
            tracing::warn!(%error, commands = answers.len(), "a batch failed; rolled back");
            let status = database_status(error);
            for answer in answers {
                let _ = answer.send(Err(status.clone()));
            }
        }
    }
}

/// What the batch knows of keys: what was recorded before it, and what it records itself.
struct Ledger {
    known: HashMap<String, Recorded>,
    to_record: Vec<(String, Kind, Reply)>,
    /// The last command whose handler's writes were kept. Its savepoint is not released (a
    /// round trip saved per command): a failed statement its handler swallowed shows as the
    /// transaction's aborted state at the batch's next statement, which then undoes it alone.
    last_kept: Option<Kept>,
    /// The newest savepoint has nothing after it (it was set with the lock and look-up, or
    /// rolled back to): the next handler runs after it without setting another.
    clean_savepoint: bool,
}

/// Where a kept command's answer and records are, to undo them.
struct Kept {
    reply: usize,
    records_from: usize,
}

impl Ledger {
    fn get(&self, key: &str) -> Option<&Recorded> {
        self.known.get(key)
    }

    fn record(&mut self, key: String, kind: Kind, reply: Reply) {
        self.known.insert(
            key.clone(),
            Recorded {
                kind,
                reply: reply.clone(),
            },
        );
        self.to_record.push((key, kind, reply));
    }

    /// Notes how a handler that ran after the newest savepoint ended; `reply` is where its
    /// command's answer goes.
    fn ran(&mut self, ran: &Ran, reply: usize) {
        if let Ran::Kept(_) = ran {
            self.last_kept = Some(Kept {
                reply,
                records_from: self.to_record.len(),
            });
            self.clean_savepoint = false;
        } else {
            self.clean_savepoint = true;
        }
    }

    /// Undoes the last kept command after its handler was found to have carried on past a
    /// failed statement of its own; its savepoint has been rolled back to.
    fn undo_last_kept(&mut self, replies: &mut [Result<Reply, Status>], error: &sqlx::Error) {
        let Some(kept) = self.last_kept.take() else {
            return;
        };
        for (key, _, _) in self.to_record.drain(kept.records_from..) {
            self.known.remove(&key);
        }
        tracing::warn!(%error, "a handler ignored a failed statement; rolled back");
        replies[kept.reply] = Err(Status::internal(format!(
            "the handler ignored a failed statement: {error}"
        )));
    }
}

/// Runs a statement of the batch's own. If the transaction is in an aborted state, the last
/// kept command's handler swallowed a failure: that command is rolled back to its savepoint and
/// answered `INTERNAL`, and the statement runs again.
async fn after_kept<T, F>(
    conn: &mut PgConnection,
    ledger: &mut Ledger,
    replies: &mut [Result<Reply, Status>],
    statement: F,
) -> Result<T, sqlx::Error>
where
    F: AsyncFn(&mut PgConnection, &Ledger) -> Result<T, sqlx::Error>,
{
    match statement(conn, ledger).await {
        Err(sqlx::Error::Database(error))
            if error.code().as_deref() == Some("25P02") && ledger.last_kept.is_some() =>
        {
            sqlx::raw_sql("rollback to savepoint command")
                .execute(&mut *conn)
                .await?;
            ledger.undo_last_kept(replies, &sqlx::Error::Database(error));
            statement(conn, ledger).await
        }
        result => result,
    }
}

/// The batch's transaction; `Err` only for what fails the whole transaction.
async fn commit<H: StepHandler>(
    pool: &PgPool,
    handler: &H,
    commands: Vec<(StepCommandView, Direction, tracing::Span)>,
) -> Result<Vec<Result<Reply, Status>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let step_keys: Vec<String> = commands
        .iter()
        .map(|(command, direction, _)| match direction {
            Direction::Execute => command.idempotency_key.clone(),
            Direction::Compensate => execute_key_of(command),
        })
        .collect();
    // A compensation reads its step's execute key too.
    let mut keys = step_keys.clone();
    keys.extend(
        commands
            .iter()
            .map(|(command, _, _)| command.idempotency_key.clone()),
    );
    let mut ledger = Ledger {
        known: ledger::lock_find_and_savepoint(&mut tx, &step_keys, &keys).await?,
        to_record: Vec::new(),
        last_kept: None,
        clean_savepoint: true,
    };
    let mut replies = Vec::with_capacity(commands.len());
    for ((command, direction, span), step_key) in commands.into_iter().zip(step_keys) {
        let reply = match direction {
            Direction::Execute => {
                execute(&mut tx, handler, &mut ledger, &mut replies, command)
                    .instrument(span)
                    .await?
            }
            Direction::Compensate => {
                compensate(
                    &mut tx,
                    handler,
                    &mut ledger,
                    &mut replies,
                    command,
                    step_key,
                )
                .instrument(span)
                .await?
            }
        };
        replies.push(reply);
    }
    after_kept(&mut tx, &mut ledger, &mut replies, async |conn, ledger| {
        ledger::record_all(conn, &ledger.to_record).await
    })
    .await?;
    tx.commit().await?;
    Ok(replies)
}

/// One execute of the batch.
async fn execute<H: StepHandler>(
    conn: &mut PgConnection,
    handler: &H,
    ledger: &mut Ledger,
    replies: &mut [Result<Reply, Status>],
    command: StepCommandView,
) -> Result<Result<Reply, Status>, sqlx::Error> {
    let key = command.idempotency_key.clone();
    if let Some(recorded) = ledger.get(&key) {
        tracing::info!(
            tombstone = recorded.kind == Kind::Tombstone,
            "repeated key: the recorded reply"
        );
        return Ok(Ok(recorded.reply.clone()));
    }
    savepoint(conn, ledger, replies).await?;
    let result = handler.execute(&command, conn).await;
    let ran = finish(conn, result).await?;
    ledger.ran(&ran, replies.len());
    let reply = match ran {
        Ran::Kept(output) => Reply::Success(output),
        Ran::Refused { code, reason } => Reply::Failure { code, reason },
        Ran::Failed(status) => {
            tracing::warn!(message = status.message(), "execute failed; rolled back");
            return Ok(Err(status));
        }
    };
    tracing::info!(refused = matches!(reply, Reply::Failure { .. }), "executed");
    ledger.record(key, Kind::Execute, reply.clone());
    Ok(Ok(reply))
}

/// One compensate of the batch; `execute_key` is the key of the step's execute.
async fn compensate<H: StepHandler>(
    conn: &mut PgConnection,
    handler: &H,
    ledger: &mut Ledger,
    replies: &mut [Result<Reply, Status>],
    mut command: StepCommandView,
    execute_key: String,
) -> Result<Result<Reply, Status>, sqlx::Error> {
    let key = command.idempotency_key.clone();
    if let Some(recorded) = ledger.get(&key) {
        tracing::info!("repeated key: the recorded reply");
        return Ok(Ok(recorded.reply.clone()));
    }
    let executed_output = match ledger.get(&execute_key) {
        Some(Recorded {
            kind: Kind::Execute,
            reply: Reply::Success(output),
        }) => Some(output.clone()),
        // A refused execute changed nothing; a tombstone means it was compensated before.
        Some(_) => None,
        None => {
            // Null compensation: the execute never took effect here. A tombstone makes a late
            // execute with that key a refusal that changes nothing.
            let tombstone = Reply::Failure {
                code: COMPENSATED.to_owned(),
                reason: format!(
                    "step {} of saga {} was compensated before it executed",
                    command.step, command.saga_id
                ),
            };
            ledger.record(execute_key, Kind::Tombstone, tombstone);
            None
        }
    };
    let Some(executed_output) = executed_output else {
        let reply = Reply::Success(Value::Null);
        ledger.record(key, Kind::Compensate, reply.clone());
        tracing::info!("null compensation: nothing to undo");
        return Ok(Ok(reply));
    };
    command.executed_output = Some(executed_output);
    savepoint(conn, ledger, replies).await?;
    let result = handler.compensate(&command, conn).await;
    let ran = finish(conn, result).await?;
    ledger.ran(&ran, replies.len());
    match ran {
        Ran::Kept(output) => {
            let reply = Reply::Success(output);
            ledger.record(key, Kind::Compensate, reply.clone());
            tracing::info!("compensated");
            Ok(Ok(reply))
        }
        // Not recorded: the saga goes FAILED, an operator fixes the cause and RetrySaga sends
        // the same key again, which must then run.
        Ran::Refused { code, reason } => {
            tracing::warn!(%code, %reason, "compensation refused");
            Ok(Ok(Reply::Failure { code, reason }))
        }
        Ran::Failed(status) => {
            tracing::warn!(message = status.message(), "compensate failed; rolled back");
            Ok(Err(status))
        }
    }
}

/// How a handler's call inside its savepoint ended.
enum Ran {
    /// Its writes stay; its output is a JSON object or `Null`.
    Kept(Value),
    /// Its writes were rolled back; the refusal is the reply.
    Refused { code: String, reason: String },
    /// Its writes were rolled back; the call answers this.
    Failed(Status),
}

/// Sets the savepoint a command's handler runs after, unless the newest one is still clean: its
/// writes are kept, or rolled back alone by [`finish`] or [`after_kept`]. Kept savepoints are
/// never released (the commit ends them all), so they nest: rolling back to `command` always
/// reaches the newest one.
async fn savepoint(
    conn: &mut PgConnection,
    ledger: &mut Ledger,
    replies: &mut [Result<Reply, Status>],
) -> Result<(), sqlx::Error> {
    if ledger.clean_savepoint {
        return Ok(());
    }
    after_kept(conn, ledger, replies, async |conn, _| {
        sqlx::raw_sql("savepoint command").execute(conn).await
    })
    .await?;
    // The transaction was not aborted: the last kept command's writes stand.
    ledger.last_kept = None;
    Ok(())
}

/// Keeps the handler's writes when it succeeded, or rolls back to its savepoint, so that one
/// command's failure leaves the others' writes.
async fn finish(
    conn: &mut PgConnection,
    result: Result<Value, StepError>,
) -> Result<Ran, sqlx::Error> {
    let ran = match result {
        Ok(output @ (Value::Null | Value::Object(_))) => Ran::Kept(output),
        Ok(other) => Ran::Failed(Status::internal(format!(
            "the handler returned {other}, not a JSON object"
        ))),
        Err(StepError::Refused { code, reason }) => Ran::Refused { code, reason },
        Err(StepError::Internal(message)) => Ran::Failed(Status::internal(message)),
    };
    if let Ran::Kept(_) = ran {
        return Ok(ran);
    }
    sqlx::raw_sql("rollback to savepoint command")
        .execute(conn)
        .await?;
    Ok(ran)
}

/// The execute key of the step a compensation undoes: `<saga>/<step>/execute`.
fn execute_key_of(command: &StepCommandView) -> String {
    match command.idempotency_key.strip_suffix("/compensate") {
        Some(prefix) => format!("{prefix}/execute"),
        None => format!("{}/{}/execute", command.saga_id, command.step),
    }
}

/// The database is down or busy: transient, so the orchestrator retries.
fn database_status(error: sqlx::Error) -> Status {
    tracing::warn!(%error, "database error");
    Status::unavailable(format!("database: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_execute_key_of_a_compensation() {
        let mut command = StepCommandView {
            saga_id: "s".into(),
            saga_type: String::new(),
            step: "charge".into(),
            action: String::new(),
            idempotency_key: "s/charge/compensate".into(),
            attempt: 1,
            context: Value::Null,
            correlation_id: String::new(),
            executed_output: None,
        };
        assert_eq!(execute_key_of(&command), "s/charge/execute");
        command.idempotency_key = "odd".into();
        assert_eq!(execute_key_of(&command), "s/charge/execute");
    }
}
