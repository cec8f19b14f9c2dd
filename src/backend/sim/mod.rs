//! A simulated GPU: the default backend where no driver is found.
//!
//! Device memory is host memory behind synthetic device addresses that the CPU cannot
//! dereference, so a bug that treats a device pointer as a host pointer crashes here
//! as it would on a GPU. Copies really move the bytes, so checksums prove nothing is
//! lost. Time is a deterministic virtual clock instead of the wall clock:
//!
//! - the host has a time, and so does each stream (when its queued work ends);
//! - a copy costs `latency + bytes / bandwidth` and runs on its device's copy engine
//!   for that direction (one engine host→device, one device→host, as on real cards),
//!   so copies in one direction queue behind each other while the two directions and
//!   compute overlap;
//! - a kernel is declared with a duration ([`SimBackend::launch_kernel`]) and runs on
//!   the device's compute engine;
//! - events carry the time their stream reached when recorded; waiting on one moves
//!   the waiter's time forward to it;
//! - the drivers' special streams are modelled: raw handles 0 and 1 import a device's
//!   legacy default stream, 2 the per-thread default stream (every call with it acts on
//!   the calling thread's own stream of the device); work on the legacy stream starts
//!   after the per-thread (blocking) streams' queued work and theirs after its, as in
//!   CUDA; the streams [`SimBackend`] makes are non-blocking, as hetmem makes them on
//!   the drivers; a copy with no stream starts after the legacy and blocking streams'
//!   work, as `cuMemcpy` does.
//!
//! - driver calls (allocation, mapping, events, streams) block the host for what they
//!   cost on a real driver ([`DriverCosts`], in [`driver`]) and are counted by kind
//!   ([`SimStats::driver`]); freeing device memory first waits for the device's queued
//!   work, as `cuMemFree` does, and unmapping pages that queued copies still use is
//!   refused (on a GPU the copy would fault).
//!
//! - graph capture ([`SimBackend::begin_capture`], [`SimBackend::end_capture`]) as the
//!   CUDA driver does it, strictly: work queued on a capturing stream (copies,
//!   kernels) is recorded, not run (no bytes move, no time passes); an event recorded
//!   there is a captured event; a stream not capturing that waits for a captured
//!   event joins the capture ([`SimStats::capture_joins`]). Illegal calls fail with
//!   the CUDA driver's codes ([`CAPTURE_UNSUPPORTED`] 900 and the others) and
//!   invalidate the capture ([`SimStats::capture_violations`] counts them):
//!   synchronising a capturing stream (or its device), querying or synchronising a
//!   captured event, waiting from a capturing stream for an event recorded outside
//!   the capture (905) or in another capture (902), and, while any capture is under
//!   way, the calls that synchronise the device implicitly (freeing device memory,
//!   releasing physical memory, unmapping, freeing address space: CUDA's global
//!   capture mode).
//!
//! Work runs at enqueue, in host program order, which is always an order a GPU could
//! have chosen; the clock then says when it would have happened. Overlap, bytes moved
//! and stalls are exact and repeatable on a noisy machine. Defaults come from the H200
//! host measured in DESIGN.md.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::backend::{
    check_copy_stream, check_device, check_vmm_size, per_thread_device, special_handle, thread_key,
    Backend, BackendKind, DeviceInfo, DevicePtr, EventHandle, HostKind, MemInfo, MemRef,
    PhysHandle, StreamHandle, LEGACY_STREAM, PER_THREAD_STREAM, SPECIAL_STREAMS,
};
use crate::error::{Error, Result};
use crate::placement::{Advice, Location, Tier};
use crate::stats::ByteCounter;

pub mod driver;
pub use driver::{CallCost, DriverCall, DriverCosts, DriverStats};

/// One simulated device.
#[derive(Debug, Clone, PartialEq)]
pub struct SimDevice {
    /// Name reported in [`DeviceInfo`].
    pub name: String,
    /// Device memory in bytes.
    pub capacity: usize,
    /// PCI address reported to the topology (to test NUMA affinity against fixtures).
    pub pci_bus_id: Option<String>,
}

/// Speeds and sizes of the simulated machine.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// The devices.
    pub devices: Vec<SimDevice>,
    /// Host→device bandwidth from pinned memory, GB/s (10⁹ bytes per second).
    pub h2d_gbps: f64,
    /// Device→host bandwidth to pinned memory, GB/s.
    pub d2h_gbps: f64,
    /// Bandwidth of either direction when the host side is pageable, GB/s.
    pub pageable_gbps: f64,
    /// Device→device bandwidth (same or another device), GB/s.
    pub d2d_gbps: f64,
    /// Fixed cost of every copy and prefetch.
    pub copy_latency: Duration,
    /// What each driver call costs the host ([`DriverCosts::zero`] for none).
    pub driver: DriverCosts,
}

/// H200 device memory as the driver reports it (143,771,336,704 bytes ≈ 133.9 GiB).
pub const H200_MEMORY: usize = 143_771_336_704;

impl Default for SimConfig {
    /// One H200-like device on a PCIe Gen5 x16 link, with the figures measured in
    /// DESIGN.md: 55.3 GB/s pinned each way, 6–11 GB/s pageable (8 taken).
    fn default() -> Self {
        SimConfig {
            devices: vec![SimDevice {
                name: "sim-H200".into(),
                capacity: H200_MEMORY,
                pci_bus_id: None,
            }],
            h2d_gbps: 55.3,
            d2h_gbps: 55.3,
            pageable_gbps: 8.0,
            d2d_gbps: 2000.0,
            copy_latency: Duration::from_micros(8),
            driver: DriverCosts::default(),
        }
    }
}

impl SimConfig {
    /// `n` identical devices of `capacity` bytes each, default speeds.
    pub fn with_devices(n: usize, capacity: usize) -> Self {
        SimConfig {
            devices: (0..n)
                .map(|_| SimDevice {
                    name: "sim-H200".into(),
                    capacity,
                    // No PCI slot: a made-up one could name a real device in sysfs.
                    pci_bus_id: None,
                })
                .collect(),
            ..SimConfig::default()
        }
    }

    /// The default, changed by `HETMEM_SIM_DEVICES` (count) and `HETMEM_SIM_MEMORY`
    /// (bytes per device, with an optional `K`, `M`, `G` or `T` binary suffix).
    pub fn from_env() -> Result<Self> {
        let mut cfg = SimConfig::default();
        let capacity = match std::env::var("HETMEM_SIM_MEMORY") {
            Ok(s) => parse_bytes(&s).ok_or_else(|| {
                Error::InvalidArgument(format!("HETMEM_SIM_MEMORY={s:?} is not a byte size"))
            })?,
            Err(_) => H200_MEMORY,
        };
        let count = match std::env::var("HETMEM_SIM_DEVICES") {
            Ok(s) => s.trim().parse::<usize>().map_err(|_| {
                Error::InvalidArgument(format!("HETMEM_SIM_DEVICES={s:?} is not a count"))
            })?,
            Err(_) => 1,
        };
        if count != 1 || capacity != H200_MEMORY {
            cfg = SimConfig {
                devices: SimConfig::with_devices(count, capacity).devices,
                ..cfg
            };
        }
        Ok(cfg)
    }
}

/// Parses `123`, `64K`, `512M`, `80G`, `1T` (binary multiples).
pub(crate) fn parse_bytes(s: &str) -> Option<usize> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 10),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        (i, 'T' | 't') => (&s[..i], 40),
        _ => (s, 0),
    };
    digits
        .trim()
        .parse::<usize>()
        .ok()?
        .checked_mul(1usize << shift)
}

/// Bytes moved and work done, per kind, since the backend was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Bytes copied host→device.
    pub h2d_bytes: u64,
    /// Bytes copied device→host.
    pub d2h_bytes: u64,
    /// Bytes copied device→device.
    pub d2d_bytes: u64,
    /// Bytes copied host→host.
    pub h2h_bytes: u64,
    /// Bytes migrated by managed-memory prefetch.
    pub prefetch_bytes: u64,
    /// Copies issued.
    pub copies: u64,
    /// Kernels launched.
    pub kernels: u64,
    /// Driver calls made and the virtual time they cost, by kind.
    pub driver: DriverStats,
    /// Calls refused because of a capture (each invalidated it), as a CUDA driver
    /// refuses them.
    pub capture_violations: u64,
    /// Streams pulled into a capture by waiting for one of its events.
    pub capture_joins: u64,
    /// Copies and kernels recorded into a capture instead of run.
    pub captured_work: u64,
}

/// Advice and residency of one managed allocation, for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedState {
    /// Where the pages are now.
    pub location: Location,
    /// `SetReadMostly` is in force.
    pub read_mostly: bool,
    /// `SetPreferredLocation` target.
    pub preferred: Option<Location>,
    /// Devices named by `SetAccessedBy`.
    pub accessed_by: Vec<usize>,
}

/// The span of virtual time one piece of work occupied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Start, in virtual nanoseconds.
    pub start_ns: u64,
    /// End, in virtual nanoseconds.
    pub end_ns: u64,
}

/// Backing memory of a simulated allocation: an anonymous mapping, so that pages the
/// program never touches cost nothing (a simulated 80 GB device must not need 80 GB of
/// host memory) and come back zeroed.
#[derive(Debug)]
struct Memory {
    ptr: NonNull<u8>,
    len: usize,
}

impl Memory {
    fn zeroed(size: usize) -> Option<Memory> {
        // SAFETY: a fresh private anonymous mapping (page-aligned, as drivers hand out
        // memory); MAP_NORESERVE because the device's own capacity is the limit we
        // enforce, not the host's overcommit accounting.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(Memory {
            ptr: NonNull::new(p.cast())?,
            len: size,
        })
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `zeroed` with this length and is ours alone.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[derive(Debug)]
struct DeviceAlloc {
    device: usize,
    len: usize,
    mem: Memory,
}

#[derive(Debug)]
struct ManagedAlloc {
    device: usize,
    len: usize,
    mem: Memory,
    state: ManagedState,
}

/// When one engine is busy: non-overlapping spans sorted by start. Work is placed in
/// the first gap at or after the time it becomes ready, as hardware runs whatever is
/// runnable: a copy queued later on an idle stream does not wait behind one that is
/// itself waiting on an event.
#[derive(Debug, Default, Clone)]
struct Timeline {
    busy: Vec<(u64, u64)>,
}

