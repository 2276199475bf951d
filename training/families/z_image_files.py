"""Z-Image from the files a ComfyUI user has, into a diffusers ``ZImagePipeline`` the trainer's z_image family wraps.

    models/diffusion_models/z_image_turbo_bf16.safetensors   ComfyUI's Lumina2 (NextDiT) key layout, fused qkv
    models/text_encoders/qwen_3_4b.safetensors                Qwen3-4B in transformers' layout (any qwen_3_4b* file)
    models/vae/ae.safetensors                                  the Flux autoencoder (read as training.families.flux_files does)
"""
from __future__ import annotations

# What Qwen3's chat template renders for plain user messages with add_generation_prompt and enable_thinking
# (ZImagePipeline.encode_prompt's call): no default system message, no empty think block. It is also ComfyUI's
# own Z-Image prompt format (comfy.text_encoders.z_image.ZImageTokenizer.llama_template); ComfyUI's bundled
# Qwen tokenizer (qwen25_tokenizer) carries Qwen2.5's template instead, which adds a system message.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "z_image"
