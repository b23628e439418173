"""``backend="auto"`` on CUDA picks the measured-fastest backend (marginops/backend_table.py and
marginops.core._resolve): the table gpu-check writes, its lookup, and the choice — on CPU (the
device queries are replaced; nothing here touches a GPU)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import marginops.core as core
from marginops import backend_table as bt


@pytest.fixture
def cuda_like(monkeypatch, tmp_path):
    """A process that sees an sm_90 GPU where triton and cuda can both run, with its own table."""
    monkeypatch.setattr(bt, "table_path", lambda: str(tmp_path / bt.FILENAME))
    available = {"triton": None, "cuda": None, "torch": None, "cpp": None}
    monkeypatch.setattr(core, "_backend_available", lambda name, device_type: available[name])
    monkeypatch.setattr(core, "_cuda_arch", lambda index: "9.0")
    return available


def _entry(backend, B=4096, C=1_000_000, D=512, dtype="bfloat16", arch="9.0"):
    return dict(arch=arch, dtype=dtype, B=B, C=C, D=D, backend=backend, source="measured",
                ms={"triton": 1.0, "cuda": 2.0})


def _auto(shape, dtype=torch.bfloat16):
    return core.resolve_backend("auto", torch.device("cuda", 0), dtype, shape)


def test_table_lives_in_the_marginops_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MARGINOPS_CACHE", str(tmp_path))
    assert bt.table_path() == str(tmp_path / "auto-backend.json")


def test_bucket():
    assert [bt.bucket(n) for n in (0, 1, 2, 3, 1000, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]


def test_write_then_read(tmp_path):
    path = str(tmp_path / "t.json")
    bt.write(path, [_entry("cuda"), _entry("triton", B=1000)], written_by="test")
    data = json.load(open(path))
    assert data["format"] == bt.FORMAT and data["written_by"] == "test"
    assert [(e["B"], e["C"], e["D"]) for e in data["entries"]] == [(4096, 1 << 20, 512),
                                                                   (1024, 1 << 20, 512)]
    assert len(bt.load(path)) == 2
    with pytest.raises(ValueError, match="backend"):
        bt.write(path, [_entry("torch")])


def test_nearest_entry_of_the_same_arch_and_dtype(tmp_path):
    path = str(tmp_path / "t.json")
    bt.write(path, [_entry("cuda", B=1024, C=100_000), _entry("triton", B=8192, C=4_000_000),
                    _entry("cuda", D=128), _entry("cuda", dtype="float32", B=8192, C=4_000_000)])
    assert bt.choose("9.0", "bfloat16", 1500, 120_000, 512, path) == "cuda"
    assert bt.choose("9.0", "bfloat16", 8000, 3_000_000, 512, path) == "triton"
    assert bt.choose("9.0", "bfloat16", 8000, 3_000_000, 100, path) == "cuda"   # D first
    assert bt.choose("9.0", "float32", 1024, 100_000, 512, path) == "cuda"
    assert bt.choose("8.0", "bfloat16", 8192, 4_000_000, 512, path) is None     # another GPU
    assert bt.choose("9.0", "float16", 8192, 4_000_000, 512, path) is None
    assert bt.choose("9.0", "bfloat16", None, None, None, path) in ("cuda", "triton")


def test_unreadable_table_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the backend table"):
        assert bt.choose("9.0", "bfloat16", 1, 1, 1, str(path)) is None
    path.write_text(json.dumps({"format": 99, "entries": []}))
    bt.load.cache_clear()
    bt._choose.cache_clear()
    with pytest.warns(UserWarning, match="not format"):
        assert bt.load(str(path)) == ()


def test_auto_follows_the_table(cuda_like):
    # no table: the model's pick at the bucket (benchmarks/model.py on the H100 at D = 512:
    # triton in bf16 — resident.py's kernels — cuda in fp16; tests/test_model.py checks
    # MODEL_PICKS against the model)
    assert _auto((4096, 1_000_000, 512)) == "triton"
    assert _auto((4096, 1_000_000, 512), torch.float16) == "cuda"
    bt.write(bt.table_path(), [_entry("cuda")])
    assert _auto((4096, 1_000_000, 512)) == "cuda"                 # measured faster: wins
    assert _auto((4096, 1_000_000, 128)) == "cuda"                 # the nearest entry
    assert _auto((4096, 1_000_000, 128), torch.float16) == "triton"  # not measured in fp16: model
    assert _auto((4096, 1_000_000, 512), torch.float64) == "torch"    # no GPU kernel for fp64
    # explicit choices are never overridden
    assert core.resolve_backend("triton", torch.device("cuda", 0), torch.bfloat16,
                                (4096, 1_000_000, 512)) == "triton"


def test_auto_skips_a_measured_backend_that_cannot_run(cuda_like):
    bt.write(bt.table_path(), [_entry("cuda")])
    cuda_like["cuda"] = "the extension was built without CUDA"
    assert _auto((4096, 1_000_000, 512)) == "triton"


def test_auto_skips_the_models_pick_when_it_cannot_run(cuda_like):
    cuda_like["cuda"] = "the extension was built without CUDA"
    assert _auto((4096, 1_000_000, 512)) == "triton"
    cuda_like["cuda"], cuda_like["triton"] = None, "Triton is not installed"
    assert _auto((4096, 1_000_000, 128)) == "cuda"


def test_static_choice_by_shape_bucket():
    """The model's picks (MODEL_PICKS) looked up by the shape's power-of-two bucket, clamped to
    the grid; unknown sizes take MODEL_SHAPE's; sm_8x reads the A100 picks, sm_9x the H100's; an
    arch or dtype without a model gives None (core falls back to triton, then cuda)."""
    # bf16 at B = 4096, C = 2^20: the H100 runs resident.py's kernels at D = 512 (triton), the
    # A100 margin_lse.py's (cuda is modelled faster there); both pick triton at D = 128
    i = bt.MODEL_B.index(4096) * len(bt.MODEL_C) + bt.MODEL_C.index(1 << 20)
    h100, a100 = bt.MODEL_PICKS["h100", "bfloat16"], bt.MODEL_PICKS["a100", "bfloat16"]
    assert (h100[512][i], h100[128][i], a100[512][i], a100[128][i]) == ("t", "t", "c", "t")
    assert bt.static_choice("9.0", "bfloat16", 3000, 1_000_000, 512) == "triton"
    assert bt.static_choice("8.0", "bfloat16", 3000, 1_000_000, 512) == "cuda"
    assert bt.static_choice("8.0", "bfloat16", 3000, 1_000_000, 100) == "triton"   # D → 128
    assert bt.static_choice("8.0", "bfloat16", None, None, None) == "cuda"    # MODEL_SHAPE
    assert bt.static_choice("8.0", "bfloat16", None, None, 128) == "triton"
    # clamped: B = 8 → 256, C = 10^9 → 2^24, D = 4096 → 1024
    last = bt.MODEL_PICKS["a100", "float32"]
    assert bt.static_choice("8.6", "float32", 8, 10**9, 4096) == {"t": "triton", "c": "cuda"}[
        last[1024][len(bt.MODEL_C) - 1]]
    # A100 fp32 at D = 512: cuda's fp32 GEMMs run on the CUDA cores (torch's default), triton's
    # on 3×TF32: triton is modelled faster there
    assert bt.static_choice("8.0", "float32", 4096, 1_000_000, 512) == "triton"
    assert bt.static_choice("10.0", "bfloat16", 4096, 1_000_000, 512) is None
    assert bt.static_choice("9.0", "float64", 4096, 1_000_000, 512) is None


def test_unmodelled_arch_keeps_the_static_order(cuda_like, monkeypatch):
    monkeypatch.setattr(core, "_cuda_arch", lambda index: "12.0")
    assert _auto((4096, 1_000_000, 512)) == "triton"


def test_symbolic_sizes_match_any_entry(cuda_like):
    """Under torch.compile with dynamic shapes the sizes are SymInts: not looked up (no guard,
    no specialisation), the arch and dtype still select the table's entries; without a table the
    model's pick takes MODEL_SHAPE's size for them."""

    class Sym:   # stands for a SymInt: not a Python int
        pass

    assert _auto((Sym(), 1_000_000, 128)) == "triton"
    bt.write(bt.table_path(), [_entry("cuda")])
    assert _auto((Sym(), 1_000_000, 512)) == "cuda"


def test_cpu_never_reads_the_table(monkeypatch, tmp_path):
    monkeypatch.setattr(bt, "table_path", lambda: str(tmp_path / bt.FILENAME))
    bt.write(bt.table_path(), [_entry("cuda", arch="9.0")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert core.resolve_backend("auto", torch.device("cpu"), torch.float32, (8, 8, 8)) in (
            "cpp", "torch")


# --- make gpu-check writes the table (scripts/gpu_check.py, marginbench/modelreport.py) ---------

def _gpu_check():
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for sub in ("scripts", "benchmarks"):
        if os.path.join(root, sub) not in sys.path:
            sys.path.insert(0, os.path.join(root, sub))
    import gpu_check

    return gpu_check


def _bench_csv(path, times: dict):
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["provider", "family", "mode", "B", "C", "D", "dtype",
                                           "median_ms", "status"])
        w.writeheader()
        for (provider, B), ms in times.items():
            w.writerow(dict(provider=provider, family="arcface", mode="forward+backward", B=B,
                            C=100_000, D=512, dtype="bfloat16", median_ms=ms, status="ok"))
        w.writerow(dict(provider="cuda", family="arcface", mode="forward", B=1024, C=100_000,
                        D=512, dtype="bfloat16", median_ms=0.001, status="ok"))   # not fwd+bwd


def test_every_bench_call_of_the_sweep_keeps_its_own_csv(tmp_path):
    """bench_fused.py writes <out>/bench.csv: the sweep's calls must not share an --out, or each
    overwrites the previous one's measurements."""
    gc = _gpu_check()
    cmds = gc.sweep_commands(gc.plan_sweep(200), str(tmp_path), 200)
    outs = [cmd[cmd.index("--out") + 1] for _, cmd, _ in cmds]
    assert len(cmds) > 1 and len(set(outs)) == len(outs)


