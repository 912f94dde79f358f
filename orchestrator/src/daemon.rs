//! Puts the rooms together: definitions, store, writer, engine, and the gRPC server with health
//! and reflection. The binary adds the process concerns (flags, logging, metrics, signals);
//! tests call [`serve`] in-process.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use sagad_proto::v1::saga_orchestrator_server::SagaOrchestratorServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

use crate::api::Api;
use crate::config::Config;
use crate::definition::DefinitionSet;
use crate::engine::{Engine, LeaseTiming, Participants};
use crate::store::{Store, Writer};

/// Checks what can be checked without the network: definitions and participant addresses.
pub fn check(config: &Config) -> anyhow::Result<(DefinitionSet, Participants)> {
    config.validate().map_err(anyhow::Error::msg)?;
    let definitions = DefinitionSet::load_dir(&config.defs)?;
    let addresses = config.participant_addresses().map_err(anyhow::Error::msg)?;
    definitions.check_participants(&addresses.keys().cloned().collect())?;
    let participants = Participants::new(&addresses, config.participant_concurrency as usize)?;
    Ok((definitions, participants))
}

/// Runs sagad on `listener` until `shutdown` resolves, then drains gracefully.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (definitions, participants) = check(&config)?;
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
    health.set_serving::<SagaOrchestratorServer<Api>>().await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sagad_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sagad_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    tracing::info!(listen = %listener.local_addr()?, resumed, "sagad is serving");

    // Small replies go out at once: without nodelay, Nagle's algorithm holds them back for
    // the peer's delayed ACK (tens of milliseconds per call).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let stop_serving = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        // Clients whose deadlines pass reset their streams, often before the server took
        // them up; h2's default of 20 such streams then ends the whole connection, and every
        // other request on it. The limit stays (it guards against rapid-reset floods), higher.
        .http2_max_pending_accept_reset_streams(Some(1024))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(SagaOrchestratorServer::new(Api::new(engine.clone())))
        .serve_with_incoming_shutdown(incoming, stop_serving.clone().cancelled_owned());
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => {
            // The server ended without being asked: stop the rest too.
            engine.shutdown(Duration::ZERO).await;
            return served.context("--listen");
        }
        () = shutdown => {}
    }

    // Everything below ends within the grace period, whatever is stuck.
    let deadline = tokio::time::Instant::now() + config.shutdown_grace;
    tracing::info!("shutting down: no new sagas; finishing calls in flight");
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
    drop(engine);
    // The writer ends once the last handle is gone.
    let _ = tokio::time::timeout_at(deadline, writer_task).await;
    let _ = tokio::time::timeout_at(deadline, store.close()).await;
    tracing::info!("sagad stopped");
    Ok(())
}
