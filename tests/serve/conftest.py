"""Fixtures of the serve tests."""

import pytest


@pytest.fixture(scope="session")
def serve_paths(tmp_path_factory):
    """A database, a tiny RETRO trained on it and a tiny Llama (see serve_helpers.build_fixture)."""
    from serve_helpers import build_fixture

    return build_fixture(tmp_path_factory.mktemp("serve"))
