"""Command-line options of vmcontrol's commands, read like any other input from outside.

Two rules (`input-policy.md`):
- An option that takes a value takes the next word whatever it starts with (POSIX `getopt`
  semantics). argparse alone reads a value such as a token beginning with `-` as another
  option and fails; `OptionValuesCommand` rewrites `--opt VALUE` as `--opt=VALUE` first.
- Values are parsed by the shared parsers (`common.parsers`): `--cpu ٣` or `--cpu 1_0` are
  refused like they are on the wire, instead of being read by `int()` as 3 and 10.
"""

import argparse
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand

from common import parsers
from vmcontrol.protocol import MAX_DISK_GB, MAX_NAME_LENGTH, Disk


def _takes_one_value(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.nargs in (None, 1)


def _option_for(parser: argparse.ArgumentParser, word: str) -> argparse.Action | None:
    """The option `word` names in `parser`: exactly, or as an unambiguous `--long` prefix."""
    exact = parser._option_string_actions.get(word)
    if exact is not None or not word.startswith("--") or not parser.allow_abbrev:
        return exact
    matches = {
        action
        for option, action in parser._option_string_actions.items()
        if option.startswith("--") and option.startswith(word)
    }
    return matches.pop() if len(matches) == 1 else None


def _subparser(parser: argparse.ArgumentParser, word: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if action.nargs == argparse.PARSER and isinstance(action.choices, dict):
            chosen = action.choices.get(word)
            if isinstance(chosen, argparse.ArgumentParser):
                return chosen
    return None


def attach_option_values(parser: argparse.ArgumentParser, args: Sequence[str]) -> list[str]:
    """`args` with every value-taking option joined to the word after it (`--token=-x...`,
    `-v2`), following subcommands into their own parsers; everything after `--` is left
    alone. Words argparse would already read correctly come out unchanged."""
    joined: list[str] = []
    current = parser
    index = 0
    while index < len(args):
        word = args[index]
        if word == "--":
            joined.extend(args[index:])
            break
        action = _option_for(current, word) if word.startswith("-") else None
        if action is not None and _takes_one_value(action) and index + 1 < len(args):
            value = args[index + 1]
            joined.append(f"{word}={value}" if word.startswith("--") else f"{word}{value}")
            index += 2
            continue
        if not word.startswith("-"):
            current = _subparser(current, word) or current
        joined.append(word)
        index += 1
    return joined


class OptionValuesCommand(BaseCommand):
    """A management command whose option values may start with `-` (see the module)."""

    def run_from_argv(self, argv: list[str]) -> None:
        parser = self.create_parser(argv[0], argv[1])
        super().run_from_argv([*argv[:2], *attach_option_values(parser, argv[2:])])


# --- option types (argparse `type=` callables over the shared parsers) ----------------------


def _refusing(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def option_type(value: str) -> Any:
        try:
            return parse(value)
        except parsers.InvalidValue as error:
            raise argparse.ArgumentTypeError(error.details[error.field][0]) from None

    option_type.__name__ = getattr(parse, "__name__", "value")
    return option_type


def integer_option(*, min_value: int = 0, max_value: int = parsers.INT64_MAX) -> Any:
    """ASCII digits within `min_value..max_value`."""
    return _refusing(
        lambda value: parsers.integer(
            value, field="value", min_value=min_value, max_value=max_value
        )
    )


def seconds_option(*, max_value: int = 86_400) -> Any:
    """A non-negative number of seconds such as `0.5` (ASCII digits, up to 6 decimals)."""
    return _refusing(
        lambda value: float(
            parsers.money(value, field="value", places=6, max_value=Decimal(max_value))
        )
    )


def text_option(*, max_length: int, allow_empty: bool = False) -> Any:
    """Clean single-line text (no controls, no lone surrogates) of at most `max_length`."""
    return _refusing(
        lambda value: parsers.text(
            value, field="value", max_length=max_length, min_length=0 if allow_empty else 1
        )
    )


def identifier_option(*, max_length: int = 64) -> Any:
    """An identifier (`[A-Za-z0-9._:-]`): host names and addresses, tokens."""
    return _refusing(lambda value: parsers.identifier(value, field="value", max_length=max_length))


def _disk(value: str) -> Disk:
    name, separator, size = value.rpartition(":")
    if not separator:
        raise parsers.InvalidValue("value", "format", f"wants NAME:SIZE_GB, got {value!r}")
    return Disk(
        name=parsers.text(name, field="value", max_length=MAX_NAME_LENGTH),
        size_gb=parsers.integer(size, field="value", max_value=MAX_DISK_GB, numbers=False),
    )


disk_option = _refusing(_disk)
"""`NAME:SIZE_GB` (the size after the last colon) as a protocol `Disk`."""


def _server(value: str) -> tuple[str, int]:
    host, separator, port = value.rpartition(":")
    if not separator:
        raise parsers.InvalidValue("value", "format", f"wants HOST:PORT, got {value!r}")
    return (
        parsers.identifier(host, field="value", max_length=253),
        parsers.integer(port, field="value", min_value=1, max_value=65535),
    )


server_option = _refusing(_server)
"""`HOST:PORT` (the port after the last colon) as a (host, port) pair."""
