"""The wheel's build step also compiles halfbyte's kernels for the building machine (engine/precompile.py).

``pip install .`` builds the wheel where it installs, so the Numba cache filled here (the
``__pycache__`` beside each kernel module, keyed by the source's hash and the CPU) ships in the wheel
and the first run loads the kernels instead of compiling them. ``HALFBYTE_PRECOMPILE=0`` skips it; a
failure here leaves the wheel as it would be without it (kernels compile on first use) and says why.
Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyAndPrecompile(build_py):
    def run(self) -> None:
        super().run()
        # an editable install runs the sources in place: their own cache fills on first use
        if getattr(self, "editable_mode", False) or os.environ.get("HALFBYTE_PRECOMPILE", "1") == "0":
            return
        build_lib = os.path.abspath(self.build_lib)
        # pip's build environment reaches its packages through PYTHONPATH: keep them
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [build_lib, os.environ.get("PYTHONPATH")])))
        env.pop("NUMBA_CACHE_DIR", None)  # into the package's __pycache__, which the wheel carries
        self.announce("compiling halfbyte's kernels for this machine (HALFBYTE_PRECOMPILE=0 skips it)", 2)
        result = subprocess.run([sys.executable, "-m", "engine.precompile"], cwd=build_lib, env=env)
        if result.returncode != 0:
            self.warn("halfbyte: compiling the kernels at build time failed; they compile on first use instead")


setup(cmdclass={"build_py": BuildPyAndPrecompile})
