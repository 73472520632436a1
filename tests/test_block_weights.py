"""sd-scripts' SDXL block-wise network_args: block numbers, lr weights, presets, dims (pure, no model)."""

from __future__ import annotations

import pytest

from library.errors import UserInputError
from networks.block_weights import (
    NUM_BLOCKS,
    BlockDims,
    block_dims_and_alphas,
    block_index,
    block_label,
    block_lr_weights,
    check_block_arg,
    check_block_combination,
    preset_weights,
)

# cos(k * pi / 16), k = 0..8: sd-scripts' "cosine" over 9 blocks (1 -> 0).
COSINE_9 = [1.0, 0.9807853, 0.9238795, 0.8314696, 0.7071068, 0.5555702, 0.3826834, 0.1950903, 0.0]


@pytest.mark.parametrize(
    "lora_name, index",
    [
        ("lora_unet_time_embed_0", 0),
        ("lora_unet_label_emb_0_0", 0),
        ("lora_unet_input_blocks_0_0", 1),
        ("lora_unet_input_blocks_1_0_in_layers_2", 2),
        ("lora_unet_input_blocks_3_0_op", 4),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 5),
        ("lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0", 9),
        ("lora_unet_middle_block_0_emb_layers_1", 10),
        ("lora_unet_middle_block_1_proj_in", 11),
        ("lora_unet_middle_block_2_out_layers_3", 12),
        ("lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_0_proj", 13),
        ("lora_unet_output_blocks_5_2_conv", 18),
        ("lora_unet_output_blocks_8_0_skip_connection", 21),
        ("lora_unet_out_2", 22),
    ],
)
def test_block_index_of_sdxl_unet_names(lora_name, index):
    assert block_index(lora_name) == index


@pytest.mark.parametrize(
    "lora_name",
    [
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_unet_input_blocks_9_0_op",
        "lora_unet_middle_block_3_proj_in",
        "lora_unet_down_blocks_1_attentions_0_proj_in",  # diffusers layout: not what files use
        "lora_unet_output_blocks_x_1_proj_in",
    ],
)
def test_block_index_rejects_other_names(lora_name):
    with pytest.raises(ValueError):
        block_index(lora_name)


def test_block_labels():
    assert [block_label(i) for i in (0, 1, 9, 10, 12, 13, 21, 22)] == [
        "time_embed",
        "input_blocks_0",
        "input_blocks_8",
        "middle_block_0",
        "middle_block_2",
        "output_blocks_0",
        "output_blocks_8",
        "out",
    ]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("cosine", COSINE_9),
        ("sine", COSINE_9[::-1]),
        ("linear", [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]),
        ("reverse_linear", [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]),
        ("zeros", [0.0] * 9),
        ("zeros+0.5", [0.5] * 9),
        ("cosine+.25", [w + 0.25 for w in COSINE_9]),
        ("linear+1", [1.0, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875, 2.0]),
    ],
)
def test_presets_match_sd_scripts(spec, expected):
    assert preset_weights(spec) == pytest.approx(expected, abs=1e-7)


def test_no_lr_weight_key_means_no_block_groups():
    assert block_lr_weights({}) is None
    assert block_lr_weights({"block_dims": ",".join(["4"] * 23)}) is None


def test_lr_weights_layout_defaults_and_empty_entries():
    weights = block_lr_weights({"down_lr_weight": "1,1,1,1,1,1,0.5,0.5,0.5"})
    assert len(weights) == NUM_BLOCKS
    # [embedding] + down 9 + mid 3 + up 9 + [out]; unset mid/up weigh 1.
    assert weights == (1.0, 1, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 1, 1, 1, *[1.0] * 9, 1.0)
    weights = block_lr_weights({"mid_lr_weight": "0.25,,2", "up_lr_weight": "2,,2,2,2,2,2,2,2"})
    assert weights[10:13] == (0.25, 0.0, 2.0)  # an empty entry is 0 (sd-scripts)
    assert weights[13:22] == (2.0, 0.0, 2, 2, 2, 2, 2, 2, 2)
    assert weights[1:10] == (1.0,) * 9 and weights[0] == weights[22] == 1.0


def test_preset_and_threshold_zero_blocks():
    weights = block_lr_weights({"up_lr_weight": "cosine+.25", "down_lr_weight": "linear"})
    assert weights[13:22] == pytest.approx([w + 0.25 for w in COSINE_9], abs=1e-7)
    # linear starts at 0: not above the default threshold 0, so input_blocks_0 weighs 0.
    assert weights[1:10] == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0])
    weights = block_lr_weights({"down_lr_weight": "linear", "block_lr_zero_threshold": "0.3"})
    assert weights[1:10] == pytest.approx([0, 0, 0, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0])
    assert weights[10:13] == (1.0, 1.0, 1.0)  # the threshold applies only to given weights
    # A weight equal to the threshold is dropped too; negatives always are.
    weights = block_lr_weights({"mid_lr_weight": "0.3,-1,0.31", "block_lr_zero_threshold": "0.3"})
    assert weights[10:13] == (0.0, 0.0, 0.31)


