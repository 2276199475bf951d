"""Issue 21: the TDM Distill run's checkpoints, Cancel and resume, progress-bar previews and loss plot, on the
tiny SD1.5 built from ComfyUI's own classes, run under inference mode as ComfyUI's executor runs nodes.

Resume equivalence: a run of N iterations cancelled (ComfyUI's interrupt flag) after M and queued again equals
the uninterrupted N-iteration run from the same seed bit for bit (both LoRAs, the loss history, the
probe points); on CPU every kernel is deterministic, so no tolerance is needed."""
from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import comfy_executor as ex
from tests.helpers import comfy_inprocess as h

LATENT = {"samples": torch.zeros(1, 4, 8, 8)}
TEXTS = list(h.SD15_PROMPTS)
N, M, EVERY = 6, 3, 2  # iterations, cancel after, checkpoint interval
SETTINGS = dict(steps=4, iterations=N, cfg=2.0, rank=4, fake_score_lr=0.02, student_lr=0.02, batch_size=2, seed=3)


@pytest.fixture(scope="module")
def graph(comfy, pack):
    torch.set_num_threads(1)
    return h.sd15_graph()


@pytest.fixture(scope="module")
def loras(comfy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    h.set_lora_folder(folder)
    return folder


class Hook:
    """A progress-bar hook that does what the server's does (main.py: it raises the interrupt itself when Cancel
    was pressed); presses Cancel at iteration ``cancel_at`` (``late``: just after the hook's check, so the node's
    own check before the next iteration is the one that raises)."""

    def __init__(self, cancel_at: int | None = None, late: bool = False):
        self.calls, self.cancel_at, self.late = [], cancel_at, late

    def __call__(self, value, total, preview, node_id=None):
        import comfy.model_management

        self.calls.append((value, total, preview))
        if value == self.cancel_at and not self.late:
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()
        if value == self.cancel_at and self.late:
            comfy.model_management.interrupt_current_processing(True)


def run(graph, name: str, hook: Hook | None = None, every: int = EVERY, **changes):
    import comfy.model_management
    import comfy.utils

    from comfyui_tdm_pack.nodes.distill import DistillOptions
    from comfyui_tdm_pack.nodes.distill_run import distill

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with torch.inference_mode():
            return distill(graph["model"], changes.pop("positives", graph["positives"]), graph["negative"], LATENT,
                           DistillOptions(**{**SETTINGS, **changes}), name, every)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)


@pytest.fixture(scope="module")
def previews_on(comfy):
    """ComfyUI's previews as with --preview-method latent2rgb (the default is none: no previews, as for KSampler)."""
    from comfy.cli_args import LatentPreviewMethod, args

    saved, args.preview_method = args.preview_method, LatentPreviewMethod.Latent2RGB
    yield
    args.preview_method = saved


@pytest.fixture(scope="module")
def straight(graph, loras, previews_on):
    """The uninterrupted N-iteration run, with the hook's calls."""
    hook = Hook()
    result = run(graph, "straight", hook)
    return result, hook.calls


def cancelled(graph, name: str, at: int = M, late: bool = False, **changes):
    import comfy.model_management

    hook = Hook(cancel_at=at, late=late)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(graph, name, hook, **changes)
    assert [c[0] for c in hook.calls] == list(range(1, at + 1)), "iterations ran after Cancel"


def assert_same_run(a, b) -> None:
    assert a.history == b.history, "loss histories differ"
    assert a.probes == b.probes, "probe points differ"
    for role in ("lora", "fake_score"):
        x, y = getattr(a, role), getattr(b, role)
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), f"the {role} LoRAs differ"


def test_cancel_keeps_a_checkpoint_and_the_same_inputs_resume_to_the_uninterrupted_run(graph, loras, straight):
    from comfyui_tdm_pack.nodes.distill_checkpoint import read

    result, _ = straight
    assert not (loras / "straight.tdmckpt").exists(), "a finished run left its checkpoint (a new queue would resume it)"
    cancelled(graph, "resumed")
    saved = read(str(loras / "resumed.tdmckpt"))
    assert saved["iteration"] == M, "Cancel did not save the state of the last whole iteration"
    assert saved["history"] == result.history[:M]
    assert not (loras / "resumed.safetensors").exists()
    hook = Hook()
    resumed = run(graph, "resumed", hook)
    assert resumed.report.startswith(f"Resumed from checkpoint resumed.tdmckpt at iteration {M}."), resumed.report
    assert [c[0] for c in hook.calls] == list(range(M, N + 1)), "the progress bar does not continue where the run stopped"
    assert_same_run(resumed, result)
    assert not (loras / "resumed.tdmckpt").exists()
    assert result.history[0] != result.history[-1] and result.probes[-1][1] > 0.0, "the runs did not train: equality says nothing"


