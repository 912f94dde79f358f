//! A private Postgres cluster for one test, which it may stop and start at will without
//! disturbing the shared server the other tests use. The binaries are Debian's
//! (`/usr/lib/postgresql/<version>/bin`); as root they run as the `postgres` OS user, since
//! Postgres refuses to run as root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail, ensure};

use crate::signals;

/// A cluster in a temp folder of its own, listening on 127.0.0.1 with trust auth; stopped and
/// removed on drop.
pub struct PrivateCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// Run the binaries as the `postgres` OS user (we are root).
    as_postgres: bool,
    /// Every process of the cluster is SIGSTOPped: drop resumes them before stopping it.
    frozen: AtomicBool,
    /// Whether it syncs its writes to disk (`fsync`), as a production server does.
    durable: bool,
    /// More server settings, `name=value`, given at every start.
    settings: Vec<String>,
}

impl PrivateCluster {
    /// Creates the cluster with initdb and starts it on a free port, with fsync off: a test
    /// needs no durability against a crash of the machine.
    pub async fn start() -> anyhow::Result<Self> {
        Self::create(false, &[]).await
    }

    /// Creates the cluster and starts it as a production server runs: fsync and synchronous
    /// commit on, what a benchmark must pay for.
    pub async fn start_durable() -> anyhow::Result<Self> {
        Self::create(true, &[]).await
    }

    /// Like [`PrivateCluster::start`], with more server settings (`name=value`), such as the
    /// `shared_preload_libraries` the shared server cannot change for one test.
    pub async fn start_with(settings: &[&str]) -> anyhow::Result<Self> {
        Self::create(false, settings).await
    }

    async fn create(durable: bool, settings: &[&str]) -> anyhow::Result<Self> {
        let bin = postgres_bin()?;
        let dir =
            std::env::temp_dir().join(format!("sagad-test-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let as_postgres = is_root(&dir)?;
        let cluster = Self {
            dir,
            bin,
            port: crate::free_port()?,
            as_postgres,
            frozen: AtomicBool::new(false),
            durable,
            settings: settings
                .iter()
                .map(|setting| (*setting).to_owned())
                .collect(),
        };
        if as_postgres {
            let chown = tokio::process::Command::new("chown")
                .arg("postgres:")
                .arg(&cluster.dir)
                .output()
                .await?;
            check("chown", &chown)?;
        }
        let data = cluster.data_dir();
        cluster
            .run(
                "initdb",
                &[
                    "-D",
                    &data,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ],
            )
            .await?;
        cluster.start_again().await?;
        Ok(cluster)
    }

    /// `postgres://postgres@127.0.0.1:<port>`, without a database name.
    pub fn server_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// `pg_ctl stop -m fast`: every session is ended at once, the way a restart looks to a client.
    pub async fn stop(&self) -> anyhow::Result<()> {
        self.run(
            "pg_ctl",
            &["stop", "-D", &self.data_dir(), "-m", "fast", "-w"],
        )
        .await
    }

    /// Starts the cluster (again) on the same port and data folder, and waits until it accepts
    /// connections.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        let fsync = if self.durable { "on" } else { "off" };
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={fsync}",
            self.port,
            self.dir.display()
        );
        for setting in &self.settings {
            options.push_str(" -c ");
            options.push_str(setting);
        }
        let log = self.dir.join("postgres.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "start",
                "-D",
                &self.data_dir(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "-t",
                "60",
            ],
        )
        .await
    }

