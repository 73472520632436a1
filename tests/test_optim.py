"""Optimizers keep per-group learning rates and resume from their state; schedules are the libraries' own curves
with sd-scripts' arguments; step counts and refusals follow sd-scripts' rules."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from library.errors import UserInputError
from library.train.optim import (
    OPTIMIZER_TYPES,
    SCHEDULERS,
    build_lr_scheduler,
    build_optimizer,
    canonical_optimizer_type,
    decay_steps,
    is_adaptive,
    optimizer_kwargs,
    scaled_step_rules,
    schedule_problem,
    total_training_steps,
    warmup_steps,
)

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")

LRS = (1e-3, 1.6e-2)
ADAFACTOR_FIXED = {"relative_step": "False", "scale_parameter": "False", "warmup_init": "False"}

# First step of each optimizer on a gradient of ones, in units of its group's lr (weight decay averages out).
FIRST_STEP = {
    "AdamW": 1.0,
    "AdamW8bit": 1.0,
    "PagedAdamW": 1.0,
    "PagedAdamW8bit": 1.0,
    "PagedAdamW32bit": 1.0,
    "Lion": 1.0,
    "Lion8bit": 1.0,
    "PagedLion8bit": 1.0,
    "SGDNesterov": 1.9,  # torch: g + momentum * buf with buf = g, momentum 0.9 by default
    "SGDNesterov8bit": 1.0,  # bitsandbytes' SGD8bit takes nesterov=True and ignores it (as under sd-scripts)
    "AdEMAMix8bit": 1.0005,
    "PagedAdEMAMix8bit": 1.0005,  # (m1 + alpha 5 * m2 (1 - beta3 0.9999)) / sqrt(v)
    "Adafactor": 1.0,  # relative_step=False: g / sqrt(g^2), RMS-clipped at 1
    "torch.optim.RMSprop": 10.0,  # g / sqrt((1 - alpha 0.99) g^2)
    "SGD": 1.0,  # a bare name is a torch.optim class, as in sd-scripts
}
NON_ADAPTIVE = [name for name in OPTIMIZER_TYPES if not is_adaptive(name)]


def _args(name: str) -> dict[str, str]:
    return ADAFACTOR_FIXED if name == "Adafactor" else {}


def _twin_groups(seed: int = 0) -> tuple[torch.nn.Parameter, torch.nn.Parameter, list[dict]]:
    """Two groups whose parameters start equal, so only their learning rates tell their steps apart."""
    torch.manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(64, 64))  # 4096 elements: bitsandbytes keeps 8-bit state from 4096 up
    b = torch.nn.Parameter(a.detach().clone())
    return a, b, [{"params": [a], "lr": LRS[0]}, {"params": [b], "lr": LRS[1]}]


def _step(optimizer: torch.optim.Optimizer, params, grads) -> None:
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    optimizer.step()


def test_every_sd_scripts_name_has_a_first_step_size():
    assert set(NON_ADAPTIVE) <= set(FIRST_STEP)


@pytest.mark.parametrize("name", [*NON_ADAPTIVE, "torch.optim.RMSprop", "SGD"])
def test_each_optimizer_keeps_its_group_rates_and_steps_by_them(name):
    a, b, groups = _twin_groups()
    optimizer = build_optimizer(name, groups, 1e-4, _args(name))
    assert [g["lr"] for g in optimizer.param_groups] == list(LRS)
    before = a.detach().clone()
    _step(optimizer, (a, b), (torch.ones_like(a), torch.ones_like(b)))
    step_a, step_b = (before - a.detach()).mean().item(), (before - b.detach()).mean().item()
    assert step_a == pytest.approx(FIRST_STEP[name] * LRS[0], rel=1e-2)
    assert step_b / step_a == pytest.approx(LRS[1] / LRS[0], rel=1e-3)


@pytest.mark.parametrize("name", [*NON_ADAPTIVE, "torch.optim.RMSprop"])
def test_each_optimizer_resumes_from_its_state_dict(name):
    a, b, groups = _twin_groups()
    optimizer = build_optimizer(name, groups, 1e-4, _args(name))
    torch.manual_seed(1)
    grads = [(torch.randn(64, 64), torch.randn(64, 64)) for _ in range(3)]
    for grad in grads[:2]:
        _step(optimizer, (a, b), grad)
    state = copy.deepcopy(optimizer.state_dict())

    def fresh(load: bool) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        a2, b2 = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
        resumed = build_optimizer(name, [{"params": [a2], "lr": 1.0}, {"params": [b2], "lr": 1.0}], 1e-4, _args(name))
        if load:
            resumed.load_state_dict(state)
            assert [g["lr"] for g in resumed.param_groups] == list(LRS)
        _step(resumed, (a2, b2), grads[2])
        return a2, b2

    resumed_a, resumed_b = fresh(load=True)
    restarted_a, _ = fresh(load=False)
    _step(optimizer, (a, b), grads[2])
    assert torch.equal(a.detach(), resumed_a.detach()) and torch.equal(b.detach(), resumed_b.detach())
    assert not torch.equal(a.detach(), restarted_a.detach())  # the loaded state mattered


def test_names_are_case_insensitive_and_classes_are_sd_scripts_ones():
    assert canonical_optimizer_type("adamw8bit") == "AdamW8bit"
    assert canonical_optimizer_type("SGDNESTEROV") == "SGDNesterov"
    assert canonical_optimizer_type("torch.optim.RMSprop") == "torch.optim.RMSprop"
    _, _, groups = _twin_groups()
    assert type(build_optimizer("pagedlion8bit", groups, 1e-4, {})).__name__ == "PagedLion8bit"
    _, _, groups = _twin_groups()
    assert type(build_optimizer("sgdnesterov8bit", groups, 1e-4, {})).__name__ == "SGD8bit"


def test_sgd_nesterov_gets_momentum_and_nesterov():
    assert optimizer_kwargs("SGDNesterov", {}) == {"momentum": 0.9, "nesterov": True}
    assert optimizer_kwargs("sgdnesterov8bit", {"momentum": "0.5"}) == {"momentum": 0.5, "nesterov": True}
    _, _, groups = _twin_groups()
    group = build_optimizer("SGDNesterov", groups, 1e-4, {"weight_decay": "0.01"}).param_groups[1]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 0.01)
    with pytest.raises(UserInputError, match="always uses nesterov=True; for plain SGD use --optimizer_type SGD"):
        optimizer_kwargs("SGDNesterov", {"nesterov": "False"})


def test_optimizer_args_are_parsed_as_literals():
    _, _, groups = _twin_groups()
    args = {"betas": "(0.9,0.99)", "weight_decay": "0.1", "amsgrad": "true"}
    optimizer = build_optimizer("AdamW", groups, 1e-4, args)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert optimizer.param_groups[1]["weight_decay"] == 0.1
    assert optimizer.param_groups[1]["amsgrad"] is True


@pytest.mark.parametrize(
    "optimizer_type, args, message",
    [
        ("no_such_module.Opt", {}, "--optimizer_type no_such_module.Opt: cannot import no_such_module"),
        ("torch.optim.NoSuchOpt", {}, "--optimizer_type torch.optim.NoSuchOpt: module torch.optim has no class "),
        ("Adamm", {}, "--optimizer_type: unknown optimizer 'Adamm'; choose one of AdamW, AdamW8bit"),
        ("AdamW", {"no_such_arg": "1"}, "--optimizer_type AdamW: .*no_such_arg.* \\(check --optimizer_args\\)"),
        ("SGDNesterov", {"momentum": "0"}, "--optimizer_type SGDNesterov: Nesterov momentum requires a momentum"),
    ],
)
def test_bad_optimizers_are_one_line(optimizer_type, args, message):
    _, _, groups = _twin_groups()
    with pytest.raises(UserInputError, match=message) as caught:
        build_optimizer(optimizer_type, groups, 1e-4, args)
    assert len(str(caught.value).splitlines()) == 1


# ---- Adafactor -----------------------------------------------------------------------------------------------------


def _equal_groups() -> tuple[torch.nn.Parameter, list[dict]]:
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8, 8))
    return a, [{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-3}]


def test_adafactor_relative_step_drops_the_lr_and_follows_its_own_schedule():
    assert optimizer_kwargs("Adafactor", {}) == {"relative_step": True}
    assert optimizer_kwargs("adafactor", {"relative_step": "False", "warmup_init": "True"})["relative_step"] is True
    a, groups = _equal_groups()
    optimizer = build_optimizer("Adafactor", groups, 1e-3, {})
    assert optimizer.defaults["lr"] is None and all(g["lr"] is None for g in optimizer.param_groups)
    assert "lr" in groups[0]  # the caller's groups are left alone
    for name in ("adafactor", "constant"):  # constant (the default) means "no schedule of mine": Adafactor's own
        scheduler = build_lr_scheduler(name, optimizer, total_steps=20, warmup=0, initial_lr=1e-3)
        assert type(scheduler).__name__ == "AdafactorSchedule"
        assert scheduler.get_last_lr() == [1e-3, 1e-3]
    before = a.detach().clone()
    for group in optimizer.param_groups:  # transformers' proxy schedule needs a gradient in every group
        group["params"][0].square().sum().backward()
    optimizer.step()
    scheduler.step()
    # step 1 of relative_step: rel size min(1e-2, 1/sqrt(1)) = 1e-2, times the parameter's RMS (scale_parameter)
    rms = before.square().mean().sqrt().item()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-2 * rms, rel=1e-5)
    assert not torch.equal(before, a.detach())


@pytest.mark.parametrize(
    "name, scheduler_type, warmup, message",
    [
        (
            "cosine",
            None,
            0,
            "relative_step=True sets its own step size and cannot follow --lr_scheduler cosine: "
            "use --lr_scheduler adafactor, or pass --optimizer_args relative_step=False",
        ),
        ("constant", "StepLR", 0, "cannot follow --lr_scheduler_type StepLR"),
        ("adafactor", None, 10, "--lr_scheduler adafactor has no warmup \\(--lr_warmup_steps 10\\)"),
    ],
)
def test_adafactor_relative_step_refuses_other_schedules(name, scheduler_type, warmup, message):
    with pytest.raises(UserInputError, match=message):
        build_lr_scheduler(
            name,
            build_optimizer("Adafactor", _equal_groups()[1], 1e-3, {}),
            total_steps=20,
            warmup=warmup,
            scheduler_type=scheduler_type,
        )
    assert (
        schedule_problem(
            name, optimizer_type="adafactor", optimizer_args={}, warmup=warmup, scheduler_type=scheduler_type
        )
        is not None
    )


def test_adafactor_rules_refuse_with_one_line():
    with pytest.raises(
        UserInputError,
        match="with relative_step=True sets its own step size and ignores the "
        "learning rates per group \\(0 0.001, 1 0.016\\)",
    ):
        build_optimizer("Adafactor", _twin_groups()[2], 1e-3, {})
    no_lr = [{"params": [torch.nn.Parameter(torch.ones(2))]}]
    with pytest.raises(UserInputError, match="relative_step=False needs a learning rate: give --learning_rate"):
        build_optimizer("Adafactor", no_lr, None, ADAFACTOR_FIXED)
    adamw = build_optimizer("AdamW", _equal_groups()[1], 1e-3, {})
    with pytest.raises(UserInputError, match="--lr_scheduler adafactor .* needs --optimizer_type Adafactor"):
        build_lr_scheduler("adafactor", adamw, total_steps=20, warmup=0)
    relative = build_optimizer("Adafactor", _equal_groups()[1], 1e-3, {})
    for name in ("adafactor", "constant"):
        with pytest.raises(UserInputError, match="--lr_scheduler adafactor takes no --lr_scheduler_args \\(got x\\)"):
            build_lr_scheduler(name, relative, total_steps=20, scheduler_args={"x": "1"})
    fixed = build_optimizer("Adafactor", _twin_groups()[2], 1e-3, ADAFACTOR_FIXED)
    scheduler = build_lr_scheduler("cosine", fixed, total_steps=20, warmup=5)  # a fixed lr follows any schedule
    assert scheduler.get_last_lr() == [0.0, 0.0]


# ---- schedules -------------------------------------------------------------------------------------------------


def _curve(scheduler, optimizer, steps: int = 20) -> list[list[float]]:
    seen = []
    for _ in range(steps):
        seen.append([float(lr) for lr in scheduler.get_last_lr()])
        optimizer.step()
        scheduler.step()
    return seen


def _sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD(_twin_groups()[2], lr=1.0)


def _transformers(name: str, warmup: int = 4, total: int = 20, **kwargs):
    from transformers.optimization import get_scheduler

    return lambda opt: get_scheduler(
        name, opt, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=kwargs
    )


def _diffusers(name: str, **kwargs):
    from diffusers.optimization import get_scheduler

    return lambda opt: get_scheduler(name, opt, **kwargs)


# ours: (name, build_lr_scheduler keywords); reference: the library's get_scheduler with sd-scripts' arguments.
SCHEDULE_CASES = {
    "constant": ({"warmup": 0}, _transformers("constant")),
    "constant_with_warmup": ({}, _transformers("constant_with_warmup")),
    "linear": ({}, _transformers("linear")),
    "cosine": ({}, _transformers("cosine")),
    "cosine_with_restarts": ({"num_cycles": 3}, _transformers("cosine_with_restarts", num_cycles=3)),
    "polynomial": (
        {"power": 2.0, "scheduler_args": {"lr_end": "1e-4"}},
        _transformers("polynomial", power=2.0, lr_end=1e-4),
    ),
    "cosine_with_min_lr": (
        {"min_lr_ratio": 0.1, "num_cycles": 1},
        _transformers("cosine_with_min_lr", num_cycles=0.5, min_lr_rate=0.1),
    ),
    "warmup_stable_decay": (
        {"decay": 6, "min_lr_ratio": 0.05},
        _transformers("warmup_stable_decay", num_decay_steps=6, num_cycles=0.5, min_lr_ratio=0.05),
    ),
    "inverse_sqrt": ({"timescale": 3}, _transformers("inverse_sqrt", timescale=3)),
    "piecewise_constant": (
        {"warmup": 0, "scheduler_args": {"step_rules": "1:5,0.5:12,0.1"}},
        _diffusers("piecewise_constant", step_rules="1:5,0.5:12,0.1"),
    ),
}


def test_every_scheduler_name_has_a_case():
    assert set(SCHEDULE_CASES) | {"adafactor"} == set(SCHEDULERS)


@pytest.mark.parametrize("name", list(SCHEDULE_CASES))
def test_each_schedule_is_the_librarys_curve_for_every_group(name):
    keywords, reference = SCHEDULE_CASES[name]
    optimizer = _sgd()
    ours = _curve(build_lr_scheduler(name.upper(), optimizer, total_steps=20, **{"warmup": 4, **keywords}), optimizer)
    optimizer = _sgd()
    theirs = _curve(reference(optimizer), optimizer)
    assert ours == theirs
    assert all(lr_b == pytest.approx(lr_a * LRS[1] / LRS[0]) for lr_a, lr_b in ours)
    assert len({round(lr_a, 12) for lr_a, _ in ours}) >= (1 if name == "constant" else 3)  # a real curve


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_transformers_and_diffusers_agree_on_the_classic_schedules(name):
    """The trainer used diffusers' get_scheduler before; sd-scripts uses transformers' - same curves."""
    from diffusers.optimization import get_scheduler

    optimizer = _sgd()
    ours = _curve(build_lr_scheduler(name, optimizer, total_steps=20, warmup=4, num_cycles=2, power=2.0), optimizer)
    optimizer = _sgd()
    theirs = _curve(
        get_scheduler(name, optimizer, num_warmup_steps=4, num_training_steps=20, num_cycles=2, power=2.0), optimizer
    )
    assert sum(ours, []) == pytest.approx(sum(theirs, []), rel=1e-12, abs=1e-15)


def test_warmup_ratio_of_steps():
    assert warmup_steps(0.1, 50) == 5
    optimizer = _sgd()
    curve = [
        lr_a
        for lr_a, _ in _curve(
            build_lr_scheduler("linear", optimizer, total_steps=50, warmup=warmup_steps(0.1, 50)), optimizer, 50
        )
    ]
    assert curve[:6] == pytest.approx([LRS[0] * k / 5 for k in range(6)])
    assert max(curve) == curve[5]


def test_cosine_with_restarts_three_cycles_restart_three_times():
    optimizer = _sgd()
    curve = [
        lr_a
        for lr_a, _ in _curve(
            build_lr_scheduler("cosine_with_restarts", optimizer, total_steps=60, warmup=0, num_cycles=3), optimizer, 60
        )
    ]
    starts = [step for step, lr in enumerate(curve) if lr == pytest.approx(LRS[0])]
    assert starts == [0, 20, 40]
    assert all(curve[s + 1] < curve[s] for s in range(60 - 1) if s + 1 not in starts)


def test_cosine_with_restarts_matches_formula():
    optimizer = _sgd()
    seen = _curve(
        build_lr_scheduler("cosine_with_restarts", optimizer, total_steps=100, warmup=10, num_cycles=4, power=1.0),
        optimizer,
        100,
    )
    for step, (lr_a, lr_b) in enumerate(seen):
        factor = step / 10 if step < 10 else 0.5 * (1.0 + math.cos(math.pi * ((4 * (step - 10) / 90) % 1.0)))
        assert lr_a == pytest.approx(LRS[0] * factor, abs=1e-12)
        assert lr_b == pytest.approx(LRS[1] * factor, abs=1e-12)


def test_a_scheduler_class_by_path_with_literal_args():
    for path in ("torch.optim.lr_scheduler.StepLR", "StepLR"):
        optimizer = _sgd()
        ours = _curve(
            build_lr_scheduler(
                "constant",
                optimizer,
                total_steps=20,
                scheduler_type=path,
                scheduler_args={"step_size": "5", "gamma": "0.5"},
            ),
            optimizer,
        )
        optimizer = _sgd()
        assert ours == _curve(torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5), optimizer)
    assert ours[5][0] == pytest.approx(LRS[0] / 2)


@pytest.mark.parametrize(
    "name, keywords, message",
    [
        (
            "constant",
            {"warmup": 3},
            "--lr_scheduler constant has no warmup \\(--lr_warmup_steps 3\\); set "
            "--lr_warmup_steps 0 or use --lr_scheduler constant_with_warmup",
        ),
        ("cosine_with_min_lr", {}, "cosine_with_min_lr needs --lr_scheduler_min_lr_ratio"),
        ("piecewise_constant", {}, "piecewise_constant needs --lr_scheduler_args step_rules="),
        ("constant_with_warmup", {"scheduler_args": {"x": "1"}}, "--lr_scheduler constant_with_warmup: .*'x'"),
        ("warmup_stable_decay", {"warmup": 12, "decay": 10}, "12 warmup \\+ 10 decay steps exceed the run's 20 steps"),
        ("cosine", {"scheduler_args": {"lr_end": "0.1"}}, "--lr_scheduler cosine: .*lr_end.*check --lr_scheduler_args"),
        ("cosine_annealing", {}, "--lr_scheduler: 'cosine_annealing' is not supported; choose one of constant,"),
        ("constant", {"scheduler_type": "no_such.Sched"}, "--lr_scheduler_type no_such.Sched: cannot import no_such"),
        ("constant", {"scheduler_type": "StepLR"}, "--lr_scheduler_type StepLR: .*step_size.*--lr_scheduler_args"),
        ("constant", {"scheduler_type": "StepLR", "warmup": 2}, "--lr_scheduler_type StepLR has no warmup"),
    ],
)
def test_bad_schedules_are_one_line(name, keywords, message):
    with pytest.raises(UserInputError, match=message) as caught:
        build_lr_scheduler(name, _sgd(), total_steps=20, **{"warmup": 0, **keywords})
    assert len(str(caught.value).splitlines()) == 1


def test_schedule_problem_runs_the_same_rules_before_any_model_loads():
    assert schedule_problem("cosine", optimizer_type="AdamW", optimizer_args={}, warmup=0.1) is None
    assert "has no warmup" in schedule_problem("constant", optimizer_type="AdamW", optimizer_args={}, warmup=0.1)
    assert schedule_problem("adafactor", optimizer_type="Adafactor", optimizer_args={}) is None
    assert schedule_problem("cosine", optimizer_type="Adafactor", optimizer_args=ADAFACTOR_FIXED) is None
    assert "needs --lr_scheduler_min_lr_ratio" in schedule_problem(
        "cosine_with_min_lr", optimizer_type="AdamW", optimizer_args={}
    )
    assert schedule_problem("cosine_with_min_lr", optimizer_type="AdamW", optimizer_args={}, min_lr_ratio=0.1) is None


def test_warmup_and_decay_below_one_are_ratios():
    assert warmup_steps(100, 1000) == 100
    assert warmup_steps(0.05, 1000) == 50
    assert warmup_steps(0, 1000) == 0
    assert decay_steps(0.25, 40) == 10
    assert decay_steps(7, 40) == 7


def test_max_train_epochs_overrides_steps():
    assert total_training_steps(1600, None, 10, 1) == 1600
    assert total_training_steps(1600, 14, 10, 1) == 140
    assert total_training_steps(1600, 3, 10, 4) == 9  # ceil(10 / 4) optimizer steps per epoch


# ---- several processes: accelerate steps a prepared schedule once per process per optimizer step -------------------

PROCESS_CASES = {
    **{name: (name, {"warmup": 4, **keywords}) for name, (keywords, _) in SCHEDULE_CASES.items()},
    "lengths in --lr_scheduler_args": (
        "linear",
        {"scheduler_args": {"num_warmup_steps": "3", "num_training_steps": "15"}},
    ),
    "inverse_sqrt with its default timescale": ("inverse_sqrt", {"warmup": 0}),
    "inverse_sqrt timescale in args": ("inverse_sqrt", {"warmup": 2, "scheduler_args": {"timescale": "5"}}),
    "StepLR": ("constant", {"scheduler_type": "StepLR", "scheduler_args": {"step_size": "5", "gamma": "0.5"}}),
    "ExponentialLR (a factor per step)": (
        "constant",
        {"scheduler_type": "ExponentialLR", "scheduler_args": {"gamma": "0.8"}},
    ),
    "MultiStepLR": ("constant", {"scheduler_type": "MultiStepLR", "scheduler_args": {"milestones": "[3, 7]"}}),
    "CosineAnnealingLR": (
        "constant",
        {"scheduler_type": "torch.optim.lr_scheduler.CosineAnnealingLR", "scheduler_args": {"T_max": "12"}},
    ),
}


def _curve_on(processes: int, name: str, keywords: dict, monkeypatch) -> list[list[float]]:
    """The lr of each of 20 optimizer steps with the schedule stepped by accelerate's own wrapper as it steps on
    `processes` processes (it reads the process count from AcceleratorState)."""
    from types import SimpleNamespace

    import accelerate.scheduler

    monkeypatch.setattr(accelerate.scheduler, "AcceleratorState", lambda: SimpleNamespace(num_processes=processes))
    optimizer = _sgd()
    schedule = build_lr_scheduler(name, optimizer, total_steps=20, **{"warmup": 0, **keywords}, num_processes=processes)
    return _curve(accelerate.scheduler.AcceleratedScheduler(schedule, [], split_batches=False), optimizer)


@pytest.mark.parametrize("case", list(PROCESS_CASES))
def test_every_schedule_length_follows_the_optimizer_steps_on_two_processes(case, monkeypatch):
    name, keywords = PROCESS_CASES[case]
    one = _curve_on(1, name, keywords, monkeypatch)
    two = _curve_on(2, name, keywords, monkeypatch)
    assert sum(two, []) == pytest.approx(sum(one, []), rel=1e-12, abs=1e-15)
    assert len({round(lr_a, 12) for lr_a, _ in one}) >= (
        1 if name == "constant" and "scheduler_type" not in keywords else 3
    )


def test_step_rules_scale_and_unreadable_rules_are_left_to_diffusers():
    assert scaled_step_rules("1:5,0.5:12,0.1", 2) == "1:10,0.5:24,0.1"
    assert scaled_step_rules("0.3", 4) == "0.3"
    assert scaled_step_rules("1-5,0.1", 2) == "1-5,0.1"
    with pytest.raises(UserInputError, match="--lr_scheduler piecewise_constant: .*check --lr_scheduler_args"):
        build_lr_scheduler(
            "piecewise_constant", _sgd(), total_steps=20, scheduler_args={"step_rules": "1-5,0.1"}, num_processes=2
        )


def test_a_wrapped_scheduler_class_saves_and_resumes_as_one_process_would():
    optimizer = _sgd()
    wrapped = build_lr_scheduler(
        "constant",
        optimizer,
        total_steps=20,
        scheduler_type="StepLR",
        scheduler_args={"step_size": "2"},
        num_processes=3,
    )
    assert isinstance(wrapped, torch.optim.lr_scheduler.LRScheduler)  # so accelerate.prepare wraps and saves it
    for _ in range(3 * 5):  # five optimizer steps on three processes
        optimizer.step()
        wrapped.step()
    assert wrapped.state_dict()["last_epoch"] == 5
    resumed = build_lr_scheduler(
        "constant", _sgd(), total_steps=20, scheduler_type="StepLR", scheduler_args={"step_size": "2"}, num_processes=3
    )
    resumed.load_state_dict(wrapped.state_dict())
    assert resumed.get_last_lr() == wrapped.get_last_lr() == pytest.approx([LRS[0] * 0.1**2, LRS[1] * 0.1**2])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_adamw_on_half_lora_weights_survives_a_zero_first_gradient(dtype):
    """--full_fp16 / --full_bf16 with AdamW: A's gradient is exactly zero at the first step (B starts at zero); torch's
    default AdamW then divides 0 by sqrt(0) + 1e-8 in fp16, where 1e-8 is 0: NaN at the second step. We use the fused
    AdamW (fp32 math) for half weights."""
    import torch

    from library.train.optim import build_optimizer

    param = torch.nn.Parameter(torch.ones(8, dtype=getattr(torch, dtype)))
    optimizer = build_optimizer("AdamW", [{"params": [param], "lr": 1e-2}], 1e-2, None)
    assert optimizer.defaults["fused"] is True
    for grad in (0.0, 0.5, 0.5):
        param.grad = torch.full_like(param, grad)
        optimizer.step()
    assert torch.isfinite(param).all() and (param < 1).all()
    fp32 = build_optimizer("AdamW", [{"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1e-3}], 1e-3, None)
    assert not fp32.defaults["fused"]  # fp32 LoRA keeps torch's default
