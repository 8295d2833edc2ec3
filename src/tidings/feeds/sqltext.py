"""SQL text both dialects write the same way: a quoted identifier and a string literal.

Names of collections, tables and columns come from configuration or the database's own
catalog, never from a request; still every one is quoted, so that a name is only ever a
name. Values go in as parameters; the few literals (trigger arguments, a channel name)
are built by `literal`.
"""

from __future__ import annotations

__all__ = ["ident", "literal"]


def ident(name: str) -> str:
    """`name` as a quoted SQL identifier (SQLite and PostgreSQL quote alike)."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """`text` as an SQL string literal (standard_conforming_strings, as both use)."""
    return "'" + text.replace("'", "''") + "'"
