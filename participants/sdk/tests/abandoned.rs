//! A command whose caller gives up mid-way (sagad's deadline passes, or a cancel interrupts the
//! call): the participant still carries its transaction to the end and records the key, so the
//! command is applied whole or not at all, and a repeat of the key gets the recorded reply.
//! Served over a real socket, so the deadline is the one tonic enforces, as in production.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use sagad_participant::testing::{TestDatabase, command, outcome};
use sagad_participant::{Faults, LEDGER_TABLE, Parts, StepCommandView, StepError, StepHandler};
use sagad_proto::participant::v1::participant_client::ParticipantClient;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;

/// How long the caller waits before it gives up: long enough for the call to reach the handler
/// on a loaded machine.
const CALLER_DEADLINE: Duration = Duration::from_secs(3);
/// How long the tests wait for something that must happen.
const WITHIN: Duration = Duration::from_secs(30);
/// The warning Postgres sends for a `ROLLBACK` after the transaction already ended.
const NO_TRANSACTION: &str = "there is no transaction in progress";

/// Writes a row, says it has begun, waits for the gate, writes a second row: a command that is
/// half done while it waits.
struct Gated {
    calls: Arc<AtomicUsize>,
    begun: mpsc::UnboundedSender<String>,
    gate: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl StepHandler for Gated {
    async fn execute(
        &self,
        command: &StepCommandView,
        conn: &mut PgConnection,
    ) -> Result<Value, StepError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        sqlx::query("insert into effects (saga_id, part) values ($1, 'first')")
            .bind(&command.saga_id)
            .execute(&mut *conn)
            .await?;
        let _ = self.begun.send(command.idempotency_key.clone());
        let mut gate = self.gate.clone();
        gate.wait_for(|open| *open)
            .await
            .map_err(|_| StepError::internal("the test dropped the gate"))?;
        sqlx::query("insert into effects (saga_id, part) values ($1, 'second')")
            .bind(&command.saga_id)
            .execute(&mut *conn)
            .await?;
        Ok(json!({ "done": command.saga_id }))
    }

    async fn compensate(
        &self,
        _command: &StepCommandView,
        _conn: &mut PgConnection,
    ) -> Result<Value, StepError> {
        Ok(Value::Null)
    }
}

/// Every log line of this test binary, kept to look for the warning.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut logs) = LOGS.lock() {
            logs.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init();
    });
}

fn logged_warnings() -> String {
    LOGS.lock()
        .map(|logs| String::from_utf8_lossy(&logs).into_owned())
        .unwrap_or_default()
}

/// A participant served on a free port around [`Gated`], and what the test holds of it.
struct Served {
    pool: PgPool,
    client: ParticipantClient<Channel>,
    calls: Arc<AtomicUsize>,
    begun: mpsc::UnboundedReceiver<String>,
    gate: watch::Sender<bool>,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _db: TestDatabase,
}

