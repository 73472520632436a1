"""The frozen base model: which components load before caching and which after (staged loading); once loaded,
freezing, placement, weight storage, attention and checkpointing; releasing models whose outputs are cached; the
VAE as a latent encoder."""

from __future__ import annotations

import gc
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from library.model.fp8 import store_weights
from library.model.loading import COMPONENTS, SDXLModels
from library.model.precision import PrecisionConfig, PrecisionPlan

Encoder = Callable[[torch.Tensor], torch.Tensor]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadingStages:
    """Which components a run loads before each caching step, and which after all of them (staged loading).

    A component whose outputs are cached is loaded just before its caching step and released (or, needed for
    samples, kept or moved to CPU RAM) right after it, before the next one loads: the VAE alone, then the text
    encoders, then the UNet with whatever the training step still encodes per batch. The models a run needs are
    then never resident all at once when their outputs are cached, and the peak is the largest stage, the UNet's
    (with everything needed later, the peak is the same as loading all at once). Empty stages are skipped."""

    for_latents: tuple[str, ...]
    """Loaded before the latents are cached: ("vae",) with --cache_latents, else ()."""
    for_text: tuple[str, ...]
    """Loaded before the text-encoder outputs are cached: both text encoders with --cache_text_encoder_outputs."""
    for_training: tuple[str, ...]
    """The rest: the UNet, the VAE when latents are encoded per batch, the text encoders when captions are."""


TEXT_ENCODERS = ("text_encoder1", "text_encoder2")


def loading_stages(*, cache_latents: bool, cache_text_encoder_outputs: bool) -> LoadingStages:
    """The stages (see `LoadingStages`) for a run caching latents and / or text-encoder outputs."""
    for_latents = ("vae",) if cache_latents else ()
    for_text = TEXT_ENCODERS if cache_text_encoder_outputs else ()
    for_training = tuple(c for c in COMPONENTS if c not in for_latents + for_text)
    return LoadingStages(for_latents, for_text, for_training)


def set_attention(unet, attention: str) -> str:
    """Set the UNet's attention backend - PyTorch SDPA, xformers, or sliced attention (--mem_eff_attn) - and
    return the one that runs: an xformers that imports but cannot run here (diffusers tries it on a tiny input
    and raises: a build for another CUDA, a GPU it lacks kernels for) falls back to SDPA with one warning."""
    if attention == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as error:  # noqa: BLE001 - whatever a broken build raises, SDPA still works
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            logger.warning(
                "--xformers: xformers cannot run on this machine (%s: %s); using PyTorch SDPA attention instead",
                type(error).__name__,
                reason,
            )
            attention = "sdpa"
    if attention == "sliced":
        unet.set_attention_slice("auto")
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    return attention


def prepare_base_models(
    models: SDXLModels,
    plan: PrecisionPlan,
    precision: PrecisionConfig,
    train_text_encoder: bool,
    device: torch.device,
    components: Sequence[str] = COMPONENTS,
) -> str:
    """Freeze the base model, place it, and apply weight storage, attention and checkpointing choices; returns the
    attention that runs (`plan.attention`, or "sdpa" when xformers failed).

    The loader already stored the weights as the plan says; `store_weights` then only installs the per-layer
    up-cast (and converts, for models that were loaded some other way). A staged load prepares each component
    once, as it arrives: only `components` are touched (the attention is then the UNet's when it is among them)."""
    if "vae" in components and models.vae is not None:
        vae = models.vae
        if vae.dtype != plan.vae_dtype or vae.device != device:  # the loader already placed it: no extra copy
            vae.to(device, plan.vae_dtype)
        vae.requires_grad_(False).eval()
    storages = {
        "unet": plan.unet_storage_dtype,
        "text_encoder1": plan.text_encoder_storage_dtype,
        "text_encoder2": plan.text_encoder_storage_dtype,
    }
    prepared = {name: getattr(models, name) for name in storages if name in components}
    for model in prepared.values():
        model.requires_grad_(False)
        model.to(device)
        model.eval()
    attention = set_attention(models.unet, plan.attention) if "unet" in prepared else plan.attention
    for name, model in prepared.items():
        if storages[name] is not None:
            store_weights(model, storages[name], plan.compute_dtype)
    if precision.gradient_checkpointing and "unet" in prepared:
        models.unet.enable_gradient_checkpointing()
        models.unet.train()
    if precision.gradient_checkpointing and train_text_encoder:
        for name in ("text_encoder1", "text_encoder2"):
            if name in prepared:
                enable_text_encoder_checkpointing(prepared[name])
                prepared[name].train()
    return attention


def enable_text_encoder_checkpointing(text_encoder) -> None:
    """Non-reentrant checkpointing (LoRA's inputs need no grad of their own); transformers >= 5.x renamed the call."""
    if hasattr(text_encoder, "activation_checkpointing_enable"):
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def release_model(model, needed_later: bool, highvram: bool, device: torch.device):
    """What is left of a model whose outputs are cached: freed (returns None) unless needed later (for samples);
    then kept on the device with --highvram (or when the device is the CPU), else moved to CPU RAM."""
    if not needed_later:
        return None
    if highvram or device.type == "cpu":
        return model
    return model.to("cpu")


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
