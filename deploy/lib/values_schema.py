#!/usr/bin/env python3
"""Keeps the `config` part of helm/roomcast/values.schema.json equal to the
node's documented configuration, docs/roomcast.example.toml (which a Rust test
keeps equal to `Config::default()`), so the chart refuses exactly the keys the
node refuses, with the example's comments as descriptions. Standard library only.

  python3 deploy/lib/values_schema.py --check   # make test-ops: fail when out of date
  python3 deploy/lib/values_schema.py --write   # regenerate after a config change

Keys the chart sets itself are left out (so a value for them is refused):
listen, node_id, auth.jwt_secret, auth.jwt_public_key_file, publish.api_keys,
broker.redis, broker.redis_cluster, broker.tls_*.
"""

import argparse
import difflib
import json
import os
import re
import sys
import tomllib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXAMPLE = os.path.join(ROOT, "docs", "roomcast.example.toml")
SCHEMA = os.path.join(ROOT, "helm", "roomcast", "values.schema.json")

SET_BY_CHART = {
    ("listen",): "the container port (ROOMCAST_LISTEN)",
    ("node_id",): "the pod name (ROOMCAST_NODE_ID)",
    ("auth", "jwt_secret"): "auth.jwtSecret / auth.existingSecret",
    ("auth", "jwt_public_key_file"): "auth.jwtPublicKey / auth.existingSecret",
    ("publish", "api_keys"): "auth.apiKeys / auth.existingSecret",
    ("broker", "redis"): "redis.url",
    ("broker", "redis_cluster"): "redis.clusterUrls",
    ("broker", "tls_ca_file"): "redis.tls.existingSecret / redis.tls.caKey",
    ("broker", "tls_cert_file"): "redis.tls.existingSecret / redis.tls.certKey",
    ("broker", "tls_key_file"): "redis.tls.existingSecret / redis.tls.keyKey",
}
# The chart derives terminationGracePeriodSeconds from it, so it must be simple.
SPECIAL = {
    ("drain_window",): {
        "type": "string",
        "pattern": "^[0-9]+(ms|s|m)$",
        "description": "On SIGTERM sockets are closed with 1001 spread over this window; the chart derives "
                       "terminationGracePeriodSeconds from it. Whole seconds (\"10s\"), minutes (\"1m\") or "
                       "milliseconds (\"500ms\").",
    },
    # A node refuses any other value; the chart should say so before the pod starts.
    ("limits", "io_uring"): {"type": "string", "enum": ["auto", "required", "off"]},
    # Checked by the node only while broadcast_cap > 0 (the default), where it
    # must be a percentage; outside that it means nothing.
    ("dialects", "seed004", "batch_at_percent"): {"type": "integer", "minimum": 1, "maximum": 100},
    # A node refuses more.
    ("broker", "fanout_lanes"): {"type": "integer", "minimum": 0, "maximum": 64},
}
# The smallest value a node accepts for an integer, where that is more than 0
# (Config::validate and the dialects' settings); the other integers take 0. A
# Rust test (crates/edge/tests/config_docs.rs) tries each integer of the schema
# at its minimum and one below, so this table cannot drift from the node.
MINIMUM = {
    ("limits", "max_connections"): 1,
    ("limits", "listen_backlog"): 1,
    ("limits", "max_message_bytes"): 128,
    ("limits", "rate_messages"): 1,
    ("limits", "outbound_queue_frames"): 1,
    ("limits", "outbound_queue_bytes"): 1,
    ("limits", "max_rooms_per_session"): 1,
    ("publish", "max_in_flight"): 1,
    ("publish", "max_body_bytes"): 128,
    ("dialects", "seed001", "user_messages_per_window"): 1,
    ("dialects", "seed001", "tenant_messages_per_window"): 1,
    ("dialects", "seed001", "connection_messages_per_window"): 1,
    ("dialects", "seed001", "max_subscriptions"): 1,
    ("dialects", "seed001", "activity_max_events"): 1,
    ("dialects", "seed001", "max_message_bytes"): 128,
    ("dialects", "seed003", "max_payload_bytes"): 64,
    ("dialects", "seed004", "rate_messages"): 1,
    ("dialects", "seed004", "rate_strikes"): 1,
    ("dialects", "seed004", "max_connections"): 1,
    ("dialects", "seed004", "max_subscriptions"): 1,
}


