//! W3C trace context (`traceparent`): continue the caller's trace with the
//! gateway's own span id, or start a new trace.

/// A lowercase hex id of `N` characters, stored inline (no heap: one is
/// made per request).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HexId<const N: usize>([u8; N]);

impl<const N: usize> HexId<N> {
    /// `s` when it is exactly `N` lowercase hex digits.
    pub fn parse(s: &str) -> Option<HexId<N>> {
        let b: [u8; N] = s.as_bytes().try_into().ok()?;
        b.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
            .then_some(HexId(b))
    }

    /// Hex of `bytes` (which must be `N / 2` long).
    fn of(bytes: &[u8]) -> HexId<N> {
        let mut out = [b'0'; N];
        for (pair, chunk) in out.chunks_mut(16).zip(bytes.chunks(8)) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            let digits = hex16(u64::from_be_bytes(word));
            pair.copy_from_slice(&digits[..pair.len()]);
        }
        HexId(out)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("")
    }

    fn is_zero(&self) -> bool {
        self.0.iter().all(|&c| c == b'0')
    }
}

impl<const N: usize> std::fmt::Debug for HexId<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> std::fmt::Display for HexId<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> PartialEq<&str> for HexId<N> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl<const N: usize> serde::Serialize for HexId<N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

pub type TraceId = HexId<32>;
pub type SpanId = HexId<16>;

/// A parsed or freshly started trace context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: TraceId,
    /// The gateway's span, sent upstream as the parent.
    pub span_id: SpanId,
    /// The caller's span id, when a valid `traceparent` came in.
    pub parent: Option<SpanId>,
    pub flags: HexId<2>,
}

impl TraceContext {
    /// From an incoming `traceparent` (version 00 layout; unknown versions
    /// are read the same way, as the spec asks), or a new trace.
    pub fn from_header(value: Option<&str>) -> TraceContext {
        if let Some(v) = value {
            let mut parts = v.trim().split('-');
            let version = parts.next().and_then(HexId::<2>::parse);
            let trace = parts.next().and_then(TraceId::parse);
            let parent = parts.next().and_then(SpanId::parse);
            let flags = parts.next().and_then(HexId::<2>::parse);
            let more = parts.next().is_some();
            if let (Some(version), Some(trace), Some(parent), Some(flags)) =
                (version, trace, parent, flags)
                && version != "ff"
                && !trace.is_zero()
                && !parent.is_zero()
                && (version != "00" || !more)
            {
                return TraceContext {
                    trace_id: trace,
                    span_id: new_span_id(),
                    parent: Some(parent),
                    flags,
                };
            }
        }
        TraceContext {
            trace_id: HexId::of(&fastrand::u128(1..).to_be_bytes()),
            span_id: new_span_id(),
            parent: None,
            flags: HexId(*b"01"),
        }
    }

    /// The `traceparent` sent upstream.
    pub fn header(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        s.push_str(self.trace_id.as_str());
        s.push('-');
        s.push_str(self.span_id.as_str());
        s.push('-');
        s.push_str(self.flags.as_str());
        s
    }

    /// The `traceparent` sent upstream, as a header value (no `String`).
    pub fn header_value(&self) -> http::HeaderValue {
        let mut buf = [0u8; 55];
        buf[..3].copy_from_slice(b"00-");
        buf[3..35].copy_from_slice(&self.trace_id.0);
        buf[35] = b'-';
        buf[36..52].copy_from_slice(&self.span_id.0);
        buf[52] = b'-';
        buf[53..55].copy_from_slice(&self.flags.0);
        // Hex digits and `-` only (`HexId`s are made of hex digits, or
        // parsed as them from a caller's `traceparent`).
        crate::proxy::headers::made::generated(&buf)
    }

    /// Whether the caller asked for this trace to be recorded (the
    /// `sampled` bit of the flags; new traces are sampled).
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(self.flags.as_str(), 16).is_ok_and(|f| f & 1 == 1)
    }
}

/// The 16 lowercase hex digits of `x`, most significant first, a word at
/// a time (a digit per byte: spread the nibbles, then add `'0'`, or `'a' -
/// 10` where the nibble is ten or more).
pub fn hex16(x: u64) -> [u8; 16] {
    fn spread(v: u32) -> u64 {
        let mut x = u64::from(v);
        x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
        x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
        (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f
    }
    fn ascii(n: u64) -> u64 {
        const ONES: u64 = 0x0101_0101_0101_0101;
        let letters = ((n + 6 * ONES) >> 4) & ONES;
        n + b'0' as u64 * ONES + letters * u64::from(b'a' - b'0' - 10)
    }
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&ascii(spread((x >> 32) as u32)).to_be_bytes());
    out[8..].copy_from_slice(&ascii(spread(x as u32)).to_be_bytes());
    out
}

fn new_span_id() -> SpanId {
    HexId::of(&fastrand::u64(1..).to_be_bytes())
}

/// Lowercase hex, without the formatting machinery.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digits_are_the_formatters() {
        let mut x = 0x0123_4567_89ab_cdef_u64;
        for _ in 0..2000 {
            assert_eq!(hex16(x), *format!("{x:016x}").as_bytes());
            x = x.rotate_left(7).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xa5;
        }
        for x in [0, u64::MAX, 0xa, 0x9, 0xf0f0_f0f0_0f0f_0f0f] {
            assert_eq!(hex16(x), *format!("{x:016x}").as_bytes());
        }
        let t: TraceId = HexId::of(&0xfedc_ba98_7654_3210_0011_2233_4455_6677_u128.to_be_bytes());
        assert_eq!(t.as_str(), "fedcba98765432100011223344556677");
        let f: HexId<2> = HexId::of(&[0x01]);
        assert_eq!(f.as_str(), "01");
    }

    #[test]
    fn continues_a_valid_trace() {
        let t = TraceContext::from_header(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(t.span_id, "00f067aa0ba902b7");
        assert_eq!(
            t.parent.map(|p| p.to_string()).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert!(t.sampled());
        assert!(
            t.header()
                .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
        assert_eq!(t.header_value().as_bytes(), t.header().as_bytes());
    }

    #[test]
    fn unsampled_flag_is_kept() {
        let t = TraceContext::from_header(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        ));
        assert!(!t.sampled());
        assert!(t.header().ends_with("-00"));
    }

    #[test]
    fn starts_a_new_one_on_garbage() {
        for bad in [
            "",
            "zz",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-ABC-1-01",
        ] {
            let t = TraceContext::from_header(Some(bad));
            assert_eq!(t.trace_id.as_str().len(), 32);
            assert_eq!(t.span_id.as_str().len(), 16);
            assert!(!t.trace_id.is_zero());
            assert_eq!(t.parent, None);
            assert!(t.sampled());
        }
    }
}
