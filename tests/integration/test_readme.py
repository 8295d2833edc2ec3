"""The README's shell examples, checked and run as a new user would run them.

Every `curl` example in README.md and docs/*.md whose URL holds braces (a URI template)
must turn curl's globbing off (`-g`): without it curl asks for `/books/id`, and the
subscriber waits forever for nothing. The quick start ("Try it with curl", then the CLI)
runs for real, command by command as written, against a `tidings serve` that made its own
development key, on a free port instead of 8000.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIDINGS = f"{shlex.quote(sys.executable)} -m tidings"
PLACEHOLDER_ID = "urn:uuid:6f1c…"


def _shell_commands(text: str) -> list[str]:
    """The commands of the ```sh blocks, continuation lines joined, comments dropped."""
    commands: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        commands += [line.strip() for line in joined.splitlines()
                     if line.strip() and not line.strip().startswith("#")]
    return commands


def _curl_commands(text: str) -> list[str]:
    inline = re.findall(r"`(curl [^`]+)`", text)
    return [c for c in _shell_commands(text) if c.startswith("curl ")] + inline


def test_every_curl_url_with_braces_turns_globbing_off() -> None:
    unsafe = []
    for path in DOCS:
        for command in _curl_commands(path.read_text()):
            args = shlex.split(command.rstrip("&").strip())
            urls = [a for a in args if a.startswith("http")]
            if any(c in url for url in urls for c in "{}[]") and not (
                    "-g" in args or "--globoff" in args):
                unsafe.append(f"{path.name}: {command}")
    assert not unsafe, "curl globs braces in URLs; add -g:\n" + "\n".join(unsafe)
    assert len(_curl_commands((ROOT / "README.md").read_text())) >= 4  # the check sees them


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    return text[start:text.index("\n## ", start + 1)]


class Server:
    """`tidings serve` as the README starts it: no key configured, in a fresh directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        self.log = open(workdir / "serve.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidings", "serve", "--port", "0", "--log-level", "warning"],
            cwd=workdir, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not self.url:
            match = re.search(r"listening on (http://\S+)", (workdir / "serve.log").read_text())
            if match:
                self.url = match.group(1)
            elif self.proc.poll() is not None:
                raise RuntimeError((workdir / "serve.log").read_text())
            time.sleep(0.05)
        assert self.url, "serve did not start"

    def subscribers(self) -> int:
        try:
            return int(httpx.get(self.url + "/healthz", timeout=2).json()["subscribers"])
        except httpx.TransportError:
            return -1

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def _wait(predicate: object, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(shutil.which("curl") is None and os.environ.get("CI") != "true",
                    reason="curl is not installed")
def test_the_quick_start_runs_as_written(server: Server) -> None:
    readme = (ROOT / "README.md").read_text()
    commands = (_shell_commands(_section(readme, "Try it with curl"))
                + _shell_commands(_section(readme, "Try it with curl").split(
                    "The CLI does the same", 1)[1]))
    commands = list(dict.fromkeys(commands))  # the CLI block is inside the section
    assert any(c.startswith("curl -N") for c in commands)
    assert any("tidings publish" in c for c in commands)
    env = {**server.env, "TIDINGS_URL": server.url}  # the CLI's way to another port
    background: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    published: list[str] = []
    try:
        for n, written in enumerate(commands):
            command = (written.replace("http://127.0.0.1:8000", server.url)
                       .replace(".venv/bin/tidings", TIDINGS))
            if PLACEHOLDER_ID in command:
                command = command.replace(PLACEHOLDER_ID, published[0])
            if command.startswith("curl -N") or " subscribe " in command:
                out = server.workdir / f"background-{n}.out"
                before = server.subscribers()
                with open(out, "wb") as sink:
                    proc = subprocess.Popen(["bash", "-c", command], cwd=server.workdir,
                                            env=env, stdout=sink, stderr=subprocess.STDOUT)
                background.append((written, proc, out))
                assert _wait(lambda b=before: server.subscribers() > b), written
            elif match := re.fullmatch(r"(\w+)=\$\((.*)\)", command):
                value = subprocess.run(["bash", "-c", match.group(2)], cwd=server.workdir,
                                       env=env, capture_output=True, text=True, check=True)
                env[match.group(1)] = value.stdout.strip()
            else:
                done = subprocess.run(["bash", "-c", command], cwd=server.workdir, env=env,
                                      capture_output=True, text=True, timeout=30)
                assert done.returncode == 0, f"{written}\n{done.stderr}"
                if "publish" in command or "/.well-known/mercure" in command:
                    assert done.stdout.startswith("urn:uuid:"), f"{written}\n{done.stdout}"
                    published.append(done.stdout.strip())
        assert len(published) >= 2 and len(background) >= 3
        # Every subscriber of the quick start sees the book, live or from history.
        for written, _, out in background:
            assert _wait(lambda o=out: 'data: {"title":"Dune"}' in o.read_text()), (
                f"{written} printed:\n{out.read_text()}")
    finally:
        for _, proc, _ in background:
            proc.kill()
            proc.wait()
