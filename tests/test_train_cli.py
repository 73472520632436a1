"""End-to-end runs of the CLI on the tiny SDXL (in-process through `main(argv)`), and bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import train_network
from tests.cli_args import tiny_train_argv as _argv
from tools.make_demo_dataset import make_demo_dataset

LR = 1e-4


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_demo_dataset(root, count=4, min_side=64, max_side=128, repeats=2, name="toy", seed=0)
    return root


@pytest.fixture(scope="module")
def loraplus_run(tiny_sdxl, small_dataset, tmp_path_factory):
    """The seed command's options at tiny scale: LoRA+ 16 by flag, Lion, cosine restarts, fp8, epochs."""
    out = tmp_path_factory.mktemp("run")
    argv = _argv(
        tiny_sdxl.single_file,
        small_dataset,
        out / "output",
        "--cache_latents_to_disk",
        "--max_train_epochs",
        "4",
        "--save_every_n_epochs",
        "2",
        "--optimizer_type",
        "Lion",
        "--learning_rate",
        str(LR),
        "--lr_scheduler",
        "cosine_with_restarts",
        "--lr_scheduler_num_cycles",
        "2",
        "--lr_warmup_steps",
        "2",
        "--loraplus_lr_ratio",
        "16",
        "--save_precision",
        "fp16",
        "--fp8_base",
        "--mixed_precision",
        "fp16",
        "--xformers",
        "--gradient_checkpointing",
        "--output_name",
        "tiny_lora",
        "--logging_dir",
        str(out / "logs"),
        "--network_dim",
        "4",
        "--network_alpha",
        "1",
        "--shuffle_caption",
        "--keep_tokens",
        "1",
    )
    assert train_network.main(argv) == 0
    return out


@pytest.mark.slow
def test_writes_final_and_epoch_files(loraplus_run):
    files = sorted(p.name for p in (loraplus_run / "output").iterdir())
    # 4 epochs, save every 2: epoch 2 gets a numbered file, epoch 4 is the final file; the optimizer
    # groups are written beside them.
    assert files == [
        "tiny_lora-000002.safetensors",
        "tiny_lora.safetensors",
        "tiny_lora_param_groups.json",
        "tiny_lora_report.html",
        "tiny_lora_report.json",
    ]


def test_param_group_table_is_saved_as_json_and_in_metadata(loraplus_run):
    rows = json.loads((loraplus_run / "output" / "tiny_lora_param_groups.json").read_text())
    assert [(r["description"], r["plus"]) for r in rows] == [
        ("textencoder", False),
        ("textencoder plus", True),
        ("unet", False),
        ("unet plus", True),
    ]
    assert [r["lr"] for r in rows] == pytest.approx([LR, LR * 16, LR, LR * 16])
    assert all(r["tensors"] > 0 and r["parameters"] > 0 for r in rows)
    with safe_open(str(loraplus_run / "output" / "tiny_lora.safetensors"), "pt") as f:
        in_file = json.loads(f.metadata()["ss_lr_param_groups"])
    assert [(r["description"], r["lr"]) for r in in_file] == [(r["description"], r["lr"]) for r in rows]


def test_metadata_has_every_key_sd_scripts_writes(loraplus_run):
    # What sd-scripts 48d368fa wrote for a LoRA+ run (copied from the compat contract).
    example = json.loads((Path(__file__).parent / "data" / "sdscripts-lora-metadata-example.json").read_text())
    with safe_open(str(loraplus_run / "output" / "tiny_lora.safetensors"), "pt") as f:
        meta = f.metadata()
    missing = set(example) - set(meta) - {"ss_sd_scripts_commit_hash"}
    assert not missing
    assert meta["modelspec.implementation_version"].startswith("loraplus-trainer/")
    assert json.loads(meta["ss_bucket_info"])["mean_img_ar_error"] >= 0


