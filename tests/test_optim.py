"""Optimizers keep per-group learning rates; schedules and step counts follow sd-scripts' rules."""

from __future__ import annotations

import math

import pytest
import torch

from library.optim import build_lr_scheduler, build_optimizer, total_training_steps, warmup_steps


def _groups():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 64))
    b = torch.nn.Parameter(torch.randn(64, 64))
    return a, b, [{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1.6e-2}]


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Lion", "lion", "adamw8bit"])
def test_each_optimizer_steps_with_its_group_rates(name):
    a, b, groups = _groups()
    optimizer = build_optimizer(name, groups, 1e-4, {"weight_decay": "0.0"})
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1.6e-2]
    before_a, before_b = a.detach().clone(), b.detach().clone()
    (a.sum() + b.sum()).backward()
    optimizer.step()
    # Every gradient is 1, so sign-like first steps move each element by about its group's lr.
    step_a = (a.detach() - before_a).abs().mean().item()
    step_b = (b.detach() - before_b).abs().mean().item()
    assert step_a == pytest.approx(1e-3, rel=0.05)
    assert step_b / step_a == pytest.approx(16, rel=0.05)


def test_optimizer_args_are_parsed_as_literals():
    _, _, groups = _groups()
    optimizer = build_optimizer("AdamW", groups, 1e-4, {"betas": "(0.9,0.99)", "weight_decay": "0.1"})
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert optimizer.param_groups[1]["weight_decay"] == 0.1


def test_warmup_below_one_is_a_ratio():
    assert warmup_steps(100, 1000) == 100
    assert warmup_steps(0.05, 1000) == 50
    assert warmup_steps(0, 1000) == 0


def test_max_train_epochs_overrides_steps():
    assert total_training_steps(1600, None, 10, 1) == 1600
    assert total_training_steps(1600, 14, 10, 1) == 140
    assert total_training_steps(1600, 3, 10, 4) == 9  # ceil(10 / 4) optimizer steps per epoch


def test_cosine_with_restarts_matches_formula_for_every_group():
    _, _, groups = _groups()
    optimizer = torch.optim.SGD(groups, lr=1e-3)
    scheduler = build_lr_scheduler("cosine_with_restarts", optimizer, total_steps=100, warmup=10, num_cycles=4, power=1.0)
    seen = []
    for _ in range(100):
        seen.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    for step, (lr_a, lr_b) in enumerate(seen):
        if step < 10:
            factor = step / 10
        else:
            progress = (step - 10) / 90
            factor = 0.5 * (1.0 + math.cos(math.pi * ((4 * progress) % 1.0)))
        assert lr_a == pytest.approx(1e-3 * factor, abs=1e-12)
        assert lr_b == pytest.approx(1.6e-2 * factor, abs=1e-12)
