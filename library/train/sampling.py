"""Sample images during training: sd-scripts' `--sample_prompts` files, when to sample, and the images, made by
diffusers' SDXL pipeline run on the models being trained (the LoRA works through its forward hooks), one PNG per
prompt under ``<output_dir>/sample/`` with sd-scripts' file names.

Prompt files (as sd-scripts reads them; each prompt's position, from 0, is its index in the file names):

- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped. Options follow the prompt
  inside the line: ``--n`` negative prompt, ``--w`` / ``--h`` width / height, ``--d`` seed, ``--s`` steps, ``--l``
  CFG scale, ``--ss`` sampler, e.g. ``a cat --n blurry --w 1024 --h 768 --d 42 --s 28 --l 6.5 --ss euler_a``.
- ``.toml``: a ``[prompt]`` table of shared values and one ``[[prompt.subset]]`` table per prompt (an entry's value
  wins over the shared one; sd-scripts fails on such a repeat); an array ``[[prompt]]`` of tables also works.
- ``.json``: a list of tables, or of lines in the ``.txt`` syntax.

Table keys are sd-scripts' names: ``prompt``, ``negative_prompt``, ``width``, ``height``, ``seed``,
``sample_steps``, ``scale``, ``sample_sampler``.

Where we differ from sd-scripts, on purpose: an unknown option or key, or a value that is not a number, is an
error naming the file and line (sd-scripts logs or ignores it and samples with defaults); a prompt without a seed
gets ``seed_base + index`` (sd-scripts draws a random one, so its grids do not compare across runs); an unknown
sampler is an error (sd-scripts silently uses DDIM); ``0`` for ``--sample_every_n_steps/epochs`` means off
(sd-scripts divides by it).

Sampling leaves the training run as it found it: the RNG states (torch, CUDA, Python, NumPy), every module's
train/eval flag and each model's device are restored afterwards, and no model is cast (the base weights may be
stored in fp8 and up-cast per layer, see `library.model.fp8`).

The pipeline gets the prompt embeddings from `library.model.text_encoding` (the training's own conditioning, so
`--max_token_length` 150/225 works and an absent negative prompt is the empty prompt, as in sd-scripts) and
returns latents, which are decoded here with the VAE in its own dtype (the pipeline would feed bf16 latents to an
fp32 VAE). The scheduler of each sampler is built from the model's scheduler config (its betas, prediction
type and timestep spacing), so the images match what diffusers' SDXL pipeline makes of the same model.

torch, NumPy, PIL and diffusers are imported inside the functions that make images: reading and checking a
prompt file at start-up loads none of them.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from library.errors import UserInputError
from library.files.atomic import atomic_file
from library.files.toml_io import TomlFileError, loads
from library.train.loss import SDXL_VAE_SCALE

if TYPE_CHECKING:
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline
    from torch import nn

    from library.model.loading import SDXLModels

SAMPLERS = (
    "ddim",
    "pndm",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpm_2",
    "dpm_2_a",
    "dpmsolver",
    "dpmsolver++",
    "dpmsingle",
    "k_lms",
    "k_euler",
    "k_euler_a",
    "k_dpm_2",
    "k_dpm_2_a",
)
"""sd-scripts' `--sample_sampler` choices (a ``k_`` name is the same sampler as the plain one, as there)."""
NEEDS_SCIPY = ("lms", "k_lms")
"""Samplers whose diffusers scheduler (LMSDiscreteScheduler) needs scipy (in requirements.txt; checked at start-up
for environments installed some other way)."""
DEFAULT_SAMPLER = "ddim"
DEFAULT_SIZE = 512
DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
MAX_STEPS = 1000
MIN_SIZE = 64
_FLAG = "--sample_prompts"

