"""Issue 23 items 3-4: the pictures ``python -m scripts.pictures`` takes are there, one thumbnail per workflow.

The template browser of frontend 1.32.9 shows ``workflows/<name>.jpg`` for ``workflows/<name>.json`` (served at
``/api/workflow_templates/<pack>/<name>.jpg``; tests/test_browser_frontend.py checks the cards load them). The
script checks, while it takes them, that the page shows one tab, no dialog, no banner and every node; this test
checks that what it wrote is present and current in shape.
"""
from __future__ import annotations

from PIL import Image

from scripts.pictures import DOC_PICTURES, DOC_VIEWPORT, DOCS_DIR, THUMBNAIL_SIZE
from tests.helpers.e2e_server import WORKFLOWS_DIR, workflow_files

REGENERATE = "regenerate with `.venv/bin/python -m scripts.pictures`"


def test_every_workflow_has_a_thumbnail_and_no_thumbnail_lacks_its_workflow():
    workflows = {p.stem for p in workflow_files()}
    thumbnails = {p.stem for p in WORKFLOWS_DIR.glob("*.jpg")}
    assert thumbnails == workflows, f"{REGENERATE}: missing {sorted(workflows - thumbnails)}, stray {sorted(thumbnails - workflows)}"
    for name in sorted(thumbnails):
        with Image.open(WORKFLOWS_DIR / f"{name}.jpg") as image:
            assert (image.format, image.size) == ("JPEG", (THUMBNAIL_SIZE, THUMBNAIL_SIZE)), name


def test_the_docs_pictures_are_whole_frontend_screenshots():
    for name in DOC_PICTURES:
        assert (WORKFLOWS_DIR / f"{name}.json").is_file(), name
        with Image.open(DOCS_DIR / f"workflow_{name}.png") as image:
            assert image.size == (DOC_VIEWPORT["width"], DOC_VIEWPORT["height"]), f"{name}: {REGENERATE}"
