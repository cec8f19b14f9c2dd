//! Where a parameter's bytes come from before the store places them: host memory the
//! caller hands over, or a tensor inside a safetensors file mapped read-only.
//!
//! The store keeps at most one host copy of each parameter, and a mapped file counts as
//! that copy: a [`Source`] is either an `Arc<[u8]>` or a range of a shared
//! [`MappedFile`], and [`Source::bytes`] is a slice of one or the other, never a copy.
//! Cloning a `Source` clones an `Arc`.
//!
//! [`SafetensorsFile::open`] maps a file, parses its header with the `safetensors`
//! crate (which reads the JSON header and checks every tensor's offsets against its
//! shape, its dtype and the file's length, without touching tensor data), and hands out
//! one [`Source`] per tensor. A file that is empty, truncated, padded, not a regular
//! file (a directory, a FIFO: never opened blocking), or has a header that is not
//! safetensors JSON gives [`Error::Config`] naming the file and the fault; an unknown
//! tensor name gives [`Error::InvalidArgument`] naming it. A tensor of zero elements is
//! legal: its [`Source`] is empty.
//!
//! Known limitation of every file mapping (see [`MappedFile`]): if another process
//! truncates a mapped file, reading the lost pages raises `SIGBUS`.

use std::borrow::Cow;
use std::fmt;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use rustc_hash::{FxHashMap, FxHashSet};
use safetensors::{Dtype, SafeTensorError, SafeTensors, View};

use crate::error::{Error, Result};
use crate::host_mem::map_file_readonly;

/// Bytes in a safetensors file's leading header length (a little-endian `u64`).
const HEADER_LEN_BYTES: usize = 8;

/// A whole file mapped read-only into this process, with the path it was opened from.
///
/// The mapping is shared (`MAP_SHARED`, `PROT_READ`): its pages are the kernel's page
/// cache, so they are the one host copy of the file's bytes, loaded on first touch and
/// reclaimable under memory pressure. It is advised for sequential access.
///
/// Known limitation (the one `memmap2` documents): the mapping follows the file, so if
/// another process truncates the file while it is mapped, reading past the new end
/// raises `SIGBUS`, and a rewrite shows through. Map only files nothing else changes.
pub struct MappedFile {
    map: memmap2::Mmap,
    path: PathBuf,
}

impl MappedFile {
    /// Opens `path` read-only and maps all of it.
    ///
    /// The file is opened with `O_NONBLOCK`, so that a FIFO (whose `open` waits for a
    /// writer) or a device cannot hang the call, and must then be a regular file.
    ///
    /// # Errors
    /// [`Error::Config`] naming the file when it cannot be opened or mapped, or is not
    /// a regular file (a directory, a FIFO, a device, a socket).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // Checked on the open file (`fstat`), not on the path before opening, so that
        // nothing can swap the path in between. `O_NONBLOCK` changes nothing for a
        // regular file: reads and mappings of one never block on it.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| config(path, format!("cannot open: {e}")))?;
        let kind = file
            .metadata()
            .map_err(|e| config(path, format!("cannot stat: {e}")))?
            .file_type();
        if !kind.is_file() {
            return Err(config(
                path,
                format!("not a regular file (a {})", file_kind(&kind)),
            ));
        }
        let map = map_file_readonly(&file)
            .map_err(|e| config(path, format!("cannot map read-only: {e}")))?;
        if !map.is_empty() {
            // Advisory only: a kernel that refuses the hint still serves the pages.
            if let Err(e) = map.advise(memmap2::Advice::Sequential) {
                tracing::debug!(path = %path.display(), error = %e, "madvise(SEQUENTIAL) refused");
            }
        }
        Ok(MappedFile {
            map,
            path: path.to_path_buf(),
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file, as mapped.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Length of the file (and of the mapping) in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether `bytes` lies wholly inside this mapping (so reading it reads the file's
    /// pages, not a copy).
    pub fn contains(&self, bytes: &[u8]) -> bool {
        let map = self.map.as_ptr_range();
        let range = bytes.as_ptr_range();
        map.start <= range.start && range.end <= map.end
    }
}

impl fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedFile")
            .field("path", &self.path)
            .field("len", &self.map.len())
            .finish()
    }
}

/// A byte range of a [`MappedFile`], checked to lie inside it when made.
#[derive(Clone, Debug)]
pub struct MappedSlice {
    file: Arc<MappedFile>,
    offset: usize,
    len: usize,
}

impl MappedSlice {
    /// The bytes `offset..offset + len` of `file`.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] when the range does not lie inside the file.
    pub fn new(file: Arc<MappedFile>, offset: usize, len: usize) -> Result<Self> {
        match offset.checked_add(len) {
            Some(end) if end <= file.len() => Ok(MappedSlice { file, offset, len }),
            _ => Err(Error::OutOfBounds {
                offset,
                len,
                size: file.len(),
            }),
        }
    }

