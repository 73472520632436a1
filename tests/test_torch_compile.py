"""--torch_compile / --dynamo_backend: the UNet compiled after the LoRA and fp8 are in place, the same files and
(nearly) the same losses as an uncompiled run, and one warning line wherever compiling is not possible."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from torch import nn

import train_network
from library.model import compiled as compiled_module
from library.model.compiled import CompiledModel, CompileState, compile_problem
from networks.lora_module import LoRAModule
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset

STEPS = 3


def test_backends_that_cannot_run_here_are_named_before_training(monkeypatch):
    assert compile_problem("no", "cpu") == "--dynamo_backend no compiles nothing"
    assert compile_problem("tensort", "cpu").startswith("dynamo backend 'tensort' is not available in torch")
    assert "inductor" in compile_problem("tensort", "cpu")  # what is available is listed
    assert compile_problem("cudagraphs", "cpu") == "the cudagraphs backend needs a CUDA GPU"
    assert compile_problem("aot_eager", "cpu") is None
    monkeypatch.setattr(compiled_module.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "no compiler was found" in compile_problem("inductor", "cpu")
    assert compile_problem("inductor", "cuda") is None  # CUDA kernels come from Triton, not a C++ compiler


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler here\nsecond line")


def test_a_compiled_call_that_fails_runs_eager_from_the_same_rng(monkeypatch):
    """The failed call's output is exactly the eager one (dropout draws the same numbers), the warning comes once,
    and later calls run eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    lines: list[str] = []
    state = CompileState("failing", lines.append)
    wrapped = CompiledModel(model, _failing_backend, state)
    x = torch.randn(4, 8)
    torch.manual_seed(1)
    out = wrapped(x)
    torch.manual_seed(1)
    assert torch.equal(out, model(x))
    wrapped(x)
    assert lines == [
        "--torch_compile: compiling failed (RuntimeError: no C++ compiler here); training uncompiled (eager)"
    ]
    assert state.summary() == {"requested": "failing", "ran": "eager", "reason": state.reason}
    assert list(wrapped.state_dict()) == list(model.state_dict())  # the model's own attributes, names unchanged


def test_module_dropout_compiles_with_the_eager_semantics():
    """LoRA module dropout draws per call (a graph break under dynamo): compiled, the adapter is skipped exactly
    when the eager one is, so outputs and the gradients' presence match call for call."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = nn.Linear(6, 6).requires_grad_(False)
    lora = LoRAModule("lora_test", base, lora_dim=2, alpha=1.0, module_dropout=0.5)
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    lora.train()
    compiled = torch.compile(base, backend="eager")
    x = torch.randn(3, 6)
    for seed in range(6):
        torch.manual_seed(seed)
        eager = base(x)
        torch.manual_seed(seed)
        assert torch.equal(compiled(x), eager), seed


# --- Tiny runs: uncompiled, compiled (aot_eager: dynamo + AOT autograd, no C++ build), an unusable backend --------
RUN_FLAGS = (
    "--network_dim",
    "4",
    "--network_train_unet_only",
    "--cache_latents",
    "--cache_text_encoder_outputs",
    "--fp8_base",
    "--gradient_checkpointing",
    "--max_train_steps",
    str(STEPS),
    "--learning_rate",
    "1e-3",
)


@pytest.fixture(scope="module")
def compile_runs(tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    data = root / "data"
    make_demo_dataset(data, count=4, min_side=64, max_side=64, repeats=1, name="toy", seed=0)
    runs = {}
    for name, extra in (
        ("eager", ()),
        ("aot_eager", ("--torch_compile", "--dynamo_backend", "aot_eager")),
    ):
        torch._dynamo.reset()
        out = root / name
        assert train_network.main(tiny_train_argv(tiny_sdxl.single_file, data, out, *RUN_FLAGS, *extra)) == 0
        report = json.loads(next(out.glob("*_report.json")).read_text())
        with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
            keys = sorted(f.keys())
        runs[name] = (report, keys)
    runs["backward_fails"] = _run_with_failing_backward(tiny_sdxl, data, root / "backward_fails")
    return runs


def _run_with_failing_backward(tiny_sdxl, data, out):
    """In-process, with a backend whose backward fails to compile (as inductor's, compiled at first use, can)."""
    from torch._dynamo.backends.common import aot_autograd

    from library.config.build import config_from_args
    from library.config.cli import build_parser
    from library.model.compiled import CompileConfig
    from library.train.trainer import train

    def failing(gm, example_inputs):
        raise RuntimeError("backward lowering failed")

    torch._dynamo.reset()
    torch._dynamo.register_backend(aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=failing), "bw_fails_test")
    argv = tiny_train_argv(tiny_sdxl.single_file, data, out, *RUN_FLAGS)
    cfg = config_from_args(build_parser().parse_args(argv))
    return train(replace(cfg, compile=CompileConfig("bw_fails_test"))).report, []


@pytest.mark.slow
def test_a_compiled_run_saves_the_same_keys_and_nearly_the_same_losses(compile_runs):
    (eager, eager_keys), (compiled, compiled_keys) = compile_runs["eager"], compile_runs["aot_eager"]
    assert compiled_keys == eager_keys and not any("_orig_mod" in key for key in compiled_keys)
    assert eager["torch_compile"] is None
    assert compiled["torch_compile"]["requested"] == compiled["torch_compile"]["ran"] == "aot_eager"
    assert compiled["torch_compile"]["reason"] is None and compiled["torch_compile"]["first_step_s"] > 0
    losses, reference = compiled["history"]["loss"], eager["history"]["loss"]
    assert len(losses) == len(reference) == STEPS
    assert losses == pytest.approx(reference, rel=1e-4)


@pytest.mark.slow
def test_a_backward_that_fails_to_compile_restarts_the_step_uncompiled(compile_runs):
    """The first step's backward fails: that step runs again eager from its starting RNG state, and so does the rest
    of the run, so every loss is the uncompiled run's, exactly."""
    report, eager = compile_runs["backward_fails"][0], compile_runs["eager"][0]
    assert report["torch_compile"]["ran"] == "eager"
    assert report["torch_compile"]["reason"] == "the compiled step failed (RuntimeError: backward lowering failed)"
    assert report["history"]["loss"] == eager["history"]["loss"]


def test_an_unusable_backend_trains_uncompiled_after_one_line(tiny_sdxl, tmp_path, capsys):
    data = tmp_path / "data"
    make_demo_dataset(data, count=2, min_side=64, max_side=64, repeats=1, name="toy", seed=0)
    argv = tiny_train_argv(
        tiny_sdxl.single_file,
        data,
        tmp_path / "out",
        "--network_dim",
        "2",
        "--max_train_steps",
        "1",
        "--cache_latents",
        "--torch_compile",
        "--dynamo_backend",
        "tensort",
    )
    assert train_network.main(argv) == 0
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "--torch_compile" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: --torch_compile: dynamo backend 'tensort' is not available in torch")
    assert lines[0].endswith("; training uncompiled (eager)")
    report = json.loads(next((tmp_path / "out").glob("*_report.json")).read_text())
    assert report["torch_compile"]["ran"] == "eager" and "tensort" in report["torch_compile"]["reason"]
