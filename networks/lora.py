"""`networks.lora`: the sd-scripts network API for SDXL LoRA, with LoRA+ parameter groups.

API (as sd-scripts): `create_network(...)`, `create_network_from_weights(...)`, and on the network
`apply_to`, `prepare_optimizer_params`, `save_weights`, `load_weights`, `state_dict()` whose keys are
the file's keys (`lora_unet_..._to_q.lora_down.weight`, `...alpha`).

LoRA+ rule (`networks.loraplus`, the one place it is written): a parameter is in the "plus" group iff it is a B
matrix (`lora_up`); its learning rate is its component's learning rate x that component's ratio. `lora_down` (A)
keeps the component's rate.

Block-wise network_args (`down_lr_weight`, `block_dims`, ... see `networks.block_weights`): per-block ranks
and alphas for the UNet, and with lr weights one UNet group per block ("unet_block5", "unet_block5 plus"),
lr = UNet lr x block weight (x ratio for plus). A block of weight 0 gets no modules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from networks.block_weights import (
    LR_WEIGHT_KEYS,
    ZERO_THRESHOLD_KEY,
    BlockDims,
    block_dims_and_alphas,
    block_index,
    block_lr_weights,
    check_lr_weights,
)
from networks.lora_module import LoRAModule
from networks.lora_targets import TEXT_ENCODER_PREFIXES, LoRATarget, text_encoder_targets, unet_targets
from networks.loraplus import LoRAPlusRule, grouped
from networks.network_args import LoRAPlusRatios, parse_network_args


@dataclass(frozen=True)
class ParamGroupInfo:
    """What one optimizer parameter group holds, for logging and the start-up table."""

    description: str  # "textencoder", "textencoder plus", "unet", "unet plus", "unet_block5", "unet_block5 plus"
    component: str  # "textencoder" | "unet"
    plus: bool
    lr: float
    tensors: int
    parameters: int
    block: int | None = None  # sd-scripts' UNet block number (0-22) when lr weights split the UNet by block


class LoRANetwork(nn.Module):
    """All LoRA adapters of one SDXL model. Each adapter is a child named by its sd-scripts name."""

    def __init__(
        self,
        text_encoders: Sequence[nn.Module],
        unet: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        conv_lora_dim: int | None = None,
        conv_alpha: float | None = None,
        modules_dim: Mapping[str, int] | None = None,
        modules_alpha: Mapping[str, float] | None = None,
        blocks: BlockDims | None = None,
    ) -> None:
        """`modules_dim`/`modules_alpha` (from a file) pick the modules by name; otherwise `blocks` (per-block
        ranks of the UNet, from block_dims & co.) or the network-wide dims apply."""
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim = lora_dim
        self.alpha = alpha
        self.conv_lora_dim = conv_lora_dim
        self.conv_alpha = conv_alpha
        self.loraplus = LoRAPlusRatios(unet=None, text_encoder=None)
        self.block_lr_weight: tuple[float, ...] | None = None

        def build(targets: list[LoRATarget], is_unet: bool) -> list[LoRAModule]:
            loras = []
            for target in targets:
                if modules_dim is not None:
                    if target.lora_name not in modules_dim:
                        continue
                    dim, module_alpha = modules_dim[target.lora_name], (modules_alpha or {}).get(target.lora_name)
                elif blocks is not None and is_unet:
                    picked = blocks.dim_and_alpha(target.lora_name, target.is_conv3x3)
                    if picked is None:
                        continue
                    dim, module_alpha = picked
                elif target.is_conv3x3:
                    if not conv_lora_dim:
                        continue
                    dim, module_alpha = conv_lora_dim, conv_alpha if conv_alpha is not None else 1.0
                else:
                    dim, module_alpha = lora_dim, alpha
                loras.append(
                    LoRAModule(
                        target.lora_name,
                        target.module,
                        multiplier,
                        dim,
                        module_alpha,
                        dropout,
                        rank_dropout,
                        module_dropout,
                    )
                )
            return loras

        te_targets = [
            t for i, te in enumerate(text_encoders) for t in text_encoder_targets(te, TEXT_ENCODER_PREFIXES[i])
        ]
        if modules_dim is not None:
            include_conv = any(name.startswith("lora_unet") for name in modules_dim)
        elif blocks is not None:
            include_conv = blocks.conv_dims is not None
        else:
            include_conv = bool(conv_lora_dim)
        self.text_encoder_loras = build(te_targets, is_unet=False)
        self.unet_loras = build(unet_targets(unet, include_conv=include_conv), is_unet=True)
        for lora in self.text_encoder_loras + self.unet_loras:
            if lora.lora_name in self._modules:
                raise ValueError(f"duplicate LoRA name {lora.lora_name}")
            self.add_module(lora.lora_name, lora)

    # --- sd-scripts API -------------------------------------------------------------------------

    def set_loraplus_lr_ratio(
        self,
        loraplus_lr_ratio: float | None,
        loraplus_unet_lr_ratio: float | None = None,
        loraplus_text_encoder_lr_ratio: float | None = None,
    ) -> None:
        """Set LoRA+ ratios (the specific ones win over the general one)."""
        self.loraplus = LoRAPlusRatios.from_network_args(
            {
                "loraplus_lr_ratio": loraplus_lr_ratio,
                "loraplus_unet_lr_ratio": loraplus_unet_lr_ratio,
                "loraplus_text_encoder_lr_ratio": loraplus_text_encoder_lr_ratio,
            }
        )

    def set_block_lr_weight(self, block_lr_weight: Sequence[float] | None) -> None:
        """Per-block lr weights (23, sd-scripts' block numbers; see `networks.block_weights`), or None for
        one UNet group. Modules in a block of weight 0 are left out of the optimizer and frozen."""
        self.block_lr_weight = None if block_lr_weight is None else check_lr_weights(block_lr_weight)

    def get_lr_weight(self, block_idx: int) -> float:
        """The lr weight of one UNet block (1 without block lr weights)."""
        return 1.0 if self.block_lr_weight is None else self.block_lr_weight[block_idx]

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = multiplier

    def apply_to(
        self,
        text_encoders: Sequence[nn.Module] | None,
        unet: nn.Module | None,
        apply_text_encoder: bool = True,
        apply_unet: bool = True,
    ) -> None:
        """Attach the adapters; a component not applied loses its adapters (as in sd-scripts)."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()

    def remove_from_model(self) -> None:
        """Detach every adapter (the base model computes exactly as before)."""
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.remove()

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            lora.remove()
            delattr(self, lora.lora_name)

    def prepare_optimizer_params(
        self,
        text_encoder_lr: float | Sequence[float] | None,
        unet_lr: float | None,
        default_lr: float,
    ) -> tuple[list[dict], list[str]]:
        """Optimizer parameter groups and their descriptions (sd-scripts' return shape).

        Component lr: text encoders take the first `text_encoder_lr` value, the UNet `unet_lr`, each
        falling back to `default_lr`. With a LoRA+ ratio the component splits into A (lr) and B
        ("plus", lr x ratio). Groups whose lr is 0 are dropped (that component stays frozen).
        With block lr weights the UNet gives one group per block (ascending block number), lr = UNet lr x
        the block's weight: "unet_block5" and, with LoRA+, "unet_block5 plus" (sd-scripts' descriptions).
        """
        groups, infos = self._param_groups(text_encoder_lr, unet_lr, default_lr)
        self._freeze_zero_weight_blocks()
        return groups, [info.description for info in infos]

    def param_group_infos(
        self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None, default_lr: float
    ) -> list[ParamGroupInfo]:
        """The same groups as `prepare_optimizer_params`, described (for the start-up table and metadata)."""
        return self._param_groups(text_encoder_lr, unet_lr, default_lr)[1]

    def _param_groups(
        self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None, default_lr: float
    ) -> tuple[list[dict], list[ParamGroupInfo]]:
        """The optimizer groups by `networks.loraplus` (the one grouping rule), described."""
        rule = LoRAPlusRule.from_rates(default_lr, unet_lr, text_encoder_lr, self.loraplus, self.block_lr_weight)
        named = (
            (lora.lora_name, name, param)
            for lora in self.text_encoder_loras + self.unet_loras
            for name, param in lora.named_parameters()
        )
        groups: list[dict] = []
        infos: list[ParamGroupInfo] = []
        for group, params in grouped(rule, named):
            groups.append({"params": params, "lr": group.lr})
            infos.append(
                ParamGroupInfo(
                    description=group.description,
                    component=group.component,
                    plus=group.plus,
                    lr=group.lr,
                    tensors=len(params),
                    parameters=sum(p.numel() for p in params),
                    block=group.block,
                )
            )
        return groups, infos

    def _freeze_zero_weight_blocks(self) -> None:
        """Modules in blocks of lr weight 0 (only a network read from a file has any) train not at all."""
        if self.block_lr_weight is None:
            return
        for lora in self.unet_loras:
            if self.block_lr_weight[block_index(lora.lora_name)] == 0:
                lora.requires_grad_(False)

    def prepare_grad_etc(self, text_encoders: Sequence[nn.Module] | None, unet: nn.Module | None) -> None:
        self.requires_grad_(True)
        self._freeze_zero_weight_blocks()

    def on_epoch_start(self, text_encoders: Sequence[nn.Module] | None, unet: nn.Module | None) -> None:
        self.train()

    def get_trainable_params(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def save_weights(
        self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: Mapping[str, str] | None
    ) -> None:
        """Write the adapters (every tensor, alpha included, cast to `dtype`) atomically as safetensors; refused
        (NonFiniteError) when a tensor holds a NaN or infinity as stored, so a broken file never replaces a good one."""
        from library.files.lora_io import save_lora_file

        save_lora_file(self.state_dict(), file, dtype, metadata)

    def load_weights(self, file: str | os.PathLike) -> dict:
        """Load a LoRA file (ours or sd-scripts') into these adapters; returns load_state_dict's report."""
        from library.errors import UserInputError
        from library.files.lora_io import load_lora_file

        weights_sd, _ = load_lora_file(file)
        own = self.state_dict()
        unexpected = sorted(k for k in weights_sd if k not in own)
        reshaped = sorted(k for k in weights_sd if k in own and weights_sd[k].shape != own[k].shape)
        rank_only = [k for k in reshaped if _differs_in_rank_only(weights_sd[k].shape, own[k].shape, k)]
        if unexpected or len(rank_only) < len(reshaped):
            example = next((k for k in reshaped if k not in rank_only), None)
            detail = (
                f"{example} is {tuple(weights_sd[example].shape)} in the file, {tuple(own[example].shape)} here"
                if example
                else f"{unexpected[0]} has no layer in this model"
            )
            raise UserInputError(
                f"LoRA file {file} was made for another base model ({len(unexpected)} tensors of layers this model "
                f"lacks, {len(reshaped) - len(rank_only)} of other layer sizes; e.g. {detail}); continue it on the "
                "model it was trained on, or drop --network_weights"
            )
        if rank_only:
            example = rank_only[0]
            raise UserInputError(
                f"LoRA file {file} does not fit this network ({len(rank_only)} tensors of another rank; e.g. "
                f"{example} is {tuple(weights_sd[example].shape)} in the file, {tuple(own[example].shape)} here); add "
                "--dim_from_weights to take dims from the file, or match --network_dim/--network_alpha/conv_dim"
            )
        return self.load_state_dict(weights_sd, strict=False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _differs_in_rank_only(file_shape: Sequence[int], own_shape: Sequence[int], key: str) -> bool:
    """Whether a lora_down (rank, in, ...) or lora_up (out, rank, ...) tensor differs from ours only in its rank."""
    if len(file_shape) != len(own_shape):
        return False
    rank_axis = 0 if key.endswith("lora_down.weight") else 1 if key.endswith("lora_up.weight") else None
    return rank_axis is not None and all(
        a == b for axis, (a, b) in enumerate(zip(file_shape, own_shape)) if axis != rank_axis
    )


def _float_or_none(value: str | float | None) -> float | None:
    return None if value is None or value == "None" else float(value)


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoders: Sequence[nn.Module] | nn.Module,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: str,
) -> LoRANetwork:
    """sd-scripts' entry point: `kwargs` are the raw `--network_args` strings (validated here too)."""
    args = parse_network_args([f"{k}={v}" for k, v in kwargs.items() if v is not None])
    if isinstance(text_encoders, nn.Module):
        text_encoders = [text_encoders]
    conv_dim = int(args["conv_dim"]) if "conv_dim" in args else None
    conv_alpha = _float_or_none(args.get("conv_alpha")) if conv_dim else None
    lora_dim = network_dim if network_dim is not None else 4
    alpha = network_alpha if network_alpha is not None else 1.0
    lr_weights = block_lr_weights(args)
    network = LoRANetwork(
        text_encoders,
        unet,
        multiplier=multiplier,
        lora_dim=lora_dim,
        alpha=alpha,
        dropout=neuron_dropout if neuron_dropout is not None else _float_or_none(args.get("dropout")),
        rank_dropout=_float_or_none(args.get("rank_dropout")),
        module_dropout=_float_or_none(args.get("module_dropout")),
        conv_lora_dim=conv_dim,
        conv_alpha=conv_alpha,
        blocks=block_dims_and_alphas(args, lora_dim, alpha, conv_dim, conv_alpha, lr_weights),
    )
    network.set_loraplus_lr_ratio(
        _float_or_none(args.get("loraplus_lr_ratio")),
        _float_or_none(args.get("loraplus_unet_lr_ratio")),
        _float_or_none(args.get("loraplus_text_encoder_lr_ratio")),
    )
    network.set_block_lr_weight(lr_weights)
    return network


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoders: Sequence[nn.Module] | nn.Module,
    unet: nn.Module,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: str,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """Build a network whose modules, dims and alphas are read from a LoRA file (or state dict).

    Of `kwargs` (network_args strings) only the block lr weights apply: a block of weight 0 keeps the file's
    modules but they are not trained.
    """
    from library.files.lora_io import load_lora_file

    if weights_sd is None:
        weights_sd, _ = load_lora_file(file)
    weights_sd = dict(weights_sd)
    modules_dim: dict[str, int] = {}
    modules_alpha: dict[str, float] = {}
    for key, value in weights_sd.items():
        name, _, leaf = key.partition(".")
        if leaf == "alpha":
            modules_alpha[name] = float(value.float().item())
        elif leaf == "lora_down.weight":
            modules_dim[name] = int(value.shape[0])
    for name, dim in modules_dim.items():
        modules_alpha.setdefault(name, float(dim))
    if isinstance(text_encoders, nn.Module):
        text_encoders = [text_encoders]
    network = LoRANetwork(
        text_encoders, unet, multiplier=multiplier, modules_dim=modules_dim, modules_alpha=modules_alpha
    )
    block_keys = LR_WEIGHT_KEYS + (ZERO_THRESHOLD_KEY,)
    block_args = parse_network_args([f"{k}={v}" for k, v in kwargs.items() if k in block_keys and v is not None])
    network.set_block_lr_weight(block_lr_weights(block_args))
    return network, weights_sd
