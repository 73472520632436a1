#!/usr/bin/env python
"""The GPU check: the seed command on a random full-size SDXL at 1024 px with --fp8_base, then the CUDA-only paths
(--xformers, --full_fp16, --full_bf16, --mixed_precision bf16, --torch_compile), one short run each. Prints one row
per run with s/it and peak VRAM from the run's own `<output_name>_report.json`, and exits 1 after printing the last
lines of every failed run; a run that cannot apply here (xformers not installed, a flag this checkout lacks) says
"skipped" and why.

    bash bench/gpu_check.sh                        # on a CUDA machine: see the script's header for the set-up
    bash bench/gpu_check.sh --dry-run              # the same sequence on the CPU: the tiny SDXL at 64 px
    python bench/gpu_check.py --list [--dry-run]   # the runs and their exact commands, nothing run

Every run is `accelerate launch ... sdxl_train_network.py` with the README's seed command (its four paths pointed
at the check's model, data and output; on the CPU also --resolution 64 and 64-128 px buckets). The data are two
square images (tools/make_demo_dataset.py), one bucket, so each epoch is one step of batch 2: the seed run keeps
its 14 epochs (14 steps), the other runs set --max_train_epochs to a few. A run passes when it exits 0, its report
has the steps asked for and states the precision and attention this run must have (a table per device below), and
its final LoRA is finite with its B matrices moved from zero (under an fp16 GradScaler, B left at zero is only a
note: every step may have been skipped while the loss scale settles).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from typing import Any  # noqa: E402

GIB = 2**30
TARGET_SECONDS = 600
"""The whole check on one H200-class GPU, model writing included."""

# The README's seed command ("The seed command"), verbatim; tests/test_gpu_check.py holds it equal to the one
# tests/test_seed_command.py runs.
SEED_COMMAND = (
    "accelerate launch --num_cpu_threads_per_process 1 sdxl_train_network.py --pretrained_model_name_or_path "
    '"Genimagine-XL-3.1.safetensors" --train_data_dir "DATASET DIR" --output_dir "OUTPUT DIR" --network_module '
    '"networks.lora" --xformers --gradient_checkpointing --persistent_data_loader_workers --cache_latents '
    '--cache_latents_to_disk --max_data_loader_n_workers 1 --enable_bucket --save_model_as "safetensors" '
    '--lr_scheduler_num_cycles 4 --mixed_precision "fp16" --learning_rate 0.0001 --resolution 1024 '
    "--train_batch_size 2 --max_train_epochs 14 --network_dim 4 --network_alpha 1 --shuffle_caption --keep_tokens 1 "
    '--optimizer_type "Lion" --lr_warmup_steps 100 --output_name "utaha_xl_loraplus" --save_precision "fp16" '
    '--lr_scheduler "cosine_with_restarts" --min_bucket_reso 512 --max_bucket_reso 2048 --caption_extension ".txt" '
    '--seed 42 --logging_dir "LOGGING DIR" --fp8_base --loraplus_lr_ratio 16 --save_every_n_epochs 2'
)
SEED_PLACEHOLDERS = ("Genimagine-XL-3.1.safetensors", "DATASET DIR", "OUTPUT DIR", "LOGGING DIR")
SEED_OUTPUT_NAME = "utaha_xl_loraplus"
SEED_EPOCHS = 14
CPU_RESOLUTION = {"--resolution": "64", "--min_bucket_reso": "64", "--max_bucket_reso": "128"}
"""The dry run's sizes: the tiny model at 64 px (at 1024 px its 14 steps take minutes on a CPU)."""

Flags = list[tuple[str, list[str]]]
"""A command line as (flag, its values) pairs, in order."""


@dataclass(frozen=True)
class Expect:
    """What a run's report must say ran (`precision` and `attention` of `<output_name>_report.json`)."""

    compute: str
    unet_weights: str
    lora: str
    attention: str | None = "sdpa"
    """None: the seed's --xformers, which is "xformers" where xformers can run and "sdpa" elsewhere."""


