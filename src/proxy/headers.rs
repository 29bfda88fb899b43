//! Header lookups on the request path.
//!
//! A head carries a handful of fields (wrk's one, a browser's eight to
//! twelve), and the path looks up a dozen names per request, most of them
//! absent. `HeaderMap` hashes the name on every lookup; for so few fields a
//! scan is cheaper, and a standard name compares as one byte. Larger maps
//! are looked up by hash as before. Where a scan stops paying was measured
//! (lookups of eight names, six of them absent, in maps of 1 to 10 fields):
//! a scan of the fields with their values costs about as much as hashing
//! at four fields and twice as much at ten; a scan of the names alone
//! (`contains`) breaks even at about nine.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Maps with more values than this are looked up by hash ...
pub(crate) const SCAN_UP_TO: usize = 4;
/// ... or, to learn whether a name is there, than this.
const SCAN_KEYS_UP_TO: usize = 8;

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
    if h.len() > SCAN_KEYS_UP_TO {
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

/// Which of the names the request path asks about are in a request's map,
/// learned in one pass over its names. The path asks a dozen questions a
/// request (`Host`, the framing, `Connection`, `traceparent`, the request
/// id, `X-Forwarded-For`, the guard's marker), each a scan of the map or a
/// hash of the name (~40-60 instructions), and most of them about a name
/// that is not there: one not seen is answered without the map. A map
/// with more than [`Seen::OF_UP_TO`] names is not looked through
/// ([`Seen::ANY`]: every question goes to the map). Whoever changes the
/// map's names afterwards learns them again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen(u16);

impl Seen {
    pub const HOST: Seen = Seen(1);
    pub const CONTENT_LENGTH: Seen = Seen(1 << 1);
    pub const TRANSFER_ENCODING: Seen = Seen(1 << 2);
    pub const CONNECTION: Seen = Seen(1 << 3);
    pub const UPGRADE: Seen = Seen(1 << 4);
    pub const TRACEPARENT: Seen = Seen(1 << 5);
    pub const X_FORWARDED_FOR: Seen = Seen(1 << 6);
    /// The configured request id header.
    pub const REQUEST_ID: Seen = Seen(1 << 7);
    /// The guard's synthetic-request marker.
    pub const MARKER: Seen = Seen(1 << 8);
    /// As if every name were there: each question goes to the map.
    pub const ANY: Seen = Seen(u16::MAX);
    /// Maps with more names than this are not looked through.
    pub const OF_UP_TO: usize = 16;

    /// What `h` holds of the names above; `request_id` is the configured
    /// request id header, when there is one.
    pub fn of(h: &HeaderMap, request_id: Option<&HeaderName>) -> Seen {
        use http::header;
        if h.keys_len() > Seen::OF_UP_TO {
            return Seen::ANY;
        }
        let mut bits = 0;
        for n in h.keys() {
            bits |= if n == header::HOST {
                Seen::HOST.0
            } else if n == header::CONTENT_LENGTH {
                Seen::CONTENT_LENGTH.0
            } else if n == header::TRANSFER_ENCODING {
                Seen::TRANSFER_ENCODING.0
            } else if n == header::CONNECTION {
                Seen::CONNECTION.0
            } else if n == header::UPGRADE {
                Seen::UPGRADE.0
            } else if n == crate::proxy::forward::TRACEPARENT {
                Seen::TRACEPARENT.0
            } else if n == crate::proxy::forward::X_FORWARDED_FOR {
                Seen::X_FORWARDED_FOR.0
            } else if n == crate::server::guard::MARKER_NAME {
                Seen::MARKER.0
            } else {
                0
            };
            if request_id.is_some_and(|r| r == n) {
                bits |= Seen::REQUEST_ID.0;
            }
        }
        Seen(bits)
    }

    /// Whether the map may hold `name` (`false`: it does not).
    #[inline]
    pub fn has(self, name: Seen) -> bool {
        self.0 & name.0 != 0
    }
}

/// The elements of a comma-separated list value (RFC 9110 §5.6.1), each
/// with the spaces around it trimmed: `v.split(',').map(str::trim)`, split
/// and trimmed as bytes. `str::split` by a `char` and `str::trim` by
/// Unicode whitespace cost ~100 instructions for a one-word `Connection:
/// close` or `Content-Length: 3`, and the request path reads such lists a
/// few times a request. `v` is a header value's text (visible ASCII and
/// tabs, as `HeaderValue::to_str` gives it), where both trims agree.
#[inline]
pub fn items(v: &str) -> impl DoubleEndedIterator<Item = &[u8]> {
    v.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// Where the pipeline puts the headers it adds to a response (`add_header`,
/// the request id, the rate-limit headers): the response's map, or, for an
/// upstream's head passed through to an HTTP/1 client, behind its lines
/// (no map insert, no value made for a number).
pub enum Added<'a> {
    Map(&'a mut HeaderMap),
    Lines(&'a mut crate::proxy::client::RawHeaders),
}

impl Added<'_> {
    /// As [`HeaderMap::append`].
    pub fn append(&mut self, name: &HeaderName, value: HeaderValue) {
        match self {
            Added::Map(m) => {
                m.append(name.clone(), value);
            }
            Added::Lines(l) => l.add(name, value.as_bytes(), false),
        }
    }

    /// As [`HeaderMap::insert`].
    pub fn insert(&mut self, name: &HeaderName, value: &HeaderValue) {
        match self {
            Added::Map(m) => {
                m.insert(name.clone(), value.clone());
            }
            Added::Lines(l) => l.add(name, value.as_bytes(), true),
        }
    }

    /// As [`HeaderMap::insert`] of a number's digits; `made` makes the value
    /// a map needs.
    pub fn insert_number(
        &mut self,
        name: &HeaderName,
        n: u64,
        made: impl FnOnce(u64) -> HeaderValue,
    ) {
        match self {
            Added::Map(m) => {
                m.insert(name.clone(), made(n));
            }
            Added::Lines(l) => l.add(name, itoa::Buffer::new().format(n).as_bytes(), true),
        }
    }
}

/// Header maps kept per thread for the next message's head: a response's
/// map, once its head is written, and a request's, once its response is
/// made, take the place of the next request's or upstream response's (two
/// allocations and their frees fewer per map; a few maps per thread, none
/// per connection).
pub mod spare {
    use std::cell::RefCell;
    use std::thread::LocalKey;

    use http::{HeaderMap, HeaderName, HeaderValue};

    /// A map with room for more than this is not kept.
    const KEEP: usize = 64;
    /// How many maps a thread keeps: enough for a burst of requests that
    /// end together (each holds two, its own and its response's), ~1 KiB
    /// each.
    const MAPS: usize = 64;
    /// The same for the gateway's own header lists of upstream requests
    /// (one per request in flight, ~70 bytes an entry) ...
    const LISTS: usize = 64;
    const KEEP_LIST: usize = 32;
    /// ... and for the header lines of responses passed through.
    const LINES: usize = 64;
    const KEEP_LINES: usize = 4096;

    /// A gateway's own header list of an upstream request.
    pub type List = Vec<(HeaderName, HeaderValue)>;

    thread_local! {
        static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
        static SPARE_LISTS: RefCell<Vec<List>> = const { RefCell::new(Vec::new()) };
        static SPARE_LINES: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    /// The last `T` a thread kept in `stack` (none while the thread is
    /// being torn down).
    pub(crate) fn pop<T: 'static>(stack: &'static LocalKey<RefCell<Vec<T>>>) -> Option<T> {
        stack.try_with(|s| s.borrow_mut().pop()).ok().flatten()
    }

    /// Keep `v` in `stack`, unless it holds `most` already.
    pub(crate) fn push<T: 'static>(stack: &'static LocalKey<RefCell<Vec<T>>>, v: T, most: usize) {
        let _ = stack.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < most {
                s.push(v);
            }
        });
    }

    /// An empty map with room for `n` values.
    pub fn take(n: usize) -> HeaderMap {
        match pop(&SPARE) {
            Some(mut m) => {
                m.reserve(n);
                m
            }
            None => HeaderMap::with_capacity(n),
        }
    }

    /// Keep `m` (cleared) for a later [`take`].
    pub fn give(mut m: HeaderMap) {
        if m.capacity() == 0 || m.capacity() > KEEP {
            return;
        }
        m.clear();
        push(&SPARE, m, MAPS);
    }

    /// An empty list with room for `n` entries.
    pub fn take_list(n: usize) -> List {
        take_vec(&SPARE_LISTS, n)
    }

    /// Keep `l` (cleared) for a later [`take_list`].
    pub fn give_list(l: List) {
        give_vec(&SPARE_LISTS, l, KEEP_LIST, LISTS);
    }

    /// An empty buffer for header lines with room for `n` bytes.
    pub fn take_lines(n: usize) -> Vec<u8> {
        take_vec(&SPARE_LINES, n)
    }

    /// Keep `l` (cleared) for a later [`take_lines`].
    pub fn give_lines(l: Vec<u8>) {
        give_vec(&SPARE_LINES, l, KEEP_LINES, LINES);
    }

    /// An empty vector from `stack` with room for `n`, else a new one.
    fn take_vec<T: 'static>(stack: &'static LocalKey<RefCell<Vec<Vec<T>>>>, n: usize) -> Vec<T> {
        match pop(stack) {
            Some(mut v) => {
                v.reserve(n);
                v
            }
            None => Vec::with_capacity(n),
        }
    }

    /// Keep `v` (cleared) in `stack`, unless it has room for more than
    /// `keep` or `stack` holds `most` already.
    fn give_vec<T: 'static>(
        stack: &'static LocalKey<RefCell<Vec<Vec<T>>>>,
        mut v: Vec<T>,
        keep: usize,
        most: usize,
    ) {
        if v.capacity() == 0 || v.capacity() > keep {
            return;
        }
        v.clear();
        push(stack, v, most);
    }
}

