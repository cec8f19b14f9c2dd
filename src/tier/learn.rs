//! Learning the execution sequence from the order of acquires
//! ([`crate::tier::SequenceHint::Learn`]).
//!
//! The first acquire recorded starts a pass; when its id comes round again, the ids in
//! between are installed as the sequence (the pass after the one learnt already
//! prefetches). That guess can be short: a tied embedding is used first and last
//! (`[0, 1, 2, 3, 0]`), so its second use looks like the next pass. The trace is kept
//! while a sequence is new, and the first acquire that leaves it installs the shortest
//! longer period the whole trace still has (here 5), once per trace. When none fits,
//! the sequence is dropped (LRU meanwhile) but the trace is kept, and the next guess
//! waits until the trace holds its period twice: a pass with a stretch that repeats
//! inside it (`[2, 2, 1, 1]`) is then learnt instead of guessed wrong forever. When the
//! extension fails too (a first pass that acquired something twice), learning starts
//! again at that acquire, also waiting for a period seen twice. After a sequence has
//! held for [`CONFIRM_PASSES`] passes (of at least as many acquires as there are
//! parameters) the trace is let go, and a deviation drops it and starts learning again
//! at that acquire: the runtime changed what it runs.
//!
//! A learnt sequence dropped soon after it was confirmed was likely a stretch of a
//! longer pass (a shared layer run twelve times): each such drop doubles what the next
//! confirmation needs, and the trace bound, up to 16 times.
//!
//! The trace is bounded (16 acquires a parameter, and 64, times that factor): past
//! that, learning starts again at the latest acquire. At powers of two, once the trace
//! is twice as long as a pass of its distinct ids, a first acquire that never comes
//! round (a one-off warm-up) is dropped from the front, and after a failed guess, an
//! older half is dropped where the newer half holds a period twice (the pass changed).
//!
//! The store records an acquire before it knows whether the acquire succeeds and takes
//! it back ([`Learner::unobserve`]) when it fails, so that the caller's retry is seen
//! once: a failed acquire must neither drop the sequence nor appear twice in it. An
//! acquire that waited while other threads' acquires came in takes its own record out
//! from behind theirs, but the sequence's cursor stays where their acquires left it,
//! so its retry may be taken for a step off the sequence.

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
    /// The guess in force extended a failed one. Only one extension per trace: a first
    /// pass with a glitch (an acquire twice) would otherwise grow the guess by a pass at
    /// every pass.
    extended: bool,
    /// Counts changes to the trace other than pushes: a [`Token`] from before one is
    /// stale.
    epoch: u64,
    /// Confirmed sequences this learner learnt that were dropped soon after (within the
    /// trace bound): each doubles the acquires to confirm and the trace bound, so that a
    /// stretch repeating inside a long pass (a shared layer run twelve times) stops
    /// being confirmed as the pass. At most 4; back to 0 once a sequence has held for the
    /// bound.
    patience: u32,
    /// The confirmed sequence was learnt here (not given).
    learnt: bool,
    /// Acquires followed since the sequence was confirmed.
    held: usize,
}

/// What [`Learner::unobserve`] needs to take one acquire's record back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    epoch: u64,
    at: usize,
    id: ParamId,
}

impl Learner {
    /// Forgets everything (a sequence given by the runtime, or none).
    pub(crate) fn reset(&mut self) {
        let epoch = self.epoch + 1;
        *self = Learner {
            epoch,
            patience: self.patience,
            ..Learner::default()
        };
    }

    /// A sequence of `len` steps given by the runtime is in force: followed until an
    /// acquire leaves it, then learning starts at that acquire.
    pub(crate) fn given(&mut self, len: usize) {
        self.reset();
        self.period = Some(len);
        self.confirmed = true;
    }

    /// The longest the trace may grow for `params` registered parameters.
    fn cap(&self, params: usize) -> usize {
        (16 * params + 64) << self.patience
    }

