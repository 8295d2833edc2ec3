"""Tests for topic selector matching in :mod:`tidings.hub.topics`."""

from __future__ import annotations

import pickle
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidings.errors import BadRequest
from tidings.hub import topics
from tidings.hub.topics import Matcher, Selector, SelectorKind, compile_selector

KINDS: tuple[SelectorKind, ...] = ("topic", "match", "urlpattern")
BOOKS = "https://example.com/books/{id}"


# --- exact and wildcard ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["topic", "match"])
def test_exact_selector_compares_strings(kind: SelectorKind) -> None:
    sel = compile_selector("https://example.com/books/1", kind)
    assert sel.matches("https://example.com/books/1")
    assert not sel.matches("https://example.com/books/1/")
    assert not sel.matches("https://EXAMPLE.com/books/1")  # byte-for-byte, no normalisation
    assert sel.exact == "https://example.com/books/1"


def test_match_kind_never_treats_braces_as_template() -> None:
    sel = compile_selector(BOOKS, "match")
    assert sel.exact == BOOKS
    assert sel.matches(BOOKS)
    assert not sel.matches("https://example.com/books/1")


@pytest.mark.parametrize("kind", KINDS)
def test_wildcard_matches_everything_for_every_kind(kind: SelectorKind) -> None:
    sel = compile_selector("*", kind)
    for topic in ("https://example.com/a", "bar", "*", " ", "urn:x", "\udcff"):
        assert sel.matches(topic)
    assert sel.exact is None


@pytest.mark.parametrize("kind", KINDS)
def test_empty_selector_is_rejected(kind: SelectorKind) -> None:
    with pytest.raises(BadRequest):
        compile_selector("", kind)


def test_unknown_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown selector kind"):
        compile_selector("x", "regex")  # type: ignore[arg-type]


# --- URI templates (0.x) -------------------------------------------------------------------


def test_simple_template_matches_one_segment() -> None:
    sel = compile_selector(BOOKS)
    assert sel.exact is None
    assert sel.matches("https://example.com/books/1")
    assert sel.matches("https://example.com/books/the-hobbit_1937.v2~x")
    assert sel.matches("https://example.com/books/caf%C3%A9")
    assert not sel.matches("https://example.com/books/1/reviews")
    assert not sel.matches("https://example.com/books/1?x=y")
    assert not sel.matches("https://example.com/books/café")  # must be pct-encoded
    assert not sel.matches("https://example.com/books/100%")
    assert not sel.matches("https://example.org/books/1")
    assert not sel.matches("xhttps://example.com/books/1")  # anchored at the start
    # Like the Go hub, an expression may expand to nothing.
    assert sel.matches("https://example.com/books/")


def test_template_literal_is_regex_escaped() -> None:
    sel = compile_selector("https://example.com/a.b+c(d)/{id}")
    assert sel.matches("https://example.com/a.b+c(d)/1")
    assert not sel.matches("https://example.com/aXb+c(d)/1")
    assert not sel.matches("https://example.com/a.bbc(d)/1")


def test_template_matches_its_own_text() -> None:
    # The reference hub compares the raw strings before trying the template.
    assert compile_selector(BOOKS).matches(BOOKS)


