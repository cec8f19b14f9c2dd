//! What the two driver backends ([`cuda`](super::cuda), [`rocm`](super::rocm)) share,
//! written once: the tables of the stream and event handles they made or were lent,
//! and small conversions of what a driver reports. Host registration in pieces, with
//! its rollback, is in [`registered`](super::registered), which the host pool uses too.
//!
//! A driver hands out streams and events as addresses. A backend remembers the device
//! of each in [`Handles`], keyed by the handle's value: every call looks its handles up
//! there first, so a stale or foreign handle is refused with an error before the
//! driver sees it (defence in depth: the [`Backend`](super::Backend) contract already
//! forbids one). An entry leaves the table *before* the driver destroys the handle,
//! and comes back if that fails, because the driver may hand the same value out again
//! to a concurrent create at once.

use std::collections::HashMap;
use std::ffi::c_char;
use std::sync::Mutex;

use super::{check_device, lock, Backend, BackendKind, EventHandle, StreamHandle, SPECIAL_STREAMS};
use crate::error::{Error, Result};

/// The device of every live stream and event a driver backend made, and of the
/// streams the caller lent it ([`Backend::import_stream`](super::Backend::import_stream)).
#[derive(Debug)]
pub(crate) struct Handles {
    kind: BackendKind,
    /// Our streams: handle → device.
    streams: Mutex<HashMap<u64, usize>>,
    /// Our events: handle → device.
    events: Mutex<HashMap<u64, usize>>,
    /// Streams lent to us.
    foreign: ForeignStreams,
}

impl Handles {
    /// Empty tables of a `kind` backend (named in the errors).
    pub(crate) fn new(kind: BackendKind) -> Handles {
        Handles {
            kind,
            streams: Mutex::default(),
            events: Mutex::default(),
            foreign: ForeignStreams::default(),
        }
    }

    /// Records a stream the driver just made on `device`.
    pub(crate) fn add_stream(&self, stream: StreamHandle, device: usize) {
        lock(&self.streams).insert(stream.0, device);
    }

    /// Records an event the driver just made on `device`.
    pub(crate) fn add_event(&self, event: EventHandle, device: usize) {
        lock(&self.events).insert(event.0, device);
    }

    /// The device of a stream we made or were lent.
    pub(crate) fn stream_device(&self, stream: StreamHandle) -> Result<usize> {
        let own = lock(&self.streams).get(&stream.0).copied();
        own.or_else(|| self.foreign.device(stream))
            .ok_or_else(|| self.unknown("stream", stream.0))
    }

    /// The device of an event we made.
    pub(crate) fn event_device(&self, event: EventHandle) -> Result<usize> {
        lock(&self.events)
            .get(&event.0)
            .copied()
            .ok_or_else(|| self.unknown("event", event.0))
    }

    /// Destroys one of our streams with `destroy(device)`: out of the table first, back
    /// in when `destroy` fails (see the module docs).
    pub(crate) fn destroy_stream(
        &self,
        stream: StreamHandle,
        destroy: impl FnOnce(usize) -> Result<()>,
    ) -> Result<()> {
        self.destroy(&self.streams, "stream", stream.0, destroy)
    }

    /// Destroys one of our events with `destroy(device)`, as
    /// [`destroy_stream`](Self::destroy_stream).
    pub(crate) fn destroy_event(
        &self,
        event: EventHandle,
        destroy: impl FnOnce(usize) -> Result<()>,
    ) -> Result<()> {
        self.destroy(&self.events, "event", event.0, destroy)
    }

    fn destroy(
        &self,
        map: &Mutex<HashMap<u64, usize>>,
        what: &'static str,
        handle: u64,
        destroy: impl FnOnce(usize) -> Result<()>,
    ) -> Result<()> {
        let device = lock(map)
            .remove(&handle)
            .ok_or_else(|| self.unknown(what, handle))?;
        let result = destroy(device);
        if result.is_err() {
            // Not destroyed, so the value cannot have been handed out again: keep it.
            lock(map).insert(handle, device);
        }
        result
    }

