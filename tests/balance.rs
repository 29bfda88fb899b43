//! The balancing core, called directly: distributions per algorithm, passive
//! and active health with explicit instants (no sleeping), backups, retries
//! and reload carry-over.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tollgate::config::model::{Balance, Template, UpstreamServer};
use tollgate::config::source::{FileId, Span};
use tollgate::proxy::balance::{Algorithm, Outcome, PeerSpec, Peers, Pick, PickContext, Tried};

fn spec(address: &str, weight: u32) -> PeerSpec {
    PeerSpec {
        weight,
        ..PeerSpec::new(address)
    }
}

fn backup(address: &str) -> PeerSpec {
    PeerSpec {
        backup: true,
        ..PeerSpec::new(address)
    }
}

fn named(n: usize) -> Vec<PeerSpec> {
    (0..n)
        .map(|i| PeerSpec::new(format!("10.0.0.{}:80", i + 1)))
        .collect()
}

/// Picks `n` times, ending each request at once.
fn sequence(peers: &Peers, n: usize, now: Instant) -> Vec<usize> {
    (0..n)
        .map(|_| peers.pick(&PickContext::new(now)).expect("a peer").peer())
        .collect()
}

fn counts(picks: impl IntoIterator<Item = usize>, n: usize) -> Vec<usize> {
    let mut c = vec![0; n];
    for p in picks {
        c[p] += 1;
    }
    c
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn key_pick(peers: &Peers, key: &str, now: Instant) -> String {
    let pick = peers
        .pick(&PickContext::new(now).hash_key(key.as_bytes()))
        .expect("a peer");
    peers.spec(pick.peer()).expect("spec").address.clone()
}

// ------------------------------------------------------------ round robin

#[test]
fn smooth_wrr_gives_nginx_sequence_for_5_1_1() {
    let peers = Peers::new(
        [spec("a:1", 5), spec("b:1", 1), spec("c:1", 1)],
        Algorithm::RoundRobin,
    );
    let seq = sequence(&peers, 14, Instant::now());
    assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Over any full cycle of total-weight picks each peer gets exactly its weight.
    #[test]
    fn smooth_wrr_cycle_matches_weights(weights in prop::collection::vec(1u32..8, 1..8)) {
        let peers = Peers::new(
            weights.iter().enumerate().map(|(i, &w)| spec(&format!("p{i}:80"), w)),
            Algorithm::RoundRobin,
        );
        let total: u32 = weights.iter().sum();
        let now = Instant::now();
        for _ in 0..3 {
            let c = counts(sequence(&peers, total as usize, now), weights.len());
            let expected: Vec<usize> = weights.iter().map(|&w| w as usize).collect();
            prop_assert_eq!(c, expected);
        }
    }
}

#[test]
fn weight_zero_counts_as_one() {
    let peers = Peers::new([spec("a:1", 0), spec("b:1", 1)], Algorithm::RoundRobin);
    let c = counts(sequence(&peers, 10, Instant::now()), 2);
    assert_eq!(c, [5, 5]);
    assert_eq!(peers.spec(0).map(|s| s.weight), Some(1));
}

#[test]
fn concurrent_picks_keep_exact_proportions() {
    let peers = Arc::new(Peers::new(
        [spec("a:1", 5), spec("b:1", 1), spec("c:1", 1)],
        Algorithm::RoundRobin,
    ));
    let now = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let peers = Arc::clone(&peers);
            std::thread::spawn(move || counts(sequence(&peers, 7_000, now), 3))
        })
        .collect();
    let mut total = vec![0; 3];
    for h in handles {
        for (t, c) in total.iter_mut().zip(h.join().expect("thread")) {
            *t += c;
        }
    }
    assert_eq!(total, [20_000, 4_000, 4_000]);
    assert!((0..3).all(|p| peers.active_requests(p) == 0));
}

// ------------------------------------------------------------ least_conn

#[test]
fn least_conn_prefers_idle_peer() {
    let peers = Peers::new(named(3), Algorithm::LeastConn);
    let now = Instant::now();
    let ctx = PickContext::new(now);
    let first = peers.pick(&ctx).expect("peer");
    let second = peers.pick(&ctx).expect("peer");
    let third = peers.pick(&ctx).expect("peer");
    let mut got = vec![first.peer(), second.peer(), third.peer()];
    got.sort_unstable();
    assert_eq!(got, [0, 1, 2], "each busy peer is passed over");

    // Finish the request on peer 1 only: it is now the single idle peer.
    let idle = second.peer();
    drop(second);
    for _ in 0..5 {
        let p = peers.pick(&ctx).expect("peer");
        assert_eq!(p.peer(), idle);
    }
    assert_eq!(peers.active_requests(first.peer()), 1);
}

