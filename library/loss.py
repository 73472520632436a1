"""The diffusion training objective: noise, timesteps, epsilon-prediction MSE (pure functions)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

SDXL_VAE_SCALE = 0.13025


def make_noise_scheduler() -> DDPMScheduler:
    """SDXL's training schedule: scaled_linear betas 0.00085..0.012 over 1000 steps."""
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False
    )


def add_noise(
    scheduler: DDPMScheduler, latents: torch.Tensor, min_timestep: int = 0, max_timestep: int = 1000
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, noise, timesteps) with timesteps uniform in [min, max)."""
    noise = torch.randn_like(latents)
    timesteps = torch.randint(min_timestep, max_timestep, (latents.shape[0],), device=latents.device).long()
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def epsilon_mse_loss(prediction: torch.Tensor, noise: torch.Tensor, loss_weights: torch.Tensor) -> torch.Tensor:
    """MSE per element, mean over C,H,W per sample, times per-sample weights, mean over the batch."""
    per_sample = torch.nn.functional.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * loss_weights.to(per_sample.device)).mean()
