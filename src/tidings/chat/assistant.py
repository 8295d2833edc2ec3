"""The assistant's endpoint: any server that speaks OpenAI's streaming chat completions
(llama.cpp's server, vLLM, Ollama, OpenAI itself).

    client = AssistantClient(AssistantConfig(url="http://127.0.0.1:11434", model="llama3"))
    async with client.stream([{"role": "user", "content": "hi"}]) as pieces:
        async for text in pieces:      # the reply, piece by piece, as it arrives
            ...
    await client.close()

It POSTs `{url}/v1/chat/completions` with `"stream": true` and reads the answer as
Server-Sent Events: `data: {"choices": [{"delta": {"content": "..."}}]}` chunks, then
`data: [DONE]`. `ChunkDecoder` is the sans-I/O half: bytes in, text out. Every way the
endpoint can fail (unreachable, an error status, silence past the timeout, a malformed
chunk, a reply cut off before `[DONE]`, an `error` object in the stream) is raised as one
`AssistantFailed` whose message is fit to show in the room.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from tidings.errors import SSEProtocolError, TidingsError
from tidings.sse import EventParser

__all__ = ["AssistantClient", "AssistantConfig", "AssistantFailed", "ChunkDecoder"]

log = logging.getLogger(__name__)

_MAX_CHUNK_BYTES = 256 * 1024
_MAX_ERROR_TEXT = 200


@dataclass(frozen=True, slots=True)
class AssistantConfig:
    url: str = ""
    model: str = ""
    key: str = ""
    timeout_s: float = 30.0
    max_prompt: int = 2000
    # How many of a room's latest messages go with a question.
    history: int = 20

    @property
    def endpoint(self) -> str:
        """`{url}/v1/chat/completions` (a URL that ends in /v1 already is taken as is)."""
        base = self.url.rstrip("/")
        base = base.removesuffix("/v1")
        return base + "/v1/chat/completions"


class AssistantFailed(TidingsError):
    """The assistant's endpoint could not give a (whole) reply."""

    status_hint = 502


def _content(data: str) -> str:
    """The text of one chunk (often empty: a role, a finish_reason, usage)."""
    try:
        chunk = json.loads(data)
    except ValueError:
        raise AssistantFailed("the assistant sent a malformed chunk (not JSON)") from None
    if not isinstance(chunk, dict):
        raise AssistantFailed("the assistant sent a malformed chunk (not an object)")
    error = chunk.get("error")
    if error is not None:
        detail = error.get("message") if isinstance(error, dict) else error
        raise AssistantFailed(
            f"the assistant reported an error: {str(detail)[:_MAX_ERROR_TEXT]}")
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise AssistantFailed("the assistant sent a malformed chunk (no choices)")
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if delta is None:
        return ""
    if not isinstance(delta, dict):
        raise AssistantFailed("the assistant sent a malformed chunk (delta)")
    text = delta.get("content")
    if text is None:
        return ""
    if not isinstance(text, str):
        raise AssistantFailed("the assistant sent a malformed chunk (content)")
    return text


class ChunkDecoder:
    """Bytes of an OpenAI streaming response in, text out. No I/O.

    `feed` returns the text the bytes complete (chunks cut anywhere, even inside a UTF-8
    sequence, are buffered), and `done` turns true at `data: [DONE]`; bytes after it are
    ignored. A bad chunk sets `error` (and `done`): the text before it is still returned,
    and the caller raises `error` after using it."""

    def __init__(self) -> None:
        self._parser = EventParser(max_event_bytes=_MAX_CHUNK_BYTES)
        self.done = False
        self.error: AssistantFailed | None = None

    def feed(self, data: bytes) -> str:
        if self.done:
            return ""
        try:
            events = self._parser.feed(data)
        except SSEProtocolError:
            events = []
            self.error = AssistantFailed("the assistant sent a malformed chunk (too large "
                                         "or not an event stream)")
        pieces: list[str] = []
        for event in events:
            if event.data.strip() == "[DONE]":
                self.done = True
                break
            try:
                pieces.append(_content(event.data))
            except AssistantFailed as exc:
                self.error = exc
                break
        if self.error is not None:
            self.done = True
        return "".join(pieces)


class AssistantClient:
    def __init__(self, config: AssistantConfig,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        headers = {"Accept": "text/event-stream"}
        if config.key:
            headers["Authorization"] = f"Bearer {config.key}"
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s), headers=headers, transport=transport,
            trust_env=False)

    async def close(self) -> None:
        await self._client.aclose()

    @contextlib.asynccontextmanager
    async def stream(self, messages: list[dict[str, str]]) -> AsyncIterator[AsyncIterator[str]]:
        """The reply to `messages`, as an iterator of text pieces (never empty ones).
        Leaving the block early closes the request (the endpoint stops generating)."""
        body: dict[str, object] = {"messages": messages, "stream": True}
        if self.config.model:
            body["model"] = self.config.model
        timeout_s = self.config.timeout_s
        try:
            async with self._client.stream("POST", self.config.endpoint,
                                           json=body) as response:
                if response.status_code != 200:
                    raise AssistantFailed(
                        f"the assistant's endpoint answered HTTP {response.status_code}")
                yield _pieces(response)
        except httpx.TimeoutException:
            raise AssistantFailed(
                f"the assistant did not answer within {timeout_s:g} s") from None
        except httpx.ConnectError:
            raise AssistantFailed("the assistant's endpoint could not be reached") from None
        except httpx.HTTPError as exc:
            log.info("assistant: the connection failed: %s", exc)
            raise AssistantFailed("the connection to the assistant broke") from None


async def _pieces(response: httpx.Response) -> AsyncIterator[str]:
    decoder = ChunkDecoder()
    async for data in response.aiter_raw():
        text = decoder.feed(data)
        if text:
            yield text
        if decoder.error is not None:
            raise decoder.error
        if decoder.done:
            return
    raise AssistantFailed("the assistant's reply was cut off (no [DONE])")
