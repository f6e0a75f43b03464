//! The xDS server (`--xds ADDR`): Envoy's aggregated discovery service (v3,
//! state of the world) over gRPC, for proxyless gRPC clients and for Envoy.
//!
//! A publisher rebuilds the resources whenever the prober or the
//! configuration moves, and swaps them in only when they differ; each stream
//! then sends a type again only when what its client subscribed to changed.
//! ACKs and NACKs are logged; a NACKed version is not resent until something
//! changes.

pub mod resources;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

pub use resources::{Endpoint, Resources, Service};

/// A version of every resource.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Bumped whenever the resources change.
    pub version: u64,
    /// The resources.
    pub resources: Resources,
    /// Whether this process knows the truth: a standby controller does not,
    /// and turns streams away (UNAVAILABLE) so clients find the leader.
    pub serving: bool,
}

/// How often weights that ramp up (slow start) are published again.
const RAMP_STEP: Duration = Duration::from_secs(1);

/// Keeps a [`Snapshot`] current: rebuilds with `build` after every change
/// `changes` signals (coalesced over 20 ms) and publishes only a different
/// result; `build` answers `None` while this process is not the one to ask
/// (a standby controller). Stops with `stop`.
pub fn publish<F>(
    build: F,
    mut changes: watch::Receiver<u64>,
    stop: CancellationToken,
) -> watch::Receiver<Arc<Snapshot>>
where
    F: Fn() -> Option<Vec<Service>> + Send + 'static,
{
    // Also says whether a weight is still ramping (slow start): then it is
    // built again every RAMP_STEP, with no change to wait for.
    let make = move |version: u64| match build() {
        Some(services) => {
            let ramping = services.iter().any(|s| s.endpoints.iter().any(|e| e.ramping));
            let snapshot = Snapshot {
                version,
                resources: resources::build(&services),
                serving: true,
            };
            (snapshot, ramping)
        }
        None => (
            Snapshot {
                version,
                ..Snapshot::default()
            },
            false,
        ),
    };
    let (first, mut ramping) = make(1);
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        loop {
            let step = async {
                if ramping {
                    tokio::time::sleep(RAMP_STEP).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
                _ = step => {}
            }
            // A burst of transitions (a node going away) makes one version.
            tokio::time::sleep(Duration::from_millis(20)).await;
            changes.borrow_and_update();
            let current = tx.borrow().clone();
            let (next, still) = make(current.version + 1);
            ramping = still;
            if next.resources != current.resources || next.serving != current.serving {
                tracing::debug!(version = next.version, serving = next.serving, "xDS resources changed");
                tx.send_replace(Arc::new(next));
            }
        }
    });
    rx
}

/// Serves ADS on `listener` from `snapshots` until `stop`.
pub async fn serve(listener: TcpListener, snapshots: watch::Receiver<Arc<Snapshot>>, stop: CancellationToken) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(addr, "xDS server listening (ADS, v3)");
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let service = AggregatedDiscoveryServiceServer::new(Ads {
        snapshots,
        stop: stop.clone(),
        nonces: Arc::new(std::sync::atomic::AtomicU64::new(0)),
    });
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .serve_with_incoming_shutdown(service, incoming, stop.cancelled_owned())
        .await;
    if let Err(e) = result {
        tracing::error!(addr, error = %e, "xDS server stopped");
    }
}

/// Binds `addr` for [`serve`], naming the flag in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

struct Ads {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stop: CancellationToken,
    nonces: Arc<std::sync::atomic::AtomicU64>,
}

type Responses = ReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
type DeltaResponses = ReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Responses;
    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Responses>, tonic::Status> {
        if !self.snapshots.borrow().serving {
            return Err(tonic::Status::unavailable(
                "this controller is standing by: the leader serves xDS; reconnect",
            ));
        }
        let peer = request.remote_addr();
        let requests = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let stream = AdsStream {
            peer: peer.map(|p| p.to_string()).unwrap_or_default(),
            node: String::new(),
            subscriptions: HashMap::new(),
            snapshots: self.snapshots.clone(),
            nonces: self.nonces.clone(),
            tx,
        };
        tokio::spawn(stream.run(requests, self.stop.clone()));
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        _: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<DeltaResponses>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "balanced serves state-of-the-world xDS only: use StreamAggregatedResources",
        ))
    }
}

/// What one stream's client subscribed to for one type, and what it was sent.
#[derive(Default)]
struct Subscription {
    /// `None` is a wildcard (every resource of the type).
    names: Option<BTreeSet<String>>,
    /// The nonce of the last response; requests carrying another are stale.
    nonce: String,
    /// The resources last sent, to send again only when they differ.
    sent: Option<Vec<(String, Any)>>,
}

