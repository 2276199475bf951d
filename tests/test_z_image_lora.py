"""A Z-Image TDM LoRA from the trainer's export: stock ComfyUI's LoraLoader path (comfy.sd.load_lora_for_models)
puts every key of it onto ComfyUI's own Lumina2 model (ZImage config) holding the same weights, with zero
"lora key not loaded", and that model then equals the trainer's student; diffusers' load_lora_weights on a
ZImagePipeline reproduces the student too (alpha / rank folded in: strength 1.0 is the trained LoRA)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_zimage import comfy_zimage_model, save_tiny_zimage
from tests.test_lora_export import comfy_apply_lora

torch.set_num_threads(1)
RANK, ALPHA = 4, 8.0
RESOLUTION = 32
# 9 prompt bytes + the chat template's 19 tokens = 28 caption tokens each: both models pad a caption to a multiple
# of 32 with cap_pad_token (rope positions continuing the caption's); one length for the batch, so ComfyUI's
# conditioning needs no attention mask
PROMPTS = ["a red cat", "a big dog"]
CAPTION = 28


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The family with a non-zero student adapter, and its exported LoRA."""
    from tdm_core.metadata import TDMInfo
    from training.lora_io import export_student_lora
    from training.models import STUDENT, adapter_parameters, add_tdm_adapters, load_family

    root = tmp_path_factory.mktemp("z_image_lora")
    folder = save_tiny_zimage(root / "z_image", comfy_twin=True)
    family = load_family(str(folder))
    family.set_resolution(RESOLUTION)
    add_tdm_adapters(family, rank=RANK, alpha=ALPHA)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in adapter_parameters(family.network, STUDENT):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    info = TDMInfo(num_steps=4, grid=[899, 674, 449, 224], total_steps=900, teacher_cfg=1.0, flow_shift=family.schedule.shift)
    return folder, family, export_student_lora(family, root / "z_image_tdm.safetensors", info)


def student_and_teacher(family, x, t, cond):
    from training.models import STUDENT, use_adapter

    with torch.no_grad(), use_adapter(family.network, STUDENT):
        student = family.denoise(x, t, cond)
        with use_adapter(family.network, None):
            teacher = family.denoise(x, t, cond)
    return student, teacher


def test_export_is_the_diffusion_model_namespace_with_tdm_metadata(trained):
    from training.lora_io import read_lora

    _, family, path = trained
    tensors, info = read_lora(path)
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert not any(k.endswith(".alpha") for k in tensors)  # alpha / rank is in lora_B: strength 1.0 is right
    assert info.base_family == "z_image" and info.flow_shift == 3.0 and info.teacher_cfg == 1.0
    assert info.grid == [899, 674, 449, 224] and info.lora_rank == RANK and info.lora_alpha == ALPHA


def test_stock_comfyui_loads_the_z_image_lora_with_zero_skipped_keys_and_matches_the_student(trained):
    from diffusers import ZImageTransformer2DModel

    folder, family, path = trained
    comfy_model = comfy_zimage_model(ZImageTransformer2DModel.from_pretrained(str(folder / "transformer")))
    assert type(comfy_model.model_config).__name__ == "ZImage" and type(comfy_model).__name__ == "Lumina2"
    cond = family.encode_prompts(PROMPTS)
    assert cond["prompt_mask"].sum(1).tolist() == [CAPTION, CAPTION]
    context = cond["prompt_embeds"][:, :CAPTION]
    x = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([900.0, 250.0])
    sigma = family.schedule.flow_sigma(t).float()  # ComfyUI's Lumina2 takes sigma (multiplier 1) and returns the velocity
    net = comfy_model.diffusion_model
    with torch.no_grad():
        comfy_teacher = net(x, sigma, context=context, num_tokens=CAPTION)

    patched, skipped, consumed, lora = comfy_apply_lora(comfy_model, path)
    assert skipped == []
    modules = [k for k in lora if k.endswith(".lora_A.weight")]
    assert len(consumed) == len(modules)  # one patch per LoRA module (to_q/k/v: slices of the fused qkv count apart)
    with torch.no_grad():
        comfy_student = net(x, sigma, context=context, num_tokens=CAPTION)
    student, teacher = student_and_teacher(family, x, t, cond)
    torch.testing.assert_close(comfy_teacher, teacher, rtol=1e-4, atol=1e-5)
    assert (student - teacher).abs().max() > 1e-2
    torch.testing.assert_close(comfy_student, student, rtol=1e-4, atol=1e-4)


def test_diffusers_load_lora_weights_reproduces_the_student(trained):
    from diffusers import ZImagePipeline

    from training.families.z_image import ZImageFamily

    folder, family, path = trained
    pipe = ZImagePipeline.from_pretrained(str(folder))
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    loaded = ZImageFamily(pipe)
    loaded.set_resolution(RESOLUTION)
    cond = family.encode_prompts(["a red cat", "a blue dog under a tall tree"])  # any lengths: both sides are diffusers
    x = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(6))
    t = torch.tensor([600.0, 100.0])
    student, teacher = student_and_teacher(family, x, t, cond)
    with torch.no_grad():
        got = loaded.denoise(x, t, cond)
    assert (student - teacher).abs().max() > 1e-2
    torch.testing.assert_close(got, student, rtol=1e-4, atol=1e-5)
