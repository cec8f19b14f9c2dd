//! Binding a primary context to the calling thread for one call, and putting back
//! the caller's afterwards (see "Contexts" in the module docs).

use std::ptr;

use hetmem_sys::cuda::types::CUcontext;

use super::Driver;
use crate::error::Result;

/// The context a caller had current before [`bind_ctx`] switched it, put back on drop.
/// The CUDA runtime takes its current device from the current context, so leaving ours
/// current would move PyTorch's (or any runtime user's) device on a multi-GPU host, or
/// give a thread that had none a device it never chose.
#[must_use = "the caller's context is put back when the guard drops"]
pub(super) struct Bound {
    drv: Driver,
    /// `None`: nothing was switched. `Some(null)`: no context was current.
    prev: Option<CUcontext>,
}

/// Makes `ctx` (a primary context we retained) current on this thread until the
/// returned guard drops; no switch when it already is current.
pub(super) fn bind_ctx(drv: Driver, ctx: CUcontext) -> Result<Bound> {
    let mut current: CUcontext = ptr::null_mut();
    // SAFETY: `current` is a valid out-pointer; the call only reads thread state.
    drv.check("cuCtxGetCurrent", unsafe {
        drv.cuCtxGetCurrent(&mut current)
    })?;
    if current == ctx {
        return Ok(Bound { drv, prev: None });
    }
    // SAFETY: `ctx` is a primary context we retained and have not released.
    drv.check("cuCtxSetCurrent", unsafe { drv.cuCtxSetCurrent(ctx) })?;
    Ok(Bound {
        drv,
        prev: Some(current),
    })
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Some(prev) = self.prev {
            // SAFETY: `prev` was current on this thread a moment ago (or is null, which
            // unbinds); setting a context only changes this thread's binding.
            let status = unsafe { self.drv.cuCtxSetCurrent(prev) };
            if let Err(e) = self.drv.check("cuCtxSetCurrent", status) {
                tracing::warn!(error = %e, "restoring the caller's CUDA context");
            }
        }
    }
}
