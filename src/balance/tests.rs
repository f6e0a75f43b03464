use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::*;
use crate::api::config::{HashKey, SlowStart};

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8], 8080))
}

fn spec(i: usize, weight: u32) -> MemberSpec {
    MemberSpec {
        draining: false,
        addr: addr(i),
        weight,
        backup: false,
        max_connections: 0,
        healthy: true,
        ports: Vec::new(),
        groups: 1,
    }
}

fn balancer(algorithm: Algorithm, specs: Vec<MemberSpec>) -> Balancer {
    let b = Balancer::new();
    b.update(algorithm, None, specs, Endpoint::new);
    b
}

/// Picks `n` times; with `hold`, each pick stays active (a long request).
fn counts(b: &Balancer, n: usize, hold: bool) -> Vec<usize> {
    let snap = b.snapshot();
    let mut c = vec![0; snap.members.len()];
    for _ in 0..n {
        let i = b.pick(&snap, &Tried::default(), None, now_ms()).expect("a member");
        c[i] += 1;
        if hold {
            snap.members[i].endpoint.stats.active.inc();
        }
    }
    c
}

#[test]
fn least_connections_shares_ties_evenly_between_equal_endpoints() {
    let b = balancer(Algorithm::LeastConnections, (0..3).map(|i| spec(i, 1)).collect());
    assert_eq!(counts(&b, 300, false), vec![100, 100, 100]);
}

#[test]
fn least_connections_loads_endpoints_in_proportion_to_weight() {
    let b = balancer(Algorithm::LeastConnections, vec![spec(0, 1), spec(1, 2), spec(2, 3)]);
    let c = counts(&b, 600, true);
    for (got, want) in c.iter().zip([100, 200, 300]) {
        assert!(got.abs_diff(want) <= 1, "{c:?}");
    }
}

#[test]
fn least_connections_prefers_the_idle_endpoint() {
    let b = balancer(Algorithm::LeastConnections, (0..3).map(|i| spec(i, 1)).collect());
    let snap = b.snapshot();
    snap.members[0].endpoint.stats.active.set(5);
    snap.members[2].endpoint.stats.active.set(5);
    for _ in 0..10 {
        assert_eq!(b.pick(&snap, &Tried::default(), None, now_ms()), Some(1));
    }
}

#[test]
fn round_robin_is_smooth_and_weighted() {
    let b = balancer(Algorithm::RoundRobin, vec![spec(0, 5), spec(1, 1), spec(2, 1)]);
    let snap = b.snapshot();
    let seq: Vec<usize> = (0..7)
        .map(|_| b.pick(&snap, &Tried::default(), None, now_ms()).unwrap())
        .collect();
    // nginx's smooth WRR for {a=5, b=1, c=1}: a a b a c a a.
    assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    let b = balancer(Algorithm::RoundRobin, (0..4).map(|i| spec(i, 1)).collect());
    assert_eq!(counts(&b, 400, false), vec![100; 4]);
}

#[test]
fn random_follows_weights() {
    let b = balancer(Algorithm::Random, vec![spec(0, 1), spec(1, 3)]);
    let c = counts(&b, 20_000, false);
    let share = c[1] as f64 / 20_000.0;
    assert!((0.72..0.78).contains(&share), "{c:?}");
}

#[test]
fn power_of_two_choices_avoids_the_loaded_endpoint() {
    let b = balancer(Algorithm::PowerOfTwoChoices, (0..2).map(|i| spec(i, 1)).collect());
    let snap = b.snapshot();
    snap.members[0].endpoint.stats.active.set(10);
    let c = counts(&b, 1000, false);
    assert!(c[1] > 700, "the idle endpoint should win most pairs: {c:?}");
}

