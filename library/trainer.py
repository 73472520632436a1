"""The training run: set up each part from its slice of the config, then one readable loop."""

from __future__ import annotations

import gc
import importlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from library.config import NetworkConfig, PrecisionConfig, TrainConfig
from library.dataset import BucketBatchSampler, TrainDataset, collate_examples, scan_train_data_dir
from library.fp8 import store_weights_in_fp8
from library.latent_cache import cache_latents
from library.loss import SDXL_VAE_SCALE, add_noise, epsilon_mse_loss, make_noise_scheduler
from library.metadata import DatasetSummary, progress_metadata, training_metadata
from library.models import SDXLModels, load_sdxl, model_hashes
from library.optim import build_lr_scheduler, build_optimizer, total_training_steps, warmup_steps
from library.precision import PrecisionPlan, plan_precision, save_dtype
from library.saving import LoRASaver
from library.text_encoding import encode_prompts, time_ids, tokenize
from networks.lora import ParamGroupInfo


@dataclass(frozen=True)
class TrainResult:
    final_path: Path
    saved_paths: list[Path]
    steps: int
    epochs: int
    losses: list[float]
    """Loss of every optimizer step (for tests and comparisons)."""


def format_param_groups(infos: list[ParamGroupInfo], weight_decay: float | None) -> str:
    """The start-up table that shows at a glance whether LoRA+ is on."""
    rows = [("component", "group", "tensors", "parameters", "lr", "weight decay")]
    for info in infos:
        rows.append((info.component, "plus (B)" if info.plus else "base", str(info.tensors),
                     f"{info.parameters:,}", f"{info.lr:.3g}", "-" if weight_decay is None else f"{weight_decay:g}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def prepare_base_models(
    models: SDXLModels, plan: PrecisionPlan, precision: PrecisionConfig, train_text_encoder: bool, device: torch.device
) -> None:
    """Freeze the base model, place it, and apply fp8 storage, attention and checkpointing choices."""
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


def create_lora_network(net_cfg: NetworkConfig, models: SDXLModels):
    """Build the network through `--network_module` (sd-scripts' plug-in point) and attach it."""
    module = importlib.import_module(net_cfg.module)
    text_encoders = [models.text_encoder1, models.text_encoder2]
    if net_cfg.weights is not None:
        network, _ = module.create_network_from_weights(1.0, net_cfg.weights, models.vae, text_encoders, models.unet)
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


def _encode_images(vae, device: torch.device):
    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        return vae.encode(images.to(device, vae.dtype)).latent_dist.sample().float()

    return encode


def train(cfg: TrainConfig) -> TrainResult:
    started_at = time.time()
    # Data first: a missing folder or broken image stops here, before any model loads.
    records = scan_train_data_dir(cfg.data)
    dataset = TrainDataset(records, cfg.data)
    print(dataset.bucket_report())

    # Devices and precision.
    run_dir = None
    if cfg.output.logging_dir is not None:
        run_dir = cfg.output.logging_dir / f"{cfg.output.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_precision(cfg.precision.mixed_precision, device_type, cfg.precision.xformers)
    accelerator = Accelerator(
        mixed_precision=plan.mixed_precision,
        gradient_accumulation_steps=cfg.loop.gradient_accumulation_steps,
        log_with="tensorboard" if run_dir is not None else None,
        project_dir=str(run_dir) if run_dir is not None else None,
    )
    for note in plan.notes:
        accelerator.print(f"warning: {note}")
    accelerator.print(
        f"precision: mixed={plan.mixed_precision}, base weights={'float8_e4m3fn' if cfg.precision.fp8_base else plan.weight_dtype}, "
        f"compute={plan.compute_dtype}, LoRA=float32, attention={plan.attention}, device={accelerator.device}"
    )
    set_seed(cfg.loop.seed)

    # Models.
    models = load_sdxl(cfg.model.path, config_dir=cfg.model.config_dir, dtype=plan.weight_dtype)
    models.vae.to(accelerator.device, torch.float32).requires_grad_(False).eval()
    prepare_base_models(models, plan, cfg.precision, cfg.network.train_text_encoder, accelerator.device)

    # Latents: cached once (then the VAE leaves memory) or encoded per batch.
    encode = _encode_images(models.vae, accelerator.device)
    if cfg.loop.cache_latents:
        cache_latents(dataset, encode, to_disk=cfg.loop.cache_latents_to_disk, batch_size=cfg.loop.vae_batch_size,
                      show_progress=accelerator.is_local_main_process)
        models.vae = None
        encode = None
        gc.collect()

    # Network, optimizer, schedule.
    network = create_lora_network(cfg.network, models)
    opt = cfg.optimizer
    param_groups, descriptions = network.prepare_optimizer_params(opt.text_encoder_lr, opt.unet_lr, opt.learning_rate)
    group_infos = network.param_group_infos(opt.text_encoder_lr, opt.unet_lr, opt.learning_rate)
    if not param_groups:
        raise ValueError("nothing to train: every parameter group has learning rate 0")
    optimizer = build_optimizer(opt.optimizer_type, param_groups, opt.learning_rate, opt.optimizer_args)
    accelerator.print(format_param_groups(group_infos, optimizer.param_groups[0].get("weight_decay")))

    sampler = BucketBatchSampler(dataset, cfg.loop.batch_size, cfg.loop.seed,
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    workers = cfg.loop.max_data_loader_n_workers
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_examples, num_workers=workers,
                        persistent_workers=cfg.loop.persistent_data_loader_workers and workers > 0)
    batches_per_epoch = len(sampler)
    total_steps = total_training_steps(cfg.loop.max_train_steps, cfg.loop.max_train_epochs, batches_per_epoch,
                                       cfg.loop.gradient_accumulation_steps)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.loop.gradient_accumulation_steps)
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    lr_scheduler = build_lr_scheduler(
        opt.lr_scheduler, optimizer, total_steps=total_steps * accelerator.num_processes,
        warmup=warmup_steps(opt.lr_warmup_steps, total_steps) * accelerator.num_processes,
        num_cycles=opt.lr_scheduler_num_cycles, power=opt.lr_scheduler_power,
    )
    network, optimizer, lr_scheduler = accelerator.prepare(network, optimizer, lr_scheduler)
    lora_network = accelerator.unwrap_model(network)

    # Saving and logging.
    hashes = model_hashes(cfg.model.path)
    base_metadata = training_metadata(
        cfg, model_name=cfg.model.path.name, model_hash=hashes[0], new_model_hash=hashes[1],
        dataset=DatasetSummary(dataset.num_train_images, dataset.tag_frequency(), dataset.dataset_dirs_info(),
                               dataset.bucket_counts(), batches_per_epoch),
        param_groups=group_infos, total_steps=total_steps, num_epochs=num_epochs,
        mixed_precision=plan.mixed_precision, optimizer_name=f"{type(optimizer.optimizer).__module__}.{type(optimizer.optimizer).__name__}",
        session_id=random.Random(cfg.loop.seed).randint(0, 2**32), started_at=started_at,
    )
    saver = LoRASaver(cfg.output.output_dir, cfg.output.output_name, save_dtype(cfg.output.save_precision))
    if run_dir is not None:
        accelerator.init_trackers("network_train")

    # The loop.
    noise_scheduler = make_noise_scheduler()
    tokenizers = (models.tokenizer1, models.tokenizer2)
    eos_id = models.tokenizer2.eos_token_id
    train_te = cfg.network.train_text_encoder
    progress = tqdm(total=total_steps, desc="steps", disable=not accelerator.is_local_main_process)
    losses: list[float] = []
    global_step = 0
    for epoch in range(1, num_epochs + 1):
        sampler.set_epoch(epoch)
        lora_network.on_epoch_start(None, None)
        for batch in loader:
            with accelerator.accumulate(network):
                # Latents and text conditioning for this batch.
                if "latents" in batch:
                    latents = batch["latents"].to(accelerator.device)
                else:
                    latents = encode(batch["images"])
                latents = latents * SDXL_VAE_SCALE
                ids1, ids2 = (tokenize(t, batch["captions"]).to(accelerator.device) for t in tokenizers)
                with torch.set_grad_enabled(train_te), accelerator.autocast():
                    context, pooled = encode_prompts(models.text_encoder1, models.text_encoder2, ids1, ids2, eos_id)
                added = {"text_embeds": pooled, "time_ids": time_ids(
                    batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]).to(accelerator.device)}

                # Noise, prediction, loss, step.
                noisy, noise, timesteps = add_noise(noise_scheduler, latents)
                with accelerator.autocast():
                    prediction = models.unet(noisy.to(plan.compute_dtype), timesteps, context, added_cond_kwargs=added).sample
                loss = epsilon_mse_loss(prediction, noise, batch["loss_weights"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and opt.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(lora_network.get_trainable_params(), opt.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients:
                global_step += 1
                losses.append(loss.detach().item())
                progress.update(1)
                average = sum(losses[-100:]) / len(losses[-100:])
                progress.set_postfix(avr_loss=f"{average:.4f}")
                logs = {"loss": losses[-1], "loss/average": average}
                logs.update({f"lr/{d}": lr for d, lr in zip(descriptions, lr_scheduler.get_last_lr())})
                accelerator.log(logs, step=global_step)
            if global_step >= total_steps:
                break

        # Epoch checkpoints (the last epoch's file is the final file).
        accelerator.wait_for_everyone()
        every = cfg.output.save_every_n_epochs
        if every and epoch % every == 0 and epoch < num_epochs and accelerator.is_main_process:
            path = saver.save_epoch(lora_network, progress_metadata(base_metadata, steps=global_step, epoch=epoch,
                                                                    finished=False), epoch)
            accelerator.print(f"saved {path}")
        if global_step >= total_steps:
            break

    progress.close()
    accelerator.wait_for_everyone()
    final_path = saver.final_path
    if accelerator.is_main_process:
        final_path = saver.save_final(lora_network, progress_metadata(base_metadata, steps=global_step, epoch=epoch,
                                                                      finished=True))
    accelerator.end_training()
    return TrainResult(final_path, saver.saved, global_step, epoch, losses)
