#!/usr/bin/env python
"""Does LoRA+ converge faster? A task with a known answer, at SDXL's real widths, measured two ways.

    python bench/loraplus_convergence.py [--quick] [--out DIR] [--seeds 0,1,2] [--widths tiny,640,1280]
                                         [--optimizers AdamW,Lion] [--steps N] [--ratios 1,2,4,8,16,32]

The task. A frozen random base model; a teacher = the same base plus a hidden rank-4 change on every layer the
LoRA targets (each weight W gets W + U V^T, U and V drawn from a seeded generator and scaled so that
||U V^T|| = TEACHER_REL_NORM x ||W||). The student is the same frozen base with this project's LoRA
(`networks.lora.create_network`, dim 4, alpha 1 as in the seed command), its optimizer groups built by the
network's `prepare_optimizer_params` (the LoRA+ rule of `networks/loraplus.py`: B = `lora_up` learns at lr x
ratio, A = `lora_down` at lr), its optimizer by the trainer's `library.train.optim.build_optimizer`, gradients
clipped to norm 1 (the trainer's default). It learns by MSE to the teacher's outputs on fresh random inputs
(batch 1, identical for every run of a seed); the rank-4 student can represent the change exactly, so the
validation loss (MSE to the teacher on fixed held-out inputs) can go to 0. Losses are reported relative to the
untrained student's (1 = nothing learned; the untrained student is the base, since B starts at zero).

The widths (`--widths`):
- `tiny`: the tiny SDXL UNet of `tools/make_tiny_sdxl.py` end to end (channels 32/64/128, random weights):
  random 16x16 latents, timesteps, a 77-token text context (width 96) and pooled embedding + size ids;
- `640`, `1280`: one real-size SDXL transformer (diffusers' `Transformer2DModel` as SDXL's UNet builds it, from
  `configs/sdxl/unet/config.json`: head dim 64, cross-attention dim 2048, linear projections, GroupNorm 32;
  one BasicTransformerBlock instead of the 2 / 10 the UNet stacks there, for time), random weights, placed at
  the UNet path where SDXL has it so the LoRA names are the real ones; inputs: an 8x8 token grid and a
  77-token context of width 2048.

The protocols:
- (a) same base lr: every ratio at the lr a user would already use (USER_LR, the middle of the grid);
  plain LoRA = ratio 1 (no LoRA+ group at all);
- (b) best vs best: every ratio at its own best lr from LR_GRIDS (lowest mean final validation loss).

Metrics per (width, optimizer, protocol, ratio), mean / std / min / max over seeds: the final validation loss at
equal steps, and the steps needed to reach plain LoRA's final validation loss (per seed; linear interpolation
between evaluations; protocol (b) uses the best plain-LoRA run's). A run whose loss blows up (non-finite or
DIVERGED x its start) stops and counts as diverged (final loss infinite, target never reached).

Output under --out: `loraplus_convergence.json` (settings, every run's curve, the summary),
`loraplus_convergence.png` (protocol (a) curves per width and optimizer, protocol (b) bars), and a markdown
table printed for the README. Learning rates are large for a LoRA because the step budget is short (hundreds
of steps where real runs take thousands): what carries over is the comparison at equal lr and at best lr.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from concurrent.futures import Executor, ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from library.files.atomic import write_bytes_atomic, write_text_atomic  # noqa: E402
from library.train.optim import build_optimizer  # noqa: E402
from networks.lora import LoRANetwork, create_network  # noqa: E402
from networks.lora_targets import unet_targets  # noqa: E402

SDXL_UNET_CONFIG = REPO / "configs" / "sdxl" / "unet" / "config.json"
WIDTHS = ("tiny", "640", "1280")
OPTIMIZERS = ("AdamW", "Lion")
RATIOS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "AdamW": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "Lion": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
}
USER_LR = {"AdamW": 3e-3, "Lion": 1e-3}
"""Protocol (a)'s lr: the middle of each grid (Lion's a third of AdamW's, as usual)."""
LORA_DIM, LORA_ALPHA = 4, 1.0
TEACHER_RANK = 4
TEACHER_REL_NORM = 0.1
MAX_GRAD_NORM = 1.0
DIVERGED = 10.0
MODEL_SEED = 0
VAL_SEED = 10_000
TOKEN_GRID = 8
TINY_LATENT_SIDE = 8
TRAIN_BATCH = {"tiny": 4, "640": 1, "1280": 1}
CONTEXT_TOKENS = 77

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers (stored in the JSON)."""

    widths: tuple[str, ...] = WIDTHS
    optimizers: tuple[str, ...] = OPTIMIZERS
    ratios: tuple[float, ...] = RATIOS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 80
    eval_every: int = 10
    val_batch: int = 4
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(LR_GRIDS))
    user_lr: dict[str, float] = field(default_factory=lambda: dict(USER_LR))
    lora_dim: int = LORA_DIM
    lora_alpha: float = LORA_ALPHA
    teacher_rank: int = TEACHER_RANK
    teacher_rel_norm: float = TEACHER_REL_NORM


QUICK = Settings(
    seeds=(0, 1), steps=16, eval_every=4, val_batch=2, lr_grids={"AdamW": (1e-3, 3e-3), "Lion": (3e-4, 1e-3)}
)
"""The harness check: two seeds, two lrs, a few steps."""


# ---- the widths ---------------------------------------------------------------------------------------------------


@dataclass
class Task:
    """One width: a frozen base model whose Transformer2DModel layers the LoRA targets, and its inputs."""

    name: str
    description: str
    model: nn.Module
    make_batch: Callable[[torch.Generator, int], Batch]
    forward: Callable[[nn.Module, Batch], torch.Tensor]


def _frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def tiny_unet_task() -> Task:
    """The tiny SDXL UNet end to end (random weights, seed MODEL_SEED)."""
    from diffusers import UNet2DConditionModel

    from tools.make_tiny_sdxl import ADDITION_TIME_EMBED_DIM, TE2_PROJECTION, tiny_unet_config

    config = tiny_unet_config()
    with torch.random.fork_rng():
        torch.manual_seed(MODEL_SEED)
        unet = _frozen(UNet2DConditionModel(**config))
    side, context_dim = TINY_LATENT_SIDE, config["cross_attention_dim"]
    assert config["projection_class_embeddings_input_dim"] == TE2_PROJECTION + 6 * ADDITION_TIME_EMBED_DIM

    def make_batch(generator: torch.Generator, n: int) -> Batch:
        pixels = float(side * 8)
        return {
            "sample": torch.randn(n, 4, side, side, generator=generator),
            "timestep": torch.randint(0, 1000, (n,), generator=generator),
            "context": torch.randn(n, CONTEXT_TOKENS, context_dim, generator=generator),
            "text_embeds": torch.randn(n, TE2_PROJECTION, generator=generator),
            "time_ids": torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]]).repeat(n, 1),
        }

    def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
        added = {"text_embeds": batch["text_embeds"], "time_ids": batch["time_ids"]}
        return model(batch["sample"], batch["timestep"], batch["context"], added_cond_kwargs=added).sample

    return Task("tiny", describe("tiny"), unet, make_batch, forward)


class _Level(nn.Module):
    def __init__(self, attentions: nn.ModuleList | None = None) -> None:
        super().__init__()
        if attentions is not None:
            self.attentions = attentions


class SDXLTransformerSlot(nn.Module):
    """One Transformer2DModel at `down_blocks.<level>.attentions.0`, where SDXL's UNet has its first one of that
    level, so the LoRA targets and names are the UNet's (`lora_unet_input_blocks_4_1_...` at 640)."""

    def __init__(self, level: int, transformer: nn.Module) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([_Level() for _ in range(level)] + [_Level(nn.ModuleList([transformer]))])
        self.level = level

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.down_blocks[self.level].attentions[0](hidden, encoder_hidden_states=context).sample


