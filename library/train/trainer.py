"""The training recipe and its in-process API: `train(cfg, on_step=...) -> TrainResult`.

The recipe only orchestrates, in the spirit of torchtune: set-up (`library.train.setup_parts`, each part from
its slice of the config) builds the fixed `RunParts`, the loop (`library.train.loop`) runs the steps
(`library.train.step`) and writes checkpoints (`library.train.checkpoints`) while changing only the `LoopState`, and
the end writes the final files. Tools and sweeps may call `train` many times in one process: every call builds its
own parts and state (accelerate's process-wide state is reset per run), so runs do not leak into each other.

    from library.config.build import config_from_args
    from library.config.cli import build_parser
    from library.train.trainer import train

    cfg = config_from_args(build_parser().parse_args([...]))  # the one validated way to a config
    result = train(cfg, on_step=lambda info: print(info.step, info.loss, dict(info.lrs)))
    result.final_path, result.losses, result.lrs, result.validation_losses, result.report, result.param_groups
    result.report_page  # <output_name>_report.html: the run's curves, group lrs, diagnostics and samples
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env, set_seed

from library.data.dataset import TrainDataset
from library.errors import OutputInUseError
from library.files.finite import NonFiniteSteps
from library.files.run_lock import output_lock
from library.files.stale_files import remove_stale_temp_files
from library.model.base_models import loading_stages, vae_encoder
from library.model.loading import model_hashes
from library.model.precision import PrecisionPlan, plan_precision, save_dtype
from library.train.accelerate_compat import allow_fp16_gradients, reset_accelerator_state
from library.train.checkpoints import save_interrupted, save_run_state
from library.train.interrupts import Phase, TrainingInterrupted, noted_interrupts, signal_name, sigterm_interrupts
from library.train.loop import OnStep, StepInfo, run_loop
from library.train.loss import loss_option_warnings, make_noise_scheduler
from library.train.memory_phases import MemoryPhases
from library.train.metadata import progress_metadata
from library.train.parts import LoopState, LossParts, RunParts
from library.train.process_group import (
    StopAgreement,
    accelerator_available,
    init_kwargs,
    lost_process_error,
    release_process_group,
)
from library.train.report_files import earlier_history, report_basis, write_report_files
from library.train.run_config import OutputConfig, TrainConfig
from library.train.saving import LoRASaver, output_file_pattern
from library.train.setup_parts import (
    StagedLoad,
    cache_latents_once,
    cache_text_outputs,
    compile_for_loss,
    make_loader,
    plan_schedule,
    release_text_encoders,
    run_metadata,
    run_settings,
    seed_noise_per_process,
    setup_diagnostics,
    setup_lr_scheduler,
    setup_network,
    setup_optimizer,
    split_validation,
    start_trackers,
)
from library.train.train_state import TrainProgress, launched_processes, load_state
from networks.lora import ParamGroupInfo

__all__ = ["StepInfo", "TrainResult", "TrainingInterrupted", "train"]


@dataclass(frozen=True)
class TrainResult:
    """What a finished run gives its caller, so tools and sweeps need not parse logs. Per-step lists cover the
    steps run by this call (a resumed run's from where its state stood)."""

    final_path: Path
    saved_paths: list[Path]
    """Every LoRA (and EMA) file written, checkpoints included (rotation may have removed some since)."""
    steps: int
    epochs: int
    losses: list[float]
    """Loss of every optimizer step."""
    is_main_process: bool
    """Only the main process writes files (and reports them)."""
    report_path: Path | None = None
    """`<output_name>_report.json` (step time, throughput, peak memory, precision), main process only."""
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss/validation) of every evaluation of this run."""
    lrs: list[dict[str, float]] = field(default_factory=list)
    """The learning rate of every optimizer group (by description) each step ran with."""
    report: dict[str, Any] | None = None
    """The content of `report_path` (main process only)."""
    param_groups: list[ParamGroupInfo] = field(default_factory=list)
    """The optimizer's groups (LoRA+ base/plus, per block), as `<output_name>_param_groups.json` lists them."""
    report_page: Path | None = None
    """`<output_name>_report.html`, the run on one page (main process only; None when it could not be written)."""


