"""Docs are product: the README's configuration table and the CLI follow the code."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from tidings.cli import main
from tidings.settings import SETTINGS, markdown_table

README = Path(__file__).parents[2] / "README.md"


def test_readme_configuration_table_is_current() -> None:
    text = README.read_text()
    start = text.index("<!-- settings-table -->\n") + len("<!-- settings-table -->\n")
    end = text.index("<!-- /settings-table -->")
    assert text[start:end] == markdown_table(), "run: python -m tidings.settings"


def test_every_setting_is_a_serve_flag_with_its_variable() -> None:
    help_text = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200).output
    for setting in SETTINGS:
        assert setting.flag in help_text
        assert setting.env in help_text


def test_readme_shows_the_two_commands() -> None:
    text = README.read_text()
    assert "tidings serve" in text
    assert "./scripts/test" in text


def test_publish_and_subscribe_help_name_tidings_url() -> None:
    for command in ("publish", "subscribe"):
        help_text = CliRunner().invoke(main, [command, "--help"], terminal_width=200).output
        assert "TIDINGS_URL" in help_text, command
        assert "TIDINGS_TOKEN" in help_text, command
