"""Where LoRA files go and what they are called (sd-scripts' names), written atomically."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from library.atomic import write_text_atomic


class LoRASaver:
    """`<name>.safetensors` at the end, `<name>-<epoch:06d>.safetensors` for epoch checkpoints."""

    def __init__(self, output_dir: Path, output_name: str, dtype: torch.dtype) -> None:
        self.output_dir = Path(output_dir)
        self.output_name = output_name
        self.dtype = dtype
        self.saved: list[Path] = []

    @property
    def final_path(self) -> Path:
        return self.output_dir / f"{self.output_name}.safetensors"

    @property
    def param_groups_path(self) -> Path:
        return self.output_dir / f"{self.output_name}_param_groups.json"

    def save_param_groups(self, infos: Sequence, weight_decay: float | None) -> Path:
        """The optimizer groups (LoRA+ base/plus, lr, sizes) as JSON beside the LoRA files."""
        rows = [{**asdict(info), "weight_decay": weight_decay} for info in infos]
        write_text_atomic(self.param_groups_path, json.dumps(rows, indent=2) + "\n")
        return self.param_groups_path

    def epoch_path(self, epoch: int) -> Path:
        return self.output_dir / f"{self.output_name}-{epoch:06d}.safetensors"

    def save_epoch(self, network, metadata: Mapping[str, str], epoch: int) -> Path:
        return self._save(network, metadata, self.epoch_path(epoch))

    def save_final(self, network, metadata: Mapping[str, str]) -> Path:
        return self._save(network, metadata, self.final_path)

    def _save(self, network, metadata: Mapping[str, str], path: Path) -> Path:
        network.save_weights(path, self.dtype, metadata)
        self.saved.append(path)
        return path
