"""The guides stay true to the code: every `--flag` that README.md and docs/README-ja.md name exists in the program
that reads it (the trainer, one of our tools or benchmarks, accelerate launch, torchrun, a sample prompt line), and
every Python file they tell you to run is there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from library.config.cli import build_parser
from library.config.config_file import parser_actions

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "README-ja.md"]
FLAG = re.compile(r"(?<![\w\-/.])--[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*\*?")
SCRIPT = re.compile(r"(?<![\w/.-])((?:tools|bench)/[a-z0-9_]+\.(?:py|sh))")
PROMPT_LINE_OPTIONS = {"--n", "--w", "--h", "--d", "--s", "--l", "--ss"}
"""Options inside a sample prompt line (`a cat --n blurry --w 1024`), read by library/train/sampling.py."""
OTHER_PROGRAMS = {"--index-url"}
"""pip's, in the install lines."""


def trainer_flags() -> set[str]:
    return {option for action in parser_actions(build_parser()) for option in action.option_strings}


def script_flags() -> set[str]:
    """Every `--flag` our tools and benchmarks declare (`add_argument("--x", ...)`)."""
    flags = set()
    for path in [*(ROOT / "tools").glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                flags |= {
                    arg.value for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")
                }
    for path in (ROOT / "bench").glob("*.sh"):
        flags |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", path.read_text(encoding="utf-8")))
    return flags


def launcher_flags() -> set[str]:
    """accelerate launch's and torchrun's own parsers (the docs show how to start several processes)."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    flags = set()
    for parser in (launch_command_parser(), get_args_parser()):
        flags |= {option for action in parser._actions for option in action.option_strings}
    return flags


@pytest.fixture(scope="module")
def known() -> set[str]:
    return trainer_flags() | script_flags() | launcher_flags() | PROMPT_LINE_OPTIONS | OTHER_PROGRAMS


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_flag_the_guides_name_exists(doc, known):
    text = doc.read_text(encoding="utf-8")
    unknown = []
    for flag in sorted(set(FLAG.findall(text))):
        if flag.endswith("*"):  # `--save_last_n_*`: a family of flags
            if not any(option.startswith(flag[:-1]) for option in known):
                unknown.append(flag)
        elif flag not in known:
            unknown.append(flag)
    assert not unknown, f"{doc.name} names flags no program has: {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_script_the_guides_run_exists(doc):
    missing = sorted(
        {script for script in SCRIPT.findall(doc.read_text(encoding="utf-8")) if not (ROOT / script).is_file()}
    )
    assert not missing, f"{doc.name} names scripts that are not there: {missing}"


def test_the_checker_catches_a_flag_that_does_not_exist(known):
    assert "--loraplus_lr_ratio" in known and "--ratios" in known and "--num_processes" in known
    assert "--loraplus_ratio" not in known and "--learning-rate" not in known
