//! The code's shape, checked rather than hoped for: no module imports one
//! that imports it back (at every level of the module tree: sibling
//! subtrees form no cycle), no method of the engine's migration calls back
//! into the file that called it (the files an `impl` is split over form no
//! cycle either), no source file over 600 lines, no function over 80 lines,
//! and no lint silenced that guards soundness.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 80;
/// Lints that guard soundness: never allowed.
const FORBIDDEN_ALLOWS: [&str; 2] = ["clippy::mut_from_ref", "clippy::not_unsafe_ptr_arg_deref"];

/// The crates checked: (crate root directory, its source directory).
fn crates() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    vec![root.join("src"), root.join("rdma/src"), root.join("bench/src")]
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/a/b.rs` → ["a", "b"]; `src/a/mod.rs` → ["a"]; `src/lib.rs` → [].
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The code without comments and string or char literals (so that braces
/// and paths in them do not count).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if text[i..].starts_with("//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if text[i..].starts_with("/*") {
            while i < b.len() && !text[i..].starts_with("*/") {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
        } else if text[i..].starts_with("r#\"") || text[i..].starts_with("r\"") {
            let hashes = text[i + 1..].bytes().take_while(|&x| x == b'#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            i += 2 + hashes;
            while i < b.len() && !text[i..].starts_with(&close) {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += close.len();
            out.push_str("\"\"");
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if i < b.len() && b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || (b[i + 1] == b'\\' && b[i + 3] == b'\'')) {
            // A char literal ('x' or '\n'), not a lifetime.
            i += if b[i + 1] == b'\\' { 4 } else { 3 };
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn expand_use(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap().trim().to_owned()];
    };
    let prefix = tree[..open].trim_end_matches("::").trim();
    let inner = &tree[open + 1..tree.rfind('}').unwrap()];
    let (mut parts, mut depth, mut start) = (vec![], 0, 0);
    for (i, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(expand_use)
        .map(|p| if p == "self" { prefix.to_owned() } else { format!("{prefix}::{p}") })
        .collect()
}

/// Module paths (from the crate root) that `code`, in module `me`, refers to.
fn references(code: &str, me: &[String]) -> Vec<Vec<String>> {
    let mut paths = vec![];
    // `use` statements (possibly spanning lines).
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = rest[..i].chars().last();
        rest = &rest[i + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let end = rest.find(';').unwrap_or(rest.len());
        paths.extend(expand_use(&rest[..end]));
    }
    // Inline `crate::a::b` and `super::a` paths.
    for word in code.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')) {
        if (word.starts_with("crate::") || word.starts_with("super::")) && !word.ends_with("::") {
            paths.push(word.to_owned());
        }
    }
    let mut out = vec![];
    for p in paths {
        let segs: Vec<&str> = p.split("::").filter(|s| !s.is_empty()).collect();
        let mut base: Vec<String> = match segs.first() {
            Some(&"crate") => vec![],
            // In `a/mod.rs` (module a) and in `a/b.rs` (module a::b), super is the parent module.
            Some(&"super") => me[..me.len().saturating_sub(1)].to_vec(),
            Some(&"self") => me.to_vec(),
            _ => continue,
        };
        let mut rest = &segs[1..];
        while let Some(&"super") = rest.first() {
            base.pop();
            rest = &rest[1..];
        }
        base.extend(rest.iter().map(|s| s.to_string()));
        out.push(base);
    }
    out
}

/// Edges between sibling subtrees: for every reference from module F to
/// module T where neither contains the other, an edge from F's ancestor to
/// T's ancestor just below their common ancestor.
fn sibling_edges(
    modules: &BTreeSet<Vec<String>>,
    refs: &[(Vec<String>, Vec<String>)],
) -> BTreeSet<(Vec<String>, Vec<String>)> {
    let mut edges = BTreeSet::new();
    for (from, to) in refs {
        // The longest module that the path names (the rest are items).
        let Some(target) = (0..=to.len()).rev().map(|n| to[..n].to_vec()).find(|m| modules.contains(m)) else {
            continue;
        };
        let common = from.iter().zip(&target).take_while(|(a, b)| a == b).count();
        if common == from.len() || common == target.len() {
            continue; // a module and one it contains
        }
        edges.insert((from[..=common].to_vec(), target[..=common].to_vec()));
    }
    edges
}

fn find_cycle(edges: &BTreeSet<(Vec<String>, Vec<String>)>) -> Option<Vec<String>> {
    let mut next: BTreeMap<&Vec<String>, Vec<&Vec<String>>> = BTreeMap::new();
    for (a, b) in edges {
        next.entry(a).or_default().push(b);
    }
    fn visit<'a>(
        n: &'a Vec<String>,
        next: &BTreeMap<&'a Vec<String>, Vec<&'a Vec<String>>>,
        stack: &mut Vec<&'a Vec<String>>,
        done: &mut BTreeSet<&'a Vec<String>>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|m| *m == n) {
            return Some(stack[i..].iter().chain([&n]).map(|m| m.join("::")).collect());
        }
        if !done.insert(n) {
            return None;
        }
        stack.push(n);
        for m in next.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, next, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    next.keys().find_map(|n| visit(n, &next, &mut vec![], &mut done))
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    for src in crates() {
        let mut files = vec![];
        rust_files(&src, &mut files);
        let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(&src, f)).collect();
        let mut refs = vec![];
        for f in &files {
            let me = module_of(&src, f);
            let code = code_only(&std::fs::read_to_string(f).unwrap());
            refs.extend(references(&code, &me).into_iter().map(|t| (me.clone(), t)));
        }
        let edges = sibling_edges(&modules, &refs);
        if let Some(cycle) = find_cycle(&edges) {
            panic!("{}: modules import each other: {}", src.display(), cycle.join(" -> "));
        }
    }
}

#[test]
fn the_checker_finds_a_cycle() {
    let m = |s: &str| s.split("::").map(str::to_owned).collect::<Vec<_>>();
    let modules: BTreeSet<_> = ["a", "a::x", "b", "c"].iter().map(|s| m(s)).collect();
    let refs = vec![(m("a::x"), m("b::Item")), (m("b"), m("a::x::f")), (m("c"), m("a"))];
    let c = find_cycle(&sibling_edges(&modules, &refs)).expect("a -> b -> a");
    assert_eq!(c, vec!["a", "b", "a"]);
    let refs = vec![(m("a::x"), m("b::Item")), (m("a"), m("a::x")), (m("a::x"), m("a::Item"))];
    assert_eq!(find_cycle(&sibling_edges(&modules, &refs)), None, "a module and its children may refer to each other");
    let code = code_only("use crate::{a::{b, c as d}, e};\n// use crate::z;\nlet s = \"crate::y\"; crate::f::g();");
    let r: Vec<String> = references(&code, &[]).into_iter().map(|p| p.join("::")).collect();
    assert_eq!(r, vec!["a::b", "a::c", "e", "f::g"]);
}

/// The methods each file defines (names defined in one file only: a name
/// several define is not followed).
fn methods_by_file(files: &[(String, String)]) -> BTreeMap<String, String> {
    let mut owner: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (file, code) in files {
        for (name, _, _) in function_lengths(code) {
            let e = owner.entry(name).or_insert_with(|| Some(file.clone()));
            if e.as_deref() != Some(file) {
                *e = None;
            }
        }
    }
    owner.into_iter().filter_map(|(n, f)| f.map(|f| (n, f))).collect()
}

/// Edges between files: F calls `self.m(` and m is defined in G.
fn method_edges(files: &[(String, String)]) -> BTreeSet<(Vec<String>, Vec<String>)> {
    let owner = methods_by_file(files);
    let mut edges = BTreeSet::new();
    for (file, code) in files {
        for (i, _) in code.match_indices("self.") {
            let name: String = code[i + 5..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            let called = code[i + 5 + name.len()..].starts_with('(');
            match owner.get(&name) {
                Some(g) if called && g != file => {
                    edges.insert((vec![file.clone()], vec![g.clone()]));
                }
                _ => {}
            }
        }
    }
    edges
}

/// The engine's `Migration` is one type whose methods are spread over
/// sibling files; the module check cannot see calls between them. The
/// parent (`mod.rs`, which holds the type and its shared helpers) may be
/// called by all, as a parent module may be referred to by its children.
#[test]
fn engine_files_call_no_method_back() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let mut files = vec![];
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = e.path();
        let code = code_only(&std::fs::read_to_string(&p).unwrap_or_default());
        if p.file_name().is_some_and(|n| n != "mod.rs") && code.contains("impl Migration") {
            files.push((p.file_name().unwrap().to_string_lossy().into_owned(), code));
        }
    }
    assert!(files.len() > 5, "the engine's files were not found in {}", dir.display());
    if let Some(cycle) = find_cycle(&method_edges(&files)) {
        panic!("engine files call each other's methods in a cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_method_checker_finds_a_cycle() {
    let f = |name: &str, code: &str| (name.to_owned(), code_only(code));
    let files = vec![
        f("a.rs", "impl M {\n    fn one(&self) {\n        self.two();\n    }\n}\n"),
        f("b.rs", "impl M {\n    fn two(&self) {\n        self.x.one();\n        self.three()\n    }\n}\n"),
        f("c.rs", "impl M {\n    fn three(&self) {\n        self.one()\n    }\n}\n"),
    ];
    assert_eq!(
        find_cycle(&method_edges(&files)),
        Some(vec!["a.rs".into(), "b.rs".into(), "c.rs".into(), "a.rs".into()])
    );
    assert_eq!(find_cycle(&method_edges(&files[..2])), None, "a field's method is not the type's");
}

/// Lengths of the functions in `code` (rustfmt layout: a function ends at
/// the first line that is its own indentation followed by `}`).
fn function_lengths(code: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = vec![];
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let sig = t
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub(super) ")
            .trim_start_matches("pub ")
            .trim_start_matches("const ")
            .trim_start_matches("async ")
            .trim_start_matches("unsafe ");
        let Some(name) = sig.strip_prefix("fn ") else { continue };
        let name: String = name.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let indent = &l[..l.len() - t.len()];
        // A declaration without a body ends with `;` before any `{`.
        let body_start = lines[i..].iter().position(|x| x.contains('{') || x.trim_end().ends_with(';'));
        match body_start {
            Some(k) if lines[i + k].contains('{') => {}
            _ => continue,
        }
        if t.trim_end().ends_with('}') && t.contains('{') {
            out.push((name, i + 1, 1));
            continue;
        }
        let close = format!("{indent}}}");
        if let Some(end) = lines[i + 1..].iter().position(|x| x.trim_end() == close) {
            out.push((name, i + 1, end + 2));
        }
    }
    out
}

#[test]
fn files_and_functions_stay_short() {
    let mut problems = vec![];
    for src in crates() {
        let mut files = vec![];
        rust_files(&src, &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let n = text.lines().count();
            if n > MAX_FILE_LINES {
                problems.push(format!("{}: {n} lines (at most {MAX_FILE_LINES})", f.display()));
            }
            for (name, line, len) in function_lengths(&code_only(&text)) {
                if len > MAX_FN_LINES {
                    problems.push(format!("{}:{line}: fn {name} is {len} lines (at most {MAX_FN_LINES})", f.display()));
                }
            }
            for lint in FORBIDDEN_ALLOWS {
                if text.contains(&format!("allow({lint})")) {
                    problems.push(format!("{}: silences {lint}", f.display()));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn function_lengths_are_measured() {
    let code =
        "fn a() {}\n\nimpl X {\n    pub async fn b(\n        x: u8,\n    ) -> u8 {\n        x\n    }\n    fn c();\n}\n";
    let l = function_lengths(code);
    assert_eq!(l, vec![("a".into(), 1, 1), ("b".into(), 4, 5)]);
}
