//! The streaming plan: Belady's MIN run a step ahead of the runtime, on all of the
//! device budget but one parameter's worth.
//!
//! While layer `k` computes, the next missing layer loads; both need device memory at
//! once. So the best a store with room for `C` layers can do is MIN with `C − 1` slots
//! (the *logical* cache), with the extra slot (the *spare*) holding whichever layer has
//! just left the logical cache but is still needed on the GPU or still computing.
//!
//! [`Plan`] keeps the logical cache and walks the sequence ahead of the runtime's
//! position. Each logical miss is one load; the layers MIN evicts become *zombies*:
//! still on the device (the runtime may still use them before the step that evicted
//! them) and freed as soon as that is no longer possible. So the store moves exactly
//! the bytes MIN(C−1) moves, and each load is queued as early as memory allows.
//!
//! [`fixed_set`] is the other planner ([`Planner::Static`](super::store::Planner)): a
//! resident set chosen once from the sizes, with the rest streamed through the room
//! left. Run through the same [`Plan`] (the fixed set never evicted, the logical cache
//! no larger than it), every other parameter is loaded before its step and freed after.
//!
//! The plan only decides; the [store](super::store) frees, loads and keeps the
//! accounts.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use rustc_hash::FxHashMap;

use crate::tier::policy::{ParamId, Sequence};

/// A parameter that left the logical cache but may still be on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Zombie {
    pub id: ParamId,
    /// The step whose load evicted it: the runtime may use it at steps before this one.
    pub until: u64,
}

/// What a cached parameter is to the plan: how it is evicted, or that it is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Traits {
    /// Device bytes.
    pub bytes: usize,
    /// Never evicted (kept resident).
    pub kept: bool,
    /// Cursor priority: lower goes first.
    pub priority: i32,
}

/// Cursor order: the greatest key goes first (lowest priority, then the next use
/// farthest away, then the lowest id).
type Key = (Reverse<i32>, u64, Reverse<ParamId>);

/// MIN's logical cache, and how far along the sequence it has been run.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Ids in the logical cache, with their eviction key (`None`: kept resident).
    cached: FxHashMap<ParamId, Option<Key>>,
    /// The evictable ones, ordered.
    order: BTreeSet<Key>,
    /// Their device bytes.
    pub bytes: usize,
    /// The logical capacity: the device budget less the spare.
    pub cap: usize,
    /// The last step (absolute: step `s` runs `order[s % len]`) the cache has seen.
    pub pos: u64,
    /// Parameters evicted from the logical cache and not yet freed.
    pub zombies: Vec<Zombie>,
}

/// What the next step of the plan needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// The step's parameter is in the logical cache: nothing to do.
    Hit,
    /// It is a zombie: back into the logical cache without a copy.
    Revive,
    /// It must be loaded, after these leave the logical cache (they become zombies).
    Load {
        /// The parameter to load.
        id: ParamId,
        /// Logical victims, in eviction order.
        victims: Vec<ParamId>,
    },
}

/// The step after `after` at which `id` is used next (`u64::MAX`: never).
fn next_use(seq: &Sequence, id: ParamId, after: u64) -> u64 {
    let at = (after % seq.len() as u64) as usize;
    seq.distance_to_next_use(id, at)
        .map_or(u64::MAX, |d| after + d as u64)
}

impl Plan {
    /// A plan whose logical cache starts as `resident` (everything now on the device),
    /// at step `pos`.
    pub fn new(
        seq: &Sequence,
        resident: impl IntoIterator<Item = (ParamId, Traits)>,
        cap: usize,
        pos: u64,
    ) -> Plan {
        let mut plan = Plan {
            cached: FxHashMap::default(),
            order: BTreeSet::new(),
            bytes: 0,
            cap,
            pos,
            zombies: Vec::new(),
        };
        for (id, t) in resident {
            plan.insert(seq, id, t, pos);
        }
        plan
    }

    fn insert(&mut self, seq: &Sequence, id: ParamId, t: Traits, after: u64) {
        let key = (!t.kept).then(|| (Reverse(t.priority), next_use(seq, id, after), Reverse(id)));
        if let Some(k) = key {
            self.order.insert(k);
        }
        if self.cached.insert(id, key).is_none() {
            self.bytes += t.bytes;
        }
    }

    fn remove(&mut self, id: ParamId, bytes: usize) -> bool {
        match self.cached.remove(&id) {
            Some(key) => {
                if let Some(k) = key {
                    self.order.remove(&k);
                }
                self.bytes -= bytes;
                true
            }
            None => false,
        }
    }

