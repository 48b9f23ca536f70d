"""The one exception type the CLI turns into a one-line message (exit code 2)."""

from __future__ import annotations

MAX_LISTED = 20


class SegpipeError(Exception):
    """Bad input or setup: the message names the file or URL and what was expected."""


def raise_problems(problems: list[str], header: str, hint: str = "") -> None:
    """Raise one SegpipeError listing `problems` (the first MAX_LISTED) under `header`, then `hint` (what
    to do) on a line of its own; no problems: return."""
    if problems:
        listed = "\n  - ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        tail = f"\n{hint}" if hint else ""
        raise SegpipeError(f"{header} ({len(problems)} problem(s)):\n  - {listed}{more}{tail}")
