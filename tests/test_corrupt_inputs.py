"""Every file the run reads may be damaged: the model (single file, .ckpt, diffusers folder with its configs,
tokenizers, .bin and sharded weights), the LoRA of --network_weights, and every file of a --resume state folder.
Each damage (empty, truncated, garbage, another file type, a folder in its place) stops the run through
`main(argv)` with exit code 2 and one line naming the file, before the model loads, never with a traceback.
Damaged latent and text-encoder caches are recomputed with a warning and rewritten."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_network
from library.files.atomic import parse_temp_name, temp_affixes
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset

DAMAGES = ("empty", "truncated", "garbage", "jpeg", "folder")


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def damage(path: Path, kind: str) -> None:
    """Replace the file at `path` (a real file, or a symlink to the pristine one) by a damaged one."""
    original = path.read_bytes()
    path.unlink()
    if kind == "folder":
        path.mkdir()
        return
    data = {
        "empty": b"",
        "truncated": original[: len(original) // 2],
        "garbage": random.Random(len(original)).randbytes(max(len(original), 64)),
        "jpeg": _jpeg_bytes(),
    }[kind]
    path.write_bytes(data)


def _mirror(source: Path, target: Path) -> Path:
    """A folder like `source` whose files are symlinks to its files (cheap to build, one file replaced per test)."""
    for item in source.rglob("*"):
        dest = target / item.relative_to(source)
        if item.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(item)
    return target


def _fails_with_one_line(argv: list[str], capsys, *names: Path, after_progress_bars: bool = False) -> str:
    """Exit code 2, one `error:` line naming one of `names`, nothing else on stderr (but the progress bars of a
    run that got as far as caching, when `after_progress_bars`), no traceback."""
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert len(lines) == 1 or after_progress_bars and all("it/s]" in line or "img/s]" in line for line in lines[:-1])
    assert any(str(name) in errors[0] for name in names), (errors[0], names)
    return errors[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """The check must stop the run before the model loads: loading it fails the test."""
    import library.train.setup_parts

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: the damaged file was not found at start-up")

    monkeypatch.setattr(library.train.setup_parts, "load_sdxl", refuse)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corrupt_data")
    make_demo_dataset(root, count=4, min_side=64, max_side=64, repeats=1, name="toy", seed=7)
    return root


@pytest.fixture(scope="module")
def model_variants(tiny_sdxl, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as a .ckpt, and as diffusers folders with a .bin UNet and with a sharded UNet."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("model_variants")
    ckpt = root / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_sdxl.single_file))}, ckpt)
    pristine = tiny_sdxl.diffusers_dir
    as_bin = root / "bin_unet"
    shutil.copytree(pristine, as_bin)
    unet = load_file(str(as_bin / "unet" / "diffusion_pytorch_model.safetensors"))
    (as_bin / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(unet, as_bin / "unet" / "diffusion_pytorch_model.bin")
    sharded = root / "sharded_unet"
    shutil.copytree(pristine, sharded)
    (sharded / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    names = sorted(unet)
    weight_map = {}
    for index, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"diffusion_pytorch_model-0000{index + 1}-of-00002.safetensors"
        save_file({name: unet[name] for name in part}, str(sharded / "unet" / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return {"ckpt": ckpt, "diffusers": pristine, "bin": as_bin, "sharded": sharded}


def test_the_variants_are_intact(tiny_sdxl, model_variants):
    from library.model.model_files import check_model_files

    for path in [tiny_sdxl.single_file, *model_variants.values()]:
        shapes = check_model_files(path)
        tables = [shapes.single_file] if shapes.single_file is not None else list(shapes.components.values())
        assert sum(len(table) for table in tables) > 1000


# --- The model -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_damaged_single_file(tiny_sdxl, model_variants, data, tmp_path, capsys, no_model_load, kind, suffix):
    model = tmp_path / f"model{suffix}"
    shutil.copyfile(tiny_sdxl.single_file if suffix == ".safetensors" else model_variants["ckpt"], model)
    damage(model, kind)
    line = _fails_with_one_line(tiny_train_argv(model, data, tmp_path / "out"), capsys, model)
    assert line.startswith("error: --pretrained_model_name_or_path")
    if suffix == ".ckpt" and kind in ("garbage", "jpeg"):  # not unpickling's own words (IndexError, ...)
        assert "checkpoint (its bytes are neither a zip archive nor a pickle)" in line
    assert not (tmp_path / "out").exists()


FOLDER_FILES = {
    "diffusers": [
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder_2/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
    ],
    "bin": ["unet/diffusion_pytorch_model.bin"],
    "sharded": [
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
    ],
}


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("variant, name", [(v, n) for v, names in FOLDER_FILES.items() for n in names])
def test_damaged_file_of_a_diffusers_folder(model_variants, data, tmp_path, capsys, no_model_load, variant, name, kind):
    folder = _mirror(model_variants[variant], tmp_path / "model")
    damage(folder / name, kind)
    line = _fails_with_one_line(tiny_train_argv(folder, data, tmp_path / "out"), capsys, folder / name)
    assert line.startswith("error: --pretrained_model_name_or_path")


def test_damaged_config_of_a_single_file_is_named(tiny_sdxl, data, tmp_path, capsys, no_model_load):
    """A single file's configs come from the folder beside it: a damaged one there is named too."""
    model = tmp_path / "m.safetensors"
    model.symlink_to(tiny_sdxl.single_file)
    configs = _mirror(tiny_sdxl.diffusers_dir, tmp_path / "m_diffusers")
    damage(configs / "unet" / "config.json", "truncated")
    _fails_with_one_line(tiny_train_argv(model, data, tmp_path / "out"), capsys, configs / "unet" / "config.json")


