//! The saga explorer, end to end: the real sagad and the three demo participants as processes,
//! the pages opened in a headless Chromium (WebDriver) and, for what a browser would never
//! send (a forged form, a foreign origin), plain HTTP requests.
//!
//! - The overview and the list show the demo's mix with the right counts; a search finds a saga
//!   by its idempotency key.
//! - A saga page draws every step with its status and follows the saga live, without a reload.
//! - A saga whose input holds markup shows it as text.
//! - With tokens on: the token is asked for once and kept in an `HttpOnly`, `SameSite=Strict`
//!   cookie; an admin retries a FAILED saga once its participant is fixed and the page turns
//!   `COMPENSATED` by itself, the timeline saying who and why; an operator cancels a running
//!   saga; a reader sees no action; forged POSTs are refused and change nothing.
//! - 10,000 sagas: the server's render time of each page is printed (never judged here).
//!
//! Every page is photographed into `target/explorer-screenshots/` for a person to look at.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use sagad_e2e::browser::Browser;
use sagad_e2e::demo::{DemoOptions, DemoSystem, Pace, check_the_run, mix, start_sagas};
use sagad_e2e::http::{Reply, request};
use sagad_e2e::*;
use sagad_proto::v1::{GetSagaRequest, StartSagaRequest, StepStatus};
use serde_json::{Value, json};
use sqlx::Connection as _;

/// How long a page may take to show what the saga did: generous, for a loaded 2-core box.
const PAGE_WAIT: Duration = Duration::from_secs(60);

fn http_addr(system: &DemoSystem) -> anyhow::Result<SocketAddr> {
    Ok(system.replica(0)?.http_addr)
}

async fn open(browser: &Browser, system: &DemoSystem, path: &str) -> anyhow::Result<()> {
    let url = format!("http://{}{path}", http_addr(system)?);
    browser
        .client()
        .goto(&url)
        .await
        .with_context(|| format!("opening {url}"))
}

/// Clicks the first element matching `css` once there is one. A live update may replace the
/// element between finding and clicking it: then it is found again.
async fn click(browser: &Browser, css: &str) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + PAGE_WAIT;
    loop {
        match browser.wait_for(css, PAGE_WAIT).await?.click().await {
            Ok(_) => return Ok(()),
            Err(error)
                if error.is_stale_element_reference() && tokio::time::Instant::now() < until => {}
            Err(error) => return Err(error).with_context(|| format!("clicking {css}")),
        }
    }
}

/// Types into the first element matching `css`, found again if a live update replaced it.
async fn type_into(browser: &Browser, css: &str, text: &str) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + PAGE_WAIT;
    loop {
        match browser
            .wait_for(css, PAGE_WAIT)
            .await?
            .send_keys(text)
            .await
        {
            Ok(()) => return Ok(()),
            Err(error)
                if error.is_stale_element_reference() && tokio::time::Instant::now() < until => {}
            Err(error) => return Err(error).with_context(|| format!("typing into {css}")),
        }
    }
}

/// A failed browser run, with what the browser showed at the end: its address and text, and a
/// screenshot `failed-<name>`.
async fn explained<T>(
    browser: &Browser,
    name: &str,
    outcome: anyhow::Result<T>,
) -> anyhow::Result<T> {
    let Err(error) = outcome else {
        return outcome;
    };
    let url = browser
        .client()
        .current_url()
        .await
        .map(|url| url.to_string());
    let text = browser.text("body").await;
    let shot = browser.screenshot(&format!("failed-{name}")).await;
    Err(error.context(format!(
        "the browser was at {url:?}, showing {text:?} (screenshot: {shot:?})"
    )))
}

/// The status each step of the saga's diagram is drawn with, read in one script so that a
/// live update cannot replace the diagram halfway through.
async fn diagram(browser: &Browser) -> anyhow::Result<Vec<(String, String)>> {
    let steps = browser
        .eval(
            "return Array.from(document.querySelectorAll('#saga-live svg.steps-diagram g.step'))\
               .map(step => [step.dataset.step, step.dataset.status]);",
            vec![],
        )
        .await?;
    serde_json::from_value(steps).context("the diagram's steps")
}

fn drawn(steps: &[(&str, &str)]) -> Vec<(String, String)> {
    steps
        .iter()
        .map(|(step, status)| ((*step).to_owned(), (*status).to_owned()))
        .collect()
}

/// Marks the page so that a reload (which starts a fresh page) can be told from an update.
async fn mark_page(browser: &Browser) -> anyhow::Result<()> {
    browser
        .eval(
            "window.sagadTestMark = 'the same page'; return true;",
            vec![],
        )
        .await?;
    Ok(())
}

