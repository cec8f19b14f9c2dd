//! AMD GPUs through the HIP runtime (`libamdhip64.so`), loaded at run time.
//!
//! Nothing is linked at build time: [`RocmBackend::new`] opens the library through
//! [`hetmem_sys::hip::HipRuntime`] (the name in `HETMEM_HIP_LIBRARY`, else
//! `libamdhip64.so`, `.so.5`, `.so.6`), resolves every entry point, calls `hipInit` and
//! enumerates the devices. Any failure on that path (no library, a missing symbol,
//! `hipInit` failing, no device) is [`Error::BackendUnavailable`], so that automatic
//! selection can fall back to another backend; failures of later calls are
//! [`Error::Driver`] with HIP's own message.
//!
//! HIP keeps a *current device* per thread, and allocations, streams and events belong
//! to the device current when they are made. Since the backend may be called from any
//! thread, every call that depends on it sets the device first (`hipSetDevice` is a
//! cheap thread-local store in the runtime). Streams and events remember their device
//! in the handle tables the driver backends share (`driver::Handles`).
//!
//! A copy on a stream must be queued on a stream of the device it touches (either
//! device, for a copy between two), as in the simulator; anything else is refused with
//! [`Error::InvalidArgument`] before the runtime is called. A copy with no stream is
//! `hipMemcpy` on the device it touches: ordered on that device's null stream, so after
//! the work queued before it on the null stream and the blocking streams (the
//! per-thread streams included), not after hetmem's streams, which are
//! `hipStreamNonBlocking` (as [`Backend::copy`] says for every backend).
//!
//! Special streams, as the CUDA backend takes them: 0 is the null stream of a device
//! (one for all threads), 2 (`hipStreamPerThread`) the per-thread stream of the thread
//! making each call.
//!
//! Status: the whole path is exercised against a fake HIP runtime
//! (`tests/fake_hip/fake_hip.c`) and the loader against ROCm 5.2's real
//! `libamdhip64.so` (which answers `hipErrorNoDevice` without a GPU); it has not run
//! on AMD hardware.
//!
//! `mod.rs` loads the runtime and lists the devices; `backend.rs` is the [`Backend`]
//! implementation.

mod backend;

use std::ffi::{c_char, c_int, c_void};
use std::path::Path;

use hetmem_sys::hip::{self, hipError_t, HipApi, HipLoadError, HipRuntime};

use super::driver::{self, Handles};
use super::registered::{Registrations, RollbackError, HOST_REGISTER_CHUNK};
use super::{check_device, Backend, BackendKind, DeviceInfo, MemRef};
use crate::error::{Error, Result};
use crate::placement::MemKind;

/// Largest range registered with one `hipHostRegister` call; longer ranges are
/// registered in pieces of this size. The same value as every backend's host
/// registration chunk, kept public for tests that register more than one chunk.
#[doc(hidden)]
pub const REGISTER_CHUNK: usize = HOST_REGISTER_CHUNK;

/// The `call` of the [`Error::Driver`] that [`Backend::register_host`]
/// returns when a chunk failed to register *and* undoing the chunks registered before
/// it failed too. Part of the range then stays registered with the runtime, so the
/// caller must not unmap (or otherwise give back) the memory: it has to leak the
/// region. The error's `code` is that of the failed `hipHostUnregister`, and its
/// `message` names the original failure and contains `"rollback failed; region leaked"`.
#[doc(hidden)]
pub const REGISTER_ROLLBACK_CALL: &str = RollbackError::ROCM.call;

/// The ROCm backend: one loaded HIP runtime and the devices it reported.
#[derive(Debug)]
pub struct RocmBackend {
    rt: HipRuntime,
    devices: Vec<DeviceInfo>,
    runtime_version: i32,
    /// The device of each live stream and event we made, and the streams lent to us.
    handles: Handles,
    /// Our host registrations, one per `hipHostRegister` call: copies are cut at their
    /// edges (see [`super::registered`]).
    registered: Registrations,
}