def test_a_periodic_checkpoint_alone_resumes_to_the_same_run(graph, loras, straight, monkeypatch):
    """A crash (no save at Cancel) loses the iterations after the last periodic checkpoint, nothing else."""
    from comfyui_tdm_pack.nodes import distill_checkpoint
    from comfyui_tdm_pack.nodes.distill_checkpoint import read

    result, _ = straight
    periodic_only = distill_checkpoint.Checkpoints.save

    def save_unless_cancelled(self, distiller, state):
        if self.due(state.iteration, N):
            periodic_only(self, distiller, state)

    monkeypatch.setattr(distill_checkpoint.Checkpoints, "save", save_unless_cancelled)
    cancelled(graph, "crashed", at=M)  # saves only at multiples of EVERY: iteration 2
    monkeypatch.undo()
    assert read(str(loras / "crashed.tdmckpt"))["iteration"] == EVERY * (M // EVERY)
    resumed = run(graph, "crashed")
    assert resumed.report.startswith(f"Resumed from checkpoint crashed.tdmckpt at iteration {EVERY * (M // EVERY)}.")
    assert_same_run(resumed, result)


def test_a_checkpoint_of_other_settings_is_not_resumed(graph, loras, straight):
    from comfyui_tdm_pack.nodes.distill_checkpoint import read

    result, _ = straight
    cancelled(graph, "changed", at=3, late=True)  # Cancel seen by the node's own check before iteration 4
    assert read(str(loras / "changed.tdmckpt"))["iteration"] == 3, "the node's own Cancel check did not save"
    fresh = run(graph, "changed", seed=SETTINGS["seed"] + 1)
    assert "was made with a different settings: not resumed, started fresh" in fresh.report, fresh.report
    assert len(fresh.history) == N and fresh.history[0] != result.history[0]
    cancelled(graph, "changed", at=2)
    fresh = run(graph, "changed", positives=graph["positives"][::-1])
    assert "was made with a different prompts: not resumed" in fresh.report, fresh.report
    (loras / "broken.tdmckpt").write_bytes(b"not a checkpoint")
    assert "Checkpoint broken.tdmckpt is unreadable" in run(graph, "broken", iterations=1).report


def test_the_fingerprint_tells_apart_model_prompts_latent_and_settings(graph, comfy):
    """What may not be resumed across: the model's weights, a LoRA in the graph, its shift, the prompts, the
    empty prompt, the latent shape, the settings; what may (iterations, gradient checkpointing) is left out."""
    import comfy.sd
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    from comfyui_tdm_pack.nodes.distill import DistillOptions
    from comfyui_tdm_pack.nodes.distill_fingerprint import run_fingerprint

    model, positives, negative, options = graph["model"], graph["positives"], graph["negative"], DistillOptions(**SETTINGS)
    shape = (2, 4, 8, 8)
    base = run_fingerprint(model, positives, negative, shape, options)

    def changed(**kw) -> list[str]:
        args = dict(model=model, positives=positives, negative=negative, latent_shape=shape, options=options) | kw
        fp = run_fingerprint(args["model"], args["positives"], args["negative"], args["latent_shape"], args["options"])
        return [part for part in base if fp[part] != base[part]]

    assert changed() == []
    other_weights = h.build_model("sd15_eps", seed=22)
    lora_key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    lora = {f"{lora_key}.lora_up.weight": torch.full((32, 2), 0.1), f"{lora_key}.lora_down.weight": torch.full((2, 32), 0.1)}
    with torch.inference_mode():
        with_lora = comfy.sd.load_lora_for_models(model, None, lora, 0.5, 0)[0]
        stronger = comfy.sd.load_lora_for_models(model, None, lora, 0.7, 0)[0]
        other_lora = comfy.sd.load_lora_for_models(model, None, {k: v * 2 for k, v in lora.items()}, 0.5, 0)[0]
        v_pred = ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    assert len(with_lora.patches) == 1
    assert changed(model=other_weights) == ["model"]
    assert changed(model=with_lora) == ["model"] and changed(model=stronger) == ["model"]
    for other in (stronger, other_lora):  # another strength, another LoRA at the same strength
        assert run_fingerprint(with_lora, positives, negative, shape, options)["model"] != run_fingerprint(other, positives, negative, shape, options)["model"]
    assert changed(model=v_pred) == ["model"]
    from comfy_extras.nodes_freelunch import FreeU

    free_u = FreeU().patch(model, 1.1, 1.2, 0.9, 0.2)[0]  # a model patch (an output-block function), no weight patch
    assert not free_u.patches and changed(model=free_u) == ["model"]
    stronger_free_u = FreeU().patch(model, 1.3, 1.2, 0.9, 0.2)[0]  # its scales live in the function's closure
    assert run_fingerprint(free_u, positives, negative, shape, options)["model"] != run_fingerprint(stronger_free_u, positives, negative, shape, options)["model"]
    assert run_fingerprint(free_u, positives, negative, shape, options) == run_fingerprint(FreeU().patch(model, 1.1, 1.2, 0.9, 0.2)[0], positives, negative, shape, options)
    assert changed(positives=positives[:2]) == ["prompts"]
    assert changed(negative=positives[0]) == ["negative"]
    assert changed(latent_shape=(2, 4, 16, 8)) == ["latent shape"]
    for field, value in dict(steps=2, cfg=3.0, rank=8, batch_size=1, seed=4, student_lr=0.01, distance="huber", fake_score_updates=1).items():
        assert changed(options=DistillOptions(**{**SETTINGS, field: value})) == ["settings"], field
    assert changed(options=DistillOptions(**{**SETTINGS, "iterations": 99, "gradient_checkpointing": True})) == []


def test_the_progress_bar_shows_the_students_sample_as_it_trains(straight):
    """Every iteration of this short run (monitor interval 1) sends ComfyUI's preview tuple, the first
    prompt's K-step student sample decoded by the latent previewer; it changes as the student trains."""
    import numpy as np

    _, calls = straight
    assert [c[:2] for c in calls] == [(i, N) for i in range(1, N + 1)]
    previews = [c[2] for c in calls]
    assert all(p is not None and p[0] == "JPEG" and p[1].size == (8, 8) for p in previews), previews
    first, last = (np.asarray(p[1], dtype=np.float32) for p in (previews[0], previews[-1]))
    assert np.abs(first - last).mean() > 1.0, "the preview did not change while the student trained"


def test_the_preview_is_the_students_k_step_sample(graph, straight, previews_on):
    """The last preview is the trained student's K-step sample of the first prompt on the probe noise: the
    returned MODEL (teacher + the LoRA file) sampled by TDM KSampler's path from that noise, decoded by the same
    previewer, gives the same picture (within 2 of 255: the file's model is the student to 1e-4)."""
    import comfy.samplers
    import latent_preview
    import numpy as np

    from comfyui_tdm_pack.nodes.comfy_sigmas import tdm_sigmas
    from comfyui_tdm_pack.nodes.tdm_sampler import TDMSamplerObject
    from tdm_core import progress

    result, calls = straight
    assert f"changed by {100 * result.probes[-1][1]:.1f}%" in result.report, "the report's number is not the last probe point"
    noise = torch.randn((len(TEXTS), 4, 8, 8), generator=torch.Generator().manual_seed(progress.PROBE_SEED))[:1]
    with torch.inference_mode():
        guider = comfy.samplers.CFGGuider(result.model)
        guider.inner_set_conds({"positive": graph["positives"][0]})
        guider.set_cfg(1.0)
        sample = guider.sample(noise, torch.zeros_like(noise), TDMSamplerObject("tdm"), tdm_sigmas(result.model, 4, "reference", "", 1.0),
                               disable_pbar=True, seed=0)
    model_space = result.model.model.latent_format.process_in(sample)
    previewer = latent_preview.get_previewer(result.model.load_device, result.model.model.latent_format)
    expected = np.asarray(previewer.decode_latent_to_preview_image("JPEG", model_space)[1], dtype=np.int16)
    shown = np.asarray(calls[-1][2][1], dtype=np.int16)
    assert np.abs(shown - expected).max() <= 2, np.abs(shown - expected).max()
    assert np.abs(shown - np.asarray(calls[0][2][1], dtype=np.int16)).max() > 2, "the comparison cannot tell samples apart"


def test_the_loss_plot_is_an_image_of_both_losses_and_the_probe(straight):
    result, _ = straight
    plot = result.plot
    assert plot.shape == (1, 420, 640, 3) and plot.dtype == torch.float32
    assert 0.0 <= float(plot.min()) and float(plot.max()) <= 1.0
    pixels = (plot[0] * 255).round().to(torch.int64)
    colours = {tuple(c) for c in pixels.reshape(-1, 3).tolist()}
    for rgb in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):  # fake-score, student, probe curves
        assert rgb in colours, f"curve colour {rgb} is missing: a curve was not drawn"
    assert (pixels.sum(-1) < 600).float().mean() > 0.01, "the plot is blank"


