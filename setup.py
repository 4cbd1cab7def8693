"""The C extensions (the rest of the build is in pyproject.toml), both optional: where no C compiler
is found psjobs still installs, and

- psjobs.backends.process._cspawn: commands start through the fork server instead (see
  src/psjobs/backends/process/_direct.py);
- psjobs.core._cspill: every spilled block is pickled (see src/psjobs/core/_spill.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("psjobs.backends.process._cspawn", ["src/psjobs/backends/process/_cspawn.c"],
                             optional=True),
                   Extension("psjobs.core._cspill", ["src/psjobs/core/_cspill.c"], optional=True)])
