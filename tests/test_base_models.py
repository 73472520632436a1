"""Preparing the loaded base model: frozen, checkpointing where asked, attention backend, no needless copies."""

from __future__ import annotations

import torch

from library.model.base_models import prepare_base_models, release_model
from library.model.loading import load_sdxl
from library.model.precision import PrecisionConfig, PrecisionRequest, plan_precision


def test_checkpointing_reaches_unet_and_trained_text_encoders_and_sliced_attention_is_set(tiny_sdxl):
    request = PrecisionRequest(mem_eff_attn=True)
    plan = plan_precision(request, "cpu")
    models = load_sdxl(tiny_sdxl.single_file)
    vae_weight = models.vae.encoder.conv_in.weight
    prepare_base_models(
        models, plan, PrecisionConfig(request=request, gradient_checkpointing=True), True, torch.device("cpu")
    )
    assert models.unet.is_gradient_checkpointing
    assert models.text_encoder1.is_gradient_checkpointing and models.text_encoder2.is_gradient_checkpointing
    assert not any(p.requires_grad for m in (models.unet, models.vae, models.text_encoder1) for p in m.parameters())
    processors = {type(p).__name__ for p in models.unet.attn_processors.values()}
    assert processors == {"SlicedAttnProcessor"}
    assert models.vae.encoder.conv_in.weight is vae_weight  # already fp32 on the CPU: not copied


def test_release_frees_unless_needed_and_keeps_in_place_on_cpu():
    model = torch.nn.Linear(2, 2)
    assert release_model(model, needed_later=False, highvram=False, device=torch.device("cpu")) is None
    assert release_model(model, needed_later=True, highvram=False, device=torch.device("cpu")) is model
