"""Which layers of SDXL get a LoRA, and the sd-scripts name of each (original "ldm" layout).

Selection follows sd-scripts' `networks.lora` for SDXL:
- text encoders: every Linear inside CLIP attention and MLP blocks (q, k, v, out_proj, fc1, fc2);
- UNet: every Linear and 1x1 Conv2d inside the transformer blocks (incl. proj_in / proj_out);
- UNet with `conv_dim`: also the layers of ResNet blocks, Downsample and Upsample (3x3 convs take
  conv_dim / conv_alpha; their Linear and 1x1 layers take the ordinary dim).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from networks.sdxl_keys import unet_diffusers_to_original

TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIXES = ("lora_te1", "lora_te2")


@dataclass(frozen=True)
class LoRATarget:
    """One layer to adapt: its sd-scripts name, the layer, and whether it is a 3x3 (or larger) conv."""

    lora_name: str
    module: nn.Module
    is_conv3x3: bool


def _adaptable(child: nn.Module) -> tuple[bool, bool]:
    """(is adaptable, is a conv with a kernel larger than 1x1)."""
    if isinstance(child, nn.Linear):
        return True, False
    if isinstance(child, nn.Conv2d):
        return True, tuple(child.kernel_size) != (1, 1)
    return False, False


def _text_encoder_module_name(name: str) -> str:
    """Full CLIP module name as the LoRA file spells it (keeps the `text_model.` level that
    transformers >= 5.6 dropped from CLIPTextModel's module tree)."""
    return name if name.startswith("text_model.") else f"text_model.{name}"


def _targets(model: nn.Module, classes: tuple[str, ...], lora_name: Callable[[str], str]) -> list[LoRATarget]:
    """Every Linear / Conv2d inside a module whose class name is in `classes`, named by `lora_name`."""
    targets: list[LoRATarget] = []
    for name, module in model.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            ok, is_conv3x3 = _adaptable(child)
            if ok:
                targets.append(LoRATarget(lora_name(f"{name}.{child_name}"), child, is_conv3x3))
    return targets


def text_encoder_targets(text_encoder: nn.Module, prefix: str) -> list[LoRATarget]:
    """LoRA targets of one CLIP text encoder, named `<prefix>_text_model_encoder_layers_N_...`."""
    return _targets(
        text_encoder,
        TEXT_ENCODER_TARGETS,
        lambda name: f"{prefix}_{_text_encoder_module_name(name).replace('.', '_')}",
    )


def unet_targets(unet: nn.Module, include_conv: bool) -> list[LoRATarget]:
    """LoRA targets of the SDXL UNet (diffusers modules), named in the original layout."""
    classes = UNET_TARGETS + (UNET_CONV_TARGETS if include_conv else ())
    return _targets(unet, classes, lambda name: f"{UNET_PREFIX}_{unet_diffusers_to_original(name).replace('.', '_')}")
