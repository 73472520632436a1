"""Validation: the split, the flags, the fixed batches and the deterministic validation loss."""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.config.build import validation_config
from library.config.cli import add_validation_arguments
from library.data.dataset import ImageRecord, scan_train_data_dir
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.errors import UserInputError
from library.train.loss import LossOptions, make_noise_scheduler, noise_batch
from library.train.validation import (
    ValidationConfig,
    build_validation_set,
    mean_validation_loss,
    scan_validation_dir,
    split_records,
    validation_logs,
    validation_loss,
    validation_losses,
    validation_metadata,
    validation_timesteps,
)
from tools.make_demo_dataset import make_demo_dataset


def records_of(
    folders: dict[str, int], repeats: int = 3, is_reg: bool = False, dataset_index: int = 0, root: Path = Path("/data")
) -> list[ImageRecord]:
    """Fake records (no files): `folders` maps a folder name to its number of images."""
    records = []
    for folder, count in folders.items():
        options = SubsetConfig(root / folder, num_repeats=repeats, is_reg=is_reg)
        for i in range(count):
            records.append(
                ImageRecord(
                    root / folder / f"{i:03d}.png",
                    folder,
                    "toy",
                    repeats,
                    "toy",
                    (64, 64),
                    (64, 64),
                    (64, 64),
                    (0, 0),
                    options,
                    dataset_index,
                )
            )
    return records


# --- the split ------------------------------------------------------------------------------------------


def test_split_sizes_repeats_and_disjoint():
    records = records_of({"3_a": 10, "3_b": 5})
    train, val = split_records(records, 0.2, seed=1)
    assert len(val) == 2 + 1  # per folder: round(10 * 0.2), round(5 * 0.2)
    assert sorted(r.path for r in train + val) == sorted(r.path for r in records)
    assert {r.path for r in train}.isdisjoint(r.path for r in val)
    assert all(r.num_repeats == 1 for r in val) and all(r.num_repeats == 3 for r in train)
    assert [r.path for r in train] == [r.path for r in records if r.path not in {v.path for v in val}]


def test_split_is_deterministic_and_seeded():
    records = records_of({"3_a": 20})
    paths = lambda split: [r.path for r in split[1]]  # noqa: E731
    random.seed(1)
    torch.manual_seed(1)
    first = paths(split_records(records, 0.25, seed=5))
    random.seed(2)
    torch.manual_seed(2)
    assert paths(split_records(records, 0.25, seed=5)) == first  # global RNGs play no part
    assert sorted(paths(split_records(list(reversed(records)), 0.25, seed=5))) == sorted(first)  # nor the order
    assert any(paths(split_records(records, 0.25, seed=s)) != first for s in range(6, 10))
    moved = split_records(records_of({"3_a": 20}, root=Path("/elsewhere/data")), 0.25, seed=5)
    assert [p.name for p in paths(moved)] == [p.name for p in first]  # the dataset can move and keep its split


def test_split_keeps_at_least_one_on_each_side():
    assert len(split_records(records_of({"1_a": 3}), 0.01, seed=0)[1]) == 1  # rounds to 0: still one
    train, val = split_records(records_of({"1_a": 2}), 0.9, seed=0)  # a folder never leaves training
    assert len(train) == len(val) == 1
    with pytest.raises(UserInputError, match="leaves no training image"):
        split_records(records_of({"1_a": 1}), 0.5, seed=0)


def test_split_leaves_regularisation_images_in_training():
    records = records_of({"1_a": 4}) + records_of({"1_reg": 4}, is_reg=True)
    train, val = split_records(records, 0.5, seed=0)
    assert len(val) == 2 and not any(r.is_reg for r in val)
    assert sum(r.is_reg for r in train) == 4
    with pytest.raises(UserInputError):  # only regularisation images would be left to train on
        split_records(records_of({"1_a": 1}) + records_of({"1_reg": 4}, is_reg=True), 0.5, seed=0)


def test_split_zero_is_no_split():
    records = records_of({"1_a": 4})
    assert split_records(records, 0.0, seed=0) == (records, [])


# --- flags -------------------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_validation_arguments(parser)
    parser.add_argument("--min_timestep", type=int, default=None)
    parser.add_argument("--max_timestep", type=int, default=None)
    return parser.parse_args(list(argv))


