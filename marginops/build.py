"""The C++/CUDA extension, compiled on first use against the running torch; ``python -m marginops.build``.

marginops installs as pure Python (no torch at build time, so pip never pulls a second torch into
a build environment). The kernels in ``marginops/csrc/`` are compiled by
``torch.utils.cpp_extension.load`` (ninja) the first time the ``cpp``/``cuda`` backend is used,
into a cache directory keyed by everything the binary depends on:

    <cache>/torch-<torch version>-<cpu|cuXY>-<python tag>/<sha256 of the build config>[:16]/

where the build config holds the torch version and git commit, torch's CUDA version, whether the
CUDA kernels are built and for which architectures, the Python tag and platform, the compiler
flags and a hash of every file under csrc/. A binary built for another torch or from other
sources therefore lives in another directory and is never loaded; ``build.json`` beside the
binary records the config and is checked again before loading.

<cache> is ``$MARGINOPS_CACHE``, else ``$XDG_CACHE_HOME/marginops``, else ``~/.cache/marginops``.
Concurrent processes (8 ranks starting at once) compile once: the build runs under an exclusive
``flock`` on ``<dir>/.lock``; the others wait, then load the finished binary.

The CUDA kernels are built when torch is a CUDA build and a CUDA toolkit is found (torch's
``CUDA_HOME``); otherwise the CPU kernels only. If the CUDA build fails, the failure is recorded
(``FAILED`` in its directory, with the compiler output) and the CPU kernels are built instead, so
the ``cpp`` backend still works; ``python -m marginops.build --cuda`` retries and shows the error.

    python -m marginops.build                     # what first use would build, ahead of time
    python -m marginops.build --cuda --arch "8.0;9.0"   # require the CUDA kernels (no GPU needed)
    python -m marginops.build --cpu               # CPU kernels only
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import threading
import warnings
from pathlib import Path

import torch

try:  # POSIX; elsewhere torch's own lock file (FileBaton) still serialises the build
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

PACKAGE = Path(__file__).resolve().parent
CSRC = PACKAGE / "csrc"
NAME = "marginops_C"
DEFAULT_CUDA_ARCH = "8.0;9.0"   # used when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible

# -fno-trapping-math lets GCC vectorise the epilogue's selects (torch itself builds with it); IEEE
# results are unchanged, only FP traps (never enabled by torch) are assumed off. -g0 keeps the
# build fast (debug info triples the compile time of the torch headers).
CXX_FLAGS = (["-O3", "-g0", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
             if sys.platform != "win32" else ["/O2", "/openmp"])
LD_FLAGS = ["-fopenmp"] if sys.platform != "win32" else []
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


class BuildError(RuntimeError):
    """The extension could not be compiled or loaded; the message says why and what to do."""


def cache_root() -> Path:
    """Where compiled extensions are cached (``$MARGINOPS_CACHE`` or the user cache dir)."""
    if os.environ.get("MARGINOPS_CACHE"):
        return Path(os.environ["MARGINOPS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "marginops"


def cuda_unavailable_reason() -> str | None:
    """None if the CUDA kernels can be built here (CUDA torch + toolkit), else why not."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit found (install one with nvcc, or set CUDA_HOME)"
    return None


