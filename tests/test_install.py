"""Installing the way users type it (issue 9), and the extension loader (marginops/build.py).

Fast checks: the build needs no torch, the sdist ships every source, the cache key and the refusal
of binaries built for another torch, importing compiles nothing, a failing compiler degrades to the
torch backend with one warning, a stale in-place ``marginops/_C*.so`` is ignored with a warning.

Slow (still in CI): in fresh venvs holding only ``torch==<this torch>``, the literal
``pip install -e .`` on a copy of the checkout, then three processes at once running a loss on
``cpp`` with an empty cache and no ninja on PATH (one compiles, all succeed), then
``pip install --no-build-isolation .``; and an sdist built here, unpacked, installed with the
literal ``pip install .`` in another venv. The venvs are hard-linked copies of one fresh venv
(torch is installed once); pip's cache is the user's, so nothing is downloaded twice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import warnings
from pathlib import Path

import pytest
import tomllib
import torch

from marginops import build

ROOT = Path(__file__).resolve().parents[1]
TORCH_SPEC = f"torch=={torch.__version__}"


def _env(**extra: str) -> dict:
    """The environment of a user's shell: no PYTHONPATH pointing into this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(extra)
    return env


def _run(cmd: list[str], timeout: int = 300, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _checkout_files() -> list[str]:
    """The checkout's files as a fresh clone would hold them (tracked + new, not ignored)."""
    out = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT)
    return sorted(p for p in out.stdout.split("\0") if p and (ROOT / p).is_file())


def _copy_checkout(dest: Path) -> Path:
    for rel in _checkout_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


def _build_sdist(dest: Path) -> Path:
    """``python -m build --sdist --no-isolation`` without the ``build`` package: the PEP 517 hook."""
    src = _copy_checkout(dest / "src")
    hook = f"import setuptools.build_meta as b; print(b.build_sdist({str(dest)!r}))"
    name = _run([sys.executable, "-c", hook], cwd=src, env=_env()).stdout.strip().splitlines()[-1]
    return dest / name


# ------------------------------------------------------------------------------------------------
# Packaging: no torch at build time, a complete sdist
# ------------------------------------------------------------------------------------------------

