#!/usr/bin/env python3
"""Checks the Helm chart with real Helm (helm-python-sdk: Helm v4's Go SDK) and
the examples against the CRD schema.

- lint reports no errors;
- the chart renders with default and with non-default values, and every
  rendered object validates against the Kubernetes schemas (kubernetes-validate,
  strict: unknown fields fail);
- values.schema.json rejects bad values;
- every example validates against the CRD's openAPIV3Schema;
- the `docker run` flags tests/image/run.sh runs the image with say what the
  chart's controller pod and the controller's proxy pods (`balanced render`)
  ask of their containers, neither more nor less.
Exits non-zero on any failure; prints 'N passed, N failed'.
"""
import json
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile

import helm_python
import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "balanced"
K8S_VERSION = "1.33.0"
results = []


def check(name, fn):
    try:
        fn()
        results.append((name, None))
        print(f"ok    {name}")
    except Exception as e:  # noqa: BLE001 - report every failure, keep going
        results.append((name, e))
        print(f"FAIL  {name}: {e}")


def render(values):
    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(values, name="balanced", namespace="balanced-system", is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs, out


def validate_objects(values, expect_kinds):
    docs, _ = render(values)
    kinds = sorted({d["kind"] for _, d in docs})
    missing = set(expect_kinds) - set(kinds)
    assert not missing, f"kinds missing from render: {missing} (got {kinds})"
    for path, doc in docs:
        if doc["apiVersion"].startswith("balanced.dev/"):
            # Our CRD's kind: tls_values_example checks it against the CRD schema.
            continue
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # Not a Kubernetes built-in: checked for shape only.
            assert doc["spec"]["endpoints"][0]["port"] == "metrics", path
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


NON_DEFAULT = {
    "replicaCount": 3,
    "image": {"repository": "registry.example/balanced", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "leaderElection": {"enabled": False, "leaseDuration": "30s"},
    "proxy": {"image": "registry.example/balanced:1.2.3", "resources": {"requests": {"cpu": "50m"}}},
    "logFormat": "text",
    "serviceAccount": {"create": True, "name": "balanced-sa", "annotations": {"example.com/role": "x"}},
    "podDisruptionBudget": {"enabled": False},
    "metrics": {"port": 9102, "service": {"enabled": True}, "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
    "podAnnotations": {"example.com/scrape": "true"},
}


def lint():
    report = helm_python.lint(str(CHART), strict=True)
    # Helm's severities: 1 info, 2 warning, 4 error.
    errors = list(report.get("errors") or []) + [m for m in report.get("messages", []) if m.get("severity", 0) >= 4]
    assert report.get("total_charts_linted") == 1, json.dumps(report)
    assert not errors, f"lint errors: {errors}"


def bad_values_rejected():
    for bad in ({"replicaCount": 0}, {"logFormat": "xml"}, {"metrics": {"port": 70000}}, {"unknownKey": 1},
                {"xds": {"enabled": "yes"}}, {"xds": {"port": 0}},
                {"leaderElection": {"leaseDuration": "15 seconds"}}):
        try:
            render(bad)
        except Exception:  # noqa: BLE001
            continue
        raise AssertionError(f"values accepted but should fail the schema: {bad}")


def defaults_render():
    docs, out = render(None)
    deployment = next(d for _, d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BALANCED_PROXY_IMAGE"].startswith("ghcr.io/balanced-dev/balanced:"), env
    json.loads(env["BALANCED_PROXY_RESOURCES"])
    notes = next(t for p, t in out.items() if p.endswith("NOTES.txt"))
    assert "kubectl get bsvc -w" in notes


def xds_renders():
    docs, _ = render(None)
    assert not any(d["kind"] == "Service" and d["metadata"]["name"].endswith("-xds") for _, d in docs)
    docs, _ = render({"xds": {"enabled": True, "port": 18001}})
    svc = next(d for _, d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-xds"))
    assert svc["spec"]["ports"][0]["port"] == 18001 and svc["spec"]["ports"][0]["targetPort"] == "xds", svc
    deployment = next(d for _, d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--xds=0.0.0.0:18001" in container["args"], container["args"]
    assert {"name": "xds", "containerPort": 18001, "protocol": "TCP"} in container["ports"], container["ports"]
    validate_objects({"xds": {"enabled": True}}, ["Deployment", "Service"])


def tls_values_example():
    """charts/balanced/examples/tls-values.yaml renders a BalancedService the
    CRD accepts and `balanced validate` passes, with its listener's Secret."""
    values = yaml.safe_load((CHART / "examples" / "tls-values.yaml").read_text())
    docs, _ = render(values)
    services = [d for _, d in docs if d["kind"] == "BalancedService"]
    assert len(services) == 1, services
    bsvc = services[0]
    assert bsvc["metadata"]["namespace"] == "balanced-system", bsvc["metadata"]
    crd = yaml.safe_load((ROOT / "crds" / "balancedservices.balanced.dev.yaml").read_text())
    jsonschema.validate(bsvc, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    https = bsvc["spec"]["listeners"][0]
    assert https["tls"]["secretName"] == "shop-tls", https
    binary = ROOT / "target" / "debug" / "balanced"
    assert binary.exists(), f"{binary} is missing: build it first (cargo build)"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(bsvc, f)
        f.flush()
        out = subprocess.run([str(binary), "render", "-f", f.name], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    role = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Role")
    granted = [r for r in role["rules"] if r["resources"] == ["secrets"]]
    assert granted and granted[0]["resourceNames"] == ["internal-ca", "shop-tls"], role["rules"]
    # The rest of the release is unchanged by it.
    validate_objects(values, ["Deployment", "ClusterRole"])


def examples_match_crd():
    crd = yaml.safe_load((ROOT / "crds" / "balancedservices.balanced.dev.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    count = 0
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                jsonschema.validate(doc, schema)
                count += 1
    assert count >= 4, f"only {count} examples"
    bad = {"apiVersion": "balanced.dev/v1alpha1", "kind": "BalancedService", "metadata": {"name": "x"},
           "spec": {"service": "web", "listeners": [{"name": "http", "port": 70000}]}}
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError:
        return
    raise AssertionError("the CRD schema accepted port 70000")


def docker_flags(pod_spec):
    """The `docker run` flags that impose what `pod_spec` asks of its first container."""
    container = pod_spec["containers"][0]
    pod_sc = pod_spec.get("securityContext", {})
    sc = container.get("securityContext", {})
    flags = []
    if sc.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    if user is not None:
        flags += ["--user", f"{user}:{group if group is not None else user}"]
    for cap in sc.get("capabilities", {}).get("drop", []):
        flags += ["--cap-drop", cap]
    if sc.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    # A writable place the pod mounts is a tmpfs for `docker run`.
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        if "emptyDir" in volumes.get(m["name"], {}):
            flags += ["--tmpfs", m["mountPath"]]
    return flags


def image_test_flags():
    text = (ROOT / "tests" / "image" / "run.sh").read_text()
    m = re.search(r"^POD_FLAGS=\((.*)\)$", text, re.M)
    assert m, "tests/image/run.sh defines no POD_FLAGS=(...)"
    return shlex.split(m.group(1))


def image_test_runs_as_the_pods_do():
    flags = image_test_flags()
    docs, _ = render(None)
    controller = next(d for _, d in docs if d["kind"] == "Deployment")
    want = docker_flags(controller["spec"]["template"]["spec"])
    assert flags == want, f"tests/image/run.sh runs with {flags}, the chart's pod asks for {want}"
    binary = ROOT / "target" / "debug" / "balanced"
    assert binary.exists(), f"{binary} is missing: build it first (cargo build)"
    out = subprocess.run([str(binary), "render", "-f", str(ROOT / "examples" / "web.yaml")],
                         check=True, capture_output=True, text=True).stdout
    proxy = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment")
    want = docker_flags(proxy["spec"]["template"]["spec"])
    assert flags == want, f"tests/image/run.sh runs with {flags}, the proxy pods ask for {want}"


check("helm lint (strict) reports no errors", lint)
check("default values render valid Kubernetes objects",
      lambda: validate_objects(None, ["Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                      "Role", "RoleBinding", "PodDisruptionBudget", "Service"]))
check("non-default values render valid Kubernetes objects",
      lambda: validate_objects(NON_DEFAULT, ["Deployment", "ServiceAccount", "ClusterRole", "ServiceMonitor"]))
check("defaults: restricted container, proxy image and resources passed, NOTES", defaults_render)
check("values.schema.json rejects bad values", bad_values_rejected)
check("examples validate against the CRD schema", examples_match_crd)
check("the TLS values example renders a BalancedService the CRD and balanced accept", tls_values_example)
check("xds.enabled adds the flag, the container port and a Service", xds_renders)
check("tests/image/run.sh runs the image as the chart's and the proxies' pods", image_test_runs_as_the_pods_do)

failed = [n for n, e in results if e]
print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
