"""`--torch_compile` / `--dynamo_backend`: the models a training step calls, through `torch.compile`, and eager
wherever compiling is not possible, with one warning line that says why.

sd-scripts hands the backend to accelerate, which compiles the models it prepares. Here the LoRA hooks and the
fp8 up-cast are installed first, then the UNet (and the text encoders, when they train) are compiled for the
loss only: `CompiledModel` wraps a model without replacing it, so the modules, their names and state dicts (the
LoRA's keys, the saved files) stay those of the eager model, and sampling runs eager as it always did.

What cannot compile falls back, in three places:
- before training (`compile_problem`): dynamo unsupported on this Python/OS, a backend this torch does not have
  (sd-scripts' list names several that need other packages, and one misspelt), inductor on a CPU without a C++
  compiler, cudagraphs without a GPU;
- at a compiled call that fails (compiling happens at the first call of each new input shape): the call runs again
  eager, from the same RNG state (`CompiledModel`);
- in backward, which inductor compiles at its first use: the training step starts again eager
  (`library.train.step`), from the same RNG state and no gradients.
After a fallback nothing is compiled for the rest of the run; the run report says what ran (`CompileState.summary`).
torch is imported where it is used: the command line reads the backend names from here without loading it.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DYNAMO_BACKENDS = (
    "eager",
    "aot_eager",
    "inductor",
    "aot_ts_nvfuser",
    "nvprims_nvfuser",
    "cudagraphs",
    "ofi",
    "fx2trt",
    "onnxrt",
    "tensort",
    "ipex",
    "tvm",
)
"""sd-scripts' `--dynamo_backend` choices, its spelling kept ("tensort"). Which of them can run depends on the torch
build and on other packages (`compile_problem` says)."""

NO_BACKEND = "no"
"""What GUI-written configs store when compiling is off (accelerate's "no"): accepted, compiles nothing."""

DEFAULT_BACKEND = "inductor"

_DIFFUSERS_LRU_CACHE_WARNING = "Dynamo detected a call to a `functools.lru_cache`-wrapped function"
"""Dynamo's note on diffusers' cached torch-version check under gradient checkpointing: harmless, nothing to act on."""

_CXX_CANDIDATES = ("g++", "clang++", "c++")
"""Compilers inductor's CPU code generation can use (besides $CXX); on Windows it needs MSVC's cl.exe."""


@dataclass(frozen=True)
class CompileConfig:
    """`--torch_compile` is on (the config holds None when it is off)."""

    backend: str = DEFAULT_BACKEND
    """`--dynamo_backend`."""


def first_line(error: BaseException) -> str:
    """An error as one short line: its type and the first line of its message (for dynamo's wrapper around a
    backend's error, the backend's error)."""
    error = getattr(error, "inner_exception", None) or error
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def _cxx_compiler() -> str | None:
    """A C++ compiler inductor's CPU code generation could run, or None."""
    names = ("cl",) if sys.platform == "win32" else _CXX_CANDIDATES
    for name in (os.environ.get("CXX"), *names):
        if name and shutil.which(name):
            return name
    return None


def compile_problem(backend: str, device_type: str) -> str | None:
    """Why `backend` cannot compile for `device_type` here (None: nothing known against it; a failure can still
    show when compiling, which falls back then)."""
    if backend == NO_BACKEND:
        return "--dynamo_backend no compiles nothing"
    import torch
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return (
            f"torch.compile is not supported with torch {torch.__version__} on Python "
            f"{platform.python_version()} ({sys.platform})"
        )
    available = torch._dynamo.list_backends(exclude_tags=())
    if backend not in available:
        usable = ", ".join(name for name in DYNAMO_BACKENDS if name in available)
        return f"dynamo backend {backend!r} is not available in torch {torch.__version__} (available here: {usable})"
    if backend == "inductor" and device_type == "cpu" and _cxx_compiler() is None:
        wanted = "MSVC's cl.exe" if sys.platform == "win32" else "g++ or clang++ on PATH, or $CXX"
        return f"inductor on a CPU compiles C++ and no compiler was found ({wanted})"
    if backend == "cudagraphs" and device_type != "cuda":
        return "the cudagraphs backend needs a CUDA GPU"
    return None


def rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The torch RNG states a model call draws from (CPU, and every CUDA device once CUDA is in use)."""
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    import torch

    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class CompileState:
    """What the run's compiled models do: compiled with `requested`, or eager since a fallback (one warning line
    through `warn`, the first time only)."""

    def __init__(self, requested: str, warn: Callable[[str], None]) -> None:
        self.requested = requested
        self.reason: str | None = None
        self._warn = warn

    @property
    def active(self) -> bool:
        return self.reason is None

    def fall_back(self, reason: str) -> None:
        """Run eager from now on, saying why once."""
        if self.reason is None:
            self.reason = reason
            self._warn(f"--torch_compile: {reason}; training uncompiled (eager)")

    def summary(self) -> dict[str, Any]:
        """The run report's `compile` section."""
        return {"requested": self.requested, "ran": self.requested if self.active else "eager", "reason": self.reason}


class CompiledModel:
    """A model called through `torch.compile(model, backend=...)` while `state` is active, else the model itself;
    a compiled call that raises runs again eager from the RNG state it started with, and switches `state` off.
    Attributes are the model's own (`config`, submodules): nothing is renamed."""

    def __init__(self, model: torch.nn.Module, backend: str, state: CompileState) -> None:
        import torch

        self.model = model
        self.compiled = torch.compile(model, backend=backend)
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.state.active:
            return self.model(*args, **kwargs)
        rng = rng_state()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_DIFFUSERS_LRU_CACHE_WARNING)
                return self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any failure of compiled code: eager still works (or raises)
            self.state.fall_back(f"compiling failed ({first_line(error)})")
            set_rng_state(rng)
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def compile_models(
    models: Any,
    cfg: CompileConfig,
    device_type: str,
    *,
    train_text_encoder: bool,
    warn: Callable[[str], None],
) -> tuple[Any, CompileState]:
    """A copy of `models` (an `SDXLModels`) whose UNet, and text encoders when they train, are `CompiledModel`s
    (the originals are unchanged), and the state they share. When compiling is not possible here the copy is
    `models` itself and the state says why (the warning is given)."""
    state = CompileState(cfg.backend, warn)
    problem = compile_problem(cfg.backend, device_type)
    if problem is not None:
        state.fall_back(problem)
        return models, state
    swapped = {"unet": CompiledModel(models.unet, cfg.backend, state)}
    if train_text_encoder:
        for name in ("text_encoder1", "text_encoder2"):
            if getattr(models, name) is not None:
                swapped[name] = CompiledModel(getattr(models, name), cfg.backend, state)
    return replace(models, **swapped), state