def test_config_defaults_and_values(tmp_path):
    cfg = validation_config(parse(), seed=42)
    assert not cfg.enabled and cfg.seed == 42 and cfg.timesteps == (200, 400, 600, 800)
    assert not cfg.is_due(5) and not cfg.is_due(5, epoch_end=1)
    cfg = validation_config(
        parse(
            "--validation_split",
            "0.1",
            "--validation_seed",
            "7",
            "--max_validation_steps",
            "3",
            "--min_timestep",
            "100",
            "--max_timestep",
            "900",
        ),
        seed=42,
    )
    assert (cfg.split, cfg.seed, cfg.max_steps, cfg.timesteps) == (0.1, 7, 3, (260, 420, 580, 740))
    cfg = validation_config(parse("--validation_data_dir", str(tmp_path)), seed=0)
    assert cfg.enabled and cfg.data_dir == tmp_path


def test_is_due_follows_sd_scripts():
    every_epoch = ValidationConfig(split=0.1)
    assert [every_epoch.is_due(s) for s in (1, 2)] == [False, False]
    assert every_epoch.is_due(10, epoch_end=1) and every_epoch.is_due(20, epoch_end=2)
    cfg = ValidationConfig(split=0.1, every_n_steps=3, every_n_epochs=2)
    assert [s for s in range(0, 10) if cfg.is_due(s)] == [3, 6, 9]
    assert [e for e in range(1, 6) if cfg.is_due(0, epoch_end=e)] == [2, 4]


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--validation_split", "1.0"), "must be in \\[0, 1\\)"),
        (("--validation_split", "-0.1"), "must be in \\[0, 1\\)"),
        (("--validate_every_n_steps", "10"), "needs validation images"),
        (("--validate_every_n_epochs", "1"), "needs validation images"),
        (("--validation_split", "0.1", "--validate_every_n_steps", "0"), "at least 1"),
        (("--validation_split", "0.1", "--max_validation_steps", "0"), "at least 1"),
        (("--validation_data_dir", "/no/such/folder"), "is not a folder"),
    ],
)
def test_config_errors_are_one_line(argv, message):
    with pytest.raises(UserInputError, match=message) as error:
        validation_config(parse(*argv), seed=0)
    assert "\n" not in str(error.value)


def test_config_refuses_both_sources(tmp_path):
    with pytest.raises(UserInputError, match="keep one"):
        validation_config(parse("--validation_split", "0.1", "--validation_data_dir", str(tmp_path)), 0)


def test_timesteps_match_sd_scripts_linspace():
    import numpy as np

    for low, high in ((0, 1000), (100, 900), (0, 7), (250, 1000)):
        expected = tuple(int(t) for t in np.linspace(low, high, 6, dtype=int)[1:-1])
        assert validation_timesteps(low, high) == expected