    /// Records an acquire of `id`. `following`: a sequence this learner installed is in
    /// force and `id` is its next step. `params`: how many parameters are registered
    /// (it bounds the trace). Returns what changes, and the token that takes the record
    /// back if the acquire fails (`None`: nothing was recorded).
    pub(crate) fn observe(
        &mut self,
        id: ParamId,
        following: bool,
        params: usize,
    ) -> (Learnt, Option<Token>) {
        let cap = self.cap(params);
        let learnt = match self.period {
            Some(p) if following => {
                if self.confirmed {
                    self.held += 1;
                    if self.held > cap {
                        self.patience = 0;
                    }
                    return (Learnt::Same, None);
                }
                self.push(id);
                let n = self.trace.len();
                if n >= (CONFIRM_PASSES * p.max(params)) << self.patience || n > cap {
                    self.confirmed = true;
                    self.learnt = true;
                    self.held = 0;
                    self.strict = false;
                    self.extended = false;
                    self.clear();
                    return (Learnt::Same, None);
                }
                Learnt::Same
            }
            Some(_) if self.confirmed => {
                // The runtime changed what it runs: learn again from here. Soon after
                // confirming what it learnt, more likely a stretch of a longer pass.
                if self.learnt && self.held <= cap {
                    self.patience = (self.patience + 1).min(4);
                }
                self.learnt = false;
                self.period = None;
                self.confirmed = false;
                self.strict = false;
                self.extended = false;
                self.clear();
                self.push(id);
                Learnt::Drop
            }
            Some(_) => {
                self.push(id);
                if !self.extended {
                    // The whole trace may still have a longer period (the guess was a
                    // stretch of the pass, as with a weight used first and last).
                    if let Some(l) = self.found() {
                        self.extended = true;
                        return self.token(l, id);
                    }
                    // Keep the trace: from its first id the stream may still be
                    // periodic, and then the period shows once the trace holds it twice.
                } else {
                    // The extension failed too: the trace's start is not the pass's.
                    self.clear();
                    self.push(id);
                }
                self.period = None;
                self.strict = true;
                self.extended = false;
                Learnt::Drop
            }
            None => {
                self.push(id);
                if let Some(l) = self.found() {
                    return self.token(l, id);
                }
                // Amortised, at powers of two, once the trace is twice as long as a pass
                // of its distinct ids would be (a pass that uses some many times is
                // longer: its first id comes round before the check): a one-off prefix
                // (its first ids never come round) hides the period, so drop it; after a
                // failed guess, a start that is not the pass's can (a pass that changed
                // once), so drop the older half.
                let n = self.trace.len();
                if n >= 16 && n.is_power_of_two() {
                    let (k, distinct) = first_recurring(&self.trace);
                    let cut = match (k > 0 && k < n, self.strict) {
                        (true, _) => k,
                        // Only where the newer half holds a period twice: a long pass
                        // (seen twice only in the whole trace) keeps its start.
                        (false, true) if holds_a_period_twice(&self.trace[n / 2..]) => n / 2,
                        _ => 0,
                    };
                    if n >= 2 * distinct + 16 && cut > 0 {
                        let rest = self.trace.split_off(cut);
                        self.clear();
                        for id in rest {
                            self.push(id);
                        }
                        if let Some(l) = self.found() {
                            return self.token(l, id);
                        }
                    }
                }
                if self.trace.len() > cap {
                    // Not periodic from where the trace starts: start again here.
                    self.clear();
                    self.push(id);
                    self.strict = true;
                }
                Learnt::Same
            }
        };
        self.token(learnt, id)
    }

    /// `learnt`, with the token of the record just pushed (the trace's last).
    fn token(&self, learnt: Learnt, id: ParamId) -> (Learnt, Option<Token>) {
        let at = self.trace.len().checked_sub(1);
        let token = at.map(|at| Token {
            epoch: self.epoch,
            at,
            id,
        });
        (learnt, token)
    }

    /// Takes back the record of an acquire that failed. A sequence its observe installed
    /// stays (the retry follows it). After other acquires were recorded, the record is
    /// taken out of the trace where the trace has not been rebuilt since; else it stays.
    pub(crate) fn unobserve(&mut self, token: Token) {
        if token.epoch != self.epoch || self.trace.get(token.at) != Some(&token.id) {
            return;
        }
        if token.at + 1 == self.trace.len() {
            self.trace.pop();
            self.pi.pop();
            return;
        }
        let rest = self.trace.split_off(token.at + 1);
        self.trace.pop();
        self.pi.truncate(token.at);
        for id in rest {
            self.push(id);
        }
        // The later records moved: their tokens are stale now.
        self.epoch += 1;
    }

