//! The objects a BalancedService owns, as a pure function of the spec: the
//! proxy Deployment, its Service, ServiceAccount, Role and RoleBinding, and the
//! selector-less `<name>-healthy` Service. `balanced render` prints exactly
//! these; the controller applies exactly these.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext, Service, ServiceAccount,
    ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::api::config::{Config, ListenerProtocol};
use crate::api::{API_VERSION, BalancedService};

/// Port of the proxy's admin server inside the pod.
pub const ADMIN_PORT: u16 = 9901;
/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "balanced-controller";

/// Settings that come from the controller, not the spec.
#[derive(Clone, Debug)]
pub struct RenderOptions {
    /// Proxy container image.
    pub image: String,
    /// Proxy resources when the spec sets none.
    pub default_resources: Option<ResourceRequirements>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            image: format!("ghcr.io/balanced-dev/balanced:{}", env!("CARGO_PKG_VERSION")),
            default_resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_string(), Quantity("100m".into())),
                    ("memory".to_string(), Quantity("64Mi".into())),
                ])),
                limits: Some(BTreeMap::from([("memory".to_string(), Quantity("256Mi".into()))])),
                ..Default::default()
            }),
        }
    }
}

/// One owned object.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Owned {
    /// The proxy Deployment.
    Deployment(Box<Deployment>),
    /// The proxy Service or the `-healthy` Service.
    Service(Box<Service>),
    /// The proxy's ServiceAccount.
    ServiceAccount(Box<ServiceAccount>),
    /// Read access to its one BalancedService.
    Role(Box<Role>),
    /// Binds the Role to the ServiceAccount.
    RoleBinding(Box<RoleBinding>),
}

impl Owned {
    /// `Kind/name`, for logs.
    pub fn describe(&self) -> String {
        let (kind, meta) = match self {
            Owned::Deployment(o) => ("Deployment", &o.metadata),
            Owned::Service(o) => ("Service", &o.metadata),
            Owned::ServiceAccount(o) => ("ServiceAccount", &o.metadata),
            Owned::Role(o) => ("Role", &o.metadata),
            Owned::RoleBinding(o) => ("RoleBinding", &o.metadata),
        };
        format!("{kind}/{}", meta.name.as_deref().unwrap_or(""))
    }
}

/// Name of the proxy Deployment, Service, ServiceAccount, Role and RoleBinding.
pub fn proxy_name(bsvc: &str) -> String {
    format!("{bsvc}-proxy")
}

/// Name of the selector-less Service whose EndpointSlice lists healthy endpoints.
pub fn healthy_name(bsvc: &str) -> String {
    format!("{bsvc}-healthy")
}

/// Labels on every owned object; the selector uses name and instance.
pub fn labels(bsvc: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "balanced-proxy".to_string()),
        ("app.kubernetes.io/instance".to_string(), bsvc.to_string()),
        ("app.kubernetes.io/managed-by".to_string(), "balanced".to_string()),
    ])
}

fn selector(bsvc: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "balanced-proxy".to_string()),
        ("app.kubernetes.io/instance".to_string(), bsvc.to_string()),
    ])
}

