"""The diffusion training objective: sd-scripts' loss and noise options as one typed frozen slice (`LossOptions`,
with its warnings and `ss_*` metadata), and the pure functions that noise a batch and weight its loss.

Each option maps to one small function; `noise_batch` and `diffusion_loss` are the two entry points the trainer
calls (with default options: the plain epsilon-prediction MSE). torch and diffusers are imported inside the
functions that compute, so the command line and the config read the options and their names without loading them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from diffusers import DDPMScheduler

NUM_TRAIN_TIMESTEPS = 1000
LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")

LossType = Literal["l1", "l2", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]


@dataclass(frozen=True)
class LossOptions:
    """How noise is drawn and how the per-sample loss is weighted. The defaults are plain epsilon MSE."""

    noise_offset: float | None = None
    """Add `offset * N(0,1)` per (sample, channel), constant over H,W: lets the model shift mean brightness."""
    noise_offset_random_strength: bool = False
    """Draw the offset uniformly in [0, noise_offset) once per batch instead of using it as is."""
    adaptive_noise_scale: float | None = None
    """Add `scale * |mean of the latent channel|` to the offset (clamped at 0); needs noise_offset."""
    multires_noise_iterations: int | None = None
    """Pyramid ("multi-resolution") noise: add this many lower-resolution noise layers, then renormalise."""
    multires_noise_discount: float = 0.3
    """Weight of pyramid layer i is discount**i."""
    min_snr_gamma: float | None = None
    """Min-SNR weighting (arXiv 2303.09556): per-sample weight min(SNR, gamma) / SNR (v-prediction: / (SNR+1))."""
    v_parameterization: bool = False
    """The model predicts v = sqrt(a) * noise - sqrt(1-a) * x0 instead of the noise."""
    scale_v_pred_loss_like_noise_pred: bool = False
    """Multiply a v-prediction loss by SNR/(SNR+1) so its timestep profile matches epsilon prediction."""
    debiased_estimation_loss: bool = False
    """Weight by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), SNR clamped to 1000 (arXiv 2310.08442)."""
    loss_type: LossType = "l2"
    """Per-element loss: l2 (MSE), l1, huber (2c(sqrt(d^2+c^2)-c)) or smooth_l1 (2(sqrt(d^2+c^2)-c))."""
    huber_c: float = 0.1
    """The Huber threshold c (only huber and smooth_l1 use it); how it varies over timesteps: huber_schedule."""
    huber_schedule: HuberSchedule = "snr"
    """constant: c*scale; exponential: c**(t/1000)*scale; snr: (1-c)/(1+sigma_t)**2 + c (sd-scripts ignores
    huber_scale here, and so do we)."""
    huber_scale: float = 1.0
    """Multiplier of c in the constant and exponential schedules."""
    zero_terminal_snr: bool = False
    """Rescale the betas so the last timestep is pure noise (arXiv 2305.08891)."""
    ip_noise_gamma: float | None = None
    """Input perturbation (arXiv 2301.11706): the noisy latents get `gamma * N(0,1)` extra noise, the target not."""
    ip_noise_gamma_random_strength: bool = False
    """Draw gamma uniformly in [0, ip_noise_gamma) once per batch."""
    min_timestep: int | None = None
    """Lowest training timestep (inclusive); None means 0."""
    max_timestep: int | None = None
    """Highest training timestep (exclusive); None means 1000."""

    @property
    def timestep_range(self) -> tuple[int, int]:
        """[low, high) of the uniform timestep draw, the Nones resolved."""
        low = 0 if self.min_timestep is None else self.min_timestep
        high = NUM_TRAIN_TIMESTEPS if self.max_timestep is None else self.max_timestep
        return low, high

    @property
    def uses_huber_c(self) -> bool:
        """Whether the per-element loss needs a per-sample Huber threshold."""
        return self.loss_type in ("huber", "smooth_l1")


def loss_option_warnings(options: LossOptions) -> list[str]:
    """Accepted but probably unintended combinations (sd-scripts accepts them too); the CLI logs these."""
    warnings = []
    if options.zero_terminal_snr and not options.v_parameterization:
        warnings.append(
            "--zero_terminal_snr without --v_parameterization: an epsilon model cannot learn the last "
            "timestep's target well; sd-scripts warns the same"
        )
    if options.noise_offset_random_strength and options.noise_offset is None:
        warnings.append("--noise_offset_random_strength does nothing without --noise_offset")
    if options.ip_noise_gamma_random_strength and options.ip_noise_gamma is None:
        warnings.append("--ip_noise_gamma_random_strength does nothing without --ip_noise_gamma")
    return warnings


def loss_metadata(options: LossOptions) -> dict[str, str]:
    """The `ss_*` keys sd-scripts writes for these options (str() of its values, so "None" when off)."""
    return {
        "ss_noise_offset": str(options.noise_offset),
        "ss_noise_offset_random_strength": str(options.noise_offset_random_strength),
        "ss_adaptive_noise_scale": str(options.adaptive_noise_scale),
        "ss_multires_noise_iterations": str(options.multires_noise_iterations),
        "ss_multires_noise_discount": str(options.multires_noise_discount),
        "ss_min_snr_gamma": str(options.min_snr_gamma),
        "ss_debiased_estimation": str(options.debiased_estimation_loss),
        "ss_zero_terminal_snr": str(options.zero_terminal_snr),
        "ss_ip_noise_gamma": str(options.ip_noise_gamma),
        "ss_ip_noise_gamma_random_strength": str(options.ip_noise_gamma_random_strength),
        "ss_loss_type": options.loss_type,
        "ss_huber_schedule": options.huber_schedule,
        "ss_huber_c": str(options.huber_c),
        "ss_huber_scale": str(options.huber_scale),
    }


# --- The maths.

SDXL_VAE_SCALE = 0.13025
SNR_CLAMP = 1000.0
"""sd-scripts caps the SNR at 1000 in its v-pred scaling and debiased weights (SNR is huge near t=0)."""


def make_noise_scheduler(zero_terminal_snr: bool = False) -> DDPMScheduler:
    """SDXL's training schedule: scaled_linear betas 0.00085..0.012 over 1000 steps.

    `zero_terminal_snr` rescales the betas so alphas_cumprod[-1] == 0 (arXiv 2305.08891) with diffusers' own
    option, the same shift-and-scale of sqrt(alphas_cumprod) sd-scripts applies; alphas_cumprod[0] is kept.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        clip_sample=False,
        rescale_betas_zero_snr=zero_terminal_snr,
    )


