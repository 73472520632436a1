"""The guards that keep good files: NaN/inf checks (steps, writers, states), the one-run-per-output lock, the
refusal of runs that would train nothing, and the SIGTERM / interrupt plumbing (no training here; see
tests/test_nan_and_signals.py for runs)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import train_network
from library.config.cli import resume_command
from library.errors import NonFiniteError, OutputInUseError
from library.files.finite import (
    NonFiniteSteps,
    check_finite_for_saving,
    first_non_finite,
    group_gradient_norms,
    non_finite_source,
)
from library.files.run_lock import lock_path, output_lock, read_holder
from library.train.interrupts import Phase, Terminated, TrainingInterrupted, sigterm_interrupts
from library.train.train_state import TrainProgress, save_state
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset

NAN, INF = float("nan"), float("inf")


# --- Non-finite values ------------------------------------------------------------------------------------------


def test_first_non_finite_names_the_first_bad_tensor_and_skips_integers():
    named = [
        ("ok", torch.ones(3)),
        ("ints", torch.tensor([1, 2])),
        ("inf", torch.tensor([1.0, INF])),
        ("nan", torch.tensor([NAN])),
    ]
    assert first_non_finite(named) == "inf"
    assert first_non_finite(named[:2]) is None
    assert first_non_finite([]) is None


def test_writer_check_sees_the_overflow_of_the_save_dtype(tmp_path):
    tensors = {"a.lora_up.weight": torch.tensor([1.0, 7e4])}  # finite in fp32, inf in fp16 (max 65504)
    check_finite_for_saving(tensors, torch.float32, tmp_path / "x.safetensors")
    check_finite_for_saving(tensors, torch.bfloat16, tmp_path / "x.safetensors")
    with pytest.raises(
        NonFiniteError,
        match=r"a\.lora_up\.weight holds NaN or infinite values after casting to "
        r"float16.*--save_precision float",
    ):
        check_finite_for_saving(tensors, torch.float16, tmp_path / "x.safetensors")
    with pytest.raises(NonFiniteError, match="refusing to write .*x.safetensors: b holds NaN") as error:
        check_finite_for_saving({"b": torch.tensor([NAN])}, None, tmp_path / "x.safetensors")
    assert "--save_precision" not in str(error.value)


def test_group_norms_find_the_group_and_do_not_overflow_in_fp16():
    params = [torch.nn.Parameter(torch.zeros(2, dtype=torch.float16)) for _ in range(3)]
    params[0].grad = torch.tensor([6e4, 6e4], dtype=torch.float16)  # its fp16 norm would overflow; fp32 does not
    params[1].grad = torch.tensor([1.0, NAN], dtype=torch.float16)
    groups = [{"params": [params[0]]}, {"params": [params[1], params[2]]}, {"params": [params[2]]}]
    norms = group_gradient_norms(groups).tolist()
    assert norms[0] == pytest.approx(84852.8, rel=1e-4) and torch.isnan(torch.tensor(norms[1])) and norms[2] == 0
    assert (
        non_finite_source(1.0, norms, ["unet", "unet plus", "textencoder"])
        == "gradients in parameter group 'unet plus' (norm nan)"
    )
    assert non_finite_source(INF, norms, ["unet", "unet plus", "textencoder"]) == "loss (inf)"  # the loss first
    assert non_finite_source(1.0, [1.0, 2.0], ["a", "b"]) is None
    assert non_finite_source(1.0, None, ["a"]) is None  # gradients not checked (fp16 loss scaling)


def test_non_finite_steps_skip_up_to_the_limit_then_stop():
    steps = NonFiniteSteps(limit=2)
    assert steps.skip_or_stop(3, "loss (nan)").startswith("warning: step 3: non-finite loss (nan); step skipped (1 of")
    steps.skip_or_stop(7, "loss (nan)")
    with pytest.raises(
        NonFiniteError,
        match=r"^step 9: non-finite loss \(nan\) \(one more than --max_nan_steps 2 "
        r"allows\); training stopped, no final file written",
    ):
        steps.skip_or_stop(9, "loss (nan)")
    assert steps.skipped == [3, 7]
    with pytest.raises(NonFiniteError, match="--max_nan_steps N"):
        NonFiniteSteps(limit=0).skip_or_stop(1, "loss (nan)")


def test_lora_writer_refuses_non_finite_weights_and_keeps_the_old_file(tiny_models, tmp_path):
    from library.train.ema import LoRAEMA, save_ema_weights
    from library.train.saving import LoRASaver
    from networks.lora import create_network

    network = create_network(
        1.0, 4, 1.0, None, [tiny_models.text_encoder1, tiny_models.text_encoder2], tiny_models.unet
    )
    ema = LoRAEMA(network, 0.9)
    saver = LoRASaver(tmp_path, "run", torch.float32, ema=ema)
    good = saver.save_final(network, {})
    before = {p: p.read_bytes() for p in (good, saver.ema_path(good))}
    name = next(n for n in network.state_dict() if n.endswith("lora_up.weight"))
    with torch.no_grad():
        network.state_dict()[name].fill_(NAN)
    with pytest.raises(NonFiniteError, match=f"refusing to write {good}: {name} holds NaN"):
        network.save_weights(good, torch.float32, {})
    # the EMA file is checked as well, and before the LoRA file: both are written or neither
    with torch.no_grad():
        network.state_dict()[name].fill_(0.5)  # finite, and not what the file holds
        ema.shadow[name].fill_(INF)
    with pytest.raises(NonFiniteError, match=f"{saver.ema_path(good).name}: {name} holds NaN"):
        saver.save_final(network, {})
    with pytest.raises(NonFiniteError):
        save_ema_weights(network, ema, tmp_path / "other-ema.safetensors", None, {})
    assert {p: p.read_bytes() for p in before} == before  # byte-identical
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-ema.safetensors", "run.safetensors"]  # no temp files


def test_state_with_a_non_finite_tensor_is_refused_before_anything_is_written(tmp_path):
    # The check comes before accelerate is touched (None here would fail on any use).
    with pytest.raises(NonFiniteError, match="refusing to write the state .*s-state: optimizer exp_avg holds NaN"):
        save_state(
            None,
            tmp_path / "s-state",
            TrainProgress(),
            check=[("w", torch.ones(2)), ("optimizer exp_avg", torch.tensor([NAN]))],
        )
    assert list(tmp_path.iterdir()) == []


# --- The output lock ------------------------------------------------------------------------------------------


def _write_lock(path: Path, **fields) -> None:
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_started": psutil.Process().create_time(),
        "started_at": "2026-01-01 00:00:00",
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder))


def test_lock_is_held_for_the_run_and_removed_after(tmp_path):
    with output_lock(tmp_path / "out", "run") as path:
        assert path == tmp_path / "out" / "run.lock"
        holder = read_holder(path)
        assert (holder.pid, holder.host) == (os.getpid(), socket.gethostname())
        with pytest.raises(OutputInUseError, match=rf"another run is writing run in .*out \(pid {os.getpid()} on "):
            with output_lock(tmp_path / "out", "run"):
                pass
        assert path.is_file()  # the refused run did not remove the holder's lock
        with output_lock(tmp_path / "out", "other"):  # another --output_name is another lock
            pass
    assert not path.exists()
    with pytest.raises(RuntimeError), output_lock(tmp_path / "out", "run"):
        raise RuntimeError("the run failed")
    assert not path.exists()  # released whatever happens


def test_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = lock_path(tmp_path, "run")
    _write_lock(path, pid=dead.pid, process_started=time.time() - 5)
    notes = []
    with output_lock(tmp_path, "run", note=notes.append):
        assert read_holder(path).pid == os.getpid()
    assert len(notes) == 1 and f"took over the stale lock {path} (pid {dead.pid} on" in notes[0]
    # A pid reused by a newer process (another start time) is stale too.
    _write_lock(path, process_started=psutil.Process().create_time() - 3600)
    with output_lock(tmp_path, "run", note=notes.append):
        pass
    assert len(notes) == 2 and not path.exists()
    assert not list(tmp_path.glob("*.stale-*"))


def test_unreadable_lock_is_stale_only_when_old(tmp_path):
    path = lock_path(tmp_path, "run")
    path.write_text("{not json")
    with pytest.raises(OutputInUseError, match="a run that is starting now"):  # may be being written right now
        with output_lock(tmp_path, "run"):
            pass
    old = time.time() - 60
    os.utime(path, (old, old))
    notes = []
    with output_lock(tmp_path, "run", note=notes.append):
        pass
    assert "it was unreadable" in notes[0]


def test_lock_from_another_host_is_refused_with_what_to_delete(tmp_path):
    path = lock_path(tmp_path, "run")
    _write_lock(path, host="other-machine", pid=12345)
    with pytest.raises(OutputInUseError, match=rf"pid 12345 on other-machine.*delete {path}"):
        with output_lock(tmp_path, "run"):
            pass
    assert path.is_file()


def test_a_lock_taken_over_by_another_run_is_not_removed_at_the_end(tmp_path):
    with output_lock(tmp_path, "run") as path:
        _write_lock(path, pid=os.getppid(), process_started=psutil.Process(os.getppid()).create_time())
    assert read_holder(path).pid == os.getppid()


# --- Signals and the resume command ---------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="needs POSIX signals")
def test_sigterm_raises_a_keyboard_interrupt_only_inside_the_context():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode
    assert signal.getsignal(signal.SIGTERM) is before
    assert issubclass(Terminated, KeyboardInterrupt) and issubclass(TrainingInterrupted, KeyboardInterrupt)


def test_interrupt_reports_and_exit_codes():
    stopped = TrainingInterrupted(
        Path("o/run-step00000003.safetensors"), Path("o/run-step00000003-state"), 3, signal_name="SIGTERM"
    )
    assert stopped.exit_code == 143 and stopped.report_lines() == [
        "interrupted (SIGTERM) after step 3: LoRA saved to o/run-step00000003.safetensors"
    ]
    phase = Phase()
    phase.enter("caching latents", "no LoRA or state was saved; the latents cached to disk so far are kept")
    early = TrainingInterrupted.during(phase, KeyboardInterrupt())
    assert early.exit_code == 130 and early.report_lines() == [
        "interrupted (SIGINT) while caching latents: no LoRA or state was saved; the latents cached to disk so far "
        "are kept"
    ]
    assert TrainingInterrupted.during(phase, Terminated(), is_main_process=False).report_lines() == []


def test_resume_command_replaces_any_resume_and_quotes():
    argv = ["--output_dir", "my out", "--resume", "old-state", "--seed", "1", "--resume=older"]
    command = resume_command(argv, Path("my out/run-step00000003-state"), program="python train_network.py")
    assert command == "python train_network.py --output_dir 'my out' --seed 1 --resume 'my out/run-step00000003-state'"


def test_run_turns_interrupts_into_exit_codes(monkeypatch, capsys):
    def stopped(argv=None):
        raise TrainingInterrupted(None, None, 2, signal_name="SIGTERM")

    monkeypatch.setattr(train_network, "main", stopped)
    assert train_network.run([]) == 143

    def plain(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_network, "main", plain)
    assert train_network.run([]) == 130
    assert capsys.readouterr().err == "interrupted (SIGINT) before training started: nothing was saved\n"


def test_sigterm_while_the_libraries_load_is_one_line_and_143():
    """A real SIGTERM inside `main` before the trainer starts (where torch and diffusers are imported, seconds):
    143 and its line, not a silent death by the signal (-15). In a child process, so that the signal's default
    action, were it back, would not end the test run."""
    code = (
        "import os, signal, sys, time, train_network\n"
        "def main(argv=None):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "train_network.main = main\n"
        "sys.exit(train_network.run([]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(train_network.__file__).parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 143
    assert done.stderr == "interrupted (SIGTERM) before training started: nothing was saved\n"


# --- Runs that would train nothing, refused before any model loads ----------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("guard_data")
    make_demo_dataset(root, count=2, min_side=64, max_side=64, repeats=1, name="toy", seed=0)
    return root


ALL_BLOCKS_ZERO = ["--network_args", "down_lr_weight=zeros", "mid_lr_weight=0,0,0", "up_lr_weight=zeros"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max_train_steps", "0"], "--max_train_steps 0 trains nothing"),
        (["--max_train_steps", "-5"], "--max_train_steps -5 trains nothing"),
        (["--max_train_epochs", "0"], "--max_train_epochs 0 trains nothing (it overrides --max_train_steps)"),
        (["--max_train_epochs", "-1", "--max_train_steps", "10"], "--max_train_epochs -1 trains nothing"),
        (
            ["--learning_rate", "0"],
            "nothing would train (the text encoders: learning rate 0 (--learning_rate 0); the "
            "UNet: learning rate 0 (--learning_rate 0)): give a learning rate above 0",
        ),
        (
            ["--learning_rate", "1e-4", "--unet_lr", "0", "--network_train_unet_only"],
            "(the text encoders: not trained (--network_train_unet_only); the UNet: learning rate 0 (--unet_lr 0))",
        ),
        (
            ["--text_encoder_lr", "0", "--network_train_text_encoder_only"],
            "the text encoders: learning rate 0 (--text_encoder_lr 0); the UNet: not trained",
        ),
        (
            ["--learning_rate", "0", "--unet_lr", "0", "--text_encoder_lr", "0"],
            "the UNet: learning rate 0 (--unet_lr 0)",
        ),
        (["--learning_rate=-1e-4"], "--learning_rate -0.0001 must be a finite number >= 0"),
        (["--unet_lr", "nan"], "--unet_lr nan must be a finite number >= 0"),
        (["--text_encoder_lr", "inf"], "--text_encoder_lr inf must be a finite number >= 0"),
        (
            ["--network_train_unet_only", *ALL_BLOCKS_ZERO],
            "the UNet: every block lr weight is 0 (down/mid/up_lr_weight)): change one of these",
        ),
        (
            ["--network_train_unet_only", "--network_args", "block_dims=" + ",".join(["0"] * 23)],
            "the UNet: every block dim is 0",
        ),
        (
            ["--text_encoder_lr", "0", *ALL_BLOCKS_ZERO],
            "the text encoders: learning rate 0 (--text_encoder_lr 0); the UNet: every block lr weight is 0",
        ),
        (["--max_nan_steps", "-1"], "--max_nan_steps must be 0 or more"),
    ],
)
def test_a_run_that_would_train_nothing_is_one_line_before_loading(tiny_sdxl, data, tmp_path, capsys, extra, message):
    assert train_network.main(tiny_train_argv(tiny_sdxl.single_file, data, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_some_zero_rates_still_train(tiny_sdxl, data, tmp_path):
    from library.config.build import config_from_args
    from library.config.cli import build_parser

    argv = tiny_train_argv(
        tiny_sdxl.single_file,
        data,
        tmp_path,
        "--learning_rate",
        "0",
        "--unet_lr",
        "1e-4",
        "--network_args",
        "down_lr_weight=zeros",
        "mid_lr_weight=0,0,0",
        "up_lr_weight=1,0,0,0,0,0,0,0,0",
    )
    assert config_from_args(build_parser().parse_args(argv)).optimizer.unet_lr == 1e-4


def test_resuming_a_state_at_the_end_of_the_schedule_is_refused(tiny_sdxl, data, tmp_path, capsys):
    state = tmp_path / "run-state"
    state.mkdir()
    (state / "train_state.json").write_text(json.dumps({"step": 8, "epoch": 3, "steps_in_epoch": 0}))
    base = tiny_train_argv(tiny_sdxl.single_file, data, tmp_path / "out", "--resume", str(state))
    assert train_network.main([*base, "--max_train_steps", "8"]) == 2
    assert "that state is at step 8 (epoch 3), already the end of --max_train_steps 8" in capsys.readouterr().err
    assert train_network.main([*base, "--max_train_epochs", "2"]) == 2
    assert "already the end of --max_train_epochs 2; nothing would train" in capsys.readouterr().err


def test_weights_file_without_modules_of_the_trained_part_is_refused(tiny_sdxl, data, tmp_path, capsys):
    from safetensors.torch import save_file

    weights = tmp_path / "te_only.safetensors"
    save_file(
        {
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
        },
        str(weights),
    )
    argv = tiny_train_argv(
        tiny_sdxl.single_file,
        data,
        tmp_path / "out",
        "--network_weights",
        str(weights),
        "--dim_from_weights",
        "--network_train_unet_only",
    )
    assert train_network.main(argv) == 2
    assert "the UNet: the --network_weights file has no UNet modules" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="needs POSIX signals")
@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_signals_in_a_deferred_section_are_raised_after_it(signum, raised):
    from library.train.interrupts import interrupts_deferred

    done = []
    with pytest.raises(raised) as error, sigterm_interrupts():
        with interrupts_deferred():
            os.kill(os.getpid(), signum)
            time.sleep(0.2)
            done.append("the whole body")
    assert done == ["the whole body"] and type(error.value) is raised
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_output_folder_that_cannot_be_created_is_one_line(tmp_path):
    from library.errors import UserInputError

    (tmp_path / "taken").write_text("a file where the output folder should be")
    with pytest.raises(UserInputError, match="--output_dir: cannot create .*taken/run.lock: "):
        with output_lock(tmp_path / "taken", "run"):
            pass