#[test]
fn least_conn_weighs_active_by_weight() {
    // a (weight 3) with 2 active has 2/3 per unit, less than b (weight 1) with 1.
    let peers = Peers::new([spec("a:1", 3), spec("b:1", 1)], Algorithm::LeastConn);
    let now = Instant::now();
    let mut held: Vec<Pick> = Vec::new();
    let mut exclude_a = Tried::new();
    exclude_a.insert(0);
    held.push(
        peers
            .pick(&PickContext::new(now).tried(&exclude_a))
            .expect("b"),
    );
    let mut exclude_b = Tried::new();
    exclude_b.insert(1);
    for _ in 0..2 {
        held.push(
            peers
                .pick(&PickContext::new(now).tried(&exclude_b))
                .expect("a"),
        );
    }
    assert_eq!(peers.active_requests(0), 2);
    assert_eq!(peers.active_requests(1), 1);
    assert_eq!(peers.pick(&PickContext::new(now)).expect("peer").peer(), 0);
}

#[test]
fn least_conn_ties_follow_weighted_round_robin() {
    let peers = Peers::new(
        [spec("a:1", 5), spec("b:1", 1), spec("c:1", 1)],
        Algorithm::LeastConn,
    );
    let seq = sequence(&peers, 7, Instant::now());
    assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
}

// ------------------------------------------------------------ random

#[test]
fn random_follows_weights() {
    fastrand::seed(7);
    let weights = [1u32, 2, 3, 4];
    let peers = Peers::new(
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| spec(&format!("p{i}:80"), w)),
        Algorithm::Random { two: false },
    );
    let n = 40_000;
    let c = counts(sequence(&peers, n, Instant::now()), 4);
    for (i, &w) in weights.iter().enumerate() {
        let share = c[i] as f64 / n as f64;
        let expected = f64::from(w) / 10.0;
        assert!(
            (share - expected).abs() < 0.015,
            "peer {i}: {share} vs {expected} ({c:?})"
        );
    }
}

#[test]
fn random_two_avoids_the_loaded_peer() {
    fastrand::seed(11);
    let peers = Peers::new(named(3), Algorithm::Random { two: true });
    let now = Instant::now();
    let mut only_0 = Tried::new();
    only_0.insert(1);
    only_0.insert(2);
    let held: Vec<Pick> = (0..10)
        .map(|_| {
            peers
                .pick(&PickContext::new(now).tried(&only_0))
                .expect("peer 0")
        })
        .collect();
    assert!(held.iter().all(|p| p.peer() == 0));

    // Any two distinct draws out of three include an idle peer, which wins.
    let c = counts(sequence(&peers, 3_000, now), 3);
    assert_eq!(c[0], 0, "{c:?}");
    assert!(c[1] > 1_200 && c[2] > 1_200, "{c:?}");

    drop(held);
    let c = counts(sequence(&peers, 3_000, now), 3);
    assert!(c.iter().all(|&n| n > 800), "idle peers share evenly: {c:?}");
}

#[test]
fn random_skips_down_peers() {
    let peers = Peers::new(named(3), Algorithm::Random { two: false });
    peers.set_active_health(1, false);
    let c = counts(sequence(&peers, 3_000, Instant::now()), 3);
    assert_eq!(c[1], 0);
    assert!(c[0] > 1_000 && c[2] > 1_000, "{c:?}");
}

// ------------------------------------------------------------ ip_hash

fn ip_pick(peers: &Peers, ip: IpAddr, now: Instant) -> usize {
    peers
        .pick(&PickContext::new(now).client_ip(ip))
        .expect("peer")
        .peer()
}

#[test]
fn ip_hash_is_sticky_per_slash_24() {
    let peers = Peers::new(named(4), Algorithm::IpHash);
    let now = Instant::now();
    let mut seen = vec![0; 4];
    for c in 0..=255u8 {
        let p = ip_pick(&peers, v4(192, 168, c, 1), now);
        seen[p] += 1;
        for d in [2, 77, 254] {
            assert_eq!(ip_pick(&peers, v4(192, 168, c, d), now), p, "same /24");
        }
        assert_eq!(ip_pick(&peers, v4(192, 168, c, 1), now), p, "sticky");
    }
    assert!(seen.iter().all(|&n| n > 20), "spread over peers: {seen:?}");
}

