"""The trainer commands the documentation tells a user to run, read from the Markdown as a user copies them.

A command is any code in ``README.md``, ``docs/**/*.md`` (the model guides in ``docs/models/`` included) or
``training/configs/README.md`` that runs
``training.distill``, ``training.sample`` or ``training.convert`` (``-m training.X`` or ``training/X.py``):

- in fenced blocks (```` ``` ````) and indented blocks (4 spaces or a tab), lines joined at a trailing ``\\``,
  ``#`` comment lines left out;
- in inline code spans (`` `...` ``) that give the module arguments (a bare `` `python -m training.sample` `` is
  the program's name in a sentence, not a command); an optional part written ``[--flag value]`` gives two
  commands, one without it and one with it.

Nothing is hard-coded: whatever commands the files hold today are what the replay test runs.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = re.compile(r"(?:-m\s+training\.|training/)(distill|sample|convert)(?:\.py)?\b")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
OPTIONAL = re.compile(r"\s*\[([^\[\]]+)\]")


@dataclass(frozen=True)
class Command:
    source: str  # "README.md:132"
    text: str  # as written, continuation lines joined (one variant of its optional parts)
    program: str  # distill, sample or convert
    argv: tuple[str, ...]  # the shell words of ``text``
    variant: str = ""  # "", or which optional part it is without / with

    @property
    def id(self) -> str:
        return "-".join(filter(None, (self.source, self.program, self.variant)))


def documentation_files(root: Path = ROOT) -> list[Path]:
    files = [root / "README.md", *sorted((root / "docs").rglob("*.md")), root / "training" / "configs" / "README.md"]
    return [f for f in files if f.is_file()]


def _variants(text: str) -> list[tuple[str, str]]:
    """``a [b] c`` -> ``("a c", "without b")`` and ``("a b c", "with b")``; every optional part in or out together."""
    optional = OPTIONAL.findall(text)
    if not optional:
        return [(text, "")]
    parts = " ".join(optional)
    return [(OPTIONAL.sub("", text), f"without {parts}"), (OPTIONAL.sub(lambda m: " " + m.group(1), text), f"with {parts}")]


def _code_lines(lines: list[str]):
    """``(line number, text)`` of each line of a fenced or indented code block, continuation lines joined."""
    in_fence, in_indented, previous_blank, pending, start = False, False, True, None, 0
    for number, line in enumerate(lines, 1):
        if pending is None and FENCE.match(line):
            in_fence, in_indented, previous_blank = not in_fence, False, False
            continue
        if not in_fence:  # an indented block starts after a blank line and runs while lines stay indented
            in_indented = line.startswith(("    ", "\t")) and (previous_blank or in_indented)
        previous_blank = not line.strip()
        if pending is not None:
            pending += " " + line.strip()
        elif in_fence or in_indented:
            pending, start = line.strip(), number
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        if pending and not pending.startswith("#"):
            yield start, pending
        pending = None


def commands_in(path: Path, root: Path = ROOT) -> list[Command]:
    """Every trainer command in one Markdown file, in the order written."""
    name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    lines = path.read_text().splitlines()
    code = list(_code_lines(lines))
    found = [(n, text) for n, text in code if PROGRAM.search(text)]
    code_numbers = {n for n, _ in code}
    in_fence = False
    for number, line in enumerate(lines, 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence or number in code_numbers:
            continue
        for span in INLINE.findall(line):
            match = PROGRAM.search(span)
            if match and span[match.end():].strip():  # the module with arguments: a command
                found.append((number, span.strip()))
    return [Command(f"{name}:{number}", variant, PROGRAM.search(variant).group(1), tuple(shlex.split(variant)), label)
            for number, text in sorted(found) for variant, label in _variants(text)]


def documented_commands(root: Path = ROOT) -> list[Command]:
    return [c for f in documentation_files(root) for c in commands_in(f, root)]