_LINE_OPTIONS = {
    "n": "negative_prompt",
    "w": "width",
    "h": "height",
    "d": "seed",
    "s": "steps",
    "l": "scale",
    "ss": "sampler",
}
"""Option letters inside a .txt line -> SamplePrompt field."""
_TABLE_KEYS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "sample_steps": "steps",
    "scale": "scale",
    "sample_sampler": "sampler",
}
"""Keys of a .toml / .json prompt table -> SamplePrompt field."""


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to make, with sd-scripts' defaults."""

    index: int
    """Position in the prompt file (from 0), part of the image's file name."""
    prompt: str
    negative_prompt: str = ""
    width: int = DEFAULT_SIZE
    """Pixels, a multiple of 8, at least 64 (rounded down as sd-scripts does)."""
    height: int = DEFAULT_SIZE
    seed: int | None = None
    """The prompt's own seed (``--d``); None: `seed_for` derives one."""
    steps: int = DEFAULT_STEPS
    """Denoising steps, 1..1000."""
    scale: float = DEFAULT_SCALE
    """Classifier-free guidance scale; at most 1 turns guidance off."""
    sampler: str | None = None
    """A sampler of `SAMPLERS` for this prompt only (``--ss``); None: `--sample_sampler`."""

    def seed_for(self, seed_base: int) -> int:
        """The seed this image is made with: its own, else ``seed_base + index`` (the same in every run)."""
        return self.seed if self.seed is not None else seed_base + self.index


# --- Reading prompt files ------------------------------------------------------------------------------------------
def load_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """Read a .txt, .toml or .json prompt file (see the module docstring); one UserInputError line if it is bad."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{_FLAG}: no such file: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".toml", ".json"):
        raise UserInputError(f"{_FLAG}: {path} must be a .txt, .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of the text
    except OSError as error:
        raise UserInputError(f"{_FLAG}: cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise UserInputError(
            f"{_FLAG}: {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start}); save it as UTF-8"
        ) from None
    if suffix == ".txt":
        entries = [
            (f"line {number}", line.strip())
            for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")
        ]
    elif suffix == ".toml":
        entries = _toml_entries(path, text)
    else:
        entries = _json_entries(path, text)
    if not entries:
        raise UserInputError(f"{_FLAG}: {path} holds no prompts; add some (see --help) or leave out {_FLAG}")
    prompts = []
    for index, (where, entry) in enumerate(entries):
        try:
            fields = parse_prompt_line(entry) if isinstance(entry, str) else _table_fields(entry)
            prompts.append(make_sample_prompt(index, fields))
        except ValueError as error:
            raise UserInputError(f"{_FLAG}: {path}, {where}: {error}") from None
    return prompts


def _toml_entries(path: Path, text: str) -> list[tuple[str, object]]:
    try:
        data = loads(text)
    except TomlFileError as error:
        raise UserInputError(f"{_FLAG}: {path} {error}") from None
    extra = sorted(set(data) - {"prompt"})
    table = data.get("prompt")
    if extra or not isinstance(table, (dict, list)):
        found = f" (found {', '.join(extra)})" if extra else ""
        raise UserInputError(f"{_FLAG}: {path} needs a [prompt] table with [[prompt.subset]] entries{found}")
    if isinstance(table, list):  # [[prompt]] entries
        return [(f"[[prompt]] entry {number}", entry) for number, entry in enumerate(table, 1)]
    shared = {key: value for key, value in table.items() if key != "subset"}
    subsets = table.get("subset", [])
    if not isinstance(subsets, list):
        raise UserInputError(f"{_FLAG}: {path}: prompt.subset must be [[prompt.subset]] tables")
    return [
        (f"[[prompt.subset]] entry {number}", {**shared, **entry} if isinstance(entry, dict) else entry)
        for number, entry in enumerate(subsets, 1)
    ]


def _json_entries(path: Path, text: str) -> list[tuple[str, object]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserInputError(f"{_FLAG}: {path} is not valid JSON ({error})") from None
    if not isinstance(data, list):
        raise UserInputError(f"{_FLAG}: {path} must hold a JSON list of prompts (tables or lines)")
    return [(f"prompt {number}", entry) for number, entry in enumerate(data, 1)]


def parse_prompt_line(line: str) -> dict[str, str]:
    """``prompt --opt value ...`` -> raw field strings, split on " --" as sd-scripts does (ValueError if bad)."""
    head, *options = line.split(" --")
    fields = {"prompt": head.strip()}
    for option in options:
        if not option.strip():
            continue
        name, _, value = option.strip().partition(" ")
        field = _LINE_OPTIONS.get(name.lower())
        if field is None:
            raise ValueError(
                f"unknown option --{name}{_nearest(name.lower(), _LINE_OPTIONS, '--')} "
                f"(options: {', '.join('--' + o for o in _LINE_OPTIONS)})"
            )
        if not value.strip():
            raise ValueError(f"--{name} needs a value")
        fields[field] = value.strip()
    return fields


def _table_fields(entry: object) -> dict[str, object]:
    if not isinstance(entry, Mapping):
        raise ValueError(f"a prompt must be a table (or a line of text), not {type(entry).__name__}")
    fields = {}
    for key, value in entry.items():
        if key not in _TABLE_KEYS:
            raise ValueError(f"unknown key {key!r}{_nearest(key, _TABLE_KEYS, '')} (keys: {', '.join(_TABLE_KEYS)})")
        fields[_TABLE_KEYS[key]] = value
    if "prompt" not in fields:
        raise ValueError("the table has no 'prompt'")
    return fields


def _nearest(name: str, known, prefix: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def make_sample_prompt(index: int, fields: Mapping[str, object]) -> SamplePrompt:
    """A SamplePrompt from field values (strings from a line, or numbers from a table), checked and rounded
    as sd-scripts does: sizes down to a multiple of 8 (at least 64), steps into 1..1000. ValueError if bad."""
    width = _number(fields.get("width", DEFAULT_SIZE), int, "width")
    height = _number(fields.get("height", DEFAULT_SIZE), int, "height")
    seed = fields.get("seed")
    if seed is not None:
        seed = _number(seed, int, "seed")
        if seed >= 2**63:  # torch.Generator.manual_seed would raise at the first sample, mid-run
            raise ValueError(f"seed must be below 2**63, not {seed}")
    sampler = fields.get("sampler")
    if sampler is not None:
        sampler = str(sampler).lower()
        if sampler not in SAMPLERS:
            raise ValueError(
                f"unknown sampler {sampler!r}{_nearest(sampler, SAMPLERS, '')} (samplers: {', '.join(SAMPLERS)})"
            )
    return SamplePrompt(
        index=index,
        prompt=_text(fields.get("prompt", ""), "prompt"),
        negative_prompt=_text(fields.get("negative_prompt") or "", "negative prompt"),
        width=max(MIN_SIZE, width - width % 8),
        height=max(MIN_SIZE, height - height % 8),
        seed=seed,
        steps=max(1, min(MAX_STEPS, _number(fields.get("steps", DEFAULT_STEPS), int, "steps"))),
        scale=_number(fields.get("scale", DEFAULT_SCALE), float, "scale"),
        sampler=sampler,
    )


def _number(value: object, kind: type, what: str) -> int | float:
    """A non-negative int or float from a number or its text (bools and other types refused)."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        number = kind(value)
        if kind is int and isinstance(value, float) and value != number:
            raise ValueError
    except OverflowError:  # int(inf): "1e400" in a file
        raise ValueError(f"{what} must be a finite number, not {value!r}") from None
    except ValueError:
        raise ValueError(f"{what} must be {'an integer' if kind is int else 'a number'}, not {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{what} must be a finite number, not negative, not {value!r}")
    return number


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"the {what} must be text, not {value!r}")
    return value.strip()


