"""Reading and writing LoRA files (safetensors, sd-scripts key names, string metadata)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from library.errors import UserInputError
from library.files.atomic import write_bytes_atomic
from library.files.finite import check_finite_for_saving


def addnet_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) as sd-webui-additional-networks / A1111 compute them.

    Both hash the file as it would be written with only the `ss_*` metadata (so user-added metadata
    does not change them): the new hash is sha256 of everything after the header, the legacy one
    sha256 of 64 KiB at offset 1 MiB, first 8 hex digits.
    """
    training_metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save(dict(tensors), training_metadata)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    buffer = io.BytesIO(data)
    buffer.seek(0x100000)
    legacy_hash = hashlib.sha256(buffer.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy_hash


def save_lora_file(
    state_dict: Mapping[str, torch.Tensor],
    file: str | os.PathLike,
    dtype: torch.dtype | None,
    metadata: Mapping[str, str] | None,
    what: str = "LoRA file",
) -> None:
    """Write LoRA tensors atomically; every tensor (alpha too) cast to `dtype`; hashes added to metadata. Refused
    (NonFiniteError) when a tensor holds a NaN or infinity as stored, so a broken file never replaces a good one.

    Serialised in memory (the hashes need the bytes anyway) and written by Python, so a full disk is an OSError
    with its errno, reported as one line by `library.files.atomic`."""
    write_bytes_atomic(file, lora_file_bytes(state_dict, file, dtype, metadata), what=what)


def lora_file_bytes(
    state_dict: Mapping[str, torch.Tensor],
    file: str | os.PathLike,
    dtype: torch.dtype | None,
    metadata: Mapping[str, str] | None,
) -> bytes:
    """The bytes `save_lora_file` writes to `file` (named in the refusal when a tensor is not finite)."""
    check_finite_for_saving(state_dict, dtype, file)
    tensors = {}
    for key, value in state_dict.items():
        value = value.detach().to("cpu")
        if dtype is not None:
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    metadata = dict(metadata or {})
    if metadata:
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = addnet_hashes(tensors, metadata)
    return save(tensors, metadata or None)


def normalize_lora_key(key: str) -> str:
    """A key in today's sd-scripts spelling: older SDXL files (and tools that followed transformers'
    module names) wrote text-encoder names without the `text_model_` level, e.g.
    `lora_te1_encoder_layers_0_self_attn_q_proj` for `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`."""
    for prefix in ("lora_te1_", "lora_te2_"):
        if key.startswith(prefix) and not key.startswith(f"{prefix}text_model_"):
            return f"{prefix}text_model_{key[len(prefix) :]}"
    return key


SD1_TEXT_ENCODER_PREFIX = "lora_te_"
"""SD 1.x/2.x LoRA files have one text encoder: `lora_te_text_model_...` (SDXL: `lora_te1_` / `lora_te2_`)."""
DIFFUSERS_UNET_PARTS = ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")
"""UNet names in diffusers' layout: how sd-scripts names SD 1.x/2.x LoRAs (its SDXL files use the original one)."""
LYCORIS_MARKS = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".oft_blocks", ".dora_scale")


def check_lora_file(file: str | os.PathLike, flag: str) -> dict:
    """The header entries of an SDXL LoRA file in sd-scripts' format, read before any model loads; one
    UserInputError line naming the file, with advice that fits, for a file that is missing, damaged, truncated,
    not a LoRA, another LoRA format, or a LoRA of another architecture (SD 1.x/2.x)."""
    from library.files.weight_files import read_safetensors_header

    file = Path(file)
    if not file.exists():
        raise UserInputError(f"{flag}: file not found: {file}")
    try:
        entries, _, _ = read_safetensors_header(file)
    except UserInputError as error:
        raise UserInputError(
            f"{flag}: {error}; give a LoRA .safetensors file saved by this trainer or "
            "sd-scripts (copy it again if it was cut short)"
        ) from None
    names = list(entries)
    downs = [name for name in names if name.endswith(".lora_down.weight")]
    if not downs:
        if any(name.endswith(LYCORIS_MARKS) for name in names):
            kind = "a LyCORIS (LoHa / LoKr / ...) file"
        elif any(".lora_A." in name or ".lora.down." in name or "lora_A.weight" in name for name in names):
            kind = "a diffusers / PEFT-format LoRA (lora_A / lora_B names)"
        else:
            kind = f"not a LoRA file (no *.lora_down.weight among its {len(names)} tensors)"
        raise UserInputError(
            f"{flag}: {file} is {kind}; networks.lora continues only LoRA files in sd-scripts' "
            "format: drop the flag or give such a file"
        )
    modules = [normalize_lora_key(name).partition(".")[0] for name in downs]
    foreign = [
        name
        for name in modules
        if name.startswith(SD1_TEXT_ENCODER_PREFIX + "text_model") or name.startswith(DIFFUSERS_UNET_PARTS)
    ]
    if foreign:
        raise UserInputError(
            f"{flag}: {file} is a LoRA for SD 1.x/2.x, not SDXL (module names like {foreign[0]}): it cannot "
            "continue on an SDXL model, with or without --dim_from_weights; drop the flag to train a new LoRA"
        )
    if not any(name.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for name in modules):
        raise UserInputError(
            f"{flag}: {file} names no SDXL module (e.g. {modules[0]}): it is not an SDXL LoRA "
            "from this trainer or sd-scripts; drop the flag or give such a file"
        )
    return entries


def load_lora_file(file: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA safetensors file, keys normalised to today's sd-scripts names."""
    if not os.path.isfile(file):
        raise UserInputError(f"LoRA file not found: {file}")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {normalize_lora_key(key): f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # safetensors raises its own error types for a broken header
        raise UserInputError(
            f"cannot read LoRA file {file} ({str(error)[:200]}): it is damaged or not a "
            "safetensors file; give a LoRA file saved by this trainer or sd-scripts"
        ) from None
    return tensors, metadata
