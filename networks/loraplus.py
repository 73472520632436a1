"""The LoRA+ grouping rule, written once: which optimizer group each LoRA parameter joins, and at what rate.

sd-scripts' rule, decided from a parameter's LoRA name and parameter name alone:

- component: `lora_te*` names are the text encoders ("textencoder"), `lora_unet_*` the UNet ("unet"); the
  component's rate is the first `--text_encoder_lr` / `--unet_lr`, each falling back to `--learning_rate`;
- block lr weights (`down_lr_weight` & co., `networks.block_weights`) split the UNet into one group per block
  ("unet_block5"), rate = UNet rate x the block's weight;
- with a LoRA+ ratio for the component, its B matrices (`lora_up`, zero-initialised) form "<group> plus" at
  rate x ratio; A (`lora_down`) keeps the rate. Without a ratio A and B share one group;
- a group whose rate is 0 is dropped: its parameters are not trained (a component at lr 0, a block of weight 0).

Pure (no torch, no model): the start-up check runs it before anything loads (`planned_groups`), the network
builds its optimizer groups with it (`grouped`), and what it returns is what the param-groups JSON and the run
report show.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from networks.block_weights import EMBEDDING_BLOCK, OUT_BLOCK, block_index, block_lr_weights
from networks.network_args import LoRAPlusRatios

TEXT_ENCODER, UNET = "textencoder", "unet"
B_MATRIX = "lora_up"
"""The LoRA+ "plus" side: B, the output-side matrix (PEFT calls it `lora_B`)."""
ADAPTED_BLOCKS = range(EMBEDDING_BLOCK + 1, OUT_BLOCK)
"""UNet blocks that may hold LoRA modules (the embeddings, 0, and the output layer, 22, never do)."""

T = TypeVar("T")


NO_RATIOS = LoRAPlusRatios(unet=None, text_encoder=None)
"""LoRA+ off: B learns at A's rate."""


@dataclass(frozen=True)
class LoRAPlusRule:
    """The rates the rule works from; build it with `from_rates` (sd-scripts' fallbacks) or `from_network_args`."""

    text_encoder_lr: float
    unet_lr: float
    ratios: LoRAPlusRatios = NO_RATIOS
    block_lr_weights: tuple[float, ...] | None = None
    """23 per-block weights of the UNet rate (zero threshold already applied), or None for one UNet group."""

    @classmethod
    def from_rates(
        cls,
        learning_rate: float,
        unet_lr: float | None = None,
        text_encoder_lr: float | Sequence[float] | None = None,
        ratios: LoRAPlusRatios = NO_RATIOS,
        block_lr_weights: Sequence[float] | None = None,
    ) -> LoRAPlusRule:
        """The text encoders take the first `text_encoder_lr` value, the UNet `unet_lr`; a missing one (None or an
        empty list) falls back to `learning_rate`, as in sd-scripts."""
        if isinstance(text_encoder_lr, Sequence):
            text_encoder_lr = text_encoder_lr[0] if len(text_encoder_lr) else None
        return cls(
            text_encoder_lr=float(learning_rate if text_encoder_lr is None else text_encoder_lr),
            unet_lr=float(learning_rate if unet_lr is None else unet_lr),
            ratios=ratios,
            block_lr_weights=None if block_lr_weights is None else tuple(float(w) for w in block_lr_weights),
        )

    @classmethod
    def from_network_args(
        cls,
        learning_rate: float,
        unet_lr: float | None,
        text_encoder_lr: float | Sequence[float] | None,
        network_args: Mapping[str, str],
    ) -> LoRAPlusRule:
        """The ratios (specific beat general) and the block lr weights (with `block_lr_zero_threshold`) as
        `--network_args` give them."""
        return cls.from_rates(
            learning_rate,
            unet_lr,
            text_encoder_lr,
            LoRAPlusRatios.from_network_args(network_args),
            block_lr_weights(network_args),
        )


@dataclass(frozen=True)
class Group:
    """One optimizer group of the rule."""

    description: str
    """sd-scripts' name: "textencoder", "textencoder plus", "unet", "unet plus", "unet_block5", "unet_block5 plus"."""
    component: str
    """TEXT_ENCODER or UNET."""
    plus: bool
    """The LoRA+ B group (only with a ratio for the component)."""
    lr: float
    block: int | None = None
    """The UNet block (0-22) when block lr weights split the UNet."""

    @property
    def dropped(self) -> bool:
        """A rate of 0 leaves the group out of the optimizer: its parameters are not trained."""
        return self.lr == 0

    def sort_key(self) -> tuple[int, int, bool]:
        """sd-scripts' order: text encoders, then the UNet (blocks ascending); A before B."""
        return (self.component != TEXT_ENCODER, -1 if self.block is None else self.block, self.plus)


def component_of(lora_name: str) -> str:
    """`lora_te1_...` / `lora_te2_...` -> TEXT_ENCODER, `lora_unet_...` -> UNET."""
    if lora_name.startswith("lora_te"):
        return TEXT_ENCODER
    if lora_name.startswith("lora_unet_"):
        return UNET
    raise ValueError(f"{lora_name!r} is not an SDXL LoRA name (lora_te1_..., lora_te2_... or lora_unet_...)")


def is_b_matrix(param_name: str) -> bool:
    """Whether a LoRA module's parameter (`lora_up.weight`, `lora_down.weight`) is B, the LoRA+ side."""
    return param_name.partition(".")[0] == B_MATRIX


def group_of(rule: LoRAPlusRule, lora_name: str, param_name: str) -> Group:
    """The group of one parameter, e.g. (`lora_unet_input_blocks_4_1_..._to_q`, `lora_up.weight`) -> "unet plus"."""
    component = component_of(lora_name)
    block = None if component == TEXT_ENCODER or rule.block_lr_weights is None else block_index(lora_name)
    return _group(rule, component, block, is_b_matrix(param_name))


def _group(rule: LoRAPlusRule, component: str, block: int | None, is_b: bool) -> Group:
    if component == TEXT_ENCODER:
        lr, ratio = rule.text_encoder_lr, rule.ratios.text_encoder
    else:
        lr, ratio = rule.unet_lr, rule.ratios.unet
        if block is not None:
            lr = lr * rule.block_lr_weights[block]
    plus = is_b and ratio is not None
    name = component if block is None else f"{component}_block{block}"
    return Group(f"{name} plus" if plus else name, component, plus, lr * ratio if plus else lr, block)


def grouped(rule: LoRAPlusRule, params: Iterable[tuple[str, str, T]]) -> list[tuple[Group, list[T]]]:
    """(LoRA name, parameter name, parameter) -> the optimizer groups with their parameters, in sd-scripts' order,
    each group's parameters in the order given; dropped groups are left out."""
    members: dict[Group, list[T]] = {}
    for lora_name, param_name, param in params:
        members.setdefault(group_of(rule, lora_name, param_name), []).append(param)
    return [(group, members[group]) for group in sorted(members, key=Group.sort_key) if not group.dropped]


def planned_groups(rule: LoRAPlusRule, *, train_text_encoder: bool, train_unet: bool) -> list[Group]:
    """The groups of a network with modules in every trained component (and, with block lr weights, in every block
    that may hold them): what the optimizer will see, known before any model loads. Dropped ones left out."""
    places = [(TEXT_ENCODER, None)] if train_text_encoder else []
    if train_unet:
        places += [(UNET, block) for block in (ADAPTED_BLOCKS if rule.block_lr_weights is not None else [None])]
    groups = {_group(rule, component, block, is_b) for component, block in places for is_b in (False, True)}
    return [group for group in sorted(groups, key=Group.sort_key) if not group.dropped]
