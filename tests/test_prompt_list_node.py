"""Issue 21: the TDM Prompt List node (tiny SD1.5 CLIP built from ComfyUI's own classes): its conditionings are
stock CLIPTextEncode's for the same texts, from a multiline text, a .txt and a .jsonl file in ComfyUI's input
folder; errors name the problem; and through ComfyUI's own executor its list output feeds TDM Distill's
``positive`` (is_output_list into is_input_list) and a distill run works."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import comfy_executor as ex
from tests.helpers import comfy_inprocess as h


@pytest.fixture(scope="module")
def clip(comfy, pack):
    torch.set_num_threads(1)
    with torch.inference_mode():
        return h.build_clip()


@pytest.fixture
def input_folder(comfy, tmp_path):
    import folder_paths

    saved = folder_paths.get_input_directory()
    folder = tmp_path / "input"
    folder.mkdir()
    folder_paths.set_input_directory(str(folder))
    yield folder
    folder_paths.set_input_directory(saved)


def prompt_list(clip, text: str, prompt_file: str = "(none)"):
    from comfyui_tdm_pack.nodes.node_defs import TDMPromptList

    with torch.inference_mode():
        return TDMPromptList.execute(clip, text, prompt_file).result


def stock_encode(clip, text: str):
    import nodes as comfy_nodes

    with torch.inference_mode():
        return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def assert_same_conditioning(ours, stock) -> None:
    assert len(ours) == len(stock) == 1
    assert torch.equal(ours[0][0], stock[0][0])
    assert set(ours[0][1]) == set(stock[0][1])
    for key, value in stock[0][1].items():
        assert torch.equal(ours[0][1][key], value) if isinstance(value, torch.Tensor) else ours[0][1][key] == value, key


def test_text_and_files_encode_as_clip_text_encode(clip, input_folder):
    from comfyui_tdm_pack.nodes.node_defs import TDMPromptList

    (input_folder / "prompts.txt").write_text("a red cat\n\n  the sea at night  \n")
    rows = [{"prompt": "a blue dog"}, {}, {"text": "a green bird"}]
    (input_folder / "sub").mkdir()
    (input_folder / "sub" / "rows.jsonl").write_text("\n".join("" if not r else json.dumps(r) for r in rows) + "\n")
    options = next(i for i in TDMPromptList.define_schema().inputs if i.id == "prompt_file").options
    assert options == ["(none)", "prompts.txt", "sub/rows.jsonl"]

    prompts, empty = prompt_list(clip, "a castle\n\n\nfog over hills\n", "prompts.txt")
    expected = ["a castle", "fog over hills", "a red cat", "the sea at night"]
    assert len(prompts) == len(expected)
    for ours, text in zip(prompts, expected):
        assert_same_conditioning(ours, stock_encode(clip, text))
    assert_same_conditioning(empty, stock_encode(clip, ""))
    assert not torch.equal(prompts[0][0][0], prompts[1][0][0]), "every prompt got the same conditioning"

    prompts, _ = prompt_list(clip, "", "sub/rows.jsonl")
    for ours, text in zip(prompts, ["a blue dog", "a green bird"]):
        assert_same_conditioning(ours, stock_encode(clip, text))
    assert len(prompts) == 2


def test_errors_name_the_problem(clip, input_folder):
    from comfyui_tdm_pack.nodes.node_defs import TDMPromptList

    with pytest.raises(ValueError, match="no prompts"):
        prompt_list(clip, " \n\n")
    with pytest.raises(ValueError, match="was not found in ComfyUI's input folder"):
        prompt_list(clip, "", "gone.txt")
    (input_folder / "bad.jsonl").write_text('{"prompt": "fine"}\n\n{"prompt": "broken"\n')
    with pytest.raises(ValueError, match="bad.jsonl line 3 is not valid JSON"):
        prompt_list(clip, "", "bad.jsonl")
    (input_folder / "nokey.jsonl").write_text('{"prompt": "fine"}\n{"caption": "x"}\n')
    with pytest.raises(ValueError, match='nokey.jsonl line 2 has no "prompt" or "text" string'):
        prompt_list(clip, "", "nokey.jsonl")
    assert "not one of the choices" in TDMPromptList.validate_inputs(prompt_file="../secret.txt")
    assert TDMPromptList.validate_inputs(prompt_file="bad.jsonl") is True


def test_an_edited_prompt_file_changes_the_fingerprint(input_folder):
    from comfyui_tdm_pack.nodes.node_defs import TDMPromptList

    (input_folder / "p.txt").write_text("a red cat\n")
    before = TDMPromptList.fingerprint_inputs(prompt_file="p.txt")
    (input_folder / "p.txt").write_text("a red cat\na blue dog\n")
    assert TDMPromptList.fingerprint_inputs(prompt_file="p.txt") != before


def test_the_list_feeds_tdm_distill_through_comfyuis_executor(clip, input_folder, lora_folder, pack, monkeypatch):
    """ComfyUI's executor turns the list output into TDM Distill's list input: all three prompts reach it, each
    equal to its stock encoding, and the run writes its LoRA."""
    import comfyui_tdm_pack.nodes.node_defs as node_defs

    ex.register(pack.NODES)
    texts = ["a red cat", "a blue dog", "the sea at night"]
    seen, real_distill = {}, node_defs.distill

    def recording_distill(model, positives, negative, *args, **kwargs):  # a spy: records, then runs the real thing
        seen.update(positives=positives, negative=negative)
        return real_distill(model, positives, negative, *args, **kwargs)

    graph = {
        "1": ex.source("model", h.build_model("sd15_eps", seed=21)),
        "2": ex.source("clip", clip),
        "3": ex.source("latent", {"samples": torch.zeros(1, 4, 8, 8)}),
        "4": {"class_type": "TDMPromptList", "inputs": {"clip": ["2", 0], "text": "\n".join(texts), "prompt_file": "(none)"}},
        "5": {"class_type": "TDMDistill", "inputs": {
            "model": ["1", 0], "positive": ["4", 0], "negative": ["4", 1], "latent": ["3", 0], "steps": 4, "iterations": 2, "cfg": 2.0,
            "lora_rank": 4, "fake_score_learning_rate": 0.0, "student_learning_rate": 0.0, "batch_size": 2, "seed": 3,
            "gradient_checkpointing": False, "lora_name": "from_list", "checkpoint_every": 0}},
    }
    monkeypatch.setattr(node_defs, "distill", recording_distill)
    executor = ex.new_executor()
    try:
        messages = ex.run(executor, graph, ["5"])
        outputs = ex.cached_output(executor, "5")
    finally:
        ex.clear()
        executor.reset()
    assert ("execution_success" in [m[0] for m in messages]), messages
    assert len(seen["positives"]) == 3
    for ours, text in zip(seen["positives"], texts):
        assert_same_conditioning(ours, stock_encode(clip, text))
    assert_same_conditioning(seen["negative"], stock_encode(clip, ""))
    assert "TDM Distill: 2 iterations" in outputs[2][0]
    assert (lora_folder / "from_list.safetensors").exists()
