"""Where sd-scripts' users are: Windows (no Unix-only modules or calls on the trainer's path) and Python 3.10."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_args import tiny_train_argv

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    p
    for p in ROOT.rglob("*.py")
    if not {".venv", "demo_out", "__pycache__"} & set(p.parts)
    and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
)
PROGRAM = [p for p in SOURCES if p.relative_to(ROOT).parts[0] != "tests"]
"""What users run: the two scripts, library/, networks/, tools/, bench/."""
BLOCKER = ROOT / "tests" / "run_without_unix_modules.py"


def _run_blocked(argv: list[str], env: dict[str, str] | None = None, timeout: int = 600):
    return subprocess.run(
        [sys.executable, str(BLOCKER), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=timeout,
    )


@pytest.mark.slow
def test_cli_trains_without_unix_only_modules(tiny_sdxl, tmp_path):
    """The whole run - parsing, loading, training, saving, the report with its memory figures - with `resource`,
    `fcntl`, `termios`, `pwd`, `grp` ... unimportable from the project's code, as on Windows."""
    from tools.make_demo_dataset import make_demo_dataset

    data = tmp_path / "data"
    make_demo_dataset(data, count=2, min_side=64, max_side=96, repeats=1, name="toy", seed=0)
    out = tmp_path / "out"
    argv = tiny_train_argv(
        tiny_sdxl.single_file,
        data,
        out,
        "--max_train_steps",
        "1",
        "--network_dim",
        "2",
        "--logging_dir",
        str(tmp_path / "logs"),
        "--output_name",
        "win",
    )
    done = _run_blocked(["train_network.py", *argv])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "win.safetensors").is_file()
    memory = json.loads((out / "win_report.json").read_text(encoding="utf-8"))["peak_memory"]
    assert memory["rss_bytes"] > 50 * 2**20  # torch alone is more than that
    assert memory["ram_limit_bytes"] > memory["rss_bytes"]


def test_the_blocker_refuses_a_unix_import_from_project_code(tmp_path):
    """The check above can fail: code of ours importing `resource` stops, even after a library imported it."""
    script = tmp_path / "uses_resource.py"
    script.write_text(
        "import psutil  # its Linux backend imports resource: allowed, and now cached\nimport resource\n",
        encoding="utf-8",
    )
    done = _run_blocked([str(script)], env={"UNIX_BLOCK_FROM": str(tmp_path)}, timeout=120)
    assert done.returncode != 0
    assert "ModuleNotFoundError: No module named 'resource' (Unix-only, imported by" in done.stderr


UNIX_ONLY_MODULES = ("resource", "fcntl", "termios", "tty", "pty", "pwd", "grp", "syslog", "crypt")
UNIX_ONLY_CALLS = re.compile(
    r"\bos\.(sysconf|fork|forkpty|getuid|geteuid|getgid|killpg|setsid|getpgid|setpgrp|statvfs|sched_getaffinity"
    r"|uname|getloadavg|mkfifo|chown|lchown)\b"
    r"|\bsignal\.(SIGHUP|SIGUSR1|SIGUSR2|SIGALRM|SIGQUIT|SIGKILL|SIGPIPE|SIGCHLD|SIGTSTP|SIGCONT|alarm|pause"
    r"|setitimer|siginterrupt)\b"
)


def test_no_unix_only_module_at_import_time_or_unix_only_call():
    """Statically, for code the CLI run above does not reach (other flags, tools, bench): a module-level import of
    a Unix-only module, or a call Windows lacks (spell those `getattr(signal, "SIGHUP", None)` behind a check)."""
    problems = []
    for path in PROGRAM:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.match(rf"(import|from)\s+({'|'.join(UNIX_ONLY_MODULES)})\b", line) or UNIX_ONLY_CALLS.search(line):
                problems.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not problems, "\n".join(problems)


def _python310() -> str | None:
    """A working Python 3.10 (a pyenv shim on PATH may exist and still refuse to run)."""
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python")))
    candidates = [shutil.which("python3.10"), *pyenv, "/usr/bin/python3.10", "/usr/local/bin/python3.10"]
    for candidate in filter(None, candidates):
        try:
            done = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except OSError:
            continue
        if done.stdout.strip() == "True":
            return candidate
    return None


