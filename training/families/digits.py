"""The digits demo family: a tiny class-conditional pixel-space UNet the project trains itself.

Classes "0".."9" are "prompts"; a learned embedding table (plus a null class for classifier-free
guidance) feeds the UNet's cross-attention as ``encoder_hidden_states`` of shape (B, 1, D), the
same path text embeddings take in SD1.5, so distillation runs the real-model code path.
The folder layout is diffusers-like: ``unet/``, ``scheduler/scheduler_config.json``,
``class_embeddings.safetensors`` and ``tdm_family.json`` = {"family": "digits"}.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from tdm_core import VPSchedule

FAMILY_NAME = "digits"
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # row 10 of the embedding table: the unconditional "prompt"
IMAGE_SIZE = 16
EMBED_DIM = 32
EMBEDDINGS_FILE = "class_embeddings.safetensors"
EMBEDDINGS_KEY = "embeddings"

# a tiny SD-like UNet: one plain level at 16x16, one cross-attention level at 8x8 (plus the mid block)
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=EMBED_DIM,
    attention_head_dim=8,
    norm_num_groups=8,
)

# SD1.5's schedule (betas linear in sqrt space, 0.00085..0.012, 1000 steps): its last timestep keeps
# sqrt(abar) = 0.068 of the image. The DDPM linear 1e-4..0.02 schedule ends at sqrt(abar) = 0.006, where
# an eps-predicting network's x0 = (x - s eps) / a multiplies its eps error by 156; the tiny UNet's eps
# error floor (~0.04 rms) then sent plain DDIM samples off the data (noise for most classes, FD ~200
# at w=1) unless x0 was clipped. With this schedule plain and x0-clipped DDIM agree.
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
}

# the attention and linear layers of the UNet (cross-attention, feed-forward, projections, time MLP),
# plus the ResNet convolutions: attention only exists at 8x8 here, so without the convolutions the
# adapters could not change what the 16x16 level draws
LORA_TARGET_MODULES = [
    "conv1",
    "conv2",
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "time_emb_proj",
    "linear_1",
    "linear_2",
]

_PROMPT = re.compile(r"^\s*(?:digit\s+)?([0-9])\s*$", re.IGNORECASE)


def class_index(prompt: str) -> int:
    """ "3" or "digit 3" -> 3, with a clear error for anything else."""
    match = _PROMPT.match(str(prompt))
    if match is None:
        raise ValueError(
            f"prompt {prompt!r} is not a digit class: the digits teacher knows the prompts '0'..'9' "
            "(also written 'digit 3'); put one per line in the prompts file"
        )
    return int(match.group(1))


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def schedule_from_config(config: dict) -> VPSchedule:
    """The VP schedule of a scheduler config; keys it lacks come from :data:`SCHEDULER_CONFIG`."""
    config = {**SCHEDULER_CONFIG, **config}
    if config["prediction_type"] != "epsilon":
        raise ValueError(
            f"the digits family predicts eps, but the scheduler config says prediction_type="
            f"{config['prediction_type']!r}: regenerate the teacher with `python -m benchmarks.train_teacher`"
        )
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("the digits family has no zero-terminal-SNR schedule (eps prediction cannot start from a = 0)")
    return VPSchedule.from_config(
        config["beta_schedule"], float(config["beta_start"]), float(config["beta_end"]), int(config["num_train_timesteps"])
    )


def is_digits_folder(model_path) -> bool:
    marker = Path(model_path) / "tdm_family.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("family") == FAMILY_NAME
    except (OSError, json.JSONDecodeError):
        return False


class DigitsFamily:
    """:class:`training.families.base.ModelFamily` for the digits teacher."""

    name = FAMILY_NAME
    prediction_type = "epsilon"
    kohya_prefix = "lora_unet"

    def __init__(self, network: torch.nn.Module, class_embeddings: Tensor, schedule: VPSchedule, source_path: str = ""):
        if class_embeddings.shape != (NUM_CLASSES + 1, network.config.cross_attention_dim):
            raise ValueError(
                f"class embedding table has shape {tuple(class_embeddings.shape)}, expected "
                f"({NUM_CLASSES + 1}, {network.config.cross_attention_dim}): regenerate the teacher with "
                "`python -m benchmarks.train_teacher`"
            )
        self.network = network
        self.class_embeddings = class_embeddings
        self.schedule = schedule
        self.num_timesteps = schedule.num_timesteps
        self.lora_target_modules = list(LORA_TARGET_MODULES)
        self.source_path = source_path  # the teacher folder, hashed into the LoRA metadata

    def set_resolution(self, resolution: int | None) -> None:
        """The schedule does not depend on the image size."""

    def apply_guidance(self, scale: float) -> float:
        """Classifier-free guidance with the null class: the method applies ``scale`` itself."""
        return scale

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    def condition_for_classes(self, classes: Tensor) -> dict:
        table = self.class_embeddings.to(self.device, self.dtype)
        return {"encoder_hidden_states": table[classes.to(self.device)].unsqueeze(1)}

    def encode_prompts(self, prompts: list[str]) -> dict:
        return self.condition_for_classes(torch.tensor([class_index(p) for p in prompts], dtype=torch.long))

    def null_condition(self, batch_size: int) -> dict:
        return self.condition_for_classes(torch.full((batch_size,), NULL_CLASS, dtype=torch.long))

    def denoise(self, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device).to(torch.float32).reshape(-1).expand(x_t.shape[0])
        return self.network(x_t.to(self.dtype), t, **cond).sample

    def latent_shape(self, batch_size: int, resolution: Optional[int] = None) -> tuple[int, ...]:
        # pixel space at the one resolution the network was trained at (read from its config, so the
        # benchmarks can reuse this family for a larger UNet of the same kind)
        size, channels = self.network.config.sample_size, self.network.config.in_channels
        if resolution not in (None, size):
            raise ValueError(f"the digits teacher makes {size}x{size} images: drop --resolution or pass {size}")
        return (batch_size, channels, size, size)

    def decode(self, latents: Tensor) -> Tensor:
        images = ((latents.float() + 1.0) / 2.0).clamp(0, 1)
        return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images[:, :3]


def load_digits_family(model_path, device="cpu", dtype=torch.float32, config_path=None) -> DigitsFamily:
    """Loads a digits teacher folder written by ``python -m benchmarks.train_teacher``
    (``config_path`` is part of the loader signature of training.models and unused here)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from training.errors import TrainingInputError

    root = Path(model_path)
    needed = [root / "unet" / "config.json", root / "scheduler" / "scheduler_config.json", root / EMBEDDINGS_FILE]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise TrainingInputError(
            f"{root} is not a complete digits teacher folder (missing {', '.join(missing)}): "
            "regenerate it with `python -m benchmarks.train_teacher`"
        )
    network = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype).to(device)
    network.requires_grad_(False).eval()
    embeddings = load_file(str(root / EMBEDDINGS_FILE))[EMBEDDINGS_KEY]
    try:
        schedule = schedule_from_config(json.loads((root / "scheduler" / "scheduler_config.json").read_text()))
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise TrainingInputError(f"{root / 'scheduler' / 'scheduler_config.json'}: {err}") from err
    return DigitsFamily(network, embeddings.to(device=device, dtype=dtype), schedule, source_path=str(root))


# what training.models.load_family registers when a tdm_family.json says "digits" (it imports this module then)
FAMILY_LOADER = load_digits_family
