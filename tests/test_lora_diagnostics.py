"""LoRA+ diagnostics (library.train.diagnostics) against the naive computation that forms B·A."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from library.train.diagnostics import LoRADiagnostics, lora_norms, lora_pairs, relative_updates, snapshot
from networks.lora_module import LoRAModule

NAMES = {
    "te1": "lora_te1_text_model_encoder_layers_0_mlp_fc1",
    "te2": "lora_te2_text_model_encoder_layers_1_self_attn_q_proj",
    "unet5": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "unet5b": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k",
    "unet18": "lora_unet_output_blocks_5_0_in_layers_2",
}


def _network(seed: int = 0):
    """Two text-encoder adapters, three UNet ones (two in block 5, a 3x3 conv in block 18), B made non-zero."""
    torch.manual_seed(seed)
    loras = [
        LoRAModule(NAMES["te1"], nn.Linear(12, 20), lora_dim=4, alpha=2),
        LoRAModule(NAMES["te2"], nn.Linear(16, 16), lora_dim=2, alpha=1),
        LoRAModule(NAMES["unet5"], nn.Linear(24, 24), lora_dim=4, alpha=4),
        LoRAModule(NAMES["unet5b"], nn.Linear(24, 24), lora_dim=4, alpha=1),
        LoRAModule(NAMES["unet18"], nn.Conv2d(6, 10, 3, padding=1), lora_dim=3, alpha=1.5),
    ]
    for lora in loras:
        nn.init.normal_(lora.lora_up.weight, std=0.3)
    return SimpleNamespace(text_encoder_loras=loras[:2], unet_loras=loras[2:])


def _naive(loras) -> tuple[float, float, float]:
    """||A||, ||B|| and ||scale·B·A|| over `loras`, forming each B·A (conv: the (out, in·3·3) delta kernel)."""
    a = b = d = 0.0
    for lora in loras:
        down = lora.lora_down.weight.detach().double().flatten(1)
        up = lora.lora_up.weight.detach().double().flatten(1)
        a += down.square().sum().item()
        b += up.square().sum().item()
        d += (lora.scale * up @ down).square().sum().item()
    return math.sqrt(a), math.sqrt(b), math.sqrt(d)


def test_norms_match_forming_b_times_a_per_component_and_block():
    network = _network()
    values = lora_norms(lora_pairs(network, by_block=True))
    te1, te2 = network.text_encoder_loras
    unet5, unet5b, unet18 = network.unet_loras
    expected = {
        "te1": [te1],
        "te2": [te2],
        "unet": network.unet_loras,
        "unet_block05": [unet5, unet5b],
        "unet_block18": [unet18],
    }
    assert {key.split("/")[1] for key in values} == set(expected)
    for group, loras in expected.items():
        naive = _naive(loras)
        for metric, want in zip(("norm_A", "norm_B", "delta"), naive):
            assert values[f"lora/{group}/{metric}"] == pytest.approx(want, rel=1e-5), (group, metric)


def test_conv_delta_is_the_delta_kernel():
    """The conv adapter's ||ΔW|| equals the norm of the 3x3 kernel its two convolutions make together."""
    network = _network()
    conv = network.unet_loras[2]
    x = torch.zeros(6 * 9, 6, 3, 3)  # one-hot 3x3 inputs: the centre output reads out one tap of the kernel
    for i in range(6 * 9):
        x[i].view(-1)[i] = 1.0
    with torch.no_grad():
        kernel = (conv.lora_up(conv.lora_down(x)) * conv.scale)[:, :, 1, 1]  # (taps, out)
    values = lora_norms(lora_pairs(SimpleNamespace(text_encoder_loras=[], unet_loras=[conv])))
    assert values["lora/unet/delta"] == pytest.approx(kernel.norm().item(), rel=1e-5)


def test_without_by_block_only_components_are_reported():
    values = lora_norms(lora_pairs(_network()))
    assert sorted({key.split("/")[1] for key in values}) == ["te1", "te2", "unet"]


def test_relative_update_is_one_steps_change_over_the_weights_before():
    network = _network()
    pairs = lora_pairs(network)
    before = snapshot(pairs)
    old = [
        (lora.lora_down.weight.detach().clone(), lora.lora_up.weight.detach().clone()) for lora in network.unet_loras
    ]
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_down.weight.add_(0.01)
            lora.lora_up.weight.mul_(1.5)
    values = relative_updates(pairs, before)
    delta_a = math.sqrt(
        sum((lora.lora_down.weight - a).square().sum().item() for lora, (a, _) in zip(network.unet_loras, old))
    )
    norm_a = math.sqrt(sum(a.square().sum().item() for a, _ in old))
    assert values["lora/unet/update_A"] == pytest.approx(delta_a / norm_a, rel=1e-5)
    assert values["lora/unet/update_B"] == pytest.approx(0.5, rel=1e-5)  # B x 1.5: a change of half of B
    assert values["lora/te1/update_A"] == 0.0 and values["lora/te1/update_B"] == 0.0  # text encoders untouched


def test_update_of_zero_weights_is_nan_not_an_error():
    network = _network()
    for lora in network.unet_loras:
        nn.init.zeros_(lora.lora_up.weight)  # B as initialised
    pairs = lora_pairs(network)
    before = snapshot(pairs)
    with torch.no_grad():
        network.unet_loras[0].lora_up.weight.add_(0.1)
    values = relative_updates(pairs, before)
    assert math.isnan(values["lora/unet/update_B"])
    assert values["lora/unet/update_A"] == 0.0


def test_schedule_computes_only_on_due_steps_with_the_update_of_that_step():
    network = _network()
    diagnostics = LoRADiagnostics(network, every=3)
    seen = {}
    for step in range(1, 8):
        with torch.no_grad():
            for lora in network.unet_loras:
                lora.lora_up.weight.mul_(1.0 + 0.1 * step)  # step s scales B by 1 + 0.1 s
        values = diagnostics.after_step(step)
        if values is not None:
            seen[step] = values | {"naive_norm_B": _naive(network.unet_loras)[1]}
    assert sorted(seen) == [3, 6]
    assert seen[3]["lora/unet/update_B"] == pytest.approx(0.3, rel=1e-5)  # step 3's change, not steps 1-3's
    assert seen[6]["lora/unet/update_B"] == pytest.approx(0.6, rel=1e-5)
    assert seen[6]["lora/unet/norm_B"] == pytest.approx(seen[6]["naive_norm_B"], rel=1e-5)


def test_resumed_schedule_snapshots_at_the_start_step():
    network = _network()
    diagnostics = LoRADiagnostics(network, every=5, start_step=9)  # step 10 is due next
    with torch.no_grad():
        network.unet_loras[0].lora_up.weight.mul_(2.0)
    values = diagnostics.after_step(10)
    assert values is not None and values["lora/unet/update_B"] > 0


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        LoRADiagnostics(_network(), every=0)
