//! Graph capture: what the fake refuses during one, and the pool and tier store making
//! no illegal call inside one.

use super::*;

// ------------------------------------------------------------------- graph capture

type CuBeginCaptureFn = unsafe extern "C" fn(*mut c_void, c_int) -> c_int;
type CuEndCaptureFn = unsafe extern "C" fn(*mut c_void, *mut *mut c_void) -> c_int;
type CuIsCapturingFn = unsafe extern "C" fn(*mut c_void, *mut c_int) -> c_int;
type CuEventCreateFn = unsafe extern "C" fn(*mut *mut c_void, u32) -> c_int;
type CuEventRecordFn = unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int;
type CuWaitEventFn = unsafe extern "C" fn(*mut c_void, *mut c_void, u32) -> c_int;
type CuCtxSyncFn = unsafe extern "C" fn() -> c_int;

const GLOBAL: c_int = 0;
const RELAXED: c_int = 2;

/// The fake's capture entry points, called directly (as PyTorch's runtime does).
struct Capture {
    begin: CuBeginCaptureFn,
    end: CuEndCaptureFn,
    status: CuIsCapturingFn,
    destroy_graph: CuStreamFn,
}

impl Capture {
    fn new() -> Capture {
        Capture {
            begin: raw(c"cuStreamBeginCapture_v2"),
            end: raw(c"cuStreamEndCapture"),
            status: raw(c"cuStreamIsCapturing"),
            destroy_graph: raw(c"cuGraphDestroy"),
        }
    }

    fn begin(&self, s: *mut c_void, mode: c_int) -> c_int {
        // SAFETY: `s` is a live stream of the current context (or a special value).
        unsafe { (self.begin)(s, mode) }
    }

    /// Ends the capture; on success destroys the graph it made.
    fn end(&self, s: *mut c_void) -> c_int {
        let mut g = std::ptr::null_mut();
        // SAFETY: `s` is a live stream; `g` a valid out-pointer.
        let rc = unsafe { (self.end)(s, &mut g) };
        assert_eq!(
            rc == 0,
            !g.is_null(),
            "a graph exactly when the capture succeeded"
        );
        if !g.is_null() {
            // SAFETY: a live graph, destroyed once.
            assert_eq!(unsafe { (self.destroy_graph)(g) }, 0);
            // SAFETY: as above; destroyed already.
            assert_eq!(unsafe { (self.destroy_graph)(g) }, code::INVALID_VALUE);
        }
        rc
    }

    fn status(&self, s: *mut c_void) -> c_int {
        let mut st = -1;
        // SAFETY: `s` is a live stream; `st` a valid out-pointer.
        assert_eq!(unsafe { (self.status)(s, &mut st) }, 0);
        st
    }
}

fn stream_ptr(s: &hetmem::Stream) -> *mut c_void {
    std::ptr::with_exposed_provenance_mut(s.handle().0 as usize)
}