# --- When to sample ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingConfig:
    """What to sample and when (None in place of this object: no sampling)."""

    prompts: tuple[SamplePrompt, ...]
    sampler: str = DEFAULT_SAMPLER
    """The default sampler (`--sample_sampler`); a prompt's own `sampler` wins."""
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_first: bool = False

    def due(self, step: int, epoch: int | None) -> bool:
        """`should_sample` with these settings."""
        return should_sample(
            step, epoch, every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs, at_first=self.at_first
        )


def make_sampling_config(
    prompts_file: str | Path | None,
    *,
    sampler: str = DEFAULT_SAMPLER,
    every_n_steps: int | None = None,
    every_n_epochs: int | None = None,
    at_first: bool = False,
) -> SamplingConfig | None:
    """The sampling flags -> a SamplingConfig with the prompts read and checked (call it before models load),
    or None when nothing would ever be sampled. A trigger without a prompt file is an error (sd-scripts crashes
    on it at the first sample); a prompt file without a trigger samples nothing, as in sd-scripts."""
    if sampler not in SAMPLERS:
        raise UserInputError(f"--sample_sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    triggered = bool(every_n_steps) or bool(every_n_epochs) or at_first
    if prompts_file is None:
        if triggered:
            flag = (
                "--sample_every_n_steps"
                if every_n_steps
                else "--sample_every_n_epochs"
                if every_n_epochs
                else "--sample_at_first"
            )
            raise UserInputError(f"{flag} needs --sample_prompts (a .txt, .toml or .json file of prompts)")
        return None
    prompts = tuple(load_sample_prompts(prompts_file))
    if not triggered:
        return None
    for name in {sampler, *(p.sampler for p in prompts if p.sampler)}:
        check_sampler_usable(name)
    return SamplingConfig(prompts, sampler, every_n_steps or None, every_n_epochs or None, at_first)


def check_sampler_usable(sampler: str) -> None:
    """UserInputError if `sampler` needs a package that is not installed (lms and k_lms need scipy)."""
    if sampler in NEEDS_SCIPY and importlib.util.find_spec("scipy") is None:
        raise UserInputError(
            f"sampler {sampler} needs scipy, which is not installed: pip install scipy, "
            "or choose another sampler (e.g. euler)"
        )


def should_sample(
    step: int, epoch: int | None, *, every_n_steps: int | None, every_n_epochs: int | None, at_first: bool
) -> bool:
    """sd-scripts' rule. Called with `epoch` None after each optimizer step (`step` = steps done), with the
    1-based `epoch` at each epoch's end, and with step 0, epoch 0 before training.

    Step 0: only `at_first`. Otherwise, with `every_n_epochs`: at the end of every N-th epoch only (the step
    count is ignored); else with `every_n_steps`: after every N-th step, never at an epoch's end. 0 or None = off.
    """
    if step == 0:
        return at_first
    if every_n_epochs:
        return epoch is not None and epoch % every_n_epochs == 0
    if every_n_steps:
        return epoch is None and step % every_n_steps == 0
    return False


def sample_file_name(
    output_name: str | None, *, step: int, epoch: int | None, index: int, seed: int, timestamp: str | None = None
) -> str:
    """sd-scripts' name: ``{output_name}_{e<epoch:06d> or <step:06d>}_{index:02d}_{YYYYmmddHHMMSS}_{seed}.png``
    (no ``output_name_`` when it is None or empty)."""
    timestamp = timestamp or time.strftime("%Y%m%d%H%M%S", time.localtime())
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    prefix = f"{output_name}_" if output_name else ""
    return f"{prefix}{number}_{index:02d}_{timestamp}_{seed}.png"


# --- Making the images ---------------------------------------------------------------------------------------------
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {"lower_order_final": True}),  # diffusers forces it anyway
}
"""Sampler name -> diffusers scheduler class (by name) and options, as sd-scripts' `get_my_scheduler` maps them; a
``k_`` name (k-diffusion's name for the same sampler) is the plain one, as there: no Karras sigmas."""
SCHEDULERS.update({name: SCHEDULERS[name.removeprefix("k_")] for name in SAMPLERS if name.startswith("k_")})
assert set(SCHEDULERS) == set(SAMPLERS)


