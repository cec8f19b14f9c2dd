//! Which parameter to evict: by the known execution sequence (Belady's MIN: the one
//! needed farthest in the future) or, without one, the least recently used.
//!
//! LRU fails completely on a loop larger than the cache: every access misses, because
//! the layer evicted is always the next one needed. With the sequence known, MIN keeps
//! at least all but one slot hitting on every pass (it does better, varying which layers it
//! keeps from pass to pass). [`min_misses_per_pass`] computes that optimum,
//! the figure the tier store's streaming targets are measured against.
//!
//! ```
//! use hetmem::tier::{lru_misses_per_pass, min_misses_per_pass};
//! let layers: Vec<u32> = (0..10).collect();
//! // Room for 4 layers, looped: LRU misses all 10 every pass; MIN fewer than keeping 3
//! // layers and cycling the fourth slot would (7).
//! assert_eq!(lru_misses_per_pass(&layers, 4, 5), 10.0);
//! let min = min_misses_per_pass(&layers, 4, 50);
//! assert!(min < 7.0 && min >= 6.0, "{min}");
//! ```

use std::sync::Arc;

use rustc_hash::FxHashMap;

/// A parameter's id in a tier store.
pub type ParamId = u32;

/// An execution order, repeated pass after pass, with the positions of each id so that
/// "when is this needed next" is a binary search. Cheap to clone (shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    order: Arc<[ParamId]>,
    positions: Arc<FxHashMap<ParamId, Vec<usize>>>,
}

impl Sequence {
    /// The order in which one pass uses the parameters (an id may appear more than once).
    pub fn new(order: Vec<ParamId>) -> Self {
        let mut positions: FxHashMap<ParamId, Vec<usize>> = FxHashMap::default();
        for (i, id) in order.iter().enumerate() {
            positions.entry(*id).or_default().push(i);
        }
        Sequence {
            order: order.into(),
            positions: Arc::new(positions),
        }
    }

    /// Steps in one pass.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether the pass is empty.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The order of one pass.
    pub fn order(&self) -> &[ParamId] {
        &self.order
    }

    /// How many steps after step `pos` (of the repeating sequence) `id` is used next:
    /// 1 for the very next step, up to one pass for an id used once per pass; `None` for
    /// an id the sequence never uses.
    pub fn distance_to_next_use(&self, id: ParamId, pos: usize) -> Option<usize> {
        let ps = self.positions.get(&id)?;
        let n = self.order.len();
        let at = pos % n;
        // First use strictly after `at` in this pass, else the first of the next pass.
        let i = ps.partition_point(|p| *p <= at);
        Some(match ps.get(i) {
            Some(p) => p - at,
            None => n - at + ps[0],
        })
    }
}

/// How to choose an eviction victim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Least recently used.
    Lru,
    /// Needed farthest in the future along this sequence (Belady's MIN).
    Sequence(Sequence),
}

/// Where a store stands under its [`Policy`]: the step of the sequence last executed,
/// and each parameter's last use. It answers "when is this needed next" and "which
/// candidate goes" ([`Cursor::victim`]).
///
/// The names of the decision: a [`Policy`] is the rule (LRU, or MIN along a sequence),
/// a `Cursor` the rule applied so far; a store's [`SequenceHint`](crate::tier::SequenceHint)
/// says where its sequence comes from, and its [`Planner`](crate::tier::Planner) what
/// stays on the device under one.
#[derive(Debug, Clone)]
pub struct Cursor {
    policy: Policy,
    /// Step of the sequence last executed (sequence policy).
    pos: usize,
    /// Use counter and each id's last use (LRU, and the tie-break for the sequence).
    tick: u64,
    last_use: FxHashMap<ParamId, u64>,
}

impl Cursor {
    /// A fresh state under `policy`.
    pub fn new(policy: Policy) -> Self {
        // "The step last executed" starts as the last step of the pass before the first,
        // so that the first use found is step 0 itself.
        let pos = match &policy {
            Policy::Sequence(seq) => seq.len().saturating_sub(1),
            Policy::Lru => 0,
        };
        Cursor {
            policy,
            pos,
            tick: 0,
            last_use: FxHashMap::default(),
        }
    }

    /// A fresh state under `policy`, the step last executed being `pos` (a sequence's
    /// index; ignored under LRU).
    pub fn at(policy: Policy, pos: usize) -> Self {
        let mut cursor = Cursor::new(policy);
        if let Policy::Sequence(seq) = &cursor.policy {
            cursor.pos = pos % seq.len().max(1);
        }
        cursor
    }