    /// The mapped file the range lies in.
    pub fn file(&self) -> &Arc<MappedFile> {
        &self.file
    }

    /// Offset of the range from the start of the file.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Length of the range in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The range's bytes: a slice of the mapping.
    pub fn bytes(&self) -> &[u8] {
        // In range: checked in `new`, the only constructor, and the mapping never shrinks.
        &self.file.bytes()[self.offset..self.offset + self.len]
    }
}

/// Where one parameter's bytes live on the host: the one host copy the store keeps.
#[derive(Clone)]
pub enum Source {
    /// Host memory the caller handed over.
    Host(Arc<[u8]>),
    /// A range of a file mapped read-only (the file's page cache is the copy).
    Mapped(MappedSlice),
}

impl Source {
    /// Length of the parameter in bytes.
    pub fn len(&self) -> usize {
        match self {
            Source::Host(bytes) => bytes.len(),
            Source::Mapped(slice) => slice.len(),
        }
    }

    /// Whether the parameter has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The parameter's bytes, without a copy: a slice of the `Arc` or of the mapping.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Source::Host(bytes) => bytes,
            Source::Mapped(slice) => slice.bytes(),
        }
    }

    /// Whether the bytes are a range of a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self, Source::Mapped(_))
    }
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Host(bytes) => f.debug_struct("Host").field("len", &bytes.len()).finish(),
            Source::Mapped(slice) => f
                .debug_struct("Mapped")
                .field("path", &slice.file.path())
                .field("offset", &slice.offset)
                .field("len", &slice.len)
                .finish(),
        }
    }
}

impl From<Arc<[u8]>> for Source {
    fn from(bytes: Arc<[u8]>) -> Self {
        Source::Host(bytes)
    }
}

impl From<Vec<u8>> for Source {
    /// Moves the bytes into an `Arc<[u8]>`. That moves them once (the `Arc` needs its
    /// counts in front of the data); the `Vec` is consumed, so one copy remains.
    fn from(bytes: Vec<u8>) -> Self {
        Source::Host(bytes.into())
    }
}

impl From<MappedSlice> for Source {
    fn from(slice: MappedSlice) -> Self {
        Source::Mapped(slice)
    }
}

/// One tensor of a [`SafetensorsFile`], as its header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name in the header.
    pub name: String,
    /// The safetensors dtype, as the header spells it (`"F32"`, `"BF16"`, `"I8"`, ...).
    pub dtype: String,
    /// The tensor's shape (row-major).
    pub shape: Vec<usize>,
    /// Offset of the tensor's first byte from the start of the file (not of the data
    /// section).
    pub offset: usize,
    /// Length of the tensor's data in bytes.
    pub len: usize,
}

/// A safetensors file mapped read-only, its header parsed and checked.
#[derive(Debug)]
pub struct SafetensorsFile {
    file: Arc<MappedFile>,
    /// In file order (by offset).
    tensors: Vec<TensorInfo>,
    index: FxHashMap<String, usize>,
}

