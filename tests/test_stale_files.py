"""What a killed run leaves (temporary files and folders of its atomic writers) is removed by the next run: only
our own names, only for this output, never a user file, never a live writer's file; a previous state folder that
a killed save had moved aside comes back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from library.files.atomic import old_folder_name, parse_old_folder_name, parse_temp_name, temp_affixes
from library.files.stale_files import remove_stale_cache_temps, remove_stale_temp_files
from library.train.sampling import sample_file_name
from library.train.saving import LoRASaver, output_file_pattern

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temp_file(folder: Path, target: str, pid: int | None = None) -> Path:
    """A temporary file exactly as `library.files.atomic` names it (for another writer's pid when given)."""
    prefix, suffix = temp_affixes(target)
    if pid is not None:
        suffix = suffix.replace(str(os.getpid()), str(pid))
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.write(fd, b"half")
    os.close(fd)
    return Path(path)


def _own_names(output_name: str) -> list[str]:
    """Every file name the trainer's code gives a run, from the code that names them."""
    import torch

    saver = LoRASaver(Path("."), output_name, torch.float16)
    files = [saver.final_path, saver.epoch_path(2), saver.step_path(40)]
    names = [p.name for p in files] + [saver.ema_path(p).name for p in files]
    names += [saver.state_path(p).name for p in files]
    names += [saver.param_groups_path.name, saver.report_path.name, saver.report_page_path.name, f"{output_name}.toml"]
    names += [
        sample_file_name(output_name, step=10, epoch=None, index=1, seed=5),
        sample_file_name(output_name, step=0, epoch=3, index=0, seed=7),
    ]
    return names


def test_temp_names_parse_back_to_their_target():
    for target in ("run.safetensors", "img_0064x0064_sdxl.npz", "a.b.c", "run-000002-state"):
        prefix, suffix = temp_affixes(target)
        path = Path(tempfile.mkstemp(prefix=prefix, suffix=suffix)[1])
        try:
            assert parse_temp_name(path.name) == (target, os.getpid())
        finally:
            path.unlink()
    assert parse_temp_name(".run.safetensors.k2j4h5g6.tmp") == ("run.safetensors", None)  # before pids were added
    assert parse_temp_name(".run.safetensors.tmp") is None and parse_temp_name("run.tmp") is None
    assert parse_old_folder_name(old_folder_name("run-state", 42)) == ("run-state", 42)
    assert parse_old_folder_name(".run-state.old-x") is None


def test_own_name_pattern_matches_every_name_the_code_gives():
    own = output_file_pattern("run")
    assert all(own.fullmatch(name) for name in _own_names("run"))
    for other in _own_names("run-2") + _own_names("run2") + _own_names("xrun") + ["run.txt", "run.lock", "other.png"]:
        assert not own.fullmatch(other), other


def test_only_stale_temporaries_of_this_output_are_removed(tmp_path):
    out, sample = tmp_path, tmp_path / "sample"
    sample.mkdir()
    dead = _dead_pid()
    stale = [
        _temp_file(sample if name.endswith(".png") else out, name, dead)
        for name in _own_names("run")
        if not name.endswith("-state")
    ]
    stale.append(_temp_file(out, "run.safetensors"))  # this process's own name: no write of ours is in flight
    prefix, suffix = temp_affixes("run-step00000040-state")
    stale.append(Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=out)))
    (stale[-1] / "optimizer.bin").write_bytes(b"partial")
    stale.append(out / old_folder_name("run-000002-state", dead))  # its state folder exists: the old one goes
    stale[-1].mkdir()
    (out / "run-000002-state").mkdir()
    restored = out / old_folder_name("run-state", dead)  # its state folder is missing: it comes back
    restored.mkdir()
    (restored / "train_state.json").write_text('{"step": 3}')
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        keep = [
            _temp_file(out, "run.safetensors", live.pid),  # a live writer's
            _temp_file(out, "run-2.safetensors", dead),
            _temp_file(out, "run2.safetensors", dead),  # other outputs
            _temp_file(out, "img_0064x0064_sdxl.npz", dead),  # not an output name
            out / ".run.safetensors.tmp",
            out / "notes.tmp",
            out / ".hidden",
            out / "run.safetensors",
            out / "run.lock",
            sample / "run_000010_01_20250101000000_5.png",
        ]
        for path in keep[4:]:
            path.write_bytes(b"user")
        removed = remove_stale_temp_files(out, output_file_pattern("run"))
        live.kill()
    assert sorted(removed) == sorted(stale + [restored])
    assert all(not path.exists() for path in stale) and [p for p in keep if not p.exists()] == []
    assert json.loads((out / "run-state" / "train_state.json").read_text()) == {"step": 3}
    assert remove_stale_temp_files(out, output_file_pattern("run")) == [keep[0]]  # its writer is gone now
    assert (
        remove_stale_temp_files(out, output_file_pattern("run")) == []
        and remove_stale_temp_files(tmp_path / "missing", output_file_pattern("run")) == []
    )