def test_model_stage_tabulates_and_writes_the_measured_winners(tmp_path, monkeypatch):
    """The model stage reads every sweep CSV, prints model and measurement side by side and
    writes the winner of each measured point; a dry run leaves the user's cache alone."""
    gc = _gpu_check()
    monkeypatch.setattr(bt, "table_path", lambda: str(tmp_path / "cache" / bt.FILENAME))
    (tmp_path / "sweep-plan.json").write_text(json.dumps(
        {"points": {"bfloat16": [[1024, 100_000], [2048, 100_000], [4096, 100_000]]}}))
    _bench_csv(tmp_path / "bench" / "a" / "bench.csv", {("triton", 1024): 2.0,
                                                        ("cuda", 1024): 1.0})
    _bench_csv(tmp_path / "bench" / "b" / "bench.csv", {("triton", 2048): 3.0})
    st = gc.stage_model(str(tmp_path), dry=True)
    assert st.status == "planned" and "2 measured winners" in st.detail
    table = json.load(open(tmp_path / "auto-backend.json"))
    assert [(e["B"], e["backend"], e["ms"]) for e in table["entries"]] == [
        (1024, "cuda", {"triton": 2.0, "cuda": 1.0}),
        (2048, "triton", {"triton": 3.0})]
    assert all(set(e["model_ms"]) == {"triton", "cuda"} for e in table["entries"])
    text = (tmp_path / "model-vs-measured.md").read_text()
    assert "| bfloat16 B=1024 C=100K D=512 | marginops cuda |" in text
    # not measured: the model's pick (triton at D = 512 on the H100 in bf16, benchmarks/model.py)
    assert "| bfloat16 B=4096 C=100K D=512 | triton | not measured | triton (model) |" in text
    assert not (tmp_path / "cache").exists()


def test_model_stage_on_a_gpu_writes_the_table_where_auto_reads_it(tmp_path, monkeypatch):
    gc = _gpu_check()
    monkeypatch.setattr(bt, "table_path", lambda: str(tmp_path / "cache" / bt.FILENAME))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    (tmp_path / "sweep-plan.json").write_text(json.dumps({"points": {"bfloat16": [[1024, 100_000]]}}))
    _bench_csv(tmp_path / "bench" / "a" / "bench.csv", {("triton", 1024): 2.0, ("cuda", 1024): 1.0})
    st = gc.stage_model(str(tmp_path), dry=False)
    assert st.status == "ok" and str(tmp_path / "cache") in st.detail
    assert bt.choose("9.0", "bfloat16", 1000, 100_000, 512) == "cuda"