impl SafetensorsFile {
    /// Maps `path` and parses its header. No tensor data is read or copied; the header
    /// is checked for consistency (every tensor's offsets match its shape and dtype,
    /// tensors are contiguous, and the last ends exactly at the end of the file).
    ///
    /// # Errors
    /// [`Error::Config`] naming the file and the fault: cannot open or map, not a
    /// regular file (a directory, a FIFO, a device: see [`MappedFile::open`]), shorter than
    /// the 8-byte header length, header length past the end of the file, header not
    /// UTF-8 or not safetensors JSON, offsets that overlap, leave gaps, or disagree with
    /// shape and dtype, or data that does not end at the end of the file (truncated or
    /// padded).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = Arc::new(MappedFile::open(path)?);
        let bytes = file.bytes();
        let header_len = check_header_len(path, bytes)?;
        let (n, metadata) = SafeTensors::read_metadata(bytes)
            .map_err(|e| config(path, describe(&e, bytes.len(), header_len)))?;
        let data_start = HEADER_LEN_BYTES + n;
        let mut tensors = Vec::with_capacity(metadata.tensors().len());
        let mut index = FxHashMap::default();
        for name in metadata.offset_keys() {
            let Some(info) = metadata.info(&name) else {
                continue;
            };
            let (start, end) = info.data_offsets;
            // The crate checked this; check again so a bug there cannot become a panic
            // in `MappedSlice::bytes`.
            let range = data_start
                .checked_add(start)
                .zip(data_start.checked_add(end))
                .filter(|&(s, e)| s <= e && e <= bytes.len());
            let Some((offset, stop)) = range else {
                return Err(config(
                    path,
                    format!(
                        "tensor `{name}` has data_offsets [{start}, {end}] outside the \
                         {} data bytes of the file",
                        bytes.len() - data_start
                    ),
                ));
            };
            index.insert(name.clone(), tensors.len());
            tensors.push(TensorInfo {
                name,
                dtype: info.dtype.to_string(),
                shape: info.shape.clone(),
                offset,
                len: stop - offset,
            });
        }
        Ok(SafetensorsFile {
            file,
            tensors,
            index,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The mapped file every [`Source`] of this file shares.
    pub fn file(&self) -> &Arc<MappedFile> {
        &self.file
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `name` and the file when there is none.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        match self.index.get(name) {
            Some(&i) => Ok(&self.tensors[i]),
            None => Err(Error::InvalidArgument(format!(
                "no tensor named `{name}` in {} ({} tensors)",
                self.file.path().display(),
                self.tensors.len()
            ))),
        }
    }

    /// The bytes of the tensor called `name`, as a [`Source::Mapped`] range of this
    /// file's mapping (no copy).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `name` when the file has no such tensor.
    pub fn source(&self, name: &str) -> Result<Source> {
        let info = self.info(name)?;
        Ok(Source::Mapped(MappedSlice::new(
            Arc::clone(&self.file),
            info.offset,
            info.len,
        )?))
    }
}

/// One tensor for [`write_safetensors`]: `(name, dtype, shape, data)`.
pub type TensorSpec<'a> = (&'a str, &'a str, &'a [usize], &'a [u8]);

/// Writes `tensors` (`(name, dtype, shape, data)`, dtype as safetensors spells it:
/// `"F32"`, `"BF16"`, `"U8"`, ...) to a safetensors file at `path`, through a temporary
/// file in the same directory renamed into place, so a mapping of an older file at
/// `path` is never truncated under its readers. For synthetic model files in tests and
/// examples.
///
/// # Errors
/// [`Error::InvalidArgument`] for an unknown dtype, a duplicate or reserved name
/// (`__metadata__`), or data whose length is not what the shape and dtype need;
/// [`Error::Os`] when the file cannot be written.
pub fn write_safetensors(path: impl AsRef<Path>, tensors: &[TensorSpec<'_>]) -> Result<()> {
    let path = path.as_ref();
    let mut names = FxHashSet::default();
    let mut views = Vec::with_capacity(tensors.len());
    for &(name, dtype, shape, data) in tensors {
        if name == "__metadata__" {
            return Err(Error::InvalidArgument(
                "tensor name `__metadata__` is reserved by the safetensors format".into(),
            ));
        }
        if !names.insert(name) {
            return Err(Error::InvalidArgument(format!(
                "tensor `{name}` given twice"
            )));
        }
        let dtype = parse_dtype(dtype).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "tensor `{name}`: unknown safetensors dtype `{dtype}`"
            ))
        })?;
        let need = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.bitsize()));
        let problem = match need {
            None => Some("more bytes than fit in memory".to_string()),
            Some(bits) if bits % 8 != 0 => Some(format!("{bits} bits, not whole bytes")),
            Some(bits) if bits / 8 != data.len() => Some(format!("{} bytes", bits / 8)),
            Some(_) => None,
        };
        if let Some(need) = problem {
            return Err(Error::InvalidArgument(format!(
                "tensor `{name}`: {} bytes of data, but shape {shape:?} of {dtype} needs {need}",
                data.len()
            )));
        }
        views.push((name, RawTensor { dtype, shape, data }));
    }
    safetensors::serialize_to_file(views, None, path).map_err(|e| match e {
        SafeTensorError::IoError(io) => Error::os(
            "write safetensors",
            io.raw_os_error().map_or(Errno::EIO, Errno::from_raw),
        ),
        other => Error::InvalidArgument(format!(
            "cannot write {} as safetensors: {other}",
            path.display()
        )),
    })
}

