"""The TDM-R1 Z-Image-Turbo release: a torch file ``{"ema_parameters": [tensor, ...]}`` without key names, in the
order of the trainable parameters of Z-Image-Turbo's transformer wrapped by peft with the README's LoraConfig (r 32,
alpha 64). The TDM LoRA Loader names it from the ComfyUI model's own depth and samples it on the nodes' defaults as
the authors' diffusers recipe does (``load_ema``, ``num_inference_steps=5`` = 4 calls that matter, guidance 0);
``training.convert`` names it by enumerating peft's parameters on the meta device. The file here is a tiny Z-Image's,
written the way the authors' loader reads it (the real one is not reachable here)."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import comfy_inprocess as h
from tests.helpers.tiny_zimage import comfy_zimage_model, save_tiny_zimage

torch.set_num_threads(1)
RESOLUTION = 32
PROMPTS = ["a red cat", "a big dog"]  # 28 caption tokens each (padded to 32 by both models: see test_z_image_lora)
CAPTION = 28
RELEASE_FILE = "tdmr1_zimage_ema.ckpt"
# the authors' pipeline ran its scheduler with sigma_min 0: 5 steps are these unshifted sigmas, the last one a no-op
AUTHORS_SIGMAS = [1.0, 0.75, 0.5, 0.25, 0.0]


def peft_wrapped(transformer):
    """The README's get_peft_model(transformer, LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", ...))."""
    from peft import LoraConfig, get_peft_model

    from tdm_core.releases import TDMR1_LORA_CONFIG

    return get_peft_model(copy.deepcopy(transformer), LoraConfig(**TDMR1_LORA_CONFIG, init_lora_weights="gaussian"), adapter_name="tdmr1")


def trainable(network) -> list:
    return [p for n, p in network.named_parameters() if "tdmr1" in n and p.requires_grad]  # the README's load_ema order


