"""Writes the example workflows in ``workflows/`` (UI format, as ComfyUI saves them).

Widget values are laid out from the node definitions of a live server (``/object_info``), so their
order always matches ``input_order``; regenerate after a node's inputs change:

    .venv/bin/python -m tests.helpers.workflow_builder          # starts a server, rewrites workflows/

The frontend rejects keys whose value is null, so unconnected inputs are left out (it recreates
their slots from the node definition) and no key is ever None. Every loader node carries
``properties.models`` (file name, download URL, models folder: ``tests/helpers/model_downloads.py``), as
ComfyUI's own templates do, so the frontend offers to download the files a user lacks.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.model_downloads import DOWNLOADS, Z_IMAGE_DOWNLOADS, model_entries
from tests.helpers.workflow_api import SEED_NAMES, UPLOAD_OPTIONS, widget_specs

WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "workflows"
NODE_WIDTH = 320


@dataclass(frozen=True)
class Output:
    node_id: int
    slot: int


@dataclass
class UIWorkflow:
    object_info: dict
    downloads: dict = field(default_factory=lambda: DOWNLOADS)  # file name -> where to download it
    nodes: list = field(default_factory=list)
    links: list = field(default_factory=list)

    def add(self, node_type: str, pos: tuple[float, float], title: str = "", **values: Any) -> "NodeRef":
        """Adds a node; ``values`` holds widget values and links (``Output``) by input name."""
        info = self.object_info[node_type]
        node_id = len(self.nodes) + 1
        node = {"id": node_id, "type": node_type, "pos": [pos[0], pos[1]], "flags": {}, "order": node_id - 1,
                "mode": 0, "inputs": [], "outputs": [], "properties": {"Node name for S&R": node_type}}
        if title:
            node["title"] = title
        unknown = set(values) - set(all_input_names(info))
        if unknown:
            raise KeyError(f"{node_type} has no inputs {sorted(unknown)}; it has {all_input_names(info)}")
        node["widgets_values"] = self._widget_values(info, values)
        models = model_entries(node_type, values, self.downloads)
        if models:
            node["properties"]["models"] = models
        for name, kind in link_inputs(info):
            if isinstance(values.get(name), Output):
                node["inputs"].append({"name": name, "type": kind, "link": self._link(values[name], node_id, len(node["inputs"]), kind)})
        for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"])):
            node["outputs"].append({"name": name, "type": kind, "slot_index": slot, "links": []})
        node["size"] = [NODE_WIDTH, 46 + 24 * (max(len(node["inputs"]), len(node["outputs"])) + len(node["widgets_values"]))]
        self.nodes.append(node)
        return NodeRef(node_id)

    def note(self, pos: tuple[float, float], text: str, title: str = "Models this workflow needs") -> None:
        node_id = len(self.nodes) + 1
        self.nodes.append({"id": node_id, "type": "Note", "pos": [pos[0], pos[1]], "size": [420, 260], "flags": {},
                           "order": node_id - 1, "mode": 0, "inputs": [], "outputs": [], "title": title,
                           "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})

    def _widget_values(self, info: dict, values: dict) -> list:
        out = []
        for name, kind, options in widget_specs(info):
            value = values.get(name, default_value(kind, options))
            if value is None:
                raise ValueError(f"{info['name']}.{name} has no default: give it a value")
            out.append(value)
            if kind == "INT" and options.get("control_after_generate", name in SEED_NAMES):
                out.append("fixed")  # same image on every run, so a comparison stays a comparison
            if kind == "COMBO" and any(options.get(opt) for opt in UPLOAD_OPTIONS):
                out.append("image")
        return out

    def _link(self, source: Output, target_id: int, target_slot: int, kind: str) -> int:
        link_id = len(self.links) + 1
        self.links.append([link_id, source.node_id, source.slot, target_id, target_slot, kind])
        self.nodes[source.node_id - 1]["outputs"][source.slot]["links"].append(link_id)
        return link_id

    def to_json(self) -> dict:
        order = topological_order(self.nodes, self.links)
        for node in self.nodes:
            node["order"] = order[node["id"]]
        return {
            # a fixed id per file name keeps regenerated files diff-free
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-tdm/" + json.dumps([n["type"] for n in self.nodes]))),
            "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}}, "version": 0.4,
        }


@dataclass(frozen=True)
class NodeRef:
    node_id: int

    def __getitem__(self, slot: int) -> Output:
        return Output(self.node_id, slot)


def all_input_names(info: dict) -> list[str]:
    order = info.get("input_order", {})
    return [name for section in ("required", "optional") for name in order.get(section, info["input"].get(section, {}))]


def link_inputs(info: dict) -> list[tuple[str, str]]:
    widgets = {name for name, _, _ in widget_specs(info)}
    out = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            if name not in widgets and not isinstance(spec[0], list):
                out.append((name, spec[0]))
    order = all_input_names(info)
    return sorted(out, key=lambda item: order.index(item[0]))


def default_value(kind: str, options: dict) -> Any:
    if "default" in options:
        return options["default"]
    if kind == "COMBO":
        choices = options.get("options") or []
        return choices[0] if choices else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def topological_order(nodes: list, links: list) -> dict[int, int]:
    parents = {node["id"]: set() for node in nodes}
    for _, source, _, target, _, _ in links:
        parents[target].add(source)
    order, done = {}, set()
    while len(done) < len(nodes):
        ready = sorted(nid for nid in parents if nid not in done and parents[nid] <= done)
        for nid in ready:
            order[nid] = len(order)
            done.add(nid)
    return order


# --- the example workflows -------------------------------------------------------------------
SD15_CKPT = "v1-5-pruned-emaonly-fp16.safetensors"  # the file of ComfyUI's own default workflow
SD15_LORA = "tdm_sd15_lora.safetensors"
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
SDXL_LORA = "tdm_sdxl_lora.safetensors"
SD3_CKPT = "sd3_medium_incl_clips_t5xxlfp16.safetensors"
SD3_LORA = "tdm_sd3_medium_lora.safetensors"
SD35_CKPT = "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
SD35_LORA = "tdm_sd35_medium_lora.safetensors"
DREAMSHAPER_CKPT = "dreamshaper_7.safetensors"
DREAMSHAPER_LORA = "tdm_dreamshaper.pt"
FLUX_UNET = "flux1-dev.safetensors"
FLUX_CLIP_L = "clip_l.safetensors"
FLUX_T5 = "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
FLUX_LORA = "flux_dev_tdm4.safetensors"
FLUX_FILES = (("diffusion_models", FLUX_UNET), ("text_encoders", FLUX_CLIP_L), ("text_encoders", FLUX_T5), ("vae", FLUX_VAE),
              ("loras", FLUX_LORA))
ZIMAGE_UNET = "z_image_turbo_bf16.safetensors"  # the names of ComfyUI's own Z-Image-Turbo template
ZIMAGE_TEXT_ENCODER = "qwen_3_4b.safetensors"
ZIMAGE_VAE = "ae.safetensors"
ZIMAGE_LORA = "z_image_turbo_tdm4.safetensors"
ZIMAGE_FILES = (("diffusion_models", ZIMAGE_UNET), ("text_encoders", ZIMAGE_TEXT_ENCODER), ("vae", ZIMAGE_VAE),
                ("loras", ZIMAGE_LORA))
QWEN_UNET = "qwen_image_fp8_e4m3fn.safetensors"  # the names of ComfyUI's own Qwen-Image template
QWEN_TEXT_ENCODER = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
QWEN_VAE = "qwen_image_vae.safetensors"
QWEN_LORA = "qwen_image_tdm4.safetensors"
TDMR1_LORA = "tdmr1_zimage_ema.ckpt"  # the TDM-R1 release's own file name
TDMR1_FILES = (*ZIMAGE_FILES[:3], ("loras", TDMR1_LORA))
QWEN_FILES = (("diffusion_models", QWEN_UNET), ("text_encoders", QWEN_TEXT_ENCODER), ("vae", QWEN_VAE), ("loras", QWEN_LORA))
QWEN_SHIFT = 2.0  # Qwen-Image's own dynamic shift at 1024 x 1024 (4096 tokens): exp(0.694)
WAN_UNET = "wan2.1_t2v_1.3B_fp16.safetensors"  # the names of ComfyUI's own Wan 2.1 text-to-video template
WAN_TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
WAN_LORA = "wan2.1_t2v_1.3B_tdm4.safetensors"
WAN_FILES = (("diffusion_models", WAN_UNET), ("text_encoders", WAN_TEXT_ENCODER), ("vae", WAN_VAE), ("loras", WAN_LORA))
WAN_SHIFT = 3.0  # the flow_shift of Wan2.1-T2V-1.3B's diffusers scheduler config, the one a LoRA distilled from it records
UNIFY_LORA = "tdm_sd15_unify_lora.safetensors"
INPUT_IMAGE = "tdm_img2img_input.png"
PROMPT = "a photo of a red fox in a snowy forest, golden hour, highly detailed"
SEED = 42


def models_note(checkpoint: str, lora: str, extra: str = "") -> str:
    return (f"Put these files into your ComfyUI models folders:\n\n"
            f"  models/checkpoints/{checkpoint}\n  models/loras/{lora}\n\n"
            f"{lora}: a TDM LoRA, e.g. written by `python -m training.distill` of comfyui-tdm "
            f"(it carries its steps, grid and recommended strength in its metadata; the TDM nodes read them "
            f"when grid is 'auto' and use_recommended_strength is on).\n\n"
            "TDM students run at CFG 1: guidance is distilled into the LoRA." + (f"\n\n{extra}" if extra else ""))


def _sd15_base(wf: UIWorkflow, checkpoint: str = SD15_CKPT, lora: str = SD15_LORA):
    ckpt = wf.add("CheckpointLoaderSimple", (20, 120), ckpt_name=checkpoint)
    lora_node = wf.add("TDMLoraLoader", (380, 120), model=ckpt[0], clip=ckpt[1], lora_name=lora)
    return ckpt, lora_node


def sd15_tdm_ksampler(object_info: dict) -> dict:
    wf = UIWorkflow(object_info)
    wf.note((20, 420), models_note(SD15_CKPT, SD15_LORA))
    ckpt, lora = _sd15_base(wf)
    positive = wf.add("CLIPTextEncode", (740, 120), title="Prompt", clip=lora[1], text=PROMPT)
    latent = wf.add("EmptyLatentImage", (740, 380), width=512, height=512, batch_size=1)
    sampled = wf.add("TDMKSampler", (1100, 120), model=lora[0], seed=SEED, steps=4, grid="auto", cfg=1.0,
                     positive=positive[0], latent_image=latent[0], denoise=1.0)
    image = wf.add("VAEDecode", (1460, 120), samples=sampled[0], vae=ckpt[2])
    wf.add("SaveImage", (1700, 120), images=image[0], filename_prefix="tdm_sd15_4step")
    return wf.to_json()


def _custom_sampling(wf: UIWorkflow, model, clip, vae, latent, x: float, y: float, solver: str, grid: str,
                     prefix: str, prompt: str = PROMPT):
    positive = wf.add("CLIPTextEncode", (x, y), title="Prompt", clip=clip, text=prompt)
    # SamplerCustom needs a negative even at CFG 1, where it is never evaluated
    negative = wf.add("CLIPTextEncode", (x, y + 260), title="Negative (unused at CFG 1)", clip=clip, text="")
    scheduler = wf.add("TDMScheduler", (x + 360, y), model=model, steps=4, grid=grid, denoise=1.0)
    sampler = wf.add("TDMSampler", (x + 360, y + 260), solver=solver)
    sampled = wf.add("SamplerCustom", (x + 720, y), model=model, add_noise=True, noise_seed=SEED, cfg=1.0,
                     positive=positive[0], negative=negative[0], sampler=sampler[0], sigmas=scheduler[0],
                     latent_image=latent)
    image = wf.add("VAEDecode", (x + 1080, y), samples=sampled[0], vae=vae)
    wf.add("SaveImage", (x + 1320, y), images=image[0], filename_prefix=prefix)


def sd15_tdm_sampler_custom(object_info: dict) -> dict:
    wf = UIWorkflow(object_info)
    wf.note((20, 420), models_note(SD15_CKPT, SD15_LORA, "For the released TDM Dreamshaper-7 LoRA pick grid 'auto' and "
                                   "solver 'dpmpp_2m' (its published settings; the TDM KSampler picks the solver itself)."))
    ckpt, lora = _sd15_base(wf)
    latent = wf.add("EmptyLatentImage", (380, 420), width=512, height=512, batch_size=1)
    _custom_sampling(wf, lora[0], lora[1], ckpt[2], latent[0], 740, 120, "tdm", "auto", "tdm_sd15_custom")
    return wf.to_json()


def sdxl_tdm_lora(object_info: dict) -> dict:
    wf = UIWorkflow(object_info)
    wf.note((20, 420), models_note(SDXL_CKPT, SDXL_LORA))
    ckpt, lora = _sd15_base(wf, SDXL_CKPT, SDXL_LORA)
    positive = wf.add("CLIPTextEncode", (740, 120), title="Prompt", clip=lora[1], text=PROMPT)
    latent = wf.add("EmptyLatentImage", (740, 380), width=1024, height=1024, batch_size=1)
    sampled = wf.add("TDMKSampler", (1100, 120), model=lora[0], seed=SEED, steps=4, grid="auto", cfg=1.0,
                     positive=positive[0], latent_image=latent[0], denoise=1.0)
    image = wf.add("VAEDecode", (1460, 120), samples=sampled[0], vae=ckpt[2])
    wf.add("SaveImage", (1700, 120), images=image[0], filename_prefix="tdm_sdxl_4step")
    return wf.to_json()


def release_note(checkpoint: str, lora: str, source: str, settings: str) -> str:
    return (f"Put these files into your ComfyUI models folders:\n\n  models/checkpoints/{checkpoint}\n  models/loras/{lora}\n\n"
            f"{lora}: {source}\n\nThe TDM LoRA Loader recognises the release from its keys and applies its published "
            f"settings, nothing to set by hand: {settings} The loader's 'settings' output (shown here) says what it applied. "
            "`python -m training.convert` of comfyui-tdm writes the file as a ComfyUI LoRA with these settings in its metadata "
            "(then stock LoraLoader works at strength 1 too).")


def _release_workflow(object_info: dict, checkpoint: str, lora_name: str, note: str, latent_node: str, size: int, prefix: str) -> dict:
    """A released TDM LoRA with the nodes' defaults: TDM LoRA Loader -> TDM KSampler (grid auto: the release's own
    solver, grid and shift), and the loader's account of what it applied."""
    wf = UIWorkflow(object_info)
    wf.note((20, 420), note)
    ckpt, lora = _sd15_base(wf, checkpoint, lora_name)
    wf.add("PreviewAny", (380, 420), title="What the loader applied", source=lora[2])
    positive = wf.add("CLIPTextEncode", (740, 120), title="Prompt", clip=lora[1], text=PROMPT)
    latent = wf.add(latent_node, (740, 380), width=size, height=size, batch_size=1)
    sampled = wf.add("TDMKSampler", (1100, 120), model=lora[0], seed=SEED, steps=4, grid="auto", cfg=1.0,
                     positive=positive[0], latent_image=latent[0], denoise=1.0)
    image = wf.add("VAEDecode", (1460, 120), samples=sampled[0], vae=ckpt[2])
    wf.add("SaveImage", (1700, 120), images=image[0], filename_prefix=prefix)
    return wf.to_json()


