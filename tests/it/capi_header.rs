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

// ---- the codes each call may return ----

/// The header's code lists, read by the library's own parser.
fn code_lists() -> hetmem::ffi::codes::CodeLists {
    let header = std::fs::read_to_string(root().join("include/hetmem.h")).unwrap();
    hetmem::ffi::codes::parse(&header).unwrap_or_else(|e| panic!("include/hetmem.h: {e}"))
}

#[test]
fn every_declaration_lists_its_codes() {
    let header = std::fs::read_to_string(root().join("include/hetmem.h")).unwrap();
    let lists = code_lists();
    let declared: Vec<String> = header_functions(&header).into_keys().collect();
    let listed: Vec<String> = lists.calls.keys().cloned().collect();
    assert_eq!(declared, listed, "declarations and code lists differ");
    // The lists are the library's codes, and no call lists PANIC (every call may).
    let panic = i64::from(hetmem::ffi::HETMEM_ERR_PANIC);
    for (call, codes) in &lists.calls {
        assert!(
            !codes.iter().any(|c| i64::from(*c) == panic),
            "{call} lists PANIC: every call may return it, none lists it"
        );
    }
    let c = header_constants(&header);
    for (name, code) in &lists.codes {
        assert_eq!(c.get(name), Some(&i64::from(*code)), "{name}");
    }
}

/// A function of `src/ffi/*.rs`: its body, outside test modules.
struct FfiFn {
    file: String,
    body: String,
}

