//! One named test per input that once crashed, hung or misbehaved in the
//! front end: found by the fuzz targets in `fuzz/` (see fuzz/README.md) or by
//! reviewing what they could not reach. Each input is kept inline, and each
//! test asserts that loading it does not panic and reports a sensible
//! diagnostic.

use std::path::Path;

use tollgate::config::diagnostics::{Diagnostics, render_human, to_github, to_json};
use tollgate::config::parse::{MAX_DEPTH, load, load_bytes};
use tollgate::config::validate::validate;

/// What the `parse_validate` fuzz target does: load, validate, render every
/// diagnostic in each format. Returns the codes, in order.
fn check_at(path: &Path, input: &[u8]) -> Vec<&'static str> {
    let mut diags = Diagnostics::new();
    let loaded = load_bytes(path, input, &mut diags);
    let env = |name: &str| (name == "X").then(|| "x".to_string());
    let config = validate(&loaded, &env, &mut diags);
    assert!(config.is_none() || !diags.has_errors());
    let sorted = diags.sorted();
    let _ = render_human(&sorted, &loaded.sources, false, 80);
    let _ = to_json(&sorted, &loaded.sources);
    let _ = to_github(&sorted, &loaded.sources);
    diags.iter().map(|d| d.code).collect()
}

fn check(input: &[u8]) -> Vec<&'static str> {
    let dir = tempfile::tempdir().expect("temp dir");
    check_at(&dir.path().join("gateway.conf"), input)
}

// ---- found by review (the fuzz target's sandbox cannot create files) -----

/// `include` read the whole file before checking its size: a device such
/// as `/dev/zero` exhausted memory, and a FIFO blocked forever.
#[test]
fn include_of_a_device_is_refused_without_reading_it() {
    let codes = check(b"include /dev/zero;\n");
    assert_eq!(codes, ["unreadable_include"]);
}

/// The same for the top file given to `check`.
#[test]
fn loading_a_device_is_an_error_not_a_hang() {
    let mut diags = Diagnostics::new();
    let err = load(Path::new("/dev/zero"), &mut diags).expect_err("not a regular file");
    assert_eq!(err.to_string(), "not a regular file");
}

/// A file over the size limit is reported as too large, even when the cut
/// falls inside a UTF-8 character.
#[test]
fn oversized_file_is_too_large_not_invalid_utf8() {
    let big = "é".repeat(tollgate::config::parse::MAX_FILE_SIZE / 2 + 1);
    assert_eq!(check(big.as_bytes()), ["file_too_large"]);
}

/// Each file's nesting was bounded, but includes inside blocks stacked
/// them: a chain of files, each nesting 15 blocks and including the next,
/// built a tree of unbounded depth (up to 1,024 files × 16 levels) for the
/// recursive walks that follow (validate, compile, drop) to survive. No
/// stack overflow was seen at 15,000 levels, but the module's promise is a
/// bounded tree, so the depth is now counted across includes.
#[test]
fn nesting_through_includes_is_bounded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let levels = 15;
    for i in 0..200 {
        let open = "location /x {".repeat(levels);
        let close = "}".repeat(levels);
        let text = format!("{open} include f{}.conf; {close}\n", i + 1);
        std::fs::write(dir.path().join(format!("f{i}.conf")), text).expect("write");
    }
    std::fs::write(dir.path().join("f200.conf"), "return 200;\n").expect("write");
    let codes = check_at(
        &dir.path().join("top.conf"),
        b"server { include f0.conf; }\n",
    );
    assert!(codes.contains(&"nesting_too_deep"), "{codes:?}");
    assert!(MAX_DEPTH < 2 * levels);
}

// ---- hangs: inputs far past the fuzzer's -max_len --------------------------

/// The missing-`;` heuristic computed every directive's column by scanning
/// back to the start of its line: quadratic in the length of a line, so a
/// one-line file of many directives (minified, or generated) took 46 s to
/// load at 80,000 directives in a debug build (0.7 s now).
#[test]
fn many_directives_on_one_line_load_in_linear_time() {
    let input = "a;".repeat(80_000);
    let t = std::time::Instant::now();
    let mut diags = Diagnostics::new();
    let loaded = load_bytes(Path::new("one-line.conf"), input.as_bytes(), &mut diags);
    validate(&loaded, &|_: &str| None, &mut diags);
    let took = t.elapsed();
    assert_eq!(diags.len(), 80_000);
    assert!(diags.iter().all(|d| d.code == "unknown_directive"));
    assert!(took.as_secs() < 20, "took {took:?}");
}

/// miette finds a span's line by scanning the source from its start, and
/// every report copied the whole text: rendering one diagnostic per line of
/// a 20,000-line file took 36 s in a debug build (1.2 s now).
#[test]
fn many_diagnostics_render_in_linear_time() {
    let input = "a;\n".repeat(20_000);
    let t = std::time::Instant::now();
    let codes = check(input.as_bytes());
    let took = t.elapsed();
    assert_eq!(codes.len(), 20_000);
    assert!(took.as_secs() < 20, "took {took:?}");
}
