//! The compiled router: server selection and location lookup (LANGUAGE.md §3).
//!
//! Place in the pipeline: `compile` feeds every server and location of the
//! validated config into a [`RouterBuilder`] and stores the built [`Router`]
//! in the `Gateway` snapshot. Per request the server calls
//! [`Router::select_server`] with the listener address and `Host`, then
//! [`Router::lookup`] with the path from
//! [`normalize_path`](crate::compile::normalize::normalize_path), and runs
//! the pipeline of the location it gets back.
//!
//! # Location lookup
//!
//! NGINX's precedence, exactly (`ngx_http_core_find_location`):
//!
//! 1. an exact (`=`) location equal to the path wins at once;
//! 2. otherwise the longest prefix location (plain or `^~`) that the path
//!    starts with is remembered; if it is `^~` it wins;
//! 3. otherwise the regex locations are tried in file order, first match
//!    wins;
//! 4. otherwise the remembered prefix, else nothing.
//!
//! Prefixes compare bytes, not segments: `location /p` matches `/pfoo`.
//!
//! Nothing scans locations one by one. Exact locations are one hash probe;
//! prefixes are one walk down a compressed byte trie (cost bounded by the
//! path length, not the location count); regexes are one [`RegexSet`] pass,
//! after which only the winning regex runs again to extract captures.
//!
//! # The trailing-slash redirect
//!
//! NGINX marks a location whose name ends in `/` and whose handler is
//! `proxy_pass` (or another `*_pass`) as `auto_redirect`. In its static
//! location tree walk, when the path is exactly that name minus the slash
//! (`/x` for `location /x/`), the walk records "redirect" and keeps looking;
//! only an exact match of the path itself overrides it, and a redirect
//! result returns *before* regexes are tried. The 301's `Location` is the
//! location name plus `?args` when there is a query.
//!
//! So for a path `P`, the rule implemented here is: [`Lookup::RedirectSlash`]
//! when some non-regex location named `P/` has `slash_redirect`, unless
//! a `location = P` exists (step 1 wins) or a prefix location named exactly
//! `P` exists (NGINX's walk stops at that node, which hides `P/` below it,
//! and goes on to the regexes as usual). A redirect beats every regex and
//! every shorter prefix. When both `location = /x/` and `location /x/`
//! exist, the redirect reports the exact one, as NGINX does. The flag is
//! ignored on regex locations: NGINX never consults it there.
//!
//! # Server selection
//!
//! NGINX's, per listen address: a connection accepted on `IP:PORT` is served
//! by the servers that listen on exactly `IP:PORT` if there are any, else by
//! those listening on the wildcard address of that family and port
//! (`0.0.0.0:PORT` or `[::]:PORT`); the wildcard servers are *not*
//! candidates when an exact address has servers. Among the candidates, by
//! `Host`: exact name, longest leading wildcard, longest trailing wildcard,
//! first regex in config order, then the `default_server` of that address,
//! else the first server listening on it. A name claimed by two servers of
//! one address goes to the first (NGINX warns "conflicting server name").

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;

use regex::{CaptureLocations, Regex, RegexBuilder, RegexSet, RegexSetBuilder};

use crate::config::model::Modifier;

/// Why a router cannot be built. The checker reports these with spans
/// first; here they are the last line of defence.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// [`RouterBuilder::location`] was given a server index it never handed
    /// out.
    #[error("server index {0} does not exist")]
    UnknownServer(usize),
    /// A location with an empty URI or regex.
    #[error("empty location pattern")]
    EmptyPattern,
    /// The same location twice in one server (`/x` and `^~ /x` count as the
    /// same, as in NGINX; identical regexes too, LANGUAGE.md §13.5).
    #[error("duplicate location `{modifier} {pattern}` in server {server}")]
    DuplicateLocation {
        server: usize,
        modifier: &'static str,
        pattern: String,
    },
    /// A regex location that does not compile.
    #[error("invalid regex `{pattern}`")]
    Regex {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    /// The regexes of one server compile alone but not together (size
    /// limit).
    #[error("the regex locations of server {server} are too large together")]
    RegexSet {
        server: usize,
        #[source]
        source: regex::Error,
    },
    /// Two servers claim `default_server` on one address.
    #[error("servers {first} and {second} are both `default_server` on {addr}")]
    DuplicateDefaultServer {
        addr: SocketAddr,
        first: usize,
        second: usize,
    },
}

