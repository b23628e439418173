"""Cases on gloo ranks in spawned processes: the one harness the distributed test files share.

Spawning is the slow part (a torch import per process), so a test file spawns ONE set of ranks
per world size, and every rank runs all of the file's ``CASES`` (name → ``case(rank, world)``) in
sequence, seeding each from its name (tests/seeding.py), recording "ok" or the traceback in a JSON
file of its own after every case (a later hang keeps earlier verdicts). The pytest side only reads
those records (:func:`check_case`). Each case must finish its collectives before it asserts, so a
failing case cannot desynchronise the ranks for the next. The process group has a short timeout
and the spawn a deadline: a hang fails the tests instead of blocking CI.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from seeding import seed_everything


def _worker(rank: int, world: int, module_name: str, store_path: str, out_dir: str,
            pg_timeout_s: float) -> None:
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)
    cases = importlib.import_module(module_name).CASES
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=pg_timeout_s))
    results: dict[str, str] = {}
    out = os.path.join(out_dir, f"rank{rank}.json")
    for name, case in cases.items():
        # the same seed on every rank and in any case order: module inits and draws agree
        seed_everything(f"tests/{module_name}.py::{name}")
        try:
            case(rank, world)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - recorded and reported by the pytest side
            results[name] = traceback.format_exc()
        with open(out + ".tmp", "w") as fh:
            json.dump(results, fh)
        os.replace(out + ".tmp", out)
    dist.destroy_process_group()


def run_cases(module_name: str, world_sizes: tuple[int, ...], *, pg_timeout_s: float = 30,
              deadline_s: float = 240) -> dict[int, tuple[list[dict[str, str]], str | None]]:
    """Spawn every world size of ``world_sizes`` at once, each running ``module_name``'s CASES;
    wait (at most ``deadline_s`` in all) and return ``{world: (per-rank records, problem)}``,
    ``problem`` saying why ranks stopped early (deadline, a crash outside a case) or None."""
    deadline = time.monotonic() + deadline_s
    started = {}
    for world in world_sizes:
        tmp = tempfile.mkdtemp(prefix=f"marginops_{module_name}{world}_")
        ctx = mp.start_processes(_worker, nprocs=world, join=False, start_method="spawn",
                                 args=(world, module_name, os.path.join(tmp, "store"), tmp,
                                       pg_timeout_s))
        started[world] = (ctx, tmp)
    return {world: _collect(world, ctx, tmp, deadline, deadline_s)
            for world, (ctx, tmp) in started.items()}


def _collect(world: int, ctx, tmp: str, deadline: float, deadline_s: float):
    problem = None
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                problem = f"world {world}: workers still running after {deadline_s}s"
                break
    except Exception as err:  # noqa: BLE001 - a worker died outside a case
        problem = f"world {world}: {type(err).__name__}: {err}"
    finally:
        for proc in ctx.processes:  # only the processes this test started
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    paths = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
    return [json.load(open(p)) if os.path.exists(p) else {} for p in paths], problem


def check_case(results, world: int, case: str) -> None:
    """Fail with every rank's traceback unless each rank of ``world`` recorded ``case`` as ok."""
    per_rank, problem = results[world]
    missing = [r for r in range(world) if case not in per_rank[r]]
    assert not missing, f"ranks {missing} never finished {case!r}; {problem or ''}"
    failures = {r: per_rank[r][case] for r in range(world) if per_rank[r][case] != "ok"}
    assert not failures, "\n".join(f"--- rank {r}:\n{tb}" for r, tb in failures.items())
