"""Compatibility of the kernels with the Triton versions marginops supports (3.5 – 3.9).

Only the CPU interpreter (``TRITON_INTERPRET=1``) needs help today. Triton ≤ 3.6's interpreter
holds every scalar (kernel int arguments, ``tl.program_id``, their arithmetic) as a 1-element numpy
array and converts it for ``range(...)`` with ``int(array)``; numpy ≥ 2.4 refuses that ("only
0-dimensional arrays can be converted to Python scalars"), so every kernel with a loop fails.
Triton 3.7+ squeezes the array first. ``patch_interpreter`` makes the older interpreter do the same:
it wraps the interpreter's own ``_patch_lang_tensor`` (which re-installs ``tensor.__index__`` on
every launch) and installs the squeezing ``__index__`` after it. Compiled kernels are untouched.
"""

from __future__ import annotations

import inspect

import numpy as np


def _index(self) -> int:
    return int(np.asarray(self.handle.data).squeeze())  # as Triton ≥ 3.7 does


def patch_interpreter() -> bool:
    """Install the fix when this Triton's interpreter needs it; True when installed (idempotent).

    Needed exactly where the interpreter has the one-argument ``_patch_lang_tensor(tensor)`` of
    Triton ≤ 3.6 (3.7+ changed it to take a scope, and squeezes by itself).
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False
    if getattr(original, "_marginops_compat", False):
        return True
    if len(inspect.signature(original).parameters) != 1:
        return False

    def patched(tensor):
        original(tensor)
        tensor.__index__ = _index

    patched._marginops_compat = True
    interpreter._patch_lang_tensor = patched
    return True
