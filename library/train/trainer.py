"""The training run: each part is set up from its slice of the config, then one readable loop."""

from __future__ import annotations

import contextlib
import importlib
import math
import random
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from library.train.run_config import LoopConfig, NetworkConfig, OutputConfig, TrainConfig
from library.data.dataset import BucketBatchSampler, TrainDataset, collate_examples, scan_train_data_dir
from library.model.base_models import (Encoder, free_memory, prepare_base_models, release_model, vae_encoder,  # noqa: F401
                                 vae_fingerprint)
from library.data.latent_cache import cache_latents
from library.train.loss import (SDXL_VAE_SCALE, LossOptions, diffusion_loss, loss_option_warnings, make_noise_scheduler,
                                noise_batch)
from library.train.metadata import DatasetSummary, progress_metadata, training_metadata
from library.model.loading import SDXLModels, load_sdxl, model_hashes
from library.train.optim import build_lr_scheduler, build_optimizer, decay_steps, total_training_steps, warmup_steps
from library.model.precision import PrecisionPlan, plan_precision, save_dtype
from library.train.run_report import StepTimer, build_report, peak_memory, write_report
from library.train.accelerate_compat import allow_fp16_gradients, reset_accelerator_state
from library.train.ema import LoRAEMA
from library.errors import OutputInUseError
from library.files.finite import NonFiniteSteps, group_gradient_norms, non_finite_source
from library.train.interrupts import (NOTHING_SAVED, Phase, TrainingInterrupted, interrupts_deferred, sigterm_interrupts,
                                signal_name)
from library.files.run_lock import output_lock
from library.train.saving import LoRASaver, output_file_pattern
from library.train.trackers import log_sample_images, run_hparams, store_run_config
from library.files.stale_files import remove_stale_temp_files
from library.train.validation import (ValidationSet, build_validation_set, scan_validation_dir, split_records,
                                validation_logs, validation_loss, validation_metadata)
from library.train.train_state import RngSnapshot, TrainProgress, load_state, save_state
from library.data.text_encoder_cache import (CachedTextDataset, TextEncoderCache, cache_text_encoder_outputs,
                                        collate_with_text_outputs)
from library.model.text_encoding import encode_captions, time_ids
from networks.lora import ParamGroupInfo



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
    report_path: Path | None = None
    """`<output_name>_report.json` (step time, throughput, peak memory, precision), main process only."""
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss/validation) of every evaluation of this run."""


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
    timer: StepTimer = field(default_factory=StepTimer)
    rng_at_step: RngSnapshot | None = None
    """Every RNG as the last finished optimizer step left it (what Ctrl-C saves)."""
    ema: LoRAEMA | None = None
    non_finite: NonFiniteSteps = field(default_factory=NonFiniteSteps)
    """Steps skipped for a NaN/inf loss or gradient, and how many may be (--max_nan_steps)."""
    validation: ValidationSource | None = None
    last_validated_step: int | None = None
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, validation loss) of every evaluation."""


@dataclass(frozen=True)
class ValidationSource:
    """The held-out batches, and their cached text-encoder outputs when training uses that cache."""

    validation: ValidationSet
    text_cache: TextEncoderCache | None

    def batches(self):
        return self.validation.iter_batches(*example_source(self.validation.dataset, self.text_cache))


