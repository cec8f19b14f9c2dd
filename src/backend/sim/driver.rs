//! What driver calls cost on the simulator's clock, and how many were made.
//!
//! A real driver call blocks the calling thread: `cuMemCreate` of a 2 MiB page has been
//! timed at 7.6–193 µs, `cuMemSetAccess` at 21–36 µs (DESIGN.md, "Facts gathered in
//! December 2026"). A simulator that charged nothing for them would let a design that
//! lives in the driver look free. Every call here advances the host's virtual time by
//! `base + per_mib × MiB` of its kind, and is counted.
//!
//! The defaults take the higher figure of each published pair (until the H200 is
//! measured: `scripts/device-check.sh` times them). Where only 2 MiB was timed, the
//! per-MiB slope is the H200's own for the driver doing the same work inside
//! `cuMemAlloc` (60 ns per MiB from 4 KiB to 1 GiB: 47 → 107 µs) or `cuMemFree` (285 ns
//! per MiB above its base), each call charged the whole slope, so that a larger call
//! never costs less than the driver's own:
//!
//! | call | base | per MiB | source |
//! |---|---|---|---|
//! | `cuMemAlloc` | 100 µs | 7 ns | H200 cudaMalloc 31–100 µs; 107 µs at 1 GiB |
//! | `cuMemFree` | 304 µs | 285 ns | H200 cudaFree 27–304 µs; 596 µs at 1 GiB |
//! | `cuMemCreate` | 193 µs | 60 ns | kvcached, 2 MiB: A100 193 µs, the other GPU 7.6 µs |
//! | `cuMemRelease` | 304 µs | 285 ns | never timed: taken as cuMemFree |
//! | `cuMemMap` | 1.45 µs | 60 ns | kvcached, 2 MiB |
//! | `cuMemSetAccess` | 36 µs | 60 ns | kvcached, 2 MiB |
//! | `cuMemUnmap` | 25.6 µs | 285 ns | kvcached, 2 MiB |
//! | `cuMemAddressReserve` / `Free` | 19 µs | 0 | kvcached, 8 GiB; the free never timed |
//! | `cuMemHostRegister` | 0 | 100 µs | H200 cudaHostRegister 102 ms per GiB (220 ms for 4 GiB) |
//! | `cuMemHostUnregister` | 0 | 10 µs | never timed: a guess |
//! | event create / destroy / record | 2 µs | — | never timed: a guess |
//! | event query, stream wait | 1 µs | — | never timed: a guess |
//! | stream create / destroy | 5 µs | — | never timed: a guess |

use std::fmt;
use std::time::Duration;

/// The cost of one driver call: `base + per_mib × (bytes / MiB)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CallCost {
    /// Cost of every call, in nanoseconds.
    pub base_ns: u64,
    /// Added cost per MiB the call covers, in nanoseconds.
    pub per_mib_ns: u64,
}

impl CallCost {
    /// A cost of `base` per call plus `per_mib_ns` per MiB.
    pub fn new(base: Duration, per_mib_ns: u64) -> CallCost {
        CallCost {
            base_ns: u64::try_from(base.as_nanos()).unwrap_or(u64::MAX),
            per_mib_ns,
        }
    }

    /// What a call covering `bytes` costs, in nanoseconds (saturating).
    pub fn ns(&self, bytes: usize) -> u64 {
        let per = (self.per_mib_ns as u128 * bytes as u128) >> 20;
        self.base_ns
            .saturating_add(u64::try_from(per).unwrap_or(u64::MAX))
    }
}

/// The kinds of driver call the simulator charges and counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DriverCall {
    /// `cuMemAlloc` (and `cuMemAllocManaged`).
    MemAlloc,
    /// `cuMemFree` (of device or managed memory).
    MemFree,
    /// `cuMemCreate`: physical memory for virtual memory management.
    Create,
    /// `cuMemRelease`.
    Release,
    /// `cuMemMap`.
    Map,
    /// `cuMemSetAccess`.
    SetAccess,
    /// `cuMemUnmap`.
    Unmap,
    /// `cuMemAddressReserve`.
    Reserve,
    /// `cuMemAddressFree`.
    AddressFree,
    /// `cuMemHostRegister`.
    HostRegister,
    /// `cuMemHostUnregister`.
    HostUnregister,
    /// `cuEventCreate`.
    EventCreate,
    /// `cuEventDestroy`.
    EventDestroy,
    /// `cuEventRecord`.
    EventRecord,
    /// `cuEventQuery`.
    EventQuery,
    /// `cuStreamWaitEvent`.
    StreamWait,
    /// `cuStreamCreate`.
    StreamCreate,
    /// `cuStreamDestroy`.
    StreamDestroy,
}

