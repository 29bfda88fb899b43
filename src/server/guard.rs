//! The connection guard: a strict HTTP/1 framing check on the raw bytes,
//! below the HTTP/1 parser.
//!
//! (Below, "hyper" is the HTTP/1 server above the guard: tollgate's own
//! connection, [`super::h1`]. It parses with `httparse`, as hyper does,
//! and shares the leniencies described here; it reads the guard through
//! `AsyncRead` as hyper did, so everything below holds for it. A
//! connection that starts with the h2 preface is handed to hyper's
//! HTTP/2 after the guard switched to pass-through.)
//!
//! Place in the pipeline: the accept loop wraps every TCP stream in a
//! [`Guard`] before handing it to hyper, and serves requests through
//! [`serve`]. hyper is lenient where a gateway must not be (RFC 9112 §6.1,
//! §11.2): it drops `Content-Length` when `Transfer-Encoding` is present,
//! merges identical `Content-Length` lines, accepts bare-LF line ends, and
//! the `http` crate silently drops a `#fragment`. Once parsed, those signals
//! are gone, so they are checked here, on the bytes, before hyper sees them.
//!
//! # Design
//!
//! The guard is a byte-at-a-time state machine ([`Scanner`]) over the
//! request stream, fed with the bytes *as hyper reads them*, in hyper's own
//! buffer: a read is done straight into hyper's `ReadBuf` and scanned in
//! place; nothing is copied while heads arrive whole (the common case, and
//! bodies are skipped by length, never looked at byte by byte except for
//! chunk-size lines). To know where the next head starts after a body, the
//! scanner follows the framing the head announced — `Content-Length` bytes,
//! or a chunked body through its chunk-size lines, data, last chunk and
//! trailers — which is exactly the framing hyper uses, because the guard
//! only lets through heads whose framing is unambiguous (one
//! `Content-Length`, or `Transfer-Encoding: chunked` alone).
//!
//! Most heads need none of the byte steps' attention: a head that is all
//! here, with an origin-form target and no field but plain ones and at
//! most one plain `Content-Length`, is checked in one pass over its lines
//! (`Scanner::plain_head`, eight bytes at a time through targets and
//! values); any other head, or one that is not all here, is stepped byte
//! by byte. A property test holds the two to the same decisions.
//!
//! The one invariant: **hyper never sees a byte of a head until the whole
//! head has arrived and passed.** A read that ends inside a head moves that
//! partial head out of hyper's buffer into the guard's stash (the only
//! copy, bounded by the head limit) and the rest of the head is read into
//! the stash. So when a head fails, everything before it has been handed
//! to hyper and nothing of it has: the guard drops it and everything after
//! it, and hands hyper instead a synthetic, well-formed request carrying a
//! marker header, followed by end-of-stream. hyper answers the requests
//! before it in order and then calls the service with the synthetic one;
//! [`serve`] recognises it (the marker *and* the per-connection flag that
//! only the guard sets, so a client cannot forge it) and answers with the
//! guard's status as the gateway's JSON error and `Connection: close`.
//! Pipelined responses stay in order and the connection is closed after
//! the error, without the rejected request ever reaching the router.
//!
//! Rejected (400): `Content-Length` with `Transfer-Encoding`; more than one
//! `Content-Length` line (even identical) or a value that is not digits;
//! `Transfer-Encoding` other than exactly `chunked` on one line; `TE` on
//! HTTP/1.0; bare LF; a CR not followed by LF; obs-fold; NUL, CR or other
//! controls in a header value; a space before the colon; a `#`, a control
//! or a non-ASCII byte in the request target; a target that is neither
//! origin-form nor absolute-form (`*`, authority-form, `CONNECT`); a
//! version other than HTTP/1.0 and HTTP/1.1. A request line longer than
//! `min(8 KiB, client_max_header_size)` is a 414; a head longer than
//! `client_max_header_size` or with more than 100 fields (hyper's own
//! maximum) is a 431. A malformed chunked body (bad size, extension or
//! CRLF) ends the connection with a read error after the bytes before it:
//! hyper's body fails, and the handler answers 400 when that was the first
//! frame or aborts the upstream request after it.
//!
//! # Upgrades and HTTP/2
//!
//! The guard steps aside for bytes that are not HTTP/1 requests: at the
//! start of a connection the h2 preface switches it to pass-through (h2c
//! with prior knowledge has its own framing, checked by h2); after a request
//! that hyper may upgrade (HTTP/1.1 with an `Upgrade` header) it delivers
//! nothing more until [`serve`] reports the response: a 101 switches to
//! pass-through (the tunnel), anything else resumes scanning.
//!
//! # Timeouts
//!
//! Because partial heads are withheld, hyper cannot time them out, so the
//! guard keeps the client timeouts of the connection: `client_header_timeout`
//! for the whole head (from the accept for the first request, from its first
//! byte for the next ones), `keepalive_timeout` while the connection waits
//! for a next request after a response, and — only as a backstop for bodies
//! nobody reads — `client_body_timeout` plus one second between body bytes
//! (the handler's own `client_body_timeout` answers 408 first). A head or
//! idle timeout is an end-of-stream for hyper, so the connection is closed
//! without a response, as NGINX does.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::proxy::body::RequestBody;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::config::model::ClientLimits;
use crate::proxy::forward::{
    Body, ConnInfo, Shared, error_response, handle, header_text, logged_refusal,
    new_request_id_value,
};

/// The HTTP/2 connection preface (h2c with prior knowledge).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest request line when `client_max_header_size` is larger.
const MAX_REQUEST_LINE: usize = 8 * 1024;
/// hyper's default maximum number of header fields.
const MAX_HEADERS: u32 = 100;
/// The longest chunk extension accepted on one chunk-size line.
const MAX_CHUNK_EXT: u32 = 4096;
/// The header that marks the guard's synthetic request (see the module doc).
const MARKER: &str = "x-tollgate-guard-reject";
/// [`MARKER`] as a name (a lookup by text parses the name each time).
pub(crate) const MARKER_NAME: header::HeaderName = header::HeaderName::from_static(MARKER);
/// What hyper reads instead of a rejected head.
const SYNTHETIC: &[u8] = b"GET / HTTP/1.1\r\nhost: guard.invalid\r\nconnection: close\r\nx-tollgate-guard-reject: 1\r\n\r\n";
/// A partial head up to this size is put back into hyper's buffer and the
/// next read goes straight after it; a larger one is read into the stash.
const SMALL_PARTIAL: usize = 1024;
/// How much the stash grows by per read while a head is incomplete.
const STASH_READ: usize = 2048;

/// The limits the guard enforces, from the listener's [`ClientLimits`].
#[derive(Debug, Clone, Copy)]
pub struct GuardLimits {
    pub request_line: usize,
    pub head: usize,
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub body_backstop: Duration,
}

impl GuardLimits {
    pub fn new(l: &ClientLimits) -> GuardLimits {
        let head = usize::try_from(l.max_header_size)
            .unwrap_or(usize::MAX)
            .max(1);
        GuardLimits {
            request_line: head.min(MAX_REQUEST_LINE),
            head,
            header_timeout: l.header_timeout,
            keepalive_timeout: l.keepalive_timeout,
            body_backstop: l.body_timeout + Duration::from_secs(1),
        }
    }
}

// ---------------------------------------------------------------------------
// The scanner: a pure state machine over the request byte stream.
// ---------------------------------------------------------------------------

