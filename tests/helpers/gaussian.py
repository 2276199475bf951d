"""Analytic references for the kernel tests: Gaussian and mixture-of-Gaussians data.

For data ``x0 ~ sum_k w_k N(mu_k, diag var_k)`` noised as ``x_t = a x0 + s eps`` everything the
kernels approximate is known in closed form: the x0 / eps posterior means (hence the exact
"denoiser" of any parameterization), the score, and - for a single Gaussian - the probability-flow
ODE map. For a mixture the ODE is integrated here with classical RK4 in flow coordinates.

Everything is float64 and written independently of ``tdm_core`` (the code under test).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _col(v, x: Tensor) -> Tensor:
    """Scalar or per-sample ``(B,)`` coefficient -> broadcastable against ``x`` of shape ``(B, D)``."""
    v = torch.as_tensor(v, dtype=torch.float64, device=x.device)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


@dataclass(frozen=True)
class GaussianMixture:
    """``sum_k weights[k] N(means[k], diag(variances[k]))`` in ``D`` dimensions (float64)."""

    weights: Tensor  # (C,)
    means: Tensor  # (C, D)
    variances: Tensor  # (C, D)

    @classmethod
    def single(cls, mean, variance) -> "GaussianMixture":
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
        variance = torch.as_tensor(variance, dtype=torch.float64).reshape(1, -1).expand_as(mean).clone()
        return cls(torch.ones(1, dtype=torch.float64), mean, variance)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.variances[comp].sqrt() * z

    def marginal_variance(self, a, s) -> Tensor:
        """Per-dimension variance of ``x_t`` (single Gaussian only): ``a^2 var + s^2``."""
        assert self.weights.numel() == 1, "closed-form marginal variance is for a single Gaussian"
        return torch.as_tensor(a, dtype=torch.float64) ** 2 * self.variances[0] + torch.as_tensor(s, dtype=torch.float64) ** 2

    def posterior_x0_eps(self, x_t: Tensor, a, s) -> tuple[Tensor, Tensor]:
        """Exact ``E[x0 | x_t]`` and ``E[eps | x_t]``; finite for ``s = 0`` and for ``a = 0``."""
        x_t = x_t.double()
        a, s = _col(a, x_t), _col(s, x_t)  # (B, 1)
        a_, s_ = a.unsqueeze(1), s.unsqueeze(1)  # (B, 1, 1) against components (1, C, D)
        mu, var = self.means.unsqueeze(0), self.variances.unsqueeze(0)
        total = a_**2 * var + s_**2  # marginal variance of each component, (B, C, D)
        centred = x_t.unsqueeze(1) - a_ * mu  # (B, C, D)
        log_lik = -0.5 * (centred**2 / total + total.log() + math.log(2 * math.pi)).sum(-1)
        resp = torch.softmax(log_lik + self.weights.log().unsqueeze(0), dim=1).unsqueeze(-1)  # (B, C, 1)
        # per component: E[x0|x_t] = mu + a var / total (x_t - a mu), E[eps|x_t] = s / total (x_t - a mu)
        x0 = (resp * (mu + a_ * var / total * centred)).sum(1)
        eps = (resp * (s_ / total * centred)).sum(1)
        return x0, eps

    def denoiser_output(self, x_t: Tensor, a, s, prediction_type: str) -> Tensor:
        """What a perfect network of ``prediction_type`` outputs at ``(x_t, a, s)``."""
        x0, eps = self.posterior_x0_eps(x_t, a, s)
        a, s = _col(a, x_t), _col(s, x_t)
        outputs = {
            "epsilon": lambda: eps,
            "v_prediction": lambda: a * eps - s * x0,  # diffusers' v for a^2 + s^2 = 1
            "flow": lambda: eps - x0,  # rectified-flow velocity
            "sample": lambda: x0,
        }
        return outputs[prediction_type]()

    def score(self, x_t: Tensor, a, s) -> Tensor:
        """``grad log p_t(x_t) = -E[eps | x_t] / s``."""
        _, eps = self.posterior_x0_eps(x_t, a, s)
        return -eps / _col(s, x_t)


def gaussian_ode_map(x: Tensor, gaussian: GaussianMixture, a_from, s_from, a_to, s_to) -> Tensor:
    """Exact probability-flow ODE map of a single Gaussian from ``(a_from, s_from)`` to ``(a_to, s_to)``:
    the standardized value ``(x - a mu) / sqrt(a^2 var + s^2)`` is preserved per dimension."""
    assert gaussian.weights.numel() == 1
    mu = gaussian.means[0]
    x = x.double()
    z = (x - _col(a_from, x) * mu) / gaussian.marginal_variance(_col(a_from, x), _col(s_from, x)).sqrt()
    return _col(a_to, x) * mu + gaussian.marginal_variance(_col(a_to, x), _col(s_to, x)).sqrt() * z


def rk4_ode_solution(x: Tensor, mixture: GaussianMixture, a_from, s_from, a_to, s_to, num_steps: int = 400) -> Tensor:
    """Probability-flow ODE of any mixture, integrated with classical RK4 (reference for the samplers).

    Works in flow coordinates ``y = x / (a + s)``, ``r = s / (a + s)`` where ``y = (1 - r) x0 + r eps``
    and ``dy/dr = E[eps | y] - E[x0 | y]``; every (a, s) path with the same s/a is the same ODE.
    """
    x = x.double()
    a_from, s_from, a_to, s_to = (torch.as_tensor(v, dtype=torch.float64) for v in (a_from, s_from, a_to, s_to))
    r0, r1 = s_from / (a_from + s_from), s_to / (a_to + s_to)

    def velocity(y: Tensor, r: Tensor) -> Tensor:
        x0, eps = mixture.posterior_x0_eps(y, 1.0 - r, r)
        return eps - x0

    y = x / (a_from + s_from)
    h = (r1 - r0) / num_steps
    for k in range(num_steps):
        r = r0 + k * h
        k1 = velocity(y, r)
        k2 = velocity(y + 0.5 * h * k1, r + 0.5 * h)
        k3 = velocity(y + 0.5 * h * k2, r + 0.5 * h)
        k4 = velocity(y + h * k3, r + h)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y * (a_to + s_to)


def kl_gaussians_diag(mean_p: Tensor, var_p: Tensor, mean_q: Tensor, var_q: Tensor) -> Tensor:
    """``KL(N(mean_p, var_p) || N(mean_q, var_q))`` for diagonal covariances (autograd-friendly)."""
    return 0.5 * (var_p / var_q + (mean_p - mean_q) ** 2 / var_q - 1.0 - torch.log(var_p / var_q)).sum()
