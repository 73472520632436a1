#!/usr/bin/env python
"""What the LoRA+ diagnostics (library.train.diagnostics) cost against a training step, and how seldom they must
run to stay under 2% of the training time.

    python bench/diagnostics_overhead.py [--steps 30] [--resolution 64] [--batch 2]

1. the tiny SDXL (tools/make_tiny_sdxl.py): bare steps as in bench/step_overhead.py (UNet LoRA dim 8, LoRA+), then
   one diagnostic cycle - the copy of the LoRA on the step before a due step, the norms and the update on the due
   step - on that network, and on a LoRA of the text encoders and the UNet together (more modules, per block);
2. a LoRA shaped like a full SDXL one at dim 4 (synthetic, TE1 + TE2 + UNet, no model needed): the cycle's cost at
   full scale on this machine's device.
Prints each cycle's median time, its share of one bare step, and the smallest interval (steps) that keeps the
diagnostics under 2% of the training time.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

from library.train.diagnostics import LoRADiagnostics  # noqa: E402

TARGET = 0.02


def cycle_seconds(network, repeats: int, by_block: bool = False) -> float:
    """Median time of one diagnostic cycle with every=2: step 1 copies the LoRA, step 2 computes (one host sync)."""
    diagnostics = LoRADiagnostics(network, every=2, by_block=by_block)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        diagnostics.after_step(1)
        values = diagnostics.after_step(2)
        times.append(time.perf_counter() - start)
        assert values is not None and all(isinstance(v, float) for v in values.values())
    return statistics.median(times)


def sdxl_dim4_network(device: str) -> SimpleNamespace:
    """Adapters shaped like a full SDXL LoRA at dim 4 (TE1 72, TE2 192, UNet 722 modules, SDXL's layer widths),
    B random (a trained LoRA), as the `text_encoder_loras` / `unet_loras` lists the diagnostics read."""
    shapes = {
        "lora_te1_": [(768, 768)] * 48 + [(768, 3072), (3072, 768)] * 12,
        "lora_te2_": [(1280, 1280)] * 128 + [(1280, 5120), (5120, 1280)] * 32,
        "lora_unet_": [(640, 640)] * 200
        + [(1280, 1280)] * 400
        + [(640, 5120), (2560, 640)] * 20
        + [(1280, 10240), (5120, 1280)] * 41,
    }
    names = {
        "lora_te1_": "text_model_encoder_layers_0_mlp_fc1",
        "lora_te2_": "text_model_encoder_layers_0_mlp_fc1",
        "lora_unet_": "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    }
    loras: dict[str, list] = {}
    for prefix, widths in shapes.items():
        loras[prefix] = [
            SimpleNamespace(
                lora_name=f"{prefix}{names[prefix]}_{i}",
                scale=0.25,
                lora_down=SimpleNamespace(weight=torch.randn(4, fan_in, device=device)),
                lora_up=SimpleNamespace(weight=torch.randn(fan_out, 4, device=device)),
            )
            for i, (fan_in, fan_out) in enumerate(widths)
        ]
    return SimpleNamespace(text_encoder_loras=loras["lora_te1_"] + loras["lora_te2_"], unet_loras=loras["lora_unet_"])


def interval(cycle: float, step: float) -> int:
    """The smallest number of steps between diagnostics that keeps their cost under TARGET of the steps'."""
    return max(1, math.ceil(cycle / (TARGET * step)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    from bench.step_overhead import bare_steps, prepared_batches, train_argv
    from library.config.build import config_from_args
    from library.config.cli import build_parser
    from networks.lora import create_network
    from tools.make_demo_dataset import make_demo_dataset
    from tools.make_tiny_sdxl import write_tiny_sdxl

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"{device}, torch threads {torch.get_num_threads()}, {args.resolution} px, batch {args.batch}, "
        f"{args.steps} steps"
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_sdxl(Path(tmp) / "model", seed=0).single_file
        data = Path(tmp) / "data"
        make_demo_dataset(
            data, count=8, min_side=args.resolution, max_side=args.resolution, repeats=1, name="bench", seed=0
        )
        argv = train_argv(model, data, Path(tmp) / "out", args.steps, args.resolution, args.batch)
        cfg = config_from_args(build_parser().parse_args([*argv, "--loraplus_lr_ratio", "16"]))
        models, network, batches = prepared_batches(cfg)
        warmup = max(2, args.steps // 10)
        bare = statistics.median(bare_steps(models, network, batches, warmup + args.steps)[warmup:])
        unet_cycle = cycle_seconds(network, 50)
        both = create_network(
            1.0,
            8,
            8,
            None,
            [models.text_encoder1, models.text_encoder2],
            models.unet,
            down_lr_weight="1,1,1,1,1,1,1,1,1",
            mid_lr_weight="1,1,1",
            up_lr_weight="1,1,1,1,1,1,1,1,1",
        ).to(device)
        both_cycle = cycle_seconds(both, 50, by_block=True)
        modules = (len(network.unet_loras), len(both.text_encoder_loras) + len(both.unet_loras))
    full = sdxl_dim4_network(device)
    full_cycle = cycle_seconds(full, 5)
    rows = [
        (f"tiny SDXL, UNet LoRA ({modules[0]} modules)", unet_cycle),
        (f"tiny SDXL, TE + UNet LoRA per block ({modules[1]} modules)", both_cycle),
    ]
    print(f"bare tiny-SDXL step: {bare * 1e3:.2f} ms")
    for name, cycle in rows:
        print(
            f"{name}: cycle {cycle * 1e3:.3f} ms = {cycle / bare:.2%} of a step; under {TARGET:.0%} when run "
            f"every {interval(cycle, bare)} steps or more"
        )
    print(
        f"full SDXL LoRA dim 4 (synthetic, {len(full.text_encoder_loras) + len(full.unet_loras)} modules, "
        f"{device}): cycle {full_cycle * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
