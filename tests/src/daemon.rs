//! sagad for tests: in-process (fast, for engine and API tests) or as the real binary in a
//! process of its own (for crashes with SIGKILL, flags and exit codes).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser as _;
use sagad::config::Config;
use sagad_proto::v1::saga_orchestrator_client::SagaOrchestratorClient;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::ClientTlsConfig;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::Client;

/// Builds the daemon's config from flags exactly as the binary parses them.
fn parse_config(args: &[String]) -> anyhow::Result<Config> {
    let argv = std::iter::once("sagad".to_owned()).chain(args.iter().cloned());
    Ok(Config::try_parse_from(argv)?)
}

/// sagad running inside the test process.
pub struct TestDaemon {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestDaemon {
    /// Starts sagad with these flags (`--listen` is chosen here) and waits until it serves.
    pub async fn start(args: &[String]) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut args = args.to_vec();
        args.extend(["--listen".to_owned(), addr.to_string()]);
        let config = parse_config(&args)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(sagad::daemon::serve(
            config,
            listener,
            None,
            async {
                let _ = stopped.await;
            },
            tokio_stream::pending(),
        ));
        let mut daemon = Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        };
        daemon.wait_ready().await?;
        Ok(daemon)
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(SagaOrchestratorClient::connect(format!("http://{}", self.addr)).await?)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(task) = &self.task
                && task.is_finished()
                && let Some(task) = self.task.take()
            {
                task.await??;
                bail!("sagad stopped before serving");
            }
            if serving(self.addr).await {
                return Ok(());
            }
            if tokio::time::Instant::now() > until {
                bail!("sagad did not serve within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Graceful shutdown, as on SIGTERM.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The health service name sagad reports SERVING once its database is reachable and migrated.
const SAGAD_SERVICE: &str = "sagad.v1.SagaOrchestrator";

/// Is a sagad serving at `addr`? Its health service says so (any other gRPC server would
/// answer a plain request too, or not know the service).
pub async fn serving(addr: SocketAddr) -> bool {
    serving_over(addr, None).await
}

/// [`serving`], over TLS when `tls` is given.
pub async fn serving_over(addr: SocketAddr, tls: Option<&ClientTlsConfig>) -> bool {
    let Ok(channel) = crate::tls::endpoint(addr, tls) else {
        return false;
    };
    let Ok(channel) = channel.connect().await else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: SAGAD_SERVICE.to_owned(),
        })
        .await
        .is_ok_and(|reply| reply.into_inner().status == ServingStatus::Serving as i32)
}

/// The workspace's built binary: from `SAGAD_BIN_DIR` if set, else from the profile these
/// tests were built with (target/debug for `cargo test`), so a release build left by the demo
/// can never stand in for a stale one. The test command builds the binaries first.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var("SAGAD_BIN_DIR") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => {
            let target = std::env::var("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| crate::repo_root().join("target"));
            let profile = if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            };
            target.join(profile)
        }
    };
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "no {name} binary at {}: build it first with `cargo build --workspace --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// The real sagad binary, running in a process of its own.
pub struct SagadProcess {
    /// The gRPC address it bound.
    pub addr: SocketAddr,
    /// The HTTP address it bound (`/metrics`, `/healthz`, `/readyz`).
    pub http_addr: SocketAddr,
    child: Child,
    pub log: PathBuf,
}

/// The environment variables sagad reads its addresses and log format from.
const SAGAD_ENV: [&str; 4] = [
    "SAGAD_LISTEN",
    "SAGAD_HTTP_LISTEN",
    "SAGAD_METRICS_LISTEN",
    "SAGAD_LOG_FORMAT",
];

/// Numbers the log files of the sagad processes a test binary starts.
static STARTED: AtomicU32 = AtomicU32::new(0);

impl SagadProcess {
    /// Starts sagad with these flags plus `--listen 127.0.0.1:0` and `--http-listen
    /// 127.0.0.1:0` (it binds free ports and logs them), and waits until it serves. Its stderr
    /// goes to a log file in `log_dir`.
    pub async fn start(args: &[String], log_dir: &Path) -> anyhow::Result<Self> {
        let mut all = args.to_vec();
        all.extend(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"].map(str::to_owned));
        Self::start_with(&all, &[], log_dir).await
    }

    /// Starts sagad with exactly these flags and environment variables (which must make it
    /// bind free ports), and waits until it serves; sagad's other variables are not passed on
    /// from the test's environment. The addresses it bound are read from its log, in either
    /// log format.
    pub async fn start_with(
        args: &[String],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_over(args, env, log_dir, None).await
    }

    /// [`start_with`](Self::start_with) for a sagad serving TLS: `tls` is how the wait for it
    /// connects.
    pub async fn start_over(
        args: &[String],
        env: &[(&str, &str)],
        log_dir: &Path,
        tls: Option<&ClientTlsConfig>,
    ) -> anyhow::Result<Self> {
        let number = STARTED.fetch_add(1, Ordering::Relaxed);
        let log = log_dir.join(format!("sagad-{}-{number}.log", std::process::id()));
        let stderr = std::fs::File::create(&log)?;
        let mut command = Command::new(binary("sagad")?);
        for name in SAGAD_ENV {
            command.env_remove(name);
        }
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("starting sagad")?;
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        let (addr, http_addr) = loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "sagad exited with {status} before serving: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let (Some(addr), Some(http_addr)) = (
                logged_addr(&text, "sagad is serving", "listen"),
                logged_addr(&text, "HTTP is serving", "http_listen"),
            ) {
                break (addr, http_addr);
            }
            if tokio::time::Instant::now() > until {
                bail!("sagad did not log its addresses within 60 s: {text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let process = Self {
            addr,
            http_addr,
            child,
            log,
        };
        while !serving_over(addr, tls).await {
            if tokio::time::Instant::now() > until {
                bail!("sagad's health service did not say SERVING within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(process)
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(SagaOrchestratorClient::connect(format!("http://{}", self.addr)).await?)
    }

    /// The process id, for signals the tests send themselves (SIGSTOP, SIGCONT).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The exit status if the process has ended: a test that needs the same sagad throughout
    /// checks it never exited.
    pub fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM, then the exit status.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().context("sagad has already exited")?;
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(self.child.wait().await?)
    }
}

/// Runs the sagad binary to completion (for flags and definitions it must refuse) and returns
/// its exit status and stderr.
pub async fn run_to_exit(args: &[String]) -> anyhow::Result<(std::process::ExitStatus, String)> {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(binary("sagad")?)
            .args(args)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .context("sagad did not exit within 60 s")??;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// The address in field `field` of the first log line whose message is `message`: text lines
/// (`… message field=ADDR …`) and JSON lines (`{"message": …, "field": "ADDR", …}`) alike.
pub fn logged_addr(log: &str, message: &str, field: &str) -> Option<SocketAddr> {
    log.lines().find_map(|line| {
        if let Ok(serde_json::Value::Object(object)) = serde_json::from_str(line) {
            return (object.get("message")?.as_str()? == message)
                .then(|| object.get(field)?.as_str()?.parse().ok())
                .flatten();
        }
        if !line.contains(message) {
            return None;
        }
        let prefix = format!("{field}=");
        line.split_whitespace()
            .find_map(|token| token.strip_prefix(&prefix)?.parse().ok())
    })
}
