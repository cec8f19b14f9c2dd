//! Host registration with a driver, in one place: the pieces a range is registered in
//! ([`register_in_pieces`]: at most [`HOST_REGISTER_CHUNK`] each, smaller where the
//! driver refuses), the driver backends' register-and-roll-back loop
//! ([`PieceRegistrar`]) and the error of a rollback that failed
//! ([`RollbackError`]), and the record of the ranges a backend registered, one entry per
//! registration call, so that a copy can be split where one registration ends.
//!
//! A driver finds the pinned allocation a host pointer belongs to by its start; a copy
//! whose host range runs from one registration into the next (or from registered into
//! unregistered memory) is refused (`CUDA_ERROR_INVALID_VALUE`: "memory regions
//! spanning over allocations that are both registered and not registered ... are not
//! supported", CUDA driver docs; sglang saw the same for two adjacent registrations) or
//! falls back to the slow pageable path. hetmem registers large regions in several
//! pieces (threads register them in parallel, and one registration is capped at
//! [`HOST_REGISTER_CHUNK`]), so a copy of a whole region
//! must be cut at the pieces' edges. [`Registrations::piece`] says how far a copy may
//! run from an address before it crosses an edge.

use std::collections::BTreeMap;
use std::fmt;
use std::ptr::NonNull;
use std::sync::{PoisonError, RwLock};

use super::BackendKind;
use crate::error::Error;

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

/// How a driver backend names the [`Error::RegistrationLeaked`] of a host registration
/// that failed and could not be undone: [`RollbackError::CUDA`], [`RollbackError::ROCM`]
/// (their `call`s are `cuda::REGISTER_ROLLBACK_CALL` and `rocm::REGISTER_ROLLBACK_CALL`).
pub(crate) struct RollbackError {
    /// The backend that reports it.
    pub backend: BackendKind,
    /// The error's `call`.
    pub call: &'static str,
    /// The error's `code` when the failed unregistration was not a driver error.
    pub unknown_code: i32,
}

impl RollbackError {
    /// The driver backend `kind`'s ([`CUDA`](Self::CUDA) for every other kind).
    pub(crate) fn of(kind: BackendKind) -> &'static RollbackError {
        match kind {
            BackendKind::Rocm => &RollbackError::ROCM,
            _ => &RollbackError::CUDA,
        }
    }

    /// The CUDA backend's: `cuMemHostRegister(rollback)`, `CUDA_ERROR_UNKNOWN` when the
    /// failed unregistration was not a driver error.
    pub(crate) const CUDA: RollbackError = RollbackError {
        backend: BackendKind::Cuda,
        call: "cuMemHostRegister(rollback)",
        unknown_code: hetmem_sys::cuda::Status::UNKNOWN.0 as i32,
    };

    /// The ROCm backend's: `hipHostRegister(rollback)`, `hipErrorUnknown` when the
    /// failed unregistration was not a driver error.
    pub(crate) const ROCM: RollbackError = RollbackError {
        backend: BackendKind::Rocm,
        call: "hipHostRegister(rollback)",
        unknown_code: hetmem_sys::hip::hipErrorUnknown,
    };

    /// The error of registering `len` bytes at `ptr` failing with `cause` after
    /// `registered` bytes had registered, whose unregistration then failed with `undo`.
    /// Its `code` is `undo`'s; its message contains `"rollback failed; region leaked"`.
    pub(crate) fn error(
        &self,
        cause: &Error,
        undo: &Error,
        ptr: NonNull<u8>,
        len: usize,
        registered: usize,
    ) -> Error {
        let code = match undo {
            Error::Driver { code, .. } => *code,
            _ => self.unknown_code,
        };
        Error::RegistrationLeaked {
            backend: self.backend,
            call: self.call,
            code,
            message: format!(
                "registering {len} bytes at {ptr:?} failed ({cause}), and unregistering the \
                 {registered} bytes registered before the failure failed too ({undo}): \
                 rollback failed; region leaked: part of it stays registered, so the memory \
                 must not be unmapped"
            ),
        }
    }
}

