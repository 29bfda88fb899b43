//! Load balancing (LANGUAGE.md §5): which peer of an upstream serves the
//! next attempt of a request.
//!
//! `compile` builds one [`Peers`] per `upstream` block (carrying health over
//! from the previous snapshot with [`Peers::new_with_state`]); the proxy calls
//! [`Peers::pick`] once per attempt and [`Peers::report`] when the attempt
//! ends; the active health checker calls [`Peers::set_active_health`];
//! metrics read [`Peers::snapshot`]. Everything here is synchronous and free
//! of I/O, so it is tested by calling it, with explicit [`Instant`]s instead
//! of sleeps.
//!
//! The algorithms are NGINX's, down to the arithmetic where that is
//! observable (the smooth weighted round-robin sequence, the `ip_hash` and
//! `hash` walks over the weights, the ketama ring built from CRC32 of
//! `host\0port`), so an upstream moved from NGINX keeps its key-to-server
//! mapping.
//!
//! Decisions where NGINX and the contract part ways:
//!
//! - When every peer (primary and backup) is down, [`Peers::pick`] returns
//!   `None` and the proxy answers 503, as the contract says. NGINX instead
//!   ignores `max_fails` for a single-server upstream; we do not.
//! - `backup` peers are allowed with every algorithm (NGINX refuses them with
//!   `hash`, `ip_hash` and `random`). Those algorithms choose among primary
//!   peers only; when they find none available they fall back to weighted
//!   round robin over the primaries and then the backups, which is also
//!   NGINX's fallback after 20 failed draws.
//! - Passive health counts failures in a window of `fail_timeout` opened by
//!   the first failure, as the NGINX documentation describes it, rather than
//!   reproducing the `checked`/`accessed` timestamps of its implementation.
//!   A peer that has been down for `fail_timeout` gets exactly one probe
//!   request; its success revives the peer, its failure (or no report within
//!   another `fail_timeout`) keeps it down for another `fail_timeout`.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::config::model::{Balance, UpstreamServer};

/// NGINX's default `max_fails`.
pub const DEFAULT_MAX_FAILS: u32 = 1;

/// NGINX's default `fail_timeout`.
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);

/// Ring points per unit of weight for `hash KEY consistent` (ketama, as NGINX).
pub const POINTS_PER_WEIGHT: u32 = 160;

/// Extra draws `ip_hash`, `hash` and `random` make before falling back to
/// round robin; NGINX's constant.
const MAX_TRIES: usize = 20;

/// Weight above which a peer gets no more ring points: a typo such as
/// `weight=1000000` must not allocate a gigabyte of ring.
const MAX_RING_WEIGHT: u32 = 1000;

/// Which balancing method an upstream uses: [`Balance`] without the hash key
/// template, which the proxy renders per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Smooth weighted round robin (the default).
    RoundRobin,
    /// `least_conn`: fewest active requests per unit of weight.
    LeastConn,
    /// `random` (weighted) or `random two` (power of two choices).
    Random {
        /// `two`: draw two peers and take the less loaded.
        two: bool,
    },
    /// `ip_hash`: first three octets of an IPv4 client, all of IPv6.
    IpHash,
    /// `hash KEY [consistent]`.
    Hash {
        /// `consistent`: ketama ring instead of hash modulo total weight.
        consistent: bool,
    },
}

impl From<&Balance> for Algorithm {
    fn from(balance: &Balance) -> Self {
        match balance {
            Balance::RoundRobin => Algorithm::RoundRobin,
            Balance::LeastConn => Algorithm::LeastConn,
            Balance::Random { two } => Algorithm::Random { two: *two },
            Balance::IpHash => Algorithm::IpHash,
            Balance::Hash { consistent, .. } => Algorithm::Hash {
                consistent: *consistent,
            },
        }
    }
}

/// One `server` line as the balancer sees it. Its position in the list given
/// to [`Peers::new`] is its peer index everywhere in this module.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerSpec {
    /// `host:port`: identity across reloads and the consistent-hash ring key.
    pub address: String,
    /// Relative share of traffic; 0 is treated as 1.
    pub weight: u32,
    /// Failures within `fail_timeout` that mark the peer down; 0 = never.
    pub max_fails: u32,
    /// Failure window, and how long a peer stays down.
    pub fail_timeout: Duration,
    /// Used only when no primary peer is available.
    pub backup: bool,
}

