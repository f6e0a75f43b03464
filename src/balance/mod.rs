//! Choosing an endpoint: immutable snapshots of the endpoint set, live
//! per-endpoint counters that survive snapshot swaps, the pickers, and passive
//! ejection.
//!
//! The request path loads one snapshot (`ArcSwap`, no lock), picks by index, and
//! keeps that snapshot for the whole request so retry bookkeeping stays valid
//! even if a new snapshot is swapped in meanwhile.

pub mod passive;
pub mod picker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;

use std::collections::HashMap;

use crate::api::config::{Algorithm, Config, EndpointConfig, SlowStart};
use crate::health::agent::AgentState;
use crate::metrics::EndpointStats;
pub use passive::{Passive, now_ms};

/// Live state of one endpoint, shared by every snapshot that contains it.
#[derive(Debug)]
pub struct Endpoint {
    /// Address and port (its identity).
    pub addr: SocketAddr,
    /// Passive ejection state.
    pub passive: Passive,
    /// Counters and the active-requests gauge.
    pub stats: EndpointStats,
    /// When it last began to serve ([`now_ms`]; 0 while it does not): where
    /// its slow-start ramp starts.
    serving_since: AtomicU64,
}

impl Endpoint {
    /// An endpoint with its own (unregistered) counters.
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_stats(addr, EndpointStats::default())
    }

    /// An endpoint reporting into registered metrics.
    pub fn with_stats(addr: SocketAddr, stats: EndpointStats) -> Self {
        Self {
            addr,
            passive: Passive::default(),
            stats,
            serving_since: AtomicU64::new(0),
        }
    }

    /// Requests or connections in flight.
    pub fn active(&self) -> u64 {
        self.stats.active.get().max(0) as u64
    }
}

/// Counts a request or connection on an endpoint until dropped: what least
/// connections reads and `balanced_upstream_active_requests` shows.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Endpoint>);

impl ActiveGuard {
    /// Starts counting on `endpoint`.
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.stats.active.inc();
        Self(endpoint)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.stats.active.dec();
    }
}

/// What a snapshot knows about one endpoint besides its live state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSpec {
    /// Identity.
    pub addr: SocketAddr,
    /// 1..=1000.
    pub weight: u32,
    /// Used only while no primary is available.
    pub backup: bool,
    /// 0 is unlimited.
    pub max_connections: u32,
    /// Active health checks say it may serve.
    pub healthy: bool,
    /// Its agent says `drain` or `maint` (or 0%): no new requests or
    /// connections, even when every other endpoint is down.
    pub draining: bool,
    /// Listeners that reach this endpoint on a port other than `addr`'s
    /// (named target ports resolved per listener), by listener name.
    pub ports: Vec<(String, u16)>,
    /// The groups (`default` and `spec.backends`) it belongs to, a bit each
    /// (bit 0 is `default`).
    pub groups: u64,
}

impl MemberSpec {
    /// Healthy and not draining: may take new requests (ejection aside).
    pub fn serves(&self) -> bool {
        self.healthy && !self.draining
    }
}

/// What a source observed of one endpoint: what a member is built from
/// besides the spec's static settings for its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Identity.
    pub addr: SocketAddr,
    /// Active health checks (and, in a cluster, readiness) say it may serve.
    pub healthy: bool,
    /// No new requests or connections (agent drain, a draining pod).
    pub draining: bool,
    /// The agent's percent of the configured weight; 100 without an agent.
    pub weight_percent: u32,
    /// Per-listener ports (named target ports), by listener name.
    pub ports: Vec<(String, u16)>,
    /// The groups it belongs to, a bit each (bit 0 is `default`).
    pub groups: u64,
}