def split_validation(cfg: TrainConfig) -> tuple[list, ValidationSet | None]:
    """The training records and the validation set (a split of them, or --validation_data_dir's images)."""
    records = scan_train_data_dir(cfg.data)
    val_cfg = cfg.validation
    if val_cfg is None or not val_cfg.enabled:
        return records, None
    if val_cfg.split > 0:
        records, held_out = split_records(records, val_cfg.split, val_cfg.seed)
    else:
        held_out = scan_validation_dir(cfg.data, val_cfg.data_dir)
    return records, build_validation_set(held_out, cfg.data, cfg.loop.batch_size, val_cfg.seed, val_cfg.max_steps)


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
    """accelerate with the precision this device can run; fallbacks and what runs are printed once."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_precision(cfg.precision.request, device_type)
    out = cfg.output
    run_dir = None
    if out.logging_dir is not None:
        run_dir = out.logging_dir / f"{out.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
    reset_accelerator_state()  # each run in this process (tests, sweeps) sets its own mixed precision
    # Gradient accumulation is run by the loop (groups never span epochs, so a resumed run lines up exactly).
    accelerator = Accelerator(
        mixed_precision=plan.mixed_precision,
        log_with=list(out.log_with) or None,
        project_dir=str(run_dir) if run_dir is not None else None,
    )
    for note in (*plan.notes, *loss_option_warnings(cfg.loss)):
        accelerator.print(f"warning: {note}")
    accelerator.print(plan.describe(str(accelerator.device), accelerator.num_processes)
                      + f", gradient checkpointing={'on' if cfg.precision.gradient_checkpointing else 'off'}")
    return accelerator, plan


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
    sampler = BucketBatchSampler(dataset, loop.batch_size, loop.seed,
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    source, collate = example_source(dataset, text_cache)
    workers = loop.max_data_loader_n_workers
    # Its own generator: creating an epoch's iterator must not draw from the global RNG (the noise's), or a
    # resumed run would drift from an uninterrupted one.
    loader = DataLoader(source, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                        persistent_workers=loop.persistent_data_loader_workers and workers > 0,
                        generator=torch.Generator().manual_seed(loop.seed))
    return loader, sampler


def cache_text_conditioning(
    dataset: TrainDataset, models: SDXLModels, loop: LoopConfig, plan: PrecisionPlan, accelerator: Accelerator,
    model_id: str,
) -> TextEncoderCache:
    """Encode every image's caption (variants) once (the caller then releases the text encoders).

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
    return cache


def plan_schedule(loop: LoopConfig, batches_per_epoch: int) -> Schedule:
    total = total_training_steps(loop.max_train_steps, loop.max_train_epochs, batches_per_epoch,
                                 loop.gradient_accumulation_steps)
    steps_per_epoch = math.ceil(batches_per_epoch / loop.gradient_accumulation_steps)
    return Schedule(batches_per_epoch, total, math.ceil(total / steps_per_epoch))


