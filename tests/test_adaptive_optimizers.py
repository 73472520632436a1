"""Prodigy / D-Adaptation with LoRA+: refused at start-up with one line, never a crash at step 1."""

from __future__ import annotations

import copy

import pytest
import torch

import train_network
from library.config.checks import planned_group_lrs
from library.errors import UserInputError
from library.train.optim import ADAPTIVE_OPTIMIZER_TYPES, build_optimizer, per_group_lr_problem
from networks.network_args import LoRAPlusRatios

ADAPTIVE = list(ADAPTIVE_OPTIMIZER_TYPES)


def _groups(lrs):
    torch.manual_seed(0)
    return [{"params": [torch.nn.Parameter(torch.randn(8, 8))], "lr": lr} for lr in lrs]


def test_planned_group_lrs_follow_the_grouping_rule():
    both = LoRAPlusRatios(unet=16.0, text_encoder=4.0)
    assert planned_group_lrs(1e-4, None, None, both, True, True) == {
        "textencoder": 1e-4,
        "textencoder plus": 4e-4,
        "unet": 1e-4,
        "unet plus": 1.6e-3,
    }
    assert planned_group_lrs(1.0, None, [0.0], LoRAPlusRatios(None, None), True, True) == {"unet": 1.0}
    assert planned_group_lrs(1.0, 2.0, None, LoRAPlusRatios(None, None), True, False) == {"unet": 2.0}


def test_the_library_itself_crashes_at_step_one_on_per_group_rates():
    """Why the guard exists: Prodigy accepts the groups, then raises at its first step."""
    from prodigyopt import Prodigy

    groups = _groups([1.0, 16.0])
    optimizer = Prodigy(groups, lr=1.0)
    for group in groups:
        group["params"][0].sum().backward()
    with pytest.raises(RuntimeError, match="only supported for values of 0"):
        optimizer.step()


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_optimizers_refuse_per_group_rates_and_step_with_equal_ones(name):
    assert per_group_lr_problem(name, {"unet": 1.0, "unet plus": 16.0}) is not None
    assert per_group_lr_problem(name, {"unet": 1.0, "textencoder": 1.0, "frozen": 0.0}) is None
    with pytest.raises(UserInputError, match="for LoRA\\+ use AdamW, AdamW8bit or Lion"):
        build_optimizer(name, _groups([1.0, 16.0]), 1.0, {})
    groups = _groups([1.0, 1.0])
    before = [g["params"][0].detach().clone() for g in groups]
    optimizer = build_optimizer(name, groups, 1.0, {})
    for group in groups:
        group["params"][0].square().sum().backward()
    optimizer.step()
    assert all(not torch.equal(b, g["params"][0]) for b, g in zip(before, groups))


def test_the_family_is_sd_scripts_one():
    assert set(ADAPTIVE) == {
        "Prodigy",
        "DAdaptation",
        "DAdaptAdamPreprint",
        "DAdaptAdam",
        "DAdaptLion",
        "DAdaptAdaGrad",
        "DAdaptAdan",
        "DAdaptAdanIP",
        "DAdaptSGD",
    }
    # sd-scripts: DAdaptation is the preprint's Adam (dadaptation.experimental), not DAdaptAdam
    assert type(build_optimizer("dadaptation", _groups([1.0]), 1.0, {})).__name__ == "DAdaptAdamPreprint"
    assert type(build_optimizer("DAdaptAdanIP", _groups([1.0]), 1.0, {})).__name__ == "DAdaptAdanIP"


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_optimizers_resume_from_their_state_dict(name):
    groups = _groups([1.0, 1.0])
    params = [g["params"][0] for g in groups]
    optimizer = build_optimizer(name, groups, 1.0, {})
    torch.manual_seed(1)
    grads = [[torch.randn(8, 8) for _ in params] for _ in range(3)]

    def step(opt, ps, gs):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()

    for g in grads[:2]:
        step(optimizer, params, g)
    state = copy.deepcopy(optimizer.state_dict())
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = build_optimizer(name, [{"params": [t], "lr": 1.0} for t in twins], 1.0, {})
    resumed.load_state_dict(state)
    before = params[0].detach().clone()
    step(optimizer, params, grads[2])
    step(resumed, twins, grads[2])
    assert not torch.equal(before, params[0].detach())
    assert all(torch.equal(p.detach(), t.detach()) for p, t in zip(params, twins))


def test_non_adaptive_optimizers_take_any_rates():
    assert per_group_lr_problem("AdamW", {"unet": 1e-4, "unet plus": 1.6e-3}) is None
    assert per_group_lr_problem("Lion", {"unet": 1e-4, "unet plus": 1.6e-3}) is None
    assert per_group_lr_problem("torch.optim.RMSprop", {"unet": 1e-4, "unet plus": 1.6e-3}) is None
    fixed = {"relative_step": "False", "scale_parameter": "False", "warmup_init": "False"}
    assert per_group_lr_problem("Adafactor", {"unet": 1e-4, "unet plus": 1.6e-3}, fixed) is None
    # Adafactor's default relative_step ignores every lr: refused like the adaptive family
    assert "relative_step=False" in per_group_lr_problem("adafactor", {"unet": 1e-4, "unet plus": 1.6e-3}, {})
    assert per_group_lr_problem("Adafactor", {"unet": 1e-4, "textencoder": 1e-4}, {}) is None


@pytest.mark.parametrize(
    "extra",
    [
        ["--loraplus_lr_ratio", "16"],
        ["--network_args", "loraplus_unet_lr_ratio=4"],
        ["--unet_lr", "1.0", "--text_encoder_lr", "0.5"],
    ],
)
def test_cli_refuses_before_any_model_loads(tiny_sdxl, tmp_path, capsys, monkeypatch, extra):
    def fail(*_args, **_kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("library.train.setup_parts.load_sdxl", fail)
    (tmp_path / "data" / "1_x").mkdir(parents=True)
    argv = [
        "--pretrained_model_name_or_path",
        str(tiny_sdxl.single_file),
        "--train_data_dir",
        str(tmp_path / "data"),
        "--output_dir",
        str(tmp_path / "out"),
        "--optimizer_type",
        "Prodigy",
        "--learning_rate",
        "1.0",
        *extra,
    ]
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --optimizer_type Prodigy estimates one step size") and len(err.splitlines()) == 1
