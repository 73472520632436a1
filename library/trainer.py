"""The training run: each part is set up from its slice of the config, then one readable loop."""

from __future__ import annotations

import gc
import hashlib
import importlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from library.config import LoopConfig, NetworkConfig, PrecisionConfig, TrainConfig
from library.dataset import BucketBatchSampler, TrainDataset, collate_examples, scan_train_data_dir
from library.fp8 import store_weights_in_fp8
from library.latent_cache import cache_latents
from library.loss import SDXL_VAE_SCALE, add_noise, epsilon_mse_loss, make_noise_scheduler
from library.metadata import DatasetSummary, progress_metadata, training_metadata
from library.models import SDXLModels, load_sdxl, model_hashes
from library.optim import build_lr_scheduler, build_optimizer, total_training_steps, warmup_steps
from library.precision import PrecisionPlan, plan_precision, save_dtype
from library.saving import LoRASaver
from library.text_encoder_cache import (CachedTextDataset, TextEncoderCache, cache_text_encoder_outputs,
                                        collate_with_text_outputs)
from library.text_encoding import encode_captions, time_ids
from networks.lora import ParamGroupInfo

Encoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainResult:
    final_path: Path
    saved_paths: list[Path]
    steps: int
    epochs: int
    losses: list[float]
    """Loss of every optimizer step (for tests and comparisons)."""
    is_main_process: bool
    """Only the main process writes files (and reports them)."""


@dataclass(frozen=True)
class Schedule:
    """How long the run is, derived once from the loop config and the data."""

    batches_per_epoch: int
    total_steps: int
    num_epochs: int


@dataclass
class TrainingParts:
    """What the loop works with, built by `train`."""

    accelerator: Accelerator
    plan: PrecisionPlan
    models: SDXLModels
    encode: Encoder | None
    """VAE encoder when latents are not cached, else None."""
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    group_descriptions: list[str]
    loader: DataLoader
    sampler: BucketBatchSampler
    schedule: Schedule
    saver: LoRASaver


