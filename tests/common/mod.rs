//! The helpers the test binaries share, in one place: `tests/it` (most tests) and the
//! binaries that need a process of their own take them with `mod common;` (from a
//! directory, `#[path = "../common/mod.rs"] mod common;`), `#[macro_use]` where they
//! instantiate [`driver_scenarios!`](backend_checks).
//!
//! Not every binary uses every helper, hence the `dead_code` allowance.
#![allow(dead_code)]

#[macro_use]
pub mod backend_checks;
pub mod cdylib;
pub mod child;
pub mod driver_scenarios;
pub mod fake_cuda;
pub mod fake_hip;
pub mod pin;
pub mod smaps;
