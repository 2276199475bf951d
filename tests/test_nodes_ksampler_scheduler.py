"""TDM KSampler == SamplerCustom + TDM Scheduler + TDM Sampler; the scheduler's grids (auto from the
LoRA metadata, denoise tail, custom, flow shift); node schemas as ComfyUI sees them."""
from __future__ import annotations

import asyncio

import pytest
import torch

import tdm_core
from tdm_core.metadata import TDMInfo
from tests.helpers import comfy_inprocess as h


def nodes():
    from comfyui_tdm_pack.nodes import node_defs

    return node_defs


def sampler_custom(model, seed, cfg, positive, negative, sampler, sigmas, latent):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    return SamplerCustom.execute(model, True, seed, cfg, positive, negative, sampler, sigmas, latent).result[0]["samples"]


@pytest.mark.parametrize("kind", ["sd15_eps", "sd3_flow", "flux"])
def test_tdm_ksampler_equals_sampler_custom_with_tdm_nodes(pack, tiny_model, kind):
    n = nodes()
    model = tiny_model(kind)
    cond = h.conditioning(kind)
    latent = {"samples": torch.zeros(1, h.latent_channels(kind), 8, 8)}
    one_node = n.TDMKSampler.execute(model, 42, 4, "reference", 1.0, cond, latent, 1.0).result[0]["samples"]
    sigmas = n.TDMScheduler.execute(model, 4, "reference", "", 1.0).result[0]
    sampler = n.TDMSampler.execute("tdm", 0.0, "reference").result[0]
    three_nodes = sampler_custom(model, 42, 1.0, cond, cond, sampler, sigmas, latent)
    torch.testing.assert_close(one_node, three_nodes, rtol=0, atol=0)
    other_seed = n.TDMKSampler.execute(model, 43, 4, "reference", 1.0, cond, latent, 1.0).result[0]["samples"]
    assert (other_seed - one_node).abs().max() > 1e-3


def test_img2img_denoise_equals_sampler_custom_and_uses_the_grid_tail(pack, tiny_model):
    n = nodes()
    model = tiny_model("sd15_eps")
    cond = h.conditioning("sd15_eps")
    image_latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))}
    one_node = n.TDMKSampler.execute(model, 5, 4, "reference", 1.0, cond, image_latent, 0.5).result[0]["samples"]
    sigmas = n.TDMScheduler.execute(model, 4, "reference", "", 0.5).result[0]
    three_nodes = sampler_custom(model, 5, 1.0, cond, cond, n.TDMSampler.execute("tdm", 0.0, "reference").result[0], sigmas, image_latent)
    torch.testing.assert_close(one_node, three_nodes, rtol=0, atol=0)
    full = n.TDMKSampler.execute(model, 5, 4, "reference", 1.0, cond, image_latent, 1.0).result[0]["samples"]
    assert (full - one_node).abs().max() > 1e-3

    ms = model.get_model_object("model_sampling")
    grid = tdm_core.reference_grid(4, 900)
    torch.testing.assert_close(sigmas, torch.cat([ms.sigma(torch.tensor(grid[-2:], dtype=torch.float32)), torch.zeros(1)]))
    assert n.TDMScheduler.execute(model, 4, "reference", "", 0.0).result[0].numel() == 0


def test_negative_is_optional_only_at_cfg_one(pack, tiny_model):
    n = nodes()
    model = tiny_model("sd15_eps")
    cond = h.conditioning("sd15_eps")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(ValueError, match="negative"):
        n.TDMKSampler.execute(model, 1, 4, "reference", 2.0, cond, latent, 1.0)
    negative = h.conditioning("sd15_eps", seed=99)
    guided = n.TDMKSampler.execute(model, 1, 4, "reference", 2.0, cond, latent, 1.0, negative=negative).result[0]["samples"]
    plain = n.TDMKSampler.execute(model, 1, 4, "reference", 1.0, cond, latent, 1.0).result[0]["samples"]
    assert (guided - plain).abs().max() > 1e-3


def sigmas_of(model, timesteps):
    ms = model.get_model_object("model_sampling")
    return torch.cat([ms.sigma(torch.tensor(timesteps, dtype=torch.float32)), torch.zeros(1)])


