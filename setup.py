"""Builds the dynamo_dist._C extension: plain CPython + pybind11, no libtorch.

Not linking libtorch keeps the build to seconds and lets one wheel work with
any torch build (CPU or CUDA) the user already has installed.
"""

import ast
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

HERE = Path(__file__).resolve().parent


def _version() -> str:
    """The version from dynamo_dist/_version.py, read without importing the package."""
    tree = ast.parse((HERE / "dynamo_dist" / "_version.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__version__":
            return str(ast.literal_eval(node.value))
    raise RuntimeError("dynamo_dist/_version.py defines no __version__")


ext_modules = [
    Pybind11Extension(
        "dynamo_dist._C",
        sorted(["csrc/module.cpp", "csrc/guard_hook.cpp", "csrc/shm_exchange.cpp"]),
        depends=sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.h")),
        cxx_std=17,
        extra_compile_args=["-O2"],
        define_macros=[("DYNAMO_DIST_VERSION", f'"{_version()}"')],
        libraries=["rt"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
