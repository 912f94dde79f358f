//! Puts the rooms together: definitions, store, writer, engine, the gRPC server with health
//! and reflection, and the HTTP server (metrics, health). The binary adds the process concerns
//! (flags, logging, the metrics recorder, signals); tests call [`serve`] in-process.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use futures::{Stream, StreamExt};
use sagad_proto::v1::saga_orchestrator_server::SagaOrchestratorServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

use crate::api::Api;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::definition::DefinitionSet;
use crate::engine::{Engine, LeaseTiming, Participants};
use crate::explorer::EngineSource;
use crate::http::Readiness;
use crate::limits::Limits;
use crate::store::{Store, Writer};
use crate::telemetry::{ActivityGauges, Metrics};
use sagad_tls::{ClientTlsFiles, ServerTls};

/// How often the metrics' upkeep and the sample of the sagas in the database run.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// The HTTP side of a daemon: where it listens and the metrics page it renders.
pub struct HttpEndpoint {
    pub listener: TcpListener,
    pub metrics: Metrics,
}

/// What the daemon is made of, read and checked before it touches the network.
pub struct Checked {
    pub definitions: DefinitionSet,
    pub participants: Participants,
    pub auth: Authenticator,
    /// The gRPC server's TLS; `None`: plaintext.
    pub tls: Option<ServerTls>,
}

/// Checks what can be checked without the network: flags, definitions, participant
/// addresses and the token file.
pub fn check(config: &Config) -> anyhow::Result<Checked> {
    config.validate().map_err(anyhow::Error::msg)?;
    let definitions = DefinitionSet::load_dir(&config.defs)?;
    let addresses = config.participant_addresses().map_err(anyhow::Error::msg)?;
    definitions.check_participants(&addresses.keys().cloned().collect())?;
    let participant_tls = config.participant_tls_files().client_config()?;
    let participants = Participants::new(
        &addresses,
        config.participant_concurrency as usize,
        &participant_tls,
    )?;
    let tls = config.server_tls_files().map(ServerTls::load).transpose()?;
    let auth = match &config.auth_tokens {
        Some(path) => Authenticator::from_file(path)
            .map_err(|error| anyhow::anyhow!("--auth-tokens {error}"))?,
        None => Authenticator::off(),
    };
    Ok(Checked {
        definitions,
        participants,
        auth,
        tls,
    })
}

