#!/usr/bin/env python
"""The fault matrix: every fault below is run against the real command line, next to the files of a good finished
run, and tabulated with its exit code, the line it printed, whether a traceback appeared and whether any earlier
file changed.

    python bench/fault_table.py [--workdir DIR] [--only PATTERN] [--json PATH] [--list]

1. builds the tiny SDXL (tools/make_tiny_sdxl.py) and a 4-image data set (tools/make_demo_dataset.py), and makes
   one good run (`run.safetensors`, its EMA file, the `run-state` folder, latent and text-encoder caches beside
   the images): the "earlier files";
2. each fault gets a copy of those (its case folder), is set up (a damaged file, a file in the way...) and run as
   a subprocess of `python train_network.py ...` with the same --output_dir and --output_name as the earlier run,
   so a fault that slipped through would overwrite them. Faults that need a patch (a full disk, a tiny free-disk
   figure) run this script's in-process runner in a subprocess (`--child`), which patches and calls
   `train_network.run(argv)`; signal faults send real signals to real processes;
3. every file of the case folder is hashed before and after: a changed or removed file is a fault's failure
   (unless the fault says why it may change, e.g. a damaged cache being recomputed); new files are listed.

Prints a markdown table; exits 1 when any fault printed a traceback, changed an earlier file or gave another exit
code than expected, so it doubles as a check. Most faults stop before the model loads (a few seconds each, the
interpreter's imports); the rest train the tiny model 1-2 steps at 64 px.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import errno  # noqa: E402
import fnmatch  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

OUTPUT_NAME = "run"
BASE_STEPS = 2
RUN_FLAGS: tuple[str, ...] = (
    "--network_module", "networks.lora", "--network_dim", "4", "--resolution", "64", "--enable_bucket",
    "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--caption_extension", ".txt", "--train_batch_size", "2",
    "--max_data_loader_n_workers", "0", "--seed", "42", "--learning_rate", "1e-3", "--network_train_unet_only",
    "--cache_latents", "--cache_latents_to_disk", "--cache_text_encoder_outputs",
    "--cache_text_encoder_outputs_to_disk", "--ema_decay", "0.9", "--save_state",
)
"""Every run's flags (the earlier run's too, so a fault run could resume its state): UNet-only LoRA at 64 px with
everything that leaves a file behind (EMA, state, both caches on disk)."""
MESSAGE_PREFIXES = ("error:", "warning:", "interrupted", "note:", "latent cache ", "text-encoder cache ")
"""Lines that are the trainer's own word (the cache lines are its recompute warnings)."""
PROCESS_TIMEOUT = 600
SIGNAL_WAIT = 300


# --- Workspace: the tiny model, the data and the earlier run ---------------------------------------------------------
@dataclass(frozen=True)
class Workspace:
    root: Path
    model: Path
    """The tiny SDXL single file (its config folder `tiny_sdxl_diffusers` beside it)."""
    diffusers: Path
    data: Path
    """The data set, with the earlier run's latent and text-encoder caches beside the images."""
    out: Path
    """The earlier run's output folder."""


def run_argv(model: Path, data: Path | None, out: Path, *extra: str, name: str = OUTPUT_NAME,
             steps: int = BASE_STEPS) -> list[str]:
    """A training command line of this matrix (later flags win, so `extra` can change any of RUN_FLAGS)."""
    data_flags = ["--train_data_dir", str(data)] if data is not None else []
    return ["--pretrained_model_name_or_path", str(model), *data_flags, "--output_dir", str(out),
            "--output_name", name, "--max_train_steps", str(steps), *RUN_FLAGS, *extra]


def prepare_workspace(root: Path) -> Workspace:
    """The tiny model, the data set and one good finished run in `root` (reused when a previous call made them)."""
    from tools.make_demo_dataset import make_demo_dataset
    from tools.make_tiny_sdxl import TINY_DIFFUSERS_DIR, TINY_SINGLE_FILE, write_tiny_sdxl

    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(root, root / "model" / TINY_SINGLE_FILE, root / "model" / TINY_DIFFUSERS_DIR, root / "data",
                   root / "earlier")
    ready = root / "ready.json"
    if ready.exists():
        return ws
    write_tiny_sdxl(ws.model.parent, seed=0)
    shutil.rmtree(ws.data, ignore_errors=True)
    make_demo_dataset(ws.data, count=4, min_side=64, max_side=128)
    shutil.rmtree(ws.out, ignore_errors=True)
    result = run_process([sys.executable, str(REPO / "train_network.py"), *run_argv(ws.model, ws.data, ws.out)])
    if result.rc != 0:
        raise SystemExit(f"the earlier run failed (exit {result.rc}):\n{result.stderr[-3000:]}")
    expected = [f"{OUTPUT_NAME}.safetensors", f"{OUTPUT_NAME}-ema.safetensors", f"{OUTPUT_NAME}-state"]
    missing = [name for name in expected if not (ws.out / name).exists()]
    if missing or not list(ws.data.rglob("*_te_outputs.npz")) or not list(ws.data.rglob("*_sdxl.npz")):
        raise SystemExit(f"the earlier run left no {missing or 'caches'} in {ws.out}")
    ready.write_text(json.dumps({"made": time.time()}))
    return ws


# --- Running a command and reading what it printed -----------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    rc: int | None
    """Exit code (negative: killed by that signal; None: did not finish in time)."""
    stderr: str
    stdout: str
    note: str = ""
    """What the harness did or saw beyond the command (e.g. the first run of a pair was killed)."""


