//! bytes → the HTTP/1 framing guard's `Scanner`, fed in different chunk
//! splits: must never panic, and the verdict must not depend on how the
//! stream was split into reads.
//!
//! Input layout: byte 0 sets the head limit and byte 1 the request-line
//! limit (small, so the 414/431 paths are reached); bytes 2..10 seed the
//! split sizes; the rest is the request stream. The stream is scanned in
//! one read, one byte per read, and in pseudo-random reads of 1..=64
//! bytes. Each run records every stop (`Upgrade` stops are resumed after,
//! as the guard does once the response is not a 101) with the absolute
//! offset it happened at, then `committed()` and `in_head()`: the three
//! records must be equal.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tollgate::server::guard::{GuardLimits, Scanner, Stop};

#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    stops: Vec<(u64, Stop)>,
    committed: u64,
    in_head: bool,
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let head = 1 + usize::from(data[0]) * 16;
    let limits = GuardLimits {
        request_line: head.min(1 + usize::from(data[1]) * 8),
        head,
        header_timeout: Duration::from_secs(60),
        keepalive_timeout: Duration::from_secs(75),
        body_backstop: Duration::from_secs(61),
    };
    let seed = u64::from_le_bytes(data[2..10].try_into().expect("8 bytes")) | 1;
    let stream = &data[10..];

    let whole = scan(limits, stream, std::iter::once(stream.len()));
    let bytes = scan(limits, stream, std::iter::repeat_n(1, stream.len()));
    assert_eq!(whole, bytes, "one read vs one byte per read");
    let mut x = seed;
    let sizes = std::iter::from_fn(move || {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Some(1 + (x % 64) as usize)
    });
    let random = scan(limits, stream, sizes);
    assert_eq!(whole, random, "one read vs random reads (seed {seed})");
});

/// Feed `stream` in reads of the given sizes until it is used up or the
/// scanner stops for good.
fn scan(limits: GuardLimits, stream: &[u8], sizes: impl Iterator<Item = usize>) -> Verdict {
    let mut s = Scanner::new(limits);
    let mut stops = Vec::new();
    let mut at = 0usize;
    'reads: for size in sizes {
        if at >= stream.len() {
            break;
        }
        let end = stream.len().min(at + size);
        while at < end {
            let before = s.committed();
            let (n, stop) = s.feed(&stream[at..end]);
            assert!(n <= end - at, "consumed more than fed");
            at += n;
            match stop {
                None => {
                    assert_eq!(at, end, "stopped early without a reason");
                }
                Some(Stop::Upgrade) => {
                    assert!(n > 0 || s.committed() != before, "no progress");
                    stops.push((at as u64, Stop::Upgrade));
                }
                Some(other) => {
                    stops.push((at as u64, other));
                    break 'reads;
                }
            }
        }
    }
    Verdict {
        stops,
        committed: s.committed(),
        in_head: s.in_head(),
    }
}
