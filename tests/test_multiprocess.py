"""Two processes over gloo on the CPU, launched as users launch them: `accelerate launch` with the shipped configs
(one machine, and two machines simulated on localhost) and torchrun. Steps are counted per process share, the
schedule spans exactly those steps, every process ends with the same weights and one set of files is written, each
state folder holds every process's RNG file, SIGTERM to the launcher saves one state that a resumed run continues
exactly, and a process that dies or hangs stops the other with one line.

Each launch costs ~10-15 s of imports on a quiet machine; the runs are the tiny SDXL at 64 px, 8 steps at most.
The workers run `tests/mp_probe.py` (train_network with hooks: each process prints a digest of its weights)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tools.make_demo_dataset import make_demo_dataset

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "mp_probe.py"
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name == "nt", reason="sends POSIX signals")]


def _train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """8 images, batch 1, 2 processes: 4 steps per epoch, 2 epochs (8 steps)."""
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data / "images"),
        "--output_dir",
        str(out),
        "--resolution",
        "64",
        "--caption_extension",
        ".txt",
        "--train_batch_size",
        "1",
        "--max_train_epochs",
        "2",
        "--max_data_loader_n_workers",
        "0",
        "--seed",
        "3",
        "--cache_latents",
        "--network_dim",
        "4",
        "--optimizer_type",
        "AdamW",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler",
        "linear",
        "--output_name",
        "mp",
        *extra,
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra}


def _torchrun(*args: str, logs: Path | None = None) -> list[str]:
    """torchrun with 2 processes on a free port; `logs`: each process's stdout/stderr in its own files there."""
    separate = ["--log_dir", str(logs), "--redirects", "3"] if logs is not None else []
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), *separate]


