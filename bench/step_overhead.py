#!/usr/bin/env python
"""Step cost, side by side in one run: the trainer against a bare PyTorch step, compiled against uncompiled, and
fp8 storage (old and new up-cast) against fp32.

    python bench/step_overhead.py [--sizes tiny mid] [--steps 30] [--resolution 64] [--batch 2]
                                  [--sections overhead compile fp8 upcast] [--backend inductor]
    flock /tmp/heavy.lock python bench/step_overhead.py --sections fp8 --sizes full --steps 5   # ~14 GB of RAM

Sections (each for each model size: the tiny SDXL of tools/make_tiny_sdxl.py and its mid-size variant; the
fp8 section also for `full`, a random full-size SDXL UNet built in memory, fp32 and fp8 copies side by side):
- overhead: the same LoRA network (UNet-only, dim 8, AdamW) on the same batches (cached latents and text-encoder
  outputs from the trainer's own data path), stepped by a plain loop (noise, UNet forward, MSE, backward, clip,
  optimizer step), then `library.train.trainer.train` with the same flags (its median from its own report), then
  the plain loop again; prints trainer / bare (target <= 1.05);
- compile: the plain loop eager and through `library.model.compiled.CompiledModel` (--torch_compile's wrapper,
  backend --backend), steps interleaved A/B after the compiled warm-up, whose time (the compile) is reported apart;
- fp8: the plain loop on fp32 weights, on fp8 weights up-cast by table in chunks (now) and by `.to` (before),
  steps interleaved; prints each median and its ratio to fp32 (issue 15's target: fp8 <= 1.5x fp32 on full size);
- upcast: M elements/s of the fp8 -> fp32/bf16/fp16 up-cast of a 1280x5120 weight: `.to`, the pair table, and
  the table chunk by chunk into a reused buffer.
Medians throughout: other processes on the machine make single steps noisy.
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
from functools import partial  # noqa: E402

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


def tiny_or_mid(size: str, tmp: Path, args) -> tuple[list[str], object, object, list[dict]]:
    """(trainer argv, models, network, batches) of the tiny or mid model, written under `tmp`."""
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
    return argv, models, network, batches


def measure_overhead(argv: list[str], models, network, batches: list[dict], steps: int) -> tuple[float, float]:
    """(trainer median, bare median): bare before and after the trainer, so drift shows up."""
    warmup = max(2, steps // 10)
    bare = bare_steps(models, network, batches, warmup + steps)[warmup:]
    trainer = trainer_median(argv)
    bare += bare_steps(models, network, batches, warmup + steps)[warmup:]
    return trainer, statistics.median(bare)


class BareLoop:
    """The plain training step of one UNet (called as given: eager or compiled) and its LoRA, one batch at a time."""

    def __init__(self, unet, network, batches: list[dict]):
        from library.train.loss import make_noise_scheduler

        self.unet, self.network, self.batches, self.scheduler = unet, network, batches, make_noise_scheduler()
        self.params = network.get_trainable_params()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.count = 0

    def step(self) -> tuple[float, float]:
        """One step on the next batch; its wall time and CPU time (of this process: on a shared machine the CPU
        time is the steadier of the two, most of all with one thread)."""
        from library.model.text_encoding import time_ids
        from library.train.loss import SDXL_VAE_SCALE

        start, cpu_start = time.perf_counter(), time.process_time()
        batch = self.batches[self.count % len(self.batches)]
        self.count += 1
        latents = batch["latents"] * SDXL_VAE_SCALE
        added = {
            "text_embeds": batch["text_pooled"],
            "time_ids": time_ids(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]),
        }
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],))
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, batch["text_context"], added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # the trainer reads the loss every step too
        return time.perf_counter() - start, time.process_time() - cpu_start


def interleaved(variants: dict, steps: int, warmup: int = 1, before_step=None) -> dict[str, float]:
    """Median wall and CPU seconds per step of each variant (name -> BareLoop; keys "NAME" and "NAME cpu"), steps
    taken in turn A, B, C, A, B, C, ... after `warmup` rounds, so the machine's drift hits every variant alike;
    `before_step(name)` runs untimed before each step."""
    times: dict[str, list[float]] = {key: [] for name in variants for key in (name, f"{name} cpu")}
    for round_ in range(warmup + steps):
        for name, loop in variants.items():
            if before_step is not None:
                before_step(name)
            wall, cpu = loop.step()
            if round_ >= warmup:
                times[name].append(wall)
                times[f"{name} cpu"].append(cpu)
            print(f"  {name}: {wall:.3f} s ({cpu:.3f} s CPU)", flush=True)
    return {key: statistics.median(values) for key, values in times.items()}


def lora(unet):
    """A UNet-only LoRA (dim 8) attached to `unet`."""
    from networks.lora import create_network

    network = create_network(1.0, 8, 8.0, None, [], unet)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    return network


def measure_compile(models, batches: list[dict], steps: int, backend: str) -> dict[str, float]:
    """Eager and compiled steps of the same UNet and LoRA: compile (first compiled step minus the compiled
    median) and both medians, interleaved."""
    from library.model.compiled import CompiledModel, CompileState

    network = lora(models.unet)
    state = CompileState(backend, lambda line: print(f"warning: {line}", flush=True))
    eager = BareLoop(models.unet, network, batches)
    compiled = BareLoop(CompiledModel(models.unet, backend, state), network, batches)
    eager.step()
    first = compiled.step()[0] + compiled.step()[0]  # the second batch may differ in shape: a recompile
    medians = interleaved({"eager": eager, "compiled": compiled}, steps)
    network.remove_from_model()
    return {
        **medians,
        "compile_s": first - 2 * medians["compiled"],
        "ran": state.summary()["ran"],
    }


def fp8_copy(unet):
    """A deep copy of `unet` whose Linear/Conv weights are stored in fp8 (fp32 compute)."""
    import copy

    from library.model.fp8 import store_weights_in_fp8

    unet8 = copy.deepcopy(unet)
    store_weights_in_fp8(unet8, torch.float32)
    return unet8


def set_upcast(unet, mode: str) -> None:
    """Switch every fp8 layer of `unet` between the table ("table", now) and `.to` ("cast", before)."""
    for module in unet.modules():
        if hasattr(module, "fp8_upcast"):
            module.fp8_upcast = mode


def measure_fp8(unet32, unet8, batches: list[dict], steps: int) -> dict[str, float]:
    """fp32, fp8 by table and fp8 by `.to`, interleaved, each with a UNet-only LoRA (removed again afterwards)."""
    shared = lora(unet8)  # the two fp8 variants are one model (and LoRA) switched between up-casts
    loops = {
        "fp32": BareLoop(unet32, lora(unet32), batches),
        "fp8 table": BareLoop(unet8, shared, batches),
        "fp8 cast": BareLoop(unet8, shared, batches),
    }

    def before(name: str) -> None:
        if name != "fp32":
            set_upcast(unet8, name.split()[1])

    medians = interleaved(loops, steps, before_step=before)
    for loop in loops.values():
        loop.network.remove_from_model()  # the next section attaches its own
    return medians


def full_unet_batches(resolution: int, batch: int) -> list[dict]:
    """Random inputs of a full-size SDXL UNet at `resolution` px (as the cache would give them)."""
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    sizes = torch.tensor([[resolution, resolution]] * batch)
    return [
        {
            "latents": torch.randn(batch, 4, side, side, generator=g),
            "text_context": torch.randn(batch, 77, 2048, generator=g),
            "text_pooled": torch.randn(batch, 1280, generator=g),
            "original_sizes_hw": sizes,
            "crop_top_lefts": torch.zeros(batch, 2, dtype=torch.long),
            "target_sizes_hw": sizes,
        }
        for _ in range(2)
    ]


def full_unets() -> tuple[object, object]:
    """A random full-size SDXL UNet (configs/sdxl) in fp32 and an fp8 copy built beside it layer by layer (the
    copy costs the fp8 size, not another fp32 model): about 13 GB together."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch import nn

    from library.model.fp8 import FP8_DTYPE, store_weights_in_fp8

    config = UNet2DConditionModel.load_config(REPO / "configs" / "sdxl", subfolder="unet")
    with torch.device("meta"):
        unet32, unet8 = UNet2DConditionModel.from_config(config), UNet2DConditionModel.from_config(config)
    unet32.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet32.named_parameters():
            if param.dim() > 1:
                param.normal_(0, 0.02, generator=g)
            else:
                param.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    for (_, module32), (_, module8) in zip(unet32.named_modules(), unet8.named_modules()):
        for name, param in module32.named_parameters(recurse=False):
            value = param.detach()
            fp8 = type(module32) in (nn.Linear, nn.Conv2d) and name == "weight"
            setattr(module8, name, nn.Parameter(value.to(FP8_DTYPE) if fp8 else value.clone(), requires_grad=False))
    for name, buffer in unet32.named_buffers():
        unet8.get_buffer(name).data = buffer.clone()
    store_weights_in_fp8(unet8, torch.float32)
    for unet in (unet32, unet8):
        unet.requires_grad_(False)
        unet.set_attn_processor(AttnProcessor2_0())
    return unet32, unet8


