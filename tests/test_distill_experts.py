"""Issue 21: TDM Distill on a two-expert model (Wan 2.2 A14B: high-noise and low-noise transformers that hand
over at a boundary sigma), on two tiny Wan 2.1-architecture ComfyUI models with their own random weights,
both sampling with ModelSamplingSD3 shift 8 as ComfyUI's A14B templates do.

Each row of every call goes to the expert that owns its sigma; each expert's student LoRA learns only from
rows on its side (a boundary that gives every row to one expert leaves the other's LoRA at zero); both LoRAs
load in stock LoraLoader on their expert with no skipped key and reproduce the node's student there."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import comfy_inprocess as h
from tests.helpers.distill_workflows import WAN22_A14B_SPLIT_STEP
from tests.test_distill_node import stock_lora_loader

SHIFT = 8.0
KIND = "wan21"


def shifted(model):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    return ModelSamplingSD3().patch(model, SHIFT)[0]


@pytest.fixture(scope="module")
def experts(comfy, pack):
    with torch.inference_mode():
        high = shifted(h.build_model(KIND, seed=31))
        low = shifted(h.build_model(KIND, seed=32))
    positives = [h.conditioning(KIND, seed=s) for s in (1, 2, 4)]
    return {"high": high, "low": low, "positives": positives, "negative": h.conditioning(KIND, seed=3),
            "latent": {"samples": h.tiny_latent(KIND, size=8, frames=2)}}


def run(experts, name: str, boundary: float, iterations: int = 2, **extra):
    from comfyui_tdm_pack.nodes.node_defs import TDMDistill

    inputs = dict(model=experts["high"], positive=experts["positives"], latent=experts["latent"], steps=4, iterations=iterations, cfg=2.0,
                  lora_rank=4, fake_score_learning_rate=0.05, student_learning_rate=0.05, batch_size=4, seed=5, gradient_checkpointing=False,
                  lora_name=name, checkpoint_every=0, negative=experts["negative"], low_noise_model=experts["low"], boundary=boundary)
    inputs.update(extra)
    with torch.inference_mode():
        return TDMDistill.execute(**{k: [v] if k != "positive" else v for k, v in inputs.items()}).result


def test_each_row_goes_to_the_expert_that_owns_its_sigma(experts):
    from comfyui_tdm_pack.nodes.distill import Distiller, DistillOptions

    options = DistillOptions(batch_size=4, rank=4, cfg=2.0, boundary=0.875)
    with torch.inference_mode():
        distiller = Distiller(experts["high"], experts["positives"], experts["negative"], experts["latent"]["samples"].shape, options, experts["low"])
    rows = [0, 1, 2, 0]
    noise = torch.randn(distiller.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([899.0, 500.0, 449.0, 224.0], dtype=torch.float64)
    sigma = distiller.schedule.comfy_sigma(t)
    assert sigma[1] >= 0.875 > sigma[2], sigma  # sigma(449) = 0.867 at shift 8: steps 3 and 4 of K = 4 are the low expert's
    with torch.inference_mode(False), torch.no_grad():
        distiller.load()
        try:
            routed = distiller.iteration_denoisers(rows, noise).teacher(noise, t)
            alone = [distiller.expert_denoisers(e, rows, noise).teacher(noise, t) for e in (0, 1)]
        finally:
            distiller.release()
    for part in (0, 1):  # conditional and unconditional passes
        torch.testing.assert_close(routed[part][:2], alone[0][part][:2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(routed[part][2:], alone[1][part][2:], rtol=1e-5, atol=1e-6)
        assert (alone[0][part][2:] - alone[1][part][2:]).abs().max() > 1e-3  # the experts differ: the routing is seen


@pytest.mark.parametrize("boundary, trained", [(0.875, {"high", "low"}), (0.02, {"high"}), (0.99, {"low"})])
def test_each_experts_student_learns_only_from_its_side_of_the_boundary(experts, lora_folder, boundary, trained):
    # 3 iterations: the first student step is at warm-up rate 0, and in one more of batch 4 no row may fall on a side
    result = run(experts, f"a14b_{int(boundary * 1000)}", boundary, iterations=3)
    loras = {"high": result[1], "low": result[5]}
    for side, lora in loras.items():
        change = max(float(v.abs().max()) for k, v in lora.items() if k.endswith("lora_up.weight"))
        if side in trained:
            assert change > 1e-4, f"the {side}-noise student never trained ({change})"
        else:  # no row on its side: its LoRA B stays exactly zero
            assert change == 0.0, f"the {side}-noise student trained on the other expert's rows ({change})"
    assert (lora_folder / f"a14b_{int(boundary * 1000)}.safetensors").is_file()
    assert (lora_folder / f"a14b_{int(boundary * 1000)}_low_noise.safetensors").is_file()


def test_a_lora_name_with_its_extension_names_both_files_alike(experts, lora_folder):
    run(experts, "a14b_named.safetensors", 0.875, iterations=1)
    assert sorted(p.name for p in lora_folder.glob("a14b_named*")) == ["a14b_named.safetensors", "a14b_named_low_noise.safetensors"]


def test_with_every_row_on_the_high_noise_side_two_experts_train_as_one_model(experts):
    # the two-expert machinery (joint adapters, routing, one optimiser per role over both) must not change what is
    # learnt: a boundary below every trained sigma gives the run on the high-noise expert alone, bit for bit
    both = run(experts, "a14b_vs_one_both", 0.02, iterations=3)
    alone = run(experts, "a14b_vs_one_alone", 0.875, iterations=3, low_noise_model=None)
    assert both[1].keys() == alone[1].keys()
    assert all(torch.equal(both[1][k], alone[1][k]) for k in alone[1]), "the routed run learnt something else"
    assert max(float(v.abs().max()) for k, v in alone[1].items() if k.endswith("lora_up.weight")) > 1e-4  # it did learn


def test_two_experts_with_gradient_checkpointing_learn_what_they_learn_without(experts, monkeypatch):
    # the A14B workflow trains with checkpointing on: each routed row must be recomputed under its role's adapter
    from tests.test_distill_node import assert_same_lora_up_to_rounding, checkpointing_seen

    plain = run(experts, "a14b_ckpt_off", 0.875, iterations=3)
    wrapped = checkpointing_seen(monkeypatch)
    recomputed = run(experts, "a14b_ckpt_on", 0.875, iterations=3, gradient_checkpointing=True)
    assert wrapped and min(wrapped) > 0, wrapped
    for output in (1, 5):  # the high-noise and the low-noise student LoRA
        assert_same_lora_up_to_rounding(plain[output], recomputed[output])


def test_both_loras_load_in_stock_loraloader_on_their_expert(experts, lora_folder, caplog, monkeypatch):
    from comfyui_tdm_pack.nodes.distill import Distiller, DistillOptions
    from comfyui_tdm_pack.nodes.distill_adapters import STUDENT

    probe, release = {}, Distiller.release

    def recording_release(self):  # each expert's student x0 as the node trained it, just before it lets go
        if self.loaded and not probe:
            x_t = torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(7))
            t = torch.tensor([674.0, 674.0, 224.0, 224.0], dtype=torch.float64)
            with torch.inference_mode(False), torch.no_grad(), self.adapters.switch.use(STUDENT):
                probe.update(x_t=x_t, t=t, rows=[0, 1, 2, 0], experts=[self.expert_denoisers(e, [0, 1, 2, 0], x_t).student(x_t, t) for e in (0, 1)])
        release(self)

    monkeypatch.setattr(Distiller, "release", recording_release)
    result = run(experts, "a14b_pair", 0.875, iterations=3)
    assert "low-noise expert" in result[2]
    for number, (expert, name) in enumerate([(experts["high"], "a14b_pair.safetensors"), (experts["low"], "a14b_pair_low_noise.safetensors")]):
        loaded, skipped = stock_lora_loader(expert, name, caplog)
        assert not skipped, skipped
        with torch.inference_mode():
            distiller = Distiller(loaded, experts["positives"], experts["negative"], experts["latent"]["samples"].shape,
                                  DistillOptions(batch_size=4, rank=4))
        with torch.inference_mode(False), torch.no_grad():
            distiller.load()
            try:
                x0 = distiller.expert_denoisers(0, probe["rows"], probe["x_t"]).teacher(probe["x_t"], probe["t"])[0]
            finally:
                distiller.release()
        error = float((x0 - probe["experts"][number]).abs().max())
        assert error < 1e-4, f"expert {number}: stock LoraLoader's model is {error:.2e} from the node's student"


def test_experts_on_different_schedules_are_refused(experts):
    from comfyui_tdm_pack.nodes.distill import Distiller, DistillOptions
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    with torch.inference_mode():
        other = ModelSamplingSD3().patch(experts["low"], 5.0)[0]
    with pytest.raises(ValueError, match="same ModelSamplingSD3 shift"):
        Distiller(experts["high"], experts["positives"], experts["negative"], experts["latent"]["samples"].shape, DistillOptions(), other)
    with pytest.raises(ValueError, match="different architectures"):
        Distiller(experts["high"], experts["positives"], experts["negative"], experts["latent"]["samples"].shape, DistillOptions(),
                  h.build_model("sd15_eps", seed=1))


def stock_split_sampling(high_student, low_student, positive, negative, latent: dict, seed: int) -> torch.Tensor:
    """The workflow's student comparison (workflows/wan22_a14b_tdm_distill.json): TDM Scheduler on the high-noise
    student -> SplitSigmas at step 2 -> SamplerCustom + TDM Sampler on the high-noise student (with noise), then on
    the low-noise student from where it stopped (add_noise off)."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom, SplitSigmas
    from comfyui_tdm_pack.nodes.node_defs import TDMSampler, TDMScheduler

    sigmas = TDMScheduler.execute(high_student, 4, "auto", "", 1.0).result[0]
    high_sigmas, low_sigmas = SplitSigmas.execute(sigmas, WAN22_A14B_SPLIT_STEP).result
    sampler = TDMSampler.execute("tdm", 0.0, "reference").result[0]
    with torch.inference_mode():
        half = SamplerCustom.execute(high_student, True, seed, 1.0, positive, negative, sampler, high_sigmas, latent).result[0]
        return SamplerCustom.execute(low_student, False, seed, 1.0, positive, negative, sampler, low_sigmas, half).result[0]["samples"]


