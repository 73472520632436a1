"""networks.lora on the tiny SDXL: names, groups and learning rates, the LoRA+ step, files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from networks import lora
from networks.lora_targets import text_encoder_targets, unet_targets


@pytest.fixture(scope="module")
def models(tiny_models):
    """A private copy: these tests attach adapters to it."""
    return copy.deepcopy(tiny_models)


def _network(models, **network_args):
    network = lora.create_network(
        1.0, 4, 1.0, models.vae, [models.text_encoder1, models.text_encoder2], models.unet, **network_args
    )
    return network


def _unet_inputs(models, batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = models.unet
    cross = unet.config.cross_attention_dim
    pooled_dim = models.text_encoder2.config.projection_dim
    return dict(
        sample=torch.randn(batch, 4, size, size, generator=g),
        timestep=torch.tensor([10, 500])[:batch],
        encoder_hidden_states=torch.randn(batch, 77, cross, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, pooled_dim, generator=g),
            "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch, dtype=torch.float32),
        },
    )


def _randomize_up(network, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.unet_loras + network.text_encoder_loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * scale)


def test_names_follow_sd_scripts_original_layout(models):
    network = _network(models)
    names = {m.lora_name for m in network.unet_loras + network.text_encoder_loras}
    for expected in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_4_1_proj_in",
        "lora_unet_middle_block_1_proj_in",
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_output_blocks_5_1_proj_out",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te1_text_model_encoder_layers_11_mlp_fc2",
        "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1",
    ):
        assert expected in names
    # Level 0 of SDXL has no attention: nothing is adapted there without conv_dim.
    assert not any(n.startswith(("lora_unet_input_blocks_1_", "lora_unet_output_blocks_8_")) for n in names)
    keys = set(network.state_dict())
    assert "lora_unet_middle_block_1_proj_in.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_proj_in.lora_up.weight" in keys
    assert "lora_unet_middle_block_1_proj_in.alpha" in keys
    assert len(keys) == 3 * len(names)


def test_module_counts_on_tiny_model(models):
    te1_layers = models.text_encoder1.config.num_hidden_layers
    te2_layers = models.text_encoder2.config.num_hidden_layers
    network = _network(models)
    te1 = [m for m in network.text_encoder_loras if m.lora_name.startswith("lora_te1_")]
    te2 = [m for m in network.text_encoder_loras if m.lora_name.startswith("lora_te2_")]
    assert len(te1) == 6 * te1_layers
    assert len(te2) == 6 * te2_layers
    transformer_blocks = sum(
        1 for name, module in models.unet.named_modules() if type(module).__name__ == "BasicTransformerBlock"
    )
    transformers = sum(1 for _, m in models.unet.named_modules() if type(m).__name__ == "Transformer2DModel")
    assert len(network.unet_loras) == 10 * transformer_blocks + 2 * transformers


def test_full_size_sdxl_has_sd_scripts_module_counts():
    """72 + 192 + 722 modules on the real SDXL architecture (built on the meta device from configs/sdxl)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models import SHIPPED_CONFIG_DIR

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SHIPPED_CONFIG_DIR / "unet"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(SHIPPED_CONFIG_DIR / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SHIPPED_CONFIG_DIR / "text_encoder_2"))
    assert len(text_encoder_targets(te1, "lora_te1")) == 72
    assert len(text_encoder_targets(te2, "lora_te2")) == 192
    assert len(unet_targets(unet, include_conv=False)) == 722
    assert len(unet_targets(unet, include_conv=True)) == 788
    names = {t.lora_name for t in unet_targets(unet, include_conv=False)}
    assert "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0" in names
    assert "lora_unet_output_blocks_2_1_transformer_blocks_9_ff_net_2" in names


@pytest.mark.parametrize(
    "network_args, te_lr, unet_lr, expected",
    [
        ({}, None, None, {"textencoder": 1e-4, "unet": 1e-4}),
        (
            {"loraplus_lr_ratio": "16"},
            None,
            None,
            {"textencoder": 1e-4, "textencoder plus": 1.6e-3, "unet": 1e-4, "unet plus": 1.6e-3},
        ),
        (
            {"loraplus_lr_ratio": "16", "loraplus_unet_lr_ratio": "4"},
            5e-5,
            2e-4,
            {"textencoder": 5e-5, "textencoder plus": 8e-4, "unet": 2e-4, "unet plus": 8e-4},
        ),
        ({"loraplus_text_encoder_lr_ratio": "2.5"}, None, 3e-4, {"textencoder": 1e-4, "textencoder plus": 2.5e-4, "unet": 3e-4}),
        ({"loraplus_lr_ratio": "16"}, 0.0, None, {"unet": 1e-4, "unet plus": 1.6e-3}),
    ],
)
def test_param_groups_learning_rates_and_membership(models, network_args, te_lr, unet_lr, expected):
    network = _network(models, **network_args)
    groups, descriptions = network.prepare_optimizer_params(te_lr, unet_lr, 1e-4)
    assert descriptions == list(expected)
    assert [g["lr"] for g in groups] == pytest.approx(list(expected.values()))
    ids = {id(p): name for name, p in network.named_parameters()}
    covered = []
    for group, description in zip(groups, descriptions):
        names = [ids[id(p)] for p in group["params"]]
        covered += names
        component = "lora_te" if description.startswith("textencoder") else "lora_unet"
        assert all(n.startswith(component) for n in names)
        if description.endswith("plus"):
            assert all(n.endswith("lora_up.weight") for n in names)
        elif any(d.endswith("plus") and d.startswith(description) for d in descriptions):
            assert all(n.endswith("lora_down.weight") for n in names)
    assert len(covered) == len(set(covered))
    trained = [n for n in ids.values() if te_lr != 0.0 or n.startswith("lora_unet")]
    assert sorted(covered) == sorted(trained)