def make_accelerator(cfg: TrainConfig) -> tuple[Accelerator, PrecisionPlan]:
    """accelerate with the precision this device can run; fallbacks and what runs are printed once. The device is
    accelerate's (the process state the Accelerator will share), not whether CUDA exists: `accelerate launch --cpu`
    on a GPU machine plans for the CPU."""
    plan = plan_precision(cfg.precision.request, process_state().device.type)
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
    accelerator.print(
        plan.describe(str(accelerator.device), accelerator.num_processes)
        + f", gradient checkpointing={'on' if cfg.precision.gradient_checkpointing else 'off'}"
    )
    return accelerator, plan


def train(cfg: TrainConfig, *, on_step: OnStep | None = None) -> TrainResult:
    """The whole run; `on_step` (every process) gets a `StepInfo` after each optimizer step and what followed it
    (validation, checkpoint, samples); an exception it raises stops the run as any error would.

    Throughout, SIGTERM takes Ctrl-C's path; from the data check on, the main process holds `<output_name>.lock`,
    so a second run cannot write the same files. An interrupt in the training loop saves the LoRA and state of the
    last finished step, one before it saves nothing; both raise `TrainingInterrupted` (a KeyboardInterrupt)."""
    started_at = time.time()
    phase = Phase()
    with sigterm_interrupts(), contextlib.ExitStack() as run_scope:
        try:
            return run_training(cfg, started_at, phase, run_scope, on_step)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt as interrupt:
            raise TrainingInterrupted.during(phase, interrupt, process_state().is_main_process) from None
        except Exception as error:  # several processes: another one was lost -> one line, not a traceback
            lost = lost_process_error(error)
            if lost is None:
                raise
            release_process_group()
            raise lost from None


def process_state(timeout_minutes: float | None = None) -> PartialState:
    """accelerate's process state (rank, process count) as the Accelerator made later will have it: made now with
    the same `ACCELERATE_USE_CPU` reading as accelerate's own, or several CPU processes would each be rank 0. The
    first call makes the process group, with the collective timeout (--ddp_timeout) it keeps for the run.

    Several processes on a machine without an accelerator (`accelerate launch --multi_gpu` or torchrun where no
    GPU is visible) are CPU processes over gloo too: accelerate would make each of them a single-process run of its
    own, all writing the same files."""
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (launched_processes() > 1 and not accelerator_available())
    return PartialState(cpu=cpu, **init_kwargs(timeout_minutes))


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


def run_training(
    cfg: TrainConfig, started_at: float, phase: Phase, run_scope: contextlib.ExitStack, on_step: OnStep | None
) -> TrainResult:
    """Set-up, the loop and the final files; `phase` says what is going on, for the line an interrupt prints;
    `run_scope` holds the output lock until the run ends, however it ends."""
    parts, state = set_up(cfg, started_at, phase, run_scope)
    # The loop; an interrupt in it saves the last finished step (several processes: all stop at one batch).
    phase.enter("training")
    parts.memory.enter("train")
    accelerator = parts.accelerator
    with noted_interrupts() if accelerator.num_processes > 1 else contextlib.nullcontext() as noted:
        stops = StopAgreement(accelerator, noted) if noted is not None else None
        try:
            run_loop(cfg, parts, state, on_step, stops=stops)
        except KeyboardInterrupt as interrupt:
            phase.enter(
                f"saving step {state.progress.step} after an interrupt",
                "files being written were left as they were (writes are atomic); checkpoints saved before are kept",
            )
            lora_path, state_path, step = save_interrupted(parts, state.progress, state.rng_at_step)
            report_after_interrupt(cfg, parts, state)
            raise TrainingInterrupted(
                lora_path,
                state_path,
                step,
                signal_name=signal_name(interrupt),
                is_main_process=accelerator.is_main_process,
                num_processes=accelerator.num_processes,
            ) from None
    return finish(cfg, parts, state, phase)


def report_after_interrupt(cfg: TrainConfig, parts: RunParts, state: LoopState) -> None:
    """The run report as the interrupt left it (its history is what a resume continues); a second Ctrl-C stops
    only this, so the lines saying what was saved and how to go on are still printed."""
    try:
        write_report_files(cfg, parts, state)
    except KeyboardInterrupt:
        parts.accelerator.print("warning: the run report was not brought up to date (interrupted again)")


