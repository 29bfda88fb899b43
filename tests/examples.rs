//! Every config under `examples/` subdirectories (`examples/deploy/`, ...)
//! checks clean. The top-level `examples/*.conf` are checked by
//! `tests/check_cli.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn confs_below(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.map_while(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            confs_below(&p, depth + 1, out);
        } else if depth > 0 && p.extension().is_some_and(|x| x == "conf") {
            out.push(p);
        }
    }
}

#[test]
fn every_nested_example_checks_clean() {
    let mut list = Vec::new();
    confs_below(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"),
        0,
        &mut list,
    );
    list.sort();
    assert!(!list.is_empty(), "no nested examples found");
    for p in list {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["check", "--format", "json", "-c"])
            .arg(&p)
            .output()
            .expect("run tollgate check");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}: {stdout}", p.display());
        assert_eq!(
            stdout.trim(),
            "[]",
            "{}: not even a warning expected",
            p.display()
        );
    }
}