impl Timeline {
    /// Books `dur` ns at the earliest time ≥ `ready`; spans ending before `floor` (the
    /// host's time: nothing can be queued before it any more) are forgotten first.
    ///
    /// Spans are sorted by start and do not overlap, so their ends are sorted too: the
    /// spans that end by `ready` cannot delay the work and the search starts after them,
    /// and spans that touch are merged, so a busy engine's history stays short even
    /// when the host never waits (and `floor` never moves).
    fn place(&mut self, ready: u64, dur: u64, floor: u64) -> (u64, u64) {
        let old = self.busy.partition_point(|&(_, e)| e <= floor);
        self.busy.drain(..old);
        let mut start = ready;
        let first = self.busy.partition_point(|&(_, e)| e <= ready);
        let mut at = self.busy.len();
        for (i, &(s, e)) in self.busy.iter().enumerate().skip(first) {
            if start.saturating_add(dur) <= s {
                at = i;
                break;
            }
            start = start.max(e);
        }
        let end = start.saturating_add(dur);
        if dur > 0 {
            let joins_prev = at > 0 && self.busy[at - 1].1 == start;
            let joins_next = at < self.busy.len() && self.busy[at].0 == end;
            match (joins_prev, joins_next) {
                (true, true) => {
                    self.busy[at - 1].1 = self.busy[at].1;
                    self.busy.remove(at);
                }
                (true, false) => self.busy[at - 1].1 = end,
                (false, true) => self.busy[at].0 = start,
                (false, false) => self.busy.insert(at, (start, end)),
            }
        }
        (start, end)
    }
}

#[derive(Debug, Default, Clone)]
struct Engines {
    h2d: Timeline,
    d2h: Timeline,
    compute: Timeline,
}

#[derive(Debug)]
struct StreamState {
    device: usize,
    tail_ns: u64,
    kind: StreamKind,
    /// The capture recording this stream's work, if any.
    capture: Option<u64>,
}

/// How a stream takes part in the legacy default stream's implicit ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    /// A stream made by [`Backend::create_stream`]: non-blocking, as hetmem makes them
    /// on the drivers (no implicit ordering).
    NonBlocking,
    /// A device's default stream (raw handle 0 or 1): its work waits for the blocking
    /// streams' work queued before, and theirs for its.
    Legacy,
    /// One thread's per-thread default stream (raw handle 2): a blocking stream.
    PerThread,
}

#[derive(Debug)]
struct EventState {
    device: usize,
    /// `None` until recorded; an unrecorded event counts as passed, as in CUDA.
    time_ns: Option<u64>,
    /// The capture it was last recorded in, if its last recording was captured.
    captured: Option<u64>,
}

/// A capture under way ([`SimBackend::begin_capture`]).
#[derive(Debug)]
struct Capture {
    /// The stream it began on (and must end on).
    origin: u64,
    /// An illegal call was made: ending it fails.
    invalidated: bool,
}

#[derive(Debug)]
struct State {
    host_ns: u64,
    next_handle: u64,
    /// Each device's current run of addresses ([`take_run`]).
    addr: Vec<AddrRun>,
    device_allocs: BTreeMap<u64, DeviceAlloc>,
    managed: BTreeMap<usize, ManagedAlloc>,
    registered: BTreeMap<usize, usize>,
    streams: HashMap<u64, StreamState>,
    /// Each device's default stream (what raw handle 0 imports as), made on first use.
    default_streams: HashMap<usize, u64>,
    /// Each thread's per-thread default stream of each device (what raw handle 2 means
    /// on that thread), by (device, [`thread_key`]), made on first use.
    per_thread: HashMap<(usize, u64), u64>,
    events: HashMap<u64, EventState>,
    engines: Vec<Engines>,
    stats: SimStats,
    reservations: BTreeMap<u64, Reservation>,
    physical: HashMap<u64, Physical>,
    /// Host-to-device copies still to be corrupted ([`SimBackend::corrupt_next_h2d_copies`]).
    corrupt_h2d: u32,
    /// Device-to-host copies still to fail ([`SimBackend::fail_next_d2h_copies`]).
    fail_d2h: u32,
    /// Captures under way, by id.
    captures: HashMap<u64, Capture>,
    next_capture: u64,
}

/// An address range reserved for virtual memory management, backed by a lazily
/// committed host mapping of the same size so that mapped pages resolve by offset.
#[derive(Debug)]
struct Reservation {
    device: usize,
    size: usize,
    /// Lazily committed host memory of the same size: mapped pages resolve by offset.
    host: Memory,
    /// Offset of each mapping.
    mapped: BTreeMap<usize, Mapping>,
}

/// One `map` call's range in a reservation.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    size: usize,
    handle: u64,
    /// Whether `set_access` made it readable and writable (until then a device access
    /// faults, so copies are refused).
    access: bool,
    /// When the last queued copy touching it ends: unmapping before then is refused.
    busy_until: u64,
}

impl Reservation {
    /// Whether `off..off+len` is covered by mappings with no gap (and, with `access`,
    /// all of them accessible).
    fn covered(&self, off: usize, len: usize, access: bool) -> bool {
        let end = off + len;
        let mut at = off;
        while at < end {
            match self.mapped.range(..=at).next_back() {
                Some((o, m)) if o + m.size > at && (m.access || !access) => at = o + m.size,
                _ => return false,
            }
        }
        true
    }

    /// The mappings that `off..off+len` touches.
    fn touched(&mut self, off: usize, len: usize) -> impl Iterator<Item = &mut Mapping> {
        let first = self
            .mapped
            .range(..=off)
            .next_back()
            .map_or(off, |(o, _)| *o);
        self.mapped
            .range_mut(first..off + len.max(1))
            .map(|(_, m)| m)
    }
}

#[derive(Debug)]
struct Physical {
    device: usize,
    size: usize,
    mapped_at: Option<u64>,
}

/// The simulated GPU backend. See the module docs for the timing model.
#[derive(Debug)]
pub struct SimBackend {
    cfg: SimConfig,
    devices: Vec<DeviceInfo>,
    used: Vec<ByteCounter>,
    state: Mutex<State>,
}

// SAFETY: the raw pointers inside `State` point to memory this backend owns exclusively;
// every access to them goes through the mutex.
unsafe impl Send for SimBackend {}
// SAFETY: as above: shared access is serialised by the mutex.
unsafe impl Sync for SimBackend {}

/// Most simulated devices of one simulator.
pub const MAX_DEVICES: usize = 1024;
/// Most memory of one simulated device (1 PiB).
pub const MAX_CAPACITY: usize = 1 << 50;

/// Device addresses of every simulator in the process come from one range, handed out
/// in runs by one counter: a device takes a run when it first allocates and another
/// when its run is used up. No two devices, of one simulator or of two, ever share an
/// address, so a pointer of one manager is never a live allocation of another (as on a
/// GPU driver, which fails such a pointer rather than touching someone else's memory);
/// addresses are never reused, so a stale pointer never aliases a newer allocation. The
/// range lies above any user-space address (and below 2^63, so that callers that hold
/// addresses as signed 64-bit integers, PyTorch's among them, see them positive).
const ADDR_BASE: u64 = 1 << 52;
/// The end of the range: 2^63 - 2^52 bytes of allocations per process.
const ADDR_LIMIT: u64 = 1 << 63;
/// The size of a run (larger for an allocation that needs more).
const ADDR_RUN: u64 = 1 << 40;
/// The largest run, and so the largest allocation or reservation: what one device's
/// whole range was before runs.
const MAX_RUN: u64 = 1 << 52;
/// The start of the next run of any simulator in the process.
static NEXT_RUN: AtomicU64 = AtomicU64::new(ADDR_BASE);

/// The run of addresses a device allocates from: `next..end`.
#[derive(Debug, Clone, Copy, Default)]
struct AddrRun {
    next: u64,
    end: u64,
}

/// A new run of at least `min` bytes from the process-wide counter, or `None` once the
/// range is used up (or `min` is over [`MAX_RUN`]).
fn take_run(min: u64) -> Option<AddrRun> {
    let len = min.checked_next_multiple_of(ADDR_RUN)?.max(ADDR_RUN);
    if len > MAX_RUN {
        return None;
    }
    let start = NEXT_RUN
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            n.checked_add(len).filter(|end| *end <= ADDR_LIMIT)
        })
        .ok()?;
    Some(AddrRun {
        next: start,
        end: start + len,
    })
}

/// The address for `size` bytes aligned to `align` (a power of two that divides
/// [`ADDR_RUN`]) on `device`, from its run or a new one; `None` once no run is left.
fn place(st: &mut State, device: usize, size: usize, align: u64) -> Option<u64> {
    let run = &mut st.addr[device];
    if let Some(at) = run.next.checked_next_multiple_of(align) {
        if let Some(next) = bump(at, size, align, run.end) {
            run.next = next;
            return Some(at);
        }
    }
    let mut fresh = take_run((size as u64).checked_add(2 * align)?)?;
    let at = fresh.next;
    fresh.next = bump(at, size, align, fresh.end)?;
    *run = fresh;
    Some(at)
}

/// Page size of the simulated virtual memory management, as on current NVIDIA GPUs.
pub const VMM_GRANULARITY: usize = 2 << 20;
/// Alignment of device allocations, as CUDA guarantees (256 B; we use 512).
const DEVICE_ALIGN: u64 = 512;

impl SimBackend {
    /// A simulator with the given configuration.
    pub fn new(cfg: SimConfig) -> Result<SimBackend> {
        if cfg.devices.is_empty() {
            return Err(Error::InvalidArgument(
                "a simulated machine needs at least one device".into(),
            ));
        }
        for (what, v) in [
            ("h2d_gbps", cfg.h2d_gbps),
            ("d2h_gbps", cfg.d2h_gbps),
            ("pageable_gbps", cfg.pageable_gbps),
            ("d2d_gbps", cfg.d2d_gbps),
        ] {
            if !(v.is_finite() && v >= 1e-3) {
                return Err(Error::InvalidArgument(format!(
                    "sim {what} must be at least 0.001 GB/s, got {v}"
                )));
            }
        }
        if cfg.devices.len() > MAX_DEVICES {
            return Err(Error::InvalidArgument(format!(
                "a simulated machine has at most {MAX_DEVICES} devices, asked for {}",
                cfg.devices.len()
            )));
        }
        if let Some(d) = cfg.devices.iter().find(|d| d.capacity > MAX_CAPACITY) {
            return Err(Error::InvalidArgument(format!(
                "sim device capacity {} is over the limit of {MAX_CAPACITY} bytes",
                d.capacity
            )));
        }
        let devices = cfg
            .devices
            .iter()
            .enumerate()
            .map(|(ordinal, d)| DeviceInfo {
                ordinal,
                name: d.name.clone(),
                total_memory: d.capacity,
                pci_bus_id: d.pci_bus_id.clone(),
                managed_memory: true,
            })
            .collect();
        let used = cfg
            .devices
            .iter()
            .map(|d| ByteCounter::with_limit(d.capacity))
            .collect();
        let n = cfg.devices.len();
        Ok(SimBackend {
            devices,
            used,
            state: Mutex::new(State {
                host_ns: 0,
                // Below this are the drivers' special stream values (0, 1, 2): no sim
                // handle may be mistaken for one.
                next_handle: SPECIAL_STREAMS,
                // Runs are taken at first use: a device that allocates nothing takes none.
                addr: vec![AddrRun::default(); n],
                device_allocs: BTreeMap::new(),
                reservations: BTreeMap::new(),
                physical: HashMap::new(),
                corrupt_h2d: 0,
                fail_d2h: 0,
                captures: HashMap::new(),
                next_capture: 1,
                managed: BTreeMap::new(),
                registered: BTreeMap::new(),
                streams: HashMap::new(),
                default_streams: HashMap::new(),
                per_thread: HashMap::new(),
                events: HashMap::new(),
                engines: vec![Engines::default(); n],
                stats: SimStats::default(),
            }),
            cfg,
        })
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way
        // that matters more than refusing all further work would, so carry on.
        crate::backend::lock(&self.state)
    }

