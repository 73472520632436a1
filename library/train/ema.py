"""An exponential moving average (EMA) of the trained LoRA weights, saved as a LoRA file of its own.

The last weights of a run carry the noise of its last steps; their average over the recent steps is usually
smoother and often better (the usual EMA of diffusion training, here on the adapters only, so it costs one fp32
copy of the LoRA). sd-scripts has no EMA: `--ema_decay`, `--ema_update_after_step`, `--ema_warmup` are ours.

Torch-free at import time: torch is imported by the functions that compute, so the config reads `EMAConfig`
without it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class EMAConfig:
    """The EMA flags (present only when `--ema_decay` is given)."""

    decay: float
    """Weight of the old average at each update, in (0, 1): about 1 / (1 - decay) steps are averaged."""
    update_after_step: int = 0
    """The average just copies the weights for this many optimizer steps, then starts averaging."""
    warmup: bool = False
    """Use min(decay, (1 + t) / (10 + t)) at the t-th averaging update, so the start (B = 0) fades out quickly."""


class LoRAEMA:
    """fp32 shadow copies of the trainable tensors of a network, named as in its `state_dict()`.

    After each optimizer step `update()` sets shadow = d * shadow + (1 - d) * param, with d = `decay` (or the
    warm-up value); for the first `update_after_step` updates the shadow copies the weights instead. The
    shadows start as the weights at construction and live on the weights' device.
    """

    def __init__(
        self,
        network: nn.Module | Mapping[str, torch.Tensor],
        decay: float,
        *,
        update_after_step: int = 0,
        warmup: bool = False,
    ) -> None:
        """`network`: its parameters that require grad are averaged (frozen ones never change); or a mapping of
        name -> tensor (tests, other owners)."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if update_after_step < 0:
            raise ValueError(f"update_after_step must be >= 0, got {update_after_step}")
        if isinstance(network, Mapping):
            named = dict(network)
        else:
            named = {name: param for name, param in network.named_parameters() if param.requires_grad}
        self.decay = decay
        self.update_after_step = update_after_step
        self.warmup = warmup
        self.num_updates = 0
        self._params = named
        self.shadow: dict[str, torch.Tensor] = {name: p.detach().float().clone() for name, p in named.items()}

    def current_decay(self) -> float:
        """The d of the next `update()`: 0 (copy) until `update_after_step` updates are done, then `decay` or
        with `warmup` min(decay, (1 + t) / (10 + t)) at the t-th averaging update (t = 1, 2, ...)."""
        t = self.num_updates + 1 - self.update_after_step
        if t <= 0:
            return 0.0
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    def update(self) -> None:
        """Fold the current weights into the average (call once per optimizer step, after `optimizer.step()`)."""
        import torch

        d = self.current_decay()
        self.num_updates += 1
        if not self.shadow:
            return
        names = list(self.shadow)
        shadows = [self.shadow[name] for name in names]
        params = [self._params[name].detach().to(torch.float32) for name in names]
        with torch.no_grad():
            if d == 0.0:
                torch._foreach_copy_(shadows, params)
            else:
                torch._foreach_lerp_(shadows, params, 1.0 - d)  # shadow + (1 - d) (param - shadow)

    def state_dict(self) -> dict:
        """Everything to resume exactly: the shadows (fp32, CPU copies) and the update count."""
        return {
            "decay": self.decay,
            "update_after_step": self.update_after_step,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {name: tensor.detach().cpu().clone() for name, tensor in self.shadow.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a `state_dict()` of an EMA of the same network (names and shapes must match)."""
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing, unknown = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
            raise ValueError(f"EMA state does not fit this network: missing {missing[:3]}, unknown {unknown[:3]}")
        for name, tensor in shadow.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state {name} is {tuple(tensor.shape)}, here {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)
        self.decay = float(state["decay"])
        self.update_after_step = int(state["update_after_step"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])


def ema_state_dict(network: nn.Module, ema: LoRAEMA) -> dict[str, torch.Tensor]:
    """`network.state_dict()` (same keys, alphas included) with the EMA values for the averaged tensors."""
    state = dict(network.state_dict())
    unknown = [name for name in ema.shadow if name not in state]
    if unknown:
        raise ValueError(f"EMA tensors not in the network's state dict, e.g. {unknown[0]}")
    state.update(ema.shadow)
    return state


def ema_metadata(metadata: Mapping[str, str] | None, ema: LoRAEMA) -> dict[str, str]:
    """The run's metadata plus how the average was made (`ss_ema_*`, strings like every sd-scripts key)."""
    return {
        **(metadata or {}),
        "ss_ema_decay": str(ema.decay),
        "ss_ema_update_after_step": str(ema.update_after_step),
        "ss_ema_warmup": str(ema.warmup),
        "ss_ema_updates": str(ema.num_updates),
    }


def ema_path(path: str | os.PathLike) -> Path:
    """`<stem>-ema<suffix>` beside `path`: the EMA twin of a LoRA file (`x-000002.safetensors` -> `x-000002-ema...`)."""
    path = Path(path)
    return path.with_name(f"{path.stem}-ema{path.suffix}")


def save_ema_weights(
    network: nn.Module,
    ema: LoRAEMA,
    path: str | os.PathLike,
    dtype: torch.dtype | None,
    metadata: Mapping[str, str] | None,
) -> Path:
    """Write the EMA as a LoRA file through the same writer as `network.save_weights` (atomic, every tensor cast
    to `dtype`, A1111 hashes), with `ss_ema_*` metadata; refused like it when a tensor is not finite. Returns
    `path`."""
    from library.files.lora_io import save_lora_file

    save_lora_file(ema_state_dict(network, ema), path, dtype, ema_metadata(metadata, ema), what="EMA file")
    return Path(path)


def ema_file_bytes(
    network: nn.Module,
    ema: LoRAEMA,
    path: str | os.PathLike,
    dtype: torch.dtype | None,
    metadata: Mapping[str, str] | None,
) -> bytes:
    """The bytes `save_ema_weights` writes to `path`, for a caller that writes them together with the LoRA
    file (refused like it when a tensor is not finite)."""
    from library.files.lora_io import lora_file_bytes

    return lora_file_bytes(ema_state_dict(network, ema), path, dtype, ema_metadata(metadata, ema))
