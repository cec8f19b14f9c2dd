//! Keeps the crate's layers true, as `tests/it/capi_header.rs` keeps the header true:
//! every `crate::`, `super::` and `self::` path in `src/` (and every path through a child
//! module), outside comments, strings and `#[cfg(test)]` code, is an edge from the module
//! that writes it to the module it names (re-exports followed back to the module that
//! defines the item). Each module belongs to a row of [`LAYERS`]; an edge may go down
//! the table or stay in its layer, and the rows of one layer may not form a cycle.
//! Fails with each upward import or cycle, where it is written.
//!
//! Changing the structure is a table edit: a new module under a row's prefix belongs to
//! it already (`backend::cuda::memory` is `backend`'s); a new top-level module (say
//! `host` for host-memory utilities, below `backend`) fails with "in no layer" until it
//! is given a row; a layer split finer is more rows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, top first: a name, and the rows (module prefixes) in it. A module is the
/// row of the longest prefix that is it or one of its parents (`""` is the crate root).
/// Edges between rows of one layer are allowed as long as they form no cycle (a
/// child's uses of its parent's row left out), so a layer's rows are as fine as the
/// cycles worth catching.
const LAYERS: &[(&str, &[&str])] = &[
    // lib.rs: the re-exports only.
    ("crate root", &[""]),
    // The APIs: Rust (`manager`) and C (`ffi`; Python sits on the C ABI, outside src/).
    (
        "API",
        &[
            "manager",
            "ffi",
            "ffi::codes",
            "ffi::event",
            "ffi::memory",
            "ffi::stats",
            "ffi::tier",
            "ffi::torch",
        ],
    ),
    (
        "pools and tier store",
        &[
            "tier",
            "tier::config",
            "tier::store",
            "tier::plan",
            "tier::sizing",
            "tier::learn",
            "tier::policy",
            "tier::source",
            "pool",
            "pool::copy",
            "pool::device",
            "pool::host",
            "pool::staging",
            "pool::stats",
        ],
    ),
    // Streams and events as the layers above use them, and the machine's NUMA layout.
    ("streams and topology", &["stream", "topology"]),
    // The `Backend` trait, the backends and the owning wrappers over them; rows fine
    // enough that the backends, what the drivers share and the owners cannot import
    // each other in a cycle.
    (
        "backends",
        &[
            "backend",
            "backend::cuda",
            "backend::rocm",
            "backend::sim",
            "backend::host",
            "backend::fork",
            "backend::driver",
            "backend::registered",
            "backend::owned",
            "backend::owned::sync",
            "backend::owned::copy",
            "backend::owned::memory",
            "backend::owned::vmm",
        ],
    ),
    // Host memory: regions, the machine's sizes, fork epochs, the NUMA `GlobalAlloc`.
    (
        "host memory",
        &[
            "host_mem",
            "host_mem::region",
            "host_mem::fork",
            "host_mem::numa_alloc",
            "host_mem::block_cache",
        ],
    ),
    // The words every layer uses, and the event record format (`record`) they write.
    (
        "vocabulary",
        &[
            "error",
            "placement",
            "stats",
            "record",
            "profile",
            "backend_kind",
        ],
    ),
];

/// Edges that break the rules today, each with the work that removes it. The test
/// fails when one is no longer there, so that it leaves this list.
const KNOWN: &[(&str, &str, &str)] = &[];

/// One import: `from` uses `to`, at `file:line`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    from: String,
    to: String,
    file: String,
    line: usize,
}

/// The module a source file is: `src/lib.rs` → `""`, `src/a/mod.rs` and `src/a.rs` →
/// `"a"`, `src/a/b.rs` → `"a::b"`.
fn module_of(rel: &str) -> String {
    let rel = rel.strip_prefix("src/").unwrap_or(rel);
    let rel = rel.strip_suffix(".rs").unwrap_or(rel);
    let rel = rel
        .strip_suffix("/mod")
        .or_else(|| rel.strip_suffix("mod"))
        .unwrap_or(rel);
    if rel == "lib" || rel.is_empty() {
        return String::new();
    }
    rel.trim_end_matches('/').replace('/', "::")
}

fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_owned()
    } else {
        format!("{parent}::{child}")
    }
}

/// The source with comments, string and char literals blanked (newlines kept, so that
/// byte offsets still give lines).
fn blank_comments_and_strings(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            let end = src[i..].find('\n').map_or(b.len(), |e| i + e);
            blank(&mut out, i, end);
            i = end;
        } else if b[i..].starts_with(b"/*") {
            let (mut depth, mut j) = (1, i + 2);
            while j < b.len() && depth > 0 {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if b[i] == b'r'
            && (i == 0 || !is_ident(b[i - 1]))
            && (b[i + 1..].starts_with(b"\"") || b[i + 1..].starts_with(b"#"))
        {
            // A raw string: r"..." or r#"..."#.
            let hashes = b[i + 1..].iter().take_while(|c| **c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                i += 1;
                continue;
            }
            let close = format!("\"{}", "#".repeat(hashes));
            let start = i + 2 + hashes;
            let end = src[start..]
                .find(&close)
                .map_or(b.len(), |e| start + e + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i, j + 1);
            i = j + 1;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}'), or a lifetime ('a), left alone.
            if b.get(i + 1) == Some(&b'\\') {
                let end = src[i + 2..].find('\'').map_or(b.len(), |e| i + 2 + e + 1);
                blank(&mut out, i, end);
                i = end;
            } else if let Some(c) = src[i + 1..].chars().next() {
                let after = i + 1 + c.len_utf8();
                if b.get(after) == Some(&b'\'') {
                    blank(&mut out, i, after + 1);
                    i = after + 1;
                } else {
                    i += 1;
                }
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("only ASCII blanks written")
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Tokens: identifiers (with `$crate` as `crate`), `::`, and single punctuation, each
/// with its byte offset.
fn tokens(src: &str) -> Vec<(usize, String)> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if is_ident(c) {
            let s = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            out.push((s, src[s..i].to_owned()));
        } else if b[i..].starts_with(b"::") {
            out.push((i, "::".to_owned()));
            i += 2;
        } else if c.is_ascii_whitespace() || c == b'$' {
            i += 1;
        } else {
            out.push((i, (c as char).to_string()));
            i += 1;
        }
    }
    out
}

