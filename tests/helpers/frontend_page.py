"""The real ComfyUI frontend (1.32.9) in a real headless Chromium, for the browser tests and the pictures script.

The browser is Debian's chromium (``scripts/install_browser.sh``), driven by playwright through
``executable_path``: playwright never downloads a browser.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.comfy_server import PROJECT_ROOT

CHROMIUM = os.environ.get("TDM_CHROMIUM", "/usr/bin/chromium")
# COMFY_HOST.md: the flags that make Debian's chromium run headless as root with no network chatter
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 900}
VISIBLE_DIALOGS = ".p-dialog:visible"
ERROR_TOASTS = ".p-toast-message-error:visible"
SETTLE_S = 1.5  # the frontend opens its dialogs asynchronously after loadGraphData resolves
# a clean page: no first-visit template browser, no minimap, no canvas statistics (setting id -> value), ...
CLEAN_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}
# ... and no "Introducing Nodes 2.0" banner (the frontend keeps its dismissal in localStorage)
CLEAN_LOCAL_STORAGE = {"vueNodesBannerDismissed": "true"}
BANNER_TEXTS = ("Introducing Nodes 2.0",)  # the banners frontend 1.32.9 shows above the tabs
# PrimeVue dialogs have a close button of their own; the template browser (frontend 1.32.9) draws
# an icon-only button at its top-right corner instead
CLOSE_BUTTONS = (".p-dialog-close-button:visible", "button.right-6:visible")


def install_browser() -> None:
    done = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "install_browser.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"installing chromium failed (scripts/install_browser.sh):\n{done.stderr[-3000:]}")


@contextmanager
def browser(viewport: dict = VIEWPORT):
    """A persistent Chromium context in a throw-away profile (one per process: playwright's sync API allows one)."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="tdm-chromium-")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS, viewport=viewport)
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def open_frontend(context, url: str, viewport: dict | None = None, local_storage: dict | None = None):
    """A new page on the frontend; ``local_storage`` is set before any of the page's scripts runs."""
    page = context.new_page()
    if viewport:
        page.set_viewport_size(viewport)
    if local_storage:
        page.add_init_script(f"for (const [k, v] of Object.entries({json.dumps(local_storage)})) localStorage.setItem(k, v);")
    page.goto(url)
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=180_000)
    return page


def load_graph(page, workflow: dict, name: str | None = None) -> None:
    """``app.loadGraphData``; with ``name`` the graph opens in a tab of that name."""
    page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }", [copy.deepcopy(workflow), name])
    time.sleep(SETTLE_S)


def close_other_tabs(page) -> int:
    """Closes every open workflow but the active one; returns how many are open after."""
    return page.evaluate("""async () => {
        const store = window.app.extensionManager.workflow;
        for (const w of [...store.openWorkflows]) if (w !== store.activeWorkflow) await store.closeWorkflow(w);
        return store.openWorkflows.length;
    }""")


def open_tab_names(page) -> list[str]:
    return page.evaluate("window.app.extensionManager.workflow.openWorkflows.map(w => w.filename)")


def visible_dialog_texts(page) -> list[str]:
    return [d.inner_text() for d in page.locator(VISIBLE_DIALOGS).all()]


def visible_banners(page) -> list[str]:
    return [text for text in BANNER_TEXTS if page.locator(f"text={text} >> visible=true").count()]


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


def run_command(page, command_id: str) -> None:
    page.evaluate("async (id) => { await window.app.extensionManager.command.execute(id); }", command_id)


def set_settings(page, settings: dict) -> None:
    page.evaluate("async (pairs) => { for (const [k, v] of pairs) await window.app.extensionManager.setting.set(k, v); }",
                  list(settings.items()))


def get_settings(page, keys) -> dict:
    return dict(zip(keys, page.evaluate("(keys) => keys.map(k => window.app.extensionManager.setting.get(k))", list(keys))))


def graph_rect(page) -> tuple[float, float, float, float]:
    """The screen rectangle (x0, y0, x1, y1) around every node, title bars included."""
    return tuple(page.evaluate("""() => {
        const c = window.app.canvas, r = c.canvas.getBoundingClientRect(), corners = window.app.graph._nodes.flatMap(n => {
            const b = n.getBounding();
            return [c.ds.convertOffsetToCanvas([b[0], b[1]]), c.ds.convertOffsetToCanvas([b[0] + b[2], b[1] + b[3]])];
        });
        return [r.left + Math.min(...corners.map(p => p[0])), r.top + Math.min(...corners.map(p => p[1])),
                r.left + Math.max(...corners.map(p => p[0])), r.top + Math.max(...corners.map(p => p[1]))];
    }"""))


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


def fit_graph(page, margin: int = 16) -> float:
    """Zooms so the whole graph fills the canvas up to ``margin`` pixels, centred; returns the scale."""
    return page.evaluate("""(margin) => {
        const c = window.app.canvas, w = c.canvas.clientWidth, h = c.canvas.clientHeight;
        const boxes = window.app.graph._nodes.map(n => n.getBounding());
        const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
        const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
        const scale = Math.min((w - 2 * margin) / (x1 - x0), (h - 2 * margin) / (y1 - y0));
        c.ds.scale = scale;
        c.ds.offset = [w / 2 / scale - (x0 + x1) / 2, h / 2 / scale - (y0 + y1) / 2];
        c.setDirty(true, true);
        return scale;
    }""", margin)


def hide(page, selectors: tuple[str, ...]) -> None:
    """Hides page elements (overlays over the canvas) for the rest of the page's life."""
    page.add_style_tag(content=", ".join(selectors) + " { visibility: hidden !important; }")


def canvas_scale(page) -> float:
    return page.evaluate("window.app.canvas.ds.scale")


def write_settings_file(base_dir: Path, settings: dict = CLEAN_SETTINGS) -> Path:
    """The server-side settings of the default user, written before the server starts (what the frontend reads first)."""
    path = Path(base_dir) / "user" / "default" / "comfy.settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(settings, indent=2))
    os.replace(tmp, path)
    return path
