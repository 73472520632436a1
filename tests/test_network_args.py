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
    ratios = LoRAPlusRatios.from_network_args(
        {"loraplus_lr_ratio": "16", "loraplus_unet_lr_ratio": "4.5"}
    )
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