fn unavailable(reason: impl Into<String>) -> Error {
    driver::unavailable(BackendKind::Rocm, reason)
}

fn load_error(e: HipLoadError) -> Error {
    unavailable(e.to_string())
}

fn ordinal(device: usize) -> c_int {
    // Device ordinals are checked against the device list (from a c_int count) first.
    c_int::try_from(device).unwrap_or(c_int::MAX)
}

impl RocmBackend {
    /// Loads the HIP runtime from its default names (or `HETMEM_HIP_LIBRARY`).
    pub fn new() -> Result<Self> {
        Self::from_runtime(HipRuntime::load_default().map_err(load_error)?)
    }

    /// Loads the HIP runtime from `path` (a path, or a bare name the loader searches).
    ///
    /// Loading runs the library's initialisers, and every later call trusts that its
    /// exported symbols have HIP's C signatures. This is safe to call by a deliberate,
    /// documented exception (see [`HipRuntime::load`]): the same trust as a library
    /// found through `LD_LIBRARY_PATH`, or cudarc's dynamic loading of `libcuda`. Pass
    /// only a HIP runtime (or a test double honouring the same signatures); the same
    /// holds for [`RocmBackend::new`] and the `HETMEM_HIP_LIBRARY` variable.
    pub fn with_library(path: &Path) -> Result<Self> {
        Self::from_runtime(HipRuntime::load(path).map_err(load_error)?)
    }

    fn from_runtime(rt: HipRuntime) -> Result<Self> {
        let api = rt.api();
        let describe = |call: &str, code: hipError_t| {
            format!(
                "{call} failed with code {code}: {} (library {})",
                rt.error_string(code),
                rt.library_name()
            )
        };
        // SAFETY: hipInit takes flags by value; 0 is the only documented value.
        let code = unsafe { api.hipInit(0) };
        if code != hip::hipSuccess {
            return Err(unavailable(describe("hipInit", code)));
        }
        let mut count: c_int = 0;
        // SAFETY: `count` is a valid, writable c_int.
        let code = unsafe { api.hipGetDeviceCount(&mut count) };
        if code == hip::hipErrorNoDevice || (code == hip::hipSuccess && count <= 0) {
            return Err(unavailable(format!(
                "no HIP device found (library {})",
                rt.library_name()
            )));
        }
        if code != hip::hipSuccess {
            return Err(unavailable(describe("hipGetDeviceCount", code)));
        }
        let mut runtime_version: c_int = 0;
        // SAFETY: `runtime_version` is a valid, writable c_int.
        let code = unsafe { api.hipRuntimeGetVersion(&mut runtime_version) };
        if code != hip::hipSuccess {
            tracing::debug!(code, "hipRuntimeGetVersion failed");
            runtime_version = 0;
        }

        let mut devices = Vec::with_capacity(count as usize);
        for index in 0..count {
            let mut dev: hip::hipDevice_t = 0;
            // SAFETY: `dev` is writable; `index` is below the reported device count.
            let code = unsafe { api.hipDeviceGet(&mut dev, index) };
            if code != hip::hipSuccess {
                return Err(unavailable(describe("hipDeviceGet", code)));
            }

            let mut name_buf: [c_char; 256] = [0; 256];
            // SAFETY: the buffer is writable for the length passed.
            let code = unsafe {
                api.hipDeviceGetName(name_buf.as_mut_ptr(), name_buf.len() as c_int, dev)
            };
            if code != hip::hipSuccess {
                return Err(unavailable(describe("hipDeviceGetName", code)));
            }
            let name = driver::string_from_buf(&name_buf);

            let mut total: usize = 0;
            // SAFETY: `total` is a valid, writable size_t.
            let code = unsafe { api.hipDeviceTotalMem(&mut total, dev) };
            if code != hip::hipSuccess {
                return Err(unavailable(describe("hipDeviceTotalMem", code)));
            }

            let mut pci_buf: [c_char; 64] = [0; 64];
            // SAFETY: the buffer is writable for the length passed.
            let code = unsafe {
                api.hipDeviceGetPCIBusId(pci_buf.as_mut_ptr(), pci_buf.len() as c_int, index)
            };
            let pci_bus_id = if code == hip::hipSuccess {
                driver::pci_bus_id(BackendKind::Rocm, index as usize, &pci_buf)
            } else {
                tracing::debug!(device = index, code, "hipDeviceGetPCIBusId failed");
                None
            };

            let mut managed: c_int = 0;
            // SAFETY: `managed` is a valid, writable c_int; the attribute is a known one.
            let code = unsafe {
                api.hipDeviceGetAttribute(&mut managed, hip::hipDeviceAttributeManagedMemory, index)
            };
            if code != hip::hipSuccess {
                tracing::debug!(
                    device = index,
                    code,
                    "managed-memory attribute query failed"
                );
                managed = 0;
            }

            devices.push(DeviceInfo {
                ordinal: index as usize,
                name,
                total_memory: total,
                pci_bus_id,
                managed_memory: managed != 0,
            });
        }
        tracing::debug!(
            library = rt.library_name(),
            runtime_version,
            devices = devices.len(),
            "ROCm backend ready"
        );
        Ok(RocmBackend {
            rt,
            devices,
            runtime_version,
            handles: Handles::new(BackendKind::Rocm),
            registered: Registrations::default(),
        })
    }