    /// The host's virtual time in nanoseconds.
    pub fn host_time_ns(&self) -> u64 {
        self.lock().host_ns
    }

    /// When the work queued on `stream` so far ends, in virtual nanoseconds.
    /// For an imported per-thread default stream: the calling thread's.
    pub fn stream_time_ns(&self, stream: StreamHandle) -> Result<u64> {
        let mut st = self.lock();
        let stream = resolve_stream(&mut st, stream);
        Ok(stream_ref(&st, stream)?.tail_ns)
    }

    /// The virtual time `event` was recorded at (`None` if never recorded).
    pub fn event_time_ns(&self, event: EventHandle) -> Result<Option<u64>> {
        let st = self.lock();
        Ok(event_ref(&st, event)?.time_ns)
    }

    /// Bytes moved and work done so far.
    pub fn stats(&self) -> SimStats {
        self.lock().stats
    }

    /// Residency and advice of the managed allocation containing `ptr`.
    pub fn managed_state(&self, ptr: NonNull<u8>) -> Option<ManagedState> {
        let st = self.lock();
        find_managed(&st, ptr.as_ptr() as usize, 1).map(|m| m.state.clone())
    }

    /// Fault injection: the next `n` host-to-device copies (of at least one byte) arrive
    /// with their first byte inverted, as over a faulty link. For tests of what checks
    /// loads (the tier store's checksums).
    pub fn corrupt_next_h2d_copies(&self, n: u32) {
        self.lock().corrupt_h2d = n;
    }

    /// Fault injection: the next `n` device-to-host copies fail (an `Error::Driver`)
    /// without writing anything. For tests of what a failed copy must not lose.
    pub fn fail_next_d2h_copies(&self, n: u32) {
        self.lock().fail_d2h = n;
    }

    /// Queues a kernel that occupies `stream`'s device compute engine for `duration`.
    /// Returns when it would run.
    pub fn launch_kernel(&self, stream: StreamHandle, duration: Duration) -> Result<Span> {
        let mut st = self.lock();
        let stream = resolve_stream(&mut st, stream);
        let device = stream_ref(&st, stream)?.device;
        let host = st.host_ns;
        if stream_ref(&st, stream)?.capture.is_some() {
            // Recorded into the graph, not run.
            st.stats.captured_work += 1;
            return Ok(Span {
                start_ns: host,
                end_ns: host,
            });
        }
        let s = ready_ns(&st, stream)?;
        let dur = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let (start, end) = st.engines[device].compute.place(s.max(host), dur, host);
        stream_mut(&mut st, stream)?.tail_ns = end;
        st.stats.kernels += 1;
        Ok(Span {
            start_ns: start,
            end_ns: end,
        })
    }

    /// Begins capturing `stream`'s work into a graph (CUDA's `cuStreamBeginCapture`):
    /// until [`SimBackend::end_capture`], work queued on it is recorded instead of run,
    /// and the calls a capture forbids fail (module docs).
    pub fn begin_capture(&self, stream: StreamHandle) -> Result<()> {
        let mut st = self.lock();
        let stream = resolve_stream(&mut st, stream);
        if stream_ref(&st, stream)?.capture.is_some() {
            return Err(Error::InvalidArgument(format!(
                "sim stream {} is already capturing",
                stream.0
            )));
        }
        let id = st.next_capture;
        st.next_capture += 1;
        st.captures.insert(
            id,
            Capture {
                origin: stream.0,
                invalidated: false,
            },
        );
        stream_mut(&mut st, stream)?.capture = Some(id);
        Ok(())
    }

    /// Ends the capture that began on `stream` (CUDA's `cuStreamEndCapture`): every
    /// stream it recorded (joined ones too) runs its work again. Fails with
    /// [`CAPTURE_INVALIDATED`] when an illegal call invalidated it (it ends anyway),
    /// [`CAPTURE_UNMATCHED`] on a stream of the capture that it did not begin on.
    pub fn end_capture(&self, stream: StreamHandle) -> Result<()> {
        let mut st = self.lock();
        let stream = resolve_stream(&mut st, stream);
        let Some(id) = stream_ref(&st, stream)?.capture else {
            return Err(Error::InvalidArgument(format!(
                "sim stream {} is not capturing",
                stream.0
            )));
        };
        if st.captures[&id].origin != stream.0 {
            return Err(Error::Driver {
                backend: BackendKind::Sim,
                call: "end_capture",
                code: CAPTURE_UNMATCHED,
                message: "the capture did not begin on this stream".into(),
            });
        }
        let c = st.captures.remove(&id).expect("a stream's capture exists");
        for s in st.streams.values_mut() {
            if s.capture == Some(id) {
                s.capture = None;
            }
        }
        if c.invalidated {
            return Err(Error::Driver {
                backend: BackendKind::Sim,
                call: "end_capture",
                code: CAPTURE_INVALIDATED,
                message: "the capture was invalidated by an illegal call".into(),
            });
        }
        Ok(())
    }

    /// Virtual duration of a copy of `bytes` at `gbps`.
    fn copy_ns(&self, bytes: usize, gbps: f64) -> u64 {
        let latency = u64::try_from(self.cfg.copy_latency.as_nanos()).unwrap_or(u64::MAX);
        // `as` saturates for floats: an absurd size or speed gives u64::MAX, not a wrap.
        latency.saturating_add((bytes as f64 / gbps).ceil() as u64)
    }

    fn host_kind(st: &State, ptr: NonNull<u8>, len: usize, kind: HostKind) -> HostKind {
        // Trust registration over the caller's label: pinned speed needs registration.
        let p = ptr.as_ptr() as usize;
        match kind {
            HostKind::Managed => HostKind::Managed,
            _ if is_registered(st, p, len) => HostKind::Pinned,
            _ => HostKind::Pageable,
        }
    }

    /// Resolves one side of a copy to a host-addressable pointer.
    fn resolve(st: &State, r: MemRef, len: usize) -> Result<*mut u8> {
        match r {
            MemRef::Host { ptr, .. } => Ok(ptr.as_ptr()),
            MemRef::Device { device, ptr } => {
                if let Some((start, r)) = st.reservations.range(..=ptr.0).next_back() {
                    let off = (ptr.0 - start) as usize;
                    if off < r.size {
                        if r.device != device || !r.covered(off, len, true) {
                            return Err(Error::InvalidArgument(format!(
                                "{:#x}+{len} on sim device {device} is not fully mapped memory \
                                 with access set",
                                ptr.0
                            )));
                        }
                        // SAFETY: off + len lies inside the reservation's host mapping
                        // (covered() checked every byte is in a mapping inside it).
                        return Ok(unsafe { r.host.ptr.as_ptr().add(off) });
                    }
                }
                let (start, a) = st
                    .device_allocs
                    .range(..=ptr.0)
                    .next_back()
                    .ok_or_else(|| bad_device_ptr(device, ptr))?;
                let off = (ptr.0 - start) as usize;
                if a.device != device || off.checked_add(len).is_none_or(|e| e > a.len) {
                    return Err(bad_device_ptr(device, ptr));
                }
                // SAFETY: off + len <= a.len, so the result stays inside the allocation.
                Ok(unsafe { a.mem.ptr.as_ptr().add(off) })
            }
        }
    }
}

/// Advances the host's clock by what `call` costs and counts it.
fn charge(cfg: &SimConfig, st: &mut State, call: DriverCall, bytes: usize) {
    let ns = cfg.driver.ns(call, bytes);
    st.host_ns = st.host_ns.saturating_add(ns);
    st.stats.driver.add(call, ns);
}

/// Records that work ending at `end` uses `r`'s memory, if it lies in a reservation
/// (so that unmapping it before then can be refused).
fn mark_busy(st: &mut State, r: MemRef, len: usize, end: u64) {
    let MemRef::Device { ptr, .. } = r else {
        return;
    };
    if let Some((start, res)) = st.reservations.range_mut(..=ptr.0).next_back() {
        let off = (ptr.0 - start) as usize;
        if off < res.size {
            for m in res.touched(off, len) {
                m.busy_until = m.busy_until.max(end);
            }
        }
    }
}

/// The next free address after `size` bytes at `addr` (aligned, with a gap so that
/// neighbours never touch), or `None` if that passes `end`.
fn bump(addr: u64, size: usize, align: u64, end: u64) -> Option<u64> {
    let next = addr
        .checked_add(size as u64)?
        .checked_next_multiple_of(align)?
        .checked_add(align)?;
    (next <= end).then_some(next)
}

fn out_of_addresses(device: usize, size: usize) -> Error {
    Error::InvalidArgument(format!(
        "sim device {device}: no address range for {size} bytes (over 2^52 bytes, or the \
         process's simulators have used up their address space)"
    ))
}

fn bad_device_ptr(device: usize, ptr: DevicePtr) -> Error {
    Error::InvalidArgument(format!(
        "{:#x} is not a live allocation of sim device {device} (or the range runs past its end)",
        ptr.0
    ))
}

/// Whether registrations cover `p..p+len` with no gap (a large region is registered in
/// several adjacent pieces, and a copy may cross from one to the next).
fn is_registered(st: &State, p: usize, len: usize) -> bool {
    let end = p + len;
    let mut at = p;
    while at < end {
        match st.registered.range(..=at).next_back() {
            Some((s, l)) if s + l > at => at = s + l,
            _ => return false,
        }
    }
    true
}

fn find_managed(st: &State, p: usize, len: usize) -> Option<&ManagedAlloc> {
    st.managed
        .range(..=p)
        .next_back()
        .filter(|(s, m)| p + len <= *s + m.len)
        .map(|(_, m)| m)
}

/// The stream a handle names for the calling thread: an imported per-thread default
/// stream is the calling thread's own (made at its first use), any other handle itself.
fn resolve_stream(st: &mut State, s: StreamHandle) -> StreamHandle {
    let Some(device) = per_thread_device(s) else {
        return s;
    };
    let key = (device, thread_key());
    if let Some(&h) = st.per_thread.get(&key) {
        return StreamHandle(h);
    }
    let h = new_stream(st, device, StreamKind::PerThread);
    st.per_thread.insert(key, h);
    StreamHandle(h)
}