@dataclass(frozen=True)
class CheckRun:
    name: str
    what: str
    set_flags: Mapping[str, str | None] = field(default_factory=dict)
    """Flags added to the seed command, or whose value replaces the seed's (None: a switch)."""
    drop_flags: tuple[str, ...] = ()
    epochs: int = SEED_EPOCHS
    cuda: Expect | None = None
    cpu: Expect | None = None
    """None: the run needs a CUDA GPU and is skipped in the dry run."""
    needs: str | None = None
    """"xformers" or "torch_compile": skipped, saying why, where that is not there."""


FP8 = "float8_e4m3fn"
F16, BF16, F32 = "float16", "bfloat16", "float32"
NO_FP8_SDPA = ("--fp8_base", "--xformers")
RUNS: tuple[CheckRun, ...] = (
    CheckRun(
        "seed",
        "the seed command: fp16, --fp8_base, --xformers, 14 steps",
        cuda=Expect(F16, FP8, F32, attention=None),
        cpu=Expect(F32, FP8, F32),  # a CPU computes fp16 runs in fp32 (README: Memory, precision and speed)
    ),
    CheckRun(
        "xformers",
        "fp16 weights (no fp8), --xformers",
        drop_flags=("--fp8_base",),
        epochs=4,
        cuda=Expect(F16, F16, F32, attention="xformers"),
        needs="xformers",
    ),
    CheckRun(
        "full_fp16",
        "--full_fp16: fp16 LoRA under a GradScaler, SDPA",
        set_flags={"--full_fp16": None, "--sdpa": None},
        drop_flags=NO_FP8_SDPA,
        epochs=4,
        cuda=Expect(F16, F16, F16),
        cpu=Expect(F32, F16, F16),
    ),
    CheckRun(
        "full_bf16",
        "--mixed_precision bf16 --full_bf16, SDPA",
        set_flags={"--mixed_precision": "bf16", "--full_bf16": None, "--sdpa": None},
        drop_flags=NO_FP8_SDPA,
        epochs=4,
        cuda=Expect(BF16, BF16, BF16),
        cpu=Expect(BF16, BF16, BF16),
    ),
    CheckRun(
        "bf16",
        "--mixed_precision bf16, SDPA",
        set_flags={"--mixed_precision": "bf16", "--sdpa": None},
        drop_flags=NO_FP8_SDPA,
        epochs=4,
        cuda=Expect(BF16, BF16, F32),
        cpu=Expect(BF16, BF16, F32),
    ),
    CheckRun(
        "torch_compile",
        "the seed command + --torch_compile (inductor), 6 steps",
        set_flags={"--torch_compile": None, "--dynamo_backend": "inductor"},
        epochs=6,
        cuda=Expect(F16, FP8, F32, attention=None),
        cpu=Expect(F32, FP8, F32),
        needs="torch_compile",
    ),
)
RUN_NAMES = tuple(run.name for run in RUNS)


# --- Command lines --------------------------------------------------------------------------------------------------
def seed_tokens() -> list[str]:
    """The seed command's tokens, as a shell would split it."""
    return shlex.split(SEED_COMMAND)


def split_flags(tokens: Sequence[str]) -> Flags:
    """`--flag value ...` tokens as (flag, values) pairs (a value never starts with "--" in these commands)."""
    pairs: Flags = []
    for token in tokens:
        if token.startswith("--"):
            pairs.append((token, []))
        elif not pairs:
            raise ValueError(f"a value before any flag: {token!r}")
        else:
            pairs[-1][1].append(token)
    return pairs


def edit_flags(pairs: Flags, set_flags: Mapping[str, str | None], drop: Sequence[str] = ()) -> Flags:
    """`pairs` without the `drop` flags, with `set_flags` replacing a flag's values in place or appended at the end."""
    out = [(flag, list(values)) for flag, values in pairs if flag not in drop]
    for flag, value in set_flags.items():
        values = [] if value is None else [value]
        for index, (existing, _) in enumerate(out):
            if existing == flag:
                out[index] = (flag, values)
                break
        else:
            out.append((flag, values))
    return out


def join_flags(pairs: Flags) -> list[str]:
    return [token for flag, values in pairs for token in (flag, *values)]


