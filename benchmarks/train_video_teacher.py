"""Trains the video teacher: a tiny Wan-architecture text-to-video ``WanPipeline`` folder on moving shapes.

    python -m benchmarks.train_video_teacher [--output benchmarks/assets/video_teacher] [--iterations N] [--vae-iterations N]
        [--vae-batch-size N] [--check]

Data: :mod:`benchmarks.video_data` (9-frame 32x32 clips, "a red circle moving right"). The folder is a plain
diffusers ``WanPipeline`` (``save_pretrained``), so anything that loads a Wan 2.1 text-to-video folder loads it:

1. tokenizer: the shapes teacher's ``CLIPTokenizer`` (every shapes caption word is one token; "moving", "up",
   "down" fall back to bytes), as :mod:`benchmarks.train_flow_teacher` reuses the shapes teacher's parts;
2. text encoder: a seeded random ``UMT5EncoderModel`` (64 wide, 2 layers), frozen. Prompts go through the
   pipeline's own ``encode_prompt`` at Wan's default ``max_sequence_length`` (512: the real tokens, then
   zeros), so the transformer learns exactly the conditioning ``WanPipeline.__call__`` gives it;
3. VAE: an ``AutoencoderKLWan`` (base 8 channels, dim_mult 1/2/4, both downsamples temporal: 9x32x32 RGB ->
   3x8x8x8, the 1 + 4k frame layout of Wan's VAE), trained first (MSE + a small KL; 3,000 iterations of batch 8:
   shorter runs stay on a plateau that paints the background and loses colour, benchmarks/README.md). Its config's
   ``latents_mean`` / ``latents_std`` are the per-channel mean and std of the training latents, as the
   real Wan VAE config carries them: ``WanPipeline`` decodes ``latents * std + mean``, so the transformer
   works on ``(z - mean) / std``;
4. transformer: a ``WanTransformer3DModel`` (patch 1x2x2, 48 tokens a clip, width 128, 3 blocks), a
   rectified flow on those latents: ``x_t = (1 - sigma) x_0 + sigma eps``, the network predicts
   ``eps - x_0`` at timestep ``1000 sigma``, ``sigma = shift u / (1 + (shift - 1) u)`` of a uniform ``u``
   with ``FLOW_SHIFT``; 10 % of captions dropped to the empty prompt (true CFG, the negative prompt
   ``WanPipeline`` uses by default); AdamW, warm-up and cosine decay, EMA weights saved.

Scheduler: the one Wan 2.1 ships in diffusers, ``UniPCMultistepScheduler`` (``prediction_type
"flow_prediction"``, ``use_flow_sigmas``, ``flow_shift`` = ``FLOW_SHIFT``): its timesteps are ``1000 sigma`` of
the same shifted sigmas. Transformer and VAE are stored in fp16 (half the size); load them with
``dtype=torch.float32`` on a CPU. The folder is written under a temporary name and renamed into place.
``--check`` (on by default; ``--check-only`` for an existing folder) samples 50- and 4-step Euler at CFG 1 and
``--check-cfg`` and prints :mod:`benchmarks.video_metrics`. Deterministic for a seed and thread count.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.teacher_fit import fit, fit_vae, folder_size, num_parameters, warmup_cosine
from benchmarks.train_text_teacher import DEFAULT_OUTPUT as SHAPES_TEACHER
from benchmarks.train_text_teacher import load_tokenizer
from benchmarks.video_sampling import prompt_table, shifted_sigma, velocity
from tdm_core.atomic import atomic_folder

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "assets" / "video_teacher"
FLOW_SHIFT = 3.0
TEXT_DIM = 64
Z_DIM = 8
VAE_CONFIG = dict(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 4], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[True, True], scale_factor_temporal=4, scale_factor_spatial=4)
TRANSFORMER_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=Z_DIM,
                          out_channels=Z_DIM, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=256, num_layers=3,
                          cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                        flow_shift=FLOW_SHIFT)


# --- models ----------------------------------------------------------------------------------------
def build_text_encoder(tokenizer, seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=0)
    return UMT5EncoderModel(config).eval().requires_grad_(False)


def build_vae(latents_mean=None, latents_std=None):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**VAE_CONFIG, latents_mean=list(latents_mean or [0.0] * Z_DIM),
                            latents_std=list(latents_std or [1.0] * Z_DIM))


def build_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**TRANSFORMER_CONFIG)


def assemble(tokenizer, text_encoder, vae, transformer):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG))


# --- training --------------------------------------------------------------------------------------
def train_vae(clips: torch.Tensor, iterations: int, batch_size: int, seed: int, log=print):
    """:func:`benchmarks.teacher_fit.fit_vae` on the posterior mean, not a sample: with a sampled latent (the
    shapes VAE's recipe) the posterior noise was 36 % of the latents' spread and 500 iterations left the decoded
    clips blurred and colourless (MSE 0.029, red and green lost)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    return fit_vae(build_vae(), clips, iterations, batch_size, generator, sample_posterior=False, log_every=100, log=log)


@torch.no_grad()
def encode_clips(vae, clips: torch.Tensor, batch_size: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every clip (unnormalised latents, (N, Z, T', H', W'))."""
    parts = [vae.encode(clips[s : s + batch_size]).latent_dist for s in range(0, clips.shape[0], batch_size)]
    return torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts])


def channel_stats(latents: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over clips, frames and pixels: the VAE config's ``latents_mean`` / ``latents_std``."""
    flat = latents.transpose(0, 1).reshape(latents.shape[1], -1).double()
    return [round(float(v), 5) for v in flat.mean(1)], [round(float(v), 5) for v in flat.std(1)]


def train_transformer(latents, caption_index, table, iterations: int, batch_size: int, seed: int,
                      lr: float = 1e-3, cond_drop: float = 0.1, ema_decay: float = 0.999, log=print):
    """Rectified flow on the normalised posterior-mean latents (N, Z, T', H', W'); returns the EMA transformer."""
    torch.manual_seed(seed)
    network = build_transformer().train()
    generator = torch.Generator().manual_seed(seed + 1)
    empty_row = table.shape[0] - 1

    def step_loss(step: int):
        idx = torch.randint(0, latents.shape[0], (batch_size,), generator=generator)
        x0 = latents[idx]
        rows = torch.where(torch.rand(batch_size, generator=generator) < cond_drop, empty_row, caption_index[idx])
        sigma = shifted_sigma(torch.rand(batch_size, generator=generator), FLOW_SHIFT)
        eps = torch.randn(x0.shape, generator=generator)
        s = sigma.view(-1, 1, 1, 1, 1)
        loss = (velocity(network, (1 - s) * x0 + s * eps, sigma, table[rows]) - (eps - x0)).pow(2).mean()
        return loss, {"loss": loss.item()}

    return fit(network.parameters(), step_loss, iterations, lr, warmup_cosine(iterations, 100, floor=0.0), ema_of=[network],
               ema_decay=ema_decay, name="wan transformer", log=log)[0]


def build_teacher(output: Path, vae_iterations: int = 3000, iterations: int = 1500, batch_size: int = 32,
                  vae_batch_size: int = 8, seed: int = 0, shapes_folder: Path = SHAPES_TEACHER, train=None,
                  vae_from: Path | None = None, log=print) -> dict:
    """The whole build; ``train`` (a :class:`benchmarks.video_data.VideoSplit`) defaults to the training split.
    ``vae_from``: a video teacher folder whose (fp16-stored) VAE is taken instead of training one, so only the
    transformer trains. Returns wall-clock timings, this process's CPU time and the folder size."""
    from benchmarks.video_data import all_captions, load_video_split

    start, cpu_start = time.perf_counter(), time.process_time()
    train = load_video_split("train") if train is None else train
    tokenizer = load_tokenizer(Path(shapes_folder) / "tokenizer")
    text_encoder = build_text_encoder(tokenizer, seed)
    if vae_from is None:
        log(f"vae: {num_parameters(build_vae()) / 1e6:.3f} M parameters, {vae_iterations} iterations of batch {vae_batch_size}")
        vae = train_vae(train.clips, vae_iterations, vae_batch_size, seed, log=log)
    else:
        from diffusers import AutoencoderKLWan

        log(f"vae: taken from {vae_from}, not trained")
        vae = AutoencoderKLWan.from_pretrained(str(Path(vae_from) / "vae"), dtype=torch.float32, local_files_only=True).eval().requires_grad_(False)
    vae_s = time.perf_counter() - start
    mean, _ = encode_clips(vae, train.clips)
    latents_mean, latents_std = channel_stats(mean)
    vae.register_to_config(latents_mean=latents_mean, latents_std=latents_std)
    m = torch.tensor(latents_mean).view(1, -1, 1, 1, 1)
    s = torch.tensor(latents_std).view(1, -1, 1, 1, 1)
    pipeline = assemble(tokenizer, text_encoder, vae, build_transformer())
    captions = all_captions()
    row_of = {c: i for i, c in enumerate(captions)}
    caption_index = torch.tensor([row_of[c] for c in train.captions])
    table = prompt_table(pipeline, captions)
    log(f"wan transformer: {num_parameters(pipeline.transformer) / 1e6:.3f} M parameters, {iterations} iterations of batch "
        f"{batch_size}; latents {tuple(mean.shape[1:])}, flow shift {FLOW_SHIFT}")
    ema = train_transformer((mean - m) / s, caption_index, table, iterations, batch_size, seed, log=log)
    pipeline.transformer = ema.half()
    pipeline.vae.half()
    with atomic_folder(output) as tmp:
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
    elapsed = time.perf_counter() - start
    return {"total_s": elapsed, "vae_s": vae_s, "cpu_s": time.process_time() - cpu_start, "size_bytes": folder_size(output)}


def main(argv=None) -> int:
    from benchmarks.text_metrics import add_check_arguments, checked_output

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_check_arguments(parser, DEFAULT_OUTPUT)
    parser.add_argument("--vae-iterations", type=int, default=3000)
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--vae-batch-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="a video teacher folder whose VAE to reuse (only the transformer trains; --vae-* are ignored)")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.vae_iterations < 1 or args.batch_size < 2 or args.vae_batch_size < 1:
        parser.error("--iterations and --vae-iterations must be at least 1, --batch-size at least 2, --vae-batch-size at least 1")
    output = checked_output(parser, args)
    if args.vae_from is not None and not (args.vae_from / "vae" / "config.json").is_file():
        parser.error(f"--vae-from {args.vae_from} holds no vae/config.json: give a video teacher folder (one this script wrote)")
    if not (SHAPES_TEACHER / "tokenizer").is_dir():
        parser.error(f"the shapes teacher {SHAPES_TEACHER} is missing: build it with `python -m benchmarks.train_text_teacher`")
    torch.set_num_threads(args.threads)
    if not args.check_only:
        stats = build_teacher(output, args.vae_iterations, args.iterations, args.batch_size, args.vae_batch_size, seed=args.seed,
                              vae_from=args.vae_from)
        print(f"teacher written to {output} ({stats['size_bytes'] / 1e6:.2f} MB); build time {stats['total_s'] / 60:.1f} min "
              f"(VAE {stats['vae_s'] / 60:.1f} min), CPU time {stats['cpu_s'] / 60:.1f} min with {args.threads} thread(s)")
    if not args.no_check:
        from benchmarks.video_metrics import check_teacher

        check_teacher(output, num_samples=args.check_samples, cfg=args.check_cfg, log=print)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