def test_block_dims_default_to_network_dims_and_zero_weight_blocks_get_none():
    lr = block_lr_weights({"down_lr_weight": "1,1,1,1,0,1,1,1,1"})
    dims = block_dims_and_alphas({}, 8, 4.0, None, None, lr)
    assert dims.dims == (8,) * 5 + (0,) + (8,) * 17
    assert dims.alphas == (4.0,) * 23
    assert dims.conv_dims is None and dims.conv_alphas is None
    assert dims.dim_and_alpha("lora_unet_input_blocks_4_1_proj_in", False) is None
    assert dims.dim_and_alpha("lora_unet_input_blocks_5_1_proj_in", False) == (8, 4.0)
    assert dims.dim_and_alpha("lora_unet_input_blocks_5_0_in_layers_2", True) is None  # no conv adapted
    # Without any block key, nothing is per block.
    assert block_dims_and_alphas({}, 8, 4.0, 4, 1.0, None) is None


def test_block_dims_alphas_and_conv_lists():
    block_dims = ",".join(str(i % 5) for i in range(23))
    args = {
        "block_dims": block_dims,
        "block_alphas": ",".join(["0.5"] * 23),
        "conv_block_dims": ",".join(["2"] * 11 + ["0"] * 12),
    }
    dims = block_dims_and_alphas(args, 8, 4.0, None, None, None)
    assert dims.dims == tuple(i % 5 for i in range(23))
    assert dims.alphas == (0.5,) * 23
    assert dims.conv_dims == (2,) * 11 + (0,) * 12
    assert dims.conv_alphas == (1.0,) * 23  # conv_alpha unset: 1, as sd-scripts
    assert dims.dim_and_alpha("lora_unet_input_blocks_2_0_in_layers_2", True) == (2, 1.0)
    assert dims.dim_and_alpha("lora_unet_output_blocks_0_0_in_layers_2", True) is None
    assert dims.dim_and_alpha("lora_unet_input_blocks_3_0_op", False) == (4, 0.5)
    # conv_dim / conv_alpha fill the conv lists when conv_block_dims is unset; conv_block_alphas is honoured.
    dims = block_dims_and_alphas({"conv_block_alphas": ",".join(["3"] * 23)}, 8, 4.0, 6, 2.0, None)
    assert dims.conv_dims == (6,) * 23 and dims.conv_alphas == (3.0,) * 23
    dims = block_dims_and_alphas({"block_alphas": ",".join(["2"] * 23)}, 8, 4.0, 6, None, None)
    assert dims.dims == (8,) * 23 and dims.conv_dims == (6,) * 23 and dims.conv_alphas == (1.0,) * 23


def test_blocks_dataclass_is_plain():
    dims = BlockDims(dims=(1,) * 23, alphas=(1.0,) * 23)
    assert dims.dim_and_alpha("lora_unet_middle_block_1_proj_out", False) == (1, 1.0)


@pytest.mark.parametrize(
    "key, value, fragments",
    [
        ("down_lr_weight", "1,1,1,1,1,1,0.5,0.5", ["down_lr_weight", "needs 9", "got 8"]),
        ("up_lr_weight", "1,1,1,1,1,1,1,1,1,1", ["up_lr_weight", "needs 9", "got 10"]),
        ("mid_lr_weight", "0.5", ["mid_lr_weight", "needs 3", "got 1"]),
        ("mid_lr_weight", "cosine", ["mid_lr_weight", "needs 3"]),
        ("down_lr_weight", "cosin", ["down_lr_weight", "nor a preset", "cosine+.25"]),
        ("down_lr_weight", "cosine+x", ["down_lr_weight", "offset", "not a number"]),
        ("down_lr_weight", "1,1,1,1,a,1,1,1,1", ["down_lr_weight", "'a'", "not a number"]),
        ("down_lr_weight", "", ["down_lr_weight", "needs 9", "got nothing"]),
        ("block_lr_zero_threshold", "-0.1", ["block_lr_zero_threshold", ">= 0"]),
        ("block_dims", "4,4,4", ["block_dims", "needs 23", "got 3"]),
        ("block_dims", ",".join(["4"] * 22 + ["4.5"]), ["block_dims", "'4.5'", "not an integer"]),
        ("conv_block_dims", ",".join(["4"] * 22 + ["-1"]), ["conv_block_dims", "not an integer >= 0"]),
        ("block_alphas", ",".join(["1"] * 22 + [""]), ["block_alphas", "empty entry"]),
        ("conv_block_alphas", ",".join(["1"] * 24), ["conv_block_alphas", "needs 23", "got 24"]),
    ],
)
def test_bad_values_are_one_line_errors(key, value, fragments):
    with pytest.raises(UserInputError) as info:
        check_block_arg(key, value)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    "args, fragment",
    [
        ({"block_lr_zero_threshold": "0.1"}, "block_lr_zero_threshold has no effect"),
        ({"conv_block_alphas": ",".join(["1"] * 23)}, "conv_block_alphas needs conv_block_dims or conv_dim"),
    ],
)
def test_keys_without_effect_are_rejected(args, fragment):
    with pytest.raises(UserInputError, match=fragment):
        check_block_combination(args)
    check_block_combination({**args, "up_lr_weight": "zeros+1", "conv_dim": "4"})