def script_flags(run: CheckRun, model: Path, data: Path, output: Path, logs: Path, *, cpu: bool) -> list[str]:
    """The flags after `sdxl_train_network.py` for `run`: the seed command's with its paths filled in, the run's
    changes, and on the CPU the dry run's sizes."""
    tokens = seed_tokens()
    script = tokens.index("sdxl_train_network.py")
    paths = dict(zip(SEED_PLACEHOLDERS, (str(model), str(data), str(output), str(logs))))
    pairs = split_flags([paths.get(token, token) for token in tokens[script + 1 :]])
    changes = dict(run.set_flags)
    if run.epochs != SEED_EPOCHS:
        changes["--max_train_epochs"] = str(run.epochs)
    if cpu:
        changes.update(CPU_RESOLUTION)
    return join_flags(edit_flags(pairs, changes, run.drop_flags))


def launch_command(python: str, flags: Sequence[str], *, cpu: bool) -> list[str]:
    """`accelerate launch` as the seed command has it (one process, one CPU thread per process), through `python`
    so the launcher and the trainer use the same environment; every launcher setting is given, so no
    `accelerate config` is needed (mixed precision is the trainer's own flag, which wins)."""
    launcher = [python, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no", *(["--cpu"] if cpu else [])]
    launcher += ["--num_cpu_threads_per_process", "1"]
    return [*launcher, str(REPO / "sdxl_train_network.py"), *flags]


# --- What can run here ---------------------------------------------------------------------------------------------
REQUIRED_MODULES = {
    "torch": "torch (the CUDA build for your driver)",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "safetensors": "safetensors",
    "PIL": "pillow",
    "numpy": "numpy",
    "psutil": "psutil",
    "tqdm": "tqdm",
    "tomli_w": "tomli-w",
    "matplotlib": "matplotlib",
    "tensorboard": "tensorboard (the seed's --logging_dir)",
    "lion_pytorch": "lion-pytorch (the seed's --optimizer_type Lion)",
}


def missing_modules(names: Mapping[str, str] = REQUIRED_MODULES) -> list[str]:
    """The pip names of the modules the runs need that this Python cannot import (all at once, so one look at a
    fresh machine says everything to install)."""
    import importlib

    missing = []
    for module, pip_name in names.items():
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - a broken install fails in many ways; all mean "install it"
            missing.append(f"{pip_name}: {type(error).__name__}: {str(error).strip()[:120]}")
    return missing


def skip_reason(run: CheckRun, *, cpu: bool) -> str | None:
    """Why `run` cannot run here (None: it runs)."""
    if cpu and run.cpu is None:
        return "needs a CUDA GPU"
    if run.needs == "xformers":
        from library.model.precision import xformers_problem

        problem = xformers_problem("cpu" if cpu else "cuda")
        return None if problem is None else f"xformers cannot run: {problem}"
    if run.needs == "torch_compile" and not flag_implemented("torch_compile"):
        return "this checkout has no --torch_compile yet (issue 15 item 2 adds it)"
    return None


def flag_implemented(name: str) -> bool:
    """Whether the trainer's command line has sd-scripts' flag `name` (the options of `library.sdscripts_options`
    are only accepted, while off, in config files)."""
    from library.config.cli import build_parser
    from library.config.config_file import file_actions

    return name in file_actions(build_parser())


def xformers_usable(cpu: bool) -> bool:
    from library.model.precision import xformers_problem

    return not cpu and xformers_problem("cuda") is None


def environment(cpu: bool) -> dict[str, str]:
    """The versions and the device the table was measured with."""
    import importlib.metadata

    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__}
    for package in ("diffusers", "transformers", "accelerate", "xformers"):
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = "-"
    if cpu:
        env["device"] = f"CPU ({os.cpu_count()} cores), dry run"
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = f"{props.name}, {props.total_memory / GIB:.0f} GiB, CUDA {torch.version.cuda}"
    return env


# --- One run -------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    name: str
    status: str
    """"ok", "FAILED" or "skipped"."""
    note: str = ""
    report: dict[str, Any] | None = None
    wall_s: float | None = None
    tail: list[str] = field(default_factory=list)
    """The last lines of the run's output (a failed run's are printed)."""
    command: list[str] = field(default_factory=list)