@pytest.mark.parametrize(
    ("template", "yes", "no"),
    [
        # Several simple expressions, each one segment.
        (
            "https://example.com/{firstname}/{lastname}",
            ["https://example.com/kevin/dunglas"],
            ["https://example.com/kevin/dunglas/x"],
        ),
        (
            "https://example.com/{foo}/bar",
            ["https://example.com/foo/bar"],
            ["https://example.com/foo/bar/baz"],
        ),
        # Reserved expansion crosses slashes; a simple expression does not.
        (
            "https://example.com/{+path}",
            ["https://example.com/a/b/c?x=1&y=2#frag"],
            ["https://example.com/a b"],
        ),
        (
            "https://example.com/{+path}.json",
            ["https://example.com/a/b.json"],
            ["https://example.com/a/b.xml"],
        ),
        ("https://example.com/{path}", [], ["https://example.com/a/b"]),
        (
            "https://e.com/books{?page,size}",
            [
                "https://e.com/books?page=1&size=2",
                "https://e.com/books?page=1",
                "https://e.com/books",
            ],
            [
                "https://e.com/books?page=1&size=2&x=3",
                "https://e.com/books&page=1",
                "https://e.com/books?a/b",
            ],
        ),
        (
            "https://e.com/books?lang=fr{&page}",
            ["https://e.com/books?lang=fr&page=2", "https://e.com/books?lang=fr"],
            ["https://e.com/books?lang=fr?page=2", "https://e.com/books?lang=fr&a&b"],
        ),
        (
            "https://e.com/books{?query*}",
            ["https://e.com/books?a=1&b=2&c=3"],
            ["https://e.com/books?a=1/2"],
        ),
        (
            "https://e.com/doc{#section}",
            ["https://e.com/doc#intro/part,1", "https://e.com/doc"],
            ["https://e.com/doc#a b"],
        ),
        (
            "https://e.com/file{.ext}",
            ["https://e.com/file.json", "https://e.com/file"],
            ["https://e.com/file.tar/gz"],
        ),
        ("https://e.com{/seg*}", ["https://e.com/a/b/c", "https://e.com"], ["https://e.com/a?b"]),
        ("https://e.com{/a,b}", ["https://e.com/x/y", "https://e.com/x"], ["https://e.com/x/y/z"]),
        (
            "https://e.com/m{;x,y}",
            ["https://e.com/m;x=1;y=2", "https://e.com/m;x"],
            ["https://e.com/m;x=1;y=2;z=3"],
        ),
        ("https://e.com/{term:1}/{term}", ["https://e.com/c/cat"], ["https://e.com/c/cat/x"]),
        (
            "https://e.com/{x,y}",
            ["https://e.com/1,2", "https://e.com/1,2,3"],
            ["https://e.com/1/2"],
        ),
        ("{scheme}://e.com/{id}", ["https://e.com/1"], ["https:/e.com/1"]),
    ],
)
def test_template_operators(template: str, yes: list[str], no: list[str]) -> None:
    sel = compile_selector(template)
    for topic in yes:
        assert sel.matches(topic), topic
    for topic in no:
        assert not sel.matches(topic), topic


def test_prefix_modifier_is_not_enforced_when_matching() -> None:
    # Same as the Go hub: ``:n`` only limits expansion.
    assert compile_selector("https://e.com/{id:2}").matches("https://e.com/12345")


@pytest.mark.parametrize(
    "template",
    [
        "https://example.com/{",
        "https://example.com/{id",
        "https://example.com/{}",
        "https://example.com/{=id}",
        "https://example.com/{!id}",
        "https://example.com/{|id}",
        "https://example.com/{a b}",
        "https://example.com/{a-b}",
        "https://example.com/{a,}",
        "https://example.com/{a..b}",
        "https://example.com/{a:0}",
        "https://example.com/{a:12345}",
        "https://example.com/{a*:3}",
        "https://example.com/{a{b}}",
        "https://example.com/}{id}",
        "https://example.com/{id} x",
        "https://example.com/%zz/{id}",
        'https://example.com/"{id}"',
        "https://example.com/\x7f{id}",
    ],
)
def test_invalid_template_is_rejected(template: str) -> None:
    with pytest.raises(BadRequest, match="invalid URI template"):
        compile_selector(template)


@pytest.mark.parametrize(
    "template",
    ["{a.b}", "{a_1,B2}", "{%41b}", "https://e.com/é/{id}", "{+a}{#b}{.c}{/d}{;e}{?f}{&g}"],
)
def test_valid_template_syntax(template: str) -> None:
    assert compile_selector(template).exact is None


def test_braces_without_template_syntax_outside_topic_kind_are_plain_text() -> None:
    assert compile_selector("}", "topic").exact == "}"
    assert compile_selector("{", "match").matches("{")


def test_nested_ambiguous_expressions_do_not_backtrack_exponentially() -> None:
    value = "{+a}{+b}{+c}{+d}{+e}{+f}{+g}{+h}{+i}{+j}!"
    assert topics._Template.compile(value).simulate
    sel = compile_selector(value)
    assert not sel.matches("x/" * 2000)  # hangs with a backtracking regex
    assert sel.matches("x/" * 2000 + "!")
    assert not topics._Template.compile("https://e.com/{+path}.json").simulate


# --- URL patterns (1.0) --------------------------------------------------------------------


def test_urlpattern_named_group() -> None:
    sel = compile_selector("https://example.com/books/:id", "urlpattern")
    assert sel.exact is None
    assert sel.matches("https://example.com/books/1")
    assert not sel.matches("https://example.com/books/1/reviews")
    assert not sel.matches("https://example.com/books/")
    assert not sel.matches("https://example.org/books/1")
    # Hosts are case-insensitive per URL canonicalisation; search/hash default to wildcards.
    assert sel.matches("https://EXAMPLE.com/books/1")
    assert sel.matches("https://example.com/books/1?x=1#y")


def test_urlpattern_paths_are_case_sensitive() -> None:
    sel = compile_selector("https://example.com/books/:id", "urlpattern")
    assert not sel.matches("https://example.com/BOOKS/1")