async fn still_marked(browser: &Browser) -> anyhow::Result<bool> {
    Ok(browser
        .eval("return window.sagadTestMark === 'the same page';", vec![])
        .await?
        == json!(true))
}

/// Waits until the browser shows another page than the one [`mark_page`] marked.
async fn wait_for_new_page(browser: &Browser) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + PAGE_WAIT;
    // While the page changes a script may fail to run: then it is asked again.
    while still_marked(browser).await.unwrap_or(true) {
        if tokio::time::Instant::now() > until {
            bail!("the form's answer did not replace the page within {PAGE_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn order_input(customer_id: &str, country: &str) -> Value {
    json!({
        "customer_id": customer_id,
        "amount_cents": 2500,
        "currency": "EUR",
        "country": country,
        "items": [{"sku": "BOOK-42", "quantity": 1}],
    })
}

fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// The repository's demo definition, with the shipment retried 6 s after a failed attempt: long
/// enough to watch the countdown to the next attempt.
fn slow_shipment_retries() -> anyhow::Result<Scratch> {
    let path = repo_root().join("saga-defs/order_fulfillment.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let step = "action = \"ScheduleShipment\"\n";
    let slow = text.replace(
        step,
        &format!(
            "{step}retry = {{ max_attempts = 6, initial_delay = \"6s\", multiplier = 1.0, \
             max_delay = \"6s\", jitter = 0.0 }}\n"
        ),
    );
    ensure!(
        slow != text,
        "order_fulfillment.toml no longer has {step:?}: update this test"
    );
    Scratch::defs(&[("order_fulfillment.toml", &slow)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_explorer_shows_the_mix_and_follows_a_saga_live() -> anyhow::Result<()> {
    let defs = slow_shipment_retries()?;
    let system = DemoSystem::start("explorer_live", &defs, DemoOptions::default()).await?;
    let logs = Scratch::logs("explorer_live_browser")?;
    let outcome = async {
        let browser = Browser::start(&logs).await?;
        let shown = explained(&browser, "live", mix_and_live(&system, &browser).await).await;
        let closed = browser.close().await;
        shown.and(closed)
    }
    .await;
    system.shut_down_after(outcome).await
}

async fn mix_and_live(system: &DemoSystem, browser: &Browser) -> anyhow::Result<()> {
    // Issue 3's mix: 8 sagas complete, 8 are refused (funds, destination) and compensated.
    let planned = mix(4);
    let started = start_sagas(system.servers(), &planned, Pace::ALL_AT_ONCE).await?;
    check_the_run(system, &started.plans).await?;

    open(browser, system, "/").await?;
    let cell = |status: &str| {
        format!(r#"#counts td.count[data-type="order_fulfillment"][data-status="{status}"]"#)
    };
    for (status, wanted) in [
        ("RUNNING", "0"),
        ("COMPENSATING", "0"),
        ("COMPLETED", "8"),
        ("COMPENSATED", "8"),
        ("FAILED", "0"),
    ] {
        let shown = browser.text(&cell(status)).await?;
        ensure!(
            shown == wanted,
            "the overview counts {shown} {status}, want {wanted}"
        );
    }
    let total = browser
        .text(r#"#counts td.total[data-type="order_fulfillment"]"#)
        .await?;
    ensure!(total == "16", "the overview counts {total} sagas, want 16");
    browser
        .wait_for_text("#ended-last-hour", "16 sagas ended", PAGE_WAIT)
        .await?;
    ensure!(
        browser.count("#finished-chart rect.bar").await? > 0,
        "the chart of ended sagas has no bar"
    );
    ensure!(
        browser.count("#attention-empty").await? == 1,
        "nothing needs a person, yet the overview lists some"
    );
    browser.screenshot("overview").await?;

    // A click from the overview's count goes to the list with that filter.
    click(browser, &format!("{} a", cell("COMPENSATED"))).await?;
    browser.wait_for("#sagas", PAGE_WAIT).await?;
    let rows = browser.count("#sagas tbody tr").await?;
    let compensated = browser
        .count(r#"#sagas tbody tr[data-status="COMPENSATED"]"#)
        .await?;
    ensure!(
        rows == 8 && compensated == 8,
        "the COMPENSATED list shows {rows} rows, {compensated} of them COMPENSATED; want 8"
    );
    open(browser, system, "/sagas").await?;
    let rows = browser.count("#sagas tbody tr").await?;
    ensure!(rows == 16, "the list shows {rows} sagas, want 16");
    browser.screenshot("list").await?;

    // Found by its idempotency key, typed into the search field.
    let (saga_id, plan) = started.plans.iter().next().context("no saga was started")?;
    type_into(
        browser,
        r#"#filters input[name="q"]"#,
        &plan.idempotency_key,
    )
    .await?;
    click(browser, "#filters button[type=submit]").await?;
    browser
        .wait_for(
            &format!(r#"#sagas tr[data-saga-id="{saga_id}"]"#),
            PAGE_WAIT,
        )
        .await?;
    let rows = browser.count("#sagas tbody tr").await?;
    ensure!(
        rows == 1,
        "the search by idempotency key found {rows} sagas, want 1"
    );

    follow_a_saga_live(system, browser).await?;
    markup_renders_as_text(system, browser).await?;

    open(browser, system, "/definitions").await?;
    let steps = browser
        .count(r#"section.definition[data-type="order_fulfillment"] g.step"#)
        .await?;
    ensure!(
        steps == 4,
        "the definition is drawn with {steps} steps, want 4"
    );
    let rows = browser
        .count(r#"section.definition[data-type="order_fulfillment"] table tbody tr"#)
        .await?;
    ensure!(rows == 4, "the definition's table has {rows} steps, want 4");
    browser.screenshot("definitions").await?;
    Ok(())
}

/// Shipping paused, a saga waits at its third step; the page drawn then follows it to
/// COMPLETED once shipping answers, on the same page.
async fn follow_a_saga_live(system: &DemoSystem, browser: &Browser) -> anyhow::Result<()> {
    let mut client = system.client().await?;
    system.shipping.pause().await?;
    let saga_id = start_saga(
        &mut client,
        "order_fulfillment",
        order_input(&format!("live-{}", run_id()), "SE"),
    )
    .await?;
    let waiting = wait_until(&mut client, &saga_id, PAGE_WAIT, |saga| {
        saga.steps.get(2).map(|step| step.status) == Some(StepStatus::Running as i32)
    })
    .await;
    let shown = async {
        waiting?;
        open(browser, system, &format!("/sagas/{saga_id}")).await?;
        browser
            .wait_for_text("#status", "RUNNING", PAGE_WAIT)
            .await?;
        let steps = diagram(browser).await?;
        let want = drawn(&[
            ("create_order", "SUCCEEDED"),
            ("charge_payment", "SUCCEEDED"),
            ("schedule_shipment", "RUNNING"),
            ("approve_order", "PENDING"),
        ]);
        ensure!(
            steps == want,
            "the running saga is drawn {steps:?}, want {want:?}"
        );
        mark_page(browser).await?;
        // The call to the paused participant times out: the page shows the failed attempt
        // and its error as the log records it, and the step keeps running.
        browser
            .wait_for_text(
                r#"#steps tr[data-step="schedule_shipment"] td.last-error"#,
                "timed out after",
                PAGE_WAIT,
            )
            .await?;
        // The next attempt is 6 s away, counted down on the page each second.
        let countdown =
            r#"#steps tr[data-step="schedule_shipment"] td.next-attempt time[data-due]"#;
        browser.wait_for(countdown, PAGE_WAIT).await?;
        let read = "const at = document.querySelector(arguments[0]); \
                    return at ? at.textContent : null;";
        let first = browser.eval(read, vec![json!(countdown)]).await?;
        let until = tokio::time::Instant::now() + PAGE_WAIT;
        let later = loop {
            let now = browser.eval(read, vec![json!(countdown)]).await?;
            if now != first || tokio::time::Instant::now() > until {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let counting = |text: &Value| text.as_str().is_some_and(|text| text.starts_with("in "));
        ensure!(
            counting(&first) && counting(&later) && first != later,
            "the countdown to the next attempt read {first}, then {later}"
        );
        browser.screenshot("saga-running").await
    }
    .await;
    system.shipping.resume().await?;
    shown?;

    browser
        .wait_for_text("#status", "COMPLETED", PAGE_WAIT)
        .await?;
    ensure!(
        still_marked(browser).await?,
        "the page was reloaded; it must update in place"
    );
    let updates = browser.attr("body", "data-live-updates").await?;
    ensure!(
        updates.is_some_and(|count| count.parse::<u32>().is_ok_and(|count| count > 0)),
        "no live update was applied"
    );
    let steps = diagram(browser).await?;
    ensure!(
        steps.iter().all(|(_, status)| status == "SUCCEEDED") && steps.len() == 4,
        "the completed saga is drawn {steps:?}"
    );
    browser
        .wait_for(
            r#"#timeline li.event[data-type="saga_completed"]"#,
            PAGE_WAIT,
        )
        .await?;
    browser.screenshot("saga-completed").await?;
    Ok(())
}

/// Markup in a saga's input is shown as the text it is, and runs nothing.
async fn markup_renders_as_text(system: &DemoSystem, browser: &Browser) -> anyhow::Result<()> {
    const SCRIPT: &str = "<script>window.sagadInjected = 1</script>";
    const IMAGE: &str = r#""><img src=x onerror="window.sagadInjected = 2">"#;
    let mut client = system.client().await?;
    let mut input = order_input(SCRIPT, "SE");
    input["items"] = json!([{"sku": IMAGE, "quantity": 1}]);
    let saga_id = start_saga(&mut client, "order_fulfillment", input).await?;
    wait_terminal(&mut client, &saga_id, PAGE_WAIT).await?;
    open(browser, system, &format!("/sagas/{saga_id}")).await?;
    let shown = browser.text("#input").await?;
    ensure!(
        shown.contains(SCRIPT) && shown.contains("<img src=x onerror="),
        "the input is not shown as text: {shown}"
    );
    let injected = browser
        .eval(
            "return [window.sagadInjected === undefined, \
                    document.querySelectorAll('main script, main img').length];",
            vec![],
        )
        .await?;
    ensure!(
        injected == json!([true, 0]),
        "markup from the input became part of the page: {injected}"
    );
    open(browser, system, &format!("/sagas?q={saga_id}")).await?;
    browser
        .wait_for(
            &format!(r#"#sagas tr[data-saga-id="{saga_id}"]"#),
            PAGE_WAIT,
        )
        .await?;
    Ok(())
}

/// Tokens of each role, and the token file naming them.
struct Tokens {
    file: Scratch,
}

const READER: (&str, &str) = ("viewer", "reader-token-4c8f1d2e");
const OPERATOR: (&str, &str) = ("ops", "operator-token-9a7b3c5d");
const ADMIN: (&str, &str) = ("root", "admin-token-2f6e8a1b");

impl Tokens {
    fn new() -> anyhow::Result<Self> {
        let mut text = String::new();
        for ((name, token), role) in [(READER, "reader"), (OPERATOR, "operator"), (ADMIN, "admin")]
        {
            text.push_str(&token_entry(name, role, token));
        }
        Ok(Self {
            file: Scratch::with_files("explorer_tokens", &[("tokens.toml", &text)])?,
        })
    }

    fn path(&self) -> String {
        self.file.join("tokens.toml").display().to_string()
    }
}

/// StartSaga with a token.
async fn start_as(client: &mut Client, token: &str, input: Value) -> anyhow::Result<String> {
    let request = with_token(
        StartSagaRequest {
            saga_type: "order_fulfillment".to_owned(),
            idempotency_key: String::new(),
            input: Some(to_struct(input)),
            correlation_id: String::new(),
        },
        Some(token),
    )?;
    Ok(client.start_saga(request).await?.into_inner().saga_id)
}

/// Polls GetSaga (with a token) until `done` holds for the saga.
async fn wait_as(
    client: &mut Client,
    token: &str,
    saga_id: &str,
    done: impl Fn(&sagad_proto::v1::Saga) -> bool,
) -> anyhow::Result<sagad_proto::v1::Saga> {
    let until = tokio::time::Instant::now() + PAGE_WAIT;
    loop {
        let request = with_token(
            GetSagaRequest {
                saga_id: saga_id.to_owned(),
                ..GetSagaRequest::default()
            },
            Some(token),
        )?;
        let saga = client.get_saga(request).await?.into_inner();
        if done(&saga) {
            return Ok(saga);
        }
        if tokio::time::Instant::now() > until {
            bail!("saga {saga_id} did not get there: {saga:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has_status(status: sagad_proto::v1::SagaStatus) -> impl Fn(&sagad_proto::v1::Saga) -> bool {
    move |saga| saga.status == status as i32
}

/// A saga of a new customer whose account is frozen, to Antarctica: shipping refuses it, the
/// refund is refused in turn, and it stops FAILED. Its id and the customer.
async fn failed_saga(client: &mut Client) -> anyhow::Result<(String, String)> {
    let customer = format!("frozen-{}", run_id());
    let saga_id = start_as(client, ADMIN.1, order_input(&customer, "AQ")).await?;
    wait_as(
        client,
        ADMIN.1,
        &saga_id,
        has_status(sagad_proto::v1::SagaStatus::Failed),
    )
    .await?;
    Ok((saga_id, customer))
}

async fn log_in(browser: &Browser, system: &DemoSystem, token: &str) -> anyhow::Result<()> {
    open(browser, system, "/").await?;
    browser.wait_for("form#login", PAGE_WAIT).await?;
    type_into(browser, "#token", token).await?;
    click(browser, "form#login button[type=submit]").await?;
    browser.wait_for("#counts", PAGE_WAIT).await?;
    Ok(())
}

/// How many events of this type the saga's log holds.
async fn events_of(system: &DemoSystem, saga_id: &str, event_type: &str) -> anyhow::Result<i64> {
    let mut db = system.orchestrator_db().await?;
    let count = sqlx::query_scalar(
        "select count(*) from saga_events where saga_id = $1::uuid and event_type = $2",
    )
    .bind(saga_id)
    .bind(event_type)
    .fetch_one(&mut db)
    .await?;
    db.close().await?;
    Ok(count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_the_explorer_asks_once_and_lets_each_role_do_its_part() -> anyhow::Result<()> {
    let tokens = Tokens::new()?;
    let defs = repo_root().join("saga-defs");
    let options = DemoOptions {
        sagad_args: vec!["--auth-tokens".to_owned(), tokens.path()],
        ..DemoOptions::default()
    };
    let system = DemoSystem::start("explorer_roles", &defs, options).await?;
    let logs = Scratch::logs("explorer_roles_browser")?;
    let outcome = roles(&system, &logs).await;
    system.shut_down_after(outcome).await
}

async fn roles(system: &DemoSystem, logs: &Scratch) -> anyhow::Result<()> {
    let addr = http_addr(system)?;
    let mut client = system.client().await?;
    let (failed, customer) = failed_saga(&mut client).await?;

    // Without a token only the operators' endpoints answer; a page sends the browser to sign in.
    for path in ["/metrics", "/healthz", "/readyz"] {
        let reply = request(addr, "GET", path, &[], None).await?;
        ensure!(
            reply.status == 200,
            "{path} without a token: {}",
            reply.status
        );
    }
    let reply = request(addr, "GET", "/sagas", &[], None).await?;
    ensure!(
        reply.status == 303 && reply.header("location") == Some("/login?next=%2Fsagas"),
        "/sagas without a token: {} {:?}",
        reply.status,
        reply.header("location")
    );
    for path in [format!("/sagas/{failed}"), format!("/sagas/{failed}/live")] {
        let reply = request(addr, "GET", &path, &[], None).await?;
        ensure!(
            matches!(reply.status, 303 | 401) && !reply.body.contains(&customer),
            "{path} without a token showed the saga: {}",
            reply.status
        );
    }
    cookie_attributes(addr).await?;

    let admin = Browser::start(logs).await?;
    let outcome = admin_retries(system, &admin, &failed, &customer).await;
    let outcome = explained(&admin, "admin", outcome).await;
    let outcome = outcome.and(admin.close().await);
    outcome?;

    let operator = Browser::start(logs).await?;
    let outcome = operator_cancels(system, &operator).await;
    let outcome = explained(&operator, "operator", outcome).await;
    let outcome = outcome.and(operator.close().await);
    outcome?;

    let reader = Browser::start(logs).await?;
    let outcome = reader_sees_no_action(system, &reader).await;
    let outcome = explained(&reader, "reader", outcome).await;
    outcome.and(reader.close().await)
}

/// The login's cookie: the token kept where no script reads it and no other site sends it.
async fn cookie_attributes(addr: SocketAddr) -> anyhow::Result<()> {
    let form = request(addr, "GET", "/login?next=/sagas", &[], None).await?;
    let csrf = csrf_cookie(&form)?;
    let cookie = format!("sagad_csrf={csrf}");
    let body = format!("next=%2Fsagas&csrf={csrf}&token={}", ADMIN.1);
    let signed_in = request(addr, "POST", "/login", &[("Cookie", &cookie)], Some(&body)).await?;
    let token_cookie = signed_in
        .headers_named("set-cookie")
        .find(|value| value.starts_with("sagad_token="))
        .context("signing in set no token cookie")?;
    ensure!(
        signed_in.status == 303
            && signed_in.header("location") == Some("/sagas")
            && token_cookie.contains("HttpOnly")
            && token_cookie.contains("SameSite=Strict"),
        "signing in answered {} {:?} with the cookie {token_cookie:?}",
        signed_in.status,
        signed_in.header("location")
    );
    let wrong = format!("next=%2F&csrf={csrf}&token=not-a-token");
    let refused = request(addr, "POST", "/login", &[("Cookie", &cookie)], Some(&wrong)).await?;
    ensure!(
        refused.status == 401
            && refused
                .headers_named("set-cookie")
                .all(|v| !v.starts_with("sagad_token=")),
        "an unknown token was let in: {}",
        refused.status
    );
    Ok(())
}

fn csrf_cookie(reply: &Reply) -> anyhow::Result<String> {
    reply
        .headers_named("set-cookie")
        .find_map(|value| value.strip_prefix("sagad_csrf="))
        .and_then(|value| value.split(';').next())
        .map(str::to_owned)
        .context("no csrf cookie was set")
}

/// The admin finds the FAILED saga on the overview, fixes the account, and retries it from its
/// page; with payment-service paused the page shows the compensation going on, then turns
/// COMPENSATED by itself.
async fn admin_retries(
    system: &DemoSystem,
    browser: &Browser,
    saga_id: &str,
    customer: &str,
) -> anyhow::Result<()> {
    log_in(browser, system, ADMIN.1).await?;
    browser
        .wait_for_text("#who", "root · admin", PAGE_WAIT)
        .await?;
    ensure!(
        browser.cookie_value("sagad_token").await?.as_deref() == Some(ADMIN.1),
        "the browser keeps no token cookie"
    );
    click(
        browser,
        &format!(r#"#attention tr[data-saga-id="{saga_id}"] a.saga-link"#),
    )
    .await?;
    browser
        .wait_for_text("#status", "FAILED", PAGE_WAIT)
        .await?;
    let steps = diagram(browser).await?;
    let want = drawn(&[
        ("create_order", "SUCCEEDED"),
        ("charge_payment", "COMPENSATION_FAILED"),
        ("schedule_shipment", "FAILED"),
        ("approve_order", "PENDING"),
    ]);
    ensure!(
        steps == want,
        "the FAILED saga is drawn {steps:?}, want {want:?}"
    );
    ensure!(
        browser.count("#compensation-path").await? == 1,
        "no compensation path is drawn"
    );
    ensure!(
        browser
            .count(r#"#retry-dialog input[name="skip"][value="charge_payment"]"#)
            .await?
            == 1,
        "the retry dialog does not offer to skip the refund"
    );
    browser.screenshot("saga-failed").await?;

    let charged = system.balance_cents(customer).await?;
    let mut payments = system
        .participant_db(sagad_e2e::demo::Service::Payment)
        .await?;
    sqlx::query("update accounts set frozen = false where customer_id = $1")
        .bind(customer)
        .execute(&mut payments)
        .await?;
    payments.close().await?;

    system.payment.pause().await?;
    let retried = async {
        click(browser, "#retry-open").await?;
        type_into(browser, "#retry-reason", "account unfrozen, ticket 17").await?;
        // The form's answer is the saga's page again: a new page, which the old one (whose
        // live update may show the retry first) must not be taken for.
        mark_page(browser).await?;
        click(browser, "#retry-confirm").await?;
        wait_for_new_page(browser).await?;
        browser
            .wait_for_text("#status", "COMPENSATING", PAGE_WAIT)
            .await?;
        mark_page(browser).await
    }
    .await;
    system.payment.resume().await?;
    retried?;
    browser
        .wait_for_text("#status", "COMPENSATED", PAGE_WAIT)
        .await?;
    ensure!(
        still_marked(browser).await?,
        "the page was reloaded; it must turn COMPENSATED by itself"
    );
    let audit = r#"#timeline li.event[data-type="retry_requested"]"#;
    browser
        .wait_for_text(&format!("{audit} .who"), "root", PAGE_WAIT)
        .await?;
    browser
        .wait_for_text(
            &format!("{audit} .reason"),
            "account unfrozen, ticket 17",
            PAGE_WAIT,
        )
        .await?;
    let refunded = system.balance_cents(customer).await?;
    ensure!(
        refunded == charged + 2500,
        "the account holds {refunded} cents after the refund, want {}",
        charged + 2500
    );
    browser.screenshot("saga-retried").await?;
    Ok(())
}

/// The operator cancels a saga waiting on paused shipping; it compensates.
async fn operator_cancels(system: &DemoSystem, browser: &Browser) -> anyhow::Result<()> {
    let mut client = system.client().await?;
    log_in(browser, system, OPERATOR.1).await?;
    system.shipping.pause().await?;
    let cancelled = async {
        let saga_id = start_as(
            &mut client,
            OPERATOR.1,
            order_input(&format!("cancel-{}", run_id()), "SE"),
        )
        .await?;
        wait_as(&mut client, OPERATOR.1, &saga_id, |saga| {
            saga.steps.get(2).map(|step| step.status) == Some(StepStatus::Running as i32)
        })
        .await?;
        open(browser, system, &format!("/sagas/{saga_id}")).await?;
        browser
            .wait_for_text("#status", "RUNNING", PAGE_WAIT)
            .await?;
        ensure!(
            browser.count("#retry-open").await? == 0,
            "an operator is offered Retry"
        );
        click(browser, "#cancel-open").await?;
        type_into(browser, "#cancel-reason", "the customer called").await?;
        browser.screenshot("saga-cancel-dialog").await?;
        click(browser, "#cancel-confirm").await?;
        anyhow::Ok(saga_id)
    }
    .await;
    system.shipping.resume().await?;
    let saga_id = cancelled?;
    browser
        .wait_for_text("#status", "COMPENSATED", PAGE_WAIT)
        .await?;
    let audit = r#"#timeline li.event[data-type="cancel_requested"]"#;
    browser
        .wait_for_text(&format!("{audit} .who"), "ops", PAGE_WAIT)
        .await?;
    browser
        .wait_for_text(
            &format!("{audit} .reason"),
            "the customer called",
            PAGE_WAIT,
        )
        .await?;
    ensure!(
        events_of(system, &saga_id, "cancel_requested").await? == 1,
        "the cancel is not in the log once"
    );
    Ok(())
}

/// A reader sees no action; posts forged from its page, from another origin or with another's
/// stale form are refused and change nothing; the same post made properly by an admin works.
async fn reader_sees_no_action(system: &DemoSystem, browser: &Browser) -> anyhow::Result<()> {
    let addr = http_addr(system)?;
    let mut client = system.client().await?;
    let (saga_id, _) = failed_saga(&mut client).await?;

    log_in(browser, system, READER.1).await?;
    open(browser, system, &format!("/sagas/{saga_id}")).await?;
    browser
        .wait_for_text("#status", "FAILED", PAGE_WAIT)
        .await?;
    let actions = browser
        .count("#actions, #retry-open, #cancel-open, dialog")
        .await?;
    ensure!(actions == 0, "a reader is shown {actions} action elements");
    browser.screenshot("saga-as-reader").await?;

    // From the reader's own page: without the form's value, and with it (the role refuses).
    let post = "const done = arguments[arguments.length - 1]; \
                fetch(arguments[0], {method: 'POST', credentials: 'same-origin', \
                  headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: arguments[1]}) \
                .then(r => done(r.status), e => done(String(e)));";
    let retry = format!("/sagas/{saga_id}/retry");
    let csrf = browser
        .attr(r#"form[action="/logout"] input[name="csrf"]"#, "value")
        .await?
        .context("the page carries no csrf value")?;
    for body in [
        "reason=forged".to_owned(),
        format!("reason=forged&csrf={csrf}"),
    ] {
        let status = browser
            .eval_async(post, vec![json!(retry), json!(body)])
            .await?;
        ensure!(
            status == json!(403),
            "a reader's retry ({body}) answered {status}"
        );
    }

    // With an admin's cookies but from another site, or with a made-up form value.
    let form = request(addr, "GET", "/login", &[], None).await?;
    let csrf = csrf_cookie(&form)?;
    let cookies = format!("sagad_token={}; sagad_csrf={csrf}", ADMIN.1);
    let body = format!("reason=forged&csrf={csrf}");
    let from_elsewhere = [
        ("Cookie", cookies.as_str()),
        ("Origin", "http://attacker.example"),
    ];
    let cross_site = [
        ("Cookie", cookies.as_str()),
        ("Sec-Fetch-Site", "cross-site"),
    ];
    let guessed = format!("reason=forged&csrf={}", "0".repeat(64));
    for (headers, body, what) in [
        (&from_elsewhere[..], body.as_str(), "another origin"),
        (&cross_site[..], body.as_str(), "a cross-site fetch"),
        (
            &from_elsewhere[..1],
            guessed.as_str(),
            "a guessed form value",
        ),
        (&from_elsewhere[..1], "reason=forged", "no form value"),
    ] {
        let reply = request(addr, "POST", &retry, headers, Some(body)).await?;
        ensure!(
            reply.status == 403,
            "a post from {what} answered {}",
            reply.status
        );
    }
    ensure!(
        events_of(system, &saga_id, "retry_requested").await? == 0,
        "a refused post changed the saga"
    );

    // The same post, made properly, is taken: the refusals were the forgery's. It is the retry
    // dialog's form with the frozen account's refund ticked as made by hand.
    let origin = format!("http://{addr}");
    let proper = [("Cookie", cookies.as_str()), ("Origin", origin.as_str())];
    let body = format!("csrf={csrf}&skip=charge_payment&reason=refunded+by+bank+transfer");
    let reply = request(addr, "POST", &retry, &proper, Some(&body)).await?;
    ensure!(
        reply.status == 303,
        "the admin's proper retry answered {}",
        reply.status
    );
    wait_as(
        &mut client,
        ADMIN.1,
        &saga_id,
        has_status(sagad_proto::v1::SagaStatus::Compensated),
    )
    .await?;
    ensure!(
        events_of(system, &saga_id, "retry_requested").await? == 1
            && events_of(system, &saga_id, "compensation_skipped").await? == 1,
        "the admin's retry skipping the refund is not in the log"
    );
    Ok(())
}

/// How many sagas the timing run puts in the database.
const SAGAS: i64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_over_ten_thousand_sagas_print_their_render_times() -> anyhow::Result<()> {
    let defs = repo_root().join("saga-defs");
    let system = DemoSystem::start("explorer_many", &defs, DemoOptions::default()).await?;
    let outcome = render_times(&system).await;
    system.shut_down_after(outcome).await
}

/// Runs a real mix, then copies its sagas (rows and logs, under new ids, spread over the past
/// days) up to [`SAGAS`], and reads each page's `Server-Timing` a few times.
async fn render_times(system: &DemoSystem) -> anyhow::Result<()> {
    let mut client = system.client().await?;
    let started = start_sagas(system.servers(), &mix(2), Pace::ALL_AT_ONCE).await?;
    check_the_run(system, &started.plans).await?;
    let failed = start_saga(
        &mut client,
        "order_fulfillment",
        order_input(&format!("frozen-{}", run_id()), "AQ"),
    )
    .await?;
    wait_terminal(&mut client, &failed, PAGE_WAIT).await?;

    let mut db = system.orchestrator_db().await?;
    let templates: i64 = sqlx::query_scalar("select count(*) from sagas")
        .fetch_one(&mut db)
        .await?;
    let copies = (SAGAS - templates) / templates + 1;
    let mut tx = db.begin().await?;
    sqlx::query(
        "create temp table copies on commit drop as
         select s.saga_id as template, md5(s.saga_id::text || ':' || c)::uuid as saga_id, c
         from sagas s, generate_series(1, $1::int8) c
         order by c, s.saga_id limit $2",
    )
    .bind(copies)
    .bind(SAGAS - templates)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into sagas (saga_id, saga_type, definition_version, status, input, context, steps,
                            failure_reason, version, correlation_id, idempotency_key, created_at,
                            updated_at, wake_at, owner, failing_since)
         select c.saga_id, s.saga_type, s.definition_version, s.status, s.input, s.context,
                s.steps, s.failure_reason, s.version, c.saga_id::text, null,
                s.created_at - make_interval(secs => c.c * 37), s.updated_at - make_interval(secs => c.c * 37),
                s.wake_at, null, s.failing_since
         from copies c join sagas s on s.saga_id = c.template",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into saga_events (saga_id, seq, event_type, step, data, recorded_at, replica_id, format)
         select c.saga_id, e.seq, e.event_type, e.step, e.data,
                e.recorded_at - make_interval(secs => c.c * 37), e.replica_id, e.format
         from copies c join saga_events e on e.saga_id = c.template",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    sqlx::query("analyze sagas").execute(&mut db).await?;
    let (total, oldest_correlation_id): (i64, String) = sqlx::query_as(
        "select (select count(*) from sagas),
                (select correlation_id from sagas order by created_at limit 1)",
    )
    .fetch_one(&mut db)
    .await?;
    db.close().await?;
    ensure!(
        total == SAGAS,
        "{total} sagas in the database, want {SAGAS}"
    );

    let addr = http_addr(system)?;
    let overview = request(addr, "GET", "/", &[], None).await?;
    ensure!(
        overview
            .body
            .contains(&format!(r#"data-type="order_fulfillment">{SAGAS}<"#)),
        "the overview does not count {SAGAS} sagas"
    );
    let list = request(addr, "GET", "/sagas", &[], None).await?;
    let next = list
        .body
        .split(r#"id="next-page" href=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .map(|href| href.replace("&amp;", "&"))
        .context("the list of 10,000 sagas has no next page")?;
    let pages: Vec<(&str, String)> = vec![
        ("overview", "/".to_owned()),
        ("list, newest 50", "/sagas".to_owned()),
        ("list, second page", next),
        ("list, COMPENSATED", "/sagas?status=COMPENSATED".to_owned()),
        ("list, FAILED", "/sagas?status=FAILED".to_owned()),
        ("list, stuck", "/sagas?stuck=1".to_owned()),
        (
            "find by correlation id",
            format!("/sagas?q={oldest_correlation_id}"),
        ),
        ("find by saga id", format!("/sagas?q={failed}")),
        ("one saga", format!("/sagas/{failed}")),
        ("definitions", "/definitions".to_owned()),
    ];
    println!(
        "explorer render times over {SAGAS} sagas (server side, Server-Timing, 7 requests each):"
    );
    for (name, path) in &pages {
        let mut millis = Vec::new();
        for _ in 0..7 {
            let reply = request(addr, "GET", path, &[], None).await?;
            ensure!(reply.status == 200, "{path} answered {}", reply.status);
            let timing = reply
                .header("server-timing")
                .and_then(|value| value.strip_prefix("total;dur="))
                .and_then(|value| value.parse::<f64>().ok())
                .with_context(|| format!("{path} has no Server-Timing"))?;
            millis.push(timing);
        }
        millis.sort_by(f64::total_cmp);
        let median = millis[millis.len() / 2];
        let max = millis[millis.len() - 1];
        println!("  {name:<24} median {median:7.2} ms   max {max:7.2} ms   ({path})");
    }
    Ok(())
}
