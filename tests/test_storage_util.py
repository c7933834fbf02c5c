"""storage/util.py: the small helpers every layer shares."""
from __future__ import annotations

import os
import pickle

import pytest

from storage.util import LruCache


def test_lru_cache_evicts_the_least_recently_used_and_closes_it():
    closed = []
    lru = LruCache(2, closed.append)
    assert lru.put("a", 1) == 1 and lru.put("b", 2) == 2
    assert lru.get("a") == 1  # a is now the most recent: b goes first
    lru.put("c", 3)
    assert closed == [2] and lru.get("b") is None and len(lru) == 2
    assert lru.put("c", 33) == 3 and closed == [2, 33]  # the entry there is kept, the new closed
    lru.clear()
    assert sorted(closed) == [1, 2, 3, 33] and len(lru) == 0 and lru.get("a") is None
    with pytest.raises(ValueError, match="at least 1 entry"):
        LruCache(0)


def test_lru_cache_of_descriptors_arrives_empty_when_pickled_and_ignores_close_errors(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    lru = LruCache(1, os.close)
    fd = lru.put("f", os.open(path, os.O_RDONLY))
    copy = pickle.loads(pickle.dumps(lru))
    assert len(copy) == 0 and copy.limit == 1 and copy.get("f") is None
    os.close(fd)  # closed behind the cache's back: clear() does not raise
    lru.clear()
    assert len(lru) == 0


def test_lru_cache_in_a_forked_child_starts_empty_and_leaves_the_parent_its_entries():
    closed = []
    lru = LruCache(4, closed.append)
    lru.put("a", 1)
    pid = os.fork()
    if pid == 0:  # the child: a is the parent's, b its own
        fresh = lru.get("a") is None and len(lru) == 0
        lru.put("b", 2)
        lru.clear()
        os._exit(0 if fresh and closed == [2] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lru.get("a") == 1 and len(lru) == 1 and closed == []
