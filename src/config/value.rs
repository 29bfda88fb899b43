//! Argument values: sizes, durations, rates and variable templates
//! (LANGUAGE.md §1). Pure functions from text to typed values; errors are
//! short strings that the caller turns into a diagnostic on the argument.

use std::time::Duration;

use crate::config::model::{Piece, Rate, Template, Var};

/// `512`, `64k`, `10m`, `1g` (powers of 1024; upper case accepted).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1024u64),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1024 * 1024),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{s}` is not a size"));
    }
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// `500ms`, `30s`, `5m`, `1h`, `1d`, combinable (`1m30s`); a bare number is
/// seconds. Also `w` (weeks) and `y` (years), as NGINX.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .ok()
            .filter(|n| *n <= 100 * 365 * 86400)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("`{s}` is too large"));
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total: u128 = 0;
    let mut last_rank = usize::MAX;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(format!("`{s}` is not a duration"));
        }
        let n: u128 = s[start..i]
            .parse()
            .map_err(|_| format!("`{s}` is too large"))?;
        let ustart = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let (ms, rank) = match &s[ustart..i] {
            "y" => (365 * 86_400_000u128, 7),
            "M" => (30 * 86_400_000, 6),
            "w" => (7 * 86_400_000, 5),
            "d" => (86_400_000, 4),
            "h" => (3_600_000, 3),
            "m" => (60_000, 2),
            "s" => (1000, 1),
            "ms" => (1, 0),
            "" => return Err(format!("`{s}`: a number inside a duration needs a unit")),
            u => return Err(format!("`{s}`: unknown unit `{u}` (use ms, s, m, h, d)")),
        };
        if rank >= last_rank {
            return Err(format!(
                "`{s}`: units must go from largest to smallest, each once"
            ));
        }
        last_rank = rank;
        total = total.saturating_add(n.saturating_mul(ms));
    }
    if total > 100 * 365 * 86_400_000 {
        return Err(format!("`{s}` is too large"));
    }
    Ok(Duration::from_millis(total as u64))
}

/// `10r/s`, `100r/m`, `100r/15m`, `5000r/h`, `1r/d`.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let bad = || format!("`{s}` is not a rate (write e.g. `10r/s` or `100r/15m`)");
    let (n, per) = s.split_once("r/").ok_or_else(bad)?;
    let requests: u64 = n.parse().map_err(|_| bad())?;
    if requests == 0 {
        return Err(format!("`{s}`: the rate must admit at least one request"));
    }
    let per = match per {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(86400),
        other => {
            let d = if other.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
                parse_duration(other).map_err(|_| bad())?
            } else {
                return Err(bad());
            };
            if d.is_zero() {
                return Err(bad());
            }
            d
        }
    };
    Ok(Rate { requests, per })
}

/// Why a variable could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarError {
    /// Byte range of the variable in the argument value.
    pub start: usize,
    pub end: usize,
    pub message: String,
    pub help: String,
}

/// Names of the request variables, for "did you mean".
pub const VAR_NAMES: &[&str] = &[
    "remote_addr",
    "host",
    "scheme",
    "request_method",
    "uri",
    "request_uri",
    "args",
    "request_id",
    "server_name",
    "server_port",
    "query_string",
    "is_args",
];

/// How a template resolves names that are not request variables.
pub struct TemplateEnv<'a> {
    /// `$env_NAME` lookup (the process environment in production).
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Named captures available here (of the location regex).
    pub named_captures: &'a [String],
    /// Aggregate call names: `$CALL.field` is a reference when CALL is one.
    pub calls: &'a [String],
}

/// Parse a template. `literal_dollars` are offsets of `\$` dollars.
pub fn parse_template(
    value: &str,
    literal_dollars: &[usize],
    env: &TemplateEnv<'_>,
) -> Result<Template, Vec<VarError>> {
    let mut pieces: Vec<Piece> = Vec::new();
    let mut errors = Vec::new();
    let mut lit = String::new();
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' || literal_dollars.contains(&i) {
            let ch_len = value[i..].chars().next().map(char::len_utf8).unwrap_or(1);
            lit.push_str(&value[i..i + ch_len]);
            i += ch_len;
            continue;
        }
        let start = i;
        let (name, mut end, braced) = if bytes.get(i + 1) == Some(&b'{') {
            let close = value[i + 2..].find('}').map(|p| i + 2 + p);
            match close {
                Some(c) if c > i + 2 && value[i + 2..c].bytes().all(is_name_byte) => {
                    (&value[i + 2..c], c + 1, true)
                }
                _ => {
                    lit.push('$');
                    i += 1;
                    continue;
                }
            }
        } else {
            let mut j = i + 1;
            while j < bytes.len() && is_name_byte(bytes[j]) {
                j += 1;
            }
            if j == i + 1 {
                // A `$` not followed by a name is a literal `$`.
                lit.push('$');
                i += 1;
                continue;
            }
            (&value[i + 1..j], j, false)
        };
        // `$CALL.a.b`: a field of an aggregate call.
        if !braced && env.calls.iter().any(|c| c == name) && bytes.get(end) == Some(&b'.') {
            let mut path = Vec::new();
            let mut j = end;
            while bytes.get(j) == Some(&b'.') {
                let s = j + 1;
                let mut k = s;
                while k < bytes.len() && (is_name_byte(bytes[k]) || bytes[k] == b'-') {
                    k += 1;
                }
                if k == s {
                    break;
                }
                path.push(value[s..k].to_string());
                j = k;
            }
            if !path.is_empty() {
                flush(&mut lit, &mut pieces);
                pieces.push(Piece::CallRef {
                    call: name.to_string(),
                    path,
                });
                end = j;
                i = end;
                continue;
            }
        }
        match resolve_var(name, env) {
            Ok(Resolved::Var(v)) => {
                flush(&mut lit, &mut pieces);
                pieces.push(Piece::Var(v));
            }
            Ok(Resolved::Text(t)) => lit.push_str(&t),
            Err((message, help)) => errors.push(VarError {
                start,
                end,
                message,
                help,
            }),
        }
        i = end;
    }
    flush(&mut lit, &mut pieces);
    if errors.is_empty() {
        Ok(Template { pieces })
    } else {
        Err(errors)
    }
}

