//! The unified API: a [`Manager`] allocates [`Buffer`]s anywhere by [`Placement`],
//! copies between them, and hands out [`Stream`]s and [`Event`](crate::Event)s.
//!
//! ```
//! use hetmem::{BackendKind, Manager, NumaPolicy, Placement};
//!
//! let mgr = Manager::builder().backend(BackendKind::Sim).build()?;
//! let mut host = mgr.alloc(Placement::Pinned(NumaPolicy::NearDevice(0)), 4096)?;
//! host.as_mut_slice()?.fill(7);
//! let mut dev = mgr.alloc(Placement::Device(0), 4096)?;
//! let stream = mgr.create_stream(0)?;
//! mgr.copy(&mut dev, 0, &host, 0, 4096, Some(&stream))?;
//! let mut back = mgr.alloc(Placement::Host(NumaPolicy::Default), 4096)?;
//! stream.synchronize()?;
//! mgr.copy(&mut back, 0, &dev, 0, 4096, None)?;
//! assert!(back.as_slice()?.iter().all(|b| *b == 7));
//! # Ok::<(), hetmem::Error>(())
//! ```

mod make;
mod memory;

pub use memory::Memory;

use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::backend::cuda::CudaBackend;
use crate::backend::fork::ForkGuarded;
use crate::backend::host::HostBackend;
use crate::backend::owned::copy;
use crate::backend::owned::{MemoryKind, OwnedMemory, SharedBackend};
use crate::backend::rocm::RocmBackend;
use crate::backend::sim::{SimBackend, SimConfig};
use crate::backend::{check_device, Backend, BackendKind, DeviceInfo, DevicePtr};
use crate::error::{Error, Result};
use crate::host_mem::HostRegion;
use crate::placement::{Advice, Location, MemKind, NumaPolicy, Placement};
use crate::stats::{ByteCounter, CounterSnapshot};
use crate::stream::Stream;
use crate::topology::Topology;

static NEXT_MANAGER_ID: AtomicU64 = AtomicU64::new(1);

/// A device with its place in the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// What the backend reports.
    pub info: DeviceInfo,
    /// The NUMA node its PCI slot hangs off (`None` where sysfs says `-1` or nothing).
    pub numa_node: Option<u32>,
}

/// Chooses and configures a backend; see [`Manager::builder`].
#[derive(Debug, Clone, Default)]
pub struct ManagerBuilder {
    backend: Option<BackendKind>,
    sim: Option<SimConfig>,
    rocm_library: Option<PathBuf>,
    sysfs_root: Option<PathBuf>,
    gpu_only: bool,
}

impl ManagerBuilder {
    /// Uses this backend. Without it, `HETMEM_BACKEND` decides, and without that the
    /// first of CUDA, ROCm and sim that works.
    pub fn backend(mut self, kind: BackendKind) -> Self {
        self.backend = Some(kind);
        self
    }

    /// Configures the simulator (used when the sim backend is chosen). Without it,
    /// [`SimConfig::from_env`].
    pub fn sim_config(mut self, cfg: SimConfig) -> Self {
        self.sim = Some(cfg);
        self
    }

    /// Automatic selection (no [`backend`](Self::backend), `HETMEM_BACKEND` unset or
    /// `auto`) takes only a GPU backend: when none opens, [`build`](Self::build) fails
    /// with each one's reason instead of falling back to the simulator. For users that
    /// cannot work on simulated addresses, such as PyTorch's allocator.
    pub fn gpu_only(mut self) -> Self {
        self.gpu_only = true;
        self
    }

    /// Loads the HIP runtime from this file instead of the default search.
    pub fn rocm_library(mut self, path: impl Into<PathBuf>) -> Self {
        self.rocm_library = Some(path.into());
        self
    }

