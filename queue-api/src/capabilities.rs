//! What a store can do, declared by the store itself.

/// Plain data describing a driver. Every flag defaults to off, so a driver opts in.
///
/// Shared code branches on these flags; they come from [`Store::capabilities`](crate::Store::capabilities),
/// never from an argument a caller could forget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Observation sources are kept in a junction table
    /// `observation_sources(observation_id, memory_id)` rather than a native array
    /// column. The observation sweep (`delete_stale_observations_for_memories`) picks
    /// its strategy from this flag.
    pub uses_observation_sources_table: bool,
}
