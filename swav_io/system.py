"""Facts about this machine that the standard library does not give in one call."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine still runs: files named after a dead one are leftovers."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True



# Written here rather than taken from psutil: psutil (and os.process_cpu_count) honour the affinity mask
# but not a cgroup CPU quota, which is what limits a container on Kubernetes or SLURM.
def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)
