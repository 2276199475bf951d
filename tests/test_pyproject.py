"""pyproject.toml is ready for the Comfy Registry (issue 23, item 7): read by ComfyUI's own reader of the file
(``comfy_config.config_parser``, the twin of comfy-cli's publishing parser), every field the registry's spec
(docs.comfy.org/registry/specifications) requires or the issue asks for is there and well formed, the icon is
a real file of the repository at the URL ``Icon`` names, and setuptools accepts the [project] table."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image, ImageChops

from tests.helpers import comfy_inprocess as h

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BRANCH = "main"  # the branch the registry's icon URL reads from
NODE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*$")  # the spec's node-id rule
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
ICON_MAX_SIDE = 400


@pytest.fixture(scope="module")
def config():
    root = str(h.comfy_dir())
    if root not in sys.path:  # as tests/helpers/comfy_inprocess.setup_comfy puts it, without loading a model stack
        sys.path.insert(0, root)
    from comfy_config import config_parser

    return config_parser.extract_node_configuration(str(ROOT))


def icon_path(icon_url: str, repository: str) -> Path:
    """The repository file a raw.githubusercontent.com URL of ``repository``'s default branch names."""
    owner_name = urlparse(repository).path.strip("/")
    prefix = f"https://raw.githubusercontent.com/{owner_name}/{DEFAULT_BRANCH}/"
    assert icon_url.startswith(prefix), f"Icon {icon_url} is not a raw URL of {repository} on {DEFAULT_BRANCH}: use {prefix}<path>"
    return ROOT / icon_url[len(prefix):]


def test_registry_fields_are_present_and_well_formed(config):
    project, comfy = config.project, config.tool_comfy
    assert NODE_ID.match(project.name) and len(project.name) < 100, project.name
    assert SEMVER.match(project.version), project.version
    assert project.description.strip()
    assert project.license.text or project.license.file
    assert urlparse(project.urls.repository).netloc == "github.com", project.urls.repository
    for url in (project.urls.documentation, project.urls.issues, project.urls.homepage):
        assert url.startswith(project.urls.repository), url
    assert comfy.publisher_id.strip() and comfy.display_name.strip() and comfy.icon.strip()
    assert project.supported_os == ["OS Independent"]  # the classifier the registry's parser keeps
    assert all((ROOT / path).exists() for path in comfy.includes), comfy.includes


def test_icon_is_a_small_square_image_of_the_repository(config):
    path = icon_path(config.tool_comfy.icon, config.project.urls.repository)
    assert path.is_file(), f"{path} is missing: run scripts/make_icon.py"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width == image.height <= ICON_MAX_SIDE, image.size


def test_icon_is_what_its_script_draws(config):
    spec = importlib.util.spec_from_file_location("make_icon", ROOT / "scripts" / "make_icon.py")
    make_icon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_icon)
    with Image.open(icon_path(config.tool_comfy.icon, config.project.urls.repository)) as committed:
        assert ImageChops.difference(committed.convert("RGB"), make_icon.draw_icon()).getbbox() is None, \
            "docs/icon.png differs from scripts/make_icon.py's drawing: rerun the script"


def test_license_file_exists_and_setuptools_accepts_the_project_table():
    from setuptools.config.pyprojecttoml import read_configuration

    project = read_configuration(ROOT / "pyproject.toml")["project"]
    assert project["license"] == "MIT"
    for name in project["license-files"]:
        assert "MIT License" in (ROOT / name).read_text()
