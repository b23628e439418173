"""One seed per test, derived from a name, so that a test's random draws do not depend on which
tests ran before it (shuffled order, ``-k`` selections, a spawned worker's case order).

``seed_everything(key)`` seeds torch (CPU and every CUDA device), numpy's global state and
Python's ``random`` with ``stable_seed(key)``: a SHA-256 of the key, not ``hash()``, which
Python salts per process.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

BASE = "marginops-tests"


def stable_seed(key: str) -> int:
    """A 31-bit seed from ``key``: the same in every process, on every machine, in any order."""
    digest = hashlib.sha256(f"{BASE}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def seed_everything(key: str) -> int:
    seed = stable_seed(key)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and all CUDA devices
    return seed