    /// Reads topology from a sysfs tree under `root` instead of `/` (tests use fixtures).
    pub fn sysfs_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.sysfs_root = Some(root.into());
        self
    }

    /// Opens the backend and reads the topology.
    pub fn build(self) -> Result<Manager> {
        let requested = match self.backend {
            Some(k) => Some(k),
            None => match std::env::var("HETMEM_BACKEND") {
                Ok(s) if !s.trim().is_empty() && s.trim() != "auto" => Some(s.parse()?),
                _ => None,
            },
        };
        let backend: SharedBackend = match requested {
            Some(kind) => self.open(kind)?,
            None => self.open_auto()?,
        };
        let topology = match &self.sysfs_root {
            Some(root) => Topology::from_root(root)?,
            None => Topology::detect()?,
        };
        let devices = backend
            .devices()
            .iter()
            .map(|info| Device {
                numa_node: info
                    .pci_bus_id
                    .as_deref()
                    .and_then(|b| topology.pci_numa_node(b)),
                info: info.clone(),
            })
            .collect::<Vec<_>>();
        let n = devices.len();
        let mgr = Manager {
            inner: Arc::new(Inner {
                id: NEXT_MANAGER_ID.fetch_add(1, Ordering::Relaxed),
                backend,
                topology,
                devices,
                host: ByteCounter::unlimited(),
                pinned: ByteCounter::unlimited(),
                device: (0..n).map(|_| ByteCounter::unlimited()).collect(),
                managed: (0..n).map(|_| ByteCounter::unlimited()).collect(),
                warned_no_node: AtomicBool::new(false),
            }),
        };
        tracing::info!(target: "hetmem", backend = %mgr.backend_kind(), devices = n,
            numa_nodes = mgr.topology().nodes().len(), "manager ready");
        if crate::profile::start_from_env() {
            crate::backend::exit::finish_profile_at_exit();
        }
        Ok(mgr)
    }

    /// Opens `kind`, guarded against use in a forked child (see [`Error::Forked`]).
    fn open(&self, kind: BackendKind) -> Result<SharedBackend> {
        Ok(match kind {
            BackendKind::Host => Arc::new(ForkGuarded::new(HostBackend::new())),
            BackendKind::Sim => {
                let cfg = match &self.sim {
                    Some(c) => c.clone(),
                    None => SimConfig::from_env()?,
                };
                Arc::new(ForkGuarded::new(SimBackend::new(cfg)?))
            }
            BackendKind::Cuda => Arc::new(ForkGuarded::new(CudaBackend::new()?)),
            BackendKind::Rocm => match &self.rocm_library {
                Some(p) => Arc::new(ForkGuarded::new(RocmBackend::with_library(p)?)),
                None => Arc::new(ForkGuarded::new(RocmBackend::new()?)),
            },
        })
    }

    fn open_auto(&self) -> Result<SharedBackend> {
        let mut reasons = Vec::new();
        for kind in [BackendKind::Cuda, BackendKind::Rocm] {
            match self.open(kind) {
                Ok(b) => {
                    tracing::info!(target: "hetmem", backend = %kind, "auto-selected backend");
                    return Ok(b);
                }
                Err(e) => {
                    tracing::info!(target: "hetmem", backend = %kind, reason = %e, "backend skipped");
                    reasons.push(format!("{kind}: {e}"));
                }
            }
        }
        if self.gpu_only {
            return Err(Error::BackendUnavailable {
                backend: BackendKind::Cuda,
                reason: format!(
                    "a GPU backend is needed and none opened ({}); HETMEM_BACKEND=sim chooses \
                     the simulator",
                    reasons.join("; ")
                ),
            });
        }
        tracing::info!(target: "hetmem", backend = "sim", "no GPU driver found: auto-selected the simulator");
        self.open(BackendKind::Sim)
    }
}

#[derive(Debug)]
struct Inner {
    id: u64,
    backend: SharedBackend,
    topology: Topology,
    devices: Vec<Device>,
    host: ByteCounter,
    pinned: ByteCounter,
    device: Vec<ByteCounter>,
    managed: Vec<ByteCounter>,
    /// Whether [`Manager::resolve_policy`] has warned of a device with no NUMA node.
    warned_no_node: AtomicBool,
}

impl Inner {
    fn counter(&self, tier: MemKind) -> &ByteCounter {
        match tier {
            MemKind::Host => &self.host,
            MemKind::Pinned => &self.pinned,
            MemKind::Device(d) => &self.device[d],
            MemKind::Managed(d) => &self.managed[d],
        }
    }
}

