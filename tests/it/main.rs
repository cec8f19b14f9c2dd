//! The integration tests, one binary with a module per area of the crate. The helpers
//! they share are in `tests/common`.
//!
//! The tests that need a process of their own are separate binaries, each saying why at
//! its top: `conformance` (its own harness), `cuda_fake` (one fake CUDA driver per
//! process), `env_selection` (sets environment variables), `fork` (forks), `loom` (built
//! with `--cfg loom`) and `numa_global` (a `#[global_allocator]`).
//!
//! One area: `cargo test --test it pool::` (the C program: `--test it capi::`, the
//! Python package: `--test it python::`).

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

// The C ABI: its header and the C, C++ and Python programs that use it.
mod capi;
mod capi_header;
mod python;
// The crate's structure.
mod layers;
// Host memory, NUMA placement and the host pool.
mod host_numa;
mod host_pool;
mod numa_alloc;
// Device memory: the pool and the staging ring.
mod pool;
mod staging;
// Backends: the fake HIP runtime and selection.
mod rocm_fake;
mod selection;
// The tiered parameter store.
mod tier_source;
mod tier_store;
