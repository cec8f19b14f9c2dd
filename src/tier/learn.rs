//! Learning the execution sequence from the order of acquires
//! ([`crate::tier::SequenceHint::Learn`]).
//!
//! The first acquire recorded starts a pass; when its id comes round again, the ids in
//! between are installed as the sequence (the pass after the one learnt already
//! prefetches). That guess can be short: a tied embedding is used first and last
//! (`[0, 1, 2, 3, 0]`), so its second use looks like the next pass. The trace is kept
//! while a sequence is new, and an acquire that leaves it installs the shortest
//! longer period the whole trace still has (here 5). When none fits, the sequence is
//! dropped (LRU meanwhile) but the trace is kept, and the next guess waits until the
//! trace holds its period twice: a pass with a stretch that repeats inside it
//! (`[2, 2, 1, 1]`) is then learnt instead of guessed wrong forever. After a sequence
//! has held for [`CONFIRM_PASSES`] passes (of at least as many acquires as there are
//! parameters) the trace is let go, and a deviation drops it
//! and starts learning again at that acquire: the runtime changed what it runs.
//!
//! The trace is bounded: a first acquire that never comes round (a one-off warm-up) is
//! dropped from the front once the rest repeats, and past a length in proportion to
//! the parameters registered, learning starts again at the latest acquire.
//!
//! The store records an acquire before it knows whether the acquire succeeds and takes
//! it back ([`Learner::unobserve`]) when it fails, so that the caller's retry is seen
//! once: a failed acquire must neither drop the sequence nor appear twice in it.

use crate::tier::policy::ParamId;

/// Passes a learnt sequence must hold (the one it was learnt from included) before its
/// trace is let go; a pass counted as at least as many acquires as there are
/// parameters, so that a stretch repeating inside a pass (`[4, 4, 4, 3, 3, 3]` learnt as
/// `[4]`) is not taken for the pass.
pub(crate) const CONFIRM_PASSES: usize = 3;

/// What an acquire means for the sequence in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Learnt {
    /// Nothing changes: still learning, or following the sequence.
    Same,
    /// Install `order`, the step just run before this acquire being `order[pos]`.
    Install { order: Vec<ParamId>, pos: usize },
    /// The acquire left the sequence: drop it (learning starts again with this acquire).
    Drop,
}

/// The trace of acquires and the period learnt from it.
#[derive(Debug, Default)]
pub(crate) struct Learner {
    trace: Vec<ParamId>,
    /// The prefix function of `trace` (Knuth–Morris–Pratt): `pi[i]` is the longest
    /// proper prefix of `trace[..=i]` that is also its suffix, so `trace[..=i]` has the
    /// shortest period `i + 1 - pi[i]`. Kept as the trace grows: amortised O(1) a step.
    pi: Vec<usize>,
    /// The period of the sequence this learner installed, while it is in force.
    period: Option<usize>,
    /// The sequence held long enough: the trace is no longer kept.
    confirmed: bool,
    /// A guess failed since the trace began: the next is installed only once the trace
    /// holds its period twice. (A guess from a stretch that repeats inside the pass,
    /// `[3, 0, 3, 0]` or `[2, 2]`, holds once but not twice: from the trace's first id
    /// a stream periodic from there has only its true period once it holds it twice.)
    strict: bool,
    /// The last observe pushed onto `trace` (what `unobserve` takes back).
    pushed: bool,
}

impl Learner {
    /// Forgets everything (a sequence given by the runtime, or none).
    pub(crate) fn reset(&mut self) {
        *self = Learner::default();
    }

    /// A sequence of `len` steps given by the runtime is in force: followed until an
    /// acquire leaves it, then learning starts at that acquire.
    pub(crate) fn given(&mut self, len: usize) {
        *self = Learner {
            period: Some(len),
            confirmed: true,
            ..Learner::default()
        };
    }