/// One `server_name` entry.
///
/// Names are matched against the `Host` lowercased without its port, so
/// exact and wildcard names are lowercased when the router is built. NGINX's
/// `.example.com` (the name and all its subdomains) is given as both
/// `Exact("example.com")` and `LeadingWildcard(".example.com")`; a server
/// without `server_name` should be given `Exact("")`, NGINX's default since
/// 0.8.48, which is what a request without `Host` matches.
#[derive(Debug, Clone)]
pub enum ServerNameSpec {
    /// `example.com`
    Exact(String),
    /// `*.example.com`, given as `.example.com` (a leading `*` is tolerated).
    /// Matches any name ending in it with at least one character before.
    LeadingWildcard(String),
    /// `www.example.*`, given as `www.example.` (a trailing `*` is
    /// tolerated). Matches any name starting with it with at least one
    /// character after.
    TrailingWildcard(String),
    /// `~^api\d+\.example\.com$`, matched against the lowercased host.
    Regex(Regex),
}

/// Collects servers and locations in config order, then builds a
/// [`Router`].
#[derive(Debug, Default)]
pub struct RouterBuilder {
    servers: Vec<ServerDraft>,
}

#[derive(Debug)]
struct ServerDraft {
    listens: Vec<(SocketAddr, bool)>,
    names: Vec<ServerNameSpec>,
    locations: Vec<LocationDraft>,
    /// (kind, pattern) of every location so far, to reject duplicates.
    seen: HashSet<(u8, String)>,
}

#[derive(Debug)]
struct LocationDraft {
    modifier: Modifier,
    pattern: String,
    slash_redirect: bool,
    regex: Option<Regex>,
}

impl RouterBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a server and returns its index, counted from 0 in call order.
    ///
    /// `listens` are the addresses it listens on, each with its
    /// `default_server` flag; `names` are its `server_name` entries in order.
    /// A server without listens is never selected (the caller supplies
    /// NGINX's default `listen` when the config has none).
    pub fn server(&mut self, listens: &[(SocketAddr, bool)], names: &[ServerNameSpec]) -> usize {
        self.servers.push(ServerDraft {
            listens: listens.iter().map(|&(a, d)| (canonical(a), d)).collect(),
            names: names.to_vec(),
            locations: Vec::new(),
            seen: HashSet::new(),
        });
        self.servers.len() - 1
    }

    /// Adds a location to server `server`, in file order, and returns its
    /// index within that server (all modifiers counted together).
    ///
    /// `slash_redirect` is NGINX's `auto_redirect`: set it for a location
    /// whose name ends in `/` and whose handler is `proxy_pass`; see the
    /// module docs for what it does.
    pub fn location(
        &mut self,
        server: usize,
        modifier: Modifier,
        pattern: &str,
        slash_redirect: bool,
    ) -> Result<usize, RouterError> {
        let draft = self
            .servers
            .get_mut(server)
            .ok_or(RouterError::UnknownServer(server))?;
        if pattern.is_empty() {
            return Err(RouterError::EmptyPattern);
        }
        let kind = match modifier {
            Modifier::Exact => 0,
            Modifier::Prefix | Modifier::PrefixNoRegex => 1,
            Modifier::Regex => 2,
            Modifier::RegexCaseless => 3,
        };
        // Compile first: an invalid regex is reported as such, every time.
        let regex = if modifier.is_regex() {
            let re = RegexBuilder::new(pattern)
                .case_insensitive(modifier == Modifier::RegexCaseless)
                .build()
                .map_err(|source| RouterError::Regex {
                    pattern: pattern.to_owned(),
                    source,
                })?;
            Some(re)
        } else {
            None
        };
        if !draft.seen.insert((kind, pattern.to_owned())) {
            return Err(RouterError::DuplicateLocation {
                server,
                modifier: modifier.as_str(),
                pattern: pattern.to_owned(),
            });
        }
        draft.locations.push(LocationDraft {
            modifier,
            pattern: pattern.to_owned(),
            slash_redirect,
            regex,
        });
        Ok(draft.locations.len() - 1)
    }

    /// Compiles every server's locations and the per-address server tables.
    pub fn build(self) -> Result<Router, RouterError> {
        let mut addr_drafts: HashMap<SocketAddr, AddrDraft> = HashMap::new();
        for (idx, server) in self.servers.iter().enumerate() {
            for &(addr, default) in &server.listens {
                let draft = addr_drafts.entry(addr).or_default();
                // Servers arrive in index order, so a repeat is the last one.
                if draft.servers.last() != Some(&idx) {
                    draft.servers.push(idx);
                }
                if default {
                    match draft.default {
                        Some(first) if first != idx => {
                            return Err(RouterError::DuplicateDefaultServer {
                                addr,
                                first,
                                second: idx,
                            });
                        }
                        _ => draft.default = Some(idx),
                    }
                }
            }
        }
        let mut addrs: Vec<(SocketAddr, AddrTable)> = addr_drafts
            .into_iter()
            .map(|(addr, draft)| (addr, AddrTable::build(&draft, &self.servers)))
            .collect();
        addrs.sort_by_key(|(addr, _)| *addr);
        let servers = self
            .servers
            .into_iter()
            .enumerate()
            .map(|(idx, s)| ServerRoutes::build(idx, s.locations))
            .collect::<Result<_, _>>()?;
        Ok(Router { servers, addrs })
    }
}

