//! The whole demo system for end-to-end tests: order-service, payment-service and
//! shipping-service as real processes, each on a database of its own, and sagad as a real
//! process driving them. The checks read what the participants' databases say, through their
//! read services and their idempotency ledgers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use sagad_proto::demo::v1::orders_client::OrdersClient;
use sagad_proto::demo::v1::payments_client::PaymentsClient;
use sagad_proto::demo::v1::shipping_client::ShippingClient;
use sagad_proto::demo::v1::{GetAccountRequest, GetOrderRequest, GetShipmentRequest};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::{DatabaseGuard, SagadProcess, Scratch};

/// The health service name a participant reports SERVING once it is migrated and listening.
const PARTICIPANT_SERVICE: &str = "sagad.participant.v1.Participant";

/// One of the three demo participants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    log_dir: PathBuf,
    starts: u32,
    child: Option<Child>,
}

impl ParticipantProcess {
    /// Starts the participant on a free port with these extra flags, and waits until it serves.
    pub async fn start(
        service: Service,
        database_url: &str,
        args: &[String],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", crate::free_port()?).parse()?;
        let mut process = Self {
            service,
            addr,
            database_url: database_url.to_owned(),
            args: args.to_vec(),
            log_dir: log_dir.to_path_buf(),
            starts: 0,
            child: None,
        };
        process.spawn().await?;
        Ok(process)
    }

    /// Where sagad reaches it.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL: its transactions in flight are rolled back by Postgres, nothing else happens.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// Starts it again, same address, database and flags (after [`kill`](Self::kill)).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log = self.log_dir.join(format!(
            "{}-{}-{}.log",
            self.service.binary(),
            self.addr.port(),
            self.starts
        ));
        let mut child = Command::new(crate::daemon::binary(self.service.binary())?)
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--database-url")
            .arg(&self.database_url)
            .args(&self.args)
            .env_remove("DATABASE_URL")
            .env_remove("LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.service.binary()))?;
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{} exited with {status} before serving: {}",
                    self.service.binary(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if participant_serving(self.addr).await {
                self.child = Some(child);
                return Ok(());
            }
            if tokio::time::Instant::now() > until {
                bail!("{} did not serve within 60 s", self.service.binary());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn participant_serving(addr: SocketAddr) -> bool {
    let Ok(channel) = Channel::from_shared(format!("http://{addr}")) else {
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

/// The three participants and sagad, each a process on a database of its own.
pub struct DemoSystem {
    pub sagad: SagadProcess,
    pub order: ParticipantProcess,
    pub payment: ParticipantProcess,
    pub shipping: ParticipantProcess,
    databases: Vec<(Option<Service>, DatabaseGuard)>,
    logs: Scratch,
}

impl DemoSystem {
    /// Starts the participants (each with `participant_args`) and then sagad with the
    /// definitions in `defs`.
    pub async fn start(
        label: &str,
        defs: &Path,
        participant_args: &[String],
    ) -> anyhow::Result<Self> {
        let logs = Scratch::logs(label)?;
        let mut databases = vec![(None, DatabaseGuard::new(label))];
        let mut participants = Vec::new();
        for service in Service::ALL {
            let database = DatabaseGuard::new(&format!("{label}_{}", service.participant()));
            participants.push(
                ParticipantProcess::start(service, &database.url(), participant_args, &logs)
                    .await?,
            );
            databases.push((Some(service), database));
        }
        let mut args = vec![
            "--database-url".to_owned(),
            databases[0].1.url(),
            "--defs".to_owned(),
            defs.display().to_string(),
        ];
        for participant in &participants {
            args.extend([
                "--participant".to_owned(),
                format!(
                    "{}={}",
                    participant.service.participant(),
                    participant.uri()
                ),
            ]);
        }
        let sagad = SagadProcess::start(&args, &logs).await?;
        let mut participants = participants.into_iter();
        let (Some(order), Some(payment), Some(shipping)) = (
            participants.next(),
            participants.next(),
            participants.next(),
        ) else {
            bail!("three participants were started");
        };
        Ok(Self {
            sagad,
            order,
            payment,
            shipping,
            databases,
            logs,
        })
    }

    /// sagad's address for `sagactl --server`.
    pub fn server(&self) -> String {
        format!("http://{}", self.sagad.addr)
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

    /// Every idempotency key the participant recorded, read from its database.
    pub async fn ledger(&self, service: Service) -> anyhow::Result<Vec<LedgerEntry>> {
        let url = self
            .databases
            .iter()
            .find(|(owner, _)| *owner == Some(service))
            .map(|(_, database)| database.url())
            .context("no database for that participant")?;
        let mut conn = PgConnection::connect(&url).await?;
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

    /// Stops sagad and the participants and drops the four databases.
    async fn shut_down(mut self) -> anyhow::Result<()> {
        self.sagad.kill().await?;
        self.order.kill().await?;
        self.payment.kill().await?;
        self.shipping.kill().await?;
        for (_, database) in &mut self.databases {
            database.drop_now().await?;
        }
        Ok(())
    }
}
