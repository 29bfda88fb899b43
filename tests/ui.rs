//! Diagnostic snapshots (DESIGN.md convention 10): one small bad config per
//! diagnostic code under `tests/ui/`, rendered without colour at a fixed
//! width and compared with insta.
//!
//! A file is named after the code it must produce: `unknown_directive.conf`,
//! or `CODE__variant.conf` for a second case of one code. Besides the
//! snapshot, each file must yield at least one diagnostic with that code, so
//! that blessing a snapshot can never hide a wrong diagnostic.
//!
//! Paths are relative (`tests/ui/x.conf`: cargo runs tests in the crate
//! root), and `$env_NAME` sees a fixed environment (only `JWT_SECRET`), so
//! the snapshots do not depend on the machine.
//!
//! Regenerate with `INSTA_UPDATE=always cargo test --test ui`, then read
//! every changed `tests/snapshots/ui__*.snap` before committing it.

use std::path::{Path, PathBuf};

use tollgate::config::diagnostics::{Diagnostics, render_human};
use tollgate::config::parse::load;
use tollgate::config::validate::validate;

const UI_DIR: &str = "tests/ui";

fn env(name: &str) -> Option<String> {
    (name == "JWT_SECRET").then(|| "not-a-real-secret-0123456789abcdef".to_string())
}

fn cases() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(UI_DIR)
        .expect("tests/ui exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    files.sort();
    files
}

/// The code a case must produce: the file stem up to an optional `__variant`.
fn expected_code(path: &Path) -> String {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("UTF-8 file name");
    stem.split("__").next().unwrap_or(stem).to_string()
}

fn check_one(path: &Path) -> Result<(), String> {
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("UTF-8 file name");
    let mut diags = Diagnostics::new();
    let loaded = load(path, &mut diags).map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = validate(&loaded, &env, &mut diags);
    let sorted = diags.sorted();
    let rendered = render_human(&sorted, &loaded.sources, false, 80);

    let code = expected_code(path);
    let codes: Vec<&str> = sorted.iter().map(|d| d.code).collect();
    if !codes.contains(&code.as_str()) {
        return Err(format!(
            "{}: expected a `{code}` diagnostic, got {codes:?}\n{rendered}",
            path.display()
        ));
    }
    for d in &sorted {
        if d.help.is_none() {
            return Err(format!("{}: `{}` has no help line", path.display(), d.code));
        }
        if d.label.is_empty() {
            return Err(format!("{}: `{}` has no label", path.display(), d.code));
        }
    }

    let snap = std::panic::catch_unwind(|| {
        insta::with_settings!({ prepend_module_to_snapshot => true, omit_expression => true }, {
            insta::assert_snapshot!(name, rendered);
        });
    });
    snap.map_err(|_| format!("{}: snapshot mismatch (see above)", path.display()))
}

#[test]
fn every_ui_case_matches_its_snapshot() {
    let files = cases();
    assert!(files.len() >= 40, "tests/ui has only {} cases", files.len());
    let failures: Vec<String> = files.iter().filter_map(|p| check_one(p).err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} ui cases failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

/// Every snapshot belongs to a case: a renamed or deleted case must not
/// leave its old snapshot behind.
#[test]
fn no_orphan_snapshots() {
    let names: Vec<String> = cases()
        .iter()
        .map(|p| {
            format!(
                "ui__{}.snap",
                p.file_stem().and_then(|s| s.to_str()).unwrap_or("")
            )
        })
        .collect();
    let Ok(dir) = std::fs::read_dir("tests/snapshots") else {
        return;
    };
    let orphans: Vec<String> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with("ui__") && f.ends_with(".snap") && !names.contains(f))
        .collect();
    assert!(
        orphans.is_empty(),
        "snapshots without a tests/ui case: {orphans:?}"
    );
}
