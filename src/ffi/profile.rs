//! Profiling from C (and Python): `hetmem_profile_start`, `hetmem_profile_finish`, the
//! API side of `HETMEM_PROFILE` (see [`crate::profile`]).

use std::ffi::{c_char, c_int};

use super::{c_str, call, write_out};

/// Starts recording every event hetmem knows to the file `path` (`%p`: the process
/// id), with the stats page for `prof top`. One recording per process at a time.
///
/// Errors: `HETMEM_ERR_NULL_POINTER` (path), `HETMEM_ERR_INVALID_ARGUMENT` (not UTF-8),
/// `HETMEM_ERR_CONFIG` (a recording is on already, or the file cannot be made).
///
/// # Safety
/// `path` is NULL or a NUL-terminated string valid during the call.
#[no_mangle]
pub unsafe extern "C" fn hetmem_profile_start(path: *const c_char) -> c_int {
    call("hetmem_profile_start", || {
        // SAFETY: the caller's contract.
        let path = unsafe { c_str(path, "path") }?;
        crate::profile::start(crate::profile::ProfileConfig::new(path))?;
        Ok(())
    })
}

/// Stops recording: writes what is queued and the end event and closes the file.
/// `*events` and `*dropped` (each may be NULL) get the events written and lost. Nothing
/// recorded: both 0.
///
/// Errors: `HETMEM_ERR_CONFIG` (the writer thread did not finish the record).
///
/// # Safety
/// `events` and `dropped` are each NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_profile_finish(events: *mut usize, dropped: *mut usize) -> c_int {
    call("hetmem_profile_finish", || {
        let s = crate::profile::finish()?;
        if !events.is_null() {
            // SAFETY: non-null, and valid by the caller's contract.
            unsafe { write_out(events, s.events as usize) };
        }
        if !dropped.is_null() {
            // SAFETY: as above.
            unsafe { write_out(dropped, s.dropped as usize) };
        }
        Ok(())
    })
}
