"""The bundled default corpus: English documentation that ships inside every Python interpreter.

- the reference topics of ``pydoc_data.topics`` (about 0.5 MB), one document per topic;
- the docstrings of the standard-library modules, extracted with ``ast`` (about 1.7 MB), one
  document per module (module, class and function docstrings, in source order).

No download, and the same text on every machine with the same Python version.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from retlm.utils import atomic_write

# Packages under the stdlib folder that are tests, tooling or vendored code, not documentation.
_SKIP_PARTS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "ensurepip",
    "turtledemo",
    "__pycache__",
    "pydoc_data",
    "idlelib",
    "config-3",
}
_MIN_CHARS = 200


def pydoc_topics() -> Iterator[tuple[str, str]]:
    """``(name, text)`` for each reference topic of ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic-{name}", topics[name].strip()


def _docstrings(tree: ast.Module) -> Iterator[str]:
    nodes: list[ast.AST] = [tree]
    while nodes:
        node = nodes.pop(0)
        doc = (
            ast.get_docstring(node, clean=True)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            else None
        )
        if doc:
            yield doc
        nodes[:0] = [
            child
            for child in ast.iter_child_nodes(node)
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        ]


def stdlib_docstrings(stdlib: Path | None = None) -> Iterator[tuple[str, str]]:
    """``(module name, text)`` for each standard-library module with enough docstring prose."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_PARTS.intersection(rel.parts) or rel.name.startswith("_") and rel.name != "__init__.py":
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        text = "\n\n".join(_docstrings(tree)).strip()
        if len(text) >= _MIN_CHARS:
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            yield f"module-{module}", text


def write_python_docs_corpus(out_dir: str | Path, *, progress: bool = True) -> Path:
    """Write the bundled corpus as one ``.txt`` file per document into ``out_dir``; return it.

    Idempotent: a file that already holds the right text is left alone, so a second call is cheap.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = [*pydoc_topics(), *stdlib_docstrings()]
    for name, text in tqdm(docs, desc="corpus", unit="doc", disable=not progress):
        target = out / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.txt"
        data = text.encode("utf-8")
        if target.exists() and hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest():
            continue
        atomic_write(target, lambda tmp, data=data: tmp.write_bytes(data))
    return out