#[test]
fn max_connections_skips_a_full_endpoint() {
    let mut specs: Vec<_> = (0..2).map(|i| spec(i, 1)).collect();
    specs[0].max_connections = 2;
    for algorithm in [Algorithm::LeastConnections, Algorithm::RoundRobin, Algorithm::Random] {
        let b = balancer(algorithm.clone(), specs.clone());
        let snap = b.snapshot();
        snap.members[0].endpoint.stats.active.set(2);
        snap.members[1].endpoint.stats.active.set(50);
        for _ in 0..20 {
            assert_eq!(
                b.pick(&snap, &Tried::default(), None, now_ms()),
                Some(1),
                "{algorithm:?}"
            );
        }
    }
}

#[test]
fn backups_serve_only_while_no_primary_is_available() {
    let mut specs: Vec<_> = (0..3).map(|i| spec(i, 1)).collect();
    specs[2].backup = true;
    let b = balancer(Algorithm::LeastConnections, specs.clone());
    let c = counts(&b, 100, false);
    assert_eq!(c[2], 0, "backup used while primaries are healthy: {c:?}");

    specs[0].healthy = false;
    specs[1].healthy = false;
    b.update(Algorithm::LeastConnections, None, specs.clone(), Endpoint::new);
    assert_eq!(counts(&b, 10, false), vec![0, 0, 10]);

    // An ejected primary counts as unavailable too.
    specs[0].healthy = true;
    b.update(Algorithm::LeastConnections, None, specs, Endpoint::new);
    let snap = b.snapshot();
    snap.members[0]
        .endpoint
        .passive
        .record_failure(now_ms(), 1, Duration::from_secs(10));
    assert_eq!(b.pick(&snap, &Tried::default(), None, now_ms()), Some(2));
}

#[test]
fn tried_endpoints_are_skipped() {
    for algorithm in [
        Algorithm::LeastConnections,
        Algorithm::PowerOfTwoChoices,
        Algorithm::RoundRobin,
        Algorithm::Random,
        Algorithm::ConsistentHash(HashKey::SourceIp),
    ] {
        let b = balancer(algorithm.clone(), (0..3).map(|i| spec(i, 1)).collect());
        let snap = b.snapshot();
        let mut tried = Tried::default();
        for _ in 0..3 {
            let i = b.pick(&snap, &tried, Some(42), now_ms()).unwrap();
            assert!(!tried.contains(i), "{algorithm:?} picked {i} twice");
            tried.add(i);
        }
        assert_eq!(b.pick(&snap, &tried, Some(42), now_ms()), None, "{algorithm:?}");
    }
}

#[test]
fn when_every_endpoint_is_down_they_are_tried_anyway() {
    let specs: Vec<_> = (0..2)
        .map(|i| MemberSpec {
            draining: false,
            healthy: false,
            ports: Vec::new(),
            groups: 1,
            ..spec(i, 1)
        })
        .collect();
    let b = balancer(Algorithm::LeastConnections, specs);
    let snap = b.snapshot();
    let mut tried = Tried::default();
    let first = b.pick(&snap, &tried, None, now_ms()).expect("tries a down endpoint");
    tried.add(first);
    let second = b.pick(&snap, &tried, None, now_ms()).expect("and the other");
    assert_ne!(first, second);
}

#[test]
fn consistent_hash_moves_few_keys_when_one_endpoint_leaves() {
    let n = 10;
    let algorithm = Algorithm::ConsistentHash(HashKey::SourceIp);
    let b = balancer(algorithm.clone(), (0..n).map(|i| spec(i, 1)).collect());
    let keys: Vec<u64> = (0..10_000u32).map(|k| picker::hash_key(&k.to_le_bytes())).collect();
    let owner = |b: &Balancer| -> Vec<SocketAddr> {
        let snap = b.snapshot();
        keys.iter()
            .map(|k| {
                snap.members[b.pick(&snap, &Tried::default(), Some(*k), now_ms()).unwrap()]
                    .spec
                    .addr
            })
            .collect()
    };
    let before = owner(&b);
    let mut per: HashMap<SocketAddr, usize> = HashMap::new();
    for a in &before {
        *per.entry(*a).or_default() += 1;
    }
    assert!(
        per.values().all(|&c| (500..1500).contains(&c)),
        "unbalanced ring: {per:?}"
    );

    b.update(algorithm, None, (0..n - 1).map(|i| spec(i, 1)).collect(), Endpoint::new);
    let after = owner(&b);
    let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
    assert!(
        moved as f64 <= keys.len() as f64 * 2.0 / n as f64,
        "{moved} of {} keys moved",
        keys.len()
    );
    // Only keys of the removed endpoint move.
    assert!(before.iter().zip(&after).all(|(x, y)| x == y || *x == addr(n - 1)));
}