@pytest.fixture(scope="module")
def release(pack, tmp_path_factory):
    import comfy.model_management
    import comfy.model_patcher

    from training.models import load_family

    root = tmp_path_factory.mktemp("tdmr1")
    folder = save_tiny_zimage(root / "z_image_turbo", comfy_twin=True)
    family = load_family(str(folder))
    trained = peft_wrapped(family.network)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a trained LoRA: B away from its zero init
        for p in trainable(trained):
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    loras = root / "loras"
    loras.mkdir()
    torch.save({"ema_parameters": [p.detach().clone() for p in trainable(trained)]}, loras / RELEASE_FILE)
    h.set_lora_folder(loras)
    base = comfy.model_patcher.ModelPatcher(comfy_zimage_model(family.network), load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
    return {"family": family, "folder": folder, "loras": loras, "base": base}


def tdm_load(model, name):
    from comfyui_tdm_pack.nodes.node_defs import TDMLoraLoader

    return TDMLoraLoader.execute(model, name, 1.0, True, 1.0).result  # the node's defaults


def tdm_ksample(model, cond, noise_like, seed=7):
    from comfyui_tdm_pack.nodes.node_defs import TDMKSampler

    return TDMKSampler.execute(model, seed, 4, "auto", 1.0, cond, {"samples": torch.zeros_like(noise_like)}, 1.0).result[0]["samples"]


def authors_recipe(setup, noise):
    """The TDM-R1 README: a fresh peft model, load_ema (copy the list in order), ZImagePipeline at 5 steps, guidance 0."""
    family = setup["family"]
    network = peft_wrapped(family.network)
    ema = torch.load(setup["loras"] / RELEASE_FILE, weights_only=True)["ema_parameters"]
    params = trainable(network)
    assert len(params) == len(ema)
    with torch.no_grad():
        for param, value in zip(params, ema):
            param.copy_(value)
    pipe = copy.copy(family.pipeline)
    pipe.transformer = network
    with torch.no_grad():
        return pipe(prompt=PROMPTS, height=RESOLUTION, width=RESOLUTION, num_inference_steps=5, sigmas=AUTHORS_SIGMAS,
                    guidance_scale=0.0, latents=noise, output_type="latent").images


def test_the_loaders_order_is_peft_s_on_the_real_and_the_tiny_model(release):
    from tdm_core.releases import RELEASES, z_image_peft_order
    from training.convert import POSITIONAL_CONFIGS, peft_parameter_names

    r1 = RELEASES["tdmr1_z_image_turbo"]
    names, width = peft_parameter_names(r1, POSITIONAL_CONFIGS["z_image"])  # Z-Image-Turbo's shipped config, meta device
    assert (len(names), width) == (272, 3840) and names == z_image_peft_order(30, 2)
    tiny = release["family"].network.config
    assert peft_parameter_names(r1, release["folder"])[0] == z_image_peft_order(tiny.n_layers, tiny.n_refiner_layers)


def test_tdmr1_release_samples_as_the_authors_recipe_with_node_defaults(release):
    model, _, settings = tdm_load(release["base"], RELEASE_FILE)
    assert settings.startswith("TDM-R1 Z-Image-Turbo LoRA: strength 1, tdm at timesteps [1000, 750, 500, 250], flow shift 3, cfg 1")
    cond = release["family"].encode_prompts(PROMPTS)
    conditioning = [[cond["prompt_embeds"][:, :CAPTION], {}]]
    noise_like = torch.zeros(release["family"].latent_shape(2, RESOLUTION))
    got = tdm_ksample(model, conditioning, noise_like)
    import comfy.sample

    noise = comfy.sample.prepare_noise(noise_like, 7)
    expected = release["base"].model.process_latent_out(authors_recipe(release, noise))
    assert (got - tdm_ksample(release["base"], conditioning, noise_like)).abs().max() > 1e-2  # the LoRA is on
    torch.testing.assert_close(got, expected, rtol=5e-4, atol=5e-4)


def test_converted_tdmr1_loads_in_stock_comfyui_and_samples_the_same(release):
    import comfy.sd

    from tdm_core.lora_files import read_lora_file
    from tdm_core.metadata import TDMInfo
    from training.convert import main

    out = release["loras"] / "tdmr1_z_image_turbo.safetensors"
    assert main([str(release["loras"] / RELEASE_FILE), "--output", str(out), "--model-config", str(release["folder"])]) == 0
    tensors, metadata = read_lora_file(str(out))
    info = TDMInfo.from_safetensors_metadata(metadata)
    assert (info.release, info.grid, info.flow_shift, info.solver) == ("tdmr1_z_image_turbo", [1000, 750, 500, 250], 3.0, "tdm")
    assert all(k.startswith("diffusion_model.") for k in tensors)
    stock, _ = comfy.sd.load_lora_for_models(release["base"], None, tensors, 1.0, 0.0)
    assert sum(len(p) for p in stock.patches.values()) == len([k for k in tensors if k.endswith(".lora_A.weight")])  # none skipped
    converted, _, _ = tdm_load(release["base"], out.name)
    raw, _, _ = tdm_load(release["base"], RELEASE_FILE)
    cond = release["family"].encode_prompts(PROMPTS[:1])
    conditioning, noise_like = [[cond["prompt_embeds"][:, :CAPTION], {}]], torch.zeros(release["family"].latent_shape(1, RESOLUTION))
    torch.testing.assert_close(tdm_ksample(converted, conditioning, noise_like), tdm_ksample(raw, conditioning, noise_like), rtol=1e-5, atol=1e-5)


def test_a_list_that_does_not_fit_is_refused_and_nothing_is_loaded_or_written(release, tiny_model, capsys):
    from training.convert import main

    ema = torch.load(release["loras"] / RELEASE_FILE, weights_only=True)["ema_parameters"]
    torch.save({"ema_parameters": ema[:-1]}, release["loras"] / "short.ckpt")
    with pytest.raises(ValueError, match="lists 23 tensors, but this model's peft LoRA \\(r=32\\) has 24"):
        tdm_load(release["base"], "short.ckpt")
    torch.save({"ema_parameters": [t[:, :8] if t.shape[0] == 32 else t for t in ema]}, release["loras"] / "narrow.ckpt")
    with pytest.raises(ValueError, match="has shape \\(32, 8\\), this model needs \\(32, 1024\\)"):
        tdm_load(release["base"], "narrow.ckpt")
    with pytest.raises(ValueError, match="found one for Z-Image-Turbo \\(TDM-R1's positional parameter list"):
        tdm_load(tiny_model("sd15_eps"), RELEASE_FILE)  # another base: not recognised, refused by name
    out = release["loras"] / "short.safetensors"
    assert main([str(release["loras"] / "short.ckpt"), "--output", str(out), "--model-config", str(release["folder"])]) == 2
    assert "lists 23 tensors" in capsys.readouterr().err and not out.exists()
