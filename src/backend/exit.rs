//! Work at process exit: the profiler's recording is finished by an `atexit` handler,
//! so that a program that never calls [`crate::profile::finish`] still leaves a
//! complete record.

use std::sync::Once;

/// The `atexit` handler: finishes the recording. `extern "C"`; a panic inside would
/// abort rather than unwind into libc, and `at_exit` logs instead of panicking.
extern "C" fn finish_profile() {
    crate::profile::at_exit();
}

/// Registers the handler once per process.
pub(crate) fn finish_profile_at_exit() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: registers a handler that takes no argument and never unwinds
        // (`extern "C"`); the function is a static of this library. In a library
        // loaded with dlopen, glibc runs it at dlclose (atexit records the DSO).
        let rc = unsafe { libc::atexit(finish_profile) };
        if rc != 0 {
            tracing::warn!(target: "hetmem", "atexit failed: the profile record may end without its end event");
        }
    });
}
