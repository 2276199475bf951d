"""Issue 21, every architecture: the TDM Distill node on tiny models of each family ComfyUI 0.3.75 loads (its own
``comfy.supported_models`` classes at toy widths, random weights), run as ComfyUI's executor runs it. For each: an
iteration runs, the LoRA file loads in stock LoraLoader with no key skipped, and teacher + that file is the
student as the node trained it to 1e-4. Conditionings made by stock nodes: Wan image-to-video's concat latent and
mask (``WanImageToVideo`` with a tiny real Wan 2.1 VAE), Qwen-Image-Edit's and Flux Kontext's ``ReferenceLatent``, Flux guidance.
The schedule tests fail when the node reads the wrong sigma for a timestep (e.g. ignores a shift)."""
from __future__ import annotations

import math
import re

import pytest
import torch

from tests.helpers import comfy_inprocess as h
from tests.test_distill_node import run_node, stock_lora_loader, trained_student_probe, x0_of_model

TOLERANCE = 1e-4  # teacher + LoRA file vs the node's student (fp32; measured at most ~1e-6)
MOVED = 1e-4  # the student must have left the teacher by more than the tolerance, or the equality says nothing

# case -> the tiny model kind and how its prompts are conditioned
CASES = {
    "sd15": "sd15_eps", "sdxl": "sdxl", "sd3": "sd3_flow", "flux1": "flux", "flux2": "flux2", "z_image": "z_image",
    "qwen_image": "qwen_image", "wan21_t2v": "wan21", "wan22_5b": "wan22_5b", "wan_i2v": "wan_i2v",
    "qwen_image_edit": "qwen_image", "flux1_kontext": "flux", "hunyuan_video15": "hunyuan_video15",
}
# the reference latent of an edit case, as VAEEncode gives it (Qwen-Image's VAE latent has a frame axis)
REFERENCE_SHAPE = {"qwen_image_edit": (1, 16, 1, 8, 8), "flux1_kontext": (1, 16, 8, 8)}


def wan_i2v(positives: list, negative: list, start_image: torch.Tensor) -> tuple:
    """Stock WanImageToVideo on each prompt (as ComfyUI runs a node over a list) and on the empty prompt, with a
    tiny real Wan 2.1 VAE: the start image's latent and the mask that keeps its frame go into every conditioning.
    Returns the positives, the negative and the node's latent (64 x 64 px, 5 frames: 8 x 8 latent, 2 frames)."""
    from comfy_extras.nodes_wan import WanImageToVideo

    vae = h.build_wan_vae()
    with torch.inference_mode():
        runs = [WanImageToVideo.execute(c, negative, vae, 64, 64, 5, 1, start_image=start_image).result for c in positives]
    return [r[0] for r in runs], runs[0][1], runs[0][2]["samples"]


def reference_latent(conditioning: list, reference: torch.Tensor) -> list:
    """Stock ReferenceLatent (Qwen-Image-Edit, Flux Kontext): the reference appended to ``reference_latents``."""
    from comfy_extras.nodes_edit_model import ReferenceLatent

    return ReferenceLatent.execute(conditioning, {"samples": reference}).result[0]


def case_graph(case: str) -> dict:
    """Teacher MODEL, three prompts, the empty prompt and the latent for ``case``."""
    kind = CASES[case]
    with torch.inference_mode():
        model = h.build_model(kind, seed=21)
    positives = [h.conditioning(kind, seed=s) for s in (1, 2, 4)]
    negative = h.conditioning(kind, seed=3)
    latent = h.tiny_latent(kind, size=8, frames=2)
    g = torch.Generator().manual_seed(9)
    if kind in ("flux", "flux2"):  # stock FluxGuidance, a different distilled guidance than the encoder's default
        from comfy_extras.nodes_flux import FluxGuidance

        positives = [FluxGuidance.execute(c, 2.5).result[0] for c in positives]
    if case == "wan_i2v":  # one start image for every prompt
        positives, negative, latent = wan_i2v(positives, negative, torch.rand(1, 64, 64, 3, generator=g))
        assert "concat_latent_image" in positives[0][0][1] and "concat_mask" in negative[0][1]
    if case in REFERENCE_SHAPE:  # a different reference image per prompt (an edit data set)
        shape = REFERENCE_SHAPE[case]
        positives = [reference_latent(c, torch.randn(shape, generator=g)) for c in positives]
        negative = reference_latent(negative, torch.zeros(shape))
    return {"model": model, "positives": positives, "negative": negative, "latent": {"samples": latent}, "kind": kind}


