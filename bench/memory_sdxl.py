#!/usr/bin/env python
"""Peak memory (in all and per phase: load, cache, set-up, train) and s/step of a full-size SDXL LoRA run, per
precision mode, loading included.

    python bench/memory_sdxl.py [--model sdxl.safetensors] [--work DIR] [--steps 4] [--modes fp32 fp16 fp8]
    python bench/memory_sdxl.py --steps 8 --modes fp32 fp8   # issue 15's measurement (LoRA+ ratio 16 by default)
    python bench/memory_sdxl.py --gpu      # on a CUDA machine: SDXL at 1024^2, dim 4, fp8, checkpointing
    python bench/memory_sdxl.py --modes fp8 --glibc-default-malloc   # "before" for library/train/allocator.py

Without --model it writes a random full-size SDXL (tools/make_tiny_sdxl.py --full, 6.9 GB fp16) under --work
once and reuses it. Each mode is a separate `train_network.py` process (peak RSS cannot be reset), training a
UNet-only LoRA (dim 8, `--loraplus_lr_ratio 16`) at 64 px, batch 1, with cached latents and text-encoder outputs and
gradient checkpointing; the numbers come from the run's own `<name>_report.json` (peak RSS of the process, loading
included, and of each phase; peak CUDA memory on a GPU; median step time) plus the wall time of the whole process.

Per phase: the report's `memory_phases` (the trainer resets the kernel's peak at each phase on Linux; a staged load
has several load and cache phases, the table shows the highest of each kind). A report without them (a trainer from
before issue 15, for a before/after table) gets phase peaks sampled by this script instead: the process's RSS read
every 50 ms, each sample counted in the phase its output last announced (caching latents / text-encoder outputs,
the parameter-group table, the step bar); these are marked `~` (a sample can miss a short spike).

Modes (CPU peak RSS targets from issues 5 and 15; with staged loading the UNet's stage sets the peak):
- fp32: --mixed_precision no, everything fp32 (target <= 10.5 GiB: the UNet, 9.6 GiB, plus a small margin);
- fp16: --mixed_precision fp16 on a CPU: Linear/Conv weights stored in fp16, computed in fp32 (target <= 11 GiB);
- fp8:  --fp8_base: Linear/Conv weights of UNet and text encoders in float8_e4m3fn, fp32 compute (target <= 3.5 GiB).

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
import threading  # noqa: E402
import time  # noqa: E402

GIB = 2**30
MODES = {
    "fp32": ([], 10.5),
    "fp16": (["--mixed_precision", "fp16"], 11.0),
    "fp8": (["--fp8_base"], 3.5),
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


PHASES = ("load", "cache", "set-up", "train")
PHASE_MARKERS = (
    ("caching latents", "cache"),
    ("caching text encoder outputs", "cache"),
    ("component  block  group", "set-up"),
    ("steps:", "train"),
)
"""What a trainer prints when it enters a phase (for runs whose report has no `memory_phases`)."""


class RssSampler:
    """The RSS of a running process every `interval` s, counted in the phase its output last announced."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.phase = "load"
        self.peaks: dict[str, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def seen(self, line: str) -> None:
        for marker, phase in PHASE_MARKERS:
            if marker in line and PHASES.index(phase) >= PHASES.index(self.phase):
                self.phase = phase

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                with open(f"/proc/{self.pid}/status", encoding="ascii", errors="replace") as status:
                    rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
            except (OSError, StopIteration, ValueError):
                continue
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)

    def stop(self) -> dict[str, int]:
        self._done.set()
        self._thread.join()
        return self.peaks


def run_mode(
    model: Path,
    data: Path,
    out: Path,
    flags: list[str],
    steps: int,
    resolution: int,
    glibc_default: bool = False,
    loraplus_lr_ratio: float = 16.0,
) -> dict:
    """One training process; its report plus the process's wall time, CPU seconds and peak RSS per phase."""
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
        "--loraplus_lr_ratio",
        f"{loraplus_lr_ratio:g}",
        "--max_data_loader_n_workers",
        "0",
        "--seed",
        "0",
        *flags,
    ]
    started, cpu_before = time.perf_counter(), children_cpu_seconds()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = RssSampler(proc.pid)
    output = []
    for line in proc.stdout:  # text mode: tqdm's carriage returns end lines too
        sampler.seen(line)
        output.append(line)
    proc.wait()
    sampled = sampler.stop()
    wall, cpu_after = time.perf_counter() - started, children_cpu_seconds()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(flags) or 'fp32'} failed:\n{''.join(output)[-3000:]}")
    report = json.loads((out / "bench_report.json").read_text())
    report["wall_seconds"] = wall
    report["cpu_user_seconds"] = cpu_after[0] - cpu_before[0]
    report["cpu_system_seconds"] = cpu_after[1] - cpu_before[1]
    report["phase_peaks"] = phase_peaks(report, sampled)
    return report


