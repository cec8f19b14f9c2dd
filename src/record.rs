//! The event record: a compact, versioned binary log of allocations, written by the
//! LD_PRELOAD shim (`libhetmem_preload.so`, `HETMEM_RECORD=file`) and by the library's
//! profiler ([`crate::profile`], `HETMEM_PROFILE=file`: device, segment, budget and
//! tier-store events, kinds 16–63), and read by [`Reader`]. The format is meant for
//! profiling tools (`examples/prof`), so it is specified in full.
//!
//! # Layout (version 1)
//!
//! All integers are little-endian. A file is a 64-byte [`Header`] followed by chunks:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `HETMREC\0` |
//! | 8 | 2 | version (1) |
//! | 10 | 2 | header length (64; a reader skips what it does not know) |
//! | 12 | 4 | flags: bit 0 every allocation recorded (else only large ones), bit 1 call stacks sampled |
//! | 16 | 4 | process id |
//! | 20 | 4 | page size |
//! | 24 | 8 | wall clock at start, ns since the Unix epoch |
//! | 32 | 8 | monotonic clock at start, ns (event times count from it) |
//! | 40 | 8 | threshold: requests of at least this many bytes are large |
//! | 48 | 16 | zero (reserved) |
//!
//! A chunk is `u32` payload length, `u32` event count, then that many events. A writer
//! appends whole chunks; a file cut short (a killed process) ends at its last whole
//! chunk, which [`Reader`] treats as the end.
//!
//! An event is: kind (`u8`), body length (LEB128), body. Unknown kinds are skipped by
//! their length, so kinds can be added without a new version. Every body starts with
//! the time (zigzag LEB128: ns since the header's monotonic start, as a difference from
//! the previous event of the same chunk; the first event's difference is from 0) and
//! the thread (LEB128: the kernel's thread id). Then, by kind:
//!
//! | kind | name | fields after time and thread |
//! |---|---|---|
//! | 1 | alloc | address, size, placement (`u8`), node (zigzag; -1: no single node) |
//! | 2 | free | address, size (0: not known), placement (`u8`) |
//! | 3 | realloc | old address, new address, new size, placement (`u8`), node (zigzag) |
//! | 4 | stack | frame count, then return addresses: the first as is, each next as a zigzag difference from the one before; belongs to the thread's previous event |
//! | 5 | dropped | events lost because the in-process queue was full |
//! | 6 | end | events written, events dropped (the last event of a complete record) |
//! | 16 | device alloc | address, size, device, stream (0: none), flags (`u8`: bit 0 a pool block inside a mapped segment, bit 1 managed memory) |
//! | 17 | device free | address, size, device, flags (`u8`, as for alloc) |
//! | 18 | segment map | address, size, device: physical memory mapped (or a pool segment allocated) |
//! | 19 | segment unmap | address, size, device |
//! | 20 | out of memory | placement (`u8`), index (device or node; 2³²−1: none), requested, free, reserved + 1 (0: not known), largest free block + 1 (0: not known) |
//! | 21 | budget | placement (`u8`), index, bytes: the most that tier may hold from now on |
//! | 22 | shim GPU alloc | the LD_PRELOAD shim's CUDA/HIP allocation: see [`gpu`] |
//! | 23 | shim GPU free | its free: see [`gpu`] |
//! | 24–31 | | reserved: device memory |
//! | 32–47 | | reserved: pinned memory (register); pinned allocations are kinds 1 and 2 with placement pinned |
//! | 48 | parameter | id, size, name (length, UTF-8 bytes): a tier-store parameter registered |
//! | 49 | load | id, bytes, stream, start + 1, end + 1 (device clock ns, 0: not known), flags (`u8`: bit 0 ahead of its use (a prefetch), bit 1 through the staging ring, bit 2 outside the plan) |
//! | 50 | evict | id, bytes, flags (`u8`: 0, reserved) |
//! | 51 | write-back | id, bytes, stream, start + 1, end + 1 |
//! | 52 | acquire | id, bytes, outcome (`u8`: 0 a miss, loaded on demand; 1 resident and loaded; 2 resident, its load still in flight) |
//! | 53 | site | the call site of the thread's previous event: text (length, UTF-8 bytes), one symbolised frame a line, innermost first (sampled) |
//! | 54–63 | | reserved: tier store and copies |
//!
//! Numbers are LEB128 unless said otherwise. Placements are [`Placement`]. Events of
//! different threads may appear out of time order (the shim queues them per thread
//! group); sort by time where order matters.

