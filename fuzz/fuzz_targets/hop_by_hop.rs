//! bytes → request headers → `strip_hop_by_hop`: must never panic; after
//! it, no hop-by-hop header and no header named in a `Connection` value is
//! left, and every other header keeps its values, in order.
//!
//! Input layout: `name: value` lines (lossy UTF-8 names, raw value bytes);
//! lines that are not a valid header are skipped.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tollgate::proxy::forward::strip_hop_by_hop;

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

fuzz_target!(|data: &[u8]| {
    let mut h = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (n, v) = (&line[..colon], &line[colon + 1..]);
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n),
            HeaderValue::from_bytes(v.trim_ascii()),
        ) {
            h.append(n, v);
        }
    }
    // Names listed in `Connection` values that are visible ASCII.
    let listed: Vec<String> = h
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let before = h.clone();
    strip_hop_by_hop(&mut h);
    for n in HOP_BY_HOP {
        assert!(!h.contains_key(*n), "{n} left");
    }
    for n in &listed {
        assert!(
            !h.contains_key(n.as_str()),
            "{n} (listed in Connection) left"
        );
    }
    for name in before.keys() {
        let gone = HOP_BY_HOP.contains(&name.as_str()) || listed.iter().any(|l| l == name.as_str());
        if !gone {
            let a: Vec<_> = before.get_all(name).iter().collect();
            let b: Vec<_> = h.get_all(name).iter().collect();
            assert_eq!(a, b, "{name} changed");
        }
    }
    assert!(h.len() <= before.len());
});
