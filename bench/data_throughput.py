#!/usr/bin/env python
"""Data-path throughput on the tiny SDXL: uncached images vs cached latents, and the loader's share of step time.

    python bench/data_throughput.py [--count 16] [--side 768] [--resolution 256] [--steps 12] [--workers 0 2]

Writes the tiny model (tools/make_tiny_sdxl.py) and a demo dataset (tools/make_demo_dataset.py) to a temp
folder, then measures, in one run:
1. samples/s of the data path alone (the DataLoader, no model): decode + resize + crop every step vs
   cached latents (read from memory, no decode);
2. for each loader worker count, the share of a training step spent waiting for the next batch
   (wait / (wait + forward + backward + optimizer step)) with a LoRA on the tiny UNet, text encoded per step.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402


def build(tmp: Path, args) -> tuple:
    """(config, models) for the tiny SDXL and a demo dataset of `args.count` images."""
    from library.config.build import config_from_args
    from library.config.cli import build_parser
    from library.model.base_models import prepare_base_models
    from library.model.loading import load_sdxl
    from library.model.precision import PrecisionRequest, plan_precision
    from tools.make_demo_dataset import make_demo_dataset
    from tools.make_tiny_sdxl import write_tiny_sdxl

    model = write_tiny_sdxl(tmp / "model", seed=0).single_file
    make_demo_dataset(
        tmp / "data", count=args.count, min_side=args.side // 2, max_side=args.side, repeats=1, name="toy", seed=0
    )
    argv = [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(tmp / "data"),
        "--output_dir",
        str(tmp / "out"),
        "--resolution",
        str(args.resolution),
        "--enable_bucket",
        "--min_bucket_reso",
        "64",
        "--max_bucket_reso",
        str(args.resolution * 2),
        "--caption_extension",
        ".txt",
        "--train_batch_size",
        str(args.batch_size),
        "--seed",
        "0",
        "--network_train_unet_only",
        "--network_dim",
        "4",
    ]
    cfg = config_from_args(build_parser().parse_args(argv))
    models = load_sdxl(model, dtype=torch.float32)
    prepare_base_models(models, plan_precision(PrecisionRequest(), "cpu"), cfg.precision, False, torch.device("cpu"))
    return cfg, models


def make_dataset(cfg, models, cached: bool):
    from library.data.dataset import TrainDataset, scan_train_data_dir
    from library.data.latent_cache import cache_latents
    from library.model.base_models import vae_encoder

    dataset = TrainDataset(scan_train_data_dir(cfg.data), cfg.data)
    seconds = 0.0
    if cached:
        start = time.perf_counter()
        cache_latents(
            dataset, vae_encoder(models.vae, torch.device("cpu")), to_disk=False, batch_size=4, show_progress=False
        )
        seconds = time.perf_counter() - start
    return dataset, seconds


def loader_for(dataset, cfg, workers: int):
    from library.train.setup_parts import make_loader

    loop = SimpleNamespace(
        batch_size=cfg.loop.batch_size,
        seed=0,
        max_data_loader_n_workers=workers,
        persistent_data_loader_workers=workers > 0,
    )
    return make_loader(dataset, loop, SimpleNamespace(num_processes=1, process_index=0))


def data_only_rate(dataset, cfg, epochs: int, workers: int) -> float:
    """Samples per second through the DataLoader, no model; epoch 0 (worker start-up) is not timed."""
    loader, sampler = loader_for(dataset, cfg, workers)
    for _ in loader:
        pass
    samples, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        for batch in loader:
            samples += len(batch["captions"])
    return samples / (time.perf_counter() - start)


def step_shares(dataset, cfg, models, workers: int, steps: int) -> tuple[float, float]:
    """(share of step time spent waiting for the batch, seconds per step) over `steps` LoRA steps."""
    from accelerate import Accelerator

    from library.model.base_models import vae_encoder
    from library.model.precision import PrecisionRequest, plan_precision
    from library.train.loss import LossOptions, make_noise_scheduler
    from library.train.parts import LossParts
    from library.train.setup_parts import create_lora_network
    from library.train.step import batch_loss

    accelerator = Accelerator(mixed_precision="no", cpu=True)
    plan = plan_precision(PrecisionRequest(), "cpu")
    network = create_lora_network(cfg.network, models)
    optimizer = torch.optim.AdamW(network.get_trainable_params(), lr=1e-4)
    encode = None if dataset.all_latents_cached else vae_encoder(models.vae, torch.device("cpu"))
    scheduler = make_noise_scheduler()
    loader, sampler = loader_for(dataset, cfg, workers)
    loss_parts = LossParts(models, encode, scheduler, plan, accelerator, max_token_length=75, options=LossOptions())
    wait = total = 0.0
    done, epoch = 0, 0
    try:
        while done < steps + 1:
            epoch += 1
            sampler.set_epoch(epoch)
            iterator = iter(loader)
            while done < steps + 1:
                t0 = time.perf_counter()
                batch = next(iterator, None)
                if batch is None:
                    break
                t1 = time.perf_counter()
                loss = batch_loss(batch, loss_parts)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                t2 = time.perf_counter()
                if done > 0:  # the first step pays for worker start-up; leave it out
                    wait, total = wait + (t1 - t0), total + (t2 - t0)
                done += 1
    finally:
        network.remove_from_model() if hasattr(network, "remove_from_model") else None
    return wait / total, total / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=16, help="images in the demo dataset")
    parser.add_argument("--side", type=int, default=768, help="longest side of the demo images (pixels)")
    parser.add_argument("--resolution", type=int, default=256, help="training resolution")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the data-only measurement")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per configuration")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, models = build(Path(tmp), args)
        rows = []
        rates = {}
        for cached in (False, True):
            dataset, cache_s = make_dataset(cfg, models, cached)
            # Warm-up: one untimed epoch, so every bucket's shapes have met the CPU kernels once.
            step_shares(dataset, cfg, models, 0, len(loader_for(dataset, cfg, 0)[1]) + 1)
            name = "cached latents" if cached else "uncached (decode+resize)"
            for workers in args.workers:
                rates[cached, workers] = data_only_rate(dataset, cfg, args.epochs, workers)
                share, step_s = step_shares(dataset, cfg, models, workers, args.steps)
                rows.append((name, workers, rates[cached, workers], share, step_s, cache_s))
    print(
        f"tiny SDXL, {args.count} images up to {args.side}px, resolution {args.resolution}, batch {args.batch_size},"
        f" torch threads {torch.get_num_threads()}"
    )
    print(f"{'data path':<26}{'workers':>8}{'data samples/s':>16}{'loader wait':>13}{'s/step':>9}")
    for name, workers, rate, share, step_s, _ in rows:
        print(f"{name:<26}{workers:>8}{rate:>16.1f}{share:>12.1%}{step_s:>9.3f}")
    for workers in args.workers:
        ratio = rates[True, workers] / rates[False, workers]
        print(f"cached / uncached data samples/s, {workers} workers: {ratio:.1f}x")
    print(f"one-off latent caching: {rows[-1][5]:.2f} s")
    by = {(r[0], r[1]): r for r in rows}
    for name in dict.fromkeys(r[0] for r in rows):
        if len(args.workers) >= 2:
            a, b = by[(name, args.workers[0])], by[(name, args.workers[-1])]
            print(
                f"{name}: step time {args.workers[-1]} vs {args.workers[0]} workers: {b[4] / a[4]:.2f}x,"
                f" loader wait {a[3]:.1%} -> {b[3]:.1%}"
            )


if __name__ == "__main__":
    main()
