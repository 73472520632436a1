"""Setting up a run's fixed parts, each from its slice of the config: the data and its validation split, the base
model (loaded, prepared, its inputs cached), the LoRA network and EMA, the optimizer with its LoRA+ groups, the
loader and schedule, the metadata every file carries, and the trackers. `library.train.trainer` calls them in
order; the order matters (the network's initial weights come from the seeded RNG)."""

from __future__ import annotations

import importlib
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader

from library.data.dataset import BucketBatchSampler, DatasetConfig, TrainDataset, collate_examples, scan_train_data_dir
from library.data.latent_cache import cache_latents
from library.data.process_share import ONE_PROCESS, CachePass, ProcessShare
from library.data.text_encoder_cache import (
    CachedTextDataset,
    TextEncoderCache,
    cache_text_encoder_outputs,
    collate_with_text_outputs,
)
from library.model.base_models import (
    TEXT_ENCODERS,
    Encoder,
    free_memory,
    prepare_base_models,
    release_model,
    vae_encoder,
    vae_fingerprint,
)
from library.model.compiled import CompileConfig, CompileState, compile_models
from library.model.loading import COMPONENTS, SDXLModels, empty_models, load_sdxl
from library.model.precision import PrecisionConfig, PrecisionPlan
from library.model.text_encoding import encode_captions
from library.train.diagnostics import LoRADiagnostics
from library.train.ema import EMAConfig, LoRAEMA
from library.train.interrupts import NOTHING_SAVED, Phase
from library.train.memory_phases import MemoryPhases
from library.train.metadata import DatasetSummary, training_metadata
from library.train.optim import build_lr_scheduler, build_optimizer, decay_steps, total_training_steps, warmup_steps
from library.train.parts import Schedule, ValidationSource
from library.train.run_config import (
    LoopConfig,
    ModelConfig,
    NetworkConfig,
    OptimizerConfig,
    OutputConfig,
    TrainConfig,
)
from library.train.trackers import Scalar, run_hparams, store_run_config
from library.train.validation import (
    ValidationConfig,
    ValidationSet,
    build_validation_set,
    scan_validation_dir,
    split_records,
    validation_metadata,
)
from networks.lora import ParamGroupInfo

# --- Data ----------------------------------------------------------------------------------------------------------


def split_validation(
    data: DatasetConfig, val_cfg: ValidationConfig | None, batch_size: int
) -> tuple[list, ValidationSet | None]:
    """The training records and the validation set (a split of them, or --validation_data_dir's images)."""
    records = scan_train_data_dir(data)
    if val_cfg is None or not val_cfg.enabled:
        return records, None
    if val_cfg.split > 0:
        records, held_out = split_records(records, val_cfg.split, val_cfg.seed)
    else:
        held_out = scan_validation_dir(data, val_cfg.data_dir)
    return records, build_validation_set(held_out, data, batch_size, val_cfg.seed, val_cfg.max_steps)


def example_source(dataset: TrainDataset, text_cache: TextEncoderCache | None):
    """(what to index with example keys, how to collate them): the dataset itself, or with `text_cache` the
    dataset plus each example's cached `text_context` / `text_pooled`."""
    if text_cache is None:
        return dataset, collate_examples
    return CachedTextDataset(dataset, text_cache), partial(collate_with_text_outputs, base=collate_examples)


def make_loader(
    dataset: TrainDataset, loop: LoopConfig, accelerator: Accelerator, text_cache: TextEncoderCache | None = None
) -> tuple[DataLoader, BucketBatchSampler]:
    """Batches drawn within one bucket; each process takes its share of the batches. With `text_cache`
    every batch also carries the cached `text_context` / `text_pooled` of its examples."""
    sampler = BucketBatchSampler(
        dataset, loop.batch_size, loop.seed, num_replicas=accelerator.num_processes, rank=accelerator.process_index
    )
    source, collate = example_source(dataset, text_cache)
    workers = loop.max_data_loader_n_workers
    # Its own generator: creating an epoch's iterator must not draw from the global RNG (the noise's), or a
    # resumed run would drift from an uninterrupted one.
    loader = DataLoader(
        source,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=loop.persistent_data_loader_workers and workers > 0,
        generator=torch.Generator().manual_seed(loop.seed),
    )
    return loader, sampler


