//! The sagad daemon: flags, logging, metrics and signals around [`sagad::daemon::serve`].

use std::process::ExitCode;

use clap::Parser;
use sagad::config::Config;
use sagad::daemon::HttpEndpoint;
use tokio::net::TcpListener;

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
            let reason: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.is_empty() && !line.starts_with("Usage:"))
                .map(str::trim)
                .collect();
            eprintln!("sagad: {}", reason.join(" "));
            return ExitCode::from(2);
        }
    };
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
    // The exporter's gRPC channel lives on the runtime.
    let telemetry = {
        let _runtime = runtime.enter();
        match sagad_telemetry::Telemetry::init(config.log_format, "sagad") {
            Ok(telemetry) => telemetry,
            Err(error) => {
                eprintln!("sagad: {}", one_line(&error));
                return ExitCode::from(2);
            }
        }
    };
    let outcome = runtime.block_on(run(config));
    // The last spans leave before the process does.
    if let Err(error) = telemetry.shutdown() {
        eprintln!("sagad: exporting the last spans: {error}");
    }
    match outcome {
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
    // Definitions and flags first: a bad one stops the daemon before it touches the network.
    sagad::daemon::check(&config)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|error| anyhow::anyhow!("--listen {}: {error}", config.listen))?;
    let http_listen = config.http_listen().map_err(anyhow::Error::msg)?;
    let http_listener = TcpListener::bind(http_listen)
        .await
        .map_err(|error| anyhow::anyhow!("--http-listen {http_listen}: {error}"))?;
    let metrics = sagad::telemetry::install_recorder()
        .map_err(|error| anyhow::anyhow!("the metrics recorder: {error}"))?;
    let http = HttpEndpoint {
        listener: http_listener,
        metrics,
    };
    let reloads = hangups().map_err(|error| anyhow::anyhow!("listening for SIGHUP: {error}"))?;
    sagad::daemon::serve(config, listener, Some(http), shutdown_signal(), reloads).await
}

/// One item per SIGHUP: re-read the token file and the certificates.
fn hangups() -> std::io::Result<impl futures::Stream<Item = ()> + Send + 'static> {
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(futures::stream::unfold(hangup, |mut hangup| async move {
        hangup.recv().await.map(|()| ((), hangup))
    }))
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
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
