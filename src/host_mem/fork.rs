//! Which process something was made in: a `pthread_atfork` child handler bumps a
//! process-wide generation, so that an [`Epoch`] taken before a `fork()` tells the child
//! apart from its parent with one relaxed load. Pools, pinned regions and the backends'
//! guard (`backend::fork::ForkGuarded`, whose module docs describe the whole fork story)
//! check it; and whether pinned regions are kept out of children at all.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Once, OnceLock};

use crate::error::{Error, Result};

/// Bumped in every child made by `fork()` once the handler is installed.
static GENERATION: AtomicU32 = AtomicU32::new(0);

/// The `pthread_atfork` child handler: runs in the child, single-threaded, before
/// `fork()` returns there. Only an atomic add: async-signal-safe.
extern "C" fn after_fork_in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
    // The parent's recording is not the child's (an atomic store).
    crate::profile::forked();
}

fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic and never unwinds
        // (`extern "C"`, no panic possible); the other two slots are empty. Handlers
        // stay registered for the life of the process, as this code does (a static).
        let rc = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        if rc != 0 {
            tracing::warn!(target: "hetmem", errno = rc,
                "pthread_atfork failed: a forked child will not be told apart from its parent");
        }
    });
}

/// The process generation and pid something was made in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Epoch {
    generation: u32,
    pid: u32,
}

impl Epoch {
    /// Now, in this process (installing the fork handler the first time).
    pub(crate) fn now() -> Epoch {
        install();
        Epoch {
            generation: GENERATION.load(Ordering::Relaxed),
            pid: std::process::id(),
        }
    }

    /// Whether this process is still the one the epoch was taken in (no fork since).
    /// Relaxed suffices: the handler runs on the child's only thread before `fork()`
    /// returns there, and threads the child starts later see it through their spawn.
    #[inline]
    pub(crate) fn is_current(self) -> bool {
        GENERATION.load(Ordering::Relaxed) == self.generation
    }

    /// `Err(Error::Forked)` when the process has forked since the epoch was taken and
    /// this is the child.
    #[inline]
    pub(crate) fn check(self) -> Result<()> {
        if self.is_current() {
            Ok(())
        } else {
            Err(self.forked())
        }
    }

    #[cold]
    #[inline(never)]
    fn forked(self) -> Error {
        Error::Forked {
            parent: self.pid,
            child: std::process::id(),
        }
    }
}

/// Whether pinned regions are kept out of forked children (`MADV_DONTFORK`): yes unless
/// `HETMEM_DONTFORK` is `0`, `off` or `false` (read once per process).
pub(crate) fn dontfork_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        let on = !matches!(
            std::env::var("HETMEM_DONTFORK").as_deref().map(str::trim),
            Ok("0" | "off" | "false")
        );
        if !on {
            tracing::info!(target: "hetmem",
                "HETMEM_DONTFORK=0: pinned memory is inherited (copied) by forked children");
        }
        on
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_is_current_until_the_generation_moves() {
        let e = Epoch::now();
        assert!(e.is_current());
        assert_eq!(e.check(), Ok(()));
        // What the child handler does, seen from an epoch of the "parent".
        let old = Epoch {
            generation: e.generation.wrapping_sub(1),
            pid: 1,
        };
        assert!(!old.is_current());
        assert_eq!(
            old.check(),
            Err(Error::Forked {
                parent: 1,
                child: std::process::id()
            })
        );
    }
}
