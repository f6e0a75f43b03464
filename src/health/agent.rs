//! Load reported by the endpoints themselves, in HAProxy's `agent-check`
//! words, so agents written for HAProxy work unchanged: a TCP agent on its own
//! port answers one ASCII line, or the HTTP probe's answer carries the same
//! words in a header (`healthCheck.http.agentHeader`).
//!
//! The words (HAProxy configuration manual, `agent-check`):
//! - `75%`: the endpoint's weight, as a percent of its configured weight;
//! - `ready`, `drain`, `maint`: the administrative state; `drain` and `maint`
//!   take the endpoint out for new requests and connections while those in
//!   flight finish (balanced has no separate maintenance mode);
//! - `up`, `down`, `fail`, `stopped`: the operational state; a down endpoint
//!   fails its health check until the agent says `up` again. A `#` starts a
//!   description that runs to the end of the line.
//!
//! Words are separated by spaces, tabs or commas. A state lasts until the
//! agent says otherwise, as in HAProxy: `drain` stays until `ready`. An agent
//! that cannot be reached, or answers nothing we know, changes nothing: the
//! regular probe decides health (HAProxy does the same).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::probe::ProbeError;
use crate::api::duration::format_duration;
use crate::net::io_text;

/// The administrative state an agent sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Admin {
    /// Serving normally.
    #[default]
    Ready,
    /// No new requests or connections; those in flight finish.
    Drain,
    /// HAProxy's maintenance: handled as `Drain`.
    Maint,
}

impl Admin {
    /// The agent word.
    pub fn as_str(self) -> &'static str {
        match self {
            Admin::Ready => "ready",
            Admin::Drain => "drain",
            Admin::Maint => "maint",
        }
    }
}

/// What the agent has said so far about one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentState {
    /// Percent of the configured weight, 100 until an agent says otherwise.
    pub weight_percent: u32,
    /// `ready`, `drain` or `maint`.
    pub admin: Admin,
    /// `Some(why)` while the agent says the endpoint is down.
    pub down: Option<String>,
}

impl Default for AgentState {
    fn default() -> Self {
        Self {
            weight_percent: 100,
            admin: Admin::Ready,
            down: None,
        }
    }
}

impl AgentState {
    /// Whether new requests and connections must avoid the endpoint:
    /// `drain`, `maint`, or a weight of 0%.
    pub fn draining(&self) -> bool {
        self.admin != Admin::Ready || self.weight_percent == 0
    }

    /// Applies one answer; returns whether anything changed.
    pub fn apply(&mut self, words: &AgentWords) -> bool {
        let before = self.clone();
        if let Some(p) = words.percent {
            self.weight_percent = p;
        }
        if let Some(a) = words.admin {
            self.admin = a;
        }
        match &words.operational {
            Some(Operational::Up) => self.down = None,
            Some(Operational::Down(word)) => {
                self.down = Some(match &words.description {
                    Some(d) => format!("{word}: {d}"),
                    None => word.clone(),
                })
            }
            None => {}
        }
        *self != before
    }

    /// The effective weight: `configured` in hundredths, times the percent,
    /// so 50% of weight 1 is half of another endpoint's 1 (HAProxy scales
    /// weights by 16 inside for the same reason). Every endpoint is scaled
    /// alike, and the pickers work on ratios (the ring and the round-robin
    /// cycle divide by the weights' common divisor first). At least 1: a 0%
    /// endpoint is draining instead.
    pub fn scale(&self, configured: u32) -> u32 {
        (configured.min(1000) * self.weight_percent.min(MAX_PERCENT)).max(1)
    }
}

/// The largest weight percent accepted: an agent answering more is garbage.
pub const MAX_PERCENT: u32 = 1000;

/// An operational word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operational {
    /// `up`.
    Up,
    /// `down`, `fail` or `stopped` (the word kept for status).
    Down(String),
}

/// One answer, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentWords {
    /// `NN%`.
    pub percent: Option<u32>,
    /// `ready`, `drain`, `maint`.
    pub admin: Option<Admin>,
    /// `up`, `down`, `fail`, `stopped`.
    pub operational: Option<Operational>,
    /// Text after `#`.
    pub description: Option<String>,
}

