//! `NumaAlloc` against `std::alloc::System`, side by side, through the same generic
//! `GlobalAlloc` calls behind the same out-of-line wrapper (`Shim`, standing for the
//! `__rust_alloc` entry points of an installed global allocator), with the allocator
//! passed through `black_box` so neither side's dispatch is folded away.
//!
//! ```text
//! cargo bench --bench global_alloc
//! ```
//!
//! Cases:
//! - `small_boxes`: 64 blocks of 16..1024 bytes allocated, written, then freed;
//! - `vec_push`: a `Vec<u64>`-style buffer grown by doubling with `realloc` from 4 to
//!   1024 elements (8 KiB), every element written;
//! - `free_2MiB`: a 2 MiB block (the default threshold) allocated and freed untouched:
//!   the system calls of the mapped path against malloc's;
//! - `touch_2MiB`, `touch_64MiB`: one block allocated, one byte written per 4 KiB, freed
//!   (the large path, for information).
//!
//! The NumaAlloc side is `NumaAlloc::bind(0)`, so its large path includes `mbind`.
//!
//! Criterion reports each side; the final table comes from an interleaved A/B run
//! (see `main`) with the ratio NumaAlloc / System. The target for the small cases is a
//! ratio of at most 1.10.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use hetmem::host_mem::numa_alloc::NumaAlloc;

const SIZES: [usize; 8] = [16, 24, 48, 64, 128, 256, 512, 1024];

/// The way a program reaches an installed `#[global_allocator]`: `__rust_alloc` and
/// friends are out-of-line functions that call the allocator's methods on the static
/// (inlined into them). Both allocators are measured behind this same wrapper, so the
/// workload loops compile to the same code and only the allocator differs.
struct Shim<A: 'static>(&'static A);

// SAFETY: every method forwards to the wrapped allocator with the caller's arguments.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Shim<A> {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.0.alloc(layout) }
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}

/// 64 blocks of mixed small sizes: alloc all, write each, free all.
fn small_boxes<A: GlobalAlloc>(a: &A) -> usize {
    let mut ptrs = [(std::ptr::null_mut::<u8>(), 0usize); 64];
    for (i, slot) in ptrs.iter_mut().enumerate() {
        let size = black_box(SIZES[i % SIZES.len()]);
        let layout = Layout::from_size_align(size, 8).unwrap();
        // SAFETY: non-zero layout.
        let p = unsafe { a.alloc(layout) };
        assert!(!p.is_null());
        // SAFETY: `p` holds `size >= 16` bytes.
        unsafe { p.write(i as u8) };
        *slot = (p, size);
    }
    let mut sum = 0;
    for &(p, size) in &ptrs {
        // SAFETY: allocated above with this size and alignment 8.
        unsafe {
            sum += *p as usize;
            a.dealloc(p, Layout::from_size_align_unchecked(size, 8));
        }
    }
    sum
}

/// Writes `from..to` of a `u64` buffer: one shared, out-of-line loop for both sides.
///
/// # Safety
/// `p` must be valid for writes of `to` elements.
#[inline(never)]
unsafe fn write_range(p: *mut u64, from: usize, to: usize) {
    for i in from..to {
        // SAFETY: `i < to`, within the caller's buffer.
        unsafe { p.add(i).write(i as u64) };
    }
}

/// What `Vec<u64>::push` does to its allocator: start at 4 elements, double with
/// `realloc` up to 1024 (8 KiB), every element written.
fn vec_push<A: GlobalAlloc>(a: &A) -> u64 {
    let n = black_box(1024usize);
    let mut cap = 4usize;
    let mut layout = Layout::array::<u64>(cap).unwrap();
    // SAFETY: non-zero layout.
    let mut p = unsafe { a.alloc(layout) }.cast::<u64>();
    assert!(!p.is_null());
    let mut len = 0;
    while len < n {
        if len == cap {
            let new = Layout::array::<u64>(cap * 2).unwrap();
            // SAFETY: `p` is ours with `layout`; the new size is a valid array size.
            p = unsafe { a.realloc(p.cast(), layout, new.size()) }.cast();
            assert!(!p.is_null());
            cap *= 2;
            layout = new;
        }
        let to = cap.min(n);
        // SAFETY: `to <= cap`.
        unsafe { write_range(p, len, to) };
        len = to;
    }
    // SAFETY: `n - 1 < cap`, written above.
    let last = unsafe { p.add(n - 1).read() };
    // SAFETY: ours with `layout`.
    unsafe { a.dealloc(p.cast(), layout) };
    last
}

/// One block of `size` allocated and freed untouched: the syscalls alone, for the
/// mapped path.
fn alloc_free<A: GlobalAlloc>(a: &A, size: usize) -> usize {
    let layout = Layout::from_size_align(size, 64).unwrap();
    // SAFETY: non-zero layout.
    let p = unsafe { a.alloc(layout) };
    assert!(!p.is_null());
    // SAFETY: ours with `layout`.
    unsafe { a.dealloc(black_box(p), layout) };
    p as usize
}

