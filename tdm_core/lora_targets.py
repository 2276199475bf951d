"""Which layers the student and fake-score LoRAs adapt, one rule for the trainer and the TDM Distill node."""
from __future__ import annotations

# attention and feed-forward projections of every transformer block (diffusers' and ComfyUI's UNets name
# them alike): the usual LoRA targets
TRANSFORMER_BLOCK_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def is_target(module_name: str, targets) -> bool:
    """PEFT's rule for ``target_modules`` given as names: the module's name is a target or ends in ``.target``."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)
