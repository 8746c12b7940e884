"""How many CPUs this process may really use, and torch's thread count set from it: os.cpu_count() and OpenMP see
every core of the machine, not the affinity mask nor the cgroup CPU quota (a container's --cpus, a Kubernetes CPU
limit), and threads past the quota only wait for each other."""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# The variables torch's intra-op pool (OpenMP, MKL) reads when torch is imported.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# OpenMP threads that wait for work sleep instead of spinning: on a CPU shared with other processes a spinning
# worker burns the time slice the computing thread needs. Measured (notes/quality-18.md): toy-world DreamBooth in
# `persona-cli bench quality` on 2 busy cores ran 0.08 steps/s with the default (spinning) policy, 1.9 with PASSIVE.
WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup may use (quota / period), or None when unlimited or unknown (cgroup v2 `cpu.max`, else v1
    `cpu/cpu.cfs_quota_us` and `cpu.cfs_period_us`)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on (its affinity mask), capped by the cgroup quota rounded up; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API on this platform
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def limit_threads_to_available_cpus(environ: dict | None = None, root: Path = CGROUP_ROOT) -> int:
    """Sets OMP_NUM_THREADS and MKL_NUM_THREADS to available_cpus(), and OMP_WAIT_POLICY to PASSIVE, where unset
    (the user's values win), before torch is imported; returns the thread count in effect."""
    environ = os.environ if environ is None else environ
    cpus = str(available_cpus(root))
    for name in THREAD_VARIABLES:
        environ.setdefault(name, cpus)
    environ.setdefault(*WAIT_POLICY)
    return int(environ[THREAD_VARIABLES[0]]) if environ[THREAD_VARIABLES[0]].isdigit() else int(cpus)
