"""Where the pack's node help pages live and how the frontend finds them (issue 23, item 2).

ComfyUI 0.3.75 (``nodes.load_custom_node``) serves the pack module's ``WEB_DIRECTORY`` at
``/extensions/<module name>/``, the module name being the pack's folder in ``custom_nodes``. Frontend
1.32.9 (``NodeHelpService.fetchCustomNodeHelp``) takes ``<module name>`` from the node's ``python_module``
(``custom_nodes.<folder>``) and fetches ``/extensions/<folder>/docs/<NodeId>/<locale>.md``, then
``/extensions/<folder>/docs/<NodeId>.md``; when both fail it shows the node's description instead.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HELP_LOCALE = "en"  # the frontend's default locale (i18n.global.locale || "en")


def web_directory() -> Path:
    """The pack's ``WEB_DIRECTORY``, read from the root ``__init__.py`` without importing it."""
    tree = ast.parse((REPO_ROOT / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WEB_DIRECTORY" for t in node.targets):
            return (REPO_ROOT / ast.literal_eval(node.value)).resolve()
    raise AssertionError("the pack's __init__.py defines no WEB_DIRECTORY: ComfyUI would serve no help pages")


def help_page(node_id: str) -> Path:
    return web_directory() / "docs" / f"{node_id}.md"


def help_urls(python_module: str, node_id: str, locale: str = HELP_LOCALE) -> list[str]:
    """The URLs the frontend tries, in its order, for a custom node's help."""
    parts = python_module.split(".")
    assert len(parts) >= 2 and parts[0] == "custom_nodes", f"{node_id} is not a custom node: python_module={python_module!r}"
    pack = parts[1].split("@")[0]
    return [f"/extensions/{pack}/docs/{node_id}/{locale}.md", f"/extensions/{pack}/docs/{node_id}.md"]


def format_default(value) -> str:
    """How a page writes an input's default: ``on``/``off``, numbers as ``%g``, strings in backticks."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return str(value)
    return "empty" if value == "" else f"`{value}`"


def entries(page: str, section: str) -> dict[str, str]:
    """``{name: text}`` of a page section's list items ``- `name` ...`` (continuation lines included)."""
    match = re.search(rf"^## {section}\n(.*?)(?=^## |\Z)", page, flags=re.M | re.S)
    if match is None:
        return {}
    found: dict[str, str] = {}
    for item in re.split(r"^- ", match.group(1), flags=re.M)[1:]:
        name = re.match(r"`([^`]+)`", item)
        if name:
            found[name.group(1)] = " ".join(item.split())
    return found


def workflow_mentions(page: str) -> list[str]:
    return re.findall(r"`(workflows/[^`]+\.json)`", page)
