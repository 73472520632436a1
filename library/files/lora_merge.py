"""Merge LoRA files into an SDXL single file (original layout), tensor by tensor.

W <- W + ratio * (alpha / rank) * up @ down  (3x3 conv LoRAs: the composed kernel), for every module of every LoRA.

The merge works on the single file's tensors by name, never on loaded models: the base file is read one tensor at
a time and the result is written one tensor at a time, so memory stays near one tensor of the model plus the LoRA
files. Tensors no LoRA touches are copied byte for byte. LoRA module names (sd-scripts: ``lora_unet_<original
name>``, ``lora_te1_text_model_...``, ``lora_te2_text_model_...``) map to single-file keys as follows:

- UNet: ``lora_unet_input_blocks_4_1_proj_in`` -> ``model.diffusion_model.input_blocks.4.1.proj_in.weight``;
- TE1 (HF CLIP names): ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``
  -> ``conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight``;
- TE2 (open_clip names): q/k/v update their third of ``transformer.resblocks.N.attn.in_proj_weight``, out_proj is
  ``attn.out_proj``, fc1 / fc2 are ``mlp.c_fc`` / ``mlp.c_proj``.

Text-encoder names without ``text_model_`` (``lora_te1_encoder_layers_0_...``, written by some older tools) map too.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from library.errors import NonFiniteError, UserInputError
from library.files.atomic import atomic_path
from library.files.lora_io import load_lora_file
from library.files.weight_files import TensorEntry, read_safetensors_header, read_tensor, safetensors_dtypes
from networks.sdxl_keys import TE1_PREFIX, TE2_PREFIX, UNET_PREFIX

LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_SHOWN_NAMES = 5  # how many offending names an error message lists
_DIFFUSERS_UNET_NAMES = ("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_")

_DTYPES: Mapping[str, torch.dtype] = safetensors_dtypes()  # safetensors dtype codes -> torch dtypes
_CODES: Mapping[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}
_FLOAT_CODES = frozenset(code for code, dtype in _DTYPES.items() if dtype.is_floating_point)


# --- Names: LoRA module -> single-file weight ----------------------------------------------------------------------
@dataclass(frozen=True)
class MergeTarget:
    """Where one LoRA module's weight lives in the single file: a tensor, or a band of its rows (fused q/k/v)."""

    key: str
    rows: tuple[int, int] | None = None  # [start, stop) of the first dimension, None for the whole tensor


_TE2_LAYER = re.compile(
    r"transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|"
    r"mlp\.c_fc\.weight|mlp\.c_proj\.weight)"
)
_TE2_MODULES = {
    "attn.out_proj.weight": "self_attn_out_proj",
    "mlp.c_fc.weight": "mlp_fc1",
    "mlp.c_proj.weight": "mlp_fc2",
}


def lora_target_table(shapes: Mapping[str, Sequence[int]]) -> dict[str, MergeTarget]:
    """LoRA module name -> its target, for a single file with these tensor names and shapes.

    Covers every Linear / Conv weight of the UNet (2-D or 4-D ``.weight``), the Linear weights of TE1's encoder
    layers, and TE2's attention (q, k, v, out_proj) and MLP (fc1, fc2) - each text-encoder name also without
    ``text_model_``.
    """
    table: dict[str, MergeTarget] = {}

    def add(name: str, target: MergeTarget) -> None:
        if name in table and table[name] != target:
            raise ValueError(f"two weights map to the LoRA name {name}: {table[name].key}, {target.key}")
        table[name] = target

    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith(".weight") and len(shape) in (2, 4):
            add("lora_unet_" + key[len(UNET_PREFIX) : -len(".weight")].replace(".", "_"), MergeTarget(key))
        elif key.startswith(TE1_PREFIX + "text_model.encoder.layers.") and key.endswith(".weight") and len(shape) == 2:
            module = key[len(TE1_PREFIX + "text_model.") : -len(".weight")].replace(".", "_")
            add(f"lora_te1_text_model_{module}", MergeTarget(key))
            add(f"lora_te1_{module}", MergeTarget(key))
        elif key.startswith(TE2_PREFIX) and (m := _TE2_LAYER.fullmatch(key[len(TE2_PREFIX) :])):
            layer, tensor = m.groups()
            if tensor == "attn.in_proj_weight":
                width = shape[0] // 3
                modules = {
                    f"self_attn_{p}_proj": MergeTarget(key, (i * width, (i + 1) * width)) for i, p in enumerate("qkv")
                }
            else:
                modules = {_TE2_MODULES[tensor]: MergeTarget(key)}
            for module, target in modules.items():
                add(f"lora_te2_text_model_encoder_layers_{layer}_{module}", target)
                add(f"lora_te2_encoder_layers_{layer}_{module}", target)
    return table