def run_process(command: Sequence[str], log: Path, timeout: float, env: Mapping[str, str]) -> tuple[int | None, float]:
    """Run `command` with its output in `log`; (exit code or None on timeout, wall seconds). On a timeout the
    whole process group goes (the launcher, the trainer and its data-loader worker), so no GPU memory is held."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8", errors="replace") as out:
        proc = subprocess.Popen(
            list(command),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=dict(env),
            start_new_session=os.name == "posix",
        )
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group = getattr(os, "killpg", None)
            if kill_group is not None and os.name == "posix":
                kill_group(proc.pid, getattr(signal, "SIGKILL", signal.SIGTERM))
            else:
                proc.kill()
            proc.wait()
            code = None
    return code, time.perf_counter() - started


def tail_lines(log: Path, count: int = 40) -> list[str]:
    """The last `count` lines of a log, progress-bar redraws (carriage returns) reduced to their last state."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return [line for line in lines if line.strip()][-count:]


def lora_check(path: Path) -> tuple[bool, int, int]:
    """(every tensor finite, lora_up tensors, lora_up tensors not all zero) of a saved LoRA."""
    import torch
    from safetensors import safe_open

    finite, ups, moved = True, 0, 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = f.get_tensor(key).float()
            finite = finite and bool(torch.isfinite(tensor).all())
            if "lora_up" in key:
                ups += 1
                moved += int(bool(tensor.abs().amax() > 0))
    return finite, ups, moved


def check_outcome(run: CheckRun, expect: Expect, report: dict[str, Any], lora: Path, *, cpu: bool) -> tuple[str, str]:
    """(status, note) of a run that exited 0, from its report and its final LoRA."""
    problems = []
    if report.get("steps") != run.epochs:
        problems.append(f"steps {report.get('steps')} != {run.epochs}")
    precision = report.get("precision", {})
    for key, want in (("compute", expect.compute), ("unet_weights", expect.unet_weights), ("lora", expect.lora)):
        if precision.get(key) != want:
            problems.append(f"{key} {precision.get(key)} != {want}")
    attention = expect.attention or ("xformers" if xformers_usable(cpu) else "sdpa")
    if report.get("attention") != attention:
        problems.append(f"attention {report.get('attention')} != {attention}")
    memory = report.get("peak_memory", {})
    if not cpu and not any(key.startswith("cuda") and value for key, value in memory.items()):
        problems.append("no peak CUDA memory in the report (did it run on the GPU?)")
    note = ""
    if not lora.is_file():
        problems.append(f"no final LoRA {lora.name}")
    else:
        finite, ups, moved = lora_check(lora)
        if not finite:
            problems.append("the final LoRA holds NaN/inf")
        elif ups == 0:
            problems.append("the final LoRA has no lora_up tensors")
        elif moved == 0:
            if precision.get("mixed_precision") == "fp16" and not cpu:
                note = "LoRA B still zero: every step skipped by the fp16 GradScaler?"
            else:
                problems.append("LoRA B still zero after training: no step was applied")
        else:
            note = f"B moved in {moved}/{ups}"
    if problems:
        return "FAILED", "; ".join(problems)
    return "ok", note


def run_one(run: CheckRun, python: str, model: Path, data: Path, work: Path, *, cpu: bool, timeout: float) -> RunResult:
    reason = skip_reason(run, cpu=cpu)
    if reason is not None:
        return RunResult(run.name, "skipped", reason)
    folder = work / "runs" / run.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    output, logs, log = folder / "output", folder / "logs", folder / "log.txt"
    command = launch_command(python, script_flags(run, model, data, output, logs, cpu=cpu), cpu=cpu)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    code, wall = run_process(command, log, timeout, env)
    result = RunResult(run.name, "FAILED", wall_s=wall, tail=tail_lines(log), command=command)
    if code != 0:
        result.note = f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}"
        return result
    report_path = output / f"{SEED_OUTPUT_NAME}_report.json"
    try:
        result.report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        result.note = f"no readable run report {report_path.name}: {error}"
        return result
    expect = run.cpu if cpu else run.cuda
    assert expect is not None  # skip_reason covers the CPU; every run has its CUDA expectation
    result.status, result.note = check_outcome(
        run, expect, result.report, output / f"{SEED_OUTPUT_NAME}.safetensors", cpu=cpu
    )
    return result