def test_the_two_student_models_split_the_stock_way_sample_as_the_nodes_routed_student(experts, lora_folder, monkeypatch):
    """The two MODEL outputs, sampled the stock two-model way (steps 1-2 on the high-noise student, 3-4 on the
    low-noise one at shift 8), give the node's own routed student sample (its probe: each call to the expert that
    owns its sigma) from the same noise, to 1e-4."""
    import comfy.sample
    from comfyui_tdm_pack.nodes.distill import Distiller
    from comfyui_tdm_pack.nodes.distill_adapters import STUDENT

    seed, latent = 11, {"samples": experts["latent"]["samples"]}
    noise = comfy.sample.prepare_noise(latent["samples"], seed)  # what SamplerCustom's add_noise draws
    probe, release = {}, Distiller.release

    def recording_release(self):  # the node's routed K-step student sample on the first prompt, as it trained it
        if self.loaded and not probe:
            sample = self.k_step_samples(STUDENT, [0], noise.to(self.device))  # in the model's latent space
            probe["node"] = self.patcher.model.process_latent_out(sample).cpu()  # as a sampler node outputs it
        release(self)

    monkeypatch.setattr(Distiller, "release", recording_release)
    result = run(experts, "a14b_split", 0.875, iterations=3)
    stock = stock_split_sampling(result[0], result[4], experts["positives"][0], experts["negative"], latent, seed)
    error = float((stock - probe["node"]).abs().max())
    assert error < 1e-4 * max(1.0, float(probe["node"].abs().max())), f"split sampling is {error:.2e} from the node's routed student"
    one_expert = stock_split_sampling(result[0], result[0], experts["positives"][0], experts["negative"], latent, seed)
    assert float((one_expert - probe["node"]).abs().max()) > 1e-2  # the second expert matters: the check sees the routing