def sd15_tdm_dreamshaper_release(object_info: dict) -> dict:
    return _release_workflow(object_info, DREAMSHAPER_CKPT, DREAMSHAPER_LORA, release_note(
        DREAMSHAPER_CKPT, DREAMSHAPER_LORA, "the released TDM Dreamshaper-v7 LoRA (Luo-Yihong/TDM_dreamshaper_LoRA, the .pt file "
        "as published); the checkpoint is Dreamshaper 7 (SD1.5).",
        "strength 1, DPM-Solver++(2M) on SD1.5's leading timesteps 801, 601, 401, 201, 4 steps, CFG 1."),
        "EmptyLatentImage", 512, "tdm_dreamshaper_4step")


def sd3_tdm_lora(object_info: dict) -> dict:
    return _release_workflow(object_info, SD3_CKPT, SD3_LORA, release_note(
        SD3_CKPT, SD3_LORA, "the released TDM LoRA for SD3-Medium (Luo-Yihong/TDM_sd3_lora: pytorch_lora_weights.safetensors, "
        "saved under this name).",
        "strength 0.125 (the authors' 'IMPORTANT' adapter scale), DPM-Solver++(2M) with flow shift 6 (set on the model "
        "as ModelSamplingSD3 would; a ModelSamplingSD3 node after the loader overrides it, the authors say 1..6 works), "
        "4 steps, CFG 1."),
        "EmptySD3LatentImage", 1024, "tdm_sd3_4step")


