"""Every file `load_sdxl` will read, checked before it reads them: a damaged model is one line, not a traceback
after minutes of loading, and the tensor shapes it gives size the LoRA before the model loads.

Cheap: safetensors headers and their length (a truncated copy ends before its last tensor), shard indexes,
pickles memory-mapped (their tensors are not read), and every JSON config and tokenizer file of the config
folder parsed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserInputError
from library.files.weight_files import read_safetensors_header
from library.model.loading import COMPONENTS, SUBFOLDERS, check_model_path, resolve_config_dir

Shape = tuple[int, ...]

_FLAG = "--pretrained_model_name_or_path"
_ADVICE = "the file is damaged or not a model: download or convert it again"
CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "scheduler/scheduler_config.json",
)
"""The configs the loader reads from a diffusers-format folder (besides the tokenizer folders)."""
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")


@dataclass(frozen=True)
class ModelShapes:
    """Tensor name -> shape of a checked model: one table for a single file (original layout), or one per
    component of a diffusers folder (keyed as `library.model.loading.COMPONENTS`)."""

    single_file: dict[str, Shape] | None
    components: dict[str, dict[str, Shape]]


def check_model_files(path: str | Path, config_dir: str | Path | None = None) -> ModelShapes:
    """Check what loading `path` will read (see the module docstring); one `UserInputError` line naming the
    first file that is damaged, truncated, of the wrong type or missing. Returns the tensor shapes."""
    check_model_path(path)
    source = Path(path)
    if source.is_dir():
        check_config_folder(source)
        return ModelShapes(
            None, {component: _weight_shapes(source / SUBFOLDERS[component]) for component in COMPONENTS}
        )
    check_config_folder(resolve_config_dir(source, config_dir))
    return ModelShapes(_file_shapes(source), {})


def check_config_folder(folder: Path) -> None:
    """Every config the loader reads from `folder` is there and parses; so does every JSON of the tokenizer
    folders, and their merges.txt is text."""
    for name in CONFIG_FILES:
        _check_json(folder / name, required=True)
    for tokenizer in TOKENIZER_FOLDERS:
        sub = folder / tokenizer
        if not sub.is_dir():
            raise UserInputError(f"{_FLAG}: config folder {folder} lacks {tokenizer}/ (the CLIP tokenizer files)")
        for file in sorted(sub.iterdir()):
            if file.suffix == ".json":
                _check_json(file, required=True)
            elif file.name == "merges.txt":
                _check_text(file)


def _check_json(path: Path, required: bool) -> None:
    if not path.exists():
        if required:
            raise UserInputError(f"{_FLAG}: {path} is missing (the model's configs must come with it)")
        return
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        problem = "a folder, not a file" if path.is_dir() else f"not readable JSON: {type(error).__name__}"
        raise UserInputError(f"{_FLAG}: {path} is damaged ({problem}); {_ADVICE}") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{_FLAG}: {path} is damaged (JSON {type(value).__name__}, not an object); {_ADVICE}")


def _check_text(path: Path) -> None:
    try:
        path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        problem = "a folder, not a file" if path.is_dir() else f"not text: {type(error).__name__}"
        raise UserInputError(f"{_FLAG}: {path} is damaged ({problem}); {_ADVICE}") from None


def _weight_shapes(subfolder: Path) -> dict[str, Shape]:
    from library.files.weight_files import component_weight_candidates, find_component_weights

    weights = find_component_weights(subfolder)
    if weights is None:
        in_the_way = [subfolder / name for name in component_weight_candidates() if (subfolder / name).is_dir()]
        if in_the_way:
            raise UserInputError(f"{_FLAG}: {in_the_way[0]} is a folder, not a weights file; {_ADVICE}")
        looked_for = ", ".join(component_weight_candidates()[:4])
        raise UserInputError(f"{_FLAG}: {subfolder} holds no weights (looked for {looked_for}...)")
    return _file_shapes(weights)


def _file_shapes(file: Path) -> dict[str, Shape]:
    """Shapes from a weights file (safetensors header, shard index and its shards, or a memory-mapped pickle)."""
    try:
        if file.name.lower().endswith(".safetensors"):
            entries, _, _ = read_safetensors_header(file)
            return {name: entry.shape for name, entry in entries.items()}
        from library.files.weight_files import TensorReader

        with TensorReader(file) as reader:
            return {key: reader.shape(key) for key in reader.keys()}
    except UserInputError as error:
        raise UserInputError(f"{_FLAG}: {error}; {_ADVICE}") from None
