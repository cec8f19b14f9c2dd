//! The simulator's [`Backend`] implementation. One `impl` of one trait (Rust keeps a
//! trait's methods in a single block), so this file is over 800 lines: each method is
//! the driver call it simulates, its checks, its cost on the clock and its capture
//! rules; the state it works on lives in the sibling modules.

use std::any::Any;
use std::collections::BTreeMap;
use std::ptr::NonNull;

use super::clock::{charge, Engine};
use super::memory::{
    bad_device_ptr, find_managed, mark_busy, out_of_addresses, place, DeviceAlloc, ManagedAlloc,
    Mapping, Memory, Physical, Reservation, DEVICE_ALIGN, VMM_GRANULARITY,
};
use super::streams::{
    capture_violation, event_ref, legacy_barrier, new_stream, ready_ns, refuse_during_capture,
    resolve_stream, stream_mut, stream_ref, wait_device, EventState, StreamKind, CAPTURED_EVENT,
    CAPTURE_ISOLATION, CAPTURE_MERGE, CAPTURE_UNSUPPORTED,
};
use super::{DriverCall, ManagedState, SimBackend};
use crate::backend::{
    check_copy_stream, check_device, check_vmm_size, special_handle, Backend, BackendKind,
    DeviceInfo, DevicePtr, EventHandle, HostKind, MemInfo, MemRef, PhysHandle, StreamHandle,
    LEGACY_STREAM, PER_THREAD_STREAM,
};
use crate::error::{Error, Result};
use crate::placement::{Advice, Location, MemKind};

