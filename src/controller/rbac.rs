//! Every Kubernetes API call the controller makes, as (API group, resource,
//! verb). The Helm chart's ClusterRole and leader-election Role grant exactly
//! these; tests compare the chart with this list and the controller's real
//! requests (against the test API server) with it.

/// `(group, resource, verb)`; group `""` is the core API.
pub const API_CALLS: &[(&str, &str, &str)] = &[
    // Reflector of every BalancedService; `get` is held so the proxy Roles the
    // controller creates may grant it (RBAC forbids granting what one lacks).
    ("balanced.dev", "balancedservices", "get"),
    ("balanced.dev", "balancedservices", "list"),
    ("balanced.dev", "balancedservices", "watch"),
    ("balanced.dev", "balancedservices/status", "patch"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("discovery.k8s.io", "endpointslices", "create"),
    ("discovery.k8s.io", "endpointslices", "patch"),
    // A healthy slice left empty.
    ("discovery.k8s.io", "endpointslices", "delete"),
    ("apps", "deployments", "list"),
    ("apps", "deployments", "watch"),
    ("apps", "deployments", "create"),
    ("apps", "deployments", "patch"),
    ("", "services", "list"),
    ("", "services", "watch"),
    ("", "services", "create"),
    ("", "services", "patch"),
    // The Secrets endpoint TLS names (CA bundles, client certificates), each
    // watched by name for the checks; held also so the proxy Roles may grant
    // their own Secrets by name.
    ("", "secrets", "get"),
    ("", "secrets", "list"),
    ("", "secrets", "watch"),
    ("", "serviceaccounts", "create"),
    ("", "serviceaccounts", "patch"),
    ("rbac.authorization.k8s.io", "roles", "create"),
    ("rbac.authorization.k8s.io", "roles", "patch"),
    ("rbac.authorization.k8s.io", "rolebindings", "create"),
    ("rbac.authorization.k8s.io", "rolebindings", "patch"),
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
    // Leader election, in the release namespace (a Role, not the ClusterRole).
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"),
];

/// Whether the controller is expected to make this call.
pub fn allowed(group: &str, resource: &str, verb: &str) -> bool {
    API_CALLS
        .iter()
        .any(|&(g, r, v)| g == group && r == resource && v == verb)
}
