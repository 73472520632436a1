"""`--network_args key=value` for `networks.lora`, and the LoRA+ ratios from flags and network_args.

Pure parsing and validation: this runs before any model loads, so a typo costs a second, not a load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from library.errors import UserInputError
from networks.block_weights import BLOCK_ARG_KEYS, check_block_arg, check_block_combination

LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
FLOAT_KEYS = ("conv_alpha", "dropout", "rank_dropout", "module_dropout") + LORAPLUS_KEYS
INT_KEYS = ("conv_dim",)
NETWORK_ARG_KEYS = INT_KEYS + FLOAT_KEYS + BLOCK_ARG_KEYS


def parse_network_args(items: Sequence[str] | None) -> dict[str, str]:
    """`["k=v", ...]` -> `{"k": "v"}` (raw strings, as sd-scripts records them), validated.

    Raises UserInputError for an item without '=', an unknown key, a repeated key, a value that is
    not a number where a number is needed, a block list of the wrong length (see `networks.block_weights`),
    or a block key that would have no effect.
    """
    parsed: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UserInputError(
                f"--network_args: '{item}' is not key=value (e.g. --network_args \"loraplus_lr_ratio=16\")"
            )
        if key not in NETWORK_ARG_KEYS:
            raise UserInputError(
                f"--network_args: unknown key '{key}' for networks.lora; valid keys: {', '.join(NETWORK_ARG_KEYS)}"
            )
        if key in parsed and parsed[key] != value:
            raise UserInputError(f"--network_args: '{key}' is given twice ({parsed[key]} and {value}); keep one")
        if key in BLOCK_ARG_KEYS:
            check_block_arg(key, value)
        else:
            _check_number(key, value, "--network_args")
        parsed[key] = value
    check_block_combination(parsed)
    return parsed


def _check_number(key: str, value: str, where: str) -> None:
    try:
        number = int(value) if key in INT_KEYS else float(value)
    except ValueError:
        kind = "an integer" if key in INT_KEYS else "a number"
        raise UserInputError(f"{where}: {key}={value!r} is not {kind}") from None
    if key in LORAPLUS_KEYS and not number > 0:
        raise UserInputError(f"{where}: {key} must be a positive number, got {value}")
    if key.endswith("dropout") and not 0.0 <= number < 1.0:
        raise UserInputError(f"{where}: {key} must be in [0, 1), got {value}")


def format_ratio(value: float) -> str:
    """A flag's float as network_args would spell it: 16.0 -> '16', 2.5 -> '2.5'."""
    return format(value, "g")


def merge_loraplus_flags(network_args: dict[str, str], flags: Mapping[str, float | None]) -> dict[str, str]:
    """Fold `--loraplus_*` flag values into network_args.

    The same key given both ways must agree (numerically); otherwise the run stops with one line.
    """
    merged = dict(network_args)
    for key in LORAPLUS_KEYS:
        flag_value = flags.get(key)
        if flag_value is None:
            continue
        if key in merged and float(merged[key]) != float(flag_value):
            raise UserInputError(
                f'--{key} {format_ratio(flag_value)} disagrees with --network_args "{key}={merged[key]}"; give it once'
            )
        merged.setdefault(key, format_ratio(flag_value))
    return merged


@dataclass(frozen=True)
class LoRAPlusRatios:
    """Effective LoRA+ ratios per component (None: LoRA+ off for that component). Specific beats general."""

    unet: float | None
    text_encoder: float | None

    @classmethod
    def from_network_args(cls, network_args: Mapping[str, str | float | None]) -> LoRAPlusRatios:
        def get(key: str) -> float | None:
            value = network_args.get(key)
            return None if value is None else float(value)

        general = get("loraplus_lr_ratio")
        unet = get("loraplus_unet_lr_ratio")
        text_encoder = get("loraplus_text_encoder_lr_ratio")
        return cls(
            unet=unet if unet is not None else general,
            text_encoder=text_encoder if text_encoder is not None else general,
        )