def test_text_encoder_lr_list_uses_first_value(models):
    network = _network(models, loraplus_lr_ratio="2")
    groups, descriptions = network.prepare_optimizer_params([3e-5, 7e-5], None, 1e-4)
    assert dict(zip(descriptions, [g["lr"] for g in groups]))["textencoder plus"] == pytest.approx(6e-5)


def test_loraplus_step_moves_b_by_ratio_times_lr(models):
    """One Lion step: B moves by exactly lr x 16 per element (sign update), A does not move yet (B = 0)."""
    from lion_pytorch import Lion

    network = _network(models, loraplus_lr_ratio="16")
    network.apply_to([models.text_encoder1, models.text_encoder2], models.unet, True, True)
    try:
        lr = 1e-3
        groups, descriptions = network.prepare_optimizer_params(None, None, lr)
        optimizer = Lion(groups, lr=lr, weight_decay=0.0)
        before = {k: v.clone() for k, v in network.state_dict().items()}
        out = models.unet(**_unet_inputs(models)).sample
        out.pow(2).mean().backward()
        optimizer.step()
        after = network.state_dict()
        moved_up = 0
        for module in network.unet_loras:
            up = f"{module.lora_name}.lora_up.weight"
            down = f"{module.lora_name}.lora_down.weight"
            delta = (after[up] - before[up]).abs()
            nonzero = module.lora_up.weight.grad.abs() > 0
            assert torch.allclose(delta[nonzero], torch.full_like(delta[nonzero], lr * 16), rtol=1e-4)
            moved_up += int(nonzero.sum())
            assert torch.equal(after[down], before[down])
        assert moved_up > 0
    finally:
        network.remove_from_model()


def test_apply_and_remove_restore_base_outputs(models):
    inputs = _unet_inputs(models)
    with torch.no_grad():
        base = models.unet(**inputs).sample
        network = _network(models)
        network.apply_to(None, models.unet, apply_text_encoder=False, apply_unet=True)
        assert network.text_encoder_loras == []
        assert torch.equal(models.unet(**inputs).sample, base)  # B starts at zero
        _randomize_up(network)
        changed = models.unet(**inputs).sample
        network.remove_from_model()
        assert not torch.allclose(changed, base)
        assert torch.equal(models.unet(**inputs).sample, base)


def test_saved_file_keys_alpha_metadata_and_reload(models, tmp_path):
    network = _network(models, loraplus_lr_ratio="16")
    network.apply_to([models.text_encoder1, models.text_encoder2], models.unet, True, True)
    _randomize_up(network)
    inputs = _unet_inputs(models)
    try:
        with torch.no_grad():
            expected = models.unet(**inputs).sample
    finally:
        network.remove_from_model()
    path = tmp_path / "x.safetensors"
    network.save_weights(path, torch.float16, {"ss_network_dim": "4", "ss_network_args": json.dumps({"a": "1"})})
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
        alpha = f.get_tensor("lora_unet_middle_block_1_proj_in.alpha")
        up = f.get_tensor("lora_unet_middle_block_1_proj_in.lora_up.weight")
    assert keys == set(network.state_dict())
    assert alpha.dim() == 0 and alpha.dtype == torch.float16 and float(alpha) == 1.0
    assert up.dtype == torch.float16
    assert metadata["ss_network_dim"] == "4"
    assert len(metadata["sshs_model_hash"]) == 64 and len(metadata["sshs_legacy_hash"]) == 8

    loaded, weights = lora.create_network_from_weights(
        1.0, path, models.vae, [models.text_encoder1, models.text_encoder2], models.unet
    )
    assert {m.lora_name for m in loaded.unet_loras} == {m.lora_name for m in network.unet_loras}
    loaded.load_state_dict(weights)
    loaded.apply_to([models.text_encoder1, models.text_encoder2], models.unet, True, True)
    try:
        with torch.no_grad():
            reloaded = models.unet(**inputs).sample
    finally:
        loaded.remove_from_model()
    assert torch.allclose(reloaded, expected, atol=2e-3, rtol=1e-2)
    assert not torch.allclose(reloaded, models.unet(**inputs).sample, atol=1e-3)


def test_diffusers_load_lora_weights_matches_our_network(models, tiny_sdxl, tmp_path):
    """diffusers reads our file (sd-scripts names) and wraps exactly its modules; outputs match ours."""
    from diffusers import StableDiffusionXLPipeline

    network = _network(models)
    network.apply_to(None, models.unet, apply_text_encoder=False, apply_unet=True)
    _randomize_up(network, scale=0.05)
    inputs = _unet_inputs(models)
    try:
        with torch.no_grad():
            ours = models.unet(**inputs).sample
            base = None
    finally:
        network.remove_from_model()
    with torch.no_grad():
        base = models.unet(**inputs).sample
    path = tmp_path / "for_diffusers.safetensors"
    network.save_weights(path, torch.float16, {"ss_network_module": "networks.lora"})

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl.diffusers_dir, local_files_only=True)
    pipe.load_lora_weights(str(path))
    wrapped = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A"))}
    assert len(wrapped) == len(network.unet_loras)
    with torch.no_grad():
        theirs = pipe.unet(**inputs).sample
    assert (ours - base).abs().max() > 1e-3  # the LoRA really changes the output
    assert torch.allclose(theirs, ours, atol=2e-3, rtol=1e-2)
