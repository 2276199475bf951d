"""The TDM Distill example workflows (``workflows/*_tdm_distill.json``), written by ``workflow_builder``.

Each one distils the model its loaders give into a 4-step student LoRA inside ComfyUI and ends with the
teacher / student comparison: the teacher's own sampler at its usual steps and guidance, and the TDM
KSampler on TDM Distill's MODEL (the teacher with the student LoRA), on the same prompt, seed and latent.
Wan 2.2 A14B's two experts each get a student LoRA, sampled split at the boundary step as the stock two-model
workflow samples (TDM Scheduler -> SplitSigmas -> two SamplerCustom with the TDM Sampler).
Their defaults aim at a 24 GB GPU (A14B: 48 GB, an estimate) (gradient checkpointing and batch 1-2 for the big models, 512-640 px,
33 frames for video); each has a note naming its files and the folders they go in.
"""
from __future__ import annotations

from dataclasses import dataclass

from tests.helpers.model_downloads import Z_IMAGE_DOWNLOADS
from tests.helpers.workflow_builder import (
    FLUX_CLIP_L, FLUX_T5, FLUX_UNET, FLUX_VAE, PROMPT, QWEN_TEXT_ENCODER, QWEN_UNET, QWEN_VAE, SD15_CKPT, SEED,
    ZIMAGE_TEXT_ENCODER, ZIMAGE_UNET, ZIMAGE_VAE, UIWorkflow,
)

# the prompts a workflow distils on (TDM needs no images); the first is also the comparison's prompt
DISTILL_PROMPTS = (PROMPT, "a portrait of an old fisherman, weathered face, soft window light",
                   "a bowl of ramen on a wooden table, steam rising, close-up",
                   "a futuristic city skyline at night, neon reflections on wet streets",
                   "a watercolor painting of a lighthouse on a cliff",
                   "a cozy living room with a fireplace and a sleeping cat")
VIDEO_PROMPTS = ("a red fox runs through fresh snow in a forest, the camera tracks it, golden hour",
                 "waves roll onto a sandy beach at sunset, slow pan to the right",
                 "a street musician plays guitar in a subway station as commuters walk past",
                 "a hot air balloon rises over green hills, the camera slowly tilts up")
WAN22_5B_UNET = "wan2.2_ti2v_5B_fp16.safetensors"  # the names of ComfyUI's own Wan 2.2 5B template
WAN22_5B_TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN22_5B_VAE = "wan2.2_vae.safetensors"
WAN22_5B_FILES = (("diffusion_models", WAN22_5B_UNET), ("text_encoders", WAN22_5B_TEXT_ENCODER), ("vae", WAN22_5B_VAE))
WAN22_A14B_HIGH = "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"  # the names of ComfyUI's own Wan 2.2 14B T2V template
WAN22_A14B_LOW = "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
WAN22_A14B_VAE = "wan_2.1_vae.safetensors"
WAN22_A14B_FILES = (("diffusion_models", WAN22_A14B_HIGH), ("diffusion_models", WAN22_A14B_LOW),
                    ("text_encoders", WAN22_5B_TEXT_ENCODER), ("vae", WAN22_A14B_VAE))
WAN22_A14B_BOUNDARY = 0.875  # the sigma where ComfyUI's Wan 2.2 T2V template hands over to the low-noise expert
WAN22_A14B_SPLIT_STEP = 2  # at shift 8 the K = 4 grid's sigmas are 0.99, 0.94, 0.87, 0.70: steps 1-2 high-noise, 3-4 low-noise
FLUX_DISTILL_FILES = (("diffusion_models", FLUX_UNET), ("text_encoders", FLUX_CLIP_L), ("text_encoders", FLUX_T5), ("vae", FLUX_VAE))
ZIMAGE_DISTILL_FILES = (("diffusion_models", ZIMAGE_UNET), ("text_encoders", ZIMAGE_TEXT_ENCODER), ("vae", ZIMAGE_VAE))
QWEN_DISTILL_FILES = (("diffusion_models", QWEN_UNET), ("text_encoders", QWEN_TEXT_ENCODER), ("vae", QWEN_VAE))
SD15_DISTILL_LORA = "tdm_sd15_student"  # TDM Distill's lora_name: models/loras/<name>.safetensors
PROMPT_LIST_SIZE = (420, 300)  # room for the multiline text

