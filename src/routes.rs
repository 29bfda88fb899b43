//! `tollgate routes`: the routing table in the order the router tries it.
//!
//! Per server, in order of precedence (LANGUAGE.md §3): exact locations,
//! then `^~` prefixes (longest first), then regexes in file order, then plain
//! prefixes (longest first). Read top to bottom, the first row that matches
//! a path is the location that gets it, with one exception the table cannot
//! show: a `^~` row wins only when no longer plain prefix also matches (the
//! longest prefix is chosen first, and only a `^~` one stops the regexes).
//! Listing plain prefixes after the regexes matters: `/app/` does not get
//! `/app/logo.png` when a `\.png$` regex exists. The same data feeds
//! `/config` on the admin listener.

use std::fmt::Write as _;

use crate::config::model::{Config, Handler, Location, Modifier, ProxyTarget, Return, ServerName};

/// One row of the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Route {
    pub server: String,
    pub location: String,
    #[serde(rename = "match")]
    pub kind: &'static str,
    pub handler: String,
    pub policies: Vec<String>,
}

/// `listen,... name,...` for a server (tables, logs).
pub fn server_label(config: &Config, i: usize) -> String {
    let s = &config.servers[i];
    let listens: Vec<String> = s.listens.iter().map(|l| l.addr.to_string()).collect();
    let names: Vec<String> = s
        .names
        .iter()
        .map(|n| match n {
            ServerName::Exact(x) => x.clone(),
            ServerName::LeadingWildcard(x) => format!("*{x}"),
            ServerName::TrailingWildcard(x) => format!("{x}*"),
            ServerName::Regex(r) => format!("~{}", r.as_str()),
        })
        .collect();
    if names.is_empty() {
        listens.join(",")
    } else {
        format!("{} {}", listens.join(","), names.join(","))
    }
}

fn handler_label(config: &Config, l: &Location) -> String {
    match &l.handler {
        Handler::Proxy(p) => {
            let scheme = if p.tls { "https" } else { "http" };
            let host = match &p.target {
                ProxyTarget::Upstream(i) => config.upstreams[*i].name.clone(),
                ProxyTarget::Address { host, port } => format!("{host}:{port}"),
            };
            let uri = p.uri.as_ref().map(template_text).unwrap_or_default();
            let rw = if l.rewrites.is_empty() {
                String::new()
            } else {
                format!(" (+{} rewrite)", l.rewrites.len())
            };
            format!("proxy_pass {scheme}://{host}{uri}{rw}")
        }
        Handler::Return(r) => return_label(r),
        Handler::Aggregate(a) => {
            let names: Vec<&str> = a.calls.iter().map(|c| c.name.as_str()).collect();
            format!("aggregate {}", names.join(","))
        }
    }
}

fn return_label(r: &Return) -> String {
    match r {
        Return::Text { code, .. } => format!("return {code}"),
        Return::Redirect { code, url } => format!("return {code} {}", template_text(url)),
    }
}

/// A template back as text (for display).
pub fn template_text(t: &crate::config::model::Template) -> String {
    use crate::config::model::{Piece, Var};
    let mut s = String::new();
    for p in &t.pieces {
        match p {
            Piece::Lit(l) => s.push_str(l),
            Piece::CallRef { call, path } => {
                let _ = write!(s, "${call}.{}", path.join("."));
            }
            Piece::Var(v) => {
                let name = match v {
                    Var::RemoteAddr => "remote_addr".to_string(),
                    Var::Host => "host".into(),
                    Var::Scheme => "scheme".into(),
                    Var::RequestMethod => "request_method".into(),
                    Var::Uri => "uri".into(),
                    Var::RequestUri => "request_uri".into(),
                    Var::Args => "args".into(),
                    Var::Arg(n) => format!("arg_{n}"),
                    Var::Http(n) => format!("http_{}", n.replace('-', "_")),
                    Var::Cookie(n) => format!("cookie_{n}"),
                    Var::RequestId => "request_id".into(),
                    Var::Capture(n) => n.to_string(),
                    Var::Named(n) => n.clone(),
                    Var::JwtClaim(n) => format!("jwt_claim_{n}"),
                    Var::ServerName => "server_name".into(),
                    Var::ServerPort => "server_port".into(),
                    Var::IsArgs => "is_args".into(),
                };
                let _ = write!(s, "${{{name}}}");
            }
        }
    }
    s
}

/// The rows, in the order the router tries them.
pub fn rows(config: &Config) -> Vec<Route> {
    let mut out = Vec::new();
    for (si, s) in config.servers.iter().enumerate() {
        let server = server_label(config, si);
        let mut order: Vec<&Location> = Vec::new();
        order.extend(s.locations.iter().filter(|l| l.modifier == Modifier::Exact));
        let prefixes = |m: Modifier| {
            let mut v: Vec<&Location> = s.locations.iter().filter(|l| l.modifier == m).collect();
            v.sort_by(|a, b| {
                b.pattern
                    .len()
                    .cmp(&a.pattern.len())
                    .then(a.pattern.cmp(&b.pattern))
            });
            v
        };
        order.extend(prefixes(Modifier::PrefixNoRegex));
        order.extend(s.locations.iter().filter(|l| l.modifier.is_regex()));
        order.extend(prefixes(Modifier::Prefix));
        for l in order {
            let kind = match l.modifier {
                Modifier::Exact => "exact",
                Modifier::PrefixNoRegex => "prefix, stops regex",
                Modifier::Prefix => "prefix",
                Modifier::Regex => "regex",
                Modifier::RegexCaseless => "regex, caseless",
            };
            let mut policies = Vec::new();
            if let Some(j) = l.settings.auth_jwt {
                policies.push(format!("auth_jwt {}", config.jwt[j].name));
            }
            for r in &l.settings.rate_limits {
                policies.push(format!("rate_limit {}", config.rate_limits[*r].name));
            }
            if let Some(c) = l.settings.cache {
                policies.push(format!("cache {}", config.caches[c].name));
            }
            if l.settings.wrap_response {
                policies.push("wrap_response".into());
            }
            out.push(Route {
                server: server.clone(),
                location: l.route.clone(),
                kind,
                handler: handler_label(config, l),
                policies,
            });
        }
        // A server with only a server-level `return` still answers.
        if let (true, Some(r)) = (s.locations.is_empty(), &s.server_return) {
            out.push(Route {
                server: server.clone(),
                location: "(any)".into(),
                kind: "server",
                handler: return_label(r),
                policies: Vec::new(),
            });
        }
    }
    out
}

/// The table as aligned text.
pub fn table(config: &Config) -> String {
    let rows = rows(config);
    let headers = ["SERVER", "LOCATION", "MATCH", "HANDLER", "POLICIES"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.server.clone(),
                r.location.clone(),
                r.kind.to_string(),
                r.handler.clone(),
                if r.policies.is_empty() {
                    "-".into()
                } else {
                    r.policies.join(", ")
                },
            ]
        })
        .collect();
    let mut widths = headers.map(str::len);
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            widths[i] = widths[i].max(v.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, vals: [&str; 5]| {
        for (i, v) in vals.iter().enumerate() {
            if i == 4 {
                let _ = write!(out, "{v}");
            } else {
                let _ = write!(out, "{v:<w$}  ", w = widths[i]);
            }
        }
        out.push('\n');
    };
    line(&mut out, headers);
    for c in &cells {
        line(&mut out, [&c[0], &c[1], &c[2], &c[3], &c[4]]);
    }
    out
}
