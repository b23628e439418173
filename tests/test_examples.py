"""examples/train_digits.py, short: the fused and the reference runs agree step by step, and the
learnt embedding beats chance at verification and identification on held-out images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from marginops import backend_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_digits.py")
CPU_BACKENDS = [b for b in ("torch", "cpp") if backend_status("cpu")[b] is None]


def run_example(*args: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"train_digits.py failed:\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line in:\n{proc.stdout}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_train_digits_short(backend):
    r = run_example("--steps", "30", "--backend", backend, "--seed", "0")
    assert r["backend"] == backend and r["steps"] == 30
    # the script asserts the agreement itself; check the figure it reports too
    assert r["tolerance_used"] <= 1.0
    assert r["max_abs_loss_dev"] < 1e-3
    assert r["last_loss"] < r["first_loss"]            # it trained
    # better than chance (rank-1 0.1, rank-5 0.5, balanced 10-fold 0.5, TAR@FAR=1e-2 ~0.01)
    assert r["rank1"] > 0.5
    assert r["rank5"] > 0.8
    assert r["kfold_accuracy"] > 0.7
    assert r["tar_at_far_1e-2"] > 0.1


def test_train_digits_rejects_a_bad_backend():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, SCRIPT, "--steps", "2", "--backend", "nope"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "backend" in proc.stderr


def test_train_digits_without_sklearn_names_the_extra():
    """A plain install has no scikit-learn: a clear message naming the [examples] extra, no traceback."""
    hide = ("import runpy, sys; sys.modules['sklearn'] = None; "
            f"sys.argv = [{SCRIPT!r}, '--steps', '2']; runpy.run_path({SCRIPT!r}, run_name='__main__')")
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 1
    assert "marginops[examples]" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_fused_quick(tmp_path):
    """benchmarks/bench_fused.py --quick: every provider gets rows with a status, the CSV is tidy,
    the table and the plots are written, and a provider that cannot run here does not crash it."""
    import csv

    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    script = os.path.join(ROOT, "benchmarks", "bench_fused.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"bench_fused.py --quick failed:\n{proc.stdout}\n{proc.stderr}"
    assert "| case | provider |" in proc.stdout and "elapsed" in proc.stdout
    with open(tmp_path / "bench-quick.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    required = {"machine", "hostname", "cpu_model", "cores", "python", "torch", "triton",
                "marginops", "timestamp", "provider", "family", "mode", "B", "C", "D", "dtype",
                "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "speedup_vs_reference",
                "speedup_vs_compiled", "gemm_ratio", "tflops", "status"}
    assert required <= set(rows[0])
    assert {r["mode"] for r in rows} == {"forward", "backward", "forward+backward"}
    providers = {r["provider"] for r in rows}
    assert {"reference", "reference_compiled", "torch", "cpp", "cuda", "triton", "pml",
            "linear_cross_entropy", "gemm"} <= providers
    by = {(r["provider"], r["family"], r["C"], r["mode"]): r for r in rows}
    for r in rows:   # a status for every row; a time exactly for the ok ones
        assert r["status"]
        assert (r["status"] == "ok") == (r["median_ms"] != ""), r
    ref = by[("reference", "arcface", "1000", "forward+backward")]
    assert ref["status"] == "ok"
    assert float(ref["p20_ms"]) <= float(ref["median_ms"]) <= float(ref["p80_ms"])
    assert float(ref["peak_mem_mb"]) > 0 and float(ref["gemm_ratio"]) > 0
    fused = by[("torch", "arcface", "1000", "forward+backward")]
    assert fused["status"] == "ok" and float(fused["speedup_vs_reference"]) > 0
    assert float(fused["rel_loss_diff"]) < 1e-4
    # unavailable backends are recorded with the reason, not dropped, and never crash the run
    assert by[("cuda", "arcface", "1000", "forward+backward")]["status"].startswith(
        ("unavailable", "skipped"))
    # linear_cross_entropy only exists for the plain-CE family
    assert ("linear_cross_entropy", "arcface", "1000", "forward+backward") not in by
    assert ("linear_cross_entropy", "ce", "1000", "forward+backward") in by
    assert (tmp_path / "bench-quick.md").exists()
    assert (tmp_path / "time_vs_classes-quick.png").exists()
    assert (tmp_path / "memory_vs_classes-quick.png").exists()