use std::io::Read;

use crate::error::{Error, Result};

// Kinds 16–63 (device, segments, budgets, the tier store): their encoding.
mod kinds;
use kinds::{decode_more, encode_more};

/// The file's first eight bytes.
pub const MAGIC: [u8; 8] = *b"HETMREC\0";
/// The format version this module writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the header this version writes.
pub const HEADER_LEN: usize = 64;
/// Header flag: every allocation is recorded, not only the large ones.
pub const FLAG_ALL: u32 = 1;
/// Header flag: call stacks are sampled.
pub const FLAG_STACKS: u32 = 2;

/// Event kinds (the first byte of an event).
pub mod kind {
    /// An allocation.
    pub const ALLOC: u8 = 1;
    /// A free.
    pub const FREE: u8 = 2;
    /// A resize.
    pub const REALLOC: u8 = 3;
    /// The call stack of the thread's previous event.
    pub const STACK: u8 = 4;
    /// Events lost.
    pub const DROPPED: u8 = 5;
    /// The end of a complete record.
    pub const END: u8 = 6;
    /// First kind reserved for device memory events.
    pub const DEVICE_FIRST: u8 = 16;
    /// First kind reserved for pinned memory events.
    pub const PINNED_FIRST: u8 = 32;
    /// First kind reserved for tier-store events and copies.
    pub const TIER_FIRST: u8 = 48;
    /// Device (or managed) memory allocated.
    pub const DEVICE_ALLOC: u8 = 16;
    /// Device (or managed) memory freed.
    pub const DEVICE_FREE: u8 = 17;
    /// Physical memory mapped into a pool (or a pool segment allocated).
    pub const SEGMENT_MAP: u8 = 18;
    /// Physical memory unmapped from a pool (or a pool segment freed).
    pub const SEGMENT_UNMAP: u8 = 19;
    /// An allocation refused for lack of memory.
    pub const OOM: u8 = 20;
    /// A tier's budget.
    pub const BUDGET: u8 = 21;
    /// A tier-store parameter registered.
    pub const PARAM: u8 = 48;
    /// A tier-store load (host to device).
    pub const LOAD: u8 = 49;
    /// A tier-store eviction.
    pub const EVICT: u8 = 50;
    /// A tier-store write-back (device to host).
    pub const WRITEBACK: u8 = 51;
    /// A tier-store acquire.
    pub const ACQUIRE: u8 = 52;
    /// The symbolised call site of the thread's previous event.
    pub const SITE: u8 = 53;
}

/// Flags of device alloc and free events.
pub mod device_flags {
    /// A pool block, inside memory a segment map event mapped.
    pub const POOL: u8 = 1;
    /// Managed (unified) memory.
    pub const MANAGED: u8 = 2;
}

/// Flags of tier-store load and evict events.
pub mod tier_flags {
    /// Load: queued ahead of its use (a prefetch).
    pub const PREFETCH: u8 = 1;
    /// Load: through the staging ring (the source was pageable or a mapped file).
    pub const STAGED: u8 = 2;
    /// Load: outside the plan (an acquire or a hint that had to load at once).
    pub const UNPLANNED: u8 = 4;
}

/// Outcomes of tier-store acquire events.
pub mod acquire {
    /// Not resident: loaded on demand.
    pub const MISS: u8 = 0;
    /// Resident and loaded.
    pub const HIT: u8 = 1;
    /// Resident, but its load was still in flight (a late prefetch).
    pub const LATE: u8 = 2;
}

/// Where a block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Placement {
    /// glibc's malloc (the shim's small path).
    SmallGlibc = 0,
    /// The shim's fast small path (mimalloc).
    SmallFast = 1,
    /// A large host block of hetmem's (NUMA policy, huge pages).
    Host = 2,
    /// Pinned host memory.
    Pinned = 3,
    /// Device memory.
    Device = 4,
    /// Managed (unified) memory.
    Managed = 5,
    /// A code this version does not know.
    Other = 255,
}

