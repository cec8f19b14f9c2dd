//! What `new` learns of each device without a context, and opening a device: its
//! primary context retained and, in it, its VMM granularity queried.

use std::ffi::{c_char, c_int};
use std::ptr;
use std::sync::OnceLock;

use hetmem_sys::cuda::types::{
    CUcontext, CUdevice, CUdevice_attribute, CUmemAllocationGranularity_flags,
};

use super::context::bind_ctx;
use super::vmm::allocation_prop;
use super::{unavailable, DeviceState, Driver, Opened};
use crate::backend::driver;
use crate::backend::{BackendKind, DeviceInfo};
use crate::error::Result;

/// What `new` learns of device `ordinal` without a context: its [`DeviceInfo`] and
/// attributes. `vmm_symbols`: the driver has every VMM call. A device without unified
/// addressing is refused (every copy here relies on it).
pub(super) fn query_device(
    drv: Driver,
    ordinal: c_int,
    vmm_symbols: bool,
) -> Result<(DeviceInfo, DeviceState)> {
    let mut dev: CUdevice = 0;
    // SAFETY: driver initialised; `dev` is a valid out-pointer, ordinal < count.
    drv.check("cuDeviceGet", unsafe { drv.cuDeviceGet(&mut dev, ordinal) })?;

    let mut name_buf = [0 as c_char; 256];
    // SAFETY: the buffer is valid for its full length, which we pass; the driver
    // writes a NUL-terminated name that fits.
    drv.check("cuDeviceGetName", unsafe {
        drv.cuDeviceGetName(name_buf.as_mut_ptr(), name_buf.len() as c_int, dev)
    })?;
    let name = driver::string_from_buf(&name_buf);

    let mut total: usize = 0;
    // SAFETY: `total` is a valid out-pointer; `dev` came from cuDeviceGet.
    drv.check("cuDeviceTotalMem", unsafe {
        drv.cuDeviceTotalMem_v2(&mut total, dev)
    })?;

    let mut pci_buf = [0 as c_char; 64];
    // SAFETY: the buffer is valid for its full length, which we pass (the driver
    // needs 13 bytes).
    let pci_status =
        unsafe { drv.cuDeviceGetPCIBusId(pci_buf.as_mut_ptr(), pci_buf.len() as c_int, dev) };
    let pci_bus_id = if pci_status.is_ok() {
        driver::pci_bus_id(BackendKind::Cuda, ordinal as usize, &pci_buf)
    } else {
        tracing::warn!(
            device = ordinal,
            error = %drv.error("cuDeviceGetPCIBusId", pci_status),
            "no PCI bus id"
        );
        None
    };

    let managed = device_attribute(
        drv,
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY,
    )?;
    let concurrent = device_attribute(
        drv,
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS,
    )?;
    let unified = device_attribute(
        drv,
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING,
    )?;
    if unified == 0 {
        return Err(unavailable(format!(
            "device {ordinal} ({name}) lacks unified addressing"
        )));
    }
    let vmm = vmm_symbols && vmm_supported(drv, ordinal, dev);
    Ok((
        DeviceInfo {
            ordinal: ordinal as usize,
            name,
            total_memory: total,
            pci_bus_id,
            managed_memory: managed != 0,
        },
        DeviceState {
            dev,
            concurrent_managed: concurrent != 0,
            vmm,
            opened: OnceLock::new(),
        },
    ))
}

/// Opens device `device`: retains its primary context and, in it, queries the VMM
/// granularity. On failure nothing stays retained.
pub(super) fn open_device(drv: Driver, device: usize, state: &DeviceState) -> Result<Opened> {
    let mut ctx: CUcontext = ptr::null_mut();
    // SAFETY: `ctx` is a valid out-pointer; `dev` came from cuDeviceGet.
    drv.check("cuDevicePrimaryCtxRetain", unsafe {
        drv.cuDevicePrimaryCtxRetain(&mut ctx, state.dev)
    })?;
    let vmm_granularity = if state.vmm {
        match bind_ctx(drv, ctx) {
            Ok(_ctx) => query_vmm_granularity(drv, device, state.dev),
            Err(e) => {
                // SAFETY: retained just above, released once here; nothing was made in it.
                let status = unsafe { drv.cuDevicePrimaryCtxRelease_v2(state.dev) };
                if let Err(undo) = drv.check("cuDevicePrimaryCtxRelease", status) {
                    tracing::warn!(device, error = %undo, "releasing a context after a failed open");
                }
                return Err(e);
            }
        }
    } else {
        None
    };
    Ok(Opened {
        ctx,
        vmm_granularity,
        copy_stream: OnceLock::new(),
    })
}

fn device_attribute(drv: Driver, dev: CUdevice, attr: CUdevice_attribute) -> Result<c_int> {
    let mut value: c_int = 0;
    // SAFETY: `value` is a valid out-pointer; `dev` came from cuDeviceGet after cuInit.
    drv.check("cuDeviceGetAttribute", unsafe {
        drv.cuDeviceGetAttribute(&mut value, attr, dev)
    })?;
    Ok(value)
}

/// Whether device `dev` has virtual memory management (`false`, logged, when the
/// query fails: VMM is optional, so this never fails the backend). Only called once
/// every VMM symbol was found.
fn vmm_supported(drv: Driver, ordinal: c_int, dev: CUdevice) -> bool {
    let supported = device_attribute(
        drv,
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
    );
    match supported {
        Ok(0) => {
            tracing::debug!(device = ordinal, "device lacks virtual memory management");
            false
        }
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(device = ordinal, error = %e, "querying VMM support");
            false
        }
    }
}

/// Device `dev`'s minimum VMM granularity, or `None` (logged) when the query fails.
/// Called with the device's context current, for a device with VMM.
fn query_vmm_granularity(drv: Driver, ordinal: usize, dev: CUdevice) -> Option<usize> {
    let prop = allocation_prop(dev);
    let mut granularity: usize = 0;
    // SAFETY: the symbol exists (VMM_SYMBOLS checked by the caller); `granularity` is a
    // valid out-pointer and `prop` a fully initialised property struct that outlives
    // the call.
    let status = unsafe {
        drv.cuMemGetAllocationGranularity(
            &mut granularity,
            &prop,
            CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    };
    match drv.check("cuMemGetAllocationGranularity", status) {
        Ok(()) if granularity > 0 => Some(granularity),
        Ok(()) => {
            tracing::warn!(device = ordinal, "VMM granularity reported as 0");
            None
        }
        Err(e) => {
            tracing::warn!(device = ordinal, error = %e, "querying VMM granularity");
            None
        }
    }
}
