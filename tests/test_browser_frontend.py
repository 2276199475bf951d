"""Issue 3, test group 4: the real ComfyUI frontend (1.32.9) in a real headless Chromium.

The browser is Debian's chromium (``scripts/install_browser.sh``, run by the session fixture below),
driven by playwright through ``executable_path``: playwright never downloads a browser. The page
is the frontend served by the shared end-to-end server (tests/helpers/e2e_server.py).
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.comfy_server import PROJECT_ROOT, execution_error
from tests.helpers.e2e_server import TDM_NODE_TYPES, is_sd15_workflow, load_workflow, shared_e2e_server, workflow_files

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("TDM_CHROMIUM", "/usr/bin/chromium")
# COMFY_HOST.md: the flags that make Debian's chromium run headless as root with no network chatter
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
SCREENSHOT = PROJECT_ROOT / "docs" / "workflow_sd15_tdm_ksampler.png"
DISTILL_SCREENSHOT = PROJECT_ROOT / "docs" / "workflow_sd15_tdm_distill.png"  # the README's picture of the distill graph
VIEWPORT = {"width": 1600, "height": 900}
SCREENSHOT_VIEWPORT = {"width": 1920, "height": 1080}  # the whole distill graph at a zoom that still draws text
# the frontend's chrome a clean picture leaves out (setting id -> value while it is taken)
CLEAN_SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}
VISIBLE_DIALOGS = ".p-dialog:visible"
ERROR_TOASTS = ".p-toast-message-error:visible"
SETTLE_S = 1.5  # the frontend opens its dialogs asynchronously after loadGraphData resolves


@pytest.fixture(scope="module")
def browser():
    install = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "install_browser.sh")], capture_output=True, text=True)
    assert install.returncode == 0, f"installing chromium failed:\n{install.stderr[-3000:]}"
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="tdm-chromium-")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS, viewport=VIEWPORT)
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def e2e():
    return shared_e2e_server()


@pytest.fixture(scope="module")
def page(browser, e2e):
    page = browser.new_page()
    page.goto(e2e.server.url)
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=180_000)
    return page


def load_graph(page, workflow: dict) -> None:
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", copy.deepcopy(workflow))
    time.sleep(SETTLE_S)


def visible_dialog_texts(page) -> list[str]:
    return [d.inner_text() for d in page.locator(VISIBLE_DIALOGS).all()]


# PrimeVue dialogs have a close button of their own; the template browser (frontend 1.32.9) draws
# an icon-only button at its top-right corner instead
CLOSE_BUTTONS = (".p-dialog-close-button:visible", "button.right-6:visible")


def close_dialogs(page) -> None:
    for _ in range(5):
        dialogs = page.locator(VISIBLE_DIALOGS)
        if dialogs.count() == 0:
            return
        top = dialogs.last
        buttons = [top.locator(selector) for selector in CLOSE_BUTTONS]
        button = next((b.first for b in buttons if b.count()), None)
        if button is None:
            page.keyboard.press("Escape")
        else:
            button.click()
        time.sleep(0.5)
    raise AssertionError(f"dialogs do not close: {visible_dialog_texts(page)}")


def graph_node_types(page) -> list[str]:
    return page.evaluate("window.app.graph._nodes.map(n => n.type)")


def unregistered_node_types(page) -> list[str]:
    return page.evaluate("window.app.graph._nodes.map(n => n.type).filter(t => !(t in window.LiteGraph.registered_node_types))")


# --- tests (they share one page, in this order) ---------------------------------------------
def test_template_browser_lists_and_opens_the_pack_workflows(page):
    # on a first visit the frontend opens its template browser; the pack has its own section there
    dialog = page.locator(".p-dialog").filter(has_text="Templates")
    if dialog.count() == 0:
        page.evaluate("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog.first.wait_for(timeout=60_000)
    dialog.first.get_by_text("comfyui-tdm", exact=True).first.click()
    for path in workflow_files():
        dialog.first.get_by_text(path.stem, exact=True).first.wait_for(timeout=30_000)
    # opening a card loads the file the server serves from the pack's workflows/ folder
    dialog.first.get_by_text("sd15_tdm_ksampler", exact=True).first.click()
    page.wait_for_function("window.app.graph._nodes.some(n => n.type === 'TDMKSampler')", timeout=30_000)
    time.sleep(SETTLE_S)
    close_dialogs(page)
    assert sorted(t for t in graph_node_types(page)) == sorted(n["type"] for n in load_workflow(
        next(p for p in workflow_files() if p.stem == "sd15_tdm_ksampler"))["nodes"])


def test_unknown_node_type_opens_the_missing_nodes_dialog(page):
    # the control for the next test: the dialog check does see the frontend's complaints
    close_dialogs(page)
    workflow = load_workflow(workflow_files()[0])
    workflow["nodes"][1]["type"] = "TDMNoSuchNode"
    load_graph(page, workflow)
    texts = visible_dialog_texts(page)
    assert any("TDMNoSuchNode" in text and "missing" in text.lower() for text in texts), texts
    close_dialogs(page)


@pytest.mark.parametrize("path", workflow_files(), ids=lambda p: p.stem)
def test_workflow_loads_without_error_dialog(page, path):
    close_dialogs(page)
    workflow = load_workflow(path)
    load_graph(page, workflow)
    assert visible_dialog_texts(page) == []
    assert page.locator(ERROR_TOASTS).count() == 0, page.locator(ERROR_TOASTS).all_inner_texts()
    assert unregistered_node_types(page) == []
    assert sorted(graph_node_types(page)) == sorted(n["type"] for n in workflow["nodes"])
    # every link survived the load (a slot mismatch drops links silently)
    assert page.evaluate("Object.keys(window.app.graph.links).length") in (len(workflow["links"]),)


def test_queue_sd15_workflow_from_the_page_runs_to_success(page, e2e):
    close_dialogs(page)
    path = next(p for p in workflow_files() if p.stem == "sd15_tdm_ksampler")
    workflow = load_workflow(path)
    assert is_sd15_workflow(workflow)
    for node in workflow["nodes"]:  # 64x64 keeps the CPU run short; the server has the named files
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][:2] = [64, 64]
    before = set(e2e.server.get_json("/history"))
    load_graph(page, workflow)
    page.evaluate("async () => { await window.app.queuePrompt(0); }")
    deadline = time.monotonic() + 600
    new_ids: set = set()
    while time.monotonic() < deadline and not new_ids:
        new_ids = set(e2e.server.get_json("/history")) - before
        time.sleep(0.5)
    assert len(new_ids) == 1, "the page queued nothing"
    entry = e2e.server.wait_for_history(new_ids.pop(), timeout_s=600)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    classes = {node["class_type"] for node in entry["prompt"][2].values()}
    assert {"TDMLoraLoader", "TDMKSampler"} <= classes
    images = e2e.server.output_files(entry)
    assert images and all(p.is_file() for p in images)
    assert visible_dialog_texts(page) == []


def test_screenshot_of_the_tdm_ksampler_workflow(page):
    close_dialogs(page)
    workflow = load_workflow(next(p for p in workflow_files() if p.stem == "sd15_tdm_ksampler"))
    load_graph(page, workflow)
    assert set(TDM_NODE_TYPES) & set(graph_node_types(page)) == {"TDMLoraLoader", "TDMKSampler"}
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    tmp = SCREENSHOT.with_name(f".{SCREENSHOT.stem}.tmp.png")
    page.screenshot(path=str(tmp))
    os.replace(tmp, SCREENSHOT)
    assert SCREENSHOT.stat().st_size > 20_000  # a real rendering, not a blank page


def run_command(page, command_id: str) -> None:
    page.evaluate("async (id) => { await window.app.extensionManager.command.execute(id); }", command_id)


@contextmanager
def clean_canvas(page):
    """Only the graph: focus mode (no menus, tabs, side bar or banners), no minimap, no canvas stats; then back."""
    saved = page.evaluate("(keys) => keys.map(k => window.app.extensionManager.setting.get(k))", list(CLEAN_SETTINGS))
    set_settings = "async (pairs) => { for (const [k, v] of pairs) await window.app.extensionManager.setting.set(k, v); }"
    page.evaluate(set_settings, list(CLEAN_SETTINGS.items()))
    run_command(page, "Workspace.ToggleFocusMode")
    page.set_viewport_size(SCREENSHOT_VIEWPORT)
    try:
        yield
    finally:
        page.set_viewport_size(VIEWPORT)
        run_command(page, "Workspace.ToggleFocusMode")
        page.evaluate(set_settings, list(zip(CLEAN_SETTINGS, saved)))


def graph_clip(page, margin: int = 24) -> dict:
    """The screen rectangle around every node (title bars included), ``margin`` pixels wider: the picture's crop."""
    x0, y0, x1, y1 = page.evaluate("""() => {
        const c = window.app.canvas, corners = window.app.graph._nodes.flatMap(n => {
            const b = n.getBounding();
            return [c.ds.convertOffsetToCanvas([b[0], b[1]]), c.ds.convertOffsetToCanvas([b[0] + b[2], b[1] + b[3]])];
        });
        return [Math.min(...corners.map(p => p[0])), Math.min(...corners.map(p => p[1])),
                Math.max(...corners.map(p => p[0])), Math.max(...corners.map(p => p[1]))];
    }""")
    left, top = max(0, x0 - margin), max(0, y0 - margin)
    return {"x": left, "y": top, "width": min(SCREENSHOT_VIEWPORT["width"], x1 + margin) - left,
            "height": min(SCREENSHOT_VIEWPORT["height"], y1 + margin) - top}


