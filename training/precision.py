"""Mixed precision of the trainer: base weights in bf16/fp16, LoRA weights and optimiser state in fp32
(``training.models.add_tdm_adapters`` casts them), forwards under ``torch.autocast``, and for fp16 one
gradient scaler per optimiser.

The trainer does this itself instead of through ``Accelerator(mixed_precision=...)``: accelerate keeps
one scaler for all optimisers (its ``clip_grad_norm_`` unscales every prepared optimiser) and refuses
fp16 on a CPU, where torch itself runs fp16 autocast and ``GradScaler`` - so the fp16 path is tested
here without a GPU. The accelerator is built with ``mixed_precision="no"`` so nothing scales twice.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    mode: str  # a key of WEIGHT_DTYPES
    device_type: str  # "cpu", "cuda", ...

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the frozen base (and of the text encoders and VAE)."""
        return WEIGHT_DTYPES[self.mode]

    def autocast(self):
        if self.mode == "no":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.weight_dtype)

    def new_scaler(self):
        """A loss scaler for one optimiser (fp16 only: bf16 has fp32's exponent range)."""
        return torch.amp.GradScaler(self.device_type) if self.mode == "fp16" else None


def save_dtype(save_precision: str, mode: str) -> torch.dtype:
    """The exported LoRA's dtype: ``--save-precision``, or with ``auto`` the run's weight dtype (a bf16
    run exports bf16, as before the adapters trained in fp32)."""
    return WEIGHT_DTYPES[mode] if save_precision == "auto" else SAVE_DTYPES[save_precision]
