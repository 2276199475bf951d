"""Noise schedules in one form for every model family: ``x_t = a(t) * x0 + s(t) * eps``.

A schedule is anything with ``alpha_sigma(t) -> (a, s)``; samplers and losses only need that.
Timesteps ``t`` are float tensors of any shape; ``a`` and ``s`` come back in float64 with the
same shape so that callers choose their own precision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


def betas_scaled_linear(beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = 1000) -> Tensor:
    # SD1.5 / SDXL: betas linear in sqrt-space (diffusers "scaled_linear")
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def betas_linear(beta_start: float = 0.0001, beta_end: float = 0.02, num_timesteps: int = 1000) -> Tensor:
    # PixArt and the TDM reference script: plain DDPM linear betas
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    # Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that abar_{T-1} = 0 exactly
    sqrt_abar = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def flow_shift(sigma: Tensor, shift: float) -> Tensor:
    # SD3 timestep shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma)
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flow_unshift(sigma: Tensor, shift: float) -> Tensor:
    # inverse of flow_shift
    return sigma / (shift - (shift - 1.0) * sigma)


def alpha_sigma_from_sigma_k(sigma_k: Tensor) -> tuple[Tensor, Tensor]:
    # VP: sigma_k = s/a with a^2 + s^2 = 1; written so that sigma_k = 0 and inf stay finite
    sigma_k = torch.as_tensor(sigma_k, dtype=torch.float64)
    a = torch.rsqrt(1.0 + sigma_k**2)
    s = torch.rsqrt(1.0 + sigma_k.reciprocal() ** 2)
    return a, s


@dataclass(frozen=True)
class VPSchedule:
    """Discrete variance-preserving schedule (DDPM): ``a = sqrt(abar_t)``, ``s = sqrt(1 - abar_t)``.

    Non-integer timesteps interpolate ``log(s/a)`` linearly, as ComfyUI's ModelSamplingDiscrete does.
    """

    alphas_cumprod: Tensor
    kind: str = field(default="vp", init=False)

    @classmethod
    def from_betas(cls, betas: Tensor) -> "VPSchedule":
        return cls(torch.cumprod(1.0 - betas.double(), dim=0))

    @classmethod
    def from_config(
        cls,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
    ) -> "VPSchedule":
        makers = {"scaled_linear": betas_scaled_linear, "linear": betas_linear}
        if beta_schedule not in makers:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}: use one of {sorted(makers)}")
        betas = makers[beta_schedule](beta_start, beta_end, num_timesteps)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls.from_betas(betas)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def log_sigmas_k(self) -> Tensor:
        abar = self.alphas_cumprod.double()
        return 0.5 * (torch.log1p(-abar) - torch.log(abar))

    def log_sigmas_k_on(self, device) -> Tensor:
        """:attr:`log_sigmas_k` on ``device``, computed and copied once per device (training calls
        ``alpha_sigma`` several times an iteration)."""
        cache = self.__dict__.setdefault("_log_sigmas_by_device", {})
        device = torch.device(device)
        if device not in cache:
            cache[device] = self.log_sigmas_k.to(device)
        return cache[device]

    def sigma_k(self, t: Tensor) -> Tensor:
        """k-diffusion sigma ``s/a`` at (possibly fractional) timestep ``t``."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=self.num_timesteps - 1)
        w = t - low
        log_sigmas = self.log_sigmas_k_on(t.device)
        exact = w == 0  # keeps integer timesteps exact, also where log sigma is infinite (zero SNR)
        mixed = torch.where(exact, log_sigmas[low], (1 - w) * log_sigmas[low] + w * log_sigmas[high])
        return mixed.exp()

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return alpha_sigma_from_sigma_k(self.sigma_k(t))

    def timestep_from_sigma_k(self, sigma_k: Tensor) -> Tensor:
        """Inverse of :meth:`sigma_k`: the (fractional) timestep whose ``s/a`` is ``sigma_k``."""
        log_sigma = torch.as_tensor(sigma_k, dtype=torch.float64).log()
        log_sigmas = self.log_sigmas_k_on(log_sigma.device)
        finite = log_sigmas[torch.isfinite(log_sigmas)]
        low = torch.searchsorted(finite, log_sigma.clamp(finite[0], finite[-1]).contiguous(), right=True) - 1
        low = low.clamp(0, finite.shape[0] - 2)
        w = (log_sigma - finite[low]) / (finite[low + 1] - finite[low])
        t = (low + w.clamp(0, 1)).to(torch.float64)
        # zero terminal SNR: sigma_k = inf is exactly the last timestep, beyond the finite table
        at_infinity = torch.isposinf(log_sigma) & torch.isposinf(log_sigmas[-1])
        return torch.where(at_infinity, torch.full_like(t, self.num_timesteps - 1), t)

    def model_timestep(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float64)


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow (SD3, Flux): ``a = 1 - sigma``, ``s = sigma``, ``sigma = shift(t / T)``.

    ``t`` is the unshifted timestep in ``[0, T]``; the network sees ``sigma * T`` (shifted), as in
    diffusers' FlowMatchEulerDiscreteScheduler and ComfyUI's ModelSamplingDiscreteFlow.
    """

    shift: float = 1.0
    num_timesteps: int = 1000
    kind: str = field(default="flow", init=False)

    def flow_sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return flow_shift(t / self.num_timesteps, self.shift)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.flow_sigma(t)
        return 1.0 - sigma, sigma

    def sigma_k(self, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t)
        return s / a

    def timestep_from_flow_sigma(self, sigma: Tensor) -> Tensor:
        return flow_unshift(torch.as_tensor(sigma, dtype=torch.float64), self.shift) * self.num_timesteps

    def model_timestep(self, t: Tensor) -> Tensor:
        return self.flow_sigma(t) * self.num_timesteps


@dataclass(frozen=True)
class SigmaKSchedule:
    """ComfyUI / k-diffusion coordinates of a VP model: ``x = x0 + sigma * eps`` (``a = 1``).

    Here the "timestep" is the sigma itself; ComfyUI samplers see VP models this way.
    """

    kind: str = field(default="sigma_k", init=False)

    def alpha_sigma(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.ones_like(sigma), sigma


@dataclass(frozen=True)
class FlowSigmaSchedule:
    """ComfyUI coordinates of a flow model: the "timestep" is the flow sigma, ``a = 1 - sigma``."""

    kind: str = field(default="flow_sigma", init=False)

    def alpha_sigma(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return 1.0 - sigma, sigma


def snr(a: Tensor, s: Tensor) -> Tensor:
    # METHOD.md step 5: SNR(t) = (a / s)^2, weighted by min(SNR, 5) in the fake-score loss
    return (a / s) ** 2


def log_snr(a: Tensor, s: Tensor) -> Tensor:
    # lambda = log(a / s), the DPM-Solver time variable
    return torch.log(a) - torch.log(s)


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Per-sample ``(B,)`` or scalar coefficients reshaped to broadcast over ``x`` in ``x``'s dtype."""
    v = torch.as_tensor(v, device=x.device).to(x.dtype)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def sigma_k_min_max(schedule: VPSchedule) -> tuple[float, float]:
    # METHOD.md "Notation": ComfyUI's sigma range s/a of a VP table (finite entries; zero-SNR tables end at inf)
    s = schedule.log_sigmas_k
    s = s[torch.isfinite(s)]
    return math.exp(s[0].item()), math.exp(s[-1].item())