# --- Random draws: on the generator's device when one is given (reproducible anywhere), else beside `like`.


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    import torch

    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    """One float in [low, high); a torch draw (not `random`) so one generator controls every draw."""
    import torch

    device = generator.device if generator is not None else "cpu"
    return low + (high - low) * float(torch.rand(1, generator=generator, device=device).item())


# --- Noise shaping (applied in sd-scripts' order: offset, pyramid, then input perturbation).


def offset_noise(
    noise: torch.Tensor,
    latents: torch.Tensor,
    offset: float,
    *,
    random_strength: bool = False,
    adaptive_scale: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """noise + strength * N(0,1) drawn per (sample, channel), constant over H,W.

    Zero-mean noise never teaches the model to move a channel's mean (overall brightness); the offset does.
    strength = offset (or U[0, offset) once per batch), plus adaptive_scale * |channel mean of the latent|,
    clamped at 0.
    """
    strength: float | torch.Tensor = offset * _uniform(0.0, 1.0, generator) if random_strength else offset
    if adaptive_scale is not None:
        channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        strength = (strength + adaptive_scale * channel_mean).clamp(min=0.0)
    per_channel = _randn((noise.shape[0], noise.shape[1], 1, 1), noise, generator)
    return (noise + strength * per_channel).to(noise.dtype)


def pyramid_noise(
    noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Multi-resolution noise: add noise drawn at ever lower resolutions, upsampled, then renormalise to std 1.

    Level i is N(0,1) at (H, W) / r**i with r ~ U[2, 4), bilinearly upsampled and weighted discount**i; it stops
    after the level that reaches 1 pixel. Low-frequency noise lets the model change large areas at once.
    """
    import torch.nn.functional as F

    _, _, height, width = noise.shape
    out = noise
    for level in range(iterations):
        ratio = _uniform(2.0, 4.0, generator) ** level
        low_h, low_w = max(1, int(height / ratio)), max(1, int(width / ratio))
        layer = _randn((noise.shape[0], noise.shape[1], low_h, low_w), noise, generator)
        out = out + F.interpolate(layer, size=(height, width), mode="bilinear") * discount**level
        if low_h == 1 or low_w == 1:
            break
    return out / out.std()


def perturbed_noise(
    noise: torch.Tensor, gamma: float, *, random_strength: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Input perturbation (arXiv 2301.11706): noise + gamma * N(0,1), used for the noisy input only.

    The target stays the unperturbed noise, which makes the model robust to its own prediction errors at
    sampling time. gamma may be drawn once per batch in [0, gamma).
    """
    strength = gamma * _uniform(0.0, 1.0, generator) if random_strength else gamma
    return noise + strength * _randn(tuple(noise.shape), noise, generator)


def sample_timesteps(
    batch_size: int, low: int, high: int, device: torch.device | str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform integer timesteps in [low, high), long, on `device` (drawn on CPU unless a generator says where)."""
    import torch

    draw_device = generator.device if generator is not None else "cpu"
    return torch.randint(low, high, (batch_size,), generator=generator, device=draw_device).long().to(device)


# --- Targets, thresholds and per-timestep weights.


def velocity_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0, the v-prediction target."""
    return scheduler.get_velocity(latents, noise, timesteps)


def weighting_snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = a_t / (1 - a_t) of the schedule *before* any zero-terminal-SNR rescale, float32, on CPU.

    sd-scripts computes its SNR table before `--zero_terminal_snr` rescales the betas, so min-SNR, v-pred
    scaling and debiased weights ignore the rescale; we match it, which also keeps the weights finite at the
    last timestep (whose rescaled SNR is 0).
    """
    base = type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=False)
    alphas_cumprod = base.alphas_cumprod.float()[timesteps.cpu().long()]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool = False) -> torch.Tensor:
    """Min-SNR-gamma (arXiv 2303.09556): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction.

    Caps the weight of the easy, low-noise timesteps so they stop dominating the gradient.
    """
    import torch

    return torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1.0 if v_prediction else snr)


def v_pred_noise_scale(snr: torch.Tensor) -> torch.Tensor:
    """SNR / (SNR + 1), SNR capped at 1000: a v-prediction loss times this has epsilon prediction's profile."""
    capped = snr.clamp(max=SNR_CLAMP)
    return capped / (capped + 1.0)


def debiased_weight(snr: torch.Tensor, v_prediction: bool = False) -> torch.Tensor:
    """Debiased estimation (arXiv 2310.08442): 1 / sqrt(SNR), or 1 / (SNR + 1) for v-prediction; SNR <= 1000."""
    capped = snr.clamp(max=SNR_CLAMP)
    return 1.0 / (capped + 1.0) if v_prediction else 1.0 / capped.sqrt()


def timestep_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, options: LossOptions) -> torch.Tensor | None:
    """The product of the enabled per-sample weights (min-SNR, v-pred scaling, debiased), or None if none is."""
    import torch

    enabled = (
        options.min_snr_gamma is not None
        or options.scale_v_pred_loss_like_noise_pred
        or options.debiased_estimation_loss
    )
    if not enabled:
        return None
    snr = weighting_snr(scheduler, timesteps)
    weights = torch.ones_like(snr)
    if options.min_snr_gamma is not None:
        weights = weights * min_snr_weight(snr, options.min_snr_gamma, options.v_parameterization)
    if options.scale_v_pred_loss_like_noise_pred:
        weights = weights * v_pred_noise_scale(snr)
    if options.debiased_estimation_loss:
        weights = weights * debiased_weight(snr, options.v_parameterization)
    return weights


def huber_threshold(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, c: float, schedule: str, scale: float = 1.0
) -> torch.Tensor:
    """The per-sample Huber c, float32, on the timesteps' device.

    constant: c * scale; exponential: c ** (t / T) * scale (1 at t=0 down to c); snr: (1 - c) / (1 + sigma_t)**2
    + c with sigma_t = sqrt((1 - a_t) / a_t) of the schedule in use (sd-scripts applies no scale there).
    A large c near t=0 keeps the loss quadratic where errors are small; a small c at high noise tames outliers.
    """
    import torch

    t = timesteps.long()
    if schedule == "constant":
        return torch.full(t.shape, c * scale, dtype=torch.float32, device=t.device)
    if schedule == "exponential":
        fraction = t.float() / scheduler.config.num_train_timesteps
        return torch.exp(math.log(c) * fraction) * scale
    if schedule == "snr":
        alphas_cumprod = scheduler.alphas_cumprod.float().cpu()[t.cpu()]
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
        return ((1.0 - c) / (1.0 + sigmas) ** 2 + c).to(t.device)
    raise ValueError(f"unknown Huber schedule {schedule!r}")


def element_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """The unreduced loss per element. huber: 2c(sqrt(d^2 + c^2) - c); smooth_l1: 2(sqrt(d^2 + c^2) - c).

    Both are sd-scripts' pseudo-Huber forms: ~d^2 for |d| << c and linear beyond, with c per sample.
    """
    import torch
    import torch.nn.functional as F

    if loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"unknown loss type {loss_type!r}")
    if huber_c is None:
        raise ValueError(f"loss type {loss_type!r} needs a per-sample huber_c")
    c = huber_c.to(prediction.device, prediction.dtype).view(-1, *([1] * (prediction.ndim - 1)))
    smooth = torch.sqrt((prediction - target) ** 2 + c**2) - c
    return 2 * c * smooth if loss_type == "huber" else 2 * smooth


# --- The two entry points.


@dataclass(frozen=True)
class NoisedBatch:
    """One batch after the forward diffusion: what the model sees and what it should predict."""

    noisy: torch.Tensor
    """The model input: latents noised to `timesteps` (with the input perturbation, if any)."""
    target: torch.Tensor
    """`noise`, or the velocity for v-prediction."""
    timesteps: torch.Tensor
    """Per-sample timesteps, long, on the latents' device."""
    noise: torch.Tensor
    """The noise after offset / pyramid shaping (before input perturbation)."""
    huber_c: torch.Tensor | None
    """Per-sample Huber threshold for huber / smooth_l1, else None."""


def noise_batch(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    options: LossOptions,
    *,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> NoisedBatch:
    """Draw noise and timesteps (unless given) and noise the latents as sd-scripts does.

    A given `noise` replaces only the base N(0,1) draw: offset, pyramid and input perturbation still apply (pass
    a generator too, or options without them, for a fully fixed validation batch). Draw order: noise, offset,
    pyramid, timesteps, perturbation.
    """
    if noise is None:
        noise = _randn(tuple(latents.shape), latents, generator)
    if options.noise_offset is not None:
        noise = offset_noise(
            noise,
            latents,
            options.noise_offset,
            random_strength=options.noise_offset_random_strength,
            adaptive_scale=options.adaptive_noise_scale,
            generator=generator,
        )
    if options.multires_noise_iterations is not None:
        noise = pyramid_noise(noise, options.multires_noise_iterations, options.multires_noise_discount, generator)
    if timesteps is None:
        timesteps = sample_timesteps(latents.shape[0], *options.timestep_range, latents.device, generator)
    timesteps = timesteps.to(latents.device).long()
    input_noise = noise
    if options.ip_noise_gamma is not None:
        input_noise = perturbed_noise(
            noise, options.ip_noise_gamma, random_strength=options.ip_noise_gamma_random_strength, generator=generator
        )
    noisy = scheduler.add_noise(latents, input_noise, timesteps)
    target = velocity_target(scheduler, latents, noise, timesteps) if options.v_parameterization else noise
    huber_c = None
    if options.uses_huber_c:
        huber_c = huber_threshold(scheduler, timesteps, options.huber_c, options.huber_schedule, options.huber_scale)
    return NoisedBatch(noisy=noisy, target=target, timesteps=timesteps, noise=noise, huber_c=huber_c)


def diffusion_loss(
    prediction: torch.Tensor,
    batch: NoisedBatch,
    loss_weights: torch.Tensor,
    scheduler: DDPMScheduler,
    options: LossOptions,
) -> torch.Tensor:
    """The scalar training loss: per-element loss (fp32), mean over C,H,W, times the per-sample loss weights and
    timestep weights (min-SNR, v-pred scaling, debiased), mean over the batch. With default options: the plain
    epsilon MSE."""
    per_element = element_loss(prediction.float(), batch.target.float(), options.loss_type, batch.huber_c)
    per_sample = per_element.mean(dim=(1, 2, 3)) * loss_weights.to(per_element.device)
    weights = timestep_weights(scheduler, batch.timesteps, options)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()