    /// The version `hipRuntimeGetVersion` reported (0 where it failed).
    pub fn runtime_version(&self) -> i32 {
        self.runtime_version
    }

    /// The name or path the HIP library was loaded from.
    pub fn library_name(&self) -> &str {
        self.rt.library_name()
    }

    fn api(&self) -> &HipApi {
        self.rt.api()
    }

    /// The one mapping from a failed HIP call to hetmem's error.
    fn driver_error(&self, call: &'static str, code: hipError_t) -> Error {
        Error::Driver {
            backend: BackendKind::Rocm,
            call,
            code,
            message: self.rt.error_string(code),
        }
    }

    /// `Ok` for `hipSuccess`, else [`RocmBackend::driver_error`].
    fn check(&self, call: &'static str, code: hipError_t) -> Result<()> {
        if code == hip::hipSuccess {
            Ok(())
        } else {
            Err(self.driver_error(call, code))
        }
    }

    /// Checks the ordinal and makes `device` current on this thread.
    fn set_device(&self, device: usize) -> Result<()> {
        check_device(self, device)?;
        // SAFETY: hipSetDevice takes an ordinal by value; it was checked above.
        let code = unsafe { self.api().hipSetDevice(ordinal(device)) };
        self.check("hipSetDevice", code)
    }

    fn free_bytes(&self, device: usize) -> usize {
        self.mem_info(device).map(|m| m.free).unwrap_or(0)
    }

    /// Maps an allocation failure: out-of-memory carries the numbers, the rest is a
    /// driver error.
    fn alloc_error(
        &self,
        call: &'static str,
        code: hipError_t,
        tier: MemKind,
        device: usize,
        size: usize,
    ) -> Error {
        if code == hip::hipErrorOutOfMemory {
            Error::oom(tier, size, self.free_bytes(device))
        } else {
            self.driver_error(call, code)
        }
    }

    fn null_result(call: &'static str) -> Error {
        Error::Driver {
            backend: BackendKind::Rocm,
            call,
            code: hip::hipSuccess,
            message: "succeeded but returned a null pointer".into(),
        }
    }

    fn mem_ref_ptr(&self, m: MemRef) -> Result<*mut c_void> {
        match m {
            MemRef::Host { ptr, .. } => Ok(ptr.as_ptr().cast()),
            MemRef::Device { device, ptr } => {
                check_device(self, device)?;
                Ok(ptr.0 as usize as *mut c_void)
            }
        }
    }
}
