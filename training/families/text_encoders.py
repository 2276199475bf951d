"""Text encoders and tokenizers from the files a ComfyUI user has, shared by the ComfyUI-file loaders
(``*_files.py``) and ``training.models``' single-file checkpoints.

    models/text_encoders/*.safetensors   the text encoders (``models/clip``: ComfyUI's older name of the folder)
    comfy/sd1_tokenizer                  CLIP's BPE vocabulary, shipped with ComfyUI (or ``$TDM_CLIP_TOKENIZER``)
    comfy/text_encoders/<name>           the other tokenizers ComfyUI ships beside it (t5_tokenizer, qwen25_tokenizer)

The shipped configs (``training/configs``) carry no vocabulary (1.5 MB of data per tokenizer): a config folder's
own tokenizer is used when it has one, else ComfyUI's.
"""
from __future__ import annotations

import os
from pathlib import Path

from training.errors import TrainingInputError

from .weight_formats import read_weights

TOKENIZER_ENV = "TDM_CLIP_TOKENIZER"
TEXT_ENCODER_FOLDERS = ("text_encoders", "clip")  # under ComfyUI's models/; "clip" is the folder's older name
T5_TOKENIZER, QWEN_TOKENIZER = "t5_tokenizer", "qwen25_tokenizer"  # ComfyUI's comfy/text_encoders/<name>


def text_encoder_files(models: Path, pattern: str) -> list[Path]:
    """The files matching ``pattern`` in ComfyUI's text-encoder folders under ``models``, sorted per folder."""
    return [f for folder in TEXT_ENCODER_FOLDERS for f in sorted((models / folder).glob(pattern))]


def clip_vocabulary_folders() -> list[Path]:
    """Where a CLIP BPE vocabulary (vocab.json + merges.txt) may already be on disk. ComfyUI ships one in
    comfy/sd1_tokenizer, so a ComfyUI install has it."""
    from training.comfy_host import comfy_roots

    candidates = [Path(os.environ[TOKENIZER_ENV])] if os.environ.get(TOKENIZER_ENV) else []
    return candidates + [root / "comfy" / "sd1_tokenizer" for root in comfy_roots()]


def comfy_tokenizer_folders(name: str) -> list[Path]:
    """ComfyUI's ``comfy/text_encoders/<name>`` beside each CLIP vocabulary folder (existing or not)."""
    return [f.parent / "text_encoders" / name for f in clip_vocabulary_folders()]


def t5_tokenizer_folders() -> list[Path]:
    """ComfyUI's T5 tokenizer (``comfy/text_encoders/t5_tokenizer``) beside the CLIP vocabulary it ships."""
    return [f.parent / "text_encoders" / T5_TOKENIZER for f in clip_vocabulary_folders() if (f / "vocab.json").is_file()]


def clip_tokenizers(config: Path, family: str) -> dict:
    """CLIP tokenizer objects (``tokenizer``, and ``tokenizer_2`` for ``family`` "sdxl") when ``config`` has no
    vocabulary of its own; {} when it has."""
    names = ["tokenizer"] + (["tokenizer_2"] if family == "sdxl" else [])

    def has_vocabulary(folder: Path) -> bool:
        return (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()

    if all(has_vocabulary(config / name) for name in names):
        return {}
    from transformers import CLIPTokenizer

    for folder in clip_vocabulary_folders():
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab, merges = str(folder / "vocab.json"), str(folder / "merges.txt")
            # SDXL's second tokenizer pads with "!" (OpenCLIP), the first with the end token
            pads = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
            return {name: CLIPTokenizer(vocab, merges, model_max_length=77, pad_token=pads[name]) for name in names}
    raise TrainingInputError(
        f"the {family} config at {config} has no CLIP tokenizer vocabulary and none was found on this machine: "
        f"set {TOKENIZER_ENV} to a folder holding vocab.json and merges.txt (ComfyUI ships one in comfy/sd1_tokenizer), "
        "or pass config_path= a diffusers folder of the same model that includes its tokenizer."
    )


def text_model(model_class, config_class, path: Path, config_dir: Path, dtype):
    """A transformers text encoder (CLIP-L, CLIP-G, T5-XXL) from a ComfyUI file in transformers' layout, with the
    config of ``config_dir``; a file that lacks weights of it gets a clear error."""
    state = read_weights(path, dtype)
    if model_class.__name__ == "T5EncoderModel" and "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]  # some T5 exports keep only the encoder's copy
    try:  # transformers builds it on the meta device and fills it from the state dict (a 4.7 B T5 never exists twice)
        model, info = model_class.from_pretrained(None, config=config_class.from_pretrained(str(config_dir)), state_dict=state,
                                                  torch_dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise TrainingInputError(f"cannot read {path} as the {model_class.__name__} of {config_dir}: {err}") from err
    missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
    if missing:
        raise TrainingInputError(f"{path.name} is not the {model_class.__name__} the config {config_dir} describes: it lacks "
                                 f"{len(missing)} weights (e.g. {missing[:3]}); pass the text-encoder file ComfyUI's own workflow for this model uses")
    return model.eval()
