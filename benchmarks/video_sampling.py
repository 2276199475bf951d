"""The video teacher's flow (a ``WanPipeline``), shared by its training (:mod:`benchmarks.train_video_teacher`) and
its sampling: the shifted flow times, the network's velocity call and the prompt embeddings; and a plain Euler
flow sampler on them, prompts as text.

Euler on the teacher's own shifted flow times: ``sigma_i = shift u_i / (1 + (shift - 1) u_i)`` on the uniform grid
``u = 1, 1 - 1/K, ..., 0`` (the shift read from the scheduler config's ``flow_shift``), the network called at
timestep ``1000 sigma`` as ``WanPipeline`` calls it; true CFG ``uncond + w (cond - uncond)`` against the empty
prompt in one batched forward; latents decoded as the pipeline decodes them (``z * latents_std + latents_mean``).
Clips come back (N, 3, T, H, W) in [-1, 1].
"""
from __future__ import annotations

import torch
from torch import Tensor

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default


def shifted_sigma(u: Tensor, shift: float) -> Tensor:
    """Wan's (SD3's) time shift of a flow time ``u`` in [0, 1]."""
    return shift * u / (1 + (shift - 1) * u)


@torch.no_grad()
def prompt_table(pipeline, captions: list[str]) -> Tensor:
    """``(len(captions) + 1, MAX_SEQUENCE_LENGTH, text width)``: each caption's embedding as ``WanPipeline`` computes it, the
    empty prompt (the pipeline's default negative prompt) last."""
    embeds, _ = pipeline.encode_prompt(captions + [""], do_classifier_free_guidance=False,
                                       max_sequence_length=MAX_SEQUENCE_LENGTH, device=torch.device("cpu"))
    return embeds.float()


def velocity(transformer, x: Tensor, sigma: Tensor, embeds: Tensor) -> Tensor:
    """The network's ``eps - x_0`` prediction at flow time ``sigma`` (timestep ``1000 sigma``, as Wan's schedulers pass it)."""
    return transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds, return_dict=False)[0]


def load_teacher(folder):
    """The ``WanPipeline`` in float32 (the folder stores fp16 weights), eval mode."""
    from diffusers import WanPipeline

    pipeline = WanPipeline.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def latent_shape(pipeline, num_samples: int, num_frames: int, size: int) -> tuple[int, ...]:
    vae = pipeline.vae.config
    return (num_samples, vae.z_dim, (num_frames - 1) // vae.scale_factor_temporal + 1,
            size // vae.scale_factor_spatial, size // vae.scale_factor_spatial)


def euler_sigmas(steps: int, shift: float) -> Tensor:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return shifted_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


@torch.no_grad()
def euler_flow(transformer, noise: Tensor, embeds: Tensor, null: Tensor, steps: int, cfg: float, shift: float) -> Tensor:
    """Latents from ``noise`` in ``steps`` Euler steps; ``embeds`` (N, L, D) the prompts, ``null`` (1, L, D) the empty one."""
    sigmas = euler_sigmas(steps, shift)
    x = noise.float()
    n = x.shape[0]
    both = torch.cat([embeds, null.expand(n, -1, -1)]) if cfg != 1.0 else embeds
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = s.expand(n)
        if cfg == 1.0:
            v = velocity(transformer, x, t, both)
        else:
            v_cond, v_uncond = velocity(transformer, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            v = v_uncond + cfg * (v_cond - v_uncond)
        x = x + (s_next - s) * v
    return x


@torch.no_grad()
def decode(pipeline, latents: Tensor, batch_size: int = 100) -> Tensor:
    vae = pipeline.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    out = [vae.decode((latents[s : s + batch_size] * std + mean).to(vae.dtype)).sample.float()
           for s in range(0, latents.shape[0], batch_size)]
    return torch.cat(out).clamp(-1, 1)


@torch.no_grad()
def sample_clips(pipeline, prompts: list[str], noise: Tensor, steps: int, cfg: float, batch_size: int = 100) -> Tensor:
    """Decoded clips for ``prompts`` (one per row of ``noise``)."""
    if len(prompts) != noise.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {noise.shape[0]} noise samples: pass one prompt per sample")
    distinct = sorted(set(prompts))
    table = prompt_table(pipeline, distinct)  # the empty prompt last
    rows = torch.tensor([distinct.index(p) for p in prompts])
    shift = float(pipeline.scheduler.config.flow_shift)
    latents = [euler_flow(pipeline.transformer, noise[s : s + batch_size], table[rows[s : s + batch_size]], table[-1:],
                          steps, cfg, shift) for s in range(0, len(prompts), batch_size)]
    return decode(pipeline, torch.cat(latents))


__all__ = ["MAX_SEQUENCE_LENGTH", "decode", "euler_flow", "euler_sigmas", "latent_shape", "load_teacher", "prompt_table", "sample_clips",
           "shifted_sigma", "velocity"]
