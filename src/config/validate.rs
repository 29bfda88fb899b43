//! Syntax tree → validated [`Config`], reporting every mistake at once.
//!
//! Three steps, none of which stops at the first error:
//! 1. collect the names of the definitions (`upstream`, `auth_jwt`,
//!    `rate_limit`, `cache`) so that uses can be resolved in any order;
//! 2. walk the tree with the directive table ([`crate::config::schema`]):
//!    unknown directive, wrong context, argument count, then the directive's
//!    own `check`, which yields a typed [`Setting`];
//! 3. assemble: resolve inheritance (main → server → location) and run the
//!    whole-config checks (unreachable locations, listen conflicts,
//!    aggregate graphs, unused definitions).
//!
//! A [`Config`] is returned only when there is no error (warnings allowed).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::ast::{Arg, Directive};
use crate::config::diagnostics::{Diagnostic, Diagnostics, did_you_mean};
use crate::config::model::*;
use crate::config::parse::Loaded;
use crate::config::schema::{self, BlockKind, Ctx, Item, LocationDraft, ServerDraft, Setting};
use crate::config::source::{SourceMap, Span};
use crate::config::value::{self, TemplateEnv};

/// Validate a loaded tree. `env` resolves `$env_NAME`.
pub fn validate(
    loaded: &Loaded,
    env: &dyn Fn(&str) -> Option<String>,
    diags: &mut Diagnostics,
) -> Option<Config> {
    let mut cx = Cx {
        sources: &loaded.sources,
        diags,
        env,
        defs: Defs::default(),
        used: HashSet::new(),
        named_captures: Vec::new(),
        capture_count: 0,
        in_regex_location: false,
        captures_unknown: false,
        jwt_claim_uses: Vec::new(),
        reported_claim_uses: HashSet::new(),
        check_files: true,
    };
    let top = flatten_http(&loaded.directives, &mut cx);
    cx.collect_defs(&top);
    let items = cx.walk(&top, Ctx::Main);
    let config = assemble(&mut cx, items, loaded.files.clone());
    if cx.diags.has_errors() { None } else { config }
}

/// Load, parse and validate a file with the process environment: what `check`,
/// `run` and reload all call.
pub fn load_config(path: &Path) -> Result<(Option<Config>, Loaded, Diagnostics), std::io::Error> {
    let mut diags = Diagnostics::new();
    let loaded = crate::config::parse::load(path, &mut diags)?;
    let env = |name: &str| std::env::var(name).ok();
    let config = validate(&loaded, &env, &mut diags);
    let config = if diags.has_errors() { None } else { config };
    Ok((config, loaded, diags))
}

/// `http { ... }` is a transparent wrapper: its contents are top-level.
fn flatten_http<'a>(ds: &'a [Directive], cx: &mut Cx<'_>) -> Vec<&'a Directive> {
    let mut out = Vec::new();
    for d in ds {
        if d.name == "http" && d.block.is_some() {
            if !d.args.is_empty() {
                cx.diags.push(
                    Diagnostic::error(
                        "wrong_argument_count",
                        d.args_span(),
                        "`http` takes no arguments",
                    )
                    .label("unexpected argument")
                    .help("write `http {`"),
                );
            }
            out.extend(flatten_http(d.children(), cx));
        } else {
            out.push(d);
        }
    }
    out
}

#[derive(Default)]
struct Defs {
    upstreams: Vec<(String, Span)>,
    jwt: Vec<(String, Span)>,
    rate_limits: Vec<(String, Span)>,
    caches: Vec<(String, Span)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum DefKind {
    Upstream,
    Jwt,
    RateLimit,
    Cache,
}

impl DefKind {
    fn word(self) -> &'static str {
        match self {
            DefKind::Upstream => "upstream",
            DefKind::Jwt => "auth_jwt",
            DefKind::RateLimit => "rate_limit",
            DefKind::Cache => "cache",
        }
    }
}

/// The validation context handed to every `check`.
pub struct Cx<'a> {
    sources: &'a SourceMap,
    diags: &'a mut Diagnostics,
    env: &'a dyn Fn(&str) -> Option<String>,
    defs: Defs,
    used: HashSet<(DefKind, usize)>,
    /// Named captures of the enclosing regex location.
    named_captures: Vec<String>,
    /// Positional captures available (`$1`..): groups of the location regex.
    capture_count: usize,
    in_regex_location: bool,
    /// Inside a location whose key is invalid: captures cannot be known.
    captures_unknown: bool,
    jwt_claim_uses: Vec<Span>,
    /// Inherited `$jwt_claim_*` uses already reported (once per span).
    reported_claim_uses: HashSet<Span>,
    /// Check that referenced files are readable.
    check_files: bool,
}