/// A borrowed tensor for [`safetensors::serialize_to_file`].
struct RawTensor<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    data: &'a [u8],
}

impl View for RawTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Every dtype the `safetensors` crate knows, to parse one from its name.
const DTYPES: [Dtype; 22] = [
    Dtype::BOOL,
    Dtype::F4,
    Dtype::F6_E2M3,
    Dtype::F6_E3M2,
    Dtype::U8,
    Dtype::I8,
    Dtype::F8_E5M2,
    Dtype::F8_E4M3,
    Dtype::F8_E8M0,
    Dtype::F8_E4M3FNUZ,
    Dtype::F8_E5M2FNUZ,
    Dtype::I16,
    Dtype::U16,
    Dtype::F16,
    Dtype::BF16,
    Dtype::I32,
    Dtype::U32,
    Dtype::F32,
    Dtype::C64,
    Dtype::F64,
    Dtype::I64,
    Dtype::U64,
];

fn parse_dtype(name: &str) -> Option<Dtype> {
    DTYPES.into_iter().find(|d| d.to_string() == name)
}

/// What a file that is not a regular file is, for an error message.
fn file_kind(kind: &std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "directory"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

fn config(path: &Path, reason: String) -> Error {
    Error::Config {
        path: path.display().to_string(),
        reason,
    }
}

/// Checks the leading header length against the file's size, so the two commonest
/// faults (an empty or cut-short file, a header length from a file that is not
/// safetensors) say so with their numbers. Returns the header length.
fn check_header_len(path: &Path, bytes: &[u8]) -> Result<usize> {
    let Some(head) = bytes.first_chunk::<HEADER_LEN_BYTES>() else {
        return Err(config(
            path,
            format!(
                "file is {} bytes, too short for the 8-byte header length a safetensors \
                 file starts with",
                bytes.len()
            ),
        ));
    };
    let n = u64::from_le_bytes(*head);
    let room = (bytes.len() - HEADER_LEN_BYTES) as u64;
    if n > room {
        return Err(config(
            path,
            format!(
                "header length {n} runs past the end of the file ({} bytes, {room} after \
                 the header length): truncated, or not a safetensors file",
                bytes.len()
            ),
        ));
    }
    // n <= room, which fits in usize.
    Ok(n as usize)
}

/// A sentence for each way the `safetensors` crate refuses a header.
fn describe(err: &SafeTensorError, file_len: usize, header_len: usize) -> String {
    let data_len = file_len.saturating_sub(HEADER_LEN_BYTES + header_len);
    match err {
        SafeTensorError::HeaderTooSmall => {
            format!("file is {file_len} bytes, too short for the 8-byte header length")
        }
        SafeTensorError::HeaderTooLarge => {
            format!("header length {header_len} is over the safetensors limit of 100,000,000 bytes")
        }
        SafeTensorError::InvalidHeaderLength => {
            format!("header length {header_len} runs past the end of the file ({file_len} bytes)")
        }
        SafeTensorError::InvalidHeader(e) => format!("header is not UTF-8: {e}"),
        SafeTensorError::InvalidHeaderDeserialization(e) | SafeTensorError::JsonError(e) => {
            format!("header is not valid safetensors JSON: {e}")
        }
        SafeTensorError::InvalidOffset(name) => format!(
            "data_offsets of tensor `{name}` overlap another tensor, leave a gap, or run \
             backwards"
        ),
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's data_offsets do not span the bytes its shape and dtype need".into()
        }
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "tensor data does not end at the end of the file: the header's data_offsets \
             disagree with the {data_len} data bytes present (truncated file, or bytes \
             after the last tensor)"
        ),
        SafeTensorError::ValidationOverflow => {
            "a tensor's shape overflows when multiplied out".into()
        }
        SafeTensorError::MisalignedSlice => {
            "a tensor of a sub-byte dtype does not end on a byte boundary".into()
        }
        other => format!("invalid safetensors header: {other}"),
    }
}
