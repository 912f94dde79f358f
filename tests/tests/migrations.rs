//! Migrations with many replicas: replicas started at the same instant on a database that does
//! not exist yet create and migrate it once and all serve; a replica refuses a database whose
//! schema a newer release migrated.

use anyhow::{Context, ensure};
use sagad_e2e::*;
use sqlx::Connection;

/// A definition whose participant is never called here.
const ONE_STEP: &str = "name = \"one\"\nversion = 1\n\n[[steps]]\nname = \"a\"\nparticipant = \"p\"\naction = \"Do\"\n";

/// Flags for a replica on `db` with no definitions' participants to reach.
fn replica_args(db: &TestDatabase, defs: &Scratch) -> Vec<String> {
    [
        "--database-url",
        &db.url,
        "--defs",
        &defs.display().to_string(),
        "--lease-ttl",
        "2s",
        "--poll-interval",
        "200ms",
        "--participant",
        "p=http://127.0.0.1:1",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// How many migrations this release has.
fn migration_files() -> anyhow::Result<i64> {
    let dir = repo_root().join("migrations/orchestrator");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
        if entry?.path().extension().is_some_and(|ext| ext == "sql") {
            count += 1;
        }
    }
    Ok(count)
}

#[tokio::test]
async fn replicas_started_at_once_on_an_empty_server_migrate_once_and_all_serve()
-> anyhow::Result<()> {
    let db = TestDatabase::new("migrate_race");
    let defs = Scratch::defs(&[("one.toml", ONE_STEP)])?;
    let logs = Scratch::logs("migrate-race-logs")?;
    let args = replica_args(&db, &defs);
    let outcome = async {
        let (a, b, c) = tokio::join!(
            SagadProcess::start(&args, &logs),
            SagadProcess::start(&args, &logs),
            SagadProcess::start(&args, &logs),
        );
        let replicas = [a?, b?, c?];
        for replica in &replicas {
            ensure!(
                daemon::serving(replica.addr).await,
                "a replica does not serve"
            );
        }
        let mut conn = db.connect().await?;
        let (applied, distinct): (i64, i64) = sqlx::query_as(
            "select count(*), count(distinct version) from _sqlx_migrations where success",
        )
        .fetch_one(&mut conn)
        .await?;
        let files = migration_files()?;
        ensure!(
            applied == files && distinct == files,
            "{applied} migrations recorded ({distinct} distinct), {files} files"
        );
        conn.close().await?;
        Ok(())
    }
    .await;
    db.drop_database().await?;
    outcome
}

#[tokio::test]
async fn a_schema_migrated_by_a_newer_release_is_refused_in_one_line() -> anyhow::Result<()> {
    let db = TestDatabase::new("schema_newer");
    let defs = Scratch::defs(&[("one.toml", ONE_STEP)])?;
    let logs = Scratch::logs("schema-newer-logs")?;
    let args = replica_args(&db, &defs);
    let outcome = async {
        let mut sagad = SagadProcess::start(&args, &logs).await?;
        sagad.terminate().await?;
        let mut conn = db.connect().await?;
        sqlx::query(
            "insert into _sqlx_migrations (version, description, success, checksum, \
             execution_time) values (99991231000000, 'from a newer release', true, '\\x00', 0)",
        )
        .execute(&mut conn)
        .await?;
        conn.close().await?;
        let mut all = args.clone();
        all.extend(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"].map(str::to_owned));
        let (status, stderr) = daemon::run_to_exit(&all).await?;
        ensure!(!status.success(), "sagad ran on a newer schema");
        let last = stderr.lines().last().unwrap_or_default();
        ensure!(
            last.starts_with("sagad:") && last.contains("newer") && last.contains("99991231000000"),
            "the refusal should say the schema is newer: {stderr}"
        );
        Ok(())
    }
    .await;
    db.drop_database().await?;
    outcome
}
