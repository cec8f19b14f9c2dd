//! What `include/hetmem.h` documents: the value of every status code, and for every
//! function the codes its comment names.
//!
//! A function's comment is the last comment before its declaration (functions
//! declared one after the other under one comment share it). The list is what follows
//! the comment's last "Errors:" (the whole comment where it has none): every status
//! name in it counts (`NULL_POINTER` or `HETMEM_ERR_NULL_POINTER`), and "as hetmem_x"
//! adds `hetmem_x`'s. Nothing else is allowed: the header's conventions say each list
//! is complete (`PANIC`, a bug, is never listed and always a finding).
//!
//! This parser is independent of the library's own (`hetmem::ffi::codes`, which
//! `HETMEM_CHECK_CODES=1` uses to abort on an unlisted code); a test checks that both
//! read the same lists.

use std::collections::{BTreeMap, BTreeSet};

/// The header this crate was built against.
pub const HEADER: &str = include_str!("../../include/hetmem.h");

/// What the header documents.
#[derive(Debug, Clone, Default)]
pub struct Docs {
    /// `HETMEM_OK` and `HETMEM_ERR_*` without their prefix (`OK`, `NULL_POINTER`, ...)
    /// to value.
    pub codes: BTreeMap<String, i32>,
    /// Function name to the codes its comment names.
    pub calls: BTreeMap<String, BTreeSet<i32>>,
}

impl Docs {
    /// Parses [`HEADER`].
    pub fn load() -> Docs {
        parse(HEADER)
    }

    /// The name of a code (`"NULL_POINTER"`), or its number.
    pub fn name(&self, code: i32) -> String {
        self.codes
            .iter()
            .find(|(_, v)| **v == code)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| code.to_string())
    }

    /// Whether `call`'s comment (or the conventions) documents `code`. A call the
    /// header does not declare documents nothing.
    pub fn documents(&self, call: &str, code: i32) -> bool {
        code == 0 || self.calls.get(call).is_some_and(|c| c.contains(&code))
    }
}

/// Comments are replaced by `\u{1}<index>\u{2}` markers; returns the text and the
/// comments.
fn mark_comments(src: &str) -> (String, Vec<String>) {
    let mut out = String::with_capacity(src.len());
    let mut comments = Vec::new();
    let mut rest = src;
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        let body = &rest[start + 2..];
        let end = body.find("*/").unwrap_or(body.len());
        out.push_str(&format!("\u{1}{}\u{2}", comments.len()));
        comments.push(body[..end].to_owned());
        rest = body.get(end + 2..).unwrap_or("");
    }
    out.push_str(rest);
    (out, comments)
}

/// The name of the function a statement declares, and where in it.
fn declared(stmt: &str) -> Option<(usize, &str)> {
    let mut from = 0;
    while let Some(i) = stmt[from..].find("hetmem_") {
        let at = from + i;
        let tail = &stmt[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let before_ok = at == 0 || {
            let b = stmt.as_bytes()[at - 1] as char;
            !(b.is_ascii_alphanumeric() || b == '_' || b == '(' || b == '*')
        };
        if before_ok && tail[len..].trim_start().starts_with('(') {
            return Some((at, &tail[..len]));
        }
        from = at + len;
    }
    None
}

/// Status names mentioned in `text` (with or without `HETMEM_ERR_`).
fn mentioned(text: &str, codes: &BTreeMap<String, i32>) -> BTreeSet<i32> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter_map(|w| codes.get(w.strip_prefix("HETMEM_ERR_").unwrap_or(w)))
        .copied()
        .filter(|c| *c != 0)
        .collect()
}

