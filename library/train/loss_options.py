"""sd-scripts' loss and noise options: the flags, their typed frozen form, and their validation.

Torch-free on purpose: the CLI imports this to build the parser and check the values before any model loads.
The maths that uses these options lives in `library.train.loss`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

from library.errors import UserInputError

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


def add_loss_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """sd-scripts' noise and loss flags, with its names and defaults (so its batch scripts and TOMLs run)."""
    add = parser.add_argument
    add("--noise_offset", type=float, default=None,
        help="noise offset: add this * N(0,1) per sample and channel to the noise (around 0.1 is usual)")
    add("--noise_offset_random_strength", action="store_true",
        help="use a random offset in [0, --noise_offset) per batch")
    add("--adaptive_noise_scale", type=float, default=None,
        help="add |latent channel mean| * this to --noise_offset (needs --noise_offset)")
    add("--multires_noise_iterations", type=int, default=None,
        help="multi-resolution (pyramid) noise with this many levels (around 6-10 is usual)")
    add("--multires_noise_discount", type=float, default=0.3,
        help="weight decay per pyramid level (only with --multires_noise_iterations)")
    add("--ip_noise_gamma", type=float, default=None,
        help="input perturbation noise: extra noise on the model input only (around 0.1 is usual)")
    add("--ip_noise_gamma_random_strength", action="store_true",
        help="use a random gamma in [0, --ip_noise_gamma) per batch")
    add("--min_snr_gamma", type=float, default=None,
        help="min-SNR weighting gamma (5 is the paper's recommendation); lower is stronger")
    add("--v_parameterization", action="store_true", help="train a v-prediction model (target = velocity)")
    add("--scale_v_pred_loss_like_noise_pred", action="store_true",
        help="scale the v-prediction loss like the noise-prediction loss (needs --v_parameterization)")
    add("--debiased_estimation_loss", action="store_true", help="debiased estimation loss weighting")
    add("--zero_terminal_snr", action="store_true",
        help="rescale the noise schedule's betas to reach zero SNR at the last timestep")
    add("--min_timestep", type=int, default=None, help="lowest training timestep, 0-999 (default 0)")
    add("--max_timestep", type=int, default=None, help="highest training timestep (exclusive), 1-1000 (default 1000)")
    add("--loss_type", default="l2", choices=LOSS_TYPES, help="per-element loss")
    add("--huber_schedule", default="snr", choices=HUBER_SCHEDULES,
        help="how the Huber threshold varies over timesteps (huber and smooth_l1 only)")
    add("--huber_c", type=float, default=0.1, help="Huber threshold c (huber and smooth_l1 only)")
    add("--huber_scale", type=float, default=1.0,
        help="multiplier of the Huber threshold in the constant and exponential schedules")


def _off_if_zero(value: float | int | None, flag: str) -> float | int | None:
    """sd-scripts treats 0 as "off" for these flags (GUIs pass 0); a negative value is a mistake."""
    if value is None or value == 0:
        return None
    if value < 0:
        raise UserInputError(f"{flag} must be positive, got {value}: pass a value > 0 or leave the flag out")
    return value


def _check_timesteps(low: int | None, high: int | None) -> None:
    lo = 0 if low is None else low
    hi = NUM_TRAIN_TIMESTEPS if high is None else high
    if not 0 <= lo < hi <= NUM_TRAIN_TIMESTEPS:
        raise UserInputError(
            f"timesteps: need 0 <= --min_timestep < --max_timestep <= {NUM_TRAIN_TIMESTEPS}, got {lo} and {hi}: "
            "fix the two values")


def _check_huber(loss_type: str, c: float, scale: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise UserInputError(f"--loss_type {loss_type!r} is unknown: use one of {', '.join(LOSS_TYPES)}")
    if not c > 0:
        raise UserInputError(f"--huber_c must be > 0, got {c}: 0.1 is the default")
    if not scale > 0:
        raise UserInputError(f"--huber_scale must be > 0, got {scale}: 1.0 is the default")


def loss_options_from_args(args: argparse.Namespace) -> LossOptions:
    """The parsed flags -> validated `LossOptions`. Raises `UserInputError` (one line) on a bad combination."""
    noise_offset = _off_if_zero(args.noise_offset, "--noise_offset")
    if args.adaptive_noise_scale is not None and noise_offset is None:
        raise UserInputError("--adaptive_noise_scale adds to the noise offset: also pass --noise_offset (e.g. 0.05)")
    multires = _off_if_zero(args.multires_noise_iterations, "--multires_noise_iterations")
    if args.multires_noise_discount < 0:
        raise UserInputError(
            f"--multires_noise_discount must be >= 0, got {args.multires_noise_discount}: 0.3 is the default")
    if args.scale_v_pred_loss_like_noise_pred and not args.v_parameterization:
        raise UserInputError(
            "--scale_v_pred_loss_like_noise_pred applies to v-prediction only: add --v_parameterization or drop it")
    _check_timesteps(args.min_timestep, args.max_timestep)
    _check_huber(args.loss_type, args.huber_c, args.huber_scale)
    if args.huber_schedule not in HUBER_SCHEDULES:
        raise UserInputError(
            f"--huber_schedule {args.huber_schedule!r} is unknown: use one of {', '.join(HUBER_SCHEDULES)}")
    return LossOptions(
        noise_offset=noise_offset,
        noise_offset_random_strength=bool(args.noise_offset_random_strength),
        adaptive_noise_scale=args.adaptive_noise_scale,
        multires_noise_iterations=multires,
        multires_noise_discount=args.multires_noise_discount,
        min_snr_gamma=_off_if_zero(args.min_snr_gamma, "--min_snr_gamma"),
        v_parameterization=bool(args.v_parameterization),
        scale_v_pred_loss_like_noise_pred=bool(args.scale_v_pred_loss_like_noise_pred),
        debiased_estimation_loss=bool(args.debiased_estimation_loss),
        loss_type=args.loss_type,
        huber_c=args.huber_c,
        huber_schedule=args.huber_schedule,
        huber_scale=args.huber_scale,
        zero_terminal_snr=bool(args.zero_terminal_snr),
        ip_noise_gamma=_off_if_zero(args.ip_noise_gamma, "--ip_noise_gamma"),
        ip_noise_gamma_random_strength=bool(args.ip_noise_gamma_random_strength),
        min_timestep=args.min_timestep,
        max_timestep=args.max_timestep,
    )


def loss_option_warnings(options: LossOptions) -> list[str]:
    """Accepted but probably unintended combinations (sd-scripts accepts them too); the CLI logs these."""
    warnings = []
    if options.zero_terminal_snr and not options.v_parameterization:
        warnings.append("--zero_terminal_snr without --v_parameterization: an epsilon model cannot learn the last "
                        "timestep's target well; sd-scripts warns the same")
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
