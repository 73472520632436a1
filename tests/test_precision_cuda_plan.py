"""The CUDA branch of the precision plan, run on this CPU-only machine.

First what `plan_precision(request, "cuda")` chooses for each flag combination (weight storage, autocast dtype, LoRA
dtype, VAE dtype, and whether accelerate adds a GradScaler, which it does for fp16 mixed precision on a GPU). Then
the whole trainer under the fp16 plans: `train(cfg)` with `make_accelerator` replaced by `cuda_plan_on_cpu`, which
makes the plan for "cuda" and an Accelerator on the CPU whose fp16 machinery (autocast, GradScaler) is switched on
as accelerate switches it on for a CUDA device. Nothing in the library changes: a real CPU run keeps its own plan.
Everything else - loading in the planned dtypes, fp8 up-casts, caching, the LoRA in its dtype, the step with
accelerate's autocast, scaled backward, unscale and clip, `allow_fp16_gradients`, the NaN guard's GradScaler branch,
saving - is the code a GPU run executes, with torch's CPU autocast in place of CUDA's. bf16 needs no emulation: its
CUDA plan is its CPU plan (checked below) and accelerate autocasts bf16 on a CPU, so tests/test_precision_training.py's
bf16 and full_bf16 runs are that branch already.

Same seed, data, noise and timesteps in every mode, and the seed command's optimizer (Lion: with AdamW, --full_fp16
turns step 2 into NaN, fp16 Adam state underflowing its eps), so each mode's losses track the fp32 run's. Tolerances,
about 3x the deviation measured here over 3 steps (fp16 1.2e-4, full fp16 1.2e-4, fp8 under fp16 6.3e-3): 0.05% fp16,
2% with fp8 weights.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from library.config.build import config_from_args
from library.config.cli import build_parser
from library.model.fp8 import FP8_DTYPE
from library.model.precision import PrecisionPlan, PrecisionRequest, plan_precision
from library.train import trainer
from library.train.accelerate_compat import reset_accelerator_state
from library.train.run_config import TrainConfig
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# --- The plan for a CUDA device --------------------------------------------------------------------------------------
# request -> (mixed_precision, base weights (norms, biases, embeddings) = autocast dtype, UNet Linear/Conv storage,
#             text-encoder Linear/Conv storage, VAE, LoRA, GradScaler)
CUDA_PLANS = {
    "fp32": (PrecisionRequest(), ("no", F32, F32, F32, F32, F32, False)),
    "fp16": (PrecisionRequest(mixed_precision="fp16"), ("fp16", F16, F16, F16, F32, F32, True)),
    "bf16": (PrecisionRequest(mixed_precision="bf16"), ("bf16", BF16, BF16, BF16, BF16, F32, False)),
    "bf16 no_half_vae": (
        PrecisionRequest(mixed_precision="bf16", no_half_vae=True),
        ("bf16", BF16, BF16, BF16, F32, F32, False),
    ),
    "fp32 fp8": (PrecisionRequest(fp8_base=True), ("no", F32, FP8_DTYPE, FP8_DTYPE, F32, F32, False)),
    "fp16 fp8 (the seed)": (
        PrecisionRequest(mixed_precision="fp16", fp8_base=True, xformers=True),
        ("fp16", F16, FP8_DTYPE, FP8_DTYPE, F32, F32, True),
    ),
    "bf16 fp8": (
        PrecisionRequest(mixed_precision="bf16", fp8_base=True),
        ("bf16", BF16, FP8_DTYPE, FP8_DTYPE, BF16, F32, False),
    ),
    "fp16 fp8_base_unet": (
        PrecisionRequest(mixed_precision="fp16", fp8_base_unet=True),
        ("fp16", F16, FP8_DTYPE, F16, F32, F32, True),
    ),
    "full_fp16": (
        PrecisionRequest(mixed_precision="fp16", full_fp16=True),
        ("fp16", F16, F16, F16, F32, F16, True),
    ),
    "full_fp16 fp8": (
        PrecisionRequest(mixed_precision="fp16", full_fp16=True, fp8_base=True),
        ("fp16", F16, FP8_DTYPE, FP8_DTYPE, F32, F16, True),
    ),
    "full_bf16": (
        PrecisionRequest(mixed_precision="bf16", full_bf16=True),
        ("bf16", BF16, BF16, BF16, BF16, BF16, False),
    ),
}


def stored(plan: PrecisionPlan, component: str) -> torch.dtype:
    """The dtype a component's Linear/Conv2d weights are stored in under `plan`."""
    return plan.storage_dtypes().get(component, plan.weight_dtype)