    /// Moves the sequence's cursor back to `pos` (from [`Cursor::pos`]): an acquire
    /// that failed did not run its step.
    pub fn rewind(&mut self, pos: usize) {
        self.pos = pos;
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The step of the sequence last executed (0 under LRU).
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Records a use of `id`. Under the sequence policy the position moves to the next
    /// step that uses `id` (normally the very next step).
    pub fn touch(&mut self, id: ParamId) {
        self.tick += 1;
        self.last_use.insert(id, self.tick);
        if let Policy::Sequence(seq) = &self.policy {
            if let Some(d) = seq.distance_to_next_use(id, self.pos) {
                self.pos = (self.pos + d) % seq.len();
            }
        }
    }

    /// How many steps from the step last executed until `id` is used next, under the
    /// sequence policy (`None` under LRU, or for an id the sequence never uses).
    pub fn next_use(&self, id: ParamId) -> Option<usize> {
        match &self.policy {
            Policy::Sequence(seq) => seq.distance_to_next_use(id, self.pos),
            Policy::Lru => None,
        }
    }

    /// Forgets `id` (it left the tier).
    pub fn forget(&mut self, id: ParamId) {
        self.last_use.remove(&id);
    }

    /// The candidate to evict: the one used farthest in the future (ids the sequence
    /// never uses first), or the least recently used; ties go to the least recently used.
    pub fn victim(&self, candidates: impl IntoIterator<Item = ParamId>) -> Option<ParamId> {
        let last = |id: ParamId| self.last_use.get(&id).copied().unwrap_or(0);
        match &self.policy {
            Policy::Lru => candidates.into_iter().min_by_key(|id| (last(*id), *id)),
            Policy::Sequence(seq) => candidates.into_iter().max_by_key(|id| {
                let next = seq
                    .distance_to_next_use(*id, self.pos)
                    .unwrap_or(usize::MAX);
                (next, std::cmp::Reverse(last(*id)), std::cmp::Reverse(*id))
            }),
        }
    }
}

/// Misses in each of `passes` repetitions of `order` through a cache of `capacity`
/// equal-sized slots, starting empty, evicting by `cursor`.
fn simulate(order: &[ParamId], capacity: usize, passes: usize, mut cursor: Cursor) -> Vec<usize> {
    let mut resident: Vec<ParamId> = Vec::with_capacity(capacity);
    let mut misses = vec![0usize; passes];
    for m in misses.iter_mut() {
        for &id in order {
            if !resident.contains(&id) {
                *m += 1;
                if capacity == 0 {
                    cursor.touch(id);
                    continue;
                }
                if resident.len() == capacity {
                    // The id about to be used is not resident, so it is no candidate.
                    let v = cursor
                        .victim(resident.iter().copied())
                        .expect("a full cache has a victim");
                    resident.retain(|r| *r != v);
                    cursor.forget(v);
                }
                resident.push(id);
            }
            cursor.touch(id);
        }
    }
    misses
}

/// Misses in each of `passes` repetitions of `order` under Belady's MIN with `capacity`
/// slots, from an empty cache (the first pass fills it). MIN on a loop keeps changing
/// which layers it holds, so the steady passes differ by one now and then.
///
/// ```
/// use hetmem::tier::min_misses_each_pass;
/// assert_eq!(min_misses_each_pass(&[0, 1, 2, 3], 2, 3), vec![4, 2, 3]);
/// ```
pub fn min_misses_each_pass(order: &[ParamId], capacity: usize, passes: usize) -> Vec<usize> {
    let cursor = Cursor::new(Policy::Sequence(Sequence::new(order.to_vec())));
    simulate(order, capacity, passes, cursor)
}

/// Average of the passes after the first (which fills an empty cache).
fn steady(misses: &[usize]) -> f64 {
    let rest = &misses[1.min(misses.len())..];
    rest.iter().sum::<usize>() as f64 / rest.len().max(1) as f64
}

/// Steady-state misses per pass of Belady's MIN with `capacity` slots on the repeated
/// `order`.
pub fn min_misses_per_pass(order: &[ParamId], capacity: usize, passes: usize) -> f64 {
    steady(&min_misses_each_pass(order, capacity, passes.max(2)))
}

/// Steady-state misses per pass of LRU with `capacity` slots on the repeated `order`.
pub fn lru_misses_per_pass(order: &[ParamId], capacity: usize, passes: usize) -> f64 {
    steady(&simulate(
        order,
        capacity,
        passes.max(2),
        Cursor::new(Policy::Lru),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_use_wraps_around_the_pass() {
        let s = Sequence::new(vec![5, 6, 7, 6]);
        assert_eq!(s.distance_to_next_use(6, 0), Some(1));
        assert_eq!(s.distance_to_next_use(6, 1), Some(2));
        assert_eq!(
            s.distance_to_next_use(5, 0),
            Some(4),
            "used once a pass: a pass away"
        );
        assert_eq!(s.distance_to_next_use(5, 3), Some(1));
        assert_eq!(
            s.distance_to_next_use(7, 6),
            Some(4),
            "positions past a pass wrap"
        );
        assert_eq!(s.distance_to_next_use(9, 0), None);
    }

    #[test]
    fn lru_fails_on_a_loop_and_min_keeps_all_but_one_slot() {
        let layers: Vec<ParamId> = (0..10).collect();
        for cap in 1..10 {
            assert_eq!(
                lru_misses_per_pass(&layers, cap, 6),
                10.0,
                "LRU, capacity {cap}"
            );
            // MIN does at least as well as keeping cap - 1 layers and cycling one slot, and
            // cannot beat a cache that misses each layer not held at least once a pass.
            let min = min_misses_per_pass(&layers, cap, 50);
            assert!(min <= (10 - (cap - 1)) as f64, "MIN, capacity {cap}: {min}");
            assert!(min >= (10 - cap) as f64, "MIN, capacity {cap}: {min}");
        }
        assert_eq!(min_misses_per_pass(&layers, 10, 6), 0.0, "everything fits");
        assert_eq!(min_misses_per_pass(&layers, 0, 3), 10.0, "no room at all");
    }

    #[test]
    fn victims_follow_the_policy() {
        let mut lru = Cursor::new(Policy::Lru);
        for id in [1, 2, 3, 1] {
            lru.touch(id);
        }
        assert_eq!(lru.victim([1, 2, 3]), Some(2));
        let mut min = Cursor::new(Policy::Sequence(Sequence::new(vec![1, 2, 3, 4])));
        min.touch(1);
        min.touch(2);
        // At step 2 (id 2 just ran): 3 is next, then 4, then 1.
        assert_eq!(min.victim([1, 3, 4]), Some(1));
        assert_eq!(min.victim([3, 9]), Some(9), "never needed again goes first");
        assert_eq!(min.victim(std::iter::empty()), None);
    }

    /// MIN never misses more than LRU, and matches the best of all eviction choices on
    /// small cases (exhaustive search).
    #[test]
    fn min_is_optimal_on_small_sequences() {
        let mut seed = 7u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let len = 3 + (next() % 6) as usize;
            let order: Vec<ParamId> = (0..len).map(|_| (next() % 5) as ParamId).collect();
            let cap = 1 + (next() % 3) as usize;
            let min = min_misses_per_pass(&order, cap, 4);
            assert!(
                min <= lru_misses_per_pass(&order, cap, 4),
                "{order:?} cap {cap}"
            );
            // Total misses over three passes from an empty cache: MIN is the optimum.
            let seq: Vec<ParamId> = order
                .iter()
                .copied()
                .cycle()
                .take(order.len() * 3)
                .collect();
            let best = brute(&seq, cap, &mut Vec::new(), 0);
            let cursor = Cursor::new(Policy::Sequence(Sequence::new(order.clone())));
            let ours: usize = simulate(&order, cap, 3, cursor).iter().sum();
            assert_eq!(
                ours, best,
                "{order:?} cap {cap}: MIN {ours} vs optimum {best}"
            );
        }
    }

    /// Fewest misses over `seq` from step `i` with `cap` slots, trying every victim.
    fn brute(seq: &[ParamId], cap: usize, resident: &mut Vec<ParamId>, i: usize) -> usize {
        let Some(&id) = seq.get(i) else { return 0 };
        if resident.contains(&id) {
            return brute(seq, cap, resident, i + 1);
        }
        if resident.len() < cap {
            resident.push(id);
            let r = 1 + brute(seq, cap, resident, i + 1);
            resident.pop();
            return r;
        }
        let mut best = usize::MAX;
        for k in 0..resident.len() {
            let old = resident[k];
            resident[k] = id;
            best = best.min(1 + brute(seq, cap, resident, i + 1));
            resident[k] = old;
        }
        best
    }
}
