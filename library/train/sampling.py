"""Sample images during training: diffusers' SDXL pipeline run on the models being trained (the LoRA works through
its forward hooks), one PNG per prompt under ``<output_dir>/sample/`` with sd-scripts' file names.

Sampling leaves the training run as it found it: the RNG states (torch, CUDA, Python, NumPy), every module's
train/eval flag and each model's device are restored afterwards, and no model is cast (the base weights may be
stored in fp8 and up-cast per layer, see `library.model.fp8`).

The pipeline gets the prompt embeddings from `library.model.text_encoding` (the training's own conditioning, so
`--max_token_length` 150/225 works and an absent negative prompt is the empty prompt, as in sd-scripts) and
returns latents, which are decoded here with the VAE in its own dtype (the pipeline would feed bf16 latents to an
fp32 VAE). The scheduler of each sampler is built from the model's scheduler config (its betas, prediction
type and timestep spacing), so the images match what diffusers' SDXL pipeline makes of the same model.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler, HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler,
    LMSDiscreteScheduler, PNDMScheduler, StableDiffusionXLPipeline,
)
from PIL import Image
from torch import nn

from library.files.atomic import atomic_file
from library.train.loss import SDXL_VAE_SCALE
from library.model.loading import SDXLModels
from library.train.sample_prompts import SAMPLERS, SamplePrompt, check_sampler_usable, sample_file_name
from library.model.text_encoding import encode_captions

SCHEDULERS: dict[str, tuple[type, dict]] = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm_2": (KDPM2DiscreteScheduler, {}),
    "dpm_2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpmsolver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": (DPMSolverSinglestepScheduler, {"lower_order_final": True}),  # diffusers forces it anyway
}
"""Sampler name -> diffusers scheduler class and options, as sd-scripts' `get_my_scheduler` maps them; a ``k_`` name
(k-diffusion's name for the same sampler) is the plain one, as there: no Karras sigmas."""
SCHEDULERS.update({name: SCHEDULERS[name.removeprefix("k_")] for name in SAMPLERS if name.startswith("k_")})
assert set(SCHEDULERS) == set(SAMPLERS)


def make_scheduler(sampler: str, base_config):
    """The scheduler for `sampler`, made from the model's scheduler config (`SDXLModels.scheduler.config`)."""
    check_sampler_usable(sampler)
    cls, options = SCHEDULERS[sampler]
    with warnings.catch_warnings():  # diffusers deprecates algorithm_type "dpmsolver" (sd-scripts' "dpmsolver")
        warnings.simplefilter("ignore", FutureWarning)
        return cls.from_config(base_config, **options)


def sample_images(
    models: SDXLModels,
    prompts: Sequence[SamplePrompt],
    *,
    sampler_name: str,
    device: torch.device | str,
    compute_dtype: torch.dtype,
    output_dir: str | Path,
    output_name: str | None,
    step: int,
    epoch: int | None = None,
    max_token_length: int = 75,
    seed_base: int = 0,
    network: nn.Module | None = None,
) -> list[Path]:
    """Make one image per prompt and save it as ``<output_dir>/sample/<sd-scripts name>.png``; returns the paths.

    `epoch` given (an epoch's end, 0 before training) names the files ``e<epoch:06d>``, else ``<step:06d>``.
    A prompt without a seed uses ``seed_base + index``. `network` (the LoRA network, whose modules are not children
    of the base models) is put in eval mode too, so no LoRA dropout runs. Call it on the main process only.
    """
    device = torch.device(device)
    sample_dir = Path(output_dir) / "sample"
    bases = [models.unet, models.vae, models.text_encoder1, models.text_encoder2]
    if any(model is None for model in bases):
        raise ValueError("sampling needs the UNet, the VAE and both text encoders (keep them when outputs are cached)")
    paths = []
    with _sampling_state(bases, [network] if network is not None else [], device), torch.no_grad():
        pipe = StableDiffusionXLPipeline(
            vae=models.vae, text_encoder=models.text_encoder1, text_encoder_2=models.text_encoder2,
            tokenizer=models.tokenizer1, tokenizer_2=models.tokenizer2, unet=models.unet,
            scheduler=make_scheduler(sampler_name, models.scheduler.config), add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        for prompt in prompts:
            seed = prompt.seed_for(seed_base)
            pipe.scheduler = make_scheduler(prompt.sampler or sampler_name, models.scheduler.config)
            latents = _denoise(pipe, models, prompt, seed, device, compute_dtype, max_token_length)
            image = decode_latents(models.vae, latents)
            name = sample_file_name(output_name, step=step, epoch=epoch, index=prompt.index, seed=seed)
            paths.append(_save_png(image, sample_dir / name))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return paths


def _denoise(pipe: StableDiffusionXLPipeline, models: SDXLModels, prompt: SamplePrompt, seed: int,
             device: torch.device, compute_dtype: torch.dtype, max_token_length: int) -> torch.Tensor:
    """The prompt's latents (1, 4, h/8, w/8): text conditioning as in training, then the pipeline's denoising."""
    half = compute_dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(device.type, dtype=compute_dtype, enabled=half):
        context, pooled = encode_captions(models, [prompt.prompt, prompt.negative_prompt], max_token_length, device)
        generator = torch.Generator(device).manual_seed(seed)
        return pipe(
            prompt_embeds=context[:1], pooled_prompt_embeds=pooled[:1],
            negative_prompt_embeds=context[1:], negative_pooled_prompt_embeds=pooled[1:],
            width=prompt.width, height=prompt.height, num_inference_steps=prompt.steps,
            guidance_scale=prompt.scale, generator=generator, output_type="latent", return_dict=False,
        )[0]


def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """Scaled SDXL latents (1, 4, h, w) -> one RGB image, (H, W, 3) uint8, decoded in the VAE's own dtype."""
    device = next(vae.parameters()).device
    with torch.autocast(device.type, enabled=False):
        pixels = vae.decode((latents.float() / SDXL_VAE_SCALE).to(device, vae.dtype)).sample
    pixels = (pixels[0].float() / 2 + 0.5).clamp(0, 1)
    return (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()


def _save_png(image: np.ndarray, target: Path) -> Path:
    with atomic_file(target, what="sample image") as handle:
        Image.fromarray(image).save(handle, format="PNG")
    return target


def images_for_tracker(paths: Sequence[str | Path]) -> list[np.ndarray]:
    """The saved samples as (H, W, 3) uint8 arrays, e.g. for TensorBoard's ``add_image(..., dataformats="HWC")``."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB")))
    return arrays


@contextlib.contextmanager
def _sampling_state(models: Sequence[nn.Module], others: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Models on `device` and every module in eval mode for the block; afterwards each module's train flag, each
    model's device and the RNG states are what they were."""
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    modules = [module for model in (*models, *others) for module in model.modules()]
    flags = [module.training for module in modules]
    devices = [next(model.parameters()).device for model in models]
    try:
        for model, was_on in zip(models, devices):
            if was_on != device:
                model.to(device)
        for module in modules:
            module.training = False
        yield
    finally:
        for model, was_on in zip(models, devices):
            if next(model.parameters()).device != was_on:
                model.to(was_on)
        for module, flag in zip(modules, flags):
            module.training = flag
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])
