"""Tests for the sans-I/O SSE codec in :mod:`tidings.sse`."""

from __future__ import annotations

import ast
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings.errors import BadRequest, SSEProtocolError
from tidings.sse import HEARTBEAT, Event, EventParser, encode_comment, encode_event


def parse_all(stream: bytes, **kwargs: int) -> list[Event]:
    return EventParser(**kwargs).feed(stream)


def parse_bytewise(stream: bytes, **kwargs: int) -> list[Event]:
    parser = EventParser(**kwargs)
    events: list[Event] = []
    for i in range(len(stream)):
        events.extend(parser.feed(stream[i : i + 1]))
    return events


def feed_cut(parser: EventParser, stream: bytes, cuts: list[int]) -> list[Event]:
    """What `parser` returns for `stream` fed in pieces cut at `cuts` (sorted offsets)."""
    events: list[Event] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        events.extend(parser.feed(stream[start:end]))
    return events


def normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


# Field values for id/event: anything except the characters the encoder must refuse.
field_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\0"))


# --- encoder ---------------------------------------------------------------------------------


def test_encode_minimal() -> None:
    assert encode_event("hello") == b"data: hello\n\n"


def test_encode_empty_data() -> None:
    assert encode_event("") == b"data: \n\n"


def test_encode_all_fields_in_order() -> None:
    frame = encode_event("x", id="42", event="update", retry=3000)
    assert frame == b"id: 42\nevent: update\nretry: 3000\ndata: x\n\n"


def test_encode_retry_zero_is_written() -> None:
    assert encode_event("x", retry=0) == b"retry: 0\ndata: x\n\n"


def test_encode_empty_id_and_event_are_omitted() -> None:
    assert encode_event("x", id="", event="") == b"data: x\n\n"


def test_encode_multiline_with_empty_lines() -> None:
    assert encode_event("a\n\nb") == b"data: a\ndata: \ndata: b\n\n"
    assert encode_event("a\r\nb\rc\n") == b"data: a\ndata: b\ndata: c\ndata: \n\n"


def test_encode_only_splits_on_cr_and_lf() -> None:
    # str.splitlines() would break on all of these.
    text = "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i"
    assert encode_event(text) == ("data: " + text + "\n\n").encode()


def test_encode_utf8() -> None:
    assert encode_event("héllo ☃", id="é") == "id: é\ndata: héllo ☃\n\n".encode()


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\n", "\0", "x\0y"])
@pytest.mark.parametrize("field", ["id", "event"])
def test_encode_rejects_line_breaks_and_nul(field: str, bad: str) -> None:
    with pytest.raises(BadRequest):
        encode_event("x", **{field: bad})  # type: ignore[arg-type]


def test_encode_rejects_negative_retry() -> None:
    with pytest.raises(BadRequest):
        encode_event("x", retry=-1)


def test_encode_rejects_lone_surrogate() -> None:
    with pytest.raises(BadRequest):
        encode_event("\ud800")


def test_comments() -> None:
    assert HEARTBEAT == b":\n\n"
    assert encode_comment() == HEARTBEAT
    assert encode_comment("ping") == b":ping\n\n"
    for bad in ("a\nb", "a\rb"):
        with pytest.raises(BadRequest):
            encode_comment(bad)


# --- round trip ------------------------------------------------------------------------------


@given(
    data=st.text(),
    id=field_text,
    event=field_text,
    retry=st.none() | st.integers(min_value=0, max_value=2**53),
)
def test_round_trip(data: str, id: str, event: str, retry: int | None) -> None:
    frame = encode_event(data, id=id, event=event, retry=retry)
    expected = Event(data=normalise(data), event=event or "message", id=id or None, retry=retry)
    assert parse_all(frame) == [expected]
    assert parse_bytewise(frame) == [expected]


@given(st.lists(st.tuples(st.text(), field_text, field_text), max_size=5), st.data())
def test_round_trip_stream_any_chunking(
    frames: list[tuple[str, str, str]], draw: st.DataObject
) -> None:
    stream = b"".join(encode_event(d, id=i, event=e) + HEARTBEAT for d, i, e in frames)
    expected = parse_all(stream)
    assert [ev.data for ev in expected] == [normalise(d) for d, _, _ in frames]
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    parser = EventParser()
    assert feed_cut(parser, stream, cuts) == expected
    assert parser.comments == len(frames)


def reference_parse(stream: bytes) -> list[Event]:
    """The WHATWG algorithm transcribed literally, run over a complete stream at once."""
    text = stream.decode("utf-8", "replace").removeprefix("\ufeff")
    lines = re.split("\r\n|\r|\n", text)
    lines.pop()  # the unterminated remainder is never interpreted
    events: list[Event] = []
    data, event_type, last_id, retry = "", "", "", None
    for line in lines:
        if not line:
            if data:
                events.append(Event(data[:-1], event_type or "message", last_id or None, retry))
            data, event_type, retry = "", "", None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data += value + "\n"
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            retry = int(value)
    return events