/// A header value as the HTTP/1 parser (`httparse`) accepted it, without
/// checking its bytes a second time. httparse takes into a value exactly
/// the bytes `HeaderValue` allows (HTAB, SP to `~`, and 0x80 and up; a
/// value ends at CR or LF, and any other control byte is an error), so
/// `HeaderValue`'s own check, a loop of ~2.5 instructions a byte (500 for
/// a 200-byte bearer token), finds nothing. Tested against that check on
/// parsed heads of random bytes (`parsed_values_are_valid_values` in
/// `server::h1` and `proxy::client`); debug builds check every value.
#[inline]
pub fn parsed_value(b: bytes::Bytes) -> HeaderValue {
    debug_assert!(
        HeaderValue::from_bytes(&b).is_ok(),
        "httparse accepted a value HeaderValue refuses: {b:?}"
    );
    unchecked_value(b)
}

/// Values of any bytes, one to three, for the parsers' tests.
#[cfg(test)]
pub(crate) fn random_values() -> impl proptest::strategy::Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(
        proptest::collection::vec(proptest::num::u8::ANY, 0..40),
        1..4,
    )
}

/// The first value of `map` that `HeaderValue`'s own check refuses.
#[cfg(test)]
pub(crate) fn invalid_value(map: &http::HeaderMap) -> Option<&HeaderValue> {
    map.values()
        .find(|v| HeaderValue::from_bytes(v.as_bytes()).is_err())
}

