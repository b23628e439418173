"""bench_fused.py --train-step (benchmarks/marginbench/train*.py): the cases and tasks a command
line gives, the bytes-per-class fit and GPU capacity arithmetic against hand-computed numbers, and
one tiny real run of every path in fresh processes (memory ordering, CSV, table, plot)."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from marginbench import driver, trainreport, trainrun, trainstep  # noqa: E402

MB = 2**20
HAS_OPTIM = importlib.util.find_spec("marginops.optim") is not None


def _cases(*argv: str, device: str = "cpu"):
    return trainrun.train_cases(driver.parse_args(["--train-step", *argv]), device)


def test_default_cpu_and_gpu_sweeps():
    cases, paths, reps = _cases()
    assert paths == ["naive", "torch_optim", "fused"] and reps == 3
    assert [(c.B, c.C, c.D, c.dtype, c.optimizer, c.backend) for c in cases] == [
        (64, c, 512, "float32", "sgd", "cpp") for c in (10_000, 100_000, 300_000, 1_000_000)]
    gpu, _, gpu_reps = _cases(device="cuda")
    assert [c.C for c in gpu] == [100_000, 1_000_000, 3_000_000, 10_000_000] and gpu_reps == 10
    assert {(c.B, c.D, c.device) for c in gpu} == {(512, 512, "cuda")}


def test_flags_give_exactly_the_cases_asked_for():
    cases, paths, reps = _cases("--classes", "2k,1m", "--batch", "32", "--dim", "128",
                                "--optimizer", "adamw", "--paths", "fused,naive", "--reps", "5")
    assert [(c.B, c.C, c.D, c.optimizer) for c in cases] == [(32, 2_000, 128, "adamw"),
                                                            (32, 1_000_000, 128, "adamw")]
    assert paths == ["fused", "naive"] and reps == 5
    with pytest.raises(SystemExit, match="--reps"):
        _cases("--reps", "0")
    with pytest.raises(SystemExit, match="unknown"):
        _cases("--paths", "fused,magic")
    with pytest.raises(SystemExit):
        _cases("--optimizer", "lion")


def test_state_bytes_and_mem_cap_skip():
    case = trainstep.TrainCase(64, 1_000_000, 512, "float32", "cpu", "sgd", "cpp")
    assert case.weight_bytes == 2_048_000_000 and case.state_bytes == 2_048_000_000
    adamw = trainstep.TrainCase(64, 1_000_000, 512, "float32", "cpu", "adamw", "cpp")
    assert adamw.state_bytes == 4_096_000_000
    # fused: W + momentum; torch.optim: + W.grad + the weight-decay temporary; naive: + Ŵ, dŴ and
    # 6 fp32 B×C buffers
    assert trainstep.estimated_bytes("fused", case) == 2 * 2_048_000_000
    assert trainstep.estimated_bytes("torch_optim", case) == 4 * 2_048_000_000
    assert trainstep.estimated_bytes("naive", case) == 6 * 2_048_000_000 + 6 * 64 * 10**6 * 4
    tasks, decided = trainrun.train_tasks([case], ["naive", "torch_optim"], 3, mem_cap=0.5,
                                          mem_total=16 * 2**30)
    assert [(t.paths, t.reps) for t in tasks] == [(["torch_optim"], 3)]   # alone: timed there
    # (12.288 + 1.536) GB = 13.824e9 B = 12.87 GiB > 8 GiB
    assert decided[(case, "naive")]["status"].startswith("skipped: needs ~12.9 GiB")
    assert "--mem-cap" in decided[(case, "naive")]["status"]


def test_round_robin_timing_leaves_out_what_does_not_fit_beside_the_others():
    """C = 1M, SGD, 23.5 GiB at --mem-cap 0.6 (15.14e9 B): W + momentum = 4.096e9 B per head;
    all three heads = 3 × 4.096e9 + the naive step's transient 9.728e9 = 22.0e9 B: too much;
    without naive 2 × 4.096e9 + torch.optim's transient 4.096e9 = 12.3e9 B: fits."""
    case = trainstep.TrainCase(64, 1_000_000, 512, "float32", "cpu", "sgd", "cpp")
    mem_total = int(23.5 * 2**30)
    assert trainrun.round_robin_paths(case, list(trainstep.PATHS), 0.6, mem_total) == [
        "torch_optim", "fused"]
    assert trainrun.round_robin_paths(case, list(trainstep.PATHS), 0.3, mem_total) == []
    tasks, decided = trainrun.train_tasks([case], list(trainstep.PATHS), 3, 0.6, mem_total)
    assert not decided
    # naive is timed alone (3 steps); the others' memory processes time one step, then together
    assert [(t.paths, t.reps) for t in tasks] == [
        (["naive"], 3), (["torch_optim"], 1), (["fused"], 1), (["torch_optim", "fused"], 3)]
    # the round-robin's times replace the memory process's; a failed one keeps them, saying so
    ok = {"status": "ok", "fwd": [1.0], "bwd": [1.0], "opt": [1.0], "loss": 2.0}
    outcomes = [dict(ok), dict(ok), dict(ok),
                {"round_robin": {"torch_optim": {"status": "ok", "fwd": [3.0, 4.0],
                                                 "bwd": [0.0, 0.0], "opt": [0.0, 0.0]},
                                 "fused": {"status": "oom: x", "fwd": [], "bwd": [], "opt": []}}}]
    results = trainrun.merge_outcomes(tasks, outcomes, {})
    assert results[(case, "torch_optim")]["fwd"] == [3.0, 4.0]
    assert results[(case, "torch_optim")]["note"] == "timed round-robin (torch_optim, fused)"
    assert results[(case, "fused")]["fwd"] == [1.0]
    assert results[(case, "fused")]["note"].startswith("round-robin timing failed (oom: x)")
    assert results[(case, "naive")]["note"] == "timed alone"


