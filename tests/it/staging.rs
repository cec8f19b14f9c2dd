//! The pinned staging ring: bytes arrive intact, slots are not refilled under a copy
//! still reading them (checked on the asynchronous fake HIP runtime), a mapped file
//! streams like memory, and on the simulator the link runs at pinned speed.

use crate::common::{child, fake_hip};

use hetmem::pool::{HostPoolConfig, PoolConfig, StagingRing};
use hetmem::{BackendKind, Error, Manager, NumaPolicy, Placement, SimConfig};

const MIB: usize = 1 << 20;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn read_back(mgr: &Manager, blk: &hetmem::pool::PoolBlock, stream: &hetmem::Stream) -> Vec<u8> {
    let mut out = mgr
        .alloc(Placement::Pinned(NumaPolicy::Default), blk.len())
        .unwrap();
    mgr.copy(&mut out, 0, blk, 0, blk.len(), Some(stream))
        .unwrap();
    out.as_slice().unwrap().to_vec()
}

#[test]
fn uploads_arrive_at_pinned_link_speed_on_sim() {
    let mgr = Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(SimConfig::with_devices(1, 1 << 30))
        .build()
        .unwrap();
    let sim = mgr.sim().unwrap();
    let host = mgr.host_pool(HostPoolConfig::default()).unwrap();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let stream = mgr.create_stream(0).unwrap();
    // 8 MiB slots: the 8 µs a copy costs to start is then 5% of its 152 µs on the link.
    let mut ring = StagingRing::new(&host, &NumaPolicy::NearDevice(0), 4, 8 * MIB, 2).unwrap();
    let src = pattern(80 * MIB + 777, 3); // pageable
    let dst = pool.alloc(src.len(), &stream).unwrap();
    // From when the upload can start: the host has spent time in the driver already.
    let t0 = sim
        .stream_time_ns(stream.handle())
        .unwrap()
        .max(sim.host_time_ns());
    let r = ring.upload(&src, &dst, 0, &stream).unwrap();
    assert_eq!((r.bytes, r.chunks), (src.len(), 11));
    let t1 = sim.stream_time_ns(stream.handle()).unwrap();
    let gbps = src.len() as f64 / (t1 - t0) as f64;
    let link = sim.config().h2d_gbps;
    assert!(
        gbps >= 0.9 * link,
        "ring moved {gbps:.1} GB/s on a {link} GB/s link"
    );
    assert!(
        read_back(&mgr, &dst, &stream) == src,
        "bytes differ after the ring"
    );
    // The same bytes copied straight from pageable memory would run at the pageable
    // speed: the ring is what makes the difference.
    assert!(sim.config().pageable_gbps < 0.5 * link);
}

/// A manager over the fake HIP runtime, which runs queued copies only when a stream is
/// waited for; with its host pool, device pool and a stream.
fn on_fake_hip() -> (
    fake_hip::FakeHip,
    Manager,
    hetmem::pool::HostPool,
    hetmem::pool::DevicePool,
    hetmem::Stream,
) {
    let fake = fake_hip::FakeHip::with_devices(1, 512 << 20).unwrap();
    let mgr = Manager::builder()
        .backend(BackendKind::Rocm)
        .rocm_library(fake.path())
        .build()
        .unwrap();
    let host = mgr.host_pool(HostPoolConfig::default()).unwrap();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let stream = mgr.create_stream(0).unwrap();
    (fake, mgr, host, pool, stream)
}

#[test]
fn slots_wait_for_their_copies_on_an_asynchronous_runtime() {
    let (_fake, mgr, host, pool, stream) = on_fake_hip();
    // Three slots for ten pieces: each slot is refilled while copies are still queued
    // (the fake runs them only when the stream is waited for). A refill that did not
    // wait for its slot's copy would overwrite bytes not yet sent.
    let mut ring = StagingRing::new(&host, &NumaPolicy::Default, 3, MIB, 1).unwrap();
    let src = pattern(10 * MIB, 9);
    let dst = pool.alloc(src.len(), &stream).unwrap();
    ring.upload(&src, &dst, 0, &stream).unwrap();
    assert!(
        read_back(&mgr, &dst, &stream) == src,
        "a slot was refilled under its copy"
    );
    // Uploading into the middle of a block with an offset.
    let part = pattern(3 * MIB + 5, 1);
    ring.upload(&part, &dst, 2 * MIB + 1, &stream).unwrap();
    let back = read_back(&mgr, &dst, &stream);
    assert!(back[2 * MIB + 1..5 * MIB + 6] == part[..]);
    assert!(back[..2 * MIB + 1] == src[..2 * MIB + 1]);
}