    /// SIGSTOP to every process of the cluster, returning once the kernel shows each stopped:
    /// the server neither answers nor closes anything, its sockets stay open and new
    /// connections wait in the listen backlog, the way a hung database host looks to a client.
    /// The postmaster is stopped first, so that it forks no backend the listing would miss.
    pub async fn freeze(&self) -> anyhow::Result<()> {
        let postmaster = self.postmaster_pid()?;
        self.frozen.store(true, Ordering::SeqCst);
        signals::send(postmaster, "STOP").await?;
        signals::wait_state(postmaster, |state| state == 'T').await?;
        for pid in signals::children(postmaster)? {
            if let Err(error) = signals::send(pid, "STOP").await {
                // A backend that ended since the listing is no longer there to stop.
                if signals::state(pid).is_err() {
                    continue;
                }
                return Err(error);
            }
            signals::wait_state_or_gone(pid, |state| state == 'T').await?;
        }
        Ok(())
    }

    /// SIGCONT to every process of the cluster, returning once the kernel shows none stopped.
    pub async fn thaw(&self) -> anyhow::Result<()> {
        let postmaster = self.postmaster_pid()?;
        let mut pids = signals::children(postmaster)?;
        pids.push(postmaster);
        for pid in &pids {
            if let Err(error) = signals::send(*pid, "CONT").await
                && signals::state(*pid).is_ok()
            {
                return Err(error);
            }
        }
        for pid in pids {
            signals::wait_state_or_gone(pid, |state| state != 'T').await?;
        }
        self.frozen.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Runs one of the cluster's Postgres tools (e.g. `pgbench`, `psql`) to its end, returning
    /// what it printed; failing if it did.
    pub async fn tool(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let output = tokio::process::Command::from(self.command(program, args))
            .output()
            .await
            .with_context(|| format!("running {program}"))?;
        check(program, &output)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The same server through its Unix socket (in the cluster's folder), without a database
    /// name: no TCP between a client on this machine and the server.
    pub fn socket_url(&self) -> String {
        let folder = self
            .dir
            .display()
            .to_string()
            .replace('%', "%25")
            .replace('/', "%2F");
        format!("postgres://postgres@{folder}:{}", self.port)
    }

    /// The port it listens on at 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's process id: the first line of `postmaster.pid` in the data folder.
    pub fn postmaster_pid(&self) -> anyhow::Result<u32> {
        let path = self.dir.join("data").join("postmaster.pid");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (is the cluster running?)", path.display()))?;
        text.lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .with_context(|| format!("no process id on the first line of {}", path.display()))
    }

    fn data_dir(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Runs one of the Postgres binaries to its end.
    async fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        self.tool(program, args).await.map(drop)
    }

    /// One of the Postgres binaries, as the `postgres` OS user when we are root.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&path);
            command
        } else {
            Command::new(&path)
        };
        // The postgres user may not be allowed into the test's working folder.
        command
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        command
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // A frozen postmaster would never act on pg_ctl's stop request.
        if self.frozen.load(Ordering::SeqCst)
            && let Ok(postmaster) = self.postmaster_pid()
        {
            let mut pids = signals::children(postmaster).unwrap_or_default();
            pids.push(postmaster);
            let _ = Command::new("kill")
                .arg("-CONT")
                .args(pids.iter().map(u32::to_string))
                .status();
        }
        let _ = self
            .command(
                "pg_ctl",
                &["stop", "-D", &self.data_dir(), "-m", "immediate", "-w"],
            )
            .output();
        // A panicking test keeps the server's log for a look.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn check(program: &str, output: &Output) -> anyhow::Result<()> {
    ensure!(
        output.status.success(),
        "{program} failed with {}: {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Whether we run as root: the folder we just made belongs to uid 0.
fn is_root(dir: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(dir)?.uid() == 0)
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has initdb and pg_ctl.
fn postgres_bin() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let bin = entry.path().join("bin");
            let version = entry.file_name().to_string_lossy().parse::<u32>();
            if let Ok(version) = version
                && bin.join("initdb").exists()
                && bin.join("pg_ctl").exists()
            {
                found.push((version, bin));
            }
        }
    }
    match found.into_iter().max() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no initdb and pg_ctl under {}/<version>/bin: install Debian's postgresql package",
            root.display()
        ),
    }
}
