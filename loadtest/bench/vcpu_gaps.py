"""How often this VM's host takes a vCPU away: spins on the clock for SECS seconds
and counts the gaps it saw. Run one per vCPU on an otherwise idle machine:
    taskset -c 0 python3 loadtest/bench/vcpu_gaps.py 10 0 & taskset -c 1 python3 loadtest/bench/vcpu_gaps.py 10 1; wait
(docs/performance.md, run 25)."""
import time, sys
end = time.perf_counter_ns() + int(float(sys.argv[1]) * 1e9)
last = time.perf_counter_ns(); gaps = []
while last < end:
    now = time.perf_counter_ns()
    if now - last > 1_000_000:
        gaps.append((now - last) / 1e6)
    last = now
b = {">1ms": sum(g > 1 for g in gaps), ">2ms": sum(g > 2 for g in gaps), ">5ms": sum(g > 5 for g in gaps), ">10ms": sum(g > 10 for g in gaps)}
print(f"cpu {sys.argv[2]}: {b}, max {max(gaps, default=0):.1f} ms over {sys.argv[1]} s")
