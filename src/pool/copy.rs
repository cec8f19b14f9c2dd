//! Copies into and out of the pools' blocks on a stream: the one way the layers above
//! the pools (the manager, the tier store) and the staging ring copy a [`PoolBlock`] or a
//! [`HostBlock`], so that none of them reaches through a block to the backend's copy
//! path (`backend::owned::copy`) itself.
//!
//! Each function checks bounds and leaves the backend's fences on both ends (see
//! `backend::owned::copy`); none records the stream on the block (`PoolBlock::record_stream`
//! is the caller's, where the stream is not the block's own).

use crate::backend::owned::copy::{copy, CopyEnd};
use crate::error::Result;
use crate::pool::{HostBlock, PoolBlock};
use crate::stream::Stream;

/// Queues a copy of `len` bytes from `src[src_offset..]` (any memory the backend layer
/// owns) into `dst[dst_offset..]` on `stream`.
pub(crate) fn into_block(
    dst: &PoolBlock,
    dst_offset: usize,
    src: &dyn CopyEnd,
    src_offset: usize,
    len: usize,
    stream: &Stream,
) -> Result<()> {
    dst.with_mem(|d| copy(d, dst_offset, src, src_offset, len, Some(&stream.inner)))
}

/// Queues a copy of `len` bytes from `src[src_offset..]` into `dst[dst_offset..]` (any
/// memory the backend layer owns) on `stream`.
pub(crate) fn out_of_block(
    dst: &dyn CopyEnd,
    dst_offset: usize,
    src: &PoolBlock,
    src_offset: usize,
    len: usize,
    stream: &Stream,
) -> Result<()> {
    src.with_mem(|s| copy(dst, dst_offset, s, src_offset, len, Some(&stream.inner)))
}

/// Queues a copy of `len` bytes between two pool blocks on `stream`.
pub(crate) fn between_blocks(
    dst: &PoolBlock,
    dst_offset: usize,
    src: &PoolBlock,
    src_offset: usize,
    len: usize,
    stream: &Stream,
) -> Result<()> {
    PoolBlock::with_mems(dst, src, |d, s| {
        copy(d, dst_offset, s, src_offset, len, Some(&stream.inner))
    })
}

/// Queues a copy of `len` bytes from the pinned block `src[src_offset..]` into the
/// device block `dst[dst_offset..]` on `stream`.
pub(crate) fn host_to_block(
    dst: &PoolBlock,
    dst_offset: usize,
    src: &HostBlock,
    src_offset: usize,
    len: usize,
    stream: &Stream,
) -> Result<()> {
    into_block(dst, dst_offset, src.mem(), src_offset, len, stream)
}

/// Queues a copy of `len` bytes from the device block `src[src_offset..]` into the
/// pinned block `dst[dst_offset..]` on `stream`.
pub(crate) fn block_to_host(
    dst: &HostBlock,
    dst_offset: usize,
    src: &PoolBlock,
    src_offset: usize,
    len: usize,
    stream: &Stream,
) -> Result<()> {
    out_of_block(dst.mem(), dst_offset, src, src_offset, len, stream)
}