    /// Records an acquire of `id`. `following`: a sequence this learner installed is in
    /// force and `id` is its next step. `params`: how many parameters are registered
    /// (it bounds the trace).
    pub(crate) fn observe(&mut self, id: ParamId, following: bool, params: usize) -> Learnt {
        self.pushed = false;
        match self.period {
            Some(p) if following => {
                if !self.confirmed {
                    self.push(id);
                    if self.trace.len() >= CONFIRM_PASSES * p.max(params) {
                        self.confirmed = true;
                        self.strict = false;
                        self.clear();
                    }
                }
                Learnt::Same
            }
            Some(_) if self.confirmed => {
                // The runtime changed what it runs: learn again from here.
                self.period = None;
                self.confirmed = false;
                self.strict = false;
                self.clear();
                self.push(id);
                Learnt::Drop
            }
            Some(_) => {
                // A guess. The whole trace may still have a longer period (the guess was
                // a stretch of the pass): install it at once.
                self.push(id);
                if let Some(l) = self.found() {
                    return l;
                }
                // Keep the trace: from its first id the stream may still be periodic,
                // and then the period shows once the trace holds it twice.
                self.period = None;
                self.strict = true;
                Learnt::Drop
            }
            None => {
                self.push(id);
                if let Some(l) = self.found() {
                    return l;
                }
                // Amortised: a one-off prefix (its first ids never come round) hides
                // the period; drop it at powers of two.
                let n = self.trace.len();
                if n >= 16 && n.is_power_of_two() {
                    let k = first_recurring(&self.trace);
                    if k > 0 {
                        let rest = self.trace.split_off(k);
                        self.clear();
                        for id in rest {
                            self.push(id);
                        }
                        if let Some(l) = self.found() {
                            return l;
                        }
                    }
                }
                if self.trace.len() > 16 * params + 64 {
                    // Not periodic from where the trace starts: start again here.
                    self.clear();
                    self.push(id);
                    self.strict = true;
                }
                Learnt::Same
            }
        }
    }

    /// Takes back the last [`Learner::observe`] (its acquire failed). A sequence it
    /// installed stays: the retry follows it.
    pub(crate) fn unobserve(&mut self) {
        if std::mem::take(&mut self.pushed) {
            self.trace.pop();
            self.pi.pop();
        }
    }

    fn clear(&mut self) {
        self.trace = Vec::new();
        self.pi = Vec::new();
    }

    fn push(&mut self, id: ParamId) {
        let mut k = self.pi.last().copied().unwrap_or(0);
        if !self.trace.is_empty() {
            while k > 0 && self.trace[k] != id {
                k = self.pi[k - 1];
            }
            if self.trace[k] == id {
                k += 1;
            }
        }
        self.trace.push(id);
        self.pi.push(k);
        self.pushed = true;
    }

    /// The trace's shortest period (its length when it has none shorter).
    fn shortest_period(&self) -> usize {
        self.trace.len() - self.pi.last().copied().unwrap_or(0)
    }

    /// While learning: the sequence to install, if the trace has a period (held twice
    /// when strict).
    fn found(&mut self) -> Option<Learnt> {
        let (n, q) = (self.trace.len(), self.shortest_period());
        let seen = if self.strict { 2 * q <= n } else { q < n };
        seen.then(|| self.install(q))
    }

    /// Installs the trace's first `q` steps; the trace ends with the acquire now.
    fn install(&mut self, q: usize) -> Learnt {
        self.period = Some(q);
        self.confirmed = false;
        let n = self.trace.len();
        Learnt::Install {
            order: self.trace[..q].to_vec(),
            pos: (n - 2) % q,
        }
    }
}

