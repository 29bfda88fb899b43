//! Header lookups on the request path.
//!
//! A head carries a handful of fields (wrk's one, a browser's eight to
//! twelve), and the path looks up a dozen names per request, most of them
//! absent. `HeaderMap` hashes the name on every lookup; for so few fields a
//! scan is cheaper, and a standard name compares as one byte. Larger maps
//! are looked up by hash as before.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Maps with more values than this are looked up by hash.
const SCAN_UP_TO: usize = 16;

/// The first value of `name`, as [`HeaderMap::get`].
#[inline]
pub fn get<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    if h.len() > SCAN_UP_TO {
        return h.get(name);
    }
    h.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
}

/// Whether `name` is present, as [`HeaderMap::contains_key`].
#[inline]
pub fn contains(h: &HeaderMap, name: &HeaderName) -> bool {
    if h.len() > SCAN_UP_TO {
        return h.contains_key(name);
    }
    h.keys().any(|n| n == name)
}

/// Every value of `name` in order, as [`HeaderMap::get_all`].
#[inline]
pub fn get_all<'a>(h: &'a HeaderMap, name: &'a HeaderName) -> All<'a> {
    if h.len() > SCAN_UP_TO {
        All::Hashed(h.get_all(name).iter())
    } else {
        All::Scan(h.iter(), name)
    }
}

/// The values [`get_all`] finds.
pub enum All<'a> {
    Hashed(http::header::ValueIter<'a, HeaderValue>),
    Scan(http::header::Iter<'a, HeaderValue>, &'a HeaderName),
}

impl<'a> Iterator for All<'a> {
    type Item = &'a HeaderValue;

    #[inline]
    fn next(&mut self) -> Option<&'a HeaderValue> {
        match self {
            All::Hashed(it) => it.next(),
            All::Scan(it, name) => it.find(|(n, _)| n == name).map(|(_, v)| v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    fn map(n: usize) -> HeaderMap {
        let mut h = HeaderMap::new();
        for i in 0..n {
            h.append(
                HeaderName::try_from(format!("x-f{i}")).unwrap(),
                HeaderValue::from(i),
            );
        }
        h.append(header::HOST, HeaderValue::from_static("a"));
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.append(header::HOST, HeaderValue::from_static("b"));
        h
    }

    #[test]
    fn scans_and_hashes_find_the_same() {
        // Below, at and above the size where lookups switch to hashing.
        for n in [0, 3, SCAN_UP_TO - 3, SCAN_UP_TO, SCAN_UP_TO + 5] {
            let h = map(n);
            for name in [
                header::HOST,
                header::CONNECTION,
                header::UPGRADE,
                HeaderName::from_static("x-f2"),
                HeaderName::from_static("x-f99"),
            ] {
                assert_eq!(get(&h, &name), h.get(&name), "{n} {name}");
                assert_eq!(contains(&h, &name), h.contains_key(&name), "{n} {name}");
                let all: Vec<_> = get_all(&h, &name).collect();
                let want: Vec<_> = h.get_all(&name).iter().collect();
                assert_eq!(all, want, "{n} {name}");
            }
        }
    }
}
