"""ComfyUI entry point of the TDM pack (V3 API: ``comfy_entrypoint``).

Importing this file does nothing heavy: the node modules import ``comfy`` and are loaded only when
ComfyUI calls ``comfy_entrypoint``, so ``tdm_core`` and ``training`` stay usable without ComfyUI (and
pytest, which may import this folder as a package, never pulls ComfyUI in by accident).
"""


async def comfy_entrypoint():
    from .nodes import TDMExtension

    return TDMExtension()
