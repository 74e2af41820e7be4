"""Every sub-command of `passerelle` says what each of its arguments does."""

from __future__ import annotations

import argparse

import pytest

from gateway.cli import build_parser


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    out: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix} {name}".strip()
                out.append((path, sub))
                out += _commands(sub, path)
    return out


COMMANDS = _commands(build_parser())


def test_the_walk_finds_the_sub_commands() -> None:
    names = {name for name, _ in COMMANDS}
    assert {"run", "send", "convert", "coverage", "replay", "dlq", "tail", "audit verify"} <= names


@pytest.mark.parametrize(("name", "parser"), COMMANDS, ids=[name for name, _ in COMMANDS])
def test_each_argument_has_help(name: str, parser: argparse.ArgumentParser) -> None:
    missing = [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        and not (action.help or "").strip()
    ]
    assert missing == [], f"passerelle {name}: no help for {', '.join(missing)}"


@pytest.mark.parametrize("name", ["send", "replay", "dlq"])
def test_clients_show_where_their_address_comes_from(name: str) -> None:
    parser = dict(COMMANDS)[name]
    text = parser.format_help()
    assert "--config" in text and "config.yaml" in text
    assert ("mllp://" if name == "send" else "http://") in text
