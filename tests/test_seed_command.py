"""The seed command, verbatim but for its four paths, through a real `accelerate launch` subprocess."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tools.make_demo_dataset import make_demo_dataset

REPO = Path(__file__).resolve().parents[1]

# The command from the issue that started the project, as users paste it.
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


def seed_argv(model: Path, data: Path, output: Path, logs: Path) -> list[str]:
    replacements = {
        "Genimagine-XL-3.1.safetensors": str(model),
        "DATASET DIR": str(data),
        "OUTPUT DIR": str(output),
        "LOGGING DIR": str(logs),
    }
    return [replacements.get(token, token) for token in shlex.split(SEED_COMMAND)]


@pytest.mark.slow
def test_seed_command_runs_under_accelerate_launch(tiny_sdxl, tmp_path):
    # Two square images in one bucket: with batch 2 that is one step per epoch, 14 epochs.
    make_demo_dataset(tmp_path / "data", count=2, min_side=96, max_side=96, repeats=1, name="utaha", seed=3)
    argv = seed_argv(tiny_sdxl.single_file, tmp_path / "data", tmp_path / "out", tmp_path / "logs")
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_CONFIG_FILE": str(REPO / "configs/accelerate/cpu.yaml")}
    proc = subprocess.run([str(accelerate), *argv[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"utaha_xl_loraplus-{e:06d}.safetensors" for e in (2, 4, 6, 8, 10, 12)] + [
        "utaha_xl_loraplus.safetensors",
        "utaha_xl_loraplus_param_groups.json",
        "utaha_xl_loraplus_report.html",
        "utaha_xl_loraplus_report.json",
    ]
    report = json.loads((tmp_path / "out" / "utaha_xl_loraplus_report.json").read_text())
    # The seed command on a CPU: fp8 Linear/Conv storage, fp32 compute, SDPA instead of xformers.
    assert report["precision"]["unet_weights"] == report["precision"]["text_encoder_weights"] == "float8_e4m3fn"
    assert (report["precision"]["compute"], report["attention"], report["steps"]) == ("float32", "sdpa", 14)
    assert proc.stdout.strip().splitlines()[-2:] == [  # what `make demo` ends with: the LoRA, then the page
        f"LoRA saved to {tmp_path / 'out' / 'utaha_xl_loraplus.safetensors'}",
        f"report: {tmp_path / 'out' / 'utaha_xl_loraplus_report.html'}",
    ]
    assert "xformers cannot run on this machine (it needs a CUDA GPU); using PyTorch SDPA" in proc.stdout + proc.stderr
    assert "fp16 needs a CUDA GPU" in proc.stdout + proc.stderr
    with safe_open(str(tmp_path / "out" / "utaha_xl_loraplus.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_network_args"]) == {"loraplus_lr_ratio": "16"}
    assert (meta["ss_steps"], meta["ss_epoch"]) == ("14", "14")
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
