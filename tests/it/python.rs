//! Runs the Python package's tests (`python/tests`, stdlib `unittest`) against the
//! `libhetmem.so` cargo built for this test run, on the simulator and on the CUDA backend
//! over the fake driver (tests/fake_cuda):
//!
//! ```text
//! HETMEM_LIB=<that library> HETMEM_BACKEND=sim python3 -m unittest discover -s python/tests -v
//! ```
//!
//! Needs `python3` (or `$PYTHON`); CI installs it. A missing interpreter fails the test
//! rather than skipping it.

use crate::common::{cdylib, fake_cuda};

use std::path::Path;
use std::process::Command;

#[test]
fn python_package_tests_pass_on_the_simulator() {
    run_python_tests(&[("HETMEM_BACKEND", "sim")]);
}

/// The ctypes layer and the PyTorch entry points through the CUDA backend (the fake
/// driver is the first `libcuda.so.1` on the loader path of the Python process).
#[test]
fn python_package_tests_pass_on_cuda_over_the_fake_driver() {
    let fake = fake_cuda::fake_cuda_library().expect("building the fake CUDA driver");
    let dir = fake.parent().expect("target/fake-cuda").to_owned();
    run_python_tests(&[
        ("HETMEM_BACKEND", "cuda"),
        ("LD_LIBRARY_PATH", dir.to_str().expect("UTF-8 path")),
        ("FAKE_CUDA_MEM_BYTES", "2147483648"),
    ]);
}

fn run_python_tests(env: &[(&str, &str)]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = cdylib::library_path();
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let out = Command::new(&python)
        .args(["-m", "unittest", "discover", "-s", "python/tests", "-v"])
        .current_dir(root)
        .env("HETMEM_LIB", &lib)
        .envs(env.iter().copied())
        .env("PYTHONPATH", root.join("python"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // A call that fails with a code the header does not list for it aborts, naming
        // both (src/ffi/codes.rs): the docstrings list the header's codes.
        .env("HETMEM_CHECK_CODES", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {python:?}: {e}. Install python3 (the CI script does).")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = format!(
        "{python} -m unittest (HETMEM_LIB={}, {env:?}): {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        lib.display(),
        out.status
    );
    // Shown with --nocapture, and on failure.
    println!("{text}");
    assert!(out.status.success(), "{text}");
    // unittest reports on stderr: "Ran N tests in ...", then "OK" (or "OK (skipped=k)").
    let ran: usize = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no \"Ran N tests\" line:\n{text}"));
    assert!(ran >= 30, "only {ran} Python tests ran:\n{text}");
    assert!(
        stderr.lines().any(|l| l.starts_with("OK")),
        "unittest did not report OK:\n{text}"
    );
}
