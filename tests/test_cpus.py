"""libcurate.cpus: the core count parallel work is sized by respects cgroup CPU quotas (pod limits)."""

from __future__ import annotations

import os

from libcurate.cpus import available_cores, cgroup_cpu_limit


def _affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_limit(str(tmp_path)) == 2.5
    assert available_cores(str(tmp_path)) == min(_affinity(), 2)  # rounded down
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cores(str(tmp_path)) == 1  # never below one
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(str(tmp_path)) is None
    assert available_cores(str(tmp_path)) == _affinity()


def test_cgroup_v1_quota(tmp_path):
    v1 = tmp_path / "cpu,cpuacct"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(str(tmp_path)) == 1.0
    assert available_cores(str(tmp_path)) == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(str(tmp_path)) is None


def test_no_cgroup_files_means_the_affinity_mask(tmp_path):
    assert cgroup_cpu_limit(str(tmp_path)) is None
    assert available_cores(str(tmp_path)) == _affinity()
