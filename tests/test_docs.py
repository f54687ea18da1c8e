"""The documentation stays whole: a guide per pipeline and per training script, and every relative link of the README
and of docs/ leads to a file that exists (and to a heading that exists, when it names one)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PIPELINES = ["segmentation_ensemble", "mask2image", "diffusion_features", "adaptdiff"]


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings inside code blocks
    return {_slug(match) for match in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def _links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            yield target


def test_every_pipeline_and_training_script_has_a_guide():
    for name in PIPELINES:
        assert (ROOT / "docs" / "pipelines" / f"{name}.md").is_file(), name
        assert (ROOT / "diffusers_retina" / "pipelines" / name / f"pipeline_{name}.py").is_file(), name
    for script in sorted((ROOT / "training").glob("*.py")):
        assert (ROOT / "docs" / "training" / f"{script.stem}.md").is_file(), f"no docs/training/{script.stem}.md"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in _anchors(destination):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_readme_is_a_page_of_quick_starts():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: move details to docs/"
    assert lines[5:9] == ["```bash", lines[6], lines[7], "```"] and lines[6].startswith("make demo") \
        and lines[7].startswith("make test"), "the README starts with the two set-up commands"