# the grid: loaders | shift, prompts, latent | conditioning | TDM Distill | report, plot; comparison rows below
# (x: 360 per 320-wide node, the note and the prompt list are 420 wide; y: the teacher KSampler is 310 tall)
COLUMNS = (20, 480, 940, 1300, 1660, 2020, 2380)
TEACHER_ROW, STUDENT_ROW = 760, 1140
LOADER_ROWS = (120, 300, 500, 680)  # loaders down the first column (a CLIP loader is up to 166 tall)
NOTE_ROW = 660  # below three loaders
PROMPT_LIST_ROW = 320  # below a ModelSampling node


@dataclass(frozen=True)
class Distill:
    """TDM Distill's settings and the teacher's usual sampling, per family."""

    lora_name: str
    cfg: float  # the guidance distilled in, and the teacher KSampler's cfg
    batch_size: int
    gradient_checkpointing: bool
    teacher_steps: int
    sampler_name: str
    scheduler: str
    prefix: str  # of the saved teacher / student outputs


@dataclass(frozen=True)
class Graph:
    """The outputs the comparison needs, made by each family's loaders and encoders."""

    model: object
    vae: object
    prompts: object  # the list of prompt conditionings (TDM Distill's positive)
    empty: object  # the empty prompt's conditioning (negative)
    sample_prompt: object  # the comparison's prompt conditioning
    latent: object


def files_note(intro: str, files, how: str) -> str:
    listed = "\n".join(f"  models/{folder}/{name}" for folder, name in files)
    return (f"Put these files into your ComfyUI models folders ({intro}):\n\n{listed}\n\n"
            "TDM Distill distils the model as this graph samples it (add your LoRAs between the loader and it) into a "
            "4-step student LoRA, written to models/loras/<lora_name>.safetensors with its TDM metadata; the TDM LoRA "
            "Loader / TDM KSampler read that metadata. Cancel keeps a checkpoint (<lora_name>.tdmckpt); queue again "
            "to resume.\n\n" + how)


def prompt_list(wf: UIWorkflow, clip, prompts=DISTILL_PROMPTS):
    node = wf.add("TDMPromptList", (COLUMNS[1], PROMPT_LIST_ROW), title="Prompts to distil on", clip=clip, text="\n".join(prompts))
    wf.nodes[node.node_id - 1]["size"] = list(PROMPT_LIST_SIZE)
    return node


def distill_and_compare(wf: UIWorkflow, graph: Graph, teacher_model, settings: Distill, video: bool = False) -> None:
    """TDM Distill -> report and plot; teacher KSampler and TDM KSampler on its MODEL -> decoded, saved side by side."""
    distilled = wf.add("TDMDistill", (COLUMNS[3], 120), model=teacher_model, positive=graph.prompts, negative=graph.empty,
                       latent=graph.latent, steps=4, cfg=settings.cfg, batch_size=settings.batch_size, seed=SEED,
                       gradient_checkpointing=settings.gradient_checkpointing, lora_name=settings.lora_name)
    wf.add("PreviewAny", (COLUMNS[4], 120), title="Distill report", source=distilled[2])
    wf.add("PreviewImage", (COLUMNS[4], 400), title="Losses and how far the student moved", images=distilled[3])
    teacher = wf.add("KSampler", (COLUMNS[3], TEACHER_ROW), title=f"Teacher: {settings.teacher_steps} steps, CFG {settings.cfg:g}",
                     model=teacher_model, seed=SEED, steps=settings.teacher_steps, cfg=settings.cfg,
                     sampler_name=settings.sampler_name, scheduler=settings.scheduler, positive=graph.sample_prompt,
                     negative=graph.empty, latent_image=graph.latent, denoise=1.0)
    student = wf.add("TDMKSampler", (COLUMNS[3], STUDENT_ROW), title="TDM student: 4 steps, CFG 1", model=distilled[0],
                     seed=SEED, steps=4, grid="auto", cfg=1.0, positive=graph.sample_prompt, latent_image=graph.latent,
                     denoise=1.0)
    for row, sampled, who in ((TEACHER_ROW, teacher, "teacher"), (STUDENT_ROW, student, "student")):
        decode_and_save(wf, sampled[0], graph.vae, (COLUMNS[4], COLUMNS[5], COLUMNS[6]), row, who, settings.prefix, video)


