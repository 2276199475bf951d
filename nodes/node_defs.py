"""The TDM nodes, declared with ComfyUI's V3 schema; each is a thin adapter over ``tdm_core``."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from .comfy_sigmas import tdm_sigmas
from .distill import DistillOptions
from .distill_experts import WAN22_I2V_BOUNDARY, WAN22_T2V_BOUNDARY
from .distill_run import DEFAULT_CHECKPOINT_EVERY, distill
from .grid_choice import DEFAULT_CUSTOM_TIMESTEPS, GRID_CHOICES
from .lora_keys import read_lora_file
from .prompt_list import NO_FILE, encode_prompts, file_fingerprint, prompt_files
from .sampling import tdm_ksample
from .steps_aware import apply_tdm_lora
from .tdm_sampler import NOISE_STARTS, SOLVERS, TDMSamplerObject

CATEGORY = "sampling/tdm"
MAX_STEPS = 8
GRID_TOOLTIP = (
    "Trajectory timesteps. auto: the grid stored in the TDM LoRA's metadata (via TDM LoRA Loader), else reference; "
    "reference: t_i = T-1-i*(T//K) with T=900; diffusers_leading / diffusers_trailing: DDIM spacings; "
    "dpmsolver_leading_sd15: the released SD1.5 LoRA preset; cogvideox: 999, 856, 665, 399 (4 steps); custom: custom_timesteps."
)


def combo_problem(input_name: str, value, options) -> bool | str:
    """ComfyUI 0.3.75 checks V1 combo values but not V3 ``io.Combo`` ones: each node checks its own in
    ``validate_inputs`` (``None``: the input is linked, checked at run time)."""
    if value is None or value in options:
        return True
    shown = ", ".join(map(str, options[:12])) + (" ..." if len(options) > 12 else "")
    return f"{input_name}={value!r} is not one of the choices ({shown or 'none available'}): pick a listed value"


def steps_input() -> io.Int.Input:
    return io.Int.Input("steps", default=4, min=1, max=MAX_STEPS, tooltip="Number of student steps K (one model call each). TDM LoRAs are distilled for a fixed K, usually 4.")


def grid_input() -> io.Combo.Input:
    return io.Combo.Input("grid", options=list(GRID_CHOICES), default="auto", tooltip=GRID_TOOLTIP)


def denoise_input() -> io.Float.Input:
    return io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="1: text-to-image. Below 1 (img2img): keep only the last round(K*denoise) grid timesteps, so the student starts where it was trained.")


def custom_timesteps_input() -> io.String.Input:
    return io.String.Input("custom_timesteps", default=DEFAULT_CUSTOM_TIMESTEPS, tooltip="Comma-separated, strictly decreasing timesteps (0..999) used when grid is custom; their count overrides steps.")


class TDMScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMScheduler",
            display_name="TDM Scheduler",
            category=CATEGORY,
            description="Sigmas of a TDM few-step student (Trajectory Distribution Matching): the trained trajectory timesteps, mapped through the model's own noise schedule (VP eps/v or flow with its shift), ending at 0. Use with SamplerCustom and TDM Sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The model (with the TDM LoRA applied) whose noise schedule maps timesteps to sigmas."),
                steps_input(),
                grid_input(),
                custom_timesteps_input(),
                denoise_input(),
            ],
            outputs=[io.Sigmas.Output(tooltip="K+1 sigmas, from the first trajectory timestep down to 0.")],
        )

    @classmethod
    def validate_inputs(cls, grid=None):
        return combo_problem("grid", grid, list(GRID_CHOICES))

    @classmethod
    def execute(cls, model, steps, grid, custom_timesteps, denoise) -> io.NodeOutput:
        return io.NodeOutput(tdm_sigmas(model, steps, grid, custom_timesteps, denoise))


class TDMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMSampler",
            display_name="TDM Sampler",
            category=CATEGORY,
            description="The TDM student sampler (DDIM eta=0 along the trajectory grid, one model call per step), or DPM-Solver++(2M) as used by the released SD1.5/SD3 LoRAs. Starts from pure noise as the TDM reference does. Use with SamplerCustom and TDM Scheduler.",
            inputs=[
                io.Combo.Input("solver", options=list(SOLVERS), default="tdm", tooltip="tdm: the student's own deterministic step x_next = a x0_hat + s eps_hat. dpmpp_2m: DPM-Solver++(2M) (released SD1.5 and SD3 presets)."),
                io.Float.Input("gamma", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="0: deterministic. Above 0 (tdm solver only): that share of the noise variance is replaced by fresh noise at every step (seeded)."),
                io.Combo.Input("noise_start", options=list(NOISE_STARTS), default="reference", tooltip="reference: the network sees pure unit noise at the first step, as in TDM training (txt2img). comfy: ComfyUI's usual noise scaling. img2img always uses ComfyUI's scaling."),
            ],
            outputs=[io.Sampler.Output(tooltip="A SAMPLER for SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, solver=None, noise_start=None):
        problem = combo_problem("solver", solver, list(SOLVERS))
        return problem if problem is not True else combo_problem("noise_start", noise_start, list(NOISE_STARTS))

    @classmethod
    def execute(cls, solver, gamma, noise_start) -> io.NodeOutput:
        return io.NodeOutput(TDMSamplerObject(solver, gamma, noise_start))


class TDMKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMKSampler",
            display_name="TDM KSampler",
            category=CATEGORY,
            description="One-node TDM sampling: TDM Scheduler + TDM Sampler (reference noise) through ComfyUI's sampling, same result as SamplerCustom with those nodes. The solver is the one the LoRA's metadata names (tdm; DPM-Solver++ for the released SD1.5/SD3 LoRAs). Negative prompt optional at cfg 1.",
            inputs=[
                io.Model.Input("model", tooltip="The base model with a TDM LoRA applied (TDM LoRA Loader)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip="Seed of the starting noise."),
                steps_input(),
                grid_input(),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free guidance. TDM students are distilled with guidance built in: keep 1 (one model call per step)."),
                io.Conditioning.Input("positive", tooltip="The prompt conditioning."),
                io.Latent.Input("latent_image", tooltip="Empty latent for text-to-image, or an encoded image with denoise below 1."),
                denoise_input(),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative conditioning, only needed when cfg is not 1."),
            ],
            outputs=[io.Latent.Output(tooltip="The sampled latent.")],
        )

    @classmethod
    def validate_inputs(cls, grid=None):
        return combo_problem("grid", grid, list(GRID_CHOICES))

    @classmethod
    def execute(cls, model, seed, steps, grid, cfg, positive, latent_image, denoise, negative=None) -> io.NodeOutput:
        return io.NodeOutput(tdm_ksample(model, seed, steps, grid, cfg, positive, negative, latent_image, denoise))


class TDMLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMLoraLoader",
            display_name="TDM LoRA Loader",
            category="loaders",
            description="Loads a TDM LoRA (kohya, ComfyUI or diffusers/PEFT keys, incl. PEFT attention keys stock ComfyUI skips), refuses files for another architecture instead of loading them partly, and attaches the LoRA's TDM metadata (steps, grid, solver, strength) for TDM Scheduler/KSampler grid 'auto'. The authors' released TDM LoRAs (SD1.5 Dreamshaper .pt, SD3-Medium, SD3.5-Medium), which carry no metadata, are recognised from their keys and get their documented settings: strength (0.125 for SD3), DPM-Solver++ grid and flow shift.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the LoRA was distilled from."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"), tooltip="A LoRA file in models/loras (.safetensors, or weights-only .pt/.ckpt/.bin)."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01, tooltip="LoRA strength on the diffusion model (ignored when use_recommended_strength is on and the file recommends one)."),
                io.Boolean.Input("use_recommended_strength", default=True, tooltip="Use the strength the file's TDM metadata recommends, or the documented one of a recognised release (0.125 for the released SD3 TDM LoRA). Off: strength_model as set."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01, tooltip="LoRA strength on the text encoder (only when the file has text-encoder weights)."),
                io.Clip.Input("clip", optional=True, tooltip="The text encoder, needed only for LoRAs with text-encoder weights."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the LoRA patched in and its TDM metadata attached."),
                io.Clip.Output(tooltip="The text encoder, patched when the LoRA has text-encoder weights."),
                io.String.Output("settings", display_name="settings", tooltip="What was applied, in words: the release recognised (if any), strength, solver, grid and shift."),
            ],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None):
        # only listed names: also keeps '../' and absolute paths out of the loader
        return combo_problem("lora_name", lora_name, folder_paths.get_filename_list("loras"))

    @classmethod
    def execute(cls, model, lora_name, strength_model, use_recommended_strength, strength_clip, clip=None) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        lora_sd, metadata = read_lora_file(path)
        # plain and steps-aware (unify) LoRAs: apply_tdm_lora also installs a unify file's K-embedding
        new_model, new_clip, _, summary = apply_tdm_lora(model, clip, lora_sd, metadata, strength_model, strength_clip, use_recommended_strength, lora_name)
        return io.NodeOutput(new_model, new_clip, summary)


def first_of_lists(values: dict) -> dict:
    """``is_input_list`` nodes get every input as a list: one value each, but for the prompt list."""
    return {name: value[0] if isinstance(value, list) and value else value for name, value in values.items()}


class TDMDistill(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMDistill",
            display_name="TDM Distill",
            category="training/tdm",
            description="Distils the model as the graph gives it (its LoRAs, shift and patches included) into a few-step TDM student LoRA (Trajectory Distribution Matching, data-free): the same iteration as the headless trainer, on ComfyUI's own model. Writes the LoRA to models/loras with TDM metadata; checkpoints let a cancelled run resume when queued again; the progress bar previews the student's sample. Two-expert models (Wan 2.2 A14B): connect low_noise_model. Tested on tiny random-weight models of SD1.5, SDXL, SD3, Flux, Z-Image, Qwen-Image, Wan and HunyuanVideo 1.5; not yet on real weights.",
            is_input_list=True,  # positive may be a list of conditionings, one per prompt
            inputs=[
                io.Model.Input("model", tooltip="The teacher: the model as you sample it (checkpoint, LoRAs, ModelSampling shift). Its own noise schedule and prediction type are used."),
                io.Conditioning.Input("positive", tooltip="The prompts to distil on: one CLIPTextEncode conditioning, or a list of them (one per prompt); each iteration draws a prompt per batch row."),
                io.Latent.Input("latent", tooltip="The latent size to train at (e.g. EmptyLatentImage); its contents are not used."),
                io.Int.Input("steps", default=4, min=1, max=MAX_STEPS, tooltip="K, the student's sampling steps (4 is usual); the student learns the reference grid t_i = 899 - i*(900//K)."),
                io.Int.Input("iterations", default=500, min=1, max=100000, tooltip=f"Training iterations ({DistillOptions.fake_score_updates} fake-score updates, then one student update, each); 500 is the trainer's default."),
                io.Float.Input("cfg", default=2.0, min=1.0, max=30.0, step=0.1, tooltip="The teacher's classifier-free guidance distilled into the student (the trainer's default 2); above 1 needs negative."),
                io.Int.Input("lora_rank", default=16, min=1, max=256, tooltip="Rank of the student and fake-score LoRAs (alpha = rank)."),
                io.Float.Input("fake_score_learning_rate", default=0.0, min=0.0, max=1.0, step=1e-5, round=False, tooltip="0: the trainer's scale-free default 4e-3 * sqrt(rank) / alpha (1e-3 at rank 16). AdamW betas (0, 0.95), each adapter warmed up over its first 10 updates (the fake score's: 2 iterations)."),
                io.Float.Input("student_learning_rate", default=0.0, min=0.0, max=1.0, step=1e-5, round=False, tooltip="0: the fake-score rate / 5, the reference ratio."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Rows per iteration, each with its own drawn prompt and noise."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False, tooltip="Seed of every random draw (prompts, noise, times, LoRA initialisation): a run is reproducible, and the same seed resumes a cancelled run (no control after generate: a new seed would start a new run)."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Recompute the model's blocks in backward (less memory, slower); gradients stay the same."),
                io.String.Input("lora_name", default="tdm_student", tooltip="File name of the student LoRA written to models/loras (.safetensors added); an existing file is replaced."),
                io.Int.Input("checkpoint_every", default=DEFAULT_CHECKPOINT_EVERY, min=0, max=100000,
                             tooltip="Save the run's state to models/loras/<lora_name>.tdmckpt every this many iterations (0: only when cancelled). "
                                     "Cancel keeps it; queueing the same inputs again resumes from it; a finished run deletes it."),
                io.Conditioning.Input("negative", optional=True, tooltip="The empty-prompt conditioning (CLIPTextEncode of \"\") for the teacher's guidance; needed when cfg is above 1."),
                io.Model.Input("low_noise_model", optional=True, tooltip="Two-expert models (Wan 2.2 A14B): the low-noise expert, with model the high-noise one. Each expert gets its own student LoRA, trained on its side of the boundary with that expert as teacher; the second LoRA is written as <lora_name>_low_noise."),
                io.Float.Input("boundary", default=WAN22_T2V_BOUNDARY, min=0.01, max=0.99, step=0.005, optional=True, tooltip=f"With low_noise_model: the sigma where the low-noise expert takes over, as in ComfyUI's Wan 2.2 A14B templates ({WAN22_T2V_BOUNDARY} text-to-video, {WAN22_I2V_BOUNDARY} image-to-video)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The teacher with the student LoRA applied: sample it with TDM KSampler at K steps. With two experts: the high-noise expert with its student."),
                io.Custom("LORA_MODEL").Output(display_name="LORA_MODEL", tooltip="The student LoRA, as stock SaveLoRA and Load LoRA Model take it."),
                io.String.Output(display_name="report", tooltip="What was trained and how far the student moved from the teacher; says plainly when it did not learn."),
                io.Image.Output(display_name="plot", tooltip="Loss curves of the fake score and the student, and how far the student's samples moved from the teacher's, over the iterations."),
                io.Model.Output(display_name="low_noise_MODEL", tooltip="With low_noise_model: the low-noise expert with its student LoRA (the second sampler of the two-model workflow). Without: nothing (leave unconnected)."),
                io.Custom("LORA_MODEL").Output(display_name="low_noise_LORA_MODEL", tooltip="With low_noise_model: the low-noise expert's student LoRA. Without: nothing."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent, steps, iterations, cfg, lora_rank, fake_score_learning_rate, student_learning_rate,
                batch_size, seed, gradient_checkpointing, lora_name, checkpoint_every=None, negative=None, low_noise_model=None,
                boundary=None) -> io.NodeOutput:
        every = checkpoint_every if checkpoint_every is not None else [DEFAULT_CHECKPOINT_EVERY]
        one = first_of_lists({"checkpoint_every": every, "model": model, "latent": latent, "steps": steps, "iterations": iterations, "cfg": cfg, "rank": lora_rank,
                              "fake": fake_score_learning_rate, "student": student_learning_rate, "batch_size": batch_size, "seed": seed,
                              "checkpointing": gradient_checkpointing, "lora_name": lora_name, "negative": negative,
                              "low_noise_model": low_noise_model, "boundary": boundary if boundary is not None else [WAN22_T2V_BOUNDARY]})
        options = DistillOptions(steps=one["steps"], iterations=one["iterations"], cfg=one["cfg"], rank=one["rank"],
                                 fake_score_lr=one["fake"] or None, student_lr=one["student"] or None, batch_size=one["batch_size"],
                                 seed=one["seed"], gradient_checkpointing=one["checkpointing"], boundary=one["boundary"])
        result = distill(one["model"], list(positive), one["negative"], one["latent"], options, one["lora_name"], one["checkpoint_every"],
                         one["low_noise_model"])
        return io.NodeOutput(result.model, result.lora, result.report, result.plot, result.low_noise_model, result.low_noise_lora)


class TDMPromptList(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMPromptList",
            display_name="TDM Prompt List",
            category="training/tdm",
            description="Encodes many prompts at once for TDM Distill: one prompt per line of text and / or of a .txt file (or one JSON object "
                        "{\"prompt\": ...} / {\"text\": ...} per line of a .jsonl file) in ComfyUI's input folder, each as CLIPTextEncode encodes it. "
                        "Outputs the list of prompt conditionings (TDM Distill's positive) and the empty prompt's (its negative).",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of the model you distil (the checkpoint loader's CLIP)."),
                io.String.Input("text", multiline=True, default="", tooltip="One prompt per line; blank lines are skipped. Used together with prompt_file (text lines first)."),
                io.Combo.Input("prompt_file", options=[NO_FILE, *prompt_files()], default=NO_FILE,
                               tooltip="A .txt (one prompt per line) or .jsonl ({\"prompt\": ...} or {\"text\": ...} per line) file in ComfyUI's input folder; (none): text only."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="prompts", is_output_list=True, tooltip="One conditioning per prompt, as a list: connect to TDM Distill's positive."),
                io.Conditioning.Output(display_name="empty_prompt", tooltip="The empty prompt's conditioning: connect to TDM Distill's negative (needed at cfg above 1)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, prompt_file=None):
        # only listed names: also keeps '../' and absolute paths out
        return combo_problem("prompt_file", prompt_file, [NO_FILE, *prompt_files()])

    @classmethod
    def fingerprint_inputs(cls, clip=None, text=None, prompt_file=None):
        return file_fingerprint(prompt_file)  # an edited file re-runs the node (clip and text are compared by ComfyUI itself)

    @classmethod
    def execute(cls, clip, text, prompt_file=NO_FILE) -> io.NodeOutput:
        prompts, empty = encode_prompts(clip, text, prompt_file)
        return io.NodeOutput(prompts, empty)


NODES = [TDMScheduler, TDMSampler, TDMKSampler, TDMLoraLoader, TDMDistill, TDMPromptList]