    fn clear(&mut self) {
        self.trace = Vec::new();
        self.pi = Vec::new();
        self.epoch += 1;
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
    }

    /// The trace's shortest period (its length when it has none shorter).
    fn shortest_period(&self) -> usize {
        self.trace.len() - self.pi.last().copied().unwrap_or(0)
    }

    /// While learning: the sequence to install, if the trace has a period (held twice
    /// when strict).
    fn found(&mut self) -> Option<Learnt> {
        let (n, q) = (self.trace.len(), self.shortest_period());
        let seen = q > 0 && if self.strict { 2 * q <= n } else { q < n };
        seen.then(|| self.install(q))
    }

    /// Installs the trace's first `q` steps (`0 < q < trace.len()`); the trace ends with
    /// the acquire now.
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

/// Whether `s` is periodic with a period it holds at least twice (the prefix function,
/// computed afresh).
fn holds_a_period_twice(s: &[ParamId]) -> bool {
    let mut l = Learner::default();
    for id in s {
        l.push(*id);
    }
    let q = l.shortest_period();
    q > 0 && 2 * q <= s.len()
}

/// The first index whose id occurs again later in `s` (`s.len()` if none does), and
/// how many distinct ids `s` has.
fn first_recurring(s: &[ParamId]) -> (usize, usize) {
    let mut later = rustc_hash::FxHashSet::default();
    let mut first = s.len();
    for (i, id) in s.iter().enumerate().rev() {
        if !later.insert(*id) {
            first = i;
        }
    }
    (first, later.len())
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
            match l.observe(id, following, params).0 {
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
            assert!(
                l.trace.len() <= l.cap(params) + 1,
                "trace {}",
                l.trace.len()
            );
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
        ids.extend(passes(&[0, 1, 2, 3, 4], 10));
        let r = run(&ids, 10);
        // Found at the trace's 32nd entry (twice 6 distinct ids and 16), the sequence
        // starting where the trace does then.
        assert_eq!(r.seq, Some(vec![0, 1, 2, 3, 4]));
        assert_eq!((r.installs, r.drops), (1, 0));
        assert_eq!(r.settled_for, 51 - 32);
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
            assert_eq!(l.observe(id, false, 4).0, Learnt::Same);
        }
        // The acquire closing the pass fails after installing: the retry follows.
        let (learnt, token) = l.observe(0, false, 4);
        assert!(matches!(learnt, Learnt::Install { .. }));
        l.unobserve(token.unwrap());
        assert_eq!(l.observe(0, true, 4).0, Learnt::Same);
        assert_eq!(l.trace, vec![0, 1, 2, 3, 0]);
        // A deviation from the guess that fails: its retry, with no sequence in force,
        // leaves the trace as one deviation would.
        let (learnt, token) = l.observe(2, false, 4);
        assert_eq!(learnt, Learnt::Drop);
        l.unobserve(token.unwrap());
        assert_eq!(l.trace, vec![0, 1, 2, 3, 0]);
        assert_eq!(l.observe(2, false, 4).0, Learnt::Same);
        assert_eq!(l.trace, vec![0, 1, 2, 3, 0, 2]);
        // From a confirmed sequence: the retry starts the trace as the deviation did.
        let mut l = Learner::default();
        for id in passes(&[0, 1], 3) {
            let following = l.period.is_some();
            l.observe(id, following, 2);
        }
        assert!(l.confirmed);
        let (learnt, token) = l.observe(1, false, 2);
        assert_eq!(learnt, Learnt::Drop);
        l.unobserve(token.unwrap());
        assert!(l.trace.is_empty());
        assert_eq!(l.observe(1, false, 2).0, Learnt::Same);
        assert_eq!(l.trace, vec![1]);
    }

