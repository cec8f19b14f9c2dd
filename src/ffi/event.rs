//! Events: markers in a stream that other streams and the host wait for, so that a C
//! caller can order its own work after hetmem's (an asynchronous copy) without
//! synchronising the stream.
//!
//! An event handle is a registry token like a stream's. It belongs to the manager and
//! device it was made for: recording it on a stream of another manager is
//! `HETMEM_ERR_FOREIGN_HANDLE`, on a stream of another device
//! `HETMEM_ERR_INVALID_ARGUMENT` (the drivers refuse it too). A stream may wait for an
//! event of another device of the same manager, as the drivers allow.

use std::ffi::c_int;

use super::memory::{FfiManager, FfiStream, HetmemManager, HetmemStream};
use super::{call, device_arg, lookup, out_ptr, register, unregister, write_out, FfiResult};
use crate::stream::Event;

/// Opaque C type of `hetmem_event_t*` handles (tokens, never dereferenced).
#[repr(C)]
pub struct HetmemEvent {
    _opaque: [u8; 0],
}

/// What an event handle owns.
#[derive(Debug)]
pub(crate) struct FfiEvent {
    pub(crate) event: Event,
}

fn event(ev: *mut HetmemEvent) -> FfiResult<std::sync::Arc<FfiEvent>> {
    lookup::<FfiEvent, _>(ev, "event")
}

fn stream(s: *mut HetmemStream) -> FfiResult<std::sync::Arc<FfiStream>> {
    lookup::<FfiStream, _>(s, "stream")
}

/// Creates an event on `device` of the manager, not yet recorded (until it is, it
/// counts as passed: queries say done, waits return at once). `*out` is the handle
/// (NULL on failure); destroy it with [`hetmem_event_destroy`].
///
/// # Safety
/// `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_event_create(
    mgr: *mut HetmemManager,
    device: c_int,
    out: *mut *mut HetmemEvent,
) -> c_int {
    call("hetmem_event_create", || {
        // Cleared before anything can fail, the handle's look-up included.
        let out = out_ptr(out, "out")?;
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(out, std::ptr::null_mut()) };
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        let event = m.mgr.create_event(device_arg(device, "device")?)?;
        let h = register::<FfiEvent, HetmemEvent>(FfiEvent { event });
        // SAFETY: as above.
        unsafe { write_out(out, h) };
        Ok(())
    })
}

/// Records `event` at the current tail of `stream` (a stream of the event's manager and
/// device): from now on it stands for the work queued there so far. An event may be
/// recorded again; waits queued before keep the point that was current then.
///
/// # Safety
/// `event` and `stream` may be any values: they are checked.
#[no_mangle]
pub unsafe extern "C" fn hetmem_event_record(
    event_h: *mut HetmemEvent,
    stream_h: *mut HetmemStream,
) -> c_int {
    call("hetmem_event_record", || {
        let e = event(event_h)?;
        let s = stream(stream_h)?;
        e.event.record(&s.stream)?;
        Ok(())
    })
}

/// Makes the work queued on `stream` from now on wait for `event` (its last recording;
/// none: no wait), without blocking the host. The event may be of another device of the
/// same manager.
///
/// # Safety
/// `stream` and `event` may be any values: they are checked.
#[no_mangle]
pub unsafe extern "C" fn hetmem_stream_wait_event(
    stream_h: *mut HetmemStream,
    event_h: *mut HetmemEvent,
) -> c_int {
    call("hetmem_stream_wait_event", || {
        let s = stream(stream_h)?;
        let e = event(event_h)?;
        s.stream.wait(&e.event)?;
        Ok(())
    })
}

/// `*done` = 1 if the work before the event's last recording is done (or it was never
/// recorded), else 0, without blocking.
///
/// # Safety
/// `done` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_event_query(event_h: *mut HetmemEvent, done: *mut c_int) -> c_int {
    call("hetmem_event_query", || {
        let e = event(event_h)?;
        let done = out_ptr(done, "done")?;
        let d = e.event.is_done()?;
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(done, c_int::from(d)) };
        Ok(())
    })
}

/// Blocks until the work before the event's last recording is done.
///
/// # Safety
/// `event` may be any value: it is checked.
#[no_mangle]
pub unsafe extern "C" fn hetmem_event_synchronize(event_h: *mut HetmemEvent) -> c_int {
    call("hetmem_event_synchronize", || {
        event(event_h)?.event.synchronize()?;
        Ok(())
    })
}

