"""Each prompt's encoded conditions, kept in host memory and moved to the model's device one batch at a time.

Flux and Wan pad T5 to 512 x 4096: 4 MiB a prompt in bf16, so 10,000 cached prompts on the accelerator would
hold 40 GiB before the first step (issue 20, defect 4). Here an entry is an owned copy in host RAM (page-locked
where CUDA is present, so the per-batch copy to the GPU is asynchronous), never a view into the encoder's
batch output, so a trimmed entry (Qwen-Image, Z-Image: valid tokens only) costs only its own bytes.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from .base import Cond


def host_copy(tensor: Tensor) -> Tensor:
    """An owned CPU copy of ``tensor``, page-locked when CUDA is present."""
    pinned = torch.cuda.is_available()
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pinned)
    return copy.copy_(tensor.detach())


class PromptCache(Mapping):
    """prompt -> its conditions (a dict of tensors with a batch dimension of 1) in host memory."""

    def __init__(self):
        self._entries: dict[str, Cond] = {}

    def __getitem__(self, prompt: str) -> Cond:
        return self._entries[prompt]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, prompt: str, cond: Cond) -> None:
        self._entries[prompt] = {key: host_copy(value) for key, value in cond.items()}

    def on(self, prompt: str, device: torch.device) -> Cond:
        """``prompt``'s conditions on ``device`` (asynchronous from pinned memory: the entry is never written)."""
        return {key: value.to(device, non_blocking=value.is_pinned()) for key, value in self._entries[prompt].items()}

    def nbytes(self) -> int:
        """Host memory the cached conditions take."""
        return sum(value.untyped_storage().nbytes() for cond in self._entries.values() for value in cond.values())
