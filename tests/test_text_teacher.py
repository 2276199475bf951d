"""The committed shapes teacher is a real text-to-image StableDiffusionPipeline folder: it loads as the sd15
family and in plain diffusers, its prompts are text through its own CLIP tokenizer and text encoder, and it
draws what the prompt asks. The procedural data and the tokenizer are deterministic."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import shapes_data, text_metrics
from benchmarks.train_text_teacher import DEFAULT_OUTPUT as TEACHER_DIR
from benchmarks.train_text_teacher import MAX_TOKENS, build_teacher, tokenizer_files
from benchmarks.train_text_teacher import main as train_text_teacher_main
from tests.helpers.teacher_builds import assert_deterministic_build, prompt_adherence
from training.families.sd15 import SD15Family
from training.models import load_family

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher():
    torch.set_num_threads(1)
    return load_family(str(TEACHER_DIR))


def test_committed_folder_is_a_small_sd15_pipeline_with_its_own_clip_text_stack(teacher):
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(teacher, SD15Family) and teacher.name == "sd15"
    assert isinstance(teacher.pipeline.tokenizer, CLIPTokenizer) and isinstance(teacher.pipeline.text_encoder, CLIPTextModel)
    assert teacher.prediction_type == "epsilon" and teacher.resolution == 32 and teacher.latent_shape(3) == (3, 4, 8, 8)
    scheduler = teacher.pipeline.scheduler.config
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end, scheduler.num_train_timesteps) == (
        "scaled_linear", 0.00085, 0.012, 1000)
    index = json.loads((TEACHER_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert 0.8e6 < sum(p.numel() for p in teacher.network.parameters()) < 2e6  # ~1 M-parameter UNet
    size = sum(p.stat().st_size for p in TEACHER_DIR.rglob("*") if p.is_file())
    assert size < 5 * 1024 * 1024
    names = [n for n, _ in teacher.network.named_modules()]
    for target in teacher.lora_target_modules:  # the LoRA targets exist (PEFT matches name suffixes)
        assert any(n == target or n.endswith("." + target) for n in names), target


def test_plain_diffusers_loads_and_runs_the_folder():
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(str(TEACHER_DIR), local_files_only=True)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on the left", num_inference_steps=3, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_prompts_are_text_through_the_folders_own_tokenizer(teacher):
    tokenizer = teacher.pipeline.tokenizer
    assert tokenizer.model_max_length == MAX_TOKENS
    assert len(tokenizer) < 1000  # its own closed-vocabulary BPE, not CLIP's 49,408-token vocabulary
    for word in shapes_data.caption_words():  # every caption word is a single token
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("A  Red circle on the LEFT").input_ids
    assert ids == tokenizer("a red circle on the left").input_ids and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle on the left"
    assert len(tokenizer("a zebra!", add_special_tokens=False).input_ids) > 2  # unknown words fall back to bytes
    cond = teacher.encode_prompts(["a red circle on the left", "a blue circle on the left", "a red circle on the left"])
    states = cond["encoder_hidden_states"]
    assert states.shape == (3, MAX_TOKENS, teacher.network.config.cross_attention_dim)
    assert torch.equal(states[0], states[2]) and not torch.allclose(states[0], states[1])
    assert not torch.allclose(teacher.null_condition(1)["encoder_hidden_states"][0], states[0])
    # the committed tokenizer is exactly what the build script writes
    for name, text in tokenizer_files().items():
        assert (TEACHER_DIR / "tokenizer" / name).read_text(encoding="utf-8") == text, name


def test_teacher_draws_what_the_prompt_asks_and_not_without_the_text(teacher):
    assert prompt_adherence(teacher, cfg=1.0) > 0.75  # plain DDIM at CFG 1; the committed teacher: 0.88 (1.0 at CFG 3)
    assert prompt_adherence(teacher, cfg=1.0, with_text=False) < 0.2  # the committed teacher: 0.0


def test_classifier_is_cached_and_reads_held_out_attributes():
    model = text_metrics.load_classifier(train_if_missing=False)
    heldout = shapes_data.load_shapes_split("heldout")
    feats, predicted = text_metrics.classifier_outputs(model, heldout.images[:1000])
    accuracy = text_metrics.attribute_accuracy(predicted, heldout.labels[:1000])
    assert min(accuracy.values()) > 0.97
    # held-out and training images are close in feature space; the same images with colours swapped are not
    train_feats, _ = text_metrics.classifier_outputs(model, shapes_data.load_shapes_split("train").images[:1000])
    swapped, _ = text_metrics.classifier_outputs(model, heldout.images[:1000, [2, 0, 1]])
    assert text_metrics.frechet_distance(feats, train_feats) * 5 < text_metrics.frechet_distance(swapped, train_feats)


def test_attribute_accuracy_scores_only_what_the_prompt_names():
    wanted = torch.tensor([[0, 1, 2], [0, -1, -1], [-1, -1, -1], [3, 2, -1]])
    predicted = torch.tensor([[0, 1, 3], [0, 2, 2], [1, 1, 1], [3, 2, 0]])
    acc = text_metrics.attribute_accuracy(predicted, wanted)
    assert acc == {"colour": 1.0, "shape": 1.0, "position": 0.0, "all": pytest.approx(2 / 3)}


def test_dataset_is_deterministic_and_captions_match_the_pictures():
    a, b = shapes_data.make_split(40, seed=3), shapes_data.make_split(40, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.captions == b.captions
    assert not torch.equal(a.images, shapes_data.make_split(40, seed=4).images)
    assert a.images.shape == (40, 3, 32, 32) and a.images.min() >= -1 and a.images.max() <= 1
    for text, drawn in zip(a.captions, a.labels.tolist()):  # a caption names a subset of what is drawn
        said = shapes_data.parse_caption(text)
        assert all(s in (d, shapes_data.UNSAID) for s, d in zip(said, drawn)), (text, drawn)
    assert len({c for c in shapes_data.make_split(400, seed=0).captions}) > 90  # partial captions occur too
    # the shape sits where the caption says: its pixels' centre of mass is on the named side
    background = a.images[:, :, :1, :1]
    ink = (a.images - background).abs().sum(1)
    xs = torch.arange(32.0)
    cx = (ink.sum(1) * xs).sum(1) / ink.sum((1, 2))
    cy = (ink.sum(2) * xs).sum(1) / ink.sum((1, 2))
    position = a.labels[:, 2]
    assert (cx[position == 0] < 13).all() and (cx[position == 1] > 19).all()
    assert (cy[position == 2] < 13).all() and (cy[position == 3] > 19).all()
    assert len(set(shapes_data.all_captions())) == 120 and len(shapes_data.full_captions()) == 60
    assert shapes_data.parse_caption(" A red  SHAPE ") == (0, -1, -1) and shapes_data.parse_caption("a shape") == (-1, -1, -1)
    with pytest.raises(ValueError, match="not a shapes caption"):
        shapes_data.parse_caption("a cat")
    with pytest.raises(ValueError, match="heldout"):
        shapes_data.load_shapes_split("test")


def test_tokenizer_files_are_deterministic_and_learnt_from_the_captions():
    first, second = tokenizer_files(), tokenizer_files()
    assert first == second
    vocab = json.loads(first["vocab.json"])
    merges = first["merges.txt"].splitlines()[1:]
    assert all(word + "</w>" in vocab for word in shapes_data.caption_words())
    assert len(vocab) == 512 + len(merges) + 2  # bytes, bytes at word end, one token per merge, two specials


def test_bad_flags_and_missing_output_parent_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_text_teacher_main(["--output", str(tmp_path / "missing" / "teacher"), "--no-check"])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_text_teacher_main(["--output", str(tmp_path / "teacher"), "--iterations", "0"])
    with pytest.raises(SystemExit):
        train_text_teacher_main(["--output", str(tmp_path / "teacher"), "--check-only"])
    assert "model_index.json" in capsys.readouterr().err


@pytest.mark.slow
def test_build_is_deterministic_and_loads(tmp_path):
    assert_deterministic_build(
        lambda out: build_teacher(out, vae_iterations=3, iterations=3, batch_size=4, seed=5, log=lambda *_: None), tmp_path, "sd15")


@pytest.mark.slow
def test_training_distill_runs_on_the_shapes_teacher(tmp_path):
    prompts = tmp_path / "prompts.txt"
    assert shapes_data.main(["--prompts", str(prompts)]) == 0
    output = tmp_path / "shapes_tdm4.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "training.distill", "--model", str(TEACHER_DIR), "--prompts", str(prompts),
         "--output", str(output), "--max-train-steps", "5", "--validate-every", "5", "--checkpoint-every", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from training.lora_io import read_lora

    tensors, info = read_lora(output)
    assert tensors and info.base_family == "sd15" and info.training_steps == 5