def nodes_outside_the_canvas(page) -> list[str]:
    """Titles of nodes (title bar included) not wholly inside the visible canvas."""
    return page.evaluate("""() => {
        const c = window.app.canvas, rect = c.canvas.getBoundingClientRect();
        return window.app.graph._nodes.filter(n => {
            const b = n.getBounding(), [x0, y0] = c.ds.convertOffsetToCanvas([b[0], b[1]]);
            const [x1, y1] = c.ds.convertOffsetToCanvas([b[0] + b[2], b[1] + b[3]]);
            return x0 < 0 || y0 < 0 || x1 > rect.width || y1 > rect.height;
        }).map(n => n.title);
    }""")


def test_screenshot_of_the_sd15_distill_workflow(page):
    close_dialogs(page)
    workflow = load_workflow(next(p for p in workflow_files() if p.stem == "sd15_tdm_distill"))
    load_graph(page, workflow)
    assert {"TDMPromptList", "TDMDistill", "TDMKSampler"} <= set(graph_node_types(page))
    with clean_canvas(page):
        run_command(page, "Comfy.Canvas.FitView")
        time.sleep(SETTLE_S)
        assert nodes_outside_the_canvas(page) == []
        assert visible_dialog_texts(page) == [] and page.locator(ERROR_TOASTS).count() == 0
        assert page.evaluate("window.app.canvas.ds.scale") >= 0.6  # above the zoom where the frontend stops drawing text
        tmp = DISTILL_SCREENSHOT.with_name(f".{DISTILL_SCREENSHOT.stem}.tmp.png")
        page.screenshot(path=str(tmp), clip=graph_clip(page))
        os.replace(tmp, DISTILL_SCREENSHOT)
    assert DISTILL_SCREENSHOT.stat().st_size > 50_000  # a real rendering, not a blank page
