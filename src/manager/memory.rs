//! One copy entry point over every kind of memory: [`Manager::copy`] takes any
//! [`Memory`] ([`Buffer`], [`PoolBlock`], [`HostBlock`]) at either end.

use crate::backend::owned::copy::{copy, CopyEnd};
use crate::error::{Error, Result};
use crate::manager::{Buffer, Manager};
use crate::pool::{self, HostBlock, PoolBlock};
use crate::stream::Stream;

/// Memory that [`Manager::copy`] copies to or from: a [`Buffer`], a device pool's
/// [`PoolBlock`] or a host pool's [`HostBlock`]. Implemented by those three only.
pub trait Memory: sealed::Sealed {}

impl Memory for Buffer {}
impl Memory for PoolBlock {}
impl Memory for HostBlock {}

/// Not nameable outside the crate: what keeps [`Memory`] to the three.
mod sealed {
    use crate::manager::Buffer;
    use crate::pool::{HostBlock, PoolBlock};

    /// What [`Memory`](super::Memory) is to the copy path.
    pub trait Sealed {
        fn end(&self) -> End<'_>;
    }

    /// One end of a copy.
    pub enum End<'a> {
        Buffer(&'a Buffer),
        Block(&'a PoolBlock),
        Host(&'a HostBlock),
    }
}

use sealed::End;

impl sealed::Sealed for Buffer {
    fn end(&self) -> End<'_> {
        End::Buffer(self)
    }
}

impl sealed::Sealed for PoolBlock {
    fn end(&self) -> End<'_> {
        End::Block(self)
    }
}

impl sealed::Sealed for HostBlock {
    fn end(&self) -> End<'_> {
        End::Host(self)
    }
}

impl Manager {
    /// Copies `len` bytes from `src[src_offset..]` to `dst[dst_offset..]`, between any
    /// two kinds of [`Memory`].
    ///
    /// With `stream`, the copy is queued there and this returns at once (pageable host
    /// memory may make it wait, as the drivers do); the memory stays alive until the
    /// copy is done even if dropped earlier (a buffer's or host block's drop waits for
    /// it), and a stream other than a pool block's own is recorded on the block
    /// ([`PoolBlock::record_stream`]), so the block is not reused before the copy is
    /// done. Without, the copy has arrived when this returns, ordered after every
    /// earlier asynchronous copy that used either end; a pool block, whose work is
    /// ordered on a stream, needs one.
    ///
    /// # Errors
    /// [`Error::ForeignHandle`] for a buffer or stream of another manager,
    /// [`Error::OutOfBounds`], [`Error::InvalidArgument`] for a stream of another device
    /// or a pool block without a stream; the backend's errors.
    pub fn copy<D, S>(
        &self,
        dst: &mut D,
        dst_offset: usize,
        src: &S,
        src_offset: usize,
        len: usize,
        stream: Option<&Stream>,
    ) -> Result<()>
    where
        D: Memory + ?Sized,
        S: Memory + ?Sized,
    {
        let (dst, src) = (dst.end(), src.end());
        for end in [&dst, &src] {
            if let End::Buffer(b) = end {
                self.check_owner(b.mgr.id, "buffer")?;
            }
        }
        let Some(stream) = stream else {
            return match (owned(&dst), owned(&src)) {
                (Some(d), Some(s)) => copy(d, dst_offset, s, src_offset, len, None),
                _ => Err(Error::InvalidArgument(
                    "a pool block is copied on a stream: pass one".into(),
                )),
            };
        };
        self.check_stream(stream)?;
        for end in [&dst, &src] {
            if let End::Block(b) = end {
                b.record_stream(stream)?;
            }
        }
        match (&dst, &src) {
            (End::Block(d), End::Block(s)) => {
                pool::copy::between_blocks(d, dst_offset, s, src_offset, len, stream)
            }
            (End::Block(d), s) => {
                let s = owned(s).expect("not a pool block");
                pool::copy::into_block(d, dst_offset, s, src_offset, len, stream)
            }
            (d, End::Block(s)) => {
                let d = owned(d).expect("not a pool block");
                pool::copy::out_of_block(d, dst_offset, s, src_offset, len, stream)
            }
            (d, s) => {
                let (d, s) = (
                    owned(d).expect("not a pool block"),
                    owned(s).expect("not a pool block"),
                );
                copy(d, dst_offset, s, src_offset, len, Some(&stream.inner))
            }
        }
    }
}

/// The end's memory where it owns it outright (not a pool block, whose memory is the
/// pool's, reached under its lock).
fn owned<'a>(end: &End<'a>) -> Option<&'a dyn CopyEnd> {
    match *end {
        End::Buffer(b) => Some(&b.mem),
        End::Host(h) => Some(h.mem()),
        End::Block(_) => None,
    }
}
