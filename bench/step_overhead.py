#!/usr/bin/env python
"""The trainer's step against a bare PyTorch step of the same model on the same data, in one run.

    python bench/step_overhead.py [--sizes tiny mid] [--steps 30] [--resolution 64] [--batch 2]

For each model size (the tiny SDXL of tools/make_tiny_sdxl.py, and its mid-size variant), one process:
1. bare: the same LoRA network (UNet-only, dim 8, AdamW) on the same batches (cached latents and text-encoder
   outputs produced by the trainer's own data path), stepped by a plain loop: noise, UNet forward, MSE, backward,
   grad-norm clip, optimizer step, zero_grad - nothing else;
2. trainer: `library.train.trainer.train` with the same flags; its median step time comes from its own
   `<name>_report.json` (data loading included, saving excluded);
3. bare again, so drift of this machine's speed shows up (the bare figure is the median over both).
Prints the median step times and the ratio trainer / bare (target <= 1.05).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from library.train import allocator  # noqa: E402

TARGET = 1.05


def train_argv(model: Path, data: Path, out: Path, steps: int, resolution: int, batch: int) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--output_name",
        "bench",
        "--caption_extension",
        ".txt",
        "--resolution",
        str(resolution),
        "--train_batch_size",
        str(batch),
        "--max_train_steps",
        str(steps),
        "--network_dim",
        "8",
        "--network_alpha",
        "8",
        "--network_train_unet_only",
        "--cache_latents",
        "--cache_text_encoder_outputs",
        "--optimizer_type",
        "AdamW",
        "--learning_rate",
        "1e-4",
        "--max_data_loader_n_workers",
        "0",
        "--seed",
        "0",
    ]


def prepared_batches(cfg) -> tuple[object, object, list[dict]]:
    """(models, network, batches): the trainer's own data path, cached, materialised once for the bare loop."""
    from accelerate import Accelerator

    from library.data.dataset import TrainDataset, scan_train_data_dir
    from library.data.latent_cache import cache_latents
    from library.model.base_models import prepare_base_models, vae_encoder
    from library.model.loading import load_sdxl
    from library.model.precision import plan_precision
    from library.train.setup_parts import cache_text_conditioning, create_lora_network, make_loader

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    plan = plan_precision(cfg.precision.request, accelerator.device.type)
    models = load_sdxl(
        cfg.model.path,
        config_dir=cfg.model.config_dir,
        dtype=plan.weight_dtype,
        device=accelerator.device,
        linear_weight_dtypes=plan.storage_dtypes(),
        vae_dtype=plan.vae_dtype,
    )
    prepare_base_models(models, plan, cfg.precision, False, accelerator.device)
    dataset = TrainDataset(scan_train_data_dir(cfg.data), cfg.data)
    cache_latents(
        dataset,
        vae_encoder(models.vae, accelerator.device),
        to_disk=False,
        batch_size=4,
        show_progress=False,
        vae_fingerprint="bench",
    )
    text_cache = cache_text_conditioning(dataset, models, cfg.loop, plan, accelerator, model_id="bench")
    network = create_lora_network(cfg.network, models).to(accelerator.device)
    loader, sampler = make_loader(dataset, cfg.loop, accelerator, text_cache)
    sampler.set_epoch(1)
    return models, network, list(loader)


def bare_steps(models, network, batches: list[dict], steps: int, lr: float = 1e-4) -> list[float]:
    """Plain PyTorch: forward, loss, backward, clip, step; returns each step's wall time."""
    from library.model.text_encoding import time_ids
    from library.train.loss import SDXL_VAE_SCALE, make_noise_scheduler

    unet, scheduler = models.unet, make_noise_scheduler()
    params = network.get_trainable_params()
    optimizer = torch.optim.AdamW(params, lr=lr)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        batch = batches[step % len(batches)]
        latents = batch["latents"] * SDXL_VAE_SCALE
        added = {
            "text_embeds": batch["text_pooled"],
            "time_ids": time_ids(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]),
        }
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, batch["text_context"], added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)  # the trainer reads the loss every step too
        times.append(time.perf_counter() - start)
    return times


def trainer_median(argv: list[str]) -> float:
    from library.config.build import config_from_args
    from library.config.cli import build_parser
    from library.train.trainer import train

    result = train(config_from_args(build_parser().parse_args(argv)))
    return json.loads(result.report_path.read_text())["step_time_s"]["median"]


def write_model(size: str, folder: Path) -> Path:
    from tools.make_tiny_sdxl import write_mid_sdxl, write_tiny_sdxl

    if size == "tiny":
        return write_tiny_sdxl(folder, seed=0).single_file
    return write_mid_sdxl(folder, dtype=torch.float32)


def measure(size: str, tmp: Path, args) -> tuple[float, float]:
    from library.config.build import config_from_args
    from library.config.cli import build_parser
    from tools.make_demo_dataset import make_demo_dataset

    model = write_model(size, tmp / f"model_{size}")
    data = tmp / "data"
    if not data.is_dir():
        make_demo_dataset(
            data, count=8, min_side=args.resolution, max_side=args.resolution, repeats=1, name="bench", seed=0
        )
    argv = train_argv(model, data, tmp / f"out_{size}", args.steps, args.resolution, args.batch)
    models, network, batches = prepared_batches(config_from_args(build_parser().parse_args(argv)))
    warmup = max(2, args.steps // 10)
    bare = bare_steps(models, network, batches, warmup + args.steps)[warmup:]
    trainer = trainer_median(argv)
    bare += bare_steps(models, network, batches, warmup + args.steps)[warmup:]
    return trainer, statistics.median(bare)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    allocator.set_malloc_thresholds()  # as train_network.main does, for the bare loop and the trainer alike
    print(f"torch threads {torch.get_num_threads()}, {args.resolution} px, batch {args.batch}, {args.steps} steps")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            trainer, bare = measure(size, Path(tmp), args)
            rows.append((size, trainer, bare))
    print(f"\n{'model':6} {'trainer s/step':>15} {'bare s/step':>12} {'ratio':>7}  target <= {TARGET}")
    for size, trainer, bare in rows:
        ratio = trainer / bare
        print(f"{size:6} {trainer:15.4f} {bare:12.4f} {ratio:7.3f}  {'met' if ratio <= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