#[test]
fn consistent_hash_is_stable_for_a_key_and_skips_down_endpoints() {
    let algorithm = Algorithm::ConsistentHash(HashKey::SourceIp);
    let mut specs: Vec<_> = (0..5).map(|i| spec(i, 1)).collect();
    let b = balancer(algorithm.clone(), specs.clone());
    let snap = b.snapshot();
    let key = picker::hash_key(b"user-1");
    let first = b.pick(&snap, &Tried::default(), Some(key), now_ms()).unwrap();
    for _ in 0..10 {
        assert_eq!(b.pick(&snap, &Tried::default(), Some(key), now_ms()), Some(first));
    }
    specs[first].healthy = false;
    b.update(algorithm, None, specs, Endpoint::new);
    let snap = b.snapshot();
    let next = b.pick(&snap, &Tried::default(), Some(key), now_ms()).unwrap();
    assert_ne!(next, first);
}

#[test]
fn live_counters_survive_a_snapshot_swap() {
    let b = balancer(Algorithm::LeastConnections, (0..2).map(|i| spec(i, 1)).collect());
    let before = b.snapshot();
    before.members[0].endpoint.stats.active.set(7);
    before.members[0]
        .endpoint
        .passive
        .record_failure(now_ms(), 1, Duration::from_secs(10));
    let removed = b.update(Algorithm::RoundRobin, None, vec![spec(0, 3), spec(2, 1)], Endpoint::new);
    assert_eq!(removed, vec![addr(1)]);
    let after = b.snapshot();
    assert_eq!(after.members[0].endpoint.active(), 7);
    assert!(after.members[0].endpoint.passive.is_ejected(now_ms()));
    assert!(Arc::ptr_eq(&before.members[0].endpoint, &after.members[0].endpoint));
    assert_eq!(after.members[1].endpoint.active(), 0);
}

#[test]
fn tried_remembers_past_its_inline_slots() {
    let mut t = Tried::default();
    for i in 0..20 {
        assert!(!t.contains(i));
        t.add(i);
    }
    assert_eq!(t.len(), 20);
    assert!((0..20).all(|i| t.contains(i)));
    assert!(!t.contains(20));
}

#[test]
fn panic_threshold_serves_every_member_below_it_and_only_then() {
    let mut members: Vec<MemberSpec> = (1..=10)
        .map(|i| MemberSpec {
            healthy: i <= 3,
            draining: i == 10,
            ..spec(i, 1)
        })
        .collect();
    // 3 of 10 healthy: not below 30%, below 40%.
    assert!(!apply_panic(30, &mut members.clone()));
    assert!(!apply_panic(0, &mut members.clone()));
    assert!(apply_panic(40, &mut members));
    assert!(members.iter().all(|m| m.healthy));
    assert!(!members[9].serves(), "a draining member still takes nothing new");
    assert!(in_panic(1, 0, 5) && !in_panic(1, 0, 0));
}