@pytest.mark.parametrize("case", list(CASES))
def test_the_node_distils_the_architecture_and_its_lora_loads_in_stock_loraloader(case, comfy, pack, lora_folder, caplog, monkeypatch):
    from tdm_core.lora_files import read_lora_file

    graph = case_graph(case)
    probe = trained_student_probe(monkeypatch)
    _, lora, report = run_node(graph, f"student_{case}", iterations=2, rate=0.05, latent=graph["latent"])[:3]
    assert "changed by" in report, report
    state, metadata = read_lora_file(str(lora_folder / f"student_{case}.safetensors"))
    assert set(state) == set(lora) and state, "the file is not the LORA_MODEL output"
    from tdm_core.metadata import TDMInfo

    info = TDMInfo.from_safetensors_metadata(metadata)
    assert info is not None and info.base_family, f"{case}: the file names no base family ({metadata})"

    loaded, skipped = stock_lora_loader(graph["model"], f"student_{case}.safetensors", caplog)
    assert not skipped, skipped
    assert len(loaded.patches) == len(state) // 3, "LoraLoader patched fewer layers than the file has"
    trained = probe["x0"]
    error = (x0_of_model(loaded, probe) - trained).abs().max().item()
    moved = (trained - x0_of_model(graph["model"], probe)).abs().max().item()
    print(f"{case}: {len(state) // 3} layers, |teacher + LoRA - student| = {error:.2e}, |student - teacher| = {moved:.2e}")
    assert error < TOLERANCE, f"{case}: teacher + the file is not the student the node trained ({error:.2e})"
    assert moved > MOVED, f"{case}: the student never left the teacher ({moved:.2e}): the equality above says nothing"


@pytest.mark.parametrize("case", ["wan_i2v", "qwen_image_edit", "flux1_kontext"])
def test_each_row_of_a_batched_conditioning_is_its_prompt_alone(case, comfy, pack):
    """Batching prompts keeps each row's I2V image / edit reference: the teacher's x0 of a batch of rows (1, 0)
    equals each prompt's x0 run on its own."""
    import comfy.model_management

    from comfyui_tdm_pack.nodes.distill import sampled_latent_shape
    from comfyui_tdm_pack.nodes.distill_conditions import batch_conditioning, processed_conds
    from comfyui_tdm_pack.nodes.distill_model import model_x0
    from comfyui_tdm_pack.nodes.distill_schedule import schedule_of

    graph = case_graph(case)
    model, positives = graph["model"], graph["positives"]
    x_t = torch.randn((2, *sampled_latent_shape(model, graph["latent"]["samples"].shape)[1:]), generator=torch.Generator().manual_seed(4))
    t = torch.tensor([700, 300])

    def x0(rows, x, times):
        conds = processed_conds(model, {"positive": batch_conditioning(positives, rows)}, torch.zeros_like(x), 0)
        return model_x0(model, schedule_of(model), [conds["positive"]], x, times)[0]

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model])
        model.pre_run()
        try:
            batched = x0([1, 0], x_t, t)
            alone = torch.cat([x0([1], x_t[:1], t[:1]), x0([0], x_t[1:], t[1:])])
            other_prompt = x0([0], x_t[:1], t[:1])
        finally:
            model.cleanup()
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    assert (alone[0] - other_prompt[0]).abs().max() > 1e-3, "the prompts' conditionings do not differ: the test says nothing"


