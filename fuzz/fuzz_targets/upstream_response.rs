//! bytes → the upstream HTTP/1 client's response decoder
//! (`tollgate::proxy::client::decode`): an upstream's response is network
//! input, so decoding it must never panic, and the result (status,
//! headers, body, or the error) must not depend on how the bytes arrived.
//!
//! Input layout: byte 0 bit 0 says whether the request was a `HEAD`;
//! bytes 1..9 seed the piece sizes; the rest is what the upstream sent.
//! It is decoded in one piece, one byte at a time, and in pseudo-random
//! pieces of 1..=64 bytes: the three results must be equal. Its head,
//! passed through to an HTTP/1 client as lines, must give the client what
//! parsing it into a header map gives (`pass_through_matches`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::proxy::client::{decode, pass_through_matches};

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let head = data[0] & 1 == 1;
    let mut seed = u64::from_le_bytes(data[1..9].try_into().expect("8 bytes")) | 1;
    let input = &data[9..];
    let pieces: Vec<usize> = (0..32)
        .map(|_| {
            // xorshift64
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 64) as usize + 1
        })
        .collect();
    let whole = decode(input, &[], head);
    assert_eq!(decode(input, &[1], head), whole, "one byte at a time");
    assert_eq!(decode(input, &pieces, head), whole, "pieces {pieces:?}");
    if let Err(e) = pass_through_matches(input, head) {
        panic!("{e}");
    }
});
