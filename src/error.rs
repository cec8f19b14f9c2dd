//! The one error type of the `hetmem` crate.
//!
//! Every variant carries the numbers a caller needs to act on it (which kind of memory, how much
//! was asked, how much is free) rather than a formatted string alone.

use crate::backend_kind::BackendKind;
use crate::placement::MemKind;

/// Result alias used throughout hetmem.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in hetmem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A kind of memory had too little for the request.
    #[error("out of memory on {kind}: requested {requested} bytes, {free} bytes free{}",
        pool_detail(*reserved, *largest_free_block))]
    OutOfMemory {
        /// Where the allocation was attempted.
        kind: MemKind,
        /// Bytes asked for.
        requested: usize,
        /// Bytes free at the time: under the pool's budget for pool allocations, as the
        /// driver or kernel reported them otherwise.
        free: usize,
        /// Bytes a pool held from the backend when it gave up (`None` outside pools).
        reserved: Option<usize>,
        /// The largest free block a pool had cached (`None` outside pools).
        largest_free_block: Option<usize>,
    },

    /// A size of zero, or one no allocator can satisfy (over `isize::MAX`, or one that
    /// overflows when rounded up to a page).
    #[error("invalid size {requested}: {reason}")]
    InvalidSize {
        /// Bytes asked for.
        requested: usize,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A device ordinal the backend does not have.
    #[error("unknown device {device}: backend {backend} has {count} device(s)")]
    UnknownDevice {
        /// The ordinal asked for.
        device: usize,
        /// How many devices the backend has.
        count: usize,
        /// The backend asked.
        backend: BackendKind,
    },

    /// A NUMA node that is not present on this machine.
    #[error("unknown NUMA node {node}: this machine has nodes {available:?}")]
    UnknownNumaNode {
        /// The node asked for.
        node: u32,
        /// The nodes that exist.
        available: Vec<u32>,
    },

    /// A NUMA node that exists but has no memory (a CPU-only or offline node).
    #[error("NUMA node {node} has no memory")]
    NumaNodeWithoutMemory {
        /// The node asked for.
        node: u32,
    },

    /// A buffer, stream or event made by another [`Manager`](crate::Manager).
    #[error("{what} belongs to another manager")]
    ForeignHandle {
        /// What kind of handle it was.
        what: &'static str,
    },

    /// An access past the end of a buffer.
    #[error("range {offset}..{offset}+{len} is outside a buffer of {size} bytes")]
    OutOfBounds {
        /// Start of the range.
        offset: usize,
        /// Length of the range.
        len: usize,
        /// Size of the buffer.
        size: usize,
    },

    /// An argument that is wrong in a way the other variants do not describe.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A stream, event or other handle that is not live where it was used: destroyed
    /// already, never made there, or made by another backend or pool. The C ABI reports
    /// it as an invalid argument.
    #[error("{what} {handle:#x} is not live here")]
    UnknownHandle {
        /// What kind of handle it was ("stream", "event", "pool stream", ...).
        what: &'static str,
        /// The handle's number.
        handle: u64,
    },

    /// A copy may still use this memory but left no fence to wait for (making one
    /// failed): the memory is unusable, and its owner leaks it rather than free it
    /// under the copy. The C ABI reports it as an invalid argument.
    #[error("a copy that may still use this {what} was never fenced: it is unusable")]
    Unfenced {
        /// What the memory is ("buffer", "memory", "region").
        what: &'static str,
    },

    /// A range of a virtual-memory region with no physical memory mapped behind some
    /// of it. The C ABI reports it as an invalid argument.
    #[error("{len} bytes at offset {offset} of the region are not all mapped")]
    NotMapped {
        /// Start of the range in the region.
        offset: usize,
        /// Length of the range.
        len: usize,
    },

    /// The operation does not exist for this placement or backend.
    #[error("{backend} backend does not support {what}")]
    Unsupported {
        /// The backend asked.
        backend: BackendKind,
        /// What was asked for.
        what: &'static str,
    },

    /// A backend's driver library could not be loaded, or lacks a symbol we need.
    #[error("{backend} backend unavailable: {reason}")]
    BackendUnavailable {
        /// The backend asked for.
        backend: BackendKind,
        /// Why it cannot be used (library missing, symbol missing, no device, ...).
        reason: String,
    },

    /// A driver call failed.
    #[error("{backend}: {call} failed with code {code}: {message}")]
    Driver {
        /// The backend whose driver failed.
        backend: BackendKind,
        /// The driver function that failed.
        call: &'static str,
        /// The driver's numeric status.
        code: i32,
        /// The driver's description of the status.
        message: String,
    },

    /// Registering host memory failed part-way, and unregistering the part that had
    /// registered failed too: that part stays registered with the driver, so the memory
    /// must never be unmapped (its owner leaks it). `code` is the failed
    /// unregistration's; `call` names the registration; `message` both failures. The C
    /// ABI reports it as a driver error.
    #[error("{backend}: {call} failed with code {code}: {message}")]
    RegistrationLeaked {
        /// The backend whose driver failed.
        backend: BackendKind,
        /// The registration that failed (`cuMemHostRegister(rollback)`, ...).
        call: &'static str,
        /// The failed unregistration's status.
        code: i32,
        /// What failed, and what stays registered.
        message: String,
    },

    /// An operating-system call failed.
    #[error("{call} failed: {errno}")]
    Os {
        /// The system call that failed.
        call: &'static str,
        /// The error it returned.
        errno: nix::errno::Errno,
    },

    /// A parameter's bytes did not match the checksum taken when they were registered
    /// (or last written back): its host copy changed (a mapped file rewritten under
    /// the store), or a load delivered other bytes twice in a row.
    #[error(
        "checksum mismatch: parameter {param} ({name}): its {copy} copy hashes to \
        {found:#018x}, {expected:#018x} expected"
    )]
    Checksum {
        /// The parameter's id in its store.
        param: u32,
        /// Its name.
        name: String,
        /// Which copy was wrong: `"host"` (the source) or `"device"` (the load).
        copy: &'static str,
        /// The checksum taken when its bytes were registered or written back.
        expected: u64,
        /// The checksum of the copy.
        found: u64,
    },

    /// A call in a process forked from the one that set hetmem up. A GPU driver's
    /// contexts, streams and memory belong to the process that made them and cannot be
    /// used in a `fork()`ed child, so everything made before the fork (managers, pools,
    /// stores, streams, buffers) refuses to work there instead of calling the driver.
    /// Pinned memory is not even mapped in the child (`MADV_DONTFORK`). Make a new
    /// [`Manager`](crate::Manager) in the child (where the driver allows it), or start
    /// workers with `spawn` instead of `fork`.
    #[error(
        "this process ({child}) was forked from process {parent}, where this hetmem object \
        was made: GPU driver state does not survive fork(); make a new Manager in the \
        child or start workers with spawn"
    )]
    Forked {
        /// The process the object was made in.
        parent: u32,
        /// This process, the forked child.
        child: u32,
    },

    /// Not possible while a stream is capturing a graph (CUDA stream capture): the
    /// driver would refuse the calls it needs and invalidate the capture, or the
    /// capture would record work that has to happen now (a load the caller waits for).
    #[error("not possible while a stream is capturing a graph: {what}")]
    StreamCapturing {
        /// What was refused, and what to do instead.
        what: String,
    },

    /// A sysfs or configuration file could not be read or parsed.
    #[error("cannot read {path}: {reason}")]
    Config {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

fn pool_detail(reserved: Option<usize>, largest: Option<usize>) -> String {
    match (reserved, largest) {
        (Some(r), Some(l)) => {
            format!(", {r} bytes reserved by the pool, largest free block {l} bytes")
        }
        _ => String::new(),
    }
}

impl Error {
    /// An [`Error::OutOfMemory`] outside any pool.
    pub(crate) fn oom(kind: MemKind, requested: usize, free: usize) -> Self {
        Error::OutOfMemory {
            kind,
            requested,
            free,
            reserved: None,
            largest_free_block: None,
        }
    }

    pub(crate) fn os(call: &'static str, errno: nix::errno::Errno) -> Self {
        Error::Os { call, errno }
    }
}
