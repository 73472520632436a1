"""How many parameters a LoRA of SDXL will have, from the checkpoint's tensor names and shapes alone.

The trainer must know the size of its first save before the model loads (is there room on the disk?). Building
the network needs the model; this reads the same answer off the names and shapes in the checkpoint's header
(`library.model.model_files`), with the selection rules of `networks.lora_targets` restated on tensor names:

- text encoders: the q, k, v, out projections and fc1, fc2 of every layer (TE2's single-file `in_proj_weight`
  holds q, k and v stacked, so it counts as three);
- UNet: every Linear / 1x1 conv weight inside a transformer (`transformer_blocks`, `proj_in`, `proj_out`);
  with conv LoRA also the ResNet layers (`in_layers.2`, `out_layers.3`, `emb_layers.1`, `skip_connection`),
  the downsamplers (`op`) and upsamplers (`conv`).

A module of rank r adapting a weight (out, in, k, k) has r * in * k * k + out * r parameters, plus its alpha.
Pure: no torch. The tests check the count against a network built on the tiny model, in both layouts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from networks.sdxl_keys import TE1_PREFIX, TE2_PREFIX, UNET_PREFIX, unet_diffusers_to_original

Shape = tuple[int, ...]

_TE_LAYER = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.weight")
_TE2_OPEN_CLIP = {
    "attn.out_proj.weight": "self_attn.out_proj",
    "mlp.c_fc.weight": "mlp.fc1",
    "mlp.c_proj.weight": "mlp.fc2",
}
_TE2_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_CONV_LAYERS = ("in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection", "op", "conv")


@dataclass(frozen=True)
class LoRALayer:
    """One layer a LoRA module adapts: its sd-scripts name and the shape of the weight it adapts."""

    lora_name: str
    shape: Shape

    @property
    def is_conv3x3(self) -> bool:
        return len(self.shape) == 4 and tuple(self.shape[2:]) != (1, 1)

    def parameters(self, rank: int) -> int:
        """LoRA parameters at `rank` (down, up and the alpha scalar)."""
        inner = 1
        for size in self.shape[1:]:
            inner *= size
        return rank * inner + self.shape[0] * rank + 1


def _te_layers(shapes: Mapping[str, Shape], prefix: str, lora_prefix: str) -> list[LoRALayer]:
    layers = []
    for key, shape in shapes.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        found = _TE_LAYER.fullmatch(name)
        if found:
            layers.append(
                LoRALayer(
                    f"{lora_prefix}_text_model_encoder_layers_{found[1]}_{found[2]}".replace(".", "_"), tuple(shape)
                )
            )
            continue
        block = _TE2_RESBLOCK.fullmatch(name)
        if block is None:
            continue
        base = f"{lora_prefix}_text_model_encoder_layers_{block[1]}_"
        if block[2] == "attn.in_proj_weight":  # q, k, v stacked along dim 0
            third = (shape[0] // 3, *shape[1:])
            layers += [LoRALayer(f"{base}self_attn_{part}_proj", third) for part in "qkv"]
        elif block[2] in _TE2_OPEN_CLIP:
            layers.append(LoRALayer(base + _TE2_OPEN_CLIP[block[2]].replace(".", "_"), tuple(shape)))
    return layers


def _unet_layers(
    shapes: Mapping[str, Shape], to_original: Callable[[str], str | None], include_conv: bool
) -> list[LoRALayer]:
    layers = []
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) not in (2, 4):
            continue
        module = to_original(key[: -len(".weight")])
        if module is None:
            continue
        parts = module.split(".")
        in_transformer = "transformer_blocks" in parts or parts[-1] in ("proj_in", "proj_out")
        if in_transformer:
            if len(shape) == 4 and tuple(shape[2:]) != (1, 1):
                continue
        elif not (include_conv and _is_conv_layer(module)):
            continue
        layers.append(LoRALayer(f"lora_unet_{module.replace('.', '_')}", tuple(shape)))
    return layers


def _is_conv_layer(module: str) -> bool:
    """A layer of a ResNet block, downsampler or upsampler (original names); not the UNet's own conv_in/out."""
    if module.startswith(("input_blocks.0.", "out.", "time_embed.", "label_emb.")):
        return False
    return module.endswith(tuple(f".{layer}" for layer in _CONV_LAYERS))


def _original_unet_name(name: str) -> str | None:
    return name


def _diffusers_unet_name(name: str) -> str | None:
    try:
        return unet_diffusers_to_original(name)
    except ValueError:
        return None


def single_file_lora_layers(shapes: Mapping[str, Shape], include_conv: bool) -> dict[str, list[LoRALayer]]:
    """The layers a LoRA adapts, per component ("te1", "te2", "unet"), from an original-layout checkpoint."""
    unet = {key[len(UNET_PREFIX) :]: shape for key, shape in shapes.items() if key.startswith(UNET_PREFIX)}
    return {
        "te1": _te_layers(shapes, TE1_PREFIX, "lora_te1"),
        "te2": _te_layers(shapes, TE2_PREFIX, "lora_te2"),
        "unet": _unet_layers(unet, _original_unet_name, include_conv),
    }


def diffusers_lora_layers(
    te1: Mapping[str, Shape], te2: Mapping[str, Shape], unet: Mapping[str, Shape], include_conv: bool
) -> dict[str, list[LoRALayer]]:
    """The same from a diffusers folder's three weight files (names as diffusers / transformers write them)."""
    return {
        "te1": _te_layers(te1, "", "lora_te1"),
        "te2": _te_layers(te2, "", "lora_te2"),
        "unet": _unet_layers(unet, _diffusers_unet_name, include_conv),
    }


def lora_parameter_count(
    layers: Mapping[str, list[LoRALayer]],
    *,
    dim: int,
    conv_dim: int | None,
    train_unet: bool,
    train_text_encoder: bool,
    unet_rank: Callable[[LoRALayer], int | None] | None = None,
) -> tuple[int, int]:
    """(parameters, tensors) of the LoRA: text encoders at `dim`, UNet layers at `dim` (3x3 convs at `conv_dim`,
    none without it), or at `unet_rank(layer)` when given (block dims; None or 0: no module)."""
    parameters = tensors = 0
    components = (["te1", "te2"] if train_text_encoder else []) + (["unet"] if train_unet else [])
    for component in components:
        for layer in layers.get(component, []):
            if component != "unet":
                rank = dim
            elif unet_rank is not None:
                rank = unet_rank(layer)
            else:
                rank = conv_dim if layer.is_conv3x3 else dim
            if rank:
                parameters += layer.parameters(rank)
                tensors += 3
    return parameters, tensors
