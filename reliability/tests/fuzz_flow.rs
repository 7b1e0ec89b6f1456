//! The inputs of flow control and scheduling fuzzed (issue #19, for what issue #15 added):
//! rate texts, limits, cron expressions, zones, intervals, graces, catch-ups, unique keys
//! and periods. Each is accepted and then behaves (a schedule accepted plans without a
//! panic, its ticks in order and inside the window asked), or is refused with
//! `InvalidInput` — never a panic, never another error.

use std::time::Duration;

use fascicle::chrono::{DateTime, TimeDelta, Utc};
use fascicle::{CatchUp, Error, KindLimit, NewOperation, Queue, RateLimit, Schedule};
use fascicle_reliability::generated::cases;
use proptest::prelude::*;
use serde_json::json;

/// Cron-like text: mostly five or six fields of what cron uses (valid for every field, or
/// only for some), sometimes anything.
fn cron_text() -> impl Strategy<Value = String> {
    let usual = prop_oneof![
        3 => Just("*".to_string()),
        2 => (0u32..24).prop_map(|n| n.to_string()),
        2 => (1u32..13).prop_map(|n| format!("*/{n}")),
        1 => (0u32..12, 12u32..24).prop_map(|(a, b)| format!("{a}-{b}")),
        1 => (1u32..12, 12u32..28).prop_map(|(a, b)| format!("{a},{b}")),
    ];
    let odd = prop_oneof![
        (0u32..100).prop_map(|n| n.to_string()),
        (0u32..70, 0u32..70).prop_map(|(a, b)| format!("{a}-{b}")),
        (0u32..70).prop_map(|n| format!("*/{n}")),
        Just("L".to_string()),
        Just("5#3".to_string()),
        Just("15W".to_string()),
        Just("MON-FRI".to_string()),
        Just("JAN".to_string()),
        Just("?".to_string()),
        ".{0,4}",
    ];
    let field = prop_oneof![6 => usual, 1 => odd];
    prop_oneof![
        4 => proptest::collection::vec(field.clone(), 5..=5).prop_map(|f| f.join(" ")),
        2 => proptest::collection::vec(field.clone(), 6..=6).prop_map(|f| f.join(" ")),
        1 => proptest::collection::vec(field, 1..9).prop_map(|f| f.join(" ")),
        1 => ".{0,30}",
        1 => Just("@hourly".to_string()),
    ]
}

fn zone() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("UTC".to_string()),
        Just("Europe/Paris".to_string()),
        Just("America/New_York".to_string()),
        Just("Australia/Lord_Howe".to_string()),
        Just("Asia/Kathmandu".to_string()),
        ".{0,20}",
    ]
}

fn catch_up() -> impl Strategy<Value = CatchUp> {
    prop_oneof![
        Just(CatchUp::Skip),
        Just(CatchUp::RunOnce),
        any::<u32>().prop_map(|max| CatchUp::RunAll { max }),
        (1u32..50).prop_map(|max| CatchUp::RunAll { max }),
    ]
}

fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    // 1990 to 2100, to the microsecond.
    (631_152_000_000_000i64..4_102_444_800_000_000)
        .prop_map(|us| DateTime::from_timestamp_micros(us).unwrap())
}