impl Cx<'_> {
    fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn defs_of(&self, kind: DefKind) -> &Vec<(String, Span)> {
        match kind {
            DefKind::Upstream => &self.defs.upstreams,
            DefKind::Jwt => &self.defs.jwt,
            DefKind::RateLimit => &self.defs.rate_limits,
            DefKind::Cache => &self.defs.caches,
        }
    }

    fn collect_defs(&mut self, top: &[&Directive]) {
        for d in top {
            let kind = match (d.name.as_str(), d.block.is_some()) {
                ("upstream", true) => DefKind::Upstream,
                ("auth_jwt", true) => DefKind::Jwt,
                ("rate_limit", true) => DefKind::RateLimit,
                ("cache", true) => DefKind::Cache,
                _ => continue,
            };
            let Some(arg) = d.args.first() else { continue };
            let name = arg.text();
            let list = match kind {
                DefKind::Upstream => &mut self.defs.upstreams,
                DefKind::Jwt => &mut self.defs.jwt,
                DefKind::RateLimit => &mut self.defs.rate_limits,
                DefKind::Cache => &mut self.defs.caches,
            };
            if let Some((_, first)) = list.iter().find(|(n, _)| *n == name) {
                let first = *first;
                self.diags.push(
                    Diagnostic::error(
                        "duplicate_definition",
                        arg.span,
                        format!("`{} {name}` is defined twice", kind.word()),
                    )
                    .label("defined again here")
                    .secondary(first, "first defined here")
                    .help("rename one of them, or remove the duplicate"),
                );
            } else {
                list.push((name, arg.span));
            }
        }
    }

    /// Resolve a use of a definition, with "did you mean".
    fn resolve(&mut self, kind: DefKind, arg: &Arg) -> Option<usize> {
        let name = arg.text();
        let list = self.defs_of(kind);
        if let Some(i) = list.iter().position(|(n, _)| *n == name) {
            self.used.insert((kind, i));
            return Some(i);
        }
        let suggestion =
            did_you_mean(&name, list.iter().map(|(n, _)| n.as_str())).map(str::to_string);
        self.mark_suggested_used(kind, suggestion.as_deref());
        let help = match suggestion {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!(
                "define it at the top level: `{} {name} {{ ... }}`",
                kind.word()
            ),
        };
        self.push(
            Diagnostic::error(
                match kind {
                    DefKind::Upstream => "unknown_upstream",
                    _ => "unknown_policy",
                },
                arg.span,
                format!("unknown {} `{name}`", kind.word()),
            )
            .label("no definition with this name")
            .help(help),
        );
        None
    }

    /// A misspelled use whose suggestion names a definition: count that
    /// definition as used, so that one typo gives one diagnostic, not also
    /// an "unused" warning on the definition it meant.
    fn mark_suggested_used(&mut self, kind: DefKind, suggestion: Option<&str>) {
        if let Some(i) =
            suggestion.and_then(|s| self.defs_of(kind).iter().position(|(n, _)| n == s))
        {
            self.used.insert((kind, i));
        }
    }

    /// Walk the directives of one context: the generic checks of the table,
    /// then each directive's own `check`.
    pub fn walk(&mut self, ds: &[&Directive], ctx: Ctx) -> Vec<Item> {
        let mut out = Vec::new();
        for d in ds {
            if let Some(spec) = self.spec_for(d, ctx)
                && let Some(setting) = (spec.check)(self, d)
            {
                out.push(Item {
                    setting,
                    span: d.span,
                    name_span: d.name_span,
                });
            }
        }
        out
    }

    /// The generic checks; returns the spec when they pass.
    fn spec_for(&mut self, d: &Directive, ctx: Ctx) -> Option<&'static schema::DirectiveSpec> {
        let name = d.name.as_str();
        let valid_name = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let specs: Vec<_> = schema::lookup(name).collect();
        if specs.is_empty() {
            let lower = name.to_ascii_lowercase();
            let suggestion = if lower != name && schema::is_known_directive(&lower) {
                Some(lower.as_str().to_string())
            } else {
                // The closest name anywhere (names allowed here first, so
                // they win ties): `proxy_pas` in a server is `proxy_pass`,
                // not the closest server directive.
                let all = schema::names_in(ctx).chain(schema::DIRECTIVES.iter().map(|s| s.name));
                did_you_mean(name, all).map(str::to_string)
            };
            let msg = if valid_name {
                format!("unknown directive `{name}`")
            } else {
                format!("`{name}` is not a directive name")
            };
            let help = match suggestion {
                Some(s) if schema::names_in(ctx).any(|n| n == s) => format!("did you mean `{s}`?"),
                Some(s) => {
                    let mut places: Vec<&str> = schema::lookup(&s)
                        .flat_map(|sp| sp.contexts.iter().map(|c| c.name()))
                        .collect();
                    places.dedup();
                    format!(
                        "did you mean `{s}`? (it goes in {}, not in {})",
                        places.join(", "),
                        ctx.name()
                    )
                }
                None => format!(
                    "directives allowed in {} are listed in LANGUAGE.md; names are `[a-z_][a-z0-9_]*`",
                    ctx.name()
                ),
            };
            self.push(
                Diagnostic::error("unknown_directive", d.name_span, msg)
                    .label("not a tollgate directive")
                    .help(help),
            );
            return None;
        }
        let in_ctx: Vec<_> = specs.iter().filter(|s| s.contexts.contains(&ctx)).collect();
        if in_ctx.is_empty() {
            let mut allowed: Vec<&str> = specs
                .iter()
                .flat_map(|s| s.contexts.iter().map(|c| c.name()))
                .collect();
            allowed.dedup();
            let help = if name == "location" && ctx == Ctx::Location {
                "nested locations are not supported: move this location up into the server"
                    .to_string()
            } else {
                format!("`{name}` is allowed in {}", allowed.join(", "))
            };
            self.push(
                Diagnostic::error(
                    "wrong_context",
                    d.name_span,
                    format!("`{name}` is not allowed in {}", ctx.name()),
                )
                .label("not allowed here")
                .help(help),
            );
            return None;
        }
        let has_block = d.block.is_some();
        let spec = in_ctx
            .iter()
            .find(|s| (s.block == BlockKind::Yes) == has_block)
            .copied()
            .copied();
        let Some(spec) = spec else {
            let s = in_ctx[0];
            let (msg, help) = if has_block {
                (
                    format!("`{name}` takes no block here"),
                    format!("write `{}`", s.syntax),
                )
            } else {
                (
                    format!("`{name}` needs a block here"),
                    format!("write `{}`", s.syntax),
                )
            };
            self.push(
                Diagnostic::error("block_mismatch", d.name_span, msg)
                    .label(if has_block {
                        "unexpected block"
                    } else {
                        "missing `{ ... }`"
                    })
                    .help(help),
            );
            return None;
        };
        let n = d.args.len();
        if n < spec.args.0 || n > spec.args.1 {
            let expected = match spec.args {
                (a, b) if a == b => format!("{a}"),
                (a, usize::MAX) => format!("at least {a}"),
                (a, b) => format!("{a} to {b}"),
            };
            let span = if n > spec.args.1 {
                d.args[spec.args.1].span.to(d.args[n - 1].span)
            } else {
                d.args_span()
            };
            self.push(
                Diagnostic::error(
                    "wrong_argument_count",
                    span,
                    format!(
                        "`{name}` takes {expected} argument{}, {n} given",
                        if expected == "1" { "" } else { "s" }
                    ),
                )
                .label(if n > spec.args.1 {
                    "unexpected argument"
                } else {
                    "arguments missing"
                })
                .help(format!("write `{}`", spec.syntax)),
            );
            return None;
        }
        Some(spec)
    }

    /// Validated children of a definition block; the caller interprets them.
    fn members<'d>(&mut self, d: &'d Directive, ctx: Ctx) -> Vec<&'d Directive> {
        let mut out = Vec::new();
        for c in d.children() {
            if self.spec_for(c, ctx).is_some() {
                out.push(c);
            }
        }
        out
    }

    fn bad_arg(
        &mut self,
        code: &'static str,
        arg: &Arg,
        msg: impl Into<String>,
        help: impl Into<String>,
    ) {
        self.bad_arg_labeled(code, arg, msg, "invalid value", help);
    }

    fn bad_arg_labeled(
        &mut self,
        code: &'static str,
        arg: &Arg,
        msg: impl Into<String>,
        label: impl Into<String>,
        help: impl Into<String>,
    ) {
        self.push(
            Diagnostic::error(code, arg.span, msg)
                .label(label)
                .help(help),
        );
    }

    fn size(&mut self, arg: &Arg) -> Option<u64> {
        match value::parse_size(&arg.text()) {
            Ok(v) => Some(v),
            Err(e) => {
                self.bad_arg(
                    "invalid_size",
                    arg,
                    format!("bad size: {e}"),
                    "sizes are bytes: `512`, `64k`, `10m`, `1g`",
                );
                None
            }
        }
    }

    fn duration(&mut self, arg: &Arg) -> Option<Duration> {
        match value::parse_duration(&arg.text()) {
            Ok(v) => Some(v),
            Err(e) => {
                self.bad_arg(
                    "invalid_duration",
                    arg,
                    format!("bad duration: {e}"),
                    "durations are `500ms`, `30s`, `5m`, `1h`, `1d`, or combined like `1m30s`",
                );
                None
            }
        }
    }

    fn number<T: std::str::FromStr>(&mut self, arg: &Arg, what: &str) -> Option<T> {
        match arg.text().parse::<T>() {
            Ok(v) => Some(v),
            Err(_) => {
                self.bad_arg(
                    "invalid_number",
                    arg,
                    format!("`{}` is not a valid {what}", arg.text()),
                    format!("write a whole number ({what})"),
                );
                None
            }
        }
    }

    fn on_off(&mut self, arg: &Arg) -> Option<bool> {
        match arg.text().as_str() {
            "on" => Some(true),
            "off" => Some(false),
            other => {
                self.bad_arg(
                    "invalid_value",
                    arg,
                    format!("expected `on` or `off`, found `{other}`"),
                    "write `on` or `off`",
                );
                None
            }
        }
    }

    /// Parse a template argument, reporting unknown variables at their span.
    fn template(&mut self, arg: &Arg) -> Option<Template> {
        self.template_with(arg, &[])
    }

    fn template_with(&mut self, arg: &Arg, calls: &[String]) -> Option<Template> {
        let named = self.named_captures.clone();
        let env = TemplateEnv {
            env: self.env,
            named_captures: &named,
            calls,
        };
        match value::parse_template(&arg.value, &arg.literal_dollars, &env) {
            Ok(t) => {
                let mut ok = true;
                for v in t.vars() {
                    match v {
                        Var::Capture(n)
                            if *n as usize > self.capture_count && !self.captures_unknown =>
                        {
                            ok = false;
                            let msg =
                                format!("`${n}` refers to a capture that does not exist here");
                            let help = if self.capture_count == 0 {
                                "captures come from a regex location or a `rewrite` regex; there is none here".to_string()
                            } else {
                                format!(
                                    "the regex here has {} capture group(s)",
                                    self.capture_count
                                )
                            };
                            self.push(
                                Diagnostic::error("unknown_variable", arg.span, msg)
                                    .label("no such capture")
                                    .help(help),
                            );
                        }
                        _ => {}
                    }
                }
                if t.vars().any(|v| matches!(v, Var::JwtClaim(_))) {
                    let spans = self.claim_spans(arg);
                    self.jwt_claim_uses.extend(spans);
                }
                ok.then_some(t)
            }
            Err(errors) => {
                for e in errors {
                    if self.captures_unknown && !e.message.starts_with("environment variable") {
                        // Perhaps a named capture of the invalid regex.
                        continue;
                    }
                    let span = self.arg_sub_span(arg, e.start, e.end);
                    let (code, label) = if e.message.starts_with("environment variable") {
                        ("unset_env", "not set in the environment")
                    } else {
                        ("unknown_variable", "cannot be evaluated here")
                    };
                    self.push(
                        Diagnostic::error(code, span, e.message)
                            .label(label)
                            .help(e.help),
                    );
                }
                None
            }
        }
    }

    /// The spans of the `$jwt_claim_*` variables in an argument.
    fn claim_spans(&self, arg: &Arg) -> Vec<Span> {
        let v = arg.value.as_str();
        let mut out = Vec::new();
        let mut from = 0;
        while let Some(p) = v[from..].find("jwt_claim_").map(|p| p + from) {
            let start = match (v[..p].ends_with('$'), v[..p].ends_with("${")) {
                (true, _) => p - 1,
                (_, true) => p - 2,
                _ => {
                    from = p + 1;
                    continue;
                }
            };
            let mut end = p + "jwt_claim_".len();
            while end < v.len()
                && (v.as_bytes()[end].is_ascii_alphanumeric() || v.as_bytes()[end] == b'_')
            {
                end += 1;
            }
            if v.as_bytes()[start + 1] == b'{' && v.as_bytes().get(end) == Some(&b'}') {
                end += 1;
            }
            if !arg.literal_dollars.contains(&start) {
                out.push(self.arg_sub_span(arg, start, end));
            }
            from = end;
        }
        if out.is_empty() {
            out.push(arg.span);
        }
        out
    }

    /// The span of bytes `start..end` of an argument's value; exact for bare
    /// words and for quoted strings without escapes, the whole argument
    /// otherwise.
    fn arg_sub_span(&self, arg: &Arg, start: usize, end: usize) -> Span {
        match arg.quote {
            None => arg.span.sub(start, end),
            Some(_) if arg.raw.len() == arg.value.len() + 2 => arg.span.sub(start + 1, end + 1),
            Some(_) => arg.span,
        }
    }

    /// A path relative to the directory of the file holding `arg`.
    fn path(&mut self, arg: &Arg, must_exist: bool) -> PathBuf {
        let text = arg.text();
        let p = Path::new(&text);
        let full = if p.is_absolute() {
            p.to_path_buf()
        } else {
            let dir = self
                .sources
                .path(arg.span.file)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            dir.join(p)
        };
        if must_exist
            && self.check_files
            && let Err(e) = std::fs::File::open(&full)
        {
            self.push(
                Diagnostic::error(
                    "unreadable_file",
                    arg.span,
                    format!("cannot read `{}`", full.display()),
                )
                .label(e.to_string())
                .help("check the path; it is relative to the directory of this config file"),
            );
        }
        full
    }

    fn regex(&mut self, arg: &Arg, caseless: bool) -> Option<regex::Regex> {
        let pattern = arg.text();
        if let Err(e) = regex_syntax::ast::parse::Parser::new().parse(&pattern) {
            let s = e.span();
            let span = self.arg_sub_span(
                arg,
                s.start.offset,
                s.end
                    .offset
                    .max(s.start.offset + 1)
                    .min(pattern.len().max(1)),
            );
            self.push(
                Diagnostic::error(
                    "invalid_regex",
                    span,
                    format!("invalid regex: {}", e.kind()),
                )
                .label(e.kind().to_string())
                .help(
                    "regexes use Rust regex syntax (PCRE-like); quote a regex with `{`, `}` or `;`",
                ),
            );
            return None;
        }
        let built = regex::RegexBuilder::new(&pattern)
            .case_insensitive(caseless)
            .size_limit(1 << 22)
            .build();
        match built {
            Ok(r) => Some(r),
            Err(e) => {
                self.push(
                    Diagnostic::error("invalid_regex", arg.span, "invalid regex")
                        .label(
                            e.to_string()
                                .lines()
                                .last()
                                .unwrap_or("invalid")
                                .to_string(),
                        )
                        .help(
                            "simplify the regex (look-around and backreferences are not supported)",
                        ),
                );
                None
            }
        }
    }

    fn header_name(&mut self, arg: &Arg) -> Option<String> {
        let name = arg.text();
        let ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if ok {
            Some(name.to_ascii_lowercase())
        } else {
            self.bad_arg(
                "invalid_header_name",
                arg,
                format!("`{name}` is not a valid header name"),
                "header names are tokens like `X-User-Id`",
            );
            None
        }
    }

    fn cidr(&mut self, arg: &Arg) -> Option<Cidr> {
        let text = arg.text();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a.to_string(), Some(p.to_string())),
            None => (text.clone(), None),
        };
        let ip: Option<IpAddr> = addr.parse().ok();
        let parsed = ip.and_then(|ip| {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
                None => max,
            };
            Some(Cidr { addr: ip, prefix })
        });
        if parsed.is_none() {
            self.bad_arg(
                "invalid_cidr",
                arg,
                format!("`{text}` is not an address or CIDR"),
                "write e.g. `10.0.0.0/8`, `192.168.1.10` or `::1`",
            );
        }
        parsed
    }
}

// ====================================================================== checks

pub(crate) fn consumed(_: &mut Cx<'_>, _: &Directive) -> Option<Setting> {
    Some(Setting::Consumed)
}

pub(crate) fn server(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let children: Vec<&Directive> = d.children().iter().collect();
    let main_uses = std::mem::take(&mut cx.jwt_claim_uses);
    let items = cx.walk(&children, Ctx::Server);
    let jwt_claim_uses = std::mem::replace(&mut cx.jwt_claim_uses, main_uses);
    let listen_written = d.children().iter().any(|c| c.name == "listen");
    Some(Setting::Server(ServerDraft {
        items,
        jwt_claim_uses,
        listen_written,
    }))
}

pub(crate) fn location(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    // A bad modifier or URI still has its block checked (every error in one
    // run, and definitions used only in there do not look unused).
    let mut key_ok = true;
    let glued_uri;
    let (modifier, uri) = if d.args.len() == 2 {
        let m = match d.args[0].text().as_str() {
            "=" => Modifier::Exact,
            "^~" => Modifier::PrefixNoRegex,
            "~" => Modifier::Regex,
            "~*" => Modifier::RegexCaseless,
            other => {
                cx.bad_arg(
                    "invalid_location_modifier",
                    &d.args[0],
                    format!("unknown location modifier `{other}`"),
                    "use `=`, `^~`, `~` or `~*`",
                );
                key_ok = false;
                Modifier::Prefix
            }
        };
        (m, &d.args[1])
    } else {
        let a = &d.args[0];
        let t = a.text();
        if matches!(t.as_str(), "=" | "^~" | "~" | "~*") {
            cx.push(
                Diagnostic::error(
                    "wrong_argument_count",
                    a.span,
                    "location has a modifier but no URI",
                )
                .label("missing URI after this")
                .help("write `location = /path {`"),
            );
            key_ok = false;
        }
        // NGINX also takes the modifier glued to the URI: `location =/x`,
        // `location ~*\.png$`, `location ^~/static/`.
        let glued = [
            ("~*", Modifier::RegexCaseless),
            ("^~", Modifier::PrefixNoRegex),
            ("~", Modifier::Regex),
            ("=", Modifier::Exact),
        ]
        .into_iter()
        .find(|(m, _)| t.starts_with(m));
        match glued {
            Some((m, modifier)) => {
                glued_uri = arg_tail(a, m.len());
                (modifier, &glued_uri)
            }
            None => (Modifier::Prefix, a),
        }
    };
    let pattern = uri.text();
    let mut regex = None;
    if key_ok && modifier.is_regex() {
        regex = cx.regex(uri, modifier == Modifier::RegexCaseless);
        key_ok = regex.is_some();
    } else if key_ok && !pattern.starts_with('/') {
        let help = if pattern.starts_with('@') {
            "named locations are not supported; use a path".to_string()
        } else {
            format!("write `/{pattern}`")
        };
        cx.bad_arg(
            "invalid_location",
            uri,
            format!("location URI `{pattern}` does not start with `/`"),
            help,
        );
        key_ok = false;
    }
    let saved = (
        std::mem::take(&mut cx.named_captures),
        cx.capture_count,
        cx.in_regex_location,
        std::mem::take(&mut cx.jwt_claim_uses),
        cx.captures_unknown,
    );
    if let Some(r) = &regex {
        cx.named_captures = r.capture_names().flatten().map(str::to_string).collect();
        cx.capture_count = r.captures_len() - 1;
        cx.in_regex_location = true;
    } else {
        cx.capture_count = 0;
        cx.in_regex_location = modifier.is_regex();
        // The regex did not compile: its captures are unknown, so `$1` and
        // `$id` in the block are not reported on top.
        cx.captures_unknown = !key_ok;
    }
    let children: Vec<&Directive> = d.children().iter().collect();
    let items = cx.walk(&children, Ctx::Location);
    let jwt_claim_uses = std::mem::replace(&mut cx.jwt_claim_uses, saved.3);
    cx.named_captures = saved.0;
    cx.capture_count = saved.1;
    cx.in_regex_location = saved.2;
    cx.captures_unknown = saved.4;
    let key_span = d.args_span();
    let handlers: Vec<Span> = d
        .children()
        .iter()
        .filter(|c| matches!(c.name.as_str(), "proxy_pass" | "return" | "aggregate"))
        .map(|c| c.name_span)
        .collect();
    let misspelled_handler = d.children().iter().any(|c| {
        !schema::is_known_directive(&c.name)
            && did_you_mean(&c.name, ["proxy_pass", "return", "aggregate"]).is_some()
    });
    for extra in handlers.iter().skip(1) {
        cx.push(
            Diagnostic::error("multiple_handlers", *extra, "location has two handlers")
                .label("second handler")
                .secondary(handlers[0], "first handler here")
                .help("a location has exactly one of `proxy_pass`, `return`, `aggregate`"),
        );
    }
    if !key_ok {
        return None;
    }
    Some(Setting::Location(LocationDraft {
        span: d.span,
        key_span,
        modifier,
        pattern,
        regex,
        items,
        jwt_claim_uses,
        handlers,
        misspelled_handler,
    }))
}