impl DriverCall {
    /// Every kind, in the order [`DriverStats`] keeps them.
    pub const ALL: [DriverCall; 18] = [
        DriverCall::MemAlloc,
        DriverCall::MemFree,
        DriverCall::Create,
        DriverCall::Release,
        DriverCall::Map,
        DriverCall::SetAccess,
        DriverCall::Unmap,
        DriverCall::Reserve,
        DriverCall::AddressFree,
        DriverCall::HostRegister,
        DriverCall::HostUnregister,
        DriverCall::EventCreate,
        DriverCall::EventDestroy,
        DriverCall::EventRecord,
        DriverCall::EventQuery,
        DriverCall::StreamWait,
        DriverCall::StreamCreate,
        DriverCall::StreamDestroy,
    ];

    /// The snake_case name used in reports (`mem_alloc`, `set_access`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DriverCall::MemAlloc => "mem_alloc",
            DriverCall::MemFree => "mem_free",
            DriverCall::Create => "create",
            DriverCall::Release => "release",
            DriverCall::Map => "map",
            DriverCall::SetAccess => "set_access",
            DriverCall::Unmap => "unmap",
            DriverCall::Reserve => "reserve",
            DriverCall::AddressFree => "address_free",
            DriverCall::HostRegister => "host_register",
            DriverCall::HostUnregister => "host_unregister",
            DriverCall::EventCreate => "event_create",
            DriverCall::EventDestroy => "event_destroy",
            DriverCall::EventRecord => "event_record",
            DriverCall::EventQuery => "event_query",
            DriverCall::StreamWait => "stream_wait",
            DriverCall::StreamCreate => "stream_create",
            DriverCall::StreamDestroy => "stream_destroy",
        }
    }

    /// Whether the call allocates, frees or maps memory (as opposed to ordering work:
    /// events and streams).
    pub fn is_memory(self) -> bool {
        !matches!(
            self,
            DriverCall::EventCreate
                | DriverCall::EventDestroy
                | DriverCall::EventRecord
                | DriverCall::EventQuery
                | DriverCall::StreamWait
                | DriverCall::StreamCreate
                | DriverCall::StreamDestroy
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DriverCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What each kind of driver call costs on the simulated host. See the module docs for
/// where the defaults come from; [`DriverCosts::zero`] turns the model off (for tests
/// of the clock alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverCosts {
    costs: [CallCost; DriverCall::ALL.len()],
}

impl Default for DriverCosts {
    fn default() -> Self {
        let us = Duration::from_micros;
        let ns = Duration::from_nanos;
        let mut c = DriverCosts::zero();
        c.set(DriverCall::MemAlloc, CallCost::new(us(100), 7));
        c.set(DriverCall::MemFree, CallCost::new(us(304), 285));
        c.set(DriverCall::Create, CallCost::new(us(193), 60));
        c.set(DriverCall::Release, CallCost::new(us(304), 285));
        c.set(DriverCall::Map, CallCost::new(ns(1_450), 60));
        c.set(DriverCall::SetAccess, CallCost::new(us(36), 60));
        c.set(DriverCall::Unmap, CallCost::new(ns(25_600), 285));
        c.set(DriverCall::Reserve, CallCost::new(us(19), 0));
        c.set(DriverCall::AddressFree, CallCost::new(us(19), 0));
        c.set(DriverCall::HostRegister, CallCost::new(us(0), 100_000));
        c.set(DriverCall::HostUnregister, CallCost::new(us(0), 10_000));
        c.set(DriverCall::EventCreate, CallCost::new(us(2), 0));
        c.set(DriverCall::EventDestroy, CallCost::new(us(2), 0));
        c.set(DriverCall::EventRecord, CallCost::new(us(2), 0));
        c.set(DriverCall::EventQuery, CallCost::new(us(1), 0));
        c.set(DriverCall::StreamWait, CallCost::new(us(1), 0));
        c.set(DriverCall::StreamCreate, CallCost::new(us(5), 0));
        c.set(DriverCall::StreamDestroy, CallCost::new(us(5), 0));
        c
    }
}

impl DriverCosts {
    /// Every call free: the clock then measures copies and kernels alone.
    pub fn zero() -> DriverCosts {
        DriverCosts {
            costs: [CallCost::default(); DriverCall::ALL.len()],
        }
    }

    /// The cost of `call`.
    pub fn get(&self, call: DriverCall) -> CallCost {
        self.costs[call.index()]
    }

    /// Sets the cost of `call`.
    pub fn set(&mut self, call: DriverCall, cost: CallCost) -> &mut Self {
        self.costs[call.index()] = cost;
        self
    }

    /// Nanoseconds one `call` covering `bytes` costs.
    pub fn ns(&self, call: DriverCall, bytes: usize) -> u64 {
        self.get(call).ns(bytes)
    }
}

/// Driver calls made so far, and the virtual time they cost, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DriverStats {
    calls: [u64; DriverCall::ALL.len()],
    ns: [u64; DriverCall::ALL.len()],
}