#[test]
fn ip_hash_uses_whole_ipv6_and_unmaps_ipv4() {
    let peers = Peers::new(named(4), Algorithm::IpHash);
    let now = Instant::now();
    let v6: Ipv6Addr = "2001:db8::1".parse().expect("v6");
    let p = ip_pick(&peers, IpAddr::V6(v6), now);
    assert!((0..10).all(|_| ip_pick(&peers, IpAddr::V6(v6), now) == p));
    // The last byte matters for IPv6: over many hosts of one /64 several peers appear.
    let mut seen = [false; 4];
    for last in 0..64u16 {
        let ip = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last);
        seen[ip_pick(&peers, IpAddr::V6(ip), now)] = true;
    }
    assert!(seen.iter().filter(|&&s| s).count() > 1);

    let mapped = IpAddr::V6(Ipv4Addr::new(10, 9, 8, 7).to_ipv6_mapped());
    assert_eq!(
        ip_pick(&peers, mapped, now),
        ip_pick(&peers, v4(10, 9, 8, 1), now)
    );
}

#[test]
fn ip_hash_moves_off_a_down_peer_and_back() {
    let peers = Peers::new(named(3), Algorithm::IpHash);
    let now = Instant::now();
    let client = v4(172, 16, 5, 9);
    let home = ip_pick(&peers, client, now);
    peers.set_active_health(home, false);
    let away = ip_pick(&peers, client, now);
    assert_ne!(away, home);
    assert_eq!(
        ip_pick(&peers, client, now),
        away,
        "still sticky while down"
    );
    peers.set_active_health(home, true);
    assert_eq!(ip_pick(&peers, client, now), home);
}

#[test]
fn ip_hash_without_client_address_is_round_robin() {
    let peers = Peers::new(
        [spec("a:1", 5), spec("b:1", 1), spec("c:1", 1)],
        Algorithm::IpHash,
    );
    assert_eq!(sequence(&peers, 7, Instant::now()), [0, 0, 1, 0, 2, 0, 0]);
}

#[test]
fn ip_hash_falls_back_when_only_one_peer_is_left() {
    let peers = Peers::new(named(8), Algorithm::IpHash);
    for p in 0..7 {
        peers.set_active_health(p, false);
    }
    let now = Instant::now();
    for c in 0..50u8 {
        assert_eq!(ip_pick(&peers, v4(10, c, c, 1), now), 7);
    }
}

// ------------------------------------------------------------ hash

#[test]
fn hash_is_sticky_and_spreads() {
    let peers = Peers::new(named(4), Algorithm::Hash { consistent: false });
    let now = Instant::now();
    let mut seen = vec![0; 4];
    for i in 0..400 {
        let key = format!("/users/{i}");
        let a = key_pick(&peers, &key, now);
        assert_eq!(key_pick(&peers, &key, now), a);
        let idx = (0..4).find(|&p| peers.spec(p).map(|s| &s.address) == Some(&a));
        seen[idx.expect("known")] += 1;
    }
    assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
}

#[test]
fn hash_rehashes_only_keys_of_a_down_peer() {
    let peers = Peers::new(named(4), Algorithm::Hash { consistent: false });
    let now = Instant::now();
    let keys: Vec<String> = (0..1_000).map(|i| format!("k{i}")).collect();
    let before: Vec<String> = keys.iter().map(|k| key_pick(&peers, k, now)).collect();
    peers.set_active_health(2, false);
    let down = peers.spec(2).expect("spec").address.clone();
    for (k, was) in keys.iter().zip(&before) {
        let now_at = key_pick(&peers, k, now);
        assert_ne!(now_at, down);
        if *was != down {
            assert_eq!(&now_at, was, "key {k} of an up peer moved");
        }
    }
}

#[test]
fn hash_without_key_is_round_robin() {
    let peers = Peers::new(named(3), Algorithm::Hash { consistent: true });
    assert_eq!(sequence(&peers, 6, Instant::now()), [0, 1, 2, 0, 1, 2]);
}

fn ring_map(addresses: &[String], keys: &[String]) -> Vec<String> {
    let peers = Peers::new(
        addresses.iter().map(PeerSpec::new),
        Algorithm::Hash { consistent: true },
    );
    let now = Instant::now();
    keys.iter().map(|k| key_pick(&peers, k, now)).collect()
}