def _accelerate(*launch_args: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", *launch_args]


def _run(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _digests(stdout: str) -> dict[int, str]:
    """Each process's `rank R weights <sha256>` (tests/mp_probe.py); the processes share the pipe, so a line may
    follow another's unfinished one."""
    return {int(rank): digest for rank, digest in re.findall(r"rank (\d+) weights ([0-9a-f]{64})", stdout)}


def _rank_file(logs: Path, rank: int, name: str) -> Path:
    """torchrun --log_dir: <logs>/<run id>/attempt_0/<rank>/<stdout|stderr>.log."""
    (path,) = logs.glob(f"*/attempt_0/{rank}/{name}.log")
    return path


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"gave up waiting (launcher exit {proc.poll()})")
        time.sleep(0.05)


def _same_weights(a: Path, b: Path) -> bool:
    want, got = load_file(str(a)), load_file(str(b))
    return want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mp_data")
    make_demo_dataset(root / "images", count=8, min_side=64, max_side=64, repeats=1, name="toy", seed=0)
    (root / "prompts.txt").write_text("".join(f"toy {i} --w 64 --h 64 --s 2\n" for i in range(3)))
    return root


@pytest.fixture(scope="module")
def reference(tiny_sdxl, data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The uninterrupted run, by `accelerate launch` with configs/accelerate/multi_gpu.yaml (gloo on this CPU):
    states every 2 steps (process 1 writes its part of each a second late), 3 sample prompts at steps 4 and 8."""
    out = tmp_path_factory.mktemp("mp_reference")
    launch = _accelerate(
        "--config_file", "configs/accelerate/multi_gpu.yaml", "--num_processes", "2", "--main_process_port", "0"
    )
    extra = ["--logging_dir", str(out / "logs"), "--save_every_n_steps", "2", "--save_state"]
    extra += ["--sample_prompts", str(data / "prompts.txt"), "--sample_every_n_steps", "4"]
    argv = [*launch, str(PROBE), *_train_args(tiny_sdxl.single_file, data, out, *extra)]
    return out, _run(argv, MP_PROBE_SLOW_STATE_RANK="1")


def test_accelerate_launch_two_processes_same_weights_one_set_of_files(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, proc = reference
    digests = _digests(proc.stdout)
    assert sorted(digests) == [0, 1] and digests[0] == digests[1]  # every process holds the same weights
    assert proc.stdout.count("LoRA saved to") == 1  # only the main process reports and writes
    (event_file,) = (out / "logs").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file.parent))
    acc.Reload()
    lrs = [e.value for e in acc.Scalars("lr/unet")]
    assert lrs == pytest.approx([1e-3 * (8 - step) / 8 for step in range(1, 9)], rel=1e-6)  # linear over 8 steps
    # One set of files: checkpoints at steps 2, 4, 6, the final file, their states, the report.
    checkpoints = [f"mp-step{step:08d}" for step in (2, 4, 6)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            *(f"{name}.safetensors" for name in checkpoints),
            *(f"{name}-state" for name in checkpoints),
            "mp-state",
            "mp.safetensors",
            "mp_param_groups.json",
            "mp_report.html",
            "mp_report.json",
            "logs",
            "sample",
        ]
    )
    for state in [out / f"{name}-state" for name in checkpoints] + [out / "mp-state"]:
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in state.iterdir()}, state
    # The prompts shared out: each image made once (3 prompts x steps 4 and 8), none written twice.
    samples = sorted(p.name for p in (out / "sample").iterdir())
    assert len(samples) == 6 and all(name.endswith(".png") for name in samples)
    assert sorted(name.split("_")[1:3] for name in samples) == [
        [step, index] for step in ("000004", "000008") for index in ("00", "01", "02")
    ]


def test_sigterm_to_the_launcher_saves_one_state_that_resumes_exactly(tiny_sdxl, data, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "out"
    args = _train_args(tiny_sdxl.single_file, data, out, "--save_every_n_steps", "1")
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        launcher = subprocess.Popen(
            [*_torchrun(), str(PROBE), *args],
            cwd=REPO,
            env=_env(MP_PROBE_STEP_SECONDS="0.5"),
            stdout=stdout,
            stderr=stderr,
        )
        _wait_for(lambda: (out / "mp-step00000001.safetensors").is_file(), launcher)
        launcher.send_signal(signal.SIGTERM)  # as a scheduler stops a job; torchrun passes it to every process
        assert launcher.wait(timeout=120) != 0
    err = (tmp_path / "stderr").read_text()
    stopped = [line for line in err.splitlines() if line.startswith("interrupted (SIGTERM) after step ")]
    assert len(stopped) == 1, err[-3000:]
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert 1 <= step < 8
    state = out / f"mp-step{step:08d}-state"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in state.iterdir()}
    assert f"state saved to {state}; continue with 2 processes" in err

    _run([*_torchrun(), str(PROBE), *args, "--resume", str(state)])
    assert _same_weights(ref_out / "mp.safetensors", out / "mp.safetensors")  # as if never stopped


def test_a_killed_process_stops_the_other_with_one_line(tiny_sdxl, data, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    args = _train_args(tiny_sdxl.single_file, data, out, "--save_every_n_steps", "1", "--ddp_timeout", "1")
    launcher = subprocess.Popen(
        [*_torchrun(logs=logs), str(PROBE), *args], cwd=REPO, env=_env(MP_PROBE_STEP_SECONDS="0.5")
    )
    _wait_for(lambda: (out / "mp-step00000001.safetensors").is_file(), launcher)
    pid = int(_rank_file(logs, 1, "stdout").read_text().split("rank 1 pid ")[1].split()[0])
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    assert time.monotonic() - killed_at < 60  # torchrun stops the group; the survivor does not wait for ever
    err = _rank_file(logs, 0, "stderr").read_text()
    lines = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("error: lost contact with another process of this run ("), err


def test_a_hung_process_stops_the_other_after_ddp_timeout(tiny_sdxl, data, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    args = _train_args(tiny_sdxl.single_file, data, out, "--ddp_timeout", "0.25")  # 15 s
    launcher = subprocess.Popen(
        [*_torchrun(logs=logs), str(PROBE), *args], cwd=REPO, env=_env(MP_PROBE_STEP_SECONDS="0.5")
    )
    _wait_for(lambda: "| 2/8" in "".join(p.read_text() for p in logs.glob("*/attempt_0/0/stderr.log")), launcher)
    pid = int(_rank_file(logs, 1, "stdout").read_text().split("rank 1 pid ")[1].split()[0])
    os.kill(pid, signal.SIGSTOP)  # alive, holding its connections, answering nothing
    stopped_at = time.monotonic()
    try:
        err0 = _rank_file(logs, 0, "stderr")
        _wait_for(lambda: "error: lost contact" in err0.read_text(), launcher, timeout=120)
        waited = time.monotonic() - stopped_at
    finally:
        os.kill(pid, signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    assert 10 < waited < 60, waited  # --ddp_timeout 0.25: 15 s
    lines = [line for line in err0.read_text().splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(lines) == 1 and "Timed out" in lines[0], lines


def test_two_machines_simulated_on_localhost(tiny_sdxl, data, reference, tmp_path):
    """`accelerate launch` on "machine" 0 and 1 (configs/accelerate/multi_node.yaml, one process each, both on
    127.0.0.1): the same weights on both, the same as the one-machine run's, and one set of files."""
    _, ref = reference
    out, port = tmp_path / "out", str(_free_port())
    args = _train_args(tiny_sdxl.single_file, data, out)
    launchers = [
        subprocess.Popen(
            _accelerate(
                "--config_file",
                "configs/accelerate/multi_node.yaml",
                "--num_processes",
                "2",
                "--num_machines",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
            )
            + [str(PROBE), *args],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = [launcher.communicate(timeout=600) for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], [err[-3000:] for _, err in results]
    digests = {**_digests(results[0][0]), **_digests(results[1][0])}
    assert sorted(digests) == [0, 1] and digests[0] == digests[1] == _digests(ref.stdout)[0]
    assert sum(stdout.count("LoRA saved to") for stdout, _ in results) == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "mp.safetensors",
        "mp_param_groups.json",
        "mp_report.html",
        "mp_report.json",
    ]
