//! Pools: memory kept between allocations so that the hot path never reaches a driver.
//!
//! - [`device`]: the caching, stream-ordered device memory pool.
//! - [`host`]: the NUMA-placed host memory pool (pageable and pinned), and an
//!   `allocator_api2` allocator over its pinned memory.
//! - `copy`: copies into and out of their blocks, for the layers above.
//! - [`staging`]: a ring of pinned slots that moves pageable or mapped-file bytes to the
//!   device at pinned-copy speed.

pub(crate) mod copy;
pub mod device;
pub mod host;
pub mod staging;
mod stats;

pub use device::{Budget, DevicePool, PoolBlock, PoolConfig, PrivatePoolId, PrivatePoolStats};
pub use host::{
    size_class, HostBlock, HostKindStats, HostPool, HostPoolConfig, HostPoolStats, PinnedAllocator,
};
pub use staging::{StagingRing, UploadReport};
pub use stats::{PoolStats, Stat};
