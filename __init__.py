"""ComfyUI entry point of the TDM pack (V3 API: ``comfy_entrypoint``).

Importing this file does nothing heavy: the node modules import ``comfy`` and are loaded only when
ComfyUI calls ``comfy_entrypoint``, so ``tdm_core`` and ``training`` stay usable without ComfyUI (and
pytest, which may import this folder as a package, never pulls ComfyUI in by accident).

``WEB_DIRECTORY``: ComfyUI serves this folder at ``/extensions/<pack folder>/`` (``nodes.load_custom_node``
reads it before the V1/V3 branch, so it works beside ``comfy_entrypoint``). It holds only the node help
pages, ``web/docs/<NodeId>.md``, which the frontend's node help panel fetches (no ``.js``: the pack adds no
frontend code).
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import TDMExtension

    return TDMExtension()
