//! The whole demo system for end-to-end tests: order-service, payment-service and
//! shipping-service as real processes, each on a database of its own, and one or more sagad
//! replicas as real processes driving them over one orchestrator database. A test plans a mix of
//! sagas whose outcomes the demo domain fixes, starts them, perhaps kills, pauses or cuts off
//! parts of the system, and then [`check_the_run`] reads what the participants' databases say
//! (read services, idempotency ledgers) and what their logs show they were asked.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use sagad_proto::demo::v1::orders_client::OrdersClient;
use sagad_proto::demo::v1::payments_client::PaymentsClient;
use sagad_proto::demo::v1::shipping_client::ShippingClient;
use sagad_proto::demo::v1::{GetAccountRequest, GetOrderRequest, GetShipmentRequest};
use sagad_proto::v1::saga_orchestrator_client::SagaOrchestratorClient;
use sagad_proto::v1::{Saga, SagaStatus, StartSagaRequest, StepStatus};
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::{Client, DatabaseGuard, SagadProcess, Scratch, repo_root, signals, to_json, to_struct};

/// Every account's balance when first seen (payment-service's default).
pub const DEFAULT_BALANCE_CENTS: i64 = 100_000;

/// Long enough for a few hundred sagas with retries and takeovers on a loaded 2-core machine.
pub const ALL_DONE_WITHIN: Duration = Duration::from_secs(180);

/// How long one planned saga may take to be accepted, across retries on other replicas.
const START_WITHIN: Duration = Duration::from_secs(60);

/// Flags as the processes take them.
pub fn flags(list: &[&str]) -> Vec<String> {
    list.iter().map(|flag| (*flag).to_owned()).collect()
}

/// The health service name a participant reports SERVING once it is migrated and listening.
const PARTICIPANT_SERVICE: &str = "sagad.participant.v1.Participant";

/// One of the three demo participants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Service {
    Order,
    Payment,
    Shipping,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Order, Service::Payment, Service::Shipping];

    /// The name the saga definitions use for it.
    pub fn participant(self) -> &'static str {
        match self {
            Service::Order => "order",
            Service::Payment => "payment",
            Service::Shipping => "shipping",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Service::Order => "order-service",
            Service::Payment => "payment-service",
            Service::Shipping => "shipping-service",
        }
    }
}

/// A demo participant's binary in a process of its own; it can be killed and started again on
/// the same address and database.
pub struct ParticipantProcess {
    pub service: Service,
    pub addr: SocketAddr,
    database_url: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log_dir: PathBuf,
    starts: u32,
    child: Option<Child>,
    /// How a client reaches it when it serves TLS.
    tls: Option<ClientTlsConfig>,
}

impl ParticipantProcess {
    /// Starts the participant with these extra flags on a port the system picks (`--listen
    /// 127.0.0.1:0`), reads the address it bound from its log, and waits until it serves.
    pub async fn start(
        service: Service,
        database_url: &str,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_over(service, database_url, args, env, log_dir, None).await
    }