# Tokens that exercise every branch: line ends, a BOM, a UTF-8 sequence that may be cut or left
# incomplete, NUL, digits and all field names.
stream_tokens = st.sampled_from(
    [
        b"\r",
        b"\n",
        b"\r\n",
        b":",
        b" ",
        b"data",
        b"id",
        b"event",
        b"retry",
        b"x",
        b"12",
        b"\0",
        b"\xef\xbb\xbf",
        b"\xe2\x98",
        b"\x83",
        b"\xff",
    ]
)


@given(st.lists(stream_tokens, max_size=60).map(b"".join), st.data())
def test_matches_reference_under_any_chunking(stream: bytes, draw: st.DataObject) -> None:
    expected = reference_parse(stream)
    assert parse_all(stream) == expected
    assert parse_bytewise(stream) == expected
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    assert feed_cut(EventParser(), stream, cuts) == expected


@given(st.binary(max_size=200))
def test_arbitrary_bytes_match_reference(stream: bytes) -> None:
    assert parse_all(stream) == reference_parse(stream)
    assert parse_bytewise(stream) == reference_parse(stream)


# --- parser: framing -------------------------------------------------------------------------


def test_bytewise_emits_nothing_before_blank_line() -> None:
    frame = encode_event("a\nb", id="1", event="e", retry=5)
    parser = EventParser()
    for i in range(len(frame) - 1):
        assert parser.feed(frame[i : i + 1]) == []
    assert parser.feed(frame[-1:]) == [Event(data="a\nb", event="e", id="1", retry=5)]


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_line_endings(eol: bytes) -> None:
    stream = b"data: a" + eol + b"data: b" + eol + eol
    assert parse_all(stream) == [Event(data="a\nb")]
    assert parse_bytewise(stream) == [Event(data="a\nb")]


# Chunk boundaries: the chunks one parser is fed, each with the events it must return.
CHUNKED: dict[str, list[tuple[bytes, list[Event]]]] = {
    "crlf_split_across_chunks_is_one_line_end": [
        (b"data: a\r", []),
        (b"\n", []),  # had the LF counted as a second line end, this would dispatch
        (b"data: b\r", []),
        (b"\ndata: c\r", []),
        (b"\n\r", [Event(data="a\nb\nc")]),
    ],
    "cr_at_chunk_end_dispatches_without_waiting": [
        (b"data: a\r\r", [Event(data="a")]),
        # The LF after a lone-CR blank line is itself a blank line; with nothing buffered,
        # no event.
        (b"\ndata: b\r\r", [Event(data="b")]),
    ],
    "skip_lf_survives_empty_feed": [
        (b"data: a\r", []),
        (b"", []),
        (b"\n", []),
        (b"\n", [Event(data="a")]),
    ],
    "unterminated_frame_emits_nothing": [
        (b"data: a\ndata: b\n", []),
        (b"data: c", []),
    ],
}


@pytest.mark.parametrize("feeds", CHUNKED.values(), ids=CHUNKED.keys())
def test_chunk_boundaries(feeds: list[tuple[bytes, list[Event]]]) -> None:
    parser = EventParser()
    for chunk, events in feeds:
        assert parser.feed(chunk) == events, chunk


def test_multiline_data_with_empty_lines() -> None:
    stream = b"data: a\ndata:\ndata\ndata: \ndata: b\n\n"
    assert parse_all(stream) == [Event(data="a\n\n\n\nb")]


def test_empty_data_line_dispatches_empty_string() -> None:
    assert parse_all(b"data\n\n") == [Event(data="")]
    assert parse_all(b"data:\n\n") == [Event(data="")]


def test_blank_line_without_data_resets_event_type() -> None:
    stream = b"event: x\n\ndata: y\n\n"
    assert parse_all(stream) == [Event(data="y", event="message")]


def test_only_one_leading_space_stripped() -> None:
    stream = b"event:  spaced\ndata:  two\ndata:none\n\n"
    assert parse_all(stream) == [Event(data=" two\nnone", event=" spaced")]


def test_unknown_fields_and_value_colons() -> None:
    stream = b"foo: bar\ndata: a:b: c\nDATA: ignored\n\n"
    assert parse_all(stream) == [Event(data="a:b: c")]


def test_multiple_events_in_one_chunk() -> None:
    stream = b"data: 1\n\ndata: 2\nevent: t\n\n\n\ndata: 3\n\ndata: partial"
    assert parse_all(stream) == [Event("1"), Event("2", "t"), Event("3")]


# --- parser: BOM, UTF-8 ----------------------------------------------------------------------


def test_bom_stripped_at_start() -> None:
    stream = b"\xef\xbb\xbfdata: a\n\n"
    assert parse_all(stream) == [Event(data="a")]
    assert parse_bytewise(stream) == [Event(data="a")]


