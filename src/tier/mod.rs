//! The tiered parameter store (device → pinned host → cold), built up piece by piece.
//!
//! - [`policy`]: which parameter to evict, by the execution sequence (Belady's MIN) or
//!   by recency, and the optimum a streaming pass is measured against.

pub mod policy;
pub mod source;
