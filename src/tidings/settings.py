"""Every setting in one table: the CLI flags, their `TIDINGS_*` variables, the help text
and the README's configuration table are all generated from `SETTINGS`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Literal

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


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "127.0.0.1", "str", "Interface to listen on."),
    Setting("port", 8000, "int", "Port to listen on (0 picks a free one)."),
    Setting("db", "sqlite:///tidings.db", "str",
            "Database URL (history and collections): sqlite:///FILE, postgresql://... "
            "or memory://."),
    Setting("bus", "", "str",
            "Shared bus for several processes: redis://HOST:PORT/DB or postgresql://... "
            "(history then lives there, not in --db)."),
    Setting("workers", 1, "int", "Worker processes on the one port (more than 1 needs --bus)."),
    Setting("jwt_key", "", "str",
            "Key for publisher and subscriber JWTs: HMAC secret or PEM public key."),
    Setting("publisher_jwt_key", "", "str", "Key for publisher JWTs (overrides --jwt-key)."),
    Setting("subscriber_jwt_key", "", "str", "Key for subscriber JWTs (overrides --jwt-key)."),
    Setting("jwt_algorithm", "HS256", "str", "JWT algorithm: HS256/384/512, RS*, ES*, PS*, EdDSA."),
    Setting("jwt_audience", "", "str", "Required `aud` claim, when set."),
    Setting("jwt_issuer", "", "str", "Required `iss` claim, when set."),
    Setting("anonymous", True, "bool",
            "Let subscribers without a token connect (they receive public updates only)."),
    Setting("cors_origins", "", "list", "Allowed CORS origins, comma-separated ('*' for any)."),
    Setting("heartbeat", 30.0, "float", "Seconds of idleness before a ':' heartbeat comment."),
    Setting("history_size", 100_000, "int", "Updates kept in history for replay."),
    Setting("history_max_age", 0.0, "float", "Seconds an update stays in history (0: no limit)."),
    Setting("subscriptions", False, "bool", "Publish subscription (presence) events and API."),
    Setting("max_body", 1 << 20, "int", "Largest publish request body in bytes."),
    Setting("max_selectors", 100, "int", "Most topic selectors in one subscription."),
    Setting("max_subscribers", 20_000, "int", "Most concurrent subscribers (then 503)."),
    Setting("subscriber_buffer", 1000, "int",
            "Frames buffered per subscriber before it is disconnected as too slow."),
    Setting("log_level", "info", "str", "Log level: debug, info, warning, error."),
    Setting("config", "", "str",
            "Collections configuration file (TOML or JSON): managed collections, watched "
            "tables, schemas, read and write rules (docs/feeds.md)."),
    Setting("changes_size", 100_000, "int",
            "Changes kept in the collections' change log for resuming watches."),
    Setting("changes_max_age", 0.0, "float",
            "Seconds a change stays in the change log (0: no limit)."),
    Setting("chat", True, "bool",
            "Serve the chat at / (accounts, rooms, messages; docs/chat.md). The hub "
            "debugger is at /hub either way."),
    Setting("chat_session_ttl", 604_800.0, "float",
            "Seconds a chat session (its cookie and JWT) lasts; refreshed past half-life."),
    Setting("chat_rate_messages", 10, "int",
            "Chat messages a user may post per --chat-rate-window (then 429)."),
    Setting("chat_rate_window", 10.0, "float", "Seconds of the chat's rate-limit window."),
    Setting("assistant_url", "", "str",
            "OpenAI-compatible endpoint for @assistant in chat rooms (base URL: llama.cpp, "
            "vLLM, Ollama...; Tidings POSTs {url}/v1/chat/completions). Unset: no assistant."),
    Setting("assistant_model", "", "str", "Model name sent to the assistant endpoint."),
    Setting("assistant_key", "", "str",
            "Bearer token for the assistant endpoint, when it needs one."),
    Setting("assistant_timeout", 30.0, "float",
            "Seconds the assistant endpoint may stay silent (connecting, before or between "
            "chunks) before its reply ends with an error."),
    Setting("assistant_max_prompt", 2000, "int",
            "Longest prompt (characters) sent to the assistant (then 422)."),
)


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    db: str = "sqlite:///tidings.db"
    bus: str = ""
    workers: int = 1
    jwt_key: str = ""
    publisher_jwt_key: str = ""
    subscriber_jwt_key: str = ""
    jwt_algorithm: str = "HS256"
    jwt_audience: str = ""
    jwt_issuer: str = ""
    anonymous: bool = True
    cors_origins: tuple[str, ...] = ()
    heartbeat: float = 30.0
    history_size: int = 100_000
    history_max_age: float = 0.0
    subscriptions: bool = False
    max_body: int = 1 << 20
    max_selectors: int = 100
    max_subscribers: int = 20_000
    subscriber_buffer: int = 1000
    log_level: str = "info"
    config: str = ""
    changes_size: int = 100_000
    changes_max_age: float = 0.0
    chat: bool = True
    chat_session_ttl: float = 604_800.0
    chat_rate_messages: int = 10
    chat_rate_window: float = 10.0
    assistant_url: str = ""
    assistant_model: str = ""
    assistant_key: str = ""
    assistant_timeout: float = 30.0
    assistant_max_prompt: int = 2000

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        values = json.loads(text)
        values["cors_origins"] = tuple(values.get("cors_origins", ()))
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


def _check_table_matches_dataclass() -> None:
    names = [f.name for f in fields(Settings)]
    table = [s.name for s in SETTINGS]
    if names != table:  # pragma: no cover - a programming error caught at import
        raise RuntimeError(f"SETTINGS and Settings disagree: {names} != {table}")


_check_table_matches_dataclass()


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
