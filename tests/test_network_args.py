"""network_args parsing and LoRA+ ratio resolution (pure, no model)."""

import pytest

from library.errors import UserInputError
from networks.network_args import LoRAPlusRatios, merge_loraplus_flags, parse_network_args


def test_parses_raw_strings_and_floats():
    args = parse_network_args(["loraplus_lr_ratio=16", "conv_dim=8", "conv_alpha = 0.5"])
    assert args == {"loraplus_lr_ratio": "16", "conv_dim": "8", "conv_alpha": "0.5"}
    assert LoRAPlusRatios.from_network_args(args) == LoRAPlusRatios(unet=16.0, text_encoder=16.0)


@pytest.mark.parametrize(
    "items, fragment",
    [
        (["loraplus_lr_ratio"], "is not key=value"),
        (["lora_plus_ratio=16"], "unknown key 'lora_plus_ratio'"),
        (["loraplus_lr_ratio=sixteen"], "is not a number"),
        (["loraplus_lr_ratio=-2"], "must be a positive number"),
        (["conv_dim=3.5"], "is not an integer"),
        (["loraplus_lr_ratio=16", "loraplus_lr_ratio=8"], "given twice"),
    ],
)
def test_bad_network_args_are_one_line_errors(items, fragment):
    with pytest.raises(UserInputError) as info:
        parse_network_args(items)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(UserInputError, match="valid keys: .*loraplus_unet_lr_ratio"):
        parse_network_args(["nope=1"])


def test_specific_ratio_beats_general():
    ratios = LoRAPlusRatios.from_network_args({"loraplus_lr_ratio": "16", "loraplus_unet_lr_ratio": "4.5"})
    assert ratios == LoRAPlusRatios(unet=4.5, text_encoder=16.0)
    only_te = LoRAPlusRatios.from_network_args({"loraplus_text_encoder_lr_ratio": "2"})
    assert only_te == LoRAPlusRatios(unet=None, text_encoder=2.0)


def test_flags_fold_into_network_args():
    merged = merge_loraplus_flags({}, {"loraplus_lr_ratio": 16.0, "loraplus_unet_lr_ratio": 2.5})
    assert merged == {"loraplus_lr_ratio": "16", "loraplus_unet_lr_ratio": "2.5"}
    # The same value both ways is fine (16 == 16.0).
    assert merge_loraplus_flags({"loraplus_lr_ratio": "16.0"}, {"loraplus_lr_ratio": 16.0}) == {
        "loraplus_lr_ratio": "16.0"
    }


def test_flag_and_network_arg_that_disagree_stop_the_run():
    with pytest.raises(UserInputError, match="disagrees"):
        merge_loraplus_flags({"loraplus_lr_ratio": "8"}, {"loraplus_lr_ratio": 16.0})


def test_block_keys_are_accepted_as_raw_strings():
    items = [
        "down_lr_weight=1,1,1,1,1,1,0.5,0.5,0.5",
        "mid_lr_weight=1,0.5,1",
        "up_lr_weight=cosine+.25",
        "block_lr_zero_threshold=0.1",
        "block_dims=" + ",".join(["8"] * 23),
        "block_alphas=" + ",".join(["4"] * 23),
        "conv_block_dims=" + ",".join(["2"] * 23),
        "conv_block_alphas=" + ",".join(["1"] * 23),
    ]
    args = parse_network_args(items)
    assert args["up_lr_weight"] == "cosine+.25"
    assert args["down_lr_weight"] == "1,1,1,1,1,1,0.5,0.5,0.5"
    assert len(args) == 8


@pytest.mark.parametrize(
    "items, fragment",
    [
        (["down_lr_weight=1,1,1"], "down_lr_weight needs 9 comma-separated numbers (input_blocks 0-8)"),
        (["mid_lr_weight=1,1"], "mid_lr_weight needs 3 comma-separated numbers (middle_block 0-2), got 2"),
        (["up_lr_weight=wave"], "up_lr_weight='wave' is neither 9 comma-separated numbers"),
        (["block_dims=4,4"], "block_dims needs 23 comma-separated integers >= 0 (one per SDXL block 0-22), got 2"),
        (["block_lr_zero_threshold=0.5"], "has no effect without down_lr_weight"),
        (["conv_block_alphas=" + ",".join(["1"] * 23)], "conv_block_alphas needs conv_block_dims or conv_dim"),
    ],
)
def test_bad_block_network_args_are_one_line_errors(items, fragment):
    with pytest.raises(UserInputError) as info:
        parse_network_args(items)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_lists_the_block_keys_too():
    with pytest.raises(UserInputError) as info:
        parse_network_args(["down_lr_weights=1"])
    message = str(info.value)
    for key in (
        "conv_dim",
        "loraplus_lr_ratio",
        "down_lr_weight",
        "mid_lr_weight",
        "up_lr_weight",
        "block_lr_zero_threshold",
        "block_dims",
        "block_alphas",
        "conv_block_dims",
        "conv_block_alphas",
    ):
        assert key in message