impl PeerSpec {
    /// A primary peer with NGINX's defaults (`weight=1 max_fails=1 fail_timeout=10s`).
    pub fn new(address: impl Into<String>) -> Self {
        PeerSpec {
            address: address.into(),
            weight: 1,
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
            backup: false,
        }
    }
}

impl From<&UpstreamServer> for PeerSpec {
    fn from(server: &UpstreamServer) -> Self {
        PeerSpec {
            address: server.address.clone(),
            weight: server.weight,
            max_fails: server.max_fails,
            fail_timeout: server.fail_timeout,
            backup: server.backup,
        }
    }
}

/// How an attempt on a peer ended, for passive health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The peer answered (whatever the status, unless the proxy decides otherwise).
    Success,
    /// Connection error, timeout, or a response the proxy counts as failure.
    Failure,
}

/// The peers already tried by one request, so a retry goes elsewhere.
///
/// A bitset by peer index: the first 64 peers live inline (no allocation for
/// ordinary upstreams); larger indices spill into a vector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tried {
    low: u64,
    high: Vec<u64>,
}

impl Tried {
    /// An empty set.
    pub const fn new() -> Self {
        Tried {
            low: 0,
            high: Vec::new(),
        }
    }

    /// Adds a peer index.
    pub fn insert(&mut self, peer: usize) {
        if peer < 64 {
            self.low |= 1 << peer;
            return;
        }
        let word = peer / 64 - 1;
        if self.high.len() <= word {
            self.high.resize(word + 1, 0);
        }
        if let Some(w) = self.high.get_mut(word) {
            *w |= 1 << (peer % 64);
        }
    }

    /// Whether a peer index was added.
    pub fn contains(&self, peer: usize) -> bool {
        if peer < 64 {
            return self.low & (1 << peer) != 0;
        }
        self.high
            .get(peer / 64 - 1)
            .is_some_and(|w| w & (1 << (peer % 64)) != 0)
    }

    /// How many peers were added.
    pub fn len(&self) -> usize {
        let high: u32 = self.high.iter().map(|w| w.count_ones()).sum();
        (self.low.count_ones() + high) as usize
    }

    /// Whether no peer was added.
    pub fn is_empty(&self) -> bool {
        self.low == 0 && self.high.iter().all(|&w| w == 0)
    }

    /// Forgets every peer, keeping the allocation.
    pub fn clear(&mut self) {
        self.low = 0;
        self.high.clear();
    }
}

static NOTHING_TRIED: Tried = Tried::new();

/// What [`Peers::pick`] needs to know about one attempt of one request.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    /// The time of the attempt: passive health compares it with failure times.
    pub now: Instant,
    /// The client address, for `ip_hash` (round robin when `None`).
    pub client_ip: Option<IpAddr>,
    /// The rendered `hash KEY`, for `hash` (round robin when `None`).
    pub hash_key: Option<&'a [u8]>,
    /// Peers earlier attempts of this request went to; never picked again.
    pub tried: &'a Tried,
}

impl<'a> PickContext<'a> {
    /// A context with no client address, no hash key and nothing tried.
    pub fn new(now: Instant) -> Self {
        PickContext {
            now,
            client_ip: None,
            hash_key: None,
            tried: &NOTHING_TRIED,
        }
    }

    /// Sets the client address.
    pub fn client_ip(mut self, ip: IpAddr) -> Self {
        self.client_ip = Some(ip);
        self
    }

    /// Sets the rendered hash key.
    pub fn hash_key(mut self, key: &'a [u8]) -> Self {
        self.hash_key = Some(key);
        self
    }

    /// Sets the peers already tried.
    pub fn tried(mut self, tried: &'a Tried) -> Self {
        self.tried = tried;
        self
    }
}

/// Per-peer state that outlives a reload as long as the address stays:
/// in-flight requests of the old snapshot still count for `least_conn` of
/// the new one, and the health checker's verdict holds for both.
#[derive(Debug)]
struct Shared {
    active: AtomicUsize,
    active_up: AtomicBool,
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            active: AtomicUsize::new(0),
            active_up: AtomicBool::new(true),
        })
    }
}

/// A chosen peer. Holding it counts as one active request on that peer
/// (for `least_conn` and `random two`); dropping it ends the request.
#[derive(Debug)]
#[must_use = "dropping a Pick ends the request on that peer"]
pub struct Pick {
    peer: usize,
    shared: Arc<Shared>,
}

