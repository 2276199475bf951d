"""The TDM Prompt List node's work: prompts from a multiline text and / or a ``.txt`` / ``.jsonl`` file in
ComfyUI's input folder, each encoded the way stock ``CLIPTextEncode`` encodes it (``clip.tokenize`` then
``encode_from_tokens_scheduled``), plus the empty prompt's conditioning (TDM Distill's ``negative``)."""
from __future__ import annotations

import hashlib
import json
import os

import folder_paths

NO_FILE = "(none)"
PROMPT_FILE_EXTENSIONS = (".txt", ".jsonl")
JSONL_KEYS = ("prompt", "text")  # the first a row has is its prompt


def prompt_files() -> list[str]:
    """The ``.txt`` / ``.jsonl`` files of ComfyUI's input folder (sub-folders included, '/'-separated), sorted."""
    root = folder_paths.get_input_directory()
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith(PROMPT_FILE_EXTENSIONS) and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def prompt_file_path(name: str) -> str:
    """The full path of a listed prompt file; anything outside the input folder is refused."""
    root = os.path.realpath(folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"prompt_file {name!r} is outside ComfyUI's input folder: put the file in {root} and pick it from the list")
    if not os.path.isfile(path):
        raise ValueError(f"prompt_file {name!r} was not found in ComfyUI's input folder ({root}): copy it there and refresh the node")
    return path


def lines_of_text(text: str) -> list[str]:
    """One prompt per line, surrounding spaces removed, blank lines skipped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def jsonl_prompts(text: str, name: str) -> list[str]:
    """One JSON object per line with a ``prompt`` or ``text`` string; blank lines skipped."""
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name} line {number} is not valid JSON ({err.msg}): each line must be an object like "
                             '{"prompt": "a red cat"}') from None
        key = next((k for k in JSONL_KEYS if isinstance(row, dict) and k in row), None)
        if key is None or not isinstance(row[key], str):
            raise ValueError(f'{name} line {number} has no "prompt" or "text" string: write it as {{"prompt": "a red cat"}}')
        if row[key].strip():
            prompts.append(row[key].strip())
    return prompts


def file_prompts(name: str) -> list[str]:
    path = prompt_file_path(name)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return jsonl_prompts(text, name) if name.lower().endswith(".jsonl") else lines_of_text(text)


def collect_prompts(text: str, prompt_file: str) -> list[str]:
    """The text's lines, then the file's prompts (when a file is chosen)."""
    prompts = lines_of_text(text or "")
    if prompt_file and prompt_file != NO_FILE:
        prompts += file_prompts(prompt_file)
    if not prompts:
        raise ValueError("no prompts: write one prompt per line in text, or pick a .txt / .jsonl file from ComfyUI's input folder")
    return prompts


def encode(clip, text: str) -> list:
    """ComfyUI's CONDITIONING of ``text``, as stock CLIPTextEncode makes it."""
    if clip is None:
        raise ValueError("clip input is empty: connect the CLIP output of your checkpoint or text-encoder loader")
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def encode_prompts(clip, text: str, prompt_file: str) -> tuple[list, list]:
    """``(one conditioning per prompt, the empty prompt's conditioning)``."""
    return [encode(clip, prompt) for prompt in collect_prompts(text, prompt_file)], encode(clip, "")


def file_fingerprint(prompt_file: str) -> str:
    """Changes when the chosen file's contents change, so ComfyUI re-runs the node for an edited file."""
    if not prompt_file or prompt_file == NO_FILE:
        return ""
    try:
        with open(prompt_file_path(prompt_file), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (OSError, ValueError):
        return "missing"  # execute then raises the clear error
