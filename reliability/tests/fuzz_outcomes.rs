//! Handler results and errors of generated content on every driver (issue #19): a result
//! is recorded and read back identical, or — when no backend could store it (a NUL
//! character, nesting past 100 levels) — the operation fails with a readable stored error;
//! an error text is stored with NUL replaced and cut at 16 KiB. The worker keeps going:
//! every operation ends, whatever the others returned.

use std::sync::Arc;
use std::time::Duration;

use fascicle::postgres::PostgresStore;
use fascicle::{HandlerError, NewOperation, OperationId, Queue, Registry, Status, Store, Worker};
use fascicle_reliability::generated::{cases, json, text};
use proptest::prelude::*;
use serde_json::{Value, json};

/// What a handler returns.
#[derive(Debug, Clone)]
enum Returned {
    Result(Value),
    Error(String),
}

/// Results of any content, some nested past what can be stored; errors of any text, some
/// longer than what is kept.
fn returned() -> impl Strategy<Value = Returned> {
    prop_oneof![
        6 => json().prop_map(Returned::Result),
        // Around the limit: 100 levels are stored, 101 are not.
        1 => (95usize..106).prop_map(|depth| {
            let mut value = json!("deep");
            for _ in 0..depth {
                value = json!([value]);
            }
            Returned::Result(value)
        }),
        3 => text().prop_map(Returned::Error),
        1 => (16_000usize..17_500, any::<char>()).prop_map(|(n, c)| {
            Returned::Error(std::iter::repeat_n(c, n / c.len_utf8().max(1)).collect())
        }),
    ]
}

/// Whether `value` holds a NUL character (in a string or a key) or nests past 100 levels:
/// what no backend stores.
fn unstorable(value: &Value, depth: usize) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => depth >= 100 || items.iter().any(|v| unstorable(v, depth + 1)),
        Value::Object(map) => {
            depth >= 100
                || map
                    .iter()
                    .any(|(k, v)| k.contains('\0') || unstorable(v, depth + 1))
        }
        _ => false,
    }
}

/// The error text as stored: NUL replaced, cut at 16 KiB (at a character boundary).
fn stored_error(text: &str) -> String {
    let mut text = text.replace('\0', "\u{FFFD}");
    if text.len() > 16 * 1024 {
        let mut end = 16 * 1024;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("… (cut)");
    }
    text
}

async fn stores(dir: &std::path::Path) -> (Vec<Arc<dyn Store>>, Option<PostgresStore>) {
    fascicle_reliability::every_store(
        dir,
        "outcomes.db",
        "the PostgreSQL outcome fuzz",
        "fascicle_o",
    )
    .await
}

/// Runs a worker until every one of `ids` is terminal (30 s at most).
async fn run(store: &Arc<dyn Store>, returns: Arc<Vec<Returned>>, ids: &[OperationId]) -> u64 {
    let mut registry = Registry::new();
    registry.register("fuzzed", move |input: Value, _| {
        let returned = returns[input["i"].as_u64().unwrap() as usize].clone();
        async move {
            match returned {
                Returned::Result(value) => Ok(value),
                Returned::Error(text) => Err(HandlerError::permanent(text)),
            }
        }
    });
    let worker = Worker::new(Arc::clone(store), registry)
        .poll_interval(Duration::from_millis(10))
        .maintenance_interval(Duration::from_millis(100));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run(async {
        let _ = stop_rx.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    'wait: loop {
        for id in ids {
            let op = store.get(*id).await.unwrap().unwrap();
            if !op.status.is_terminal() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{}: operation {id} is still {:?} after 30 s: the worker stopped going",
                    store.driver(),
                    op.status
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue 'wait;
            }
        }
        break;
    }
    let _ = stop_tx.send(());
    let report = handle.await.unwrap().unwrap();
    report.completed + report.failed
}

async fn check(stores: &[Arc<dyn Store>], returns: &[Returned]) {
    let returns = Arc::new(returns.to_vec());
    for store in stores {
        let driver = store.driver();
        let queue = Queue::new(Arc::clone(store));
        let mut ids = Vec::new();
        for i in 0..returns.len() {
            let receipt = queue
                .submit(NewOperation::new("fuzzed", json!({ "i": i })).with_max_attempts(1))
                .await
                .unwrap();
            ids.push(receipt.id);
        }
        let ended = run(store, Arc::clone(&returns), &ids).await;
        assert_eq!(
            ended,
            returns.len() as u64,
            "{driver}: every attempt recorded"
        );
        for (id, returned) in ids.iter().zip(returns.iter()) {
            let op = store.get(*id).await.unwrap().unwrap();
            match returned {
                Returned::Result(value) if unstorable(value, 0) => {
                    assert_eq!(op.status, Status::Failed, "{driver}: {value}");
                    let error = op.error.unwrap_or_default();
                    assert!(
                        error.starts_with(&fascicle::messages::unstorable_outcome("")),
                        "{driver}: {error}"
                    );
                    assert_eq!(op.result, None, "{driver}");
                }
                Returned::Result(value) => {
                    assert_eq!(op.status, Status::Completed, "{driver}: {:?}", op.error);
                    assert_eq!(op.result.as_ref(), Some(value), "{driver}");
                }
                Returned::Error(text) => {
                    assert_eq!(op.status, Status::Failed, "{driver}");
                    assert_eq!(
                        op.error.as_deref(),
                        Some(stored_error(text).as_str()),
                        "{driver}"
                    );
                }
            }
        }
    }
}

/// Whole floats from 1e16 to 2^64 returned by handlers: serde_json writes them as `1e17`,
/// which PostgreSQL's `jsonb` kept as a decimal and gave back as an integer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_floats_as_results_round_trip_on_every_driver() {
    let dir = tempfile::tempdir().unwrap();
    let (stores, postgres) = stores(dir.path()).await;
    let returns: Vec<Returned> = [1e16, 1e17, -1e17, 1.5e19, 18446744073709549568.0, 0.5]
        .iter()
        .map(|&f| Returned::Result(json!({ "f": f, "list": [f, -f] })))
        .chain([Returned::Result(json!(1e17))])
        .collect();
    check(&stores, &returns).await;
    if let Some(store) = postgres {
        fascicle_reliability::drop_schema(&store).await;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(12), ..ProptestConfig::default() })]

    #[test]
    fn generated_results_and_errors_are_recorded_or_fail_readably_on_every_driver(
        returns in proptest::collection::vec(returned(), 1..10)
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (stores, postgres) = stores(dir.path()).await;
            check(&stores, &returns).await;
            if let Some(store) = postgres {
                fascicle_reliability::drop_schema(&store).await;
            }
        });
    }
}
