"""Issue 23 item 3: every model file a workflow in ``workflows/`` loads can be fetched from where the workflow says.

Each loader node carries ``properties.models`` entries (name, url, directory) as ComfyUI's own templates do: the
frontend lists the files a user lacks with a download button (tests/test_browser_frontend.py checks it shows the
dialog for a missing file and none when the files are there). The pack's own trained LoRAs have no URL: their
workflow's note gives the command that makes them. Files with no public URL we know of are named, with the
reason, in ``model_downloads.NO_URL``.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from tests.helpers.e2e_server import load_workflow, workflow_files
from tdm_core.releases import RELEASES, container_of
from tests.helpers.model_downloads import (
    DOWNLOADS, LOADER_FOLDERS, MODEL_SUFFIXES, NO_URL, NODE_FOLDERS, PACK_MADE_LORAS, RELEASE_SOURCE, Z_IMAGE_DOWNLOADS,
)

# the only sources the frontend (1.32.9, MissingModelsWarning) downloads from; ours are all Hugging Face
ALLOWED_SOURCE = "https://huggingface.co/"
# a Hugging Face file URL: https://huggingface.co/<owner>/<repo>/resolve/main/<file>[?download=true]
HF_FILE_URL = re.compile(r"https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/resolve/main/(?P<file>[^?]+)(\?download=true)?")
WORKFLOWS = workflow_files()


def loaded_files(workflow: dict) -> list[tuple[dict, str]]:
    """``(node, file name)`` for every widget value that names a model file."""
    return [(node, value) for node in workflow["nodes"] if node["type"] not in ("Note", "MarkdownNote")
            for value in node.get("widgets_values", []) if isinstance(value, str) and value.endswith(MODEL_SUFFIXES)]


def notes(workflow: dict) -> list[str]:
    return [node["widgets_values"][0] for node in workflow["nodes"] if node["type"] == "Note"]


def test_each_loader_type_reads_one_folder():
    folders = {}
    for (node_type, _), folder in LOADER_FOLDERS.items():
        folders.setdefault(node_type, set()).add(folder)
    assert all(len(f) == 1 for f in folders.values()), folders


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_model_file_has_a_download_url_or_says_how_to_make_it(path):
    workflow = load_workflow(path)
    files = loaded_files(workflow)
    assert files, "the workflow loads no model file"
    for node, name in files:
        where = f"{path.name}: {node['type']} (node {node['id']}) loads {name}"
        assert node["type"] in NODE_FOLDERS, f"{where}: a loader model_downloads.LOADER_FOLDERS does not know"
        entries = [m for m in node["properties"].get("models", []) if m["name"] == name]
        if name in NO_URL or name in PACK_MADE_LORAS:
            assert entries == [], f"{where}: listed as having no URL, yet it has an entry"
            if name in PACK_MADE_LORAS:  # the note says which command of the pack makes it
                assert node["type"] == "TDMLoraLoader", where
                assert any(name in text and PACK_MADE_LORAS[name] in text for text in notes(workflow)), \
                    f"{where}: no note names it with `{PACK_MADE_LORAS[name]}`"
            continue
        assert len(entries) == 1, f"{where}: no properties.models entry (add its URL to model_downloads.DOWNLOADS)"
        entry = entries[0]
        assert set(entry) == {"name", "url", "directory"}, where
        assert entry["directory"] == NODE_FOLDERS[node["type"]], f"{where}: entry says models/{entry['directory']}"
        assert entry["url"].startswith(ALLOWED_SOURCE) and "/resolve/main/" in entry["url"], f"{where}: {entry['url']}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_entries_sit_on_the_node_that_loads_them(path):
    # the frontend only reads entries whose name is one of the node's widget values
    for node in load_workflow(path)["nodes"]:
        for entry in node["properties"].get("models", []):
            assert entry["name"] in node["widgets_values"], f"{path.name}: node {node['id']} has a stray entry {entry}"


def test_the_no_url_lists_are_in_use_and_apart():
    loaded = {name for path in WORKFLOWS for _, name in loaded_files(load_workflow(path))}
    assert set(NO_URL) <= loaded and set(PACK_MADE_LORAS) <= loaded, "drop names no workflow loads any more"
    assert not (set(NO_URL) | set(PACK_MADE_LORAS)) & (set(DOWNLOADS) | set(Z_IMAGE_DOWNLOADS))
    assert not set(NO_URL) & set(PACK_MADE_LORAS)


def installed_templates() -> dict[str, Path]:
    """ComfyUI's own workflow templates as installed with it (comfyui-workflow-templates 0.7.25's media packages)."""
    out = {}
    for package in ("comfyui_workflow_templates_media_image", "comfyui_workflow_templates_media_video",
                    "comfyui_workflow_templates_media_other", "comfyui_workflow_templates_media_api"):
        spec = importlib.util.find_spec(package)
        if spec is not None:
            for folder in spec.submodule_search_locations:
                out.update({p.name: p for p in (Path(folder) / "templates").glob("*.json")})
    return out


def template_entries(path: Path) -> list[dict]:
    workflow = json.loads(path.read_text())
    nodes = workflow.get("nodes", []) + [n for g in workflow.get("definitions", {}).get("subgraphs", []) for n in g["nodes"]]
    return [m for node in nodes for m in (node.get("properties") or {}).get("models", [])]


@pytest.mark.parametrize("table", [DOWNLOADS, Z_IMAGE_DOWNLOADS], ids=["downloads", "z_image_downloads"])
def test_base_model_urls_are_the_ones_comfyuis_templates_use(table):
    templates = installed_templates()
    assert templates, "ComfyUI's templates are not installed: run `bash scripts/bootstrap.sh`"
    for name, download in table.items():
        if download.source.startswith("ComfyUI template "):
            template = download.source.removeprefix("ComfyUI template ")
            assert template in templates, f"{name}: no installed template {template}"
            assert download.entry(name) in template_entries(templates[template]), f"{name}: {template} has another entry"
        else:  # the authors' releases: the repository and file tdm_core.releases names (the URLs were not fetched)
            assert download.source.startswith(RELEASE_SOURCE + ": "), download
            release = RELEASES[download.source.removeprefix(RELEASE_SOURCE + ": ")]
            url = HF_FILE_URL.fullmatch(download.url)
            assert url, f"{name}: not a Hugging Face file URL: {download.url}"
            assert f"{url['repo']}: {url['file']}" == release.file, f"{name}: {download.url} is not {release.name}'s {release.file}"
            assert download.directory == "loras" and container_of(name) in release.containers, (name, release.containers)


def test_loader_folders_are_the_folders_comfyui_lists_them_from(tmp_path):
    """A file put in ``models/<directory>`` shows up in the loader's list: the real ComfyUI nodes and the pack's loader."""
    from tests.helpers import comfy_inprocess

    pack = comfy_inprocess.load_pack()
    import folder_paths
    import nodes

    saved = {folder: folder_paths.folder_names_and_paths[folder] for folder in set(LOADER_FOLDERS.values())}
    try:
        for folder in saved:
            (tmp_path / folder).mkdir()
            (tmp_path / folder / f"tdm_probe_{folder}.safetensors").write_bytes(b"")
            folder_paths.folder_names_and_paths[folder] = ([str(tmp_path / folder)], saved[folder][1])
        folder_paths.filename_list_cache.clear()
        for (node_type, input_name), folder in LOADER_FOLDERS.items():
            node_cls = getattr(pack, node_type, None) or nodes.NODE_CLASS_MAPPINGS[node_type]
            spec = node_cls.INPUT_TYPES()["required"][input_name]
            choices = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
            probes = [c for c in choices if c.startswith("tdm_probe_")]
            assert probes == [f"tdm_probe_{folder}.safetensors"], (node_type, input_name, choices)
    finally:
        folder_paths.folder_names_and_paths.update(saved)
        folder_paths.filename_list_cache.clear()