def rate(count: int, fn) -> float:
    """M elements/s of `fn` over `count` elements: median of 7 calls after one warm-up."""
    fn()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return count / statistics.median(times) / 1e6


def upcast_chunked(weight: torch.Tensor, dtype: torch.dtype, buffers) -> None:
    """Every chunk of `weight` up-cast in turn into `buffers`, as an fp8 layer does."""
    from library.model.fp8 import upcast_rows

    for _ in upcast_rows(weight, dtype, buffers):
        pass


def measure_upcast() -> list[tuple[str, float, float, float]]:
    """(target dtype, `.to`, table, table chunked) in M elements/s over a 1280x5120 fp8 weight."""
    from library.model.fp8 import FP8_DTYPE, UpcastBuffers, upcast

    weight = (torch.randn(1280, 5120) * 0.02).to(FP8_DTYPE)
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ways = (
            partial(weight.to, dtype),
            partial(upcast, weight, dtype),
            partial(upcast_chunked, weight, dtype, UpcastBuffers()),
        )
        rows.append((str(dtype).removeprefix("torch."), *(rate(weight.numel(), way) for way in ways)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid", "full"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--sections", nargs="+", default=["overhead", "compile", "fp8", "upcast"], choices=SECTIONS, metavar="SECTION"
    )
    parser.add_argument("--backend", default="inductor", help="dynamo backend of the compile section")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator.set_malloc_thresholds()  # as train_network.main does, for the bare loop and the trainer alike
    print(f"torch threads {torch.get_num_threads()}, {args.resolution} px, batch {args.batch}, {args.steps} steps")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:  # each table is printed as soon as it is measured
            if size == "full":
                if "fp8" in args.sections:
                    unet32, unet8 = full_unets()
                    report_fp8([(size, measure_fp8(unet32, unet8, full_unet_batches(args.resolution, 1), args.steps))])
                    del unet32, unet8
                continue
            argv_, models, network, batches = tiny_or_mid(size, Path(tmp), args)
            if "overhead" in args.sections:
                report_overhead([(size, *measure_overhead(argv_, models, network, batches, args.steps))])
            network.remove_from_model()  # each section attaches its own LoRA
            if "fp8" in args.sections:
                report_fp8([(size, measure_fp8(models.unet, fp8_copy(models.unet), batches, args.steps))])
            if "compile" in args.sections:
                report_compile([(size, measure_compile(models, batches, args.steps, args.backend))], args.backend)
    if "upcast" in args.sections:
        report_upcast(measure_upcast())


SECTIONS = ("overhead", "compile", "fp8", "upcast")


def report_overhead(overhead) -> None:
    print(f"\n{'model':6} {'trainer s/step':>15} {'bare s/step':>12} {'ratio':>7}  target <= {TARGET}")
    for size, trainer, bare in overhead:
        ratio = trainer / bare
        print(f"{size:6} {trainer:15.4f} {bare:12.4f} {ratio:7.3f}  {'met' if ratio <= TARGET else 'MISSED'}")


def report_compile(compiled, backend: str) -> None:
    print(f"\n{'model':6} {'eager s/step':>12} {'compiled s/step':>15} {'compiled/eager':>14} {'compile s':>9}")
    for size, m in compiled:
        print(
            f"{size:6} {m['eager']:12.4f} {m['compiled']:15.4f} {m['compiled'] / m['eager']:14.3f} "
            f"{m['compile_s']:9.1f}  {m['ran']} ({backend} asked); CPU s/step {m['eager cpu']:.4f} eager, "
            f"{m['compiled cpu']:.4f} compiled: {m['compiled cpu'] / m['eager cpu']:.3f}",
            flush=True,
        )


def report_fp8(fp8) -> None:
    print(f"\n{'model':6} {'fp32 s/step':>11} {'fp8 new':>9} {'fp8 old':>9} {'new/fp32':>8} {'old/fp32':>8}")
    for size, m in fp8:
        new, old = m["fp8 table"] / m["fp32"], m["fp8 cast"] / m["fp32"]
        new_cpu, old_cpu = m["fp8 table cpu"] / m["fp32 cpu"], m["fp8 cast cpu"] / m["fp32 cpu"]
        target = f"new <= {FP8_TARGET}: {'met' if new <= FP8_TARGET else 'MISSED'}" if size == "full" else ""
        print(
            f"{size:6} {m['fp32']:11.3f} {m['fp8 table']:9.3f} {m['fp8 cast']:9.3f} {new:8.2f} {old:8.2f}  "
            f"CPU s/step {m['fp32 cpu']:.3f} / {m['fp8 table cpu']:.3f} / {m['fp8 cast cpu']:.3f}: "
            f"{new_cpu:.2f} / {old_cpu:.2f}  {target}",
            flush=True,
        )


def report_upcast(upcasts) -> None:
    print(f"\n{'fp8 ->':8} {'.to M/s':>9} {'table M/s':>10} {'chunked M/s':>12}  (1280x5120 weight)")
    for dtype, to, table, chunked in upcasts:
        print(f"{dtype:8} {to:9.0f} {table:10.0f} {chunked:12.0f}", flush=True)


FP8_TARGET = 1.5


if __name__ == "__main__":
    main()
