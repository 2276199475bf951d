"""Issue 3, test group 4: the real ComfyUI frontend (1.32.9) in a real headless Chromium.

The browser is Debian's chromium (``scripts/install_browser.sh``, run by the module fixture below),
driven by playwright through ``executable_path`` (tests/helpers/frontend_page.py). The page is the
frontend served by the shared end-to-end server (tests/helpers/e2e_server.py), which has every model
file the workflows load, so their ``properties.models`` entries open no "missing models" dialog.
"""
from __future__ import annotations

import copy
import time
import urllib.request

import pytest

from scripts.pictures import take_pictures
from tests.helpers import frontend_page as fp
from tests.helpers.comfy_server import execution_error
from tests.helpers.e2e_server import WORKFLOWS_DIR, is_sd15_workflow, load_workflow, shared_e2e_server, workflow_files
from tests.helpers.frontend_page import (  # noqa: F401  (close_dialogs: tests/test_node_help_e2e.py imports it from here)
    ERROR_TOASTS, close_dialogs, graph_node_types, load_graph, unregistered_node_types, visible_dialog_texts,
)

pytestmark = pytest.mark.slow

PACK = "comfyui-tdm"  # the pack's folder name in custom_nodes: the template browser's section and URL
THUMBNAILS_IN_VIEW = 4  # the first row of cards at 1600 x 900 (the browser loads the others as they scroll into view)


@pytest.fixture(scope="module")
def browser():
    fp.install_browser()
    with fp.browser() as context:
        yield context


@pytest.fixture(scope="module")
def e2e():
    return shared_e2e_server()


@pytest.fixture(scope="module")
def page(browser, e2e):
    return fp.open_frontend(browser, e2e.server.url)


# --- tests (they share one page, in this order) ---------------------------------------------
def test_template_browser_lists_and_opens_the_pack_workflows(page, e2e):
    # each card asks for the thumbnail beside its workflow (workflows/<name>.jpg, written by scripts/pictures.py)
    thumbnails: list[tuple[str, int, str]] = []
    page.on("response", lambda r: thumbnails.append((r.url.split("/")[-1], r.status, r.headers.get("content-type", "")))
            if f"/workflow_templates/{PACK}/" in r.url and not r.url.endswith(".json") else None)
    # on a first visit the frontend opens its template browser; the pack has its own section there
    dialog = page.locator(".p-dialog").filter(has_text="Templates")
    if dialog.count() == 0:
        fp.run_command(page, "Comfy.BrowseTemplates")
    dialog.first.wait_for(timeout=60_000)
    dialog.first.get_by_text(PACK, exact=True).first.click()
    for path in workflow_files():
        dialog.first.get_by_text(path.stem, exact=True).first.wait_for(timeout=30_000)
    deadline = time.monotonic() + 30
    while len(thumbnails) < THUMBNAILS_IN_VIEW and time.monotonic() < deadline:  # the cards in view load theirs
        time.sleep(0.5)
    expected = {f"{p.stem}.jpg" for p in workflow_files()}
    assert len(thumbnails) >= THUMBNAILS_IN_VIEW and all(
        name in expected and status == 200 and kind == "image/jpeg" for name, status, kind in thumbnails), thumbnails
    drawn = page.evaluate("[...document.querySelectorAll('.p-dialog img')].filter(i => i.complete && i.naturalWidth === 512).length")
    assert drawn >= THUMBNAILS_IN_VIEW
    for name in expected:  # and the server has one for every workflow
        with urllib.request.urlopen(f"{e2e.server.url}/api/workflow_templates/{PACK}/{name}", timeout=30) as response:
            assert response.read(3) == b"\xff\xd8\xff", name  # a JPEG
    # opening a card loads the file the server serves from the pack's workflows/ folder
    dialog.first.get_by_text("sd15_tdm_ksampler", exact=True).first.click()
    page.wait_for_function("window.app.graph._nodes.some(n => n.type === 'TDMKSampler')", timeout=30_000)
    time.sleep(fp.SETTLE_S)
    close_dialogs(page)
    assert sorted(t for t in graph_node_types(page)) == sorted(n["type"] for n in load_workflow(
        next(p for p in workflow_files() if p.stem == "sd15_tdm_ksampler"))["nodes"])


def with_missing_file(workflow: dict, node_type: str, name: str) -> tuple[dict, str]:
    """The workflow with ``node_type``'s file renamed to ``name`` (a file the server lacks), widget and entry alike."""
    workflow = copy.deepcopy(workflow)
    node = next(n for n in workflow["nodes"] if n["type"] == node_type)
    entry = node["properties"]["models"][0]
    node["widgets_values"][node["widgets_values"].index(entry["name"])] = entry["name"] = name
    return workflow, entry["url"]


def missing_file_dialog(page, workflow_name: str, node_type: str, name: str) -> tuple[list[str], str]:
    """Load the workflow with ``node_type``'s file renamed to ``name`` (missing on the server); returns the visible
    dialogs' texts and the entry's URL. The caller checks the dialog, then closes it."""
    close_dialogs(page)
    workflow, url = with_missing_file(load_workflow(WORKFLOWS_DIR / f"{workflow_name}.json"), node_type, name)
    load_graph(page, workflow)
    return visible_dialog_texts(page), url


def test_a_missing_model_file_opens_the_download_dialog_with_its_url(page):
    # the control for the no-dialog check below: the frontend reads properties.models and offers the download
    texts, url = missing_file_dialog(page, "sd15_tdm_ksampler", "CheckpointLoaderSimple", "tdm_not_on_this_server-fp16.safetensors")
    assert any("checkpoints / tdm_not_on_this_server-fp16.safetensors" in text for text in texts), texts
    assert page.locator(f".p-dialog:visible button[title='{url}']").count() == 1  # the download button
    close_dialogs(page)


def test_a_missing_release_pt_is_listed_without_a_download_button(page):
    # frontend 1.32.9 downloads only .safetensors / .sft names: a missing .pt release is named, with its folder
    texts, _ = missing_file_dialog(page, "sd15_tdm_dreamshaper_release", "TDMLoraLoader", "tdm_not_on_this_server.pt")
    assert any("loras / tdm_not_on_this_server.pt" in text and "Only allowed suffixes" in text for text in texts), texts
    close_dialogs(page)


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




def test_pictures_show_one_tab_no_dialog_and_the_whole_graph(browser, e2e, tmp_path):
    """scripts/pictures.py on this server: it refuses a page with another tab, a dialog, an error or a node out of view."""
    from PIL import Image

    workflows = {p.stem: load_workflow(p) for p in workflow_files() if p.stem in ("sd15_tdm_distill", "sd15_img2img")}
    written = take_pictures(browser, e2e.server.url, workflows, ("sd15_tdm_distill",), tmp_path, tmp_path)
    assert sorted(p.name for p in written) == ["sd15_img2img.jpg", "sd15_tdm_distill.jpg", "workflow_sd15_tdm_distill.png"]
    with Image.open(tmp_path / "workflow_sd15_tdm_distill.png") as picture:
        assert picture.size == (1920, 1080)
    for name in ("sd15_img2img.jpg", "sd15_tdm_distill.jpg"):
        with Image.open(tmp_path / name) as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.size == (512, 512)
            assert max(thumbnail.convert("L").getextrema()) > 150  # nodes drawn, not a blank canvas
