"""Topic selectors: deciding whether a topic is matched by a subscription or a JWT claim.

Pure code, no I/O. Three kinds of selector exist, following the two generations of the
Mercure protocol:

``topic``
    0.x style, used by the ``topic=`` subscribe parameter and the ``mercure.subscribe`` /
    ``mercure.publish`` JWT claims. ``*`` matches every topic; a value containing ``{`` is an
    RFC 6570 URI template, matched the way the reference hub does (github.com/yosida95/uritemplate
    turns the template into an anchored regular expression); anything else is an exact string.
    As in the reference hub, a template also matches the topic equal to its own text.
``match``
    1.0 ``Exact`` matcher type: byte-for-byte string equality, ``*`` matches every topic.
``urlpattern``
    1.0 ``URLPattern`` matcher type: a WHATWG URL Pattern, evaluated by the ``urlpattern``
    package (Rust, backed by a linear-time regex engine, which is what the spec requires to keep
    crafted patterns from stalling the hub). ``*`` matches every topic.

Edge cases decided here:

* The empty string is never a valid selector (:class:`~tidings.errors.BadRequest`).
* A ``topic`` value containing ``{`` that is not a valid RFC 6570 template is rejected with
  :class:`~tidings.errors.BadRequest`. (The Go hub silently falls back to an exact match; a
  typo in a template should fail loudly instead of subscribing to nothing.)
* Template prefix modifiers (``{var:3}``) are accepted but, as in the Go hub, not enforced when
  matching: the length limit only constrains expansion.
* Relative URL patterns (``/books/:id``) need the hub's URL as base, which this pure layer does
  not know. They are resolved against the fixed, unresolvable base ``https://relative.invalid/``
  and so are tested against topics resolved against the same base: a relative pattern matches
  relative topics (``/books/1``, which is what the hub publishes for its own resources), but not
  absolute topics carrying the hub's real origin. Absolute patterns are tested without a base,
  so a topic that is not an absolute URL never matches them.
* A topic the URL parser rejects (or that is not valid UTF-8) simply does not match a URL
  pattern; it never raises.
"""

from __future__ import annotations

import functools
import operator
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias, get_args

import urlpattern

from tidings.errors import BadRequest

__all__ = ["Matcher", "Selector", "SelectorKind", "compile_selector"]

SelectorKind = Literal["topic", "match", "urlpattern"]

_KINDS: Final[frozenset[str]] = frozenset(get_args(SelectorKind))
_WILDCARD: Final = "*"
_CACHE_SIZE: Final = 4096
# RFC 2606 reserves .invalid, so no real topic can ever carry this origin by accident.
_RELATIVE_BASE: Final = "https://relative.invalid/"

# --------------------------------------------------------------------------------------------
# RFC 6570 URI templates
# --------------------------------------------------------------------------------------------

_UNRESERVED: Final = frozenset(string.ascii_letters + string.digits + "-._~")
_RESERVED: Final = frozenset(":/?#[]@!$&'()*+,;=")

# operator -> (first, separator, named, allow reserved), RFC 6570 appendix A.
_OPERATORS: Final[dict[str, tuple[str, str, bool, bool]]] = {
    "": ("", ",", False, False),
    "+": ("", ",", False, True),
    "#": ("#", ",", False, True),
    ".": (".", ".", False, False),
    "/": ("/", "/", False, False),
    ";": (";", ";", True, False),
    "?": ("?", "&", True, False),
    "&": ("&", "&", True, False),
}
_RESERVED_OPERATORS: Final = frozenset("=,!@|")

_PCT: Final = r"%[0-9A-Fa-f]{2}"
_PCT_RE: Final = re.compile(_PCT)
_VARSPEC_RE: Final = re.compile(
    rf"(?:[A-Za-z0-9_]|{_PCT})(?:\.?(?:[A-Za-z0-9_]|{_PCT}))*(?::[1-9][0-9]{{0,3}}|\*)?"
)


def _ucs_class() -> str:
    """The ``ucschar`` and ``iprivate`` ranges of RFC 6570 as a regex character-class body."""
    ranges = [(0xA0, 0xD7FF), (0xE000, 0xFDCF), (0xFDF0, 0xFFEF)]
    for plane in range(1, 17):
        low = plane << 16
        # Plane 14 starts at E1000: the tag characters below it are not ucschar.
        ranges.append((low + 0x1000 if plane == 14 else low, low + 0xFFFD))
    return "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in ranges)


