"""One optimizer step: a batch -> the loss (`batch_loss`), forward and backward of the accumulated batches with the
NaN guard (`backward_step`), and the update (`apply_update`)."""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Iterator

import torch

from library.files.finite import NonFiniteSteps, group_gradient_norms, non_finite_source
from library.model.compiled import first_line, rng_state, set_rng_state
from library.model.text_encoding import encode_captions, time_ids
from library.train.grad_sync import average_gradients
from library.train.loss import SDXL_VAE_SCALE, diffusion_loss, noise_batch
from library.train.parts import LossParts, RunParts


def batch_loss(
    batch: dict,
    parts: LossParts,
    *,
    train_text_encoder: bool = False,
    timesteps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One batch -> the training loss: latents, text conditioning (cached or encoded, with gradients when the text
    encoders train), noise (at `timesteps` from `generator` when given: validation), prediction, loss."""
    device, models, accelerator = parts.accelerator.device, parts.models, parts.accelerator
    latents = batch["latents"].to(device) if "latents" in batch else parts.encode(batch["images"])
    latents = latents * SDXL_VAE_SCALE
    if "text_context" in batch:
        context, pooled = batch["text_context"].to(device), batch["text_pooled"].to(device)
    else:
        with torch.set_grad_enabled(train_text_encoder), accelerator.autocast():
            context, pooled = encode_captions(models, batch["captions"], parts.max_token_length, device)
    added = {
        "text_embeds": pooled,
        "time_ids": time_ids(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]).to(device),
    }
    noised = noise_batch(parts.noise_scheduler, latents, parts.options, timesteps=timesteps, generator=generator)
    with accelerator.autocast():
        prediction = models.unet(
            noised.noisy.to(parts.plan.compute_dtype), noised.timesteps, context, added_cond_kwargs=added
        ).sample
    return diffusion_loss(prediction, noised, batch["loss_weights"], parts.noise_scheduler, parts.options)


def accumulate_gradients(
    parts: RunParts, batches: Iterator[dict], size: int, *, train_text_encoder: bool
) -> torch.Tensor:
    """Forward and backward `size` batches, each loss divided by `size`; returns the sum of their losses.

    While the models run compiled (--torch_compile), the step keeps its batches and starting RNG state: compiled
    code that fails here (backward is compiled at its first use) switches the run to eager (one warning) and the
    step starts again from the same state, with no gradients (every step starts without)."""
    accelerator, compiled = parts.accelerator, parts.loss.compiled
    guarded = compiled is not None and compiled.active
    start = rng_state() if guarded else None
    taken: list[dict] = []
    total = torch.zeros((), device=accelerator.device)
    for _ in range(size):
        batch = next(batches)
        try:
            loss = batch_loss(batch, parts.loss, train_text_encoder=train_text_encoder)
            accelerator.backward(loss / size)
        except Exception as error:
            if not guarded:
                raise
            compiled.fall_back(f"the compiled step failed ({first_line(error)})")
            set_rng_state(start)
            parts.optimizer.zero_grad(set_to_none=True)
            return accumulate_gradients(
                parts, itertools.chain(taken, [batch], batches), size, train_text_encoder=train_text_encoder
            )
        if guarded:
            taken.append(batch)
        total += loss.detach()
    return total


def backward_step(
    parts: RunParts,
    params: list[torch.nn.Parameter],
    batches: Iterator[dict],
    size: int,
    *,
    step: int,
    train_text_encoder: bool,
    non_finite: NonFiniteSteps,
) -> tuple[float, bool]:
    """Forward and backward `size` batches (the loss averaged over them) and the cross-process gradient average
    (`library.train.grad_sync`: a few bucketed collectives);
    returns the mean loss over batches and processes, and whether the update may be applied.

    Step `step`'s loss and then each optimizer group's gradient norm (after the average, so every process decides
    alike) must be finite; if not, the step is skipped under --max_nan_steps (`non_finite` counts it; a warning
    line) or the run stops (NonFiniteError). One host sync covers the loss and the norms."""
    accelerator = parts.accelerator
    total = accumulate_gradients(parts, batches, size, train_text_encoder=train_text_encoder)
    mean_loss = accelerator.reduce(total / size, reduction="mean").float().reshape(1)
    average_gradients(params, accelerator)
    # Under fp16 loss scaling inf gradients are the GradScaler's to handle: it skips the step and lowers its scale.
    check_gradients = getattr(accelerator, "scaler", None) is None
    checked = (
        [mean_loss, group_gradient_norms(parts.optimizer.param_groups).to(mean_loss.device)]
        if check_gradients
        else [mean_loss]
    )
    values = torch.cat(checked).tolist()
    source = non_finite_source(values[0], values[1:] if check_gradients else None, parts.group_descriptions)
    if source is not None:
        accelerator.print(non_finite.skip_or_stop(step, source))
    return values[0], source is None


def apply_update(parts: RunParts, params: list[torch.nn.Parameter], *, finite: bool, max_grad_norm: float) -> None:
    """One clipped optimizer step, one scheduler step, the EMA. A skipped (non-finite) step drops its gradients
    and only steps the scheduler, so the schedule keeps its length."""
    if not finite:
        parts.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when a scheduler steps before the first optimizer step
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            parts.lr_scheduler.step()
        return
    if max_grad_norm > 0:
        parts.accelerator.clip_grad_norm_(params, max_grad_norm)
    parts.optimizer.step()
    parts.lr_scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.ema is not None:
        parts.ema.update()
