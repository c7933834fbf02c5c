"""Small helpers every layer uses (storage imports nothing above it, so stages/ and pipeline/
import these from here): the first line of an exception, byte sizes for people and the
least-recently-used cache of open files."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["LruCache", "first_line", "format_bytes"]

K = TypeVar("K")
V = TypeVar("V")


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``str(exc)`` (stripped), or the exception's type name. A
    KeyError's message is its argument (``str()`` would quote it)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def format_bytes(n: float, *, digits: int = 2, si: bool = False) -> str:
    """``n`` bytes in binary units (B, KiB, MiB, GiB, TiB, PiB): ``1536 -> '1.50 KiB'``, with
    ``digits`` decimals above bytes (whole bytes as they are). ``si=True``: decimal units
    (kB as KB, MB, GB, ...) with thousands separators, one decimal even for bytes (the plan's
    totals, whose wording a test fixes)."""
    if si:
        for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
            if abs(n) < 1000 or unit == "PB":
                return f"{n:,.1f} {unit}"
            n /= 1000
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    return f"{n} B"  # not reached


class LruCache(Generic[K, V]):
    """At most ``limit`` entries (open files, say), the least recently used evicted first;
    ``close(value)`` is called on every entry evicted or cleared (an OSError from it is ignored).

    Thread-safe. Per process: after a fork the child starts empty (the parent's entries are left
    to the parent, not closed), and a pickled cache arrives empty.
    """

    def __init__(self, limit: int, close: Callable[[V], None] | None = None):
        if limit < 1:
            raise ValueError(f"an LRU cache holds at least 1 entry, got limit={limit}")
        self.limit = limit
        self._close = close
        self._reset()

    def _reset(self) -> None:
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _own(self) -> None:
        if self._pid != os.getpid():  # a forked child: its own entries from here on
            self._reset()

    def get(self, key: K) -> V | None:
        """The entry for ``key`` (now the most recently used), or None."""
        self._own()
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> V:
        """Add ``value`` for ``key`` and evict beyond the limit; returns the entry kept (when
        another thread added ``key`` meanwhile, that one: ``value`` is closed)."""
        self._own()
        with self._lock:
            kept = self._entries.get(key)
            if kept is not None:
                self._entries.move_to_end(key)
                self._discard(value)
                return kept
            self._entries[key] = value
            while len(self._entries) > self.limit:
                self._discard(self._entries.popitem(last=False)[1])
            return value

    def clear(self) -> None:
        """Close and forget every entry."""
        self._own()
        with self._lock:
            while self._entries:
                self._discard(self._entries.popitem(last=False)[1])

    def __len__(self) -> int:
        return len(self._entries) if self._pid == os.getpid() else 0

    def _discard(self, value: V) -> None:
        if self._close is not None:
            try:
                self._close(value)
            except OSError:
                pass

    def __getstate__(self) -> dict:
        return {"limit": self.limit, "close": self._close}

    def __setstate__(self, state: dict) -> None:
        self.limit, self._close = state["limit"], state["close"]
        self._reset()