fn flush(lit: &mut String, pieces: &mut Vec<Piece>) {
    if !lit.is_empty() {
        pieces.push(Piece::Lit(std::mem::take(lit)));
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

enum Resolved {
    Var(Var),
    Text(String),
}

fn resolve_var(name: &str, env: &TemplateEnv<'_>) -> Result<Resolved, (String, String)> {
    let v = match name {
        "remote_addr" => Var::RemoteAddr,
        "host" => Var::Host,
        "scheme" => Var::Scheme,
        "request_method" => Var::RequestMethod,
        "uri" => Var::Uri,
        "request_uri" => Var::RequestUri,
        "args" | "query_string" => Var::Args,
        "request_id" => Var::RequestId,
        "server_name" => Var::ServerName,
        "server_port" => Var::ServerPort,
        "is_args" => Var::IsArgs,
        _ => {
            if name.len() == 1 && name.as_bytes()[0].is_ascii_digit() {
                let n = name.as_bytes()[0] - b'0';
                if n == 0 {
                    return Err((
                        "`$0` is not a capture".into(),
                        "captures are `$1` to `$9`".into(),
                    ));
                }
                return Ok(Resolved::Var(Var::Capture(n)));
            }
            if let Some(rest) = name.strip_prefix("arg_").filter(|r| !r.is_empty()) {
                return Ok(Resolved::Var(Var::Arg(rest.to_string())));
            }
            if let Some(rest) = name.strip_prefix("http_").filter(|r| !r.is_empty()) {
                return Ok(Resolved::Var(Var::Http(
                    rest.to_ascii_lowercase().replace('_', "-"),
                )));
            }
            if let Some(rest) = name.strip_prefix("cookie_").filter(|r| !r.is_empty()) {
                return Ok(Resolved::Var(Var::Cookie(rest.to_string())));
            }
            if let Some(rest) = name.strip_prefix("jwt_claim_").filter(|r| !r.is_empty()) {
                return Ok(Resolved::Var(Var::JwtClaim(rest.to_string())));
            }
            if let Some(rest) = name.strip_prefix("env_").filter(|r| !r.is_empty()) {
                return match (env.env)(rest) {
                    Some(v) => Ok(Resolved::Text(v)),
                    None => Err((
                        format!("environment variable `{rest}` is not set"),
                        format!(
                            "set `{rest}` in the gateway's environment, or write the value here"
                        ),
                    )),
                };
            }
            if env.named_captures.iter().any(|c| c == name) {
                return Ok(Resolved::Var(Var::Named(name.to_string())));
            }
            if env.calls.iter().any(|c| c == name) {
                return Err((
                    format!("`${name}` is a call, not a variable"),
                    format!("refer to a field of its JSON response: `${name}.FIELD`"),
                ));
            }
            if let Some(call) =
                crate::config::diagnostics::did_you_mean(name, env.calls.iter().map(String::as_str))
            {
                return Err((
                    format!("unknown variable `${name}`"),
                    format!("did you mean the call `{call}` (`${call}.FIELD`)?"),
                ));
            }
            let known = VAR_NAMES
                .iter()
                .copied()
                .chain(env.named_captures.iter().map(String::as_str));
            let help = match crate::config::diagnostics::did_you_mean(name, known) {
                Some(s) => format!("did you mean `${s}`?"),
                None => "variables are listed in LANGUAGE.md §1; write `\\$` for a literal dollar in a quoted string".into(),
            };
            return Err((format!("unknown variable `${name}`"), help));
        }
    };
    Ok(Resolved::Var(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("1x").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("99999999999999999999g").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("30s1m").is_err());
        assert!(parse_duration("1x").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(
            parse_rate("100r/15m"),
            Ok(Rate {
                requests: 100,
                per: Duration::from_secs(900)
            })
        );
        assert_eq!(
            parse_rate("10r/s").map(|r| r.per),
            Ok(Duration::from_secs(1))
        );
        assert!(parse_rate("10/s").is_err());
        assert!(parse_rate("0r/s").is_err());
    }

    #[test]
    fn templates() {
        let env = TemplateEnv {
            env: &|n| (n == "X").then(|| "x!".to_string()),
            named_captures: &["id".to_string()],
            calls: &["order".to_string()],
        };
        let t = parse_template("a$host${uri}b$ $env_X/$id/$order.user.id$1", &[], &env)
            .expect("valid template");
        assert_eq!(
            t.pieces,
            vec![
                Piece::Lit("a".into()),
                Piece::Var(Var::Host),
                Piece::Var(Var::Uri),
                Piece::Lit("b$ x!/".into()),
                Piece::Var(Var::Named("id".into())),
                Piece::Lit("/".into()),
                Piece::CallRef {
                    call: "order".into(),
                    path: vec!["user".into(), "id".into()]
                },
                Piece::Var(Var::Capture(1)),
            ]
        );
        assert!(parse_template("$nope", &[], &env).is_err());
        assert!(parse_template("$env_Y", &[], &env).is_err());
        let lit = parse_template("a$b", &[1], &env).expect("literal dollar");
        assert_eq!(lit.as_literal().as_deref(), Some("a$b"));
    }
}
