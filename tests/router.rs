//! Router tests: the compiled router called directly (DESIGN.md §9), NGINX's
//! documented examples, the trailing-slash redirect, server selection,
//! path normalization, and a property test against a naive reference of
//! NGINX's location algorithm.

use std::net::SocketAddr;

use proptest::prelude::*;
use regex::Regex;
use tollgate::compile::normalize::{NormalizeError, normalize_path};
use tollgate::compile::router::{Lookup, Router, RouterBuilder, RouterError, ServerNameSpec};
use tollgate::config::model::Modifier::{self, *};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// One server on 0.0.0.0:80 with these locations.
fn router(locs: &[(Modifier, &str)]) -> Router {
    router_with(&locs.iter().map(|&(m, p)| (m, p, false)).collect::<Vec<_>>())
}

fn router_with(locs: &[(Modifier, &str, bool)]) -> Router {
    let mut b = RouterBuilder::new();
    let s = b.server(&[(addr("0.0.0.0:80"), false)], &[]);
    for &(m, p, r) in locs {
        b.location(s, m, p, r).expect("location");
    }
    b.build().expect("build")
}

/// The location index found for `path`, `None` for a miss; panics on a
/// redirect.
fn hit(r: &Router, path: &str) -> Option<usize> {
    match r.lookup(0, path) {
        Lookup::Found { location, .. } => Some(location),
        Lookup::NotFound => None,
        Lookup::RedirectSlash { location } => {
            panic!("unexpected redirect to {location} for {path}")
        }
    }
}

fn redirect(r: &Router, path: &str) -> Option<usize> {
    match r.lookup(0, path) {
        Lookup::RedirectSlash { location } => Some(location),
        _ => None,
    }
}

// ------------------------------------------------------------ locations

#[test]
fn nginx_documentation_example() {
    // https://nginx.org/en/docs/http/ngx_http_core_module.html#location
    let r = router(&[
        (Exact, "/"),                          // A
        (Prefix, "/"),                         // B
        (Prefix, "/documents/"),               // C
        (PrefixNoRegex, "/images/"),           // D
        (RegexCaseless, r"\.(gif|jpg|jpeg)$"), // E
    ]);
    assert_eq!(hit(&r, "/"), Some(0));
    assert_eq!(hit(&r, "/index.html"), Some(1));
    assert_eq!(hit(&r, "/documents/document.html"), Some(2));
    assert_eq!(hit(&r, "/images/1.gif"), Some(3));
    assert_eq!(hit(&r, "/documents/1.jpg"), Some(4));
    assert_eq!(hit(&r, "/documents/1.JPG"), Some(4));
}

#[test]
fn exact_only_matches_exactly() {
    let r = router(&[(Exact, "/health")]);
    assert_eq!(hit(&r, "/health"), Some(0));
    assert_eq!(hit(&r, "/health/"), None);
    assert_eq!(hit(&r, "/healthz"), None);
    assert_eq!(hit(&r, "/"), None);
}

#[test]
fn exact_beats_regex_and_prefix() {
    let r = router(&[(Prefix, "/api"), (Regex, "^/api$"), (Exact, "/api")]);
    assert_eq!(hit(&r, "/api"), Some(2));
    assert_eq!(hit(&r, "/api/x"), Some(0));
}

#[test]
fn prefixes_compare_bytes_not_segments() {
    let r = router(&[(Prefix, "/p")]);
    assert_eq!(hit(&r, "/p"), Some(0));
    assert_eq!(hit(&r, "/pfoo"), Some(0));
    assert_eq!(hit(&r, "/p/foo"), Some(0));
    assert_eq!(hit(&r, "/"), None);
    assert_eq!(hit(&r, "/q"), None);
}

#[test]
fn longest_prefix_wins_whatever_the_order() {
    let r = router(&[
        (Prefix, "/a/b/c"),
        (Prefix, "/"),
        (Prefix, "/a"),
        (Prefix, "/a/b"),
    ]);
    assert_eq!(hit(&r, "/a/b/c/d"), Some(0));
    assert_eq!(hit(&r, "/a/b/x"), Some(3));
    assert_eq!(hit(&r, "/a/x"), Some(2));
    assert_eq!(hit(&r, "/ab"), Some(2));
    assert_eq!(hit(&r, "/b"), Some(1));
}

