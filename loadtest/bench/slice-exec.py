#!/usr/bin/env python3
"""Run 33 of docs/performance.md: exec a command with a shorter EEVDF slice.

Sets this process's sched_attr.sched_runtime for SCHED_OTHER (Linux 6.12+: the
fair scheduler's custom slice; children and threads inherit it), then execs the
command. A task with a short slice may preempt a running one when it wakes, so
this tests whether the nodes' wake-up waits on shared CPUs are what holds p99.

    loadtest/bench/slice-exec.py SLICE_NS COMMAND [ARGS...]
    e.g. printf '#!/bin/sh\\nexec loadtest/bench/slice-exec.py 100000 target/release/roomcast "$@"\\n' > /tmp/rc-slice
"""
import ctypes
import os
import struct
import sys

SYS_SCHED_SETATTR = 314  # x86_64
SCHED_OTHER = 0

if len(sys.argv) < 3:
    sys.exit(__doc__)
slice_ns = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
# struct sched_attr (SCHED_ATTR_SIZE_VER1 = 56 bytes): size, policy, flags, nice,
# priority, runtime, deadline, period, util_min, util_max.
attr = struct.pack("IIQiIQQQII", 56, SCHED_OTHER, 0, 0, 0, slice_ns, 0, 0, 0, 0)
buf = ctypes.create_string_buffer(attr, len(attr))
if libc.syscall(SYS_SCHED_SETATTR, 0, buf, 0) != 0:
    sys.exit(f"sched_setattr: {os.strerror(ctypes.get_errno())}")
os.execvp(sys.argv[2], sys.argv[2:])
