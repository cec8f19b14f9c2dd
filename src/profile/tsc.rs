//! Events stamped with the CPU's time-stamp counter, converted to the monotonic clock by
//! the writer.

use super::now_ns;

/// Converts counter readings to the monotonic clock: anchored at the latest pair of
/// readings the writer took (events are converted within milliseconds of it), at the
/// rate measured since the first.
pub(super) struct Tsc {
    first: (u64, u64),
    last: (u64, u64),
    ns_per_tick: f64,
}

impl Tsc {
    fn pair() -> (u64, u64) {
        let t = hetmem_sys::clock::tsc().unwrap_or(0);
        (t, now_ns())
    }

    /// The first pair, and a first rate over 100 µs (a spin); the rate is measured
    /// again from the first pair at each [`Tsc::update`], over a longer baseline each
    /// time. Conversions are anchored at the latest pair, so the rate's error counts
    /// only over the milliseconds between an event and the writer's drain.
    pub(super) fn start() -> Tsc {
        let first = Tsc::pair();
        while now_ns().saturating_sub(first.1) < 100_000 {
            std::hint::spin_loop();
        }
        let mut c = Tsc {
            first,
            last: first,
            ns_per_tick: 1.0,
        };
        c.update();
        c
    }

    pub(super) fn update(&mut self) {
        let now = Tsc::pair();
        let ticks = now.0.wrapping_sub(self.first.0);
        if ticks > 0 && now.1 > self.first.1 {
            self.ns_per_tick = (now.1 - self.first.1) as f64 / ticks as f64;
        }
        self.last = now;
    }

    pub(super) fn ns(&self, tick: u64) -> u64 {
        let d = tick.wrapping_sub(self.last.0) as i64 as f64 * self.ns_per_tick;
        (self.last.1 as f64 + d).max(0.0) as u64
    }
}
