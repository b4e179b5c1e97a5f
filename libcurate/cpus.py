"""How many CPU cores this process may use: its affinity mask, capped by the cgroup's CPU quota.

A Kubernetes pod with ``resources.limits.cpu: 4`` on a 64-core node sees all 64 cores in its affinity
mask (no cpuset unless the kubelet's static CPU manager pins it) but is throttled to 4 cores' worth of
time by the CFS quota. Sizing thread pools, loader workers or model replicas by the mask would start 64 of
them on 4 cores' time; every place that sizes parallel work asks :func:`available_cores` instead.
"""

from __future__ import annotations

import math
import os

CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_cpu_limit(root: str = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in cores (``cpu.max`` of cgroup v2, else
    ``cpu.cfs_quota_us / cpu.cfs_period_us`` of v1), or ``None`` when there is none or it can't be read."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, _, period = f.read().strip().partition(" ")
        if quota != "max":
            return int(quota) / int(period or 100000)
        return None
    except (OSError, ValueError):
        pass
    for v1 in (os.path.join(root, "cpu"), os.path.join(root, "cpu,cpuacct")):
        try:
            with open(os.path.join(v1, "cpu.cfs_quota_us")) as f:
                quota_us = int(f.read().strip())
            with open(os.path.join(v1, "cpu.cfs_period_us")) as f:
                period_us = int(f.read().strip())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def available_cores(root: str = CGROUP_ROOT) -> int:
    """Cores this process may run on: the affinity mask (a container's cpuset), capped by the cgroup
    quota rounded down (a 2.5-core quota gives 2: a third busy thread would only be throttled), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return max(1, cores)