/// One block of `size`, one byte written per 4 KiB, freed.
fn touch<A: GlobalAlloc>(a: &A, size: usize) -> u8 {
    let layout = Layout::from_size_align(size, 64).unwrap();
    // SAFETY: non-zero layout.
    let p = unsafe { a.alloc(layout) };
    assert!(!p.is_null());
    for off in (0..size).step_by(4096) {
        // SAFETY: `off < size`.
        unsafe { p.add(off).write(1) };
    }
    // SAFETY: written above.
    let x = unsafe { p.add(size - 4096).read() };
    // SAFETY: ours with `layout`.
    unsafe { a.dealloc(p, layout) };
    x
}

static SYSTEM: Shim<System> = Shim(&System);
/// Bound to node 0: the large path pays its `mbind` too (the small path is the same for
/// every policy).
static NUMA_ALLOC: NumaAlloc = NumaAlloc::bind(0);
static NUMA: Shim<NumaAlloc> = Shim(&NUMA_ALLOC);

#[derive(Clone, Copy)]
enum Case {
    SmallBoxes,
    VecPush,
    AllocFree2MiB,
    Touch2MiB,
    Touch64MiB,
}

const CASES: [(&str, Case); 5] = [
    ("small_boxes", Case::SmallBoxes),
    ("vec_push", Case::VecPush),
    ("free_2MiB", Case::AllocFree2MiB),
    ("touch_2MiB", Case::Touch2MiB),
    ("touch_64MiB", Case::Touch64MiB),
];

/// One iteration of `case`, monomorphised for each allocator type alike.
fn run<A: GlobalAlloc>(case: Case, a: &A) -> usize {
    let a = black_box(a);
    match case {
        Case::SmallBoxes => small_boxes(a),
        Case::VecPush => vec_push(a) as usize,
        Case::AllocFree2MiB => alloc_free(a, 2 << 20),
        Case::Touch2MiB => touch(a, 2 << 20) as usize,
        Case::Touch64MiB => touch(a, 64 << 20) as usize,
    }
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (name, case) in CASES {
        let mut g = c.benchmark_group(format!("global_alloc/{name}"));
        if matches!(case, Case::Touch64MiB) {
            g.sample_size(20);
        }
        g.bench_function("system", |b| b.iter(|| run(case, &SYSTEM)));
        g.bench_function("numa", |b| b.iter(|| run(case, &NUMA)));
        g.finish();
    }
    c.final_summary();

    // Criterion measures one side after the other, and on a small shared machine drift
    // between the two runs (frequency, neighbours, malloc's heap state) is as large as
    // the effect. So the table comes from an interleaved A/B run: rounds of a batch of
    // System then a batch of NumaAlloc (order swapped every round), the ratio taken per
    // round, and the medians reported.
    println!(
        "\nNumaAlloc vs System, interleaved A/B, median over rounds (target: small cases <= 1.10)"
    );
    println!(
        "{:<12} {:>12} {:>12} {:>7} {:>15}",
        "case", "System", "NumaAlloc", "ratio", "ratio p25-p75"
    );
    for (name, case) in CASES {
        let (batch, rounds) = match case {
            Case::SmallBoxes | Case::VecPush => (2000, 101),
            Case::AllocFree2MiB => (500, 61),
            Case::Touch2MiB => (50, 41),
            Case::Touch64MiB => (2, 21),
        };
        let r = ab(case, batch, rounds);
        let fmt = |ns: f64| {
            if ns >= 1e4 {
                format!("{:.1} µs", ns / 1e3)
            } else {
                format!("{ns:.0} ns")
            }
        };
        println!(
            "{name:<12} {:>12} {:>12} {:>7.3} {:>7.3}-{:<7.3}",
            fmt(r.system),
            fmt(r.numa),
            r.ratio,
            r.ratio_p25,
            r.ratio_p75
        );
    }
}

struct AbResult {
    system: f64,
    numa: f64,
    ratio: f64,
    ratio_p25: f64,
    ratio_p75: f64,
}

/// Interleaved measurement of `case` on both allocators: ns per iteration.
fn ab(case: Case, batch: u32, rounds: usize) -> AbResult {
    let time = |f: &dyn Fn() -> usize| {
        let t = Instant::now();
        for _ in 0..batch {
            black_box(f());
        }
        t.elapsed().as_nanos() as f64 / f64::from(batch)
    };
    let sys = || run(case, &SYSTEM);
    let numa = || run(case, &NUMA);
    // Warm both up.
    time(&sys);
    time(&numa);
    let (mut ts, mut tn, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (s, n) = if round % 2 == 0 {
            let s = time(&sys);
            (s, time(&numa))
        } else {
            let n = time(&numa);
            (time(&sys), n)
        };
        ts.push(s);
        tn.push(n);
        ratios.push(n / s);
    }
    let q = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    AbResult {
        system: q(&mut ts, 0.5),
        numa: q(&mut tn, 0.5),
        ratio: q(&mut ratios, 0.5),
        ratio_p25: q(&mut ratios, 0.25),
        ratio_p75: q(&mut ratios, 0.75),
    }
}
