"""Several processes, the parts that need no second process: the stop agreement, signals noted instead of raised,
the one line for a lost process, --ddp_timeout, the RNG files a resumed state must hold, sample prompts shared out.
The launched runs are in test_multiprocess.py."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import library.train.loop as loop_module
import library.train.sampling as sampling_module
from library.config.build import config_from_args
from library.config.cli import build_parser
from library.errors import EXIT_PROCESS_LOST, UserInputError
from library.train.interrupts import Terminated, noted_interrupts, sigterm_interrupts
from library.train.process_group import StopAgreement, init_kwargs, lost_process_error
from library.train.run_report import StepTimer
from library.train.sampling import SamplePrompt, SamplingConfig
from library.train.train_state import STATE_FILES, check_resume_folder, check_state_processes
from tests.cli_args import tiny_train_argv


class FakeAccelerator:
    """What the code under test reads of accelerate's Accelerator; `gather` answers what the processes shared."""

    def __init__(self, process_index: int = 0, num_processes: int = 2, shared: list[int] | None = None) -> None:
        self.process_index, self.num_processes = process_index, num_processes
        self.is_main_process = process_index == 0
        self.device, self.trackers, self.shared, self.gathered = torch.device("cpu"), [], shared, []

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.gathered.append(tensor.tolist())
        return torch.tensor(self.shared if self.shared is not None else tensor.tolist() * self.num_processes)


def test_every_process_stops_at_the_batch_where_any_was_signalled():
    batches = iter([{"b": 0}, {"b": 1}, {"b": 2}])
    quiet = FakeAccelerator(shared=[0, 0])
    assert list(StopAgreement(quiet, []).checked(batches)) == [{"b": 0}, {"b": 1}, {"b": 2}]
    assert quiet.gathered == [[0]] * 4  # before each batch, and before learning the epoch is over
    # This process got nothing; the other one got SIGTERM: this one raises SIGTERM's interrupt too.
    with pytest.raises(Terminated):
        next(StopAgreement(FakeAccelerator(shared=[0, 2]), []).checked(iter([{"b": 0}])))
    told = FakeAccelerator(shared=[1, 0])
    with pytest.raises(KeyboardInterrupt) as raised:
        next(StopAgreement(told, ["SIGINT"]).checked(iter([{"b": 0}])))
    assert not isinstance(raised.value, Terminated) and told.gathered == [[1]]


@pytest.mark.skipif(os.name == "nt", reason="sends POSIX signals")
def test_signals_are_noted_not_raised_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    with sigterm_interrupts(), noted_interrupts() as noted:  # the trainer's SIGTERM handler, then the noting one
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # Python runs the handlers between bytecodes
            if len(noted) == 2:
                break
    assert noted == ["SIGTERM", "SIGINT"]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_collective_that_lost_its_peer_is_one_line_other_errors_are_not():
    closed = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:60549. "
        "This is typically caused by a remote worker crashing."
    )
    lost = lost_process_error(closed)
    assert lost is not None and lost.exit_code == EXIT_PROCESS_LOST == 69
    assert str(lost).startswith(
        "lost contact with another process of this run (Connection closed by peer [127.0.0.1]:60549): it stopped"
    )
    assert "\n" not in str(lost)
    timed_out = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 900000ms for recv operation"
    )
    assert "(Timed out waiting 900000ms for recv operation)" in str(lost_process_error(timed_out))
    assert lost_process_error(RuntimeError("CUDA out of memory")) is None
    assert lost_process_error(ValueError("gloo")) is None


def test_ddp_timeout_is_minutes_for_the_process_group(tiny_sdxl, tmp_path):
    data = tmp_path / "data"
    (data / "1_toy").mkdir(parents=True)
    argv = tiny_train_argv(tiny_sdxl.single_file, data, tmp_path / "out", "--ddp_timeout", "2.5")
    assert config_from_args(build_parser().parse_args(argv)).loop.ddp_timeout_minutes == 2.5
    assert init_kwargs(2.5) == {"timeout": timedelta(minutes=2.5)} and init_kwargs(None) == {}
    assert build_parser().parse_args(argv[:-2]).ddp_timeout is None  # torch's default
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv[:-1], "0"])


def _state_folder(root: Path, ranks: list[int]) -> Path:
    root.mkdir(exist_ok=True)
    for rank in ranks:
        (root / f"random_states_{rank}.pkl").write_bytes(b"")
    return root


def test_a_resumed_state_needs_one_rng_file_per_process(tmp_path):
    check_state_processes(_state_folder(tmp_path / "two", [0, 1]), 2)
    with pytest.raises(UserInputError, match=r"was saved by 2 processes and this run has 1: resume with 2 \("):
        check_state_processes(tmp_path / "two", 1)
    with pytest.raises(UserInputError, match=r"was saved by 1 process and this run has 2: resume with 1 \("):
        check_state_processes(_state_folder(tmp_path / "one", [0]), 2)
    with pytest.raises(UserInputError, match=r"lacks random_states_1\.pkl: the state is incomplete"):
        check_state_processes(_state_folder(tmp_path / "gap", [0, 2]), 3)


def test_resume_checks_the_process_count_before_the_model_loads(tmp_path, monkeypatch):
    """`check_resume` (the config checks, before any model loads) counts the launcher's WORLD_SIZE."""
    from library.config.checks import check_resume

    state = _state_folder(tmp_path / "s", [0])
    (state / "train_state.json").write_text('{"step": 1, "epoch": 1, "steps_in_epoch": 1}')
    for name in STATE_FILES:
        (state / name).touch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    loop = SimpleNamespace(max_train_steps=10, max_train_epochs=None)
    with pytest.raises(UserInputError, match="saved by 1 process and this run has 2"):
        check_resume(state, loop, with_ema=False)
    with pytest.raises(UserInputError, match="is damaged"):  # with one process, the next check speaks
        check_resume_folder(state, processes=1)


def test_sample_prompts_are_shared_out_like_sd_scripts(monkeypatch, tmp_path):
    """Process i of N renders prompts i, i+N, ...; the main process gets every (index, path) for its trackers."""
    rendered: dict[int, list[int]] = {}

    def sample_images(models, prompts, **kwargs):
        rendered[kwargs["seed_base"]] = [p.index for p in prompts]
        return [tmp_path / f"{p.index}.png" for p in prompts]

    monkeypatch.setattr(sampling_module, "sample_images", sample_images)
    gathered = []
    monkeypatch.setattr(loop_module, "gather_object", lambda made: gathered.append(made) or made)
    sampling = SamplingConfig(tuple(SamplePrompt(i, f"p{i}") for i in range(5)), every_n_steps=1)
    out = SimpleNamespace(output_dir=tmp_path, output_name="run")
    for rank in (0, 1, 2):
        parts = SimpleNamespace(
            accelerator=FakeAccelerator(rank, 3),
            models=None,
            plan=SimpleNamespace(compute_dtype=torch.float32),
            network=None,
        )
        loop = SimpleNamespace(max_token_length=75, seed=rank)  # the seed tells the processes apart here
        loop_module.maybe_sample(sampling, out, loop, parts, StepTimer(), step=1, epoch=None)
    assert rendered == {0: [0, 3], 1: [1, 4], 2: [2]}
    assert gathered == [
        [(0, str(tmp_path / "0.png")), (3, str(tmp_path / "3.png"))],
        [(1, str(tmp_path / "1.png")), (4, str(tmp_path / "4.png"))],
        [(2, str(tmp_path / "2.png"))],
    ]
