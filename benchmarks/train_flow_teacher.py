"""Trains the flow teacher: a tiny Flux-architecture ``FluxPipeline`` folder, rectified flow on the shapes data.

    python -m benchmarks.train_flow_teacher [--output benchmarks/assets/flow_teacher] [--iterations 4000] [--check]

The flow-matching counterpart of :mod:`benchmarks.train_text_teacher`, for the families users distil today
(Flux, SD3, Qwen-Image, Z-Image, Wan are all rectified flows). It reuses the committed shapes teacher's
tokenizer, CLIP text encoder and VAE (frozen) and trains only a ``FluxTransformer2DModel`` (~1.6 M
parameters: 2 double-stream and 2 single-stream blocks, width 128) on their latents; the T5 slot holds a
seeded random ``T5EncoderModel`` (frozen, 64 wide) whose hidden states the transformer learns to read, the
CLIP pooled output is Flux's pooled input. No guidance embedding: the teacher is sampled with true CFG
(empty prompt), as a de-distilled Flux, SD3 or Qwen-Image is. Its native size is the VAE's ``sample_size``
(32 px), which the Flux family reads as Flux.1's VAE config gives 1024.

Training: ``x_t = (1 - sigma) x_0 + sigma eps`` with ``sigma`` the model's own shifted flow time of a uniform
``t``, the network predicts ``eps - x_0`` (the flow velocity, diffusers' convention), plain MSE; 10 % of
captions dropped to the empty prompt; AdamW with warm-up and cosine decay, EMA weights saved. The scheduler
config is Flux.1-dev's (dynamic shift from the token count: 16 tokens here, shift 1.58), so the trainer's
Flux family computes the same schedule it trained on. Deterministic for a seed and thread count.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.teacher_fit import fit, folder_size, num_parameters, warmup_cosine
from benchmarks.train_text_teacher import DEFAULT_OUTPUT as SHAPES_TEACHER
from tdm_core.atomic import atomic_folder

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "assets" / "flow_teacher"
T5_DIM = 64
WIDTH, HEADS = 128, 4
# Flux.1-dev's scheduler config
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                        base_image_seq_len=256, max_image_seq_len=4096)


def build_t5(tokenizer, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(d_model=T5_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=len(tokenizer),
                                   relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=tokenizer.pad_token_id)).eval().requires_grad_(False)


def build_transformer(latent_channels: int, pooled_dim: int):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=latent_channels * 4, num_layers=2, num_single_layers=2, attention_head_dim=WIDTH // HEADS,
        num_attention_heads=HEADS, joint_attention_dim=T5_DIM, pooled_projection_dim=pooled_dim, guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


def load_shapes_parts(shapes_folder: Path):
    """The shapes teacher's pipeline: its tokenizer, CLIP text encoder and VAE are reused, frozen."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(shapes_folder), local_files_only=True, safety_checker=None)


def assemble(transformer, shapes, seed: int):
    """The FluxPipeline around ``transformer``: the shapes teacher's tokenizer, CLIP and VAE, a seeded T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    shapes.vae.register_to_config(shift_factor=0.0)  # FluxPipeline adds the VAE's shift factor; the shapes VAE has none
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=shapes.vae.float(),
                        text_encoder=shapes.text_encoder.float(), tokenizer=shapes.tokenizer,
                        text_encoder_2=build_t5(shapes.tokenizer, seed), tokenizer_2=shapes.tokenizer, transformer=transformer)


def train_transformer(family, latent_mean, latent_std, caption_index, captions: list[str], iterations: int,
                      batch_size: int, seed: int, lr: float = 5e-4, cond_drop: float = 0.1, ema_decay: float = 0.999,
                      log=print):
    """Rectified flow on the scaled latents through ``family.denoise`` (the trainer's own packing and timesteps)."""
    from tdm_core.schedules import expand_like

    network = family.network
    network.requires_grad_(True).train()
    generator = torch.Generator().manual_seed(seed + 1)
    cond = family.encode_prompts(captions + [""])  # every distinct caption once, the empty prompt last
    empty_row = len(captions)

    def step_loss(step: int):
        idx = torch.randint(0, latent_mean.shape[0], (batch_size,), generator=generator)
        x0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator)
        rows = torch.where(torch.rand(batch_size, generator=generator) < cond_drop, empty_row, caption_index[idx])
        t = torch.rand(batch_size, generator=generator, dtype=torch.float64) * family.num_timesteps
        a, s = family.schedule.alpha_sigma(t)
        eps = torch.randn(x0.shape, generator=generator)
        x_t = (expand_like(a, x0) * x0 + expand_like(s, x0) * eps).float()
        pred = family.denoise(x_t, t.float(), {k: v[rows] for k, v in cond.items()})
        loss = (pred - (eps - x0)).pow(2).mean()
        return loss, {"loss": loss.item()}

    return fit(network.parameters(), step_loss, iterations, lr, warmup_cosine(iterations, 100, floor=0.0), ema_of=[network],
               ema_decay=ema_decay, name="flow transformer", log=log)[0]


