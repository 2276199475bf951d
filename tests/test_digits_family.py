"""The committed digits teacher is a real, working artifact and loads like any other model family."""
from __future__ import annotations

import shutil

import pytest
import torch

from benchmarks import metrics, sampling
from benchmarks.demo import TEACHER_DIR
from training.families.digits import DigitsFamily, class_index
from training.models import TrainingInputError, load_family


@pytest.fixture(scope="module")
def teacher():
    torch.set_num_threads(1)
    return load_family(str(TEACHER_DIR))


def test_committed_teacher_routes_to_the_digits_family_and_is_small(teacher):
    assert isinstance(teacher, DigitsFamily)
    assert teacher.name == "digits" and teacher.prediction_type == "epsilon" and teacher.kohya_prefix == "lora_unet"
    size = sum(p.stat().st_size for p in TEACHER_DIR.rglob("*") if p.is_file())
    assert size < 5 * 1024 * 1024
    assert teacher.latent_shape(3) == (3, 1, 16, 16)
    # the LoRA targets exist in the network (PEFT matches name suffixes)
    names = [n for n, _ in teacher.network.named_modules()]
    for target in teacher.lora_target_modules:
        assert any(n == target or n.endswith("." + target) for n in names), target


def test_prompts_are_class_names_and_bad_prompts_name_the_fix(teacher):
    assert [class_index(p) for p in ["0", "digit 3", " Digit 9 "]] == [0, 3, 9]
    cond = teacher.encode_prompts(["3", "digit 3", "7"])["encoder_hidden_states"]
    assert cond.shape == (3, 1, teacher.network.config.cross_attention_dim)
    assert torch.equal(cond[0], cond[1]) and not torch.equal(cond[0], cond[2])
    null = teacher.null_condition(2)["encoder_hidden_states"]
    assert not torch.equal(null[0], cond[0])
    with pytest.raises(ValueError, match="'0'..'9'"):
        teacher.encode_prompts(["a cat"])
    with pytest.raises(ValueError, match="16x16"):
        teacher.latent_shape(1, 512)


def test_decode_maps_pixels_to_rgb_unit_range(teacher):
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 2, 2)
    out = teacher.decode(x)
    assert out.shape == (1, 3, 2, 2)
    assert torch.allclose(out[0, 1].flatten(), torch.tensor([0.0, 0.5, 1.0, 1.0]))


def test_teacher_samples_are_the_digits_they_were_asked_for(teacher):
    # the artifact is real: the held-out-trained classifier recognises the requested class far above chance (10%)
    classes = sampling.balanced_classes(60)
    noise = sampling.noise_for(teacher, 60, seed=5)
    samples = sampling.sample_teacher(teacher, 20, classes, noise, cfg=2.0)
    _, predicted = metrics.classifier_outputs(metrics.load_classifier(train_if_missing=False), samples)
    assert metrics.class_accuracy(predicted, classes) > 0.7


def test_incomplete_teacher_folder_fails_with_the_regeneration_command(tmp_path):
    broken = tmp_path / "teacher"
    shutil.copytree(TEACHER_DIR, broken)
    (broken / "class_embeddings.safetensors").unlink()
    with pytest.raises(TrainingInputError, match="benchmarks.train_teacher"):
        load_family(str(broken))