#[test]
fn prefix_that_does_not_start_with_slash_never_matches() {
    let r = router(&[(Prefix, "api")]);
    assert_eq!(hit(&r, "/api"), None);
}

#[test]
fn no_regex_prefix_beats_regex() {
    let r = router(&[(Regex, r"\.png$"), (PrefixNoRegex, "/static/")]);
    assert_eq!(hit(&r, "/static/a.png"), Some(1));
    assert_eq!(hit(&r, "/other/a.png"), Some(0));
}

#[test]
fn plain_prefix_loses_to_regex() {
    let r = router(&[(Prefix, "/static/"), (Regex, r"\.png$")]);
    assert_eq!(hit(&r, "/static/a.png"), Some(1));
    assert_eq!(hit(&r, "/static/a.css"), Some(0));
}

#[test]
fn no_regex_only_counts_when_it_is_the_longest_prefix() {
    let r = router(&[(PrefixNoRegex, "/a"), (Prefix, "/a/b"), (Regex, "c$")]);
    // The longest prefix is the plain `/a/b`, so regexes are tried.
    assert_eq!(hit(&r, "/a/b/c"), Some(2));
    // Here the longest is `^~ /a`: no regexes.
    assert_eq!(hit(&r, "/a/c"), Some(0));
}

#[test]
fn regex_file_order_first_match_wins() {
    let r = router(&[
        (Prefix, "/"),
        (Regex, "^/api/"),
        (Regex, "^/api/v2/"),
        (Regex, "v2"),
    ]);
    assert_eq!(hit(&r, "/api/v2/users"), Some(1));
    assert_eq!(hit(&r, "/x/v2"), Some(3));
    assert_eq!(hit(&r, "/x"), Some(0));
}

#[test]
fn regex_is_unanchored_like_pcre() {
    let r = router(&[(Regex, "ab")]);
    assert_eq!(hit(&r, "/xxabyy"), Some(0));
}

#[test]
fn case_sensitive_and_insensitive_regexes() {
    let r = router(&[(Regex, r"\.JPG$"), (RegexCaseless, r"\.PNG$")]);
    assert_eq!(hit(&r, "/a.JPG"), Some(0));
    assert_eq!(hit(&r, "/a.jpg"), None);
    assert_eq!(hit(&r, "/a.png"), Some(1));
    assert_eq!(hit(&r, "/a.PnG"), Some(1));
}

#[test]
fn prefixes_are_case_sensitive() {
    let r = router(&[(Prefix, "/API")]);
    assert_eq!(hit(&r, "/api"), None);
    assert_eq!(hit(&r, "/API/x"), Some(0));
}

#[test]
fn positional_and_named_captures() {
    let r = router(&[
        (Prefix, "/"),
        (Regex, r"^/users/(?<id>[0-9]+)/posts/([a-z]+)(/(x))?$"),
    ]);
    let path = "/users/42/posts/hello";
    let Lookup::Found { location, captures } = r.lookup(0, path) else {
        panic!("no match");
    };
    assert_eq!(location, 1);
    assert_eq!(captures.len(), 5);
    assert_eq!(captures.get(0), Some(path));
    assert_eq!(captures.get(1), Some("42"));
    assert_eq!(captures.get(2), Some("hello"));
    assert_eq!(captures.get(3), None, "group not taking part");
    assert_eq!(captures.get(9), None, "group that does not exist");
    assert_eq!(captures.name("id"), Some("42"));
    assert_eq!(captures.index_of("id"), Some(1));
    assert_eq!(captures.name("nope"), None);
    assert_eq!(captures.range(2), Some(16..21));

    let Lookup::Found { captures, .. } = r.lookup(0, "/other") else {
        panic!("no match");
    };
    assert!(captures.is_empty());
    assert_eq!(captures.get(0), None);
}

#[test]
fn caseless_captures() {
    let r = router(&[(RegexCaseless, r"^/IMG/(.+)$")]);
    let Lookup::Found { captures, .. } = r.lookup(0, "/img/Cat.png") else {
        panic!("no match");
    };
    assert_eq!(captures.get(1), Some("Cat.png"));
}

#[test]
fn unknown_server_finds_nothing() {
    let r = router(&[(Prefix, "/")]);
    assert!(matches!(r.lookup(7, "/"), Lookup::NotFound));
}

#[test]
fn empty_router_finds_nothing() {
    let r = router(&[]);
    assert!(matches!(r.lookup(0, "/"), Lookup::NotFound));
}

