//! The status codes each C call may return, as `include/hetmem.h` lists them, and a
//! check that no call returns another.
//!
//! The header ends the comment above each declaration with its list:
//!
//! ```text
//! /* ...
//!  * Errors: NULL_POINTER (out), INVALID_HANDLE, OUT_OF_BOUNDS (a range past the end),
//!  * as hetmem_copy. */
//! ```
//!
//! Items are separated by commas: a code's name without `HETMEM_ERR_` (its cause may
//! follow in parentheses), `as hetmem_x` for every code of another call's list, or
//! `none` alone. Nothing follows the list in the comment. `HETMEM_ERR_PANIC` is never
//! listed: any call may return it (a bug caught at the boundary). For a call without a
//! status (a string getter, `hetmem_torch_malloc`, `hetmem_torch_free`) the list is that
//! of the failures whose message `hetmem_last_error` then holds.
//!
//! [`parse`] reads the lists (`tests/it/capi_header.rs` checks that every declaration has
//! one). With `HETMEM_CHECK_CODES=1` in the environment (the C program's runs, and the
//! library's unit tests always), a call that fails with a code its list lacks prints
//! the call, the code and the message to stderr and aborts the process, so that a test
//! which reaches such a path fails however it checks the result.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::c_int;
use std::sync::OnceLock;

use super::HETMEM_ERR_PANIC;

/// The header the library was built with.
const HEADER: &str = include_str!("../../include/hetmem.h");

/// What [`parse`] reads from a header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodeLists {
    /// Every `HETMEM_ERR_*` code the header defines, by name (`"HETMEM_ERR_DRIVER"`).
    pub codes: BTreeMap<String, c_int>,
    /// Each declared function's list, `as` references resolved.
    pub calls: BTreeMap<String, BTreeSet<c_int>>,
}

impl CodeLists {
    /// The name of `code` (`"HETMEM_ERR_DRIVER"`), if the header defines it.
    pub fn name(&self, code: c_int) -> Option<&str> {
        self.codes
            .iter()
            .find(|(_, c)| **c == code)
            .map(|(n, _)| n.as_str())
    }
}

