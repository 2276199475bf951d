"""The front page and its guides hold together (issue 23, "What to build" 1).

- The README's table of supported models links one guide per row, every guide it links exists, and every guide in
  ``docs/models/`` is linked from it; each guide has the parts a newcomer looks for (the command, the files, memory,
  what was checked and on what), and its command is one the replay test runs (``tests/test_readme_commands.py``).
- Every relative link and picture in ``README.md`` and ``docs/**/*.md`` resolves to a file, and a link to a heading
  (``page.md#heading``, ``#heading``) to a heading of that page.
- Every code span that names an example workflow (``sd15_tdm_distill``, ``z_image_tdmr1_release``,
  ``workflows/sd15_img2img.json``) names a file in ``workflows/``: the link check leaves code spans out.
- A guide's memory rows are the rows of the trainer guide's tables (``docs/training.md``), so the two cannot drift.

Each check is a function of the files it reads, so the negative controls below run it on a broken copy.
"""
from __future__ import annotations

import re
from pathlib import Path

from tests.helpers.readme_commands import commands_in

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDES = ROOT / "docs" / "models"
TRAINING_DOC = ROOT / "docs" / "training.md"
WORKFLOWS_DIR = ROOT / "workflows"
MODEL_TABLE_HEADING = "## Supported models"
GUIDE_SECTIONS = ("## Distil it on the command line", "## The files, and where ComfyUI keeps them", "## Memory",
                  "## What was checked, and on what")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCED = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# a code span that names an example workflow: any workflows/<name>.json, or a name the workflows' naming marks
# (<model>_tdm_<kind>, <...>_release), with or without .json; a bare name outside that naming (`sd15_img2img`,
# `tdm_unify_1_and_4_steps`) or a typo that leaves it (`..._releases`) is not recognised: write workflows/<name>.json
WORKFLOW_SPAN = re.compile(r"workflows/(?P<path>[^/`]+)\.json|(?P<name>[a-z0-9_]+(?:_tdm_[a-z0-9_]+|_release))(?:\.json)?")


def documentation_pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level ("" if absent)."""
    if f"\n{heading}\n" not in f"\n{text}":
        return ""
    level = heading.split(" ", 1)[0]
    body = f"\n{text}".split(f"\n{heading}\n", 1)[1]
    return re.split(rf"\n#{{1,{len(level)}}} ", body, maxsplit=1)[0]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCED.sub("", page.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def links(page: Path) -> list[str]:
    """The link and picture targets of a page, code blocks and code spans left out."""
    return LINK.findall(INLINE_CODE.sub("", FENCED.sub("", page.read_text())))


def broken_links(pages: list[Path]) -> list[str]:
    broken = []
    for page in pages:
        for target in links(page):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not this test's business
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.name}: {target} (no heading '#{anchor}' in {resolved.name})")
    return broken


def workflow_names(page: Path) -> list[str]:
    """The example workflows a page's code spans name (code blocks left out)."""
    spans = [span.strip("`") for span in INLINE_CODE.findall(FENCED.sub("", page.read_text()))]
    return [m["path"] or m["name"] for m in map(WORKFLOW_SPAN.fullmatch, spans) if m]


def missing_workflows(pages: list[Path], workflows_dir: Path = WORKFLOWS_DIR) -> list[str]:
    return [f"{page.name}: `{name}` (no {workflows_dir.name}/{name}.json)"
            for page in pages for name in workflow_names(page) if not (workflows_dir / f"{name}.json").is_file()]


def model_table_guides(readme: Path = README) -> list[Path]:
    """The guide each row of the README's model table links (one per row; a row without one fails)."""
    rows = [line for line in section(readme.read_text(), MODEL_TABLE_HEADING).splitlines()
            if line.startswith("|") and "---" not in line][1:]
    assert rows, f"{readme.name} has no table under {MODEL_TABLE_HEADING!r}"
    guides = []
    for row in rows:
        linked = [t for t in LINK.findall(row) if t.startswith("docs/models/")]
        assert len(linked) == 1, f"model table row links {linked}, not one guide: {row}"
        guides.append(readme.parent / linked[0])
    return guides


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("|---")]