def format_param_groups(infos: list[ParamGroupInfo], weight_decay: float | None) -> str:
    """The start-up table that shows at a glance whether LoRA+ is on."""
    rows = [("component", "block", "group", "tensors", "parameters", "lr", "weight decay")]
    for info in infos:
        block = "-" if info.block is None else str(info.block)
        rows.append((info.component, block, "plus (B)" if info.plus else "base", str(info.tensors),
                     f"{info.parameters:,}", f"{info.lr:.3g}", "-" if weight_decay is None else f"{weight_decay:g}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def make_accelerator(cfg: TrainConfig) -> tuple[Accelerator, PrecisionPlan]:
    """accelerate with the precision this device can run; fallbacks are printed once."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_precision(cfg.precision.mixed_precision, device_type, cfg.precision.xformers)
    out = cfg.output
    run_dir = None
    if out.logging_dir is not None:
        run_dir = out.logging_dir / f"{out.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
    accelerator = Accelerator(
        mixed_precision=plan.mixed_precision,
        gradient_accumulation_steps=cfg.loop.gradient_accumulation_steps,
        log_with="tensorboard" if run_dir is not None else None,
        project_dir=str(run_dir) if run_dir is not None else None,
    )
    for note in plan.notes:
        accelerator.print(f"warning: {note}")
    base = "float8_e4m3fn" if cfg.precision.fp8_base else str(plan.weight_dtype).removeprefix("torch.")
    accelerator.print(
        f"precision: mixed={plan.mixed_precision}, base weights={base}, "
        f"compute={str(plan.compute_dtype).removeprefix('torch.')}, LoRA=float32, attention={plan.attention}, "
        f"device={accelerator.device}, processes={accelerator.num_processes}"
    )
    return accelerator, plan


def prepare_base_models(
    models: SDXLModels, plan: PrecisionPlan, precision: PrecisionConfig, train_text_encoder: bool, device: torch.device
) -> None:
    """Freeze the base model, place it, and apply fp8 storage, attention and checkpointing choices."""
    models.vae.to(device, torch.float32).requires_grad_(False).eval()  # SDXL's VAE overflows in fp16
    for model in (models.unet, models.text_encoder1, models.text_encoder2):
        model.requires_grad_(False)
        model.to(device)
        model.eval()
    if plan.attention == "xformers":
        models.unet.enable_xformers_memory_efficient_attention()
    if precision.fp8_base:
        for model in (models.unet, models.text_encoder1, models.text_encoder2):
            store_weights_in_fp8(model, plan.compute_dtype)
    if precision.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        models.unet.train()
        if train_text_encoder:
            for te in (models.text_encoder1, models.text_encoder2):
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                te.train()


def vae_fingerprint(vae) -> str:
    """A short id of the VAE's weights (sha256 of its first and last convolutions), stored with cached latents
    so that a cache made by another VAE is recomputed instead of used."""
    digest = hashlib.sha256()
    for tensor in (vae.encoder.conv_in.weight, vae.quant_conv.weight if vae.quant_conv is not None else None):
        if tensor is not None:
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def vae_encoder(vae, device: torch.device) -> Encoder:
    """Images in [-1, 1] -> unscaled latents (a sample of the VAE's posterior, as sd-scripts caches)."""

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        return vae.encode(images.to(device, vae.dtype)).latent_dist.sample().float()

    return encode


def create_lora_network(net_cfg: NetworkConfig, models: SDXLModels):
    """Build the network through `--network_module` (sd-scripts' plug-in point) and attach it."""
    module = importlib.import_module(net_cfg.module)
    text_encoders = [models.text_encoder1, models.text_encoder2]
    if net_cfg.dim_from_weights:
        network, _ = module.create_network_from_weights(
            1.0, net_cfg.weights, models.vae, text_encoders, models.unet, **net_cfg.args
        )
        network.set_loraplus_lr_ratio(None, net_cfg.loraplus.unet, net_cfg.loraplus.text_encoder)
    else:
        network = module.create_network(
            1.0, net_cfg.dim, net_cfg.alpha, models.vae, text_encoders, models.unet,
            neuron_dropout=net_cfg.dropout, **net_cfg.args,
        )
    network.apply_to(text_encoders, models.unet, net_cfg.train_text_encoder, net_cfg.train_unet)
    if net_cfg.weights is not None:
        network.load_weights(net_cfg.weights)
    return network


def make_loader(
    dataset: TrainDataset, loop: LoopConfig, accelerator: Accelerator, text_cache: TextEncoderCache | None = None
) -> tuple[DataLoader, BucketBatchSampler]:
    """Batches drawn within one bucket; each process takes its share of the batches. With `text_cache`
    every batch also carries the cached `text_context` / `text_pooled` of its examples."""
    sampler = BucketBatchSampler(dataset, loop.batch_size, loop.seed,
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    source, collate = dataset, collate_examples
    if text_cache is not None:
        source, collate = CachedTextDataset(dataset, text_cache), partial(collate_with_text_outputs,
                                                                           base=collate_examples)
    workers = loop.max_data_loader_n_workers
    loader = DataLoader(source, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                        persistent_workers=loop.persistent_data_loader_workers and workers > 0)
    return loader, sampler


def cache_text_conditioning(
    dataset: TrainDataset, models: SDXLModels, loop: LoopConfig, plan: PrecisionPlan, accelerator: Accelerator,
    model_id: str,
) -> TextEncoderCache:
    """Encode every image's caption (variants) once, then move the text encoders off the device.

    Variant k's caption is the dataset's own processed caption for the synthetic key (index, 10_000 + k, 0)."""
    device = accelerator.device

    def encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with accelerator.autocast():
            return encode_captions(models, captions, loop.max_token_length, device)

    half = plan.weight_dtype in (torch.float16, torch.bfloat16)
    cache = cache_text_encoder_outputs(
        [record.path for record in dataset.records], lambda index, epoch: dataset.caption(index, epoch),
        encode, num_variants=loop.text_encoder_cache_variants, seed=loop.seed, length=loop.max_token_length + 2,
        te1_width=models.text_encoder1.config.hidden_size, dtype=plan.weight_dtype if half else torch.float32,
        to_disk=loop.cache_text_encoder_outputs_to_disk, model=model_id, batch_size=max(loop.batch_size, 8),
        show_progress=accelerator.is_local_main_process,
    )
    for text_encoder in (models.text_encoder1, models.text_encoder2):
        text_encoder.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return cache


def plan_schedule(loop: LoopConfig, batches_per_epoch: int) -> Schedule:
    total = total_training_steps(loop.max_train_steps, loop.max_train_epochs, batches_per_epoch,
                                 loop.gradient_accumulation_steps)
    steps_per_epoch = math.ceil(batches_per_epoch / loop.gradient_accumulation_steps)
    return Schedule(batches_per_epoch, total, math.ceil(total / steps_per_epoch))


def batch_loss(
    batch: dict, models: SDXLModels, encode: Encoder | None, noise_scheduler, plan: PrecisionPlan,
    train_text_encoder: bool, accelerator: Accelerator, max_token_length: int = 75,
) -> torch.Tensor:
    """One batch -> the training loss: latents, text conditioning (cached or encoded), noise, prediction, MSE."""
    device = accelerator.device
    latents = batch["latents"].to(device) if "latents" in batch else encode(batch["images"])
    latents = latents * SDXL_VAE_SCALE
    if "text_context" in batch:
        context, pooled = batch["text_context"].to(device), batch["text_pooled"].to(device)
    else:
        with torch.set_grad_enabled(train_text_encoder), accelerator.autocast():
            context, pooled = encode_captions(models, batch["captions"], max_token_length, device)
    added = {
        "text_embeds": pooled,
        "time_ids": time_ids(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]).to(device),
    }
    noisy, noise, timesteps = add_noise(noise_scheduler, latents)
    with accelerator.autocast():
        prediction = models.unet(noisy.to(plan.compute_dtype), timesteps, context, added_cond_kwargs=added).sample
    return epsilon_mse_loss(prediction, noise, batch["loss_weights"])


def average_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Mean of the LoRA gradients over processes. The adapters run inside the base model's forward,
    not the network's, so a DDP wrapper around the network would never see a forward to sync on."""
    if accelerator.num_processes == 1:
        return
    for param in params:
        if param.grad is not None:
            param.grad.copy_(accelerator.reduce(param.grad, reduction="mean"))


def train(cfg: TrainConfig) -> TrainResult:
    started_at = time.time()
    # Data first: a missing folder or broken image stops here, before any model loads.
    dataset = TrainDataset(scan_train_data_dir(cfg.data), cfg.data)
    accelerator, plan = make_accelerator(cfg)
    accelerator.print(dataset.bucket_report())
    set_seed(cfg.loop.seed)

    # Base model, frozen; latents (then the VAE leaves memory) and, UNet-only, text-encoder outputs (then the
    # encoders leave the device) cached once, or both encoded per batch.
    models = load_sdxl(cfg.model.path, config_dir=cfg.model.config_dir, dtype=plan.weight_dtype)
    prepare_base_models(models, plan, cfg.precision, cfg.network.train_text_encoder, accelerator.device)
    encode: Encoder | None = vae_encoder(models.vae, accelerator.device)
    if cfg.loop.cache_latents:
        cache_latents(dataset, encode, to_disk=cfg.loop.cache_latents_to_disk, batch_size=cfg.loop.vae_batch_size,
                      show_progress=accelerator.is_local_main_process, vae_fingerprint=vae_fingerprint(models.vae))
        models.vae, encode = None, None
        gc.collect()
    hashes = model_hashes(cfg.model.path)
    text_cache = None
    if cfg.loop.cache_text_encoder_outputs:
        text_cache = cache_text_conditioning(dataset, models, cfg.loop, plan, accelerator, model_id=hashes[1])

    # LoRA network, optimizer groups (LoRA+), schedule.
    network = create_lora_network(cfg.network, models).to(accelerator.device)
    opt = cfg.optimizer
    param_groups, descriptions = network.prepare_optimizer_params(opt.text_encoder_lr, opt.unet_lr, opt.learning_rate)
    group_infos = network.param_group_infos(opt.text_encoder_lr, opt.unet_lr, opt.learning_rate)
    optimizer = build_optimizer(opt.optimizer_type, param_groups, opt.learning_rate, opt.optimizer_args)
    accelerator.print(format_param_groups(group_infos, optimizer.param_groups[0].get("weight_decay")))
    loader, sampler = make_loader(dataset, cfg.loop, accelerator, text_cache)
    schedule = plan_schedule(cfg.loop, len(sampler))
    lr_scheduler = build_lr_scheduler(
        opt.lr_scheduler, optimizer, total_steps=schedule.total_steps * accelerator.num_processes,
        warmup=warmup_steps(opt.lr_warmup_steps, schedule.total_steps) * accelerator.num_processes,
        num_cycles=opt.lr_scheduler_num_cycles, power=opt.lr_scheduler_power,
    )
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)

    # What every saved file says about this run.
    inner = getattr(optimizer, "optimizer", optimizer)
    base_metadata = training_metadata(
        cfg, model_name=cfg.model.path.name, model_hash=hashes[0], new_model_hash=hashes[1],
        dataset=DatasetSummary(dataset.num_train_images, dataset.tag_frequency(), dataset.dataset_dirs_info(),
                               dataset.bucket_counts(), dataset.mean_ar_error(), schedule.batches_per_epoch,
                               num_reg_images=dataset.num_reg_images,
                               reg_dataset_dirs=dataset.reg_dataset_dirs_info(), subsets=dataset.subsets_info()),
        param_groups=group_infos, total_steps=schedule.total_steps, num_epochs=schedule.num_epochs,
        mixed_precision=plan.mixed_precision, optimizer_name=f"{type(inner).__module__}.{type(inner).__name__}",
        session_id=random.Random(cfg.loop.seed).randint(0, 2**32), started_at=started_at,
    )
    saver = LoRASaver(cfg.output.output_dir, cfg.output.output_name, save_dtype(cfg.output.save_precision))
    if accelerator.is_main_process:
        saver.save_param_groups(group_infos, inner.param_groups[0].get("weight_decay"))
    if cfg.output.logging_dir is not None:
        accelerator.init_trackers("network_train")

    parts = TrainingParts(accelerator, plan, models, encode, network, optimizer, lr_scheduler, descriptions, loader,
                          sampler, schedule, saver)
    losses, epoch = run_loop(parts, cfg, base_metadata)
    final_path = saver.final_path
    if accelerator.is_main_process:
        final_path = saver.save_final(network, progress_metadata(base_metadata, steps=len(losses), epoch=epoch,
                                                                 finished=True))
    accelerator.end_training()
    return TrainResult(final_path, saver.saved, len(losses), epoch, losses, accelerator.is_main_process)


def run_loop(parts: TrainingParts, cfg: TrainConfig, base_metadata: dict[str, str]) -> tuple[list[float], int]:
    """Epochs of optimizer steps; returns every step's loss and the last epoch run."""
    accelerator, network, optimizer, lr_scheduler = parts.accelerator, parts.network, parts.optimizer, parts.lr_scheduler
    schedule, sampler = parts.schedule, parts.sampler
    noise_scheduler = make_noise_scheduler()
    params = network.get_trainable_params()
    max_grad_norm = cfg.optimizer.max_grad_norm
    progress = tqdm(total=schedule.total_steps, desc="steps", disable=not accelerator.is_local_main_process)
    losses: list[float] = []
    epoch = 0
    while len(losses) < schedule.total_steps:
        epoch += 1
        sampler.set_epoch(epoch)
        network.on_epoch_start(None, None)
        for batch in parts.loader:
            # Forward, backward, step (accelerate skips the step while accumulating).
            with accelerator.accumulate(network):
                loss = batch_loss(batch, parts.models, parts.encode, noise_scheduler, parts.plan,
                                  cfg.network.train_text_encoder, accelerator, cfg.loop.max_token_length)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    average_gradients(params, accelerator)
                    if max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue

            # Progress and logs: the loss and every group's learning rate.
            losses.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
            average = sum(losses[-100:]) / len(losses[-100:])
            progress.update(1)
            progress.set_postfix(avr_loss=f"{average:.4f}")
            logs = {"loss": losses[-1], "loss/average": average}
            logs.update({f"lr/{d}": lr for d, lr in zip(parts.group_descriptions, lr_scheduler.get_last_lr())})
            accelerator.log(logs, step=len(losses))
            if len(losses) >= schedule.total_steps:
                break

        # Epoch checkpoints; the last epoch's weights are the final file.
        save_every = cfg.output.save_every_n_epochs
        accelerator.wait_for_everyone()
        if save_every and epoch % save_every == 0 and epoch < schedule.num_epochs and accelerator.is_main_process:
            metadata = progress_metadata(base_metadata, steps=len(losses), epoch=epoch, finished=False)
            accelerator.print(f"saved {parts.saver.save_epoch(network, metadata, epoch)}")
    progress.close()
    accelerator.wait_for_everyone()
    return losses, epoch
