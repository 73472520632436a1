"""A full disk during any write is one line naming the file; the file that was there before is byte-identical and
no temporary file or folder is left. The failure is made where the bytes go: every atomic writer writes through
`library.files.atomic._open_for_writing`, accelerate's state through `torch.save`; a real full tmpfs is tried too when
this runs as root."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import library.files.atomic as atomic
import train_network
from library.errors import UserInputError
from library.files.atomic import parse_temp_name
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset

FULL = "(No space left on device); files written before are intact: free space on that disk and run again"


class _FillingFile(io.FileIO):
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


@pytest.fixture
def full_disk_for(monkeypatch):
    """full_disk_for(pattern, code=ENOSPC): writes of files whose name matches `pattern` hit a full disk."""

    def arm(pattern: str, code: int = errno.ENOSPC) -> None:
        real = atomic._open_for_writing

        def opener(path: Path):
            target = parse_temp_name(Path(path).name)
            if target is not None and re.fullmatch(pattern, target[0]):
                handle = _FillingFile(path, "wb")
                handle.code = code
                return handle
            return real(path)

        monkeypatch.setattr(atomic, "_open_for_writing", opener)

    return arm


def _temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob(".*") if parse_temp_name(p.name) or ".old-" in p.name]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _expect_full(call, path: Path, what: str, folder: Path) -> None:
    before = _snapshot(folder)
    with pytest.raises(UserInputError) as raised:
        call()
    assert str(raised.value) == f"the disk is full: cannot write {what} {path} {FULL}"
    assert _snapshot(folder) == before  # the earlier file (and every other) is byte-identical
    assert _temporaries(folder) == []


# --- Each kind of file ---------------------------------------------------------------------------------------------
def test_lora_file(tmp_path, full_disk_for):
    from library.files.lora_io import save_lora_file

    path = tmp_path / "run.safetensors"
    state = {
        "m.lora_down.weight": torch.randn(4, 64),
        "m.lora_up.weight": torch.randn(64, 4),
        "m.alpha": torch.tensor(1.0),
    }
    save_lora_file(state, path, torch.float16, {"ss_network_dim": "4"})
    full_disk_for(r"run\.safetensors")
    _expect_full(
        lambda: save_lora_file({k: v + 1 for k, v in state.items()}, path, torch.float16, {}),
        path,
        "LoRA file",
        tmp_path,
    )


@pytest.mark.parametrize("code, reason", [(errno.EDQUOT, "Disk quota exceeded"), (errno.EFBIG, "File too large")])
def test_quota_and_file_size_limits_read_as_a_full_disk(tmp_path, full_disk_for, code, reason):
    from library.files.lora_io import save_lora_file

    path = tmp_path / "run.safetensors"
    full_disk_for(r"run\.safetensors", code)
    with pytest.raises(UserInputError, match=re.escape(f"the disk is full: cannot write LoRA file {path} ({reason})")):
        save_lora_file({"a": torch.zeros(100)}, path, None, {})
    assert os.listdir(tmp_path) == []


def test_ema_file(tmp_path, full_disk_for):
    from library.train.ema import LoRAEMA, save_ema_weights

    network = torch.nn.Linear(16, 16)
    ema = LoRAEMA(network, 0.9)
    path = tmp_path / "run-ema.safetensors"
    save_ema_weights(network, ema, path, torch.float32, {})
    full_disk_for(r"run-ema\.safetensors")
    ema.update()
    _expect_full(lambda: save_ema_weights(network, ema, path, torch.float32, {}), path, "EMA file", tmp_path)


class _Adapters(torch.nn.Module):
    """What LoRASaver uses of a network: state_dict and save_weights (networks.lora's is save_lora_file too)."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_down = torch.nn.Parameter(torch.randn(4, 16))

    def save_weights(self, file, dtype, metadata) -> None:
        from library.files.lora_io import save_lora_file

        save_lora_file(self.state_dict(), file, dtype, metadata)


@pytest.mark.parametrize("full", ["run", "run-ema"])
def test_lora_and_ema_files_are_replaced_together_or_not_at_all(tmp_path, full_disk_for, full):
    """A full disk on either file of the pair leaves both earlier files: never this run's LoRA beside the EMA of
    the run before."""
    from library.train.ema import LoRAEMA
    from library.train.saving import LoRASaver

    network = _Adapters()
    saver = LoRASaver(tmp_path, "run", torch.float32, ema=LoRAEMA(network, 0.9))
    saver.save_final(network, {})
    with torch.no_grad():
        network.lora_down.add_(1.0)
    saver.ema.update()
    full_disk_for(re.escape(f"{full}.safetensors"))
    _expect_full(
        lambda: saver.save_final(network, {}),
        tmp_path / f"{full}.safetensors",
        "EMA file" if full == "run-ema" else "LoRA file",
        tmp_path,
    )


def test_latent_cache(tmp_path, full_disk_for):
    from library.data.dataset import ImageRecord
    from library.data.latent_cache import save_cached_latents

    record = ImageRecord(
        path=tmp_path / "a.png",
        subset="1_a",
        class_tokens="a",
        num_repeats=1,
        caption="",
        original_size=(64, 64),
        bucket=(64, 64),
        resized_size=(64, 64),
        crop_left_top=(0, 0),
    )
    path = tmp_path / "a_0064x0064_sdxl.npz"
    save_cached_latents(path, torch.zeros(4, 8, 8), record)
    full_disk_for(r"a_0064x0064_sdxl\.npz")
    _expect_full(lambda: save_cached_latents(path, torch.ones(4, 8, 8), record), path, "latent cache", tmp_path)


def test_text_encoder_cache(tmp_path, full_disk_for):
    from library.data.text_encoder_cache import cache_text_encoder_outputs, te_cache_path

    image = tmp_path / "a.png"

    def run(value: float):
        def encode(captions):
            return torch.full((len(captions), 77, 12), value), torch.full((len(captions), 8), value)

        cache_text_encoder_outputs(
            [image],
            lambda index, epoch: "a cat",
            encode,
            num_variants=1,
            seed=0,
            length=77,
            te1_width=4,
            to_disk=True,
            model=f"m{value}",
            show_progress=False,
        )

    run(1.0)
    full_disk_for(r"a_te_outputs\.npz")
    _expect_full(lambda: run(2.0), te_cache_path(image), "text-encoder cache", tmp_path)


def test_report_and_param_groups_json(tmp_path, full_disk_for):
    from library.train.run_report import write_report
    from library.train.saving import LoRASaver
    from networks.lora import ParamGroupInfo

    saver = LoRASaver(tmp_path, "run", torch.float16)
    infos = [ParamGroupInfo("unet", "unet", False, 1e-4, 2, 10)]
    saver.save_param_groups(infos, 0.0)
    write_report(saver.report_path, {"steps": 1})
    full_disk_for(r"run_(report|param_groups)\.json")
    _expect_full(lambda: write_report(saver.report_path, {"steps": 2}), saver.report_path, "run report", tmp_path)
    _expect_full(lambda: saver.save_param_groups(infos * 2, 0.1), saver.param_groups_path, "parameter groups", tmp_path)


def test_sample_image(tmp_path, full_disk_for):
    from library.train.sampling import _save_png

    path = tmp_path / "run_000001_00_20250101000000_1.png"
    _save_png(np.zeros((8, 8, 3), np.uint8), path)
    full_disk_for(r"run_.*\.png")
    _expect_full(lambda: _save_png(np.full((64, 64, 3), 200, np.uint8), path), path, "sample image", tmp_path)


def test_output_config_through_main(tmp_path, full_disk_for, capsys):
    (tmp_path / "keep.toml").write_text("user = 1\n")
    full_disk_for(r"run\.toml")
    argv = [
        "--pretrained_model_name_or_path",
        "m.safetensors",
        "--train_data_dir",
        "d",
        "--output_dir",
        str(tmp_path),
        "--output_name",
        "run",
        "--output_config",
    ]
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: the disk is full: cannot write {tmp_path / 'run.toml'} {FULL}"
    assert os.listdir(tmp_path) == ["keep.toml"] and (tmp_path / "keep.toml").read_text() == "user = 1\n"


class _Saver(torch.nn.Module):
    """A registered object like the trainer's network: state = its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(512, 512))


def _accelerator_with_state():
    from accelerate import Accelerator

    from library.train.accelerate_compat import reset_accelerator_state
    from library.train.train_state import TrainProgress

    reset_accelerator_state()
    accelerator = Accelerator(cpu=True)
    module = _Saver()
    optimizer = torch.optim.AdamW(module.parameters())
    module.weight.grad = torch.ones_like(module.weight)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    progress = TrainProgress(step=1)
    accelerator.register_for_checkpointing(module, progress)
    return accelerator, progress


def test_state_folder(tmp_path, monkeypatch):
    """torch.save fills the disk writing optimizer.bin: one line naming it; the previous state is intact."""
    from library.train.train_state import check_resume_folder, save_state

    accelerator, progress = _accelerator_with_state()
    folder = tmp_path / "run-state"
    save_state(accelerator, folder, progress)
    real_save = torch.save

    def filling_save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.bin"):
            Path(f).write_bytes(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling_save)
    progress.step = 2
    _expect_full(lambda: save_state(accelerator, folder, progress), folder / "optimizer.bin", "state file", tmp_path)
    check_resume_folder(folder)
    assert json.loads((folder / "train_state.json").read_text())["step"] == 1


def test_state_folder_when_torch_hides_the_errno(tmp_path, monkeypatch):
    """torch.save reports a real full disk as "unexpected pos ..." (no errno): the disk itself is asked."""
    import library.train.train_state as train_state

    accelerator, progress = _accelerator_with_state()
    folder = tmp_path / "run-state"
    save_state = train_state.save_state
    save_state(accelerator, folder, progress)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if str(f).endswith("scheduler.bin"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(train_state, "full_disk_errno", lambda folder: errno.ENOSPC)
    before = _snapshot(tmp_path)
    with pytest.raises(UserInputError, match=r"^the disk is full: cannot write state file .*run-state/\w+\.(bin|pkl) "):
        save_state(accelerator, folder, progress)
    assert _snapshot(tmp_path) == before and _temporaries(tmp_path) == []
    # Not a full disk after all: the error is not disguised.
    monkeypatch.setattr(train_state, "full_disk_errno", lambda folder: None)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_state(accelerator, folder, progress)
    assert _snapshot(tmp_path) == before and _temporaries(tmp_path) == []


# --- A real full disk ------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped elsewhere)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if (
        getattr(os, "geteuid", lambda: -1)() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("mounting a tmpfs needs root")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # torch may still hold its failed file open


def test_real_full_disk(tiny_disk):
    from library.files.lora_io import save_lora_file
    from library.train.train_state import save_state

    lora = tiny_disk / "run.safetensors"
    save_lora_file({"a": torch.zeros(1000)}, lora, None, {})
    before = lora.read_bytes()
    with pytest.raises(UserInputError, match=re.escape(f"the disk is full: cannot write LoRA file {lora} {FULL}")):
        save_lora_file({"a": torch.zeros(2_000_000)}, lora, None, {})  # 8 MB
    assert lora.read_bytes() == before and _temporaries(tiny_disk) == []

    accelerator, progress = _accelerator_with_state()  # 1 MiB of weights, 2 MiB of moments
    with pytest.raises(UserInputError, match=r"^the disk is full: cannot write state file .*run-state/"):
        save_state(accelerator, tiny_disk / "run-state", progress)
    assert sorted(os.listdir(tiny_disk)) == ["run.safetensors"] and lora.read_bytes() == before


# --- Through the trainer ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("full_disk_data")
    make_demo_dataset(root, count=2, min_side=64, max_side=64, repeats=1, name="toy", seed=5)
    return root


@pytest.mark.slow
def test_training_stops_with_one_line_when_the_disk_fills(tiny_sdxl, data, tmp_path, monkeypatch, capsys):
    """Checkpoints at steps 1 and 2 with states; the disk fills writing step 2's state: exit 2, one line; step 1's
    files are untouched and resumable, nothing temporary is left."""
    from library.train.train_state import check_resume_folder

    real_save, saves = torch.save, []

    def save_filling_at_the_second_state(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.bin"):
            saves.append(f)
            if len(saves) == 2:
                Path(f).write_bytes(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_filling_at_the_second_state)
    out = tmp_path / "out"
    argv = tiny_train_argv(
        tiny_sdxl.single_file,
        data,
        out,
        "--max_train_steps",
        "3",
        "--train_batch_size",
        "1",
        "--save_every_n_steps",
        "1",
        "--save_state",
        "--output_name",
        "run",
        "--cache_latents",
    )
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    failed = out / "run-step00000002-state" / "optimizer.bin"
    assert errors == [f"error: the disk is full: cannot write state file {failed} {FULL}"] and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [
        "run-step00000001-state",
        "run-step00000001.safetensors",
        "run-step00000002.safetensors",
        "run_report.html",
        "run_report.json",
    ]  # no final file: no groups JSON; the report as of step 1's save
    check_resume_folder(out / "run-step00000001-state")
    assert _temporaries(out, data) == []
