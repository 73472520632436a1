"""--xformers with an xformers that is installed but cannot run (a build for another torch or CUDA, a GPU it has
no kernels for) falls back to PyTorch SDPA with one warning instead of stopping the run."""

from __future__ import annotations

import copy
import logging
import sys

import pytest

from library.model.base_models import set_attention
from library.model.precision import PrecisionRequest, plan_precision, xformers_problem

BROKEN_OPS = 'raise OSError("libcudart.so.11.0: cannot open shared object file: No such file or directory")\n'
WORKING_OPS = "def memory_efficient_attention(q, k, v, attn_bias=None, op=None):\n    return q\n"


@pytest.fixture
def planted_xformers(tmp_path, monkeypatch):
    """Plant an `xformers` package whose `ops` module has the given source; forgotten again afterwards."""

    def plant(ops_source: str) -> None:
        package = tmp_path / "xformers"
        package.mkdir(exist_ok=True)
        (package / "__init__.py").write_text("", encoding="utf-8")
        (package / "ops.py").write_text(ops_source, encoding="utf-8")
        monkeypatch.syspath_prepend(str(tmp_path))

    for name in [n for n in sys.modules if n == "xformers" or n.startswith("xformers.")]:
        monkeypatch.delitem(sys.modules, name)
    yield plant
    for name in [n for n in sys.modules if n == "xformers" or n.startswith("xformers.")]:
        del sys.modules[name]


def test_an_xformers_that_fails_to_import_is_not_planned(planted_xformers):
    planted_xformers(BROKEN_OPS)
    assert xformers_problem("cuda") == (
        "importing it failed: OSError: libcudart.so.11.0: cannot open shared object file: No such file or directory"
    )
    plan = plan_precision(PrecisionRequest(xformers=True), "cuda")
    assert plan.attention == "sdpa"
    assert plan.notes == (
        "--xformers: xformers cannot run on this machine (importing it failed: OSError: "
        "libcudart.so.11.0: cannot open shared object file: No such file or directory); using "
        "PyTorch SDPA attention instead",
    )


def test_an_xformers_that_imports_is_planned_on_cuda_only(planted_xformers):
    planted_xformers(WORKING_OPS)
    assert plan_precision(PrecisionRequest(xformers=True), "cuda").attention == "xformers"
    cpu = plan_precision(PrecisionRequest(xformers=True), "cpu")
    assert cpu.attention == "sdpa" and "(it needs a CUDA GPU)" in cpu.notes[0]


def test_enabling_xformers_that_raises_falls_back_to_sdpa(tiny_models, monkeypatch, caplog):
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = copy.deepcopy(tiny_models.unet)

    def no_kernels():
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore detail")

    monkeypatch.setattr(unet, "enable_xformers_memory_efficient_attention", no_kernels)
    with caplog.at_level(logging.WARNING, logger="library.model.base_models"):
        assert set_attention(unet, "xformers") == "sdpa"
    assert [r.getMessage() for r in caplog.records] == [
        "--xformers: xformers cannot run on this machine (RuntimeError: CUDA error: no kernel image is available for "
        "execution on the device); using PyTorch SDPA attention instead"
    ]
    processors = unet.attn_processors.values()
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)
    assert set_attention(unet, "sliced") == "sliced" and set_attention(unet, "sdpa") == "sdpa"
