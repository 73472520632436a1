"""The CLI with --max_token_length and --cache_text_encoder_outputs on the tiny SDXL, and their bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import train_network
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_demo_dataset(root, count=4, min_side=64, max_side=128, repeats=2, name="toy", seed=0)
    return root


def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_train_argv(model, data, out, "--max_train_steps", "4", "--learning_rate", "1e-3", *extra)


@pytest.mark.slow
def test_cached_text_outputs_with_variants_long_tokens_and_workers(tiny_sdxl, dataset_dir, tmp_path):
    argv = _argv(
        tiny_sdxl.single_file,
        dataset_dir,
        tmp_path / "out",
        "--network_train_unet_only",
        "--cache_latents",
        "--cache_text_encoder_outputs_to_disk",
        "--text_encoder_cache_variants",
        "3",
        "--shuffle_caption",
        "--keep_tokens",
        "1",
        "--max_token_length",
        "150",
        "--max_data_loader_n_workers",
        "2",
        "--persistent_data_loader_workers",
    )
    assert train_network.main(argv) == 0
    assert (tmp_path / "out" / "last.safetensors").is_file()
    caches = sorted((dataset_dir / "2_toy").glob("*_te_outputs.npz"))
    assert len(caches) == 4
    with np.load(caches[0]) as npz:
        assert npz["hidden_state1"].shape[0] == npz["hidden_state2"].shape[0] == 152
        captions = [str(c) for c in npz["captions"]]
        assert len(captions) == 3 and all(c.startswith("toy, ") for c in captions)
        assert {"hidden_state1_2", "hidden_state2_2", "pool2_2"} <= set(npz.files)


@pytest.mark.slow
def test_long_tokens_train_without_cache(tiny_sdxl, dataset_dir, tmp_path):
    argv = _argv(
        tiny_sdxl.single_file, dataset_dir, tmp_path / "out", "--max_token_length", "225", "--max_train_steps", "2"
    )
    assert train_network.main(argv) == 0


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--max_token_length", "100"], "--max_token_length 100 is not supported; use 75, 150 or 225"),
        (["--cache_text_encoder_outputs"], "--cache_text_encoder_outputs needs --network_train_unet_only"),
        (
            ["--cache_text_encoder_outputs_to_disk", "--network_train_unet_only", "--shuffle_caption"],
            "add --text_encoder_cache_variants N",
        ),
        (
            ["--cache_text_encoder_outputs", "--network_train_unet_only", "--text_encoder_cache_variants", "0"],
            "--text_encoder_cache_variants 0 must be at least 1",
        ),
    ],
)
def test_bad_text_flags_are_one_line(tiny_sdxl, dataset_dir, tmp_path, capsys, extra, fragment):
    assert train_network.main(_argv(tiny_sdxl.single_file, dataset_dir, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cached_text_outputs_train_like_encoding_every_step(tiny_sdxl, dataset_dir, tmp_path):
    """Same seed, fixed captions: the losses with cached outputs equal those of encoding every step."""
    from library.config.build import config_from_args
    from library.config.cli import build_parser
    from library.train.trainer import train

    losses = {}
    for name, extra in (("encoded", []), ("cached", ["--cache_text_encoder_outputs"])):
        argv = _argv(
            tiny_sdxl.single_file,
            dataset_dir,
            tmp_path / name,
            "--network_train_unet_only",
            "--cache_latents",
            "--max_token_length",
            "150",
            *extra,
        )
        losses[name] = train(config_from_args(build_parser().parse_args(argv))).losses
    assert len(losses["cached"]) == 4
    assert np.allclose(losses["cached"], losses["encoded"], rtol=1e-4, atol=1e-6), losses