#[test]
fn consistent_hash_removing_one_of_five_moves_only_its_keys() {
    let servers: Vec<String> = (1..=5).map(|i| format!("10.0.1.{i}:8080")).collect();
    let keys: Vec<String> = (0..10_000)
        .map(|i| format!("/item/{i}?u={}", i * 7))
        .collect();
    let before = ring_map(&servers, &keys);
    let removed = servers[2].clone();
    let fewer: Vec<String> = servers.iter().filter(|s| **s != removed).cloned().collect();
    let after = ring_map(&fewer, &keys);
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if b != a {
            moved += 1;
            assert_eq!(*b, removed, "a key of a remaining server moved");
        }
    }
    let share = moved as f64 / keys.len() as f64;
    assert!((0.12..=0.30).contains(&share), "moved {share}");
    assert_eq!(moved, before.iter().filter(|b| **b == removed).count());
}

#[test]
fn consistent_hash_adding_a_sixth_moves_about_a_sixth() {
    let servers: Vec<String> = (1..=5)
        .map(|i| format!("backend-{i}.internal:9000"))
        .collect();
    let keys: Vec<String> = (0..10_000).map(|i| format!("session-{i}")).collect();
    let before = ring_map(&servers, &keys);
    let mut more = servers.clone();
    let added = "backend-6.internal:9000".to_string();
    more.push(added.clone());
    let after = ring_map(&more, &keys);
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if b != a {
            moved += 1;
            assert_eq!(*a, added, "a key moved between old servers");
        }
    }
    let share = moved as f64 / keys.len() as f64;
    assert!((0.09..=0.26).contains(&share), "moved {share}");
}

#[test]
fn consistent_hash_walks_past_a_down_peer() {
    let servers: Vec<String> = (1..=5).map(|i| format!("10.0.2.{i}:80")).collect();
    let peers = Peers::new(
        servers.iter().map(PeerSpec::new),
        Algorithm::Hash { consistent: true },
    );
    let now = Instant::now();
    let keys: Vec<String> = (0..2_000).map(|i| format!("u{i}")).collect();
    let before: Vec<String> = keys.iter().map(|k| key_pick(&peers, k, now)).collect();
    peers.set_active_health(0, false);
    for (k, was) in keys.iter().zip(&before) {
        let at = key_pick(&peers, k, now);
        assert_ne!(at, servers[0]);
        if *was != servers[0] {
            assert_eq!(&at, was);
        }
    }
}

#[test]
fn consistent_hash_respects_weight() {
    let peers = Peers::new(
        [spec("a:1", 3), spec("b:1", 1)],
        Algorithm::Hash { consistent: true },
    );
    let now = Instant::now();
    let on_a = (0..8_000)
        .filter(|i| key_pick(&peers, &format!("key{i}"), now) == "a:1")
        .count();
    let share = on_a as f64 / 8_000.0;
    assert!((0.65..=0.85).contains(&share), "{share}");
}

// ------------------------------------------------------------ passive health

#[test]
fn max_fails_within_fail_timeout_marks_down_then_probe_revives() {
    let t0 = Instant::now();
    let s = |a| PeerSpec {
        max_fails: 3,
        fail_timeout: Duration::from_secs(10),
        ..PeerSpec::new(a)
    };
    let peers = Peers::new([s("a:1"), s("b:1")], Algorithm::RoundRobin);
    let at = |secs: u64| t0 + Duration::from_secs(secs);

    peers.report(0, Outcome::Failure, at(0));
    peers.report(0, Outcome::Failure, at(4));
    assert!(peers.is_up(0, at(5)), "two of three failures");
    peers.report(0, Outcome::Failure, at(9));
    assert!(!peers.is_up(0, at(9)), "third failure within 10s");
    assert_eq!(sequence(&peers, 4, at(12)), [1, 1, 1, 1]);
    let status = peers.snapshot(at(12));
    assert!(!status[0].up && !status[0].passive_up && status[0].active_up);
    assert_eq!(status[0].fails, 3);
    assert!(status[1].up);

    // Down from 9s to 19s; then a single probe.
    assert!(peers.is_up(0, at(19)));
    let probe = peers.pick(&PickContext::new(at(19))).expect("probe");
    assert_eq!(probe.peer(), 0);
    assert_eq!(
        sequence(&peers, 3, at(19)),
        [1, 1, 1],
        "one probe at a time"
    );
    peers.report(0, Outcome::Success, at(20));
    drop(probe);
    assert!(peers.is_up(0, at(20)));
    assert_eq!(peers.snapshot(at(20))[0].fails, 0);
    assert!(sequence(&peers, 10, at(20)).contains(&0));
}