impl DriverStats {
    pub(super) fn add(&mut self, call: DriverCall, ns: u64) {
        let i = call.index();
        self.calls[i] += 1;
        self.ns[i] = self.ns[i].saturating_add(ns);
    }

    /// Calls of one kind.
    pub fn calls(&self, call: DriverCall) -> u64 {
        self.calls[call.index()]
    }

    /// Virtual nanoseconds spent in calls of one kind.
    pub fn ns(&self, call: DriverCall) -> u64 {
        self.ns[call.index()]
    }

    /// Memory calls (allocation, freeing, mapping; not events or streams).
    pub fn memory_calls(&self) -> u64 {
        DriverCall::ALL
            .iter()
            .filter(|c| c.is_memory())
            .map(|c| self.calls(*c))
            .sum()
    }

    /// Virtual nanoseconds spent in memory calls.
    pub fn memory_ns(&self) -> u64 {
        DriverCall::ALL
            .iter()
            .filter(|c| c.is_memory())
            .map(|c| self.ns(*c))
            .sum()
    }

    /// Every call, and the time of every call.
    pub fn total(&self) -> (u64, u64) {
        (self.calls.iter().sum(), self.ns.iter().sum())
    }

    /// The calls made since `earlier` (a snapshot of the same backend).
    pub fn since(&self, earlier: &DriverStats) -> DriverStats {
        let mut d = *self;
        for i in 0..d.calls.len() {
            d.calls[i] -= earlier.calls[i].min(d.calls[i]);
            d.ns[i] -= earlier.ns[i].min(d.ns[i]);
        }
        d
    }

    /// (kind, calls, ns) for each kind with at least one call.
    pub fn by_kind(&self) -> impl Iterator<Item = (DriverCall, u64, u64)> + '_ {
        DriverCall::ALL
            .iter()
            .map(|c| (*c, self.calls(*c), self.ns(*c)))
            .filter(|(_, n, _)| *n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_grow_with_size_and_defaults_match_the_figures() {
        let c = DriverCosts::default();
        // The figures the defaults come from, within a nanosecond of rounding.
        assert_eq!(c.ns(DriverCall::Create, 2 << 20), 193_120);
        assert_eq!(c.ns(DriverCall::SetAccess, 2 << 20), 36_120);
        assert_eq!(c.ns(DriverCall::MemAlloc, 1 << 30), 107_168);
        assert_eq!(c.ns(DriverCall::MemFree, 1 << 30), 595_840);
        assert_eq!(c.ns(DriverCall::HostRegister, 1 << 30), 102_400_000);
        for call in DriverCall::ALL {
            assert!(c.ns(call, 20 << 20) >= c.ns(call, 2 << 20), "{call}");
        }
        assert_eq!(
            CallCost::new(Duration::MAX, u64::MAX).ns(usize::MAX),
            u64::MAX
        );
    }

    #[test]
    fn stats_count_by_kind_and_subtract() {
        let mut s = DriverStats::default();
        s.add(DriverCall::Map, 10);
        let snap = s;
        s.add(DriverCall::Map, 5);
        s.add(DriverCall::EventRecord, 1);
        assert_eq!(s.calls(DriverCall::Map), 2);
        assert_eq!((s.memory_calls(), s.memory_ns()), (2, 15));
        assert_eq!(s.total(), (3, 16));
        let d = s.since(&snap);
        assert_eq!((d.calls(DriverCall::Map), d.ns(DriverCall::Map)), (1, 5));
        let kinds: Vec<_> = d.by_kind().map(|(k, _, _)| k.name()).collect();
        assert_eq!(kinds, ["map", "event_record"]);
    }
}
