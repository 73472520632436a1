"""Synthetic training runs for the report and comparison tests: the files a run writes (report JSON with its
history, sample images named as the trainer names them), made in milliseconds without training.

Curves follow what LoRA+ does: with ratio r the loss falls faster (time constant shrinks with r up to a point,
then the run gets noisy), B's norm grows about r times faster, and the plus groups' lr sits at r x the base lr."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from library.report.history import history_section
from library.train.sampling import sample_file_name

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]


def make_run(
    output_dir: Path,
    output_name: str = "run",
    *,
    ratio: float = 1.0,
    steps: int = 60,
    lr: float = 1e-4,
    validate_every: int | None = 10,
    sample_every: int | None = 20,
    diagnostics_every: int | None = 10,
    report: bool = True,
    history: bool = True,
    seed: int = 0,
) -> Path:
    """Write run `output_name` into `output_dir`; returns the folder."""
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    speed = min(ratio, 16.0) ** 0.5
    noise = 0.002 * max(1.0, ratio / 16.0)
    losses = [0.05 + 0.1 * math.exp(-speed * s / steps * 3) + rng.gauss(0, noise) for s in range(1, steps + 1)]
    if steps > 7:
        losses[7] = math.nan  # a skipped non-finite step: a gap, never a crash
    groups = {"textencoder": lr, "unet": lr}
    if ratio != 1.0:
        groups.update({"textencoder plus": lr * ratio, "unet plus": lr * ratio})
    warmup = max(1, steps // 10)
    lrs = {g: [base * min(1.0, s / warmup) for s in range(1, steps + 1)] for g, base in groups.items()}
    validation = (
        [(s, 0.06 + 0.1 * math.exp(-speed * s / steps * 3)) for s in range(validate_every, steps + 1, validate_every)]
        if validate_every
        else []
    )
    diagnostics = []
    for s in range(diagnostics_every or steps + 1, steps + 1, diagnostics_every or steps + 1):
        values = {}
        for component, scale in (("te1", 0.5), ("te2", 0.7), ("unet", 1.0)):
            norm_b = 1e-3 * ratio * s * scale
            values.update(
                {
                    f"lora/{component}/norm_A": 4.0 * scale + 1e-3 * s,
                    f"lora/{component}/norm_B": norm_b,
                    f"lora/{component}/delta": 0.25 * norm_b * scale,
                    f"lora/{component}/update_A": 1e-4,
                    f"lora/{component}/update_B": 1.0 / s,
                }
            )
        diagnostics.append((s, values))
    settings = {
        "learning_rate": lr,
        "unet_lr": lr,
        "text_encoder_lr": lr,
        "loraplus_unet_lr_ratio": ratio,
        "loraplus_text_encoder_lr_ratio": ratio,
        "network_dim": 4,
        "optimizer_type": "AdamW",
        "max_train_steps": steps,
        "seed": 42,
        "num_train_images": 8,
        "precision/compute": "float32",
    }
    param_groups = [
        {
            "description": g,
            "component": g.split()[0],
            "plus": g.endswith("plus"),
            "lr": base,
            "tensors": 24,
            "parameters": 6144,
            "block": None,
            "weight_decay": 0.01,
        }
        for g, base in groups.items()
    ]
    if report:
        content = {
            "step_time_s": {
                "median": 0.05,
                "mean": 0.051,
                "min": 0.04,
                "max": 0.09,
                "measured_steps": steps,
                "excludes": "saving, sampling and validation; includes data loading",
            },
            "samples_per_step": 2,
            "samples_per_s": 40.0,
            "peak_memory": {
                "rss_bytes": 3 * 2**30,
                "rss_gib": 3.0,
                "ram_limit_bytes": 16 * 2**30,
                "cuda_allocated_bytes": None,
                "cuda_total_bytes": None,
            },
            "precision": {"compute": "float32", "lora": "float32"},
            "attention": "sdpa",
            "steps": steps,
            "epochs": 3,
            "warnings": [],
        }
        if history:
            content.update(
                history_section(
                    first_step=0,
                    losses=losses,
                    lrs=lrs,
                    validation=validation,
                    diagnostics=diagnostics,
                    settings=settings,
                    param_groups=param_groups,
                    sample_prompts=PROMPTS,
                )
            )
        (output_dir / f"{output_name}_report.json").write_text(json.dumps(content, indent=2))
    if sample_every:
        (output_dir / "sample").mkdir(exist_ok=True)
        for step in [0, *range(sample_every, steps + 1, sample_every)]:
            for index in range(len(PROMPTS)):
                name = sample_file_name(
                    output_name,
                    step=step,
                    epoch=0 if step == 0 else None,
                    index=index,
                    seed=42 + index,
                    timestamp="20250101120000",
                )
                sample_image(ratio, step, index).save(output_dir / "sample" / name)
    return output_dir


def sample_image(ratio: float, step: int, prompt: int, size: int = 64) -> Image.Image:
    """A picture that changes with the step and the prompt (a disc that grows, a colour per prompt)."""
    image = Image.new("RGB", (size, size), (240, 240, 235))
    draw = ImageDraw.Draw(image)
    radius = 4 + (step * min(ratio, 16) ** 0.5) % (size // 2 - 4)
    colour = [(200, 60, 40), (40, 90, 200), (40, 160, 80)][prompt % 3]
    draw.ellipse([size / 2 - radius, size / 2 - radius, size / 2 + radius, size / 2 + radius], fill=colour)
    draw.rectangle([0, size - 6, size * step / 60, size - 1], fill=(30, 30, 30))
    return image
