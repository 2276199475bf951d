"""Wan from the files a ComfyUI user has (the names of ComfyUI's own Wan templates), into a diffusers ``WanPipeline``.

    models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors   the transformer in Wan's original layout (also the
                                                               14B, fp8 / fp8_scaled, wan2.2_ti2v_5B_fp16; any name)
    models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors UMT5-XXL's encoder (transformers' names; ComfyUI's
                                                               scaled fp8 dequantised by weight_formats.read_weights)
    models/vae/wan_2.1_vae.safetensors                         Wan 2.1's VAE (wan2.2_vae.safetensors for the 5B)

``--model`` names the diffusion-model file; the text encoder and the VAE are looked up in the sibling ComfyUI
folders. The transformer goes through diffusers' own ``convert_wan_transformer_to_diffusers`` (the converter
``WanTransformer3DModel.from_single_file`` runs; called directly on the weights ``weight_formats.read_weights``
dequantised), its size (1.3B / 14B / 5B) read from the file's width against the shipped configs
(``training/configs/wan`` and its ``variants``), the number of blocks from the file. The VAE loads with
``AutoencoderKLWan.from_single_file`` (given the weights read_weights read). The tokenizer comes from
``--model-config`` (a diffusers Wan folder with ``tokenizer/``; weights are not needed): ComfyUI's UMT5 file carries
its sentencepiece model, which transformers 5 cannot read without protobuf, so it is not used.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights

from training.errors import TrainingInputError

from .file_weights import CHECKPOINT_PREFIX, network_from_state, strip_checkpoint_prefix
from .text_encoders import text_encoder_files
from .wan import CONFIGS
from .weight_formats import read_weights

MARKERS = ("patch_embedding.weight", "blocks.0.self_attn.q.weight", "head.head.weight")  # Wan's original DiT names
TEXT_ENCODER_GLOB, TEXT_ENCODER_FILE = "umt5_xxl*.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE_FILES = {16: "wan_2.1_vae.safetensors", 48: "wan2.2_vae.safetensors"}  # latent channels -> ComfyUI's template VAE
# transformer width -> its shipped diffusers config (a model of another width needs --model-config)
SHIPPED_TRANSFORMERS = {1536: CONFIGS / "transformer" / "config.json", 5120: CONFIGS / "variants" / "wan2.1_t2v_14b_transformer.json",
                        3072: CONFIGS / "variants" / "wan2.2_ti2v_5b_transformer.json"}


def is_wan(keys) -> bool:
    keys = set(keys)
    return all(k in keys for k in MARKERS) or all(CHECKPOINT_PREFIX + k in keys for k in MARKERS)


def companion_files(diffusion_model: Path, channels: int) -> dict[str, Path]:
    """The text encoder and the VAE in the ComfyUI folders beside ``models/diffusion_models``; a clear error otherwise."""
    models = diffusion_model.resolve().parent.parent
    vae = VAE_FILES.get(channels, VAE_FILES[16])
    wanted = {"text_encoder": (text_encoder_files(models, TEXT_ENCODER_GLOB),
                               f"models/text_encoders/{TEXT_ENCODER_FILE}"),
              "vae": ([f for f in (models / "vae" / vae,) if f.is_file()], f"models/vae/{vae}")}
    missing = [where for found, where in wanted.values() if not found]
    if missing:
        raise TrainingInputError(
            f"{diffusion_model.name} is a Wan diffusion model in ComfyUI's layout, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing under {models}: put the files ComfyUI's Wan template uses there "
            f"({TEXT_ENCODER_FILE} and {vae}), or pass a diffusers Wan folder as --model.")
    return {name: found[0] for name, (found, _) in wanted.items()}


def _transformer_config(state: dict, config_dir: Path | None) -> dict:
    width = int(state["patch_embedding.weight"].shape[0])
    if config_dir is not None:
        config = json.loads((config_dir / "transformer" / "config.json").read_text())
    elif width in SHIPPED_TRANSFORMERS:
        config = json.loads(SHIPPED_TRANSFORMERS[width].read_text())
    else:
        raise TrainingInputError(f"a Wan transformer {width} wide is none of the shipped Wan 2.1 1.3B / 14B, Wan 2.2 5B: pass --model-config "
                           "with the diffusers config folder of this model")
    if width != config["num_attention_heads"] * config["attention_head_dim"]:
        raise TrainingInputError(f"the Wan file is {width} wide, the config {config['num_attention_heads']} x {config['attention_head_dim']}: "
                           "pass --model-config with the diffusers config of this model")
    if state["patch_embedding.weight"].shape[1] != config["in_channels"]:
        raise TrainingInputError(f"the Wan file takes {state['patch_embedding.weight'].shape[1]} input channels (an image-to-video model?): "
                           "TDM distils the text-to-video models; pass Wan 2.1 T2V or Wan 2.2 TI2V-5B")
    config["num_layers"] = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return {k: v for k, v in config.items() if not k.startswith("_")}


def load_transformer(path: Path, config_dir: Path | None, dtype):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state = strip_checkpoint_prefix(read_weights(path, dtype))
    if not is_wan(state):
        raise TrainingInputError(f"{path.name} is not a Wan diffusion model (no {', '.join(MARKERS)}): pass ComfyUI's "
                           "models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors or a diffusers Wan folder, or drop --family wan")
    config = _transformer_config(state, config_dir)
    return network_from_state(WanTransformer3DModel, config, convert_wan_transformer_to_diffusers(state), path.name, "Wan",
                              "pass an intact Wan file", dtype)


def _text_encoder(path: Path, config_dir: Path, dtype):
    from transformers import UMT5Config, UMT5EncoderModel

    state = read_weights(path, dtype)
    state.pop("spiece_model", None)  # ComfyUI keeps the tokenizer in the file
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    with init_empty_weights():
        model = UMT5EncoderModel(UMT5Config.from_pretrained(str(config_dir / "text_encoder")))
    wanted = {k for k in model.state_dict() if k != "encoder.embed_tokens.weight"}  # tied to shared.weight
    missing = sorted(wanted - set(state))
    if missing:
        raise TrainingInputError(f"{path.name} is not the UMT5 encoder {config_dir} describes: it lacks {len(missing)} weights (e.g. {missing[:3]}); "
                           f"pass ComfyUI's {TEXT_ENCODER_FILE}")
    try:
        model.load_state_dict({k: state[k] for k in wanted}, strict=False, assign=True)
    except RuntimeError as err:
        raise TrainingInputError(f"{path.name} does not fit the UMT5 config of {config_dir} ({str(err)[:200]}): pass --model-config") from err
    model.tie_weights()
    return model.to(dtype).eval()


def _vae(path: Path, config_dir: Path, channels: int, dtype):
    from diffusers import AutoencoderKLWan

    if json.loads((config_dir / "vae" / "config.json").read_text()).get("z_dim") != channels:
        raise TrainingInputError(f"the VAE config of {config_dir} is not the {channels}-channel VAE this Wan model needs: "
                           "pass --model-config with the diffusers folder of this model (e.g. Wan2.2-TI2V-5B-Diffusers)")
    try:
        return AutoencoderKLWan.from_single_file(read_weights(path, dtype), config=str(config_dir), subfolder="vae",
                                                 torch_dtype=dtype, local_files_only=True).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise TrainingInputError(f"cannot read {path} as the Wan VAE of {config_dir} ({str(err)[:200]}): pass ComfyUI's "
                           f"{VAE_FILES[channels]}") from err


def _tokenizer(config_dir: Path):
    from transformers import AutoTokenizer

    folder = config_dir / "tokenizer"
    if not folder.is_dir():
        raise TrainingInputError(f"no UMT5 tokenizer in {config_dir}: pass --model-config with a diffusers Wan folder that has tokenizer/ "
                           "(e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers without its weights)")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


A14B_EXPERT_NAMES = ("high_noise", "low_noise")  # ComfyUI's Wan 2.2 A14B files: wan2.2_t2v_{high,low}_noise_14B_*.safetensors


def check_not_an_a14b_expert(path: Path) -> None:
    """An A14B expert has the 14B's architecture, so only its name tells it: one expert is not the whole model."""
    if any(tag in path.name.lower() for tag in A14B_EXPERT_NAMES):
        from .wan import A14B_REFUSAL

        raise TrainingInputError(f"{path.name} is one expert of the two-expert Wan 2.2 A14B: {A14B_REFUSAL}")


def load_wan_files(path: Path, config_path: Path | None, dtype=torch.float32):
    """A WanPipeline from ComfyUI's Wan files (see the module docstring)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    check_not_an_a14b_expert(path)
    config_dir = Path(config_path) if config_path else None
    transformer = load_transformer(path, config_dir, dtype)  # first: a file of an unknown width is named before anything loads
    channels = int(transformer.config.in_channels)
    files = companion_files(path, channels)
    config_dir = config_dir or CONFIGS
    tokenizer = _tokenizer(config_dir)
    return WanPipeline(tokenizer=tokenizer, text_encoder=_text_encoder(files["text_encoder"], config_dir, dtype),
                       vae=_vae(files["vae"], config_dir, channels, dtype), transformer=transformer,
                       scheduler=UniPCMultistepScheduler.from_pretrained(str(config_dir), subfolder="scheduler"))