/// Reads the `HETMEM_ERR_*` codes and every function's code list from header text.
/// Fails, saying where, for a declaration without a list, a list that does not follow
/// the format (see the module docs), or an unknown code or function in one.
pub fn parse(header: &str) -> Result<CodeLists, String> {
    let mut codes = BTreeMap::new();
    for line in header.lines() {
        let mut w = line.split_whitespace();
        if w.next() != Some("#define") {
            continue;
        }
        let (Some(name), Some(value)) = (w.next(), w.next()) else {
            continue;
        };
        if name.starts_with("HETMEM_ERR_") {
            let v = value
                .parse::<c_int>()
                .map_err(|_| format!("{name}: {value:?} is not a number"))?;
            codes.insert(name.to_owned(), v);
        }
    }
    // Each declaration with the list of the last comment before it.
    enum Item {
        Code(c_int),
        As(String),
    }
    let mut raw: BTreeMap<String, Vec<Item>> = BTreeMap::new();
    let mut statement = String::new();
    let mut comment: Option<&str> = None;
    let mut at_line_start = true;
    let mut rest = header;
    while let Some(c) = rest.chars().next() {
        if let Some(body) = rest.strip_prefix("/*") {
            let end = body
                .find("*/")
                .ok_or_else(|| "a comment is not closed".to_owned())?;
            comment = Some(&body[..end]);
            rest = &body[end + 2..];
            at_line_start = false;
            continue;
        }
        if at_line_start && c == '#' {
            // A preprocessor line.
            rest = rest.find('\n').map_or("", |n| &rest[n..]);
            continue;
        }
        rest = &rest[c.len_utf8()..];
        match c {
            '\n' => {
                at_line_start = true;
                statement.push(c);
                continue;
            }
            ';' => {
                if let Some(name) = declared_function(&statement) {
                    let text = comment
                        .and_then(|c| c.rfind("Errors:").map(|at| &c[at + "Errors:".len()..]))
                        .ok_or_else(|| {
                            format!("{name}: the comment above it has no `Errors:` list")
                        })?;
                    let items = parse_list(text, &codes).map_err(|e| format!("{name}: {e}"))?;
                    if raw.insert(name.clone(), items).is_some() {
                        return Err(format!("{name} is declared twice"));
                    }
                }
                statement.clear();
                comment = None;
            }
            // Struct bodies and `extern "C"` guards: what follows is a new statement.
            '{' | '}' => statement.clear(),
            _ => statement.push(c),
        }
        if !c.is_whitespace() {
            at_line_start = false;
        }
    }

    fn parse_list(text: &str, codes: &BTreeMap<String, c_int>) -> Result<Vec<Item>, String> {
        // The comment's lines without their leading `*`, and without the causes.
        let joined: String = text
            .lines()
            .map(|l| {
                let l = l.trim_start();
                l.strip_prefix('*').unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join(" ");
        let mut bare = String::new();
        let mut depth = 0usize;
        for c in joined.chars() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth = depth
                        .checked_sub(1)
                        .ok_or_else(|| "unbalanced `)` in the list".to_owned())?
                }
                c if depth == 0 => bare.push(c),
                _ => {}
            }
        }
        let bare = bare.trim();
        let bare = bare.strip_suffix('.').ok_or_else(|| {
            format!("the list must end with `.` and the comment with it: {bare:?}")
        })?;
        if bare.contains('.') {
            return Err(format!("text follows the list: {bare:?}"));
        }
        if bare.trim() == "none" {
            return Ok(Vec::new());
        }
        bare.split(',')
            .map(|item| {
                let item = item.trim();
                if let Some(f) = item.strip_prefix("as ") {
                    let f = f.trim();
                    return if f.starts_with("hetmem_") && f.chars().all(is_ident) {
                        Ok(Item::As(f.to_owned()))
                    } else {
                        Err(format!("`as` names no function: {item:?}"))
                    };
                }
                let name = format!(
                    "HETMEM_ERR_{}",
                    item.strip_prefix("HETMEM_ERR_").unwrap_or(item)
                );
                codes
                    .get(&name)
                    .map(|c| Item::Code(*c))
                    .ok_or_else(|| format!("{item:?} is not a status code the header defines"))
            })
            .collect()
    }

    // Resolve `as` references (a chain ends within as many steps as there are lists).
    let mut calls: BTreeMap<String, BTreeSet<c_int>> = BTreeMap::new();
    for (name, items) in &raw {
        let mut set = BTreeSet::new();
        let mut todo: Vec<(&str, &Vec<Item>)> = vec![(name, items)];
        let mut seen = BTreeSet::new();
        while let Some((n, items)) = todo.pop() {
            if !seen.insert(n) {
                continue;
            }
            for item in items {
                match item {
                    Item::Code(c) => {
                        set.insert(*c);
                    }
                    Item::As(other) => {
                        let (k, v) = raw.get_key_value(other).ok_or_else(|| {
                            format!("{n}: `as {other}`, which the header does not declare")
                        })?;
                        todo.push((k, v));
                    }
                }
            }
        }
        calls.insert(name.clone(), set);
    }
    Ok(CodeLists { codes, calls })
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The name of the `hetmem_*` function a statement declares (not a typedef's).
fn declared_function(statement: &str) -> Option<String> {
    let s = statement.trim();
    if s.starts_with("typedef") {
        return None;
    }
    let open = s.find('(')?;
    let before = s[..open].trim_end();
    let start = before
        .char_indices()
        .rev()
        .take_while(|(_, c)| is_ident(*c))
        .last()
        .map_or(before.len(), |(i, _)| i);
    let name = &before[start..];
    name.starts_with("hetmem_").then(|| name.to_owned())
}

/// The lists of the header the library was built with (an error where it does not
/// parse: `tests/it/capi_header.rs` then fails).
pub fn built_in() -> &'static Result<CodeLists, String> {
    static LISTS: OnceLock<Result<CodeLists, String>> = OnceLock::new();
    LISTS.get_or_init(|| parse(HEADER))
}

/// Whether failed calls are checked against their lists: in the library's unit tests,
/// and where `HETMEM_CHECK_CODES` is set (not to `0`).
fn checking() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        cfg!(test)
            || std::env::var_os("HETMEM_CHECK_CODES").is_some_and(|v| !v.is_empty() && v != "0")
    })
}

