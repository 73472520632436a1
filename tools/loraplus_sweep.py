#!/usr/bin/env python
"""Find your LoRA+ (learning rate, ratio) on your own data: short trainings side by side, ranked, with the command.

    python tools/loraplus_sweep.py --ratios 1,4,16 --learning_rates 5e-5,1e-4 --steps 60 --sweep_dir sweep \\
        [--optimizers AdamW,Lion] [--jobs N] [--devices 0,1] -- <your train_network.py flags>

Every run is your command with the learning rate (`--learning_rate`; `--unet_lr` is replaced too), the LoRA+ ratio
(`--loraplus_lr_ratio`; per-component ratios and `loraplus_*` network_args are replaced) and, with --optimizers,
`--optimizer_type` changed, trained --steps steps with the same data, seed, noise and validation batches (your
`--validation_split` / `--validation_data_dir`, else 20% of the images held out), the validation loss every
--validate_every steps. Latents (and, UNet-only, text-encoder outputs) are cached to disk by the first run and
read by all the others; the sweep checks that no cache file changed after the first run.

Resumable: a finished run is never repeated; Ctrl-C (or SIGTERM) stops the running trainings, each saving its
state, and the same command continues them from there. With --jobs N, N trainings run at once, one process per
GPU of --devices (default: every visible GPU; on a CPU-only machine they share the CPU).

Writes SWEEP_DIR/runs/ (each run's LoRA, report and log), SWEEP_DIR/sweep.json (settings, every run's validation
curve, both rankings, the cache check), SWEEP_DIR/compare/compare.html (the runs overlaid: tools/compare_runs.py's
page) and SWEEP_DIR/recommended_command.txt; prints the ranking and the recommended command.
Exit codes: 0 done, 2 bad input or a run refused its flags, 130/143 interrupted (finished runs are kept).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from library.errors import (  # noqa: E402
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_NON_FINITE,
    EXIT_TERMINATED,
    UserInputError,
)

TRAINER = REPO_ROOT / "train_network.py"
MANIFEST = "sweep.json"
DEFAULT_VALIDATION_SPLIT = "0.2"
CACHE_PATTERNS = ("*_sdxl.npz", "*_te_outputs.npz")
"""The disk caches the trainer writes beside the images (latents, text-encoder outputs)."""
SWEPT_DESTS = frozenset(
    {
        "learning_rate",
        "unet_lr",
        "loraplus_lr_ratio",
        "loraplus_unet_lr_ratio",
        "loraplus_text_encoder_lr_ratio",
        "max_train_steps",
        "max_train_epochs",
        "resume",
        "output_config",
    }
)
"""Flags each run sets itself (the recommended command too)."""
RUN_ONLY_DESTS = frozenset(
    {
        "output_dir",
        "output_name",
        "save_every_n_epochs",
        "save_every_n_steps",
        "save_last_n_epochs",
        "save_last_n_steps",
        "save_last_n_epochs_state",
        "save_last_n_steps_state",
        "save_state",
        "save_state_on_train_end",
        "logging_dir",
        "log_with",
        "log_prefix",
        "log_tracker_name",
    }
)
"""Where and how often your own command writes: the sweep's runs write only their final files under SWEEP_DIR."""
LORAPLUS_NETWORK_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


# --- Settings -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    name: str
    learning_rate: float
    ratio: float
    optimizer: str | None
    argv: tuple[str, ...]
    """The trainer's arguments for this run."""


@dataclass
class Plan:
    sweep_dir: Path
    runs: list[Run]
    steps: int
    added: list[str]
    """Flags the sweep adds to your command (caching, validation), the recommended command included."""
    base_argv: list[str]
    """Your command without the swept and run-only flags."""
    user_argv: list[str]
    cache_roots: list[Path] = field(default_factory=list)

    @property
    def runs_dir(self) -> Path:
        return self.sweep_dir / "runs"