def test_comfyuis_executor_reruns_a_cancelled_node_and_it_resumes(graph, loras, straight, pack):
    """The real executor does not cache a node that raised (Cancel), so queueing the same graph again runs it
    again and it resumes; the finished result equals the uninterrupted run's; a third queue is served from
    ComfyUI's cache (the node does not run, and there is no checkpoint left to resume)."""
    import comfy.model_management
    import comfy.utils

    result, _ = straight
    ex.register(pack.NODES)
    graph_api = {
        "1": ex.source("model", graph["model"]),
        "2": ex.source("clip", graph["clip"]),
        "3": ex.source("latent", LATENT),
        "4": {"class_type": "TDMPromptList", "inputs": {"clip": ["2", 0], "text": "\n".join(TEXTS), "prompt_file": "(none)"}},
        "5": {"class_type": "TDMDistill", "inputs": {
            "model": ["1", 0], "positive": ["4", 0], "negative": ["4", 1], "latent": ["3", 0], "steps": 4, "iterations": N, "cfg": 2.0,
            "lora_rank": 4, "fake_score_learning_rate": 0.02, "student_learning_rate": 0.02, "batch_size": 2, "seed": 3,
            "gradient_checkpointing": False, "lora_name": "queued", "checkpoint_every": EVERY}},
    }
    executor = ex.new_executor()
    try:
        comfy.utils.set_progress_bar_global_hook(Hook(cancel_at=M))
        events = [m[0] for m in ex.run(executor, graph_api, ["5"])]
        assert "execution_interrupted" in events and (loras / "queued.tdmckpt").exists(), events
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
        messages = ex.run(executor, graph_api, ["5"])
        assert "execution_success" in [m[0] for m in messages]
        model, lora, report, plot = (out[0] for out in ex.cached_output(executor, "5")[:4])
        assert report.startswith(f"Resumed from checkpoint queued.tdmckpt at iteration {M}."), report
        assert all(torch.equal(lora[k], result.lora[k]) for k in result.lora)
        assert not (loras / "queued.tdmckpt").exists()
        messages = ex.run(executor, graph_api, ["5"])
        cached = next(m[1]["nodes"] for m in messages if m[0] == "execution_cached")
        assert "5" in cached, "the finished node ran again"
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
        ex.clear()
        executor.reset()
    assert os.listdir(loras)  # the LoRA files are there


