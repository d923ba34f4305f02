"""Builds the dynamo_dist._C extension: plain CPython + pybind11, no libtorch.

Not linking libtorch keeps the build to seconds and lets one wheel work with
any torch build (CPU or CUDA) the user already has installed.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "dynamo_dist._C",
        sorted(["csrc/module.cpp", "csrc/guard_hook.cpp", "csrc/shm_exchange.cpp"]),
        cxx_std=17,
        extra_compile_args=["-O2"],
        libraries=["rt"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
