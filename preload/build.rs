//! Tells the tests and the benchmark where mimalloc's C sources are (libmimalloc-sys
//! reports its include directory): `gcc` compiling one of them is one of the real
//! programs run under the shim.
fn main() {
    if let Ok(inc) = std::env::var("DEP_MIMALLOC_INCLUDE_DIR") {
        println!("cargo:rustc-env=HETMEM_MIMALLOC_INCLUDE={inc}");
    }
    // Relative relocations packed (DT_RELR, glibc 2.36): the loader touches a few KiB
    // instead of ~100 KiB of .rela.dyn in every process the shim is loaded into.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") && linker_packs() {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,pack-relative-relocs");
    }
    // Calls from the shim to its own exported functions (mimalloc's mi_free from the
    // free hook, ...) bind inside the library instead of going through the GOT. Calls
    // from other objects (libc's own malloc calls) still reach the hooks.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic-functions");
    }
    println!("cargo:rerun-if-changed=build.rs");
}

/// Whether the system linker knows `-z pack-relative-relocs` (binutils 2.38, lld 15).
fn linker_packs() -> bool {
    std::process::Command::new("cc")
        .args(["-Wl,-z,pack-relative-relocs", "-Wl,--help"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("warning")
        })
}
