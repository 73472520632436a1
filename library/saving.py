"""Where LoRA files go and what they are called (sd-scripts' names), written atomically."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


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