def read_example():
    """(parsed TOML, {path: description}, {path: value of a commented-out key})."""
    with open(EXAMPLE, "rb") as f:
        parsed = tomllib.load(f)
    docs, optional = {}, {}
    table, comments = (), []
    with open(EXAMPLE, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                comments = []
                continue
            m = re.fullmatch(r"\[([A-Za-z0-9_.]+)\]\s*", line)
            if m:
                table, comments = tuple(m.group(1).split(".")), []
                continue
            m = re.fullmatch(r"# ([a-z_][a-z0-9_]*) = (.+)", line)  # an unset field, shown commented out
            if m:
                value = tomllib.loads(f"v = {m.group(2)}")["v"]
                optional[table + (m.group(1),)] = value
                docs[table + (m.group(1),)] = " ".join(comments)
                comments = []
                continue
            if line.startswith("#"):
                text = line.lstrip("#").strip()
                if text and not text.startswith("---"):
                    comments.append(text)
                continue
            m = re.match(r"([a-z_][a-z0-9_]*)\s*=", line)
            if m:
                docs[table + (m.group(1),)] = " ".join(comments)
                comments = []
    return parsed, docs, optional


def schema_for(value, path, docs):
    if path in SPECIAL:
        s = dict(SPECIAL[path])
        if "description" not in s and docs.get(path):
            s["description"] = docs[path]
        return s
    if isinstance(value, bool):
        s = {"type": "boolean"}
    elif isinstance(value, int):
        s = {"type": "integer", "minimum": MINIMUM.get(path, 0)}
    elif isinstance(value, float):
        s = {"type": "number"}
    elif isinstance(value, str):
        s = {"type": "string"}
    elif isinstance(value, list):
        item = schema_for(value[0], path + ("[]",), {}) if value else {"type": "string"}
        item.pop("description", None)
        s = {"type": "array", "items": item}
    elif isinstance(value, dict) and not value:
        s = {"type": "object"}  # a map with free keys (e.g. history_kinds)
    else:
        raise TypeError(f"{'.'.join(path)}: {type(value).__name__}")
    if docs.get(path):
        s["description"] = docs[path]
    return s


def config_schema():
    parsed, docs, optional = read_example()
    for path, value in optional.items():  # commented-out fields are settable too
        d = parsed
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d.setdefault(path[-1], value)

    def table(d, path):
        props = {}
        for key in sorted(d):
            p = path + (key,)
            if p in SET_BY_CHART:
                continue
            v = d[key]
            if isinstance(v, dict) and v:
                props[key] = table(v, p)
            else:
                props[key] = schema_for(v, p, docs)
        out = {"type": "object", "additionalProperties": False, "properties": props}
        if docs.get(path):
            out["description"] = docs[path]
        return out

    s = table(parsed, ())
    s["description"] = ("roomcast's configuration file (docs/configuration.md, docs/roomcast.example.toml), "
                        "rendered into the ConfigMap as TOML. Set by the chart instead: " +
                        "; ".join(f"{'.'.join(p)} = {w}" for p, w in SET_BY_CHART.items()) + ".")
    return s


def main():
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true")
    g.add_argument("--write", action="store_true")
    args = ap.parse_args()
    with open(SCHEMA) as f:
        current_text = f.read()
    schema = json.loads(current_text)
    schema["properties"]["config"] = config_schema()
    new_text = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
    if args.write:
        with open(SCHEMA, "w") as f:
            f.write(new_text)
        print(f"wrote {os.path.relpath(SCHEMA, ROOT)}")
        return 0
    if new_text != current_text:
        sys.stdout.writelines(difflib.unified_diff(
            current_text.splitlines(True), new_text.splitlines(True),
            "values.schema.json (committed)", "values.schema.json (from docs/roomcast.example.toml)", n=2))
        print("helm/roomcast/values.schema.json is out of date with docs/roomcast.example.toml:\n"
              "run: python3 deploy/lib/values_schema.py --write")
        return 1
    n = len(json.dumps(schema["properties"]["config"]))
    print(f"summary: values.schema.json `config` matches docs/roomcast.example.toml ({n} bytes of schema)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