# The RFC 6570 ``literals`` production: everything but CTL, SP, DQUOTE, "'", "%" (unless
# pct-encoded), "<", ">", "\", "^", "`", "{", "|", "}".
_LITERALS_RE: Final = re.compile(
    r"(?:[\x21\x23\x24\x26\x28-\x3b\x3d\x3f-\x5b\x5d\x5f\x61-\x7a\x7e"
    + _ucs_class()
    + rf"]|{_PCT})+"
)


@dataclass(frozen=True, slots=True)
class _Expr:
    """One ``{...}`` expression, reduced to what matching needs.

    It matches ``(first body)?`` where ``body`` is ``chars1*`` optionally followed by up to
    ``max_seps`` repetitions of ``sep chars2*`` (``-1``: unbounded); each ``chars`` set also
    accepts pct-encoded triplets. The sets are built so that the body is deterministic (no
    character is both a separator and a value character), which keeps matching linear.
    """

    first: str
    chars1: frozenset[str]
    chars2: frozenset[str]
    sep: str
    max_seps: int

    def regex(self) -> str:
        body = _class_regex(self.chars1)
        if self.sep:
            quantifier = {-1: "*", 1: "?"}.get(self.max_seps, f"{{0,{self.max_seps}}}")
            body += f"(?:{re.escape(self.sep)}{_class_regex(self.chars2)}){quantifier}"
        if self.first:
            return f"(?:{re.escape(self.first)}{body})?"
        return body  # the body already matches the empty string: no "?" needed

    def start_chars(self) -> frozenset[str]:
        """Characters that can begin a non-empty match of this expression."""
        if self.first:
            return frozenset(self.first[0])
        return self.chars1 | {"%"} | frozenset(self.sep)

    def consumable(self) -> frozenset[str]:
        """Every character this expression could swallow."""
        return self.chars1 | self.chars2 | {"%"} | frozenset(self.sep + self.first)


def _class_regex(chars: frozenset[str]) -> str:
    # \xNN escapes sidestep every character-class metacharacter; all value characters are ASCII.
    members = "".join(f"\\x{ord(c):02x}" for c in sorted(chars))
    return f"(?:[{members}]|{_PCT})*"


def _value_chars(allow_reserved: bool, named: bool) -> frozenset[str]:
    # Mirrors yosida95/uritemplate: without reserved expansion a value may still contain ","
    # (list members are not told apart when matching) and, for named or exploded variables, "=".
    if allow_reserved:
        return _UNRESERVED | _RESERVED
    return _UNRESERVED | {","} | ({"="} if named else set())


def _make_expr(op: str, explodes: list[bool]) -> _Expr:
    first, sep, named, allow_reserved = _OPERATORS[op]
    chars1 = _value_chars(allow_reserved, named or explodes[0])
    if len(explodes) == 1 and not explodes[0]:
        return _Expr(first, chars1, chars1, "", 0)
    chars2 = _value_chars(allow_reserved, named or any(explodes))
    if sep in chars2:
        # The separator is itself a value character ("," or "."), so the Go regex
        # ``c1* (sep c2*){0,n}`` is ambiguous and backtracks badly. Language-preserving rewrite:
        # with identical sets it is just ``c1*``; otherwise the first separator is what switches
        # to the wider set, so ``(c1 - sep)* (sep c2*)?`` accepts exactly the same strings.
        if chars1 == chars2:
            return _Expr(first, chars1, chars1, "", 0)
        return _Expr(first, chars1 - {sep}, chars2, sep, 1)
    max_seps = -1 if any(explodes) else len(explodes) - 1
    return _Expr(first, chars1, chars2, sep, max_seps)


_Part: TypeAlias = str | _Expr


def _parse_template(value: str) -> tuple[_Part, ...]:
    def fail(reason: str) -> BadRequest:
        return BadRequest(f"invalid URI template {value!r}: {reason}")

    parts: list[_Part] = []
    pos = 0
    while pos < len(value):
        if value[pos] != "{":
            end = value.find("{", pos)
            end = len(value) if end < 0 else end
            literal = value[pos:end]
            if not _LITERALS_RE.fullmatch(literal):
                raise fail(f"invalid literal text {literal!r}")
            parts.append(literal)
            pos = end
            continue
        end = value.find("}", pos + 1)
        if end < 0:
            raise fail(f"unclosed expression at offset {pos}")
        body = value[pos + 1 : end]
        if not body:
            raise fail(f"empty expression at offset {pos}")
        if body[0] in _RESERVED_OPERATORS:
            raise fail(f"reserved operator {body[0]!r}")
        op = body[0] if body[0] in _OPERATORS else ""
        explodes: list[bool] = []
        for spec in body[len(op) :].split(","):
            if not _VARSPEC_RE.fullmatch(spec):
                raise fail(f"invalid variable {spec!r}")
            explodes.append(spec.endswith("*"))
        parts.append(_make_expr(op, explodes))
        pos = end + 1
    return tuple(parts)


