//! The shared conformance suite on the memory driver.

mod conformance {
    fascicle_conformance::suite!(async {
        fascicle_conformance::Fixture::new(fascicle_memory::MemoryStore::new())
    });
}
