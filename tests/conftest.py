"""Suite-wide fixtures: every test starts from a seed of its own (tests/seeding.py).

The seed comes from the test's node id (file, name and parameters), so a test draws the same
numbers whatever ran before it: in a shuffled order (``-p random_order --random-order``), in a
``-k`` selection, or alone. Function-scoped autouse fixtures are set up before the test's other
function-scoped fixtures, so module construction inside a test or its fixtures is seeded too.
Module- or session-scoped fixtures are set up before this one and must seed their own draws
(tests/test_distributed.py's spawned workers do, per case).
"""

from __future__ import annotations

import pytest
from seeding import seed_everything


@pytest.fixture(autouse=True)
def _seed_every_test(request):
    seed_everything(request.node.nodeid)