# --- The maths -----------------------------------------------------------------------------------------------------
def _kernel_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """A weight's shape after the output dimension, a 1x1 kernel dropped (a 1x1 conv is a Linear)."""
    rest = tuple(shape[1:])
    return rest[:1] if rest[1:] == (1, 1) else rest


def add_lora_(
    weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float | None, multiplier: float = 1.0
) -> torch.Tensor:
    """``weight += multiplier * (alpha / rank) * up @ down`` in place, in ``weight``'s dtype; returns ``weight``.

    Linear ``[out, in]`` and 1x1 conv ``[out, in, 1, 1]`` are one matrix product. A kxk conv LoRA (down kxk, up
    1x1) adds the composed kernel ``delta[o, i, h, w] = sum_r up[o, r] * down[r, i, h, w]`` - exact, since a 1x1
    conv after a kxk conv is one kxk conv with the same stride and padding - which is the same product on the
    kernels flattened to ``[out, in*k*k]``. Alpha 0 or None means alpha = rank, as in the LoRA module.
    ``addmm_`` on the flattened view needs no temporary the size of the weight.
    """
    rank = down.shape[0]
    if up.dim() not in (2, 4) or tuple(up.shape[2:]) not in ((), (1, 1)) or up.shape[1] != rank:
        raise ValueError(f"unsupported LoRA shapes: down {tuple(down.shape)}, up {tuple(up.shape)}")
    if up.shape[0] != weight.shape[0] or _kernel_shape(down.shape) != _kernel_shape(weight.shape):
        raise ValueError(
            f"LoRA shapes down {tuple(down.shape)}, up {tuple(up.shape)} do not fit a weight {tuple(weight.shape)}"
        )
    scale = multiplier * (alpha if alpha else rank) / rank
    flat = weight.view(weight.shape[0], -1)
    flat.addmm_(up.reshape(up.shape[0], rank).to(weight.dtype), down.reshape(rank, -1).to(weight.dtype), alpha=scale)
    return weight


def lora_weight_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """(alpha / rank) * up @ down shaped like the adapted layer's weight (``[out, in]`` or ``[out, in, kh, kw]``)."""
    shape = (up.shape[0], *down.shape[1:])
    return add_lora_(torch.zeros(shape, dtype=down.dtype), down, up, alpha)


# --- LoRA files ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoRAModuleWeights:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None


