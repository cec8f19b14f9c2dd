//! Lock-free byte counters: current and peak use of a tier, with an optional limit that
//! concurrent reservations can never overshoot.
//!
//! Every allocation and free on every thread touches one of these, so they are plain
//! atomics rather than a lock. The loom models in `tests/loom.rs` check the two
//! properties callers rely on: the limit holds under any interleaving, and the peak is
//! the largest value `current` ever took.

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Current and peak bytes of one tier, and how many allocations are live.
#[derive(Debug)]
pub struct ByteCounter {
    current: AtomicUsize,
    peak: AtomicUsize,
    count: AtomicU64,
    limit: usize,
}

impl ByteCounter {
    /// A counter that refuses reservations beyond `limit` bytes in use.
    pub fn with_limit(limit: usize) -> Self {
        ByteCounter {
            current: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            count: AtomicU64::new(0),
            limit,
        }
    }

    /// A counter with no limit.
    pub fn unlimited() -> Self {
        Self::with_limit(usize::MAX)
    }

    /// Reserves `bytes` if that keeps use within the limit; otherwise returns the bytes
    /// that were free when it looked.
    pub fn try_reserve(&self, bytes: usize) -> Result<(), usize> {
        let mut cur = self.current.load(Ordering::Relaxed);
        loop {
            let Some(next) = cur.checked_add(bytes).filter(|n| *n <= self.limit) else {
                return Err(self.limit.saturating_sub(cur));
            };
            // AcqRel pairs each reservation with the releases before it, so a thread
            // that saw room really had it.
            match self
                .current
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.count.fetch_add(1, Ordering::Relaxed);
                    self.peak.fetch_max(next, Ordering::Relaxed);
                    return Ok(());
                }
                Err(seen) => cur = seen,
            }
        }
    }

    /// Gives back `bytes` reserved earlier.
    ///
    /// Runs in drops, so it never panics: releasing more than is reserved is a bug that
    /// is logged, and the counter stops at zero instead of wrapping.
    pub fn release(&self, bytes: usize) {
        let prev = self
            .current
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                Some(c.saturating_sub(bytes))
            })
            .unwrap_or_else(|c| c);
        if prev < bytes {
            tracing::error!(target: "hetmem", bytes, in_use = prev, "released more than was reserved");
        }
        self.count.fetch_sub(1, Ordering::Relaxed);
    }

    /// Bytes in use now.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }

    /// The most bytes in use at once since creation or the last [`ByteCounter::reset_peak`].
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Acquire)
    }

    /// Live allocations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The limit given at creation.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes still free under the limit.
    pub fn free(&self) -> usize {
        self.limit.saturating_sub(self.current())
    }

    /// Restarts peak tracking from the current use.
    pub fn reset_peak(&self) {
        // Read-modify-writes (not plain loads) read the newest value of `current`: a
        // plain load may see a stale one and reset the peak below current use.
        let now = self.current.fetch_add(0, Ordering::AcqRel);
        self.peak.store(now, Ordering::Release);
        // A reservation between the read and the store may have raised the peak that
        // the store then overwrote: fold the current use back in.
        let now = self.current.fetch_add(0, Ordering::AcqRel);
        self.peak.fetch_max(now, Ordering::AcqRel);
    }

    /// A copy of the numbers.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            current: self.current(),
            peak: self.peak(),
            count: self.count(),
        }
    }
}

/// The numbers of a [`ByteCounter`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CounterSnapshot {
    /// Bytes in use.
    pub current: usize,
    /// Most bytes in use at once.
    pub peak: usize,
    /// Live allocations.
    pub count: u64,
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn limit_peak_and_release() {
        let c = ByteCounter::with_limit(100);
        c.try_reserve(60).unwrap();
        assert_eq!(c.try_reserve(50), Err(40));
        c.try_reserve(40).unwrap();
        assert_eq!(c.free(), 0);
        c.release(60);
        assert_eq!(
            c.snapshot(),
            CounterSnapshot {
                current: 40,
                peak: 100,
                count: 1
            }
        );
        c.reset_peak();
        assert_eq!(c.peak(), 40);
        assert_eq!(c.try_reserve(usize::MAX), Err(60));
    }
}