#[test]
fn parallel_fillers_wait_for_their_own_slots_copies() {
    let (_fake, mgr, host, pool, stream) = on_fake_hip();
    // Three fillers over five slots (two, two and one each), 25 pieces: every slot is
    // refilled several times by its filler while copies queued by all three wait on the
    // fake's stream.
    let mut ring = StagingRing::new(&host, &NumaPolicy::Default, 5, MIB, 3).unwrap();
    for (seed, len) in [(4u8, 24 * MIB + 333), (5, 12 * MIB), (6, MIB / 2)] {
        let src = pattern(len, seed);
        let dst = pool.alloc(src.len(), &stream).unwrap();
        let r = ring.upload(&src, &dst, 0, &stream).unwrap();
        assert_eq!((r.bytes, r.chunks), (len, len.div_ceil(MIB)));
        assert!(
            read_back(&mgr, &dst, &stream) == src,
            "{len} bytes: a slot was refilled under its copy"
        );
    }
}

#[test]
fn a_mapped_file_streams_like_memory() {
    let mgr = Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(SimConfig::with_devices(1, 1 << 30))
        .build()
        .unwrap();
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("staging-{}.bin", std::process::id()));
    let data = pattern(9 * MIB + 3, 5);
    std::fs::write(&path, &data).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    // SAFETY: the file is ours, written above and not changed while mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let host = mgr.host_pool(HostPoolConfig::default()).unwrap();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let stream = mgr.create_stream(0).unwrap();
    let mut ring = StagingRing::new(&host, &NumaPolicy::Default, 2, 2 * MIB, 2).unwrap();
    let dst = pool.alloc(map.len(), &stream).unwrap();
    ring.upload(&map, &dst, 0, &stream).unwrap();
    assert!(read_back(&mgr, &dst, &stream) == data);
    drop(map);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bad_uploads_are_refused() {
    let mgr = Manager::builder()
        .backend(BackendKind::Sim)
        .build()
        .unwrap();
    let host = mgr.host_pool(HostPoolConfig::default()).unwrap();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let stream = mgr.create_stream(0).unwrap();
    assert!(StagingRing::new(&host, &NumaPolicy::Default, 1, MIB, 1).is_err());
    assert!(StagingRing::new(&host, &NumaPolicy::Default, 2, 0, 1).is_err());
    let mut ring = StagingRing::new(&host, &NumaPolicy::Default, 2, MIB, 1).unwrap();
    let dst = pool.alloc(MIB, &stream).unwrap();
    assert!(matches!(
        ring.upload(&[0; 100], &dst, MIB - 50, &stream),
        Err(Error::OutOfBounds { .. })
    ));
    let other = Manager::builder()
        .backend(BackendKind::Sim)
        .build()
        .unwrap();
    let foreign = other.create_stream(0).unwrap();
    assert!(ring.upload(&[0; 100], &dst, 0, &foreign).is_err());
}

