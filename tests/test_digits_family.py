"""The committed digits teacher is a real, working artifact and loads like any other model family."""
from __future__ import annotations

import shutil

import pytest
import torch

from benchmarks import metrics, sampling
from benchmarks.demo import TEACHER_DIR
from benchmarks.digits_data import load_digits_split
from benchmarks.train_teacher import CHECK_NOISE_SEED, train_teacher
from training.families.digits import DigitsFamily, class_index
from training.errors import TrainingInputError
from training.models import load_family

FD_BOUND = 30.0  # 200 samples: the committed teacher scores 22.1, 200 training digits 18.4, the old linear-schedule teacher ~200


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


def test_plain_ddim_samples_at_cfg_1_are_the_digits_they_were_asked_for(teacher):
    # the artifact is real: plain DDIM (no x0 clipping, no guidance) draws the requested digit, as the
    # held-out-trained classifier reads it, and the samples are close to held-out digits in its features
    # (the old linear-schedule teacher: accuracy 0.62, FD ~200 at 500 samples)
    classifier = metrics.load_classifier(train_if_missing=False)
    classes = sampling.balanced_classes(200)
    noise = sampling.noise_for(teacher, 200, seed=CHECK_NOISE_SEED)
    samples = sampling.sample_teacher(teacher, 50, classes, noise, cfg=1.0)
    feats, predicted = metrics.classifier_outputs(classifier, samples)
    assert metrics.class_accuracy(predicted, classes) >= 0.9
    real_feats, _ = metrics.classifier_outputs(classifier, load_digits_split("heldout")[0])
    assert metrics.frechet_distance(feats, real_feats) < FD_BOUND
    # guidance sharpens the class further
    guided = sampling.sample_teacher(teacher, 20, classes[:60], noise[:60], cfg=2.0)
    assert metrics.class_accuracy(metrics.classifier_outputs(classifier, guided)[1], classes[:60]) >= 0.95


def test_teacher_training_is_deterministic_for_a_seed(tmp_path):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    runs = [train_teacher(tmp_path / name, iterations=3, batch_size=4, seed=seed, progress=False)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    weights = [load_file(str(r / "unet" / "diffusion_pytorch_model.safetensors")) for r in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_incomplete_teacher_folder_fails_with_the_regeneration_command(tmp_path):
    broken = tmp_path / "teacher"
    shutil.copytree(TEACHER_DIR, broken)
    (broken / "class_embeddings.safetensors").unlink()
    with pytest.raises(TrainingInputError, match="benchmarks.train_teacher"):
        load_family(str(broken))


@pytest.mark.parametrize("change, message", [({"prediction_type": "v_prediction"}, "predicts eps"),
                                             ({"beta_schedule": "cosine"}, "unknown beta_schedule"),
                                             ({"rescale_betas_zero_snr": True}, "zero-terminal-SNR")])
def test_a_scheduler_config_the_family_cannot_run_is_an_input_error(tmp_path, change, message):
    import json

    broken = tmp_path / "teacher"
    shutil.copytree(TEACHER_DIR, broken)
    config_path = broken / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(TrainingInputError, match=message):
        load_family(str(broken))
