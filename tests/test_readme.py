"""The README's Python snippets run as written, and every relative link in the README and docs/ resolves
(documentation that cannot rot)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
@pytest.mark.heavy
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = SNIPPETS[index].replace("/tmp/retlm-readme-db", str(tmp_path / "db"))
    exec(compile(code, f"README.md[python snippet {index}]", "exec"), {"__name__": "__readme__"})


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page: headings lower-cased, punctuation dropped, spaces to hyphens,
    a repeated anchor numbered ``-1``, ``-2``, ..."""
    anchors: set[str] = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchor, n = slug, 0
            while anchor in anchors:
                n += 1
                anchor = f"{slug}-{n}"
            anchors.add(anchor)
    return anchors


def test_heading_anchors_follow_github():
    page = README.parent / "docs" / "benchmarks.md"
    assert "in-context-ralm-scoring-fast-path-vs-naive-loop" in heading_anchors(page)
    assert "pretrained-models" in heading_anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"
