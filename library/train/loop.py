"""The training loop: epochs of optimizer steps, and what follows each step (logs, validation, checkpoints,
samples, the caller's `on_step`). It reads the fixed `RunParts` and changes only the `LoopState`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from library.train.checkpoints import save_epoch_checkpoint, save_step_checkpoint
from library.train.interrupts import interrupts_deferred
from library.train.parts import LoopState, RunParts
from library.train.process_group import StopAgreement
from library.train.report_files import write_report_files
from library.train.run_config import LoopConfig, OutputConfig, TrainConfig
from library.train.run_report import StepTimer, reset_cuda_peak
from library.train.sampling import SamplingConfig
from library.train.step import apply_update, backward_step, batch_loss
from library.train.trackers import log_sample_images
from library.train.train_state import RngSnapshot
from library.train.validation import ValidationConfig, mean_validation_loss, validation_logs, validation_losses


@dataclass(frozen=True)
class StepInfo:
    """One finished optimizer step, as `train(cfg, on_step=...)` hands it to the caller."""

    step: int
    """Optimizer steps done (this step's number, 1-based)."""
    epoch: int
    """The epoch this step belongs to (1-based)."""
    loss: float
    """Mean loss over the step's batches and processes (NaN/inf for a step skipped under --max_nan_steps)."""
    lrs: Mapping[str, float]
    """The learning rate each optimizer group ran this step with, by sd-scripts' description ("unet plus", ...)."""
    validation_loss: float | None = None
    """`loss/validation` when it was computed after this step (or at the end of its epoch), else None."""
    skipped: bool = False
    """A non-finite step skipped under --max_nan_steps: no update was applied."""


OnStep = Callable[[StepInfo], None]


def run_loop(
    cfg: TrainConfig,
    parts: RunParts,
    state: LoopState,
    on_step: OnStep | None = None,
    *,
    stops: StopAgreement | None = None,
) -> None:
    """Epochs of optimizer steps from `state.progress` on (0, or where a resumed state stood); each step's loss
    and learning rates go to `state`. `stops` (several processes): before each batch the processes agree whether
    to stop (a Ctrl-C or SIGTERM noted by any of them raises in all). The progress bar is closed however the loop
    ends, so an error line starts a line of its own."""
    progress_bar = tqdm(
        total=parts.schedule.total_steps,
        initial=state.progress.step,
        desc="steps",
        disable=not parts.accelerator.is_local_main_process,
    )
    try:
        _run_steps(cfg, parts, state, on_step, progress_bar, stops)
    finally:
        progress_bar.close()


def _run_steps(
    cfg: TrainConfig,
    parts: RunParts,
    state: LoopState,
    on_step: OnStep | None,
    progress_bar: tqdm,
    stops: StopAgreement | None,
) -> None:
    accelerator, progress, schedule = parts.accelerator, state.progress, parts.schedule
    accumulation = cfg.loop.gradient_accumulation_steps
    params = parts.network.get_trainable_params()
    # Samples before the first step (--sample_at_first), then the clock, the GPU memory peak and the RNG snapshot start.
    if progress.step == 0:
        maybe_sample(cfg.sampling, cfg.output, cfg.loop, parts, state.timer, step=0, epoch=0)
    state.timer.restart()
    reset_cuda_peak(accelerator.device)
    state.rng_at_step = RngSnapshot.take()
    while progress.step < schedule.total_steps:
        # An epoch: the sampler skips the batches a resumed state already consumed.
        epoch = progress.epoch
        parts.sampler.set_epoch(epoch, skip_batches=progress.steps_in_epoch * accumulation)
        parts.network.on_epoch_start(None, None)
        batches_left = len(parts.sampler) - progress.steps_in_epoch * accumulation
        batches = iter(parts.loader) if stops is None else stops.checked(iter(parts.loader))
        while batches_left > 0 and progress.step < schedule.total_steps:
            # Forward and backward of `accumulation` batches (fewer at an epoch's end), with the NaN guard; the rates
            # this step runs with (the scheduler stepped at the end of the previous one).
            size = min(accumulation, batches_left)
            lrs = dict(zip(parts.group_descriptions, map(float, parts.lr_scheduler.get_last_lr())))
            loss, finite = backward_step(
                parts,
                params,
                batches,
                size,
                step=progress.step + 1,
                train_text_encoder=cfg.network.train_text_encoder,
                non_finite=state.non_finite,
            )
            # The update and the step's bookkeeping happen together or not at all: a Ctrl-C or SIGTERM arriving
            # here is raised after them, so the saved state never has the weights of one step and the position,
            # schedule or RNG of another.
            with interrupts_deferred():
                apply_update(parts, params, finite=finite, max_grad_norm=cfg.optimizer.max_grad_norm)
                batches_left -= size
                progress.step += 1
                progress.steps_in_epoch += 1
                if batches_left == 0:  # the epoch is done: a state saved now resumes at the next one
                    progress.epoch, progress.steps_in_epoch = epoch + 1, 0
                state.timer.step_done()
                state.rng_at_step = RngSnapshot.take()
                state.losses.append(loss)  # with the step, so the report's lists never differ in length
                state.lrs.append(lrs)
                diagnostics = step_diagnostics(state, progress.step)  # of these weights, even if a Ctrl-C follows

            # Logs: the loss, its running average and each group's rate as sd-scripts logs it (after this step's
            # scheduler step), and the LoRA+ diagnostics when due.
            average = recent_average(state.losses)
            progress_bar.update(1)
            progress_bar.set_postfix(avr_loss=f"{average:.4f}")
            logs = {"loss": loss, "loss/average": average}
            logs.update(
                {f"lr/{d}": float(lr) for d, lr in zip(parts.group_descriptions, parts.lr_scheduler.get_last_lr())}
            )
            logs.update(diagnostics)
            accelerator.log(logs, step=progress.step)
            # Validation, checkpoint and samples when due (and at an epoch's end those of the epoch), then the caller.
            validation = after_step(
                cfg, parts, state, train_average=average, epoch_end=epoch if batches_left == 0 else None
            )
            if on_step is not None:
                on_step(StepInfo(progress.step, epoch, loss, MappingProxyType(lrs), validation, skipped=not finite))
                state.timer.restart()  # the caller's time is not a step's
    accelerator.wait_for_everyone()


def after_step(
    cfg: TrainConfig, parts: RunParts, state: LoopState, *, train_average: float, epoch_end: int | None
) -> float | None:
    """What follows an optimizer step, in this order: validation, step checkpoint, samples; after the last step
    of epoch `epoch_end` the same for the epoch; then, when a checkpoint was saved, the run report (so the page
    shows that step's samples). Returns the validation loss when one was computed."""
    step, timer = state.progress.step, state.timer
    validation = maybe_validate(cfg.validation, parts, state, step=step, epoch_end=None, train_average=train_average)
    saved = save_step_checkpoint(cfg.output, parts, state.progress, timer)
    maybe_sample(cfg.sampling, cfg.output, cfg.loop, parts, timer, step=step, epoch=None)
    if epoch_end is not None:
        at_epoch_end = maybe_validate(
            cfg.validation, parts, state, step=step, epoch_end=epoch_end, train_average=train_average
        )
        saved = save_epoch_checkpoint(cfg.output, parts, state.progress, timer, epoch=epoch_end) or saved
        maybe_sample(cfg.sampling, cfg.output, cfg.loop, parts, timer, step=step, epoch=epoch_end)
        validation = at_epoch_end if at_epoch_end is not None else validation
    if saved:
        write_report_files(cfg, parts, state)
        timer.restart()  # writing the report is not a step
    return validation


def step_diagnostics(state: LoopState, step: int) -> dict[str, float]:
    """The LoRA+ diagnostics of `step` when due (kept in `state.diagnostic_values` for the report), else none."""
    values = state.diagnostics.after_step(step) if state.diagnostics is not None else None
    if values is None:
        return {}
    state.diagnostic_values.append((step, values))
    return values


def recent_average(losses: list[float]) -> float:
    """The mean of the last 100 finite step losses (a skipped NaN step does not poison the average)."""
    finite = [loss for loss in losses[-100:] if math.isfinite(loss)]
    return sum(finite) / len(finite) if finite else float("nan")


def maybe_validate(
    val_cfg: ValidationConfig | None,
    parts: RunParts,
    state: LoopState,
    *,
    step: int,
    epoch_end: int | None,
    train_average: float,
) -> float | None:
    """The validation loss when due (fixed timesteps, noise and seeds: the same weights give the same number in
    any run), logged as `loss/validation` and kept in `state.validation_losses`. Each process computes its share
    of the batches and every process gets the same mean, the number one process would get. Its time is not a
    step's."""
    if parts.validation is None or val_cfg is None or not val_cfg.is_due(step, epoch_end) or state.validated_at(step):
        return None

    def compute(batch, timesteps, generator):
        return batch_loss(batch, parts.loss, timesteps=timesteps, generator=generator)

    was_training = parts.network.training
    parts.network.eval()  # no LoRA dropout
    accelerator = parts.accelerator
    try:
        items = validation_losses(
            parts.validation.share(accelerator.process_index, accelerator.num_processes),
            compute,
            timesteps=val_cfg.timesteps,
            seed=val_cfg.seed,
            device=accelerator.device,
        )
    finally:
        parts.network.train(was_training)
    loss = mean_validation_loss(gather_object(items))  # every process's items (its own alone with one process)
    state.validation_losses.append((step, loss))
    parts.accelerator.log(validation_logs(loss, train_average), step=step)
    state.timer.restart()  # validating is not a step
    return loss


def maybe_sample(
    sampling: SamplingConfig | None,
    out: OutputConfig,
    loop: LoopConfig,
    parts: RunParts,
    timer: StepTimer,
    *,
    step: int,
    epoch: int | None,
) -> None:
    """Render the sample prompts when they are due into `out.output_dir`, log them to every tracker that takes
    images, and keep the time out of the step timings. Sampling restores every RNG state, so it never changes the
    run.

    With several processes the prompts are shared out as sd-scripts shares them (process i renders prompts i,
    i + N, ...): each image is made and written once, by one process, under its own name; the main process then
    logs them all. The processes wait for each other at most one image's time, not the whole set's."""
    accelerator = parts.accelerator
    if sampling is None or not sampling.due(step, epoch):
        return
    from library.train.sampling import images_for_tracker, sample_images

    mine = sampling.prompts[accelerator.process_index :: accelerator.num_processes]
    paths = []
    if mine:  # more processes than prompts: some have none
        paths = sample_images(
            parts.models,
            mine,
            sampler_name=sampling.sampler,
            device=accelerator.device,
            compute_dtype=parts.plan.compute_dtype,
            output_dir=out.output_dir,
            output_name=out.output_name,
            step=step,
            epoch=epoch,
            max_token_length=loop.max_token_length,
            seed_base=loop.seed,
            network=parts.network,
        )
    made = [(prompt.index, str(path)) for prompt, path in zip(mine, paths)]
    if accelerator.num_processes > 1:  # every process's images, for the main process's trackers (and a barrier)
        made = sorted(gather_object(made))
    if accelerator.is_main_process and accelerator.trackers:
        images = [
            (f"sample_{index}", image) for (index, _), image in zip(made, images_for_tracker([p for _, p in made]))
        ]
        for problem in log_sample_images(accelerator.trackers, images, step):
            accelerator.print(f"warning: {problem}")
    timer.restart()