def floats(text: str, what: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserInputError(f"{what} {text!r}: give comma-separated numbers, e.g. 1,4,16") from None
    if not values or any(not (value > 0 and value < float("inf")) for value in values):
        raise UserInputError(f"{what} {text!r}: every value must be a finite number above 0")
    return list(dict.fromkeys(values))


def run_name(learning_rate: float, ratio: float, optimizer: str | None) -> str:
    name = f"lr{learning_rate:g}_r{ratio:g}"
    return f"{optimizer.lower()}_{name}" if optimizer else name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplus_sweep.py",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog="Everything not listed here (or after --) is your train_network.py command.",
    )
    parser.add_argument("--sweep_dir", type=Path, default=Path("loraplus_sweep"), help="default: %(default)s")
    parser.add_argument("--ratios", default="1,4,16", help="LoRA+ ratios; 1 = plain LoRA (default: %(default)s)")
    parser.add_argument(
        "--learning_rates",
        default=None,
        help="base learning rates (default: your command's --unet_lr / --learning_rate x 0.5, 1, 2)",
    )
    parser.add_argument("--optimizers", default=None, help="--optimizer_type values to sweep too, e.g. AdamW,Lion")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument(
        "--validate_every", type=int, default=None, help="validation loss every N steps (default: steps / 10)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (default: %(default)s)")
    parser.add_argument("--devices", default=None, help="GPU ids for --jobs, e.g. 0,1 (default: all visible)")
    return parser


