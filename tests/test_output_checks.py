"""Start-up checks of the output side: folders that cannot be written and disks too full for the first save stop
the run with one line before the model loads; the first save's size is estimated from the checkpoint's header."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import train_network
from library.errors import UserInputError
from library.files.output_checks import METADATA_BYTES, check_output_folder, estimate_first_save
from library.model.model_files import check_model_files
from networks.lora import create_network
from networks.lora_size import diffusers_lora_layers, lora_parameter_count, single_file_lora_layers
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("out_checks_data")
    make_demo_dataset(root, count=2, min_side=64, max_side=64, repeats=1, name="toy", seed=3)
    return root


def _refuse_to_load(*args, **kwargs):
    raise AssertionError("the model was loaded: the check did not stop the run at start-up")


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- The LoRA's size from the header ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "network_args, train_unet, train_te",
    [
        ({}, True, True),
        ({"conv_dim": "2", "conv_alpha": "1"}, True, True),
        ({}, True, False),
        ({}, False, True),
        ({"block_dims": ",".join(str(i % 4) for i in range(23)), "conv_block_dims": ",".join("2" * 23)}, True, True),
        ({"down_lr_weight": "1,1,1,0,0,0,1,1,1"}, True, True),
    ],
)
@pytest.mark.parametrize("layout", ["single_file", "diffusers"])
def test_parameter_count_from_the_header_matches_the_built_network(
    tiny_sdxl, tiny_models, layout, network_args, train_unet, train_te
):
    from networks.block_weights import block_dims_and_alphas, block_lr_weights

    dim = 3
    network = create_network(
        1.0, dim, 1.0, None, [tiny_models.text_encoder1, tiny_models.text_encoder2], tiny_models.unet, **network_args
    )
    network.apply_to([tiny_models.text_encoder1, tiny_models.text_encoder2], tiny_models.unet, train_te, train_unet)
    network.remove_from_model()
    expected = sum(p.numel() for p in network.state_dict().values())  # what the file holds: weights and alphas

    conv_dim = int(network_args["conv_dim"]) if "conv_dim" in network_args else None
    blocks = block_dims_and_alphas(
        network_args, dim, 1.0, conv_dim, 1.0 if conv_dim else None, block_lr_weights(network_args)
    )
    include_conv = bool(conv_dim) if blocks is None else blocks.conv_dims is not None
    path = tiny_sdxl.single_file if layout == "single_file" else tiny_sdxl.diffusers_dir
    shapes = check_model_files(path)
    if layout == "single_file":
        layers = single_file_lora_layers(shapes.single_file, include_conv)
    else:
        parts = shapes.components
        layers = diffusers_lora_layers(parts["text_encoder1"], parts["text_encoder2"], parts["unet"], include_conv)
    rank = (
        None if blocks is None else (lambda layer: (blocks.dim_and_alpha(layer.lora_name, layer.is_conv3x3) or (0,))[0])
    )
    counted, tensors = lora_parameter_count(
        layers, dim=dim, conv_dim=conv_dim, train_unet=train_unet, train_text_encoder=train_te, unet_rank=rank
    )
    assert (counted, tensors) == (expected, len(network.state_dict()))
    names = {layer.lora_name for component in layers.values() for layer in component}
    assert {lora.lora_name for lora in network.unet_loras + network.text_encoder_loras} <= names


def test_estimate_adds_the_state_and_ema(tmp_path):
    plain = estimate_first_save(1_000_000, 300, 2, ema=False, save_state=False, optimizer_type="AdamW")
    full = estimate_first_save(1_000_000, 300, 2, ema=True, save_state=True, optimizer_type="AdamW")
    lion = estimate_first_save(1_000_000, 300, 2, ema=False, save_state=True, optimizer_type="Lion")
    assert plain.lora_file == 2_000_000 + 300 * 160 + (1 << 20) and plain.total == plain.lora_file
    assert full.ema_file == full.lora_file
    assert full.state_folder - lion.state_folder == 1_000_000 * (8 + 4 - 4)  # Adam's 2 moments + EMA vs Lion's 1


def test_estimate_covers_a_real_first_save(tiny_sdxl, data, tmp_path):
    """The estimate of a run's first save (checkpoint + EMA + state) is at least the bytes written, and not
    far above them (the fixed margins aside)."""
    from library.config.build import config_from_args
    from library.config.checks import first_save_estimate
    from library.config.cli import build_parser
    from library.model.model_files import check_model_files as shapes_of
    from library.train.trainer import train

    argv = tiny_train_argv(
        tiny_sdxl.single_file,
        data,
        tmp_path,
        "--max_train_steps",
        "1",
        "--save_state",
        "--ema_decay",
        "0.9",
        "--optimizer_type",
        "AdamW",
        "--output_name",
        "e",
        "--cache_latents",
        "--save_precision",
        "fp16",
        "--network_dim",
        "8",
    )
    cfg = config_from_args(build_parser().parse_args(argv))
    estimate = first_save_estimate(shapes_of(tiny_sdxl.single_file), cfg.network, "AdamW", cfg.output, with_ema=True)
    train(cfg)
    lora, ema = (tmp_path / "e.safetensors").stat().st_size, (tmp_path / "e-ema.safetensors").stat().st_size
    state = sum(f.stat().st_size for f in (tmp_path / "e-state").iterdir())
    # Never below what was written; without the fixed metadata allowance, close to it.
    assert lora <= estimate.lora_file and estimate.lora_file - METADATA_BYTES <= 1.1 * lora, (estimate, lora)
    assert ema <= estimate.ema_file
    assert state <= estimate.state_folder, (estimate, state)
    assert 0.8 * state <= estimate.state_folder - 2 * METADATA_BYTES <= 1.1 * state, (estimate, state)


# --- Unusable folders -------------------------------------------------------------------------------------------------
def test_output_dir_that_is_a_file_is_one_line(tiny_sdxl, data, tmp_path, capsys):
    blocker = tmp_path / "out"
    blocker.write_bytes(b"user file")
    assert train_network.main(tiny_train_argv(tiny_sdxl.single_file, data, blocker)) == 2
    line = _one_error(capsys)
    assert line == f"error: --output_dir {blocker} is a file, not a folder: give a folder (it is created when missing)"
    assert blocker.read_bytes() == b"user file"


def test_output_dir_under_a_file_is_one_line(tiny_sdxl, data, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert train_network.main(tiny_train_argv(tiny_sdxl.single_file, data, tmp_path / "f" / "out")) == 2
    assert _one_error(capsys).endswith(f"cannot be created: {tmp_path / 'f'} is a file, not a folder")


def test_logging_dir_that_is_a_file_is_one_line(tiny_sdxl, data, tmp_path, capsys):
    (tmp_path / "logs").write_text("x")
    argv = tiny_train_argv(tiny_sdxl.single_file, data, tmp_path / "out", "--logging_dir", str(tmp_path / "logs"))
    assert train_network.main(argv) == 2
    assert _one_error(capsys).startswith(f"error: --logging_dir {tmp_path / 'logs'} is a file, not a folder")
    assert not (tmp_path / "out").exists()  # nothing created


def _read_only_folder(tmp_path: Path):
    """A folder no file can be created in: chmod for a normal user; a read-only tmpfs for root (who ignores
    permission bits). None when neither works here."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if not hasattr(os, "geteuid"):
        return None
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder, lambda: folder.chmod(0o755)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        return None
    return folder, lambda: subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("sub", ["", "new/deeper"])
