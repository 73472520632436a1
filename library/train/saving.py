"""Where LoRA files and training states go and what they are called (sd-scripts' names), written atomically,
and the rotation that keeps only the last N of them."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from library.files.atomic import atomic_file, write_text_atomic
from library.train.ema import ema_file_bytes, ema_path


class LoRASaver:
    """`<name>.safetensors` at the end, `<name>-<epoch:06d>.safetensors` for epoch checkpoints,
    `<name>-step<step:08d>.safetensors` for step checkpoints; a state folder beside each is `<stem>-state`,
    an EMA file `<stem>-ema.safetensors`."""

    def __init__(self, output_dir: Path, output_name: str, dtype: torch.dtype, ema=None) -> None:
        self.output_dir = Path(output_dir)
        self.output_name = output_name
        self.dtype = dtype
        self.ema = ema
        """A `library.train.ema.LoRAEMA`: every save also writes `<stem>-ema.safetensors`."""
        self.saved: list[Path] = []

    @property
    def final_path(self) -> Path:
        return self.output_dir / f"{self.output_name}.safetensors"

    @property
    def param_groups_path(self) -> Path:
        return self.output_dir / f"{self.output_name}_param_groups.json"

    @property
    def report_path(self) -> Path:
        return self.output_dir / f"{self.output_name}_report.json"

    @property
    def report_page_path(self) -> Path:
        """`library.report.run_page.write_run_report`'s page, built from `report_path` and the sample images."""
        return self.output_dir / f"{self.output_name}_report.html"

    def save_param_groups(self, infos: Sequence, weight_decay: float | None) -> Path:
        """The optimizer groups (LoRA+ base/plus, lr, sizes) as JSON beside the final LoRA file, written with it
        (every LoRA file also carries them as `ss_lr_param_groups`)."""
        rows = [{**asdict(info), "weight_decay": weight_decay} for info in infos]
        write_text_atomic(self.param_groups_path, json.dumps(rows, indent=2) + "\n", what="parameter groups")
        return self.param_groups_path

    def epoch_path(self, epoch: int) -> Path:
        return self.output_dir / f"{self.output_name}-{epoch:06d}.safetensors"

    def step_path(self, step: int) -> Path:
        return self.output_dir / f"{self.output_name}-step{step:08d}.safetensors"

    @staticmethod
    def state_path(lora_path: Path) -> Path:
        """The state folder saved with a LoRA file: `<stem>-state`."""
        return lora_path.with_name(f"{lora_path.stem}-state")

    @staticmethod
    def ema_path(lora_path: Path) -> Path:
        return ema_path(lora_path)

    def old_epoch_paths(self, epoch: int, every: int, keep: int | None) -> list[Path]:
        """Epoch checkpoints that --save_last_n_epochs(_state) `keep` drops after saving `epoch`: those more than
        `keep` saves old (sd-scripts' rule: epoch - every * keep and older)."""
        if not keep:
            return []
        return [self.epoch_path(e) for e in range(1, epoch - every * keep + 1)]

    def old_step_paths(self, step: int, every: int, keep_steps: int | None) -> list[Path]:
        """Step checkpoints that --save_last_n_steps(_state) drops after saving `step`: older than `keep_steps`."""
        if not keep_steps or not every:
            return []
        return [self.step_path(s) for s in range(every, step - keep_steps + 1, every)]

    def remove_files(self, lora_paths) -> list[Path]:
        """Remove these LoRA files and their EMA files, where present."""
        removed = []
        for path in lora_paths:
            for target in (path, self.ema_path(path)):
                if target.is_file():
                    target.unlink()
                    removed.append(target)
        return removed

    def remove_states(self, lora_paths) -> list[Path]:
        removed = []
        for path in lora_paths:
            state = self.state_path(path)
            if state.is_dir():
                shutil.rmtree(state)
                removed.append(state)
        return removed

    def save_epoch(self, network, metadata: Mapping[str, str], epoch: int) -> Path:
        return self._save(network, metadata, self.epoch_path(epoch))

    def save_final(self, network, metadata: Mapping[str, str]) -> Path:
        return self._save(network, metadata, self.final_path)

    def save_step(self, network, metadata: Mapping[str, str], step: int) -> Path:
        return self._save(network, metadata, self.step_path(step))

    def _save(self, network, metadata: Mapping[str, str], path: Path) -> Path:
        if self.ema is None:
            network.save_weights(path, self.dtype, metadata)
            self.saved.append(path)
            return path
        # Both files or neither. The EMA file is made first (a NaN in the average stops here) and written to its
        # temporary file, which is renamed over the earlier EMA file only once the LoRA file is in place: a full
        # disk on either file leaves both earlier files as they were.
        twin = self.ema_path(path)
        ema_bytes = ema_file_bytes(network, self.ema, twin, self.dtype, metadata)
        with atomic_file(twin, what="EMA file") as handle:
            handle.write(ema_bytes)
            network.save_weights(path, self.dtype, metadata)
        self.saved += [path, twin]
        return path


def output_file_pattern(output_name: str) -> re.Pattern[str]:
    """Every name this trainer gives a file or folder of run `output_name` in the output folder (and its `sample/`
    folder): LoRA, EMA and checkpoint files, state folders, the JSON beside them, --output_config's TOML and the
    sample images. `library.files.stale_files` removes temporary files only of targets matching it."""
    name = re.escape(output_name)
    checkpoint = rf"{name}(?:-\d{{6}}|-step\d{{8}})?"
    return re.compile(
        rf"{checkpoint}(?:-ema)?\.safetensors|{checkpoint}-state|{name}_param_groups\.json|{name}_report\.(?:json|html)"
        rf"|{name}\.toml|{name}_(?:e\d{{6}}|\d{{6}})_\d{{2}}_\d{{14}}_\d+\.png"
    )
