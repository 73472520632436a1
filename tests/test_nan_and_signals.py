"""Runs on the tiny SDXL that go wrong: a NaN loss or gradient (stop, or skip under --max_nan_steps), Ctrl-C and
SIGTERM in training and while caching (real signals to real processes), a second run on the same output."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import library.train.loop as loop_module
import library.train.setup_parts as setup_parts
import library.train.step as step_module
import train_network
from library.train.interrupts import TrainingInterrupted
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset

REPO = Path(__file__).resolve().parents[1]
NAN = float("nan")
posix_signals = pytest.mark.skipif(os.name == "nt", reason="sends POSIX signals")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nan_data")
    make_demo_dataset(root, count=4, min_side=64, max_side=64, repeats=1, name="toy", seed=3)
    return root


def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_train_argv(
        model,
        data,
        out,
        "--train_batch_size",
        "1",
        "--cache_latents",
        "--learning_rate",
        "1e-3",
        "--output_name",
        "run",
        *extra,
    )


def _nan_loss_on_calls(monkeypatch, calls: set[int]) -> list[int]:
    """batch_loss returns NaN on these (1-based) calls; returns the call counter."""
    real, count = step_module.batch_loss, []

    def batch_loss(*args, **kwargs):
        count.append(1)
        loss = real(*args, **kwargs)
        return loss * NAN if len(count) in calls else loss

    monkeypatch.setattr(step_module, "batch_loss", batch_loss)
    return count


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_every_earlier_file(tiny_sdxl, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {
        out / "run.safetensors": b"the final file of an earlier run",
        out / "run-step00000002.safetensors": b"a step file of an earlier run",
        out / "run_param_groups.json": b"the groups of the earlier run's final file",
    }
    for path, content in earlier.items():
        path.write_bytes(content)
    _nan_loss_on_calls(monkeypatch, {2})
    assert (
        train_network.main(
            _argv(tiny_sdxl.single_file, data, out, "--max_train_steps", "4", "--save_every_n_steps", "1")
        )
        == 3
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: step 2: non-finite loss (nan); training stopped, no final file written (files saved "
        "before step 2 are kept): lower the learning rate, check the data, or let such steps be "
        "skipped with --max_nan_steps N"
    ]
    assert {path: path.read_bytes() for path in earlier} == earlier  # byte-identical: nothing replaced
    assert sorted(p.name for p in out.iterdir()) == [
        "run-step00000001.safetensors",
        "run-step00000002.safetensors",
        "run.safetensors",
        "run_param_groups.json",
        "run_report.html",
        "run_report.json",
    ]  # no lock left; the report as of step 1's save


def test_max_nan_steps_skips_updates_keeps_the_schedule_and_counts(tiny_sdxl, data, tmp_path, monkeypatch, capsys):
    """Step 2: NaN gradients in the UNet's B matrices only (the loss is finite) -> named group 'unet plus';
    step 3: NaN loss. Both skipped (--max_nan_steps 2): no update, the linear schedule still advances."""
    calls = _nan_loss_on_calls(monkeypatch, {3})
    real_network, real_step, lrs = setup_parts.create_lora_network, loop_module.backward_step, []

    def network_with_nan_gradients_at_step_2(net_cfg, models):
        network = real_network(net_cfg, models)
        for lora in network.unet_loras:
            lora.lora_up.weight.register_hook(lambda grad: grad * NAN if len(calls) == 2 else grad)
        return network

    def recording_step(parts, *args, **kwargs):
        result = real_step(parts, *args, **kwargs)
        lrs.append(parts.lr_scheduler.get_last_lr()[0])  # before this step's scheduler step
        return result

    monkeypatch.setattr(setup_parts, "create_lora_network", network_with_nan_gradients_at_step_2)
    monkeypatch.setattr(loop_module, "backward_step", recording_step)
    out = tmp_path / "out"
    assert (
        train_network.main(
            _argv(
                tiny_sdxl.single_file,
                data,
                out,
                "--max_train_steps",
                "4",
                "--save_every_n_steps",
                "1",
                "--loraplus_lr_ratio",
                "4",
                "--max_nan_steps",
                "2",
                "--lr_scheduler",
                "linear",
            )
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert (
        "warning: step 2: non-finite gradients in parameter group 'unet plus' (norm nan); step skipped (1 of at "
        "most 2, --max_nan_steps)" in stdout
    )
    assert "warning: step 3: non-finite loss (nan); step skipped (2 of at most 2" in stdout
    assert lrs == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])  # the skipped steps advanced the schedule too
    weights = [load_file(str(out / f"run-step{step:08d}.safetensors")) for step in (1, 2, 3)]
    weights.append(load_file(str(out / "run.safetensors")))
    assert all(
        torch.equal(weights[0][k], weights[1][k]) and torch.equal(weights[0][k], weights[2][k]) for k in weights[0]
    )  # steps 2 and 3 changed nothing
    assert not all(torch.equal(weights[0][k], weights[3][k]) for k in weights[0])  # step 4 trained
    report = json.loads((out / "run_report.json").read_text())
    assert (report["steps"], report["non_finite_steps_skipped"]) == (4, 2)


@pytest.mark.slow
def test_a_state_holding_nan_is_refused_and_the_earlier_state_kept(tiny_sdxl, data, tmp_path, monkeypatch, capsys):
    real_save = loop_module.save_step_checkpoint

    def poisoned_at_step_2(out, parts, progress, timer):
        if progress.step == 2:  # the weights stay finite; only the optimizer's moment estimate breaks
            next(iter(parts.optimizer.state.values()))["exp_avg"].fill_(NAN)
        return real_save(out, parts, progress, timer)

    monkeypatch.setattr(loop_module, "save_step_checkpoint", poisoned_at_step_2)
    out = tmp_path / "out"
    assert (
        train_network.main(
            _argv(
                tiny_sdxl.single_file, data, out, "--max_train_steps", "3", "--save_every_n_steps", "1", "--save_state"
            )
        )
        == 3
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: refusing to write the state {out / 'run-step00000002-state'}: optimizer state exp_avg "
        "of parameter 0 holds NaN or infinite values; states written before are kept"
    ]
    assert json.loads((out / "run-step00000001-state" / "train_state.json").read_text())["step"] == 1
    assert not (out / "run-step00000002-state").exists() and not list(out.glob(".*"))  # no half state, no temp


def test_ctrl_c_while_caching_is_one_line_and_propagates(tiny_sdxl, data, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(setup_parts, "cache_latents", interrupted)
    out = tmp_path / "out"
    with pytest.raises(TrainingInterrupted) as stop:
        train_network.main(_argv(tiny_sdxl.single_file, data, out, "--cache_latents_to_disk"))
    assert (stop.value.phase, stop.value.exit_code) == ("caching latents", 130)
    assert capsys.readouterr().err.splitlines() == [
        "interrupted (SIGINT) while caching latents: no LoRA or state was saved; the latents cached to disk so far "
        "are kept and reused"
    ]
    assert list(out.iterdir()) == []  # the lock is released


def test_a_second_run_on_a_held_output_is_refused_before_loading(tiny_sdxl, data, tmp_path, monkeypatch, capsys):
    from library.files.run_lock import output_lock

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(setup_parts, "load_sdxl", no_loading)
    with output_lock(tmp_path, "run"):  # held by a live process (this one)
        assert train_network.main(_argv(tiny_sdxl.single_file, data, tmp_path)) == 75
    err = capsys.readouterr().err
    assert err.startswith(f"error: another run is writing run in {tmp_path} (pid {os.getpid()} on ")
    assert len(err.splitlines()) == 1


# --- Real signals to real processes ---------------------------------------------------------------------------


def _start(command: list[str], logs: Path, cwd: Path = REPO) -> subprocess.Popen:
    # The threads this process trains with: a run continued here must compute what the one started there would
    # (a float sum split over another number of threads can differ in its last bit).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=open(logs / "stdout", "w"), stderr=open(logs / "stderr", "w")
    )


def _wait_for(condition, proc: subprocess.Popen, logs: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"gave up waiting (exit {proc.poll()}):\n{(logs / 'stderr').read_text()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.slow
@posix_signals
def test_sigterm_in_training_saves_and_the_printed_command_resumes_exactly(tiny_sdxl, data, tmp_path, capsys):
    steps = 10
    out = tmp_path / "out"
    argv = _argv(tiny_sdxl.single_file, data, out, "--max_train_steps", str(steps), "--save_every_n_steps", "1")
    proc = _start([sys.executable, "train_network.py", *argv], tmp_path)
    _wait_for(lambda: (out / "run-step00000001.safetensors").is_file(), proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143
    stderr = (tmp_path / "stderr").read_text()
    lines = stderr.splitlines()
    assert "Traceback" not in stderr
    stopped = [line for line in lines if line.startswith("interrupted (SIGTERM) after step ")]
    assert len(stopped) == 1, stderr
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert 1 <= step < steps
    lora, state = out / f"run-step{step:08d}.safetensors", out / f"run-step{step:08d}-state"
    assert stopped[0].endswith(f"LoRA saved to {lora}") and lora.is_file() and (state / "train_state.json").is_file()
    assert lines[lines.index(f"state saved to {state}; continue with:") + 1].startswith("  ")
    command = shlex.split(lines[lines.index(f"state saved to {state}; continue with:") + 1])
    assert command[1:] == ["train_network.py", *argv, "--resume", str(state)]
    assert not (out / "run.lock").exists() and not (out / "run.safetensors").exists()

    assert train_network.main(command[2:]) == 0  # the printed command finishes the run
    ref_argv = _argv(tiny_sdxl.single_file, data, tmp_path / "ref", "--max_train_steps", str(steps))
    assert train_network.main(ref_argv) == 0
    want, got = load_file(str(tmp_path / "ref" / "run.safetensors")), load_file(str(out / "run.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)  # as if never stopped


@pytest.mark.slow
@posix_signals
def test_real_ctrl_c_stops_a_pytest_session_that_calls_main(tiny_sdxl, data, tmp_path):
    """main() re-raises the interrupt: the in-process caller (here a pytest session) stops, later tests do not run."""
    out, marker = tmp_path / "out", tmp_path / "second_test_ran"
    argv = _argv(tiny_sdxl.single_file, data, out, "--max_train_steps", "200", "--save_every_n_steps", "1")
    (tmp_path / "test_caller.py").write_text(
        "from pathlib import Path\nimport train_network\n\n"
        f"def test_training():\n    train_network.main({argv!r})\n\n"
        f"def test_after_it():\n    Path({str(marker)!r}).write_text('ran')\n"
    )
    proc = _start(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_caller.py"], tmp_path, cwd=tmp_path
    )
    _wait_for(lambda: (out / "run-step00000001.safetensors").is_file(), proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 2  # pytest's "interrupted"
    assert "TrainingInterrupted: interrupted (SIGINT) after step" in (tmp_path / "stdout").read_text()
    assert not marker.exists()
    assert list(out.glob("run-step*-state")) and not (out / "run.lock").exists()


@pytest.mark.slow
@posix_signals
def test_sigterm_while_caching_is_one_line_without_traceback(tiny_sdxl, data, tmp_path):
    out = tmp_path / "out"
    script = (
        "import sys, time\nimport library.train.setup_parts as setup\n"
        "def slow(*args, **kwargs):\n    print('caching', flush=True)\n    time.sleep(300)\n"
        "setup.cache_latents = slow\nimport train_network\nsys.exit(train_network.run(sys.argv[1:]))\n"
    )
    proc = _start([sys.executable, "-c", script, *_argv(tiny_sdxl.single_file, data, out)], tmp_path)
    _wait_for(lambda: "caching" in (tmp_path / "stdout").read_text(), proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    stderr = (tmp_path / "stderr").read_text()
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if "interrupted" in line] == [
        "interrupted (SIGTERM) while caching latents: no LoRA or state was saved"
    ]
    assert list(out.iterdir()) == []
