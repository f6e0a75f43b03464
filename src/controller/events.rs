//! Kubernetes Events, sent from their own task so they never stand in front
//! of a status write: a bounded queue (a full one drops and counts), bursts
//! of transitions summed up into one event per object and reason, and
//! client-go's spam filter (a burst of 25 per object, then one a minute).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::config::ServiceKey;
use crate::health::{Health, Transition};

/// Events queued for the sender; more are dropped and counted.
pub const QUEUE: usize = 1024;
/// Events per object sent at once before the filter slows them down.
pub const BURST: u32 = 25;
/// Then one event per object this often.
pub const REFILL: Duration = Duration::from_secs(60);
/// The longest note the API server takes (`note` is at most 1 KiB).
const NOTE_MAX: usize = 1000;

/// One event to send.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    /// The BalancedService it is about.
    pub key: ServiceKey,
    /// Normal or Warning.
    pub warning: bool,
    /// CamelCase reason, e.g. `EndpointUnhealthy`.
    pub reason: &'static str,
    /// What the controller was doing: `Probe`, `Validate`.
    pub action: &'static str,
    /// How many things it stands for (transitions summed up).
    pub count: usize,
    /// Its text.
    pub text: String,
}

/// A burst of transitions as one note per object and reason: "37 endpoints
/// turned Unhealthy: 10.0.3.7:8080 connect refused, ...".
pub fn summarize(transitions: &[Transition]) -> Vec<Note> {
    let mut groups: BTreeMap<(ServiceKey, bool), Vec<&Transition>> = BTreeMap::new();
    for t in transitions {
        groups
            .entry((t.service.clone(), t.to != Health::Healthy))
            .or_default()
            .push(t);
    }
    groups
        .into_iter()
        .map(|((key, warning), ts)| {
            let to = ts[0].to;
            let item = |t: &Transition| match &t.error {
                Some(e) if warning => format!("{} {e}", t.endpoint),
                _ => t.endpoint.to_string(),
            };
            let text = match ts.as_slice() {
                [one] => match &one.error {
                    Some(e) if warning => format!("{} {} -> {}: {e}", one.endpoint, one.from, one.to),
                    _ => format!("{} {} -> {}", one.endpoint, one.from, one.to),
                },
                many => {
                    let to = if warning && many.iter().any(|t| t.to != to) {
                        "Unhealthy or Unknown".to_string()
                    } else {
                        to.to_string()
                    };
                    let listed: Vec<String> = many.iter().map(|t| item(t)).collect();
                    format!("{} endpoints turned {to}: {}", many.len(), listed.join(", "))
                }
            };
            Note {
                key,
                warning,
                reason: if warning {
                    "EndpointUnhealthy"
                } else {
                    "EndpointHealthy"
                },
                action: "Probe",
                count: ts.len(),
                text: clip(text),
            }
        })
        .collect()
}

fn clip(text: String) -> String {
    if text.len() <= NOTE_MAX {
        return text;
    }
    let mut end = NOTE_MAX - 4;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} ...", &text[..end])
}

/// client-go's spam filter: a token bucket per object.
#[derive(Debug)]
pub struct SpamFilter {
    buckets: HashMap<ServiceKey, (f64, Instant)>,
}

impl Default for SpamFilter {
    fn default() -> Self {
        Self::new()
    }
}

impl SpamFilter {
    /// Every object starts with a full burst.
    pub fn new() -> Self {
        Self {
            buckets: HashMap::new(),
        }
    }

    /// Whether an event about `key` may go now (and takes its token).
    pub fn allow(&mut self, key: &ServiceKey, now: Instant) -> bool {
        let (tokens, at) = self.buckets.entry(key.clone()).or_insert((f64::from(BURST), now));
        let refilled = now.saturating_duration_since(*at).as_secs_f64() / REFILL.as_secs_f64();
        *tokens = (*tokens + refilled).min(f64::from(BURST));
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets objects that have not been heard of for a full refill.
    fn forget_idle(&mut self, now: Instant) {
        let full = REFILL * BURST;
        self.buckets
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < full);
    }
}

/// The sending side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<(Note, ObjectReference)>,
    dropped: prometheus_client::metrics::counter::Counter,
}

impl Events {
    /// Queues `note` about the object `reference`; a full queue drops it and counts.
    pub fn send(&self, note: Note, reference: ObjectReference) {
        if self.tx.try_send((note, reference)).is_err() {
            self.dropped.inc();
        }
    }
}

/// Starts the sender task; it ends when `stop` is cancelled.
pub fn start(
    recorder: Recorder,
    dropped: prometheus_client::metrics::counter::Counter,
    stop: CancellationToken,
) -> (Events, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let task = tokio::spawn(send_loop(recorder, rx, dropped.clone(), stop));
    (Events { tx, dropped }, task)
}

