"""Issue 21, a teacher with a style LoRA: the TDM Distill node distils what the graph samples (base + a style
LoRA applied with stock LoraLoader), so its student LoRA, stacked on base + style with stock LoraLoader twice,
is the node's student; on the base alone it is not (the style is part of the teacher)."""
from __future__ import annotations

import torch

from tests.helpers import comfy_inprocess as h
from tests.test_distill_node import run_node, stock_lora_loader, trained_student_probe, x0_of_model

TOLERANCE = 1e-4
STYLE_RANK, STYLE_ALPHA = 4, 4.0
# attention and MLP of the transformer blocks (where the student goes too) and the resblocks' time projections
# (where it does not)
STYLE_LAYERS = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0", "ff.net.2", "emb_layers.1")


def style_lora(model, seed: int = 17) -> dict:
    """A random LoRA in ComfyUI's own layout (``diffusion_model.<module>.lora_up/lora_down.weight`` + ``alpha``)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.model.named_modules():
        if not name.startswith("diffusion_model.") or not name.endswith(STYLE_LAYERS) or getattr(module, "weight", None) is None:
            continue
        out_dim, in_dim = module.weight.shape
        state[f"{name}.lora_down.weight"] = torch.randn(STYLE_RANK, in_dim, generator=g) / in_dim**0.5
        state[f"{name}.lora_up.weight"] = 0.5 * torch.randn(out_dim, STYLE_RANK, generator=g) / STYLE_RANK**0.5
        state[f"{name}.alpha"] = torch.tensor(STYLE_ALPHA)
    return state


def test_the_student_of_a_styled_teacher_needs_the_style_under_it(comfy, pack, lora_folder, caplog, monkeypatch):
    base = h.build_model("sd15_eps", seed=21)
    style = style_lora(base)
    h.write_safetensors(lora_folder, "style.safetensors", style)
    teacher, skipped = stock_lora_loader(base, "style.safetensors", caplog)
    assert not skipped and len(teacher.patches) == len(style) // 3, skipped

    graph = {"model": teacher, "positives": [h.conditioning("sd15_eps", seed=s) for s in (1, 2, 4)],
             "negative": h.conditioning("sd15_eps", seed=3)}
    probe = trained_student_probe(monkeypatch)
    run_node(graph, "styled_student", iterations=2, rate=0.05)
    student = probe["x0"]

    styled, skipped = stock_lora_loader(teacher, "styled_student.safetensors", caplog)  # base + style + student
    assert not skipped, skipped
    unstyled, _ = stock_lora_loader(base, "styled_student.safetensors", caplog)  # base + student
    error = (x0_of_model(styled, probe) - student).abs().max().item()
    without_style = (x0_of_model(unstyled, probe) - student).abs().max().item()
    style_effect = (x0_of_model(teacher, probe) - x0_of_model(base, probe)).abs().max().item()
    print(f"|base + style + student - node's student| = {error:.2e}; without the style {without_style:.2e}; style alone moves the "
          f"teacher by {style_effect:.2e}")
    assert error < TOLERANCE, f"base + style + student LoRA is not the node's student ({error:.2e})"
    assert style_effect > 1e-2, "the style LoRA does not change the model: the test says nothing"
    assert without_style > 100 * TOLERANCE, "the student LoRA alone reproduces the student: the style was not part of the teacher"
