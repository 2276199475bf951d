"""The exported student LoRA: kohya layout with TDM metadata, written atomically, and loaded by
stock ComfyUI (``comfy.sd.load_lora_for_models``, what ``LoraLoader`` runs) with zero keys skipped
and by diffusers ``load_lora_weights``, both reproducing the PEFT-adapted network's output."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from tests.helpers.tiny_models import (comfy_model_from_diffusers_transformer, trained_tdm_family, comfy_model_from_diffusers_unet, import_comfy,
                                      save_tiny_pipeline)
from tdm_core.metadata import TDMInfo

torch.set_num_threads(1)
RANK, ALPHA = 4, 2.0


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_export")
    folders = {family: save_tiny_pipeline(family, root / family) for family in ("sd15", "sdxl", "sd3", "flux")}
    # ComfyUI's PixArt needs latents of at least 64 (its position embedding is sized from them)
    folders["pixart"] = save_tiny_pipeline("pixart", root / "pixart", pixart_sample_size=64)
    folders["sd35"] = save_tiny_pipeline("sd3", root / "sd35", sd35=True)  # SD3.5's MMDiT-X: the same sd3 family
    return folders


def trained_family(folder, seed=7):
    """A family with both adapters whose student has non-zero (as if trained) weights."""
    return trained_tdm_family(folder, RANK, ALPHA, seed)


def export(family, path, **info):
    from training.lora_io import export_student_lora

    return export_student_lora(family, path, TDMInfo(num_steps=4, grid=[899, 674, 449, 224], training_steps=12, **info))


def student_and_teacher(family, x_t, t, cond):
    from training.models import STUDENT, use_adapter

    with use_adapter(family.network, STUDENT):
        student = family.denoise(x_t, t, cond)
    with use_adapter(family.network, None):
        teacher = family.denoise(x_t, t, cond)
    return student, teacher


def test_export_layout_metadata_and_atomic_write(folders, tmp_path):
    from training.lora_io import read_lora
    from training.errors import TrainingInputError
    from training.models import STUDENT, adapter_state_dict, base_model_hash

    family = trained_family(folders["sd15"])
    path = export(family, tmp_path / "loras" / "tdm.safetensors")
    tensors, info = read_lora(path)
    modules = {k[: -len(".lora_A.weight")] for k in adapter_state_dict(family.network, STUDENT) if k.endswith(".lora_A.weight")}
    assert len(tensors) == 3 * len(modules)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{key}.lora_down.weight"].shape == (RANK, 32)
    assert tensors[f"{key}.lora_up.weight"].shape == (32, RANK)
    assert tensors[f"{key}.alpha"].item() == ALPHA
    assert info.base_family == "sd15" and info.prediction_type == "epsilon"
    assert (info.lora_rank, info.lora_alpha, info.grid, info.training_steps) == (RANK, ALPHA, [899, 674, 449, 224], 12)
    assert info.base_hash == base_model_hash(folders["sd15"]) and len(info.base_hash) == 64
    assert os.listdir(path.parent) == ["tdm.safetensors"]  # no temporary file left behind

    before = path.read_bytes()
    with pytest.raises(TrainingInputError, match="must end in .safetensors"):
        export(family, tmp_path / "loras" / "tdm.pt")
    (tmp_path / "loras" / "dir.safetensors").mkdir()
    with pytest.raises(TrainingInputError, match="is a folder"):
        export(family, tmp_path / "loras" / "dir.safetensors")
    shared = torch.zeros(4)
    with pytest.raises(RuntimeError):  # safetensors refuses tensors sharing memory: a write failing midway
        from training.lora_io import save_safetensors_atomic

        save_safetensors_atomic({"a": shared, "b": shared[:2]}, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["dir.safetensors", "tdm.safetensors"]


def test_kohya_file_round_trips_into_the_adapter(folders, tmp_path):
    from training.lora_io import kohya_to_adapter, read_lora
    from training.models import STUDENT, add_tdm_adapters, load_adapter_state_dict, load_family

    family = trained_family(folders["sdxl"])
    tensors, _ = read_lora(export(family, tmp_path / "x.safetensors"))
    fresh = load_family(str(folders["sdxl"]))
    add_tdm_adapters(fresh, rank=RANK, alpha=ALPHA)
    load_adapter_state_dict(fresh.network, STUDENT, kohya_to_adapter(tensors, fresh.network, fresh.kohya_prefix, RANK))
    cond = family.encode_prompts(["p"])
    x_t = torch.randn(family.latent_shape(1))
    assert torch.equal(student_and_teacher(fresh, x_t, torch.tensor([300.0]), cond)[0],
                       student_and_teacher(family, x_t, torch.tensor([300.0]), cond)[0])


class LoraLog(logging.Handler):
    """Collects ComfyUI's 'lora key not loaded' warnings (it skips unknown keys silently otherwise)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.skipped = []

    def emit(self, record):
        message = record.getMessage()
        if "lora key not loaded" in message or "ERROR loading" in message:
            self.skipped.append(message)


