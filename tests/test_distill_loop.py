"""One TDM iteration on tiny real diffusers models of every family: losses finite, each optimiser
moves its own adapter and only that one, the teacher (base weights) stays bit-identical."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.tiny_models import save_tiny_pipeline
from training.config import DistillConfig, validate
from training.distill import build_parts
from tdm_core.iteration import fake_score_objective, roll_out, student_objective
from training.loop import FAKE_SCORE, STUDENT, denoisers, optimiser_step, tdm_iteration
from training.validation import student_grids, validation_columns

FAMILY_CASES = {  # case -> (tiny family, build options)
    "sd15_eps": ("sd15", {}),
    "sd15_v": ("sd15", {"prediction_type": "v_prediction"}),
    "sdxl": ("sdxl", {}),
    "pixart": ("pixart", {}),
    "sd3_flow": ("sd3", {}),
}


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    torch.set_num_threads(1)
    return {case: save_tiny_pipeline(family, root / case, **options) for case, (family, options) in FAMILY_CASES.items()}


def make_parts(model, tmp_path, **options):
    from accelerate import Accelerator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    cfg = validate(DistillConfig(model=str(model), prompts=str(prompts), output=str(tmp_path / "lora.safetensors"),
                                 lora_rank=4, batch_size=2, lr_warmup_steps=0, **options))
    parts, latent_shape = build_parts(cfg, Accelerator())
    return parts, latent_shape


def phases(parts, cond, null_cond, noise):
    """The iteration's three phases on the trainer's own denoisers: roll-out, fake-score loss, student loss."""
    d, settings, schedule = denoisers(parts, cond, null_cond), parts.settings(), parts.family.schedule
    rollout = roll_out(d.student, noise, settings, schedule)
    return (rollout,
            lambda: fake_score_objective(d, rollout, settings, schedule, parts.generator),
            lambda: student_objective(d, rollout, settings, schedule, parts.generator))


def snapshot(network, which: str) -> dict[str, torch.Tensor]:
    """Copies of the base weights ("base") or of one adapter's LoRA weights."""
    named = network.named_parameters()
    if which == "base":
        return {n: p.detach().clone() for n, p in named if ".lora_" not in n}
    return {n: p.detach().clone() for n, p in named if f".{which}." in n and ".lora_" in n}


def changed(before: dict, network) -> bool:
    now = dict(network.named_parameters())
    return any(not torch.equal(now[n], t) for n, t in before.items())


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_iterations_train_both_adapters_and_never_the_teacher(case, model_folders, tmp_path):
    parts, latent_shape = make_parts(model_folders[case], tmp_path, cfg=2.0)
    network = parts.family.network
    base, student, fake = snapshot(network, "base"), snapshot(network, STUDENT), snapshot(network, FAKE_SCORE)
    assert student and fake and base
    cond = parts.family.encode_prompts(["a red cat", "a blue dog"])
    null_cond = parts.family.null_condition(2)
    for _ in range(2):
        metrics = tdm_iteration(parts, cond, null_cond, latent_shape)
        assert math.isfinite(metrics["loss_fake"]) and math.isfinite(metrics["loss_student"])
        assert metrics["grad_norm_fake"] > 0 and metrics["grad_norm_student"] > 0
    assert changed(student, network), "the student adapter did not move"
    assert changed(fake, network), "the fake-score adapter did not move"
    assert not changed(base, network), "a base (teacher) weight changed"
    columns = validation_columns(parts.family, cond, null_cond, 2, None, "cpu", parts.grid, 900, 2.0, teacher_steps=3)
    assert len(columns) == 4 and all(c.shape == columns[0].shape and c.shape[:2] == (2, 3) for c in columns)
    # decoded images, not saturated ones: most pixels lie strictly inside (0, 1) before any clamp bites
    assert all(((c > 0) & (c < 1)).float().mean() > 0.5 for c in columns)
    assert not torch.equal(columns[0], columns[1]), "teacher and 1-step student columns are the same image"


def test_validation_uses_the_trained_grid_for_its_own_k():
    assert student_grids([999, 856, 665, 399], 900) == [[899], [899, 449], [999, 856, 665, 399]]
    assert student_grids([899, 449], 900) == [[899], [899, 449], [899, 674, 449, 224]]


def test_each_optimiser_step_moves_its_own_adapter_only(model_folders, tmp_path):
    # METHOD.md pitfall: switching PEFT adapters can silently leave one of them without gradient
    parts, latent_shape = make_parts(model_folders["sd15_eps"], tmp_path)
    network, family = parts.family.network, parts.family
    cond, null_cond = family.encode_prompts(["a red cat", "a blue dog"]), family.null_condition(2)
    for _ in range(2):  # the second round runs with non-zero LoRA B in both adapters
        _, fake_loss, student_loss = phases(parts, cond, null_cond, torch.randn(latent_shape))
        student, fake = snapshot(network, STUDENT), snapshot(network, FAKE_SCORE)
        optimiser_step(parts, FAKE_SCORE, fake_loss())
        assert changed(fake, network) and not changed(student, network)
        student, fake = snapshot(network, STUDENT), snapshot(network, FAKE_SCORE)
        optimiser_step(parts, STUDENT, student_loss())
        assert changed(student, network) and not changed(fake, network)
    assert all(p.requires_grad for name in (STUDENT, FAKE_SCORE) for p in parts.params[name])


def test_student_loss_vanishes_when_fake_score_equals_teacher_at_cfg_1(model_folders, tmp_path):
    # at init both adapters are the teacher (LoRA B = 0): with w = 1 the target is x0_hat itself
    parts, latent_shape = make_parts(model_folders["sd15_eps"], tmp_path, cfg=1.0, distance="l2")
    cond, null_cond = parts.family.encode_prompts(["a red cat", "a blue dog"]), parts.family.null_condition(2)
    noise = torch.randn(latent_shape)
    loss = phases(parts, cond, null_cond, noise)[2]()
    assert float(loss.detach()) < 1e-10
    loss_w2 = phases(make_parts(model_folders["sd15_eps"], tmp_path, cfg=2.0, distance="l2")[0], cond, null_cond, noise)[2]()
    assert float(loss_w2.detach()) > 1e-6


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_teacher_pair_is_conditional_then_unconditional(model_folders, tmp_path, batch_cfg):
    # tdm_core.iteration reads the teacher's pair as (cond, uncond): a swap here would distil the wrong guidance
    from training.loop import network_output

    parts, latent_shape = make_parts(model_folders["sd15_eps"], tmp_path, cfg=3.0, batch_cfg=batch_cfg)
    cond, null_cond = parts.family.encode_prompts(["a red cat", "a blue dog"]), parts.family.null_condition(2)
    x_t, t = torch.randn(latent_shape), torch.tensor([700.0, 300.0])
    with torch.no_grad():
        pair = denoisers(parts, cond, null_cond).teacher(x_t, t)
        expected = network_output(parts, None, x_t, t, cond), network_output(parts, None, x_t, t, null_cond)
    assert not torch.allclose(expected[0], expected[1])
    for got, want in zip(pair, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
