//! Pools: memory kept between allocations so that the hot path never reaches a driver.
//!
//! - [`device`]: the caching, stream-ordered device memory pool.

pub mod device;
mod stats;

pub use device::{Budget, DevicePool, PoolBlock, PoolConfig};
pub use stats::{PoolStats, Stat};