def test_the_lora_targets_are_each_architectures_block_layers(comfy, pack):
    """The rule (tdm_core.lora_targets): attention and MLP linears inside transformer blocks; no embedder or
    modulation, and no final layer except Flux's and Flux.2's (one ComfyUI rule; the trainer's Flux targets include proj_out); SD1.5's set is
    the one the trainer's TRANSFORMER_BLOCK_TARGETS gives."""
    from comfyui_tdm_pack.nodes.distill_adapters import target_layers, targets_of
    from tdm_core.lora_targets import TRANSFORMER_BLOCK_TARGETS, comfy_block_targets

    in_a_block = re.compile(r"\.\w*(blocks|layers|refiner)\.\d+\.")  # e.g. double_blocks.0., layers.0., noise_refiner.0.
    for kind in sorted(set(CASES.values())):
        model = h.build_model(kind, seed=1)
        names = list(target_layers(model, targets_of(model)))
        assert names, kind
        final = {n for n in names if n == "diffusion_model.final_layer.linear"}
        assert final == ({"diffusion_model.final_layer.linear"} if kind in ("flux", "flux2") else set()), (kind, final)
        outside = [n for n in names if n not in final and (not in_a_block.search(n) or re.search(r"mod\b|modulation|adaLN|norm", n))]
        assert not outside, (kind, outside)
    sd15 = h.build_model("sd15_eps", seed=1)
    assert set(target_layers(sd15, targets_of(sd15))) == set(target_layers(sd15, TRANSFORMER_BLOCK_TARGETS))
    with pytest.raises(ValueError, match="no LoRA target rule for ComfyUI's MMDiT"):
        comfy_block_targets("MMDiT")


def test_backward_through_fluxs_in_place_residuals_is_the_true_gradient(comfy, pack):
    """Flux's blocks add into their residual stream in place; the node's LayerNorm input copies let backward run,
    and the gradient it gives (with and without gradient checkpointing) is the finite-difference one."""
    from comfyui_tdm_pack.nodes.distill import Distiller, DistillOptions
    from comfyui_tdm_pack.nodes.distill_adapters import STUDENT

    positives = [h.conditioning("flux", seed=s) for s in (1, 2)]
    latent = h.tiny_latent("flux")
    x_t = torch.randn((2, *latent.shape[1:]), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([700, 300])
    weights = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(6))
    for checkpointing in (False, True):
        model = h.build_model("flux", seed=21)
        distiller = Distiller(model, positives, None, latent.shape, DistillOptions(rank=4, batch_size=2, cfg=1.0, gradient_checkpointing=checkpointing))
        params = distiller.adapters.parameters(STUDENT)
        g = torch.Generator().manual_seed(7)
        direction = [torch.randn(p.shape, generator=g) for p in params]
        with torch.inference_mode(False):
            with torch.no_grad():
                for p in params:  # a student away from zero, so every LoRA matrix gets a gradient
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
            distiller.load()
            student = distiller.iteration_denoisers([0, 1], x_t).student

            def objective():
                return (student(x_t, t) * weights).sum()

            with torch.enable_grad(), distiller.adapters.switch.use(STUDENT):
                objective().backward()
            analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
            eps, values = 1e-3, []
            with torch.no_grad():
                for sign in (1, -1):
                    for p, d in zip(params, direction):
                        p.add_(sign * eps * d)
                    values.append(objective().item())
                    for p, d in zip(params, direction):
                        p.sub_(sign * eps * d)
            distiller.release()
        numeric = (values[0] - values[1]) / (2 * eps)
        assert math.isclose(analytic, numeric, rel_tol=2e-3), (checkpointing, analytic, numeric)


def test_fluxs_time_shift_is_tdm_cores_linear_shift_at_exp_mu(comfy):
    """ComfyUI's flux_time_shift(mu, 1, t) = exp(mu) / (exp(mu) + 1/t - 1) is tdm_core's flow_shift(t, exp(mu))."""
    import comfy.model_sampling

    from tdm_core.schedules import flow_shift

    t = torch.linspace(1e-3, 1.0, 1000, dtype=torch.float64)
    for mu in (0.5, 1.15, 2.02, math.log(3.0)):
        torch.testing.assert_close(comfy.model_sampling.flux_time_shift(mu, 1.0, t), flow_shift(t, math.exp(mu)), rtol=1e-12, atol=0)