fn new_stream(st: &mut State, device: usize, kind: StreamKind) -> u64 {
    let h = st.next_handle;
    st.next_handle += 1;
    let tail_ns = st.host_ns;
    st.streams.insert(
        h,
        StreamState {
            device,
            tail_ns,
            kind,
            capture: None,
        },
    );
    h
}

/// The latest end of the work queued so far on `device`'s legacy default stream and
/// blocking (per-thread) streams: what work on the legacy stream, and a synchronous
/// copy (as `cuMemcpy`), starts after.
fn legacy_barrier(st: &State, device: usize) -> u64 {
    st.streams
        .values()
        .filter(|s| s.device == device && s.kind != StreamKind::NonBlocking)
        .map(|s| s.tail_ns)
        .max()
        .unwrap_or(0)
}

/// When work queued now on (resolved) stream `s` may start, by its own order and the
/// legacy stream's implicit one: legacy work after every blocking stream's, blocking
/// streams' work after the legacy stream's.
fn ready_ns(st: &State, s: StreamHandle) -> Result<u64> {
    let state = stream_ref(st, s)?;
    Ok(match state.kind {
        StreamKind::NonBlocking => state.tail_ns,
        StreamKind::Legacy => legacy_barrier(st, state.device),
        StreamKind::PerThread => st
            .default_streams
            .get(&state.device)
            .and_then(|l| st.streams.get(l))
            .map_or(state.tail_ns, |l| state.tail_ns.max(l.tail_ns)),
    })
}

fn stream_ref(st: &State, s: StreamHandle) -> Result<&StreamState> {
    st.streams
        .get(&s.0)
        .ok_or_else(|| Error::InvalidArgument(format!("sim stream {} is not live", s.0)))
}

fn stream_mut(st: &mut State, s: StreamHandle) -> Result<&mut StreamState> {
    st.streams
        .get_mut(&s.0)
        .ok_or_else(|| Error::InvalidArgument(format!("sim stream {} is not live", s.0)))
}

fn event_ref(st: &State, e: EventHandle) -> Result<&EventState> {
    st.events
        .get(&e.0)
        .ok_or_else(|| Error::InvalidArgument(format!("sim event {} is not live", e.0)))
}

/// `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED`: not permitted while a stream is capturing.
pub const CAPTURE_UNSUPPORTED: i32 = 900;
/// `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED`: an earlier illegal call invalidated it.
pub const CAPTURE_INVALIDATED: i32 = 901;
/// `CUDA_ERROR_STREAM_CAPTURE_MERGE`: a wait would merge two captures.
pub const CAPTURE_MERGE: i32 = 902;
/// `CUDA_ERROR_STREAM_CAPTURE_UNMATCHED`: the capture did not begin on this stream.
pub const CAPTURE_UNMATCHED: i32 = 903;
/// `CUDA_ERROR_STREAM_CAPTURE_ISOLATION`: a wait would cross the capture's boundary
/// (a capturing stream waiting for an event recorded outside the capture).
pub const CAPTURE_ISOLATION: i32 = 905;
/// `CUDA_ERROR_CAPTURED_EVENT`: not permitted on an event last recorded in a capture.
pub const CAPTURED_EVENT: i32 = 907;

/// Refuses an illegal call: invalidates `captures` and counts it.
fn capture_violation(
    st: &mut State,
    captures: &[u64],
    call: &'static str,
    code: i32,
    what: &str,
) -> Error {
    for c in captures {
        if let Some(c) = st.captures.get_mut(c) {
            c.invalidated = true;
        }
    }
    st.stats.capture_violations += 1;
    Error::Driver {
        backend: BackendKind::Sim,
        call,
        code,
        message: format!("{what} (the capture is invalidated)"),
    }
}

/// Refuses a call that synchronises the device implicitly while any capture is under
/// way (CUDA's global capture mode forbids them from every thread).
fn refuse_during_capture(st: &mut State, call: &'static str) -> Result<()> {
    if st.captures.is_empty() {
        return Ok(());
    }
    let all: Vec<u64> = st.captures.keys().copied().collect();
    Err(capture_violation(
        st,
        &all,
        call,
        CAPTURE_UNSUPPORTED,
        "a call that synchronises the device, made while a stream is capturing",
    ))
}

