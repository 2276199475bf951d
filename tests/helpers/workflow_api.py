"""UI-format workflow (what users drag into ComfyUI) -> API-format prompt (what ``POST /prompt`` takes),
using the node definitions a live server reports at ``/object_info``.

The frontend stores each node's widget values as a list, in the order of the node's widget inputs
(``input_order``: required, then optional). Inputs that are links are not widgets, except that a
widget input may also be driven by a link, in which case the link wins. The frontend adds one
unserialised-by-name widget after some inputs, whose value is still in the list:
``control_after_generate`` after seed-like INT inputs, and the upload button after image uploads.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote"}  # documentation nodes, never sent to the server
SEED_NAMES = ("seed", "noise_seed")  # the frontend gives these a control widget by name
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload")
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    pass


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """``{node_id: {"class_type", "inputs", "_meta"}}`` for every executable node of ``workflow``."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow.get("nodes", []):
        node_type = node["type"]
        if node_type in FRONTEND_ONLY_TYPES or node.get("mode", 0) == MUTED:
            continue
        if node.get("mode", 0) == BYPASSED:
            raise WorkflowError(f"node {node['id']} ({node_type}) is bypassed: the converter does not rewire bypassed nodes")
        if node_type not in object_info:
            raise WorkflowError(f"node {node['id']} has type {node_type!r}, which the server does not know: is its pack installed?")
        inputs = widget_inputs(node, object_info[node_type])
        inputs.update(linked_inputs(node, links))
        prompt[str(node["id"])] = {
            "class_type": node_type,
            "inputs": inputs,
            "_meta": {"title": node.get("title", object_info[node_type].get("display_name", node_type))},
        }
    return prompt


def widget_specs(info: dict) -> Iterable[tuple[str, str, dict]]:
    """``(name, type, options)`` of the node's widget inputs, in the order the frontend builds them."""
    order = info.get("input_order", {})
    for section in ("required", "optional"):
        specs = info.get("input", {}).get(section, {})
        for name in order.get(section, list(specs)):
            spec = specs[name]
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(kind, list):  # old-style combo: the choices are the type
                kind, options = "COMBO", {**options, "options": kind}
            if kind in WIDGET_TYPES and not options.get("forceInput"):
                yield name, kind, options


def extra_widget_count(name: str, kind: str, options: dict) -> int:
    """Frontend-made widgets that follow an input and whose value sits in ``widgets_values``."""
    if kind == "INT" and options.get("control_after_generate", name in SEED_NAMES):
        return 1
    if kind == "COMBO" and any(options.get(opt) for opt in UPLOAD_OPTIONS):
        return 1
    return 0


def widget_inputs(node: dict, info: dict) -> dict[str, Any]:
    values = node.get("widgets_values", [])
    specs = list(widget_specs(info))
    if isinstance(values, dict):  # some packs save widgets by name
        return {name: values[name] for name, _, _ in specs if name in values}
    needed = sum(1 + extra_widget_count(*spec) for spec in specs)
    if len(values) != needed:
        names = [name for name, _, _ in specs]
        raise WorkflowError(f"node {node['id']} ({node['type']}) has {len(values)} widget values but the server's "
                            f"{node['type']} expects {needed} for widgets {names}: re-save the workflow in ComfyUI")
    inputs, position = {}, 0
    for spec in specs:
        inputs[spec[0]] = values[position]
        position += 1 + extra_widget_count(*spec)
    return inputs


def linked_inputs(node: dict, links: dict) -> dict[str, list]:
    inputs = {}
    for slot in node.get("inputs", []):
        link_id = slot.get("link")
        if link_id is None:
            continue
        if link_id not in links:
            raise WorkflowError(f"node {node['id']} input {slot['name']!r} uses link {link_id}, which is not in the workflow's links")
        _, from_node, from_slot, *_ = links[link_id]
        inputs[slot["name"]] = [str(from_node), from_slot]
    return inputs


def nodes_of_type(prompt: dict, class_type: str) -> list[dict]:
    return [node for node in prompt.values() if node["class_type"] == class_type]


def override_inputs(prompt: dict, class_type: str, **values: Any) -> dict:
    """A copy of ``prompt`` with ``values`` set on every node of ``class_type`` (which must exist)."""
    prompt = copy.deepcopy(prompt)
    targets = nodes_of_type(prompt, class_type)
    if not targets:
        raise WorkflowError(f"the prompt has no {class_type} node")
    for node in targets:
        node["inputs"].update(values)
    return prompt