/// A head for the parsers' tests: `first` (the start line and any fixed
/// headers, each line ending in CRLF), an `X-V` header per value, the
/// empty line.
#[cfg(test)]
pub(crate) fn head_with_values(first: &[u8], values: &[Vec<u8>]) -> Vec<u8> {
    let mut head = first.to_vec();
    for v in values {
        head.extend_from_slice(b"X-V: ");
        head.extend_from_slice(v);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// `b` as a header value, its bytes not checked: only for bytes known to
/// be valid in one ([`parsed_value`], [`made::generated`]).
#[allow(unsafe_code)] // one call, audited here
#[inline]
fn unchecked_value(b: bytes::Bytes) -> HeaderValue {
    // SAFETY: `from_maybe_shared_unchecked` is `unsafe` only in that it
    // skips the byte check; http keeps no memory-safety invariant on a
    // value's bytes (`to_str` checks them again). Both callers pass bytes
    // that are valid in a value (see them).
    unsafe { HeaderValue::from_maybe_shared_unchecked(b) }
}

/// Header values the gateway makes per request (request ids,
/// `traceparent`) cut from a per-thread block instead of allocated one by
/// one: a value shares the block (a reference count), and a block is let
/// go when the last value cut from it is.
pub mod made {
    use std::cell::RefCell;

    use bytes::BytesMut;
    use http::HeaderValue;

    /// One block holds this many bytes of values (about 50 request ids and
    /// trace headers): one allocation per ~25 requests, and a value kept
    /// long (a log line's) keeps at most this much alive.
    const BLOCK: usize = 2048;

    thread_local! {
        static BLOCK_LEFT: RefCell<BytesMut> = RefCell::new(BytesMut::new());
    }

    /// `bytes` as a header value; `None` when they are not a valid one.
    pub fn value(bytes: &[u8]) -> Option<HeaderValue> {
        HeaderValue::from_maybe_shared(cut(bytes)).ok()
    }

    /// A value the gateway generated from hex digits, decimal digits and
    /// `-` only (request ids, `traceparent`, rate-limit numbers), cut from
    /// the block like [`value`] but not checked byte by byte: every one of
    /// those bytes is valid in a value. Debug builds check the alphabet.
    pub fn generated(bytes: &[u8]) -> HeaderValue {
        debug_assert!(
            bytes.iter().all(|b| b.is_ascii_hexdigit() || *b == b'-'),
            "not a generated value: {bytes:?}"
        );
        super::unchecked_value(cut(bytes))
    }

    /// A copy of `bytes` cut from this thread's block (a fresh allocation
    /// while the thread is being torn down).
    fn cut(bytes: &[u8]) -> bytes::Bytes {
        BLOCK_LEFT
            .try_with(|b| {
                let mut b = b.borrow_mut();
                if b.capacity() - b.len() < bytes.len() {
                    *b = BytesMut::with_capacity(BLOCK.max(bytes.len()));
                }
                b.extend_from_slice(bytes);
                b.split().freeze()
            })
            .unwrap_or_else(|_| bytes::Bytes::copy_from_slice(bytes))
    }
}

/// Header names parsed from heads, remembered per thread by position:
/// messages from one kind of peer (one upstream's responses, one client's
/// requests) carry the same names in the same order, so the name at
/// position `i` is most often the one the last head had there. A match is
/// one comparison of the bytes as received; a miss parses the name as
/// before and remembers it.
pub mod names {
    use std::cell::RefCell;

    use http::HeaderName;
    use http::header::InvalidHeaderName;

    /// Positions remembered per head kind.
    const SLOTS: usize = 16;
    /// Longer names are parsed every time.
    const LONGEST: usize = 32;

    /// Which heads: requests from clients, responses from upstreams (kept
    /// apart: they alternate on a thread and differ).
    #[derive(Clone, Copy)]
    pub enum Side {
        Request = 0,
        Response = 1,
    }

    struct Slot {
        len: u8,
        raw: [u8; LONGEST],
        name: HeaderName,
    }

    thread_local! {
        static SEEN: RefCell<[[Option<Slot>; SLOTS]; 2]> =
            const { RefCell::new([const { [const { None }; SLOTS] }; 2]) };
    }

    /// The name `raw` at position `i` of a head: the same as
    /// `HeaderName::from_bytes(raw)`.
    pub fn at(side: Side, i: usize, raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
        if i >= SLOTS || raw.len() > LONGEST {
            return HeaderName::from_bytes(raw);
        }
        SEEN.try_with(|seen| {
            let mut seen = seen.borrow_mut();
            let slot = &mut seen[side as usize][i];
            if let Some(s) = slot
                && s.raw.get(..usize::from(s.len)) == Some(raw)
            {
                return Ok(s.name.clone());
            }
            let name = HeaderName::from_bytes(raw)?;
            let mut kept = [0u8; LONGEST];
            kept[..raw.len()].copy_from_slice(raw);
            *slot = Some(Slot {
                len: raw.len() as u8,
                raw: kept,
                name: name.clone(),
            });
            Ok(name)
        })
        .unwrap_or_else(|_| HeaderName::from_bytes(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// `Seen` says a name is not there only when the map lacks it, and
        /// sees every one of its names that is.
        #[test]
        fn seen_agrees_with_the_map(
            picks in proptest::collection::vec(0usize..14, 0..20),
            with_id in proptest::bool::ANY,
        ) {
            use http::header;
            let id = HeaderName::from_static("x-correlation-id");
            let names = [
                header::HOST,
                header::CONTENT_LENGTH,
                header::TRANSFER_ENCODING,
                header::CONNECTION,
                header::UPGRADE,
                crate::proxy::forward::TRACEPARENT,
                crate::proxy::forward::X_FORWARDED_FOR,
                crate::server::guard::MARKER_NAME,
                id.clone(),
                header::ACCEPT,
                header::USER_AGENT,
                HeaderName::from_static("x-other"),
                HeaderName::from_static("traceparentx"),
                header::COOKIE,
            ];
            let mut h = HeaderMap::new();
            for &i in &picks {
                h.append(names[i].clone(), HeaderValue::from_static("v"));
            }
            let seen = Seen::of(&h, with_id.then_some(&id));
            let asked = [
                (Seen::HOST, &names[0]),
                (Seen::CONTENT_LENGTH, &names[1]),
                (Seen::TRANSFER_ENCODING, &names[2]),
                (Seen::CONNECTION, &names[3]),
                (Seen::UPGRADE, &names[4]),
                (Seen::TRACEPARENT, &names[5]),
                (Seen::X_FORWARDED_FOR, &names[6]),
                (Seen::MARKER, &names[7]),
            ];
            for (bit, name) in asked {
                if h.keys_len() <= Seen::OF_UP_TO {
                    proptest::prop_assert_eq!(seen.has(bit), h.contains_key(name), "{}", name);
                } else {
                    proptest::prop_assert!(seen.has(bit));
                }
            }
            proptest::prop_assert_eq!(seen.has(Seen::REQUEST_ID), with_id && h.contains_key(&id));
        }
    }

    /// A map of many names is not looked through: every question goes to it.
    #[test]
    fn seen_of_a_large_map_is_any() {
        let mut h = HeaderMap::new();
        for i in 0..=Seen::OF_UP_TO {
            h.append(
                HeaderName::try_from(format!("x-n{i}")).expect("a valid name"),
                HeaderValue::from_static("v"),
            );
        }
        assert_eq!(Seen::of(&h, None), Seen::ANY);
        h.remove("x-n0");
        assert_eq!(Seen::of(&h, None), Seen(0));
    }
    use http::header;

    fn map(n: usize) -> HeaderMap {
        let mut h = HeaderMap::new();
        for i in 0..n {
            h.append(
                HeaderName::try_from(format!("x-f{i}")).expect("a valid name"),
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
        for n in [
            0,
            3,
            SCAN_UP_TO,
            SCAN_UP_TO + 1,
            SCAN_KEYS_UP_TO,
            SCAN_KEYS_UP_TO + 1,
            SCAN_KEYS_UP_TO + 5,
        ] {
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

    #[test]
    fn spare_maps_come_back_empty_with_room() {
        let mut m = map(3);
        m.reserve(20);
        spare::give(m);
        let m = spare::take(2);
        assert!(m.is_empty());
        assert!(m.capacity() >= 20, "{}", m.capacity());
        // Too large to keep: a fresh one comes instead.
        let mut big = HeaderMap::new();
        big.reserve(1000);
        spare::give(big);
        assert!(spare::take(1).capacity() < 1000);
    }

    #[test]
    fn spare_lists_and_lines_come_back_empty_in_place() {
        let mut l = spare::take_list(8);
        l.push((header::HOST, HeaderValue::from_static("a")));
        let at = l.as_ptr();
        spare::give_list(l);
        let l = spare::take_list(4);
        assert!(l.is_empty());
        assert_eq!(l.as_ptr(), at);
        let mut lines = spare::take_lines(100);
        lines.extend_from_slice(b"date: x\r\n");
        let at = lines.as_ptr();
        spare::give_lines(lines);
        let lines = spare::take_lines(50);
        assert!(lines.is_empty());
        assert_eq!(lines.as_ptr(), at);
        // Too large to keep: fresh ones come instead.
        spare::give_list(Vec::with_capacity(1000));
        assert!(spare::take_list(1).capacity() < 1000);
        spare::give_lines(Vec::with_capacity(100_000));
        assert!(spare::take_lines(1).capacity() < 100_000);
    }

    proptest::proptest! {
        #[test]
        fn remembered_names_are_the_parsed_ones(
            heads in proptest::collection::vec(
                proptest::collection::vec(
                    "(Host|host|HOST|content-length|Content-Length|x-a|X-A|x-long-name-[a-z]{20,30}|[!-~]{0,6}|bad name)",
                    0..20,
                ),
                1..6,
            )
        ) {
            for (k, head) in heads.iter().enumerate() {
                let side = if k % 2 == 0 { names::Side::Request } else { names::Side::Response };
                for (i, raw) in head.iter().enumerate() {
                    let want = HeaderName::from_bytes(raw.as_bytes()).ok();
                    proptest::prop_assert_eq!(names::at(side, i, raw.as_bytes()).ok(), want);
                }
            }
        }
    }

    #[test]
    fn made_values_are_their_bytes_across_blocks() {
        let mut kept = Vec::new();
        // Enough values to fill several blocks, each a different length.
        for i in 0..500usize {
            let text = format!("id-{i:0width$}", width = i % 60);
            let v = made::value(text.as_bytes()).expect("a valid value");
            kept.push((text, v));
        }
        for (text, v) in &kept {
            assert_eq!(v.as_bytes(), text.as_bytes());
        }
        let long = "x".repeat(5000);
        assert_eq!(
            made::value(long.as_bytes()).expect("valid").as_bytes(),
            long.as_bytes()
        );
        assert!(made::value(b"bad\nvalue").is_none());
    }

    #[test]
    fn generated_values_are_valid_values() {
        let valid = |v: &HeaderValue| HeaderValue::from_bytes(v.as_bytes()).is_ok();
        for _ in 0..2000 {
            assert!(valid(&crate::proxy::forward::new_request_id_value()));
            let fresh = crate::observe::trace::TraceContext::from_header(None);
            assert!(valid(&fresh.header_value()));
            // A caller's trace continued: its ids as they came.
            let header = fresh.header();
            let continued = crate::observe::trace::TraceContext::from_header(Some(&header));
            assert!(valid(&continued.header_value()));
        }
        for n in [0, 1, 9, 10, 99, 12_345, u64::from(u32::MAX), u64::MAX] {
            let digits = n.to_string();
            let v = made::generated(digits.as_bytes());
            assert!(valid(&v));
            assert_eq!(v.as_bytes(), digits.as_bytes());
        }
    }

    proptest::proptest! {
        /// `items` is `split(',')` and `trim` for any text a value gives.
        #[test]
        fn list_items_are_split_and_trimmed_as_str_does(
            v in proptest::collection::vec(
                proptest::sample::select(&[b'a', b'Z', b'0', b',', b' ', b'\t', b'-', b';', b'='][..]),
                0..24,
            )
        ) {
            let v = String::from_utf8(v).expect("ASCII");
            let want: Vec<&[u8]> = v.split(',').map(|t| t.trim().as_bytes()).collect();
            let got: Vec<&[u8]> = items(&v).collect();
            proptest::prop_assert_eq!(&got, &want);
            let back: Vec<&[u8]> = items(&v).rev().collect();
            let mut want_back = want.clone();
            want_back.reverse();
            proptest::prop_assert_eq!(back, want_back);
        }
    }
}
