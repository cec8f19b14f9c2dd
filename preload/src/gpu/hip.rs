//! HIP (placeholder until the HIP wrappers land).

use super::real::Real;

static NONE: Real = Real::new(c"hipNothing", b"libamdhip64.so");

super::wrapped! {}

#[allow(dead_code)]
fn unused() -> &'static Real {
    &NONE
}