def make_scheduler(sampler: str, base_config):
    """The scheduler for `sampler`, made from the model's scheduler config (`SDXLModels.scheduler.config`)."""
    import diffusers

    check_sampler_usable(sampler)
    class_name, options = SCHEDULERS[sampler]
    with warnings.catch_warnings():  # diffusers deprecates algorithm_type "dpmsolver" (sd-scripts' "dpmsolver")
        warnings.simplefilter("ignore", FutureWarning)
        return getattr(diffusers, class_name).from_config(base_config, **options)


def sample_images(
    models: SDXLModels,
    prompts: Sequence[SamplePrompt],
    *,
    sampler_name: str,
    device: torch.device | str,
    compute_dtype: torch.dtype,
    output_dir: str | Path,
    output_name: str | None,
    step: int,
    epoch: int | None = None,
    max_token_length: int = 75,
    seed_base: int = 0,
    network: nn.Module | None = None,
) -> list[Path]:
    """Make one image per prompt and save it as ``<output_dir>/sample/<sd-scripts name>.png``; returns the paths.

    `epoch` given (an epoch's end, 0 before training) names the files ``e<epoch:06d>``, else ``<step:06d>``.
    A prompt without a seed uses ``seed_base + index``. `network` (the LoRA network, whose modules are not children
    of the base models) is put in eval mode too, so no LoRA dropout runs. With several processes each calls it with
    its own share of the prompts (the file names differ by prompt index, so no two write the same file).
    """
    import torch
    from diffusers import StableDiffusionXLPipeline

    device = torch.device(device)
    sample_dir = Path(output_dir) / "sample"
    bases = [models.unet, models.vae, models.text_encoder1, models.text_encoder2]
    if any(model is None for model in bases):
        raise ValueError("sampling needs the UNet, the VAE and both text encoders (keep them when outputs are cached)")
    paths = []
    with _sampling_state(bases, [network] if network is not None else [], device), torch.no_grad():
        pipe = StableDiffusionXLPipeline(
            vae=models.vae,
            text_encoder=models.text_encoder1,
            text_encoder_2=models.text_encoder2,
            tokenizer=models.tokenizer1,
            tokenizer_2=models.tokenizer2,
            unet=models.unet,
            scheduler=make_scheduler(sampler_name, models.scheduler.config),
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        for prompt in prompts:
            seed = prompt.seed_for(seed_base)
            pipe.scheduler = make_scheduler(prompt.sampler or sampler_name, models.scheduler.config)
            latents = _denoise(pipe, models, prompt, seed, device, compute_dtype, max_token_length)
            image = decode_latents(models.vae, latents)
            name = sample_file_name(output_name, step=step, epoch=epoch, index=prompt.index, seed=seed)
            paths.append(_save_png(image, sample_dir / name))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return paths


def _denoise(
    pipe: StableDiffusionXLPipeline,
    models: SDXLModels,
    prompt: SamplePrompt,
    seed: int,
    device: torch.device,
    compute_dtype: torch.dtype,
    max_token_length: int,
) -> torch.Tensor:
    """The prompt's latents (1, 4, h/8, w/8): text conditioning as in training, then the pipeline's denoising."""
    import torch

    from library.model.text_encoding import encode_captions

    half = compute_dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(device.type, dtype=compute_dtype, enabled=half):
        context, pooled = encode_captions(models, [prompt.prompt, prompt.negative_prompt], max_token_length, device)
        generator = torch.Generator(device).manual_seed(seed)
        return pipe(
            prompt_embeds=context[:1],
            pooled_prompt_embeds=pooled[:1],
            negative_prompt_embeds=context[1:],
            negative_pooled_prompt_embeds=pooled[1:],
            width=prompt.width,
            height=prompt.height,
            num_inference_steps=prompt.steps,
            guidance_scale=prompt.scale,
            generator=generator,
            output_type="latent",
            return_dict=False,
        )[0]


def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """Scaled SDXL latents (1, 4, h, w) -> one RGB image, (H, W, 3) uint8, decoded in the VAE's own dtype."""
    import torch

    device = next(vae.parameters()).device
    with torch.autocast(device.type, enabled=False):
        pixels = vae.decode((latents.float() / SDXL_VAE_SCALE).to(device, vae.dtype)).sample
    pixels = (pixels[0].float() / 2 + 0.5).clamp(0, 1)
    return (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()


def _save_png(image: np.ndarray, target: Path) -> Path:
    from PIL import Image

    with atomic_file(target, what="sample image") as handle:
        Image.fromarray(image).save(handle, format="PNG")
    return target


def images_for_tracker(paths: Sequence[str | Path]) -> list[np.ndarray]:
    """The saved samples as (H, W, 3) uint8 arrays, e.g. for TensorBoard's ``add_image(..., dataformats="HWC")``."""
    import numpy as np
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB")))
    return arrays


@contextlib.contextmanager
def _sampling_state(models: Sequence[nn.Module], others: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Models on `device` and every module in eval mode for the block; afterwards each module's train flag, each
    model's device and the RNG states are what they were."""
    from library.train.train_state import RngSnapshot

    rng = RngSnapshot.take()
    modules = [module for model in (*models, *others) for module in model.modules()]
    flags = [module.training for module in modules]
    devices = [next(model.parameters()).device for model in models]
    try:
        for model, was_on in zip(models, devices):
            if was_on != device:
                model.to(device)
        for module in modules:
            module.training = False
        yield
    finally:
        for model, was_on in zip(models, devices):
            if next(model.parameters()).device != was_on:
                model.to(was_on)
        for module, flag in zip(modules, flags):
            module.training = flag
        rng.restore()
