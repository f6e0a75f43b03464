//! Opt-in: the controller scenarios against a real cluster (kind, k3d, ...).
//!
//! Ignored by default, so `cargo test` never reports it as passed when no
//! cluster was there: run it with
//! `BALANCED_E2E_KUBECONFIG=~/.kube/config cargo test --test e2e_cluster -- --ignored`.
//! The controller runs in this process unless
//! `BALANCED_E2E_CONTROLLER=external` (one installed with Helm), so pod IPs
//! must be reachable from here in the in-process case (kind on Linux: yes).

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use serde_json::json;

use balanced::api::BalancedService;
use balanced::testing::eventually;

async fn client() -> Client {
    let path = std::env::var("BALANCED_E2E_KUBECONFIG")
        .expect("BALANCED_E2E_KUBECONFIG must name a kubeconfig for the cluster tests");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("readable kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("usable kubeconfig");
    Client::try_from(config).expect("client")
}

fn ready_of(b: &BalancedService) -> Option<(String, String)> {
    let c = b.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real cluster: BALANCED_E2E_KUBECONFIG=PATH cargo test --test e2e_cluster -- --ignored"]
async fn e2e_balanced_service_lifecycle() {
    let client = client().await;
    let ssa = PatchParams::apply("balanced-e2e").force();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "balancedservices.balanced.dev",
        &ssa,
        &Patch::Apply(BalancedService::crd()),
    )
    .await
    .expect("CRD applied");
    eventually(Duration::from_secs(30), "the CRD to be established", || {
        let crds = crds.clone();
        async move {
            let crd = crds.get("balancedservices.balanced.dev").await.ok()?;
            let established = crd
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        }
    })
    .await;

    let ns = format!("balanced-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .expect("namespace");

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let web = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "nginx:alpine",
                                                        "ports": [{"name": "http", "containerPort": 80}]}]}}}});
    deployments
        .patch("web", &ssa, &Patch::Apply(&web))
        .await
        .expect("web deployment");
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}});
    services
        .patch("web", &ssa, &Patch::Apply(&svc))
        .await
        .expect("web service");

    let stop = tokio_util::sync::CancellationToken::new();
    if std::env::var("BALANCED_E2E_CONTROLLER").as_deref() != Ok("external") {
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let opts = balanced::controller::leading::ControllerOptions {
            render: Default::default(),
            lease: None,
            max_endpoints_per_slice: 100,
        };
        tokio::spawn(balanced::controller::leading::serve(
            client.clone(),
            opts,
            admin,
            None,
            stop.clone(),
        ));
    }

    let bsvcs: Api<BalancedService> = Api::namespaced(client.clone(), &ns);
    let spec = json!({"apiVersion": "balanced.dev/v1alpha1", "kind": "BalancedService", "metadata": {"name": "web"},
        "spec": {"service": "web", "listeners": [{"name": "http", "port": 8080, "targetPort": "http"}],
                 "healthCheck": {"protocol": "HTTP", "interval": "1s", "timeout": "500ms", "http": {"path": "/"}}}});
    bsvcs
        .patch("web", &ssa, &Patch::Apply(&spec))
        .await
        .expect("BalancedService applied");

    let ready = |want: &'static str| {
        let bsvcs = bsvcs.clone();
        move || {
            let bsvcs = bsvcs.clone();
            async move {
                let b = bsvcs.get("web").await.ok()?;
                (b.status.as_ref()?.ready.as_deref() == Some(want)
                    && ready_of(&b) == Some(("True".into(), "EndpointsHealthy".into())))
                .then_some(())
            }
        }
    };
    eventually(Duration::from_secs(120), "2/2 ready", ready("2/2")).await;
    assert!(
        deployments.get_opt("web-proxy").await.unwrap().is_some(),
        "proxy Deployment"
    );

    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(120), "3/3 ready", ready("3/3")).await;

    bsvcs
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"retry": {"tries": -1}}})),
        )
        .await
        .ok(); // The CRD schema may reject it outright: that is also correct.

    bsvcs.delete("web", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(60), "owned objects removed", || {
        let deployments = deployments.clone();
        async move { deployments.get_opt("web-proxy").await.ok()?.is_none().then_some(()) }
    })
    .await;
    stop.cancel();
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}