def phase_peaks(report: dict, sampled: dict[str, int]) -> dict[str, tuple[int, bool]]:
    """Per phase kind: (peak RSS bytes, exact) - the report's own (exact), else the sampled one (the start of the
    run counts as loading)."""
    phases = report.get("memory_phases")
    if isinstance(phases, dict) and phases.get("method", "").startswith("per phase"):
        by_kind = dict(phases["peak_rss_bytes"])
        by_kind["load"] = max(by_kind.get("load", 0), by_kind.pop("start", 0))
        return {kind: (peak, True) for kind, peak in by_kind.items()}
    return {kind: (peak, False) for kind, peak in sampled.items()}


def phase_text(peaks: dict[str, tuple[int, bool]], kind: str) -> str:
    if kind not in peaks:
        return "-"
    peak, exact = peaks[kind]
    return f"{'' if exact else '~'}{peak / GIB:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="an SDXL single file (default: a random full one)")
    parser.add_argument("--work", type=Path, default=REPO / "bench_out" / "memory_sdxl")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--gpu", action="store_true", help="the GPU preset (1024 px, dim 4, fp8, bf16)")
    parser.add_argument("--loraplus-lr-ratio", type=float, default=16.0, help="LoRA+ ratio of the runs (issue 15: 16)")
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
        f"UNet-only LoRA, LoRA+ ratio {args.loraplus_lr_ratio:g}, cached latents and text-encoder outputs, "
        "gradient checkpointing, "
        f"malloc: {'glibc default (dynamic)' if args.glibc_default_malloc else 'fixed (library/train/allocator.py)'}"
    )
    header = (
        f"{'mode':8} {'peak RSS GiB':>12} {'load':>6} {'cache':>6} {'set-up':>6} {'train':>6} {'peak CUDA GiB':>13} "
        f"{'s/step':>8} {'load s':>7} {'wall s':>7} {'CPU user s':>10} {'CPU sys s':>9}  target"
    )
    print(header)
    rows = {}
    for name, (flags, target) in runs.items():
        report = run_mode(
            model,
            data,
            args.work / f"out_{name}",
            flags,
            args.steps,
            resolution,
            args.glibc_default_malloc,
            args.loraplus_lr_ratio,
        )
        rows[name] = report
        memory = report["peak_memory"]
        rss = memory["rss_bytes"] / GIB
        cuda = memory["cuda_allocated_bytes"]
        measured = cuda / GIB if args.gpu and cuda is not None else rss
        verdict = "-" if target is None else f"<= {target:g} GiB: {'met' if measured <= target else 'MISSED'}"
        cuda_text = "-" if cuda is None else f"{cuda / GIB:.2f}"
        phases = " ".join(f"{phase_text(report['phase_peaks'], kind):>6}" for kind in PHASES)
        print(
            f"{name:8} {rss:12.2f} {phases} {cuda_text:>13} {report['step_time_s']['median']:8.2f} "
            f"{report['load_seconds']:7.1f} {report['wall_seconds']:7.1f} {report['cpu_user_seconds']:10.1f} "
            f"{report['cpu_system_seconds']:9.1f}  {verdict}",
            flush=True,
        )
    print("per-phase columns: peak RSS GiB of each phase (the start counts as load); ~: sampled every 50 ms")
    if "fp32" in rows:
        for name in rows:
            if name != "fp32":
                ratio = rows[name]["peak_memory"]["rss_bytes"] / rows["fp32"]["peak_memory"]["rss_bytes"]
                print(f"peak RSS {name} / fp32: {ratio:.2f}")


if __name__ == "__main__":
    main()
