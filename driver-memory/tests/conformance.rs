//! The shared conformance suite on the memory driver.

mod conformance {
    fascicle_conformance::suite!(async {
        let store = fascicle_memory::MemoryStore::new();
        let tamper = store.clone();
        let twin = store.clone();
        fascicle_conformance::Fixture::new(store)
            .with_tamper(move |parent, total| {
                tamper.overwrite_children_total_for_conformance(parent, total);
                async {}
            })
            // A clone is another handle on the same data: the in-process equivalent of a
            // second pool on one schema.
            .with_twin(move || {
                let twin: std::sync::Arc<dyn fascicle_api::Store> =
                    std::sync::Arc::new(twin.clone());
                async move { twin }
            })
    });
}
