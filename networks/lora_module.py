"""One LoRA adapter for one Linear or Conv2d layer, knowing nothing of the model around it.

y = org(x) + up(dropout(down(x))) * multiplier * alpha / rank

The adapter attaches to its layer with a forward hook, so the base model's own modules, names and
state dict stay untouched and `remove()` restores the layer exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRAModule(nn.Module):
    """A low-rank adapter: `lora_down` (A, kaiming-uniform) then `lora_up` (B, zeros), scaled by alpha/rank."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        if isinstance(org_module, nn.Conv2d):
            self.lora_down: nn.Module = nn.Conv2d(
                org_module.in_channels,
                lora_dim,
                org_module.kernel_size,
                org_module.stride,
                org_module.padding,
                bias=False,
            )
            self.lora_up: nn.Module = nn.Conv2d(lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        elif isinstance(org_module, nn.Linear):
            self.lora_down = nn.Linear(org_module.in_features, lora_dim, bias=False)
            self.lora_up = nn.Linear(lora_dim, org_module.out_features, bias=False)
        else:
            raise TypeError(f"LoRA supports Linear and Conv2d layers, not {type(org_module).__name__} ({lora_name})")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        if alpha is None or float(alpha) == 0.0:
            alpha = lora_dim
        alpha = float(alpha.detach().float().item()) if isinstance(alpha, torch.Tensor) else float(alpha)
        self.scale = alpha / lora_dim
        self.register_buffer("alpha", torch.tensor(alpha))

        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # Held outside the module tree so the base layer is never part of the LoRA state dict.
        self._org_module = [org_module]
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    @property
    def org_module(self) -> nn.Module:
        return self._org_module[0]

    def apply_to(self) -> None:
        """Attach to the base layer: its output gains this adapter's contribution."""
        if self._hook is None:
            self._hook = self.org_module.register_forward_hook(self._add_lora_output)

    def remove(self) -> None:
        """Detach from the base layer."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _add_lora_output(self, _module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.lora_delta(args[0]).to(output.dtype)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for input `x` (zero when module dropout skips it)."""
        if self.module_dropout and self.training and torch.rand(()) < self.module_dropout:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        weight_dtype = self.lora_down.weight.dtype
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != weight_dtype:
            x = x.to(weight_dtype)
        h = self.lora_down(x)
        if self.dropout and self.training:
            h = nn.functional.dropout(h, p=self.dropout)
        scale = self.scale
        if self.rank_dropout and self.training:
            mask = torch.rand((h.shape[0], self.lora_dim), device=h.device) > self.rank_dropout
            mask = mask.to(h.dtype)
            # ranks sit on dim 1 of a conv output (B, r, H, W) and on the last dim of a linear one (B, ..., r)
            if h.dim() == 4:
                mask = mask.view(h.shape[0], self.lora_dim, 1, 1)
            else:
                mask = mask.view(h.shape[0], *([1] * (h.dim() - 2)), self.lora_dim)
            h = h * mask
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(h) * (self.multiplier * scale)
