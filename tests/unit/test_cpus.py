"""The CPUs a process may use, from its affinity and a cgroup quota written into a tmp folder (v2 and v1)."""
import os

import pytest

from persona.services.runtime.cpus import available_cpus, cgroup_cpu_quota, limit_threads_to_available_cpus

AFFINITY = len(os.sched_getaffinity(0))


def test_cgroup_v2_quota_caps_the_count_rounded_up(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus 1.5
    assert cgroup_cpu_quota(tmp_path) == 1.5
    assert available_cpus(tmp_path) == min(AFFINITY, 2)


def test_cgroup_v2_without_a_limit_leaves_the_affinity(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    assert available_cpus(tmp_path) == AFFINITY


@pytest.mark.parametrize("quota, expected", [("50000", 0.5), ("-1", None)])
def test_cgroup_v1_quota(tmp_path, quota, expected):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == expected
    assert available_cpus(tmp_path) == (1 if expected else AFFINITY)


def test_no_cgroup_files_is_no_limit(tmp_path):
    assert cgroup_cpu_quota(tmp_path) is None and available_cpus(tmp_path) == AFFINITY


def test_thread_variables_are_set_unless_the_user_set_them(tmp_path):
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # one CPU
    environ = {}
    assert limit_threads_to_available_cpus(environ, tmp_path) == 1
    assert environ == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    mine = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    assert limit_threads_to_available_cpus(mine, tmp_path) == 3
    assert mine == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
