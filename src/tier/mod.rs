//! The tiered parameter store (device → pinned host → cold), built up piece by piece.
//!
//! - [`policy`]: which parameter to evict, by the execution sequence (Belady's MIN) or
//!   by recency, and the optimum a streaming pass is measured against.
//! - [`source`]: where a parameter's bytes come from (host memory, mapped safetensors).
//! - `learn`: the execution sequence learnt from the order of acquires.
//! - `plan`: the streaming plan (what to load when, and what stays) over a sequence.
//! - [`store`]: the [`TierStore`] itself: residency, loads, eviction, prefetch, hints.

mod learn;
mod plan;
pub mod policy;
mod profile;
pub mod source;
pub mod store;

pub use store::{
    device_footprint, ParamGuard, Planner, Residency, SequenceHint, TierConfig, TierStats,
    TierStore,
};