// ------------------------------------------------- trailing-slash redirect

#[test]
fn slash_redirect_for_path_without_slash() {
    let r = router_with(&[(Prefix, "/", false), (Prefix, "/x/", true)]);
    assert_eq!(redirect(&r, "/x"), Some(1));
    assert_eq!(hit(&r, "/x/"), Some(1));
    assert_eq!(hit(&r, "/x/y"), Some(1));
    // Only the name minus one slash redirects.
    assert_eq!(hit(&r, "/"), Some(0));
    assert_eq!(hit(&r, "/xy"), Some(0));
}

#[test]
fn no_redirect_without_the_flag() {
    let r = router_with(&[(Prefix, "/", false), (Prefix, "/x/", false)]);
    assert_eq!(hit(&r, "/x"), Some(0));
    let r = router_with(&[(Prefix, "/x/", false)]);
    assert_eq!(hit(&r, "/x"), None);
}

#[test]
fn exact_location_beats_redirect() {
    let r = router_with(&[(Prefix, "/x/", true), (Exact, "/x", false)]);
    assert_eq!(hit(&r, "/x"), Some(1));
}

#[test]
fn prefix_named_like_the_path_beats_redirect() {
    // NGINX's walk stops at `/x` and never sees `/x/` below it.
    let r = router_with(&[
        (Prefix, "/x/", true),
        (Prefix, "/x", false),
        (Regex, "^/x$", false),
    ]);
    assert_eq!(hit(&r, "/x"), Some(2), "then regexes run as usual");
    let r = router_with(&[
        (Prefix, "/x/", true),
        (PrefixNoRegex, "/x", false),
        (Regex, "^/x$", false),
    ]);
    assert_eq!(hit(&r, "/x"), Some(1));
}

#[test]
fn redirect_beats_regexes_and_shorter_prefixes() {
    // NGINX returns the redirect before trying regexes.
    let r = router_with(&[
        (Prefix, "/", false),
        (Regex, "^/x$", false),
        (Prefix, "/x/", true),
    ]);
    assert_eq!(redirect(&r, "/x"), Some(2));
}

#[test]
fn redirect_of_exact_slash_location_reports_the_exact_one() {
    let r = router_with(&[(Prefix, "/x/", true), (Exact, "/x/", false)]);
    assert_eq!(redirect(&r, "/x"), Some(1));
    assert_eq!(hit(&r, "/x/"), Some(1));
    assert_eq!(hit(&r, "/x/a"), Some(0));
    // NGINX sets auto_redirect on `= /x/` with proxy_pass, too.
    let r = router_with(&[(Exact, "/x/", true)]);
    assert_eq!(redirect(&r, "/x"), Some(0));
}

#[test]
fn redirect_ignored_on_regex_and_root() {
    let r = router_with(&[(Regex, "^/x/", true), (Prefix, "/", true)]);
    assert_eq!(hit(&r, "/x"), Some(1));
    assert_eq!(hit(&r, "/"), Some(1));
}

#[test]
fn nested_redirects() {
    let r = router_with(&[(Prefix, "/a/", true), (Prefix, "/a/b/", true)]);
    assert_eq!(redirect(&r, "/a"), Some(0));
    assert_eq!(redirect(&r, "/a/b"), Some(1));
    assert_eq!(hit(&r, "/a/bc"), Some(0));
}

// ------------------------------------------------------------ builder errors

#[test]
fn builder_rejects_bad_input() {
    let mut b = RouterBuilder::new();
    let s = b.server(&[(addr("0.0.0.0:80"), false)], &[]);
    b.location(s, Prefix, "/a", false).expect("first");
    assert!(matches!(
        b.location(s, PrefixNoRegex, "/a", false),
        Err(RouterError::DuplicateLocation { .. })
    ));
    b.location(s, Exact, "/a", false)
        .expect("exact and prefix may share a name");
    assert!(matches!(
        b.location(s, Exact, "/a", false),
        Err(RouterError::DuplicateLocation { .. })
    ));
    b.location(s, Regex, "^/a", false).expect("regex");
    b.location(s, RegexCaseless, "^/a", false)
        .expect("caseless twin is different");
    assert!(matches!(
        b.location(s, Regex, "^/a", false),
        Err(RouterError::DuplicateLocation { .. })
    ));
    assert!(matches!(
        b.location(s, Regex, "(", false),
        Err(RouterError::Regex { .. })
    ));
    assert!(matches!(
        b.location(s, Prefix, "", false),
        Err(RouterError::EmptyPattern)
    ));
    assert!(matches!(
        b.location(9, Prefix, "/", false),
        Err(RouterError::UnknownServer(9))
    ));
    b.build().expect("build");
}

