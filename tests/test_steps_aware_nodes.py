"""A unify (steps-aware) LoRA in ComfyUI, in-process: the tiny diffusers UNet with the trainer's student
adapter and K table, exported as the trainer exports it, loaded on the ComfyUI twin of that UNet. Same seed,
K = 1 and K = 4: ComfyUI equals the training-side tdm_core sampler. The K condition lives only on the
clone that loaded the unify LoRA; stock LoraLoader on such a file skips the table."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from tdm_core import VPSchedule, reference_grid, sample_tdm
from tdm_core.metadata import TDMInfo
from tdm_core.steps_aware import K_EMBEDDING_KEY
from tests.helpers import comfy_inprocess as h
from training.lora_io import adapter_to_kohya
from training.models import STUDENT, adapter_state_dict, add_tdm_adapters, use_adapter
from training.steps_aware import install_k_embedding, k_embedding_tensors, num_steps

SEED = 7
K_CHOICES = [1, 2, 4]


@pytest.fixture(scope="module")
def setup(comfy, pack, tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("loras")
    h.set_lora_folder(folder)
    unet = h.tiny_diffusers_unet(seed=3)
    base = h.build_model("sd15_eps", diffusion_state_dict=h.comfy_unet_from_diffusers(unet))
    family = SimpleNamespace(name="sd15", network=unet, lora_target_modules=h.LORA_TARGETS)
    add_tdm_adapters(family, rank=h.LORA_RANK, alpha=h.LORA_ALPHA)
    install_k_embedding(unet, K_CHOICES)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a trained-looking student: LoRA B factors and the K table away from their zero init
        for name, p in unet.named_parameters():
            if ".student." in name and (".lora_B." in name or ".lora_k_table" in name):
                p.copy_((0.3 if ".lora_B." in name else 1.0) * torch.randn(p.shape, generator=g))
    lora = adapter_to_kohya(adapter_state_dict(unet, STUDENT), "lora_unet", h.LORA_ALPHA)
    info = TDMInfo(num_steps=max(K_CHOICES), grid=[], total_steps=900, base_family="sd15", k_choices=K_CHOICES,
                   lora_rank=h.LORA_RANK, lora_alpha=h.LORA_ALPHA)
    unify = h.write_safetensors(folder, "unify.safetensors", {**lora, **k_embedding_tensors(unet)}, info.to_safetensors_metadata())
    plain = h.write_safetensors(folder, "plain.safetensors", lora)
    return {"unet": unet, "base": base, "unify": unify, "plain": plain, "folder": folder}


def load(model, name):
    """The TDM LoRA Loader node: LoRA weights patched, K-embedding installed on its output model."""
    from comfyui_tdm_pack.nodes.node_defs import TDMLoraLoader

    return TDMLoraLoader.execute(model, name, 1.0, True, 1.0).result[0]


def ksample(model, k, grid="auto", denoise=1.0, latent=None):
    from comfyui_tdm_pack.nodes.node_defs import TDMKSampler

    latent = latent or {"samples": torch.zeros(2, 4, 8, 8)}
    return TDMKSampler.execute(model, SEED, k, grid, 1.0, h.conditioning("sd15_eps", batch=2), latent, denoise).result[0]["samples"]


def training_side_sample(setup, k):
    """The trainer's student (PEFT adapter + K hook) through tdm_core.sample_tdm on the K-step reference grid."""
    import comfy.sample

    unet, cond = setup["unet"], h.conditioning("sd15_eps", batch=2)[0][0]
    noise = comfy.sample.prepare_noise(torch.zeros(2, 4, 8, 8), SEED)

    def student(x, t):
        with use_adapter(unet, STUDENT), num_steps(unet, k):
            return unet(x, t.float(), encoder_hidden_states=cond).sample

    x0 = sample_tdm(student, noise, reference_grid(k, 900), VPSchedule.from_config(), "epsilon")
    return setup["base"].model.process_latent_out(x0)


@pytest.mark.parametrize("k", [1, 4])
def test_comfyui_sample_equals_training_side_sampler_at_k(setup, k):
    got = ksample(load(setup["base"], setup["unify"]), k)
    torch.testing.assert_close(got, training_side_sample(setup, k), rtol=1e-3, atol=1e-3)


