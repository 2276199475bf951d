"""Issue 23 item 5: benchmarks/RESULTS.md is the one entry point to the measured results: it links every results
file, each linked file names the command that made it, and its at-a-glance numbers are those of the files."""
from __future__ import annotations

import re
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
INDEX = BENCH / "RESULTS.md"
GLANCE_SOURCES = {"digits": ("RESULTS_defaults.md", "digits"), "shapes": ("RESULTS_defaults.md", "shapes"),
                  "flow": ("RESULTS_defaults.md", "flow"), "video": ("RESULTS_video.md", "video")}


def links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)#]+)\)", text)


def table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the first markdown table row whose first cell starts with ``first_cell``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(first_cell):
            return cells
    raise AssertionError(f"no row starting with {first_cell!r}")


def teacher_section(text: str, teacher: str) -> str:
    """The text of ``### <teacher>: ...`` up to the next ``### ``."""
    match = re.search(rf"^### {teacher}:.*?(?=^### |\Z)", text, flags=re.S | re.M)
    assert match, f"no section for {teacher}"
    return match.group(0)


def test_every_results_file_is_linked_and_every_link_resolves():
    text = INDEX.read_text()
    linked = set(links(text))
    for target in linked:
        assert (BENCH / target).is_file(), f"RESULTS.md links {target}, which does not exist"
    unlinked = sorted(p.name for p in BENCH.glob("RESULTS_*.md") if p.name not in linked)
    assert not unlinked, f"results files RESULTS.md does not list: {unlinked}"


def test_each_linked_file_names_the_command_that_made_it():
    for target in set(links(INDEX.read_text())):
        if target.endswith(".md") and target.startswith("RESULTS"):
            assert "python -m benchmarks." in (BENCH / target).read_text(), f"{target} does not say which command made it"


def test_no_retired_teacher_and_no_retired_command():
    text = INDEX.read_text()
    assert "previous teacher" not in text.lower() and "run_all" not in text
    assert not (BENCH / "run_all.py").exists(), "benchmarks.defaults is the one quality benchmark"


def test_the_glance_table_holds_the_files_numbers():
    index = INDEX.read_text()
    for teacher, (source, section_name) in GLANCE_SOURCES.items():
        section = teacher_section((BENCH / source).read_text(), section_name)
        teacher_50, teacher_4 = table_row(section, "teacher 50 steps"), table_row(section, "teacher 4 steps")
        student = table_row(section, "TDM K=4, defaults, 500 it.")
        glance = table_row(index, f"{teacher} (")
        # columns: FD to real (teacher 50, teacher 4, student), FD to the teacher's 50 steps (teacher 4, student)
        expected = [teacher_50[2], teacher_4[2], student[2], teacher_4[3], student[3]]
        assert glance[2:] == expected, f"{teacher}: RESULTS.md says {glance[2:]}, {source} says {expected}"