def test_saved_file_names_dtype_alpha_and_metadata(loraplus_run, tiny_sdxl):
    path = loraplus_run / "output" / "tiny_lora.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    assert all(t.dtype == torch.float16 for t in tensors.values())
    alphas = [k for k in keys if k.endswith(".alpha")]
    assert len(alphas) * 3 == len(keys)
    assert all(tensors[k].dim() == 0 and float(tensors[k]) == 1.0 for k in alphas)
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.lora_up.weight" in keys
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in keys
    # Every B moved away from its zero init except TE1's last layer, whose output SDXL never reads
    # (it conditions on TE1's hidden_states[11]); sd-scripts creates and saves those modules too.
    still_zero = {k for k in keys if k.endswith("lora_up.weight") and tensors[k].abs().max() == 0}
    assert still_zero and all(k.startswith("lora_te1_text_model_encoder_layers_11_") for k in still_zero)

    data = tiny_sdxl.single_file.read_bytes()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "1.0"
    assert json.loads(meta["ss_network_args"]) == {"loraplus_lr_ratio": "16"}
    assert meta["ss_sd_model_name"] == "tiny_sdxl.safetensors"
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_optimizer"].endswith("Lion")
    assert meta["ss_fp8_base"] == "True"
    assert meta["ss_mixed_precision"] == "no"  # fp16 on CPU runs as fp32, and the file says what ran
    # 4 images x 2 repeats / batch 2 = 4 steps per epoch, 4 epochs.
    assert (meta["ss_steps"], meta["ss_epoch"], meta["ss_num_epochs"]) == ("16", "4", "4")
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_toy": {"n_repeats": 2, "img_count": 4}}
    assert json.loads(meta["ss_tag_frequency"])["2_toy"]["toy"] == 4
    with safe_open(str(loraplus_run / "output" / "tiny_lora-000002.safetensors"), "pt") as f:
        assert (f.metadata()["ss_steps"], f.metadata()["ss_epoch"]) == ("8", "2")


