"""The one C extension, psjobs.backends.process._cspawn (the rest of the build is in pyproject.toml).

It is optional: where no C compiler is found psjobs still installs, and commands start through the
fork server instead (see src/psjobs/backends/process/_direct.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("psjobs.backends.process._cspawn", ["src/psjobs/backends/process/_cspawn.c"],
                             optional=True)])
