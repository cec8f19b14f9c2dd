//! Builds `tests/c/capi_test.c` against `include/hetmem.h` and the `libhetmem.so` that
//! cargo built for this test run, runs it on the simulator (and on the fake HIP
//! runtime through the ROCm backend, and on the fake CUDA driver through the CUDA
//! backend), and fails if any of its checks fails.
//!
//! Needs a C compiler (`cc`, or `$CC`); CI installs gcc. A missing compiler fails the
//! test rather than skipping it.

use crate::common::{cdylib, fake_cuda, fake_hip};

use cdylib::library_dir;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn scratch_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("capi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".to_owned())
}

fn show(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Compiles `tests/c/<source>` with `compiler` and `std` into `exe`, linked against the
/// `libhetmem.so` of this test run (rpath set); panics with the compiler's output.
fn compile(compiler: &str, std: &str, source: &str, exe: &Path) {
    let lib = library_dir();
    let out = Command::new(compiler)
        .arg(format!("-std={std}"))
        .args(["-O1", "-g", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(manifest_dir().join("include"))
        .arg(manifest_dir().join("tests/c").join(source))
        .arg("-o")
        .arg(exe)
        .arg("-L")
        .arg(&lib)
        .arg("-lhetmem")
        .arg("-pthread")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run the compiler {compiler:?}: {e}. Install gcc and g++ (CI does).")
        });
    assert!(
        out.status.success(),
        "{}",
        show(&format!("compiling {source} failed"), &out)
    );
}

/// Compiles the C test once per process.
fn test_program() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let exe = scratch_dir().join("capi_test");
        compile(&cc(), "gnu11", "capi_test.c", &exe);
        exe
    })
}

fn run_program(envs: &[(&str, &str)]) -> String {
    let exe = test_program();
    let scratch = scratch_dir();
    let mut cmd = Command::new(exe);
    // Cargo's LD_LIBRARY_PATH for tests lists target/<profile> too, where a `cargo
    // build` may have left an older libhetmem.so that would win over the rpath.
    // HETMEM_CHECK_CODES: a call that fails with a code the header does not list for it
    // aborts the program, naming both (src/ffi/codes.rs).
    cmd.arg(&scratch)
        .env_remove("HETMEM_BACKEND")
        .env("HETMEM_CHECK_CODES", "1")
        .env("LD_LIBRARY_PATH", library_dir());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running capi_test");
    let text = show("capi_test", &out);
    // Shown with --nocapture, and on failure.
    println!("{text}");
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.contains(" checks, 0 failed"),
        "the program did not reach its summary:\n{text}"
    );
    stdout
}

#[test]
fn c_program_passes_on_the_simulator() {
    // Two devices, as the fakes have: copies and events on another device's stream.
    let stdout = run_program(&[("HETMEM_BACKEND", "sim"), ("HETMEM_SIM_DEVICES", "2")]);
    let checks: usize = stdout.lines().filter(|l| l.starts_with("ok   ")).count();
    assert!(checks > 200, "only {checks} checks ran");
}

#[test]
fn c_program_passes_on_the_rocm_backend_over_the_fake_hip_runtime() {
    let lib = fake_hip::fake_hip_library().expect("building the fake HIP runtime");
    run_program(&[
        ("HETMEM_BACKEND", "rocm"),
        ("HETMEM_HIP_LIBRARY", lib.to_str().expect("a UTF-8 path")),
    ]);
}