/// `a` without its first `n` bytes (an ASCII prefix such as a modifier), with
/// a span that stays exact where [`Cx::arg_sub_span`] can be exact.
fn arg_tail(a: &Arg, n: usize) -> Arg {
    let value = a.value.get(n..).unwrap_or("").to_string();
    let literal_dollars = a
        .literal_dollars
        .iter()
        .filter(|o| **o >= n)
        .map(|o| o - n)
        .collect();
    match a.quote {
        None => Arg {
            raw: value.clone(),
            value,
            literal_dollars,
            quote: None,
            span: a.span.sub(n, a.span.len()),
        },
        // Quoted without escapes: the value is the source text between the quotes.
        Some(_) if a.raw.len() == a.value.len() + 2 => Arg {
            raw: value.clone(),
            value,
            literal_dollars,
            quote: None,
            span: a.span.sub(n + 1, a.span.len() - 1),
        },
        // Escapes shift offsets: keep the whole argument as the span.
        Some(q) => Arg {
            value,
            literal_dollars,
            raw: a.raw.clone(),
            quote: Some(q),
            span: a.span,
        },
    }
}

/// `HOST:PORT` (port required unless `default_port`).
fn host_port(text: &str, default_port: Option<u16>) -> Option<(String, u16)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port?,
            None => return None,
        };
        h.parse::<std::net::Ipv6Addr>().ok()?;
        return Some((format!("[{h}]"), port));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().ok()?),
        None => (text, default_port?),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    host_ok.then(|| (host.to_ascii_lowercase(), port))
}

pub(crate) fn upstream(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let name = d.args[0].text();
    let mut servers = Vec::new();
    let mut balance: Option<(Balance, Span)> = None;
    let mut keepalive = 32;
    let mut health_check = None;
    let mut resolve_ttl = Duration::from_secs(30);
    let mut ok = true;
    let members = cx.members(d, Ctx::Upstream);
    // A `hash $jwt_claim_*` key is checked at each location using this
    // upstream, not as a top-level use.
    let saved_claims = std::mem::take(&mut cx.jwt_claim_uses);
    for m in &members {
        if m.name == "resolve_ttl" {
            resolve_ttl = cx.duration(&m.args[0]).unwrap_or(resolve_ttl);
        }
    }
    for m in members {
        let mut set_balance = |cx: &mut Cx<'_>, b: Balance| {
            if let Some((_, first)) = &balance {
                cx.push(
                    Diagnostic::error(
                        "conflicting_balance",
                        m.name_span,
                        format!("upstream `{name}` has two balancing methods"),
                    )
                    .label("second method")
                    .secondary(*first, "first method here")
                    .help("keep one of `least_conn`, `random`, `ip_hash`, `hash`"),
                );
            } else {
                balance = Some((b, m.name_span));
            }
        };
        match m.name.as_str() {
            "server" => match upstream_server(cx, m, resolve_ttl) {
                Some(s) => servers.push(s),
                None => ok = false,
            },
            "least_conn" => set_balance(cx, Balance::LeastConn),
            "ip_hash" => set_balance(cx, Balance::IpHash),
            "random" => match m.args.first().map(|a| a.text()) {
                None => set_balance(cx, Balance::Random { two: false }),
                Some(t) if t == "two" => set_balance(cx, Balance::Random { two: true }),
                Some(t) => cx.bad_arg(
                    "invalid_value",
                    &m.args[0],
                    format!("unknown `random` option `{t}`"),
                    "write `random;` or `random two;`",
                ),
            },
            "hash" => {
                let consistent = match m.args.get(1).map(|a| a.text()) {
                    None => false,
                    Some(t) if t == "consistent" => true,
                    Some(t) => {
                        cx.bad_arg(
                            "invalid_value",
                            &m.args[1],
                            format!("unknown `hash` option `{t}`"),
                            "write `hash KEY consistent;`",
                        );
                        false
                    }
                };
                if let Some(key) = cx.template(&m.args[0]) {
                    set_balance(cx, Balance::Hash { key, consistent });
                }
            }
            "keepalive" => {
                keepalive = cx
                    .number(&m.args[0], "connection count")
                    .unwrap_or(keepalive)
            }
            "health_check" => health_check = health_check_params(cx, m),
            _ => {}
        }
    }
    cx.jwt_claim_uses = saved_claims;
    if servers.is_empty() && ok {
        cx.push(
            Diagnostic::error(
                "empty_upstream",
                d.args[0].span,
                format!("upstream `{name}` has no servers"),
            )
            .label("no `server` inside")
            .help("add `server HOST:PORT;`"),
        );
    }
    if !servers.is_empty() && servers.iter().all(|s| s.backup) {
        cx.push(
            Diagnostic::error(
                "only_backup_servers",
                d.args[0].span,
                format!("upstream `{name}` has only backup servers"),
            )
            .label("no primary server")
            .help("remove `backup` from at least one server"),
        );
    }
    if let Some((b @ (Balance::IpHash | Balance::Hash { .. }), span)) = &balance
        && servers.iter().any(|s| s.backup)
    {
        let _ = b;
        cx.push(
            Diagnostic::error(
                "backup_with_hash",
                *span,
                "`backup` servers cannot be used with hash balancing",
            )
            .label("hash balancing here")
            .help("as in NGINX: drop `backup` or use another balancing method"),
        );
    }
    Some(Setting::Upstream(Upstream {
        name,
        span: d.args[0].span,
        servers,
        balance: balance.map(|(b, _)| b).unwrap_or(Balance::RoundRobin),
        keepalive,
        health_check,
    }))
}

fn upstream_server(
    cx: &mut Cx<'_>,
    m: &Directive,
    resolve_ttl: Duration,
) -> Option<UpstreamServer> {
    let addr = &m.args[0];
    let Some((host, port)) = host_port(&addr.text(), Some(80)) else {
        cx.bad_arg(
            "invalid_address",
            addr,
            format!("`{}` is not a HOST:PORT address", addr.text()),
            "write e.g. `127.0.0.1:3001` or `users.internal:3001`",
        );
        return None;
    };
    let mut s = UpstreamServer {
        address: format!("{host}:{port}"),
        host,
        port,
        weight: 1,
        max_fails: 1,
        fail_timeout: Duration::from_secs(10),
        backup: false,
        resolve: false,
        resolve_ttl,
        span: addr.span,
    };
    let mut ok = true;
    for a in &m.args[1..] {
        let t = a.text();
        match t.split_once('=') {
            Some(("weight", v)) => match v.parse::<u32>() {
                Ok(w) if (1..=1000).contains(&w) => s.weight = w,
                _ => {
                    ok = false;
                    cx.bad_arg(
                        "invalid_number",
                        a,
                        format!("bad weight `{v}`"),
                        "weight is a whole number from 1 to 1000",
                    );
                }
            },
            Some(("max_fails", v)) => match v.parse::<u32>() {
                Ok(n) => s.max_fails = n,
                Err(_) => {
                    ok = false;
                    cx.bad_arg(
                        "invalid_number",
                        a,
                        format!("bad max_fails `{v}`"),
                        "max_fails is a whole number (0 = never mark down)",
                    );
                }
            },
            Some(("fail_timeout", v)) => match value::parse_duration(v) {
                Ok(d) => s.fail_timeout = d,
                Err(e) => {
                    ok = false;
                    cx.bad_arg(
                        "invalid_duration",
                        a,
                        format!("bad fail_timeout: {e}"),
                        "write e.g. `fail_timeout=10s`",
                    );
                }
            },
            None if t == "backup" => s.backup = true,
            None if t == "resolve" => s.resolve = true,
            _ => {
                ok = false;
                cx.bad_arg(
                    "invalid_value",
                    a,
                    format!("unknown server parameter `{t}`"),
                    "parameters are weight=N, max_fails=N, fail_timeout=D, backup, resolve",
                );
            }
        }
    }
    if !s.resolve
        && s.host.parse::<IpAddr>().is_err()
        && !s.host.starts_with('[')
        && s.host != "localhost"
    {
        // Resolved once at load time; fine, but say nothing: NGINX does the same.
    }
    ok.then_some(s)
}

fn health_check_params(cx: &mut Cx<'_>, m: &Directive) -> Option<HealthCheck> {
    let mut h = HealthCheck {
        uri: "/".into(),
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(1),
        fails: 3,
        passes: 2,
    };
    let mut ok = true;
    for a in &m.args {
        let t = a.text();
        let r: Result<(), String> = match t.split_once('=') {
            Some(("uri", v)) if v.starts_with('/') => {
                h.uri = v.to_string();
                Ok(())
            }
            Some(("interval", v)) => value::parse_duration(v).map(|d| h.interval = d),
            Some(("timeout", v)) => value::parse_duration(v).map(|d| h.timeout = d),
            Some(("fails", v)) => v
                .parse()
                .map(|n| h.fails = n)
                .map_err(|_| format!("bad number `{v}`")),
            Some(("passes", v)) => v
                .parse()
                .map(|n| h.passes = n)
                .map_err(|_| format!("bad number `{v}`")),
            _ => Err(format!("unknown health_check parameter `{t}`")),
        };
        if let Err(e) = r {
            ok = false;
            cx.bad_arg(
                "invalid_value",
                a,
                e,
                "write `health_check uri=/healthz interval=5s timeout=1s fails=3 passes=2;`",
            );
        }
    }
    if h.interval.is_zero() || h.fails == 0 || h.passes == 0 {
        ok = false;
        cx.push(
            Diagnostic::error(
                "invalid_value",
                m.args_span(),
                "health_check interval, fails and passes must be positive",
            )
            .label("here")
            .help("e.g. `interval=5s fails=3 passes=2`"),
        );
    }
    ok.then_some(h)
}

const JWT_ALGS: &[(&str, JwtAlg)] = &[
    ("HS256", JwtAlg::HS256),
    ("HS384", JwtAlg::HS384),
    ("HS512", JwtAlg::HS512),
    ("RS256", JwtAlg::RS256),
    ("RS384", JwtAlg::RS384),
    ("RS512", JwtAlg::RS512),
    ("PS256", JwtAlg::PS256),
    ("PS384", JwtAlg::PS384),
    ("PS512", JwtAlg::PS512),
    ("ES256", JwtAlg::ES256),
    ("ES384", JwtAlg::ES384),
    ("EdDSA", JwtAlg::EdDSA),
];