def batch_loss(
    batch: dict, models: SDXLModels, encode: Encoder | None, noise_scheduler, plan: PrecisionPlan,
    train_text_encoder: bool, accelerator: Accelerator, max_token_length: int = 75,
    loss_options: LossOptions = LossOptions(), timesteps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
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
    noised = noise_batch(noise_scheduler, latents, loss_options, timesteps=timesteps, generator=generator)
    with accelerator.autocast():
        prediction = models.unet(noised.noisy.to(plan.compute_dtype), noised.timesteps, context,
                                 added_cond_kwargs=added).sample
    return diffusion_loss(prediction, noised, batch["loss_weights"], noise_scheduler, loss_options)


def average_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Mean of the LoRA gradients over processes. The adapters run inside the base model's forward,
    not the network's, so a DDP wrapper around the network would never see a forward to sync on."""
    if accelerator.num_processes == 1:
        return
    for param in params:
        if param.grad is not None:
            param.grad.copy_(accelerator.reduce(param.grad, reduction="mean"))


def train(cfg: TrainConfig) -> TrainResult:
    """The whole run. Throughout, SIGTERM takes Ctrl-C's path; from the data check on, the main process holds
    `<output_name>.lock`, so a second run cannot write the same files. An interrupt in the training loop saves the
    LoRA and state of the last finished step, one before it saves nothing; both raise `TrainingInterrupted` (a
    KeyboardInterrupt)."""
    started_at = time.time()
    phase = Phase()
    with sigterm_interrupts(), contextlib.ExitStack() as run_scope:
        try:
            return run_training(cfg, started_at, phase, run_scope)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt as interrupt:
            raise TrainingInterrupted.during(phase, interrupt, process_state().is_main_process) from None


def process_state() -> PartialState:
    """accelerate's process state (rank, process count) as the Accelerator made later will have it: made now with
    the same `ACCELERATE_USE_CPU` reading as accelerate's own, or several CPU processes would each be rank 0."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


@contextlib.contextmanager
def held_output(out: OutputConfig, state: PartialState):
    """The main process holds `<output_dir>/<output_name>.lock` for the body; when another live run holds it,
    every process stops with the same OutputInUseError line."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if state.is_main_process:
            try:
                stack.enter_context(output_lock(out.output_dir, out.output_name))
            except OutputInUseError as error:
                refusal = str(error)
            else:  # holding the lock, and only then: clear what a killed run of this output left (temporary files)
                remove_stale_temp_files(out.output_dir, output_file_pattern(out.output_name))
        if state.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise OutputInUseError(refusal)
        yield


def run_training(cfg: TrainConfig, started_at: float, phase: Phase, run_scope: contextlib.ExitStack) -> TrainResult:
    """Set-up, the loop and the final files; `phase` says what is going on, for the line an interrupt prints;
    `run_scope` holds the output lock until the run ends, however it ends."""
    # Data first: a missing folder or broken image stops here, before any model loads.
    phase.enter("reading the training data")
    records, validation = split_validation(cfg)
    dataset = TrainDataset(records, cfg.data)
    # One run per output: a second run on the same --output_dir/--output_name stops here.
    run_scope.enter_context(held_output(cfg.output, process_state()))
    phase.enter("setting up the run")
    sampling = cfg.sampling
    accelerator, plan = make_accelerator(cfg)
    accelerator.print(dataset.bucket_report())
    set_seed(cfg.loop.seed)

    # Base model, frozen, loaded tensor by tensor straight into its storage dtype on the device; latents and,
    # UNet-only, text-encoder outputs cached once (then those models are released), or both encoded per batch.
    phase.enter("loading the model")
    load_started = time.perf_counter()
    models = load_sdxl(cfg.model.path, config_dir=cfg.model.config_dir, dtype=plan.weight_dtype,
                       device=accelerator.device, linear_weight_dtypes=plan.storage_dtypes(), vae_dtype=plan.vae_dtype)
    attention = prepare_base_models(models, plan, cfg.precision, cfg.network.train_text_encoder, accelerator.device)
    if attention != plan.attention:  # xformers failed on its first call: SDPA runs, and the report says so
        plan = replace(plan, attention=attention)
    load_seconds = time.perf_counter() - load_started
    encode: Encoder | None = vae_encoder(models.vae, accelerator.device)
    if cfg.loop.cache_latents:
        phase.enter("caching latents", NOTHING_SAVED + ("; the latents cached to disk so far are kept and reused"
                                                        if cfg.loop.cache_latents_to_disk else ""))
        for cached in (dataset, validation.dataset if validation is not None else None):
            if cached is not None:
                cache_latents(cached, encode, to_disk=cfg.loop.cache_latents_to_disk,
                              batch_size=cfg.loop.vae_batch_size, show_progress=accelerator.is_local_main_process,
                              vae_fingerprint=vae_fingerprint(models.vae))
        models.vae = release_model(models.vae, sampling is not None, cfg.precision.highvram, accelerator.device)
        encode = None
        free_memory(accelerator.device)
    phase.enter("hashing the model file")
    hashes = model_hashes(cfg.model.path)
    text_cache = None
    if cfg.loop.cache_text_encoder_outputs:
        phase.enter("caching text-encoder outputs",
                    NOTHING_SAVED + ("; the outputs cached to disk so far are kept and reused"
                                     if cfg.loop.cache_text_encoder_outputs_to_disk else ""))
        text_cache = cache_text_conditioning(dataset, models, cfg.loop, plan, accelerator, model_id=hashes[1])
    validation_source = None
    if validation is not None:
        validation_source = ValidationSource(validation, None if text_cache is None else cache_text_conditioning(
            validation.dataset, models, cfg.loop, plan, accelerator, model_id=hashes[1]))

    # LoRA network, optimizer groups (LoRA+), schedule.
    phase.enter("setting up the LoRA network")
    network = create_lora_network(cfg.network, models).to(accelerator.device, plan.lora_dtype)
    ema = None
    if cfg.ema is not None:
        ema = LoRAEMA(network, cfg.ema.decay, update_after_step=cfg.ema.update_after_step, warmup=cfg.ema.warmup)
    if text_cache is not None:  # the network is built (it names the text encoders' modules): release them
        models.text_encoder1 = release_model(models.text_encoder1, sampling is not None, cfg.precision.highvram,
                                             accelerator.device)
        models.text_encoder2 = release_model(models.text_encoder2, sampling is not None, cfg.precision.highvram,
                                             accelerator.device)
        free_memory(accelerator.device)
    opt = cfg.optimizer
    param_groups, descriptions = network.prepare_optimizer_params(opt.text_encoder_lr, opt.unet_lr, opt.learning_rate)
    group_infos = network.param_group_infos(opt.text_encoder_lr, opt.unet_lr, opt.learning_rate)
    optimizer = build_optimizer(opt.optimizer_type, param_groups, opt.learning_rate, opt.optimizer_args)
    accelerator.print(format_param_groups(group_infos, optimizer.param_groups[0].get("weight_decay")))
    loader, sampler = make_loader(dataset, cfg.loop, accelerator, text_cache)
    schedule = plan_schedule(cfg.loop, len(sampler))
    n = accelerator.num_processes  # accelerate steps a prepared scheduler once per process per optimizer step
    lr_scheduler = build_lr_scheduler(
        opt.lr_scheduler, optimizer, total_steps=schedule.total_steps * n,
        warmup=warmup_steps(opt.lr_warmup_steps, schedule.total_steps) * n,
        num_cycles=opt.lr_scheduler_num_cycles, power=opt.lr_scheduler_power,
        decay=decay_steps(opt.lr_decay_steps, schedule.total_steps) * n,
        min_lr_ratio=opt.lr_scheduler_min_lr_ratio, timescale=opt.lr_scheduler_timescale,
        scheduler_type=opt.lr_scheduler_type, scheduler_args=opt.lr_scheduler_args, initial_lr=opt.learning_rate,
    )
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    if plan.lora_dtype == torch.float16:
        allow_fp16_gradients(accelerator)

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
    if validation is not None:
        base_metadata.update(validation_metadata(cfg.validation))
        base_metadata["ss_num_validation_images"] = str(len(validation.dataset))
    saver = LoRASaver(cfg.output.output_dir, cfg.output.output_name, save_dtype(cfg.output.save_precision), ema=ema)
    if cfg.output.log_with:  # trackers, with the run's settings so runs can be compared
        accelerator.init_trackers(cfg.output.log_tracker_name or "network_train")
        hparams = run_hparams(cfg.network, opt, cfg.loop, plan.summary(), total_steps=schedule.total_steps,
                              num_epochs=schedule.num_epochs, num_train_images=dataset.num_train_images)
        metrics = ("loss/average", "loss/validation") if validation is not None else ("loss/average",)
        for problem in store_run_config(accelerator.trackers, hparams, metrics):
            accelerator.print(f"warning: {problem}")

    # Resume: optimizer, scheduler, RNG, LoRA weights and the position in the data come back from the state
    # folder, registered objects in a fixed order (the load must see them in the order they were saved).
    progress = TrainProgress()
    accelerator.register_for_checkpointing(network, progress, *([ema] if ema is not None else []))
    if cfg.output.resume is not None:
        load_state(accelerator, cfg.output.resume, progress)
        accelerator.print(f"resumed from {cfg.output.resume} at step {progress.step}, epoch {progress.epoch}")

    parts = TrainingParts(accelerator, plan, models, encode, network, optimizer, lr_scheduler, descriptions, loader,
                          sampler, schedule, saver, ema=ema, non_finite=NonFiniteSteps(cfg.loop.max_nan_steps),
                          validation=validation_source)
    phase.enter("training")  # an interrupt in the loop saves the last finished step (below)
    try:
        losses = run_loop(parts, cfg, base_metadata, progress)
    except KeyboardInterrupt as interrupt:
        phase.enter(f"saving step {progress.step} after an interrupt",
                    "files being written were left as they were (writes are atomic); checkpoints saved before are "
                    "kept")
        lora_path, state_path, step = save_interrupted(parts, cfg, base_metadata, progress)
        raise TrainingInterrupted(lora_path, state_path, step, signal_name=signal_name(interrupt),
                                  is_main_process=accelerator.is_main_process) from None
    epochs_done = progress.epoch - 1 if progress.steps_in_epoch == 0 else progress.epoch
    final_path, report_path = saver.final_path, None
    final_metadata = progress_metadata(base_metadata, steps=progress.step, epoch=epochs_done, finished=True)
    phase.enter("writing the final LoRA", "the checkpoints saved before are kept; no final LoRA was written")
    if accelerator.is_main_process:
        final_path = saver.save_final(network, final_metadata)
    phase.enter("writing the final files", f"the final LoRA was written to {final_path}")
    if accelerator.is_main_process:  # it describes the final file: a run that stops before it leaves the earlier one
        saver.save_param_groups(group_infos, inner.param_groups[0].get("weight_decay"))
    if cfg.output.save_state or cfg.output.save_state_on_train_end:
        accelerator.print(f"saved {save_run_state(parts, saver.state_path(saver.final_path), progress)}")
    if parts.non_finite.skipped:
        accelerator.print(f"warning: {len(parts.non_finite.skipped)} steps had a NaN/inf loss or gradients and were "
                          f"skipped (--max_nan_steps {cfg.loop.max_nan_steps}): steps {parts.non_finite.skipped}")
    if accelerator.is_main_process:
        report = run_report(parts, cfg, steps=progress.step, epochs=epochs_done, load_seconds=load_seconds,
                            total_seconds=time.time() - started_at)
        report_path = write_report(saver.report_path, report)
        for warning in report["warnings"]:
            accelerator.print(f"warning: {warning}")
    accelerator.end_training()
    return TrainResult(final_path, saver.saved, progress.step, epochs_done, losses, accelerator.is_main_process,
                       report_path, parts.validation_losses)


def save_interrupted(parts: TrainingParts, cfg: TrainConfig, base_metadata: dict[str, str],
                     progress: TrainProgress) -> tuple[Path | None, Path | None, int]:
    """Save the LoRA and a state as of the last finished optimizer step (the half-done step's gradients are
    dropped and the RNG is put back to where that step left it), so `--resume` continues exactly."""
    accelerator, saver = parts.accelerator, parts.saver
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.rng_at_step is not None:
        parts.rng_at_step.restore()
    lora_path = state_path = None
    if accelerator.is_main_process:
        metadata = progress_metadata(base_metadata, steps=progress.step, epoch=progress.epoch, finished=False)
        lora_path = saver.save_step(parts.network, metadata, progress.step)
    if accelerator.num_processes == 1:  # with several processes the ranks may not all reach the save
        state_path = save_run_state(parts, saver.state_path(saver.step_path(progress.step)), progress)
    return lora_path, state_path, progress.step


def save_run_state(parts: TrainingParts, folder: Path, progress: TrainProgress) -> Path:
    """`save_state` of what this run trains: the weights, the optimizer state and the EMA are checked first, so a
    state holding a NaN or infinity is refused (NonFiniteError) and never replaces a good one."""
    optimizer_tensors = ((f"optimizer state {key} of parameter {index}", value)
                         for index, state in enumerate(parts.optimizer.state.values()) for key, value in state.items())
    ema_tensors = parts.ema.shadow.items() if parts.ema is not None else ()
    return save_state(parts.accelerator, folder, progress,
                      check=[*parts.network.state_dict().items(), *optimizer_tensors, *ema_tensors])


def run_report(
    parts: TrainingParts, cfg: TrainConfig, steps: int, epochs: int, load_seconds: float, total_seconds: float
) -> dict:
    """The content of `<output_name>_report.json`: what the run cost and what actually ran."""
    accelerator, plan = parts.accelerator, parts.plan
    loop = cfg.loop
    samples_per_step = loop.batch_size * loop.gradient_accumulation_steps * accelerator.num_processes
    extra = {
        "attention": plan.attention,
        "gradient_checkpointing": cfg.precision.gradient_checkpointing,
        "device": str(accelerator.device),
        "processes": accelerator.num_processes,
        "steps": steps,
        "epochs": epochs,
        "cached_latents": loop.cache_latents,
        "cached_text_encoder_outputs": loop.cache_text_encoder_outputs,
        "non_finite_steps_skipped": len(parts.non_finite.skipped),
        "load_seconds": round(load_seconds, 3),
        "total_seconds": round(total_seconds, 3),
    }
    return build_report(parts.timer, samples_per_step, peak_memory(accelerator.device), plan.summary(), extra)


def maybe_validate(parts: TrainingParts, cfg: TrainConfig, noise_scheduler, step: int, epoch_end: int | None,
                   train_average: float) -> float | None:
    """The validation loss when due (fixed timesteps, noise and seeds: the same weights give the same number in
    any run), logged as `loss/validation`; every process computes it, so no reduce is needed."""
    if parts.validation is None or not cfg.validation.is_due(step, epoch_end) or parts.last_validated_step == step:
        return None
    accelerator = parts.accelerator

    def compute(batch, timesteps, generator):
        return batch_loss(batch, parts.models, parts.encode, noise_scheduler, parts.plan, False, accelerator,
                          cfg.loop.max_token_length, cfg.loss, timesteps=timesteps, generator=generator)

    was_training = parts.network.training
    parts.network.eval()  # no LoRA dropout
    try:
        loss = validation_loss(parts.validation.batches(), compute, timesteps=cfg.validation.timesteps,
                               seed=cfg.validation.seed, device=accelerator.device)
    finally:
        parts.network.train(was_training)
    parts.last_validated_step = step
    parts.validation_losses.append((step, loss))
    accelerator.log(validation_logs(loss, train_average), step=step)
    parts.timer.restart()  # validating is not a step
    return loss


def maybe_sample(parts: TrainingParts, cfg: TrainConfig, step: int, epoch: int | None) -> None:
    """Render the sample prompts when they are due (main process), log them to every tracker that takes images,
    and keep the time out of the step timings. Sampling restores every RNG state, so it never changes the run."""
    sampling, accelerator = cfg.sampling, parts.accelerator
    if sampling is None or not sampling.due(step, epoch):
        return
    if accelerator.is_main_process:
        from library.train.sampling import images_for_tracker, sample_images

        paths = sample_images(parts.models, sampling.prompts, sampler_name=sampling.sampler,
                              device=accelerator.device, compute_dtype=parts.plan.compute_dtype,
                              output_dir=cfg.output.output_dir, output_name=cfg.output.output_name, step=step,
                              epoch=epoch, max_token_length=cfg.loop.max_token_length, seed_base=cfg.loop.seed,
                              network=parts.network)
        if accelerator.trackers:
            images = [(f"sample_{p.index}", image) for p, image in zip(sampling.prompts, images_for_tracker(paths))]
            for problem in log_sample_images(accelerator.trackers, images, step):
                accelerator.print(f"warning: {problem}")
    accelerator.wait_for_everyone()
    parts.timer.restart()


def run_loop(parts: TrainingParts, cfg: TrainConfig, base_metadata: dict[str, str],
             progress: TrainProgress) -> list[float]:
    """Epochs of optimizer steps from `progress` on (0, or where a resumed state stood); returns the loss of
    every step run here. Each step accumulates `gradient_accumulation_steps` batches (fewer at an epoch's end).
    The progress bar is closed however the loop ends, so an error line starts a line of its own."""
    progress_bar = tqdm(total=parts.schedule.total_steps, initial=progress.step, desc="steps",
                        disable=not parts.accelerator.is_local_main_process)
    try:
        return _run_steps(parts, cfg, base_metadata, progress, progress_bar)
    finally:
        progress_bar.close()


def _run_steps(parts: TrainingParts, cfg: TrainConfig, base_metadata: dict[str, str], progress: TrainProgress,
               progress_bar: tqdm) -> list[float]:
    accelerator, network, sampler = parts.accelerator, parts.network, parts.sampler
    schedule, accumulation = parts.schedule, cfg.loop.gradient_accumulation_steps
    noise_scheduler = make_noise_scheduler(cfg.loss.zero_terminal_snr)
    params = network.get_trainable_params()
    losses: list[float] = []
    if progress.step == 0:
        maybe_sample(parts, cfg, 0, 0)
    parts.timer.restart()
    parts.rng_at_step = RngSnapshot.take()
    while progress.step < schedule.total_steps:
        epoch = progress.epoch
        sampler.set_epoch(epoch, skip_batches=progress.steps_in_epoch * accumulation)
        network.on_epoch_start(None, None)
        batches_left = len(sampler) - progress.steps_in_epoch * accumulation
        batches = iter(parts.loader)
        while batches_left > 0 and progress.step < schedule.total_steps:
            size = min(accumulation, batches_left)
            loss, finite = backward_step(parts, cfg, params, batches, size, noise_scheduler, progress.step + 1)
            # The update and the step's bookkeeping happen together or not at all: a Ctrl-C or SIGTERM arriving
            # here is raised after them, so the saved state never has the weights of one step and the position,
            # schedule or RNG of another.
            with interrupts_deferred():
                apply_update(parts, cfg, params, finite)
                batches_left -= size
                progress.step += 1
                progress.steps_in_epoch += 1
                if batches_left == 0:  # the epoch is done: a state saved now resumes at the next one
                    progress.epoch, progress.steps_in_epoch = epoch + 1, 0
                parts.timer.step_done()
                parts.rng_at_step = RngSnapshot.take()

            losses.append(loss)
            average = recent_average(losses)
            progress_bar.update(1)
            progress_bar.set_postfix(avr_loss=f"{average:.4f}")
            logs = {"loss": loss, "loss/average": average}
            logs.update({f"lr/{d}": float(lr) for d, lr in zip(parts.group_descriptions,
                                                                  parts.lr_scheduler.get_last_lr())})
            accelerator.log(logs, step=progress.step)
            maybe_validate(parts, cfg, noise_scheduler, progress.step, None, average)
            save_step_checkpoint(parts, cfg, base_metadata, progress)
            maybe_sample(parts, cfg, progress.step, None)
        if batches_left == 0:
            maybe_validate(parts, cfg, noise_scheduler, progress.step, epoch, recent_average(losses))
            save_epoch_checkpoint(parts, cfg, base_metadata, progress, epoch)
            maybe_sample(parts, cfg, progress.step, epoch)
    accelerator.wait_for_everyone()
    return losses


def recent_average(losses: list[float]) -> float:
    """The mean of the last 100 finite step losses (a skipped NaN step does not poison the average)."""
    finite = [loss for loss in losses[-100:] if math.isfinite(loss)]
    return sum(finite) / len(finite) if finite else float("nan")


def backward_step(parts: TrainingParts, cfg: TrainConfig, params: list[torch.nn.Parameter], batches, size: int,
                  noise_scheduler, step: int) -> tuple[float, bool]:
    """Forward and backward `size` batches (the loss averaged over them) and the cross-process gradient average;
    returns the mean loss over batches and processes, and whether the update may be applied.

    Step `step`'s loss and then each optimizer group's gradient norm (after the average, so every process decides
    alike) must be finite; if not, the step is skipped under --max_nan_steps (a warning line) or the run stops
    (NonFiniteError). One host sync covers the loss and the norms."""
    accelerator = parts.accelerator
    total = torch.zeros((), device=accelerator.device)
    for _ in range(size):
        loss = batch_loss(next(batches), parts.models, parts.encode, noise_scheduler, parts.plan,
                          cfg.network.train_text_encoder, accelerator, cfg.loop.max_token_length, cfg.loss)
        accelerator.backward(loss / size)
        total += loss.detach()
    mean_loss = accelerator.reduce(total / size, reduction="mean").float().reshape(1)
    average_gradients(params, accelerator)
    # Under fp16 loss scaling inf gradients are the GradScaler's to handle: it skips the step and lowers its scale.
    check_gradients = getattr(accelerator, "scaler", None) is None
    checked = [mean_loss, group_gradient_norms(parts.optimizer.param_groups).to(mean_loss.device)] \
        if check_gradients else [mean_loss]
    values = torch.cat(checked).tolist()
    source = non_finite_source(values[0], values[1:] if check_gradients else None, parts.group_descriptions)
    if source is not None:
        accelerator.print(parts.non_finite.skip_or_stop(step, source))
    return values[0], source is None


def apply_update(parts: TrainingParts, cfg: TrainConfig, params: list[torch.nn.Parameter], finite: bool) -> None:
    """One clipped optimizer step, one scheduler step, the EMA. A skipped (non-finite) step drops its gradients
    and only steps the scheduler, so the schedule keeps its length."""
    if not finite:
        parts.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when a scheduler steps before the first optimizer step
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            parts.lr_scheduler.step()
        return
    if cfg.optimizer.max_grad_norm > 0:
        parts.accelerator.clip_grad_norm_(params, cfg.optimizer.max_grad_norm)
    parts.optimizer.step()
    parts.lr_scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.ema is not None:
        parts.ema.update()


def save_step_checkpoint(parts: TrainingParts, cfg: TrainConfig, base_metadata: dict[str, str],
                         progress: TrainProgress) -> None:
    """--save_every_n_steps: `<name>-step<N>.safetensors` (+ state with --save_state), then rotation."""
    out, saver, accelerator = cfg.output, parts.saver, parts.accelerator
    every = out.save_every_n_steps
    if not every or progress.step % every or progress.step >= parts.schedule.total_steps:
        return
    if accelerator.is_main_process:
        metadata = progress_metadata(base_metadata, steps=progress.step, epoch=progress.epoch, finished=False)
        accelerator.print(f"saved {saver.save_step(parts.network, metadata, progress.step)}")
        saver.remove_files(saver.old_step_paths(progress.step, every, out.save_last_n_steps))
    if out.save_state:
        save_run_state(parts, saver.state_path(saver.step_path(progress.step)), progress)
        if accelerator.is_main_process:
            saver.remove_states(saver.old_step_paths(progress.step, every, out.save_last_n_steps_state))
    accelerator.wait_for_everyone()
    parts.timer.restart()  # saving is not a step


def save_epoch_checkpoint(parts: TrainingParts, cfg: TrainConfig, base_metadata: dict[str, str],
                          progress: TrainProgress, epoch: int) -> None:
    """--save_every_n_epochs: `<name>-<epoch>.safetensors` (+ state with --save_state), then rotation; the
    last epoch's weights are the final file instead."""
    out, saver, accelerator = cfg.output, parts.saver, parts.accelerator
    every = out.save_every_n_epochs
    accelerator.wait_for_everyone()
    if not every or epoch % every or epoch >= parts.schedule.num_epochs:
        return
    if accelerator.is_main_process:
        metadata = progress_metadata(base_metadata, steps=progress.step, epoch=epoch, finished=False)
        accelerator.print(f"saved {saver.save_epoch(parts.network, metadata, epoch)}")
        saver.remove_files(saver.old_epoch_paths(epoch, every, out.save_last_n_epochs))
    if out.save_state:
        save_run_state(parts, saver.state_path(saver.epoch_path(epoch)), progress)
        if accelerator.is_main_process:
            saver.remove_states(saver.old_epoch_paths(epoch, every, out.save_last_n_epochs_state))
    accelerator.wait_for_everyone()
    parts.timer.restart()  # saving is not a step
