"""ComfyUI nodes of the TDM pack (imported only inside ComfyUI: every module here imports ``comfy``).

Node modules: ``node_defs`` (the V3 schemas), ``comfy_sigmas`` (TDM Scheduler), ``tdm_sampler``
(TDM Sampler), ``sampling`` (TDM KSampler), ``lora_keys`` / ``lora_apply`` (TDM LoRA Loader),
``grid_choice`` (pure grid presets); TDM Distill: ``distill_run`` (the run, LoRA file, report) over ``distill``
(the distiller), ``distill_adapters`` (student / fake-score LoRAs), ``distill_schedule``, ``distill_conditions``
and ``distill_model`` (ComfyUI's sampling path).
"""
from comfy_api.latest import ComfyExtension

from .node_defs import NODES, TDMDistill, TDMKSampler, TDMLoraLoader, TDMPromptList, TDMSampler, TDMScheduler


class TDMExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


__all__ = ["NODES", "TDMDistill", "TDMExtension", "TDMKSampler", "TDMLoraLoader", "TDMPromptList", "TDMSampler", "TDMScheduler"]
