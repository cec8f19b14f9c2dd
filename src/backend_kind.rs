//! [`BackendKind`]: which backend drives the devices. A leaf of the vocabulary, below
//! both [`error`](crate::error), whose variants name a backend, and
//! [`backend`](crate::backend), which re-exports it (its `FromStr` is there: parsing
//! fails with an `Error`).

use std::fmt;

/// Which backend drives the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// No devices: host memory only.
    Host,
    /// The simulated GPU.
    Sim,
    /// NVIDIA CUDA (driver API through cudarc).
    Cuda,
    /// AMD ROCm (HIP runtime).
    Rocm,
}

impl BackendKind {
    /// The name used by `HETMEM_BACKEND` and in logs.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Host => "host",
            BackendKind::Sim => "sim",
            BackendKind::Cuda => "cuda",
            BackendKind::Rocm => "rocm",
        }
    }

    /// Every backend, in the order `auto` tries the GPU ones.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::Cuda,
        BackendKind::Rocm,
        BackendKind::Sim,
        BackendKind::Host,
    ];
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
