#!/usr/bin/env python3
"""Checks a resolved docker-compose model (`docker-compose config --format json`)
for what `config -q` does not: every `service_healthy` dependency has a
healthcheck, bind-mounted files exist, the edge nodes' config file exists,
every ROOMCAST_* variable is one `roomcast serve --help` knows, the stop grace
period covers the drain, and Prometheus and HAProxy name the services that
exist. Standard library only.

  compose_check.py MODEL.json --root REPO --help-text FILE --profile NAME
"""

import argparse
import json
import os
import re
import sys


def secs(v) -> float:
    if isinstance(v, (int, float)):
        return v / 1e9  # compose normalizes durations to nanoseconds in JSON
    m = re.fullmatch(r"([0-9.]+)(ms|s|m)", str(v))
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)] if m else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--root", required=True)
    ap.add_argument("--help-text", required=True)
    ap.add_argument("--profile", default="default")
    args = ap.parse_args()
    with open(args.model) as f:
        model = json.load(f)
    with open(args.help_text) as f:
        known_env = set(re.findall(r"ROOMCAST_[A-Z0-9_]+", f.read()))
    services = model["services"]
    problems = []

    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            if dep not in services:
                if cond.get("required", True):
                    problems.append(f"{name}: depends on missing service {dep}")
                continue
            if cond.get("condition") == "service_healthy" and not services[dep].get("healthcheck"):
                problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
        for vol in svc.get("volumes") or []:
            if vol.get("type") == "bind" and not os.path.exists(vol["source"]):
                problems.append(f"{name}: bind mount source {vol['source']} does not exist")

    edges = {n: s for n, s in services.items() if n.startswith("edge-")}
    if len(edges) != 3:
        problems.append(f"want 3 edge nodes, got {sorted(edges)}")
    for name, svc in edges.items():
        env = svc.get("environment") or {}
        for key in env:
            if key.startswith("ROOMCAST_") and key not in known_env:
                problems.append(f"{name}: {key} is not a `roomcast serve` variable")
        cfg = env.get("ROOMCAST_CONFIG", "")
        mounts = [v for v in svc.get("volumes") or [] if v.get("type") == "bind"]
        host = None
        for v in mounts:
            if cfg.startswith(v["target"].rstrip("/") + "/"):
                host = os.path.join(v["source"], cfg[len(v["target"].rstrip("/")) + 1:])
        if not host or not os.path.isfile(host):
            problems.append(f"{name}: ROOMCAST_CONFIG {cfg} is not a mounted file")
        else:
            with open(host) as f:
                text = f.read()
            m = re.search(r'^drain_window = "([0-9]+)s"', text, re.M)
            drain = int(m.group(1)) if m else 10
            grace = secs(svc.get("stop_grace_period", "10s"))
            if grace < drain + 5:
                problems.append(f"{name}: stop_grace_period {grace}s < drain_window {drain}s + 5s")
            if args.profile == "cluster" and "redis_cluster" not in text:
                problems.append(f"{name}: profile cluster but {cfg} is not the cluster config")
        hc = (svc.get("healthcheck") or {}).get("test") or []
        if not any("/readyz" in str(t) for t in hc):
            problems.append(f"{name}: healthcheck should probe /readyz")

    if args.profile == "cluster":
        for need in ("redis-c1", "redis-c2", "redis-c3", "redis-cluster-init"):
            if need not in services:
                problems.append(f"profile cluster lacks {need}")

    with open(os.path.join(args.root, "deploy/prometheus/prometheus.yml")) as f:
        prom = f.read()
    for name in edges:
        if f'"{name}:8080"' not in prom:
            problems.append(f"deploy/prometheus/prometheus.yml does not scrape {name}:8080")
    with open(os.path.join(args.root, "deploy/haproxy/haproxy.cfg")) as f:
        ha = f.read()
    for name in edges:
        if f"{name}:8080" not in ha:
            problems.append(f"deploy/haproxy/haproxy.cfg does not route to {name}:8080")
    for need in ("lb", "prometheus", "grafana", "redis"):
        if need not in services:
            problems.append(f"missing service {need}")

    print(f"profile {args.profile}: services {', '.join(sorted(services))}")
    for p in problems:
        print(f"FAIL {p}")
    if not problems:
        print("ok: healthchecks behind every service_healthy, mounts, edge config, env names, grace, targets")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
