//! `NumaAlloc` installed as the process's `#[global_allocator]`: everything this test
//! binary allocates (the test harness, threads, std's own buffers) goes through it,
//! which is why it is a binary of its own.

mod common;

use common::smaps;

use std::collections::HashMap;

use hetmem::host_mem::numa_alloc::{NumaAlloc, DEFAULT_THRESHOLD};
use hetmem_sys::numa;

#[global_allocator]
static A: NumaAlloc = NumaAlloc::new();

/// The policy mode of the mapping holding `ptr`.
fn mode_at<T>(ptr: *const T) -> i32 {
    numa::policy_of_address(ptr.cast()).unwrap().0
}

#[test]
fn vec_growth_through_the_threshold() {
    let mut v: Vec<u64> = Vec::new();
    for i in 0..(4 * DEFAULT_THRESHOLD / 8) as u64 {
        v.push(i * 3);
    }
    assert!(v.capacity() * 8 >= DEFAULT_THRESHOLD);
    // The buffer is now one of ours: a 2 MiB-aligned, THP-advised mapping.
    assert_eq!(v.as_ptr() as usize % (2 << 20), 0);
    assert!(smaps::huge_advised(v.as_ptr() as usize));
    assert_eq!(mode_at(v.as_ptr()), numa::MPOL_DEFAULT);
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3));
    v.truncate(10);
    v.shrink_to_fit();
    assert_eq!(v, (0..10).map(|i| i * 3).collect::<Vec<u64>>());
    let big = vec![7u8; 64 << 20];
    assert!(big.iter().all(|&b| b == 7));
    let zeroed = vec![0u32; 16 << 20];
    assert!(zeroed.iter().all(|&b| b == 0));
}

#[test]
fn strings_and_maps() {
    let mut s = String::new();
    for i in 0..200_000 {
        s.push_str(&i.to_string());
        s.push(',');
    }
    assert!(s.len() > DEFAULT_THRESHOLD / 2);
    let parsed: Vec<u32> = s
        .split(',')
        .filter(|t| !t.is_empty())
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(parsed.len(), 200_000);
    assert_eq!(parsed[199_999], 199_999);

    let mut m: HashMap<String, Vec<u8>> = HashMap::new();
    for i in 0..20_000u32 {
        let len = if i % 5000 == 0 {
            3 << 20
        } else {
            (i % 300) as usize
        };
        m.insert(format!("key-{i}"), vec![(i % 256) as u8; len]);
    }
    for i in (0..20_000u32).step_by(7) {
        let v = &m[&format!("key-{i}")];
        assert!(v.iter().all(|&b| b == (i % 256) as u8));
    }
    m.retain(|_, v| v.len() < 100);
    assert!(m.len() < 20_000);
}

#[test]
fn threads_allocate_concurrently() {
    let handles: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let mut total = 0usize;
                for i in 0..50 {
                    let small: Vec<Box<[u8]>> = (0..100)
                        .map(|j| vec![t as u8; 16 + j * 8].into_boxed_slice())
                        .collect();
                    let large = vec![i as u8; (3 << 20) + i * 4096];
                    total += small.iter().map(|b| b.len()).sum::<usize>() + large.len();
                    assert_eq!(large[large.len() - 1], i as u8);
                }
                total
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap() > 0);
    }
}