/// The one way a source's endpoints become balancer members: each takes the
/// static settings the spec gives its address (weight, backup,
/// `maxConnections`; a discovered endpoint weighs 1), its weight scaled by
/// its agent's percent; then the panic threshold applies.
pub fn members(cfg: &Config, observed: impl IntoIterator<Item = Observed>) -> Vec<MemberSpec> {
    let statics: HashMap<SocketAddr, &EndpointConfig> = cfg
        .endpoints
        .iter()
        .chain(cfg.backends.iter().flat_map(|b| &b.endpoints))
        .map(|e| (e.addr, e))
        .collect();
    let mut out: Vec<MemberSpec> = observed
        .into_iter()
        .map(|o| {
            let st = statics.get(&o.addr);
            let agent = AgentState {
                weight_percent: o.weight_percent,
                ..AgentState::default()
            };
            MemberSpec {
                addr: o.addr,
                weight: agent.scale(st.map_or(1, |s| s.weight)),
                backup: st.is_some_and(|s| s.backup),
                max_connections: st.map_or(0, |s| s.max_connections),
                healthy: o.healthy,
                draining: o.draining,
                ports: o.ports,
                groups: o.groups,
            }
        })
        .collect();
    apply_panic(cfg.panic_threshold, &mut out);
    out
}

/// Envoy's panic threshold: fewer than `threshold` percent of `total`
/// healthy. Threshold 0 never panics (the pickers' own rule, "when none is
/// healthy, try them all", still holds).
pub fn in_panic(threshold: u32, healthy: usize, total: usize) -> bool {
    threshold > 0 && total > 0 && healthy * 100 < threshold as usize * total
}

/// Applies the panic threshold to a service's members: below it every
/// member is treated as healthy (draining ones still take nothing new), so
/// a mass failure of the checks does not pile all traffic on the few left.
/// Returns whether it applied.
pub fn apply_panic(threshold: u32, members: &mut [MemberSpec]) -> bool {
    let healthy = members.iter().filter(|m| m.healthy).count();
    if !in_panic(threshold, healthy, members.len()) {
        return false;
    }
    for m in members {
        m.healthy = true;
    }
    true
}

/// One endpoint in a snapshot.
#[derive(Clone, Debug)]
pub struct Member {
    /// Live state.
    pub endpoint: Arc<Endpoint>,
    /// Snapshot attributes.
    pub spec: MemberSpec,
}

impl Member {
    fn full(&self) -> bool {
        self.spec.max_connections > 0 && self.endpoint.active() >= u64::from(self.spec.max_connections)
    }
}

/// An immutable view of a service's endpoints, built on config or health changes.
#[derive(Debug)]
pub struct Snapshot {
    /// Every endpoint, primaries and backups.
    pub members: Vec<Member>,
    /// The algorithm in force.
    pub algorithm: Algorithm,
    rr_sequence: Vec<u32>,
    ring: Vec<(u64, u32)>,
    slow_start: Option<SlowStart>,
    /// When the last ramp in this snapshot ends ([`now_ms`]; 0: none): until
    /// then picks weigh members by their ramp, after it they take the plain path.
    ramp_until: u64,
}

/// Per-request record of the members already tried (never the same one twice).
/// The first few live inline: most requests try one endpoint, and the request
/// path should not allocate for that.
#[derive(Clone, Debug, Default)]
pub struct Tried {
    inline: [usize; TRIED_INLINE],
    len: usize,
    more: Vec<usize>,
}

const TRIED_INLINE: usize = 8;

impl Tried {
    /// Marks `index` tried.
    pub fn add(&mut self, index: usize) {
        if self.len < TRIED_INLINE {
            self.inline[self.len] = index;
        } else {
            self.more.push(index);
        }
        self.len += 1;
    }
    /// Whether `index` was tried.
    pub fn contains(&self, index: usize) -> bool {
        self.inline[..self.len.min(TRIED_INLINE)].contains(&index) || self.more.contains(&index)
    }
    /// How many were tried.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether none was tried.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The endpoints of one service and the cursors its pickers advance.
pub struct Balancer {
    snapshot: ArcSwap<Snapshot>,
    rr_cursor: AtomicUsize,
    tie_cursor: AtomicUsize,
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new()
    }
}