pub(crate) fn jwt_def(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let name = d.args[0].text();
    let mut algorithms = Vec::new();
    let mut keys: Vec<(JwtKeySource, Span)> = Vec::new();
    let mut def = JwtDef {
        name: name.clone(),
        span: d.args[0].span,
        algorithms: Vec::new(),
        keys: JwtKeySource::Secret(String::new()),
        issuer: None,
        audience: None,
        leeway: Duration::ZERO,
        require_claims: Vec::new(),
        token_from: TokenFrom::Header("authorization".into()),
        forward_claims: Vec::new(),
    };
    let mut alg_span = None;
    for m in cx.members(d, Ctx::AuthJwt) {
        match m.name.as_str() {
            "algorithms" => {
                alg_span = Some(m.args_span());
                for a in &m.args {
                    let t = a.text();
                    if let Some((_, alg)) = JWT_ALGS.iter().find(|(n, _)| *n == t) {
                        algorithms.push(*alg);
                    } else if t.eq_ignore_ascii_case("none") {
                        cx.bad_arg_labeled(
                            "jwt_alg_none",
                            a,
                            "JWT algorithm `none` is never accepted",
                            "this would accept unsigned tokens",
                            "unsigned tokens are not authentication: remove `none` and list real algorithms",
                        );
                    } else {
                        let help = match did_you_mean(&t, JWT_ALGS.iter().map(|(n, _)| *n)) {
                            Some(s) => format!("did you mean `{s}`?"),
                            None => "algorithms: HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA".into(),
                        };
                        cx.bad_arg(
                            "unknown_algorithm",
                            a,
                            format!("unknown JWT algorithm `{t}`"),
                            help,
                        );
                    }
                }
            }
            "key_file" => {
                let p = cx.path(&m.args[0], true);
                keys.push((JwtKeySource::KeyFile(p), m.span));
            }
            "jwks_file" => {
                let p = cx.path(&m.args[0], true);
                keys.push((JwtKeySource::JwksFile(p), m.span));
            }
            "secret" => {
                if let Some(t) = cx.template(&m.args[0]) {
                    match t.as_literal() {
                        Some(s) if !s.is_empty() => keys.push((JwtKeySource::Secret(s), m.span)),
                        _ => cx.bad_arg(
                            "invalid_value",
                            &m.args[0],
                            "the secret must be a non-empty fixed value",
                            "write `secret $env_JWT_SECRET;`",
                        ),
                    }
                }
            }
            "jwks_url" => {
                let url = m.args[0].text();
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    cx.bad_arg(
                        "invalid_url",
                        &m.args[0],
                        format!("`{url}` is not an http(s) URL"),
                        "write `jwks_url https://auth.example.com/.well-known/jwks.json;`",
                    );
                }
                let mut refresh = Duration::from_secs(600);
                if let Some(a) = m.args.get(1) {
                    match a.text().strip_prefix("refresh=").map(value::parse_duration) {
                        Some(Ok(r)) => refresh = r,
                        _ => cx.bad_arg(
                            "invalid_value",
                            a,
                            format!("unknown jwks_url option `{}`", a.text()),
                            "write `refresh=10m`",
                        ),
                    }
                }
                keys.push((JwtKeySource::JwksUrl { url, refresh }, m.span));
            }
            "issuer" => def.issuer = Some(m.args[0].text()),
            "audience" => def.audience = Some(m.args[0].text()),
            "leeway" => def.leeway = cx.duration(&m.args[0]).unwrap_or_default(),
            "require_claims" => def.require_claims.extend(m.args.iter().map(Arg::text)),
            "token_from" => {
                let v = m.args[1].text();
                def.token_from = match m.args[0].text().as_str() {
                    "header" => TokenFrom::Header(cx.header_name(&m.args[1]).unwrap_or_default()),
                    "cookie" => TokenFrom::Cookie(v),
                    "query" => TokenFrom::Query(v),
                    other => {
                        cx.bad_arg(
                            "invalid_value",
                            &m.args[0],
                            format!("unknown token source `{other}`"),
                            "write `token_from header NAME`, `cookie NAME` or `query NAME`",
                        );
                        def.token_from.clone()
                    }
                };
            }
            "forward_claim" => {
                if let Some(h) = cx.header_name(&m.args[1]) {
                    def.forward_claims.push((m.args[0].text(), h));
                }
            }
            _ => {}
        }
    }
    let name_span = d.args[0].span;
    if algorithms.is_empty() {
        if alg_span.is_none() {
            cx.push(
                Diagnostic::error("missing_directive", name_span, format!("`auth_jwt {name}` lists no algorithms"))
                    .label("no `algorithms` inside")
                    .help("add e.g. `algorithms RS256;` — the accepted algorithms come from the config, never the token"),
            );
        }
        return None;
    }
    match keys.len() {
        0 if d.children().iter().any(|c| {
            matches!(
                c.name.as_str(),
                "key_file" | "secret" | "jwks_file" | "jwks_url"
            )
        }) =>
        {
            // Written but invalid (say, an unset `$env_`): already reported.
            return None;
        }
        0 => {
            cx.push(
                Diagnostic::error(
                    "missing_directive",
                    name_span,
                    format!("`auth_jwt {name}` has no key"),
                )
                .label("no key source inside")
                .help("add one of `key_file`, `secret`, `jwks_file`, `jwks_url`"),
            );
            return None;
        }
        1 => {}
        _ => {
            cx.push(
                Diagnostic::error(
                    "conflicting_keys",
                    keys[1].1,
                    format!("`auth_jwt {name}` has more than one key source"),
                )
                .label("second key source")
                .secondary(keys[0].1, "first key source")
                .help("keep one of `key_file`, `secret`, `jwks_file`, `jwks_url`"),
            );
            return None;
        }
    }
    let (source, _) = keys.remove(0);
    let hmac = algorithms.iter().any(|a| a.is_hmac());
    let asym = algorithms.iter().any(|a| !a.is_hmac());
    let is_secret = matches!(source, JwtKeySource::Secret(_));
    let fits = if is_secret {
        hmac && !asym
    } else {
        asym && !hmac
    };
    if !fits {
        cx.push(
            Diagnostic::error("jwt_key_mismatch", alg_span.unwrap_or(name_span), "the algorithms do not fit the key")
                .label(if is_secret { "an HMAC secret only verifies HS256/384/512" } else { "a public key cannot verify HS* tokens" })
                .help("HS* algorithms take `secret`; RS/PS/ES/EdDSA take `key_file`, `jwks_file` or `jwks_url` (mixing them invites key confusion)"),
        );
        return None;
    }
    def.algorithms = algorithms;
    def.keys = source;
    Some(Setting::JwtDef(def))
}

pub(crate) fn rate_limit_def(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let name = d.args[0].text();
    let mut key = Template {
        pieces: vec![Piece::Var(Var::RemoteAddr)],
    };
    let mut rate = None;
    let mut burst = 0;
    let mut store = RateStore::Memory;
    let mut max_keys = 1_000_000;
    let mut allow = true;
    let saved = std::mem::take(&mut cx.jwt_claim_uses);
    for m in cx.members(d, Ctx::RateLimit) {
        let a = &m.args[0];
        match m.name.as_str() {
            "key" => key = cx.template(a).unwrap_or(key),
            "rate" => match value::parse_rate(&a.text()) {
                Ok(r) => rate = Some(r),
                Err(e) => cx.bad_arg(
                    "invalid_rate",
                    a,
                    format!("bad rate: {e}"),
                    "rates are `10r/s`, `100r/m`, `100r/15m`, `5000r/h`",
                ),
            },
            "burst" => burst = cx.number(a, "request count").unwrap_or(0),
            "store" => {
                let t = a.text();
                if t == "memory" {
                    store = RateStore::Memory;
                } else if t.starts_with("redis://") {
                    store = RateStore::Redis(t);
                } else {
                    cx.bad_arg(
                        "invalid_value",
                        a,
                        format!("unknown store `{t}`"),
                        "write `store memory;` or `store redis://127.0.0.1:6379/0;`",
                    );
                }
            }
            "max_keys" => match cx.number::<u64>(a, "key count") {
                Some(0) => cx.bad_arg(
                    "invalid_number",
                    a,
                    "max_keys must be at least 1",
                    "e.g. `max_keys 1000000;`",
                ),
                Some(n) => max_keys = n,
                None => {}
            },
            "on_store_error" => match a.text().as_str() {
                "allow" => allow = true,
                "deny" => allow = false,
                other => cx.bad_arg(
                    "invalid_value",
                    a,
                    format!("expected `allow` or `deny`, found `{other}`"),
                    "write `on_store_error allow;` or `deny`",
                ),
            },
            _ => {}
        }
    }
    cx.jwt_claim_uses = saved;
    let Some(rate) = rate else {
        if d.children().iter().any(|c| c.name == "rate") {
            // Written but invalid (or misplaced): already reported.
            return None;
        }
        cx.push(
            Diagnostic::error(
                "missing_directive",
                d.args[0].span,
                format!("`rate_limit {name}` has no rate"),
            )
            .label("no `rate` inside")
            .help("add e.g. `rate 100r/15m;`"),
        );
        return None;
    };
    Some(Setting::RateLimitDef(RateLimitDef {
        name,
        span: d.args[0].span,
        key,
        rate,
        burst,
        store,
        max_keys,
        on_store_error_allow: allow,
    }))
}

pub(crate) fn cache_def(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let name = d.args[0].text();
    let mut c = CacheDef {
        name,
        span: d.args[0].span,
        max_size: 256 * 1024 * 1024,
        ttl: Duration::from_secs(600),
        key: Template {
            pieces: vec![
                Piece::Var(Var::Scheme),
                Piece::Var(Var::Host),
                Piece::Var(Var::RequestUri),
            ],
        },
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        methods: vec!["GET".into(), "HEAD".into()],
        max_entry_size: 0,
    };
    let mut entry = None;
    let saved = std::mem::take(&mut cx.jwt_claim_uses);
    for m in cx.members(d, Ctx::Cache) {
        let a = &m.args[0];
        match m.name.as_str() {
            "max_size" => c.max_size = cx.size(a).unwrap_or(c.max_size),
            "max_entry_size" => entry = cx.size(a),
            "ttl" => c.ttl = cx.duration(a).unwrap_or(c.ttl),
            "key" => c.key = cx.template(a).unwrap_or(c.key.clone()),
            "stale_while_revalidate" => {
                c.stale_while_revalidate = cx.duration(a).unwrap_or_default()
            }
            "stale_if_error" => c.stale_if_error = cx.duration(a).unwrap_or_default(),
            "methods" => {
                c.methods.clear();
                for a in &m.args {
                    let t = a.text();
                    if matches!(t.as_str(), "GET" | "HEAD" | "POST") {
                        c.methods.push(t);
                    } else {
                        cx.bad_arg(
                            "invalid_value",
                            a,
                            format!("method `{t}` cannot be cached"),
                            "cacheable methods: GET, HEAD, POST",
                        );
                    }
                }
            }
            _ => {}
        }
    }
    cx.jwt_claim_uses = saved;
    c.max_entry_size = entry.unwrap_or((c.max_size / 8).min(8 * 1024 * 1024));
    Some(Setting::CacheDef(c))
}

fn socket_addr(text: &str) -> Option<SocketAddr> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Some(a);
    }
    if let Ok(port) = text.parse::<u16>() {
        return Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let ip = match host {
        "*" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        h => h.parse().ok()?,
    };
    Some(SocketAddr::new(ip, port))
}

pub(crate) fn admin(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let mut listen = None;
    let mut allow = Vec::new();
    for m in cx.members(d, Ctx::Admin) {
        let a = &m.args[0];
        match m.name.as_str() {
            "listen" => match socket_addr(&a.text()) {
                Some(addr) => listen = Some((addr, a.span)),
                None => cx.bad_arg(
                    "invalid_address",
                    a,
                    format!("`{}` is not an address", a.text()),
                    "write `listen 127.0.0.1:9901;`",
                ),
            },
            "allow" => {
                if let Some(c) = cx.cidr(a) {
                    allow.push(c);
                }
            }
            _ => {}
        }
    }
    let Some((addr, span)) = listen else {
        if d.children().iter().any(|c| c.name == "listen") {
            return None;
        }
        cx.push(
            Diagnostic::error("missing_directive", d.name_span, "`admin` has no `listen`")
                .label("no `listen` inside")
                .help("add `listen 127.0.0.1:9901;`"),
        );
        return None;
    };
    if !addr.ip().is_loopback() && allow.is_empty() {
        cx.push(
            Diagnostic::error(
                "admin_public",
                span,
                "the admin listener is reachable from other hosts",
            )
            .label("not a loopback address")
            .help("listen on 127.0.0.1, or add `allow CIDR;` lines naming who may reach it"),
        );
    }
    Some(Setting::Admin(Admin {
        listen: addr,
        allow,
        span,
    }))
}