def _follow_chars(parts: tuple[_Part, ...]) -> frozenset[str]:
    """Characters that can begin whatever ``parts`` match next (expressions may be empty)."""
    chars: set[str] = set()
    for part in parts:
        if isinstance(part, str):
            chars.add(part[0])
            break
        chars |= part.start_chars()
    return frozenset(chars)


@dataclass(frozen=True, slots=True)
class _Template:
    parts: tuple[_Part, ...]
    pattern: re.Pattern[str]
    # True when a backtracking regex could take polynomial time (several expressions whose
    # extent is ambiguous); such templates are matched by a linear-time simulation instead.
    simulate: bool

    @classmethod
    def compile(cls, value: str) -> _Template:
        parts = _parse_template(value)
        regex = "".join(p.regex() if isinstance(p, _Expr) else re.escape(p) for p in parts)
        ambiguous = sum(
            1
            for i, part in enumerate(parts)
            if isinstance(part, _Expr) and part.consumable() & _follow_chars(parts[i + 1 :])
        )
        # One ambiguous expression costs at most O(n²) in the backtracking engine; k of them
        # cost O(n^(k+1)), which a crafted subscription could use to stall every publish.
        return cls(parts, re.compile(regex), ambiguous > 1)

    def matches(self, topic: str) -> bool:
        if self.simulate:
            return self.matches_simulated(topic)
        return self.pattern.fullmatch(topic) is not None

    def matches_simulated(self, topic: str) -> bool:
        """Track the set of reachable offsets part by part: O(parts * len(topic))."""
        positions = {0}
        for part in self.parts:
            if isinstance(part, str):
                positions = {p + len(part) for p in positions if topic.startswith(part, p)}
            else:
                positions = _advance(part, topic, positions)
            if not positions:
                return False
        return len(topic) in positions


def _advance(expr: _Expr, topic: str, starts: set[int]) -> set[int]:
    """Offsets at which ``expr`` can end when it starts at any offset of ``starts``."""
    ends = set(starts)  # the expression may expand to nothing
    # The body is a deterministic automaton whose state is (offset, separators used); a state
    # already walked from another start leads to the same ends, so each is visited once.
    seen: set[tuple[int, int]] = set()
    unbounded = expr.max_seps < 0
    for start in starts:
        if not topic.startswith(expr.first, start):
            continue
        pos, seps = start + len(expr.first), 0
        while (pos, seps) not in seen:
            seen.add((pos, seps))
            ends.add(pos)
            if pos >= len(topic):
                break
            char = topic[pos]
            if char == "%":
                if not _PCT_RE.match(topic, pos):
                    break
                pos += 3
            elif char in (expr.chars1 if seps == 0 else expr.chars2):
                pos += 1
            elif char == expr.sep and (unbounded or seps < expr.max_seps):
                pos += 1
                # Past the first separator an unbounded body no longer counts them.
                seps = 1 if unbounded else seps + 1
            else:
                break
    return ends


# --------------------------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------------------------


def _match_everything(_topic: str) -> bool:
    return True


def _compile_template(value: str) -> Callable[[str], bool]:
    template = _Template.compile(value)

    def matches(topic: str) -> bool:
        # The reference hub compares the raw strings first, so a template matches its own text.
        return topic == value or template.matches(topic)

    return matches


def _compile_urlpattern(value: str) -> Callable[[str], bool]:
    base: str | None = None
    try:
        pattern = urlpattern.URLPattern(value)
    except Exception:
        # Most likely relative; retry with the placeholder base and report that error if it
        # still fails, since "relative input without a base URL" would be misleading.
        try:
            pattern = urlpattern.URLPattern(value, _RELATIVE_BASE)
        except Exception as exc:
            raise BadRequest(f"invalid URL pattern {value!r}: {exc}") from None
        base = _RELATIVE_BASE

    def matches(topic: str) -> bool:
        try:
            return bool(pattern.test(topic, base))
        except Exception:
            # The binding raises for input it cannot even convert (lone surrogates); such a
            # topic is no URL, and a non-URL topic is simply not matched.
            return False

    return matches