def _describe_names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN_NAMES])
    return shown + (f" and {len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else "")


def lora_modules(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, LoRAModuleWeights]:
    """Group a LoRA state dict into modules; raises UserInputError for anything but plain LoRA tensors."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in tensors.items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            foreign.append(key)
        else:
            parts.setdefault(key[: -len(suffix)], {})[suffix] = tensor
    if foreign:
        raise UserInputError(
            f"{source}: not a plain LoRA (lora_down/lora_up/alpha); cannot merge {len(foreign)} tensors such as "
            f"{_describe_names(sorted(foreign))}"
        )
    incomplete = sorted(n for n, p in parts.items() if ".lora_down.weight" not in p or ".lora_up.weight" not in p)
    if incomplete:
        raise UserInputError(f"{source}: modules without both lora_down and lora_up: {_describe_names(incomplete)}")
    return {
        name: LoRAModuleWeights(
            down=p[".lora_down.weight"],
            up=p[".lora_up.weight"],
            alpha=float(p[".alpha"].float().item()) if ".alpha" in p else None,
        )
        for name, p in parts.items()
    }


# --- safetensors, one tensor at a time -----------------------------------------------------------------------------
def _read_tensor(f: BinaryIO, name: str, entry: TensorEntry, data_start: int) -> torch.Tensor:
    """One tensor read from an open safetensors file straight into its own memory (no mmap, no extra copy)."""
    if entry.dtype not in _DTYPES:
        raise UserInputError(f"{f.name}: cannot merge into a tensor of dtype {entry.dtype}")
    return read_tensor(
        f, data_start + entry.start, _DTYPES[entry.dtype], entry.shape, entry.end - entry.start, key=name
    )


def _copy_bytes(src: BinaryIO, dst: BinaryIO, start: int, size: int, chunk: int = 1 << 26) -> None:
    """Copy ``size`` bytes at ``start`` of ``src`` to the end of ``dst``, 64 MiB at a time."""
    src.seek(start)
    while size > 0:
        data = src.read(min(chunk, size))
        if not data:
            raise UserInputError(f"{src.name}: truncated safetensors file")
        dst.write(data)
        size -= len(data)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (a contiguous tensor's own memory)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data


# --- The merge -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoRAToMerge:
    path: Path
    ratio: float


@dataclass(frozen=True)
class MergeReport:
    """What a merge did."""

    modules: tuple[int, ...]  # modules merged from each LoRA, in order
    changed_keys: tuple[str, ...]  # single-file tensors that received a LoRA delta


def _plan(
    shapes: Mapping[str, Sequence[int]], loras: Sequence[LoRAToMerge]
) -> tuple[dict[str, list[tuple[MergeTarget, LoRAModuleWeights, float]]], list[int]]:
    """Target key -> the (target, module, ratio) updates it receives; also the module count of each LoRA."""
    table = lora_target_table(shapes)
    plan: dict[str, list[tuple[MergeTarget, LoRAModuleWeights, float]]] = {}
    counts = []
    for lora in loras:
        tensors, _ = load_lora_file(lora.path)
        modules = lora_modules(tensors, str(lora.path))
        unknown = sorted(name for name in modules if name not in table)
        if unknown:
            hint = ""
            if any(n.startswith(_DIFFUSERS_UNET_NAMES) for n in unknown):
                hint = " (diffusers-layout UNet names: convert the LoRA to sd-scripts' original-layout names first)"
            raise UserInputError(
                f"{lora.path}: {len(unknown)} LoRA modules match no weight of the model: {_describe_names(unknown)}"
                f"{hint}"
            )
        seen: dict[MergeTarget, str] = {}
        for name, weights in sorted(modules.items()):
            target = table[name]
            if target in seen:
                raise UserInputError(f"{lora.path}: {seen[target]} and {name} are the same module")
            seen[target] = name
            plan.setdefault(target.key, []).append((target, weights, lora.ratio))
        counts.append(len(modules))
    return plan, counts


def _merged_tensor(
    base: torch.Tensor, updates: Iterable[tuple[MergeTarget, LoRAModuleWeights, float]], merge_dtype: torch.dtype
) -> torch.Tensor:
    """The base tensor (a private copy, modified in place) plus every update, computed in ``merge_dtype``."""
    weight = base.to(merge_dtype)
    for target, module, ratio in updates:
        region = weight if target.rows is None else weight[target.rows[0] : target.rows[1]]
        try:
            add_lora_(region, module.down, module.up, module.alpha, ratio)
        except ValueError as error:
            rows = "" if target.rows is None else f" rows {target.rows[0]}:{target.rows[1]}"
            raise UserInputError(f"{target.key}{rows}: {error} (was the LoRA trained on another model?)") from None
    return weight


def merge_loras_into_single_file(
    base_path: str | Path,
    loras: Sequence[LoRAToMerge],
    out_path: str | Path,
    *,
    merge_dtype: torch.dtype = torch.float32,
    save_dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> MergeReport:
    """Write ``base`` with ``loras`` merged in to ``out_path`` (atomically), streaming one tensor at a time.

    Tensors keep the base file's dtype unless ``save_dtype`` is given (then every floating-point tensor is cast to
    it); untouched tensors in their own dtype are copied byte for byte. ``metadata`` replaces the base file's.
    """
    entries, _, data_start = read_safetensors_header(base_path)
    plan, counts = _plan({k: e.shape for k, e in entries.items()}, loras)

    def out_code(entry: TensorEntry) -> str:
        return _CODES[save_dtype] if save_dtype is not None and entry.dtype in _FLOAT_CODES else entry.dtype

    def item_size(code: str) -> int:
        return _DTYPES[code].itemsize if code in _DTYPES else 1

    # Largest items first, as safetensors orders them, so every tensor stays aligned to its item size.
    names = sorted(entries, key=lambda k: (-item_size(out_code(entries[k])), k))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        entry = entries[name]
        code = out_code(entry)
        size = entry.end - entry.start
        if code != entry.dtype:
            size = size // item_size(entry.dtype) * item_size(code)
        header[name] = {"dtype": code, "shape": list(entry.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    with atomic_path(out_path) as tmp, open(base_path, "rb") as raw, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            entry = entries[name]
            code = out_code(entry)
            if name not in plan and code == entry.dtype:
                _copy_bytes(raw, out, data_start + entry.start, entry.end - entry.start)
                continue
            tensor = _read_tensor(raw, name, entry, data_start)
            if name in plan:
                tensor = _merged_tensor(tensor, plan[name], merge_dtype).to(_DTYPES[code])
                if not bool(torch.isfinite(tensor).all()):  # the temporary file goes; no broken model is written
                    raise NonFiniteError(
                        f"refusing to write {out_path}: {name} holds NaN or infinite values after "
                        f"merging (as {code}); lower the ratios or use --save_precision float"
                    )
            out.write(_tensor_bytes(tensor.to(_DTYPES[code])))
            del tensor
    return MergeReport(modules=tuple(counts), changed_keys=tuple(sorted(plan)))