pub(crate) fn worker_threads(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let a = &d.args[0];
    if a.text() == "auto" {
        return Some(Setting::WorkerThreads(None));
    }
    match cx.number::<usize>(a, "thread count") {
        Some(n) if (1..=1024).contains(&n) => Some(Setting::WorkerThreads(Some(n))),
        Some(_) => {
            cx.bad_arg(
                "invalid_number",
                a,
                "worker_threads must be from 1 to 1024",
                "write a number or `auto`",
            );
            None
        }
        None => None,
    }
}

fn log_target(cx: &mut Cx<'_>, a: &Arg) -> LogTarget {
    match a.text().as_str() {
        "stdout" => LogTarget::Stdout,
        "stderr" => LogTarget::Stderr,
        _ => LogTarget::File(cx.path(a, false)),
    }
}

pub(crate) fn error_log(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let target = log_target(cx, &d.args[0]);
    let level = match d.args.get(1).map(|a| a.text()) {
        None => LogLevel::Info,
        Some(l) => match l.as_str() {
            "trace" => LogLevel::Trace,
            "debug" => LogLevel::Debug,
            "info" | "notice" => LogLevel::Info,
            "warn" => LogLevel::Warn,
            "error" | "crit" | "alert" | "emerg" => LogLevel::Error,
            other => {
                cx.bad_arg(
                    "invalid_value",
                    &d.args[1],
                    format!("unknown log level `{other}`"),
                    "levels: trace, debug, info, warn, error",
                );
                return None;
            }
        },
    };
    Some(Setting::ErrorLog(ErrorLog { target, level }))
}

pub(crate) fn access_log(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    if d.args[0].text() == "off" {
        if d.args.len() > 1 {
            cx.bad_arg(
                "wrong_argument_count",
                &d.args[1],
                "`access_log off` takes nothing more",
                "write `access_log off;`",
            );
        }
        return Some(Setting::AccessLog(AccessLog::Off));
    }
    let target = log_target(cx, &d.args[0]);
    let format = match d.args.get(1).map(|a| a.text()) {
        None => AccessLogFormat::Json,
        Some(f) if f == "json" => AccessLogFormat::Json,
        Some(f) if f == "combined" => AccessLogFormat::Combined,
        Some(f) => {
            cx.bad_arg(
                "invalid_value",
                &d.args[1],
                format!("unknown access log format `{f}`"),
                "formats: json, combined",
            );
            return None;
        }
    };
    Some(Setting::AccessLog(AccessLog::On { target, format }))
}

pub(crate) fn shutdown_timeout(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.duration(&d.args[0]).map(Setting::ShutdownTimeout)
}

pub(crate) fn memory_trim(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.on_off(&d.args[0]).map(Setting::MemoryTrim)
}

pub(crate) fn listen(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let a = &d.args[0];
    let Some(addr) = socket_addr(&a.text()) else {
        cx.bad_arg(
            "invalid_address",
            a,
            format!("`{}` is not a listen address", a.text()),
            "write `listen 8080;`, `listen 127.0.0.1:8080;` or `listen [::1]:8080;`",
        );
        return None;
    };
    let mut l = Listen {
        addr,
        ssl: false,
        http2: false,
        default_server: false,
        span: a.span,
    };
    for o in &d.args[1..] {
        match o.text().as_str() {
            "ssl" => l.ssl = true,
            "http2" => l.http2 = true,
            "default_server" | "default" => l.default_server = true,
            other => cx.bad_arg(
                "invalid_value",
                o,
                format!("unknown listen option `{other}`"),
                "options: ssl, http2, default_server",
            ),
        }
    }
    Some(Setting::Listen(l))
}

pub(crate) fn server_name(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let mut names = Vec::new();
    for a in &d.args {
        let t = a.text();
        if t.starts_with('~') {
            let sub = arg_tail(a, 1);
            if let Some(r) = cx.regex(&sub, true) {
                names.push(ServerName::Regex(r));
            }
        } else if let Some(rest) = t.strip_prefix("*.") {
            names.push(ServerName::LeadingWildcard(format!(
                ".{}",
                rest.to_ascii_lowercase()
            )));
        } else if let Some(rest) = t.strip_suffix(".*") {
            names.push(ServerName::TrailingWildcard(format!(
                "{}.",
                rest.to_ascii_lowercase()
            )));
        } else if let Some(rest) = t.strip_prefix('.') {
            // NGINX: `.example.com` is `example.com` and `*.example.com`.
            names.push(ServerName::Exact(rest.to_ascii_lowercase()));
            names.push(ServerName::LeadingWildcard(t.to_ascii_lowercase()));
        } else if t.contains('*') {
            cx.bad_arg(
                "invalid_server_name",
                a,
                format!("`{t}`: a wildcard must be the first or last label"),
                "write `*.example.com` or `www.example.*`, or use `~regex`",
            );
        } else {
            names.push(ServerName::Exact(t.to_ascii_lowercase()));
        }
    }
    Some(Setting::ServerName(names))
}

pub(crate) fn ssl_certificate(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    Some(Setting::SslCertificate(cx.path(&d.args[0], true)))
}

pub(crate) fn ssl_certificate_key(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    Some(Setting::SslCertificateKey(cx.path(&d.args[0], true)))
}

pub(crate) fn proxy_ssl_trusted_certificate(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let path = cx.path(&d.args[0], true);
    if cx.check_files
        && let Err(e) = crate::tls::load_trust(&path)
        && !e.is_unreadable()
    {
        cx.push(
            Diagnostic::error(
                "invalid_certificate",
                d.args[0].span,
                "unusable CA certificates",
            )
            .label(e.to_string())
            .help("give a PEM file of CA certificates (`-----BEGIN CERTIFICATE-----`)"),
        );
    }
    Some(Setting::ProxySslTrustedCertificate(path))
}

/// Load the pair the way the server will, so a certificate `check` accepts
/// is one `run` can serve (an unopenable file is `unreadable_file` already).
fn check_certificate(cx: &mut Cx<'_>, tls: &Tls, cert_span: Span, key_span: Span) {
    if !cx.check_files {
        return;
    }
    if let Err(e) = crate::tls::certified_key(tls)
        && !e.is_unreadable()
    {
        let span = if e.is_key_problem() {
            key_span
        } else {
            cert_span
        };
        cx.push(
            Diagnostic::error("invalid_certificate", span, "unusable certificate or key")
                .label(e.to_string())
                .help("`ssl_certificate` is a PEM chain (leaf first), `ssl_certificate_key` its PEM private key"),
        );
    }
}

pub(crate) fn client_header_timeout(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.duration(&d.args[0]).map(Setting::ClientHeaderTimeout)
}
pub(crate) fn client_body_timeout(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.duration(&d.args[0]).map(Setting::ClientBodyTimeout)
}
pub(crate) fn keepalive_timeout(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.duration(&d.args[0]).map(Setting::KeepaliveTimeout)
}
pub(crate) fn client_max_header_size(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    match cx.size(&d.args[0]) {
        Some(n) if n >= 1024 => Some(Setting::ClientMaxHeaderSize(n)),
        Some(_) => {
            cx.bad_arg(
                "invalid_size",
                &d.args[0],
                "client_max_header_size must be at least 1k",
                "e.g. `client_max_header_size 32k;`",
            );
            None
        }
        None => None,
    }
}
pub(crate) fn max_connections(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    match cx.number::<usize>(&d.args[0], "connection count") {
        Some(0) => {
            cx.bad_arg(
                "invalid_number",
                &d.args[0],
                "max_connections must be at least 1",
                "e.g. `max_connections 10000;`",
            );
            None
        }
        n => n.map(Setting::MaxConnections),
    }
}
pub(crate) fn set_real_ip_from(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.cidr(&d.args[0]).map(Setting::SetRealIpFrom)
}
pub(crate) fn real_ip_header(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.header_name(&d.args[0]).map(Setting::RealIpHeader)
}

/// `http[s]://NAME_OR_HOST:PORT[/URI]` → (tls, target, uri text and its offset).
/// `(tls, target, URI part and its byte offset in the argument)`.
type UrlParts<'u> = (bool, ProxyTarget, Option<(&'u str, usize)>);

fn split_url<'u>(cx: &mut Cx<'_>, a: &'u Arg, text: &'u str) -> Option<UrlParts<'u>> {
    let (tls, rest, off) = if let Some(r) = text.strip_prefix("http://") {
        (false, r, 7)
    } else if let Some(r) = text.strip_prefix("https://") {
        (true, r, 8)
    } else {
        cx.bad_arg(
            "invalid_url",
            a,
            format!("`{text}` is not an http:// or https:// URL"),
            "write `proxy_pass http://UPSTREAM;` or `http://HOST:PORT/URI`",
        );
        return None;
    };
    // The authority ends at the first `/`, or where a variable starts the
    // URI: NGINX accepts `proxy_pass http://backend$request_uri;`.
    let split = rest
        .char_indices()
        .find(|&(i, c)| c == '/' || (c == '$' && !a.literal_dollars.contains(&(off + i))))
        .map(|(i, _)| i);
    let (authority, uri) = match split {
        Some(i) => (&rest[..i], Some((&rest[i..], off + i))),
        None => (rest, None),
    };
    let var_follows = split.is_some_and(|i| rest[i..].starts_with('$'));
    let known_host = cx.defs.upstreams.iter().any(|(n, _)| n == authority)
        || host_port(authority, None).is_some();
    if var_follows && !known_host {
        let host_end = rest.find('/').unwrap_or(rest.len());
        let span = cx.arg_sub_span(a, off, off + host_end);
        cx.push(
            Diagnostic::error(
                "unsupported",
                span,
                "variables in the upstream host are not supported",
            )
            .label("the host is built from a variable")
            .help("name an `upstream` or write `host:port`; variables may follow in the URI part"),
        );
        return None;
    }
    if cx.defs.upstreams.iter().any(|(n, _)| n == authority) {
        let sub = Arg {
            value: authority.to_string(),
            literal_dollars: Vec::new(),
            raw: authority.to_string(),
            quote: None,
            span: a.span,
        };
        let idx = cx.resolve(DefKind::Upstream, &sub)?;
        return Some((tls, ProxyTarget::Upstream(idx), uri));
    }
    match host_port(authority, None) {
        Some((host, port)) => Some((tls, ProxyTarget::Address { host, port }, uri)),
        None => {
            let suggestion =
                did_you_mean(authority, cx.defs.upstreams.iter().map(|(n, _)| n.as_str()))
                    .map(str::to_string);
            cx.mark_suggested_used(DefKind::Upstream, suggestion.as_deref());
            let span = cx.arg_sub_span(a, off, off + authority.len());
            cx.push(
                Diagnostic::error("unknown_upstream", span, format!("unknown upstream `{authority}`"))
                    .label("no upstream with this name, and not a host:port")
                    .help(match suggestion {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => format!("define `upstream {authority} {{ server HOST:PORT; }}`, or write `{authority}:PORT`"),
                    }),
            );
            None
        }
    }
}

pub(crate) fn proxy_pass(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let a = &d.args[0];
    let text = a.text();
    let (tls, target, uri) = split_url(cx, a, &text)?;
    let uri = match uri {
        None => None,
        Some((u, off)) => {
            let sub = Arg {
                value: u.to_string(),
                literal_dollars: a
                    .literal_dollars
                    .iter()
                    .filter(|o| **o >= off)
                    .map(|o| o - off)
                    .collect(),
                raw: u.to_string(),
                quote: None,
                span: cx.arg_sub_span(a, off, off + u.len()),
            };
            let t = cx.template(&sub)?;
            if cx.in_regex_location && !t.has_vars() {
                cx.push(
                    Diagnostic::error("proxy_pass_uri_in_regex", sub.span, "`proxy_pass` with a URI part in a regex location")
                        .label("there is no matched prefix for this URI to replace")
                        .help("remove the URI part, use `rewrite ... break;`, or build the full URI with captures (`/users/$1`)"),
                );
                return None;
            }
            Some(t)
        }
    };
    Some(Setting::ProxyPass(ProxyPass {
        tls,
        target,
        uri,
        span: d.span,
    }))
}

pub(crate) fn return_(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let a = &d.args[0];
    let t = a.text();
    if d.args.len() == 1
        && (t.starts_with("http://") || t.starts_with("https://") || t.starts_with("$scheme"))
    {
        let url = cx.template(a)?;
        return Some(Setting::Return(Return::Redirect { code: 302, url }));
    }
    let code: u16 = match t.parse() {
        Ok(c) if (100..=599).contains(&c) => c,
        _ => {
            cx.bad_arg(
                "invalid_status",
                a,
                format!("`{t}` is not an HTTP status code"),
                "write `return 404;`, `return 200 \"text\";` or `return 301 https://...;`",
            );
            return None;
        }
    };
    let redirect = matches!(code, 301 | 302 | 303 | 307 | 308);
    match d.args.get(1) {
        Some(u) if redirect => {
            let url = cx.template(u)?;
            Some(Setting::Return(Return::Redirect { code, url }))
        }
        Some(txt) => {
            let text = cx.template(txt)?;
            Some(Setting::Return(Return::Text {
                code,
                text: Some(text),
            }))
        }
        None => Some(Setting::Return(Return::Text { code, text: None })),
    }
}

