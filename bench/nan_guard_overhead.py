#!/usr/bin/env python
"""What the per-step NaN/inf guard costs: its work (one fused fp32 norm per optimizer group, read back with the
loss in one host sync) timed on its own, against a bare step of the same model.

    python bench/nan_guard_overhead.py [--steps 30] [--resolution 64] [--batch 2]

1. the tiny SDXL (tools/make_tiny_sdxl.py): bare steps as in bench/step_overhead.py (UNet LoRA dim 8, LoRA+ groups),
   then the guard on that network's real gradients, repeated;
2. gradients shaped like a full-size SDXL LoRA at dim 4 (986 modules of SDXL's widths, in 4 LoRA+ groups),
   synthetic, so no full model is needed: the guard's cost at full scale.
Prints medians and the guard's share of the bare step.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from library.files.finite import group_gradient_norms, non_finite_source  # noqa: E402


def guard_seconds(groups: list[dict], repeats: int) -> float:
    """Median time of the guard as the trainer runs it: norms per group + the loss, one `.tolist()`."""
    loss = torch.ones(1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        values = torch.cat([loss, group_gradient_norms(groups).to(loss.device)]).tolist()
        non_finite_source(values[0], values[1:], [str(i) for i in range(len(groups))])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sdxl_dim4_groups(device: str = "cpu") -> list[dict]:
    """Gradients shaped like a full SDXL LoRA at dim 4 (TE1 72, TE2 192, UNet 722 modules; widths of SDXL's
    layers), split into LoRA+ base (lora_down) and plus (lora_up) groups per component."""
    widths = {
        "te1": [(768, 768)] * 48 + [(768, 3072), (3072, 768)] * 12,
        "te2": [(1280, 1280)] * 128 + [(1280, 5120), (5120, 1280)] * 32,
        "unet": [(640, 640)] * 200
        + [(1280, 1280)] * 400
        + [(640, 5120), (2560, 640)] * 20
        + [(1280, 10240), (5120, 1280)] * 41,
    }
    groups = []
    for component in ("te", "unet"):
        shapes = widths["te1"] + widths["te2"] if component == "te" else widths["unet"]
        groups.append({"params": [_with_grad(torch.randn(4, fan_in, device=device)) for fan_in, _ in shapes]})
        groups.append({"params": [_with_grad(torch.randn(fan_out, 4, device=device)) for _, fan_out in shapes]})
    return groups


def _with_grad(grad: torch.Tensor) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.zeros_like(grad))
    param.grad = grad
    return param


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    from bench.step_overhead import bare_steps, prepared_batches, train_argv
    from library.config.build import config_from_args
    from library.config.cli import build_parser
    from tools.make_demo_dataset import make_demo_dataset
    from tools.make_tiny_sdxl import write_tiny_sdxl

    print(f"torch threads {torch.get_num_threads()}, {args.resolution} px, batch {args.batch}, {args.steps} steps")
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
        groups, _ = network.prepare_optimizer_params(None, None, 1e-4)
        bare_steps(models, network, batches, 1)  # leaves no grads (zero_grad): make some
        for group in groups:
            for param in group["params"]:
                param.grad = torch.randn_like(param)
        tiny_guard = guard_seconds(groups, 200)
    full = sdxl_dim4_groups()
    full_guard = guard_seconds(full, 20)
    full_tensors = sum(len(g["params"]) for g in full)
    full_parameters = sum(p.grad.numel() for g in full for p in g["params"])
    tensors = sum(len(g["params"]) for g in groups)
    print(
        f"tiny SDXL: bare step {bare * 1e3:.2f} ms, guard {tiny_guard * 1e3:.3f} ms over {len(groups)} groups / "
        f"{tensors} tensors = {tiny_guard / bare:.2%} of the step"
    )
    print(
        f"full SDXL LoRA dim 4 gradients (synthetic, CPU): guard {full_guard * 1e3:.2f} ms over 4 groups / "
        f"{full_tensors} tensors / {full_parameters / 1e6:.1f}M parameters"
    )


if __name__ == "__main__":
    main()
