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
//! Layers call only downward: the APIs ([`manager`], and `ffi`, the C ABI) → [`pool`]s
//! and the [`tier`] store → [`stream`]s and [`topology`] → [`backend`]s → host memory
//! ([`host_mem`]) → the vocabulary ([`error`], [`placement`], `stats`, [`record`]) →
//! `hetmem-sys` (checked by `tests/it/layers.rs`).

pub mod backend;
mod backend_kind;
pub mod error;
/// The C ABI of `libhetmem.so` (header: `include/hetmem.h`), PyTorch's allocator hooks
/// included. Public only so that the fuzzer and the tests call the `extern "C"`
/// functions in-process: not Rust API, hence hidden from the docs.
#[doc(hidden)]
pub mod ffi;
pub mod host_mem;
pub mod manager;
pub mod placement;
pub mod pool;
pub mod profile;
pub mod record;
mod stats;
pub mod stream;
pub mod tier;
pub mod topology;

/// Internals that the tests and loom models reach, not Rust API (hidden from the docs).
#[doc(hidden)]
pub mod testing {
    pub use crate::host_mem::block_cache::{BlockCache, UNIT};
    pub use crate::stats::ByteCounter;
}

pub use backend::sim::{SimBackend, SimConfig};
pub use backend::{Backend, BackendKind, DeviceInfo, DevicePtr, MemInfo};
pub use error::{Error, Result};
pub use manager::{Buffer, Device, Manager, ManagerBuilder, ManagerStats};
pub use placement::{Advice, Location, MemKind, NumaPolicy, Placement};
pub use stats::CounterSnapshot;
pub use stream::{Event, Stream};
pub use tier::{ParamGuard, TierConfig, TierStore};
pub use topology::{NumaNode, Topology};