def plan_schedule(loop: LoopConfig, batches_per_epoch: int) -> Schedule:
    total = total_training_steps(
        loop.max_train_steps, loop.max_train_epochs, batches_per_epoch, loop.gradient_accumulation_steps
    )
    steps_per_epoch = math.ceil(batches_per_epoch / loop.gradient_accumulation_steps)
    return Schedule(batches_per_epoch, total, math.ceil(total / steps_per_epoch))


# --- The base model and its cached inputs -----------------------------------------------------------------------


def load_base_model(
    model_cfg: ModelConfig,
    precision: PrecisionConfig,
    plan: PrecisionPlan,
    accelerator: Accelerator,
    *,
    train_text_encoder: bool,
    components: Sequence[str] = COMPONENTS,
    into: SDXLModels | None = None,
) -> tuple[SDXLModels, str]:
    """SDXL, frozen, loaded tensor by tensor straight into its storage dtype on the device, then prepared; returns
    it and the attention that runs (sdpa when xformers failed on its first call). Staged loading: only
    `components` are loaded (into `into`, the models of an earlier stage; `load_sdxl`)."""
    models = load_sdxl(
        model_cfg.path,
        config_dir=model_cfg.config_dir,
        dtype=plan.weight_dtype,
        device=accelerator.device,
        linear_weight_dtypes=plan.storage_dtypes(),
        vae_dtype=plan.vae_dtype,
        components=components,
        into=into,
    )
    attention = prepare_base_models(models, plan, precision, train_text_encoder, accelerator.device, components)
    return models, attention


def process_share(accelerator: Accelerator) -> ProcessShare:
    """This process's share of a caching pass; the processes exchange what they encoded through
    `torch.distributed.all_gather_object` (accelerate's `gather_object`), which works over gloo and NCCL."""
    if accelerator.num_processes == 1:
        return ONE_PROCESS
    return ProcessShare(accelerator.process_index, accelerator.num_processes, gather_object)


def describe_cache_pass(what: str, made: CachePass, items: str, seconds: float) -> str:
    """The line a caching pass prints: what came from files, what was encoded and by how many processes."""
    line = f"cached {what} of {made.images} images in {seconds:.1f} s: {made.from_files} read from cache files"
    line += f", {made.encoded} {items} encoded"
    if made.encoded_here != made.encoded:
        line += f" (this process: {made.encoded_here})"
    return line


COMPONENT_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder1": "text encoder 1", "text_encoder2": "text encoder 2"}


@dataclass
class StagedLoad:
    """The base model loaded stage by stage (`loading_stages`): each `load` adds components to the same models,
    marks the memory phase and the interrupt line, and adds to the loading time."""

    model_cfg: ModelConfig
    precision: PrecisionConfig
    plan: PrecisionPlan
    accelerator: Accelerator
    train_text_encoder: bool
    memory: MemoryPhases
    phase: Phase
    models: SDXLModels | None = None
    attention: str | None = None
    """The attention that runs (sdpa when xformers failed), once the UNet is loaded."""
    seconds: float = 0.0
    """Time spent loading and preparing, over all stages."""

    def load(self, components: Sequence[str]) -> SDXLModels:
        """Load and prepare `components` (none: only the first call's check of every component, if first)."""
        if self.models is not None and not components:
            return self.models
        self.phase.enter("loading the model")
        self.memory.enter("load", ", ".join(COMPONENT_NAMES[c] for c in components) or "checking the file")
        started = time.perf_counter()
        self.models, attention = load_base_model(
            self.model_cfg,
            self.precision,
            self.plan,
            self.accelerator,
            train_text_encoder=self.train_text_encoder,
            components=components,
            into=self.models,
        )
        if "unet" in components:
            self.attention = attention
        self.seconds += time.perf_counter() - started
        return self.models