impl Pick {
    /// The peer index (position in the spec list given to [`Peers::new`]).
    pub fn peer(&self) -> usize {
        self.peer
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.shared.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One peer's state, for metrics and the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// `host:port` as configured.
    pub address: String,
    /// A `backup` peer.
    pub backup: bool,
    /// Configured weight (0 shown as 1).
    pub weight: u32,
    /// Can be picked now: up by active check and not down by passive health.
    pub up: bool,
    /// The active health checker's verdict (true until it says otherwise).
    pub active_up: bool,
    /// Not down by passive health at the time asked.
    pub passive_up: bool,
    /// Failures counted in the current window.
    pub fails: u32,
    /// Requests in flight (live [`Pick`]s).
    pub active_requests: usize,
}

/// Passive health of one peer.
#[derive(Debug, Clone, Copy, Default)]
struct Passive {
    fails: u32,
    window_start: Option<Instant>,
    /// When the peer went down, or when its probe was sent.
    down_since: Option<Instant>,
    /// The one request sent after `fail_timeout` is in flight.
    probing: bool,
}

impl Passive {
    fn is_up(&self, fail_timeout: Duration, now: Instant) -> bool {
        self.down_since
            .is_none_or(|since| now.saturating_duration_since(since) >= fail_timeout)
    }
}

/// The mutable part of a peer, behind its tier's lock.
#[derive(Debug, Clone, Copy)]
struct MemberState {
    current: i64,
    effective: i64,
    passive: Passive,
}

/// The immutable part of a peer, as its tier uses it.
#[derive(Debug)]
struct Member {
    peer: usize,
    weight: u32,
    max_fails: u32,
    fail_timeout: Duration,
    shared: Arc<Shared>,
}

impl Member {
    fn active(&self) -> u64 {
        self.shared.active.load(Ordering::Relaxed) as u64
    }
}

/// The ketama ring: points sorted by hash, each naming a group of members
/// that share one address.
#[derive(Debug, Default)]
struct Ring {
    points: Box<[(u32, usize)]>,
    groups: Box<[Box<[usize]>]>,
}

/// The primary peers, or the backup peers: each tier balances on its own,
/// as NGINX's `peers` and `peers->next`.
#[derive(Debug)]
struct Tier {
    members: Box<[Member]>,
    /// `cumulative[i]` = weights of members `0..=i`, for the weighted walks.
    cumulative: Box<[u64]>,
    ring: Option<Ring>,
    state: Mutex<Box<[MemberState]>>,
}

/// Where a peer index lives.
#[derive(Debug)]
struct Entry {
    spec: PeerSpec,
    member: usize,
}

/// The peers of one upstream and their balancing and health state.
///
/// Shared by every worker thread (put it behind an `Arc`, or inside the
/// gateway snapshot). A pick takes one uncontended-in-practice lock per tier
/// it looks at, as NGINX does; round robin and `least_conn` are linear in the
/// number of peers, the hashes and `random` constant in the common case.
#[derive(Debug)]
pub struct Peers {
    algorithm: Algorithm,
    entries: Box<[Entry]>,
    primary: Tier,
    backup: Tier,
}

impl Peers {
    /// Peers with fresh health state.
    pub fn new(specs: impl IntoIterator<Item = PeerSpec>, algorithm: Algorithm) -> Peers {
        Peers::new_with_state(specs, algorithm, None)
    }

