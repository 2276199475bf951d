"""Takes the pictures of the example workflows from the real ComfyUI frontend, in a clean state:

    .venv/bin/python -m scripts.pictures          # from the repository root; about a minute

- ``docs/workflow_<name>.png`` for the workflows the docs show (``DOC_PICTURES``): the whole frontend at 1920 x 1080,
  one tab (the workflow's), no banner, no dialog, no minimap, the whole graph in view;
- ``workflows/<name>.jpg`` beside every ``workflows/<name>.json``: the thumbnail ComfyUI's template browser shows
  for a custom node's template (frontend 1.32.9 asks for ``/api/workflow_templates/<pack>/<name>.jpg``, which the
  server serves from the pack's workflow folder), the graph alone in a square.

It starts a real ComfyUI server (CPU) with this pack, its settings file written before start-up (no first-visit
template browser, no minimap, no canvas statistics), and an empty stand-in for every model file the workflows
load, so no "missing models" dialog opens; the browser is Debian's chromium (``scripts/install_browser.sh``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import frontend_page as fp
from tests.helpers.comfy_server import PROJECT_ROOT, ComfyServer
from tests.helpers.e2e_server import WORKFLOWS_DIR, load_workflow, write_test_image
from tests.helpers.model_downloads import MODEL_SUFFIXES, NODE_FOLDERS

DOCS_DIR = PROJECT_ROOT / "docs"
DOC_PICTURES = ("sd15_tdm_ksampler", "sd15_tdm_distill")  # the workflows README.md and docs/*.md show
DOC_VIEWPORT = {"width": 1920, "height": 1080}
THUMBNAIL_VIEWPORT = {"width": 1024, "height": 1024}  # the template browser's cards are square
THUMBNAIL_SIZE = 512
THUMBNAIL_QUALITY = 85
# draw node text at any zoom (by default the frontend draws boxes only once fonts get smaller than 8 px)
THUMBNAIL_SETTINGS = {"LiteGraph.Canvas.MinFontSizeForLOD": 0}
# what focus mode still draws over the canvas: its exit button and the canvas toolbar (zoom, fit, minimap buttons)
CANVAS_OVERLAYS = (".comfy-menu-hamburger", ".graph-canvas-panel .p-buttongroup")


class PictureError(RuntimeError):
    pass


def stand_in_files(base_dir: Path, workflows: dict[str, dict]) -> None:
    """An empty file for every model a workflow loads (in its loader's folder) and the input images."""
    for workflow in workflows.values():
        for node in workflow["nodes"]:
            if node["type"] == "LoadImage":
                write_test_image(base_dir / "input" / node["widgets_values"][0], size=512)
            elif node["type"] in NODE_FOLDERS:
                for value in node["widgets_values"]:
                    if isinstance(value, str) and value.endswith(MODEL_SUFFIXES):
                        path = base_dir / "models" / NODE_FOLDERS[node["type"]] / value
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(b"")


def show_workflow(page, name: str, workflow: dict, fill: bool = False) -> None:
    """The workflow alone in one tab named after it, the whole graph in view (the frontend's fit view, or filling
    the canvas with ``fill``); refuses a page with a dialog, an error or a node out of view."""
    fp.load_graph(page, workflow, name)
    if fp.close_other_tabs(page) != 1 or fp.open_tab_names(page) != [name]:
        raise PictureError(f"{name}: expected one tab, the frontend has {fp.open_tab_names(page)}")
    if fill:
        fp.fit_graph(page)
    else:
        fp.run_command(page, "Comfy.Canvas.FitView")
    time.sleep(fp.SETTLE_S)
    problems = fp.visible_dialog_texts(page) + page.locator(fp.ERROR_TOASTS).all_inner_texts() + fp.visible_banners(page)
    if problems:
        raise PictureError(f"{name}: the frontend shows {problems}")
    outside = fp.nodes_outside_the_canvas(page)
    if outside:
        raise PictureError(f"{name}: nodes outside the view after fit view: {outside}")


def atomic_screenshot(page, path: Path, **options) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    page.screenshot(path=str(tmp), **options)
    os.replace(tmp, path)
    return path


def write_thumbnail(page, path: Path) -> Path:
    from PIL import Image

    tmp = path.with_name(f".{path.stem}.tmp.png")
    page.screenshot(path=str(tmp))
    with Image.open(tmp) as image:
        small = image.convert("RGB").resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.LANCZOS)
    out = path.with_name(f".{path.stem}.tmp{path.suffix}")
    small.save(out, quality=THUMBNAIL_QUALITY, optimize=True)
    tmp.unlink()
    os.replace(out, path)
    return path


def take_pictures(context, url: str, workflows: dict[str, dict], docs: tuple[str, ...], docs_dir: Path,
                  thumbs_dir: Path) -> list[Path]:
    """The docs pictures of ``docs`` and a thumbnail of every workflow, from the frontend at ``url`` in a new page
    of the browser ``context``."""
    written = []
    page = fp.open_frontend(context, url, DOC_VIEWPORT, fp.CLEAN_LOCAL_STORAGE)
    saved = fp.get_settings(page, {**fp.CLEAN_SETTINGS, **THUMBNAIL_SETTINGS})  # the server keeps settings: put them back
    try:
        fp.set_settings(page, fp.CLEAN_SETTINGS)  # for a server that started without them (the tests' server)
        fp.close_dialogs(page)
        for name in docs:
            show_workflow(page, name, workflows[name])
            written.append(atomic_screenshot(page, docs_dir / f"workflow_{name}.png"))
        # thumbnails: focus mode (the canvas alone) in a square window
        page.set_viewport_size(THUMBNAIL_VIEWPORT)
        fp.set_settings(page, THUMBNAIL_SETTINGS)
        fp.run_command(page, "Workspace.ToggleFocusMode")
        fp.hide(page, CANVAS_OVERLAYS)
        for name, workflow in workflows.items():
            show_workflow(page, name, workflow, fill=True)
            written.append(write_thumbnail(page, thumbs_dir / f"{name}.jpg"))
    finally:
        fp.set_settings(page, saved)
        page.close()
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: every workflows/*.json)")
    args = parser.parse_args(argv)
    workflows = {p.stem: load_workflow(p) for p in sorted(WORKFLOWS_DIR.glob("*.json"))}
    unknown = set(args.names) - set(workflows)
    if unknown:
        sys.exit(f"no workflows/{sorted(unknown)[0]}.json; there are {sorted(workflows)}")
    if args.names:
        workflows = {name: workflows[name] for name in args.names}
    fp.install_browser()
    base = Path(tempfile.mkdtemp(prefix="tdm-pictures-"))
    try:
        (base / "input").mkdir()
        fp.write_settings_file(base)
        stand_in_files(base, workflows)
        with ComfyServer.start(base) as server, fp.browser() as context:
            docs = tuple(name for name in DOC_PICTURES if name in workflows)
            for path in take_pictures(context, server.url, workflows, docs, DOCS_DIR, WORKFLOWS_DIR):
                print(path.relative_to(PROJECT_ROOT))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