def sd35_tdm_lora(object_info: dict) -> dict:
    return _release_workflow(object_info, SD35_CKPT, SD35_LORA, release_note(
        SD35_CKPT, SD35_LORA, "the released TDM LoRA for SD3.5-Medium (Luo-Yihong/TDM_sd3-5_lora, saved under this name).",
        "strength 1 (the authors document no adapter scale for it: what diffusers' load_lora_weights applies; lower it, "
        "e.g. to 0.125 as for SD3, with use_recommended_strength off if images look burnt), DPM-Solver++(2M) with flow "
        "shift 6 as for SD3, 4 steps, CFG 1."),
        "EmptySD3LatentImage", 1024, "tdm_sd35_4step")


def flux_tdm_lora(object_info: dict) -> dict:
    wf = UIWorkflow(object_info)
    files = "\n".join(f"  models/{folder}/{name}" for folder, name in FLUX_FILES)
    wf.note((20, 520), (
        f"Put these files into your ComfyUI models folders (Flux.1-dev as ComfyUI's own Flux template has it):\n\n{files}\n\n"
        f"{FLUX_LORA}: a Flux.1-dev TDM LoRA written by `python -m training.distill --cfg 3.5 --resolution 1024` of comfyui-tdm.\n\n"
        "Flux.1-dev is guidance-distilled, so the student was distilled at the guidance given to it: keep FluxGuidance at the "
        "LoRA's --cfg (3.5 here) and CFG at 1. Keep ModelSamplingFlux's width and height at the training resolution "
        "(1024): they set the flow shift the student was trained on, which the TDM Scheduler reads from the model."))
    unet = wf.add("UNETLoader", (20, 120), unet_name=FLUX_UNET)
    clip = wf.add("DualCLIPLoader", (20, 280), clip_name1=FLUX_CLIP_L, clip_name2=FLUX_T5, type="flux")
    vae = wf.add("VAELoader", (20, 440), vae_name=FLUX_VAE)
    lora = wf.add("TDMLoraLoader", (380, 120), model=unet[0], clip=clip[0], lora_name=FLUX_LORA)
    shifted = wf.add("ModelSamplingFlux", (380, 420), model=lora[0], max_shift=1.15, base_shift=0.5, width=1024, height=1024)
    positive = wf.add("CLIPTextEncode", (740, 120), title="Prompt", clip=lora[1], text=PROMPT)
    guided = wf.add("FluxGuidance", (740, 380), conditioning=positive[0], guidance=3.5)
    latent = wf.add("EmptySD3LatentImage", (740, 560), width=1024, height=1024, batch_size=1)
    sampled = wf.add("TDMKSampler", (1100, 120), model=shifted[0], seed=SEED, steps=4, grid="auto", cfg=1.0,
                     positive=guided[0], latent_image=latent[0], denoise=1.0)
    image = wf.add("VAEDecode", (1460, 120), samples=sampled[0], vae=vae[0])
    wf.add("SaveImage", (1700, 120), images=image[0], filename_prefix="tdm_flux_4step")
    return wf.to_json()


