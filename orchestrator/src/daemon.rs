//! Puts the rooms together: definitions, store, writer, engine, and the gRPC server with health
//! and reflection. The binary adds the process concerns (flags, logging, metrics, signals);
//! tests call [`serve`] in-process.

use std::future::Future;

use anyhow::Context;
use sagad_proto::v1::saga_orchestrator_server::SagaOrchestratorServer;
use tokio::net::TcpListener;
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
    let (engine, resumed) =
        Engine::start(store.clone(), writer, definitions, participants, timing).await?;
    health.set_serving::<SagaOrchestratorServer<Api>>().await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sagad_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sagad_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    tracing::info!(listen = %listener.local_addr()?, resumed, "sagad is serving");

    let shutdown_health = health.clone();
    // Small replies go out at once: without nodelay, Nagle's algorithm holds them back for
    // the peer's delayed ACK (tens of milliseconds per call).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(SagaOrchestratorServer::new(Api::new(engine.clone())))
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            tracing::info!("shutting down: no new sagas; finishing calls in flight");
            shutdown_health
                .set_not_serving::<SagaOrchestratorServer<Api>>()
                .await;
        })
        .await?;

    engine.shutdown(config.shutdown_grace).await;
    drop(engine);
    // The writer ends once the last handle is gone; a driver stuck past the grace period must
    // not hold the exit.
    let _ = tokio::time::timeout(config.shutdown_grace, writer_task).await;
    store.close().await;
    tracing::info!("sagad stopped");
    Ok(())
}