pub(crate) fn rewrite(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let regex = cx.regex(&d.args[0], false)?;
    let mut brk = false;
    if let Some(f) = d.args.get(2) {
        match f.text().as_str() {
            "break" => brk = true,
            "last" | "redirect" | "permanent" => {
                cx.bad_arg_labeled(
                    "unsupported_rewrite_flag",
                    f,
                    format!("`rewrite ... {}` is not supported in v1", f.text()),
                    "unsupported flag",
                    "use `break` (the rewritten path is sent upstream), or `return 301|302 URL;` for redirects",
                );
                return None;
            }
            other => {
                cx.bad_arg(
                    "invalid_value",
                    f,
                    format!("unknown rewrite flag `{other}`"),
                    "the only flag is `break`",
                );
                return None;
            }
        }
    }
    let repl_text = d.args[1].text();
    if repl_text.starts_with("http://") || repl_text.starts_with("https://") {
        cx.bad_arg_labeled(
            "unsupported_rewrite_flag",
            &d.args[1],
            "a rewrite to a URL is a redirect, not supported in v1",
            "redirect target",
            "use `return 302 URL;`",
        );
        return None;
    }
    let saved = (cx.capture_count, cx.named_captures.clone());
    cx.capture_count = cx.capture_count.max(regex.captures_len() - 1);
    cx.named_captures
        .extend(regex.capture_names().flatten().map(str::to_string));
    let replacement = cx.template(&d.args[1]);
    cx.capture_count = saved.0;
    cx.named_captures = saved.1;
    Some(Setting::Rewrite(Rewrite {
        regex,
        replacement: replacement?,
        brk,
        span: d.span,
    }))
}

pub(crate) fn aggregate(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let members = cx.members(d, Ctx::Aggregate);
    let mut names: Vec<(String, Span)> = Vec::new();
    let mut ok = true;
    for m in members.iter().filter(|m| m.name == "call") {
        let n = m.args[0].text();
        let valid = !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            ok = false;
            cx.bad_arg(
                "invalid_call_name",
                &m.args[0],
                format!("`{n}` is not a call name"),
                "call names are letters, digits and `_`",
            );
            continue;
        }
        if let Some((_, first)) = names.iter().find(|(x, _)| *x == n) {
            let first = *first;
            ok = false;
            cx.push(
                Diagnostic::error(
                    "duplicate_call",
                    m.args[0].span,
                    format!("call `{n}` is defined twice"),
                )
                .label("again here")
                .secondary(first, "first defined here")
                .help("give each call its own name"),
            );
            continue;
        }
        let shadows = value::VAR_NAMES.contains(&n.as_str())
            || (n.len() == 1 && n.as_bytes()[0].is_ascii_digit())
            || cx.named_captures.contains(&n)
            || ["arg_", "http_", "cookie_", "jwt_claim_", "env_"]
                .iter()
                .any(|p| n.starts_with(p));
        if shadows {
            ok = false;
            cx.bad_arg_labeled(
                "call_shadows_variable",
                &m.args[0],
                format!("call `{n}` has the name of a variable"),
                format!("`${n}` is already a variable"),
                format!("rename the call (e.g. `{n}_call`): `${n}.field` would be ambiguous with the variable `${n}`"),
            );
            continue;
        }
        names.push((n, m.args[0].span));
    }
    let call_names: Vec<String> = names.iter().map(|(n, _)| n.clone()).collect();
    let mut calls = Vec::new();
    let mut timeout = Duration::from_secs(10);
    let mut partial = false;
    for m in &members {
        match m.name.as_str() {
            "call" => {
                let n = m.args[0].text();
                if !call_names.contains(&n) || calls.iter().any(|c: &AggregateCall| c.name == n) {
                    continue;
                }
                let a = &m.args[1];
                let text = a.text();
                let Some((tls, target, uri)) = split_url(cx, a, &text) else {
                    ok = false;
                    continue;
                };
                let (u, off) = uri.unwrap_or(("/", text.len()));
                let sub = Arg {
                    value: u.to_string(),
                    literal_dollars: a
                        .literal_dollars
                        .iter()
                        .filter(|o| **o >= off)
                        .map(|o| o - off)
                        .collect(),
                    raw: u.to_string(),
                    quote: None,
                    span: if uri.is_some() {
                        cx.arg_sub_span(a, off, off + u.len())
                    } else {
                        a.span
                    },
                };
                let Some(t) = cx.template_with(&sub, &call_names) else {
                    ok = false;
                    continue;
                };
                let mut deps = Vec::new();
                for p in &t.pieces {
                    if let Piece::CallRef { call, .. } = p {
                        if *call == n {
                            ok = false;
                            cx.push(
                                Diagnostic::error(
                                    "aggregate_cycle",
                                    a.span,
                                    format!("call `{n}` refers to itself"),
                                )
                                .label("self-reference")
                                .help("a call can only use fields of other calls"),
                            );
                        } else if let Some(i) = call_names.iter().position(|c| c == call)
                            && !deps.contains(&i)
                        {
                            deps.push(i);
                        }
                    }
                }
                calls.push(AggregateCall {
                    name: n,
                    tls,
                    target,
                    uri: t,
                    deps,
                    span: m.span,
                });
            }
            "timeout" => timeout = cx.duration(&m.args[0]).unwrap_or(timeout),
            "on_error" => match m.args[0].text().as_str() {
                "partial" => partial = true,
                "fail" => partial = false,
                other => cx.bad_arg(
                    "invalid_value",
                    &m.args[0],
                    format!("expected `partial` or `fail`, found `{other}`"),
                    "write `on_error partial;` or `on_error fail;`",
                ),
            },
            _ => {}
        }
    }
    if calls.is_empty() && ok {
        cx.push(
            Diagnostic::error("empty_aggregate", d.name_span, "`aggregate` has no calls")
                .label("no `call` inside")
                .help("add `call NAME http://UPSTREAM/PATH;`"),
        );
        return None;
    }
    if !ok {
        return None;
    }
    // Dependency indices were computed against `call_names`; `calls` has
    // the same order, since both follow the file.
    let waves = match waves(&calls) {
        Ok(w) => w,
        Err(cycle) => {
            let chain: Vec<&str> = cycle.iter().map(|i| calls[*i].name.as_str()).collect();
            cx.push(
                Diagnostic::error(
                    "aggregate_cycle",
                    calls[cycle[0]].span,
                    "aggregate calls depend on each other in a cycle",
                )
                .label("this call is part of the cycle")
                .help(format!(
                    "break the cycle: {} → {}",
                    chain.join(" → "),
                    chain[0]
                )),
            );
            return None;
        }
    };
    Some(Setting::Aggregate(Aggregate {
        calls,
        timeout,
        partial,
        waves,
    }))
}

/// Group calls into waves (Kahn's algorithm by levels); `Err` holds a cycle.
fn waves(calls: &[AggregateCall]) -> Result<Vec<Vec<usize>>, Vec<usize>> {
    let n = calls.len();
    let mut level: Vec<Option<usize>> = vec![None; n];
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut done = 0;
    while done < n {
        let ready: Vec<usize> = (0..n)
            .filter(|&i| {
                level[i].is_none()
                    && calls[i]
                        .deps
                        .iter()
                        .all(|d| level[*d].is_some_and(|l| l < out.len()))
            })
            .collect();
        if ready.is_empty() {
            // Find a cycle among the rest by walking dependencies.
            let start = (0..n).find(|&i| level[i].is_none()).unwrap_or(0);
            let mut path = vec![start];
            let mut cur = start;
            loop {
                let Some(&next) = calls[cur].deps.iter().find(|d| level[**d].is_none()) else {
                    return Err(path);
                };
                if let Some(pos) = path.iter().position(|p| *p == next) {
                    return Err(path[pos..].to_vec());
                }
                path.push(next);
                cur = next;
            }
        }
        for &i in &ready {
            level[i] = Some(out.len());
        }
        done += ready.len();
        out.push(ready);
    }
    Ok(out)
}

pub(crate) fn proxy_set_header(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let name = cx.header_name(&d.args[0]);
    let value = cx.template(&d.args[1]);
    Some(Setting::ProxySetHeader(name?, value?))
}
pub(crate) fn proxy_hide_header(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.header_name(&d.args[0]).map(Setting::ProxyHideHeader)
}
pub(crate) fn add_header(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let valid_name = cx.header_name(&d.args[0]);
    let value = cx.template(&d.args[1]);
    let always = match d.args.get(2).map(|a| a.text()) {
        None => false,
        Some(t) if t == "always" => true,
        Some(t) => {
            cx.bad_arg(
                "invalid_value",
                &d.args[2],
                format!("unknown add_header flag `{t}`"),
                "the only flag is `always`",
            );
            return None;
        }
    };
    valid_name?;
    let name = d.args[0].text();
    let value = value?;
    Some(Setting::AddHeader(AddHeader {
        built: HeaderBuilt::new(&name, &value),
        name,
        value,
        always,
    }))
}
pub(crate) fn request_id_header(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.header_name(&d.args[0]).map(Setting::RequestIdHeader)
}
pub(crate) fn wrap_response(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.on_off(&d.args[0]).map(Setting::WrapResponse)
}
pub(crate) fn wrap_response_max_size(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.size(&d.args[0]).map(Setting::WrapResponseMaxSize)
}
pub(crate) fn proxy_connect_timeout(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.duration(&d.args[0]).map(Setting::ProxyConnectTimeout)
}
pub(crate) fn proxy_read_timeout(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.duration(&d.args[0]).map(Setting::ProxyReadTimeout)
}
pub(crate) fn proxy_send_timeout(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.duration(&d.args[0]).map(Setting::ProxySendTimeout)
}
pub(crate) fn proxy_next_upstream(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    let mut n = NextUpstream::default();
    let mut off = None;
    for a in &d.args {
        match a.text().as_str() {
            "error" => n.error = true,
            "timeout" => n.timeout = true,
            "http_502" => n.http_502 = true,
            "http_503" => n.http_503 = true,
            "http_504" => n.http_504 = true,
            "non_idempotent" => n.non_idempotent = true,
            "off" => off = Some(a.span),
            other => {
                cx.bad_arg(
                    "invalid_value",
                    a,
                    format!("unknown condition `{other}`"),
                    "conditions: error, timeout, http_502, http_503, http_504, non_idempotent, off",
                );
                return None;
            }
        }
    }
    if let Some(span) = off {
        if d.args.len() > 1 {
            cx.push(
                Diagnostic::error(
                    "invalid_value",
                    span,
                    "`off` cannot be combined with other conditions",
                )
                .label("here")
                .help("write `proxy_next_upstream off;` alone"),
            );
            return None;
        }
        return Some(Setting::ProxyNextUpstream(NextUpstream::default()));
    }
    Some(Setting::ProxyNextUpstream(n))
}
pub(crate) fn proxy_next_upstream_tries(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.number(&d.args[0], "try count")
        .map(Setting::ProxyNextUpstreamTries)
}
pub(crate) fn client_max_body_size(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    cx.size(&d.args[0]).map(Setting::ClientMaxBodySize)
}

fn policy_use(cx: &mut Cx<'_>, d: &Directive, kind: DefKind) -> Option<Option<usize>> {
    let a = &d.args[0];
    if a.text() == "off" {
        return Some(None);
    }
    cx.resolve(kind, a).map(Some)
}
pub(crate) fn auth_jwt_use(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    policy_use(cx, d, DefKind::Jwt).map(Setting::AuthJwt)
}
pub(crate) fn rate_limit_use(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    policy_use(cx, d, DefKind::RateLimit).map(Setting::RateLimit)
}
pub(crate) fn cache_use(cx: &mut Cx<'_>, d: &Directive) -> Option<Setting> {
    policy_use(cx, d, DefKind::Cache).map(Setting::Cache)
}

// ====================================================================== assembly