def z_image_tdm_lora(object_info: dict) -> dict:
    wf = UIWorkflow(object_info, Z_IMAGE_DOWNLOADS)
    files = "\n".join(f"  models/{folder}/{name}" for folder, name in ZIMAGE_FILES)
    wf.note((20, 520), (
        f"Put these files into your ComfyUI models folders (Z-Image-Turbo as ComfyUI's own Z-Image-Turbo template has it):\n\n{files}\n\n"
        f"{ZIMAGE_LORA}: a Z-Image-Turbo TDM LoRA written by `python -m training.distill --model "
        f"models/diffusion_models/{ZIMAGE_UNET} --cfg 1` of comfyui-tdm (the turbo model samples without CFG, so it is "
        "distilled at --cfg 1; a base Z-Image LoRA is distilled with CFG and also samples at CFG 1).\n\n"
        "Keep CFG at 1 and ModelSamplingAuraFlow's shift at the LoRA's flow shift (3, Z-Image-Turbo's own): the TDM Scheduler "
        "reads the shift from the model and warns when it differs from the one the LoRA was trained at."))
    unet = wf.add("UNETLoader", (20, 120), unet_name=ZIMAGE_UNET)
    clip = wf.add("CLIPLoader", (20, 280), clip_name=ZIMAGE_TEXT_ENCODER, type="lumina2")
    vae = wf.add("VAELoader", (20, 440), vae_name=ZIMAGE_VAE)
    lora = wf.add("TDMLoraLoader", (380, 120), model=unet[0], clip=clip[0], lora_name=ZIMAGE_LORA)
    shifted = wf.add("ModelSamplingAuraFlow", (380, 420), model=lora[0], shift=3.0)
    positive = wf.add("CLIPTextEncode", (740, 120), title="Prompt", clip=lora[1], text=PROMPT)
    latent = wf.add("EmptySD3LatentImage", (740, 380), width=1024, height=1024, batch_size=1)
    sampled = wf.add("TDMKSampler", (1100, 120), model=shifted[0], seed=SEED, steps=4, grid="auto", cfg=1.0,
                     positive=positive[0], latent_image=latent[0], denoise=1.0)
    image = wf.add("VAEDecode", (1460, 120), samples=sampled[0], vae=vae[0])
    wf.add("SaveImage", (1700, 120), images=image[0], filename_prefix="tdm_z_image_4step")
    return wf.to_json()