/// Allocates memory anywhere, copies between placements, and makes streams and events.
///
/// Cheap to clone and shareable across threads: clones are the same manager.
///
/// # Fork
/// In a child made by `fork()` every call on a manager made before the fork, and on
/// everything made from it, fails with [`Error::Forked`] without reaching the driver, and
/// drops there leak instead of freeing (the memory and driver state are the parent's).
/// Pinned memory is not mapped in the child at all (`MADV_DONTFORK`): do not touch a
/// pinned buffer's address there. A new manager made in the child is independent.
#[derive(Debug, Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

/// Bytes allocated through a manager, per tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerStats {
    /// Pageable host memory.
    pub host: CounterSnapshot,
    /// Pinned host memory.
    pub pinned: CounterSnapshot,
    /// Device memory, by device.
    pub device: Vec<CounterSnapshot>,
    /// Managed memory, by device.
    pub managed: Vec<CounterSnapshot>,
}

impl Manager {
    /// Starts configuring a manager.
    pub fn builder() -> ManagerBuilder {
        ManagerBuilder::default()
    }

    /// A manager with the automatic backend choice and default settings.
    pub fn new() -> Result<Manager> {
        Self::builder().build()
    }

    /// The backend in use.
    pub fn backend_kind(&self) -> BackendKind {
        self.inner.backend.kind()
    }

    /// The backend itself, for calls the manager does not wrap.
    pub fn backend(&self) -> &dyn Backend {
        &*self.inner.backend
    }

    /// The backend, shared (streams and pools keep it alive).
    pub(crate) fn shared_backend(&self) -> &SharedBackend {
        &self.inner.backend
    }

    /// The simulator, when it is the backend (its clock, kernels and counters).
    pub fn sim(&self) -> Option<&SimBackend> {
        self.inner.backend.as_any().downcast_ref::<SimBackend>()
    }

    /// The devices and their NUMA nodes.
    pub fn devices(&self) -> &[Device] {
        &self.inner.devices
    }

    /// The machine's NUMA topology.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Bytes allocated through this manager, per tier.
    pub fn stats(&self) -> ManagerStats {
        let i = &self.inner;
        ManagerStats {
            host: i.host.snapshot(),
            pinned: i.pinned.snapshot(),
            device: i.device.iter().map(ByteCounter::snapshot).collect(),
            managed: i.managed.iter().map(ByteCounter::snapshot).collect(),
        }
    }

    /// Resolves `NearDevice` to the device's node.
    ///
    /// Where the device reports none (sysfs says -1, as on the H200 host): on a machine
    /// with one memory node, the default policy (there is nowhere else); with several,
    /// `Preferred` on the node of the CPU this thread runs on, with a warning once, so
    /// that the threads that fault a large region in do not scatter its pages over the
    /// nodes where they happen to run (pinned, those pages could never move).
    pub fn resolve_policy(&self, policy: &NumaPolicy) -> Result<NumaPolicy> {
        match policy {
            NumaPolicy::NearDevice(d) => {
                check_device(self.backend(), *d)?;
                Ok(match self.inner.devices[*d].numa_node {
                    Some(node) => NumaPolicy::Bind(node),
                    None => self.no_device_node(*d),
                })
            }
            other => Ok(other.clone()),
        }
    }

    /// `NearDevice(device)` for a device with no NUMA node: see [`Manager::resolve_policy`].
    fn no_device_node(&self, device: usize) -> NumaPolicy {
        let topo = &self.inner.topology;
        if topo.memory_nodes().len() <= 1 {
            return NumaPolicy::Default;
        }
        let here = hetmem_sys::numa::current_cpu()
            .and_then(|cpu| topo.node_of_cpu(cpu))
            .filter(|n| topo.has_memory(*n));
        if !self.inner.warned_no_node.swap(true, Ordering::Relaxed) {
            tracing::warn!(target: "hetmem", device, node = ?here,
                "device reports no NUMA node on a machine with several: placing memory \
                 near it on the calling thread's node (bind explicitly to choose)");
        }
        here.map_or(NumaPolicy::Default, NumaPolicy::Preferred)
    }

