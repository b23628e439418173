"""The suite's seeding (tests/conftest.py, tests/seeding.py): every test starts from a seed that
depends on its node id only, the same in every process and in any order."""

from __future__ import annotations

import random

import numpy as np
import torch
from seeding import seed_everything, stable_seed


def _draws():
    return torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random()


def test_every_test_starts_from_its_own_seed(request):
    first = _draws()  # before anything else in this test: the fixture's state
    seed_everything(request.node.nodeid)
    assert _draws() == first


def test_stable_seed_is_a_fixed_function_of_the_key():
    # a constant, not hash(): Python salts str hashes per process (spawned workers, reruns)
    assert stable_seed("tests/test_x.py::test_y[1]") == 654358087
    assert stable_seed("a") != stable_seed("b")
    assert 0 <= stable_seed("a") < 2 ** 31
