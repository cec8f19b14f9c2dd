//! Parameter sources: host memory and tensors of a mapped safetensors file, read with no
//! copy, and a clear error (never a panic) for every kind of broken file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hetmem::tier::source::{
    write_safetensors, MappedFile, MappedSlice, SafetensorsFile, Source, TensorSpec,
};
use hetmem::Error;

/// A path for this test's file, unique per process and test.
fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "tier-source-{}-{name}.safetensors",
        std::process::id()
    ))
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The three tensors of the round trip: different dtypes, ranks and sizes.
fn sample() -> Vec<(&'static str, &'static str, Vec<usize>, Vec<u8>)> {
    vec![
        (
            "layer.0.weight",
            "F32",
            vec![2, 3],
            f32_bytes(&[1.0, -2.0, 3.5, 0.25, 1e9, -0.0]),
        ),
        (
            "layer.0.bias",
            "BF16",
            vec![4],
            vec![1, 2, 3, 4, 5, 6, 7, 8],
        ),
        ("embed.ids", "U8", vec![3, 1, 1], vec![9, 8, 7]),
    ]
}

fn write_sample(path: &Path) -> Vec<(&'static str, &'static str, Vec<usize>, Vec<u8>)> {
    let tensors = sample();
    let refs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, d, s, b)| (*n, *d, s.as_slice(), b.as_slice()))
        .collect();
    write_safetensors(path, &refs).unwrap();
    tensors
}

/// A raw safetensors image: header length, `header`, then `data_len` data bytes.
fn raw(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend((0..data_len).map(|i| i as u8));
    out
}

/// Writes `bytes`, opens them, and returns the reason of the `Error::Config` that must
/// come back (checking that it names the file).
fn config_reason(name: &str, bytes: &[u8]) -> String {
    let path = tmp(name);
    std::fs::write(&path, bytes).unwrap();
    let reason = config_reason_at(&path);
    std::fs::remove_file(&path).unwrap();
    reason
}

fn config_reason_at(path: &Path) -> String {
    match SafetensorsFile::open(path) {
        Err(Error::Config { path: p, reason }) => {
            assert_eq!(p, path.display().to_string());
            let shown = Error::Config {
                path: p,
                reason: reason.clone(),
            }
            .to_string();
            assert!(shown.contains(&reason), "{shown}");
            reason
        }
        Err(other) => panic!(
            "expected Error::Config for {}, got {other:?}",
            path.display()
        ),
        Ok(file) => panic!("{} opened: {file:?}", path.display()),
    }
}