/// A plan of an accepted schedule: ticks strictly after `last`, at most `now`, oldest
/// first, its last tick handled never before `last`, its next tick after `now`.
fn check_plan(s: &Schedule, last: DateTime<Utc>, now: DateTime<Utc>) {
    let plan = s.plan(last, now).unwrap();
    assert!(plan.run.windows(2).all(|w| w[0] < w[1]), "{plan:?}");
    assert!(plan.run.iter().all(|t| *t > last && *t <= now), "{plan:?}");
    assert!(plan.run.len() <= 10_000 + 10_000, "{}", plan.run.len());
    assert!(plan.last_tick >= last);
    assert!(plan.next_tick > now);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    #[test]
    fn any_rate_text_parses_to_a_valid_rate_or_is_refused(text in ".{0,16}|[0-9]{1,12}/[0-9]{0,12}(ms|s|m|h|d|y)?") {
        match text.parse::<RateLimit>() {
            Ok(rate) => prop_assert!(fascicle::validate_limit("k", &KindLimit::rate(rate)).is_ok()),
            Err(Error::InvalidInput(_)) => {}
            Err(other) => prop_assert!(false, "{text:?}: {other:?}"),
        }
    }

    #[test]
    fn any_limit_is_valid_or_refused_and_its_room_never_panics(
        running in proptest::option::of(any::<u32>()),
        starts in any::<u32>(),
        per_us in any::<u64>(),
        busy in any::<u64>(),
        recent in proptest::collection::vec(instant(), 0..20),
        now in instant(),
    ) {
        let limit = KindLimit { running, rate: Some(RateLimit::new(starts, Duration::from_micros(per_us))) };
        match fascicle::validate_limit("kind", &limit) {
            Ok(()) => {
                let room = limit.room(busy, &recent, now);
                if let Some(max) = running {
                    prop_assert!(room <= max as usize);
                }
                let kept = limit.record_starts(&recent, room.min(1000), now);
                prop_assert!(kept.len() <= starts as usize);
                let _ = limit.rate_opens_at(&kept, now);
            }
            Err(Error::InvalidInput(_)) => {}
            Err(other) => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn any_cron_schedule_is_valid_and_plans_or_is_refused(
        expression in cron_text(),
        zone in zone(),
        catch_up in catch_up(),
        grace_s in prop_oneof![1 => Just(0u64), 9 => 1u64..90_000],
        last in instant(),
        ahead_s in 0i64..400_000,
    ) {
        let s = Schedule::cron("fuzz", expression.clone(), NewOperation::new("k", json!(null)))
            .in_zone(zone.clone())
            .catch_up(catch_up)
            .grace(Duration::from_secs(grace_s));
        match s.validate() {
            Ok(()) => check_plan(&s, last, last + TimeDelta::seconds(ahead_s)),
            Err(Error::InvalidInput(message)) => prop_assert!(message.contains("fuzz"), "{message}"),
            Err(other) => prop_assert!(false, "{expression:?} {zone:?}: {other:?}"),
        }
    }

    #[test]
    fn any_interval_schedule_is_valid_and_plans_or_is_refused(
        interval_us in prop_oneof![1 => any::<u64>(), 4 => 0u64..10_000_000_000],
        catch_up in catch_up(),
        grace_us in prop_oneof![1 => any::<u64>(), 4 => 1_000_000u64..86_400_000_000],
        last in instant(),
        ahead_us in 0i64..1_000_000_000_000,
    ) {
        let s = Schedule::every("fuzz", Duration::from_micros(interval_us), NewOperation::new("k", json!(null)))
            .catch_up(catch_up)
            .grace(Duration::from_micros(grace_us));
        match s.validate() {
            Ok(()) => check_plan(&s, last, last + TimeDelta::microseconds(ahead_us)),
            Err(Error::InvalidInput(_)) => {}
            Err(other) => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn any_unique_key_and_period_submits_or_is_refused(
        key in ".{0,12}|[a-z]{250,260}",
        period_us in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let store = fascicle::connect("memory://").await.unwrap();
            let queue = Queue::new(std::sync::Arc::clone(&store));
            let op = NewOperation::new("k", json!(null));
            let op = match period_us {
                None => op.unique(key.clone()),
                Some(us) => op.unique_within(key.clone(), Duration::from_micros(us)),
            };
            match queue.submit(op.clone()).await {
                Ok(first) => {
                    let again = queue.submit(op).await.unwrap();
                    assert_eq!((again.id, again.created), (first.id, false));
                }
                Err(Error::InvalidInput(_)) => {
                    assert!(store.stats().await.unwrap().kinds.is_empty(), "a refused submit wrote");
                }
                Err(other) => panic!("{key:?}: {other:?}"),
            }
        });
    }
}