def cache_latents_once(
    loop: LoopConfig,
    datasets: list[TrainDataset],
    models: SDXLModels,
    accelerator: Accelerator,
    *,
    keep_vae: bool,
    highvram: bool,
    phase: Phase,
) -> Encoder | None:
    """With --cache_latents every image is encoded once (then the VAE is released unless `keep_vae`, for samples)
    and None returned; otherwise the VAE encoder the loss calls per batch."""
    encode: Encoder = vae_encoder(models.vae, accelerator.device)
    if not loop.cache_latents:
        return encode
    phase.enter(
        "caching latents",
        NOTHING_SAVED
        + ("; the latents cached to disk so far are kept and reused" if loop.cache_latents_to_disk else ""),
    )
    for dataset in datasets:
        started = time.perf_counter()
        made = cache_latents(
            dataset,
            encode,
            to_disk=loop.cache_latents_to_disk,
            batch_size=loop.vae_batch_size,
            show_progress=accelerator.is_local_main_process,
            vae_fingerprint=vae_fingerprint(models.vae),
            share=process_share(accelerator),
        )
        accelerator.print(describe_cache_pass("latents", made, "images", time.perf_counter() - started))
    models.vae = release_model(models.vae, keep_vae, highvram, accelerator.device)
    free_memory(accelerator.device)
    return None


def cache_text_conditioning(
    dataset: TrainDataset,
    models: SDXLModels,
    loop: LoopConfig,
    plan: PrecisionPlan,
    accelerator: Accelerator,
    model_id: str,
) -> TextEncoderCache:
    """Encode every image's caption (variants) once (the caller then releases the text encoders).

    Variant k's caption is the dataset's own processed caption for the synthetic key (index, 10_000 + k, 0)."""
    device = accelerator.device

    def encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with accelerator.autocast():
            return encode_captions(models, captions, loop.max_token_length, device)

    half = plan.weight_dtype in (torch.float16, torch.bfloat16)
    started = time.perf_counter()
    cache = cache_text_encoder_outputs(
        [record.path for record in dataset.records],
        lambda index, epoch: dataset.caption(index, epoch),
        encode,
        num_variants=loop.text_encoder_cache_variants,
        seed=loop.seed,
        length=loop.max_token_length + 2,
        te1_width=models.text_encoder1.config.hidden_size,
        dtype=plan.weight_dtype if half else torch.float32,
        to_disk=loop.cache_text_encoder_outputs_to_disk,
        model=model_id,
        batch_size=max(loop.batch_size, 8),
        show_progress=accelerator.is_local_main_process,
        share=process_share(accelerator),
    )
    if cache.made is not None:
        accelerator.print(
            describe_cache_pass("text-encoder outputs", cache.made, "captions", time.perf_counter() - started)
        )
    return cache


def cache_text_outputs(
    loop: LoopConfig,
    dataset: TrainDataset,
    validation: ValidationSet | None,
    models: SDXLModels,
    plan: PrecisionPlan,
    accelerator: Accelerator,
    *,
    model_id: str,
    phase: Phase,
) -> tuple[TextEncoderCache | None, ValidationSource | None]:
    """With --cache_text_encoder_outputs every caption (variant) of the training and validation images is encoded
    once; returns that cache (None without the flag) and the validation batches' source."""
    text_cache = validation_cache = None
    if loop.cache_text_encoder_outputs:
        phase.enter(
            "caching text-encoder outputs",
            NOTHING_SAVED
            + (
                "; the outputs cached to disk so far are kept and reused"
                if loop.cache_text_encoder_outputs_to_disk
                else ""
            ),
        )
        text_cache = cache_text_conditioning(dataset, models, loop, plan, accelerator, model_id=model_id)
        if validation is not None:
            validation_cache = cache_text_conditioning(
                validation.dataset, models, loop, plan, accelerator, model_id=model_id
            )
    if validation is None:
        return text_cache, None
    return text_cache, ValidationSource(validation, *example_source(validation.dataset, validation_cache))


def release_text_encoders(models: SDXLModels, *, keep: bool, highvram: bool, device: torch.device) -> None:
    """Their outputs are cached: free them (the network is built from their structure alone,
    `text_encoder_structures`), or keep them for samples (`keep`)."""
    models.text_encoder1 = release_model(models.text_encoder1, keep, highvram, device)
    models.text_encoder2 = release_model(models.text_encoder2, keep, highvram, device)
    free_memory(device)


def compile_for_loss(
    cfg: CompileConfig | None, models: SDXLModels, accelerator: Accelerator, *, train_text_encoder: bool
) -> tuple[SDXLModels, CompileState | None]:
    """The models the loss calls: with --torch_compile (once the LoRA is attached and the base prepared) the UNet
    and trained text encoders compiled, or eager after one warning where that is not possible; `models` itself
    (and None) without it."""
    if cfg is None:
        return models, None
    return compile_models(
        models,
        cfg,
        accelerator.device.type,
        train_text_encoder=train_text_encoder,
        warn=lambda line: accelerator.print(f"warning: {line}"),
    )