impl Backend for SimBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Sim
    }

    fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    fn mem_info(&self, device: usize) -> Result<MemInfo> {
        check_device(self, device)?;
        let c = &self.used[device];
        Ok(MemInfo {
            free: c.free(),
            total: c.limit(),
        })
    }

    fn alloc_device(&self, device: usize, size: usize) -> Result<DevicePtr> {
        check_device(self, device)?;
        let oom = |free| Error::oom(Tier::Device(device), size, free);
        self.used[device].try_reserve(size).map_err(oom)?;
        let Some(mem) = Memory::zeroed(size) else {
            self.used[device].release(size);
            // The simulated device had room but this host did not.
            return Err(oom(self.used[device].free()));
        };
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::MemAlloc, size);
        let Some(addr) = place(&mut st, device, size, DEVICE_ALIGN) else {
            drop(st);
            self.used[device].release(size);
            return Err(out_of_addresses(device, size));
        };
        st.device_allocs.insert(
            addr,
            DeviceAlloc {
                device,
                len: size,
                mem,
            },
        );
        Ok(DevicePtr(addr))
    }

    unsafe fn free_device(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        check_device(self, device)?;
        let mut st = self.lock();
        refuse_during_capture(&mut st, "free_device")?;
        match st.device_allocs.get(&ptr.0) {
            Some(a) if a.device == device && a.len == size => {
                // cuMemFree waits for the device's queued work before it frees.
                wait_device(&mut st, device);
                charge(&self.cfg, &mut st, DriverCall::MemFree, size);
                st.device_allocs.remove(&ptr.0);
                drop(st);
                self.used[device].release(size);
                Ok(())
            }
            _ => Err(bad_device_ptr(device, ptr)),
        }
    }

    fn alloc_managed(&self, device: usize, size: usize) -> Result<NonNull<u8>> {
        check_device(self, device)?;
        // Managed memory lives on the host until touched on the device; it counts
        // against the device as the driver's accounting does once it migrates, which
        // the simulator simplifies to counting it always.
        let oom = |free| Error::oom(Tier::Managed(device), size, free);
        self.used[device].try_reserve(size).map_err(oom)?;
        let Some(mem) = Memory::zeroed(size) else {
            self.used[device].release(size);
            return Err(oom(self.used[device].free()));
        };
        let ptr = mem.ptr;
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::MemAlloc, size);
        st.managed.insert(
            ptr.as_ptr() as usize,
            ManagedAlloc {
                device,
                len: size,
                mem,
                state: ManagedState {
                    location: Location::Host,
                    read_mostly: false,
                    preferred: None,
                    accessed_by: Vec::new(),
                },
            },
        );
        Ok(ptr)
    }

    unsafe fn free_managed(&self, device: usize, ptr: NonNull<u8>, size: usize) -> Result<()> {
        let mut st = self.lock();
        let key = ptr.as_ptr() as usize;
        match st.managed.get(&key) {
            Some(m) if m.device == device && m.len == size => {
                wait_device(&mut st, device);
                charge(&self.cfg, &mut st, DriverCall::MemFree, size);
                let m = st.managed.remove(&key).expect("checked above");
                drop(st);
                drop(m.mem);
                self.used[device].release(size);
                Ok(())
            }
            _ => Err(Error::InvalidArgument(format!(
                "{key:#x} is not a live managed allocation of {size} bytes on sim device {device}"
            ))),
        }
    }

    unsafe fn register_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        let p = ptr.as_ptr() as usize;
        let mut st = self.lock();
        let overlaps = st
            .registered
            .range(..p + len)
            .next_back()
            .is_some_and(|(s, l)| s + l > p);
        if overlaps {
            return Err(Error::InvalidArgument(format!(
                "host range {p:#x}+{len} is already registered"
            )));
        }
        charge(&self.cfg, &mut st, DriverCall::HostRegister, len);
        st.registered.insert(p, len);
        Ok(())
    }

    unsafe fn unregister_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        let p = ptr.as_ptr() as usize;
        let mut st = self.lock();
        match st.registered.get(&p) {
            Some(l) if *l == len => {
                charge(&self.cfg, &mut st, DriverCall::HostUnregister, len);
                st.registered.remove(&p);
                Ok(())
            }
            _ => Err(Error::InvalidArgument(format!(
                "host range {p:#x}+{len} is not registered"
            ))),
        }
    }

    fn create_stream(&self, device: usize) -> Result<StreamHandle> {
        check_device(self, device)?;
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::StreamCreate, 0);
        Ok(StreamHandle(new_stream(
            &mut st,
            device,
            StreamKind::NonBlocking,
        )))
    }

    unsafe fn destroy_stream(&self, stream: StreamHandle) -> Result<()> {
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::StreamDestroy, 0);
        st.streams
            .remove(&stream.0)
            .map(|_| ())
            .ok_or_else(|| Error::InvalidArgument(format!("sim stream {} is not live", stream.0)))
    }

    /// Raw handles 0 and 1 are the device's legacy default stream, a sim stream made on
    /// first use and kept for the life of the backend, ordered against the per-thread
    /// streams as CUDA orders it against blocking streams; 2 is the per-thread default
    /// stream: one handle, and every call with it acts on the calling thread's own
    /// stream of the device (made at its first use). Any other raw handle must be a live
    /// sim stream of `device` (the sim checks every handle, so a bad one is an error
    /// here or at its use, never undefined behaviour).
    unsafe fn import_stream(&self, device: usize, raw: u64) -> Result<StreamHandle> {
        check_device(self, device)?;
        let mut st = self.lock();
        if raw == 0 || raw == LEGACY_STREAM {
            if let Some(h) = st.default_streams.get(&device) {
                return Ok(StreamHandle(*h));
            }
            let h = new_stream(&mut st, device, StreamKind::Legacy);
            st.default_streams.insert(device, h);
            return Ok(StreamHandle(h));
        }
        if raw == PER_THREAD_STREAM {
            return Ok(special_handle(device, raw));
        }
        let owner = stream_ref(&st, StreamHandle(raw))?.device;
        if owner != device {
            return Err(Error::InvalidArgument(format!(
                "sim stream {raw} belongs to device {owner}, not device {device}"
            )));
        }
        Ok(StreamHandle(raw))
    }

    /// Nothing to undo: imports take no reference.
    unsafe fn forget_stream(&self, _stream: StreamHandle) -> Result<()> {
        Ok(())
    }

    unsafe fn synchronize_stream(&self, stream: StreamHandle) -> Result<()> {
        let mut st = self.lock();
        let stream = resolve_stream(&mut st, stream);
        if let Some(c) = stream_ref(&st, stream)?.capture {
            return Err(capture_violation(
                &mut st,
                &[c],
                "synchronize_stream",
                CAPTURE_UNSUPPORTED,
                "synchronising a capturing stream",
            ));
        }
        let s = stream_ref(&st, stream)?;
        // The legacy stream's synchronisation waits for the blocking streams too.
        let t = match s.kind {
            StreamKind::Legacy => legacy_barrier(&st, s.device),
            _ => s.tail_ns,
        };
        st.host_ns = st.host_ns.max(t);
        Ok(())
    }

    fn create_event(&self, device: usize) -> Result<EventHandle> {
        check_device(self, device)?;
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::EventCreate, 0);
        let h = st.next_handle;
        st.next_handle += 1;
        st.events.insert(
            h,
            EventState {
                device,
                time_ns: None,
                captured: None,
            },
        );
        Ok(EventHandle(h))
    }

    unsafe fn destroy_event(&self, event: EventHandle) -> Result<()> {
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::EventDestroy, 0);
        st.events
            .remove(&event.0)
            .map(|_| ())
            .ok_or_else(|| Error::InvalidArgument(format!("sim event {} is not live", event.0)))
    }

    unsafe fn record_event(&self, event: EventHandle, stream: StreamHandle) -> Result<()> {
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::EventRecord, 0);
        let stream = resolve_stream(&mut st, stream);
        let sdev = stream_ref(&st, stream)?.device;
        let capture = stream_ref(&st, stream)?.capture;
        let t = ready_ns(&st, stream)?.max(st.host_ns);
        let e = st
            .events
            .get_mut(&event.0)
            .ok_or_else(|| Error::InvalidArgument(format!("sim event {} is not live", event.0)))?;
        if e.device != sdev {
            return Err(Error::InvalidArgument(format!(
                "event of device {} recorded on a stream of device {sdev}",
                e.device
            )));
        }
        // A recording in a capture is a node of the graph: it marks no time.
        e.captured = capture;
        if capture.is_none() {
            e.time_ns = Some(t);
        }
        Ok(())
    }

    unsafe fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()> {
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::StreamWait, 0);
        let stream = resolve_stream(&mut st, stream);
        let e = event_ref(&st, event)?;
        let (t, captured) = (e.time_ns.unwrap_or(0), e.captured);
        let waiter = stream_ref(&st, stream)?.capture;
        match (waiter, captured) {
            (None, None) => {}
            (Some(w), None) => {
                return Err(capture_violation(
                    &mut st,
                    &[w],
                    "stream_wait_event",
                    CAPTURE_ISOLATION,
                    "a capturing stream waiting for an event recorded outside the capture",
                ))
            }
            (Some(w), Some(c)) if w == c => return Ok(()), // an edge of the graph
            (Some(w), Some(c)) => {
                return Err(capture_violation(
                    &mut st,
                    &[w, c],
                    "stream_wait_event",
                    CAPTURE_MERGE,
                    "waiting for an event of another capture",
                ))
            }
            (None, Some(c)) => {
                if !st.captures.contains_key(&c) {
                    return Err(capture_violation(
                        &mut st,
                        &[],
                        "stream_wait_event",
                        CAPTURED_EVENT,
                        "waiting for an event last recorded in a capture that has ended",
                    ));
                }
                // The waiter joins the capture, as a CUDA stream does (a fork).
                st.stats.capture_joins += 1;
                stream_mut(&mut st, stream)?.capture = Some(c);
                return Ok(());
            }
        }
        let ready = ready_ns(&st, stream)?;
        let s = stream_mut(&mut st, stream)?;
        s.tail_ns = ready.max(t);
        Ok(())
    }

    unsafe fn synchronize_event(&self, event: EventHandle) -> Result<()> {
        let mut st = self.lock();
        if let Some(c) = event_ref(&st, event)?.captured {
            return Err(capture_violation(
                &mut st,
                &[c],
                "synchronize_event",
                CAPTURED_EVENT,
                "synchronising an event recorded in a capture",
            ));
        }
        let t = event_ref(&st, event)?.time_ns.unwrap_or(0);
        st.host_ns = st.host_ns.max(t);
        Ok(())
    }

    unsafe fn event_done(&self, event: EventHandle) -> Result<bool> {
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::EventQuery, 0);
        if let Some(c) = event_ref(&st, event)?.captured {
            return Err(capture_violation(
                &mut st,
                &[c],
                "event_done",
                CAPTURED_EVENT,
                "querying an event recorded in a capture",
            ));
        }
        Ok(event_ref(&st, event)?.time_ns.unwrap_or(0) <= st.host_ns)
    }

    unsafe fn is_capturing(&self, stream: StreamHandle) -> Result<bool> {
        // Not charged: the question is answered from the driver's host-side state.
        let mut st = self.lock();
        let stream = resolve_stream(&mut st, stream);
        Ok(stream_ref(&st, stream)?.capture.is_some())
    }

    fn synchronize_device(&self, device: usize) -> Result<()> {
        check_device(self, device)?;
        let mut st = self.lock();
        let capturing: Vec<u64> = st
            .streams
            .values()
            .filter(|s| s.device == device)
            .filter_map(|s| s.capture)
            .collect();
        if !capturing.is_empty() {
            return Err(capture_violation(
                &mut st,
                &capturing,
                "synchronize_device",
                CAPTURE_UNSUPPORTED,
                "synchronising a device with a capturing stream",
            ));
        }
        wait_device(&mut st, device);
        Ok(())
    }

    unsafe fn copy(
        &self,
        dst: MemRef,
        src: MemRef,
        len: usize,
        stream: Option<StreamHandle>,
    ) -> Result<()> {
        let mut st = self.lock();
        let stream = stream.map(|s| resolve_stream(&mut st, s));
        let d = Self::resolve(&st, dst, len)?;
        let s = Self::resolve(&st, src, len)?;
        // Which engine and how fast: the device side picks the engine, the host side's
        // kind picks the speed.
        let (device, engine, gbps, pageable) = match (dst, src) {
            (MemRef::Device { device, .. }, MemRef::Host { ptr, kind }) => {
                let k = Self::host_kind(&st, ptr, len, kind);
                let pageable = k == HostKind::Pageable;
                let g = if pageable {
                    self.cfg.pageable_gbps
                } else {
                    self.cfg.h2d_gbps
                };
                (Some(device), Engine::H2D, g, pageable)
            }
            (MemRef::Host { ptr, kind }, MemRef::Device { device, .. }) => {
                let k = Self::host_kind(&st, ptr, len, kind);
                let pageable = k == HostKind::Pageable;
                let g = if pageable {
                    self.cfg.pageable_gbps
                } else {
                    self.cfg.d2h_gbps
                };
                (Some(device), Engine::D2H, g, pageable)
            }
            (MemRef::Device { device, .. }, MemRef::Device { .. }) => {
                (Some(device), Engine::Compute, self.cfg.d2d_gbps, false)
            }
            (MemRef::Host { .. }, MemRef::Host { .. }) => (None, Engine::Compute, 0.0, true),
        };
        if let Some(sh) = stream {
            let s = stream_ref(&st, sh)?;
            check_copy_stream(&dst, &src, s.device)?;
            if s.capture.is_some() {
                // Recorded into the graph, not run: nothing moves now.
                st.stats.captured_work += 1;
                return Ok(());
            }
        }
        if engine == Engine::D2H && st.fail_d2h > 0 {
            st.fail_d2h -= 1;
            return Err(Error::Driver {
                backend: BackendKind::Sim,
                call: "copy",
                code: -1,
                message: "a fault injected by fail_next_d2h_copies".into(),
            });
        }
        // SAFETY: both ranges were resolved to live memory of at least `len` bytes (device
        // side) or are valid by the caller's contract (host side); they do not overlap
        // by the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(s, d, len) };
        if engine == Engine::H2D && len > 0 && st.corrupt_h2d > 0 {
            st.corrupt_h2d -= 1;
            // SAFETY: `d` was resolved above to live device memory of `len` ≥ 1 bytes.
            unsafe { *d = !*d };
        }

        let stats = &mut st.stats;
        stats.copies += 1;
        match engine {
            Engine::H2D => stats.h2d_bytes += len as u64,
            Engine::D2H => stats.d2h_bytes += len as u64,
            Engine::Compute if device.is_some() => stats.d2d_bytes += len as u64,
            Engine::Compute => stats.h2h_bytes += len as u64,
        }
        let Some(device) = device else {
            return Ok(()); // host to host: a CPU memcpy, outside the device clock
        };
        let dur = self.copy_ns(len, gbps);
        let host = st.host_ns;
        let ready = match stream {
            Some(sh) => ready_ns(&st, sh)?.max(host),
            // Ordered as cuMemcpy is: after the legacy stream's work and, by its rule,
            // the blocking streams' (not after the non-blocking ones').
            None => legacy_barrier(&st, device).max(host),
        };
        let eng = &mut st.engines[device];
        let timeline = match engine {
            Engine::H2D => &mut eng.h2d,
            Engine::D2H => &mut eng.d2h,
            Engine::Compute => &mut eng.compute,
        };
        let (_, end) = timeline.place(ready, dur, host);
        mark_busy(&mut st, dst, len, end);
        mark_busy(&mut st, src, len, end);
        match stream {
            // Pageable copies are staged by the driver through its own pinned buffer and
            // return only when done, so they block the host even on a stream.
            Some(sh) => {
                stream_mut(&mut st, sh)?.tail_ns = end;
                if pageable {
                    st.host_ns = end;
                }
            }
            None => st.host_ns = end,
        }
        Ok(())
    }

    unsafe fn prefetch(
        &self,
        ptr: NonNull<u8>,
        len: usize,
        to: Location,
        stream: StreamHandle,
    ) -> Result<()> {
        let mut st = self.lock();
        let p = ptr.as_ptr() as usize;
        if let Location::Device(d) = to {
            check_device(self, d)?;
        }
        let from = match find_managed(&st, p, len) {
            Some(m) => m.state.location,
            None => {
                return Err(Error::InvalidArgument(format!(
                    "{p:#x}+{len} is not inside a managed allocation"
                )))
            }
        };
        let moved = if from == to { 0 } else { len };
        let gbps = match to {
            Location::Device(_) => self.cfg.h2d_gbps,
            Location::Host => self.cfg.d2h_gbps,
        };
        let dur = self.copy_ns(moved, gbps);
        let host = st.host_ns;
        let stream = resolve_stream(&mut st, stream);
        let sdev = stream_ref(&st, stream)?.device;
        let ready = ready_ns(&st, stream)?.max(host);
        // A migration is a copy: it occupies the copy engine of its direction.
        let eng = &mut st.engines[sdev];
        let timeline = match to {
            Location::Device(_) => &mut eng.h2d,
            Location::Host => &mut eng.d2h,
        };
        let (_, end) = timeline.place(ready, dur, host);
        stream_mut(&mut st, stream)?.tail_ns = end;
        st.stats.prefetch_bytes += moved as u64;
        let key = *st.managed.range(..=p).next_back().expect("found above").0;
        st.managed
            .get_mut(&key)
            .expect("found above")
            .state
            .location = to;
        Ok(())
    }

    unsafe fn advise(&self, ptr: NonNull<u8>, len: usize, advice: Advice) -> Result<()> {
        let p = ptr.as_ptr() as usize;
        let check = |l: Location| match l {
            Location::Device(d) => check_device(self, d),
            Location::Host => Ok(()),
        };
        match advice {
            Advice::SetPreferredLocation(l) => check(l)?,
            Advice::SetAccessedBy(d) | Advice::UnsetAccessedBy(d) => check_device(self, d)?,
            _ => {}
        }
        let mut st = self.lock();
        if find_managed(&st, p, len).is_none() {
            return Err(Error::InvalidArgument(format!(
                "{p:#x}+{len} is not inside a managed allocation"
            )));
        }
        let key = *st.managed.range(..=p).next_back().expect("found above").0;
        let s = &mut st.managed.get_mut(&key).expect("found above").state;
        match advice {
            Advice::SetReadMostly => s.read_mostly = true,
            Advice::UnsetReadMostly => s.read_mostly = false,
            Advice::SetPreferredLocation(l) => s.preferred = Some(l),
            Advice::UnsetPreferredLocation => s.preferred = None,
            Advice::SetAccessedBy(d) => {
                if !s.accessed_by.contains(&d) {
                    s.accessed_by.push(d);
                }
            }
            Advice::UnsetAccessedBy(d) => s.accessed_by.retain(|x| *x != d),
        }
        Ok(())
    }

    fn vmm_granularity(&self, device: usize) -> Option<usize> {
        check_device(self, device).ok().map(|()| VMM_GRANULARITY)
    }

    fn reserve_address(&self, device: usize, size: usize) -> Result<DevicePtr> {
        check_device(self, device)?;
        check_vmm_size("reservation", size, VMM_GRANULARITY)?;
        // Untouched pages cost only address space, so reservations can be large.
        let host =
            Memory::zeroed(size).ok_or_else(|| Error::os("mmap", nix::errno::Errno::last()))?;
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::Reserve, size);
        let Some(addr) = place(&mut st, device, size, VMM_GRANULARITY as u64) else {
            // `host` is unmapped as it drops here.
            return Err(out_of_addresses(device, size));
        };
        st.reservations.insert(
            addr,
            Reservation {
                device,
                size,
                host,
                mapped: BTreeMap::new(),
            },
        );
        Ok(DevicePtr(addr))
    }

    unsafe fn free_address(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        let mut st = self.lock();
        refuse_during_capture(&mut st, "free_address")?;
        match st.reservations.get(&ptr.0) {
            Some(r) if r.device == device && r.size == size && r.mapped.is_empty() => {
                charge(&self.cfg, &mut st, DriverCall::AddressFree, size);
                // Dropping the reservation unmaps its host memory.
                st.reservations.remove(&ptr.0);
                Ok(())
            }
            Some(r) if !r.mapped.is_empty() => Err(Error::InvalidArgument(format!(
                "reservation {:#x} still has {} mapping(s)",
                ptr.0,
                r.mapped.len()
            ))),
            _ => Err(Error::InvalidArgument(format!(
                "{:#x}+{size} is not a reservation of sim device {device}",
                ptr.0
            ))),
        }
    }

    fn create_physical(&self, device: usize, size: usize) -> Result<PhysHandle> {
        check_device(self, device)?;
        check_vmm_size("physical allocation", size, VMM_GRANULARITY)?;
        self.used[device]
            .try_reserve(size)
            .map_err(|free| Error::oom(Tier::Device(device), size, free))?;
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::Create, size);
        let h = st.next_handle;
        st.next_handle += 1;
        st.physical.insert(
            h,
            Physical {
                device,
                size,
                mapped_at: None,
            },
        );
        Ok(PhysHandle(h))
    }

    unsafe fn release_physical(&self, device: usize, handle: PhysHandle) -> Result<()> {
        let mut st = self.lock();
        refuse_during_capture(&mut st, "release_physical")?;
        match st.physical.get(&handle.0) {
            Some(p) if p.device == device && p.mapped_at.is_none() => {
                let size = p.size;
                charge(&self.cfg, &mut st, DriverCall::Release, size);
                st.physical.remove(&handle.0);
                drop(st);
                self.used[device].release(size);
                Ok(())
            }
            Some(p) if p.mapped_at.is_some() => Err(Error::InvalidArgument(format!(
                "physical handle {} is still mapped",
                handle.0
            ))),
            _ => Err(Error::InvalidArgument(format!(
                "physical handle {} is not live on sim device {device}",
                handle.0
            ))),
        }
    }

    unsafe fn map(
        &self,
        device: usize,
        ptr: DevicePtr,
        size: usize,
        handle: PhysHandle,
    ) -> Result<()> {
        let mut st = self.lock();
        let phys_ok = matches!(st.physical.get(&handle.0),
            Some(p) if p.device == device && p.size == size && p.mapped_at.is_none());
        if !phys_ok {
            return Err(Error::InvalidArgument(format!(
                "physical handle {} is not a free {size}-byte handle of sim device {device}",
                handle.0
            )));
        }
        let Some((&start, r)) = st.reservations.range_mut(..=ptr.0).next_back() else {
            return Err(bad_device_ptr(device, ptr));
        };
        let off = (ptr.0 - start) as usize;
        let overlaps = r
            .mapped
            .range(..off + size)
            .next_back()
            .is_some_and(|(o, m)| o + m.size > off);
        if r.device != device
            || off + size > r.size
            || !off.is_multiple_of(VMM_GRANULARITY)
            || overlaps
        {
            return Err(Error::InvalidArgument(format!(
                "cannot map {size} bytes at {:#x}: outside a reservation, unaligned or already mapped",
                ptr.0
            )));
        }
        r.mapped.insert(
            off,
            Mapping {
                size,
                handle: handle.0,
                access: false,
                busy_until: 0,
            },
        );
        charge(&self.cfg, &mut st, DriverCall::Map, size);
        st.physical
            .get_mut(&handle.0)
            .expect("checked above")
            .mapped_at = Some(ptr.0);
        Ok(())
    }

    unsafe fn unmap(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        let mut st = self.lock();
        refuse_during_capture(&mut st, "unmap")?;
        let host = st.host_ns;
        let Some((&start, r)) = st.reservations.range_mut(..=ptr.0).next_back() else {
            return Err(bad_device_ptr(device, ptr));
        };
        let off = (ptr.0 - start) as usize;
        match r.mapped.get(&off) {
            Some(m) if m.size == size && r.device == device && m.busy_until > host => {
                Err(Error::Driver {
                    backend: BackendKind::Sim,
                    call: "unmap",
                    code: 700,
                    message: format!(
                        "{:#x}+{size} is still used by work queued until {} ns (now {host} ns): \
                         on a GPU that work would fault",
                        ptr.0, m.busy_until
                    ),
                })
            }
            Some(&Mapping {
                size: len,
                handle: h,
                ..
            }) if len == size && r.device == device => {
                r.mapped.remove(&off);
                // Give the host pages back: a later map of this range reads zeros, as
                // fresh physical memory would (CUDA does not promise zeros; we do).
                // SAFETY: the range lies inside the reservation's own host mapping.
                unsafe {
                    libc::madvise(
                        r.host.ptr.as_ptr().add(off).cast(),
                        size,
                        libc::MADV_DONTNEED,
                    )
                };
                st.physical
                    .get_mut(&h)
                    .expect("mapped handles are live")
                    .mapped_at = None;
                charge(&self.cfg, &mut st, DriverCall::Unmap, size);
                Ok(())
            }
            _ => Err(Error::InvalidArgument(format!(
                "{:#x}+{size} is not one mapping on sim device {device}",
                ptr.0
            ))),
        }
    }

    unsafe fn set_access(
        &self,
        device: usize,
        ptr: DevicePtr,
        size: usize,
        devices: &[usize],
    ) -> Result<()> {
        for d in devices {
            check_device(self, *d)?;
        }
        let mut st = self.lock();
        let Some((&start, r)) = st.reservations.range_mut(..=ptr.0).next_back() else {
            return Err(bad_device_ptr(device, ptr));
        };
        let off = (ptr.0 - start) as usize;
        // As cuMemSetAccess: the range is fully mapped and covers whole mappings.
        let whole = r.mapped.contains_key(&off)
            && off.checked_add(size).is_some_and(|end| {
                end <= r.size
                    && r.covered(off, size, false)
                    && r.mapped
                        .range(..end)
                        .next_back()
                        .is_some_and(|(o, m)| o + m.size == end)
            });
        if r.device != device || size == 0 || !whole || !devices.contains(&device) {
            return Err(Error::InvalidArgument(format!(
                "cannot set access on {size} bytes at {:#x} of sim device {device} for devices \
                 {devices:?}: not whole mappings of a reservation of it, or the owner left out",
                ptr.0
            )));
        }
        for m in r.touched(off, size) {
            m.access = true;
        }
        charge(&self.cfg, &mut st, DriverCall::SetAccess, size);
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Moves the host's clock to when every stream of `device` has finished its queued work.
fn wait_device(st: &mut State, device: usize) {
    let tail = st
        .streams
        .values()
        .filter(|s| s.device == device)
        .map(|s| s.tail_ns)
        .max()
        .unwrap_or(0);
    st.host_ns = st.host_ns.max(tail);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    H2D,
    D2H,
    Compute,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulator whose driver calls cost nothing: for tests of the copy and kernel
    /// clock alone.
    fn clock_only(cfg: SimConfig) -> SimBackend {
        SimBackend::new(SimConfig {
            driver: DriverCosts::zero(),
            ..cfg
        })
        .unwrap()
    }

    /// Handle 2 is the calling thread's own stream: the same handle on two threads names
    /// two streams with two clocks.
    #[test]
    fn the_per_thread_stream_is_the_calling_threads() {
        let sim = clock_only(SimConfig::with_devices(1, 1 << 30));
        // SAFETY: 2 is the per-thread stream, which every thread has.
        let s = unsafe { sim.import_stream(0, PER_THREAD_STREAM).unwrap() };
        assert!(s.0 >= SPECIAL_STREAMS, "a token, not the raw value");
        let k = sim.launch_kernel(s, Duration::from_millis(5)).unwrap();
        assert_eq!(sim.stream_time_ns(s).unwrap(), k.end_ns);
        let e = sim.create_event(0).unwrap();
        std::thread::scope(|t| {
            t.spawn(|| {
                assert_eq!(
                    sim.stream_time_ns(s).unwrap(),
                    0,
                    "another thread's per-thread stream has nothing queued"
                );
                // SAFETY: live handles of this backend.
                unsafe { sim.record_event(e, s).unwrap() };
                assert_eq!(sim.event_time_ns(e).unwrap(), Some(0));
                // Synchronising it waits for this thread's stream only.
                // SAFETY: as above.
                unsafe { sim.synchronize_stream(s).unwrap() };
                assert!(sim.host_time_ns() < k.end_ns);
            });
        });
        // SAFETY: as above.
        unsafe { sim.record_event(e, s).unwrap() };
        assert_eq!(sim.event_time_ns(e).unwrap(), Some(k.end_ns));
        // No sim handle is ever one of the drivers' special values.
        let made = sim.create_stream(0).unwrap();
        assert!(made.0 >= SPECIAL_STREAMS);
        sim.synchronize_device(0).unwrap();
        assert_eq!(
            sim.host_time_ns(),
            k.end_ns,
            "the device waits for every thread"
        );
    }

    /// The legacy stream (0 and 1) follows the blocking (per-thread) streams and they
    /// follow it; non-blocking streams take no part; a copy with no stream is ordered
    /// as `cuMemcpy`, after the legacy stream and the blocking streams.
    #[test]
    fn the_legacy_stream_orders_blocking_streams_only() {
        let sim = clock_only(SimConfig::with_devices(1, 1 << 30));
        // SAFETY: special values every device has.
        let (legacy, legacy1, per_thread) = unsafe {
            (
                sim.import_stream(0, 0).unwrap(),
                sim.import_stream(0, LEGACY_STREAM).unwrap(),
                sim.import_stream(0, PER_THREAD_STREAM).unwrap(),
            )
        };
        assert_eq!(legacy, legacy1, "0 and 1 are one stream");
        let other = sim.create_stream(0).unwrap();
        let e = sim.create_event(0).unwrap();
        let ms = Duration::from_millis(1);
        let k = sim.launch_kernel(per_thread, ms).unwrap();
        let n = sim.launch_kernel(other, 4 * ms).unwrap();
        assert!(n.end_ns > k.end_ns);
        // SAFETY: live handles of this backend.
        unsafe { sim.record_event(e, legacy).unwrap() };
        assert_eq!(
            sim.event_time_ns(e).unwrap(),
            Some(k.end_ns),
            "after the blocking stream's kernel, not the non-blocking one's"
        );
        let l = sim.launch_kernel(legacy, ms).unwrap();
        assert!(l.start_ns >= k.end_ns);
        // SAFETY: as above.
        unsafe { sim.record_event(e, per_thread).unwrap() };
        assert_eq!(
            sim.event_time_ns(e).unwrap(),
            Some(l.end_ns),
            "the blocking stream follows the legacy one"
        );
        // SAFETY: as above.
        unsafe { sim.record_event(e, other).unwrap() };
        assert_eq!(sim.event_time_ns(e).unwrap(), Some(n.end_ns));
        // A synchronous copy starts after the legacy stream's kernel.
        let dev = sim.alloc_device(0, 4096).unwrap();
        let mut host = vec![0u8; 4096];
        let h = MemRef::Host {
            ptr: NonNull::new(host.as_mut_ptr()).unwrap(),
            kind: HostKind::Pageable,
        };
        let d = MemRef::Device {
            device: 0,
            ptr: dev,
        };
        // SAFETY: live buffers of 4096 bytes.
        unsafe { sim.copy(h, d, 4096, None).unwrap() };
        assert!(
            sim.host_time_ns() > l.end_ns,
            "the copy ran after the legacy stream's kernel"
        );
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("123"), Some(123));
        assert_eq!(parse_bytes("64K"), Some(64 << 10));
        assert_eq!(parse_bytes(" 2g "), Some(2 << 30));
        assert_eq!(parse_bytes("1T"), Some(1 << 40));
        assert_eq!(parse_bytes("x"), None);
        assert_eq!(parse_bytes(""), None);
        assert_eq!(parse_bytes("99999999999999999999T"), None);
    }

    #[test]
    fn copy_time_follows_bandwidth_and_engines_overlap() {
        let sim = clock_only(SimConfig::with_devices(1, 1 << 30));
        let lat = sim.config().copy_latency.as_nanos() as u64;
        let mut host = vec![7u8; 1 << 20];
        let hp = NonNull::new(host.as_mut_ptr()).unwrap();
        // SAFETY: `host` outlives the registration, which is undone below.
        unsafe { sim.register_host(hp, host.len()).unwrap() };
        let dev = sim.alloc_device(0, 1 << 20).unwrap();
        let (a, b) = (sim.create_stream(0).unwrap(), sim.create_stream(0).unwrap());
        let h = MemRef::Host {
            ptr: hp,
            kind: HostKind::Pinned,
        };
        let d = MemRef::Device {
            device: 0,
            ptr: dev,
        };
        // SAFETY: live handles and buffers of 1 MiB each.
        unsafe {
            sim.copy(d, h, 1 << 20, Some(a)).unwrap();
            sim.copy(h, d, 1 << 20, Some(b)).unwrap();
        }
        let one = lat + ((1u64 << 20) as f64 / 55.3).ceil() as u64;
        // Two directions use two engines: both end after one copy's time.
        assert_eq!(sim.stream_time_ns(a).unwrap(), one);
        assert_eq!(sim.stream_time_ns(b).unwrap(), one);
        // A second H2D on another stream queues behind the first on the engine.
        // SAFETY: as above.
        unsafe { sim.copy(d, h, 1 << 20, Some(b)).unwrap() };
        assert_eq!(sim.stream_time_ns(b).unwrap(), 2 * one);
        assert_eq!(
            sim.host_time_ns(),
            0,
            "pinned async copies do not block the host"
        );
        // SAFETY: registered above; no work is pending in the virtual sense that matters.
        unsafe {
            sim.synchronize_stream(b).unwrap();
            sim.unregister_host(hp, host.len()).unwrap();
        }
        assert_eq!(sim.host_time_ns(), 2 * one);
        // Pageable now: slower, and blocks the host.
        // SAFETY: as above.
        unsafe { sim.copy(d, h, 1 << 20, Some(a)).unwrap() };
        let pageable = lat + ((1u64 << 20) as f64 / 8.0).ceil() as u64;
        assert_eq!(sim.host_time_ns(), 2 * one + pageable);
        assert_eq!(sim.stats().h2d_bytes, 3 << 20);
    }

    /// Back-to-back work leaves one span, however long the host runs ahead; gaps are
    /// still found and filled, and filling one joins its neighbours.
    #[test]
    fn timelines_stay_short_and_keep_their_gaps() {
        let mut t = Timeline::default();
        for i in 0..10_000 {
            assert_eq!(t.place(0, 10, 0), (i * 10, i * 10 + 10));
        }
        assert_eq!(t.busy, vec![(0, 100_000)]);
        assert_eq!(t.place(200_000, 10, 0), (200_000, 200_010));
        assert_eq!(t.place(100_000, 50, 0), (100_000, 100_050), "fills the gap");
        assert_eq!(t.busy.len(), 2, "joined to the span before it");
        assert_eq!(
            t.place(0, 99_950, 0),
            (100_050, 200_000),
            "exactly fills the rest"
        );
        assert_eq!(t.busy, vec![(0, 200_010)]);
        assert_eq!(t.place(300_000, 10, 300_000), (300_000, 300_010));
        assert_eq!(
            t.busy,
            vec![(300_000, 300_010)],
            "the floor forgets the past"
        );
    }

    #[test]
    fn engines_fill_gaps_left_by_waiting_work() {
        let sim = clock_only(SimConfig::with_devices(1, 1 << 30));
        let mut host = vec![1u8; 1 << 20];
        let h = MemRef::Host {
            ptr: NonNull::new(host.as_mut_ptr()).unwrap(),
            kind: HostKind::Pinned,
        };
        // SAFETY: `host` outlives the registration, undone at the end.
        unsafe {
            sim.register_host(NonNull::new(host.as_mut_ptr()).unwrap(), 1 << 20)
                .unwrap()
        };
        let dev = sim.alloc_device(0, 1 << 20).unwrap();
        let d = MemRef::Device {
            device: 0,
            ptr: dev,
        };
        let (a, b) = (sim.create_stream(0).unwrap(), sim.create_stream(0).unwrap());
        // a: a 10 ms kernel, then a copy that must wait for it.
        sim.launch_kernel(a, Duration::from_millis(10)).unwrap();
        // SAFETY: live handles and 1 MiB buffers.
        unsafe { sim.copy(d, h, 1 << 20, Some(a)).unwrap() };
        assert!(sim.stream_time_ns(a).unwrap() > 10_000_000);
        // b is idle: its copy runs now, in the gap before a's copy, not after it.
        // SAFETY: as above.
        unsafe { sim.copy(d, h, 1 << 20, Some(b)).unwrap() };
        let one = sim.copy_ns(1 << 20, 55.3);
        assert_eq!(sim.stream_time_ns(b).unwrap(), one);
        // A prefetch to the device occupies the same engine: it waits for b's copy.
        let m = sim.alloc_managed(0, 1 << 20).unwrap();
        // SAFETY: live managed allocation and stream.
        unsafe { sim.prefetch(m, 1 << 20, Location::Device(0), b).unwrap() };
        assert_eq!(sim.stream_time_ns(b).unwrap(), 2 * one);
        // SAFETY: registered above; the managed buffer is ours.
        unsafe {
            sim.unregister_host(NonNull::new(host.as_mut_ptr()).unwrap(), 1 << 20)
                .unwrap();
            sim.free_managed(0, m, 1 << 20).unwrap();
        }
    }

    #[test]
    fn clock_and_addresses_never_overflow() {
        let sim = SimBackend::new(SimConfig::default()).unwrap();
        let s = sim.create_stream(0).unwrap();
        let k1 = sim.launch_kernel(s, Duration::MAX).unwrap();
        let k2 = sim.launch_kernel(s, Duration::MAX).unwrap();
        assert_eq!((k1.end_ns, k2.end_ns), (u64::MAX, u64::MAX));
        let slow = SimConfig {
            h2d_gbps: 1e-15,
            ..SimConfig::default()
        };
        assert!(SimBackend::new(slow).is_err());
        let many = SimConfig::with_devices(MAX_DEVICES + 1, 1 << 20);
        assert!(SimBackend::new(many).is_err());
        let huge = SimConfig::with_devices(1, MAX_CAPACITY + 1);
        assert!(SimBackend::new(huge).is_err());
        // The last device of the largest machine still gets usable addresses.
        let big = SimBackend::new(SimConfig::with_devices(MAX_DEVICES, 1 << 20)).unwrap();
        let p = big.alloc_device(MAX_DEVICES - 1, 4096).unwrap();
        // SAFETY: allocated just above; the first free is refused (wrong device).
        unsafe {
            assert!(big.free_device(0, p, 4096).is_err());
            big.free_device(MAX_DEVICES - 1, p, 4096).unwrap();
        }
        // A run is used up and the next one taken; too large a request is refused.
        let q = big.alloc_device(0, 4096).unwrap();
        assert!(take_run(MAX_RUN + 1).is_none());
        assert!(place(&mut big.lock(), 0, MAX_RUN as usize, DEVICE_ALIGN).is_none());
        let mut st = big.lock();
        st.addr[0].next = st.addr[0].end - 1024;
        drop(st);
        let r = big.alloc_device(0, 4096).unwrap();
        assert!(
            r.0 >= q.0 + ADDR_RUN - 1024 && r.0.is_multiple_of(ADDR_RUN),
            "{r:?} after {q:?}"
        );
        // SAFETY: both allocated just above.
        unsafe {
            big.free_device(0, q, 4096).unwrap();
            big.free_device(0, r, 4096).unwrap();
        }
    }

    #[test]
    fn stale_and_foreign_device_pointers_are_errors() {
        let sim = SimBackend::new(SimConfig::with_devices(2, 1 << 20)).unwrap();
        let p = sim.alloc_device(0, 4096).unwrap();
        // SAFETY: every call here is on handles the test controls; the backend validates them.
        unsafe {
            assert!(sim.free_device(1, p, 4096).is_err(), "wrong device");
            assert!(sim.free_device(0, p, 100).is_err(), "wrong size");
            sim.free_device(0, p, 4096).unwrap();
            assert!(sim.free_device(0, p, 4096).is_err(), "double free");
        }
        let mut buf = [0u8; 16];
        let h = MemRef::Host {
            ptr: NonNull::new(buf.as_mut_ptr()).unwrap(),
            kind: HostKind::Pageable,
        };
        // SAFETY: the device side is stale; the backend must refuse before copying.
        let r = unsafe { sim.copy(h, MemRef::Device { device: 0, ptr: p }, 16, None) };
        assert!(r.is_err());
    }

    /// Two simulators in one process (two managers) never share a device address, so a
    /// pointer of one is refused by the other, whose memory is left alone: as strict as
    /// a GPU driver, where another context's pointer is not a live allocation.
    #[test]
    fn simulators_and_their_devices_never_share_an_address() {
        let (a, b) = (
            SimBackend::new(SimConfig::with_devices(2, 1 << 20)).unwrap(),
            SimBackend::new(SimConfig::with_devices(2, 1 << 20)).unwrap(),
        );
        let pa: Vec<DevicePtr> = (0..2).map(|d| a.alloc_device(d, 4096).unwrap()).collect();
        let pb: Vec<DevicePtr> = (0..2).map(|d| b.alloc_device(d, 4096).unwrap()).collect();
        let ra = a.reserve_address(0, VMM_GRANULARITY).unwrap();
        let rb = b.reserve_address(0, VMM_GRANULARITY).unwrap();
        let mut all: Vec<u64> = pa
            .iter()
            .chain(&pb)
            .chain([&ra, &rb])
            .map(|p| p.0)
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(
            all.len(),
            6,
            "addresses shared: {pa:?} {pb:?} {ra:?} {rb:?}"
        );
        let mut bytes = [7u8; 16];
        let host = MemRef::Host {
            ptr: NonNull::new(bytes.as_mut_ptr()).unwrap(),
            kind: HostKind::Pageable,
        };
        // SAFETY: every device pointer is checked by the backend before it is used; the
        // host range is this test's 16 bytes.
        unsafe {
            a.copy(
                MemRef::Device {
                    device: 0,
                    ptr: pa[0],
                },
                host,
                16,
                None,
            )
            .unwrap();
            for (d, &ptr) in pb.iter().enumerate() {
                let theirs = MemRef::Device { device: d, ptr };
                assert!(
                    a.copy(theirs, host, 16, None).is_err(),
                    "a writes b's memory"
                );
                assert!(
                    a.copy(host, theirs, 16, None).is_err(),
                    "a reads b's memory"
                );
                assert!(a.free_device(d, ptr, 4096).is_err(), "a frees b's memory");
            }
            assert!(a.free_address(0, rb, VMM_GRANULARITY).is_err());
            let mut back = [0u8; 16];
            let out = MemRef::Host {
                ptr: NonNull::new(back.as_mut_ptr()).unwrap(),
                kind: HostKind::Pageable,
            };
            a.copy(
                out,
                MemRef::Device {
                    device: 0,
                    ptr: pa[0],
                },
                16,
                None,
            )
            .unwrap();
            assert_eq!(back, [7u8; 16], "a's bytes are untouched");
            for d in 0..2 {
                a.free_device(d, pa[d], 4096).unwrap();
                b.free_device(d, pb[d], 4096).unwrap();
            }
            a.free_address(0, ra, VMM_GRANULARITY).unwrap();
            b.free_address(0, rb, VMM_GRANULARITY).unwrap();
        }
    }

    #[test]
    fn kernels_and_events_order_streams() {
        let sim = clock_only(SimConfig::default());
        let (a, b) = (sim.create_stream(0).unwrap(), sim.create_stream(0).unwrap());
        let k = sim.launch_kernel(a, Duration::from_micros(100)).unwrap();
        assert_eq!(
            k,
            Span {
                start_ns: 0,
                end_ns: 100_000
            }
        );
        let e = sim.create_event(0).unwrap();
        // SAFETY: live handles.
        unsafe {
            sim.record_event(e, a).unwrap();
            assert!(!sim.event_done(e).unwrap());
            sim.stream_wait_event(b, e).unwrap();
        }
        // The compute engine is busy until 100 µs, and b waited for a anyway.
        let k2 = sim.launch_kernel(b, Duration::from_micros(10)).unwrap();
        assert_eq!(k2.start_ns, 100_000);
        // SAFETY: live handle.
        unsafe { sim.synchronize_event(e).unwrap() };
        assert_eq!(sim.host_time_ns(), 100_000);
        // SAFETY: live handle.
        assert!(unsafe { sim.event_done(e).unwrap() });
    }

    /// Driver calls block the host for their cost and are counted; freeing waits for
    /// the device; mapped memory is unusable until access is set; an unmap under a
    /// queued copy is refused, and allowed once the copy is done.
    #[test]
    fn driver_calls_cost_host_time_and_vmm_is_as_strict_as_the_driver() {
        let sim = SimBackend::new(SimConfig::with_devices(2, 1 << 30)).unwrap();
        let costs = sim.config().driver.clone();
        let p = sim.alloc_device(0, 4096).unwrap();
        assert_eq!(sim.host_time_ns(), costs.ns(DriverCall::MemAlloc, 4096));
        let s = sim.create_stream(0).unwrap();
        let k = sim.launch_kernel(s, Duration::from_millis(5)).unwrap();
        let before = sim.host_time_ns();
        // SAFETY: allocated above; the sim waits for the kernel (the contract's part).
        unsafe { sim.free_device(0, p, 4096).unwrap() };
        assert_eq!(
            sim.host_time_ns(),
            k.end_ns.max(before) + costs.ns(DriverCall::MemFree, 4096),
            "cuMemFree waits for the device, then costs its time"
        );

        let page = VMM_GRANULARITY;
        let base = sim.reserve_address(0, 4 * page).unwrap();
        let (a, b) = (
            sim.create_physical(0, page).unwrap(),
            sim.create_physical(0, page).unwrap(),
        );
        let mut buf = vec![3u8; page];
        let h = MemRef::Host {
            ptr: NonNull::new(buf.as_mut_ptr()).unwrap(),
            kind: HostKind::Pageable,
        };
        let d = |off: usize| MemRef::Device {
            device: 0,
            ptr: base.offset(off),
        };
        let t0 = sim.host_time_ns();
        // SAFETY: the pages lie in our reservation, the handles are fresh; every misuse
        // below is refused by the sim before it touches memory.
        unsafe {
            sim.map(0, base, page, a).unwrap();
            sim.map(0, base.offset(page), page, b).unwrap();
            assert!(
                sim.copy(d(0), h, 64, None).is_err(),
                "no access set: a device access would fault"
            );
            assert!(
                sim.set_access(0, base, page + page / 2, &[0]).is_err(),
                "half a mapping"
            );
            assert!(
                sim.set_access(0, base, 2 * page, &[1]).is_err(),
                "owner left out"
            );
            sim.set_access(0, base, 2 * page, &[0, 1]).unwrap();
            sim.copy(d(page - 32), h, 64, None).unwrap();
        }
        let st = sim.stats().driver;
        assert_eq!(
            (st.calls(DriverCall::Map), st.calls(DriverCall::SetAccess)),
            (2, 1),
            "one set-access for two mappings"
        );
        assert!(sim.host_time_ns() - t0 >= 2 * costs.ns(DriverCall::Map, page));
        // A queued copy into page b: its unmap is refused until the copy is done.
        let s2 = sim.create_stream(0).unwrap();
        let reg = NonNull::new(buf.as_mut_ptr()).unwrap();
        // SAFETY: `buf` outlives its registration; the copy lies in mapped pages.
        unsafe {
            sim.register_host(reg, page).unwrap();
            let pinned = MemRef::Host {
                ptr: reg,
                kind: HostKind::Pinned,
            };
            sim.launch_kernel(s2, Duration::from_millis(1)).unwrap();
            sim.copy(d(page), pinned, page, Some(s2)).unwrap();
            let e = sim.unmap(0, base.offset(page), page).unwrap_err();
            assert!(e.to_string().contains("still used"), "{e}");
            sim.unmap(0, base, page).unwrap();
            sim.synchronize_stream(s2).unwrap();
            sim.unmap(0, base.offset(page), page).unwrap();
            sim.unregister_host(reg, page).unwrap();
            sim.release_physical(0, a).unwrap();
            sim.release_physical(0, b).unwrap();
            sim.free_address(0, base, 4 * page).unwrap();
        }
        let st = sim.stats().driver;
        for (call, n) in [
            (DriverCall::Create, 2),
            (DriverCall::Release, 2),
            (DriverCall::Unmap, 2),
            (DriverCall::Reserve, 1),
            (DriverCall::AddressFree, 1),
            (DriverCall::MemAlloc, 1),
            (DriverCall::MemFree, 1),
        ] {
            assert_eq!(st.calls(call), n, "{call}");
        }
        let (_, ns) = st.total();
        assert!(
            ns <= sim.host_time_ns(),
            "every charged ns is on the host's clock"
        );
    }
}
