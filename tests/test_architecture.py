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
    {"models", "tokenization", "retrieval"},  # siblings: neither imports the other (a test below)
    {"data"},
    {"generation", "training"},
    {"corpus", "demo", "serve"},  # corpus: the deprecated alias of demo/corpus.py
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


# ---- file-level import cycles (issue #20) ----


def module_file(module: str, root: Path = PACKAGE) -> Path | None:
    """``retlm.x.y`` -> retlm/x/y.py or retlm/x/y/__init__.py (``root``: the package); None outside it."""
    parts = module.split(".")
    if parts[0] != root.name:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _run_time_imports(tree: ast.AST):
    """Every import statement of a module, at any depth (function-level imports included), except those
    under ``if TYPE_CHECKING:``, which never run."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif _is_type_checking_block(node):
            yield from (n for child in node.orelse for n in _run_time_imports(ast.Module([child], [])))
        else:
            yield from _run_time_imports(node)


def imported_files(path: Path, root: Path = PACKAGE) -> set[Path]:
    """The package's files that ``path`` imports: ``import retlm.x`` and ``from retlm.x import y`` name
    retlm/x.py (or retlm/x/__init__.py), and ``from retlm.x import submodule`` names the submodule's file.
    Relative imports are resolved from ``path``'s package."""
    package = list(path.relative_to(root.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in _run_time_imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(f for alias in node.names if (f := module_file(alias.name, root)))
            continue
        if node.level:
            base = package[: len(package) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        file = module_file(module, root)
        if file is None:
            continue
        submodules = [module_file(f"{module}.{alias.name}", root) for alias in node.names]
        found.update(f for f in submodules if f)
        if not all(submodules):  # names defined in the module itself
            found.add(file)
    found.discard(path)
    return found


def import_cycles(files: set[Path], root: Path = PACKAGE) -> list[list[Path]]:
    """The import cycles among ``files`` (of the package at ``root``): each strongly connected component
    of more than one file of the graph "a imports b" restricted to ``files``, sorted (Tarjan's algorithm,
    iterative)."""
    graph = {f: sorted(imported_files(f, root) & files) for f in sorted(files)}
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    on_stack: set[Path] = set()
    cycles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return sorted(cycles)


def test_the_cycle_finder_finds_lazy_and_submodule_cycles(tmp_path):
    package = tmp_path / "retlm"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from retlm.sub import b\n",  # a submodule: an import of sub/b.py
        "sub/__init__.py": "X = 1\n",
        "sub/b.py": "def f():\n    from retlm import c\n",  # lazy
        "c.py": "import typing\nif typing.TYPE_CHECKING:\n    from retlm import d\nimport retlm.a\n",
        "d.py": "from .c import thing\n",  # relative; d -> c, but c -> d only for type checkers
        "e.py": "from retlm.sub import X\n",  # a name of sub/__init__.py
    }
    for name, text in files.items():
        (package / name).write_text(text)
    assert imported_files(package / "e.py", package) == {package / "sub" / "__init__.py"}
    assert imported_files(package / "d.py", package) == {package / "c.py"}
    cycles = import_cycles(set(package.rglob("*.py")), package)
    assert cycles == [sorted(package / n for n in ("a.py", "sub/b.py", "c.py"))]


def test_no_import_cycles_in_the_package():
    cycles = [[str(f.relative_to(PACKAGE.parent)) for f in cycle] for cycle in import_cycles(set(SOURCES))]
    assert not cycles, f"files that import each other (lazily or not): {cycles}"


def test_models_and_retrieval_are_siblings():
    """The models read neighbor tokens, never the database; the database knows no model."""
    for part, other in (("models", "retrieval"), ("retrieval", "models")):
        for path in (PACKAGE / part).rglob("*.py"):
            assert other not in retlm_imports(path), f"{path.relative_to(PACKAGE.parent)} imports {other}"


def private_imports(path: Path) -> list[str]:
    """``from retlm.x import _name`` in ``path``: another module's private name. A private module
    (``retlm.retrieval._storage``) may be imported inside its own package only."""
    found = []
    package = path.relative_to(PACKAGE.parent).parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        module = node.module or "" if isinstance(node, ast.ImportFrom) and node.level == 0 else ""
        if not module.startswith("retlm"):
            continue
        found += [f"{module}.{a.name}" for a in node.names if a.name.startswith("_") and a.name[:2] != "__"]
        parts = module.split(".")
        private = next((i for i, part in enumerate(parts) if part.startswith("_")), None)
        if private is not None and tuple(parts[:private]) != package[:private]:
            found.append(module)
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_imports_another_modules_private_names(path: Path):
    assert not private_imports(path), f"{path.relative_to(PACKAGE.parent)} imports {private_imports(path)}"


MODELING_FILES = sorted(PACKAGE.glob("models/*/modeling_*.py"))


@pytest.mark.parametrize("path", MODELING_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_modeling_forward_is_at_most_60_lines(path: Path):
    """nanoGPT's ``GPT.forward`` is 24 lines, HF's ``LlamaModel.forward`` about 50: a forward reads top
    to bottom (signature and docstring included)."""
    long = [
        f"{cls.name}.forward: {node.end_lineno - node.lineno + 1} lines"
        for cls in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(cls, ast.ClassDef)
        for node in cls.body
        if isinstance(node, ast.FunctionDef)
        and node.name == "forward"
        and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, f"{path.relative_to(PACKAGE.parent)}: {long}"


TESTS = Path(__file__).resolve().parent
TOP_LEVEL_TESTS = {
    "test_architecture.py",
    "test_readme.py",
    "test_fuzz.py",
    "test_tokenization.py",
    "test_experiments.py",
}


def test_tests_mirror_the_package():
    """Each test folder is named after a part of ``retlm/`` (``helpers/`` holds what they share), and only
    the checks that span the whole tree stay at the top (docs/architecture.md, "Tests mirror the
    package"); test file names are unique, as pytest's default import mode needs, and no test module
    imports another (what two share lives in ``helpers/``)."""
    parts = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders - {"helpers"} <= parts, sorted(folders - {"helpers"} - parts)
    assert {p.name for p in TESTS.glob("test_*.py")} == TOP_LEVEL_TESTS
    names = [p.name for p in TESTS.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert not list((TESTS / "helpers").glob("test_*.py"))
    imports_tests = [
        str(path.relative_to(TESTS))
        for path in TESTS.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom | ast.Import)
        and any(
            name.startswith("test_")
            for name in [getattr(node, "module", None) or ""] + [a.name for a in node.names]
        )
    ]
    assert not imports_tests, f"test modules import other test modules: {imports_tests}"
