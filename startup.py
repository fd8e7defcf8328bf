"""What a command does before it imports torch: Ctrl-C while torch loads (seconds) ends it with one line and
exit code 130, not a traceback of the import (experiment.main makes Ctrl-C a KeyboardInterrupt again);
torch's threads are no more than a container's CPU quota allows (a thread per core of the machine would
wait on each other); and its exit takes no second of garbage collection."""
import atexit
import contextlib
import gc
import os
import signal
import sys
from pathlib import Path

CGROUPS, OWN_CGROUP = Path("/sys/fs/cgroup"), Path("/proc/self/cgroup")  # Linux's control groups


def before_torch():
    signal.signal(signal.SIGINT, lambda *_: os._exit(print("interrupted while starting", file=sys.stderr) or 130))
    atexit.register(gc.freeze)  # the last handler at exit: Python's final garbage collections then walk none of
    # the objects still alive (torch's import alone makes 154,000), about a second of a core (docs/speed.md)
    if cpu_cores() < usable_cores():  # torch reads it as it loads; a thread count given is kept
        os.environ.setdefault("OMP_NUM_THREADS", str(cpu_cores()))


def usable_cores():
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_cores():
    """The CPU cores this process may use: those it may run on, fewer where a CPU quota allows less, as Docker's
    --cpus and Kubernetes' CPU limits set one: cgroup v2's cpu.max of its group or one above it, or cgroup v1's
    quota where a container sees its own group, at the cpu controller's root."""
    cores = usable_cores()
    with contextlib.suppress(OSError, ValueError, ArithmeticError):  # cgroup v1: no such file; a quota of -1: none
        quota, period = (int((CGROUPS / "cpu" / f"cpu.cfs_{name}_us").read_text()) for name in ("quota", "period"))
        cores = min(cores, max(1, quota // period)) if quota > 0 else cores
    with contextlib.suppress(OSError, ValueError, StopIteration):  # cgroup v2 (a group's name may be any bytes)
        group = next(line[3:] for line in OWN_CGROUP.read_text().splitlines() if line.startswith("0::"))
        parts = [part for part in group.strip().split("/") if part]
        for depth in range(len(parts) + 1):  # the root's, then each group's down to this process's
            with contextlib.suppress(OSError, ValueError, ArithmeticError):  # no such file; "max 100000": none
                quota, period = CGROUPS.joinpath(*parts[:depth], "cpu.max").read_text().split()
                cores = min(cores, max(1, int(quota) // int(period)))
    return cores
