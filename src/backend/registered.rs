//! The host ranges a backend registered with its driver, one entry per registration
//! call, so that a copy can be split where one registration ends.
//!
//! A driver finds the pinned allocation a host pointer belongs to by its start; a copy
//! whose host range runs from one registration into the next (or from registered into
//! unregistered memory) is refused (`CUDA_ERROR_INVALID_VALUE`: "memory regions
//! spanning over allocations that are both registered and not registered ... are not
//! supported", CUDA driver docs; sglang saw the same for two adjacent registrations) or
//! falls back to the slow pageable path. hetmem registers large regions in several
//! pieces (threads register them in parallel, and one registration is capped at
//! [`HOST_REGISTER_CHUNK`](super::HOST_REGISTER_CHUNK)), so a copy of a whole region
//! must be cut at the pieces' edges. [`Registrations::piece`] says how far a copy may
//! run from an address before it crosses an edge.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

/// Registered host ranges, by start address. Read on every copy, written on register
/// and unregister.
#[derive(Debug, Default)]
pub(crate) struct Registrations {
    ranges: RwLock<BTreeMap<usize, usize>>,
}

impl Registrations {
    /// Records a registration of `len` bytes at `start`.
    pub(crate) fn insert(&self, start: usize, len: usize) {
        if len > 0 {
            self.write().insert(start, len);
        }
    }

    /// Forgets the registration that starts at `start`.
    pub(crate) fn remove(&self, start: usize) {
        self.write().remove(&start);
    }

    /// The registrations that start inside `start..start + len`, as `(start, len)`, in
    /// address order.
    pub(crate) fn within(&self, start: usize, len: usize) -> Vec<(usize, usize)> {
        let ranges = self.ranges.read().unwrap_or_else(PoisonError::into_inner);
        ranges
            .range(start..start.saturating_add(len))
            .map(|(&s, &n)| (s, n))
            .collect()
    }

    /// How many of the `len` bytes from `addr` a single copy may cover: up to the end of
    /// the registration that holds `addr`, or, when `addr` is in none, up to the start
    /// of the next one. `len` when the range crosses no edge (the common case).
    pub(crate) fn piece(&self, addr: usize, len: usize) -> usize {
        let ranges = self.ranges.read().unwrap_or_else(PoisonError::into_inner);
        if ranges.is_empty() {
            return len;
        }
        let end = addr.saturating_add(len);
        let edge = match ranges.range(..=addr).next_back() {
            Some((&start, &n)) if addr < start.saturating_add(n) => start.saturating_add(n),
            _ => ranges
                .range(addr.saturating_add(1)..)
                .next()
                .map_or(usize::MAX, |(&start, _)| start),
        };
        edge.min(end) - addr
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<usize, usize>> {
        // The map is consistent after every single insert or remove, so a panic in
        // another holder leaves nothing half-done.
        self.ranges.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Cuts a copy of `len` bytes into pieces that stay within one registration on each
/// side, calling `copy(offset, piece_len)` for each in order. `dst_host` / `src_host`
/// are the host addresses of the two sides (`None` for device memory).
pub(crate) fn for_each_piece<E>(
    regs: &Registrations,
    dst_host: Option<usize>,
    src_host: Option<usize>,
    len: usize,
    mut copy: impl FnMut(usize, usize) -> Result<(), E>,
) -> Result<(), E> {
    let mut off = 0;
    while off < len {
        let left = len - off;
        let mut n = left;
        if let Some(d) = dst_host {
            n = n.min(regs.piece(d + off, left));
        }
        if let Some(s) = src_host {
            n = n.min(regs.piece(s + off, left));
        }
        copy(off, n)?;
        off += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(
        regs: &Registrations,
        dst: Option<usize>,
        src: Option<usize>,
        len: usize,
    ) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for_each_piece::<()>(regs, dst, src, len, |o, n| {
            v.push((o, n));
            Ok(())
        })
        .unwrap();
        v
    }

    #[test]
    fn nothing_registered_is_one_piece() {
        let r = Registrations::default();
        assert_eq!(pieces(&r, Some(0x1000), None, 1 << 20), vec![(0, 1 << 20)]);
    }

    #[test]
    fn a_copy_inside_one_registration_is_one_piece() {
        let r = Registrations::default();
        r.insert(0x10000, 0x4000);
        assert_eq!(pieces(&r, None, Some(0x10000), 0x4000), vec![(0, 0x4000)]);
        assert_eq!(pieces(&r, None, Some(0x11000), 0x1000), vec![(0, 0x1000)]);
    }

    #[test]
    fn a_copy_is_cut_at_each_registration_edge() {
        let r = Registrations::default();
        // Three adjacent pieces of one region, as a parallel registration makes them.
        r.insert(0x10000, 0x4000);
        r.insert(0x14000, 0x4000);
        r.insert(0x18000, 0x2000);
        assert_eq!(
            pieces(&r, Some(0x12000), None, 0x7000),
            vec![(0, 0x2000), (0x2000, 0x4000), (0x6000, 0x1000)]
        );
        // The whole region: one piece per registration.
        assert_eq!(
            pieces(&r, None, Some(0x10000), 0xa000),
            vec![(0, 0x4000), (0x4000, 0x4000), (0x8000, 0x2000)]
        );
    }

    #[test]
    fn unregistered_memory_before_a_registration_is_its_own_piece() {
        let r = Registrations::default();
        r.insert(0x20000, 0x1000);
        assert_eq!(
            pieces(&r, Some(0x1f000), None, 0x3000),
            vec![(0, 0x1000), (0x1000, 0x1000), (0x2000, 0x1000)]
        );
    }

    #[test]
    fn both_sides_are_cut() {
        let r = Registrations::default();
        r.insert(0x10000, 0x3000);
        r.insert(0x13000, 0x3000);
        r.insert(0x40000, 0x1000);
        r.insert(0x41000, 0x5000);
        // dst edge at +0x1000, src edge at +0x2000.
        assert_eq!(
            pieces(&r, Some(0x40000), Some(0x11000), 0x4000),
            vec![(0, 0x1000), (0x1000, 0x1000), (0x2000, 0x2000)]
        );
    }

    #[test]
    fn within_lists_the_registrations_starting_in_a_range() {
        let r = Registrations::default();
        r.insert(0x10000, 0x4000);
        r.insert(0x14000, 0x4000);
        r.insert(0x20000, 0x1000);
        assert_eq!(
            r.within(0x10000, 0x8000),
            vec![(0x10000, 0x4000), (0x14000, 0x4000)]
        );
        assert_eq!(r.within(0x14000, 1), vec![(0x14000, 0x4000)]);
        assert_eq!(r.within(0x11000, 0x1000), vec![], "starts before the range");
        assert_eq!(r.within(0x18000, 0x8000), vec![], "ends at the next start");
        assert_eq!(r.within(usize::MAX - 1, 4), vec![], "no overflow");
    }

    #[test]
    fn removed_registrations_no_longer_cut() {
        let r = Registrations::default();
        r.insert(0x10000, 0x1000);
        r.insert(0x11000, 0x1000);
        r.remove(0x10000);
        r.remove(0x11000);
        assert_eq!(pieces(&r, Some(0x10000), None, 0x2000), vec![(0, 0x2000)]);
    }
}
