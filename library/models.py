"""Load SDXL offline: an original-layout single file (``.safetensors`` / ``.ckpt``) or a diffusers folder.

Nothing here touches the network. diffusers' single-file loader goes to the Hugging Face Hub for the component
configs unless it is given a local diffusers-format folder (``config=``), even with ``local_files_only``; so a
single file is always loaded with a local config folder, resolved in this order:

1. the ``config_dir`` argument;
2. a folder beside the file named ``<stem>_diffusers`` or ``<stem>_config`` that holds ``model_index.json``;
3. the shipped ``configs/sdxl`` (SDXL base 1.0 configs and the CLIP tokenizers, no weights).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from library.errors import UserInputError
from library.safetensors_header import read_safetensors_header

if TYPE_CHECKING:  # torch is imported only when loading, so the CLI's path check stays cheap
    import torch

SHIPPED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "sdxl"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
CONFIG_DIR_SUFFIXES = ("_diffusers", "_config")
_FLAG = "--pretrained_model_name_or_path"
_HINT = "give an SDXL .safetensors single file or a diffusers folder"


@dataclass
class SDXLModels:
    """The SDXL components the trainer uses, plus where they came from."""

    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder1: Any  # transformers CLIPTextModel (CLIP ViT-L/14 text tower)
    text_encoder2: Any  # transformers CLIPTextModelWithProjection (OpenCLIP bigG text tower)
    tokenizer1: Any  # CLIPTokenizer, pads with <|endoftext|>
    tokenizer2: Any  # CLIPTokenizer, pads with "!" (id 0)
    scheduler: Any  # the pipeline's scheduler (EulerDiscreteScheduler for SDXL base), for sampling
    source: Path  # the file or folder given
    config_dir: Path  # the diffusers-format folder the configs came from (the folder itself for a folder)

    @property
    def is_single_file(self) -> bool:
        """True when the weights came from one original-layout file."""
        return self.source.is_file()


# --- Cheap checks (no torch) ---------------------------------------------------------------------------------------
def check_model_path(path: str | Path) -> None:
    """Raise UserInputError (one line) unless ``path`` looks like an SDXL single file or a diffusers folder.

    Cheap: it reads at most a safetensors header, never a model. A ``.ckpt`` is only checked for existence.
    """
    p = Path(path)
    if not p.exists():
        hint = _HINT
        if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
            hint += "; Hub repo ids are not downloaded, download the model first"
        raise UserInputError(f"{_FLAG}: no such file or folder: {path} ({hint})")
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise UserInputError(
                f"{_FLAG}: {path} is a folder without model_index.json, not a diffusers model ({_HINT})"
            )
        return
    if p.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise UserInputError(f"{_FLAG}: {path} is not a .safetensors or .ckpt file ({_HINT})")
    if p.suffix.lower() == ".safetensors":
        try:
            keys = list(read_safetensors_header(p)[0])
        except (OSError, UserInputError) as e:
            raise UserInputError(f"{_FLAG}: {path} is not a readable safetensors file ({e})") from None
        if not any(k.startswith("model.diffusion_model.") for k in keys):
            raise UserInputError(
                f"{_FLAG}: {path} holds no UNet (no model.diffusion_model.* tensors): is it a LoRA or a VAE? ({_HINT})"
            )
        if not any(k.startswith("conditioner.embedders.1.") for k in keys):
            raise UserInputError(
                f"{_FLAG}: {path} is not an SDXL checkpoint (no second text encoder, conditioner.embedders.1.*): "
                f"SD 1.x/2.x models are not supported ({_HINT})"
            )


def resolve_config_dir(model_file: str | Path, config_dir: str | Path | None = None) -> Path:
    """The diffusers-format config folder for a single file (see the module docstring for the order)."""
    if config_dir is not None:
        config_dir = Path(config_dir)
        if not (config_dir / "model_index.json").is_file():
            raise UserInputError(f"config folder {config_dir} holds no model_index.json (a diffusers-format folder)")
        return config_dir
    model_file = Path(model_file)
    for suffix in CONFIG_DIR_SUFFIXES:
        beside = model_file.with_name(model_file.stem + suffix)
        if (beside / "model_index.json").is_file():
            return beside
    return SHIPPED_CONFIG_DIR


# --- Loading -------------------------------------------------------------------------------------------------------
def load_sdxl(
    path: str | Path, *, config_dir: str | Path | None = None, dtype: torch.dtype | None = None
) -> SDXLModels:
    """Load SDXL from a single file (original layout) or a diffusers folder, offline, weights in ``dtype``
    (default float32). The models come back in eval mode on the CPU."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    dtype = torch.float32 if dtype is None else dtype
    check_model_path(path)
    source = Path(path)
    if source.is_dir():
        resolved = source
        pipe = StableDiffusionXLPipeline.from_pretrained(str(source), dtype=dtype, local_files_only=True)
    else:
        resolved = resolve_config_dir(source, config_dir)
        try:
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(source), config=str(resolved), dtype=dtype, local_files_only=True
            )
        except (ValueError, RuntimeError, KeyError) as e:  # shapes or names that do not fit the configs
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserInputError(
                f"{_FLAG}: {source} does not fit the configs in {resolved} ({reason}); for a model that is not "
                f"SDXL base 1.0's architecture, put its diffusers config folder beside it as {source.stem}_diffusers"
            ) from e
    return SDXLModels(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder1=pipe.text_encoder,
        text_encoder2=pipe.text_encoder_2,
        tokenizer1=pipe.tokenizer,
        tokenizer2=pipe.tokenizer_2,
        scheduler=pipe.scheduler,
        source=source,
        config_dir=resolved,
    )


# --- Hashes for the LoRA metadata ----------------------------------------------------------------------------------
_CHUNK = 1 << 20


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_hashes(path: str | Path) -> tuple[str, str]:
    """``(ss_sd_model_hash, ss_new_sd_model_hash)`` as sd-scripts writes them for a single file: the first
    8 hex digits of the sha256 of the 0x10000 bytes at offset 0x100000 (A1111's legacy hash; a file shorter
    than 1 MiB hashes the empty string, as in sd-scripts), and the sha256 of the whole file.

    For a diffusers folder (sd-scripts has no defined value): the second is the sha256 over every file below
    the folder in sorted relative-path order, each contributing ``path NUL sha256(file) NL``; the first is its
    first 8 hex digits. It changes when any weight or config changes and does not depend on the folder's name.
    """
    p = Path(path)
    if p.is_dir():
        digest = hashlib.sha256()
        for file in sorted(f for f in p.rglob("*") if f.is_file()):
            digest.update(f"{file.relative_to(p).as_posix()}\0{_sha256_file(file)}\n".encode())
        full = digest.hexdigest()
        return full[:8], full
    with open(p, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    return legacy, _sha256_file(p)
