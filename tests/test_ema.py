"""EMA of the LoRA weights: the update maths, exact resume, bf16 weights, and the EMA LoRA file."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors import safe_open

from library.config.build import ema_config
from library.config.cli import add_ema_arguments
from library.errors import UserInputError
from library.train.ema import (
    LoRAEMA,
    ema_path,
    ema_state_dict,
    save_ema_weights,
)


def toy_params(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.lora_down.weight": torch.randn(2, 3, generator=gen).to(dtype),
        "a.lora_up.weight": torch.zeros(3, 2, dtype=dtype),
    }


def train_step(params: dict[str, torch.Tensor], step: int) -> None:
    """A stand-in optimizer step: a different, known change each step."""
    for k, tensor in enumerate(params.values()):
        tensor.add_((step + 1) * 0.1 * (k + 1))


def test_update_matches_a_hand_loop():
    params = toy_params()
    ema = LoRAEMA(params, decay=0.9)
    hand = {name: p.clone() for name, p in params.items()}
    for step in range(5):
        train_step(params, step)
        ema.update()
        hand = {name: 0.9 * hand[name] + 0.1 * params[name] for name in hand}
    for name in hand:
        torch.testing.assert_close(ema.shadow[name], hand[name], rtol=1e-6, atol=1e-7)
    assert ema.num_updates == 5


def test_warmup_and_update_after_step():
    params = toy_params()
    ema = LoRAEMA(params, decay=0.99, update_after_step=2, warmup=True)
    decays = []
    for step in range(5):
        decays.append(ema.current_decay())
        train_step(params, step)
        ema.update()
        if step < 2:  # copying, not averaging yet
            assert all(torch.equal(ema.shadow[n], params[n]) for n in params)
    assert decays == pytest.approx([0.0, 0.0, 2 / 11, 3 / 12, 4 / 13])
    assert LoRAEMA(toy_params(), 0.5, warmup=True).current_decay() == pytest.approx(2 / 11)  # warm-up below decay
    assert LoRAEMA(toy_params(), 0.1, warmup=True).current_decay() == 0.1  # decay below the warm-up value


def test_decay_near_one_barely_moves():
    params = toy_params()
    start = params["a.lora_down.weight"].clone()
    ema = LoRAEMA(params, decay=0.9999)
    params["a.lora_down.weight"].add_(1.0)
    ema.update()
    torch.testing.assert_close(ema.shadow["a.lora_down.weight"], start + 1e-4, rtol=0, atol=1e-6)


def test_state_dict_round_trip_resumes_exactly():
    params = toy_params()
    ema = LoRAEMA(params, decay=0.95, warmup=True)
    for step in range(3):
        train_step(params, step)
        ema.update()
    resumed = LoRAEMA(params, decay=0.5)  # settings come from the state
    resumed.load_state_dict(ema.state_dict())
    assert (resumed.decay, resumed.warmup, resumed.num_updates) == (0.95, True, 3)
    for step in range(3, 6):
        train_step(params, step)
        ema.update()
        resumed.update()
    assert all(torch.equal(ema.shadow[n], resumed.shadow[n]) for n in params)
    other = LoRAEMA({"b.lora_up.weight": torch.zeros(1)}, decay=0.5)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict(ema.state_dict())


def test_bf16_weights_keep_an_fp32_average():
    params = toy_params(torch.bfloat16)
    ema = LoRAEMA(params, decay=0.9)
    hand = {name: p.float() for name, p in params.items()}
    for step in range(3):
        train_step(params, step)
        ema.update()
        hand = {name: 0.9 * hand[name] + 0.1 * params[name].float() for name in hand}
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    for name in hand:
        torch.testing.assert_close(ema.shadow[name], hand[name], rtol=1e-6, atol=1e-6)


def test_only_trainable_parameters_are_averaged():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    assert set(LoRAEMA(model, 0.9).shadow) == {"0.weight", "0.bias"}


def test_ema_file_matches_the_lora_file(tiny_models, tmp_path):
    from networks.lora import create_network

    m = tiny_models  # create_network only reads the models (nothing is applied)
    network = create_network(1.0, 4, 2.0, None, [m.text_encoder1, m.text_encoder2], m.unet)
    ema = LoRAEMA(network, decay=0.5)
    with torch.no_grad():
        for param in network.parameters():
            param.add_(1.0)
    ema.update()
    metadata = {"ss_network_dim": "4", "ss_network_alpha": "2.0"}
    plain, averaged = tmp_path / "x.safetensors", ema_path(tmp_path / "x.safetensors")
    assert averaged.name == "x-ema.safetensors"
    network.save_weights(plain, torch.float16, metadata)
    assert save_ema_weights(network, ema, averaged, torch.float16, metadata) == averaged
    with safe_open(str(plain), "pt") as f_plain, safe_open(str(averaged), "pt") as f_ema:
        assert set(f_plain.keys()) == set(f_ema.keys()) == set(network.state_dict())
        meta = f_ema.metadata()
        assert meta["ss_ema_decay"] == "0.5" and meta["ss_network_dim"] == "4" and "sshs_model_hash" in meta
        for key in f_plain.keys():
            a, b = f_plain.get_tensor(key), f_ema.get_tensor(key)
            assert a.shape == b.shape and a.dtype == b.dtype == torch.float16
            if key.endswith(".alpha"):
                assert torch.equal(a, b)
            else:
                assert torch.equal(b, ema.shadow[key].half())
                assert not torch.equal(a, b)  # the average is half-way between the start and the weights
    assert set(ema_state_dict(network, ema)) == set(network.state_dict())


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_ema_arguments(parser)
    return parser.parse_args(list(argv))


def test_ema_flags():
    assert ema_config(parse()) is None
    cfg = ema_config(parse("--ema_decay", "0.999", "--ema_update_after_step", "10", "--ema_warmup"))
    assert (cfg.decay, cfg.update_after_step, cfg.warmup) == (0.999, 10, True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--ema_decay", "1.0"), "between 0 and 1"),
        (("--ema_decay", "0"), "between 0 and 1"),
        (("--ema_decay", "0.9", "--ema_update_after_step", "-1"), "0 or more"),
        (("--ema_warmup",), "without --ema_decay"),
        (("--ema_update_after_step", "5"), "without --ema_decay"),
    ],
)
def test_ema_flag_errors(argv, message):
    with pytest.raises(UserInputError, match=message) as error:
        ema_config(parse(*argv))
    assert "\n" not in str(error.value)
