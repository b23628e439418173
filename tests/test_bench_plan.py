"""benchmarks/marginbench without running a benchmark: the cases a command line asks for, the
presets, the table's provider names and ratio directions, untruncated statuses, and progress
without tqdm. (The end-to-end run is tests/test_examples.py::test_bench_fused_quick.)"""

from __future__ import annotations

import builtins
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from marginbench import driver, planning, report, worker  # noqa: E402
from marginbench.providers import LABELS  # noqa: E402


def _plan(*argv: str, device: str = "cpu"):
    return planning.default_plan(driver.parse_args(list(argv)), device)


def _shapes(plan):
    return [(c.family, c.dtype, c.B, c.C, c.D) for c in plan.cases]


def test_case_flags_give_exactly_the_cases_asked_for():
    plan = _plan("--classes", "1m", "--batch", "4096", "--dim", "512", "--dtype", "bfloat16",
                 device="cuda")
    assert _shapes(plan) == [("arcface", "bfloat16", 4096, 1_000_000, 512)]
    plan = _plan("--classes", "10k,100k", "--batch", "64,256")
    assert sorted(_shapes(plan)) == sorted(
        ("arcface", "float32", b, c, 128) for b in (64, 256) for c in (10_000, 100_000))
    assert plan.compile_for == set(plan.cases)   # the compiled naive loss runs on each of them
    plan = _plan("--families", "ce", "--classes", "1000")
    assert _shapes(plan) == [("ce", "float32", 64, 1000, 128)]


def test_default_sweep_is_one_axis_at_a_time():
    plan = _plan()
    assert len(plan.cases) == 3 + 1 + 1 + 1 + 2   # 3 classes, batch, dim, dtype, 2 families


def test_million_classes_preset():
    plan = _plan("--preset", "million-classes")
    assert plan.name == "million-classes"
    assert _shapes(plan) == [("arcface", "float32", 256, 100_000, 512),
                             ("arcface", "float32", 256, 1_000_000, 512)]
    with pytest.raises(SystemExit):
        _plan("--preset", "issue3")


def test_gpu_estimates_fit_a_time_budget():
    """The time-budget check must not skip every GPU task: a step of B=4096, C=1M, D=512 is
    estimated at GPU speed (16.8 TFLOP at 20 TFLOP/s: under a second), not at the CPU's 20 GFLOP/s
    (840 s)."""
    plan = _plan("--classes", "1m", "--batch", "4096", "--dim", "512", "--dtype", "bfloat16",
                 "--providers", "reference,reference_compiled,gemm", device="cuda")
    tasks, decided = planning.build_tasks(plan, mem_cap=0.6, mem_total=2**40)
    assert not decided and tasks[0].providers == ["reference", "reference_compiled", "gemm"]
    assert all(t.est_s < 120 for t in tasks), [(t.label, t.est_s) for t in tasks]


def _row(provider: str, status: str) -> dict:
    return {"mode": "forward+backward", "family": "arcface", "dtype": "float32", "B": 64,
            "C": 10_000, "D": 128, "provider": provider, "status": status}


def test_table_names_providers_and_ratio_directions_and_keeps_statuses_whole():
    reason = ("skipped: torch.compile runs on the classes axis only by default (it recompiles in "
              "every fresh process); --compile all")
    text = report.markdown_table([_row("reference_compiled", reason), _row("cpp", "ok")])
    header = text.splitlines()[0]
    for col in header.strip("|").split("|"):
        if "speedup" in col or "÷" in col or "TFLOP" in col or "MB" in col:
            assert "better" in col, col
    assert reason in text
    assert f"| {LABELS['reference_compiled']} |" in text and "| marginops cpp |" in text


def test_failure_keeps_the_whole_first_line():
    msg = "x" * 500
    assert worker.failure(RuntimeError(msg + "\nsecond line")) == f"error: RuntimeError: {msg}"


def test_progress_without_tqdm(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("No module named 'tqdm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    bar = driver.Progress(2)
    assert bar.bar is None
    bar.set_postfix_str("arcface float32 B=64 C=10K D=128: time 9")
    bar.update(60.0)
    bar.set_postfix_str("second task")
    bar.update(40.0)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bench [1/2]") and lines[0].endswith("time 9")
    assert lines[1].startswith("bench [2/2]  60%")
    assert lines[2].startswith("bench [2/2] 100%") and lines[2].endswith("done")


@pytest.mark.parametrize("step_s, calls", [(0.003, 7), (0.05, 1), (1e-5, worker.MAX_BLOCK_CALLS)])
def test_a_timed_rep_is_a_block_of_steps(monkeypatch, step_s, calls):
    """One rep = back-to-back steps until BLOCK_S has passed (at most MAX_BLOCK_CALLS), recorded as
    the mean step: the state left by the provider before (caches, allocator) is amortised."""
    clock = [0.0]
    monkeypatch.setattr(worker, "time", type("Clock", (), {"perf_counter": lambda: clock[0]}))
    seen = []

    def one_step():
        seen.append(clock[0])
        clock[0] += step_s
        return step_s / 3, 2 * step_s / 3, float(len(seen))

    f, b, loss, n = worker.run_block(one_step)
    assert worker.BLOCK_S == 0.02 and n == calls == len(seen)
    assert f == pytest.approx(step_s / 3) and b == pytest.approx(2 * step_s / 3)
    assert loss == float(calls)
