//! A tier store's settings and reports: [`TierConfig`] (with [`SequenceHint`] and
//! [`Planner`]), [`Residency`] and [`TierStats`].

use crate::tier::policy::ParamId;

/// Where the execution sequence comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SequenceHint {
    /// The runtime knows it: one pass, in order (ids may repeat).
    Given(Vec<ParamId>),
    /// Record the order of [`TierStore::acquire`](crate::TierStore::acquire) calls during the first pass and
    /// install it when the first id comes round again (a longer one when the next
    /// acquires show the pass was longer: a weight used first and last); drop it (back
    /// to LRU, learning again) when later acquires leave it. A failed acquire counts
    /// once, however often it is retried. See the `learn` module of [`crate::tier`].
    Learn,
    /// No sequence: the least recently used goes, and nothing is prefetched along a
    /// sequence.
    Lru,
}

/// How the store decides what stays on the device when a sequence is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Planner {
    /// Belady's MIN over the sequence with the budget less `spare_slots` of the largest
    /// parameter it streams: the fewest bytes for layers of one size (the optimum of the
    /// module docs). With mixed sizes it may keep the parameters above a size for good
    /// (a large embedding and head) and stream the rest through room for that size,
    /// where a simulation of six passes says that loads less. What stays rotates from
    /// pass to pass, so runs of hits come together.
    #[default]
    Belady,
    /// A fixed resident set chosen once, when the plan is built: the highest priority
    /// first, then the parameters used most often per pass, then the largest, as many
    /// as fit beside room for `spare_slots` of the largest parameter *left out*
    /// (spread evenly along the pass where only some of a kind fit); everything else
    /// is loaded before each use and freed after it. For a loop of distinct layers of
    /// one size, with one spare slot, it moves no more than `Belady` (MIN(C-1)), at
    /// times less. With mixed sizes it usually moves less (the room is sized for the
    /// streamed parameters, not for the largest of all, which usually stays), and with
    /// `spare_slots` ≥ 2 streamed loads overlap the kept layers' kernels, so a pass
    /// reaches max(copy, compute) when kernels take about as long as copies, where
    /// `Belady` leaves the copy engine idle through its runs of hits. A runtime that
    /// holds several streamed parameters at once (a module's weight and bias) needs as
    /// many spare slots.
    Static,
}

/// Settings of a [`TierStore`](crate::TierStore).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierConfig {
    /// The device the parameters are loaded onto.
    pub device: usize,
    /// Most device bytes resident parameters may use (each rounded up to 512).
    pub device_budget: usize,
    /// Most pinned host bytes: the staging ring plus the pinned parameter copies.
    pub host_budget: usize,
    /// How many steps of the sequence ahead of the runtime loads may be queued (at most
    /// one pass; memory is the usual limit).
    pub prefetch_depth: usize,
    /// The execution sequence, given or learnt.
    pub sequence: SequenceHint,
    /// Verify every load against a checksum taken at registration (or write-back) by
    /// copying the bytes back; slow, for tests and debugging. A mismatch whose host copy
    /// is intact is loaded once more; a second one, or a host copy that changed (a
    /// mapped file rewritten under the store), fails the load with
    /// [`Error::Checksum`](crate::Error::Checksum): wrong bytes are never handed out.
    pub checksums: bool,
    /// Slots of the staging ring (at least 2).
    pub staging_slots: usize,
    /// Bytes per staging slot.
    pub staging_slot_size: usize,
    /// Host threads that fill a staging slot.
    pub staging_threads: usize,
    /// Parameters' worth of the device budget the plan keeps out of MIN's cache for
    /// loading ahead (at least 1: the layer computing while the next loads). One moves
    /// the fewest bytes (MIN with `C - 1` slots); a second lets loads run ahead through
    /// runs of hits, which overlaps better when a kernel takes about as long as a copy,
    /// at the price of MIN with `C - 2` slots.
    pub spare_slots: usize,
    /// What stays on the device under a sequence.
    pub planner: Planner,
}

impl TierConfig {
    /// Device 0, the given budgets, loads queued as far ahead as memory allows, no
    /// sequence, no checksums, and a staging ring of 4 slots of 4 MiB filled by 2
    /// threads.
    pub fn new(device_budget: usize, host_budget: usize) -> Self {
        TierConfig {
            device: 0,
            device_budget,
            host_budget,
            prefetch_depth: usize::MAX,
            sequence: SequenceHint::Lru,
            checksums: false,
            staging_slots: 4,
            staging_slot_size: 4 << 20,
            staging_threads: 2,
            spare_slots: 1,
            planner: Planner::Belady,
        }
    }
}

/// Where a parameter is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// Only in its source (mapped file or host bytes the caller gave).
    Cold,
    /// In a pinned host block, not on the device.
    Host,
    /// On the device, its load queued but not known to be done.
    Loading {
        /// Guards held.
        refs: u32,
    },
    /// On the device, loaded.
    Device {
        /// Guards held.
        refs: u32,
    },
}

/// What a [`TierStore`](crate::TierStore) has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Acquires that found the parameter on the device (loaded or loading).
    pub hits: u64,
    /// Acquires that had to load the parameter.
    pub misses: u64,
    /// Loads, demand and prefetch.
    pub loads: u64,
    /// Of which prefetches.
    pub prefetches: u64,
    /// Bytes copied host→device by loads.
    pub bytes_loaded: u64,
    /// Of `bytes_loaded`, the bytes of loads queued for steps of the sequence the
    /// runtime has not reached yet: `bytes_loaded - bytes_ahead` is what the steps run
    /// so far have cost.
    pub bytes_ahead: u64,
    /// Loads that went through the staging ring (cold, unpinned source).
    pub staged_loads: u64,
    /// Device copies dropped.
    pub evictions: u64,
    /// Dirty parameters copied back before their device copy was dropped.
    pub writebacks: u64,
    /// Bytes copied device→host by write-backs.
    pub writeback_bytes: u64,
    /// Loads whose bytes on the device did not match the checksum (each try counts).
    pub checksum_mismatches: u64,
    /// Times a learnt sequence was installed.
    pub sequences_learnt: u64,
    /// Times a learnt sequence was dropped because acquires left it.
    pub sequences_dropped: u64,
    /// Evictions nobody chose: the pool could not place a load in the room the store
    /// counted (fragmentation), so another parameter was given up and the plan started
    /// again. Zero on a healthy run.
    pub unplanned_evictions: u64,
    /// Device bytes of resident parameters now (each rounded as the module docs say).
    pub device_bytes: usize,
    /// The most `device_bytes` has been.
    pub device_peak_bytes: usize,
    /// Pinned host bytes now: parameter copies plus the staging ring.
    pub host_bytes: usize,
    /// The most `host_bytes` has been.
    pub host_peak_bytes: usize,
    /// Bytes of parameters whose one host copy is a mapped file range (the page cache's
    /// memory, not counted in `host_bytes`).
    pub mapped_bytes: usize,
}
