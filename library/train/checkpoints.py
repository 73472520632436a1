"""What the run writes while it trains: step and epoch checkpoints (LoRA, state, rotation), and the save of an
interrupted run. File names, atomic writing and rotation are `library.train.saving`'s; the final files are the
recipe's (`library.train.trainer`)."""

from __future__ import annotations

from pathlib import Path

from library.train.metadata import progress_metadata
from library.train.parts import RunParts
from library.train.run_config import OutputConfig
from library.train.run_report import StepTimer
from library.train.train_state import RngSnapshot, TrainProgress, save_state


def save_run_state(parts: RunParts, folder: Path, progress: TrainProgress) -> Path:
    """`save_state` of what this run trains: the weights, the optimizer state and the EMA are checked first, so a
    state holding a NaN or infinity is refused (NonFiniteError) and never replaces a good one."""
    optimizer_tensors = (
        (f"optimizer state {key} of parameter {index}", value)
        for index, state in enumerate(parts.optimizer.state.values())
        for key, value in state.items()
    )
    ema_tensors = parts.ema.shadow.items() if parts.ema is not None else ()
    return save_state(
        parts.accelerator,
        folder,
        progress,
        check=[*parts.network.state_dict().items(), *optimizer_tensors, *ema_tensors],
    )


def save_step_checkpoint(out: OutputConfig, parts: RunParts, progress: TrainProgress, timer: StepTimer) -> bool:
    """--save_every_n_steps: `<name>-step<N>.safetensors` (+ state with --save_state), then rotation; whether
    this step was saved."""
    saver, accelerator = parts.saver, parts.accelerator
    every = out.save_every_n_steps
    if not every or progress.step % every or progress.step >= parts.schedule.total_steps:
        return False
    if accelerator.is_main_process:
        metadata = progress_metadata(parts.base_metadata, steps=progress.step, epoch=progress.epoch, finished=False)
        accelerator.print(f"saved {saver.save_step(parts.network, metadata, progress.step)}")
        saver.remove_files(saver.old_step_paths(progress.step, every, out.save_last_n_steps))
    if out.save_state:
        save_run_state(parts, saver.state_path(saver.step_path(progress.step)), progress)
        if accelerator.is_main_process:
            saver.remove_states(saver.old_step_paths(progress.step, every, out.save_last_n_steps_state))
    accelerator.wait_for_everyone()
    timer.restart()  # saving is not a step
    return True


def save_epoch_checkpoint(
    out: OutputConfig, parts: RunParts, progress: TrainProgress, timer: StepTimer, *, epoch: int
) -> bool:
    """--save_every_n_epochs: `<name>-<epoch>.safetensors` (+ state with --save_state), then rotation; the
    last epoch's weights are the final file instead. Whether this epoch was saved."""
    saver, accelerator = parts.saver, parts.accelerator
    every = out.save_every_n_epochs
    accelerator.wait_for_everyone()
    if not every or epoch % every or epoch >= parts.schedule.num_epochs:
        return False
    if accelerator.is_main_process:
        metadata = progress_metadata(parts.base_metadata, steps=progress.step, epoch=epoch, finished=False)
        accelerator.print(f"saved {saver.save_epoch(parts.network, metadata, epoch)}")
        saver.remove_files(saver.old_epoch_paths(epoch, every, out.save_last_n_epochs))
    if out.save_state:
        save_run_state(parts, saver.state_path(saver.epoch_path(epoch)), progress)
        if accelerator.is_main_process:
            saver.remove_states(saver.old_epoch_paths(epoch, every, out.save_last_n_epochs_state))
    accelerator.wait_for_everyone()
    timer.restart()  # saving is not a step
    return True


def save_interrupted(
    parts: RunParts, progress: TrainProgress, rng_at_step: RngSnapshot | None
) -> tuple[Path | None, Path | None, int]:
    """Save the LoRA and a state as of the last finished optimizer step (the half-done step's gradients are
    dropped and the RNG is put back to `rng_at_step`, where that step left it), so `--resume` continues exactly;
    with several processes every one of them calls this at the same step."""
    accelerator, saver = parts.accelerator, parts.saver
    parts.optimizer.zero_grad(set_to_none=True)
    if rng_at_step is not None:
        rng_at_step.restore()
    lora_path = state_path = None
    if accelerator.is_main_process:
        metadata = progress_metadata(parts.base_metadata, steps=progress.step, epoch=progress.epoch, finished=False)
        lora_path = saver.save_step(parts.network, metadata, progress.step)
    # Every process is here at the same step (several processes stop together, `library.train.process_group`).
    state_path = save_run_state(parts, saver.state_path(saver.step_path(progress.step)), progress)
    return lora_path, state_path, progress.step
