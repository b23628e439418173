"""marginops' main benchmark: the fused margin-softmax loss against what users run today.

    python benchmarks/bench_fused.py                           # CPU defaults, < 5 min on 2 cores
    python benchmarks/bench_fused.py --gpu                     # the GPU sweep (default on CUDA)
    python benchmarks/bench_fused.py --preset million-classes  # fp32 ArcFace at C=100K and 1M
    python benchmarks/bench_fused.py --quick                   # tiny smoke run (used by a test)
    python benchmarks/bench_fused.py --classes 1m --batch 4096 --dim 512 --dtype bfloat16 --model
                                                               # exactly that case, with the model
    python benchmarks/bench_fused.py --train-step              # a whole training step of the head:
                                                               # memory and time, 3 optimizer paths

Providers, as the tables name them: naive PyTorch, naive + torch.compile, marginops torch / cpp /
cuda / triton, F.linear_cross_entropy (plain CE), pytorch-metric-learning, bare GEMMs; each one
that cannot run here is recorded with the reason in the CSV's ``status``.

The code is the package ``benchmarks/marginbench``: ``providers`` (what is timed), ``worker`` (the
fresh measurement process), ``planning`` (cases and tasks), ``report`` (rows, table, CSV, plots),
``driver`` (command line and the run; its docstring says how everything is measured);
``--train-step``: ``trainstep`` (the three paths and their measurement process), ``trainrun``
(cases and run), ``trainreport`` (rows, tables, plot, bytes per class and GPU capacity).
``benchmarks/model.py`` is the GPU roofline model printed by ``--model``.

Output, in ``benchmarks/results/<machine>/`` (``--out`` to change): ``bench.csv`` (one tidy row per
provider × case × mode, with machine, versions and timestamp), ``bench.md`` (the table printed at
the end), ``time_vs_classes.png`` and ``memory_vs_classes.png`` (log-log), ``model.md`` with
``--model``. Presets write ``bench-<preset>.*``.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import marginops  # noqa: F401  (installed with pip install -e .)
except ImportError:  # running from a checkout without PYTHONPATH=.
    sys.path.insert(0, ROOT)
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
if HERE not in sys.path:   # the marginbench package and model.py live next to this file
    sys.path.insert(0, HERE)

from marginbench.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