/// Parses a header's text.
pub fn parse(header: &str) -> Docs {
    let mut codes = BTreeMap::new();
    for line in header.lines() {
        let mut w = line.split_whitespace();
        if w.next() != Some("#define") {
            continue;
        }
        let (Some(name), Some(value)) = (w.next(), w.next()) else {
            continue;
        };
        let short = if name == "HETMEM_OK" {
            "OK"
        } else if let Some(s) = name.strip_prefix("HETMEM_ERR_") {
            s
        } else {
            continue;
        };
        if let Ok(v) = value.parse::<i32>() {
            codes.insert(short.to_owned(), v);
        }
    }
    let code_lines: String = header
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let (text, comments) = mark_comments(&code_lines);
    let mut docs: BTreeMap<String, String> = BTreeMap::new();
    let mut previous = String::new();
    for stmt in text.split(';') {
        let Some((at, name)) = declared(stmt) else {
            continue;
        };
        // The last comment before the declaration; none: the one of the declaration
        // just before (a group under one comment).
        let before = &stmt[..at];
        let doc = before
            .rfind('\u{1}')
            .and_then(|i| {
                let idx = &before[i + 1..];
                let end = idx.find('\u{2}')?;
                idx[..end].parse::<usize>().ok()
            })
            .map(|i| comments[i].clone())
            .unwrap_or_else(|| previous.clone());
        previous = doc.clone();
        let list = match doc.rfind("Errors:") {
            Some(i) => doc[i..].to_owned(),
            None => doc,
        };
        docs.insert(name.to_owned(), list);
    }
    let mut calls: BTreeMap<String, BTreeSet<i32>> = docs
        .iter()
        .map(|(name, doc)| (name.clone(), mentioned(doc, &codes)))
        .collect();
    // "as hetmem_x": x's codes too (a few rounds reach chains).
    let ident_len = |t: &str| {
        t.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(t.len())
    };
    for _ in 0..4 {
        for (name, doc) in &docs {
            let mut extra = BTreeSet::new();
            let refs: Vec<&str> = doc
                .match_indices("as hetmem_")
                .map(|(i, _)| {
                    let tail = &doc[i + 3..];
                    &tail[..ident_len(tail)]
                })
                .collect();
            for r in refs {
                if let Some(other) = calls.get(r) {
                    extra.extend(other.iter().copied());
                }
            }
            if let Some(set) = calls.get_mut(name) {
                set.extend(extra);
            }
        }
    }
    Docs { codes, calls }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_parses() {
        let d = Docs::load();
        assert_eq!(d.codes["OK"], 0);
        assert_eq!(d.codes["NULL_POINTER"], -20);
        assert_eq!(d.codes["PANIC"], -99);
        let free = &d.calls["hetmem_free"];
        assert!(free.contains(&d.codes["FOREIGN_POINTER"]), "{free:?}");
        assert!(free.contains(&d.codes["INVALID_HANDLE"]));
        assert!(!free.contains(&d.codes["OUT_OF_MEMORY"]));
        assert!(d.calls["hetmem_version"].is_empty());
        // "Errors: as hetmem_copy".
        let fh = &d.calls["hetmem_copy_from_host"];
        assert!(fh.contains(&d.codes["OUT_OF_BOUNDS"]), "{fh:?}");
        // One comment over three declarations.
        for c in [
            "hetmem_torch_end_allocate_to_pool",
            "hetmem_torch_release_pool",
        ] {
            assert!(d.calls[c].contains(&d.codes["INVALID_ARGUMENT"]), "{c}");
        }
        assert!(d.calls.contains_key("hetmem_store_acquire_timeout"));
        assert!(d.calls.contains_key("hetmem_version"));
        assert!(!d.calls.contains_key("hetmem_stream_filter"));
        assert!(!d.calls.contains_key("hetmem_store_config"));
    }

    /// The library's parser (what HETMEM_CHECK_CODES=1 enforces) reads the same lists.
    #[test]
    fn the_library_reads_the_same_lists() {
        let mine = Docs::load();
        let lib = hetmem::ffi::codes::parse(HEADER).expect("the header parses");
        let theirs: BTreeMap<String, BTreeSet<i32>> = lib.calls.clone();
        assert_eq!(mine.calls, theirs);
    }

    #[test]
    fn a_made_up_header() {
        let h = "#define HETMEM_OK 0\n#define HETMEM_ERR_A -1\n#define HETMEM_ERR_B -2\n\
                 /* ---- section ---- */\n\n/* Does x. Errors: A. */\nint hetmem_x(int a);\n\
                 /* Does y; fails with HETMEM_ERR_B. Errors: as hetmem_x. */\n\
                 int hetmem_y(void);\nint hetmem_z(void);\n\
                 /* Errors: none. */\nint hetmem_w(void);\n";
        let d = parse(h);
        assert_eq!(d.calls["hetmem_x"], BTreeSet::from([-1]));
        // B is named in the prose, not in the list.
        assert_eq!(d.calls["hetmem_y"], BTreeSet::from([-1]));
        assert_eq!(d.calls["hetmem_z"], BTreeSet::from([-1]));
        assert!(d.calls["hetmem_w"].is_empty());
    }
}
