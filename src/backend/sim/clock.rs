//! The virtual clock: when each engine of a device is busy ([`Timeline`], one per copy
//! direction and one for compute), and what driver calls cost the host.

use super::{DriverCall, SimConfig, State};

/// The span of virtual time one piece of work occupied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Start, in virtual nanoseconds.
    pub start_ns: u64,
    /// End, in virtual nanoseconds.
    pub end_ns: u64,
}

/// When one engine is busy: non-overlapping spans sorted by start. Work is placed in
/// the first gap at or after the time it becomes ready, as hardware runs whatever is
/// runnable: a copy queued later on an idle stream does not wait behind one that is
/// itself waiting on an event.
#[derive(Debug, Default, Clone)]
pub(super) struct Timeline {
    pub(super) busy: Vec<(u64, u64)>,
}

impl Timeline {
    /// Books `dur` ns at the earliest time ≥ `ready`; spans ending before `floor` (the
    /// host's time: nothing can be queued before it any more) are forgotten first.
    ///
    /// Spans are sorted by start and do not overlap, so their ends are sorted too: the
    /// spans that end by `ready` cannot delay the work and the search starts after them,
    /// and spans that touch are merged, so a busy engine's history stays short even
    /// when the host never waits (and `floor` never moves).
    pub(super) fn place(&mut self, ready: u64, dur: u64, floor: u64) -> (u64, u64) {
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
pub(super) struct Engines {
    pub(super) h2d: Timeline,
    pub(super) d2h: Timeline,
    pub(super) compute: Timeline,
}

/// Advances the host's clock by what `call` costs and counts it.
pub(super) fn charge(cfg: &SimConfig, st: &mut State, call: DriverCall, bytes: usize) {
    let ns = cfg.driver.ns(call, bytes);
    st.host_ns = st.host_ns.saturating_add(ns);
    st.stats.driver.add(call, ns);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Engine {
    H2D,
    D2H,
    Compute,
}
