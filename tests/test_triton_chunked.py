"""chunked.py's backward (one logit recompute, two GEMMs per chunk of classes) in Triton's CPU
interpreter against the dense oracle (tests/contract_oracle.py), with test_triton_interpreter.py's
harness.

On a GPU it serves bf16 on sm_90 at D = 256 and 512 without bias; the interpreter cannot
run bf16 dots, so these tests force the resident kernels (``configs.force(resident=True)``) on
fp32 inputs, whose code is bf16's. The interpreter's chunks are 48 columns (chunked.backward),
so every case crosses chunk and split boundaries.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_triton_chunked.py   # direct
    .venv/bin/python -m pytest tests/test_triton_chunked.py   # re-runs itself in a child
"""

from __future__ import annotations

import time

import pytest
import torch
from interpreter import outside_interp, requires_interp, run_in_interpreter
from test_triton_interpreter import _compare, _problem
from test_triton_resident import _Counting

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")

KERNELS = ("_dd_kernel", "_df_gemm_kernel", "_dw_gemm_kernel")


@outside_interp
def test_interpreter_subprocess():
    t0 = time.time()
    tail = run_in_interpreter(__file__)
    print(f"interpreter run took {time.time() - t0:.0f}s\n{tail}")


def _counted(monkeypatch):
    from marginops.triton import chunked, resident

    counters = {k: _Counting(getattr(chunked, k)) for k in KERNELS}
    for name in ("_bwd_df_res_kernel", "_bwd_dw_res_kernel"):
        counters[name] = _Counting(getattr(resident, name))
    for name, counter in counters.items():
        monkeypatch.setattr(chunked if name in KERNELS else resident, name, counter)
    return counters


CASES = {
    # id: (B, C, D, options); 129 columns = chunks of 48, 48 and 33
    "plain-37x129x512": (37, 129, 512, {}),
    "plain-37x129x256": (37, 129, 256, {}),       # one D chunk: all of F a register operand
    "partial-fc-37x260x512": (37, 260, 512, dict(index=True, hard=True)),  # 130 sampled columns
    "hard-negatives-37x129x512": (37, 129, 512, dict(hard=True)),
    "unnormalized-5x100x512": (5, 100, 512, dict(normalize=False)),
    "zero-weight-row-21x70x512": (21, 70, 512, dict(zero_row=True)),
}


