//! Keeps `include/hetmem.h` in step with the library: every `#[no_mangle]` export in
//! `src/ffi/*.rs` is declared in the header with the same number of arguments and
//! nothing else is; every `HETMEM_*` constant has the same value on both sides; the
//! header's version is the crate's. Fails with the differences listed.

use std::collections::BTreeMap;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Removes `/* */` and `//` comments.
fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"/*") {
            match src[i + 2..].find("*/") {
                Some(end) => i += 2 + end + 2,
                None => break,
            }
            out.push(' ');
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The text between the `(` at `open` and its matching `)`.
fn parenthesised(s: &str, open: usize) -> Option<&str> {
    let mut depth = 0usize;
    for (i, c) in s[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&s[open + 1..open + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// How many arguments a parameter list has (`void` and empty lists have none;
/// a trailing comma does not count).
fn count_args(params: &str) -> usize {
    let mut depth = 0i32;
    let mut parts = vec![String::new()];
    for c in params.chars() {
        match c {
            '(' | '<' | '[' => depth += 1,
            ')' | '>' | ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(String::new());
                continue;
            }
            _ => {}
        }
        parts.last_mut().unwrap().push(c);
    }
    parts
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty() && *p != "void")
        .count()
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Function declarations of the header: name → argument count.
fn header_functions(header: &str) -> BTreeMap<String, usize> {
    let code: String = strip_comments(header)
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeMap::new();
    for stmt in code.split(';') {
        let stmt = stmt.trim();
        if stmt.starts_with("typedef") || stmt.contains('{') || stmt.contains('}') {
            // typedefs, struct bodies and `extern "C" {` guards: the declarations after
            // a guard's brace are in the next piece anyway.
            let Some(pos) = stmt.rfind(['{', '}']) else {
                continue;
            };
            let rest = stmt[pos + 1..].trim();
            if rest.is_empty() || rest.starts_with("typedef") {
                continue;
            }
            collect_decl(rest, &mut out);
            continue;
        }
        collect_decl(stmt, &mut out);
    }
    out
}

fn collect_decl(stmt: &str, out: &mut BTreeMap<String, usize>) {
    let Some(open) = stmt.find('(') else {
        return;
    };
    let before = stmt[..open].trim_end();
    let start = before
        .char_indices()
        .rev()
        .take_while(|(_, c)| is_ident(*c))
        .last()
        .map_or(before.len(), |(i, _)| i);
    let name = &before[start..];
    if !name.starts_with("hetmem_") {
        return;
    }
    let params = parenthesised(stmt, open).unwrap_or_default();
    if out.insert(name.to_owned(), count_args(params)).is_some() {
        panic!("the header declares {name} twice");
    }
}

/// The `#[no_mangle]` exports of `src/ffi/*.rs`: name → argument count.
fn rust_exports() -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let dir = root().join("src/ffi");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no sources in {}", dir.display());
    for f in files {
        let src = strip_comments(&std::fs::read_to_string(&f).unwrap());
        let mut at = 0;
        while let Some(p) = src[at..].find("#[no_mangle]") {
            let attr = at + p;
            let fn_pos = attr
                + src[attr..]
                    .find("fn ")
                    .unwrap_or_else(|| panic!("{}: #[no_mangle] without a fn", f.display()));
            let head = &src[attr..fn_pos];
            // "C-unwind" only for an entry point that throws to C++ on purpose.
            assert!(
                head.contains("extern \"C\"") || head.contains("extern \"C-unwind\""),
                "{}: #[no_mangle] item at byte {attr} is not `extern \"C\"`",
                f.display()
            );
            let name: String = src[fn_pos + 3..]
                .chars()
                .take_while(|c| is_ident(*c))
                .collect();
            let open = fn_pos + 3 + src[fn_pos + 3..].find('(').unwrap();
            let params = parenthesised(&src, open).unwrap_or_default();
            if out.insert(name.clone(), count_args(params)).is_some() {
                panic!("{name} is exported twice");
            }
            at = open;
        }
    }
    out
}

/// `#define HETMEM_X <integer>` of the header.
fn header_constants(header: &str) -> BTreeMap<String, i64> {
    strip_comments(header)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "#define").then_some(())?;
            let name = w.next()?;
            let value: i64 = w.next()?.parse().ok()?;
            name.starts_with("HETMEM_")
                .then(|| (name.to_owned(), value))
        })
        .collect()
}