/// Every `fn` of `src/ffi/*.rs` (test modules left out) by name; a name defined twice
/// keeps both bodies.
fn ffi_functions() -> BTreeMap<String, Vec<FfiFn>> {
    let mut out: BTreeMap<String, Vec<FfiFn>> = BTreeMap::new();
    for f in std::fs::read_dir(root().join("src/ffi")).unwrap() {
        let f = f.unwrap().path();
        let file = f.file_name().unwrap().to_string_lossy().into_owned();
        if file.ends_with("_tests.rs") {
            continue;
        }
        let mut src = strip_comments(&std::fs::read_to_string(&f).unwrap());
        if let Some(t) = src.find("#[cfg(test)]\nmod tests") {
            src.truncate(t);
        }
        let mut at = 0;
        while let Some(p) = src[at..].find("fn ") {
            let start = at + p + 3;
            at = start;
            if src[..start - 3].chars().next_back().is_some_and(is_ident) {
                continue;
            }
            let name: String = src[start..].chars().take_while(|c| is_ident(*c)).collect();
            let Some(open) = src[start..].find('{').map(|o| start + o) else {
                continue;
            };
            // A declaration without a body (`fn x();` in a trait or extern block).
            if src[start..open].contains(';') {
                continue;
            }
            let mut depth = 0usize;
            let mut end = open;
            for (i, c) in src[open..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = open + i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            out.entry(name).or_default().push(FfiFn {
                file: file.clone(),
                body: src[open..=end].to_owned(),
            });
        }
    }
    out
}

/// `OutOfBounds` → `OUT_OF_BOUNDS`.
fn snake_upper(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The codes a body returns itself: `FfiError::new(HETMEM_ERR_X` / `Self::new(...`, an
/// `Error::Variant` it builds (`Error::oom`, `Error::os` too), and those of the ffi
/// functions it calls by path (`name(`, `FfiError::name(`, `Self::name(`; methods,
/// `x.name(`, are not followed: their names collide with std's).
fn static_codes(
    name: &str,
    fns: &BTreeMap<String, Vec<FfiFn>>,
    seen: &mut std::collections::BTreeSet<String>,
) -> std::collections::BTreeSet<String> {
    let mut codes = std::collections::BTreeSet::new();
    if !seen.insert(name.to_owned()) {
        return codes;
    }
    for f in fns.get(name).into_iter().flatten() {
        let b = &f.body;
        for pat in ["FfiError::new(", "Self::new("] {
            for (i, _) in b.match_indices(pat) {
                let arg = b[i + pat.len()..].trim_start();
                if let Some(rest) = arg.strip_prefix("HETMEM_ERR_") {
                    let code: String = rest.chars().take_while(|c| is_ident(*c)).collect();
                    codes.insert(code);
                }
            }
        }
        for (i, _) in b.match_indices("Error::") {
            if b[..i].ends_with("Ffi") {
                continue;
            }
            let v: String = b[i + 7..].chars().take_while(|c| is_ident(*c)).collect();
            let after = b[i + 7 + v.len()..].trim_start();
            let built = after.starts_with('(') || after.starts_with('{');
            match v.as_str() {
                "oom" => {
                    codes.insert("OUT_OF_MEMORY".into());
                }
                "os" => {
                    codes.insert("OS".into());
                }
                v if built && v.starts_with(|c: char| c.is_ascii_uppercase()) => {
                    codes.insert(snake_upper(v));
                }
                _ => {}
            }
        }
        for (i, _) in b.match_indices('(') {
            let before = &b[..i];
            let callee: String = before
                .chars()
                .rev()
                .take_while(|c| is_ident(*c))
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if callee.is_empty() || callee == name || !fns.contains_key(&callee) {
                continue;
            }
            let prefix = &before[..before.len() - callee.len()];
            let by_path = !prefix.ends_with('.')
                && (!prefix.ends_with("::")
                    || prefix.ends_with("FfiError::")
                    || prefix.ends_with("Self::"));
            if by_path && !prefix.trim_end().ends_with("fn") {
                codes.extend(static_codes(&callee, fns, seen));
            }
        }
    }
    codes
}

/// The codes that the C layer's own code can return for each export (named in the
/// source, not found deep in the library) are in the export's list in the header: a
/// new `FfiError::new(HETMEM_ERR_X` or `Error::X` on a call's path fails here until the
/// header lists it. (The library's tests check the codes that calls return at run time,
/// src/ffi/codes.rs.)
#[test]
fn codes_the_c_layer_returns_are_listed() {
    let lists = code_lists();
    let fns = ffi_functions();
    let exports = rust_exports();
    let mut problems = Vec::new();
    let mut checked = 0;
    for name in exports.keys() {
        let listed = &lists.calls[name];
        let found = static_codes(name, &fns, &mut Default::default());
        checked += found.len();
        for code in found {
            let full = format!("HETMEM_ERR_{code}");
            match lists.codes.get(&full) {
                Some(c) if listed.contains(c) || *c == hetmem::ffi::HETMEM_ERR_PANIC => {}
                Some(_) => problems.push(format!(
                    "  {name} ({}) can return {full}, which the header does not list for it",
                    fns[name][0].file
                )),
                None => problems.push(format!("  {name}: {full} is not a status code")),
            }
        }
    }
    assert!(
        checked > 60,
        "only {checked} codes found: is the scanner broken?"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_code_scanner_sees_what_it_should() {
    let fns = |src: &[(&str, &str)]| -> BTreeMap<String, Vec<FfiFn>> {
        src.iter()
            .map(|(n, b)| {
                (
                    n.to_string(),
                    vec![FfiFn {
                        file: "x.rs".into(),
                        body: b.to_string(),
                    }],
                )
            })
            .collect()
    };
    let f = fns(&[
        ("a", "{ helper(1)?; x.helper(2); FfiError::null(\"p\"); Err(crate::Error::OutOfBounds { offset }) }"),
        ("helper", "{ FfiError::new(HETMEM_ERR_FOREIGN_POINTER, \"\") }"),
        ("null", "{ Self::new(HETMEM_ERR_NULL_POINTER, \"\") }"),
        ("b", "{ match e { Error::Forked { .. } => 1 } ; Error::oom(t, 1, 2) }"),
    ]);
    let got = static_codes("a", &f, &mut Default::default());
    assert_eq!(
        got.into_iter().collect::<Vec<_>>(),
        ["FOREIGN_POINTER", "NULL_POINTER", "OUT_OF_BOUNDS"]
    );
    let got = static_codes("b", &f, &mut Default::default());
    // A pattern `Error::Forked { .. }` is a match arm, but the scanner cannot tell: it
    // over-approximates, which is the safe side.
    assert!(got.contains("OUT_OF_MEMORY"), "{got:?}");
}
