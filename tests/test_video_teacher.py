"""The video teacher's pieces: the moving-shapes clips are deterministic and what their captions say, the video
metrics give the real clips' values and catch what a bad video does (static, flickering, wrong way), and the
committed teacher is a plain diffusers ``WanPipeline`` folder that diffusers runs and decodes as our sampler does."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import video_data, video_metrics
from benchmarks.train_video_teacher import DEFAULT_OUTPUT as TEACHER_DIR
from benchmarks.train_video_teacher import FLOW_SHIFT, build_teacher, channel_stats
from benchmarks.video_sampling import MAX_SEQUENCE_LENGTH
from benchmarks.train_video_teacher import main as train_video_teacher_main


@pytest.fixture(scope="module")
def clips():
    return video_data.make_split(120, seed=5)


@pytest.fixture(scope="module")
def classifier():
    from benchmarks.text_metrics import load_classifier

    torch.set_num_threads(1)
    return load_classifier(train_if_missing=False)


@pytest.fixture(scope="module")
def real_feats(classifier):
    return video_metrics.real_heldout_features(classifier)


@pytest.fixture(scope="module")
def teacher():
    from benchmarks.video_sampling import load_teacher

    torch.set_num_threads(1)
    return load_teacher(TEACHER_DIR)


# --- data ------------------------------------------------------------------------------------------
def test_clips_are_deterministic_in_the_seed_and_in_wans_frame_layout(clips):
    again = video_data.make_split(120, seed=5)
    assert torch.equal(clips.clips, again.clips) and clips.captions == again.captions
    assert not torch.equal(clips.clips, video_data.make_split(120, seed=6).clips)
    assert clips.clips.shape == (120, 3, 9, 32, 32) and (clips.clips.shape[2] - 1) % 4 == 0  # 1 + 4k frames
    assert clips.clips.min() >= -1 and clips.clips.max() <= 1
    assert clips.frames().shape == (120 * 9, 3, 32, 32)
    assert torch.equal(clips.frames()[9 * 3 + 4], clips.clips[3, :, 4])  # clip-major frames
    assert [list(video_data.parse_caption(c)) for c in clips.captions] == clips.labels.tolist()
    assert len(set(video_data.all_captions())) == 60


def test_bad_captions_and_splits_are_clear_errors():
    with pytest.raises(ValueError, match="not a video caption"):
        video_data.parse_caption("a red circle on the left")
    with pytest.raises(ValueError, match="unknown video split"):
        video_data.load_video_split("test")


# --- metrics ---------------------------------------------------------------------------------------
def test_real_clips_score_right_and_move_at_the_data_speed(clips, classifier, real_feats):
    q = video_metrics.quality(classifier, clips.clips, clips.labels, real_feats)
    assert q["acc_colour"] == 1.0 and q["acc_direction"] == 1.0
    assert q["acc_shape"] >= 0.95  # clip vote; per frame the classifier misreads centred shapes
    assert q["speed"] == pytest.approx(video_data.TRAVEL / (video_data.NUM_FRAMES - 1), abs=0.02)
    assert q["track_rms"] < 0.1 and q["area_cv"] < 0.02
    assert q["fd"] < 120  # 1,080 real frames against the 9,000 held-out ones
    noisy = clips.clips + 0.05 * torch.randn(clips.clips.shape, generator=torch.Generator().manual_seed(0))
    velocity, _ = video_metrics.track_fit(video_metrics.centroid_tracks(noisy)[0])  # pixel noise is not ink
    assert velocity.norm(dim=1).mean() == pytest.approx(q["speed"], rel=0.1)


def test_the_temporal_measures_catch_static_flickering_and_wrong_way_clips(clips, classifier, real_feats):
    real = video_metrics.quality(classifier, clips.clips, clips.labels, real_feats)
    static = video_metrics.quality(classifier, clips.clips[:, :, :1].expand_as(clips.clips), clips.labels, real_feats)
    assert static["speed"] == 0 and static["frame_l1"] == 0 and static["acc_direction"] < 0.5
    flicker = clips.clips.clone()
    flicker[:, :, ::2] = clips.clips.roll(1, 0)[:, :, ::2]  # every other frame from another clip
    bad = video_metrics.quality(classifier, flicker, clips.labels, real_feats)
    assert bad["track_rms"] > 1 and bad["area_cv"] > 0.2 and bad["frame_l1"] > 5 * real["frame_l1"]
    backwards = video_metrics.quality(classifier, clips.clips.flip(2), clips.labels, real_feats)
    assert backwards["acc_direction"] == 0.0 and backwards["acc_colour"] == 1.0


# --- the committed teacher -------------------------------------------------------------------------
def test_committed_folder_is_a_small_wan_pipeline_with_flow_unipc(teacher):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    assert type(teacher) is WanPipeline
    assert isinstance(teacher.transformer, WanTransformer3DModel) and isinstance(teacher.vae, AutoencoderKLWan)
    config = teacher.scheduler.config
    assert isinstance(teacher.scheduler, UniPCMultistepScheduler)
    assert config.prediction_type == "flow_prediction" and config.use_flow_sigmas and config.flow_shift == FLOW_SHIFT
    vae = teacher.vae.config
    assert (vae.scale_factor_temporal, vae.scale_factor_spatial) == (4, 4) and len(vae.latents_mean) == vae.z_dim
    assert vae.latents_std != [1.0] * vae.z_dim  # set from the data, not left at the identity
    assert sum(p.stat().st_size for p in TEACHER_DIR.rglob("*") if p.is_file()) < 8 * 1024 * 1024


def test_one_transformer_call_runs_on_pipeline_prompt_embeddings(teacher):
    from benchmarks.video_sampling import latent_shape

    embeds, negative = teacher.encode_prompt("a red circle moving right", do_classifier_free_guidance=True,
                                             max_sequence_length=MAX_SEQUENCE_LENGTH)
    x = torch.randn(latent_shape(teacher, 1, 9, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = teacher.transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=embeds,
                                  return_dict=False)[0]
        null = teacher.transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=negative,
                                   return_dict=False)[0]
    assert out.shape == x.shape == (1, 8, 3, 8, 8) and torch.isfinite(out).all()
    assert (out - null).abs().mean() > 1e-3  # the text reaches the network


def test_plain_diffusers_decodes_latents_as_our_sampler_does(teacher):
    from benchmarks.video_sampling import decode

    kwargs = dict(prompt="a blue square moving up", num_inference_steps=2, height=32, width=32, num_frames=9,
                  guidance_scale=3.0)
    latents = teacher(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    video = teacher(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(0)).frames  # (B, T, C, H, W) in [0, 1]
    assert video.shape == (1, 9, 3, 32, 32)
    ours = (decode(teacher, latents.float()) + 1) / 2
    torch.testing.assert_close(ours.transpose(1, 2), video.float(), atol=2e-3, rtol=0)


def test_teacher_draws_the_colour_and_motion_the_prompt_asks_and_not_without_the_text(teacher, classifier, real_feats):
    """40 clips (every colour x direction twice, 20 Euler steps at CFG 3, fixed noise): the committed teacher's
    colour and direction are the prompt's (chance 0.20 and 0.25); with every prompt cut to "" they are not. The first
    teacher, whose VAE lost colour, fails the colour bar here (0.49)."""
    from benchmarks.video_sampling import latent_shape, sample_clips

    captions = [video_data.caption(c, (c + d + s) % 3, d) for s in range(2) for c in range(5) for d in range(4)]
    labels = torch.tensor([video_data.parse_caption(c) for c in captions])
    noise = torch.randn(latent_shape(teacher, len(captions), 9, 32), generator=torch.Generator().manual_seed(3))
    asked = video_metrics.quality(classifier, sample_clips(teacher, captions, noise, 20, 3.0), labels, real_feats)
    cut = video_metrics.quality(classifier, sample_clips(teacher, [""] * len(captions), noise, 20, 3.0), labels, real_feats)
    assert asked["acc_colour"] > 0.6 and asked["acc_direction"] > 0.9, asked
    assert cut["acc_colour"] < 0.4 and cut["acc_direction"] < 0.5, cut


def test_euler_grid_runs_from_noise_to_data_on_the_shifted_times():
    from benchmarks.video_sampling import euler_sigmas

    sigmas = euler_sigmas(4, FLOW_SHIFT)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    assert sigmas[2] == pytest.approx(FLOW_SHIFT * 0.5 / (1 + (FLOW_SHIFT - 1) * 0.5))


def test_latent_stats_are_per_channel():
    z = torch.randn(50, 3, 2, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1, 1) + torch.tensor([0.0, 5.0, -1.0]).view(1, 3, 1, 1, 1)
    mean, std = channel_stats(z)
    assert mean == pytest.approx([0.0, 5.0, -1.0], abs=0.15) and std == pytest.approx([1.0, 2.0, 3.0], rel=0.1)


def test_the_webp_has_one_grid_per_frame(tmp_path, clips):
    from PIL import Image

    from benchmarks.video_webp import PAD, save_webp

    path = save_webp([clips.clips[:3], clips.clips[3:6]], tmp_path / "row.webp", scale=1)
    with Image.open(path) as image:
        assert image.is_animated and image.n_frames == 9
        assert image.size == (3 * (32 + PAD) + PAD, 2 * (32 + PAD) + PAD)
        image.seek(8)
        last = torch.from_numpy(np.array(image.convert("RGB"))).float()
    expected = (clips.clips[4, :, 8].permute(1, 2, 0) + 1) / 2 * 255  # row 1, column 1, last frame
    top, left = 2 * PAD + 32, 2 * PAD + 32
    assert (last[top : top + 32, left : left + 32] - expected).abs().max() <= 1.0  # lossless
    with pytest.raises(ValueError, match="same clip shape"):
        save_webp([clips.clips[:3], clips.clips[:2]], tmp_path / "bad.webp")
    assert not (tmp_path / "bad.webp").exists()


def test_bad_flags_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_video_teacher_main(["--output", str(tmp_path / "missing" / "teacher"), "--no-check"])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_video_teacher_main(["--output", str(tmp_path / "teacher"), "--check-only"])
    assert "model_index.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_video_teacher_main(["--output", str(tmp_path / "teacher"), "--vae-batch-size", "0", "--no-check"])
    assert "--vae-batch-size at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_video_teacher_main(["--output", str(tmp_path / "teacher"), "--vae-from", str(tmp_path), "--no-check"])
    err = capsys.readouterr().err
    assert "--vae-from" in err and "no vae/config.json" in err
    assert not (tmp_path / "teacher").exists()


@pytest.mark.slow
def test_build_is_deterministic_and_a_wan_pipeline(tmp_path):
    from benchmarks.video_sampling import load_teacher

    torch.set_num_threads(1)
    data = video_data.make_split(40, seed=3)
    outs = [tmp_path / "a" / "teacher", tmp_path / "b" / "teacher"]
    for out in outs:
        build_teacher(out, vae_iterations=2, iterations=3, batch_size=4, vae_batch_size=2, seed=5, train=data, log=lambda *_: None)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    assert not list(outs[0].parent.glob(".*")), "temporary folders left beside the teacher"
    assert load_teacher(outs[0]).vae.config.latents_mean != [0.0] * 8
    # --vae-from: the VAE comes over byte for byte (fp16 -> fp32 -> fp16), only the transformer trains
    reused = tmp_path / "c" / "teacher"
    reused.parent.mkdir()
    build_teacher(reused, vae_iterations=1, iterations=3, batch_size=4, seed=5, train=data, vae_from=outs[0], log=lambda *_: None)
    for rel in [p.relative_to(outs[0]) for p in (outs[0] / "vae").iterdir() if p.suffix == ".safetensors"]:
        assert (reused / rel).read_bytes() == (outs[0] / rel).read_bytes(), rel
    assert load_teacher(reused).vae.config.latents_std == pytest.approx(load_teacher(outs[0]).vae.config.latents_std, rel=1e-2)
