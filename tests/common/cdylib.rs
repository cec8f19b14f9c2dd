//! Where the `libhetmem.so` built for this test run is.

use std::path::PathBuf;

/// The directory of the `libhetmem.so` built for this test run: cargo builds the
/// package's cdylib next to the test executables (`target/<profile>/deps`) before it
/// runs integration tests; `cargo build` also copies it up to `target/<profile>`, where
/// it may be older, so `deps` comes first.
pub fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("the deps directory");
    let candidates = [
        deps.to_path_buf(),
        deps.parent().unwrap_or(deps).to_path_buf(),
    ];
    candidates
        .iter()
        .find(|d| d.join("libhetmem.so").is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "libhetmem.so is in none of {candidates:?}: cargo should have built the cdylib \
                 (crate-type in Cargo.toml)"
            )
        })
}

/// The path of that `libhetmem.so`.
pub fn library_path() -> PathBuf {
    library_dir().join("libhetmem.so")
}