@requires_interp
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_backward_matches_oracle(case, monkeypatch):
    """chunked.py's kernels (the resident forward, then per chunk dd', dF, dW) against the
    oracle, and they ran once per chunk; resident.py's backward kernels did not."""
    B, C, D, opts = CASES[case]
    counters = _counted(monkeypatch)
    factors = None
    if not opts.get("normalize", True):
        # unnormalised rows: |z| reaches 400 (test_triton_resident.py says why this needs room)
        factors = {"grad_weight": 20.0}
    _compare(_problem(B, C, D, **opts), torch.float32, resident=True, factors=factors)
    chunks = -(-(C // 2 if opts.get("index") else C) // 48)
    assert {k: c.launches for k, c in counters.items()} == {
        **{k: chunks for k in KERNELS}, "_bwd_df_res_kernel": 0, "_bwd_dw_res_kernel": 0}


@requires_interp
@pytest.mark.parametrize("splits", [1, 7])
@pytest.mark.parametrize("chunk", [16, 32, 1024])
def test_chunked_splits_chunks_and_a_single_row(splits, chunk, monkeypatch):
    """Split counts 1 and 7 (more than some chunks' tiles: empty splits store zeros), chunks of
    one tile, two tiles and wider than C, and B = 1."""
    from marginops.triton import configs

    counters = _counted(monkeypatch)
    with configs.force(chunk=chunk):
        _compare(_problem(1, 45, 512, hard=True), torch.float32, splits=splits, resident=True)
        _compare(_problem(19, 70, 512), torch.float32, splits=splits, resident=True)
    assert counters["_dd_kernel"].launches == -(-45 // chunk) + -(-70 // chunk)


@requires_interp
@pytest.mark.parametrize("chunk", [16, 1024])
def test_chunked_partial_fc_duplicate_classes(chunk):
    """Partial FC with a class sampled four times and another three times, in one chunk and
    across chunks: each column's gradient is computed on its own and the columns of one class
    are summed (as on every backend); classes never sampled get exactly zero."""
    from marginops.triton import configs

    p = _problem(19, 40, 512, index=True, hard=True)
    p["cidx"] = torch.tensor([3, 7, 3, 11, 7, 7, 0, 39, 3, 20, 21, 22, 23, 24, 25, 26, 27, 3])
    p["tcol"] = p["tcol"].clamp(max=p["cidx"].numel() - 1)
    with configs.force(chunk=chunk):
        _compare(p, torch.float32, splits=2, resident=True)


@requires_interp
def test_chunked_is_chosen_only_where_it_applies():
    """D = 256 and 512 without bias (class_index or not), fp32 / bf16; not fp16, D = 128, bias,
    or with force(chunked=False) (then resident.py's backward runs)."""
    from marginops.triton import configs, margin_lse

    def args(D, dtype=torch.float32, bias=False, index=False):
        f = torch.randn(4, D, dtype=dtype)
        w = torch.randn(6, D, dtype=dtype)
        return margin_lse._Args(f, w, torch.ones(4), torch.zeros(6) if bias else None,
                                torch.zeros(4, dtype=torch.long),
                                torch.arange(3) if index else None, None, None, True, 1)

    with configs.force(resident=True):
        assert args(512).chunked and args(256).chunked
        assert not args(128).chunked
        assert not args(512, torch.float16).chunked
        assert not args(512, bias=True).chunked and args(512, index=True).chunked
        with configs.force(chunked=False):
            assert not args(512).chunked and args(512).resident
    assert not args(512).chunked  # resident.py's kernels off: the general ones


@requires_interp
def test_resident_backward_still_serves_when_chunked_is_off(monkeypatch):
    """force(chunked=False) at D = 512: resident.py's two backward kernels, against the oracle."""
    from marginops.triton import configs

    counters = _counted(monkeypatch)
    with configs.force(chunked=False):
        _compare(_problem(37, 129, 512), torch.float32, resident=True)
    assert counters["_bwd_df_res_kernel"].launches == 1
    assert counters["_dd_kernel"].launches == 0


def test_chunk_plan_is_whole_waves_within_the_budget():
    """waves.plan_chunk: CC = k·64·SMs at D = 512 (the dW GEMM's 128 × 256 tiles, two along D:
    k·SMs programs), k·128·SMs at D = 256 (one), the largest k within CHUNK_BYTES, at least 1;
    never wider than N needs; a multiple of 128 (every tile) for an odd SM count too."""
    from marginops.triton import waves

    assert waves.plan_chunk(4096, 10**6, 132, 2) == 64 * 132          # 69 MB: k = 1
    assert waves.plan_chunk(1024, 10**6, 132, 2) == 7 * 64 * 132      # k = 7
    assert waves.plan_chunk(65536, 10**6, 132, 2) == 64 * 132         # over: k = 1
    assert waves.plan_chunk(1024, 1000, 132, 2) == 1024               # N = 1000
    for B in (1024, 4096, 8192):
        cc = waves.plan_chunk(B, 10**6, 108, 2)
        assert cc % (64 * 108) == 0 and (B * cc * 2 <= waves.CHUNK_BYTES or cc == 64 * 108)
    assert waves.plan_chunk(4096, 10**6, 57, 2) == 4 * 3712  # 64·57 rounded up to 29·128
    assert waves.plan_chunk(4096, 10**6, 132, 2, d_tiles=1) == 128 * 132    # 132 MiB: k = 1
    assert waves.plan_chunk(1024, 10**6, 132, 2, d_tiles=1) == 3 * 128 * 132


@pytest.mark.parametrize("n_sm", [132, 108])
@pytest.mark.parametrize("D", [256, 512])
def test_chunked_grids_are_whole_waves(n_sm, D):
    """The launcher's plan (waves.chunked_plan) for B ≥ 1024 and C from 100K to 10M: each of a
    full chunk's three grids wastes < 10 % of the GPU's program slots (one program per SM;
    useful tile steps / (waves × SMs × the longest program's steps))."""
    from marginops.triton import configs, waves

    dd, df, dw = (configs.CHUNKED[k] for k in ("dd", "df_gemm", "dw_gemm"))

    def eff(programs: int, steps: int, longest: int) -> float:
        return steps / (-(-programs // n_sm) * n_sm * longest)

    worst = (1.0, None)
    for B in (1024, 1025, 2000, 4096, 8192, 16384, 65536):
        for C in (100_000, 1_000_000, 10_000_000):
            p = waves.chunked_plan(B, C, D, n_sm, 2, dd, df, dw)
            width = min(p.cc, C)
            rt, s = p.dd_grid
            ct = -(-width // dd.block_n)
            kt = -(-width // df.block_d)
            tiles = p.df_grid[0] * p.df_grid[1]
            for name, e in (
                    ("dd", eff(rt * s, rt * ct, p.cols_per_split // dd.block_n)),
                    ("df", eff(tiles * p.df_grid[2], tiles * kt, p.k_tiles_per_split)),
                    ("dw", eff(p.dw_grid[0] * p.dw_grid[1], p.dw_grid[0] * p.dw_grid[1], 1))):
                if e < worst[0]:
                    worst = (e, (name, B, C, p))
    assert worst[0] >= 0.90, f"wave efficiency {worst[0]:.1%} at {worst[1]}"
