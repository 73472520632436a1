"""Load SDXL offline: an original-layout single file (``.safetensors`` / ``.ckpt``) or a diffusers folder.

Nothing here touches the network. The models are built from diffusers-format configs on the meta device and filled
one tensor at a time (``library.files.weight_files``): memory never holds a second copy of the model, in fp32 or
in the file's dtype, and fp8 / fp16 weight storage is applied as each tensor arrives. A single file's configs come
from a local config folder, resolved in this order:

1. the ``config_dir`` argument;
2. a folder beside the file named ``<stem>_diffusers`` or ``<stem>_config`` that holds ``model_index.json``;
3. the shipped ``configs/sdxl`` (SDXL base 1.0 configs and the CLIP tokenizers, no weights).

Its original (SGM) names map to diffusers' through ``networks.sdxl_keys``; a diffusers folder's names map 1:1.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from library.errors import UserInputError
from library.files.weight_files import read_safetensors_header
from networks.sdxl_keys import VAE_LEVELS, TensorSource, single_file_source, te_name_with_text_model

if TYPE_CHECKING:  # torch is imported only when loading, so the CLI's path check stays cheap
    import torch

    from library.files.weight_files import TensorReader

SHIPPED_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "sdxl"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
CONFIG_DIR_SUFFIXES = ("_diffusers", "_config")
_FLAG = "--pretrained_model_name_or_path"
_HINT = "give an SDXL .safetensors single file or a diffusers folder"


@dataclass
class SDXLModels:
    """The SDXL components the trainer uses, plus where they came from. A component is None while a staged load
    has not loaded it yet, and once released (its outputs cached, nothing needing it later)."""

    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder1: Any  # transformers CLIPTextModel (CLIP ViT-L/14 text tower)
    text_encoder2: Any  # transformers CLIPTextModelWithProjection (OpenCLIP bigG text tower)
    tokenizer1: Any  # CLIPTokenizer, pads with <|endoftext|>
    tokenizer2: Any  # CLIPTokenizer, pads with "!" (id 0)
    scheduler: Any  # the pipeline's scheduler (EulerDiscreteScheduler for SDXL base), for sampling
    source: Path  # the file or folder given
    config_dir: Path  # the diffusers-format folder the configs came from (the folder itself for a folder)
    pending: dict[str, Any] = field(default_factory=dict, repr=False)
    """Components a staged load has checked against the file but not loaded yet: built on the meta device (no
    weight memory), filled by a later ``load_sdxl(..., into=...)``."""

    @property
    def is_single_file(self) -> bool:
        """True when the weights came from one original-layout file."""
        return self.source.is_file()


# --- Cheap checks (no torch) ---------------------------------------------------------------------------------------
def check_model_path(path: str | Path) -> None:
    """Raise UserInputError (one line) unless ``path`` looks like an SDXL single file or a diffusers folder.

    Cheap: it reads at most a safetensors header, never a model. A ``.ckpt`` is only checked for existence.
    """
    p = Path(path)
    if not p.exists():
        hint = _HINT
        if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
            hint += "; Hub repo ids are not downloaded, download the model first"
        raise UserInputError(f"{_FLAG}: no such file or folder: {path} ({hint})")
    if p.is_dir():
        if (p / "model_index.json").is_dir():
            raise UserInputError(f"{_FLAG}: {p / 'model_index.json'} is a folder, not a file ({_HINT})")
        if not (p / "model_index.json").is_file():
            raise UserInputError(
                f"{_FLAG}: {path} is a folder without model_index.json, not a diffusers model ({_HINT})"
            )
        return
    if p.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise UserInputError(f"{_FLAG}: {path} is not a .safetensors or .ckpt file ({_HINT})")
    if p.suffix.lower() == ".safetensors":
        try:
            keys = list(read_safetensors_header(p)[0])
        except UserInputError as e:
            raise UserInputError(
                f"{_FLAG}: {path}: {str(e).removeprefix(f'{p}: ')}; the file is damaged or not a "
                "model: download or convert it again"
            ) from None
        if not any(k.startswith("model.diffusion_model.") for k in keys):
            raise UserInputError(
                f"{_FLAG}: {path} holds no UNet (no model.diffusion_model.* tensors): is it a LoRA or a VAE? ({_HINT})"
            )
        if not any(k.startswith("conditioner.embedders.1.") for k in keys):
            raise UserInputError(
                f"{_FLAG}: {path} is not an SDXL checkpoint (no second text encoder, conditioner.embedders.1.*): "
                f"SD 1.x/2.x models are not supported ({_HINT})"
            )


def resolve_config_dir(model_file: str | Path, config_dir: str | Path | None = None) -> Path:
    """The diffusers-format config folder for a single file (see the module docstring for the order)."""
    if config_dir is not None:
        config_dir = Path(config_dir)
        if not (config_dir / "model_index.json").is_file():
            raise UserInputError(f"config folder {config_dir} holds no model_index.json (a diffusers-format folder)")
        return config_dir
    model_file = Path(model_file)
    for suffix in CONFIG_DIR_SUFFIXES:
        beside = model_file.with_name(model_file.stem + suffix)
        if (beside / "model_index.json").is_file():
            return beside
    return SHIPPED_CONFIG_DIR


# --- Loading -------------------------------------------------------------------------------------------------------
COMPONENTS = ("unet", "vae", "text_encoder1", "text_encoder2")
SUBFOLDERS = {"unet": "unet", "vae": "vae", "text_encoder1": "text_encoder", "text_encoder2": "text_encoder_2"}
LINEAR_DTYPE_COMPONENTS = ("unet", "text_encoder1", "text_encoder2")
_BESIDE_HINT = "for a model that is not SDXL base 1.0's architecture, put its diffusers config folder beside it as"


def load_sdxl(
    path: str | Path,
    *,
    config_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    linear_weight_dtypes: Mapping[str, torch.dtype] | None = None,
    vae_dtype: torch.dtype | None = None,
    components: Sequence[str] = COMPONENTS,
    into: SDXLModels | None = None,
) -> SDXLModels:
    """Load SDXL from a single file (original layout) or a diffusers folder, offline, in eval mode on ``device``.

    Each model is built from its config on the meta device, then filled one tensor at a time (read, converted to
    its target dtype, moved, assigned), so memory never holds more than the loaded models plus one tensor as
    stored: no fp32 or file-dtype copy of the whole model. Target dtypes: ``dtype`` (None: float32) for every
    floating tensor, except the weights of ``Linear`` / ``Conv2d`` modules of a component named in
    ``linear_weight_dtypes`` ("unet", "text_encoder1", "text_encoder2"; e.g. ``torch.float8_e4m3fn`` storage),
    and the VAE, which gets ``vae_dtype`` (None: ``dtype``). Integer buffers keep their dtype.

    Staged loading (a trainer that caches the VAE's and text encoders' outputs need not hold them with the UNet):
    ``components`` (of :data:`COMPONENTS`) are loaded and the others left None; a later call with ``into`` (the
    models a first call returned, same arguments otherwise) loads more of them into it and returns it. Each tensor
    is read once over all calls (no whole-file read; only the file's header again). The first call checks every
    component against the file, loaded now or not, so a misfit still fails before any work with the first ones.
    """
    import torch

    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"components: unknown {unknown} (use {list(COMPONENTS)})")
    wanted = [c for c in COMPONENTS if c in components]
    check_model_path(path)
    source = Path(path)
    resolved = source if source.is_dir() else resolve_config_dir(source, config_dir)
    if into is not None and (source != into.source or resolved != into.config_dir):
        raise ValueError(f"into: models of {into.source} ({into.config_dir}), not of {path} ({resolved})")
    loaded = [c for c in wanted if into is not None and getattr(into, c) is not None]
    if loaded:
        raise ValueError(f"components: {loaded} already loaded")
    precisions = _precisions(dtype or torch.float32, dict(linear_weight_dtypes or {}), vae_dtype)
    if into is None:
        pending = empty_models(resolved)
        tokenizer1, tokenizer2, scheduler = _tokenizers_and_scheduler(resolved)  # before the weights: fails fast
        into = SDXLModels(None, None, None, None, tokenizer1, tokenizer2, scheduler, source, resolved, pending)
        checked = list(COMPONENTS)
    else:  # parked by the first call (already checked), or built again after a release
        missing = [c for c in wanted if c not in into.pending]
        into.pending.update(empty_models(resolved, missing) if missing else {})
        checked = wanted
    if not checked:
        return into
    with ExitStack() as stack:
        readers = _open_readers(source, stack, checked)
        # Every name and shape is checked before the first tensor is read: a misfit fails in a second.
        plan_for = _folder_plan if source.is_dir() else _single_file_plan
        plans = {c: plan_for(c, into.pending[c], readers[c], resolved, precisions[c]) for c in checked}
        for c in wanted:
            model = into.pending.pop(c)
            _fill(model, readers[c], plans[c], precisions[c], torch.device(device))
            setattr(into, c, model)  # SDXLModels' fields are named as COMPONENTS
    return into


@dataclass(frozen=True)
class _Precision:
    """Target dtypes of one component's tensors."""

    dtype: torch.dtype  # every floating parameter and buffer...
    linear_weight_dtype: torch.dtype | None  # ...except Linear / Conv2d weights when set


def _precisions(
    dtype: torch.dtype, linear: dict[str, torch.dtype], vae_dtype: torch.dtype | None
) -> dict[str, _Precision]:
    """Per component, the target dtypes from ``load_sdxl``'s arguments."""
    unknown = sorted(set(linear) - set(LINEAR_DTYPE_COMPONENTS))
    if unknown:
        raise ValueError(f"linear_weight_dtypes: unknown components {unknown} (use {list(LINEAR_DTYPE_COMPONENTS)})")
    precisions = {name: _Precision(dtype, linear.get(name)) for name in LINEAR_DTYPE_COMPONENTS}
    precisions["vae"] = _Precision(vae_dtype or dtype, None)
    return precisions


def empty_models(config_dir: Path, components: Sequence[str] = COMPONENTS) -> dict[str, torch.nn.Module]:
    """The ``components`` built from the configs in ``config_dir`` with their parameters on the meta device (no
    weight memory; buffers such as ``position_ids`` are real), keyed as :data:`COMPONENTS`. Their structure (module
    names, layer shapes) is the loaded model's: what a LoRA network needs to name and create its adapters."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    for component in components:
        if not (config_dir / SUBFOLDERS[component] / "config.json").is_file():
            raise UserInputError(f"config folder {config_dir} lacks {SUBFOLDERS[component]}/config.json")
    builders = {
        "unet": lambda: UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(config_dir, subfolder="unet", local_files_only=True)
        ),
        "vae": lambda: AutoencoderKL.from_config(
            AutoencoderKL.load_config(config_dir, subfolder="vae", local_files_only=True)
        ),
        "text_encoder1": lambda: CLIPTextModel(
            CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True)
        ),
        "text_encoder2": lambda: CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2", local_files_only=True)
        ),
    }
    with _config_errors(config_dir, "the model configs"), init_empty_weights(include_buffers=False):
        return {component: builders[component]() for component in COMPONENTS if component in components}


@contextmanager
def _config_errors(config_dir: Path, what: str) -> Iterator[None]:
    """A config or tokenizer file that parses but that diffusers / transformers cannot use (a wrong value, a
    missing key) is one line naming the folder, not a library traceback."""
    try:
        yield
    except UserInputError:
        raise
    except Exception as error:  # noqa: BLE001 - the libraries raise many types for a bad config
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserInputError(
            f"{_FLAG}: {what} in {config_dir} cannot be used ({type(error).__name__}: {reason}); "
            "give the configs that came with the model"
        ) from None


def _tokenizers_and_scheduler(config_dir: Path) -> tuple[Any, Any, Any]:
    """The two CLIP tokenizers and the scheduler (the class its config names, EulerDiscrete for SDXL base)."""
    import diffusers
    from transformers import CLIPTokenizer

    with _config_errors(config_dir, "the tokenizers or scheduler config"):
        tokenizer1 = CLIPTokenizer.from_pretrained(config_dir / "tokenizer", local_files_only=True)
        tokenizer2 = CLIPTokenizer.from_pretrained(config_dir / "tokenizer_2", local_files_only=True)
        config = diffusers.EulerDiscreteScheduler.load_config(config_dir, subfolder="scheduler", local_files_only=True)
        scheduler_class = getattr(diffusers, str(config.get("_class_name")), diffusers.EulerDiscreteScheduler)
        return tokenizer1, tokenizer2, scheduler_class.from_config(config)


# --- Filling the empty models, one tensor at a time ----------------------------------------------------------------
class _MisfitError(Exception):
    """A model parameter the checkpoint lacks or has in another shape (the callers say which file and what to do)."""


@dataclass(frozen=True)
class _Load:
    """One parameter to fill: its name in the model, where it comes from, the dtype it is stored in."""

    name: str
    source: TensorSource
    dtype: torch.dtype


def _plan(
    model: torch.nn.Module, reader: TensorReader, locate: Callable[[str], TensorSource], precision: _Precision
) -> list[_Load]:
    """Every parameter of ``model`` with its source in ``reader`` and target dtype, checked against the file's
    names and shapes before anything is read (raises _MisfitError for the first that does not fit)."""
    import torch

    linear = (torch.nn.Linear, torch.nn.Conv2d)
    linear_weights = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, linear)}
    plan = []
    for name, param in model.named_parameters():
        try:
            source = locate(name)
        except ValueError as e:
            raise _MisfitError(str(e)) from None
        if source.key not in reader:
            raise _MisfitError(f"no tensor {source.key}")
        shape = source.shape(reader.shape(source.key))
        if shape != tuple(param.shape):
            raise _MisfitError(f"{source.key} gives shape {list(shape)}, the config needs {list(param.shape)}")
        target = precision.dtype
        if name in linear_weights and precision.linear_weight_dtype is not None:
            target = precision.linear_weight_dtype
        plan.append(_Load(name, source, target))
    return plan


def _fill(
    model: torch.nn.Module, reader: TensorReader, plan: list[_Load], precision: _Precision, device: torch.device
) -> None:
    """Read, convert and assign each planned tensor in turn, then place the buffers and switch to eval mode.

    A tensor already in its target dtype, for the CPU, becomes the parameter as read (no copy). The others are
    read into one reused scratch buffer and copied into their final tensor: the only allocations are the weights
    that stay, so the heap does not fragment between them and the peak is the models plus the largest tensor.
    """
    import torch

    direct = {load.name for load in plan if reader.dtype(load.source.key) == load.dtype and device.type == "cpu"}
    largest = max((reader.nbytes(load.source.key) for load in plan if load.name not in direct), default=0)
    scratch = torch.empty(largest, dtype=torch.uint8)
    for load in plan:
        key = load.source.key
        rows = load.source.rows(reader.shape(key))
        if load.name in direct:
            value = load.source.derive(reader.read(key, rows))
        else:
            stored = load.source.derive(reader.read(key, rows, scratch=scratch))
            value = torch.empty(stored.shape, dtype=load.dtype, device=device).copy_(stored)
        _assign_parameter(model, load.name, value)
    del scratch
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            dtype = precision.dtype if buffer.is_floating_point() else buffer.dtype
            setattr(module, name, buffer.to(device, dtype))
    model.eval()


def _assign_parameter(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the (meta) parameter ``name`` with ``value``, keeping its ``requires_grad``."""
    import torch

    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    requires_grad = getattr(module, leaf).requires_grad
    setattr(module, leaf, torch.nn.Parameter(value, requires_grad=requires_grad))


def _open_readers(source: Path, stack: ExitStack, components: Sequence[str]) -> dict[str, TensorReader]:
    """A reader per component: the single file for all, or each diffusers subfolder's weights file."""
    from library.files.weight_files import TensorReader, component_weight_candidates, find_component_weights

    if source.is_file():
        reader = stack.enter_context(TensorReader(source))
        return dict.fromkeys(components, reader)
    readers = {}
    for component in components:
        subfolder = source / SUBFOLDERS[component]
        weights = find_component_weights(subfolder)
        if weights is None:
            looked_for = ", ".join(component_weight_candidates()[:4])
            raise UserInputError(f"{_FLAG}: {subfolder} holds no weights (looked for {looked_for}...)")
        readers[component] = stack.enter_context(TensorReader(weights))
    return readers


def _single_file_plan(
    component: str, model: torch.nn.Module, reader: TensorReader, config_dir: Path, precision: _Precision
) -> list[_Load]:
    """The plan of one component from an original-layout single file (names through :mod:`networks.sdxl_keys`);
    a misfit is a one-line UserInputError saying where the model's own configs go."""
    levels = len(model.config.block_out_channels) if component == "vae" else VAE_LEVELS
    try:
        return _plan(model, reader, lambda name: single_file_source(component, name, levels), precision)
    except _MisfitError as e:
        raise UserInputError(
            f"{_FLAG}: {reader.path} does not fit the configs in {config_dir} ({component}: {e}); "
            f"{_BESIDE_HINT} {reader.path.stem}_diffusers"
        ) from None


def _folder_plan(
    component: str, model: torch.nn.Module, reader: TensorReader, config_dir: Path, precision: _Precision
) -> list[_Load]:
    """The plan of one component from its diffusers subfolder (names one to one); a misfit is a one-line
    UserInputError naming the weights file and its config."""
    try:
        return _plan(model, reader, lambda name: _folder_source(reader, name), precision)
    except _MisfitError as e:
        raise UserInputError(
            f"{_FLAG}: {reader.path} does not fit {config_dir / SUBFOLDERS[component] / 'config.json'} ({e}); "
            "the weights and the config must come from the same model"
        ) from None


def _folder_source(reader: TensorReader, name: str) -> TensorSource:
    """The tensor of a diffusers folder for parameter ``name``: the same name, or the name with / without
    ``text_model.`` (transformers >= 5.6 writes CLIPTextModel's names without it, older versions with it)."""
    for candidate in (name, te_name_with_text_model(name), name.removeprefix("text_model.")):
        if candidate in reader:
            return TensorSource(candidate)
    return TensorSource(name)


# --- Hashes for the LoRA metadata ----------------------------------------------------------------------------------
_CHUNK = 1 << 20


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_hashes(path: str | Path) -> tuple[str, str]:
    """``(ss_sd_model_hash, ss_new_sd_model_hash)`` as sd-scripts writes them for a single file: the first
    8 hex digits of the sha256 of the 0x10000 bytes at offset 0x100000 (A1111's legacy hash; a file shorter
    than 1 MiB hashes the empty string, as in sd-scripts), and the sha256 of the whole file.

    For a diffusers folder (sd-scripts has no defined value): the second is the sha256 over every file below
    the folder in sorted relative-path order, each contributing ``path NUL sha256(file) NL``; the first is its
    first 8 hex digits. It changes when any weight or config changes and does not depend on the folder's name.
    """
    p = Path(path)
    if p.is_dir():
        digest = hashlib.sha256()
        for file in sorted(f for f in p.rglob("*") if f.is_file()):
            digest.update(f"{file.relative_to(p).as_posix()}\0{_sha256_file(file)}\n".encode())
        full = digest.hexdigest()
        return full[:8], full
    with open(p, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    return legacy, _sha256_file(p)