#[test]
fn failures_spread_beyond_fail_timeout_do_not_mark_down() {
    let t0 = Instant::now();
    let peers = Peers::new(
        [PeerSpec {
            max_fails: 2,
            fail_timeout: Duration::from_secs(5),
            ..PeerSpec::new("a:1")
        }],
        Algorithm::RoundRobin,
    );
    for i in 0..10 {
        peers.report(0, Outcome::Failure, t0 + Duration::from_secs(6 * i));
        assert!(peers.is_up(0, t0 + Duration::from_secs(6 * i)));
    }
}

#[test]
fn max_fails_zero_never_marks_down() {
    let t0 = Instant::now();
    let peers = Peers::new(
        [PeerSpec {
            max_fails: 0,
            ..PeerSpec::new("a:1")
        }],
        Algorithm::RoundRobin,
    );
    for _ in 0..100 {
        peers.report(0, Outcome::Failure, t0);
    }
    assert!(peers.pick(&PickContext::new(t0)).is_some());
}

#[test]
fn single_failing_server_gives_none_until_fail_timeout() {
    let t0 = Instant::now();
    let peers = Peers::new([PeerSpec::new("a:1")], Algorithm::LeastConn);
    peers.report(0, Outcome::Failure, t0);
    assert!(
        peers
            .pick(&PickContext::new(t0 + Duration::from_secs(9)))
            .is_none()
    );
    assert!(
        peers
            .pick(&PickContext::new(t0 + Duration::from_secs(10)))
            .is_some()
    );
}

// ------------------------------------------------------------ backup, all down, retries

#[test]
fn backup_only_when_primaries_are_unavailable() {
    let now = Instant::now();
    for algorithm in [
        Algorithm::RoundRobin,
        Algorithm::LeastConn,
        Algorithm::Random { two: false },
        Algorithm::Random { two: true },
        Algorithm::IpHash,
        Algorithm::Hash { consistent: false },
        Algorithm::Hash { consistent: true },
    ] {
        let peers = Peers::new(
            [PeerSpec::new("a:1"), backup("z:1"), PeerSpec::new("b:1")],
            algorithm,
        );
        let ctx = PickContext::new(now)
            .client_ip(v4(1, 2, 3, 4))
            .hash_key(b"some key");
        for _ in 0..50 {
            assert_ne!(peers.pick(&ctx).expect("peer").peer(), 1, "{algorithm:?}");
        }
        // Primaries tried already: the retry goes to the backup.
        let mut tried = Tried::new();
        tried.insert(0);
        tried.insert(2);
        let retry = peers.pick(&ctx.tried(&tried)).expect("backup");
        assert_eq!(retry.peer(), 1, "{algorithm:?}");
        tried.insert(1);
        assert!(peers.pick(&ctx.tried(&tried)).is_none(), "{algorithm:?}");

        // Primaries down: the backup serves; back to primaries when up.
        peers.set_active_health(0, false);
        peers.report(2, Outcome::Failure, now);
        for _ in 0..5 {
            assert_eq!(peers.pick(&ctx).expect("backup").peer(), 1, "{algorithm:?}");
        }
        peers.set_active_health(0, true);
        assert_eq!(
            peers.pick(&ctx).expect("primary").peer(),
            0,
            "{algorithm:?}"
        );

        // Everything down: None (the proxy answers 503).
        peers.set_active_health(0, false);
        peers.set_active_health(1, false);
        assert!(peers.pick(&ctx).is_none(), "{algorithm:?}");
    }
}

#[test]
fn retries_go_to_untried_peers_until_none_left() {
    let now = Instant::now();
    for algorithm in [
        Algorithm::RoundRobin,
        Algorithm::LeastConn,
        Algorithm::Random { two: true },
        Algorithm::IpHash,
        Algorithm::Hash { consistent: true },
    ] {
        let peers = Peers::new(named(4), algorithm);
        let mut tried = Tried::new();
        for _ in 0..4 {
            let ctx = PickContext::new(now)
                .client_ip(v4(9, 9, 9, 9))
                .hash_key(b"k")
                .tried(&tried);
            let p = peers.pick(&ctx).expect("untried peer").peer();
            assert!(!tried.contains(p), "{algorithm:?}");
            tried.insert(p);
        }
        assert_eq!(tried.len(), 4);
        assert!(peers.pick(&PickContext::new(now).tried(&tried)).is_none());
    }
}

