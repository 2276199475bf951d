"""Which layers the student and fake-score LoRAs adapt, one rule for the trainer and the TDM Distill node."""
from __future__ import annotations

# attention and feed-forward projections of every transformer block (diffusers' and ComfyUI's UNets name
# them alike): the usual LoRA targets
TRANSFORMER_BLOCK_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")

# The same kind of layers inside the transformer blocks of ComfyUI's diffusion models, under ComfyUI's own
# module names (what stock LoraLoader maps as ``diffusion_model.<name>``), keyed by the class name of the
# MODEL's ``diffusion_model``: each block's attention projections and MLP linears, as the released LoRAs for
# these models target them; never embedders or modulation. Flux also adapts its final layer, as the trainer's Flux
# targets do ("proj_out"): without it the node's students were 12 % further from real data on the flow benchmark
# teacher than the trainer's, with it 6 % (benchmarks/RESULTS_defaults.md).
COMFY_BLOCK_TARGETS = {
    "UNetModel": TRANSFORMER_BLOCK_TARGETS,  # SD1.5, SD2, SDXL
    "OpenAISignatureMMDITWrapper": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),  # SD3 / SD3.5 joint blocks
    # Flux.1, Flux.2 (same class) and HunyuanVideo / 1.5: double-stream image and text streams, single-stream fused linears
    "Flux": ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0",
             "txt_mlp.2", "linear1", "linear2", "final_layer.linear"),
    "HunyuanVideo": ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0",
                     "txt_mlp.2", "linear1", "linear2"),
    # Lumina 2 / Z-Image: fused qkv and SwiGLU feed-forward of the main layers and both refiners
    "NextDiT": ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    "QwenImageTransformer2DModel": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                                    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"),
    # Wan 2.1 / 2.2 (T2V, I2V, 5B): self- and cross-attention (with I2V's image keys) and the MLP
    "WanModel": ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
                 "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2"),
}


def comfy_block_targets(diffusion_model_class: str) -> tuple:
    """The LoRA targets of a ComfyUI diffusion model class; a clear error for one without a rule yet."""
    targets = COMFY_BLOCK_TARGETS.get(diffusion_model_class)
    if targets is None:
        raise ValueError(f"TDM Distill has no LoRA target rule for ComfyUI's {diffusion_model_class} yet (it knows "
                         f"{', '.join(sorted(COMFY_BLOCK_TARGETS))}): distil one of those architectures")
    return targets


def is_target(module_name: str, targets) -> bool:
    """PEFT's rule for ``target_modules`` given as names: the module's name is a target or ends in ``.target``."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)