def decode_and_save(wf: UIWorkflow, samples, vae, columns, row: int, who: str, prefix: str, video: bool) -> None:
    """VAEDecode -> SaveImage, or (video) -> CreateVideo -> SaveVideo as ComfyUI's video templates save."""
    decoded = wf.add("VAEDecode", (columns[0], row), samples=samples, vae=vae)
    if video:
        clip = wf.add("CreateVideo", (columns[1], row), images=decoded[0], fps=24.0)
        wf.add("SaveVideo", (columns[2], row), title=who, video=clip[0], filename_prefix=f"{prefix}_{who}", format="auto", codec="auto")
    else:
        wf.add("SaveImage", (columns[1], row), title=who, images=decoded[0], filename_prefix=f"{prefix}_{who}")


def sd15_tdm_distill(object_info: dict) -> dict:
    wf = UIWorkflow(object_info)
    wf.note((20, 420), files_note("SD1.5, or any SD1.5 finetune", (("checkpoints", SD15_CKPT),), (
        "Teacher: the checkpoint at 25 steps, CFG 4.5 (the guidance distilled in). Student: the same model with the "
        "student LoRA, 4 steps, CFG 1. Same prompt, seed and latent. 512 x 512, batch 4, about 500 iterations "
        "fit a 24 GB GPU; switch gradient_checkpointing on if it runs out of memory.")), title="Distil SD1.5 with TDM")
    ckpt = wf.add("CheckpointLoaderSimple", (COLUMNS[0], LOADER_ROWS[0]), ckpt_name=SD15_CKPT)
    prompts = prompt_list(wf, ckpt[1])
    sample = wf.add("CLIPTextEncode", (COLUMNS[2], TEACHER_ROW), title="Comparison prompt", clip=ckpt[1], text=PROMPT)
    latent = wf.add("EmptyLatentImage", (COLUMNS[1], 680), width=512, height=512, batch_size=1)
    graph = Graph(ckpt[0], ckpt[2], prompts[0], prompts[1], sample[0], latent[0])
    distill_and_compare(wf, graph, ckpt[0], Distill(SD15_DISTILL_LORA, 4.5, 4, False, 25, "dpmpp_2m", "karras", "tdm_sd15_distill"))
    return wf.to_json()