def test_urlpattern_wildcards_and_regex_groups() -> None:
    sel = compile_selector("https://example.com/*", "urlpattern")
    assert sel.matches("https://example.com/books/1/reviews")
    assert not sel.matches("http://example.com/books")
    sel = compile_selector("https://*.example.com/books/*", "urlpattern")
    assert sel.matches("https://api.example.com/books/1")
    assert not sel.matches("https://example.org/books/1")
    sel = compile_selector(r"https://example.com/books/:id(\d+)", "urlpattern")
    assert sel.matches("https://example.com/books/42")
    assert not sel.matches("https://example.com/books/abc")


def test_urlpattern_non_url_topics_do_not_match() -> None:
    sel = compile_selector("https://example.com/*", "urlpattern")
    for topic in ("bar", "", "not a url", "/books/1", "urn:isbn:1", "http://[", "\udcff"):
        assert not sel.matches(topic), topic


def test_urlpattern_non_special_scheme() -> None:
    sel = compile_selector(r"urn\:isbn\:*", "urlpattern")
    assert sel.matches("urn:isbn:978-3-16")
    assert not sel.matches("urn:uuid:1")


def test_relative_urlpattern_matches_relative_topics() -> None:
    sel = compile_selector("/.well-known/mercure/subscriptions/:topic/:sub", "urlpattern")
    assert sel.matches("/.well-known/mercure/subscriptions/a/b")
    assert not sel.matches("/.well-known/mercure/subscriptions/a")
    # Without the hub's real URL, absolute topics cannot be related to a relative pattern.
    assert not sel.matches("https://example.com/.well-known/mercure/subscriptions/a/b")


@pytest.mark.parametrize(
    "pattern", ["https://example.com/(", "https://example.com/:id(", "(", "/("]
)
def test_invalid_urlpattern_is_rejected(pattern: str) -> None:
    with pytest.raises(BadRequest, match="invalid URL pattern"):
        compile_selector(pattern, "urlpattern")


# --- Selector value semantics and the cache -------------------------------------------------


def test_selectors_are_hashable_values() -> None:
    a = Selector("topic", BOOKS)
    b = compile_selector(BOOKS)
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, Selector("match", BOOKS)}) == 2
    assert repr(a) == f"Selector(kind='topic', value='{BOOKS}')"
    with pytest.raises(AttributeError):
        a.value = "x"  # type: ignore[misc]


def test_direct_construction_validates() -> None:
    with pytest.raises(BadRequest):
        Selector("topic", "{")


def test_selector_pickles_by_text() -> None:
    sel = compile_selector("https://example.com/books/:id", "urlpattern")
    clone = pickle.loads(pickle.dumps(sel))
    assert clone == sel
    assert clone.matches("https://example.com/books/1")


def test_compile_selector_caches() -> None:
    compile_selector.cache_clear()
    first = compile_selector(BOOKS)
    assert compile_selector(BOOKS) is first
    assert compile_selector(BOOKS, "topic") is first
    assert compile_selector(BOOKS, kind="topic") is first
    assert compile_selector(BOOKS, "match") is not first
    info = compile_selector.cache_info()
    assert (info.hits, info.misses) == (3, 2)


def test_compile_selector_cache_is_bounded() -> None:
    compile_selector.cache_clear()
    maxsize = compile_selector.cache_info().maxsize
    assert maxsize is not None
    for i in range(maxsize + 100):
        compile_selector(f"https://example.com/{i}/{{id}}")
    assert compile_selector.cache_info().currsize == maxsize


def test_invalid_selectors_are_not_cached() -> None:
    compile_selector.cache_clear()
    for _ in range(2):
        with pytest.raises(BadRequest):
            compile_selector("{")
    assert compile_selector.cache_info().currsize == 0


# --- Matcher -------------------------------------------------------------------------------


def test_matcher_splits_exact_and_patterns() -> None:
    m = Matcher(
        [
            compile_selector("https://example.com/a"),
            compile_selector("https://example.com/b", "match"),
            compile_selector(BOOKS),
            compile_selector(BOOKS),  # duplicates collapse
            compile_selector("https://example.com/users/:id", "urlpattern"),
        ]
    )
    assert m.exact_topics == frozenset({"https://example.com/a", "https://example.com/b"})
    assert m.patterns == (
        compile_selector(BOOKS),
        compile_selector("https://example.com/users/:id", "urlpattern"),
    )
    assert not m.matches_all
    assert m.matches("https://example.com/a")
    assert m.matches("https://example.com/b")
    assert m.matches("https://example.com/books/7")
    assert m.matches("https://example.com/users/7")
    assert not m.matches("https://example.com/c")
    assert not m.matches("https://example.com/books/7/reviews")


