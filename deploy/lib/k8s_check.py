#!/usr/bin/env python3
"""Checks `helm template` output beyond schema validity (needs PyYAML, which
kubernetes-validate brings into the tools venv).

  k8s_check.py RENDERED.yaml --out DIR --help-text FILE --rules FILE [--dashboard FILE]

Writes into DIR:
  core.yaml            every manifest of a kind with a Kubernetes schema (for kubernetes-validate)
  roomcast.toml        the ConfigMap's config file (the real binary is run on it afterwards)
  prometheusrule.yml   the PrometheusRule's groups as a Prometheus rule file (for promtool)
and checks what the schemas cannot: probes on /readyz and /healthz, the grace
period covers preStop + drain_window + 5 s, the hardened securityContext,
every ROOMCAST_* variable is one `roomcast serve --help` knows, selectors
match the pod labels, the ServiceMonitor (a CRD without a schema here) points
at the Service's port, the PrometheusRule carries exactly the repository's
rules plus the capacity rule for config.limits.max_connections, and the
dashboard ConfigMap is the repository's dashboard.
"""

import argparse
import json
import os
import re
import sys

import yaml

CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def seconds(d: str) -> float:
    m = re.fullmatch(r"([0-9]+)(ms|s|m)", d)
    if not m:
        raise ValueError(f"unsupported duration {d!r}")
    n, unit = int(m.group(1)), m.group(2)
    return {"ms": n / 1000, "s": n, "m": n * 60}[unit]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--out", required=True)
    ap.add_argument("--help-text", required=True, help="output of `roomcast serve --help`")
    ap.add_argument("--rules", required=True, help="deploy/prometheus/rules/roomcast.rules.yml")
    ap.add_argument("--dashboard", default="")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    with open(args.rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    with open(args.help_text) as f:
        known_env = set(re.findall(r"ROOMCAST_[A-Z0-9_]+", f.read()))
    problems = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    core = [d for d in docs if (d.get("apiVersion"), d.get("kind")) not in CRD_KINDS]
    with open(os.path.join(args.out, "core.yaml"), "w") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)
    skipped = sorted({d["kind"] for d in docs if (d.get("apiVersion"), d.get("kind")) in CRD_KINDS})

    # ---- ConfigMap -> roomcast.toml
    cms = [c for c in by_kind.get("ConfigMap", []) if "roomcast.toml" in c.get("data", {})]
    if len(cms) != 1:
        problems.append(f"want one ConfigMap with roomcast.toml, got {len(cms)}")
        toml = ""
    else:
        toml = cms[0]["data"]["roomcast.toml"]
        with open(os.path.join(args.out, "roomcast.toml"), "w") as f:
            f.write(toml)
    m = re.search(r'^drain_window = "([^"]+)"', toml, re.M)
    drain = seconds(m.group(1)) if m else 10
    m = re.search(r"^max_connections = ([0-9]+)", toml, re.M)
    cap = int(m.group(1)) if m else 20000

    # ---- Deployment
    deps = by_kind.get("Deployment", [])
    if len(deps) != 1:
        problems.append(f"want one Deployment, got {len(deps)}")
        return report(problems, skipped)
    dep = deps[0]
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    pod_labels = pod["metadata"]["labels"]
    c = spec["containers"][0]
    if c["readinessProbe"]["httpGet"]["path"] != "/readyz":
        problems.append("readinessProbe is not GET /readyz")
    if c["livenessProbe"]["httpGet"]["path"] != "/healthz":
        problems.append("livenessProbe is not GET /healthz")
    pre = c.get("lifecycle", {}).get("preStop", {})
    pre_s = 0
    if "sleep" in pre:
        pre_s = int(pre["sleep"]["seconds"])
    elif "exec" in pre:
        pre_s = int(pre["exec"]["command"][-1])
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace < pre_s + drain + 5:
        problems.append(f"terminationGracePeriodSeconds {grace} < preStop {pre_s} + drain_window {drain} + 5")
    sc = c.get("securityContext", {})
    psc = spec.get("securityContext", {})
    if not (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False):
        problems.append("container securityContext must set readOnlyRootFilesystem and no privilege escalation")
    if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        problems.append("pod must run as non-root")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problems.append("container must drop ALL capabilities")
    for e in c.get("env", []):
        n = e["name"]
        if n.startswith("ROOMCAST_") and n != "ROOMCAST_REDIS_PASSWORD" and n not in known_env:
            problems.append(f"env {n} is not a `roomcast serve` variable")
    if not c.get("resources", {}).get("requests"):
        problems.append("container has no resource requests")
    port_names = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if port_names.get("http") != 8080:
        problems.append("container port http must be 8080 (ROOMCAST_LISTEN)")
    if dep["spec"]["selector"]["matchLabels"].items() - pod_labels.items():
        problems.append("Deployment selector does not match the pod labels")

    # ---- Service, HPA, PDB, Ingress
    svcs = by_kind.get("Service", [])
    svc = svcs[0] if svcs else None
    if not svc or svc["spec"]["selector"].items() - pod_labels.items():
        problems.append("Service selector does not match the pod labels")
    for h in by_kind.get("HorizontalPodAutoscaler", []):
        ref = h["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) != ("Deployment", dep["metadata"]["name"]):
            problems.append("HPA does not target the Deployment")
        if "replicas" in dep["spec"]:
            problems.append("Deployment sets replicas while an HPA scales it")
    for p in by_kind.get("PodDisruptionBudget", []):
        if p["spec"]["selector"]["matchLabels"].items() - pod_labels.items():
            problems.append("PDB selector does not match the pod labels")
    for ing in by_kind.get("Ingress", []):
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                b = path["backend"]["service"]
                if svc and b["name"] != svc["metadata"]["name"]:
                    problems.append("Ingress backend is not the Service")

    # ---- ServiceMonitor (CRD: structural checks)
    for sm in by_kind.get("ServiceMonitor", []):
        if not svc or sm["spec"]["selector"]["matchLabels"].items() - svc["metadata"]["labels"].items():
            problems.append("ServiceMonitor selector does not match the Service labels")
        svc_ports = {p["name"] for p in (svc or {}).get("spec", {}).get("ports", [])}
        for ep in sm["spec"]["endpoints"]:
            if ep.get("port") not in svc_ports or ep.get("path", "/metrics") != "/metrics":
                problems.append("ServiceMonitor endpoint is not the Service's http port on /metrics")
        job_label = sm["spec"].get("jobLabel")
        if job_label and "roomcast" not in svc["metadata"]["labels"].get(job_label, ""):
            problems.append("ServiceMonitor jobLabel does not yield a job matching .*roomcast.*")

    # ---- PrometheusRule (CRD): the repository's rules + the capacity rule
    for pr in by_kind.get("PrometheusRule", []):
        groups = pr["spec"]["groups"]
        with open(os.path.join(args.out, "prometheusrule.yml"), "w") as f:
            yaml.safe_dump({"groups": groups}, f, sort_keys=False)
        with open(args.rules) as f:
            repo = yaml.safe_load(f)["groups"]
        if groups[: len(repo)] != repo:
            problems.append("PrometheusRule groups differ from deploy/prometheus/rules/roomcast.rules.yml")
        cap_rules = [r for g in groups[len(repo):] for r in g["rules"]]
        want = f"sum without (transport) (roomcast_connections) * 0 + {cap}"
        if [(r.get("record"), r.get("expr")) for r in cap_rules] != [
                ("instance:roomcast_connections_max:configured", want)]:
            problems.append(f"capacity rule is not {want!r}: {cap_rules}")

    # ---- Grafana dashboard ConfigMap
    if args.dashboard:
        for cm in by_kind.get("ConfigMap", []):
            if "roomcast.json" in cm.get("data", {}):
                with open(args.dashboard) as f:
                    if json.loads(cm["data"]["roomcast.json"]) != json.load(f):
                        problems.append("dashboard ConfigMap differs from deploy/grafana/dashboards/roomcast.json")

    kinds = ", ".join(f"{k}×{len(v)}" if len(v) > 1 else k for k, v in sorted(by_kind.items()))
    print(f"rendered: {kinds}")
    return report(problems, skipped)


def report(problems, skipped):
    if skipped:
        print(f"no Kubernetes schema for CRD kinds {', '.join(skipped)}: checked structurally here "
              f"(and PrometheusRule's rules with promtool)")
    for p in problems:
        print(f"FAIL {p}")
    if not problems:
        print("ok: probes, grace period, securityContext, env names, selectors, CRD contents")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
