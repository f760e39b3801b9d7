"""Builds flowkern._C, the C++ CPU kernels (csrc/*.cpp), with torch.utils.cpp_extension.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already installed (an
isolated build would download a second torch). The extension is compiled for the machine that builds it:
when that CPU has AVX2+FMA the kernels use ATen's 256-bit vector path (``at::vec``), else the portable one.
``FLOWKERN_CPU_ISA=generic`` forces the portable build (e.g. to ship to older CPUs).
"""

from __future__ import annotations

import glob
import os
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def _host_has(*flags: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        return False
    return all(flag in words for flag in flags)


def _isa_args() -> list[str]:
    isa = os.environ.get("FLOWKERN_CPU_ISA", "auto").lower()
    if isa not in ("auto", "generic", "avx2"):
        raise SystemExit(f"FLOWKERN_CPU_ISA must be auto, generic or avx2, got {isa!r}")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if isa == "avx2" or (isa == "auto" and x86 and _host_has("avx2", "fma")):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


setup(
    ext_modules=[
        CppExtension(
            "flowkern._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17", *_isa_args()],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
