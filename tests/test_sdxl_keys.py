"""The diffusers <-> original SDXL name tables, against names known from real SDXL checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from networks.sdxl_keys import (
    te1_state_dict_to_original,
    te2_state_dict_to_original,
    te_name_with_text_model,
    unet_diffusers_to_original,
    unet_original_to_diffusers,
    unet_state_dict_to_original,
    vae_diffusers_to_original,
    vae_state_dict_to_original,
)

# (diffusers, original) pairs as they appear in SDXL base 1.0 and sd-scripts' LoRA names.
UNET_PAIRS = [
    ("conv_in", "input_blocks.0.0"),
    ("conv_in.weight", "input_blocks.0.0.weight"),
    ("time_embedding.linear_1.weight", "time_embed.0.weight"),
    ("time_embedding.linear_2.bias", "time_embed.2.bias"),
    ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
    ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
    ("down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight"),
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.0.downsamplers.0.conv.bias", "input_blocks.3.0.op.bias"),
    ("down_blocks.1.resnets.0.time_emb_proj.weight", "input_blocks.4.0.emb_layers.1.weight"),
    ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.1.attentions.1.proj_in.weight", "input_blocks.5.1.proj_in.weight"),
    ("down_blocks.1.downsamplers.0.conv.weight", "input_blocks.6.0.op.weight"),
    ("down_blocks.2.resnets.1.norm2.bias", "input_blocks.8.0.out_layers.0.bias"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", "input_blocks.8.1.transformer_blocks.9.attn2.to_k"),
    ("mid_block.resnets.0.conv2.weight", "middle_block.0.out_layers.3.weight"),
    ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    (
        "mid_block.attentions.0.transformer_blocks.9.attn2.to_v.weight",
        "middle_block.1.transformer_blocks.9.attn2.to_v.weight",
    ),
    ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
    ("up_blocks.0.resnets.0.conv_shortcut", "output_blocks.0.0.skip_connection"),
    ("up_blocks.0.attentions.2.proj_out.weight", "output_blocks.2.1.proj_out.weight"),
    (
        "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "output_blocks.0.1.transformer_blocks.0.ff.net.0.proj",
    ),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.2.conv.weight"),
    (
        "up_blocks.1.attentions.1.transformer_blocks.1.attn1.to_out.0",
        "output_blocks.4.1.transformer_blocks.1.attn1.to_out.0",
    ),
    ("up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
    ("up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
    ("conv_norm_out.weight", "out.0.weight"),
    ("conv_out.bias", "out.2.bias"),
]


@pytest.mark.parametrize(("diffusers", "original"), UNET_PAIRS)
def test_unet_names_both_ways(diffusers, original):
    assert unet_diffusers_to_original(diffusers) == original
    assert unet_original_to_diffusers(original) == diffusers


@pytest.mark.parametrize(
    "name",
    ["down_blocks.1", "up_blocks", "time_proj", "down_blocks.0.resnets.0.nonlinearity", "down_blocks.0.attentions.0"],
)
def test_unet_names_without_counterpart_raise(name):
    with pytest.raises(ValueError, match="not a mappable SDXL UNet"):
        unet_diffusers_to_original(name)


def test_unet_original_names_without_counterpart_raise():
    for name in ["input_blocks.1.1.proj_in", "output_blocks.8.1.conv", "middle_block.0.in_layers.1", "foo"]:
        with pytest.raises(ValueError):
            unet_original_to_diffusers(name)


def _meta_sdxl_unet():
    from diffusers import UNet2DConditionModel

    from library.model.loading import SHIPPED_CONFIG_DIR

    config = UNet2DConditionModel.load_config(SHIPPED_CONFIG_DIR, subfolder="unet")
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def test_shipped_unet_config_is_sdxl_base_and_every_key_maps():
    unet = _meta_sdxl_unet()
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    sd = unet.state_dict()
    assert len(sd) == 1680
    original = unet_state_dict_to_original(sd)
    assert len(original) == 1680  # one-to-one
    for name in [
        "input_blocks.3.0.op.weight",
        "input_blocks.6.0.op.weight",
        "output_blocks.2.2.conv.weight",
        "output_blocks.5.2.conv.weight",
        "label_emb.0.0.weight",
        "middle_block.1.transformer_blocks.9.attn2.to_v.weight",
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "out.2.weight",
    ]:
        assert name in original
    assert tuple(original["output_blocks.2.2.conv.weight"].shape) == (1280, 1280, 3, 3)
    assert tuple(original["middle_block.1.transformer_blocks.9.attn2.to_v.weight"].shape) == (1280, 2048)
    assert tuple(original["label_emb.0.0.weight"].shape) == (1280, 2816)
    assert {unet_original_to_diffusers(k) for k in original} == set(sd)
    # every Linear/Conv module maps too (what the LoRA walker asks for)
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            assert unet_original_to_diffusers(unet_diffusers_to_original(name)) == name


VAE_PAIRS = [
    ("encoder.conv_in.weight", "encoder.conv_in.weight"),
    ("encoder.down_blocks.0.resnets.1.norm2.bias", "encoder.down.0.block.1.norm2.bias"),
    ("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", "encoder.down.1.block.0.nin_shortcut.weight"),
    ("encoder.down_blocks.2.downsamplers.0.conv.weight", "encoder.down.2.downsample.conv.weight"),
    ("encoder.mid_block.resnets.0.conv1.weight", "encoder.mid.block_1.conv1.weight"),
    ("encoder.mid_block.resnets.1.conv2.bias", "encoder.mid.block_2.conv2.bias"),
    ("encoder.mid_block.attentions.0.group_norm.weight", "encoder.mid.attn_1.norm.weight"),
    ("encoder.mid_block.attentions.0.to_q.weight", "encoder.mid.attn_1.q.weight"),
    ("decoder.mid_block.attentions.0.to_out.0.bias", "decoder.mid.attn_1.proj_out.bias"),
    ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
    ("decoder.up_blocks.0.resnets.2.conv1.weight", "decoder.up.3.block.2.conv1.weight"),
    ("decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.up.3.upsample.conv.weight"),
    ("decoder.up_blocks.2.resnets.0.conv_shortcut.bias", "decoder.up.1.block.0.nin_shortcut.bias"),
    ("decoder.up_blocks.3.resnets.0.norm1.weight", "decoder.up.0.block.0.norm1.weight"),
    ("decoder.conv_norm_out.bias", "decoder.norm_out.bias"),
    ("quant_conv.weight", "quant_conv.weight"),
    ("post_quant_conv.bias", "post_quant_conv.bias"),
]


@pytest.mark.parametrize(("diffusers", "original"), VAE_PAIRS)
def test_vae_names(diffusers, original):
    assert vae_diffusers_to_original(diffusers) == original


def test_vae_attention_weights_become_1x1_convs():
    sd = {
        "encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(8, 3, 3, 3),
        "encoder.mid_block.attentions.0.to_q.weight": torch.arange(16.0).reshape(4, 4),
        "encoder.mid_block.attentions.0.to_q.bias": torch.zeros(4),
        "decoder.mid_block.attentions.0.to_out.0.weight": torch.ones(4, 4),
    }
    out = vae_state_dict_to_original(sd)
    assert out["encoder.mid.attn_1.q.weight"].shape == (4, 4, 1, 1)
    q = out["encoder.mid.attn_1.q.weight"]
    assert torch.equal(q[:, :, 0, 0], sd["encoder.mid_block.attentions.0.to_q.weight"])
    assert out["encoder.mid.attn_1.q.bias"].shape == (4,)
    assert out["decoder.mid.attn_1.proj_out.weight"].shape == (4, 4, 1, 1)
    assert out["encoder.down.0.block.0.conv1.weight"].shape == (8, 3, 3, 3)


def test_te1_names_keep_text_model():
    name = "encoder.layers.0.self_attn.q_proj"
    assert te_name_with_text_model(name) == "text_model.encoder.layers.0.self_attn.q_proj"
    assert te_name_with_text_model("text_model.final_layer_norm.weight") == "text_model.final_layer_norm.weight"
    assert te_name_with_text_model("text_projection.weight") == "text_projection.weight"
    sd = {"embeddings.token_embedding.weight": torch.zeros(2), "embeddings.position_ids": torch.zeros(2)}
    assert list(te1_state_dict_to_original(sd)) == ["text_model.embeddings.token_embedding.weight"]


def _fake_te2_state_dict(hidden=4, proj=3, layers=2):
    sd = {
        "text_model.embeddings.token_embedding.weight": torch.randn(10, hidden),
        "text_model.embeddings.position_embedding.weight": torch.randn(7, hidden),
        "text_model.final_layer_norm.weight": torch.randn(hidden),
        "text_model.final_layer_norm.bias": torch.randn(hidden),
        "text_projection.weight": torch.randn(proj, hidden),
    }
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}."
        for name in ["q_proj", "k_proj", "v_proj", "out_proj"]:
            sd[f"{p}self_attn.{name}.weight"] = torch.randn(hidden, hidden)
            sd[f"{p}self_attn.{name}.bias"] = torch.randn(hidden)
        for name, shape in [
            ("layer_norm1", (hidden,)),
            ("layer_norm2", (hidden,)),
            ("mlp.fc1", (4 * hidden, hidden)),
            ("mlp.fc2", (hidden, 4 * hidden)),
        ]:
            sd[f"{p}{name}.weight"] = torch.randn(shape)
            sd[f"{p}{name}.bias"] = torch.randn(shape[0])
    return sd


def test_te2_open_clip_layout():
    sd = _fake_te2_state_dict()
    out = te2_state_dict_to_original(sd)
    assert len(out) == 2 * 12 + 6
    assert torch.equal(out["token_embedding.weight"], sd["text_model.embeddings.token_embedding.weight"])
    assert torch.equal(out["positional_embedding"], sd["text_model.embeddings.position_embedding.weight"])
    assert torch.equal(out["text_projection"], sd["text_projection.weight"].T)  # [hidden, projection]
    assert out["text_projection"].shape == (4, 3)
    layer = "text_model.encoder.layers.1.self_attn."
    qkv = torch.cat([sd[layer + "q_proj.weight"], sd[layer + "k_proj.weight"], sd[layer + "v_proj.weight"]])
    assert torch.equal(out["transformer.resblocks.1.attn.in_proj_weight"], qkv)
    assert torch.equal(out["transformer.resblocks.1.attn.in_proj_bias"][4:8], sd[layer + "k_proj.bias"])
    assert torch.equal(out["transformer.resblocks.1.attn.out_proj.weight"], sd[layer + "out_proj.weight"])
    assert torch.equal(out["transformer.resblocks.0.ln_1.bias"], sd["text_model.encoder.layers.0.layer_norm1.bias"])
    assert torch.equal(out["transformer.resblocks.0.mlp.c_fc.weight"], sd["text_model.encoder.layers.0.mlp.fc1.weight"])
    assert torch.equal(out["transformer.resblocks.0.mlp.c_proj.bias"], sd["text_model.encoder.layers.0.mlp.fc2.bias"])
    assert torch.equal(out["ln_final.weight"], sd["text_model.final_layer_norm.weight"])
    assert out["logit_scale"].shape == () and math.isclose(out["logit_scale"].item(), math.log(100.0), rel_tol=1e-6)


def test_te2_rejects_unknown_names():
    sd = _fake_te2_state_dict(layers=1)
    sd["text_model.encoder.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="TE2"):
        te2_state_dict_to_original(sd)


def test_single_file_prefixes_and_full_size_key_counts():
    """The full-size SDXL architecture (meta tensors) gives the real file's section sizes and the names diffusers
    uses to detect an SDXL single file."""
    from tools.make_tiny_sdxl import full_sdxl_shapes

    shapes = full_sdxl_shapes()
    prefixes = (
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.embedders.0.transformer.",
        "conditioner.embedders.1.model.",
    )
    counts = {p: sum(k.startswith(p) for k in shapes) for p in prefixes}
    assert counts == {
        "model.diffusion_model.": 1680,
        "first_stage_model.": 248,
        "conditioner.embedders.0.transformer.": 196,
        "conditioner.embedders.1.model.": 390,
    }
    assert len(shapes) == sum(counts.values())
    assert "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias" in shapes  # diffusers' xl_base key
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in shapes
    assert tuple(shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"]) == (3840, 1280)
    assert tuple(shapes["conditioner.embedders.1.model.text_projection"]) == (1280, 1280)
    assert tuple(shapes["conditioner.embedders.1.model.logit_scale"]) == ()
    assert tuple(shapes["first_stage_model.encoder.mid.attn_1.k.weight"]) == (512, 512, 1, 1)
    assert tuple(shapes["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"]) == (128, 256, 1, 1)
