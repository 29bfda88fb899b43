//! Path normalization: the request target's path → the path that is routed
//! (LANGUAGE.md §3, §13.4).
//!
//! Place in the pipeline: the server calls [`normalize_path`] on the path of
//! every request target (without the query) *before* routing; an error is a
//! 400 and the request never reaches [`crate::compile::router`]. The result
//! is NGINX's `$uri`: what the router matches, what regex captures point
//! into, and what is forwarded when a `proxy_pass` URI part is spliced in.
//!
//! The steps are NGINX's (`ngx_http_parse_complex_uri` with `merge_slashes
//! on`): percent-decode once, then resolve `.` and `..` segments and merge
//! repeated `/` over the *decoded* bytes.
//!
//! # Encoded slashes and dots
//!
//! `%2F` is decoded to `/` and `%2E` to `.` before segments are resolved, as
//! NGINX does, so `/a%2F..%2Fb` is `/b` and `/%2e%2e/etc` is rejected for
//! climbing above the root. Deciding otherwise would open the classic
//! bypass where the router sees one path and the upstream another. Because
//! the normalized path is also what is forwarded when a URI part is spliced,
//! routing and forwarding never diverge; the forwarding side must re-escape
//! the normalized path (NGINX escapes it with `NGX_ESCAPE_URI`), so a decoded
//! `%2F` goes upstream as a plain `/`.
//!
//! Decoding happens exactly once: a decoded `%25` is a literal `%` in the
//! result and is not decoded again.

use std::borrow::Cow;

/// Why a request path cannot be routed. Every variant is a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NormalizeError {
    /// The path is empty or does not start with `/` (not origin-form).
    #[error("path does not start with `/`")]
    NotAbsolute,
    /// A `%` not followed by two hex digits, at this byte offset of the
    /// input.
    #[error("malformed percent escape at byte {0}")]
    BadEscape(usize),
    /// A NUL byte, raw or as `%00`.
    #[error("NUL byte in path")]
    Nul,
    /// The decoded bytes are not UTF-8.
    #[error("decoded path is not valid UTF-8")]
    InvalidUtf8,
    /// A raw `#`: a fragment has no business in a request target.
    #[error("fragment in request target")]
    Fragment,
    /// A `..` segment would climb above `/`.
    #[error("path climbs above the root")]
    AboveRoot,
}

/// Normalizes a request path for routing.
///
/// `path` is the path of the request target as received (no query string).
/// Returns the input borrowed when it is already normal (no `%`, no `//`,
/// no `.` or `..` segment), which is the common case and allocates nothing;
/// otherwise an owned, normalized copy.
///
/// A trailing slash is kept, and a trailing `.` or `..` segment leaves one
/// (`/a/b/..` → `/a/`), as in NGINX.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, NormalizeError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(NormalizeError::NotAbsolute);
    }
    if is_normal(bytes)? {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = percent_decode(bytes)?;
    let decoded = String::from_utf8(decoded).map_err(|_| NormalizeError::InvalidUtf8)?;
    resolve_segments(&decoded).map(Cow::Owned)
}

/// Scans once: `Ok(true)` when the path needs no work, an error for bytes
/// that are never acceptable, `Ok(false)` when the slow path must run.
fn is_normal(bytes: &[u8]) -> Result<bool, NormalizeError> {
    let mut normal = true;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\0' => return Err(NormalizeError::Nul),
            b'#' => return Err(NormalizeError::Fragment),
            b'%' => normal = false,
            b'/' if normal => {
                let rest = bytes.get(i + 1..).unwrap_or_default();
                if starts_dot_or_empty_segment(rest) {
                    normal = false;
                }
            }
            _ => {}
        }
    }
    Ok(normal)
}

/// Whether the segment starting at `rest` (just after a `/`) is empty, `.`
/// or `..`: the segments the slow path rewrites. The first segment of a
/// path that is only `/` is empty but needs nothing, hence `rest` empty is
/// fine.
fn starts_dot_or_empty_segment(rest: &[u8]) -> bool {
    matches!(
        rest,
        [b'/', ..] | [b'.'] | [b'.', b'/', ..] | [b'.', b'.'] | [b'.', b'.', b'/', ..]
    )
}

fn percent_decode(bytes: &[u8]) -> Result<Vec<u8>, NormalizeError> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let hi = bytes.get(i + 1).copied().and_then(hex);
        let lo = bytes.get(i + 2).copied().and_then(hex);
        let (Some(hi), Some(lo)) = (hi, lo) else {
            return Err(NormalizeError::BadEscape(i));
        };
        let v = hi << 4 | lo;
        if v == 0 {
            return Err(NormalizeError::Nul);
        }
        out.push(v);
        i += 3;
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 `remove_dot_segments` plus slash merging, on a decoded path
/// that starts with `/`.
fn resolve_segments(path: &str) -> Result<String, NormalizeError> {
    // Invariant: `out` always ends with '/' while segments are pushed; the
    // final '/' is dropped at the end when the last segment was a name.
    let mut out = String::with_capacity(path.len());
    out.push('/');
    let mut last_was_name = false;
    for seg in path.get(1..).unwrap_or_default().split('/') {
        match seg {
            "" | "." => last_was_name = false,
            ".." => {
                if out.len() == 1 {
                    return Err(NormalizeError::AboveRoot);
                }
                // Drop the last "name/" from "/…/name/".
                out.pop();
                let cut = out.rfind('/').map_or(1, |p| p + 1);
                out.truncate(cut);
                last_was_name = false;
            }
            name => {
                out.push_str(name);
                out.push('/');
                last_was_name = true;
            }
        }
    }
    if last_was_name {
        out.pop();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, NormalizeError> {
        normalize_path(p).map(Cow::into_owned)
    }

    #[test]
    fn fast_path_borrows() {
        for p in [
            "/",
            "/a/b",
            "/a/b/",
            "/.well-known/x",
            "/a/..b",
            "/a/b.",
            "/a...",
        ] {
            assert!(matches!(normalize_path(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn slow_path() {
        assert_eq!(norm("//a///b//").as_deref(), Ok("/a/b/"));
        assert_eq!(norm("/a/./b/../c").as_deref(), Ok("/a/c"));
        assert_eq!(norm("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(norm("/a/.").as_deref(), Ok("/a/"));
        assert_eq!(norm("/a/..").as_deref(), Ok("/"));
        assert_eq!(norm("/%41%2f..%2Fb").as_deref(), Ok("/b"));
        assert_eq!(norm("/%2e%2E/x"), Err(NormalizeError::AboveRoot));
        assert_eq!(norm("/%2541").as_deref(), Ok("/%41"));
    }

    #[test]
    fn errors() {
        assert_eq!(norm(""), Err(NormalizeError::NotAbsolute));
        assert_eq!(norm("a/b"), Err(NormalizeError::NotAbsolute));
        assert_eq!(norm("/a%2"), Err(NormalizeError::BadEscape(2)));
        assert_eq!(norm("/a%zz"), Err(NormalizeError::BadEscape(2)));
        assert_eq!(norm("/a%00"), Err(NormalizeError::Nul));
        assert_eq!(norm("/a\0"), Err(NormalizeError::Nul));
        assert_eq!(norm("/%ff"), Err(NormalizeError::InvalidUtf8));
        assert_eq!(norm("/a#b"), Err(NormalizeError::Fragment));
        assert_eq!(norm("/.."), Err(NormalizeError::AboveRoot));
        assert_eq!(norm("/a/../.."), Err(NormalizeError::AboveRoot));
    }
}