struct AdsStream {
    peer: String,
    node: String,
    subscriptions: HashMap<String, Subscription>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    nonces: Arc<std::sync::atomic::AtomicU64>,
    tx: mpsc::Sender<Result<DiscoveryResponse, tonic::Status>>,
}

impl AdsStream {
    async fn run(mut self, mut requests: tonic::Streaming<DiscoveryRequest>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                request = requests.message() => match request {
                    Ok(Some(r)) => {
                        if !self.on_request(r).await {
                            return;
                        }
                    }
                    Ok(None) => {
                        tracing::debug!(peer = %self.peer, node = %self.node, "xDS stream closed by the client");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(peer = %self.peer, node = %self.node, error = %e, "xDS stream ended");
                        return;
                    }
                },
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if !self.snapshots.borrow().serving {
                        tracing::info!(peer = %self.peer, node = %self.node, "xDS stream ended: no longer the leader");
                        let _ = self.tx.send(Err(tonic::Status::unavailable("leadership lost: reconnect to the leader"))).await;
                        return;
                    }
                    let types: Vec<String> = self.subscriptions.keys().cloned().collect();
                    for type_url in types {
                        if !self.push(&type_url, false).await {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Handles one request; false when the client is gone.
    async fn on_request(&mut self, r: DiscoveryRequest) -> bool {
        if self.node.is_empty()
            && let Some(node) = &r.node
        {
            self.node = node.id.clone();
            tracing::info!(peer = %self.peer, node = %self.node, "xDS client connected");
        }
        if !resources::TYPES.contains(&r.type_url.as_str()) {
            tracing::debug!(peer = %self.peer, node = %self.node, type_url = %r.type_url, "xDS request for a type balanced does not serve; ignored");
            return true;
        }
        let sub = self.subscriptions.entry(r.type_url.clone()).or_default();
        if !r.response_nonce.is_empty() && r.response_nonce != sub.nonce {
            // An answer to a response that a newer one replaced.
            return true;
        }
        if let Some(error) = &r.error_detail {
            tracing::warn!(
                peer = %self.peer,
                node = %self.node,
                type_url = %r.type_url,
                rejected_nonce = %r.response_nonce,
                kept_version = %r.version_info,
                error = %error.message,
                "xDS client rejected (NACK) our resources; it keeps its last accepted version"
            );
        } else if !r.response_nonce.is_empty() {
            tracing::debug!(peer = %self.peer, node = %self.node, type_url = %r.type_url, version = %r.version_info, "xDS ACK");
        }
        // State of the world: an empty list is a wildcard for listeners and
        // clusters (Envoy's CDS), nothing for endpoints.
        let wildcard = r.resource_names.iter().any(|n| n == "*")
            || (r.resource_names.is_empty() && r.type_url != resources::ENDPOINTS);
        let names = (!wildcard).then(|| r.resource_names.iter().cloned().collect::<BTreeSet<_>>());
        let first = sub.sent.is_none();
        let changed = sub.names != names;
        sub.names = names;
        if first || changed {
            return self.push(&r.type_url, true).await;
        }
        true
    }

    /// Sends `type_url`'s subscribed resources if they differ from what
    /// was sent (or always, with `force`); false when the client is gone.
    async fn push(&mut self, type_url: &str, force: bool) -> bool {
        let snapshot = self.snapshots.borrow_and_update().clone();
        let Some(sub) = self.subscriptions.get_mut(type_url) else {
            return true;
        };
        let selected = snapshot.resources.select(type_url, sub.names.as_ref());
        if !force && sub.sent.as_ref() == Some(&selected) {
            return true;
        }
        let nonce = self.nonces.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        sub.nonce = nonce.to_string();
        if let Some(names) = &sub.names {
            let missing: Vec<&String> = names
                .iter()
                .filter(|n| !selected.iter().any(|(s, _)| s == *n))
                .collect();
            if !missing.is_empty() {
                tracing::debug!(peer = %self.peer, node = %self.node, type_url, ?missing, "xDS client asked for resources balanced does not have");
            }
        }
        let response = DiscoveryResponse {
            version_info: snapshot.version.to_string(),
            resources: selected.iter().map(|(_, any)| any.clone()).collect(),
            type_url: type_url.to_string(),
            nonce: sub.nonce.clone(),
            ..Default::default()
        };
        tracing::debug!(peer = %self.peer, node = %self.node, type_url, version = snapshot.version, resources = selected.len(), "xDS push");
        sub.sent = Some(selected);
        self.tx.send(Ok(response)).await.is_ok()
    }
}

#[cfg(test)]
mod tests;