    /// [`start`](Self::start) for a participant serving TLS (its `args` say with what):
    /// `tls` is how clients, sagad among them, reach it.
    pub async fn start_over(
        service: Service,
        database_url: &str,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
        tls: Option<ClientTlsConfig>,
    ) -> anyhow::Result<Self> {
        let mut process = Self {
            service,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            database_url: database_url.to_owned(),
            args: args.to_vec(),
            env: env.to_vec(),
            log_dir: log_dir.to_path_buf(),
            starts: 0,
            child: None,
            tls,
        };
        process.spawn().await?;
        Ok(process)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Where sagad reaches it.
    pub fn uri(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// SIGSTOP, returning once the kernel shows it stopped: it answers nothing, while its
    /// sockets stay open (calls to it time out).
    pub async fn pause(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("the participant has exited")?;
        crate::signals::send(pid, "STOP").await?;
        crate::signals::wait_state(pid, |state| state == 'T').await
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub async fn resume(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("the participant has exited")?;
        crate::signals::send(pid, "CONT").await?;
        crate::signals::wait_state(pid, |state| state != 'T').await
    }

    /// SIGKILL: its transactions in flight are rolled back by Postgres, nothing else happens.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// From now on, clients (the wait for it to serve among them) reach it with `tls`: after
    /// its TLS files changed.
    pub fn reach_with(&mut self, tls: ClientTlsConfig) {
        self.tls = Some(tls);
    }

    /// Starts it again, same address (sagad knows it by that), database and flags (after
    /// [`kill`](Self::kill)).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        self.spawn().await
    }

    /// Runs the binary on `self.addr` (port 0 at the first start), then waits for the address
    /// it logs it bound and for its health to say SERVING there.
    async fn spawn(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let binary = self.service.binary();
        let log = self.log_dir.join(format!("{binary}-{}.log", self.starts));
        let mut child = Command::new(crate::daemon::binary(binary)?)
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--database-url")
            .arg(&self.database_url)
            .args(&self.args)
            .env_remove("DATABASE_URL")
            .env_remove("LISTEN")
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut bound = None;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{binary} exited with {status} before serving: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if bound.is_none() {
                bound = logged_listen_address(&std::fs::read_to_string(&log)?);
            }
            if let Some(addr) = bound
                && participant_serving(addr, self.tls.as_ref()).await
            {
                self.addr = addr;
                self.child = Some(child);
                return Ok(());
            }
            if tokio::time::Instant::now() > until {
                bail!(
                    "{binary} did not serve within 60 s (bound address from its log: {bound:?}): \
                     {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The address in a participant's `participant is serving` log line: `listen=ADDR` in the
/// text format, `"listen":"ADDR"` in JSON.
fn logged_listen_address(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter(|line| line.contains("participant is serving"))
        .find_map(|line| {
            let (_, rest) = line
                .split_once("listen=")
                .or_else(|| line.split_once("\"listen\":\""))?;
            rest.split(|c: char| c.is_whitespace() || c == '"' || c == ',' || c == '}')
                .next()?
                .parse()
                .ok()
        })
}

async fn participant_serving(addr: SocketAddr, tls: Option<&ClientTlsConfig>) -> bool {
    let Ok(channel) = crate::tls::endpoint(addr, tls) else {
        return false;
    };
    let Ok(channel) = channel.connect().await else {
        return false;
    };
    let mut health = HealthClient::new(channel);
    health
        .check(HealthCheckRequest {
            service: PARTICIPANT_SERVICE.to_owned(),
        })
        .await
        .is_ok_and(|reply| reply.into_inner().status == ServingStatus::Serving as i32)
}

/// One idempotency key a participant recorded, with what it was (`execute`, `compensate`,
/// `tombstone`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub idempotency_key: String,
    pub kind: String,
}

/// How to start a [`DemoSystem`].
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Extra flags of every participant (faults, latency).
    pub participant_args: Vec<String>,
    /// Extra flags of every sagad replica (lease TTL, poll interval).
    pub sagad_args: Vec<String>,
    /// How many sagad replicas share the orchestrator database.
    pub replicas: usize,
    /// A Postgres server URL (no database name) for sagad's database instead of the shared
    /// server, e.g. a private cluster the test stops and starts.
    pub sagad_server: Option<String>,
    /// A Postgres server URL (no database name) for the participants' databases instead of the
    /// shared server.
    pub participant_server: Option<String>,
    /// Environment variables of every process (the participants' and sagad's), e.g. where to
    /// export traces.
    pub env: Vec<(String, String)>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            participant_args: Vec::new(),
            sagad_args: Vec::new(),
            replicas: 1,
            sagad_server: None,
            participant_server: None,
            env: Vec::new(),
        }
    }
}

/// One whole system at a time per test binary: each takes a few dozen database connections
/// (sagad's pools, three participants' pools), and the shared server allows a hundred.
static ONE_SYSTEM_AT_A_TIME: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplicaState {
    Live,
    Paused,
    Killed,
}

struct Replica {
    process: SagadProcess,
    state: ReplicaState,
}

/// The three participants and the sagad replicas, each a process; the participants on a
/// database each, the replicas sharing one.
pub struct DemoSystem {
    pub order: ParticipantProcess,
    pub payment: ParticipantProcess,
    pub shipping: ParticipantProcess,
    replicas: Vec<Replica>,
    /// The flags every replica is started with, for the ones started later.
    sagad_args: Vec<String>,
    /// Every replica's current address, for clients that must get through.
    servers: watch::Sender<Vec<String>>,
    sagad_url: String,
    /// Dropped at the end: the participants' databases, and sagad's when on the shared server.
    databases: Vec<(Option<Service>, DatabaseGuard)>,
    logs: Scratch,
    /// The environment every process gets.
    env: Vec<(String, String)>,
    _slot: tokio::sync::SemaphorePermit<'static>,
}

impl DemoSystem {
    /// Starts the participants and then the sagad replicas, one after the other, with the
    /// definitions in `defs`.
    pub async fn start(label: &str, defs: &Path, options: DemoOptions) -> anyhow::Result<Self> {
        let slot = ONE_SYSTEM_AT_A_TIME
            .acquire()
            .await
            .context("the systems' semaphore is closed")?;
        let logs = Scratch::logs(label)?;
        let mut databases = Vec::new();
        let sagad_url = match &options.sagad_server {
            Some(server) => format!("{server}/sagad_test_{label}"),
            None => {
                let database = DatabaseGuard::new(label);
                let url = database.url();
                databases.push((None, database));
                url
            }
        };
        let mut participants = Vec::new();
        for service in Service::ALL {
            let name = format!("{label}_{}", service.participant());
            let database = match &options.participant_server {
                Some(server) => DatabaseGuard::on(server, &name),
                None => DatabaseGuard::new(&name),
            };
            participants.push(
                ParticipantProcess::start(
                    service,
                    &database.url(),
                    &options.participant_args,
                    &options.env,
                    &logs,
                )
                .await?,
            );
            databases.push((Some(service), database));
        }
        let mut sagad_args = vec![
            "--database-url".to_owned(),
            sagad_url.clone(),
            "--defs".to_owned(),
            defs.display().to_string(),
        ];
        for participant in &participants {
            sagad_args.extend([
                "--participant".to_owned(),
                format!(
                    "{}={}",
                    participant.service.participant(),
                    participant.uri()
                ),
            ]);
        }
        sagad_args.extend(options.sagad_args.iter().cloned());
        let mut participants = participants.into_iter();
        let (Some(order), Some(payment), Some(shipping)) = (
            participants.next(),
            participants.next(),
            participants.next(),
        ) else {
            bail!("three participants were started");
        };
        let mut system = Self {
            order,
            payment,
            shipping,
            replicas: Vec::new(),
            sagad_args,
            servers: watch::Sender::new(Vec::new()),
            sagad_url,
            databases,
            logs,
            env: options.env.clone(),
            _slot: slot,
        };
        for _ in 0..options.replicas.max(1) {
            let process = system.start_replica().await?;
            system.replicas.push(Replica {
                process,
                state: ReplicaState::Live,
            });
        }
        system.publish_servers();
        Ok(system)
    }

    /// A new sagad process with the system's flags and environment, on free ports.
    async fn start_replica(&self) -> anyhow::Result<SagadProcess> {
        let mut args = self.sagad_args.clone();
        args.extend(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"].map(str::to_owned));
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        SagadProcess::start_with(&args, &env, &self.logs).await
    }

    /// Replica `index`, whatever its state.
    pub fn replica(&self, index: usize) -> anyhow::Result<&SagadProcess> {
        Ok(&self
            .replicas
            .get(index)
            .with_context(|| format!("no replica {index}"))?
            .process)
    }

    fn replica_mut(&mut self, index: usize) -> anyhow::Result<&mut Replica> {
        self.replicas
            .get_mut(index)
            .with_context(|| format!("no replica {index}"))
    }

    /// Replica `index`'s exit status if its process has ended (killed ones included).
    pub fn replica_exited(
        &mut self,
        index: usize,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        self.replica_mut(index)?.process.exited()
    }

    /// The first replica's address for `sagactl --server`.
    pub fn server(&self) -> String {
        self.replicas
            .first()
            .map(|replica| format!("http://{}", replica.process.addr))
            .unwrap_or_default()
    }

    /// Every replica's address, as a client configured with all of them knows them: a killed
    /// or paused replica stays listed (the client finds out by trying) until a restart
    /// replaces its address.
    pub fn servers(&self) -> watch::Receiver<Vec<String>> {
        self.servers.subscribe()
    }

    fn publish_servers(&self) {
        let all = self
            .replicas
            .iter()
            .map(|replica| format!("http://{}", replica.process.addr))
            .collect();
        self.servers.send_replace(all);
    }

    /// A client of the first replica that serves now.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let replica = self
            .replicas
            .iter()
            .find(|replica| replica.state == ReplicaState::Live)
            .context("no replica serves")?;
        replica.process.client().await
    }

    /// SIGKILL to replica `index`; it stays dead until [`restart_replica`](Self::restart_replica).
    pub async fn kill_replica(&mut self, index: usize) -> anyhow::Result<()> {
        let replica = self.replica_mut(index)?;
        replica.state = ReplicaState::Killed;
        replica.process.kill().await
    }

    /// A new sagad process in place of replica `index` (killed first if it still runs), on new
    /// ports with the same flags: a new replica as far as the database can tell.
    pub async fn restart_replica(&mut self, index: usize) -> anyhow::Result<()> {
        if self.replica(index)?.pid().is_some() {
            self.kill_replica(index).await?;
        }
        let process = self.start_replica().await?;
        *self.replica_mut(index)? = Replica {
            process,
            state: ReplicaState::Live,
        };
        self.publish_servers();
        Ok(())
    }

    /// SIGSTOP to replica `index`, returning once the kernel shows it stopped: from then on it
    /// does nothing at all, while its sockets stay open and its lease runs out.
    pub async fn pause_replica(&mut self, index: usize) -> anyhow::Result<()> {
        let pid = self
            .replica(index)?
            .pid()
            .context("the replica has exited")?;
        self.replica_mut(index)?.state = ReplicaState::Paused;
        signals::send(pid, "STOP").await?;
        signals::wait_state(pid, |state| state == 'T').await
    }

    /// SIGCONT to replica `index`, paused by [`pause_replica`](Self::pause_replica).
    pub async fn resume_replica(&mut self, index: usize) -> anyhow::Result<()> {
        let pid = self
            .replica(index)?
            .pid()
            .context("the replica has exited")?;
        signals::send(pid, "CONT").await?;
        signals::wait_state(pid, |state| state != 'T').await?;
        self.replica_mut(index)?.state = ReplicaState::Live;
        Ok(())
    }

    /// A connection to the orchestrator's database, for what the API does not show (owners,
    /// replicas, which replica appended an event).
    pub async fn orchestrator_db(&self) -> anyhow::Result<PgConnection> {
        PgConnection::connect(&self.sagad_url)
            .await
            .context("connecting to sagad's database")
    }

    /// The order's status as order-service has it (`PENDING`, `APPROVED`, `CANCELLED`).
    pub async fn order_status(&self, order_id: &str) -> anyhow::Result<String> {
        let mut orders = OrdersClient::connect(self.order.uri()).await?;
        let order = orders
            .get_order(GetOrderRequest {
                order_id: order_id.to_owned(),
            })
            .await
            .with_context(|| format!("order {order_id}"))?
            .into_inner();
        Ok(order.status)
    }

    /// The customer's balance as payment-service has it.
    pub async fn balance_cents(&self, customer_id: &str) -> anyhow::Result<i64> {
        let mut payments = PaymentsClient::connect(self.payment.uri()).await?;
        let account = payments
            .get_account(GetAccountRequest {
                customer_id: customer_id.to_owned(),
            })
            .await?
            .into_inner();
        Ok(account.balance_cents)
    }

    /// The order's shipment status as shipping-service has it; `None` when it has none.
    pub async fn shipment_status(&self, order_id: &str) -> anyhow::Result<Option<String>> {
        let mut shipping = ShippingClient::connect(self.shipping.uri()).await?;
        match shipping
            .get_shipment(GetShipmentRequest {
                order_id: order_id.to_owned(),
            })
            .await
        {
            Ok(shipment) => Ok(Some(shipment.into_inner().status)),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(status.into()),
        }
    }

    /// A connection to a participant's own database, as its operator would open one.
    pub async fn participant_db(&self, service: Service) -> anyhow::Result<PgConnection> {
        let url = self
            .databases
            .iter()
            .find(|(owner, _)| *owner == Some(service))
            .map(|(_, database)| database.url())
            .context("no database for that participant")?;
        Ok(PgConnection::connect(&url).await?)
    }

    /// Every idempotency key the participant recorded, read from its database.
    pub async fn ledger(&self, service: Service) -> anyhow::Result<Vec<LedgerEntry>> {
        let mut conn = self.participant_db(service).await?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "select idempotency_key, kind from sagad_processed_commands order by recorded_at",
        )
        .fetch_all(&mut conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(idempotency_key, kind)| LedgerEntry {
                idempotency_key,
                kind,
            })
            .collect())
    }