def z_image_tdm_distill(object_info: dict) -> dict:
    wf = UIWorkflow(object_info, Z_IMAGE_DOWNLOADS)
    wf.note((20, NOTE_ROW), files_note("Z-Image-Turbo as ComfyUI's own Z-Image-Turbo template has it", ZIMAGE_DISTILL_FILES, (
        "Z-Image-Turbo samples without CFG, so it is distilled at CFG 1 (its 9 steps become 4). Teacher: its template's "
        "9 steps, res_multistep, CFG 1; student: 4 steps. ModelSamplingAuraFlow's shift 3 (the template's) is the "
        "schedule both are trained and sampled at. 640 x 640, batch 2 and gradient checkpointing fit a 24 GB GPU.")),
        title="Distil Z-Image-Turbo with TDM")
    unet = wf.add("UNETLoader", (COLUMNS[0], LOADER_ROWS[0]), unet_name=ZIMAGE_UNET)
    clip = wf.add("CLIPLoader", (COLUMNS[0], LOADER_ROWS[1]), clip_name=ZIMAGE_TEXT_ENCODER, type="lumina2")
    vae = wf.add("VAELoader", (COLUMNS[0], LOADER_ROWS[2]), vae_name=ZIMAGE_VAE)
    shifted = wf.add("ModelSamplingAuraFlow", (COLUMNS[1], 120), model=unet[0], shift=3.0)
    prompts = prompt_list(wf, clip[0])
    sample = wf.add("CLIPTextEncode", (COLUMNS[2], TEACHER_ROW), title="Comparison prompt", clip=clip[0], text=PROMPT)
    latent = wf.add("EmptySD3LatentImage", (COLUMNS[1], 680), width=640, height=640, batch_size=1)
    graph = Graph(shifted[0], vae[0], prompts[0], prompts[1], sample[0], latent[0])
    distill_and_compare(wf, graph, shifted[0], Distill("tdm_z_image_turbo_student", 1.0, 2, True, 9, "res_multistep", "simple",
                                                       "tdm_z_image_distill"))
    return wf.to_json()


def flux_tdm_distill(object_info: dict) -> dict:
    wf = UIWorkflow(object_info)
    wf.note((20, NOTE_ROW), files_note("Flux.1-dev as ComfyUI's own Flux template has it", FLUX_DISTILL_FILES, (
        "Flux.1-dev is guidance-distilled: FluxGuidance (3.5) is the guidance given to the teacher, on every prompt of the "
        "list and on the comparison prompt, and TDM Distill's cfg stays 1 (no CFG pass). The student samples with the "
        "same FluxGuidance at CFG 1. ModelSamplingFlux's width and height are the training size (640): they set the flow "
        "shift the student learns, so keep them when sampling it. The diffusion model loads as fp8 (weight_dtype), "
        "the LoRA trains in fp32 on top: with gradient checkpointing and batch 1 it fits a 24 GB GPU.")),
        title="Distil Flux.1-dev with TDM")
    unet = wf.add("UNETLoader", (COLUMNS[0], LOADER_ROWS[0]), unet_name=FLUX_UNET, weight_dtype="fp8_e4m3fn")
    clip = wf.add("DualCLIPLoader", (COLUMNS[0], LOADER_ROWS[1]), clip_name1=FLUX_CLIP_L, clip_name2=FLUX_T5, type="flux")
    vae = wf.add("VAELoader", (COLUMNS[0], LOADER_ROWS[2]), vae_name=FLUX_VAE)
    shifted = wf.add("ModelSamplingFlux", (COLUMNS[1], 120), model=unet[0], max_shift=1.15, base_shift=0.5, width=640, height=640)
    prompts = prompt_list(wf, clip[0])
    guided = wf.add("FluxGuidance", (COLUMNS[2], 300), title="Guidance for every prompt", conditioning=prompts[0], guidance=3.5)
    sample = wf.add("CLIPTextEncode", (COLUMNS[2], TEACHER_ROW - 260), title="Comparison prompt", clip=clip[0], text=PROMPT)
    sample_guided = wf.add("FluxGuidance", (COLUMNS[2], TEACHER_ROW), conditioning=sample[0], guidance=3.5)
    latent = wf.add("EmptySD3LatentImage", (COLUMNS[1], 680), width=640, height=640, batch_size=1)
    graph = Graph(shifted[0], vae[0], guided[0], prompts[1], sample_guided[0], latent[0])
    distill_and_compare(wf, graph, shifted[0], Distill("tdm_flux_dev_student", 1.0, 1, True, 20, "euler", "simple", "tdm_flux_distill"))
    return wf.to_json()