/// The ownerReference that makes Kubernetes delete owned objects with the
/// BalancedService (absent when the object has no uid, as in `render` of a file).
pub fn owner_ref(bsvc: &BalancedService) -> Option<OwnerReference> {
    let uid = bsvc.metadata.uid.clone()?;
    Some(OwnerReference {
        api_version: API_VERSION.to_string(),
        kind: "BalancedService".to_string(),
        name: bsvc.metadata.name.clone().unwrap_or_default(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

fn meta(bsvc: &BalancedService, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: bsvc.metadata.namespace.clone().or_else(|| Some("default".into())),
        labels: Some(labels(bsvc.metadata.name.as_deref().unwrap_or(""))),
        owner_references: owner_ref(bsvc).map(|o| vec![o]),
        ..Default::default()
    }
}

/// Every object the controller applies for `bsvc` (whose validated form is `cfg`).
pub fn desired(bsvc: &BalancedService, cfg: &Config, opts: &RenderOptions) -> Vec<Owned> {
    let mut out = vec![
        Owned::ServiceAccount(Box::new(service_account(bsvc, cfg))),
        Owned::Role(Box::new(role(bsvc, cfg))),
        Owned::RoleBinding(Box::new(role_binding(bsvc, cfg))),
        Owned::Deployment(Box::new(deployment(bsvc, cfg, opts))),
        Owned::Service(Box::new(proxy_service(bsvc, cfg))),
    ];
    if cfg.publish_endpoint_slice {
        out.push(Owned::Service(Box::new(healthy_service(bsvc, cfg))));
    }
    out
}

fn service_account(bsvc: &BalancedService, cfg: &Config) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(bsvc, proxy_name(&cfg.key.name)),
        ..Default::default()
    }
}

fn role(bsvc: &BalancedService, cfg: &Config) -> Role {
    let secrets = cfg.secret_names();
    // Only the Secrets the spec names, each read by a watch on its name.
    let secret_rule = (!secrets.is_empty()).then(|| PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec!["secrets".into()]),
        resource_names: Some(secrets.into_iter().collect()),
        verbs: vec!["get".into(), "list".into(), "watch".into()],
        ..Default::default()
    });
    Role {
        metadata: meta(bsvc, proxy_name(&cfg.key.name)),
        rules: Some(
            [
                PolicyRule {
                    api_groups: Some(vec!["balanced.dev".into()]),
                    resources: Some(vec!["balancedservices".into()]),
                    resource_names: Some(vec![cfg.key.name.clone()]),
                    verbs: vec!["get".into(), "list".into(), "watch".into()],
                    ..Default::default()
                },
                // Health comes from the healthy slices (a list/watch by label
                // selector cannot be narrowed by name).
                PolicyRule {
                    api_groups: Some(vec!["discovery.k8s.io".into()]),
                    resources: Some(vec!["endpointslices".into()]),
                    verbs: vec!["list".into(), "watch".into()],
                    ..Default::default()
                },
            ]
            .into_iter()
            .chain(secret_rule)
            .collect(),
        ),
    }
}

fn role_binding(bsvc: &BalancedService, cfg: &Config) -> RoleBinding {
    let name = proxy_name(&cfg.key.name);
    RoleBinding {
        metadata: meta(bsvc, name.clone()),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: Some(cfg.key.namespace.clone()),
            ..Default::default()
        }]),
    }
}