def tensors_of(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def comfy_apply_lora(comfy_model, lora_path):
    """Stock LoraLoader's path: load_lora_for_models on a ModelPatcher, then patch the weights in."""
    comfy = import_comfy()
    import comfy.model_patcher
    import comfy.utils

    patcher = comfy.model_patcher.ModelPatcher(comfy_model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    log = LoraLog()
    logging.getLogger().addHandler(log)
    try:
        lora = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    finally:
        logging.getLogger().removeHandler(log)
    key_map = comfy.lora.model_lora_keys_unet(comfy_model, {})
    consumed = comfy.lora.load_lora(lora, key_map, log_missing=False)
    patched.patch_model(device_to=torch.device("cpu"))
    return patched, log.skipped, consumed, lora


def test_skipped_key_detection_sees_comfyui_warnings(folders):
    # negative control for the zero-skipped-keys assertions below: a key ComfyUI cannot map is reported
    from diffusers import UNet2DConditionModel

    comfy = import_comfy()
    comfy_model = comfy_model_from_diffusers_unet(UNet2DConditionModel.from_pretrained(str(folders["sd15"] / "unet")), "sd15")
    log = LoraLog()
    logging.getLogger().addHandler(log)
    try:
        comfy.lora.load_lora({"lora_unet_no_such_module.lora_down.weight": torch.zeros(1, 1)}, comfy.lora.model_lora_keys_unet(comfy_model, {}))
    finally:
        logging.getLogger().removeHandler(log)
    assert len(log.skipped) == 1 and "no_such_module" in log.skipped[0]


def sdxl_adm(unet, cond):
    # ComfyUI's SDXL takes the pooled embeds + Fourier size embeddings as one vector y
    time_embeds = unet.add_time_proj(cond["time_ids"].flatten()).reshape(cond["time_ids"].shape[0], -1)
    return torch.cat([cond["text_embeds"], time_embeds], dim=-1)


@pytest.mark.parametrize("family_name", ["sd15", "sdxl"])
def test_stock_comfyui_loads_unet_lora_with_zero_skipped_keys(folders, tmp_path, family_name):
    from diffusers import UNet2DConditionModel

    family = trained_family(folders[family_name])
    path = export(family, tmp_path / f"{family_name}.safetensors")
    comfy_model = comfy_model_from_diffusers_unet(UNet2DConditionModel.from_pretrained(str(folders[family_name] / "unet")), family_name)

    cond = family.encode_prompts(["a photo", "a drawing"])
    x_t = torch.randn(family.latent_shape(2), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([900.0, 250.0])
    extra = {"y": sdxl_adm(family.network, cond)} if family_name == "sdxl" else {}
    net = comfy_model.diffusion_model
    comfy_teacher = net(x_t, t, context=cond["encoder_hidden_states"], **extra)

    patched, skipped, consumed, lora = comfy_apply_lora(comfy_model, path)
    assert skipped == []
    assert len(consumed) * 3 == len(lora)  # every (down, up, alpha) triple became one weight patch
    comfy_student = net(x_t, t, context=cond["encoder_hidden_states"], **extra)
    student, teacher = student_and_teacher(family, x_t, t, cond)
    assert torch.allclose(comfy_teacher, teacher, atol=1e-5)
    assert (student - teacher).abs().max() > 1e-2  # the LoRA matters...
    assert torch.allclose(comfy_student, student, atol=1e-4)  # ...and ComfyUI applies exactly the same change


@pytest.mark.parametrize("family_name", ["sd15", "sdxl"])
def test_diffusers_load_lora_weights_reproduces_the_student(folders, tmp_path, family_name):
    import diffusers

    family = trained_family(folders[family_name])
    path = export(family, tmp_path / f"{family_name}.safetensors")
    pipe_class = {"sd15": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline}[family_name]
    pipe = pipe_class.from_pretrained(str(folders[family_name]))
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)

    cond = family.encode_prompts(["a photo"])
    x_t = torch.randn(family.latent_shape(1), generator=torch.Generator().manual_seed(4))
    t = torch.tensor([600.0])
    student, teacher = student_and_teacher(family, x_t, t, cond)
    added = {"added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}} if family_name == "sdxl" else {}
    loaded = pipe.unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"], **added).sample
    assert (student - teacher).abs().max() > 1e-2
    assert torch.allclose(loaded, student, atol=1e-5)


FLUX_RESOLUTION = 32  # 16x16 latents, 64 tokens (the tiny Flux's native 256 px would be 4096)


@pytest.mark.parametrize("family_name", ["sd3", "sd35", "pixart", "flux"])
def test_stock_comfyui_loads_transformer_lora_with_zero_skipped_keys(folders, tmp_path, family_name):
    import diffusers

    family = trained_family(folders[family_name])
    path = export(family, tmp_path / f"{family_name}.safetensors")
    transformer_class = {"sd3": diffusers.SD3Transformer2DModel, "sd35": diffusers.SD3Transformer2DModel,
                         "pixart": diffusers.PixArtTransformer2DModel, "flux": diffusers.FluxTransformer2DModel}[family_name]
    transformer = transformer_class.from_pretrained(str(folders[family_name] / "transformer"))
    comfy_model, _ = comfy_model_from_diffusers_transformer(transformer, family.name)
    if family_name == "sd35":  # ComfyUI read the MMDiT-X parts from the weights
        assert comfy_model.model_config.unet_config["qk_norm"] == "rms"
        assert comfy_model.model_config.unet_config["x_block_self_attn_layers"] == [0]
        assert any(".attn2." in k for k in tensors_of(path))
    family_name = family.name

    cond = family.encode_prompts(["a photo", "a drawing"])
    resolution = FLUX_RESOLUTION if family_name == "flux" else None
    family.set_resolution(resolution)  # Flux: the shift of this size
    x_t = torch.randn(family.latent_shape(2, resolution), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([900.0, 250.0])
    timestep = family.schedule.model_timestep(t).float()  # both networks take the model timestep
    if family_name == "sd3":
        extra = {"y": cond["pooled_projections"]}
    elif family_name == "flux":  # ComfyUI's Flux takes sigma and the guidance (both scaled by 1000 inside, as diffusers')
        assert family.apply_guidance(3.5) == 1.0
        timestep = timestep / family.num_timesteps
        extra = {"y": cond["pooled_projections"], "guidance": torch.full((2,), 3.5)}
    else:  # PixArt: the prompt mask is all ones here, so no mask is needed on the ComfyUI side
        cond = family.encode_prompts(["x" * 200, "y" * 200])
        assert cond["encoder_attention_mask"].all()
        extra = {}
    net = comfy_model.diffusion_model
    comfy_teacher = net(x_t, timestep, context=cond["encoder_hidden_states"], **extra)

    patched, skipped, consumed, lora = comfy_apply_lora(comfy_model, path)
    assert skipped == []
    modules = [k for k in lora if k.endswith((".lora_down.weight", ".lora_A.weight"))]
    assert len(consumed) == len(modules)  # one patch per LoRA module (slices of the fused qkv weights count apart)
    comfy_student = net(x_t, timestep, context=cond["encoder_hidden_states"], **extra)
    student, teacher = student_and_teacher(family, x_t, t, cond)
    assert torch.allclose(comfy_teacher, teacher, atol=1e-5)
    assert (student - teacher).abs().max() > 1e-2
    assert torch.allclose(comfy_student, student, atol=1e-4)


@pytest.mark.parametrize("family_name", ["sd3", "sd35", "flux"])
def test_diffusers_load_lora_weights_reproduces_the_flow_student(folders, tmp_path, family_name):
    import diffusers

    from training.lora_io import kohya_to_adapter, read_lora
    from training.models import STUDENT, adapter_state_dict

    family = trained_family(folders[family_name])
    path = export(family, tmp_path / f"{family_name}.safetensors")
    tensors, info = read_lora(path)
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert info.lora_alpha == ALPHA and info.prediction_type == "flow"
    restored = kohya_to_adapter(tensors, family.network, family.kohya_prefix, RANK)
    assert all(torch.allclose(restored[k], v, atol=1e-7) for k, v in adapter_state_dict(family.network, STUDENT).items())

    pipeline_class = {"sd3": diffusers.StableDiffusion3Pipeline, "sd35": diffusers.StableDiffusion3Pipeline,
                      "flux": diffusers.FluxPipeline}[family_name]
    pipe = pipeline_class.from_pretrained(str(folders[family_name]))
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    loaded_family = type(family)(pipe)  # the same family code around diffusers' own LoRA-loaded transformer
    resolution = FLUX_RESOLUTION if family_name == "flux" else None
    for f in (family, loaded_family):
        f.set_resolution(resolution)
        f.apply_guidance(3.5 if family_name == "flux" else 2.0)
    cond = family.encode_prompts(["a photo"])
    x_t = torch.randn(family.latent_shape(1, resolution), generator=torch.Generator().manual_seed(6))
    t = torch.tensor([600.0])
    student, teacher = student_and_teacher(family, x_t, t, cond)
    loaded = loaded_family.denoise(x_t, t, cond)
    assert (student - teacher).abs().max() > 1e-2
    assert torch.allclose(loaded, student, atol=1e-5)


def test_half_precision_export_loads_in_comfyui(folders, tmp_path):
    from diffusers import UNet2DConditionModel

    from training.lora_io import export_student_lora, read_lora

    family = trained_family(folders["sd15"])
    path = export_student_lora(family, tmp_path / "half.safetensors", TDMInfo(), dtype=torch.float16)
    tensors, _ = read_lora(path)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    comfy_model = comfy_model_from_diffusers_unet(UNet2DConditionModel.from_pretrained(str(folders["sd15"] / "unet")), "sd15")
    _, skipped, consumed, lora = comfy_apply_lora(comfy_model, path)
    assert skipped == [] and len(consumed) * 3 == len(lora)


def test_exported_lora_is_readable_like_a_normally_created_file(tmp_path):
    # ComfyUI often runs as another user than the trainer: the LoRA must not keep mkstemp's 0600 mode
    import os

    from training.lora_io import save_safetensors_atomic

    umask = os.umask(0o022)
    try:
        path = save_safetensors_atomic({"w": torch.zeros(2)}, tmp_path / "lora.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]
