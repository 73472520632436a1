"""The machinery of bench/fault_table.py: the earlier run's files, a case folder per fault, running a fault as a
real process (or through the patching runner `child_main`), reading what it printed, and the snapshots that show
whether an earlier file changed. The faults themselves are in bench/fault_catalogue.py."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import errno  # noqa: E402
import fnmatch  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

OUTPUT_NAME = "run"
BASE_STEPS = 2
RUN_FLAGS: tuple[str, ...] = (
    "--network_module",
    "networks.lora",
    "--network_dim",
    "4",
    "--resolution",
    "64",
    "--enable_bucket",
    "--min_bucket_reso",
    "64",
    "--max_bucket_reso",
    "128",
    "--caption_extension",
    ".txt",
    "--train_batch_size",
    "2",
    "--max_data_loader_n_workers",
    "0",
    "--seed",
    "42",
    "--learning_rate",
    "1e-3",
    "--network_train_unet_only",
    "--cache_latents",
    "--cache_latents_to_disk",
    "--cache_text_encoder_outputs",
    "--cache_text_encoder_outputs_to_disk",
    "--ema_decay",
    "0.9",
    "--save_state",
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


def run_argv(
    model: Path, data: Path | None, out: Path, *extra: str, name: str = OUTPUT_NAME, steps: int = BASE_STEPS
) -> list[str]:
    """A training command line of this matrix (later flags win, so `extra` can change any of RUN_FLAGS)."""
    data_flags = ["--train_data_dir", str(data)] if data is not None else []
    return [
        "--pretrained_model_name_or_path",
        str(model),
        *data_flags,
        "--output_dir",
        str(out),
        "--output_name",
        name,
        "--max_train_steps",
        str(steps),
        *RUN_FLAGS,
        *extra,
    ]


def prepare_workspace(root: Path) -> Workspace:
    """The tiny model, the data set and one good finished run in `root` (reused when a previous call made them)."""
    from tools.make_demo_dataset import make_demo_dataset
    from tools.make_tiny_sdxl import TINY_DIFFUSERS_DIR, TINY_SINGLE_FILE, write_tiny_sdxl

    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(
        root, root / "model" / TINY_SINGLE_FILE, root / "model" / TINY_DIFFUSERS_DIR, root / "data", root / "earlier"
    )
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
    env.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONDONTWRITEBYTECODE="1",
        TQDM_MININTERVAL="0",
    )
    return env


def run_process(cmd: Sequence[str], timeout: float = PROCESS_TIMEOUT) -> Outcome:
    try:
        done = subprocess.run(
            list(cmd),
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as expired:
        return Outcome(None, _text(expired.stderr), _text(expired.stdout), f"killed after {timeout:.0f} s")
    return Outcome(done.returncode, done.stderr, done.stdout)


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def train_cmd(argv: Sequence[str], patch: dict | None = None) -> list[str]:
    """`python train_network.py ARGV`, or with `patch` this script's in-process runner (see `child_main`)."""
    if patch is None:
        return [sys.executable, str(REPO / "train_network.py"), *argv]
    return [sys.executable, str(REPO / "bench" / "fault_table.py"), "--child", json.dumps(patch), "--", *argv]


class Started:
    """A training process whose output goes to files (so the harness can wait for a line, then signal it)."""

    def __init__(self, argv: Sequence[str], logs: Path) -> None:
        self.out_path, self.err_path = Path(f"{logs}.stdout"), Path(f"{logs}.stderr")
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                train_cmd(argv), cwd=REPO, env=child_env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL
            )

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

    def kill(self) -> None:
        """`kill -9` on POSIX, TerminateProcess on Windows: the process gets no chance to clean up."""
        if self.proc.poll() is None:
            self.proc.kill()

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
    return Changes(
        [p for p in differ if not allowed(p)],
        [p for p in gone if not allowed(p)],
        [p for p in after if p not in before],
        [p for p in differ + gone if allowed(p)],
    )


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

    def argv(
        self,
        *extra: str,
        model: Path | None = None,
        data: Path | None | bool = True,
        out: Path | None = None,
        name: str = OUTPUT_NAME,
        steps: int = BASE_STEPS,
    ) -> list[str]:
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
    number: int
    """Its place in the catalogue (the table's #, also with --only)."""
    key: str
    group: str
    title: str
    setup: Callable[[Case], Action | str]
    """Prepares the case (damages a file...) and returns what to run, or a reason to skip the fault here."""
    expect: int = 2
    may_change: tuple[str, ...] = ()
    """Case-relative patterns of files this fault may change, with a reason in the title (a damaged cache
    recomputed, files this run finished before the fault)."""