def test_modules_import_without_torch():
    code = (
        "import sys, library.train.validation, library.train.ema; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_validation_metadata_uses_sd_scripts_keys():
    meta = validation_metadata(ValidationConfig(split=0.1, seed=3, every_n_steps=50))
    assert meta == {
        "ss_validation_seed": "3",
        "ss_validation_split": "0.1",
        "ss_max_validation_steps": "None",
        "ss_validate_every_n_epochs": "None",
        "ss_validate_every_n_steps": "50",
    }


def test_validation_logs():
    assert validation_logs(0.5) == {"loss/validation": 0.5}
    assert validation_logs(0.5, 0.25) == {"loss/validation": 0.5, "loss/validation_divergence": 0.25}


# --- the fixed batches -----------------------------------------------------------------------------------


def demo_config(root: Path, **overrides) -> DatasetConfig:
    fields = dict(
        train_data_dir=root,
        caption_extension=".txt",
        resolution=(64, 64),
        enable_bucket=True,
        min_bucket_reso=64,
        max_bucket_reso=128,
        batch_size=2,
        seed=3,
    )
    fields.update(overrides)
    return DatasetConfig(**fields)


def test_validation_set_is_fixed_and_unaugmented(tmp_path):
    make_demo_dataset(tmp_path / "train", count=8, min_side=64, max_side=128, repeats=2, name="toy", seed=0)
    cfg = demo_config(
        tmp_path / "train",
        flip_aug=True,
        random_crop=True,
        shuffle_caption=True,
        caption_dropout_rate=0.5,
        caption_tag_dropout_rate=0.5,
    )
    _, val = split_records(scan_train_data_dir(cfg), 0.5, seed=0)
    vset = build_validation_set(val, cfg, batch_size=2, seed=0)
    assert sum(len(keys) for keys in vset.batches) == len(val) == 4
    assert all(key[1:] == (0, 0) for keys in vset.batches for key in keys)
    first, second = list(vset.iter_batches()), list(vset.iter_batches())
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["images"], b["images"]) and a["captions"] == b["captions"]
    by_key = {
        key[0]: caption for keys, batch in zip(vset.batches, first) for key, caption in zip(keys, batch["captions"])
    }
    assert all(by_key[i] == vset.dataset.records[i].caption for i in by_key)  # as written: no shuffle or dropout
    for i in range(len(vset.dataset)):  # centre crop, not flipped
        example = vset.dataset[(i, 0, 0)]
        assert torch.equal(example["image"], vset.dataset.load_image_tensor(i))
    capped = build_validation_set(val, cfg, batch_size=1, seed=0, max_batches=3)
    assert len(capped) == 3


def test_scan_validation_dir(tmp_path):
    make_demo_dataset(tmp_path / "val", count=3, min_side=64, max_side=96, repeats=5, name="toy", seed=2)
    records = scan_validation_dir(demo_config(tmp_path / "train"), tmp_path / "val")
    assert len(records) == 3 and all(r.num_repeats == 1 and not r.is_reg for r in records)


# --- the loss ------------------------------------------------------------------------------------------------


