"""The plain epsilon-prediction MSE, written out on its own: the reference the loss tests compare
`library.train.loss.diffusion_loss` (default options) against, and the fixed-noise loss of end-to-end tests."""

from __future__ import annotations

import torch


def epsilon_mse_loss(prediction: torch.Tensor, noise: torch.Tensor, loss_weights: torch.Tensor) -> torch.Tensor:
    """MSE per element, mean over C,H,W per sample, times per-sample weights, mean over the batch."""
    per_sample = torch.nn.functional.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * loss_weights.to(per_sample.device)).mean()