/// The immutable routing tables of one config: built once, shared by every
/// request of a snapshot.
#[derive(Debug)]
pub struct Router {
    servers: Vec<ServerRoutes>,
    /// Sorted by address, found by binary search: a config listens on a
    /// few addresses, and hashing a `SocketAddr` cost ~90 instructions a
    /// lookup, more than the comparisons.
    addrs: Vec<(SocketAddr, AddrTable)>,
}

/// The outcome of [`Router::lookup`].
#[derive(Debug, Clone)]
pub enum Lookup<'p> {
    /// Route to this location (index within the server).
    Found {
        location: usize,
        /// Regex captures; empty unless a regex location won.
        captures: Captures<'p>,
    },
    /// Answer 301 with `Location:` the path plus `/` (plus `?` and the query
    /// when there is one). `location` is the `…/` location that asked for it.
    RedirectSlash { location: usize },
    /// No location matches: 404.
    NotFound,
}

/// The capture groups of the regex location that won, as slices of the
/// normalized path: `$0` is the whole match, `$1`..`$9` the positional
/// groups, and named groups are also reachable by name.
#[derive(Debug, Clone)]
pub struct Captures<'p> {
    path: &'p str,
    groups: Option<(CaptureLocations, GroupNames)>,
}

/// The name of each group of a regex, by group index, shared by every
/// match of that regex.
type GroupNames = Arc<[Option<Box<str>>]>;

impl<'p> Captures<'p> {
    fn none(path: &'p str) -> Self {
        Captures { path, groups: None }
    }

    /// Number of groups including `$0`; 0 when no regex was involved.
    pub fn len(&self) -> usize {
        self.groups.as_ref().map_or(0, |(locs, _)| locs.len())
    }

    /// Whether there are no groups at all (no regex was involved).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Byte range of group `i` in the path, `None` if the group did not
    /// take part in the match or does not exist.
    pub fn range(&self, i: usize) -> Option<Range<usize>> {
        let (locs, _) = self.groups.as_ref()?;
        locs.get(i).map(|(s, e)| s..e)
    }

    /// Text of group `i` (`$i`).
    pub fn get(&self, i: usize) -> Option<&'p str> {
        self.path.get(self.range(i)?)
    }

    /// Group index of a named group, to resolve a name once at compile
    /// time rather than per request.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        let (_, names) = self.groups.as_ref()?;
        names.iter().position(|n| n.as_deref() == Some(name))
    }

    /// Text of the named group `name`.
    pub fn name(&self, name: &str) -> Option<&'p str> {
        self.get(self.index_of(name)?)
    }
}

impl Router {
    /// NGINX server selection for a connection accepted on `local` with
    /// `Host` header `host` (lowercased, port and any trailing dot already
    /// stripped; `None` when the request has none). `None` when no server
    /// listens on that address at all.
    pub fn select_server(&self, local: SocketAddr, host: Option<&str>) -> Option<usize> {
        let table = self.addr_table(local)?;
        Some(table.select(host.unwrap_or("")))
    }

    /// NGINX location precedence over a normalized path (see the module
    /// docs). An unknown `server` index finds nothing.
    pub fn lookup<'p>(&self, server: usize, path: &'p str) -> Lookup<'p> {
        match self.servers.get(server) {
            Some(routes) => routes.lookup(path),
            None => Lookup::NotFound,
        }
    }

    /// Number of servers.
    pub fn server_count(&self) -> usize {
        self.servers.len()
    }

    fn addr_table(&self, local: SocketAddr) -> Option<&AddrTable> {
        let canon = canonical(local);
        let port = canon.port();
        let wildcard = match canon.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let find = |key: SocketAddr| {
            self.addrs
                .binary_search_by(|(addr, _)| addr.cmp(&key))
                .ok()
                .map(|i| &self.addrs[i].1)
        };
        find(canon)
            .or_else(|| find(SocketAddr::new(wildcard, port)))
            // An IPv4 client on a dual-stack `[::]` socket shows up as a
            // mapped address; it still belongs to that socket's servers.
            .or_else(|| match local.ip() {
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                    find(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))
                }
                _ => None,
            })
    }
}