/// Largest range registered with one host-registration call (`cuMemHostRegister`,
/// `hipHostRegister`). One registration of 512 GiB or more fails on current CUDA
/// drivers; registering in 64 GiB chunks (and unregistering the same chunks) stays well
/// below that, and nothing is lost by treating HIP the same.
pub(crate) const HOST_REGISTER_CHUNK: usize = 64 << 30;

/// The smallest piece [`register_in_pieces`] splits a refused registration into: below
/// this, a refusal is not about the size.
pub(crate) const HOST_REGISTER_MIN_PIECE: usize = 1 << 30;

/// Pieces split by [`register_in_pieces`] are whole multiples of this (2 MiB: huge
/// pages stay in one piece, and no two pieces share a page).
const REGISTER_SPLIT_ALIGN: usize = 2 << 20;

/// `(offset, len)` of the pieces of one host registration, in order.
pub(crate) type Pieces = Vec<(usize, usize)>;

/// How one registration call failed, for [`register_in_pieces`].
#[derive(Debug)]
pub(crate) enum Refusal<E> {
    /// Not a matter of the piece's size (out of memory, already registered): give up.
    Final(E),
    /// Maybe the piece's size: some hosts refuse one registration above about 96-128
    /// GiB with an invalid-argument error rather than out-of-memory.
    Size(E),
}

/// Registers `len` bytes through `register(offset, n)`, one call per piece, in order:
/// pieces of at most [`HOST_REGISTER_CHUNK`]. A piece refused with [`Refusal::Size`] is
/// tried again at half its size (whole 2 MiB), and later pieces are no larger, since
/// the limit is the host's; when half would be under [`HOST_REGISTER_MIN_PIECE`], the
/// registration fails with the first such refusal. [`Refusal::Final`] fails it at once
/// with its own error. Returns the pieces registered, `(offset, n)`; on failure the
/// error and the pieces registered before it, which the caller undoes.
pub(crate) fn register_in_pieces<E: fmt::Display>(
    len: usize,
    mut register: impl FnMut(usize, usize) -> std::result::Result<(), Refusal<E>>,
) -> std::result::Result<Pieces, (E, Pieces)> {
    let mut done = Vec::new();
    let mut limit = HOST_REGISTER_CHUNK;
    let mut first_refusal: Option<E> = None;
    let mut off = 0;
    while off < len {
        let n = limit.min(len - off);
        match register(off, n) {
            Ok(()) => {
                done.push((off, n));
                off += n;
            }
            Err(Refusal::Final(e)) => return Err((e, done)),
            Err(Refusal::Size(e)) => {
                let half = n / 2 / REGISTER_SPLIT_ALIGN * REGISTER_SPLIT_ALIGN;
                if half < HOST_REGISTER_MIN_PIECE {
                    return Err((first_refusal.unwrap_or(e), done));
                }
                tracing::debug!(offset = off, refused = n, next = half, error = %e,
                    "host registration refused; trying smaller pieces");
                first_refusal.get_or_insert(e);
                limit = half;
            }
        }
    }
    if let Some(e) = first_refusal {
        tracing::info!(len, pieces = done.len(), largest = limit, first_refusal = %e,
            "host memory registered in smaller pieces than asked: the driver refused larger ones");
    }
    Ok(done)
}

/// Whether a registration error says part of the range stayed registered (the
/// backend's rollback failed), so the memory must never be unmapped.
pub(crate) fn is_rollback_failure(e: &Error) -> bool {
    matches!(e, Error::RegistrationLeaked { .. })
}

/// What registering one piece gives: [`Refusal::Size`] when a smaller piece might pass.
pub(crate) type PieceResult = Result<(), Refusal<Error>>;

/// A driver backend's host registration, one piece at a time; the provided methods
/// register and unregister whole ranges in pieces, with rollback, the same way for
/// every driver.
pub(crate) trait PieceRegistrar: super::Backend {
    /// The record of this backend's registrations (copies are cut at their edges).
    fn registrations(&self) -> &Registrations;