impl Placement {
    /// The placement of a code.
    pub fn from_code(c: u8) -> Placement {
        match c {
            0 => Placement::SmallGlibc,
            1 => Placement::SmallFast,
            2 => Placement::Host,
            3 => Placement::Pinned,
            4 => Placement::Device,
            5 => Placement::Managed,
            _ => Placement::Other,
        }
    }
}

/// The file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Format version.
    pub version: u16,
    /// [`FLAG_ALL`], [`FLAG_STACKS`].
    pub flags: u32,
    /// Process id of the recorded process.
    pub pid: u32,
    /// Its page size.
    pub page_size: u32,
    /// Wall clock at start, ns since the Unix epoch.
    pub start_unix_ns: u64,
    /// Monotonic clock at start, ns.
    pub start_mono_ns: u64,
    /// The large threshold in bytes.
    pub threshold: u64,
}

impl Header {
    /// The 64 bytes of this header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..20].copy_from_slice(&self.pid.to_le_bytes());
        b[20..24].copy_from_slice(&self.page_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.start_unix_ns.to_le_bytes());
        b[32..40].copy_from_slice(&self.start_mono_ns.to_le_bytes());
        b[40..48].copy_from_slice(&self.threshold.to_le_bytes());
        b
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A block was allocated.
    Alloc {
        /// Its address.
        addr: u64,
        /// Bytes asked for.
        size: u64,
        /// Where.
        placement: Placement,
        /// Its NUMA node, where it has one.
        node: Option<u32>,
    },
    /// A block was freed.
    Free {
        /// Its address.
        addr: u64,
        /// Its size where known, else 0.
        size: u64,
        /// Where it was.
        placement: Placement,
    },
    /// A block was resized (maybe moved).
    Realloc {
        /// The old address.
        old: u64,
        /// The new address.
        new: u64,
        /// The new size.
        size: u64,
        /// Where it is now.
        placement: Placement,
        /// Its NUMA node, where it has one.
        node: Option<u32>,
    },
    /// The call stack of this thread's previous event (return addresses, innermost
    /// first).
    Stack {
        /// The frames.
        frames: Vec<u64>,
    },
    /// Events the writer lost (its queue was full).
    Dropped {
        /// How many.
        count: u64,
    },
    /// The record is complete.
    End {
        /// Events written before this one.
        events: u64,
        /// Events lost.
        dropped: u64,
    },
    /// Device or managed memory was allocated (kind 16).
    DeviceAlloc {
        /// Its device address.
        addr: u64,
        /// Bytes asked for.
        size: u64,
        /// The device.
        device: u32,
        /// The stream it belongs to (0: none).
        stream: u64,
        /// [`device_flags`].
        flags: u8,
    },
    /// Device or managed memory was freed (kind 17).
    DeviceFree {
        /// Its device address.
        addr: u64,
        /// Its size.
        size: u64,
        /// The device.
        device: u32,
        /// [`device_flags`].
        flags: u8,
    },
    /// Physical memory mapped into a pool, or a pool segment allocated (kind 18).
    SegmentMap {
        /// The device address.
        addr: u64,
        /// Bytes.
        size: u64,
        /// The device.
        device: u32,
    },
    /// Physical memory unmapped from a pool, or a pool segment freed (kind 19).
    SegmentUnmap {
        /// The device address.
        addr: u64,
        /// Bytes.
        size: u64,
        /// The device.
        device: u32,
    },
    /// An allocation was refused for lack of memory (kind 20).
    OutOfMemory {
        /// The tier.
        placement: Placement,
        /// The device or NUMA node, where there is one.
        index: Option<u32>,
        /// Bytes asked for.
        requested: u64,
        /// Bytes free under the budget.
        free: u64,
        /// Bytes the pool held, where known.
        reserved: Option<u64>,
        /// The largest free block, where known.
        largest_free_block: Option<u64>,
    },
    /// A tier's budget (kind 21).
    Budget {
        /// The tier.
        placement: Placement,
        /// The device or NUMA node, where there is one.
        index: Option<u32>,
        /// The most it may hold.
        bytes: u64,
    },
    /// A tier-store parameter was registered (kind 48).
    Param {
        /// Its id.
        id: u64,
        /// Its size.
        size: u64,
        /// Its name.
        name: String,
    },
    /// A tier-store load (kind 49).
    Load {
        /// The parameter.
        id: u64,
        /// Bytes copied.
        bytes: u64,
        /// The copy stream.
        stream: u64,
        /// Start on the device clock (ns), where the backend knows it.
        start: Option<u64>,
        /// End on the device clock (ns), where the backend knows it.
        end: Option<u64>,
        /// [`tier_flags`].
        flags: u8,
    },
    /// A tier-store eviction (kind 50).
    Evict {
        /// The parameter.
        id: u64,
        /// Device bytes given up.
        bytes: u64,
        /// [`tier_flags`].
        flags: u8,
    },
    /// A tier-store write-back (kind 51).
    WriteBack {
        /// The parameter.
        id: u64,
        /// Bytes copied.
        bytes: u64,
        /// The copy stream.
        stream: u64,
        /// Start on the device clock (ns), where known.
        start: Option<u64>,
        /// End on the device clock (ns), where known.
        end: Option<u64>,
    },
    /// A tier-store acquire (kind 52).
    Acquire {
        /// The parameter.
        id: u64,
        /// Its size.
        bytes: u64,
        /// [`acquire`] outcome.
        outcome: u8,
    },
    /// The call site of this thread's previous event, symbolised (kind 53).
    Site {
        /// Frames, innermost first, one per line.
        text: String,
    },
    /// A kind this version does not know (reserved kinds included), with its body
    /// after the time and thread.
    Unknown {
        /// The kind.
        kind: u8,
        /// The rest of its body.
        body: Vec<u8>,
    },
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// ns since the header's monotonic start.
    pub time_ns: u64,
    /// Kernel thread id.
    pub thread: u32,
    /// What.
    pub kind: EventKind,
}