/// The index after the item that starts at token `i`: its `;`, or its `{ ... }`.
fn item_end(t: &[(usize, String)], mut i: usize) -> usize {
    let mut depth = 0i32;
    while i < t.len() {
        match t[i].1.as_str() {
            "(" | "[" => depth += 1,
            ")" | "]" => depth -= 1,
            ";" if depth == 0 => return i + 1,
            "{" if depth == 0 => {
                let mut d = 0;
                while i < t.len() {
                    match t[i].1.as_str() {
                        "{" => d += 1,
                        "}" => {
                            d -= 1;
                            if d == 0 {
                                return i + 1;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
                return i;
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// The tokens with every `#[cfg(test)]` (or `#[cfg(all(test, ..))]`) item removed,
/// and the names of the modules such items declare (`#[cfg(test)] mod x;`).
fn without_test_items(t: Vec<(usize, String)>) -> (Vec<(usize, String)>, Vec<String>) {
    let mut out = Vec::with_capacity(t.len());
    let mut test_mods = Vec::new();
    let mut i = 0;
    while i < t.len() {
        let is = |k: usize, s: &str| t.get(i + k).is_some_and(|x| x.1 == s);
        let test_cfg = is(0, "#")
            && is(1, "[")
            && is(2, "cfg")
            && is(3, "(")
            && (is(4, "test") || (is(4, "all") && is(5, "(") && is(6, "test")));
        if !test_cfg {
            out.push(t[i].clone());
            i += 1;
            continue;
        }
        // Past the attribute, and any others after it.
        let mut j = item_end_attr(&t, i);
        while t.get(j).is_some_and(|x| x.1 == "#") {
            j = item_end_attr(&t, j);
        }
        let end = item_end(&t, j);
        let words: Vec<&str> = t[j..end].iter().map(|x| x.1.as_str()).collect();
        if let Some(k) = words.iter().position(|w| *w == "mod") {
            if words.get(k + 2) == Some(&";") {
                test_mods.push(words[k + 1].to_owned());
            }
        }
        i = end;
    }
    (out, test_mods)
}

/// The index after the attribute `#[...]` at `i`.
fn item_end_attr(t: &[(usize, String)], i: usize) -> usize {
    let mut depth = 0;
    for (k, x) in t.iter().enumerate().skip(i + 1) {
        match x.1.as_str() {
            "[" => depth += 1,
            "]" => {
                depth -= 1;
                if depth == 0 {
                    return k + 1;
                }
            }
            _ => {}
        }
    }
    t.len()
}

/// One `use` tree, flattened: (the name it binds, its path).
fn use_paths(t: &[(usize, String)], prefix: &[String], out: &mut Vec<(String, Vec<String>)>) {
    // `t` is a tree: path segments separated by `::`, maybe ending in `{ trees, }`,
    // `*`, or `as name`.
    let mut path: Vec<String> = prefix.to_vec();
    let mut saw_self = false;
    let mut i = 0;
    while i < t.len() {
        match t[i].1.as_str() {
            "::" => i += 1,
            "{" => {
                // Split the group's trees at its top-level commas.
                let mut depth = 0;
                let mut start = i + 1;
                for k in i..t.len() {
                    match t[k].1.as_str() {
                        "{" => depth += 1,
                        "}" => {
                            depth -= 1;
                            if depth == 0 {
                                use_paths(&t[start..k], &path, out);
                                return;
                            }
                        }
                        "," if depth == 1 => {
                            use_paths(&t[start..k], &path, out);
                            start = k + 1;
                        }
                        _ => {}
                    }
                }
                return;
            }
            "*" => {
                out.push(("*".to_owned(), path));
                return;
            }
            "as" => {
                let name = t.get(i + 1).map_or("_".to_owned(), |x| x.1.clone());
                out.push((name, path));
                return;
            }
            "self" if i > 0 || !prefix.is_empty() => {
                // `a::{self}` binds `a`.
                saw_self = true;
                i += 1;
            }
            seg => {
                path.push(seg.to_owned());
                i += 1;
            }
        }
    }
    if let Some(last) = path.last() {
        if path.len() > prefix.len() || saw_self {
            out.push((last.clone(), path));
        }
    }
}

/// What the parser found in one file.
struct Parsed {
    module: String,
    file: String,
    /// (line, path as written) of every path, `use` trees included.
    paths: Vec<(usize, Vec<String>)>,
    /// The names its `use` items bind, to their paths as written.
    binds: Vec<(String, Vec<String>)>,
    test_mods: Vec<String>,
}

fn parse(file: &str, src: &str) -> Parsed {
    let clean = blank_comments_and_strings(src);
    let line_of = |off: usize| clean[..off].matches('\n').count() + 1;
    let (t, test_mods) = without_test_items(tokens(&clean));
    let mut paths = Vec::new();
    let mut binds = Vec::new();
    let mut i = 0;
    while i < t.len() {
        if t[i].1 == "use" && (i == 0 || !matches!(t[i - 1].1.as_str(), "::" | ".")) {
            // A use tree's braces are no body: it ends at its `;`.
            let end = t[i..]
                .iter()
                .position(|x| x.1 == ";")
                .map_or(t.len(), |k| i + k + 1);
            let mut tree = Vec::new();
            use_paths(&t[i + 1..end.saturating_sub(1)], &[], &mut tree);
            for (name, path) in tree {
                paths.push((line_of(t[i].0), path.clone()));
                binds.push((name, path));
            }
            i = end;
            continue;
        }
        // A path: a segment followed by `::`, not itself after `::`.
        let starts = t[i]
            .1
            .chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_')
            && t.get(i + 1).is_some_and(|x| x.1 == "::")
            && (i == 0 || t[i - 1].1 != "::");
        if starts {
            let mut path = vec![t[i].1.clone()];
            let mut k = i + 1;
            while t.get(k).is_some_and(|x| x.1 == "::")
                && t.get(k + 1).is_some_and(|x| is_ident(x.1.as_bytes()[0]))
            {
                path.push(t[k + 1].1.clone());
                k += 2;
            }
            paths.push((line_of(t[i].0), path));
            i = k;
            continue;
        }
        i += 1;
    }
    Parsed {
        module: module_of(file),
        file: file.to_owned(),
        paths,
        binds,
        test_mods,
    }
}

/// Every edge of the crate whose files are `files` (path under the package, source).
fn edges(files: &[(String, String)]) -> (BTreeSet<String>, Vec<Edge>) {
    let parsed: Vec<Parsed> = files.iter().map(|(f, s)| parse(f, s)).collect();
    let test_modules: BTreeSet<String> = parsed
        .iter()
        .flat_map(|p| p.test_mods.iter().map(|m| join(&p.module, m)))
        .collect();
    let parsed: Vec<Parsed> = parsed
        .into_iter()
        .filter(|p| !test_modules.contains(&p.module))
        .collect();
    let modules: BTreeSet<String> = parsed.iter().map(|p| p.module.clone()).collect();
    // Each module's bindings, as absolute paths.
    let mut binds: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for p in &parsed {
        for (name, path) in &p.binds {
            if let Some(abs) = absolute(&modules, &p.module, path) {
                binds
                    .entry(p.module.clone())
                    .or_default()
                    .insert(name.clone(), abs);
            }
        }
    }
    let mut out = Vec::new();
    for p in &parsed {
        for (line, path) in &p.paths {
            let Some(abs) = absolute(&modules, &p.module, path) else {
                continue;
            };
            let to = resolve(&modules, &binds, &abs, 0);
            if to != p.module {
                out.push(Edge {
                    from: p.module.clone(),
                    to,
                    file: p.file.clone(),
                    line: *line,
                });
            }
        }
    }
    (modules, out)
}

/// `path` as written in module `m`, from the crate root; `None` for a path that does not
/// start in the crate (`std::`, a local name, an extern crate).
fn absolute(modules: &BTreeSet<String>, m: &str, path: &[String]) -> Option<Vec<String>> {
    let mut at: Vec<String> = if m.is_empty() {
        Vec::new()
    } else {
        m.split("::").map(str::to_owned).collect()
    };
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            at.clear();
            rest = &rest[1..];
        }
        Some("self") => rest = &rest[1..],
        Some("super") => {
            while rest.first().is_some_and(|s| s == "super") {
                at.pop();
                rest = &rest[1..];
            }
        }
        Some(first) if modules.contains(&join(m, first)) => {}
        _ => return None,
    }
    at.extend(rest.iter().cloned());
    Some(at)
}

/// The module that defines what `path` (from the root) names: the deepest module on
/// it, after following the bindings (`use`, `pub use`) it goes through.
fn resolve(
    modules: &BTreeSet<String>,
    binds: &BTreeMap<String, BTreeMap<String, Vec<String>>>,
    path: &[String],
    depth: usize,
) -> String {
    let mut m = String::new();
    for (i, seg) in path.iter().enumerate() {
        let child = join(&m, seg);
        if modules.contains(&child) {
            m = child;
            continue;
        }
        if depth < 16 {
            if let Some(target) = binds.get(&m).and_then(|b| b.get(seg)) {
                let mut next = target.clone();
                next.extend(path[i + 1..].iter().cloned());
                return resolve(modules, binds, &next, depth + 1);
            }
        }
        break;
    }
    m
}

/// The row of [`LAYERS`] module `m` belongs to, and its layer's index (0 at the top).
fn row_of<'a>(layers: &[(&str, &[&'a str])], m: &str) -> Option<(&'a str, usize)> {
    let mut best: Option<(&'a str, usize)> = None;
    for (li, (_, rows)) in layers.iter().enumerate() {
        for r in *rows {
            let under = r.is_empty() || m == *r || m.starts_with(&format!("{r}::"));
            if under && best.is_none_or(|(b, _)| r.len() > b.len()) {
                best = Some((r, li));
            }
        }
    }
    best
}

fn show(m: &str) -> &str {
    if m.is_empty() {
        "crate"
    } else {
        m
    }
}

/// What is wrong with `edges` under `layers`, `known` exceptions allowed.
fn check(
    modules: &BTreeSet<String>,
    edges: &[Edge],
    layers: &[(&str, &[&str])],
    known: &[(&str, &str, &str)],
) -> Vec<String> {
    let mut problems = Vec::new();
    for m in modules {
        // Only the root's own row matches everything; a module needs a row of its own.
        if row_of(layers, m).is_none_or(|(r, _)| r.is_empty() && !m.is_empty()) {
            problems.push(format!(
                "module `{m}` is in no layer: give it a row in LAYERS (tests/it/layers.rs)"
            ));
        }
    }
    let mut used_known = BTreeSet::new();
    // Edges between rows, by layer, for the cycle check.
    let mut within: BTreeMap<usize, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    let mut first_at: BTreeMap<(&str, &str), &Edge> = BTreeMap::new();
    for e in edges {
        let (Some((fr, fl)), Some((tr, tl))) = (row_of(layers, &e.from), row_of(layers, &e.to))
        else {
            continue;
        };
        if fr == tr {
            continue;
        }
        if let Some(k) = known.iter().position(|(f, t, _)| *f == fr && *t == tr) {
            used_known.insert(k);
            continue;
        }
        if tl < fl {
            problems.push(format!(
                "{}:{}: `{}` ({}) uses `{}` ({}): an upward import; layers call only \
                 downward (tests/it/layers.rs: LAYERS)",
                e.file,
                e.line,
                show(&e.from),
                layers[fl].0,
                show(&e.to),
                layers[tl].0
            ));
        } else if tl == fl && !(tr.is_empty() || fr.starts_with(&format!("{tr}::"))) {
            // (A child's use of its parent, `super::`, is the module idiom: helpers
            // and registries live in `mod.rs`. Only the parent's uses of its children
            // count, so siblings cannot close a cycle through their parent.)
            within
                .entry(fl)
                .or_default()
                .entry(fr)
                .or_default()
                .insert(tr);
            first_at.entry((fr, tr)).or_insert(e);
        }
    }
    for (li, graph) in &within {
        for cycle in cycles(graph) {
            let at: Vec<String> = cycle
                .windows(2)
                .map(|w| {
                    let e = first_at[&(w[0], w[1])];
                    format!(
                        "`{}` → `{}` at {}:{}",
                        show(w[0]),
                        show(w[1]),
                        e.file,
                        e.line
                    )
                })
                .collect();
            problems.push(format!(
                "a cycle in layer {}: {}",
                layers[*li].0,
                at.join(", ")
            ));
        }
    }
    for (k, (f, t, why)) in known.iter().enumerate() {
        if !used_known.contains(&k) {
            problems.push(format!(
                "the known exception `{f}` → `{t}` ({why}) is gone: remove it from KNOWN"
            ));
        }
    }
    problems
}

/// One cycle through each strongly connected part of `graph` with more than one node,
/// as a closed walk (first node repeated at the end).
fn cycles<'a>(graph: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Vec<Vec<&'a str>> {
    let mut found: Vec<Vec<&'a str>> = Vec::new();
    let mut covered: BTreeSet<&str> = BTreeSet::new();
    for &start in graph.keys() {
        if covered.contains(start) {
            continue;
        }
        // Breadth-first from `start` back to `start`: the shortest cycle through it.
        let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start]);
        let mut closed = None;
        while let Some(n) = queue.pop_front() {
            for &next in graph.get(n).into_iter().flatten() {
                if next == start {
                    closed = Some(n);
                    break;
                }
                if !prev.contains_key(next) {
                    prev.insert(next, n);
                    queue.push_back(next);
                }
            }
            if closed.is_some() {
                break;
            }
        }
        if let Some(mut n) = closed {
            let mut walk = vec![start];
            while n != start {
                walk.push(n);
                n = prev[n];
            }
            walk.reverse();
            walk.insert(0, start);
            walk.pop();
            walk.push(start);
            covered.extend(walk.iter().copied());
            found.push(walk);
        }
    }
    found
}

fn crate_sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("src/ is readable")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p.strip_prefix(root).expect("under root");
                let text = std::fs::read_to_string(&p).expect("source is UTF-8");
                out.push((rel.to_string_lossy().replace('\\', "/"), text));
            }
        }
    }
    // HETMEM_LAYERS_ROOT: check another checkout's src/ (another commit's, say).
    let root = std::env::var_os("HETMEM_LAYERS_ROOT").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf(),
        Into::into,
    );
    let mut out = Vec::new();
    walk(&root.join("src"), &root, &mut out);
    out
}