    /// Peers that keep the state of `previous` (the snapshot being replaced)
    /// for every peer whose address is unchanged: active requests and the
    /// active health verdict always, passive health when `max_fails` and
    /// `fail_timeout` are unchanged too. Round-robin positions start afresh.
    /// Duplicate addresses pair up in order.
    pub fn new_with_state(
        specs: impl IntoIterator<Item = PeerSpec>,
        algorithm: Algorithm,
        previous: Option<&Peers>,
    ) -> Peers {
        let mut old: HashMap<&str, VecDeque<usize>> = HashMap::new();
        if let Some(prev) = previous {
            for (i, e) in prev.entries.iter().enumerate() {
                old.entry(e.spec.address.as_str()).or_default().push_back(i);
            }
        }

        let mut entries = Vec::new();
        let mut tiers: [(Vec<Member>, Vec<Passive>); 2] = Default::default();
        for (peer, mut spec) in specs.into_iter().enumerate() {
            spec.weight = spec.weight.max(1);
            let carried = old
                .get_mut(spec.address.as_str())
                .and_then(VecDeque::pop_front)
                .and_then(|i| Some((previous?, i)));
            let shared = carried
                .and_then(|(prev, i)| prev.member_of(i))
                .map_or_else(Shared::new, |m| Arc::clone(&m.shared));
            let passive = carried
                .filter(|(prev, i)| {
                    prev.entries.get(*i).is_some_and(|e| {
                        e.spec.max_fails == spec.max_fails
                            && e.spec.fail_timeout == spec.fail_timeout
                    })
                })
                .and_then(|(prev, i)| prev.passive_of(i))
                .unwrap_or_default();
            let (members, passives) = &mut tiers[usize::from(spec.backup)];
            entries.push(Entry {
                member: members.len(),
                spec: spec.clone(),
            });
            members.push(Member {
                peer,
                weight: spec.weight,
                max_fails: spec.max_fails,
                fail_timeout: spec.fail_timeout,
                shared,
            });
            passives.push(passive);
        }

        let consistent = algorithm == Algorithm::Hash { consistent: true };
        let [(primary, primary_passive), (backup, backup_passive)] = tiers;
        let primary = Tier::new(primary, primary_passive, consistent.then_some(&entries));
        let backup = Tier::new(backup, backup_passive, None);
        Peers {
            algorithm,
            entries: entries.into_boxed_slice(),
            primary,
            backup,
        }
    }

    /// The balancing method.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// How many peers (primary and backup).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no peers at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The spec of a peer (weight 0 shown as 1).
    pub fn spec(&self, peer: usize) -> Option<&PeerSpec> {
        self.entries.get(peer).map(|e| &e.spec)
    }

    /// Chooses a peer for one attempt, or `None` when every peer not yet
    /// tried is down (the proxy answers 503).
    pub fn pick(&self, ctx: &PickContext<'_>) -> Option<Pick> {
        let primary = &self.primary;
        let first = match self.algorithm {
            Algorithm::RoundRobin => None,
            Algorithm::LeastConn => {
                return primary
                    .pick_with(ctx.now, |t, s| t.least_conn(s, ctx))
                    .or_else(|| self.backup.pick_with(ctx.now, |t, s| t.least_conn(s, ctx)));
            }
            Algorithm::Random { two } => primary.pick_with(ctx.now, |t, s| t.random(s, ctx, two)),
            Algorithm::IpHash => ctx
                .client_ip
                .and_then(|ip| primary.pick_with(ctx.now, |t, s| t.ip_hash(s, ctx, ip))),
            Algorithm::Hash { consistent } => ctx.hash_key.and_then(|key| {
                primary.pick_with(ctx.now, |t, s| {
                    if consistent {
                        t.consistent(s, ctx, key)
                    } else {
                        t.hash(s, ctx, key)
                    }
                })
            }),
        };
        first.or_else(|| {
            [primary, &self.backup]
                .into_iter()
                .find_map(|tier| tier.pick_with(ctx.now, |t, s| t.wrr(s, ctx, 0..s.len())))
        })
    }

    /// Records how an attempt on `peer` ended, for passive health. Report to
    /// the same `Peers` the pick came from; unknown indices are ignored.
    pub fn report(&self, peer: usize, outcome: Outcome, now: Instant) {
        let Some(entry) = self.entries.get(peer) else {
            return;
        };
        let tier = self.tier(&entry.spec);
        let Some(member) = tier.members.get(entry.member) else {
            return;
        };
        if let Some(state) = lock(&tier.state).get_mut(entry.member) {
            state.record(member, outcome, now);
        }
    }

    /// The active health checker's verdict on `peer`; a peer down by active
    /// check is never picked. Returns whether the verdict changed.
    pub fn set_active_health(&self, peer: usize, up: bool) -> bool {
        self.member_of(peer)
            .is_some_and(|m| m.shared.active_up.swap(up, Ordering::Relaxed) != up)
    }

    /// Whether `peer` could be picked at `now` (ignoring which peers a
    /// request already tried).
    pub fn is_up(&self, peer: usize, now: Instant) -> bool {
        let Some(member) = self.member_of(peer) else {
            return false;
        };
        member.shared.active_up.load(Ordering::Relaxed)
            && self
                .passive_of(peer)
                .is_some_and(|p| p.is_up(member.fail_timeout, now))
    }

