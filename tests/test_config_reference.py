"""docs/config.md is the rendering of the config dataclasses, and the docs' links resolve."""

import dataclasses
import re
from pathlib import Path

import decaf_ray.config
from decaf_ray.config_reference import (DOC_PATH, REGENERATE, Section, anchor, field_docs,
                                        render, render_section, sections)
from decaf_ray.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


def test_docs_config_md_is_the_rendering():
    assert DOC_PATH.is_file(), f"docs/config.md is missing; create it with `{REGENERATE}`"
    assert DOC_PATH.read_text() == render(), (
        f"docs/config.md is out of date with the config dataclasses; regenerate it with "
        f"`{REGENERATE}`")


def test_every_section_dataclass_and_task_kind_has_a_section():
    classes = {s.cls for s in sections()}
    in_config = {obj for obj in vars(decaf_ray.config).values()
                 if dataclasses.is_dataclass(obj) and obj.__module__ == "decaf_ray.config"}
    assert in_config and in_config <= classes
    titles = [s.title for s in sections()]
    kinds = [t for t in titles if t.startswith("task: ") and "," not in t]
    assert kinds == [f"task: {k}" for k in TASKS]
    assert "task: instruct, judge" in titles  # a task's nested section gets a table too
    assert "Sweep file" in titles and "Pretrain file" in titles


@dataclasses.dataclass(frozen=True)
class _Example:
    """An example section."""

    documented: int = 2
    """First line,
    second line with ||B||^2."""
    undocumented: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])
    optional: float | None = None
    """One line."""


def test_field_docs_are_the_literals_after_the_fields():
    assert field_docs(_Example) == {"documented": "First line,\nsecond line with ||B||^2.",
                                    "optional": "One line."}


def test_a_row_per_field_with_key_type_default_and_doc_on_one_line():
    text = render_section(Section("ex", _Example, "ex"))
    rows = [line for line in text.splitlines() if line.startswith("| `ex.")]
    assert rows == [
        "| `ex.documented` | int | `2` | First line, second line with \\|\\|B\\|\\|^2. |",
        "| `ex.undocumented` | list[string] | `[q, v]` |  |",
        "| `ex.optional` | number \\| null | `null` | One line. |",
    ]
    assert "An example section." in text


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _headings(path: Path) -> set[str]:
    # GitHub's anchors: repeated headings get -1, -2, ... suffixes.
    seen: dict[str, int] = {}
    out = set()
    for line in _outside_code(path.read_text()):
        if m := re.match(r"#{1,6}\s+(.*)", line):
            slug = anchor(m.group(1))
            out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return out


def _outside_code(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def test_every_relative_link_in_readme_and_docs_resolves():
    broken = []
    for md in _markdown_files():
        for line in _outside_code(md.read_text()):
            for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
                if re.match(r"[a-z]+:", target):  # https:, mailto:
                    continue
                path, _, fragment = target.partition("#")
                dest = (md.parent / path).resolve() if path else md
                if not dest.exists():
                    broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
                elif fragment and dest.suffix == ".md" and fragment not in _headings(dest):
                    broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