def qwen_image_tdm_distill(object_info: dict) -> dict:
    wf = UIWorkflow(object_info)
    wf.note((20, NOTE_ROW), files_note("Qwen-Image as ComfyUI's own Qwen-Image template has it", QWEN_DISTILL_FILES, (
        "Qwen-Image uses true CFG: TDM Distill builds the teacher's CFG 2.5 (the template's) with the empty prompt into "
        "the student, which samples at CFG 1. Teacher: the template's 20 steps, euler, CFG 2.5, at ModelSamplingAuraFlow "
        "3.1 (the template's shift, kept for the student). The 20B model in fp8 is about 20 GB by itself and TDM Distill "
        "loads the whole model on the GPU (no partial offload while training), so it wants a 48 GB GPU (an estimate, "
        "never run on these weights). 640 x 640, batch 1, gradient checkpointing on.")),
        title="Distil Qwen-Image with TDM")
    unet = wf.add("UNETLoader", (COLUMNS[0], LOADER_ROWS[0]), unet_name=QWEN_UNET, weight_dtype="default")
    clip = wf.add("CLIPLoader", (COLUMNS[0], LOADER_ROWS[1]), clip_name=QWEN_TEXT_ENCODER, type="qwen_image")
    vae = wf.add("VAELoader", (COLUMNS[0], LOADER_ROWS[2]), vae_name=QWEN_VAE)
    shifted = wf.add("ModelSamplingAuraFlow", (COLUMNS[1], 120), model=unet[0], shift=3.1)
    prompts = prompt_list(wf, clip[0])
    sample = wf.add("CLIPTextEncode", (COLUMNS[2], TEACHER_ROW), title="Comparison prompt", clip=clip[0], text=PROMPT)
    latent = wf.add("EmptySD3LatentImage", (COLUMNS[1], 680), width=640, height=640, batch_size=1)
    graph = Graph(shifted[0], vae[0], prompts[0], prompts[1], sample[0], latent[0])
    distill_and_compare(wf, graph, shifted[0], Distill("tdm_qwen_image_student", 2.5, 1, True, 20, "euler", "simple", "tdm_qwen_image_distill"))
    return wf.to_json()


def wan22_5b_tdm_distill(object_info: dict) -> dict:
    wf = UIWorkflow(object_info)
    wf.note((20, NOTE_ROW), files_note("Wan 2.2 TI2V 5B as ComfyUI's own Wan 2.2 5B template has it", WAN22_5B_FILES, (
        "Text to video. Wan uses true CFG: TDM Distill builds the teacher's CFG 5 (the template's) with the empty prompt "
        "into the student, which samples at CFG 1. Teacher: the template's 20 steps, uni_pc, CFG 5, at ModelSamplingSD3 "
        "shift 8 (the template's, kept for the student). Wan22ImageToVideoLatent without a start image is the template's "
        "text-to-video latent; 640 x 352 and 33 frames (4k + 1), batch 1 and gradient checkpointing fit a 24 GB GPU. "
        "Both videos are saved as the template saves them (CreateVideo, SaveVideo).")),
        title="Distil Wan 2.2 5B (text to video) with TDM")
    unet = wf.add("UNETLoader", (COLUMNS[0], LOADER_ROWS[0]), unet_name=WAN22_5B_UNET, weight_dtype="default")
    clip = wf.add("CLIPLoader", (COLUMNS[0], LOADER_ROWS[1]), clip_name=WAN22_5B_TEXT_ENCODER, type="wan")
    vae = wf.add("VAELoader", (COLUMNS[0], LOADER_ROWS[2]), vae_name=WAN22_5B_VAE)
    shifted = wf.add("ModelSamplingSD3", (COLUMNS[1], 120), model=unet[0], shift=8.0)
    prompts = prompt_list(wf, clip[0], VIDEO_PROMPTS)
    sample = wf.add("CLIPTextEncode", (COLUMNS[2], TEACHER_ROW), title="Comparison prompt", clip=clip[0], text=VIDEO_PROMPTS[0])
    latent = wf.add("Wan22ImageToVideoLatent", (COLUMNS[1], 680), vae=vae[0], width=640, height=352, length=33, batch_size=1)
    graph = Graph(shifted[0], vae[0], prompts[0], prompts[1], sample[0], latent[0])
    distill_and_compare(wf, graph, shifted[0], Distill("tdm_wan22_5b_student", 5.0, 1, True, 20, "uni_pc", "simple", "tdm_wan22_5b_distill"),
                        video=True)
    return wf.to_json()