def z_image_tdmr1_release(object_info: dict) -> dict:
    """The TDM-R1 Z-Image-Turbo release as published (a positional .ckpt) on the nodes' defaults."""
    wf = UIWorkflow(object_info, Z_IMAGE_DOWNLOADS)
    files = "\n".join(f"  models/{folder}/{name}" for folder, name in TDMR1_FILES)
    wf.note((20, 620), (
        f"Put these files into your ComfyUI models folders (Z-Image-Turbo as ComfyUI's own template has it):\n\n{files}\n\n"
        f"{TDMR1_LORA}: the TDM-R1 release (Luo-Yihong/TDM-R1), as downloaded. It lists its LoRA tensors without names; "
        "the TDM LoRA Loader names them from the model's own depth (the order peft enumerates Z-Image-Turbo's trainable "
        "parameters in, r 32, alpha 64) and applies the authors' settings, nothing to set by hand: strength 1, 4 steps on "
        "the timesteps 1000, 750, 500, 250 at Z-Image-Turbo's shift 3 (their num_inference_steps=5), CFG 1 (their guidance 0). "
        "The loader's 'settings' output (shown here) says what it applied. `python -m training.convert` of comfyui-tdm "
        "writes it as a named .safetensors with these settings in its metadata."))
    unet = wf.add("UNETLoader", (20, 120), unet_name=ZIMAGE_UNET)
    clip = wf.add("CLIPLoader", (20, 280), clip_name=ZIMAGE_TEXT_ENCODER, type="lumina2")
    vae = wf.add("VAELoader", (20, 440), vae_name=ZIMAGE_VAE)
    lora = wf.add("TDMLoraLoader", (380, 120), model=unet[0], lora_name=TDMR1_LORA)
    wf.add("PreviewAny", (380, 420), title="What the loader applied", source=lora[2])
    positive = wf.add("CLIPTextEncode", (740, 120), title="Prompt", clip=clip[0], text=PROMPT)
    latent = wf.add("EmptySD3LatentImage", (740, 380), width=1024, height=1024, batch_size=1)
    sampled = wf.add("TDMKSampler", (1100, 120), model=lora[0], seed=SEED, steps=4, grid="auto", cfg=1.0,
                     positive=positive[0], latent_image=latent[0], denoise=1.0)
    image = wf.add("VAEDecode", (1460, 120), samples=sampled[0], vae=vae[0])
    wf.add("SaveImage", (1700, 120), images=image[0], filename_prefix="tdmr1_z_image_4step")
    return wf.to_json()


