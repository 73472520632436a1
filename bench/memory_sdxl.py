#!/usr/bin/env python
"""Peak memory and s/step of a full-size SDXL LoRA run, per precision mode, loading included.

    python bench/memory_sdxl.py [--model sdxl.safetensors] [--work DIR] [--steps 4] [--modes fp32 fp16 fp8]
    python bench/memory_sdxl.py --gpu      # on a CUDA machine: SDXL at 1024^2, dim 4, fp8, checkpointing
    python bench/memory_sdxl.py --modes fp8 --glibc-default-malloc   # "before" for library/train/allocator.py

Without --model it writes a random full-size SDXL (tools/make_tiny_sdxl.py --full, 6.9 GB fp16) under --work
once and reuses it. Each mode is a separate `train_network.py` process (peak RSS cannot be reset), training a
UNet-only LoRA (dim 8) at 64 px, batch 1, with cached latents and text-encoder outputs and gradient checkpointing;
the numbers come from the run's own `<name>_report.json` (peak RSS of the process, loading included; peak CUDA
memory on a GPU; median step time) plus the wall time of the whole process.

Modes (CPU targets from issue 5):
- fp32: --mixed_precision no, everything fp32 (reference);
- fp16: --mixed_precision fp16 on a CPU: Linear/Conv weights stored in fp16, computed in fp32 (target <= 11 GB);
- fp8:  --fp8_base: Linear/Conv weights of UNet and text encoders in float8_e4m3fn, fp32 compute (target <= 6 GB).

`--glibc-default-malloc` runs the trainer without its fixed malloc thresholds (library/train/allocator.py), i.e. with
glibc's dynamic mmap threshold, for a before/after comparison. The CPU columns are the process's user and system
CPU seconds (system time grows with page faults; both are steadier than wall time on a shared machine).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

GIB = 2**30
MODES = {
    "fp32": ([], None),
    "fp16": (["--mixed_precision", "fp16"], 11.0),
    "fp8": (["--fp8_base"], 6.0),
}
GPU_FLAGS = [
    "--resolution",
    "1024",
    "--network_dim",
    "4",
    "--network_alpha",
    "1",
    "--fp8_base",
    "--mixed_precision",
    "bf16",
    "--gradient_checkpointing",
    "--cache_latents",
    "--cache_text_encoder_outputs",
    "--network_train_unet_only",
    "--optimizer_type",
    "AdamW8bit",
    "--sdpa",
]
GPU_TARGET_GIB = 5.0


def ensure_model(work: Path) -> Path:
    from tools.make_tiny_sdxl import FULL_SINGLE_FILE, write_full_sdxl

    path = work / FULL_SINGLE_FILE
    if not path.is_file():
        print(f"writing a random full-size SDXL to {path} (once) ...", flush=True)
        write_full_sdxl(work)
    return path


def ensure_data(work: Path, side: int) -> Path:
    from tools.make_demo_dataset import make_demo_dataset

    data = work / f"data_{side}"
    if not data.is_dir():
        make_demo_dataset(data, count=2, min_side=side, max_side=side, repeats=1, name="bench", seed=0)
    return data


def children_cpu_seconds() -> tuple[float, float]:
    """User and system CPU seconds of this process's finished children (NaN where `resource` is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return float("nan"), float("nan")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


# train_network.main with library.train.allocator's set-up replaced by a no-op (glibc's default, dynamic thresholds).
GLIBC_DEFAULT_RUNNER = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import library.train.allocator
library.train.allocator.set_malloc_thresholds = lambda *args, **kwargs: False
import train_network
sys.exit(train_network.main(sys.argv[1:]))
"""


def run_mode(
    model: Path, data: Path, out: Path, flags: list[str], steps: int, resolution: int, glibc_default: bool = False
) -> dict:
    """One training process; its report plus the process's wall time and CPU seconds."""
    program = ["-c", GLIBC_DEFAULT_RUNNER] if glibc_default else [str(REPO / "train_network.py")]
    argv = [
        sys.executable,
        *program,
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
        "1",
        "--max_train_steps",
        str(steps),
        "--network_dim",
        "8",
        "--network_alpha",
        "8",
        "--network_train_unet_only",
        "--cache_latents",
        "--cache_text_encoder_outputs",
        "--gradient_checkpointing",
        "--optimizer_type",
        "AdamW",
        "--learning_rate",
        "1e-4",
        "--max_data_loader_n_workers",
        "0",
        "--seed",
        "0",
        *flags,
    ]
    started, cpu_before = time.perf_counter(), children_cpu_seconds()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall, cpu_after = time.perf_counter() - started, children_cpu_seconds()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(flags) or 'fp32'} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "bench_report.json").read_text())
    report["wall_seconds"] = wall
    report["cpu_user_seconds"] = cpu_after[0] - cpu_before[0]
    report["cpu_system_seconds"] = cpu_after[1] - cpu_before[1]
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="an SDXL single file (default: a random full one)")
    parser.add_argument("--work", type=Path, default=REPO / "bench_out" / "memory_sdxl")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--gpu", action="store_true", help="the GPU preset (1024 px, dim 4, fp8, bf16)")
    parser.add_argument(
        "--glibc-default-malloc",
        action="store_true",
        help="run the trainer without its fixed malloc thresholds (for a before/after comparison)",
    )
    args = parser.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or ensure_model(args.work)
    runs = {"gpu-fp8": (GPU_FLAGS, GPU_TARGET_GIB)} if args.gpu else {m: MODES[m] for m in args.modes}
    resolution = 1024 if args.gpu else 64
    data = ensure_data(args.work, resolution)
    print(
        f"model {model} ({model.stat().st_size / GIB:.2f} GiB), {resolution} px, batch 1, {args.steps} steps, "
        f"UNet-only LoRA, cached latents and text-encoder outputs, gradient checkpointing, "
        f"malloc: {'glibc default (dynamic)' if args.glibc_default_malloc else 'fixed (library/train/allocator.py)'}"
    )
    header = (
        f"{'mode':8} {'peak RSS GiB':>12} {'peak CUDA GiB':>13} {'s/step':>8} {'load s':>7} {'wall s':>7} "
        f"{'CPU user s':>10} {'CPU sys s':>9}  target"
    )
    print(header)
    rows = {}
    for name, (flags, target) in runs.items():
        report = run_mode(
            model, data, args.work / f"out_{name}", flags, args.steps, resolution, args.glibc_default_malloc
        )
        rows[name] = report
        memory = report["peak_memory"]
        rss = memory["rss_bytes"] / GIB
        cuda = memory["cuda_allocated_bytes"]
        measured = cuda / GIB if args.gpu and cuda is not None else rss
        verdict = "-" if target is None else f"<= {target:.0f} GiB: {'met' if measured <= target else 'MISSED'}"
        cuda_text = "-" if cuda is None else f"{cuda / GIB:.2f}"
        print(
            f"{name:8} {rss:12.2f} {cuda_text:>13} {report['step_time_s']['median']:8.2f} "
            f"{report['load_seconds']:7.1f} {report['wall_seconds']:7.1f} {report['cpu_user_seconds']:10.1f} "
            f"{report['cpu_system_seconds']:9.1f}  {verdict}",
            flush=True,
        )
    if "fp32" in rows:
        for name in rows:
            if name != "fp32":
                ratio = rows[name]["peak_memory"]["rss_bytes"] / rows["fp32"]["peak_memory"]["rss_bytes"]
                print(f"peak RSS {name} / fp32: {ratio:.2f}")


if __name__ == "__main__":
    main()