/// The fake refuses, with the driver's codes, what the programming guide forbids
/// during a capture, and each refusal invalidates the capture; a stream waiting for a
/// captured event joins the capture; unsafe calls fail only in global mode.
#[test]
fn the_fake_refuses_what_a_capture_forbids() {
    let (f, _g, _b) = setup();
    let _ctx = bind_primary(0);
    let cap = Capture::new();
    let create: CuStreamCreateFn = raw(c"cuStreamCreate");
    let destroy: CuStreamFn = raw(c"cuStreamDestroy_v2");
    let sync: CuStreamFn = raw(c"cuStreamSynchronize");
    let ev_create: CuEventCreateFn = raw(c"cuEventCreate");
    let ev_destroy: CuStreamFn = raw(c"cuEventDestroy_v2");
    let record: CuEventRecordFn = raw(c"cuEventRecord");
    let query: CuStreamFn = raw(c"cuEventQuery");
    let ev_sync: CuStreamFn = raw(c"cuEventSynchronize");
    let wait: CuWaitEventFn = raw(c"cuStreamWaitEvent");
    let ctx_sync: CuCtxSyncFn = raw(c"cuCtxSynchronize");
    let alloc: CuMemAllocFn = raw(c"cuMemAlloc_v2");
    let free: CuMemFreeFn = raw(c"cuMemFree_v2");
    let memcpy: CuMemcpyFn = raw(c"cuMemcpyAsync");
    let (mut s, mut t, mut e, mut e2) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    let (mut x, mut y) = (0u64, 0u64);
    let violations = f.stat("capture_violations");
    let joins = f.stat("capture_joins");
    // SAFETY: every handle is made here in the current context and destroyed at the
    // end; the out-pointers are valid; the device buffers are 1 MiB each.
    unsafe {
        assert_eq!(create(&mut s, 1), 0);
        assert_eq!(create(&mut t, 1), 0);
        assert_eq!(ev_create(&mut e, 2), 0);
        assert_eq!(ev_create(&mut e2, 2), 0);
        assert_eq!(alloc(&mut x, MIB), 0);
        assert_eq!(alloc(&mut y, MIB), 0);

        // A captured event may not be queried: 907, and the capture is invalidated.
        assert_eq!(
            cap.begin(std::ptr::null_mut(), GLOBAL),
            code::STREAM_CAPTURE_UNSUPPORTED
        );
        assert_eq!(cap.begin(s, GLOBAL), 0);
        assert_eq!(cap.begin(s, GLOBAL), code::ILLEGAL_STATE);
        assert_eq!((cap.status(s), cap.status(t)), (1, 0));
        assert_eq!(record(e, s), 0);
        assert_eq!(query(e), code::CAPTURED_EVENT);
        assert_eq!(cap.status(s), 2, "invalidated");
        assert_eq!(cap.end(s), code::STREAM_CAPTURE_INVALIDATED);
        assert_eq!(cap.status(s), 0);
        assert_eq!(
            ev_sync(e),
            code::CAPTURED_EVENT,
            "still last recorded in a capture"
        );
        assert_eq!(record(e, t), 0);
        assert_eq!(query(e), 0, "recorded again outside");

        // Synchronising a capturing stream, or the context: 900.
        assert_eq!(cap.begin(s, GLOBAL), 0);
        assert_eq!(sync(s), code::STREAM_CAPTURE_UNSUPPORTED);
        assert_eq!(cap.end(s), code::STREAM_CAPTURE_INVALIDATED);
        assert_eq!(cap.begin(s, RELAXED), 0);
        assert_eq!(ctx_sync(), code::STREAM_CAPTURE_UNSUPPORTED);
        assert_eq!(cap.end(s), code::STREAM_CAPTURE_INVALIDATED);

        // Waiting for an event recorded outside: 905, unless external.
        assert_eq!(record(e2, t), 0);
        assert_eq!(cap.begin(s, GLOBAL), 0);
        assert_eq!(wait(s, e2, 0), code::STREAM_CAPTURE_ISOLATION);
        assert_eq!(cap.end(s), code::STREAM_CAPTURE_INVALIDATED);
        assert_eq!(cap.begin(s, GLOBAL), 0);
        assert_eq!(wait(s, e2, 1), 0, "CU_EVENT_WAIT_EXTERNAL");
        assert_eq!(cap.end(s), 0);
        assert_eq!(
            wait(s, e2, 1),
            code::INVALID_VALUE,
            "external outside a capture"
        );

        // A stream waiting for a captured event joins the capture; its work must be
        // joined back before the end.
        let queued = f.stat("queued_ops");
        assert_eq!(cap.begin(s, GLOBAL), 0);
        assert_eq!(record(e, s), 0);
        assert_eq!(wait(t, e, 0), 0);
        assert_eq!(cap.status(t), 1, "t joined the capture");
        assert_eq!(memcpy(y, x, MIB, t), 0);
        assert_eq!(f.stat("queued_ops"), queued, "captured, not queued");
        assert_eq!(cap.end(s), code::STREAM_CAPTURE_UNJOINED);
        assert_eq!(cap.status(t), 0);
        assert_eq!(cap.begin(s, GLOBAL), 0);
        assert_eq!(record(e, s), 0);
        assert_eq!(wait(t, e, 0), 0);
        assert_eq!(memcpy(y, x, MIB, t), 0);
        assert_eq!(record(e2, t), 0);
        assert_eq!(wait(s, e2, 0), 0, "joined back");
        assert_eq!(cap.end(s), 0);
        assert_eq!(f.stat("capture_joins"), joins + 2);

        // Calls that synchronise the device: refused in global mode, not in relaxed.
        assert_eq!(cap.begin(s, GLOBAL), 0);
        assert_eq!(free(y), code::STREAM_CAPTURE_UNSUPPORTED);
        assert_eq!(cap.end(s), code::STREAM_CAPTURE_INVALIDATED);
        assert_eq!(cap.begin(s, RELAXED), 0);
        assert_eq!(free(y), 0);
        assert_eq!(cap.end(s), 0);

        assert_eq!(f.stat("captures"), 0);
        assert_eq!(f.stat("graphs"), 0);
        assert_eq!(f.stat("capture_violations"), violations + 6);
        assert_eq!(free(x), 0);
        for ev in [e, e2] {
            assert_eq!(ev_destroy(ev), 0);
        }
        for st in [s, t] {
            assert_eq!(destroy(st), 0);
        }
    }
}