def qwen_image_tdm_lora(object_info: dict) -> dict:
    wf = UIWorkflow(object_info)
    files = "\n".join(f"  models/{folder}/{name}" for folder, name in QWEN_FILES)
    wf.note((20, 520), (
        f"Put these files into your ComfyUI models folders (Qwen-Image as ComfyUI's own Qwen-Image template has it; "
        f"qwen_image_bf16.safetensors works too):\n\n{files}\n\n"
        f"{QWEN_LORA}: a Qwen-Image TDM LoRA written by `python -m training.distill --cfg 2.5 --resolution 1024` of "
        "comfyui-tdm (--model: the diffusion-model file above, the text encoder and VAE are found beside it).\n\n"
        "Qwen-Image uses true CFG; the student was distilled with the teacher's CFG (and the empty negative prompt) "
        "built in, so it samples at CFG 1 with no negative prompt. Set ModelSamplingAuraFlow's shift to the LoRA's "
        f"flow shift: {QWEN_SHIFT} for a LoRA trained at 1024 px (Qwen-Image's own shift there; the TDM Scheduler "
        "says in the log when the model samples at another one). ComfyUI's template uses 3.1 for the 20-step teacher."))
    unet = wf.add("UNETLoader", (20, 120), unet_name=QWEN_UNET, weight_dtype="default")
    clip = wf.add("CLIPLoader", (20, 280), clip_name=QWEN_TEXT_ENCODER, type="qwen_image")
    vae = wf.add("VAELoader", (20, 440), vae_name=QWEN_VAE)
    lora = wf.add("TDMLoraLoader", (380, 120), model=unet[0], lora_name=QWEN_LORA)
    shifted = wf.add("ModelSamplingAuraFlow", (380, 420), model=lora[0], shift=QWEN_SHIFT)
    positive = wf.add("CLIPTextEncode", (740, 120), title="Prompt", clip=clip[0], text=PROMPT)
    latent = wf.add("EmptySD3LatentImage", (740, 380), width=1024, height=1024, batch_size=1)
    sampled = wf.add("TDMKSampler", (1100, 120), model=shifted[0], seed=SEED, steps=4, grid="auto", cfg=1.0,
                     positive=positive[0], latent_image=latent[0], denoise=1.0)
    image = wf.add("VAEDecode", (1460, 120), samples=sampled[0], vae=vae[0])
    wf.add("SaveImage", (1700, 120), images=image[0], filename_prefix="tdm_qwen_image_4step")
    return wf.to_json()