/// Destroys an event handle. Waits already queued on it are unaffected; the driver's
/// event goes once no call on another thread still uses it.
///
/// # Safety
/// `event` may be any value: it is checked.
#[no_mangle]
pub unsafe extern "C" fn hetmem_event_destroy(event_h: *mut HetmemEvent) -> c_int {
    call("hetmem_event_destroy", || {
        drop(unregister::<FfiEvent, _>(event_h, "event")?);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::c_void;

    use super::*;
    use crate::ffi::memory::{
        hetmem_alloc, hetmem_copy, hetmem_manager_create, hetmem_manager_destroy,
        hetmem_stream_create, hetmem_stream_destroy, HETMEM_DEVICE, HETMEM_PINNED,
    };
    use crate::ffi::{
        HETMEM_ERR_FOREIGN_HANDLE, HETMEM_ERR_INVALID_HANDLE, HETMEM_ERR_NULL_POINTER, HETMEM_OK,
    };

    fn manager() -> *mut HetmemManager {
        let mut m = std::ptr::null_mut();
        // SAFETY: a C string and a valid out-pointer.
        let rc = unsafe { hetmem_manager_create(c"sim".as_ptr(), &mut m) };
        assert_eq!(rc, HETMEM_OK);
        m
    }

    fn stream(m: *mut HetmemManager) -> *mut HetmemStream {
        let mut s = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        assert_eq!(unsafe { hetmem_stream_create(m, 0, &mut s) }, HETMEM_OK);
        s
    }

    fn event(m: *mut HetmemManager) -> *mut HetmemEvent {
        let mut e = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        assert_eq!(unsafe { hetmem_event_create(m, 0, &mut e) }, HETMEM_OK);
        e
    }

    /// A C caller's event orders stream b after the copy on stream a: on the simulator's
    /// clock b's tail moves to the end of the copy, with no stream synchronised.
    #[test]
    fn a_stream_waits_for_an_event_on_the_virtual_clock() {
        let m = manager();
        let (a, b) = (stream(m), stream(m));
        let ev = event(m);
        let n = 64usize << 20;
        let (mut src, mut dev): (*mut c_void, *mut c_void) =
            (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: valid out-pointers; the copy's addresses are the manager's buffers.
        unsafe {
            assert_eq!(hetmem_alloc(m, HETMEM_PINNED, -1, n, &mut src), HETMEM_OK);
            assert_eq!(hetmem_alloc(m, HETMEM_DEVICE, 0, n, &mut dev), HETMEM_OK);
            assert_eq!(hetmem_copy(m, dev, src, n, a), HETMEM_OK);
            assert_eq!(hetmem_event_record(ev, a), HETMEM_OK);
        }
        let mgr = lookup::<FfiManager, _>(m, "mgr").unwrap();
        let sim = mgr.mgr.sim().expect("the simulator");
        let handle = |s| lookup::<FfiStream, _>(s, "s").unwrap().stream.handle();
        let copy_end = sim.stream_time_ns(handle(a)).unwrap();
        let before = sim.stream_time_ns(handle(b)).unwrap();
        assert!(copy_end > sim.host_time_ns() && before < copy_end);
        let mut done = -1;
        // SAFETY: live handles and a valid out-pointer.
        unsafe {
            assert_eq!(hetmem_event_query(ev, &mut done), HETMEM_OK);
            assert_eq!(done, 0, "the copy has not ended on the clock");
            assert_eq!(hetmem_stream_wait_event(b, ev), HETMEM_OK);
        }
        assert_eq!(sim.stream_time_ns(handle(b)).unwrap(), copy_end, "b waited");
        let host_before = sim.host_time_ns();
        // SAFETY: a live handle.
        assert_eq!(unsafe { hetmem_event_synchronize(ev) }, HETMEM_OK);
        assert!(host_before < copy_end && sim.host_time_ns() >= copy_end);
        // SAFETY: live handles, destroyed once each; then dead.
        unsafe {
            assert_eq!(hetmem_event_query(ev, &mut done), HETMEM_OK);
            assert_eq!(done, 1);
            assert_eq!(hetmem_event_destroy(ev), HETMEM_OK);
            assert_eq!(hetmem_event_destroy(ev), HETMEM_ERR_INVALID_HANDLE);
            assert_eq!(hetmem_stream_wait_event(b, ev), HETMEM_ERR_INVALID_HANDLE);
            assert_eq!(hetmem_stream_destroy(a), HETMEM_OK);
            assert_eq!(hetmem_stream_destroy(b), HETMEM_OK);
            assert_eq!(hetmem_manager_destroy(m), HETMEM_OK);
        }
    }

    #[test]
    fn events_of_another_manager_and_dead_handles_are_refused() {
        let (m1, m2) = (manager(), manager());
        let (s1, s2) = (stream(m1), stream(m2));
        let (e1, e2) = (event(m1), event(m2));
        // SAFETY: every value is checked by the calls.
        unsafe {
            assert_eq!(hetmem_event_record(e1, s2), HETMEM_ERR_FOREIGN_HANDLE);
            assert_eq!(hetmem_stream_wait_event(s1, e2), HETMEM_ERR_FOREIGN_HANDLE);
            assert_eq!(hetmem_event_record(e1, s1), HETMEM_OK);
            assert_eq!(hetmem_stream_wait_event(s1, e1), HETMEM_OK);
            // Handles of another kind, made up, NULL.
            assert_eq!(
                hetmem_event_record(s1.cast(), s1),
                HETMEM_ERR_INVALID_HANDLE
            );
            assert_eq!(
                hetmem_event_synchronize(std::ptr::without_provenance_mut(0x5000)),
                HETMEM_ERR_INVALID_HANDLE
            );
            assert_eq!(
                hetmem_event_synchronize(std::ptr::null_mut()),
                HETMEM_ERR_NULL_POINTER
            );
            // An event outlives its manager.
            assert_eq!(hetmem_manager_destroy(m2), HETMEM_OK);
            assert_eq!(hetmem_event_synchronize(e2), HETMEM_OK);
            for e in [e1, e2] {
                assert_eq!(hetmem_event_destroy(e), HETMEM_OK);
            }
            for s in [s1, s2] {
                assert_eq!(hetmem_stream_destroy(s), HETMEM_OK);
            }
            assert_eq!(hetmem_manager_destroy(m1), HETMEM_OK);
        }
    }
}