impl Balancer {
    /// An empty balancer (every pick fails until `update`).
    pub fn new() -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            rr_cursor: AtomicUsize::new(0),
            tie_cursor: AtomicUsize::new(0),
        }
    }

    /// The current snapshot; hold it for the whole request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Swaps in a new endpoint set. Endpoints that stay keep their live counters
    /// and ejection state; `make` creates the state of new ones. An endpoint
    /// that begins to serve here (new, or back from down or draining) starts
    /// its `slow_start` ramp now. Returns the addresses that left.
    pub fn update(
        &self,
        algorithm: Algorithm,
        slow_start: Option<SlowStart>,
        specs: Vec<MemberSpec>,
        make: impl Fn(SocketAddr) -> Endpoint,
    ) -> Vec<SocketAddr> {
        let old = self.snapshot.load_full();
        let now = now_ms();
        let members = specs
            .into_iter()
            .map(|spec| {
                let before = old.members.iter().find(|m| m.spec.addr == spec.addr);
                let endpoint = match before {
                    Some(m) => m.endpoint.clone(),
                    None => Arc::new(make(spec.addr)),
                };
                let served = before.is_some_and(|m| m.spec.serves());
                if !spec.serves() {
                    endpoint.serving_since.store(0, Ordering::Relaxed);
                } else if !served {
                    endpoint.serving_since.store(now, Ordering::Relaxed);
                }
                Member { endpoint, spec }
            })
            .collect::<Vec<Member>>();
        let removed = old
            .members
            .iter()
            .filter(|o| !members.iter().any(|m| m.spec.addr == o.spec.addr))
            .map(|o| o.spec.addr)
            .collect();
        self.snapshot
            .store(Arc::new(Snapshot::build(algorithm, slow_start, members, now)));
        removed
    }

    /// Picks a member of `snap` not in `tried`; `key` is the request's hash key
    /// (ConsistentHash), `now` the ejection clock ([`now_ms`]).
    pub fn pick(&self, snap: &Snapshot, tried: &Tried, key: Option<u64>, now: u64) -> Option<usize> {
        self.pick_in(snap, tried, key, now, u64::MAX)
    }

    /// [`Balancer::pick`] among the members of the groups in `groups` (a bit
    /// per group): a route's backend.
    pub fn pick_in(&self, snap: &Snapshot, tried: &Tried, key: Option<u64>, now: u64, groups: u64) -> Option<usize> {
        let members = &snap.members;
        let live = |m: &Member| m.spec.serves() && m.spec.groups & groups != 0 && !m.endpoint.passive.is_ejected(now);
        let primaries = |i: usize| {
            let m = &members[i];
            !m.spec.backup && live(m) && !tried.contains(i) && !m.full()
        };
        if let Some(i) = self.pick_among(snap, key, now, &primaries) {
            return Some(i);
        }
        let backups = |i: usize| {
            let m = &members[i];
            m.spec.backup && live(m) && !tried.contains(i) && !m.full()
        };
        if let Some(i) = self.pick_among(snap, key, now, &backups) {
            return Some(i);
        }
        // Every endpoint down (probes or ejections) or already tried: try the
        // others anyway rather than black-hole the service (nginx does the same
        // when all peers failed). Only an untried live endpoint that is merely
        // full (maxConnections) keeps the fallback shut.
        if (0..members.len()).any(|i| live(&members[i]) && !tried.contains(i)) {
            return None;
        }
        let any = |i: usize| {
            let m = &members[i];
            m.spec.groups & groups != 0 && !m.spec.draining && !tried.contains(i) && !m.full()
        };
        let primary_any = |i: usize| !members[i].spec.backup && any(i);
        self.pick_among(snap, key, now, &primary_any)
            .or_else(|| self.pick_among(snap, key, now, &any))
    }

    /// The serving member of `groups` with the most capacity left: the
    /// highest effective weight, which carries the load its agent reports
    /// (`75%` idle). Ties rotate. For assignments (TeamTalk's login server
    /// handing out the least-loaded message server), where the caller does
    /// not stay connected through us and active counts say nothing.
    pub fn pick_least_loaded(&self, snap: &Snapshot, now: u64, groups: u64) -> Option<usize> {
        let members = &snap.members;
        let ok = |m: &Member| m.spec.serves() && m.spec.groups & groups != 0 && !m.endpoint.passive.is_ejected(now);
        let weight = |i: usize| snap.weight_at(i, now);
        let best = (0..members.len()).filter(|&i| ok(&members[i])).map(weight).max()?;
        let ties: Vec<usize> = (0..members.len())
            .filter(|&i| ok(&members[i]) && weight(i) == best)
            .collect();
        Some(ties[self.tie_cursor.fetch_add(1, Ordering::Relaxed) % ties.len()])
    }

    /// The assign API's choice in `default`: among serving endpoints only
    /// (never the all-down fallback a request gets), by reported load when
    /// `by_load` and no hash `key`, else by the algorithm.
    pub fn assign(&self, snap: &Snapshot, by_load: bool, key: Option<u64>, now: u64) -> Option<usize> {
        let picked = if by_load && key.is_none() {
            self.pick_least_loaded(snap, now, 1)
        } else {
            self.pick_in(snap, &Tried::default(), key, now, 1)
        };
        picked.filter(|&i| snap.members[i].spec.serves() && !snap.members[i].endpoint.passive.is_ejected(now))
    }

    fn pick_among(&self, snap: &Snapshot, key: Option<u64>, now: u64, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let members = &snap.members;
        if snap.ramp_until > now {
            return self.pick_ramping(snap, key, now, ok);
        }
        match &snap.algorithm {
            Algorithm::LeastConnections => {
                picker::least_connections(members, self.tie_cursor.fetch_add(1, Ordering::Relaxed), ok)
            }
            Algorithm::PowerOfTwoChoices => picker::power_of_two(members, ok),
            Algorithm::Random => picker::weighted_random(members, ok),
            Algorithm::RoundRobin => {
                if snap.rr_sequence.is_empty() {
                    picker::weighted_random(members, ok)
                } else {
                    let start = self.rr_cursor.fetch_add(1, Ordering::Relaxed);
                    picker::round_robin(&snap.rr_sequence, start, ok)
                }
            }
            Algorithm::ConsistentHash(_) => match key {
                Some(k) => picker::ring_lookup(&snap.ring, k, ok),
                None => picker::least_connections(members, self.tie_cursor.fetch_add(1, Ordering::Relaxed), ok),
            },
        }
    }
}