def shifted(kind: str, node: str | None):
    """A tiny MODEL with its sampling set as a graph sets it (stock ModelSampling* nodes) or left at its default."""
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow, ModelSamplingFlux, ModelSamplingSD3

    model = h.build_model(kind, seed=1)
    if node == "ModelSamplingSD3":
        return ModelSamplingSD3().patch(model, 6.0)[0]
    if node == "ModelSamplingAuraFlow":
        return ModelSamplingAuraFlow().patch_aura(model, 4.5)[0]
    if node == "ModelSamplingFlux":  # Flux's resolution-dependent mu at 1024 x 768
        return ModelSamplingFlux().patch(model, 1.15, 0.5, 1024, 768)[0]
    return model


@pytest.mark.parametrize("kind, node", [
    ("flux", None), ("flux", "ModelSamplingFlux"), ("qwen_image", None), ("flux2", None), ("sd3_flow", "ModelSamplingSD3"),
    ("z_image", "ModelSamplingAuraFlow"), ("wan21", None), ("hunyuan_video15", None), ("sdxl", None),
])
def test_the_node_trains_at_the_models_own_sigma_for_each_timestep(comfy, pack, kind, node):
    """At tdm_core's integer timesteps (the grid and others), the sigma the node's denoisers pass to ComfyUI is
    the MODEL's own ``model_sampling.sigma`` of that timestep in the model's units: t / T for ModelSamplingFlux,
    t * multiplier / T for a discrete flow (SD3: 1000, Z-Image / AuraFlow: 1), t for a VP table."""
    import comfy.model_sampling

    from comfyui_tdm_pack.nodes.distill import DistillOptions
    from comfyui_tdm_pack.nodes.distill_schedule import schedule_of

    model = shifted(kind, node)
    sampling = model.get_model_object("model_sampling")
    timesteps = torch.tensor(DistillOptions().grid() + [1, 37, 250, 500, 999])
    t = timesteps.double()
    if isinstance(sampling, comfy.model_sampling.ModelSamplingFlux):
        expected = sampling.sigma(t / 1000)
    elif isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow):
        expected = sampling.sigma(t * float(sampling.multiplier) / 1000)
    else:
        expected = sampling.sigma(t)
    trained = schedule_of(model).comfy_sigma(timesteps)
    torch.testing.assert_close(trained.double(), expected.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["flux", "wan21"])
def test_a_bf16_dit_trains_fp32_loras(comfy, pack, kind):
    """ComfyUI loads Flux and Wan in bf16: the node trains on such a base with float32 LoRA masters and AdamW state
    (updates smaller than bf16's step must not round away), and both adapters get finite, non-zero gradients."""
    from comfyui_tdm_pack.nodes.distill import Distiller, DistillOptions

    model = h.build_model(kind, seed=21, dtype=torch.bfloat16)
    assert model.model.get_dtype() == torch.bfloat16
    positives = [h.conditioning(kind, seed=s) for s in (1, 2)]
    distiller = Distiller(model, positives, h.conditioning(kind, seed=3), h.tiny_latent(kind).shape, DistillOptions(rank=4, batch_size=2))
    try:
        with torch.inference_mode():
            metrics = [distiller.iterate() for _ in range(2)]
    finally:
        distiller.release()
    h.assert_fp32_training_state(distiller)
    assert all(math.isfinite(m[k]) and m[k] > 0 for m in metrics for k in ("loss_fake", "loss_student", "grad_norm_fake", "grad_norm_student"))


def test_model_variants_name_their_base_family(comfy, pack):
    # the family goes into the LoRA's metadata and the TDM LoRA Loader refuses a LoRA of another family; variants
    # ComfyUI detects as subclasses (Wan 2.1 I2V with CLIP vision, Flux schnell, Wan 2.2) must not come out nameless
    import comfy.supported_models as models
    from comfyui_tdm_pack.nodes.lora_apply import config_family

    expected = {"WAN21_I2V": "wan", "WAN22_T2V": "wan", "WAN21_T2V": "wan", "FluxSchnell": "flux", "Flux": "flux", "Flux2": "flux2",
                "ZImage": "z_image", "Lumina2": "", "HunyuanVideo15": "hunyuan_video15", "HunyuanVideo": "", "SD15": "sd15",
                "SSD1B": "", "KOALA_1B": "", "SD15_instructpix2pix": "", "SDXL": "sdxl"}  # pruned / 8-channel: not their parent's
    assert {name: config_family(getattr(models, name)) for name in expected} == expected
