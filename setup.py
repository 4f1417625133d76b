"""gist_fast: fused kernels for GIST / iDAT / two-stage PEFT of timm Vision Transformers.

The C++ CPU ops in csrc/ are compiled into gist_fast._C with ninja through torch's BuildExtension.
Set GIST_FAST_NO_EXT=1 to skip that build: the package then runs on its other backends.
"""
import glob
import os
import re

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("GIST_FAST_NO_EXT", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [
        CppExtension(
            "gist_fast._C",
            sorted(glob.glob("csrc/*.cpp")),
            # -fno-trapping-math lets the compiler if-convert the branch-free exp of csrc/common.h
            # (PyTorch builds with the same two flags); no -march: the library runs on any x86-64,
            # and the hot row kernels get AVX2 / AVX-512 clones chosen at load time instead
            # (GIST_FAST_CLONES in csrc/common.h).
            extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    name="gist_fast",
    version=re.search(r'__version__ = "(.+)"', open("gist_fast/__init__.py").read()).group(1),  # one place
    description="Fused-kernel GIST / iDAT / two-stage PEFT for timm Vision Transformers",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["gist_fast", "gist_fast.*"]) + ["gist_fast.kernels"],
    package_dir={"gist_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "timm>=0.9",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest", "scikit-learn", "ninja", "matplotlib", "ruff", "peft>=0.14"],  # peft: tests only
        "bench": ["matplotlib", "liger-kernel; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["gist-fast=gist_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