/// Runs sagad on `listener` (gRPC) and `http` until `shutdown` resolves, then drains
/// gracefully. The HTTP server answers from the start, `/readyz` with 503 until the engine runs.
/// Each item of `reloads` (SIGHUP, in the binary) re-reads the token file and the
/// certificates; one that cannot be read leaves those in force and says why in the log.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    http: Option<HttpEndpoint>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reloads: impl Stream<Item = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Checked {
        definitions,
        participants,
        auth,
        tls,
    } = check(&config)?;
    let stop_reloading = CancellationToken::new();
    let _stop_reloading_on_return = stop_reloading.clone().drop_guard();
    tokio::spawn(reload_on(
        reloads,
        Reloadable {
            auth: auth.clone(),
            tls: tls.clone(),
            participants: participants.clone(),
            participant_tls: config.participant_tls_files(),
        },
        stop_reloading.clone(),
    ));
    crate::telemetry::preset(&definitions);
    let gauges = ActivityGauges::new(&definitions);
    let ready = ReadySwitch::default();
    // One share per client, whether it watches over gRPC or in the explorer.
    let limits = Limits::new(config.start_rate, config.max_watches_per_client);
    let stop_http = CancellationToken::new();
    // Whatever way this function ends, the HTTP server ends with it.
    let _stop_http_on_return = stop_http.clone().drop_guard();
    let (http_task, metrics) = match http {
        Some(HttpEndpoint { listener, metrics }) => {
            tracing::info!(http_listen = %listener.local_addr()?, "HTTP is serving");
            let explorer =
                crate::explorer::router(ready.engine_source(), auth.clone(), limits.clone());
            let router = crate::http::router(metrics.clone(), ready.readiness(), explorer);
            let task = tokio::spawn(crate::http::serve(
                listener,
                router,
                stop_http.clone().cancelled_owned(),
            ));
            (Some(task), Some(metrics))
        }
        None => (None, None),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    let store = Store::connect(&config.database_url, config.database_wait)
        .await
        .context("--database-url")?;
    let (writer, writer_task) = Writer::spawn(store.clone());
    let timing = LeaseTiming {
        ttl: config.lease_ttl,
        poll_interval: config.poll_interval,
    };
    let (engine, resumed) = Engine::start(
        store.clone(),
        writer,
        definitions,
        participants,
        timing,
        config.stuck_after,
    )
    .await?;
    ready.set(engine.clone());
    let stop_sampling = CancellationToken::new();
    let _stop_sampling_on_return = stop_sampling.clone().drop_guard();
    // Without an HTTP server nobody reads the metrics: no sampling either.
    let sampler = metrics.map(|metrics| {
        tokio::spawn(sample(
            engine.clone(),
            metrics,
            gauges,
            stop_sampling.clone(),
        ))
    });
    health.set_serving::<SagaOrchestratorServer<Api>>().await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sagad_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sagad_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    tracing::info!(
        listen = %listener.local_addr()?,
        resumed,
        tls = tls.is_some(),
        tokens = auth.is_on(),
        "sagad is serving"
    );

    let stop_serving = CancellationToken::new();
    let router = tonic::transport::Server::builder()
        // Clients whose deadlines pass reset their streams, often before the server took
        // them up; h2's default of 20 such streams then ends the whole connection, and every
        // other request on it. The limit stays (it guards against rapid-reset floods), higher.
        .http2_max_pending_accept_reset_streams(Some(1024))
        .max_concurrent_streams(Some(config.max_concurrent_streams))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(
            SagaOrchestratorServer::new(Api::new(engine.clone(), auth.clone(), limits))
                .max_decoding_message_size(config.max_request_bytes as usize),
            crate::api::authenticate(auth.clone()),
        ));
    let stopped = stop_serving.clone().cancelled_owned();
    let mut server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match &tls {
            Some(tls) => {
                Box::pin(router.serve_with_incoming_shutdown(tls.incoming(listener), stopped))
            }
            // Small replies go out at once: without nodelay, Nagle's algorithm holds them back
            // for the peer's delayed ACK (tens of milliseconds per call).
            None => Box::pin(router.serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                stopped,
            )),
        };
    tokio::select! {
        served = &mut server => {
            // The server ended without being asked: stop the rest too.
            ready.clear();
            stop_sampling.cancel();
            engine.shutdown(Duration::ZERO).await;
            return served.context("--listen");
        }
        () = shutdown => {}
    }

    // Everything below ends within the grace period, whatever is stuck.
    let deadline = tokio::time::Instant::now() + config.shutdown_grace;
    tracing::info!("shutting down: no new sagas; finishing calls in flight");
    ready.stop();
    health
        .set_not_serving::<SagaOrchestratorServer<Api>>()
        .await;
    // Long-polls end now, so the server's drain does not wait for them, while the engine
    // lets the calls in flight finish.
    engine.stop_taking_work();
    stop_serving.cancel();
    let (served, drained) = tokio::join!(
        tokio::time::timeout_at(deadline, &mut server),
        tokio::time::timeout_at(deadline, engine.shutdown(config.shutdown_grace)),
    );
    match served {
        Ok(served) => served.context("--listen")?,
        Err(_) => tracing::warn!("requests still open at the end of the grace period are dropped"),
    }
    if drained.is_err() {
        tracing::warn!(
            "the engine did not stop within the grace period; its sagas are taken over once the lease expires"
        );
    }
    stop_sampling.cancel();
    if let Some(sampler) = sampler {
        let _ = tokio::time::timeout_at(deadline, sampler).await;
    }
    // The HTTP server answers until the engine has drained (`/readyz` with 503 by now).
    ready.clear();
    stop_http.cancel();
    if let Some(task) = http_task {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "the HTTP server failed"),
            Ok(Err(error)) => tracing::warn!(%error, "the HTTP server's task failed"),
            Err(_) => tracing::warn!(
                "HTTP requests still open at the end of the grace period are dropped"
            ),
        }
    }
    drop(engine);
    // The writer ends once the last handle is gone.
    let _ = tokio::time::timeout_at(deadline, writer_task).await;
    let _ = tokio::time::timeout_at(deadline, store.close()).await;
    tracing::info!("sagad stopped");
    Ok(())
}

