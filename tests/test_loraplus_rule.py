"""The one LoRA+ grouping rule (networks/loraplus.py): its table of groups and rates, and PEFT's LoRA+ optimizer
putting the same tensors in the fast group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks.block_weights import block_lr_weights
from networks.loraplus import LoRAPlusRule, group_of, grouped, planned_groups
from networks.network_args import LoRAPlusRatios

TE1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
TE2 = "lora_te2_text_model_encoder_layers_31_mlp_fc2"
UNET5 = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # block 5
UNET11 = "lora_unet_middle_block_1_proj_in"  # block 11
UNET18 = "lora_unet_output_blocks_5_2_conv"  # block 18
NAMES = (TE1, TE2, UNET5, UNET11, UNET18)
A, B = "lora_down.weight", "lora_up.weight"


def _table(rule: LoRAPlusRule) -> dict[tuple[str, str], tuple[str, float]]:
    """(LoRA name, parameter) -> (group, lr) for the dropped groups too."""
    return {
        (name, side): (group.description, group.lr)
        for name in NAMES
        for side in (A, B)
        for group in [group_of(rule, name, side)]
    }


def _expected(te: tuple[str, float, str, float], unet: dict[str, tuple[str, float, str, float]]):
    rows = {(name, side): (te[0], te[1]) if side == A else (te[2], te[3]) for name in (TE1, TE2) for side in (A, B)}
    for name, (a_group, a_lr, b_group, b_lr) in unet.items():
        rows[(name, A)], rows[(name, B)] = (a_group, a_lr), (b_group, b_lr)
    return rows


def _same_unet(*row):
    return {name: row for name in (UNET5, UNET11, UNET18)}


# down: input_blocks 0-8 = blocks 1-9, block 5 (input_blocks_4) weighs 0.5; mid: blocks 10-12, block 11 weighs 2;
# up: output_blocks 0-8 = blocks 13-21, block 18 weighs 0.05, not above the threshold: 0, dropped
BLOCKS = {
    "down_lr_weight": "1,1,1,1,0.5,1,1,1,1",
    "mid_lr_weight": "0.25,2,0.25",
    "up_lr_weight": "1,1,1,1,1,0.05,1,1,1",
    "block_lr_zero_threshold": "0.1",
}

CASES = {
    "no ratio: A and B share one group per component": (
        LoRAPlusRule.from_rates(1e-4),
        _expected(("textencoder", 1e-4, "textencoder", 1e-4), _same_unet("unet", 1e-4, "unet", 1e-4)),
    ),
    "ratio 16: B at lr x 16 in each component": (
        LoRAPlusRule.from_rates(1e-4, ratios=LoRAPlusRatios(unet=16.0, text_encoder=16.0)),
        _expected(("textencoder", 1e-4, "textencoder plus", 1.6e-3), _same_unet("unet", 1e-4, "unet plus", 1.6e-3)),
    ),
    "specific ratios beat the general one; unet_lr and text_encoder_lr beat learning_rate": (
        LoRAPlusRule.from_network_args(1e-4, 2e-4, [5e-5], {"loraplus_lr_ratio": "16", "loraplus_unet_lr_ratio": "4"}),
        _expected(("textencoder", 5e-5, "textencoder plus", 8e-4), _same_unet("unet", 2e-4, "unet plus", 8e-4)),
    ),
    "ratio for the text encoders only": (
        LoRAPlusRule.from_network_args(1e-4, 3e-4, None, {"loraplus_text_encoder_lr_ratio": "2.5"}),
        _expected(("textencoder", 1e-4, "textencoder plus", 2.5e-4), _same_unet("unet", 3e-4, "unet", 3e-4)),
    ),
    "text_encoder_lr list: its first value": (
        LoRAPlusRule.from_rates(1e-4, None, [3e-5, 7e-5], LoRAPlusRatios(unet=None, text_encoder=2.0)),
        _expected(("textencoder", 3e-5, "textencoder plus", 6e-5), _same_unet("unet", 1e-4, "unet", 1e-4)),
    ),
    "unet_lr 0: the UNet's groups at 0 (dropped)": (
        LoRAPlusRule.from_rates(1e-4, 0.0, None, LoRAPlusRatios(unet=16.0, text_encoder=16.0)),
        _expected(("textencoder", 1e-4, "textencoder plus", 1.6e-3), _same_unet("unet", 0.0, "unet plus", 0.0)),
    ),
    "block weights with a ratio: one group per block, lr x weight (x ratio for B), threshold -> 0": (
        LoRAPlusRule.from_network_args(1e-4, None, None, {**BLOCKS, "loraplus_lr_ratio": "16"}),
        _expected(
            ("textencoder", 1e-4, "textencoder plus", 1.6e-3),
            {
                UNET5: ("unet_block5", 5e-5, "unet_block5 plus", 8e-4),
                UNET11: ("unet_block11", 2e-4, "unet_block11 plus", 3.2e-3),
                UNET18: ("unet_block18", 0.0, "unet_block18 plus", 0.0),
            },
        ),
    ),
}


@pytest.mark.parametrize("rule, expected", CASES.values(), ids=CASES.keys())
def test_the_rule_table(rule, expected):
    got = _table(rule)
    assert got.keys() == expected.keys()
    for key, (group, lr) in expected.items():
        assert got[key][0] == group, key
        assert got[key][1] == pytest.approx(lr, rel=1e-12, abs=0), key


def test_grouped_orders_as_sd_scripts_and_drops_rate_zero():
    rule = LoRAPlusRule.from_network_args(1e-4, None, None, {**BLOCKS, "loraplus_lr_ratio": "16"})
    params = [(name, side, f"{name}.{side}") for name in reversed(NAMES) for side in (B, A)]
    groups = grouped(rule, params)
    assert [(g.description, members) for g, members in groups] == [
        ("textencoder", [f"{TE2}.{A}", f"{TE1}.{A}"]),
        ("textencoder plus", [f"{TE2}.{B}", f"{TE1}.{B}"]),
        ("unet_block5", [f"{UNET5}.{A}"]),
        ("unet_block5 plus", [f"{UNET5}.{B}"]),
        ("unet_block11", [f"{UNET11}.{A}"]),
        ("unet_block11 plus", [f"{UNET11}.{B}"]),
    ]  # block 18 (weight 0.05, under the threshold) is dropped: its parameters are in no group
    assert [(g.component, g.plus, g.block) for g, _ in groups][1:3] == [("textencoder", True, None), ("unet", False, 5)]


def test_planned_groups_without_a_model():
    ratios = LoRAPlusRatios(unet=16.0, text_encoder=4.0)
    both = planned_groups(LoRAPlusRule.from_rates(1e-4, None, None, ratios), train_text_encoder=True, train_unet=True)
    assert {g.description: g.lr for g in both} == pytest.approx(
        {"textencoder": 1e-4, "textencoder plus": 4e-4, "unet": 1e-4, "unet plus": 1.6e-3}
    )
    unet_only = planned_groups(LoRAPlusRule.from_rates(1.0, None, [0.0]), train_text_encoder=True, train_unet=True)
    assert [(g.description, g.lr) for g in unet_only] == [("unet", 1.0)]
    blocks = planned_groups(
        LoRAPlusRule.from_rates(1.0, block_lr_weights=block_lr_weights(BLOCKS)),
        train_text_encoder=False,
        train_unet=True,
    )
    assert [g.block for g in blocks] == [b for b in range(1, 22) if b != 18]  # 0, 22: never adapted; 18: weight 0
    assert {g.description: g.lr for g in blocks}["unet_block11"] == 2.0


# --- Against PEFT's LoRA+ optimizer ------------------------------------------------------------------------------


class _TinyStack(nn.Module):
    """Two "text encoder" and three "UNet" Linear layers: PEFT names them te1.0, unet.2, ..."""

    def __init__(self) -> None:
        super().__init__()
        self.te1 = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.unet = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 8))


def _lora_name_and_param(peft_name: str) -> tuple[str, str]:
    """`base_model.model.unet.2.lora_B.default.weight` -> (`lora_unet_2`, `lora_up.weight`)."""
    path, _, rest = peft_name.removeprefix("base_model.model.").partition(".lora_")
    matrix = rest.partition(".")[0]
    return "lora_" + path.replace(".", "_"), {"A": "lora_down", "B": "lora_up"}[matrix] + ".weight"


def test_fast_group_holds_the_tensors_peft_loraplus_puts_there():
    """Single rate, one ratio: our B groups hold exactly the tensors that `peft.optimizers.create_loraplus_optimizer`
    gives lr x ratio (restricted to its B matrices: it also puts 1-D parameters there), at the same rates."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    model = get_peft_model(_TinyStack(), LoraConfig(r=2, target_modules=["0", "1", "2"]))
    lr, ratio = 1e-4, 16.0
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio)
    names = {id(p): name for name, p in model.named_parameters()}
    peft_fast = {
        id(p) for g in optimizer.param_groups if g["lr"] == lr * ratio for p in g["params"] if "lora_B" in names[id(p)]
    }
    peft_slow = {id(p) for g in optimizer.param_groups if g["lr"] == lr for p in g["params"]}

    rule = LoRAPlusRule.from_rates(lr, ratios=LoRAPlusRatios(unet=ratio, text_encoder=ratio))
    trained = [(*_lora_name_and_param(name), p) for name, p in model.named_parameters() if p.requires_grad]
    ours = grouped(rule, trained)
    ours_fast = {id(p) for g, params in ours if g.plus for p in params}
    ours_slow = {id(p) for g, params in ours if not g.plus for p in params}
    assert [g.description for g, _ in ours] == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert len(peft_fast) == 5 and ours_fast == peft_fast
    assert len(peft_slow) == 5 and ours_slow == peft_slow
    assert {g.lr for g, _ in ours if g.plus} == {lr * ratio} and {g.lr for g, _ in ours if not g.plus} == {lr}
