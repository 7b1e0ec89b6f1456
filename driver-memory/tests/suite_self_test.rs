//! Proof the conformance suite can fail: run against a store with the original bug (the
//! parent committed outside the batch's transaction), the rollback cases must panic.

use std::sync::Arc;

use fascicle_api::Store;
use fascicle_conformance::cases;
use fascicle_conformance::faults::AutocommitParentStore;
use fascicle_memory::MemoryStore;

fn outcome(case: fascicle_conformance::CaseFn, store: Arc<dyn Store>) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        tokio::spawn(case(store)).await.map_err(|e| {
            let panic = e.into_panic();
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    })
}

fn broken() -> Arc<dyn Store> {
    Arc::new(AutocommitParentStore::new(Arc::new(MemoryStore::new())))
}

#[test]
fn suite_catches_a_parent_committed_outside_the_batch() {
    let message = outcome(|s| Box::pin(cases::rollback_on_child_failure(s)), broken())
        .expect_err("rollback_on_child_failure passed on a store that leaks parents");
    assert!(message.contains("survived a failed batch"), "{message}");

    outcome(|s| Box::pin(cases::rollback_on_commit_failure(s)), broken())
        .expect_err("rollback_on_commit_failure passed on a store that leaks parents");
    outcome(
        |s| Box::pin(cases::large_batch_10k_children_commits_atomically(s)),
        broken(),
    )
    .expect_err("the 10k case passed on a store that leaks parents");
}

#[test]
fn the_same_cases_pass_on_the_real_store() {
    let real: Arc<dyn Store> = Arc::new(MemoryStore::new());
    outcome(|s| Box::pin(cases::rollback_on_child_failure(s)), real).unwrap();
}