fn put_uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn node_code(node: Option<u32>) -> u64 {
    zigzag(node.map_or(-1, i64::from))
}

/// A body of the common kinds, built on the stack.
struct Small {
    b: [u8; 64],
    n: usize,
}

impl Default for Small {
    fn default() -> Self {
        Small { b: [0; 64], n: 0 }
    }
}

impl Small {
    fn byte(&mut self, v: u8) {
        if let Some(slot) = self.b.get_mut(self.n) {
            *slot = v;
            self.n += 1;
        }
    }

    fn uleb(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                return self.byte(b);
            }
            self.byte(b | 0x80);
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.b[..self.n]
    }
}

/// Builds one chunk of events. The shim's writer and tests use it; see the module docs
/// for what it writes.
#[derive(Debug, Default)]
pub struct ChunkEncoder {
    buf: Vec<u8>,
    body: Vec<u8>,
    count: u32,
    last_time: u64,
}

impl ChunkEncoder {
    /// An empty chunk.
    pub fn new() -> Self {
        let mut e = ChunkEncoder::default();
        e.clear();
        e
    }

    /// Starts over with no events.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; 8]);
        self.count = 0;
        self.last_time = 0;
    }

    /// Events in the chunk.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether the chunk has no events.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the chunk takes so far.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Appends an event.
    pub fn push(&mut self, e: &Event) {
        let delta = zigzag(e.time_ns.wrapping_sub(self.last_time) as i64);
        self.last_time = e.time_ns;
        // The common kinds are encoded on the stack (at most 52 bytes of body), the
        // others through `body`.
        let mut small = Small::default();
        small.uleb(delta);
        small.uleb(u64::from(e.thread));
        let k = match &e.kind {
            EventKind::Alloc {
                addr,
                size,
                placement,
                node,
            } => {
                small.uleb(*addr);
                small.uleb(*size);
                small.byte(*placement as u8);
                small.uleb(node_code(*node));
                kind::ALLOC
            }
            EventKind::Free {
                addr,
                size,
                placement,
            } => {
                small.uleb(*addr);
                small.uleb(*size);
                small.byte(*placement as u8);
                kind::FREE
            }
            EventKind::Realloc {
                old,
                new,
                size,
                placement,
                node,
            } => {
                small.uleb(*old);
                small.uleb(*new);
                small.uleb(*size);
                small.byte(*placement as u8);
                small.uleb(node_code(*node));
                kind::REALLOC
            }
            other => {
                let b = &mut self.body;
                b.clear();
                b.extend_from_slice(small.bytes());
                let k = match other {
                    EventKind::Stack { frames } => {
                        put_uleb(b, frames.len() as u64);
                        let mut prev = 0u64;
                        for (i, &f) in frames.iter().enumerate() {
                            if i == 0 {
                                put_uleb(b, f);
                            } else {
                                put_uleb(b, zigzag(f.wrapping_sub(prev) as i64));
                            }
                            prev = f;
                        }
                        kind::STACK
                    }
                    EventKind::Dropped { count } => {
                        put_uleb(b, *count);
                        kind::DROPPED
                    }
                    EventKind::End { events, dropped } => {
                        put_uleb(b, *events);
                        put_uleb(b, *dropped);
                        kind::END
                    }
                    EventKind::Unknown { kind, body } => {
                        b.extend_from_slice(body);
                        *kind
                    }
                    other => encode_more(b, other),
                };
                self.buf.push(k);
                put_uleb(&mut self.buf, self.body.len() as u64);
                self.buf.extend_from_slice(&self.body);
                self.count += 1;
                return;
            }
        };
        self.buf.push(k);
        put_uleb(&mut self.buf, small.bytes().len() as u64);
        self.buf.extend_from_slice(small.bytes());
        self.count += 1;
    }

    /// The finished chunk's bytes (length and count filled in); [`clear`](Self::clear)
    /// before the next.
    pub fn finish(&mut self) -> &[u8] {
        let len = (self.buf.len() - 8) as u32;
        self.buf[0..4].copy_from_slice(&len.to_le_bytes());
        self.buf[4..8].copy_from_slice(&self.count.to_le_bytes());
        &self.buf
    }
}

