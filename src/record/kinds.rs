//! The bodies of kinds 16–63 (device memory, segments, out-of-memory, budgets, the tier
//! store, call sites): written by the library's profiler ([`crate::profile`]), laid out
//! in the parent's table.

use super::{bad, kind};
use super::{put_uleb, Cursor, EventKind, Placement, Result};

fn opt(v: Option<u64>) -> u64 {
    v.map_or(0, |v| v.saturating_add(1))
}

fn unopt(v: u64) -> Option<u64> {
    v.checked_sub(1)
}

fn index_code(i: Option<u32>) -> u64 {
    i.map_or(u64::from(u32::MAX), u64::from)
}

fn index_of(v: u64) -> Option<u32> {
    u32::try_from(v).ok().filter(|&v| v != u32::MAX)
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    put_uleb(b, s.len() as u64);
    b.extend_from_slice(s.as_bytes());
}

/// The bodies of kinds 16–63 (after time and thread); returns the kind.
pub(super) fn encode_more(b: &mut Vec<u8>, k: &EventKind) -> u8 {
    match k {
        EventKind::DeviceAlloc {
            addr,
            size,
            device,
            stream,
            flags,
        } => {
            for v in [*addr, *size, u64::from(*device), *stream] {
                put_uleb(b, v);
            }
            b.push(*flags);
            kind::DEVICE_ALLOC
        }
        EventKind::DeviceFree {
            addr,
            size,
            device,
            flags,
        } => {
            for v in [*addr, *size, u64::from(*device)] {
                put_uleb(b, v);
            }
            b.push(*flags);
            kind::DEVICE_FREE
        }
        EventKind::SegmentMap { addr, size, device }
        | EventKind::SegmentUnmap { addr, size, device } => {
            for v in [*addr, *size, u64::from(*device)] {
                put_uleb(b, v);
            }
            if matches!(k, EventKind::SegmentMap { .. }) {
                kind::SEGMENT_MAP
            } else {
                kind::SEGMENT_UNMAP
            }
        }
        EventKind::OutOfMemory {
            placement,
            index,
            requested,
            free,
            reserved,
            largest_free_block,
        } => {
            b.push(*placement as u8);
            for v in [
                index_code(*index),
                *requested,
                *free,
                opt(*reserved),
                opt(*largest_free_block),
            ] {
                put_uleb(b, v);
            }
            kind::OOM
        }
        EventKind::Budget {
            placement,
            index,
            bytes,
        } => {
            b.push(*placement as u8);
            put_uleb(b, index_code(*index));
            put_uleb(b, *bytes);
            kind::BUDGET
        }
        EventKind::Param { id, size, name } => {
            put_uleb(b, *id);
            put_uleb(b, *size);
            put_str(b, name);
            kind::PARAM
        }
        EventKind::Load {
            id,
            bytes,
            stream,
            start,
            end,
            flags,
        } => {
            for v in [*id, *bytes, *stream, opt(*start), opt(*end)] {
                put_uleb(b, v);
            }
            b.push(*flags);
            kind::LOAD
        }
        EventKind::Evict { id, bytes, flags } => {
            put_uleb(b, *id);
            put_uleb(b, *bytes);
            b.push(*flags);
            kind::EVICT
        }
        EventKind::WriteBack {
            id,
            bytes,
            stream,
            start,
            end,
        } => {
            for v in [*id, *bytes, *stream, opt(*start), opt(*end)] {
                put_uleb(b, v);
            }
            kind::WRITEBACK
        }
        EventKind::Acquire { id, bytes, outcome } => {
            put_uleb(b, *id);
            put_uleb(b, *bytes);
            b.push(*outcome);
            kind::ACQUIRE
        }
        EventKind::Site { text } => {
            put_str(b, text);
            kind::SITE
        }
        // Kinds 1–6 and unknown ones are encoded by `push` itself and never reach
        // here; kind 0 is one no reader knows, so it would be skipped.
        _ => 0,
    }
}

