//! The descriptors of virtual memory management: what physical memory is asked for,
//! who may access a mapping, and the checks every VMM call makes first.

use std::ptr;

use hetmem_sys::cuda::types::{
    CUdevice, CUmemAccessDesc, CUmemAccess_flags, CUmemAllocationHandleType, CUmemAllocationProp,
    CUmemAllocationProp_st__bindgen_ty_1, CUmemAllocationType, CUmemLocation, CUmemLocationType,
};

use crate::backend::{BackendKind, DevicePtr};
use crate::error::{Error, Result};

/// What the VMM methods report on a device (or driver) without virtual memory
/// management.
pub(super) const UNSUPPORTED: Error = Error::Unsupported {
    backend: BackendKind::Cuda,
    what: "virtual memory management (not supported by this device or driver)",
};

/// The properties of VMM physical memory on device `dev`: ordinary pinned device
/// memory, no shareable handle, no compression. Also what the granularity is asked for.
pub(super) fn allocation_prop(dev: CUdevice) -> CUmemAllocationProp {
    CUmemAllocationProp {
        type_: CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
        location: CUmemLocation {
            type_: CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: dev,
        },
        win32HandleMetaData: ptr::null_mut(),
        allocFlags: CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

/// Read-write access for device `dev`, for `cuMemSetAccess` after a map.
pub(super) fn access_desc(dev: CUdevice) -> CUmemAccessDesc {
    CUmemAccessDesc {
        location: CUmemLocation {
            type_: CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: dev,
        },
        flags: CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    }
}

/// `Ok` when `ptr` is aligned to the VMM page `granularity`.
pub(super) fn check_vmm_addr(ptr: DevicePtr, granularity: usize) -> Result<()> {
    if !ptr.0.is_multiple_of(granularity as u64) {
        Err(Error::InvalidArgument(format!(
            "address {:#x} is not aligned to the VMM granularity {granularity}",
            ptr.0
        )))
    } else {
        Ok(())
    }
}
