"""Mixed precision trains like fp32: whole ``training.distill`` runs on a tiny real SD1.5 folder.

The base runs in bf16 / fp16 under autocast, the LoRA weights and AdamW state stay fp32
(training.precision, training.models.add_tdm_adapters), fp16 with one loss scaler per optimiser.
Torch runs bf16 and fp16 autocast and GradScaler on the CPU, so both paths train here for real.
"""
from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from tests.helpers.distill_runs import distill_args, tiny_teacher
from training.checkpoint import list_checkpoints, load_checkpoint
from training.config import parse_config
from training.distill import EXIT_OK, build_parts, main
from training.models import FAKE_SCORE, STUDENT, adapter_state_dict

STEPS = 24
# the old default rate: bf16 LoRA weights lost nearly every update of it
RUN = ("--max-train-steps", STEPS, "--learning-rate", "2e-5", "--lr-warmup-steps", 0, "--checkpoint-every", 0,
       "--probe-every", 0, "--num-steps", 2)
# Agreement with the fp32 run after STEPS steps, on each adapter's weight change B @ A. Measured (seed 0):
# fake score: relative difference 0.038 (bf16), 0.010 (fp16); student: cosine 0.81 (bf16), 0.98 (fp16),
# norm ratio 0.93 / 0.99. The student agrees less because its gradient is the small difference of the
# teacher's and the fake score's x0 predictions (METHOD.md step 6), which bf16's 8-bit mantissa rounds.
FAKE_REL_TOLERANCE = {"bf16": 0.1, "fp16": 0.03}
STUDENT_MIN_COSINE = {"bf16": 0.7, "fp16": 0.95}
# share of lora_A entries an optimiser step ever changed; bf16-stored LoRA weights (the old behaviour)
# changed 2.8 % (student) and 12 % (fake score) of them at this learning rate, fp32 ones all
MIN_CHANGED_SHARE = 0.99


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_teacher(tmp_path_factory.mktemp("mixed_precision"))


@pytest.fixture(scope="module")
def runs(teacher, tmp_path_factory):
    """Initial adapters, and the final adapters and outputs of one run per precision, same seed."""
    root = tmp_path_factory.mktemp("mp_runs")
    init_cfg = parse_config(distill_args(teacher, root / "init.safetensors", *RUN))
    parts, _ = build_parts(init_cfg, Accelerator())
    init = {name: adapter_state_dict(parts.family.network, name) for name in (STUDENT, FAKE_SCORE)}
    results = {}
    for mode in ("no", "bf16", "fp16"):
        output = root / mode / "tdm.safetensors"
        assert main(distill_args(teacher, output, *RUN, "--mixed-precision", mode)) == EXIT_OK
        adapters, state = load_checkpoint(list_checkpoints(root / mode / "tdm_run")[-1])
        results[mode] = {"adapters": adapters, "state": state, "lora": load_file(str(output))}
    return init, results


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_every_lora_entry_moves_in_mixed_precision(runs, mode):
    init, results = runs
    for name in (STUDENT, FAKE_SCORE):
        final = results[mode]["adapters"][name]
        # against the initial values in the stored dtype: a rounded copy of an unchanged entry is unchanged
        changed = {k: (final[k] != init[name][k].to(final[k].dtype)).float() for k in init[name]}
        assert all(c.mean() > 0 for c in changed.values()), f"{mode}: a {name} LoRA tensor never changed"
        share = float(torch.cat([c.flatten() for k, c in changed.items() if "lora_A" in k]).mean())
        assert share > MIN_CHANGED_SHARE, f"{mode}: only {100 * share:.1f}% of the {name} lora_A entries ever changed"


def weight_deltas(adapter: dict) -> torch.Tensor:
    """Every adapted layer's B @ A (the LoRA's change of W up to its constant scale), concatenated."""
    parts = []
    for key in sorted(k for k in adapter if k.endswith("lora_A.weight")):
        down, up = adapter[key].float(), adapter[key.replace("lora_A", "lora_B")].float()
        parts.append((up.flatten(1) @ down.flatten(1)).flatten())
    return torch.cat(parts)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_mixed_precision_deltas_agree_with_fp32(runs, mode):
    # compared as B @ A: A and B alone are not identifiable (AdamW moves each entry by about lr with the sign
    # of its gradient, and the tiny gradients of A around B = 0 flip sign with any rounding)
    _, results = runs
    ref, got = weight_deltas(results["no"]["adapters"][FAKE_SCORE]), weight_deltas(results[mode]["adapters"][FAKE_SCORE])
    rel = float((got - ref).norm() / ref.norm())
    assert rel < FAKE_REL_TOLERANCE[mode], f"{mode} fake score: relative difference of the LoRA weight change {rel:.3f}"
    ref, got = weight_deltas(results["no"]["adapters"][STUDENT]), weight_deltas(results[mode]["adapters"][STUDENT])
    cosine = float(torch.nn.functional.cosine_similarity(got, ref, dim=0))
    assert cosine > STUDENT_MIN_COSINE[mode], f"{mode} student: cosine {cosine:.3f} to the fp32 run's weight change"
    assert 0.8 < float(got.norm() / ref.norm()) < 1.25


def test_adapters_and_optimiser_state_stay_fp32_while_the_base_is_bf16(teacher, tmp_path):
    cfg = parse_config(distill_args(teacher, tmp_path / "x.safetensors", *RUN, "--mixed-precision", "bf16"))
    parts, _ = build_parts(cfg, Accelerator())
    network = parts.family.network
    adapter_dtypes = {p.dtype for name in (STUDENT, FAKE_SCORE) for p in parts.params[name]}
    base_dtypes = {p.dtype for n, p in network.named_parameters() if ".lora_" not in n}
    assert adapter_dtypes == {torch.float32} and base_dtypes == {torch.bfloat16}
    assert not parts.scalers  # bf16 needs no loss scaling


def test_fp16_keeps_one_loss_scale_per_optimiser_in_its_checkpoint(runs):
    _, results = runs
    scalers = results["fp16"]["state"]["grad_scalers"]
    assert set(scalers) == {STUDENT, FAKE_SCORE}
    assert all(s["scale"] > 1 for s in scalers.values())
    assert "grad_scalers" not in results["bf16"]["state"] and "grad_scalers" not in results["no"]["state"]


def test_exported_lora_keeps_the_requested_dtype(runs, teacher, tmp_path):
    _, results = runs
    assert {t.dtype for k, t in results["bf16"]["lora"].items() if "lora_" in k} == {torch.bfloat16}
    assert {t.dtype for k, t in results["fp16"]["lora"].items() if "lora_" in k} == {torch.float16}
    assert {t.dtype for k, t in results["no"]["lora"].items() if "lora_" in k} == {torch.float32}
    output = tmp_path / "fp32.safetensors"
    assert main(distill_args(teacher, output, "--max-train-steps", 1, "--mixed-precision", "bf16", "--save-precision", "fp32",
                             "--probe-every", 0)) == EXIT_OK
    assert {t.dtype for k, t in load_file(str(output)).items() if "lora_" in k} == {torch.float32}