/// Notes the filter held back, summed per object and reason until a token frees.
type Held = BTreeMap<(ServiceKey, &'static str), (Note, ObjectReference)>;

async fn send_loop(
    recorder: Recorder,
    mut rx: mpsc::Receiver<(Note, ObjectReference)>,
    dropped: prometheus_client::metrics::counter::Counter,
    stop: CancellationToken,
) {
    let mut filter = SpamFilter::new();
    let mut held: Held = BTreeMap::new();
    let mut retry = tokio::time::interval(Duration::from_secs(5));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            _ = stop.cancelled() => return,
            got = rx.recv() => match got {
                Some(n) => batch.push(n),
                None => return,
            },
            _ = retry.tick() => {}
        }
        while let Ok(n) = rx.try_recv() {
            batch.push(n);
        }
        for (note, reference) in batch {
            hold(&mut held, note, reference);
        }
        let now = Instant::now();
        filter.forget_idle(now);
        let ready: Vec<_> = held.keys().filter(|(k, _)| filter.allow(k, now)).cloned().collect();
        for k in ready {
            let Some((note, reference)) = held.remove(&k) else {
                continue;
            };
            let event = Event {
                type_: if note.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: note.reason.into(),
                note: Some(note.text),
                action: note.action.into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                dropped.inc();
                tracing::debug!(error = %e, "event not published");
            }
        }
    }
}

/// Adds a note to what waits for its object's token, merged with any held
/// note of the same reason.
fn hold(held: &mut Held, note: Note, reference: ObjectReference) {
    match held.get_mut(&(note.key.clone(), note.reason)) {
        Some((waiting, _)) => {
            let count = waiting.count + note.count;
            let last = note.text.clone();
            waiting.text = clip(format!(
                "{count} {} since the last event; latest: {last}",
                if note.action == "Probe" {
                    "transitions"
                } else {
                    "occurrences"
                }
            ));
            waiting.count = count;
        }
        None => {
            held.insert((note.key.clone(), note.reason), (note, reference));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn t(i: u8, to: Health) -> Transition {
        Transition {
            service: ServiceKey::new("shop", "web"),
            endpoint: ([10, 0, 3, i], 8080).into(),
            from: Health::Healthy,
            to,
            error: (to != Health::Healthy).then(|| "connect: connection refused".into()),
            at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_burst_becomes_one_note_per_object_and_reason() {
        let mut ts: Vec<_> = (0..37).map(|i| t(i, Health::Unhealthy)).collect();
        ts.push(t(200, Health::Healthy));
        let notes = summarize(&ts);
        assert_eq!(notes.len(), 2);
        assert_eq!(notes[1].reason, "EndpointUnhealthy");
        assert!(
            notes[1]
                .text
                .starts_with("37 endpoints turned Unhealthy: 10.0.3.0:8080 connect: connection refused, 10.0.3.1:8080"),
            "{}",
            notes[1].text
        );
        assert!(notes[1].text.len() <= NOTE_MAX);
        assert_eq!(notes[0].text, "10.0.3.200:8080 Healthy -> Healthy");
        let one = summarize(&[t(7, Health::Unhealthy)]);
        assert_eq!(
            one[0].text,
            "10.0.3.7:8080 Healthy -> Unhealthy: connect: connection refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_filter_allows_a_burst_of_25_then_one_a_minute() {
        let mut f = SpamFilter::new();
        let key = ServiceKey::new("shop", "web");
        let other = ServiceKey::new("shop", "api");
        let now = Instant::now();
        assert_eq!((0..100).filter(|_| f.allow(&key, now)).count(), 25);
        assert!(f.allow(&other, now), "objects have their own buckets");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!f.allow(&key, Instant::now()));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(f.allow(&key, Instant::now()));
        assert!(!f.allow(&key, Instant::now()));
    }

    #[test]
    fn held_notes_merge_into_a_count() {
        let mut held = Held::new();
        let notes = summarize(&[t(1, Health::Unhealthy), t(2, Health::Unhealthy)]);
        hold(&mut held, notes[0].clone(), ObjectReference::default());
        hold(
            &mut held,
            summarize(&[t(3, Health::Unhealthy)])[0].clone(),
            ObjectReference::default(),
        );
        let (note, _) = held.values().next().unwrap();
        assert_eq!(note.count, 3);
        assert!(
            note.text
                .starts_with("3 transitions since the last event; latest: 10.0.3.3:8080"),
            "{}",
            note.text
        );
    }
}
