//! bytes → `normalize_path`: must never panic, and an `Ok` path is normal.
//!
//! When it succeeds, the result starts with `/`, has no empty, `.` or `..`
//! segment (no `//`, `/./`, `/../`, and no trailing `/.` or `/..`), and is a
//! fixed point: normalizing it again gives it back unchanged. Decoding
//! happens once by design (a decoded `%25` is a literal `%`), so the fixed
//! point is checked on the result re-escaped the way the forwarding side
//! puts it back on the wire (`%` → `%25`, `#` → `%23`); a result without
//! `%` or `#` must come back borrowed, without that step.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use tollgate::compile::normalize::normalize_path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check(text);
    // Most inputs lack the leading `/`: try them as a path too.
    if !text.starts_with('/') {
        check(&format!("/{text}"));
    }
});

fn check(path: &str) {
    let Ok(n) = normalize_path(path) else {
        return;
    };
    assert!(n.starts_with('/'), "{path:?} → {n:?}");
    assert!(!n.contains("//"), "{path:?} → {n:?}");
    assert!(
        !n.contains("/./") && !n.contains("/../"),
        "{path:?} → {n:?}"
    );
    assert!(
        !n.ends_with("/.") && !n.ends_with("/.."),
        "{path:?} → {n:?}"
    );
    assert!(!n.contains('\0'), "{path:?} → {n:?}");
    if !n.contains(['%', '#']) {
        let again = normalize_path(&n).expect("a normal path normalizes");
        assert!(matches!(again, Cow::Borrowed(_)), "{n:?} was rewritten");
        assert_eq!(again, n, "{path:?}");
    }
    let escaped = n.replace('%', "%25").replace('#', "%23");
    let again = normalize_path(&escaped).expect("a re-escaped normal path normalizes");
    assert_eq!(again, n, "{path:?} → {n:?} → {escaped:?}");
}