# --- The table -----------------------------------------------------------------------------------------------------
COLUMNS = (
    ("run", 13),
    ("status", 7),
    ("s/it", 7),
    ("VRAM GiB", 8),
    ("reserved", 8),
    ("RSS GiB", 7),
    ("steps", 5),
    ("attention", 9),
    ("compute/UNet/LoRA", 30),
    ("wall s", 6),
)


def _gib(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value / GIB:.2f}"


def row_values(result: RunResult) -> list[str]:
    """One table row: s/it is the report's median step time (data loading included, saving excluded), VRAM the
    peak CUDA memory allocated by tensors, `reserved` the allocator's peak reserve where the report has it."""
    report = result.report or {}
    memory = report.get("peak_memory", {})
    median = report.get("step_time_s", {}).get("median")
    precision = report.get("precision", {})
    kinds = "/".join(precision.get(key, "?") for key in ("compute", "unet_weights", "lora")) if precision else "-"
    return [
        result.name,
        result.status,
        "-" if median is None else f"{median:.3f}",
        _gib(memory.get("cuda_allocated_bytes")),
        _gib(memory.get("cuda_reserved_bytes")),
        _gib(memory.get("rss_bytes")),
        str(report.get("steps", "-")),
        str(report.get("attention", "-")),
        kinds,
        "-" if result.wall_s is None else f"{result.wall_s:.0f}",
    ]


def format_row(values: Sequence[str]) -> str:
    return "  ".join(value.ljust(width) for value, (_, width) in zip(values, COLUMNS)).rstrip()


def header() -> str:
    return format_row([name for name, _ in COLUMNS])


def print_row(result: RunResult) -> None:
    line = format_row(row_values(result))
    print(f"{line}  {result.note}" if result.note else line, flush=True)


