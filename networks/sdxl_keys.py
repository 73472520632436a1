"""Names and state dicts between diffusers' SDXL layout and the original (SGM / "ldm") single-file layout.

The original layout is what SDXL ``.safetensors`` checkpoints, ComfyUI, A1111/Forge and sd-scripts' LoRA files use:

- UNet: ``input_blocks.N.M`` / ``middle_block.M`` / ``output_blocks.N.M`` instead of diffusers'
  ``down_blocks`` / ``mid_block`` / ``up_blocks``; ResNet layers are ``in_layers`` / ``emb_layers`` /
  ``out_layers`` / ``skip_connection``; transformer blocks keep diffusers' inner names.
- VAE: ``encoder.down.I.block.J`` / ``decoder.up.I.block.J`` (decoder levels numbered in reverse) and a mid
  attention whose q/k/v/proj_out are 1x1 convolutions.
- TE1 (CLIP ViT-L): transformers' ``CLIPTextModel`` names under ``text_model.``.
- TE2 (OpenCLIP bigG): open_clip names, with q/k/v fused into ``attn.in_proj_weight``.

The name maps are pure string functions (no torch needed); the state-dict functions only slice, concatenate and
reshape tensors. For a loader that reads one tensor at a time, :func:`single_file_source` gives, per diffusers /
transformers parameter name, the single-file key and how to derive the tensor from it (:class:`TensorSource`).
The tables hold for SDXL's topology: 3 UNet levels with 2 layers per block, the first level
without attention, and a 4-level VAE - also for narrower models that keep it (the tiny test model).
diffusers ships the original -> diffusers direction only (``diffusers.loaders.single_file_utils``); the tests
check that it reads what these functions write back to identical tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the name maps are pure; torch is only needed by the state-dict functions' callers
    import torch

# --- SDXL UNet topology ------------------------------------------------------------------------------------------
UNET_LEVELS = 3
UNET_LAYERS_PER_BLOCK = 2
UNET_DOWN_LEVELS_WITH_ATTENTION = (1, 2)
UNET_UP_LEVELS_WITH_ATTENTION = (0, 1)

# Prefixes of the single file's sections.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."

# ResNet layer names: diffusers -> original.
_RESNET_LAYERS: Mapping[str, str] = MappingProxyType(
    {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }
)
_RESNET_LAYERS_INV: Mapping[str, str] = MappingProxyType({v: k for k, v in _RESNET_LAYERS.items()})


def _unet_block_table() -> dict[str, str]:
    """Diffusers module prefix -> original module prefix for every mappable module of the SDXL UNet."""
    table = {
        "conv_in": "input_blocks.0.0",
        "time_embedding": "time_embed",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding": "label_emb.0",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    # input_blocks: 0 is conv_in, then per level `layers` (resnet[, attention]) and one downsampler.
    for level in range(UNET_LEVELS):
        for layer in range(UNET_LAYERS_PER_BLOCK):
            index = level * (UNET_LAYERS_PER_BLOCK + 1) + layer + 1
            table[f"down_blocks.{level}.resnets.{layer}"] = f"input_blocks.{index}.0"
            if level in UNET_DOWN_LEVELS_WITH_ATTENTION:
                table[f"down_blocks.{level}.attentions.{layer}"] = f"input_blocks.{index}.1"
        if level < UNET_LEVELS - 1:
            index = (level + 1) * (UNET_LAYERS_PER_BLOCK + 1)
            table[f"down_blocks.{level}.downsamplers.0"] = f"input_blocks.{index}.0"
            table[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
    # output_blocks: per level `layers + 1` entries of (resnet[, attention][, upsampler]); the upsampler sits in
    # the level's last entry, after the attention when the level has one (SDXL: output_blocks.2.2, .5.2).
    for level in range(UNET_LEVELS):
        for layer in range(UNET_LAYERS_PER_BLOCK + 1):
            index = level * (UNET_LAYERS_PER_BLOCK + 1) + layer
            table[f"up_blocks.{level}.resnets.{layer}"] = f"output_blocks.{index}.0"
            if level in UNET_UP_LEVELS_WITH_ATTENTION:
                table[f"up_blocks.{level}.attentions.{layer}"] = f"output_blocks.{index}.1"
        if level < UNET_LEVELS - 1:
            index = level * (UNET_LAYERS_PER_BLOCK + 1) + UNET_LAYERS_PER_BLOCK
            slot = 2 if level in UNET_UP_LEVELS_WITH_ATTENTION else 1
            table[f"up_blocks.{level}.upsamplers.0"] = f"output_blocks.{index}.{slot}"
    return table


_UNET_TO_ORIGINAL: Mapping[str, str] = MappingProxyType(_unet_block_table())
_UNET_TO_DIFFUSERS: Mapping[str, str] = MappingProxyType({v: k for k, v in _UNET_TO_ORIGINAL.items()})


def _longest_prefix(name: str, table: Mapping[str, str]) -> str | None:
    """The longest key of ``table`` that equals ``name`` or is followed in it by a ".", or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in table:
            return candidate
    return None


