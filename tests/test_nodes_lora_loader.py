"""TDM LoRA Loader on real files: all-or-nothing loading with errors that name the architecture
expected and found, safe file reading, recommended strength and the attached TDM metadata."""
from __future__ import annotations

import pickle

import pytest
import torch

from tdm_core.metadata import TDMInfo
from tests.helpers import comfy_inprocess as h

RANK = 2


def loader():
    from comfyui_tdm_pack.nodes.node_defs import TDMLoraLoader

    return TDMLoraLoader


def kohya_unet_lora(context_dim: int = h.TINY_CONTEXT_DIM) -> dict:
    """A small kohya LoRA for the tiny SD1.5-layout UNet (attention + a resnet conv)."""
    g = torch.Generator().manual_seed(0)
    block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"
    shapes = {f"{block}_attn1_to_q": (32, 32), f"{block}_attn2_to_k": (32, context_dim), f"{block}_attn2_to_v": (32, context_dim)}
    lora = {}
    for key, (out_dim, in_dim) in shapes.items():
        lora[f"{key}.lora_down.weight"] = torch.randn(RANK, in_dim, generator=g) * 0.1
        lora[f"{key}.lora_up.weight"] = torch.randn(out_dim, RANK, generator=g) * 0.1
        lora[f"{key}.alpha"] = torch.tensor(float(RANK))
    lora["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] = torch.randn(RANK, 32, 3, 3, generator=g) * 0.1
    lora["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"] = torch.randn(32, RANK, 1, 1, generator=g) * 0.1
    return lora


def sd3_lora() -> dict:
    g = torch.Generator().manual_seed(1)
    lora = {}
    for name in ("attn.to_q", "attn.add_q_proj"):
        lora[f"transformer.transformer_blocks.0.{name}.lora_A.weight"] = torch.randn(RANK, 128, generator=g)
        lora[f"transformer.transformer_blocks.0.{name}.lora_B.weight"] = torch.randn(128, RANK, generator=g)
    return lora


def test_kohya_lora_loads_patches_every_layer_and_leaves_the_input_model_alone(tiny_model, pack, lora_folder):
    base = tiny_model("sd15_eps")
    h.write_safetensors(lora_folder, "ok.safetensors", kohya_unet_lora())
    model, clip, settings = loader().execute(base, "ok.safetensors", 0.7, True, 1.0).result
    assert settings.startswith("LoRA without TDM metadata: strength 0.7")
    assert clip is None
    assert len(model.patches) == 4
    assert {p[0][0] for p in model.patches.values()} == {0.7}  # no metadata: the strength input
    assert base.patches == {} and base.get_attachment("tdm_info") is None
    assert model.get_attachment("tdm_info") is None  # a plain LoRA carries no TDM metadata


def test_recommended_strength_and_metadata_are_applied(tiny_model, pack, lora_folder):
    base = tiny_model("sd15_eps")
    info = TDMInfo(num_steps=4, grid=[999, 856, 665, 399], base_family="sd15", recommended_strength=0.125, teacher_cfg=4.5)
    h.write_safetensors(lora_folder, "tdm.safetensors", kohya_unet_lora(), info.to_safetensors_metadata())
    recommended = loader().execute(base, "tdm.safetensors", 1.0, True, 1.0).result[0]
    manual = loader().execute(base, "tdm.safetensors", 0.9, False, 1.0).result[0]
    assert {p[0][0] for p in recommended.patches.values()} == {0.125}
    assert {p[0][0] for p in manual.patches.values()} == {0.9}
    attached = recommended.get_attachment("tdm_info")
    assert attached.grid == [999, 856, 665, 399] and attached.teacher_cfg == 4.5
    assert recommended.clone().get_attachment("tdm_info").grid == attached.grid  # survives later model patches


def test_lora_for_another_architecture_names_expected_and_found(tiny_model, pack, lora_folder):
    h.write_safetensors(lora_folder, "sd3.safetensors", sd3_lora())
    with pytest.raises(ValueError, match=r"match no layer.*Expected a LoRA for SD15.*found one for SD3"):
        loader().execute(tiny_model("sd15_eps"), "sd3.safetensors", 1.0, True, 1.0)
    h.write_safetensors(lora_folder, "unet.safetensors", kohya_unet_lora())
    with pytest.raises(ValueError, match=r"Expected a LoRA for SD3.*found one for .*UNet"):
        loader().execute(tiny_model("sd3_flow"), "unet.safetensors", 1.0, True, 1.0)


def test_same_key_names_but_other_widths_is_refused(tiny_model, pack, lora_folder):
    """An SDXL-like LoRA whose key names exist on SD1.5 but whose cross-attention width differs."""
    h.write_safetensors(lora_folder, "wide.safetensors", kohya_unet_lora(context_dim=64))
    with pytest.raises(ValueError, match=r"Expected a LoRA for SD15 \(cross-attention context dim 32\).*context dim 64"):
        loader().execute(tiny_model("sd15_eps"), "wide.safetensors", 1.0, True, 1.0)


def test_partial_match_is_an_error_not_a_silent_partial_load(tiny_model, pack, lora_folder):
    lora = kohya_unet_lora()
    lora["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(RANK, 32)
    lora["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, RANK)
    h.write_safetensors(lora_folder, "partial.safetensors", lora)
    with pytest.raises(ValueError, match=r"2 of 13 tensors match no layer.*down_blocks_9"):
        loader().execute(tiny_model("sd15_eps"), "partial.safetensors", 1.0, True, 1.0)


def test_text_encoder_weights_need_a_clip(tiny_model, pack, lora_folder):
    lora = kohya_unet_lora()
    lora["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(RANK, 768)
    lora["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(768, RANK)
    h.write_safetensors(lora_folder, "te.safetensors", lora)
    with pytest.raises(ValueError, match="connect the CLIP input"):
        loader().execute(tiny_model("sd15_eps"), "te.safetensors", 1.0, True, 1.0)


def test_metadata_of_another_family_is_refused(tiny_model, pack, lora_folder):
    info = TDMInfo(base_family="sdxl")
    h.write_safetensors(lora_folder, "xl.safetensors", kohya_unet_lora(), info.to_safetensors_metadata())
    with pytest.raises(ValueError, match=r"distilled from a sdxl model but this model is SD15"):
        loader().execute(tiny_model("sd15_eps"), "xl.safetensors", 1.0, True, 1.0)


def test_truncated_safetensors_is_a_clear_error(tiny_model, pack, lora_folder):
    h.write_safetensors(lora_folder, "whole.safetensors", kohya_unet_lora())
    data = (lora_folder / "whole.safetensors").read_bytes()
    (lora_folder / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        loader().execute(tiny_model("sd15_eps"), "cut.safetensors", 1.0, True, 1.0)


class CodeInAPickle:
    """Unpickling this would run a call: a weights-only load must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_load_weights_only(tiny_model, pack, lora_folder, capsys):
    lora = kohya_unet_lora()
    torch.save(lora, lora_folder / "weights.pt")
    model = loader().execute(tiny_model("sd15_eps"), "weights.pt", 1.0, True, 1.0).result[0]
    assert len(model.patches) == 4

    with open(lora_folder / "evil.pt", "wb") as f:
        pickle.dump({"x": CodeInAPickle()}, f)
    with pytest.raises(ValueError, match="refused"):
        loader().execute(tiny_model("sd15_eps"), "evil.pt", 1.0, True, 1.0)
    assert "this must never run" not in capsys.readouterr().out


def test_unknown_name_is_a_clear_error(tiny_model, pack, lora_folder):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        loader().execute(tiny_model("sd15_eps"), "missing.safetensors", 1.0, True, 1.0)


def test_peft_key_renaming_is_pure_and_leaves_other_layouts_alone(pack):
    from comfyui_tdm_pack.nodes.lora_keys import peft_layer_to_comfy

    assert peft_layer_to_comfy("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q"
    assert peft_layer_to_comfy("base_model.model.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0") == "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out"
    assert peft_layer_to_comfy("down_blocks.0.resnets.0.conv1") == "unet.down_blocks.0.resnets.0.conv1"
    for untouched in ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q", "lora_unet_down_blocks_0_attentions_0_proj_in", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"):
        assert peft_layer_to_comfy(untouched) == untouched


def test_diffusers_sd3_lora_loads_on_a_flow_model_with_its_header_alpha(tiny_model, pack, lora_folder, caplog):
    """The released SD3 TDM LoRA layout (diffusers ``transformer.<path>.lora_A/B.weight``), with PEFT's
    lora_alpha in diffusers' header: every layer patched, alpha carried over, the sample changes."""
    import json

    import comfy.utils

    from comfyui_tdm_pack.nodes.node_defs import TDMKSampler

    base = tiny_model("sd3_flow")
    to_comfy = comfy.utils.mmdit_to_diffusers(h.TINY_SD3_MMDIT, output_prefix="diffusion_model.")
    paths = [k[: -len(".weight")] for k in to_comfy if k.endswith(("attn.to_q.weight", "attn.add_k_proj.weight", "ff.net.2.weight"))]
    assert len(paths) >= 4
    hidden = 64 * h.TINY_SD3_MMDIT["depth"]  # MMDiT width; q/k/v are slices of fused qkv weights in ComfyUI
    ff_hidden = 4 * hidden
    g = torch.Generator().manual_seed(2)
    lora = {}
    for path in paths:
        in_dim = ff_hidden if path.endswith("ff.net.2") else hidden
        lora[f"transformer.{path}.lora_A.weight"] = torch.randn(RANK, in_dim, generator=g) * 0.2
        lora[f"transformer.{path}.lora_B.weight"] = torch.randn(hidden, RANK, generator=g) * 0.2
    header = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": 4 * RANK})}
    h.write_safetensors(lora_folder, "sd3_tdm.safetensors", lora, header)

    model = loader().execute(base, "sd3_tdm.safetensors", 1.0, True, 1.0).result[0]
    assert len(model.patches) == len(paths)
    assert {float(p[0][1].weights[2]) for p in model.patches.values()} == {4.0 * RANK}
    cond = h.conditioning("sd3_flow")
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    with_lora = TDMKSampler.execute(model, 0, 4, "reference", 1.0, cond, latent, 1.0).result[0]["samples"]
    without = TDMKSampler.execute(base, 0, 4, "reference", 1.0, cond, latent, 1.0).result[0]["samples"]
    assert (with_lora - without).abs().max() > 1e-3
    assert not [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]  # ComfyUI logs patches it fails to apply


def test_wrong_width_on_a_fused_qkv_slice_is_refused(tiny_model, pack, lora_folder):
    """ComfyUI patches SD3's q/k/v as slices of one qkv weight and only logs a shape error at sampling
    time; the loader checks the slice's shape up front."""
    hidden = 64 * h.TINY_SD3_MMDIT["depth"]
    lora = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, hidden),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3 * hidden, RANK)}
    h.write_safetensors(lora_folder, "qkv.safetensors", lora)
    with pytest.raises(ValueError, match=r"has shape \(128, 128\) but the LoRA's factors are \(384, 2\)"):
        loader().execute(tiny_model("sd3_flow"), "qkv.safetensors", 1.0, True, 1.0)


def test_text_encoder_weights_patch_the_connected_clip(tiny_model, pack, lora_folder):
    base_clip = h.build_clip()
    lora = kohya_unet_lora()
    g = torch.Generator().manual_seed(3)
    for layer in ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_1_mlp_fc1"):
        out_dim = 64 if "fc1" in layer else h.TINY_CONTEXT_DIM
        lora[f"{layer}.lora_down.weight"] = torch.randn(RANK, h.TINY_CONTEXT_DIM, generator=g)
        lora[f"{layer}.lora_up.weight"] = torch.randn(out_dim, RANK, generator=g)
    h.write_safetensors(lora_folder, "with_te.safetensors", lora)
    model, clip, _ = loader().execute(tiny_model("sd15_eps"), "with_te.safetensors", 1.0, True, 0.5, clip=base_clip).result
    assert len(model.patches) == 4 and len(clip.patcher.patches) == 2
    assert {p[0][0] for p in clip.patcher.patches.values()} == {0.5}
    tokens = base_clip.tokenize("a tiny test prompt")
    before = base_clip.encode_from_tokens(tokens)
    after = clip.encode_from_tokens(tokens)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(base_clip.encode_from_tokens(tokens), before)  # the input CLIP is untouched


def test_loader_node_installs_a_unify_loras_k_embedding(tiny_model, pack, lora_folder):
    """A steps-aware (TDM-unify) file goes through the node too: LoRA weights patched, the K table
    installed on the returned clone only (nodes.steps_aware), and it changes the sample."""
    from comfyui_tdm_pack.nodes.node_defs import TDMKSampler
    from comfyui_tdm_pack.nodes.steps_aware import k_embedding_wrapper
    from tdm_core.steps_aware import K_EMBEDDING_KEY

    base = tiny_model("sd15_eps")
    width = 4 * h.TINY_SD15_UNET["model_channels"]  # the ldm UNet's timestep-embedding width
    table = torch.randn(4, width, generator=torch.Generator().manual_seed(5))
    info = TDMInfo(num_steps=4, base_family="sd15", k_choices=[1, 2, 4])
    h.write_safetensors(lora_folder, "unify.safetensors", {**kohya_unet_lora(), K_EMBEDDING_KEY: table}, info.to_safetensors_metadata())
    h.write_safetensors(lora_folder, "plain.safetensors", kohya_unet_lora(), info.to_safetensors_metadata())
    unify = loader().execute(base, "unify.safetensors", 1.0, True, 1.0).result[0]
    plain = loader().execute(base, "plain.safetensors", 1.0, True, 1.0).result[0]
    assert len(unify.patches) == 4
    assert k_embedding_wrapper(unify) is not None and k_embedding_wrapper(plain) is None and k_embedding_wrapper(base) is None
    cond = h.conditioning("sd15_eps")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    a = TDMKSampler.execute(unify, 0, 4, "auto", 1.0, cond, latent, 1.0).result[0]["samples"]
    b = TDMKSampler.execute(plain, 0, 4, "auto", 1.0, cond, latent, 1.0).result[0]["samples"]
    assert (a - b).abs().max() > 1e-3
