"""`--config_file` (TOML arguments as defaults) and `--output_config` (the effective arguments as TOML).

sd-scripts reads the file into a namespace and accepts any key, so a typo (or a flag it no longer has) is
silently ignored: that once turned LoRA+ into a no-op for every GUI user. Here the file is turned into
command-line tokens placed *before* the real command line and parsed once by the same parser, so:
- the valid keys are the parser's own flags, whatever `library.config.cli` declares at the time (no list to keep
  in sync);
- every value is checked and converted exactly as on the command line (`network_dim = 16.5` fails as
  `--network_dim 16.5` would);
- the command line wins, because argparse keeps the last value of a flag (a list flag is replaced, not extended).

Keys of sd-scripts options this trainer does not implement (`library.sdscripts_options`), which GUI-written files
carry, are accepted with one note while they are off and refused by name when they are on.

argparse has no public accessor for a parser's actions and groups: `argument_groups` is the one place that reads
its private lists (as sd-scripts does), only reading them; `_lenient` briefly changes the public `required` of the
actions and restores it.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from library.errors import UserInputError
from library.files.atomic import write_text_atomic
from library.files.toml_io import TomlFileError, dumps, read_toml
from library.sdscripts_options import UNIMPLEMENTED_FLAGS, is_off, refusal

logger = logging.getLogger(__name__)

COMMAND_LINE_ONLY = ("config_file", "output_config")  # a file naming itself (or asking to be written) makes no sense


def config_path(name: str) -> Path:
    """The file `--config_file NAME` means: NAME itself if it ends in .toml, else NAME.toml (sd-scripts'
    rule), except that an existing NAME is used when no NAME.toml exists (an explicit file name is never refused)."""
    if name.endswith(".toml") or (not Path(name + ".toml").exists() and Path(name).is_file()):
        return Path(name)
    return Path(name + ".toml")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` with the values of its `--config_file` as defaults.

    Raises UserInputError (one line, naming the file) for a missing/malformed file, an unknown key or a bad value in
    the file; argparse errors of the command line itself exit through `parser.error` as usual. With
    `--output_config` the file is only the destination when it does not exist yet (nothing to read).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    with _lenient(parser):  # required flags may be in the file: find --config_file first
        early = parser.parse_args(argv)
    if not early.config_file:
        return parser.parse_args(argv)
    path = config_path(early.config_file)
    file_tokens: list[str] = []
    if path.exists() or not early.output_config:
        file_tokens = config_tokens(parser, path)
        with _lenient(parser, where=f"config file {path}"):  # a bad value names the file, not a flag never typed
            parser.parse_args(file_tokens)
    return parser.parse_args([*file_tokens, *argv])


def config_tokens(parser: argparse.ArgumentParser, path: Path) -> list[str]:
    """The TOML file as command-line tokens: flat keys, or keys in tables one level deep (any table name)."""
    doc = _read_toml(path)
    if not doc:  # most likely a save that never finished: training on the defaults instead would be a surprise
        raise UserInputError(
            f"config file {path} holds no arguments (it is empty or only comments); write them "
            "into it, or leave out --config_file"
        )
    actions = file_actions(parser)
    values: dict[str, Any] = {}
    foreign: dict[str, Any] = {}  # sd-scripts options we lack
    unknown: list[tuple[str, str | None]] = []
    for key, value, table in _flatten(doc, path):
        if key in COMMAND_LINE_ONLY:
            raise UserInputError(
                f"config file {path}: '{key}' cannot be set inside a config file; give --{key} on the command line"
            )
        if key in values or key in foreign:
            raise UserInputError(f"config file {path}: key '{key}' is set twice; keep one")
        if key in actions:
            values[key] = value
        elif key in UNIMPLEMENTED_FLAGS:
            foreign[key] = value
        else:
            unknown.append((key, table))
    if unknown:
        raise UserInputError(f"config file {path}: {_unknown_keys_message(unknown, actions, parser.prog)}")
    for key, value in foreign.items():
        if not is_off(UNIMPLEMENTED_FLAGS, key, foreign):
            raise UserInputError(f"config file {path}: {refusal(UNIMPLEMENTED_FLAGS, key, value)}")
    if foreign:
        logger.warning(
            "note: config file %s: ignoring sd-scripts options this trainer does not implement, all off "
            "or without effect here: %s",
            path,
            ", ".join(sorted(foreign)),
        )
    return [token for key, value in values.items() for token in _tokens(actions[key], key, value, path)]


def argument_groups(parser: argparse.ArgumentParser) -> list[tuple[str | None, list[argparse.Action]]]:
    """(title, actions) of every argument group, in --help order; each action of the parser is in exactly one.

    argparse offers no public way to list a parser's actions, so this reads its private `_action_groups` and each
    group's `_group_actions` (read only). tests/test_private_apis.py fails, naming argparse, if a Python release
    changes them."""
    return [(group.title, list(group._group_actions)) for group in parser._action_groups]


def parser_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every action of the parser (see `argument_groups`)."""
    return [action for _, actions in argument_groups(parser) for action in actions]