def _is_resnet(diffusers_prefix: str) -> bool:
    return ".resnets." in diffusers_prefix


def unet_diffusers_to_original(name: str) -> str:
    """Map a diffusers SDXL UNet module or parameter name to the original (SGM) name.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``
    -> ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``;
    ``up_blocks.0.upsamplers.0.conv.weight`` -> ``output_blocks.2.2.conv.weight`` (SDXL's first two up levels have
    attention, so their upsampler is the third entry of the level's last output block). Raises ValueError for names
    with no counterpart (``down_blocks.1``, ``time_proj``, a ResNet's ``nonlinearity``...).
    """
    prefix = _longest_prefix(name, _UNET_TO_ORIGINAL)
    if prefix is None:
        raise ValueError(f"not a mappable SDXL UNet name (diffusers layout): {name!r}")
    rest = name[len(prefix) + 1 :].split(".") if len(name) > len(prefix) else []
    if _is_resnet(prefix) and rest:
        if rest[0] not in _RESNET_LAYERS:
            raise ValueError(f"not a mappable SDXL UNet ResNet name (diffusers layout): {name!r}")
        rest = _RESNET_LAYERS[rest[0]].split(".") + rest[1:]
    return ".".join([_UNET_TO_ORIGINAL[prefix], *rest])


def unet_original_to_diffusers(name: str) -> str:
    """Map an original (SGM) SDXL UNet module or parameter name to diffusers' name; inverse of
    :func:`unet_diffusers_to_original`. Raises ValueError for names with no counterpart."""
    prefix = _longest_prefix(name, _UNET_TO_DIFFUSERS)
    if prefix is None:
        raise ValueError(f"not a mappable SDXL UNet name (original layout): {name!r}")
    target = _UNET_TO_DIFFUSERS[prefix]
    rest = name[len(prefix) + 1 :] if len(name) > len(prefix) else ""
    if _is_resnet(target) and rest:
        layer = _longest_prefix(rest, _RESNET_LAYERS_INV)
        if layer is None:
            raise ValueError(f"not a mappable SDXL UNet ResNet name (original layout): {name!r}")
        rest = _RESNET_LAYERS_INV[layer] + rest[len(layer) :]
    return f"{target}.{rest}" if rest else target


def unet_state_dict_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers SDXL UNet state dict to the original layout (tensors are shared, not copied)."""
    return {unet_diffusers_to_original(k): v for k, v in sd.items()}


# --- VAE ---------------------------------------------------------------------------------------------------------
VAE_LEVELS = 4
_VAE_FIXED: Mapping[str, str] = MappingProxyType(
    {
        "conv_norm_out": "norm_out",
        "mid_block.resnets.0": "mid.block_1",
        "mid_block.resnets.1": "mid.block_2",
        "mid_block.attentions.0": "mid.attn_1",
    }
)
_VAE_ATTENTION_LAYERS: Mapping[str, str] = MappingProxyType(
    {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
)
_VAE_ATTENTION_WEIGHTS = frozenset({"q.weight", "k.weight", "v.weight", "proj_out.weight"})


def vae_diffusers_to_original(name: str, num_levels: int = VAE_LEVELS) -> str:
    """Map a diffusers AutoencoderKL parameter name to the original LDM VAE name.

    ``decoder.up_blocks.0.resnets.1.conv1.weight`` -> ``decoder.up.3.block.1.conv1.weight`` (the decoder's levels
    are numbered from the lowest resolution in diffusers, from the highest in the original).
    """
    half, _, rest = name.partition(".")
    if half not in ("encoder", "decoder"):
        return name  # quant_conv, post_quant_conv
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        level, block, tail = m.groups()
        rest = f"down.{level}.block.{block}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)", rest):
        rest = f"down.{m.group(1)}.downsample.{m.group(2)}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        level, block, tail = m.groups()
        rest = f"up.{num_levels - 1 - int(level)}.block.{block}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        rest = f"up.{num_levels - 1 - int(m.group(1))}.upsample.{m.group(2)}"
    else:
        prefix = _longest_prefix(rest, _VAE_FIXED)
        if prefix is not None:
            tail = rest[len(prefix) + 1 :]
            if prefix.startswith("mid_block.attentions") and tail:
                layer = _longest_prefix(tail, _VAE_ATTENTION_LAYERS)
                if layer is None:
                    raise ValueError(f"not a mappable SDXL VAE name (diffusers layout): {name!r}")
                tail = _VAE_ATTENTION_LAYERS[layer] + tail[len(layer) :]
            else:
                tail = tail.replace("conv_shortcut", "nin_shortcut")
            rest = f"{_VAE_FIXED[prefix]}.{tail}" if tail else _VAE_FIXED[prefix]
    return f"{half}.{rest}"


def vae_state_dict_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to the LDM layout; the mid attention's q/k/v/proj_out weights
    become 1x1 conv weights ``[C, C, 1, 1]`` as in the original."""
    levels = 1 + max(
        (int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))),
        default=VAE_LEVELS - 1,
    )
    out = {}
    for key, tensor in sd.items():
        new = vae_diffusers_to_original(key, levels)
        is_attention_weight = ".".join(new.split(".")[-2:]) in _VAE_ATTENTION_WEIGHTS and ".mid.attn_1." in new
        if is_attention_weight and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[new] = tensor
    return out


