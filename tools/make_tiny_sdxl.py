"""Build a tiny random SDXL (for tests) or a full-size random SDXL single file (for memory benchmarks).

Usage::

    python tools/make_tiny_sdxl.py OUT_DIR [--seed N] [--dtype fp32|fp16]
    python tools/make_tiny_sdxl.py OUT_DIR --mid [--seed N] [--dtype fp16|fp32]
    python tools/make_tiny_sdxl.py OUT_DIR --full [--seed N] [--dtype fp16|fp32]

The tiny model uses the real classes (diffusers ``UNet2DConditionModel`` / ``AutoencoderKL``, transformers
``CLIPTextModel`` / ``CLIPTextModelWithProjection``, the real CLIP tokenizers of ``configs/sdxl``) and keeps
SDXL's topology at small widths, so the original <-> diffusers key maps, diffusers' single-file detection and the
trainer's text-encoder plumbing (TE1 ``hidden_states[11]``, TE2 ``hidden_states[-2]`` + pooled projection) all
apply. It writes

- ``OUT_DIR/tiny_sdxl.safetensors``: one file in the original (SGM) layout, like a downloaded SDXL checkpoint;
- ``OUT_DIR/tiny_sdxl_diffusers/``: the same weights as a diffusers pipeline folder, which also serves as the
  config folder of the single file (``library.model.loading`` finds ``<stem>_diffusers`` beside the file).

``--mid`` writes ``OUT_DIR/mid_sdxl.safetensors`` (SDXL's topology at widths that make it ~440 MB in fp16, for
memory tests that must tell one copy of the weights from two) and its config folder ``OUT_DIR/mid_sdxl_diffusers/``
(configs, tokenizers, scheduler; no weights).

``--full`` builds the real SDXL base architecture from ``configs/sdxl`` with random weights and writes only
``OUT_DIR/sdxl_full_random.safetensors`` (6.9 GB in fp16). The models are built on the meta device for their
names and shapes only; each tensor is then drawn, written and dropped in turn, so peak memory is far below the
file's size.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from networks.sdxl_keys import sdxl_to_single_file  # noqa: E402

SDXL_CONFIG_DIR = REPO_ROOT / "configs" / "sdxl"
TINY_SINGLE_FILE = "tiny_sdxl.safetensors"
TINY_DIFFUSERS_DIR = "tiny_sdxl_diffusers"
FULL_SINGLE_FILE = "sdxl_full_random.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# --- Tiny configs: SDXL's topology, small widths -------------------------------------------------------------------
TE1_HIDDEN = 32
TE2_HIDDEN = 64  # must differ from TE1_HIDDEN: diffusers tells the two CLIPs of a single file apart by width
TE2_PROJECTION = 64
ADDITION_TIME_EMBED_DIM = 256  # SDXL's: 6 size/crop numbers x 256 sinusoidal features


def tiny_unet_config() -> dict[str, Any]:
    """UNet2DConditionModel config: 3 levels, 2 layers per block, no attention at level 0, SDXL conditioning."""
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": [32, 64, 128],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 1, 2],
        "attention_head_dim": [1, 2, 4],  # diffusers' name for the head count (SDXL: [5, 10, 20])
        "norm_num_groups": 32,
        "cross_attention_dim": TE1_HIDDEN + TE2_HIDDEN,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": TE2_PROJECTION + 6 * ADDITION_TIME_EMBED_DIM,
    }


def tiny_vae_config() -> dict[str, Any]:
    """AutoencoderKL config: 4 levels (8x downsampling), 4 latent channels, SDXL's scaling factor."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 128,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }


def _tiny_clip_config(hidden: int, layers: int, heads: int, act: str, projection: int) -> dict[str, Any]:
    return {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": act,
        "projection_dim": projection,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def tiny_te1_config() -> dict[str, Any]:
    """CLIPTextModel config: 12 layers (the trainer reads hidden_states[11]), quick_gelu like CLIP ViT-L."""
    return _tiny_clip_config(TE1_HIDDEN, 12, 2, "quick_gelu", TE1_HIDDEN)


def tiny_te2_config() -> dict[str, Any]:
    """CLIPTextModelWithProjection config: 10 layers (diffusers' SDXL detection needs resblocks.9), gelu."""
    return _tiny_clip_config(TE2_HIDDEN, 10, 4, "gelu", TE2_PROJECTION)


# --- Building ------------------------------------------------------------------------------------------------------
@dataclass
class SDXLComponents:
    """The components of an SDXL pipeline, named as ``StableDiffusionXLPipeline`` takes them."""

    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any

    def as_pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``StableDiffusionXLPipeline(...)`` (no copies)."""
        return dict(vars(self))


@dataclass(frozen=True)
class TinySDXLPaths:
    """Where :func:`write_tiny_sdxl` wrote the model."""

    single_file: Path
    diffusers_dir: Path


def build_tiny_sdxl(seed: int = 0) -> SDXLComponents:
    """Build the tiny SDXL in fp32 with weights drawn from ``seed`` (the caller's RNG state is left untouched)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config())
        vae = AutoencoderKL(**tiny_vae_config())
        te1 = CLIPTextModel(CLIPTextConfig(**tiny_te1_config()))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_te2_config()))
    return SDXLComponents(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=te1.eval(),
        text_encoder_2=te2.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(SDXL_CONFIG_DIR / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(SDXL_CONFIG_DIR / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler.from_pretrained(SDXL_CONFIG_DIR, subfolder="scheduler"),
    )


def single_file_state_dict(components: SDXLComponents) -> dict[str, torch.Tensor]:
    """The original-layout single-file state dict of ``components`` (contiguous tensors, shared where possible)."""
    sd = sdxl_to_single_file(
        components.unet.state_dict(),
        components.vae.state_dict(),
        components.text_encoder.state_dict(),
        components.text_encoder_2.state_dict(),
    )
    return {k: v.contiguous() for k, v in sd.items()}


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates its files owner-only
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_tiny_sdxl(out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> TinySDXLPaths:
    """Build the tiny SDXL and write it as a single file and as a diffusers folder (same weights, ``dtype``)."""
    from diffusers import StableDiffusionXLPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    components = build_tiny_sdxl(seed)
    if dtype != torch.float32:
        for model in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
            model.to(dtype)
    paths = TinySDXLPaths(single_file=out_dir / TINY_SINGLE_FILE, diffusers_dir=out_dir / TINY_DIFFUSERS_DIR)

    save_safetensors_atomic(single_file_state_dict(components), paths.single_file)

    tmp_dir = out_dir / f".{TINY_DIFFUSERS_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    pipe = StableDiffusionXLPipeline(**components.as_pipeline_kwargs())
    pipe.save_pretrained(tmp_dir)
    shutil.rmtree(paths.diffusers_dir, ignore_errors=True)
    os.replace(tmp_dir, paths.diffusers_dir)
    return paths


# --- Full size -----------------------------------------------------------------------------------------------------
def _random_tensor(name: str, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A random stand-in for the tensor ``name``: N(0, 1/fan_in) for matrices and kernels, ones for 1-D weights
    (norm scales), zeros for biases, ln(100) for the 0-dim logit scale. Drawn in fp32 in chunks, stored in
    ``dtype``, so a forward pass stays finite in fp16."""
    out = torch.empty(shape, dtype=dtype)
    if len(shape) == 0:
        return out.fill_(math.log(100.0))
    if len(shape) == 1:
        return out.fill_(1.0 if name.endswith("weight") else 0.0)
    std = 1.0 / math.sqrt(math.prod(shape[1:]))
    flat = out.view(-1)
    step = 1 << 24
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step]
        chunk.copy_(torch.randn(chunk.numel(), generator=gen) * std)
    return out


def single_file_shapes(config_dir: Path) -> dict[str, torch.Size]:
    """Name -> shape of every tensor of the single file (original layout) of the model whose diffusers configs are
    in ``config_dir``. The models are built on the meta device: no weight memory is allocated."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir, subfolder="vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2"))
    meta = sdxl_to_single_file(unet.state_dict(), vae.state_dict(), te1.state_dict(), te2.state_dict())
    return {key: tensor.shape for key, tensor in meta.items()}


def full_sdxl_shapes() -> dict[str, torch.Size]:
    """Name -> shape of every tensor of a full-size SDXL base single file (original layout), from configs/sdxl."""
    return single_file_shapes(SDXL_CONFIG_DIR)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors_streaming(
    path: Path, shapes: dict[str, torch.Size], dtype: torch.dtype, make: Callable[[str, torch.Size], torch.Tensor]
) -> None:
    """Write a safetensors file tensor by tensor: ``make(name, shape)`` is called once per name (in sorted order)
    and its result written and dropped, so memory holds one tensor at a time. Atomic (temporary file + rename)."""
    names = sorted(shapes)
    item = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        size = math.prod(shapes[name]) * item
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name in names:
                tensor = make(name, shapes[name]).to(dtype).contiguous()
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_full_sdxl(out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``OUT_DIR/sdxl_full_random.safetensors``: full-size SDXL base, random weights, original layout.

    Each tensor is drawn, written and dropped in turn: peak memory is about one tensor, not the model."""
    path = Path(out_dir) / FULL_SINGLE_FILE
    gen = torch.Generator().manual_seed(seed)
    shapes = full_sdxl_shapes()
    write_safetensors_streaming(path, shapes, dtype, lambda name, shape: _random_tensor(name, shape, dtype, gen))
    return path


# --- Mid size ------------------------------------------------------------------------------------------------------
MID_SINGLE_FILE = "mid_sdxl.safetensors"
MID_CONFIG_DIR = "mid_sdxl_diffusers"  # found by library.model.loading beside the file
MID_TE1_HIDDEN = 256
MID_TE2_HIDDEN = 384  # differs from TE1's, as in the tiny model


def mid_configs() -> dict[str, dict[str, Any]]:
    """Configs by subfolder of the mid-size SDXL: the tiny model's topology (3 UNet levels, 2 layers per block, level
    0 without attention, 4 VAE levels, TE1 12 layers, TE2 10) at widths that make ~220 M parameters, ~440 MB in
    fp16: big enough that one more copy of the weights shows in a process's peak memory, quick enough to write."""
    unet = tiny_unet_config() | {
        "sample_size": 32,
        "block_out_channels": [128, 256, 512],
        "transformer_layers_per_block": [1, 2, 2],
        "attention_head_dim": [2, 4, 8],  # heads of 64 channels, as SDXL's
        "cross_attention_dim": MID_TE1_HIDDEN + MID_TE2_HIDDEN,
        "projection_class_embeddings_input_dim": MID_TE2_HIDDEN + 6 * ADDITION_TIME_EMBED_DIM,
    }
    return {
        "unet": {"_class_name": "UNet2DConditionModel"} | unet,
        "vae": {"_class_name": "AutoencoderKL"} | tiny_vae_config() | {"block_out_channels": [64, 128, 256, 256]},
        "text_encoder": _tiny_clip_config(MID_TE1_HIDDEN, 12, MID_TE1_HIDDEN // 64, "quick_gelu", MID_TE1_HIDDEN),
        "text_encoder_2": _tiny_clip_config(MID_TE2_HIDDEN, 10, MID_TE2_HIDDEN // 64, "gelu", MID_TE2_HIDDEN),
    }


def write_config_folder(config_dir: Path, configs: dict[str, dict[str, Any]]) -> None:
    """A diffusers-format config folder without weights: ``configs`` by subfolder, plus SDXL's model index,
    tokenizers and scheduler from configs/sdxl."""
    from transformers import CLIPTextConfig

    config_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SDXL_CONFIG_DIR / "model_index.json", config_dir / "model_index.json")
    for sub in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(SDXL_CONFIG_DIR / sub, config_dir / sub, dirs_exist_ok=True)
    for sub in ("unet", "vae"):
        (config_dir / sub).mkdir(exist_ok=True)
        (config_dir / sub / "config.json").write_text(json.dumps(configs[sub], indent=2))
    for sub in ("text_encoder", "text_encoder_2"):
        CLIPTextConfig(**configs[sub]).save_pretrained(config_dir / sub)


def write_mid_sdxl(out_dir: str | Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """Write ``OUT_DIR/mid_sdxl.safetensors`` (original layout, random weights, ``dtype``) tensor by tensor, and
    its config folder ``OUT_DIR/mid_sdxl_diffusers/``. Returns the file's path."""
    out_dir = Path(out_dir)
    write_config_folder(out_dir / MID_CONFIG_DIR, mid_configs())
    path = out_dir / MID_SINGLE_FILE
    gen = torch.Generator().manual_seed(seed)
    shapes = single_file_shapes(out_dir / MID_CONFIG_DIR)
    write_safetensors_streaming(path, shapes, dtype, lambda name, shape: _random_tensor(name, shape, dtype, gen))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="full-size SDXL base with random weights (~6.9 GB fp16)")
    size.add_argument("--mid", action="store_true", help="SDXL topology, ~440 MB fp16, with its config folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 tiny, fp16 --mid/--full")
    args = parser.parse_args(argv)
    if args.full:
        path = write_full_sdxl(args.out_dir, args.seed, DTYPES[args.dtype or "fp16"])
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    elif args.mid:
        path = write_mid_sdxl(args.out_dir, DTYPES[args.dtype or "fp16"], args.seed)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) and {path.with_name(MID_CONFIG_DIR)}/")
    else:
        paths = write_tiny_sdxl(args.out_dir, args.seed, DTYPES[args.dtype or "fp32"])
        print(f"wrote {paths.single_file} ({paths.single_file.stat().st_size / 2**20:.1f} MiB)")
        print(f"wrote {paths.diffusers_dir}/ (diffusers pipeline folder; also the single file's config folder)")


if __name__ == "__main__":
    main()