def set_up(
    cfg: TrainConfig, started_at: float, phase: Phase, run_scope: contextlib.ExitStack
) -> tuple[RunParts, LoopState]:
    """The run's fixed parts and its loop state (resumed when --resume is given)."""
    memory = MemoryPhases()  # the peak RAM of each phase, for the run report
    memory.enter("start")
    # Data first: a missing folder or broken image stops here, before any model loads.
    phase.enter("reading the training data")
    records, validation = split_validation(cfg.data, cfg.validation, cfg.loop.batch_size)
    dataset = TrainDataset(records, cfg.data)
    # One run per output: a second run on the same --output_dir/--output_name stops here.
    run_scope.enter_context(held_output(cfg.output, process_state(cfg.loop.ddp_timeout_minutes)))
    phase.enter("setting up the run")
    accelerator, plan = make_accelerator(cfg)
    accelerator.print(dataset.bucket_report())
    set_seed(cfg.loop.seed)
    sampling, highvram, device = cfg.sampling is not None, cfg.precision.highvram, accelerator.device

    # Base model, frozen, loaded in stages (`loading_stages`): the VAE and text encoders whose outputs are cached
    # are loaded just before their caching step and released right after it (kept for samples), so they are never
    # resident with the UNet; the UNet and what the steps still encode with load last (all at once when nothing
    # is cached). The first load checks every component against the file, so a misfit fails before any caching.
    stages = loading_stages(
        cache_latents=cfg.loop.cache_latents, cache_text_encoder_outputs=cfg.loop.cache_text_encoder_outputs
    )
    base = StagedLoad(cfg.model, cfg.precision, plan, accelerator, cfg.network.train_text_encoder, memory, phase)
    models = base.load(stages.for_latents)
    held_out = [validation.dataset] if validation is not None else []
    if cfg.loop.cache_latents:
        memory.enter("cache", "latents")
        cache_latents_once(
            cfg.loop, [dataset, *held_out], models, accelerator, keep_vae=sampling, highvram=highvram, phase=phase
        )
    phase.enter("hashing the model file")
    hashes = model_hashes(cfg.model.path)
    base.load(stages.for_text)
    if cfg.loop.cache_text_encoder_outputs:
        memory.enter("cache", "text-encoder outputs")
    text_cache, validation_source = cache_text_outputs(
        cfg.loop, dataset, validation, models, plan, accelerator, model_id=hashes[1], phase=phase
    )
    if text_cache is not None:  # the network is built from their structure (`text_encoder_structures`)
        release_text_encoders(models, keep=sampling, highvram=highvram, device=device)
    base.load(stages.for_training)
    if base.attention is not None and base.attention != plan.attention:  # xformers failed: SDPA runs, as reported
        plan = replace(plan, attention=base.attention)
    encode = None if cfg.loop.cache_latents else vae_encoder(models.vae, device)

    # LoRA network, optimizer groups (LoRA+), loader, schedule.
    phase.enter("setting up the LoRA network")
    memory.enter("set-up")
    if accelerator.num_processes > 1:  # caching shares drew different amounts of randomness on each process:
        set_seed(cfg.loop.seed)  # the LoRA's initial weights must be drawn alike everywhere (one process: unchanged)
    network, ema = setup_network(cfg.network, cfg.ema, models, plan, device)
    optimizer, groups = setup_optimizer(cfg.optimizer, network, accelerator)
    loader, sampler = make_loader(dataset, cfg.loop, accelerator, text_cache)
    schedule = plan_schedule(cfg.loop, len(sampler))
    lr_scheduler = setup_lr_scheduler(cfg.optimizer, optimizer, schedule, accelerator.num_processes)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    if plan.lora_dtype == torch.float16:
        allow_fp16_gradients(accelerator)

    # What every saved file says about this run; trackers with the run's settings.
    inner = getattr(optimizer, "optimizer", optimizer)
    base_metadata = run_metadata(
        cfg,
        dataset=dataset,
        validation=validation,
        hashes=hashes,
        groups=groups,
        schedule=schedule,
        plan=plan,
        started_at=started_at,
        optimizer_name=f"{type(inner).__module__}.{type(inner).__name__}",
    )
    saver = LoRASaver(cfg.output.output_dir, cfg.output.output_name, save_dtype(cfg.output.save_precision), ema=ema)
    settings = run_settings(cfg, plan, schedule, num_train_images=dataset.num_train_images)
    start_trackers(cfg.output, accelerator, settings, validating=validation is not None)

    # From here on each process draws its own noise and timesteps (the initial weights are drawn alike).
    seed_noise_per_process(cfg.loop.seed, accelerator.process_index)

    # Resume: optimizer, scheduler, RNG, LoRA weights and the position in the data come back from the state
    # folder, registered objects in a fixed order (the load must see them in the order they were saved).
    state = LoopState(TrainProgress(), NonFiniteSteps(cfg.loop.max_nan_steps))
    accelerator.register_for_checkpointing(network, state.progress, *([ema] if ema is not None else []))
    if cfg.output.resume is not None:
        load_state(accelerator, cfg.output.resume, state.progress)
        accelerator.print(
            f"resumed from {cfg.output.resume} at step {state.progress.step}, epoch {state.progress.epoch}"
        )
    # The LoRA+ diagnostics (from the step the run starts at) and what the run report holds besides the loop's lists.
    state.diagnostics = setup_diagnostics(cfg.output, network, groups, accelerator, start_step=state.progress.step)
    report = report_basis(
        cfg.sampling,
        settings,
        first_step=state.progress.step,
        started_at=started_at,
        load_seconds=base.seconds,
        earlier_history=resumed_history(cfg.output, saver, accelerator),
    )
    loss_models, compiled = compile_for_loss(
        cfg.compile, models, accelerator, train_text_encoder=cfg.network.train_text_encoder
    )
    loss = LossParts(
        loss_models,
        encode,
        make_noise_scheduler(cfg.loss.zero_terminal_snr),
        plan,
        accelerator,
        cfg.loop.max_token_length,
        cfg.loss,
        compiled=compiled,
    )
    parts = RunParts(
        accelerator,
        plan,
        models,
        loss,
        network,
        optimizer,
        lr_scheduler,
        groups,
        loader,
        sampler,
        schedule,
        saver,
        base_metadata,
        report,
        ema=ema,
        validation=validation_source,
        memory=memory,
    )
    return parts, state