/// Why the scanner stopped before the end of what it was fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The head that started at [`Scanner::committed`] is rejected with
    /// this status; nothing from there on may reach hyper.
    Reject(u16),
    /// A request hyper may upgrade ended here; wait for its response.
    Upgrade,
    /// The h2 preface: everything from here on is not HTTP/1.
    Pass,
    /// A malformed chunked body at [`Scanner::committed`].
    BodyError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Matching the h2 preface at the start of the connection.
    Preface(u8),
    /// Between messages.
    Idle,
    /// A CR of an empty line before a request line.
    IdleLf,
    Method,
    Target,
    /// Index into `HTTP/1.` then the minor digit.
    Version(u8),
    VersionCr,
    /// The LF ending the request line or a header line.
    LineLf,
    /// The start of a header line (or the empty line).
    LineStart,
    /// The LF of the empty line ending the head.
    EndLf,
    Name,
    ValueLead,
    Value,
    Body(u64),
    ChunkSize,
    ChunkSizeWs,
    ChunkExt,
    ChunkSizeLf,
    ChunkData(u64),
    ChunkDataCr,
    ChunkDataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    TrailerEndLf,
    /// Stopped for good (a rejection, a body error, or pass-through).
    Done,
}

/// Which header's value is being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Other,
    ContentLength,
    TransferEncoding,
    Upgrade,
    Marker,
}

/// What the current head has said so far.
#[derive(Debug, Clone, Copy, Default)]
struct Head {
    line_len: usize,
    len: usize,
    headers: u32,
    http11: bool,
    method: [u8; 8],
    method_len: u8,
    target: [u8; 16],
    target_len: usize,
    name: [u8; 24],
    name_len: usize,
    cl_count: u8,
    cl: u64,
    cl_digits: u8,
    cl_trailing: bool,
    te_count: u8,
    te: [u8; 8],
    te_len: usize,
    te_trim: usize,
    upgrade: bool,
}

/// The request-stream state machine (see the module doc). It knows nothing
/// about I/O: [`Scanner::feed`] takes bytes and says how far it got.
#[derive(Debug, Clone)]
pub struct Scanner {
    st: St,
    field: Field,
    head: Head,
    /// Absolute stream offset of the next byte to scan.
    offset: u64,
    /// Absolute offset where the head in progress started.
    head_start: Option<u64>,
    chunk: u64,
    chunk_digits: u8,
    chunk_ext: u32,
    trailer_len: usize,
    upgrade_after: bool,
    limits: GuardLimits,
}

/// RFC 9110 token characters, as a table (the scanner's hottest test).
const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        i += 1;
    }
    t
};

#[inline]
fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// A field-value byte (RFC 9110 §5.5): VCHAR, obs-text, SP, HTAB.
#[inline]
fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

/// A byte of a run [`plain_run`] counts: of a field value, any but the
/// controls and DEL (a tab is valid but stepped alone); of a request
/// target, visible ASCII but `#`.
#[inline]
fn plain(b: u8, value: bool) -> bool {
    if value {
        b >= 0x20 && b != 0x7f
    } else {
        (0x21..=0x7e).contains(&b) && b != b'#'
    }
}

