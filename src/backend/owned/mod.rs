//! Owning wrappers over backend handles: the one place that upholds the contracts of
//! the `unsafe` [`Backend`] methods, so that the layers above need no `unsafe`.
//!
//! - [`OwnedStream`] and [`OwnedEvent`] destroy their handle on drop.
//! - [`OwnedMemory`] frees its memory on drop, and first waits for the fences left by
//!   asynchronous copies that still use it, so a buffer dropped while a copy is in
//!   flight cannot be freed under the DMA engine.
//!
//! Nothing here panics in `Drop`: failures are logged through `tracing`. In a `fork()`ed
//! child (see `backend::fork`) drops make no driver call and log nothing: what the value
//! owns belongs to the parent's driver state, and is leaked.

//!
//! Files: `sync.rs` streams and events; `copy.rs` the one copy path and the fences
//! copies leave on memory; `memory.rs` [`OwnedMemory`]; `vmm.rs` [`VmmRegion`] and its
//! pages. Each depends only on the ones before it.

pub(crate) mod copy;
mod memory;
mod sync;
mod vmm;

pub(crate) use memory::{MemoryKind, OwnedMemory};
pub(crate) use sync::{OwnedEvent, OwnedStream, SharedBackend, ThisThread};
pub(crate) use vmm::{PhysChunk, VmmRegion};