/// When checking: aborts the process, saying so on stderr, if `call` failed with a
/// `code` the header does not list for it. Names the header does not declare (the
/// library's own tests) are not checked.
pub(crate) fn check(call: &str, code: c_int, message: &str) {
    if code == HETMEM_ERR_PANIC || !checking() {
        return;
    }
    let Ok(lists) = built_in() else {
        return;
    };
    if let Some(what) = unlisted(lists, call, code) {
        eprintln!("hetmem: {what} (HETMEM_CHECK_CODES is set): {message}");
        std::process::abort();
    }
}

/// What is wrong when `call` fails with `code`: `None` where its list has the code (or
/// the header declares no such call).
fn unlisted(lists: &CodeLists, call: &str, code: c_int) -> Option<String> {
    let listed = lists.calls.get(call)?;
    (!listed.contains(&code)).then(|| {
        let name = lists.name(code).unwrap_or("an unknown code");
        format!("{call} returned {name} ({code}), which include/hetmem.h does not list for it")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_read_and_resolved() {
        let h = "#define HETMEM_ERR_A -1\n#define HETMEM_ERR_B -2\n#define HETMEM_OK 0\n\
                 typedef struct s { int x; /* Errors: nonsense */ } s_t;\n\
                 /* ---- section ---- */\n\
                 /* Does a.\n * Errors: A (why, with (nested) text, SIZE_MAX.), B. */\n\
                 int hetmem_a(int x);\n\
                 #ifdef __cplusplus\nextern \"C\" {\n#endif\n\
                 /* Errors: as hetmem_a. */\nvoid* hetmem_b(void);\n\
                 /* Errors: none. */ const char* hetmem_c(void);\n\
                 typedef int (*hetmem_cb)(void* ctx);\n";
        let l = parse(h).unwrap();
        assert_eq!(l.codes.len(), 2);
        assert_eq!(l.calls["hetmem_a"], BTreeSet::from([-1, -2]));
        assert_eq!(l.calls["hetmem_b"], BTreeSet::from([-1, -2]));
        assert!(l.calls["hetmem_c"].is_empty());
        assert_eq!(l.calls.len(), 3);
        assert_eq!(l.name(-2), Some("HETMEM_ERR_B"));
    }

    #[test]
    fn malformed_lists_are_refused() {
        let d = "#define HETMEM_ERR_A -1\n";
        for (body, why) in [
            ("/* Does a. */ int hetmem_a(void);", "no `Errors:`"),
            ("/* Errors: A */ int hetmem_a(void);", "no full stop"),
            (
                "/* Errors: A. More text. */ int hetmem_a(void);",
                "text after",
            ),
            ("/* Errors: C. */ int hetmem_a(void);", "unknown code"),
            (
                "/* Errors: as hetmem_z. */ int hetmem_a(void);",
                "unknown function",
            ),
            ("/* Errors: A (x. */ int hetmem_a(void);", "unbalanced"),
            ("int hetmem_a(void);", "no comment"),
        ] {
            assert!(parse(&format!("{d}{body}")).is_err(), "{why}: {body}");
        }
    }

    #[test]
    fn a_code_missing_from_a_list_is_caught() {
        let l = parse("#define HETMEM_ERR_A -1\n#define HETMEM_ERR_B -2\n/* Errors: A. */ int hetmem_a(void);")
            .unwrap();
        assert_eq!(unlisted(&l, "hetmem_a", -1), None);
        let why = unlisted(&l, "hetmem_a", -2).expect("B is not listed");
        assert!(why.contains("hetmem_a returned HETMEM_ERR_B (-2)"), "{why}");
        assert!(unlisted(&l, "hetmem_a", -7)
            .unwrap()
            .contains("an unknown code"));
        assert_eq!(unlisted(&l, "test_call", -2), None, "not a C entry point");
    }

    #[test]
    fn the_built_in_header_parses() {
        let l = built_in().as_ref().unwrap();
        assert!(l.calls.len() > 40, "{}", l.calls.len());
        assert!(l.calls["hetmem_copy"].contains(&super::super::HETMEM_ERR_FOREIGN_POINTER));
    }
}