def test_an_fp16_base_resumes_with_its_loss_scalers(graph, tmp_path):
    """Under an fp16 base each adapter has a GradScaler (ComfyUI loads SD1.5 in fp16 on CUDA). A distiller restored
    from a checkpoint after two iterations has the scalers' state (scale, growth tracker), AdamW states and
    generator of the original, and its third iteration equals the original's bit for bit."""
    from comfyui_tdm_pack.nodes.distill import Distiller, DistillOptions
    from comfyui_tdm_pack.nodes.distill_checkpoint import RunState, read, restore, save

    model = h.build_model("sd15_eps", seed=21)
    model.model.diffusion_model.to(torch.float16)
    model.model.diffusion_model.dtype = torch.float16  # what ComfyUI's loader sets for an fp16 UNet
    options, path = DistillOptions(**SETTINGS), str(tmp_path / "half.tdmckpt")

    def distiller():
        return Distiller(model, graph["positives"], graph["negative"], LATENT["samples"].shape, options)

    original = distiller()
    try:
        original.iterate(), original.iterate()
        save(path, original, RunState(iteration=2), {})
        third = original.iterate()
    finally:
        original.release()
    saved = read(path)["distiller"]
    # a scaler's growth tracker counts its role's unskipped steps: 2 student steps, 2 x fake_score_updates fake-score ones
    assert {role: s["_growth_tracker"] for role, s in saved["scalers"].items()} == {"student": 2, "fake_score": 2 * options.fake_score_updates}
    resumed = distiller()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            resumed.load()
            restore(resumed, saved)
        assert {r: s.state_dict() for r, s in resumed.scalers.items()} == saved["scalers"]
        assert resumed.iterate() == third
    finally:
        resumed.release()