# --- --network_weights -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_file(tiny_models, tmp_path_factory) -> Path:
    from networks.lora import create_network

    path = tmp_path_factory.mktemp("lora") / "l.safetensors"
    network = create_network(
        1.0, 4, 1.0, None, [tiny_models.text_encoder1, tiny_models.text_encoder2], tiny_models.unet
    )
    network.remove_from_model()
    network.save_weights(path, torch.float16, {"ss_network_dim": "4"})
    return path


@pytest.mark.parametrize("dim_from_weights", [False, True])
@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_network_weights(tiny_sdxl, lora_file, data, tmp_path, capsys, no_model_load, kind, dim_from_weights):
    weights = tmp_path / "l.safetensors"
    shutil.copyfile(lora_file, weights)
    damage(weights, kind)
    extra = ["--network_weights", str(weights), *(["--dim_from_weights"] if dim_from_weights else [])]
    line = _fails_with_one_line(tiny_train_argv(tiny_sdxl.single_file, data, tmp_path / "out", *extra), capsys, weights)
    assert line.startswith("error: --network_weights: ") and "--dim_from_weights" not in line


def _sd15_lora() -> dict[str, torch.Tensor]:
    names = [
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    ]
    return {
        k: v
        for name in names
        for k, v in {
            f"{name}.lora_down.weight": torch.zeros(4, 320),
            f"{name}.lora_up.weight": torch.zeros(320, 4),
            f"{name}.alpha": torch.tensor(4.0),
        }.items()
    }