    /// Requests in flight on `peer`.
    pub fn active_requests(&self, peer: usize) -> usize {
        self.member_of(peer)
            .map_or(0, |m| m.shared.active.load(Ordering::Relaxed))
    }

    /// Every peer's state at `now`, in peer-index order.
    pub fn snapshot(&self, now: Instant) -> Vec<PeerStatus> {
        let primary = lock(&self.primary.state);
        let backup = lock(&self.backup.state);
        self.entries
            .iter()
            .filter_map(|e| {
                let (tier, states) = if e.spec.backup {
                    (&self.backup, &backup)
                } else {
                    (&self.primary, &primary)
                };
                let member = tier.members.get(e.member)?;
                let passive = states.get(e.member)?.passive;
                let active_up = member.shared.active_up.load(Ordering::Relaxed);
                let passive_up = passive.is_up(member.fail_timeout, now);
                Some(PeerStatus {
                    address: e.spec.address.clone(),
                    backup: e.spec.backup,
                    weight: e.spec.weight,
                    up: active_up && passive_up,
                    active_up,
                    passive_up,
                    fails: passive.fails,
                    active_requests: member.shared.active.load(Ordering::Relaxed),
                })
            })
            .collect()
    }

    fn tier(&self, spec: &PeerSpec) -> &Tier {
        if spec.backup {
            &self.backup
        } else {
            &self.primary
        }
    }

    fn member_of(&self, peer: usize) -> Option<&Member> {
        let entry = self.entries.get(peer)?;
        self.tier(&entry.spec).members.get(entry.member)
    }

    fn passive_of(&self, peer: usize) -> Option<Passive> {
        let entry = self.entries.get(peer)?;
        lock(&self.tier(&entry.spec).state)
            .get(entry.member)
            .map(|s| s.passive)
    }
}

/// A poisoned lock still holds consistent state: nothing here panics while
/// holding one, and a half-updated weight is harmless anyway.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemberState {
    fn record(&mut self, member: &Member, outcome: Outcome, now: Instant) {
        let passive = &mut self.passive;
        match outcome {
            Outcome::Success => {
                // Only the probe's success revives a down peer; a late success
                // from before it went down proves nothing about it now.
                if passive.probing {
                    *passive = Passive::default();
                }
            }
            Outcome::Failure => {
                if member.max_fails == 0 {
                    return;
                }
                // NGINX lowers the effective weight on failure and lets
                // round robin raise it back one step per pick (slow start).
                self.effective =
                    (self.effective - i64::from(member.weight / member.max_fails)).max(0);
                if passive.down_since.is_some() {
                    passive.down_since = Some(now);
                    passive.probing = false;
                    return;
                }
                let window_over = passive
                    .window_start
                    .is_none_or(|start| now.saturating_duration_since(start) > member.fail_timeout);
                if window_over {
                    passive.window_start = Some(now);
                    passive.fails = 1;
                } else {
                    passive.fails = passive.fails.saturating_add(1);
                }
                if passive.fails >= member.max_fails {
                    passive.down_since = Some(now);
                }
            }
        }
    }
}

impl Tier {
    fn new(members: Vec<Member>, passive: Vec<Passive>, ring_of: Option<&Vec<Entry>>) -> Tier {
        let cumulative = members
            .iter()
            .scan(0u64, |sum, m| {
                *sum += u64::from(m.weight);
                Some(*sum)
            })
            .collect();
        let state = members
            .iter()
            .zip(passive)
            .map(|(m, passive)| MemberState {
                current: 0,
                effective: i64::from(m.weight),
                passive,
            })
            .collect();
        let ring = ring_of.map(|entries| Ring::new(&members, entries));
        Tier {
            members: members.into_boxed_slice(),
            cumulative,
            ring,
            state: Mutex::new(state),
        }
    }

