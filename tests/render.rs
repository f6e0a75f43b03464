//! `balanced render` output is a visible diff: golden files under tests/golden.

use balanced::controller::desired::{RenderOptions, render};

fn check(example: &str, golden: &str) {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/examples/{example}")).unwrap();
    let opts = RenderOptions {
        image: "balanced:test".into(),
        ..RenderOptions::default()
    };
    let rendered = render(&text, &opts).unwrap();
    let path = format!("{root}/tests/golden/{golden}");
    if std::env::var_os("BALANCED_BLESS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        rendered == expected,
        "{path} differs from the rendered objects; review and rerun with BALANCED_BLESS=1\n{rendered}"
    );
}

#[test]
fn web_example_renders_the_golden_objects() {
    check("web.yaml", "web.yaml");
}

#[test]
fn proxy_runs_restricted_with_probes_on_the_admin_port() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/web.yaml")).unwrap();
    let out = render(&text, &RenderOptions::default()).unwrap();
    for needle in [
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "- ALL",
        "type: RuntimeDefault",
        "path: /readyz",
        "path: /healthz",
        "resourceNames:\n  - web",
        "name: web-healthy",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
}

#[test]
fn a_uid_in_the_file_gives_every_object_an_owner_reference() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/web.yaml")).unwrap();
    let without = render(&text, &RenderOptions::default()).unwrap();
    assert!(
        !without.contains("ownerReferences"),
        "no uid, nothing to own the objects"
    );

    let uid = "5f0c3f5e-1111-4222-8333-944455556666";
    let with_uid = text.replacen("metadata:\n", &format!("metadata:\n  uid: {uid}\n"), 1);
    assert_ne!(with_uid, text, "the example has a metadata block to add the uid to");
    let out = render(&with_uid, &RenderOptions::default()).unwrap();
    let objects: Vec<serde_json::Value> = serde_saphyr::from_multiple(&out).unwrap();
    assert!(objects.len() >= 4, "{out}");
    for o in &objects {
        let owners = o["metadata"]["ownerReferences"].as_array();
        let owner = owners
            .and_then(|r| r.first())
            .unwrap_or_else(|| panic!("no ownerReferences on {o}"));
        assert_eq!(owner["uid"], uid, "{o}");
        assert_eq!(owner["kind"], "BalancedService", "{o}");
        assert_eq!(owner["name"], "web", "{o}");
        assert_eq!(owner["controller"], true, "{o}");
    }
}

#[test]
fn render_names_the_groups_and_routes() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/web.yaml")).unwrap();
    let with_routes = text.replacen(
        "spec:\n",
        "spec:\n  backends: [{name: canary, service: web-canary}]\n  routes:\n    - {name: beta, matches: [{headers: [{name: x-beta, value: 'yes'}]}], backendRefs: [{name: default, weight: 90}, {name: canary, weight: 10}]}\n",
        1,
    );
    let out = render(&with_routes, &RenderOptions::default()).unwrap();
    for needle in [
        "# shop/web: backends\n#   default: Service web\n#   canary: Service web-canary\n",
        "#   beta: 1 match -> default (90), canary (10)\n",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
    let objects: Vec<serde_json::Value> = serde_saphyr::from_multiple(&out).unwrap();
    assert!(objects.len() >= 4, "the comments leave the objects as they were");
}

#[test]
fn a_spec_naming_secrets_grants_the_proxy_exactly_those_by_name() {
    let text = "apiVersion: balanced.dev/v1alpha1\nkind: BalancedService\nmetadata: {name: web, namespace: shop}\nspec:\n  service: web\n  listeners: [{name: https, port: 8443, tls: {certificates: [{secretName: site-a}, {secretName: site-b}]}}]\n  backendTLS: {hostname: api.internal, caSecretName: internal-ca}\n";
    let out = render(text, &RenderOptions::default()).unwrap();
    let objects: Vec<serde_json::Value> = serde_saphyr::from_multiple(&out).unwrap();
    let role = objects.iter().find(|o| o["kind"] == "Role").unwrap();
    let secrets = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resources"][0] == "secrets")
        .unwrap_or_else(|| panic!("no secrets rule in {role}"));
    assert_eq!(
        secrets["resourceNames"],
        serde_json::json!(["internal-ca", "site-a", "site-b"])
    );
    assert_eq!(secrets["verbs"], serde_json::json!(["get", "list", "watch"]));
    let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"][0]["emptyDir"]["medium"], "Memory");
    let container = &pod["containers"][0];
    assert_eq!(container["volumeMounts"][0]["mountPath"], "/run/balanced/secrets");
    assert_eq!(container["env"][0]["name"], "BALANCED_SECRETS_DIR");

    // Without Secrets the Role grants none.
    let plain = text
        .replace(
            "tls: {certificates: [{secretName: site-a}, {secretName: site-b}]}",
            "protocol: TCP",
        )
        .replace(
            "  backendTLS: {hostname: api.internal, caSecretName: internal-ca}\n",
            "",
        );
    let plain = render(&plain, &RenderOptions::default()).unwrap();
    assert!(!plain.contains("- secrets"), "{plain}");
}