/// The C program cannot preload the fake: it is the first `libcuda.so.1` on the loader
/// path instead, which is where the backend's `dlopen("libcuda.so.1")` looks first.
#[test]
fn c_program_passes_on_the_cuda_backend_over_the_fake_cuda_driver() {
    let lib = fake_cuda::fake_cuda_library().expect("building the fake CUDA driver");
    let dirs = format!(
        "{}:{}",
        library_dir().display(),
        lib.parent().expect("target/fake-cuda").display()
    );
    let stdout = run_program(&[("HETMEM_BACKEND", "cuda"), ("LD_LIBRARY_PATH", &dirs)]);
    assert!(
        stdout.contains(r#""backend":"cuda""#) && stdout.contains("Fake NVIDIA H100 0"),
        "the program did not run on the fake driver:\n{stdout}"
    );
}

/// `hetmem_torch_malloc_cxx` throws `std::runtime_error` to a C++ caller where
/// `hetmem_torch_malloc` returns NULL, as PyTorch's allocator interface needs; over the
/// fake CUDA driver (the PyTorch entry points never use the simulator).
#[test]
fn cpp_program_catches_what_the_torch_allocator_throws() {
    let lib = fake_cuda::fake_cuda_library().expect("building the fake CUDA driver");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_owned());
    let exe = scratch_dir().join("torch_cxx_test");
    compile(&cxx, "c++11", "torch_cxx_test.cpp", &exe);
    let text = run_on_fake_cuda(&lib, &exe, &[]);
    assert!(text.contains("checks, 0 failed"), "{text}");
}

/// Runs `exe args` with the CUDA backend over the fake driver `lib`; fails unless it
/// exits 0. Returns what it printed.
fn run_on_fake_cuda(lib: &Path, exe: &Path, args: &[&Path]) -> String {
    let dirs = format!(
        "{}:{}",
        library_dir().display(),
        lib.parent().expect("target/fake-cuda").display()
    );
    let out = Command::new(exe)
        .args(args)
        .env("HETMEM_CHECK_CODES", "1")
        .env("HETMEM_BACKEND", "cuda")
        .env("LD_LIBRARY_PATH", dirs)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let text = show(&exe.display().to_string(), &out);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    text
}

/// The same through a C host (as the python executable: no libstdc++ of its own) that
/// loads a C++ library with `RTLD_LOCAL`, as Python loads PyTorch's: libstdc++ is then
/// loaded but not in the global scope, and must still be found.
#[test]
fn cpp_library_loaded_rtld_local_catches_what_the_torch_allocator_throws() {
    let lib = fake_cuda::fake_cuda_library().expect("building the fake CUDA driver");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_owned());
    let dir = scratch_dir();
    let shim = dir.join("libtorch_local_shim.so");
    let out = Command::new(&cxx)
        .args(["-std=c++11", "-O1", "-Wall", "-Werror", "-shared", "-fPIC"])
        .arg(manifest_dir().join("tests/c/torch_local_shim.cpp"))
        .arg("-o")
        .arg(&shim)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?}: {e}"));
    assert!(out.status.success(), "{}", show("compiling the shim", &out));
    let exe = dir.join("torch_local_main");
    compile(&cc(), "gnu11", "torch_local_main.c", &exe);
    let text = run_on_fake_cuda(&lib, &exe, &[&shim]);
    assert!(text.contains("torch_local: thrown"), "{text}");
}

#[test]
fn header_compiles_as_strict_c_and_as_cpp() {
    let dir = scratch_dir();
    let src = dir.join("header_only.c");
    std::fs::write(
        &src,
        "#include \"hetmem.h\"\nint main(void) { return hetmem_version() == 0; }\n",
    )
    .unwrap();
    let out = Command::new(cc())
        .args([
            "-std=c99",
            "-D_POSIX_C_SOURCE=200809L",
            "-pedantic",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fsyntax-only",
            "-I",
        ])
        .arg(manifest_dir().join("include"))
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {:?}: {e}", cc()));
    assert!(out.status.success(), "{}", show("hetmem.h as C99", &out));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_owned());
    match Command::new(&cxx)
        .args([
            "-x",
            "c++",
            "-std=c++11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fsyntax-only",
            "-I",
        ])
        .arg(manifest_dir().join("include"))
        .arg(&src)
        .output()
    {
        Ok(out) => assert!(out.status.success(), "{}", show("hetmem.h as C++", &out)),
        // gcc without g++ (the CI image installs only gcc): the C check above still ran.
        Err(e) => {
            println!("note: no C++ compiler ({cxx:?}: {e}); the C++ check of hetmem.h did not run")
        }
    }
}