    fn total_weight(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// Runs a selector under the tier lock and claims what it chose.
    fn pick_with(
        &self,
        now: Instant,
        select: impl FnOnce(&Tier, &mut [MemberState]) -> Option<usize>,
    ) -> Option<Pick> {
        if self.members.is_empty() {
            return None;
        }
        let mut state = lock(&self.state);
        let m = select(self, &mut state)?;
        let member = self.members.get(m)?;
        let s = state.get_mut(m)?;
        if s.passive.down_since.is_some() {
            // Down for fail_timeout already, else it would not have been
            // chosen: this is the probe, and the peer stays closed to other
            // requests until it reports back or another fail_timeout passes.
            s.passive.down_since = Some(now);
            s.passive.probing = true;
        }
        member.shared.active.fetch_add(1, Ordering::Relaxed);
        Some(Pick {
            peer: member.peer,
            shared: Arc::clone(&member.shared),
        })
    }

    fn available(&self, state: &[MemberState], m: usize, ctx: &PickContext<'_>) -> bool {
        let (Some(member), Some(s)) = (self.members.get(m), state.get(m)) else {
            return false;
        };
        !ctx.tried.contains(member.peer)
            && member.shared.active_up.load(Ordering::Relaxed)
            && s.passive.is_up(member.fail_timeout, ctx.now)
    }

    fn weight(&self, m: usize) -> u64 {
        self.members.get(m).map_or(0, |m| u64::from(m.weight))
    }

    /// The member owning point `w` of `0..total_weight`.
    fn member_at(&self, w: u64) -> Option<usize> {
        let m = self.cumulative.partition_point(|&c| c <= w);
        (m < self.members.len()).then_some(m)
    }

    /// NGINX's smooth weighted round robin over the available `candidates`.
    fn wrr(
        &self,
        state: &mut [MemberState],
        ctx: &PickContext<'_>,
        candidates: impl Iterator<Item = usize>,
    ) -> Option<usize> {
        let mut best: Option<(usize, i64)> = None;
        let mut total = 0i64;
        for m in candidates {
            if !self.available(state, m, ctx) {
                continue;
            }
            let weight = self.weight(m) as i64;
            let Some(s) = state.get_mut(m) else { continue };
            s.current += s.effective;
            total += s.effective;
            if s.effective < weight {
                s.effective += 1;
            }
            if best.is_none_or(|(_, current)| s.current > current) {
                best = Some((m, s.current));
            }
        }
        let (m, _) = best?;
        if let Some(s) = state.get_mut(m) {
            s.current -= total;
        }
        Some(m)
    }

    /// Fewest active requests per unit of weight; ties by round robin.
    fn least_conn(&self, state: &mut [MemberState], ctx: &PickContext<'_>) -> Option<usize> {
        // (member, active, weight): compare active/weight by cross-multiplying.
        let mut best: Option<(usize, u64, u64)> = None;
        let mut many = false;
        for (m, member) in self.members.iter().enumerate() {
            if !self.available(state, m, ctx) {
                continue;
            }
            let (active, weight) = (member.active(), u64::from(member.weight));
            match best {
                Some((_, b_active, b_weight)) if active * b_weight > b_active * weight => {}
                Some((_, b_active, b_weight)) if active * b_weight == b_active * weight => {
                    many = true;
                }
                _ => {
                    best = Some((m, active, weight));
                    many = false;
                }
            }
        }
        let (b, b_active, b_weight) = best?;
        if !many {
            return Some(b);
        }
        let tied = (b..self.members.len()).filter(|&m| {
            self.members
                .get(m)
                .is_some_and(|mm| mm.active() * b_weight == b_active * u64::from(mm.weight))
        });
        // Counts move under us (they are atomics): if the tie dissolved, b still stands.
        self.wrr(state, ctx, tied).or(Some(b))
    }

    /// Weighted random; `two` draws two distinct peers and keeps the one with
    /// fewer active requests per unit of weight (the first on a tie).
    fn random(&self, state: &mut [MemberState], ctx: &PickContext<'_>, two: bool) -> Option<usize> {
        let total = self.total_weight();
        if total == 0 {
            return None;
        }
        let draw = || self.member_at(fastrand::u64(0..total));
        let first =
            (0..=MAX_TRIES).find_map(|_| draw().filter(|&m| self.available(state, m, ctx)))?;
        if !two || self.members.len() < 2 {
            return Some(first);
        }
        let second = (0..=MAX_TRIES)
            .find_map(|_| draw().filter(|&m| m != first && self.available(state, m, ctx)));
        let load = |m: usize| self.members.get(m).map_or(0, Member::active);
        Some(match second {
            Some(s) if load(s) * self.weight(first) < load(first) * self.weight(s) => s,
            _ => first,
        })
    }

    /// NGINX's `ip_hash`: a rolling hash of the /24 (IPv4) or the whole
    /// address (IPv6), rehashed from where it left off while the peer it
    /// lands on is unavailable.
    fn ip_hash(
        &self,
        state: &mut [MemberState],
        ctx: &PickContext<'_>,
        ip: IpAddr,
    ) -> Option<usize> {
        let total = self.total_weight();
        if total == 0 {
            return None;
        }
        // A v4 client on a dual-stack socket arrives as ::ffff:a.b.c.d; it is
        // the same client as over a v4 socket.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        let (buf, len) = match ip {
            IpAddr::V4(v4) => {
                let mut buf = [0u8; 16];
                buf[..4].copy_from_slice(&v4.octets());
                (buf, 3)
            }
            IpAddr::V6(v6) => (v6.octets(), 16),
        };
        let mut hash: u64 = 89;
        for _ in 0..=MAX_TRIES {
            for &b in buf.iter().take(len) {
                hash = (hash * 113 + u64::from(b)) % 6271;
            }
            let m = self.member_at(hash % total)?;
            if self.available(state, m, ctx) {
                return Some(m);
            }
        }
        None
    }

