"""The one place the nodes import ``tdm_core`` from.

ComfyUI loads this pack as a package named after its folder (``custom_nodes/<folder>/__init__.py``),
so ``tdm_core`` is a sibling sub-package there; in a plain checkout on ``sys.path`` it is top-level.
"""
try:
    from .. import tdm_core
    from ..tdm_core import atomic, fidelity, grids, iteration, learning_rates, lora_files, lora_targets, metadata, optimiser, progress, releases, samplers, schedules
except ImportError:  # nodes imported as a top-level package (no parent package)
    import tdm_core
    from tdm_core import atomic, fidelity, grids, iteration, learning_rates, lora_files, lora_targets, metadata, optimiser, progress, releases, samplers, schedules

TDMInfo = metadata.TDMInfo

__all__ = ["TDMInfo", "atomic", "fidelity", "grids", "iteration", "learning_rates", "lora_files", "lora_targets", "metadata", "optimiser", "progress", "releases", "samplers",
           "schedules", "tdm_core"]