def build_teacher(output: Path, iterations: int = 4000, batch_size: int = 64, seed: int = 0, shapes_folder: Path = SHAPES_TEACHER,
                  log=print) -> dict:
    from benchmarks.shapes_data import all_captions, load_shapes_split
    from benchmarks.train_text_teacher import encode_images
    from training.families.flux import FluxFamily

    start, cpu_start = time.perf_counter(), time.process_time()
    shapes = load_shapes_parts(shapes_folder)
    torch.manual_seed(seed)
    transformer = build_transformer(shapes.vae.config.latent_channels, shapes.text_encoder.config.hidden_size)
    pipeline = assemble(transformer, shapes, seed)
    family = FluxFamily(pipeline, source_path=str(output))  # native size: the VAE's sample_size, the data's 32 px
    train = load_shapes_split("train")
    mean, std = encode_images(pipeline.vae, train.images)
    scale, shift = pipeline.vae.config.scaling_factor, pipeline.vae.config.get("shift_factor") or 0.0
    captions = all_captions()
    row_of = {c: i for i, c in enumerate(captions)}
    caption_index = torch.tensor([row_of[c] for c in train.captions])
    log(f"flow transformer: {num_parameters(family.network) / 1e6:.3f} M parameters, {iterations} iterations of batch {batch_size}; "
        f"shift {family.schedule.shift:.3f} for {(train.images.shape[-1] // family.vae_scale_factor // 2) ** 2} tokens")
    ema = train_transformer(family, (mean - shift) * scale, std * scale, caption_index, captions, iterations, batch_size, seed, log=log)
    pipeline.transformer = ema.half()  # transformer and VAE stored in fp16 (half the size); load_family upcasts them
    pipeline.vae.half()
    with atomic_folder(output) as tmp:
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
    elapsed = time.perf_counter() - start
    return {"total_s": elapsed, "cpu_s": time.process_time() - cpu_start, "size_bytes": folder_size(output)}


def main(argv=None) -> int:
    from benchmarks.text_metrics import add_check_arguments, check_unless_told_not, checked_output

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_check_arguments(parser, DEFAULT_OUTPUT)
    parser.add_argument("--iterations", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.batch_size < 2:
        parser.error("--iterations must be at least 1 and --batch-size at least 2")
    output = checked_output(parser, args)
    if not (SHAPES_TEACHER / "model_index.json").is_file():
        parser.error(f"the shapes teacher {SHAPES_TEACHER} is missing: build it with `python -m benchmarks.train_text_teacher`")
    torch.set_num_threads(args.threads)
    if not args.check_only:
        stats = build_teacher(output, args.iterations, args.batch_size, args.seed)
        print(f"teacher written to {output} ({stats['size_bytes'] / 1e6:.2f} MB); build time {stats['total_s'] / 60:.1f} min, "
              f"CPU time {stats['cpu_s'] / 60:.1f} min with {args.threads} thread(s)")
    check_unless_told_not(args, output)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
