"""Saving and exact resume: a run interrupted and resumed (twice, and by Ctrl-C) ends with the same LoRA weights as
an uninterrupted one; checkpoint rotation keeps the last N files.

The run: 6 images, batch 1, gradient accumulation 2 -> 3 optimizer steps per epoch, 2 epochs = 6 steps, with LoRA
dropout and caption shuffling (both draw random numbers), AdamW and a cosine schedule with warmup, so a resume that
lost the step, the epoch, the lr, the optimizer state, an RNG state or the data order would end elsewhere.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import library.train.loop as loop_module
import library.train.step as step_module
import train_network
from library.config.build import config_from_args
from library.config.cli import build_parser
from library.train.trainer import TrainingInterrupted, train
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset

TOTAL_STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_data")
    make_demo_dataset(root, count=6, min_side=64, max_side=64, repeats=1, name="toy", seed=1)
    return root


def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_train_argv(
        model,
        data,
        out,
        "--train_batch_size",
        "1",
        "--max_train_epochs",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--optimizer_type",
        "AdamW",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "2",
        "--network_dim",
        "4",
        "--network_dropout",
        "0.1",
        "--shuffle_caption",
        "--cache_latents",
        "--output_name",
        "run",
        "--ema_decay",
        "0.8",
        "--diagnostics_every_n_steps",
        "2",
        *extra,
    )


def _history(out: Path) -> dict:
    """The report's history: every step's loss and group lrs, the LoRA+ diagnostics (steps 2, 4, 6)."""
    return json.loads((out / "run_report.json").read_text())["history"]


def _train(argv: list[str]):
    return train(config_from_args(build_parser().parse_args(argv)))


@pytest.fixture(scope="module")
def uninterrupted(tiny_sdxl, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = _train(_argv(tiny_sdxl.single_file, data, out, "--save_every_n_steps", "2", "--save_state"))
    return out, result


@pytest.mark.slow
def test_the_run_has_the_planned_shape(uninterrupted):
    out, result = uninterrupted
    assert (result.steps, result.epochs, len(result.losses)) == (TOTAL_STEPS, 2, TOTAL_STEPS)
    # States at steps 2 and 4 (mid-epoch: 3 steps per epoch) and at the end.
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "run-state",
        "run-step00000002-state",
        "run-step00000004-state",
    ]
    state = json.loads((out / "run-step00000004-state" / "train_state.json").read_text())
    assert state == {"step": 4, "epoch": 2, "steps_in_epoch": 1}


@pytest.mark.slow
def test_resumed_twice_ends_with_identical_weights(uninterrupted, tiny_sdxl, data, tmp_path):
    out, reference = uninterrupted
    first = _train(
        _argv(
            tiny_sdxl.single_file,
            data,
            tmp_path / "r1",
            "--resume",
            str(out / "run-step00000002-state"),
            "--save_every_n_steps",
            "2",
            "--save_state",
        )
    )
    assert first.losses == reference.losses[2:]  # same noise, data, lr and optimizer state from step 3 on
    second = _train(
        _argv(tiny_sdxl.single_file, data, tmp_path / "r2", "--resume", str(tmp_path / "r1" / "run-step00000004-state"))
    )
    assert second.losses == reference.losses[4:]
    # The reports cover the whole training: r1 took steps 1-2 from the report beside the state it resumed (in the
    # uninterrupted run's folder), r2 steps 1-4 from r1's; the numbers are the uninterrupted run's, to the digit.
    assert _history(tmp_path / "r1") == _history(tmp_path / "r2") == _history(out)
    assert _history(out)["diagnostics"]["steps"] == [2, 4, 6]
    want, got = load_file(str(reference.final_path)), load_file(str(second.final_path))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ema_want = load_file(str(reference.final_path.with_name("run-ema.safetensors")))
    ema_got = load_file(str(second.final_path.with_name("run-ema.safetensors")))
    assert all(torch.equal(ema_want[k], ema_got[k]) for k in ema_want)  # the EMA resumes exactly too
    assert not all(torch.equal(ema_want[k], want[k]) for k in want)
    with safe_open(str(second.final_path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_steps"], meta["ss_epoch"]) == (str(TOTAL_STEPS), "2")


@pytest.mark.slow
def test_ctrl_c_saves_lora_and_state_and_resume_is_exact(uninterrupted, tiny_sdxl, data, tmp_path, monkeypatch):
    _, reference = uninterrupted
    real_step, calls = loop_module.backward_step, []

    def interrupted_on_the_fourth_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # mid-step: its gradients and random draws must not leak into the saved state
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop_module, "backward_step", interrupted_on_the_fourth_step)
    with pytest.raises(TrainingInterrupted) as stop:
        _train(_argv(tiny_sdxl.single_file, data, tmp_path / "c"))
    assert stop.value.step == 3
    assert stop.value.lora_path == tmp_path / "c" / "run-step00000003.safetensors" and stop.value.lora_path.is_file()
    assert stop.value.state_path == tmp_path / "c" / "run-step00000003-state"
    monkeypatch.setattr(loop_module, "backward_step", real_step)
    assert _history(tmp_path / "c")["steps"] == [1, 2, 3]  # the interrupt brought the report up to date
    resumed = _train(_argv(tiny_sdxl.single_file, data, tmp_path / "c2", "--resume", str(stop.value.state_path)))
    assert resumed.losses == reference.losses[3:]
    assert _history(tmp_path / "c2") == _history(uninterrupted[0])  # steps 1-3 from the interrupted run's report
    want, got = load_file(str(reference.final_path)), load_file(str(resumed.final_path))
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.skipif(os.name == "nt", reason="sends a POSIX signal")
@pytest.mark.parametrize("where, saved_step", [("batch_loss", 3), ("apply_update", 4)])
@pytest.mark.slow
def test_sigterm_at_any_point_of_a_step_resumes_exactly(
    uninterrupted, tiny_sdxl, data, tmp_path, monkeypatch, where, saved_step
):
    """A real SIGTERM during step 4: in its first batch, after its noise and dropout were drawn (the step is
    dropped and the RNG put back: state of step 3), or in its optimizer update (the update and the step's
    bookkeeping finish first: state of step 4). Either way the resumed run ends where the uninterrupted one did."""
    _, reference = uninterrupted
    module = {"batch_loss": step_module, "apply_update": loop_module}[where]  # where each is called from
    real, calls = getattr(module, where), []
    signal_at = {"batch_loss": 7, "apply_update": 4}[where]  # 2 batches per step: batch 7 starts step 4

    def signalled(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(module, where, signalled)
    with pytest.raises(TrainingInterrupted) as stop:
        _train(_argv(tiny_sdxl.single_file, data, tmp_path / "t"))
    assert (stop.value.signal_name, stop.value.exit_code, stop.value.step) == ("SIGTERM", 143, saved_step)
    monkeypatch.setattr(module, where, real)
    resumed = _train(_argv(tiny_sdxl.single_file, data, tmp_path / "t2", "--resume", str(stop.value.state_path)))
    assert resumed.losses == reference.losses[saved_step:]
    assert _history(tmp_path / "t2") == _history(uninterrupted[0])  # the report kept every step up to the state's
    want, got = load_file(str(reference.final_path)), load_file(str(resumed.final_path))
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.slow
def test_ctrl_c_through_main_says_how_to_resume_and_propagates(tiny_sdxl, data, tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "backward_step", interrupt)
    argv = _argv(tiny_sdxl.single_file, data, tmp_path)
    # main() re-raises, so an in-process caller (this test session) stops as it would on Ctrl-C; the script
    # entry `run` turns it into exit code 130 (tests/test_guards.py)
    with pytest.raises(TrainingInterrupted) as stop:
        train_network.main(argv)
    assert isinstance(stop.value, KeyboardInterrupt) and stop.value.exit_code == 130
    err = capsys.readouterr().err.split("\n")  # (progress bars use carriage returns: not line breaks here)
    err = err[next(i for i, line in enumerate(err) if line.startswith("interrupted")) :]
    assert err[0] == f"interrupted (SIGINT) after step 0: LoRA saved to {tmp_path / 'run-step00000000.safetensors'}"
    state = tmp_path / "run-step00000000-state"
    assert err[1] == f"state saved to {state}; continue with:"
    assert err[2].endswith(shlex.join([*argv, "--resume", str(state)]))
    assert not (tmp_path / "run.lock").exists()


@pytest.mark.slow
def test_rotation_keeps_the_last_n_checkpoints_and_states(tiny_sdxl, data, tmp_path):
    _train(
        _argv(
            tiny_sdxl.single_file,
            data,
            tmp_path,
            "--max_train_epochs",
            "4",
            "--save_every_n_epochs",
            "1",
            "--save_last_n_epochs",
            "2",
            "--save_every_n_steps",
            "1",
            "--save_last_n_steps",
            "2",
            "--save_state",
            "--save_last_n_steps_state",
            "1",
        )
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    # 12 steps: step files of the last 2 steps before the end (10, 11), their newest state only; epochs 2 and 3
    # (epoch 4 is the final file) with their states (rotated with the files by default).
    assert [n for n in names if "-step" in n] == [
        "run-step00000010-ema.safetensors",
        "run-step00000010.safetensors",
        "run-step00000011-ema.safetensors",
        "run-step00000011-state",
        "run-step00000011.safetensors",
    ]
    assert [n for n in names if n.startswith("run-0")] == [
        "run-000002-ema.safetensors",
        "run-000002-state",
        "run-000002.safetensors",
        "run-000003-ema.safetensors",
        "run-000003-state",
        "run-000003.safetensors",
    ]
    assert "run.safetensors" in names


def test_resume_from_a_folder_that_is_not_a_state_is_one_line(tiny_sdxl, data, tmp_path, capsys):
    assert train_network.main(_argv(tiny_sdxl.single_file, data, tmp_path, "--resume", str(data))) == 2
    assert "is not a state folder saved by --save_state" in capsys.readouterr().err


def test_resume_with_other_network_flags_is_one_line(uninterrupted, tiny_sdxl, data, tmp_path, capsys):
    out, _ = uninterrupted
    argv = _argv(
        tiny_sdxl.single_file, data, tmp_path, "--resume", str(out / "run-step00000002-state"), "--network_dim", "8"
    )
    assert train_network.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --resume") and "does not fit this run" in errors[0]
    assert "size mismatch" in errors[0]
