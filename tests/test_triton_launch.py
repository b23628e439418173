"""Launch discipline of the Triton backend, checked without a GPU (shared/DESIGN.md §8).

The interpreter runs programs one after another on CPU tensors, so device and stream mistakes are
invisible to it. These checks hold the launchers to the rules by construction:

* every kernel launch (``kernel[grid](...)``) in marginops/triton sits lexically inside
  ``with device_guard(<device>):`` — Triton launches on the *current* device and stream;
* ``device_guard`` makes a CUDA tensor's device current (and so its current stream), and is a
  no-op for CPU tensors;
* the fp32 dot precision is read through an API that works whichever torch precision API the
  user set (the legacy ``allow_tf32`` raises once the new ``fp32_precision`` has been used).
"""

from __future__ import annotations

import ast
import contextlib
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from marginops.triton import margin_lse as ml  # noqa: E402

TRITON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "marginops", "triton")


def _kernel_names(tree: ast.Module) -> set[str]:
    """Functions decorated with @triton.jit in a module."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if ast.unparse(dec) in ("triton.jit", "jit"):
                    names.add(node.name)
    return names


def _launches(tree: ast.AST, kernels: set[str]):
    """(line, guarded) for every ``kernel[grid](...)`` call; guarded = inside ``with device_guard``."""
    out = []

    def visit(node, guarded):
        if isinstance(node, ast.With):
            guarded = guarded or any(
                isinstance(item.context_expr, ast.Call)
                and ast.unparse(item.context_expr.func).split(".")[-1] == "device_guard"
                for item in node.items)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and ast.unparse(node.func.value).split(".")[-1] in kernels):
            out.append((node.lineno, guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return out


def test_every_triton_launch_is_device_guarded():
    sources = {}
    for name in sorted(os.listdir(TRITON_DIR)):
        if name.endswith(".py"):
            with open(os.path.join(TRITON_DIR, name)) as fh:
                sources[name] = ast.parse(fh.read())
    kernels = set().union(*(_kernel_names(t) for t in sources.values()))
    assert {"_fwd_kernel", "_bwd_df_kernel", "_bwd_dw_kernel", "_topk_kernel"} <= kernels
    found, unguarded = 0, []
    for name, tree in sources.items():
        for line, guarded in _launches(tree, kernels):
            found += 1
            if not guarded:
                unguarded.append(f"marginops/triton/{name}:{line}")
    assert found >= 6, f"only {found} launch sites found: the check no longer sees them"
    assert not unguarded, f"Triton launches outside `with device_guard(...)`: {unguarded}"


def test_device_guard_selects_the_tensors_device():
    guard = ml.device_guard(torch.device("cuda", 1))  # constructing it touches no GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(ml.device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.parametrize("setting,expected", [
    (("legacy", True), "tf32"), (("legacy", False), "tf32x3"),
    (("cuda.matmul", "tf32"), "tf32"), (("cuda.matmul", "ieee"), "tf32x3"),
    (("global", "tf32"), "tf32"), (("global", "ieee"), "tf32x3"),
])
def test_dot_precision_under_both_torch_apis(setting, expected):
    api, value = setting
    matmul = torch.backends.cuda.matmul
    if api != "legacy" and not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    saved = {}
    if hasattr(matmul, "fp32_precision"):
        saved = {"m": matmul.fp32_precision, "g": torch.backends.fp32_precision}
    try:
        if api == "legacy":
            matmul.allow_tf32 = value
        elif api == "cuda.matmul":
            matmul.fp32_precision = value
        else:
            torch.backends.fp32_precision = value
        assert ml._dot_precision(torch.empty(1, 4)) == expected
        assert ml._dot_precision(torch.empty(1, 4, dtype=torch.float16)) == "tf32"
    finally:
        if saved:
            torch.backends.fp32_precision = saved["g"]
            matmul.fp32_precision = saved["m"]
        else:
            matmul.allow_tf32 = False


def test_triton_older_than_supported_is_reported(monkeypatch):
    import importlib.metadata

    import marginops.ops.triton as binding

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.4.0")
    reason = binding.availability("triton", torch.device("cuda"))
    assert reason is not None and "3.4" in reason and "3.5" in reason


@pytest.mark.parametrize("name", ["weight", "scale", "bias", "target_col", "class_index",
                                  "hard_tau", "hard_t"])
def test_every_input_must_be_on_the_features_device(name):
    """Checked before any launch: a tensor on another device would be read through a foreign
    pointer (here: "meta", which any device mismatch stands for)."""
    args = dict(features=torch.zeros(4, 16), weight=torch.zeros(10, 16), scale=torch.ones(4),
                bias=torch.zeros(10), target_col=torch.zeros(4, dtype=torch.long),
                class_index=torch.arange(10), hard_tau=torch.ones(4), hard_t=torch.tensor(0.1))
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but features are on cpu"):
        ml._Args(**args, normalize_weight=True, subcenters=1)
