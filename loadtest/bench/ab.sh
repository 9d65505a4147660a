#!/usr/bin/env bash
# A/B of two server builds on this noisy 2-core VM: runs the same scenarios with
# binary A and binary B alternately, ROUNDS times, so drift in the host's speed
# lands on both sides. Each run writes its JSON to OUT/<tag>-<round>-<a|b>.json;
# compare the rows' node and redis CPU-s/M and p99 across rounds, not one pair.
#
#   loadtest/bench/ab.sh A_BIN B_BIN OUT TAG ROUNDS [roomcast-bench run options…]
#   e.g. loadtest/bench/ab.sh /tmp/roomcast-base target/release/roomcast /tmp/ab run13 3 fanout --secs 10
set -euo pipefail
[ $# -ge 5 ] || { sed -n 2,8p "$0" >&2; exit 2; }
a=$1 b=$2 out=$3 tag=$4 rounds=$5
shift 5
cd "$(dirname "$0")/../.."
BENCH=loadtest/bench/target/release/roomcast-bench
[ -x "$BENCH" ] || { echo "build it first: make bench-tool" >&2; exit 1; }
mkdir -p "$out"
for round in $(seq 1 "$rounds"); do
    for side in a b; do
        if [ "$side" = a ]; then bin=$a; else bin=$b; fi
        echo "== round $round, $side: $bin"
        "$BENCH" run "$@" --server-bin "$bin" --json "$out/$tag-$round-$side.json"
    done
done
