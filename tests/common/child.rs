//! One test run alone in a child process of its test binary, for a test that changes
//! what the whole process may do (an address-space or thread limit, its credentials,
//! a switch read once per process, the fake driver's machine).

/// Set in the child of [`alone`] to the name of the one test it runs.
const CHILD_ENV: &str = "HETMEM_TEST_CHILD";

/// Test `name` of the module `module` (its `module_path!()`) in a child process of this
/// binary, alone: in the child `None`, and the test's body runs there; in the parent
/// `Some` of what the child wrote, once it has passed (fails unless it passed).
pub fn alone(module: &str, name: &str) -> Option<String> {
    // The test's path in the binary: the module path without the crate's name.
    let test = match module.split_once("::") {
        Some((_, path)) => format!("{path}::{name}"),
        None => name.to_owned(),
    };
    if std::env::var(CHILD_ENV).as_deref() == Ok(test.as_str()) {
        return None;
    }
    Some(run(&test, &[(CHILD_ENV, &test)]))
}

/// Runs test `test` (its path in this binary) alone in a child process of this binary
/// with `env` added to its environment (how the child knows it is one is the caller's
/// choice), fails unless it ran and passed, and returns what it wrote.
pub fn run(test: &str, env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child {test} {env:?} failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "child {test} {env:?} ran no test:\n{text}"
    );
    text
}