class FakeModel:
    """`prediction = weight * noisy latents`, the plain epsilon MSE; records the timesteps it is given."""

    def __init__(self, weight: float = 0.5) -> None:
        self.weight = torch.tensor(weight)
        self.scheduler = make_noise_scheduler()
        self.seen: list[torch.Tensor] = []

    def __call__(self, batch: dict, timesteps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self.seen.append(timesteps)
        noised = noise_batch(
            self.scheduler, batch["latents"], LossOptions(noise_offset=0.1), timesteps=timesteps, generator=generator
        )
        prediction = noised.noisy * self.weight
        return torch.nn.functional.mse_loss(prediction, noised.target)


def fake_batches(count: int = 3, size: int = 2) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [
        {"latents": torch.randn(size, 4, 4, 4, generator=gen), "loss_weights": torch.ones(size)} for _ in range(count)
    ]


def test_validation_loss_is_deterministic_and_leaves_the_rng_alone():
    model, batches = FakeModel(), fake_batches()
    torch.manual_seed(1)
    random.seed(1)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    first = validation_loss(batches, model, timesteps=(200, 400, 600, 800), seed=3)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    torch.manual_seed(2)
    torch.randn(10)
    assert validation_loss(batches, model, timesteps=(200, 400, 600, 800), seed=3) == first
    assert validation_loss(batches, model, timesteps=(200, 400, 600, 800), seed=4) != first


def test_validation_loss_follows_the_weights():
    model, batches = FakeModel(0.5), fake_batches()
    before = validation_loss(batches, model, timesteps=(500,), seed=0)
    model.weight = torch.tensor(0.9)
    assert validation_loss(batches, model, timesteps=(500,), seed=0) != before


def test_validation_loss_uses_the_fixed_timesteps():
    model, batches = FakeModel(), fake_batches(count=2, size=3)
    validation_loss(batches, model, timesteps=(200, 400, 600, 800), seed=0)
    assert len(model.seen) == 2 * 4
    assert all(t.dtype == torch.long and t.shape == (3,) for t in model.seen)
    assert [int(t[0]) for t in model.seen] == [200, 400, 600, 800] * 2
    assert all(bool((t == t[0]).all()) for t in model.seen)


def test_validation_loss_fixes_global_draws_too():
    """A stray global draw (VAE posterior sampling, say) inside compute_loss is seeded, and forgotten after."""

    def compute(batch, timesteps, generator):
        return (batch["latents"] + torch.randn(batch["latents"].shape)).square().mean()

    batches = fake_batches()
    torch.manual_seed(10)
    first = validation_loss(batches, compute, timesteps=(1,), seed=0)
    state = torch.get_rng_state()
    torch.manual_seed(11)
    assert validation_loss(batches, compute, timesteps=(1,), seed=0) == first
    torch.manual_seed(10)
    assert torch.equal(torch.get_rng_state(), state)


def test_validation_shares_of_two_processes_give_the_one_process_mean():
    """Each process scores batches rank, rank + 2, ...; every value depends on its batch alone (a global draw too),
    so the gathered items give exactly the one-process number, whatever order they arrive in."""

    def compute(batch, timesteps, generator):
        drawn = torch.randn(batch["latents"].shape)  # a global draw, as VAE posterior sampling makes
        noise = torch.randn(batch["latents"].shape, generator=generator)
        return (batch["latents"] + drawn + noise * timesteps[0]).square().mean()

    batches = fake_batches(count=5)
    whole = validation_loss(batches, compute, timesteps=(1, 2), seed=4)
    shares = [
        validation_losses(list(enumerate(batches))[rank::2], compute, timesteps=(1, 2), seed=4) for rank in (1, 0)
    ]
    assert [len(share) for share in shares] == [2 * 2, 3 * 2]
    assert mean_validation_loss(shares[0] + shares[1]) == whole
    as_first, as_second = (validation_losses([(b, batches[1])], compute, timesteps=(1,), seed=4) for b in (0, 1))
    assert as_first[0][2] != as_second[0][2]  # the batch number, not the order, picks the seeds


def test_validation_loss_needs_batches():
    with pytest.raises(ValueError):
        validation_loss([], FakeModel(), timesteps=(500,), seed=0)


# --- on the tiny SDXL ------------------------------------------------------------------------------------


def test_validation_loss_on_tiny_sdxl_with_a_lora(tiny_models):
    from library.model.text_encoding import encode_captions, time_ids
    from library.train.loss import diffusion_loss
    from networks.lora import create_network

    m = tiny_models
    scheduler, options = make_noise_scheduler(), LossOptions()
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            "latents": torch.randn(2, 4, 8, 8, generator=gen),
            "captions": ["toy, red square", "toy, blue circle"],
            "original_sizes_hw": torch.tensor([[64, 64]] * 2),
            "crop_top_lefts": torch.zeros(2, 2, dtype=torch.long),
            "target_sizes_hw": torch.tensor([[64, 64]] * 2),
            "loss_weights": torch.ones(2),
        }
        for _ in range(2)
    ]

    def compute_loss(batch, timesteps, generator):  # the trainer's batch_loss, cut down
        context, pooled = encode_captions(m, batch["captions"], 75)
        noised = noise_batch(scheduler, batch["latents"], options, timesteps=timesteps, generator=generator)
        added = {
            "text_embeds": pooled,
            "time_ids": time_ids(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]),
        }
        prediction = m.unet(noised.noisy, noised.timesteps, context, added_cond_kwargs=added).sample
        return diffusion_loss(prediction, noised, batch["loss_weights"], scheduler, options)

    network = create_network(1.0, 4, 1.0, None, [m.text_encoder1, m.text_encoder2], m.unet, neuron_dropout=0.5)
    network.apply_to([m.text_encoder1, m.text_encoder2], m.unet, apply_text_encoder=False, apply_unet=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only spin against other jobs on a shared CPU (~50x slower)
    try:
        network.eval()
        timesteps = validation_timesteps()[::3]  # 200, 800: two are enough here, and half the time
        first = validation_loss(batches, compute_loss, timesteps=timesteps, seed=0)
        torch.manual_seed(123)
        assert validation_loss(batches, compute_loss, timesteps=timesteps, seed=0) == first
        with torch.no_grad():
            for lora in network.unet_loras:
                lora.lora_up.weight.normal_(0.0, 0.5, generator=gen)
        changed = validation_loss(batches, compute_loss, timesteps=timesteps, seed=0)
        assert changed != first
    finally:
        torch.set_num_threads(threads)
        network.remove_from_model()
