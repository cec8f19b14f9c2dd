//! Fork after pinning (issue 14, item 5). A process pins a few hundred MiB through every
//! path that pins (a pinned buffer, the host pool whole and in pieces, its cache, the
//! staging ring, the tier store), then `fork()`s:
//!
//! - in the child none of the pinned ranges is mapped (`MADV_DONTFORK`, proven from
//!   `/proc/self/maps`), while pageable memory is inherited as usual;
//! - every call on what the parent made returns `Error::Forked { parent, child }`, the
//!   pools' cached hot paths included, without a driver call (on the fake CUDA driver
//!   its counters do not move), and dropping everything there neither crashes nor hangs;
//! - the parent keeps working after the child exits, its pinned bytes intact.
//!
//! On the simulator and on the CUDA backend over the fake driver. `HETMEM_DONTFORK=0`
//! (read once per process) is checked in a child process of its own.
//!
//! Forking a process with several threads is only safe when no other thread holds a
//! lock the child needs: every test here holds [`serial`], so no other test of this
//! binary is inside hetmem (or the fake driver) at the fork.
//!
//! A binary of its own for that reason: the tests of `tests/it` run on other threads
//! and take no such lock.

mod common;

use common::{fake_cuda, smaps};

use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, MutexGuard};

use fake_cuda::FakeCuda;
use hetmem::pool::{HostBlock, HostPool, HostPoolConfig, PoolBlock, PoolConfig, StagingRing};
use hetmem::tier::{TierConfig, TierStore};
use hetmem::{
    BackendKind, Buffer, Error, Manager, NumaPolicy, ParamGuard, Placement, SimConfig, Stream,
};

const MIB: usize = 1 << 20;

/// Set in a child process (re-run of this binary) to the one test it runs.
const CHILD_ENV: &str = "HETMEM_FORK_TEST_CHILD";

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// Runs `f` in a child made by `fork()` and returns its verdict: `Ok` when it returned
/// `Ok` and exited 0; its error, panic message or exit status otherwise. The child
/// leaves with `_exit` (no exit handlers, no test harness).
fn in_forked_child(f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe() writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: the caller holds `serial()`, so no other thread of this binary is inside
    // hetmem or the fake driver, and the child runs only `f` before `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: the read end is this process's copy, not used here.
        unsafe { libc::close(fds[0]) };
        let verdict = std::panic::catch_unwind(AssertUnwindSafe(f))
            .unwrap_or_else(|p| Err(format!("panic: {}", panic_text(p))));
        let msg = match &verdict {
            Ok(()) => "ok".to_string(),
            Err(e) => e.clone(),
        };
        // SAFETY: writes `msg`'s bytes to our pipe (a short message: the pipe holds
        // it), then ends the process at once without unwinding.
        unsafe {
            libc::write(fds[1], msg.as_ptr().cast(), msg.len());
            libc::_exit(i32::from(verdict.is_err()));
        }
    }
    // SAFETY: the write end is the child's now; closing ours lets the read see EOF.
    unsafe { libc::close(fds[1]) };
    // SAFETY: the read end is ours alone, and File closes it once.
    let mut pipe = unsafe { File::from_raw_fd(fds[0]) };
    let mut msg = String::new();
    pipe.read_to_string(&mut msg).unwrap();
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 && msg == "ok" {
        Ok(())
    } else {
        let how = if libc::WIFSIGNALED(status) {
            format!("killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("exit status {}", libc::WEXITSTATUS(status))
        };
        Err(format!("child {pid} ({how}): {msg}"))
    }
}

/// The lines of `/proc/self/maps` that overlap `start..start + len`.
fn mapped(start: usize, len: usize) -> Vec<String> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            let range = l.split_whitespace().next().unwrap_or("");
            let Some((a, b)) = range.split_once('-') else {
                return false;
            };
            let (a, b) = (
                usize::from_str_radix(a, 16).unwrap(),
                usize::from_str_radix(b, 16).unwrap(),
            );
            a < start + len && start < b
        })
        .map(str::to_owned)
        .collect()
}