/// `pub const HETMEM_X: c_int = <integer>;` of `src/ffi/*.rs`.
fn rust_constants() -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for f in std::fs::read_dir(root().join("src/ffi")).unwrap() {
        let f = f.unwrap().path();
        let src = strip_comments(&std::fs::read_to_string(&f).unwrap());
        for l in src.lines() {
            let Some(rest) = l.trim().strip_prefix("pub const HETMEM_") else {
                continue;
            };
            let (name, rest) = rest.split_once(':').unwrap();
            let value = rest.split_once('=').unwrap().1.trim().trim_end_matches(';');
            out.insert(
                format!("HETMEM_{}", name.trim()),
                value.trim().parse().unwrap(),
            );
        }
    }
    out
}

fn diff<V: PartialEq + std::fmt::Debug>(
    what: &str,
    header: &BTreeMap<String, V>,
    rust: &BTreeMap<String, V>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in rust {
        match header.get(k) {
            None => out.push(format!(
                "  {what} {k} is exported by the library but not in the header"
            )),
            Some(h) if h != v => out.push(format!(
                "  {what} {k}: header says {h:?}, library says {v:?}"
            )),
            _ => {}
        }
    }
    for k in header.keys() {
        if !rust.contains_key(k) {
            out.push(format!(
                "  {what} {k} is in the header but the library has no such export"
            ));
        }
    }
    out
}

#[test]
fn header_declares_exactly_the_exports() {
    let path = root().join("include/hetmem.h");
    let header = std::fs::read_to_string(&path).unwrap();
    let h = header_functions(&header);
    let r = rust_exports();
    assert!(
        r.len() > 30,
        "found only {} exports: is the scanner broken? {r:?}",
        r.len()
    );
    let problems = diff("function (argument count)", &h, &r);
    assert!(
        problems.is_empty(),
        "{} and src/ffi/*.rs disagree:\n{}",
        path.display(),
        problems.join("\n")
    );
}

#[test]
fn header_constants_match_the_library() {
    let header = std::fs::read_to_string(root().join("include/hetmem.h")).unwrap();
    let mut h = header_constants(&header);
    for v in [
        "HETMEM_VERSION_MAJOR",
        "HETMEM_VERSION_MINOR",
        "HETMEM_VERSION_PATCH",
    ] {
        h.remove(v);
    }
    let r = rust_constants();
    assert!(r.contains_key("HETMEM_ERR_NULL_POINTER"), "{r:?}");
    let problems = diff("constant", &h, &r);
    assert!(
        problems.is_empty(),
        "include/hetmem.h and src/ffi/*.rs disagree:\n{}",
        problems.join("\n")
    );
    // The status codes in the header are the library's (compiled values, not text).
    use hetmem::ffi::*;
    for (name, code) in [
        ("HETMEM_OK", HETMEM_OK),
        ("HETMEM_ERR_NULL_POINTER", HETMEM_ERR_NULL_POINTER),
        ("HETMEM_ERR_FOREIGN_POINTER", HETMEM_ERR_FOREIGN_POINTER),
        ("HETMEM_ERR_PANIC", HETMEM_ERR_PANIC),
    ] {
        assert_eq!(h.get(name), Some(&i64::from(code)), "{name}");
    }
}

#[test]
fn header_version_is_the_crate_version() {
    let header = std::fs::read_to_string(root().join("include/hetmem.h")).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        header.contains(&format!("#define HETMEM_VERSION \"{version}\"")),
        "include/hetmem.h must define HETMEM_VERSION \"{version}\""
    );
    let c = header_constants(&header);
    let parts: Vec<i64> = version.split('.').map(|p| p.parse().unwrap()).collect();
    assert_eq!(
        [
            c["HETMEM_VERSION_MAJOR"],
            c["HETMEM_VERSION_MINOR"],
            c["HETMEM_VERSION_PATCH"]
        ],
        [parts[0], parts[1], parts[2]]
    );
}

#[test]
fn the_parsers_see_what_they_should() {
    let h = header_functions(
        "/* c */ #define X 1\ntypedef struct a a_t;\nint hetmem_a(void);\n\
         extern \"C\" {\nvoid* hetmem_b(int x, /* y */ void (*cb)(int, int), char* z);\n}",
    );
    assert_eq!(h.get("hetmem_a"), Some(&0));
    assert_eq!(h.get("hetmem_b"), Some(&3));
    assert_eq!(h.len(), 2, "{h:?}");
    assert_eq!(count_args("a: *mut T, b: Option<fn(u8, u8)>,\n"), 2);
}