impl Served {
    async fn start(setup_sql: &str) -> anyhow::Result<Served> {
        capture_logs();
        let db = TestDatabase::new("sdk_abandoned");
        let pool = sagad_participant::connect(
            &db.url(),
            &sqlx::migrate::Migrator::DEFAULT,
            Duration::from_secs(10),
        )
        .await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "create table effects (saga_id text not null, part text not null); {setup_sql}"
        )))
        .execute(&pool)
        .await?;
        let calls = Arc::new(AtomicUsize::new(0));
        let (begun_tx, begun) = mpsc::unbounded_channel();
        let (gate, gate_rx) = watch::channel(false);
        let handler = Gated {
            calls: Arc::clone(&calls),
            begun: begun_tx,
            gate: gate_rx,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(sagad_participant::serve(
            pool.clone(),
            Parts::new(handler),
            Faults::default(),
            listener,
            None,
            async move {
                let _ = stopped.await;
            },
        ));
        let channel = Channel::from_shared(address)?.connect().await?;
        Ok(Served {
            pool,
            client: ParticipantClient::new(channel),
            calls,
            begun,
            gate,
            stop,
            server,
            _db: db,
        })
    }

    /// Sends the execute of step `only` of `saga_id` with the caller's deadline, in a task.
    fn call_with_deadline(
        &self,
        saga_id: &str,
    ) -> tokio::task::JoinHandle<Result<Value, tonic::Status>> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(command(
            saga_id,
            "only",
            "Do",
            false,
            &json!({ "input": {}, "steps": {} }),
        ));
        request.set_timeout(CALLER_DEADLINE);
        tokio::spawn(async move {
            let reply = client.execute(request).await?.into_inner();
            Ok(outcome(&reply).unwrap_or_else(|code| json!({ "refused": code })))
        })
    }

    /// The handler's rows of `saga_id` and its recorded keys, in one snapshot: anything but
    /// (0, 0) or (2, 1) is a command half done.
    async fn applied(&self, saga_id: &str) -> anyhow::Result<(i64, i64)> {
        let counts: (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select (select count(*) from effects where saga_id = $1), \
                    (select count(*) from {LEDGER_TABLE} where idempotency_key = $2)"
        )))
        .bind(saga_id)
        .bind(format!("{saga_id}/only/execute"))
        .fetch_one(&self.pool)
        .await?;
        ensure!(
            counts == (0, 0) || counts == (2, 1),
            "{saga_id} is half done: {} effect rows, {} recorded keys",
            counts.0,
            counts.1
        );
        Ok(counts)
    }

    /// Waits until the command of `saga_id` is applied whole, checking at every look that it
    /// never shows half done.
    async fn wait_applied(&self, saga_id: &str) -> anyhow::Result<Duration> {
        let began = tokio::time::Instant::now();
        loop {
            if self.applied(saga_id).await? == (2, 1) {
                return Ok(began.elapsed());
            }
            if began.elapsed() > WITHIN {
                bail!(
                    "the command of {saga_id} was not carried to its end within {WITHIN:?} after \
                     its caller gave up: nothing applied, its key not recorded"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A repeat of the key, with no deadline, gets the recorded reply without running the
    /// handler again.
    async fn repeat_gets_the_recorded_reply(&mut self, saga_id: &str) -> anyhow::Result<()> {
        let reply = self
            .client
            .execute(command(
                saga_id,
                "only",
                "Do",
                false,
                &json!({ "input": {}, "steps": {} }),
            ))
            .await?
            .into_inner();
        let output = outcome(&reply).map_err(|code| anyhow::anyhow!("refused: {code}"))?;
        ensure!(
            output == json!({ "done": saga_id }),
            "the repeat got {output}"
        );
        let calls = self.calls.load(Ordering::SeqCst);
        ensure!(calls == 1, "the handler ran {calls} times");
        ensure!(self.applied(saga_id).await? == (2, 1));
        Ok(())
    }

    /// No connection of the participant's is left inside a transaction.
    async fn nothing_left_open(&self) -> anyhow::Result<()> {
        let open: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity \
             where datname = current_database() and state like 'idle in transaction%'",
        )
        .fetch_one(&self.pool)
        .await?;
        ensure!(open == 0, "{open} connections idle in a transaction");
        Ok(())
    }

    /// Stops the participant (its pool closes once every connection is back, each checked on
    /// its way), then looks for the warning of a transaction rolled back after its end.
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(WITHIN, self.server)
            .await
            .context("the participant did not stop")???;
        let warnings = logged_warnings();
        print!("warnings logged:\n{warnings}");
        ensure!(
            !warnings.contains(NO_TRANSACTION),
            "a transaction was rolled back after its end:\n{warnings}"
        );
        Ok(())
    }
}

/// The caller's error once it gave up: the deadline, as tonic reports it.
async fn gave_up(
    call: tokio::task::JoinHandle<Result<Value, tonic::Status>>,
) -> anyhow::Result<tonic::Code> {
    let answer = tokio::time::timeout(WITHIN, call)
        .await
        .context("the caller's deadline did not end the call")??;
    match answer {
        Ok(output) => bail!("the call answered {output} although the handler was held back"),
        Err(status) => {
            ensure!(
                matches!(
                    status.code(),
                    tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
                ),
                "the call ended with {status}, not its deadline"
            );
            Ok(status.code())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_its_caller_still_finishes_and_records_its_key() -> anyhow::Result<()>
{
    let mut served = Served::start("").await?;
    let call = served.call_with_deadline("slow-handler");
    let begun = tokio::time::timeout(WITHIN, served.begun.recv())
        .await
        .context("the call never reached the handler")?;
    ensure!(begun.as_deref() == Some("slow-handler/only/execute"));
    // Half done and held back: the caller's deadline passes.
    let code = gave_up(call).await?;
    println!("the caller gave up with {code:?} while the handler was half done");
    served.applied("slow-handler").await?;
    served.gate.send_replace(true);
    let took = served.wait_applied("slow-handler").await?;
    println!("applied whole, key recorded, {took:?} after the gate opened");
    served
        .repeat_gets_the_recorded_reply("slow-handler")
        .await?;
    served.nothing_left_open().await?;
    served.stop().await
}

/// The caller gives up while `COMMIT` is under way (held back by a deferred trigger that waits
/// for a lock the test holds): the reported warning's case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_gone_during_commit_leaves_no_rollback_behind() -> anyhow::Result<()> {
    const COMMIT_GATE: i64 = 4_242_424_242;
    let mut served = Served::start(&format!(
        "create function wait_for_commit_gate() returns trigger language plpgsql as $$ \
         begin perform pg_advisory_xact_lock({COMMIT_GATE}); return null; end $$; \
         create constraint trigger commit_gate after insert on effects \
         deferrable initially deferred for each row execute function wait_for_commit_gate();"
    ))
    .await?;
    served.gate.send_replace(true);
    let mut holder = served.pool.acquire().await?;
    sqlx::query("select pg_advisory_lock($1)")
        .bind(COMMIT_GATE)
        .execute(&mut *holder)
        .await?;

    let call = served.call_with_deadline("slow-commit");
    let began = tokio::time::Instant::now();
    let committing = loop {
        let waiting: Option<String> = sqlx::query_scalar(
            "select query from pg_stat_activity where datname = current_database() \
             and wait_event_type = 'Lock' and wait_event = 'advisory'",
        )
        .fetch_optional(&served.pool)
        .await?;
        if let Some(query) = waiting {
            break query;
        }
        ensure!(began.elapsed() < WITHIN, "the command never reached COMMIT");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    ensure!(
        committing.trim().eq_ignore_ascii_case("commit"),
        "waiting on the gate: {committing:?}, not COMMIT"
    );
    let code = gave_up(call).await?;
    println!("the caller gave up with {code:?} during {committing:?}");
    sqlx::query("select pg_advisory_unlock($1)")
        .bind(COMMIT_GATE)
        .execute(&mut *holder)
        .await?;
    drop(holder);
    let took = served.wait_applied("slow-commit").await?;
    println!("committed, {took:?} after the gate opened");
    served.repeat_gets_the_recorded_reply("slow-commit").await?;
    served.nothing_left_open().await?;
    served.stop().await
}