    /// Every idempotency key a participant was called with, as its logs show them: the SDK
    /// logs each call's span with `idempotency_key=<key>`, refused and failed calls included,
    /// so this sees keys its ledger never recorded.
    pub fn logged_keys(&self) -> anyhow::Result<BTreeSet<(Service, String)>> {
        let mut keys = BTreeSet::new();
        for entry in std::fs::read_dir(&*self.logs)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            let Some(service) = Service::ALL
                .into_iter()
                .find(|service| name.starts_with(&format!("{}-", service.binary())))
            else {
                continue;
            };
            let log = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            for line in log.lines() {
                for rest in line.split("idempotency_key=").skip(1) {
                    let key: String = rest
                        .chars()
                        .take_while(|c| !c.is_whitespace() && *c != '}')
                        .collect();
                    keys.insert((service, key));
                }
            }
        }
        Ok(keys)
    }

    /// Stops everything and returns the test's `outcome`; a failed one keeps the logs and
    /// says where they are.
    pub async fn shut_down_after<T>(mut self, outcome: anyhow::Result<T>) -> anyhow::Result<T> {
        if outcome.is_err() {
            self.logs.keep();
        }
        let logs = self.logs.display().to_string();
        self.shut_down().await?;
        outcome.with_context(|| format!("logs of the processes in {logs}"))
    }

    /// Stops the replicas and the participants and drops the databases.
    async fn shut_down(mut self) -> anyhow::Result<()> {
        for replica in &mut self.replicas {
            replica.process.kill().await?;
        }
        self.order.kill().await?;
        self.payment.kill().await?;
        self.shipping.kill().await?;
        for (_, database) in &mut self.databases {
            database.drop_now().await?;
        }
        Ok(())
    }
}