def wan_t2v_tdm_lora(object_info: dict) -> dict:
    wf = UIWorkflow(object_info)
    files = "\n".join(f"  models/{folder}/{name}" for folder, name in WAN_FILES)
    wf.note((20, 520), (
        f"Put these files into your ComfyUI models folders (Wan 2.1 T2V 1.3B as ComfyUI's own text-to-video Wan template "
        f"has it):\n\n{files}\n\n"
        f"{WAN_LORA}: a Wan TDM LoRA written by `python -m training.distill --cfg 5 --num-frames 33 --resolution 480` of "
        "comfyui-tdm (--model: the diffusion-model file above, the text encoder and VAE are found beside it; "
        "--model-config: a diffusers Wan2.1-T2V-1.3B folder for its tokenizer).\n\n"
        "Wan uses true CFG; the student was distilled with the teacher's CFG (and the empty negative prompt) built in, "
        f"so it samples at CFG 1 with no negative prompt. Set ModelSamplingSD3's shift to the LoRA's flow shift: {WAN_SHIFT:g} "
        "for a LoRA distilled from Wan2.1-T2V-1.3B's diffusers config (ComfyUI's own default for Wan is 8; the TDM Scheduler "
        "says in the log when the model samples at another shift). The length is 4k + 1 frames."))
    unet = wf.add("UNETLoader", (20, 120), unet_name=WAN_UNET, weight_dtype="default")
    clip = wf.add("CLIPLoader", (20, 280), clip_name=WAN_TEXT_ENCODER, type="wan")
    vae = wf.add("VAELoader", (20, 440), vae_name=WAN_VAE)
    lora = wf.add("TDMLoraLoader", (380, 120), model=unet[0], lora_name=WAN_LORA)
    shifted = wf.add("ModelSamplingSD3", (380, 420), model=lora[0], shift=WAN_SHIFT)
    positive = wf.add("CLIPTextEncode", (740, 120), title="Prompt", clip=clip[0], text=PROMPT)
    latent = wf.add("EmptyHunyuanLatentVideo", (740, 380), width=832, height=480, length=33, batch_size=1)
    sampled = wf.add("TDMKSampler", (1100, 120), model=shifted[0], seed=SEED, steps=4, grid="auto", cfg=1.0,
                     positive=positive[0], latent_image=latent[0], denoise=1.0)
    frames = wf.add("VAEDecode", (1460, 120), samples=sampled[0], vae=vae[0])
    wf.add("SaveAnimatedWEBP", (1700, 120), images=frames[0], filename_prefix="tdm_wan_4step", fps=16.0, lossless=False,
           quality=90, method="default")
    return wf.to_json()


def sd15_teacher_vs_tdm(object_info: dict) -> dict:
    wf = UIWorkflow(object_info)
    wf.note((20, 420), models_note(SD15_CKPT, SD15_LORA, "Top row: the teacher (the checkpoint alone, 25 steps, "
                                   "CFG 7). Bottom row: the TDM student (checkpoint + TDM LoRA, 4 steps, CFG 1). "
                                   "Same prompt, seed and latent size."), title="Teacher vs TDM student")
    ckpt = wf.add("CheckpointLoaderSimple", (20, 120), ckpt_name=SD15_CKPT)
    latent = wf.add("EmptyLatentImage", (20, 720), width=512, height=512, batch_size=1)
    # teacher row
    t_pos = wf.add("CLIPTextEncode", (380, 0), title="Teacher prompt", clip=ckpt[1], text=PROMPT)
    t_neg = wf.add("CLIPTextEncode", (380, 260), title="Teacher negative", clip=ckpt[1], text="blurry, low quality")
    teacher = wf.add("KSampler", (740, 0), title="Teacher: 25 steps, CFG 7", model=ckpt[0], seed=SEED, steps=25,
                     cfg=7.0, sampler_name="dpmpp_2m", scheduler="karras", positive=t_pos[0], negative=t_neg[0],
                     latent_image=latent[0], denoise=1.0)
    t_img = wf.add("VAEDecode", (1100, 0), samples=teacher[0], vae=ckpt[2])
    wf.add("SaveImage", (1340, 0), title="Teacher (25 steps)", images=t_img[0], filename_prefix="teacher_25step")
    # student row
    lora = wf.add("TDMLoraLoader", (380, 560), model=ckpt[0], clip=ckpt[1], lora_name=SD15_LORA)
    s_pos = wf.add("CLIPTextEncode", (380, 860), title="Student prompt", clip=lora[1], text=PROMPT)
    student = wf.add("TDMKSampler", (740, 560), title="TDM student: 4 steps, CFG 1", model=lora[0], seed=SEED,
                     steps=4, grid="auto", cfg=1.0, positive=s_pos[0], latent_image=latent[0], denoise=1.0)
    s_img = wf.add("VAEDecode", (1100, 560), samples=student[0], vae=ckpt[2])
    wf.add("SaveImage", (1340, 560), title="TDM student (4 steps)", images=s_img[0], filename_prefix="tdm_student_4step")
    return wf.to_json()


def sd15_img2img(object_info: dict) -> dict:
    wf = UIWorkflow(object_info)
    wf.note((20, 420), models_note(SD15_CKPT, SD15_LORA, f"Input: any image in ComfyUI/input (here {INPUT_IMAGE}). "
                                   "denoise < 1 runs only the tail of the TDM grid: 0.5 keeps the layout and "
                                   "redraws the details."))
    ckpt, lora = _sd15_base(wf)
    loaded = wf.add("LoadImage", (20, 720), image=INPUT_IMAGE)
    encoded = wf.add("VAEEncode", (380, 720), pixels=loaded[0], vae=ckpt[2])
    positive = wf.add("CLIPTextEncode", (740, 120), title="Prompt", clip=lora[1], text=PROMPT)
    sampled = wf.add("TDMKSampler", (1100, 120), model=lora[0], seed=SEED, steps=4, grid="auto", cfg=1.0,
                     positive=positive[0], latent_image=encoded[0], denoise=0.5)
    image = wf.add("VAEDecode", (1460, 120), samples=sampled[0], vae=ckpt[2])
    wf.add("SaveImage", (1700, 120), images=image[0], filename_prefix="tdm_sd15_img2img")
    return wf.to_json()


