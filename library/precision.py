"""What precision and attention actually run on this device, decided once and printed once."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionPlan:
    mixed_precision: str
    """What accelerate is told: no | fp16 | bf16."""
    weight_dtype: torch.dtype
    """dtype of the frozen base weights (fp8 storage aside)."""
    compute_dtype: torch.dtype
    attention: str
    """"sdpa" or "xformers"."""
    notes: tuple[str, ...]
    """One line per fallback the user should know about."""


def xformers_usable(device_type: str) -> bool:
    return device_type == "cuda" and importlib.util.find_spec("xformers") is not None


def plan_precision(requested: str, device_type: str, want_xformers: bool) -> PrecisionPlan:
    """Map the requested mixed precision and attention to what `device_type` can run."""
    notes = []
    mixed = requested
    if device_type != "cuda" and requested == "fp16":
        notes.append("--mixed_precision fp16 needs a CUDA GPU; on this CPU the run computes in fp32 instead")
        mixed = "no"
    attention = "sdpa"
    if want_xformers:
        if xformers_usable(device_type):
            attention = "xformers"
        else:
            notes.append("--xformers: xformers cannot run on this machine; using PyTorch SDPA attention instead")
    dtype = DTYPES[mixed]
    return PrecisionPlan(mixed, weight_dtype=dtype, compute_dtype=dtype, attention=attention, notes=tuple(notes))


def save_dtype(save_precision: str | None) -> torch.dtype:
    """--save_precision, else fp32 (the LoRA weights' own dtype, as sd-scripts saves them)."""
    return SAVE_DTYPES[save_precision or "float"]