    /// Registers the `n` bytes at `piece` with the driver (portable: for every device).
    /// `len` is the whole range's length, for errors.
    ///
    /// # Safety
    /// `piece..piece+n` is mapped host memory that the caller owns and keeps mapped
    /// until it is unregistered.
    unsafe fn register_piece(
        &self,
        piece: *mut u8,
        n: usize,
        len: usize,
    ) -> Result<(), Refusal<Error>>;

    /// Unregisters the registration that starts at `piece`.
    ///
    /// # Safety
    /// `piece` is the start of a registration [`register_piece`](Self::register_piece)
    /// made, and no queued work uses it.
    unsafe fn unregister_piece(&self, piece: *mut u8) -> Result<(), Error>;

    /// Registers `ptr..ptr+len` in pieces ([`register_in_pieces`]), each recorded as it
    /// succeeds. On failure the pieces registered are undone, so a failure leaves
    /// nothing behind; when that fails too, the error is the backend's [`RollbackError`], which
    /// tells the caller to leak the memory (part of it stays registered).
    ///
    /// # Safety
    /// As [`Backend::register_host`](super::Backend::register_host).
    unsafe fn register_pieces(&self, ptr: NonNull<u8>, len: usize) -> Result<(), Error> {
        let base = ptr.as_ptr();
        let registered = self.registrations();
        let outcome = register_in_pieces(len, |off, n| {
            let piece = base.wrapping_add(off);
            // SAFETY: off + n <= len, so the piece lies in the caller's range, which it
            // owns and keeps mapped (this function's contract).
            unsafe { self.register_piece(piece, n, len) }?;
            registered.insert(piece as usize, n);
            Ok(())
        });
        let (err, done) = match outcome {
            Ok(_) => return Ok(()),
            Err(failure) => failure,
        };
        let mut undo_error = None;
        for &(off, _) in &done {
            let piece = base.wrapping_add(off);
            // SAFETY: registered just above; nothing was queued on it yet.
            match unsafe { self.unregister_piece(piece) } {
                Ok(()) => registered.remove(piece as usize),
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        offset = off,
                        "rolling back a partial host registration failed; the region leaks"
                    );
                    undo_error.get_or_insert(e);
                }
            }
        }
        let registered_bytes = done.iter().map(|&(_, n)| n).sum();
        match undo_error {
            Some(undo) => {
                let rollback = RollbackError::of(self.kind());
                Err(rollback.error(&err, &undo, ptr, len, registered_bytes))
            }
            None => Err(err),
        }
    }

    /// Undoes the registrations recorded that start inside `ptr..ptr+len`, in order:
    /// exactly the pieces [`register_pieces`](Self::register_pieces) made, also when it
    /// had to split them. With none recorded there (a contract breach) it asks the
    /// driver once, at `ptr`, whose error then says so. Goes on past a failure and
    /// returns the first.
    ///
    /// # Safety
    /// As [`Backend::unregister_host`](super::Backend::unregister_host).
    unsafe fn unregister_pieces(&self, ptr: NonNull<u8>, len: usize) -> Result<(), Error> {
        let base = ptr.as_ptr();
        let registered = self.registrations();
        let mut starts: Vec<usize> = registered
            .within(base as usize, len)
            .into_iter()
            .map(|(start, _)| start)
            .collect();
        if starts.is_empty() {
            starts.push(base as usize);
        }
        let mut first_error = None;
        for start in starts {
            let offset = start - base as usize;
            // SAFETY: a recorded start inside the range the caller registered with us
            // and no longer uses (this function's contract), or `ptr` itself, which the
            // driver looks up and refuses when it is not registered.
            match unsafe { self.unregister_piece(base.wrapping_add(offset)) } {
                Ok(()) => registered.remove(start),
                Err(e) => {
                    tracing::warn!(error = %e, offset, "unregistering host memory");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
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

    /// A stand-in driver for `register_in_pieces`: refuses pieces above `limit` with
    /// `refusal`, records the calls.
    fn pieces_under(
        len: usize,
        limit: usize,
        refusal: fn(&'static str) -> Refusal<&'static str>,
    ) -> (
        std::result::Result<Pieces, (&'static str, Pieces)>,
        Vec<usize>,
    ) {
        let mut calls = Vec::new();
        let r = register_in_pieces(len, |_, n| {
            calls.push(n);
            if n > limit {
                Err(refusal("too large"))
            } else {
                Ok(())
            }
        });
        (r, calls)
    }

    #[test]
    fn refused_registrations_are_split_down_to_the_floor() {
        const GIB: usize = 1 << 30;
        // Nothing refused: 64 GiB pieces, as before.
        let (r, calls) = pieces_under(150 * GIB, usize::MAX, Refusal::Size);
        assert_eq!(
            r.unwrap(),
            vec![(0, 64 * GIB), (64 * GIB, 64 * GIB), (128 * GIB, 22 * GIB)]
        );
        assert_eq!(calls.len(), 3);
        // A host that refuses more than 20 GiB: 64 and 32 refused, then 16 GiB pieces
        // to the end (the limit stays), covering the range in order.
        let (r, calls) = pieces_under(150 * GIB, 20 * GIB, Refusal::Size);
        let pieces = r.unwrap();
        assert_eq!(&calls[..3], &[64 * GIB, 32 * GIB, 16 * GIB]);
        assert_eq!(calls.len(), 2 + pieces.len());
        assert_eq!(pieces.len(), 10, "9 x 16 GiB + 6 GiB");
        let mut next = 0;
        for &(off, n) in &pieces {
            assert_eq!(off, next);
            assert!(n <= 16 * GIB && n.is_multiple_of(REGISTER_SPLIT_ALIGN));
            next = off + n;
        }
        assert_eq!(next, 150 * GIB);
        // A tail refused is halved too, in whole 2 MiB.
        let (r, _) = pieces_under(3 * GIB + 4096, 2 * GIB, Refusal::Size);
        assert_eq!(
            r.unwrap(),
            vec![(0, 1536 << 20), (1536 << 20, 1536 << 20), (3 * GIB, 4096)]
        );
        // Below the floor the first refusal is the error; nothing was registered.
        let (r, calls) = pieces_under(8 * GIB, GIB / 2, Refusal::Size);
        assert_eq!(r.unwrap_err(), ("too large", vec![]));
        assert_eq!(calls, vec![8 * GIB, 4 * GIB, 2 * GIB, GIB]);
        // A piece smaller than the floor to begin with is not split at all.
        let (r, calls) = pieces_under(64 << 20, 0, Refusal::Size);
        assert!(r.is_err());
        assert_eq!(calls, vec![64 << 20]);
    }

    #[test]
    fn a_final_refusal_is_never_split() {
        const GIB: usize = 1 << 30;
        let (r, calls) = pieces_under(150 * GIB, 20 * GIB, Refusal::Final);
        assert_eq!(r.unwrap_err(), ("too large", vec![]));
        assert_eq!(calls, vec![64 * GIB], "one call, no retry");
        // Refused after some pieces registered: those are handed back for undoing.
        let mut calls = 0;
        let r = register_in_pieces(150 * GIB, |_, _| {
            calls += 1;
            if calls == 3 {
                Err(Refusal::Final("out of memory"))
            } else {
                Ok(())
            }
        });
        assert_eq!(
            r.unwrap_err(),
            ("out of memory", vec![(0, 64 * GIB), (64 * GIB, 64 * GIB)])
        );
    }

    #[test]
    fn only_a_failed_rollback_says_the_region_leaked() {
        let cause = Error::InvalidArgument("refused".into());
        let undo = Error::Driver {
            backend: BackendKind::Rocm,
            call: "hipHostUnregister",
            code: 1,
            message: "invalid argument".into(),
        };
        let p = NonNull::<u8>::dangling();
        for kind in [BackendKind::Cuda, BackendKind::Rocm] {
            let leaked = RollbackError::of(kind).error(&cause, &undo, p, 4096, 0);
            assert!(is_rollback_failure(&leaked), "{leaked:?}");
            assert!(
                matches!(leaked, Error::RegistrationLeaked { backend, code: 1, .. } if backend == kind)
            );
        }
        assert!(!is_rollback_failure(&undo));
        assert!(!is_rollback_failure(&cause));
    }
}