def _rows(path: str, points: list[tuple[int, float]], status: str = "ok") -> list[dict]:
    return [{"path": path, "C": c, "peak_mb": v / MB, "status": status} for c, v in points]


def test_bytes_per_class_fit_and_capacity_by_hand():
    # peak = 3 MiB + 4096 B·C exactly (fused, SGD, D=512 fp32: W + momentum), and a noisy
    # line for torch.optim whose least-squares slope and intercept are worked out by hand
    fused = _rows("fused", [(c, 3 * MB + 4096 * c) for c in (10_000, 100_000, 1_000_000)])
    # points (0, 0), (1000, 7000), (2000, 11000): mean C 1000, mean v 6000,
    # slope = (−1000·−6000 + 0 + 1000·5000) / (1000² + 1000²) = 11e6 / 2e6 = 5.5,
    # intercept = 6000 − 5.5·1000 = 500
    torch_optim = _rows("torch_optim", [(0, 0.0), (1000, 7000.0), (2000, 11000.0)])
    failed = _rows("naive", [(10, 1.0), (20, 2.0)], status="oom: killed")
    fit = trainreport.bytes_per_class(fused + torch_optim + failed)
    assert set(fit) == {"fused", "torch_optim"}   # failed rows never enter a fit
    b, a, n = fit["fused"]
    assert n == 3 and b == pytest.approx(4096, rel=1e-12) and a == pytest.approx(3 * MB, rel=1e-9)
    assert fit["torch_optim"][:2] == pytest.approx((5.5, 500.0), rel=1e-12)
    # 12 GiB × 0.9 = 11 596 411 699.2 B; ÷ 4096 = 2 831 155.2 -> 2 831 155 classes
    assert trainreport.capacity(4096, 0.0, 12 * 2**30, 0.1) == 2_831_155
    # minus a 100 MiB intercept: 11 491 554 099.2 ÷ 4096 = 2 805 555.2
    assert trainreport.capacity(4096, 100 * MB, 12 * 2**30, 0.1) == 2_805_555
    # a negative intercept is not free memory; 80 GiB with no headroom ÷ 6144 B = 13 981 013.3
    assert trainreport.capacity(6144, -5 * MB, 80 * 2**30, 0.0) == 13_981_013
    assert trainreport.capacity(4096, 20 * 2**30, 12 * 2**30, 0.1) == 0   # nothing fits
    table = trainreport.capacity_table(fused, headroom=0.1)
    # (24 GiB × 0.9 − 3 MiB) ÷ 4096 = (23 192 823 398.4 − 3 145 728) ÷ 4096 = 5 661 542.4
    assert table == [{"path": "fused", "bytes_per_class": pytest.approx(4096),
                      "intercept_mb": pytest.approx(3.0), "points": 3,
                      "max_classes_12gb": 2_830_387, "max_classes_24gb": 5_661_542,
                      "max_classes_80gb": 18_873_600}]