def test_build_requires_no_torch():
    """pip's isolated build environment must never pull a torch (issue 9: 5.4 GB of CUDA wheels)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = pyproject["build-system"]["requires"]
    assert not [r for r in requires if r.lower().startswith(("torch", "nvidia", "triton"))], requires
    assert not (ROOT / "setup.py").exists() or "import torch" not in (ROOT / "setup.py").read_text()
    deps = pyproject["project"]["dependencies"]
    assert any(d.startswith("torch>=") for d in deps) and "ninja" in deps
    for extra in ("test", "bench", "examples"):
        assert pyproject["project"]["optional-dependencies"][extra]
        assert f"[{extra}]" in (ROOT / "README.md").read_text(), f"README does not list [{extra}]"


def test_sdist_ships_every_source_and_the_license(tmp_path):
    sdist = _build_sdist(tmp_path)
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(next(m for m in tar.getmembers()
                                        if m.name.endswith("/PKG-INFO") and m.name.count("/") == 1))
        metadata = pkg_info.read().decode()
    wanted = {p for p in _checkout_files()
              if p.startswith("marginops/") or p in ("LICENSE", "README.md", "pyproject.toml")}
    assert {p for p in wanted if p.startswith("marginops/csrc/")}, "no C++ sources found"
    assert "marginops/py.typed" in wanted
    assert wanted <= names, f"missing from the sdist: {sorted(wanted - names)}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]
    assert "License-Expression: Apache-2.0" in metadata
    assert "Copyright 2026 The marginops authors" in (ROOT / "LICENSE").read_text()
    for field in ("Summary: Fused", "Requires-Dist: torch>=", "Provides-Extra: bench",
                  "Classifier: Typing :: Typed", "## Install"):
        assert field in metadata, f"{field!r} not in PKG-INFO"


def test_wheel_is_pure_python_and_ships_the_sources(tmp_path):
    """One wheel for every torch: no binary bound to the torch it was built with (issue 9)."""
    import zipfile

    src = _copy_checkout(tmp_path / "src")
    hook = f"import setuptools.build_meta as b; print(b.build_wheel({str(tmp_path)!r}))"
    name = _run([sys.executable, "-c", hook], cwd=src, env=_env()).stdout.strip().splitlines()[-1]
    assert name.endswith("-py3-none-any.whl"), name
    names = set(zipfile.ZipFile(tmp_path / name).namelist())
    wanted = {p for p in _checkout_files() if p.startswith("marginops/")}
    assert wanted <= names, f"missing from the wheel: {sorted(wanted - names)}"
    assert not [n for n in names if n.endswith((".so", ".pyd", ".o"))]


# ------------------------------------------------------------------------------------------------
# The loader: cache key, refusal of another torch's binary, lazy and failing builds
# ------------------------------------------------------------------------------------------------

def test_cache_key_follows_torch_sources_and_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINOPS_CACHE", str(tmp_path / "cache"))
    cpu = build.build_dir(build.build_config(False))
    assert cpu == build.build_dir(build.build_config(False))           # deterministic
    assert cpu.parent.name == f"torch-{torch.__version__}-cpu-{sys.implementation.cache_tag}"
    assert cpu.is_relative_to(tmp_path / "cache")

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cuda = build.build_dir(build.build_config(True))
    assert cuda.parent.name.startswith(f"torch-{torch.__version__}-cu130-") and cuda != cpu
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert build.build_dir(build.build_config(True)) != cuda           # other architectures
    monkeypatch.undo()

    monkeypatch.setenv("MARGINOPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert build.build_dir(build.build_config(False)) != cpu      # another torch
    monkeypatch.undo()

    monkeypatch.setenv("MARGINOPS_CACHE", str(tmp_path / "cache"))
    csrc = tmp_path / "csrc"
    shutil.copytree(build.CSRC, csrc)
    monkeypatch.setattr(build, "CSRC", csrc)
    assert build.build_dir(build.build_config(False)) == cpu      # same sources, same key
    header = next(csrc.rglob("*.h"))
    header.write_text(header.read_text() + "\n// edited\n")
    assert build.build_dir(build.build_config(False)) != cpu      # edited sources
    header.unlink()
    assert build.build_dir(build.build_config(False)) != cpu      # a missing header


def test_cuda_kernels_only_with_cuda_torch_and_toolkit(tmp_path, monkeypatch):
    """CPU torch + nvcc, and CUDA torch without a toolkit, build the CPU kernels only."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("MARGINOPS_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    cases = {(None, "/usr/local/cuda"): False, ("13.0", None): False, ("13.0", "/usr/local/cuda"): True}
    for (torch_cuda, cuda_home), expected in cases.items():
        monkeypatch.setattr(torch.version, "cuda", torch_cuda)
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
        assert build.wants_cuda_kernels() is expected, (torch_cuda, cuda_home)
        assert (build.cuda_unavailable_reason() is None) is expected
    failed = build.build_dir(build.build_config(True))
    failed.mkdir(parents=True)
    (failed / "FAILED").write_text("nvcc: cusparse.h: No such file")
    assert build.wants_cuda_kernels() is False     # a recorded failure: CPU kernels, no retry


