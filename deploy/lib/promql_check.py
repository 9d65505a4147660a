#!/usr/bin/env python3
"""Runs every PromQL expression of the Grafana dashboard and of the alert and
recording rules against a real Prometheus that scrapes real roomcast nodes,
and fails on an expression that errors or that names a metric the nodes do
not export. Standard library only.

  promql_check.py --prom http://127.0.0.1:9090 --dashboard deploy/grafana/dashboards/roomcast.json \
      --expect-groups roomcast.recording,roomcast.alerts,roomcast.capacity

The rules are read back from Prometheus (/api/v1/rules), i.e. exactly what it
loaded from the repository's rule files, with its own evaluation health.
Dashboard panels must also return data (a panel that is empty against a
cluster with traffic names the wrong thing). The checker checks itself first:
an expression naming a metric that does not exist must be caught.
"""

import argparse
import json
import re
import sys
import urllib.parse
import urllib.request

FUNCTIONS_AND_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "atan2", "start", "end",
}
# Grafana's variables, as a viewer would have them on "All".
GRAFANA_VARS = {
    "__rate_interval": "2m", "__interval": "15s", "__range": "5m", "job": ".+", "instance": ".+",
}


def api(prom: str, path: str, **params):
    url = f"{prom}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    if body.get("status") != "success":
        raise RuntimeError(f"{path}: {body}")
    return body["data"]


def query(prom: str, expr: str):
    """(result, error): Prometheus' own error text on a bad expression."""
    try:
        return api(prom, "/api/v1/query", query=expr), None
    except urllib.error.HTTPError as e:
        try:
            return None, json.load(e).get("error", str(e))
        except ValueError:
            return None, str(e)


def metric_names(expr: str):
    """The metric names an expression selects (a small lexer, not a parser)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)                                            # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                                           # ranges, subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)", s):
        tok = m.group(1)
        rest = s[m.end():].lstrip()
        if rest.startswith("("):          # a function call
            continue
        if tok.lower() in FUNCTIONS_AND_KEYWORDS:
            continue
        names.add(tok)
    return names


def grafana_expand(expr: str) -> str:
    def sub(m):
        name = m.group(1) or m.group(2)
        if name not in GRAFANA_VARS:
            raise KeyError(f"unknown dashboard variable ${name}")
        return GRAFANA_VARS[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)


def dashboard_queries(dash):
    """(where, expr, must_return_data) for every panel target and variable query."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p.get('title')!r} [{t.get('refId')}]", t["expr"], True))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", q or "")
        if m:
            out.append((f"variable ${var['name']}", m.group(1), True))
        elif q:
            out.append((f"variable ${var['name']}", q, True))
    return out


class Checker:
    def __init__(self, prom, exported, recorded):
        self.prom = prom
        self.exported = exported
        self.recorded = recorded
        self.failures = []
        self.count = 0

    def check(self, where, expr, must_return_data):
        self.count += 1
        problems = []
        try:
            expanded = grafana_expand(expr)
        except KeyError as e:
            self.failures.append(f"{where}: {e}")
            return False
        names = metric_names(expanded)
        missing = sorted(n for n in names if n not in self.exported and n not in self.recorded)
        if missing:
            problems.append(f"names metrics the nodes do not export: {', '.join(missing)}")
        if not names:
            problems.append("selects no metric")
        data, err = query(self.prom, expanded)
        if err:
            problems.append(f"Prometheus refuses it: {err}")
        elif must_return_data and not data["result"]:
            problems.append("returns no data against a cluster with traffic")
        if problems:
            self.failures.append(f"{where}: {expanded}\n      " + "\n      ".join(problems))
            return False
        return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prom", required=True)
    ap.add_argument("--dashboard", required=True)
    ap.add_argument("--expect-groups", default="")
    args = ap.parse_args()
    prom = args.prom.rstrip("/")

    exported = set(api(prom, "/api/v1/label/__name__/values"))
    roomcast = sorted(n for n in exported if n.startswith("roomcast_"))
    print(f"metrics exported by the nodes (as scraped): {len(roomcast)} roomcast_* names")

    groups = api(prom, "/api/v1/rules")["groups"]
    recorded = {r["name"] for g in groups for r in g["rules"] if r["type"] == "recording"}
    loaded = {g["name"] for g in groups}
    ck = Checker(prom, exported, recorded)

    # The checker must catch what it is for.
    if ck.check("self-test", "sum(rate(roomcast_no_such_metric_total[1m]))", False):
        print("FAIL self-test: a made-up metric was not caught")
        return 1
    if not metric_names('sum by (le) (rate(a_b_bucket{x="y"}[5m])) / on (job) c:d:e offset 5m'
                        ) == {"a_b_bucket", "c:d:e"}:
        print("FAIL self-test: metric name extraction")
        return 1
    ck.failures.clear()
    ck.count = 0

    want = {g for g in args.expect_groups.split(",") if g}
    if not want <= loaded:
        ck.failures.append(f"rule groups not loaded by Prometheus: {sorted(want - loaded)}")

    n_rules = 0
    for g in groups:
        for r in g["rules"]:
            n_rules += 1
            kind = "alert" if r["type"] == "alerting" else "record"
            where = f"rule {g['name']}/{r['name']} ({kind})"
            ck.check(where, r["query"], False)
            if r.get("health") not in ("ok", None) or r.get("lastError"):
                ck.failures.append(f"{where}: Prometheus evaluates it with health={r.get('health')} "
                                   f"error={r.get('lastError')!r}")
            if r["type"] == "alerting" and r.get("state") == "firing":
                print(f"note {where} is firing against the test cluster")

    with open(args.dashboard) as f:
        dash = json.load(f)
    queries = dashboard_queries(dash)
    for where, expr, need_data in queries:
        ck.check(where, expr, need_data)

    print(f"checked {n_rules} rule expressions and {len(queries)} dashboard queries against {prom}")
    if ck.failures:
        print(f"{len(ck.failures)} problem(s):")
        for f in ck.failures:
            print(f"  - {f}")
        return 1
    print("every expression runs and names only exported metrics; every dashboard query returns data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
