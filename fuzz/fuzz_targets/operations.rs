//! `Queue` validation of operations and batches built from arbitrary JSON (a kind, a
//! payload, a serialization key, a priority, attempts, children): prepared, or refused
//! with `InvalidInput`; never a panic.
#![no_main]

use fascicle_api::{Error, Limits, NewBatch, NewOperation};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn operation(value: &Value) -> NewOperation {
    let kind = value["kind"].as_str().unwrap_or("fuzzed").to_string();
    let mut op = NewOperation::new(kind, value["payload"].clone());
    if let Some(key) = value["key"].as_str() {
        op = op.with_serialization_key(key);
    }
    if let Some(priority) = value["priority"].as_i64() {
        op = op.with_priority(priority as i32);
    }
    if let Some(attempts) = value["attempts"].as_u64() {
        op = op.with_max_attempts(attempts as u32);
    }
    op
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let limits = Limits::default();
    let now = fascicle_api::chrono::Utc::now();
    match limits.prepare_operation(operation(&value), None, now) {
        Ok(record) => assert!(!record.kind.is_empty()),
        Err(Error::InvalidInput(message)) => assert!(!message.is_empty()),
        Err(other) => panic!("not InvalidInput: {other:?}"),
    }
    let children: Vec<NewOperation> = value["children"]
        .as_array()
        .map(|items| items.iter().map(operation).collect())
        .unwrap_or_default();
    let kind = value["batch"]
        .as_str()
        .unwrap_or("fuzzed_batch")
        .to_string();
    let batch = NewBatch::new(kind)
        .with_metadata(value["metadata"].clone())
        .children(children);
    match limits.prepare_batch(batch) {
        Ok(prepared) => assert!(prepared.rows() >= 1),
        Err(Error::InvalidInput(message)) => assert!(!message.is_empty()),
        Err(other) => panic!("not InvalidInput: {other:?}"),
    }
});