def sdxl_transformer_task(width: int) -> Task:
    """SDXL's transformer at `width` (640 or 1280), built from the shipped UNet config, one block deep."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    config = json.loads(SDXL_UNET_CONFIG.read_text())
    level = config["block_out_channels"].index(width)
    heads = config["attention_head_dim"][level]  # diffusers' name for SDXL's head count
    context_dim = config["cross_attention_dim"]
    with torch.random.fork_rng():
        torch.manual_seed(MODEL_SEED)
        transformer = Transformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=width // heads,
            in_channels=width,
            num_layers=1,
            cross_attention_dim=context_dim,
            norm_num_groups=config["norm_num_groups"],
            use_linear_projection=config["use_linear_projection"],
            upcast_attention=bool(config["upcast_attention"]),
        )
        model = _frozen(SDXLTransformerSlot(level, transformer))

    def make_batch(generator: torch.Generator, n: int) -> Batch:
        return {
            "hidden": torch.randn(n, width, TOKEN_GRID, TOKEN_GRID, generator=generator),
            "context": torch.randn(n, CONTEXT_TOKENS, context_dim, generator=generator),
        }

    def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["hidden"], batch["context"])

    return Task(str(width), describe(str(width)), model, make_batch, forward)


def describe(name: str) -> str:
    """One line on what a width is (for the JSON)."""
    if name == "tiny":
        from tools.make_tiny_sdxl import tiny_unet_config

        channels = "/".join(str(c) for c in tiny_unet_config()["block_out_channels"])
        return (
            f"tiny SDXL UNet end to end (channels {channels}), {TINY_LATENT_SIDE}x{TINY_LATENT_SIDE} latents, "
            f"batch {TRAIN_BATCH[name]}"
        )
    config = json.loads(SDXL_UNET_CONFIG.read_text())
    heads = config["attention_head_dim"][config["block_out_channels"].index(int(name))]
    return (
        f"SDXL Transformer2DModel, width {name} ({heads} heads x {int(name) // heads}), 1 block, "
        f"{TOKEN_GRID}x{TOKEN_GRID} tokens, context {CONTEXT_TOKENS}x{config['cross_attention_dim']}, batch "
        f"{TRAIN_BATCH[name]}"
    )


def build_task(name: str) -> Task:
    if name == "tiny":
        return tiny_unet_task()
    return sdxl_transformer_task(int(name))


# ---- the teacher and the data -------------------------------------------------------------------------------------


def _generator(seed: int, stream: int) -> torch.Generator:
    """Independent seeded streams: 0 the teacher's change, 1 the training inputs (same seed -> same stream)."""
    return torch.Generator().manual_seed(seed * 1_000 + stream)