#[test]
fn the_crate_calls_only_downward() {
    let files = crate_sources();
    let (modules, edges) = edges(&files);
    // The scanner must see the crate: a broken one would find nothing wrong.
    assert!(modules.len() > 30, "only {} modules found", modules.len());
    assert!(edges.len() > 200, "only {} edges found", edges.len());
    for expected in [
        ("manager", "pool::device"),
        ("pool::device", "stream"),
        ("tier::store", "pool::staging"),
        ("ffi::tier", "ffi::memory"),
    ] {
        assert!(
            edges.iter().any(|e| {
                let row = |m: &str| row_of(LAYERS, m).map(|r| r.0);
                (row(&e.from), row(&e.to)) == (Some(expected.0), Some(expected.1))
            }),
            "the edge {expected:?} was not found: is the scanner broken?"
        );
    }
    if std::env::var_os("HETMEM_LAYERS_DUMP").is_some() {
        for e in &edges {
            println!(
                "{} -> {}  {}:{}",
                show(&e.from),
                show(&e.to),
                e.file,
                e.line
            );
        }
    }
    let problems = check(&modules, &edges, LAYERS, KNOWN);
    assert!(
        problems.is_empty(),
        "the layers are not kept:\n{}",
        problems.join("\n")
    );
}

// The checker itself, on synthetic crates.