    #[test]
    fn a_failed_record_is_taken_out_from_behind_later_ones() {
        let mut l = Learner::default();
        for id in [0, 1] {
            l.observe(id, false, 4);
        }
        let (_, failed) = l.observe(2, false, 4);
        l.observe(1, false, 4); // another thread's, while the first waited
        l.unobserve(failed.unwrap());
        assert_eq!(l.trace, vec![0, 1, 1]);
        let q = period(&l.trace);
        assert_eq!(l.shortest_period(), q, "the prefix function was rebuilt");
        // A stale token (the trace was rebuilt since) takes nothing out.
        let (_, t) = l.observe(3, false, 4);
        l.clear();
        l.push(5);
        l.unobserve(t.unwrap());
        assert_eq!(l.trace, vec![5]);
    }

    #[test]
    fn long_loops_of_distinct_layers_are_learnt() {
        for n in [16u32, 40, 100] {
            let pass: Vec<ParamId> = (0..n).collect();
            let r = run(&passes(&pass, 6), n as usize);
            assert_eq!(r.seq, Some(pass), "{n} layers");
            assert_eq!((r.installs, r.drops), (1, 0), "{n} layers");
        }
    }

    #[test]
    fn a_shared_layer_of_many_tensors_is_not_taken_for_the_pass() {
        // ALBERT with a 16-tensor shared layer run 12 times: 196 steps over 24 parameters.
        let mut pass: Vec<ParamId> = vec![20, 21];
        for _ in 0..12 {
            pass.extend(0..16);
        }
        pass.extend([22, 23]);
        let r = run(&passes(&pass, 20), 24);
        assert_eq!(r.seq.as_ref().map(Vec::len), Some(pass.len()), "{r:?}");
        assert!(r.settled_for >= 8 * pass.len(), "{r:?}");
        // A stretch repeating past the confirmation, with no prefix at all.
        let r = run(&passes(&[1, 0, 1, 0, 1, 0, 0], 40), 2);
        assert_eq!(r.seq.as_ref().map(Vec::len), Some(7), "{r:?}");
    }

    #[test]
    fn a_pass_that_changed_once_before_confirmation_is_relearnt_in_a_few_passes() {
        let pass: Vec<ParamId> = (0..8).collect();
        let mut ids = pass.clone();
        ids.extend([0, 1, 2, 4, 3, 5, 6, 7]);
        ids.extend(passes(&pass, 30));
        let r = run(&ids, 8);
        assert_eq!(r.seq.as_ref().map(Vec::len), Some(8), "{r:?}");
        // Learnt again by the 64th acquire (8 passes), not at the trace bound (24 passes).
        assert!(r.settled_for >= ids.len() - 64, "{r:?}");
    }

    #[test]
    fn strict_learning_never_installs_an_empty_period() {
        let mut l = Learner {
            strict: true,
            ..Learner::default()
        };
        for id in 0..64 {
            l.observe(id, false, 20);
        }
    }

    #[test]
    fn a_glitch_in_the_first_pass_does_not_grow_the_sequence() {
        // The first pass acquires layer 7 twice.
        let mut ids: Vec<ParamId> = (0..8).collect();
        ids.push(7);
        ids.extend(passes(&(0..8).collect::<Vec<_>>(), 30));
        let r = run(&ids, 8);
        assert_eq!(r.seq.as_ref().map(Vec::len), Some(8), "{r:?}");
        assert!(r.settled_for >= 20 * 8, "{r:?}");
    }

    #[test]
    fn a_pass_much_longer_than_the_parameters_is_learnt() {
        // One layer applied twelve times (ALBERT): 26 steps over 4 parameters.
        let mut pass = vec![0];
        pass.extend(passes(&[1, 2], 12));
        pass.push(3);
        let r = run(&passes(&pass, 12), 4);
        assert_eq!(r.seq.as_ref().map(Vec::len), Some(26), "{r:?}");
        assert!(r.settled_for >= 4 * 26, "{r:?}");
    }

    #[test]
    fn helpers() {
        assert_eq!(period(&[0, 1, 0, 1, 0]), 2);
        assert_eq!(first_recurring(&[7, 8, 0, 1, 0]), (2, 4));
        assert_eq!(first_recurring(&[7, 8]), (2, 2));
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
            let at = s.len() - 1;
            l.unobserve(Token { epoch: l.epoch, at, id: s[at] });
            prop_assert_eq!(l.shortest_period(), period(&s[..at]));
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
            // Long enough for the prefix to be dropped (at 64 acquires at the latest).
            ids.extend(passes(&pass, 40.max(160 / pass.len())));
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