def teacher_of(base: nn.Module, seed: int, rank: int, rel_norm: float) -> nn.Module:
    """The base plus a hidden rank-`rank` change on every LoRA target layer, ||change|| = rel_norm x ||W||."""
    teacher = copy.deepcopy(base)
    generator = _generator(seed, 0)
    with torch.no_grad():
        for target in unet_targets(teacher, include_conv=False):
            weight = target.module.weight.view(target.module.weight.shape[0], -1)
            u = torch.randn(weight.shape[0], rank, generator=generator)
            v = torch.randn(rank, weight.shape[1], generator=generator)
            change = u @ v
            weight.add_(change * (rel_norm * weight.norm() / change.norm()))
    return teacher


@dataclass
class SeedData:
    """What every run of one seed shares: its training batches, the teacher's outputs, the untrained loss."""

    train: list[Batch]
    train_targets: list[torch.Tensor]
    val_targets: torch.Tensor
    base_val_loss: float


@torch.no_grad()
def seed_data(task: Task, val_batch: Batch, seed: int, steps: int, settings: Settings) -> SeedData:
    teacher = teacher_of(task.model, seed, settings.teacher_rank, settings.teacher_rel_norm)
    generator = _generator(seed, 1)
    train = [task.make_batch(generator, TRAIN_BATCH[task.name]) for _ in range(steps)]
    train_targets = [task.forward(teacher, batch) for batch in train]
    val_targets = task.forward(teacher, val_batch)
    base_val_loss = float(nn.functional.mse_loss(task.forward(task.model, val_batch), val_targets))
    return SeedData(train, train_targets, val_targets, base_val_loss)


# ---- one run ------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run: its curve (validation loss relative to the untrained student) and how it ended."""

    width: str
    optimizer: str
    lr: float
    ratio: float
    seed: int
    steps: list[int]
    val_loss: list[float]
    base_val_loss: float
    group_lrs: dict[str, float]
    diverged: bool
    wall_s: float

    @property
    def final(self) -> float:
        """Relative validation loss after the last step (infinite if the run diverged)."""
        return math.inf if self.diverged else self.val_loss[-1]