/// What the demo domain makes of a saga's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Completes,
    RefusedForFunds,
    RefusedForDestination,
}

/// One saga a test means to start, with the outcome its input must lead to.
#[derive(Debug, Clone)]
pub struct Planned {
    pub customer_id: String,
    pub amount_cents: i64,
    pub country: &'static str,
    pub expected: Expected,
    /// Sent with every try, so a start retried on another replica never makes two sagas.
    pub idempotency_key: String,
}

impl Planned {
    pub fn input(&self) -> Value {
        json!({
            "customer_id": self.customer_id,
            "amount_cents": self.amount_cents,
            "currency": "EUR",
            "country": self.country,
            "items": [{"sku": "BOOK-42", "quantity": 1}],
        })
    }
}

/// Per customer: two orders that complete, one over the whole balance, one to Antarctica
/// (shipping's default unsupported country). The completing amounts of a customer stay well
/// under the default balance, so no order of arrival changes an outcome.
pub fn mix(customers: usize) -> Vec<Planned> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut planned = Vec::new();
    for c in 0..customers {
        let customer_id = format!("customer-{}-{c}", &run[..8]);
        let amount = |n: i64| 1_000 + 100 * (c as i64) + n;
        let mut order = |amount_cents, country, expected| {
            planned.push(Planned {
                customer_id: customer_id.clone(),
                amount_cents,
                country,
                expected,
                idempotency_key: format!("{}-{c}-{}", &run[..8], planned.len()),
            })
        };
        order(amount(1), "SE", Expected::Completes);
        order(amount(2), "DE", Expected::Completes);
        order(150_000, "SE", Expected::RefusedForFunds);
        order(amount(3), "AQ", Expected::RefusedForDestination);
    }
    planned
}

