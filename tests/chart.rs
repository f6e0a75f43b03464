//! The Helm chart against the code: same CRD bytes, and RBAC that grants
//! exactly the API calls the controller makes.

use std::collections::BTreeSet;

use balanced::controller::rbac::API_CALLS;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn chart_crd_is_the_same_bytes_as_crds_dir() {
    let root = std::fs::read(format!("{ROOT}/crds/balancedservices.balanced.dev.yaml")).unwrap();
    let chart = std::fs::read(format!(
        "{ROOT}/charts/balanced/crds/balancedservices.balanced.dev.yaml"
    ))
    .unwrap();
    assert!(
        root == chart,
        "charts/balanced/crds differs from crds/: copy crds/ into the chart"
    );
}

/// `rules:` of a template, parsed (the rules themselves carry no templating).
fn rules(template: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(format!("{ROOT}/charts/balanced/templates/{template}")).unwrap();
    let mut out = Vec::new();
    for doc in text.split("\n---") {
        if let Some(start) = doc.find("\nrules:") {
            let block: String = doc[start + 1..]
                .lines()
                .take_while(|l| !l.starts_with("{{") && !l.starts_with("---"))
                .collect::<Vec<_>>()
                .join("\n");
            let parsed: serde_json::Value = serde_saphyr::from_str(&block).unwrap();
            out.extend(parsed["rules"].as_array().unwrap().iter().cloned());
        }
    }
    out
}

#[test]
fn chart_rbac_grants_exactly_the_controllers_api_calls() {
    let mut granted = BTreeSet::new();
    for rule in rules("clusterrole.yaml")
        .into_iter()
        .chain(rules("leader-election.yaml"))
    {
        let strs = |k: &str| -> Vec<String> {
            rule[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        for g in strs("apiGroups") {
            for r in strs("resources") {
                for v in strs("verbs") {
                    granted.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    let needed: BTreeSet<(String, String, String)> = API_CALLS
        .iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    let extra: Vec<_> = granted.difference(&needed).collect();
    let missing: Vec<_> = needed.difference(&granted).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "chart grants extra {extra:?}, lacks {missing:?}"
    );
}