def student_network(model: nn.Module, seed: int, ratio: float, settings: Settings) -> LoRANetwork:
    """Our LoRA on the base (A drawn from `seed`, so every ratio and lr of a seed starts identical); ratio 1 is
    plain LoRA (no LoRA+ group)."""
    loraplus = {} if ratio == 1 else {"loraplus_lr_ratio": str(ratio)}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = create_network(1.0, settings.lora_dim, settings.lora_alpha, None, [], model, **loraplus)
    network.apply_to([], model, apply_text_encoder=False, apply_unet=True)
    network.prepare_grad_etc([], model)
    network.on_epoch_start([], model)
    return network


def optimizer_for(network: LoRANetwork, optimizer: str, lr: float) -> tuple[torch.optim.Optimizer, dict[str, float]]:
    """The trainer's optimizer over the network's LoRA+ groups (unet_lr = learning_rate = lr); returns it and the
    lr of each group by description ("unet", "unet plus")."""
    groups, descriptions = network.prepare_optimizer_params(None, lr, lr)
    return build_optimizer(optimizer, groups, lr, None), {d: g["lr"] for d, g in zip(descriptions, groups)}


@torch.no_grad()
def val_loss(task: Task, val_batch: Batch, data: SeedData) -> float:
    return float(nn.functional.mse_loss(task.forward(task.model, val_batch), data.val_targets)) / data.base_val_loss


def train_run(
    task: Task, val_batch: Batch, data: SeedData, optimizer: str, lr: float, ratio: float, seed: int, settings: Settings
) -> Run:
    """Train one student for `settings.steps` steps, evaluating every `eval_every` steps (and at 0)."""
    start = time.perf_counter()
    network = student_network(task.model, seed, ratio, settings)
    try:
        opt, group_lrs = optimizer_for(network, optimizer, lr)
        params = network.get_trainable_params()
        steps, losses, diverged = [0], [val_loss(task, val_batch, data)], False
        for step in range(1, settings.steps + 1):
            pred = task.forward(task.model, data.train[step - 1])
            nn.functional.mse_loss(pred, data.train_targets[step - 1]).backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % settings.eval_every == 0 or step == settings.steps:
                steps.append(step)
                losses.append(val_loss(task, val_batch, data))
                if not math.isfinite(losses[-1]) or losses[-1] > DIVERGED * losses[0]:
                    diverged = True
                    break
    finally:
        network.remove_from_model()
    wall = time.perf_counter() - start
    return Run(task.name, optimizer, lr, ratio, seed, steps, losses, data.base_val_loss, group_lrs, diverged, wall)


# ---- metrics ------------------------------------------------------------------------------------------------------


def steps_to_reach(steps: Sequence[int], losses: Sequence[float], target: float) -> float | None:
    """The first step at which the curve reaches `target`, linearly interpolated between evaluations; None if never."""
    for i, (step, loss) in enumerate(zip(steps, losses)):
        if loss <= target:
            if i == 0:
                return float(step)
            previous_step, previous = steps[i - 1], losses[i - 1]
            return previous_step + (step - previous_step) * (previous - target) / (previous - loss)
    return None