def wants_cuda_kernels() -> bool:
    """The automatic choice: CUDA kernels iff torch has CUDA, a toolkit is found, and their build
    has not failed before for this config (then the CPU kernels are built alone)."""
    if cuda_unavailable_reason() is not None:
        return False
    return not (build_dir(build_config(True)) / "FAILED").exists()


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in CSRC.rglob("*") if p.is_file() and p.suffix in (".cpp", ".cu", ".h")):
        digest.update(path.relative_to(CSRC).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _cuda_arch_list() -> str:
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if arch:
        return arch
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return DEFAULT_CUDA_ARCH


def build_config(cuda: bool) -> dict:
    """Everything the compiled binary depends on; its hash names the cache directory."""
    return {
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": cuda,
        "cuda_arch": _cuda_arch_list() if cuda else "",
        "python": sys.implementation.cache_tag,
        "platform": sysconfig.get_platform(),
        "cxx": os.environ.get("CXX", ""),
        "cxx_flags": CXX_FLAGS,
        "nvcc_flags": NVCC_FLAGS if cuda else [],
        "sources": _sources_digest(),
    }


def build_dir(config: dict) -> Path:
    """The cache directory of one build config."""
    variant = f"cu{config['torch_cuda'].replace('.', '')}" if config["cuda_kernels"] else "cpu"
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / f"torch-{config['torch']}-{variant}-{config['python']}" / digest


def library_path(directory: Path) -> Path:
    suffix = ".pyd" if sys.platform == "win32" else ".so"
    return directory / f"{NAME}{suffix}"


def cached_library(config: dict, warn: bool = True) -> Path | None:
    """The binary for ``config`` if it is built and its build.json matches ``config``, else None.

    A build.json that disagrees (a hand-copied or corrupted cache) is refused, with a warning
    naming both torch versions if ``warn``; the caller then rebuilds in place."""
    directory = build_dir(config)
    lib, manifest = library_path(directory), directory / "build.json"
    if not lib.exists() or not manifest.exists():
        return None
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded != config:
        if not warn:
            return None
        built_for = recorded.get("torch", "?") if isinstance(recorded, dict) else "?"
        warnings.warn(f"marginops: not loading {lib}: it was built for torch {built_for} with another "
                      f"configuration than the running torch {config['torch']} needs; rebuilding it.",
                      RuntimeWarning, stacklevel=3)
        return None
    return lib


def _stale_inplace_binaries() -> list[Path]:
    """``marginops/_C*.so`` left by an old ``setup.py build_ext --inplace``: never loaded."""
    return sorted(PACKAGE.glob("_C*.so")) + sorted(PACKAGE.glob("_C*.pyd"))


@contextlib.contextmanager
def _exclusive(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables for the duration of the build (torch reads them), then restore."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _compile(config: dict, verbose: bool) -> Path:
    from torch.utils import cpp_extension

    directory = build_dir(config)
    cuda = config["cuda_kernels"]
    what = f"CPU{' + CUDA (sm ' + config['cuda_arch'] + ')' if cuda else ''} kernels"
    print(f"marginops: compiling the C++ extension ({what}) for torch {config['torch']} into "
          f"{directory} — once per torch version (`python -m marginops.build` does it ahead of time)",
          file=sys.stderr, flush=True)
    for leftover in ("FAILED", "build.json", library_path(directory).name,
                     "lock"):  # torch's own lock file: stale if a build was killed (we hold .lock)
        (directory / leftover).unlink(missing_ok=True)
    sources = [CSRC / "ops.cpp", *sorted((CSRC / "cpu").glob("*.cpp"))]
    if cuda:
        sources += sorted((CSRC / "cuda").glob("*.cu"))
    env = {"TORCH_CUDA_ARCH_LIST": config["cuda_arch"]} if cuda else {}
    if shutil.which("ninja") is None:  # our `ninja` dependency, when its venv's bin/ is not on PATH
        with contextlib.suppress(ImportError):
            import ninja

            env["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    try:
        with _environ(env):
            cpp_extension.load(
                name=NAME, sources=[str(s) for s in sources], build_directory=str(directory),
                extra_include_paths=[str(CSRC / "include")],
                extra_cflags=CXX_FLAGS + (["-DMARGINOPS_WITH_CUDA=1"] if cuda else []),
                extra_cuda_cflags=NVCC_FLAGS + ["-DMARGINOPS_WITH_CUDA=1"] if cuda else None,
                extra_ldflags=LD_FLAGS, with_cuda=cuda, is_python_module=False, verbose=verbose)
    except Exception as err:
        (directory / "FAILED").write_text(str(err))
        raise BuildError(f"compiling the marginops extension ({what}) for torch {config['torch']} "
                         f"failed in {directory}: {str(err).strip()[-2000:]}") from err
    (directory / "build.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    return library_path(directory)


_LOCK = threading.Lock()
_LOADED: dict = {}   # the config and path loaded in this process (one per process: the op names)


def load(cuda: bool | None = None, verbose: bool = False) -> Path:
    """Load the extension into this process, compiling it first if the cache has no match.

    Args:
        cuda: True: the CUDA kernels are required (BuildError if they cannot be built); False:
            CPU kernels only; None: CUDA kernels when torch has CUDA and a toolkit is found, and
            the CPU kernels alone if that build fails (recorded, so later processes skip it).
        verbose: show the compiler commands.

    Returns the path of the loaded binary. It registers ``torch.ops.marginops.*``. Raises
    BuildError (message: why, and what to do) when nothing could be built or loaded.
    """
    with _LOCK:
        if _LOADED:
            if cuda is not None and cuda != _LOADED["config"]["cuda_kernels"]:
                raise BuildError("marginops: this process already loaded the extension "
                                 f"{'with' if _LOADED['config']['cuda_kernels'] else 'without'} "
                                 "CUDA kernels; start a new process to load the other build.")
            return _LOADED["path"]
        for stale in _stale_inplace_binaries():
            warnings.warn(f"marginops: ignoring {stale}, left by an old in-place build for an unknown "
                          f"torch version; marginops now compiles against the running torch "
                          f"{torch.__version__} into {cache_root()}. Delete it (`make clean`).",
                          RuntimeWarning, stacklevel=2)
        if cuda is None:
            want_cuda = wants_cuda_kernels()
        else:
            want_cuda = cuda
            if cuda and cuda_unavailable_reason() is not None:
                raise BuildError(f"cannot build the CUDA kernels: {cuda_unavailable_reason()}")
        try:
            path = _load_variant(want_cuda, verbose)
        except BuildError as err:
            if cuda is not None or not want_cuda:
                raise
            warnings.warn(f"{err}\nmarginops: building the CPU kernels only; the 'cuda' backend is "
                          "unavailable (`python -m marginops.build --cuda` retries).",
                          RuntimeWarning, stacklevel=2)
            want_cuda = False
            path = _load_variant(False, verbose)
        _LOADED.update(config=build_config(want_cuda), path=path)
        return path


def _load_variant(cuda: bool, verbose: bool) -> Path:
    config = build_config(cuda)
    lib = cached_library(config, warn=False)  # lock-free: a prebuilt read-only cache works
    if lib is None:
        try:
            with _exclusive(build_dir(config)):
                # another process may have built it while we waited for the lock
                lib = cached_library(config) or _compile(config, verbose)
        except OSError as err:
            raise BuildError(f"cannot write the extension cache ({err}); set MARGINOPS_CACHE to a "
                             "writable folder") from err
    try:
        torch.ops.load_library(str(lib))
    except OSError as err:
        raise BuildError(f"loading {lib} failed ({err}); delete {build_dir(config)} to rebuild it") \
            from err
    return lib


def loaded() -> dict:
    """``{"config": ..., "path": ...}`` of the extension this process loaded ({} if none)."""
    return dict(_LOADED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marginops.build", description=(
        "Compile marginops' C++ (and CUDA) extension for the running torch into the cache, "
        "so that first use does not wait for it."))
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--cuda", action="store_true", help="require the CUDA kernels (no GPU needed); "
                      "MARGINOPS_FORCE_CUDA=1 in the environment means the same")
    kind.add_argument("--cpu", action="store_true", help="build the CPU kernels only")
    parser.add_argument("--arch", help='CUDA architectures, e.g. "8.0;9.0" (sets TORCH_CUDA_ARCH_LIST)')
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    if args.arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch
    if not args.cpu and os.environ.get("MARGINOPS_FORCE_CUDA", "").strip().lower() in ("1", "true", "yes"):
        args.cuda = True
    try:
        path = load(cuda=True if args.cuda else False if args.cpu else None, verbose=args.verbose)
    except BuildError as err:
        print(f"marginops.build: FAILED: {err}", file=sys.stderr)
        return 1
    config = loaded()["config"]
    kernels = "CPU + CUDA (sm " + config["cuda_arch"] + ")" if config["cuda_kernels"] else "CPU"
    print(f"marginops.build: {kernels} kernels for torch {config['torch']}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