fn bad(reason: impl Into<String>) -> Error {
    Error::Config {
        path: "event record".into(),
        reason: reason.into(),
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn u8(&mut self) -> Result<u8> {
        let v = *self.b.get(self.at).ok_or_else(|| bad("event cut short"))?;
        self.at += 1;
        Ok(v)
    }

    fn uleb(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("number longer than 64 bits"))
    }
}

fn node_of(code: u64) -> Option<u32> {
    u32::try_from(unzigzag(code)).ok()
}

/// Reads a record: the header, then events in file order.
///
/// ```
/// use hetmem::record::{ChunkEncoder, Event, EventKind, Header, Placement, Reader};
/// let mut file = Header { version: 1, pid: 7, ..Header::default() }.encode().to_vec();
/// let mut chunk = ChunkEncoder::new();
/// let alloc = EventKind::Alloc { addr: 4096, size: 64, placement: Placement::Host, node: Some(0) };
/// chunk.push(&Event { time_ns: 10, thread: 1, kind: alloc.clone() });
/// file.extend_from_slice(chunk.finish());
/// let mut r = Reader::new(&file[..])?;
/// assert_eq!(r.header().pid, 7);
/// assert_eq!(r.next_event()?.unwrap().kind, alloc);
/// assert!(r.next_event()?.is_none());
/// # Ok::<(), hetmem::Error>(())
/// ```
pub struct Reader<R: Read> {
    src: R,
    header: Header,
    chunk: Vec<u8>,
    at: usize,
    left: u32,
    last_time: u64,
    truncated: bool,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header.
    pub fn new(mut src: R) -> Result<Self> {
        let mut h = [0u8; 12];
        src.read_exact(&mut h)
            .map_err(|e| bad(format!("no header: {e}")))?;
        if h[0..8] != MAGIC {
            return Err(bad("not a hetmem event record (bad magic)"));
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != VERSION {
            return Err(bad(format!(
                "version {version}; this reader knows {VERSION}"
            )));
        }
        let len = usize::from(u16::from_le_bytes([h[10], h[11]]));
        if len < HEADER_LEN {
            return Err(bad(format!("header of {len} bytes")));
        }
        let mut rest = vec![0u8; len - 12];
        src.read_exact(&mut rest)
            .map_err(|e| bad(format!("header cut short: {e}")))?;
        let u32_at =
            |o: usize| u32::from_le_bytes([rest[o - 12], rest[o - 11], rest[o - 10], rest[o - 9]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&rest[o - 12..o - 4]);
            u64::from_le_bytes(b)
        };
        let header = Header {
            version,
            flags: u32_at(12),
            pid: u32_at(16),
            page_size: u32_at(20),
            start_unix_ns: u64_at(24),
            start_mono_ns: u64_at(32),
            threshold: u64_at(40),
        };
        Ok(Reader {
            src,
            header,
            chunk: Vec::new(),
            at: 0,
            left: 0,
            last_time: 0,
            truncated: false,
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Whether the record ended inside a chunk (the writer was killed).
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    fn next_chunk(&mut self) -> Result<bool> {
        let mut h = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            match self.src.read(&mut h[got..]) {
                Ok(0) => {
                    self.truncated = got != 0;
                    return Ok(false);
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(bad(e.to_string())),
            }
        }
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        self.left = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        self.chunk.resize(len, 0);
        if self.src.read_exact(&mut self.chunk).is_err() {
            self.truncated = true;
            self.left = 0;
            return Ok(false);
        }
        self.at = 0;
        self.last_time = 0;
        Ok(true)
    }

    /// The next event, or `None` at the end.
    pub fn next_event(&mut self) -> Result<Option<Event>> {
        while self.left == 0 {
            if !self.next_chunk()? {
                return Ok(None);
            }
        }
        self.left -= 1;
        let mut c = Cursor {
            b: &self.chunk,
            at: self.at,
        };
        let k = c.u8()?;
        let len = usize::try_from(c.uleb()?).map_err(|_| bad("event length"))?;
        let end = c.at.checked_add(len).filter(|&e| e <= self.chunk.len());
        let end = end.ok_or_else(|| bad("event longer than its chunk"))?;
        let mut c = Cursor {
            b: &self.chunk[..end],
            at: c.at,
        };
        let time_ns = self.last_time.wrapping_add(unzigzag(c.uleb()?) as u64);
        self.last_time = time_ns;
        let thread = u32::try_from(c.uleb()?).map_err(|_| bad("thread id"))?;
        let kind = match k {
            kind::ALLOC => EventKind::Alloc {
                addr: c.uleb()?,
                size: c.uleb()?,
                placement: Placement::from_code(c.u8()?),
                node: node_of(c.uleb()?),
            },
            kind::FREE => EventKind::Free {
                addr: c.uleb()?,
                size: c.uleb()?,
                placement: Placement::from_code(c.u8()?),
            },
            kind::REALLOC => EventKind::Realloc {
                old: c.uleb()?,
                new: c.uleb()?,
                size: c.uleb()?,
                placement: Placement::from_code(c.u8()?),
                node: node_of(c.uleb()?),
            },
            kind::STACK => {
                let n = c.uleb()?;
                let mut frames = Vec::with_capacity(n.min(256) as usize);
                let mut prev = 0u64;
                for i in 0..n {
                    let v = c.uleb()?;
                    prev = if i == 0 {
                        v
                    } else {
                        prev.wrapping_add(unzigzag(v) as u64)
                    };
                    frames.push(prev);
                }
                EventKind::Stack { frames }
            }
            kind::DROPPED => EventKind::Dropped { count: c.uleb()? },
            kind::END => EventKind::End {
                events: c.uleb()?,
                dropped: c.uleb()?,
            },
            other => match decode_more(other, &mut c)? {
                Some(k) => k,
                None => EventKind::Unknown {
                    kind: other,
                    body: self.chunk[c.at..end].to_vec(),
                },
            },
        };
        self.at = end;
        Ok(Some(Event {
            time_ns,
            thread,
            kind,
        }))
    }
}

impl<R: Read> Iterator for Reader<R> {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Result<Event>> {
        self.next_event().transpose()
    }
}

/// Totals of a record, as a profiler would start with them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Allocation events (reallocs not included).
    pub allocs: u64,
    /// Free events.
    pub frees: u64,
    /// Realloc events.
    pub reallocs: u64,
    /// Stack events.
    pub stacks: u64,
    /// Events the writer reported lost.
    pub dropped: u64,
    /// Whether the record ends with its end event.
    pub complete: bool,
    /// Peak of live bytes of large host blocks, replayed by address.
    pub large_peak: u64,
}

/// Reads a whole record and sums it up.
pub fn summarize<R: Read>(src: R) -> Result<(Header, Summary)> {
    let mut r = Reader::new(src)?;
    let header = *r.header();
    let mut s = Summary::default();
    let mut live = std::collections::HashMap::<u64, u64>::new();
    let (mut cur, mut events) = (0u64, Vec::new());
    while let Some(e) = r.next_event()? {
        events.push(e);
    }
    events.sort_by_key(|e| e.time_ns);
    for e in events {
        match e.kind {
            EventKind::Alloc {
                addr,
                size,
                placement,
                ..
            } => {
                s.allocs += 1;
                if placement == Placement::Host {
                    cur += size;
                    live.insert(addr, size);
                }
            }
            EventKind::Free { addr, .. } => {
                s.frees += 1;
                cur -= live.remove(&addr).unwrap_or(0);
            }
            EventKind::Realloc {
                old,
                new,
                size,
                placement,
                ..
            } => {
                s.reallocs += 1;
                cur -= live.remove(&old).unwrap_or(0);
                if placement == Placement::Host {
                    cur += size;
                    live.insert(new, size);
                }
            }
            EventKind::Stack { .. } => s.stacks += 1,
            EventKind::Dropped { count } => s.dropped += count,
            EventKind::End { dropped, .. } => {
                s.complete = true;
                s.dropped = s.dropped.max(dropped);
            }
            _ => {}
        }
        s.large_peak = s.large_peak.max(cur);
    }
    Ok((header, s))
}

// ---- GPU events (issue 18: the LD_PRELOAD shim's GPU side) ---------------------------
//
// Kept apart from the kinds above on purpose: two kinds of the reserved device range,
// read back as `EventKind::Unknown` by `Reader` and decoded with `gpu::decode`, so
// nothing above changes.

/// GPU memory events of the LD_PRELOAD shim: kinds 22 (alloc) and 23 (free) of the
/// reserved device range. Body after time and thread: address, size, memory kind
/// (`u8`, [`gpu::MemKind`]), device (zigzag; -1 for host memory), stream (the raw
/// `CUstream`/`hipStream_t`; 0 the legacy default stream, and for frees).
pub mod gpu {
    /// Kind of a GPU allocation event.
    pub const ALLOC: u8 = crate::record::kind::DEVICE_FIRST + 6;
    /// Kind of a GPU free event.
    pub const FREE: u8 = crate::record::kind::DEVICE_FIRST + 7;

    /// What memory an event is about (the shim's counters' kinds).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    #[repr(u8)]
    pub enum MemKind {
        /// Device memory (cudaMalloc, cuMemAlloc, the async ones, hipMalloc).
        Device = 0,
        /// The program's managed memory.
        Managed = 1,
        /// Page-locked host memory from the driver.
        Pinned = 2,
        /// Host memory the program registered.
        Registered = 3,
        /// Physical memory (cuMemCreate; the address is the handle).
        Physical = 4,
        /// Past a limit, managed memory preferring the host.
        Oversubscribed = 5,
        /// Registered by the shim on a copy.
        PinnedOnCopy = 6,
        /// A code this version does not know.
        Other = 255,
    }

    impl MemKind {
        /// The kind of a code.
        pub fn from_code(c: u8) -> MemKind {
            match c {
                0 => MemKind::Device,
                1 => MemKind::Managed,
                2 => MemKind::Pinned,
                3 => MemKind::Registered,
                4 => MemKind::Physical,
                5 => MemKind::Oversubscribed,
                6 => MemKind::PinnedOnCopy,
                _ => MemKind::Other,
            }
        }
    }

    /// One GPU event, decoded.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct GpuEvent {
        /// An allocation (else a free).
        pub alloc: bool,
        /// Address (the handle for physical memory).
        pub addr: u64,
        /// Bytes (0 where not known).
        pub size: u64,
        /// What memory.
        pub mem: MemKind,
        /// Device ordinal; -1: host memory.
        pub device: i32,
        /// The stream.
        pub stream: u64,
    }

    /// The body of a GPU event after time and thread (for `EventKind::Unknown`).
    pub fn body(e: &GpuEvent) -> Vec<u8> {
        let mut b = Vec::with_capacity(24);
        crate::record::put_uleb(&mut b, e.addr);
        crate::record::put_uleb(&mut b, e.size);
        b.push(e.mem as u8);
        crate::record::put_uleb(&mut b, crate::record::zigzag(i64::from(e.device)));
        crate::record::put_uleb(&mut b, e.stream);
        b
    }

    /// Decodes an `EventKind::Unknown` of kind [`ALLOC`] or [`FREE`]; `None` for any
    /// other kind or a malformed body.
    pub fn decode(kind: u8, body: &[u8]) -> Option<GpuEvent> {
        if kind != ALLOC && kind != FREE {
            return None;
        }
        let mut c = crate::record::Cursor { b: body, at: 0 };
        let addr = c.uleb().ok()?;
        let size = c.uleb().ok()?;
        let mem = MemKind::from_code(c.u8().ok()?);
        let device = i32::try_from(crate::record::unzigzag(c.uleb().ok()?)).ok()?;
        let stream = c.uleb().ok()?;
        Some(GpuEvent {
            alloc: kind == ALLOC,
            addr,
            size,
            mem,
            device,
            stream,
        })
    }

    #[cfg(test)]
    mod tests {
        use crate::record::gpu::*;

        #[test]
        fn gpu_events_round_trip_through_unknown() {
            let e = GpuEvent {
                alloc: true,
                addr: 0x7f00_0000_1000,
                size: 3 << 20,
                mem: MemKind::Device,
                device: 1,
                stream: 0x55aa,
            };
            let b = body(&e);
            assert_eq!(decode(ALLOC, &b), Some(e));
            let f = GpuEvent {
                alloc: false,
                device: -1,
                mem: MemKind::Pinned,
                ..e
            };
            assert_eq!(decode(FREE, &body(&f)), Some(f));
            assert_eq!(decode(1, &b), None);
            assert_eq!(decode(ALLOC, &b[..2]), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_and_unknown_kinds_are_skipped() {
        let h = Header {
            version: VERSION,
            flags: FLAG_ALL | FLAG_STACKS,
            pid: 42,
            page_size: 4096,
            start_unix_ns: 1,
            start_mono_ns: 2,
            threshold: 2 << 20,
        };
        let events = vec![
            Event {
                time_ns: 5,
                thread: 9,
                kind: EventKind::Alloc {
                    addr: 1 << 40,
                    size: 3 << 20,
                    placement: Placement::Host,
                    node: Some(0),
                },
            },
            Event {
                time_ns: 3, // out of order across threads
                thread: 10,
                kind: EventKind::Stack {
                    frames: vec![0x5555_0000_1000, 0x5555_0000_0f00, 0x7fff_0000_0000],
                },
            },
            Event {
                time_ns: 7,
                thread: 9,
                kind: EventKind::Realloc {
                    old: 1 << 40,
                    new: (1 << 40) + (1 << 30),
                    size: 9 << 20,
                    placement: Placement::Host,
                    node: None,
                },
            },
            Event {
                time_ns: 8,
                thread: 9,
                kind: EventKind::Unknown {
                    kind: 30, // reserved: unknown to this version
                    body: vec![1, 2, 3],
                },
            },
            Event {
                time_ns: 9,
                thread: 9,
                kind: EventKind::Free {
                    addr: (1 << 40) + (1 << 30),
                    size: 9 << 20,
                    placement: Placement::Host,
                },
            },
            Event {
                time_ns: 10,
                thread: 9,
                kind: EventKind::Dropped { count: 3 },
            },
            Event {
                time_ns: 11,
                thread: 9,
                kind: EventKind::End {
                    events: 6,
                    dropped: 3,
                },
            },
        ];
        let mut file = h.encode().to_vec();
        let mut c = ChunkEncoder::new();
        for (i, e) in events.iter().enumerate() {
            c.push(e);
            if i == 2 {
                file.extend_from_slice(c.finish());
                c.clear();
            }
        }
        file.extend_from_slice(c.finish());
        let r = Reader::new(&file[..]).unwrap();
        assert_eq!(*r.header(), h);
        let back: Vec<Event> = r.map(|e| e.unwrap()).collect();
        assert_eq!(back, events);
        let (_, s) = summarize(&file[..]).unwrap();
        assert_eq!((s.allocs, s.frees, s.reallocs, s.stacks), (1, 1, 1, 1));
        assert_eq!((s.dropped, s.complete, s.large_peak), (3, true, 9 << 20));
        // Cut inside the last chunk: the reader stops at the last whole one.
        let mut r = Reader::new(&file[..file.len() - 2]).unwrap();
        let n = std::iter::from_fn(|| r.next_event().unwrap()).count();
        assert_eq!(n, 3);
        assert!(r.truncated());
        // Not a record.
        assert!(Reader::new(&b"hello world, this is not one"[..]).is_err());
    }
}