#[test]
fn empty_upstream_picks_nothing() {
    let peers = Peers::new(Vec::new(), Algorithm::RoundRobin);
    assert!(peers.is_empty());
    assert!(peers.pick(&PickContext::new(Instant::now())).is_none());
    assert!(peers.snapshot(Instant::now()).is_empty());
}

// ------------------------------------------------------------ reload

#[test]
fn reload_carries_health_for_unchanged_peers() {
    let t0 = Instant::now();
    let old = Peers::new(named(3), Algorithm::LeastConn);
    old.report(0, Outcome::Failure, t0);
    old.set_active_health(1, false);
    let in_flight = old.pick(&PickContext::new(t0)).expect("peer 2");
    assert_eq!(in_flight.peer(), 2);

    let mut specs = named(3);
    specs[0].weight = 4; // weight alone does not reset health
    specs.swap(1, 2); // order changes; identity is the address
    specs.push(PeerSpec::new("10.0.0.9:80"));
    let new = Peers::new_with_state(specs, Algorithm::LeastConn, Some(&old));
    let now = t0 + Duration::from_secs(1);
    assert!(!new.is_up(0, now), "passive state carried");
    assert!(
        !new.is_up(2, now),
        "active state carried (moved to index 2)"
    );
    assert!(new.is_up(1, now) && new.is_up(3, now));
    assert_eq!(new.active_requests(1), 1, "in-flight request still counts");
    assert_eq!(new.pick(&PickContext::new(now)).expect("idle").peer(), 3);

    drop(in_flight);
    assert_eq!(new.active_requests(1), 0);
    assert!(old.set_active_health(1, true));
    assert!(
        new.is_up(2, now),
        "the checker's verdict reaches both snapshots"
    );
}

#[test]
fn reload_resets_passive_state_when_its_settings_change() {
    let t0 = Instant::now();
    let old = Peers::new(named(2), Algorithm::RoundRobin);
    old.report(0, Outcome::Failure, t0);
    old.set_active_health(1, false);
    let mut specs = named(2);
    specs[0].max_fails = 5;
    specs[1].fail_timeout = Duration::from_secs(30);
    let new = Peers::new_with_state(specs, Algorithm::RoundRobin, Some(&old));
    assert!(new.is_up(0, t0));
    assert!(
        !new.is_up(1, t0),
        "active verdict depends on the address only"
    );
}

#[test]
fn reload_without_previous_starts_fresh() {
    let old = Peers::new(named(1), Algorithm::RoundRobin);
    old.set_active_health(0, false);
    let new = Peers::new_with_state(named(1), Algorithm::RoundRobin, None);
    assert!(new.is_up(0, Instant::now()));
}

// ------------------------------------------------------------ config glue

#[test]
fn algorithm_and_spec_come_from_the_config_model() {
    assert_eq!(Algorithm::from(&Balance::RoundRobin), Algorithm::RoundRobin);
    assert_eq!(Algorithm::from(&Balance::LeastConn), Algorithm::LeastConn);
    assert_eq!(
        Algorithm::from(&Balance::Random { two: true }),
        Algorithm::Random { two: true }
    );
    assert_eq!(Algorithm::from(&Balance::IpHash), Algorithm::IpHash);
    let hash = Balance::Hash {
        key: Template::literal("x"),
        consistent: true,
    };
    assert_eq!(Algorithm::from(&hash), Algorithm::Hash { consistent: true });

    let server = UpstreamServer {
        address: "127.0.0.1:3001".into(),
        host: "127.0.0.1".into(),
        port: 3001,
        weight: 3,
        max_fails: 2,
        fail_timeout: Duration::from_secs(7),
        backup: true,
        resolve: false,
        resolve_ttl: Duration::from_secs(30),
        span: Span::new(FileId(0), 0, 1),
    };
    assert_eq!(
        PeerSpec::from(&server),
        PeerSpec {
            address: "127.0.0.1:3001".into(),
            weight: 3,
            max_fails: 2,
            fail_timeout: Duration::from_secs(7),
            backup: true,
        }
    );
}

#[test]
fn peers_are_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Peers>();
    assert_send_sync::<Pick>();
}
