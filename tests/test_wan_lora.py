"""The Wan student LoRA: written in Wan's original names (the only Wan namespace comfy.lora.model_lora_keys_unet
maps: "diffusion_model.<path>"), stock ComfyUI (``comfy.sd.load_lora_for_models``, what ``LoraLoader`` runs)
loads it onto ComfyUI's own WAN21 holding the tiny diffusers transformer's weights with zero keys skipped and
reproduces the student; diffusers ``load_lora_weights`` on a WanPipeline (its own converter of non-diffusers
Wan LoRAs) reproduces it too."""
from __future__ import annotations

import pytest
import torch

from tdm_core.metadata import TDMInfo
from tests.helpers.tiny_wan import comfy_wan_from_diffusers_transformer, save_tiny_wan_pipeline
from tests.test_lora_export import comfy_apply_lora, student_and_teacher

torch.set_num_threads(1)
RANK, ALPHA = 4, 2.0
RESOLUTION, FRAMES = 64, 5


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny Wan family with a non-zero student adapter, and its exported LoRA."""
    from training.lora_io import export_student_lora
    from training.models import FAKE_SCORE, STUDENT, adapter_parameters, add_tdm_adapters, load_family

    root = tmp_path_factory.mktemp("wan_lora")
    family = load_family(str(save_tiny_wan_pipeline(root / "wan")))
    family.set_num_frames(FRAMES)
    family.set_resolution(RESOLUTION)
    add_tdm_adapters(family, rank=RANK, alpha=ALPHA)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in (STUDENT, FAKE_SCORE):
            for p in adapter_parameters(family.network, name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    info = TDMInfo(num_steps=4, grid=[899, 674, 449, 224], teacher_cfg=5.0, flow_shift=family.schedule.shift, training_steps=12)
    return family, export_student_lora(family, root / "loras" / "wan_tdm.safetensors", info)


def test_file_layout_and_metadata(trained):
    from training.lora_io import read_lora
    from training.models import STUDENT, adapter_state_dict

    family, path = trained
    tensors, info = read_lora(path)
    assert (info.base_family, info.prediction_type, info.teacher_cfg, info.flow_shift) == ("wan", "flow", 5.0, 3.0)
    adapter = adapter_state_dict(family.network, STUDENT)
    assert len(tensors) == len(adapter)
    # alpha / rank folded into lora_B, under Wan's names
    assert torch.equal(tensors["diffusion_model.blocks.0.self_attn.q.lora_A.weight"], adapter["blocks.0.attn1.to_q.lora_A.weight"])
    assert torch.allclose(tensors["diffusion_model.blocks.1.ffn.2.lora_B.weight"], adapter["blocks.1.ffn.net.2.lora_B.weight"] * ALPHA / RANK)


def test_a_module_diffusers_cannot_read_back_is_refused():
    from training.families.wan import WanFamily

    assert WanFamily.lora_module_path("blocks.3.attn2.to_out.0") == "blocks.3.cross_attn.o"
    with pytest.raises(ValueError, match="no Wan name for the diffusers module blocks.0.norm2"):
        WanFamily.lora_module_path("blocks.0.norm2")  # diffusers swaps norm2 / norm3: a plain rename would be wrong


def test_stock_comfyui_loads_the_lora_with_zero_skipped_keys_and_matches_the_student(trained):
    from diffusers import WanTransformer3DModel

    family, path = trained
    comfy_model = comfy_wan_from_diffusers_transformer(WanTransformer3DModel.from_pretrained(f"{family.source_path}/transformer"))
    cond = family.encode_prompts(["a photo of a cat", "a drawing of a dog"])
    x_t = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([900.0, 250.0])
    timestep = family.schedule.flow_sigma(t).float() * 1000  # ComfyUI's WAN21 gets sigma * 1000 (ModelSamplingDiscreteFlow)
    net = comfy_model.diffusion_model
    comfy_teacher = net(x_t, timestep, context=cond["encoder_hidden_states"])

    patched, skipped, consumed, lora = comfy_apply_lora(comfy_model, path)
    assert skipped == []
    assert len(consumed) == len([k for k in lora if k.endswith(".lora_A.weight")])  # one weight patch per LoRA module
    comfy_student = net(x_t, timestep, context=cond["encoder_hidden_states"])
    student, teacher = student_and_teacher(family, x_t, t, cond)
    assert torch.allclose(comfy_teacher, teacher, atol=1e-5)
    assert (student - teacher).abs().max() > 1e-2  # the LoRA matters...
    assert torch.allclose(comfy_student, student, atol=1e-4)  # ...and ComfyUI applies exactly the same change


def test_diffusers_load_lora_weights_reproduces_the_student(trained):
    from diffusers import WanPipeline

    from training.families.wan import WanFamily

    family, path = trained
    pipe = WanPipeline.from_pretrained(family.source_path)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    loaded = WanFamily(pipe)
    loaded.set_num_frames(FRAMES)
    loaded.set_resolution(RESOLUTION)
    cond = family.encode_prompts(["a photo", "a long prompt about a drawing of a dog"])
    x_t = torch.randn(family.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(6))
    t = torch.tensor([600.0, 300.0])
    student, teacher = student_and_teacher(family, x_t, t, cond)
    assert (student - teacher).abs().max() > 1e-2
    assert torch.allclose(loaded.denoise(x_t, t, cond), student, atol=1e-5)
