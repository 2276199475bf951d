"""Trains the shapes teacher: a complete, tiny diffusers ``StableDiffusionPipeline`` folder.

    python -m benchmarks.train_text_teacher [--output benchmarks/assets/shapes_teacher] [--check]

Data: :mod:`benchmarks.shapes_data` (procedural coloured shapes with captions, 32x32 RGB). The
script builds, in order and with nothing downloaded:

1. a ``CLIPTokenizer`` whose byte-level BPE vocabulary (``vocab.json``, ``merges.txt``) it learns
   itself from the caption words, so every caption word is one token and any other text still
   tokenizes (byte fallback);
2. an ``AutoencoderKL`` (downsample factor 4, 4 latent channels: 32x32x3 -> 8x8x4), trained briefly
   on the training split (MSE + a small KL term), with its ``scaling_factor`` set to 1 / std of the
   training latents as SD's VAE does;
3. a tiny ``CLIPTextModel`` (kept at its seeded random initialisation: a fixed, deterministic text
   embedding the UNet learns to read) and a ``UNet2DConditionModel`` (~1.5 M parameters, cross-attention
   at 8x8 and 4x4), trained on the latents: eps prediction, SD1.5's schedule (scaled_linear betas
   0.00085..0.012, 1000 steps), 10% of captions dropped to the empty prompt for classifier-free
   guidance, EMA weights saved. The eps-MSE of each sample is weighted by ``max(1, 0.1 / SNR_t)``
   (``SNR_FLOOR``; normalised to mean 1 over t): plain eps-MSE gives the high-noise steps, where the
   layout is decided, almost no weight, and a teacher trained with it ignored "on the left" / "at the
   top" (position accuracy at chance, 0.26, after 2,500 iterations; continuing 600 iterations with this
   weighting: 0.97, without it: 0.62). Measured with the 500-sample check below (FD / all three
   attributes right, 50-step DDIM at CFG 3): text encoder trained jointly, 2,500 iterations: 244 / 0.71;
   frozen, 4,000 iterations (the default): 119 / 0.99, built in 17 min with one thread;
4. the folder (``model_index.json`` with ``safety_checker``/``feature_extractor`` null, a
   ``PNDMScheduler`` config like SD1.5's, fp16 safetensors), written under a temporary name and
   renamed into place.

``--check`` (on by default after training; ``--check-only`` for an existing folder) samples the
saved folder through ``training.models.load_family`` and prints FD / attribute accuracy of its
50-step and 4-step DDIM samples (:mod:`benchmarks.text_metrics`). Deterministic for a seed and
thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks.shapes_data import all_captions, caption_words, load_shapes_split
from benchmarks.teacher_fit import fit, fit_vae, folder_size, num_parameters, warmup_cosine
from tdm_core.schedules import expand_like
from tdm_core.atomic import atomic_folder

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "assets" / "shapes_teacher"
MAX_TOKENS = 16  # <|startoftext|> + 6 caption words + <|endoftext|> fits with room to spare
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
TEXT_DIM = 64
LATENT_CHANNELS = 4
SNR_FLOOR = 0.1

# SD1.5's scheduler config (PNDM, scaled_linear betas), the schedule the teacher is trained on
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}


# --- tokenizer -------------------------------------------------------------------------------------
def _word_symbols(word: str) -> tuple[str, ...]:
    return tuple(word[:-1]) + (word[-1] + END_OF_WORD,)


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_bpe_merges(word_counts: dict[str, int]) -> list[tuple[str, str]]:
    """Byte-pair encoding learnt on ``word_counts`` until every word is one symbol: repeatedly merge the
    most frequent adjacent pair (ties: the lexicographically smallest pair, so the result is deterministic)."""
    for word in word_counts:
        if not word.isascii() or not word.isalpha() or not word.islower():
            raise ValueError(f"caption word {word!r} is not lower-case ASCII letters (the byte-level alphabet maps those to themselves)")
    segmented = {word: _word_symbols(word) for word in word_counts}
    merges = []
    while True:
        counts: Counter = Counter()
        for word, symbols in segmented.items():
            for pair in zip(symbols, symbols[1:]):
                counts[pair] += word_counts[word]
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        segmented = {word: _merge_pair(symbols, best) for word, symbols in segmented.items()}


def tokenizer_files(words: list[str] | None = None) -> dict[str, str]:
    """The text of ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``
    for the caption vocabulary (a pure function of the captions)."""
    from tokenizers.pre_tokenizers import ByteLevel

    if words is None:
        counts = Counter(word for text in all_captions() for word in text.split())
    else:
        counts = Counter(words)
    merges = learn_bpe_merges(dict(counts))
    alphabet = sorted(ByteLevel.alphabet())  # the 256 byte symbols: any text still tokenizes
    tokens = alphabet + [c + END_OF_WORD for c in alphabet]
    for left, right in merges:
        if left + right not in tokens:
            tokens.append(left + right)
    tokens += [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,  # SD1.5 pads with the end token
        "unk_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, indent=0) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def write_tokenizer(folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files().items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


# --- models ----------------------------------------------------------------------------------------
def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_DIM, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=32, mid_block_add_attention=False,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=16,
    )


# --- training --------------------------------------------------------------------------------------
def train_vae(images: torch.Tensor, iterations: int, batch_size: int, seed: int, log=print):
    """:func:`benchmarks.teacher_fit.fit_vae` on a posterior sample; returns the VAE in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    return fit_vae(build_vae(), images, iterations, batch_size, generator, sample_posterior=True, log=log)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled latents)."""
    means, stds = [], []
    for start in range(0, images.shape[0], batch_size):
        posterior = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_unet(latent_mean: torch.Tensor, latent_std: torch.Tensor, caption_index: torch.Tensor, prompt_ids: torch.Tensor,
               text_encoder, iterations: int, batch_size: int, seed: int, train_text_encoder: bool = False,
               lr: float = 1e-3, cond_drop: float = 0.1, ema_decay: float = 0.999, snr_floor: float | None = SNR_FLOOR,
               log=print):
    """DDPM eps-prediction on scaled latents, eps-MSE weighted by ``max(1, snr_floor / SNR_t)`` (plain eps-MSE
    when ``snr_floor`` is None). ``prompt_ids`` (P + 1, L): the distinct captions, the last row
    the empty prompt; ``caption_index`` (N,) row of each image. Returns the EMA UNet and text encoder."""
    from training.families.pipeline_family import schedule_from_scheduler_config

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    schedule = schedule_from_scheduler_config(SCHEDULER_CONFIG)
    # per-sample weight on the eps-MSE (see the module docstring), divided by its mean over t
    abar = schedule.alphas_cumprod
    weights = torch.ones_like(abar) if snr_floor is None else (snr_floor * (1 - abar) / abar).clamp(min=1.0)
    weights = (weights / weights.mean()).float()
    unet = build_unet()
    empty_row = prompt_ids.shape[0] - 1
    text_encoder.requires_grad_(train_text_encoder).train(train_text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text_encoder else [])

    def step_loss(step: int):
        idx = torch.randint(0, latent_mean.shape[0], (batch_size,), generator=generator)
        z = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator)
        rows = torch.where(torch.rand(batch_size, generator=generator) < cond_drop, empty_row, caption_index[idx])
        t = torch.randint(0, schedule.num_timesteps, (batch_size,), generator=generator)
        a, s = schedule.alpha_sigma(t)
        eps = torch.randn(z.shape, generator=generator)
        x_t = (expand_like(a, z) * z + expand_like(s, z) * eps).float()
        # the distinct prompts go through the text encoder once per step, then each image takes its row
        with torch.set_grad_enabled(train_text_encoder):
            table = text_encoder(prompt_ids).last_hidden_state
        pred = unet(x_t, t.float(), encoder_hidden_states=table[rows]).sample
        loss = (weights[t] * (pred - eps).pow(2).mean((1, 2, 3))).mean()
        return loss, {"loss": loss.item()}

    emas = fit(params, step_loss, iterations, lr, warmup_cosine(iterations, 100),
               ema_of=[unet] + ([text_encoder] if train_text_encoder else []), ema_decay=ema_decay, name="unet", log=log)
    ema_text = emas[1] if train_text_encoder else text_encoder.eval().requires_grad_(False)
    return emas[0], ema_text


# --- the folder ------------------------------------------------------------------------------------
def save_pipeline(output: Path, vae, text_encoder, unet) -> Path:
    """Writes the StableDiffusionPipeline folder under a temporary name beside ``output``, then swaps it in.

    UNet and VAE are stored in fp16 (half the size), the 0.14 M-parameter text encoder in fp32: diffusers
    loads fp16 weights as fp32 unless told otherwise, transformers keeps the stored dtype, so this way a
    plain ``StableDiffusionPipeline.from_pretrained(folder)`` comes out all fp32."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    with atomic_folder(output) as tmp:
        tokenizer = load_tokenizer(write_tokenizer(tmp / "_tokenizer"))
        config = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=PNDMScheduler(**config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        unet.half()
        vae.half()
        text_encoder.float()
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
        unet.float()
        vae.float()
        # the tokenizer folder holds exactly the files this script writes (SD1.5's layout)
        shutil.rmtree(tmp / "tokenizer")
        os.replace(tmp / "_tokenizer", tmp / "tokenizer")
    return Path(output)


def build_teacher(output: Path, vae_iterations: int = 1200, iterations: int = 4000, batch_size: int = 64, seed: int = 0,
                  train_text_encoder: bool = False, log=print) -> dict:
    """The whole build; returns wall-clock timings, the CPU time of this process and the folder size."""
    timings = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    train = load_shapes_split("train")
    tmp_tok = Path(tempfile.mkdtemp(prefix="shapes-tokenizer-"))
    try:
        tokenizer = load_tokenizer(write_tokenizer(tmp_tok))
    finally:
        shutil.rmtree(tmp_tok, ignore_errors=True)
    captions = all_captions()
    prompt_ids = tokenize(tokenizer, captions + [""])
    row_of = {c: i for i, c in enumerate(captions)}
    caption_index = torch.tensor([row_of[c] for c in train.captions])
    timings["data_s"] = time.perf_counter() - start

    log(f"VAE: {num_parameters(build_vae()) / 1e6:.3f} M parameters, {vae_iterations} iterations of batch {batch_size // 2}")
    t0 = time.perf_counter()
    vae = train_vae(train.images, vae_iterations, max(1, batch_size // 2), seed, log=log)
    mean, std = encode_images(vae, train.images)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    timings["vae_s"] = time.perf_counter() - t0
    log(f"VAE trained in {timings['vae_s']:.0f} s; latent std {mean.std():.3f} -> scaling_factor {scaling:.4f}")

    torch.manual_seed(seed)
    text_encoder = build_text_encoder(tokenizer)
    log(f"UNet: {num_parameters(build_unet()) / 1e6:.3f} M parameters; text encoder: {num_parameters(text_encoder) / 1e6:.3f} M "
        f"({'trained jointly' if train_text_encoder else 'frozen at its random initialisation'}); {iterations} iterations of batch {batch_size}")
    t0 = time.perf_counter()
    unet, text_encoder = train_unet(mean * scaling, std * scaling, caption_index, prompt_ids, text_encoder, iterations,
                                    batch_size, seed, train_text_encoder=train_text_encoder, log=log)
    timings["unet_s"] = time.perf_counter() - t0
    save_pipeline(output, vae, text_encoder, unet)
    timings["total_s"] = time.perf_counter() - start
    timings["cpu_s"] = time.process_time() - cpu_start
    return {**timings, "size_bytes": folder_size(output)}


def main(argv=None) -> int:
    from benchmarks.text_metrics import add_check_arguments, check_unless_told_not, checked_output

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_check_arguments(parser, DEFAULT_OUTPUT)
    parser.add_argument("--vae-iterations", type=int, default=1200)
    parser.add_argument("--iterations", type=int, default=4000, help="UNet (+ text encoder) iterations")
    parser.add_argument("--batch-size", type=int, default=64, help="UNet batch; the VAE uses half")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--train-text-encoder", action="store_true",
                        help="train the text encoder jointly (default: kept at its random initialisation, which drew better samples)")
    args = parser.parse_args(argv)
    if args.vae_iterations < 1 or args.iterations < 1 or args.batch_size < 2:
        parser.error("--vae-iterations and --iterations must be at least 1, --batch-size at least 2")
    output = checked_output(parser, args)
    torch.set_num_threads(args.threads)
    if not args.check_only:
        stats = build_teacher(output, args.vae_iterations, args.iterations, args.batch_size, args.seed,
                              train_text_encoder=args.train_text_encoder)
        print(f"teacher written to {output} ({stats['size_bytes'] / 1e6:.2f} MB); build time {stats['total_s'] / 60:.1f} min "
              f"(VAE {stats['vae_s']:.0f} s, UNet + text encoder {stats['unet_s']:.0f} s) with {args.threads} thread(s); "
              f"CPU time {stats['cpu_s'] / 60:.1f} min (wall time exceeds it when other jobs share the cores)")
    check_unless_told_not(args, output)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
