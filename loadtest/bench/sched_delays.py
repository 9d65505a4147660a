"""Classifies the scheduling delays > 5 ms of a `perf sched timehist` listing by
what ran on that CPU while the woken task waited (docs/performance.md, run 25):
    perf sched record -a -o sched.data -- sleep 6     # during a bench step
    perf sched timehist -i sched.data > timehist.txt
    python3 loadtest/bench/sched_delays.py timehist.txt"""
import collections, re, sys
rows = []
for line in open(sys.argv[1]):
    m = re.match(r'\s*(\d+\.\d+)\s+\[(\d+)\]\s+(.+?)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)', line)
    if m:
        rows.append((float(m[1]), int(m[2]), m[3].strip(), float(m[4]), float(m[5]), float(m[6])))
by_cpu = collections.defaultdict(list)
for r in rows:
    by_cpu[r[1]].append(r)
def ran(cpu, a, b):
    out = collections.Counter()
    for t, _, name, _, _, run in by_cpu[cpu]:
        lo, hi = max(a, t - run / 1000), min(b, t)
        if hi > lo:
            out['<idle>' if name.startswith('<idle>') else name.split('[')[0]] += (hi - lo) * 1000
    return out
waited, ran_meanwhile = collections.Counter(), collections.Counter()
for t, cpu, name, _, delay, _ in rows:
    if delay > 5 and not name.startswith('<idle>'):
        waited[name.split('[')[0]] += 1
        o = ran(cpu, t - delay / 1000, t)
        ran_meanwhile[o.most_common(1)[0][0] if o else '?'] += 1
print(f"{rows[-1][0] - rows[0][0]:.1f} s traced; {sum(waited.values())} wake-ups waited > 5 ms")
print("who waited:", dict(waited.most_common()))
print("what ran on that CPU meanwhile (most of the wait):", dict(ran_meanwhile.most_common()))
long_runs = collections.Counter(r[2].split('[')[0] for r in rows if r[5] > 2.5 and not r[2].startswith('<idle>'))
print("runs > 2.5 ms without a switch:", dict(long_runs.most_common()))
