//! Out of file descriptors, the prober and the proxy blame themselves, not the
//! endpoints. Its own test binary: it uses up the process's descriptors.

use std::fs::File;
use std::time::Duration;

use balanced::api::config::{HealthCheck, ProbeKind, ServiceKey};
use balanced::demo::backend::{Backend, Behavior};
use balanced::health::{Health, Prober, Target, TlsClients, probe};
use balanced::metrics::Metrics;
use balanced::testing::eventually;
use tokio_util::sync::CancellationToken;

/// Opens /dev/null until the process is out of descriptors, then gives back
/// `spare` so the runtime itself can go on.
fn use_up_descriptors(spare: usize) -> Vec<File> {
    let mut held = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => held.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(24), "expected EMFILE, got {e}");
                break;
            }
        }
        assert!(held.len() < 2_000_000, "no descriptor limit to reach");
    }
    held.truncate(held.len().saturating_sub(spare));
    held
}

#[tokio::test]
async fn a_probe_failing_with_emfile_leaves_the_endpoint_alone() {
    let backend = Backend::http("up", Behavior::Status(200)).await;
    let prober = Prober::new(Metrics::new().probe, CancellationToken::new());
    let key = ServiceKey::new("default", "web");
    let check = HealthCheck {
        probe: ProbeKind::Tcp,
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(25),
        rise: 1,
        fall: 1,
        down_interval: Duration::from_millis(50),
        port: None,
        agent: None,
    };
    prober.update_service(&key, &check, &Default::default(), &[Target::new(backend.addr)]);
    let healthy = || async {
        let s = prober.states(&key);
        (s[0].1.health == Health::Healthy).then_some(s[0].1.clone())
    };
    eventually(Duration::from_secs(2), "endpoint healthy", healthy).await;

    let held = use_up_descriptors(0);
    let err = probe(
        &ProbeKind::Tcp,
        backend.addr,
        Duration::from_secs(1),
        &TlsClients::default(),
    )
    .await
    .unwrap_err();
    assert!(err.local, "EMFILE is the prober's failure: {err:?}");
    assert!(err.message.contains("too many open files"), "{}", err.message);
    // fall is 1: one counted failure would mark it down. Ten intervals pass.
    let mut transitions = prober.subscribe();
    let quiet = tokio::time::timeout(Duration::from_millis(500), transitions.recv()).await;
    let state = prober.states(&key)[0].1.clone();
    drop(held);
    assert!(
        quiet.is_err(),
        "a transition happened while out of descriptors: {quiet:?}"
    );
    assert_eq!(state.health, Health::Healthy);
    assert_eq!(state.consecutive_failures, 0);
    assert_eq!(state.last_error, None);
}