FOREIGN = {
    "sd15": (_sd15_lora, "is a LoRA for SD 1.x/2.x, not SDXL"),
    "random": (
        lambda: {"first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)},
        "is not a LoRA file (no *.lora_down.weight among its 1 tensors)",
    ),
    "lycoris": (lambda: {"lora_unet_input_blocks_4_1_proj_in.hada_w1_a": torch.zeros(4, 4)}, "is a LyCORIS"),
    "peft": (
        lambda: {"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 4)},
        "is a diffusers / PEFT-format LoRA",
    ),
}


@pytest.mark.parametrize("dim_from_weights", [False, True])
@pytest.mark.parametrize("kind", list(FOREIGN))
def test_lora_of_another_kind_gets_advice_that_fits(
    tiny_sdxl, data, tmp_path, capsys, no_model_load, kind, dim_from_weights
):
    from safetensors.torch import save_file

    make, expected = FOREIGN[kind]
    weights = tmp_path / f"{kind}.safetensors"
    save_file(make(), str(weights))
    extra = ["--network_weights", str(weights), *(["--dim_from_weights"] if dim_from_weights else [])]
    line = _fails_with_one_line(tiny_train_argv(tiny_sdxl.single_file, data, tmp_path / "out", *extra), capsys, weights)
    assert expected in line and "add --dim_from_weights" not in line


# --- --resume ---------------------------------------------------------------------------------------------------------
STATE_FILES = (
    "train_state.json",
    "optimizer.bin",
    "scheduler.bin",
    "random_states_0.pkl",
    "custom_checkpoint_0.pkl",
    "custom_checkpoint_1.pkl",
    "custom_checkpoint_2.pkl",
)


def _resume_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_train_argv(
        model,
        data,
        out,
        "--max_train_steps",
        "2",
        "--save_state",
        "--ema_decay",
        "0.9",
        "--optimizer_type",
        "AdamW",
        "--output_name",
        "run",
        "--cache_latents",
        *extra,
    )


@pytest.fixture(scope="module")
def state_folder(tiny_sdxl, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("state_run")
    assert train_network.main(_resume_argv(tiny_sdxl.single_file, data, out, "--max_train_steps", "1")) == 0
    state = out / "run-state"
    assert sorted(p.name for p in state.iterdir()) == sorted(STATE_FILES)
    return state


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("name", STATE_FILES)
def test_damaged_state_file(tiny_sdxl, state_folder, data, tmp_path, capsys, no_model_load, name, kind):
    state = tmp_path / "run-state"
    shutil.copytree(state_folder, state)
    damage(state / name, kind)
    argv = _resume_argv(tiny_sdxl.single_file, data, tmp_path / "out", "--resume", str(state))
    line = _fails_with_one_line(argv, capsys, state / name)
    assert line == f"error: --resume: {state / name} is damaged ({line.split(' is damaged (', 1)[1]}"
    assert line.endswith("resume from another state folder (an earlier checkpoint's -state folder)")
    assert "does not fit" not in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", STATE_FILES[1:])
def test_missing_state_file(tiny_sdxl, state_folder, data, tmp_path, capsys, no_model_load, name):
    state = tmp_path / "run-state"
    shutil.copytree(state_folder, state)
    (state / name).unlink()
    line = _fails_with_one_line(
        _resume_argv(tiny_sdxl.single_file, data, tmp_path / "out", "--resume", str(state)), capsys, state
    )
    assert name in line


def test_state_damaged_after_the_start_up_check_is_not_called_a_flag_mismatch(tiny_sdxl, state_folder, data, tmp_path):
    """A file damaged between the check and the load (a flaky network drive) is still named as damaged."""
    from library.config.build import config_from_args
    from library.config.cli import build_parser
    from library.errors import UserInputError
    from library.train.trainer import train

    state = tmp_path / "run-state"
    shutil.copytree(state_folder, state)
    cfg = config_from_args(
        build_parser().parse_args(_resume_argv(tiny_sdxl.single_file, data, tmp_path / "out", "--resume", str(state)))
    )
    damage(state / "optimizer.bin", "truncated")
    with pytest.raises(UserInputError) as raised:
        train(cfg)
    assert str(raised.value).startswith(f"--resume: {state / 'optimizer.bin'} is damaged (")
    assert "does not fit" not in str(raised.value)


# --- Caches -----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_damaged_caches_are_recomputed_and_stale_temporaries_removed(tiny_sdxl, tmp_path, caplog):
    """Each image's latent and text-encoder caches damaged another way: the run trains, warns once per file and
    rewrites them. It also removes the temporaries a killed run left in the output and beside the images."""
    from library.data.latent_cache import npz_cache_path
    from library.data.text_encoder_cache import te_cache_path

    data = tmp_path / "data"
    make_demo_dataset(data, count=4, min_side=64, max_side=64, repeats=1, name="toy", seed=8)
    images = sorted((data / "1_toy").glob("*.png"))
    valid = io.BytesIO()
    np.savez(
        valid,
        latents=np.zeros((4, 8, 8), np.float32),
        original_size=np.array([64, 64]),
        crop_ltrb=np.array([0, 0, 64, 64]),
    )
    damaged, reasons = [], {}
    for image, kind in zip(images, ("empty", "truncated", "garbage", "jpeg")):
        for cache in (npz_cache_path(image, (64, 64)), te_cache_path(image)):
            cache.write_bytes(valid.getvalue())
            damage(cache, kind)
            damaged.append(cache)
            reasons[str(cache)] = {
                "empty": "the file is empty",
                "truncated": "not a complete .npz file: File is not a zip file",
            }.get(kind, "not an .npz file")  # numpy's words for these: pickles
    out = tmp_path / "out"
    out.mkdir()
    left = []
    for folder, target in ((out, "run.safetensors"), (out, "run-state"), (data / "1_toy", "000_te_outputs.npz")):
        prefix, suffix = temp_affixes(target)
        path = folder / f"{prefix}abcdefgh{suffix.replace(str(os.getpid()), '999999999')}"
        path.write_bytes(b"half")
        os.utime(path, (0, 0))
        assert parse_temp_name(path.name) == (target, 999999999)
        left.append(path)
    argv = tiny_train_argv(
        tiny_sdxl.single_file,
        data,
        out,
        "--max_train_steps",
        "1",
        "--output_name",
        "run",
        "--cache_latents_to_disk",
        "--cache_text_encoder_outputs_to_disk",
        "--network_train_unet_only",
    )
    with caplog.at_level(logging.WARNING):
        assert train_network.main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if "recomputing it" in r.getMessage()]
    assert sorted(w.split(":", 1)[0].split(" cache ", 1)[1] for w in warnings) == sorted(str(p) for p in damaged)
    assert {w.split(" cache ", 1)[1].split(":", 1)[0]: w.split(": ", 1)[1] for w in warnings} == {
        path: f"it is damaged ({reason}); recomputing it" for path, reason in reasons.items()
    }
    for cache in damaged:
        with np.load(cache) as npz:
            assert "latents" in npz.files or "hidden_state1" in npz.files
    assert not any(path.exists() for path in left)


def test_a_folder_in_the_way_of_a_cache_is_one_line(tiny_sdxl, tmp_path, capsys):
    from library.data.latent_cache import npz_cache_path

    data = tmp_path / "data"
    make_demo_dataset(data, count=2, min_side=64, max_side=64, repeats=1, name="toy", seed=9)
    blocker = npz_cache_path(sorted((data / "1_toy").glob("*.png"))[0], (64, 64))
    blocker.mkdir()
    argv = tiny_train_argv(
        tiny_sdxl.single_file, data, tmp_path / "out", "--max_train_steps", "1", "--cache_latents_to_disk"
    )
    line = _fails_with_one_line(argv, capsys, blocker, after_progress_bars=True)
    assert line == (
        f"error: cannot write latent cache {blocker}: a folder of that name is in the way; move it away and run again"
    )