#[test]
fn two_default_servers_on_one_address() {
    let mut b = RouterBuilder::new();
    b.server(&[(addr("0.0.0.0:80"), true)], &[]);
    b.server(&[(addr("0.0.0.0:80"), true)], &[]);
    assert!(matches!(
        b.build(),
        Err(RouterError::DuplicateDefaultServer {
            first: 0,
            second: 1,
            ..
        })
    ));
}

// ------------------------------------------------------------ server selection

fn exact(n: &str) -> ServerNameSpec {
    ServerNameSpec::Exact(n.into())
}
fn lead(n: &str) -> ServerNameSpec {
    ServerNameSpec::LeadingWildcard(n.into())
}
fn trail(n: &str) -> ServerNameSpec {
    ServerNameSpec::TrailingWildcard(n.into())
}
fn re(n: &str) -> ServerNameSpec {
    ServerNameSpec::Regex(Regex::new(n).expect("test regex"))
}

#[test]
fn server_name_precedence() {
    let any80 = [(addr("0.0.0.0:80"), false)];
    let mut b = RouterBuilder::new();
    let first = b.server(&any80, &[exact("first.test")]);
    let rx = b.server(&any80, &[re(r"^api\d+\.example\.com$"), re(r"example")]);
    let tail_short = b.server(&any80, &[trail("www.")]);
    let tail_long = b.server(&any80, &[trail("www.example.*")]);
    let lead_short = b.server(&any80, &[lead("*.com")]);
    let lead_long = b.server(&any80, &[lead(".example.com")]);
    let ex = b.server(
        &any80,
        &[exact("API1.example.com"), exact("www.example.com")],
    );
    let dflt = b.server(&[(addr("0.0.0.0:80"), true)], &[exact("default.test")]);
    let r = b.build().expect("build");
    let sel = |h: Option<&str>| r.select_server(addr("10.0.0.1:80"), h);

    // Exact beats everything; names are compared lowercased.
    assert_eq!(sel(Some("api1.example.com")), Some(ex));
    assert_eq!(sel(Some("www.example.com")), Some(ex));
    // Longest leading wildcard, before any trailing one.
    assert_eq!(sel(Some("www.example.org.example.com")), Some(lead_long));
    assert_eq!(sel(Some("a.b.example.com")), Some(lead_long));
    assert_eq!(sel(Some("other.com")), Some(lead_short));
    // `*.example.com` does not match `example.com` itself.
    assert_eq!(sel(Some("example.com")), Some(lead_short));
    // Longest trailing wildcard.
    assert_eq!(sel(Some("www.example.org")), Some(tail_long));
    assert_eq!(sel(Some("www.example.co.uk")), Some(tail_long));
    assert_eq!(sel(Some("www.other.org")), Some(tail_short));
    assert_eq!(
        sel(Some("www")),
        Some(dflt),
        "a trailing wildcard needs something after the dot"
    );
    // Regexes in order.
    assert_eq!(sel(Some("api7.example.net")), Some(rx));
    assert_eq!(sel(Some("myexample.org")), Some(rx));
    // Then the default_server.
    assert_eq!(sel(Some("unknown.test")), Some(dflt));
    assert_eq!(sel(None), Some(dflt));
    assert_eq!(sel(Some("first.test")), Some(first));
}

#[test]
fn first_server_when_no_default() {
    let mut b = RouterBuilder::new();
    let a = b.server(&[(addr("0.0.0.0:8080"), false)], &[exact("a.test")]);
    let bb = b.server(&[(addr("0.0.0.0:8080"), false)], &[exact("b.test")]);
    let r = b.build().expect("build");
    assert_eq!(
        r.select_server(addr("127.0.0.1:8080"), Some("b.test")),
        Some(bb)
    );
    assert_eq!(
        r.select_server(addr("127.0.0.1:8080"), Some("zzz")),
        Some(a)
    );
    assert_eq!(r.select_server(addr("127.0.0.1:8080"), None), Some(a));
    assert_eq!(
        r.select_server(addr("127.0.0.1:9999"), None),
        None,
        "nobody listens there"
    );
}