    /// Counts an import of the caller's stream `raw` on `backend`'s `device`, after
    /// checking the ordinal (see [`ForeignStreams::import`]).
    pub(crate) fn import(
        &self,
        backend: &dyn Backend,
        device: usize,
        raw: u64,
    ) -> Result<StreamHandle> {
        check_device(backend, device)?;
        self.foreign.import(device, raw)
    }

    /// Undoes one import.
    pub(crate) fn forget(&self, stream: StreamHandle) -> Result<()> {
        self.foreign.forget(stream)
    }

    /// How many of our streams and events are still live.
    pub(crate) fn live(&self) -> (usize, usize) {
        (lock(&self.streams).len(), lock(&self.events).len())
    }

    fn unknown(&self, what: &'static str, handle: u64) -> Error {
        Error::UnknownHandle { what, handle }
    }
}

impl Drop for Handles {
    fn drop(&mut self) {
        let (streams, events) = self.live();
        if streams + events > 0 {
            tracing::debug!(
                backend = %self.kind,
                streams,
                events,
                "backend dropped with live streams or events; the driver reclaims them \
                 with the context or the process"
            );
        }
    }
}

/// The streams a driver backend has imported ([`Backend::import_stream`](super::Backend::import_stream)):
/// handle → (device, imports not yet forgotten). Special streams get a handle of their
/// own per device ([`raw_stream`](super::raw_stream) turns it back into the value the driver takes).
#[derive(Debug, Default)]
pub(crate) struct ForeignStreams {
    map: Mutex<HashMap<u64, (usize, usize)>>,
}

impl ForeignStreams {
    /// Counts an import of `raw` on `device` and returns its handle. A stream already
    /// imported for another device is refused.
    pub(crate) fn import(&self, device: usize, raw: u64) -> Result<StreamHandle> {
        let handle = if raw < SPECIAL_STREAMS {
            super::special_handle(device, raw)
        } else {
            StreamHandle(raw)
        };
        let mut map = lock(&self.map);
        let entry = map.entry(handle.0).or_insert((device, 0));
        if entry.0 != device {
            return Err(Error::InvalidArgument(format!(
                "stream {raw:#x} is already in use on device {}, not device {device}",
                entry.0
            )));
        }
        entry.1 += 1;
        Ok(handle)
    }

    /// Undoes one import of `handle`.
    pub(crate) fn forget(&self, handle: StreamHandle) -> Result<()> {
        let mut map = lock(&self.map);
        match map.get_mut(&handle.0) {
            Some((_, n)) if *n > 1 => *n -= 1,
            Some(_) => {
                map.remove(&handle.0);
            }
            None => {
                return Err(Error::InvalidArgument(format!(
                    "stream {:#x} was not imported",
                    handle.0
                )))
            }
        }
        Ok(())
    }

    /// The device of an imported stream.
    pub(crate) fn device(&self, handle: StreamHandle) -> Option<usize> {
        lock(&self.map).get(&handle.0).map(|e| e.0)
    }
}

/// [`Error::BackendUnavailable`] of a `kind` backend.
pub(crate) fn unavailable(kind: BackendKind, reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: kind,
        reason: reason.into(),
    }
}