/// What SIGHUP reads again.
struct Reloadable {
    auth: Authenticator,
    tls: Option<ServerTls>,
    participants: Participants,
    participant_tls: ClientTlsFiles,
}

/// Re-reads what `reloads` asks for until `stop`.
async fn reload_on(
    reloads: impl Stream<Item = ()> + Send + 'static,
    Reloadable {
        auth,
        tls,
        participants,
        participant_tls,
    }: Reloadable,
    stop: CancellationToken,
) {
    let mut reloads = std::pin::pin!(reloads);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            next = reloads.next() => if next.is_none() { return },
        }
        if auth.is_on() {
            match auth.reload() {
                Ok(tokens) => tracing::info!(tokens, "the token file is read again"),
                Err(error) => {
                    tracing::error!(%error, "the token file cannot be read; the tokens in force stay");
                }
            }
        }
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(()) => tracing::info!("the TLS files are read again; new connections use them"),
                Err(error) => {
                    tracing::error!(%error, "the TLS files cannot be read; the ones in force stay");
                }
            }
        }
        let renewed = participant_tls
            .client_config()
            .map_err(anyhow::Error::from)
            .and_then(|config| Ok(participants.use_tls(&config)?));
        match renewed {
            Ok(0) => {}
            Ok(participants) => tracing::info!(
                participants,
                "the participants' TLS files are read again; new connections use them"
            ),
            Err(error) => tracing::error!(
                error = %format!("{error:#}"),
                "the participants' TLS files cannot be read; the ones in force stay"
            ),
        }
    }
}

/// What `/readyz` reports: the engine's own readiness once it runs, false before, and false
/// from the start of a shutdown on. It holds the engine only until [`clear`](Self::clear), so
/// that a request still open cannot keep the engine (and the writer) alive.
#[derive(Clone, Default)]
struct ReadySwitch {
    engine: Arc<RwLock<Option<Engine>>>,
    stopping: Arc<AtomicBool>,
}

impl ReadySwitch {
    fn set(&self, engine: Engine) {
        if let Ok(mut slot) = self.engine.write() {
            *slot = Some(engine);
        }
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.stop();
        if let Ok(mut slot) = self.engine.write() {
            *slot = None;
        }
    }

    /// The engine for the explorer's pages, while it runs.
    fn engine_source(&self) -> EngineSource {
        let switch = self.clone();
        Arc::new(move || {
            if switch.stopping.load(Ordering::SeqCst) {
                return None;
            }
            switch.engine.read().ok().and_then(|slot| slot.clone())
        })
    }

    fn readiness(&self) -> Readiness {
        let switch = self.clone();
        Arc::new(move || {
            !switch.stopping.load(Ordering::SeqCst)
                && switch
                    .engine
                    .read()
                    .is_ok_and(|slot| slot.as_ref().is_some_and(Engine::ready))
        })
    }
}

/// Every [`SAMPLE_EVERY`] until `stop`: the metrics' upkeep, and one sample of the sagas in
/// the database for the gauges. A sample that fails (the database is down) leaves the gauges
/// as they were; the next one tries again.
async fn sample(
    engine: Engine,
    metrics: Metrics,
    mut gauges: ActivityGauges,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        metrics.upkeep();
        let sampled = tokio::select! {
            () = stop.cancelled() => return,
            sampled = engine.sample_activity() => sampled,
        };
        match sampled {
            Ok(activity) => {
                gauges.record(&activity.active, activity.stuck, activity.oldest_active_age);
            }
            Err(error) => tracing::debug!(%error, "cannot sample the sagas in the database"),
        }
    }
}