# --- Model and data ------------------------------------------------------------------------------------------------
def ensure_model(work: Path, model: Path | None, *, cpu: bool) -> Path:
    """The model to train on: --model, else the tiny SDXL (dry run) or a random full-size one, written once under
    `work` and reused."""
    if model is not None:
        return model
    if cpu:
        from tools.make_tiny_sdxl import TINY_SINGLE_FILE, write_tiny_sdxl

        path = work / "tiny_model" / TINY_SINGLE_FILE
        if not path.is_file():
            write_tiny_sdxl(path.parent)
        return path
    from tools.make_tiny_sdxl import FULL_SINGLE_FILE, write_full_sdxl

    path = work / FULL_SINGLE_FILE
    if not path.is_file():
        free = shutil.disk_usage(work).free
        if free < 9 * GIB:
            raise SystemExit(f"error: {work} has {free / GIB:.1f} GiB free; the random SDXL needs about 7 GiB")
        started = time.perf_counter()
        print(f"writing a random full-size SDXL to {path} (6.9 GB fp16, once) ...", flush=True)
        write_full_sdxl(work)
        print(f"  written in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def ensure_data(work: Path, *, cpu: bool) -> Path:
    """Two square images at the run's size, captioned: one bucket, so one step of batch 2 per epoch."""
    from tools.make_demo_dataset import make_demo_dataset

    side = int(CPU_RESOLUTION["--resolution"]) if cpu else 1024
    data = work / f"data_{side}"
    if not data.is_dir():
        make_demo_dataset(data, count=2, min_side=side, max_side=side, repeats=1, name="utaha", seed=3)
    return data


# --- Main ----------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: the tiny SDXL at 64 px (GPU_CHECK_CPU=1)")
    parser.add_argument("--work", type=Path, default=REPO / "bench_out" / "gpu_check", help="model, data and runs")
    parser.add_argument("--model", type=Path, default=None, help="an SDXL single file (default: a random one)")
    parser.add_argument("--only", nargs="+", choices=RUN_NAMES, default=None, help="these runs, in the table's order")
    parser.add_argument("--skip", nargs="+", choices=RUN_NAMES, default=(), help="leave these runs out")
    parser.add_argument("--epochs", type=int, default=None, help="every run this many epochs (steps): a quick try")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run (torch_compile: 2x)")
    parser.add_argument("--summary", type=Path, default=None, help="also write the table and failures as JSON")
    parser.add_argument("--list", action="store_true", help="print the runs and their commands; run nothing")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the trainer (default: this)")
    args = parser.parse_args(argv)
    args.dry_run = args.dry_run or os.environ.get("GPU_CHECK_CPU", "") not in ("", "0")
    return args


def selected_runs(only: Sequence[str] | None, skip: Sequence[str], epochs: int | None = None) -> list[CheckRun]:
    runs = [run for run in RUNS if (only is None or run.name in only) and run.name not in skip]
    return runs if epochs is None else [replace(run, epochs=epochs) for run in runs]


def list_runs(runs: Sequence[CheckRun], python: str, work: Path, *, cpu: bool) -> None:
    model = work / ("tiny_model/tiny_sdxl.safetensors" if cpu else "sdxl_full_random.safetensors")
    data = work / ("data_64" if cpu else "data_1024")
    for run in runs:
        folder = work / "runs" / run.name
        flags = script_flags(run, model, data, folder / "output", folder / "logs", cpu=cpu)
        print(f"{run.name}: {run.what}")
        print("  " + shlex.join(launch_command(python, flags, cpu=cpu)))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cpu = args.dry_run
    runs = selected_runs(args.only, args.skip, args.epochs)
    if args.list:
        list_runs(runs, args.python, args.work, cpu=cpu)
        return 0
    started = time.perf_counter()
    missing = missing_modules()
    if missing:
        print("error: this Python lacks what the runs need (pip install them, or set GPU_CHECK_PYTHON):", flush=True)
        print("\n".join(f"  {line}" for line in missing))
        return 2
    import torch

    if not cpu and not torch.cuda.is_available():
        print(f"error: torch {torch.__version__} sees no CUDA GPU (--dry-run runs the sequence on the CPU)")
        return 2
    env = environment(cpu)
    print("gpu check: " + ", ".join(f"{key} {value}" for key, value in env.items()), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model = ensure_model(args.work, args.model, cpu=cpu)
    data = ensure_data(args.work, cpu=cpu)
    print(f"model {model}, data {data}, runs under {args.work / 'runs'}", flush=True)
    print(header(), flush=True)
    results = []
    for run in runs:
        timeout = args.timeout * (2 if run.name == "torch_compile" else 1)
        result = run_one(run, args.python, model, data, args.work, cpu=cpu, timeout=timeout)
        results.append(result)
        print_row(result)
        if args.summary is not None:  # after every run: a check stopped from outside still leaves its rows
            write_summary(args.summary, env, results, time.perf_counter() - started)
    total = time.perf_counter() - started
    failed = [result for result in results if result.status == "FAILED"]
    print(f"total {total:.0f} s" + ("" if cpu else f" (target < {TARGET_SECONDS} s on one GPU)"), flush=True)
    for result in failed:
        print(f"\n--- {result.name} FAILED: {result.note}\n$ {shlex.join(result.command)}")
        print("\n".join(result.tail))
    if args.summary is not None:
        write_summary(args.summary, env, results, total)
    if failed:
        print(f"\ngpu check FAILED: {', '.join(result.name for result in failed)}", flush=True)
        return 1
    print("gpu check passed", flush=True)
    return 0


def write_summary(path: Path, env: Mapping[str, str], results: Sequence[RunResult], total: float) -> None:
    """The table as JSON: environment, every row with its run report, and each failed run's last lines."""
    rows = [
        {
            **dict(zip([name for name, _ in COLUMNS], row_values(result))),
            "note": result.note,
            "command": shlex.join(result.command),
            "report": result.report,
            "tail": result.tail if result.status == "FAILED" else [],
        }
        for result in results
    ]
    from library.files.atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"environment": dict(env), "total_s": total, "rows": rows}, indent=2) + "\n"
    write_text_atomic(path, text, what="gpu check summary")


if __name__ == "__main__":
    sys.exit(main())