    /// Allocates `size` bytes with the given placement.
    ///
    /// Errors: [`Error::InvalidSize`] for 0 or more than `isize::MAX`;
    /// [`Error::UnknownDevice`] / [`Error::UnknownNumaNode`] /
    /// [`Error::NumaNodeWithoutMemory`] for places that do not exist;
    /// [`Error::OutOfMemory`] with the tier and free bytes when there is no room.
    pub fn alloc(&self, placement: Placement, size: usize) -> Result<Buffer> {
        self.alloc_inner(placement, size, true)
    }

    /// `alloc`, counted in [`Manager::stats`] or not (staging buffers of `read`/`write`
    /// are the manager's own business, not the caller's use).
    fn alloc_inner(&self, placement: Placement, size: usize, counted: bool) -> Result<Buffer> {
        self.live()?;
        if size == 0 {
            return Err(Error::InvalidSize {
                requested: 0,
                reason: "zero-byte allocations are refused",
            });
        }
        if size > isize::MAX as usize {
            return Err(Error::InvalidSize {
                requested: size,
                reason: "larger than isize::MAX",
            });
        }
        let backend = &self.inner.backend;
        // The node the memory is placed on, for the profiler (after NearDevice resolves).
        let mut node = None;
        let mem = match &placement {
            Placement::Host(policy) | Placement::Pinned(policy) => {
                let policy = self.resolve_policy(policy)?;
                node = crate::profile::node_of(&policy);
                // Node checks (UnknownNumaNode, NumaNodeWithoutMemory) happen here, in the
                // placement layer: the host backend only knows what mbind answers.
                self.check_host_room(&placement, &policy, size)?;
                let region = HostRegion::alloc(size, &policy).map_err(|e| match e {
                    // The host allocator speaks for pageable memory; say which tier.
                    Error::OutOfMemory {
                        requested, free, ..
                    } => Error::oom(placement.kind(), requested, free),
                    other => other,
                })?;
                if matches!(placement, Placement::Pinned(_)) {
                    OwnedMemory::pinned(backend, region)?
                } else {
                    OwnedMemory::host(backend, region)
                }
            }
            Placement::Device(d) => {
                check_device(&**backend, *d)?;
                OwnedMemory::device(backend, *d, size)?
            }
            Placement::Managed { device } => {
                check_device(&**backend, *device)?;
                OwnedMemory::managed(backend, *device, size)?
            }
        };
        let tier = placement.kind();
        if counted {
            // Unlimited counters never refuse; limits are the backends' and pools' business.
            let reserved = self.inner.counter(tier).try_reserve(size);
            debug_assert!(reserved.is_ok(), "manager counters have no limit");
        }
        tracing::debug!(target: "hetmem", %tier, size, "alloc");
        crate::profile::emit(|| profile_alloc(&placement, &mem, size, Some(node)));
        Ok(Buffer {
            mgr: self.inner.clone(),
            placement,
            size,
            counted,
            mem,
        })
    }

    /// Refuses host requests larger than the memory they may use (the bound nodes, or
    /// the machine), before the kernel is asked: pages are pre-faulted, and a request
    /// the kernel's overcommit lets through could bring the OOM killer instead of an
    /// error.
    fn check_host_room(
        &self,
        placement: &Placement,
        policy: &NumaPolicy,
        size: usize,
    ) -> Result<()> {
        let topo = &self.inner.topology;
        let limit = match policy {
            NumaPolicy::Bind(n) => {
                topo.check_node(*n)?;
                topo.node(*n).map_or(0, |n| n.mem_total)
            }
            NumaPolicy::Interleave(ns) => {
                for n in ns {
                    topo.check_node(*n)?;
                }
                let mut unique = ns.clone();
                unique.sort_unstable();
                unique.dedup();
                unique
                    .iter()
                    .filter_map(|n| topo.node(*n))
                    .map(|n| n.mem_total)
                    .sum()
            }
            NumaPolicy::Preferred(n) => {
                topo.check_node(*n)?;
                topo.system_memory()
            }
            NumaPolicy::Default | NumaPolicy::NearDevice(_) => topo.system_memory(),
        };
        if limit > 0 && size as u64 > limit {
            return Err(Error::oom(
                placement.kind(),
                size,
                crate::host_mem::available_memory().min(limit as usize),
            ));
        }
        Ok(())
    }