/// The repository's demo definition with a larger attempt budget for the three limited steps.
/// With faults injected on purpose, six attempts would now and then all fail (0.3^6 per step)
/// and turn a saga meant to complete into a compensated one; the point of these runs is that
/// retries under the same keys give the same outcomes, not the size of the budget.
pub fn patient_defs() -> anyhow::Result<Scratch> {
    let path = repo_root().join("saga-defs/order_fulfillment.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let patient = text.replace("max_attempts = 6,", "max_attempts = 40,");
    ensure!(
        patient != text,
        "order_fulfillment.toml no longer has `max_attempts = 6,`: update this test"
    );
    Scratch::defs(&[("order_fulfillment.toml", &patient)])
}

/// How [`start_sagas`] spreads the starts over time: `batch` at once, then `pause`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub batch: usize,
    pub pause: Duration,
}

impl Pace {
    pub const ALL_AT_ONCE: Pace = Pace {
        batch: usize::MAX,
        pause: Duration::ZERO,
    };
}

/// The sagas [`start_sagas`] got accepted, by saga id.
#[derive(Debug, Default)]
pub struct Started {
    pub plans: HashMap<String, Planned>,
    /// Tries that failed for a reason worth retrying (a replica gone, paused or cut off).
    pub retried: usize,
}

/// Starts each planned saga with StartSaga over gRPC, through the replicas in `servers` in
/// turn. A try that fails because a replica is gone (`UNAVAILABLE`, a broken connection, a
/// timeout) is retried on the next replica with the same idempotency key: the saga may have
/// been recorded before the replica died, and the key makes the retry answer with it.
pub async fn start_sagas(
    servers: watch::Receiver<Vec<String>>,
    planned: &[Planned],
    pace: Pace,
) -> anyhow::Result<Started> {
    let mut started = Started::default();
    let batch = pace.batch.max(1);
    for (number, chunk) in planned.chunks(batch).enumerate() {
        if number > 0 {
            tokio::time::sleep(pace.pause).await;
        }
        let mut runs = tokio::task::JoinSet::new();
        for (offset, plan) in chunk.iter().cloned().enumerate() {
            let servers = servers.clone();
            let index = number * batch + offset;
            runs.spawn(async move {
                let (saga_id, retried) = start_one(&servers, &plan, index).await?;
                anyhow::Ok((saga_id, retried, plan))
            });
        }
        while let Some(run) = runs.join_next().await {
            let (saga_id, retried, plan) = run??;
            started.retried += retried;
            ensure!(
                started.plans.insert(saga_id.clone(), plan).is_none(),
                "two planned sagas got the same saga id {saga_id}"
            );
        }
    }
    Ok(started)
}