def _compile(kind: SelectorKind, value: str) -> Callable[[str], bool]:
    if kind not in _KINDS:
        raise ValueError(f"unknown selector kind {kind!r}")
    if not value:
        raise BadRequest("empty topic selector")
    if value == _WILDCARD:
        return _match_everything
    if kind == "urlpattern":
        return _compile_urlpattern(value)
    if kind == "topic" and "{" in value:
        return _compile_template(value)
    return functools.partial(operator.eq, value)


@dataclass(frozen=True, slots=True)
class Selector:
    """One compiled topic selector; equal and hashable by ``(kind, value)``.

    Construction validates and compiles (raising :class:`~tidings.errors.BadRequest`); prefer
    :func:`compile_selector`, which caches the result.
    """

    kind: SelectorKind
    value: str
    # Excluded from eq/hash/repr so two selectors with the same text are interchangeable.
    _match: Callable[[str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_match", _compile(self.kind, self.value))

    def __reduce__(self) -> tuple[type[Selector], tuple[SelectorKind, str]]:
        # The compiled matcher may not be picklable; rebuild it from the text instead.
        return (Selector, (self.kind, self.value))

    def matches(self, topic: str) -> bool:
        """Whether ``topic`` is selected."""
        return self._match(topic)

    @property
    def exact(self) -> str | None:
        """The only topic this selector matches, or None when it may match several."""
        if self.value == _WILDCARD or self.kind == "urlpattern":
            return None
        if self.kind == "topic" and "{" in self.value:
            return None
        return self.value


class _SelectorCompiler:
    """The callable behind :func:`compile_selector`: typed, with a bounded LRU cache."""

    __slots__ = ("_cached",)

    def __init__(self, maxsize: int) -> None:
        self._cached = functools.lru_cache(maxsize=maxsize)(Selector)

    def __call__(self, value: str, kind: SelectorKind = "topic") -> Selector:
        """Compile ``value`` as a selector of ``kind``; the same pair compiles only once.

        Raises :class:`~tidings.errors.BadRequest` for an empty value, an invalid URI
        template (``topic`` kind) or an invalid URL pattern (``urlpattern`` kind).
        """
        # Always call positionally so that keyword and positional calls share cache entries.
        return self._cached(kind, value)

    def cache_info(self) -> functools._CacheInfo:
        return self._cached.cache_info()

    def cache_clear(self) -> None:
        self._cached.cache_clear()


compile_selector: Final = _SelectorCompiler(_CACHE_SIZE)


# A matcher remembers this many verdicts on non-exact topics (then starts afresh).
_VERDICTS = 64


class Matcher:
    """A set of selectors compiled once; ``matches(topic)`` is true if any selector matches.

    Exact selectors are kept in a frozenset for O(1) checks, the others in a tuple. The
    verdicts of the others are remembered, a few dozen topics' worth: fan-out asks one
    subscriber's claims about the same few topics over and over (a chat window's private
    room updates), and a template's regex costs more than a dict lookup.
    """

    __slots__ = ("_verdicts", "exact_topics", "matches_all", "patterns")

    exact_topics: frozenset[str]
    matches_all: bool
    patterns: tuple[Selector, ...]

    def __init__(self, selectors: Iterable[Selector]) -> None:
        exact: set[str] = set()
        patterns: dict[Selector, None] = {}  # a dict dedupes while keeping the given order
        matches_all = False
        for selector in selectors:
            if selector.value == _WILDCARD:
                matches_all = True
            elif (topic := selector.exact) is not None:
                exact.add(topic)
            else:
                patterns[selector] = None
        self.exact_topics = frozenset(exact)
        self.matches_all = matches_all
        self.patterns = tuple(patterns)
        self._verdicts: dict[str, bool] = {}

    def matches(self, topic: str) -> bool:
        """Whether any selector matches ``topic``."""
        if self.matches_all or topic in self.exact_topics:
            return True
        if not self.patterns:
            return False
        verdict = self._verdicts.get(topic)
        if verdict is None:
            verdict = any(selector.matches(topic) for selector in self.patterns)
            if len(self._verdicts) >= _VERDICTS:
                self._verdicts.clear()
            self._verdicts[topic] = verdict
        return verdict

    def matches_any(self, topics: Iterable[str]) -> bool:
        """Whether any selector matches any of ``topics`` (False for no topics)."""
        if isinstance(topics, tuple | list) and len(topics) == 1:  # most updates
            return self.matches(topics[0])
        return any(self.matches(topic) for topic in topics)

    def __repr__(self) -> str:
        return (
            f"Matcher(matches_all={self.matches_all}, exact_topics={sorted(self.exact_topics)}, "
            f"patterns={list(self.patterns)})"
        )