/// The first index whose id occurs again later in `s` (`s.len()` if none does).
fn first_recurring(s: &[ParamId]) -> usize {
    let mut later = rustc_hash::FxHashSet::default();
    let mut first = s.len();
    for (i, id) in s.iter().enumerate().rev() {
        if !later.insert(*id) {
            first = i;
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What feeding a learner a stream of acquires, as the store does, came to.
    #[derive(Debug)]
    struct Run {
        seq: Option<Vec<ParamId>>,
        installs: usize,
        drops: usize,
        /// Acquires since the last install or drop.
        settled_for: usize,
    }

    fn run(ids: &[ParamId], params: usize) -> Run {
        let mut l = Learner::default();
        // The sequence in force and the index of the step last run.
        let mut seq: Option<(Vec<ParamId>, usize)> = None;
        let mut r = Run {
            seq: None,
            installs: 0,
            drops: 0,
            settled_for: 0,
        };
        for &id in ids {
            let following = seq
                .as_ref()
                .is_some_and(|(o, at)| o[(at + 1) % o.len()] == id);
            r.settled_for += 1;
            match l.observe(id, following, params) {
                Learnt::Same => {
                    if let Some((o, at)) = &mut seq {
                        *at = (*at + 1) % o.len();
                    }
                }
                Learnt::Install { order, pos } => {
                    let at = (pos + 1) % order.len();
                    assert_eq!(order[at], id, "{order:?}: step {at} is this acquire");
                    seq = Some((order, at));
                    r.installs += 1;
                    r.settled_for = 0;
                }
                Learnt::Drop => {
                    seq = None;
                    r.drops += 1;
                    r.settled_for = 0;
                }
            }
            assert!(l.trace.len() <= 16 * params + 64, "trace {}", l.trace.len());
            assert_eq!(l.trace.len(), l.pi.len());
        }
        r.seq = seq.map(|(o, _)| o);
        r
    }

    fn passes(pass: &[ParamId], n: usize) -> Vec<ParamId> {
        pass.iter().copied().cycle().take(pass.len() * n).collect()
    }

    /// The shortest period of `s` by brute force (the model for the prefix function).
    fn period(s: &[ParamId]) -> usize {
        (1..=s.len())
            .find(|q| (*q..s.len()).all(|i| s[i] == s[i - q]))
            .unwrap_or(0)
    }

    #[test]
    fn a_loop_is_learnt_from_its_first_pass() {
        let r = run(&passes(&[0, 1, 2, 3], 5), 4);
        assert_eq!(r.seq, Some(vec![0, 1, 2, 3]));
        assert_eq!((r.installs, r.drops), (1, 0));
        assert_eq!(r.settled_for, 15, "installed at the first pass's end");
    }

    #[test]
    fn a_tied_weight_used_first_and_last_extends_the_guess() {
        let r = run(&passes(&[0, 1, 2, 3, 0], 6), 4);
        assert_eq!(r.seq, Some(vec![0, 1, 2, 3, 0]));
        assert_eq!(
            (r.installs, r.drops),
            (2, 0),
            "guessed [0,1,2,3], then extended"
        );
    }

    #[test]
    fn stretches_that_repeat_inside_the_pass_do_not_keep_it_from_being_learnt() {
        // Anchored anywhere, a guess from [0,1,2,0,1] or [3,0,3,0] fails; after the first
        // failure the period must be seen twice.
        for pass in [
            &[0, 1, 2, 0, 1, 3, 0, 3][..],
            &[2, 2, 1, 1],
            &[4, 4, 4, 3, 3, 3],
        ] {
            let n = pass.len();
            let r = run(&passes(pass, 12), 5);
            let seq = r.seq.clone().expect("learnt");
            assert_eq!(seq.len(), n);
            assert!(passes(pass, 3).windows(n).any(|w| w == seq.as_slice()));
            assert!(r.settled_for >= 4 * n, "{pass:?}: {r:?}");
        }
    }

    #[test]
    fn a_one_off_first_acquire_is_dropped_from_the_front() {
        let mut ids = vec![9];
        ids.extend(passes(&[0, 1, 2, 3, 4], 6));
        let r = run(&ids, 10);
        // Found at the trace's 16th entry, the sequence starting where the trace does.
        assert_eq!(r.seq, Some(vec![0, 1, 2, 3, 4]));
        assert_eq!((r.installs, r.drops), (1, 0));
    }

    #[test]
    fn a_changed_order_after_confirmation_drops_and_relearns_within_a_pass() {
        let mut ids = passes(&[0, 1, 2, 3], 4);
        ids.extend(passes(&[3, 2, 1, 0], 3));
        let r = run(&ids, 4);
        assert_eq!(r.seq, Some(vec![3, 2, 1, 0]));
        assert_eq!((r.installs, r.drops), (2, 1));
        assert_eq!(
            r.settled_for, 7,
            "installed when the new first id came round"
        );
    }

    #[test]
    fn a_trace_that_never_repeats_stays_bounded() {
        // 64 parameters acquired in an order with no period (each pass longer).
        let ids: Vec<ParamId> = (0..5000u32).map(|i| (i * i / 7) % 64).collect();
        let r = run(&ids, 64);
        assert!(r.installs >= r.drops);
    }

    #[test]
    fn a_failed_acquire_taken_back_is_seen_once() {
        let mut l = Learner::default();
        for id in [0, 1, 2, 3] {
            assert_eq!(l.observe(id, false, 4), Learnt::Same);
        }
        // The acquire closing the pass fails after installing: the retry follows.
        assert!(matches!(l.observe(0, false, 4), Learnt::Install { .. }));
        l.unobserve();
        assert_eq!(l.observe(0, true, 4), Learnt::Same);
        assert_eq!(l.trace, vec![0, 1, 2, 3, 0]);
        // A deviation from the guess that fails: its retry, with no sequence in force,
        // leaves the trace as one deviation would.
        assert_eq!(l.observe(2, false, 4), Learnt::Drop);
        l.unobserve();
        assert_eq!(l.trace, vec![0, 1, 2, 3, 0]);
        assert_eq!(l.observe(2, false, 4), Learnt::Same);
        assert_eq!(l.trace, vec![0, 1, 2, 3, 0, 2]);
        // From a confirmed sequence: the retry starts the trace as the deviation did.
        let mut l = Learner::default();
        for id in passes(&[0, 1], 3) {
            let following = l.period.is_some();
            l.observe(id, following, 2);
        }
        assert!(l.confirmed);
        assert_eq!(l.observe(1, false, 2), Learnt::Drop);
        l.unobserve();
        assert!(l.trace.is_empty());
        assert_eq!(l.observe(1, false, 2), Learnt::Same);
        assert_eq!(l.trace, vec![1]);
    }

    #[test]
    fn helpers() {
        assert_eq!(period(&[0, 1, 0, 1, 0]), 2);
        assert_eq!(first_recurring(&[7, 8, 0, 1, 0]), 2);
        assert_eq!(first_recurring(&[7, 8]), 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// The prefix function kept step by step gives every prefix's shortest period.
        #[test]
        fn the_trace_knows_its_shortest_period(s in proptest::collection::vec(0u32..3, 1..40)) {
            let mut l = Learner::default();
            for (i, id) in s.iter().enumerate() {
                l.push(*id);
                prop_assert_eq!(l.shortest_period(), period(&s[..=i]));
            }
            l.unobserve();
            prop_assert_eq!(l.shortest_period(), period(&s[..s.len() - 1]));
        }

        /// Any pass (ids may repeat), after a one-off prefix of ids it does not use, is
        /// learnt and then followed: a stretch of the repeated pass whose length is a
        /// multiple of the pass's shortest period, and no change for the last passes.
        #[test]
        fn any_pass_is_learnt(
            pass in proptest::collection::vec(0u32..5, 1..16),
            prefix in 0usize..3,
        ) {
            let mut ids: Vec<ParamId> = (100..100 + prefix as ParamId).collect();
            ids.extend(passes(&pass, 40));
            let r = run(&ids, 106);
            let seq = r.seq.clone().expect("a sequence is in force at the end");
            let q = period(&passes(&pass, 2));
            prop_assert_eq!(seq.len() % q, 0, "{:?} from {:?}", seq, pass);
            let many = passes(&pass, 2 + seq.len() / pass.len());
            prop_assert!(many.windows(seq.len()).any(|w| w == seq.as_slice()),
                "{:?} is not a stretch of {:?}", seq, pass);
            prop_assert!(r.settled_for >= 10 * pass.len(), "{:?} from {:?}", r, pass);
        }
    }
}