/// IPv4-mapped IPv6 becomes IPv4, and flow info and scope id are dropped,
/// so that `getsockname` results and configured addresses compare equal.
fn canonical(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    SocketAddr::new(ip, addr.port())
}

// ------------------------------------------------------------ server names

#[derive(Debug, Default)]
struct AddrDraft {
    servers: Vec<usize>,
    default: Option<usize>,
}

#[derive(Debug)]
struct AddrTable {
    exact: crate::FastMap<Box<str>, usize>,
    /// `*.example.com` stored as `.example.com`.
    leading: crate::FastMap<Box<str>, usize>,
    /// `www.example.*` stored as `www.example.`.
    trailing: crate::FastMap<Box<str>, usize>,
    /// Scanned in order: server-name regexes are a handful per address, and
    /// the caller's `Regex` may carry builder flags a `RegexSet` would lose.
    regexes: Vec<(Regex, usize)>,
    default: usize,
    /// The one server on this address, whatever the `Host` says (most
    /// configs): no name looked up.
    only: Option<usize>,
}

impl AddrTable {
    fn build(draft: &AddrDraft, servers: &[ServerDraft]) -> Self {
        let mut table = AddrTable {
            exact: crate::FastMap::default(),
            leading: crate::FastMap::default(),
            trailing: crate::FastMap::default(),
            regexes: Vec::new(),
            default: draft
                .default
                .or_else(|| draft.servers.first().copied())
                .unwrap_or_default(),
            only: None,
        };
        if let Some(&first) = draft.servers.first()
            && draft.servers.iter().all(|&s| s == first)
        {
            table.only = Some(first);
        }
        for &idx in &draft.servers {
            let Some(server) = servers.get(idx) else {
                continue;
            };
            for name in &server.names {
                // First server wins a contested name, as in NGINX.
                match name {
                    ServerNameSpec::Exact(n) => {
                        table
                            .exact
                            .entry(n.to_ascii_lowercase().into())
                            .or_insert(idx);
                    }
                    ServerNameSpec::LeadingWildcard(n) => {
                        let n = n.strip_prefix('*').unwrap_or(n);
                        table
                            .leading
                            .entry(n.to_ascii_lowercase().into())
                            .or_insert(idx);
                    }
                    ServerNameSpec::TrailingWildcard(n) => {
                        let n = n.strip_suffix('*').unwrap_or(n);
                        table
                            .trailing
                            .entry(n.to_ascii_lowercase().into())
                            .or_insert(idx);
                    }
                    ServerNameSpec::Regex(re) => table.regexes.push((re.clone(), idx)),
                }
            }
        }
        table
    }

    fn select(&self, host: &str) -> usize {
        if let Some(s) = self.only {
            return s;
        }
        if let Some(&s) = self.exact.get(host) {
            return s;
        }
        if !self.leading.is_empty() {
            // The leftmost dot gives the longest suffix.
            for (i, b) in host.bytes().enumerate() {
                if b == b'.'
                    && i > 0
                    && let Some(&s) = host.get(i..).and_then(|k| self.leading.get(k))
                {
                    return s;
                }
            }
        }
        if !self.trailing.is_empty() {
            // The rightmost dot gives the longest prefix.
            for (i, b) in host.bytes().enumerate().rev() {
                if b == b'.'
                    && i + 1 < host.len()
                    && let Some(&s) = host.get(..=i).and_then(|k| self.trailing.get(k))
                {
                    return s;
                }
            }
        }
        for (re, s) in &self.regexes {
            if re.is_match(host) {
                return *s;
            }
        }
        self.default
    }
}

// --------------------------------------------------------------- locations

#[derive(Debug)]
struct ServerRoutes {
    /// Keyed by path: `location = path`, and the `path/` location that
    /// redirects `path` (one probe answers both questions).
    statics: crate::FastMap<Box<str>, StaticEntry>,
    /// Bit `min(len, 127)` is set when some key of `statics` has that
    /// length, so most paths skip hashing altogether.
    static_lens: u128,
    prefixes: PrefixTrie,
    regexes: Option<RegexLocations>,
}

