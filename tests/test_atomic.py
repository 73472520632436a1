"""Atomic writes: a failed write leaves the old file as it was and no temporary file behind."""

import os

import pytest
import torch

from library.files.atomic import atomic_path, write_text_atomic
from library.files.lora_io import load_lora_file, save_lora_file


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_successful_write_replaces_with_normal_permissions(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_lora_file_round_trip_casts_every_tensor(tmp_path):
    path = tmp_path / "l.safetensors"
    state = {
        "m.lora_down.weight": torch.randn(4, 8),
        "m.lora_up.weight": torch.randn(8, 4),
        "m.alpha": torch.tensor(1.0),
    }
    save_lora_file(state, path, torch.bfloat16, {"ss_network_dim": "4", "other": "x"})
    tensors, metadata = load_lora_file(path)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert tensors["m.alpha"].dim() == 0
    assert metadata["ss_network_dim"] == "4" and metadata["other"] == "x"
    # The A1111 hashes ignore non-ss_ metadata.
    save_lora_file(state, tmp_path / "m.safetensors", torch.bfloat16, {"ss_network_dim": "4", "other": "y"})
    other = load_lora_file(tmp_path / "m.safetensors")[1]
    assert other["sshs_model_hash"] == metadata["sshs_model_hash"]


def test_unwritable_cache_folder_is_one_line(tmp_path):
    import numpy as np

    from library.errors import UserInputError
    from library.files.atomic import write_npz_atomic

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(UserInputError, match="cannot write latent cache .*drop --cache_latents_to_disk"):
        write_npz_atomic(
            blocker / "a.npz", {"latents": np.zeros(2)}, what="latent cache", flag="--cache_latents_to_disk"
        )
    write_npz_atomic(tmp_path / "ok.npz", {"latents": np.ones(2)}, what="latent cache", flag="--x")
    assert np.load(tmp_path / "ok.npz")["latents"].tolist() == [1.0, 1.0]
