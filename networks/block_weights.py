"""sd-scripts' block-wise `--network_args` for SDXL: per-block learning-rate weights, ranks and alphas.

sd-scripts cuts the SDXL UNet into 23 blocks, numbered by the original ("ldm") layout:

    0        time / label embedding   (never adapted)
    1 - 9    input_blocks 0-8         "down", shallow -> deep
    10 - 12  middle_block 0-2         "mid"
    13 - 21  output_blocks 0-8        "up", deep -> shallow
    22       out                      (never adapted)

The keys (values are the raw strings of `--network_args`):

- `down_lr_weight`, `up_lr_weight`: 9 comma-separated numbers, or a preset `NAME[+OFFSET]` (`cosine` 1 -> 0,
  `sine` 0 -> 1, `linear` 0 -> 1, `reverse_linear` 1 -> 0, `zeros`) with OFFSET added to every value;
  `mid_lr_weight`: 3 numbers. An empty entry ("1,,1") is 0. A block's lr is the UNet lr x its weight; blocks
  0 and 22 keep weight 1. Any of the three turns on one optimizer group per block; unset parts weigh 1.
- `block_lr_zero_threshold` (default 0): a given weight not above it becomes 0. A block of weight 0 gets no
  LoRA modules at all (its rank is forced to 0), so it is neither trained nor saved.
- `block_dims`, `block_alphas` (Linear and 1x1 conv layers), `conv_block_dims`, `conv_block_alphas` (3x3 convs):
  23 numbers each, one per block; a dim of 0 puts no module in that block. Unset, they default to
  `--network_dim` / `--network_alpha` / `conv_dim` / `conv_alpha` (1 when unset). The text encoders keep
  `--network_dim` and `--network_alpha`.

Pure functions (no torch): they run at config time, before any model loads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from library.errors import UserInputError

NUM_BLOCKS = 23
NUM_DOWN_OR_UP = 9
NUM_MID = 3
EMBEDDING_BLOCK, OUT_BLOCK = 0, 22
# (name prefix after "lora_unet_", first block number, how many)
_UNET_SECTIONS = (
    ("input_blocks_", 1, NUM_DOWN_OR_UP),
    ("middle_block_", 10, NUM_MID),
    ("output_blocks_", 13, NUM_DOWN_OR_UP),
)

LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
ZERO_THRESHOLD_KEY = "block_lr_zero_threshold"
DIM_KEYS = ("block_dims", "conv_block_dims")
ALPHA_KEYS = ("block_alphas", "conv_block_alphas")
BLOCK_ARG_KEYS = LR_WEIGHT_KEYS + (
    ZERO_THRESHOLD_KEY,
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
)
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")

_WHERE = "--network_args"
_LR_WEIGHT_COUNTS = {"down_lr_weight": NUM_DOWN_OR_UP, "mid_lr_weight": NUM_MID, "up_lr_weight": NUM_DOWN_OR_UP}
_LR_WEIGHT_PARTS = {
    "down_lr_weight": "input_blocks 0-8",
    "mid_lr_weight": "middle_block 0-2",
    "up_lr_weight": "output_blocks 0-8",
}


# --- Blocks of LoRA names ------------------------------------------------------------------------------------------


def block_index(lora_name: str) -> int:
    """The sd-scripts block number (0-22) of an SDXL UNet LoRA name in the original layout.

    `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` -> 5, `lora_unet_middle_block_1_proj_in` -> 11,
    `lora_unet_output_blocks_5_2_conv` -> 18. Raises ValueError for a name outside the SDXL UNet.
    """
    name = lora_name.removeprefix("lora_unet_")
    if name != lora_name:
        if name.startswith(("time_embed_", "label_emb_")):
            return EMBEDDING_BLOCK
        if name.startswith("out_"):
            return OUT_BLOCK
        for prefix, first, count in _UNET_SECTIONS:
            if name.startswith(prefix):
                number = name[len(prefix) :].partition("_")[0]
                if number.isdigit() and int(number) < count:
                    return first + int(number)
    raise ValueError(f"{lora_name!r} is not the LoRA name of an SDXL UNet layer (original layout)")


def block_label(index: int) -> str:
    """A block number as the UNet names it: 5 -> 'input_blocks_4', 11 -> 'middle_block_1', 0 -> 'time_embed'."""
    if index == EMBEDDING_BLOCK:
        return "time_embed"
    if index == OUT_BLOCK:
        return "out"
    for prefix, first, count in _UNET_SECTIONS:
        if first <= index < first + count:
            return f"{prefix}{index - first}"
    raise ValueError(f"SDXL has blocks 0-{NUM_BLOCKS - 1}, not {index}")


# --- Learning-rate weights -----------------------------------------------------------------------------------------


def preset_weights(spec: str, count: int = NUM_DOWN_OR_UP) -> list[float]:
    """`NAME[+OFFSET]` -> `count` weights, as sd-scripts computes them (OFFSET added to each)."""
    name, plus, offset_text = (part.strip() for part in spec.partition("+"))
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}")
    offset = 0.0
    if plus:
        try:
            offset = float(offset_text)
        except ValueError:
            raise ValueError(f"the offset of {spec!r} is not a number") from None
    ramp = [i / (count - 1) for i in range(count)]  # 0 -> 1
    if name == "linear":
        weights = ramp
    elif name == "reverse_linear":
        weights = ramp[::-1]
    elif name == "sine":
        weights = [math.sin(math.pi * r / 2) for r in ramp]
    elif name == "cosine":
        weights = [math.sin(math.pi * r / 2) for r in ramp][::-1]
    else:  # zeros
        weights = [0.0] * count
    return [w + offset for w in weights]


def _split_numbers(key: str, value: str, count: int, what: str, empty_is_zero: bool) -> list[str]:
    items = [item.strip() for item in value.split(",")]
    if len(items) != count:
        shown = "nothing" if value.strip() == "" else f"{len(items)}: '{value}'"
        raise UserInputError(f"{_WHERE}: {key} needs {count} comma-separated {what}, got {shown}")
    if not empty_is_zero and "" in items:
        raise UserInputError(f"{_WHERE}: {key} has an empty entry in '{value}'; give all {count} values")
    return items


def parse_lr_weight(key: str, value: str) -> list[float]:
    """One of `down_lr_weight` (9), `mid_lr_weight` (3), `up_lr_weight` (9): numbers, or a preset for down/up.

    An empty entry is 0, as in sd-scripts. The zero threshold is not applied here.
    """
    count = _LR_WEIGHT_COUNTS[key]
    part = _LR_WEIGHT_PARTS[key]
    if key != "mid_lr_weight" and value.partition("+")[0].strip() in PRESETS:
        try:
            return preset_weights(value, count)
        except ValueError as error:
            raise UserInputError(f"{_WHERE}: {key}={value!r}: {error}") from None
    if key != "mid_lr_weight" and "," not in value and value.strip() and not _is_number(value):
        raise UserInputError(
            f"{_WHERE}: {key}={value!r} is neither {count} comma-separated numbers ({part}) nor a preset "
            f"({', '.join(PRESETS)}, optionally +OFFSET, e.g. cosine+.25)"
        )
    what = f"numbers ({part})" if key == "mid_lr_weight" else f"numbers ({part}) or a preset ({', '.join(PRESETS)})"
    items = _split_numbers(key, value, count, what, empty_is_zero=True)
    weights = []
    for item in items:
        if item and not _is_number(item):
            raise UserInputError(f"{_WHERE}: {key} has {item!r}, which is not a number ('{value}')")
        weights.append(float(item) if item else 0.0)
    return weights


def parse_zero_threshold(value: str) -> float:
    if not _is_number(value) or not float(value) >= 0:
        raise UserInputError(f"{_WHERE}: {ZERO_THRESHOLD_KEY} must be a number >= 0, got {value!r}")
    return float(value)


def block_lr_weights(network_args: Mapping[str, str]) -> tuple[float, ...] | None:
    """The 23 per-block lr weights, or None when no lr-weight key is given (one UNet group, as without them).

    Given weights not above `block_lr_zero_threshold` become 0; unset parts and blocks 0 and 22 weigh 1.
    """
    if not any(key in network_args for key in LR_WEIGHT_KEYS):
        return None
    threshold = parse_zero_threshold(network_args.get(ZERO_THRESHOLD_KEY, "0"))
    parts = []
    for key in LR_WEIGHT_KEYS:
        if key in network_args:
            parts.append([w if w > threshold else 0.0 for w in parse_lr_weight(key, network_args[key])])
        else:
            parts.append([1.0] * _LR_WEIGHT_COUNTS[key])
    down, mid, up = parts
    return (1.0, *down, *mid, *up, 1.0)


def check_lr_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """Per-block lr weights given directly (`LoRANetwork.set_block_lr_weight`): 23 numbers >= 0."""
    weights = tuple(float(w) for w in weights)
    if len(weights) != NUM_BLOCKS or any(not w >= 0 for w in weights):
        raise ValueError(f"block lr weights must be {NUM_BLOCKS} numbers >= 0, got {len(weights)}: {weights}")
    return weights


# --- Ranks and alphas per block ------------------------------------------------------------------------------------


def parse_block_values(key: str, value: str) -> list[float] | list[int]:
    """`block_dims` / `conv_block_dims` (23 integers >= 0) or `block_alphas` / `conv_block_alphas` (23 numbers)."""
    is_dim = key in DIM_KEYS
    what = f"{'integers >= 0' if is_dim else 'numbers'} (one per SDXL block 0-{NUM_BLOCKS - 1})"
    items = _split_numbers(key, value, NUM_BLOCKS, what, empty_is_zero=False)
    values: list = []
    for item in items:
        if is_dim:
            dim = _int_or_none(item)
            if dim is None or dim < 0:
                raise UserInputError(f"{_WHERE}: {key} has {item!r}, which is not an integer >= 0 ('{value}')")
            values.append(dim)
        else:
            if not _is_number(item):
                raise UserInputError(f"{_WHERE}: {key} has {item!r}, which is not a number ('{value}')")
            values.append(float(item))
    return values


@dataclass(frozen=True)
class BlockDims:
    """Rank and alpha of the UNet's LoRA modules, per block (index = block number).

    `dims` / `alphas` for Linear and 1x1 conv layers, `conv_dims` / `conv_alphas` for 3x3 convs (None: none
    adapted). A dim of 0 puts no module in that block.
    """

    dims: tuple[int, ...]
    alphas: tuple[float, ...]
    conv_dims: tuple[int, ...] | None = None
    conv_alphas: tuple[float, ...] | None = None

    def dim_and_alpha(self, lora_name: str, is_conv3x3: bool) -> tuple[int, float] | None:
        """(rank, alpha) of the module for this UNet layer, or None when its block gets none."""
        index = block_index(lora_name)
        if is_conv3x3:
            if self.conv_dims is None or self.conv_alphas is None:
                return None
            dim, alpha = self.conv_dims[index], self.conv_alphas[index]
        else:
            dim, alpha = self.dims[index], self.alphas[index]
        return (dim, alpha) if dim > 0 else None


def block_dims_and_alphas(
    network_args: Mapping[str, str],
    network_dim: int,
    network_alpha: float,
    conv_dim: int | None,
    conv_alpha: float | None,
    lr_weights: Sequence[float] | None,
) -> BlockDims | None:
    """Per-block ranks and alphas, or None when neither a block key nor lr weights are given.

    Unset lists take the network-wide values; blocks whose lr weight is 0 get rank 0 (no modules).
    """
    if lr_weights is None and not any(key in network_args for key in DIM_KEYS + ALPHA_KEYS):
        return None

    def values(key: str, default: float | None) -> list:
        if key in network_args:
            return parse_block_values(key, network_args[key])
        return [default] * NUM_BLOCKS

    dims = values("block_dims", network_dim)
    alphas = values("block_alphas", network_alpha)
    conv_dims = conv_alphas = None
    if "conv_block_dims" in network_args or conv_dim:
        conv_dims = values("conv_block_dims", conv_dim)
        conv_alphas = values("conv_block_alphas", conv_alpha if conv_alpha is not None else 1.0)
    elif "conv_block_alphas" in network_args:
        raise UserInputError(f"{_WHERE}: conv_block_alphas needs conv_block_dims or conv_dim (no 3x3 conv is adapted)")
    if lr_weights is not None:
        for index, weight in enumerate(lr_weights):
            if weight == 0:
                dims[index] = 0
                if conv_dims is not None:
                    conv_dims[index] = 0
    return BlockDims(
        tuple(dims),
        tuple(alphas),
        None if conv_dims is None else tuple(conv_dims),
        None if conv_alphas is None else tuple(conv_alphas),
    )


# --- Validation ----------------------------------------------------------------------------------------------------


def check_block_arg(key: str, value: str) -> None:
    """Raise UserInputError (one line) when one block key's value is malformed."""
    if key in LR_WEIGHT_KEYS:
        parse_lr_weight(key, value)
    elif key == ZERO_THRESHOLD_KEY:
        parse_zero_threshold(value)
    else:
        parse_block_values(key, value)


def check_block_combination(network_args: Mapping[str, str]) -> None:
    """Raise UserInputError for a block key that would have no effect beside the others given."""
    if ZERO_THRESHOLD_KEY in network_args and not any(key in network_args for key in LR_WEIGHT_KEYS):
        raise UserInputError(
            f"{_WHERE}: {ZERO_THRESHOLD_KEY} has no effect without down_lr_weight, mid_lr_weight or up_lr_weight"
        )
    conv_dim = _int_or_none(network_args.get("conv_dim"))
    if "conv_block_alphas" in network_args and "conv_block_dims" not in network_args and not conv_dim:
        raise UserInputError(f"{_WHERE}: conv_block_alphas needs conv_block_dims or conv_dim (no 3x3 conv is adapted)")


def _is_number(text: str) -> bool:
    try:
        number = float(text)
    except ValueError:
        return False
    return math.isfinite(number)


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