# --- The LoRA network and its optimizer ----------------------------------------------------------------------------


def text_encoder_structures(models: SDXLModels) -> list[torch.nn.Module]:
    """The two text encoders, or, where one was released once its outputs were cached (staged loading), an empty
    one built from its config (meta device, no memory): the network creates and seeds its adapters from their
    layers' names and shapes, as sd-scripts does, before dropping them for a UNet-only run."""
    missing = [name for name in TEXT_ENCODERS if getattr(models, name) is None]
    empty = empty_models(models.config_dir, missing) if missing else {}
    return [getattr(models, name) if name not in empty else empty[name] for name in TEXT_ENCODERS]


def create_lora_network(net_cfg: NetworkConfig, models: SDXLModels):
    """Build the network through `--network_module` (sd-scripts' plug-in point) and attach it."""
    module = importlib.import_module(net_cfg.module)
    text_encoders = text_encoder_structures(models)
    if net_cfg.dim_from_weights:
        network, _ = module.create_network_from_weights(
            1.0, net_cfg.weights, models.vae, text_encoders, models.unet, **net_cfg.args
        )
        network.set_loraplus_lr_ratio(None, net_cfg.loraplus.unet, net_cfg.loraplus.text_encoder)
    else:
        network = module.create_network(
            1.0,
            net_cfg.dim,
            net_cfg.alpha,
            models.vae,
            text_encoders,
            models.unet,
            neuron_dropout=net_cfg.dropout,
            **net_cfg.args,
        )
    network.apply_to(text_encoders, models.unet, net_cfg.train_text_encoder, net_cfg.train_unet)
    if net_cfg.weights is not None:
        network.load_weights(net_cfg.weights)
    return network


def setup_network(
    net_cfg: NetworkConfig, ema_cfg: EMAConfig | None, models: SDXLModels, plan: PrecisionPlan, device: torch.device
) -> tuple[torch.nn.Module, LoRAEMA | None]:
    """The LoRA network on the device in the LoRA dtype, and its EMA (None without --ema_decay)."""
    network = create_lora_network(net_cfg, models).to(device, plan.lora_dtype)
    if ema_cfg is None:
        return network, None
    return network, LoRAEMA(network, ema_cfg.decay, update_after_step=ema_cfg.update_after_step, warmup=ema_cfg.warmup)


def seed_noise_per_process(seed: int, process_index: int) -> None:
    """Each process draws its own noise, timesteps and LoRA dropouts: process r > 0 reseeds every global RNG with
    `seed + r` (accelerate's `set_seed(device_specific=True)` rule), or all would train on the same draws. Called
    once the network has its initial weights (drawn alike everywhere) and before a resumed state restores each
    process's own RNGs. Process 0 keeps the run seed's stream, so a one-process run draws what it always drew; the
    order of the data has its own generator (`make_loader`)."""
    if process_index > 0:
        set_seed(seed + process_index)