def _kill_when_ready(script: str) -> int:
    """Run `script` in a child, kill -9 it when it prints "ready"; returns its pid."""
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    return child.pid


def test_killed_writer_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    target = tmp_path / "run.safetensors"
    target.write_bytes(b"the previous LoRA")
    pid = _kill_when_ready(f"""
        import time
        from library.files.atomic import atomic_file
        with atomic_file({str(target)!r}) as handle:
            handle.write(b"x" * 100_000)
            handle.flush()
            print("ready", flush=True)
            time.sleep(60)
    """)
    left = [p for p in tmp_path.iterdir() if p != target]
    assert [parse_temp_name(p.name) for p in left] == [("run.safetensors", pid)]
    assert target.read_bytes() == b"the previous LoRA"
    assert remove_stale_temp_files(tmp_path, output_file_pattern("run")) == left
    assert os.listdir(tmp_path) == ["run.safetensors"]


def test_kill_between_the_two_renames_of_a_state_save_keeps_the_last_state(tmp_path):
    """Killed after the old state stepped aside and before the new one took its place: the next run puts the
    old one back (the new one may be incomplete, so it is removed)."""
    from library.train.train_state import check_resume_folder

    folder = tmp_path / "run-state"
    _kill_when_ready(f"""
        import os, time
        import torch
        from accelerate import Accelerator
        from library.train.train_state import TrainProgress, save_state
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(model.parameters())
        prepared = accelerator.prepare(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
        progress = TrainProgress(step=1)
        accelerator.register_for_checkpointing(model, progress)
        save_state(accelerator, {str(folder)!r}, progress)
        real_replace = os.replace
        def replace_then_hang(src, dst):
            real_replace(src, dst)
            if ".old-" in str(dst):
                print("ready", flush=True)
                time.sleep(60)
        os.replace = replace_then_hang
        progress.step = 2
        save_state(accelerator, {str(folder)!r}, progress)
    """)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not folder.exists() and len(left) == 2 and any(".old-" in name for name in left)
    assert len(remove_stale_temp_files(tmp_path, output_file_pattern("run"))) == 2
    assert os.listdir(tmp_path) == ["run-state"]
    check_resume_folder(folder)
    assert json.loads((folder / "train_state.json").read_text())["step"] == 1


def test_cache_temporaries_go_once_their_writer_is_dead_and_they_are_old(tmp_path):
    images = tmp_path / "5_toy"
    images.mkdir()
    pid = _kill_when_ready(f"""
        import time
        from library.files.atomic import atomic_file
        with atomic_file({str(images / "img_0064x0064_sdxl.npz")!r}, durable=False) as handle:
            handle.write(b"x" * 1000)
            handle.flush()
            print("ready", flush=True)
            time.sleep(60)
    """)
    (left,) = images.iterdir()
    assert parse_temp_name(left.name) == ("img_0064x0064_sdxl.npz", pid)
    user = [images / "img.png", images / ".img.png.abcdefgh.1.tmp", images / "notes.tmp"]
    for path in user:
        path.write_bytes(b"user")
    te = _temp_file(images, "img_te_outputs.npz", _dead_pid())
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        writing = _temp_file(images, "other_0064x0064_sdxl.npz", live.pid)
        assert remove_stale_cache_temps([images]) == []  # too fresh: a writer elsewhere may still be at it
        an_hour_ago = time.time() - 3600
        for path in (left, te, writing, *user):
            os.utime(path, (an_hour_ago, an_hour_ago))
        assert sorted(remove_stale_cache_temps([images, images])) == sorted([left, te])
        live.kill()
    assert sorted(images.iterdir()) == sorted(user + [writing])


@pytest.mark.parametrize("name", ["run.safetensors", "run-000001-state"])
def test_pid_reuse_errs_on_keeping(tmp_path, name):
    """A temporary whose pid now belongs to a running process is kept (removed by a later run instead)."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        kept = _temp_file(tmp_path, name, live.pid)
        assert remove_stale_temp_files(tmp_path, output_file_pattern("run")) == [] and kept.exists()
        live.kill()