def child_env() -> dict[str, str]:
    """Unbuffered output (signal faults wait for lines), a thread count that suits a small shared machine, and no
    network for the hub libraries."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1",
               TQDM_MININTERVAL="0")
    return env


def run_process(cmd: Sequence[str], timeout: float = PROCESS_TIMEOUT) -> Outcome:
    try:
        done = subprocess.run(list(cmd), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as expired:
        return Outcome(None, _text(expired.stderr), _text(expired.stdout), f"killed after {timeout:.0f} s")
    return Outcome(done.returncode, done.stderr, done.stdout)


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def train_cmd(argv: Sequence[str], patch: dict | None = None) -> list[str]:
    """`python train_network.py ARGV`, or with `patch` this script's in-process runner (see `child_main`)."""
    if patch is None:
        return [sys.executable, str(REPO / "train_network.py"), *argv]
    return [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(patch), "--", *argv]


class Started:
    """A training process whose output goes to files (so the harness can wait for a line, then signal it)."""

    def __init__(self, argv: Sequence[str], logs: Path) -> None:
        self.out_path, self.err_path = Path(f"{logs}.stdout"), Path(f"{logs}.stderr")
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(train_cmd(argv), cwd=REPO, env=child_env(), stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)

    def text(self) -> tuple[str, str]:
        return (self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace"))

    def wait_for(self, seen: Callable[[str, str], bool], timeout: float = SIGNAL_WAIT) -> bool:
        """True once `seen(stdout, stderr)` holds; False when the process ended first or `timeout` passed."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if seen(*self.text()):
                return True
            if self.proc.poll() is not None:
                return seen(*self.text())
            time.sleep(0.02)
        return False

    def send(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def finish(self, note: str = "", timeout: float = PROCESS_TIMEOUT) -> Outcome:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc, note = None, f"{note}; killed after {timeout:.0f} s".lstrip("; ")
        stdout, stderr = self.text()
        return Outcome(rc, stderr, stdout, note)


STEP_DONE = re.compile(r"steps:.*?\|\s*([1-9]\d*)/\d+")


def steps_done(stdout: str, stderr: str) -> bool:
    """The progress bar shows at least one finished optimizer step."""
    return STEP_DONE.search(stderr) is not None


def message_line(outcome: Outcome) -> str:
    """The line to show: the last of the trainer's own lines on stderr (else on stdout), else the last line."""
    err = [line.strip() for line in outcome.stderr.replace("\r", "\n").splitlines() if line.strip()]
    out = [line.strip() for line in outcome.stdout.replace("\r", "\n").splitlines() if line.strip()]
    for lines in (err, out):
        ours = [line for line in lines if line.startswith(MESSAGE_PREFIXES)]
        if ours:
            return ours[-1]
    return (err or out or [""])[-1]


def has_traceback(outcome: Outcome) -> bool:
    return "Traceback (most recent call last)" in outcome.stderr or "Traceback (most recent" in outcome.stdout


# --- Snapshots -------------------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (a symlink: its target, not the pristine file's bytes)."""
    files: dict[str, str] = {}
    if not root.exists():
        return files
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            files[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            files[rel] = digest.hexdigest()
    return files


@dataclass(frozen=True)
class Changes:
    changed: list[str]
    removed: list[str]
    new: list[str]
    allowed: list[str]
    """Changed or removed files the fault says may change (a damaged cache recomputed, files this run finished
    before the fault)."""

    @property
    def ok(self) -> bool:
        return not self.changed and not self.removed

    def describe(self) -> str:
        parts = []
        if self.changed:
            parts.append(f"CHANGED: {summarize(self.changed)}")
        if self.removed:
            parts.append(f"REMOVED: {summarize(self.removed)}")
        if not parts:
            parts.append("unchanged")
        if self.allowed:
            parts.append(f"changed as expected: {summarize(self.allowed)}")
        if self.new:
            parts.append(f"new: {summarize(self.new)}")
        return "; ".join(parts)


def compare(before: dict[str, str], after: dict[str, str], may_change: Sequence[str] = ()) -> Changes:
    def allowed(path: str) -> bool:
        return any(fnmatch.fnmatch(path, pattern) for pattern in may_change)

    differ = [p for p in before if p in after and after[p] != before[p]]
    gone = [p for p in before if p not in after]
    return Changes([p for p in differ if not allowed(p)], [p for p in gone if not allowed(p)],
                   [p for p in after if p not in before], [p for p in differ + gone if allowed(p)])


def summarize(paths: Iterable[str]) -> str:
    """Paths, those of one folder with more than two files folded into `folder/ (n files)`."""
    by_folder: dict[str, list[str]] = {}
    for path in paths:
        by_folder.setdefault(path.rpartition("/")[0], []).append(path)
    words = []
    for folder, members in by_folder.items():
        words += [f"{folder}/ ({len(members)} files)"] if len(members) > 2 else members
    return ", ".join(words)


# --- Cases and faults ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One fault's folder: a copy of the earlier run's output (`out`) and data with its caches (`data`), and
    `inputs` for the damaged files it is given. Everything under `root` is snapshotted."""

    ws: Workspace
    root: Path
    logs: Path
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def state(self) -> Path:
        return self.out / f"{OUTPUT_NAME}-state"

    @property
    def lora(self) -> Path:
        return self.out / f"{OUTPUT_NAME}.safetensors"

    def argv(self, *extra: str, model: Path | None = None, data: Path | None | bool = True, out: Path | None = None,
             name: str = OUTPUT_NAME, steps: int = BASE_STEPS) -> list[str]:
        """The earlier run's command line in this case's folders (`data=None`: no --train_data_dir)."""
        folder = self.data if data is True else data
        return run_argv(model or self.ws.model, folder or None, out or self.out, *extra, name=name, steps=steps)

    def train(self, argv: Sequence[str], patch: dict | None = None) -> Outcome:
        return run_process(train_cmd(argv, patch))

    def start(self, argv: Sequence[str], tag: str = "") -> Started:
        return Started(argv, Path(f"{self.logs}{tag}"))

    def input_file(self, name: str, data: bytes) -> Path:
        path = self.inputs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def model_copy(self, suffix: str = ".safetensors") -> Path:
        """A copy of the tiny model's single file in `inputs` (its config folder linked beside it)."""
        self.inputs.mkdir(parents=True, exist_ok=True)
        copy = self.inputs / f"{self.ws.model.stem}{suffix}"
        shutil.copyfile(self.ws.model, copy)
        link = self.inputs / self.ws.diffusers.name
        if not link.exists():
            link.symlink_to(self.ws.diffusers, target_is_directory=True)
        return copy

    def diffusers_mirror(self) -> Path:
        """The diffusers folder as symlinks to the pristine files (one replaced per fault)."""
        target = self.inputs / "diffusers"
        for item in sorted(self.ws.diffusers.rglob("*")):
            dest = target / item.relative_to(self.ws.diffusers)
            if item.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.symlink_to(item)
        return target


Action = Callable[[], Outcome]


@dataclass(frozen=True)
class Fault:
    key: str
    group: str
    title: str
    setup: Callable[[Case], Action | str]
    """Prepares the case (damages a file...) and returns what to run, or a reason to skip the fault here."""
    expect: int = 2
    may_change: tuple[str, ...] = ()
    """Case-relative patterns of files this fault may change, with a reason in the title (a damaged cache
    recomputed, files this run finished before the fault)."""


FAULTS: list[Fault] = []


def fault(key: str, group: str, title: str, expect: int = 2, may_change: tuple[str, ...] = ()):
    def register(setup: Callable[[Case], Action | str]) -> Callable[[Case], Action | str]:
        FAULTS.append(Fault(key, group, title, setup, expect, may_change))
        return setup
    return register


def flags_fault(key: str, group: str, title: str, *extra: str, expect: int = 2, steps: int = BASE_STEPS) -> None:
    """A fault that is only a command line: the earlier run's, plus `extra`."""
    fault(key, group, title, expect)(lambda case: lambda: case.train(case.argv(*extra, steps=steps)))


def damage(path: Path, kind: str) -> None:
    """Replace the file at `path` (a file, or a symlink to a pristine one) by an empty, half, random or JPEG file, or
    by a folder."""
    original = path.read_bytes()
    path.unlink()
    if kind == "folder":
        path.mkdir()
        return
    data = {"empty": b"", "truncated": original[: len(original) // 2],
            "garbage": random.Random(len(original)).randbytes(max(len(original), 64)), "jpeg": jpeg_bytes()}[kind]
    path.write_bytes(data)


def jpeg_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


# NaN / inf ------------------------------------------------------------------------------------------------------------
NAN = "NaN/inf"
flags_fault("nan_stop", NAN, "lr 1e30, no clipping: NaN loss at step 2", "--learning_rate", "1e30",
            "--max_grad_norm", "0", expect=3, steps=6)
flags_fault("nan_budget", NAN, "lr 1e30 with --max_nan_steps 1: one step skipped, then stop", "--learning_rate", "1e30",
            "--max_grad_norm", "0", "--max_nan_steps", "1", expect=3, steps=6)
flags_fault("fp16_overflow_save", NAN, "lr 1e5, --save_precision fp16: the final LoRA overflows fp16 at save",
            "--learning_rate", "1e5", "--max_grad_norm", "0", "--save_precision", "fp16", expect=3, steps=1)
flags_fault("nan_lr_flag", NAN, "--learning_rate nan", "--learning_rate", "nan")
flags_fault("nan_steps_negative", NAN, "--max_nan_steps -1", "--max_nan_steps", "-1")

# Empty runs -----------------------------------------------------------------------------------------------------------
EMPTY = "empty run"
flags_fault("steps0", EMPTY, "--max_train_steps 0", steps=0)
flags_fault("epochs0", EMPTY, "--max_train_epochs 0", "--max_train_epochs", "0")
flags_fault("lr0", EMPTY, "--learning_rate 0", "--learning_rate", "0")
flags_fault("unet_lr0", EMPTY, "--unet_lr 0 with --network_train_unet_only", "--unet_lr", "0")
flags_fault("block_weights0", EMPTY, "every block lr weight 0 (down/mid/up_lr_weight)", "--network_args",
            "down_lr_weight=zeros", "mid_lr_weight=0,0,0", "up_lr_weight=zeros")
flags_fault("negative_lr", EMPTY, "--learning_rate=-1e-4", "--learning_rate=-1e-4")


@fault("resume_at_end", EMPTY, "--resume the earlier run's final state, same --max_train_steps")
def _resume_at_end(case: Case) -> Action:
    return lambda: case.train(case.argv("--resume", str(case.state)))


# Lock -------------------------------------------------------------------------------------------------------------------
LOCK = "lock"


@fault("second_run", LOCK, "a second run on the same output while the first trains", expect=75)
def _second_run(case: Case) -> Action:
    def act() -> Outcome:
        first = case.start(case.argv(name="busy", steps=100_000), ".first")
        try:
            if not first.wait_for(steps_done):
                return first.finish("the first run ended before it trained a step")
            second = run_process(train_cmd(case.argv(name="busy")))
        finally:
            first.send(signal.SIGTERM)
        done = first.finish()
        return Outcome(second.rc, second.stderr, second.stdout, f"the first run, then stopped by SIGTERM: exit {done.rc}")
    return act


@fault("stale_lock", LOCK, "kill -9 during training, then the same command again (stale lock)", expect=0)
def _stale_lock(case: Case) -> Action:
    def act() -> Outcome:
        argv = case.argv(name="again", steps=100_000)
        first = case.start(argv, ".killed")
        if not first.wait_for(steps_done):
            return first.finish("the first run ended before it trained a step")
        first.send(signal.SIGKILL)
        killed = first.finish()
        left = (case.out / "again.lock").exists()
        rerun = run_process(train_cmd(case.argv(name="again")))
        return Outcome(rerun.rc, rerun.stderr, rerun.stdout,
                       f"first run killed (exit {killed.rc}), lock left: {'yes' if left else 'no'}")
    return act


# Signals ----------------------------------------------------------------------------------------------------------------
SIGNALS = "signal"


def signal_after(case: Case, signum: int, seen: Callable[[str, str], bool], what: str, argv: list[str] | None = None,
                 second: float | None = None) -> Outcome:
    """Start a long run, send `signum` once `seen(stdout, stderr)` holds (again after `second` seconds)."""
    started = case.start(argv or case.argv(steps=100_000))
    if not started.wait_for(seen):
        started.send(signal.SIGKILL)
        return started.finish(f"never saw {what}: no signal sent")
    started.send(signum)
    if second is not None:
        time.sleep(second)
        started.send(signum)
    return started.finish(f"{signal.Signals(signum).name} sent after {what}")


@fault("sigterm_training", SIGNALS, "SIGTERM after a training step", expect=143)
def _sigterm_training(case: Case) -> Action:
    return lambda: signal_after(case, signal.SIGTERM, steps_done, "a finished step")


@fault("sigint_training", SIGNALS, "SIGINT (Ctrl-C) after a training step", expect=130)
def _sigint_training(case: Case) -> Action:
    return lambda: signal_after(case, signal.SIGINT, steps_done, "a finished step")


@fault("sigterm_twice", SIGNALS, "two SIGTERMs 0.2 s apart (the second during the emergency save)", expect=143)
def _sigterm_twice(case: Case) -> Action:
    return lambda: signal_after(case, signal.SIGTERM, steps_done, "a finished step", second=0.2)


@fault("sigterm_loading", SIGNALS, "SIGTERM after the precision line (while the model loads)", expect=143)
def _sigterm_loading(case: Case) -> Action:
    return lambda: signal_after(case, signal.SIGTERM, lambda out, err: "precision:" in out, "the precision line")


@fault("sigint_caching", SIGNALS, "SIGINT while caching latents to disk (300 new images)", expect=130)
def _sigint_caching(case: Case) -> Action:
    from tools.make_demo_dataset import make_demo_dataset

    big = case.inputs / "big"
    make_demo_dataset(big, count=300, min_side=64, max_side=128, seed=1)

    def cached(out: str, err: str) -> bool:
        return next(big.rglob("*_sdxl.npz"), None) is not None

    return lambda: signal_after(case, signal.SIGINT, cached, "the first latent cache file",
                                argv=case.argv(data=big, steps=100_000))


@fault("sigint_startup", SIGNALS, "SIGINT 1 s after start (imports, before any file is read)", expect=130)
def _sigint_startup(case: Case) -> Action:
    return lambda: signal_after(case, signal.SIGINT, _after(1.0), "1 s")


@fault("sigterm_startup", SIGNALS, "SIGTERM 1 s after start (imports, before any file is read)", expect=143)
def _sigterm_startup(case: Case) -> Action:
    return lambda: signal_after(case, signal.SIGTERM, _after(1.0), "1 s")


def _after(seconds: float) -> Callable[[str, str], bool]:
    end = time.monotonic() + seconds
    return lambda out, err: time.monotonic() >= end


# Output folder ----------------------------------------------------------------------------------------------------------
OUTPUT = "output folder"


@fault("output_is_file", OUTPUT, "--output_dir is a file")
def _output_is_file(case: Case) -> Action:
    target = case.input_file("not_a_folder", b"user file")
    return lambda: case.train(case.argv(out=target))


@fault("output_under_file", OUTPUT, "--output_dir below a file")
def _output_under_file(case: Case) -> Action:
    target = case.input_file("not_a_folder", b"user file")
    return lambda: case.train(case.argv(out=target / "out"))


@fault("logging_dir_is_file", OUTPUT, "--logging_dir is a file")
def _logging_dir_is_file(case: Case) -> Action:
    target = case.input_file("logs", b"user file")
    return lambda: case.train(case.argv("--logging_dir", str(target)))


def read_only_folder(case: Case) -> Path | str:
    """A read-only folder: a read-only tmpfs for root (whom permissions do not stop), mode 0555 otherwise; a
    reason to skip when neither is possible."""
    folder = case.inputs / "read_only"
    folder.mkdir(parents=True)
    if os.name != "posix":
        return "needs POSIX permissions"
    if os.geteuid() != 0:
        folder.chmod(0o555)
        case.cleanups.append(lambda: folder.chmod(0o755))
        return folder
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        return f"root, but a read-only tmpfs cannot be mounted here ({mounted.stderr.strip()[:80]})"
    case.cleanups.append(lambda: subprocess.run(["umount", "-l", str(folder)], capture_output=True))
    return folder


@fault("output_read_only", OUTPUT, "--output_dir is read-only")
def _output_read_only(case: Case) -> Action | str:
    folder = read_only_folder(case)
    return folder if isinstance(folder, str) else lambda: case.train(case.argv(out=folder))


@fault("output_in_read_only", OUTPUT, "--output_dir to be made inside a read-only folder")
def _output_in_read_only(case: Case) -> Action | str:
    folder = read_only_folder(case)
    return folder if isinstance(folder, str) else lambda: case.train(case.argv(out=folder / "new"))


@fault("low_disk", OUTPUT, "10 MiB free on the output disk (patched disk_usage)")
def _low_disk(case: Case) -> Action:
    return lambda: case.train(case.argv(), {"free_bytes": 10 << 20})


# Full disk, per kind of file ---------------------------------------------------------------------------------------
DISK = "full disk"
RUN_FILES = ("out/run.safetensors", "out/run-ema.safetensors", "out/run_param_groups.json", "out/run-state/*")
"""What a finished run writes, in this order, before its report: the files a fault after them may have replaced."""


def full_disk(key: str, title: str, target: str, code: str = "ENOSPC", may_change: tuple[str, ...] = (),
              make_argv: Callable[[Case], list[str]] | None = None) -> None:
    """A run whose writes of files named like `target` (a regex) fail with `code` once a few bytes are in."""
    @fault(key, DISK, title, may_change=may_change)
    def setup(case: Case) -> Action:
        argv = make_argv(case) if make_argv else case.argv()
        return lambda: case.train(argv, {"full_disk": target, "errno": code})


full_disk("disk_lora", "ENOSPC writing the final LoRA", r"run\.safetensors")
full_disk("disk_ema", "EDQUOT writing the EMA file", r"run-ema\.safetensors", "EDQUOT")
full_disk("disk_param_groups", "ENOSPC writing run_param_groups.json (after the LoRA and EMA: those are this run's)",
          r"run_param_groups\.json", may_change=RUN_FILES[:2])
full_disk("disk_report", "ENOSPC writing run_report.json (after the LoRA, EMA, groups and state: this run's)",
          r"run_report\.json", may_change=RUN_FILES)
full_disk("disk_latent_cache", "EFBIG writing a latent cache (new size, 128 px)", r".*_sdxl\.npz", "EFBIG",
          make_argv=lambda case: case.argv("--resolution", "128", "--min_bucket_reso", "128", "--max_bucket_reso",
                                           "192"))
full_disk("disk_te_cache", "ENOSPC rewriting a text-encoder cache (other captions)", r".*_te_outputs\.npz",
          make_argv=lambda case: case.argv("--caption_prefix", "other, "))


@fault("disk_state", DISK, "ENOSPC writing the state's optimizer.bin (after the LoRA, EMA and groups: those are this run's)",
       may_change=RUN_FILES[:3])
def _disk_state(case: Case) -> Action:
    return lambda: case.train(case.argv(), {"torch_save_full": "optimizer.bin"})


@fault("disk_output_config", DISK, "ENOSPC writing --output_config's TOML")
def _disk_output_config(case: Case) -> Action:
    return lambda: case.train(case.argv("--output_config"), {"full_disk": r"run\.toml", "errno": "ENOSPC"})


# Damaged inputs -------------------------------------------------------------------------------------------------------
MODEL = "damaged model"


def model_fault(kind: str) -> None:
    @fault(f"model_{kind}", MODEL, f"model .safetensors {kind}")
    def setup(case: Case) -> Action:
        model = case.model_copy()
        damage(model, kind)
        return lambda: case.train(case.argv(model=model))


for _kind in ("empty", "truncated", "garbage"):
    model_fault(_kind)


def ckpt_fault(kind: str) -> None:
    @fault(f"ckpt_{kind}", MODEL, f"model .ckpt {kind}")
    def setup(case: Case) -> Action:
        import torch
        from safetensors.torch import load_file

        model = case.model_copy(".ckpt")
        torch.save({"state_dict": load_file(str(case.ws.model))}, model)
        damage(model, kind)
        return lambda: case.train(case.argv(model=model))


for _kind in ("truncated", "garbage"):
    ckpt_fault(_kind)


def diffusers_fault(key: str, name: str, kind: str) -> None:
    @fault(key, MODEL, f"diffusers folder: {name} {kind}")
    def setup(case: Case) -> Action:
        folder = case.diffusers_mirror()
        damage(folder / name, kind)
        return lambda: case.train(case.argv(model=folder))


diffusers_fault("diffusers_config", "unet/config.json", "garbage")
diffusers_fault("diffusers_index", "model_index.json", "truncated")
diffusers_fault("diffusers_weights", "unet/diffusion_pytorch_model.safetensors", "truncated")
diffusers_fault("diffusers_te2_folder", "text_encoder_2/model.safetensors", "folder")


def sharded_unet(case: Case) -> Path:
    """The diffusers folder with its UNet in two shards and an index (as large models are published)."""
    from safetensors.torch import load_file, save_file

    folder = case.diffusers_mirror()
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    weights.unlink()
    names = sorted(tensors)
    weight_map = {}
    for number, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        shard = f"diffusion_pytorch_model-0000{number}-of-00002.safetensors"
        save_file({name: tensors[name] for name in part}, str(folder / "unet" / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@fault("shard_index", MODEL, "diffusers folder: UNet shard index garbage")
def _shard_index(case: Case) -> Action:
    folder = sharded_unet(case)
    damage(folder / "unet" / "diffusion_pytorch_model.safetensors.index.json", "garbage")
    return lambda: case.train(case.argv(model=folder))


@fault("shard_truncated", MODEL, "diffusers folder: UNet shard 2 of 2 truncated")
def _shard_truncated(case: Case) -> Action:
    folder = sharded_unet(case)
    damage(folder / "unet" / "diffusion_pytorch_model-00002-of-00002.safetensors", "truncated")
    return lambda: case.train(case.argv(model=folder))


WEIGHTS = "damaged --network_weights"


def lora_fault(kind: str, dim_from_weights: bool) -> None:
    title = f"--network_weights {kind}" + (" + --dim_from_weights" if dim_from_weights else "")

    @fault(f"weights_{kind}", WEIGHTS, title)
    def setup(case: Case) -> Action:
        weights = case.input_file("lora.safetensors", case.lora.read_bytes())
        damage(weights, kind)
        extra = ["--network_weights", str(weights), *(["--dim_from_weights"] if dim_from_weights else [])]
        return lambda: case.train(case.argv(*extra))


lora_fault("empty", False)
lora_fault("truncated", True)
lora_fault("jpeg", False)


def _sd15_lora() -> dict:
    import torch

    names = ["lora_te_text_model_encoder_layers_0_self_attn_q_proj",
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    return {key: value for name in names for key, value in {
        f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4),
        f"{name}.alpha": torch.tensor(4.0)}.items()}


def _lycoris() -> dict:
    import torch

    return {"lora_unet_input_blocks_4_1_proj_in.hada_w1_a": torch.zeros(4, 4)}


def _not_a_lora() -> dict:
    import torch

    return {"first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}


def foreign_fault(kind: str, make: Callable[[], dict]) -> None:
    @fault(f"weights_{kind}", WEIGHTS, f"--network_weights {kind} file + --dim_from_weights")
    def setup(case: Case) -> Action:
        from safetensors.torch import save_file

        case.inputs.mkdir(parents=True, exist_ok=True)
        weights = case.inputs / f"{kind}.safetensors"
        save_file(make(), str(weights))
        return lambda: case.train(case.argv("--network_weights", str(weights), "--dim_from_weights"))


foreign_fault("sd15", _sd15_lora)
foreign_fault("lycoris", _lycoris)
foreign_fault("random", _not_a_lora)

STATE = "damaged --resume state"
STATE_DAMAGE = (("train_state.json", "garbage"), ("optimizer.bin", "truncated"), ("scheduler.bin", "empty"),
                ("random_states_0.pkl", "jpeg"), ("custom_checkpoint_0.pkl", "garbage"),
                ("custom_checkpoint_1.pkl", "folder"), ("custom_checkpoint_2.pkl", "truncated"))
"""One damage per file of the earlier run's state (0: the LoRA, 1: the progress, 2: the EMA)."""


def state_fault(name: str, kind: str) -> None:
    @fault(f"state_{name.split('.')[0]}", STATE, f"--resume: {name} {kind}")
    def setup(case: Case) -> Action:
        damage(case.state / name, kind)
        return lambda: case.train(case.argv("--resume", str(case.state), steps=BASE_STEPS + 1))


for _name, _kind in STATE_DAMAGE:
    state_fault(_name, _kind)


@fault("state_no_ema", STATE, "--resume a state without its EMA file, with --ema_decay")
def _state_no_ema(case: Case) -> Action:
    (case.state / "custom_checkpoint_2.pkl").unlink()
    return lambda: case.train(case.argv("--resume", str(case.state), steps=BASE_STEPS + 1))


CACHE = "damaged cache"


@fault("latent_cache_damaged", CACHE, "latent caches empty / truncated / garbage / JPEG (recomputed)", expect=0,
       may_change=("data/*/*_sdxl.npz",))
def _latent_cache_damaged(case: Case) -> Action:
    for path, kind in zip(sorted(case.data.rglob("*_sdxl.npz")), ("empty", "truncated", "garbage", "jpeg")):
        damage(path, kind)
    return lambda: case.train(case.argv(name="again", steps=1))


@fault("te_cache_damaged", CACHE, "text-encoder caches empty / truncated / garbage / JPEG (recomputed)", expect=0,
       may_change=("data/*/*_te_outputs.npz",))
def _te_cache_damaged(case: Case) -> Action:
    for path, kind in zip(sorted(case.data.rglob("*_te_outputs.npz")), ("empty", "truncated", "garbage", "jpeg")):
        damage(path, kind)
    return lambda: case.train(case.argv(name="again", steps=1))


@fault("latent_cache_folder", CACHE, "a folder where a latent cache should be")
def _latent_cache_folder(case: Case) -> Action:
    damage(sorted(case.data.rglob("*_sdxl.npz"))[0], "folder")
    return lambda: case.train(case.argv(name="again", steps=1))


TOML = "damaged TOML"


@fault("toml_config_syntax", TOML, "--config_file with a TOML syntax error")
def _toml_config_syntax(case: Case) -> Action:
    config = case.input_file("train.toml", b'learning_rate = 1e-3\noutput_name = "unterminated\n')
    return lambda: case.train(case.argv("--config_file", str(config)))


@fault("toml_config_key", TOML, "--config_file with an unknown key")
def _toml_config_key(case: Case) -> Action:
    config = case.input_file("train.toml", b"learning_rate = 1e-3\nlearning_rat = 2e-3\n")
    return lambda: case.train(case.argv("--config_file", str(config)))


@fault("toml_config_binary", TOML, "--config_file is a JPEG")
def _toml_config_binary(case: Case) -> Action:
    config = case.input_file("train.toml", jpeg_bytes())
    return lambda: case.train(case.argv("--config_file", str(config)))


@fault("toml_dataset_syntax", TOML, "--dataset_config with a TOML syntax error")
def _toml_dataset_syntax(case: Case) -> Action:
    config = case.input_file("dataset.toml", b"[[datasets]]\nresolution = [64, 64\n")
    return lambda: case.train(case.argv("--dataset_config", str(config), data=None))


@fault("toml_dataset_value", TOML, "--dataset_config with a wrong value type")
def _toml_dataset_value(case: Case) -> Action:
    text = f'[[datasets]]\nresolution = "big"\n[[datasets.subsets]]\nimage_dir = "{case.data / "1_toy"}"\n'
    config = case.input_file("dataset.toml", text.encode())
    return lambda: case.train(case.argv("--dataset_config", str(config), data=None))


@fault("toml_prompts_syntax", TOML, "--sample_prompts .toml with a syntax error")
def _toml_prompts_syntax(case: Case) -> Action:
    prompts = case.input_file("prompts.toml", b'[prompt]\nwidth = 64\n[[prompt.subset]]\nprompt = "a red\n')
    return lambda: case.train(case.argv("--sample_prompts", str(prompts), "--sample_every_n_steps", "1"))


# Bad flags -------------------------------------------------------------------------------------------------------------
FLAGS = "bad flag"
flags_fault("unknown_flag", FLAGS, "an unknown flag (--learning_rte)", "--learning_rte", "1e-3")
flags_fault("network_args_value", FLAGS, "--network_args conv_dim=abc", "--network_args", "conv_dim=abc")
flags_fault("network_args_form", FLAGS, "--network_args without key=value (conv_dim)", "--network_args", "conv_dim")
flags_fault("network_args_unknown", FLAGS, "--network_args with an unknown key", "--network_args", "no_such_arg=1")
flags_fault("optimizer_unknown", FLAGS, "--optimizer_type NoSuchOptimizer", "--optimizer_type", "NoSuchOptimizer")
flags_fault("resolution_text", FLAGS, "--resolution abc", "--resolution", "abc")
flags_fault("mixed_precision_choice", FLAGS, "--mixed_precision fp8", "--mixed_precision", "fp8")
flags_fault("unet_and_te_only", FLAGS, "--network_train_unet_only with --network_train_text_encoder_only",
            "--network_train_text_encoder_only")

# Missing things ----------------------------------------------------------------------------------------------------
MISSING = "missing path"


@fault("missing_data", MISSING, "--train_data_dir does not exist")
def _missing_data(case: Case) -> Action:
    return lambda: case.train(case.argv(data=case.root / "no_such_folder"))


@fault("empty_data", MISSING, "--train_data_dir has no images")
def _empty_data(case: Case) -> Action:
    (case.inputs / "empty").mkdir(parents=True)
    return lambda: case.train(case.argv(data=case.inputs / "empty"))


@fault("missing_model", MISSING, "--pretrained_model_name_or_path does not exist")
def _missing_model(case: Case) -> Action:
    return lambda: case.train(case.argv(model=case.root / "no_such_model.safetensors"))


@fault("missing_resume", MISSING, "--resume folder does not exist")
def _missing_resume(case: Case) -> Action:
    return lambda: case.train(case.argv("--resume", str(case.out / "no_such-state")))


@fault("missing_weights", MISSING, "--network_weights file does not exist")
def _missing_weights(case: Case) -> Action:
    return lambda: case.train(case.argv("--network_weights", str(case.root / "no_such_lora.safetensors")))


@fault("missing_config", MISSING, "--config_file does not exist")
def _missing_config(case: Case) -> Action:
    return lambda: case.train(case.argv("--config_file", str(case.root / "no_such.toml")))


IMAGES = "broken image"


@fault("image_garbage", IMAGES, "an image file of random bytes")
def _image_garbage(case: Case) -> Action:
    damage(sorted(case.data.rglob("*.png"))[1], "garbage")
    return lambda: case.train(case.argv())


@fault("image_truncated", IMAGES, "an image cut in half, its caches removed")
def _image_truncated(case: Case) -> Action:
    image = sorted(case.data.rglob("*.png"))[1]
    for cache in image.parent.glob(f"{image.stem}_*.npz"):
        cache.unlink()
    damage(image, "truncated")
    return lambda: case.train(case.argv())


# --- The matrix --------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    number: int
    key: str
    group: str
    title: str
    exit: int | None
    expected: int
    line: str
    traceback: bool
    files: str
    files_ok: bool
    note: str
    seconds: float
    skipped: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.skipped) or (not self.traceback and self.files_ok and self.exit == self.expected)


def select(pattern: str | None) -> list[Fault]:
    """Faults whose key, class or title contains `pattern` (a regular expression; all when None)."""
    if not pattern:
        return list(FAULTS)
    found = re.compile(pattern, re.IGNORECASE)
    return [f for f in FAULTS if found.search(f.key) or found.search(f.group) or found.search(f.title)]


def run_fault(ws: Workspace, item: Fault, number: int) -> Row:
    """Copy the earlier files into a fresh case folder, set the fault up, snapshot, run it, snapshot again."""
    root = ws.root / "cases" / f"{number:02d}-{item.key}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    case = Case(ws, root / "files", root / "log")
    shutil.copytree(ws.out, case.out, symlinks=True)
    shutil.copytree(ws.data, case.data, symlinks=True)
    started = time.monotonic()
    try:
        action = item.setup(case)
        if isinstance(action, str):
            return Row(number, item.key, item.group, item.title, None, item.expect, "", False, "", True, "", 0.0,
                       skipped=action)
        before = snapshot(case.root)
        outcome = action()
        changes = compare(before, snapshot(case.root), item.may_change)
    except Exception as error:  # noqa: BLE001 - the harness's own failure is this row's, the others still run
        return Row(number, item.key, item.group, item.title, None, item.expect, f"harness error: {error!r}", False,
                   "-", False, "", round(time.monotonic() - started, 1))
    finally:
        for cleanup in reversed(case.cleanups):
            cleanup()
    (root / "result.stdout").write_text(outcome.stdout)
    (root / "result.stderr").write_text(outcome.stderr)
    return Row(number, item.key, item.group, item.title, outcome.rc, item.expect, message_line(outcome),
               has_traceback(outcome), changes.describe(), changes.ok, outcome.note,
               round(time.monotonic() - started, 1))


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| # | class | fault | exit | line | traceback? | earlier files |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.skipped:
            lines.append(f"| {row.number} | {row.group} | {row.title} | skipped | {_cell(row.skipped)} | - | - |")
            continue
        exit_ = str(row.exit) if row.exit == row.expected else f"**{row.exit}** (expected {row.expected})"
        line = _cell(row.line) + (f" _({_cell(row.note)})_" if row.note else "")
        lines.append(f"| {row.number} | {row.group} | {_cell(row.title)} | {exit_} | {line} | "
                     f"{'**yes**' if row.traceback else 'no'} | {_cell(row.files)} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def run_matrix(ws: Workspace, faults: Sequence[Fault], progress: Callable[[Row], None] = lambda row: None
               ) -> tuple[list[Row], bool]:
    """Run `faults` in turn; returns the rows and whether the shared model, data and earlier run stayed intact."""
    shared_before = {name: snapshot(path) for name, path in (("model", ws.model.parent), ("data", ws.data),
                                                             ("earlier", ws.out))}
    rows = []
    for item in faults:
        rows.append(run_fault(ws, item, FAULTS.index(item) + 1))  # numbered as in the full table
        progress(rows[-1])
    shared_after = {name: snapshot(path) for name, path in (("model", ws.model.parent), ("data", ws.data),
                                                            ("earlier", ws.out))}
    return rows, shared_before == shared_after


# --- The in-process runner (`--child`) -------------------------------------------------------------------------------
class FillingFile(io.FileIO):
    """A file on a disk with `room` bytes left: writes fill it, then fail with `code` (as the OS does)."""

    room = 8
    code = errno.ENOSPC

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        left = self.room - self.tell()
        if len(data) > left:
            super().write(data[: max(left, 0)])
            raise OSError(self.code, os.strerror(self.code))
        return super().write(data)


def apply_patch(patch: dict) -> None:
    """Make this process see a full disk for some files, or a tiny free-disk figure."""
    if "full_disk" in patch:
        import library.atomic as atomic

        real, pattern, code = atomic._open_for_writing, patch["full_disk"], getattr(errno, patch["errno"])

        def opener(path):
            target = atomic.parse_temp_name(Path(path).name)
            if target is not None and re.fullmatch(pattern, target[0]):
                handle = FillingFile(path, "wb")
                handle.code = code
                return handle
            return real(path)

        atomic._open_for_writing = opener
    if "torch_save_full" in patch:
        import torch

        real_save, name = torch.save, patch["torch_save_full"]

        def save(obj, f, *args, **kwargs):
            if str(f).endswith(name):
                Path(f).write_bytes(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    if "free_bytes" in patch:
        import library.output_checks as output_checks

        real_usage, free = shutil.disk_usage, patch["free_bytes"]
        output_checks.shutil.disk_usage = lambda path: real_usage(path)._replace(free=free)


def child_main(patch: str, argv: list[str]) -> int:
    apply_patch(json.loads(patch))
    import train_network

    return train_network.run(argv)


# --- Command line ------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child_main(argv[1], argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the model, data, earlier run and case folders here (reused on the next call)")
    parser.add_argument("--only", default=None, help="run the faults whose key, class or title matches this regex")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON to this file")
    parser.add_argument("--list", action="store_true", help="list the faults and stop")
    args = parser.parse_args(argv)
    faults = select(args.only)
    if args.list:
        for item in faults:
            print(f"{FAULTS.index(item) + 1:3d}  {item.key:24s} {item.group:26s} {item.title}")
        return 0
    if not faults:
        parser.error(f"--only {args.only!r} matches no fault (see --list)")
    with tempfile.TemporaryDirectory(prefix="fault_table_") as scratch:
        root = args.workdir or Path(scratch)
        started = time.monotonic()
        print(f"preparing the tiny model, data and earlier run in {root} ...", file=sys.stderr, flush=True)
        ws = prepare_workspace(root)

        def progress(row: Row) -> None:
            state = "skipped" if row.skipped else ("ok" if row.ok else "FAILED")
            print(f"[{row.number:2d}] {row.key}: exit {row.exit}, {state} ({row.seconds:.0f} s)", file=sys.stderr,
                  flush=True)

        rows, shared_intact = run_matrix(ws, faults, progress)
        seconds = time.monotonic() - started
    print(markdown(rows))
    bad = [row for row in rows if not row.ok]
    print(f"\n{len(rows)} faults ({sum(bool(r.skipped) for r in rows)} skipped) in {seconds:.0f} s; "
          f"{len(bad)} failed{': ' + ', '.join(r.key for r in bad) if bad else ''}; shared model, data and earlier "
          f"run {'unchanged' if shared_intact else 'CHANGED'}")
    if args.json is not None:
        args.json.write_text(json.dumps({"seconds": round(seconds, 1), "shared_intact": shared_intact,
                                         "rows": [asdict(row) | {"ok": row.ok} for row in rows]}, indent=1) + "\n")
    return 0 if not bad and shared_intact else 1


if __name__ == "__main__":
    sys.exit(main())
