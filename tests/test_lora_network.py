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

    from library.model.loading import SHIPPED_CONFIG_DIR

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
    te_names = {t.lora_name for t in text_encoder_targets(te1, "lora_te1") + text_encoder_targets(te2, "lora_te2")}
    assert {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te1_text_model_encoder_layers_11_mlp_fc2",
        "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
        "lora_te2_text_model_encoder_layers_31_mlp_fc2",
    } <= te_names
    with_conv = {t.lora_name for t in unet_targets(unet, include_conv=True)}
    # One name per UNet level and kind (SDXL's upsamplers sit at index 2 after the attention: output_blocks_2_2_conv,
    # not the SD1.5-style output_blocks_2_1_conv).
    assert {
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_input_blocks_2_0_emb_layers_1",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_input_blocks_4_1_proj_in",
        "lora_unet_input_blocks_6_0_op",
        "lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_middle_block_0_out_layers_3",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v",
        "lora_unet_middle_block_2_in_layers_2",
        "lora_unet_output_blocks_0_0_skip_connection",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_output_blocks_5_2_conv",
        "lora_unet_output_blocks_5_1_proj_out",
        "lora_unet_output_blocks_8_0_out_layers_3",
    } <= with_conv
    assert "lora_unet_output_blocks_2_1_conv" not in with_conv
    # sd-scripts' 23 blocks: every UNet module has one; 10-deep transformers in input_blocks 7-8, middle, output 0-2.
    from collections import Counter

    from networks.block_weights import block_index

    per_block = Counter(block_index(name) for name in names)
    assert dict(sorted(per_block.items())) == {
        5: 22,
        6: 22,
        8: 102,
        9: 102,
        11: 102,
        13: 102,
        14: 102,
        15: 102,
        16: 22,
        17: 22,
        18: 22,
    }
    with_conv = Counter(block_index(t.lora_name) for t in unet_targets(unet, include_conv=True))
    assert set(with_conv) == set(range(2, 22))  # conv_in (1), embeddings (0) and out (22) are never adapted


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
        (
            {"loraplus_text_encoder_lr_ratio": "2.5"},
            None,
            3e-4,
            {"textencoder": 1e-4, "textencoder plus": 2.5e-4, "unet": 3e-4},
        ),
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    wrapped = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert len(wrapped) == len(network.unet_loras)
    with torch.no_grad():
        theirs = pipe.unet(**inputs).sample
    assert (ours - base).abs().max() > 1e-3  # the LoRA really changes the output
    assert torch.allclose(theirs, ours, atol=2e-3, rtol=1e-2)


# --- sd-scripts' block-wise network_args ------------------------------------------------------------------------------

from networks.block_weights import block_index  # noqa: E402

# Blocks of the tiny UNet that hold transformer LoRA modules (input_blocks 4,5,7,8; middle_block 1; output_blocks 0-5).
TINY_BLOCKS = (5, 6, 8, 9, 11, 13, 14, 15, 16, 17, 18)
ONES = {block: 1.0 for block in TINY_BLOCKS}


def _expected_groups(te_lr, unet_lr, te_ratio, unet_ratio, block_weights, default_lr=1e-4):
    te = default_lr if te_lr is None else te_lr
    unet = default_lr if unet_lr is None else unet_lr
    expected = {"textencoder": te}
    if te_ratio:
        expected["textencoder plus"] = te * te_ratio
    for block, weight in sorted(block_weights.items()):
        expected[f"unet_block{block}"] = unet * weight
        if unet_ratio:
            expected[f"unet_block{block} plus"] = unet * weight * unet_ratio
    return expected


