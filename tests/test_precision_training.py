"""Every precision mode trains on the tiny SDXL, stores what it says it stores, and tracks fp32's loss.

Same seed, same data, same noise and timesteps in every mode, so the per-step losses differ only through
precision. Tolerances (relative to fp32, every step), about 3x the deviation measured on this CPU
(fp8 4.8e-3, fp16 storage 4.7e-5, bf16 7.7e-4, bf16 + fp8 4.6e-3, full bf16 8.4e-4): 1.5% with fp8 weights,
0.1% with fp16 storage and fp32 compute, 0.5% with bf16 compute.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from library.config.build import config_from_args
from library.config.cli import build_parser
from library.model.base_models import prepare_base_models
from library.model.fp8 import FP8_DTYPE
from library.model.loading import load_sdxl
from library.model.precision import PrecisionRequest, plan_precision
from library.train.trainer import train
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset

STEPS = 6
MODES = {
    "fp32": [],
    "fp8": ["--fp8_base"],
    "fp16_storage": ["--mixed_precision", "fp16"],
    "bf16": ["--mixed_precision", "bf16"],
    "bf16_fp8": ["--mixed_precision", "bf16", "--fp8_base"],
    "full_bf16": ["--mixed_precision", "bf16", "--full_bf16"],
}
TOLERANCE = {"fp8": 0.015, "fp16_storage": 0.001, "bf16": 0.005, "bf16_fp8": 0.015, "full_bf16": 0.005}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("precision_data")
    make_demo_dataset(root, count=4, min_side=64, max_side=64, repeats=1, name="toy", seed=0)
    return root


@pytest.fixture(scope="module")
def runs(tiny_sdxl, dataset, tmp_path_factory):
    results = {}
    for mode, flags in MODES.items():
        out = tmp_path_factory.mktemp(f"precision_{mode}")
        argv = tiny_train_argv(
            tiny_sdxl.single_file,
            dataset,
            out,
            "--max_train_steps",
            str(STEPS),
            "--optimizer_type",
            "AdamW",
            "--learning_rate",
            "1e-3",
            "--cache_latents",
            "--network_dim",
            "4",
            "--output_name",
            mode,
            *flags,
        )
        result = train(config_from_args(build_parser().parse_args(argv)))
        results[mode] = (result, json.loads(result.report_path.read_text()))
    return results


@pytest.mark.parametrize("mode", sorted(TOLERANCE))
@pytest.mark.slow
def test_each_mode_tracks_the_fp32_loss(runs, mode):
    reference = runs["fp32"][0].losses
    losses = runs[mode][0].losses
    assert len(losses) == len(reference) == STEPS
    for step, (got, want) in enumerate(zip(losses, reference)):
        assert got == pytest.approx(want, rel=TOLERANCE[mode]), f"step {step}: {got} vs fp32 {want}"


def test_the_report_says_what_ran(runs):
    expected = {
        "fp32": ("float32", "float32", "float32", "float32"),
        "fp8": ("float32", "float8_e4m3fn", "float8_e4m3fn", "float32"),
        "fp16_storage": ("float32", "float16", "float16", "float32"),
        "bf16": ("bfloat16", "bfloat16", "bfloat16", "float32"),
        "bf16_fp8": ("bfloat16", "float8_e4m3fn", "float8_e4m3fn", "float32"),
        "full_bf16": ("bfloat16", "bfloat16", "bfloat16", "bfloat16"),
    }
    for mode, (compute, unet, te, lora) in expected.items():
        precision = runs[mode][1]["precision"]
        assert (
            precision["compute"],
            precision["unet_weights"],
            precision["text_encoder_weights"],
            precision["lora"],
        ) == (compute, unet, te, lora), mode


def test_report_has_step_time_throughput_and_peak_memory(runs):
    report = runs["fp32"][1]
    assert report["steps"] == STEPS and report["step_time_s"]["measured_steps"] == STEPS
    assert 0 < report["step_time_s"]["min"] <= report["step_time_s"]["median"] <= report["step_time_s"]["max"]
    assert report["samples_per_s"] == pytest.approx(report["samples_per_step"] / report["step_time_s"]["median"])
    assert report["samples_per_step"] == 2
    assert report["peak_memory"]["rss_bytes"] > 100 * 2**20
    assert report["attention"] == "sdpa" and report["device"] == "cpu" and report["warnings"] == []
    assert report["load_seconds"] > 0 and report["total_seconds"] >= report["load_seconds"]
    sync = report["gradient_sync"]  # one process: nothing to average
    assert sync["collectives_per_step"] == 0 and sync["tensors"] > 0 and sync["bytes"] > 0


def test_full_bf16_saves_a_lora_that_loads(runs):
    from safetensors.torch import load_file

    tensors = load_file(str(runs["full_bf16"][0].final_path))
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors.values())


@pytest.mark.parametrize(
    "flags, unet_linear, te_linear",
    [
        (PrecisionRequest(fp8_base=True), FP8_DTYPE, FP8_DTYPE),
        (PrecisionRequest(fp8_base_unet=True), FP8_DTYPE, torch.float32),
        (PrecisionRequest(mixed_precision="fp16"), torch.float16, torch.float16),
    ],
)
def test_loaded_and_prepared_models_really_store_their_weights_narrow(tiny_sdxl, flags, unet_linear, te_linear):
    plan = plan_precision(flags, "cpu")
    models = load_sdxl(
        tiny_sdxl.single_file,
        dtype=plan.weight_dtype,
        linear_weight_dtypes=plan.storage_dtypes(),
        vae_dtype=plan.vae_dtype,
    )
    from library.model.precision import PrecisionConfig

    prepare_base_models(
        models, plan, PrecisionConfig(request=flags, gradient_checkpointing=False), False, torch.device("cpu")
    )
    for model, linear_dtype in (
        (models.unet, unet_linear),
        (models.text_encoder1, te_linear),
        (models.text_encoder2, te_linear),
    ):
        layers = [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]
        assert layers and {m.weight.dtype for m in layers} == {linear_dtype}
        norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]
        assert norms and {m.weight.dtype for m in norms} == {torch.float32}
        assert {m.bias.dtype for m in layers if m.bias is not None} == {torch.float32}
    assert {p.dtype for p in models.vae.parameters()} == {torch.float32}
