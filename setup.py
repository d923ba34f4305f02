"""Builds the dynamo_dist._C extension: plain CPython + pybind11, no libtorch.

Not linking libtorch keeps the build to seconds and lets one wheel work with
any torch build (CPU or CUDA) the user already has installed.
"""

import ast
import shutil
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = Path(__file__).resolve().parent

# The import hook of the torch.compile switch (dynamo_dist/_switch.py): a .pth file must
# sit at the top of site-packages, which no setuptools option puts it in. Both ways of
# installing get it: a wheel from build_lib's top, an editable install from the top of
# its wheel.
PTH = "dynamo_dist_switch.pth"


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file(str(HERE / PTH), str(Path(self.build_lib, PTH)))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(str(Path(self.build_lib, PTH)))
        return outputs


class EditableWheel(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):  # type: ignore[no-untyped-def]
        # setuptools' editable_wheel writes everything under unpacked_wheel into the
        # wheel; a file at its top is installed at the top of site-packages.
        out = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        shutil.copyfile(HERE / PTH, Path(unpacked_wheel, PTH))
        return out


def _version() -> str:
    """The version from dynamo_dist/_version.py, read without importing the package."""
    tree = ast.parse((HERE / "dynamo_dist" / "_version.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__version__":
            return str(ast.literal_eval(node.value))
    raise RuntimeError("dynamo_dist/_version.py defines no __version__")


# The translation units compile side by side (one per core; NPY_NUM_BUILD_JOBS
# overrides): each pip install builds them anew, and CI installs three times.
ParallelCompile("NPY_NUM_BUILD_JOBS").install()

ext_modules = [
    Pybind11Extension(
        "dynamo_dist._C",
        sorted(
            [
                "csrc/module.cpp",
                "csrc/guard_hook.cpp",
                "csrc/shm_exchange.cpp",
                "csrc/leader_rounds.cpp",
            ]
        ),
        depends=sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.h")),
        cxx_std=17,
        extra_compile_args=["-O2"],
        define_macros=[("DYNAMO_DIST_VERSION", f'"{_version()}"')],
        libraries=["rt"],
    ),
]

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext, "build_py": BuildPy, "editable_wheel": EditableWheel},
)