def test_the_a14b_workflow_samples_its_students_as_checked_above():
    """workflows/wan22_a14b_tdm_distill.json's student comparison is the sampling the test above checks: TDM
    Scheduler on TDM Distill's MODEL, SplitSigmas at step 2, SamplerCustom with noise on MODEL, then add_noise off
    on low_noise_MODEL from the first one's output, both with the TDM Sampler at CFG 1."""
    import json

    workflow = json.loads((h.REPO_ROOT / "workflows" / "wan22_a14b_tdm_distill.json").read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source(node, name):  # (source node, its output slot) linked into input ``name``
        link = links[next(i["link"] for i in node["inputs"] if i["name"] == name)]
        return nodes[link[1]], link[2]

    first, second = sorted((n for n in nodes.values() if n["type"] == "SamplerCustom"), key=lambda n: n["widgets_values"][0], reverse=True)
    distill = next(n for n in nodes.values() if n["type"] == "TDMDistill")
    assert first["widgets_values"][0] is True and second["widgets_values"][0] is False  # add_noise
    assert first["widgets_values"][3] == second["widgets_values"][3] == 1.0  # cfg
    assert source(first, "model") == (distill, 0) and source(second, "model") == (distill, 4)
    assert source(second, "latent_image") == (first, 0)
    split, _ = source(first, "sigmas")
    assert split["type"] == "SplitSigmas" and split["widgets_values"] == [2]
    assert source(first, "sigmas") == (split, 0) and source(second, "sigmas") == (split, 1)
    scheduler, _ = source(split, "sigmas")
    assert scheduler["type"] == "TDMScheduler" and source(scheduler, "model") == (distill, 0) and scheduler["widgets_values"][:2] == [4, "auto"]
    for sampler in (first, second):
        tdm_sampler, _ = source(sampler, "sampler")
        assert tdm_sampler["type"] == "TDMSampler" and tdm_sampler["widgets_values"] == ["tdm", 0.0, "reference"]
    assert distill["widgets_values"][-1] == 0.875 and source(distill, "low_noise_model")[0]["type"] == "ModelSamplingSD3"