const TOY: &[(&str, &[&str])] = &[
    ("root", &[""]),
    ("API", &["manager"]),
    ("pools", &["pool", "pool::a", "pool::b"]),
    ("vocabulary", &["error"]),
];

fn toy(files: &[(&str, &str)]) -> Vec<String> {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(f, s)| (f.to_string(), s.to_string()))
        .collect();
    let (modules, edges) = edges(&files);
    check(&modules, &edges, TOY, &[])
}

const TOY_LIB: (&str, &str) = (
    "src/lib.rs",
    "pub mod error; pub mod manager; pub mod pool;\npub use manager::Manager;\n",
);

#[test]
fn an_upward_import_fails_where_it_is_written() {
    let problems = toy(&[
        TOY_LIB,
        (
            "src/manager.rs",
            "use crate::pool::Pool;\npub struct Manager;",
        ),
        ("src/error.rs", ""),
        (
            "src/pool/mod.rs",
            "pub mod a;\npub mod b;\npub struct Pool;",
        ),
        ("src/pool/a.rs", "use crate::error::Error;"),
        (
            "src/pool/b.rs",
            "fn f() {\n    let m: crate::Manager = todo!();\n}",
        ),
    ]);
    assert_eq!(
        problems,
        vec![
            "src/pool/b.rs:2: `pool::b` (pools) uses `manager` (API): an upward import; \
             layers call only downward (tests/it/layers.rs: LAYERS)"
        ]
    );
}