def gets_grad_scaler(plan: PrecisionPlan) -> bool:
    """accelerate adds a GradScaler for fp16 mixed precision on a GPU (and for nothing else here)."""
    return plan.mixed_precision == "fp16"


@pytest.mark.parametrize("name", sorted(CUDA_PLANS))
def test_the_plan_for_a_cuda_device(name):
    request, (mixed, weights, unet, te, vae, lora, scaler) = CUDA_PLANS[name]
    plan = plan_precision(request, "cuda")
    assert (plan.mixed_precision, plan.weight_dtype, plan.compute_dtype) == (mixed, weights, weights)
    assert (stored(plan, "unet"), stored(plan, "text_encoder1"), stored(plan, "text_encoder2")) == (unet, te, te)
    assert (plan.vae_dtype, plan.lora_dtype, gets_grad_scaler(plan)) == (vae, lora, scaler)
    # What the report and the start-up line say is what was planned.
    summary = plan.summary()
    assert (summary["compute"], summary["unet_weights"], summary["lora"]) == tuple(
        str(dtype).removeprefix("torch.") for dtype in (weights, unet, lora)
    )
    # No fallback on a GPU, except --xformers where xformers is not installed (as on this machine).
    assert all("xformers" in note for note in plan.notes)


@pytest.mark.parametrize("name", sorted(CUDA_PLANS))
def test_a_cpu_plans_differently_only_for_fp16(name):
    """The CPU's plan is the GPU's except that fp16 computes in fp32 there (fp16 storage kept): the CUDA branch
    is only exercised by asking for "cuda", which is why the trainer tests below do."""
    request = CUDA_PLANS[name][0]
    cuda, cpu = plan_precision(request, "cuda"), plan_precision(request, "cpu")
    if request.mixed_precision != "fp16":
        assert (cpu.summary(), cpu.storage_dtypes(), cpu.vae_dtype) == (
            cuda.summary(),
            cuda.storage_dtypes(),
            cuda.vae_dtype,
        )
        return
    assert (cpu.mixed_precision, cpu.compute_dtype, cpu.weight_dtype) == ("no", F32, F32)
    assert (cuda.mixed_precision, cuda.compute_dtype) == ("fp16", F16)
    assert cpu.storage_dtypes() == {
        component: stored(cuda, component) for component in ("unet", "text_encoder1", "text_encoder2")
    }
    assert cpu.lora_dtype == cuda.lora_dtype


# --- Training under the CUDA plan on the CPU ------------------------------------------------------------------------
def cuda_plan_on_cpu(cfg: TrainConfig) -> tuple[Accelerator, PrecisionPlan]:
    """`trainer.make_accelerator` as on a CUDA GPU, on the CPU: the plan made for "cuda", and accelerate with the
    two settings its `device.type != "cpu"` check withholds from a CPU under fp16 - `native_amp` (its autocast
    then runs `torch.autocast(device.type, float16)`) and the GradScaler (scaled backward, unscale in
    `clip_grad_norm_`, the skip-on-inf step of its optimizer wrapper). bf16 needs neither: accelerate autocasts
    bf16 on a CPU by itself."""
    plan = plan_precision(cfg.precision.request, "cuda")
    reset_accelerator_state()
    accelerator = Accelerator(mixed_precision=plan.mixed_precision)
    assert accelerator.device.type == "cpu"
    if plan.mixed_precision == "fp16":
        assert not accelerator.native_amp and accelerator.scaler is None  # what the emulation supplies
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    accelerator.print(plan.describe("cpu (CUDA plan)", accelerator.num_processes))
    return accelerator, plan