/// The NUL-terminated string a driver wrote into `buf` (all of it when it has no NUL).
pub(crate) fn string_from_buf(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Turns a driver's PCI bus id into the lowercase sysfs form (`0000:3b:00.0`). Takes
/// `0000:3B:00.0`, NVML/CUDA-style 8-digit domains (`00000000:3B:00.0`) and ids without
/// a domain (`c1:00.1`, domain 0), with surrounding whitespace and trailing NULs.
/// `None` when it does not parse.
pub(crate) fn normalize_pci_bus_id(raw: &str) -> Option<String> {
    let s = raw.trim().trim_end_matches('\0');
    let (domain, rest) = match s.matches(':').count() {
        2 => s.split_once(':')?,
        1 => ("0", s),
        _ => return None,
    };
    let (bus, rest) = rest.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    let hex = |s: &str, max_len: usize| -> Option<u32> {
        if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(s, 16).ok()
    };
    let domain = hex(domain, 8)?;
    let bus = hex(bus, 2)?;
    let dev = hex(dev, 2)?;
    let func = hex(func, 1)?;
    if dev > 0x1f || func > 7 {
        return None;
    }
    Some(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

/// The PCI bus id a driver wrote into `buf`, normalised, or `None` (logged) when it
/// does not parse.
pub(crate) fn pci_bus_id(kind: BackendKind, device: usize, buf: &[c_char]) -> Option<String> {
    let raw = string_from_buf(buf);
    let id = normalize_pci_bus_id(&raw);
    if id.is_none() {
        tracing::warn!(backend = %kind, device, raw, "unparseable PCI bus id");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::raw_stream;

    #[test]
    fn pci_bus_id_is_normalised_to_sysfs_form() {
        for (raw, want) in [
            ("0000:3B:00.0", "0000:3b:00.0"),
            ("00000000:3B:00.0", "0000:3b:00.0"),
            ("00000000:3b:00.0", "0000:3b:00.0"),
            ("0001:AF:1F.7\0", "0001:af:1f.7"),
            ("0001:C1:1F.7\0", "0001:c1:1f.7"),
            (" 0000:c1:00.0\n", "0000:c1:00.0"),
            ("10000:01:00.0", "10000:01:00.0"),
            // Without a domain: domain 0.
            ("c1:00.1", "0000:c1:00.1"),
            ("3B:00.0", "0000:3b:00.0"),
        ] {
            assert_eq!(normalize_pci_bus_id(raw).as_deref(), Some(want), "{raw:?}");
        }
        for bad in [
            "",
            "garbage",
            "0000:3B:00",
            "0000:3G:00.0",
            "0000:zz:00.0",
            "0000:3B:20.0",
            "0000:3B:00.8",
            "0000:3b:00.9",
            "000000000:3b:00.0",
            "0:0000:3b:00.0",
        ] {
            assert_eq!(normalize_pci_bus_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn foreign_streams_are_counted_and_special_ones_carry_the_device() {
        let f = ForeignStreams::default();
        let a = f.import(0, 0).unwrap();
        let b = f.import(1, 0).unwrap();
        assert_ne!(a, b, "default streams of two devices must not collide");
        assert_eq!((raw_stream(a), raw_stream(b)), (0, 0));
        assert_eq!((f.device(a), f.device(b)), (Some(0), Some(1)));
        let s = f.import(1, 0x7f00_1234_5000).unwrap();
        assert_eq!(s, StreamHandle(0x7f00_1234_5000));
        assert_eq!(raw_stream(s), 0x7f00_1234_5000);
        assert!(
            f.import(0, 0x7f00_1234_5000).is_err(),
            "one stream, one device"
        );
        assert_eq!(f.import(1, 0x7f00_1234_5000).unwrap(), s);
        f.forget(s).unwrap();
        assert_eq!(f.device(s), Some(1), "imported twice, forgotten once");
        f.forget(s).unwrap();
        assert_eq!(f.device(s), None);
        assert!(f.forget(s).is_err());
    }

    #[test]
    fn a_handle_whose_destruction_fails_stays_known() {
        let h = Handles::new(BackendKind::Cuda);
        let s = StreamHandle(0x1000);
        h.add_stream(s, 1);
        let failed = Error::InvalidArgument("driver said no".into());
        assert_eq!(h.destroy_stream(s, |_| Err(failed.clone())), Err(failed));
        assert_eq!(h.stream_device(s), Ok(1));
        h.destroy_stream(s, |device| {
            assert_eq!(device, 1);
            Ok(())
        })
        .unwrap();
        match h.stream_device(s) {
            Err(Error::UnknownHandle { what, handle }) => {
                assert_eq!((what, handle), ("stream", 0x1000))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(h.live(), (0, 0));
    }

    #[test]
    fn strings_end_at_the_first_nul_or_the_buffer() {
        let buf: Vec<c_char> = b"GPU 0\0junk".iter().map(|&b| b as c_char).collect();
        assert_eq!(string_from_buf(&buf), "GPU 0");
        let full: Vec<c_char> = b"abc".iter().map(|&b| b as c_char).collect();
        assert_eq!(string_from_buf(&full), "abc");
    }
}
