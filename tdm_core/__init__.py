"""TDM (Trajectory Distribution Matching) kernels in pure torch.

Hosts (the ComfyUI nodes, the diffusers-based trainer) call these; nothing here imports them.
Read top to bottom: ``schedules`` (x_t = a x0 + s eps), ``parameterization`` (model output ->
x0, eps), ``grids`` (the student's timesteps), ``samplers`` (the K-step student, DPM-Solver++),
``training`` (one TDM iteration: intervals, fake-score loss, generator target and distances).
"""
from .grids import diffusers_grid, parse_grid, reference_grid, tail_for_denoise
from .parameterization import PREDICTION_TYPES, output_from_x0_eps, x0_eps_from_output
from .samplers import rollout_tdm, sample_dpmpp_2m, sample_tdm, tdm_step
from .schedules import FlowSchedule, FlowSigmaSchedule, SigmaKSchedule, VPSchedule

__all__ = [
    "FlowSchedule",
    "FlowSigmaSchedule",
    "PREDICTION_TYPES",
    "SigmaKSchedule",
    "VPSchedule",
    "diffusers_grid",
    "output_from_x0_eps",
    "parse_grid",
    "reference_grid",
    "rollout_tdm",
    "sample_dpmpp_2m",
    "sample_tdm",
    "tail_for_denoise",
    "tdm_step",
    "x0_eps_from_output",
]