STEPS = 2
MODES = {
    "fp16": ["--mixed_precision", "fp16"],
    "fp16_fp8": ["--mixed_precision", "fp16", "--fp8_base"],
    "full_fp16": ["--mixed_precision", "fp16", "--full_fp16"],
    "fp32": [],  # the reference, last: the CPU's own plan, after the emulated runs
}
TOLERANCE = {"fp16": 0.0005, "fp16_fp8": 0.02, "full_fp16": 0.0005}
TRAINS_TEXT_ENCODERS = {"fp16"}
"""The seed command trains the text encoders too: one mode does, under fp16 autocast with fp16 weights; the others
train the UNet on cached text-encoder outputs (cached under the plan: fp8 text encoders in `fp16_fp8`)."""


@pytest.fixture(scope="module")
def cuda_plan_runs(tiny_sdxl, tmp_path_factory):
    """mode -> (TrainResult, what the run was made of (its RunParts), the LoRA weights before training, what the
    UNet's forward saw: (autocast on, autocast dtype, output dtype))."""
    data = tmp_path_factory.mktemp("cuda_plan_data")
    make_demo_dataset(data, count=2, min_side=64, max_side=64, repeats=1, name="toy", seed=0)
    runs = {}
    for mode, flags in MODES.items():
        captured: dict = {"forward": []}
        set_up = trainer.set_up

        def capturing_set_up(*args, captured=captured, set_up=set_up, **kwargs):
            parts, state = set_up(*args, **kwargs)
            captured["parts"] = parts
            captured["before"] = {k: v.detach().clone() for k, v in parts.network.state_dict().items()}
            parts.models.unet.conv_out.register_forward_hook(
                lambda _m, _i, out: captured["forward"].append(
                    (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype)
                )
            )
            return parts, state

        extra = [] if mode in TRAINS_TEXT_ENCODERS else ["--network_train_unet_only", "--cache_text_encoder_outputs"]
        argv = tiny_train_argv(
            tiny_sdxl.single_file,
            data,
            tmp_path_factory.mktemp(f"cuda_plan_{mode}"),
            "--train_batch_size",
            "1",
            "--max_train_steps",
            str(STEPS),
            "--optimizer_type",
            "Lion",
            "--learning_rate",
            "1e-4",
            "--cache_latents",
            "--network_dim",
            "4",
            "--output_name",
            mode,
            *extra,
            *flags,
        )
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(trainer, "set_up", capturing_set_up)
            if mode != "fp32":
                patch.setattr(trainer, "make_accelerator", cuda_plan_on_cpu)
            result = trainer.train(config_from_args(build_parser().parse_args(argv)))
        runs[mode] = (result, captured["parts"], captured["before"], captured["forward"])
    return runs


CUDA_MODES = sorted(TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("mode", CUDA_MODES)
def test_steps_under_the_cuda_plan_are_finite_and_track_fp32(cuda_plan_runs, mode):
    reference = cuda_plan_runs["fp32"][0].losses
    losses = cuda_plan_runs[mode][0].losses
    assert len(losses) == len(reference) == STEPS
    for step, (got, want) in enumerate(zip(losses, reference)):
        assert torch.isfinite(torch.tensor(got)), f"step {step}: {got}"
        assert got == pytest.approx(want, rel=TOLERANCE[mode]), f"step {step}: {got} vs fp32 {want}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", CUDA_MODES)