def wan22_a14b_tdm_distill(object_info: dict) -> dict:
    """Two experts: TDM Distill trains one student LoRA per expert; the comparison samples both pairs the template's way."""
    wf = UIWorkflow(object_info)
    wf.note((20, NOTE_ROW + 180), files_note("Wan 2.2 14B text to video as ComfyUI's own Wan 2.2 14B T2V template has it", WAN22_A14B_FILES, (
        "Two experts: the high-noise model is TDM Distill's model, the low-noise one its low_noise_model, handing over at "
        "sigma 0.875 (the template's boundary). Each expert gets its own student LoRA, trained on its side of the boundary "
        "with that expert as teacher: <lora_name> and <lora_name>_low_noise. At shift 8 the 4 student steps fall 2 and 2: "
        "TDM Scheduler -> SplitSigmas at step 2 -> SamplerCustom + TDM Sampler on the high-noise student, then on the "
        "low-noise student with add_noise off, the stock two-model way. Teacher: the template's two KSamplerAdvanced "
        "(20 steps, 0-10 high-noise with noise, 10-20 low-noise, euler, simple, CFG 3.5), with the empty prompt as the "
        "negative (the guidance distilled in). ModelSamplingSD3 shift 8 on both (the template's, kept for the students).\n\n"
        "Memory (an estimate, never run on these weights): each 14B expert in fp8 is about 14 GB and both are trained "
        "together (every call goes to the expert that owns its sigma), so with the text encoder and activations this wants "
        "a 48 GB GPU or more: TDM Distill loads both experts whole on the GPU (no partial offload while training), so "
        "a smaller GPU runs out of memory. 640 x 352, 33 frames, batch 1, gradient checkpointing on.")), title="Distil Wan 2.2 A14B (two experts, text to video) with TDM")
    high = wf.add("UNETLoader", (COLUMNS[0], LOADER_ROWS[0]), title="High-noise expert", unet_name=WAN22_A14B_HIGH, weight_dtype="default")
    low = wf.add("UNETLoader", (COLUMNS[0], LOADER_ROWS[1]), title="Low-noise expert", unet_name=WAN22_A14B_LOW, weight_dtype="default")
    clip = wf.add("CLIPLoader", (COLUMNS[0], LOADER_ROWS[2]), clip_name=WAN22_5B_TEXT_ENCODER, type="wan")
    vae = wf.add("VAELoader", (COLUMNS[0], LOADER_ROWS[3]), vae_name=WAN22_A14B_VAE)
    high_shifted = wf.add("ModelSamplingSD3", (COLUMNS[1], 40), model=high[0], shift=8.0)
    low_shifted = wf.add("ModelSamplingSD3", (COLUMNS[1], 170), model=low[0], shift=8.0)
    prompts = prompt_list(wf, clip[0], VIDEO_PROMPTS)
    sample = wf.add("CLIPTextEncode", (COLUMNS[2], TEACHER_ROW), title="Comparison prompt", clip=clip[0], text=VIDEO_PROMPTS[0])
    latent = wf.add("EmptyHunyuanLatentVideo", (COLUMNS[1], 680), width=640, height=352, length=33, batch_size=1)
    distilled = wf.add("TDMDistill", (COLUMNS[3], 120), model=high_shifted[0], positive=prompts[0], negative=prompts[1],
                       latent=latent[0], steps=4, cfg=3.5, batch_size=1, seed=SEED, gradient_checkpointing=True,
                       lora_name="tdm_wan22_a14b_student", low_noise_model=low_shifted[0], boundary=WAN22_A14B_BOUNDARY)
    wf.add("PreviewAny", (COLUMNS[4], 120), title="Distill report", source=distilled[2])
    wf.add("PreviewImage", (COLUMNS[4], 400), title="Losses and how far the student moved", images=distilled[3])
    columns = (COLUMNS[5], COLUMNS[6], COLUMNS[6] + 360)
    teacher = two_expert_teacher(wf, high_shifted[0], low_shifted[0], sample[0], prompts[1], latent[0])
    decode_and_save(wf, teacher[0], vae[0], columns, TEACHER_ROW, "teacher", "tdm_wan22_a14b_distill", video=True)
    student = two_expert_student(wf, distilled[0], distilled[4], sample[0], prompts[1], latent[0])
    decode_and_save(wf, student[0], vae[0], columns, A14B_STUDENT_ROW, "student", "tdm_wan22_a14b_distill", video=True)
    return wf.to_json()