# --- Text encoders -----------------------------------------------------------------------------------------------
def te_name_with_text_model(name: str) -> str:
    """Put a CLIP text model name under ``text_model.`` as the original file (and sd-scripts' LoRA names) do.

    transformers >= 5.6 dropped that level from ``CLIPTextModel``'s names (``encoder.layers.0.self_attn.q_proj``);
    ``CLIPTextModelWithProjection`` keeps it, and its ``text_projection`` stays at the top.
    """
    if name.startswith("text_model.") or name.startswith("text_projection"):
        return name
    return "text_model." + name


def te1_state_dict_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a CLIPTextModel (TE1) state dict to the original layout: HF names under ``text_model.``.

    Buffers such as ``position_ids`` are dropped (transformers rebuilds them; diffusers' loader does not take them).
    """
    return {te_name_with_text_model(k): v for k, v in sd.items() if not k.endswith("position_ids")}


_OPEN_CLIP_LAYER: Mapping[str, str] = MappingProxyType(
    {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
)


# transformers names (under ``text_model.``) of TE2 that map one to one to open_clip names outside the layers.
_OPEN_CLIP_FIXED: Mapping[str, str] = MappingProxyType(
    {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
)


def te2_state_dict_to_original(
    sd: Mapping[str, torch.Tensor], logit_scale: float = math.log(100.0)
) -> dict[str, torch.Tensor]:
    """Convert a CLIPTextModelWithProjection (TE2) state dict to open_clip's layout.

    q/k/v projections are concatenated into ``attn.in_proj_weight`` / ``in_proj_bias`` (in that order);
    ``text_projection`` is stored as ``[hidden, projection]`` (the transpose of the Linear weight);
    ``logit_scale`` (unused by SDXL, present in the original file) is a 0-dim tensor set to ``logit_scale``.
    """
    import torch

    sd = {te_name_with_text_model(k): v for k, v in sd.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        if key in _OPEN_CLIP_FIXED:
            out[_OPEN_CLIP_FIXED[key]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = tensor
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            layer, module, kind = m.groups()
            if module not in _OPEN_CLIP_LAYER:
                raise ValueError(f"not a mappable SDXL TE2 name: {key!r}")
            out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{kind}"] = tensor
        else:
            raise ValueError(f"not a mappable SDXL TE2 name: {key!r}")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"TE2 layer {layer}: incomplete q/k/v {kind}s: {sorted(parts)}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    ref = out["ln_final.weight"]
    out["logit_scale"] = torch.tensor(logit_scale, dtype=ref.dtype, device=ref.device)
    return out


# --- The single file ---------------------------------------------------------------------------------------------
def sdxl_to_single_file(
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor],
    te1_sd: Mapping[str, torch.Tensor],
    te2_sd: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Combine the four diffusers/transformers state dicts into one SDXL single-file state dict (original layout,
    the prefixes ``model.diffusion_model.``, ``first_stage_model.``, ``conditioner.embedders.0.transformer.`` and
    ``conditioner.embedders.1.model.``)."""
    sections = (
        (UNET_PREFIX, unet_state_dict_to_original(unet_sd)),
        (VAE_PREFIX, vae_state_dict_to_original(vae_sd)),
        (TE1_PREFIX, te1_state_dict_to_original(te1_sd)),
        (TE2_PREFIX, te2_state_dict_to_original(te2_sd)),
    )
    return {prefix + key: tensor for prefix, sd in sections for key, tensor in sd.items()}


# --- Per-tensor sources: where one diffusers/transformers tensor lives in the single file ------------------------
# The component names used by the loader (the fields of ``library.model.loading.SDXLModels``) and their file sections.
SECTION_PREFIXES: Mapping[str, str] = MappingProxyType(
    {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder1": TE1_PREFIX, "text_encoder2": TE2_PREFIX}
)
_QKV = ("q", "k", "v")


@dataclass(frozen=True)
class TensorSource:
    """Where one diffusers/transformers tensor lives in an original-layout file and how it is derived from it.

    A loader that reads one tensor at a time needs this per name instead of a whole-state-dict conversion: it reads
    ``key`` (only ``rows(stored_shape)`` of it when set) and passes the result through :meth:`derive`.
    """

    key: str
    qkv_index: int | None = None  # 0/1/2: q, k or v, a third of the rows of open_clip's fused in_proj
    transpose: bool = False  # open_clip stores text_projection as [hidden, projection], the Linear's transpose
    squeeze_1x1: bool = False  # the VAE mid attention's q/k/v/proj_out weights are 1x1 convs in the file

    def rows(self, stored: tuple[int, ...]) -> tuple[int, int] | None:
        """The [start, stop) rows of the stored tensor to read, or None for all of it."""
        if self.qkv_index is None:
            return None
        third = stored[0] // len(_QKV)
        return self.qkv_index * third, (self.qkv_index + 1) * third

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The derived tensor's shape, given the stored tensor's shape (to check a file before reading it)."""
        shape = tuple(stored)
        if (rows := self.rows(shape)) is not None:
            shape = (rows[1] - rows[0], *shape[1:])
        if self.transpose:
            shape = shape[::-1]
        if self.squeeze_1x1 and len(shape) == 4 and shape[2:] == (1, 1):
            shape = shape[:2]
        return shape

    def derive(self, read: torch.Tensor) -> torch.Tensor:
        """The diffusers/transformers tensor from what was read (already cut to :meth:`rows`)."""
        if self.transpose:
            read = read.T.contiguous()
        if self.squeeze_1x1 and read.ndim == 4 and tuple(read.shape[2:]) == (1, 1):
            read = read.reshape(read.shape[:2])
        return read


def te2_source(name: str) -> TensorSource:
    """The open_clip source (section-relative key) of one ``CLIPTextModelWithProjection`` parameter name.

    ``text_model.encoder.layers.3.self_attn.k_proj.weight`` -> rows [H, 2H) of
    ``transformer.resblocks.3.attn.in_proj_weight``; ``text_projection.weight`` -> the transpose of
    ``text_projection``. The inverse of :func:`te2_state_dict_to_original`, one name at a time.
    """
    name = te_name_with_text_model(name)
    if name in _OPEN_CLIP_FIXED:
        return TensorSource(_OPEN_CLIP_FIXED[name])
    if name == "text_projection.weight":
        return TensorSource("text_projection", transpose=True)
    if m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", name):
        layer, part, kind = m.groups()
        return TensorSource(f"transformer.resblocks.{layer}.attn.in_proj_{kind}", qkv_index=_QKV.index(part))
    if m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
        layer, module, kind = m.groups()
        if module in _OPEN_CLIP_LAYER:
            return TensorSource(f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{kind}")
    raise ValueError(f"not a mappable SDXL TE2 name: {name!r}")


def vae_source(name: str, num_levels: int = VAE_LEVELS) -> TensorSource:
    """The LDM source (section-relative key) of one ``AutoencoderKL`` parameter name; the mid attention's
    q/k/v/proj_out weights are stored as ``[C, C, 1, 1]`` and squeezed to the Linear's ``[C, C]``."""
    key = vae_diffusers_to_original(name, num_levels)
    is_attention_weight = ".mid.attn_1." in key and ".".join(key.split(".")[-2:]) in _VAE_ATTENTION_WEIGHTS
    return TensorSource(key, squeeze_1x1=is_attention_weight)


def single_file_source(component: str, name: str, vae_levels: int = VAE_LEVELS) -> TensorSource:
    """The full single-file source of parameter ``name`` of ``component`` ("unet", "vae", "text_encoder1",
    "text_encoder2"). Raises ValueError for names without a counterpart in the original layout."""
    if component == "unet":
        local = TensorSource(unet_diffusers_to_original(name))
    elif component == "vae":
        local = vae_source(name, vae_levels)
    elif component == "text_encoder1":
        local = TensorSource(te_name_with_text_model(name))
    elif component == "text_encoder2":
        local = te2_source(name)
    else:
        raise ValueError(f"not an SDXL component: {component!r} (expected one of {sorted(SECTION_PREFIXES)})")
    return replace(local, key=SECTION_PREFIXES[component] + local.key)