/// Parses one agent line. Unknown words, or no word at all, are an error
/// naming them: the caller logs it and changes nothing.
pub fn parse(line: &str) -> Result<AgentWords, String> {
    let (words, description) = match line.split_once('#') {
        Some((w, d)) => (w, Some(d.trim()).filter(|d| !d.is_empty()).map(str::to_string)),
        None => (line, None),
    };
    let mut out = AgentWords {
        description,
        ..AgentWords::default()
    };
    let mut any = false;
    for word in words.split([' ', '\t', ',', '\r', '\n']).filter(|w| !w.is_empty()) {
        any = true;
        let lower = word.to_ascii_lowercase();
        match lower.as_str() {
            "ready" => out.admin = Some(Admin::Ready),
            "drain" => out.admin = Some(Admin::Drain),
            "maint" => out.admin = Some(Admin::Maint),
            "up" => out.operational = Some(Operational::Up),
            "down" | "fail" | "stopped" => out.operational = Some(Operational::Down(lower)),
            _ => match lower.strip_suffix('%').and_then(|n| n.parse::<u32>().ok()) {
                Some(p) if p <= MAX_PERCENT => out.percent = Some(p),
                Some(p) => return Err(format!("weight {p}% is over {MAX_PERCENT}%")),
                None => {
                    let shown: String = word.chars().take(32).collect();
                    return Err(format!("unknown word {shown:?}"));
                }
            },
        }
    }
    if !any {
        return Err("empty answer".into());
    }
    Ok(out)
}

/// The longest agent line read; HAProxy reads at most one buffer too.
const LINE_MAX: usize = 512;

/// Connects to the agent at `addr` and reads its line (up to a newline, or
/// what it sent before closing), within `timeout`.
pub async fn ask(addr: SocketAddr, timeout: Duration) -> Result<String, ProbeError> {
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| ProbeError {
            local: crate::net::is_local_exhaustion(&e),
            ..ProbeError::failed(format!("agent: connect: {}", io_text(&e)))
        })?;
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        let mut buf = [0u8; LINE_MAX];
        let mut len = 0;
        loop {
            let n = stream
                .read(&mut buf[len..])
                .await
                .map_err(|e| ProbeError::failed(format!("agent: read: {}", io_text(&e))))?;
            len += n;
            if n == 0 || buf[..len].contains(&b'\n') || len == buf.len() {
                break;
            }
        }
        let line = buf[..len].split(|b| *b == b'\n').next().unwrap_or_default();
        Ok(String::from_utf8_lossy(line).into_owned())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError {
            timed_out: true,
            local: false,
            message: format!("agent: timeout: no answer after {}", format_duration(timeout)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_words_parse() {
        let w = parse("75%\n").unwrap();
        assert_eq!(w.percent, Some(75));
        let w = parse("up, ready 50%").unwrap();
        assert_eq!(
            (w.percent, w.admin, w.operational),
            (Some(50), Some(Admin::Ready), Some(Operational::Up))
        );
        let w = parse("DRAIN").unwrap();
        assert_eq!(w.admin, Some(Admin::Drain));
        let w = parse("stopped #disk full").unwrap();
        assert_eq!(w.operational, Some(Operational::Down("stopped".into())));
        assert_eq!(w.description.as_deref(), Some("disk full"));
        assert_eq!(parse("maint\tfail").unwrap().admin, Some(Admin::Maint));
    }

    #[test]
    fn garbage_is_an_error_naming_it() {
        assert_eq!(parse("hello world").unwrap_err(), "unknown word \"hello\"");
        assert_eq!(parse("").unwrap_err(), "empty answer");
        assert_eq!(parse("  \r\n").unwrap_err(), "empty answer");
        assert_eq!(parse("50 %").unwrap_err(), "unknown word \"50\"");
        assert_eq!(parse("2000%").unwrap_err(), "weight 2000% is over 1000%");
        assert_eq!(parse("-5%").unwrap_err(), "unknown word \"-5%\"");
    }

    #[test]
    fn states_last_until_the_agent_says_otherwise() {
        let mut s = AgentState::default();
        assert!(!s.apply(&parse("up 100% ready").unwrap()), "nothing changed");
        assert!(s.apply(&parse("drain").unwrap()));
        assert!(s.draining());
        assert!(s.apply(&parse("50%").unwrap()));
        assert!(s.draining(), "a weight alone does not end a drain");
        assert!(s.apply(&parse("ready").unwrap()));
        assert!(!s.draining());
        assert_eq!(s.weight_percent, 50, "and the weight stays");
        assert!(s.apply(&parse("down # rebuilding index").unwrap()));
        assert_eq!(s.down.as_deref(), Some("down: rebuilding index"));
        s.apply(&parse("75%").unwrap());
        assert!(s.down.is_some(), "down until up");
        s.apply(&parse("up").unwrap());
        assert_eq!(s.down, None);
        s.apply(&parse("0%").unwrap());
        assert!(s.draining(), "0% takes no new requests");
    }

    #[test]
    fn weights_scale_and_stay_positive() {
        let mut s = AgentState::default();
        assert_eq!(s.scale(1), 100);
        assert_eq!(s.scale(10), 1000);
        s.weight_percent = 50;
        assert_eq!(s.scale(1), 50, "half of an unreported endpoint of weight 1");
        s.weight_percent = 0;
        assert_eq!(s.scale(1), 1, "never 0: a 0% endpoint drains instead");
        s.weight_percent = 1000;
        assert_eq!(s.scale(1000), 1_000_000);
    }
}