def tdm_unify_1_and_4_steps(object_info: dict) -> dict:
    """One steps-aware TDM LoRA (TDM-unify) sampled at 1 and at 4 steps side by side."""
    wf = UIWorkflow(object_info)
    wf.note((20, 420), (
        f"Put these files into your ComfyUI models folders:\n\n  models/checkpoints/{SD15_CKPT}\n  models/loras/{UNIFY_LORA}\n\n"
        f"{UNIFY_LORA}: a steps-aware TDM LoRA (TDM-unify), written by `python -m training.distill --steps-aware "
        "--k-choices 1,2,4` of comfyui-tdm. Besides its LoRA weights it carries a learned K-embedding "
        "(tdm_k_embedding.weight) and the trained step counts (tdm.k_choices). The TDM LoRA Loader installs the embedding "
        "on its output model only; every sampler then conditions the model on the number of steps it runs.\n\n"
        "One LoRA, same prompt, seed and latent: top 1 step, bottom 4 steps, both CFG 1 (guidance is distilled into the "
        "LoRA).\n\nStock LoraLoader applies the LoRA weights but skips the K-embedding (it logs 'lora key not loaded: "
        "tdm_k_embedding.weight'), so the model then samples without the step condition: use the TDM LoRA Loader."),
        title="One steps-aware TDM LoRA at 1 and 4 steps")
    ckpt, lora = _sd15_base(wf, SD15_CKPT, UNIFY_LORA)
    positive = wf.add("CLIPTextEncode", (380, 420), title="Prompt", clip=lora[1], text=PROMPT)
    latent = wf.add("EmptyLatentImage", (380, 720), width=512, height=512, batch_size=1)
    for row, steps in ((0, 1), (560, 4)):
        sampled = wf.add("TDMKSampler", (740, row), title=f"Unify LoRA: {steps} step{'s' * (steps > 1)}, CFG 1", model=lora[0],
                         seed=SEED, steps=steps, grid="auto", cfg=1.0, positive=positive[0], latent_image=latent[0], denoise=1.0)
        image = wf.add("VAEDecode", (1100, row), samples=sampled[0], vae=ckpt[2])
        wf.add("SaveImage", (1340, row), title=f"{steps} step{'s' * (steps > 1)}", images=image[0], filename_prefix=f"tdm_unify_{steps}step")
    return wf.to_json()


WORKFLOWS = {
    "sd15_tdm_ksampler": sd15_tdm_ksampler,
    "sd15_tdm_sampler_custom": sd15_tdm_sampler_custom,
    "sdxl_tdm_lora": sdxl_tdm_lora,
    "sd3_tdm_lora": sd3_tdm_lora,
    "sd35_tdm_lora": sd35_tdm_lora,
    "sd15_tdm_dreamshaper_release": sd15_tdm_dreamshaper_release,
    "flux_tdm_lora": flux_tdm_lora,
    "z_image_tdm_lora": z_image_tdm_lora,
    "z_image_tdmr1_release": z_image_tdmr1_release,
    "qwen_image_tdm_lora": qwen_image_tdm_lora,
    "wan_t2v_tdm_lora": wan_t2v_tdm_lora,
    "sd15_teacher_vs_tdm": sd15_teacher_vs_tdm,
    "sd15_img2img": sd15_img2img,
    "tdm_unify_1_and_4_steps": tdm_unify_1_and_4_steps,
}


def all_workflows() -> dict:
    """These and the TDM Distill workflows (a module of their own, which imports this one)."""
    from tests.helpers.distill_workflows import DISTILL_WORKFLOWS

    return {**WORKFLOWS, **DISTILL_WORKFLOWS}


def write_workflows(object_info: dict, folder: Path = WORKFLOWS_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in all_workflows().items():
        path = folder / f"{name}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(build(object_info), indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def main() -> None:
    from tests.helpers.comfy_server import ComfyServer

    with tempfile.TemporaryDirectory(prefix="tdm-workflows-") as base:
        (Path(base) / "input").mkdir()
        with ComfyServer.start(Path(base)) as server:
            object_info = server.get_json("/object_info")
    missing = [t for t in ("TDMScheduler", "TDMSampler", "TDMKSampler", "TDMLoraLoader", "TDMDistill", "TDMPromptList") if t not in object_info]
    if missing:
        sys.exit(f"the server has no {missing}: the pack failed to load (see the ComfyUI log)")
    for path in write_workflows(object_info):
        print(path)


if __name__ == "__main__":
    main()
