//! A small futex lock for the large-block path, with explicit `lock`/`unlock` so that
//! the `pthread_atfork` handlers can hold it across `fork` (a child must not inherit it
//! held by a thread that does not exist there). It never allocates.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, Ordering};

/// A mutual-exclusion lock around a `T`.
pub struct Lock<T> {
    state: AtomicU32, // 0 free, 1 held, 2 held with waiters
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through `with`, under the lock.
unsafe impl<T: Send> Sync for Lock<T> {}

impl<T> Lock<T> {
    /// A free lock around `value`.
    pub const fn new(value: T) -> Self {
        Lock {
            state: AtomicU32::new(0),
            value: UnsafeCell::new(value),
        }
    }

    /// Takes the lock (spinning a little, then sleeping on the futex).
    pub fn lock(&self) {
        for _ in 0..64 {
            if self
                .state
                .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
            std::hint::spin_loop();
        }
        while self.state.swap(2, Ordering::Acquire) != 0 {
            // SAFETY: FUTEX_WAIT on our own atomic word; returns at once if it is not 2.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.state.as_ptr(),
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    2u32,
                    std::ptr::null::<libc::timespec>(),
                )
            };
        }
    }

    /// Releases the lock taken by [`lock`](Self::lock).
    pub fn unlock(&self) {
        if self.state.swap(0, Ordering::Release) == 2 {
            // SAFETY: FUTEX_WAKE on our own atomic word.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.state.as_ptr(),
                    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                    1u32,
                )
            };
        }
    }

    /// In a forked child: the lock is free (its holder, if any, was the forking
    /// thread's own prepare handler).
    pub fn reset_in_child(&self) {
        self.state.store(0, Ordering::Relaxed);
    }

    /// Runs `f` on the value under the lock.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        self.lock();
        struct Unlock<'a, T>(&'a Lock<T>);
        impl<T> Drop for Unlock<'_, T> {
            fn drop(&mut self) {
                self.0.unlock();
            }
        }
        let _unlock = Unlock(self);
        // SAFETY: the lock is held until `_unlock` drops, so this is the only reference.
        f(unsafe { &mut *self.value.get() })
    }
}