    /// What step `self.pos + 1` needs. `size(id)` gives device bytes.
    pub fn next(&self, seq: &Sequence, size: impl Fn(ParamId) -> usize) -> Step {
        let m = self.pos + 1;
        let id = seq.order()[(m % seq.len() as u64) as usize];
        if self.cached.contains_key(&id) {
            return Step::Hit;
        }
        if self.zombies.iter().any(|z| z.id == id) {
            return Step::Revive;
        }
        // MIN at step m: the greatest keys (each next use is counted from the step
        // where the id was last seen, which no use lies between).
        let mut bytes = self.bytes;
        let mut victims = Vec::new();
        for k in self.order.iter().rev() {
            if bytes + size(id) <= self.cap {
                break;
            }
            let v = k.2 .0;
            bytes -= size(v);
            victims.push(v);
        }
        Step::Load { id, victims }
    }

    /// Moves the plan past a hit: the parameter's next use moves on.
    pub fn hit(&mut self, seq: &Sequence) {
        let m = self.pos + 1;
        let id = seq.order()[(m % seq.len() as u64) as usize];
        if let Some(Some(k)) = self.cached.get(&id).copied() {
            self.order.remove(&k);
            let k = (k.0, next_use(seq, id, m), k.2);
            self.order.insert(k);
            self.cached.insert(id, Some(k));
        }
        self.pos = m;
    }

    /// Moves the plan past a step whose parameter the store does not have.
    pub fn skip(&mut self) {
        self.pos += 1;
    }

    /// Moves zombie `id` back into the logical cache (then the cache may be over its
    /// capacity by one parameter until the next load evicts).
    pub fn revive(&mut self, seq: &Sequence, id: ParamId, t: Traits) {
        let m = self.pos + 1;
        self.zombies.retain(|z| z.id != id);
        self.insert(seq, id, t, m);
        self.pos = m;
    }

    /// Records the load of step `self.pos + 1`: `victims` (with their device bytes)
    /// leave the logical cache as zombies, `id` joins it.
    pub fn load(&mut self, seq: &Sequence, id: ParamId, t: Traits, victims: &[(ParamId, usize)]) {
        let m = self.pos + 1;
        for (v, b) in victims {
            if self.remove(*v, *b) {
                self.zombies.push(Zombie { id: *v, until: m });
            }
        }
        self.insert(seq, id, t, m);
        self.pos = m;
    }

    /// Forgets `id` (it left the device outside the plan, or was freed as a zombie).
    pub fn forget(&mut self, id: ParamId, bytes: usize) {
        self.remove(id, bytes);
        self.zombies.retain(|z| z.id != id);
    }
}

/// Whether the runtime, having run step `now`, can no longer need zombie `z` before the
/// step that evicted it (so its memory may go to a load queued after its last use).
pub(crate) fn zombie_done(seq: &Sequence, z: &Zombie, now: u64) -> bool {
    let at = (now % seq.len() as u64) as usize;
    match seq.distance_to_next_use(z.id, at) {
        Some(d) => now + d as u64 >= z.until,
        None => true,
    }
}

/// A parameter the static planner may keep: what [`fixed_set`] weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub id: ParamId,
    /// Device bytes.
    pub bytes: usize,
    /// Position of its first use in the pass.
    pub at: usize,
    /// Uses per pass (a tied weight used twice saves two loads by staying).
    pub uses: usize,
    /// Cursor priority: higher stays first.
    pub priority: i32,
}

