"""Each loss/noise option of sd-scripts changes the noise or the loss exactly as its formula says.

Reference numbers come from an SNR table computed here in float64 from the betas, not from the scheduler.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from library.config.build import loss_config
from library.config.cli import add_loss_arguments
from library.errors import UserInputError
from library.train.loss import (
    LossOptions,
    NoisedBatch,
    diffusion_loss,
    element_loss,
    huber_threshold,
    loss_metadata,
    make_noise_scheduler,
    noise_batch,
    pyramid_noise,
)
from tests.loss_reference import epsilon_mse_loss

B, C, H, W = 4, 4, 16, 16
TIMESTEPS = torch.tensor([0, 100, 500, 999])


def _alphas_cumprod() -> torch.Tensor:
    """SDXL's scaled_linear schedule in float64, computed independently of diffusers."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _snr(timesteps: torch.Tensor) -> torch.Tensor:
    a = _alphas_cumprod()[timesteps]
    return a / (1.0 - a)


def _tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, C, H, W, generator=g) for _ in range(3))  # latents, prediction, target


def _batch(target: torch.Tensor, timesteps: torch.Tensor = TIMESTEPS, huber_c=None) -> NoisedBatch:
    return NoisedBatch(noisy=target, target=target, timesteps=timesteps, noise=target, huber_c=huber_c)


def _per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((prediction.double() - target.double()) ** 2).mean(dim=(1, 2, 3))


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_loss_arguments(parser)
    return parser.parse_args(list(argv))


# --- Defaults: the plain epsilon MSE the trainer used before.


def test_default_options_reproduce_epsilon_mse_loss_exactly():
    scheduler = make_noise_scheduler()
    latents, prediction, _ = _tensors()
    batch = noise_batch(scheduler, latents, LossOptions(), generator=torch.Generator().manual_seed(1))
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0])
    assert torch.equal(
        diffusion_loss(prediction, batch, weights, scheduler, LossOptions()),
        epsilon_mse_loss(prediction, batch.noise, weights),
    )
    assert batch.target is batch.noise and batch.huber_c is None
    assert torch.equal(batch.noisy, scheduler.add_noise(latents, batch.noise, batch.timesteps))


def test_default_noise_is_standard_normal():
    scheduler = make_noise_scheduler()
    latents = torch.zeros(8, C, 32, 32)
    batch = noise_batch(scheduler, latents, LossOptions(), generator=torch.Generator().manual_seed(0))
    assert abs(batch.noise.mean().item()) < 0.03 and abs(batch.noise.std().item() - 1.0) < 0.03