/// How many bytes at the start of `data` are [`plain`], looked at sixteen
/// at a time ([`plain_blocks`]), then eight (a long `Authorization` value
/// or target cost ~9 instructions a byte one by one, ~1.8 eight at a
/// time). In each 64-bit word, a mask marks the bytes that end the run;
/// the lowest marked byte is exact (a borrow from a marked byte can only
/// mark bytes above it), so it is the run's end.
fn plain_run(data: &[u8], value: bool) -> usize {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // Bytes below `n` (n <= 0x80), and bytes equal to `c`.
    let below = |x: u64, n: u8| x.wrapping_sub(LO * u64::from(n)) & !x & HI;
    let equal = |x: u64, c: u8| {
        let v = x ^ (LO * u64::from(c));
        v.wrapping_sub(LO) & !v & HI
    };
    let mut i = match plain_blocks(data, value) {
        Ok(i) => i,
        Err(end) => return end,
    };
    while let Some(word) = data.get(i..i + 8) {
        let Ok(word) = <[u8; 8]>::try_from(word) else {
            break;
        };
        let x = u64::from_le_bytes(word);
        let end = if value {
            below(x, 0x20) | equal(x, 0x7f)
        } else {
            below(x, 0x21) | (x & HI) | equal(x, 0x7f) | equal(x, b'#')
        };
        if end != 0 {
            return i + (end.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    let tail = data.get(i..).unwrap_or_default();
    i + tail
        .iter()
        .position(|&b| !plain(b, value))
        .unwrap_or(tail.len())
}

/// [`plain_run`] over whole 16-byte blocks, with SSE2 (part of every
/// x86-64 CPU): `Err` with the run's end when a block holds a byte that is
/// not [`plain`], else `Ok` with where the blocks stopped (fewer than 16
/// bytes left). Each block is three or four compares and a mask.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // unaligned loads from inside a slice, audited here
#[inline]
fn plain_blocks(data: &[u8], value: bool) -> Result<usize, usize> {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_max_epu8, _mm_min_epu8, _mm_movemask_epi8,
        _mm_or_si128, _mm_set1_epi8,
    };
    let mut i = 0;
    while let Some(block) = data.get(i..i + 16) {
        // SAFETY: `block` is 16 bytes of `data`; `_mm_loadu_si128` reads
        // exactly 16 bytes and needs no alignment. The other intrinsics
        // only compute on registers (SSE2 is baseline on x86-64).
        let end = unsafe {
            let x = _mm_loadu_si128(block.as_ptr().cast());
            // Unsigned: x <= n exactly where max(x, n) == n, x >= n where
            // min(x, n) == n.
            let at_most = |n: u8| {
                _mm_cmpeq_epi8(
                    _mm_max_epu8(x, _mm_set1_epi8(n as i8)),
                    _mm_set1_epi8(n as i8),
                )
            };
            let equal = |c: u8| _mm_cmpeq_epi8(x, _mm_set1_epi8(c as i8));
            let end = if value {
                // Controls, and DEL.
                _mm_or_si128(at_most(0x1f), equal(0x7f))
            } else {
                // Controls and space, DEL and above, and `#`.
                let high =
                    _mm_cmpeq_epi8(_mm_min_epu8(x, _mm_set1_epi8(0x7f)), _mm_set1_epi8(0x7f));
                _mm_or_si128(_mm_or_si128(at_most(0x20), high), equal(b'#'))
            };
            _mm_movemask_epi8(end) as u32
        };
        if end != 0 {
            return Err(i + end.trailing_zeros() as usize);
        }
        i += 16;
    }
    Ok(i)
}

/// Elsewhere the eight-byte words do it all.
#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn plain_blocks(_data: &[u8], _value: bool) -> Result<usize, usize> {
    Ok(0)
}

#[inline]
fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

impl Scanner {
    pub fn new(limits: GuardLimits) -> Scanner {
        Scanner {
            st: St::Preface(0),
            field: Field::Other,
            head: Head::default(),
            offset: 0,
            head_start: Some(0),
            chunk: 0,
            chunk_digits: 0,
            chunk_ext: 0,
            trailer_len: 0,
            upgrade_after: false,
            limits,
        }
    }

    /// Bytes before this absolute offset may be handed to hyper: the start
    /// of the head in progress, else everything scanned.
    pub fn committed(&self) -> u64 {
        self.head_start.unwrap_or(self.offset)
    }

    /// Whether a head (or the h2 preface) is being received.
    pub fn in_head(&self) -> bool {
        self.head_start.is_some()
    }

    /// Whether the scanner is inside a request body.
    fn in_body(&self) -> bool {
        !self.in_head() && !matches!(self.st, St::Idle | St::Done)
    }

    /// Scan `data`; returns how many bytes were consumed and why it stopped
    /// early, if it did. After [`Stop::Upgrade`] scanning may resume with
    /// the next byte; after the other stops the scanner is done.
    pub fn feed(&mut self, data: &[u8]) -> (usize, Option<Stop>) {
        let mut i = 0;
        while i < data.len() {
            match self.st {
                St::Done => return (i, None),
                // A whole head at once, when it is plain (see `plain_head`);
                // otherwise its bytes are stepped below.
                St::Idle | St::Preface(0)
                    if (self.st == St::Idle && self.head_start.is_none())
                        || (self.st == St::Preface(0)
                            && !H2_PREFACE.starts_with(&data[i..data.len().min(i + 3)])) =>
                {
                    if let Some((n, length)) = self.plain_head(&data[i..]) {
                        // Where stepping its bytes would have left the scanner.
                        self.head_start = None;
                        self.upgrade_after = false;
                        self.st = if length > 0 {
                            St::Body(length)
                        } else {
                            St::Idle
                        };
                        i += n;
                        self.offset += n as u64;
                        continue;
                    }
                    if let Some(r) = self.step_byte(data[i], &mut i) {
                        return r;
                    }
                }
                St::Body(rem) | St::ChunkData(rem) => {
                    let n = rem.min((data.len() - i) as u64);
                    i += n as usize;
                    self.offset += n;
                    let rem = rem - n;
                    if rem == 0 {
                        if matches!(self.st, St::Body(_)) {
                            if let Some(s) = self.message_end() {
                                return (i, Some(s));
                            }
                        } else {
                            self.st = St::ChunkDataCr;
                        }
                    } else {
                        self.st = match self.st {
                            St::Body(_) => St::Body(rem),
                            _ => St::ChunkData(rem),
                        };
                    }
                }
                // `HTTP/1.1` or `HTTP/1.0` whole, when it fits the limits.
                St::Version(0)
                    if data.len() - i >= 8
                        && data[i..i + 7] == *b"HTTP/1."
                        && matches!(data[i + 7], b'0' | b'1')
                        && self.head.len + 8 <= self.limits.head
                        && self.head.line_len + 8 <= self.limits.request_line =>
                {
                    self.head.http11 = data[i + 7] == b'1';
                    self.head.len += 8;
                    self.head.line_len += 8;
                    self.st = St::VersionCr;
                    i += 8;
                    self.offset += 8;
                }
                // The rest of a method (its first byte was stepped).
                St::Method => {
                    let k = self.token_run(&data[i..], true, Scanner::push_method);
                    if k > 0 {
                        i += k;
                        continue;
                    }
                    if let Some(r) = self.step_byte(data[i], &mut i) {
                        return r;
                    }
                }
                // Blanks before a value of no interest.
                St::ValueLead
                    if self.field == Field::Other
                        && matches!(data[i], b' ' | b'\t')
                        && self.head.len < self.limits.head =>
                {
                    self.head.len += 1;
                    i += 1;
                    self.offset += 1;
                }
                // A value of no interest starts like its run goes on.
                St::ValueLead
                    if self.field == Field::Other
                        && data[i] != b'\r'
                        && is_value_byte(data[i])
                        && self.head.len < self.limits.head =>
                {
                    self.st = St::Value;
                }
                // Runs of plain bytes in a header value or a target are
                // counted, not stepped through one by one (the target's
                // first bytes are kept to check its form).
                St::Value | St::Target
                    if (self.st == St::Value && self.field == Field::Other)
                        || self.st == St::Target =>
                {
                    let value = self.st == St::Value;
                    let mut room = self.limits.head.saturating_sub(self.head.len);
                    if !value {
                        room =
                            room.min(self.limits.request_line.saturating_sub(self.head.line_len));
                    }
                    let rest = &data[i..data.len().min(i.saturating_add(room))];
                    let k = plain_run(rest, value);
                    if k > 0 {
                        self.head.len += k;
                        if !value {
                            let keep = self.head.target.len().saturating_sub(self.head.target_len);
                            let copy = keep.min(k);
                            if copy > 0 {
                                let at = self.head.target_len;
                                self.head.target[at..at + copy].copy_from_slice(&rest[..copy]);
                            }
                            self.head.line_len += k;
                            self.head.target_len += k;
                        }
                        i += k;
                        self.offset += k as u64;
                        continue;
                    }
                    // The byte that ends the run (or goes over a limit).
                    if let Some(r) = self.step_byte(data[i], &mut i) {
                        return r;
                    }
                }
                // The rest of a field name (its first byte was stepped).
                St::Name => {
                    let k = self.token_run(&data[i..], false, Scanner::push_name);
                    if k > 0 {
                        i += k;
                        continue;
                    }
                    if let Some(r) = self.step_byte(data[i], &mut i) {
                        return r;
                    }
                }
                _ => {
                    if let Some(r) = self.step_byte(data[i], &mut i) {
                        return r;
                    }
                }
            }
        }
        (i, None)
    }

    /// A whole head at the start of `data` that the byte steps would pass
    /// without a second look, checked in one pass: an origin-form target,
    /// HTTP/1.1 or 1.0, fields that are neither `Transfer-Encoding`,
    /// `Upgrade` nor the guard's marker, at most one plain
    /// `Content-Length`, within every limit. Its length and the body length
    /// it announces; `None` (nothing decided) for any other head, or a head
    /// not all here yet: its bytes are then stepped one by one.
    fn plain_head(&self, data: &[u8]) -> Option<(usize, u64)> {
        let m = data.iter().position(|&b| !is_tchar(b))?;
        if m == 0 || data[m] != b' ' || &data[..m] == b"CONNECT" {
            return None;
        }
        let target = m + 1;
        if data.get(target) != Some(&b'/') {
            return None;
        }
        let t = plain_run(&data[target..], false);
        let version = target + t + 1;
        if data.get(target + t) != Some(&b' ') {
            return None;
        }
        match data.get(version..version + 10)? {
            b"HTTP/1.1\r\n" | b"HTTP/1.0\r\n" => {}
            _ => return None,
        }
        // The request line with its CR, as the steps count it.
        if version + 9 > self.limits.request_line {
            return None;
        }
        let mut at = version + 10;
        let mut fields = 0u32;
        let mut length: Option<u64> = None;
        loop {
            if data.get(at)? == &b'\r' {
                if data.get(at + 1)? != &b'\n' {
                    return None;
                }
                at += 2;
                break;
            }
            let n = data[at..].iter().position(|&b| !is_tchar(b))?;
            if n == 0 || data[at + n] != b':' {
                return None;
            }
            fields += 1;
            if fields > MAX_HEADERS {
                return None;
            }
            let name = &data[at..at + n];
            let content_length = name.eq_ignore_ascii_case(b"content-length");
            if name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"upgrade")
                || name.eq_ignore_ascii_case(MARKER.as_bytes())
            {
                return None;
            }
            let mut v = at + n + 1;
            if content_length {
                if length.is_some() {
                    return None;
                }
                while matches!(data.get(v)?, b' ' | b'\t') {
                    v += 1;
                }
                let digits = data[v..].iter().position(|b| !b.is_ascii_digit())?;
                if digits == 0 {
                    return None;
                }
                let mut cl = 0u64;
                for &d in &data[v..v + digits] {
                    cl = cl.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
                }
                length = Some(cl);
                v += digits;
                while matches!(data.get(v)?, b' ' | b'\t') {
                    v += 1;
                }
            } else {
                loop {
                    v += plain_run(&data[v..], true);
                    match data.get(v)? {
                        b'\t' => v += 1,
                        _ => break,
                    }
                }
            }
            if data.get(v..v + 2)? != b"\r\n" {
                return None;
            }
            at = v + 2;
        }
        if at > self.limits.head {
            return None;
        }
        Some((at, length.unwrap_or(0)))
    }

    /// The token bytes at the start of `data` that fit the head's limits
    /// (and the request line's, `in_line`), each given to `push` and
    /// counted; how many.
    fn token_run(&mut self, data: &[u8], in_line: bool, push: fn(&mut Scanner, u8)) -> usize {
        let mut room = self.limits.head.saturating_sub(self.head.len);
        if in_line {
            room = room.min(self.limits.request_line.saturating_sub(self.head.line_len));
        }
        let rest = &data[..data.len().min(room)];
        let k = rest
            .iter()
            .position(|&b| !is_tchar(b))
            .unwrap_or(rest.len());
        for &b in &rest[..k] {
            push(self, b);
        }
        self.head.len += k;
        if in_line {
            self.head.line_len += k;
        }
        self.offset += k as u64;
        k
    }

    /// One byte through [`Scanner::step`]; `Some` when the feed stops.
    #[inline]
    fn step_byte(&mut self, b: u8, i: &mut usize) -> Option<(usize, Option<Stop>)> {
        match self.step(b) {
            Ok(None) => {
                *i += 1;
                self.offset += 1;
                None
            }
            Ok(Some(Stop::Upgrade)) => {
                *i += 1;
                self.offset += 1;
                Some((*i, Some(Stop::Upgrade)))
            }
            Ok(Some(Stop::Pass)) => {
                *i += 1;
                self.offset += 1;
                self.st = St::Done;
                self.head_start = None;
                Some((*i, Some(Stop::Pass)))
            }
            Ok(Some(s)) | Err(s) => {
                self.st = St::Done;
                if s == Stop::BodyError {
                    self.head_start = None;
                }
                Some((*i, Some(s)))
            }
        }
    }

    fn begin_head(&mut self) {
        self.head = Head::default();
        self.head_start = Some(self.offset);
    }

    /// The end of a message: what follows is the next head.
    fn message_end(&mut self) -> Option<Stop> {
        self.st = St::Idle;
        if std::mem::take(&mut self.upgrade_after) {
            return Some(Stop::Upgrade);
        }
        None
    }

    /// One byte of a head, chunk line or trailer.
    fn step(&mut self, b: u8) -> Result<Option<Stop>, Stop> {
        if self.head_start.is_some() {
            self.head.len += 1;
            if self.head.len > self.limits.head {
                let in_line = matches!(
                    self.st,
                    St::Idle
                        | St::IdleLf
                        | St::Method
                        | St::Target
                        | St::Version(_)
                        | St::VersionCr
                );
                return Err(Stop::Reject(if in_line { 414 } else { 431 }));
            }
            if matches!(
                self.st,
                St::Method | St::Target | St::Version(_) | St::VersionCr
            ) {
                self.head.line_len += 1;
                if self.head.line_len > self.limits.request_line {
                    return Err(Stop::Reject(414));
                }
            }
        }
        match self.st {
            St::Preface(n) => {
                let n = usize::from(n);
                if b == H2_PREFACE[n] {
                    if n + 1 == H2_PREFACE.len() {
                        return Ok(Some(Stop::Pass));
                    }
                    self.st = St::Preface((n + 1) as u8);
                    return Ok(None);
                }
                // Not h2: scan what matched as HTTP/1, then this byte.
                self.st = St::Idle;
                self.head = Head::default();
                for &p in H2_PREFACE[..n].iter().chain(std::iter::once(&b)) {
                    self.head.len += 1;
                    if matches!(self.st, St::Method | St::Target | St::Version(_)) {
                        self.head.line_len += 1;
                    }
                    if let Err(s) = self.step_h1(p) {
                        return Self::upgrade_is_ok(s);
                    }
                }
                Ok(None)
            }
            _ => match self.step_h1(b) {
                Ok(()) => Ok(None),
                Err(s) => Self::upgrade_is_ok(s),
            },
        }
    }

    /// `step_h1` reports the end of an upgradable request as an `Err`.
    fn upgrade_is_ok(s: Stop) -> Result<Option<Stop>, Stop> {
        match s {
            Stop::Upgrade => Ok(Some(Stop::Upgrade)),
            s => Err(s),
        }
    }

    fn step_h1(&mut self, b: u8) -> Result<(), Stop> {
        let bad = Stop::Reject(400);
        match self.st {
            St::Preface(_) | St::Done | St::Body(_) | St::ChunkData(_) => return Err(bad),
            St::Idle => {
                if self.head_start.is_none() {
                    self.begin_head();
                    self.head.len = 1;
                }
                match b {
                    b'\r' => self.st = St::IdleLf,
                    _ if is_tchar(b) => {
                        self.st = St::Method;
                        self.head.line_len = 1;
                        self.push_method(b);
                    }
                    _ => return Err(bad),
                }
            }
            St::IdleLf => {
                if b != b'\n' {
                    return Err(bad);
                }
                self.st = St::Idle;
            }
            St::Method => match b {
                b' ' => {
                    if &self.head.method[..usize::from(self.head.method_len)] == b"CONNECT" {
                        return Err(bad);
                    }
                    self.st = St::Target;
                }
                _ if is_tchar(b) => self.push_method(b),
                _ => return Err(bad),
            },
            St::Target => match b {
                b' ' => {
                    if self.head.target_len == 0 || !self.target_form_ok() {
                        return Err(bad);
                    }
                    self.st = St::Version(0);
                }
                b'#' => return Err(bad),
                0x21..=0x7e => {
                    if self.head.target_len < self.head.target.len() {
                        self.head.target[self.head.target_len] = b;
                    }
                    self.head.target_len += 1;
                }
                _ => return Err(bad),
            },
            St::Version(n) => {
                const V: &[u8; 7] = b"HTTP/1.";
                let n = usize::from(n);
                if n < V.len() {
                    if b != V[n] {
                        return Err(bad);
                    }
                    self.st = St::Version((n + 1) as u8);
                } else {
                    match b {
                        b'1' => self.head.http11 = true,
                        b'0' => self.head.http11 = false,
                        _ => return Err(bad),
                    }
                    self.st = St::VersionCr;
                }
            }
            St::VersionCr => {
                if b != b'\r' {
                    return Err(bad);
                }
                self.st = St::LineLf;
            }
            St::LineLf => {
                if b != b'\n' {
                    return Err(bad);
                }
                self.st = St::LineStart;
            }
            St::LineStart => match b {
                b'\r' => self.st = St::EndLf,
                _ if is_tchar(b) => {
                    self.head.headers += 1;
                    if self.head.headers > MAX_HEADERS {
                        return Err(Stop::Reject(431));
                    }
                    self.head.name_len = 0;
                    self.push_name(b);
                    self.st = St::Name;
                }
                // obs-fold, bare LF, or a line that is no field.
                _ => return Err(bad),
            },
            St::Name => match b {
                b':' => {
                    self.field = self.field_kind();
                    match self.field {
                        Field::Marker => return Err(bad),
                        Field::ContentLength => {
                            self.head.cl_count += 1;
                            if self.head.cl_count > 1 {
                                return Err(bad);
                            }
                        }
                        Field::TransferEncoding => {
                            self.head.te_count += 1;
                            if self.head.te_count > 1 || !self.head.http11 {
                                return Err(bad);
                            }
                        }
                        Field::Upgrade => self.head.upgrade = true,
                        Field::Other => {}
                    }
                    self.st = St::ValueLead;
                }
                _ if is_tchar(b) => self.push_name(b),
                _ => return Err(bad),
            },
            St::ValueLead | St::Value => match b {
                b'\r' => {
                    self.end_field()?;
                    self.st = St::LineLf;
                }
                b' ' | b'\t' if self.st == St::ValueLead => {}
                _ if is_value_byte(b) => {
                    self.st = St::Value;
                    self.value_byte(b)?;
                }
                _ => return Err(bad),
            },
            St::EndLf => {
                if b != b'\n' {
                    return Err(bad);
                }
                return self.head_end();
            }
            St::ChunkSize => match (hex(b), b) {
                (Some(d), _) => {
                    self.chunk_digits = self.chunk_digits.saturating_add(1);
                    self.chunk = self
                        .chunk
                        .checked_mul(16)
                        .and_then(|c| c.checked_add(d))
                        .ok_or(Stop::BodyError)?;
                }
                (None, b';') if self.chunk_digits > 0 => self.st = St::ChunkExt,
                (None, b' ' | b'\t') if self.chunk_digits > 0 => self.st = St::ChunkSizeWs,
                (None, b'\r') if self.chunk_digits > 0 => self.st = St::ChunkSizeLf,
                _ => return Err(Stop::BodyError),
            },
            St::ChunkSizeWs => match b {
                b' ' | b'\t' => {}
                b';' => self.st = St::ChunkExt,
                _ => return Err(Stop::BodyError),
            },
            St::ChunkExt => {
                self.chunk_ext += 1;
                if self.chunk_ext > MAX_CHUNK_EXT {
                    return Err(Stop::BodyError);
                }
                match b {
                    b'\r' => self.st = St::ChunkSizeLf,
                    _ if is_value_byte(b) => {}
                    _ => return Err(Stop::BodyError),
                }
            }
            St::ChunkSizeLf => {
                if b != b'\n' {
                    return Err(Stop::BodyError);
                }
                self.st = if self.chunk == 0 {
                    self.trailer_len = 0;
                    St::TrailerStart
                } else {
                    St::ChunkData(self.chunk)
                };
            }
            St::ChunkDataCr => {
                if b != b'\r' {
                    return Err(Stop::BodyError);
                }
                self.st = St::ChunkDataLf;
            }
            St::ChunkDataLf => {
                if b != b'\n' {
                    return Err(Stop::BodyError);
                }
                self.start_chunk();
            }
            St::TrailerStart | St::TrailerLine | St::TrailerLf | St::TrailerEndLf => {
                self.trailer_len += 1;
                if self.trailer_len > self.limits.head {
                    return Err(Stop::BodyError);
                }
                match (self.st, b) {
                    (St::TrailerStart, b'\r') => self.st = St::TrailerEndLf,
                    (St::TrailerStart, _) if is_tchar(b) => self.st = St::TrailerLine,
                    (St::TrailerLine, b'\r') => self.st = St::TrailerLf,
                    (St::TrailerLine, _) if is_value_byte(b) => {}
                    (St::TrailerLf, b'\n') => self.st = St::TrailerStart,
                    (St::TrailerEndLf, b'\n') => {
                        if let Some(s) = self.message_end() {
                            return Err(s);
                        }
                    }
                    _ => return Err(Stop::BodyError),
                }
            }
        }
        Ok(())
    }

    fn push_method(&mut self, b: u8) {
        let n = usize::from(self.head.method_len);
        if n < self.head.method.len() {
            self.head.method[n] = b;
            self.head.method_len += 1;
        }
    }

    fn push_name(&mut self, b: u8) {
        if self.head.name_len < self.head.name.len() {
            self.head.name[self.head.name_len] = b.to_ascii_lowercase();
        }
        self.head.name_len += 1;
    }

    fn field_kind(&self) -> Field {
        if self.head.name_len > self.head.name.len() {
            return Field::Other;
        }
        match &self.head.name[..self.head.name_len] {
            b"content-length" => Field::ContentLength,
            b"transfer-encoding" => Field::TransferEncoding,
            b"upgrade" => Field::Upgrade,
            n if n == MARKER.as_bytes() => Field::Marker,
            _ => Field::Other,
        }
    }

    /// Origin-form (`/...`) or absolute-form (`scheme://...`).
    fn target_form_ok(&self) -> bool {
        let n = self.head.target_len.min(self.head.target.len());
        let t = &self.head.target[..n];
        if t.first() == Some(&b'/') {
            return true;
        }
        let Some(colon) = t.iter().position(|&b| b == b':') else {
            return false;
        };
        colon > 0
            && t[0].is_ascii_alphabetic()
            && t[..colon]
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
            && t[colon..].starts_with(b"://")
    }

    fn value_byte(&mut self, b: u8) -> Result<(), Stop> {
        let bad = Stop::Reject(400);
        match self.field {
            Field::ContentLength => match b {
                b'0'..=b'9' if !self.head.cl_trailing => {
                    self.head.cl_digits = self.head.cl_digits.saturating_add(1);
                    self.head.cl = self
                        .head
                        .cl
                        .checked_mul(10)
                        .and_then(|c| c.checked_add(u64::from(b - b'0')))
                        .ok_or(bad)?;
                }
                b' ' | b'\t' => self.head.cl_trailing = true,
                _ => return Err(bad),
            },
            Field::TransferEncoding => {
                if self.head.te_len < self.head.te.len() {
                    self.head.te[self.head.te_len] = b.to_ascii_lowercase();
                }
                self.head.te_len += 1;
                if b != b' ' && b != b'\t' {
                    self.head.te_trim = self.head.te_len;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn end_field(&mut self) -> Result<(), Stop> {
        let bad = Stop::Reject(400);
        match self.field {
            Field::ContentLength if self.head.cl_digits == 0 => Err(bad),
            Field::TransferEncoding
                if self.head.te_trim > self.head.te.len()
                    || &self.head.te[..self.head.te_trim] != b"chunked" =>
            {
                Err(bad)
            }
            _ => Ok(()),
        }
    }

    /// The empty line: the head is complete and its framing decided.
    fn head_end(&mut self) -> Result<(), Stop> {
        let h = self.head;
        if h.cl_count > 0 && h.te_count > 0 {
            return Err(Stop::Reject(400));
        }
        self.head_start = None;
        self.upgrade_after = h.upgrade && h.http11;
        if h.te_count == 1 {
            self.start_chunk();
            Ok(())
        } else if h.cl_count == 1 && h.cl > 0 {
            self.st = St::Body(h.cl);
            Ok(())
        } else {
            match self.message_end() {
                Some(s) => Err(s),
                None => Ok(()),
            }
        }
    }

    fn start_chunk(&mut self) {
        self.st = St::ChunkSize;
        self.chunk = 0;
        self.chunk_digits = 0;
        self.chunk_ext = 0;
    }
}

// ---------------------------------------------------------------------------
// The I/O wrapper.
// ---------------------------------------------------------------------------

/// What the guard and the service of one connection share.
#[derive(Debug, Default)]
struct ConnShared {
    /// The status of the guard's synthetic request; 0 when none.
    rejected: AtomicU16,
    /// The response to a request hyper may upgrade: 0 not yet, 1 upgraded,
    /// 2 not.
    upgrade: AtomicU8,
    waker: Mutex<Option<Waker>>,
}

/// The service's side of a [`Guard`]: give it to [`serve`].
#[derive(Debug, Clone)]
pub struct GuardHandle(Arc<ConnShared>);

impl GuardHandle {
    fn decide_upgrade(&self, upgraded: bool) {
        self.0
            .upgrade
            .store(if upgraded { 1 } else { 2 }, Ordering::Release);
        let w = self.0.waker.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = w {
            w.wake();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Scan,
    /// Nothing more until the service says whether the request upgraded.
    AwaitUpgrade,
    /// Not HTTP/1 any more: bytes pass untouched.
    Pass,
    /// Handing hyper the synthetic request, from this offset.
    Inject(usize),
    /// End of stream for hyper.
    Eof,
    /// A malformed body: every read fails.
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Off,
    Header,
    Idle,
    Body,
}

/// An HTTP/1 request stream checked on the way in (see the module doc).
pub struct Guard<S> {
    io: S,
    scan: Scanner,
    mode: Mode,
    /// Bytes read but not handed to hyper: `stash[start..ready]` may go,
    /// `stash[ready..scanned]` is a head in progress, `stash[scanned..]` is
    /// not scanned yet.
    stash: Vec<u8>,
    start: usize,
    ready: usize,
    scanned: usize,
    /// Absolute stream offset of the next byte hyper gets.
    delivered: u64,
    shared: Arc<ConnShared>,
    timer: Timer,
    /// When the running timer expires. The `sleep` may be set earlier (a
    /// later deadline does not move it: it is moved on when it fires), so
    /// arming a timer per request touches no timer wheel.
    deadline: Instant,
    sleep: Pin<Box<Sleep>>,
    limits: GuardLimits,
}

impl<S> Guard<S> {
    /// Wrap a fresh connection. Must be called within a tokio runtime.
    pub fn new(io: S, limits: &ClientLimits) -> (Guard<S>, GuardHandle) {
        Guard::new_since(io, limits, Instant::now())
    }

    /// Wrap a connection accepted at `accepted`: the first head's
    /// `client_header_timeout` runs from then.
    pub fn new_since(io: S, limits: &ClientLimits, accepted: Instant) -> (Guard<S>, GuardHandle) {
        let (guard, handle) = Guard::boxed_since(io, limits, accepted);
        (*guard, handle)
    }

    /// [`Guard::new`], boxed: written into its box, not built and then
    /// copied there (the guard is ~460 bytes; the connection's reader
    /// takes it boxed).
    pub fn boxed(io: S, limits: &ClientLimits) -> (Box<Guard<S>>, GuardHandle) {
        Guard::boxed_since(io, limits, Instant::now())
    }

    fn boxed_since(
        io: S,
        limits: &ClientLimits,
        accepted: Instant,
    ) -> (Box<Guard<S>>, GuardHandle) {
        let limits = GuardLimits::new(limits);
        let shared = Arc::new(ConnShared::default());
        let guard = Box::write(
            Box::new_uninit(),
            Guard {
                io,
                scan: Scanner::new(limits),
                mode: Mode::Scan,
                stash: Vec::new(),
                start: 0,
                ready: 0,
                scanned: 0,
                delivered: 0,
                shared: shared.clone(),
                timer: Timer::Header,
                deadline: accepted + limits.header_timeout,
                sleep: Box::pin(tokio::time::sleep_until(accepted + limits.header_timeout)),
                limits,
            },
        );
        (guard, GuardHandle(shared))
    }

    fn arm(&mut self, t: Timer) {
        let d = match t {
            Timer::Off => {
                self.timer = Timer::Off;
                return;
            }
            Timer::Header => self.limits.header_timeout,
            Timer::Idle => self.limits.keepalive_timeout,
            Timer::Body => self.limits.body_backstop,
        };
        self.timer = t;
        self.deadline = Instant::now() + d;
        if self.sleep.deadline() > self.deadline {
            self.sleep.as_mut().reset(self.deadline);
        }
    }

    /// After scanning: a head in progress runs on the header timer.
    fn after_scan(&mut self) {
        match (self.scan.in_head(), self.timer) {
            (true, Timer::Header) | (false, Timer::Off) => {}
            (true, _) => self.arm(Timer::Header),
            (false, _) => self.timer = Timer::Off,
        }
    }

    /// The socket has nothing: arm the timer for what we wait for, and say
    /// whether it already expired.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        if self.mode != Mode::Scan {
            return false;
        }
        if self.timer == Timer::Off {
            let t = if self.scan.in_head() {
                Timer::Header
            } else if self.scan.in_body() {
                Timer::Body
            } else {
                Timer::Idle
            };
            self.arm(t);
        }
        while self.sleep.as_mut().poll(cx).is_ready() {
            if self.deadline > self.sleep.deadline() {
                // Set for an earlier deadline: move it on (and poll again,
                // so that it wakes this task).
                let d = self.deadline;
                self.sleep.as_mut().reset(d);
                continue;
            }
            if self.timer == Timer::Body {
                self.mode = Mode::Fail;
            } else {
                self.mode = Mode::Eof;
            }
            self.stash.clear();
            self.start = 0;
            self.ready = 0;
            self.scanned = 0;
            return true;
        }
        false
    }

    /// Act on a stop of the scanner; `self.ready` is already where it stopped.
    fn on_stop(&mut self, stop: Option<Stop>) {
        match stop {
            None => {}
            Some(Stop::Reject(status)) => {
                self.stash.truncate(self.ready);
                self.scanned = self.ready;
                self.shared.rejected.store(status, Ordering::Release);
                self.mode = Mode::Inject(0);
                tracing::debug!(status, "guard: request head rejected");
            }
            Some(Stop::BodyError) => {
                self.stash.truncate(self.ready);
                self.scanned = self.ready;
                self.mode = Mode::Fail;
                tracing::debug!("guard: malformed chunked body");
            }
            Some(Stop::Upgrade) => {
                self.shared.upgrade.store(0, Ordering::Release);
                self.mode = Mode::AwaitUpgrade;
            }
            Some(Stop::Pass) => {
                self.ready = self.stash.len();
                self.scanned = self.stash.len();
                self.mode = Mode::Pass;
            }
        }
        self.after_scan();
    }

    /// Scan the stash's unscanned bytes.
    fn scan_stash(&mut self) {
        let (n, stop) = self.scan.feed(&self.stash[self.scanned..]);
        self.scanned += n;
        let committed = self.scan.committed().saturating_sub(self.delivered);
        self.ready = (self.start + committed as usize).min(self.stash.len());
        self.on_stop(stop);
    }

    /// Copy the stash's deliverable bytes into hyper's buffer.
    fn deliver(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.ready.saturating_sub(self.start).min(buf.remaining());
        buf.put_slice(&self.stash[self.start..self.start + n]);
        self.start += n;
        self.delivered += n as u64;
        if self.start == self.stash.len() {
            self.stash.clear();
            self.start = 0;
            self.ready = 0;
            self.scanned = 0;
        }
    }
}

impl<S: AsyncRead + Unpin> Guard<S> {
    /// Read into hyper's buffer (after a small partial head put back there)
    /// and scan in place. `Ready(true)` when bytes were handed to hyper.
    fn read_direct(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<bool>> {
        let before = buf.filled().len();
        let partial = self.stash.len() - self.start;
        buf.put_slice(&self.stash[self.start..]);
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Pending => {
                buf.set_filled(before);
                if self.poll_timer(cx) {
                    return Poll::Ready(Ok(false));
                }
                return Poll::Pending;
            }
            Poll::Ready(Err(e)) => {
                buf.set_filled(before);
                return Poll::Ready(Err(e));
            }
            Poll::Ready(Ok(())) => {}
        }
        let end = buf.filled().len();
        if end == before + partial {
            // End of stream; a partial head is dropped unseen.
            buf.set_filled(before);
            self.stash.clear();
            self.start = 0;
            self.ready = 0;
            self.scanned = 0;
            self.mode = Mode::Eof;
            return Poll::Ready(Ok(false));
        }
        self.stash.clear();
        self.start = 0;
        self.ready = 0;
        self.scanned = 0;
        let (n, stop) = self.scan.feed(&buf.filled()[before + partial..]);
        let keep = self.scan.committed().saturating_sub(self.delivered) as usize;
        let keep = keep.min(end - before);
        let scanned_end = before + partial + n;
        // Everything past what may go now stays with the guard (a rejected
        // head and what follows it is dropped by `on_stop`).
        if !matches!(stop, Some(Stop::Reject(_) | Stop::BodyError)) {
            let tail = &buf.filled()[before + keep..end];
            if !tail.is_empty() {
                self.stash.extend_from_slice(tail);
                self.scanned = scanned_end.saturating_sub(before + keep);
            }
        }
        buf.set_filled(before + keep);
        self.delivered += keep as u64;
        self.ready = 0;
        self.on_stop(stop);
        Poll::Ready(Ok(keep > 0))
    }

    /// Read more of a large partial head into the stash.
    fn read_stash(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.start > 0 {
            self.stash.drain(..self.start);
            self.ready = self.ready.saturating_sub(self.start);
            self.scanned = self.scanned.saturating_sub(self.start);
            self.start = 0;
        }
        let old = self.stash.len();
        self.stash.resize(old + STASH_READ, 0);
        let mut rb = ReadBuf::new(&mut self.stash[old..]);
        let r = Pin::new(&mut self.io).poll_read(cx, &mut rb);
        let n = rb.filled().len();
        self.stash.truncate(old + n);
        match r {
            Poll::Pending => {
                if self.poll_timer(cx) {
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) if n == 0 => {
                self.stash.clear();
                self.start = 0;
                self.ready = 0;
                self.scanned = 0;
                self.mode = Mode::Eof;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) => {
                self.scan_stash();
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.ready > this.start {
                this.deliver(buf);
                if this.timer != Timer::Header {
                    this.timer = Timer::Off;
                }
                return Poll::Ready(Ok(()));
            }
            match this.mode {
                Mode::Pass => {
                    if this.start < this.stash.len() {
                        this.ready = this.stash.len();
                        continue;
                    }
                    return Pin::new(&mut this.io).poll_read(cx, buf);
                }
                Mode::Eof => return Poll::Ready(Ok(())),
                Mode::Fail => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "malformed request body or body timeout",
                    )));
                }
                Mode::Inject(pos) => {
                    let rest = SYNTHETIC.get(pos..).unwrap_or_default();
                    let n = rest.len().min(buf.remaining());
                    buf.put_slice(&rest[..n]);
                    this.mode = if pos + n >= SYNTHETIC.len() {
                        Mode::Eof
                    } else {
                        Mode::Inject(pos + n)
                    };
                    return Poll::Ready(Ok(()));
                }
                Mode::AwaitUpgrade => {
                    match this.shared.upgrade.load(Ordering::Acquire) {
                        1 => {
                            this.mode = Mode::Pass;
                            continue;
                        }
                        2 => {
                            this.mode = Mode::Scan;
                            continue;
                        }
                        _ => {}
                    }
                    if let Ok(mut w) = this.shared.waker.lock() {
                        *w = Some(cx.waker().clone());
                    }
                    // Decided meanwhile: do not miss the wake-up.
                    if this.shared.upgrade.load(Ordering::Acquire) != 0 {
                        continue;
                    }
                    return Poll::Pending;
                }
                Mode::Scan => {
                    if this.scanned < this.stash.len() {
                        this.scan_stash();
                        continue;
                    }
                    let partial = this.stash.len() - this.start;
                    let r = if partial <= SMALL_PARTIAL && buf.remaining() >= partial + 512 {
                        match this.read_direct(cx, buf) {
                            Poll::Ready(Ok(true)) => {
                                if this.timer != Timer::Header {
                                    this.timer = Timer::Off;
                                }
                                return Poll::Ready(Ok(()));
                            }
                            Poll::Ready(Ok(false)) => Poll::Ready(Ok(())),
                            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                            Poll::Pending => Poll::Pending,
                        }
                    } else {
                        this.read_stash(cx)
                    };
                    match r {
                        Poll::Ready(Ok(())) => {
                            if this.mode == Mode::Eof && this.ready == this.start {
                                return Poll::Ready(Ok(()));
                            }
                        }
                        other => return other,
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------
// The service side.
// ---------------------------------------------------------------------------

/// Serve one request of a guarded connection: answer the guard's
/// synthetic request with its status, else [`handle`] the request and tell
/// the guard whether an upgrade happened (the request path calls
/// [`refused`] first and [`decided`] at the end; no future of its own
/// wraps it, so a connection keeps no slot for one).
pub fn serve<'a>(
    guard: &'a GuardHandle,
    shared: &'a Shared,
    conn: ConnInfo,
    req: &'a mut Option<Request<RequestBody>>,
) -> impl std::future::Future<Output = crate::proxy::forward::Answered> + 'a {
    handle(shared, conn, req, Some(guard))
}

/// The answer to the guard's synthetic request (it carries the marker),
/// given without a pipeline; `None` for every other request.
pub fn refused(
    guard: &GuardHandle,
    shared: &Shared,
    conn: ConnInfo,
    req: &Request<RequestBody>,
) -> Option<Response<Body>> {
    if !crate::proxy::headers::contains(req.headers(), &MARKER_NAME) {
        return None;
    }
    // Only the guard can both send the marker on HTTP/1 and set the flag;
    // an h2 request carrying the marker is just a bad request.
    let status = match guard.0.rejected.load(Ordering::Acquire) {
        0 => 400,
        s => s,
    };
    Some(rejection(shared, conn, status))
}

/// Whether a request that could upgrade its connection did (the guard
/// scans on or passes bytes through from here).
pub fn decided(guard: &GuardHandle, status: StatusCode) {
    guard.decide_upgrade(status == StatusCode::SWITCHING_PROTOCOLS);
}

fn rejection(shared: &Shared, conn: ConnInfo, status: u16) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let message = match status {
        StatusCode::URI_TOO_LONG => "URI too long",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "Request header fields too large",
        _ => "Bad request",
    };
    let id_header = shared
        .gateway
        .load()
        .config
        .defaults
        .request_id_header
        .clone();
    let id = new_request_id_value();
    let mut resp = error_response(status, message, header_text(&id), &id_header);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    logged_refusal(shared, conn, resp, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> GuardLimits {
        GuardLimits::new(&ClientLimits::default())
    }

    /// Feed `input` in pieces of `step` bytes; the committed offset and the
    /// stop.
    fn run(input: &[u8], step: usize) -> (u64, Option<Stop>) {
        let mut s = Scanner::new(limits());
        let mut off = 0;
        while off < input.len() {
            let end = (off + step).min(input.len());
            let (n, stop) = s.feed(&input[off..end]);
            if let Some(st) = stop {
                if st == Stop::Upgrade {
                    off += n;
                    continue;
                }
                return (s.committed(), Some(st));
            }
            off += n;
        }
        (s.committed(), None)
    }

    fn all_steps(input: &[u8]) -> (u64, Option<Stop>) {
        let whole = run(input, input.len().max(1));
        for step in [1, 2, 3, 7, 64] {
            assert_eq!(
                run(input, step),
                whole,
                "step {step}: {:?}",
                String::from_utf8_lossy(input)
            );
        }
        whole
    }

    #[test]
    fn good_requests_pass_whole() {
        let reqs: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /x?y=1 HTTP/1.0\r\n\r\n",
            b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  Chunked \r\n\r\n5;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
            b"\r\nGET http://a.example/x HTTP/1.1\r\nHost: a\r\nX-V: \t\x80ok \r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        ];
        for r in reqs {
            assert_eq!(
                all_steps(r),
                (r.len() as u64, None),
                "{:?}",
                String::from_utf8_lossy(r)
            );
        }
    }

    #[test]
    fn bad_heads_are_rejected_at_their_start() {
        let first = b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n";
        let bad: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: ,chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding:\r\n chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\n",
            b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\0b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET a/b HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\n: empty\r\n\r\n",
            b"GET / HTTP/1.1\r\nx-tollgate-guard-reject: 1\r\n\r\n",
            b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n",
        ];
        for b in bad {
            let mut input = first.to_vec();
            input.extend_from_slice(b);
            input.extend_from_slice(first);
            assert_eq!(
                all_steps(&input),
                (first.len() as u64, Some(Stop::Reject(400))),
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
    }

    #[test]
    fn limits_give_414_and_431() {
        let long_line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000));
        assert_eq!(
            all_steps(long_line.as_bytes()),
            (0, Some(Stop::Reject(414)))
        );
        let big_head = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(40_000));
        assert_eq!(all_steps(big_head.as_bytes()), (0, Some(Stop::Reject(431))));
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(all_steps(many.as_bytes()), (0, Some(Stop::Reject(431))));
    }

    #[test]
    fn bad_chunks_stop_at_the_bad_byte() {
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for (body, at) in [
            (&b"zz\r\n"[..], 0),
            (b"5 \r\nhello\r\n0\r\n\r\n", 2),
            (b"5\nhello", 1),
            (b"5\r\nhelloXX", 8),
            (b"ffffffffffffffffff\r\n", 16),
            (b"5;a\0\r\n", 3),
            (b"0\r\nX: a\n", 7),
        ] {
            let mut input = head.to_vec();
            input.extend_from_slice(body);
            assert_eq!(
                all_steps(&input),
                ((head.len() + at) as u64, Some(Stop::BodyError)),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// A reader that hands out `data` in the given piece sizes.
    struct Pieces {
        data: Vec<u8>,
        pos: usize,
        sizes: Vec<usize>,
        i: usize,
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let size = self.sizes[self.i % self.sizes.len()];
            self.i += 1;
            let n = size.min(buf.remaining()).min(self.data.len() - self.pos);
            let pos = self.pos;
            buf.put_slice(&self.data[pos..pos + n]);
            self.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    /// Everything hyper would read through the guard, with reads of the
    /// given capacities.
    fn through_guard(data: Vec<u8>, sizes: Vec<usize>, caps: &[usize]) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let _g = rt.enter();
        let (mut g, _h) = Guard::new(
            Pieces {
                data,
                pos: 0,
                sizes,
                i: 0,
            },
            &ClientLimits::default(),
        );
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Vec::new();
        for i in 0.. {
            let mut space = vec![0u8; caps[i % caps.len()]];
            let mut rb = ReadBuf::new(&mut space);
            match Pin::new(&mut g).poll_read(&mut cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => break,
                Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
                other => panic!("{other:?}"),
            }
        }
        out
    }

    fn request(kind: u8, n: usize) -> Vec<u8> {
        let body = "b".repeat(n);
        match kind % 3 {
            0 => format!("GET /g{n} HTTP/1.1\r\nHost: a\r\nX-Pad: {body}\r\n\r\n"),
            1 => format!("POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: {n}\r\n\r\n{body}"),
            _ => format!(
                "POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{n:x};e=1\r\n{body}\r\n1\r\nz\r\n0\r\nT: v\r\n\r\n"
            ),
        }
        .into_bytes()
    }

    /// The word-at-a-time run ends where the byte-at-a-time one does.
    #[test]
    fn plain_runs_end_at_the_first_byte_that_is_not_plain() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        // Past 48 bytes: three 16-byte blocks, then words and bytes.
        for len in 0..72 {
            for _ in 0..400 {
                let data: Vec<u8> = (0..len)
                    .map(|_| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        // Mostly plain bytes, sometimes any byte.
                        let b = (rng >> 24) as u8;
                        if rng.is_multiple_of(13) {
                            b
                        } else {
                            0x21 + b % 0x5e
                        }
                    })
                    .collect();
                for value in [true, false] {
                    let want = data
                        .iter()
                        .position(|&b| !plain(b, value))
                        .unwrap_or(data.len());
                    assert_eq!(plain_run(&data, value), want, "{data:?} value={value}");
                }
            }
        }
        // Every byte, at every place of a block, a word and the tail.
        for b in 0..=255u8 {
            for at in 0..40 {
                let mut data = vec![b'a'; 40];
                data[at] = b;
                for value in [true, false] {
                    let want = if plain(b, value) { 40 } else { at };
                    assert_eq!(
                        plain_run(&data, value),
                        want,
                        "byte {b:#x} at {at} value={value}"
                    );
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn any_read_sizes_deliver_valid_streams_whole(
            reqs in proptest::collection::vec((0u8..3, 1usize..3000), 1..12),
            sizes in proptest::collection::vec(1usize..5000, 1..8),
            caps in proptest::collection::vec(1usize..9000, 1..8),
            bad in proptest::option::of(0usize..3),
        ) {
            let mut data: Vec<u8> = reqs.iter().flat_map(|&(k, n)| request(k, n)).collect();
            let valid = data.clone();
            if let Some(b) = bad {
                let bads: [&[u8]; 3] = [
                    b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
                    b"GET /#f HTTP/1.1\r\n\r\n",
                    b"GET / HTTP/1.1\nHost: a\r\n\r\n",
                ];
                data.extend_from_slice(bads[b]);
                data.extend_from_slice(&request(0, 5));
            }
            let out = through_guard(data, sizes, &caps);
            let mut want = valid;
            if bad.is_some() {
                want.extend_from_slice(SYNTHETIC);
            }
            proptest::prop_assert_eq!(out, want);
        }
    }

    /// The scanner without its fast paths: every head byte stepped alone.
    fn feed_bytewise(s: &mut Scanner, data: &[u8]) -> (usize, Option<Stop>) {
        let mut i = 0;
        while i < data.len() {
            match s.st {
                St::Done => return (i, None),
                St::Body(_) | St::ChunkData(_) => {
                    let (n, stop) = s.feed(&data[i..i + 1]);
                    i += n;
                    if stop.is_some() {
                        return (i, stop);
                    }
                }
                _ => {
                    if let Some(r) = s.step_byte(data[i], &mut i) {
                        return r;
                    }
                }
            }
        }
        (i, None)
    }

    proptest::proptest! {
        #[test]
        fn fast_paths_decide_as_byte_steps(
            reqs in proptest::collection::vec(
                (0usize..4, 0usize..4, 0usize..4, proptest::collection::vec(0usize..9, 0..5), 0usize..3),
                1..4,
            ),
            noise in proptest::option::of((0usize..400, 0usize..8)),
            head in 20usize..160,
            line in 10usize..60,
        ) {
            const METHOD: [&[u8]; 4] = [b"GET", b"POST", b"CONNECT", b"G\x01T"];
            const TARGET: [&[u8]; 4] = [b"/", b"/abc/def?x=1&y=%20", b"http://h/a-long-target-path", b"/a#b"];
            const VERSION: [&[u8]; 4] = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.", b"HTTP/2.0"];
            const FIELD: [&[u8]; 9] = [
                b"Host: a", b"Content-Length: 3", b"Transfer-Encoding: chunked",
                b"Upgrade: x", b"X-V: \t a\x80b ", b"X-Empty:", b"Bad Name: v", b"X-B:        \t    v", b"X-Ctl: a\x7fb",
            ];
            const BODY: [&[u8]; 3] = [b"", b"abc", b"3\r\nabc\r\n0\r\n\r\n"];
            const NOISE: [&[u8]; 8] = [b"\r", b"\n", b" ", b"\t", b":", b"#", b"\x00", b"\r\n"];
            let mut data = Vec::new();
            for (m, t, v, fields, body) in &reqs {
                data.extend_from_slice(METHOD[*m]);
                data.push(b' ');
                data.extend_from_slice(TARGET[*t]);
                data.push(b' ');
                data.extend_from_slice(VERSION[*v]);
                data.extend_from_slice(b"\r\n");
                for f in fields {
                    data.extend_from_slice(FIELD[*f]);
                    data.extend_from_slice(b"\r\n");
                }
                data.extend_from_slice(b"\r\n");
                data.extend_from_slice(BODY[*body]);
            }
            if let Some((at, k)) = noise {
                let at = at.min(data.len());
                data.splice(at..at, NOISE[k].iter().copied());
            }
            let limits = GuardLimits {
                request_line: line,
                head,
                ..GuardLimits::new(&ClientLimits::default())
            };
            let mut fast = Scanner::new(limits);
            let mut slow = Scanner::new(limits);
            let mut at = 0;
            // Feed on through upgrades, as the guard does.
            loop {
                let a = fast.feed(&data[at..]);
                let b = feed_bytewise(&mut slow, &data[at..]);
                proptest::prop_assert_eq!(a, b);
                proptest::prop_assert_eq!(fast.committed(), slow.committed());
                at += a.0;
                if a.1 != Some(Stop::Upgrade) || at >= data.len() {
                    break;
                }
            }
        }
    }

    #[test]
    fn preface_and_upgrade() {
        assert_eq!(
            run(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12", 3).1,
            Some(Stop::Pass)
        );
        // "PRI * HTTP/1.1" starts like the preface but is HTTP/1 (and bad).
        assert_eq!(
            all_steps(b"PRI * HTTP/1.1\r\n\r\n"),
            (0, Some(Stop::Reject(400)))
        );
        assert_eq!(all_steps(b"PUT / HTTP/1.1\r\n\r\n"), (18, None));
        let up = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        let mut s = Scanner::new(limits());
        let mut input = up.to_vec();
        input.extend_from_slice(b"frames");
        assert_eq!(s.feed(&input), (up.len(), Some(Stop::Upgrade)));
        assert_eq!(s.committed(), up.len() as u64);
    }
}
