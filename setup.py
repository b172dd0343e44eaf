"""Build hook: ship the top-level configs/ (the presets' single source) inside the package.

Metadata and package discovery live in pyproject.toml; this file only extends build_py so that
every wheel (and `pip install .`) carries configs/*.yaml as wan_nabla/presets/*.yaml. An editable
install or a checkout on PYTHONPATH reads configs/ directly (wan_nabla/presets/__init__.py).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildPyWithPresets(build_py):
    def run(self):
        if not self.editable_mode:
            # build/lib is reused between builds and setuptools never prunes it: a module deleted or
            # moved out of the package (the harness once lived in wan_nabla/bench/) would ship again.
            shutil.rmtree(Path(self.build_lib) / "wan_nabla", ignore_errors=True)
        super().run()
        if self.editable_mode:  # the checkout's configs/ is read in place
            return
        dest = Path(self.build_lib) / "wan_nabla" / "presets"
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted(CONFIGS.glob("*.yaml")):
            shutil.copyfile(src, dest / src.name)

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            dest = Path(self.build_lib) / "wan_nabla" / "presets"
            outputs += [str(dest / src.name) for src in sorted(CONFIGS.glob("*.yaml"))]
        return outputs


setup(cmdclass={"build_py": BuildPyWithPresets})