/// Whether the mapping at `addr` is advised `MADV_DONTFORK` (smaps flag `dc`).
fn dontfork(addr: usize) -> bool {
    smaps::entry(addr).0.split_whitespace().any(|f| f == "dc")
}

fn forked<T: std::fmt::Debug>(what: &str, r: hetmem::Result<T>, parent: u32) -> Result<(), String> {
    let child = std::process::id();
    match r {
        Err(Error::Forked {
            parent: p,
            child: c,
        }) if p == parent && c == child => Ok(()),
        other => Err(format!(
            "{what}: expected Forked {{ parent: {parent}, child: {child} }}, got {other:?}"
        )),
    }
}

/// Everything the parent makes before the fork.
struct World {
    mgr: Manager,
    /// Pinned through `Manager::alloc` (one registration), filled with 0x5A.
    pinned: Buffer,
    /// Pageable, filled with 0x33: a child inherits it.
    pageable: Buffer,
    host: HostPool,
    /// 128 MiB from the host pool, registered in two pieces by two threads.
    chunked: HostBlock,
    /// The address of a pinned block now in the host pool's cache (still registered).
    cached_at: usize,
    pool: hetmem::pool::DevicePool,
    stream: Stream,
    block: PoolBlock,
    ring: StagingRing,
    store: TierStore,
    guard: ParamGuard,
}

fn build(mgr: Manager) -> World {
    let mut pinned = mgr
        .alloc(Placement::Pinned(NumaPolicy::Default), 192 * MIB)
        .unwrap();
    pinned.as_mut_slice().unwrap().fill(0x5A);
    let mut pageable = mgr
        .alloc(Placement::Host(NumaPolicy::Default), 8 * MIB)
        .unwrap();
    pageable.as_mut_slice().unwrap().fill(0x33);
    let host = mgr
        .host_pool(HostPoolConfig {
            threads: 2,
            parallel_threshold: 64 * MIB,
            min_register_chunk: 32 * MIB,
            ..HostPoolConfig::default()
        })
        .unwrap();
    let chunked = host.alloc_pinned(&NumaPolicy::Default, 128 * MIB).unwrap();
    assert_eq!(chunked.registrations(), 2, "registered in pieces");
    let cached = host.alloc_pinned(&NumaPolicy::Default, 8 * MIB).unwrap();
    let cached_at = cached.as_ptr().as_ptr() as usize;
    drop(cached);
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let stream = mgr.create_stream(0).unwrap();
    let block = pool.alloc(4 * MIB, &stream).unwrap();
    // A cached block of the size the child asks for: the pool's hot path.
    drop(pool.alloc(4 * MIB, &stream).unwrap());
    let ring = StagingRing::new(&host, &NumaPolicy::Default, 2, 4 * MIB, 1).unwrap();
    let store = TierStore::new(&mgr, TierConfig::new(64 * MIB, 64 * MIB)).unwrap();
    let id = store.register("w", vec![7u8; 6 * MIB].into()).unwrap();
    let guard = store.acquire(id, &stream).unwrap();
    stream.synchronize().unwrap();
    World {
        mgr,
        pinned,
        pageable,
        host,
        chunked,
        cached_at,
        pool,
        stream,
        block,
        ring,
        store,
        guard,
    }
}

impl World {
    /// (what, start, length) of every pinned range whose address the test knows.
    fn pinned_ranges(&self) -> Vec<(&'static str, usize, usize)> {
        vec![
            (
                "pinned buffer",
                self.pinned.host_ptr().unwrap().as_ptr() as usize,
                self.pinned.len(),
            ),
            (
                "chunked host block",
                self.chunked.as_ptr().as_ptr() as usize,
                self.chunked.capacity(),
            ),
            ("cached host block", self.cached_at, 8 * MIB),
        ]
    }

