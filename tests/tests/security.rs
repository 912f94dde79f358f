//! Who may reach sagad and do what, against the real binaries: mutual TLS end to end (a client
//! without a certificate refused, sagad reaching a real participant over TLS, a certificate
//! rotated by SIGHUP used by new connections while an open one goes on), and bearer tokens
//! (each role against each RPC, a removed token refused at once after SIGHUP, the token's name
//! in the history of what it changed).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use sagad_e2e::demo::{ParticipantProcess, Service};
use sagad_e2e::participant::{CallKind, Script};
use sagad_e2e::tls::{TestPki, endpoint};
use sagad_e2e::*;
use sagad_proto::v1::saga_orchestrator_client::SagaOrchestratorClient;
use sagad_proto::v1::{
    CancelSagaRequest, GetSagaRequest, ListSagasRequest, RetrySagaRequest, SagaStatus,
    StartSagaRequest, WatchSagaRequest,
};
use serde_json::json;
use sqlx::Connection;
use tonic::Code;
use tonic::transport::{ClientTlsConfig, Identity};

/// A definition with one step on the order participant: the demo's own action, so that its
/// database says whether the call got through.
const ORDER_ONLY: &str = r#"
name = "order_only"
version = 1

[defaults]
timeout = "5s"

[[steps]]
name = "create_order"
participant = "order"
action = "CreateOrder"
compensation = "CancelOrder"
"#;

