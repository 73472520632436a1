"""The LoRA gradients are averaged in a few bucketed collectives (`library.train.grad_sync`): two processes over gloo
get the per-tensor mean, a gradient missing on one process counts as zeros and one missing on every process stays
None; a two-process run with module_dropout and uneven batches (each process drawing its own noise) does not hang
and ends with identical weights."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from library.report.run_page import cost_table
from library.train.grad_sync import BUCKET_BYTES, average_gradients, gradient_buckets, sync_summary

SHAPES = [(4, 3), (2,), (3, 4, 1, 1), (300,), (5, 6), (7,)]
"""Hand-made LoRA-like parameters; at 1 KiB buckets the 300-element one (1.2 KB) goes alone."""
HALF = (8, 2)
"""One fp16 parameter: its own bucket (one collective reduces one dtype)."""
NONE_ON_RANK1 = 1
NONE_EVERYWHERE = 4
SMALL_BUCKET = 1024


def _params() -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    params.append(torch.nn.Parameter(torch.zeros(HALF, dtype=torch.float16)))
    return params


def _hand_made_gradients(rank: int) -> list[torch.Tensor | None]:
    """Rank `rank`'s gradients: random (seeded by rank), with one missing on rank 1 and one missing everywhere."""
    generator = torch.Generator().manual_seed(100 + rank)
    grads: list[torch.Tensor | None] = [
        torch.randn(param.shape, generator=generator).to(param.dtype) for param in _params()
    ]
    grads[NONE_EVERYWHERE] = None
    if rank == 1:
        grads[NONE_ON_RANK1] = None
    return grads


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join_group(rank: int, port: int) -> None:
    """The environment torchrun gives a process of two, on the CPU."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    torch.set_num_threads(1)


def _run_two(worker, args: tuple, timeout: float) -> None:
    """`worker(rank, *args)` in two spawned processes; a pair still running after `timeout` seconds (a hang) is
    killed and fails the test."""
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"two processes did not finish within {timeout:.0f} s (a collective hang?)")


class _CountingReduce:
    """accelerate's Accelerator as `average_gradients` sees it, counting the collectives."""

    def __init__(self, accelerator) -> None:
        self.accelerator, self.num_processes, self.calls = accelerator, accelerator.num_processes, 0

    def reduce(self, tensor, reduction):
        self.calls += 1
        return self.accelerator.reduce(tensor, reduction=reduction)


def _sync_worker(rank: int, port: int, out: Path) -> None:
    _join_group(rank, port)
    from accelerate import Accelerator

    accelerator = _CountingReduce(Accelerator(cpu=True))
    params = _params()
    for param, grad in zip(params, _hand_made_gradients(rank)):
        param.grad = grad
    issued = average_gradients(params, accelerator, bucket_bytes=SMALL_BUCKET)
    torch.save(
        {"grads": [param.grad for param in params], "issued": issued, "calls": accelerator.calls}, out / f"{rank}"
    )


@pytest.mark.slow
def test_two_processes_get_the_per_tensor_mean_in_bucketed_collectives(tmp_path):
    _run_two(_sync_worker, (_free_port(), tmp_path), timeout=120)
    ranks = [torch.load(tmp_path / str(rank)) for rank in (0, 1)]
    buckets = gradient_buckets(_params(), SMALL_BUCKET)
    assert buckets == [[0, 1, 2], [3], [4, 5], [6]]  # in order, by dtype, 1 KiB each (the 300-element tensor alone)
    assert [rank["issued"] for rank in ranks] == [4, 4] and [rank["calls"] for rank in ranks] == [4, 4]
    mine, theirs = _hand_made_gradients(0), _hand_made_gradients(1)
    for index, (a, b) in enumerate(zip(mine, theirs)):
        got0, got1 = ranks[0]["grads"][index], ranks[1]["grads"][index]
        if index == NONE_EVERYWHERE:  # no process had one: the optimizer skips it, as with one process
            assert got0 is None and got1 is None
            continue
        want = (a.float() + (b.float() if b is not None else 0.0)) / 2  # a missing gradient counts as zeros
        assert torch.equal(got0, got1)
        assert got0.dtype == a.dtype and got0.shape == a.shape
        tolerance = 1e-3 if a.dtype == torch.float16 else 1e-6
        torch.testing.assert_close(got0.float(), want, rtol=tolerance, atol=tolerance)


def test_one_process_issues_nothing_and_changes_nothing():
    class One:
        num_processes = 1

        def reduce(self, tensor, reduction):
            raise AssertionError("no collective with one process")

    params = _params()
    for param, grad in zip(params, _hand_made_gradients(1)):
        param.grad = None if grad is None else grad.clone()
    assert average_gradients(params, One()) == 0
    assert [p.grad is None for p in params] == [g is None for g in _hand_made_gradients(1)]


