//! The tiered parameter store (device → pinned host → cold), built up piece by piece.
//!
//! - `policy`: which parameter to evict, by the execution sequence (Belady's MIN) or
//!   by recency, and the optimum a streaming pass is measured against.
//! - [`source`]: where a parameter's bytes come from (host memory, mapped safetensors).
//! - `learn`: the execution sequence learnt from the order of acquires.
//! - `plan`: the streaming plan (what to load when, and what stays) over a sequence.
//! - `sizing`: how much of the budget the plan's cache gets, and what it keeps for good.
//! - [`store`]: the [`TierStore`] itself: residency, loads, eviction, prefetch, hints.

mod config;
mod learn;
mod plan;
pub(crate) mod policy;
mod profile;
mod sizing;
pub mod source;
pub mod store;

pub use config::{Planner, Residency, SequenceHint, TierConfig, TierStats};
pub use policy::{lru_misses_per_pass, min_misses_each_pass, min_misses_per_pass, ParamId};
pub use store::{device_footprint, ParamGuard, TierStore};

/// FNV-1a: the store's checksums, and the digest of what a plan was sized for.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