/// Waits until sagad's log shows `line`.
async fn logged(sagad: &SagadProcess, line: &str) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(&sagad.log)?;
        if log.contains(line) {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < until,
            "sagad did not log {line:?} within 30 s: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts an `order_only` saga for `customer` and waits for it to end `COMPLETED` (`what`
/// names it in the error); returns its id.
async fn order_completes(
    client: &mut Client,
    customer: &str,
    amount_cents: u32,
    what: &str,
) -> anyhow::Result<String> {
    let saga_id = start_saga(
        client,
        "order_only",
        json!({"customer_id": customer, "amount_cents": amount_cents, "country": "FR"}),
    )
    .await?;
    let saga = wait_terminal(client, &saga_id, Duration::from_secs(60)).await?;
    ensure!(
        saga.status == SagaStatus::Completed as i32,
        "{what} ended {:?}: {:?}",
        saga.status,
        saga.failure_reason
    );
    Ok(saga_id)
}

async fn client_over(sagad: &SagadProcess, tls: &ClientTlsConfig) -> anyhow::Result<Client> {
    let channel = endpoint(sagad.addr, Some(tls))?.connect().await?;
    Ok(SagaOrchestratorClient::new(channel))
}

/// Whether a `GetSaga` over a new connection to `endpoint` fails (in the handshake or after).
async fn refused(endpoint: tonic::transport::Endpoint, saga_id: &str) -> bool {
    match endpoint.connect().await {
        Err(_) => true,
        Ok(channel) => SagaOrchestratorClient::new(channel)
            .get_saga(get_request(saga_id))
            .await
            .is_err(),
    }
}

fn get_request(saga_id: &str) -> GetSagaRequest {
    GetSagaRequest {
        saga_id: saga_id.to_owned(),
        ..Default::default()
    }
}

#[tokio::test]
async fn mutual_tls_end_to_end_and_a_certificate_rotated_by_sighup() -> anyhow::Result<()> {
    let pki = TestPki::new("mtls")?;
    let (sagad_cert, sagad_key) = pki.server_cert("sagad")?;
    let (order_cert, order_key) = pki.server_cert("order")?;
    let path = |name: &str| pki.path(name).display().to_string();
    let logs = Scratch::logs("mtls-logs")?;
    let order_db = DatabaseGuard::new("mtls_order");
    let sagad_db = DatabaseGuard::new("mtls_sagad");
    // The participant asks sagad for its certificate too.
    // The CA the participant checks sagad's certificate with, and sagad's certificate for it:
    // files of their own, replaced in the rotation below.
    let order_client_ca = pki.path("order-client-ca.pem");
    std::fs::copy(pki.path("ca.pem"), &order_client_ca)?;
    let sagad_client_cert = pki.path("sagad-client.pem");
    let sagad_client_key = pki.path("sagad-client.key");
    std::fs::copy(pki.path("client.pem"), &sagad_client_cert)?;
    std::fs::copy(pki.path("client.key"), &sagad_client_key)?;
    let mut order = ParticipantProcess::start_over(
        Service::Order,
        &order_db.url(),
        &[
            "--tls-cert".to_owned(),
            order_cert.display().to_string(),
            "--tls-key".to_owned(),
            order_key.display().to_string(),
            "--tls-client-ca".to_owned(),
            order_client_ca.display().to_string(),
        ],
        &[],
        &logs,
        Some(pki.client_config(true)),
    )
    .await?;
    ensure!(order.uri().starts_with("https://"), "{}", order.uri());
    let defs = Scratch::defs(&[("order_only.toml", ORDER_ONLY)])?;
    let args: Vec<String> = [
        "--database-url",
        &sagad_db.url(),
        "--defs",
        &defs.display().to_string(),
        "--participant",
        &format!("order={}", order.uri()),
        "--participant-ca",
        &path("ca.pem"),
        "--participant-cert",
        &sagad_client_cert.display().to_string(),
        "--participant-key",
        &sagad_client_key.display().to_string(),
        "--tls-cert",
        &sagad_cert.display().to_string(),
        "--tls-key",
        &sagad_key.display().to_string(),
        "--tls-client-ca",
        &path("ca.pem"),
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]
    .map(str::to_owned)
    .to_vec();
    let sagad = SagadProcess::start_over(&args, &[], &logs, Some(&pki.client_config(true))).await?;

    // With a certificate: a saga goes through, and the participant's database has the order.
    let mut client = client_over(&sagad, &pki.client_config(true)).await?;
    let saga_id = order_completes(&mut client, "tls-customer", 1234, "the saga over TLS").await?;
    let mut db = sqlx::PgConnection::connect(&order_db.url()).await?;
    let (customer, status): (String, String) =
        sqlx::query_as("select customer_id, status from orders where saga_id = $1")
            .bind(&saga_id)
            .fetch_one(&mut db)
            .await
            .context("order-service recorded no order for the saga")?;
    assert_eq!(
        (customer.as_str(), status.as_str()),
        ("tls-customer", "PENDING")
    );

    // sagactl over mutual TLS, and refused without its certificate.
    let server = format!("https://{}", sagad.addr);
    let ca = path("ca.pem");
    let (cert, key) = (path("client.pem"), path("client.key"));
    let got = cli::sagactl(&[
        "--server", &server, "--ca", &ca, "--cert", &cert, "--key", &key, "--output", "json",
        "get", &saga_id,
    ])
    .await?
    .ok()?
    .json()?;
    assert_eq!(got["status"], json!("COMPLETED"), "{got}");
    let uncertified = cli::sagactl(&["--server", &server, "--ca", &ca, "get", &saga_id]).await?;
    ensure!(
        !uncertified.status.success(),
        "sagactl without a certificate was served: {}",
        uncertified.stdout
    );

    // Without a certificate, or in plaintext: no call gets through.
    let without = endpoint(sagad.addr, Some(&pki.client_config(false)))?;
    assert!(
        refused(without, &saga_id).await,
        "a client without a certificate was served"
    );
    assert!(
        refused(endpoint(sagad.addr, None)?, &saga_id).await,
        "a plaintext client was served"
    );

    // Rotation: the certificate files are replaced by ones of another CA, then SIGHUP.
    let other = TestPki::new("rotated")?;
    let (new_cert, new_key) = other.server_cert("sagad")?;
    let trusting_new = ClientTlsConfig::new()
        .ca_certificate(other.ca_certificate())
        .identity(pki_identity(&pki)?);
    assert!(
        refused(endpoint(sagad.addr, Some(&trusting_new))?, &saga_id).await,
        "the new certificate was served before the rotation"
    );
    std::fs::copy(&new_cert, &sagad_cert)?;
    std::fs::copy(&new_key, &sagad_key)?;
    signals::send(sagad.pid().context("sagad has exited")?, "HUP").await?;
    logged(&sagad, "the TLS files are read again").await?;
    let mut rotated = client_over(&sagad, &trusting_new).await?;
    rotated.get_saga(get_request(&saga_id)).await?;
    // The connection opened before the rotation was not dropped.
    client.get_saga(get_request(&saga_id)).await?;
    assert!(
        refused(
            endpoint(sagad.addr, Some(&pki.client_config(true)))?,
            &saga_id
        )
        .await,
        "a new connection still got the old certificate"
    );

    // sagad's own certificate for the participant rotated too: the participant now trusts only
    // the new CA (restarted, so no old connection survives), sagad's files are replaced, and
    // SIGHUP has sagad's next connections show the new one.
    std::fs::write(&order_client_ca, other.ca_pem())?;
    std::fs::write(&sagad_client_cert, other.client_pem().0)?;
    std::fs::write(&sagad_client_key, other.client_pem().1)?;
    signals::send(sagad.pid().context("sagad has exited")?, "HUP").await?;
    logged(&sagad, "the participants' TLS files are read again").await?;
    order.reach_with(
        ClientTlsConfig::new()
            .ca_certificate(pki.ca_certificate())
            .identity(other.client_identity()),
    );
    order.restart().await?;
    order_completes(
        &mut rotated,
        "tls-rotated",
        99,
        "the saga after sagad's client certificate rotated",
    )
    .await?;
    Ok(())
}

fn pki_identity(pki: &TestPki) -> anyhow::Result<Identity> {
    Ok(Identity::from_pem(
        std::fs::read(pki.path("client.pem"))?,
        std::fs::read(pki.path("client.key"))?,
    ))
}

/// A sagad over one scripted participant `p` and a one-step saga type `name` (with a
/// compensation), started with `extra` flags; everything goes when it is dropped.
struct OneStep {
    sagad: SagadProcess,
    _participant: FakeParticipant,
    _db: DatabaseGuard,
    _defs: Scratch,
    _logs: Scratch,
}

impl OneStep {
    async fn start(name: &str, script: Script, extra: &[&str]) -> anyhow::Result<Self> {
        let participant = FakeParticipant::start_scripted("p", script).await?;
        let definition = format!(
            "name = \"{name}\"\nversion = 1\n\n[[steps]]\nname = \"a\"\n\
             participant = \"p\"\naction = \"Do\"\ncompensation = \"Undo\"\n"
        );
        let defs = Scratch::defs(&[(&format!("{name}.toml"), &definition)])?;
        let db = DatabaseGuard::new(name);
        let logs = Scratch::logs(&format!("{name}-logs"))?;
        let mut args: Vec<String> = [
            "--database-url",
            &db.url(),
            "--defs",
            &defs.display().to_string(),
            "--participant",
            &participant.flag(),
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(extra.iter().map(|flag| (*flag).to_owned()));
        let sagad = SagadProcess::start(&args, &logs).await?;
        Ok(Self {
            sagad,
            _participant: participant,
            _db: db,
            _defs: defs,
            _logs: logs,
        })
    }
}

/// The code each RPC answers with `token`; `saga_id` is a saga that exists.
async fn codes(
    client: &mut Client,
    token: Option<&str>,
    saga_id: &str,
) -> anyhow::Result<Vec<(&'static str, Code)>> {
    let start = StartSagaRequest {
        saga_type: "roles".to_owned(),
        input: Some(to_struct(json!({}))),
        ..Default::default()
    };
    let id = saga_id.to_owned();
    let reason = "role check".to_owned();
    Ok(vec![
        (
            "StartSaga",
            code_of(client.start_saga(with_token(start, token)?).await),
        ),
        (
            "GetSaga",
            code_of(client.get_saga(with_token(get_request(&id), token)?).await),
        ),
        (
            "ListSagas",
            code_of(
                client
                    .list_sagas(with_token(ListSagasRequest::default(), token)?)
                    .await,
            ),
        ),
        (
            "WatchSaga",
            code_of(
                client
                    .watch_saga(with_token(
                        WatchSagaRequest {
                            saga_id: id.clone(),
                        },
                        token,
                    )?)
                    .await,
            ),
        ),
        // The saga has ended: the right role is told so, the wrong one is refused first.
        (
            "CancelSaga",
            code_of(
                client
                    .cancel_saga(with_token(
                        CancelSagaRequest {
                            saga_id: id.clone(),
                            reason: reason.clone(),
                        },
                        token,
                    )?)
                    .await,
            ),
        ),
        (
            "RetrySaga",
            code_of(
                client
                    .retry_saga(with_token(
                        RetrySagaRequest {
                            saga_id: id,
                            reason,
                            skip_steps: Vec::new(),
                        },
                        token,
                    )?)
                    .await,
            ),
        ),
    ])
}

/// The code an answer came with (`OK` for an answer).
fn code_of<T>(answer: Result<T, tonic::Status>) -> Code {
    match answer {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn each_role_against_each_rpc_and_a_removed_token_refused_at_once() -> anyhow::Result<()> {
    // The first saga's step hangs, so that it can be cancelled; every later call succeeds.
    let script: Script = Arc::new(|call, before| {
        if call.kind == CallKind::Execute && before.is_empty() {
            participant::Answer::hang()
        } else {
            participant::default_answer(call)
        }
    });
    // One more reader, made as an operator would: `sagactl token new` prints the token and
    // the entry for the file.
    let made = cli::sagactl(&[
        "--output",
        "json",
        "token",
        "new",
        "dashboard",
        "--role",
        "reader",
    ])
    .await?
    .ok()?
    .json()?;
    let made_token = made["token"]
        .as_str()
        .context("no token printed")?
        .to_owned();
    let made_entry = made["toml"]
        .as_str()
        .context("no TOML entry printed")?
        .to_owned();
    ensure!(
        !made_entry.contains(&made_token),
        "the entry holds the token itself: {made_entry}"
    );
    let tokens = Scratch::with_files(
        "tokens",
        &[(
            "tokens.toml",
            &[
                token_entry("viewer", "reader", "reader-token"),
                token_entry("ops", "operator", "operator-token"),
                token_entry("root", "admin", "admin-token"),
                made_entry,
            ]
            .join("\n"),
        )],
    )?;
    let tokens_file = tokens.join("tokens.toml");
    let system = OneStep::start(
        "roles",
        script,
        &["--auth-tokens", &tokens_file.display().to_string()],
    )
    .await?;
    let sagad = &system.sagad;
    let mut client = sagad.client().await?;

    // An operator starts a saga (its step hangs) and cancels it: the history says who.
    let started = client
        .start_saga(with_token(
            StartSagaRequest {
                saga_type: "roles".to_owned(),
                input: Some(to_struct(json!({}))),
                ..Default::default()
            },
            Some("operator-token"),
        )?)
        .await?
        .into_inner();
    let saga_id = started.saga_id;
    let cancelled = client
        .cancel_saga(with_token(
            CancelSagaRequest {
                saga_id: saga_id.clone(),
                reason: "wrong order".to_owned(),
            },
            Some("operator-token"),
        )?)
        .await?
        .into_inner();
    let cancel_event = cancelled
        .history
        .iter()
        .find(|event| event.r#type == "cancel_requested")
        .context("no cancel_requested event")?;
    assert_eq!(
        to_json(&cancel_event.data)["requested_by"],
        json!("ops"),
        "{:?}",
        cancel_event.data
    );
    let ended = loop {
        let saga = client
            .get_saga(with_token(get_request(&saga_id), Some("reader-token"))?)
            .await?
            .into_inner();
        if is_terminal(saga.status) {
            break saga;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ended.status, SagaStatus::Compensated as i32);

    // Each role against each RPC on the ended saga: the business answer once allowed.
    use Code::{FailedPrecondition as Ended, Ok as Allowed, PermissionDenied as Denied};
    let expected: [(Option<&str>, [Code; 6]); 5] = [
        (None, [Code::Unauthenticated; 6]),
        (Some("a-guess"), [Code::Unauthenticated; 6]),
        (
            Some("reader-token"),
            [Denied, Allowed, Allowed, Allowed, Denied, Denied],
        ),
        (
            Some("operator-token"),
            [Allowed, Allowed, Allowed, Allowed, Ended, Denied],
        ),
        (
            Some("admin-token"),
            [Allowed, Allowed, Allowed, Allowed, Ended, Ended],
        ),
    ];
    for (token, codes_expected) in expected {
        let got = codes(&mut client, token, &saga_id).await?;
        let got_codes: Vec<Code> = got.iter().map(|(_, code)| *code).collect();
        assert_eq!(got_codes, codes_expected, "token {token:?}: {got:?}");
    }
    // sagactl sends its token from --token or SAGAD_TOKEN.
    let server = format!("http://{}", sagad.addr);
    let listed = cli::sagactl(&["--server", &server, "--token", &made_token, "list"]).await?;
    ensure!(
        listed.status.success(),
        "sagactl --token: {}",
        listed.stderr
    );
    let denied = cli::sagactl_with_env(
        &["--server", &server, "cancel", &saga_id],
        &[("SAGAD_TOKEN", made_token.as_str())],
    )
    .await?;
    ensure!(
        !denied.status.success() && denied.stderr.contains("PERMISSION_DENIED"),
        "sagactl with a reader's token cancelled: {}",
        denied.stderr
    );
    // Health stays open without a token, also as sagactl asks it.
    let health = cli::sagactl(&["--server", &server, "--output", "json", "health"])
        .await?
        .ok()?
        .json()?;
    assert_eq!(health["status"], json!("SERVING"), "{health}");
    let unknown = cli::sagactl(&["--server", &server, "health", "--service", "no.Such"]).await?;
    ensure!(
        !unknown.status.success(),
        "sagactl health of an unknown service exited 0: {}",
        unknown.stdout
    );
    ensure!(daemon::serving(sagad.addr).await, "health needs no token");

    // The operator's token removed from the file and SIGHUP: refused on the next call.
    std::fs::write(
        &tokens_file,
        [
            token_entry("viewer", "reader", "reader-token"),
            token_entry("root", "admin", "admin-token"),
        ]
        .concat(),
    )?;
    signals::send(sagad.pid().context("sagad has exited")?, "HUP").await?;
    logged(sagad, "the token file is read again").await?;
    let removed = client
        .list_sagas(with_token(
            ListSagasRequest::default(),
            Some("operator-token"),
        )?)
        .await;
    assert_eq!(
        removed.err().map(|status| status.code()),
        Some(Code::Unauthenticated)
    );
    client
        .list_sagas(with_token(
            ListSagasRequest::default(),
            Some("reader-token"),
        )?)
        .await?;
    // A file that cannot be read keeps the tokens in force.
    std::fs::write(&tokens_file, "[[token]]\nname = \"broken\"\n")?;
    signals::send(sagad.pid().context("sagad has exited")?, "HUP").await?;
    logged(sagad, "the token file cannot be read").await?;
    client
        .list_sagas(with_token(
            ListSagasRequest::default(),
            Some("admin-token"),
        )?)
        .await?;
    // No token ever reaches the log.
    let log = std::fs::read_to_string(&sagad.log)?;
    for token in ["reader-token", "operator-token", "admin-token", &made_token] {
        assert!(!log.contains(token), "the log holds {token}");
    }
    Ok(())
}

#[tokio::test]
async fn limits_refuse_what_is_too_much_and_a_clients_deadline_bounds_the_wait()
-> anyhow::Result<()> {
    // Every call hangs: the saga stays running while the test watches it.
    let script: Script = Arc::new(|_, _| participant::Answer::hang());
    let system = OneStep::start(
        "limits",
        script,
        &[
            "--max-watches-per-client",
            "2",
            "--max-request-bytes",
            "65536",
        ],
    )
    .await?;
    let sagad = &system.sagad;
    let mut client = sagad.client().await?;
    let saga_id = start_saga(&mut client, "limits", json!({})).await?;

    // Two streams open; the third is refused until one closes.
    let watch = |client: &mut Client| {
        let mut client = client.clone();
        let saga_id = saga_id.clone();
        async move {
            client
                .watch_saga(WatchSagaRequest { saga_id })
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let first = watch(&mut client).await?;
    let _second = watch(&mut client).await?;
    let third = watch(&mut client).await.err().map(|status| status.code());
    assert_eq!(third, Some(Code::ResourceExhausted));
    drop(first);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match watch(&mut client).await {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted => {
                ensure!(
                    tokio::time::Instant::now() < until,
                    "a closed stream did not free its place"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => return Err(status.into()),
        }
    }

    // A request larger than --max-request-bytes is refused unread, and nothing breaks.
    let big = client
        .start_saga(StartSagaRequest {
            saga_type: "limits".to_owned(),
            input: Some(to_struct(json!({"blob": "x".repeat(100 * 1024)}))),
            ..Default::default()
        })
        .await
        .err()
        .map(|status| status.code());
    ensure!(
        matches!(big, Some(Code::OutOfRange | Code::ResourceExhausted)),
        "a request over the limit answered {big:?}"
    );

    // A long-poll for a version that never comes ends with the client's deadline, not the
    // minute it asked to wait.
    let mut request = tonic::Request::new(GetSagaRequest {
        saga_id: saga_id.clone(),
        min_version: 1000,
        wait_ms: 60_000,
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(300));
    let asked = std::time::Instant::now();
    let waited = client
        .get_saga(request)
        .await
        .err()
        .map(|status| status.code());
    let took = asked.elapsed();
    ensure!(
        matches!(waited, Some(Code::DeadlineExceeded | Code::Cancelled)),
        "the long-poll answered {waited:?}"
    );
    ensure!(
        took < Duration::from_secs(30),
        "the long-poll outlived the client's deadline: {took:?}"
    );
    // sagad still serves.
    get_saga(&mut client, &saga_id).await?;
    Ok(())
}
