"""The README's Python snippets run as written (documentation that cannot rot)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = SNIPPETS[index].replace("/tmp/retlm-readme-db", str(tmp_path / "db"))
    exec(compile(code, f"README.md[python snippet {index}]", "exec"), {"__name__": "__readme__"})
