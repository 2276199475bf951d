"""Issue 23, item 2 (real server and frontend): the pack's node help pages reach the user.

Server: for each TDM node of ``/object_info``, the URLs frontend 1.32.9 asks for (built from the node's
``python_module``, in the frontend's order) end in HTTP 200 with the page's text. Browser: in the real
frontend, a TDM node is selected on the canvas and the selection toolbox's info button
(``data-testid="info-button"``, which opens the node help in the node library sidebar) is clicked; the help
panel then shows the page (not the node's description, which the frontend shows when no page is found).
"""
from __future__ import annotations

import re
import urllib.error
import urllib.request

import pytest

from tests.helpers import node_help as nh
from tests.helpers.e2e_server import shared_e2e_server
from tests.test_browser_frontend import browser, close_dialogs  # noqa: F401  (browser: the module-scoped chromium fixture)

pytestmark = pytest.mark.slow
PACK_PREFIX = "TDM"
HELP_PANEL = ".node-help-content"
INFO_BUTTON = "[data-testid='info-button']"


@pytest.fixture(scope="module")
def e2e():
    return shared_e2e_server()


@pytest.fixture(scope="module")
def tdm_nodes(e2e) -> dict[str, dict]:
    infos = e2e.server.get_json("/object_info")
    return {name: info for name, info in infos.items() if info.get("python_module", "").startswith("custom_nodes.") and name.startswith(PACK_PREFIX)}


def fetch_text(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def frontend_fetch(base_url: str, python_module: str, node_id: str) -> tuple[str, int, str]:
    """What the frontend's ``fetchCustomNodeHelp`` ends with: the first URL that answers 200, else the last."""
    for url in nh.help_urls(python_module, node_id):
        status, text = fetch_text(base_url + url)
        if status == 200:
            return url, status, text
    return url, status, text


def plain_first_paragraph(node_id: str) -> str:
    """The page's first paragraph as the rendered panel shows it (markdown emphasis and code marks removed)."""
    paragraph = nh.help_page(node_id).read_text().split("\n\n")[1]
    return " ".join(re.sub(r"[*`]", "", paragraph).split())


def test_the_server_serves_each_page_where_the_frontend_asks(e2e, tdm_nodes):
    assert len(tdm_nodes) >= 6, sorted(tdm_nodes)
    for node_id, info in tdm_nodes.items():
        url, status, text = frontend_fetch(e2e.server.url, info["python_module"], node_id)
        assert status == 200, f"{node_id}: {url} answered {status}"
        assert text == nh.help_page(node_id).read_text(), f"{node_id}: {url} is not the page in web/docs"


@pytest.fixture(scope="module")
def page(browser, e2e):  # noqa: F811
    page = browser.new_page()
    page.goto(e2e.server.url)
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=180_000)
    page.wait_for_timeout(1500)
    close_dialogs(page)
    return page


def select_new_node(page, node_id: str) -> None:
    page.evaluate("""(type) => {
        const app = window.app;
        app.graph.clear();
        const node = window.LiteGraph.createNode(type);
        // right of the help sidebar the previous click opened, so it does not cover this node's toolbox
        const canvas = app.canvas.canvas;
        node.pos = app.canvas.convertOffsetToCanvas([canvas.clientWidth * 0.6, canvas.clientHeight * 0.4]);
        app.graph.add(node);
        app.canvas.selectNode(node);
        app.canvas.setDirty(true, true);
    }""", node_id)


def open_help(page, node_id: str):
    select_new_node(page, node_id)
    page.locator(INFO_BUTTON).first.click(timeout=30_000)
    panel = page.locator(HELP_PANEL).first
    panel.wait_for(timeout=30_000)
    return panel


def wait_for_panel_text(page, text: str) -> None:
    page.wait_for_function("([sel, text]) => { const el = document.querySelector(sel);"
                           " return el && el.innerText.replace(/\\s+/g, ' ').includes(text); }", arg=[HELP_PANEL, text], timeout=30_000)


def test_control_without_the_page_the_panel_shows_the_description(page, tdm_nodes):
    # the control for the next test: when the help URLs fail, the frontend falls back to the node's
    # description, and the page's own text is not shown
    node_id = "TDMScheduler"
    page.route("**/docs/TDMScheduler*", lambda route: route.fulfill(status=404, body="not found"))
    try:
        panel = open_help(page, node_id)
        wait_for_panel_text(page, " ".join(tdm_nodes[node_id]["description"].split())[:80])
        assert plain_first_paragraph(node_id) not in " ".join(panel.inner_text().split())
    finally:
        page.unroute("**/docs/TDMScheduler*")


def test_the_info_button_opens_each_nodes_page_in_the_help_panel(page, tdm_nodes):
    fetched: list[tuple[str, int]] = []
    page.on("response", lambda response: fetched.append((response.url, response.status)) if "/docs/" in response.url else None)
    for node_id in sorted(tdm_nodes):
        panel = open_help(page, node_id)
        wait_for_panel_text(page, plain_first_paragraph(node_id))
        shown = " ".join(panel.inner_text().split())
        assert "Inputs" in shown and "Example" in shown, f"{node_id}: the panel shows {shown[:300]!r}"
        assert any(url.endswith(f"/docs/{node_id}.md") and status == 200 for url, status in fetched), f"{node_id}: fetched {fetched}"


def test_distill_seed_keeps_its_value_between_queues(page):
    # the frontend gives every input named seed a "control after generate: randomize" unless the schema says
    # otherwise; on TDM Distill that would make each queue a new run, so Cancel + queue again could never resume
    select_new_node(page, "TDMDistill")
    names = page.evaluate("() => window.app.canvas.selected_nodes ? Object.values(window.app.canvas.selected_nodes)[0].widgets.map(w => w.name) : []")
    assert "seed" in names and "control_after_generate" not in names, names
    select_new_node(page, "TDMKSampler")  # the control: a sampler's seed keeps its control
    names = page.evaluate("() => Object.values(window.app.canvas.selected_nodes)[0].widgets.map(w => w.name)")
    assert "control_after_generate" in names, names
