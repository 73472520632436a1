"""Reading and writing LoRA files (safetensors, sd-scripts key names, string metadata)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from library.atomic import atomic_path
from library.errors import UserInputError


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
) -> None:
    """Write LoRA tensors atomically; every tensor (alpha too) cast to `dtype`; hashes added to metadata."""
    tensors = {}
    for key, value in state_dict.items():
        value = value.detach().to("cpu")
        if dtype is not None:
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    metadata = dict(metadata or {})
    if metadata:
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = addnet_hashes(tensors, metadata)
    with atomic_path(file) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or None)


def normalize_lora_key(key: str) -> str:
    """A key in today's sd-scripts spelling: older SDXL files (and tools that followed transformers'
    module names) wrote text-encoder names without the `text_model_` level, e.g.
    `lora_te1_encoder_layers_0_self_attn_q_proj` for `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`."""
    for prefix in ("lora_te1_", "lora_te2_"):
        if key.startswith(prefix) and not key.startswith(f"{prefix}text_model_"):
            return f"{prefix}text_model_{key[len(prefix):]}"
    return key


def load_lora_file(file: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA safetensors file, keys normalised to today's sd-scripts names."""
    if not os.path.isfile(file):
        raise UserInputError(f"LoRA file not found: {file}")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {normalize_lora_key(key): f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # safetensors raises its own error types for a broken header
        raise UserInputError(f"cannot read LoRA file {file}: {error}") from None
    return tensors, metadata
