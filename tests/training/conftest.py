"""Fixtures of the training tests."""

import pytest


@pytest.fixture(scope="session")
def db(twin_db):
    """The database most training tests read: the shared synthetic twin (``tests/conftest.py``); a module
    that needs another names its own ``db``."""
    return twin_db
