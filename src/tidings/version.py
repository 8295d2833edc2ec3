"""The package's version, in a module of its own so that reading it imports nothing else.

It is written here only: pyproject.toml (`[tool.setuptools.dynamic]`), `tidings/__init__.py`,
`/healthz` and the OpenAPI document all read it from this module.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
