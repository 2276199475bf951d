"""Model outputs -> ``(x0_hat, eps_hat)`` for ``x_t = a x0 + s eps``, and back.

Prediction types follow diffusers' names: ``epsilon``, ``v_prediction``, ``sample`` (x0) and
``flow`` (velocity ``u = eps - x0`` of rectified flow, where ``a + s = 1``).
"""
from __future__ import annotations

from torch import Tensor

from .schedules import expand_like

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def x0_eps_from_output(output: Tensor, x_t: Tensor, a: Tensor, s: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    # METHOD.md "Notation": every sampler and loss works on (x0_hat, eps_hat)
    check_prediction_type(prediction_type)
    a, s = expand_like(a, x_t), expand_like(s, x_t)
    if prediction_type == "epsilon":
        return (x_t - s * output) / a, output
    if prediction_type == "v_prediction":  # v = a eps - s x0, valid for a^2 + s^2 = 1
        return a * x_t - s * output, s * x_t + a * output
    if prediction_type == "flow":  # u = eps - x0, valid for a + s = 1
        return x_t - s * output, x_t + a * output
    return output, (x_t - a * output) / s


def output_from_x0_eps(x0: Tensor, eps: Tensor, a: Tensor, s: Tensor, prediction_type: str) -> Tensor:
    """Inverse of :func:`x0_eps_from_output` (what a network of that type should have said)."""
    check_prediction_type(prediction_type)
    a, s = expand_like(a, x0), expand_like(s, x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "flow":
        return eps - x0
    return x0