def stats(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, std (population, over seeds), min, max and count of the finite values; n_total counts all."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    out: dict[str, float | int] = {"n": len(finite), "n_total": len(values)}
    if finite:
        out |= {
            "mean": statistics.fmean(finite),
            "std": statistics.pstdev(finite),
            "min": min(finite),
            "max": max(finite),
        }
    return out


def _runs_at(runs: Sequence[Run], optimizer: str, ratio: float, lr: float) -> dict[int, Run]:
    return {r.seed: r for r in runs if r.optimizer == optimizer and r.ratio == ratio and r.lr == lr}


def best_lr(runs: Sequence[Run], optimizer: str, ratio: float, grid: Sequence[float]) -> float:
    """The grid lr with the lowest mean final loss over the given runs' seeds (a diverged seed makes the mean
    infinite; ties go to the lower lr)."""

    def mean_final(lr: float) -> float:
        finals = [r.final for r in _runs_at(runs, optimizer, ratio, lr).values()]
        return statistics.fmean(finals) if finals else math.inf

    return min(sorted(grid), key=mean_final)


def entry(ratio_runs: dict[int, Run], plain_runs: dict[int, Run], lr: float) -> dict[str, Any]:
    """One table cell: final loss and steps to reach the same seed's plain-LoRA final loss."""
    seeds = sorted(ratio_runs)
    finals = [ratio_runs[s].final for s in seeds]
    reach = [
        steps_to_reach(ratio_runs[s].steps, ratio_runs[s].val_loss, plain_runs[s].final) if s in plain_runs else None
        for s in seeds
    ]
    return {
        "lr": lr,
        "seeds": seeds,
        "final_val_loss": stats(finals),
        "steps_to_plain_final": stats(reach),
        "per_seed_final": [_finite(v) for v in finals],
        "per_seed_steps_to_plain_final": [_finite(v) for v in reach],
        "diverged_seeds": [s for s in seeds if ratio_runs[s].diverged],
    }


def summarize(runs: Sequence[Run], settings: Settings) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """summary[width][optimizer][protocol][ratio]: protocol "a" at the user lr; protocol "b" at each ratio's best
    lr of the grid, picked on the first seed (the one that ran the whole grid), against the best plain LoRA."""
    summary: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for width in sorted({r.width for r in runs}, key=_width_order):
        width_runs = [r for r in runs if r.width == width]
        selection = [r for r in width_runs if r.seed == settings.seeds[0]]
        for optimizer in sorted({r.optimizer for r in width_runs}, key=OPTIMIZERS.index):
            grid, user = settings.lr_grids[optimizer], settings.user_lr[optimizer]
            best = {ratio: best_lr(selection, optimizer, ratio, grid) for ratio in settings.ratios}
            plain_user = _runs_at(width_runs, optimizer, 1.0, user)
            plain_best = _runs_at(width_runs, optimizer, 1.0, best[1.0])
            summary.setdefault(width, {})[optimizer] = {
                "a": {
                    _ratio_key(ratio): entry(_runs_at(width_runs, optimizer, ratio, user), plain_user, user)
                    for ratio in settings.ratios
                },
                "b": {
                    _ratio_key(ratio): entry(
                        _runs_at(width_runs, optimizer, ratio, best[ratio]), plain_best, best[ratio]
                    )
                    for ratio in settings.ratios
                },
            }
    return summary


def _ratio_key(ratio: float) -> str:
    return f"{ratio:g}"


def _width_order(width: str) -> int:
    return WIDTHS.index(width) if width in WIDTHS else len(WIDTHS)


# ---- the benchmark ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Runs of one (width, seed), done in one process that builds the width and the seed's data once."""

    width: str
    seed: int
    runs: tuple[tuple[str, float, float], ...]
    """(optimizer, lr, ratio) of each run."""


def fixed_val_batch(task: Task, settings: Settings) -> Batch:
    """The held-out inputs of a width: the same for every seed, optimizer, lr and ratio."""
    return task.make_batch(torch.Generator().manual_seed(VAL_SEED), settings.val_batch)


def run_job(job: Job, settings: Settings) -> list[Run]:
    task = build_task(job.width)
    val_batch = fixed_val_batch(task, settings)
    data = seed_data(task, val_batch, job.seed, settings.steps, settings)
    runs = []
    for optimizer, lr, ratio in job.runs:
        run = train_run(task, val_batch, data, optimizer, lr, ratio, job.seed, settings)
        print(
            f"  {job.width} seed {job.seed} {optimizer} lr {lr:g} ratio {ratio:g}: final {run.final:.4g}"
            f"{' (diverged)' if run.diverged else ''} [{run.wall_s:.1f} s]",
            flush=True,
        )
        runs.append(run)
    return runs


def _one_thread() -> None:
    torch.set_num_threads(1)


def run_jobs(jobs: Sequence[Job], settings: Settings, pool: Executor | None) -> list[Run]:
    """The jobs' runs in job order, in `pool`'s processes (one thread each) or here."""
    if pool is None:
        return [run for job in jobs for run in run_job(job, settings)]
    futures = [pool.submit(run_job, job, settings) for job in jobs]
    return [run for future in futures for run in future.result()]


def grid_jobs(width: str, seed: int, settings: Settings) -> list[Job]:
    """Phase 1: every (lr of the grid, ratio) on the selection seed, one job per optimizer."""
    return [
        Job(width, seed, tuple((opt, lr, ratio) for lr in _lrs(settings, opt) for ratio in settings.ratios))
        for opt in settings.optimizers
    ]


def confirm_jobs(width: str, grid_runs: Sequence[Run], settings: Settings) -> list[Job]:
    """Phase 2: the other seeds at the user lr (protocol a) and at each ratio's best lr (protocol b)."""
    jobs = []
    for seed in settings.seeds[1:]:
        for opt in settings.optimizers:
            runs = {(opt, settings.user_lr[opt], ratio) for ratio in settings.ratios}
            runs |= {(opt, best_lr(grid_runs, opt, ratio, settings.lr_grids[opt]), ratio) for ratio in settings.ratios}
            jobs.append(Job(width, seed, tuple(sorted(runs))))
    return jobs


def _lrs(settings: Settings, optimizer: str) -> list[float]:
    return sorted({*settings.lr_grids[optimizer], settings.user_lr[optimizer]})


def run_width(name: str, settings: Settings, pool: Executor | None) -> tuple[list[Run], float]:
    """Both phases of one width; returns its runs and wall seconds."""
    start = time.perf_counter()
    grid_runs = run_jobs(grid_jobs(name, settings.seeds[0], settings), settings, pool)
    runs = grid_runs + run_jobs(confirm_jobs(name, grid_runs, settings), settings, pool)
    return runs, time.perf_counter() - start


def run_benchmark(
    settings: Settings,
    jobs: int = 1,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """All widths, `jobs` processes at a time; the result as stored in the JSON. `checkpoint` gets the result so
    far after each width (a long run interrupted later keeps the widths it finished)."""
    start = time.perf_counter()
    runs: list[Run] = []
    widths: dict[str, dict[str, Any]] = {}
    pool = ProcessPoolExecutor(jobs, get_context("spawn"), initializer=_one_thread) if jobs > 1 else None
    try:
        for name in settings.widths:
            width_runs, wall = run_width(name, settings, pool)
            runs += width_runs
            widths[name] = {"description": describe(name), "wall_s": round(wall, 1), "runs": len(width_runs)}
            log(f"width {name}: {len(width_runs)} runs in {wall:.0f} s wall")
            if checkpoint is not None and name != settings.widths[-1]:
                checkpoint(result_of(settings, jobs, widths, runs, time.perf_counter() - start))
    finally:
        if pool is not None:
            pool.shutdown()
    total = time.perf_counter() - start
    log(f"total wall time {total:.0f} s ({jobs} process{'es' if jobs > 1 else ''})")
    return result_of(settings, jobs, widths, runs, total)


def result_of(
    settings: Settings, jobs: int, widths: dict[str, dict[str, Any]], runs: Sequence[Run], wall_s: float
) -> dict[str, Any]:
    """The JSON: the task, settings, each width's description and wall time, every run's curve, the summary."""
    return {
        "task": __doc__.split("\n\n")[2],
        "settings": asdict(settings),
        "constants": {
            "max_grad_norm": MAX_GRAD_NORM,
            "diverged_factor": DIVERGED,
            "token_grid": TOKEN_GRID,
            "tiny_latent_side": TINY_LATENT_SIDE,
            "context_tokens": CONTEXT_TOKENS,
            "train_batch": dict(TRAIN_BATCH),
            "torch": torch.__version__,
            "jobs": jobs,
            "threads_per_job": 1 if jobs > 1 else torch.get_num_threads(),
        },
        "widths": widths,
        "wall_s": round(wall_s, 1),
        "runs": [_run_json(r) for r in runs],
        "summary": summarize(runs, settings),
    }


def _run_json(run: Run) -> dict[str, Any]:
    out = asdict(run)
    out["val_loss"] = [_finite(v) for v in run.val_loss]
    out["wall_s"] = round(run.wall_s, 2)
    return out


def _finite(value: float | None) -> float | None:
    """JSON has no infinity: a diverged or missing value is null; others keep 6 significant digits."""
    return float(f"{value:.6g}") if value is not None and math.isfinite(value) else None


# ---- reporting ----------------------------------------------------------------------------------------------------


def _cell(stat: dict[str, float | int], digits: str) -> str:
    """ "mean ± std", "(k/n)" when only k of n seeds have a value, "never" when none has."""
    if not stat["n"]:
        return "never" if stat["n_total"] else "-"
    text = f"{stat['mean']:{digits}} ± {stat['std']:{digits}}"
    return text if stat["n"] == stat["n_total"] else f"{text} ({stat['n']}/{stat['n_total']})"


def markdown_tables(result: dict[str, Any]) -> str:
    """The two protocols as README tables: per (width, optimizer) the final loss and the steps to plain's final
    (protocol (b) also the lr each ratio got; * = at the grid's edge)."""
    settings = result["settings"]
    ratios = [_ratio_key(r) for r in settings["ratios"]]
    header = _row(["width", "optimizer", ""] + [f"ratio {r}" for r in ratios]) + _row(["---"] * (3 + len(ratios)))
    titles = {"a": "(a) same base lr", "b": "(b) each ratio at its own best lr (picked on the first seed)"}
    parts = []
    for protocol, title in titles.items():
        lines = [
            f"**{title}**: final validation loss after {settings['steps']} steps (relative to the untrained LoRA; "
            "0 = the hidden change learned) and steps to reach plain LoRA's final loss; mean ± std over "
            f"{len(settings['seeds'])} seeds; (k/n) = reached in k of n seeds\n\n",
            header,
        ]
        for width, per_optimizer in result["summary"].items():
            for optimizer, protocols in per_optimizer.items():
                lines += _table_rows(width, optimizer, protocol, protocols[protocol], ratios, settings)
        parts.append("".join(lines))
    return "\n".join(parts)


def _table_rows(
    width: str, optimizer: str, protocol: str, cells: dict[str, Any], ratios: Sequence[str], settings: dict[str, Any]
) -> list[str]:
    rows = []
    if protocol == "a":
        final_label = f"final loss, lr {settings['user_lr'][optimizer]:g}"
    else:
        grid = settings["lr_grids"][optimizer]
        rows.append(_row([width, optimizer, "best lr"] + [_lr_text(cells[r]["lr"], grid) for r in ratios]))
        final_label = "final loss"
    rows.append(_row([width, optimizer, final_label] + [_cell(cells[r]["final_val_loss"], ".3f") for r in ratios]))
    steps = [_cell(cells[r]["steps_to_plain_final"], ".0f") for r in ratios]
    rows.append(_row([width, optimizer, "steps to plain's final"] + steps))
    return rows


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |\n"


def _lr_text(lr: float, grid: Sequence[float]) -> str:
    return f"{lr:g}*" if lr in (min(grid), max(grid)) else f"{lr:g}"


def figure_png(result: dict[str, Any]) -> bytes:
    """Protocol (a): mean relative validation loss vs step per ratio (one panel per width and optimizer);
    protocol (b): best final loss per ratio (one panel per width, bars per optimizer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, summary = result["settings"], result["summary"]
    widths = list(summary)
    optimizers = list(next(iter(summary.values())))
    ratios = settings["ratios"]
    colors = plt.get_cmap("viridis")([i / max(1, len(ratios) - 1) for i in range(len(ratios))])
    fig, axes = plt.subplots(
        len(optimizers) + 1, len(widths), figsize=(4.2 * len(widths), 3.0 * (len(optimizers) + 1)), squeeze=False
    )
    for col, width in enumerate(widths):
        for row, optimizer in enumerate(optimizers):
            ax = axes[row][col]
            lr = settings["user_lr"][optimizer]
            for ratio, color in zip(ratios, colors):
                steps, mean = _mean_curve(result["runs"], width, optimizer, lr, ratio)
                ax.plot(steps, mean, color=color, label=f"ratio {ratio:g}", lw=1.4)
            ax.set_yscale("log")
            ax.set_title(f"{width}: {optimizer} lr {lr:g} (a)", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel("val loss (rel.)", fontsize=8)
        ax = axes[-1][col]
        bar_width = 0.8 / len(optimizers)
        for k, optimizer in enumerate(optimizers):
            cells = summary[width][optimizer]["b"]
            means = [cells[_ratio_key(r)]["final_val_loss"].get("mean", math.nan) for r in ratios]
            errs = [cells[_ratio_key(r)]["final_val_loss"].get("std", 0.0) for r in ratios]
            xs = [i + (k - (len(optimizers) - 1) / 2) * bar_width for i in range(len(ratios))]
            ax.bar(xs, means, bar_width, yerr=errs, label=optimizer, capsize=2)
        ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
        ax.set_yscale("log")
        ax.set_title(f"{width}: each ratio at its best lr (b)", fontsize=9)
        ax.set_xlabel("LoRA+ ratio", fontsize=8)
        if col == 0:
            ax.set_ylabel("final val loss (rel.), mean ± std", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"LoRA+ convergence: {settings['steps']} steps, {len(settings['seeds'])} seeds (curves: mean over seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    return buffer.getvalue()


def _mean_curve(
    runs: Sequence[dict[str, Any]], width: str, optimizer: str, lr: float, ratio: float
) -> tuple[list[int], list[float]]:
    """Mean over seeds of the relative validation loss, over the steps every seed's curve has."""
    curves = [r for r in runs if (r["width"], r["optimizer"], r["lr"], r["ratio"]) == (width, optimizer, lr, ratio)]
    if not curves:
        return [], []
    length = min(len(r["steps"]) for r in curves)
    steps = curves[0]["steps"][:length]
    mean = [statistics.fmean(r["val_loss"][i] or math.inf for r in curves) for i in range(length)]
    return steps, mean


# ---- command line -------------------------------------------------------------------------------------------------


def _csv(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    return lambda text: tuple(kind(part) for part in text.split(",") if part.strip())


def parse_settings(argv: Sequence[str] | None) -> tuple[Settings, Path, int, Path | None]:
    """(settings, output folder, processes, stored JSON to redraw) from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny budget (2 seeds, 2 lrs, 16 steps): the harness check"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "loraplus_convergence")
    parser.add_argument("--seeds", type=_csv(int), help="e.g. 0,1,2")
    parser.add_argument("--widths", type=_csv(str), help=f"of {','.join(WIDTHS)}")
    parser.add_argument("--optimizers", type=_csv(str), help=f"of {','.join(OPTIMIZERS)}")
    parser.add_argument("--ratios", type=_csv(float), help="LoRA+ ratios (1 = plain LoRA, always included)")
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--jobs", type=int, default=2, help="processes (one thread each); 1 = run here")
    parser.add_argument("--from-json", type=Path, help="train nothing: redraw the figure and table of a stored JSON")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    chosen = {
        "seeds": args.seeds,
        "widths": args.widths,
        "optimizers": args.optimizers,
        "ratios": None if args.ratios is None else tuple(sorted({1.0, *args.ratios})),
        "steps": args.steps,
    }
    settings = replace(settings, **{k: v for k, v in chosen.items() if v is not None})
    bad = [w for w in settings.widths if w not in WIDTHS] + [o for o in settings.optimizers if o not in OPTIMIZERS]
    if bad or not settings.seeds or settings.steps < 1:
        parser.error(f"unknown width or optimizer {bad}, or no seeds / steps" if bad else "give seeds and steps >= 1")
    return settings, args.out, max(1, args.jobs), args.from_json


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    settings, out, jobs, stored = parse_settings(argv)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "loraplus_convergence.json"

    def write_json(result: dict[str, Any]) -> None:
        write_text_atomic(json_path, json.dumps(result, indent=1) + "\n")

    if stored is not None:
        result = json.loads(stored.read_text())
    else:
        result = run_benchmark(settings, jobs, checkpoint=write_json)
        write_json(result)
    write_bytes_atomic(out / "loraplus_convergence.png", figure_png(result))
    print(markdown_tables(result))
    print(f"wrote {'' if stored else f'{json_path} and '}{out / 'loraplus_convergence.png'}")
    return result


if __name__ == "__main__":
    main()