def test_tensorboard_logs_loss_and_every_group_lr(loraplus_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((loraplus_run / "logs").rglob("events.out.tfevents.*"))
    assert len(event_files) == 1
    acc = EventAccumulator(str(event_files[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "loss/average", "lr/unet", "lr/unet plus", "lr/textencoder", "lr/textencoder plus"} <= tags
    for component in ("unet", "textencoder"):
        base = [e.value for e in acc.Scalars(f"lr/{component}")]
        plus = [e.value for e in acc.Scalars(f"lr/{component} plus")]
        assert len(base) == 16
        assert np.allclose(plus, np.array(base) * 16, rtol=1e-5)
    base = [e.value for e in acc.Scalars("lr/unet")]
    assert base[0] == pytest.approx(LR / 2)  # warmup 2 steps: step 1 at half the rate
    assert max(base) == pytest.approx(LR, rel=1e-3)
    losses = [e.value for e in acc.Scalars("loss")]
    assert all(np.isfinite(losses))


def test_latents_cached_to_disk_in_sd_scripts_format(loraplus_run, small_dataset):
    caches = sorted((small_dataset / "2_toy").glob("*_sdxl.npz"))
    assert len(caches) == 4
    with np.load(caches[0]) as npz:
        assert {"latents", "original_size", "crop_ltrb"} <= set(npz.files)
        assert npz["latents"].dtype == np.float32 and npz["latents"].shape[0] == 4


def _fixed_noise_loss(models, network_file: Path | None, latents: torch.Tensor, captions: list[str]) -> float:
    """Loss at fixed timesteps and noise (no randomness), with or without a LoRA file applied."""
    from library.model.text_encoding import encode_prompts, time_ids, tokenize
    from library.train.loss import SDXL_VAE_SCALE, make_noise_scheduler
    from networks.lora import create_network_from_weights
    from tests.loss_reference import epsilon_mse_loss

    network = None
    if network_file is not None:
        network, weights = create_network_from_weights(
            1.0, network_file, None, [models.text_encoder1, models.text_encoder2], models.unet
        )
        network.load_state_dict(weights)
        network.apply_to([models.text_encoder1, models.text_encoder2], models.unet, True, True)
    try:
        g = torch.Generator().manual_seed(0)
        scheduler = make_noise_scheduler()
        total = 0.0
        with torch.no_grad():
            ids1 = tokenize(models.tokenizer1, captions)
            ids2 = tokenize(models.tokenizer2, captions)
            context, pooled = encode_prompts(
                models.text_encoder1, models.text_encoder2, ids1, ids2, models.tokenizer2.eos_token_id
            )
            h, w = latents.shape[2] * 8, latents.shape[3] * 8
            sizes = torch.tensor([[h, w]] * len(captions))
            added = {"text_embeds": pooled, "time_ids": time_ids(sizes, torch.zeros_like(sizes), sizes)}
            for t in (100, 300, 500, 700, 900):
                noise = torch.randn(latents.shape, generator=g)
                timesteps = torch.full((latents.shape[0],), t)
                noisy = scheduler.add_noise(latents * SDXL_VAE_SCALE, noise, timesteps)
                pred = models.unet(noisy, timesteps, context, added_cond_kwargs=added).sample
                total += float(epsilon_mse_loss(pred, noise, torch.ones(latents.shape[0])))
        return total / 5
    finally:
        if network is not None:
            network.remove_from_model()


@pytest.mark.slow
def test_training_lowers_the_loss_on_its_data(tiny_sdxl, tiny_models, small_dataset, tmp_path):
    """AdamW + LoRA+ 16 for 40 steps on 4 images: the fixed-noise loss on those images falls by over 2%."""
    out = tmp_path / "output"
    argv = _argv(
        tiny_sdxl.single_file,
        small_dataset,
        out,
        "--cache_latents_to_disk",
        "--resolution",
        "64",
        "--max_bucket_reso",
        "64",
        "--max_train_steps",
        "40",
        "--learning_rate",
        "3e-3",
        "--loraplus_lr_ratio",
        "16",
        "--network_dim",
        "8",
        "--network_alpha",
        "8",
        "--network_train_unet_only",
        "--output_name",
        "fit",
    )
    assert train_network.main(argv) == 0
    # With --max_bucket_reso 64 every image trains in the 64x64 bucket: its cache now holds 8x8 latents.
    caches = sorted((small_dataset / "2_toy").glob("*_sdxl.npz"))
    latents = torch.stack([torch.from_numpy(np.load(c)["latents"]) for c in caches])
    assert latents.shape == (4, 4, 8, 8)
    captions = [(c.parent / f"{c.name.rsplit('_', 2)[0]}.txt").read_text().strip() for c in caches]
    before = _fixed_noise_loss(tiny_models, None, latents, captions)
    after = _fixed_noise_loss(tiny_models, out / "fit.safetensors", latents, captions)
    assert after < before * 0.98, (before, after)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"--pretrained_model_name_or_path": "missing.safetensors"}, "--pretrained_model_name_or_path"),
        ({"--train_data_dir": "no/such/folder"}, "--train_data_dir"),
        ({"--network_args": "loraplus_lr_ratio=abc"}, "loraplus_lr_ratio='abc' is not a number"),
        ({"--network_args": "loraplus_ratio=16"}, "unknown key 'loraplus_ratio'"),
        ({"--optimizer_type": "NoSuchOptimizer"}, "--optimizer_type"),
    ],
)
def test_bad_input_stops_with_one_line_before_loading(tiny_sdxl, small_dataset, tmp_path, capsys, change, fragment):
    argv = _argv(tiny_sdxl.single_file, small_dataset, tmp_path / "out")
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--loraplus_lr_ratio", "abc"], "argument --loraplus_lr_ratio: invalid float value: 'abc'"),
        (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
        (["--resolution", "big"], "--resolution"),
    ],
)
def test_unparsable_flags_are_one_line(tiny_sdxl, small_dataset, tmp_path, capsys, extra, fragment):
    assert train_network.main(_argv(tiny_sdxl.single_file, small_dataset, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err and len(err.splitlines()) == 1


def test_empty_data_folder_is_one_line(tiny_sdxl, tmp_path, capsys):
    (tmp_path / "data" / "5_empty").mkdir(parents=True)
    assert train_network.main(_argv(tiny_sdxl.single_file, tmp_path / "data", tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no images found") and len(err.splitlines()) == 1


def test_ratio_given_two_ways_must_agree(tiny_sdxl, small_dataset, tmp_path, capsys):
    argv = _argv(
        tiny_sdxl.single_file,
        small_dataset,
        tmp_path / "out",
        "--loraplus_lr_ratio",
        "16",
        "--network_args",
        "loraplus_lr_ratio=8",
    )
    assert train_network.main(argv) == 2
    assert "disagrees" in capsys.readouterr().err


@pytest.mark.slow
def test_prodigy_without_loraplus_trains(tiny_sdxl, small_dataset, tmp_path):
    out = tmp_path / "out"
    argv = _argv(
        tiny_sdxl.single_file,
        small_dataset,
        out,
        "--optimizer_type",
        "Prodigy",
        "--learning_rate",
        "1.0",
        "--max_train_steps",
        "3",
        "--cache_latents",
        "--network_train_unet_only",
        "--output_name",
        "p",
    )
    assert train_network.main(argv) == 0
    with safe_open(str(out / "p.safetensors"), "pt") as f:
        assert f.metadata()["ss_optimizer"] == "prodigyopt.prodigy.Prodigy"
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]
    assert ups and all(float(t.abs().max()) > 0 for t in ups)


@pytest.mark.slow
def test_continue_training_from_a_file_with_its_own_dims(loraplus_run, tiny_sdxl, small_dataset, tmp_path):
    """--network_weights + --dim_from_weights: modules, dims and weights come from the file; a tiny lr
    then barely moves them."""
    start = loraplus_run / "output" / "tiny_lora.safetensors"
    out = tmp_path / "out"
    argv = _argv(
        tiny_sdxl.single_file,
        small_dataset,
        out,
        "--network_weights",
        str(start),
        "--dim_from_weights",
        "--network_dim",
        "16",
        "--max_train_steps",
        "1",
        "--learning_rate",
        "1e-9",
        "--cache_latents",
        "--output_name",
        "continued",
    )
    assert train_network.main(argv) == 0
    with safe_open(str(start), "pt") as f:
        before = {k: f.get_tensor(k).float() for k in f.keys()}
    with safe_open(str(out / "continued.safetensors"), "pt") as f:
        after = {k: f.get_tensor(k).float() for k in f.keys()}
    assert after.keys() == before.keys()
    assert after["lora_unet_middle_block_1_proj_in.lora_down.weight"].shape[0] == 4  # from the file, not 16
    assert max(float((after[k] - before[k]).abs().max()) for k in before) < 1e-3


def test_dim_from_weights_needs_weights(tiny_sdxl, small_dataset, tmp_path, capsys):
    assert train_network.main(_argv(tiny_sdxl.single_file, small_dataset, tmp_path / "o", "--dim_from_weights")) == 2
    assert "--dim_from_weights needs --network_weights" in capsys.readouterr().err


def test_weights_of_another_dim_without_dim_from_weights_is_one_line(
    loraplus_run, tiny_sdxl, small_dataset, tmp_path, capsys
):
    start = loraplus_run / "output" / "tiny_lora.safetensors"  # dim 4
    argv = _argv(
        tiny_sdxl.single_file,
        small_dataset,
        tmp_path / "o",
        "--network_weights",
        str(start),
        "--network_dim",
        "8",
        "--max_train_steps",
        "1",
        "--cache_latents",
    )
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --network_weights") and "has rank 4, but this run asks for 8" in err
    assert "--dim_from_weights" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # stopped before any model loaded or file was written
