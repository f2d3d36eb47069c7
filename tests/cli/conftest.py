"""The cli tests run on one torch thread: tiny models decode fastest so."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