    fn check_stream(&self, stream: &Stream) -> Result<()> {
        self.live()?;
        if stream.belongs_to(&self.inner.backend) {
            Ok(())
        } else {
            Err(Error::ForeignHandle { what: "stream" })
        }
    }

    /// [`Error::Forked`] in a forked child: nothing made before the fork works there.
    fn live(&self) -> Result<()> {
        self.inner.backend.check_fork()
    }

    fn check_owner(&self, id: u64, what: &'static str) -> Result<()> {
        self.live()?;
        if id == self.inner.id {
            Ok(())
        } else {
            Err(Error::ForeignHandle { what })
        }
    }

    /// Copies `len` bytes of `buf` from `src_offset` to `dst_offset` and returns when
    /// they have arrived; the ranges may overlap (as `memmove`). With `stream`, the copy
    /// comes after the work queued on it so far, and the stream must be one that could
    /// queue a copy of this buffer ([`Manager::copy`]'s checks: this manager's, of
    /// the buffer's device); without, after every earlier asynchronous copy that used
    /// the buffer.
    ///
    /// # Errors
    /// [`Error::ForeignHandle`] for a buffer or stream of another manager,
    /// [`Error::OutOfBounds`], [`Error::InvalidArgument`] for a stream of another device,
    /// [`Error::OutOfMemory`] when device memory cannot be staged through the host.
    pub fn copy_within(
        &self,
        buf: &mut Buffer,
        dst_offset: usize,
        src_offset: usize,
        len: usize,
        stream: Option<&Stream>,
    ) -> Result<()> {
        self.check_owner(buf.mgr.id, "buffer")?;
        if let Some(s) = stream {
            self.check_stream(s)?;
        }
        // The checks of every copy, so that one buffer accepts what two would.
        copy::check(
            &buf.mem,
            dst_offset,
            &buf.mem,
            src_offset,
            len,
            stream.map(|s| &*s.inner),
        )?;
        if let Some(s) = stream {
            s.synchronize()?;
        }
        if len == 0 {
            return Ok(());
        }
        if buf.placement.host_accessible() {
            buf.as_mut_slice()?
                .copy_within(src_offset..src_offset + len, dst_offset);
            return Ok(());
        }
        // Device memory: through the host (a driver copy may not overlap itself).
        let mut tmp = Vec::new();
        if tmp.try_reserve_exact(len).is_err() {
            let free = crate::host_mem::available_memory();
            return Err(Error::oom(MemKind::Host, len, free));
        }
        tmp.resize(len, 0);
        self.read(buf, src_offset, &mut tmp)?;
        self.write(buf, dst_offset, &tmp)
    }

    /// Writes `data` into `dst` at `offset`, wherever `dst` lives.
    pub fn write(&self, dst: &mut Buffer, offset: usize, data: &[u8]) -> Result<()> {
        self.check_owner(dst.mgr.id, "buffer")?;
        if dst.placement.host_accessible() {
            let end = check_range(offset, data.len(), dst.size)?;
            dst.as_mut_slice()?[offset..end].copy_from_slice(data);
            return Ok(());
        }
        let mut staging = self.alloc_inner(
            Placement::Host(NumaPolicy::Default),
            data.len().max(1),
            false,
        )?;
        staging.as_mut_slice()?[..data.len()].copy_from_slice(data);
        self.copy(dst, offset, &staging, 0, data.len(), None)
    }

    /// Reads `out.len()` bytes of `src` from `offset`, wherever `src` lives.
    pub fn read(&self, src: &Buffer, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check_owner(src.mgr.id, "buffer")?;
        if src.placement.host_accessible() {
            let end = check_range(offset, out.len(), src.size)?;
            out.copy_from_slice(&src.as_slice()?[offset..end]);
            return Ok(());
        }
        let mut staging = self.alloc_inner(
            Placement::Host(NumaPolicy::Default),
            out.len().max(1),
            false,
        )?;
        self.copy(&mut staging, 0, src, offset, out.len(), None)?;
        out.copy_from_slice(&staging.as_slice()?[..out.len()]);
        Ok(())
    }

    /// Queues a migration of a managed buffer to `to` on `stream`.
    pub fn prefetch(&self, buf: &Buffer, to: Location, stream: &Stream) -> Result<()> {
        self.check_owner(buf.mgr.id, "buffer")?;
        self.check_stream(stream)?;
        if let Location::Device(d) = to {
            check_device(self.backend(), d)?;
        }
        buf.mem.prefetch(to, &stream.inner)
    }