    /// NGINX's `hash KEY`: Cache::Memcached's
    /// `((crc32([REHASH] KEY) >> 16) & 0x7fff) + PREV_HASH` modulo the total
    /// weight, rehashing while the peer it lands on is unavailable.
    fn hash(&self, state: &mut [MemberState], ctx: &PickContext<'_>, key: &[u8]) -> Option<usize> {
        let total = self.total_weight();
        if total == 0 {
            return None;
        }
        let mut hash: u64 = 0;
        for rehash in 0..=MAX_TRIES {
            let mut crc = Crc32::new();
            if rehash > 0 {
                crc.update(itoa::Buffer::new().format(rehash).as_bytes());
            }
            crc.update(key);
            hash += u64::from((crc.finish() >> 16) & 0x7fff);
            let m = self.member_at(hash % total)?;
            if self.available(state, m, ctx) {
                return Some(m);
            }
        }
        None
    }

    /// `hash KEY consistent`: the first ring point at or after crc32(KEY),
    /// walking clockwise past unavailable peers.
    fn consistent(
        &self,
        state: &mut [MemberState],
        ctx: &PickContext<'_>,
        key: &[u8],
    ) -> Option<usize> {
        let ring = self.ring.as_ref()?;
        let len = ring.points.len();
        if len == 0 {
            return None;
        }
        let hash = crc32(key);
        let start = ring.points.partition_point(|&(h, _)| h < hash);
        for step in 0..=MAX_TRIES {
            let Some(&(_, group)) = ring.points.get((start + step) % len) else {
                continue;
            };
            let Some(group) = ring.groups.get(group) else {
                continue;
            };
            if let Some(m) = self.wrr(state, ctx, group.iter().copied()) {
                return Some(m);
            }
        }
        None
    }
}

impl Ring {
    /// NGINX's ketama ring: for each address, `weight * 160` points
    /// `crc32(host \0 port prev_point_le)`, sorted, duplicates dropped.
    /// Peers sharing an address share its points (NGINX does the same for a
    /// name resolving to several addresses).
    fn new(members: &[Member], entries: &[Entry]) -> Ring {
        let mut group_of: HashMap<&str, usize> = HashMap::new();
        let mut groups: Vec<(&str, u32, Vec<usize>)> = Vec::new();
        for (m, member) in members.iter().enumerate() {
            let Some(entry) = entries.get(member.peer) else {
                continue;
            };
            let address = entry.spec.address.as_str();
            let g = *group_of.entry(address).or_insert_with(|| {
                groups.push((address, 0, Vec::new()));
                groups.len() - 1
            });
            if let Some((_, weight, ms)) = groups.get_mut(g) {
                *weight = (*weight).max(member.weight.min(MAX_RING_WEIGHT));
                ms.push(m);
            }
        }

        let mut points = Vec::new();
        for (g, (address, weight, _)) in groups.iter().enumerate() {
            let (host, port) = address.rsplit_once(':').unwrap_or((address, ""));
            let mut base = Crc32::new();
            base.update(host.as_bytes());
            base.update(&[0]);
            base.update(port.as_bytes());
            let mut prev: u32 = 0;
            for _ in 0..weight * POINTS_PER_WEIGHT {
                let mut crc = base;
                crc.update(&prev.to_le_bytes());
                prev = crc.finish();
                points.push((prev, g));
            }
        }
        // Stable, so on a collision the earlier server keeps the point, as NGINX.
        points.sort_by_key(|&(h, _)| h);
        points.dedup_by_key(|&mut (h, _)| h);
        Ring {
            points: points.into_boxed_slice(),
            groups: groups
                .into_iter()
                .map(|(_, _, ms)| ms.into_boxed_slice())
                .collect(),
        }
    }
}

