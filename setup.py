"""Only the optional C span path lives here; everything else is in pyproject.toml.

`optional=True`: where it cannot be built (no compiler, not Linux), the install goes on and
marlwatch uses the Python spans in marlwatch/instrument.py, which record exactly the same thing.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("marlwatch._fastspan", ["marlwatch/_fastspan.c"], optional=True)])
