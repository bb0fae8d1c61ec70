//! The VMM's and the guest kernel's modules import one way only: a layer
//! table in docs/architecture.md for each says which module stands on
//! which, and this test reads the tables and every source file of
//! `vmm/src` and `guest/kernel/src`, and fails on an import from a lower
//! layer to a higher one, on a module the table does not place, and on any
//! cycle among modules (of the same layer, which the table allows to
//! import each other one way).
//!
//! An import is any `crate::NAME` path (`memvisor::NAME` in the binary's
//! `main.rs`) outside comments, before the file's `#[cfg(test)]` tests:
//! in-file tests may use fixtures from anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use memvisor_tests::vmm::workspace_root;

/// The table of `tree` between its markers in docs/architecture.md
/// (`<!-- layers TREE -->` … `<!-- /layers -->`): `layer N  mod mod ...`.
fn layers(tree: &str) -> BTreeMap<String, u32> {
    let doc = std::fs::read_to_string(workspace_root().join("docs/architecture.md")).expect("docs/architecture.md is readable");
    let marker = format!("<!-- layers {tree} -->");
    let start = doc.find(&marker).unwrap_or_else(|| panic!("docs/architecture.md has a {marker} table"));
    let end = doc[start..].find("<!-- /layers -->").expect("the layer table ends with <!-- /layers -->") + start;
    let mut layers = BTreeMap::new();
    for line in doc[start..end].lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("layer") {
            continue;
        }
        let n: u32 = words.next().and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("bad layer line {line:?}"));
        for module in words {
            assert!(layers.insert(module.to_string(), n).is_none(), "{module} is placed twice");
        }
    }
    assert!(layers.len() > 10, "the layer table of {tree} lists the modules");
    layers
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a source directory is readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `vmm/src` belongs to (`main` for the binary).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("the file is under vmm/src");
    let first = rel.components().next().expect("a path has a component").as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_string()
}

/// The modules `text` names through `prefix` (`crate::` or `memvisor::`),
/// outside comments and before its tests.
fn imports(text: &str, prefix: &str, known: &BTreeMap<String, u32>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("#[cfg(test)]") {
            break;
        }
        if code.starts_with("//") {
            continue;
        }
        let code = code.split(" //").next().unwrap_or(code);
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().last();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            // Items of the crate root (error_chain) are not modules.
            if known.contains_key(&name) || rest[name.len()..].starts_with("::") {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn vmm_modules_import_only_their_own_layer_or_lower() {
    check_tree("vmm/src", "lib");
}

#[test]
fn guest_kernel_modules_import_only_their_own_layer_or_lower() {
    check_tree("guest/kernel/src", "");
}

/// Checks every file of `tree` against its table; `root` is a crate-root
/// module that declares the others and is not itself layered.
fn check_tree(tree: &str, root: &str) {
    let layers = layers(tree);
    let src = workspace_root().join(tree);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == root {
            continue;
        }
        let Some(&own) = layers.get(&module) else {
            wrong.push(format!("{}: module {module} is not in the layer table", file.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("a source file is readable");
        let prefix = if module == "main" { "memvisor::" } else { "crate::" };
        for used in imports(&text, prefix, &layers) {
            if used == module {
                continue;
            }
            match layers.get(&used) {
                None => wrong.push(format!("{}: imports {used}, which the layer table does not place", file.display())),
                Some(&theirs) if theirs > own => {
                    wrong.push(format!("{}: {module} (layer {own}) imports {used} (layer {theirs}), a higher layer", file.display()));
                }
                Some(_) => {
                    graph.entry(module.clone()).or_default().insert(used);
                }
            }
        }
    }
    assert!(wrong.is_empty(), "imports against docs/architecture.md's layers:\n{}", wrong.join("\n"));
    // Same-layer imports must not close a loop.
    fn visit(m: &str, graph: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(cycle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("modules import each other in a loop: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_import_scanner_finds_paths_and_skips_comments_and_tests() {
    let known: BTreeMap<String, u32> = [("memory", 3), ("vm", 4), ("machine", 7)].into_iter().map(|(m, l)| (m.to_string(), l)).collect();
    let text = "use crate::memory::GuestRam;\n// crate::machine::Machine\nlet x = crate::vm::open();\nfn f() { my_crate::machine::x(); }\n#[cfg(test)]\nuse crate::machine::Machine;\n";
    let found: Vec<String> = imports(text, "crate::", &known).into_iter().collect();
    assert_eq!(found, ["memory", "vm"]);
}
