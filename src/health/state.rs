//! The rise/fall state machine of one endpoint: pure, no clock, no I/O.
//!
//! Semantics follow the Tengine check module and HAProxy: an endpoint starts
//! Unknown (not serving), becomes Healthy after `rise` successes in a row and
//! Unhealthy after `fall` failures in a row; a single contrary result only
//! resets the run.

use std::time::{Duration, SystemTime};

use serde::Serialize;

/// What the probes concluded about an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Health {
    /// Not enough probes yet; not served.
    Unknown,
    /// `rise` successes in a row; served.
    Healthy,
    /// `fall` failures in a row; not served.
    Unhealthy,
}

impl Health {
    /// The word used in status and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "Unknown",
            Health::Healthy => "Healthy",
            Health::Unhealthy => "Unhealthy",
        }
    }

    /// Parses the status word back (used to seed state from a previous status).
    pub fn parse(s: &str) -> Option<Health> {
        match s {
            "Unknown" => Some(Health::Unknown),
            "Healthy" => Some(Health::Healthy),
            "Unhealthy" => Some(Health::Unhealthy),
            _ => None,
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything remembered about one endpoint's probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthState {
    /// Current conclusion.
    pub health: Health,
    /// Passed probes in a row.
    pub consecutive_successes: u32,
    /// Failed probes in a row.
    pub consecutive_failures: u32,
    /// Text of the most recent failure since the endpoint was last healthy.
    pub last_error: Option<String>,
    /// When `health` last changed.
    pub last_transition: Option<SystemTime>,
    /// What the endpoint's agent reported (weight, drain, down).
    pub agent: super::agent::AgentState,
}

impl Default for HealthState {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthState {
    /// A new endpoint: Unknown, nothing seen.
    pub fn new() -> Self {
        Self {
            health: Health::Unknown,
            consecutive_successes: 0,
            consecutive_failures: 0,
            last_error: None,
            last_transition: None,
            agent: super::agent::AgentState::default(),
        }
    }

    /// A state inherited from an earlier observer (a previous controller's status),
    /// so a restart does not send every endpoint back to Unknown.
    pub fn inherited(health: Health, last_transition: Option<SystemTime>) -> Self {
        Self {
            health,
            last_transition,
            ..Self::new()
        }
    }

    /// Whether the endpoint may be served.
    pub fn is_healthy(&self) -> bool {
        self.health == Health::Healthy
    }

    /// The weight lookaside clients (xDS) are given: `configured` scaled by
    /// the agent's percent and, within `slow_start`'s window after it turned
    /// healthy, by the ramp; and whether it is still ramping at `now`.
    pub fn published_weight(
        &self,
        configured: u32,
        slow_start: Option<crate::api::config::SlowStart>,
        now: SystemTime,
    ) -> (u32, bool) {
        let full = self.agent.scale(configured);
        let since = self
            .last_transition
            .filter(|_| self.is_healthy())
            .and_then(|at| now.duration_since(at).ok());
        match (slow_start, since) {
            (Some(ss), Some(elapsed)) if elapsed < ss.window => {
                (((f64::from(full) * ss.factor(elapsed)) as u32).max(1), true)
            }
            _ => (full, false),
        }
    }

    /// Records one probe result; returns the previous health if it changed.
    pub fn record(&mut self, result: Result<(), &str>, rise: u32, fall: u32, now: SystemTime) -> Option<Health> {
        let before = self.health;
        match result {
            Ok(()) => {
                self.consecutive_successes = self.consecutive_successes.saturating_add(1);
                self.consecutive_failures = 0;
                if self.health != Health::Healthy && self.consecutive_successes >= rise {
                    self.health = Health::Healthy;
                    self.last_error = None;
                }
            }
            Err(error) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.consecutive_successes = 0;
                self.last_error = Some(error.to_string());
                if self.health != Health::Unhealthy && self.consecutive_failures >= fall {
                    self.health = Health::Unhealthy;
                }
            }
        }
        (self.health != before).then(|| {
            self.last_transition = Some(now);
            before
        })
    }

    /// How long until the next probe: `down_interval` while down and not rising
    /// (HAProxy `downinter`), `interval` otherwise so a recovering endpoint
    /// climbs its `rise` at the normal pace.
    pub fn next_delay(&self, interval: Duration, down_interval: Duration) -> Duration {
        if self.health == Health::Unhealthy && self.consecutive_successes == 0 {
            down_interval
        } else {
            interval
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    #[test]
    fn published_weights_ramp_after_turning_healthy() {
        use std::time::Duration;
        let ss = crate::api::config::SlowStart {
            window: Duration::from_secs(10),
            aggression_milli: 1000,
            min_weight_percent: 10,
        };
        let healthy = HealthState::inherited(Health::Healthy, Some(T0));
        let at = |secs| T0 + Duration::from_secs(secs);
        assert_eq!(healthy.published_weight(2, Some(ss), at(0)), (20, true));
        assert_eq!(healthy.published_weight(2, Some(ss), at(5)), (100, true));
        assert_eq!(healthy.published_weight(2, Some(ss), at(10)), (200, false));
        assert_eq!(healthy.published_weight(2, None, at(0)), (200, false));
        // Not healthy, or healthy since before anyone watched: no ramp.
        let down = HealthState::inherited(Health::Unhealthy, Some(T0));
        assert_eq!(down.published_weight(2, Some(ss), at(1)), (200, false));
        let unknown_since = HealthState::inherited(Health::Healthy, None);
        assert_eq!(unknown_since.published_weight(2, Some(ss), at(1)), (200, false));
    }

    fn feed(state: &mut HealthState, results: &str, rise: u32, fall: u32) -> Vec<Health> {
        results
            .chars()
            .map(|c| {
                let r = if c == '+' { Ok(()) } else { Err("refused") };
                state.record(r, rise, fall, T0);
                state.health
            })
            .collect()
    }

    #[test]
    fn starts_unknown_and_not_serving() {
        let s = HealthState::new();
        assert_eq!(s.health, Health::Unknown);
        assert!(!s.is_healthy());
    }

    #[test]
    fn rise_successes_make_it_healthy() {
        let mut s = HealthState::new();
        use Health::*;
        assert_eq!(feed(&mut s, "+++", 3, 2), vec![Unknown, Unknown, Healthy]);
        assert_eq!(s.last_transition, Some(T0));
    }

    #[test]
    fn fall_failures_make_it_unhealthy_and_keep_the_error() {
        let mut s = HealthState::new();
        use Health::*;
        assert_eq!(feed(&mut s, "++--", 2, 2), vec![Unknown, Healthy, Healthy, Unhealthy]);
        assert_eq!(s.last_error.as_deref(), Some("refused"));
        assert_eq!(s.consecutive_failures, 2);
        assert_eq!(s.consecutive_successes, 0);
    }

    #[test]
    fn unknown_endpoints_that_fail_become_unhealthy_after_fall() {
        let mut s = HealthState::new();
        use Health::*;
        assert_eq!(feed(&mut s, "---", 2, 3), vec![Unknown, Unknown, Unhealthy]);
    }

    #[test]
    fn flapping_input_never_completes_a_run() {
        let mut s = HealthState::new();
        let seen = feed(&mut s, "+-+-+-+-+-", 2, 2);
        assert!(seen.iter().all(|h| *h == Health::Unknown), "{seen:?}");

        let mut s = HealthState::new();
        feed(&mut s, "++", 2, 2);
        let seen = feed(&mut s, "-+-+-+-+", 2, 2);
        assert!(seen.iter().all(|h| *h == Health::Healthy), "{seen:?}");
    }

    #[test]
    fn recovery_needs_rise_again_and_clears_the_error() {
        let mut s = HealthState::new();
        feed(&mut s, "++--", 2, 2);
        assert_eq!(feed(&mut s, "++", 2, 2), vec![Health::Unhealthy, Health::Healthy]);
        assert_eq!(s.last_error, None);
    }

    #[test]
    fn record_reports_only_changes() {
        let mut s = HealthState::new();
        assert_eq!(s.record(Ok(()), 1, 1, T0), Some(Health::Unknown));
        assert_eq!(s.record(Ok(()), 1, 1, T0), None);
        assert_eq!(s.record(Err("x"), 1, 1, T0), Some(Health::Healthy));
    }

    #[test]
    fn down_endpoints_wait_down_interval_until_they_start_rising() {
        let (up, down) = (Duration::from_secs(1), Duration::from_secs(10));
        let mut s = HealthState::new();
        assert_eq!(s.next_delay(up, down), up);
        feed(&mut s, "---", 2, 3);
        assert_eq!(s.next_delay(up, down), down);
        feed(&mut s, "+", 2, 3);
        assert_eq!(s.next_delay(up, down), up);
    }

    #[test]
    fn inherited_state_serves_at_once() {
        let s = HealthState::inherited(Health::Healthy, Some(T0));
        assert!(s.is_healthy());
        assert_eq!(Health::parse("Unhealthy"), Some(Health::Unhealthy));
        assert_eq!(Health::parse("up"), None);
    }
}
