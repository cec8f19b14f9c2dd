//! Copies between buffers, from and to caller memory, direct access to host-visible
//! memory, foreign addresses, prefetch and advice.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use hetmem::ffi::memory::*;
use hetmem::ffi::*;

use super::{addr_ptr, lock, mh, Buf, Expect, MgrInfo, Thread};

use super::mem::*;

impl Thread<'_> {
    // ---- copies ----

    /// Two buffers of a manager (the same one at times) and offsets in them.
    pub(crate) fn two_bufs(&mut self, slot: usize) -> Option<(Arc<Buf>, Arc<Buf>)> {
        let a = self.any_buf(slot, |_| true)?;
        let b = if self.rng.chance(20) {
            a.clone()
        } else {
            self.any_buf(slot, |_| true)?
        };
        Some((a, b))
    }

    pub(crate) fn op_copy(&mut self) {
        let slot = self.pick_mgr();
        let _l = self.lock_mgrs(&[(slot, false)]);
        let Some(info) = self.info(slot) else {
            return;
        };
        let stream = self.stream_arg(45);
        let Some((db, sb)) = self.two_bufs(slot) else {
            return;
        };
        let Some(mut l) = Locked::new(&[&db, &sb]) else {
            return;
        };
        let doff = self.rng.index(db.len);
        let soff = self.rng.index(sb.len);
        let rem = (db.len - doff).min(sb.len - soff);
        let n = self.length(rem, true);
        let mut dst = AddrArg::buf(&db, doff);
        let mut src = AddrArg::buf(&sb, soff);
        if self.rng.chance(3) {
            dst.at = At::Null;
            dst.addr = 0;
        }
        if self.rng.chance(3) {
            src.at = At::Null;
            src.addr = 0;
        }
        self.do_copy(&info, &mut l, &dst, &src, n, &stream);
    }

    /// hetmem_copy(dst, src, n, stream) on the manager `info`; the model follows.
    pub(crate) fn do_copy(
        &mut self,
        info: &MgrInfo,
        l: &mut Locked,
        dst: &AddrArg,
        src: &AddrArg,
        n: usize,
        stream: &StreamArg,
    ) {
        let mut e = Expect::ok();
        dst.range_faults(n, &mut e);
        src.range_faults(n, &mut e);
        let (db, sb) = (dst.buffer().cloned(), src.buffer().cloned());
        match (&db, &sb) {
            (Some(d), Some(s)) => {
                let fits = |dev: usize| d.stream_fits(s, dev);
                stream.faults(info.gen, Some(&fits), &mut e);
            }
            _ => stream.faults(info.gen, None, &mut e),
        }
        // SAFETY: a live handle; the addresses are looked up, and dereferenced only
        // inside live buffers (locked by the model); the stream is live or a bad value.
        let rc = unsafe { hetmem_copy(mh(info.handle), dst.ptr(), src.ptr(), n, stream.ptr()) };
        let ok = self.check("hetmem_copy", rc, &e, &|| {
            format!(
                "dst {:#x} ({}), src {:#x} ({}), n {n}, stream {}",
                dst.addr,
                dst.label,
                src.addr,
                src.label,
                stream.describe()
            )
        });
        // The model follows what happened, expected or not.
        if ok && e.ok || ok && dst.fits(n) && src.fits(n) {
            if let (At::In(d, doff), At::In(s, soff)) = (&dst.at, &src.at) {
                if Arc::ptr_eq(d, s) {
                    l.get(d).bytes.copy_within(*soff..soff + n, *doff);
                } else {
                    let tmp = l.get(s).bytes[*soff..soff + n].to_vec();
                    l.get(d).bytes[*doff..doff + n].copy_from_slice(&tmp);
                }
            }
        }
    }

    pub(crate) fn op_copy_from_host(&mut self) {
        let slot = self.pick_mgr();
        let other = if self.rng.chance(15) {
            self.other_mgr(slot)
        } else {
            None
        };
        let mut want = vec![(slot, false)];
        want.extend(other.map(|o| (o, false)));
        // Another manager's host memory is caller memory here: kept from a racing
        // destroy.
        let raw: Vec<usize> = other.into_iter().collect();
        let _l = self.lock_mgrs_raw(&want, &raw);
        let Some(info) = self.info(slot) else {
            return;
        };
        let Some(db) = self.any_buf(slot, |_| true) else {
            return;
        };
        let ob = other.and_then(|o| self.any_buf(o, |b| b.host));
        let mine = if self.rng.chance(15) {
            self.any_buf(slot, |_| true)
        } else {
            None
        };
        let mut bufs = vec![&db];
        bufs.extend(ob.as_ref());
        bufs.extend(mine.as_ref());
        let Some(mut l) = Locked::new(&bufs) else {
            return;
        };
        let doff = self.rng.index(db.len);
        let mut dst = AddrArg::buf(&db, doff);
        let (src, n) = if let Some(ob) = &ob {
            let soff = self.rng.index(ob.len);
            let n = self.length((db.len - doff).min(ob.len - soff), false);
            (HostSide::Other(ob.clone(), soff), n.min(ob.len - soff))
        } else if let Some(m) = &mine {
            let soff = self.rng.index(m.len);
            let n = self.length((db.len - doff).min(m.len - soff), true);
            (HostSide::Mine(AddrArg::buf(m, soff)), n)
        } else if self.rng.chance(4) {
            (HostSide::Null, self.rng.index(64))
        } else {
            let n = self.length(db.len - doff, true);
            let backing = if n > db.len + 64 { 64 } else { n };
            (HostSide::Caller(self.rng.bytes(backing)), n)
        };
        if self.rng.chance(3) {
            dst.at = At::Null;
            dst.addr = 0;
        }
        self.do_copy_from_host(&info, &mut l, &dst, &src, n);
    }

    /// hetmem_copy_from_host(dst, src, n).
    pub(crate) fn do_copy_from_host(
        &mut self,
        info: &MgrInfo,
        l: &mut Locked,
        dst: &AddrArg,
        src: &HostSide,
        n: usize,
    ) {
        let mut e = Expect::ok();
        dst.range_faults(n, &mut e);
        let (sp, data): (*const c_void, Option<Vec<u8>>) = match src {
            HostSide::Null => {
                e.fault("NULL host_src", HETMEM_ERR_NULL_POINTER);
                (std::ptr::null(), None)
            }
            HostSide::Caller(v) => {
                if n > v.len() {
                    // Only with a length that cannot fit any buffer: the call must refuse
                    // it before reading (the conventions: SIZE_MAX is an error code); a
                    // range that long from caller memory runs into the manager's buffers,
                    // which is refused as well.
                    debug_assert!(n > isize::MAX as usize);
                    e.env(HETMEM_ERR_INVALID_ARGUMENT);
                }
                (v.as_ptr().cast(), (n <= v.len()).then(|| v[..n].to_vec()))
            }
            HostSide::Other(b, off) => {
                let d = l.get(b);
                let data = d.bytes.get(*off..off.saturating_add(n)).map(|s| s.to_vec());
                (addr_ptr(b.addr + *off as u64).cast_const(), data)
            }
            HostSide::Mine(a) => {
                a.range_faults(n, &mut e);
                let data = match &a.at {
                    At::In(b, off) => l
                        .get(b)
                        .bytes
                        .get(*off..off.saturating_add(n))
                        .map(|s| s.to_vec()),
                    _ => None,
                };
                (a.ptr().cast_const(), data)
            }
        };
        // SAFETY: a live handle; `dst` is looked up; `sp` is NULL, caller memory of at
        // least `n` bytes (or a length no buffer can take, refused before any read), or
        // an address in a live buffer (locked).
        let rc = unsafe { hetmem_copy_from_host(mh(info.handle), dst.ptr(), sp, n) };
        let ok = self.check("hetmem_copy_from_host", rc, &e, &|| {
            format!("dst {:#x} ({}), n {n}", dst.addr, dst.label)
        });
        if ok && dst.fits(n) {
            if let (At::In(b, off), Some(data)) = (&dst.at, data) {
                l.get(b).bytes[*off..off + n].copy_from_slice(&data);
            }
        }
    }

    pub(crate) fn op_copy_to_host(&mut self) {
        let slot = self.pick_mgr();
        let other = if self.rng.chance(15) {
            self.other_mgr(slot)
        } else {
            None
        };
        let mut want = vec![(slot, false)];
        want.extend(other.map(|o| (o, false)));
        // Another manager's host memory is caller memory here: kept from a racing
        // destroy.
        let raw: Vec<usize> = other.into_iter().collect();
        let _l = self.lock_mgrs_raw(&want, &raw);
        let Some(info) = self.info(slot) else {
            return;
        };
        let Some(sb) = self.any_buf(slot, |_| true) else {
            return;
        };
        let ob = other.and_then(|o| self.any_buf(o, |b| b.host));
        let mine = if self.rng.chance(15) {
            self.any_buf(slot, |_| true)
        } else {
            None
        };
        let mut bufs = vec![&sb];
        bufs.extend(ob.as_ref());
        bufs.extend(mine.as_ref());
        let Some(mut l) = Locked::new(&bufs) else {
            return;
        };
        let whole = self.rng.chance(40);
        let soff = if whole { 0 } else { self.rng.index(sb.len) };
        let mut src = AddrArg::buf(&sb, soff);
        let (dst, n) = if let Some(ob) = &ob {
            let doff = self.rng.index(ob.len);
            let n = self.length((sb.len - soff).min(ob.len - doff), false);
            (HostSide::Other(ob.clone(), doff), n.min(ob.len - doff))
        } else if let Some(m) = &mine {
            let doff = self.rng.index(m.len);
            let n = self.length((sb.len - soff).min(m.len - doff), true);
            (HostSide::Mine(AddrArg::buf(m, doff)), n)
        } else if self.rng.chance(4) {
            (HostSide::Null, self.rng.index(64))
        } else {
            let n = if whole {
                sb.len
            } else {
                self.length(sb.len - soff, true)
            };
            let backing = if n > sb.len + 64 { 64 } else { n };
            (HostSide::Caller(vec![SENTINEL; backing]), n)
        };
        if self.rng.chance(3) {
            src.at = At::Null;
            src.addr = 0;
        }
        self.do_copy_to_host(&info, &mut l, dst, &src, n);
    }

    /// hetmem_copy_to_host(dst, src, n): the bytes that arrive are compared with the
    /// model.
    pub(crate) fn do_copy_to_host(
        &mut self,
        info: &MgrInfo,
        l: &mut Locked,
        mut dst: HostSide,
        src: &AddrArg,
        n: usize,
    ) {
        let mut e = Expect::ok();
        src.range_faults(n, &mut e);
        let want: Option<Vec<u8>> = match &src.at {
            At::In(b, off) => l
                .get(b)
                .bytes
                .get(*off..off.saturating_add(n))
                .map(|s| s.to_vec()),
            _ => None,
        };
        let dp: *mut c_void = match &mut dst {
            HostSide::Null => {
                e.fault("NULL host_dst", HETMEM_ERR_NULL_POINTER);
                std::ptr::null_mut()
            }
            HostSide::Caller(v) => {
                if n > v.len() {
                    // As in do_copy_from_host.
                    e.env(HETMEM_ERR_INVALID_ARGUMENT);
                }
                v.as_mut_ptr().cast()
            }
            HostSide::Other(b, off) => addr_ptr(b.addr + *off as u64),
            HostSide::Mine(a) => {
                a.range_faults(n, &mut e);
                a.ptr()
            }
        };
        // SAFETY: a live handle; `src` is looked up; `dp` is NULL, caller memory of at
        // least `n` bytes (or a length no buffer can take, refused before any write), or
        // an address in a live buffer (locked).
        let rc = unsafe { hetmem_copy_to_host(mh(info.handle), dp, src.ptr(), n) };
        let ok = self.check("hetmem_copy_to_host", rc, &e, &|| {
            format!("src {:#x} ({}), n {n}", src.addr, src.label)
        });
        match (&dst, ok, want) {
            (HostSide::Caller(v), true, Some(want)) => {
                self.compare("hetmem_copy_to_host", "bytes read", &v[..n], &want);
            }
            (HostSide::Caller(v), false, _) if v.iter().any(|b| *b != SENTINEL) => {
                self.contract(
                    "hetmem_copy_to_host",
                    "a failed call wrote caller memory",
                    || format!("src {:#x}, n {n}", src.addr),
                );
            }
            (HostSide::Other(b, off), true, Some(want)) => {
                // Another manager's host memory, written as caller memory.
                let d = l.get(b);
                d.bytes[*off..off + n].copy_from_slice(&want);
                // SAFETY: the caller's memory in a live host buffer (locked), `n` bytes.
                let direct = unsafe {
                    std::slice::from_raw_parts(addr_ptr(b.addr + *off as u64).cast::<u8>(), n)
                };
                let got = direct.to_vec();
                self.compare(
                    "hetmem_copy_to_host",
                    "bytes written to another manager's buffer",
                    &got,
                    &want,
                );
            }
            (
                HostSide::Mine(AddrArg {
                    at: At::In(b, off), ..
                }),
                true,
                Some(want),
            ) => {
                if let Some(d) = l.get(b).bytes.get_mut(*off..off.saturating_add(n)) {
                    d.copy_from_slice(&want);
                }
            }
            _ => {}
        }
    }

    /// Reads or writes host-visible memory directly, as a C program does.
    pub(crate) fn op_direct(&mut self) {
        let slot = self.pick_mgr();
        let _l = self.lock_mgrs_raw(&[(slot, false)], &[slot]);
        let Some(info) = self.info(slot) else {
            return;
        };
        let Some(b) = self.any_buf(slot, |b| b.host) else {
            return;
        };
        let Some(mut l) = Locked::new(&[&b]) else {
            return;
        };
        let d = l.get(&b);
        let off = self.rng.index(b.len);
        let n = 1 + self.rng.index(b.len - off);
        let p = addr_ptr(b.addr + off as u64).cast::<u8>();
        if self.rng.chance(50) {
            let data = self.rng.bytes(n);
            // SAFETY: `off + n <= len` in a live host-visible buffer (locked).
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, n) };
            d.bytes[off..off + n].copy_from_slice(&data);
        } else {
            // SAFETY: as above.
            let got = unsafe { std::slice::from_raw_parts(p, n) }.to_vec();
            let want = d.bytes[off..off + n].to_vec();
            self.compare("direct read", "host-visible buffer", &got, &want);
        }
        let _ = info;
    }

    /// Calls with addresses the model has to look up: freed ones, made-up ones, the end
    /// of a buffer, another manager's. The manager's lock is exclusive, so the answer
    /// cannot change under the call.
    pub(crate) fn op_foreign_addresses(&mut self) {
        let slot = self.pick_mgr();
        let other = self.other_mgr(slot).filter(|_| self.rng.chance(50));
        let mut want = vec![(slot, true)];
        want.extend(other.map(|o| (o, false)));
        let _l = self.lock_mgrs(&want);
        let Some(info) = self.info(slot) else {
            return;
        };
        let ob = other.and_then(|o| self.any_buf(o, |_| true));
        let local = [0u8; 16];
        let (addr, label) = {
            let st = lock(&self.w.mgrs[slot].st);
            match self.rng.below(8) {
                0 | 1 if ob.is_some() => {
                    let b = ob.as_ref().expect("checked");
                    (
                        b.addr + self.rng.below(b.len as u64),
                        "address of another manager",
                    )
                }
                2 if !st.dead_addrs.is_empty() => (
                    st.dead_addrs[self.rng.index(st.dead_addrs.len())],
                    "freed address",
                ),
                3 => match st.any(&mut self.rng, |_| true) {
                    Some(b) => (b.addr + b.len as u64, "one past a buffer's end"),
                    None => (0x1000, "made-up address"),
                },
                4 => (
                    (1u64 << 52) + self.rng.below(1 << 20),
                    "a simulated device address",
                ),
                5 => (local.as_ptr().addr() as u64, "caller memory"),
                6 => (
                    self.rng.pick(&[1u64, 0x1000, u64::MAX, u64::MAX - 7]),
                    "made-up address",
                ),
                _ => (
                    0x7f00_0000_0000 + self.rng.below(1 << 30),
                    "made-up address",
                ),
            }
        };
        let at = match lock(&self.w.mgrs[slot].st).locate(addr) {
            Some((b, off)) => At::In(b, off),
            None => At::Out,
        };
        let a = AddrArg { addr, at, label };
        // A second, ordinary buffer for the other end of a copy.
        let peer = self.any_buf(slot, |_| true);
        let mut bufs: Vec<&Arc<Buf>> = Vec::new();
        bufs.extend(a.buffer());
        bufs.extend(peer.as_ref());
        bufs.extend(ob.as_ref());
        let Some(mut l) = Locked::new(&bufs) else {
            return;
        };
        match self.rng.below(6) {
            0 => self.do_free(slot, &info, &mut l, &a),
            1 | 2 => {
                let Some(p) = &peer else { return };
                let pa = AddrArg::buf(p, self.rng.index(p.len));
                let n = self.length(64, true);
                let stream = StreamArg::None;
                if self.rng.chance(50) {
                    self.do_copy(&info, &mut l, &a, &pa, n, &stream);
                } else {
                    self.do_copy(&info, &mut l, &pa, &a, n, &stream);
                }
            }
            3 => {
                let n = self.length(64, true);
                let backing = if n > 1 << 20 { 64 } else { n };
                let src = HostSide::Caller(self.rng.bytes(backing));
                self.do_copy_from_host(&info, &mut l, &a, &src, n);
            }
            4 => {
                let n = self.length(64, true);
                let backing = if n > 1 << 20 { 64 } else { n };
                let dst = HostSide::Caller(vec![SENTINEL; backing]);
                self.do_copy_to_host(&info, &mut l, dst, &a, n);
            }
            _ => {
                let n = self.length(64, true);
                drop(l);
                self.do_prefetch_or_advise(&info, &a, n, StreamArg::None);
            }
        }
    }

    // ---- prefetch and advice ----

    pub(crate) fn op_prefetch_advise(&mut self) {
        let slot = self.pick_mgr();
        let _l = self.lock_mgrs(&[(slot, false)]);
        let Some(info) = self.info(slot) else {
            return;
        };
        let stream = self.stream_arg(50);
        let managed_only = self.rng.chance(80);
        let Some(b) = self.any_buf(slot, |b| !managed_only || b.placement == HETMEM_MANAGED) else {
            return;
        };
        let Some(l) = Locked::new(&[&b]) else {
            return;
        };
        let off = self.rng.index(b.len);
        let n = self.length(b.len - off, true);
        let a = AddrArg::buf(&b, off);
        // The buffer stays locked: a migration must not change its bytes, and no one
        // else may change them meanwhile.
        self.do_prefetch_or_advise(&info, &a, n, stream);
        drop(l);
    }

    /// hetmem_prefetch or hetmem_advise on `a..a+n`.
    pub(crate) fn do_prefetch_or_advise(
        &mut self,
        info: &MgrInfo,
        a: &AddrArg,
        n: usize,
        stream: StreamArg,
    ) {
        let mut e = Expect::ok();
        a.range_faults(n, &mut e);
        if let At::In(b, _) = &a.at {
            if b.placement != HETMEM_MANAGED {
                e.fault("not managed memory", HETMEM_ERR_INVALID_ARGUMENT);
            }
        }
        let devices = info.devices;
        let mut device: c_int = match self.rng.below(8) {
            0 => -1,
            1 => {
                e.fault("unknown device", HETMEM_ERR_UNKNOWN_DEVICE);
                devices as c_int + self.rng.below(4) as c_int
            }
            2 => {
                e.fault("negative device", HETMEM_ERR_INVALID_ARGUMENT);
                -2 - self.rng.below(4) as c_int
            }
            _ if devices == 0 => -1,
            _ => self.rng.index(devices) as c_int,
        };
        if self.rng.chance(50) {
            if n == 0 && e.ok {
                e.edge("0 bytes", HETMEM_ERR_INVALID_SIZE)
                    .env(HETMEM_ERR_INVALID_ARGUMENT);
            }
            let fits = |_d: usize| true;
            stream.faults(info.gen, Some(&fits), &mut e);
            // A stream of any device of the manager will do (as the drivers allow).
            // SAFETY: a live handle; the address is looked up; the stream is live or a
            // bad value.
            let rc = unsafe { hetmem_prefetch(mh(info.handle), a.ptr(), n, device, stream.ptr()) };
            self.check("hetmem_prefetch", rc, &e, &|| {
                format!(
                    "{:#x} ({}), n {n}, device {device}, stream {}",
                    a.addr,
                    a.label,
                    stream.describe()
                )
            });
        } else {
            let advice: c_int = match self.rng.below(10) {
                0 => {
                    e.fault("unknown advice", HETMEM_ERR_INVALID_ARGUMENT);
                    self.rng.pick(&[0, 7, -1, c_int::MAX])
                }
                _ => 1 + self.rng.below(6) as c_int,
            };
            // The device matters for preferred location (-1 is the host) and accessed-by
            // (a device).
            let uses_device = matches!(advice, 3 | 5 | 6);
            if !uses_device {
                // Any value is ignored: undo the faults the device drew.
                e = Expect::ok();
                a.range_faults(n, &mut e);
                if let At::In(b, _) = &a.at {
                    if b.placement != HETMEM_MANAGED {
                        e.fault("not managed memory", HETMEM_ERR_INVALID_ARGUMENT);
                    }
                }
                if !(1..=6).contains(&advice) {
                    e.fault("unknown advice", HETMEM_ERR_INVALID_ARGUMENT);
                }
            } else if device == -1 && advice != 3 {
                e.fault("the host for accessed-by", HETMEM_ERR_INVALID_ARGUMENT);
            }
            if devices == 0 && device >= 0 && !uses_device {
                device = 0;
            }
            // SAFETY: a live handle; the address is looked up.
            let rc = unsafe { hetmem_advise(mh(info.handle), a.ptr(), n, advice, device) };
            self.check("hetmem_advise", rc, &e, &|| {
                format!(
                    "{:#x} ({}), n {n}, advice {advice}, device {device}",
                    a.addr, a.label
                )
            });
        }
    }
}