def file_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's long flags by key (their dest, as sd-scripts names the keys); --help and the like excluded."""
    return {
        action.dest: action
        for action in parser_actions(parser)
        if action.default is not argparse.SUPPRESS and any(s.startswith("--") for s in action.option_strings)
    }


def config_toml(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """`args` as TOML, one table per argument group (snake-cased title, as sd-scripts' grouped files); None left out."""
    keys = file_actions(parser).keys() - set(COMMAND_LINE_ONLY)
    tables: dict[str, dict[str, Any]] = {}
    for title, actions in argument_groups(parser):
        name = re.sub(r"\W+", "_", (title or "options").lower()).strip("_")
        for action in actions:
            value = getattr(args, action.dest, None)
            if action.dest in keys and value is not None:
                tables.setdefault(name, {})[action.dest] = value
    header = f"# {parser.prog} arguments; load with --config_file (flags on the command line win)\n"
    return header + dumps(tables)


def write_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """--output_config: write `args` to --config_file's path, else <output_dir>/<output_name>.toml, atomically.

    An existing file is never replaced (as sd-scripts): it may be the user's commented config."""
    path = config_path(args.config_file) if args.config_file else Path(args.output_dir) / f"{args.output_name}.toml"
    if path.exists():
        raise UserInputError(
            f"--output_config: {path} already exists and is kept; remove it or give --config_file "
            "a new path to write the arguments to"
        )
    try:
        write_text_atomic(path, config_toml(parser, args))
    except OSError as error:
        raise UserInputError(f"cannot write config file {path}: {error.strerror or error}") from None
    return path


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserInputError(f"config file {path} not found; check --config_file")
    try:
        return read_toml(path)
    except TomlFileError as error:
        raise UserInputError(f"config file {path} {error}") from None


def _flatten(doc: dict[str, Any], path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(key, value, table or None): top-level keys, and the keys of top-level tables."""
    for key, value in doc.items():
        if not isinstance(value, dict):
            yield key, value, None
            continue
        for inner, inner_value in value.items():
            if isinstance(inner_value, dict):
                raise UserInputError(
                    f"config file {path}: table [{key}.{inner}] is nested too deep; "
                    "put the keys at the top or in tables one level deep"
                )
            yield inner, inner_value, key


def _unknown_keys_message(unknown: list[tuple[str, str | None]], actions: dict[str, argparse.Action], prog: str) -> str:
    """All unknown keys in one line (a GUI file may carry several), each with its nearest valid key."""
    candidates = [key for key in actions if key not in COMMAND_LINE_ONLY]
    parts = []
    for key, table in unknown:
        where = f" in [{table}]" if table else ""
        near = difflib.get_close_matches(key, candidates, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else f" (not a flag of {prog}; see --help)"
        parts.append(f"'{key}'{where}{hint}")
    return f"unknown key{'s' if len(parts) > 1 else ''} " + ", ".join(parts)


def _tokens(action: argparse.Action, key: str, value: Any, path: Path) -> list[str]:
    """One file value as tokens: a switch is its flag or nothing; a list follows its (nargs) flag item by item;
    a single value is `--flag=value` (so a value starting with '-' is not mistaken for a flag)."""
    flag = next(s for s in action.option_strings if s.startswith("--"))
    if action.nargs == 0:  # store_true / store_false / store_const / BooleanOptionalAction
        if isinstance(action, argparse.BooleanOptionalAction) and type(value) is bool:
            return [flag if value else "--no-" + flag[2:]]
        if _same(value, action.const):
            return [flag]
        if _same(value, action.default):
            return []
        switch = isinstance(action, argparse.BooleanOptionalAction) or type(action.const) is bool
        expected = "true or false" if switch else repr(action.const)
        raise UserInputError(f"config file {path}: {key} = {_text(value)} is not allowed; use {expected}")
    items = value if isinstance(value, list) else [value]
    if any(isinstance(item, (dict, list)) for item in items):
        raise UserInputError(f"config file {path}: {key} must be a value or a list of values")
    if action.nargs in (None, "?"):
        if isinstance(value, list):
            raise UserInputError(f"config file {path}: {key} takes one value, not a list")
        return [f"{flag}={_text(value)}"]
    return [flag, *map(_text, items)]


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b  # 1 is not true, "true" is not true


def _text(value: Any) -> str:
    """A TOML value as the command line would spell it (floats keep their exact repr)."""
    return str(value).lower() if type(value) is bool else str(value)


@contextlib.contextmanager
def _lenient(parser: argparse.ArgumentParser, where: str | None = None) -> Iterator[None]:
    """Parse one source alone: required flags may come from the other source; with `where`, an argparse error
    is raised as a UserInputError naming that source instead of exiting. Restores the parser afterwards."""
    required = [action for action in parser_actions(parser) if action.required]
    for action in required:
        action.required = False
    if where is not None:

        def error(message: str) -> NoReturn:  # shadows the method on this instance only
            raise UserInputError(f"{where}: {message}")

        parser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        for action in required:
            action.required = True
        vars(parser).pop("error", None)
