"""Every setting in one table: the `Settings` dataclass states each one's name, type,
default and help once, and `SETTINGS` (the CLI flags, their `TIDINGS_*` variables, the help
text and the README's configuration table) is read off its fields, so the two cannot drift."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Literal, TypeVar, cast

__all__ = ["SETTINGS", "Setting", "Settings", "markdown_table"]

Kind = Literal["str", "int", "float", "bool", "list"]


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    default: object
    kind: Kind
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "TIDINGS_" + self.name.upper()


_T = TypeVar("_T")


def _setting(default: _T, help_text: str) -> _T:
    """A `Settings` field: its default and the help its flag and the README show."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = _setting("127.0.0.1", "Interface to listen on.")
    port: int = _setting(8000, "Port to listen on (0 picks a free one).")
    db: str = _setting(
        "sqlite:///tidings.db",
        "Database URL (history and collections): sqlite:///FILE, postgresql://... "
        "or memory://.")
    bus: str = _setting(
        "",
        "Shared bus for several processes: redis://HOST:PORT/DB or postgresql://... "
        "(history then lives there, not in --db).")
    workers: int = _setting(1, "Worker processes on the one port (more than 1 needs --bus).")
    jwt_key: str = _setting(
        "",
        "Key for publisher and subscriber JWTs: HMAC secret or PEM public key.")
    publisher_jwt_key: str = _setting("", "Key for publisher JWTs (overrides --jwt-key).")
    subscriber_jwt_key: str = _setting("", "Key for subscriber JWTs (overrides --jwt-key).")
    jwt_algorithm: str = _setting("HS256", "JWT algorithm: HS256/384/512, RS*, ES*, PS*, EdDSA.")
    jwt_audience: str = _setting("", "Required `aud` claim, when set.")
    jwt_issuer: str = _setting("", "Required `iss` claim, when set.")
    anonymous: bool = _setting(
        True,
        "Let subscribers without a token connect (they receive public updates only).")
    cors_origins: tuple[str, ...] = _setting(
        (),
        "Allowed CORS origins, comma-separated ('*' for any).")
    heartbeat: float = _setting(30.0, "Seconds of idleness before a ':' heartbeat comment.")
    history_size: int = _setting(100_000, "Updates kept in history for replay.")
    history_max_age: float = _setting(0.0, "Seconds an update stays in history (0: no limit).")
    subscriptions: bool = _setting(False, "Publish subscription (presence) events and API.")
    max_body: int = _setting(1 << 20, "Largest publish request body in bytes.")
    max_selectors: int = _setting(100, "Most topic selectors in one subscription.")
    max_subscribers: int = _setting(20_000, "Most concurrent subscribers (then 503).")
    subscriber_buffer: int = _setting(
        1000,
        "Frames buffered per subscriber before it is disconnected as too slow.")
    uvicorn_fast_path: bool = _setting(
        True,
        "Write live streams straight to uvicorn's transport (uvicorn's private API, "
        "pinned in pyproject.toml); off: through the ASGI send().")
    head_timeout: float = _setting(
        10.0,
        "Seconds a client has to send a request's headers (then 408 and close).")
    log_level: str = _setting("info", "Log level: debug, info, warning, error.")
    config: str = _setting(
        "",
        "Collections configuration file (TOML or JSON): managed collections, watched "
        "tables, schemas, read and write rules (docs/feeds.md).")
    mongo: str = _setting(
        "",
        "MongoDB database whose collections are watched: mongodb://HOST:PORT/DB "
        "(needs pip install 'tidings[mongodb]'; resume tokens are kept in --db).")
    mongo_watch: tuple[str, ...] = _setting(
        (),
        "MongoDB collections to watch, comma-separated: each one change stream, "
        "published on /collections/COLL (private unless --config says read = public).")
    changes_size: int = _setting(
        100_000,
        "Changes kept in the collections' change log for resuming watches.")
    changes_max_age: float = _setting(
        0.0,
        "Seconds a change stays in the change log (0: no limit).")
    pg_capture: str = _setting(
        "auto",
        "How the PostgreSQL feed captures changes: logical (logical decoding, no trigger: "
        "needs wal_level = logical and a role with REPLICATION), trigger (a trigger per "
        "table, any server) or auto (logical where possible, else trigger).")
    pg_slot_read: str = _setting(
        "auto",
        "How logical decoding reads its replication slot: stream (a replication "
        "connection: each change decoded once, pushed by the server), sql (SQL "
        "functions: through poolers that refuse replication connections) or auto "
        "(stream where the server allows it, else sql).")
    chat: bool = _setting(
        True,
        "Serve the chat at / (accounts, rooms, messages; docs/chat.md). The hub "
        "debugger is at /hub either way.")
    chat_session_ttl: float = _setting(
        604_800.0,
        "Seconds a chat session (its cookie and JWT) lasts; refreshed past half-life.")
    chat_rate_messages: int = _setting(
        10,
        "Chat messages a user may post per --chat-rate-window (then 429).")
    chat_rate_window: float = _setting(10.0, "Seconds of the chat's rate-limit window.")
    chat_heartbeat: float = _setting(
        3.0,
        "With the chat on PostgreSQL (several processes): seconds between each process's "
        "heartbeat; one silent for two is gone (its users offline, its work taken over).")
    assistant_url: str = _setting(
        "",
        "OpenAI-compatible endpoint for @assistant in chat rooms (base URL: llama.cpp, "
        "vLLM, Ollama...; Tidings POSTs {url}/v1/chat/completions). Unset: no assistant.")
    assistant_model: str = _setting("", "Model name sent to the assistant endpoint.")
    assistant_key: str = _setting(
        "",
        "Bearer token for the assistant endpoint, when it needs one.")
    assistant_timeout: float = _setting(
        30.0,
        "Seconds the assistant endpoint may stay silent (connecting, before or between "
        "chunks) before its reply ends with an error.")
    assistant_max_prompt: int = _setting(
        2000,
        "Longest prompt (characters) sent to the assistant (then 422).")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        values = json.loads(text)
        for setting in SETTINGS:
            if setting.kind == "list":
                values[setting.name] = tuple(values.get(setting.name, ()))
        return cls(**values)

    @property
    def history_url(self) -> str:
        """Where updates are kept: the bus when there is one, else the database."""
        return self.bus or self.db

    @property
    def publisher_key(self) -> str:
        return self.publisher_jwt_key or self.jwt_key

    @property
    def subscriber_key(self) -> str:
        return self.subscriber_jwt_key or self.jwt_key


# The annotation of each `Settings` field (a string: postponed annotations) -> its kind.
_KINDS: dict[str, Kind] = {
    "str": "str", "int": "int", "float": "float", "bool": "bool", "tuple[str, ...]": "list",
}


def _as_setting(f: dataclasses.Field[object]) -> Setting:
    kind = _KINDS[str(f.type)]
    # A list's default as its flag or variable spells it: comma-separated.
    default = ",".join(cast("tuple[str, ...]", f.default)) if kind == "list" else f.default
    return Setting(f.name, default, kind, f.metadata["help"])


SETTINGS: tuple[Setting, ...] = tuple(_as_setting(f) for f in fields(Settings))


def markdown_table() -> str:
    """The README's configuration table (tests check the README carries this exact text)."""
    rows = ["| flag | environment | default | what it does |", "|---|---|---|---|"]
    for s in SETTINGS:
        flag = f"`--{s.name.replace('_', '-')}/--no-{s.name.replace('_', '-')}`" if (
            s.kind == "bool") else f"`{s.flag}`"
        default = "" if s.default in ("", None) else f"`{s.default}`"
        rows.append(f"| {flag} | `{s.env}` | {default} | {s.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
