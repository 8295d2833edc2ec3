"""The assistant's chunk decoder, sans I/O: OpenAI streaming bytes in, text out."""

from __future__ import annotations

import json

import pytest

from tidings.chat.assistant import AssistantConfig, AssistantFailed, ChunkDecoder


def chunk(content: object) -> bytes:
    return f"data: {json.dumps({'choices': [{'delta': {'content': content}}]})}\n\n".encode()


def test_fed_one_byte_at_a_time_nothing_comes_early() -> None:
    stream = (b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n' + chunk("Gr")
              + chunk("üße 🌍") + b": a comment\n\n" + b'data: {"choices":[]}\n\n'
              + b"data: [DONE]\n\n" + chunk("after the end"))
    decoder = ChunkDecoder()
    out = []
    for i in range(len(stream)):
        text = decoder.feed(stream[i:i + 1])
        if text:
            out.append(text)
            # text is only emitted at the blank line that ends its event
            assert stream[:i + 1].endswith(b"\n\n")
    assert out == ["Gr", "üße 🌍"]
    assert decoder.done and decoder.error is None


@pytest.mark.parametrize("bad", [
    b"data: {not json\n\n",
    b"data: [1, 2]\n\n",
    b'data: {"nothing": 1}\n\n',
    b'data: {"choices": [{"delta": {"content": 5}}]}\n\n',
    b'data: {"error": {"message": "model not found"}}\n\n',
])
def test_a_bad_chunk_keeps_the_text_before_it(bad: bytes) -> None:
    decoder = ChunkDecoder()
    assert decoder.feed(chunk("kept") + bad + chunk("lost")) == "kept"
    assert decoder.done and isinstance(decoder.error, AssistantFailed)
    assert decoder.feed(chunk("more")) == ""


def test_the_endpoint_url() -> None:
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"):
        assert AssistantConfig(url=url).endpoint == "http://h:1/v1/chat/completions"
