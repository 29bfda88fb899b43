//! W3C trace context (`traceparent`): continue the caller's trace with the
//! gateway's own span id, or start a new trace.

/// A parsed or freshly started trace context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: String,
    /// The gateway's span, sent upstream as the parent.
    pub span_id: String,
    /// The caller's span id, when a valid `traceparent` came in.
    pub parent: Option<String>,
    pub flags: String,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TraceContext {
    /// From an incoming `traceparent` (version 00 layout; unknown versions
    /// are read the same way, as the spec asks), or a new trace.
    pub fn from_header(value: Option<&str>) -> TraceContext {
        if let Some(v) = value {
            let parts: Vec<&str> = v.trim().split('-').collect();
            if parts.len() >= 4
                && is_hex(parts[0], 2)
                && parts[0] != "ff"
                && is_hex(parts[1], 32)
                && parts[1] != "0".repeat(32)
                && is_hex(parts[2], 16)
                && parts[2] != "0".repeat(16)
                && is_hex(parts[3], 2)
                && (parts[0] != "00" || parts.len() == 4)
            {
                return TraceContext {
                    trace_id: parts[1].to_string(),
                    span_id: new_span_id(),
                    parent: Some(parts[2].to_string()),
                    flags: parts[3].to_string(),
                };
            }
        }
        TraceContext {
            trace_id: hex(&fastrand::u128(1..).to_be_bytes()),
            span_id: new_span_id(),
            parent: None,
            flags: "01".to_string(),
        }
    }

    /// The `traceparent` sent upstream.
    pub fn header(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        s.push_str(&self.trace_id);
        s.push('-');
        s.push_str(&self.span_id);
        s.push('-');
        s.push_str(&self.flags);
        s
    }

    /// The `traceparent` sent upstream, as a header value (no `String`).
    pub fn header_value(&self) -> http::HeaderValue {
        let mut buf = [0u8; 55];
        let mut n = 0;
        for part in [
            "00-",
            self.trace_id.as_str(),
            "-",
            self.span_id.as_str(),
            "-",
            self.flags.as_str(),
        ] {
            let end = (n + part.len()).min(buf.len());
            buf[n..end].copy_from_slice(&part.as_bytes()[..end - n]);
            n = end;
        }
        http::HeaderValue::from_bytes(&buf[..n])
            .unwrap_or_else(|_| http::HeaderValue::from_static(""))
    }

    /// Whether the caller asked for this trace to be recorded (the
    /// `sampled` bit of the flags; new traces are sampled).
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(&self.flags, 16).is_ok_and(|f| f & 1 == 1)
    }
}

fn new_span_id() -> String {
    hex(&fastrand::u64(1..).to_be_bytes())
}

/// Lowercase hex, without the formatting machinery (this runs per request).
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
    fn continues_a_valid_trace() {
        let t = TraceContext::from_header(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(t.span_id, "00f067aa0ba902b7");
        assert_eq!(t.parent.as_deref(), Some("00f067aa0ba902b7"));
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
            assert_eq!(t.trace_id.len(), 32);
            assert_eq!(t.span_id.len(), 16);
            assert_eq!(t.parent, None);
            assert!(t.sampled());
        }
    }
}