def test_only_one_bom_stripped() -> None:
    # The second BOM is part of the field name, so the line is an unknown field.
    assert parse_all(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n") == []


def test_bom_later_in_stream_is_kept() -> None:
    assert parse_all(b"data: \xef\xbb\xbfa\n\n") == [Event(data="\ufeffa")]


def test_short_stream_that_looks_like_bom_prefix() -> None:
    parser = EventParser()
    assert parser.feed(b"\xef") == []
    assert parser.feed(b"\xbb") == []
    assert parser.feed(b"Xdata: a\n\n") == []  # mangled field name, not a BOM
    assert parser.feed(b"data: b\n\n") == [Event(data="b")]


def test_multibyte_char_split_across_feeds() -> None:
    encoded = "data: ☃é\n\n".encode()
    for cut in range(len(encoded) + 1):
        parser = EventParser()
        events = parser.feed(encoded[:cut]) + parser.feed(encoded[cut:])
        assert events == [Event(data="☃é")]


def test_invalid_utf8_replaced() -> None:
    assert parse_all(b"data: a\xffb\xe2\x98\n\n") == [Event(data="a\ufffdb\ufffd")]


# --- parser: comments, retry, id -------------------------------------------------------------


def test_comments_counted() -> None:
    parser = EventParser()
    assert parser.feed(HEARTBEAT + b": keepalive\n" + HEARTBEAT) == []
    assert parser.comments == 3
    assert parser.feed(b"data: a\n:mid-event\n\n") == [Event(data="a")]
    assert parser.comments == 4


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"1000", 1000),
        (b"0", 0),
        (b"007", 7),
        (b"", None),
        (b"-1", None),
        (b"1.5", None),
        (b"10 ", None),
        (b" 10", None),  # after the stripped space, a second space is not a digit
        (b"\xc2\xb2", None),  # superscript two: a Unicode digit, not an ASCII one
        (b"9" * 5000, None),  # beyond int()'s digit limit: ignored, not a crash
    ],
)
def test_retry_parsing(value: bytes, expected: int | None) -> None:
    parser = EventParser()
    events = parser.feed(b"retry: " + value + b"\ndata: x\n\n")
    assert parser.retry == expected
    assert events == [Event(data="x", retry=expected)]


def test_retry_persists_on_parser_but_not_events() -> None:
    parser = EventParser()
    assert parser.feed(b"retry: 10\n\n") == []
    assert parser.retry == 10
    assert parser.feed(b"retry: bad\ndata: a\n\n") == [Event(data="a")]
    assert parser.retry == 10
    assert parser.feed(b"retry: 20\ndata: b\n\n") == [Event(data="b", retry=20)]
    assert parser.retry == 20


def test_id_persists_across_events() -> None:
    parser = EventParser()
    stream = b"id: 1\ndata: a\n\ndata: b\n\nid: 2\n\ndata: c\n\nid\ndata: d\n\n"
    assert parser.feed(stream) == [
        Event(data="a", id="1"),
        Event(data="b", id="1"),
        # An id set in a block without data still updates the buffer.
        Event(data="c", id="2"),
        # A bare "id" resets it.
        Event(data="d", id=None),
    ]
    assert parser.last_event_id == ""


def test_id_with_nul_ignored() -> None:
    parser = EventParser()
    events = parser.feed(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n")
    assert events == [Event(data="a", id="1"), Event(data="b", id="1")]
    assert parser.last_event_id == "1"


def test_last_event_id_defaults() -> None:
    parser = EventParser()
    assert parser.last_event_id == ""
    assert parser.retry is None
    assert parser.comments == 0


# --- parser: bounded memory ------------------------------------------------------------------


def test_size_cap_on_data_buffer() -> None:
    parser = EventParser(max_event_bytes=64)
    parser.feed(b"data: " + b"x" * 40 + b"\n")
    with pytest.raises(SSEProtocolError):
        parser.feed(b"data: " + b"y" * 40 + b"\n")
    # A failed parser stays failed rather than resuming mid-event.
    with pytest.raises(SSEProtocolError):
        parser.feed(b"\n")


def test_size_cap_on_pending_line_without_newline() -> None:
    parser = EventParser(max_event_bytes=64)
    parser.feed(b"x" * 64)
    with pytest.raises(SSEProtocolError):
        parser.feed(b"x")


def test_size_cap_bytewise() -> None:
    with pytest.raises(SSEProtocolError):
        parse_bytewise(b": " + b"c" * 100, max_event_bytes=64)


def test_size_cap_resets_per_event() -> None:
    frame = b"data: " + b"x" * 50 + b"\n\n"
    parser = EventParser(max_event_bytes=64)
    events = [ev for _ in range(100) for ev in parser.feed(frame)]
    assert len(events) == 100


def test_size_cap_exact_limit_allowed() -> None:
    line = b"data: " + b"x" * 58  # 64 bytes
    assert parse_all(line + b"\n\n", max_event_bytes=64) == [Event(data="x" * 58)]
    with pytest.raises(SSEProtocolError):
        parse_all(line + b"x\n\n", max_event_bytes=64)


def test_invalid_max_event_bytes() -> None:
    with pytest.raises(ValueError):
        EventParser(max_event_bytes=0)


def test_module_is_sans_io() -> None:
    import tidings.sse

    with open(tidings.sse.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert imported <= {"__future__", "dataclasses", "tidings.errors"}
