"""One real-size training step with random weights: s / iteration and peak VRAM of ``training.distill``'s own
parts (``build_parts``, ``training.loop.tdm_iteration``) with ``--mixed-precision bf16 --gradient-checkpointing``
on the SD1.5, SDXL and Flux.1 architectures.

    python -m benchmarks.gpu_step --arch sd15,sdxl,flux --output benchmarks/RESULTS_gpu_step.md   # CUDA
    python -m benchmarks.gpu_step --tiny --device cpu --arch sd15,sdxl,flux --output /tmp/x.md     # smoke test

The denoiser is the shipped config's (``training/configs/<arch>``) at full size, built on the device with
random weights; the VAE is the shipped config's too. The text encoders are left out: their embeddings are
seeded random tensors of the real shapes (CLIP-L 77 x 768; SDXL 77 x 2048 and pooled 1280; Flux T5 512 x
4096 and pooled 768), since a text encoder runs once per prompt and never in the iteration. ``--tiny``
shrinks every config for a CPU check of the harness (``tests/test_benchmarks_smoke.py``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from tdm_core.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "training" / "configs"
FAMILY_PREFIX = "gpu_random_"
MB = 2**20
# arch -> (resolution, batch): the sizes users train at
SIZES = {"sd15": (512, 4), "sdxl": (1024, 1), "flux": (1024, 1)}
TINY = {
    "sd15": dict(block_out_channels=[8, 16], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1, norm_num_groups=4,
                 attention_head_dim=4, cross_attention_dim=16, sample_size=8),
    "sdxl": dict(block_out_channels=[8, 16], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1, norm_num_groups=4,
                 attention_head_dim=[2, 4], transformer_layers_per_block=[1, 1], cross_attention_dim=16,
                 addition_time_embed_dim=4, projection_class_embeddings_input_dim=40, sample_size=8),
    "flux": dict(attention_head_dim=16, axes_dims_rope=[4, 6, 6], joint_attention_dim=32, num_attention_heads=2,
                 num_layers=1, num_single_layers=1, pooled_projection_dim=16),
}
TINY_VAE = dict(block_out_channels=[8, 8, 8, 8], norm_num_groups=4, layers_per_block=1)
TINY_SIZES = {"sd15": (32, 2), "sdxl": (32, 1), "flux": (32, 1)}


def network_folder(arch: str) -> str:
    return "transformer" if arch == "flux" else "unet"


def load_config(arch: str, part: str, tiny: bool) -> dict:
    config = json.loads((CONFIGS / arch / part / "config.json").read_text())
    if tiny:
        config.update(TINY[arch] if part == network_folder(arch) else TINY_VAE)
    return config


def text_shapes(arch: str, network_config: dict, tiny: bool) -> dict:
    """Per prompt: the conditions' shapes the real text encoders give."""
    if arch == "flux":
        return {"encoder_hidden_states": (8 if tiny else 512, network_config["joint_attention_dim"]),
                "pooled_projections": (network_config["pooled_projection_dim"],)}
    shapes = {"encoder_hidden_states": (77, network_config["cross_attention_dim"])}
    if arch == "sdxl":
        shapes["text_embeds"] = (network_config["projection_class_embeddings_input_dim"] - 6 * network_config["addition_time_embed_dim"],)
    return shapes


def random_embeddings(prompts: list[str], shapes: dict, device, dtype) -> dict:
    """Seeded by each prompt's text: the same prompt always gets the same embedding."""
    rows = {key: [] for key in shapes}
    for prompt in prompts:
        gen = torch.Generator().manual_seed(int(hashlib.sha256(prompt.encode()).hexdigest()[:12], 16))
        for key, shape in shapes.items():
            rows[key].append(torch.randn(shape, generator=gen))
    return {key: torch.stack(value).to(device, dtype) for key, value in rows.items()}


def build_pipeline(arch: str, device, dtype, tiny: bool):
    """The arch's diffusers pipeline: denoiser and VAE from the shipped configs with random weights made on
    ``device``, the scheduler's config, no text encoders."""
    import diffusers
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to(dtype)

    index = json.loads((CONFIGS / arch / "model_index.json").read_text())
    net_part = network_folder(arch)
    with torch.device(device):
        network = getattr(diffusers, index[net_part][1]).from_config(load_config(arch, net_part, tiny)).to(dtype)
        vae = diffusers.AutoencoderKL.from_config(load_config(arch, "vae", tiny)).to(dtype)
    scheduler_config = json.loads((CONFIGS / arch / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, index["scheduler"][1]).from_config(scheduler_config)
    if arch == "flux":  # FluxFamily reads the T5 length from its tokenizer: one with no vocabulary to speak of
        word_level = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, model_max_length=8 if tiny else 512)
        return diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                      tokenizer_2=tokenizer, transformer=network)
    if arch == "sdxl":
        return diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                                   unet=network, scheduler=scheduler)
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=network, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def family_class(arch: str):
    """The trainer's own family class of ``arch`` with random text embeddings in place of the encoders."""
    from training.models import _family_class

    base = _family_class(arch)

    class RandomTextFamily(base):
        def _encode_batch(self, prompts):
            return {**random_embeddings(prompts, self.text_shapes, self.device, self.dtype),
                    **({"time_ids": self._time_ids(len(prompts))} if arch == "sdxl" else {})}

        def _time_ids(self, batch_size, size=None):  # SDXL: the pipeline's own ids, with the pooled width of the config
            size = size or (self.resolution, self.resolution)
            ids = self.pipeline._get_add_time_ids(size, (0, 0), size, dtype=self.dtype,
                                                  text_encoder_projection_dim=self.text_shapes["text_embeds"][0])
            return ids.to(self.device).expand(batch_size, -1)

    return RandomTextFamily


