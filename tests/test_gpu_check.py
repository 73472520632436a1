"""bench/gpu_check.sh and bench/gpu_check.py, as far as a CPU can take them: the seed command they run is the README's,
every run's command line is one the trainer accepts and plans as the check expects, a run passes or fails on its
report and LoRA, the shell script is sound, and the dry run goes through the sequence on the CPU."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bench import gpu_check
from bench.gpu_check import RUNS, CheckRun, Expect, check_outcome, row_values, script_flags
from library.config.build import config_from_args
from library.config.cli import build_parser
from library.model.precision import plan_precision
from tests.test_seed_command import SEED_COMMAND as SEED_COMMAND_TESTED
from tools.make_demo_dataset import make_demo_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_the_seed_command_is_the_readmes_and_the_one_the_seed_test_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("## The seed command", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    assert shlex.split(block.replace("\\\n", " ")) == shlex.split(gpu_check.SEED_COMMAND)
    assert gpu_check.SEED_COMMAND == SEED_COMMAND_TESTED


def test_the_runs_cover_the_cuda_only_paths():
    flags = {run.name: script_flags(run, Path("m"), Path("d"), Path("o"), Path("l"), cpu=False) for run in RUNS}
    assert set(flags) == {"seed", "xformers", "full_fp16", "full_bf16", "bf16", "torch_compile"}
    seed_tokens = shlex.split(gpu_check.SEED_COMMAND)
    seed_tokens = seed_tokens[seed_tokens.index("sdxl_train_network.py") + 1 :]
    paths = dict(zip(gpu_check.SEED_PLACEHOLDERS, ("m", "d", "o", "l")))
    assert flags["seed"] == [paths.get(token, token) for token in seed_tokens]  # verbatim but for its paths
    assert "--resolution 1024" in " ".join(flags["seed"]) and "--fp8_base" in flags["seed"]
    assert {"--xformers", "--fp8_base"} & set(flags["full_fp16"]) == set() and "--full_fp16" in flags["full_fp16"]
    assert "--xformers" in flags["xformers"] and "--fp8_base" not in flags["xformers"]
    assert " --mixed_precision bf16 " in f" {' '.join(flags['full_bf16'])} " and "--full_bf16" in flags["full_bf16"]
    assert "--torch_compile" in flags["torch_compile"] and "--fp8_base" in flags["torch_compile"]
    for name, run_flags in flags.items():  # one value per flag: a replaced flag is not given twice
        names = [token for token in run_flags if token.startswith("--")]
        assert len(names) == len(set(names)), name
        epochs = run_flags[run_flags.index("--max_train_epochs") + 1]
        assert epochs == ("14" if name == "seed" else str(next(r.epochs for r in RUNS if r.name == name)))
    cpu = script_flags(RUNS[0], Path("m"), Path("d"), Path("o"), Path("l"), cpu=True)
    assert "--resolution 64" in " ".join(cpu) and "--min_bucket_reso 64 --max_bucket_reso 128" in " ".join(cpu)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("gpu_check_data")
    make_demo_dataset(data, count=2, min_side=64, max_side=64, repeats=1, name="utaha", seed=3)
    return data


@pytest.fixture(scope="module")
def run_configs(tiny_sdxl, tiny_data, tmp_path_factory) -> dict:
    """run name -> the trainer's config of its GPU command line (checking the model's files takes a second or two,
    so once per run); runs this checkout cannot run are left out."""
    configs = {}
    for run in RUNS:
        if gpu_check.skip_reason(run, cpu=False) is None:
            out = tmp_path_factory.mktemp(f"gpu_check_{run.name}")
            flags = script_flags(run, tiny_sdxl.single_file, tiny_data, out / "out", out / "logs", cpu=False)
            configs[run.name] = config_from_args(build_parser().parse_args(flags))
    return configs


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("run", RUNS, ids=[run.name for run in RUNS])
def test_every_run_is_accepted_by_the_trainer_and_planned_as_the_check_expects(run: CheckRun, device, run_configs):
    cpu = device == "cpu"
    reason = gpu_check.skip_reason(run, cpu=cpu)
    if reason is not None:
        assert run.name in ("xformers", "torch_compile")
        pytest.skip(reason)
    cfg = run_configs[run.name]
    plan = plan_precision(cfg.precision.request, device)
    expect: Expect = run.cpu if cpu else run.cuda
    summary = plan.summary()
    assert (summary["compute"], summary["unet_weights"], summary["lora"]) == (
        expect.compute,
        expect.unet_weights,
        expect.lora,
    )
    assert plan.attention == (expect.attention or ("xformers" if gpu_check.xformers_usable(cpu) else "sdpa"))
    assert cfg.loop.max_train_epochs == run.epochs
    # The dry run's command line is the GPU one at 64 px: the same flags but for the sizes.
    gpu_flags = script_flags(run, Path("m"), Path("d"), Path("o"), Path("l"), cpu=False)
    cpu_flags = script_flags(run, Path("m"), Path("d"), Path("o"), Path("l"), cpu=True)
    gpu_args, cpu_args = vars(build_parser().parse_args(gpu_flags)), vars(build_parser().parse_args(cpu_flags))
    assert {k for k in gpu_args if gpu_args[k] != cpu_args[k]} == {"resolution", "min_bucket_reso", "max_bucket_reso"}


def _lora(path: Path, up: float = 0.5) -> Path:
    save_file(
        {"lora_unet_a.lora_up.weight": torch.full((4, 2), up), "lora_unet_a.lora_down.weight": torch.ones(2, 4)},
        str(path),
    )
    return path


def _report(run: CheckRun, expect: Expect, mixed: str = "fp16", cuda_bytes: int | None = 3 * 2**30) -> dict:
    return {
        "steps": run.epochs,
        "precision": {
            "mixed_precision": mixed,
            "compute": expect.compute,
            "unet_weights": expect.unet_weights,
            "lora": expect.lora,
        },
        "attention": expect.attention or "sdpa",
        "peak_memory": {"cuda_allocated_bytes": cuda_bytes, "rss_bytes": 2**30},
        "step_time_s": {"median": 0.5},
    }


def test_a_run_passes_only_with_its_steps_precision_memory_and_a_trained_finite_lora(tmp_path):
    run = next(r for r in RUNS if r.name == "full_fp16")
    expect = run.cuda
    good = _lora(tmp_path / "good.safetensors")
    assert check_outcome(run, expect, _report(run, expect), good, cpu=False) == ("ok", "B moved in 1/1")

    wrong_lora = {**_report(run, expect)}
    wrong_lora["precision"] = {**wrong_lora["precision"], "lora": "float32"}
    status, note = check_outcome(run, expect, wrong_lora, good, cpu=False)
    assert (status, note) == ("FAILED", "lora float32 != float16")
    status, note = check_outcome(run, expect, {**_report(run, expect), "steps": 3}, good, cpu=False)
    assert status == "FAILED" and note == "steps 3 != 4"
    status, note = check_outcome(run, expect, _report(run, expect, cuda_bytes=None), good, cpu=False)
    assert status == "FAILED" and "no peak CUDA memory" in note
    assert check_outcome(run, expect, _report(run, expect, cuda_bytes=None), good, cpu=True)[0] == "ok"  # no VRAM there
    status, note = check_outcome(run, expect, _report(run, expect), tmp_path / "missing.safetensors", cpu=False)
    assert status == "FAILED" and "no final LoRA" in note
    status, note = check_outcome(run, expect, _report(run, expect), _lora(tmp_path / "nan.st", float("nan")), cpu=False)
    assert status == "FAILED" and "NaN/inf" in note

    zero = _lora(tmp_path / "zero.safetensors", 0.0)
    # fp16 under a GradScaler may skip every one of a few first steps: a note, not a failure...
    status, note = check_outcome(run, expect, _report(run, expect), zero, cpu=False)
    assert status == "ok" and "GradScaler" in note
    # ...anywhere else a LoRA that never moved is a failed run.
    bf16 = next(r for r in RUNS if r.name == "bf16")
    status, note = check_outcome(bf16, bf16.cuda, _report(bf16, bf16.cuda, mixed="bf16"), zero, cpu=False)
    assert status == "FAILED" and "no step was applied" in note


def test_a_row_shows_seconds_per_step_and_peak_memory():
    run = RUNS[0]
    report = _report(run, run.cuda)
    report["peak_memory"]["cuda_reserved_bytes"] = int(4.5 * 2**30)
    values = row_values(gpu_check.RunResult("seed", "ok", report=report, wall_s=61.4))
    assert values == [
        "seed",
        "ok",
        "0.500",
        "3.00",
        "4.50",
        "1.00",
        "14",
        "sdpa",
        "float16/float8_e4m3fn/float32",
        "61",
    ]
    skipped = row_values(gpu_check.RunResult("xformers", "skipped", "xformers cannot run"))
    assert skipped[:3] == ["xformers", "skipped", "-"] and set(skipped[3:]) == {"-"}


def _script(env: dict[str, str], *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "GPU_CHECK_PYTHON": sys.executable, **env},
    )


def test_the_shell_script_is_sound():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_the_shell_script_passes_the_mode_and_the_python_on():
    gpu = _script({}, "--list", "--only", "seed")
    cpu = _script({"GPU_CHECK_CPU": "1"}, "--list", "--only", "seed")
    assert gpu.returncode == cpu.returncode == 0, gpu.stderr + cpu.stderr
    gpu_command, cpu_command = gpu.stdout.splitlines()[1], cpu.stdout.splitlines()[1]
    assert gpu_command.split()[0] == cpu_command.split()[0] == sys.executable
    assert " --cpu " not in gpu_command and "--resolution 1024" in gpu_command
    assert " --cpu " in cpu_command and "--resolution 64" in cpu_command
    assert "sdxl_full_random.safetensors" in gpu_command and "tiny_sdxl.safetensors" in cpu_command


ROW = re.compile(r"^(\S+)\s+(ok|FAILED|skipped)\b")


@pytest.mark.slow
def test_the_dry_run_goes_through_the_sequence_on_the_cpu(tiny_sdxl, tmp_path):
    """The seed command through `accelerate launch` on the tiny model (2 epochs to keep it short) and a CUDA-only run
    skipped with its reason; the other runs' command lines are checked above without training."""
    summary = tmp_path / "summary.json"
    done = _script(
        {},
        "--dry-run",
        "--epochs",
        "2",
        "--only",
        "seed",
        "xformers",
        "--model",
        str(tiny_sdxl.single_file),
        "--work",
        str(tmp_path / "work"),
        "--summary",
        str(summary),
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = dict(m.groups() for m in map(ROW.match, done.stdout.splitlines()) if m and m.group(1) != "run")
    assert rows == {"seed": "ok", "xformers": "skipped"}
    assert done.stdout.rstrip().endswith("gpu check passed")
    table = json.loads(summary.read_text(encoding="utf-8"))
    seed, xformers = table["rows"]
    assert xformers["note"] == "needs a CUDA GPU"
    assert seed["report"]["steps"] == 2 and seed["report"]["precision"]["unet_weights"] == "float8_e4m3fn"
    assert seed["note"].startswith("B moved in ")
    assert float(seed["s/it"]) > 0 and seed["VRAM GiB"] == "-" and float(seed["RSS GiB"]) > 0.1
    assert "accelerate.commands.launch" in seed["command"] and "--xformers" in seed["command"]


def test_a_failing_run_fails_the_check_with_its_last_lines(tiny_sdxl, tmp_path, monkeypatch, capsys):
    def failing(command, log, timeout, env):
        log.write_text("loading ...\r\x1b[Asteps: 1/4\nerror: the trainer's own line\n", encoding="utf-8")
        return 1, 2.5

    monkeypatch.setattr(gpu_check, "run_process", failing)
    argv = ["--dry-run", "--only", "bf16", "seed", "--model", str(tiny_sdxl.single_file), "--work", str(tmp_path)]
    assert gpu_check.main(argv) == 1
    out = capsys.readouterr().out
    assert re.search(r"^seed\s+FAILED .*exit code 1$", out, re.M) and re.search(r"^bf16\s+FAILED", out, re.M)
    after = out.split("--- seed FAILED: exit code 1", 1)[1]
    assert "error: the trainer's own line" in after and "accelerate.commands.launch" in after
    assert out.rstrip().endswith("gpu check FAILED: seed, bf16")


def test_a_run_past_its_time_is_stopped_with_its_children(tmp_path):
    """A hung run (a compile that never ends, a stuck collective) is killed with the processes it started, so the
    next run gets the GPU."""
    marker = f"gpu_check_hung_{tmp_path.name}"  # in both processes' command lines, to find them
    grandchild = f"import time; time.sleep(60)  # {marker}"
    script = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(60)"
    code, wall = gpu_check.run_process(
        [sys.executable, "-c", f"{script}  # {marker}"], tmp_path / "log.txt", 3, dict(os.environ)
    )
    assert code is None and wall < 30
    if os.name == "posix":  # the group went: the grandchild is gone too
        listed = subprocess.run(["ps", "-ww", "-eo", "stat,args"], capture_output=True, text=True).stdout.splitlines()
        assert [line for line in listed if marker in line and not line.startswith("Z")] == []