#[derive(Debug, Default, Clone, Copy)]
struct StaticEntry {
    exact: Option<usize>,
    redirect: Option<usize>,
}

impl ServerRoutes {
    fn build(server: usize, locations: Vec<LocationDraft>) -> Result<Self, RouterError> {
        let mut statics: crate::FastMap<Box<str>, StaticEntry> = crate::FastMap::default();
        let mut prefixes = Vec::new();
        let mut patterns = Vec::new();
        let mut regexes = Vec::new();
        for (idx, loc) in locations.iter().enumerate() {
            match loc.modifier {
                Modifier::Exact => {
                    statics
                        .entry(loc.pattern.as_str().into())
                        .or_default()
                        .exact = Some(idx);
                }
                Modifier::Prefix | Modifier::PrefixNoRegex => prefixes.push((
                    loc.pattern.as_bytes(),
                    PrefixHit {
                        location: idx,
                        len: loc.pattern.len(),
                        noregex: loc.modifier == Modifier::PrefixNoRegex,
                    },
                )),
                Modifier::Regex | Modifier::RegexCaseless => {
                    let Some(regex) = loc.regex.clone() else {
                        continue;
                    };
                    patterns.push(if loc.modifier == Modifier::RegexCaseless {
                        format!("(?i){}", loc.pattern)
                    } else {
                        loc.pattern.clone()
                    });
                    let names = regex.capture_names().map(|n| n.map(Box::from)).collect();
                    regexes.push(RegexLocation {
                        location: idx,
                        regex,
                        names,
                    });
                }
            }
        }
        for (idx, loc) in locations.iter().enumerate() {
            if !loc.slash_redirect || loc.modifier.is_regex() {
                continue;
            }
            let Some(key) = loc.pattern.strip_suffix('/').filter(|k| !k.is_empty()) else {
                continue;
            };
            // NGINX reports the exact twin of the node when there is one.
            let reported = statics
                .get(loc.pattern.as_str())
                .and_then(|e| e.exact)
                .unwrap_or(idx);
            statics
                .entry(key.into())
                .or_default()
                .redirect
                .get_or_insert(reported);
        }
        let static_lens = statics.keys().fold(0u128, |m, k| m | len_bit(k.len()));
        let regexes = if regexes.is_empty() {
            None
        } else {
            let set = RegexSetBuilder::new(&patterns)
                .size_limit(REGEX_SET_SIZE_LIMIT)
                .build()
                .map_err(|source| RouterError::RegexSet { server, source })?;
            Some(RegexLocations {
                set,
                locations: regexes,
            })
        };
        Ok(ServerRoutes {
            statics,
            static_lens,
            prefixes: PrefixTrie::build(prefixes),
            regexes,
        })
    }

    fn lookup<'p>(&self, path: &'p str) -> Lookup<'p> {
        let statics = if self.static_lens & len_bit(path.len()) != 0 {
            self.statics.get(path).copied()
        } else {
            None
        };
        if let Some(StaticEntry {
            exact: Some(location),
            ..
        }) = statics
        {
            return found(location, path);
        }
        let prefix = self.prefixes.longest(path.as_bytes());
        if let Some(StaticEntry {
            redirect: Some(location),
            ..
        }) = statics
            && prefix.is_none_or(|p| p.len != path.len())
        {
            return Lookup::RedirectSlash { location };
        }
        if let Some(p) = prefix
            && p.noregex
        {
            return found(p.location, path);
        }
        if let Some(regexes) = &self.regexes
            && let Some(hit) = regexes.first_match(path)
        {
            return hit;
        }
        match prefix {
            Some(p) => found(p.location, path),
            None => Lookup::NotFound,
        }
    }
}

/// Generous: a config with thousands of regex locations should build; the
/// config is trusted input and this is paid once per load.
const REGEX_SET_SIZE_LIMIT: usize = 256 << 20;

fn len_bit(len: usize) -> u128 {
    1u128 << len.min(127)
}

fn found(location: usize, path: &str) -> Lookup<'_> {
    Lookup::Found {
        location,
        captures: Captures::none(path),
    }
}

#[derive(Debug)]
struct RegexLocations {
    set: RegexSet,
    /// Same order as the patterns of `set`: file order.
    locations: Vec<RegexLocation>,
}

#[derive(Debug)]
struct RegexLocation {
    location: usize,
    regex: Regex,
    names: GroupNames,
}