pub(super) fn decode_more(k: u8, c: &mut Cursor<'_>) -> Result<Option<EventKind>> {
    Ok(Some(match k {
        kind::DEVICE_ALLOC => EventKind::DeviceAlloc {
            addr: c.uleb()?,
            size: c.uleb()?,
            device: c.u32()?,
            stream: c.uleb()?,
            flags: c.u8()?,
        },
        kind::DEVICE_FREE => EventKind::DeviceFree {
            addr: c.uleb()?,
            size: c.uleb()?,
            device: c.u32()?,
            flags: c.u8()?,
        },
        kind::SEGMENT_MAP => EventKind::SegmentMap {
            addr: c.uleb()?,
            size: c.uleb()?,
            device: c.u32()?,
        },
        kind::SEGMENT_UNMAP => EventKind::SegmentUnmap {
            addr: c.uleb()?,
            size: c.uleb()?,
            device: c.u32()?,
        },
        kind::OOM => EventKind::OutOfMemory {
            placement: Placement::from_code(c.u8()?),
            index: index_of(c.uleb()?),
            requested: c.uleb()?,
            free: c.uleb()?,
            reserved: unopt(c.uleb()?),
            largest_free_block: unopt(c.uleb()?),
        },
        kind::BUDGET => EventKind::Budget {
            placement: Placement::from_code(c.u8()?),
            index: index_of(c.uleb()?),
            bytes: c.uleb()?,
        },
        kind::PARAM => EventKind::Param {
            id: c.uleb()?,
            size: c.uleb()?,
            name: c.str()?,
        },
        kind::LOAD => EventKind::Load {
            id: c.uleb()?,
            bytes: c.uleb()?,
            stream: c.uleb()?,
            start: unopt(c.uleb()?),
            end: unopt(c.uleb()?),
            flags: c.u8()?,
        },
        kind::EVICT => EventKind::Evict {
            id: c.uleb()?,
            bytes: c.uleb()?,
            flags: c.u8()?,
        },
        kind::WRITEBACK => EventKind::WriteBack {
            id: c.uleb()?,
            bytes: c.uleb()?,
            stream: c.uleb()?,
            start: unopt(c.uleb()?),
            end: unopt(c.uleb()?),
        },
        kind::ACQUIRE => EventKind::Acquire {
            id: c.uleb()?,
            bytes: c.uleb()?,
            outcome: c.u8()?,
        },
        kind::SITE => EventKind::Site { text: c.str()? },
        _ => return Ok(None),
    }))
}

impl Cursor<'_> {
    fn u32(&mut self) -> Result<u32> {
        u32::try_from(self.uleb()?).map_err(|_| bad("index larger than 32 bits"))
    }

    fn str(&mut self) -> Result<String> {
        let n = usize::try_from(self.uleb()?).map_err(|_| bad("string length"))?;
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| bad("string longer than its event"))?;
        let s = String::from_utf8_lossy(&self.b[self.at..end]).into_owned();
        self.at = end;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    #[test]
    fn device_pinned_and_tier_kinds_round_trip() {
        let kinds = vec![
            EventKind::DeviceAlloc {
                addr: 1 << 44,
                size: 3 << 20,
                device: 1,
                stream: 7,
                flags: device_flags::POOL,
            },
            EventKind::DeviceFree {
                addr: 1 << 44,
                size: 3 << 20,
                device: 1,
                flags: device_flags::POOL | device_flags::MANAGED,
            },
            EventKind::SegmentMap {
                addr: 1 << 44,
                size: 64 << 20,
                device: 0,
            },
            EventKind::SegmentUnmap {
                addr: 1 << 44,
                size: 64 << 20,
                device: 0,
            },
            EventKind::OutOfMemory {
                placement: Placement::Device,
                index: Some(0),
                requested: 1 << 30,
                free: 5,
                reserved: Some(0),
                largest_free_block: None,
            },
            EventKind::Budget {
                placement: Placement::Pinned,
                index: None,
                bytes: 1 << 33,
            },
            EventKind::Param {
                id: 3,
                size: 4096,
                name: "layers.0.weight".into(),
            },
            EventKind::Load {
                id: 3,
                bytes: 4096,
                stream: 9,
                start: Some(0),
                end: Some(1000),
                flags: tier_flags::PREFETCH | tier_flags::STAGED,
            },
            EventKind::Evict {
                id: 3,
                bytes: 4096,
                flags: tier_flags::UNPLANNED,
            },
            EventKind::WriteBack {
                id: 3,
                bytes: 4096,
                stream: 9,
                start: None,
                end: None,
            },
            EventKind::Acquire {
                id: 3,
                bytes: 4096,
                outcome: acquire::LATE,
            },
            EventKind::Site {
                text: "main\nrun".into(),
            },
        ];
        let mut file = Header::default().encode().to_vec();
        file[8..10].copy_from_slice(&VERSION.to_le_bytes());
        let mut c = ChunkEncoder::new();
        let events: Vec<Event> = kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| Event {
                time_ns: 100 * i as u64,
                thread: 1,
                kind,
            })
            .collect();
        for e in &events {
            c.push(e);
        }
        file.extend_from_slice(c.finish());
        let back: Vec<Event> = Reader::new(&file[..])
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        assert_eq!(back, events);
    }
}
