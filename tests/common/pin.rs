//! Runs a closure on a thread pinned to one CPU, so that code that asks which CPU it
//! runs on (`sched_getcpu`) gets a known answer.

/// Runs `f` on a new thread pinned to the first CPU in `cpus` this process may use;
/// `None` (and `f` not run) where it may use none of them.
pub fn on_one_of<T: Send>(cpus: std::ops::Range<usize>, f: impl FnOnce() -> T + Send) -> Option<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let size = std::mem::size_of::<libc::cpu_set_t>();
            // SAFETY: cpu_set_t is plain bits; all zeroes is the empty set.
            let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: `allowed` is a live local of `size` bytes; pid 0 is this thread.
            if unsafe { libc::sched_getaffinity(0, size, &mut allowed) } != 0 {
                return None;
            }
            let may_use = |c: usize| {
                // SAFETY: `c` is below CPU_SETSIZE (checked first) and `allowed` is
                // initialised above.
                c < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(c, &allowed) }
            };
            let cpu = cpus.clone().find(|&c| may_use(c))?;
            // SAFETY: as above, the empty set.
            let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: `cpu` is below CPU_SETSIZE (checked above); `one` is a live local.
            unsafe { libc::CPU_SET(cpu, &mut one) };
            // SAFETY: `one` is a live local of `size` bytes; pid 0 is this thread.
            if unsafe { libc::sched_setaffinity(0, size, &one) } != 0 {
                return None;
            }
            Some(f())
        })
        .join()
        .expect("the pinned thread panicked")
    })
}
