//! Analysts' access: the read-only `analyst` user runs the five example
//! queries of `schemas/SCHEMA.md` exactly as written, on data that went
//! through the pipeline, and cannot write.

use usage_e2e::pipeline::{event, Pipeline, Site};
use usage_service_kit::clickhouse::ClickHouseArgs;

const SCHEMA_MD: &str = include_str!("../../schemas/SCHEMA.md");

/// The ```sql blocks of the document, in order.
fn examples() -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in SCHEMA_MD.lines() {
        match (&mut current, line.trim()) {
            (None, "```sql") => current = Some(String::new()),
            (Some(sql), "```") => {
                out.push(sql.trim().to_string());
                current = None;
            }
            (Some(sql), _) => {
                sql.push_str(line);
                sql.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

#[tokio::test]
async fn the_analyst_runs_the_documented_queries_and_cannot_write() {
    let p = Pipeline::start(true).await;
    let (free, pro) = (Site::new(1), Site::new(2));
    assert_eq!(p.register(&free, "free").await.0, 201);
    assert_eq!(p.register(&pro, "pro").await.0, 201);
    let when = usage_e2e::a_minute_ago_today();
    let at = when.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for (site, n) in [(&free, 40u128), (&pro, 5)] {
        let events = (0..n)
            .map(|i| event(i, &site.user_hash(1), "bulk", "gpt-4o-mini", 100, 10, &at))
            .collect();
        assert_eq!(p.send(site, site.batch(events)).await.0, 200);
    }
    let today = when.date_naive().to_string();
    p.wait_for_requests(&free, &today, 40).await;
    p.wait_for_requests(&pro, &today, 5).await;
    // The free plan's warning (38 of 50) reaches the history table just
    // after the rollups: example 5 reads it.
    usage_e2e::eventually(
        "the cap warning",
        std::time::Duration::from_secs(10),
        || async {
            let n: u64 = p
                .clickhouse
                .client()
                .query("SELECT count() FROM governance_decisions FINAL")
                .fetch_one()
                .await
                .unwrap();
            (n > 0).then_some(())
        },
    )
    .await;

    let analyst = ClickHouseArgs {
        user: "analyst".into(),
        password: "analyst".into(),
        ..p.clickhouse.clone()
    }
    .client();
    let queries = examples();
    assert_eq!(queries.len(), 5, "SCHEMA.md has five example queries");
    for sql in &queries {
        let mut cursor = analyst
            .query(sql)
            .fetch_bytes("TSV")
            .unwrap_or_else(|e| panic!("{sql}\n{e}"));
        let mut out = Vec::new();
        while let Some(chunk) = cursor.next().await.unwrap_or_else(|e| panic!("{sql}\n{e}")) {
            out.extend_from_slice(&chunk);
        }
        let text = String::from_utf8(out).unwrap();
        assert!(!text.trim().is_empty(), "no rows from:\n{sql}");
    }
    // Example 1's numbers are exact: 45 generations this month.
    let rows: Vec<(String, u64)> = analyst
        .query("SELECT model, sum(requests) FROM usage_monthly FINAL WHERE month = toStartOfMonth(today()) GROUP BY model")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(rows, [("gpt-4o-mini".to_string(), 45)]);

    // Read-only: no writes, no DDL.
    for sql in [
        "INSERT INTO model_prices (model, effective_from, prompt_usd_per_1k, completion_usd_per_1k) VALUES ('x', today(), 0, 0)",
        "ALTER TABLE usage_events DELETE WHERE 1",
        "DROP TABLE usage_daily",
    ] {
        let err = analyst.query(sql).execute().await.unwrap_err().to_string();
        assert!(err.contains("READONLY") || err.contains("readonly"), "{sql}: {err}");
    }
    p.stop().await;
}