#[test]
fn the_one_server_of_an_address_takes_every_host() {
    let mut b = RouterBuilder::new();
    let only = b.server(&[(addr("0.0.0.0:80"), false)], &[exact("only.test")]);
    let other = b.server(&[(addr("0.0.0.0:81"), false)], &[exact("other.test")]);
    // Many addresses, each with its own server: each found by its own.
    let many: Vec<usize> = (0..50)
        .map(|i| b.server(&[(addr(&format!("10.0.1.{i}:8000")), false)], &[]))
        .collect();
    let r = b.build().expect("build");
    for host in [Some("only.test"), Some("other.test"), Some("x.test"), None] {
        assert_eq!(r.select_server(addr("10.0.0.1:80"), host), Some(only));
        assert_eq!(r.select_server(addr("10.0.0.1:81"), host), Some(other));
    }
    for (i, s) in many.iter().enumerate() {
        let local = addr(&format!("10.0.1.{i}:8000"));
        assert_eq!(r.select_server(local, Some("any.test")), Some(*s));
    }
    assert_eq!(r.select_server(addr("10.0.1.99:8000"), None), None);
}

#[test]
fn empty_server_name_catches_requests_without_host() {
    let mut b = RouterBuilder::new();
    let main = b.server(&[(addr("0.0.0.0:80"), true)], &[exact("main.test")]);
    let nohost = b.server(&[(addr("0.0.0.0:80"), false)], &[exact("")]);
    let r = b.build().expect("build");
    assert_eq!(r.select_server(addr("10.0.0.1:80"), None), Some(nohost));
    assert_eq!(
        r.select_server(addr("10.0.0.1:80"), Some("x.test")),
        Some(main)
    );
}

#[test]
fn contested_name_goes_to_the_first_server() {
    let mut b = RouterBuilder::new();
    let one = b.server(&[(addr("0.0.0.0:80"), false)], &[exact("same.test")]);
    b.server(&[(addr("0.0.0.0:80"), true)], &[exact("same.test")]);
    let r = b.build().expect("build");
    assert_eq!(
        r.select_server(addr("10.0.0.1:80"), Some("same.test")),
        Some(one)
    );
}

#[test]
fn specific_address_takes_precedence_over_wildcard() {
    let mut b = RouterBuilder::new();
    let wild = b.server(&[(addr("0.0.0.0:80"), true)], &[exact("wild.test")]);
    let spec = b.server(&[(addr("10.0.0.1:80"), false)], &[exact("spec.test")]);
    let spec2 = b.server(&[(addr("10.0.0.1:80"), false)], &[exact("spec2.test")]);
    let both = b.server(
        &[(addr("10.0.0.2:80"), false), (addr("0.0.0.0:81"), false)],
        &[],
    );
    let v6 = b.server(&[(addr("[::]:80"), false)], &[]);
    let r = b.build().expect("build");

    // On 10.0.0.1 only the servers of 10.0.0.1:80 are candidates, even for
    // a name that the wildcard server has.
    assert_eq!(
        r.select_server(addr("10.0.0.1:80"), Some("spec2.test")),
        Some(spec2)
    );
    assert_eq!(
        r.select_server(addr("10.0.0.1:80"), Some("wild.test")),
        Some(spec)
    );
    assert_eq!(r.select_server(addr("10.0.0.1:80"), None), Some(spec));
    // Any other local IP falls back to 0.0.0.0:80.
    assert_eq!(
        r.select_server(addr("10.0.0.9:80"), Some("spec.test")),
        Some(wild)
    );
    assert_eq!(r.select_server(addr("10.0.0.2:80"), None), Some(both));
    assert_eq!(r.select_server(addr("10.0.0.1:81"), None), Some(both));
    // IPv6 wildcard for IPv6; an IPv4-mapped address is IPv4.
    assert_eq!(r.select_server(addr("[2001:db8::1]:80"), None), Some(v6));
    assert_eq!(
        r.select_server(addr("[::ffff:10.0.0.1]:80"), None),
        Some(spec)
    );
    assert_eq!(
        r.select_server(addr("[::ffff:10.0.0.7]:80"), None),
        Some(wild)
    );
}

