//! One limit shared by several processes (`HETMEM_DEVICE_LIMIT_SHARED=name`): each
//! process publishes what it holds per device in its own slot of a shared mapping
//! (`/dev/shm/hetmem-limit-<name>`), and a charge counts the slots of the other live
//! processes too. Charges are serialised across processes with `flock` on the file (the
//! kernel drops it with a dying process); a process that died holding memory stops
//! counting once its pid is gone, and its slot is taken again. Opened at the first
//! charge, so a process that never allocates on a GPU never touches it.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::MAX_DEVICES;

const SLOTS: usize = 256;

#[repr(C)]
struct Slot {
    pid: AtomicU32,
    _pad: u32,
    held: [AtomicU64; MAX_DEVICES],
}

static BASE: AtomicUsize = AtomicUsize::new(0);
static FD: AtomicI32 = AtomicI32::new(-1);
static MINE: AtomicUsize = AtomicUsize::new(usize::MAX);
static MINE_PID: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);

/// Whether `name` is a usable name (letters, digits, `-`, `_`, `.`; not empty).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.')
}

fn slots() -> Option<&'static [Slot]> {
    let b = BASE.load(Ordering::Acquire);
    if b == 0 {
        return None;
    }
    // SAFETY: BASE is a live shared mapping of SLOTS slots, never unmapped; the slots
    // are atomics, shared with other processes.
    Some(unsafe { std::slice::from_raw_parts(b as *const Slot, SLOTS) })
}

/// Opens (or creates) the shared table; false when it cannot (said once).
fn open(name: &str) -> bool {
    if BASE.load(Ordering::Acquire) != 0 {
        return true;
    }
    if FAILED.load(Ordering::Relaxed) != 0 {
        return false;
    }
    let path = format!("/dev/shm/hetmem-limit-{name}\0");
    let len = SLOTS * std::mem::size_of::<Slot>();
    // SAFETY: a NUL-terminated path; the descriptor and mapping are ours and kept for
    // the life of the process.
    let ok = unsafe {
        let fd = libc::open(
            path.as_ptr().cast(),
            libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
            0o600,
        );
        if fd < 0 {
            false
        } else {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) == 0 && (st.st_size as usize) < len {
                libc::ftruncate(fd, len as libc::off_t);
            }
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            if p == libc::MAP_FAILED {
                libc::close(fd);
                false
            } else {
                FD.store(fd, Ordering::Relaxed);
                BASE.store(p as usize, Ordering::Release);
                true
            }
        }
    };
    if !ok {
        FAILED.store(1, Ordering::Relaxed);
        crate::say(&format!(
            "HETMEM_DEVICE_LIMIT_SHARED={name}: cannot open {}; the limit is this process's own",
            path.trim_end_matches('\0')
        ));
    }
    ok
}

fn flock(op: libc::c_int) {
    let fd = FD.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: our descriptor; EINTR retried.
        while unsafe { libc::flock(fd, op) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
        {}
    }
}

fn alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// This process's slot (claimed at first use, again after a fork); call under the
/// file lock.
fn mine(s: &'static [Slot]) -> Option<&'static Slot> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    if MINE_PID.load(Ordering::Relaxed) == pid {
        return s.get(MINE.load(Ordering::Relaxed));
    }
    let i = s.iter().position(|sl| {
        let p = sl.pid.load(Ordering::Relaxed);
        p == pid || !alive(p)
    })?;
    let sl = &s[i];
    sl.pid.store(pid, Ordering::Relaxed);
    for h in &sl.held {
        h.store(0, Ordering::Relaxed);
    }
    MINE.store(i, Ordering::Relaxed);
    MINE_PID.store(pid, Ordering::Relaxed);
    Some(sl)
}

/// Runs `f` with what the other live processes hold on each device, under the shared
/// lock; `f` returns what this process now holds on device `d`, which is published.
/// `None`: no shared table (the caller decides alone).
pub fn with_others<R>(name: &str, d: usize, f: impl FnOnce(u64) -> (R, u64)) -> Option<R> {
    if !open(name) {
        return None;
    }
    let s = slots()?;
    flock(libc::LOCK_EX);
    let me = mine(s);
    let others: u64 = s
        .iter()
        .filter(|sl| me.is_none_or(|m| !std::ptr::eq(*sl, m)))
        .filter(|sl| alive(sl.pid.load(Ordering::Relaxed)))
        .map(|sl| sl.held.get(d).map_or(0, |h| h.load(Ordering::Relaxed)))
        .fold(0u64, u64::saturating_add);
    let (r, now) = f(others);
    if let Some(h) = me.and_then(|m| m.held.get(d)) {
        h.store(now, Ordering::Relaxed);
    }
    flock(libc::LOCK_UN);
    Some(r)
}

/// Publishes what this process holds on device `d` (after a free).
pub fn publish(d: usize, held: u64) {
    let Some(s) = slots() else { return };
    // SAFETY: getpid has no preconditions.
    if MINE_PID.load(Ordering::Relaxed) != unsafe { libc::getpid() } as u32 {
        return; // a forked child that has not charged yet holds nothing
    }
    if let Some(h) = s
        .get(MINE.load(Ordering::Relaxed))
        .and_then(|m| m.held.get(d))
    {
        h.store(held, Ordering::Relaxed);
    }
}

/// What the other live processes hold on device `d` (0 without a table).
pub fn others(name: &str, d: usize) -> u64 {
    with_others(name, d, |o| (o, current(d))).unwrap_or(0)
}

/// This process's published figure for `d`.
fn current(d: usize) -> u64 {
    let Some(s) = slots() else { return 0 };
    s.get(MINE.load(Ordering::Relaxed))
        .and_then(|m| m.held.get(d))
        .map_or(0, |h| h.load(Ordering::Relaxed))
}