impl Balancer {
    /// [`Balancer::pick_among`] while some member ramps up. A ramping
    /// member takes part in a pick with the probability its ramp gives (so at
    /// low load, when every count is 0, it gets that share of picks and not a
    /// fair one), and the pickers that weigh members weigh it by its ramped
    /// weight (so under load it holds that share of the requests in flight,
    /// as HAProxy's `leastconn` does under `slowstart`, and not all it can
    /// take because it has none). Round robin and the hash ring move to it
    /// gradually the same way: a key maps to it with its ramp's probability.
    fn pick_ramping(&self, snap: &Snapshot, key: Option<u64>, now: u64, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let members = &snap.members;
        let weight = |i: usize| snap.weight_at(i, now);
        let admitted = |i: usize| {
            let factor = snap.factor_at(i, now);
            factor >= 1.0 || rand::random::<f64>() < factor
        };
        let least_request = |ok: &dyn Fn(usize) -> bool| {
            let start = self.tie_cursor.fetch_add(1, Ordering::Relaxed);
            picker::least_connections_by(members, start, ok, &weight)
        };
        let ramped = |ok: &dyn Fn(usize) -> bool| match &snap.algorithm {
            Algorithm::LeastConnections => least_request(ok),
            // Two admitted candidates, the one with fewer requests per unit
            // of ramped weight; not P2C's "+1", which would never choose a
            // ramping member while every count is 0.
            Algorithm::PowerOfTwoChoices => {
                let a = picker::weighted_random(members, ok)?;
                let Some(b) = picker::weighted_random(members, &|i| i != a && ok(i)) else {
                    return Some(a);
                };
                let (la, lb) = (members[a].endpoint.active(), members[b].endpoint.active());
                Some(if la * weight(b) <= lb * weight(a) { a } else { b })
            }
            Algorithm::Random => picker::weighted_random_by(members, ok, &weight),
            Algorithm::RoundRobin => {
                if snap.rr_sequence.is_empty() {
                    picker::weighted_random_by(members, ok, &weight)
                } else {
                    let start = self.rr_cursor.fetch_add(1, Ordering::Relaxed);
                    picker::round_robin(&snap.rr_sequence, start, ok)
                }
            }
            Algorithm::ConsistentHash(_) => match key {
                Some(k) => picker::ring_lookup(&snap.ring, k, ok),
                None => least_request(ok),
            },
        };
        // Random weighs by weight already: admission on top would count the ramp twice.
        if matches!(snap.algorithm, Algorithm::Random) {
            return ramped(ok);
        }
        ramped(&|i| ok(i) && admitted(i)).or_else(|| ramped(ok))
    }
}