#[test]
fn dual_stack_socket_serves_mapped_ipv4() {
    let mut b = RouterBuilder::new();
    let v6 = b.server(&[(addr("[::]:80"), false)], &[]);
    let r = b.build().expect("build");
    assert_eq!(
        r.select_server(addr("[::ffff:10.0.0.7]:80"), None),
        Some(v6)
    );
    assert_eq!(r.select_server(addr("10.0.0.7:80"), None), None);
}

// ------------------------------------------------------------ normalization

#[test]
fn normalization() {
    let n = |p: &str| normalize_path(p).map(|c| c.into_owned());
    let ok = |p: &str| n(p).expect(p);
    assert_eq!(ok("/"), "/");
    assert_eq!(ok("/a/b"), "/a/b");
    assert_eq!(ok("/a//b///c"), "/a/b/c");
    assert_eq!(ok("//"), "/");
    assert_eq!(ok("/a/./b/."), "/a/b/");
    assert_eq!(ok("/a/b/../c"), "/a/c");
    assert_eq!(ok("/a/b/.."), "/a/");
    assert_eq!(ok("/a/.."), "/");
    assert_eq!(ok("/a/...b/..."), "/a/...b/...");
    assert_eq!(ok("/caf%C3%A9"), "/café");
    assert_eq!(ok("/a%20b"), "/a b");
    assert_eq!(
        ok("/a%2fb"),
        "/a/b",
        "encoded slash is decoded, as in NGINX"
    );
    assert_eq!(ok("/a%2F%2Fb"), "/a/b", "and merged like a raw one");
    assert_eq!(
        ok("/a/b%2F..%2Fc"),
        "/a/c",
        "and takes part in dot segments"
    );
    assert_eq!(ok("/%2e/a/%2E%2e/b"), "/b");
    assert_eq!(ok("/%25%32%46"), "/%2F", "decoded once only");
    assert_eq!(ok("/a%3Fb"), "/a?b");
    assert_eq!(ok("/a%23b"), "/a#b");

    assert_eq!(n(""), Err(NormalizeError::NotAbsolute));
    assert_eq!(n("a"), Err(NormalizeError::NotAbsolute));
    assert_eq!(n("*"), Err(NormalizeError::NotAbsolute));
    assert_eq!(n("%2Fa"), Err(NormalizeError::NotAbsolute));
    assert_eq!(n("/a%"), Err(NormalizeError::BadEscape(2)));
    assert_eq!(n("/a%4"), Err(NormalizeError::BadEscape(2)));
    assert_eq!(n("/a%4g"), Err(NormalizeError::BadEscape(2)));
    assert_eq!(n("/a%00b"), Err(NormalizeError::Nul));
    assert_eq!(n("/a\0b"), Err(NormalizeError::Nul));
    assert_eq!(n("/%C3"), Err(NormalizeError::InvalidUtf8));
    assert_eq!(n("/%80"), Err(NormalizeError::InvalidUtf8));
    assert_eq!(n("/a#frag"), Err(NormalizeError::Fragment));
    assert_eq!(n("/.."), Err(NormalizeError::AboveRoot));
    assert_eq!(n("/../a"), Err(NormalizeError::AboveRoot));
    assert_eq!(n("/a/../../b"), Err(NormalizeError::AboveRoot));
    assert_eq!(n("/%2e%2e"), Err(NormalizeError::AboveRoot));
    assert_eq!(n("/a/%2E%2E%2F%2e%2e"), Err(NormalizeError::AboveRoot));
}

#[test]
fn normalized_path_is_borrowed_when_already_normal() {
    assert!(matches!(
        normalize_path("/api/v1/users/42"),
        Ok(std::borrow::Cow::Borrowed(_))
    ));
    assert!(matches!(
        normalize_path("/a//b"),
        Ok(std::borrow::Cow::Owned(_))
    ));
}

// ------------------------------------------------------------ scale

#[test]
fn ten_thousand_prefixes() {
    let mut b = RouterBuilder::new();
    let s = b.server(&[(addr("0.0.0.0:80"), false)], &[]);
    b.location(s, Prefix, "/", false).expect("root");
    for i in 0..10_000 {
        b.location(s, Prefix, &format!("/svc/{i}/"), false)
            .expect("loc");
    }
    let r = b.build().expect("build");
    assert_eq!(hit(&r, "/svc/9999/x"), Some(10_000));
    assert_eq!(hit(&r, "/svc/1234/"), Some(1235));
    assert_eq!(hit(&r, "/svc/12345/"), Some(0));
    assert_eq!(hit(&r, "/svc/123"), Some(0));
}

