//! Leader election on a `coordination.k8s.io/v1` Lease: one active controller,
//! the others wait and take over once the holder stops renewing.
//!
//! Writes use the Lease's resourceVersion, so two candidates racing for an
//! expired Lease cannot both win (the loser gets 409 Conflict).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

/// Which Lease, who we are, and the timings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a holder's claim lasts without renewal.
    pub duration: Duration,
    /// How often the holder renews.
    pub renew: Duration,
}

/// What one attempt concluded.
#[derive(Debug, PartialEq, Eq)]
enum Claim {
    Held,
    HeldByOther(String),
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

async fn try_claim(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<Claim, kube::Error> {
    let seconds = cfg.duration.as_secs().max(1) as i32;
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await?;
            Ok(Claim::Held)
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let ours = holder == cfg.identity;
            let duration = spec
                .lease_duration_seconds
                .map(|s| jiff::SignedDuration::from_secs(i64::from(s)))
                .unwrap_or(jiff::SignedDuration::from_secs(i64::from(seconds)));
            let expired = spec
                .renew_time
                .as_ref()
                .is_none_or(|t| t.0 + duration < jiff::Timestamp::now());
            if !ours && !expired && !holder.is_empty() {
                return Ok(Claim::HeldByOther(holder));
            }
            if !ours {
                spec.acquire_time = Some(now());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.holder_identity = Some(cfg.identity.clone());
            spec.lease_duration_seconds = Some(seconds);
            spec.renew_time = Some(now());
            api.replace(&cfg.name, &PostParams::default(), &lease).await?;
            Ok(Claim::Held)
        }
    }
}

/// Waits until this replica holds the Lease; false if `shutdown` came first.
pub async fn acquire(client: Client, cfg: &LeaseConfig, shutdown: &CancellationToken) -> bool {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_holder = String::new();
    loop {
        match try_claim(&api, cfg).await {
            Ok(Claim::Held) => {
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, "leading");
                return true;
            }
            Ok(Claim::HeldByOther(holder)) => {
                if holder != last_holder {
                    tracing::info!(lease = %cfg.name, %holder, "standing by: another replica leads");
                    last_holder = holder;
                }
            }
            Err(e) => tracing::warn!(lease = %cfg.name, error = %e, "lease not acquired"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(cfg.renew) => {}
        }
    }
}

/// Renews the Lease until `lead` is cancelled; cancels `lead` itself when the
/// Lease is lost or cannot be renewed before it would expire, so two leaders
/// never act at once.
pub async fn renew(client: Client, cfg: &LeaseConfig, lead: &CancellationToken) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = lead.cancelled() => return,
            _ = tokio::time::sleep(cfg.renew) => {}
        }
        match try_claim(&api, cfg).await {
            Ok(Claim::Held) => last_renewed = tokio::time::Instant::now(),
            Ok(Claim::HeldByOther(holder)) => {
                tracing::warn!(lease = %cfg.name, %holder, "lease taken by another replica; stepping down");
                lead.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(lease = %cfg.name, error = %e, "lease renewal failed");
                if last_renewed.elapsed() + cfg.renew >= cfg.duration {
                    lead.cancel();
                    return;
                }
            }
        }
    }
}

/// Gives the Lease up on a clean shutdown, so a standby takes over at once.
pub async fn release(client: Client, cfg: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(cfg.identity.as_str())
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        let _ = api.replace(&cfg.name, &PostParams::default(), &lease).await;
    }
}