PYTHON310 = _python310()
needs_310 = pytest.mark.skipif(PYTHON310 is None, reason="no python3.10 interpreter on this machine")
_COMPILE_ALL = """
import sys
bad = []
for name in sys.argv[1:]:
    try:
        compile(open(name, encoding="utf-8").read(), name, "exec")
    except SyntaxError as error:
        bad.append(f"{name}:{error.lineno}: {error.msg}")
print("\\n".join(bad))
sys.exit(1 if bad else 0)
"""


@needs_310
def test_every_source_compiles_under_python_3_10():
    """requires-python says 3.10: no 3.11+ syntax anywhere (except*, ...). Compiled in memory, nothing written."""
    done = subprocess.run(
        [PYTHON310, "-c", _COMPILE_ALL, *map(str, SOURCES)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


PY311_APIS = re.compile(
    r"^\s*import tomllib|^\s*from tomllib|\bdatetime\.UTC\b|\bStrEnum\b|\btyping\.Self\b|from typing import .*\bSelf\b"
    r"|\bExceptionGroup\b|\bTaskGroup\b|\bcontextlib\.chdir\b|\bhashlib\.file_digest\b|\.add_note\(|\bLiteralString\b"
    r"|\bassert_never\b|\breveal_type\b|\bNotRequired\b|\bgetLevelNamesMapping\b|\bitertools\.batched\b"
    r"|\bsys\.exception\(\)|\btyping\.override\b"
)


def test_no_python_3_11_only_apis():
    """What compiling under 3.10 cannot catch: standard-library names that appeared in 3.11 or later. `tomllib`
    is imported in one place only, `library.files.toml_io`, which falls back to `tomli` on 3.10."""
    problems = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in SOURCES
        if path.name != "toml_io.py" and path != Path(__file__)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if PY311_APIS.search(line)
    ]
    assert not problems, "\n".join(problems)


_SMOKE_310 = """
import sys
from library.config.cli import build_parser
from library.config.config_file import parse_args, config_toml
from library.data.dataset_config import load_dataset_config
from library.data.dataset_config import DatasetConfig
from library.train.sampling import load_sample_prompts
import library.files.toml_io as toml_io
assert toml_io.tomllib.__name__ == "tomli", toml_io.tomllib
cfg, ds, prompts = sys.argv[1:4]
parser = build_parser()
args = parse_args(parser, ["--config_file", cfg])
assert args.network_dim == 16 and args.text_encoder_lr == [1e-5, 2.0], args
assert "network_dim = 16" in config_toml(parser, args)
assert load_dataset_config(ds, DatasetConfig().cli_values()).datasets[0].subsets[0].num_repeats == 3
assert [p.prompt for p in load_sample_prompts(prompts)] == ["a cat", "a dog"]
assert "torch" not in sys.modules
print("ok")
"""


@needs_310
def test_config_files_parse_under_python_3_10(tmp_path):
    """The torch-free start of a run (flags, --config_file, --dataset_config, prompts) under 3.10 with `tomli`."""
    has_tomli = subprocess.run([PYTHON310, "-c", "import tomli, tomli_w"], capture_output=True, timeout=60)
    if has_tomli.returncode != 0:
        pytest.skip(f"{PYTHON310} has no tomli / tomli-w installed (pip install tomli tomli-w)")
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        '[model]\npretrained_model_name_or_path = "m.safetensors"\n[saving]\noutput_dir = "out"\n'
        "[network]\nnetwork_dim = 16\ntext_encoder_lr = [1e-5, 2]\nvae = ''\n",
        encoding="utf-8",
    )
    ds = tmp_path / "ds.toml"
    ds.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nnum_repeats = 3\n", encoding="utf-8")
    prompts = tmp_path / "p.toml"
    prompts.write_text('[prompt]\nsubset = [{prompt = "a cat"}, "a dog --w 640"]\n', encoding="utf-8")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [PYTHON310, "-c", _SMOKE_310, str(cfg), str(ds), str(prompts)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