    /// In the child: the pinned ranges are gone, the pageable one is there, and every
    /// call fails with `Forked`; then everything is dropped.
    fn check_in_child(self, parent: u32) -> Result<(), String> {
        for (what, at, len) in self.pinned_ranges() {
            let lines = mapped(at, len);
            if !lines.is_empty() {
                return Err(format!(
                    "{what} {at:#x}+{len} is mapped in the child: {lines:?}"
                ));
            }
        }
        let pageable_at = self.pageable.host_ptr().unwrap();
        if mapped(pageable_at.as_ptr() as usize, self.pageable.len()).is_empty() {
            return Err("the pageable buffer is not inherited".into());
        }
        // SAFETY: the pageable mapping is inherited (checked just above) and 8 MiB long.
        let byte = unsafe { pageable_at.as_ptr().add(12345).read() };
        if byte != 0x33 {
            return Err(format!("inherited pageable byte is {byte:#x}"));
        }
        let World {
            mgr,
            mut pinned,
            mut pageable,
            host,
            chunked,
            cached_at: _,
            pool,
            stream,
            mut block,
            mut ring,
            store,
            guard,
        } = self;
        let id = guard.id();
        forked("alloc device", mgr.alloc(Placement::Device(0), MIB), parent)?;
        forked(
            "alloc host",
            mgr.alloc(Placement::Host(NumaPolicy::Default), 4096),
            parent,
        )?;
        forked(
            "alloc pinned",
            mgr.alloc(Placement::Pinned(NumaPolicy::Default), 4096),
            parent,
        )?;
        forked("pinned as_slice", pinned.as_slice(), parent)?;
        forked("pinned as_mut_slice", pinned.as_mut_slice(), parent)?;
        forked("pinned wait", pinned.wait(), parent)?;
        forked("pageable as_slice", pageable.as_slice(), parent)?;
        forked(
            "copy",
            mgr.copy(&mut pageable, 0, &pinned, 0, 4096, None),
            parent,
        )?;
        forked("write", mgr.write(&mut pinned, 0, b"x"), parent)?;
        forked("mem_info", mgr.backend().mem_info(0), parent)?;
        forked("create_stream", mgr.create_stream(0), parent)?;
        forked(
            "device_pool",
            mgr.device_pool(0, PoolConfig::default()),
            parent,
        )?;
        forked(
            "host_pool",
            mgr.host_pool(HostPoolConfig::default()),
            parent,
        )?;
        forked("stream synchronize", stream.synchronize(), parent)?;
        forked("stream record", stream.record(), parent)?;
        forked(
            "pool alloc (cached size)",
            pool.alloc(4 * MIB, &stream),
            parent,
        )?;
        forked("pool trim", pool.trim(), parent)?;
        forked("block write", block.write(0, b"x"), parent)?;
        forked(
            "copy to block",
            mgr.copy(&mut block, 0, &pinned, 0, 16, Some(&stream)),
            parent,
        )?;
        forked(
            "host pool alloc (cached class)",
            host.alloc_pinned(&NumaPolicy::Default, 8 * MIB),
            parent,
        )?;
        forked("host block as_slice", chunked.as_slice(), parent)?;
        if host.trim() != 0 {
            return Err("host pool trim gave memory back in the child".into());
        }
        forked(
            "ring upload",
            ring.upload(&[1u8; 4096], &block, 0, &stream),
            parent,
        )?;
        forked("store acquire", store.acquire(id, &stream), parent)?;
        forked("store read", store.read(id), parent)?;
        forked("store residency", store.residency(id), parent)?;
        // The child's own memory where the parent's pinned buffer was: dropping the
        // buffer must leave it alone (an munmap of the old range would take it away).
        let at = pinned.host_ptr().unwrap().as_ptr();
        // SAFETY: a fresh anonymous page at an address nothing in this process maps
        // (checked above); MAP_FIXED_NOREPLACE fails rather than replace a mapping.
        let mine = unsafe {
            libc::mmap(
                at.cast(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if mine != at.cast() {
            return Err(format!(
                "mapping a page of the child's own at {at:?}: {mine:?}"
            ));
        }
        // SAFETY: the page just mapped, read-write.
        unsafe { at.write(0xC1) };
        // Drops: no driver call, no panic, no hang.
        drop((
            guard, store, ring, block, pool, stream, chunked, host, pinned, pageable, mgr,
        ));
        // SAFETY: still mapped (a SIGSEGV here would fail the test through the wait
        // status); the page is ours.
        let kept = unsafe { at.read() };
        if kept != 0xC1 {
            return Err(format!("the child's page holds {kept:#x} after the drops"));
        }
        Ok(())
    }

    /// In the parent, after the child is gone: everything still works.
    fn check_in_parent(self) {
        let World {
            mgr,
            pinned,
            mut pageable,
            host,
            chunked,
            pool,
            stream,
            mut block,
            mut ring,
            store,
            guard,
            ..
        } = self;
        assert!(pinned.as_slice().unwrap().iter().all(|b| *b == 0x5A));
        mgr.copy(&mut block, 0, &pinned, 0, 4 * MIB, Some(&stream))
            .unwrap();
        mgr.copy(&mut pageable, 0, &block, 0, 4 * MIB, Some(&stream))
            .unwrap();
        stream.synchronize().unwrap();
        assert!(pageable.as_slice().unwrap()[..4 * MIB]
            .iter()
            .all(|b| *b == 0x5A));
        let again = pool.alloc(4 * MIB, &stream).unwrap();
        ring.upload(&vec![9u8; 4 * MIB], &again, 0, &stream)
            .unwrap();
        stream.synchronize().unwrap();
        let mut out = vec![0u8; 16];
        again.read(4 * MIB - 16, &mut out).unwrap();
        assert_eq!(out, [9u8; 16]);
        let cached = host.alloc_pinned(&NumaPolicy::Default, 8 * MIB).unwrap();
        assert!(host.stats().pinned.hits >= 1);
        assert_eq!(chunked.as_slice().unwrap().len(), 128 * MIB);
        let id = guard.id();
        drop(guard);
        let g = store.acquire(id, &stream).unwrap();
        stream.synchronize().unwrap();
        drop((g, cached, again));
        assert_eq!(store.read(id).unwrap(), vec![7u8; 6 * MIB]);
        mgr.alloc(Placement::Pinned(NumaPolicy::Default), MIB)
            .unwrap();
    }
}

fn sim_manager() -> Manager {
    Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(SimConfig::with_devices(1, 1 << 30))
        .build()
        .unwrap()
}

#[test]
fn pinned_memory_stays_out_of_a_forked_child_and_calls_there_fail_on_sim() {
    let _g = serial();
    let mut world = Some(build(sim_manager()));
    let w = world.as_ref().unwrap();
    for (what, at, _) in w.pinned_ranges() {
        assert!(dontfork(at), "{what} is not advised MADV_DONTFORK");
    }
    assert!(
        !dontfork(w.pageable.host_ptr().unwrap().as_ptr() as usize),
        "pageable memory must stay inheritable"
    );
    let parent = std::process::id();
    in_forked_child(|| {
        world.take().unwrap().check_in_child(parent)?;
        // A manager made in the child works: only the parent's objects are refused.
        let mgr = sim_manager();
        let mut p = mgr
            .alloc(Placement::Pinned(NumaPolicy::Default), MIB)
            .map_err(|e| format!("a new manager in the child: {e}"))?;
        p.as_mut_slice().map_err(|e| e.to_string())?.fill(3);
        let d = mgr
            .alloc(Placement::Device(0), MIB)
            .map_err(|e| e.to_string())?;
        let mut back = [0u8; 8];
        let mut d = d;
        mgr.copy(&mut d, 0, &p, 0, MIB, None)
            .map_err(|e| e.to_string())?;
        mgr.read(&d, MIB - 8, &mut back)
            .map_err(|e| e.to_string())?;
        if back != [3u8; 8] {
            return Err(format!("a new manager in the child read {back:?}"));
        }
        Ok(())
    })
    .unwrap();
    world.take().unwrap().check_in_parent();
}

#[test]
fn pinned_memory_stays_out_of_a_forked_child_and_calls_there_fail_on_fake_cuda() {
    let _g = serial();
    let fake = FakeCuda::preload();
    // One device of 1 GiB with VMM, before the process's first cuInit (only this test
    // opens CUDA in this binary).
    fake.configure(1, 1 << 30, true, true)
        .expect("configure the fake before cuInit");
    let mgr = Manager::builder()
        .backend(BackendKind::Cuda)
        .build()
        .unwrap();
    let mut world = Some(build(mgr));
    for (what, at, _) in world.as_ref().unwrap().pinned_ranges() {
        assert!(dontfork(at), "{what} is not advised MADV_DONTFORK");
    }
    assert!(fake.stat("registrations") >= 3);
    let parent = std::process::id();
    const STATS: [&str; 9] = [
        "ctx_set_current",
        "register_calls",
        "registrations",
        "allocations",
        "streams",
        "events",
        "copies",
        "async_copies",
        "vmm_handles",
    ];
    in_forked_child(|| {
        let before: Vec<i64> = STATS.iter().map(|s| fake.stat(s)).collect();
        world.take().unwrap().check_in_child(parent)?;
        let after: Vec<i64> = STATS.iter().map(|s| fake.stat(s)).collect();
        if before != after {
            return Err(format!(
                "the child reached the driver: {STATS:?} went from {before:?} to {after:?}"
            ));
        }
        Ok(())
    })
    .unwrap();
    world.take().unwrap().check_in_parent();
}

/// `HETMEM_DONTFORK=0` (the comparison the GPU check makes): pinned memory is then
/// inherited by the child (copied, on a driver that pins with FOLL_LONGTERM), and calls
/// there still fail with `Forked`.
#[test]
fn with_hetmem_dontfork_0_a_child_inherits_pinned_memory() {
    const NAME: &str = "with_hetmem_dontfork_0_a_child_inherits_pinned_memory";
    if std::env::var(CHILD_ENV).as_deref() != Ok(NAME) {
        // The switch is read once per process: run this test alone in a fresh one.
        common::child::run(NAME, &[(CHILD_ENV, NAME), ("HETMEM_DONTFORK", "0")]);
        return;
    }
    let _g = serial();
    let mgr = sim_manager();
    let mut pinned = mgr
        .alloc(Placement::Pinned(NumaPolicy::Default), 64 * MIB)
        .unwrap();
    pinned.as_mut_slice().unwrap().fill(0x77);
    let at = pinned.host_ptr().unwrap();
    assert!(
        !dontfork(at.as_ptr() as usize),
        "HETMEM_DONTFORK=0 is ignored"
    );
    let parent = std::process::id();
    in_forked_child(|| {
        if mapped(at.as_ptr() as usize, 64 * MIB).is_empty() {
            return Err("the pinned buffer is not inherited".into());
        }
        // SAFETY: inherited (checked above), 64 MiB long.
        let byte = unsafe { at.as_ptr().add(MIB).read() };
        if byte != 0x77 {
            return Err(format!("inherited pinned byte is {byte:#x}"));
        }
        forked("as_slice", pinned.as_slice(), parent)?;
        forked("alloc", mgr.alloc(Placement::Device(0), MIB), parent)
    })
    .unwrap();
    assert!(pinned.as_slice().unwrap().iter().all(|b| *b == 0x77));
}