#[test]
fn round_trip_reads_every_tensor_from_the_mapping() {
    let path = tmp("round-trip");
    let tensors = write_sample(&path);
    let file = SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.path(), path);
    assert_eq!(file.tensors().len(), tensors.len());
    let mapping = file.file().bytes();
    assert_eq!(
        mapping.len() as u64,
        std::fs::metadata(&path).unwrap().len()
    );
    let header_len = u64::from_le_bytes(mapping[..8].try_into().unwrap()) as usize;

    // In file order, contiguous, after the header, and ending at the end of the file.
    let mut at = 8 + header_len;
    for info in file.tensors() {
        assert_eq!(info.offset, at, "{info:?}");
        at += info.len;
    }
    assert_eq!(at, mapping.len());

    for (name, dtype, shape, data) in &tensors {
        let info = file.info(name).unwrap();
        assert_eq!(&info.name, name);
        assert_eq!(&info.dtype, dtype);
        assert_eq!(&info.shape, shape);
        assert_eq!(info.len, data.len());
        assert!(info.offset + info.len <= mapping.len());

        let source = file.source(name).unwrap();
        assert!(source.is_mapped());
        assert_eq!(source.len(), data.len());
        assert_eq!(source.bytes(), data.as_slice());
        // No copy: the slice is the mapping's own bytes at the tensor's offset.
        assert!(file.file().contains(source.bytes()));
        assert_eq!(source.bytes().as_ptr(), mapping[info.offset..].as_ptr());
        let Source::Mapped(slice) = &source else {
            unreachable!()
        };
        assert!(Arc::ptr_eq(slice.file(), file.file()));
        assert_eq!(slice.offset(), info.offset);
        assert_eq!(slice.len(), info.len);
        // Clones share the bytes too.
        assert_eq!(source.clone().bytes().as_ptr(), source.bytes().as_ptr());
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn sources_keep_the_mapping_alive_and_survive_a_rewrite() {
    let path = tmp("rewrite");
    let tensors = write_sample(&path);
    let file = SafetensorsFile::open(&path).unwrap();
    let (name, _, _, data) = &tensors[0];
    let source = file.source(name).unwrap();
    drop(file);
    // The helper writes a temporary file and renames it, so the old mapping keeps the
    // old bytes rather than faulting on a truncated file.
    write_safetensors(&path, &[(*name, "U8", &[2], &[1, 2])]).unwrap();
    assert_eq!(source.bytes(), data.as_slice());
    let reopened = SafetensorsFile::open(&path).unwrap();
    assert_eq!(reopened.source(name).unwrap().bytes(), &[1, 2]);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn empty_and_zero_sized_tensors() {
    let path = tmp("empty-list");
    write_safetensors(&path, &[]).unwrap();
    let file = SafetensorsFile::open(&path).unwrap();
    assert!(file.tensors().is_empty());

    write_safetensors(
        &path,
        &[("none", "F16", &[0, 4], &[]), ("one", "I8", &[1], &[7])],
    )
    .unwrap();
    let file = SafetensorsFile::open(&path).unwrap();
    let none = file.source("none").unwrap();
    assert!(none.is_empty());
    assert_eq!(none.bytes(), &[] as &[u8]);
    assert_eq!(file.source("one").unwrap().bytes(), &[7]);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn host_sources_share_the_callers_bytes() {
    let bytes: Arc<[u8]> = Arc::from(vec![5u8; 1000]);
    let source = Source::Host(Arc::clone(&bytes));
    assert!(!source.is_mapped());
    assert_eq!(source.len(), 1000);
    assert_eq!(source.bytes().as_ptr(), bytes.as_ptr());
    assert_eq!(source.clone().bytes().as_ptr(), bytes.as_ptr());

    let from_vec = Source::from(vec![1u8, 2, 3]);
    assert_eq!(from_vec.bytes(), &[1, 2, 3]);
    let empty = Source::from(Vec::new());
    assert!(empty.is_empty());
    assert!(format!("{source:?}").contains("1000"));
}

#[test]
fn mapped_slices_are_checked_against_the_file() {
    let path = tmp("slice");
    std::fs::write(&path, b"0123456789").unwrap();
    let file = Arc::new(MappedFile::open(&path).unwrap());
    assert_eq!(file.len(), 10);
    let slice = MappedSlice::new(Arc::clone(&file), 2, 5).unwrap();
    assert_eq!(Source::from(slice).bytes(), b"23456");
    assert!(MappedSlice::new(Arc::clone(&file), 10, 0).is_ok());
    for (offset, len) in [(6, 5), (11, 0), (usize::MAX, 2)] {
        match MappedSlice::new(Arc::clone(&file), offset, len) {
            Err(Error::OutOfBounds { size: 10, .. }) => {}
            other => panic!("{offset}+{len}: {other:?}"),
        }
    }
    assert!(!file.contains(&[0u8; 4]));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn unknown_tensor_name_is_invalid_argument_naming_it() {
    let path = tmp("unknown");
    write_sample(&path);
    let file = SafetensorsFile::open(&path).unwrap();
    for err in [
        file.source("layer.9.weight").unwrap_err(),
        file.info("layer.9.weight").unwrap_err(),
    ] {
        match &err {
            Error::InvalidArgument(msg) => {
                assert!(msg.contains("`layer.9.weight`"), "{msg}");
                assert!(msg.contains(&path.display().to_string()), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn missing_file_and_directory_are_config_errors() {
    let missing = tmp("does-not-exist");
    let reason = config_reason_at(&missing);
    assert!(reason.contains("cannot open"), "{reason}");

    let dir = tmp("a-directory");
    std::fs::create_dir_all(&dir).unwrap();
    let reason = config_reason_at(&dir);
    assert!(
        reason.contains("not a regular file (a directory)"),
        "{reason}"
    );
    std::fs::remove_dir(&dir).unwrap();
}

/// Issue 15: a FIFO's `open` waits for a writer, so opening one blocking hung
/// `SafetensorsFile::open` (and the store's registration through C) for good. It is a
/// configuration error at once, as is any other file that is not a regular one.
#[test]
fn a_fifo_or_a_device_is_a_config_error_at_once() {
    use std::sync::mpsc;
    use std::time::Duration;

    let fifo = tmp("fifo");
    std::fs::remove_file(&fifo).ok();
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let (tx, rx) = mpsc::channel();
    let at = fifo.clone();
    std::thread::spawn(move || {
        let reasons = [
            std::panic::catch_unwind(|| config_reason_at(&at)),
            std::panic::catch_unwind(|| match MappedFile::open(&at) {
                Err(Error::Config { reason, .. }) => reason,
                other => panic!("{other:?}"),
            }),
        ];
        tx.send(reasons).ok();
    });
    let Ok(reasons) = rx.recv_timeout(Duration::from_secs(10)) else {
        // Let the opener go: a writer completes its open.
        let _writer = std::fs::OpenOptions::new().write(true).open(&fifo);
        std::fs::remove_file(&fifo).ok();
        panic!("opening a FIFO blocked (no writer)");
    };
    std::fs::remove_file(&fifo).unwrap();
    for reason in reasons {
        let reason = reason.unwrap();
        assert!(reason.contains("not a regular file (a FIFO)"), "{reason}");
    }
    // A character device maps (as /dev/zero does) but is no model file.
    let reason = config_reason_at(Path::new("/dev/zero"));
    assert!(
        reason.contains("not a regular file (a character device)"),
        "{reason}"
    );
}

#[test]
fn empty_or_short_file() {
    let reason = config_reason("empty", b"");
    assert!(
        reason.contains("0 bytes") && reason.contains("too short"),
        "{reason}"
    );
    let reason = config_reason("five-bytes", b"\x05\0\0\0\0");
    assert!(
        reason.contains("5 bytes") && reason.contains("too short"),
        "{reason}"
    );
}

#[test]
fn header_length_past_the_end_of_the_file() {
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let reason = config_reason("long-header", &bytes);
    assert!(
        reason.contains("header length 1000 runs past the end of the file (10 bytes"),
        "{reason}"
    );

    let reason = config_reason("huge-header", &u64::MAX.to_le_bytes());
    assert!(reason.contains("runs past the end"), "{reason}");
}

#[test]
fn header_that_is_not_json() {
    let reason = config_reason("not-json", &raw("not json", 0));
    assert!(reason.contains("not valid safetensors JSON"), "{reason}");

    let reason = config_reason("not-utf8", &[1, 0, 0, 0, 0, 0, 0, 0, 0xff]);
    assert!(reason.contains("not UTF-8"), "{reason}");

    // JSON, but not a safetensors header.
    let reason = config_reason("wrong-schema", &raw(r#"{"a": 1}"#, 0));
    assert!(reason.contains("not valid safetensors JSON"), "{reason}");
    let reason = config_reason(
        "bad-dtype",
        &raw(
            r#"{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}"#,
            4,
        ),
    );
    assert!(reason.contains("F33"), "{reason}");
}

#[test]
fn data_offsets_past_the_end_of_the_file() {
    let header = r#"{"a":{"dtype":"U8","shape":[100],"data_offsets":[0,100]}}"#;
    let reason = config_reason("offsets-past-end", &raw(header, 10));
    assert!(
        reason.contains("does not end at the end of the file") && reason.contains("10 data bytes"),
        "{reason}"
    );
}

#[test]
fn truncated_file() {
    let path = tmp("truncated");
    write_sample(&path);
    let len = std::fs::metadata(&path).unwrap().len();

    // Cut in the tensor data.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let reason = config_reason_at(&path);
    assert!(reason.contains("truncated"), "{reason}");

    // Cut in the header.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(20)
        .unwrap();
    let reason = config_reason_at(&path);
    assert!(
        reason.contains("runs past the end of the file (20 bytes"),
        "{reason}"
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn trailing_bytes_after_the_last_tensor() {
    let path = tmp("trailing");
    write_sample(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.push(0);
    std::fs::remove_file(&path).unwrap();
    let reason = config_reason("trailing-2", &bytes);
    assert!(reason.contains("bytes after the last tensor"), "{reason}");
}

#[test]
fn overlapping_gapped_or_inconsistent_offsets() {
    let overlap = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
                      "b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
    let reason = config_reason("overlap", &raw(overlap, 6));
    assert!(
        reason.contains("`b`") && reason.contains("overlap"),
        "{reason}"
    );

    let gap = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
                  "b":{"dtype":"U8","shape":[4],"data_offsets":[6,10]}}"#;
    let reason = config_reason("gap", &raw(gap, 10));
    assert!(reason.contains("`b`") && reason.contains("gap"), "{reason}");

    let backwards = r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},
                        "b":{"dtype":"U8","shape":[4],"data_offsets":[4,0]}}"#;
    let reason = config_reason("backwards", &raw(backwards, 4));
    assert!(reason.contains("data_offsets"), "{reason}");

    let wrong_size = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
    let reason = config_reason("wrong-size", &raw(wrong_size, 4));
    assert!(reason.contains("shape and dtype"), "{reason}");

    let overflow = r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#;
    let reason = config_reason("overflow", &raw(overflow, 4));
    assert!(reason.contains("overflow"), "{reason}");
}

#[test]
fn unordered_offsets_in_the_header_are_accepted() {
    // The header lists `b` first; the format only asks that the offsets tile the data.
    let header = r#"{"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},
                     "a":{"dtype":"U16","shape":[2],"data_offsets":[0,4]}}"#;
    let path = tmp("unordered");
    std::fs::write(&path, raw(header, 6)).unwrap();
    let file = SafetensorsFile::open(&path).unwrap();
    let names: Vec<_> = file.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(file.source("a").unwrap().bytes(), &[0, 1, 2, 3]);
    assert_eq!(file.source("b").unwrap().bytes(), &[4, 5]);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn every_truncation_and_header_corruption_errors_without_panicking() {
    let path = tmp("fuzz-src");
    write_sample(&path);
    let good = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;

    let path = tmp("fuzz");
    for len in 0..good.len() {
        std::fs::write(&path, &good[..len]).unwrap();
        config_reason_at(&path);
    }
    // Every single-byte change in the header either still parses or is refused cleanly.
    let mut refused = 0;
    for at in 0..header_end {
        for byte in [0u8, b'9', b'"', b'}', 0xff] {
            let mut bytes = good.clone();
            if bytes[at] == byte {
                continue;
            }
            bytes[at] = byte;
            std::fs::write(&path, &bytes).unwrap();
            match SafetensorsFile::open(&path) {
                Ok(file) => {
                    for t in file.tensors() {
                        assert!(t.offset + t.len <= bytes.len());
                        assert_eq!(file.source(&t.name).unwrap().len(), t.len);
                    }
                }
                Err(Error::Config { .. }) => refused += 1,
                Err(other) => panic!("byte {at} = {byte}: {other:?}"),
            }
        }
    }
    assert!(refused > 0);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn writer_refuses_bad_tensors() {
    let path = tmp("writer");
    let cases: [(&[TensorSpec], &str); 5] = [
        (
            &[("a", "F33", &[1], &[0; 4])],
            "unknown safetensors dtype `F33`",
        ),
        (&[("a", "F32", &[2], &[0; 4])], "needs 8 bytes"),
        (&[("a", "F4", &[3], &[0; 2])], "not whole bytes"),
        (
            &[("a", "U8", &[1], &[0]), ("a", "U8", &[1], &[1])],
            "`a` given twice",
        ),
        (&[("__metadata__", "U8", &[1], &[0])], "reserved"),
    ];
    for (tensors, expect) in cases {
        match write_safetensors(&path, tensors) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains(expect), "{msg}"),
            other => panic!("{expect}: {other:?}"),
        }
    }
    assert!(!path.exists());
    let nowhere = tmp("no-such-dir").join("x.safetensors");
    match write_safetensors(&nowhere, &[("a", "U8", &[1], &[0])]) {
        Err(Error::Os { .. }) => {}
        other => panic!("{other:?}"),
    }
}