def test_capacity_from_csv_round_trip(tmp_path):
    rows = []
    for c in (1_000, 2_000, 4_000):
        for p, per in (("naive", 8192), ("torch_optim", 8192), ("fused", 4096)):
            rows.append({"path": p, "C": c, "B": 8, "D": 512, "status": "ok",
                         "peak_mb": per * c / MB, "persistent_mb": 4096 * c / MB})
    rows.append({"path": "fused", "C": 8_000, "status": "error: boom"})
    path = tmp_path / "train-step.csv"
    trainreport.write_csv(rows, str(path))
    table = {e["path"]: e for e in trainreport.capacity_from_csv(str(path), headroom=0.1)}
    assert table["fused"]["max_classes_12gb"] == 2_831_155   # as worked out above
    assert table["naive"]["max_classes_12gb"] == 1_415_577   # 11 596 411 699.2 ÷ 8192
    text = trainreport.capacity_markdown(list(table.values()), 0.1)
    assert "| marginops fused step | 4096 | 0 | 3 | 2.83M | 5.66M | 18.9M |" in text
    assert "10% kept free" in text


def test_tiny_train_step_run_of_the_three_paths(tmp_path):
    """A real run in fresh processes at C = 64000 and 128000, D = 128 (W = 31 and 62 MB): the
    torch.optim path holds W.grad on top of W + momentum, the naive one also Ŵ, its gradient and the
    logits; the fused path neither (when marginops.optim is there): its chunks of 512 KiB (1024
    classes) are small next to W, as its default 16 MiB chunks are next to a 2 GB W at C = 1M. W is
    large beside the resident-memory noise of a fresh process (a few MB: at W = 4 MB a fused peak
    came out only 1 MB below torch.optim's), so the half-W margins below cannot flake."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_fused.py"), "--train-step",
         "--cpu", "--classes", "64000,128000", "--batch", "8", "--dim", "128", "--reps", "1",
         "--threads", "1", "--chunk-bytes", "524288", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| path | bytes per class (fit)" in proc.stdout
    with open(tmp_path / "train-step.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {r["machine"] for r in rows} != {""}
    by = {(r["path"], int(r["C"])): r for r in rows}
    for c in (64000, 128000):
        w_mb = c * 128 * 4 / MB
        naive, topt, fused = (by[(p, c)] for p in ("naive", "torch_optim", "fused"))
        assert naive["status"] == "ok" and topt["status"] == "ok", (naive, topt)
        peak = {p: float(by[(p, c)]["peak_mb"] or "nan") for p in trainstep.PATHS}
        # the state kept between steps is W + momentum, for every path
        assert float(topt["persistent_mb"]) >= 0.95 * 2 * w_mb
        assert peak["torch_optim"] >= float(topt["persistent_mb"]) + 0.9 * w_mb   # + W.grad
        assert peak["naive"] >= peak["torch_optim"] + 0.5 * w_mb
        assert float(topt["rel_loss_diff"]) < 1e-4   # same W, same batch: the same loss
        assert int(topt["reps"]) == 1 and "timed round-robin" in topt["note"]
        assert float(naive["rel_diff_after_update"]) < 1e-4
        if HAS_OPTIM:
            assert fused["status"] == "ok", fused
            assert peak["fused"] <= peak["torch_optim"] - 0.5 * w_mb
            assert float(fused["rel_loss_diff"]) < 1e-4
            # after one update by marginops.optim inside the backward, the same loss as after
            # torch.optim's step
            assert float(fused["rel_diff_after_update"]) < 1e-4
        else:
            assert fused["status"].startswith("unavailable: marginops.optim"), fused
    assert (tmp_path / "train-step.png").stat().st_size > 0
    assert (tmp_path / "train-step.md").read_text().count("\n| 128K |") == 3
