//! Tells the tests and the benchmark where mimalloc's C sources are (libmimalloc-sys
//! reports its include directory): `gcc` compiling one of them is one of the real
//! programs run under the shim.
fn main() {
    if let Ok(inc) = std::env::var("DEP_MIMALLOC_INCLUDE_DIR") {
        println!("cargo:rustc-env=HETMEM_MIMALLOC_INCLUDE={inc}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