impl RegexLocations {
    fn first_match<'p>(&self, path: &'p str) -> Option<Lookup<'p>> {
        // `is_match` can stop at the first hit; most requests match none.
        if !self.set.is_match(path) {
            return None;
        }
        let first = self.set.matches(path).iter().next()?;
        let winner = self.locations.get(first)?;
        let mut locs = winner.regex.capture_locations();
        winner.regex.captures_read(&mut locs, path)?;
        Some(Lookup::Found {
            location: winner.location,
            captures: Captures {
                path,
                groups: Some((locs, Arc::clone(&winner.names))),
            },
        })
    }
}

// ------------------------------------------------------------- prefix trie

#[derive(Debug, Clone, Copy)]
struct PrefixHit {
    location: usize,
    /// Length of the location's pattern.
    len: usize,
    /// `^~`
    noregex: bool,
}

/// A compressed (radix) byte trie over the prefix patterns, flattened into
/// arrays. The children of a node are consecutive nodes, sorted by the first
/// byte of their label, so finding the next edge is a binary search over at
/// most 256 bytes and a lookup costs O(path length) whatever the number of
/// locations.
#[derive(Debug)]
struct PrefixTrie {
    nodes: Vec<TrieNode>,
    /// First byte of each node's label, by node index (0 for the root).
    first_bytes: Vec<u8>,
    labels: Vec<u8>,
}

#[derive(Debug, Clone)]
struct TrieNode {
    label: Range<usize>,
    first_child: usize,
    child_count: usize,
    hit: Option<PrefixHit>,
}

const EMPTY_NODE: TrieNode = TrieNode {
    label: 0..0,
    first_child: 0,
    child_count: 0,
    hit: None,
};

impl PrefixTrie {
    /// `entries` must have distinct, non-empty patterns.
    fn build(mut entries: Vec<(&[u8], PrefixHit)>) -> Self {
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut trie = PrefixTrie {
            nodes: vec![EMPTY_NODE],
            first_bytes: vec![0],
            labels: Vec::new(),
        };
        if entries.is_empty() {
            return trie;
        }
        // An explicit stack rather than recursion: the depth is the number
        // of branch points, which a hostile or generated config can make as
        // long as its longest pattern.
        let mut work = vec![(0usize, 0usize, entries.len(), 0usize)];
        while let Some((id, mut lo, hi, depth)) = work.pop() {
            // Sorted, so the common prefix of the range is that of its ends.
            let end = if id == 0 {
                0
            } else {
                common_prefix_len(entries[lo].0, entries[hi - 1].0)
            };
            let start = trie.labels.len();
            trie.labels.extend_from_slice(&entries[lo].0[depth..end]);
            let mut hit = None;
            if entries[lo].0.len() == end {
                hit = Some(entries[lo].1);
                lo += 1;
            }
            let first_child = trie.nodes.len();
            let mut i = lo;
            while i < hi {
                let b = entries[i].0[end];
                let mut j = i + 1;
                while j < hi && entries[j].0[end] == b {
                    j += 1;
                }
                work.push((trie.nodes.len(), i, j, end));
                trie.nodes.push(EMPTY_NODE);
                trie.first_bytes.push(b);
                i = j;
            }
            trie.nodes[id] = TrieNode {
                label: start..trie.labels.len(),
                first_child,
                child_count: trie.nodes.len() - first_child,
                hit,
            };
        }
        trie
    }

    /// The longest pattern that `path` starts with.
    fn longest(&self, path: &[u8]) -> Option<PrefixHit> {
        let mut node = self.nodes.first()?;
        let mut best = None;
        let mut pos = 0;
        loop {
            if node.hit.is_some() {
                best = node.hit;
            }
            let Some(&b) = path.get(pos) else { break };
            let first = node.first_child;
            let kids = self
                .first_bytes
                .get(first..first + node.child_count)
                .unwrap_or_default();
            // Fan-out is small almost everywhere; a short linear scan beats
            // the mispredicted branches of a binary search there.
            let k = if kids.len() <= 16 {
                kids.iter().position(|&k| k == b)
            } else {
                kids.binary_search(&b).ok()
            };
            let Some(child) = k.and_then(|k| self.nodes.get(first + k)) else {
                break;
            };
            // The first byte of the label matched already.
            let rest = self
                .labels
                .get(child.label.start + 1..child.label.end)
                .unwrap_or_default();
            let end = pos + 1 + rest.len();
            if path.get(pos + 1..end) != Some(rest) {
                break;
            }
            pos = end;
            node = child;
        }
        best
    }
}

fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