def test_a_fixed_generator_gives_the_same_batch_twice():
    scheduler = make_noise_scheduler()
    latents, _, _ = _tensors()
    options = LossOptions(
        noise_offset=0.1,
        noise_offset_random_strength=True,
        adaptive_noise_scale=0.2,
        multires_noise_iterations=4,
        multires_noise_discount=0.5,
        ip_noise_gamma=0.1,
        ip_noise_gamma_random_strength=True,
        loss_type="huber",
        min_timestep=100,
        max_timestep=900,
    )
    first, second = (
        noise_batch(scheduler, latents, options, generator=torch.Generator().manual_seed(7)) for _ in range(2)
    )
    for name in ("noisy", "target", "timesteps", "noise", "huber_c"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    other = noise_batch(scheduler, latents, options, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(first.noise, other.noise)


def test_given_noise_and_timesteps_are_used_as_is():
    scheduler = make_noise_scheduler()
    latents, noise, _ = _tensors()
    batch = noise_batch(scheduler, latents, LossOptions(), noise=noise, timesteps=TIMESTEPS)
    assert torch.equal(batch.noise, noise) and torch.equal(batch.timesteps, TIMESTEPS)
    assert batch.timesteps.dtype == torch.long


# --- Timesteps.


def test_timesteps_stay_within_min_inclusive_max_exclusive():
    scheduler = make_noise_scheduler()
    latents = torch.zeros(512, 1, 2, 2)
    options = LossOptions(min_timestep=200, max_timestep=210)
    timesteps = noise_batch(scheduler, latents, options, generator=torch.Generator().manual_seed(0)).timesteps
    assert timesteps.min().item() == 200 and timesteps.max().item() == 209
    assert set(timesteps.tolist()) == set(range(200, 210))


# --- Noise shaping.


def test_noise_offset_adds_offset_times_normal_per_sample_and_channel():
    scheduler = make_noise_scheduler()
    latents = torch.zeros(B, C, H, W)
    zero_noise = torch.zeros(B, C, H, W)
    batch = noise_batch(
        scheduler,
        latents,
        LossOptions(noise_offset=0.1),
        noise=zero_noise,
        timesteps=TIMESTEPS,
        generator=torch.Generator().manual_seed(3),
    )
    expected = 0.1 * torch.randn(B, C, 1, 1, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(batch.noise, expected.expand(B, C, H, W))


def test_noise_offset_shifts_each_channel_mean_by_the_drawn_offset():
    scheduler = make_noise_scheduler()
    latents, _, _ = _tensors()
    plain = noise_batch(scheduler, latents, LossOptions(), generator=torch.Generator().manual_seed(5))
    offset = noise_batch(scheduler, latents, LossOptions(noise_offset=0.1), generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    torch.randn(B, C, H, W, generator=g)  # the base noise, the same draw in both batches
    shift = 0.1 * torch.randn(B, C, 1, 1, generator=g)
    delta = offset.noise - plain.noise
    assert torch.allclose(delta.mean(dim=(2, 3), keepdim=True), shift, atol=1e-6)
    assert delta.std(dim=(2, 3)).max().item() < 1e-6  # constant over H, W


def test_noise_offset_random_strength_stays_below_the_offset():
    scheduler = make_noise_scheduler()
    latents = torch.zeros(B, C, H, W)
    options = LossOptions(noise_offset=0.1, noise_offset_random_strength=True)
    batch = noise_batch(
        scheduler,
        latents,
        options,
        noise=torch.zeros_like(latents),
        timesteps=TIMESTEPS,
        generator=torch.Generator().manual_seed(3),
    )
    g = torch.Generator().manual_seed(3)
    strength = 0.1 * torch.rand(1, generator=g).item()
    z = torch.randn(B, C, 1, 1, generator=g)
    assert 0.0 <= strength < 0.1
    assert torch.allclose(batch.noise[:, :, :1, :1], strength * z)


def test_adaptive_noise_scale_adds_the_channel_mean_magnitude_to_the_offset():
    scheduler = make_noise_scheduler()
    channel_means = torch.tensor([0.5, -1.0, 2.0, 0.0])
    latents = channel_means.view(1, C, 1, 1).expand(B, C, H, W).clone()
    options = LossOptions(noise_offset=0.1, adaptive_noise_scale=0.2)
    batch = noise_batch(
        scheduler,
        latents,
        options,
        noise=torch.zeros_like(latents),
        timesteps=TIMESTEPS,
        generator=torch.Generator().manual_seed(4),
    )
    z = torch.randn(B, C, 1, 1, generator=torch.Generator().manual_seed(4))
    strength = (0.1 + 0.2 * channel_means.abs()).view(1, C, 1, 1)
    assert torch.allclose(batch.noise[:, :, :1, :1], strength * z)
    # A negative scale can push the offset below 0: sd-scripts clamps it there.
    negative = noise_batch(
        scheduler,
        latents,
        replace(options, adaptive_noise_scale=-1.0),
        noise=torch.zeros_like(latents),
        timesteps=TIMESTEPS,
        generator=torch.Generator().manual_seed(4),
    )
    assert torch.equal(negative.noise[:, 2], torch.zeros(B, H, W))  # 0.1 - 2.0 < 0 -> no offset


def _neighbour_correlation(noise: torch.Tensor) -> float:
    left, right = noise[..., :-1].flatten(), noise[..., 1:].flatten()
    return torch.corrcoef(torch.stack([left, right]))[0, 1].item()


def test_multires_noise_has_unit_std_and_low_frequency_structure():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(8, C, 64, 64, generator=g)
    pyramid = pyramid_noise(white, iterations=6, discount=0.8, generator=g)
    assert abs(pyramid.std().item() - 1.0) < 1e-5
    assert abs(_neighbour_correlation(white)) < 0.02
    assert _neighbour_correlation(pyramid) > 0.15  # neighbouring pixels share the upsampled low-res levels
    # Per-channel means vary far more than white noise's (std 1/64): the coarse levels move whole areas.
    assert pyramid.mean(dim=(2, 3)).std().item() > 5 * white.mean(dim=(2, 3)).std().item()


def test_multires_first_level_is_full_resolution_white_noise():
    """Level 0 has ratio r**0 = 1 and weight discount**0 = 1: one level only adds white noise and renormalises."""
    g = torch.Generator().manual_seed(1)
    white = torch.randn(8, C, 64, 64, generator=g)
    one_level = pyramid_noise(white, iterations=1, discount=0.3, generator=torch.Generator().manual_seed(2))
    assert abs(_neighbour_correlation(one_level)) < 0.02
    assert abs(one_level.std().item() - 1.0) < 1e-5


def test_ip_noise_gamma_perturbs_the_input_but_not_the_target():
    scheduler = make_noise_scheduler()
    latents, noise, _ = _tensors()
    options = LossOptions(ip_noise_gamma=0.1)
    batch = noise_batch(
        scheduler, latents, options, noise=noise, timesteps=TIMESTEPS, generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(batch.target, noise) and torch.equal(batch.noise, noise)
    z = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(9))
    expected = scheduler.add_noise(latents, noise + 0.1 * z, TIMESTEPS)
    assert torch.allclose(batch.noisy, expected, atol=1e-6)
    assert not torch.allclose(batch.noisy, scheduler.add_noise(latents, noise, TIMESTEPS), atol=1e-4)


def test_ip_noise_gamma_random_strength_draws_gamma_below_the_maximum():
    scheduler = make_noise_scheduler()
    latents, noise, _ = _tensors()
    options = LossOptions(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    batch = noise_batch(
        scheduler, latents, options, noise=noise, timesteps=TIMESTEPS, generator=torch.Generator().manual_seed(9)
    )
    g = torch.Generator().manual_seed(9)
    gamma = 0.1 * torch.rand(1, generator=g).item()
    z = torch.randn(B, C, H, W, generator=g)
    assert 0.0 <= gamma < 0.1
    assert torch.allclose(batch.noisy, scheduler.add_noise(latents, noise + gamma * z, TIMESTEPS), atol=1e-6)


# --- Schedule and targets.


def test_zero_terminal_snr_ends_at_zero_and_keeps_the_start():
    original = make_noise_scheduler().alphas_cumprod.double()
    fixed = make_noise_scheduler(zero_terminal_snr=True).alphas_cumprod.double()
    assert original[-1].item() > 1e-3
    assert fixed[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert fixed[0].item() == pytest.approx(original[0].item(), rel=1e-6)
    assert (fixed[1:] <= fixed[:-1]).all()  # still a decreasing schedule
    # sqrt(alphas_cumprod) is shifted and scaled linearly: sqrt(fixed) = (sqrt(orig) - sqrt(orig_T)) * k.
    shift = original.sqrt()[-1]
    k = original.sqrt()[0] / (original.sqrt()[0] - shift)
    assert torch.allclose(fixed.sqrt(), (original.sqrt() - shift) * k, atol=1e-5)


def test_the_scheduler_matches_the_independent_schedule():
    assert torch.allclose(make_noise_scheduler().alphas_cumprod.double(), _alphas_cumprod(), rtol=1e-5)


def test_v_parameterization_target_is_the_velocity():
    scheduler = make_noise_scheduler()
    latents, noise, _ = _tensors()
    batch = noise_batch(scheduler, latents, LossOptions(v_parameterization=True), noise=noise, timesteps=TIMESTEPS)
    a = _alphas_cumprod()[TIMESTEPS].view(-1, 1, 1, 1)
    velocity = a.sqrt() * noise.double() - (1 - a).sqrt() * latents.double()
    noisy = a.sqrt() * latents.double() + (1 - a).sqrt() * noise.double()
    assert torch.allclose(batch.target.double(), velocity, atol=1e-5)
    assert torch.allclose(batch.noisy.double(), noisy, atol=1e-5)
    assert torch.equal(batch.noise, noise)


# --- Per-timestep weights.


@pytest.mark.parametrize("v_prediction", [False, True])
def test_min_snr_gamma_weights_each_sample_by_min_snr_gamma_over_snr(v_prediction):
    scheduler = make_noise_scheduler()
    _, prediction, target = _tensors()
    options = LossOptions(min_snr_gamma=5.0, v_parameterization=v_prediction)
    snr = _snr(TIMESTEPS)
    weight = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1 if v_prediction else snr)
    expected = (_per_sample_mse(prediction, target) * weight).mean()
    loss = diffusion_loss(prediction, _batch(target), torch.ones(B), scheduler, options)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    if not v_prediction:  # t=999 has SNR < 5: full weight; t=0 has SNR ~1175: weight 5/SNR
        assert weight[-1].item() == 1.0 and weight[0].item() == pytest.approx(5.0 / snr[0].item())


@pytest.mark.parametrize("v_prediction", [False, True])
def test_debiased_estimation_weights_by_inverse_sqrt_snr_clamped_at_1000(v_prediction):
    scheduler = make_noise_scheduler()
    _, prediction, target = _tensors()
    options = LossOptions(debiased_estimation_loss=True, v_parameterization=v_prediction)
    snr = _snr(TIMESTEPS).clamp(max=1000.0)
    assert snr[0].item() == 1000.0  # SNR(0) ~ 1175 is clamped
    weight = 1.0 / (snr + 1) if v_prediction else 1.0 / snr.sqrt()
    expected = (_per_sample_mse(prediction, target) * weight).mean()
    loss = diffusion_loss(prediction, _batch(target), torch.ones(B), scheduler, options)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_scale_v_pred_loss_like_noise_pred_multiplies_by_snr_over_snr_plus_one():
    scheduler = make_noise_scheduler()
    _, prediction, target = _tensors()
    options = LossOptions(v_parameterization=True, scale_v_pred_loss_like_noise_pred=True)
    snr = _snr(TIMESTEPS).clamp(max=1000.0)
    expected = (_per_sample_mse(prediction, target) * snr / (snr + 1)).mean()
    loss = diffusion_loss(prediction, _batch(target), torch.ones(B), scheduler, options)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_weights_multiply_with_each_other_and_with_loss_weights():
    scheduler = make_noise_scheduler()
    _, prediction, target = _tensors()
    options = LossOptions(min_snr_gamma=5.0, debiased_estimation_loss=True)
    loss_weights = torch.tensor([1.0, 0.5, 2.0, 0.0])
    snr = _snr(TIMESTEPS)
    weight = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr / snr.clamp(max=1000.0).sqrt()
    expected = (_per_sample_mse(prediction, target) * loss_weights.double() * weight).mean()
    loss = diffusion_loss(prediction, _batch(target), loss_weights, scheduler, options)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_snr_weights_use_the_schedule_before_the_zero_terminal_rescale():
    """sd-scripts builds its SNR table before --zero_terminal_snr: weights stay finite at t=999 and unchanged."""
    _, prediction, target = _tensors()
    options = LossOptions(min_snr_gamma=5.0, debiased_estimation_loss=True, zero_terminal_snr=True)
    plain = diffusion_loss(prediction, _batch(target), torch.ones(B), make_noise_scheduler(), options)
    rescaled = diffusion_loss(prediction, _batch(target), torch.ones(B), make_noise_scheduler(True), options)
    assert torch.isfinite(rescaled) and rescaled.item() == pytest.approx(plain.item(), rel=1e-6)


# --- Loss types.


def test_huber_loss_is_sd_scripts_pseudo_huber_per_element():
    d = torch.tensor([0.0, 0.01, 0.1, 1.0, -3.0]).view(1, 1, 1, 5)
    c = torch.tensor([0.1])
    loss = element_loss(d, torch.zeros_like(d), "huber", c).flatten()
    expected = [2 * 0.1 * (math.sqrt(x * x + 0.01) - 0.1) for x in d.flatten().tolist()]
    assert loss.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert loss[1].item() == pytest.approx(0.01**2, rel=1e-2)  # quadratic (~d^2) well below c
    assert loss[4].item() == pytest.approx(2 * 0.1 * 3.0, rel=0.05)  # linear (~2c|d|) well above c


def test_smooth_l1_loss_is_two_times_sqrt_d2_plus_c2_minus_c():
    d = torch.tensor([0.0, 0.05, 0.5, -2.0]).view(1, 1, 1, 4)
    c = torch.tensor([0.2])
    loss = element_loss(d, torch.zeros_like(d), "smooth_l1", c).flatten()
    expected = [2 * (math.sqrt(x * x + 0.04) - 0.2) for x in d.flatten().tolist()]
    assert loss.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_l1_loss_is_the_absolute_difference():
    d = torch.tensor([0.5, -2.0, 0.0]).view(1, 1, 1, 3)
    assert element_loss(d, torch.zeros_like(d), "l1").flatten().tolist() == [0.5, 2.0, 0.0]


def test_huber_c_is_per_sample():
    d = torch.ones(2, 1, 1, 1)
    loss = element_loss(d, torch.zeros_like(d), "huber", torch.tensor([0.1, 1.0])).flatten()
    assert loss.tolist() == pytest.approx([0.2 * (math.sqrt(1.01) - 0.1), 2 * (math.sqrt(2) - 1)], rel=1e-5)


def test_huber_schedules_follow_their_formulas():
    scheduler = make_noise_scheduler()
    t = torch.tensor([0, 250, 500, 999])
    constant = huber_threshold(scheduler, t, 0.1, "constant", 2.0)
    assert constant.tolist() == pytest.approx([0.2] * 4)
    exponential = huber_threshold(scheduler, t, 0.1, "exponential", 2.0)
    assert exponential.tolist() == pytest.approx([2.0 * 0.1 ** (x / 1000) for x in t.tolist()], rel=1e-5)
    a = _alphas_cumprod()[t]
    sigma = ((1 - a) / a).sqrt()
    snr = huber_threshold(scheduler, t, 0.1, "snr", 2.0)  # sd-scripts applies no scale in this schedule
    assert snr.tolist() == pytest.approx(((1 - 0.1) / (1 + sigma) ** 2 + 0.1).tolist(), rel=1e-4)
    assert snr[0].item() > 0.9 and snr[-1].item() < 0.11  # ~1 for clean inputs down to ~c at pure noise


def test_huber_loss_through_the_entry_points():
    scheduler = make_noise_scheduler()
    latents, prediction, noise = _tensors()
    options = LossOptions(loss_type="huber", huber_schedule="constant", huber_c=0.3)
    batch = noise_batch(scheduler, latents, options, noise=noise, timesteps=TIMESTEPS)
    assert batch.huber_c.tolist() == pytest.approx([0.3] * B)
    d = prediction.double() - noise.double()
    expected = (2 * 0.3 * ((d**2 + 0.09).sqrt() - 0.3)).mean(dim=(1, 2, 3)).mean()
    loss = diffusion_loss(prediction, batch, torch.ones(B), scheduler, options)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with_zero_terminal = noise_batch(
        make_noise_scheduler(True), latents, LossOptions(loss_type="smooth_l1"), noise=noise, timesteps=TIMESTEPS
    )
    assert torch.isfinite(with_zero_terminal.huber_c).all()  # sigma = inf at t=999 gives c, not NaN
    assert with_zero_terminal.huber_c[-1].item() == pytest.approx(0.1)


# --- Flags and validation.


def test_flag_defaults_give_the_default_options():
    assert loss_config(_parse()) == LossOptions()


def test_flags_map_to_options():
    options = loss_config(
        _parse(
            "--noise_offset",
            "0.05",
            "--noise_offset_random_strength",
            "--adaptive_noise_scale",
            "0.01",
            "--multires_noise_iterations",
            "6",
            "--multires_noise_discount",
            "0.4",
            "--min_snr_gamma",
            "5",
            "--v_parameterization",
            "--scale_v_pred_loss_like_noise_pred",
            "--debiased_estimation_loss",
            "--loss_type",
            "smooth_l1",
            "--huber_c",
            "0.2",
            "--huber_schedule",
            "exponential",
            "--huber_scale",
            "1.5",
            "--zero_terminal_snr",
            "--ip_noise_gamma",
            "0.1",
            "--ip_noise_gamma_random_strength",
            "--min_timestep",
            "100",
            "--max_timestep",
            "900",
        )
    )
    assert options == LossOptions(
        noise_offset=0.05,
        noise_offset_random_strength=True,
        adaptive_noise_scale=0.01,
        multires_noise_iterations=6,
        multires_noise_discount=0.4,
        min_snr_gamma=5.0,
        v_parameterization=True,
        scale_v_pred_loss_like_noise_pred=True,
        debiased_estimation_loss=True,
        loss_type="smooth_l1",
        huber_c=0.2,
        huber_schedule="exponential",
        huber_scale=1.5,
        zero_terminal_snr=True,
        ip_noise_gamma=0.1,
        ip_noise_gamma_random_strength=True,
        min_timestep=100,
        max_timestep=900,
    )
    assert options.timestep_range == (100, 900)


def test_zero_means_off_as_in_sd_scripts():
    options = loss_config(
        _parse(
            "--noise_offset", "0", "--min_snr_gamma", "0", "--multires_noise_iterations", "0", "--ip_noise_gamma", "0"
        )
    )
    assert options == LossOptions()


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--min_timestep", "500", "--max_timestep", "500"], "--min_timestep"),
        (["--min_timestep", "-1"], "--min_timestep"),
        (["--max_timestep", "1001"], "--max_timestep"),
        (["--min_timestep", "1000"], "--min_timestep"),
        (["--min_snr_gamma", "-5"], "--min_snr_gamma"),
        (["--noise_offset", "-0.1"], "--noise_offset"),
        (["--adaptive_noise_scale", "0.1"], "--noise_offset"),
        (["--scale_v_pred_loss_like_noise_pred"], "--v_parameterization"),
        (["--loss_type", "huber", "--huber_c", "0"], "--huber_c"),
        (["--huber_scale", "-1"], "--huber_scale"),
        (["--multires_noise_iterations", "-2"], "--multires_noise_iterations"),
        (["--multires_noise_discount", "-0.3"], "--multires_noise_discount"),
        (["--ip_noise_gamma", "-0.1"], "--ip_noise_gamma"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_flag(argv, flag):
    with pytest.raises(UserInputError) as error:
        loss_config(_parse(*argv))
    message = str(error.value)
    assert "\n" not in message and flag in message


def test_unknown_loss_type_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        _parse("--loss_type", "l3")


def test_loss_metadata_defaults_match_sd_scripts():
    assert loss_metadata(LossOptions()) == {
        "ss_noise_offset": "None",
        "ss_noise_offset_random_strength": "False",
        "ss_adaptive_noise_scale": "None",
        "ss_multires_noise_iterations": "None",
        "ss_multires_noise_discount": "0.3",
        "ss_min_snr_gamma": "None",
        "ss_debiased_estimation": "False",
        "ss_zero_terminal_snr": "False",
        "ss_ip_noise_gamma": "None",
        "ss_ip_noise_gamma_random_strength": "False",
        "ss_loss_type": "l2",
        "ss_huber_schedule": "snr",
        "ss_huber_c": "0.1",
        "ss_huber_scale": "1.0",
    }


def test_loss_module_does_not_import_torch_or_diffusers():
    code = "import sys, library.train.loss; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
