"""LoRA+ diagnostics: how big A, B and the weight change they make are, and how fast each moves, per component.

The LoRA+ paper's argument is about B (`lora_up`, zero at the start): at plain LoRA it learns too slowly to
matter, at a well-chosen ratio its norm and the weight change ΔW = (alpha/r)·B·A grow at the pace A's does, and at
a too-high ratio B's per-step update stays large (the run gets noisy or diverges). These numbers, logged every N
steps, let a user see which of the three a run is in. Per component (`te1`, `te2`, `unet`; with block lr weights
also each UNet block, `unet_block05`), tracker names `lora/<component>/<metric>`:

    norm_A, norm_B   Frobenius norm of all the component's A (B) matrices together
    delta            ||ΔW||_F of the component, ΔW = (alpha/r)·B·A per module, summed in squares
    update_A/_B      one optimizer step's change relative to the weights before it: ||A_s - A_{s-1}|| / ||A_{s-1}||
                     (NaN when the weights before were zero, as B is before its first step)

||B·A||_F is computed without forming B·A (out x in, as large as the layer): ||BA||_F² = trace((BᵀB)(AAᵀ)), two
r x r Gram matrices; conv weights are flattened to (out, r) and (r, in·kh·kw), whose product is the delta kernel.
Matrices of one shape are stacked so each shape costs one batched matmul, and all numbers come back in one host
sync. The update needs the weights of the step before: `LoRADiagnostics` copies the LoRA tensors (a LoRA is small)
only on the step before a due one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from networks.block_weights import block_index

COMPONENTS = (("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_unet_", "unet"))


@dataclass(frozen=True)
class LoRAPair:
    """One adapter's A (lora_down) and B (lora_up) weights, the delta's scale, and the groups it counts in."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    groups: tuple[str, ...]
    """The component, and for a UNet module with per-block reporting also its block ("unet_block05")."""


def lora_pairs(network, *, by_block: bool = False) -> list[LoRAPair]:
    """The adapters of a `networks.lora.LoRANetwork` (its `text_encoder_loras` and `unet_loras`)."""
    pairs = []
    for lora in [*network.text_encoder_loras, *network.unet_loras]:
        component = next((c for prefix, c in COMPONENTS if lora.lora_name.startswith(prefix)), "other")
        groups = (component,)
        if by_block and component == "unet":
            groups += (f"unet_block{block_index(lora.lora_name):02d}",)
        pairs.append(LoRAPair(lora.lora_name, lora.lora_down.weight, lora.lora_up.weight, float(lora.scale), groups))
    return pairs


def group_names(pairs: Sequence[LoRAPair]) -> list[str]:
    """The groups in report order: te1, te2, unet, then the UNet blocks."""
    return list(dict.fromkeys(group for pair in pairs for group in pair.groups))


def lora_norms(pairs: Sequence[LoRAPair]) -> dict[str, float]:
    """`lora/<group>/norm_A`, `norm_B` and `delta` of every group."""
    if not pairs:
        return {}
    names = group_names(pairs)
    squares = _norms_squared(pairs)  # (modules, 3): ||A||², ||B||², ||scale·BA||²
    totals = _sum_by_group(squares, pairs, names).sqrt().tolist()
    return {
        f"lora/{group}/{metric}": row[i]
        for group, row in zip(names, totals)
        for i, metric in enumerate(("norm_A", "norm_B", "delta"))
    }


def relative_updates(pairs: Sequence[LoRAPair], before: Sequence[torch.Tensor]) -> dict[str, float]:
    """`lora/<group>/update_A` and `update_B`: ||now - before|| / ||before|| per group, `before` being
    `snapshot(pairs)` taken one optimizer step earlier."""
    if not pairs:
        return {}
    names = group_names(pairs)
    now = [t for pair in pairs for t in (pair.down, pair.up)]
    with torch.no_grad():
        moved = torch._foreach_sub([t.float() for t in now], list(before))
        squares = torch.stack([torch.stack(torch._foreach_norm(moved)), torch.stack(torch._foreach_norm(list(before)))])
        squares = squares.square().reshape(2, len(pairs), 2).permute(1, 0, 2).reshape(len(pairs), 4)
        totals = _sum_by_group(squares, pairs, names)  # ||ΔA||², ||ΔB||², ||A||², ||B||² per group
        before_norms = totals[:, 2:].sqrt()
        ratios = torch.where(before_norms > 0, totals[:, :2].sqrt() / before_norms, torch.nan).tolist()
    return {
        f"lora/{group}/update_{part}": row[i] for group, row in zip(names, ratios) for i, part in enumerate(("A", "B"))
    }