impl Snapshot {
    /// A snapshot with no endpoints.
    pub fn empty() -> Self {
        Self::build(Algorithm::LeastConnections, None, Vec::new(), 0)
    }

    /// The share of its weight member `i` takes at `now`: below 1 while it ramps.
    pub fn factor_at(&self, i: usize, now: u64) -> f64 {
        let since = self.members[i].endpoint.serving_since.load(Ordering::Relaxed);
        match self.slow_start {
            Some(ss) if since > 0 => ss.factor(std::time::Duration::from_millis(now.saturating_sub(since))),
            _ => 1.0,
        }
    }

    /// Member `i`'s weight at `now` in thousandths, its ramp applied (at least 1).
    pub fn weight_at(&self, i: usize, now: u64) -> u64 {
        let full = u64::from(self.members[i].spec.weight.max(1)) * 1000;
        ((full as f64 * self.factor_at(i, now)) as u64).max(1)
    }

    fn build(algorithm: Algorithm, slow_start: Option<SlowStart>, members: Vec<Member>, now: u64) -> Self {
        let ramp_until = match slow_start {
            Some(ss) => members
                .iter()
                .map(|m| m.endpoint.serving_since.load(Ordering::Relaxed))
                .filter(|&since| since > 0)
                .map(|since| since + ss.window.as_millis() as u64)
                .filter(|&until| until > now)
                .max()
                .unwrap_or(0),
            None => 0,
        };
        let weights: Vec<u32> = members.iter().map(|m| m.spec.weight.max(1)).collect();
        let rr_sequence = match algorithm {
            Algorithm::RoundRobin => picker::smooth_sequence(&weights),
            _ => Vec::new(),
        };
        let ring = match algorithm {
            Algorithm::ConsistentHash(_) => {
                let addrs: Vec<SocketAddr> = members.iter().map(|m| m.spec.addr).collect();
                picker::build_ring(&addrs, &weights)
            }
            _ => Vec::new(),
        };
        Self {
            members,
            algorithm,
            rr_sequence,
            ring,
            slow_start,
            ramp_until,
        }
    }

    /// Members that may serve now (healthy, not ejected).
    pub fn serving(&self, now: u64) -> usize {
        self.members
            .iter()
            .filter(|m| m.spec.serves() && !m.endpoint.passive.is_ejected(now))
            .count()
    }
}

#[cfg(test)]
mod tests;
