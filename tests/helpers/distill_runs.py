"""A tiny SD1.5 teacher with a prompt file, and the common command line of the trainer's run tests."""
from __future__ import annotations

from pathlib import Path

from tests.helpers.tiny_models import save_tiny_pipeline

TINY_RUN_FLAGS = ("--lora-rank", "4", "--batch-size", "2", "--validate-every", "0")


def tiny_teacher(root: Path) -> dict:
    prompts = root / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\nthe sea at night\n")
    return {"model": save_tiny_pipeline("sd15", root / "sd15"), "prompts": prompts}


def distill_args(teacher: dict, output: Path, *extra) -> list[str]:
    return ["--model", str(teacher["model"]), "--prompts", str(teacher["prompts"]), "--output", str(output),
            *TINY_RUN_FLAGS, *map(str, extra)]