def test_k_condition_changes_the_sample_and_samplercustom_path_agrees(setup):
    import comfy.sample

    from comfyui_tdm_pack.nodes.node_defs import TDMSampler, TDMScheduler

    unify, plain = load(setup["base"], setup["unify"]), load(setup["base"], setup["plain"])
    assert (ksample(unify, 4) - ksample(plain, 4)).abs().max() > 1e-2  # E[4] is not a no-op
    # SamplerCustom + TDM Scheduler + TDM Sampler: the wrapper infers K from the sigmas it samples
    cond = h.conditioning("sd15_eps", batch=2)
    sigmas = TDMScheduler.execute(unify, 4, "auto", "", 1.0).result[0]
    sampler = TDMSampler.execute("tdm", 0.0, "reference").result[0]
    latent = torch.zeros(2, 4, 8, 8)
    custom = comfy.sample.sample_custom(unify, comfy.sample.prepare_noise(latent, SEED), 1.0, sampler, sigmas, cond, cond, latent, disable_pbar=True, seed=SEED)
    torch.testing.assert_close(custom, ksample(unify, 4), rtol=1e-5, atol=1e-5)


def test_img2img_tail_is_conditioned_on_the_whole_k(setup):
    """denoise 0.5 at K=4 samples timesteps 449, 224 only: the model must still run with E[4], not E[2]."""
    from comfyui_tdm_pack.nodes.steps_aware import NUM_STEPS_OPTION

    unify = load(setup["base"], setup["unify"])
    image = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))}

    def forced(k):  # a host that states K through transformer_options
        clone = unify.clone()
        clone.model_options["transformer_options"][NUM_STEPS_OPTION] = k
        return clone

    inferred = ksample(unify, 4, denoise=0.5, latent=image)
    torch.testing.assert_close(inferred, ksample(forced(4), 4, denoise=0.5, latent=image), rtol=0, atol=0)
    assert (inferred - ksample(forced(2), 4, denoise=0.5, latent=image)).abs().max() > 1e-3


def test_unify_then_plain_on_the_same_base_keeps_models_apart(setup):
    from comfyui_tdm_pack.nodes.steps_aware import k_embedding_wrapper

    base = setup["base"]
    unify = load(base, setup["unify"])
    first = ksample(unify, 4)
    plain = load(base, setup["plain"])
    assert k_embedding_wrapper(plain) is None and plain.get_attachment("tdm_k_embedding") is None
    assert k_embedding_wrapper(base) is None
    plain_out = ksample(plain, 4)
    torch.testing.assert_close(ksample(unify, 4), first, rtol=0, atol=0)  # the first model is unchanged
    assert (plain_out - first).abs().max() > 1e-2
    # the plain LoRA samples as the trainer's student with its K table unused
    unet = setup["unet"]
    table = unet.tdm_k_embedding.table(STUDENT)
    saved = table.detach().clone()
    with torch.no_grad():
        table.zero_()
    try:
        torch.testing.assert_close(plain_out, training_side_sample(setup, 4), rtol=1e-3, atol=1e-3)
    finally:
        with torch.no_grad():
            table.copy_(saved)


def test_stock_lora_loader_skips_the_table_and_says_so(setup, caplog):
    import comfy.sd
    import comfy.utils

    path = setup["folder"] / setup["unify"]
    lora = comfy.utils.load_torch_file(str(path))
    with caplog.at_level(logging.WARNING):
        stock, _ = comfy.sd.load_lora_for_models(setup["base"], None, lora, 1.0, 0.0)
    assert f"lora key not loaded: {K_EMBEDDING_KEY}" in caplog.text
    from comfyui_tdm_pack.nodes.steps_aware import k_embedding_wrapper

    assert k_embedding_wrapper(stock) is None
    # it applies every LoRA weight: the same model as the plain LoRA, sampling without the K condition
    torch.testing.assert_close(ksample(stock, 4), ksample(load(setup["base"], setup["plain"]), 4), rtol=0, atol=0)


def test_bad_tables_are_clear_errors(setup):
    from comfyui_tdm_pack.nodes.steps_aware import install_k_embedding as install_on_model

    model = setup["base"].clone()
    info = TDMInfo(k_choices=[1, 2, 4])
    with pytest.raises(ValueError, match="width 64 but this model's timestep embedding has width 128"):
        install_on_model(model, torch.zeros(4, 64), info, 1.0, "wide.safetensors")
    with pytest.raises(ValueError, match=r"K in \[1, 2, 4\] but the K-embedding has only 2 rows"):
        install_on_model(model, torch.zeros(2, 128), info, 1.0, "short.safetensors")
    install_on_model(model, torch.zeros(2, 128), TDMInfo(k_choices=[1, 2]), 1.0, "ok.safetensors")
    with pytest.raises(ValueError, match=r"K=\[4\] has no row.*1 to 2 steps"):
        ksample(model, 4, grid="reference")