/// Starts one planned saga, retrying on the next replica while the failures are of the kind a
/// dying or paused replica causes; returns its id and how many tries failed.
async fn start_one(
    servers: &watch::Receiver<Vec<String>>,
    plan: &Planned,
    index: usize,
) -> anyhow::Result<(String, usize)> {
    let until = tokio::time::Instant::now() + START_WITHIN;
    let mut failed = 0;
    loop {
        let list = servers.borrow().clone();
        if !list.is_empty() {
            let server = &list[(index + failed) % list.len()];
            let mut client = SagaOrchestratorClient::new(
                Endpoint::from_shared(server.clone())?
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(20))
                    .connect_lazy(),
            );
            let request = StartSagaRequest {
                saga_type: "order_fulfillment".to_owned(),
                idempotency_key: plan.idempotency_key.clone(),
                input: Some(to_struct(plan.input())),
                correlation_id: plan.idempotency_key.clone(),
            };
            match client.start_saga(request).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    // Only a retry may find its saga already recorded by an earlier try.
                    ensure!(
                        reply.created || failed > 0,
                        "the first try of {} answered created=false: a key collision?",
                        plan.idempotency_key
                    );
                    return Ok((reply.saga_id, failed));
                }
                Err(status) if is_retriable(status.code()) => {
                    if tokio::time::Instant::now() > until {
                        bail!(
                            "saga {} not accepted within {START_WITHIN:?}: {status}",
                            plan.idempotency_key
                        );
                    }
                }
                Err(status) => bail!("StartSaga {} at {server}: {status}", plan.idempotency_key),
            }
            failed += 1;
        } else if tokio::time::Instant::now() > until {
            bail!("no replica served for {START_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The codes a replica killed, paused or cut off from its database answers with, or the client
/// makes of a broken connection.
fn is_retriable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Internal
    )
}

pub fn step_status(saga: &Saga, name: &str) -> Option<StepStatus> {
    saga.steps
        .iter()
        .find(|step| step.name == name)
        .and_then(|step| StepStatus::try_from(step.status).ok())
}