// ------------------------------------------------------------ property test

/// What the reference expects.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Found(usize, Option<(usize, usize)>),
    Redirect(usize),
    NotFound,
}

/// NGINX's algorithm written the slow, obvious way: scan every location.
fn reference(locs: &[(Modifier, String, bool)], path: &str) -> Expect {
    let find = |m: &[Modifier], p: &str| {
        locs.iter()
            .position(|(lm, lp, _)| m.contains(lm) && lp == p)
    };
    if let Some(i) = find(&[Exact], path) {
        return Expect::Found(i, None);
    }
    let mut best: Option<usize> = None;
    for (i, (m, p, _)) in locs.iter().enumerate() {
        if matches!(m, Prefix | PrefixNoRegex)
            && path.starts_with(p.as_str())
            && best.is_none_or(|b| locs[b].1.len() < p.len())
        {
            best = Some(i);
        }
    }
    // The `path/` node redirects if either of its locations asks for it,
    // reporting the exact one first; an inclusive `path` hides that node.
    let slashed = format!("{path}/");
    let flagged = locs
        .iter()
        .any(|(m, p, r)| *r && !matches!(m, Regex | RegexCaseless) && *p == slashed);
    let hidden = best.is_some_and(|b| locs[b].1 == path);
    if flagged && !hidden {
        let node = find(&[Exact], &slashed).or_else(|| find(&[Prefix, PrefixNoRegex], &slashed));
        return Expect::Redirect(node.expect("flagged node exists"));
    }
    if let Some(b) = best
        && locs[b].0 == PrefixNoRegex
    {
        return Expect::Found(b, None);
    }
    for (i, (m, p, _)) in locs.iter().enumerate() {
        let re = match m {
            Regex => Regex::new(p),
            RegexCaseless => regex::RegexBuilder::new(p).case_insensitive(true).build(),
            _ => continue,
        };
        if let Some(mat) = re.expect("generated regex").find(path) {
            return Expect::Found(i, Some((mat.start(), mat.end())));
        }
    }
    best.map_or(Expect::NotFound, |b| Expect::Found(b, None))
}

fn actual(r: &Router, path: &str) -> Expect {
    match r.lookup(0, path) {
        Lookup::Found { location, captures } => {
            Expect::Found(location, captures.range(0).map(|g| (g.start, g.end)))
        }
        Lookup::RedirectSlash { location } => Expect::Redirect(location),
        Lookup::NotFound => Expect::NotFound,
    }
}

/// Short strings over a tiny alphabet, so that prefixes, exact names and
/// slash twins collide often.
fn uri() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!['/', 'a', 'b', 'A']), 0..5)
        .prop_map(|cs| format!("/{}", cs.into_iter().collect::<String>()))
}

fn regex_pattern() -> impl Strategy<Value = String> {
    (any::<bool>(), "[abA/.]{1,3}", any::<bool>()).prop_map(|(start, body, end)| {
        format!(
            "{}{}{}",
            if start { "^/" } else { "" },
            body,
            if end { "$" } else { "" }
        )
    })
}

fn location() -> impl Strategy<Value = (Modifier, String, bool)> {
    prop_oneof![
        (Just(Exact), uri(), any::<bool>()),
        (Just(Prefix), uri(), any::<bool>()),
        (Just(PrefixNoRegex), uri(), any::<bool>()),
        (Just(Regex), regex_pattern(), any::<bool>()),
        (Just(RegexCaseless), regex_pattern(), any::<bool>()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn trie_lookup_matches_naive_nginx(
        candidates in prop::collection::vec(location(), 0..24),
        paths in prop::collection::vec(uri(), 1..16),
    ) {
        let mut b = RouterBuilder::new();
        let s = b.server(&[(addr("0.0.0.0:80"), false)], &[]);
        let mut locs = Vec::new();
        for (m, p, r) in candidates {
            match b.location(s, m, &p, r) {
                Ok(i) => {
                    prop_assert_eq!(i, locs.len());
                    locs.push((m, p, r));
                }
                Err(RouterError::DuplicateLocation { .. }) => {}
                Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
            }
        }
        let r = b.build().map_err(|e| TestCaseError::fail(format!("{e}")))?;
        for path in paths {
            prop_assert_eq!(actual(&r, &path), reference(&locs, &path), "path {}", path);
        }
    }
}
