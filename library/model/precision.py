"""What precision, weight storage and attention actually run on this device: decided once, printed once.

The plan separates three things sd-scripts folds into one ``weight_dtype``:

- the dtype the base model's Linear/Conv2d weights are *stored* in (fp8 with ``--fp8_base``; fp16 on a CPU that
  was asked for fp16, because CPU fp16 compute is slow or missing but fp16 storage still halves memory);
- the dtype of the other base parameters (norms, biases, embeddings), which equals the compute dtype;
- the compute dtype, in which every layer runs (stored weights are up-cast per layer, see ``library.model.fp8``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from library.errors import UserInputError
from library.model.fp8 import FP8_DTYPE

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionRequest:
    """The precision flags as the user gave them."""

    mixed_precision: str = "no"
    fp8_base: bool = False
    fp8_base_unet: bool = False
    full_fp16: bool = False
    full_bf16: bool = False
    no_half_vae: bool = False
    xformers: bool = False
    mem_eff_attn: bool = False


@dataclass(frozen=True)
class PrecisionPlan:
    mixed_precision: str
    """What accelerate is told: no | fp16 | bf16."""
    weight_dtype: torch.dtype
    """dtype of the frozen base parameters other than stored Linear/Conv2d weights (norms, biases, embeddings)."""
    compute_dtype: torch.dtype
    attention: str
    """"sdpa", "xformers" or "sliced" (what --mem_eff_attn runs)."""
    notes: tuple[str, ...]
    """One line per fallback the user should know about."""
    unet_storage_dtype: torch.dtype | None = None
    """Storage dtype of the UNet's Linear/Conv2d weights, or None when they are stored in `weight_dtype`."""
    text_encoder_storage_dtype: torch.dtype | None = None
    """The same for the text encoders."""
    vae_dtype: torch.dtype = torch.float32
    lora_dtype: torch.dtype = torch.float32
    """dtype of the trained LoRA weights (fp32 unless --full_fp16 / --full_bf16)."""

    def storage_dtypes(self) -> dict[str, torch.dtype]:
        """Per component, the Linear/Conv2d weight storage dtype where it differs from `weight_dtype`
        (the loader's ``linear_weight_dtypes``)."""
        stored = {}
        if self.unet_storage_dtype is not None:
            stored["unet"] = self.unet_storage_dtype
        if self.text_encoder_storage_dtype is not None:
            stored["text_encoder1"] = stored["text_encoder2"] = self.text_encoder_storage_dtype
        return stored

    def summary(self) -> dict[str, str]:
        """What is stored and computed in which dtype, by name (the run report's `precision`)."""
        return {
            "mixed_precision": self.mixed_precision,
            "compute": _name(self.compute_dtype),
            "unet_weights": _name(self.unet_storage_dtype or self.weight_dtype),
            "text_encoder_weights": _name(self.text_encoder_storage_dtype or self.weight_dtype),
            "other_base_weights": _name(self.weight_dtype),
            "vae": _name(self.vae_dtype),
            "lora": _name(self.lora_dtype),
        }

    def describe(self, device: str, processes: int) -> str:
        """The one start-up line that says what runs."""
        s = self.summary()
        return (
            f"precision: mixed={s['mixed_precision']}, compute={s['compute']}, UNet weights={s['unet_weights']}, "
            f"text-encoder weights={s['text_encoder_weights']}, other base weights={s['other_base_weights']}, "
            f"VAE={s['vae']}, LoRA={s['lora']}, attention={self.attention}, "
            f"device={device}, processes={processes}"
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def xformers_problem(device_type: str) -> str | None:
    """Why xformers cannot run on `device_type` (None: it can, as far as importing it tells).

    An installed xformers built for another torch or CUDA fails in many ways (ImportError, OSError from its
    library, RuntimeError...), so any error on import means "not usable"; one that imports but fails on its first
    call is caught where attention is set (`library.model.base_models.set_attention`)."""
    if device_type != "cuda":
        return "it needs a CUDA GPU"
    if importlib.util.find_spec("xformers") is None:
        return "it is not installed (pip install xformers, the build matching your torch and CUDA)"
    try:
        importlib.import_module("xformers.ops")
    except Exception as error:  # noqa: BLE001 - whatever a broken build raises, SDPA still works
        return f"importing it failed: {type(error).__name__}: {_first_line(error)}"
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def check_precision_flags(request: PrecisionRequest) -> None:
    """Refuse flag combinations that cannot mean anything (before any model loads), as sd-scripts does."""
    if request.full_fp16 and request.full_bf16:
        raise UserInputError("--full_fp16 and --full_bf16 exclude each other")
    if request.full_fp16 and request.mixed_precision != "fp16":
        raise UserInputError("--full_fp16 needs --mixed_precision fp16 (the LoRA weights train in fp16)")
    if request.full_bf16 and request.mixed_precision != "bf16":
        raise UserInputError("--full_bf16 needs --mixed_precision bf16 (the LoRA weights train in bf16)")


def _attention(request: PrecisionRequest, device_type: str, notes: list[str]) -> str:
    """sd-scripts' order: --mem_eff_attn, then --xformers, else SDPA."""
    if request.mem_eff_attn:
        notes.append(
            "--mem_eff_attn: sliced attention (lower peak memory, slower than SDPA, which torch 2 already "
            "runs memory-efficiently on a GPU)"
        )
        return "sliced"
    if request.xformers:
        problem = xformers_problem(device_type)
        if problem is None:
            return "xformers"
        notes.append(
            f"--xformers: xformers cannot run on this machine ({problem}); using PyTorch SDPA attention instead"
        )
    return "sdpa"


def plan_precision(request: PrecisionRequest, device_type: str) -> PrecisionPlan:
    """Map the requested precision and attention to what `device_type` can run."""
    check_precision_flags(request)
    notes: list[str] = []
    mixed = request.mixed_precision
    stored: torch.dtype | None = None
    if device_type != "cuda" and mixed == "fp16":
        notes.append(
            "--mixed_precision fp16 needs a CUDA GPU; on this CPU the base Linear/Conv weights are stored "
            "in fp16 and computed in fp32"
        )
        mixed, stored = "no", torch.float16
    dtype = DTYPES[mixed]
    unet_stored = FP8_DTYPE if (request.fp8_base or request.fp8_base_unet) else stored
    te_stored = FP8_DTYPE if request.fp8_base else stored
    # SDXL's VAE overflows in fp16 (NaN latents): it runs in fp32 unless bf16 was asked for.
    vae_dtype = torch.bfloat16 if mixed == "bf16" and not request.no_half_vae else torch.float32
    lora_dtype = torch.float32
    if request.full_fp16:
        lora_dtype = torch.float16
    elif request.full_bf16:
        lora_dtype = torch.bfloat16
    return PrecisionPlan(
        mixed,
        weight_dtype=dtype,
        compute_dtype=dtype,
        attention=_attention(request, device_type, notes),
        notes=tuple(notes),
        unet_storage_dtype=unet_stored,
        text_encoder_storage_dtype=te_stored,
        vae_dtype=vae_dtype,
        lora_dtype=lora_dtype,
    )


def save_dtype(save_precision: str | None) -> torch.dtype:
    """--save_precision, else fp32 (the LoRA weights' own dtype, as sd-scripts saves them)."""
    return SAVE_DTYPES[save_precision or "float"]


@dataclass(frozen=True)
class PrecisionConfig:
    request: PrecisionRequest
    """The precision and attention flags as given (the trainer decides what the device can run)."""
    gradient_checkpointing: bool
    lowram: bool = False
    """Accepted for sd-scripts' scripts; loading is always per tensor straight to the device (recorded only)."""
    highvram: bool = False
    """Keep the VAE and text encoders on the device after caching (no offload, no cache emptying)."""