#[test]
fn comments_strings_and_test_code_are_no_imports() {
    let problems = toy(&[
        TOY_LIB,
        ("src/manager.rs", "pub struct Manager;"),
        ("src/error.rs", ""),
        (
            "src/pool/mod.rs",
            "pub mod a;\npub mod b;\n#[cfg(test)]\nmod tests_file;\n\
             /// See [`Manager`](crate::manager::Manager).\n\
             // use crate::manager::Manager;\n\
             const S: &str = \"crate::manager::Manager\";\n\
             const C: char = '\"';\n\
             #[cfg(test)]\nmod tests {\n    use crate::manager::Manager;\n}\n",
        ),
        ("src/pool/tests_file.rs", "use crate::manager::Manager;"),
        ("src/pool/a.rs", ""),
        ("src/pool/b.rs", ""),
    ]);
    assert_eq!(problems, Vec::<String>::new());
}

#[test]
fn a_cycle_within_a_layer_fails() {
    let problems = toy(&[
        TOY_LIB,
        ("src/manager.rs", "pub struct Manager;"),
        ("src/error.rs", ""),
        // The parent uses a child and the child its parent (`super::`): no cycle.
        (
            "src/pool/mod.rs",
            "pub mod a;\npub mod b;\npub struct Hub;\nfn f(_: a::A) {}",
        ),
        (
            "src/pool/a.rs",
            "use super::b::B;\nuse super::Hub;\npub struct A;",
        ),
        ("src/pool/b.rs", "pub struct B;\nfn f(_: super::a::A) {}"),
    ]);
    assert_eq!(
        problems,
        vec![
            "a cycle in layer pools: `pool::a` → `pool::b` at src/pool/a.rs:1, \
             `pool::b` → `pool::a` at src/pool/b.rs:2"
        ]
    );
}

