//! hetmem: one allocator for host, pinned and GPU memory.
pub mod backend;
pub mod error;
pub mod placement;
pub mod topology;

pub use backend::{Backend, BackendKind};
pub use error::{Error, Result};
pub use placement::{Advice, Location, NumaPolicy, Placement, Tier};
