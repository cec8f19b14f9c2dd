//! The edge cases of `tests/c/edge.c` and `edge.cpp`, each run without the shim and
//! under it in every mode (glibc small path, mimalloc, recording every allocation with
//! stacks, a 64 KiB threshold with a bind policy and no cache).

mod common;

use common::{build, command, run_ok, scratch, MODES};

fn case(name: &str) {
    let exe = build("edge.c", &[]);
    let lib = build("edge_dl.c", &["-shared", "-fPIC"]);
    for (m, (mode, _)) in MODES.iter().enumerate() {
        let mut c = command(&exe, m);
        c.arg(name);
        if name == "dlopen" {
            c.arg(&lib);
        }
        c.current_dir(scratch());
        let out = run_ok(&format!("edge {name} ({mode})"), c);
        assert!(
            out.contains(&format!("ok {name}")),
            "{name} ({mode}): {out}"
        );
    }
}

#[test]
fn cross_thread_free() {
    case("cross_thread");
}

#[test]
fn fork_then_allocate_in_parent_and_child() {
    case("fork");
}

#[test]
fn exit_from_a_thread_with_at_exit_frees() {
    case("thread_exit");
}

#[test]
fn dlopen_of_a_library_that_allocates() {
    case("dlopen");
}

#[test]
fn alignment_functions_up_to_1_gib() {
    case("align");
}

#[test]
fn malloc_usable_size_covers_the_request() {
    case("usable");
}

#[test]
fn realloc_across_the_threshold_keeps_the_bytes() {
    case("realloc");
}

#[test]
fn calloc_overflow_and_zeroing() {
    case("calloc");
}

#[test]
fn enomem_with_null() {
    case("enomem");
}

#[test]
fn cxx_thread_local_destructors_bad_alloc_aligned_new() {
    let exe = build("edge.cpp", &[]);
    for (m, (mode, _)) in MODES.iter().enumerate() {
        let out = run_ok(&format!("edge.cpp ({mode})"), command(&exe, m));
        assert!(out.contains("ok cxx"), "{mode}: {out}");
    }
}

/// Behind another interposer that resolves the malloc family with `dlsym(RTLD_NEXT)`
/// (whose own `calloc` calls come back during start-up): every case still passes.
#[test]
fn behind_another_interposer() {
    let exe = build("edge.c", &[]);
    let lib = build("edge_dl.c", &["-shared", "-fPIC"]);
    let wrap = build("wrap.c", &["-shared", "-fPIC"]);
    for name in [
        "cross_thread",
        "fork",
        "realloc",
        "calloc",
        "align",
        "dlopen",
        "thread_exit",
    ] {
        for m in [1, 2] {
            let mut c = command(&exe, m);
            c.env(
                "LD_PRELOAD",
                format!("{}:{}", wrap.display(), common::shim().display()),
            );
            c.arg(name);
            if name == "dlopen" {
                c.arg(&lib);
            }
            c.current_dir(scratch());
            let out = run_ok(&format!("edge {name} behind wrap.so ({})", MODES[m].0), c);
            assert!(out.contains(&format!("ok {name}")), "{out}");
        }
    }
}