@pytest.mark.parametrize(
    "block_args, block_weights",
    [
        # input_blocks 6-8 (blocks 7-9) at half lr; block 7 (a downsampler) has no module here.
        ({"down_lr_weight": "1,1,1,1,1,1,0.5,0.5,0.5"}, {**ONES, 8: 0.5, 9: 0.5}),
        # cos(k pi / 16) + .25 over output_blocks 0-8; middle_block_1 (block 11) at 0.5.
        (
            {"up_lr_weight": "cosine+.25", "mid_lr_weight": "1,0.5,1"},
            {**ONES, 11: 0.5, 13: 1.25, 14: 1.2307853, 15: 1.1738795, 16: 1.0814696, 17: 0.9571068, 18: 0.8055702},
        ),
        # A zero weight drops input_blocks_4 (block 5): no modules, no group.
        ({"down_lr_weight": "1,1,1,1,0,2,1,1,1"}, {**{b: w for b, w in ONES.items() if b != 5}, 6: 2.0}),
        # Weights not above the threshold are dropped (0.1 -> block 5 gone, 0.3 kept); "zeros+.25" for up.
        (
            {"down_lr_weight": "1,1,1,1,0.1,0.3,1,1,1", "block_lr_zero_threshold": "0.2", "up_lr_weight": "zeros+.25"},
            {6: 0.3, 8: 1.0, 9: 1.0, 11: 1.0, **{b: 0.25 for b in (13, 14, 15, 16, 17, 18)}},
        ),
    ],
)
@pytest.mark.parametrize(
    "ratio_args, te_lr, unet_lr, te_ratio, unet_ratio",
    [
        ({}, None, None, None, None),
        ({"loraplus_lr_ratio": "16"}, None, None, 16, 16),
        ({"loraplus_lr_ratio": "16", "loraplus_unet_lr_ratio": "4"}, 5e-5, 2e-4, 16, 4),
    ],
)
def test_block_lr_weights_make_one_group_per_block(
    models, block_args, block_weights, ratio_args, te_lr, unet_lr, te_ratio, unet_ratio
):
    network = _network(models, **block_args, **ratio_args)
    assert {block_index(m.lora_name) for m in network.unet_loras} == set(block_weights)
    groups, descriptions = network.prepare_optimizer_params(te_lr, unet_lr, 1e-4)
    expected = _expected_groups(te_lr, unet_lr, te_ratio, unet_ratio, block_weights)
    assert descriptions == list(expected)
    assert [g["lr"] for g in groups] == pytest.approx(list(expected.values()), rel=1e-6)

    infos = network.param_group_infos(te_lr, unet_lr, 1e-4)
    assert [i.description for i in infos] == descriptions
    assert [i.lr for i in infos] == [g["lr"] for g in groups]
    ids = {id(p): name for name, p in network.named_parameters()}
    covered = []
    for group, info in zip(groups, infos):
        names = [ids[id(p)] for p in group["params"]]
        covered += names
        assert info.tensors == len(names)
        assert info.parameters == sum(p.numel() for p in group["params"])
        assert info.plus == info.description.endswith(" plus")
        if info.component == "textencoder":
            assert info.block is None and all(n.startswith("lora_te") for n in names)
        else:
            assert info.description.startswith(f"unet_block{info.block}")
            assert {block_index(n.partition(".")[0]) for n in names} == {info.block}
        ratio = te_ratio if info.component == "textencoder" else unet_ratio
        if info.plus:
            assert all(n.endswith("lora_up.weight") for n in names)
        elif ratio:
            assert all(n.endswith("lora_down.weight") for n in names)
    # Every parameter in exactly one group; each block group holds all modules of its block.
    assert sorted(covered) == sorted(ids.values())
    for block in block_weights:
        in_block = {m.lora_name for m in network.unet_loras if block_index(m.lora_name) == block}
        grouped = {ids[id(p)].partition(".")[0] for g, i in zip(groups, infos) if i.block == block for p in g["params"]}
        assert grouped == in_block


def test_block_weights_leave_text_encoder_and_zero_unet_lr_alone(models):
    network = _network(models, down_lr_weight="1,1,1,1,1,1,0.5,0.5,0.5", loraplus_lr_ratio="16")
    groups, descriptions = network.prepare_optimizer_params(3e-5, 0.0, 1e-4)
    assert descriptions == ["textencoder", "textencoder plus"]
    assert [g["lr"] for g in groups] == pytest.approx([3e-5, 4.8e-4])


def test_block_dims_alone_keep_one_unet_group(models):
    network = _network(models, block_dims=",".join(["2"] * 23))
    assert {m.lora_down.weight.shape[0] for m in network.unet_loras} == {2}
    _, descriptions = network.prepare_optimizer_params(None, None, 1e-4)
    assert descriptions == ["textencoder", "unet"]


def test_block_dims_and_alphas_set_module_ranks(models):
    dims = [4] * 23
    dims[5], dims[6], dims[11], dims[13] = 2, 0, 7, 1
    alphas = [1.0] * 23
    alphas[11], alphas[13] = 3.5, 0.0  # alpha 0 means alpha = rank
    network = lora.create_network(
        1.0,
        8,
        2.0,
        models.vae,
        [models.text_encoder1, models.text_encoder2],
        models.unet,
        block_dims=",".join(map(str, dims)),
        block_alphas=",".join(map(str, alphas)),
    )
    seen = set()
    for module in network.unet_loras:
        block = block_index(module.lora_name)
        seen.add(block)
        assert module.lora_down.weight.shape[0] == dims[block], module.lora_name
        assert module.lora_up.weight.shape[1] == dims[block]
        assert float(module.alpha) == (alphas[block] or dims[block])
    assert seen == set(TINY_BLOCKS) - {6}  # block_dims 0: no module in input_blocks_5
    assert {m.lora_down.weight.shape[0] for m in network.text_encoder_loras} == {8}
    assert {float(m.alpha) for m in network.text_encoder_loras} == {2.0}
    assert "lora_unet_middle_block_1_proj_in.lora_down.weight" in network.state_dict()
    assert network.state_dict()["lora_unet_middle_block_1_proj_in.lora_down.weight"].shape[0] == 7