def plan_sweep(args: argparse.Namespace, user_argv: list[str]) -> Plan:
    """Every run's arguments, each checked by the trainer's own config build (bad input stops here, in one line,
    before anything trains)."""
    from library.config.argv_edit import has_flag, without_flags, without_network_args
    from library.config.cli import build_parser as trainer_parser
    from library.config.config_file import parse_args

    if args.steps < 1:
        raise UserInputError(f"--steps {args.steps}: give 1 or more")
    if args.jobs < 1:
        raise UserInputError(f"--jobs {args.jobs}: give 1 or more")
    parser = trainer_parser()
    try:
        user_args = parse_args(parser, user_argv)
    except SystemExit:
        raise UserInputError("your training command did not parse (see the line above): fix it and run again") from None
    ratios = floats(args.ratios, "--ratios")
    rates = _learning_rates(args.learning_rates, user_args)
    optimizers: list[str | None] = (
        [o.strip() for o in args.optimizers.split(",") if o.strip()] if args.optimizers else [None]
    )
    every = args.validate_every or max(1, args.steps // 10)

    base = without_flags(
        user_argv, SWEPT_DESTS | RUN_ONLY_DESTS | ({"optimizer_type"} if args.optimizers else set()), parser
    )
    base = without_network_args(base, LORAPLUS_NETWORK_ARGS, parser)
    added: list[str] = []
    if not (user_args.validation_split or user_args.validation_data_dir):
        added += ["--validation_split", DEFAULT_VALIDATION_SPLIT]
    if not has_flag(base, "validate_every_n_steps", parser):
        added += ["--validate_every_n_steps", str(every)]
    added += _caching_flags(base + added, user_args, parser)

    runs = []
    for optimizer, rate, ratio in itertools.product(optimizers, rates, ratios):
        name = run_name(rate, ratio, optimizer)
        swept = [
            "--learning_rate",
            f"{rate:g}",
            "--loraplus_lr_ratio",
            f"{ratio:g}",
            "--max_train_steps",
            str(args.steps),
        ]
        if optimizer:
            swept += ["--optimizer_type", optimizer]
        output = ["--output_dir", str(args.sweep_dir / "runs"), "--output_name", name]
        runs.append(Run(name, rate, ratio, optimizer, tuple(base + added + swept + output)))
    configs = [_checked_config(run, parser) for run in runs]
    return Plan(args.sweep_dir, runs, args.steps, added, base, list(user_argv), cache_roots(configs[0]))


def _learning_rates(text: str | None, user_args: argparse.Namespace) -> list[float]:
    if text is not None:
        return floats(text, "--learning_rates")
    own = user_args.unet_lr or user_args.learning_rate
    if not own:
        raise UserInputError("give --learning_rates (your command has no --learning_rate or --unet_lr to start from)")
    return [own * 0.5, own, own * 2]


def _caching_flags(argv: list[str], user_args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """Disk caches so that the first run encodes and the others read: latents always, text-encoder outputs when
    only the UNet trains (with caption variants when captions vary, as the trainer requires)."""
    from library.config.argv_edit import has_flag

    flags = [] if has_flag(argv, "cache_latents_to_disk", parser) else ["--cache_latents_to_disk"]
    if user_args.network_train_unet_only and not has_flag(argv, "cache_text_encoder_outputs_to_disk", parser):
        flags.append("--cache_text_encoder_outputs_to_disk")
        varying = user_args.shuffle_caption or user_args.caption_dropout_rate or user_args.caption_tag_dropout_rate
        varying = varying or user_args.caption_dropout_every_n_epochs
        if varying and user_args.text_encoder_cache_variants == 1:
            flags += ["--text_encoder_cache_variants", "8"]
    return flags


def _checked_config(run: Run, parser: argparse.ArgumentParser):
    from library.config.build import config_from_args
    from library.config.config_file import parse_args

    try:
        return config_from_args(parse_args(parser, list(run.argv)))
    except SystemExit:
        raise UserInputError(f"run {run.name}: the trainer refused its flags (see the line above)") from None


def cache_roots(cfg) -> list[Path]:
    """The folders whose images the runs cache (training, regularisation and validation images)."""
    roots = [cfg.data.train_data_dir, getattr(cfg.data, "reg_data_dir", None)]
    group = getattr(cfg.data, "dataset_config", None)
    for dataset in getattr(group, "datasets", ()):
        roots += [subset.image_dir for subset in dataset.subsets]
    if cfg.validation is not None:
        roots.append(cfg.validation.data_dir)
    return sorted({Path(root).resolve() for root in roots if root is not None})


# --- Cache check ------------------------------------------------------------------------------------------------------


def cache_snapshot(roots: Sequence[Path]) -> dict[str, list[int]]:
    """Every disk cache file under `roots`: path -> [inode, mtime_ns, size] (an atomic rewrite changes all three)."""
    snapshot = {}
    for root in roots:
        for pattern in CACHE_PATTERNS:
            for path in Path(root).rglob(pattern):
                stat = path.stat()
                snapshot[str(path)] = [stat.st_ino, stat.st_mtime_ns, stat.st_size]
    return dict(sorted(snapshot.items()))


def cache_check(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict:
    changed = sorted(path for path in before if after.get(path) != before[path])
    added = sorted(set(after) - set(before))
    return {
        "latent_files": sum(path.endswith("_sdxl.npz") for path in before),
        "text_encoder_files": sum(path.endswith("_te_outputs.npz") for path in before),
        "changed_after_first_run": changed,
        "added_after_first_run": added,
        "unchanged": not changed and not added,
    }


# --- Running ----------------------------------------------------------------------------------------------------------


def load_manifest(plan: Plan) -> dict:
    """The sweep's record; refuses a folder whose runs were made with other flags (their results would mislead)."""
    path = plan.sweep_dir / MANIFEST
    if not path.is_file():
        return {"runs": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserInputError(f"{path} is damaged ({error}): remove it (finished runs are then trained again)") from None
    for run in plan.runs:
        recorded = manifest.get("runs", {}).get(run.name)
        if recorded is not None and recorded.get("argv") != list(run.argv):
            raise UserInputError(
                f"{plan.sweep_dir} holds run {run.name} made with other flags: give another --sweep_dir, or remove "
                "that folder to start this sweep over"
            )
    return manifest


def save_manifest(plan: Plan, manifest: dict) -> None:
    from library.files.atomic import write_text_atomic

    write_text_atomic(plan.sweep_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n", what="the sweep record")


def finished_on_disk(plan: Plan, name: str) -> bool:
    """Its final LoRA is there and its report says it ran the whole budget (only the final save writes that file)."""
    report = plan.runs_dir / f"{name}_report.json"
    if not (plan.runs_dir / f"{name}.safetensors").is_file() or not report.is_file():
        return False
    try:
        return json.loads(report.read_text(encoding="utf-8")).get("steps") == plan.steps
    except (OSError, ValueError, AttributeError):
        return False


def latest_state(runs_dir: Path, name: str) -> Path | None:
    """The state an interrupted run saved last (`<name>-stepNNNNNNNN-state`), to resume from."""
    states = sorted(runs_dir.glob(f"{name}-step*-state"))
    return states[-1] if states else None


def visible_devices(text: str | None, jobs: int) -> list[str | None]:
    """One slot per job: a GPU id each (CUDA_VISIBLE_DEVICES), or None (the CPU, shared)."""
    if text is not None:
        devices = [part.strip() for part in text.split(",") if part.strip()]
    else:
        import torch

        devices = [str(index) for index in range(torch.cuda.device_count())]
    if not devices:
        return [None] * jobs
    if jobs > len(devices):
        raise UserInputError(f"--jobs {jobs} but {len(devices)} GPU(s) ({','.join(devices)}): one training per GPU")
    return devices[:jobs]


def start_run(run: Run, resume: Path | None, device: str | None, jobs: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    elif jobs > 1:  # trainings sharing the CPU: split its threads instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    argv = [sys.executable, str(TRAINER), *run.argv, *(["--resume", str(resume)] if resume else [])]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        # Its own session: Ctrl-C in the terminal reaches the sweep only, which then stops each run once.
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=os.name != "nt")


def stop_run(process: subprocess.Popen) -> None:
    """Ask a training to stop: SIGTERM, which the trainer takes as Ctrl-C (it saves its LoRA and state). Not SIGINT:
    a sweep started in the background by a shell script inherits an ignored SIGINT, and so would its trainings. On
    Windows the training is ended (it then starts over on the next sweep)."""
    process.terminate()


def last_error(log_path: Path) -> str:
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines() if log_path.is_file() else []
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1] if errors else (lines[-1] if lines else "(no output)")


def run_validation(plan: Plan, name: str) -> list[tuple[int, float]]:
    from library.report.sources import read_output_run

    history = read_output_run(plan.runs_dir, name).history.validation
    return [(int(step), float(value)) for step, value in zip(history.steps, history.values)]


class SweepInterrupted(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def run_all(plan: Plan, manifest: dict, devices: list[str | None]) -> None:
    """Train every run not yet done; the first one alone (it writes the caches the others read)."""
    from library.train.interrupts import sigterm_interrupts

    for run in plan.runs:  # a run that finished while the sweep was killed before it could record it
        if run.name not in manifest["runs"] and finished_on_disk(plan, run.name):
            finish_run(plan, manifest, run, 0, 0.0)
    done = {name for name, record in manifest["runs"].items() if record.get("status") in ("finished", "diverged")}
    pending = [run for run in plan.runs if run.name not in done]
    total, running = len(plan.runs), {}
    free = list(devices)
    if done and "cache_snapshot" not in manifest:
        manifest["cache_snapshot"] = cache_snapshot(plan.cache_roots)
    with sigterm_interrupts():
        try:
            while pending or running:
                alone = "cache_snapshot" not in manifest  # the caches are not written yet: one run writes them
                while pending and free and not (alone and running):
                    run, device = pending.pop(0), free.pop(0)
                    resume = latest_state(plan.runs_dir, run.name)
                    log_path = plan.runs_dir / f"{run.name}.log"
                    print(
                        f"[{len(done) + len(running) + 1}/{total}] {run.name}: "
                        + (f"resuming from {resume.name}" if resume else "training")
                        + (f" on GPU {device}" if device is not None else ""),
                        flush=True,
                    )
                    running[run.name] = (
                        run,
                        start_run(run, resume, device, len(devices), log_path),
                        device,
                        time.time(),
                    )
                time.sleep(0.2)
                for name, (run, process, device, started) in list(running.items()):
                    code = process.poll()
                    if code is None:
                        continue
                    del running[name]
                    free.append(device)
                    finish_run(plan, manifest, run, code, time.time() - started)
                    done.add(name)
        except KeyboardInterrupt as interrupt:
            stop_all(plan, manifest, running)
            raise SweepInterrupted(
                EXIT_TERMINATED if type(interrupt).__name__ == "Terminated" else EXIT_INTERRUPTED
            ) from None
        except (SweepInterrupted, UserInputError):  # a run stopped or failed on its own: the others stop too
            stop_all(plan, manifest, running)
            raise


def stop_all(plan: Plan, manifest: dict, running: dict) -> None:
    """Stop the running trainings (each saves its LoRA and state) and wait for them; one that finished meanwhile is
    recorded as finished."""
    for _, process, _, _ in running.values():
        if process.poll() is None:
            stop_run(process)
    for run, process, _, started in running.values():
        code = process.wait()
        if code in (0, EXIT_NON_FINITE):
            finish_run(plan, manifest, run, code, time.time() - started)
            continue
        state = latest_state(plan.runs_dir, run.name)
        print(f"{run.name}: stopped" + (f", state saved ({state.name})" if state else ""), flush=True)


def finish_run(plan: Plan, manifest: dict, run: Run, code: int, seconds: float) -> None:
    log_path = plan.runs_dir / f"{run.name}.log"
    if code == 0:
        validation = run_validation(plan, run.name)
        record = {"status": "finished", "validation": validation}
        summary = (
            f"validation loss {validation[-1][1]:.6g} at step {validation[-1][0]}" if validation else "no validation"
        )
    elif code == EXIT_NON_FINITE:
        record, summary = {"status": "diverged", "validation": []}, f"diverged: {last_error(log_path)}"
    elif code in (EXIT_INTERRUPTED, EXIT_TERMINATED, -signal.SIGINT, -signal.SIGTERM):
        raise SweepInterrupted(code if code > 0 else EXIT_INTERRUPTED)
    else:
        raise UserInputError(f"run {run.name} failed (exit {code}): {last_error(log_path)}; its log: {log_path}")
    manifest["runs"][run.name] = {
        **record,
        "learning_rate": run.learning_rate,
        "ratio": run.ratio,
        "optimizer": run.optimizer,
        "argv": list(run.argv),
        "seconds": round(seconds, 1),
    }
    if "cache_snapshot" not in manifest:
        manifest["cache_snapshot"] = cache_snapshot(plan.cache_roots)
        manifest["cache_written_by"] = run.name
    save_manifest(plan, manifest)
    print(f"  {run.name}: {summary} ({seconds:.0f} s)", flush=True)


# --- Results ------------------------------------------------------------------------------------------------------


def results(plan: Plan, manifest: dict) -> list[str]:
    """Rank, write the comparison page and the recommendation; returns the lines to print."""
    from library.config.argv_edit import join_command
    from library.report.compare import compare_runs, write_comparison
    from library.report.sweep import SweepPoint, rank, ranking_table, recommendation_lines

    points = [
        SweepPoint(
            run.name,
            run.learning_rate,
            run.ratio,
            run.optimizer,
            [tuple(item) for item in manifest["runs"][run.name]["validation"]],
            diverged=manifest["runs"][run.name]["status"] == "diverged",
        )
        for run in plan.runs
    ]
    ranking = rank(points)
    check = cache_check(manifest.get("cache_snapshot", {}), cache_snapshot(plan.cache_roots))
    lines = [ranking_table(ranking), "", *recommendation_lines(ranking)]
    lines.append(cache_line(check, manifest.get("cache_written_by"), len(plan.runs)))
    best = ranking.best
    command = None
    if best is not None:
        run = next(run for run in plan.runs if run.name == best.name)
        command = join_command([sys.executable, str(TRAINER), *recommended_argv(plan, run)])
        write_text(plan.sweep_dir / "recommended_command.txt", command + "\n")
        lines += [
            f"the command (your flags, this lr and ratio, the sweep's {plan.steps} steps and its caching/validation"
            " flags; raise --max_train_steps for a longer run):",
            f"  {command}",
        ]
    try:
        comparison = compare_runs([plan.runs_dir], sort="loraplus_lr_ratio")
        lines.append(f"comparison page: {write_comparison(comparison, plan.sweep_dir / 'compare')}")
    except UserInputError as error:
        lines.append(f"warning: no comparison page ({error})")
    manifest["ranking"] = {
        "by_final_validation_loss": [p.name for p in ranking.by_loss],
        "by_steps_to_plain_lora_best": [p.name for p in ranking.by_speed],
        "plain_lora_best": ranking.target_run.name if ranking.target_run else None,
        "plain_lora_best_loss": ranking.target,
        "steps_to_reach": ranking.reach,
    }
    manifest["recommended"] = {"run": best.name if best else None, "loss": best.final_loss if best else None}
    manifest["recommended_command"] = command
    manifest["cache_check"] = check
    save_manifest(plan, manifest)
    return lines


def recommended_argv(plan: Plan, run: Run) -> list[str]:
    """Your command with this run's settings: what the sweep trained, written where your command writes."""
    from library.config.argv_edit import without_flags, without_network_args
    from library.config.cli import build_parser as trainer_parser

    parser = trainer_parser()
    dests = SWEPT_DESTS | ({"optimizer_type"} if run.optimizer else set())
    own = without_network_args(without_flags(plan.user_argv, dests, parser), LORAPLUS_NETWORK_ARGS, parser)
    swept = ["--learning_rate", f"{run.learning_rate:g}", "--loraplus_lr_ratio", f"{run.ratio:g}"]
    swept += ["--max_train_steps", str(plan.steps)] + (["--optimizer_type", run.optimizer] if run.optimizer else [])
    return [*own, *plan.added, *swept]


def cache_line(check: dict, writer: str | None, runs: int) -> str:
    files = f"{check['latent_files']} latent and {check['text_encoder_files']} text-encoder cache files"
    if check["unchanged"]:
        source = f"by {writer}" if writer else "before the sweep"
        return f"caches: {files}, written once ({source}), read unchanged by the other {runs - 1} runs"
    changed = check["changed_after_first_run"] + check["added_after_first_run"]
    return f"warning: caches: {len(changed)} cache files were written again after the first run (e.g. {changed[0]})"


def write_text(path: Path, text: str) -> None:
    from library.files.atomic import write_text_atomic

    write_text_atomic(path, text, what="the recommended command")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, user_argv = build_parser().parse_known_args(argv)
    user_argv = [token for token in user_argv if token != "--"]
    try:
        plan = plan_sweep(args, user_argv)
        devices = visible_devices(args.devices, args.jobs)
        plan.sweep_dir.mkdir(parents=True, exist_ok=True)
        manifest = load_manifest(plan)
        manifest["steps"], manifest["added_flags"] = plan.steps, plan.added
        print(
            f"sweep: {len(plan.runs)} runs of {plan.steps} steps in {plan.sweep_dir}"
            f" (flags added to yours: {' '.join(plan.added)})"
        )
        run_all(plan, manifest, devices)
        for line in results(plan, manifest):
            print(line)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("sweep interrupted before any run started", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SweepInterrupted as stop:
        finished = sum(record.get("status") == "finished" for record in manifest["runs"].values())
        print(
            f"sweep interrupted: {finished} of {len(plan.runs)} runs finished and kept; run the same command again to "
            "continue (stopped runs resume from their saved state)",
            file=sys.stderr,
        )
        return stop.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
