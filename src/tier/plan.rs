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
//! The plan only decides; the [store](super::store) frees, loads and keeps the
//! accounts.

use crate::tier::policy::{ParamId, Sequence};

/// A parameter that left the logical cache but may still be on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Zombie {
    pub id: ParamId,
    /// The step whose load evicted it: the runtime may use it at steps before this one.
    pub until: u64,
}

/// MIN's logical cache, and how far along the sequence it has been run.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Ids in the logical cache.
    pub cached: Vec<ParamId>,
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

impl Plan {
    /// A plan whose logical cache starts as `resident` (everything now on the device),
    /// at step `pos`.
    pub fn new(resident: Vec<(ParamId, usize)>, cap: usize, pos: u64) -> Plan {
        Plan {
            bytes: resident.iter().map(|(_, b)| b).sum(),
            cached: resident.into_iter().map(|(id, _)| id).collect(),
            cap,
            pos,
            zombies: Vec::new(),
        }
    }

    /// What step `self.pos + 1` needs. `size(id)` gives device bytes; `evictable(id)`
    /// says whether the id may leave the logical cache (not kept resident); `rank(id)`
    /// orders candidates (lowest priority first).
    pub fn next(
        &self,
        seq: &Sequence,
        size: impl Fn(ParamId) -> usize,
        evictable: impl Fn(ParamId) -> bool,
        rank: impl Fn(ParamId) -> i32,
    ) -> Step {
        let m = self.pos + 1;
        let id = seq.order()[(m % seq.len() as u64) as usize];
        if self.cached.contains(&id) {
            return Step::Hit;
        }
        if self.zombies.iter().any(|z| z.id == id) {
            return Step::Revive;
        }
        // MIN at step m: the one used farthest after step m - 1, lowest priority class
        // first; never-used ids before all others. Ties cannot happen between ids the
        // sequence uses (each next use is a different step); the id breaks the rest.
        let at = ((m - 1) % seq.len() as u64) as usize;
        let mut left: Vec<ParamId> = self
            .cached
            .iter()
            .copied()
            .filter(|c| evictable(*c))
            .collect();
        let mut bytes = self.bytes;
        let mut victims = Vec::new();
        while bytes + size(id) > self.cap {
            let Some(v) = left.iter().copied().max_by_key(|c| {
                let next = seq.distance_to_next_use(*c, at).unwrap_or(usize::MAX);
                (std::cmp::Reverse(rank(*c)), next, std::cmp::Reverse(*c))
            }) else {
                break;
            };
            left.retain(|c| *c != v);
            bytes -= size(v);
            victims.push(v);
        }
        Step::Load { id, victims }
    }

    /// Moves the plan past a hit.
    pub fn hit(&mut self) {
        self.pos += 1;
    }

    /// Moves zombie `id` back into the logical cache (then the cache may be over its
    /// capacity by one parameter until the next load evicts).
    pub fn revive(&mut self, id: ParamId, bytes: usize) {
        self.zombies.retain(|z| z.id != id);
        self.cached.push(id);
        self.bytes += bytes;
        self.pos += 1;
    }

    /// Records the load of step `self.pos + 1`: `victims` leave the logical cache as
    /// zombies, `id` joins it.
    pub fn load(&mut self, id: ParamId, bytes: usize, victims: &[(ParamId, usize)]) {
        let m = self.pos + 1;
        for (v, b) in victims {
            self.cached.retain(|c| c != v);
            self.bytes -= b;
            self.zombies.push(Zombie { id: *v, until: m });
        }
        self.cached.push(id);
        self.bytes += bytes;
        self.pos = m;
    }

    /// Forgets `id` (it left the device outside the plan, or was freed as a zombie).
    pub fn forget(&mut self, id: ParamId, bytes: usize) {
        if let Some(i) = self.cached.iter().position(|c| *c == id) {
            self.cached.swap_remove(i);
            self.bytes -= bytes;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::policy::min_misses_each_pass;

    /// Driving the plan alone over a cycle, with every zombie freed at once, misses
    /// exactly as MIN with the same capacity, pass by pass.
    #[test]
    fn the_logical_cache_is_belady() {
        for n in [3u32, 5, 8, 10] {
            let order: Vec<ParamId> = (0..n).collect();
            let seq = Sequence::new(order.clone());
            let passes = 12;
            for cap in 1..n as usize {
                let mut plan = Plan::new(Vec::new(), cap, u64::from(n) - 1);
                let mut misses = vec![0usize; passes];
                while plan.pos + 1 < (passes as u64 + 1) * u64::from(n) {
                    match plan.next(&seq, |_| 1, |_| true, |_| 0) {
                        Step::Hit => plan.hit(),
                        Step::Revive => unreachable!("zombies are freed at once"),
                        Step::Load { id, victims } => {
                            let v: Vec<_> = victims.iter().map(|v| (*v, 1)).collect();
                            plan.load(id, 1, &v);
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
    fn zombies_wait_for_their_last_use_before_the_evicting_step() {
        let seq = Sequence::new(vec![0, 1, 2, 3]);
        // Evicted by the load of step 6 (id 2 of the second pass): id 1 is used at step 5.
        let z = Zombie { id: 1, until: 6 };
        assert!(!zombie_done(&seq, &z, 3));
        assert!(!zombie_done(&seq, &z, 4));
        assert!(zombie_done(&seq, &z, 5), "used at step 5, next at 9");
    }
}
