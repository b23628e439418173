"""Triton kernels of the core op (shared/DESIGN.md §3, `triton` backend).

    margin_lse.py  fused margin-softmax reduction: kernels → launcher → registered ops → autograd
    resident.py    the same reduction with the program's own tile resident over the whole D
                   (FlashAttention's shape): bf16 on sm_90 at D = 128 / 256 / 512
    topk.py        streaming per-row top-k of cosines (no logits in memory)
    tiles.py       tile helpers both inline (cosine tile, logit epilogue, second-GEMM operand)
    launch.py      the op's inputs as the kernels want them, device guard, dot precision,
                   configurations, class splits, autotuning
    waves.py       class splits planned in whole waves of the SMs × programs per SM (pure Python)
    configs.py     every kernel configuration the launcher can pick
    _compat.py     support for the oldest Triton supported (3.5) in the interpreter

Importing this package imports triton and defines the kernels. Triton decides at *definition* time
whether a kernel runs in its CPU interpreter (``TRITON_INTERPRET=1``) or is compiled for a GPU, so the
variable must be set before this package is first imported. Users should not import it directly:
``marginops.ops.triton`` imports it lazily on first use and reports a clear reason when it cannot run.
"""

from __future__ import annotations


def interpreting() -> bool:
    """True when the kernels of this process were defined in interpreter mode (CPU tensors)."""
    from .margin_lse import interpreting as _interp

    return _interp()
