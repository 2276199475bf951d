"""Where each file the example workflows load comes from: the ``properties.models`` entries the builder puts
on every loader node, as ComfyUI's own templates carry them (``{"name", "url", "directory"}``).

The frontend (1.32.9: ``getSelectedModelsMetadata`` / ``MissingModelsWarning``) reads a loader's entries whose
``name`` is one of the node's widget values, looks the name up in the server's ``directory`` folder, and lists
the missing ones in its "missing models" dialog with a download button. It downloads only from
``https://huggingface.co/`` or ``https://civitai.com/`` and only names ending in ``.safetensors`` / ``.sft``
(other names are listed with the frontend's own "only allowed suffixes" notice instead of a button).

Base-model URLs are the ones ComfyUI's workflow templates use for the same file name (the template named in
``source``, in comfyui-workflow-templates 0.7.25 as installed with ComfyUI or in comfyui-workflow-templates-json
0.1.123 from PyPI); the released TDM LoRAs' URLs are built from the repository and file names
``tdm_core.releases.RELEASES`` gives (``Release.file``, "<repo>: <file>"), assumed to be the authors' Hugging Face
repositories: no URL was fetched here (no internet). Files with no known public URL
are in ``NO_URL`` with the reason; the pack's own trained LoRAs are in ``PACK_MADE_LORAS`` with the command
that makes them (their workflow's note gives it).
"""
from __future__ import annotations

from dataclasses import dataclass

from tdm_core.releases import RELEASES

# (loader node type, widget input) -> the models folder ComfyUI lists that input from
LOADER_FOLDERS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("TDMLoraLoader", "lora_name"): "loras",
}
# what a widget value that names a model file ends with (ComfyUI's supported_pt_extensions)
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl")
HF = "https://huggingface.co"
# the source of a released LoRA's entry: its URL has not been tried
RELEASE_SOURCE = "assumed from the authors' repo name, not fetched"


@dataclass(frozen=True)
class Download:
    directory: str
    url: str
    source: str  # where the URL comes from

    def entry(self, name: str) -> dict:
        return {"name": name, "url": self.url, "directory": self.directory}


def _template(directory: str, url: str, template: str) -> Download:
    return Download(directory, url, f"ComfyUI template {template}")


def release_repo_and_file(release: str) -> tuple[str, str]:
    """The Hugging Face repository and file name of a release in ``tdm_core.releases.RELEASES``."""
    repo, _, file = RELEASES[release].file.partition(": ")
    if not file:
        raise ValueError(f"{release}: tdm_core.releases names no file in {repo}: list it in NO_URL instead")
    return repo, file


def _release(release: str) -> Download:
    repo, file = release_repo_and_file(release)
    return Download("loras", f"{HF}/{repo}/resolve/main/{file}", f"{RELEASE_SOURCE}: {release}")