def test_binary_recorded_for_another_torch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINOPS_CACHE", str(tmp_path))
    config = build.build_config(False)
    directory = build.build_dir(config)
    directory.mkdir(parents=True)
    build.library_path(directory).write_bytes(b"not a library")
    assert build.cached_library(config) is None                        # no build.json: not built
    (directory / "build.json").write_text(json.dumps(dict(config, torch="2.0.0")))
    with pytest.warns(RuntimeWarning) as caught:
        assert build.cached_library(config) is None
    message = str(caught[0].message)
    assert "2.0.0" in message and torch.__version__ in message and "rebuilding" in message
    (directory / "build.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build.cached_library(config) == build.library_path(directory)


_LAZY_AND_FAILING = textwrap.dedent("""
    import json, os, warnings
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import marginops
        from marginops import build
        from marginops.ops import cpp
        torch.manual_seed(0)
        loss_fn = marginops.ArcFaceLoss(8, 10)
        after_import = {"loaded": build.loaded() != {},
                        "cache": os.path.exists(os.environ["MARGINOPS_CACHE"])}
        emb, labels = torch.randn(4, 8), torch.tensor([1, 2, 3, -1])
        auto = loss_fn(emb, labels)                        # auto: cpp fails to build -> torch
        status = marginops.backend_status("cpu")
        try:
            marginops.ArcFaceLoss(8, 10, backend="cpp")(emb, labels)
            explicit = ""
        except RuntimeError as err:
            explicit = str(err)
    print(json.dumps({"after_import": after_import, "auto": float(auto), "cpp": status["cpp"],
                      "explicit": explicit,
                      "warnings": [str(w.message) for w in caught if "marginops" in str(w.message)]}))
""")


def test_import_compiles_nothing_and_a_failing_build_falls_back_once(tmp_path):
    fake_cxx = tmp_path / "broken-c++"
    fake_cxx.write_text("#!/bin/sh\necho 'broken-c++: this compiler always fails' >&2\nexit 1\n")
    fake_cxx.chmod(0o755)
    cache = tmp_path / "cache"
    proc = _run([sys.executable, "-c", _LAZY_AND_FAILING], cwd=tmp_path,
                env=_env(MARGINOPS_CACHE=str(cache), CXX=str(fake_cxx), PYTHONPATH=str(ROOT)))
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["after_import"] == {"loaded": False, "cache": False}      # import and __init__ are cheap
    assert r["auto"] == r["auto"] and r["auto"] > 0                     # torch backend ran
    assert len(r["warnings"]) == 1, r["warnings"]
    assert "torch' backend still works" in r["warnings"][0]
    for reason in (r["cpp"], r["explicit"]):
        assert "compiling the marginops extension" in reason and "python -m marginops.build" in reason
    assert "marginops: compiling the C++ extension" in proc.stderr        # the one-line message


_STALE_INPLACE = textwrap.dedent("""
    import sys, warnings
    from pathlib import Path
    from marginops import build
    build.PACKAGE = Path(sys.argv[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build.load()
    print([str(w.message) for w in caught if "in-place" in str(w.message)])
""")


def test_stale_inplace_binary_is_ignored_with_a_warning(tmp_path):
    """A ``marginops/_C*.so`` from an old ``setup.py build_ext --inplace`` is never imported."""
    fake = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    fake.write_bytes(b"garbage that would crash dlopen")
    proc = _run([sys.executable, "-c", _STALE_INPLACE, str(tmp_path)], cwd=tmp_path,
                env=_env(PYTHONPATH=str(ROOT)))                    # the user's (prebuilt) cache
    caught = proc.stdout.strip().splitlines()[-1]
    assert str(fake) in caught and torch.__version__ in caught and "make clean" in caught


def test_build_ahead_of_time_and_info():
    """``python -m marginops.build`` (user cache, prebuilt by `make setup`) and ``marginops.info``."""
    env = _env(PYTHONPATH=str(ROOT))
    cli = [sys.executable, "-m", "marginops.build"]
    out = _run(cli + ["--cpu"], cwd=ROOT, env=env).stdout
    assert f"CPU kernels for torch {torch.__version__}: " in out and str(build.cache_root()) in out
    info = _run([sys.executable, "-m", "marginops.info"], cwd=ROOT, env=env).stdout
    assert f"cache     {build.cache_root()}" in info and "CPU kernels, built for this torch" in info
    assert any(line.split() == ["cpp", "available"] for line in info.splitlines())
    if torch.version.cuda is None:   # asking for CUDA kernels from a CPU torch: a clear refusal
        proc = _run(cli + ["--cuda"], cwd=ROOT, env=env, check=False)
        assert proc.returncode == 1 and "CPU-only build" in proc.stderr
        forced = _run(cli, cwd=ROOT, env=dict(env, MARGINOPS_FORCE_CUDA="1"), check=False)
        assert forced.returncode == 1 and "CPU-only build" in forced.stderr


# ------------------------------------------------------------------------------------------------
# Fresh venvs: the literal install commands
# ------------------------------------------------------------------------------------------------

RUN_LOSS = textwrap.dedent("""
    import json, torch, marginops
    from marginops import build
    emb = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 9, -1, 2, 3])
    losses = {}
    for backend in ("cpp", "torch"):
        torch.manual_seed(1)
        losses[backend] = float(marginops.ArcFaceLoss(16, 10, backend=backend)(emb, labels))
    print(json.dumps({"losses": losses, "library": str(build.loaded()["path"]),
                      "marginops": marginops.__file__, "sources": build._sources_digest(),
                      "torch": torch.__version__, "torch_file": torch.__file__}))
""")


@pytest.fixture(scope="module")
def torch_venv(tmp_path_factory) -> Path:
    """A fresh venv holding only this torch (from the local wheel / pip's cache)."""
    venv = tmp_path_factory.mktemp("venvs") / "base"
    _run([sys.executable, "-m", "venv", str(venv)], env=_env())
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", TORCH_SPEC], env=_env(), timeout=600)
    return venv


def _fresh_venv(base: Path, dest: Path) -> Path:
    _run(["cp", "-al", str(base), str(dest)])  # hard links: instant, and `base` stays untouched
    return dest / "bin" / "python"


def _freeze(python: Path) -> dict[str, str]:
    out = _run([str(python), "-m", "pip", "list", "--format=json"], env=_env()).stdout
    return {p["name"].lower(): p["version"] for p in json.loads(out)}


_FETCH = re.compile(r"(Collecting|Downloading|Processing|Using cached|Obtaining)\s+(\S+)")


def torch_fetches(pip_log: str) -> list[str]:
    """What pip fetched of torch or nvidia wheels, in its own process or in the isolated build
    environment's (``PIP_LOG`` is inherited by that pip, which appends to the same file)."""
    return [m.group(0) for m in _FETCH.finditer(pip_log)
            if re.match(r"(.*/)?(torch|nvidia)[-_=<>!~]", m.group(2).lower() + "-")]


def test_torch_fetches_sees_the_build_environment():
    """The old build (torch in [build-system] requires) logged exactly this, in the build env."""
    log = ("2026-11-30T06:02:05,352   Processing /opt/pypi-more/files/torch-2.14.1-cp311-cp311-"
           "manylinux_2_28_x86_64.whl\n  Collecting nvidia-cublas==13.1 (from torch)\n"
           "Requirement already satisfied: torch>=2.10 in /venv\nCollecting sympy (from torch>=2.10)\n"
           "Processing /opt/pypi/files/torchvision-0.29.1.whl\n")
    assert torch_fetches(log) == [
        "Processing /opt/pypi-more/files/torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl",
        "Collecting nvidia-cublas==13.1"]


def _pip_install(python: Path, args: list[str], cwd: Path, log: Path) -> str:
    """``pip install <args>`` as typed; pip's full log (build environment included) returned."""
    _run([str(python), "-m", "pip", "install", *args], cwd=cwd, env=_env(PIP_LOG=str(log)), timeout=600)
    return log.read_text()


def _assert_installed_without_torch(pip_log: str, before: dict, after: dict):
    assert "Installing build dependencies" in pip_log or "Building" in pip_log
    assert not torch_fetches(pip_log), torch_fetches(pip_log)
    assert after["torch"] == before["torch"]
    assert set(after) - set(before) <= {"marginops", "ninja", "numpy"}, set(after) - set(before)
    assert "marginops" in after


def _compiler_only_path(dest: Path) -> str:
    """A PATH with the C++ toolchain and no ninja: a user who runs the venv's python without
    activating the venv, on a machine without a system ninja (our `ninja` dependency must do)."""
    dest.mkdir()
    for tool in ("c++", "g++", "gcc", "cc", "as", "ld"):
        if shutil.which(tool):
            (dest / tool).symlink_to(os.path.realpath(shutil.which(tool)))
    return str(dest)


def _run_loss(python: Path, cache: Path, cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([str(python), "-c", RUN_LOSS], cwd=cwd, text=True, env=_env(
        MARGINOPS_CACHE=str(cache), **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _loss_result(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"running a loss failed:\n{out[-3000:]}\n{err[-3000:]}"
    r = json.loads(out.strip().splitlines()[-1])
    cpp, ref = r["losses"]["cpp"], r["losses"]["torch"]
    assert abs(cpp - ref) <= 1e-5 * abs(ref), r["losses"]               # fp32, same weights
    return r, err


@pytest.mark.slow
def test_pip_install_editable_in_fresh_venv(torch_venv, tmp_path):
    """The literal ``pip install -e .``; then 3 processes at once compile once and all run cpp.

    Each install test has its own empty cache, so the "compiles once" count holds in any test
    order (a cache shared with the sdist test was already filled when that one ran first)."""
    cache = tmp_path / "cache"
    python = _fresh_venv(torch_venv, tmp_path / "venv")
    src = _copy_checkout(tmp_path / "marginops-checkout")
    before = _freeze(python)
    pip_log = _pip_install(python, ["-e", "."], src, tmp_path / "pip.log")
    _assert_installed_without_torch(pip_log, before, _freeze(python))

    path = _compiler_only_path(tmp_path / "toolchain")
    procs = [_run_loss(python, cache, tmp_path, PATH=path) for _ in range(3)]
    results = [_loss_result(p) for p in procs]
    assert sum("marginops: compiling the C++ extension" in err for _, err in results) == 1
    for r, _ in results:
        assert r["torch"] == before["torch"] and r["torch_file"].startswith(str(tmp_path / "venv"))
        assert r["marginops"] == str(src / "marginops" / "__init__.py")
        assert Path(r["library"]).is_relative_to(cache)
    assert len({r["library"] for r, _ in results}) == 1

    # --no-build-isolation keeps working (non-editable, over the editable install): a cache hit.
    _run([str(python), "-m", "pip", "install", "--no-build-isolation", "."], cwd=src, env=_env())
    r, err = _loss_result(_run_loss(python, cache, tmp_path))
    assert "site-packages" in r["marginops"] and "compiling" not in err
    assert r["library"] == results[0][0]["library"]


@pytest.mark.slow
def test_sdist_installs_in_fresh_venv_and_runs_cpp(torch_venv, tmp_path):
    """An sdist built here, unpacked, and the literal ``pip install .`` in it (a fresh venv)."""
    cache = tmp_path / "cache"
    sdist = _build_sdist(tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (src,) = (tmp_path / "unpacked").iterdir()
    python = _fresh_venv(torch_venv, tmp_path / "venv")
    before = _freeze(python)
    pip_log = _pip_install(python, ["."], src, tmp_path / "pip.log")
    _assert_installed_without_torch(pip_log, before, _freeze(python))

    r, _ = _loss_result(_run_loss(python, cache, tmp_path))
    assert r["marginops"].startswith(str(tmp_path / "venv")) and "site-packages" in r["marginops"]
    # The installed sources are exactly the checkout's (a missing header would change the key).
    assert r["sources"] == build._sources_digest()
    assert Path(r["library"]).is_relative_to(cache)
