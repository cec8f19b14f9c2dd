//! `prof synth`: writes a synthetic record of `n` events (a device pool's blocks over a
//! working set, its segments, host and pinned blocks, a tier store streaming layers),
//! for checking that the tools stream large recordings in bounded memory.

use std::fs::File;
use std::io::{BufWriter, Write};

use hetmem::record::{
    acquire, device_flags, tier_flags, ChunkEncoder, Event, EventKind, Header, Placement, VERSION,
};

pub fn run(out: &str, n: u64) -> Result<(), String> {
    let f = File::create(out).map_err(|e| format!("{out}: {e}"))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let io = |e: std::io::Error| format!("{out}: {e}");
    let h = Header {
        version: VERSION,
        flags: hetmem::record::FLAG_ALL,
        pid: std::process::id(),
        page_size: 4096,
        ..Header::default()
    };
    w.write_all(&h.encode()).map_err(io)?;
    let mut enc = ChunkEncoder::new();
    let mut t = 0u64;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    const SLOTS: usize = 4096;
    let base = 1u64 << 44;
    let mut live: Vec<Option<u64>> = vec![None; SLOTS];
    let mut written = 0u64;
    let mut push = |enc: &mut ChunkEncoder, w: &mut BufWriter<File>, t: u64, kind: EventKind| {
        enc.push(&Event {
            time_ns: t,
            thread: 1,
            kind,
        });
        written += 1;
        if enc.bytes() > 256 << 10 {
            let r = w.write_all(enc.finish());
            enc.clear();
            r
        } else {
            Ok(())
        }
    };
    push(
        &mut enc,
        &mut w,
        0,
        EventKind::Budget {
            placement: Placement::Device,
            index: Some(0),
            bytes: 8 << 30,
        },
    )
    .map_err(io)?;
    push(
        &mut enc,
        &mut w,
        0,
        EventKind::Budget {
            placement: Placement::Pinned,
            index: None,
            bytes: 16 << 30,
        },
    )
    .map_err(io)?;
    // The pool maps 8 GiB in 64 chunks of 128 MiB.
    for c in 0..64u64 {
        push(
            &mut enc,
            &mut w,
            0,
            EventKind::SegmentMap {
                addr: base + c * (128 << 20),
                size: 128 << 20,
                device: 0,
            },
        )
        .map_err(io)?;
    }
    for id in 0..32u64 {
        push(
            &mut enc,
            &mut w,
            0,
            EventKind::Param {
                id,
                size: 64 << 20,
                name: format!("layers.{id}.weight"),
            },
        )
        .map_err(io)?;
    }
    let mut i = 0u64;
    while i < n {
        t += 100 + next() % 400;
        let r = next();
        match r % 16 {
            0..=11 => {
                // A pool block in slot s (2 MiB apart): allocated if free, else freed.
                let s = (r >> 8) as usize % SLOTS;
                let addr = base + s as u64 * (2 << 20);
                let kind = match live[s].take() {
                    Some(size) => EventKind::DeviceFree {
                        addr,
                        size,
                        device: 0,
                        flags: device_flags::POOL,
                    },
                    None => {
                        let size = 512 * (1 + (r >> 20) % 4096);
                        live[s] = Some(size);
                        EventKind::DeviceAlloc {
                            addr,
                            size,
                            device: 0,
                            stream: 7,
                            flags: device_flags::POOL,
                        }
                    }
                };
                push(&mut enc, &mut w, t, kind).map_err(io)?;
            }
            12 | 13 => {
                let addr = (1 << 40) + ((r >> 8) % 1024) * (4 << 20);
                let placement = if r % 2 == 0 {
                    Placement::Host
                } else {
                    Placement::Pinned
                };
                push(
                    &mut enc,
                    &mut w,
                    t,
                    EventKind::Alloc {
                        addr,
                        size: 1 << 20,
                        placement,
                        node: Some(0),
                    },
                )
                .map_err(io)?;
                push(
                    &mut enc,
                    &mut w,
                    t + 50,
                    EventKind::Free {
                        addr,
                        size: 1 << 20,
                        placement,
                    },
                )
                .map_err(io)?;
                i += 1;
            }
            _ => {
                // The tier store streams layer (step % 32).
                let id = (i / 16) % 32;
                push(
                    &mut enc,
                    &mut w,
                    t,
                    EventKind::Load {
                        id,
                        bytes: 64 << 20,
                        stream: 9,
                        start: Some(t),
                        end: Some(t + 200),
                        flags: tier_flags::PREFETCH,
                    },
                )
                .map_err(io)?;
                push(
                    &mut enc,
                    &mut w,
                    t + 100,
                    EventKind::Acquire {
                        id,
                        bytes: 64 << 20,
                        outcome: acquire::HIT,
                    },
                )
                .map_err(io)?;
                push(
                    &mut enc,
                    &mut w,
                    t + 300,
                    EventKind::Evict {
                        id,
                        bytes: 64 << 20,
                        flags: 0,
                    },
                )
                .map_err(io)?;
                i += 2;
            }
        }
        i += 1;
    }
    let events = written;
    enc.push(&Event {
        time_ns: t + 1,
        thread: 1,
        kind: EventKind::End { events, dropped: 0 },
    });
    w.write_all(enc.finish()).map_err(io)?;
    w.flush().map_err(io)?;
    eprintln!("prof synth: {} events in {out}", events + 1);
    Ok(())
}