def test_output_dir_that_cannot_be_written_is_one_line(tiny_sdxl, data, tmp_path, capsys, sub):
    made = _read_only_folder(tmp_path)
    if made is None:
        pytest.skip("no way to make a read-only folder here")
    folder, undo = made
    try:
        target = folder / sub if sub else folder
        assert train_network.main(tiny_train_argv(tiny_sdxl.single_file, data, target)) == 2
        line = _one_error(capsys)
        where = "is not writable" if not sub else f"cannot be created in {folder}"
        assert line.startswith(f"error: --output_dir {target} {where} (") and "give a folder you can write to" in line
        assert os.listdir(folder) == []
    finally:
        undo()


def test_probe_leaves_nothing_behind(tmp_path):
    check_output_folder(tmp_path, "--output_dir")
    check_output_folder(tmp_path / "a" / "b", "--output_dir")
    assert os.listdir(tmp_path) == []
    with pytest.raises(UserInputError):
        check_output_folder(Path(os.devnull), "--output_dir")


# --- Too little free space ------------------------------------------------------------------------------------------
def test_too_little_free_space_is_one_line_before_loading(tiny_sdxl, data, tmp_path, capsys, monkeypatch):
    import library.files.output_checks as output_checks

    real = shutil.disk_usage
    asked = []

    def nearly_full(path):
        asked.append(Path(path))
        return real(path)._replace(free=10 << 20)

    monkeypatch.setattr(output_checks.shutil, "disk_usage", nearly_full)
    monkeypatch.setattr("library.train.setup_parts.load_sdxl", _refuse_to_load)
    out = tmp_path / "out"
    argv = tiny_train_argv(
        tiny_sdxl.single_file, data, out, "--save_state", "--ema_decay", "0.9", "--max_train_steps", "1"
    )
    assert train_network.main(argv) == 2
    line = _one_error(capsys)
    assert line.startswith(f"error: --output_dir {out}: not enough free disk space for the first save: it needs about ")
    assert "LoRA file " in line and "EMA file " in line and "state folder " in line and "10.0 MiB are free" in line
    assert asked == [tmp_path] and not out.exists()
    # With room to spare the same check passes.
    monkeypatch.setattr(output_checks.shutil, "disk_usage", lambda path: real(path)._replace(free=10 << 30))
    output_checks.check_free_space(
        out, "--output_dir", estimate_first_save(10**6, 100, 4, ema=True, save_state=True, optimizer_type="AdamW")
    )
