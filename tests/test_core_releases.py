"""tdm_core.releases: which released TDM weight a file is, from its keys, container and base (host-free)."""
from __future__ import annotations

import pytest

from tdm_core.metadata import TDMInfo
from tdm_core.releases import RELEASES, recognise_release

KOHYA_UNET = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]
SD3_PEFT = ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
COGVIDEOX_PEFT = ["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight", "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"]
SD35_PEFT = SD3_PEFT + ["transformer.transformer_blocks.0.attn2.to_q.lora_A.weight", "transformer.transformer_blocks.0.attn2.to_q.lora_B.weight"]


@pytest.mark.parametrize("keys, file, base, expected", [
    (KOHYA_UNET, "tdm_dreamshaper.pt", "sd15", "tdm_dreamshaper"),
    (KOHYA_UNET, "any_name.bin", "sd15", "tdm_dreamshaper"),
    (KOHYA_UNET, "style.safetensors", "sd15", None),  # the release is a .pt: a kohya .safetensors is a user's LoRA
    (KOHYA_UNET, "tdm_dreamshaper.pt", "sdxl", None),
    (SD3_PEFT, "pytorch_lora_weights.safetensors", "sd3", "tdm_sd3_medium"),
    (SD3_PEFT, "pytorch_lora_weights.safetensors", "sd35", "tdm_sd35_medium"),  # keys alike: the base tells
    (SD35_PEFT, "pytorch_lora_weights.safetensors", "sd3", "tdm_sd35_medium"),  # attn2 exists only in SD3.5
    (SD3_PEFT + ["transformer.transformer_blocks.0.attn.to_q.alpha"], "x.safetensors", "sd3", None),
    (SD3_PEFT, "pytorch_lora_weights.safetensors", "flux", None),
    (COGVIDEOX_PEFT, "pytorch_lora_weights.safetensors", None, "tdm_cogvideox_2b"),  # attn1 without attn2: CogVideoX
    (COGVIDEOX_PEFT, "pytorch_lora_weights.safetensors", "sd3", "tdm_cogvideox_2b"),
    (COGVIDEOX_PEFT, "tdm.pt", "cogvideox", None),  # published as safetensors only
    (["ema_parameters.0", "ema_parameters.1"], "tdmr1_zimage_ema.ckpt", "z_image", "tdmr1_z_image_turbo"),
    (["ema_parameters.0", "ema_parameters.1"], "tdmr1_zimage_ema.ckpt", "sd15", None),
])
def test_a_release_is_told_by_keys_container_and_base(keys, file, base, expected):
    release = recognise_release(keys, {"format": "pt"}, file, base)
    assert (release.name if release else None) == expected


def test_files_with_tdm_metadata_speak_for_themselves():
    metadata = TDMInfo(base_family="sd3").to_safetensors_metadata()
    assert recognise_release(SD3_PEFT, metadata, "pytorch_lora_weights.safetensors", "sd3") is None


def test_release_metadata_round_trips_with_its_fractional_grid():
    info = RELEASES["tdm_sd3_medium"].info()
    assert info.grid == [999.0, 749.25, 499.5, 249.75] and info.recommended_strength == 0.125 and info.solver == "dpmpp_2m"
    assert TDMInfo.from_safetensors_metadata(info.to_safetensors_metadata()) == info
    assert RELEASES["tdm_dreamshaper"].info().grid == [801, 601, 401, 201]  # diffusers' DPM-Solver, SD1.5 config, 4 steps


def test_a_flow_grid_may_start_at_pure_noise_a_vp_grid_may_not():
    from tdm_core.grids import check_grid

    assert check_grid([1000, 750, 500, 250], 1000, flow=True) == [1000, 750, 500, 250]
    with pytest.raises(ValueError, match="outside 0..999"):
        check_grid([1000, 750, 500, 250], 1000)
