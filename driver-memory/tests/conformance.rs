//! The shared conformance suite on the memory driver.

mod conformance {
    fascicle_conformance::suite!(async {
        let store = fascicle_memory::MemoryStore::new();
        let tamper = store.clone();
        fascicle_conformance::Fixture::new(store).with_tamper(move |parent, total| {
            tamper.overwrite_children_total_for_conformance(parent, total);
            async {}
        })
    });
}
