"""The Qwen-Image student LoRA: stock ComfyUI (``comfy.sd.load_lora_for_models``, what ``LoraLoader`` runs) loads
it onto ComfyUI's own QwenImage holding the tiny diffusers transformer's weights with zero keys skipped and
reproduces the student; diffusers ``load_lora_weights`` on a QwenImagePipeline reproduces it too; the file
carries the TDM metadata (grid, shift, teacher guidance) and strength 1.0 is the trained update."""
from __future__ import annotations

import pytest
import torch

from tdm_core.metadata import TDMInfo
from tests.helpers.tiny_qwen import comfy_qwen_from_diffusers_transformer, save_tiny_qwen_pipeline
from tests.test_lora_export import comfy_apply_lora, student_and_teacher

torch.set_num_threads(1)
RANK, ALPHA = 4, 2.0
RESOLUTION = 128  # 16x16 latents, 64 tokens


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny Qwen-Image family with a non-zero student adapter, and its exported LoRA."""
    from training.lora_io import export_student_lora
    from training.models import FAKE_SCORE, STUDENT, adapter_parameters, add_tdm_adapters, load_family

    root = tmp_path_factory.mktemp("qwen_lora")
    family = load_family(str(save_tiny_qwen_pipeline(root / "qwen_image")))
    family.set_resolution(RESOLUTION)
    add_tdm_adapters(family, rank=RANK, alpha=ALPHA)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in (STUDENT, FAKE_SCORE):
            for p in adapter_parameters(family.network, name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    info = TDMInfo(num_steps=4, grid=[899, 674, 449, 224], teacher_cfg=2.5, flow_shift=family.schedule.shift, training_steps=12)
    return family, export_student_lora(family, root / "loras" / "qwen_tdm.safetensors", info)


def test_file_layout_and_metadata(trained):
    from training.lora_io import kohya_to_adapter, read_lora
    from training.models import STUDENT, adapter_state_dict

    family, path = trained
    tensors, info = read_lora(path)
    assert all(k.startswith("transformer.transformer_blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert (info.base_family, info.prediction_type, info.teacher_cfg, info.grid) == ("qwen_image", "flow", 2.5, [899, 674, 449, 224])
    assert info.flow_shift == pytest.approx(family.schedule.shift) and (info.lora_rank, info.lora_alpha) == (RANK, ALPHA)
    # alpha / rank is folded into lora_B (no alpha key): strength 1.0 is the trained update
    restored = kohya_to_adapter(tensors, family.network, family.kohya_prefix, RANK)
    assert restored.keys() == adapter_state_dict(family.network, STUDENT).keys()
    assert all(torch.allclose(restored[k], v, atol=1e-7) for k, v in adapter_state_dict(family.network, STUDENT).items())


def test_stock_comfyui_loads_the_lora_with_zero_skipped_keys_and_matches_the_student(trained):
    from diffusers import QwenImageTransformer2DModel

    family, path = trained
    comfy_model = comfy_qwen_from_diffusers_transformer(QwenImageTransformer2DModel.from_pretrained(f"{family.source_path}/transformer"))
    cond = family.encode_prompts(["a photo of a cat", "a drawing of a dog"])
    used = int(cond["encoder_hidden_states_mask"].sum(dim=1).max())
    assert cond["encoder_hidden_states_mask"][:, :used].all()  # same length prompts: ComfyUI passes no mask for Qwen-Image
    context = cond["encoder_hidden_states"][:, :used]
    x_t = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([900.0, 250.0])
    sigma = family.schedule.flow_sigma(t).float()  # both networks take sigma (each scales it by 1000 inside)
    net = comfy_model.diffusion_model
    comfy_teacher = net(x_t.unsqueeze(2), sigma, context=context)[:, :, 0]  # ComfyUI's Qwen-Image latents have a frame axis

    patched, skipped, consumed, lora = comfy_apply_lora(comfy_model, path)
    assert skipped == []
    assert len(consumed) == len([k for k in lora if k.endswith(".lora_A.weight")])  # one weight patch per LoRA module
    comfy_student = net(x_t.unsqueeze(2), sigma, context=context)[:, :, 0]
    student, teacher = student_and_teacher(family, x_t, t, cond)
    assert torch.allclose(comfy_teacher, teacher, atol=1e-5)
    assert (student - teacher).abs().max() > 1e-2  # the LoRA matters...
    assert torch.allclose(comfy_student, student, atol=1e-4)  # ...and ComfyUI applies exactly the same change


def test_diffusers_load_lora_weights_reproduces_the_student(trained):
    from diffusers import QwenImagePipeline

    from training.families.qwen_image import QwenImageFamily

    family, path = trained
    pipe = QwenImagePipeline.from_pretrained(family.source_path)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    loaded = QwenImageFamily(pipe)  # the same family code around diffusers' own LoRA-loaded transformer
    loaded.set_resolution(RESOLUTION)
    cond = family.encode_prompts(["a photo", "a long prompt about a drawing of a dog"])
    x_t = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(6))
    t = torch.tensor([600.0, 300.0])
    student, teacher = student_and_teacher(family, x_t, t, cond)
    assert (student - teacher).abs().max() > 1e-2
    assert torch.allclose(loaded.denoise(x_t, t, cond), student, atol=1e-5)
