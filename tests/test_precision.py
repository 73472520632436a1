"""The precision plan: what is stored in which dtype, what computes, which attention runs, per device."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserInputError
from library.model.fp8 import FP8_DTYPE
from library.model.precision import PrecisionRequest, plan_precision


def test_fp32_on_cpu_stores_and_computes_fp32():
    plan = plan_precision(PrecisionRequest(), "cpu")
    assert (plan.mixed_precision, plan.weight_dtype, plan.compute_dtype) == ("no", torch.float32, torch.float32)
    assert plan.storage_dtypes() == {}
    assert (plan.vae_dtype, plan.lora_dtype, plan.attention, plan.notes) == (torch.float32, torch.float32, "sdpa", ())


def test_fp16_on_cpu_stores_linear_weights_in_fp16_and_computes_fp32():
    plan = plan_precision(PrecisionRequest(mixed_precision="fp16"), "cpu")
    assert plan.mixed_precision == "no" and plan.compute_dtype == torch.float32
    assert plan.weight_dtype == torch.float32  # norms, biases, embeddings
    assert plan.storage_dtypes() == {
        "unet": torch.float16,
        "text_encoder1": torch.float16,
        "text_encoder2": torch.float16,
    }
    assert len(plan.notes) == 1 and "stored in fp16 and computed in fp32" in plan.notes[0]


def test_fp16_on_cuda_is_plain_mixed_precision_with_an_fp32_vae():
    plan = plan_precision(PrecisionRequest(mixed_precision="fp16"), "cuda")
    assert (plan.mixed_precision, plan.weight_dtype, plan.compute_dtype) == ("fp16", torch.float16, torch.float16)
    assert plan.storage_dtypes() == {}
    assert plan.vae_dtype == torch.float32  # SDXL's VAE overflows in fp16


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("mixed", ["no", "fp16", "bf16"])
def test_fp8_base_stores_unet_and_text_encoders_in_fp8_on_every_device(device, mixed):
    plan = plan_precision(PrecisionRequest(mixed_precision=mixed, fp8_base=True), device)
    assert plan.storage_dtypes() == {"unet": FP8_DTYPE, "text_encoder1": FP8_DTYPE, "text_encoder2": FP8_DTYPE}
    assert plan.lora_dtype == torch.float32
    assert "float8_e4m3fn" in plan.describe(device, 1)


def test_fp8_base_unet_leaves_the_text_encoders_alone():
    plan = plan_precision(PrecisionRequest(mixed_precision="bf16", fp8_base_unet=True), "cpu")
    assert plan.storage_dtypes() == {"unet": FP8_DTYPE}
    assert plan.weight_dtype == plan.compute_dtype == torch.bfloat16


def test_bf16_vae_follows_unless_no_half_vae():
    assert plan_precision(PrecisionRequest(mixed_precision="bf16"), "cuda").vae_dtype == torch.bfloat16
    assert plan_precision(PrecisionRequest(mixed_precision="bf16", no_half_vae=True), "cuda").vae_dtype == torch.float32


def test_full_fp16_and_full_bf16_set_the_lora_dtype_and_need_their_mixed_precision():
    assert plan_precision(PrecisionRequest(mixed_precision="bf16", full_bf16=True), "cpu").lora_dtype == torch.bfloat16
    assert plan_precision(PrecisionRequest(mixed_precision="fp16", full_fp16=True), "cuda").lora_dtype == torch.float16
    with pytest.raises(UserInputError, match="--full_fp16 needs --mixed_precision fp16"):
        plan_precision(PrecisionRequest(mixed_precision="bf16", full_fp16=True), "cuda")
    with pytest.raises(UserInputError, match="--full_bf16 needs --mixed_precision bf16"):
        plan_precision(PrecisionRequest(full_bf16=True), "cuda")


def test_attention_backends_and_their_fallbacks():
    assert plan_precision(PrecisionRequest(xformers=True), "cpu").attention == "sdpa"
    assert "xformers cannot run" in plan_precision(PrecisionRequest(xformers=True), "cpu").notes[0]
    mem_eff = plan_precision(PrecisionRequest(mem_eff_attn=True, xformers=True), "cpu")
    assert mem_eff.attention == "sliced" and "--mem_eff_attn" in mem_eff.notes[0]  # sd-scripts' order
