//! A headless Chromium driven over WebDriver, for the explorer's end-to-end tests. Each
//! [`Browser`] runs its own `chromedriver` on a free loopback port and its own Chromium with a
//! fresh profile, so tests run in parallel and never share cookies or storage. Debian's packages
//! provide both programs (`scripts/ensure-chromium.sh` installs them); the variables
//! `SAGAD_CHROMIUM` and `SAGAD_CHROMEDRIVER` point elsewhere.
//!
//! The helpers poll rather than sleep: pages update themselves from JavaScript, so a test waits,
//! within a bound, for what it wants to see, and a timeout says what was seen last.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use fantoccini::elements::Element;
use fantoccini::{ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Debian's Chromium: a wrapper script that reads `/etc/chromium.d`, as chromedriver expects.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's chromedriver (package `chromium-driver`): always Chromium's own version.
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long chromedriver may take to listen, and then Chromium to start: generous, for a
/// loaded 2-core machine running test binaries in parallel.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the wait helpers look again.
const POLL: Duration = Duration::from_millis(100);

/// Numbers the log files and profiles of the browsers one test binary starts.
static STARTED: AtomicUsize = AtomicUsize::new(0);

/// A headless Chromium session and the chromedriver serving it. Dropping it kills chromedriver
/// and Chromium with it (a failed test leaves no browser behind); [`Browser::close`] ends the
/// session cleanly first and reports errors.
pub struct Browser {
    client: fantoccini::Client,
    driver: Driver,
}

/// The chromedriver process, the Chromium it starts and the profile they use.
struct Driver {
    child: Child,
    /// The loopback port chromedriver listens on.
    port: u16,
    /// chromedriver's process group, which Chromium's processes join too: killing chromedriver
    /// alone would leave Chromium running. `None` once killed.
    group: Option<u32>,
    log: PathBuf,
    /// Chromium's `--user-data-dir`, fresh for each browser and removed with it.
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free port (its output goes to `chromedriver-*.log` in
    /// `log_dir`), waits until it accepts connections and opens a session: headless Chromium
    /// without the sandbox (tests run as root in containers), a 1280×1000 window, no GPU, no
    /// /dev/shm (small in containers) and a fresh profile.
    pub async fn start(log_dir: &Path) -> anyhow::Result<Browser> {
        let chromium = program("SAGAD_CHROMIUM", CHROMIUM);
        let chromedriver = program("SAGAD_CHROMEDRIVER", CHROMEDRIVER);
        let id = format!(
            "{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        );
        let mut driver = Driver::spawn(&chromedriver, &id, log_dir)?;
        let url = driver.wait_listening().await?;

        let chromium = chromium
            .to_str()
            .with_context(|| format!("Chromium's path {} is not UTF-8", chromium.display()))?;
        let profile = driver.profile.to_str().with_context(|| {
            format!("the profile path {} is not UTF-8", driver.profile.display())
        })?;
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={profile}"),
                ],
            }),
        );
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(capabilities);
        let client = match tokio::time::timeout(START_TIMEOUT, builder.connect(&url)).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => {
                return Err(error).with_context(|| {
                    format!(
                        "opening a Chromium session at {url} ({chromium}); chromedriver said: {}",
                        driver.log_text()
                    )
                });
            }
            Err(_) => bail!(
                "Chromium did not start within {START_TIMEOUT:?}; chromedriver said: {}",
                driver.log_text()
            ),
        };
        Ok(Browser { client, driver })
    }

    /// The WebDriver client, for what the helpers here do not cover (`goto`, clicks, forms).
    pub fn client(&self) -> &fantoccini::Client {
        &self.client
    }

    /// Ends the session (Chromium quits) and then stops chromedriver. Dropping the browser
    /// also stops both, but reports nothing.
    pub async fn close(mut self) -> anyhow::Result<()> {
        let closed = self
            .client
            .clone()
            .close()
            .await
            .context("closing the WebDriver session");
        self.driver.stop().await;
        closed
    }

    /// Saves a screenshot of the window as `target/explorer-screenshots/<name>.png` in the
    /// workspace, where a person can look at what a test saw, and returns the file's path.
    /// `name` is a plain file name: letters, digits, `-`, `_` and `.`.
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        ensure!(
            !name.is_empty()
                && !name.starts_with('.')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "screenshot name {name:?} is not a plain file name"
        );
        let dir = crate::repo_root()
            .join("target")
            .join("explorer-screenshots");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let png = self
            .client
            .screenshot()
            .await
            .with_context(|| format!("taking screenshot {name:?}"))?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The first element matching `css`, once there is one (pages render parts of themselves
    /// from scripts); fails after `timeout`.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> anyhow::Result<Element> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(element) = self.find(css).await? {
                return Ok(element);
            }
            if Instant::now() >= deadline {
                bail!("no element matched {css:?} within {timeout:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the first element matching `css` has text containing `wanted`, looking
    /// every 100 ms; after `timeout` the error says what the element showed last, if anything
    /// matched at all.
    pub async fn wait_for_text(
        &self,
        css: &str,
        wanted: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_seen = None;
        loop {
            if let Some(element) = self.find(css).await? {
                match element.text().await {
                    Ok(text) if text.contains(wanted) => return Ok(()),
                    Ok(text) => last_seen = Some(text),
                    // Replaced by a script between the find and the read: look again.
                    Err(error) if error.is_stale_element_reference() => {}
                    Err(error) => {
                        return Err(error).with_context(|| format!("reading the text of {css:?}"));
                    }
                }
            }
            if Instant::now() >= deadline {
                let seen = last_seen.map_or_else(
                    || "no element matched".to_owned(),
                    |text| format!("the text last seen was {text:?}"),
                );
                bail!("{css:?} did not show {wanted:?} within {timeout:?}: {seen}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The rendered text of the first element matching `css`, which must exist.
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        let element = self.first(css).await?;
        element
            .text()
            .await
            .with_context(|| format!("reading the text of {css:?}"))
    }

    /// How many elements match `css` now.
    pub async fn count(&self, css: &str) -> anyhow::Result<usize> {
        let elements = self
            .client
            .find_all(Locator::Css(css))
            .await
            .with_context(|| format!("looking for {css:?}"))?;
        Ok(elements.len())
    }

    /// Attribute `name` of the first element matching `css`, which must exist; `None` when
    /// the element lacks it.
    pub async fn attr(&self, css: &str, name: &str) -> anyhow::Result<Option<String>> {
        let element = self.first(css).await?;
        element
            .attr(name)
            .await
            .with_context(|| format!("reading attribute {name:?} of {css:?}"))
    }

    /// The value of cookie `name` for the current page, `None` when it is not set. WebDriver
    /// sees HttpOnly cookies too, which page scripts cannot.
    pub async fn cookie_value(&self, name: &str) -> anyhow::Result<Option<String>> {
        match self.client.get_named_cookie(name).await {
            Ok(cookie) => Ok(Some(cookie.value().to_owned())),
            Err(error) if error.is_no_such_cookie() => Ok(None),
            Err(error) => Err(error).with_context(|| format!("reading cookie {name:?}")),
        }
    }

    /// Runs `script` as the body of a function in the page, with `args` as its `arguments`,
    /// and returns what it returns (elements, promises and all, as WebDriver converts them).
    pub async fn eval(&self, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        self.client
            .execute(script, args)
            .await
            .with_context(|| format!("running script {script:?}"))
    }

    /// Like [`Browser::eval`], for scripts that finish later (a `fetch`): the script receives
    /// one more argument, a callback, and its result is what the script passes to it, e.g.
    /// `const done = arguments[arguments.length - 1]; fetch(arguments[0]).then(r => done(r.status));`.
    /// WebDriver's script timeout (30 s) bounds the wait.
    pub async fn eval_async(&self, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        self.client
            .execute_async(script, args)
            .await
            .with_context(|| format!("running async script {script:?}"))
    }

    /// The first element matching `css` now, if any.
    async fn find(&self, css: &str) -> anyhow::Result<Option<Element>> {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => Ok(Some(element)),
            Err(error) if error.is_no_such_element() => Ok(None),
            Err(error) => Err(error).with_context(|| format!("looking for {css:?}")),
        }
    }

    /// The first element matching `css`, which must exist.
    async fn first(&self, css: &str) -> anyhow::Result<Element> {
        self.find(css)
            .await?
            .with_context(|| format!("no element matches {css:?}"))
    }
}

impl Driver {
    /// Starts `chromedriver --port=N` on a free port, in a process group of its own.
    fn spawn(chromedriver: &Path, id: &str, log_dir: &Path) -> anyhow::Result<Driver> {
        let port = crate::free_port()?;
        let log = log_dir.join(format!("chromedriver-{id}.log"));
        let stdout =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let stderr = stdout
            .try_clone()
            .with_context(|| format!("opening {} twice", log.display()))?;
        let profile = std::env::temp_dir().join(format!(
            "sagad-chromium-{id}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&profile)
            .with_context(|| format!("creating {}", profile.display()))?;
        let spawned = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&profile);
                return Err(error).with_context(|| {
                    format!(
                        "starting {} (scripts/ensure-chromium.sh installs it)",
                        chromedriver.display()
                    )
                });
            }
        };
        Ok(Driver {
            // Its process group: its own id, as `process_group(0)` asked.
            group: child.id(),
            child,
            port,
            log,
            profile,
        })
    }

    /// Waits until chromedriver accepts connections and returns its URL; fails at once when it
    /// exits, with what it logged.
    async fn wait_listening(&mut self) -> anyhow::Result<String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("checking on chromedriver")? {
                bail!("chromedriver exited ({status}): {}", self.log_text());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return Ok(format!("http://127.0.0.1:{}", self.port));
            }
            if Instant::now() >= deadline {
                bail!(
                    "chromedriver did not listen on port {} within {START_TIMEOUT:?}: {}",
                    self.port,
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What chromedriver wrote so far.
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|error| format!("(cannot read {}: {error})", self.log.display()))
    }

    /// Kills chromedriver and whatever Chromium processes are left, and reaps chromedriver.
    async fn stop(&mut self) {
        if let Some(group) = self.group.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
        }
        let _ = self.child.kill().await;
    }
}

impl Drop for Driver {
    /// Drop cannot await, so the group is killed with a blocking `kill`: a few milliseconds,
    /// and only when [`Browser::close`] was not reached (a test failed).
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The program at `default`, or at the path in variable `var` when it is set.
fn program(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
}
