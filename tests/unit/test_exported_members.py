"""The package's face: `__all__` is exactly what `tidings` exports, each name resolves
(lazily, PEP 562) to the object its module defines, and type checkers see the same list."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

import pytest

import tidings

INIT = Path(tidings.__file__)


def _type_checking_imports() -> dict[str, str]:
    """name -> module, from the `if TYPE_CHECKING:` block of tidings/__init__.py."""
    tree = ast.parse(INIT.read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom) and statement.module
                found.update({alias.name: statement.module for alias in statement.names})
    return found


def test_all_is_sorted_and_is_what_is_exported() -> None:
    assert tidings.__all__ == sorted(tidings.__all__)
    assert dir(tidings) == tidings.__all__
    assert set(tidings._LAZY) | {"__version__"} == set(tidings.__all__)
    defined = {
        name for name, value in vars(tidings).items()
        # Submodules become attributes once imported (by this test run, not by `tidings`).
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert defined - {"TYPE_CHECKING"} <= set(tidings.__all__)


def test_type_checkers_see_the_same_names_from_the_same_modules() -> None:
    assert _type_checking_imports() == tidings._LAZY


@pytest.mark.parametrize("name", tidings.__all__)
def test_each_name_resolves_to_its_module_object(name: str) -> None:
    value = getattr(tidings, name)
    if name == "__version__":
        assert value == importlib.import_module("tidings.version").__version__
        return
    assert value is getattr(importlib.import_module(tidings._LAZY[name]), name)
    assert name in dir(tidings)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        tidings.no_such_name  # noqa: B018
    assert not hasattr(tidings, "Tidings")
