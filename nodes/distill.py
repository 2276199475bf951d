"""TDM distillation of a ComfyUI MODEL: the host side of ``tdm_core.iteration.tdm_iteration`` (the same
iteration ``training.distill`` runs) for the TDM Distill node.

The student and the fake score are two LoRAs on a clone of the MODEL (``distill_adapters``), the teacher
is that clone with both off; the schedule is the MODEL's own (``distill_schedule``); the model is called
through ComfyUI's sampling path (``distill_model``). Each adapter has its own AdamW (fp32 state, the
trainer's betas, warm-up and gradient clipping) and, under an fp16 base, its own loss scaler
(``torch.amp.GradScaler``, as ``training.loop`` does): ComfyUI loads SD1.5 / SDXL UNets in fp16 on CUDA,
where the backward of a mean loss underflows unscaled. Backward runs under the adapter whose loss it is, as
checkpointed blocks are recomputed during backward with whatever adapter is active then.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import comfy.model_management
import comfy.sample
from comfy_extras.nodes_train import find_all_highest_child_module_with_forward, patch as checkpoint_forward, unpatch as plain_forward

from .core_import import grids, iteration, learning_rates, optimiser, progress, samplers
from .distill_adapters import FAKE_SCORE, ROLES, STUDENT, add_tdm_adapters
from .distill_conditions import batch_conditioning, processed_conds
from .distill_experts import WAN22_T2V_BOUNDARY, Expert, JointAdapters, check_experts, routed_denoisers
from .distill_inplace import copy_block_inputs, protect_norm_inputs, remove_hooks, restore_block_inputs
from .distill_model import comfy_denoisers
from .distill_schedule import PREDICTION_TYPE, ComfySchedule, schedule_of

sample_tdm = samplers.sample_tdm


@dataclass(frozen=True)
class DistillOptions:
    """The node's choices; the defaults are the trainer's (``training.config``) except ``batch_size``: 4
    against the trainer's 8, as the node shares the GPU with the rest of the graph and has no gradient
    accumulation to fall back on when short of memory (raise it where memory allows)."""

    steps: int = 4  # K
    iterations: int = 500
    cfg: float = 2.0
    rank: int = 16
    alpha: Optional[float] = None  # None: the rank (scale 1)
    fake_score_lr: Optional[float] = None  # None: tdm_core.learning_rates' scale-free default
    student_lr: Optional[float] = None  # None: the fake-score rate / 5
    batch_size: int = 4
    seed: int = 0
    gradient_checkpointing: bool = False
    total_steps: int = 900
    max_grad_norm: float = 1.0
    distance: str = iteration.DEFAULT_DISTANCE
    fake_score_updates: int = iteration.DEFAULT_FAKE_SCORE_UPDATES  # per student update (the trainer's --fake-score-updates)
    boundary: float = WAN22_T2V_BOUNDARY  # sigma where a low_noise_model takes over (two experts only)

    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def rates(self) -> dict:
        fake = learning_rates.default_fake_score_lr(self.rank, self.lora_alpha()) if self.fake_score_lr is None else self.fake_score_lr
        student = learning_rates.default_student_lr(fake) if self.student_lr is None else self.student_lr
        return {FAKE_SCORE: fake, STUDENT: student}

    def grid(self) -> list[int]:
        return grids.reference_grid(self.steps, self.total_steps)

    def settings(self) -> iteration.TDMSettings:
        return iteration.TDMSettings(grid=tuple(self.grid()), prediction_type=PREDICTION_TYPE, total_steps=self.total_steps,
                                     cfg_scale=self.cfg, distance=self.distance,
                                     fake_score_updates=self.fake_score_updates)


def check_options(options: DistillOptions, num_prompts: int, has_negative: bool) -> None:
    """Input checks that need no model; each message names the fix."""
    if num_prompts < 1:
        raise ValueError("no positive conditioning: connect CLIPTextEncode outputs (one per prompt) to positive")
    if options.cfg < 1.0:
        raise ValueError(f"cfg {options.cfg} must be at least 1 (1 = no guidance)")
    if options.cfg != 1.0 and not has_negative:
        raise ValueError(f"cfg {options.cfg} needs the teacher's unconditional pass: connect a CLIPTextEncode of an empty prompt "
                         "to negative, or set cfg to 1")
    if options.batch_size < 1 or options.iterations < 1:
        raise ValueError("batch_size and iterations must be at least 1")
    if options.total_steps // options.steps < 30:
        raise ValueError(f"steps K={options.steps} is too many for {options.total_steps} timesteps: each step needs at least 30")


def normal_tensors_(module: torch.nn.Module) -> None:
    """ComfyUI loads models inside inference mode, and autograd cannot save an inference tensor for backward
    (every layer keeps its weight to pass gradients to its input): swap each for a normal copy with the same
    values, in place on the loaded model (the graph's other users see the same weights)."""
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None and buffer.is_inference():
                    sub._buffers[name] = buffer.clone()


def unload(patcher) -> None:
    """Unload ``patcher`` as ComfyUI's ``free_memory`` does (``LoadedModel.model_unload``: weights unpatched,
    moved to the offload device, and its entry dropped from ``current_loaded_models``), so ComfyUI's memory
    bookkeeping does not count a model that is no longer loaded."""
    loaded_models = comfy.model_management.current_loaded_models
    for index, loaded in enumerate(loaded_models):
        if loaded.model is patcher:
            loaded.model_unload()
            loaded_models.pop(index)
            return
    patcher.detach(unpatch_all=True)  # already evicted from the list (memory pressure): undo what is left


def sampled_latent_shape(model, latent_shape) -> tuple:
    """The shape ComfyUI's samplers give an empty latent of ``latent_shape`` for this MODEL
    (``comfy.sample.fix_empty_latent_channels``: its latent format's channels, and a frame axis for models
    with 3-D latents such as Qwen-Image fed an image latent)."""
    return tuple(comfy.sample.fix_empty_latent_channels(model, torch.zeros(tuple(latent_shape))).shape)


class Distiller:
    """One distillation run on a clone of ``model``; ``positives`` is a list of ComfyUI conditionings (one per
    prompt), ``negative`` the empty-prompt one (needed at cfg != 1), ``latent_shape`` the shape of one
    training latent (its batch entry is replaced by ``options.batch_size``)."""

    def __init__(self, model, positives: list, negative: Optional[list], latent_shape, options: DistillOptions, low_noise_model=None):
        check_options(options, len(positives), negative is not None)
        self.options, self.positives, self.negative = options, positives, negative
        self.schedule: ComfySchedule = schedule_of(model)
        grids.check_grid(options.grid(), self.schedule.num_timesteps, self.schedule.flow)
        if low_noise_model is not None:
            check_experts(model, low_noise_model, options.boundary)
        self.latent_shape = (options.batch_size, *sampled_latent_shape(model, latent_shape)[1:])
        rates = options.rates()
        with torch.inference_mode(False):  # ComfyUI runs nodes under inference mode; trainable tensors must not be made there
            self.experts: list[Expert] = []
            for number, expert_model in enumerate(m for m in (model, low_noise_model) if m is not None):
                patcher = expert_model.clone()
                switch = self.experts[0].adapters.switch if self.experts else None  # one switch drives both experts
                adapters = add_tdm_adapters(patcher, options.rank, options.lora_alpha(), options.seed + number, switch=switch)
                self.experts.append(Expert(patcher, adapters))
            self.adapters = JointAdapters(self.experts)
            self.optimizers = {role: torch.optim.AdamW(self.adapters.parameters(role), lr=rates[role], betas=learning_rates.ADAMW_BETAS,
                                                       weight_decay=0.0) for role in ROLES}
            self.schedulers = {role: torch.optim.lr_scheduler.LambdaLR(opt, learning_rates.warmup_factor) for role, opt in self.optimizers.items()}
        # fp16 only: bf16 and fp32 have fp32's exponent range
        self.scalers = ({role: torch.amp.GradScaler(self.device.type) for role in ROLES}
                        if self.patcher.model_dtype() == torch.float16 else {})
        # every random draw of the run, in the trainer's order (prompts, noise, then tdm_core's)
        self.generator = torch.Generator().manual_seed(options.seed)
        self.loaded = False
        self.hooks: list = []

    @property
    def patcher(self):
        """The (first expert's) model clone the adapters are on."""
        return self.experts[0].patcher

    # --- the model on the device, with the adapters' weight wrappers --------------------------------------
    def load(self) -> None:
        """Load the clones the way sampling does (weight patches of the graph's LoRAs applied, wrappers
        installed); gradient checkpointing wraps the diffusion model's top blocks as TrainLoraNode does."""
        patchers = [e.patcher for e in self.experts]
        for patcher in patchers:
            patcher.model.requires_grad_(False)
        comfy.model_management.load_models_gpu(patchers, force_full_load=True)
        for patcher in patchers:
            normal_tensors_(patcher.model)
            patcher.pre_run()
            self.hooks += protect_norm_inputs(patcher.model.diffusion_model)
            if self.options.gradient_checkpointing:
                for module in find_all_highest_child_module_with_forward(patcher.model.diffusion_model):
                    copy_block_inputs(module)  # recomputed from inputs it must not have added into (Flux's in-place residuals)
                    checkpoint_forward(module)
        self.loaded = True

    def release(self) -> None:
        """Undo ``load``: plain forwards, the wrappers removed and the base weights restored."""
        if not self.loaded:
            return
        remove_hooks(self.hooks)
        self.hooks = []
        for patcher in [e.patcher for e in self.experts]:
            for module in patcher.model.modules():
                plain_forward(module)
                restore_block_inputs(module)
            patcher.cleanup()
            unload(patcher)
        self.loaded = False

    @property
    def device(self):
        return self.patcher.load_device

    # --- the optimiser side of tdm_core.iteration ------------------------------------------------------------
    def backward(self, role: str, loss: torch.Tensor) -> None:
        scaler = self.scalers.get(role)
        with self.adapters.switch.use(role):
            (loss if scaler is None else scaler.scale(loss)).backward()

    def step(self, role: str) -> float:
        """Clip and step ``role``'s optimiser (fp16: unscale first; the scaler skips a step with inf/NaN
        gradients and adapts its scale). Returns the gradient norm before clipping."""
        return float(optimiser.clip_and_step(self.adapters.parameters(role), self.optimizers[role], self.schedulers[role],
                                             self.options.max_grad_norm, self.scalers.get(role)))

    def updates(self, norms: dict) -> iteration.TDMUpdates:
        def step(role: str) -> None:
            norms[role] = self.step(role)

        return iteration.TDMUpdates(backward=self.backward, step=step)

    # --- how far the student moved (tdm_core.progress's probe) ----------------------------------------------
    def k_step_samples(self, role, rows: list[int], noise: torch.Tensor) -> torch.Tensor:
        """K-step samples of the student (``STUDENT``) or of the teacher (``None``) on the conditional pass."""
        denoisers = self.iteration_denoisers(rows, noise)
        denoise = denoisers.student if role == STUDENT else (lambda x_t, t: denoisers.teacher(x_t, t)[0])
        with torch.inference_mode(False), torch.no_grad():
            return sample_tdm(denoise, noise, self.options.grid(), self.schedule.schedule, PREDICTION_TYPE)

    def iteration_denoisers(self, rows: list[int], noise: torch.Tensor) -> iteration.TDMDenoisers:
        """The three denoisers for a batch whose row ``b`` is prompt ``rows[b]``; with two experts each call goes
        row by row to the expert that owns its sigma (``distill_experts``)."""
        if len(self.experts) == 1:
            return self.expert_denoisers(0, rows, noise)
        return routed_denoisers(lambda e, positions: self.expert_denoisers(e, [rows[p] for p in positions], noise[positions]),
                                self.schedule, self.options.boundary)

    def expert_denoisers(self, number: int, rows: list[int], noise: torch.Tensor) -> iteration.TDMDenoisers:
        expert = self.experts[number]
        conditionings = {"positive": batch_conditioning(self.positives, rows), "negative": self.negative}
        conds = processed_conds(expert.patcher, conditionings, torch.zeros_like(noise), self.options.seed)
        return comfy_denoisers(expert.patcher, expert.adapters, self.schedule, conds["positive"], conds.get("negative"), self.options.cfg)

    def iterate(self) -> dict:
        """The fake-score updates (``fake_score_updates``) and one student update on a batch of ``batch_size`` rows (prompts drawn,
        then noise, then tdm_core's draws, all from the run's generator). Returns the losses and gradient norms."""
        norms = {}
        # ComfyUI runs nodes under inference mode: training needs autograd, so none of it runs there
        with torch.inference_mode(False), torch.enable_grad():
            if not self.loaded:
                self.load()
            rows = iteration.draw_prompt_rows(len(self.positives), self.latent_shape[0], self.generator)
            noise = iteration.randn_on(self.latent_shape, self.generator, self.device)
            losses = iteration.tdm_iteration(self.iteration_denoisers(rows, noise), self.schedule.schedule, self.options.settings(),
                                             noise, self.generator, self.updates(norms))
        return {"loss_fake": float(losses.fake_score), "loss_student": float(losses.student),
                "grad_norm_fake": norms[FAKE_SCORE], "grad_norm_student": norms[STUDENT]}
