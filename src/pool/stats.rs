//! Pool statistics under PyTorch's `torch.cuda.memory_stats()` key names, so that
//! dashboards and people used to those read ours the same way.

use std::collections::BTreeMap;

/// One statistic as PyTorch keeps it: current value, peak since the last reset, and the
/// running totals added and taken away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stat {
    /// Value now.
    pub current: u64,
    /// Highest value since creation or [`PoolStats::reset_peak`].
    pub peak: u64,
    /// Total ever added.
    pub allocated: u64,
    /// Total ever taken away.
    pub freed: u64,
}

impl Stat {
    pub(crate) fn add(&mut self, n: u64) {
        self.current += n;
        self.allocated += n;
        if self.current > self.peak {
            self.peak = self.current;
        }
    }

    pub(crate) fn sub(&mut self, n: u64) {
        // Called from drops, which must not panic: an underflow is a bug to log.
        if self.current < n {
            underflow(self.current, n);
        }
        self.current = self.current.saturating_sub(n);
        self.freed += n;
    }
}

/// Kept out of the hot path (the free of a cached block): a bug report, never expected.
#[cold]
#[inline(never)]
fn underflow(current: u64, n: u64) {
    tracing::error!(target: "hetmem", current, n, "pool stat underflow");
}

/// A stat for all blocks and for each of PyTorch's two pools (blocks up to 1 MiB are
/// "small", larger ones "large").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStat {
    /// Both pools.
    pub all: Stat,
    /// Blocks of at most 1 MiB.
    pub small_pool: Stat,
    /// Blocks over 1 MiB.
    pub large_pool: Stat,
}

impl PoolStat {
    pub(crate) fn add(&mut self, small: bool, n: u64) {
        self.all.add(n);
        self.pool(small).add(n);
    }

    pub(crate) fn sub(&mut self, small: bool, n: u64) {
        self.all.sub(n);
        self.pool(small).sub(n);
    }

    fn pool(&mut self, small: bool) -> &mut Stat {
        if small {
            &mut self.small_pool
        } else {
            &mut self.large_pool
        }
    }

    fn reset_peak(&mut self) {
        for s in [&mut self.all, &mut self.small_pool, &mut self.large_pool] {
            s.peak = s.current;
        }
    }
}

/// Everything a [`DevicePool`](crate::pool::DevicePool) counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes in blocks handed out (block sizes, rounded up to 512 bytes).
    pub allocated_bytes: PoolStat,
    /// Bytes callers asked for (before rounding).
    pub requested_bytes: PoolStat,
    /// Bytes held from the device: mapped pages, or whole segments.
    pub reserved_bytes: PoolStat,
    /// Blocks handed out.
    pub allocation: PoolStat,
    /// Segments held (mapped pages count one each under virtual memory management).
    pub segment: PoolStat,
    /// Times an allocation gave cached memory back and tried again.
    pub num_alloc_retries: u64,
    /// Allocations that failed with `OutOfMemory`.
    pub num_ooms: u64,
    /// Stream synchronisations done before giving memory back.
    pub num_sync_all_streams: u64,
    /// Driver allocations (segments or physical pages).
    pub num_device_alloc: u64,
    /// Driver frees (segments or physical pages).
    pub num_device_free: u64,
    /// Physical pages unmapped from free memory and mapped again where an allocation
    /// needed them (expandable segments growing at their high-water mark), instead of a
    /// driver free and a driver allocation.
    pub num_pages_moved: u64,
}

impl PoolStats {
    /// Starts peak tracking again from the current values.
    pub fn reset_peak(&mut self) {
        for s in [
            &mut self.allocated_bytes,
            &mut self.requested_bytes,
            &mut self.reserved_bytes,
            &mut self.allocation,
            &mut self.segment,
        ] {
            s.reset_peak();
        }
    }

    /// The stats as PyTorch's `memory_stats()` spells them: `allocated_bytes.all.current`,
    /// `reserved_bytes.large_pool.peak`, `num_alloc_retries`, ... `active_*` equals
    /// `allocated_*` (a freed block is reusable at once on its stream). `segment` counts
    /// reserved address ranges with memory mapped (as PyTorch counts an expandable
    /// segment) or plain segments; `num_device_alloc` / `num_device_free` count pages
    /// made and given back there, and `num_pages_moved` (hetmem's own) pages unmapped and
    /// mapped again elsewhere without either. PyTorch's `inactive_split*` keys are left out: what
    /// they measure (free blocks a split segment cannot release) has no counterpart in
    /// pages that are unmapped as soon as they are wholly free.
    pub fn to_map(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for (name, s) in [
            ("allocated_bytes", &self.allocated_bytes),
            ("active_bytes", &self.allocated_bytes),
            ("requested_bytes", &self.requested_bytes),
            ("reserved_bytes", &self.reserved_bytes),
            ("allocation", &self.allocation),
            ("active", &self.allocation),
            ("segment", &self.segment),
        ] {
            for (pool, st) in [
                ("all", s.all),
                ("small_pool", s.small_pool),
                ("large_pool", s.large_pool),
            ] {
                m.insert(format!("{name}.{pool}.current"), st.current);
                m.insert(format!("{name}.{pool}.peak"), st.peak);
                m.insert(format!("{name}.{pool}.allocated"), st.allocated);
                m.insert(format!("{name}.{pool}.freed"), st.freed);
            }
        }
        m.insert("num_alloc_retries".into(), self.num_alloc_retries);
        m.insert("num_ooms".into(), self.num_ooms);
        m.insert("num_sync_all_streams".into(), self.num_sync_all_streams);
        m.insert("num_device_alloc".into(), self.num_device_alloc);
        m.insert("num_device_free".into(), self.num_device_free);
        m.insert("num_pages_moved".into(), self.num_pages_moved);
        m
    }
}