# --- The matrix -------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    number: int
    key: str
    group: str
    title: str
    exit: int | None
    expected: int
    line: str
    """The trainer's last own line (`message_line`), paths inside the case folder made relative to it."""
    traceback: bool
    files: str
    files_ok: bool
    note: str
    seconds: float
    skipped: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.skipped) or (not self.traceback and self.files_ok and self.exit == self.expected)


def select(faults: Sequence[Fault], pattern: str | None) -> list[Fault]:
    """The faults whose key, class or title contains `pattern` (a regular expression; all when None)."""
    if not pattern:
        return list(faults)
    found = re.compile(pattern, re.IGNORECASE)
    return [f for f in faults if found.search(f.key) or found.search(f.group) or found.search(f.title)]


def run_fault(ws: Workspace, item: Fault) -> Row:
    """Copy the earlier files into a fresh case folder, set the fault up, snapshot, run it, snapshot again."""
    number = item.number
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
            return Row(
                number,
                item.key,
                item.group,
                item.title,
                None,
                item.expect,
                "",
                False,
                "",
                True,
                "",
                0.0,
                skipped=action,
            )
        before = snapshot(case.root)
        outcome = action()
        changes = compare(before, snapshot(case.root), item.may_change)
    except Exception as error:  # noqa: BLE001 - the harness's own failure is this row's, the others still run
        return Row(
            number,
            item.key,
            item.group,
            item.title,
            None,
            item.expect,
            f"harness error: {error!r}",
            False,
            "-",
            False,
            "",
            round(time.monotonic() - started, 1),
        )
    finally:
        for cleanup in reversed(case.cleanups):
            cleanup()
    (root / "result.stdout").write_text(outcome.stdout)
    (root / "result.stderr").write_text(outcome.stderr)
    shown = message_line(outcome).replace(f"{case.root}/", "").replace(str(ws.root), "<workdir>")  # short paths
    return Row(
        number,
        item.key,
        item.group,
        item.title,
        outcome.rc,
        item.expect,
        shown,
        has_traceback(outcome),
        changes.describe(),
        changes.ok,
        outcome.note,
        round(time.monotonic() - started, 1),
    )


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| # | class | fault | exit | line | traceback? | earlier files |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.skipped:
            lines.append(f"| {row.number} | {row.group} | {row.title} | skipped | {_cell(row.skipped)} | - | - |")
            continue
        exit_ = str(row.exit) if row.exit == row.expected else f"**{row.exit}** (expected {row.expected})"
        line = _cell(row.line) + (f" _({_cell(row.note)})_" if row.note else "")
        lines.append(
            f"| {row.number} | {row.group} | {_cell(row.title)} | {exit_} | {line} | "
            f"{'**yes**' if row.traceback else 'no'} | {_cell(row.files)} |"
        )
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def run_matrix(
    ws: Workspace, faults: Sequence[Fault], progress: Callable[[Row], None] = lambda row: None
) -> tuple[list[Row], bool]:
    """Run `faults` in turn; returns the rows and whether the shared model, data and earlier run stayed intact."""
    shared_before = {
        name: snapshot(path) for name, path in (("model", ws.model.parent), ("data", ws.data), ("earlier", ws.out))
    }
    rows = []
    for item in faults:
        rows.append(run_fault(ws, item))
        progress(rows[-1])
    shared_after = {
        name: snapshot(path) for name, path in (("model", ws.model.parent), ("data", ws.data), ("earlier", ws.out))
    }
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
        import library.files.atomic as atomic

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
        import library.files.output_checks as output_checks

        real_usage, free = shutil.disk_usage, patch["free_bytes"]
        output_checks.shutil.disk_usage = lambda path: real_usage(path)._replace(free=free)


def child_main(patch: str, argv: list[str]) -> int:
    apply_patch(json.loads(patch))
    import train_network

    return train_network.run(argv)