def load_random_family(model_path, device="cpu", dtype=torch.float32, config_path=None):
    settings = json.loads((Path(model_path) / "tdm_family.json").read_text())
    arch, tiny = settings["arch"], bool(settings.get("tiny"))
    pipeline = build_pipeline(arch, device, dtype, tiny)
    cls = family_class(arch)
    cls.text_shapes = text_shapes(arch, dict(getattr(pipeline, network_folder(arch)).config), tiny)
    return cls(pipeline, device=device, dtype=dtype, source_path=str(model_path))


def register() -> None:
    from training.models import register_family

    for arch in SIZES:
        register_family(FAMILY_PREFIX + arch, load_random_family)


def measure(arch: str, work: Path, device: str, tiny: bool, iterations: int) -> dict:
    """Build the trainer's parts on the random model (bf16, gradient checkpointing, K 4, CFG 2) and time
    ``iterations`` iterations after one warm-up."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from benchmarks.speed import lora_step, time_iterations
    from training.config import parse_config
    from training.distill import build_parts

    register()
    resolution, batch = (TINY_SIZES if tiny else SIZES)[arch]
    folder = work / f"{arch}{'_tiny' if tiny else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tdm_family.json").write_text(json.dumps({"family": FAMILY_PREFIX + arch, "arch": arch, "tiny": tiny}))
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(str(c) for c in range(10)) + "\n")
    cfg = parse_config(["--model", str(folder), "--family", FAMILY_PREFIX + arch, "--prompts", str(prompts),
                        "--output", str(work / f"{arch}.safetensors"), "--batch-size", str(batch), "--resolution", str(resolution),
                        "--cfg", "2", "--mixed-precision", "bf16", "--gradient-checkpointing"])
    AcceleratorState._reset_state(reset_partial_state=True)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    parts, latent_shape = build_parts(cfg, Accelerator(mixed_precision="no", cpu=not cuda))
    loaded_s = time.perf_counter() - started
    loaded_mb = torch.cuda.memory_allocated() / MB if cuda else None
    params = sum(p.numel() for p in parts.family.network.parameters() if not p.requires_grad)
    times, *_ = time_iterations(lora_step(parts, latent_shape, batch), warmup=1, iterations=iterations, device=device)
    result = {"arch": arch, "resolution": resolution, "batch": batch, "parameters": params, "build_s": loaded_s,
              "seconds_per_iteration": sorted(times)[len(times) // 2], "loaded_mb": loaded_mb,
              "peak_vram_mb": torch.cuda.max_memory_allocated() / MB if cuda else None}
    del parts
    if cuda:
        torch.cuda.empty_cache()
    return result


def render(results: list[dict], command: str, device_name: str) -> str:
    lines = [f"Real-size step, random weights: `{command}` on {device_name}, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}. `training.distill`'s parts, bf16 base, fp32 LoRAs (rank 16) and AdamW, "
             "gradient checkpointing, K 4, CFG 2 (Flux.1-dev: guidance input, no CFG pass); one warm-up iteration, "
             "s / iteration the median of the timed ones; peak VRAM from torch.cuda.max_memory_allocated.", "",
             "| architecture | base parameters | size, batch | s / iteration | VRAM loaded (MB) | peak VRAM (MB) |",
             "|---|---:|---|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['arch']} | | | failed: {r['error']} | | |")
            continue
        mb = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        lines.append(f"| {r['arch']} | {r['parameters'] / 1e9:.3g} B | {r['resolution']} px, {r['batch']} | "
                     f"{r['seconds_per_iteration']:.3f} | {mb(r['loaded_mb'])} | {mb(r['peak_vram_mb'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15,sdxl,flux", help="comma list of sd15, sdxl, flux")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations after one warm-up")
    parser.add_argument("--tiny", action="store_true", help="shrunk configs: a CPU check of the harness")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "benchmarks" / "gpu_step")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device here: use --tiny --device cpu for a check of the harness", file=sys.stderr)
        return 2
    unknown = [a for a in args.arch.split(",") if a not in SIZES]
    if unknown:
        print(f"error: unknown --arch {unknown}: use any of {', '.join(SIZES)}", file=sys.stderr)
        return 2
    command = " ".join(["python -m benchmarks.gpu_step", *(sys.argv[1:] if argv is None else argv)])
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    results = []
    for arch in args.arch.split(","):
        print(f"[gpu_step] {arch}", flush=True)
        try:
            results.append(measure(arch, args.work, args.device, args.tiny, args.iterations))
        except torch.cuda.OutOfMemoryError as err:  # a row says so; the other architectures still run
            results.append({"arch": arch, "error": f"out of memory: {str(err).splitlines()[0][:200]}"})
        print(f"[gpu_step] {results[-1]}", flush=True)
        write_text_atomic(args.output, render(results, command, device_name))
    print(render(results, command, device_name))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