def test_the_unet_ran_under_autocast_in_the_planned_dtype(cuda_plan_runs, mode):
    _, parts, _, forward = cuda_plan_runs[mode]
    compute = parts.plan.compute_dtype
    assert compute == F16
    # Every training forward (caching runs none) autocast in the compute dtype; the prediction came out in it.
    assert len(forward) == STEPS and set(forward) == {(True, compute, compute)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", CUDA_MODES)
def test_weights_are_stored_as_planned(cuda_plan_runs, mode):
    result, parts, _, _ = cuda_plan_runs[mode]
    plan, models = parts.plan, parts.models
    assert plan == plan_precision(PrecisionRequest(**CUDA_REQUESTS[mode]), "cuda")
    components = [("unet", models.unet)]
    if mode in TRAINS_TEXT_ENCODERS:  # else released once their outputs were cached
        components += [("text_encoder1", models.text_encoder1), ("text_encoder2", models.text_encoder2)]
    for component, model in components:
        layers = [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]
        assert layers and {m.weight.dtype for m in layers} == {stored(plan, component)}, component
        assert {m.bias.dtype for m in layers if m.bias is not None} == {plan.weight_dtype}, component
        norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]
        assert norms and {m.weight.dtype for m in norms} == {plan.weight_dtype}, component
    assert {p.dtype for p in parts.network.parameters()} == {plan.lora_dtype}
    assert result.report["precision"] == plan.summary()


CUDA_REQUESTS = {
    "fp16": {"mixed_precision": "fp16"},
    "fp16_fp8": {"mixed_precision": "fp16", "fp8_base": True},
    "full_fp16": {"mixed_precision": "fp16", "full_fp16": True},
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", CUDA_MODES)
def test_fp16_runs_under_a_grad_scaler_that_skipped_no_step(cuda_plan_runs, mode):
    _, parts, _, _ = cuda_plan_runs[mode]
    scaler = parts.accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    # The loss was scaled (backward ran through the scaler: it is initialised) and no step found inf gradients:
    # a skipped step would have halved the scale.
    assert scaler.get_scale() == 2.0**16
    assert parts.optimizer.step_was_skipped is False


@pytest.mark.slow
@pytest.mark.parametrize("mode", CUDA_MODES)
def test_the_lora_weights_trained_and_were_saved_finite(cuda_plan_runs, mode):
    result, parts, before, _ = cuda_plan_runs[mode]
    after = parts.network.state_dict()
    changed = {k: not torch.equal(before[k], after[k]) for k in before if k.startswith("lora_unet")}
    ups = [k for k in changed if "lora_up" in k]
    downs = [k for k in changed if "lora_down" in k]
    assert ups and len(ups) == len(downs)
    assert all(changed[k] for k in ups)  # B starts at zero: any applied step moves it
    moved_downs = sum(changed[k] for k in downs)
    if parts.plan.lora_dtype == F32:
        assert moved_downs == len(downs)
    else:  # --full_fp16: Lion's 1e-4 steps fall below fp16's spacing for A's larger weights: some never move
        assert moved_downs > len(downs) // 2
    if mode in TRAINS_TEXT_ENCODERS:
        te = [k for k in before if "lora_up" in k and k.startswith("lora_te")]
        assert sum(not torch.equal(before[k], after[k]) for k in te) > len(te) // 2
    saved = load_file(str(result.final_path))
    assert saved and all(torch.isfinite(t.float()).all() for t in saved.values())
    assert any(t.abs().amax() > 0 for k, t in saved.items() if "lora_up" in k)


@pytest.mark.slow
def test_the_emulation_does_not_leak_into_a_cpu_run(cuda_plan_runs):
    """The fp32 reference ran after the emulated runs, with the trainer's own `make_accelerator`: the CPU's plan,
    no autocast, no GradScaler."""
    _, parts, _, forward = cuda_plan_runs["fp32"]
    assert parts.plan == plan_precision(PrecisionRequest(), "cpu")
    assert parts.accelerator.scaler is None and not parts.accelerator.native_amp
    assert {enabled for enabled, _, _ in forward} == {False}
    assert trainer.make_accelerator is not cuda_plan_on_cpu
