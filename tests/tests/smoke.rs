use std::time::Duration;

use sagad_e2e::*;
use serde_json::json;

#[tokio::test]
async fn smoke() -> anyhow::Result<()> {
    let db = TestDatabase::new("smoke");
    let order = FakeParticipant::start("order").await?;
    let payment = FakeParticipant::start("payment").await?;
    let shipping = FakeParticipant::start("shipping").await?;
    let defs = repo_root().join("saga-defs");
    let args: Vec<String> = vec![
        "--database-url".into(), db.url.clone(),
        "--defs".into(), defs.display().to_string(),
        "--participant".into(), order.flag(),
        "--participant".into(), payment.flag(),
        "--participant".into(), shipping.flag(),
    ];
    let daemon = TestDaemon::start(&args).await?;
    let mut client = daemon.client().await?;
    let id = start_saga(&mut client, "order_fulfillment", json!({"customer_id": "c1", "amount_cents": 100, "country": "FR"})).await?;
    let saga = wait_terminal(&mut client, &id, Duration::from_secs(30)).await?;
    println!("{saga:#?}");
    println!("{:#?}", order.calls_for(&id));
    daemon.stop().await?;
    db.drop_database().await?;
    Ok(())
}