/// CRC-32 (IEEE 802.3, reflected, as zlib and NGINX's `ngx_crc32`).
const CRC32_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// An incremental CRC-32; copying it forks the computation, which the ring
/// uses to hash `host\0port` once per server.
#[derive(Debug, Clone, Copy)]
struct Crc32(u32);

impl Crc32 {
    const fn new() -> Self {
        Crc32(0xFFFF_FFFF)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = CRC32_TABLE[((self.0 ^ u32::from(b)) & 0xFF) as usize] ^ (self.0 >> 8);
        }
    }

    fn finish(self) -> u32 {
        self.0 ^ 0xFFFF_FFFF
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = Crc32::new();
    crc.update(bytes);
    crc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn tried_spills_past_64() {
        let mut t = Tried::new();
        assert!(t.is_empty());
        for p in [0, 63, 64, 127, 128, 1023, 5000] {
            t.insert(p);
        }
        for p in [0, 63, 64, 127, 128, 1023, 5000] {
            assert!(t.contains(p), "{p}");
        }
        for p in [1, 62, 65, 126, 129, 1022, 4999, 100_000] {
            assert!(!t.contains(p), "{p}");
        }
        assert_eq!(t.len(), 7);
        t.clear();
        assert!(t.is_empty() && !t.contains(5000));
    }

    #[test]
    fn member_at_walks_weights() {
        let peers = Peers::new(
            [2, 1, 3].map(|w| PeerSpec {
                weight: w,
                ..PeerSpec::new(format!("p{w}:80"))
            }),
            Algorithm::RoundRobin,
        );
        let got: Vec<_> = (0..6).map(|w| peers.primary.member_at(w)).collect();
        assert_eq!(got, [0, 0, 1, 2, 2, 2].map(Some));
        assert_eq!(peers.primary.member_at(6), None);
    }

    #[test]
    fn ring_has_160_points_per_weight_and_no_duplicates() {
        let specs = [("a:1", 1), ("b:1", 2), ("a:1", 1)].map(|(a, w)| PeerSpec {
            weight: w,
            ..PeerSpec::new(a)
        });
        let peers = Peers::new(specs, Algorithm::Hash { consistent: true });
        let ring = peers
            .primary
            .ring
            .as_ref()
            .map(|r| (r.points.len(), r.groups.len()));
        // Distinct crc32 values are near-certain at this size; allow a collision.
        let (points, groups) = ring.unwrap_or_default();
        assert!((479..=480).contains(&points), "{points}");
        assert_eq!(groups, 2);
        let windows_sorted = peers
            .primary
            .ring
            .as_ref()
            .is_some_and(|r| r.points.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(windows_sorted);
    }

    #[test]
    fn failed_probe_keeps_peer_down_for_another_timeout() {
        let t0 = Instant::now();
        let ft = Duration::from_secs(10);
        let peers = Peers::new([PeerSpec::new("a:1")], Algorithm::RoundRobin);
        peers.report(0, Outcome::Failure, t0);
        assert!(!peers.is_up(0, t0 + ft / 2));
        let probe = peers.pick(&PickContext::new(t0 + ft));
        assert_eq!(probe.as_ref().map(Pick::peer), Some(0));
        // While the probe is out nobody else gets the peer.
        assert!(peers.pick(&PickContext::new(t0 + ft)).is_none());
        peers.report(0, Outcome::Failure, t0 + ft + Duration::from_secs(1));
        drop(probe);
        assert!(peers.pick(&PickContext::new(t0 + ft * 2)).is_none());
        assert!(
            peers
                .pick(&PickContext::new(t0 + ft * 2 + Duration::from_secs(1)))
                .is_some()
        );
    }
}