/// The device pool over the CUDA backend, allocating and freeing inside a capture in
/// global mode (with a private pool, and with the pool not told): no call the fake
/// refuses, no stream joined, the capture ends with a graph; the graph's block is not
/// handed out outside its pool until released.
#[test]
fn a_pool_cycle_in_a_capture_makes_no_illegal_call() {
    let (f, _g, _b) = setup();
    let mgr = cuda_manager();
    let _ctx = bind_primary(0);
    let cap = Capture::new();
    for told in [true, false] {
        let pool = mgr
            .device_pool(
                0,
                PoolConfig {
                    budget: Budget::Bytes(128 * MIB),
                    ..PoolConfig::default()
                },
            )
            .unwrap();
        let (a, b) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
        // What a capture of `a` would trip over: a's free block (an idle reclaim
        // queries a), b's block used on a (its free records on a).
        drop(pool.alloc(3 * MIB, &a).unwrap());
        drop(pool.alloc(5 * MIB, &b).unwrap());
        let shared = pool.alloc(6 * MIB, &b).unwrap();
        shared.record_stream(&a).unwrap();
        let id = hetmem::pool::PrivatePoolId(9, 0);
        if told {
            let h = a.handle();
            pool.begin_allocate_to_pool(id, move |s| s.handle() == h)
                .unwrap();
        }
        let (violations, joins) = (f.stat("capture_violations"), f.stat("capture_joins"));
        assert_eq!(cap.begin(stream_ptr(&a), GLOBAL), 0);
        assert!(a.is_capturing().unwrap() && !b.is_capturing().unwrap());
        let mut held = Vec::new();
        let mut graph_block = 0;
        for (i, size) in [MIB, 7 * MIB, 512, 3 * MIB, 20 * MIB]
            .into_iter()
            .enumerate()
        {
            let blk = pool.alloc(size, &a).unwrap();
            if size == 7 * MIB {
                graph_block = blk.ptr().0;
            }
            held.push(blk);
            drop(pool.alloc(size + 4096 * i, &b).unwrap());
        }
        drop(shared);
        drop(held);
        assert!(matches!(
            pool.alloc(200 * MIB, &a),
            Err(Error::OutOfMemory { .. })
        ));
        assert_eq!(f.stat("capture_violations"), violations, "told {told}");
        assert_eq!(f.stat("capture_joins"), joins, "told {told}");
        assert_eq!(cap.end(stream_ptr(&a)), 0, "told {told}: a graph");
        if told {
            pool.end_allocate_to_pool(id).unwrap();
            let outside: Vec<_> = (0..3).map(|_| pool.alloc(7 * MIB, &b).unwrap()).collect();
            assert!(outside.iter().all(|o| o.ptr().0 != graph_block));
            drop(outside);
            pool.release_pool(id).unwrap();
        }
        drop(pool.alloc(MIB, &b).unwrap());
        pool.trim().unwrap();
        assert_eq!(pool.reserved(), 0, "told {told}");
        assert_eq!(f.stat("capture_violations"), violations);
    }
    // Tight: the only memory that fits another stream's request is a free block of the
    // capturing stream's. It stays that stream's (reclaiming it would query the
    // capturing stream; handing it over would record on it), and the request fails.
    let tight = mgr
        .device_pool(
            0,
            PoolConfig {
                budget: Budget::Bytes(24 * MIB),
                ..PoolConfig::default()
            },
        )
        .unwrap();
    let (a, b) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
    drop(tight.alloc(16 * MIB, &a).unwrap());
    let violations = f.stat("capture_violations");
    assert_eq!(cap.begin(stream_ptr(&a), GLOBAL), 0);
    assert!(matches!(
        tight.alloc(16 * MIB, &b),
        Err(Error::OutOfMemory { .. })
    ));
    assert_eq!(f.stat("capture_violations"), violations);
    assert_eq!(cap.end(stream_ptr(&a)), 0);
    drop(tight.alloc(16 * MIB, &b).unwrap());
}

/// The tier store over the CUDA backend: an acquire of a resident parameter in a
/// capture (global mode) makes no illegal call, one of a parameter that is not
/// resident is refused without loading, and the copy stream never joins the capture.
#[test]
fn a_tier_store_acquire_in_a_capture_makes_no_illegal_call() {
    let (f, _g, _b) = setup();
    let mgr = cuda_manager();
    let _ctx = bind_primary(0);
    let cap = Capture::new();
    let layer = 4 * MIB;
    let store = TierStore::new(&mgr, TierConfig::new(2 * layer, 8 * layer)).unwrap();
    for i in 0..4 {
        store
            .register(&format!("w{i}"), layer_bytes(i, layer).into())
            .unwrap();
    }
    let (capture, other) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
    drop(store.acquire(0, &other).unwrap());
    let (violations, joins) = (f.stat("capture_violations"), f.stat("capture_joins"));
    assert_eq!(cap.begin(stream_ptr(&capture), GLOBAL), 0);
    let g = store.acquire(0, &capture).unwrap();
    assert!(matches!(
        store.acquire(3, &capture),
        Err(Error::StreamCapturing { .. })
    ));
    drop(g);
    // Another stream's loads meanwhile evict what the capture used.
    for i in 1..4 {
        drop(store.acquire(i, &other).unwrap());
    }
    assert!(!store.copy_stream().is_capturing().unwrap());
    assert_eq!(f.stat("capture_violations"), violations);
    assert_eq!(f.stat("capture_joins"), joins);
    assert_eq!(cap.end(stream_ptr(&capture)), 0);
    assert_eq!(store.read(3).unwrap(), layer_bytes(3, layer));
}
