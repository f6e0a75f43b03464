//! The picking algorithms, as plain functions over the members of a snapshot
//! and a predicate saying which members may be chosen.

use std::net::SocketAddr;

use rand::Rng;

use super::Member;

/// Fewest active requests per unit of weight, scanning every member (nginx
/// `least_conn`). The scan starts at a rotating offset and keeps the first
/// minimum, so equal members share ties round-robin.
pub fn least_connections(members: &[Member], start: usize, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
    least_connections_by(members, start, ok, &|i| u64::from(members[i].spec.weight.max(1)))
}

/// [`least_connections`] with each member's `weight` given (a ramp applied).
pub fn least_connections_by(
    members: &[Member],
    start: usize,
    ok: &dyn Fn(usize) -> bool,
    weight: &dyn Fn(usize) -> u64,
) -> Option<usize> {
    let n = members.len();
    let mut best: Option<(usize, u64, u64)> = None;
    for step in 0..n {
        let i = (start + step) % n;
        if !ok(i) {
            continue;
        }
        let (active, weight) = (members[i].endpoint.active(), weight(i).max(1));
        // active_i / weight_i < active_b / weight_b, without division.
        match best {
            Some((_, ba, bw)) if active * bw >= ba * weight => {}
            _ => best = Some((i, active, weight)),
        }
    }
    best.map(|(i, _, _)| i)
}

/// The less loaded of two weighted random picks (Envoy LEAST_REQUEST, HAProxy
/// `random(2)`): close to least connections, but replicas that cannot see each
/// other's counters do not all herd onto the same idle endpoint.
pub fn power_of_two(members: &[Member], ok: &dyn Fn(usize) -> bool) -> Option<usize> {
    let a = weighted_random(members, ok)?;
    let b = match weighted_random(members, &|i| i != a && ok(i)) {
        Some(b) => b,
        None => return Some(a),
    };
    let load = |i: usize| {
        (
            members[i].endpoint.active() + 1,
            u64::from(members[i].spec.weight.max(1)),
        )
    };
    let ((la, wa), (lb, wb)) = (load(a), load(b));
    Some(if la * wb <= lb * wa { a } else { b })
}

/// Weighted random over the members `ok` allows.
pub fn weighted_random(members: &[Member], ok: &dyn Fn(usize) -> bool) -> Option<usize> {
    weighted_random_by(members, ok, &|i| u64::from(members[i].spec.weight.max(1)))
}

/// Random over the members `ok` allows, each as likely as its `weight`.
pub fn weighted_random_by(
    members: &[Member],
    ok: &dyn Fn(usize) -> bool,
    weight: &dyn Fn(usize) -> u64,
) -> Option<usize> {
    let total: u64 = (0..members.len()).filter(|&i| ok(i)).map(|i| weight(i).max(1)).sum();
    if total == 0 {
        return None;
    }
    let mut r = rand::rng().random_range(0..total);
    for i in 0..members.len() {
        if !ok(i) {
            continue;
        }
        let w = weight(i).max(1);
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

/// Longest smooth round-robin cycle we precompute; beyond it RoundRobin falls
/// back to weighted random (same long-run shares).
const MAX_SEQUENCE: u64 = 1 << 16;

/// nginx's smooth weighted round robin, unrolled into one cycle of member
/// indices so the request path only advances an atomic cursor.
pub fn smooth_sequence(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let g = weights.iter().fold(0u32, |g, &w| gcd(g, w.max(1)));
    let reduced: Vec<i64> = weights.iter().map(|&w| i64::from(w.max(1) / g)).collect();
    let total: i64 = reduced.iter().sum();
    if total as u64 > MAX_SEQUENCE || (total as u64) * (weights.len() as u64) > 50_000_000 {
        return Vec::new();
    }
    let mut current = vec![0i64; reduced.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..reduced.len() {
            current[i] += reduced[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        seq.push(best as u32);
    }
    seq
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The next member of the cycle from `start` that `ok` allows.
pub fn round_robin(sequence: &[u32], start: usize, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
    let n = sequence.len();
    (0..n)
        .map(|step| sequence[(start + step) % n] as usize)
        .find(|&i| ok(i))
}

/// Virtual nodes per unit of weight on the hash ring.
const VNODES_PER_WEIGHT: u64 = 100;
/// Cap on the ring's size; weights are scaled down past it.
const MAX_RING: u64 = 200_000;

/// A consistent-hash ring: virtual nodes hashed from each member's address, so
/// the same key maps to the same endpoint on every replica, and adding or
/// removing one of N endpoints moves about 1/N of the keys.
pub fn build_ring(addrs: &[SocketAddr], weights: &[u32]) -> Vec<(u64, u32)> {
    // Weights are in hundredths of a configured weight (reported load scales
    // them): their common divisor goes first, so equal weights still get
    // VNODES_PER_WEIGHT nodes each and the same ring as before.
    let g = weights.iter().fold(0u32, |g, &w| gcd(g, w.max(1))).max(1);
    let weights: Vec<u32> = weights.iter().map(|&w| w.max(1) / g).collect();
    let weights = &weights[..];
    let total: u64 = weights.iter().map(|&w| u64::from(w.max(1)) * VNODES_PER_WEIGHT).sum();
    let scale = if total > MAX_RING {
        MAX_RING as f64 / total as f64
    } else {
        1.0
    };
    let mut ring = Vec::with_capacity(total.min(MAX_RING) as usize + addrs.len());
    for (i, (addr, &w)) in addrs.iter().zip(weights).enumerate() {
        let vnodes = ((u64::from(w.max(1)) * VNODES_PER_WEIGHT) as f64 * scale).max(1.0) as u64;
        let name = addr.to_string();
        for v in 0..vnodes {
            ring.push((hash_parts(&[name.as_bytes(), &v.to_le_bytes()]), i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

/// The first member clockwise from `key` that `ok` allows.
pub fn ring_lookup(ring: &[(u64, u32)], key: u64, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
    if ring.is_empty() {
        return None;
    }
    let start = ring.partition_point(|(h, _)| *h < key);
    let n = ring.len();
    let mut seen_rejected: Vec<u32> = Vec::new();
    for step in 0..n {
        let member = ring[(start + step) % n].1;
        if seen_rejected.contains(&member) {
            continue;
        }
        if ok(member as usize) {
            return Some(member as usize);
        }
        seen_rejected.push(member);
    }
    None
}

/// A stable 64-bit hash (FNV-1a with a final avalanche): the same on every
/// replica and every run, unlike std's randomly keyed hasher.
pub fn hash_parts(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64 finaliser: FNV's low bits are weak on short inputs.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Hash of one key.
pub fn hash_key(key: &[u8]) -> u64 {
    hash_parts(&[key])
}

/// Hash of a client's IP (its port left out, so a client sticks across connections).
pub fn hash_ip(peer: SocketAddr) -> u64 {
    match peer.ip() {
        std::net::IpAddr::V4(v4) => hash_key(&v4.octets()),
        std::net::IpAddr::V6(v6) => hash_key(&v6.octets()),
    }
}