fn deployment(bsvc: &BalancedService, cfg: &Config, opts: &RenderOptions) -> Deployment {
    let name = proxy_name(&cfg.key.name);
    let mut ports: Vec<ContainerPort> = cfg
        .listeners
        .iter()
        .map(|l| ContainerPort {
            name: Some(l.name.clone()),
            container_port: i32::from(l.port),
            protocol: Some("TCP".into()),
            ..Default::default()
        })
        .collect();
    ports.push(ContainerPort {
        name: Some("admin".into()),
        container_port: i32::from(ADMIN_PORT),
        protocol: Some("TCP".into()),
        ..Default::default()
    });
    let http_probe = |path: &str, period| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Default::default()
    };
    // The Secrets the proxy watches are written to memory, not the read-only
    // root: an emptyDir on tmpfs, as the kubelet keeps Secret volumes. Always
    // there, so naming a first Secret does not roll the pods for a volume.
    let secrets_dir = "/run/balanced/secrets";
    let container = Container {
        name: "proxy".into(),
        env: Some(vec![EnvVar {
            name: "BALANCED_SECRETS_DIR".into(),
            value: Some(secrets_dir.into()),
            ..Default::default()
        }]),
        volume_mounts: Some(vec![VolumeMount {
            name: "secrets".into(),
            mount_path: secrets_dir.into(),
            ..Default::default()
        }]),
        image: Some(opts.image.clone()),
        args: Some(vec![
            "proxy".into(),
            "--namespace".into(),
            cfg.key.namespace.clone(),
            "--name".into(),
            cfg.key.name.clone(),
            "--admin".into(),
            format!("0.0.0.0:{ADMIN_PORT}"),
            "--drain-delay".into(),
            "5s".into(),
        ]),
        ports: Some(ports),
        readiness_probe: Some(http_probe("/readyz", 2)),
        liveness_probe: Some(http_probe("/healthz", 10)),
        resources: bsvc
            .spec
            .proxy
            .resources
            .clone()
            .or_else(|| opts.default_resources.clone()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Deployment {
        metadata: meta(bsvc, name.clone()),
        spec: DeploymentSpec {
            replicas: Some(cfg.replicas as i32),
            selector: LabelSelector {
                match_labels: Some(selector(&cfg.key.name)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&cfg.key.name)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name),
                    // Drain delay (5s) plus the default 30s grace for in-flight requests.
                    termination_grace_period_seconds: Some(40),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "secrets".into(),
                        empty_dir: Some(EmptyDirVolumeSource {
                            medium: Some("Memory".into()),
                            size_limit: Some(Quantity("4Mi".into())),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

fn service_ports(cfg: &Config) -> Vec<ServicePort> {
    cfg.listeners
        .iter()
        .map(|l| ServicePort {
            name: Some(l.name.clone()),
            port: i32::from(l.port),
            target_port: Some(IntOrString::String(l.name.clone())),
            protocol: Some("TCP".into()),
            app_protocol: match l.protocol {
                ListenerProtocol::Http => Some("http".into()),
                ListenerProtocol::Tcp => None,
            },
            ..Default::default()
        })
        .collect()
}

fn proxy_service(bsvc: &BalancedService, cfg: &Config) -> Service {
    Service {
        metadata: meta(bsvc, proxy_name(&cfg.key.name)),
        spec: Some(ServiceSpec {
            selector: Some(selector(&cfg.key.name)),
            ports: Some(service_ports(cfg)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn healthy_service(bsvc: &BalancedService, cfg: &Config) -> Service {
    let mut ports = service_ports(cfg);
    for p in &mut ports {
        // Selector-less: endpoints come from our EndpointSlice, ports by name.
        p.target_port = None;
    }
    Service {
        metadata: meta(bsvc, healthy_name(&cfg.key.name)),
        spec: Some(ServiceSpec {
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Multi-document YAML of `objects`, each with apiVersion and kind.
pub fn to_yaml(objects: &[Owned]) -> String {
    let mut out = String::new();
    for o in objects {
        let value = match o {
            Owned::Deployment(d) => with_type::<Deployment>(d),
            Owned::Service(s) => with_type::<Service>(s),
            Owned::ServiceAccount(s) => with_type::<ServiceAccount>(s),
            Owned::Role(r) => with_type::<Role>(r),
            Owned::RoleBinding(r) => with_type::<RoleBinding>(r),
        };
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&value).expect("objects are plain data"));
    }
    out
}

fn with_type<K: k8s_openapi::Resource + Serialize>(o: &K) -> serde_json::Value {
    // k8s-openapi's Serialize writes apiVersion and kind itself.
    serde_json::to_value(o).expect("objects are plain data")
}

/// The groups and routes the proxies will use, as YAML comments ahead of the
/// objects (they live in the BalancedService, not in any object applied).
fn routing_comment(cfg: &crate::api::config::Config) -> String {
    if cfg.backends.is_empty() && cfg.routes.is_empty() {
        return String::new();
    }
    let source = |service: &Option<String>, endpoints: usize| match (service, endpoints) {
        (Some(s), 0) => format!("Service {s}"),
        (Some(s), n) => format!("Service {s} + {n} static"),
        (None, n) => format!("{n} static"),
    };
    let mut out = format!(
        "# {}: backends
",
        cfg.key
    );
    out.push_str(&format!(
        "#   default: {}
",
        source(&cfg.service, cfg.endpoints.len())
    ));
    for b in &cfg.backends {
        out.push_str(&format!(
            "#   {}: {}
",
            b.name,
            source(&b.service, b.endpoints.len())
        ));
    }
    if !cfg.routes.is_empty() {
        out.push_str(&format!(
            "# {}: routes, first match wins, else default
",
            cfg.key
        ));
        for r in &cfg.routes {
            let refs: Vec<String> = r
                .refs
                .iter()
                .map(|b| format!("{} ({})", cfg.group_name(b.group), b.weight))
                .collect();
            let matches = match r.matches.len() {
                0 => "every request".to_string(),
                1 => "1 match".to_string(),
                n => format!("{n} matches"),
            };
            out.push_str(&format!(
                "#   {}: {matches} -> {}
",
                r.name,
                refs.join(", ")
            ));
        }
    }
    out
}

/// `balanced render`: the objects for every BalancedService in a YAML text.
pub fn render(text: &str, opts: &RenderOptions) -> Result<String, crate::api::LoadErrors> {
    let docs = crate::api::parse_documents(text)?;
    let mut out = String::new();
    let mut errors = Vec::new();
    for doc in docs {
        match crate::api::validate(doc.key.clone(), &doc.spec) {
            Ok(cfg) => {
                let mut bsvc = BalancedService::new(&doc.key.name, doc.spec.clone());
                bsvc.metadata.namespace = Some(doc.key.namespace.clone());
                // With the uid, the objects carry the ownerReferences the
                // controller would set; without it there is nothing to own them.
                bsvc.metadata.uid = doc.uid.clone();
                out.push_str(&routing_comment(&cfg));
                out.push_str(&to_yaml(&desired(&bsvc, &cfg, opts)));
            }
            Err(errs) => errors.extend(errs.0.into_iter().map(|error| crate::api::LoadError::Invalid {
                index: doc.index,
                key: doc.key.clone(),
                error,
            })),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(crate::api::LoadErrors(errors))
    }
}