def format_param_groups(infos: list[ParamGroupInfo], weight_decay: float | None) -> str:
    """The start-up table that shows at a glance whether LoRA+ is on."""
    rows = [("component", "block", "group", "tensors", "parameters", "lr", "weight decay")]
    for info in infos:
        block = "-" if info.block is None else str(info.block)
        rows.append(
            (
                info.component,
                block,
                "plus (B)" if info.plus else "base",
                str(info.tensors),
                f"{info.parameters:,}",
                f"{info.lr:.3g}",
                "-" if weight_decay is None else f"{weight_decay:g}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def setup_optimizer(
    opt: OptimizerConfig, network, accelerator: Accelerator
) -> tuple[torch.optim.Optimizer, list[ParamGroupInfo]]:
    """The optimizer over the network's LoRA+ groups (`networks.loraplus`), and the groups described (printed as
    the start-up table)."""
    param_groups, _ = network.prepare_optimizer_params(opt.text_encoder_lr, opt.unet_lr, opt.learning_rate)
    groups = network.param_group_infos(opt.text_encoder_lr, opt.unet_lr, opt.learning_rate)
    optimizer = build_optimizer(opt.optimizer_type, param_groups, opt.learning_rate, opt.optimizer_args)
    accelerator.print(format_param_groups(groups, optimizer.param_groups[0].get("weight_decay")))
    return optimizer, groups


def setup_lr_scheduler(opt: OptimizerConfig, optimizer: torch.optim.Optimizer, schedule: Schedule, num_processes: int):
    """--lr_scheduler over the run's steps; accelerate steps a prepared scheduler once per process per optimizer
    step, so `build_lr_scheduler` counts every length in those steps."""
    return build_lr_scheduler(
        opt.lr_scheduler,
        optimizer,
        total_steps=schedule.total_steps,
        warmup=warmup_steps(opt.lr_warmup_steps, schedule.total_steps),
        num_cycles=opt.lr_scheduler_num_cycles,
        power=opt.lr_scheduler_power,
        decay=decay_steps(opt.lr_decay_steps, schedule.total_steps),
        min_lr_ratio=opt.lr_scheduler_min_lr_ratio,
        timescale=opt.lr_scheduler_timescale,
        scheduler_type=opt.lr_scheduler_type,
        scheduler_args=opt.lr_scheduler_args,
        initial_lr=opt.learning_rate,
        num_processes=num_processes,
    )


# --- What the files and trackers say about the run -------------------------------------------------------------


def run_metadata(
    cfg: TrainConfig,
    *,
    dataset: TrainDataset,
    validation: ValidationSet | None,
    hashes: tuple[str, str],
    groups: list[ParamGroupInfo],
    schedule: Schedule,
    plan: PrecisionPlan,
    optimizer_name: str,
    started_at: float,
) -> dict[str, str]:
    """The `ss_*` metadata fixed for the run (every saved file adds its progress); it records every slice."""
    metadata = training_metadata(
        cfg,
        model_name=cfg.model.path.name,
        model_hash=hashes[0],
        new_model_hash=hashes[1],
        dataset=DatasetSummary(
            dataset.num_train_images,
            dataset.tag_frequency(),
            dataset.dataset_dirs_info(),
            dataset.bucket_counts(),
            dataset.mean_ar_error(),
            schedule.batches_per_epoch,
            num_reg_images=dataset.num_reg_images,
            reg_dataset_dirs=dataset.reg_dataset_dirs_info(),
            subsets=dataset.subsets_info(),
        ),
        param_groups=groups,
        total_steps=schedule.total_steps,
        num_epochs=schedule.num_epochs,
        mixed_precision=plan.mixed_precision,
        optimizer_name=optimizer_name,
        session_id=random.Random(cfg.loop.seed).randint(0, 2**32),
        started_at=started_at,
    )
    if validation is not None:
        metadata.update(validation_metadata(cfg.validation))
        metadata["ss_num_validation_images"] = str(len(validation.dataset))
    return metadata


def run_settings(
    cfg: TrainConfig, plan: PrecisionPlan, schedule: Schedule, *, num_train_images: int
) -> dict[str, Scalar]:
    """The settings that run (network, optimizer, loop, precision), as the trackers and the run report record them,
    so runs can be compared."""
    return run_hparams(
        cfg.network,
        cfg.optimizer,
        cfg.loop,
        plan.summary(),
        total_steps=schedule.total_steps,
        num_epochs=schedule.num_epochs,
        num_train_images=num_train_images,
    )


def start_trackers(
    out: OutputConfig, accelerator: Accelerator, settings: Mapping[str, Scalar], *, validating: bool
) -> None:
    """--log_with's trackers, with the run's `settings`; a tracker that refuses them is a warning line."""
    if not out.log_with:
        return
    accelerator.init_trackers(out.log_tracker_name or "network_train")
    metrics = ("loss/average", "loss/validation") if validating else ("loss/average",)
    for problem in store_run_config(accelerator.trackers, settings, metrics):
        accelerator.print(f"warning: {problem}")


def setup_diagnostics(
    out: OutputConfig, network, groups: list[ParamGroupInfo], accelerator: Accelerator, *, start_step: int
) -> LoRADiagnostics | None:
    """The LoRA+ diagnostics every --diagnostics_every_n_steps steps (per UNet block too when the groups are split
    by block), on the main process, which alone logs them and writes the report; None when off."""
    if not out.diagnostics_every_n_steps or not accelerator.is_main_process:
        return None
    by_block = any(group.block is not None for group in groups)
    return LoRADiagnostics(network, out.diagnostics_every_n_steps, by_block=by_block, start_step=start_step)