/// The steps whose compensation succeeded, in the order the log recorded it.
fn compensated_in_order(saga: &Saga) -> Vec<String> {
    saga.history
        .iter()
        .filter(|event| event.r#type == "compensation_succeeded")
        .map(|event| event.step.clone())
        .collect()
}

/// Everything wrong with one saga and what the participants say of it.
pub async fn saga_problems(system: &DemoSystem, saga: &Saga, plan: &Planned) -> Vec<String> {
    let mut problems = Vec::new();
    let id = &saga.saga_id;
    let status = SagaStatus::try_from(saga.status).ok();
    let steps: Vec<(&str, Option<StepStatus>)> = [
        "create_order",
        "charge_payment",
        "schedule_shipment",
        "approve_order",
    ]
    .iter()
    .map(|name| (*name, step_status(saga, name)))
    .collect();
    use StepStatus::*;
    let (want_status, want_steps, want_compensated, refusal) = match plan.expected {
        Expected::Completes => (
            SagaStatus::Completed,
            [Succeeded, Succeeded, Succeeded, Succeeded],
            vec![],
            None,
        ),
        Expected::RefusedForFunds => (
            SagaStatus::Compensated,
            [Compensated, Failed, Pending, Pending],
            vec!["create_order"],
            Some("INSUFFICIENT_FUNDS"),
        ),
        Expected::RefusedForDestination => (
            SagaStatus::Compensated,
            [Compensated, Compensated, Failed, Pending],
            vec!["charge_payment", "create_order"],
            Some("UNSUPPORTED_DESTINATION"),
        ),
    };
    if status != Some(want_status) {
        problems.push(format!(
            "{id} ({:?}): status {status:?}, want {want_status:?} ({})",
            plan.expected, saga.failure_reason
        ));
        return problems;
    }
    let got_steps: Vec<Option<StepStatus>> = steps.iter().map(|(_, status)| *status).collect();
    let want_steps: Vec<Option<StepStatus>> = want_steps.iter().map(|s| Some(*s)).collect();
    if got_steps != want_steps {
        problems.push(format!("{id}: steps {got_steps:?}, want {want_steps:?}"));
    }
    if compensated_in_order(saga) != want_compensated {
        problems.push(format!(
            "{id}: compensated {:?}, want {want_compensated:?} (newest first)",
            compensated_in_order(saga)
        ));
    }
    if let Some(code) = refusal
        && !saga.failure_reason.contains(code)
    {
        problems.push(format!(
            "{id}: failure reason {:?} does not name {code}",
            saga.failure_reason
        ));
    }

    let context = to_json(&saga.context);
    let Some(order_id) = context["steps"]["create_order"]["order_id"].as_str() else {
        problems.push(format!("{id}: no order_id in the context {context}"));
        return problems;
    };
    let want_order = if plan.expected == Expected::Completes {
        "APPROVED"
    } else {
        "CANCELLED"
    };
    match system.order_status(order_id).await {
        Ok(order) if order == want_order => {}
        Ok(order) => problems.push(format!(
            "{id}: order {order_id} is {order} at order-service, the saga says {want_order}"
        )),
        Err(error) => problems.push(format!("{id}: order {order_id}: {error:#}")),
    }
    let want_shipment = (plan.expected == Expected::Completes).then(|| "SCHEDULED".to_owned());
    match system.shipment_status(order_id).await {
        Ok(shipment) if shipment == want_shipment => {}
        Ok(shipment) => problems.push(format!(
            "{id}: shipment of {order_id} is {shipment:?}, want {want_shipment:?}"
        )),
        Err(error) => problems.push(format!("{id}: shipment of {order_id}: {error:#}")),
    }
    problems
}

/// The log of one saga holds each thing once: seqs 1..=version without gaps, one terminal
/// event and it is the last, no step succeeded, was refused or was compensated twice. A replica
/// that drove a saga it no longer owned would show here as a doubled event.
pub fn history_problems(saga: &Saga) -> Vec<String> {
    let mut problems = Vec::new();
    let id = &saga.saga_id;
    let seqs: Vec<u64> = saga.history.iter().map(|event| event.seq).collect();
    let want: Vec<u64> = (1..=saga.version).collect();
    if seqs != want {
        problems.push(format!(
            "{id}: event seqs {seqs:?}, want 1..={}",
            saga.version
        ));
    }
    let terminal = ["saga_completed", "saga_compensated", "saga_failed"];
    let ends: Vec<usize> = saga
        .history
        .iter()
        .enumerate()
        .filter(|(_, event)| terminal.contains(&event.r#type.as_str()))
        .map(|(at, _)| at)
        .collect();
    if ends.len() != 1 || ends.first() != Some(&saga.history.len().saturating_sub(1)) {
        problems.push(format!(
            "{id}: terminal events at {ends:?} of {} events",
            saga.history.len()
        ));
    }
    let mut once: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for event in &saga.history {
        if ["step_succeeded", "step_refused", "compensation_succeeded"]
            .contains(&event.r#type.as_str())
        {
            *once.entry((&event.r#type, &event.step)).or_default() += 1;
        }
    }
    for ((kind, step), count) in once {
        if count > 1 {
            problems.push(format!("{id}: {kind} for {step} {count} times"));
        }
    }
    problems
}

/// Each account holds the default balance minus the amounts of its completed sagas.
pub async fn money_problems(
    system: &DemoSystem,
    sagas: &BTreeMap<String, Saga>,
    plans: &HashMap<String, Planned>,
) -> anyhow::Result<Vec<String>> {
    let mut charged: BTreeMap<&str, i64> = BTreeMap::new();
    for (id, plan) in plans {
        let completed = sagas
            .get(id)
            .is_some_and(|saga| saga.status == SagaStatus::Completed as i32);
        *charged.entry(&plan.customer_id).or_default() +=
            if completed { plan.amount_cents } else { 0 };
    }
    let mut problems = Vec::new();
    for (customer, charged) in charged {
        let balance = system.balance_cents(customer).await?;
        if balance != DEFAULT_BALANCE_CENTS - charged {
            problems.push(format!(
                "{customer}: balance {balance}, want {DEFAULT_BALANCE_CENTS} - {charged}"
            ));
        }
    }
    Ok(problems)
}

/// Whether `key` is `<saga_id>/<step>/execute|compensate` for one of these sagas and a step
/// of `service`'s.
fn key_fits(key: &str, service: Service, sagas: &BTreeMap<String, Saga>) -> Option<&'static str> {
    let [saga_id, step, action] = key.split('/').collect::<Vec<_>>()[..] else {
        return None;
    };
    let own_step = sagas.get(saga_id).is_some_and(|saga| {
        saga.steps
            .iter()
            .any(|s| s.name == step && s.participant == service.participant())
    });
    match action {
        "execute" if own_step => Some("execute"),
        "compensate" if own_step => Some("compensate"),
        _ => None,
    }
}

/// Every key a participant recorded is `<saga_id>/<step>/execute|compensate` for one of these
/// sagas and one of its own steps; every step the saga shows as done or undone has its key.
pub async fn ledger_problems(
    system: &DemoSystem,
    sagas: &BTreeMap<String, Saga>,
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    for service in Service::ALL {
        let ledger = system.ledger(service).await?;
        let recorded: BTreeSet<&str> = ledger
            .iter()
            .map(|entry| entry.idempotency_key.as_str())
            .collect();
        for entry in &ledger {
            let kind_fits = match key_fits(&entry.idempotency_key, service, sagas) {
                Some("execute") => entry.kind == "execute" || entry.kind == "tombstone",
                Some(_) => entry.kind == "compensate",
                None => false,
            };
            if !kind_fits {
                problems.push(format!(
                    "{}: key {:?} ({}) breaks the contract's format",
                    service.participant(),
                    entry.idempotency_key,
                    entry.kind
                ));
            }
        }
        for saga in sagas.values() {
            for step in saga
                .steps
                .iter()
                .filter(|step| step.participant == service.participant())
            {
                let status = StepStatus::try_from(step.status).ok();
                let mut needed = Vec::new();
                if matches!(
                    status,
                    Some(StepStatus::Succeeded | StepStatus::Compensated | StepStatus::Failed)
                ) {
                    needed.push(format!("{}/{}/execute", saga.saga_id, step.name));
                }
                if status == Some(StepStatus::Compensated) {
                    needed.push(format!("{}/{}/compensate", saga.saga_id, step.name));
                }
                for key in needed {
                    if !recorded.contains(key.as_str()) {
                        problems.push(format!(
                            "{}: no record of {key}, yet the saga shows {:?}",
                            service.participant(),
                            status
                        ));
                    }
                }
            }
        }
    }
    Ok(problems)
}

/// Every key the participants' logs show they were called with fits the contract's format, for
/// a known saga and one of that participant's steps; returns the problems and how many keys
/// were seen (none at all would mean the logs were not read right).
pub fn logged_key_problems(
    system: &DemoSystem,
    sagas: &BTreeMap<String, Saga>,
) -> anyhow::Result<(Vec<String>, usize)> {
    let keys = system.logged_keys()?;
    let problems = keys
        .iter()
        .filter(|(service, key)| key_fits(key, *service, sagas).is_none())
        .map(|(service, key)| {
            format!(
                "{} was called with key {key:?}, which breaks the contract's format",
                service.participant()
            )
        })
        .collect();
    Ok((problems, keys.len()))
}

/// Waits for every saga to end, then checks sagas, their logs, orders, shipments, money,
/// ledgers and the keys the participants were called with, and that the orchestrator holds no
/// saga beyond the planned ones.
pub async fn check_the_run(
    system: &DemoSystem,
    plans: &HashMap<String, Planned>,
) -> anyhow::Result<BTreeMap<String, Saga>> {
    let mut client = system.client().await?;
    let ids: BTreeSet<String> = plans.keys().cloned().collect();
    let sagas = crate::wait_all_terminal(&mut client, &ids, ALL_DONE_WITHIN).await?;
    let mut problems = Vec::new();
    for (id, saga) in &sagas {
        let plan = plans.get(id).context("a saga nobody planned")?;
        problems.extend(saga_problems(system, saga, plan).await);
        problems.extend(history_problems(saga));
    }
    problems.extend(money_problems(system, &sagas, plans).await?);
    problems.extend(ledger_problems(system, &sagas).await?);
    let (key_problems, keys) = logged_key_problems(system, &sagas)?;
    problems.extend(key_problems);
    if keys == 0 && !sagas.is_empty() {
        problems.push("no idempotency key found in the participants' logs".to_owned());
    }
    let mut db = system.orchestrator_db().await?;
    let recorded: i64 = sqlx::query_scalar("select count(*) from sagas")
        .fetch_one(&mut db)
        .await?;
    if recorded != plans.len() as i64 {
        problems.push(format!(
            "sagad recorded {recorded} sagas, {} were planned",
            plans.len()
        ));
    }
    ensure!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    Ok(sagas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_address_is_read_from_either_log_format() {
        let text = "2026-01-01T00:00:00Z  INFO participant is serving listen=127.0.0.1:41234\n";
        assert_eq!(
            logged_listen_address(text),
            Some(SocketAddr::from(([127, 0, 0, 1], 41234)))
        );
        let json = r#"{"level":"INFO","fields":{"message":"participant is serving","listen":"127.0.0.1:5"}}"#;
        assert_eq!(
            logged_listen_address(json),
            Some(SocketAddr::from(([127, 0, 0, 1], 5)))
        );
        assert_eq!(
            logged_listen_address("INFO migrating listen=1.2.3.4:5"),
            None
        );
    }
}