def test_matcher_remembers_verdicts_but_never_answers_differently() -> None:
    books = compile_selector(BOOKS)
    m = Matcher([books])
    # Many more topics than it remembers, each asked twice: the remembered verdicts are
    # started afresh when full, and every answer is the selector's own.
    topics = [f"https://example.com/books/{i}" for i in range(200)]
    topics += [f"https://example.com/books/{i}/x" for i in range(200)]
    for _ in range(2):
        for topic in topics:
            assert m.matches(topic) is books.matches(topic)


def test_matcher_wildcard() -> None:
    m = Matcher([compile_selector("x"), compile_selector("*", "urlpattern")])
    assert m.matches_all
    assert m.matches("anything at all")
    assert m.exact_topics == frozenset({"x"})


def test_empty_matcher_matches_nothing() -> None:
    m = Matcher([])
    assert not m.matches("x")
    assert not m.matches_any(["x", "y"])


def test_matcher_matches_any() -> None:
    m = Matcher(iter([compile_selector(BOOKS)]))  # any iterable, consumed once
    assert m.matches_any(["urn:a", "https://example.com/books/1"])
    assert m.matches_any(t for t in ["https://example.com/books/1"])
    assert not m.matches_any(["urn:a", "urn:b"])
    assert not m.matches_any([])
    assert not Matcher([compile_selector("*")]).matches_any([])


# --- properties ----------------------------------------------------------------------------


@given(st.text(min_size=1).filter(lambda t: "{" not in t and t != "*"))
def test_plain_text_selector_is_exact(topic: str) -> None:
    sel = compile_selector(topic)
    assert sel.matches(topic)
    assert sel.exact == topic
    assert Matcher([sel]).exact_topics == {topic}


# A straight port of yosida95/uritemplate's Template.Regexp(), used as an oracle for the
# rewritten (backtracking-safe) regexes and for the linear-time simulation.
_OPS = {
    "": ("", ",", False, False),
    "+": ("", ",", False, True),
    "#": ("#", ",", False, True),
    ".": (".", ".", False, False),
    "/": ("/", "/", False, False),
    ";": (";", ";", True, False),
    "?": ("?", "&", True, False),
    "&": ("&", "&", True, False),
}
_U = string.ascii_letters + string.digits + "-._~"
_R = ":/?#[]@!$&'()*+,;="


def _go_class(reserved: bool, named: bool) -> str:
    chars = _U + _R if reserved else _U + "," + ("=" if named else "")
    return "(?:(?:[" + "".join(re.escape(c) for c in chars) + "]|%[0-9A-Fa-f][0-9A-Fa-f])*)"


def _go_expr(op: str, explodes: list[bool]) -> str:
    first, sep, named, reserved = _OPS[op]
    out = "(?:" + re.escape(first) if first else ""
    out += "(" + _go_class(reserved, named or explodes[0])
    if len(explodes) > 1 or explodes[0]:
        most = -1 if any(explodes) else len(explodes) - 1
        out += "(?:" + re.escape(sep) + _go_class(reserved, named or most < 0) + ")"
        out += f"{{0,{most}}}" if most > 0 else "*"
    out += ")" + (")" if first else "") + "?"
    return out


_expressions = st.tuples(
    st.sampled_from(sorted(_OPS)),
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["", "*", ":2"])),
        min_size=1,
        max_size=3,
    ),
)
_literals = st.lists(
    st.sampled_from(["a", "b", "/", ".", ",", ";", "=", "&", "?", "#", "-", "%41", "!"]),
    min_size=1,
    max_size=3,
).map("".join)
_templates = st.lists(st.one_of(_literals, _expressions), min_size=1, max_size=4).filter(
    lambda parts: any(isinstance(p, tuple) for p in parts)
)
_topics = st.lists(
    st.sampled_from(["a", "b", "/", ".", ",", ";", "=", "&", "?", "#", "%41", "%", "!", "é"]),
    max_size=10,
).map("".join)


@settings(max_examples=400)
@given(_templates, _topics)
def test_template_matching_agrees_with_go_regex(
    parts: list[str | tuple[str, list[tuple[str, str]]]], topic: str
) -> None:
    text, oracle = "", ""
    for part in parts:
        if isinstance(part, str):
            text, oracle = text + part, oracle + re.escape(part)
        else:
            op, specs = part
            text += "{" + op + ",".join(name + mod for name, mod in specs) + "}"
            oracle += _go_expr(op, [mod == "*" for _, mod in specs])
    expected = topic == text or re.fullmatch(oracle, topic) is not None
    assert compile_selector(text).matches(topic) == expected
    template = topics._Template.compile(text)
    assert (template.pattern.fullmatch(topic) is not None) == (
        re.fullmatch(oracle, topic) is not None
    )
    assert template.matches_simulated(topic) == (re.fullmatch(oracle, topic) is not None)