/// Settings of one level (main, server or location) applied over the
/// inherited ones. Header lists replace inherited entries of the same name.
fn apply_level(s: &mut LocationSettings, items: &[Item]) {
    let set_names: HashSet<&str> = items
        .iter()
        .filter_map(|i| match &i.setting {
            Setting::ProxySetHeader(n, _) => Some(n.as_str()),
            _ => None,
        })
        .collect();
    s.proxy_set_header
        .retain(|h| !set_names.contains(h.name.as_str()));
    let add_names: HashSet<String> = items
        .iter()
        .filter_map(|i| match &i.setting {
            Setting::AddHeader(h) => Some(h.name.to_ascii_lowercase()),
            _ => None,
        })
        .collect();
    s.add_header
        .retain(|h| !add_names.contains(&h.name.to_ascii_lowercase()));
    for i in items {
        match &i.setting {
            Setting::ProxySetHeader(n, v) => {
                s.proxy_set_header.retain(|h| h.name != *n);
                s.proxy_set_header.push(SetHeader {
                    built: HeaderBuilt::new(n, v),
                    name: n.clone(),
                    value: v.clone(),
                });
            }
            Setting::ProxyHideHeader(n) => {
                if !s.proxy_hide_header.contains(n) {
                    s.proxy_hide_header.push(n.clone());
                }
            }
            Setting::AddHeader(h) => s.add_header.push(h.clone()),
            Setting::RequestIdHeader(n) => s.request_id_header = n.clone(),
            Setting::WrapResponse(b) => s.wrap_response = *b,
            Setting::WrapResponseMaxSize(n) => s.wrap_response_max_size = *n,
            Setting::ProxyConnectTimeout(d) => s.proxy_connect_timeout = *d,
            Setting::ProxyReadTimeout(d) => s.proxy_read_timeout = *d,
            Setting::ProxySendTimeout(d) => s.proxy_send_timeout = *d,
            Setting::ProxyNextUpstream(n) => s.proxy_next_upstream = *n,
            Setting::ProxyNextUpstreamTries(n) => s.proxy_next_upstream_tries = *n,
            Setting::ClientMaxBodySize(n) => s.client_max_body_size = *n,
            Setting::ProxySslTrustedCertificate(p) => {
                s.proxy_ssl_trusted_certificate = Some(p.clone())
            }
            Setting::AuthJwt(p) => s.auth_jwt = *p,
            Setting::RateLimit(None) => s.rate_limits.clear(),
            Setting::RateLimit(Some(p)) => {
                if !s.rate_limits.contains(p) {
                    s.rate_limits.push(*p);
                }
            }
            Setting::Cache(p) => s.cache = *p,
            Setting::AccessLog(a) => s.access_log = a.clone(),
            // Not inherited location settings: handled by their own level.
            Setting::WorkerThreads(_)
            | Setting::ErrorLog(_)
            | Setting::ShutdownTimeout(_)
            | Setting::MemoryTrim(_)
            | Setting::Admin(_)
            | Setting::Upstream(_)
            | Setting::JwtDef(_)
            | Setting::RateLimitDef(_)
            | Setting::CacheDef(_)
            | Setting::Server(_)
            | Setting::Listen(_)
            | Setting::ServerName(_)
            | Setting::SslCertificate(_)
            | Setting::SslCertificateKey(_)
            | Setting::Location(_)
            | Setting::ClientHeaderTimeout(_)
            | Setting::ClientBodyTimeout(_)
            | Setting::KeepaliveTimeout(_)
            | Setting::ClientMaxHeaderSize(_)
            | Setting::MaxConnections(_)
            | Setting::SetRealIpFrom(_)
            | Setting::RealIpHeader(_)
            | Setting::ProxyPass(_)
            | Setting::Return(_)
            | Setting::Aggregate(_)
            | Setting::Rewrite(_)
            | Setting::Consumed => {}
        }
    }
}

fn apply_client(limits: &mut ClientLimits, real_ip: &mut RealIp, items: &[Item]) {
    for i in items {
        match &i.setting {
            Setting::ClientHeaderTimeout(d) => limits.header_timeout = *d,
            Setting::ClientBodyTimeout(d) => limits.body_timeout = *d,
            Setting::KeepaliveTimeout(d) => limits.keepalive_timeout = *d,
            Setting::ClientMaxHeaderSize(n) => limits.max_header_size = *n,
            Setting::MaxConnections(n) => limits.max_connections = Some(*n),
            Setting::SetRealIpFrom(c) => real_ip.trusted.push(*c),
            Setting::RealIpHeader(h) => real_ip.header = Some(h.clone()),
            _ => {}
        }
    }
}

/// Whether a definition is the next one recorded by `collect_defs` (its
/// duplicates were reported there and are skipped here), so that indices
/// given out while resolving uses match the assembled lists.
fn next_def(defs: &[(String, Span)], len: usize, name: &str, span: Span) -> bool {
    defs.get(len).is_some_and(|(n, s)| n == name && *s == span)
}

fn assemble(cx: &mut Cx<'_>, items: Vec<Item>, files: Vec<PathBuf>) -> Option<Config> {
    let mut config = Config {
        worker_threads: None,
        error_log: ErrorLog {
            target: LogTarget::Stderr,
            level: LogLevel::Info,
        },
        shutdown_timeout: Duration::from_secs(30),
        memory_trim: true,
        admin: None,
        upstreams: Vec::new(),
        jwt: Vec::new(),
        rate_limits: Vec::new(),
        caches: Vec::new(),
        servers: Vec::new(),
        defaults: LocationSettings::default(),
        files,
    };
    let main_jwt_uses = std::mem::take(&mut cx.jwt_claim_uses);
    let mut base_limits = ClientLimits::default();
    let mut base_real_ip = RealIp::default();
    apply_client(&mut base_limits, &mut base_real_ip, &items);
    let mut base = LocationSettings::default();
    apply_level(&mut base, &items);
    config.defaults = base.clone();
    let mut once: HashMap<&'static str, Span> = HashMap::new();
    let mut server_items = Vec::new();
    for item in &items {
        let single = match &item.setting {
            Setting::WorkerThreads(_) => Some("worker_threads"),
            Setting::ErrorLog(_) => Some("error_log"),
            Setting::ShutdownTimeout(_) => Some("shutdown_timeout"),
            Setting::MemoryTrim(_) => Some("memory_trim"),
            Setting::Admin(_) => Some("admin"),
            _ => None,
        };
        if let Some(name) = single {
            if let Some(first) = once.get(name) {
                cx.push(
                    Diagnostic::error(
                        "duplicate_directive",
                        item.name_span,
                        format!("`{name}` is set twice"),
                    )
                    .label("set again here")
                    .secondary(*first, "first set here")
                    .help("keep one"),
                );
            } else {
                once.insert(name, item.name_span);
            }
        }
        match &item.setting {
            Setting::WorkerThreads(n) => config.worker_threads = *n,
            Setting::ErrorLog(e) => config.error_log = e.clone(),
            Setting::ShutdownTimeout(d) => config.shutdown_timeout = *d,
            Setting::MemoryTrim(on) => config.memory_trim = *on,
            Setting::Admin(a) => config.admin = Some(a.clone()),
            Setting::Upstream(u)
                if next_def(&cx.defs.upstreams, config.upstreams.len(), &u.name, u.span) =>
            {
                config.upstreams.push(u.clone());
            }
            Setting::JwtDef(j) if next_def(&cx.defs.jwt, config.jwt.len(), &j.name, j.span) => {
                config.jwt.push(j.clone());
            }
            Setting::RateLimitDef(r)
                if next_def(
                    &cx.defs.rate_limits,
                    config.rate_limits.len(),
                    &r.name,
                    r.span,
                ) =>
            {
                config.rate_limits.push(r.clone());
            }
            Setting::CacheDef(c)
                if next_def(&cx.defs.caches, config.caches.len(), &c.name, c.span) =>
            {
                config.caches.push(c.clone());
            }
            Setting::Server(s) => server_items.push((s, item.span)),
            _ => {}
        }
    }
    let defs_complete = config.upstreams.len() == cx.defs.upstreams.len()
        && config.jwt.len() == cx.defs.jwt.len()
        && config.rate_limits.len() == cx.defs.rate_limits.len()
        && config.caches.len() == cx.defs.caches.len();

    for (draft, span) in server_items {
        let uses: Vec<Span> = main_jwt_uses
            .iter()
            .chain(&draft.jwt_claim_uses)
            .copied()
            .collect();
        if let Some(s) = assemble_server(
            cx,
            draft,
            span,
            &base,
            &base_limits,
            &base_real_ip,
            &uses,
            &config,
            defs_complete,
        ) {
            config.servers.push(s);
        }
    }
    if cx.diags.error_count() == 0
        && config.servers.is_empty()
        && !items
            .iter()
            .any(|i| matches!(i.setting, Setting::Server(_)))
    {
        let span = Span::default();
        cx.push(
            Diagnostic::error("no_server", span, "the config has no `server`")
                .label("nothing would be served")
                .help("add `server { listen 8080; location / { proxy_pass http://UPSTREAM; } }`"),
        );
    }
    listen_checks(cx, &config);
    unused_definitions(cx);
    Some(config)
}