/// Makes every thread this process starts from now on fail to start, as a thread or
/// pids limit does (`clone` answers `EAGAIN`): the soft `RLIMIT_NPROC` goes to 0.
/// Root is exempt from that limit (and so is `CAP_SYS_RESOURCE`), so a root process
/// first becomes `nobody` (uid and gid 65534), which drops its capabilities; the hard
/// limit stays, so [`allow_threads`] can lift the soft one again. Returns the hard
/// limit. For a child process only: it cannot become root again.
fn forbid_threads() -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `struct rlimit`.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NPROC, &mut lim) }, 0);
    let hard = lim.rlim_max;
    lim.rlim_cur = 0;
    // SAFETY: as above; lowering the soft limit needs no privilege.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &lim) }, 0);
    // SAFETY: plain system calls on this process's credentials, no pointers but the
    // NULL group list of length 0.
    unsafe {
        if libc::geteuid() == 0 {
            assert_eq!(libc::setgroups(0, std::ptr::null()), 0, "setgroups");
            assert_eq!(libc::setgid(65534), 0, "setgid(65534)");
            assert_eq!(libc::setuid(65534), 0, "setuid(65534)");
        }
    }
    // The limit must bind here, or the test would prove nothing.
    let probe = std::thread::Builder::new().spawn(|| ());
    match probe {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "{e}"),
        Ok(h) => {
            h.join().unwrap();
            panic!("RLIMIT_NPROC 0 does not stop threads here: cannot test thread exhaustion");
        }
    }
    hard
}

/// Lifts the soft `RLIMIT_NPROC` to `hard` again.
fn allow_threads(hard: libc::rlim_t) {
    let lim = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid `struct rlimit`; raising the soft limit up to the hard
    // one needs no privilege.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &lim) }, 0);
}

/// Issue 15: with no thread to start (a pids or thread limit), every path that starts
/// threads (the ring's fillers, a host region pre-faulted and registered in parallel,
/// the tier store's cold loads, and the same through C) works on the calling thread
/// alone instead of panicking; once threads can start again they are used again.
#[test]
fn with_no_thread_to_start_the_caller_does_the_work() {
    use hetmem::ffi::tier::*;
    use hetmem::ffi::{hetmem_last_error, memory::hetmem_manager_create, HETMEM_OK};
    use hetmem::tier::{TierConfig, TierStore};

    if child::alone(
        module_path!(),
        "with_no_thread_to_start_the_caller_does_the_work",
    )
    .is_some()
    {
        return;
    }
    let mgr = Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(SimConfig::with_devices(1, 1 << 30))
        .build()
        .unwrap();
    // Regions of 4 MiB and more are faulted and registered by four threads.
    let host = mgr
        .host_pool(HostPoolConfig {
            threads: 4,
            parallel_threshold: 4 * MIB,
            min_register_chunk: 2 * MIB,
            ..HostPoolConfig::default()
        })
        .unwrap();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let stream = mgr.create_stream(0).unwrap();
    let mut ring = StagingRing::new(&host, &NumaPolicy::Default, 8, MIB, 4).unwrap();
    let hard = forbid_threads();

    // Four fillers wanted, none can start: the caller fills all eight slots in turn.
    let src = pattern(24 * MIB + 5, 7);
    let dst = pool.alloc(src.len(), &stream).unwrap();
    let r = ring.upload(&src, &dst, 0, &stream).unwrap();
    assert_eq!((r.bytes, r.chunks), (src.len(), 25));
    assert!(read_back(&mgr, &dst, &stream) == src, "bytes differ");

    // A region faulted in four parts and registered in four pieces, by the caller.
    let before = host.stats().pinned;
    let mut blk = host.alloc_pinned(&NumaPolicy::Default, 16 * MIB).unwrap();
    let after = host.stats().pinned;
    assert_eq!(after.regions_created, before.regions_created + 1);
    assert_eq!(after.registrations, before.registrations + 4, "{after:?}");
    blk.as_mut_slice().unwrap().fill(3);
    drop(blk);

    // A cold load through a store's ring of four fillers (the host budget holds the
    // ring only, so every load is staged).
    let mut cfg = TierConfig::new(64 * MIB, 16 * MIB);
    cfg.staging_threads = 4;
    let store = TierStore::new(&mgr, cfg).unwrap();
    let bytes = pattern(20 * MIB, 1);
    let w = store.register("w", bytes.clone().into()).unwrap();
    let g = store.acquire(w, &stream).unwrap();
    drop(g);
    assert_eq!(store.stats().staged_loads, 1);
    assert!(store.read(w).unwrap() == bytes, "the staged load differs");

    // The same through C: an error code would do, HETMEM_ERR_PANIC would not.
    let last = || {
        // SAFETY: hetmem_last_error returns a valid NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(hetmem_last_error()) }
            .to_string_lossy()
            .into_owned()
    };
    // SAFETY: every pointer is a live local or NULL where the call allows it; the
    // handles come from the calls before.
    unsafe {
        let mut m = std::ptr::null_mut();
        assert_eq!(hetmem_manager_create(c"sim".as_ptr(), &mut m), HETMEM_OK);
        let mut c = std::mem::zeroed::<HetmemStoreConfig>();
        assert_eq!(
            hetmem_store_config_init(&mut c, 64 * MIB, 16 * MIB),
            HETMEM_OK
        );
        c.staging_threads = 4;
        let mut s = std::ptr::null_mut();
        assert_eq!(hetmem_store_create(m, &c, &mut s), HETMEM_OK, "{}", last());
        let mut id = 0u32;
        let rc = hetmem_store_register(
            s,
            c"w".as_ptr(),
            bytes.as_ptr().cast(),
            bytes.len(),
            &mut id,
        );
        assert_eq!(rc, HETMEM_OK, "{}", last());
        let (mut g, mut p) = (std::ptr::null_mut(), std::ptr::null_mut());
        let rc = hetmem_store_acquire(s, id, std::ptr::null_mut(), &mut g, &mut p);
        assert_eq!(rc, HETMEM_OK, "{}", last());
        assert_eq!(hetmem_guard_release(g), HETMEM_OK);
        assert_eq!(hetmem_store_destroy(s), HETMEM_OK);
        assert_eq!(hetmem::ffi::memory::hetmem_manager_destroy(m), HETMEM_OK);
    }

    // Threads can start again: so can the fillers.
    allow_threads(hard);
    std::thread::spawn(|| ()).join().unwrap();
    let src = pattern(16 * MIB, 2);
    let dst = pool.alloc(src.len(), &stream).unwrap();
    ring.upload(&src, &dst, 0, &stream).unwrap();
    assert!(read_back(&mgr, &dst, &stream) == src, "bytes differ");
}