/// The parameters the static planner keeps on the device for good, from `cands`
/// (distinct, not kept resident by the caller) and `avail` device bytes (the budget
/// less what the caller keeps).
///
/// Every parameter left out is loaded before each use and freed after it, through room
/// for `spare` of the largest of them at once. So: the highest priority first, then the
/// most uses per pass (bytes saved per byte kept), then the largest (keeping the largest
/// also shrinks the room the rest need), as many as fit with that room; of a group only
/// some of which fit, ones spread evenly along the pass, so that the streamed steps
/// between them overlap their loads with the kept ones' kernels instead of queueing
/// behind a long run of them.
pub(crate) fn fixed_set(cands: &[Candidate], avail: usize, spare: usize) -> Vec<ParamId> {
    use std::cmp::Reverse;
    let spare = spare.max(1);
    let mut order: Vec<Candidate> = cands.iter().copied().filter(|c| c.bytes > 0).collect();
    order.sort_unstable_by_key(|c| {
        (
            Reverse(c.priority),
            Reverse(c.uses),
            Reverse(c.bytes),
            c.at,
            c.id,
        )
    });
    let groups: Vec<&[Candidate]> = order
        .chunk_by(|a, b| (a.priority, a.uses, a.bytes) == (b.priority, b.uses, b.bytes))
        .collect();
    // The largest parameter of the groups after each: the room if those all stream.
    let mut after = vec![0usize; groups.len() + 1];
    for i in (0..groups.len()).rev() {
        after[i] = after[i + 1].max(groups[i][0].bytes);
    }
    let mut fixed = Vec::new();
    let mut kept = 0usize;
    // Set once a group is left partly streamed: room for the largest still streamed.
    let mut room: Option<usize> = None;
    for (i, g) in groups.iter().enumerate() {
        let size = g[0].bytes;
        let whole = kept.saturating_add(size.saturating_mul(g.len()));
        if room.is_none() && whole.saturating_add(spare.saturating_mul(after[i + 1])) <= avail {
            fixed.extend(g.iter().map(|m| m.id));
            kept = whole;
            continue;
        }
        let r = *room.get_or_insert(spare.saturating_mul(after[i]));
        let fit = (avail.saturating_sub(kept).saturating_sub(r) / size).min(g.len());
        // `fit` of `g.len()`, evenly spaced: the middle of each of `fit` equal stretches.
        for j in 0..fit {
            fixed.push(g[(2 * j + 1) * g.len() / (2 * fit)].id);
        }
        kept += fit * size;
    }
    fixed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::policy::min_misses_each_pass;

    const UNIT: Traits = Traits {
        bytes: 1,
        kept: false,
        priority: 0,
    };

    /// Driving the plan alone over a cycle, with every zombie freed at once, misses
    /// exactly as MIN with the same capacity, pass by pass.
    #[test]
    fn the_logical_cache_is_belady() {
        for n in [3u32, 5, 8, 10] {
            let order: Vec<ParamId> = (0..n).collect();
            let seq = Sequence::new(order.clone());
            let passes = 12;
            for cap in 1..n as usize {
                let mut plan = Plan::new(&seq, Vec::new(), cap, u64::from(n) - 1);
                let mut misses = vec![0usize; passes];
                while plan.pos + 1 < (passes as u64 + 1) * u64::from(n) {
                    match plan.next(&seq, |_| 1) {
                        Step::Hit => plan.hit(&seq),
                        Step::Revive => unreachable!("zombies are freed at once"),
                        Step::Load { id, victims } => {
                            let v: Vec<_> = victims.iter().map(|v| (*v, 1)).collect();
                            plan.load(&seq, id, UNIT, &v);
                            plan.zombies.clear();
                            misses[(plan.pos / u64::from(n)) as usize - 1] += 1;
                        }
                    }
                }
                assert_eq!(
                    misses,
                    min_misses_each_pass(&order, cap, passes),
                    "n {n} cap {cap}"
                );
            }
        }
    }

    #[test]
    fn the_fixed_set_fills_the_budget_less_the_room_largest_first() {
        let c = |id: ParamId, bytes: usize, at: usize| Candidate {
            id,
            bytes,
            at,
            uses: 1,
            priority: 0,
        };
        // Equal layers: all but `spare` of what fits, spread along the pass.
        let eq: Vec<Candidate> = (0..16).map(|i| c(i, 10, i as usize)).collect();
        let f = fixed_set(&eq, 80, 1);
        assert_eq!(f.len(), 7);
        let f2 = fixed_set(&eq, 80, 2);
        assert_eq!(f2, vec![1, 4, 6, 9, 12, 14], "6 of 16, evenly spaced");
        // Everything fits: nothing is streamed, no room is needed.
        assert_eq!(fixed_set(&eq, 160, 1).len(), 16);
        // Mixed: the two large ones stay and the room is sized for the small ones.
        let mut mixed = vec![c(100, 50, 0), c(101, 50, 20)];
        mixed.extend((0..20).map(|i| c(i, 5, i as usize + 1)));
        let f = fixed_set(&mixed, 150, 2);
        assert!(f.contains(&100) && f.contains(&101), "{f:?}");
        let kept: usize = f.iter().map(|id| if *id >= 100 { 50 } else { 5 }).sum();
        assert_eq!(kept, 140, "150 less room for two streamed 5s");
        // Nothing fits beside the room: nothing is fixed.
        assert!(fixed_set(&eq, 15, 1).is_empty());
        assert!(fixed_set(&[], 100, 1).is_empty());
        // A layer used twice per pass stays before larger ones used once; so does a
        // higher priority, before either; and the room covers the largest streamed.
        let mut tied = eq.clone();
        tied[5].uses = 2;
        assert_eq!(fixed_set(&tied, 20, 1), vec![5]);
        let mut prio = mixed.clone();
        prio[3].priority = 1;
        let f = fixed_set(&prio, 60, 1);
        assert_eq!(f[0], 1, "{f:?}");
        assert!(
            !f.contains(&100) || !f.contains(&101),
            "room for a 50 stays: {f:?}"
        );
        let kept: usize = f.iter().map(|id| if *id >= 100 { 50 } else { 5 }).sum();
        assert!(kept + 50 <= 60, "{f:?}");
    }

    #[test]
    fn zombies_wait_for_their_last_use_before_the_evicting_step() {
        let seq = Sequence::new(vec![0, 1, 2, 3]);
        // Evicted by the load of step 6 (id 2 of the second pass): id 1 is used at step 5.
        let z = Zombie { id: 1, until: 6 };
        assert!(!zombie_done(&seq, &z, 3));
        assert!(!zombie_done(&seq, &z, 4));
        assert!(zombie_done(&seq, &z, 5), "used at step 5, next at 9");
    }
}
