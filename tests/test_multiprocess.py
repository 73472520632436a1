"""Two processes over gloo on the CPU (torchrun, as accelerate launches them): steps are counted per process share,
the schedule spans exactly those steps, and a resumed two-process run ends with identical weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tools.make_demo_dataset import make_demo_dataset

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _torchrun(model: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    argv = [
        torchrun,
        "--nproc_per_node",
        "2",
        str(REPO / "train_network.py"),
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
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
        "--logging_dir",
        str(out / "logs"),
        "--save_every_n_steps",
        "2",
        "--save_state",
        "--output_name",
        "mp",
        *extra,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_count_steps_follow_the_schedule_and_resume_exactly(tiny_sdxl, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_demo_dataset(tmp_path / "data", count=8, min_side=64, max_side=64, repeats=1, name="toy", seed=0)
    proc = _torchrun(tiny_sdxl.single_file, tmp_path / "data", tmp_path / "a")
    # 8 images, batch 1, 2 processes: 4 steps per epoch, 2 epochs; only the main process reports and writes.
    assert proc.stdout.count("LoRA saved to") == 1
    (event_file,) = (tmp_path / "a" / "logs").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file.parent))
    acc.Reload()
    lrs = [e.value for e in acc.Scalars("lr/unet")]
    assert lrs == pytest.approx([1e-3 * (8 - step) / 8 for step in range(1, 9)], rel=1e-6)  # linear over 8 steps

    resumed = _torchrun(
        tiny_sdxl.single_file,
        tmp_path / "data",
        tmp_path / "b",
        "--resume",
        str(tmp_path / "a" / "mp-step00000004-state"),
    )
    assert "resumed from" in resumed.stdout and "at step 4, epoch 2" in resumed.stdout
    want, got = load_file(str(tmp_path / "a" / "mp.safetensors")), load_file(str(tmp_path / "b" / "mp.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