def test_grid_auto_reads_the_metadata_the_lora_loader_attached(pack, tiny_model, lora_folder):
    n = nodes()
    base = tiny_model("sd15_eps")
    lora = {"diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.randn(2, 32, 1, 1) * 0.01,
            "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.randn(32, 2, 1, 1) * 0.01}
    info = TDMInfo(num_steps=4, grid=[950, 700, 450, 150], total_steps=800, base_family="sd15", recommended_strength=0.5)
    h.write_safetensors(lora_folder, "meta.safetensors", lora, info.to_safetensors_metadata())
    model = n.TDMLoraLoader.execute(base, "meta.safetensors", 1.0, True, 1.0).result[0]

    torch.testing.assert_close(n.TDMScheduler.execute(model, 4, "auto", "", 1.0).result[0], sigmas_of(model, [950, 700, 450, 150]))
    # another K than the stored grid: the reference rule with the LoRA's own T
    torch.testing.assert_close(n.TDMScheduler.execute(model, 2, "auto", "", 1.0).result[0], sigmas_of(model, tdm_core.reference_grid(2, 800)))
    # no TDM LoRA: auto is the reference grid
    torch.testing.assert_close(n.TDMScheduler.execute(base, 4, "auto", "", 1.0).result[0], sigmas_of(base, tdm_core.reference_grid(4, 900)))
    # the KSampler's auto == SamplerCustom with the same timesteps given as a custom grid
    cond = h.conditioning("sd15_eps")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    via_auto = n.TDMKSampler.execute(model, 3, 4, "auto", 1.0, cond, latent, 1.0).result[0]["samples"]
    sigmas = n.TDMScheduler.execute(model, 4, "custom", "950, 700, 450, 150", 1.0).result[0]
    expected = sampler_custom(model, 3, 1.0, cond, cond, n.TDMSampler.execute("tdm", 0.0, "reference").result[0], sigmas, latent)
    torch.testing.assert_close(via_auto, expected, rtol=0, atol=0)


def test_presets_and_bad_custom_grids(pack, tiny_model):
    n = nodes()
    model = tiny_model("sd15_eps")
    torch.testing.assert_close(n.TDMScheduler.execute(model, 4, "cogvideox", "", 1.0).result[0], sigmas_of(model, [999, 856, 665, 399]))
    torch.testing.assert_close(n.TDMScheduler.execute(model, 4, "diffusers_trailing", "", 1.0).result[0], sigmas_of(model, [999, 749, 499, 249]))
    torch.testing.assert_close(n.TDMScheduler.execute(model, 3, "custom", "900, 500, 100", 1.0).result[0], sigmas_of(model, [900, 500, 100]))
    with pytest.raises(ValueError, match="decreasing"):
        n.TDMScheduler.execute(model, 4, "custom", "100, 500", 1.0)
    with pytest.raises(ValueError, match="not numbers"):
        n.TDMScheduler.execute(model, 4, "custom", "999, abc", 1.0)


def test_flow_model_uses_its_own_shift(pack, tiny_model):
    from comfy.model_sampling import time_snr_shift
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    n = nodes()
    model = tiny_model("sd3_flow")
    grid = tdm_core.reference_grid(4, 900)
    default = n.TDMScheduler.execute(model, 4, "reference", "", 1.0).result[0]
    expected3 = torch.tensor([time_snr_shift(3.0, t / 1000) for t in grid] + [0.0])
    torch.testing.assert_close(default, expected3)
    shifted_model = ModelSamplingSD3().patch(model, 6.0)[0]
    shifted = n.TDMScheduler.execute(shifted_model, 4, "reference", "", 1.0).result[0]
    torch.testing.assert_close(shifted, torch.tensor([time_snr_shift(6.0, t / 1000) for t in grid] + [0.0]))
    assert shifted[1] > default[1]


def test_node_schemas_have_tooltips_descriptions_and_the_agreed_names(pack):
    import importlib

    root = importlib.import_module(h.PACK_MODULE)
    extension = asyncio.run(root.comfy_entrypoint())
    node_list = asyncio.run(extension.get_node_list())
    schemas = {cls.define_schema().node_id: cls.define_schema() for cls in node_list}
    assert set(schemas) == {"TDMScheduler", "TDMSampler", "TDMKSampler", "TDMLoraLoader", "TDMDistill", "TDMPromptList"}
    expected_inputs = {
        "TDMScheduler": ["model", "steps", "grid", "custom_timesteps", "denoise"],
        "TDMSampler": ["solver", "gamma", "noise_start"],
        "TDMKSampler": ["model", "seed", "steps", "grid", "cfg", "positive", "latent_image", "denoise", "negative"],
        "TDMLoraLoader": ["model", "lora_name", "strength_model", "use_recommended_strength", "strength_clip", "clip"],
        "TDMDistill": ["model", "positive", "latent", "steps", "iterations", "cfg", "lora_rank", "fake_score_learning_rate",
                       "student_learning_rate", "batch_size", "seed", "gradient_checkpointing", "lora_name", "checkpoint_every", "negative",
                       "low_noise_model", "boundary"],
        "TDMPromptList": ["clip", "text", "prompt_file"],
    }
    for node_id, schema in schemas.items():
        assert schema.description, node_id
        assert [i.id for i in schema.inputs] == expected_inputs[node_id]
        assert all(i.tooltip for i in schema.inputs), node_id
        assert schema.category == {"TDMLoraLoader": "loaders", "TDMDistill": "training/tdm", "TDMPromptList": "training/tdm"}.get(node_id, "sampling/tdm")
    # new outputs go after the old ones, so saved workflows keep their links
    assert [o.get_io_type() for o in schemas["TDMDistill"].outputs] == ["MODEL", "LORA_MODEL", "STRING", "IMAGE", "MODEL", "LORA_MODEL"]
    assert [(o.get_io_type(), o.is_output_list) for o in schemas["TDMPromptList"].outputs] == [("CONDITIONING", True), ("CONDITIONING", False)]
    grid = next(i for i in schemas["TDMScheduler"].inputs if i.id == "grid")
    assert grid.options == ["auto", "reference", "diffusers_leading", "diffusers_trailing", "dpmsolver_leading_sd15", "cogvideox", "custom"]
    steps = next(i for i in schemas["TDMKSampler"].inputs if i.id == "steps")
    assert (steps.min, steps.max, steps.default) == (1, 8, 4)
    assert next(i for i in schemas["TDMKSampler"].inputs if i.id == "negative").optional


def test_models_without_a_discrete_schedule_get_a_clear_error(pack, tiny_model):
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    n = nodes()
    edm = ModelSamplingContinuousEDM().patch(tiny_model("sd15_eps"), "edm", 120.0, 0.002)[0]
    with pytest.raises(ValueError, match="TDM supports discrete VP models"):
        n.TDMScheduler.execute(edm, 4, "reference", "", 1.0)


def test_inpainting_mask_keeps_the_unmasked_latent(pack, tiny_model):
    """The sampler goes through ComfyUI's inpainting wrapper: where the mask is 0 the latent is kept."""
    n = nodes()
    model = tiny_model("sd15_eps")
    cond = h.conditioning("sd15_eps")
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0
    out = n.TDMKSampler.execute(model, 2, 4, "reference", 1.0, cond, {"samples": image, "noise_mask": mask}, 1.0).result[0]["samples"]
    torch.testing.assert_close(out[..., :4], image[..., :4], rtol=1e-5, atol=1e-5)
    assert (out[..., 4:] - image[..., 4:]).abs().max() > 1e-2


def test_v3_combo_values_are_checked_by_comfyui_validation(pack, lora_folder):
    """ComfyUI's own prompt validation (execution.validate_inputs) rejects combo values outside the
    lists, which 0.3.75 does not do by itself for V3 nodes."""
    import execution
    import nodes as comfy_nodes

    n = nodes()
    for cls in n.NODES:
        comfy_nodes.NODE_CLASS_MAPPINGS[cls.define_schema().node_id] = cls

    def validate(class_type, inputs):
        prompt = {"1": {"class_type": class_type, "inputs": inputs}}
        return asyncio.run(execution.validate_inputs("p", prompt, "1", {}))

    ok = validate("TDMSampler", {"solver": "tdm", "gamma": 0.0, "noise_start": "reference"})
    assert ok[0] is True, ok
    valid, errors, _ = validate("TDMSampler", {"solver": "euler", "gamma": 0.0, "noise_start": "reference"})
    assert not valid and {e["type"] for e in errors} == {"custom_validation_failed"} and "solver='euler'" in errors[0]["details"]

    h.write_safetensors(lora_folder, "listed.safetensors", {"x.lora_down.weight": torch.zeros(1, 1)})
    assert n.TDMLoraLoader.validate_inputs(lora_name="listed.safetensors") is True
    for bad in ("../listed.safetensors", "/etc/passwd", "missing.safetensors"):
        assert "not one of the choices" in n.TDMLoraLoader.validate_inputs(lora_name=bad)
    assert "grid='bogus'" in n.TDMScheduler.validate_inputs(grid="bogus")
    assert n.TDMKSampler.validate_inputs(grid="auto") is True


def test_split_sigmas_refuse_what_would_not_continue_the_trajectory(pack):
    # the first part of a SplitSigmas chain ends above 0: fine for the deterministic tdm solver; gamma > 0 would
    # redraw the first part's noise in the second sampler (each re-seeds), dpmpp_2m would lose its history
    from comfyui_tdm_pack.nodes.tdm_sampler import check_sigmas

    first_part = torch.tensor([14.6, 4.0, 1.2])
    check_sigmas(first_part, "tdm", 0.0)
    check_sigmas(torch.tensor([14.6, 4.0, 0.0]), "tdm", 0.5)  # a whole trajectory may re-noise
    with pytest.raises(ValueError, match="set gamma to 0 for split sampling"):
        check_sigmas(first_part, "tdm", 0.5)
    with pytest.raises(ValueError, match="end at 0"):
        check_sigmas(first_part, "dpmpp_2m", 0.0)