/// One of three endpoints turns healthy under 2,000 least-connections
/// requests spread over its 10 s ramp, eight in flight at a time; its share
/// per quarter of the window, as a fraction of a fair third.
async fn ramp_shares(algorithm: Algorithm, concurrency: usize) -> Vec<f64> {
    use std::collections::VecDeque;
    let ss = SlowStart {
        window: Duration::from_secs(10),
        aggression_milli: 1000,
        min_weight_percent: 10,
    };
    let b = Balancer::new();
    let mut specs: Vec<MemberSpec> = (0..3).map(|i| spec(i, 1)).collect();
    specs[2].healthy = false;
    b.update(algorithm.clone(), Some(ss), specs.clone(), Endpoint::new);
    tokio::time::advance(Duration::from_secs(60)).await;
    specs[2].healthy = true;
    b.update(algorithm, Some(ss), specs, Endpoint::new);
    let snap = b.snapshot();
    let mut in_flight = VecDeque::new();
    let mut quarters = [0usize; 4];
    for n in 0..2000usize {
        let i = b
            .pick(
                &snap,
                &Tried::default(),
                Some(picker::hash_key(&n.to_le_bytes())),
                now_ms(),
            )
            .unwrap();
        if i == 2 {
            quarters[n / 500] += 1;
        }
        in_flight.push_back(ActiveGuard::new(snap.members[i].endpoint.clone()));
        if in_flight.len() > concurrency {
            in_flight.pop_front();
        }
        tokio::time::advance(Duration::from_millis(5)).await;
    }
    // The ramp is over: every endpoint is back on the plain path.
    assert!(snap.ramp_until <= now_ms());
    quarters.iter().map(|&q| q as f64 / (500.0 / 3.0)).collect()
}

/// The mean of `runs` runs of [`ramp_shares`]: picks are random, and one
/// run of 2,000 puts about 35 on the newcomer in the first quarter.
async fn mean_ramp_shares(algorithm: &Algorithm, concurrency: usize, runs: usize) -> Vec<f64> {
    let mut sum = vec![0.0; 4];
    for _ in 0..runs {
        for (s, q) in sum.iter_mut().zip(ramp_shares(algorithm.clone(), concurrency).await) {
            *s += q / runs as f64;
        }
    }
    sum
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_that_turns_healthy_ramps_up_under_least_connections() {
    // Seen: about [0.15, 0.43, 0.70, 0.92] whatever the concurrency; a
    // linear ramp from 10% would give [0.15, 0.38, 0.63, 0.88].
    for concurrency in [0, 8, 32] {
        let shares = mean_ramp_shares(&Algorithm::LeastConnections, concurrency, 5).await;
        assert!(shares[0] <= 0.25, "at {concurrency} in flight: {shares:?}");
        assert!(shares[3] >= 0.75, "at {concurrency} in flight: {shares:?}");
        assert!(
            shares[0] < shares[1] && shares[1] < shares[2],
            "at {concurrency} in flight: {shares:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_that_turns_healthy_ramps_up_under_every_other_picker() {
    for algorithm in [
        Algorithm::PowerOfTwoChoices,
        Algorithm::RoundRobin,
        Algorithm::Random,
        Algorithm::ConsistentHash(HashKey::SourceIp),
    ] {
        for concurrency in [0, 8] {
            let shares = mean_ramp_shares(&algorithm, concurrency, 3).await;
            assert!(shares[0] <= 0.3, "{algorithm:?} at {concurrency}: {shares:?}");
            assert!(shares[3] >= 0.7, "{algorithm:?} at {concurrency}: {shares:?}");
            assert!(shares[0] < shares[2], "{algorithm:?} at {concurrency}: {shares:?}");
        }
    }
}

#[test]
fn without_slow_start_least_connections_floods_the_newcomer() {
    // What slow start is for: plain least connections sends a new endpoint
    // every request until it holds as many as the others.
    let b = Balancer::new();
    let mut specs: Vec<MemberSpec> = (0..3).map(|i| spec(i, 1)).collect();
    specs[2].healthy = false;
    b.update(Algorithm::LeastConnections, None, specs.clone(), Endpoint::new);
    let snap = b.snapshot();
    for i in [0, 1] {
        for _ in 0..8 {
            snap.members[i].endpoint.stats.active.inc();
        }
    }
    specs[2].healthy = true;
    b.update(Algorithm::LeastConnections, None, specs, Endpoint::new);
    assert_eq!(counts(&b, 8, true), vec![0, 0, 8]);
}
