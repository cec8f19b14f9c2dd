//! The planners' sizing: how much of the device budget the plan's logical cache gets,
//! and which parameters it keeps for good. Pure functions of the parameters' sizes and
//! hints ([`ParamTraits`]), the sequence and the budget; the store caches and applies
//! the answers (`store/run.rs`).
//!
//! - [`belady_choice`] ([`Planner::Belady`](crate::tier::Planner)): room for
//!   `spare_slots` of the largest parameter streamed, or, with mixed sizes, keep every
//!   parameter above some size for good and stream the rest through room for that size,
//!   whichever a simulation of six passes ([`simulated_bytes`]) says loads the least.
//! - [`static_choice`] ([`Planner::Static`](crate::tier::Planner)): the fixed set of
//!   [`fixed_set`] beside what the caller keeps.

use rustc_hash::FxHashMap;

use crate::tier::fnv1a;
use crate::tier::plan::{fixed_set, Candidate, Plan, Step, Traits};
use crate::tier::policy::{ParamId, Sequence};

/// What sizing weighs of a registered parameter (index = id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ParamTraits {
    /// Its bytes.
    pub size: usize,
    /// What it takes of the device budget (its size rounded as the store rounds it).
    pub bytes: usize,
    /// Kept resident by the caller.
    pub keep: bool,
    /// Cursor priority: lower goes first.
    pub priority: i32,
    /// On the device now.
    pub resident: bool,
}

/// A digest of what [`belady_choice`] depends on: the sequence, and each step's size and
/// hints, so that a plan rebuilt for the same is not sized again.
pub(crate) fn belady_digest(params: &[ParamTraits], seq: &Sequence) -> u64 {
    let mut words: Vec<u8> = Vec::with_capacity(seq.len() * 24);
    for id in seq.order() {
        let (size, hints) = params.get(*id as usize).map_or((0, 0), |p| {
            (
                p.size as u64,
                u64::from(p.keep) | (u64::from(p.priority as u32) << 1),
            )
        });
        for w in [u64::from(*id), size, hints] {
            words.extend_from_slice(&w.to_le_bytes());
        }
    }
    fnv1a(&words)
}

