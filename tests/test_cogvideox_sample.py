"""CogVideoX LoRAs outside ComfyUI (it has no native CogVideoX model): the trainer's export is diffusers' layout and
``CogVideoXPipeline.load_lora_weights`` reproduces the student; ``python -m training.sample`` samples the student
exactly as ``tdm_core.sample_tdm`` on the family, writes teacher | student as an animated WebP atomically, and loads
a file in the released TDM CogVideoX-2B layout (made by diffusers' own save_lora_weights) with no key skipped."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tdm_core.metadata import TDMInfo
from tests.helpers.tiny_cogvideox import cogvideox_student, save_release_layout_lora, save_tiny_cogvideox

torch.set_num_threads(1)
GRID = [999, 856, 665, 399]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from training.lora_io import export_student_lora

    root = tmp_path_factory.mktemp("cogvideox_sample")
    folder = save_tiny_cogvideox(root / "cog2b")
    family = cogvideox_student(folder)
    lora = export_student_lora(family, root / "loras" / "cog_tdm.safetensors", TDMInfo(num_steps=4, grid=list(GRID)))
    return {"folder": folder, "family": family, "lora": lora, "root": root}


def student_and_teacher(family, x, t, cond):
    from training.models import STUDENT, use_adapter

    with use_adapter(family.network, STUDENT):
        student = family.denoise(x, t, cond)
    with use_adapter(family.network, None):
        teacher = family.denoise(x, t, cond)
    return student, teacher


def test_export_is_diffusers_layout_and_load_lora_weights_reproduces_the_student(trained):
    from diffusers import CogVideoXPipeline

    from training.families.cogvideox import CogVideoXFamily
    from training.lora_io import read_lora

    tensors, info = read_lora(trained["lora"])
    assert info.base_family == "cogvideox" and info.prediction_type == "v_prediction" and info.grid == GRID
    assert all(k.startswith("transformer.transformer_blocks.0.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    pipe = CogVideoXPipeline.from_pretrained(str(trained["folder"]))
    pipe.load_lora_weights(str(trained["lora"].parent), weight_name=trained["lora"].name)
    loaded = CogVideoXFamily(pipe)  # the same family code around diffusers' own LoRA-loaded transformer
    family = trained["family"]
    cond = family.encode_prompts(["a red cat"])
    x = torch.randn(family.latent_shape(1), generator=torch.Generator().manual_seed(4))
    t = torch.tensor([665.0])
    student, teacher = student_and_teacher(family, x, t, cond)
    assert (student - teacher).abs().max() > 1e-2  # the LoRA matters, and alpha / rank (0.5 here) is folded in right:
    torch.testing.assert_close(loaded.denoise(x, t, cond), student, atol=1e-5, rtol=1e-5)


def test_sampler_student_is_sample_tdm_on_the_family_and_the_webp_is_teacher_and_student(trained, tmp_path, capsys):
    from PIL import Image

    from tdm_core import sample_tdm
    from training import sample
    from training.models import STUDENT, load_family, use_adapter

    family = trained["family"]
    lora, info, release = sample.read_video_lora(trained["lora"])
    assert release is None and sample.student_grid(None, info, release, family) == GRID  # the trained grid, from the metadata
    fresh = load_family(str(trained["folder"]))
    assert sample.load_lora(fresh, lora, 1.0, "cog_tdm") == len(lora) // 2  # every layer of the file took its LoRA
    cond = family.encode_prompts(["a red cat"])
    noise = torch.randn(family.latent_shape(1, 32), generator=torch.Generator().manual_seed(0))
    with use_adapter(family.network, STUDENT):
        reference = sample_tdm(lambda x, t: family.denoise(x, t, cond).float(), noise, GRID, family.schedule, family.prediction_type)
    ours = sample.student_latents(fresh, fresh.encode_prompts(["a red cat"]), noise, GRID)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)

    out = tmp_path / "videos" / "cat.webp"
    args = ["--model", str(trained["folder"]), "--lora", str(trained["lora"]), "--prompt", "a red cat", "--output", str(out),
            "--resolution", "32", "--num-frames", "9", "--teacher-steps", "2", "--seed", "0"]
    assert sample.main(args) == 0
    assert "student at [999, 856, 665, 399], guidance 1; teacher 2 steps at cfg 6 (left)" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["cat.webp"]  # no temporary file left
    with Image.open(out) as webp:
        assert webp.n_frames == 9 and webp.size == (2 * 32, 32) and webp.is_animated
        webp.seek(4)
        middle = torch.from_numpy(np.asarray(webp.convert("RGB"))).float() / 255
    expected = fresh.decode(ours)[0, :, 4].permute(1, 2, 0)  # the student's middle frame, right half (lossless)
    assert (middle[:, 32:] - expected).abs().max() <= 1 / 255 + 1e-6
    assert (middle[:, :32] - expected).abs().max() > 1e-2  # the teacher, left, is another video


def test_release_layout_file_loads_with_no_key_skipped_and_on_its_grid(trained, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from tdm_core.releases import RELEASES
    from training import convert, sample
    from training.errors import TrainingInputError
    from training.models import load_family

    path = save_release_layout_lora(trained["folder"], tmp_path / "release")
    lora, info, release = sample.read_video_lora(path)
    assert info is None and release is RELEASES["tdm_cogvideox_2b"]
    assert sample.student_grid(None, info, release, trained["family"]) == GRID and release.info().teacher_cfg == 1.0
    family = load_family(str(trained["folder"]))
    assert sample.load_lora(family, lora, 1.0, path.name) == 4 == len(lora) // 2  # q, k, v, out of the one block

    # training.convert recognises it from its keys alone and writes its settings as TDM metadata
    converted = tmp_path / "converted.safetensors"
    assert convert.main([str(path), "--output", str(converted)]) == 0
    _, info, release = sample.read_video_lora(converted)
    assert info.release == "tdm_cogvideox_2b" and info.grid == GRID and release is RELEASES["tdm_cogvideox_2b"]

    # a key for a layer this model lacks is refused by name, nothing written
    broken = dict(load_file(str(path)))
    broken["transformer.transformer_blocks.5.attn1.to_q.lora_A.weight"] = broken["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"].clone()
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(TrainingInputError, match=r"layers this cogvideox model lacks \(transformer_blocks.5.attn1.to_q\)"):
        sample.load_lora(load_family(str(trained["folder"])), broken, 1.0, "broken.safetensors")
    out = tmp_path / "x.webp"
    assert sample.main(["--model", str(trained["folder"]), "--lora", str(tmp_path / "broken.safetensors"), "--prompt", "p",
                        "--output", str(out), "--teacher-steps", "0"]) == 2
    assert "transformer_blocks.5.attn1.to_q" in capsys.readouterr().err and not out.exists()


def test_bf16_renders_under_autocast(trained, tmp_path):
    from PIL import Image

    from training.sample import main

    out = tmp_path / "bf16.webp"
    assert main(["--model", str(trained["folder"]), "--lora", str(trained["lora"]), "--prompt", "a red cat", "--output", str(out),
                 "--resolution", "16", "--num-frames", "9", "--teacher-steps", "1", "--mixed-precision", "bf16"]) == 0
    with Image.open(out) as webp:
        assert webp.n_frames == 9 and webp.size == (32, 16)


def test_bad_sampler_inputs_are_named_and_nothing_is_written(trained, tmp_path, capsys):
    from tests.helpers.tiny_models import save_tiny_pipeline
    from tests.helpers.tiny_wan import save_tiny_wan_pipeline
    from training.sample import main

    out = tmp_path / "v.webp"
    base = ["--lora", str(trained["lora"]), "--prompt", "p", "--teacher-steps", "0"]
    cases = [
        (["--model", str(trained["folder"]), "--output", str(tmp_path / "v.gif")], "must end in .webp"),
        (["--model", str(trained["folder"]), "--output", str(out), "--num-frames", "8"], "--num-frames 8 cannot be encoded by the CogVideoX VAE"),
        (["--model", str(save_tiny_pipeline("sd15", tmp_path / "sd15")), "--output", str(out)], "is a sd15 model, which makes images"),
        # a Wan folder is video too, but ComfyUI samples it: named as such, with its workflow (issue 20, defect 6)
        (["--model", str(save_tiny_wan_pipeline(tmp_path / "wan")), "--output", str(out)],
         "is a wan video model, which ComfyUI samples itself: training.sample renders the video families ComfyUI has no model "
         "for (CogVideoX); load the LoRA with ComfyUI's LoraLoader and the TDM nodes (workflows/wan_t2v_tdm_lora.json)"),
        (["--model", str(trained["folder"]), "--output", str(out), "--lora", str(tmp_path / "none.safetensors")], "does not exist"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, message
        assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.webp*"))
