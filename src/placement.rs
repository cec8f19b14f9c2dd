//! Where memory lives: [`Placement`] is what a caller asks for, [`MemKind`] is what errors
//! and statistics report.

use std::fmt;

/// Which NUMA node(s) host pages come from.
///
/// Pinned pages cannot migrate, so the policy is applied before pages are touched and
/// registered, never after.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum NumaPolicy {
    /// The kernel's default (first touch, usually the calling thread's node).
    #[default]
    Default,
    /// Only this node; allocation fails rather than spill elsewhere.
    Bind(u32),
    /// This node first, others when it is full.
    Preferred(u32),
    /// Pages spread round-robin over these nodes.
    Interleave(Vec<u32>),
    /// The node nearest this device (its PCI slot's node), or the default where the
    /// device reports none.
    NearDevice(usize),
}

/// What kind of memory to allocate, and where.
///
/// ```
/// use hetmem::{Manager, Placement, NumaPolicy};
/// let mgr = Manager::builder().backend(hetmem::BackendKind::Sim).build()?;
/// let mut dev = mgr.alloc(Placement::Device(0), 1 << 20)?;
/// let host = mgr.alloc(Placement::Host(NumaPolicy::Default), 1 << 20)?;
/// mgr.copy(&mut dev, 0, &host, 0, 1 << 20, None)?;
/// # Ok::<(), hetmem::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Pageable host memory.
    Host(NumaPolicy),
    /// Page-locked host memory the devices can read by DMA at link speed, placed by the
    /// policy and then registered with the backend.
    Pinned(NumaPolicy),
    /// Memory on one device.
    Device(usize),
    /// Managed (unified) memory that migrates between host and devices; `device` is the
    /// device it is associated with for advice and prefetch.
    Managed {
        /// Device ordinal.
        device: usize,
    },
}

impl Placement {
    /// The kind of memory this placement gives, for errors and statistics.
    pub fn kind(&self) -> MemKind {
        match self {
            Placement::Host(_) => MemKind::Host,
            Placement::Pinned(_) => MemKind::Pinned,
            Placement::Device(d) => MemKind::Device(*d),
            Placement::Managed { device } => MemKind::Managed(*device),
        }
    }

    /// Whether the CPU can read and write this memory directly.
    pub fn host_accessible(&self) -> bool {
        !matches!(self, Placement::Device(_))
    }
}

/// A kind of memory: what [`Error::OutOfMemory`](crate::Error::OutOfMemory) and the
/// statistics report (the tier store's levels are another thing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemKind {
    /// Pageable host memory.
    Host,
    /// Pinned host memory.
    Pinned,
    /// Device memory of the given device.
    Device(usize),
    /// Managed memory associated with the given device.
    Managed(usize),
}

impl fmt::Display for MemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemKind::Host => f.write_str("host"),
            MemKind::Pinned => f.write_str("pinned host"),
            MemKind::Device(d) => write!(f, "device {d}"),
            MemKind::Managed(d) => write!(f, "managed (device {d})"),
        }
    }
}

/// Where managed memory should be, for [`Manager::prefetch`](crate::Manager::prefetch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    /// Host memory.
    Host,
    /// The given device.
    Device(usize),
}

/// Advice about how managed memory will be used, as `cuMemAdvise` / `hipMemAdvise` take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Advice {
    /// Mostly read; the driver may keep read-only copies where it is read.
    SetReadMostly,
    /// Undo [`Advice::SetReadMostly`].
    UnsetReadMostly,
    /// Prefer that the pages live at this location.
    SetPreferredLocation(Location),
    /// Undo [`Advice::SetPreferredLocation`].
    UnsetPreferredLocation,
    /// This device will access the memory; map it there to avoid faults.
    SetAccessedBy(usize),
    /// Undo [`Advice::SetAccessedBy`].
    UnsetAccessedBy(usize),
}
