//! The sagad daemon: loads the definitions, connects to Postgres, resumes unfinished sagas, and
//! serves the gRPC API until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use metrics_exporter_prometheus::PrometheusBuilder;
use sagad::api::Api;
use sagad::config::Config;
use sagad::definition::DefinitionSet;
use sagad::engine::{Engine, Participants};
use sagad::store::{Store, Writer};
use sagad_proto::v1::saga_orchestrator_server::SagaOrchestratorServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(config) => config,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                let _ = error.print();
                return ExitCode::SUCCESS;
            }
            // One line: the operator reads the reason, not the usage.
            let rendered = error.render().to_string();
            eprintln!(
                "sagad: {}",
                rendered.lines().next().unwrap_or("invalid arguments")
            );
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sagad: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sagad: {}", one_line(&format!("{error:#}")));
            ExitCode::FAILURE
        }
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn run(config: Config) -> anyhow::Result<()> {
    let definitions = DefinitionSet::load_dir(&config.defs)?;
    let addresses = config.participant_addresses().map_err(anyhow::Error::msg)?;
    definitions.check_participants(&addresses.keys().cloned().collect())?;
    let participants = Participants::new(&addresses, config.participant_concurrency as usize)?;

    PrometheusBuilder::new()
        .with_http_listener(config.metrics_listen)
        .install()
        .map_err(|error| anyhow::anyhow!("--metrics-listen {}: {error}", config.metrics_listen))?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|error| anyhow::anyhow!("--listen {}: {error}", config.listen))?;

    let (health, health_service) = tonic_health::server::health_reporter();
    let store = Store::connect(&config.database_url, config.database_wait)
        .await
        .map_err(|error| anyhow::anyhow!("--database-url: {error}"))?;
    let (writer, writer_task) = Writer::spawn(store.clone());
    let engine = Engine::new(store.clone(), writer, definitions, participants);
    let resumed = engine.recover().await?;
    health.set_serving::<SagaOrchestratorServer<Api>>().await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sagad_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sagad_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    tracing::info!(
        listen = %config.listen,
        metrics = %config.metrics_listen,
        resumed,
        "sagad is serving"
    );

    let shutdown_health = health.clone();
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(SagaOrchestratorServer::new(Api::new(engine.clone())))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown_signal().await;
            tracing::info!("shutting down: no new sagas; finishing calls in flight");
            shutdown_health
                .set_not_serving::<SagaOrchestratorServer<Api>>()
                .await;
        })
        .await?;

    engine.shutdown(config.shutdown_grace).await;
    drop(engine);
    // The writer ends once the last handle is gone; a driver stuck past the grace period
    // must not hold the exit.
    let _ = tokio::time::timeout(config.shutdown_grace, writer_task).await;
    store.close().await;
    tracing::info!("sagad stopped");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
