"""Edit a training command line flag by flag, reading it as the trainer's parser does.

Tools that run the trainer with some settings changed (the LoRA+ sweep, the resume line) start from the user's
own argv, so everything else the user gave (a `--config_file`, flags in any order, `--flag=value`, argparse's
abbreviations) stays as it was. A flag is found through the parser's own actions, and its values are the tokens
argparse would give it (by its `nargs`); an unknown token is left alone.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from library.config.config_file import parser_actions

_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+(e-?\d+)?$|^-\d+e-?\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class FlagSpan:
    """One flag and its values in an argv: tokens [start, end); `inline` when given as `--flag=value`."""

    dest: str | None
    """The argparse destination (None: a token the parser does not know)."""
    start: int
    end: int
    inline: bool = False


def find_action(token: str, parser: argparse.ArgumentParser) -> argparse.Action | None:
    """The action a `--flag` (or `--flag=value`) token names: an exact option string, else the one option it is an
    unambiguous prefix of (argparse's abbreviations, which sd-scripts' parser allows too)."""
    name = token.split("=", 1)[0]
    options = {option: action for action in parser_actions(parser) for option in action.option_strings}
    if name in options:
        return options[name]
    if not parser.allow_abbrev:
        return None
    matches = {options[option] for option in options if option.startswith(name) and option.startswith("--")}
    return matches.pop() if len(matches) == 1 else None


def flag_spans(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[FlagSpan]:
    """Every `--flag` of `argv` with the values argparse would give it, in order."""
    spans, index = [], 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--") or token == "--":
            index += 1
            continue
        action = find_action(token, parser)
        if action is None:
            spans.append(FlagSpan(None, index, index + 1))
            index += 1
            continue
        if "=" in token:
            spans.append(FlagSpan(action.dest, index, index + 1, inline=True))
            index += 1
            continue
        end = index + 1 + _value_count(action.nargs, argv[index + 1 :])
        spans.append(FlagSpan(action.dest, index, end))
        index = end
    return spans


def _value_count(nargs: int | str | None, rest: Sequence[str]) -> int:
    """How many of the tokens after a flag argparse takes as its values."""
    if nargs is None:
        return min(1, len(rest))
    if isinstance(nargs, int):
        return min(nargs, len(rest))
    count = 0
    for token in rest:
        if token.startswith("-") and not _NUMBER.match(token):
            break
        count += 1
        if nargs == "?":
            break
    return count


def without_flags(argv: Sequence[str], dests: Collection[str], parser: argparse.ArgumentParser) -> list[str]:
    """`argv` with every occurrence of the flags whose destinations are `dests` (and their values) removed."""
    drop = {i for span in flag_spans(argv, parser) if span.dest in dests for i in range(span.start, span.end)}
    return [token for i, token in enumerate(argv) if i not in drop]


def flag_values(argv: Sequence[str], dest: str, parser: argparse.ArgumentParser) -> list[str]:
    """The values given to flag `dest`, over all its occurrences (`--flag=value` included)."""
    values: list[str] = []
    for span in flag_spans(argv, parser):
        if span.dest != dest:
            continue
        if span.inline:
            values.append(argv[span.start].split("=", 1)[1])
        else:
            values.extend(argv[span.start + 1 : span.end])
    return values


def has_flag(argv: Sequence[str], dest: str, parser: argparse.ArgumentParser) -> bool:
    return any(span.dest == dest for span in flag_spans(argv, parser))


def without_network_args(argv: Sequence[str], keys: Collection[str], parser: argparse.ArgumentParser) -> list[str]:
    """`argv` with the `key=value` entries of `--network_args` whose key is in `keys` removed (the flag itself goes
    when nothing is left of it)."""
    kept = [value for value in flag_values(argv, "network_args", parser) if value.split("=", 1)[0].strip() not in keys]
    rest = without_flags(argv, {"network_args"}, parser)
    return [*rest, "--network_args", *kept] if kept else rest


def join_command(words: Sequence[str]) -> str:
    """A command line quoted for this OS's shell."""
    return subprocess.list2cmdline(list(words)) if os.name == "nt" else shlex.join(words)
