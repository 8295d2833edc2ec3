"""JSON request bodies, parsed the same strict way by every route that takes one.

Python's `json` accepts what no database stores and most JSON parsers refuse: `NaN` and
`Infinity`, numbers that overflow to infinity (`1e400`), and nesting deep enough to
exhaust the stack, which it reports as a RecursionError rather than a ValueError. Each is
refused here as malformed input (a 400 at the route), so none reaches storage or the
recursive code behind it (merge patches, schema validation, event matching).
"""

from __future__ import annotations

import json
import math

__all__ = ["MAX_DEPTH", "parse_json", "parse_json_object"]

# Deeper than any document a person writes; far from the interpreter's recursion limit,
# which the recursive code after parsing shares.
MAX_DEPTH = 100


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large for a double")
    return value


def _depth(value: object) -> int:
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                children = item.values() if isinstance(item, dict) else item
                pending.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(text: str) -> object:
    """The value `text` holds; ValueError (with the reason) for anything refused."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    if _depth(value) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return value


def parse_json_object(raw: bytes | bytearray, what: str) -> dict[str, object]:
    """The JSON object a body holds; ValueError saying why not (`what` names the value in
    the message, e.g. "the body")."""
    try:
        value = parse_json(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is one
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value