def test_readme_model_table_links_a_guide_each_and_every_guide():
    guides = model_table_guides()
    missing = [str(g.relative_to(ROOT)) for g in guides if not g.is_file()]
    assert not missing, f"the README's model table links guides that do not exist: {missing}"
    unlinked = sorted(p.name for p in GUIDES.glob("*.md") if p not in guides)
    assert not unlinked, f"guides in docs/models/ the README's model table does not link: {unlinked}"
    assert len(set(guides)) >= 9


def test_every_guide_has_its_parts_and_a_command():
    for guide in sorted(GUIDES.glob("*.md")):
        text = guide.read_text()
        absent = [h for h in GUIDE_SECTIONS if not section(text, h).strip()]
        assert not absent, f"{guide.name} lacks {absent}"
        commands = commands_in(guide)
        assert any(c.program == "distill" for c in commands), f"{guide.name} gives no training.distill command"
        assert "Real weights: none." in section(text, "## What was checked, and on what"), guide.name


def test_every_relative_link_resolves():
    pages = documentation_pages()
    assert len(pages) >= 15 and sum(len(links(p)) for p in pages) >= 50  # the pages and their links are read
    broken = broken_links(pages)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_workflow_a_page_names_exists():
    pages = documentation_pages()
    named = {name for page in pages for name in workflow_names(page)}
    assert {"sd15_tdm_distill", "z_image_tdmr1_release", "sd3_tdm_lora", "flux_tdm_lora"} <= named, named  # spans are read
    missing = missing_workflows(pages)
    assert not missing, "workflows the docs name that workflows/ lacks:\n" + "\n".join(missing)


def test_guide_memory_rows_are_the_trainer_guides_rows():
    tables = set(table_rows(section(TRAINING_DOC.read_text(), "## Memory per family (computed, not measured)"))
                 + table_rows(section(TRAINING_DOC.read_text(), "## The prompt cache")))
    assert len(tables) >= 20
    for guide in sorted(GUIDES.glob("*.md")):
        rows = table_rows(section(guide.read_text(), "## Memory"))
        assert len(rows) >= 4, (guide.name, rows)  # two headers, at least one row of each table
        differ = [r for r in rows if r not in tables]
        assert not differ, f"{guide.name}'s memory rows are not in docs/training.md's tables: {differ}"


# --- negative controls: each check fails on a broken copy ----------------------------------------------------
def test_a_broken_link_a_missing_anchor_and_a_missing_guide_are_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](page.md#title) [ok too](#title) ![gone](missing.png) [bad anchor](#nowhere)\n"
                    "`[in code](missing_too.md)`\n")
    assert [b.split(": ", 1)[1] for b in broken_links([page])] == [
        "missing.png (no such file)", "#nowhere (no heading '#nowhere' in page.md)"]

    readme = tmp_path / "README.md"
    readme.write_text(README.read_text().replace("docs/models/flux.md", "docs/models/flux_missing.md", 1))
    guides = model_table_guides(readme)
    assert tmp_path / "docs/models/flux_missing.md" in guides and not (tmp_path / "docs/models/flux_missing.md").exists()


def test_a_workflow_name_without_its_file_is_found(tmp_path):
    (tmp_path / "sd15_tdm_distill.json").write_text("{}")
    page = tmp_path / "page.md"
    page.write_text("`sd15_tdm_distill` `sd15_tdm_distil` `workflows/sd15_tdm_distill.json` `workflows/gone.json` "
                    "`z_image_tdmr1_release.json` `summary.json` `tdm_core.iteration`\n```\nsd3_tdm_lora\n```\n")
    assert workflow_names(page) == ["sd15_tdm_distill", "sd15_tdm_distil", "sd15_tdm_distill", "gone", "z_image_tdmr1_release"]
    assert [m.split(": ", 1)[1] for m in missing_workflows([page], tmp_path)] == [
        f"`{n}` (no {tmp_path.name}/{n}.json)" for n in ("sd15_tdm_distil", "gone", "z_image_tdmr1_release")]


def test_slug_is_githubs():
    assert slug(" Memory per family (computed, not measured)") == "memory-per-family-computed-not-measured"
    assert slug("Training: `python -m training.distill`") == "training-python--m-trainingdistill"
    assert slug("Does it copy its teacher, step by step?") == "does-it-copy-its-teacher-step-by-step"