def test_conv_block_dims_and_zero_weight_blocks_with_conv(models):
    conv_dims = [3] * 23
    conv_dims[2], conv_dims[19] = 1, 0  # input_blocks_1, output_blocks_6
    network = _network(
        models,
        conv_dim="5",
        conv_block_dims=",".join(map(str, conv_dims)),
        conv_block_alphas=",".join(["1.5"] * 23),
        up_lr_weight="1,1,1,1,1,1,1,0,1",  # output_blocks_7 dropped
    )
    by_block: dict[int, set] = {}
    for module in network.unet_loras:
        block = block_index(module.lora_name)
        is_3x3 = module.lora_down.weight.dim() == 4 and tuple(module.lora_down.weight.shape[2:]) == (3, 3)
        by_block.setdefault(block, set()).add(is_3x3)
        if is_3x3:
            assert module.lora_down.weight.shape[0] == conv_dims[block] and float(module.alpha) == 1.5
        else:
            assert module.lora_down.weight.shape[0] == 4 and float(module.alpha) == 1.0
    assert by_block[2] == {True, False}  # resnet convs (conv_block_dims) and its emb Linear (block_dims)
    assert by_block[19] == {False}  # conv dim 0: only the Linear / 1x1 layers
    assert 20 not in by_block  # lr weight 0: nothing at all
    assert 1 not in by_block and 0 not in by_block and 22 not in by_block  # conv_in, embeddings, out: never
    _, descriptions = network.prepare_optimizer_params(None, None, 1e-4)
    assert "unet_block20" not in descriptions and "unet_block19" in descriptions


def test_network_from_weights_freezes_zero_weight_blocks(models):
    source = _network(models)
    network, _ = lora.create_network_from_weights(
        1.0,
        None,
        models.vae,
        [models.text_encoder1, models.text_encoder2],
        models.unet,
        weights_sd=source.state_dict(),
        down_lr_weight="1,1,1,1,0,1,1,1,1",
        block_lr_zero_threshold="0",
    )
    frozen = [m for m in network.unet_loras if block_index(m.lora_name) == 5]
    assert frozen  # the file's modules stay (and are saved back unchanged)
    groups, descriptions = network.prepare_optimizer_params(None, None, 1e-4)
    assert "unet_block5" not in descriptions and "unet_block6" in descriptions
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    network.prepare_grad_etc(None, None)
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    trained = {id(p) for g in groups for p in g["params"]}
    assert all(p.requires_grad == (id(p) in trained) for p in network.parameters())


def test_bad_block_args_stop_create_network(models):
    from library.errors import UserInputError

    with pytest.raises(UserInputError, match="down_lr_weight needs 9"):
        _network(models, down_lr_weight="1,1,1")


@pytest.mark.slow
def test_block_weighted_loraplus_step(models):
    """One Lion step: B of a block moves by lr x block weight x ratio per element."""
    from lion_pytorch import Lion

    network = _network(models, down_lr_weight="1,1,1,1,1,1,0.5,0.5,0.25", loraplus_unet_lr_ratio="4")
    network.apply_to(None, models.unet, apply_text_encoder=False, apply_unet=True)
    try:
        lr = 1e-3
        optimizer = Lion(network.prepare_optimizer_params(None, None, lr)[0], lr=lr, weight_decay=0.0)
        before = {m.lora_name: m.lora_up.weight.detach().clone() for m in network.unet_loras}
        models.unet(**_unet_inputs(models)).sample.pow(2).mean().backward()
        optimizer.step()
        weights = {8: 0.5, 9: 0.25}
        checked = set()
        for module in network.unet_loras:
            block = block_index(module.lora_name)
            nonzero = module.lora_up.weight.grad.abs() > 0
            delta = (module.lora_up.weight.detach() - before[module.lora_name]).abs()[nonzero]
            expected = lr * weights.get(block, 1.0) * 4
            assert torch.allclose(delta, torch.full_like(delta, expected), rtol=1e-4), module.lora_name
            if nonzero.any():
                checked.add(block)
        assert {5, 8, 9} <= checked
    finally:
        network.remove_from_model()
        models.unet.zero_grad(set_to_none=True)