#[test]
fn a_module_in_no_layer_fails() {
    let problems = toy(&[
        TOY_LIB,
        ("src/manager.rs", "pub struct Manager;"),
        ("src/error.rs", ""),
        ("src/pool/mod.rs", ""),
        ("src/host.rs", ""),
    ]);
    assert_eq!(
        problems,
        vec!["module `host` is in no layer: give it a row in LAYERS (tests/it/layers.rs)"]
    );
}

#[test]
fn re_exports_and_groups_are_followed_to_their_modules() {
    let files: Vec<(String, String)> = [
        TOY_LIB,
        ("src/manager.rs", "pub struct Manager;"),
        ("src/error.rs", "pub struct Error;"),
        (
            "src/pool/mod.rs",
            "pub mod a;\npub mod b;\npub use a::A;\nuse crate::{error::{self, Error}, Manager as M};",
        ),
        ("src/pool/a.rs", "pub struct A;"),
        ("src/pool/b.rs", "fn f(_: crate::pool::A, _: super::Error) {}"),
    ]
    .iter()
    .map(|(f, s)| (f.to_string(), s.to_string()))
    .collect();
    let (_, edges) = edges(&files);
    let pairs: BTreeSet<(&str, &str)> = edges
        .iter()
        .map(|e| (e.from.as_str(), e.to.as_str()))
        .collect();
    for want in [
        ("", "manager"),
        ("pool", "pool::a"),
        ("pool", "error"),
        ("pool", "manager"),
        ("pool::b", "pool::a"),
        ("pool::b", "error"),
    ] {
        assert!(pairs.contains(&want), "{want:?} not in {pairs:?}");
    }
}