DOWNLOADS = {
    # SD1.5 / SDXL checkpoints
    "v1-5-pruned-emaonly-fp16.safetensors": _template(
        "checkpoints", f"{HF}/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors?download=true",
        "default.json"),
    "sd_xl_base_1.0.safetensors": _template(
        "checkpoints", f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors?download=true",
        "sdxl_simple_example.json"),
    # Flux.1-dev
    "flux1-dev.safetensors": _template(
        "diffusion_models", f"{HF}/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors", "flux_dev_full_text_to_image.json"),
    "clip_l.safetensors": _template(
        "text_encoders", f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors", "flux_dev_full_text_to_image.json"),
    "t5xxl_fp16.safetensors": _template(
        "text_encoders", f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors", "flux_dev_full_text_to_image.json"),
    # the Flux VAE; the Z-Image-Turbo template points to its own copy (Z_IMAGE_DOWNLOADS)
    "ae.safetensors": _template(
        "vae", f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors", "flux_dev_full_text_to_image.json"),
    # Z-Image-Turbo
    "z_image_turbo_bf16.safetensors": _template(
        "diffusion_models", f"{HF}/Comfy-Org/z_image_turbo/resolve/main/split_files/diffusion_models/z_image_turbo_bf16.safetensors",
        "image_z_image_turbo.json"),
    "qwen_3_4b.safetensors": _template(
        "text_encoders", f"{HF}/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/qwen_3_4b.safetensors",
        "image_z_image_turbo.json"),
    # Qwen-Image
    "qwen_image_fp8_e4m3fn.safetensors": _template(
        "diffusion_models", f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/diffusion_models/qwen_image_fp8_e4m3fn.safetensors",
        "image_qwen_image.json"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": _template(
        "text_encoders", f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
        "image_qwen_image.json"),
    "qwen_image_vae.safetensors": _template(
        "vae", f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/qwen_image_vae.safetensors", "image_qwen_image.json"),
    # Wan 2.1 / 2.2
    "wan2.1_t2v_1.3B_fp16.safetensors": _template(
        "diffusion_models",
        f"{HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors?download=true",
        "text_to_video_wan.json"),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": _template(
        "text_encoders", f"{HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        "video_wan2_2_14B_t2v.json"),
    "wan_2.1_vae.safetensors": _template(
        "vae", f"{HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/vae/wan_2.1_vae.safetensors", "image_to_video_wan.json"),
    "wan2.2_ti2v_5B_fp16.safetensors": _template(
        "diffusion_models", f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/wan2.2_ti2v_5B_fp16.safetensors",
        "video_wan2_2_5B_ti2v.json"),
    "wan2.2_vae.safetensors": _template(
        "vae", f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/vae/wan2.2_vae.safetensors", "video_wan2_2_5B_ti2v.json"),
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": _template(
        "diffusion_models",
        f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
        "video_wan2_2_14B_t2v.json"),
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": _template(
        "diffusion_models",
        f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
        "video_wan2_2_14B_t2v.json"),
    # the authors' released TDM LoRAs (the workflows load them under these names)
    "tdm_dreamshaper.pt": _release("tdm_dreamshaper"),
    "tdm_sd3_medium_lora.safetensors": _release("tdm_sd3_medium"),
    "tdmr1_zimage_ema.ckpt": _release("tdmr1_z_image_turbo"),
}
Z_IMAGE_DOWNLOADS = {**DOWNLOADS, "ae.safetensors": _template(
    "vae", f"{HF}/Comfy-Org/z_image_turbo/resolve/main/split_files/vae/ae.safetensors", "image_z_image_turbo.json")}

# files with no public URL we know of: their workflow's note says where they come from
NO_URL = {
    # no ComfyUI template carries the all-in-one SD3 / SD3.5 Medium checkpoints (the templates use sd3.5_large_fp8_scaled)
    "sd3_medium_incl_clips_t5xxlfp16.safetensors": "no ComfyUI template has a URL for it",
    "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors": "no ComfyUI template has a URL for it",
    # the TDM Dreamshaper release's base; the templates carry Dreamshaper 8 only (a civitai URL)
    "dreamshaper_7.safetensors": "no ComfyUI template has a URL for Dreamshaper 7",
    # the README names the repository (Luo-Yihong/TDM_sd3-5_lora) but not the file in it
    "tdm_sd35_medium_lora.safetensors": "the release's file name inside Luo-Yihong/TDM_sd3-5_lora is not known here",
}

# LoRAs the pack makes (training.distill or the TDM Distill node): no URL, their workflow's note gives the command
DISTILL_COMMAND = "python -m training.distill"
PACK_MADE_LORAS = {
    "tdm_sd15_lora.safetensors": DISTILL_COMMAND,
    "tdm_sdxl_lora.safetensors": DISTILL_COMMAND,
    "flux_dev_tdm4.safetensors": DISTILL_COMMAND,
    "z_image_turbo_tdm4.safetensors": DISTILL_COMMAND,
    "qwen_image_tdm4.safetensors": DISTILL_COMMAND,
    "wan2.1_t2v_1.3B_tdm4.safetensors": DISTILL_COMMAND,
    "tdm_sd15_unify_lora.safetensors": f"{DISTILL_COMMAND} --steps-aware",
}


# the loader node type -> the models folder it reads (one folder per loader: test_workflow_model_links checks it)
NODE_FOLDERS = {node_type: folder for (node_type, _), folder in LOADER_FOLDERS.items()}


def model_entries(node_type: str, values: dict, downloads: dict = DOWNLOADS) -> list[dict]:
    """The ``properties.models`` entries of a node given its widget values by input name (empty when it loads
    no file with a known URL)."""
    out = []
    for (loader, input_name), folder in LOADER_FOLDERS.items():
        name = values.get(input_name) if loader == node_type else None
        if isinstance(name, str) and name in downloads:
            download = downloads[name]
            if download.directory != folder:
                raise ValueError(f"{name}: its URL entry says models/{download.directory}, but {node_type}.{input_name} "
                                 f"reads models/{folder}: fix DOWNLOADS or LOADER_FOLDERS")
            out.append(download.entry(name))
    return out
