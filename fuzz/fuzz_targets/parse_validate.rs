//! bytes → `load_bytes` → `validate`: must never panic, hang or blow up,
//! whatever the bytes.
//!
//! The input is written as `gateway.conf` into a fresh temporary directory
//! with two small sibling files (`a.conf`, `sub/b.conf`), so that `include`
//! is fuzzed too, but only inside that sandbox: an input whose `include`
//! names an absolute path, `~` or `..` is skipped, because globs such as
//! `/**/*` would walk the whole filesystem (slow, and not the config
//! front end's fault) and `/dev/stdin` would block the fuzzer.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use tollgate::config::ast::Directive;
use tollgate::config::diagnostics::{Diagnostics, render_human, to_github, to_json};
use tollgate::config::parse::{load_bytes, parse_text};
use tollgate::config::source::FileId;
use tollgate::config::validate::validate;

fuzz_target!(|data: &[u8]| {
    if data.windows(7).any(|w| w == b"include") && !includes_stay_inside(data) {
        return;
    }
    let Ok(dir) = tempfile::tempdir() else { return };
    let path = dir.path().join("gateway.conf");
    let _ = std::fs::write(
        dir.path().join("a.conf"),
        "upstream a { server 127.0.0.1:1; }\n",
    );
    let _ = std::fs::create_dir(dir.path().join("sub"));
    let _ = std::fs::write(
        dir.path().join("sub/b.conf"),
        "location /b/ { proxy_pass http://a; }\n",
    );
    // The loader reads only the included files from disk: the top file is
    // `data` itself, so this copy is only there for `include gateway.conf`.
    let _ = std::fs::write(&path, data);

    let mut diags = Diagnostics::new();
    let loaded = load_bytes(&path, data, &mut diags);
    let env = |name: &str| (name == "X").then(|| "x".to_string());
    let config = validate(&loaded, &env, &mut diags);
    // A config comes back only without errors.
    assert!(config.is_none() || !diags.has_errors());
    // Every diagnostic must render, in each of `check`'s formats, against
    // the sources it names.
    let sorted = diags.sorted();
    let _ = render_human(&sorted, &loaded.sources, false, 80);
    let _ = to_json(&sorted, &loaded.sources);
    let _ = to_github(&sorted, &loaded.sources);
});

/// Whether every `include` in `data` names a path inside the sandbox.
fn includes_stay_inside(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        // Not UTF-8: the loader refuses it before reading any include.
        return true;
    };
    let mut diags = Diagnostics::new();
    let file = parse_text(FileId(0), text, &mut diags);
    all_inside(&file.directives)
}

fn all_inside(ds: &[Directive]) -> bool {
    ds.iter().all(|d| {
        let ok = d.name != "include"
            || d.args.iter().all(|a| {
                let v = a.text();
                !v.starts_with('~')
                    && Path::new(&v)
                        .components()
                        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
            });
        ok && all_inside(d.children())
    })
}
