//! Per-request variable values and template rendering (LANGUAGE.md §1).

use std::net::IpAddr;

use http::HeaderMap;

use crate::config::model::{Piece, Template, Var};

/// What a request offers to templates.
pub struct RequestVars<'a> {
    pub remote_addr: IpAddr,
    pub host: &'a str,
    pub scheme: &'static str,
    pub method: &'a str,
    /// The normalized path.
    pub uri: &'a str,
    /// The request target as received.
    pub request_uri: &'a str,
    pub args: &'a str,
    pub headers: &'a HeaderMap,
    pub request_id: &'a str,
    pub server_name: &'a str,
    pub server_port: u16,
    /// `$0..$9` values of the winning regex (index = group).
    pub captures: &'a [Option<String>],
    /// Named captures.
    pub named: &'a [(String, String)],
    /// The verified token's claims, when an `auth_jwt` applies.
    pub claims: Option<&'a crate::policy::jwt::Claims>,
}

impl RequestVars<'_> {
    pub fn render(&self, t: &Template) -> String {
        let mut out = String::new();
        for p in &t.pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Var(v) => self.push_var(v, &mut out),
                // Aggregate call references are rendered by the aggregator.
                Piece::CallRef { .. } => {}
            }
        }
        out
    }

    pub fn push_var(&self, v: &Var, out: &mut String) {
        use std::fmt::Write as _;
        match v {
            Var::RemoteAddr => {
                let _ = write!(out, "{}", self.remote_addr);
            }
            Var::Host => out.push_str(self.host),
            Var::Scheme => out.push_str(self.scheme),
            Var::RequestMethod => out.push_str(self.method),
            Var::Uri => out.push_str(self.uri),
            Var::RequestUri => out.push_str(self.request_uri),
            Var::Args => out.push_str(self.args),
            Var::Arg(name) => {
                for pair in self.args.split('&') {
                    let (k, val) = pair.split_once('=').unwrap_or((pair, ""));
                    if k == name {
                        out.push_str(val);
                        break;
                    }
                }
            }
            Var::Http(name) => {
                let mut first = true;
                for v in self.headers.get_all(name.as_str()) {
                    if !first {
                        out.push_str(", ");
                    }
                    first = false;
                    out.push_str(v.to_str().unwrap_or(""));
                }
            }
            Var::Cookie(name) => {
                for h in self.headers.get_all(http::header::COOKIE) {
                    for c in h.to_str().unwrap_or("").split(';') {
                        if let Some((k, val)) = c.trim().split_once('=')
                            && k == name
                        {
                            out.push_str(val);
                            return;
                        }
                    }
                }
            }
            Var::RequestId => out.push_str(self.request_id),
            Var::Capture(n) => {
                if let Some(Some(s)) = self.captures.get(*n as usize) {
                    out.push_str(s);
                }
            }
            Var::Named(name) => {
                if let Some((_, v)) = self.named.iter().find(|(k, _)| k == name) {
                    out.push_str(v);
                }
            }
            Var::JwtClaim(name) => {
                if let Some(v) = self.claims.and_then(|c| c.get(name)) {
                    out.push_str(&v);
                }
            }
            Var::ServerName => out.push_str(self.server_name),
            Var::ServerPort => {
                let _ = write!(out, "{}", self.server_port);
            }
            Var::IsArgs => {
                if !self.args.is_empty() {
                    out.push('?');
                }
            }
        }
    }
}
