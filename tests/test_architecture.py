"""The package's shape, as docs/architecture.md draws it: imports point down the layers only, and no
module grows past 500 lines (issue #11). Parsed from the source, so a new back-pointing import or an
overgrown file fails here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "retlm"
MAX_LINES = 500

# Lowest first. A module may import from its own level or any level below, never above. The package
# root (retlm/__init__.py, the public API) re-exports from every level and is exempt.
LEVELS = [
    {"utils", "errors", "compat", "checksums", "integrity", "locking", "options"},
    {"ops"},
    {"layers"},
    {"models", "tokenization"},
    {"retrieval"},
    {"data"},
    {"generation", "training"},
    {"corpus", "demo_checks", "demo_pretrained", "demo", "serve"},
    {"cli", "__main__"},
]
LEVEL_OF = {name: rank for rank, names in enumerate(LEVELS) for name in names}


def top_level_part(path: Path) -> str:
    """retlm/models/retro/cache.py -> "models"; retlm/utils.py -> "utils"."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def retlm_imports(path: Path) -> set[str]:
    """The retlm parts (``models``, ``ops``, ...) that a file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        found.update(m.split(".")[1] for m in modules if m.startswith("retlm.") and m.count(".") >= 1)
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_part_of_the_package_has_a_level():
    parts = {top_level_part(p) for p in SOURCES}
    assert parts <= set(LEVEL_OF), (
        f"add {sorted(parts - set(LEVEL_OF))} to LEVELS (and to docs/architecture.md)"
    )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path):
    own = LEVEL_OF[top_level_part(path)]
    upward = sorted(part for part in retlm_imports(path) if LEVEL_OF.get(part, -1) > own)
    assert not upward, f"{path.relative_to(PACKAGE.parent)} (level {own}) imports from above: {upward}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_longer_than_500_lines(path: Path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines; split it by job"
