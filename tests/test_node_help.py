"""Issue 23, item 2 (fast part): every node the pack registers has a help page in the pack's web folder,
and the page names each input and output of the node's schema as the UI shows them (with the input's
default), and its example points at a workflow that uses the node. The server and browser checks are in
tests/test_node_help_e2e.py."""
from __future__ import annotations

import asyncio
import importlib
import json

import pytest

from tests.helpers import comfy_inprocess
from tests.helpers import node_help as nh


@pytest.fixture(scope="module")
def node_infos(pack):
    """The V1 node info ComfyUI's ``/object_info`` sends the frontend, per node the entry point registers."""
    root = importlib.import_module(comfy_inprocess.PACK_MODULE)
    extension = asyncio.run(root.comfy_entrypoint())
    return {info["name"]: info for info in (cls.GET_NODE_INFO_V1() for cls in asyncio.run(extension.get_node_list()))}


def inputs_of(info: dict) -> dict[str, dict]:
    """``{input name: options}`` in the order the node shows them (required, then optional)."""
    found = {}
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            found[name] = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return found


def test_every_registered_node_has_a_page_and_no_page_is_orphaned(node_infos):
    pages = {path.stem for path in (nh.web_directory() / "docs").glob("*.md")}
    assert set(node_infos) <= pages, f"nodes without a help page in {nh.web_directory() / 'docs'}: {sorted(set(node_infos) - pages)}"
    assert pages <= set(node_infos), f"help pages of no registered node: {sorted(pages - set(node_infos))}"


def test_each_page_names_every_input_with_its_default_and_every_output(node_infos):
    problems = []
    for node_id, info in node_infos.items():
        page = nh.help_page(node_id).read_text()
        if not page.startswith(f"# {info['display_name']}\n"):
            problems.append(f"{node_id}: the page's title is not '# {info['display_name']}'")
        documented = nh.entries(page, "Inputs")
        for name, options in inputs_of(info).items():
            if name not in documented:
                problems.append(f"{node_id}: input `{name}` is not a '- `{name}`' item under '## Inputs'")
            elif "default" in options and f"default {nh.format_default(options['default'])}" not in documented[name]:
                problems.append(f"{node_id}: input `{name}` does not say 'default {nh.format_default(options['default'])}'")
        extra = set(documented) - set(inputs_of(info))
        problems += [f"{node_id}: the page documents an input the node does not have: `{name}`" for name in sorted(extra)]
        outputs = nh.entries(page, "Outputs")
        problems += [f"{node_id}: output `{name}` is not under '## Outputs'" for name in info["output_name"] if name not in outputs]
    assert not problems, "\n".join(problems)


def test_each_example_names_a_workflow_that_uses_the_node(node_infos):
    for node_id in node_infos:
        page = nh.help_page(node_id).read_text()
        assert "## Example" in page, f"{node_id}: no '## Example' section"
        mentioned = nh.workflow_mentions(page)
        assert mentioned, f"{node_id}: the example names no workflow in workflows/"
        for relative in mentioned:
            path = nh.REPO_ROOT / relative
            assert path.is_file(), f"{node_id}: {relative} does not exist"
            types = {node["type"] for node in json.loads(path.read_text())["nodes"]}
            assert node_id in types, f"{node_id}: {relative} does not use the node"


def test_the_help_urls_are_the_frontends():
    # frontend 1.32.9: python_module "custom_nodes.<folder>" (an "@version" suffix is dropped), locale page first
    assert nh.help_urls("custom_nodes.comfyui-tdm", "TDMKSampler") == [
        "/extensions/comfyui-tdm/docs/TDMKSampler/en.md", "/extensions/comfyui-tdm/docs/TDMKSampler.md"]
    assert nh.help_urls("custom_nodes.comfyui-tdm@0.1.0", "TDMDistill")[1] == "/extensions/comfyui-tdm/docs/TDMDistill.md"