#[allow(clippy::too_many_arguments)]
fn assemble_server(
    cx: &mut Cx<'_>,
    draft: &ServerDraft,
    span: Span,
    base: &LocationSettings,
    base_limits: &ClientLimits,
    base_real_ip: &RealIp,
    main_jwt_uses: &[Span],
    config: &Config,
    defs_complete: bool,
) -> Option<Server> {
    let items = &draft.items[..];
    let mut limits = base_limits.clone();
    let mut real_ip = base_real_ip.clone();
    // A server's own real-IP list replaces the inherited one (NGINX).
    if items
        .iter()
        .any(|i| matches!(i.setting, Setting::SetRealIpFrom(_)))
    {
        real_ip.trusted.clear();
    }
    apply_client(&mut limits, &mut real_ip, items);
    let mut server_settings = base.clone();
    apply_level(&mut server_settings, items);
    let mut listens = Vec::new();
    let mut names = Vec::new();
    let mut cert = None;
    let mut key = None;
    let mut server_return = None;
    let mut drafts = Vec::new();
    for i in items {
        match &i.setting {
            Setting::Listen(l) => listens.push(l.clone()),
            Setting::ServerName(n) => names.extend(n.iter().cloned()),
            Setting::SslCertificate(p) => cert = Some((p.clone(), i.name_span)),
            Setting::SslCertificateKey(p) => key = Some((p.clone(), i.name_span)),
            Setting::Return(r) => server_return = Some(r.clone()),
            Setting::Location(l) => drafts.push(l),
            _ => {}
        }
    }
    if listens.is_empty() && !draft.listen_written {
        cx.push(
            Diagnostic::error(
                "missing_directive",
                Span {
                    end: span.start + 6,
                    ..span
                },
                "`server` has no `listen`",
            )
            .label("this server listens nowhere")
            .help("add `listen 8080;`"),
        );
    }
    let wants_tls = listens.iter().any(|l| l.ssl);
    let tls = match (cert, key) {
        (Some((c, cs)), Some((k, ks))) => {
            let t = Tls {
                certificate: c,
                key: k,
            };
            check_certificate(cx, &t, cs, ks);
            Some(t)
        }
        (Some((_, s)), None) | (None, Some((_, s))) => {
            cx.push(
                Diagnostic::error(
                    "incomplete_tls",
                    s,
                    "`ssl_certificate` and `ssl_certificate_key` go together",
                )
                .label("the other one is missing")
                .help("set both in this server"),
            );
            None
        }
        (None, None) => None,
    };
    if wants_tls
        && tls.is_none()
        && let Some(l) = listens.iter().find(|l| l.ssl)
    {
        cx.push(
            Diagnostic::error(
                "missing_certificate",
                l.span,
                "`listen ... ssl` without a certificate",
            )
            .label("TLS listener")
            .help("add `ssl_certificate FILE;` and `ssl_certificate_key FILE;` to this server"),
        );
    }
    check_locations(cx, &drafts);
    let mut locations = Vec::new();
    for l in drafts {
        let mut settings = server_settings.clone();
        apply_level(&mut settings, &l.items);
        let mut handler: Option<(Handler, Span)> = None;
        let mut rewrites = Vec::new();
        for i in &l.items {
            let h = match &i.setting {
                Setting::ProxyPass(p) => Some(Handler::Proxy(p.clone())),
                Setting::Return(r) => Some(Handler::Return(r.clone())),
                Setting::Aggregate(a) => Some(Handler::Aggregate(a.clone())),
                Setting::Rewrite(r) => {
                    rewrites.push(r.clone());
                    None
                }
                _ => None,
            };
            if let (Some(h), None) = (h, &handler) {
                handler = Some((h, i.name_span));
            }
        }
        if l.handlers.is_empty() && !l.misspelled_handler && server_return.is_none() {
            cx.push(
                Diagnostic::error("no_handler", l.key_span, "location has no handler")
                    .label("requests here would have nowhere to go")
                    .help("add a handler: `proxy_pass http://UPSTREAM;`, `return CODE;` or `aggregate {...}`"),
            );
        }
        // `$jwt_claim_*` needs an `auth_jwt` applying here; so do limit and
        // cache keys that use claims.
        if settings.auth_jwt.is_none() {
            for s in &l.jwt_claim_uses {
                cx.push(
                    Diagnostic::error(
                        "jwt_claim_without_auth",
                        *s,
                        "`$jwt_claim_*` used where no `auth_jwt` applies",
                    )
                    .label("no token is verified in this location")
                    .help("apply `auth_jwt NAME;` to the location or its server"),
                );
            }
            // Inherited uses: reported once each, at the first location
            // that lacks `auth_jwt`.
            for s in main_jwt_uses {
                if cx.reported_claim_uses.insert(*s) {
                    cx.push(
                        Diagnostic::error("jwt_claim_without_auth", *s, "`$jwt_claim_*` used where no `auth_jwt` applies")
                            .label("inherited by a location without `auth_jwt`")
                            .secondary(l.key_span, "no token is verified in this location")
                            .help("apply `auth_jwt NAME;` at the same level as this directive, or to every location that inherits it"),
                    );
                }
            }
            if defs_complete {
                let claims = |t: &Template| t.vars().any(|v| matches!(v, Var::JwtClaim(_)));
                let mut keyed: Vec<String> = Vec::new();
                for r in &settings.rate_limits {
                    if claims(&config.rate_limits[*r].key) {
                        keyed.push(format!("rate limit `{}`", config.rate_limits[*r].name));
                    }
                }
                if let Some(c) = settings.cache.filter(|c| claims(&config.caches[*c].key)) {
                    keyed.push(format!("cache `{}`", config.caches[c].name));
                }
                let targets: Vec<&ProxyTarget> = match handler.as_ref().map(|(h, _)| h) {
                    Some(Handler::Proxy(p)) => vec![&p.target],
                    Some(Handler::Aggregate(a)) => a.calls.iter().map(|c| &c.target).collect(),
                    _ => Vec::new(),
                };
                for t in targets {
                    if let ProxyTarget::Upstream(u) = t {
                        let up = &config.upstreams[*u];
                        if matches!(&up.balance, Balance::Hash { key, .. } if claims(key)) {
                            let what = format!("upstream `{}`", up.name);
                            if !keyed.contains(&what) {
                                keyed.push(what);
                            }
                        }
                    }
                }
                for what in keyed {
                    cx.push(
                        Diagnostic::error("jwt_claim_without_auth", l.key_span, format!("{what} keys on a JWT claim but no `auth_jwt` applies here"))
                            .label("no token is verified in this location")
                            .help("apply `auth_jwt NAME;` here, or key on something that does not need a token"),
                    );
                }
            }
        }
        let route = match l.modifier {
            Modifier::Prefix => l.pattern.clone(),
            m => format!("{} {}", m.as_str(), l.pattern),
        };
        let handler = match handler {
            Some((h, _)) => h,
            None => match &server_return {
                Some(r) => Handler::Return(r.clone()),
                None => continue,
            },
        };
        locations.push(Location {
            span: l.span,
            modifier: l.modifier,
            pattern: l.pattern.clone(),
            regex: l.regex.clone(),
            route,
            handler,
            rewrites,
            settings,
        });
    }
    Some(Server {
        span,
        listens,
        names,
        tls,
        limits,
        real_ip,
        server_return,
        settings: server_settings,
        locations,
    })
}

/// Duplicate and unreachable locations (§12, §13.5).
fn check_locations(cx: &mut Cx<'_>, drafts: &[&LocationDraft]) {
    let mut exact: HashMap<&str, Span> = HashMap::new();
    let mut prefixes: HashMap<&str, (Span, Modifier)> = HashMap::new();
    let mut regexes: Vec<(&LocationDraft, Span)> = Vec::new();
    for l in drafts {
        match l.modifier {
            Modifier::Exact => {
                if let Some(first) = exact.get(l.pattern.as_str()) {
                    cx.push(
                        Diagnostic::error(
                            "duplicate_location",
                            l.key_span,
                            format!("duplicate location `= {}`", l.pattern),
                        )
                        .label("this location can never match")
                        .secondary(*first, "the same location is defined here first, and wins")
                        .help("remove one of them, or merge their directives"),
                    );
                } else {
                    exact.insert(&l.pattern, l.key_span);
                }
            }
            Modifier::Prefix | Modifier::PrefixNoRegex => {
                if let Some((first, fm)) = prefixes.get(l.pattern.as_str()) {
                    if *fm == l.modifier {
                        cx.push(
                            Diagnostic::error(
                                "duplicate_location",
                                l.key_span,
                                format!("duplicate location `{}`", l.key_text()),
                            )
                            .label("this location can never match")
                            .secondary(*first, "the same location is defined here first, and wins")
                            .help("remove one of them, or merge their directives"),
                        );
                    } else {
                        let (winner, loser) = if l.modifier == Modifier::PrefixNoRegex {
                            ("this `^~` location", *first)
                        } else {
                            ("the `^~` location", l.key_span)
                        };
                        let _ = winner;
                        let (lspan, wspan) = if l.modifier == Modifier::PrefixNoRegex {
                            (loser, l.key_span)
                        } else {
                            (l.key_span, *first)
                        };
                        cx.push(
                            Diagnostic::error(
                                "unreachable_location",
                                lspan,
                                format!("location `{}` can never match", l.pattern),
                            )
                            .label("shadowed by an identical `^~` prefix")
                            .secondary(
                                wspan,
                                "this `^~` location has the same prefix and always wins",
                            )
                            .help("remove one of them: NGINX treats them as the same location"),
                        );
                    }
                } else {
                    prefixes.insert(&l.pattern, (l.key_span, l.modifier));
                }
            }
            Modifier::Regex | Modifier::RegexCaseless => {
                let earlier = regexes.iter().find(|(e, _)| {
                    e.pattern == l.pattern
                        && (e.modifier == l.modifier || e.modifier == Modifier::RegexCaseless)
                });
                if let Some((_, first)) = earlier {
                    cx.push(
                        Diagnostic::error(
                            "unreachable_location",
                            l.key_span,
                            format!("location `{}` can never match", l.key_text()),
                        )
                        .label("an earlier regex location matches everything this one does")
                        .secondary(*first, "this one is tried first and wins")
                        .help("remove the later location, or merge their directives"),
                    );
                } else if let Some((p, pspan)) = hidden_by_no_regex_prefix(l, drafts) {
                    cx.push(
                        Diagnostic::error("unreachable_location", l.key_span, format!("location `{}` can never match", l.key_text()))
                            .label("every path this regex matches starts with a `^~` prefix")
                            .secondary(pspan, format!("`^~ {p}` wins before regexes are tried"))
                            .help(format!("drop `^~` from `{p}`, or move this regex's directives into that location")),
                    );
                }
                regexes.push((l, l.key_span));
            }
        }
    }
}

/// A regex anchored at `^` with a literal start that lies under a `^~`
/// prefix (and under no longer plain prefix) can never be tried.
fn hidden_by_no_regex_prefix<'d>(
    l: &LocationDraft,
    drafts: &[&'d LocationDraft],
) -> Option<(&'d str, Span)> {
    if l.modifier != Modifier::Regex {
        return None;
    }
    let lit = anchored_literal_prefix(&l.pattern)?;
    let best = drafts
        .iter()
        .filter(|d| {
            matches!(d.modifier, Modifier::Prefix | Modifier::PrefixNoRegex)
                && lit.starts_with(d.pattern.as_str())
        })
        .max_by_key(|d| d.pattern.len())?;
    if best.modifier != Modifier::PrefixNoRegex {
        return None;
    }
    // A longer plain prefix that some matching path could reach would let
    // the regex be tried.
    let escapes = drafts.iter().any(|d| {
        d.modifier == Modifier::Prefix
            && d.pattern.len() > best.pattern.len()
            && d.pattern.starts_with(lit.as_str())
    });
    (!escapes).then_some((best.pattern.as_str(), best.key_span))
}

fn anchored_literal_prefix(pattern: &str) -> Option<String> {
    use regex_syntax::hir::{HirKind, Look};
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    let HirKind::Concat(parts) = hir.kind() else {
        return None;
    };
    let mut it = parts.iter();
    let first = it.next()?;
    if !matches!(first.kind(), HirKind::Look(Look::Start)) {
        return None;
    }
    let mut out = Vec::new();
    for p in it {
        match p.kind() {
            HirKind::Literal(lit) => out.extend_from_slice(&lit.0),
            _ => break,
        }
    }
    if out.is_empty() {
        return None;
    }
    String::from_utf8(out).ok()
}

impl LocationDraft {
    fn key_text(&self) -> String {
        match self.modifier {
            Modifier::Prefix => self.pattern.clone(),
            m => format!("{} {}", m.as_str(), self.pattern),
        }
    }
}

fn listen_checks(cx: &mut Cx<'_>, config: &Config) {
    let mut seen: HashMap<SocketAddr, (&Listen, usize)> = HashMap::new();
    let mut defaults: HashMap<SocketAddr, Span> = HashMap::new();
    let mut names: HashMap<(SocketAddr, String), ()> = HashMap::new();
    for (si, s) in config.servers.iter().enumerate() {
        for l in &s.listens {
            if let Some((first, fsi)) = seen.get(&l.addr) {
                if *fsi == si {
                    cx.push(
                        Diagnostic::error(
                            "duplicate_listen",
                            l.span,
                            format!("`listen {}` appears twice in one server", l.addr),
                        )
                        .label("again here")
                        .secondary(first.span, "first here")
                        .help("remove the duplicate"),
                    );
                } else if first.ssl != l.ssl || first.http2 != l.http2 {
                    cx.push(
                        Diagnostic::error(
                            "listen_conflict",
                            l.span,
                            format!("`{}` is used twice with different settings", l.addr),
                        )
                        .label(format!("ssl={} http2={} here", l.ssl, l.http2))
                        .secondary(
                            first.span,
                            format!("ssl={} http2={} here", first.ssl, first.http2),
                        )
                        .help("servers sharing an address must agree on `ssl` and `http2`"),
                    );
                }
            } else {
                seen.insert(l.addr, (l, si));
            }
            if l.default_server {
                if let Some(first) = defaults.get(&l.addr) {
                    cx.push(
                        Diagnostic::error(
                            "duplicate_default_server",
                            l.span,
                            format!("two default servers for `{}`", l.addr),
                        )
                        .label("second default_server")
                        .secondary(*first, "first default_server")
                        .help("keep `default_server` on one of them"),
                    );
                } else {
                    defaults.insert(l.addr, l.span);
                }
            }
            for n in &s.names {
                if let ServerName::Exact(name) = n
                    && names.insert((l.addr, name.clone()), ()).is_some()
                {
                    cx.push(
                        Diagnostic::warning(
                            "conflicting_server_name",
                            l.span,
                            format!(
                                "server name `{name}` on `{}` is used by an earlier server",
                                l.addr
                            ),
                        )
                        .label("this server will not get requests for it")
                        .help("remove the name from one of the servers"),
                    );
                }
            }
        }
    }
}

fn unused_definitions(cx: &mut Cx<'_>) {
    for kind in [
        DefKind::Upstream,
        DefKind::Jwt,
        DefKind::RateLimit,
        DefKind::Cache,
    ] {
        let list = cx.defs_of(kind).clone();
        for (i, (name, span)) in list.iter().enumerate() {
            if !cx.used.contains(&(kind, i)) {
                cx.diags.push(
                    Diagnostic::warning(
                        "unused_definition",
                        *span,
                        format!("`{} {name}` is never used", kind.word()),
                    )
                    .label("defined here, used nowhere")
                    .help(match kind {
                        DefKind::Upstream => {
                            format!("use it with `proxy_pass http://{name};`, or remove it")
                        }
                        k => format!("apply it with `{} {name};`, or remove it", k.word()),
                    }),
                );
            }
        }
    }
}
