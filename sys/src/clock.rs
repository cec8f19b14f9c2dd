//! The CPU's time-stamp counter, for timestamps cheaper than a clock read (the
//! profiler's events). Whether it runs at a constant rate, in step on every CPU, is for
//! the caller to decide (Linux says so by using it as its clock source).

/// The time-stamp counter (`rdtsc`), where the architecture has one.
#[inline(always)]
pub fn tsc() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `rdtsc` reads a register; every x86_64 CPU has it, and it touches no
        // memory.
        Some(unsafe { core::arch::x86_64::_rdtsc() })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Whether Linux keeps its monotonic clock on the time-stamp counter (then the counter
/// is constant-rate and synchronised across CPUs, as the kernel checked at boot).
pub fn tsc_is_clock_source() -> bool {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .is_ok_and(|s| s.trim() == "tsc")
}
