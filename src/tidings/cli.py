"""`tidings serve | token | publish | subscribe | watch | collection`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import click

from tidings.settings import SETTINGS, Setting, Settings

__all__ = ["main"]

DEV_KEY_FILE = Path(".tidings-dev-key")


def _option(setting: Setting) -> Any:
    kinds: dict[str, Any] = {"str": str, "int": int, "float": float, "list": str}
    if setting.kind == "bool":
        name = setting.name.replace("_", "-")
        return click.option(
            f"--{name}/--no-{name}", setting.name, default=setting.default,
            envvar=setting.env, show_default=True, help=setting.help + f" [env {setting.env}]",
        )
    return click.option(
        setting.flag, setting.name, type=kinds[setting.kind],
        default=None if setting.kind == "list" else setting.default,
        envvar=setting.env, show_default=setting.kind != "list",
        help=setting.help + f" [env {setting.env}]",
    )


def settings_options(func: Any) -> Any:
    for setting in reversed(SETTINGS):
        func = _option(setting)(func)
    return func


def build_settings(values: dict[str, Any]) -> Settings:
    values = dict(values)
    for setting in SETTINGS:
        if setting.kind == "list":
            text = values.get(setting.name) or ""
            values[setting.name] = tuple(v.strip() for v in text.split(",") if v.strip())
    names = {f.name for f in dataclasses.fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in names})


def _dev_key() -> tuple[str, bool]:
    """The development key, and whether this run made it (False: an earlier run did)."""
    if DEV_KEY_FILE.exists():
        return DEV_KEY_FILE.read_text().strip(), False
    key = secrets.token_urlsafe(32)
    DEV_KEY_FILE.write_text(key + "\n")
    DEV_KEY_FILE.chmod(0o600)
    return key, True


def _where(base: str, settings: Settings) -> str:
    """What a first run needs to know: where the pages and the hub are."""
    chat = settings.chat and settings.workers <= 1
    rows = [
        ("chat", f"{base}/") if chat else ("status page", f"{base}/"),
        ("debugger", f"{base}/hub  (status page; subscribe and publish by hand)"),
        ("hub", f"{base}/.well-known/mercure"),
    ]
    return "\n".join(f"  {name:<11} {where}" for name, where in rows)


def _configured_key(explicit: str | None) -> str:
    key = explicit or os.environ.get("TIDINGS_PUBLISHER_JWT_KEY") or os.environ.get(
        "TIDINGS_JWT_KEY")
    if key:
        return key
    if DEV_KEY_FILE.exists():
        return DEV_KEY_FILE.read_text().strip()
    raise click.ClickException(
        "no key: pass --jwt-key, set TIDINGS_JWT_KEY, or run `tidings serve` here first"
    )


@click.group(invoke_without_command=True)
@click.version_option(package_name="tidings")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Tidings: a real-time update hub (Mercure over Server-Sent Events)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@main.command()
@settings_options
def serve(**values: Any) -> None:
    """Run the hub."""
    import uvicorn

    from tidings.hub.tokens import encode_token as mint
    from tidings.web.app import SETTINGS_ENV, create_app
    from tidings.web.protocol import GuardedHttpToolsProtocol

    settings = build_settings(values)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # With no key configured, make one (kept in ./.tidings-dev-key) and print a
    # ready token, so that a first run needs no setup and `tidings publish` just works.
    dev = not (settings.jwt_key or settings.publisher_jwt_key or settings.subscriber_jwt_key)
    if dev:
        if settings.jwt_algorithm != "HS256":
            raise click.ClickException("configure --jwt-key for asymmetric algorithms")
        dev_key, made = _dev_key()
        settings = dataclasses.replace(settings, jwt_key=dev_key)
    if settings.workers > 1 and not settings.bus:
        raise click.ClickException(
            "--workers above 1 needs a shared bus (--bus redis://... or --bus postgresql://...):"
            " each worker must see every update and the same history"
        )
    try:
        app = create_app(settings)
    except Exception as exc:  # a bad URL or an unreadable file: one line, not a traceback
        raise click.ClickException(str(exc)) from exc

    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {settings.host}:{settings.port}: {exc}"
        ) from exc
    port = sock.getsockname()[1]
    options: dict[str, Any] = {
        "loop": "uvloop", "lifespan": "on", "access_log": False,
        "http": functools.partial(GuardedHttpToolsProtocol,
                                  head_timeout_s=settings.head_timeout),
        "log_level": settings.log_level, "timeout_graceful_shutdown": 5,
        "proxy_headers": False,
    }
    base = f"http://{settings.host}:{port}"
    workers = f"  ({settings.workers} workers)" if settings.workers > 1 else ""
    click.echo(f"Tidings listening on {base}{workers}\n{_where(base, settings)}", err=True)
    if dev:
        token = mint(settings.publisher_key, publish=["*"], subscribe=["*"])
        key_line = (f"Development key saved in {DEV_KEY_FILE}" if made else
                    f"Development key reused from {DEV_KEY_FILE} (made by an earlier run)")
        click.echo(f"{key_line}. A publisher token:\n{token}", err=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_at_once)
    if settings.workers == 1:
        uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=[sock])
        return
    from uvicorn.supervisors import Multiprocess

    os.environ[SETTINGS_ENV] = settings.to_json()
    config = uvicorn.Config(
        "tidings.web.app:app_from_environment", factory=True, workers=settings.workers,
        **options,
    )
    Multiprocess(config, sockets=[sock]).run()


def _exit_at_once(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT outside uvicorn's own handlers: uvicorn re-raises the signal once its
    graceful shutdown is done, and one that comes before uvicorn has installed its
    handlers (right after the banner) must not land in the middle of its start-up as an
    exception (a SystemExit there could leave the process waiting on a thread). Either
    way nothing is left to clean up: leave with status 0."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


@main.command()
@click.option("--publish", "publish_", multiple=True,
              help="Topic selector the token may publish to.")
@click.option("--subscribe", multiple=True,
              help="Topic selector the token may read private updates of.")
@click.option("--jwt-key", envvar="TIDINGS_JWT_KEY", default=None,
              help="HMAC secret or PEM private key.")
@click.option("--jwt-algorithm", envvar="TIDINGS_JWT_ALGORITHM", default="HS256", show_default=True)
@click.option("--expires-in", type=float, default=None, help="Lifetime in seconds (default: none).")
@click.option("--audience", default=None)
@click.option("--issuer", default=None)
@click.option("--style", type=click.Choice(["mercure", "authorization_details"]),
              default="mercure", show_default=True, help="Claim style: 0.x or 1.0.")
def token(publish_: tuple[str, ...], subscribe: tuple[str, ...], jwt_key: str | None,
          jwt_algorithm: str, expires_in: float | None, audience: str | None,
          issuer: str | None, style: str) -> None:
    """Mint a JWT for publishers and subscribers."""
    from tidings.hub.tokens import encode_token

    click.echo(encode_token(
        _configured_key(jwt_key), publish=list(publish_) or None,
        subscribe=list(subscribe) or None, algorithm=jwt_algorithm, expires_in_s=expires_in,
        audience=audience, issuer=issuer, style=style,  # type: ignore[arg-type]
    ))


def _client_token(token_: str | None) -> str | None:
    if token_:
        return token_
    try:
        from tidings.hub.tokens import encode_token as mint

        return mint(_configured_key(None), publish=["*"], subscribe=["*"])
    except click.ClickException:
        return None


@main.command()
@click.argument("topic")
@click.argument("data", default="")
@click.option("--url", default="http://127.0.0.1:8000", envvar="TIDINGS_URL", show_default=True,
              show_envvar=True, help="The hub (where `tidings serve` listens).")
@click.option("--token", "token_", envvar="TIDINGS_TOKEN", default=None, show_envvar=True,
              help="A JWT (default: one minted with the development key, if here).")
@click.option("--private", is_flag=True)
@click.option("--id", "id_", default=None)
@click.option("--type", "type_", default=None)
def publish(topic: str, data: str, url: str, token_: str | None, private: bool,
            id_: str | None, type_: str | None) -> None:
    """Publish DATA (or standard input with '-') to TOPIC."""
    from tidings.client import Client, HubUnreachable, PublishError

    if data == "-":
        data = sys.stdin.read()

    async def run() -> str:
        async with Client(url, token=_client_token(token_)) as client:
            return await client.publish(topic, data, private=private, id=id_, type=type_)

    try:
        click.echo(asyncio.run(run()))
    except PublishError as exc:
        raise click.ClickException(str(exc)) from exc
    except HubUnreachable as exc:  # its message names the URL and the reason already
        raise click.ClickException(
            f"{exc}. Is `tidings serve` running there? (--url or TIDINGS_URL)") from exc
    except OSError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from exc


@main.command()
@click.argument("topics", nargs=-1, required=True)
@click.option("--url", default="http://127.0.0.1:8000", envvar="TIDINGS_URL", show_default=True,
              show_envvar=True, help="The hub (where `tidings serve` listens).")
@click.option("--token", "token_", envvar="TIDINGS_TOKEN", default=None, show_envvar=True,
              help="A JWT (default: one minted with the development key, if here).")
@click.option("--last-event-id", default=None, help="Resume after this id ('earliest': all).")
@click.option("--count", type=int, default=0, help="Exit after this many events (0: never).")
def subscribe(topics: tuple[str, ...], url: str, token_: str | None,
              last_event_id: str | None, count: int) -> None:
    """Print the updates of TOPICS as they arrive; resumes after a dropped connection."""
    from tidings.client import Client

    # The client says on stderr when the hub cannot be reached (where, and that it keeps
    # trying) and when it is back; events go to stdout.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    client_log = logging.getLogger("tidings.client")
    client_log.addHandler(handler)
    client_log.setLevel(logging.INFO)

    async def run() -> None:
        seen = 0
        async with Client(url, token=_client_token(token_)) as client:
            async for event in client.subscribe(list(topics), last_event_id=last_event_id):
                click.echo(f"id: {event.id}")
                if event.event != "message":
                    click.echo(f"event: {event.event}")
                for line in event.data.split("\n"):
                    click.echo(f"data: {line}")
                click.echo("", nl=True)
                seen += 1
                if count and seen >= count:
                    return

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


@main.command()
@click.argument("table")
@click.option("--db", default="sqlite:///tidings.db", envvar="TIDINGS_DB", show_default=True,
              help="The database with the table (what `tidings serve --db` uses): "
                   "sqlite:///FILE or postgresql://... (its current schema).")
@click.option("--key", default="",
              help="The column that identifies a row (default: its single-column primary "
                   "key; SQLite: else rowid).")
@click.option("--read", type=click.Choice(["private", "public"]), default="private",
              show_default=True,
              help="Who sees its changes: a token with a subscribe claim, or anyone.")
@click.option("--stop", "stop_", is_flag=True, help="Stop watching TABLE (drop its triggers).")
def watch(table: str, db: str, key: str, read: str, stop_: bool) -> None:
    """Watch TABLE of your own schema: every change to it, by any program, is published
    on /collections/TABLE (see docs/feeds.md)."""
    feeds = _registry(db)
    if stop_:
        if not _cli_errors(db, lambda: feeds.unwatch_table(db, table)):
            raise click.ClickException(f"{table} was not watched")
        click.echo(f"stopped watching {table}")
        return
    key = _cli_errors(db, lambda: feeds.watch_table(db, table, key=key, read=read))
    click.echo(f"watching {table} (key {key}, {read}): changes appear on /collections/{table}"
               f" and GET /api/collections/{table}/changes")
    capture = (_cli_errors(db, lambda: feeds.capture_of(db)) if hasattr(feeds, "capture_of")
               else feeds.CAPTURE)
    click.echo(f"capture: {capture} (docs/feeds.md)")


_DB_OPTION = click.option(
    "--db", default="sqlite:///tidings.db", envvar="TIDINGS_DB", show_default=True,
    help="The database (what `tidings serve --db` uses): sqlite:///FILE or "
         "postgresql://... (its current schema).")


@main.group()
def collection() -> None:
    """Managed collections kept in the database, no configuration file needed: every
    running server picks a change up within a second (see docs/feeds.md)."""


def _registry(db: str) -> Any:
    if db.startswith(("postgresql:", "postgres:")):
        from tidings.feeds import postgres
        return postgres
    from tidings.feeds import sqlite
    return sqlite


@collection.command("create")
@click.argument("name")
@_DB_OPTION
@click.option("--read", type=click.Choice(["private", "public"]), default="private",
              show_default=True,
              help="Who reads it: a token with a subscribe claim, or anyone.")
@click.option("--write", type=click.Choice(["publisher", "anyone", "none"]),
              default="publisher", show_default=True,
              help="Who writes through the API: a publisher token, anyone, or nobody.")
@click.option("--schema", "schema_file", type=click.Path(dir_okay=False), default=None,
              help="A JSON Schema (a .json file) every document must satisfy.")
@click.option("--config", default="", envvar="TIDINGS_CONFIG",
              help="The server's configuration file: its collections cannot be defined "
                   "here (the file wins).")
def collection_create(name: str, db: str, read: str, write: str, schema_file: str | None,
                      config: str) -> None:
    """Create the managed collection NAME (or change its settings): its documents are
    served at /api/collections/NAME and its changes published on /collections/NAME."""
    import json

    from tidings.feeds import load_config
    from tidings.feeds.config import parse_definition
    from tidings.feeds.definitions import check_definable

    def run() -> bool:
        schema = None
        if schema_file is not None:
            try:
                schema = json.loads(Path(schema_file).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise click.ClickException(f"cannot read the schema {schema_file}: {exc}") \
                    from None
        definition = parse_definition(name, {"read": read, "write": write, "schema": schema})
        if config:
            check_definable(load_config(config), name)
        return bool(_registry(db).create_collection(db, definition))

    created = _cli_errors(db, run)
    click.echo(f"{'created' if created else 'updated'} {name} ({read}, write: {write}"
               f"{', schema' if schema_file else ''}): documents at /api/collections/{name},"
               f" changes on /collections/{name}")


@collection.command("drop")
@click.argument("name")
@_DB_OPTION
@click.option("--config", default="", envvar="TIDINGS_CONFIG",
              help="The server's configuration file: its collections cannot be dropped "
                   "here.")
def collection_drop(name: str, db: str, config: str) -> None:
    """Drop the collection NAME: its table and every document in it. Its watchers get a
    `drop` event."""
    from tidings.feeds import load_config
    from tidings.feeds.definitions import check_definable

    def run() -> None:
        if config:
            check_definable(load_config(config), name)
        _registry(db).drop_collection(db, name)

    _cli_errors(db, run)
    click.echo(f"dropped {name}")


@collection.command("list")
@_DB_OPTION
def collection_list(db: str) -> None:
    """The collections defined in the database (not those of a configuration file)."""
    configs = _cli_errors(db, lambda: _registry(db).defined_collections(db))
    for config in configs:
        schema = ", schema" if config.schema is not None else ""
        click.echo(f"{config.name}\tread: {config.read}\twrite: {config.write}{schema}")


def _cli_errors(db: str, run: Any) -> Any:
    """`run()`, its failures as one-line errors."""
    import sqlite3

    from tidings.errors import TidingsError
    from tidings.feeds.errors import SchemaViolation

    try:
        return run()
    except SchemaViolation as exc:
        reasons = "; ".join(f"{e['field']}: {e['message']}" for e in exc.errors)
        raise click.ClickException(f"{exc.message} ({reasons})") from exc
    except TidingsError as exc:
        raise click.ClickException(exc.message) from exc
    except sqlite3.Error as exc:
        raise click.ClickException(f"{db}: {exc}") from exc


@main.command(add_help_option=False, context_settings={"ignore_unknown_options": True,
                                                       "allow_interspersed_args": False})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Fan-out benchmark: N subscribers, M updates at R/s (see `tidings bench -h`)."""
    from tidings.bench import main as bench_main

    bench_main(list(args), prog_name="tidings bench")