def resumed_history(out: OutputConfig, saver: LoRASaver, accelerator: Accelerator) -> dict | None:
    """On a resume (main process), the history of the report the run continues: the one beside the state folder
    (the run that saved it), else this output's (a state moved elsewhere)."""
    if out.resume is None or not accelerator.is_main_process:
        return None
    history, problem = earlier_history([out.resume.parent / saver.report_path.name, saver.report_path])
    if problem is not None:
        accelerator.print(f"warning: {problem}")
    return history


def finish(cfg: TrainConfig, parts: RunParts, state: LoopState, phase: Phase) -> TrainResult:
    """The final LoRA (and state with --save_state / --save_state_on_train_end), the skipped-steps warning, the run
    report (JSON and page); then the trackers end."""
    accelerator, saver, progress = parts.accelerator, parts.saver, state.progress
    epochs_done = progress.epochs_run
    final_path = saver.final_path
    final_metadata = progress_metadata(parts.base_metadata, steps=progress.step, epoch=epochs_done, finished=True)
    phase.enter("writing the final LoRA", "the checkpoints saved before are kept; no final LoRA was written")
    if accelerator.is_main_process:
        final_path = saver.save_final(parts.network, final_metadata)
    phase.enter("writing the final files", f"the final LoRA was written to {final_path}")
    if accelerator.is_main_process:  # it describes the final file: a run that stops before it leaves the earlier one
        saver.save_param_groups(parts.groups, parts.optimizer.param_groups[0].get("weight_decay"))
    if cfg.output.save_state or cfg.output.save_state_on_train_end:
        accelerator.print(f"saved {save_run_state(parts, saver.state_path(saver.final_path), progress)}")
    skipped = state.non_finite.skipped
    if skipped:
        accelerator.print(
            f"warning: {len(skipped)} steps had a NaN/inf loss or gradients and were "
            f"skipped (--max_nan_steps {cfg.loop.max_nan_steps}): steps {skipped}"
        )
    report, page = write_report_files(cfg, parts, state)
    for warning in report["warnings"] if report is not None else ():
        accelerator.print(f"warning: {warning}")
    accelerator.end_training()
    return TrainResult(
        final_path,
        list(saver.saved),
        progress.step,
        epochs_done,
        list(state.losses),
        accelerator.is_main_process,
        saver.report_path if report is not None else None,
        list(state.validation_losses),
        lrs=[dict(lrs) for lrs in state.lrs],
        report=report,
        param_groups=list(parts.groups),
        report_page=page,
    )
