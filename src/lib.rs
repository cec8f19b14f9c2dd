//! hetmem: one allocator for host, pinned and GPU memory, for AI inference.
//!
//! A [`Manager`] opens one backend (CUDA, ROCm, the simulator or host-only), reads the
//! machine's NUMA topology, and allocates [`Buffer`]s by [`Placement`]: pageable host
//! memory on a NUMA node, pinned host memory near a device, device memory, managed
//! memory. Buffers copy to each other synchronously or on [`Stream`]s ordered by
//! [`Event`]s, and free themselves on drop.
//!
//! ```
//! use hetmem::{BackendKind, Manager, Placement};
//!
//! let mgr = Manager::builder().backend(BackendKind::Sim).build()?;
//! let mut dev = mgr.alloc(Placement::Device(0), 1024)?;
//! mgr.write(&mut dev, 0, b"weights")?;
//! let mut out = [0u8; 7];
//! mgr.read(&dev, 0, &mut out)?;
//! assert_eq!(&out, b"weights");
//! # Ok::<(), hetmem::Error>(())
//! ```
//!
//! Layers call only downward: [`manager`] → [`backend`] → `hetmem-sys`.

pub mod backend;
pub mod error;
/// The C ABI of `libhetmem.so` (header: `include/hetmem.h`), PyTorch's allocator hooks
/// included.
pub mod ffi;
pub mod manager;
pub mod placement;
pub mod pool;
pub mod profile;
pub mod record;
pub mod stats;
pub mod stream;
pub mod tier;
pub mod topology;

pub use backend::sim::{SimBackend, SimConfig};
pub use backend::{Backend, BackendKind, DeviceInfo, DevicePtr, MemInfo};
pub use error::{Error, Result};
pub use manager::{Buffer, Device, Manager, ManagerBuilder, ManagerStats};
pub use placement::{Advice, Location, NumaPolicy, Placement, Tier};
pub use stats::CounterSnapshot;
pub use stream::{Event, Stream};
pub use tier::{ParamGuard, TierConfig, TierStore};
pub use topology::{NumaNode, Topology};
