"""What importing a part of Tidings costs: `tidings.sse` needs the standard library alone,
`tidings.hub` no web or client code, `tidings` itself nothing heavy. Each check runs in a
fresh interpreter whose import system refuses the modules the part must not need, so a
stray import fails here instead of in someone's smaller environment."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[2] / "src"

# A meta path finder ahead of all others: it refuses what `blocked(name)` says.
_PRELUDE = """
import sys
sys.path.insert(0, {src!r})
STDLIB = sys.stdlib_module_names

def under(name, packages):
    return any(name == p or name.startswith(p + ".") for p in packages)

def blocked(name):
    top = name.partition(".")[0]
    {rule}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if blocked(name):
            raise ImportError(f"{{name}} may not be imported here")
        return None

sys.meta_path.insert(0, Refuse())
"""

_STDLIB_ONLY = "return top not in STDLIB and top != 'tidings'"
_SERVER = ("tidings.hub", "tidings.transports", "tidings.feeds", "tidings.chat", "tidings.web",
           "tidings.cli", "tidings.settings", "tidings.sqlitedb")
_NO_SERVER = f"return under(name, {_SERVER!r})"
_NO_WEB = ("return under(name, ('starlette', 'httpx', 'uvicorn', 'click', 'tidings.web', "
           "'tidings.client', 'tidings.cli', 'tidings.bench'))")


def _run(rule: str, body: str) -> subprocess.CompletedProcess[str]:
    code = _PRELUDE.format(src=str(SRC), rule=rule) + body
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)


# (what may not be imported, the statement): each part and what it must do without.
_CASES = [
    *((_STDLIB_ONLY, statement) for statement in (
        "import tidings.sse",
        "import tidings.errors",
        "import tidings.version",
        "import tidings; tidings.__version__",
        "from tidings import Event, EventParser, encode_event, TidingsError",
    )),
    *((_NO_WEB, statement) for statement in (
        "import tidings.hub",
        "import tidings.hub.hub",
        "from tidings import Hub, HubConfig, Update",
    )),
    (_NO_SERVER, "import tidings.client; from tidings import Client, PublishError"),
]


@pytest.mark.parametrize(("rule", "statement"), _CASES)
def test_each_part_imports_only_what_its_layer_allows(rule: str, statement: str) -> None:
    done = _run(rule, statement)
    assert done.returncode == 0, done.stderr


def test_the_client_is_refused_the_standard_library_rule() -> None:
    """The check is real: a name that needs httpx fails, and says why."""
    done = _run(_STDLIB_ONLY, "from tidings import Client")
    assert done.returncode != 0
    assert "httpx may not be imported here" in done.stderr


def test_the_client_imports_no_server_module_anywhere_in_its_code() -> None:
    """Imports inside functions too, which the check above does not run."""
    tree = ast.parse((SRC / "tidings" / "client.py").read_text())
    imported = {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
    ours = {name for name in imported if name.partition(".")[0] == "tidings"}
    assert ours <= {"tidings.errors", "tidings.sse"}