impl Backend for SimBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Sim
    }

    fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    fn mem_info(&self, device: usize) -> Result<MemInfo> {
        check_device(self, device)?;
        let c = &self.used[device];
        Ok(MemInfo {
            free: c.free(),
            total: c.limit(),
        })
    }

    fn alloc_device(&self, device: usize, size: usize) -> Result<DevicePtr> {
        check_device(self, device)?;
        let oom = |free| Error::oom(MemKind::Device(device), size, free);
        self.used[device].try_reserve(size).map_err(oom)?;
        let Some(mem) = Memory::zeroed(size) else {
            self.used[device].release(size);
            // The simulated device had room but this host did not.
            return Err(oom(self.used[device].free()));
        };
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::MemAlloc, size);
        let Some(addr) = place(&mut st, device, size, DEVICE_ALIGN) else {
            drop(st);
            self.used[device].release(size);
            return Err(out_of_addresses(device, size));
        };
        st.device_allocs.insert(
            addr,
            DeviceAlloc {
                device,
                len: size,
                mem,
            },
        );
        Ok(DevicePtr(addr))
    }

    unsafe fn free_device(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        check_device(self, device)?;
        let mut st = self.lock();
        refuse_during_capture(&mut st, "free_device")?;
        match st.device_allocs.get(&ptr.0) {
            Some(a) if a.device == device && a.len == size => {
                // cuMemFree waits for the device's queued work before it frees.
                wait_device(&mut st, device);
                charge(&self.cfg, &mut st, DriverCall::MemFree, size);
                st.device_allocs.remove(&ptr.0);
                drop(st);
                self.used[device].release(size);
                Ok(())
            }
            _ => Err(bad_device_ptr(device, ptr)),
        }
    }

    fn alloc_managed(&self, device: usize, size: usize) -> Result<NonNull<u8>> {
        check_device(self, device)?;
        // Managed memory lives on the host until touched on the device; it counts
        // against the device as the driver's accounting does once it migrates, which
        // the simulator simplifies to counting it always.
        let oom = |free| Error::oom(MemKind::Managed(device), size, free);
        self.used[device].try_reserve(size).map_err(oom)?;
        let Some(mem) = Memory::zeroed(size) else {
            self.used[device].release(size);
            return Err(oom(self.used[device].free()));
        };
        let ptr = mem.ptr;
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::MemAlloc, size);
        st.managed.insert(
            ptr.as_ptr() as usize,
            ManagedAlloc {
                device,
                len: size,
                mem,
                state: ManagedState {
                    location: Location::Host,
                    read_mostly: false,
                    preferred: None,
                    accessed_by: Vec::new(),
                },
            },
        );
        Ok(ptr)
    }

    unsafe fn free_managed(&self, device: usize, ptr: NonNull<u8>, size: usize) -> Result<()> {
        let mut st = self.lock();
        let key = ptr.as_ptr() as usize;
        match st.managed.get(&key) {
            Some(m) if m.device == device && m.len == size => {
                wait_device(&mut st, device);
                charge(&self.cfg, &mut st, DriverCall::MemFree, size);
                let m = st.managed.remove(&key).expect("checked above");
                drop(st);
                drop(m.mem);
                self.used[device].release(size);
                Ok(())
            }
            _ => Err(Error::InvalidArgument(format!(
                "{key:#x} is not a live managed allocation of {size} bytes on sim device {device}"
            ))),
        }
    }

    unsafe fn register_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        let p = ptr.as_ptr() as usize;
        let mut st = self.lock();
        let overlaps = st
            .registered
            .range(..p + len)
            .next_back()
            .is_some_and(|(s, l)| s + l > p);
        if overlaps {
            return Err(Error::InvalidArgument(format!(
                "host range {p:#x}+{len} is already registered"
            )));
        }
        charge(&self.cfg, &mut st, DriverCall::HostRegister, len);
        st.registered.insert(p, len);
        Ok(())
    }

    unsafe fn unregister_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        let p = ptr.as_ptr() as usize;
        let mut st = self.lock();
        match st.registered.get(&p) {
            Some(l) if *l == len => {
                charge(&self.cfg, &mut st, DriverCall::HostUnregister, len);
                st.registered.remove(&p);
                Ok(())
            }
            _ => Err(Error::InvalidArgument(format!(
                "host range {p:#x}+{len} is not registered"
            ))),
        }
    }

    fn create_stream(&self, device: usize) -> Result<StreamHandle> {
        check_device(self, device)?;
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::StreamCreate, 0);
        Ok(StreamHandle(new_stream(
            &mut st,
            device,
            StreamKind::NonBlocking,
        )))
    }

    unsafe fn destroy_stream(&self, stream: StreamHandle) -> Result<()> {
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::StreamDestroy, 0);
        st.streams
            .remove(&stream.0)
            .map(|_| ())
            .ok_or(Error::UnknownHandle {
                what: "sim stream",
                handle: stream.0,
            })
    }

    /// Raw handles 0 and 1 are the device's legacy default stream, a sim stream made on
    /// first use and kept for the life of the backend, ordered against the per-thread
    /// streams as CUDA orders it against blocking streams; 2 is the per-thread default
    /// stream: one handle, and every call with it acts on the calling thread's own
    /// stream of the device (made at its first use). Any other raw handle must be a live
    /// sim stream of `device` (the sim checks every handle, so a bad one is an error
    /// here or at its use, never undefined behaviour).
    unsafe fn import_stream(&self, device: usize, raw: u64) -> Result<StreamHandle> {
        check_device(self, device)?;
        let mut st = self.lock();
        if raw == 0 || raw == LEGACY_STREAM {
            if let Some(h) = st.default_streams.get(&device) {
                return Ok(StreamHandle(*h));
            }
            let h = new_stream(&mut st, device, StreamKind::Legacy);
            st.default_streams.insert(device, h);
            return Ok(StreamHandle(h));
        }
        if raw == PER_THREAD_STREAM {
            return Ok(special_handle(device, raw));
        }
        let owner = stream_ref(&st, StreamHandle(raw))?.device;
        if owner != device {
            return Err(Error::InvalidArgument(format!(
                "sim stream {raw} belongs to device {owner}, not device {device}"
            )));
        }
        Ok(StreamHandle(raw))
    }

    /// Nothing to undo: imports take no reference.
    unsafe fn forget_stream(&self, _stream: StreamHandle) -> Result<()> {
        Ok(())
    }

    unsafe fn synchronize_stream(&self, stream: StreamHandle) -> Result<()> {
        let mut st = self.lock();
        let stream = resolve_stream(&mut st, stream);
        if let Some(c) = stream_ref(&st, stream)?.capture {
            return Err(capture_violation(
                &mut st,
                &[c],
                "synchronize_stream",
                CAPTURE_UNSUPPORTED,
                "synchronising a capturing stream",
            ));
        }
        let s = stream_ref(&st, stream)?;
        // The legacy stream's synchronisation waits for the blocking streams too.
        let t = match s.kind {
            StreamKind::Legacy => legacy_barrier(&st, s.device),
            _ => s.tail_ns,
        };
        st.host_ns = st.host_ns.max(t);
        Ok(())
    }

    fn create_event(&self, device: usize) -> Result<EventHandle> {
        check_device(self, device)?;
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::EventCreate, 0);
        let h = st.next_handle;
        st.next_handle += 1;
        st.events.insert(
            h,
            EventState {
                device,
                time_ns: None,
                captured: None,
            },
        );
        Ok(EventHandle(h))
    }

    unsafe fn destroy_event(&self, event: EventHandle) -> Result<()> {
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::EventDestroy, 0);
        st.events
            .remove(&event.0)
            .map(|_| ())
            .ok_or(Error::UnknownHandle {
                what: "sim event",
                handle: event.0,
            })
    }

    unsafe fn record_event(&self, event: EventHandle, stream: StreamHandle) -> Result<()> {
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::EventRecord, 0);
        let stream = resolve_stream(&mut st, stream);
        let sdev = stream_ref(&st, stream)?.device;
        let capture = stream_ref(&st, stream)?.capture;
        let t = ready_ns(&st, stream)?.max(st.host_ns);
        let e = st.events.get_mut(&event.0).ok_or(Error::UnknownHandle {
            what: "sim event",
            handle: event.0,
        })?;
        if e.device != sdev {
            return Err(Error::InvalidArgument(format!(
                "event of device {} recorded on a stream of device {sdev}",
                e.device
            )));
        }
        // A recording in a capture is a node of the graph: it marks no time.
        e.captured = capture;
        if capture.is_none() {
            e.time_ns = Some(t);
        }
        Ok(())
    }

    unsafe fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()> {
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::StreamWait, 0);
        let stream = resolve_stream(&mut st, stream);
        let e = event_ref(&st, event)?;
        let (t, captured) = (e.time_ns.unwrap_or(0), e.captured);
        let waiter = stream_ref(&st, stream)?.capture;
        match (waiter, captured) {
            (None, None) => {}
            (Some(w), None) => {
                return Err(capture_violation(
                    &mut st,
                    &[w],
                    "stream_wait_event",
                    CAPTURE_ISOLATION,
                    "a capturing stream waiting for an event recorded outside the capture",
                ))
            }
            (Some(w), Some(c)) if w == c => return Ok(()), // an edge of the graph
            (Some(w), Some(c)) => {
                return Err(capture_violation(
                    &mut st,
                    &[w, c],
                    "stream_wait_event",
                    CAPTURE_MERGE,
                    "waiting for an event of another capture",
                ))
            }
            (None, Some(c)) => {
                if !st.captures.contains_key(&c) {
                    return Err(capture_violation(
                        &mut st,
                        &[],
                        "stream_wait_event",
                        CAPTURED_EVENT,
                        "waiting for an event last recorded in a capture that has ended",
                    ));
                }
                // The waiter joins the capture, as a CUDA stream does (a fork).
                st.stats.capture_joins += 1;
                stream_mut(&mut st, stream)?.capture = Some(c);
                return Ok(());
            }
        }
        let ready = ready_ns(&st, stream)?;
        let s = stream_mut(&mut st, stream)?;
        s.tail_ns = ready.max(t);
        Ok(())
    }

    unsafe fn synchronize_event(&self, event: EventHandle) -> Result<()> {
        let mut st = self.lock();
        if let Some(c) = event_ref(&st, event)?.captured {
            return Err(capture_violation(
                &mut st,
                &[c],
                "synchronize_event",
                CAPTURED_EVENT,
                "synchronising an event recorded in a capture",
            ));
        }
        let t = event_ref(&st, event)?.time_ns.unwrap_or(0);
        st.host_ns = st.host_ns.max(t);
        Ok(())
    }

    unsafe fn event_done(&self, event: EventHandle) -> Result<bool> {
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::EventQuery, 0);
        if let Some(c) = event_ref(&st, event)?.captured {
            return Err(capture_violation(
                &mut st,
                &[c],
                "event_done",
                CAPTURED_EVENT,
                "querying an event recorded in a capture",
            ));
        }
        Ok(event_ref(&st, event)?.time_ns.unwrap_or(0) <= st.host_ns)
    }

    unsafe fn is_capturing(&self, stream: StreamHandle) -> Result<bool> {
        // Not charged: the question is answered from the driver's host-side state.
        let mut st = self.lock();
        let stream = resolve_stream(&mut st, stream);
        Ok(stream_ref(&st, stream)?.capture.is_some())
    }

    fn synchronize_device(&self, device: usize) -> Result<()> {
        check_device(self, device)?;
        let mut st = self.lock();
        let capturing: Vec<u64> = st
            .streams
            .values()
            .filter(|s| s.device == device)
            .filter_map(|s| s.capture)
            .collect();
        if !capturing.is_empty() {
            return Err(capture_violation(
                &mut st,
                &capturing,
                "synchronize_device",
                CAPTURE_UNSUPPORTED,
                "synchronising a device with a capturing stream",
            ));
        }
        wait_device(&mut st, device);
        Ok(())
    }

    unsafe fn copy(
        &self,
        dst: MemRef,
        src: MemRef,
        len: usize,
        stream: Option<StreamHandle>,
    ) -> Result<()> {
        let mut st = self.lock();
        let stream = stream.map(|s| resolve_stream(&mut st, s));
        let d = Self::resolve(&st, dst, len)?;
        let s = Self::resolve(&st, src, len)?;
        // Which engine and how fast: the device side picks the engine, the host side's
        // kind picks the speed.
        let (device, engine, gbps, pageable) = match (dst, src) {
            (MemRef::Device { device, .. }, MemRef::Host { ptr, kind }) => {
                let k = Self::host_kind(&st, ptr, len, kind);
                let pageable = k == HostKind::Pageable;
                let g = if pageable {
                    self.cfg.pageable_gbps
                } else {
                    self.cfg.h2d_gbps
                };
                (Some(device), Engine::H2D, g, pageable)
            }
            (MemRef::Host { ptr, kind }, MemRef::Device { device, .. }) => {
                let k = Self::host_kind(&st, ptr, len, kind);
                let pageable = k == HostKind::Pageable;
                let g = if pageable {
                    self.cfg.pageable_gbps
                } else {
                    self.cfg.d2h_gbps
                };
                (Some(device), Engine::D2H, g, pageable)
            }
            (MemRef::Device { device, .. }, MemRef::Device { .. }) => {
                (Some(device), Engine::Compute, self.cfg.d2d_gbps, false)
            }
            (MemRef::Host { .. }, MemRef::Host { .. }) => (None, Engine::Compute, 0.0, true),
        };
        if let Some(sh) = stream {
            let s = stream_ref(&st, sh)?;
            check_copy_stream(&dst, &src, s.device)?;
            if s.capture.is_some() {
                // Recorded into the graph, not run: nothing moves now.
                st.stats.captured_work += 1;
                return Ok(());
            }
        }
        if engine == Engine::D2H && st.fail_d2h > 0 {
            st.fail_d2h -= 1;
            return Err(Error::Driver {
                backend: BackendKind::Sim,
                call: "copy",
                code: -1,
                message: "a fault injected by fail_next_d2h_copies".into(),
            });
        }
        // SAFETY: both ranges were resolved to live memory of at least `len` bytes (device
        // side) or are valid by the caller's contract (host side); they do not overlap
        // by the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(s, d, len) };
        if engine == Engine::H2D && len > 0 && st.corrupt_h2d > 0 {
            st.corrupt_h2d -= 1;
            // SAFETY: `d` was resolved above to live device memory of `len` ≥ 1 bytes.
            unsafe { *d = !*d };
        }

        let stats = &mut st.stats;
        stats.copies += 1;
        match engine {
            Engine::H2D => stats.h2d_bytes += len as u64,
            Engine::D2H => stats.d2h_bytes += len as u64,
            Engine::Compute if device.is_some() => stats.d2d_bytes += len as u64,
            Engine::Compute => stats.h2h_bytes += len as u64,
        }
        let Some(device) = device else {
            return Ok(()); // host to host: a CPU memcpy, outside the device clock
        };
        let dur = self.copy_ns(len, gbps);
        let host = st.host_ns;
        let ready = match stream {
            Some(sh) => ready_ns(&st, sh)?.max(host),
            // Ordered as cuMemcpy is: after the legacy stream's work and, by its rule,
            // the blocking streams' (not after the non-blocking ones').
            None => legacy_barrier(&st, device).max(host),
        };
        let eng = &mut st.engines[device];
        let timeline = match engine {
            Engine::H2D => &mut eng.h2d,
            Engine::D2H => &mut eng.d2h,
            Engine::Compute => &mut eng.compute,
        };
        let (_, end) = timeline.place(ready, dur, host);
        mark_busy(&mut st, dst, len, end);
        mark_busy(&mut st, src, len, end);
        match stream {
            // Pageable copies are staged by the driver through its own pinned buffer and
            // return only when done, so they block the host even on a stream.
            Some(sh) => {
                stream_mut(&mut st, sh)?.tail_ns = end;
                if pageable {
                    st.host_ns = end;
                }
            }
            None => st.host_ns = end,
        }
        Ok(())
    }

    unsafe fn prefetch(
        &self,
        ptr: NonNull<u8>,
        len: usize,
        to: Location,
        stream: StreamHandle,
    ) -> Result<()> {
        let mut st = self.lock();
        let p = ptr.as_ptr() as usize;
        if let Location::Device(d) = to {
            check_device(self, d)?;
        }
        let from = match find_managed(&st, p, len) {
            Some(m) => m.state.location,
            None => {
                return Err(Error::InvalidArgument(format!(
                    "{p:#x}+{len} is not inside a managed allocation"
                )))
            }
        };
        let moved = if from == to { 0 } else { len };
        let gbps = match to {
            Location::Device(_) => self.cfg.h2d_gbps,
            Location::Host => self.cfg.d2h_gbps,
        };
        let dur = self.copy_ns(moved, gbps);
        let host = st.host_ns;
        let stream = resolve_stream(&mut st, stream);
        let sdev = stream_ref(&st, stream)?.device;
        let ready = ready_ns(&st, stream)?.max(host);
        // A migration is a copy: it occupies the copy engine of its direction.
        let eng = &mut st.engines[sdev];
        let timeline = match to {
            Location::Device(_) => &mut eng.h2d,
            Location::Host => &mut eng.d2h,
        };
        let (_, end) = timeline.place(ready, dur, host);
        stream_mut(&mut st, stream)?.tail_ns = end;
        st.stats.prefetch_bytes += moved as u64;
        let key = *st.managed.range(..=p).next_back().expect("found above").0;
        st.managed
            .get_mut(&key)
            .expect("found above")
            .state
            .location = to;
        Ok(())
    }

    unsafe fn advise(&self, ptr: NonNull<u8>, len: usize, advice: Advice) -> Result<()> {
        let p = ptr.as_ptr() as usize;
        let check = |l: Location| match l {
            Location::Device(d) => check_device(self, d),
            Location::Host => Ok(()),
        };
        match advice {
            Advice::SetPreferredLocation(l) => check(l)?,
            Advice::SetAccessedBy(d) | Advice::UnsetAccessedBy(d) => check_device(self, d)?,
            _ => {}
        }
        let mut st = self.lock();
        if find_managed(&st, p, len).is_none() {
            return Err(Error::InvalidArgument(format!(
                "{p:#x}+{len} is not inside a managed allocation"
            )));
        }
        let key = *st.managed.range(..=p).next_back().expect("found above").0;
        let s = &mut st.managed.get_mut(&key).expect("found above").state;
        match advice {
            Advice::SetReadMostly => s.read_mostly = true,
            Advice::UnsetReadMostly => s.read_mostly = false,
            Advice::SetPreferredLocation(l) => s.preferred = Some(l),
            Advice::UnsetPreferredLocation => s.preferred = None,
            Advice::SetAccessedBy(d) => {
                if !s.accessed_by.contains(&d) {
                    s.accessed_by.push(d);
                }
            }
            Advice::UnsetAccessedBy(d) => s.accessed_by.retain(|x| *x != d),
        }
        Ok(())
    }

    fn vmm_granularity(&self, device: usize) -> Option<usize> {
        check_device(self, device).ok().map(|()| VMM_GRANULARITY)
    }

    fn reserve_address(&self, device: usize, size: usize) -> Result<DevicePtr> {
        check_device(self, device)?;
        check_vmm_size("reservation", size, VMM_GRANULARITY)?;
        // Untouched pages cost only address space, so reservations can be large.
        let host =
            Memory::zeroed(size).ok_or_else(|| Error::os("mmap", nix::errno::Errno::last()))?;
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::Reserve, size);
        let Some(addr) = place(&mut st, device, size, VMM_GRANULARITY as u64) else {
            // `host` is unmapped as it drops here.
            return Err(out_of_addresses(device, size));
        };
        st.reservations.insert(
            addr,
            Reservation {
                device,
                size,
                host,
                mapped: BTreeMap::new(),
            },
        );
        Ok(DevicePtr(addr))
    }

    unsafe fn free_address(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        let mut st = self.lock();
        refuse_during_capture(&mut st, "free_address")?;
        match st.reservations.get(&ptr.0) {
            Some(r) if r.device == device && r.size == size && r.mapped.is_empty() => {
                charge(&self.cfg, &mut st, DriverCall::AddressFree, size);
                // Dropping the reservation unmaps its host memory.
                st.reservations.remove(&ptr.0);
                Ok(())
            }
            Some(r) if !r.mapped.is_empty() => Err(Error::InvalidArgument(format!(
                "reservation {:#x} still has {} mapping(s)",
                ptr.0,
                r.mapped.len()
            ))),
            _ => Err(Error::InvalidArgument(format!(
                "{:#x}+{size} is not a reservation of sim device {device}",
                ptr.0
            ))),
        }
    }

    fn create_physical(&self, device: usize, size: usize) -> Result<PhysHandle> {
        check_device(self, device)?;
        check_vmm_size("physical allocation", size, VMM_GRANULARITY)?;
        self.used[device]
            .try_reserve(size)
            .map_err(|free| Error::oom(MemKind::Device(device), size, free))?;
        let mut st = self.lock();
        charge(&self.cfg, &mut st, DriverCall::Create, size);
        let h = st.next_handle;
        st.next_handle += 1;
        st.physical.insert(
            h,
            Physical {
                device,
                size,
                mapped_at: None,
            },
        );
        Ok(PhysHandle(h))
    }

    unsafe fn release_physical(&self, device: usize, handle: PhysHandle) -> Result<()> {
        let mut st = self.lock();
        refuse_during_capture(&mut st, "release_physical")?;
        match st.physical.get(&handle.0) {
            Some(p) if p.device == device && p.mapped_at.is_none() => {
                let size = p.size;
                charge(&self.cfg, &mut st, DriverCall::Release, size);
                st.physical.remove(&handle.0);
                drop(st);
                self.used[device].release(size);
                Ok(())
            }
            Some(p) if p.mapped_at.is_some() => Err(Error::InvalidArgument(format!(
                "physical handle {} is still mapped",
                handle.0
            ))),
            _ => Err(Error::InvalidArgument(format!(
                "physical handle {} is not live on sim device {device}",
                handle.0
            ))),
        }
    }

    unsafe fn map(
        &self,
        device: usize,
        ptr: DevicePtr,
        size: usize,
        handle: PhysHandle,
    ) -> Result<()> {
        let mut st = self.lock();
        let phys_ok = matches!(st.physical.get(&handle.0),
            Some(p) if p.device == device && p.size == size && p.mapped_at.is_none());
        if !phys_ok {
            return Err(Error::InvalidArgument(format!(
                "physical handle {} is not a free {size}-byte handle of sim device {device}",
                handle.0
            )));
        }
        let Some((&start, r)) = st.reservations.range_mut(..=ptr.0).next_back() else {
            return Err(bad_device_ptr(device, ptr));
        };
        let off = (ptr.0 - start) as usize;
        let overlaps = r
            .mapped
            .range(..off + size)
            .next_back()
            .is_some_and(|(o, m)| o + m.size > off);
        if r.device != device
            || off + size > r.size
            || !off.is_multiple_of(VMM_GRANULARITY)
            || overlaps
        {
            return Err(Error::InvalidArgument(format!(
                "cannot map {size} bytes at {:#x}: outside a reservation, unaligned or already mapped",
                ptr.0
            )));
        }
        r.mapped.insert(
            off,
            Mapping {
                size,
                handle: handle.0,
                access: false,
                busy_until: 0,
            },
        );
        charge(&self.cfg, &mut st, DriverCall::Map, size);
        st.physical
            .get_mut(&handle.0)
            .expect("checked above")
            .mapped_at = Some(ptr.0);
        Ok(())
    }

    unsafe fn unmap(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        let mut st = self.lock();
        refuse_during_capture(&mut st, "unmap")?;
        let host = st.host_ns;
        let Some((&start, r)) = st.reservations.range_mut(..=ptr.0).next_back() else {
            return Err(bad_device_ptr(device, ptr));
        };
        let off = (ptr.0 - start) as usize;
        match r.mapped.get(&off) {
            Some(m) if m.size == size && r.device == device && m.busy_until > host => {
                Err(Error::Driver {
                    backend: BackendKind::Sim,
                    call: "unmap",
                    code: 700,
                    message: format!(
                        "{:#x}+{size} is still used by work queued until {} ns (now {host} ns): \
                         on a GPU that work would fault",
                        ptr.0, m.busy_until
                    ),
                })
            }
            Some(&Mapping {
                size: len,
                handle: h,
                ..
            }) if len == size && r.device == device => {
                r.mapped.remove(&off);
                // Give the host pages back: a later map of this range reads zeros, as
                // fresh physical memory would (CUDA does not promise zeros; we do).
                // SAFETY: the range lies inside the reservation's own host mapping.
                unsafe {
                    libc::madvise(
                        r.host.ptr.as_ptr().add(off).cast(),
                        size,
                        libc::MADV_DONTNEED,
                    )
                };
                st.physical
                    .get_mut(&h)
                    .expect("mapped handles are live")
                    .mapped_at = None;
                charge(&self.cfg, &mut st, DriverCall::Unmap, size);
                Ok(())
            }
            _ => Err(Error::InvalidArgument(format!(
                "{:#x}+{size} is not one mapping on sim device {device}",
                ptr.0
            ))),
        }
    }

    unsafe fn set_access(
        &self,
        device: usize,
        ptr: DevicePtr,
        size: usize,
        devices: &[usize],
    ) -> Result<()> {
        for d in devices {
            check_device(self, *d)?;
        }
        let mut st = self.lock();
        let Some((&start, r)) = st.reservations.range_mut(..=ptr.0).next_back() else {
            return Err(bad_device_ptr(device, ptr));
        };
        let off = (ptr.0 - start) as usize;
        // As cuMemSetAccess: the range is fully mapped and covers whole mappings.
        let whole = r.mapped.contains_key(&off)
            && off.checked_add(size).is_some_and(|end| {
                end <= r.size
                    && r.covered(off, size, false)
                    && r.mapped
                        .range(..end)
                        .next_back()
                        .is_some_and(|(o, m)| o + m.size == end)
            });
        if r.device != device || size == 0 || !whole || !devices.contains(&device) {
            return Err(Error::InvalidArgument(format!(
                "cannot set access on {size} bytes at {:#x} of sim device {device} for devices \
                 {devices:?}: not whole mappings of a reservation of it, or the owner left out",
                ptr.0
            )));
        }
        for m in r.touched(off, size) {
            m.access = true;
        }
        charge(&self.cfg, &mut st, DriverCall::SetAccess, size);
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