    /// Gives the driver advice about a managed buffer.
    pub fn advise(&self, buf: &Buffer, advice: Advice) -> Result<()> {
        self.check_owner(buf.mgr.id, "buffer")?;
        buf.mem.advise(advice)
    }
}

fn check_range(offset: usize, len: usize, size: usize) -> Result<usize> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(end),
        _ => Err(Error::OutOfBounds { offset, len, size }),
    }
}

/// Memory allocated by a [`Manager`]; freed on drop (after the copies that use it).
#[derive(Debug)]
pub struct Buffer {
    mgr: Arc<Inner>,
    placement: Placement,
    size: usize,
    /// Whether it counts in the manager's stats (staging buffers do not).
    counted: bool,
    mem: OwnedMemory,
}

impl Buffer {
    /// Where it lives.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.size
    }

    /// Always false: zero-byte buffers are refused.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The device address, for device and managed memory.
    pub fn device_ptr(&self) -> Option<DevicePtr> {
        self.mem.device_ptr()
    }

    /// The host address, for host, pinned and managed memory.
    pub fn host_ptr(&self) -> Option<NonNull<u8>> {
        self.mem.host_ptr()
    }

    /// The bytes, for memory the CPU can reach; waits for pending copies first.
    pub fn as_slice(&self) -> Result<&[u8]> {
        self.mem.host_slice()
    }

    /// The bytes, mutable, for memory the CPU can reach; waits for pending copies first.
    pub fn as_mut_slice(&mut self) -> Result<&mut [u8]> {
        self.mem.host_slice_mut()
    }

    /// Where the pages of a host or pinned buffer actually are: the NUMA node of each
    /// sampled page as the kernel reports it (`move_pages` in query mode), a negative
    /// errno for a page it could not report. Proof of placement, not the request.
    pub fn page_nodes(&self) -> Result<Vec<i32>> {
        self.mem.page_nodes()
    }

    /// Blocks until every asynchronous copy that used this buffer is done.
    pub fn wait(&self) -> Result<()> {
        self.mem.wait_fences()
    }

    /// Whether the buffer is registered (pinned) host memory.
    pub fn is_pinned(&self) -> bool {
        matches!(self.mem.kind(), MemoryKind::Pinned(_))
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if self.counted {
            self.mgr.counter(self.placement.kind()).release(self.size);
        }
        tracing::debug!(target: "hetmem", tier = %self.placement.kind(), size = self.size, "free");
        crate::profile::emit(|| profile_alloc(&self.placement, &self.mem, self.size, None));
        // `mem` frees itself after this, waiting for its copies first.
    }
}

/// The profiler's event for a buffer allocated (`alloc`: its NUMA node, where it has
/// one) or freed (`None`).
fn profile_alloc(
    placement: &Placement,
    mem: &OwnedMemory,
    size: usize,
    alloc: Option<Option<u32>>,
) -> crate::record::EventKind {
    use crate::record::{device_flags, EventKind, Placement as P};
    let size = size as u64;
    let (device, flags) = match placement {
        Placement::Host(_) | Placement::Pinned(_) => {
            let addr = mem.host_ptr().map_or(0, |p| p.as_ptr() as u64);
            let placement = if matches!(placement, Placement::Pinned(_)) {
                P::Pinned
            } else {
                P::Host
            };
            return if let Some(node) = alloc {
                EventKind::Alloc {
                    addr,
                    size,
                    placement,
                    node,
                }
            } else {
                EventKind::Free {
                    addr,
                    size,
                    placement,
                }
            };
        }
        Placement::Device(d) => (*d, 0),
        Placement::Managed { device } => (*device, device_flags::MANAGED),
    };
    let addr = mem.device_ptr().map_or(0, |p| p.0);
    let device = device as u32;
    if alloc.is_some() {
        EventKind::DeviceAlloc {
            addr,
            size,
            device,
            stream: 0,
            flags,
        }
    } else {
        EventKind::DeviceFree {
            addr,
            size,
            device,
            flags,
        }
    }
}
