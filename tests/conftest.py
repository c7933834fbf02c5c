"""Fixtures shared by the whole suite.

Helpers that tests import (builders, fake data, runners) live in ``tests/*_helpers.py`` modules,
imported by bare name (pytest puts tests/ on sys.path through this conftest); fixtures that many
files use live here and need no import.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread (the machine is shared; and the crash/resume comparisons run the same
    arithmetic in the killed child, the resumed run and the reference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_fsync(monkeypatch):
    """Skip fsync in the cache writer (slow here); atomicity against crashes does not need it."""
    monkeypatch.setenv("TEC_CACHE_FSYNC", "0")