/// Issue 15: a ring no host could pin (more than the memory available, or than the
/// address space) is refused before a single slot is pinned, with its numbers.
#[test]
fn a_ring_no_memory_can_hold_is_refused_before_anything_is_pinned() {
    use hetmem::MemKind;

    let mgr = Manager::builder()
        .backend(BackendKind::Sim)
        .build()
        .unwrap();
    let available = hetmem::host_mem::available_memory();
    let slots = available / (4 * MIB) + 2;
    // Under a budget, pinning slot after slot would stop at the budget; without one,
    // at the kernel's OOM killer. Both are refused up front.
    for budget in [Some(64 * MIB), None] {
        let host = mgr
            .host_pool(HostPoolConfig {
                pinned_budget: budget,
                ..HostPoolConfig::default()
            })
            .unwrap();
        let err = StagingRing::new(&host, &NumaPolicy::Default, slots, 4 * MIB, 1).unwrap_err();
        assert!(
            matches!(err, Error::OutOfMemory { kind: MemKind::Pinned, requested, free, .. }
                if requested == slots * 4 * MIB && free < requested),
            "{err}"
        );
        let err =
            StagingRing::new(&host, &NumaPolicy::Default, usize::MAX, 4 * MIB, 1).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidSize {
                    requested: usize::MAX,
                    ..
                }
            ),
            "{err}"
        );
        for size in [isize::MAX as usize + 1, usize::MAX, 0] {
            let err = StagingRing::new(&host, &NumaPolicy::Default, 2, size, 1).unwrap_err();
            assert!(
                matches!(err, Error::InvalidSize { requested, .. } if requested == size),
                "{size}: {err}"
            );
        }
        let pinned = host.stats().pinned;
        assert_eq!(
            (pinned.regions_created, pinned.registrations),
            (0, 0),
            "pinned before refusing: {pinned:?}"
        );
    }
}
