//! Every parser of text a user or a service hands fascicle: operation ids, statuses,
//! failure policies, rates, kinds, limits, and schedules (cron expressions with a zone,
//! intervals) — planned over a window when valid. Any input: a value or `InvalidInput`,
//! never a panic.
#![no_main]

use std::str::FromStr;
use std::time::Duration;

use fascicle_api::chrono::{TimeZone, Utc};
use fascicle_api::{
    Error, FailurePolicy, KindLimit, NewOperation, OperationId, RateLimit, Schedule, Status,
};
use libfuzzer_sys::fuzz_target;

fn typed<T>(result: fascicle_api::Result<T>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(Error::InvalidInput(message)) => {
            assert!(!message.is_empty());
            None
        }
        Err(other) => panic!("not InvalidInput: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (head, tail) = text.split_at(text.find('|').unwrap_or(text.len()));
    let _ = OperationId::from_str(text);
    let _ = Status::from_str(text);
    let _ = FailurePolicy::from_str(text);
    let _ = typed(fascicle_api::validate_kind(text));
    if let Ok(rate) = RateLimit::from_str(text) {
        let limit = KindLimit {
            running: None,
            rate: Some(rate),
        };
        if typed(fascicle_api::validate_limit("fuzzed", &limit)).is_some() {
            let now = Utc::now();
            let _ = limit.room(0, &[now], now);
        }
    }
    let operation = NewOperation::new("fuzzed", serde_json::Value::Null);
    let start = Utc.with_ymd_and_hms(2026, 3, 29, 0, 0, 0).unwrap();
    let end = start + fascicle_api::chrono::Duration::days(2);
    let cron =
        Schedule::cron("fuzzed", head, operation.clone()).in_zone(tail.trim_start_matches('|'));
    if typed(cron.validate()).is_some() {
        let _ = typed(cron.plan(start, end));
    }
    let bytes: [u8; 8] = std::array::from_fn(|i| data.get(i).copied().unwrap_or(0));
    let every = Schedule::every(
        "fuzzed",
        Duration::from_nanos(u64::from_le_bytes(bytes)),
        operation,
    );
    if typed(every.validate()).is_some() {
        let _ = typed(every.plan(start, end));
    }
});
