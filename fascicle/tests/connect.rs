//! `fascicle::connect` opens the right driver for each URL form.

#![cfg(feature = "sqlite")]

use fascicle::{Error, NewBatch, NewOperation, Queue};
use serde_json::json;

async fn round_trip(url: &str, driver: &str) {
    let store = fascicle::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(store.driver(), driver, "{url}");
    let receipt = Queue::new(store.clone())
        .submit_batch(NewBatch::new("batch").child(NewOperation::new("noop", json!({}))))
        .await
        .unwrap();
    assert_eq!(store.children_of(receipt.parent_id).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_url_form_opens_its_driver() {
    let dir = tempfile::tempdir().unwrap();
    round_trip(
        &format!("sqlite://{}", dir.path().join("a.db").display()),
        "sqlite",
    )
    .await;
    round_trip(&dir.path().join("bare.db").display().to_string(), "sqlite").await;
    round_trip("sqlite::memory:", "sqlite").await;
    #[cfg(feature = "memory")]
    round_trip("memory://", "memory").await;
}

#[tokio::test]
async fn unknown_schemes_and_unreachable_servers_are_clear_errors() {
    let err = fascicle::connect("mysql://root@127.0.0.1/test")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput(m) if m.contains("mysql://")),
        "{err}"
    );

    #[cfg(feature = "postgres")]
    {
        // Port 1: nothing listens there. The password must not leak into the error.
        let err = fascicle::connect("postgres://root:topsecretpw@127.0.0.1:1/test")
            .await
            .unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("topsecretpw"), "password leaked: {shown}");
        assert!(
            err.is_transient(),
            "an unreachable server is transient: {err}"
        );
    }
}