def snapshot(pairs: Sequence[LoRAPair]) -> list[torch.Tensor]:
    """Copies (fp32) of every A and B, in `lora_pairs` order, for `relative_updates` one step later."""
    with torch.no_grad():
        return [t.detach().float().clone() for pair in pairs for t in (pair.down, pair.up)]


class LoRADiagnostics:
    """Every `every` optimizer steps, the norms and the update of that step; call `after_step` after each one.

    It copies the LoRA on the step before a due step (on step `start_step` itself when the next is due), so the
    update is that of one optimizer step, comparable to the learning rate whatever `every` is."""

    def __init__(self, network, every: int, *, by_block: bool = False, start_step: int = 0) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, not {every}")
        self.pairs = lora_pairs(network, by_block=by_block)
        self.every = every
        self._before: list[torch.Tensor] | None = None
        self._before_step: int | None = None
        self._take_snapshot_if_next_is_due(start_step)

    def after_step(self, step: int) -> dict[str, float] | None:
        """The diagnostics when step `step` (counted from 1) is due, else None (and nothing is computed)."""
        values = None
        if step % self.every == 0:
            values = lora_norms(self.pairs)
            if self._before is not None and self._before_step == step - 1:
                values.update(relative_updates(self.pairs, self._before))
            self._before = None
        self._take_snapshot_if_next_is_due(step)
        return values

    def _take_snapshot_if_next_is_due(self, step: int) -> None:
        if (step + 1) % self.every == 0:
            self._before, self._before_step = snapshot(self.pairs), step


def _norms_squared(pairs: Sequence[LoRAPair]) -> torch.Tensor:
    """(modules, 3): ||A||², ||B||² and ||scale·B·A||² of each pair; B·A through r x r Gram matrices, one batched
    matmul per shape."""
    with torch.no_grad():
        downs = [pair.down.detach().float().flatten(1) for pair in pairs]  # (r, in·kh·kw)
        ups = [pair.up.detach().float().flatten(1) for pair in pairs]  # (out, r)
        norms = torch.stack([torch.stack(torch._foreach_norm(downs)), torch.stack(torch._foreach_norm(ups))], 1)
        delta = torch.empty(len(pairs), device=norms.device)
        by_shape: dict[tuple, list[int]] = {}
        for index, (down, up) in enumerate(zip(downs, ups)):
            by_shape.setdefault((down.shape, up.shape), []).append(index)
        for indices in by_shape.values():
            a = torch.stack([downs[i] for i in indices])  # (k, r, n)
            b = torch.stack([ups[i] for i in indices])  # (k, m, r)
            gram_a = a @ a.transpose(1, 2)  # (k, r, r)
            gram_b = b.transpose(1, 2) @ b
            delta[indices] = (gram_a * gram_b).sum((1, 2)).clamp_min(0)  # rounding can dip below 0 near 0
        scales = torch.tensor([pair.scale for pair in pairs], device=norms.device)
        return torch.cat([norms.square(), (delta * scales.square())[:, None]], 1)


def _sum_by_group(values: torch.Tensor, pairs: Sequence[LoRAPair], names: Sequence[str]) -> torch.Tensor:
    """(groups, columns): the rows of `values` (one per pair) summed into every group each pair counts in."""
    position = {name: i for i, name in enumerate(names)}
    rows, groups = zip(*[(row, position[group]) for row, pair in enumerate(pairs) for group in pair.groups])
    totals = torch.zeros(len(names), values.shape[1], device=values.device, dtype=values.dtype)
    return totals.index_add_(0, torch.tensor(groups, device=values.device), values[list(rows)])
