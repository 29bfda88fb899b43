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
        // Sized up front: growing by pushes reallocated 3-4 times for a
        // cache key (`$scheme$request_method$host$request_uri`).
        let size = t
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Lit(s) => s.len(),
                Piece::Var(v) => self.len_hint(v),
                Piece::CallRef { .. } => 0,
            })
            .sum();
        let mut out = String::with_capacity(size);
        self.render_to(t, &mut out);
        out
    }

    /// [`RequestVars::render`] appended to `out`.
    pub fn render_to(&self, t: &Template, out: &mut String) {
        for p in &t.pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Var(v) => self.push_var(v, out),
                // Aggregate call references are rendered by the aggregator.
                Piece::CallRef { .. } => {}
            }
        }
    }

    /// About how long `v`'s value is: exact for the request's own strings.
    fn len_hint(&self, v: &Var) -> usize {
        match v {
            Var::RemoteAddr => 15,
            Var::Host => self.host.len(),
            Var::Scheme => self.scheme.len(),
            Var::RequestMethod => self.method.len(),
            Var::Uri => self.uri.len(),
            Var::RequestUri => self.request_uri.len(),
            Var::Args => self.args.len(),
            Var::RequestId => self.request_id.len(),
            Var::ServerName => self.server_name.len(),
            Var::ServerPort => 5,
            Var::IsArgs => 1,
            _ => 32,
        }
    }

    pub fn push_var(&self, v: &Var, out: &mut String) {
        use std::fmt::Write as _;
        match v {
            // The default rate-limit key: digits without the formatter.
            Var::RemoteAddr => match self.remote_addr {
                IpAddr::V4(a) => {
                    let mut digits = itoa::Buffer::new();
                    for (i, o) in a.octets().into_iter().enumerate() {
                        if i > 0 {
                            out.push('.');
                        }
                        out.push_str(digits.format(o));
                    }
                }
                IpAddr::V6(a) => {
                    let _ = write!(out, "{a}");
                }
            },
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
                if let Some(c) = self.claims {
                    c.push_to(name, out);
                }
            }
            Var::ServerName => out.push_str(self.server_name),
            Var::ServerPort => out.push_str(itoa::Buffer::new().format(self.server_port)),
            Var::IsArgs => {
                if !self.args.is_empty() {
                    out.push('?');
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(remote_addr: IpAddr, headers: &HeaderMap) -> RequestVars<'_> {
        RequestVars {
            remote_addr,
            host: "example.com",
            scheme: "http",
            method: "GET",
            uri: "/a/b",
            request_uri: "/a/b?x=1",
            args: "x=1",
            headers,
            request_id: "id",
            server_name: "example.com",
            server_port: 8080,
            captures: &[],
            named: &[],
            claims: None,
        }
    }

    #[test]
    fn addresses_and_ports_render_as_displayed() {
        let h = HeaderMap::new();
        for a in [
            "0.0.0.0",
            "127.0.0.1",
            "10.0.12.1",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = a.parse().expect("address");
            let mut out = String::new();
            vars(ip, &h).push_var(&Var::RemoteAddr, &mut out);
            assert_eq!(out, ip.to_string());
        }
        let mut out = String::new();
        vars(IpAddr::from([1, 2, 3, 4]), &h).push_var(&Var::ServerPort, &mut out);
        assert_eq!(out, "8080");
    }

    #[test]
    fn a_rendered_template_fits_its_first_allocation() {
        let h = HeaderMap::new();
        let v = vars(IpAddr::from([192, 168, 100, 200]), &h);
        let t = Template {
            pieces: vec![
                Piece::Var(Var::Scheme),
                Piece::Lit("://".into()),
                Piece::Var(Var::Host),
                Piece::Var(Var::RequestUri),
                Piece::Lit(" ".into()),
                Piece::Var(Var::RemoteAddr),
            ],
        };
        let out = v.render(&t);
        assert_eq!(out, "http://example.com/a/b?x=1 192.168.100.200");
        assert_eq!(out.capacity(), out.len());
    }
}
