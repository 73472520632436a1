"""What a process of a multi-process run takes from accelerate and what it reports: the device its precision is planned
for (accelerate's, not whether CUDA exists), its own noise seed, and the training loop's GPU memory peaks."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

from library.model.precision import PrecisionConfig, PrecisionRequest
from library.report.run_page import cost_table
from library.train.loss import LossOptions
from library.train.run_report import build_report, memory_warnings, peak_memory, reset_cuda_peak
from library.train.setup_parts import seed_noise_per_process
from library.train.trainer import make_accelerator

# ---- the device the precision is planned for ------------------------------------------------------------------------


@pytest.fixture
def fresh_process_state():
    """accelerate's process-wide state made anew for the test, and again after it (so later tests see this machine)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _cfg(mixed_precision: str) -> SimpleNamespace:
    """The slices `make_accelerator` reads."""
    return SimpleNamespace(
        precision=PrecisionConfig(PrecisionRequest(mixed_precision=mixed_precision), gradient_checkpointing=False),
        output=SimpleNamespace(logging_dir=None, log_with=(), log_prefix=None),
        loss=LossOptions(),
    )


def test_accelerate_cpu_on_a_gpu_machine_plans_for_the_cpu(fresh_process_state, monkeypatch, capsys):
    """`accelerate launch --cpu` sets ACCELERATE_USE_CPU: with CUDA present the run is on the CPU and its plan must
    be the CPU's (fp16 is stored, fp32 computes), not CUDA's fp16 autocast."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    accelerator, plan = make_accelerator(_cfg("fp16"))
    assert accelerator.device.type == "cpu"
    assert plan.mixed_precision == "no" and plan.compute_dtype == torch.float32
    assert plan.storage_dtypes()["unet"] == torch.float16
    assert "needs a CUDA GPU" in capsys.readouterr().out


# ---- each process its own noise ------------------------------------------------------------------------------------


def _draws() -> tuple[float, float, torch.Tensor, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.randn(4), torch.randint(0, 1000, (4,))


def test_each_process_draws_its_own_noise_and_process_0_what_one_process_drew():
    from accelerate.utils import set_seed

    set_seed(7)
    alone = _draws()
    set_seed(7)
    seed_noise_per_process(7, process_index=0)
    first = _draws()
    set_seed(7)
    seed_noise_per_process(7, process_index=1)
    second = _draws()
    assert first[:2] == alone[:2] and torch.equal(first[2], alone[2]) and torch.equal(first[3], alone[3])
    assert second[:2] != first[:2] and not torch.equal(second[2], first[2])
    assert not torch.equal(second[3], first[3])


# ---- the GPU memory peaks ------------------------------------------------------------------------------------------


class _FakeCuda:
    """torch.cuda's memory statistics for a GPU of 80 GiB that this CPU machine does not have."""

    def __init__(self) -> None:
        self.allocated, self.reserved, self.resets = 30 * 2**30, 40 * 2**30, []

    def reset_peak_memory_stats(self, device) -> None:
        self.resets.append(device)
        self.allocated, self.reserved = 6 * 2**30, 8 * 2**30

    def max_memory_allocated(self, device) -> int:
        return self.allocated

    def max_memory_reserved(self, device) -> int:
        return self.reserved

    def get_device_properties(self, device):
        return SimpleNamespace(total_memory=80 * 2**30)


@pytest.fixture
def fake_cuda(monkeypatch) -> _FakeCuda:
    fake = _FakeCuda()
    for name in ("reset_peak_memory_stats", "max_memory_allocated", "max_memory_reserved", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


def test_the_report_gives_the_loops_allocated_and_reserved_peaks_and_the_gpus_total(fake_cuda):
    gpu = torch.device("cuda", 0)
    reset_cuda_peak(gpu)  # the loop starts: loading's 30 GiB is forgotten
    assert fake_cuda.resets == [gpu]
    peak = peak_memory(gpu)
    assert (peak.cuda_bytes, peak.cuda_reserved_bytes, peak.cuda_total_bytes) == (6 * 2**30, 8 * 2**30, 80 * 2**30)
    memory = build_report(SimpleNamespace(median=lambda: None, durations=[]), 1, peak, {}, {})["peak_memory"]
    assert memory["cuda_allocated_bytes"] == 6 * 2**30 and memory["cuda_reserved_bytes"] == 8 * 2**30
    assert memory["cuda_total_bytes"] == 80 * 2**30 and "training loop" in memory["cuda_since"]
    page = cost_table({"peak_memory": memory})
    assert "6.00 GiB of 80.0 GiB" in page and "peak GPU memory (reserved)" in page and "8.00 GiB of 80.0 GiB" in page


def test_the_gpu_warning_weighs_what_the_allocator_reserved(fake_cuda):
    gpu = torch.device("cuda", 0)
    fake_cuda.allocated, fake_cuda.reserved = 60 * 2**30, 75 * 2**30  # tensors 75%, reserved 94% of 80 GiB
    (warning,) = [w for w in memory_warnings(peak_memory(gpu)) if "GPU" in w]
    assert "peak GPU memory 75.00 GiB is 94% of the 80.00 GiB" in warning


def test_the_cpu_touches_no_gpu_statistics(fake_cuda):
    reset_cuda_peak(torch.device("cpu"))
    peak = peak_memory(torch.device("cpu"))
    assert fake_cuda.resets == [] and peak.cuda_bytes is None and peak.cuda_reserved_bytes is None
