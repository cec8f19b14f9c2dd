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
//!
//! Files: `mod.rs` the backend, its state and its own calls (kernels, capture, fault
//! injection); `config.rs` the machine; `clock.rs` the engines' timelines; `memory.rs`
//! allocations, reservations and addresses; `streams.rs` streams, events and capture
//! rules; `driver.rs` what each driver call costs; `backend.rs` the
//! [`Backend`](crate::backend::Backend) implementation.

mod backend;
mod clock;
mod config;
pub mod driver;
mod memory;
mod streams;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::time::Duration;

pub use self::clock::Span;
pub use self::config::{SimConfig, SimDevice, H200_MEMORY, MAX_CAPACITY, MAX_DEVICES};
pub use self::driver::{CallCost, DriverCall, DriverCosts, DriverStats};
pub use self::memory::VMM_GRANULARITY;
pub use self::streams::{
    CAPTURED_EVENT, CAPTURE_INVALIDATED, CAPTURE_ISOLATION, CAPTURE_MERGE, CAPTURE_UNMATCHED,
    CAPTURE_UNSUPPORTED,
};

use self::clock::Engines;
use self::memory::{find_managed, AddrRun, DeviceAlloc, ManagedAlloc, Physical, Reservation};
use self::streams::{
    event_ref, ready_ns, resolve_stream, stream_mut, stream_ref, Capture, EventState, StreamState,
};
use crate::backend::{BackendKind, DeviceInfo, EventHandle, StreamHandle, SPECIAL_STREAMS};
use crate::error::{Error, Result};
use crate::placement::Location;
use crate::stats::ByteCounter;

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
}
