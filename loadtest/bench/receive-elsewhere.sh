#!/usr/bin/env bash
# Run 12 of docs/performance.md: what a node costs when the clients' TCP receive
# path is not charged to it, as on a real network. The server side (nodes or the
# floor probe, Redis, the orchestrator) is pinned to CPU 0 and the generator's
# workers to CPU 1; the second run also steers loopback's receive processing to
# CPU 1 with Receive Packet Steering. Needs root and 2+ CPUs; loopback only.
# The RPS setting is put back on exit, however the script ends.
#
#   loadtest/bench/receive-elsewhere.sh [roomcast-bench run options…]
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH=loadtest/bench/target/release/roomcast-bench
RPS=/sys/class/net/lo/queues/rx-0/rps_cpus
[ -x "$BENCH" ] || { echo "build it first: make bench-tool" >&2; exit 1; }
[ -w "$RPS" ] || { echo "needs root (writes $RPS)" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs" >&2; exit 1; }
saved=$(cat "$RPS")
pinner=""
cleanup() {
    echo "$saved" > "$RPS"
    [ -n "$pinner" ] && kill "$pinner" 2>/dev/null || true
}
trap cleanup EXIT

# Pins processes as the benchmark starts them (it starts new ones per scenario).
pin_loop() {
    while true; do
        for p in $(pgrep -f "roomcast serve") $(pgrep -f "roomcast-bench floor") \
                 $(pgrep -x redis-server) $(pgrep -f "roomcast-bench run"); do
            taskset -a -p 1 "$p" >/dev/null 2>&1 || true
        done
        for p in $(pgrep -f "roomcast-bench worker"); do
            taskset -a -p 2 "$p" >/dev/null 2>&1 || true
        done
        sleep 0.3
    done
}

for mode in pinned pinned-rps; do
    if [ "$mode" = pinned-rps ]; then echo 2 > "$RPS"; else echo 0 > "$RPS"; fi
    pin_loop & pinner=$!
    echo "== $mode (rps_cpus=$(cat "$RPS"))"
    timeout 600 "$BENCH" run fanout floor --secs 10 --server-bin target/release/roomcast \
        --json "target/bench-$mode.json" "$@"
    kill "$pinner"; pinner=""
done