/// The `Errors:` text of the comment right above each declaration in `header` whose
/// name starts with one of `prefixes`, by function name, with "Errors: as hetmem_x"
/// followed to hetmem_x's list.
fn listed_errors(header: &str, prefixes: &[&str]) -> std::collections::HashMap<String, String> {
    let lines: Vec<&str> = header.lines().collect();
    let mut listed = std::collections::HashMap::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(decl) = line.strip_prefix("int ") else {
            continue;
        };
        let name = decl.split('(').next().unwrap_or("").trim().to_owned();
        if !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        // The comment block above: back to its opening "/*".
        let mut text = Vec::new();
        for above in lines[..i].iter().rev() {
            text.push(*above);
            if above.starts_with("/*") {
                break;
            }
        }
        text.reverse();
        let text = text.join(" ");
        let errors = text.split_once("Errors:").map_or("", |(_, e)| e).to_owned();
        listed.insert(name, errors);
    }
    let aliases: Vec<(String, String)> = listed
        .iter()
        .filter_map(|(name, e)| {
            let target = e.trim().strip_prefix("as ")?;
            let target: String = target
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            Some((name.clone(), target))
        })
        .collect();
    for (name, target) in aliases {
        let more = listed.get(&target).cloned().unwrap_or_default();
        listed.get_mut(&name).expect("listed").push_str(&more);
    }
    listed
}

/// Every `EXPECT(hetmem_x(...), HETMEM_ERR_Y)` and `EXPECT2(..., A, B)` in `program`:
/// (function, code without the prefix).
fn expected_codes(program: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (macro_, codes) in [("EXPECT(", 1), ("EXPECT2(", 2)] {
        for (at, _) in program.match_indices(macro_) {
            let rest = &program[at + macro_.len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // The call's closing parenthesis (string literals may hold any character).
            let (mut depth, mut quoted, mut escaped, mut end) = (0usize, false, false, None);
            for (k, c) in rest.char_indices() {
                match (quoted, escaped, c) {
                    (true, true, _) => escaped = false,
                    (true, false, '\\') => escaped = true,
                    (true, false, '"') => quoted = false,
                    (true, ..) => {}
                    (false, _, '"') => quoted = true,
                    (false, _, '(') => depth += 1,
                    // A `)` before any `(`: the macro's own definition, not a call.
                    (false, _, ')') if depth == 0 => break,
                    (false, _, ')') => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(k);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let Some(end) = end else { continue };
            let tail = &rest[end + 1..];
            let words: Vec<&str> = tail
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| !w.is_empty())
                .take(codes)
                .collect();
            for w in words {
                if let Some(code) = w.strip_prefix("HETMEM_ERR_") {
                    out.push((name.clone(), code.to_owned()));
                }
            }
        }
    }
    out
}

/// Issue 15: every code the C program sees a tier-store call return is listed under
/// that call in `include/hetmem.h` (`Errors: ...`).
#[test]
fn the_header_lists_every_code_the_store_calls_return() {
    let header = std::fs::read_to_string(manifest_dir().join("include/hetmem.h")).unwrap();
    let program = std::fs::read_to_string(manifest_dir().join("tests/c/capi_test.c")).unwrap();
    let listed = listed_errors(&header, &["hetmem_store_", "hetmem_guard_"]);
    assert!(
        listed.len() >= 18,
        "store calls found in the header: {listed:?}"
    );
    let mut missing = Vec::new();
    let mut seen = 0;
    for (name, code) in expected_codes(&program) {
        let Some(errors) = listed.get(&name) else {
            continue;
        };
        seen += 1;
        let words: Vec<&str> = errors
            .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .collect();
        if !words.contains(&code.as_str()) {
            missing.push(format!("{name}: {code}"));
        }
    }
    assert!(seen > 40, "only {seen} store checks found in capi_test.c");
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "codes the C program gets that the header does not list:\n{}",
        missing.join("\n")
    );
}
