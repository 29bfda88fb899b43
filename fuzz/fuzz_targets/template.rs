//! bytes → `parse_template` → render with request variables built from
//! fuzzed headers and args: must never panic.
//!
//! Input layout (lossy UTF-8): the first line is the template, where `\$`
//! is a literal dollar (as the config lexer reports it); the second line is
//! the query string (`$args`, `$arg_NAME`); the third is the request path
//! (`$uri`); every further `name: value` line is a request header (lines
//! that are not a valid header are skipped).
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tollgate::config::model::Piece;
use tollgate::config::value::{TemplateEnv, parse_template};
use tollgate::proxy::vars::RequestVars;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let raw = lines.next().unwrap_or_default();
    let args = lines.next().unwrap_or_default();
    let uri = lines.next().unwrap_or_default();
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some((n, v)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.trim().as_bytes()),
            HeaderValue::from_bytes(v.trim().as_bytes()),
        ) {
            headers.append(n, v);
        }
    }

    // `\$` → `$`, remembering where those dollars are.
    let mut value = String::with_capacity(raw.len());
    let mut literal_dollars = Vec::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && chars.peek() == Some(&'$') {
            chars.next();
            literal_dollars.push(value.len());
            value.push('$');
        } else {
            value.push(c);
        }
    }

    let env_fn = |name: &str| (name == "X").then(|| "x".to_string());
    let named_captures = vec!["name".to_string(), "id".to_string()];
    let calls = vec!["user".to_string()];
    let env = TemplateEnv {
        env: &env_fn,
        named_captures: &named_captures,
        calls: &calls,
    };
    let Ok(template) = parse_template(&value, &literal_dollars, &env) else {
        return;
    };
    let captures = vec![
        Some("/whole".to_string()),
        Some("one".to_string()),
        None,
        Some(String::new()),
    ];
    let named = vec![("name".to_string(), "n".to_string())];
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("example.test")
        .to_string();
    let request_uri = if args.is_empty() {
        uri.to_string()
    } else {
        format!("{uri}?{args}")
    };
    let vars = RequestVars {
        remote_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        host: &host,
        scheme: "http",
        method: "GET",
        uri,
        request_uri: &request_uri,
        args,
        headers: &headers,
        request_id: "req-1",
        server_name: "example.test",
        server_port: 8080,
        captures: &captures,
        named: &named,
        claims: None,
    };
    let out = vars.render(&template);
    // Literal text is copied through unchanged.
    let lits: String = template
        .pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Lit(s) => Some(s.as_str()),
            _ => None,
        })
        .collect();
    if template.pieces.iter().all(|p| matches!(p, Piece::Lit(_))) {
        assert_eq!(out, lits);
    }
    assert!(out.len() >= lits.len());
});
