#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# `make loadtest`: a local cluster on loopback (a real redis-server and 3
# roomcast nodes on ephemeral 127.0.0.1 ports, behind HAProxy with
# deploy/haproxy/haproxy.cfg), one k6 scenario against it, k6's summary, and
# everything stopped again on exit (also on failure or Ctrl-C).
#
#   loadtest/run-local.sh [connect-storm|fanout|reconnect-storm|sse|all]   (default: fanout)
#
# Environment: ROOMCAST_BIN (default: cargo build --release -p roomcast), and
# any k6 knob of the scenario (SUBSCRIBERS, PUBLISH_RATE, DURATION_S, ...; see
# the header of loadtest/k6/<scenario>.js), passed through to k6.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RC_ROOT="$ROOT"
RC_WORK="$(mktemp -d "${TMPDIR:-/tmp}/roomcast-loadtest.XXXXXX")"
# shellcheck source=../deploy/lib/cluster.sh
source "$ROOT/deploy/lib/cluster.sh"

SCENARIO="${1:-${SCENARIO:-fanout}}"
case "$SCENARIO" in
connect-storm | fanout | reconnect-storm | sse) SCENARIOS=("$SCENARIO") ;;
all) SCENARIOS=(connect-storm fanout reconnect-storm sse) ;;
*)
    echo "unknown scenario $SCENARIO (connect-storm, fanout, reconnect-storm, sse, all)" >&2
    exit 2
    ;;
esac

# shellcheck disable=SC2329 # called by the EXIT trap
cleanup() {
    local rc=$?
    rc_stop_all
    if ((rc != 0)); then
        echo "logs kept in $RC_WORK/logs"
    else
        rm -rf "$RC_WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rc_ensure_apt redis-server:redis-server redis-cli:redis-tools curl:curl haproxy:haproxy
rc_ensure_venv
if [[ -n "${ROOMCAST_BIN:-}" ]]; then
    RC_BIN="$ROOMCAST_BIN"
else
    (cd "$ROOT" && cargo build --release -q -p roomcast)
    RC_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/roomcast"
fi

SECRET="loadtest-secret-$RANDOM$RANDOM"
API_KEY="loadtest-api-key-$RANDOM$RANDOM"
mapfile -t ports < <(rc_free_ports 6)
P_REDIS=${ports[0]} P1=${ports[1]} P2=${ports[2]} P3=${ports[3]} P_LB=${ports[4]} P_STATS=${ports[5]}
rc_start_redis redis "$P_REDIS"
for n in 1 2 3; do
    port_var="P$n"
    rc_start_node "edge-$n" "${!port_var}" --redis "redis://127.0.0.1:$P_REDIS" \
        --jwt-secret "$SECRET" --api-key "$API_KEY" --drain-window 1s
done
rc_start_lb "$P_LB" "$P_STATS" "127.0.0.1:$P1" "127.0.0.1:$P2" "127.0.0.1:$P3"
echo "cluster: redis 127.0.0.1:$P_REDIS; nodes :$P1 :$P2 :$P3; haproxy http://127.0.0.1:$P_LB (stats :$P_STATS/stats)"

# pass the scenario knobs through
knobs=()
for var in CONNECTIONS RAMP_S HOLD_S SUBSCRIBERS ROOMS ROOMS_PER_CLIENT PUBLISH_RATE DURATION_S WARMUP_S \
    CLIENTS CYCLES CYCLE_S JITTER_MS REQUIRE_RESUME P99_MS P50_MS P95_WELCOME_MS P95_SUBSCRIBE_MS \
    P95_RECONNECT_MS SSE_PATH; do
    [[ -n "${!var:-}" ]] && knobs+=(-e "$var=${!var}")
done

k6_flags=(--no-usage-report)
[[ -t 1 ]] || k6_flags+=(--quiet) # no progress bars in logs
status=0
for s in "${SCENARIOS[@]}"; do
    echo
    echo "=== k6: $s"
    # sse.js ends every read window with a request timeout, by design: drop those warnings
    "$RC_TOOLS/venv/bin/k6" run "${k6_flags[@]}" \
        -e ROOMCAST_URL="http://127.0.0.1:$P_LB" -e JWT_SECRET="$SECRET" -e API_KEY="$API_KEY" \
        -e TENANT=loadtest "${knobs[@]}" "$ROOT/loadtest/k6/$s.js" \
        2> >(grep -v 'msg="Request Failed" error="request timeout"' >&2) || status=$?
done
for n in 1 2 3; do
    port_var="P$n"
    echo "edge-$n: $(curl -s "http://127.0.0.1:${!port_var}/metrics" |
        awk '/^roomcast_(deliveries_total|events_in_total|drops_total)/ { printf "%s=%s ", $1, $2 }')"
done
exit "$status"
