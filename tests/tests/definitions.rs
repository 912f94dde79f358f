//! Definitions are snapshotted into each saga: editing the files never changes a running saga,
//! and new sagas use the newest version loaded.

use std::sync::Arc;
use std::time::Duration;

use sagad_e2e::participant::Script;
use sagad_e2e::*;
use sagad_proto::v1::SagaStatus;
use serde_json::json;

fn definition(version: u32, steps: &[&str]) -> String {
    let mut text = format!(
        r#"
name = "snap"
version = {version}
required_input = ["customer_id"]

[defaults]
timeout = "2s"
retry = {{ max_attempts = 0, initial_delay = "300ms", multiplier = 1.0, max_delay = "300ms", jitter = 0.0 }}
"#
    );
    for step in steps {
        text.push_str(&format!(
            "\n[[steps]]\nname = \"{step}\"\nparticipant = \"p\"\naction = \"Do_{step}\"\ncompensation = \"Undo_{step}\"\n"
        ));
    }
    text
}

#[tokio::test]
async fn a_running_saga_keeps_its_definition_and_new_sagas_use_the_newest() -> anyhow::Result<()> {
    let db = TestDatabase::new("snapshot");
    // Step b keeps failing until the test lets it through, so the saga is still running when
    // the definitions change under it.
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = release.clone();
    let script: Script = Arc::new(move |call, _| {
        if call.step == "b" && !gate.load(std::sync::atomic::Ordering::SeqCst) {
            Answer::status(tonic::Code::Unavailable)
        } else {
            participant::default_answer(call)
        }
    });
    let participant = FakeParticipant::start_scripted("p", script).await?;

    let v1 = Scratch::defs(&[("snap.toml", &definition(1, &["a", "b"]))])?;
    let args = |defs: &std::path::Path| -> Vec<String> {
        vec![
            "--database-url".into(),
            db.url.clone(),
            "--defs".into(),
            defs.display().to_string(),
            "--participant".into(),
            participant.flag(),
        ]
    };
    let daemon = TestDaemon::start(&args(&v1)).await?;
    let mut client = daemon.client().await?;
    let old = start_saga(&mut client, "snap", json!({"customer_id": "c"})).await?;
    wait_until(&mut client, &old, Duration::from_secs(30), |saga| {
        saga.steps.get(1).is_some_and(|step| step.attempts >= 1)
    })
    .await?;
    daemon.stop().await?;

    // The file is rewritten with other steps, and a second version is added.
    std::fs::write(v1.join("snap.toml"), definition(1, &["x"]))?;
    std::fs::write(v1.join("snap-v2.toml"), definition(2, &["a", "c"]))?;
    let daemon = TestDaemon::start(&args(&v1)).await?;
    let mut client = daemon.client().await?;
    release.store(true, std::sync::atomic::Ordering::SeqCst);

    let old_saga = wait_terminal(&mut client, &old, Duration::from_secs(30)).await?;
    assert_eq!(old_saga.status, SagaStatus::Completed as i32);
    assert_eq!(old_saga.definition_version, 1);
    let names: Vec<&str> = old_saga
        .steps
        .iter()
        .map(|step| step.name.as_str())
        .collect();
    assert_eq!(names, ["a", "b"]);
    let old_steps: Vec<String> = participant
        .calls_for(&old)
        .iter()
        .map(|call| call.step.clone())
        .collect();
    assert!(
        old_steps.iter().all(|step| step == "a" || step == "b"),
        "{old_steps:?}"
    );
    assert!(old_steps.iter().any(|step| step == "b"));

    let new = start_saga(&mut client, "snap", json!({"customer_id": "c"})).await?;
    let new_saga = wait_terminal(&mut client, &new, Duration::from_secs(30)).await?;
    assert_eq!(new_saga.status, SagaStatus::Completed as i32);
    assert_eq!(new_saga.definition_version, 2);
    let new_steps: Vec<String> = participant
        .calls_for(&new)
        .iter()
        .map(|call| call.step.clone())
        .collect();
    assert_eq!(new_steps, ["a", "c"]);

    daemon.stop().await?;
    db.drop_database().await?;
    Ok(())
}

/// A running saga's snapshot names a participant that sagad, restarted with other definitions,
/// no longer has an address for: the call cannot be sent, so the step is refused with the
/// reason (not retried for ever), and the saga compensates what it did.
#[tokio::test]
async fn a_call_that_cannot_be_sent_is_refused_with_the_reason() -> anyhow::Result<()> {
    let db = TestDatabase::new("not_sent");
    let two_participants = r#"
name = "gone"
version = 1

[defaults]
timeout = "2s"
retry = { max_attempts = 0, initial_delay = "200ms", multiplier = 1.0, max_delay = "200ms", jitter = 0.0 }

[[steps]]
name = "a"
participant = "p"
action = "Do_a"
compensation = "Undo_a"

[[steps]]
name = "b"
participant = "q"
action = "Do_b"
"#;
    let p = FakeParticipant::start("p").await?;
    // q never gets through, so the saga is waiting on step b when sagad stops.
    let q = FakeParticipant::start_scripted(
        "q",
        Arc::new(|_, _| Answer::status(tonic::Code::Unavailable)),
    )
    .await?;
    let defs = Scratch::defs(&[("gone.toml", two_participants)])?;
    let args = vec![
        "--database-url".to_owned(),
        db.url.clone(),
        "--defs".to_owned(),
        defs.display().to_string(),
        "--participant".to_owned(),
        p.flag(),
    ];
    let daemon =
        TestDaemon::start(&[args.clone(), vec!["--participant".to_owned(), q.flag()]].concat())
            .await?;
    let mut client = daemon.client().await?;
    let saga_id = start_saga(&mut client, "gone", json!({})).await?;
    wait_until(&mut client, &saga_id, Duration::from_secs(30), |saga| {
        saga.steps.get(1).is_some_and(|step| step.attempts >= 1)
    })
    .await?;
    daemon.stop().await?;

    // The definitions no longer use q, and sagad is given no address for it.
    let one_participant = two_participants
        .split("[[steps]]\nname = \"b\"")
        .next()
        .unwrap_or_default()
        .to_owned();
    std::fs::write(defs.join("gone.toml"), one_participant)?;
    let daemon = TestDaemon::start(&args).await?;
    let mut client = daemon.client().await?;
    let saga = wait_terminal(&mut client, &saga_id, Duration::from_secs(30)).await?;
    let b = &saga.steps[1];
    println!("step b: {:?}; saga: {}", b.last_error, saga.failure_reason);
    assert_eq!(saga.status, SagaStatus::Compensated as i32, "{saga:?}");
    assert!(
        b.last_error.contains("NOT_SENT") && b.last_error.contains("no address"),
        "{:?}",
        b.last_error
    );
    let undone: Vec<String> = p
        .calls_for(&saga_id)
        .iter()
        .filter(|call| call.kind == CallKind::Compensate)
        .map(|call| call.step.clone())
        .collect();
    assert_eq!(undone, ["a"]);

    daemon.stop().await?;
    db.drop_database().await?;
    Ok(())
}
