"""The plan of ``make gpu-check`` (scripts/gpu_check.py), checked without a GPU.

The GPU check must fit 8 minutes whatever the machine: stage timeouts within the budget, a sweep
shrunk to its slot (never overrun), sizes from the issue's ranges, an offline build. The full
dry run (``scripts/gpu_check.sh --dry-run``) also runs in ``make test``.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))

import gpu_check as gc  # noqa: E402


def test_plan_fits_eight_minutes():
    assert gc.check_plan() == []
    assert sum(gc.TIMEOUTS.values()) <= gc.BUDGET <= 8 * 60 - 20


@pytest.mark.parametrize("budget", [30, 90, 200, 450])
def test_sweep_shrinks_to_its_budget(budget):
    plan = gc.plan_sweep(budget)
    assert gc.check_sweep(plan) == [] or budget < 30
    cost = sum(len(gc.SWEEP_FAMILIES) * gc.point_seconds(d, b, c)
               for d, pts in plan.items() for b, c in pts)
    assert cost <= budget
    for pts in plan.values():
        assert pts[0] == (1024, 100_000)  # the base point first


def test_sweep_grows_with_the_budget_and_stays_in_range():
    small, large = gc.plan_sweep(90), gc.plan_sweep(10_000)
    assert sum(map(len, small.values())) < sum(map(len, large.values()))
    for d, pts in large.items():
        assert {b for b, _ in pts} == set(gc.SWEEP_BATCH) and d in gc.SWEEP_DTYPES
    assert max(c for pts in large.values() for _, c in pts) == 4_000_000


def test_sweep_calls_the_bench_cli_only(tmp_path):
    cmds = gc.sweep_commands(gc.plan_sweep(200), str(tmp_path), 200)
    assert cmds
    for _name, cmd, limit in cmds:
        assert cmd[1] == "benchmarks/bench_fused.py" and "--dim" in cmd and "512" in cmd
        assert cmd[cmd.index("--dtypes") + 1] in gc.SWEEP_DTYPES
        assert limit > 0


def test_build_is_offline_and_uses_every_core():
    cmd, env = gc.build_command("9.0")
    assert env["PIP_NO_INDEX"] == "1" and env["MAX_JOBS"] == str(os.cpu_count() or 1)
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and "pip" not in cmd
    assert cmd[1:] == ["-m", "marginops.build", "--cuda"]


def test_dry_run_build_stage_is_planned(tmp_path):
    """The dry run checks that the build entry point and the sources it compiles exist (it read
    a setup.py the package no longer has, and CI's dry run failed)."""
    st = gc.stage_build(str(tmp_path), dry=True)
    assert st.status == "planned", st.status
