//! The explorer's pure parts: its query strings, its pages' escaping and who is offered which
//! action, and its pictures.

use std::sync::Arc;

use chrono::{TimeZone as _, Utc};
use serde_json::json;
use uuid::Uuid;

use super::diagram::{self, DiagramStep};
use super::session::Visitor;
use super::*;
use crate::saga::{StepStatus, StepView};
use crate::store::{EventRecord, Projection, SagaRecord};

#[test]
fn the_lists_filters_read_back_as_they_were_written() {
    let query = ListQuery::parse(Some(
        "type=order_fulfillment&status=FAILED&stuck=1&q=key%20one&after=&unknown=x",
    ))
    .map_err(|error| format!("{error:?}"));
    let Ok(query) = query else {
        panic!("{query:?}");
    };
    assert_eq!(query.saga_type.as_deref(), Some("order_fulfillment"));
    assert_eq!(query.status, Some(SagaStatus::Failed));
    assert!(query.stuck);
    assert_eq!(query.find.as_deref(), Some("key one"));
    assert_eq!(query.after, None);
    assert_eq!(
        query.href(Some("12.ab")),
        "/sagas?type=order_fulfillment&status=FAILED&stuck=1&q=key+one&after=12.ab"
    );
    assert_eq!(ListQuery::default().href(None), "/sagas");
}

#[test]
fn a_bad_filter_is_refused_with_what_is_wrong() {
    for (query, says) in [
        ("status=DONE", "not one of"),
        ("q=a%00b", "NUL"),
        (
            &format!("q={}", "x".repeat(MAX_FIND_BYTES + 1)),
            "over the limit",
        ),
    ] {
        match ListQuery::parse(Some(query)) {
            Err(PageError::BadRequest(message)) => assert!(message.contains(says), "{message}"),
            other => panic!("{query}: {other:?}"),
        }
    }
}

#[test]
fn a_page_cursor_round_trips_and_a_made_up_one_is_refused() {
    let cursor = ListCursor {
        created_at: Utc
            .with_ymd_and_hms(2026, 12, 4, 15, 0, 0)
            .single()
            .unwrap_or_default(),
        saga_id: Uuid::from_u128(7),
    };
    assert_eq!(parse_cursor(&cursor.token()).ok(), Some(cursor));
    for bad in [
        "",
        "12",
        "x.y",
        "12.not-a-uuid",
        "-5.00000000000000000000000000000007",
        "99999999999999999999.00000000000000000000000000000007",
    ] {
        assert!(
            matches!(parse_cursor(bad), Err(PageError::BadRequest(_))),
            "{bad}"
        );
    }
}

#[test]
fn durations_read_as_a_person_says_them() {
    let cases = [
        (0, "0ms"),
        (850, "850ms"),
        (1_250, "1.2s"),
        (42_000, "42s"),
        (125_000, "2m 5s"),
        (3_723_000, "1h 2m"),
        (90_061_000, "1d 1h"),
        (-5, "0ms"),
    ];
    for (millis, said) in cases {
        assert_eq!(pages::span(chrono::Duration::milliseconds(millis)), said);
    }
}

fn step(name: &str, status: StepStatus, last_error: Option<&str>) -> StepView {
    StepView {
        name: name.to_owned(),
        participant: "p".to_owned(),
        status,
        attempts: 1,
        compensation_attempts: 0,
        last_error: last_error.map(str::to_owned),
        output: Some(Arc::new(json!({"note": "</pre><script>alert(3)</script>"}))),
        next_attempt_at: None,
    }
}

fn record(status: SagaStatus, steps: Vec<StepView>) -> SagaRecord {
    let at = Utc
        .with_ymd_and_hms(2026, 12, 4, 15, 0, 0)
        .single()
        .unwrap_or_default();
    SagaRecord {
        saga_id: Uuid::from_u128(42),
        projection: Projection {
            saga_type: "order<b>".to_owned(),
            definition_version: 1,
            status,
            input: Arc::new(json!({
                "customer_id": "<script>alert(1)</script>",
                "sku": "\"><img src=x onerror=alert(2)>",
            })),
            steps,
            failure_reason: Some("<b>refused</b>".to_owned()),
            version: 3,
            correlation_id: "<i>c</i>".to_owned(),
            idempotency_key: Some("k'\"".to_owned()),
            wake_at: None,
            failing_since: None,
        },
        created_at: at,
        updated_at: at,
    }
}

fn history() -> Vec<EventRecord> {
    let at = Utc
        .with_ymd_and_hms(2026, 12, 4, 15, 0, 0)
        .single()
        .unwrap_or_default();
    vec![EventRecord {
        seq: 1,
        event_type: "cancel_requested".to_owned(),
        step: None,
        data: json!({"reason": "<script>alert(4)</script>", "requested_by": "<u>ops</u>"}),
        recorded_at: at,
    }]
}

fn render(visitor: &Visitor, record: &SagaRecord) -> String {
    let history = history();
    pages::saga(&pages::SagaPage {
        visitor,
        record,
        history: &history,
        timeline_limit: 1000,
        now: record.updated_at,
        stuck_cutoff: record.updated_at,
    })
    .into_string()
}

