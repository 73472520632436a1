"""The private parts of accelerate, torch and argparse the product relies on (each behind one function), run against
the installed versions: an upgrade that changes one fails here with a message naming the library and what changed,
instead of failing a user's run."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import accelerate
import pytest
import torch
from accelerate import Accelerator, PartialState

from library.config.cli import build_parser
from library.config.config_file import argument_groups, parser_actions
from library.train.accelerate_compat import allow_fp16_gradients, reset_accelerator_state

ACCELERATE = f"accelerate {accelerate.__version__}"
TORCH = f"torch {torch.__version__}"
PYTHON = f"argparse (Python {sys.version.split()[0]})"


def _reset() -> None:
    try:
        reset_accelerator_state()
    except (AttributeError, TypeError) as error:
        pytest.fail(
            f"{ACCELERATE} changed AcceleratorState._reset_state(reset_partial_state=...) ({error}): "
            "library/train/accelerate_compat.reset_accelerator_state must change"
        )


def test_accelerate_state_reset_lets_the_next_run_choose_its_precision():
    """`reset_accelerator_state` (AcceleratorState._reset_state): a second Accelerator in the process may take
    another mixed precision, and the distributed state is kept."""
    _reset()
    Accelerator(mixed_precision="no")
    with pytest.raises(ValueError, match="already been initialized"):  # why the reset exists
        Accelerator(mixed_precision="bf16")
    partial = dict(PartialState._shared_state)
    _reset()
    assert PartialState._shared_state == partial and partial, (
        f"{ACCELERATE}: AcceleratorState._reset_state(reset_partial_state=False) no longer keeps PartialState"
    )
    try:
        accelerator = Accelerator(mixed_precision="bf16")
    except ValueError as error:
        pytest.fail(
            f"{ACCELERATE}: AcceleratorState._reset_state no longer clears the mixed precision ({error}): "
            "library/train/accelerate_compat.reset_accelerator_state must change"
        )
    assert accelerator.mixed_precision == "bf16"
    _reset()


def _fp16_gradients(patched: bool) -> torch.Tensor:
    """Unscale the fp16 gradient of one fp16 weight (grad 8 at scale 4) through a GradScaler, as --full_fp16 does."""
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    if patched:
        allow_fp16_gradients(SimpleNamespace(scaler=scaler))
    scaler.scale((weight.float() * 2).sum()).backward()
    scaler.unscale_(optimizer)
    return weight.grad


def test_grad_scaler_unscales_fp16_gradients_once_allowed():
    """`allow_fp16_gradients` (GradScaler._unscale_grads_ told allow_fp16=True): fp16 gradients are unscaled."""
    changed = (
        f"{TORCH} changed GradScaler._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16): "
        "library/train/accelerate_compat.allow_fp16_gradients must change, or --full_fp16 fails at its first step"
    )
    try:
        with pytest.raises(ValueError, match="unscale FP16 gradients"):  # why the change exists
            _fp16_gradients(patched=False)
        grad = _fp16_gradients(patched=True)
    except (ValueError, TypeError, AttributeError, pytest.fail.Exception) as error:
        pytest.fail(f"{changed} ({type(error).__name__}: {str(error).splitlines()[0]})")
    assert grad.dtype == torch.float16 and grad.tolist() == [2.0] * 4, (
        f"{changed} (fp16 gradients {grad.tolist()} after unscaling, expected 2.0 each)"
    )


def test_allow_fp16_gradients_leaves_a_run_without_scaler_alone():
    accelerator = SimpleNamespace(scaler=None)
    allow_fp16_gradients(accelerator)
    assert accelerator.scaler is None


def test_argparse_lists_every_action_in_exactly_one_group():
    """`argument_groups` (argparse's `_action_groups` / `_group_actions`): --config_file's keys and
    --output_config's tables come from it, so every flag of the command line must be there once, in its group."""
    parser = build_parser()
    try:
        groups = argument_groups(parser)
    except AttributeError as error:
        pytest.fail(
            f"{PYTHON} changed its private action lists ({error}): "
            "library/config/config_file.argument_groups must change"
        )
    dests = [action.dest for action in parser_actions(parser)]
    parsed = vars(parser.parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", "o"]))
    assert sorted(dests) == sorted({*parsed, "help"}), (
        f"{PYTHON}: the actions listed by group are not the parser's flags: config_file.argument_groups must change"
    )
    titles = {title: [action.dest for action in actions] for title, actions in groups}
    assert titles["noise and loss"][:2] == ["noise_offset", "noise_offset_random_strength"], titles
    assert titles["EMA"] == ["ema_decay", "ema_update_after_step", "ema_warmup"], titles