/// The parameters of the sequence MIN may evict (registered, not kept), with their
/// device bytes, by id.
fn streamable(params: &[ParamTraits], seq: &Sequence) -> Vec<(ParamId, usize)> {
    let mut out: Vec<(ParamId, usize)> = seq
        .order()
        .iter()
        .filter(|id| params.get(**id as usize).is_some_and(|p| !p.keep))
        .map(|id| (*id, params[*id as usize].bytes))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Belady's logical capacity, and the size above which it keeps parameters for good.
///
/// Room for `spare_slots` of the largest parameter the plan may load (in the sequence,
/// not kept) always works. With mixed sizes the largest (an embedding, a head) cost that
/// much room on every load. So for each smaller size `s` (largest first, eight at most)
/// the plan may instead keep every parameter larger than `s` for good (MIN never evicts
/// it, so the room for `s` always suffices) and run MIN over the rest; each choice is
/// simulated over six passes and the one that loads the fewest bytes in passes 2–5 is
/// taken (ties: the fewest kept).
pub(crate) fn belady_choice(
    params: &[ParamTraits],
    seq: &Sequence,
    budget: usize,
    spare_slots: usize,
) -> (usize, Option<usize>) {
    let room = |s: usize| budget.saturating_sub(s.saturating_mul(spare_slots));
    let streamable = streamable(params, seq);
    let mut sizes: Vec<usize> = streamable.iter().map(|x| x.1).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes.dedup();
    let largest = sizes.first().copied().unwrap_or(0);
    let mut best = (room(largest), None, u64::MAX);
    // One size (a loop of equal layers): nothing to choose, nothing to simulate.
    let choices = if sizes.len() > 1 { 9 } else { 0 };
    for (i, &s) in sizes.iter().take(choices).enumerate() {
        let above = (i > 0).then_some(s);
        let cap = room(s);
        let kept: usize = streamable
            .iter()
            .filter(|x| above.is_some_and(|a| x.1 > a))
            .map(|x| x.1)
            .sum();
        if kept.saturating_add(s) > cap {
            break; // keeping more leaves no room to stream through
        }
        let bytes = simulated_bytes(params, seq, cap, above);
        if bytes < best.2 {
            best = (cap, above, bytes);
        }
    }
    (best.0, best.1)
}

/// By id: whether Belady's plan keeps the parameter for good (streamable and larger
/// than `above`).
pub(crate) fn belady_fixed(
    params: &[ParamTraits],
    seq: &Sequence,
    above: Option<usize>,
) -> Vec<bool> {
    let mut fixed = vec![false; params.len()];
    if let Some(a) = above {
        for (id, bytes) in streamable(params, seq) {
            fixed[id as usize] = bytes > a;
        }
    }
    fixed
}

/// The bytes MIN with logical capacity `cap` loads in passes 2–5 of six from an empty
/// device, keeping every parameter larger than `above` once loaded.
pub(crate) fn simulated_bytes(
    params: &[ParamTraits],
    seq: &Sequence,
    cap: usize,
    above: Option<usize>,
) -> u64 {
    let n = seq.len() as u64;
    let size = |i: ParamId| params[i as usize].bytes;
    let traits = |i: ParamId| {
        let p = &params[i as usize];
        Traits {
            bytes: p.bytes,
            kept: p.keep || above.is_some_and(|a| p.bytes > a),
            priority: p.priority,
        }
    };
    let mut plan = Plan::new(seq, Vec::new(), cap, n - 1);
    let mut bytes = 0u64;
    while plan.pos + 1 < 7 * n {
        let m = plan.pos + 1;
        let id = seq.order()[(m % n) as usize];
        if id as usize >= params.len() {
            plan.skip();
            continue;
        }
        match plan.next(seq, size) {
            Step::Hit => plan.hit(seq),
            Step::Revive => plan.revive(seq, id, traits(id)),
            Step::Load { id, victims } => {
                if (2 * n..6 * n).contains(&m) {
                    bytes += size(id) as u64;
                }
                let v: Vec<(ParamId, usize)> = victims.iter().map(|v| (*v, size(*v))).collect();
                plan.load(seq, id, traits(id), &v);
                plan.zombies.clear();
            }
        }
    }
    bytes
}

/// The static planner's choice for `seq`: by id, its fixed set ([`fixed_set`], from the
/// parameters the sequence uses and the caller does not keep, in the budget less what
/// the caller keeps, on the device now or used by the sequence), and the logical cache's
/// capacity: those kept bytes and the fixed set's. Also returns how many parameters were
/// weighed.
pub(crate) fn static_choice(
    params: &[ParamTraits],
    seq: &Sequence,
    budget: usize,
    spare_slots: usize,
) -> (usize, Vec<bool>, usize) {
    let mut seen: FxHashMap<ParamId, (usize, usize)> = Default::default();
    for (at, id) in seq.order().iter().enumerate() {
        if (*id as usize) < params.len() {
            seen.entry(*id).or_insert((at, 0)).1 += 1;
        }
    }
    // One definition of what the caller's keeps take, for the set and for the capacity.
    let kept: usize = params
        .iter()
        .enumerate()
        .filter(|(i, p)| p.keep && (p.resident || seen.contains_key(&(*i as ParamId))))
        .map(|(_, p)| p.bytes)
        .sum();
    let cands: Vec<Candidate> = seen
        .iter()
        .filter(|(id, _)| !params[**id as usize].keep)
        .map(|(id, (at, uses))| Candidate {
            id: *id,
            bytes: params[*id as usize].bytes,
            at: *at,
            uses: *uses,
            priority: params[*id as usize].priority,
        })
        .collect();
    let chosen = fixed_set(&cands, budget.saturating_sub(kept), spare_slots);
    let mut fixed = vec![false; params.len()];
    let mut cap = kept;
    for id in &chosen {
        fixed[*id as usize] = true;
        cap += params[*id as usize].bytes;
    }
    (cap, fixed, cands.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::policy::min_misses_each_pass;

    fn param(bytes: usize) -> ParamTraits {
        ParamTraits {
            size: bytes,
            bytes,
            keep: false,
            priority: 0,
            resident: false,
        }
    }

    #[test]
    fn one_size_leaves_room_for_the_spares_and_keeps_nothing() {
        let params = vec![param(10); 8];
        let seq = Sequence::new((0..8).collect());
        assert_eq!(belady_choice(&params, &seq, 45, 1), (35, None));
        assert_eq!(belady_choice(&params, &seq, 45, 2), (25, None));
        assert_eq!(belady_fixed(&params, &seq, None), vec![false; 8]);
    }

    #[test]
    fn the_simulation_is_min_over_passes_two_to_five() {
        let order: Vec<ParamId> = (0..10).collect();
        let params = vec![param(1); 10];
        let seq = Sequence::new(order.clone());
        // Passes 2–5 of six from an empty device: MIN's passes 1..5 from empty.
        let min: usize = min_misses_each_pass(&order, 4, 6)[1..5].iter().sum();
        assert_eq!(simulated_bytes(&params, &seq, 4, None), min as u64);
    }

    #[test]
    fn mixed_sizes_keep_the_large_ones_when_that_loads_less() {
        // An embedding and a head of 40 around eight layers of 10, in a budget of 100:
        // room for a 40 leaves 60 (MIN over everything), keeping both 40s leaves 20 for
        // the layers, and the layers alone stream through a room of 10.
        let mut params = vec![param(40)];
        params.extend(vec![param(10); 8]);
        params.push(param(40));
        let seq = Sequence::new((0..10).collect());
        // The two choices: room for a 40 (cap 60, MIN over everything), or both 40s
        // kept and room for a 10 (cap 90).
        let streamed = simulated_bytes(&params, &seq, 60, None);
        let kept = simulated_bytes(&params, &seq, 90, Some(10));
        assert!(kept < streamed, "{kept} vs {streamed}");
        assert_eq!(belady_choice(&params, &seq, 100, 1), (90, Some(10)));
        let fixed = belady_fixed(&params, &seq, Some(10));
        assert!(fixed[0] && fixed[9] && !fixed[1..9].iter().any(|f| *f));
        // With room for only one 40 beside the rest, keeping both leaves none.
        assert_eq!(belady_choice(&params, &seq, 85, 1), (45, None));
    }

    #[test]
    fn the_digest_follows_sizes_and_hints_only() {
        let params = vec![param(10); 4];
        let seq = Sequence::new(vec![0, 1, 2, 3]);
        let d = belady_digest(&params, &seq);
        let mut resident = params.clone();
        resident[1].resident = true;
        assert_eq!(belady_digest(&resident, &seq), d);
        let mut kept = params.clone();
        kept[1].keep = true;
        assert_ne!(belady_digest(&kept, &seq), d);
        let mut urgent = params.clone();
        urgent[2].priority = 3;
        assert_ne!(belady_digest(&urgent, &seq), d);
        assert_ne!(belady_digest(&params, &Sequence::new(vec![0, 1, 3, 2])), d);
    }

    #[test]
    fn the_static_cache_holds_the_callers_keeps_and_the_fixed_set() {
        // Four layers of 10 and a kept 30 (resident, not in the sequence); budget 65:
        // 35 left, less room for one streamed layer, so two of the layers stay.
        let mut params = vec![param(10); 4];
        params.push(ParamTraits {
            keep: true,
            resident: true,
            ..param(30)
        });
        let seq = Sequence::new(vec![0, 1, 2, 3]);
        let (cap, fixed, weighed) = static_choice(&params, &seq, 65, 1);
        assert_eq!(weighed, 4);
        assert_eq!(fixed.iter().filter(|f| **f).count(), 2);
        assert!(!fixed[4], "the caller's keep is not the fixed set's");
        assert_eq!(cap, 30 + 2 * 10);
        // Neither resident nor used: the caller's keep takes nothing, and all four
        // layers fit (nothing left to stream needs no room).
        params[4].resident = false;
        let (cap, fixed, _) = static_choice(&params, &seq, 65, 1);
        assert_eq!((cap, fixed), (40, vec![true, true, true, true, false]));
    }
}