A14B_STUDENT_ROW = TEACHER_ROW + 440  # below the teacher's tall KSamplerAdvanced pair


def two_expert_teacher(wf: UIWorkflow, high, low, positive, negative, latent):
    """The template's sampling: 20 steps, the high-noise expert 0-10 with noise, the low-noise one 10-20."""
    common = dict(steps=20, cfg=3.5, sampler_name="euler", scheduler="simple", positive=positive, negative=negative, noise_seed=SEED)
    first = wf.add("KSamplerAdvanced", (COLUMNS[3], TEACHER_ROW), title="Teacher, high-noise: steps 0-10 of 20, CFG 3.5", model=high,
                   add_noise="enable", latent_image=latent, start_at_step=0, end_at_step=10, return_with_leftover_noise="enable", **common)
    return wf.add("KSamplerAdvanced", (COLUMNS[4], TEACHER_ROW), title="Teacher, low-noise: steps 10-20", model=low,
                  add_noise="disable", latent_image=first[0], start_at_step=10, end_at_step=10000, return_with_leftover_noise="disable", **common)


def two_expert_student(wf: UIWorkflow, high_student, low_student, positive, negative, latent):
    """The students' 4 steps split at the boundary step: TDM Scheduler -> SplitSigmas -> SamplerCustom + TDM Sampler
    on the high-noise student (with noise), then on the low-noise one (add_noise off), CFG 1."""
    row = A14B_STUDENT_ROW
    sigmas = wf.add("TDMScheduler", (COLUMNS[2], row), title="Student grid: 4 steps", model=high_student, steps=4, grid="auto")
    split = wf.add("SplitSigmas", (COLUMNS[2], row + 210), title="Steps 1-2 | 3-4", sigmas=sigmas[0], step=WAN22_A14B_SPLIT_STEP)
    sampler = wf.add("TDMSampler", (COLUMNS[2], row + 380), title="TDM Sampler (tdm, reference noise)")
    common = dict(noise_seed=SEED, cfg=1.0, positive=positive, negative=negative, sampler=sampler[0])
    first = wf.add("SamplerCustom", (COLUMNS[3], row), title="TDM student, high-noise: steps 1-2", model=high_student, add_noise=True,
                   sigmas=split[0], latent_image=latent, **common)
    return wf.add("SamplerCustom", (COLUMNS[4], row), title="TDM student, low-noise: steps 3-4", model=low_student, add_noise=False,
                  sigmas=split[1], latent_image=first[0], **common)


DISTILL_WORKFLOWS = {
    "sd15_tdm_distill": sd15_tdm_distill,
    "z_image_tdm_distill": z_image_tdm_distill,
    "flux_tdm_distill": flux_tdm_distill,
    "qwen_image_tdm_distill": qwen_image_tdm_distill,
    "wan22_5b_tdm_distill": wan22_5b_tdm_distill,
    "wan22_a14b_tdm_distill": wan22_a14b_tdm_distill,
}
