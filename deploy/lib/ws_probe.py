#!/usr/bin/env python3
"""Drives the traffic k6 does not: the failure paths whose metrics only appear
once they happen (docs/operations.md, "Metrics"), so that every metric the
dashboard and the alert rules name is exported by the nodes when
deploy/validate.sh runs the PromQL check. Standard library only.

  ws_probe.py --node 127.0.0.1:P --capped-node 127.0.0.1:Q --redis-port R \
      --jwt-secret S --tenant T --room team:1

Does, and checks:
  * a WebSocket upgrade with a bad token          -> 401, roomcast_auth_failures_total
  * a publish without a token                     -> 401, roomcast_auth_failures_total
  * an unknown op on an open session              -> error frame, roomcast_client_errors_total
  * a second session on a node capped at 1        -> 503, roomcast_rejected_connections_total
  * a garbage message on a subscribed room channel -> roomcast_broker_decode_errors_total
  * CLIENT KILL (every connection) on Redis       -> the nodes reconnect and get ready
                                                     again, roomcast_redis_reconnects_total
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(secret: str, sub: str, tenant: str, teams, roles=(), ttl=3600) -> str:
    """An HS256 token, as `roomcast token` mints it."""
    now = int(time.time())
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps({"sub": sub, "tenant": tenant, "teams": list(teams),
                                 "roles": list(roles), "iat": now, "exp": now + ttl}).encode())
    sig = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(sig)}"


class WebSocket:
    """A minimal client: handshake, masked text frames out, frames in."""

    def __init__(self, addr: str, token: str, timeout=5.0):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n")
        self.sock.sendall(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            head += chunk
        head, _, self.buf = head.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1]) if head else 0

    def send_text(self, text: str):
        payload = text.encode()
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("socket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_json(self):
        """The next text frame as JSON (control frames are skipped)."""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x1:
                return json.loads(payload)
            if opcode == 0x8:
                raise ConnectionError(f"closed by server: {payload[:2].hex()} {payload[2:]!r}")

    def recv_op(self, op: str, limit=20):
        for _ in range(limit):
            frame = self.recv_json()
            if frame.get("op") == op:
                return frame
        raise AssertionError(f"no {op} frame")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def http_status(url: str, method="GET", data=None, headers=None) -> int:
    req = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def metric_present(addr: str, name: str) -> bool:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return any(line.startswith(name + "{") or line.startswith(name + " ")
               for line in text.splitlines())


def expect(ok: bool, what: str):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        raise SystemExit(1)


def wait_until(pred, seconds: float, step=0.1) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--node", required=True, help="host:port of a node on Redis")
    ap.add_argument("--capped-node", required=True, help="host:port of a node with max_connections=1")
    ap.add_argument("--all-nodes", default="", help="comma-separated host:port of every node on Redis")
    ap.add_argument("--redis-port", required=True, type=int)
    ap.add_argument("--jwt-secret", required=True)
    ap.add_argument("--tenant", default="loadtest")
    ap.add_argument("--room", default="team:1")
    ap.add_argument("--prefix", default="rc:")
    args = ap.parse_args()
    team = args.room.split(":", 1)[1]
    token = mint(args.jwt_secret, "probe", args.tenant, [team])
    node = args.node

    # 1. a bad token on the upgrade, a publish without a token
    bad = WebSocket(node, token[:-4] + "AAAA")
    expect(bad.status == 401, f"upgrade with a bad signature -> {bad.status} (want 401)")
    bad.close()
    st = http_status(f"http://{node}/v1/publish", "POST", b"{}", {"Content-Type": "application/json"})
    expect(st == 401, f"publish without a token -> {st} (want 401)")
    expect(metric_present(node, "roomcast_auth_failures_total"), "roomcast_auth_failures_total exported")

    # 2. an error frame
    ws = WebSocket(node, token)
    expect(ws.status == 101, f"upgrade -> {ws.status} (want 101)")
    ws.recv_op("welcome")
    ws.send_text(json.dumps({"op": "dance", "ref": "9"}))
    err = ws.recv_op("error")
    expect(err.get("code") == "INVALID_MESSAGE" and err.get("ref") == "9", f"unknown op -> error frame {err.get('code')}")
    expect(metric_present(node, "roomcast_client_errors_total"), "roomcast_client_errors_total exported")

    # 3. a garbage channel message in a room the node is subscribed to
    ws.send_text(json.dumps({"op": "subscribe", "ref": "1", "rooms": [args.room]}))
    sub = ws.recv_op("subscribed")
    expect(args.room in sub.get("rooms", []), f"subscribed {args.room}")
    channel = f"{args.prefix}{{{args.tenant}/{args.room}}}:c"
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(args.redis_port), "PUBLISH", channel,
                    "not-an-envelope"], check=True, capture_output=True)
    expect(wait_until(lambda: metric_present(node, "roomcast_broker_decode_errors_total"), 5),
           "garbage on the room channel -> roomcast_broker_decode_errors_total exported")

    # 4. the connection cap
    capped = args.capped_node
    first = WebSocket(capped, token)
    expect(first.status == 101, f"capped node, first session -> {first.status} (want 101)")
    first.recv_op("welcome")
    second = WebSocket(capped, token)
    expect(second.status == 503, f"capped node, second session -> {second.status} (want 503)")
    second.close()
    first.close()
    expect(metric_present(capped, "roomcast_rejected_connections_total"),
           "roomcast_rejected_connections_total exported")

    # 5. Redis drops every node connection (a subscriber without rooms is of
    #    type normal): the nodes reconnect, resubscribe, get ready again
    nodes = [n for n in args.all_nodes.split(",") if n] or [node]
    killed = 0
    for kind in ("pubsub", "normal"):  # redis-cli skips its own connection
        out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(args.redis_port), "CLIENT", "KILL",
                              "TYPE", kind], check=True, capture_output=True, text=True).stdout.strip()
        killed += int(out or 0)
    expect(killed >= len(nodes), f"CLIENT KILL TYPE pubsub/normal killed {killed} connections of {len(nodes)} nodes")
    for n in nodes:
        expect(wait_until(lambda: metric_present(n, "roomcast_redis_reconnects_total"), 15),
               f"{n}: roomcast_redis_reconnects_total exported")
        expect(wait_until(lambda: http_status(f"http://{n}/readyz") == 200, 15), f"{n}: ready again")
    # the held session still gets events after the resync
    publisher = mint(args.jwt_secret, "probe-publisher", args.tenant, [team], roles=["publisher"], ttl=600)
    # (the first command after its connections were killed may get 503 "retry")
    statuses = []
    for _ in range(20):
        st = http_status(f"http://{node}/v1/publish", "POST",
                         json.dumps({"rooms": [args.room], "type": "probe.after_resync", "data": {}}).encode(),
                         {"Content-Type": "application/json", "Authorization": f"Bearer {publisher}"})
        statuses.append(st)
        if st == 200:
            break
        time.sleep(0.25)
    expect(statuses[-1] == 200, f"publish after the resync -> {statuses}")
    ev = ws.recv_op("event")
    expect(ev.get("type") == "probe.after_resync", "the held session received the event after the resync")
    ws.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
