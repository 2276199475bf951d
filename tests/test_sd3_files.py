"""SD3 / SD3.5 from ComfyUI's files (training/families/sd3_files.py): the MMDiT variant is read from the checkpoint
(checked on the real SD3-Medium, SD3.5-Medium and SD3.5-Large sizes, on the meta device), and a checkpoint whose
text encoders sit in ``models/text_encoders`` (ComfyUI's SD3.5 layout) loads the same weights as the diffusers folder.
The checkpoint and text-encoder files are tiny ones the test writes in those layouts, not the real downloads."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.tiny_models import _clip_checkpoint_keys, import_comfy, save_tiny_pipeline, single_file_state_dict

torch.set_num_threads(1)

# the real variants: (transformer config overrides on the shipped SD3.5-Medium one, parameter count)
VARIANTS = {
    "sd3_medium": (dict(dual_attention_layers=[], qk_norm=None, pos_embed_max_size=192), 2_028_328_000),
    "sd35_medium": ({}, 2_243_171_520),
    "sd35_large": (dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, dual_attention_layers=[], pos_embed_max_size=192),
                   8_056_627_520),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_mmdit_variant_is_read_from_the_checkpoint_keys(variant):
    from diffusers import SD3Transformer2DModel

    from training.families.sd3_files import CONFIGS, mmdit_config

    comfy = import_comfy()
    base = {k: v for k, v in json.loads((CONFIGS / "transformer" / "config.json").read_text()).items() if not k.startswith("_")}
    overrides, parameters = VARIANTS[variant]
    config = {**base, **overrides}
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
    # the checkpoint's key shapes, through ComfyUI's own MMDiT <-> diffusers map (fused qkv put together)
    shapes = {}
    for diffusers_key, target in comfy.utils.mmdit_to_diffusers({"depth": config["num_layers"]}).items():
        tensor = model.state_dict().get(diffusers_key)
        if tensor is None:
            continue
        key, span = (target, None) if isinstance(target, str) else target[:2]
        shape = list(tensor.shape)
        if span is not None:  # a slice of a fused tensor: grow that dimension
            shape[span[0]] = max(shapes.get(key, shape)[span[0]] if key in shapes else 0, span[1] + span[2])
        shapes[key] = tuple(shape)
    derived = mmdit_config(shapes, base)
    assert {k: derived[k] for k in config} == {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


@pytest.fixture(scope="module")
def comfy_layout(tmp_path_factory):
    """A tiny SD3.5 (MMDiT-X) as ComfyUI's SD3.5 files: the checkpoint without text encoders, CLIP-L, CLIP-G and T5
    in models/text_encoders, and its diffusers folder (the --model-config and the reference)."""
    import diffusers
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sd3_files")
    folder = save_tiny_pipeline("sd3", root / "diffusers", seed=2, sd35=True)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(folder))
    models = root / "ComfyUI" / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "text_encoders").mkdir()
    state = single_file_state_dict(pipe, "sd3")
    checkpoint = models / "checkpoints" / "sd3.5_medium.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("text_encoders.")}, str(checkpoint))
    for name, encoder in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
        save_file({k: v.contiguous() for k, v in _clip_checkpoint_keys(encoder).items()}, str(models / "text_encoders" / f"{name}.safetensors"))
    save_file({k: v.clone().contiguous() for k, v in pipe.text_encoder_3.state_dict().items()}, str(models / "text_encoders" / "t5xxl_fp16.safetensors"))
    return checkpoint, folder


def test_checkpoint_with_text_encoders_beside_it_loads_the_same_model(comfy_layout):
    from training.models import load_family

    checkpoint, folder = comfy_layout
    from_files, from_folder = load_family(str(checkpoint), config_path=str(folder)), load_family(str(folder))
    assert from_files.name == "sd3"
    assert tuple(from_files.network.config.dual_attention_layers) == (0,) and from_files.network.config.qk_norm == "rms_norm"
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b = getattr(from_files.pipeline, component).state_dict(), getattr(from_folder.pipeline, component).state_dict()
        assert a.keys() == b.keys(), component
        assert all(torch.equal(a[k], b[k]) for k in b), component
    x_t = torch.randn(from_files.latent_shape(1), generator=torch.Generator().manual_seed(1))
    cond = from_files.encode_prompts(["a red cube"])
    torch.testing.assert_close(cond["encoder_hidden_states"], from_folder.encode_prompts(["a red cube"])["encoder_hidden_states"])
    torch.testing.assert_close(from_files.denoise(x_t, torch.tensor([500.0]), cond), from_folder.denoise(x_t, torch.tensor([500.0]), cond))


def test_missing_text_encoders_are_named(comfy_layout, tmp_path):
    import shutil

    from training.errors import TrainingInputError
    from training.models import load_family

    checkpoint, folder = comfy_layout
    models = tmp_path / "models"
    shutil.copytree(checkpoint.parent.parent, models)
    (models / "text_encoders" / "clip_g.safetensors").unlink()
    (models / "text_encoders" / "t5xxl_fp16.safetensors").unlink()
    with pytest.raises(TrainingInputError, match=r"without its text encoders, and models/text_encoders/clip_g.safetensors, "
                                                 r"models/text_encoders/t5xxl_fp16.safetensors are missing"):
        load_family(str(models / "checkpoints" / checkpoint.name), config_path=str(folder))