#[test]
fn every_value_from_a_saga_renders_as_text() {
    let steps = vec![step(
        "charge",
        StepStatus::CompensationFailed,
        Some("<img src=y onerror=alert(5)>"),
    )];
    let page = render(
        &Visitor::signed_in(Role::Admin, "root"),
        &record(SagaStatus::Failed, steps),
    );
    for raw in [
        "<script>alert",
        "<img src",
        "<b>",
        "<i>c",
        "<u>ops",
        "</pre><script>",
    ] {
        assert!(!page.contains(raw), "{raw} is in the page as markup");
    }
    for escaped in [
        "&lt;script&gt;alert(1)",
        "&lt;img src=y onerror=alert(5)&gt;",
        "&lt;u&gt;ops&lt;/u&gt;",
    ] {
        assert!(page.contains(escaped), "{escaped} is not in the page");
    }
}

#[test]
fn each_role_is_offered_only_the_actions_it_may_take() {
    let failed = record(
        SagaStatus::Failed,
        vec![step("charge", StepStatus::CompensationFailed, None)],
    );
    let running = record(
        SagaStatus::Running,
        vec![step("charge", StepStatus::Running, None)],
    );
    let offered = |role: Role, record: &SagaRecord| {
        let page = render(&Visitor::signed_in(role, "someone"), record);
        (
            page.contains("id=\"cancel-open\""),
            page.contains("id=\"retry-open\""),
        )
    };
    assert_eq!(offered(Role::Reader, &running), (false, false));
    assert_eq!(offered(Role::Reader, &failed), (false, false));
    assert_eq!(offered(Role::Operator, &running), (true, false));
    assert_eq!(offered(Role::Operator, &failed), (false, false));
    assert_eq!(offered(Role::Admin, &running), (true, false));
    assert_eq!(offered(Role::Admin, &failed), (false, true));
    let page = render(&Visitor::signed_in(Role::Admin, "root"), &failed);
    assert!(
        page.contains(r#"name="skip" value="charge""#),
        "the step to skip is not offered"
    );
    assert!(
        page.contains(&"ab".repeat(32)),
        "the forms carry no csrf value"
    );
}

fn drawn(statuses: &[Option<StepStatus>], saga: Option<SagaStatus>) -> String {
    let names = ["a", "b", "c", "d"];
    let steps: Vec<DiagramStep<'_>> = statuses
        .iter()
        .zip(names)
        .map(|(status, name)| DiagramStep {
            name,
            participant: "p",
            action: Some("Do"),
            compensation: Some("Undo"),
            status: *status,
        })
        .collect();
    diagram::steps(&steps, saga).into_string()
}

#[test]
fn the_diagram_draws_every_step_and_the_way_back_only_when_the_saga_went_back() {
    use StepStatus::*;
    let running = drawn(
        &[Some(Succeeded), Some(Running), Some(Pending), Some(Pending)],
        Some(SagaStatus::Running),
    );
    assert_eq!(running.matches("<g class=\"step").count(), 4);
    assert!(running.contains(r#"data-step="c" data-status="PENDING""#));
    assert!(!running.contains("compensation-path"));
    let compensated = drawn(
        &[
            Some(Compensated),
            Some(Compensated),
            Some(Failed),
            Some(Pending),
        ],
        Some(SagaStatus::Compensated),
    );
    assert!(compensated.contains("compensation-path"));
    // From the third step (x = 12 + 2 * 246 + 100) back to the first.
    assert!(compensated.contains(r#"d="M604,78"#), "{compensated}");
    let failed = drawn(
        &[
            Some(Succeeded),
            Some(CompensationFailed),
            Some(Failed),
            Some(Pending),
        ],
        Some(SagaStatus::Failed),
    );
    // The path stops at the step whose compensation stopped it (x = 12 + 246 + 100 - 12).
    assert!(failed.contains(" L346,82\""), "{failed}");
    let definition = drawn(&[None, None], None);
    assert!(
        definition.contains(r#"data-status="none""#) && !definition.contains("compensation-path")
    );
}

#[test]
fn the_chart_stacks_the_minutes_of_the_last_hour() {
    let now = Utc
        .with_ymd_and_hms(2026, 12, 4, 15, 30, 20)
        .single()
        .unwrap_or_default();
    let minute = |m: u32| {
        Utc.with_ymd_and_hms(2026, 12, 4, 15, m, 0)
            .single()
            .unwrap_or_default()
    };
    let chart = diagram::finished_chart(
        &[
            (minute(30), SagaStatus::Completed, 6),
            (minute(30), SagaStatus::Failed, 2),
            (minute(10), SagaStatus::Compensated, 3),
            (
                minute(10) - chrono::Duration::hours(2),
                SagaStatus::Completed,
                99,
            ),
        ],
        now,
    )
    .into_string();
    assert_eq!(chart.matches("<g class=\"minute\"").count(), 2, "{chart}");
    assert!(chart.contains(r#"data-minute="15:30" data-total="8""#));
    assert!(chart.contains(r#"data-minute="15:10" data-total="3""#));
    // The tallest bar fills the plot (90 high): 6 completed below 2 failed.
    assert!(
        chart.contains(r#"class="bar s-COMPLETED" x="590" y="23" width="9" height="67""#),
        "{chart}"
    );
    assert!(
        chart.contains(r#"class="bar s-FAILED" x="590" y="1" width="9" height="22""#),
        "{chart}"
    );
}
