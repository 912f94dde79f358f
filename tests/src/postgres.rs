//! A private Postgres cluster for one test, which it may stop and start at will without
//! disturbing the shared server the other tests use. The binaries are Debian's
//! (`/usr/lib/postgresql/<version>/bin`); as root they run as the `postgres` OS user, since
//! Postgres refuses to run as root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, bail, ensure};

/// A cluster in a temp folder of its own, listening on 127.0.0.1 with trust auth; stopped and
/// removed on drop.
pub struct PrivateCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// Run the binaries as the `postgres` OS user (we are root).
    as_postgres: bool,
}

impl PrivateCluster {
    /// Creates the cluster with initdb and starts it on a free port.
    pub async fn start() -> anyhow::Result<Self> {
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
    /// connections. fsync is off: the test needs no durability against a crash of the machine.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
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

    fn data_dir(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Runs one of the Postgres binaries to its end.
    async fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let output = tokio::process::Command::from(self.command(program, args))
            .output()
            .await
            .with_context(|| format!("running {program}"))?;
        check(program, &output)
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
