"""Load retro-pytorch 0.3.9's model module from site-packages without its package __init__ (which
imports autofaiss, absent here). Test-only helper."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest


def load_retro_pytorch(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    spec = importlib.util.find_spec("retro_pytorch")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("retro-pytorch is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "retro_pytorch.py"
    package = types.ModuleType("retro_pytorch")
    package.__path__ = []
    retrieval = types.ModuleType("retro_pytorch.retrieval")
    retrieval.BERT_VOCAB_SIZE = 28996
    monkeypatch.setitem(sys.modules, "retro_pytorch", package)
    monkeypatch.setitem(sys.modules, "retro_pytorch.retrieval", retrieval)
    module_spec = importlib.util.spec_from_file_location("retro_pytorch.retro_pytorch", path)
    module = importlib.util.module_from_spec(module_spec)
    monkeypatch.setitem(sys.modules, "retro_pytorch.retro_pytorch", module)
    module_spec.loader.exec_module(module)
    return module
