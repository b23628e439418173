"""Build and package metadata of marginops (pyproject.toml configures tools only).

Install with ``pip install --no-build-isolation -e .`` so the extension builds against the torch
already in the environment.

The C++ extension ``marginops._C`` registers the ``torch.ops.marginops.{margin_lse,
margin_lse_backward, topk}`` kernels:

* always: the CPU kernels (marginops/csrc/ops.cpp + cpu/*.cpp), OpenMP, -O3;
* when torch is a CUDA build and a CUDA toolkit is found (or ``MARGINOPS_FORCE_CUDA=1``): the CUDA
  kernels too (marginops/csrc/cuda/*.cu, sm_80 and sm_90), as a CUDAExtension;
* ``MARGINOPS_NO_EXT=1`` skips the extension (pure-Python install; the torch/triton backends work).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("MARGINOPS_NO_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    rel = lambda pattern: sorted(  # noqa: E731 - paths relative to setup.py, as setuptools wants
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("marginops/csrc/ops.cpp") + rel("marginops/csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "marginops", "csrc", "include")]
    # -fno-trapping-math lets GCC vectorise the epilogue's selects (torch itself builds with it);
    # IEEE results are unchanged, only FP traps (never enabled by torch) are assumed off.
    # -g0: Python's default CFLAGS add -g, which triples compile time of the torch headers.
    cxx_flags = (["-O3", "-g0", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
                 if sys.platform != "win32" else ["/O2", "/openmp"])
    link_flags = ["-fopenmp"] if sys.platform != "win32" else []

    with_cuda = _flag("MARGINOPS_FORCE_CUDA") or (
        torch.version.cuda is not None and CUDA_HOME is not None)
    if with_cuda:
        nvcc_flags = [
            "-O3",
            "--expt-relaxed-constexpr",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
        ]
        ext = CUDAExtension(
            name="marginops._C",
            sources=sources + rel("marginops/csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            define_macros=[("MARGINOPS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            name="marginops._C",
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="marginops",
    version="0.1.0",
    description="Fused, memory-lean kernels for large-class margin softmax losses (ArcFace etc.)",
    packages=find_packages(include=["marginops*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": [
            "pytest",
            "pytest-benchmark",
            "pytorch-metric-learning",
            "scikit-learn",
            "matplotlib",
            "tqdm",
            "triton; platform_system == 'Linux'",
        ],
        "bench": ["matplotlib", "tqdm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
