"""Small helpers every layer uses (storage imports nothing above it, so stages/ and pipeline/
import these from here): the first line of an exception and byte sizes for people."""
from __future__ import annotations

__all__ = ["first_line", "format_bytes"]


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