def test_buckets_follow_the_parameter_order_and_skip_frozen_parameters():
    params = _params()
    params[2].requires_grad_(False)
    assert gradient_buckets(params, SMALL_BUCKET) == [[0, 1], [3], [4, 5], [6]]
    assert gradient_buckets(params) == [[0, 1, 3, 4, 5], [6]]
    summary = sync_summary(params, num_processes=2)
    assert summary == {
        "tensors": 6,
        "bytes": 4 * (12 + 2 + 300 + 30 + 7) + 2 * 16,
        "bucket_bytes": BUCKET_BYTES,
        "collectives_per_step": 2,
    }
    assert sync_summary(params, num_processes=1)["collectives_per_step"] == 0


@pytest.mark.slow
def test_full_size_sdxl_unet_lora_dim8_needs_four_collectives_instead_of_1444():
    """The full SDXL UNet built on the meta device from the shipped config (no weights), its LoRA at dim 8."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    import networks.lora as lora

    config = UNet2DConditionModel.load_config(Path(__file__).parents[1] / "configs" / "sdxl", subfolder="unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
        network = lora.create_network(1.0, 8, 8, None, [], unet)
    params = network.get_trainable_params()
    summary = sync_summary(params, num_processes=2)
    assert len(network.unet_loras) == 722 and summary["tensors"] == 722 * 2  # before: one collective per tensor
    assert summary["bytes"] == 4 * 21_278_720  # fp32: 81.2 MiB
    assert summary["collectives_per_step"] == 4  # after: 81.2 MiB in buckets of at most 25 MiB


# ---- a training run -----------------------------------------------------------------------------------------------


def _train_worker(rank: int, port: int, argv: list[str], out: Path) -> None:
    """Train with `argv`, keeping what the parent checks: this process's final LoRA weights, at every step which
    parameters had no gradient before the sync and the first sample's noise, and when the GPU peak was reset."""
    _join_group(rank, port)
    import library.train.loop as loop
    import library.train.step as step
    import library.train.trainer as trainer
    from library.config.build import config_from_args
    from library.config.cli import build_parser

    missing: list[list[int]] = []
    noise: list[torch.Tensor] = []
    resets: list[tuple[str, int]] = []
    sync, finish, draw = step.average_gradients, trainer.finish, step.noise_batch

    def recording_sync(params, accelerator):
        missing.append([index for index, param in enumerate(params) if param.grad is None])
        return sync(params, accelerator)

    def recording_draw(*args, **kwargs):
        noised = draw(*args, **kwargs)
        noise.append(noised.noise[0].clone())
        return noised

    def keeping_finish(cfg, parts, state, phase):
        weights = {name: value.detach().clone() for name, value in parts.network.state_dict().items()}
        kept = {"weights": weights, "missing": missing, "noise": noise, "resets": resets, "losses": list(state.losses)}
        torch.save(kept, out / f"rank{rank}.pt")
        return finish(cfg, parts, state, phase)

    step.average_gradients, step.noise_batch, trainer.finish = recording_sync, recording_draw, keeping_finish
    loop.reset_cuda_peak = lambda device: resets.append((device.type, len(missing)))
    trainer.train(config_from_args(build_parser().parse_args(argv)))


@pytest.mark.slow
def test_module_dropout_with_uneven_batches_neither_hangs_nor_drifts(tiny_sdxl, tmp_path):
    from tests.cli_args import tiny_train_argv
    from tools.make_demo_dataset import make_demo_dataset

    # 3 images at batch 2: each epoch one batch of 2 and one of 1, so the two processes draw different numbers of
    # timesteps and their module_dropout draws drift apart (they are seeded apart from the start too).
    make_demo_dataset(tmp_path / "data", count=3, min_side=64, max_side=64, repeats=1, name="toy", seed=0)
    argv = tiny_train_argv(
        tiny_sdxl.single_file,
        tmp_path / "data",
        tmp_path / "out",
        "--cache_latents",
        "--network_train_unet_only",
        "--network_dim",
        "2",
        "--network_args",
        "module_dropout=0.5",
        "--optimizer_type",
        "AdamW",
        "--learning_rate",
        "1e-2",
        "--max_train_steps",
        "4",
    )
    _run_two(_train_worker, (_free_port(), argv, tmp_path), timeout=240)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert len(ranks[0]["missing"]) == len(ranks[1]["missing"]) == 4
    assert ranks[0]["missing"] != ranks[1]["missing"]  # the processes skipped different modules
    assert not torch.equal(ranks[0]["noise"][0], ranks[1]["noise"][0])  # each process draws its own noise
    assert ranks[0]["resets"] == ranks[1]["resets"] == [("cpu", 0)]  # the GPU peak restarts before the first step
    assert any(ranks[0]["missing"]) and any(ranks[1]["missing"])
    want, got = ranks[0]["weights"], ranks[1]["weights"]
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert any(want[k].abs().sum() > 0 for k in want if k.endswith("lora_up.weight"))  # it trained (B starts at 0)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the loss is the mean over processes
    report = json.loads((tmp_path / "out" / "last_report.json").read_text())
    assert report["processes"] == 2 and report["gradient_sync"]["collectives_per_step"] == 1  # a tiny LoRA: 1 bucket
    assert report["gradient_sync"]["tensors"] == len(want) - len([k for k in want if k.endswith(".alpha")])
    assert "averaged over processes in 1 collective per step" in cost_table(report)
